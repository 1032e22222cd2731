//! The background download of a remote layer's whole blob into its directory: fetched
//! straight from the registry (not through the cache: a whole blob must not evict it), paced,
//! sha256-checked, then renamed to `overlaybd.commit`. When it ends, [`finish_download`] makes
//! the cache share the blob (verified) and switches the layer's reads to the file, or, if the
//! bytes do not match the digest, drops what the registry sent and fails the layer.

use crate::source::cache::CachedBlob;
use crate::source::remote::SwitchingBlob;
use ovbd_format::ReadAt;
use sha2::{Digest as _, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a background download failed; it leaves no file.
#[derive(Debug, thiserror::Error)]
pub(super) enum DownloadError {
    #[error("{0} is not a sha256 digest")]
    NotSha256(String),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Read(#[from] ovbd_format::Error),
    #[error("pacing at {0} bytes/s: not a usable rate")]
    Pace(f64),
    /// The downloaded bytes of a blob have another digest than the one they were asked for by.
    #[error("downloaded blob has {got}, not {want}")]
    DigestMismatch { got: String, want: String },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DownloadError {
    let path = path.to_owned();
    move |source| DownloadError::Io { what, path, source }
}

/// One background download: the blob to `DIR/.download`, sha256 checked against the digest,
/// synced, then renamed to `DIR/overlaybd.commit` (as upstream). A failure leaves no file.
pub(super) struct Download {
    pub(super) source: Arc<dyn ReadAt>,
    pub(super) digest: String,
    pub(super) dir: PathBuf,
    pub(super) delay: Duration,
    /// 0: unlimited.
    pub(super) max_bytes_per_sec: f64,
}

impl Download {
    const CHUNK: usize = 4 << 20;

    /// Runs the download on a thread of its own, then [`finish_download`], then `ended` with
    /// the layer directory.
    pub(super) fn start(
        self,
        target: Arc<SwitchingBlob>,
        cached: Arc<CachedBlob>,
        image_ref: String,
        ended: impl FnOnce(&Path) + Send + 'static,
    ) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("ovbd-download".into())
            .spawn(move || {
                let result = self.run();
                finish_download(&self, result, &target, &cached, &image_ref);
                ended(&self.dir);
            })
            .map(drop)
    }

    pub(super) fn run(&self) -> Result<PathBuf, DownloadError> {
        std::thread::sleep(self.delay);
        let done = self.dir.join("overlaybd.commit");
        if done.exists() {
            return Ok(done);
        }
        let want = self
            .digest
            .strip_prefix("sha256:")
            .ok_or_else(|| DownloadError::NotSha256(self.digest.clone()))?;
        let tmp = self.dir.join(".download");
        let result = self.fetch_to(&tmp, want);
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result?;
        std::fs::rename(&tmp, &done).map_err(io_error("renaming to overlaybd.commit", &tmp))?;
        Ok(done)
    }

    fn fetch_to(&self, tmp: &Path, want_hex: &str) -> Result<(), DownloadError> {
        let mut out = std::fs::File::create(tmp).map_err(io_error("creating", tmp))?;
        let (size, started) = (self.source.size(), Instant::now());
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; Self::CHUNK];
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(Self::CHUNK as u64) as usize;
            ovbd_format::source::read_exact_at(&*self.source, &mut buf[..n], off)?;
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_error("writing", tmp))?;
            off += n as u64;
            if self.max_bytes_per_sec > 0.0 {
                let due = Duration::try_from_secs_f64(off as f64 / self.max_bytes_per_sec)
                    .map_err(|_| DownloadError::Pace(self.max_bytes_per_sec))?;
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        let got = crate::oci::digest::digest_of_hashed(hasher);
        if got.strip_prefix("sha256:") != Some(want_hex) {
            return Err(DownloadError::DigestMismatch {
                got,
                want: self.digest.clone(),
            });
        }
        out.sync_all().map_err(io_error("syncing", tmp))?;
        Ok(())
    }
}

/// What a finished download of layer blob `job.digest` of `image_ref` (`host/repo`) changes:
/// on success the cache takes the file as the blob's verified copy and reads of the layer go
/// to the file; if the bytes do not match the digest, the registry lied: what it sent for the
/// blob is dropped from the cache and the layer's reads fail.
pub(super) fn finish_download(
    job: &Download,
    result: Result<PathBuf, DownloadError>,
    target: &SwitchingBlob,
    cached: &CachedBlob,
    image_ref: &str,
) {
    let registry = image_ref.split('/').next().unwrap_or(image_ref);
    match result {
        Ok(file) => {
            log::info!("downloaded {} to {}", job.digest, file.display());
            if let Err(e) = cached.mark_verified(&file) {
                log::warn!("block cache: {} of {image_ref}: {e:#}", job.digest);
            }
            if let Err(e) = target.switch_to_file(&file) {
                log::warn!("{}: {e:#}", file.display());
            }
        }
        Err(e @ DownloadError::DigestMismatch { .. }) => {
            let freed = cached.purge();
            let why = format!(
                "image {image_ref}: layer blob {}: registry {registry} served bytes that do not \
                 match the digest ({e})",
                job.digest
            );
            log::error!(
                "{why}: dropped its {freed} cached bytes; reads of the layer fail from now on"
            );
            target.fail(why);
        }
        Err(e) => log::warn!("background download of {} of {image_ref}: {e}", job.digest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::cache::BlobCache;
    use ovbd_format::MemSource;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Counts the reads that reach it.
    struct Counting(MemSource, AtomicU64);
    impl ReadAt for Counting {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.read_at(buf, offset)
        }
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn name(&self) -> &str {
            "counting"
        }
    }

    fn blob(n: usize) -> (Vec<u8>, String) {
        let data: Vec<u8> = (0..n)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
            .collect();
        let digest = crate::oci::digest::digest_of(&data);
        (data, digest)
    }

    #[test]
    fn download_checks_the_digest_then_reads_switch_to_the_file() {
        let d = tempfile::tempdir().unwrap();
        let (data, digest) = blob((9 << 20) + 123);
        let remote = Arc::new(Counting(
            MemSource::new(data.clone(), "blob"),
            AtomicU64::new(0),
        ));
        let job = Download {
            source: remote.clone(),
            digest: digest.clone(),
            dir: d.path().to_owned(),
            delay: Duration::ZERO,
            max_bytes_per_sec: 0.0,
        };
        let sw = SwitchingBlob::new(remote.clone());
        let mut buf = vec![0u8; 1000];
        sw.read_at(&mut buf, 5 << 20).unwrap();
        let file = job.run().unwrap();
        assert_eq!(file, d.path().join("overlaybd.commit"));
        assert_eq!(std::fs::read(&file).unwrap(), data);
        assert!(!d.path().join(".download").exists());
        sw.switch_to_file(&file).unwrap();
        let before = remote.1.load(Ordering::Relaxed);
        sw.read_at(&mut buf, 7 << 20).unwrap();
        assert_eq!(buf, data[7 << 20..(7 << 20) + 1000]);
        assert_eq!(
            remote.1.load(Ordering::Relaxed),
            before,
            "reads come from the file"
        );

        // A blob that does not match its digest leaves nothing behind.
        let d2 = tempfile::tempdir().unwrap();
        let mut bad = data.clone();
        bad[4 << 20] ^= 1;
        let job = Download {
            source: Arc::new(MemSource::new(bad, "bad")),
            digest,
            dir: d2.path().to_owned(),
            delay: Duration::ZERO,
            max_bytes_per_sec: 0.0,
        };
        let e = job.run().unwrap_err();
        assert!(format!("{e:#}").contains("not sha256:"), "{e:#}");
        assert_eq!(std::fs::read_dir(d2.path()).unwrap().count(), 0);
        // A file of the wrong size is refused as a switch target.
        std::fs::write(d2.path().join("short"), b"x").unwrap();
        assert!(sw.switch_to_file(&d2.path().join("short")).is_err());
    }

    /// A download whose sha256 does not match drops what the layer's registry repository
    /// had cached of the blob (bytes no one can check), and the layer's reads fail with EIO
    /// from then on (the registry lied; its blocks are all suspect).
    #[test]
    fn download_mismatch_purges_the_cache_and_fails_the_layer() {
        use crate::testing::Fake;
        let tmp = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(&crate::config::CacheConfig::default(), tmp.path()).unwrap();
        let (data, digest) = blob((3 << 20) + 5);
        let mut bad = data.clone();
        bad[(1 << 20) + 7] ^= 1;
        let origin = "127.0.0.1:6000/evil/app";
        let fake = Fake::served(bad.clone(), &digest, origin);
        let cached = Arc::new(CachedBlob::with_source(cache.clone(), fake.clone()).unwrap());
        let layer = SwitchingBlob::new(cached.clone());
        let mut buf = vec![0u8; 2 << 20];
        layer.read_at(&mut buf, 0).unwrap();
        assert!(
            buf == bad[..2 << 20],
            "lazily read blocks cannot be checked"
        );
        assert_eq!(cached.cached_bytes(), 2 << 20);
        let d = tempfile::tempdir().unwrap();
        let job = Download {
            source: Arc::new(MemSource::new(bad.clone(), "evil")),
            digest: digest.clone(),
            dir: d.path().to_owned(),
            delay: Duration::ZERO,
            max_bytes_per_sec: 0.0,
        };
        let result = job.run();
        assert!(result.is_err());
        finish_download(&job, result, &layer, &cached, origin);
        assert_eq!(cached.cached_bytes(), 0, "the suspect blocks are kept");
        assert_eq!(cache.stats().cached_bytes, 0);
        let fetched = fake.fetched();
        for r in [
            layer.read_at(&mut buf, 0),
            layer.read_at_nowait(&mut buf, 3 << 20),
        ] {
            let e = r.unwrap_err();
            // The device completes a request that fails without an errno with EIO.
            assert_eq!(e.raw_os_error().unwrap_or(libc::EIO), libc::EIO, "{e}");
            assert!(e.to_string().contains(&digest), "{e}");
        }
        assert_eq!(fake.fetched(), fetched, "read from the registry again");
    }

    /// A download that matches its digest makes the blob verified in the cache: a reader of
    /// the digest from another registry gets the blocks this layer had cached, unfetched; the
    /// layer reads the file.
    #[test]
    fn matching_download_shares_the_blob_in_the_cache() {
        use crate::testing::Fake;
        let tmp = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(&crate::config::CacheConfig::default(), tmp.path()).unwrap();
        let (data, digest) = blob((3 << 20) + 5);
        let origin = "127.0.0.1:5000/app";
        let a = Fake::served(data.clone(), &digest, origin);
        let cached = Arc::new(CachedBlob::with_source(cache.clone(), a.clone()).unwrap());
        let layer = SwitchingBlob::new(cached.clone());
        let mut buf = vec![0u8; 1 << 20];
        layer.read_at(&mut buf, 0).unwrap();
        let d = tempfile::tempdir().unwrap();
        let job = Download {
            source: Arc::new(MemSource::new(data.clone(), "blob")),
            digest: digest.clone(),
            dir: d.path().to_owned(),
            delay: Duration::ZERO,
            max_bytes_per_sec: 0.0,
        };
        let result = job.run();
        finish_download(&job, result, &layer, &cached, origin);
        let fetched = a.fetched();
        layer.read_at(&mut buf, 2 << 20).unwrap();
        assert!(buf == data[2 << 20..3 << 20]);
        assert_eq!(a.fetched(), fetched, "read from the file");
        let b = Fake::served(data.clone(), &digest, "127.0.0.1:5001/other");
        let other = CachedBlob::with_source(cache.clone(), b.clone()).unwrap();
        assert!(other.is_verified());
        assert_eq!(other.read_at_nowait(&mut buf, 0).unwrap(), 1 << 20);
        assert!(buf == data[..1 << 20]);
        assert_eq!(b.fetched(), 0);
    }

    #[test]
    fn download_keeps_to_its_bandwidth_limit() {
        let d = tempfile::tempdir().unwrap();
        let (data, digest) = blob(3 << 20);
        let job = Download {
            source: Arc::new(MemSource::new(data, "blob")),
            digest,
            dir: d.path().to_owned(),
            delay: Duration::ZERO,
            max_bytes_per_sec: 6e6, // 3 MiB at 6 MB/s: at least 0.5 s
        };
        let t = Instant::now();
        job.run().unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }
}
