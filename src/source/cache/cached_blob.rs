//! A blob read through the cache ([`CachedBlob`], an [`ovbd_format::ReadAt`]): present
//! blocks served from the data file, missing ones claimed and fetched ([`super::fetch`]),
//! blocks claimed by another reader waited for. `read_at_nowait` serves only present blocks.

use super::blob_cache::BlobCache;
use super::block_source::BlockSource;
use super::error::CacheError;
use super::fetch::{Claim, Refill};
use super::lock;
use super::state::{BlobState, Flight};
use crate::oci::digest::valid_digest;
use crate::registry::RemoteBlob;
use std::fmt;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Rounds of "serve what is there, fetch what is missing, wait for the others" before a read
/// gives up on the cache and reads the rest straight from the registry (only under heavy
/// eviction churn).
pub(super) const MAX_ROUNDS: usize = 4;

/// A blob read through the cache: [`ovbd_format::ReadAt`].
pub struct CachedBlob {
    pub(super) cache: Arc<BlobCache>,
    pub(super) state: Arc<BlobState>,
    pub(super) source: Arc<dyn BlockSource>,
    pub(super) name: String,
    /// When it was opened, until its first read returns (lazy-pull first-byte latency).
    pub(super) first_read: std::sync::Mutex<Option<std::time::Instant>>,
    pub(super) first_read_done: std::sync::atomic::AtomicBool,
    /// How much the next miss fetches (taken under the entry's lock, after it).
    pub(super) refill: std::sync::Mutex<Refill>,
}

impl fmt::Debug for CachedBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedBlob")
            .field("name", &self.name)
            .field("size", &self.state.size)
            .finish_non_exhaustive()
    }
}

impl CachedBlob {
    pub fn new(cache: Arc<BlobCache>, remote: RemoteBlob) -> Result<CachedBlob, CacheError> {
        CachedBlob::with_source(cache, Arc::new(remote))
    }

    /// As [`CachedBlob::new`] with any block source.
    pub(crate) fn with_source(
        cache: Arc<BlobCache>,
        source: Arc<dyn BlockSource>,
    ) -> Result<CachedBlob, CacheError> {
        let digest = source.digest().to_owned();
        if !valid_digest(&digest) {
            return Err(CacheError::BadDigest { digest });
        }
        let state = cache.open_state(&source.origin(), &digest, source.size())?;
        // From here on, Drop undoes the open count.
        let blob = CachedBlob {
            name: source.name().to_owned(),
            cache,
            state,
            source,
            first_read: std::sync::Mutex::new(Some(std::time::Instant::now())),
            first_read_done: std::sync::atomic::AtomicBool::new(false),
            refill: std::sync::Mutex::new(Refill::default()),
        };
        blob.state.files(true)?;
        Ok(blob)
    }

    /// Bytes of this blob in the cache.
    #[allow(dead_code)] // API for the daemon's stats
    pub fn cached_bytes(&self) -> u64 {
        self.state.cached.load(Relaxed)
    }

    /// Drops every cached block of this blob's entry: its origin sent bytes that do not match
    /// the digest. A verified entry keeps its blocks (each matched the verified blob). Returns
    /// the bytes dropped.
    pub fn purge(&self) -> u64 {
        let st = &*self.state;
        if st.is_verified() {
            return 0;
        }
        let blocks: Vec<(u64, Option<u64>)> = lock(&st.inner)
            .present_blocks()
            .map(|b| (b, None))
            .collect();
        st.evict_blocks(&self.cache, &blocks)
    }

    /// Whether the blob's first miss fetches all of it (`[cache] whole_blob_kb`).
    pub fn comes_whole(&self) -> bool {
        self.state.size <= self.cache.whole_blob
    }

    /// Fetches the missing blocks of `ranges` (`(offset, len)`) that nobody is fetching, in
    /// one go: runs apart become one request where the registry serves several ranges at
    /// once. How a layer's open gets its head and its tail in one round trip.
    pub fn fetch_together(&self, ranges: &[(u64, u64)]) -> io::Result<()> {
        let st = &*self.state;
        let mut claim = Claim {
            state: st,
            blocks: Vec::new(),
            flight: Flight::new(),
            finished: false,
        };
        {
            // As a read claims its blocks; neither lock is held while they are fetched.
            let _punch = st.punch.read().unwrap_or_else(|e| e.into_inner());
            let mut inner = lock(&st.inner);
            let mut blocks: Vec<u64> = Vec::new();
            for &(offset, len) in ranges {
                let len = len.min(st.size.saturating_sub(offset));
                if len > 0 {
                    let (first, last) = self.blocks_of(offset, len as usize);
                    blocks.extend(first..=last);
                }
            }
            blocks.sort_unstable();
            blocks.dedup();
            for b in blocks {
                if !inner.is_present(b) && !inner.inflight.contains_key(&b) {
                    inner.inflight.insert(b, claim.flight.clone());
                    claim.blocks.push(b);
                }
            }
        }
        if claim.blocks.is_empty() {
            return Ok(());
        }
        self.fill(&mut claim, &mut [], 0)
    }

    /// Whether this reads the digest's verified entry (shared by every origin).
    #[allow(dead_code)] // API for the daemon's stats and tests
    pub fn is_verified(&self) -> bool {
        self.state.is_verified()
    }

    /// A read's I/O error on the data file, naming the blob, the file and the offset.
    pub(super) fn io_err(&self, offset: u64, what: &'static str, source: io::Error) -> io::Error {
        CacheError::Blob {
            name: self.name.clone(),
            path: self.state.data_path.clone(),
            offset,
            what,
            source,
        }
        .into()
    }

    /// The source answered with other lengths than the `ranges` of a read at `offset`.
    pub(super) fn short_fetch(&self, offset: u64) -> io::Error {
        CacheError::ShortFetch {
            name: self.name.clone(),
            offset,
        }
        .into()
    }

    /// Blocks `first..=last` of a read of `n` bytes at `offset`.
    pub(super) fn blocks_of(&self, offset: u64, n: usize) -> (u64, u64) {
        let bs = self.state.block;
        (offset / bs, (offset + n as u64 - 1) / bs)
    }

    /// Copies the part of blocks `[b0, b0 + data.len()/block)` that overlaps the read
    /// (`buf` at `offset`) from `data`, which holds those blocks' bytes.
    pub(super) fn copy_overlap(buf: &mut [u8], offset: u64, data_start: u64, data: &[u8]) {
        let end = offset + buf.len() as u64;
        let s = offset.max(data_start);
        let e = end.min(data_start + data.len() as u64);
        if s < e {
            buf[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&data[(s - data_start) as usize..(e - data_start) as usize]);
        }
    }

    pub(super) fn read_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut missed = false;
        let r = self.read_cached_noting_misses(buf, offset, &mut missed);
        if r.is_ok() {
            // One relaxed load per read once the first is done.
            if !self.first_read_done.load(Relaxed) {
                self.first_read_done.store(true, Relaxed);
                if let Some(opened) = lock(&self.first_read).take() {
                    crate::metrics::metrics().lazy_first_byte(opened.elapsed());
                }
            }
            let count = if missed {
                &self.cache.miss_reads
            } else {
                &self.cache.hit_reads
            };
            count.fetch_add(1, Relaxed);
        }
        r
    }

    /// [`CachedBlob::read_cached`], setting `missed` if it fetched blocks.
    fn read_cached_noting_misses(
        &self,
        buf: &mut [u8],
        offset: u64,
        missed: &mut bool,
    ) -> io::Result<usize> {
        let st = &*self.state;
        let n = (st.size - offset).min(buf.len() as u64) as usize;
        let buf = &mut buf[..n];
        let (first, last) = self.blocks_of(offset, n);
        let count = (last - first + 1) as usize;
        let mut filled = vec![false; count];
        for _ in 0..MAX_ROUNDS {
            if filled.iter().all(|&f| f) {
                return Ok(n);
            }
            let mut claim = Claim {
                state: st,
                blocks: Vec::new(),
                flight: Flight::new(),
                finished: false,
            };
            let mut waits: Vec<Arc<Flight>> = Vec::new();
            {
                let _punch = st.punch.read().unwrap_or_else(|e| e.into_inner());
                let mut serve = Vec::new();
                let files = {
                    let stamp = self.cache.tick();
                    let mut inner = lock(&st.inner);
                    for (i, done) in filled.iter().enumerate() {
                        let b = first + i as u64;
                        if *done {
                            continue;
                        }
                        if let Some(f) = inner.inflight.get(&b) {
                            if !waits.iter().any(|w| Arc::ptr_eq(w, f)) {
                                waits.push(f.clone());
                            }
                        } else if inner.is_present(b) {
                            inner.stamp[b as usize] = stamp;
                            serve.push(i);
                        } else {
                            inner.inflight.insert(b, claim.flight.clone());
                            claim.blocks.push(b);
                        }
                    }
                    if !claim.blocks.is_empty() {
                        // A small blob comes whole with its first miss (a container's start
                        // often reads most of it, one page fault at a time otherwise).
                        let whole = st.size <= self.cache.whole_blob;
                        let refill = &mut lock(&self.refill);
                        claim.extend(&mut inner, refill, last, whole, self.cache.limit);
                    }
                    inner.files.clone()
                };
                if !serve.is_empty() {
                    let files = match files {
                        Some(f) => f,
                        None => st.files(true)?,
                    };
                    let end = offset + n as u64;
                    let mut served = 0u64;
                    // Adjacent blocks in one pread.
                    let mut i = 0;
                    while i < serve.len() {
                        let mut j = i;
                        while j + 1 < serve.len() && serve[j + 1] == serve[j] + 1 {
                            j += 1;
                        }
                        let s = ((first + serve[i] as u64) * st.block).max(offset);
                        let e = ((first + serve[j] as u64 + 1) * st.block).min(end);
                        files
                            .data
                            .read_exact_at(
                                &mut buf[(s - offset) as usize..(e - offset) as usize],
                                s,
                            )
                            .map_err(|e| self.io_err(s, "reading", e))?;
                        served += e - s;
                        for k in &serve[i..=j] {
                            filled[*k] = true;
                        }
                        i = j + 1;
                    }
                    self.cache.hits.fetch_add(served, Relaxed);
                }
            }
            if !claim.blocks.is_empty() {
                *missed = true;
                self.fill(&mut claim, buf, offset)?;
                // Blocks past `last` were fetched ahead of the read.
                for b in claim.blocks.iter().filter(|&&b| b <= last) {
                    filled[(b - first) as usize] = true;
                }
            }
            for w in waits {
                w.wait().map_err(|(kind, msg)| io::Error::new(kind, msg))?;
            }
        }
        if filled.iter().all(|&f| f) {
            return Ok(n);
        }
        // Blocks evicted as fast as they come: read the rest without the cache.
        log::debug!(
            "{}: cache churn at offset {offset}: reading past the cache",
            self.name
        );
        let ranges: Vec<(u64, usize)> = filled
            .iter()
            .enumerate()
            .filter(|(_, f)| !**f)
            .map(|(i, _)| {
                let (s, e) = st.block_range(first + i as u64);
                (s, (e - s) as usize)
            })
            .collect();
        let data = self.source.fetch_ranges(&ranges)?;
        if data.len() != ranges.len() || data.iter().zip(&ranges).any(|(d, r)| d.len() != r.1) {
            return Err(self.short_fetch(offset));
        }
        let files = st.files(true)?;
        self.check_blocks(&files, &ranges, &data)?;
        for (r, d) in ranges.iter().zip(&data) {
            Self::copy_overlap(buf, offset, r.0, d);
        }
        Ok(n)
    }
}

impl Drop for CachedBlob {
    fn drop(&mut self) {
        if self.state.open.fetch_sub(1, Relaxed) == 1 {
            if let Err(e) = self.state.flush(&self.cache.total) {
                log::warn!("{}: syncing its cached blocks: {e}", self.name);
            }
            // The last handle: close the files (an evictor holds its own). Checked again
            // under the lock: a new handle may have come meanwhile.
            let mut inner = lock(&self.state.inner);
            if self.state.open.load(Relaxed) == 0 {
                inner.files = None;
            }
        }
    }
}

/// The most a prefetch reads at once (the cache's largest refill).
const PREFETCH_CHUNK: u64 = 4 << 20;

impl ovbd_format::ReadAt for CachedBlob {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.state.size || buf.is_empty() {
            return Ok(0);
        }
        self.read_cached(buf, offset)
    }

    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let st = &*self.state;
        if offset >= st.size || buf.is_empty() {
            return Ok(0);
        }
        let n = (st.size - offset).min(buf.len() as u64) as usize;
        let (first, last) = self.blocks_of(offset, n);
        let Ok(_punch) = st.punch.try_read() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let files = {
            let stamp = self.cache.tick();
            let mut inner = lock(&st.inner);
            if (first..=last).any(|b| !inner.is_present(b) || inner.inflight.contains_key(&b)) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            for b in first..=last {
                inner.stamp[b as usize] = stamp;
            }
            match inner.files.clone() {
                Some(f) => f,
                None => return Err(io::ErrorKind::WouldBlock.into()),
            }
        };
        let got = match ovbd_format::source::pread_nowait(&files.data, &mut buf[..n], offset) {
            // The filesystem cannot tell whether it would wait: the data is local, read it.
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                files.data.read_at(&mut buf[..n], offset)
            }
            r => r,
        };
        match got {
            Ok(k) => {
                self.cache.hits.fetch_add(k as u64, Relaxed);
                self.cache.hit_reads.fetch_add(1, Relaxed);
                Ok(k)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
            Err(e) => Err(self.io_err(offset, "reading", e)),
        }
    }

    fn size(&self) -> u64 {
        self.state.size
    }

    fn name(&self) -> &str {
        &self.name
    }

    /// Reads the range through the cache and drops it: its missing blocks are fetched as one
    /// read's are (runs merged, long runs split into concurrent requests).
    fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        let size = self.state.size;
        let end = offset.saturating_add(len).min(size);
        let mut at = offset;
        let mut buf = Vec::new();
        while at < end {
            let n = (end - at).min(PREFETCH_CHUNK) as usize;
            buf.resize(n, 0);
            match self.read_cached(&mut buf, at)? {
                0 => break,
                k => at += k as u64,
            }
        }
        Ok(())
    }

    fn evict(&self, offset: u64, len: u64) {
        let st = &*self.state;
        if len == 0 || offset >= st.size {
            return;
        }
        let end = (offset + len).min(st.size);
        let blocks: Vec<(u64, Option<u64>)> = (offset / st.block..=(end - 1) / st.block)
            .map(|b| (b, None))
            .collect();
        let freed = st.evict_blocks(&self.cache, &blocks);
        log::debug!("{}: evicted {freed} bytes at {offset}+{len}", self.name);
    }
}
