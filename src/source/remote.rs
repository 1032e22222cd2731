//! Remote layers for the device: a `config.v1.json` lower named by `repoBlobUrl` + digest +
//! size is read from the registry ([`RemoteBlob`]) through the on-disk block cache
//! ([`CachedBlob`]), so the device fetches only the blocks a container reads. With
//! `[download] enable` (the default), the whole blob is also downloaded in the background into
//! the layer's directory (sha256 checked), and reads then switch to that file
//! ([`SwitchingBlob`]); the cache then shares the blob with every registry that serves it
//! (checked block by block). A download that does not match its digest drops the blocks the
//! registry repository sent for it and fails the layer's reads from then on.

use crate::config::{Config, DownloadConfig};
use crate::registry::{Registry, RemoteBlob};
use crate::source::cache::{BlobCache, CachedBlob};
use crate::source::config::RemoteSource;
use anyhow::{bail, Context, Result};
use ovbd_format::{FileSource, ReadAt};
use sha2::{Digest as _, Sha256};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

pub struct RegistrySource {
    registry: Arc<Registry>,
    cache: Arc<BlobCache>,
    download: DownloadConfig,
    /// Layer directories with a download in progress (one per layer at a time).
    downloading: Arc<Mutex<HashSet<PathBuf>>>,
}

impl RegistrySource {
    /// From the daemon's `[registry]` and `[cache]` sections (cache default: `<root>/cache`).
    pub fn from_config(cfg: &Config) -> Result<RegistrySource> {
        cfg.registry.validate()?;
        cfg.cache.validate()?;
        cfg.download.validate()?;
        Ok(RegistrySource {
            registry: Registry::new(&cfg.registry)?,
            cache: BlobCache::open(&cfg.cache, &cfg.root.join("cache"))?,
            download: cfg.download.clone(),
            downloading: Arc::default(),
        })
    }
}

impl RegistrySource {
    /// Makes every block fetched so far durable in the cache (at shutdown).
    pub fn flush(&self) -> std::io::Result<()> {
        self.cache.flush()
    }
}

impl RemoteSource for RegistrySource {
    fn open(
        &self,
        repo_blob_url: &str,
        digest: &str,
        size: u64,
        dir: Option<&Path>,
    ) -> Result<Arc<dyn ReadAt>> {
        let image_ref = image_ref_of_blob_url(repo_blob_url)?;
        let remote = RemoteBlob::new(self.registry.clone(), &image_ref, digest, size)?;
        // The download reads the registry directly: a whole blob must not evict the cache.
        let direct: Arc<dyn ReadAt> = Arc::new(remote.clone());
        let cached = Arc::new(CachedBlob::new(self.cache.clone(), remote)?);
        let (Some(dir), true) = (dir, self.download.enable) else {
            return Ok(cached);
        };
        let blob = Arc::new(SwitchingBlob::new(cached.clone()));
        if self
            .downloading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(dir.to_owned())
        {
            let job = Download {
                source: direct,
                digest: digest.to_owned(),
                dir: dir.to_owned(),
                // Bounded by validate(); a value it did not see waits the longest it allows.
                delay: Duration::try_from_secs_f64(self.download.delay_secs)
                    .unwrap_or(Duration::from_secs_f64(DownloadConfig::MAX_DELAY_SECS)),
                max_bytes_per_sec: self.download.max_mbps * 1e6,
            };
            let (target, downloading) = (blob.clone(), self.downloading.clone());
            std::thread::Builder::new()
                .name("ovbd-download".into())
                .spawn(move || {
                    let result = job.run();
                    finish_download(&job, result, &target, &cached, &image_ref);
                    downloading
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&job.dir);
                })
                .context("starting a download thread")?;
        }
        Ok(blob)
    }
}

/// What a finished download of layer blob `job.digest` of `image_ref` (`host/repo`) changes:
/// on success the cache takes the file as the blob's verified copy and reads of the layer go
/// to the file; if the bytes do not match the digest, the registry lied: what it sent for the
/// blob is dropped from the cache and the layer's reads fail.
fn finish_download(
    job: &Download,
    result: Result<PathBuf>,
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
        Err(e) if e.downcast_ref::<DigestMismatch>().is_some() => {
            let freed = cached.purge();
            let why = format!(
                "image {image_ref}: layer blob {}: registry {registry} served bytes that do not \
                 match the digest ({e:#})",
                job.digest
            );
            log::error!(
                "{why}: dropped its {freed} cached bytes; reads of the layer fail from now on"
            );
            target.fail(why);
        }
        Err(e) => log::warn!(
            "background download of {} of {image_ref}: {e:#}",
            job.digest
        ),
    }
}

/// The downloaded bytes of a blob have another digest than the one they were asked for by.
#[derive(Debug, thiserror::Error)]
#[error("downloaded blob has {got}, not {want}")]
struct DigestMismatch {
    got: String,
    want: String,
}

/// A layer blob read from the registry (through the cache) until its download is done, then
/// from the local file: the same bytes at the same offsets, so the layers above never notice.
/// If the download shows the registry's bytes are not the blob's, every read fails (EIO).
pub struct SwitchingBlob {
    current: RwLock<Current>,
    name: String,
    size: u64,
}

enum Current {
    Reading(Arc<dyn ReadAt>),
    /// Why the layer cannot be read.
    Failed(String),
}

impl SwitchingBlob {
    pub fn new(remote: Arc<dyn ReadAt>) -> SwitchingBlob {
        SwitchingBlob {
            name: remote.name().to_owned(),
            size: remote.size(),
            current: RwLock::new(Current::Reading(remote)),
        }
    }

    fn get(&self) -> std::io::Result<Arc<dyn ReadAt>> {
        match &*self.current.read().unwrap_or_else(|p| p.into_inner()) {
            Current::Reading(r) => Ok(r.clone()),
            // No errno: the device completes the request with EIO.
            Current::Failed(why) => Err(std::io::Error::other(format!("{}: {why}", self.name))),
        }
    }

    /// From now on, every read fails with `why`.
    pub fn fail(&self, why: String) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Current::Failed(why);
    }

    /// From now on, reads come from `file` (which must hold the same bytes).
    pub fn switch_to_file(&self, file: &Path) -> Result<()> {
        let local = FileSource::open(file)?;
        if local.size() != self.size {
            bail!(
                "{} is {} bytes, the blob {}",
                file.display(),
                local.size(),
                self.size
            );
        }
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if let Current::Failed(why) = &*current {
            bail!("{}: {why}", self.name);
        }
        *current = Current::Reading(Arc::new(local));
        Ok(())
    }
}

impl ReadAt for SwitchingBlob {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.get()?.read_at(buf, offset)
    }
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.get()?.read_at_nowait(buf, offset)
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn evict(&self, offset: u64, len: u64) {
        if let Ok(r) = self.get() {
            r.evict(offset, len)
        }
    }
}

/// One background download: the blob to `DIR/.download`, sha256 checked against the digest,
/// synced, then renamed to `DIR/overlaybd.commit` (as upstream). A failure leaves no file.
struct Download {
    source: Arc<dyn ReadAt>,
    digest: String,
    dir: PathBuf,
    delay: Duration,
    /// 0: unlimited.
    max_bytes_per_sec: f64,
}

impl Download {
    const CHUNK: usize = 4 << 20;

    fn run(&self) -> Result<PathBuf> {
        std::thread::sleep(self.delay);
        let done = self.dir.join("overlaybd.commit");
        if done.exists() {
            return Ok(done);
        }
        let want = self
            .digest
            .strip_prefix("sha256:")
            .with_context(|| format!("{} is not a sha256 digest", self.digest))?;
        let tmp = self.dir.join(".download");
        let result = self.fetch_to(&tmp, want);
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result?;
        std::fs::rename(&tmp, &done)
            .with_context(|| format!("renaming {} to {}", tmp.display(), done.display()))?;
        Ok(done)
    }

    fn fetch_to(&self, tmp: &Path, want_hex: &str) -> Result<()> {
        let mut out =
            std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let (size, started) = (self.source.size(), Instant::now());
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; Self::CHUNK];
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(Self::CHUNK as u64) as usize;
            ovbd_format::source::read_exact_at(&*self.source, &mut buf[..n], off)?;
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .with_context(|| format!("writing {}", tmp.display()))?;
            off += n as u64;
            if self.max_bytes_per_sec > 0.0 {
                let due = Duration::try_from_secs_f64(off as f64 / self.max_bytes_per_sec)
                    .with_context(|| format!("pacing at {} bytes/s", self.max_bytes_per_sec))?;
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        let got: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if got != want_hex {
            return Err(DigestMismatch {
                got: format!("sha256:{got}"),
                want: self.digest.clone(),
            }
            .into());
        }
        out.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        Ok(())
    }
}

/// `HOST/REPO` of a `repoBlobUrl` (`http[s]://HOST/v2/REPO/blobs`). The scheme is dropped: the
/// registry source decides http or https per host (`insecure` and allowed loopback hosts are http).
fn image_ref_of_blob_url(url: &str) -> Result<String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    let rest = rest.trim_end_matches('/');
    let Some((host, path)) = rest.split_once("/v2/") else {
        bail!("repoBlobUrl {url:?} is not of the form https://HOST/v2/REPO/blobs");
    };
    let Some(repo) = path.strip_suffix("/blobs") else {
        bail!("repoBlobUrl {url:?} does not end in /blobs");
    };
    if host.is_empty() || repo.is_empty() {
        bail!("repoBlobUrl {url:?} has no host or repository");
    }
    // Docker Hub's API host stands for docker.io in references.
    let host = crate::registry::normalize_registry_host(host);
    Ok(format!("{host}/{repo}"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let hex: String = Sha256::digest(&data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        (data, format!("sha256:{hex}"))
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

    #[test]
    fn blob_urls_to_references() {
        for (url, want) in [
            (
                "https://registry-1.docker.io/v2/library/busybox/blobs",
                "docker.io/library/busybox",
            ),
            (
                "http://127.0.0.1:5000/v2/a/b/c/blobs/",
                "127.0.0.1:5000/a/b/c",
            ),
            (
                "https://reg.example.com/v2/app/blobs",
                "reg.example.com/app",
            ),
        ] {
            assert_eq!(image_ref_of_blob_url(url).unwrap(), want, "{url}");
        }
        for bad in [
            "https://reg.example.com/app/blobs",
            "https://reg.example.com/v2/app",
            "https:///v2/x/blobs",
            "https://h/v2//blobs",
        ] {
            assert!(image_ref_of_blob_url(bad).is_err(), "{bad}");
        }
    }
}
