//! What the block cache reports. Every error names the file (and offset) or the blob it is
//! about. Reads through [`super::CachedBlob`] answer `io::Error` (the device turns it into an
//! errno); those carry a [`CacheError`] inside.

use super::MAX_BLOB_SIZE;
use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The `[cache]` settings cannot be used.
    #[error("{0}")]
    Config(String),
    /// Another process (or another cache in this one) holds the directory's lock.
    #[error(
        "block cache {} is in use by another process (or another cache in this one): {source}",
        dir.display()
    )]
    Busy {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// I/O on one of the cache's files or directories (or a file given to it).
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// I/O at an offset of a file.
    #[error("{what} {} at offset {offset}: {source}", path.display())]
    IoAt {
        what: &'static str,
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// A map, data trailer or block-hash file that does not check out: the entry is dropped.
    #[error("{} at offset {offset}: {why}", path.display())]
    BadRecord {
        path: PathBuf,
        offset: u64,
        why: String,
    },
    /// A file of an open entry was made anew under it.
    #[error("{} was replaced", path.display())]
    Replaced { path: PathBuf },
    /// Block hashes given for an entry that takes none, or not one per block.
    #[error("{}: block hashes go with verified entries, one per block", path.display())]
    MisplacedSums { path: PathBuf },
    #[error("{digest:?} is not a digest (sha256:<hex> or sha512:<hex>)")]
    BadDigest { digest: String },
    /// A blob (or file) the cache does not take: its per-block state is kept in memory.
    #[error("{what} of {size} bytes is larger than the cache takes ({MAX_BLOB_SIZE})")]
    TooLarge { what: String, size: u64 },
    /// An image claims another size for a digest than the download that matched it had.
    #[error(
        "blob {digest} from {origin}: the image says {claimed} bytes, but its download matched \
         the digest at {verified} bytes"
    )]
    SizeLie {
        digest: String,
        origin: String,
        claimed: u64,
        verified: u64,
    },
    /// A file offered as a verified copy does not hash to its digest.
    #[error("{} has {got}, not {want}", file.display())]
    DigestMismatch {
        file: PathBuf,
        got: String,
        want: String,
    },
    /// A block fetched for a verified entry does not hash as the verified blob's block.
    #[error(
        "{name} ({origin}): block at offset {offset} does not match the blob verified against \
         {digest}: the registry served other bytes"
    )]
    BlockMismatch {
        name: String,
        origin: String,
        offset: u64,
        digest: String,
    },
    /// The block source answered with other lengths than the ranges asked for.
    #[error("cache of {name}: fetching at offset {offset}: the source returned short ranges")]
    ShortFetch { name: String, offset: u64 },
    /// I/O on a blob's cache files while serving a read of it.
    #[error("cache of {name} ({}) at offset {offset}: {what}: {source}", path.display())]
    Blob {
        name: String,
        path: PathBuf,
        offset: u64,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// Syncing a blob's written blocks failed: they are dropped (fetched again when read).
    #[error("syncing the cached blocks of {digest}: {source}")]
    Sync {
        digest: String,
        #[source]
        source: Box<CacheError>,
    },
}

impl CacheError {
    pub(super) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        CacheError::Io {
            what,
            path: path.into(),
            source,
        }
    }

    pub(super) fn io_at(
        what: &'static str,
        path: impl Into<PathBuf>,
        offset: u64,
        source: io::Error,
    ) -> Self {
        CacheError::IoAt {
            what,
            path: path.into(),
            offset,
            source,
        }
    }

    pub(super) fn bad_record(
        path: impl Into<PathBuf>,
        offset: u64,
        why: impl Into<String>,
    ) -> Self {
        CacheError::BadRecord {
            path: path.into(),
            offset,
            why: why.into(),
        }
    }
}

/// A read's answer: kind `Other` whatever the cause (a `WouldBlock` or `Interrupted` kind
/// would be taken for "retry"), so the device completes the request with EIO.
impl From<CacheError> for io::Error {
    fn from(e: CacheError) -> io::Error {
        io::Error::other(e)
    }
}
