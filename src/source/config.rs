//! overlaybd's per-device image config (`config.v1.json`, spec §3.1), so existing layouts and
//! tools work unchanged.

use anyhow::{bail, Context, Result};
use ovbd_format::layer::{open_layer, open_layer_file};
use ovbd_format::{ImageStack, LayerStack, ReadAt, RwLayer};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Opens a layer blob that is only in a registry (a lower with `digest` + `size` and no local
/// file): the lazy-pull source, reading through the block cache.
pub trait RemoteSource: Send + Sync {
    /// `repo_blob_url` is `http[s]://HOST/v2/REPO/blobs` (spec §3.1); `dir` is the layer's
    /// directory, where a background download may put the whole blob (`overlaybd.commit`).
    fn open(
        &self,
        repo_blob_url: &str,
        digest: &str,
        size: u64,
        dir: Option<&Path>,
    ) -> Result<Arc<dyn ReadAt>>;

    /// Fetches what opening the layer reads (its headers and index) in the background, and
    /// nothing more: a lazy pull asks for it, so that the first container's attach finds it
    /// in the cache instead of waiting on the registry. Sources without a cache have nothing
    /// to fetch.
    fn prefetch_metadata(&self, repo_blob_url: &str, digest: &str, size: u64, dir: &Path) {
        let _ = (repo_blob_url, digest, size, dir);
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo_blob_url: Option<String>,
    /// Bottom to top.
    #[serde(default)]
    pub lowers: Vec<LowerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper: Option<UpperConfig>,
    /// Written `success` or `failed:<reason>` after the device is (not) attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_file: Option<PathBuf>,
    /// The last lower is an acceleration layer (upstream's prefetch): not part of the disk; its
    /// `trace` file (in `dir`, or in its blob) says what to prefetch.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub acceleration_layer: bool,
    /// A trace (or priority list) to replay when the file is not empty; upstream also records
    /// into it when it is empty (ovbd does not record this way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_trace_path: Option<PathBuf>,
}

/// Where the prefetch input of an image is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrefetchInput {
    /// A local file (`<dir>/trace` of the acceleration layer, or `recordTracePath`).
    File(PathBuf),
    /// The acceleration layer's blob in the registry (a tar holding `trace`), read through
    /// the cache; `dir` is where the file is kept once read.
    Blob {
        repo_blob_url: String,
        digest: String,
        size: u64,
        dir: Option<PathBuf>,
    },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LowerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// This layer's own `repoBlobUrl` (an ovbd extension: a layer shared by images of several
    /// repositories is read from the one it was pulled from); absent: the config's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo_blob_url: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpperConfig {
    pub index: PathBuf,
    pub data: PathBuf,
}

/// Layers opened at once by [`ImageConfig::open_image`].
const OPEN_AT_ONCE: usize = 16;

/// Names a layer directory may hold its file under, in the order overlaybd looks.
const DIR_LAYER_NAMES: [&str; 3] = ["overlaybd.commit", ".commit", "overlaybd.sealed"];

impl ImageConfig {
    pub fn load(path: &Path) -> Result<ImageConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Opens every layer and builds the image the device serves. Remote-only lowers need
    /// `remote`.
    pub fn open_image(&self, remote: Option<&dyn RemoteSource>) -> Result<ImageStack> {
        // Opening a remote layer waits on the registry for its header, trailer and index: the
        // layers open side by side (a 20-layer image would otherwise wait 20 times in a row).
        let disk = self.disk_lowers();
        let opened: Vec<std::sync::Mutex<Option<Result<ovbd_format::OpenedLayer>>>> =
            (0..disk.len()).map(|_| Default::default()).collect();
        // Workers take the next layer as each finishes (not in waves, where the last few
        // layers would wait for the slowest of the wave before).
        let next = std::sync::atomic::AtomicUsize::new(0);
        // The caller's span (the device's) goes with each opening.
        let span = tracing::Span::current();
        std::thread::scope(|s| {
            for _ in 0..OPEN_AT_ONCE.min(disk.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(l) = disk.get(i) else { break };
                    let layer = span.in_scope(|| self.open_lower(l, remote));
                    *opened[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(layer);
                });
            }
        });
        let mut lowers = Vec::with_capacity(disk.len());
        for (i, o) in opened.into_iter().enumerate() {
            let layer = o
                .into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or_else(|| Err(anyhow::anyhow!("not opened")))
                .with_context(|| format!("lowers[{i}]"))?;
            lowers.push(layer.lsmt);
        }
        let lower = if lowers.is_empty() {
            None
        } else {
            Some(LayerStack::new(lowers)?)
        };
        match &self.upper {
            Some(u) => {
                let rw = RwLayer::open(&u.data, &u.index).with_context(|| {
                    format!(
                        "upper: opening {} + {}",
                        u.data.display(),
                        u.index.display()
                    )
                })?;
                Ok(ImageStack::writable(lower, rw)?)
            }
            None => match lower {
                Some(l) => Ok(ImageStack::read_only(l)),
                None => bail!("config has neither lowers nor an upper layer"),
            },
        }
    }

    /// Opens lower `l` (errors say which blob; the caller adds its index).
    fn open_lower(
        &self,
        l: &LowerConfig,
        remote: Option<&dyn RemoteSource>,
    ) -> Result<ovbd_format::OpenedLayer> {
        match l.remote_blob(self.repo_blob_url.as_deref()) {
            Some((url, digest, size)) => {
                let Some(remote) = remote else {
                    bail!("layer {digest} is remote only and no registry source is configured");
                };
                let src = remote
                    .open(url, digest, size, l.dir.as_deref())
                    .with_context(|| format!("opening {digest} from {url}"))?;
                open_layer(src).with_context(|| format!("{digest} from {url}"))
            }
            None => {
                let path = l.local_path()?;
                open_layer_file(&path).with_context(|| format!("opening {}", path.display()))
            }
        }
    }

    /// Whether some of the disk's lowers are read from the registry (a lazily pulled image).
    pub fn has_remote_lowers(&self) -> bool {
        let url = self.repo_blob_url.as_deref();
        self.disk_lowers()
            .iter()
            .any(|l| l.remote_blob(url).is_some())
    }

    /// The lowers that make the disk: all but an acceleration layer.
    pub fn disk_lowers(&self) -> &[LowerConfig] {
        match self.lowers.split_last() {
            Some((_, below)) if self.acceleration_layer => below,
            _ => &self.lowers,
        }
    }

    /// What to prefetch at attach, if anything (upstream's order: an acceleration layer wins;
    /// `recordTracePath` is replayed only when the file has content).
    pub fn prefetch_input(&self) -> Option<PrefetchInput> {
        if self.acceleration_layer {
            let accel = self.lowers.last()?;
            if let Some(dir) = &accel.dir {
                let file = dir.join("trace");
                if file.exists() {
                    return Some(PrefetchInput::File(file));
                }
            }
            let url = accel
                .repo_blob_url
                .as_deref()
                .or(self.repo_blob_url.as_deref())?;
            return Some(PrefetchInput::Blob {
                repo_blob_url: url.to_string(),
                digest: accel.digest.clone()?,
                size: accel.size?,
                dir: accel.dir.clone(),
            });
        }
        let path = self.record_trace_path.as_ref()?;
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        (len > 0).then(|| PrefetchInput::File(path.clone()))
    }

    /// Records the outcome where the snapshotter (or a human) looks for it.
    pub fn write_result(&self, outcome: &Result<()>) {
        let Some(path) = &self.result_file else {
            return;
        };
        let text = match outcome {
            Ok(()) => "success".to_string(),
            Err(e) => format!("failed:{e:#}"),
        };
        if let Err(e) = std::fs::write(path, text) {
            log::warn!("cannot write result file {}: {e}", path.display());
        }
    }
}

impl LowerConfig {
    /// The layer file found in `dir`, if any.
    fn file_in_dir(&self) -> Option<PathBuf> {
        let d = self.dir.as_ref()?;
        DIR_LAYER_NAMES
            .iter()
            .map(|n| d.join(n))
            .find(|p| p.exists())
    }

    /// (repoBlobUrl, digest, size) when the layer is read from the registry: it has a digest
    /// and size, and neither `file` nor a layer file in `dir` (a finished download wins).
    pub fn remote_blob<'a>(
        &'a self,
        config_url: Option<&'a str>,
    ) -> Option<(&'a str, &'a str, u64)> {
        if self.file.is_some() || self.file_in_dir().is_some() {
            return None;
        }
        let url = self.repo_blob_url.as_deref().or(config_url)?;
        Some((url, self.digest.as_deref()?, self.size?))
    }

    /// The local file of this layer: `file`, or the first layer file found in `dir`.
    pub fn local_path(&self) -> Result<PathBuf> {
        if let Some(f) = &self.file {
            return Ok(f.clone());
        }
        if let Some(p) = self.file_in_dir() {
            return Ok(p);
        }
        if let Some(d) = &self.dir {
            bail!(
                "no layer file ({}) in {}",
                DIR_LAYER_NAMES.join(", "),
                d.display()
            );
        }
        match &self.digest {
            Some(d) => bail!("layer {d} is remote only, and the config has no repoBlobUrl (or size) to fetch it from"),
            None => bail!("a lower needs `file` or `dir`"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;

    /// An OverlayBD layer blob among the fixtures.
    const BLOB: &str = "sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d";

    /// A registry source whose every open (or only the first) waits until `want` opens have
    /// begun: opened one after another, the first gives up and fails.
    struct OverlapRemote {
        arrived: Mutex<usize>,
        cv: Condvar,
        want: usize,
        first_only: bool,
    }

    impl RemoteSource for OverlapRemote {
        fn open(
            &self,
            _url: &str,
            digest: &str,
            _size: u64,
            _dir: Option<&Path>,
        ) -> Result<Arc<dyn ReadAt>> {
            let mut n = self.arrived.lock().unwrap();
            *n += 1;
            self.cv.notify_all();
            // With `first_only`, the first open waits and the others go on at once.
            if !self.first_only || *n == 1 {
                let (n, timeout) = self
                    .cv
                    .wait_timeout_while(n, Duration::from_secs(20), |n| *n < self.want)
                    .unwrap();
                if timeout.timed_out() {
                    bail!("only {} of {} opens under way at once", *n, self.want);
                }
            }
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/hello-world-oci/blobs/sha256")
                .join(digest.trim_start_matches("sha256:"));
            Ok(Arc::new(ovbd_format::FileSource::open(&path)?))
        }
    }

    /// A lower that is the fixture blob `BLOB`, read from a registry.
    fn remote_blob_lower() -> LowerConfig {
        let size = std::fs::metadata(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/hello-world-oci/blobs/sha256")
                .join(&BLOB[7..]),
        )
        .unwrap()
        .len();
        LowerConfig {
            digest: Some(BLOB.into()),
            size: Some(size),
            ..Default::default()
        }
    }

    #[test]
    fn remote_layers_open_side_by_side() {
        let lower = remote_blob_lower();
        let cfg = ImageConfig {
            repo_blob_url: Some("https://127.0.0.1:5000/v2/hello-world/blobs".into()),
            lowers: vec![lower; 3],
            ..Default::default()
        };
        let remote = OverlapRemote {
            arrived: Mutex::new(0),
            cv: Condvar::new(),
            want: 3,
            first_only: false,
        };
        let image = cfg.open_image(Some(&remote)).unwrap();
        assert_eq!(image.virtual_size(), 64 << 30);
        // A failed open names its lower.
        let bad = ImageConfig {
            lowers: vec![
                cfg.lowers[0].clone(),
                LowerConfig {
                    file: Some("/nonexistent/layer".into()),
                    ..Default::default()
                },
            ],
            ..cfg.clone()
        };
        let remote = OverlapRemote {
            arrived: Mutex::new(0),
            cv: Condvar::new(),
            want: 1,
            first_only: false,
        };
        let e = format!("{:#}", bad.open_image(Some(&remote)).err().unwrap());
        assert!(
            e.contains("lowers[1]") && e.contains("/nonexistent/layer"),
            "{e}"
        );
    }

    /// A layer slow to open holds back none after it: with more layers than open at once,
    /// the last one starts while the first is still waiting on its registry.
    #[test]
    fn a_slow_layer_holds_back_no_later_opening() {
        let lower = remote_blob_lower();
        let n = OPEN_AT_ONCE + 4;
        let cfg = ImageConfig {
            repo_blob_url: Some("https://127.0.0.1:5000/v2/hello-world/blobs".into()),
            lowers: vec![lower; n],
            ..Default::default()
        };
        let remote = OverlapRemote {
            arrived: Mutex::new(0),
            cv: Condvar::new(),
            want: n,
            first_only: true,
        };
        let image = cfg.open_image(Some(&remote));
        assert!(image.is_ok(), "{:#}", image.err().unwrap());
    }
}
