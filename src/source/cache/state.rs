//! One entry's state: which blocks are present (in memory) and durable (in the on-disk map),
//! their access stamps, the blocks in flight, the open files; loading and checking an entry's
//! files, and syncing written blocks into its map.

use super::error::CacheError;
use super::lock;
use super::record::*;
use super::verified::check_sums;
use super::MAX_BLOB_SIZE;
use sha2::{Digest as _, Sha256};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
#[cfg(test)]
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, RwLock};

/// A block being fetched or evicted: readers of it wait for the outcome.
pub(super) struct Flight {
    pub(super) done: Mutex<Option<Result<(), (io::ErrorKind, String)>>>,
    pub(super) cv: Condvar,
}

impl Flight {
    pub(super) fn new() -> Arc<Flight> {
        Arc::new(Flight {
            done: Mutex::new(None),
            cv: Condvar::new(),
        })
    }
    pub(super) fn complete(&self, r: Result<(), (io::ErrorKind, String)>) {
        let mut d = lock(&self.done);
        if d.is_none() {
            *d = Some(r);
        }
        self.cv.notify_all();
    }
    pub(super) fn wait(&self) -> Result<(), (io::ErrorKind, String)> {
        let mut d = lock(&self.done);
        loop {
            if let Some(r) = d.as_ref() {
                return r.clone();
            }
            d = self.cv.wait(d).unwrap_or_else(|e| e.into_inner());
        }
    }
}

pub(super) struct Files {
    pub(super) data: File,
    pub(super) map: File,
    /// A verified entry's block hashes.
    pub(super) sums: Option<File>,
}

pub(super) struct Inner {
    /// Blocks that may be served (written to the data file), one bit each.
    pub(super) present: Vec<u64>,
    /// Blocks whose data is synced: what the on-disk map may say. A subset of `present`.
    pub(super) durable: Vec<u64>,
    /// Present blocks written since the last flush, not yet synced.
    pub(super) pending: HashSet<u64>,
    /// Last access (the cache's clock) of each block.
    pub(super) stamp: Vec<u64>,
    /// Blocks being fetched or evicted.
    pub(super) inflight: HashMap<u64, Arc<Flight>>,
    /// Open while a [`CachedBlob`](super::CachedBlob) is.
    pub(super) files: Option<Arc<Files>>,
    /// Bumped on every change of `durable`.
    pub(super) dirty_gen: u64,
}

pub(super) fn get_bit(bits: &[u64], b: u64) -> bool {
    bits.get((b / 64) as usize)
        .is_some_and(|w| w & (1 << (b % 64)) != 0)
}

pub(super) fn set_bit(bits: &mut [u64], b: u64, on: bool) {
    if let Some(w) = bits.get_mut((b / 64) as usize) {
        if on {
            *w |= 1 << (b % 64);
        } else {
            *w &= !(1 << (b % 64));
        }
    }
}

impl Inner {
    pub(super) fn is_present(&self, b: u64) -> bool {
        get_bit(&self.present, b)
    }
    /// The present blocks, in order: the set bits, found word by word (a large sparse blob
    /// costs its number of words, not of blocks).
    pub(super) fn present_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.present.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(i as u64 * 64 + bit)
            })
        })
    }
    /// The on-disk form of `durable`.
    pub(super) fn bitmap_bytes(&self, nblocks: u64) -> Vec<u8> {
        let mut out: Vec<u8> = self.durable.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate(bitmap_len(nblocks));
        out
    }
}

/// One entry's cache: shared by every [`CachedBlob`](super::CachedBlob) of its scope, digest and size.
pub(super) struct BlobState {
    pub(super) scope: Scope,
    pub(super) digest: String,
    pub(super) size: u64,
    pub(super) block: u64,
    pub(super) nblocks: u64,
    pub(super) nonce: [u8; 16],
    pub(super) data_path: PathBuf,
    pub(super) map_path: PathBuf,
    pub(super) inner: Mutex<Inner>,
    /// Readers of the data file hold it shared; punching a hole holds it exclusively.
    pub(super) punch: RwLock<()>,
    /// Serialises bitmap writes; the generation last made durable.
    pub(super) persisted: Mutex<u64>,
    pub(super) cached: AtomicU64,
    pub(super) open: AtomicUsize,
    /// Makes the next sync of the data file fail (tests of the failure path).
    #[cfg(test)]
    pub(super) fail_sync: AtomicBool,
}

impl BlobState {
    pub(super) fn key(&self) -> Key {
        Key {
            scope: self.scope,
            digest: self.digest.clone(),
            size: self.size,
        }
    }

    pub(super) fn is_verified(&self) -> bool {
        self.scope == Scope::Verified
    }

    pub(super) fn block_range(&self, b: u64) -> (u64, u64) {
        let start = b * self.block;
        (start, (start + self.block).min(self.size))
    }

    pub(super) fn block_len(&self, b: u64) -> u64 {
        let (s, e) = self.block_range(b);
        e - s
    }

    pub(super) fn meta(&self) -> Meta {
        Meta {
            scope: self.scope,
            digest: self.digest.clone(),
            size: self.size,
            block: self.block,
            nonce: self.nonce,
        }
    }

    pub(super) fn new_state(
        paths: (PathBuf, PathBuf),
        key: &Key,
        block: u64,
        nonce: [u8; 16],
        present: Vec<u64>,
    ) -> BlobState {
        let size = key.size;
        let nblocks = size.div_ceil(block);
        let words = nblocks.div_ceil(64) as usize;
        let mut present = present;
        present.resize(words, 0);
        // Bits past the last block mean nothing.
        if nblocks & 63 != 0 {
            if let Some(w) = present.last_mut() {
                *w &= (1u64 << (nblocks % 64)) - 1;
            }
        }
        let cached: u64 = (0..nblocks)
            .filter(|&b| present[(b / 64) as usize] & (1 << (b % 64)) != 0)
            .map(|b| ((b + 1) * block).min(size) - b * block)
            .sum();
        BlobState {
            scope: key.scope,
            digest: key.digest.clone(),
            size,
            block,
            nblocks,
            nonce,
            data_path: paths.0,
            map_path: paths.1,
            inner: Mutex::new(Inner {
                durable: present.clone(),
                pending: HashSet::new(),
                present,
                stamp: vec![0; nblocks as usize],
                inflight: HashMap::new(),
                files: None,
                dirty_gen: 0,
            }),
            punch: RwLock::new(()),
            persisted: Mutex::new(0),
            cached: AtomicU64::new(cached),
            open: AtomicUsize::new(0),
            #[cfg(test)]
            fail_sync: AtomicBool::new(false),
        }
    }

    /// Makes the files of a new, empty entry: data file (with its trailer) first, then (a
    /// verified entry, `sums` given) the block hashes (synced: a download's work), then the map.
    ///
    /// The data file and map are not synced: this runs under the cache's lock, once per layer
    /// a lazy image opens, and their syncs held a 20-layer image's opens in a row (attach
    /// 131 ms, 115 ms without them). A crash can leave the entry missing or torn, and
    /// [`BlobState::load`] drops such a set: a file cut short or empty, without its trailer, or
    /// holding another nonce than the map (a new data file beside an old map). Blocks are
    /// recorded in the map only after the data file is synced ([`BlobState::flush`]): a map
    /// that reached the disk never claims blocks its data file lacks, and an entry a crash
    /// lost is fetched again.
    pub(super) fn create(
        paths: (PathBuf, PathBuf),
        key: &Key,
        block: u64,
        sums: Option<&[[u8; 32]]>,
    ) -> Result<BlobState, CacheError> {
        let _ = fs::remove_file(&paths.1);
        let s = BlobState::new_state(paths, key, block, random_nonce(), Vec::new());
        let meta = s.meta();
        let trailer = meta.encode(DATA_MAGIC);
        write_new_file(
            &s.data_path,
            data_len(s.size),
            &[(round_up(s.size, META_LEN), &trailer)],
            false,
        )
        .map_err(|e| CacheError::io("writing", &s.data_path, e))?;
        let sums_file = sums_path(&s.map_path);
        match (s.is_verified(), sums) {
            (true, Some(sums)) if sums.len() as u64 == s.nblocks => {
                let mut body = meta.encode(SUMS_MAGIC);
                for sum in sums {
                    body.extend_from_slice(sum);
                }
                let check: [u8; 32] = Sha256::digest(&body).into();
                body.extend_from_slice(&check);
                write_new_file(&sums_file, body.len() as u64, &[(0, &body)], true)
                    .map_err(|e| CacheError::io("writing", &sums_file, e))?;
            }
            (false, None) => {}
            _ => return Err(CacheError::MisplacedSums { path: sums_file }),
        }
        let header = meta.encode(MAP_MAGIC);
        let bitmap = vec![0u8; bitmap_len(s.nblocks)];
        write_new_file(
            &s.map_path,
            META_LEN + bitmap.len() as u64,
            &[(0, &header), (META_LEN, &bitmap)],
            false,
        )
        .map_err(|e| CacheError::io("writing", &s.map_path, e))?;
        Ok(s)
    }

    /// Reads an entry from its files; an error (naming the file and offset) if they do not
    /// make a trustworthy set of the entry `key` (its scope, digest and size).
    pub(super) fn load(
        paths: (PathBuf, PathBuf),
        key: &Key,
        block: u64,
    ) -> Result<BlobState, CacheError> {
        let (data_path, map_path) = (&paths.0, &paths.1);
        let bad_map = |at: u64, why: String| CacheError::bad_record(map_path, at, why);
        // The header first: the map's length follows from it, and nothing larger is read.
        let map_file = File::open(map_path).map_err(|e| CacheError::io("opening", map_path, e))?;
        let mut header = vec![0u8; META_LEN as usize];
        map_file
            .read_exact_at(&mut header, 0)
            .map_err(|e| CacheError::io_at("reading", map_path, 0, e))?;
        let meta = Meta::decode(&header, MAP_MAGIC).map_err(|(at, why)| bad_map(at, why))?;
        if meta.digest != key.digest {
            return Err(bad_map(
                50,
                format!("records {}, not {} (its name)", meta.digest, key.digest),
            ));
        }
        if meta.scope != key.scope {
            return Err(bad_map(
                12,
                "records another scope than its directory's".into(),
            ));
        }
        if meta.size != key.size {
            return Err(bad_map(
                24,
                format!("records {} bytes, its name {}", meta.size, key.size),
            ));
        }
        if meta.block != block {
            return Err(bad_map(
                16,
                format!("block size {} is not the configured {block}", meta.block),
            ));
        }
        if meta.size > MAX_BLOB_SIZE {
            return Err(bad_map(
                24,
                format!(
                    "{} bytes: larger than the cache takes ({MAX_BLOB_SIZE})",
                    meta.size
                ),
            ));
        }
        let nblocks = meta.size.div_ceil(block);
        let map_len = map_file
            .metadata()
            .map_err(|e| CacheError::io("reading the metadata of", map_path, e))?
            .len();
        let want = META_LEN + bitmap_len(nblocks) as u64;
        if map_len != want {
            return Err(bad_map(
                META_LEN,
                format!("{map_len} bytes, not the {want} of a map of {nblocks} blocks"),
            ));
        }
        let mut bits = vec![0u8; bitmap_len(nblocks)];
        map_file
            .read_exact_at(&mut bits, META_LEN)
            .map_err(|e| CacheError::io_at("reading", map_path, META_LEN, e))?;
        let data = File::open(data_path).map_err(|e| CacheError::io("opening", data_path, e))?;
        let data_size = data
            .metadata()
            .map_err(|e| CacheError::io("reading the metadata of", data_path, e))?
            .len();
        let trailer_at = round_up(meta.size, META_LEN);
        if data_size != data_len(meta.size) {
            return Err(CacheError::bad_record(
                data_path,
                trailer_at,
                format!(
                    "{data_size} bytes, not the {} its record says (truncated or extended)",
                    data_len(meta.size)
                ),
            ));
        }
        let mut trailer = vec![0u8; META_LEN as usize];
        data.read_exact_at(&mut trailer, trailer_at)
            .map_err(|e| CacheError::io_at("reading", data_path, trailer_at, e))?;
        let bad_trailer = |at: u64, why: String| CacheError::bad_record(data_path, at, why);
        let found = Meta::decode(&trailer, DATA_MAGIC)
            .map_err(|(at, why)| bad_trailer(trailer_at + at, format!("trailer: {why}")))?;
        if found != meta {
            return Err(bad_trailer(
                trailer_at,
                "trailer is not its map's (the data file was made anew)".into(),
            ));
        }
        if meta.scope == Scope::Verified {
            check_sums(&sums_path(map_path), &meta, nblocks)?;
        }
        let mut present = vec![0u64; nblocks.div_ceil(64) as usize];
        for (i, byte) in bits.iter().enumerate() {
            present[i / 8] |= (*byte as u64) << ((i % 8) * 8);
        }
        Ok(BlobState::new_state(paths, key, block, meta.nonce, present))
    }

    /// Opens the files, checking that they are still this state's (not made anew since).
    pub(super) fn open_files(&self) -> Result<Files, CacheError> {
        let rw = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| CacheError::io("opening", p, e))
        };
        // Whether the header of `f` (at `path`) is still this state's.
        let check = |f: &File, path: &Path, magic: &[u8; 8]| {
            let mut header = vec![0u8; META_LEN as usize];
            f.read_exact_at(&mut header, 0)
                .map_err(|e| CacheError::io_at("reading", path, 0, e))?;
            if Meta::decode(&header, magic).ok() != Some(self.meta()) {
                return Err(CacheError::Replaced {
                    path: path.to_owned(),
                });
            }
            Ok(())
        };
        let sums = if self.is_verified() {
            let path = sums_path(&self.map_path);
            let f = File::open(&path).map_err(|e| CacheError::io("opening", &path, e))?;
            check(&f, &path, SUMS_MAGIC)?;
            Some(f)
        } else {
            None
        };
        let files = Files {
            data: rw(&self.data_path)?,
            map: rw(&self.map_path)?,
            sums,
        };
        check(&files.map, &self.map_path, MAP_MAGIC)?;
        Ok(files)
    }

    /// The open files, or freshly opened ones (kept if `keep`).
    pub(super) fn files(&self, keep: bool) -> Result<Arc<Files>, CacheError> {
        let mut inner = lock(&self.inner);
        if let Some(f) = &inner.files {
            return Ok(f.clone());
        }
        let f = Arc::new(self.open_files()?);
        if keep {
            inner.files = Some(f.clone());
        }
        Ok(f)
    }

    /// Syncs the data of the blocks written since the last flush, then records them in the
    /// map (a block goes into the map only once its data is on disk). If the sync fails the
    /// blocks are dropped (and `total`, the cache's byte count, lowered).
    pub(super) fn flush(&self, total: &AtomicU64) -> Result<(), CacheError> {
        let taken: Vec<u64> = {
            let mut inner = lock(&self.inner);
            let taken = std::mem::take(&mut inner.pending);
            // Evicted meanwhile: nothing to record (the files may even be gone).
            taken.into_iter().filter(|&b| inner.is_present(b)).collect()
        };
        if taken.is_empty() {
            return Ok(());
        }
        let synced = self.files(false).and_then(|files| {
            self.sync_data(&files.data)
                .map_err(|e| CacheError::io("syncing", &self.data_path, e))?;
            Ok(files)
        });
        let files = match synced {
            Ok(f) => f,
            Err(e) => {
                // Not again next time: Linux reports a writeback error once and marks the pages
                // clean, so a later sync would succeed over lost data. Fetched again if read.
                let mut dropped = 0;
                {
                    let mut inner = lock(&self.inner);
                    for b in taken {
                        // Being evicted: gone anyway. Written again since: that write may
                        // have been lost too.
                        if inner.is_present(b) && !inner.inflight.contains_key(&b) {
                            set_bit(&mut inner.present, b, false);
                            inner.pending.remove(&b);
                            dropped += self.block_len(b);
                        }
                    }
                }
                self.cached.fetch_sub(dropped, Relaxed);
                total.fetch_sub(dropped, Relaxed);
                return Err(e);
            }
        };
        {
            let mut inner = lock(&self.inner);
            let mut changed = false;
            for b in taken {
                // Evicted since, or being evicted, or written again after the sync began
                // (then it is pending again): not this time.
                if inner.is_present(b)
                    && !inner.inflight.contains_key(&b)
                    && !inner.pending.contains(&b)
                {
                    set_bit(&mut inner.durable, b, true);
                    changed = true;
                }
            }
            if changed {
                inner.dirty_gen += 1;
            }
        }
        self.persist(&files)
    }

    /// `fdatasync` of the data file.
    pub(super) fn sync_data(&self, data: &File) -> io::Result<()> {
        #[cfg(test)]
        if self.fail_sync.swap(false, Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        data.sync_data()
    }

    /// Writes the map's bitmap as of now and syncs it (if a later write has not already).
    pub(super) fn persist(&self, files: &Files) -> Result<(), CacheError> {
        let mut persisted = lock(&self.persisted);
        let (generation, bytes) = {
            let inner = lock(&self.inner);
            if inner.dirty_gen <= *persisted {
                return Ok(());
            }
            (inner.dirty_gen, inner.bitmap_bytes(self.nblocks))
        };
        files
            .map
            .write_all_at(&bytes, META_LEN)
            .map_err(|e| CacheError::io_at("writing", &self.map_path, META_LEN, e))?;
        files
            .map
            .sync_data()
            .map_err(|e| CacheError::io("syncing", &self.map_path, e))?;
        *persisted = generation;
        Ok(())
    }
}
