//! The `ovbd device` verbs: attach a `config.v1.json` image as a block device (ublk, or a loop
//! device over this process's FUSE mount), list, detach.
//!
//! Recovery on fuse: one FUSE mount and one holder process per device, so that `attach --recover
//! --id N` re-serves exactly /dev/loopN (from its holder) as ublk's user recovery does.

use crate::config::FrontendChoice;
use crate::device::{
    self, fuse_holder, AttachOptions, Backing, DeviceFrontend, Frontend, FuseFile, FuseFrontend,
    WorkerPool,
};
use crate::source::config::ImageConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What `list` and `detach` know about a device attached by `ovbd device attach`.
#[derive(Debug, Serialize, Deserialize)]
struct DeviceRecord {
    id: u32,
    block: String,
    config: PathBuf,
    pid: u32,
    writable: bool,
    recoverable: bool,
    /// Records of older ovbd versions have none: ublk.
    #[serde(default)]
    frontend: Frontend,
    /// fuse: what backs the loop device (tells it from another program's with the same number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backing: Option<Backing>,
    /// fuse: the FUSE mount its file is on (its holder's socket beside it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fuse_dir: Option<PathBuf>,
}

impl DeviceRecord {
    /// Whether its device still exists (for fuse: the loop device is still bound to our file).
    fn exists(&self) -> bool {
        match self.frontend {
            Frontend::Ublk => device::exists(self.id),
            Frontend::Fuse => {
                self.backing.is_some() && device::loop_backing(self.id) == self.backing
            }
        }
    }

    /// Whether `attach --recover` can re-serve it once its server is gone (fuse: a holder
    /// still keeps its connection).
    fn can_recover(&self) -> bool {
        match (&self.frontend, &self.fuse_dir) {
            (Frontend::Ublk, _) => self.recoverable,
            (Frontend::Fuse, Some(dir)) => {
                std::os::unix::net::UnixStream::connect(fuse_holder::socket_path(dir)).is_ok()
            }
            (Frontend::Fuse, None) => false,
        }
    }
}

/// fuse, `--recover --id N`: the mount and file of /dev/loopN its dead server left.
struct FuseRecovery {
    dir: PathBuf,
    file: FuseFile,
}

impl FuseRecovery {
    /// What the record of /dev/loop`id` says, if its server is gone and the device is still
    /// bound as recorded.
    fn of(id: u32) -> Result<FuseRecovery> {
        let rp = record_path(Frontend::Fuse, id);
        let record: DeviceRecord = std::fs::read(&rp)
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok())
            .with_context(|| {
                format!(
                    "no record of /dev/loop{id} in {}: not a device `ovbd device attach` made (see `ovbd device list`)",
                    rp.display()
                )
            })?;
        let (Some(dir), Some(backing)) = (record.fuse_dir.clone(), record.backing) else {
            bail!(
                "/dev/loop{id} was attached by an ovbd without fuse recovery: `ovbd device detach {id}` and attach anew"
            );
        };
        if pid_alive(record.pid) {
            bail!(
                "/dev/loop{id} is still served by pid {}: nothing to recover (`ovbd device detach {id}` stops it)",
                record.pid
            );
        }
        if device::loop_backing(id) != Some(backing) {
            remove_own_record(&rp, record.pid);
            bail!(
                "/dev/loop{id} is gone (or another program's now): attach anew without --recover"
            );
        }
        Ok(FuseRecovery {
            dir,
            file: FuseFile {
                ino: backing.ino,
                loop_number: id,
                backing,
            },
        })
    }
}

fn run_dir() -> PathBuf {
    std::env::var_os("OVBD_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/ovbd"))
}

fn record_path(frontend: Frontend, id: u32) -> PathBuf {
    let name = match frontend {
        Frontend::Ublk => format!("{id}.json"),
        Frontend::Fuse => format!("loop{id}.json"),
    };
    run_dir().join("devices").join(name)
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `ovbd device attach`. With `background`, returns once the device is up and a child process
/// serves it; otherwise serves until the device is detached or a signal arrives.
pub fn attach(
    configs: &[PathBuf],
    background: bool,
    id: Option<u32>,
    recover: bool,
    frontend: FrontendChoice,
) -> Result<()> {
    let frontend = frontend.resolve();
    if recover && id.is_none() {
        bail!("--recover needs --id: the device to re-attach");
    }
    if (id.is_some() || recover) && configs.len() != 1 {
        bail!("--id and --recover take exactly one config");
    }
    if frontend == Frontend::Fuse && id.is_some() && !recover {
        bail!("on the fuse frontend the loop driver numbers new devices: --id only goes with --recover (re-serve /dev/loopN)");
    }
    if !background {
        return serve(configs, id, recover, frontend, &mut |msg| {
            println!("{msg}");
            let _ = std::io::stdout().flush();
        });
    }
    // Fork before any thread exists; the parent reports what the child says.
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) into a 2-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe");
    }
    // SAFETY: single-threaded here; the child only continues this program.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    // SAFETY: fds are ours.
    let (mut rd, mut wr) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    if pid > 0 {
        drop(wr);
        // One line per device ("ok PATH"), or "err REASON"; the child keeps its end open
        // while it serves, so read lines, not to EOF.
        let mut paths = Vec::new();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while paths.len() < configs.len() {
            line.clear();
            while rd.read(&mut byte)? == 1 && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            let msg = String::from_utf8_lossy(&line).into_owned();
            match msg.strip_prefix("ok ") {
                Some(p) => paths.push(p.to_string()),
                None => bail!(
                    "{}",
                    msg.strip_prefix("err ")
                        .unwrap_or("device server exited before the devices started")
                ),
            }
        }
        for p in paths {
            println!("{p}");
        }
        return Ok(());
    }
    drop(rd);
    detach_stdio()?;
    let mut reported = 0;
    let r = serve(configs, id, recover, frontend, &mut |msg| {
        let _ = writeln!(wr, "ok {msg}");
        reported += 1;
    });
    if let Err(e) = &r {
        // The caller still waits while some device has not started: tell it why.
        if reported < configs.len() {
            let _ = writeln!(wr, "err {e:#}");
        }
    }
    std::process::exit(if r.is_ok() { 0 } else { 1 });
}

/// Points the background server's stdio away from the caller (whose pipes would otherwise
/// stay open), stderr to a log file in the run directory.
fn detach_stdio() -> Result<()> {
    let logs = run_dir().join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join(format!("device-server-{}.log", std::process::id())))?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    use std::os::fd::AsRawFd;
    // SAFETY: dup2 onto the standard descriptors; setsid leaves the caller's session.
    unsafe {
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(null.as_raw_fd(), 1);
        libc::dup2(log.as_raw_fd(), 2);
        libc::setsid();
    }
    Ok(())
}

/// Attaches every config in this process, reports each device as it comes up, and serves
/// until every device is detached (or a signal detaches them all).
fn serve(
    configs: &[PathBuf],
    id: Option<u32>,
    recover: bool,
    kind: Frontend,
    ready: &mut dyn FnMut(&str),
) -> Result<()> {
    // Signals go to the waiter thread of `serve_on`; block them before any thread starts.
    super::block_stop_signals()?;
    let recovery = match (kind, recover, id) {
        (Frontend::Fuse, true, Some(id)) => Some(FuseRecovery::of(id)?),
        _ => None,
    };
    // Relative config paths must not resolve in the holder's namespace's root (below).
    let configs: Vec<PathBuf> = configs
        .iter()
        .map(|c| std::fs::canonicalize(c).unwrap_or_else(|_| c.clone()))
        .collect();
    match &recovery {
        // The mount lives in the dead server's private namespace, which its holder keeps:
        // we serve it from there.
        Some(r) => {
            let socket = fuse_holder::socket_path(&r.dir);
            let entered = fuse_holder::enter_mount_namespace(&socket).with_context(|| {
                format!(
                    "entering the mount namespace of the fuse holder on {}",
                    socket.display()
                )
            })?;
            if !entered {
                let n = r.file.loop_number;
                bail!(
                    "no fuse holder for /dev/loop{n} (nothing listens on {}): its FUSE connection died with its server; `ovbd device detach {n}` and attach anew",
                    socket.display()
                );
            }
        }
        // ublk: no mount of a device we serve may live in this process's namespace. fuse: the
        // mounts are this server's own (other servers each mount theirs at their own paths),
        // kept by their holders; the loop devices over them are what others see.
        None => {
            device::enter_private_mount_namespace().context("entering a private mount namespace")?
        }
    }
    serve_on(kind, &configs, id, recover, recovery.as_ref(), ready)
}

/// A device's frontend: ublk needs none of its own; fuse a mount per device (one holder each,
/// so each device is recovered on its own), made anew or, with `recovery`, served again.
fn open_frontend(
    kind: Frontend,
    recovery: Option<&FuseRecovery>,
) -> Result<(DeviceFrontend, Option<PathBuf>)> {
    if kind == Frontend::Ublk {
        return Ok((DeviceFrontend::Ublk, None));
    }
    if let Some(r) = recovery {
        let f = FuseFrontend::recover_kept(&r.dir)
            .with_context(|| format!("re-serving /dev/loop{}", r.file.loop_number))?;
        return Ok((DeviceFrontend::Fuse(f), Some(r.dir.clone())));
    }
    let base = run_dir().join("fuse");
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    // A name never used before: a later server reusing our pid must not take our mount's
    // leftovers (loop devices under it) for stale ones while a recovered server serves them.
    let dir = tempfile::Builder::new()
        .prefix(&format!("{}-", std::process::id()))
        .tempdir_in(&base)
        .with_context(|| format!("making a mountpoint in {}", base.display()))?
        .keep();
    let f = DeviceFrontend::open_restartable(kind, &dir)
        .with_context(|| format!("starting the {kind} device frontend"))?;
    log::info!("device frontend: {} on {}", f.kind(), dir.display());
    Ok((f, Some(dir)))
}

/// Removes what a fuse device's mount left in the run directory once it is unmounted.
fn remove_fuse_dir(dir: &Path) {
    let _ = std::fs::remove_dir(dir);
    let _ = std::fs::remove_file(dir.with_extension("next-ino"));
    fuse_holder::remove_files(&fuse_holder::socket_path(dir));
}

fn serve_on(
    kind: Frontend,
    configs: &[PathBuf],
    id: Option<u32>,
    recover: bool,
    recovery: Option<&FuseRecovery>,
    ready: &mut dyn FnMut(&str),
) -> Result<()> {
    let set = super::block_stop_signals()?;
    let pool = WorkerPool::new("ovbd-io", 2, 256);
    let mut devices = Vec::with_capacity(configs.len());
    let mut spans = Vec::with_capacity(configs.len());
    for path in configs {
        // The device's span: its attach, detach and failure lines name it.
        let span = tracing::info_span!(
            "device",
            image = %path.display(),
            frontend = %kind,
            id = tracing::field::Empty
        );
        let entered = span.enter();
        match attach_one(kind, path, id, recover, recovery, &pool) {
            Ok(d) => {
                span.record("id", d.device.id);
                tracing::info!(device = %d.device.block_path(), "attached");
                ready(&d.device.block_path());
                devices.push(d);
                drop(entered);
                spans.push(span);
            }
            Err(e) => {
                tracing::warn!(reason = %format!("{e:#}"), "attach failed");
                for (d, started) in devices.into_iter().zip(configs) {
                    let _ = d.device.stop();
                    let _ = d.end();
                    // Its resultFile said success: the device is gone again.
                    if let Ok(cfg) = ImageConfig::load(started) {
                        cfg.write_result(&Err(anyhow::anyhow!(
                            "detached again: another config failed: {e:#}"
                        )));
                    }
                }
                return Err(e);
            }
        }
    }
    let stoppers: Vec<device::DeviceStopper> = devices.iter().map(|d| d.device.stopper()).collect();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: waiting on the blocked set.
            unsafe { libc::sigwait(&set, &mut sig) };
            log::info!("signal {sig}: detaching {} device(s)", stoppers.len());
            for s in stoppers {
                if let Err(e) = s.stop() {
                    log::error!("{e:#}");
                }
            }
        })?;
    let mut result = Ok(());
    for (d, span) in devices.into_iter().zip(spans) {
        let _entered = span.enter();
        if let Err(e) = d.end() {
            result = Err(e);
        }
    }
    result
}

/// Removes the record at `path` if server `pid` wrote it. `ovbd device detach` returns once the
/// kernel let go of the device, before its server ends: by then a new `attach` may have been
/// given the same device number and written its own record there, which must stay. (`detach`
/// itself removes only the record it read, by the same rule.)
fn remove_own_record(path: &Path, pid: u32) {
    let own = std::fs::read(path)
        .ok()
        .and_then(|t| serde_json::from_slice::<DeviceRecord>(&t).ok())
        .is_some_and(|r| r.pid == pid);
    if own {
        let _ = std::fs::remove_file(path);
    }
}

/// A device this server serves, with what it leaves behind when it ends.
struct Served {
    device: device::AttachedDevice,
    record: PathBuf,
    frontend: DeviceFrontend,
    fuse_dir: Option<PathBuf>,
}

impl Served {
    /// Waits until the device is detached, then removes its record and its own frontend.
    fn end(mut self) -> Result<()> {
        let r = self.device.join();
        match &r {
            Err(e) => {
                let reason = format!("{e:#}");
                tracing::warn!(device = %self.device.block_path(), %reason, "device failed");
            }
            Ok(()) => tracing::info!(device = %self.device.block_path(), "detached"),
        }
        remove_own_record(&self.record, std::process::id());
        // fuse: the last users of the mount; it is unmounted and its holder told to go.
        drop(self.device);
        drop(self.frontend);
        if let Some(dir) = &self.fuse_dir {
            remove_fuse_dir(dir);
        }
        Ok(r?)
    }
}

/// Opens one config's image and attaches it; records the outcome in its resultFile and the
/// device in the run directory.
fn attach_one(
    kind: Frontend,
    config_path: &Path,
    id: Option<u32>,
    recover: bool,
    recovery: Option<&FuseRecovery>,
    pool: &Arc<WorkerPool>,
) -> Result<Served> {
    let cfg = ImageConfig::load(config_path)?;
    let attached = cfg.open_image(None).and_then(|image| {
        let writable = image.is_writable();
        let (frontend, fuse_dir) = open_frontend(kind, recovery)?;
        let opts = match recovery {
            Some(r) => AttachOptions {
                recover: true,
                fuse_file: Some(r.file),
                ..Default::default()
            },
            None => AttachOptions {
                id,
                recover,
                ..Default::default()
            },
        };
        let image = Arc::new(image);
        let prefetched = image.clone();
        let attached = frontend.attach(image, pool.clone(), opts);
        // Re-bound or not, the dead server's other requests have waited enough.
        frontend.finish_recovery();
        let dev = match attached {
            Ok(d) => d,
            Err(e) => {
                // A fresh mount goes (a recovered one stays with its holder).
                if let (Some(dir), None) = (&fuse_dir, recovery) {
                    drop(frontend);
                    remove_fuse_dir(dir);
                }
                return Err(e.into());
            }
        };
        // The image's trace or priority list (local only: no registry here), replayed on its
        // own thread; it ends by itself once the device lets go of the image.
        drop(crate::prefetch::start(&cfg, &prefetched, None));
        Ok((dev, writable, frontend, fuse_dir))
    });
    let (dev, writable, frontend, fuse_dir) = match attached {
        Ok(d) => d,
        Err(e) => {
            let e = e.context(format!("{}", config_path.display()));
            cfg.write_result(&Err(anyhow::anyhow!("{e:#}")));
            return Err(e);
        }
    };
    let record = DeviceRecord {
        id: dev.id,
        block: dev.block_path(),
        config: std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_path_buf()),
        pid: std::process::id(),
        writable,
        // fuse: while its holder keeps the connection (see `can_recover`).
        recoverable: dev.recoverable || fuse_dir.is_some(),
        frontend: dev.frontend(),
        backing: dev.backing(),
        fuse_dir: fuse_dir.clone(),
    };
    let served = Served {
        record: record_path(dev.frontend(), dev.id),
        device: dev,
        frontend,
        fuse_dir,
    };
    let rp = &served.record;
    if let Some(parent) = rp.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(rp, serde_json::to_vec_pretty(&record)?)
        .with_context(|| format!("writing {}", rp.display()))?;
    cfg.write_result(&Ok(()));
    Ok(served)
}

pub fn list(as_json: bool) -> Result<()> {
    let mut records = records();
    records.sort_by_key(|r| (r.frontend == Frontend::Fuse, r.id));
    let state = |r: &DeviceRecord| match (r.exists(), pid_alive(r.pid)) {
        (true, true) => "serving",
        (true, false) if r.can_recover() => "orphaned (recoverable)",
        (true, false) => "orphaned",
        (false, _) => "gone",
    };
    if as_json {
        let v: Vec<_> = records
            .iter()
            .map(|r| serde_json::json!({"id": r.id, "block": r.block, "config": r.config, "pid": r.pid, "writable": r.writable, "state": state(r), "frontend": r.frontend}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<4} {:<14} {:<8} {:<4} {:<24} {:<8} CONFIG",
        "ID", "DEVICE", "PID", "RW", "STATE", "FRONTEND"
    );
    for r in &records {
        println!(
            "{:<4} {:<14} {:<8} {:<4} {:<24} {:<8} {}",
            r.id,
            r.block,
            r.pid,
            if r.writable { "rw" } else { "ro" },
            state(r),
            r.frontend,
            r.config.display()
        );
    }
    Ok(())
}

/// Every record in the run directory.
fn records() -> Vec<DeviceRecord> {
    let dir = run_dir().join("devices");
    let mut records = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            if let Ok(text) = std::fs::read_to_string(e.path()) {
                if let Ok(r) = serde_json::from_str::<DeviceRecord>(&text) {
                    records.push(r);
                }
            }
        }
    }
    records
}

/// The device `ovbd device detach` names: `N` (ublk if such a record or device exists, else
/// loop), `/dev/ublkbN`, `/dev/loopN` or `loopN`.
fn parse_device(arg: &str) -> Result<(Frontend, u32)> {
    let num = |s: &str| {
        s.parse::<u32>()
            .with_context(|| format!("{arg:?} is not a device id, /dev/ublkbN or /dev/loopN"))
    };
    if let Some(n) = arg.strip_prefix("/dev/ublkb") {
        return Ok((Frontend::Ublk, num(n)?));
    }
    if let Some(n) = arg.strip_prefix("/dev/loop").or(arg.strip_prefix("loop")) {
        return Ok((Frontend::Fuse, num(n)?));
    }
    let id = num(arg)?;
    let fuse_recorded = record_path(Frontend::Fuse, id).exists();
    let ublk = record_path(Frontend::Ublk, id).exists() || device::exists(id);
    Ok(match (ublk, fuse_recorded) {
        (true, true) => {
            bail!("both /dev/ublkb{id} and /dev/loop{id} are ovbd devices: name one by its path")
        }
        (false, true) => (Frontend::Fuse, id),
        _ => (Frontend::Ublk, id),
    })
}

pub fn detach(arg: &str) -> Result<()> {
    let (frontend, id) = parse_device(arg)?;
    let rp = record_path(frontend, id);
    let record: Option<DeviceRecord> = std::fs::read_to_string(&rp)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    if frontend == Frontend::Fuse {
        return detach_loop(id, record, &rp);
    }
    // The record read here is removed below, never one a new `attach` of the same id wrote since.
    let remove_record = || {
        if let Some(r) = &record {
            remove_own_record(&rp, r.pid);
        }
    };
    if !device::exists(id) {
        remove_record();
        bail!("no ublk device {id}");
    }
    let server_alive = record.as_ref().is_some_and(|r| pid_alive(r.pid));
    if server_alive {
        device::stop_device(id)?;
        // The server deletes the device (and exits if it served nothing else).
        let deadline = Instant::now() + Duration::from_secs(60);
        while device::exists(id) {
            if Instant::now() > deadline {
                bail!("ublk device {id} still present 60 s after stopping it");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    } else {
        // Nobody serves it (server killed while the device was kept for recovery).
        device::delete_device(id)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while device::exists(id) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if device::exists(id) {
            eprintln!(
                "ovbd: ublk device {id} deleted; the kernel removes it once its last user (a mount?) lets go"
            );
        }
    }
    remove_record();
    Ok(())
}

/// Detaches loop device `id` of a fuse server: unbound at once if unused (its server then drops
/// the image and exits once it serves nothing), else once its last user lets go.
fn detach_loop(id: u32, record: Option<DeviceRecord>, rp: &Path) -> Result<()> {
    let Some(backing) = record.as_ref().and_then(|r| r.backing) else {
        bail!(
            "/dev/loop{id} is not a device `ovbd device attach` made (no record in {})",
            rp.display()
        );
    };
    let pid = record.as_ref().map_or(0, |r| r.pid);
    if !device::clear_loop(id, backing)? {
        remove_own_record(rp, pid);
        bail!("/dev/loop{id} is gone (or another program's now)");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while device::loop_backing(id) == Some(backing) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if device::loop_backing(id) == Some(backing) {
        eprintln!("ovbd: /dev/loop{id} detached; the kernel removes it once its last user (a mount?) lets go");
    }
    // A live server removes the record once it has dropped the image.
    let Some(record) = record.filter(|r| !pid_alive(r.pid)) else {
        return Ok(());
    };
    remove_own_record(rp, pid);
    // Orphaned: its holder lets go of the connection (I/O still waiting on it fails), and
    // with it goes the dead server's mount.
    if let Some(dir) = &record.fuse_dir {
        fuse_holder::quit(&fuse_holder::socket_path(dir));
        remove_fuse_dir(dir);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pid: u32) -> Vec<u8> {
        serde_json::to_vec(&DeviceRecord {
            id: 1,
            block: "/dev/loop1".into(),
            config: "/c.json".into(),
            pid,
            writable: false,
            recoverable: true,
            frontend: Frontend::Fuse,
            backing: None,
            fuse_dir: None,
        })
        .unwrap()
    }

    /// CI once failed here: a server that ended after `detach` had returned removed the record
    /// the next `attach` of the same loop number had just written, and that device could no
    /// longer be detached by name.
    #[test]
    fn an_ending_server_leaves_another_servers_record_alone() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("loop1.json");
        std::fs::write(&path, record(200)).unwrap();
        remove_own_record(&path, 100);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            record(200),
            "another server's record"
        );
        // Half written by the next server: not provably ours, kept too.
        std::fs::write(&path, &record(100)[..10]).unwrap();
        remove_own_record(&path, 100);
        assert!(path.exists());
        std::fs::write(&path, record(100)).unwrap();
        remove_own_record(&path, 100);
        assert!(!path.exists(), "its own record is removed");
    }
}
