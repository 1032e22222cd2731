//! Typed errors. Every error that comes from reading a file names the file and the byte offset.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{file}: I/O error at offset {offset}: {source}")]
    Io {
        file: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("{file}: {what} (at offset {offset})")]
    Corrupt {
        file: String,
        offset: u64,
        what: String,
    },
    #[error(
        "{file}: block {block} at offset {offset} failed its CRC check after {attempts} reads"
    )]
    BlockCrc {
        file: String,
        block: u64,
        offset: u64,
        attempts: u32,
    },
    #[error("{file}: unsupported: {what}")]
    Unsupported { file: String, what: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{0}: layer is read-only")]
    ReadOnly(String),
    #[error("{file}: full: the layer may take {limit} bytes of disk")]
    Full { file: String, limit: u64 },
    /// A read that must not block ([`crate::source::Blocking::Never`]) needs data that is not
    /// at hand (not in the page cache, or remote): retry it where blocking is fine.
    #[error("the read would block")]
    WouldBlock,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn corrupt(file: &str, offset: u64, what: impl Into<String>) -> Self {
        Error::Corrupt {
            file: file.to_string(),
            offset,
            what: what.into(),
        }
    }

    /// Says which structure a corrupt read was reading (`index (N entries at O)`), so an
    /// "unexpected end of data" names the field whose bytes are missing.
    pub(crate) fn within(self, what: impl std::fmt::Display) -> Self {
        match self {
            Error::Corrupt {
                file,
                offset,
                what: inner,
            } => Error::Corrupt {
                file,
                offset,
                what: format!("{what}: {inner}"),
            },
            e => e,
        }
    }

    pub(crate) fn io(file: &str, offset: u64, source: io::Error) -> Self {
        Error::Io {
            file: file.to_string(),
            offset,
            source,
        }
    }

    /// The errno a block device should complete a failed request with.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::InvalidArgument(_) => libc::EINVAL,
            Error::ReadOnly(_) => libc::EROFS,
            Error::Full { .. } => libc::ENOSPC,
            Error::WouldBlock => libc::EAGAIN,
            _ => libc::EIO,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::Io { source, .. } => source.kind(),
            Error::InvalidArgument(_) => io::ErrorKind::InvalidInput,
            Error::WouldBlock => io::ErrorKind::WouldBlock,
            Error::Full { .. } => io::ErrorKind::StorageFull,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}
