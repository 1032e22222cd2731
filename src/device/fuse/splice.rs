//! Read replies moved by splice(2) rather than copied: the bytes of a plain (uncompressed,
//! local) image range go from the layer files' page cache through a pipe into /dev/fuse, which
//! copies them once into the loop driver's pages. The copying path reads them into a buffer
//! first and writes that: two copies, which halved the FUSE frontend's 1 MiB sequential reads
//! next to a loop device over a raw file.
//!
//! The reply is one message: the fuse_out_header written into the pipe, then each extent
//! (file ranges spliced, zeros vmspliced from a static page), then the whole pipe spliced into
//! the connection in one call.

use ovbd_format::Extent;
use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Pipe sizes to ask for, largest first: 2 MiB holds a 1 MiB reply (a pipe slot per page an
/// extent touches, one for the header); without CAP_SYS_RESOURCE the limit is
/// /proc/sys/fs/pipe-max-size (1 MiB by default), which holds the 512 KiB requests the loop
/// driver sends for 1 MiB reads; larger replies are then copied.
const PIPE_BYTES: [usize; 2] = [2 << 20, 1 << 20];
/// What one extent may take beyond its pages (an unaligned start and end).
const SLOT_SLACK: usize = 2 * 4096;
/// Zeros to vmsplice from: never written, so the pages the pipe refers to stay zero.
static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
/// cachestat(2) (Linux 6.5+; the same number on every architecture's generic table; the libc
/// crate has no constant for it on x86_64 yet).
const SYS_CACHESTAT: libc::c_long = 451;

/// Why a reply was not spliced.
#[derive(Debug)]
pub(super) enum NotSpliced {
    /// Nothing reached the connection: answer the request another way.
    Unsent(io::Error),
    /// The final splice into the connection failed: the request may or may not have been
    /// consumed; answer it with an error (the kernel ignores an answer to a finished request).
    Failed(io::Error),
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Its size in bytes (F_SETPIPE_SZ may have been refused).
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 fills two descriptors we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just made, owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let fd = write.as_raw_fd();
        // SAFETY (both): fcntl on a descriptor we own. All refused: the default size.
        let capacity = PIPE_BYTES
            .iter()
            .map(|&n| unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, n as libc::c_int) })
            .find(|&n| n > 0)
            .unwrap_or_else(|| unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) })
            .max(0) as usize;
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

thread_local! {
    /// This thread's pipe; dropped after a failure (it may hold a partial reply).
    static PIPE: RefCell<Option<Pipe>> = const { RefCell::new(None) };
}

/// Answers request `unique` on the connection `fuse` with `len` bytes of `extents` from byte
/// `skip` on. `Ok`: answered, and nothing else may answer it.
pub(super) fn send_reply(
    fuse: BorrowedFd<'_>,
    unique: u64,
    extents: &[Extent<'_>],
    skip: u64,
    len: u64,
) -> Result<(), NotSpliced> {
    PIPE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Pipe::new().map_err(NotSpliced::Unsent)?);
        }
        let pipe = slot
            .as_ref()
            .ok_or_else(|| NotSpliced::Unsent(io::Error::other("no pipe")))?;
        let r = fill_and_send(pipe, fuse, unique, extents, skip, len);
        if r.is_err() {
            // It may hold part of this reply: the next one starts with an empty pipe.
            *slot = None;
        }
        r
    })
}

fn fill_and_send(
    pipe: &Pipe,
    fuse: BorrowedFd<'_>,
    unique: u64,
    extents: &[Extent<'_>],
    skip: u64,
    len: u64,
) -> Result<(), NotSpliced> {
    let unsent = NotSpliced::Unsent;
    let total = 16 + len as usize;
    if total + SLOT_SLACK * (extents.len() + 1) > pipe.capacity {
        return Err(unsent(io::Error::other("reply larger than the pipe")));
    }
    // fuse_out_header: len, error, unique.
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&(total as u32).to_ne_bytes());
    header[8..].copy_from_slice(&unique.to_ne_bytes());
    // SAFETY: writes our buffer into our pipe (copied: it is on the stack).
    let n = unsafe { libc::write(pipe.write.as_raw_fd(), header.as_ptr().cast(), 16) };
    if n != 16 {
        return Err(unsent(short_or_error(n)));
    }
    let (mut skip, mut left) = (skip, len);
    for e in extents {
        if left == 0 {
            break;
        }
        let elen = e.len();
        if skip >= elen {
            skip -= elen;
            continue;
        }
        let take = (elen - skip).min(left);
        match *e {
            Extent::Zeros { .. } => put_zeros(pipe, take).map_err(unsent)?,
            Extent::File { file, offset, .. } => {
                put_file(pipe, file, offset + skip, take).map_err(unsent)?
            }
        }
        left -= take;
        skip = 0;
    }
    if left != 0 {
        return Err(unsent(io::Error::other("extents shorter than the reply")));
    }
    // SAFETY: splice between descriptors we hold, no offsets.
    let n = unsafe {
        libc::splice(
            pipe.read.as_raw_fd(),
            std::ptr::null_mut(),
            fuse.as_raw_fd(),
            std::ptr::null_mut(),
            total,
            0,
        )
    };
    if n < 0 || n as usize != total {
        return Err(NotSpliced::Failed(short_or_error(n)));
    }
    Ok(())
}

fn short_or_error(n: isize) -> io::Error {
    if n < 0 {
        io::Error::last_os_error()
    } else {
        io::Error::other(format!("short transfer ({n} bytes)"))
    }
}

/// Splices `len` bytes at `offset` of `file` into the pipe. Never waits for room in the pipe:
/// a full pipe is an error (the reply then goes the copying way).
fn put_file(pipe: &Pipe, file: &File, offset: u64, len: u64) -> io::Result<()> {
    let mut at = offset as libc::loff_t;
    let mut left = len as usize;
    while left > 0 {
        // SAFETY: splice from our file at `at` (advanced by the kernel) into our pipe.
        let n = unsafe {
            libc::splice(
                file.as_raw_fd(),
                &mut at,
                pipe.write.as_raw_fd(),
                std::ptr::null_mut(),
                left,
                libc::SPLICE_F_NONBLOCK,
            )
        };
        match n {
            n if n > 0 => left -= n as usize,
            // The file ends inside the extent: the copying read reports where.
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Puts `len` zero bytes into the pipe (references to [`ZEROS`], not copies).
fn put_zeros(pipe: &Pipe, len: u64) -> io::Result<()> {
    let mut left = len as usize;
    while left > 0 {
        let iov: Vec<libc::iovec> = (0..left.div_ceil(ZEROS.len()).min(16))
            .map(|i| libc::iovec {
                iov_base: ZEROS.as_ptr() as *mut libc::c_void,
                iov_len: (left - i * ZEROS.len()).min(ZEROS.len()),
            })
            .collect();
        // SAFETY: the iovecs cover ZEROS, which lives for the program and is never written
        // (vmsplice without SPLICE_F_GIFT only reads it).
        let n = unsafe {
            libc::vmsplice(
                pipe.write.as_raw_fd(),
                iov.as_ptr(),
                iov.len(),
                libc::SPLICE_F_NONBLOCK,
            )
        };
        match n {
            n if n > 0 => left -= n as usize,
            0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Whether every file range of `extents` is in the page cache, so splicing them will not wait
/// for a disk (cachestat(2)); false when the kernel cannot tell.
pub(super) fn all_cached(extents: &[Extent<'_>]) -> bool {
    extents.iter().all(|e| match *e {
        Extent::Zeros { .. } => true,
        Extent::File { file, offset, len } => cached(file, offset, len),
    })
}

fn cached(file: &File, offset: u64, len: u64) -> bool {
    #[repr(C)]
    struct CachestatRange {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Cachestat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    if len == 0 {
        return true;
    }
    let range = CachestatRange { off: offset, len };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat reads `range` and fills `stat`, both ours and laid out as the kernel's.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0 as libc::c_uint,
        )
    };
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(512) as u64;
    let pages = (offset + len - 1) / page - offset / page + 1;
    r == 0 && stat.nr_cache >= pages
}
