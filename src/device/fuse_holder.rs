//! Keeps the FUSE frontend's `/dev/fuse` connection open across a daemon restart (even a
//! kill -9), so the loop devices over it (and the container rootfs mounted on them) survive,
//! as ublk devices do with `UBLK_F_USER_RECOVERY`.
//!
//! Why a holder process: the kernel aborts a FUSE connection when the last descriptor of its
//! `/dev/fuse` file closes, which a dying daemon does. systemd's fd store
//! (`FileDescriptorStoreMax=`) could keep it, but only under systemd: tests, the demo and a
//! plain `ovbd serve` would lose it. So the daemon spawns `ovbd fuse-holder` (a hidden verb of
//! the same binary), in its own session, with the descriptor as its stdin; the holder listens
//! on a unix socket next to the mountpoint and hands the descriptor (SCM_RIGHTS, through
//! `nix`) to the next daemon. It does no I/O on it: it looks every half second whether the
//! connection is gone (unmounted or aborted), and exits then or when a daemon tells it to. One
//! holder per mountpoint: it takes an exclusive lock before binding.
//!
//! A holder can also start on its own (`ovbd fuse-holder --socket S`, no `--from-stdin`), before
//! any daemon, and wait to be given the descriptor: a daemon that finds one listening hands it
//! its connection instead of spawning a child. Outside the daemon's cgroup (Kubernetes: its own
//! DaemonSet) it then survives the daemon's pod; it lets go when told to, but keeps listening.
//! The `ovbd device attach` servers keep one holder per device (see `cli::device`).

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Requests a daemon sends the holder (one byte each; GIVE carries the descriptor).
const GET: u8 = b'g';
const QUIT: u8 = b'q';
const GIVE: u8 = b'k';
/// The holder's answers: GET's (with the descriptor, or none held), GIVE's.
const HERE: u8 = b'f';
const NOTHING: u8 = b'n';
const KEPT: u8 = b'y';
/// How long either side waits for the other's answer on a connection.
const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// How often the holder looks whether its connection is gone. It does not wait for that in
/// poll: /dev/fuse wakes everything polling it whenever it queues a request, so a holder asleep
/// on it would be woken, and cost the node a context switch, on every block I/O.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// The holder's socket for the FUSE mount at `dir` (beside it: `dir` is the mountpoint).
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.with_extension("holder")
}

fn lock_path(socket: &Path) -> PathBuf {
    socket.with_extension("holder.lock")
}

/// Removes the files a holder on `socket` leaves (its lock), once it is gone for good.
pub fn remove_files(socket: &Path) {
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(lock_path(socket));
}

/// Asks the holder on `socket` for the connection it keeps: `None` if no holder answers (none
/// runs: a fresh start, or the connection it held is gone).
pub fn take(socket: &Path) -> io::Result<Option<OwnedFd>> {
    let Some(mut conn) = connect(socket)? else {
        return Ok(None);
    };
    conn.write_all(&[GET])?;
    // A holder that closes without an answer holds nothing for us.
    let fd = match receive(&conn) {
        Ok((_, fd)) => fd,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    if let Some(fd) = &fd {
        check_is_fuse(fd)?;
    }
    Ok(fd)
}

/// Connects to the holder on `socket`: `None` if none listens; an error if another user's
/// process does.
fn connect(socket: &Path) -> io::Result<Option<UnixStream>> {
    let conn = match UnixStream::connect(socket) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    if !peer_is_us(&conn) {
        return Err(io::Error::other(format!(
            "{} is served by another user's process, not our fuse holder",
            socket.display()
        )));
    }
    conn.set_read_timeout(Some(ANSWER_WAIT))?;
    conn.set_write_timeout(Some(ANSWER_WAIT))?;
    Ok(Some(conn))
}

/// Gives `fuse` (a mounted connection) to the holder already listening on `socket` (one started
/// on its own): `false` if none listens.
pub fn give(socket: &Path, fuse: BorrowedFd<'_>) -> io::Result<bool> {
    let Some(mut conn) = connect(socket)? else {
        return Ok(false);
    };
    let fds = [fuse.as_raw_fd()];
    let iov = [io::IoSlice::new(&[GIVE])];
    sendmsg::<()>(
        conn.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(io::Error::from)?;
    let mut answer = [0u8; 1];
    conn.read_exact(&mut answer).map_err(|e| {
        io::Error::other(format!(
            "the fuse holder on {} did not answer: {e}",
            socket.display()
        ))
    })?;
    if answer[0] != KEPT {
        return Err(io::Error::other(format!(
            "the fuse holder on {} refused the connection",
            socket.display()
        )));
    }
    Ok(true)
}

/// Moves the calling thread into the mount namespace of the holder on `socket` (where the FUSE
/// mount of the connection it keeps lives, when a server in a private namespace made it):
/// `false` if no holder listens there.
pub fn enter_mount_namespace(socket: &Path) -> io::Result<bool> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let Some(conn) = connect(socket)? else {
        return Ok(false);
    };
    let pid = getsockopt(&conn, PeerCredentials)
        .map_err(io::Error::from)?
        .pid();
    drop(conn);
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))?;
    // SAFETY: plain syscalls on the calling thread; setns needs its filesystem attributes
    // unshared from other threads first.
    unsafe {
        if libc::unshare(libc::CLONE_FS) != 0 || libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(true)
}

/// Tells the holder on `socket` (if any) to let go of its connection (and exit, unless it
/// started on its own).
pub fn quit(socket: &Path) {
    if let Ok(mut conn) = UnixStream::connect(socket) {
        let _ = conn.set_read_timeout(Some(ANSWER_WAIT));
        let _ = conn.write_all(&[QUIT]);
        // It closes the connection once it has let go.
        let _ = conn.read(&mut [0u8; 1]);
    }
}

/// Starts a holder for `fuse` (a mounted connection) listening on `socket`; returns once it
/// listens.
pub fn spawn(socket: &Path, fuse: BorrowedFd<'_>) -> io::Result<()> {
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .arg("fuse-holder")
        .arg("--socket")
        .arg(socket)
        .arg("--from-stdin")
        .stdin(fuse.try_clone_to_owned()?)
        .stdout(std::process::Stdio::piped())
        // Not the daemon's stderr: a test reading the daemon's output to its end would wait
        // for the holder too.
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let Some(out) = child.stdout.take() else {
        return Err(io::Error::other("fuse holder: no stdout"));
    };
    let mut line = String::new();
    io::BufReader::new(out).read_line(&mut line)?;
    if line.trim() != "ready" {
        let status = child.wait()?;
        return Err(io::Error::other(format!(
            "fuse holder did not start ({status})"
        )));
    }
    // It lives on in its own session; the kernel reaps it when we exit (we never wait).
    std::mem::forget(child);
    Ok(())
}

/// The holder process: keeps a connection (`from_stdin`: the one on its stdin, and exits once
/// it is gone; else one a daemon gives it, waiting for the next one after) and hands it to any
/// daemon that asks on `socket`.
pub fn run(socket: &Path, from_stdin: bool) -> io::Result<()> {
    // SAFETY: setsid has no preconditions; out of the daemon's session and process group, a
    // signal to those (a terminal's Ctrl-C) does not reach us. (It fails harmlessly for a
    // process group leader, such as PID 1 of a container.)
    unsafe { libc::setsid() };
    let fuse = match from_stdin {
        true => {
            // SAFETY: fd 0 is ours (the daemon passed the connection as our stdin); it is moved
            // out of 0 below so nothing else uses it as stdin.
            let stdin = unsafe { OwnedFd::from_raw_fd(0) };
            let fuse = stdin.try_clone()?;
            drop(stdin);
            std::fs::File::open("/dev/null").map(|null| {
                // SAFETY: dup2 onto fd 0, which we closed above.
                unsafe { libc::dup2(null.as_raw_fd(), 0) }
            })?;
            check_is_fuse(&fuse)?;
            Some(fuse)
        }
        false => None,
    };
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path(socket))?;
    // SAFETY: flock on our own descriptor.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::other(format!(
            "another fuse holder serves {}",
            socket.display()
        )));
    }
    let _ = std::fs::remove_file(socket);
    // Owner-only from the start: no window between bind and the chmod below.
    // SAFETY: umask has no preconditions; the holder is single-threaded.
    let old_mask = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(socket);
    // SAFETY: as above.
    unsafe { libc::umask(old_mask) };
    let listener = bound?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    }
    let mut out = io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    drop(out);
    let r = serve(&listener, fuse, from_stdin);
    let _ = std::fs::remove_file(socket);
    r
}

/// Whether the FUSE connection on `fuse` is gone: a poll that does not wait (so does not
/// queue us on the device) reports POLLERR for an aborted connection.
fn is_gone(fuse: BorrowedFd) -> bool {
    let mut fd = [libc::pollfd {
        fd: fuse.as_raw_fd(),
        events: 0,
        revents: 0,
    }];
    // SAFETY: poll on a pollfd we own, timeout 0.
    let n = unsafe { libc::poll(fd.as_mut_ptr(), 1, 0) };
    n > 0 && fd[0].revents != 0
}

/// Answers daemons. `exit_when_empty` (a holder a daemon spawned): until the connection is
/// gone or one says quit; else for ever, holding what it is given meanwhile.
fn serve(
    listener: &UnixListener,
    mut fuse: Option<OwnedFd>,
    exit_when_empty: bool,
) -> io::Result<()> {
    loop {
        if fuse.is_none() && exit_when_empty {
            return Ok(());
        }
        // Whether the connection is gone (unmounted, or aborted through fusectl: poll reports
        // POLLERR) is looked at every CHECK_EVERY, never waited for: see CHECK_EVERY.
        if fuse.as_ref().is_some_and(|f| is_gone(f.as_fd())) {
            fuse = None;
            continue;
        }
        let mut fds = [libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let timeout = if fuse.is_some() {
            CHECK_EVERY.as_millis() as libc::c_int
        } else {
            -1
        };
        // SAFETY: poll on a pollfd we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        let Ok((conn, _)) = listener.accept() else {
            continue;
        };
        // The descriptor reads and answers every container's block I/O: only our own user
        // (root) may take it, give us one, or make us let go, whatever the socket's mode allows.
        if !peer_is_us(&conn) {
            continue;
        }
        let _ = conn.set_read_timeout(Some(ANSWER_WAIT));
        let _ = conn.set_write_timeout(Some(ANSWER_WAIT));
        let Ok((request, given)) = receive(&conn) else {
            continue;
        };
        match request {
            GET => {
                // Ended since the last look (see CHECK_EVERY): nothing to hand on.
                if fuse.as_ref().is_some_and(|f| is_gone(f.as_fd())) {
                    fuse = None;
                }
                let (answer, held) = match &fuse {
                    Some(f) => (HERE, vec![f.as_raw_fd()]),
                    None => (NOTHING, vec![]),
                };
                let iov = [io::IoSlice::new(std::slice::from_ref(&answer))];
                let with_fd = [ControlMessage::ScmRights(&held)];
                let cmsgs: &[ControlMessage] = if held.is_empty() { &[] } else { &with_fd };
                let _ = sendmsg::<()>(conn.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None);
            }
            GIVE => {
                let answer = match given.filter(|f| check_is_fuse(f).is_ok()) {
                    Some(f) => {
                        // The daemon serves this one now: whatever was held before is stale.
                        fuse = Some(f);
                        KEPT
                    }
                    None => NOTHING,
                };
                let _ = (&conn).write_all(&[answer]);
            }
            QUIT => fuse = None,
            _ => {}
        }
    }
}

/// Reads a request byte and the descriptor that may come with it.
fn receive(conn: &UnixStream) -> io::Result<(u8, Option<OwnedFd>)> {
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!(RawFd);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(space.as_mut_slice()),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    if msg.bytes != 1 {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
    }
    let mut given = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: descriptors the kernel just installed for us; nobody else owns them
                // (all but the first are closed at once).
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                given.get_or_insert(fd);
            }
        }
    }
    Ok((byte[0], given))
}

/// Whether the other end of `conn` runs as our effective user.
fn peer_is_us(conn: &UnixStream) -> bool {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    getsockopt(conn, PeerCredentials)
        .is_ok_and(|cred| cred.uid() == nix::unistd::geteuid().as_raw())
}

/// Refuses anything but a `/dev/fuse` descriptor (character device 10:229).
fn check_is_fuse(fd: &OwnedFd) -> io::Result<()> {
    let st = nix::sys::stat::fstat(fd.as_fd()).map_err(io::Error::from)?;
    let is_char = st.st_mode & libc::S_IFMT == libc::S_IFCHR;
    if !is_char || libc::major(st.st_rdev) != 10 || libc::minor(st.st_rdev) != 229 {
        return Err(io::Error::other("fuse holder: not a /dev/fuse descriptor"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    /// Connects to the holder's socket as `uid`, sends `request` (with `give`: and its stdin as
    /// the descriptor), prints how many descriptors came back and the inode of the first.
    const CLIENT: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
try:
    # A refused peer may see the connection closed before its request is written.
    fds = [0] if sys.argv[3] == "give" else []
    s.sendmsg([sys.argv[2].encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(__import__("array").array("i", fds))))] if fds else [])
    _, anc, _, _ = s.recvmsg(1, socket.CMSG_SPACE(4))
except OSError:
    anc = []
got = [int.from_bytes(d[i:i + 4], sys.byteorder) for _, t, d in anc if t == socket.SCM_RIGHTS for i in range(0, len(d), 4)]
print(len(got), os.fstat(got[0]).st_ino if got else "-")
"#;

    /// What the holder answers `request` from `uid` (see CLIENT); `give`: sent with it.
    fn ask_as(uid: u32, socket: &Path, request: u8, give: Option<&OwnedFd>) -> String {
        let mut cmd = Command::new("python3");
        cmd.arg("-c")
            .arg(CLIENT)
            .arg(socket)
            .arg((request as char).to_string())
            .arg(if give.is_some() { "give" } else { "-" })
            .uid(uid)
            .gid(uid);
        if let Some(fd) = give {
            cmd.stdin(fd.try_clone().unwrap());
        }
        let out = cmd.output().expect("python3 runs");
        assert!(
            out.status.success(),
            "client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn ino(fd: &OwnedFd) -> u64 {
        nix::sys::stat::fstat(fd.as_fd()).unwrap().st_ino
    }

    /// A connection that ended since the holder last looked (it looks every CHECK_EVERY) is
    /// not handed to the next daemon: one aborted while still mounted (fusectl), then a daemon
    /// started at once, would otherwise be given a dead connection to serve (a daemon refuses
    /// a kept connection no longer mounted by itself).
    #[test]
    fn a_connection_gone_meanwhile_is_not_handed_on() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("fuse.holder");
        let listener = UnixListener::bind(&socket).unwrap();
        // Stands in for the connection: a pipe's read end reports POLLHUP once the writer
        // closes, as /dev/fuse reports POLLERR once the connection ends. Close-on-exec: a
        // child another test spawns meanwhile must not keep the writer open.
        let (held, writer) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let server = std::thread::spawn(move || serve(&listener, Some(held), true));
        // The holder has looked (alive) and sleeps on its socket; the connection ends now.
        std::thread::sleep(Duration::from_millis(50));
        drop(writer);
        let got = take(&socket);
        assert!(
            matches!(got, Ok(None)),
            "a daemon was handed the ended connection: {got:?}"
        );
        server.join().unwrap().unwrap();
    }

    /// The socket is 0600 once bound, but not before the chmod (nor under a careless umask, nor
    /// if an operator loosens it): the holder itself must refuse other users, who could
    /// otherwise read and answer every container's block I/O through the descriptor, make it
    /// quit and abort the connection, or give it a connection of theirs for the next daemon to
    /// serve.
    #[test]
    fn the_holder_answers_its_own_user_only() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "needs root (another user's client)"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("fuse.holder");
        let listener = UnixListener::bind(&socket).unwrap();
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        // Stands in for the connection: polls without events, as a live /dev/fuse does.
        let (held, _writer) = nix::unistd::pipe().unwrap();
        let stand_in = format!("1 {}", ino(&held));
        let server = std::thread::spawn(move || serve(&listener, Some(held), true));

        let nobody = 65534;
        assert_eq!(
            ask_as(nobody, &socket, GET, None),
            "0 -",
            "another user got the descriptor"
        );
        ask_as(nobody, &socket, QUIT, None);
        assert_eq!(
            ask_as(0, &socket, GET, None),
            stand_in,
            "another user made the holder let go, or its own user is refused"
        );
        let theirs: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .unwrap()
            .into();
        ask_as(nobody, &socket, GIVE, Some(&theirs));
        assert_eq!(
            ask_as(0, &socket, GET, None),
            stand_in,
            "another user replaced the descriptor"
        );
        // And a daemon takes nothing but a /dev/fuse descriptor (the stand-in is a pipe).
        let err = take(&socket).unwrap_err();
        assert!(err.to_string().contains("not a /dev/fuse"), "{err}");
        // Nor is given anything else.
        let (pipe, _w) = nix::unistd::pipe().unwrap();
        let err = give(&socket, pipe.as_fd()).unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");

        // Our own user gives it a connection: kept in place of the stand-in. (Not mounted, it
        // reads as gone at once: the holder, a spawned one, then exits.)
        let ours: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .unwrap()
            .into();
        assert!(give(&socket, ours.as_fd()).unwrap());
        server.join().unwrap().unwrap();
    }
}
