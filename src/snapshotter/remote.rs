//! Remote (lazily pulled) layers: a layer Prepare whose labels name a registry blob is
//! committed at once as a remote layer, bound to the chain ID its blob makes; its device reads
//! the blob from the registry until a download lands in its `fs/`.

use super::error::{SnapResult, SnapshotterError};
use super::Snapshotter;
use crate::labels::{
    LABEL_ACCELERATION_LAYER, LABEL_BLOB_DIGEST, LABEL_BLOB_SIZE, LABEL_CRI_IMAGE_REF,
    LABEL_IMAGE_REF, LABEL_REMOTE, LABEL_REPO_BLOB_URL, LABEL_SNAPSHOT_REF,
};
use crate::oci::digest::{chain_id_above, is_sha256_digest};
use crate::snapshotter::metadata::{Kind, Snapshot, Storage};
use crate::source::config::LowerConfig;
use anyhow::Context;
use std::collections::BTreeMap;

/// A layer pull that can be lazy (spec §4.4 rule 1): snapshot.ref + blob digest and size +
/// an image reference.
pub(super) struct RemoteLayer {
    name: String,
    digest: String,
    size: u64,
    image_ref: String,
}

impl RemoteLayer {
    /// `trust_image_ref`: whether the `image-ref` label (which containerd copies from the
    /// image's own manifest) may name the image; `cri.image-ref` is written by the client.
    pub(super) fn from_labels(
        labels: &BTreeMap<String, String>,
        trust_image_ref: bool,
    ) -> SnapResult<Option<RemoteLayer>> {
        let (Some(name), Some(digest), Some(size)) = (
            labels.get(LABEL_SNAPSHOT_REF),
            labels.get(LABEL_BLOB_DIGEST),
            labels.get(LABEL_BLOB_SIZE),
        ) else {
            return Ok(None);
        };
        let image_ref = if trust_image_ref {
            labels
                .get(LABEL_IMAGE_REF)
                .or_else(|| labels.get(LABEL_CRI_IMAGE_REF))
        } else {
            labels.get(LABEL_CRI_IMAGE_REF)
        };
        let Some(image_ref) = image_ref else {
            return Ok(None);
        };
        let size = size
            .parse::<u64>()
            .ok()
            .filter(|&s| s <= crate::source::cache::MAX_BLOB_SIZE)
            .ok_or_else(|| {
                SnapshotterError::InvalidArgument(format!(
                    "{LABEL_BLOB_SIZE}: {size:?} is not a size of at most {} bytes",
                    crate::source::cache::MAX_BLOB_SIZE
                ))
            })?;
        // The digest names cache files and registry URLs: exactly `sha256:` + 64 lowercase hex.
        if !is_sha256_digest(digest) {
            return Err(SnapshotterError::InvalidArgument(format!(
                "{LABEL_BLOB_DIGEST}: {digest:?} is not a sha256 digest"
            )));
        }
        Ok(Some(RemoteLayer {
            name: name.clone(),
            digest: digest.clone(),
            size,
            image_ref: image_ref.clone(),
        }))
    }
}

/// The chain ID of a layer with diff ID `diff_id` (an OverlayBD blob's digest) on snapshot
/// `parent` (a bare chain ID, or containerd's `<namespace>/<n>/<chain id>`; empty for a bottom
/// layer). None if `parent` names no chain ID.
fn chain_id_on(parent: &str, diff_id: &str) -> Option<String> {
    if parent.is_empty() {
        return Some(diff_id.to_string());
    }
    let parent_chain = parent.rsplit('/').next().filter(|c| is_sha256_digest(c))?;
    Some(chain_id_above(parent_chain, diff_id))
}

/// `repoBlobUrl` (spec §3.1) of an image reference: `https://HOST/v2/REPO/blobs`, Docker Hub
/// as `registry-1.docker.io` and `library/` for official images. The scheme is only a hint:
/// the registry source speaks plain http to `insecure` and allowed loopback hosts.
fn repo_blob_url(image_ref: &str) -> SnapResult<String> {
    let r = crate::oci::ImageRef::parse(image_ref).map_err(|e| {
        SnapshotterError::InvalidArgument(format!("image reference {image_ref:?}: {e:#}"))
    })?;
    match r {
        crate::oci::ImageRef::Registry(r) => {
            let host = crate::registry::registry_api_host(r.registry());
            Ok(format!("https://{host}/v2/{}/blobs", r.repository()))
        }
        _ => Err(SnapshotterError::InvalidArgument(format!(
            "image reference {image_ref:?} is not a registry reference"
        ))),
    }
}

impl Snapshotter {
    /// Whether `remote` may be committed lazily on `parent`. containerd checks the diff IDs
    /// of what it unpacks; a lazy layer is never unpacked, so its name must be the chain ID its
    /// blob makes (an image cannot take another image's layer names by copying its diff IDs),
    /// and a snapshot already under that name must be this same remote layer.
    pub(super) fn may_pull_lazily(&self, remote: &RemoteLayer, parent: &str) -> bool {
        let chain = chain_id_on(parent, &remote.digest);
        let name_chain = remote.name.rsplit('/').next().unwrap_or_default();
        if chain.as_deref() != Some(name_chain) {
            log::warn!(
                "layer {} on {parent:?}: snapshot.ref {} is not its chain ID; unpacking it normally",
                remote.digest,
                remote.name
            );
            return false;
        }
        match self.meta.get(&remote.name) {
            Ok(c) => {
                let same = c.kind == Kind::Committed
                    && c.parent == parent
                    && c.labels.contains_key(LABEL_REMOTE)
                    && c.labels.get(LABEL_BLOB_DIGEST) == Some(&remote.digest);
                if !same {
                    log::warn!(
                        "layer {}: snapshot {} exists but is not that remote layer; unpacking it normally",
                        remote.digest,
                        remote.name
                    );
                }
                same
            }
            Err(_) => true,
        }
    }

    /// A lazy layer pull (spec §4.5): the snapshot is committed at once under the snapshot.ref
    /// name as a remote layer and AlreadyExists returned, so containerd fetches and unpacks
    /// nothing. Returns the error to give containerd (AlreadyExists when all went well).
    pub(super) fn create_remote(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        remote: RemoteLayer,
    ) -> SnapshotterError {
        let cri_image_ref = labels.get(LABEL_CRI_IMAGE_REF).cloned();
        // Replayed by the prefetcher, not opened as a layer.
        let acceleration = labels
            .get(LABEL_ACCELERATION_LAYER)
            .is_some_and(|v| v == "yes");
        let made = (|| -> SnapResult<()> {
            let url = repo_blob_url(&remote.image_ref)?;
            if let Ok(c) = self.meta.get(&remote.name) {
                // Pulled before: AlreadyExists. A CRI pull of an image from the layer's own
                // repository still binds its secret (the layer may have been pulled without).
                if c.labels.get(LABEL_REPO_BLOB_URL) == Some(&url) {
                    let layer = self.dir(c.id).join("fs");
                    if let Some(bound) =
                        self.bind_cri_pull(key, cri_image_ref.as_deref(), &remote, &layer)
                    {
                        if c.cri_pull.as_ref() != Some(&bound) {
                            self.meta
                                .update(&remote.name, |s| s.cri_pull = Some(bound))?;
                        }
                    }
                }
                return Ok(());
            }
            let snap = self.meta.create(
                key,
                parent,
                Kind::Active,
                labels,
                |draft| -> SnapResult<Snapshot> {
                    let dir = self.dir(draft.id);
                    let _ = std::fs::remove_dir_all(&dir);
                    std::fs::create_dir_all(dir.join("fs"))
                        .with_context(|| format!("creating {}", dir.display()))?;
                    Ok(draft.clone())
                },
            )?;
            let layer = self.dir(snap.id).join("fs");
            let bound = self.bind_cri_pull(key, cri_image_ref.as_deref(), &remote, &layer);
            let committed = self.meta.commit(
                key,
                &remote.name,
                BTreeMap::from([
                    (LABEL_REMOTE.to_string(), "remote snapshot".to_string()),
                    (LABEL_REPO_BLOB_URL.to_string(), url.clone()),
                ]),
                |c| -> SnapResult<()> {
                    c.storage = Storage::Block;
                    c.mode = None;
                    c.usage = (0, 1);
                    c.cri_pull = bound;
                    Ok(())
                },
            );
            if let Err(e) = committed {
                if let Some(c) = &self.cri_pulls {
                    c.unbind(&layer);
                }
                let _ = self.meta.remove(key);
                let _ = std::fs::remove_dir_all(self.dir(snap.id));
                return Err(e);
            }
            // containerd goes on with the pull (and maybe a container) meanwhile.
            if let Some(source) = self.remote.as_ref().filter(|_| !acceleration) {
                source.prefetch_metadata(&url, &remote.digest, remote.size, &layer);
            }
            log::info!(
                "remote layer {} ({} bytes of {}) committed as {}",
                remote.digest,
                remote.size,
                remote.image_ref,
                remote.name
            );
            Ok(())
        })();
        match made {
            Ok(()) => SnapshotterError::RemoteLayerCommitted(remote.name),
            Err(e) => e,
        }
    }

    /// Binds the secret of the CRI PullImage in flight for this layer's image to `layer` (its
    /// directory) if the Prepare (`key`, its `cri.image-ref` label) is that pull's: in the CRI
    /// namespace (containerd passes keys as `<namespace>/<id>/<name>`) and `cri.image-ref`
    /// naming the image the layer is read from. Returns the (registry, repository) bound.
    fn bind_cri_pull(
        &self,
        key: &str,
        cri_image_ref: Option<&str>,
        remote: &RemoteLayer,
        layer: &std::path::Path,
    ) -> Option<(String, String)> {
        let captured = self.cri_pulls.as_ref()?;
        let namespace = key.split_once('/').map(|(ns, _)| ns)?;
        if namespace != self.cfg.cri_proxy.namespace
            || cri_image_ref != Some(remote.image_ref.as_str())
        {
            return None;
        }
        let bound = captured.bind(layer, &remote.image_ref)?;
        log::info!(
            "remote layer {} of {}: its lazy reads use the pull secret of this CRI PullImage",
            remote.digest,
            remote.image_ref
        );
        Some(bound)
    }

    /// How a device config names committed OverlayBD layer `l`: its directory, and for a
    /// remote layer also the blob (read from the registry until a local file is in `fs/`).
    pub(super) fn lower_config(&self, l: &Snapshot) -> LowerConfig {
        let dir = self.dir(l.id).join("fs");
        if let (Some((registry, repo)), Some(c)) = (&l.cri_pull, &self.cri_pulls) {
            // Bound during a CRI pull, maybe of an earlier run (whose secret went with it).
            c.restore(&dir, registry, repo);
        }
        let mut lc = LowerConfig {
            dir: Some(dir),
            ..Default::default()
        };
        if l.labels.contains_key(LABEL_REMOTE) {
            lc.digest = l.labels.get(LABEL_BLOB_DIGEST).cloned();
            lc.size = l.labels.get(LABEL_BLOB_SIZE).and_then(|v| v.parse().ok());
            lc.repo_blob_url = l.labels.get(LABEL_REPO_BLOB_URL).cloned();
        }
        lc
    }
}
