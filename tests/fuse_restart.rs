//! `ovbd serve` on the FUSE frontend killed with SIGKILL and started again while a reader is
//! busy on the containers' rootfs: the devices (loop over the kept FUSE connection) keep
//! working, nothing the reader reads fails or changes, and data written before the kill is
//! there after it. The connection is kept by the holder the daemon spawns, or by one started
//! on its own before any daemon (as deploy/k8s runs it, in a pod of its own).

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use containerd_client::types::Mount;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HELLO_BLOB: &str = "022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d";
const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
const LABEL_WRITABLE: &str = "containerd.io/snapshot/overlaybd.writable";

/// The hello-world fixture's OverlayBD layer (a ZFile holding an ext4 with `/hello`).
fn hello_zfile() -> Vec<u8> {
    let bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hello-world-oci/blobs/sha256")
            .join(HELLO_BLOB),
    )
    .unwrap();
    bytes[1536..1536 + 639_491].to_vec()
}

/// Everything under one directory: the daemon's root, config, logs, and where the test
/// mounts the containers' rootfs.
struct Setup {
    dir: PathBuf,
    root: PathBuf,
    socket: PathBuf,
    config: PathBuf,
    daemon: Option<Child>,
    /// A holder started on its own, before the daemon.
    holder: Option<Child>,
    rootfs: Vec<PathBuf>,
    rt: tokio::runtime::Runtime,
}

impl Setup {
    fn new(dir: &Path) -> Setup {
        let root = dir.join("root");
        let socket = dir.join("ovbd.sock");
        let config = dir.join("ovbd.toml");
        std::fs::write(
            &config,
            format!(
                "root = {root:?}\nsocket = {socket:?}\nlog_level = \"info\"\n\n[device]\nfrontend = \"fuse\"\n"
            ),
        )
        .unwrap();
        Setup {
            dir: dir.to_path_buf(),
            root,
            socket,
            config,
            daemon: None,
            holder: None,
            rootfs: Vec::new(),
            rt: tokio::runtime::Runtime::new().unwrap(),
        }
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for n in 0..4 {
            if let Ok(t) = std::fs::read_to_string(self.dir.join(format!("serve-{n}.log"))) {
                all += &format!("--- run {n}\n{t}");
            }
        }
        all
    }

    /// Starts `ovbd serve` (run `n`, its log apart) and waits for its socket.
    fn start(&mut self, n: usize) {
        let log = std::fs::File::create(self.dir.join(format!("serve-{n}.log"))).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ovbd"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("ovbd serve exited ({status}); logs:\n{}", self.logs());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no socket after 60 s; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.daemon = Some(child);
    }

    fn client(&self) -> SnapshotsClient<containerd_client::tonic::transport::Channel> {
        self.rt.block_on(async {
            SnapshotsClient::new(containerd_client::connect(&self.socket).await.unwrap())
        })
    }

    fn prepare(&self, key: &str, parent: &str, labels: &[(&str, &str)]) -> Vec<Mount> {
        let req = PrepareSnapshotRequest {
            snapshotter: "ovbd".into(),
            key: key.into(),
            parent: parent.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
        };
        let mut c = self.client();
        self.rt
            .block_on(c.prepare(req))
            .unwrap_or_else(|e| panic!("prepare {key}: {e}; logs:\n{}", self.logs()))
            .into_inner()
            .mounts
    }

    fn commit(&self, name: &str, key: &str) {
        let req = CommitSnapshotRequest {
            snapshotter: "ovbd".into(),
            name: name.into(),
            key: key.into(),
            labels: HashMap::new(),
        };
        let mut c = self.client();
        self.rt
            .block_on(c.commit(req))
            .unwrap_or_else(|e| panic!("commit {key}: {e}; logs:\n{}", self.logs()));
    }

    fn remove(&self, key: &str) {
        let req = RemoveSnapshotRequest {
            snapshotter: "ovbd".into(),
            key: key.into(),
        };
        let mut c = self.client();
        self.rt
            .block_on(c.remove(req))
            .unwrap_or_else(|e| panic!("remove {key}: {e}; logs:\n{}", self.logs()));
    }

    /// Mounts a container's rootfs from `mounts` as containerd would, at `dir/<name>`.
    fn mount_rootfs(&mut self, name: &str, mounts: &[Mount]) -> PathBuf {
        assert_eq!(mounts.len(), 1, "{mounts:?}");
        let m = &mounts[0];
        let target = self.dir.join(name);
        std::fs::create_dir_all(&target).unwrap();
        let options: Vec<&str> = m.options.iter().map(String::as_str).collect();
        let mut cmd = Command::new("mount");
        if m.r#type == "bind" {
            cmd.arg("--rbind").arg(&m.source).arg(&target);
        } else {
            cmd.arg("-t")
                .arg(&m.r#type)
                .arg(&m.source)
                .arg(&target)
                .arg("-o")
                .arg(options.join(","));
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "mount {m:?}: {out:?}");
        self.rootfs.push(target.clone());
        target
    }

    /// The holder process's socket answers (it keeps the FUSE connection).
    fn holder_runs(&self) -> bool {
        UnixStream::connect(self.root.join("fuse.holder")).is_ok()
    }

    /// Starts `ovbd fuse-holder` on its own on the daemon's holder socket; returns once it
    /// listens.
    fn start_holder(&mut self) {
        std::fs::create_dir_all(&self.root).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ovbd"))
            .arg("fuse-holder")
            .arg("--socket")
            .arg(self.root.join("fuse.holder"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut ready = [0u8; 6];
        child.stdout.take().unwrap().read_exact(&mut ready).unwrap();
        assert_eq!(&ready, b"ready\n");
        self.holder = Some(child);
    }

    /// Whether the holder keeps a connection now (asks it as a daemon would).
    fn holder_keeps_one(&self) -> bool {
        let mut c = UnixStream::connect(self.root.join("fuse.holder")).unwrap();
        c.write_all(b"g").unwrap();
        let mut answer = [0u8; 1];
        c.read_exact(&mut answer).unwrap();
        answer[0] == b'f'
    }
}

impl Drop for Setup {
    /// Whatever a failed test left: rootfs mounts, the daemon, its devices and the holder.
    fn drop(&mut self) {
        for t in self.rootfs.drain(..) {
            let _ = Command::new("umount").arg("-l").arg(&t).status();
        }
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        let fuse = self.root.join("fuse");
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for line in mounts.lines() {
            let mp = line.split(' ').nth(1).unwrap_or_default();
            if mp.starts_with(self.root.to_str().unwrap()) && Path::new(mp) != fuse {
                let _ = Command::new("umount").arg("-l").arg(mp).status();
            }
        }
        // Loop devices over the FUSE files, then the mount and the holder.
        if let Ok(out) = Command::new("losetup").arg("-a").output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if line.contains(fuse.to_str().unwrap()) {
                    if let Some(dev) = line.split(':').next() {
                        let _ = Command::new("losetup").arg("-d").arg(dev).status();
                    }
                }
            }
        }
        if let Ok(mut c) = UnixStream::connect(self.root.join("fuse.holder")) {
            let _ = c.write_all(b"q");
            let _ = c.read(&mut [0u8; 1]);
        }
        if let Some(mut h) = self.holder.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&fuse)
            .stderr(Stdio::null())
            .status();
    }
}

/// Reads files of the rootfs over and over, bypassing the page cache (each read reaches the
/// device), and records any failure or content that differs from the expected digest.
struct Reader {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A page-aligned buffer for O_DIRECT reads.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Aligned { ptr, layout }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: our allocation of `layout.size()` bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// The digest of `path`'s content, read with O_DIRECT.
fn direct_digest(path: &Path, buf: &mut Aligned) -> std::io::Result<String> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let mut h = Sha256::new();
    loop {
        let n = f.read(buf.as_mut())?;
        if n == 0 {
            break;
        }
        h.update(&buf.as_mut()[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Reader {
    fn start(files: Vec<(PathBuf, String)>) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, rounds, failures) = (stop.clone(), rounds.clone(), failures.clone());
            std::thread::spawn(move || {
                let mut buf = Aligned::new(1 << 20);
                while !stop.load(Ordering::SeqCst) {
                    for (path, want) in &files {
                        match direct_digest(path, &mut buf) {
                            Ok(got) if &got == want => {}
                            Ok(got) => failures
                                .lock()
                                .unwrap()
                                .push(format!("{}: digest {got}, expected {want}", path.display())),
                            Err(e) => failures
                                .lock()
                                .unwrap()
                                .push(format!("{}: {e}", path.display())),
                        }
                    }
                    rounds.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        Reader {
            stop,
            rounds,
            failures,
            thread: Some(thread),
        }
    }

    /// Waits (up to two minutes) until the reader has done `n` more rounds.
    fn wait_rounds(&self, n: u64, setup: &Setup) {
        let start = self.rounds.load(Ordering::SeqCst);
        let t0 = Instant::now();
        while self.rounds.load(Ordering::SeqCst) < start + n {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "the reader is stuck (after {} rounds); failures {:?}; logs:\n{}",
                self.rounds.load(Ordering::SeqCst),
                self.failures.lock().unwrap(),
                setup.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.failures.lock().unwrap())
    }
}

/// Unmounts `target`, waiting up to 10 s while it is busy: the other test of this binary, run
/// alongside, forks children that hold our open files between fork and exec. Names who holds
/// it if it stays busy.
fn umount_when_free(target: &Path) {
    let t0 = Instant::now();
    loop {
        let out = Command::new("umount").arg(target).output().unwrap();
        if out.status.success() {
            return;
        }
        let busy = String::from_utf8_lossy(&out.stderr).contains("busy");
        if !busy || t0.elapsed() > Duration::from_secs(10) {
            let holders = Command::new("fuser")
                .arg("-vm")
                .arg(target)
                .output()
                .map(|o| {
                    let text = String::from_utf8_lossy(&o.stderr).into_owned();
                    let lines = text.lines().filter(|l| !l.starts_with("Cannot stat"));
                    lines.collect::<Vec<_>>().join("\n")
                })
                .unwrap_or_default();
            panic!("umount {}: {out:?}; holders: {holders}", target.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Deterministic content that is not all zeros.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn digest(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

#[test]
fn fuse_devices_survive_a_killed_daemon_under_a_reader() {
    killed_daemon_under_a_reader(false);
}

/// As above with the holder started first, on its own (deploy/k8s: its own DaemonSet, so it
/// outlives the daemon's pod): the daemon gives it the connection instead of spawning one,
/// takes it back after the restart, and the holder stays (holding nothing) after the last
/// device.
#[test]
fn fuse_devices_survive_a_killed_daemon_with_a_standalone_holder() {
    killed_daemon_under_a_reader(true);
}

fn killed_daemon_under_a_reader(standalone_holder: bool) {
    if !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        eprintln!("skipped: no /dev/fuse or /dev/loop-control");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut setup = Setup::new(tmp.path());
    if standalone_holder {
        setup.start_holder();
        assert!(
            !setup.holder_keeps_one(),
            "a fresh holder keeps a connection"
        );
    }
    setup.start(0);

    // An OverlayBD image layer, committed as containerd's unpacker does.
    let m = setup.prepare("layer-extract", "", &[(LABEL_SNAPSHOT_REF, "layer")]);
    std::fs::write(
        Path::new(&m[0].source).join("overlaybd.commit"),
        hello_zfile(),
    )
    .unwrap();
    setup.commit("layer", "layer-extract");

    // Two containers on it: one on the image's shared read-only device (overlayfs), one on
    // its own writable device (dir mode), with data written to it.
    let m = setup.prepare("ro", "layer", &[(LABEL_WRITABLE, "overlayfs")]);
    let ro = setup.mount_rootfs("ro", &m);
    let m = setup.prepare("rw", "layer", &[(LABEL_WRITABLE, "dir")]);
    let rw = setup.mount_rootfs("rw", &m);
    let hello = std::fs::read(ro.join("hello")).unwrap();
    assert_eq!(std::fs::read(rw.join("hello")).unwrap(), hello);
    let data = pattern(4 << 20, 7);
    {
        let mut f = std::fs::File::create(rw.join("data.bin")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }

    let reader = Reader::start(vec![
        (ro.join("hello"), digest(&hello)),
        (rw.join("hello"), digest(&hello)),
        (rw.join("data.bin"), digest(&data)),
    ]);
    reader.wait_rounds(5, &setup);

    // kill -9 while the reader's requests are in flight.
    let mut daemon = setup.daemon.take().unwrap();
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    assert!(setup.holder_runs(), "no holder keeps the FUSE connection");
    if standalone_holder {
        let logs = setup.logs();
        assert!(
            logs.contains("gave the connection to the fuse holder"),
            "the daemon did not give its connection to the holder already running; logs:\n{logs}"
        );
        assert!(setup.holder_keeps_one());
    }

    setup.start(1);
    let logs = setup.logs();
    assert!(
        logs.contains("serving") && logs.contains("again"),
        "the restarted daemon did not take the kept connection; logs:\n{logs}"
    );
    reader.wait_rounds(5, &setup);
    let rounds = reader.rounds.load(Ordering::SeqCst);
    let failures = reader.finish();
    eprintln!("{rounds} reader rounds; logs:\n{}", setup.logs());
    assert!(
        failures.is_empty(),
        "reads failed across the restart: {failures:?}; logs:\n{}",
        setup.logs()
    );

    // The writable device takes writes after the restart too, and keeps what came before.
    let more = pattern(1 << 20, 9);
    {
        let mut f = std::fs::File::create(rw.join("after.bin")).unwrap();
        f.write_all(&more).unwrap();
        f.sync_all().unwrap();
    }
    let mut buf = Aligned::new(1 << 20);
    assert_eq!(
        direct_digest(&rw.join("after.bin"), &mut buf).unwrap(),
        digest(&more)
    );
    assert_eq!(
        direct_digest(&rw.join("data.bin"), &mut buf).unwrap(),
        digest(&data)
    );

    // Clean up through the daemon: containers gone, then the image, then a plain stop; the
    // mount and the holder go with the last device.
    for t in setup.rootfs.drain(..) {
        umount_when_free(&t);
    }
    setup.remove("rw");
    setup.remove("ro");
    setup.remove("layer");
    let mut daemon = setup.daemon.take().unwrap();
    // SAFETY: signals our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let status = daemon.wait().unwrap();
    assert!(status.success(), "{status}; logs:\n{}", setup.logs());
    let fuse = setup.root.join("fuse");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(fuse.to_str().unwrap()),
        "{} still mounted; logs:\n{}",
        fuse.display(),
        setup.logs()
    );
    if standalone_holder {
        // It stays for the next daemon, holding nothing (no aborted connection kept).
        let holder = setup.holder.as_mut().unwrap();
        assert!(
            holder.try_wait().unwrap().is_none(),
            "the standalone holder exited"
        );
        assert!(
            !setup.holder_keeps_one(),
            "the holder kept a connection no device uses"
        );
        return;
    }
    assert!(
        !setup.holder_runs(),
        "the holder outlived its connection; logs:\n{}",
        setup.logs()
    );
}
