//! Remote layers for the device: a `config.v1.json` lower named by `repoBlobUrl` + digest +
//! size is read from the registry ([`RemoteBlob`]) through the on-disk block cache
//! ([`CachedBlob`]), so the device fetches only the blocks a container reads.

use crate::blob_cache::{BlobCache, CachedBlob};
use crate::config::Config;
use crate::image_config::RemoteSource;
use crate::registry::{Registry, RemoteBlob};
use anyhow::{bail, Result};
use ovbd_format::ReadAt;
use std::sync::Arc;

pub struct RegistrySource {
    registry: Arc<Registry>,
    cache: Arc<BlobCache>,
}

impl RegistrySource {
    /// From the daemon's `[registry]` and `[cache]` sections (cache default: `<root>/cache`).
    pub fn from_config(cfg: &Config) -> Result<RegistrySource> {
        cfg.registry.validate()?;
        cfg.cache.validate()?;
        Ok(RegistrySource {
            registry: Registry::new(&cfg.registry)?,
            cache: BlobCache::open(&cfg.cache, &cfg.root.join("cache"))?,
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
    fn open(&self, repo_blob_url: &str, digest: &str, size: u64) -> Result<Arc<dyn ReadAt>> {
        let image_ref = image_ref_of_blob_url(repo_blob_url)?;
        let remote = RemoteBlob::new(self.registry.clone(), &image_ref, digest, size)?;
        Ok(Arc::new(CachedBlob::new(self.cache.clone(), remote)?))
    }
}

/// `HOST/REPO` of a `repoBlobUrl` (`http[s]://HOST/v2/REPO/blobs`). The scheme is dropped: the
/// registry source decides http or https per host (loopback and `insecure` hosts are http).
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
    let host = match host {
        "registry-1.docker.io" | "index.docker.io" => "docker.io",
        h => h,
    };
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
}
