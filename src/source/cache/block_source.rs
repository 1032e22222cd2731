//! Where a cached blob's missing blocks come from: a registry blob, or a stand-in in tests.

use crate::registry::RemoteBlob;
use std::io;

/// Where missing blocks come from: a registry blob, or a stand-in in tests.
pub(crate) trait BlockSource: Send + Sync {
    /// Reads each `(offset, len)` range into its own buffer (concurrently if it can).
    fn fetch_ranges(&self, ranges: &[(u64, usize)]) -> io::Result<Vec<Vec<u8>>>;
    fn size(&self) -> u64;
    fn name(&self) -> &str;
    fn digest(&self) -> &str;
    /// Who serves the bytes (`registry-host/repository`): the scope in which unverified cached
    /// blocks may be shared.
    fn origin(&self) -> String;
}

impl BlockSource for RemoteBlob {
    fn fetch_ranges(&self, ranges: &[(u64, usize)]) -> io::Result<Vec<Vec<u8>>> {
        self.read_ranges(ranges)
    }
    fn size(&self) -> u64 {
        ovbd_format::ReadAt::size(self)
    }
    fn name(&self) -> &str {
        ovbd_format::ReadAt::name(self)
    }
    fn digest(&self) -> &str {
        RemoteBlob::digest(self)
    }
    fn origin(&self) -> String {
        // The name is `host/repo@digest` (registry host and repository as parsed from the
        // image reference); whatever it is, it names the host and repository.
        let name = ovbd_format::ReadAt::name(self);
        name.strip_suffix(RemoteBlob::digest(self))
            .and_then(|n| n.strip_suffix('@'))
            .unwrap_or(name)
            .to_owned()
    }
}
