//! Remote layers for the device: a `config.v1.json` lower named by `repoBlobUrl` + digest +
//! size is read from the registry ([`RemoteBlob`]) through the on-disk block cache
//! ([`CachedBlob`]), so the device fetches only the blocks a container reads. With
//! `[download] enable` (the default), the whole blob is also downloaded in the background into
//! the layer's directory (sha256 checked), and reads then switch to that file
//! ([`SwitchingBlob`]); the cache then shares the blob with every registry that serves it
//! (checked block by block). A download that does not match its digest drops the blocks the
//! registry repository sent for it and fails the layer's reads from then on.

use crate::config::{Config, DownloadConfig};
use crate::pool::WorkerPool;
use crate::registry::{Registry, RemoteBlob};
use crate::source::cache::{BlobCache, CacheError, CachedBlob};
use crate::source::config::RemoteSource;
use crate::source::download::Download;
use anyhow::{bail, Context, Result};
use ovbd_format::{FileSource, ReadAt};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

pub struct RegistrySource {
    registry: Arc<Registry>,
    cache: Arc<BlobCache>,
    download: DownloadConfig,
    /// Layer directories with a download in progress (one per layer at a time).
    downloading: Arc<Mutex<HashSet<PathBuf>>>,
    /// Runs [`RemoteSource::prefetch_metadata`]'s fetches.
    ahead: Arc<WorkerPool>,
}

/// How many layers have their metadata fetched ahead at once: a pull of more queues the rest.
const METADATA_AHEAD_THREADS: usize = 4;

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
            ahead: WorkerPool::new("ovbd-ahead", 0, METADATA_AHEAD_THREADS),
        })
    }
}

impl RegistrySource {
    /// Where `[cri_proxy]` keeps the pull secrets it captures for these reads.
    pub(crate) fn captured_credentials(
        &self,
    ) -> Arc<crate::registry::captured::CapturedCredentials> {
        self.registry.captured_credentials()
    }

    /// Makes every block fetched so far durable in the cache (at shutdown).
    pub fn flush(&self) -> Result<(), CacheError> {
        self.cache.flush()
    }

    /// The block cache (its stats for metrics and `ovbd status`).
    pub fn cache(&self) -> &Arc<BlobCache> {
        &self.cache
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
        let (remote, cached) =
            open_cached(&self.registry, &self.cache, &image_ref, digest, size, dir)?;
        // The download reads the registry directly: a whole blob must not evict the cache.
        let direct: Arc<dyn ReadAt> = Arc::new(remote);
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
            let downloading = self.downloading.clone();
            job.start(blob.clone(), cached, image_ref, move |dir| {
                downloading
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(dir);
            })
            .context("starting a download thread")?;
        }
        Ok(blob)
    }

    fn prefetch_metadata(&self, repo_blob_url: &str, digest: &str, size: u64, dir: &Path) {
        let (registry, cache) = (self.registry.clone(), self.cache.clone());
        let (url, digest, dir) = (repo_blob_url.to_owned(), digest.to_owned(), dir.to_owned());
        self.ahead.submit(Box::new(move || {
            match fetch_metadata(&registry, &cache, &url, &digest, size, &dir) {
                Ok(()) => {
                    log::debug!("layer {digest}: headers and index fetched ahead of its device")
                }
                // The device's own open fetches again, and reports what is wrong.
                Err(e) => log::debug!("layer {digest}: headers and index not fetched ahead: {e:#}"),
            }
        }));
    }
}

/// The layer blob `digest` of `image_ref` as the registry serves it, and the same read
/// through the block cache, its head and tail fetched (see [`fetch_head_and_tail`]).
fn open_cached(
    registry: &Arc<Registry>,
    cache: &Arc<BlobCache>,
    image_ref: &str,
    digest: &str,
    size: u64,
    dir: Option<&Path>,
) -> Result<(RemoteBlob, Arc<CachedBlob>)> {
    // The layer's directory names it: a CRI pull secret bound to it authenticates its reads.
    let remote = RemoteBlob::new(registry.clone(), image_ref, digest, size)?.for_layer(dir);
    let cached = Arc::new(CachedBlob::new(cache.clone(), remote.clone())?);
    fetch_head_and_tail(&cached);
    Ok((remote, cached))
}

/// Reads into the cache what opening the layer reads, by opening it (and checking its
/// headers and index as the device would); starts no download.
fn fetch_metadata(
    registry: &Arc<Registry>,
    cache: &Arc<BlobCache>,
    repo_blob_url: &str,
    digest: &str,
    size: u64,
    dir: &Path,
) -> Result<()> {
    let image_ref = image_ref_of_blob_url(repo_blob_url)?;
    let (_, cached) = open_cached(registry, cache, &image_ref, digest, size, Some(dir))?;
    ovbd_format::open_layer(cached)?;
    Ok(())
}

/// How much of a blob's end is read ahead of its open: enough to fetch the last cache block,
/// which holds the ZFile trailer and jump table and, unless the layer is large, the
/// compressed LSMT index before them.
const TAIL_BYTES: u64 = 4096;

/// Opening a layer reads its head (tar, ZFile and LSMT headers) and then its tail (see
/// [`TAIL_BYTES`]): two registry round trips in a row per layer. This fetches the head's and
/// the tail's cache blocks first, together: in one request where the registry serves several
/// ranges at once, else in two at once. A failure here is left for the open's reads to report.
fn fetch_head_and_tail(blob: &CachedBlob) {
    if blob.comes_whole() {
        return; // one request brings head and tail
    }
    let size = blob.size();
    let n = size.min(TAIL_BYTES);
    if let Err(e) = blob.fetch_together(&[(0, 1), (size - n, n)]) {
        log::debug!("{}: head and tail not fetched ahead: {e}", blob.name());
    }
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
    fn prefetch(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.get()?.prefetch(offset, len)
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

    /// `[registry] proxy` (a P2P agent such as Dragonfly's dfdaemon) carries the lazy range
    /// reads of a remote layer, not only pulls: the layer names an origin nothing listens on, so
    /// a read that went direct would fail, and the proxy sees every ranged GET.
    #[test]
    fn lazy_reads_go_through_the_proxy() {
        use crate::testing::{check_random_ranges, quick_config, registry_with_blob, Front};
        let (reg, data, digest) = registry_with_blob(600_000, 23);
        let proxy = Front::start(&reg.addr, None);
        let origin = {
            let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            closed.local_addr().unwrap().to_string()
        };
        let root = tempfile::tempdir().unwrap();
        let cfg = Config {
            root: root.path().to_owned(),
            registry: crate::config::RegistryConfig {
                proxy: Some(format!("http://{}", proxy.addr)),
                ..quick_config()
            },
            // Only the device's reads, no background download of the whole blob.
            download: DownloadConfig {
                enable: false,
                ..Default::default()
            },
            ..Default::default()
        };
        let source = RegistrySource::from_config(&cfg).unwrap();
        let url = format!("http://{origin}/v2/test/blob/blobs");
        let layer = source
            .open(&url, &digest, data.len() as u64, Some(root.path()))
            .unwrap();
        check_random_ranges(layer.as_ref(), &data, 8, 29);

        let seen = proxy.seen.lock().unwrap().clone();
        let want = format!("http://{origin}/v2/test/blob/blobs/{digest}");
        assert!(!seen.is_empty());
        for s in &seen {
            assert_eq!(
                (s.method.as_str(), s.target.as_str()),
                ("GET", want.as_str())
            );
            assert!(s.range.is_some(), "a whole-blob GET: {s:?}");
        }
        // Blocks read once come from the cache: the proxy sees nothing more.
        let before = proxy.seen.lock().unwrap().len();
        check_random_ranges(layer.as_ref(), &data, 8, 29);
        assert_eq!(proxy.seen.lock().unwrap().len(), before);
    }

    /// A 4 MiB layer (past whole_blob_kb, 2 MiB) in a test registry behind a [`Front`], and a
    /// registry source over a fresh root, with `download`.
    struct LayerBehindFront {
        layer: Vec<u8>,
        digest: String,
        url: String,
        front: Arc<crate::testing::Front>,
        source: RegistrySource,
        root: tempfile::TempDir,
        _registry: crate::testing::TestRegistry,
    }

    fn layer_behind_front(seed: u64, download: DownloadConfig) -> LayerBehindFront {
        use crate::testing::{lsmt_layer, push_blob, quick_config, start_registry, Front};
        let layer = lsmt_layer(4 << 20, seed);
        let registry = start_registry("");
        let digest = push_blob(&registry.addr, "test/layer", &layer, None);
        let front = Front::start(&registry.addr, None);
        let root = tempfile::tempdir().unwrap();
        let cfg = Config {
            root: root.path().to_owned(),
            registry: quick_config(),
            download,
            ..Default::default()
        };
        LayerBehindFront {
            url: format!("http://{}/v2/test/layer/blobs", front.addr),
            source: RegistrySource::from_config(&cfg).unwrap(),
            layer,
            digest,
            front,
            root,
            _registry: registry,
        }
    }

    /// Opening a remote layer reads its head and then its tail: both come in one request
    /// (`Range: a-b,c-d`), not one after the other (two registry round trips per layer
    /// otherwise), and nothing more is fetched for it. A registry that answers such a request
    /// with the whole blob gets two requests at once instead.
    #[test]
    fn a_layer_opens_with_its_head_and_tail_in_one_request() {
        use crate::testing::Fault;

        let no_download = DownloadConfig {
            enable: false,
            ..Default::default()
        };
        for one_range_only in [false, true] {
            let t = layer_behind_front(41, no_download.clone());
            if one_range_only {
                *t.front.always.lock().unwrap() = Some(Fault::OneRangeOnly);
            }
            let blob = t
                .source
                .open(&t.url, &t.digest, t.layer.len() as u64, None)
                .unwrap();
            let opened = ovbd_format::open_layer(blob).unwrap();
            assert_eq!(opened.lsmt.virtual_size(), 64 << 20);
            let seen = t.front.seen.lock().unwrap();
            let ranges: Vec<&str> = seen.iter().filter_map(|s| s.range.as_deref()).collect();
            assert_eq!(ranges.len(), seen.len(), "{seen:?}");
            if one_range_only {
                // The request the registry answered with a 200, then head and tail.
                assert_eq!(ranges.len(), 3, "{ranges:?}");
                assert!(ranges[1..].iter().all(|r| !r.contains(',')), "{ranges:?}");
            } else {
                assert_eq!(ranges.len(), 1, "{ranges:?}");
                assert!(ranges[0].starts_with("bytes=0-") && ranges[0].contains(','));
            }
        }
    }

    /// A registry that does not answer holds up no Prepare: asking for more prefetches than
    /// the pool has threads returns at once, each one queued.
    #[test]
    fn a_stalled_registry_does_not_hold_up_the_prefetch_requests() {
        use crate::testing::Fault;
        let no_download = DownloadConfig {
            enable: false,
            ..Default::default()
        };
        let t = Arc::new(layer_behind_front(45, no_download));
        *t.front.always.lock().unwrap() = Some(Fault::StallHeaders(Duration::from_secs(60)));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let asker = t.clone();
        std::thread::spawn(move || {
            for i in 0..3 * METADATA_AHEAD_THREADS {
                let dir = asker.root.path().join(format!("layer-{i}"));
                let size = asker.layer.len() as u64;
                asker
                    .source
                    .prefetch_metadata(&asker.url, &asker.digest, size, &dir);
            }
            let _ = done_tx.send(());
        });
        // A hang guard only: queueing takes no registry round trip.
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("prefetch requests waited on the registry");
    }

    /// A lazy pull's layer has its headers and index fetched in the background, with the
    /// layer's own credentials and no download: its device then opens it without a request.
    #[test]
    fn a_prefetched_layer_opens_without_a_registry_request() {
        // Downloads enabled and due at once: the prefetch must still start none.
        let due_now = DownloadConfig {
            delay_secs: 0.0,
            ..Default::default()
        };
        let t = layer_behind_front(43, due_now);
        let size = t.layer.len() as u64;
        let dir = t.root.path().join("layer");
        std::fs::create_dir(&dir).unwrap();
        t.source.prefetch_metadata(&t.url, &t.digest, size, &dir);
        // A hang guard only: head and tail are one local request.
        let t0 = std::time::Instant::now();
        while t.front.blob_gets() < 1 || t.front.in_flight() > 0 {
            assert!(t0.elapsed() < Duration::from_secs(20), "no prefetch");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(t.source.downloading.lock().unwrap().is_empty());
        let blob = t.source.open(&t.url, &t.digest, size, None).unwrap();
        let opened = ovbd_format::open_layer(blob).unwrap();
        assert_eq!(opened.lsmt.virtual_size(), 64 << 20);
        let seen = t.front.seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(seen.iter().all(|s| s.range.is_some()), "{seen:?}");
    }
}
