//! The on-disk block cache in front of registry blobs (lazy pulling).
//!
//! A blob is cached in refill blocks (`[cache] refill_kb`, default 256 KiB): a read is rounded
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
//! requests, one per run, long runs split). A block claimed by one reader is waited for by any
//! other reader (of any [`CachedBlob`] of the same entry): never two fetches of one block.
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

use crate::config::CacheConfig;
use crate::registry::{valid_digest, RemoteBlob};
use anyhow::{anyhow, bail, Context};
use sha2::{Digest as _, Sha256, Sha512};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

const MAP_MAGIC: &[u8; 8] = b"OVBDCMAP";
const DATA_MAGIC: &[u8; 8] = b"OVBDCDAT";
const SUMS_MAGIC: &[u8; 8] = b"OVBDCSUM";
/// 2: entries per origin and verified entries (1 had one entry per digest for every origin).
const VERSION: u32 = 2;
/// Bytes of one block hash in a `.sums` file.
const SUM_LEN: u64 = 32;
/// Header of a map file and trailer of a data file.
const META_LEN: u64 = 4096;
/// The largest blob the cache takes (1 TiB): sizes come from image descriptors, and a blob's
/// per-block state is kept in memory.
pub const MAX_BLOB_SIZE: u64 = 1 << 40;
/// Rounds of "serve what is there, fetch what is missing, wait for the others" before a read
/// gives up on the cache and reads the rest straight from the registry (only under heavy
/// eviction churn).
const MAX_ROUNDS: usize = 4;
/// Eviction goes down to this share of the limit, so that it does not run on every fill.
const LOW_WATER_PERCENT: u64 = 90;
/// Written blocks are synced and recorded in batches, this long after the first of a batch.
const FLUSH_DELAY: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its state consistent before anything can panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ------------------------------------------------------------------------------ block sources

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

// ---------------------------------------------------------------------------------- scopes

/// Whose bytes an entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Scope {
    /// Fetched from one origin (the sha256 of its normalized `host/repo`), served to it only.
    Origin([u8; 32]),
    /// Checked block by block against hashes taken from a download that matched the digest.
    // An entry of its own, not the downloaded file: that goes with its layer's snapshot, and
    // block hashes let any origin refill evicted blocks safely.
    Verified,
}

impl Scope {
    /// The scope of `origin` (`host[:port]/repo`; the host is case-insensitive).
    fn of_origin(origin: &str) -> Scope {
        let o = origin.trim();
        let normalized = match o.split_once('/') {
            Some((host, repo)) => format!("{}/{repo}", host.to_ascii_lowercase()),
            None => o.to_ascii_lowercase(),
        };
        Scope::Origin(Sha256::digest(normalized.as_bytes()).into())
    }
}

/// One cache entry: a blob as one scope has it, at the size an image claims for it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    scope: Scope,
    digest: String,
    size: u64,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

// ------------------------------------------------------------------------------ on-disk meta

/// What a map header or data trailer says.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Meta {
    scope: Scope,
    digest: String,
    size: u64,
    block: u64,
    nonce: [u8; 16],
}

impl Meta {
    fn encode(&self, magic: &[u8; 8]) -> Vec<u8> {
        let mut b = vec![0u8; META_LEN as usize];
        b[0..8].copy_from_slice(magic);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        if let Scope::Origin(h) = self.scope {
            b[12] = 1;
            b[192..224].copy_from_slice(&h);
        }
        b[16..24].copy_from_slice(&self.block.to_le_bytes());
        b[24..32].copy_from_slice(&self.size.to_le_bytes());
        b[32..48].copy_from_slice(&self.nonce);
        let d = self.digest.as_bytes();
        // Digests are checked to be at most 7 + 128 bytes long.
        b[48..50].copy_from_slice(&(d.len() as u16).to_le_bytes());
        b[50..50 + d.len()].copy_from_slice(d);
        let crc = ovbd_format::crc::crc32c_raw(0, &b[..META_LEN as usize - 4]);
        b[META_LEN as usize - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8], magic: &[u8; 8]) -> Option<Meta> {
        if b.len() < META_LEN as usize || &b[0..8] != magic {
            return None;
        }
        let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
        let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
        let crc = u32_at(META_LEN as usize - 4)?;
        if crc != ovbd_format::crc::crc32c_raw(0, &b[..META_LEN as usize - 4])
            || u32_at(8)? != VERSION
        {
            return None;
        }
        let dlen = u16::from_le_bytes(b.get(48..50)?.try_into().ok()?) as usize;
        let digest = std::str::from_utf8(b.get(50..50 + dlen)?).ok()?.to_owned();
        let scope = match b[12] {
            0 => Scope::Verified,
            1 => Scope::Origin(b.get(192..224)?.try_into().ok()?),
            _ => return None,
        };
        Some(Meta {
            scope,
            digest,
            block: u64_at(16)?,
            size: u64_at(24)?,
            nonce: b.get(32..48)?.try_into().ok()?,
        })
    }
}

fn random_nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    // SAFETY: writes at most 16 bytes into `n`.
    let got = unsafe { libc::getrandom(n.as_mut_ptr().cast(), n.len(), 0) };
    if got != n.len() as isize {
        // Not cryptographic, only distinct: time, pid and a counter.
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        n[..8].copy_from_slice(&t.to_le_bytes());
        let c = COUNTER.fetch_add(1, Relaxed) ^ ((std::process::id() as u64) << 32);
        n[8..].copy_from_slice(&c.to_le_bytes());
    }
    n
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// Length of a data file for a blob of `size` bytes: data, then the trailer.
fn data_len(size: u64) -> u64 {
    round_up(size, META_LEN) + META_LEN
}

fn bitmap_len(nblocks: u64) -> usize {
    nblocks.div_ceil(8) as usize
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `bytes` (and sets the length to `len`) to a synced temporary file renamed to `path`.
fn write_new_file(path: &Path, len: u64, writes: &[(u64, &[u8])]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("x");
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    let r = (|| {
        f.set_len(len)?;
        for (off, b) in writes {
            f.write_all_at(b, *off)?;
        }
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

fn punch_hole(f: &File, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a valid fd; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The data and map file of an entry in the cache at `dir` (`key.digest` is valid: `algo:hex`,
/// both safe in file names; a scope is a fixed name or hex).
fn entry_paths(dir: &Path, key: &Key) -> (PathBuf, PathBuf) {
    let (algo, hex_digest) = key
        .digest
        .split_once(':')
        .unwrap_or(("sha256", &key.digest));
    let d = match key.scope {
        Scope::Origin(h) => dir.join("origin").join(hex(&h)),
        Scope::Verified => dir.join("verified"),
    }
    .join(algo);
    let stem = format!("{hex_digest}-{}", key.size);
    (
        d.join(format!("{stem}.data")),
        d.join(format!("{stem}.map")),
    )
}

/// The block hashes of a verified entry, next to its map.
fn sums_path(map: &Path) -> PathBuf {
    map.with_extension("sums")
}

/// Whether the `.sums` file at `path` is whole and belongs to the entry `meta` describes.
fn sums_intact(path: &Path, meta: &Meta, nblocks: u64) -> bool {
    let check = || -> io::Result<bool> {
        let f = File::open(path)?;
        let body_len = META_LEN + nblocks * SUM_LEN;
        if f.metadata()?.len() != body_len + SUM_LEN {
            return Ok(false);
        }
        let mut header = vec![0u8; META_LEN as usize];
        f.read_exact_at(&mut header, 0)?;
        if Meta::decode(&header, SUMS_MAGIC).as_ref() != Some(meta) {
            return Ok(false);
        }
        // Streamed: the file has one hash per block, which can be many.
        let mut h = Sha256::new_with_prefix(&header);
        let mut buf = vec![0u8; 1 << 20];
        let mut off = META_LEN;
        while off < body_len {
            let n = (body_len - off).min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..n], off)?;
            h.update(&buf[..n]);
            off += n as u64;
        }
        let mut want = [0u8; 32];
        f.read_exact_at(&mut want, body_len)?;
        Ok(h.finalize()[..] == want)
    };
    check().unwrap_or(false)
}

/// For the fuzz target ([`crate::fuzzing`]): the data, map and sums paths of an entry
/// (`origin` `None`: verified).
pub(crate) fn sample_paths(
    dir: &Path,
    origin: Option<&str>,
    digest: &str,
    size: u64,
) -> (PathBuf, PathBuf, PathBuf) {
    let key = Key {
        scope: origin.map_or(Scope::Verified, Scope::of_origin),
        digest: digest.to_owned(),
        size,
    };
    let (data, map) = entry_paths(dir, &key);
    let sums = sums_path(&map);
    (data, map, sums)
}

/// For the fuzz seeds ([`crate::fuzzing`]): the files of one entry under `dir` as a clean stop
/// leaves them (`origin` `None`: a verified entry), blocks `present` written (0x5a) and
/// recorded. Returns the data, map and (verified entries) sums paths.
pub(crate) fn write_sample(
    dir: &Path,
    origin: Option<&str>,
    digest: &str,
    size: u64,
    block: u64,
    present: &[u64],
) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    anyhow::ensure!(valid_digest(digest), "{digest:?} is not a digest");
    let key = Key {
        scope: origin.map_or(Scope::Verified, Scope::of_origin),
        digest: digest.to_owned(),
        size,
    };
    let paths = entry_paths(dir, &key);
    if let Some(d) = paths.1.parent() {
        fs::create_dir_all(d)?;
    }
    let sums = origin.is_none().then(|| {
        let nblocks = size.div_ceil(block);
        (0..nblocks)
            .map(|b| {
                let len = ((b + 1) * block).min(size) - b * block;
                Sha256::digest(vec![0x5a; len as usize]).into()
            })
            .collect::<Vec<[u8; 32]>>()
    });
    let s = BlobState::create(paths.clone(), &key, block, sums.as_deref())?;
    let files = s.open_files()?;
    for &b in present.iter().filter(|&&b| b < s.nblocks) {
        let (start, end) = s.block_range(b);
        files
            .data
            .write_all_at(&vec![0x5a; (end - start) as usize], start)?;
        let mut inner = lock(&s.inner);
        set_bit(&mut inner.present, b, true);
        set_bit(&mut inner.durable, b, true);
        inner.dirty_gen += 1;
    }
    s.persist(&files)?;
    let sums = sums_path(&paths.1);
    Ok((paths.0, paths.1, sums))
}

// -------------------------------------------------------------------------------- blob state

/// A block being fetched or evicted: readers of it wait for the outcome.
struct Flight {
    done: Mutex<Option<Result<(), (io::ErrorKind, String)>>>,
    cv: Condvar,
}

impl Flight {
    fn new() -> Arc<Flight> {
        Arc::new(Flight {
            done: Mutex::new(None),
            cv: Condvar::new(),
        })
    }
    fn complete(&self, r: Result<(), (io::ErrorKind, String)>) {
        let mut d = lock(&self.done);
        if d.is_none() {
            *d = Some(r);
        }
        self.cv.notify_all();
    }
    fn wait(&self) -> Result<(), (io::ErrorKind, String)> {
        let mut d = lock(&self.done);
        loop {
            if let Some(r) = d.as_ref() {
                return r.clone();
            }
            d = self.cv.wait(d).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct Files {
    data: File,
    map: File,
    /// A verified entry's block hashes.
    sums: Option<File>,
}

struct Inner {
    /// Blocks that may be served (written to the data file), one bit each.
    present: Vec<u64>,
    /// Blocks whose data is synced: what the on-disk map may say. A subset of `present`.
    durable: Vec<u64>,
    /// Present blocks written since the last flush, not yet synced.
    pending: HashSet<u64>,
    /// Last access (the cache's clock) of each block.
    stamp: Vec<u64>,
    /// Blocks being fetched or evicted.
    inflight: HashMap<u64, Arc<Flight>>,
    /// Open while a [`CachedBlob`] is.
    files: Option<Arc<Files>>,
    /// Bumped on every change of `durable`.
    dirty_gen: u64,
}

fn get_bit(bits: &[u64], b: u64) -> bool {
    bits.get((b / 64) as usize)
        .is_some_and(|w| w & (1 << (b % 64)) != 0)
}

fn set_bit(bits: &mut [u64], b: u64, on: bool) {
    if let Some(w) = bits.get_mut((b / 64) as usize) {
        if on {
            *w |= 1 << (b % 64);
        } else {
            *w &= !(1 << (b % 64));
        }
    }
}

impl Inner {
    fn is_present(&self, b: u64) -> bool {
        get_bit(&self.present, b)
    }
    /// The present blocks, in order: the set bits, found word by word (a large sparse blob
    /// costs its number of words, not of blocks).
    fn present_blocks(&self) -> impl Iterator<Item = u64> + '_ {
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
    fn bitmap_bytes(&self, nblocks: u64) -> Vec<u8> {
        let mut out: Vec<u8> = self.durable.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate(bitmap_len(nblocks));
        out
    }
}

/// One entry's cache: shared by every [`CachedBlob`] of its scope, digest and size.
struct BlobState {
    scope: Scope,
    digest: String,
    size: u64,
    block: u64,
    nblocks: u64,
    nonce: [u8; 16],
    data_path: PathBuf,
    map_path: PathBuf,
    inner: Mutex<Inner>,
    /// Readers of the data file hold it shared; punching a hole holds it exclusively.
    punch: RwLock<()>,
    /// Serialises bitmap writes; the generation last made durable.
    persisted: Mutex<u64>,
    cached: AtomicU64,
    open: AtomicUsize,
    /// Makes the next sync of the data file fail (tests of the failure path).
    #[cfg(test)]
    fail_sync: AtomicBool,
}

impl BlobState {
    fn key(&self) -> Key {
        Key {
            scope: self.scope,
            digest: self.digest.clone(),
            size: self.size,
        }
    }

    fn is_verified(&self) -> bool {
        self.scope == Scope::Verified
    }

    fn block_range(&self, b: u64) -> (u64, u64) {
        let start = b * self.block;
        (start, (start + self.block).min(self.size))
    }

    fn block_len(&self, b: u64) -> u64 {
        let (s, e) = self.block_range(b);
        e - s
    }

    fn meta(&self) -> Meta {
        Meta {
            scope: self.scope,
            digest: self.digest.clone(),
            size: self.size,
            block: self.block,
            nonce: self.nonce,
        }
    }

    fn new_state(
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
    /// verified entry, `sums` given) the block hashes, then the map.
    fn create(
        paths: (PathBuf, PathBuf),
        key: &Key,
        block: u64,
        sums: Option<&[[u8; 32]]>,
    ) -> io::Result<BlobState> {
        let _ = fs::remove_file(&paths.1);
        let s = BlobState::new_state(paths, key, block, random_nonce(), Vec::new());
        let meta = s.meta();
        let trailer = meta.encode(DATA_MAGIC);
        write_new_file(
            &s.data_path,
            data_len(s.size),
            &[(round_up(s.size, META_LEN), &trailer)],
        )?;
        match (s.is_verified(), sums) {
            (true, Some(sums)) if sums.len() as u64 == s.nblocks => {
                let mut body = meta.encode(SUMS_MAGIC);
                for sum in sums {
                    body.extend_from_slice(sum);
                }
                let check: [u8; 32] = Sha256::digest(&body).into();
                body.extend_from_slice(&check);
                write_new_file(&sums_path(&s.map_path), body.len() as u64, &[(0, &body)])?;
            }
            (false, None) => {}
            _ => {
                return Err(io::Error::other(format!(
                    "{}: block hashes go with verified entries, one per block",
                    s.map_path.display()
                )))
            }
        }
        let header = meta.encode(MAP_MAGIC);
        let bitmap = vec![0u8; bitmap_len(s.nblocks)];
        write_new_file(
            &s.map_path,
            META_LEN + bitmap.len() as u64,
            &[(0, &header), (META_LEN, &bitmap)],
        )?;
        if let Some(dir) = s.map_path.parent() {
            sync_dir(dir);
        }
        Ok(s)
    }

    /// Reads an entry from its files; `None` if they do not make a trustworthy set (of the
    /// entry `key`: its scope, digest and size).
    fn load(paths: (PathBuf, PathBuf), key: &Key, block: u64) -> Option<BlobState> {
        // The header first: the map's length follows from it, and nothing larger is read.
        let map_file = File::open(&paths.1).ok()?;
        let mut header = vec![0u8; META_LEN as usize];
        map_file.read_exact_at(&mut header, 0).ok()?;
        let meta = Meta::decode(&header, MAP_MAGIC)?;
        if meta.digest != key.digest
            || meta.scope != key.scope
            || meta.size != key.size
            || meta.block != block
            || meta.size > MAX_BLOB_SIZE
        {
            return None;
        }
        let nblocks = meta.size.div_ceil(block);
        if map_file.metadata().ok()?.len() != META_LEN + bitmap_len(nblocks) as u64 {
            return None;
        }
        let mut bits = vec![0u8; bitmap_len(nblocks)];
        map_file.read_exact_at(&mut bits, META_LEN).ok()?;
        let data = File::open(&paths.0).ok()?;
        if data.metadata().ok()?.len() != data_len(meta.size) {
            return None;
        }
        let mut trailer = vec![0u8; META_LEN as usize];
        data.read_exact_at(&mut trailer, round_up(meta.size, META_LEN))
            .ok()?;
        if Meta::decode(&trailer, DATA_MAGIC)? != meta {
            return None;
        }
        if meta.scope == Scope::Verified && !sums_intact(&sums_path(&paths.1), &meta, nblocks) {
            return None;
        }
        let mut present = vec![0u64; nblocks.div_ceil(64) as usize];
        for (i, byte) in bits.iter().enumerate() {
            present[i / 8] |= (*byte as u64) << ((i % 8) * 8);
        }
        Some(BlobState::new_state(paths, key, block, meta.nonce, present))
    }

    /// Opens the files, checking that they are still this state's (not made anew since).
    fn open_files(&self) -> io::Result<Files> {
        let rw = |p: &Path| OpenOptions::new().read(true).write(true).open(p);
        let sums = if self.is_verified() {
            let path = sums_path(&self.map_path);
            let f = File::open(&path)?;
            let mut header = vec![0u8; META_LEN as usize];
            f.read_exact_at(&mut header, 0)?;
            if Meta::decode(&header, SUMS_MAGIC).as_ref() != Some(&self.meta()) {
                return Err(io::Error::other(format!("{} was replaced", path.display())));
            }
            Some(f)
        } else {
            None
        };
        let files = Files {
            data: rw(&self.data_path)?,
            map: rw(&self.map_path)?,
            sums,
        };
        let mut header = vec![0u8; META_LEN as usize];
        files.map.read_exact_at(&mut header, 0)?;
        if Meta::decode(&header, MAP_MAGIC).as_ref() != Some(&self.meta()) {
            return Err(io::Error::other(format!(
                "{} was replaced",
                self.map_path.display()
            )));
        }
        Ok(files)
    }

    /// The open files, or freshly opened ones (kept if `keep`).
    fn files(&self, keep: bool) -> io::Result<Arc<Files>> {
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
    fn flush(&self, total: &AtomicU64) -> io::Result<()> {
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
            self.sync_data(&files.data)?;
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
    fn sync_data(&self, data: &File) -> io::Result<()> {
        #[cfg(test)]
        if self.fail_sync.swap(false, Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        data.sync_data()
    }

    /// Writes the map's bitmap as of now and syncs it (if a later write has not already).
    fn persist(&self, files: &Files) -> io::Result<()> {
        let mut persisted = lock(&self.persisted);
        let (generation, bytes) = {
            let inner = lock(&self.inner);
            if inner.dirty_gen <= *persisted {
                return Ok(());
            }
            (inner.dirty_gen, inner.bitmap_bytes(self.nblocks))
        };
        files.map.write_all_at(&bytes, META_LEN)?;
        files.map.sync_data()?;
        *persisted = generation;
        Ok(())
    }

    /// Copies into this new entry (not yet seen by readers) the blocks `other` has present,
    /// with their stamps, reading them from `src` (the verified blob); synced and recorded.
    /// Returns the bytes copied; on failure the entry's files are removed.
    fn copy_blocks_from(&self, other: &BlobState, src: &File) -> io::Result<u64> {
        let blocks: Vec<(u64, u64)> = {
            let inner = lock(&other.inner);
            inner
                .present_blocks()
                .map(|b| (b, inner.stamp[b as usize]))
                .collect()
        };
        if blocks.is_empty() {
            return Ok(0);
        }
        let copy = || -> io::Result<u64> {
            let files = self.open_files()?;
            let mut buf = vec![0u8; self.block as usize];
            let mut bytes = 0;
            for &(b, _) in &blocks {
                let (s, e) = self.block_range(b);
                let n = (e - s) as usize;
                src.read_exact_at(&mut buf[..n], s)?;
                files.data.write_all_at(&buf[..n], s)?;
                bytes += n as u64;
            }
            self.sync_data(&files.data)?;
            {
                let mut inner = lock(&self.inner);
                for &(b, stamp) in &blocks {
                    set_bit(&mut inner.present, b, true);
                    set_bit(&mut inner.durable, b, true);
                    inner.stamp[b as usize] = stamp;
                }
                inner.dirty_gen += 1;
            }
            self.cached.fetch_add(bytes, Relaxed);
            self.persist(&files)?;
            Ok(bytes)
        };
        copy().inspect_err(|_| {
            let _ = fs::remove_file(&self.map_path);
            let _ = fs::remove_file(&self.data_path);
            let _ = fs::remove_file(sums_path(&self.map_path));
        })
    }

    /// Evicts `blocks` that are present and not in flight (and, where a stamp is given, not
    /// used since): bits cleared (and the map synced if it had any of them), then holes
    /// punched. Returns bytes freed.
    fn evict_blocks(&self, cache: &BlobCache, blocks: &[(u64, Option<u64>)]) -> u64 {
        let flight = Flight::new();
        let mut victims = Vec::new();
        let mut freed = 0;
        let mut recorded = false;
        {
            let mut inner = lock(&self.inner);
            for &(b, stamp) in blocks {
                if b >= self.nblocks
                    || !inner.is_present(b)
                    || inner.inflight.contains_key(&b)
                    || stamp.is_some_and(|s| inner.stamp[b as usize] != s)
                {
                    continue;
                }
                set_bit(&mut inner.present, b, false);
                if get_bit(&inner.durable, b) {
                    set_bit(&mut inner.durable, b, false);
                    recorded = true;
                }
                inner.inflight.insert(b, flight.clone());
                victims.push(b);
                freed += self.block_len(b);
            }
            if victims.is_empty() {
                return 0;
            }
            if recorded {
                inner.dirty_gen += 1;
            }
        }
        self.cached.fetch_sub(freed, Relaxed);
        cache.total.fetch_sub(freed, Relaxed);
        cache.evicted.fetch_add(freed, Relaxed);
        let done = match self.files(false) {
            // The map must not say present over a hole: its bits go first.
            Ok(files) => match if recorded {
                self.persist(&files)
            } else {
                Ok(())
            } {
                Ok(()) => {
                    let _w = self.punch.write().unwrap_or_else(|e| e.into_inner());
                    for &b in &victims {
                        let (s, e) = self.block_range(b);
                        if let Err(err) = punch_hole(&files.data, s, e - s) {
                            if !cache.punch_warned.swap(true, Relaxed) {
                                log::warn!(
                                    "cache {}: cannot punch holes ({err}): evicted blocks keep their disk space",
                                    cache.dir.display()
                                );
                            }
                        }
                    }
                    Ok(())
                }
                // The cleared bits may not be on disk: keep the data (correct, just not
                // counted any more) rather than punch under a bit that may still say present.
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            log::warn!(
                "cache of {}: evicting {} block(s): {e}",
                self.digest,
                victims.len()
            );
        }
        let mut inner = lock(&self.inner);
        for b in victims {
            if inner
                .inflight
                .get(&b)
                .is_some_and(|f| Arc::ptr_eq(f, &flight))
            {
                inner.inflight.remove(&b);
            }
        }
        drop(inner);
        flight.complete(Ok(()));
        freed
    }
}

/// Blocks claimed for fetching by one reader. Dropped without [`Claim::finish`]: the waiters
/// are told it failed and the blocks are free to be claimed again.
struct Claim<'a> {
    state: &'a BlobState,
    blocks: Vec<u64>,
    flight: Arc<Flight>,
    finished: bool,
}

impl Claim<'_> {
    fn release(&mut self, r: Result<(), (io::ErrorKind, String)>) {
        if self.finished {
            return;
        }
        self.finished = true;
        {
            let mut inner = lock(&self.state.inner);
            for b in &self.blocks {
                if inner
                    .inflight
                    .get(b)
                    .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
                {
                    inner.inflight.remove(b);
                }
            }
        }
        self.flight.complete(r);
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.release(Err((
            io::ErrorKind::Other,
            "the fetch was abandoned".into(),
        )));
    }
}

// ---------------------------------------------------------------------------------- flusher

/// Syncs written blocks and records them in their maps, off the read path, in batches.
struct Flusher {
    queue: Arc<FlushQueue>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct FlushQueue {
    state: Mutex<FlushState>,
    cv: Condvar,
    delay: Duration,
    /// The cache's byte count (lowered when a failed sync drops blocks).
    total: Arc<AtomicU64>,
}

#[derive(Default)]
struct FlushState {
    dirty: HashMap<Key, Arc<BlobState>>,
    stop: bool,
}

impl Flusher {
    fn start(delay: Duration, total: Arc<AtomicU64>) -> io::Result<Flusher> {
        let queue = Arc::new(FlushQueue {
            state: Mutex::new(FlushState::default()),
            cv: Condvar::new(),
            delay,
            total,
        });
        let q = queue.clone();
        let thread = std::thread::Builder::new()
            .name("ovbd-cache-flush".into())
            .spawn(move || q.run())?;
        Ok(Flusher {
            queue,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// `s` has blocks to flush.
    fn mark(&self, s: &Arc<BlobState>) {
        let mut st = lock(&self.queue.state);
        if st.dirty.insert(s.key(), s.clone()).is_none() {
            self.queue.cv.notify_all();
        }
    }

    /// Flushes what is marked and ends the thread.
    fn stop(&self) {
        lock(&self.queue.state).stop = true;
        self.queue.cv.notify_all();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl FlushQueue {
    fn run(&self) {
        loop {
            let mut st = lock(&self.state);
            while st.dirty.is_empty() && !st.stop {
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            // Let the batch fill up.
            let until = Instant::now() + self.delay;
            while !st.stop {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                st = self
                    .cv
                    .wait_timeout(st, until - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let stop = st.stop;
            let dirty = std::mem::take(&mut st.dirty);
            drop(st);
            for s in dirty.values() {
                // On failure the blocks are dropped: read again, they are fetched again.
                if let Err(e) = s.flush(&self.total) {
                    log::warn!("block cache: syncing the blocks of {}: {e}", s.digest);
                }
            }
            if stop {
                let rest = std::mem::take(&mut lock(&self.state).dirty);
                for s in rest.values() {
                    if let Err(e) = s.flush(&self.total) {
                        log::warn!("block cache: syncing the blocks of {}: {e}", s.digest);
                    }
                }
                return;
            }
        }
    }
}

// ------------------------------------------------------------------------------------ cache

/// The block cache: a directory and a size limit, shared by all devices. Send + Sync.
pub struct BlobCache {
    dir: PathBuf,
    limit: u64,
    low_water: u64,
    block: u64,
    blobs: Mutex<HashMap<Key, Arc<BlobState>>>,
    /// Bytes of present blocks, all entries (shared with the flusher).
    total: Arc<AtomicU64>,
    clock: AtomicU64,
    evicting: Mutex<()>,
    hits: AtomicU64,
    fetched: AtomicU64,
    evicted: AtomicU64,
    punch_warned: AtomicBool,
    /// One verified entry made at a time.
    verifying: Mutex<()>,
    flusher: Flusher,
    /// Holds the directory's flock.
    _lock: File,
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

/// A snapshot of the cache's counters.
#[allow(dead_code)] // API for the daemon's stats and cache management
#[derive(Clone, Debug, serde::Serialize)]
pub struct CacheStats {
    pub dir: PathBuf,
    pub limit_bytes: u64,
    pub block_bytes: u64,
    /// Bytes of present blocks, all blobs.
    pub cached_bytes: u64,
    /// Bytes served from the cache (since open).
    pub hit_bytes: u64,
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
    /// Whether a [`CachedBlob`] has it open.
    pub open: bool,
}

impl BlobCache {
    /// Opens (creating it if needed) the cache at `cfg.dir`, else `default_dir`; reads what
    /// an earlier run left there, dropping whatever cannot be trusted.
    pub fn open(cfg: &CacheConfig, default_dir: &Path) -> anyhow::Result<Arc<BlobCache>> {
        Self::open_with(cfg, default_dir, FLUSH_DELAY)
    }

    /// As [`BlobCache::open`], written blocks synced and recorded `flush_delay` after the
    /// first of a batch.
    pub(crate) fn open_with(
        cfg: &CacheConfig,
        default_dir: &Path,
        flush_delay: Duration,
    ) -> anyhow::Result<Arc<BlobCache>> {
        cfg.validate()?;
        let dir = cfg.dir.clone().unwrap_or_else(|| default_dir.to_path_buf());
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let lock_path = dir.join(".lock");
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        // SAFETY: flock on a valid fd.
        if unsafe { libc::flock(lock_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            bail!(
                "block cache {} is in use by another process (or another cache in this one): {e}",
                dir.display()
            );
        }
        let block = cfg.refill_bytes();
        let limit = cfg.size_bytes().max(1);
        let total = Arc::new(AtomicU64::new(0));
        let cache = Arc::new(BlobCache {
            dir: dir.clone(),
            limit,
            low_water: limit / 100 * LOW_WATER_PERCENT,
            block,
            blobs: Mutex::new(HashMap::new()),
            total: total.clone(),
            clock: AtomicU64::new(0),
            evicting: Mutex::new(()),
            hits: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            punch_warned: AtomicBool::new(false),
            verifying: Mutex::new(()),
            flusher: Flusher::start(flush_delay, total).context("starting the cache flusher")?,
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

    fn paths(&self, key: &Key) -> (PathBuf, PathBuf) {
        entry_paths(&self.dir, key)
    }

    /// Loads every entry left by an earlier run; removes temporary files, orphans, records
    /// that do not check out and the files of earlier versions.
    fn scan(&self) -> anyhow::Result<()> {
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
            Err(e) => return Err(e).with_context(|| format!("reading {}", origins.display())),
        };
        for e in entries {
            let e = e.with_context(|| format!("reading {}", origins.display()))?;
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
    fn scan_scope(&self, scope: Scope) -> anyhow::Result<()> {
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
                Err(e) => return Err(e).with_context(|| format!("reading {}", d.display())),
            };
            let mut names = Vec::new();
            for e in entries {
                let e = e.with_context(|| format!("reading {}", d.display()))?;
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
                        Some(s) => {
                            self.total.fetch_add(s.cached.load(Relaxed), Relaxed);
                            lock(&self.blobs).insert(key, Arc::new(s));
                        }
                        None => {
                            log::warn!(
                                "block cache: dropping the cache of {} ({size} bytes): its record does not match its data file",
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
    fn open_state(&self, origin: &str, digest: &str, size: u64) -> anyhow::Result<Arc<BlobState>> {
        if size > MAX_BLOB_SIZE {
            bail!("blob {digest} of {size} bytes is larger than the cache takes ({MAX_BLOB_SIZE})");
        }
        let mut blobs = lock(&self.blobs);
        let verified = blobs
            .iter()
            .find(|(k, _)| k.scope == Scope::Verified && k.digest == digest)
            .map(|(k, s)| (k.clone(), s.clone()));
        if let Some((k, s)) = verified {
            if s.open.load(Relaxed) > 0 || s.data_path.exists() {
                if k.size != size {
                    bail!(
                        "blob {digest} from {origin}: the image says {size} bytes, but its \
                         download matched the digest at {} bytes",
                        k.size
                    );
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
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let s = Arc::new(
            BlobState::create(paths, &key, self.block, None).with_context(|| {
                format!("creating the cache files of {digest} in {}", dir.display())
            })?,
        );
        s.open.fetch_add(1, Relaxed);
        blobs.insert(key, s.clone());
        Ok(s)
    }

    /// Makes `file`, checked here to hold the blob `digest` (its whole hash must match), the
    /// reference of the digest's verified entry: readers from every origin share that entry
    /// from now on, and a block fetched into it must hash as the file's block does. The blocks
    /// `from` (the downloading origin's entry) has cached are copied in, from `file`.
    /// Nothing is done if the digest already has a verified entry.
    pub fn add_verified(
        &self,
        digest: &str,
        file: &Path,
        from: Option<&CachedBlob>,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(valid_digest(digest), "{digest:?} is not a digest");
        let _one = lock(&self.verifying);
        if lock(&self.blobs)
            .keys()
            .any(|k| k.scope == Scope::Verified && k.digest == digest)
        {
            return Ok(());
        }
        let src = File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let size = src.metadata()?.len();
        if size > MAX_BLOB_SIZE {
            bail!(
                "{} of {size} bytes is larger than the cache takes",
                file.display()
            );
        }
        // Block hashes, and the whole hash to check them by, in one read of the file.
        let sha512 = digest.starts_with("sha512:");
        let (mut h256, mut h512) = (Sha256::new(), Sha512::new());
        let mut sums: Vec<[u8; 32]> = Vec::with_capacity(size.div_ceil(self.block) as usize);
        let mut buf = vec![0u8; self.block as usize];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(self.block) as usize;
            src.read_exact_at(&mut buf[..n], off)
                .with_context(|| format!("reading {} at {off}", file.display()))?;
            if sha512 {
                h512.update(&buf[..n]);
            } else {
                h256.update(&buf[..n]);
            }
            sums.push(Sha256::digest(&buf[..n]).into());
            off += n as u64;
        }
        let got = if sha512 {
            format!("sha512:{}", hex(&h512.finalize()))
        } else {
            format!("sha256:{}", hex(&h256.finalize()))
        };
        if got != digest {
            bail!("{} has {got}, not {digest}", file.display());
        }
        let key = Key {
            scope: Scope::Verified,
            digest: digest.to_owned(),
            size,
        };
        let paths = self.paths(&key);
        let dir = paths.1.parent().map(Path::to_path_buf).unwrap_or_default();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let s = BlobState::create(paths, &key, self.block, Some(&sums))
            .with_context(|| format!("creating the verified cache files of {digest}"))?;
        // Not visible to readers yet: filled, synced and recorded before it is.
        let copied = match from.filter(|f| f.state.size == size && f.state.digest == digest) {
            Some(f) => s.copy_blocks_from(&f.state, &src).with_context(|| {
                format!(
                    "copying the cached blocks of {digest} from {}",
                    file.display()
                )
            })?,
            None => 0,
        };
        self.total.fetch_add(copied, Relaxed);
        lock(&self.blobs).insert(key, Arc::new(s));
        log::info!("block cache: {digest} verified ({size} bytes): shared by every registry from now on, {copied} bytes cached");
        self.maybe_evict();
        Ok(())
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Relaxed) + 1
    }

    /// Evicts down to the low-water mark if over the limit (one evictor at a time).
    fn maybe_evict(&self) {
        if self.total.load(Relaxed) <= self.limit {
            return;
        }
        let Ok(_g) = self.evicting.try_lock() else {
            return;
        };
        self.evict_to(self.low_water);
    }

    /// Evicts the least recently used blocks until at most `target` bytes are cached.
    fn evict_to(&self, target: u64) -> u64 {
        let over = self.total.load(Relaxed).saturating_sub(target);
        if over == 0 {
            return 0;
        }
        let blobs: Vec<Arc<BlobState>> = lock(&self.blobs).values().cloned().collect();
        let mut candidates = Vec::new();
        for (i, s) in blobs.iter().enumerate() {
            // The set bits only: a large blob with few blocks cached costs little.
            let inner = lock(&s.inner);
            candidates.extend(
                inner
                    .present_blocks()
                    .filter(|b| !inner.inflight.contains_key(b))
                    .map(|b| (inner.stamp[b as usize], i, b)),
            );
        }
        candidates.sort_unstable();
        let mut chosen: Vec<Vec<(u64, Option<u64>)>> = vec![Vec::new(); blobs.len()];
        let mut acc = 0;
        for (stamp, i, b) in candidates {
            if acc >= over {
                break;
            }
            acc += blobs[i].block_len(b);
            chosen[i].push((b, Some(stamp)));
        }
        let mut freed = 0;
        for (i, list) in chosen.iter().enumerate() {
            if !list.is_empty() {
                freed += blobs[i].evict_blocks(self, list);
            }
        }
        self.drop_empty_closed();
        log::debug!(
            "block cache {}: evicted {freed} bytes, {} cached",
            self.dir.display(),
            self.total.load(Relaxed)
        );
        freed
    }

    /// Deletes the files of blobs that have no block and no open handle.
    fn drop_empty_closed(&self) {
        let mut blobs = lock(&self.blobs);
        blobs.retain(|_, s| {
            let inner = lock(&s.inner);
            let keep = s.open.load(Relaxed) > 0
                || s.cached.load(Relaxed) > 0
                || !inner.inflight.is_empty();
            if !keep {
                let _ = fs::remove_file(&s.map_path);
                let _ = fs::remove_file(&s.data_path);
                let _ = fs::remove_file(sums_path(&s.map_path));
                // The algo and origin directories, if that emptied them.
                let algo_dir = s.map_path.parent();
                for d in [algo_dir, algo_dir.and_then(Path::parent)]
                    .into_iter()
                    .flatten()
                {
                    let _ = fs::remove_dir(d);
                }
            }
            keep
        });
    }

    /// Syncs every block written so far and records it in its map (done in the background
    /// about a second after a write anyway, and when a blob's last handle or the cache is
    /// dropped). Blocks not flushed when the process dies are lost, never wrong.
    #[allow(dead_code)] // API for the daemon's shutdown
    pub fn flush(&self) -> io::Result<()> {
        let blobs: Vec<Arc<BlobState>> = lock(&self.blobs).values().cloned().collect();
        let mut first_err = None;
        for s in blobs {
            if let Err(e) = s.flush(&self.total) {
                first_err.get_or_insert(io::Error::new(
                    e.kind(),
                    format!("syncing the cached blocks of {}: {e}", s.digest),
                ));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Per-blob and overall counters.
    #[allow(dead_code)] // API for the daemon's stats and cache management
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
            fetched_bytes: self.fetched.load(Relaxed),
            evicted_bytes: self.evicted.load(Relaxed),
            blobs,
        }
    }

    /// Evicts every block not being fetched right now and deletes the files of blobs not
    /// open. Returns the bytes freed.
    #[allow(dead_code)] // API for the daemon's cache management
    pub fn clear(&self) -> u64 {
        let _g = lock(&self.evicting);
        let blobs: Vec<Arc<BlobState>> = lock(&self.blobs).values().cloned().collect();
        let mut freed = 0;
        for s in blobs {
            let all: Vec<(u64, Option<u64>)> =
                lock(&s.inner).present_blocks().map(|b| (b, None)).collect();
            freed += s.evict_blocks(self, &all);
        }
        self.drop_empty_closed();
        freed
    }
}

// ------------------------------------------------------------------------------- cached blob

/// A blob read through the cache: [`ovbd_format::ReadAt`].
pub struct CachedBlob {
    cache: Arc<BlobCache>,
    state: Arc<BlobState>,
    source: Arc<dyn BlockSource>,
    name: String,
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
    pub fn new(cache: Arc<BlobCache>, remote: RemoteBlob) -> anyhow::Result<CachedBlob> {
        CachedBlob::with_source(cache, Arc::new(remote))
    }

    /// As [`CachedBlob::new`] with any block source.
    pub(crate) fn with_source(
        cache: Arc<BlobCache>,
        source: Arc<dyn BlockSource>,
    ) -> anyhow::Result<CachedBlob> {
        let digest = source.digest().to_owned();
        if !valid_digest(&digest) {
            bail!("blob digest {digest:?} is not sha256:<hex> or sha512:<hex>");
        }
        let state = cache.open_state(&source.origin(), &digest, source.size())?;
        // From here on, Drop undoes the open count.
        let blob = CachedBlob {
            name: source.name().to_owned(),
            cache,
            state,
            source,
        };
        blob.state
            .files(true)
            .map_err(|e| anyhow!("opening the cache files of {digest}: {e}"))?;
        Ok(blob)
    }

    /// Bytes of this blob in the cache.
    #[allow(dead_code)] // API for the daemon's stats
    pub fn cached_bytes(&self) -> u64 {
        self.state.cached.load(Relaxed)
    }

    /// `file` holds this blob (checked: its hash must match the digest): the cache shares it
    /// with every origin from now on ([`BlobCache::add_verified`]).
    pub fn mark_verified(&self, file: &Path) -> anyhow::Result<()> {
        self.cache
            .add_verified(&self.state.digest, file, Some(self))
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

    /// Whether this reads the digest's verified entry (shared by every origin).
    #[allow(dead_code)] // API for the daemon's stats and tests
    pub fn is_verified(&self) -> bool {
        self.state.is_verified()
    }

    /// A verified entry takes a fetched block only if it hashes as the verified blob's block
    /// did; `ranges` start on blocks and `data` holds them.
    fn check_blocks(
        &self,
        files: &Files,
        ranges: &[(u64, usize)],
        data: &[Vec<u8>],
    ) -> io::Result<()> {
        let Some(sums) = &files.sums else {
            return Ok(());
        };
        let st = &*self.state;
        for (r, d) in ranges.iter().zip(data) {
            for (i, bytes) in d.chunks(st.block as usize).enumerate() {
                let b = r.0 / st.block + i as u64;
                let mut want = [0u8; SUM_LEN as usize];
                sums.read_exact_at(&mut want, META_LEN + b * SUM_LEN)
                    .map_err(|e| self.io_err(b * st.block, "reading its block hash", e))?;
                if Sha256::digest(bytes)[..] != want {
                    let e = io::Error::other(format!(
                        "{} ({}): block at offset {} does not match the blob verified against \
                         {}: the registry served other bytes",
                        self.name,
                        self.source.origin(),
                        b * st.block,
                        st.digest
                    ));
                    log::warn!("{e}");
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn io_err(&self, offset: u64, what: &str, e: impl fmt::Display) -> io::Error {
        io::Error::other(format!(
            "cache of {} ({}) at offset {offset}: {what}: {e}",
            self.name,
            self.state.data_path.display()
        ))
    }

    /// Blocks `first..=last` of a read of `n` bytes at `offset`.
    fn blocks_of(&self, offset: u64, n: usize) -> (u64, u64) {
        let bs = self.state.block;
        (offset / bs, (offset + n as u64 - 1) / bs)
    }

    /// Copies the part of blocks `[b0, b0 + data.len()/block)` that overlaps the read
    /// (`buf` at `offset`) from `data`, which holds those blocks' bytes.
    fn copy_overlap(buf: &mut [u8], offset: u64, data_start: u64, data: &[u8]) {
        let end = offset + buf.len() as u64;
        let s = offset.max(data_start);
        let e = end.min(data_start + data.len() as u64);
        if s < e {
            buf[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&data[(s - data_start) as usize..(e - data_start) as usize]);
        }
    }

    /// Fetches the claimed blocks (runs of adjacent ones as one range each, all at once),
    /// writes and syncs them, marks them present and copies what the read wants into `buf`.
    fn fill(&self, claim: &mut Claim<'_>, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = &*self.state;
        let mut runs: Vec<(u64, u64)> = Vec::new(); // (first block, count)
        for &b in &claim.blocks {
            match runs.last_mut() {
                Some((f, c)) if *f + *c == b => *c += 1,
                _ => runs.push((b, 1)),
            }
        }
        let ranges: Vec<(u64, usize)> = runs
            .iter()
            .map(|&(f, c)| {
                let s = f * st.block;
                let e = ((f + c) * st.block).min(st.size);
                (s, (e - s) as usize)
            })
            .collect();
        let fail = |claim: &mut Claim<'_>, e: io::Error| {
            claim.release(Err((e.kind(), e.to_string())));
            e
        };
        let data = match self.source.fetch_ranges(&ranges) {
            Ok(d)
                if d.len() == ranges.len()
                    && d.iter().zip(&ranges).all(|(d, r)| d.len() == r.1) =>
            {
                d
            }
            Ok(_) => {
                let e = self.io_err(offset, "fetching", "the source returned short ranges");
                return Err(fail(claim, e));
            }
            Err(e) => return Err(fail(claim, e)),
        };
        let files = match st.files(true) {
            Ok(f) => f,
            Err(e) => {
                let e = self.io_err(offset, "opening", e);
                return Err(fail(claim, e));
            }
        };
        if let Err(e) = self.check_blocks(&files, &ranges, &data) {
            return Err(fail(claim, e));
        }
        // Not synced here: the flusher syncs before it records the blocks in the map.
        let written = (|| {
            for (r, d) in ranges.iter().zip(&data) {
                files.data.write_all_at(d, r.0)?;
            }
            Ok::<(), io::Error>(())
        })();
        if let Err(e) = written {
            let e = self.io_err(offset, "writing", e);
            // The data is at hand all the same: serve this read, cache nothing. Waiters look
            // again (and fetch for themselves).
            claim.release(Ok(()));
            for (r, d) in ranges.iter().zip(&data) {
                Self::copy_overlap(buf, offset, r.0, d);
            }
            log::warn!("{e}");
            return Ok(());
        }
        let bytes: u64 = ranges.iter().map(|r| r.1 as u64).sum();
        {
            let stamp = self.cache.tick();
            let mut inner = lock(&st.inner);
            for &b in &claim.blocks {
                set_bit(&mut inner.present, b, true);
                inner.stamp[b as usize] = stamp;
                inner.pending.insert(b);
            }
        }
        st.cached.fetch_add(bytes, Relaxed);
        self.cache.total.fetch_add(bytes, Relaxed);
        self.cache.fetched.fetch_add(bytes, Relaxed);
        claim.release(Ok(()));
        for (r, d) in ranges.iter().zip(&data) {
            Self::copy_overlap(buf, offset, r.0, d);
        }
        self.cache.flusher.mark(&self.state);
        self.cache.maybe_evict();
        Ok(())
    }

    fn read_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
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
                    inner.files.clone()
                };
                if !serve.is_empty() {
                    let files = match files {
                        Some(f) => f,
                        None => st
                            .files(true)
                            .map_err(|e| self.io_err(offset, "opening", e))?,
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
                self.fill(&mut claim, buf, offset)?;
                for b in &claim.blocks {
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
            return Err(self.io_err(offset, "fetching", "the source returned short ranges"));
        }
        let files = st
            .files(true)
            .map_err(|e| self.io_err(offset, "opening", e))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RegistryConfig;
    use crate::registry::Registry;
    use crate::testing::*;
    use crate::testing::{check_random_ranges, random_bytes, registry_with_blob, Rng};
    use ovbd_format::ReadAt;
    use std::sync::atomic::Ordering::SeqCst;
    use std::time::Duration;

    fn cfg(dir: &Path, limit: u64, block: u64) -> CacheConfig {
        CacheConfig {
            dir: Some(dir.to_path_buf()),
            size_gb: limit as f64 / (1u64 << 30) as f64,
            refill_kb: block >> 10,
        }
    }

    fn paths_of(cache: &BlobCache, fake: &Fake) -> (PathBuf, PathBuf) {
        cache.paths(&Key {
            scope: Scope::of_origin(&fake.origin),
            digest: fake.digest.clone(),
            size: fake.data.len() as u64,
        })
    }

    pub(crate) fn cached(cache: &Arc<BlobCache>, fake: &Arc<Fake>) -> CachedBlob {
        CachedBlob::with_source(cache.clone(), fake.clone()).unwrap()
    }

    fn read(b: &dyn ReadAt, off: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let n = b.read_at(&mut buf, off).unwrap();
        buf.truncate(n);
        buf
    }

    fn nowait(b: &dyn ReadAt, off: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let n = b.read_at_nowait(&mut buf, off)?;
        buf.truncate(n);
        Ok(buf)
    }

    fn is_would_block(r: io::Result<Vec<u8>>) -> bool {
        matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Through a real registry: right bytes, a second read fetches nothing, nowait serves
    /// what is cached only, and a new cache on the same directory serves it too.
    #[test]
    fn blob_cache_reads_through_registry() {
        let (reg, data, digest) = registry_with_blob((3 << 20) + 4321, 21);
        let tmp = tempfile::tempdir().unwrap();
        let registry = Registry::new(&RegistryConfig {
            timeout_secs: 10.0,
            allow_hosts: vec!["127.0.0.1".into()],
            ..Default::default()
        })
        .unwrap();
        let image = format!("{}/test/blob:v1", reg.addr);
        let remote = RemoteBlob::new(registry.clone(), &image, &digest, data.len() as u64).unwrap();
        let counter = remote.clone();
        // Its origin: registry host and repository, the tag left out.
        assert_eq!(
            BlockSource::origin(&remote),
            format!("{}/test/blob", reg.addr)
        );
        let cache = BlobCache::open(&CacheConfig::default(), &tmp.path().join("cache")).unwrap();
        let blob = CachedBlob::new(cache.clone(), remote).unwrap();
        assert_eq!(blob.size(), data.len() as u64);
        assert!(blob.name().contains(&digest));

        // Nothing cached: nowait never fetches.
        assert!(is_would_block(nowait(&blob, 1000, 10)));
        assert_eq!(counter.requests(), 0);

        // One read of 10 bytes fetches the 256 KiB block around it.
        assert_eq!(read(&blob, 300_000, 10), &data[300_000..300_010]);
        assert_eq!(counter.fetched_bytes(), 256 << 10);
        assert_eq!(blob.cached_bytes(), 256 << 10);
        assert_eq!(
            nowait(&blob, 262_144, 1000).unwrap(),
            &data[262_144..263_144]
        );
        assert!(is_would_block(nowait(&blob, 262_143, 2)));

        check_random_ranges(&blob, &data, 20, 23);
        let fetched = counter.fetched_bytes();
        assert!(fetched <= data.len() as u64, "each block once: {fetched}");
        assert_eq!(blob.cached_bytes(), data.len() as u64);
        check_random_ranges(&blob, &data, 20, 29);
        assert_eq!(
            counter.fetched_bytes(),
            fetched,
            "second reads fetch nothing"
        );
        assert_eq!(nowait(&blob, 0, data.len()).unwrap(), data);
        let stats = cache.stats();
        assert_eq!(stats.cached_bytes, data.len() as u64);
        assert_eq!(stats.blobs.len(), 1);
        assert!(stats.blobs[0].open && stats.blobs[0].digest == digest);
        assert!(stats.blobs[0].disk_bytes >= data.len() as u64);

        // A new cache on the directory (a restart) serves it all, without the registry.
        drop(blob);
        drop(cache);
        drop(reg);
        let cache = BlobCache::open(&CacheConfig::default(), &tmp.path().join("cache")).unwrap();
        let remote = RemoteBlob::new(registry, &image, &digest, data.len() as u64).unwrap();
        let counter = remote.clone();
        let blob = CachedBlob::new(cache, remote).unwrap();
        assert_eq!(nowait(&blob, 5, 100).unwrap(), &data[5..105]);
        check_random_ranges(&blob, &data, 10, 31);
        assert_eq!(counter.requests(), 0);
    }

    /// Reads are rounded out to blocks; the missing runs of one read are fetched in one call
    /// (one range per run), not block after block.
    #[test]
    fn blob_cache_rounds_to_blocks_and_coalesces_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(&cfg(tmp.path(), 1 << 30, BS), tmp.path()).unwrap();
        let fake = Fake::new(20 * BS as usize + 1000, 1);
        let blob = cached(&cache, &fake);
        assert_eq!(
            read(&blob, BS + 5, 10),
            &fake.data[BS as usize + 5..BS as usize + 15]
        );
        assert_eq!(lock(&fake.ranges).clone(), vec![vec![(BS, BS as usize)]]);
        assert_eq!(
            read(&blob, 4 * BS - 1, 2),
            &fake.data[4 * BS as usize - 1..4 * BS as usize + 1]
        );
        assert_eq!(lock(&fake.ranges)[1], vec![(3 * BS, 2 * BS as usize)]);
        // Blocks 0..10 with 1, 3, 4 present: runs [0], [2], [5..10) in one call.
        let all = read(&blob, 0, 10 * BS as usize);
        assert!(all == fake.data[..10 * BS as usize]);
        assert_eq!(
            lock(&fake.ranges)[2],
            vec![
                (0, BS as usize),
                (2 * BS, BS as usize),
                (5 * BS, 5 * BS as usize)
            ]
        );
        // The short last block.
        let tail = read(&blob, 20 * BS + 999, 100);
        assert_eq!(tail, &fake.data[20 * BS as usize + 999..]);
        assert_eq!(lock(&fake.ranges)[3], vec![(20 * BS, 1000)]);
        assert_eq!(fake.calls.load(SeqCst), 4);
        assert!(lock(&fake.per_block).values().all(|&c| c == 1));
        // All cached now: no more calls.
        let _ = read(&blob, 0, 10 * BS as usize);
        assert_eq!(fake.calls.load(SeqCst), 4);
        assert_eq!(blob.cached_bytes(), 10 * BS + 1000);
    }

    /// Readers of the same blocks at the same time: each block is fetched once, the others
    /// wait for it; a second CachedBlob of the same digest shares the cache.
    #[test]
    fn blob_cache_concurrent_readers_share_one_fetch() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(&cfg(tmp.path(), 1 << 30, BS), tmp.path()).unwrap();
        let fake = Fake::new(16 * BS as usize, 2);
        *lock(&fake.delay) = Duration::from_millis(300);
        let a = Arc::new(cached(&cache, &fake));
        let b = Arc::new(cached(&cache, &fake));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let blob = if i % 2 == 0 { a.clone() } else { b.clone() };
                let data = fake.data.clone();
                std::thread::spawn(move || {
                    // Overlapping reads: all want block 3; some want 2..6.
                    let (off, len) = if i < 4 {
                        (3 * BS + i as u64 * 100, 1000)
                    } else {
                        (2 * BS + 7, 3 * BS as usize)
                    };
                    let got = read(&*blob, off, len);
                    assert!(got == data[off as usize..off as usize + len], "reader {i}");
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let pb = lock(&fake.per_block).clone();
        assert!(pb.values().all(|&c| c == 1), "{pb:?}");
        assert_eq!(pb.len(), 4, "{pb:?}"); // blocks 2, 3, 4, 5
        assert!(fake.calls.load(SeqCst) <= 3, "{}", fake.calls.load(SeqCst));
        assert_eq!(cache.stats().blobs.len(), 1);
        assert_eq!(a.cached_bytes(), 4 * BS);
    }

    #[test]
    fn blob_cache_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let fake = Fake::new(8 * BS as usize + 123, 3);
        {
            let cache = BlobCache::open(&cfg(tmp.path(), 1 << 30, BS), tmp.path()).unwrap();
            let blob = cached(&cache, &fake);
            let _ = read(&blob, BS, 3 * BS as usize);
            let _ = read(&blob, 8 * BS, 123);
            // Another cache on the same directory meanwhile: refused.
            let e = BlobCache::open(&cfg(tmp.path(), 1 << 30, BS), tmp.path()).unwrap_err();
            assert!(format!("{e:#}").contains("in use"), "{e:#}");
        }
        let fetched = fake.fetched();
        let cache = BlobCache::open(&cfg(tmp.path(), 1 << 30, BS), tmp.path()).unwrap();
        assert_eq!(cache.stats().cached_bytes, 3 * BS + 123);
        assert!(!cache.stats().blobs[0].open);
        let blob = cached(&cache, &fake);
        assert_eq!(
            nowait(&blob, BS, 3 * BS as usize).unwrap(),
            &fake.data[BS as usize..4 * BS as usize]
        );
        assert_eq!(
            nowait(&blob, 8 * BS + 100, 100).unwrap(),
            &fake.data[8 * BS as usize + 100..]
        );
        assert!(is_would_block(nowait(&blob, 0, 1)));
        assert_eq!(
            read(&blob, 2 * BS, 10),
            &fake.data[2 * BS as usize..2 * BS as usize + 10]
        );
        assert_eq!(fake.fetched(), fetched);
        // Another refill size: the old record is not used.
        drop(blob);
        drop(cache);
        let cache = BlobCache::open(&cfg(tmp.path(), 1 << 30, 2 * BS), tmp.path()).unwrap();
        assert_eq!(cache.stats().cached_bytes, 0);
        let blob = cached(&cache, &fake);
        assert!(is_would_block(nowait(&blob, BS, 10)));
        assert_eq!(
            read(&blob, BS, 10),
            &fake.data[BS as usize..BS as usize + 10]
        );
    }

    /// Records that do not match their data file are dropped, never served.
    #[test]
    fn blob_cache_torn_state_is_not_served() {
        type Damage = fn(&Path, &Path);
        let cases: Vec<(&str, Damage)> = vec![
            ("data file truncated", |data, _| {
                let f = OpenOptions::new().write(true).open(data).unwrap();
                f.set_len(3 * BS).unwrap();
            }),
            ("data file cut to nothing", |data, _| {
                OpenOptions::new()
                    .write(true)
                    .open(data)
                    .unwrap()
                    .set_len(0)
                    .unwrap();
            }),
            ("data file extended", |data, _| {
                let f = OpenOptions::new().write(true).open(data).unwrap();
                let len = f.metadata().unwrap().len();
                f.set_len(len + 4096).unwrap();
            }),
            (
                "data file made anew (same length, no trailer)",
                |data, _| {
                    let len = fs::metadata(data).unwrap().len();
                    fs::remove_file(data).unwrap();
                    File::create(data).unwrap().set_len(len).unwrap();
                },
            ),
            ("data file missing", |data, _| {
                fs::remove_file(data).unwrap()
            }),
            ("map header garbled", |_, map| {
                let f = OpenOptions::new().write(true).open(map).unwrap();
                f.write_all_at(b"x", 20).unwrap();
            }),
            ("map bitmap cut short", |_, map| {
                OpenOptions::new()
                    .write(true)
                    .open(map)
                    .unwrap()
                    .set_len(META_LEN)
                    .unwrap();
            }),
            ("map extended", |_, map| {
                let f = OpenOptions::new().write(true).open(map).unwrap();
                let len = f.metadata().unwrap().len();
                f.set_len(len + (1 << 30)).unwrap();
            }),
            ("map claiming a blob of 2^63 bytes", |_, map| {
                let mut b = fs::read(map).unwrap();
                b[24..32].copy_from_slice(&(1u64 << 63).to_le_bytes());
                let crc = ovbd_format::crc::crc32c_raw(0, &b[..META_LEN as usize - 4]);
                b[META_LEN as usize - 4..META_LEN as usize].copy_from_slice(&crc.to_le_bytes());
                fs::write(map, b).unwrap();
            }),
            ("map of another blob", |_, map| {
                let mut b = fs::read(map).unwrap();
                b[60] ^= 1; // inside the digest; the CRC is fixed up below
                let crc = ovbd_format::crc::crc32c_raw(0, &b[..META_LEN as usize - 4]);
                b[META_LEN as usize - 4..META_LEN as usize].copy_from_slice(&crc.to_le_bytes());
                fs::write(map, b).unwrap();
            }),
        ];
        for (what, damage) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let fake = Fake::new(6 * BS as usize, 4);
            let (data_path, map_path) = {
                let cache = BlobCache::open(&cfg(tmp.path(), 1 << 30, BS), tmp.path()).unwrap();
                let blob = cached(&cache, &fake);
                let _ = read(&blob, 0, 6 * BS as usize);
                assert_eq!(blob.cached_bytes(), 6 * BS);
                paths_of(&cache, &fake)
            };
            damage(&data_path, &map_path);
            let fetched = fake.fetched();
            let cache = BlobCache::open(&cfg(tmp.path(), 1 << 30, BS), tmp.path()).unwrap();
            assert_eq!(cache.stats().cached_bytes, 0, "{what}");
            let blob = cached(&cache, &fake);
            for b in 0..6 {
                assert!(
                    is_would_block(nowait(&blob, b * BS, 10)),
                    "{what}: block {b} served"
                );
            }
            assert!(
                read(&blob, 0, 6 * BS as usize) == fake.data,
                "{what}: wrong bytes"
            );
            assert_eq!(fake.fetched() - fetched, 6 * BS, "{what}");
            // And the fresh record is good for the next start.
            drop(blob);
            drop(cache);
            let cache = BlobCache::open(&cfg(tmp.path(), 1 << 30, BS), tmp.path()).unwrap();
            assert_eq!(cache.stats().cached_bytes, 6 * BS, "{what}");
        }
    }

    /// Over the limit, the least recently used blocks go (holes punched); the hot ones stay;
    /// evicted ones come back right.
    #[test]
    fn blob_cache_lru_eviction_keeps_under_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let limit = 10 * BS;
        let cache = BlobCache::open(&cfg(tmp.path(), limit, BS), tmp.path()).unwrap();
        let fake = Fake::new(64 * BS as usize, 5);
        let other = Fake::new(16 * BS as usize, 6);
        let blob = cached(&cache, &fake);
        let blob2 = cached(&cache, &other);
        let hot = [0u64, 1, 2];
        for b in 10..60u64 {
            for h in hot {
                assert_eq!(
                    read(&blob, h * BS + 17, 100),
                    &fake.data[(h * BS) as usize + 17..(h * BS) as usize + 117]
                );
            }
            let got = read(&blob, b * BS, BS as usize);
            assert!(got == fake.data[(b * BS) as usize..((b + 1) * BS) as usize]);
            if b % 5 == 0 {
                let o = (b / 5) % 16;
                assert_eq!(
                    read(&blob2, o * BS, 10),
                    &other.data[(o * BS) as usize..(o * BS) as usize + 10]
                );
            }
            let total = cache.stats().cached_bytes;
            assert!(total <= limit, "{total} cached after block {b}");
        }
        for h in hot {
            assert!(
                nowait(&blob, h * BS, 10).is_ok(),
                "hot block {h} was evicted"
            );
        }
        assert!(
            is_would_block(nowait(&blob, 10 * BS, 10)),
            "cold block kept"
        );
        let stats = cache.stats();
        assert!(stats.evicted_bytes >= 40 * BS, "{stats:?}");
        let disk: u64 = stats.blobs.iter().map(|b| b.disk_bytes).sum();
        // Holes punched: the data files take about what is cached (+ trailers, fs blocks).
        assert!(disk <= limit + 4 * 8192, "{disk} bytes on disk");
        // Evicted blocks come back right, fetched again.
        let before = fake.fetched();
        let got = read(&blob, 10 * BS, 2 * BS as usize);
        assert!(got == fake.data[(10 * BS) as usize..(12 * BS) as usize]);
        assert_eq!(fake.fetched() - before, 2 * BS);
        assert!(cache.stats().cached_bytes <= limit);
        // Blobs with nothing left and no handle are deleted.
        drop(blob2);
        let (data2, map2) = paths_of(&cache, &other);
        let freed = cache.clear();
        assert!(freed > 0);
        assert!(!data2.exists() && !map2.exists());
        assert_eq!(cache.stats().blobs.len(), 1);
        assert_eq!(cache.stats().cached_bytes, 0);
        assert!(is_would_block(nowait(&blob, 0, 10)));
        assert_eq!(read(&blob, 0, 10), &fake.data[..10]);
    }

    /// evict() (a failed CRC above) drops the blocks: the next read fetches them again.
    #[test]
    fn blob_cache_evict_forces_refetch() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(&cfg(tmp.path(), 1 << 30, BS), tmp.path()).unwrap();
        let fake = Fake::new(8 * BS as usize, 7);
        let blob = cached(&cache, &fake);
        let _ = read(&blob, 0, 8 * BS as usize);
        // The cached copy of block 3 goes bad on disk.
        let (data_path, _) = paths_of(&cache, &fake);
        let f = OpenOptions::new().write(true).open(&data_path).unwrap();
        f.write_all_at(&[0xEE; 100], 3 * BS + 50).unwrap();
        assert_ne!(
            read(&blob, 3 * BS + 50, 100),
            &fake.data[(3 * BS + 50) as usize..(3 * BS + 150) as usize]
        );
        // Evicting a range inside block 3 and touching 4: both go.
        blob.evict(3 * BS + 10, BS);
        assert!(is_would_block(nowait(&blob, 3 * BS, 1)));
        assert!(is_would_block(nowait(&blob, 4 * BS, 1)));
        assert!(nowait(&blob, 2 * BS, 1).is_ok() && nowait(&blob, 5 * BS, 1).is_ok());
        assert_eq!(blob.cached_bytes(), 6 * BS);
        let before = fake.fetched();
        assert!(
            read(&blob, 3 * BS, 2 * BS as usize) == fake.data[(3 * BS) as usize..(5 * BS) as usize]
        );
        assert_eq!(fake.fetched() - before, 2 * BS);
        assert_eq!(blob.cached_bytes(), 8 * BS);
        // Through a restart as well: the eviction was recorded.
        blob.evict(7 * BS, 1);
        drop(blob);
        drop(cache);
        let cache = BlobCache::open(&cfg(tmp.path(), 1 << 30, BS), tmp.path()).unwrap();
        let blob = cached(&cache, &fake);
        assert!(is_would_block(nowait(&blob, 7 * BS, 1)));
        assert!(
            nowait(&blob, 3 * BS + 50, 100).unwrap()
                == fake.data[(3 * BS + 50) as usize..(3 * BS + 150) as usize]
        );
        // Out-of-range and empty evictions are harmless.
        blob.evict(100 * BS, 10);
        blob.evict(0, 0);
        assert_eq!(blob.cached_bytes(), 7 * BS);
    }

    /// A failed fetch caches nothing and fails every reader waiting for it; later reads work.
    #[test]
    fn blob_cache_fetch_errors_are_not_cached() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(&cfg(tmp.path(), 1 << 30, BS), tmp.path()).unwrap();
        let fake = Fake::new(4 * BS as usize, 8);
        fake.fail.store(true, SeqCst);
        *lock(&fake.delay) = Duration::from_millis(200);
        let blob = Arc::new(cached(&cache, &fake));
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let blob = blob.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 10];
                    blob.read_at(&mut buf, BS).map(|_| ())
                })
            })
            .collect();
        for w in waiters {
            let e = w.join().unwrap().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
            assert!(e.to_string().contains("registry down"), "{e}");
        }
        assert_eq!(
            fake.calls.load(SeqCst),
            1,
            "the waiters shared the failed fetch"
        );
        assert_eq!(blob.cached_bytes(), 0);
        assert!(is_would_block(nowait(&*blob, BS, 10)));
        fake.fail.store(false, SeqCst);
        *lock(&fake.delay) = Duration::ZERO;
        assert_eq!(
            read(&*blob, BS, 10),
            &fake.data[BS as usize..BS as usize + 10]
        );
        assert_eq!(blob.cached_bytes(), BS);
    }

    #[test]
    fn blob_cache_random_reads_match_under_eviction_pressure() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(&cfg(tmp.path(), 6 * BS, BS), tmp.path()).unwrap();
        let fake = Fake::new(40 * BS as usize + 333, 9);
        let blob = Arc::new(cached(&cache, &fake));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let blob = blob.clone();
                let data = fake.data.clone();
                std::thread::spawn(move || {
                    let mut rng = Rng(100 + t);
                    for _ in 0..150 {
                        let off = rng.below(data.len() as u64);
                        let len = 1 + rng.below(3 * BS) as usize;
                        let got = read(&*blob, off, len);
                        let end = (off as usize + len).min(data.len());
                        assert!(got == data[off as usize..end], "read {len} at {off}");
                        if rng.below(10) == 0 {
                            blob.evict(rng.below(data.len() as u64), BS);
                        }
                        if let Ok(got) = nowait(&*blob, off, len) {
                            assert!(got[..] == data[off as usize..off as usize + got.len()]);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Fills that raced the evictor may leave it a little over until the next fill.
        assert!(cache.stats().cached_bytes <= 6 * BS + 4 * 3 * BS);
        drop(blob);
        drop(cache);
        // Whatever was left on disk is right.
        let cache = BlobCache::open(&cfg(tmp.path(), 1 << 30, BS), tmp.path()).unwrap();
        let blob = cached(&cache, &fake);
        let mut served = 0;
        for b in 0..41 {
            if let Ok(got) = nowait(&blob, b * BS, BS as usize) {
                assert!(got[..] == fake.data[(b * BS) as usize..(b * BS) as usize + got.len()]);
                served += 1;
            }
        }
        assert!(served > 0);
    }

    /// Through a registry that fails now and then, then for good: faults are retried below
    /// the cache; cached blocks are served during the outage; the others fail (every waiter)
    /// within the deadline, are not cached, and work once the registry is back.
    #[test]
    fn blob_cache_over_a_failing_registry() {
        use crate::testing::{Fault, Front};
        let (reg, data, digest) = registry_with_blob(2 << 20, 41);
        let front = Front::start(&reg.addr, None);
        let deadline = Duration::from_millis(2500);
        let registry = Registry::new(&RegistryConfig {
            timeout_secs: deadline.as_secs_f64(),
            retries: 100,
            stall_timeout_secs: 0.5,
            allow_hosts: vec!["127.0.0.1".into()],
            ..Default::default()
        })
        .unwrap();
        let remote = RemoteBlob::new(
            registry,
            &format!("{}/test/blob", front.addr),
            &digest,
            data.len() as u64,
        )
        .unwrap();
        let counter = remote.clone();
        let tmp = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(&CacheConfig::default(), tmp.path()).unwrap();
        let blob = Arc::new(CachedBlob::new(cache, remote).unwrap());
        front.push_faults([
            Fault::Status(503),
            Fault::Reset,
            Fault::Truncate,
            Fault::Stall(Duration::from_secs(5)),
        ]);
        assert!(read(&*blob, 100, 1 << 20) == data[100..(1 << 20) + 100]);
        assert!(front.faults.lock().unwrap().is_empty());
        assert_eq!(blob.cached_bytes(), 5 * (256 << 10));

        *front.always.lock().unwrap() = Some(Fault::Status(503));
        let gets = front.blob_gets();
        assert_eq!(read(&*blob, 200, 1000), &data[200..1200]);
        assert_eq!(front.blob_gets(), gets, "cached: no request");
        let t = std::time::Instant::now();
        let readers: Vec<_> = (0..3)
            .map(|i| {
                let blob = blob.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 100];
                    blob.read_at(&mut buf, (3 << 19) + i * 100)
                })
            })
            .collect();
        for r in readers {
            let e = r.join().unwrap().unwrap_err();
            assert!(e.to_string().contains(&digest), "{e}");
        }
        assert!(
            t.elapsed() < deadline + Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(blob.cached_bytes(), 5 * (256 << 10));
        assert!(is_would_block(nowait(&*blob, 3 << 19, 10)));

        *front.always.lock().unwrap() = None;
        let before = counter.fetched_bytes();
        assert_eq!(read(&*blob, 3 << 19, 100), &data[3 << 19..(3 << 19) + 100]);
        assert_eq!(counter.fetched_bytes() - before, 256 << 10);
    }

    /// A block goes into the on-disk map only after its data is synced (by the flusher, in
    /// batches, or flush()); a crash before that loses the block, never serves it. An evicted
    /// block leaves the on-disk map before its hole is punched.
    #[test]
    fn blob_cache_records_blocks_only_after_sync() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let cache =
            BlobCache::open_with(&cfg(&dir, 1 << 30, BS), &dir, Duration::from_secs(3600)).unwrap();
        let fake = Fake::new(8 * BS as usize, 12);
        let blob = cached(&cache, &fake);
        let (data_path, map_path) = paths_of(&cache, &fake);
        let on_disk = || fs::read(&map_path).unwrap()[META_LEN as usize];
        // What a restart after a crash right now would find: a copy of the files.
        let crash_copy = |name: &str| -> (tempfile::TempDir, Arc<BlobCache>) {
            let t = tempfile::tempdir().unwrap();
            for p in [&data_path, &map_path] {
                let copy = t.path().join(name).join(p.strip_prefix(&dir).unwrap());
                fs::create_dir_all(copy.parent().unwrap()).unwrap();
                fs::copy(p, copy).unwrap();
            }
            let root = t.path().join(name);
            let c = BlobCache::open(&cfg(&root, 1 << 30, BS), &root).unwrap();
            (t, c)
        };

        let _ = read(&blob, 0, 3 * BS as usize);
        assert!(
            nowait(&blob, 0, 3 * BS as usize).is_ok(),
            "served before it is synced"
        );
        assert_eq!(on_disk(), 0, "recorded before it was synced");
        let (_t, c) = crash_copy("before");
        assert_eq!(c.stats().cached_bytes, 0);

        cache.flush().unwrap();
        assert_eq!(on_disk(), 0b111);
        let (_t, c) = crash_copy("after");
        assert_eq!(c.stats().cached_bytes, 3 * BS);
        let b = cached(&c, &fake);
        assert!(nowait(&b, 0, 3 * BS as usize).unwrap() == fake.data[..3 * BS as usize]);

        // Eviction: off the disk map at once.
        blob.evict(BS, 1);
        assert_eq!(on_disk(), 0b101);
        // Written, evicted and written again before any flush: recorded once synced.
        let _ = read(&blob, 5 * BS, 10);
        blob.evict(5 * BS, 1);
        let _ = read(&blob, 5 * BS, 10);
        assert_eq!(on_disk(), 0b101);
        drop(blob); // the last handle flushes
        assert_eq!(on_disk(), 0b10_0101);
        drop(cache);

        // In the background, shortly after the writes.
        let dir2 = tmp.path().join("cache2");
        let cache =
            BlobCache::open_with(&cfg(&dir2, 1 << 30, BS), &dir2, Duration::from_millis(50))
                .unwrap();
        let blob = cached(&cache, &fake);
        let _ = read(&blob, 2 * BS, 10);
        let map2 = paths_of(&cache, &fake).1;
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::read(&map2).unwrap()[META_LEN as usize] != 0b100 {
            assert!(Instant::now() < deadline, "not flushed in the background");
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = data_path;
    }

    #[test]
    fn blob_cache_rejects_bad_input() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cfg(tmp.path(), 1 << 30, BS);
        c.refill_kb = 3;
        assert!(BlobCache::open(&c, tmp.path()).is_err());
        let cache = BlobCache::open(&cfg(tmp.path(), 1 << 30, BS), tmp.path()).unwrap();
        let fake = Fake::new(BS as usize, 10);
        let blob = cached(&cache, &fake);
        // The same digest with another size (one of them is wrong): an entry of its own.
        let mut other = Fake::new(2 * BS as usize, 10);
        Arc::get_mut(&mut other).unwrap().digest = fake.digest.clone();
        let first = blob;
        let blob = CachedBlob::with_source(cache.clone(), other.clone()).unwrap();
        assert_eq!(read(&first, 0, 10), &fake.data[..10]);
        assert_eq!(
            read(&blob, BS, 10),
            &other.data[BS as usize..BS as usize + 10]
        );
        let mut bad = Fake::new(10, 11);
        Arc::get_mut(&mut bad).unwrap().digest = "sha256:../../x".into();
        assert!(CachedBlob::with_source(cache.clone(), bad).is_err());
        // A size no blob has (from a descriptor): refused, not allocated for.
        struct Huge(Arc<Fake>);
        impl BlockSource for Huge {
            fn fetch_ranges(&self, r: &[(u64, usize)]) -> io::Result<Vec<Vec<u8>>> {
                self.0.fetch_ranges(r)
            }
            fn size(&self) -> u64 {
                MAX_BLOB_SIZE + 1
            }
            fn name(&self) -> &str {
                self.0.name()
            }
            fn digest(&self) -> &str {
                self.0.digest()
            }
            fn origin(&self) -> String {
                self.0.origin()
            }
        }
        let huge = Arc::new(Huge(Fake::new(10, 12)));
        let e = CachedBlob::with_source(cache.clone(), huge).err().unwrap();
        assert!(
            format!("{e:#}").contains("larger than the cache takes"),
            "{e:#}"
        );
        // Reads at or past the end, empty reads.
        assert_eq!(read(&blob, 2 * BS, 10).len(), 0);
        assert_eq!(read(&blob, 0, 0).len(), 0);
        assert_eq!(nowait(&blob, 5 * BS, 10).unwrap().len(), 0);
    }

    /// Blocks cached from one registry repository are not served to a reader of the same
    /// digest from another: a hostile registry that served a tampered copy under the real
    /// digest poisons its own entry only, also after a restart.
    #[test]
    fn blob_cache_origins_do_not_share_unverified_blocks() {
        let tmp = tempfile::tempdir().unwrap();
        let honest = Fake::new(8 * BS as usize, 31);
        let mut bad = honest.data.clone();
        for b in 0..8 {
            bad[(b * BS + 100) as usize] ^= 0xff;
        }
        let evil = Fake::served(bad.clone(), &honest.digest, "127.0.0.1:6000/evil/app");
        let honest = Fake::served(honest.data.clone(), &honest.digest, "127.0.0.1:5000/app");
        {
            let cache = BlobCache::open(&cfg(tmp.path(), 1 << 30, BS), tmp.path()).unwrap();
            let e = cached(&cache, &evil);
            assert!(read(&e, 0, 8 * BS as usize) == bad, "its own bytes");
            cache.flush().unwrap();
            let h = cached(&cache, &honest);
            assert!(
                is_would_block(nowait(&h, 0, 200)),
                "the other origin's block is served"
            );
            assert!(read(&h, 0, 8 * BS as usize) == honest.data);
            assert_eq!(honest.fetched(), 8 * BS, "fetched its own bytes");
            // Both entries live side by side.
            assert!(nowait(&e, 0, 8 * BS as usize).unwrap() == bad);
            assert!(nowait(&h, 0, 8 * BS as usize).unwrap() == honest.data);
        }
        // After a restart, each origin still gets its own bytes only.
        let cache = BlobCache::open(&cfg(tmp.path(), 1 << 30, BS), tmp.path()).unwrap();
        let third = Fake::served(honest.data.clone(), &honest.digest, "127.0.0.1:7000/other");
        let t = cached(&cache, &third);
        assert!(is_would_block(nowait(&t, 0, 200)));
        assert!(read(&t, 3 * BS, BS as usize) == honest.data[3 * BS as usize..4 * BS as usize]);
        let h = cached(&cache, &honest);
        assert!(nowait(&h, 0, 8 * BS as usize).unwrap() == honest.data);
    }

    /// One image's size claim for a digest cannot break another's entry: the two sizes are
    /// two entries, each works (or fails) alone, in either order, open or closed.
    #[test]
    fn blob_cache_size_lie_does_not_break_another_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(&cfg(tmp.path(), 1 << 30, BS), tmp.path()).unwrap();
        let real = Fake::new(4 * BS as usize, 41);
        let honest = Fake::served(real.data.clone(), &real.digest, "127.0.0.1:5000/app");
        let mut long = real.data.clone();
        long.extend_from_slice(&random_bytes(2 * BS as usize, 42));
        for origin in ["127.0.0.1:6000/evil", "127.0.0.1:5000/app"] {
            let liar = Fake::served(long.clone(), &real.digest, origin);
            // The liar first, still open: the honest open and reads work.
            let l = cached(&cache, &liar);
            assert!(read(&l, 0, 6 * BS as usize) == long);
            let h = CachedBlob::with_source(cache.clone(), honest.clone())
                .unwrap_or_else(|e| panic!("{origin}: honest open: {e:#}"));
            assert!(read(&h, 0, 4 * BS as usize) == real.data, "{origin}");
            // The honest entry, closed, survives the liar's next open.
            drop(h);
            drop(l);
            let before = honest.fetched();
            let l = cached(&cache, &liar);
            let h = cached(&cache, &honest);
            assert!(
                nowait(&h, 0, 4 * BS as usize).unwrap() == real.data,
                "{origin}: the honest entry was dropped"
            );
            assert!(read(&l, 4 * BS, 2 * BS as usize) == long[4 * BS as usize..]);
            assert_eq!(honest.fetched(), before, "{origin}");
            drop(h);
            drop(l);
            // The honest entry first, then the liar: the same.
            let h = cached(&cache, &honest);
            let l = cached(&cache, &liar);
            assert!(nowait(&h, 0, 4 * BS as usize).unwrap() == real.data);
            assert_eq!(
                read(&l, 5 * BS, 10),
                &long[5 * BS as usize..5 * BS as usize + 10]
            );
        }
    }

    /// Once a whole download matched the digest, every origin shares one verified entry: the
    /// blocks the downloading origin had cached are copied in from the download, and a block
    /// fetched into it must hash as the download's did (a tampered one fails, uncached).
    #[test]
    fn blob_cache_verified_blob_is_shared_across_origins() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let real = Fake::new(8 * BS as usize + 500, 61);
        let a = Fake::served(real.data.clone(), &real.digest, "127.0.0.1:5000/a");
        let b = Fake::served(real.data.clone(), &real.digest, "127.0.0.1:5001/b");
        let mut bad = real.data.clone();
        bad[6 * BS as usize + 1] ^= 1;
        let evil = Fake::served(bad, &real.digest, "127.0.0.1:6000/evil");
        let file = tmp.path().join("download");
        fs::write(&file, &real.data).unwrap();
        {
            let cache = BlobCache::open(&cfg(&dir, 1 << 30, BS), &dir).unwrap();
            let ra = cached(&cache, &a);
            assert!(!ra.is_verified());
            let _ = read(&ra, 0, 3 * BS as usize);
            // A file that is not the blob verifies nothing.
            let wrong = tmp.path().join("wrong");
            fs::write(&wrong, &real.data[1..]).unwrap();
            let e = cache
                .add_verified(&real.digest, &wrong, Some(&ra))
                .unwrap_err();
            assert!(format!("{e:#}").contains("not sha256:"), "{e:#}");
            assert!(!cached(&cache, &b).is_verified());

            cache.add_verified(&real.digest, &file, Some(&ra)).unwrap();
            let rb = cached(&cache, &b);
            assert!(rb.is_verified());
            assert!(nowait(&rb, 0, 3 * BS as usize).unwrap() == real.data[..3 * BS as usize]);
            assert_eq!(b.fetched(), 0, "copied from the download");
            assert!(read(&rb, 5 * BS, 10) == real.data[5 * BS as usize..5 * BS as usize + 10]);
            assert_eq!(b.fetched(), BS);
            // Another origin reads what b fetched, and cannot put its tampered block in.
            let re = cached(&cache, &evil);
            assert!(re.is_verified());
            assert!(
                nowait(&re, 5 * BS, 10).unwrap()
                    == real.data[5 * BS as usize..5 * BS as usize + 10]
            );
            let mut buf = vec![0u8; 10];
            let e = re.read_at(&mut buf, 6 * BS).unwrap_err();
            assert!(e.to_string().contains("does not match"), "{e}");
            assert!(is_would_block(nowait(&re, 6 * BS, 10)));
            assert!(read(&rb, 6 * BS, 10) == real.data[6 * BS as usize..6 * BS as usize + 10]);
            // An image that claims another size for a verified digest is refused.
            let liar = Fake::served(
                real.data[..4 * BS as usize].to_vec(),
                &real.digest,
                "127.0.0.1:6000/evil",
            );
            let e = CachedBlob::with_source(cache.clone(), liar).unwrap_err();
            assert!(format!("{e:#}").contains("matched the digest"), "{e:#}");
        }
        // After a restart: the same, for a new origin too.
        let cache = BlobCache::open(&cfg(&dir, 1 << 30, BS), &dir).unwrap();
        let c = Fake::served(real.data.clone(), &real.digest, "127.0.0.1:5002/c");
        let rc = cached(&cache, &c);
        assert!(rc.is_verified());
        assert!(
            nowait(&rc, 5 * BS, 2 * BS as usize).unwrap()
                == real.data[5 * BS as usize..7 * BS as usize]
        );
        assert_eq!(c.fetched(), 0);
        // Damaged block hashes drop the verified entry (never trusted, never wrongly refusing).
        let sums = sums_path(&rc.state.map_path);
        drop(rc);
        drop(cache);
        let f = OpenOptions::new().write(true).open(&sums).unwrap();
        f.write_all_at(&[0xAA; 4], META_LEN + 40).unwrap();
        let cache = BlobCache::open(&cfg(&dir, 1 << 30, BS), &dir).unwrap();
        assert!(!sums.exists());
        let rc = cached(&cache, &c);
        assert!(!rc.is_verified());
        assert!(is_would_block(nowait(&rc, 0, 10)));
    }

    /// Files of the earlier layout (one entry per digest, whoever served it) are deleted at
    /// start; an entry moved into another origin's directory is not taken as that origin's.
    #[test]
    fn blob_cache_does_not_trust_old_or_moved_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let fake = Fake::new(4 * BS as usize, 71);
        let other = Fake::served(fake.data.clone(), &fake.digest, "127.0.0.1:7000/other");
        let (data, map) = {
            let cache = BlobCache::open(&cfg(&dir, 1 << 30, BS), &dir).unwrap();
            let _ = read(&cached(&cache, &fake), 0, 4 * BS as usize);
            paths_of(&cache, &fake)
        };
        let old = dir.join("sha256");
        fs::create_dir_all(&old).unwrap();
        let hex_digest = &fake.digest[7..];
        fs::copy(&data, old.join(format!("{hex_digest}.data"))).unwrap();
        fs::copy(&map, old.join(format!("{hex_digest}.map"))).unwrap();
        // The entry's files under the other origin's name.
        let (odata, omap) = {
            let c = BlobCache::open(
                &cfg(&tmp.path().join("x"), 1 << 30, BS),
                &tmp.path().join("x"),
            )
            .unwrap();
            let p = paths_of(&c, &other);
            let rel = |p: &Path| dir.join(p.strip_prefix(tmp.path().join("x")).unwrap());
            (rel(&p.0), rel(&p.1))
        };
        fs::create_dir_all(omap.parent().unwrap()).unwrap();
        fs::rename(&data, &odata).unwrap();
        fs::rename(&map, &omap).unwrap();
        let cache = BlobCache::open(&cfg(&dir, 1 << 30, BS), &dir).unwrap();
        assert!(!old.exists(), "the earlier version's files are left");
        assert_eq!(cache.stats().cached_bytes, 0);
        assert!(!omap.exists() && !odata.exists());
        let r = cached(&cache, &other);
        assert!(is_would_block(nowait(&r, 0, 10)));
    }

    /// A failed sync of the data file loses the blocks written before it (Linux reports a
    /// writeback error once and marks the pages clean, so a later sync succeeds over lost
    /// data): they are not recorded, not served, and a read fetches them again.
    #[test]
    fn blob_cache_drops_blocks_whose_sync_failed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let cache =
            BlobCache::open_with(&cfg(&dir, 1 << 30, BS), &dir, Duration::from_secs(3600)).unwrap();
        let fake = Fake::new(4 * BS as usize, 81);
        let blob = cached(&cache, &fake);
        let map = paths_of(&cache, &fake).1;
        let on_disk = || fs::read(&map).unwrap()[META_LEN as usize];
        let _ = read(&blob, 0, 2 * BS as usize);
        blob.state.fail_sync.store(true, SeqCst);
        let e = cache.flush().unwrap_err();
        assert!(e.to_string().contains(&fake.digest), "{e}");
        // The next sync succeeds: the lost blocks must not be recorded.
        cache.flush().unwrap();
        assert_eq!(on_disk(), 0, "blocks whose sync failed were recorded");
        assert!(
            is_would_block(nowait(&blob, 0, 10)),
            "served after a failed sync"
        );
        assert_eq!(blob.cached_bytes(), 0);
        assert_eq!(cache.stats().cached_bytes, 0);
        let before = fake.fetched();
        assert!(read(&blob, 0, 2 * BS as usize) == fake.data[..2 * BS as usize]);
        assert_eq!(fake.fetched() - before, 2 * BS, "fetched again");
        cache.flush().unwrap();
        assert_eq!(on_disk(), 0b11);
    }

    /// Eviction over a large blob with few blocks cached (candidates are its set bits) still
    /// takes the least recently used blocks, and they come back right.
    #[test]
    fn blob_cache_evicts_lru_blocks_of_a_large_sparse_blob() {
        /// 16 GiB of bytes made from their offsets.
        struct Synth(AtomicU64);
        const SIZE: u64 = 16 << 30;
        fn byte(o: u64) -> u8 {
            (o.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
        }
        impl BlockSource for Synth {
            fn fetch_ranges(&self, ranges: &[(u64, usize)]) -> io::Result<Vec<Vec<u8>>> {
                self.0.fetch_add(ranges.len() as u64, SeqCst);
                Ok(ranges
                    .iter()
                    .map(|&(off, len)| (off..off + len as u64).map(byte).collect())
                    .collect())
            }
            fn size(&self) -> u64 {
                SIZE
            }
            fn name(&self) -> &str {
                "synth"
            }
            fn digest(&self) -> &str {
                "sha256:5555555555555555555555555555555555555555555555555555555555555555"
            }
            fn origin(&self) -> String {
                "127.0.0.1:5000/synth".into()
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(&cfg(tmp.path(), 4 * BS, BS), tmp.path()).unwrap();
        let src = Arc::new(Synth(AtomicU64::new(0)));
        let blob = CachedBlob::with_source(cache.clone(), src.clone()).unwrap();
        let last = SIZE / BS - 1;
        let check = |b: u64| {
            let got = read(&blob, b * BS + 3, 100);
            assert!(
                got.iter().zip(b * BS + 3..).all(|(&v, o)| v == byte(o)),
                "block {b}"
            );
        };
        for b in [7, 100_000, 200_000, last, 7] {
            check(b);
        }
        assert_eq!(cache.stats().cached_bytes, 4 * BS);
        // Over the limit: down to 90% of it, the two least recently used go.
        check(150_000);
        for (b, kept) in [
            (7, true),
            (100_000, false),
            (200_000, false),
            (last, true),
            (150_000, true),
        ] {
            assert_eq!(nowait(&blob, b * BS, 10).is_ok(), kept, "block {b}");
        }
        assert_eq!(cache.stats().cached_bytes, 3 * BS);
        let calls = src.0.load(SeqCst);
        check(100_000);
        assert_eq!(src.0.load(SeqCst), calls + 1, "fetched again");
    }
}
