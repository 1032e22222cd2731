//! `ovbd record-trace SRC DST -- CMD...`: runs CMD once in the OverlayBD image SRC, records
//! which blocks of which layer it read, and writes DST: SRC with an acceleration layer on top
//! holding that trace in upstream's format (what upstream's `ctr record-trace` pushes), which
//! ovbd and upstream overlaybd replay into their caches at the next cold start.
//!
//! No containerd is needed: the layers are downloaded, stacked under a scratch writable layer,
//! attached as a block device of this process (the configured frontend), its filesystem
//! mounted, and CMD run in it (its root by pivot_root) in new mount, PID (CMD is pid 1),
//! network (loopback only, as `ctr run`), UTS, IPC and cgroup namespaces, as root with a
//! reduced capability set (see `enter_rootfs`), in a cgroup of its own that caps its memory
//! and processes ([`super::cgroup`]), with the image config's environment and working
//! directory, until it exits or `--time` passes. Reads are recorded from the mount on, above
//! the tar and ZFile (offsets in each layer's LSMT file), in the order they were made; writes
//! go to the scratch layer (at most `--scratch-mb` of disk), which is dropped. The same trace
//! gives the same image (no timestamps are added).

pub use super::cgroup::Limits;
use super::cgroup::{self, CmdCgroup};
use super::{acceleration_layer, source_config, MEDIA_CONFIG};
use crate::config::FrontendChoice;
use crate::device::{AttachOptions, DeviceFrontend, WorkerPool};
use crate::labels::{LABEL_ACCELERATION_LAYER, LABEL_BLOB_DIGEST};
use crate::oci::digest::digest_of;
use crate::oci::MEDIA_OCI_MANIFEST;
use crate::oci::{ImageIo, ImageRef, ImageToWrite, LayerFile, Platform, RegistryOptions};
use anyhow::{anyhow, bail, Context, Result};
use oci_spec::image::Descriptor;
use ovbd_format::layer::open_layer_wrapped;
use ovbd_format::trace::{encode_trace, TraceRecorder};
use ovbd_format::{FileSource, ImageStack, LayerStack, RwLayer, RwMode};
use serde::Serialize;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct RecordOptions {
    pub platform: Platform,
    pub registry: RegistryOptions,
    /// Scratch space (every layer blob, the scratch layer); default: `$TMPDIR`.
    pub workdir: Option<PathBuf>,
    /// CMD is killed after this long (upstream's `--time`, 60 s).
    pub time: Duration,
    pub frontend: FrontendChoice,
    /// The device's read-ahead (`[device] read_ahead_kb` of the daemon whose start is traced).
    pub read_ahead_kb: u32,
    /// Set (by a signal) to stop: CMD is killed, the device and mounts go, nothing is written.
    pub stop: Arc<AtomicBool>,
    /// What CMD's processes may take together (a cgroup of their own); `None`: no limit.
    pub limits: Option<Limits>,
    /// Disk CMD's writes may take in the scratch layer, in bytes; `None`: no limit.
    pub scratch_limit: Option<u64>,
}

/// What a recording produced, for `--json`.
#[derive(Debug, Serialize)]
pub struct RecordSummary {
    pub source: String,
    pub destination: String,
    pub manifest: String,
    pub acceleration_layer: String,
    /// Trace records (reads) and the bytes they cover.
    pub records: usize,
    pub bytes: u64,
    /// How CMD ended: `exit N`, `signal N`, or `killed after N s`.
    pub command: String,
    pub seconds: f64,
}

pub fn record_trace(
    src: &str,
    dst: &str,
    cmd: &[String],
    opts: &RecordOptions,
) -> Result<RecordSummary> {
    let started = Instant::now();
    if cmd.is_empty() {
        bail!("no command to record (ovbd record-trace SRC DST -- CMD [ARG...])");
    }
    let src_ref = ImageRef::parse(src)?;
    let dst_ref = ImageRef::parse(dst)?;
    let io = ImageIo::new(opts.registry.clone())?;
    let img = io.resolve(&src_ref, &opts.platform)?;
    let (mut config, mut diff_ids, _) = source_config(&img, src)?;
    let mut layers = img.layers.clone();
    // A trace recorded before is replaced by the new one.
    if layers.last().is_some_and(is_acceleration_layer) {
        layers.pop();
        diff_ids.pop();
        if let Some(h) = config.get_mut("history").and_then(|h| h.as_array_mut()) {
            if h.first().and_then(|e| e.get("created_by")) == Some(&"Acceleration Layer".into()) {
                h.remove(0);
            }
        }
    }
    if layers.is_empty() {
        bail!("{src}: no layer to run");
    }
    for d in &layers {
        if annotation(d, LABEL_BLOB_DIGEST).is_none() {
            bail!(
                "{src}: layer {} is not an OverlayBD layer (no {LABEL_BLOB_DIGEST} annotation): convert the image first (ovbd convert)",
                d.digest()
            );
        }
    }

    let work = super::scratch_dir(opts.workdir.as_deref(), "ovbd-record-")?;
    let mut blobs = Vec::with_capacity(layers.len());
    for (i, d) in layers.iter().enumerate() {
        if opts.stop.load(Ordering::SeqCst) {
            bail!("interrupted while downloading the layers, nothing written");
        }
        let path = work.path().join(format!("layer-{i:04}"));
        io.fetch_blob(&src_ref, d, &path)?;
        blobs.push(LayerFile {
            descriptor: d.clone(),
            path,
        });
    }

    let recorder = TraceRecorder::new();
    let image = open_recorded(&blobs, work.path(), &recorder, opts.scratch_limit)?;
    let outcome = run_on_device(image, work.path(), &config, cmd, opts, &recorder);
    let (records, dropped) = recorder.stop();
    let outcome = outcome?;
    if opts.stop.load(Ordering::SeqCst) {
        bail!(
            "interrupted: {} stopped ({outcome}), nothing written",
            cmd[0]
        );
    }
    if dropped > 0 {
        log::warn!("the trace is capped at 256 MiB: {dropped} later reads were not recorded");
    }
    if records.is_empty() {
        bail!(
            "{} read nothing from the image's layers: no trace to write",
            cmd[0]
        );
    }
    let bytes = records.iter().map(|r| r.count).sum();

    let (accel, accel_digest, accel_size, accel_annotations) =
        acceleration_layer(work.path(), &encode_trace(&records), &mut config)?;
    diff_ids.push(accel_digest.clone());
    *config
        .pointer_mut("/rootfs/diff_ids")
        .ok_or_else(|| anyhow!("image config lost rootfs.diff_ids"))? = diff_ids.into();
    let config_raw = serde_json::to_vec(&config)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {
            "mediaType": MEDIA_CONFIG,
            "digest": digest_of(&config_raw),
            "size": config_raw.len(),
        },
        "layers": layers
            .iter()
            .map(|d| serde_json::json!({
                "mediaType": d.media_type().to_string(),
                "digest": d.digest().to_string(),
                "size": d.size(),
                "annotations": d.annotations().clone().unwrap_or_default()
                    .into_iter().collect::<BTreeMap<_, _>>(),
            }))
            .chain([serde_json::json!({
                "mediaType": accel.descriptor.media_type().to_string(),
                "digest": accel_digest,
                "size": accel_size,
                "annotations": accel_annotations,
            })])
            .collect::<Vec<_>>(),
    });
    let manifest_raw = serde_json::to_vec(&manifest)?;
    blobs.push(accel);
    let written = io.write_image(
        &dst_ref,
        &ImageToWrite {
            layers: &blobs,
            config: &config_raw,
            manifest: &manifest_raw,
            manifest_media_type: MEDIA_OCI_MANIFEST,
        },
    )?;
    Ok(RecordSummary {
        source: src.to_owned(),
        destination: dst.to_owned(),
        manifest: written.digest().to_string(),
        acceleration_layer: accel_digest,
        records: records.len(),
        bytes,
        command: outcome,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn annotation<'a>(d: &'a Descriptor, key: &str) -> Option<&'a String> {
    d.annotations().as_ref().and_then(|a| a.get(key))
}

fn is_acceleration_layer(d: &Descriptor) -> bool {
    annotation(d, LABEL_ACCELERATION_LAYER).is_some_and(|v| v == "yes")
}

/// The layers' disk with their LSMT reads recorded, under a scratch writable layer that may
/// take `scratch_limit` bytes of disk.
fn open_recorded(
    blobs: &[LayerFile],
    work: &Path,
    recorder: &Arc<TraceRecorder>,
    scratch_limit: Option<u64>,
) -> Result<ImageStack> {
    let mut lowers = Vec::with_capacity(blobs.len());
    for (i, b) in blobs.iter().enumerate() {
        let src = Arc::new(FileSource::open(&b.path)?);
        let layer = open_layer_wrapped(src, |s| recorder.wrap(i as u32, s))
            .with_context(|| format!("layer {} ({})", i, b.descriptor.digest()))?;
        lowers.push(layer.lsmt);
    }
    let mut upper = RwLayer::create(
        &work.join("scratch.data"),
        &work.join("scratch.index"),
        0,
        RwMode::Sparse,
        None,
    )?;
    if let Some(bytes) = scratch_limit {
        upper.limit_data(bytes);
    }
    Ok(ImageStack::writable(Some(LayerStack::new(lowers)?), upper)?)
}

/// Serves `image` as a block device, mounts it and runs `cmd` in it; how `cmd` ended.
fn run_on_device(
    image: ImageStack,
    work: &Path,
    config: &serde_json::Value,
    cmd: &[String],
    opts: &RecordOptions,
    recorder: &TraceRecorder,
) -> Result<String> {
    let kind = opts.frontend.resolve();
    let frontend = DeviceFrontend::open(kind, &work.join("fuse"))
        .with_context(|| format!("starting the {kind} device frontend"))?;
    let mut dev = frontend
        .attach(
            Arc::new(image),
            WorkerPool::new("ovbd-io", 2, 256),
            AttachOptions::default(),
        )
        .context("attaching the image")?;
    // As the snapshotter's devices read ahead: the trace is what a container's start reads.
    if let Err(e) = crate::device::set_read_ahead(&dev.block_path(), opts.read_ahead_kb) {
        log::warn!("{}: setting read-ahead: {e}", dev.block_path());
    }
    let rootfs = work.join("rootfs");
    let r = std::fs::create_dir(&rootfs)
        .with_context(|| format!("creating {}", rootfs.display()))
        .and_then(|_| {
            // From the mount on: a cold start reads the filesystem's metadata too.
            recorder.start();
            mount_disk(&dev.block_path(), &rootfs)
        })
        .and_then(|_| {
            let r = run_chrooted(&rootfs, config, cmd, opts);
            if let Err(e) = crate::mount::unmount(&rootfs, false) {
                log::warn!("{e:#}; detaching it lazily");
                let _ = crate::mount::unmount(&rootfs, true);
            }
            r
        });
    if let Err(e) = dev
        .stop()
        .map_err(anyhow::Error::from)
        .and_then(|_| Ok(dev.join()?))
    {
        log::warn!("detaching {}: {e:#}", dev.block_path());
    }
    drop(frontend);
    r
}

/// Mounts the image's filesystem: ext4 (written to the scratch layer) or EROFS.
fn mount_disk(dev: &str, at: &Path) -> Result<()> {
    let ext4 = crate::mount::mount(dev, at, "ext4", 0, "");
    match ext4 {
        Ok(()) => Ok(()),
        Err(e) => crate::mount::mount(dev, at, "erofs", libc::MS_RDONLY, "")
            .map_err(|_| e)
            .context("the image holds neither ext4 nor EROFS"),
    }
}

/// Runs `cmd` chrooted into `rootfs` (see the module comment) in a cgroup of its own with
/// `opts.limits`; kills its process group after `opts.time`.
fn run_chrooted(
    rootfs: &Path,
    config: &serde_json::Value,
    cmd: &[String],
    opts: &RecordOptions,
) -> Result<String> {
    let (time, stop) = (opts.time, &*opts.stop);
    let env: Vec<(String, String)> = config
        .pointer("/config/Env")
        .and_then(|e| e.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str()?.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let workdir = config
        .pointer("/config/WorkingDir")
        .and_then(|w| w.as_str())
        .filter(|w| w.starts_with('/'))
        .unwrap_or("/");
    let c = |p: &Path| CString::new(p.as_os_str().as_encoded_bytes()).context("a path with NUL");
    let root = c(rootfs)?;
    let workdir = CString::new(workdir).context("WorkingDir with NUL")?;
    let mut command = std::process::Command::new(&cmd[0]);
    command
        .args(&cmd[1..])
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(env)
        .stdin(std::process::Stdio::null());
    // CMD's output goes to stderr: stdout is for the summary.
    if let Ok(fd) = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
        command.stdout(fd);
    }
    let filter = seccomp_filter();
    if filter.is_none() {
        log::warn!("no seccomp filter for this architecture: CMD may make user namespaces");
    }
    // Made before CMD starts, removed (whatever CMD left in it killed) when this returns.
    let cgroup = match opts.limits {
        Some(limits) => Some(
            CmdCgroup::create(&format!("ovbd-record-{}", std::process::id()), limits)
                .context("limiting CMD's memory and processes (--no-limits runs it without)")?,
        ),
        None => {
            log::warn!("--no-limits: CMD runs without memory, process or disk limits");
            None
        }
    };
    let procs = match &cgroup {
        Some(c) => c.procs_files()?,
        None => Vec::new(),
    };
    // SAFETY: between fork and exec only async-signal-safe calls on prepared C strings and the
    // filter built above.
    unsafe { command.pre_exec(move || enter_rootfs(&procs, &root, &workdir, filter.as_deref())) };
    let mut child = command
        .spawn()
        .with_context(|| format!("running {} in the image", cmd[0]))?;
    let pgid = child.id() as i32;
    let deadline = Instant::now() + time;
    let ended = loop {
        if let Some(status) = child.try_wait()? {
            break match (status.code(), status.signal()) {
                (Some(code), _) => format!("exit {code}"),
                (_, Some(sig)) => format!("signal {sig}"),
                _ => format!("{status}"),
            };
        }
        if stop.load(Ordering::SeqCst) {
            // SAFETY: kill(2) of the process group CMD leads.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            child.wait()?;
            break "killed: interrupted".to_owned();
        }
        if Instant::now() >= deadline {
            // SAFETY: kill(2) of the process group CMD leads.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            child.wait()?;
            break format!("killed after {} s", time.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Whatever CMD left running in its group must not hold the filesystem.
    // SAFETY: as above.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let Some(cgroup) = cgroup else {
        return Ok(ended);
    };
    let refused = cgroup.forks_refused();
    if refused > 0 {
        log::warn!(
            "CMD was refused {refused} fork(s) at its process limit ({})",
            cgroup.limits.pids
        );
    }
    let oom = cgroup.oom_kills();
    if oom == 0 {
        return Ok(ended);
    }
    let limit = cgroup.limits.memory_mib;
    if ended == format!("signal {}", libc::SIGKILL) {
        return Ok(format!("killed: out of memory (limit {limit} MiB)"));
    }
    log::warn!("{oom} of CMD's processes killed: out of memory (limit {limit} MiB)");
    Ok(ended)
}

/// Capabilities CMD keeps (Docker's default set less MKNOD, SETFCAP and NET_RAW: no device
/// cgroup guards the host's devices here): CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID,
/// SETUID, SETPCAP, NET_BIND_SERVICE, SYS_CHROOT, AUDIT_WRITE.
const KEPT_CAPS: [libc::c_int; 11] = [0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 29];

/// In the child, before exec: the cgroups whose `cgroup.procs` are `procs` ([`cgroup::join`]),
/// its own session (killed as a group), mount, PID, network (loopback only), UTS, IPC and
/// cgroup (its own cgroup as its root) namespaces; `root` made its root with pivot_root (the
/// host's tree is then out of reach, which chroot would not ensure), a fresh /proc confined as a
/// container's ([`confine_proc`]), a /dev of its own with only the harmless nodes, and a
/// bounding set that leaves root-run CMD [`KEPT_CAPS`] only; `filter` ([`seccomp_filter`])
/// installed last.
/// CMD is its PID namespace's pid 1 ([`wait_as_pid1`]): root with CAP_KILL, it could otherwise
/// signal any process of the host, and what it leaves running ends with it.
/// Async-signal-safe calls only.
fn enter_rootfs(
    procs: &[CString],
    root: &std::ffi::CStr,
    workdir: &std::ffi::CStr,
    filter: Option<&[libc::sock_filter]>,
) -> std::io::Result<()> {
    let err = std::io::Error::last_os_error;
    let none = std::ptr::null::<libc::c_char>();
    // SAFETY: plain syscalls on NUL-terminated strings that outlive them.
    unsafe {
        // First: CMD and the process waiting for it are counted from their start.
        cgroup::join(procs)?;
        if libc::setsid() < 0
            || libc::unshare(
                libc::CLONE_NEWNS
                    | libc::CLONE_NEWPID
                    | libc::CLONE_NEWNET
                    | libc::CLONE_NEWUTS
                    | libc::CLONE_NEWIPC
                    | libc::CLONE_NEWCGROUP,
            ) != 0
        {
            return Err(err());
        }
        // Reaped by the wait below, not by an inherited SIG_IGN.
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        // A raw fork (glibc's runs atfork handlers, not async-signal-safe after a fork).
        let pid = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0);
        if pid < 0 {
            return Err(err());
        }
        if pid > 0 {
            wait_as_pid1(pid as libc::pid_t);
        }
        // Killed with the process that waits for it, even if CMD leaves its process group:
        // pid 1's end ends its whole namespace.
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
            || libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                none.cast(),
            ) != 0
            || libc::chdir(root.as_ptr()) != 0
            || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0
            || libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0
            || libc::chdir(c"/".as_ptr()) != 0
        {
            return Err(err());
        }
        // Best effort: an image without /proc or /dev runs without them.
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            flags,
            none.cast(),
        );
        if libc::mount(
            c"tmpfs".as_ptr(),
            c"/dev".as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            c"mode=755,size=64k".as_ptr().cast(),
        ) == 0
        {
            for (name, minor) in [
                (c"/dev/null", 3),
                (c"/dev/zero", 5),
                (c"/dev/full", 7),
                (c"/dev/random", 8),
                (c"/dev/urandom", 9),
            ] {
                libc::mknod(
                    name.as_ptr(),
                    libc::S_IFCHR | 0o666,
                    libc::makedev(1, minor),
                );
            }
            libc::symlink(c"/proc/self/fd".as_ptr(), c"/dev/fd".as_ptr());
            libc::mkdir(c"/dev/shm".as_ptr(), 0o1777);
        }
        confine_proc()?;
        // Up to the first number the kernel does not know.
        for cap in 0..64 {
            if KEPT_CAPS.contains(&cap) {
                continue;
            }
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0 {
                if *libc::__errno_location() == libc::EINVAL {
                    break;
                }
                return Err(err());
            }
        }
        if libc::chdir(workdir.as_ptr()) != 0 && libc::chdir(c"/".as_ptr()) != 0 {
            return Err(err());
        }
        // Last: it applies to CMD from its exec on. Root here (CAP_SYS_ADMIN), so no
        // no_new_privs is needed, and the image's setuid programs work as in a container.
        if let Some(f) = filter {
            let prog = libc::sock_fprog {
                len: f.len() as libc::c_ushort,
                filter: f.as_ptr().cast_mut(),
            };
            if libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &prog as *const libc::sock_fprog,
            ) != 0
            {
                return Err(err());
            }
        }
    }
    Ok(())
}

/// System calls CMD is refused (EPERM), as Docker's default seccomp profile refuses them to a
/// container without CAP_SYS_ADMIN: root's keyrings are the host root's; bpf, perf events,
/// userfaultfd and io_uring are kernel attack surface a container does without; kexec and
/// file handles need capabilities CMD lacks anyway. clone3 answers ENOSYS (its flags are out
/// of a filter's reach; libc then uses clone), and unshare and clone are refused a new user
/// namespace, in which CMD would hold every capability again.
const DENIED_SYSCALLS: [libc::c_long; 13] = [
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
];

/// The seccomp program for CMD ([`DENIED_SYSCALLS`]); None on an architecture it does not
/// know (other system call numbers), where CMD runs without one.
fn seccomp_filter() -> Option<Vec<libc::sock_filter>> {
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xC000_003E;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xC000_00B7;
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    return None;
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        use libc::{BPF_ABS, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_RET, BPF_W};
        let op = |code: u32, k: u32| libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        };
        let jump = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
            code: (BPF_JMP | code | BPF_K) as u16,
            jt,
            jf,
            k,
        };
        let ret = |k: u32| op(BPF_RET | BPF_K, k);
        let errno = |e: i32| ret(libc::SECCOMP_RET_ERRNO | e as u32);
        // struct seccomp_data: nr at 0, arch at 4, args[0] (low half, little-endian) at 16.
        // A call of another ABI (i386's int 0x80) kills CMD: the list is in this one's numbers.
        let mut f = vec![
            op(BPF_LD | BPF_W | BPF_ABS, 4),
            jump(BPF_JEQ, AUDIT_ARCH, 1, 0),
            ret(libc::SECCOMP_RET_KILL_PROCESS),
            op(BPF_LD | BPF_W | BPF_ABS, 0),
        ];
        // x32 calls share x86_64's arch value, with this bit set in their numbers.
        #[cfg(target_arch = "x86_64")]
        f.extend([jump(libc::BPF_JGE, 0x4000_0000, 0, 1), errno(libc::EPERM)]);
        for nr in DENIED_SYSCALLS {
            f.extend([jump(BPF_JEQ, nr as u32, 0, 1), errno(libc::EPERM)]);
        }
        f.extend([
            jump(BPF_JEQ, libc::SYS_clone3 as u32, 0, 1),
            errno(libc::ENOSYS),
            jump(BPF_JEQ, libc::SYS_unshare as u32, 1, 0),
            jump(BPF_JEQ, libc::SYS_clone as u32, 0, 3),
            op(BPF_LD | BPF_W | BPF_ABS, 16),
            jump(BPF_JSET, libc::CLONE_NEWUSER as u32, 0, 1),
            errno(libc::EPERM),
            ret(libc::SECCOMP_RET_ALLOW),
        ]);
        Some(f)
    }
}

/// What runc makes read-only in a container's /proc: root of the host's user namespace could
/// otherwise write sysctls (kernel.core_pattern names a program the kernel runs as host root)
/// or trigger SysRq.
const PROC_READ_ONLY: [&std::ffi::CStr; 5] = [
    c"/proc/bus",
    c"/proc/fs",
    c"/proc/irq",
    c"/proc/sys",
    c"/proc/sysrq-trigger",
];

/// What runc masks in a container's /proc (the host's timers, keys, memory, hardware).
const PROC_MASKED: [&std::ffi::CStr; 8] = [
    c"/proc/acpi",
    c"/proc/kcore",
    c"/proc/keys",
    c"/proc/latency_stats",
    c"/proc/timer_list",
    c"/proc/timer_stats",
    c"/proc/sched_debug",
    c"/proc/scsi",
];

/// Makes CMD's /proc a container's: [`PROC_READ_ONLY`] bound read-only onto themselves,
/// [`PROC_MASKED`] covered (files by /dev/null, directories by an empty read-only tmpfs).
/// A path the kernel does not have is skipped; one that cannot be confined fails the run.
/// Async-signal-safe calls only.
unsafe fn confine_proc() -> std::io::Result<()> {
    let err = std::io::Error::last_os_error;
    let none = std::ptr::null::<libc::c_char>();
    let exists = |p: &std::ffi::CStr| {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::lstat(p.as_ptr(), &mut st) == 0).then_some(st.st_mode & libc::S_IFMT)
    };
    let locked = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for p in PROC_READ_ONLY {
        if exists(p).is_none() {
            continue;
        }
        if libc::mount(
            p.as_ptr(),
            p.as_ptr(),
            none,
            libc::MS_BIND | libc::MS_REC,
            none.cast(),
        ) != 0
            || libc::mount(
                p.as_ptr(),
                p.as_ptr(),
                none,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | locked,
                none.cast(),
            ) != 0
        {
            return Err(err());
        }
    }
    for p in PROC_MASKED {
        let r = match exists(p) {
            None => continue,
            Some(libc::S_IFDIR) => libc::mount(
                c"tmpfs".as_ptr(),
                p.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_RDONLY | locked,
                none.cast(),
            ),
            Some(_) => libc::mount(
                c"/dev/null".as_ptr(),
                p.as_ptr(),
                none,
                libc::MS_BIND,
                none.cast(),
            ),
        };
        if r != 0 {
            return Err(err());
        }
    }
    Ok(())
}

/// The process `Command` spawned, once it forked CMD into the new PID namespace: it stays
/// outside, so CMD is that namespace's pid 1, and ends as CMD ends (exit code or signal), so
/// the caller's wait and kill of the process group work as on CMD itself. Its copy of the
/// spawn's error pipe is closed, so spawn returns when CMD execs. Never returns.
unsafe fn wait_as_pid1(pid: libc::pid_t) -> ! {
    if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
        // Linux < 5.9: one by one, up to the descriptor limit.
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let max = match libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) {
            0 => lim.rlim_cur.min(1 << 20) as libc::c_int,
            _ => 1 << 16,
        };
        for fd in 3..max {
            libc::close(fd);
        }
    }
    let mut status = 0;
    loop {
        let r = libc::waitpid(pid, &mut status, 0);
        if r == pid {
            break;
        }
        if r < 0 && *libc::__errno_location() != libc::EINTR {
            libc::_exit(127);
        }
    }
    if libc::WIFEXITED(status) {
        libc::_exit(libc::WEXITSTATUS(status));
    }
    // Dies of CMD's signal, without a core dump of its own.
    let sig = libc::WTERMSIG(status);
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    libc::setrlimit(libc::RLIMIT_CORE, &no_core);
    libc::signal(sig, libc::SIG_DFL);
    libc::kill(libc::getpid(), sig);
    libc::_exit(128 + sig)
}
