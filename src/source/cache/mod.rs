//! The on-disk block cache in front of registry blobs (lazy pulling).
//!
//! A blob is cached in refill blocks (`[cache] refill_kb`, default 32 KiB): a read is rounded
//! out to whole blocks, missing ones are fetched from the registry and written to the cache,
//! present ones are read from it. One [`BlobCache`] (a directory, a size limit) is shared by
//! every device; a [`CachedBlob`] is one blob seen through it ([`ovbd_format::ReadAt`]).
//!
//! Whose bytes (a registry may serve anything under any digest, and lazily fetched blocks
//! cannot be checked against it): an entry is keyed by (scope, digest, size claimed). Blocks
//! fetched from one registry repository (origin: normalized `host/repo`) are served to readers
//! of that origin only; a blob whose whole download matched its digest gets one *verified*
//! entry that every origin shares, each of whose blocks is checked against the block hashes
//! taken from that download before it is cached or served. Two size claims for one digest are
//! two entries: a lie breaks only the image that tells it.
//!
//! Files, per entry, under `<dir>/origin/<sha256 of the origin>/<algo>/` or
//! `<dir>/verified/<algo>/`, named `<hex>-<size>`:
//! - `.data`: sparse; the blob's bytes at their own offsets, then at `round_up(size, 4096)` a
//!   4 KiB trailer (magic, scope, digest, size, a random 128-bit nonce, CRC).
//! - `.map`: a 4 KiB header (magic, scope, digest, size, block size, the same nonce, CRC),
//!   then the bitmap of present blocks (bit `b` = byte `b / 8`, bit `b % 8`).
//! - `.sums` (verified entries): a header as the map's, the sha256 of each block, then the
//!   sha256 of all that.
//!
//! Files of earlier versions (`<dir>/sha256/`, one entry per digest for every origin) are
//! deleted at start, never trusted.
//!
//! Crash safety (the cache may lose blocks, never serve a block not completely written):
//! - a fetched block is written to the data file and served from then on, but goes into the
//!   on-disk map only later: a flusher thread (about a second after the first write of a
//!   batch, when a blob's last handle is dropped, on [`BlobCache::flush`] and when the cache
//!   is dropped) `fdatasync`s the data file, then sets the bits of the blocks written before
//!   that sync, then writes the bitmap in place and syncs it. No sync is on the read path; a
//!   crash loses at most the blocks of the last batch. A torn bitmap write mixes old and new
//!   bits, and each of them is safe.
//! - a block is evicted by clearing its bit, syncing the bitmap if it had the bit, and only
//!   then punching the hole (readers hold a lock that the punch waits for).
//! - at start a record is used only if its header is intact, it belongs to the digest, its
//!   block size is the configured one, and the data file has exactly the expected length and a
//!   trailer with the record's nonce. Anything else (a truncated or extended data file, a data
//!   file made anew, a torn header, a record in another scope's directory, a verified entry
//!   without intact block hashes) drops the entry. Files are made through a temporary file
//!   and a rename, the data file first, the map last.
//!
//! Reading: `read_at_nowait` serves a range only if every block of it is present (`pread` with
//! `RWF_NOWAIT`, plain `pread` where the filesystem cannot tell); `WouldBlock` otherwise.
//! `read_at` serves the present blocks and claims the missing ones: the missing runs of one
//! read are fetched together ([`crate::registry::RemoteBlob::read_ranges`]: concurrent range
//! requests, one per run, runs at most 64 KiB apart merged into one, long runs split). A block
//! claimed by one reader is waited for by any other reader (of any [`CachedBlob`] of the same
//! entry): never two fetches of one block. The refill adapts per open blob: a miss fetches the
//! read's blocks only, unless it is within one refill's length of one of the 8 latest refills
//! (a sequential run; several files read in turn are several runs); then it also claims the
//! missing blocks ahead of the read, twice that refill's plan, up to 4 MiB.
//! `evict(offset, len)` drops blocks (the ZFile layer calls it when a block's CRC fails, then
//! reads again).
//!
//! Eviction: every access stamps the block with a global counter; when the cache grows over
//! its limit, the least recently stamped blocks of all blobs are evicted (holes punched, bits
//! cleared) down to 90% of it (candidates: the set bits of the present bitmaps). After a
//! restart all blocks are equally old. Entries with no block left and no open handle are
//! deleted.
//!
//! A failed `fdatasync` of a data file drops the blocks written before it (Linux reports a
//! writeback error once and marks the pages clean: a later sync would succeed over lost
//! data); they are fetched again when read. The directory is locked (`flock`): one process at a
//! time.
//!
//! Files: [`error`] ([`CacheError`]), [`record`] (the on-disk format), [`state`] (one entry: present/durable bitmaps,
//! stamps, flush into the map), [`blob_cache`] (the directory, its entries, [`BlobCache`]),
//! [`cached_blob`] (the read path, [`CachedBlob`]), [`fetch`] (claiming and filling missing
//! blocks), [`lru`] (eviction), [`flusher`] (the background sync), [`verified`] (entries
//! shared by every origin), [`block_source`] (where blocks come from).

mod blob_cache;
mod block_source;
mod cached_blob;
mod error;
mod fetch;
mod flusher;
mod lru;
mod record;
mod state;
mod verified;

pub use blob_cache::BlobCache;
pub use blob_cache::CacheStats;
#[cfg(test)] // the test fixtures' stand-in source
pub(crate) use block_source::BlockSource;
pub use cached_blob::CachedBlob;
pub use error::CacheError;
pub(crate) use record::{sample_paths, write_sample};

use std::sync::{Mutex, MutexGuard};

/// The largest blob the cache takes (1 TiB): sizes come from image descriptors, and a blob's
/// per-block state is kept in memory.
pub const MAX_BLOB_SIZE: u64 = 1 << 40;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its state consistent before anything can panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
