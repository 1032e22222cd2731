//! Where layer bytes come from. Format code reads only through [`ReadAt`], so a local file, a
//! cache or a registry blob plug in without touching it.

use crate::error::{Error, Result};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// A fixed-size byte source read by position. Implementations must be safe to call from many
/// threads at once.
pub trait ReadAt: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 only at or past the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Length in bytes.
    fn size(&self) -> u64;
    /// A name for error messages (a path, a digest).
    fn name(&self) -> &str;
    /// Drops any cached copy of `[offset, offset + len)` so the next read fetches it again
    /// (called before re-reading a block whose CRC failed).
    fn evict(&self, _offset: u64, _len: u64) {}
    /// As `read_at`, but fails with `WouldBlock` rather than wait for data that is not at hand.
    /// The default never reads: such a source is always read where blocking is fine.
    fn read_at_nowait(&self, _buf: &mut [u8], _offset: u64) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    /// [`read_at`](Self::read_at) or [`read_at_nowait`](Self::read_at_nowait), as `blocking`
    /// says: how a reader that was told whether it may block passes that on.
    fn read_at_with(&self, buf: &mut [u8], offset: u64, blocking: Blocking) -> io::Result<usize> {
        match blocking {
            Blocking::Allowed => self.read_at(buf, offset),
            Blocking::Never => self.read_at_nowait(buf, offset),
        }
    }
    /// Brings `[offset, offset + len)` close at hand (a cache, the page cache) without returning
    /// it, in as few requests to where it comes from as the source can: how a trace replay
    /// warms a layer. The default does nothing (the bytes are in memory).
    fn prefetch(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// The local file holding this source's bytes as they are, and where byte 0 of the source
    /// lies in it: lets a reader move them without copying (splice). `None` (the default): the
    /// bytes are not in one local file as-is (compressed, cached, remote, in memory).
    fn local_file(&self) -> Option<(&File, u64)> {
        None
    }
}

/// Whether a read may wait for data that is not at hand (a cold disk, a registry fetch).
/// Chosen by whoever starts the read and passed down through every layer it goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocking {
    /// May wait: worker threads, tools.
    Allowed,
    /// Must not wait: a read that would fails with `WouldBlock` ([`Error::WouldBlock`]), so a
    /// block device can serve cached data on its queue thread and send the rest to threads
    /// that may block.
    Never,
}

/// `pread` that fails with `WouldBlock` instead of waiting for the disk (RWF_NOWAIT), or with
/// `Unsupported` where the filesystem cannot tell (tmpfs, overlayfs, 9p on 6.12).
pub fn pread_nowait(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::unix::io::AsRawFd;
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: one iovec over `buf`, valid for the call.
    let n = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            &iov,
            1,
            offset as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EAGAIN) => io::ErrorKind::WouldBlock.into(),
            Some(libc::EOPNOTSUPP) => io::ErrorKind::Unsupported.into(),
            _ => e,
        });
    }
    Ok(n as usize)
}

/// Fills `buf` from `offset` or fails with an error naming the source and offset. A source that
/// stops returning bytes is an error, never a retry loop (upstream overlaybd#255). May block.
pub fn read_exact_at(src: &dyn ReadAt, buf: &mut [u8], offset: u64) -> Result<()> {
    read_exact_at_with(src, buf, offset, Blocking::Allowed)
}

/// As [`read_exact_at`]; with [`Blocking::Never`] a read that would wait fails with
/// [`Error::WouldBlock`].
pub fn read_exact_at_with(
    src: &dyn ReadAt,
    buf: &mut [u8],
    offset: u64,
    blocking: Blocking,
) -> Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        match src.read_at_with(&mut buf[done..], pos, blocking) {
            Ok(0) => {
                return Err(Error::corrupt(
                    src.name(),
                    pos,
                    format!(
                        "unexpected end of data: needed {} bytes at offset {}, source is {} bytes",
                        buf.len(),
                        offset,
                        src.size()
                    ),
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(Error::WouldBlock),
            Err(e) => return Err(from_read_error(src.name(), pos, e)),
        }
    }
    Ok(())
}

/// A source that is itself a format reader (a ZFile under an LSMT) reports corruption as an
/// `io::Error` wrapping one of ours: hand that typed error on, not an I/O error around it.
fn from_read_error(name: &str, pos: u64, e: io::Error) -> Error {
    if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
        let kind = e.kind();
        return match e.into_inner().map(|inner| inner.downcast::<Error>()) {
            Some(Ok(typed)) => *typed,
            Some(Err(other)) => Error::io(name, pos, io::Error::new(kind, other)),
            None => Error::io(name, pos, io::Error::from(kind)),
        };
    }
    Error::io(name, pos, e)
}

/// A local file.
pub struct FileSource {
    file: File,
    name: String,
    size: u64,
    /// Cleared once the filesystem refuses RWF_NOWAIT: no point asking again.
    nowait_ok: std::sync::atomic::AtomicBool,
}

impl FileSource {
    /// Opens a regular file. A symlink or a special file (a FIFO would block the open, a
    /// symlink may point anywhere on the node) is refused with an error naming the path.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let file = open_regular(path).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) if path.is_symlink() => Error::Unsupported {
                file: name.clone(),
                what: "a symbolic link, not a regular file".into(),
            },
            _ => Error::io(&name, 0, e),
        })?;
        let kind = file
            .metadata()
            .map_err(|e| Error::io(&name, 0, e))?
            .file_type();
        if !kind.is_file() {
            return Err(Error::Unsupported {
                file: name,
                what: format!("not a regular file ({})", file_kind(kind)),
            });
        }
        Self::from_file(file, name)
    }

    pub fn from_file(file: File, name: String) -> Result<Self> {
        let size = file.metadata().map_err(|e| Error::io(&name, 0, e))?.len();
        Ok(FileSource {
            file,
            name,
            size,
            nowait_ok: true.into(),
        })
    }
}

impl ReadAt for FileSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let max = ((self.size - offset).min(buf.len() as u64)) as usize;
        self.file.read_at(&mut buf[..max], offset)
    }
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        use std::sync::atomic::Ordering::Relaxed;
        if !self.nowait_ok.load(Relaxed) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let max = ((self.size - offset).min(buf.len() as u64)) as usize;
        match pread_nowait(&self.file, &mut buf[..max], offset) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                self.nowait_ok.store(false, Relaxed);
                Err(io::ErrorKind::WouldBlock.into())
            }
            r => r,
        }
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::io::AsRawFd;
        if offset >= self.size || len == 0 {
            return Ok(());
        }
        let len = len.min(self.size - offset);
        // Page-cache readahead in the background: a hint, so its failure is no error.
        // SAFETY: fadvise on a descriptor we own.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
        Ok(())
    }
    fn local_file(&self) -> Option<(&File, u64)> {
        Some((&self.file, 0))
    }
}

/// Opens `path` read-only without following a final symlink and without waiting for a FIFO's
/// writer; O_NONBLOCK is cleared again so reads behave as usual.
fn open_regular(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// What a non-regular file is, for error messages.
fn file_kind(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else {
        "a special file"
    }
}

/// Bytes held in memory (tests, benchmarks, fuzzing).
pub struct MemSource {
    data: Arc<[u8]>,
    name: String,
}

impl MemSource {
    pub fn new(data: impl Into<Arc<[u8]>>, name: impl Into<String>) -> Self {
        MemSource {
            data: data.into(),
            name: name.into(),
        }
    }
}

impl ReadAt for MemSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let len = self.data.len() as u64;
        if offset >= len {
            return Ok(0);
        }
        let start = offset as usize;
        let n = buf.len().min(self.data.len() - start);
        buf[..n].copy_from_slice(&self.data[start..start + n]);
        Ok(n)
    }
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.read_at(buf, offset)
    }
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// A window `[base, base + len)` of another source: the payload of a tar wrapper.
pub struct SubSource {
    inner: Arc<dyn ReadAt>,
    base: u64,
    len: u64,
}

impl SubSource {
    pub fn new(inner: Arc<dyn ReadAt>, base: u64, len: u64) -> Self {
        SubSource { inner, base, len }
    }
}

impl ReadAt for SubSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.len - offset) as usize;
        self.inner.read_at(&mut buf[..n], self.base + offset)
    }
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.len - offset) as usize;
        self.inner.read_at_nowait(&mut buf[..n], self.base + offset)
    }
    fn size(&self) -> u64 {
        self.len
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn evict(&self, offset: u64, len: u64) {
        self.inner.evict(self.base + offset, len)
    }
    fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset >= self.len {
            return Ok(());
        }
        let len = len.min(self.len - offset);
        self.inner.prefetch(self.base + offset, len)
    }
    fn local_file(&self) -> Option<(&File, u64)> {
        let (file, at) = self.inner.local_file()?;
        Some((file, at.checked_add(self.base)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn mkfifo(path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn open_reads_regular_files_only() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::write(&real, b"layer bytes").unwrap();
        let f = FileSource::open(&real).unwrap();
        let mut buf = [0u8; 5];
        read_exact_at(&f, &mut buf, 0).unwrap();
        assert_eq!(&buf, b"layer");

        // A symlink (to a regular file) is refused, naming the path.
        let link = d.path().join("overlaybd.commit");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = FileSource::open(&link).err().unwrap().to_string();
        assert!(e.contains(&link.display().to_string()), "{e}");
        assert!(e.contains("symbolic link"), "{e}");

        // A FIFO is refused at once (no writer: a plain open would wait for one forever).
        let (tx, rx) = std::sync::mpsc::channel();
        let fifo = d.path().join("fifo");
        mkfifo(&fifo);
        let p = fifo.clone();
        std::thread::spawn(move || {
            let r = FileSource::open(&p).err().map(|e| e.to_string());
            let _ = tx.send(r);
        });
        let r = match rx.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(r) => r,
            Err(_) => {
                // Hang detector: release the stuck open before failing.
                let _w = std::fs::OpenOptions::new().write(true).open(&fifo);
                panic!("FileSource::open of a FIFO did not return");
            }
        };
        let e = r.expect("a FIFO must not open as a layer file");
        assert!(e.contains(&fifo.display().to_string()), "{e}");
        assert!(e.contains("not a regular file"), "{e}");
    }
}
