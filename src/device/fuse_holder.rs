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
//! `nix`) to the next daemon. It does no I/O on it: it only polls it, and exits once the
//! connection is gone (unmounted or aborted) or a daemon tells it to. One holder per mountpoint:
//! it takes an exclusive lock before binding.

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Requests a daemon sends the holder (one byte each).
const GET: u8 = b'g';
const QUIT: u8 = b'q';
/// How long either side waits for the other's answer on a connection.
const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// The holder's socket for the FUSE mount at `dir` (beside it: `dir` is the mountpoint).
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.with_extension("holder")
}

fn lock_path(socket: &Path) -> PathBuf {
    socket.with_extension("holder.lock")
}

/// Asks the holder on `socket` for the connection it keeps: `None` if no holder answers (none
/// runs: a fresh start, or the connection it held is gone).
pub fn take(socket: &Path) -> io::Result<Option<OwnedFd>> {
    let mut conn = match UnixStream::connect(socket) {
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
    conn.write_all(&[GET])?;
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
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            let mut owned = fds
                .into_iter()
                // SAFETY: descriptors the kernel just installed for us; nobody else owns them.
                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
            let fd = owned.next();
            if let Some(fd) = &fd {
                check_is_fuse(fd)?;
            }
            return Ok(fd);
        }
    }
    Ok(None)
}

/// Tells the holder on `socket` (if any) to let go of its connection and exit.
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

/// The holder process: keeps `fuse` (its stdin) until the connection is gone or a daemon says
/// quit, handing it to any daemon that asks on `socket`.
pub fn run(socket: &Path) -> io::Result<()> {
    // SAFETY: setsid has no preconditions; out of the daemon's session and process group, a
    // signal to those (a terminal's Ctrl-C) does not reach us.
    unsafe { libc::setsid() };
    // SAFETY: fd 0 is ours (the daemon passed the connection as our stdin); it is moved out of
    // 0 below so nothing else uses it as stdin.
    let stdin = unsafe { OwnedFd::from_raw_fd(0) };
    let fuse = stdin.try_clone()?;
    drop(stdin);
    std::fs::File::open("/dev/null").map(|null| {
        // SAFETY: dup2 onto fd 0, which we closed above.
        unsafe { libc::dup2(null.as_raw_fd(), 0) }
    })?;
    check_is_fuse(&fuse)?;
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
    let r = serve(&listener, &fuse);
    let _ = std::fs::remove_file(socket);
    r
}

/// Answers daemons until the connection is gone or one says quit.
fn serve(listener: &UnixListener, fuse: &OwnedFd) -> io::Result<()> {
    loop {
        // No events asked of the FUSE device: poll reports only POLLERR, once the connection
        // is aborted (the filesystem was unmounted, or aborted through fusectl).
        let mut fds = [
            libc::pollfd {
                fd: fuse.as_raw_fd(),
                events: 0,
                revents: 0,
            },
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on two pollfds we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[0].revents != 0 {
            return Ok(());
        }
        if fds[1].revents & libc::POLLIN == 0 {
            continue;
        }
        let Ok((mut conn, _)) = listener.accept() else {
            continue;
        };
        // The descriptor reads and answers every container's block I/O: only our own user
        // (root) may take it or make us let go, whatever the socket's mode allows.
        if !peer_is_us(&conn) {
            continue;
        }
        let _ = conn.set_read_timeout(Some(ANSWER_WAIT));
        let _ = conn.set_write_timeout(Some(ANSWER_WAIT));
        let mut byte = [0u8; 1];
        if conn.read_exact(&mut byte).is_err() {
            continue;
        }
        match byte[0] {
            GET => {
                let fds = [fuse.as_raw_fd()];
                let iov = [io::IoSlice::new(b"f")];
                let _ = sendmsg::<()>(
                    conn.as_raw_fd(),
                    &iov,
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                );
            }
            QUIT => return Ok(()),
            _ => {}
        }
    }
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

    /// Connects to the holder's socket as `uid`, sends `request`, prints how many descriptors
    /// came back.
    const CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
try:
    # A refused peer may see the connection closed before its request is written.
    s.sendall(sys.argv[2].encode())
    _, anc, _, _ = s.recvmsg(1, socket.CMSG_SPACE(4))
except OSError:
    anc = []
print(sum(len(d) // 4 for _, t, d in anc if t == socket.SCM_RIGHTS))
"#;

    fn ask_as(uid: u32, socket: &Path, request: u8) -> String {
        let out = Command::new("python3")
            .arg("-c")
            .arg(CLIENT)
            .arg(socket)
            .arg((request as char).to_string())
            .uid(uid)
            .gid(uid)
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The socket is 0600 once bound, but not before the chmod (nor under a careless umask, nor
    /// if an operator loosens it): the holder itself must refuse other users, who could
    /// otherwise read and answer every container's block I/O through the descriptor, or make
    /// it quit and abort the connection.
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
        let server = std::thread::spawn(move || serve(&listener, &held));

        let nobody = 65534;
        assert_eq!(
            ask_as(nobody, &socket, GET),
            "0",
            "another user got the descriptor"
        );
        ask_as(nobody, &socket, QUIT);
        assert_eq!(
            ask_as(0, &socket, GET),
            "1",
            "another user made the holder let go, or its own user is refused"
        );
        // And a daemon takes nothing but a /dev/fuse descriptor (the stand-in is a pipe).
        let err = take(&socket).unwrap_err();
        assert!(err.to_string().contains("not a /dev/fuse"), "{err}");

        quit(&socket);
        server.join().unwrap().unwrap();
    }
}
