//! Verified entries: a blob whose whole download matched its digest is shared by every origin,
//! each block checked against the block hashes taken from that download.

use super::blob_cache::BlobCache;
use super::cached_blob::CachedBlob;
use super::error::CacheError;
use super::lock;
use super::record::*;
use super::state::{set_bit, BlobState, Files};
use super::MAX_BLOB_SIZE;
use crate::oci::digest::hex;
use crate::oci::digest::valid_digest;
use sha2::{Digest as _, Sha256, Sha512};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Checks that the `.sums` file at `path` is whole and belongs to the entry `meta` describes.
pub(super) fn check_sums(path: &Path, meta: &Meta, nblocks: u64) -> Result<(), CacheError> {
    let read_at = |f: &File, buf: &mut [u8], off: u64| {
        f.read_exact_at(buf, off)
            .map_err(|e| CacheError::io_at("reading", path, off, e))
    };
    let f = File::open(path).map_err(|e| CacheError::io("opening", path, e))?;
    let body_len = META_LEN + nblocks * SUM_LEN;
    let len = f
        .metadata()
        .map_err(|e| CacheError::io("reading the metadata of", path, e))?
        .len();
    if len != body_len + SUM_LEN {
        return Err(CacheError::bad_record(
            path,
            len.min(body_len + SUM_LEN),
            format!(
                "{len} bytes, not the {} of the hashes of {nblocks} blocks",
                body_len + SUM_LEN
            ),
        ));
    }
    let mut header = vec![0u8; META_LEN as usize];
    read_at(&f, &mut header, 0)?;
    let found = Meta::decode(&header, SUMS_MAGIC)
        .map_err(|(at, why)| CacheError::bad_record(path, at, why))?;
    if &found != meta {
        return Err(CacheError::bad_record(
            path,
            0,
            "header is not its map's (made for another entry)",
        ));
    }
    // Streamed: the file has one hash per block, which can be many.
    let mut h = Sha256::new_with_prefix(&header);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = META_LEN;
    while off < body_len {
        let n = (body_len - off).min(buf.len() as u64) as usize;
        read_at(&f, &mut buf[..n], off)?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    let mut want = [0u8; 32];
    read_at(&f, &mut want, body_len)?;
    if h.finalize()[..] != want {
        return Err(CacheError::bad_record(
            path,
            body_len,
            "the hash of the block hashes does not match them",
        ));
    }
    Ok(())
}

impl BlobState {
    /// Copies into this new entry (not yet seen by readers) the blocks `other` has present,
    /// with their stamps, reading them from `src` (the verified blob); synced and recorded.
    /// Returns the bytes copied; on failure the entry's files are removed.
    pub(super) fn copy_blocks_from(
        &self,
        other: &BlobState,
        src: &File,
        src_path: &Path,
    ) -> Result<u64, CacheError> {
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
        let copy = || -> Result<u64, CacheError> {
            let files = self.open_files()?;
            let mut buf = vec![0u8; self.block as usize];
            let mut bytes = 0;
            for &(b, _) in &blocks {
                let (s, e) = self.block_range(b);
                let n = (e - s) as usize;
                src.read_exact_at(&mut buf[..n], s)
                    .map_err(|e| CacheError::io_at("reading", src_path, s, e))?;
                files
                    .data
                    .write_all_at(&buf[..n], s)
                    .map_err(|e| CacheError::io_at("writing", &self.data_path, s, e))?;
                bytes += n as u64;
            }
            self.sync_data(&files.data)
                .map_err(|e| CacheError::io("syncing", &self.data_path, e))?;
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
}

impl BlobCache {
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
    ) -> Result<(), CacheError> {
        if !valid_digest(digest) {
            return Err(CacheError::BadDigest {
                digest: digest.to_owned(),
            });
        }
        let _one = lock(&self.verifying);
        if lock(&self.blobs)
            .keys()
            .any(|k| k.scope == Scope::Verified && k.digest == digest)
        {
            return Ok(());
        }
        let src = File::open(file).map_err(|e| CacheError::io("opening", file, e))?;
        let size = src
            .metadata()
            .map_err(|e| CacheError::io("reading the metadata of", file, e))?
            .len();
        if size > MAX_BLOB_SIZE {
            return Err(CacheError::TooLarge {
                what: file.display().to_string(),
                size,
            });
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
                .map_err(|e| CacheError::io_at("reading", file, off, e))?;
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
            return Err(CacheError::DigestMismatch {
                file: file.to_owned(),
                got,
                want: digest.to_owned(),
            });
        }
        let key = Key {
            scope: Scope::Verified,
            digest: digest.to_owned(),
            size,
        };
        let paths = self.paths(&key);
        let dir = paths.1.parent().map(Path::to_path_buf).unwrap_or_default();
        fs::create_dir_all(&dir).map_err(|e| CacheError::io("creating", &dir, e))?;
        let s = BlobState::create(paths, &key, self.block, Some(&sums))?;
        // Not visible to readers yet: filled, synced and recorded before it is.
        let copied = match from.filter(|f| f.state.size == size && f.state.digest == digest) {
            Some(f) => s.copy_blocks_from(&f.state, &src, file)?,
            None => 0,
        };
        self.total.fetch_add(copied, Relaxed);
        lock(&self.blobs).insert(key, Arc::new(s));
        log::info!("block cache: {digest} verified ({size} bytes): shared by every registry from now on, {copied} bytes cached");
        self.maybe_evict();
        Ok(())
    }
}

impl CachedBlob {
    /// `file` holds this blob (checked: its hash must match the digest): the cache shares it
    /// with every origin from now on ([`BlobCache::add_verified`]).
    pub fn mark_verified(&self, file: &Path) -> Result<(), CacheError> {
        self.cache
            .add_verified(&self.state.digest, file, Some(self))
    }

    /// A verified entry takes a fetched block only if it hashes as the verified blob's block
    /// did; `ranges` start on blocks and `data` holds them.
    pub(super) fn check_blocks(
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
                    .map_err(|e| CacheError::Blob {
                        name: self.name.clone(),
                        path: sums_path(&st.map_path),
                        offset: META_LEN + b * SUM_LEN,
                        what: "reading the block hash",
                        source: e,
                    })?;
                if Sha256::digest(bytes)[..] != want {
                    let e = CacheError::BlockMismatch {
                        name: self.name.clone(),
                        origin: self.source.origin(),
                        offset: b * st.block,
                        digest: st.digest.clone(),
                    };
                    log::warn!("{e}");
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }
}
