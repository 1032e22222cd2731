//! The on-disk format of an entry: its scope and key, the header of its map (and trailer of its
//! data file, and header of its block hashes), where its files are, and how they are written.

use super::error::CacheError;
use super::lock;
use super::state::{set_bit, BlobState};
use crate::oci::digest::hex;
use crate::oci::digest::valid_digest;
use sha2::{Digest as _, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub(super) const MAP_MAGIC: &[u8; 8] = b"OVBDCMAP";
pub(super) const DATA_MAGIC: &[u8; 8] = b"OVBDCDAT";
pub(super) const SUMS_MAGIC: &[u8; 8] = b"OVBDCSUM";
/// 2: entries per origin and verified entries (1 had one entry per digest for every origin).
pub(super) const VERSION: u32 = 2;
/// Bytes of one block hash in a `.sums` file.
pub(super) const SUM_LEN: u64 = 32;
/// Header of a map file and trailer of a data file.
pub(super) const META_LEN: u64 = 4096;

/// Whose bytes an entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Scope {
    /// Fetched from one origin (the sha256 of its normalized `host/repo`), served to it only.
    Origin([u8; 32]),
    /// Checked block by block against hashes taken from a download that matched the digest.
    // An entry of its own, not the downloaded file: that goes with its layer's snapshot, and
    // block hashes let any origin refill evicted blocks safely.
    Verified,
}

impl Scope {
    /// The scope of `origin` (`host[:port]/repo`; the host is case-insensitive).
    pub(super) fn of_origin(origin: &str) -> Scope {
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
pub(super) struct Key {
    pub(super) scope: Scope,
    pub(super) digest: String,
    pub(super) size: u64,
}

// ------------------------------------------------------------------------------ on-disk meta

/// What a map header or data trailer says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Meta {
    pub(super) scope: Scope,
    pub(super) digest: String,
    pub(super) size: u64,
    pub(super) block: u64,
    pub(super) nonce: [u8; 16],
}

impl Meta {
    pub(super) fn encode(&self, magic: &[u8; 8]) -> Vec<u8> {
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

    /// Reads a header written by [`Meta::encode`]; what is wrong otherwise, at which offset
    /// of the header.
    pub(super) fn decode(b: &[u8], magic: &[u8; 8]) -> Result<Meta, (u64, String)> {
        if b.len() < META_LEN as usize {
            return Err((0, format!("{} bytes: shorter than a header", b.len())));
        }
        if &b[0..8] != magic {
            return Err((0, "bad magic".into()));
        }
        // In bounds: `b` holds a whole header.
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let crc_at = META_LEN as usize - 4;
        if u32_at(crc_at) != ovbd_format::crc::crc32c_raw(0, &b[..crc_at]) {
            return Err((
                crc_at as u64,
                "header CRC does not match (torn or damaged)".into(),
            ));
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err((8, format!("version {version}, not {VERSION}")));
        }
        let dlen = u16::from_le_bytes([b[48], b[49]]) as usize;
        let digest = b
            .get(50..50 + dlen)
            .and_then(|d| std::str::from_utf8(d).ok())
            .ok_or_else(|| {
                (
                    48,
                    format!("digest of {dlen} bytes is not text inside the header"),
                )
            })?
            .to_owned();
        let scope = match b[12] {
            0 => Scope::Verified,
            1 => {
                let mut h = [0u8; 32];
                h.copy_from_slice(&b[192..224]);
                Scope::Origin(h)
            }
            other => return Err((12, format!("unknown scope {other}"))),
        };
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&b[32..48]);
        Ok(Meta {
            scope,
            digest,
            block: u64_at(16),
            size: u64_at(24),
            nonce,
        })
    }
}

pub(super) fn random_nonce() -> [u8; 16] {
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

pub(super) fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// Length of a data file for a blob of `size` bytes: data, then the trailer.
pub(super) fn data_len(size: u64) -> u64 {
    round_up(size, META_LEN) + META_LEN
}

pub(super) fn bitmap_len(nblocks: u64) -> usize {
    nblocks.div_ceil(8) as usize
}

/// Writes `bytes` (and sets the length to `len`) to a temporary file renamed to `path`, synced
/// first if `durable` (when a new entry's files need not be: [`super::state::BlobState::create`]).
pub(super) fn write_new_file(
    path: &Path,
    len: u64,
    writes: &[(u64, &[u8])],
    durable: bool,
) -> io::Result<()> {
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
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

pub(super) fn punch_hole(f: &File, off: u64, len: u64) -> io::Result<()> {
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
pub(super) fn entry_paths(dir: &Path, key: &Key) -> (PathBuf, PathBuf) {
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
pub(super) fn sums_path(map: &Path) -> PathBuf {
    map.with_extension("sums")
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
) -> Result<(PathBuf, PathBuf, PathBuf), CacheError> {
    if !valid_digest(digest) {
        return Err(CacheError::BadDigest {
            digest: digest.to_owned(),
        });
    }
    let key = Key {
        scope: origin.map_or(Scope::Verified, Scope::of_origin),
        digest: digest.to_owned(),
        size,
    };
    let paths = entry_paths(dir, &key);
    if let Some(d) = paths.1.parent() {
        fs::create_dir_all(d).map_err(|e| CacheError::io("creating", d, e))?;
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
            .write_all_at(&vec![0x5a; (end - start) as usize], start)
            .map_err(|e| CacheError::io_at("writing", &s.data_path, start, e))?;
        let mut inner = lock(&s.inner);
        set_bit(&mut inner.present, b, true);
        set_bit(&mut inner.durable, b, true);
        inner.dirty_gen += 1;
    }
    s.persist(&files)?;
    let sums = sums_path(&paths.1);
    Ok((paths.0, paths.1, sums))
}
