//! `ovbd serve` as a process: what containerd sees on its socket.

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::ListSnapshotsRequest;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An `ovbd serve` child, killed when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    root: PathBuf,
}

impl Daemon {
    /// Starts `ovbd serve` under `dir` with at most `max_fds` open descriptors.
    fn start(dir: &Path, max_fds: u64) -> Daemon {
        let mut d = Daemon::spawn(dir, max_fds);
        d.wait_for("the socket", |d| UnixStream::connect(&d.socket).is_ok());
        d
    }

    fn spawn(dir: &Path, max_fds: u64) -> Daemon {
        Daemon::spawn_on(dir, &dir.join("ovbd.sock"), max_fds)
    }

    /// Starts `ovbd serve` with its root, config and log under `dir`, serving on `socket`.
    fn spawn_on(dir: &Path, socket: &Path, max_fds: u64) -> Daemon {
        Daemon::spawn_rooted(dir, &dir.join("root"), socket, max_fds)
    }

    /// Starts `ovbd serve` with its config and log under `dir`, its root at `root`.
    fn spawn_rooted(dir: &Path, root: &Path, socket: &Path, max_fds: u64) -> Daemon {
        std::fs::create_dir_all(dir).unwrap();
        let socket = socket.to_path_buf();
        let log = dir.join("serve.log");
        let config = dir.join("ovbd.toml");
        std::fs::write(
            &config,
            format!(
                "root = {:?}\nsocket = {:?}\nlog_level = \"info\"\n",
                root, socket
            ),
        )
        .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ovbd"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("serve.err")).unwrap());
        let limit = libc::rlimit {
            rlim_cur: max_fds,
            rlim_max: max_fds,
        };
        // SAFETY: setrlimit is async-signal-safe and touches nothing of the parent's.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Daemon {
            child: cmd.spawn().unwrap(),
            socket,
            log,
            root: root.to_path_buf(),
        }
    }

    fn logs(&self) -> String {
        let err = std::fs::read_to_string(self.log.with_file_name("serve.err")).unwrap_or_default();
        format!(
            "{}{err}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    /// Waits (up to a minute) until `cond` holds; fails if the daemon exits meanwhile.
    fn wait_for(&mut self, what: &str, cond: impl Fn(&Daemon) -> bool) {
        self.poll_until(what, Duration::from_millis(20), cond)
    }

    /// [`Daemon::wait_for`], looking every `every` (zero: a busy wait, for windows of a
    /// millisecond).
    fn poll_until(&mut self, what: &str, every: Duration, cond: impl Fn(&Daemon) -> bool) {
        let t0 = Instant::now();
        while !cond(self) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "ovbd serve exited ({status}) waiting for {what}; its log:\n{}",
                    self.logs()
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no {what} after 60 s; log:\n{}",
                self.logs()
            );
            if !every.is_zero() {
                std::thread::sleep(every);
            }
        }
    }

    /// Asserts that List over the socket answers (no snapshots); `when` names the moment.
    fn assert_serves(&self, when: &str) {
        assert_eq!(
            self.list_snapshots(),
            Ok(0),
            "{when}; log:\n{}",
            self.logs()
        );
    }

    /// The snapshotter's List over its socket, the way containerd calls it.
    fn list_snapshots(&self) -> Result<usize, String> {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let channel = containerd_client::connect(&self.socket)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let mut stream = SnapshotsClient::new(channel)
                .list(ListSnapshotsRequest {
                    snapshotter: "ovbd".into(),
                    filters: vec![],
                })
                .await
                .map_err(|e| format!("list: {e}"))?
                .into_inner();
            let mut n = 0;
            while let Some(page) = stream.message().await.map_err(|e| format!("list: {e}"))? {
                n += page.info.len();
            }
            Ok(n)
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A killed daemon leaves its FUSE frontend's mount (kept for the next daemon): unmount
        // it, or the test's directory could not be removed.
        let fuse = self.root.join("fuse");
        if let Ok(c) = std::ffi::CString::new(fuse.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 with a valid C string; failing (not mounted) is fine.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Out of descriptors (say, many containers' clients at once), accepts fail for a while: the
/// daemon must keep its socket and serve again once descriptors free up, not exit.
#[test]
fn serve_survives_running_out_of_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(dir.path(), 64);
    daemon.assert_serves("at start");

    // More connections than the daemon has descriptors: the rest wait in the listen backlog.
    let clients: Vec<UnixStream> = (0..200)
        .map(|i| {
            UnixStream::connect(&daemon.socket)
                .unwrap_or_else(|e| panic!("client {i}: connect: {e}; log:\n{}", daemon.logs()))
        })
        .collect();
    daemon.wait_for("a failed accept in the log", |d| {
        d.logs()
            .contains("accepting a connection on the snapshotter socket")
    });
    drop(clients);

    daemon.wait_for("the accepts to recover", |d| {
        d.logs().contains("accepting connections again")
    });
    daemon.assert_serves("after the descriptors freed up");
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "ovbd serve exited; log:\n{}",
        daemon.logs()
    );
}

/// containerd dials a missing socket every 10 ms until it appears: the socket must appear
/// listening, or containerd meets "connection refused" and backs off for seconds. A stale
/// socket left by a killed daemon is replaced.
#[test]
fn serve_socket_appears_listening_and_replaces_a_stale_one() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ovbd.sock");
    let dialer = {
        let socket = socket.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            loop {
                match UnixStream::connect(&socket) {
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("connect: {e}")),
                }
                if t0.elapsed() > Duration::from_secs(60) {
                    return Err("no socket after 60 s".to_string());
                }
                std::thread::yield_now();
            }
        })
    };
    let mut daemon = Daemon::spawn(dir.path(), 1024);
    let dialed = dialer.join().unwrap();
    assert_eq!(dialed, Ok(()), "log:\n{}", daemon.logs());
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    daemon.assert_serves("at start");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");

    // kill -9: the socket file stays behind, nobody listening on it.
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    assert!(socket.exists());
    drop(daemon);
    let daemon = Daemon::start(dir.path(), 1024);
    daemon.assert_serves("after a restart over the stale socket");
}

/// A daemon that stops after a newer one took the socket over (a restart that overlaps)
/// leaves the newer one's socket alone; the last one removes its own.
#[test]
fn a_stopping_daemon_leaves_a_newer_daemons_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ovbd.sock");
    let mut old = Daemon::spawn_on(&dir.path().join("old"), &socket, 1024);
    old.wait_for("the old daemon serving", |d| {
        d.logs().contains("serving the containerd Snapshots API")
    });
    let mut new = Daemon::spawn_on(&dir.path().join("new"), &socket, 1024);
    new.wait_for("the new daemon serving", |d| {
        d.logs().contains("serving the containerd Snapshots API")
    });
    let stop = |d: &mut Daemon| {
        // SAFETY: a plain kill(2) of our own child.
        assert_eq!(unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) }, 0);
        let status = d.child.wait().unwrap();
        assert!(status.success(), "{status}; log:\n{}", d.logs());
    };
    stop(&mut old);
    assert!(
        socket.exists(),
        "the old daemon removed the new one's socket"
    );
    new.assert_serves("after the old daemon stopped");
    stop(&mut new);
    assert!(!socket.exists(), "the last daemon left its socket behind");
}

/// Whether `path` is a mount point (as /proc/self/mountinfo lists it).
fn is_mount_point(path: &Path) -> bool {
    let path = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*path))
}

/// A SIGTERM that comes while the daemon is still starting (its FUSE frontend mounted, its
/// sockets not served yet) stops it as one that comes later does: exit 0, the mount gone
/// (nothing was attached to keep it for). Its handler must be in place before the frontend
/// mounts: with the default action the daemon dies at once and leaves its mount behind.
#[test]
fn a_sigterm_while_starting_stops_the_daemon_cleanly() {
    // The FUSE frontend is the one `auto` picks where there is no ublk (this host).
    if !Path::new("/dev/fuse").exists()
        || Path::new("/dev/ublk-control").exists()
        || unsafe { libc::geteuid() } != 0
    {
        eprintln!("skipped: needs root, /dev/fuse and no ublk (the FUSE frontend)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::spawn(dir.path(), 1024);
    let fuse = d.root.join("fuse");
    // As soon as the frontend is mounted: the sockets come a millisecond or so later.
    d.poll_until("the FUSE mount", Duration::ZERO, |_| is_mount_point(&fuse));
    // SAFETY: a plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) }, 0);
    let status = d.child.wait().unwrap();
    let mounted = is_mount_point(&fuse);
    assert!(status.success(), "{status}; log:\n{}", d.logs());
    assert!(
        !mounted,
        "{} is left mounted; log:\n{}",
        fuse.display(),
        d.logs()
    );
}

/// An overlayfs mounted at `merged` (lower, upper and work beside it), unmounted when dropped.
struct Overlay {
    merged: PathBuf,
}

impl Overlay {
    fn mount(dir: &Path) -> Overlay {
        for d in ["lower", "upper", "work", "merged"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let merged = dir.join("merged");
        let status = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                dir.join("lower").display(),
                dir.join("upper").display(),
                dir.join("work").display()
            ))
            .arg(&merged)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting an overlayfs (needs root): {status}"
        );
        Overlay { merged }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.merged).status();
    }
}

/// overlayfs cannot put its upper directories on an overlayfs (a container's or a live
/// system's root): `ovbd serve` must refuse such a root at start, in one line naming it,
/// rather than serve and fail every container start with an unexplained EINVAL.
#[test]
fn serve_refuses_a_root_on_overlayfs() {
    let dir = tempfile::tempdir().unwrap();
    let overlay = Overlay::mount(&dir.path().join("ovl"));
    let root = overlay.merged.join("root");
    let socket = dir.path().join("ovbd.sock");
    let mut daemon = Daemon::spawn_rooted(&dir.path().join("d"), &root, &socket, 1024);
    let t0 = Instant::now();
    let status = loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            !daemon
                .logs()
                .contains("serving the containerd Snapshots API"),
            "ovbd serve started on a root on overlayfs; log:\n{}",
            daemon.logs()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "ovbd serve neither exited nor served after 60 s; log:\n{}",
            daemon.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1), "log:\n{}", daemon.logs());
    let err = std::fs::read_to_string(dir.path().join("d/serve.err")).unwrap();
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("ovbd: ")).collect();
    assert_eq!(lines.len(), 1, "one error line; stderr:\n{err}");
    assert!(
        lines[0].contains(&root.display().to_string()) && lines[0].contains("overlayfs"),
        "the line names the root and overlayfs: {}",
        lines[0]
    );
    assert!(!socket.exists(), "a refused daemon published its socket");
    drop(daemon);

    // The same daemon with its root on the tempdir's own filesystem serves.
    let daemon = Daemon::start(&dir.path().join("ok"), 1024);
    daemon.assert_serves("with a root off overlayfs");
}
