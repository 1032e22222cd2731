//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz): each runs one parser of
//! untrusted input (registry headers, docker config, image references and manifests, the
//! block cache's records, layer tars) the way ovbd runs it. Not an API: `#[doc(hidden)]`.
//!
//! A function returns `Err` (or `None`) for input it rejects; a panic, hang or abort in any of
//! them is a finding.

use crate::config::CacheConfig;
use crate::convert::apply::{Applier, ApplyStats};
use crate::extfs::{BlockDevice, ExtFs, MkfsParams};
use crate::oci::{ImageIo, ImageRef, LayoutTarget, Platform, RegistryOptions};
use crate::source::cache::BlobCache;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What [`registry_headers`] made of one value.
#[derive(Debug)]
pub struct Headers {
    /// `WWW-Authenticate` challenges understood (one value per line).
    pub challenges: usize,
    /// `Content-Range`: first, last, total (`None` for `*`).
    pub content_range: Option<(u64, u64, Option<u64>)>,
    /// `Retry-After`.
    pub retry_after: Option<Duration>,
}

/// The same bytes as `WWW-Authenticate`, `Content-Range` and `Retry-After` header values.
pub fn registry_headers(v: &[u8]) -> Headers {
    let text = String::from_utf8_lossy(v);
    let mut h = reqwest::header::HeaderMap::new();
    if let Ok(value) = reqwest::header::HeaderValue::from_bytes(v) {
        h.insert(reqwest::header::RETRY_AFTER, value);
    }
    Headers {
        challenges: crate::registry::parse_challenges(text.split('\n')).len(),
        content_range: crate::registry::parse_content_range(&text),
        retry_after: crate::registry::retry_after(&h),
    }
}

/// A `multipart/byteranges` body from a registry: the input's first line is the boundary
/// (as its `Content-Type` names it), the rest the body of a blob of 1 MiB. Returns the parts
/// found; each lies within the body and the blob, and is where [`locate`] finds its bytes.
///
/// [`locate`]: crate::registry::multipart::locate
pub fn registry_byteranges(data: &[u8]) -> Result<usize, String> {
    use crate::registry::multipart::{byteranges_boundary, locate, parse_byteranges};
    const SIZE: u64 = 1 << 20;
    let split = data
        .iter()
        .position(|&c| c == b'\n')
        .ok_or("no first line")?;
    let ct = format!(
        "multipart/byteranges; boundary={}",
        String::from_utf8_lossy(&data[..split])
    );
    let boundary = byteranges_boundary(&ct).ok_or("no boundary")?;
    let body = &data[split + 1..];
    let parts = parse_byteranges(body, boundary, SIZE)?;
    for p in &parts {
        assert!(
            p.at + p.len <= body.len() && p.start + p.len as u64 <= SIZE,
            "{p:?}"
        );
    }
    let asked: Vec<(u64, usize)> = parts.iter().map(|p| (p.start, p.len)).collect();
    let at = locate(&parts, &asked)?;
    for (a, p) in at.iter().zip(&parts) {
        // Another part may hold the same bytes first; it holds them whole.
        assert!(a + p.len <= body.len());
    }
    Ok(parts.len())
}

/// Where a docker `config.json` has the credentials for `registry` (its helpers are not run).
pub fn docker_config(text: &[u8], registry: &str) -> Result<()> {
    let path = Path::new("config.json");
    crate::registry::credentials::DockerConfig::parse(text, path)?
        .lookup(path, registry)
        .map(drop)
        .map_err(Into::into)
}

/// An image reference as `ovbd convert` / `ovbd rpull` take it, printed back.
pub fn image_ref(s: &str) -> Result<String> {
    ImageRef::parse(s).map(|r| r.to_string())
}

/// A registry reference as ovbd's parser and as oci-spec's take it (printed, or None where
/// refused), to check one against the other.
pub fn registry_ref_both(s: &str) -> (Option<String>, Option<String>) {
    let ours = crate::oci::parse_registry_ref(s).ok().map(|r| r.whole());
    let theirs = s.parse::<crate::oci::Reference>().ok().map(|r| r.whole());
    (ours, theirs)
}

/// Resolves tag `t` of the OCI layout at `dir` (index.json, nested indexes, manifest, config:
/// each size and digest checked) for linux/amd64, then reads the config as `ovbd convert`
/// does. Returns the layer count.
pub fn oci_layout(dir: &Path) -> Result<usize> {
    thread_local! {
        static IO: Result<ImageIo, String> =
            ImageIo::new(RegistryOptions::default()).map_err(|e| format!("{e:#}"));
    }
    let r = ImageRef::Layout {
        dir: dir.to_owned(),
        target: LayoutTarget::Tag("t".into()),
    };
    let platform: Platform = "linux/amd64".parse()?;
    IO.with(|io| {
        let io = io.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        let img = io.resolve(&r, &platform)?;
        let (_, diff_ids, _) = crate::convert::source_config(&img, "fuzz")?;
        Ok(diff_ids.len())
    })
}

/// Opens a block cache at `dir` (size limit 1 MiB, 256 KiB blocks) over whatever files are
/// there, as the daemon does at start (eviction included), closes it and opens it again;
/// returns the bytes found cached each time.
pub fn block_cache(dir: &Path) -> Result<(u64, u64)> {
    let cfg = CacheConfig {
        dir: Some(dir.to_owned()),
        size_gb: 1.0 / 1024.0,
        refill_kb: 256,
        whole_blob_kb: 0,
        file_chunk_kb: 0,
    };
    let first = BlobCache::open_with(&cfg, dir, Duration::from_secs(3600))?
        .stats()
        .cached_bytes;
    let second = BlobCache::open_with(&cfg, dir, Duration::from_secs(3600))?
        .stats()
        .cached_bytes;
    Ok((first, second))
}

/// An in-memory disk for [`layer_tar`].
struct MemDisk(Mutex<Vec<u8>>);

impl MemDisk {
    /// Runs `f` on bytes `[offset, offset + len)` of the disk, or fails if they are not on it.
    fn with_range<T>(
        &self,
        offset: u64,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> T,
    ) -> std::io::Result<T> {
        let mut d = self
            .0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        let range = usize::try_from(offset)
            .ok()
            .and_then(|o| d.get_mut(o..o.checked_add(len)?))
            .ok_or_else(|| {
                std::io::Error::other(format!("{len} bytes at {offset}: past the end"))
            })?;
        Ok(f(range))
    }
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().map_or(0, |d| d.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.with_range(offset, buf.len(), |r| buf.copy_from_slice(r))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.with_range(offset, buf.len(), |r| r.copy_from_slice(buf))
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Applies an uncompressed layer tar onto a new 8 MiB ext4 as `ovbd convert` does, closes
/// the filesystem, opens it again and applies the same tar once more (as an upper layer: every
/// entry now meets an existing one).
pub fn layer_tar(tar: &[u8]) -> Result<(ApplyStats, ApplyStats)> {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDisk(Mutex::new(vec![0; 8 << 20])));
    let params = MkfsParams {
        uuid: [7; 16],
        now: 1_700_000_000,
    };
    let fs = ExtFs::mkfs(dev.clone(), &params)?;
    let first = Applier::new(&fs, params.now).apply(tar);
    fs.close().context("closing after the first apply")?;
    let first = first?;
    let fs = ExtFs::open(dev, params.now)?;
    let second = Applier::new(&fs, params.now).apply(tar);
    fs.close().context("closing after the second apply")?;
    Ok((first, second?))
}

/// Leaves in `dir` what a cache with one entry of a blob of `size` bytes (digest `digest`; from
/// `origin`, or verified if `None`) and blocks `present` written and recorded looks like after a
/// clean stop: seeds for the cache target. Returns its data, map and (verified) sums paths.
pub fn block_cache_sample(
    dir: &Path,
    origin: Option<&str>,
    digest: &str,
    size: u64,
    present: &[u64],
) -> Result<(PathBuf, PathBuf, PathBuf)> {
    Ok(crate::source::cache::write_sample(
        dir,
        origin,
        digest,
        size,
        256 << 10,
        present,
    )?)
}

/// Where the cache at `dir` keeps the data, map and (verified) sums files of an entry: blob
/// `digest` (valid) of `size` bytes, from `origin` or verified (`None`).
pub fn block_cache_paths(
    dir: &Path,
    origin: Option<&str>,
    digest: &str,
    size: u64,
) -> (PathBuf, PathBuf, PathBuf) {
    crate::source::cache::sample_paths(dir, origin, digest, size)
}

/// The file readahead's ext4 parsing ([`crate::readahead`]) with `disk` as the disk's bytes:
/// the superblock, the group descriptors, then every inode table slot in `disk` noted (as the
/// device's reads of them would be), and the chunk at each noted range taken. Returns the
/// chunks taken; each must be at most one chunk of bytes, inside the disk.
pub fn ext4_readahead(disk: &[u8]) -> Result<usize> {
    use crate::extfs::layout::{Geometry, SUPERBLOCK_LEN, SUPERBLOCK_OFFSET};
    const CHUNK: u64 = 64 << 10;
    let size = disk.len() as u64;
    let at = SUPERBLOCK_OFFSET as usize;
    let sb = disk.get(at..at + SUPERBLOCK_LEN).context("no superblock")?;
    let geometry = Geometry::parse(sb, size)?;
    let gdt = disk
        .get(geometry.gdt_offset as usize..)
        .context("no group descriptors")?;
    let tables = geometry.inode_tables(gdt, size)?;
    let ra = crate::readahead::FileReadahead::with_layout(size, CHUNK, geometry, tables.clone());
    ra.note_inodes(disk, 0);
    let mut taken = 0;
    for t in &tables {
        for at in (t.offset..t.offset + t.len).step_by(4096) {
            let _ = ra.take_chunk(at);
        }
    }
    // Every noted file an ELF file: its chunks become one, as long as the file at most.
    for at in (0..size).step_by(512) {
        ra.note_elf(b"\x7fELF", at);
    }
    for at in (0..size).step_by(512) {
        if let Some(chunk) = ra.take_chunk(at) {
            let bytes: u64 = chunk.iter().map(|(s, e)| e - s).sum();
            assert!(
                bytes <= CHUNK.max(crate::readahead::WHOLE_ELF_MAX),
                "a chunk of {bytes} bytes"
            );
            assert!(chunk.iter().all(|&(s, e)| s < e && e <= size), "{chunk:?}");
            taken += 1;
        }
    }
    Ok(taken)
}
