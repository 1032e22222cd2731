//! containerd's snapshot labels (`containerd.io/snapshot...`) that ovbd reads or writes: on
//! Prepare/Commit in the snapshotter, on layer Prepares in `ovbd rpull`, and as the layer
//! annotations `ovbd convert` writes (containerd's unpacker passes those on as labels).

/// Every label containerd passes from a layer's annotations to the snapshotter starts so.
pub const SNAPSHOT_LABEL_PREFIX: &str = "containerd.io/snapshot/";
/// containerd's label on a Prepare that unpacks a layer: the chain ID it will be committed as.
pub const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Per-container rootfs mode (`dir` or `dev`).
pub const LABEL_WRITABLE: &str = "containerd.io/snapshot/overlaybd.writable";
/// Virtual size (GiB) of a new writable base layer.
pub const LABEL_VSIZE: &str = "containerd.io/snapshot/overlaybd/vsize";
/// Written on committed OverlayBD layers, as upstream does.
pub const LABEL_LOCAL_COMMIT: &str = "containerd.io/snapshot/overlaybd.localcommitpath";
/// An OverlayBD layer's blob in the registry (a manifest layer annotation, passed on by
/// containerd's unpacker).
pub const LABEL_BLOB_DIGEST: &str = "containerd.io/snapshot/overlaybd/blob-digest";
pub const LABEL_BLOB_SIZE: &str = "containerd.io/snapshot/overlaybd/blob-size";
/// The OverlayBD format version of a layer (a manifest layer annotation).
pub const LABEL_VERSION: &str = "containerd.io/snapshot/overlaybd/version";
/// The image a layer belongs to: `cri.image-ref` is set by CRI and rpull; `image-ref` by nerdctl,
/// but containerd also copies it from the manifest, so it is trusted only if configured.
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/image-ref";
pub const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// Written on remote layers, as upstream does.
pub const LABEL_REMOTE: &str = "containerd.io/snapshot/remote";
/// Where a remote layer's blob is read from (ovbd's own label, kept with the layer).
pub const LABEL_REPO_BLOB_URL: &str = "containerd.io/snapshot/overlaybd/repo-blob-url";
/// Marks a layer (a manifest layer annotation) as upstream's acceleration layer: a tar holding
/// the prefetch `trace` (or priority list), not part of the disk.
pub const LABEL_ACCELERATION_LAYER: &str = "containerd.io/snapshot/overlaybd/acceleration-layer";
