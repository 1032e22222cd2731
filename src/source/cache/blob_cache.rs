//! The cache as a whole ([`BlobCache`]): its directory (locked), the entries found there at
//! start, the entry a reader gets, flushing and counters.

use super::error::CacheError;
use super::flusher::Flusher;
use super::lock;
use super::record::*;
use super::state::BlobState;
use super::MAX_BLOB_SIZE;
use crate::config::CacheConfig;
use crate::oci::digest::hex;
use crate::oci::digest::valid_digest;
use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Eviction goes down to this share of the limit, so that it does not run on every fill.
pub(super) const LOW_WATER_PERCENT: u64 = 90;
/// Written blocks are synced and recorded in batches, this long after the first of a batch.
pub(super) const FLUSH_DELAY: Duration = Duration::from_secs(1);

/// The block cache: a directory and a size limit, shared by all devices. Send + Sync.
pub struct BlobCache {
    pub(super) dir: PathBuf,
    pub(super) limit: u64,
    pub(super) low_water: u64,
    pub(super) block: u64,
    /// Blobs of at most this many bytes are fetched whole on their first miss.
    pub(super) whole_blob: u64,
    pub(super) blobs: Mutex<HashMap<Key, Arc<BlobState>>>,
    /// Bytes of present blocks, all entries (shared with the flusher).
    pub(super) total: Arc<AtomicU64>,
    pub(super) clock: AtomicU64,
    pub(super) evicting: Mutex<()>,
    pub(super) hits: AtomicU64,
    /// Reads served from present blocks only, and reads that fetched some (since open).
    pub(super) hit_reads: AtomicU64,
    pub(super) miss_reads: AtomicU64,
    pub(super) fetched: AtomicU64,
    pub(super) evicted: AtomicU64,
    pub(super) punch_warned: AtomicBool,
    /// One verified entry made at a time.
    pub(super) verifying: Mutex<()>,
    pub(super) flusher: Flusher,
    /// Runs once, in the next eviction pass, between choosing its blocks and evicting them
    /// (tests of what readers do meanwhile).
    #[cfg(test)]
    pub(super) mid_eviction: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Holds the directory's flock.
    pub(super) _lock: File,
}

impl Drop for BlobCache {
    fn drop(&mut self) {
        // What was written is synced and recorded before the directory is let go.
        self.flusher.stop();
    }
}

impl fmt::Debug for BlobCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobCache")
            .field("dir", &self.dir)
            .field("limit", &self.limit)
            .field("block", &self.block)
            .field("cached", &self.total.load(Relaxed))
            .finish_non_exhaustive()
    }
}

/// A snapshot of the cache's counters (the daemon's metrics and `ovbd status`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct CacheStats {
    pub dir: PathBuf,
    pub limit_bytes: u64,
    pub block_bytes: u64,
    /// Bytes of present blocks, all blobs.
    pub cached_bytes: u64,
    /// Bytes served from the cache (since open).
    pub hit_bytes: u64,
    /// Reads served from the cache alone, and reads that fetched blocks (since open).
    pub hit_reads: u64,
    pub miss_reads: u64,
    /// Bytes fetched into the cache (since open).
    pub fetched_bytes: u64,
    /// Bytes evicted (since open).
    pub evicted_bytes: u64,
    pub blobs: Vec<BlobStats>,
}

#[allow(dead_code)]
#[derive(Clone, Debug, serde::Serialize)]
pub struct BlobStats {
    pub digest: String,
    pub size: u64,
    /// Shared by every origin (checked against the digest), or one origin's.
    pub verified: bool,
    pub cached_bytes: u64,
    /// Disk space the data file takes (allocated blocks).
    pub disk_bytes: u64,
    /// Whether a [`CachedBlob`](super::CachedBlob) has it open.
    pub open: bool,
}

impl BlobCache {
    /// Opens (creating it if needed) the cache at `cfg.dir`, else `default_dir`; reads what
    /// an earlier run left there, dropping whatever cannot be trusted.
    pub fn open(cfg: &CacheConfig, default_dir: &Path) -> Result<Arc<BlobCache>, CacheError> {
        Self::open_with(cfg, default_dir, FLUSH_DELAY)
    }

    /// As [`BlobCache::open`], written blocks synced and recorded `flush_delay` after the
    /// first of a batch.
    pub(crate) fn open_with(
        cfg: &CacheConfig,
        default_dir: &Path,
        flush_delay: Duration,
    ) -> Result<Arc<BlobCache>, CacheError> {
        cfg.validate()
            .map_err(|e| CacheError::Config(format!("{e:#}")))?;
        let dir = cfg.dir.clone().unwrap_or_else(|| default_dir.to_path_buf());
        fs::create_dir_all(&dir).map_err(|e| CacheError::io("creating", &dir, e))?;
        let lock_path = dir.join(".lock");
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| CacheError::io("opening", &lock_path, e))?;
        // SAFETY: flock on a valid fd.
        if unsafe { libc::flock(lock_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(CacheError::Busy {
                dir,
                source: io::Error::last_os_error(),
            });
        }
        let block = cfg.refill_bytes();
        let limit = cfg.size_bytes().max(1);
        let total = Arc::new(AtomicU64::new(0));
        let cache = Arc::new(BlobCache {
            dir: dir.clone(),
            limit,
            low_water: limit / 100 * LOW_WATER_PERCENT,
            block,
            whole_blob: cfg.whole_blob_bytes(),
            blobs: Mutex::new(HashMap::new()),
            total: total.clone(),
            clock: AtomicU64::new(0),
            evicting: Mutex::new(()),
            hits: AtomicU64::new(0),
            hit_reads: AtomicU64::new(0),
            miss_reads: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            punch_warned: AtomicBool::new(false),
            verifying: Mutex::new(()),
            flusher: Flusher::start(flush_delay, total)
                .map_err(|e| CacheError::io("starting the flusher thread of", &dir, e))?,
            #[cfg(test)]
            mid_eviction: Mutex::new(None),
            _lock: lock_file,
        });
        cache.scan()?;
        log::info!(
            "block cache {}: {} blob(s), {} bytes cached, limit {limit}, block {block}",
            dir.display(),
            lock(&cache.blobs).len(),
            cache.total.load(Relaxed)
        );
        cache.maybe_evict();
        Ok(cache)
    }

    pub(super) fn paths(&self, key: &Key) -> (PathBuf, PathBuf) {
        entry_paths(&self.dir, key)
    }

    /// Loads every entry left by an earlier run; removes temporary files, orphans, records
    /// that do not check out and the files of earlier versions.
    pub(super) fn scan(&self) -> Result<(), CacheError> {
        for algo in ["sha256", "sha512"] {
            // Version 1: one entry per digest for every origin; nothing says whose bytes.
            let old = self.dir.join(algo);
            if old.is_dir() {
                log::info!(
                    "block cache: deleting {}, left by an earlier version",
                    old.display()
                );
                // Never read either way: what cannot be deleted is left alone.
                if let Err(e) = fs::remove_dir_all(&old) {
                    log::warn!("block cache: removing {}: {e}", old.display());
                }
            }
        }
        self.scan_scope(Scope::Verified)?;
        let origins = self.dir.join("origin");
        let entries = match fs::read_dir(&origins) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(CacheError::io("reading", &origins, e)),
        };
        for e in entries {
            let e = e.map_err(|e| CacheError::io("reading", &origins, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let hash = (name.len() == 64)
                .then(|| {
                    (0..32)
                        .map(|i| u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok())
                        .collect::<Option<Vec<u8>>>()
                })
                .flatten()
                .and_then(|v| <[u8; 32]>::try_from(v).ok());
            // Only names this version makes (lowercase hex) are read; anything else is left.
            match hash {
                Some(h) if hex(&h) == name => self.scan_scope(Scope::Origin(h))?,
                _ => continue,
            }
            let _ = fs::remove_dir(e.path());
        }
        Ok(())
    }

    /// Loads the entries of one scope (see [`BlobCache::scan`]).
    pub(super) fn scan_scope(&self, scope: Scope) -> Result<(), CacheError> {
        for algo in ["sha256", "sha512"] {
            let probe = Key {
                scope,
                digest: format!("{algo}:x"),
                size: 0,
            };
            let Some(d) = self.paths(&probe).1.parent().map(Path::to_path_buf) else {
                continue;
            };
            let entries = match fs::read_dir(&d) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(CacheError::io("reading", &d, e)),
            };
            let mut names = Vec::new();
            for e in entries {
                let e = e.map_err(|e| CacheError::io("reading", &d, e))?;
                names.push(e.file_name().to_string_lossy().into_owned());
            }
            for name in &names {
                let path = d.join(name);
                if name.starts_with(".tmp-") {
                    let _ = fs::remove_file(&path);
                    continue;
                }
                let Some((stem, ext)) = name.rsplit_once('.') else {
                    continue;
                };
                let Some((hex_digest, size)) = stem.split_once('-') else {
                    continue;
                };
                let digest = format!("{algo}:{hex_digest}");
                // Only the names this version makes (a size in decimal, as written).
                let size = match size.parse::<u64>() {
                    Ok(v) if v.to_string() == size && valid_digest(&digest) => v,
                    _ => continue,
                };
                let key = Key {
                    scope,
                    digest,
                    size,
                };
                let paths = self.paths(&key);
                match ext {
                    "map" => match BlobState::load(paths.clone(), &key, self.block) {
                        Ok(s) => {
                            self.total.fetch_add(s.cached.load(Relaxed), Relaxed);
                            lock(&self.blobs).insert(key, Arc::new(s));
                        }
                        Err(e) => {
                            log::warn!(
                                "block cache: dropping the cache of {} ({size} bytes): {e}",
                                key.digest
                            );
                            let _ = fs::remove_file(&paths.1);
                            let _ = fs::remove_file(&paths.0);
                            let _ = fs::remove_file(sums_path(&paths.1));
                        }
                    },
                    "data" | "sums" if !paths.1.exists() => {
                        let _ = fs::remove_file(&path);
                    }
                    _ => {}
                }
            }
            let _ = fs::remove_dir(&d);
        }
        Ok(())
    }

    /// The entry a reader from `origin` gets for `digest` at `size`: the verified one if the
    /// digest has one (an image that claims another size for it gets an error), else the
    /// origin's own; made (with empty files) if new or unusable, its open count incremented
    /// (under the lock that keeps [`BlobCache::drop_empty_closed`] away).
    pub(super) fn open_state(
        &self,
        origin: &str,
        digest: &str,
        size: u64,
    ) -> Result<Arc<BlobState>, CacheError> {
        if size > MAX_BLOB_SIZE {
            return Err(CacheError::TooLarge {
                what: format!("blob {digest}"),
                size,
            });
        }
        let mut blobs = lock(&self.blobs);
        let verified = blobs
            .iter()
            .find(|(k, _)| k.scope == Scope::Verified && k.digest == digest)
            .map(|(k, s)| (k.clone(), s.clone()));
        if let Some((k, s)) = verified {
            if s.open.load(Relaxed) > 0 || s.data_path.exists() {
                if k.size != size {
                    return Err(CacheError::SizeLie {
                        digest: digest.to_owned(),
                        origin: origin.to_owned(),
                        claimed: size,
                        verified: k.size,
                    });
                }
                s.open.fetch_add(1, Relaxed);
                return Ok(s);
            }
            // Its files are gone: the origin's own entry serves.
            self.total.fetch_sub(s.cached.load(Relaxed), Relaxed);
            blobs.remove(&k);
        }
        let key = Key {
            scope: Scope::of_origin(origin),
            digest: digest.to_owned(),
            size,
        };
        if let Some(s) = blobs.get(&key) {
            if s.open.load(Relaxed) > 0 || s.data_path.exists() {
                s.open.fetch_add(1, Relaxed);
                return Ok(s.clone());
            }
            // Files gone: start again.
            self.total.fetch_sub(s.cached.load(Relaxed), Relaxed);
            blobs.remove(&key);
        }
        let paths = self.paths(&key);
        let dir = paths.1.parent().map(Path::to_path_buf).unwrap_or_default();
        fs::create_dir_all(&dir).map_err(|e| CacheError::io("creating", &dir, e))?;
        let s = Arc::new(BlobState::create(paths, &key, self.block, None)?);
        s.open.fetch_add(1, Relaxed);
        blobs.insert(key, s.clone());
        Ok(s)
    }

    /// Syncs every block written so far and records it in its map (done in the background
    /// about a second after a write anyway, and when a blob's last handle or the cache is
    /// dropped). Blocks not flushed when the process dies are lost, never wrong.
    #[allow(dead_code)] // API for the daemon's shutdown
    pub fn flush(&self) -> Result<(), CacheError> {
        let blobs: Vec<Arc<BlobState>> = lock(&self.blobs).values().cloned().collect();
        let mut first_err = None;
        for s in blobs {
            if let Err(e) = s.flush(&self.total) {
                first_err.get_or_insert(CacheError::Sync {
                    digest: s.digest.clone(),
                    source: Box::new(e),
                });
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Per-blob and overall counters.
    pub fn stats(&self) -> CacheStats {
        use std::os::unix::fs::MetadataExt as _;
        let mut blobs: Vec<BlobStats> = lock(&self.blobs)
            .values()
            .map(|s| BlobStats {
                digest: s.digest.clone(),
                size: s.size,
                verified: s.is_verified(),
                cached_bytes: s.cached.load(Relaxed),
                disk_bytes: fs::metadata(&s.data_path)
                    .map(|m| m.blocks() * 512)
                    .unwrap_or(0),
                open: s.open.load(Relaxed) > 0,
            })
            .collect();
        blobs.sort_by(|a, b| (&a.digest, a.size, a.verified).cmp(&(&b.digest, b.size, b.verified)));
        CacheStats {
            dir: self.dir.clone(),
            limit_bytes: self.limit,
            block_bytes: self.block,
            cached_bytes: self.total.load(Relaxed),
            hit_bytes: self.hits.load(Relaxed),
            hit_reads: self.hit_reads.load(Relaxed),
            miss_reads: self.miss_reads.load(Relaxed),
            fetched_bytes: self.fetched.load(Relaxed),
            evicted_bytes: self.evicted.load(Relaxed),
            blobs,
        }
    }
}
