//! The containerd Snapshots API (spec §4): plain OCI layers as overlayfs directories, exactly
//! like containerd's overlay snapshotter, and OverlayBD layers as block devices.
//!
//! Layout under `root`: `metadata.db` and `snapshots/<id>/{fs,work,block}`. `fs/` holds a
//! layer's files (or its `overlaybd.commit` / `overlaybd.sealed`), `work/` overlayfs' workdir,
//! `block/` a device's `config.v1.json`, result file, mountpoint and writable layer files.

pub mod filters;
pub mod metadata;

use crate::config::{Config, RootfsMode, WritableLayerType};
use crate::device::{self, AttachOptions, AttachedDevice};
use crate::mount;
use crate::snapshotter::metadata::{Kind, MetaError, MetaStore, Snapshot, Storage};
use crate::source::config::{ImageConfig, LowerConfig, RemoteSource, UpperConfig};
use anyhow::{anyhow, bail, Context, Result};
use containerd_snapshots::{api::types::Mount, tonic, Info, Usage};
use ovbd_format::layer::sniff;
use ovbd_format::{FileSource, RwLayer, RwMode};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

/// containerd's label on a Prepare that unpacks a layer.
const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Per-container rootfs mode (`dir` or `dev`).
const LABEL_WRITABLE: &str = "containerd.io/snapshot/overlaybd.writable";
/// Virtual size (GiB) of a new writable base layer.
const LABEL_VSIZE: &str = "containerd.io/snapshot/overlaybd/vsize";
/// Written on committed OverlayBD layers, as upstream does.
const LABEL_LOCAL_COMMIT: &str = "containerd.io/snapshot/overlaybd.localcommitpath";
/// A remote layer: the blob in the registry (manifest layer annotations, passed on by
/// containerd's unpacker) and the image it belongs to (`cri.image-ref`, set by CRI and rpull;
/// `image-ref`, set by nerdctl but also copied from the manifest, only if configured).
const LABEL_BLOB_DIGEST: &str = "containerd.io/snapshot/overlaybd/blob-digest";
const LABEL_BLOB_SIZE: &str = "containerd.io/snapshot/overlaybd/blob-size";
const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/image-ref";
const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// Written on remote layers, as upstream does.
const LABEL_REMOTE: &str = "containerd.io/snapshot/remote";
/// Where a remote layer's blob is read from (ovbd's own label, kept with the layer).
const LABEL_REPO_BLOB_URL: &str = "containerd.io/snapshot/overlaybd/repo-blob-url";

/// Mode of a snapshot unpacking a layer onto OverlayBD parents: a plain bind of its `fs/`.
/// A plain OCI layer unpacked this way cannot hide (whiteout) files of the OverlayBD layers
/// below it; upstream has the same limit.
const UNPACK_BIND: &str = "unpack";

/// Whether a Prepare unpacks a layer (containerd's unpacker labels it, and `ctr pull` names
/// it `extract-<n>-<chain id>`) rather than making a container rootfs.
fn is_unpack(key: &str, labels: &BTreeMap<String, String>) -> bool {
    labels.contains_key(LABEL_SNAPSHOT_REF)
        || key
            .rsplit('/')
            .next()
            .is_some_and(|k| k.starts_with("extract-"))
}

/// What Remove and Commit report when they cannot do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl From<SnapError> for tonic::Status {
    fn from(e: SnapError) -> tonic::Status {
        match &e {
            SnapError::Meta(MetaError::NotFound(_)) => tonic::Status::not_found(e.to_string()),
            SnapError::Meta(MetaError::AlreadyExists(_)) => {
                tonic::Status::already_exists(e.to_string())
            }
            SnapError::Meta(MetaError::FailedPrecondition(_)) => {
                tonic::Status::failed_precondition(e.to_string())
            }
            SnapError::Meta(MetaError::InvalidArgument(_)) => {
                tonic::Status::invalid_argument(e.to_string())
            }
            _ => tonic::Status::internal(e.to_string()),
        }
    }
}

impl From<std::io::Error> for SnapError {
    fn from(e: std::io::Error) -> Self {
        SnapError::Other(e.into())
    }
}

impl From<ovbd_format::Error> for SnapError {
    fn from(e: ovbd_format::Error) -> Self {
        SnapError::Other(e.into())
    }
}

type SnapResult<T> = Result<T, SnapError>;

/// A read-only image device shared by every container on the same image.
struct SharedDevice {
    dev: AttachedDevice,
    mountpoint: PathBuf,
    /// Active snapshots using it.
    users: BTreeSet<u64>,
}

/// One device's place: empty until attached. Its own lock is held across the slow steps
/// (opening the image, attach, mkfs, mount, unmount, stop), so users of the same device wait
/// for one another and nobody else waits: a registry that does not answer for one image
/// holds up no other image.
type Slot<T> = Arc<Mutex<Option<T>>>;

#[derive(Default)]
struct Devices {
    /// By the id of the top committed OverlayBD snapshot of the image.
    shared: HashMap<u64, Slot<SharedDevice>>,
    /// Writable (dir/dev mode) devices by the active snapshot's id.
    writable: HashMap<u64, Slot<AttachedDevice>>,
}

fn shared_slots(d: &mut Devices) -> &mut HashMap<u64, Slot<SharedDevice>> {
    &mut d.shared
}

fn writable_slots(d: &mut Devices) -> &mut HashMap<u64, Slot<AttachedDevice>> {
    &mut d.writable
}

/// A record in `<root>/devices/`: what the driver said of a device we made.
#[derive(Debug, PartialEq)]
enum Recorded {
    Identity(device::DeviceIdentity),
    /// Written by an older ovbd, which recorded nothing.
    Unknown,
}

fn lock_slot<T>(slot: &Mutex<Option<T>>) -> std::sync::MutexGuard<'_, Option<T>> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

/// The system calls that take devices down and tell whose a device is; tests replace them
/// (this host has no ublk).
trait DeviceOps: Send + Sync {
    fn is_mounted(&self, mountpoint: &Path) -> bool;
    fn unmount(&self, mountpoint: &Path, lazy: bool) -> Result<()>;
    /// Stops `dev` and waits until its server has deleted it.
    fn stop(&self, dev: &mut AttachedDevice) -> Result<()>;
    /// Who serves device `id`; `None` if there is no such device.
    fn identity(&self, id: u32) -> Result<Option<device::DeviceIdentity>>;
    /// Deletes device `id`, whose server is gone.
    fn delete(&self, id: u32) -> Result<()>;
}

struct SystemDeviceOps;

impl DeviceOps for SystemDeviceOps {
    fn is_mounted(&self, mountpoint: &Path) -> bool {
        mount::is_mounted(mountpoint)
    }
    fn unmount(&self, mountpoint: &Path, lazy: bool) -> Result<()> {
        mount::unmount(mountpoint, lazy)
    }
    fn stop(&self, dev: &mut AttachedDevice) -> Result<()> {
        // A retry after a failed wait: the device is gone already, only the wait is left.
        if dev.is_served() {
            device::stop_device(dev.id)?;
        }
        dev.join()
    }
    fn identity(&self, id: u32) -> Result<Option<device::DeviceIdentity>> {
        device::identity(id)
    }
    fn delete(&self, id: u32) -> Result<()> {
        device::delete_device(id)
    }
}

pub struct Snapshotter {
    cfg: Config,
    meta: MetaStore,
    /// Held only to find a device's slot, never while a slot is locked.
    devices: Mutex<Devices>,
    ops: Box<dyn DeviceOps>,
    /// Where remote layers are read from (registry + block cache); None: no lazy pulling.
    remote: Option<Arc<dyn RemoteSource>>,
}

/// A layer pull that can be lazy (spec §4.4 rule 1): snapshot.ref + blob digest and size +
/// an image reference.
struct RemoteLayer {
    name: String,
    digest: String,
    size: u64,
    image_ref: String,
}

impl RemoteLayer {
    /// `trust_image_ref`: whether the `image-ref` label (which containerd copies from the
    /// image's own manifest) may name the image; `cri.image-ref` is written by the client.
    fn from_labels(
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
                MetaError::InvalidArgument(format!(
                    "{LABEL_BLOB_SIZE}: {size:?} is not a size of at most {} bytes",
                    crate::source::cache::MAX_BLOB_SIZE
                ))
            })?;
        // The digest names cache files and registry URLs: exactly `sha256:` + 64 lowercase hex.
        if !is_sha256_digest(digest) {
            return Err(MetaError::InvalidArgument(format!(
                "{LABEL_BLOB_DIGEST}: {digest:?} is not a sha256 digest"
            ))
            .into());
        }
        Ok(Some(RemoteLayer {
            name: name.clone(),
            digest: digest.clone(),
            size,
            image_ref: image_ref.clone(),
        }))
    }
}

/// The OCI chain ID of a layer with diff ID `diff_id` (an OverlayBD blob's digest) on `parent`
/// (a snapshot key: bare, or containerd's `<namespace>/<n>/<chain id>`): the diff ID for a
/// bottom layer, else `sha256(parent chain + " " + diff_id)`. None if `parent` names no chain ID.
fn chain_id_above(parent: &str, diff_id: &str) -> Option<String> {
    use sha2::Digest as _;
    if parent.is_empty() {
        return Some(diff_id.to_string());
    }
    let parent_chain = parent.rsplit('/').next().filter(|c| is_sha256_digest(c))?;
    let h = sha2::Sha256::digest(format!("{parent_chain} {diff_id}").as_bytes());
    Some(format!(
        "sha256:{}",
        h.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// The largest virtual disk, GiB (256 TiB): writable base layers, `ovbd convert --vsize`.
pub const MAX_VSIZE_GB: u64 = 256 << 10;

/// Virtual size (bytes) of a new writable base layer: the vsize label (GiB) or the default.
fn base_vsize(labels: &BTreeMap<String, String>, default_gb: u64) -> SnapResult<u64> {
    let (gb, what) = match labels.get(LABEL_VSIZE) {
        Some(v) => (v.parse::<u64>().ok(), format!("{LABEL_VSIZE}: {v:?}")),
        None => (Some(default_gb), format!("default_vsize_gb {default_gb}")),
    };
    gb.filter(|g| (1..=MAX_VSIZE_GB).contains(g))
        .and_then(|g| g.checked_mul(1 << 30))
        .ok_or_else(|| {
            MetaError::InvalidArgument(format!("{what} is not a size of 1 to {MAX_VSIZE_GB} GiB"))
                .into()
        })
}

/// `sha256:` and 64 lowercase hex digits.
fn is_sha256_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// `repoBlobUrl` (spec §3.1) of an image reference: `https://HOST/v2/REPO/blobs`, Docker Hub
/// as `registry-1.docker.io` and `library/` for official images. The scheme is only a hint:
/// the registry source speaks plain http to `insecure` and allowed loopback hosts.
fn repo_blob_url(image_ref: &str) -> SnapResult<String> {
    let r = crate::oci::ImageRef::parse(image_ref)
        .map_err(|e| MetaError::InvalidArgument(format!("image reference {image_ref:?}: {e:#}")))?;
    match r {
        crate::oci::ImageRef::Registry(r) => {
            let host = crate::registry::registry_api_host(r.registry());
            Ok(format!("https://{host}/v2/{}/blobs", r.repository()))
        }
        _ => Err(MetaError::InvalidArgument(format!(
            "image reference {image_ref:?} is not a registry reference"
        ))
        .into()),
    }
}

fn ts(nanos: u64) -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

fn to_info(s: &Snapshot) -> Info {
    Info {
        kind: match s.kind {
            Kind::View => containerd_snapshots::Kind::View,
            Kind::Active => containerd_snapshots::Kind::Active,
            Kind::Committed => containerd_snapshots::Kind::Committed,
        },
        name: s.key.clone(),
        parent: s.parent.clone(),
        labels: s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        created_at: ts(s.created),
        updated_at: ts(s.updated),
    }
}

fn mnt(kind: &str, source: &Path, options: Vec<String>) -> Mount {
    Mount {
        r#type: kind.into(),
        source: source.display().to_string(),
        target: String::new(),
        options,
    }
}

impl Snapshotter {
    pub fn open(cfg: Config) -> Result<Snapshotter> {
        std::fs::create_dir_all(cfg.root.join("snapshots"))
            .with_context(|| format!("creating {}", cfg.root.display()))?;
        let meta = MetaStore::open(&cfg.root.join("metadata.db"))?;
        Ok(Snapshotter {
            cfg,
            meta,
            devices: Mutex::new(Devices::default()),
            ops: Box::new(SystemDeviceOps),
            remote: None,
        })
    }

    /// Enables lazy pulling: remote layers are read through `remote`.
    pub fn with_remote(mut self, remote: Arc<dyn RemoteSource>) -> Snapshotter {
        self.remote = Some(remote);
        self
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.cfg.root.join("snapshots").join(id.to_string())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Devices> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the slot of device `key` in the map `pick` chooses, holding that slot's
    /// lock only; drops the slot afterwards if it is empty and nobody else holds it.
    fn with_slot<T, R>(
        &self,
        pick: fn(&mut Devices) -> &mut HashMap<u64, Slot<T>>,
        key: u64,
        f: impl FnOnce(&mut Option<T>) -> R,
    ) -> R {
        let slot = pick(&mut self.lock()).entry(key).or_default().clone();
        let r = f(&mut lock_slot(&slot));
        drop(slot);
        self.prune_slot(pick, key);
        r
    }

    /// As [`Self::with_slot`] for a device already held, unless someone is busy with it
    /// (attaching it, maybe waiting on a registry): then `None` at once.
    fn with_free_slot<T, R>(
        &self,
        pick: fn(&mut Devices) -> &mut HashMap<u64, Slot<T>>,
        key: u64,
        f: impl FnOnce(&mut Option<T>) -> R,
    ) -> Option<R> {
        let slot = pick(&mut self.lock()).get(&key)?.clone();
        let r = match slot.try_lock() {
            Ok(mut g) => Some(f(&mut g)),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(f(&mut p.into_inner())),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        drop(slot);
        self.prune_slot(pick, key);
        r
    }

    /// Drops the slot of `key` if it is empty and nobody holds it.
    fn prune_slot<T>(&self, pick: fn(&mut Devices) -> &mut HashMap<u64, Slot<T>>, key: u64) {
        let mut devs = self.lock();
        let map = pick(&mut devs);
        // Slots are handed out under the devices lock only: a count of 1 there means nobody
        // else holds this one, so its lock is free.
        let unused = map
            .get(&key)
            .is_some_and(|s| Arc::strong_count(s) == 1 && lock_slot(s).is_none());
        if unused {
            map.remove(&key);
        }
    }

    pub fn stat(&self, key: &str) -> SnapResult<Info> {
        Ok(to_info(&self.meta.get(key)?))
    }

    pub fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> SnapResult<Info> {
        let s = self.meta.update(&info.name, |s| {
            let paths = fieldpaths.unwrap_or_default();
            if paths.is_empty() {
                // No paths: labels are replaced wholesale (containerd's semantics).
                s.labels = info
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                return;
            }
            for p in paths {
                if p == "labels" {
                    s.labels = info
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                } else if let Some(k) = p.strip_prefix("labels.") {
                    match info.labels.get(k) {
                        Some(v) => {
                            s.labels.insert(k.to_string(), v.clone());
                        }
                        None => {
                            s.labels.remove(k);
                        }
                    }
                }
            }
        })?;
        Ok(to_info(&s))
    }

    pub fn usage(&self, key: &str) -> SnapResult<Usage> {
        let s = self.meta.get(key)?;
        if s.kind == Kind::Committed {
            return Ok(Usage {
                size: s.usage.0,
                inodes: s.usage.1,
            });
        }
        let (size, inodes) = disk_usage(&self.dir(s.id))?;
        Ok(Usage { size, inodes })
    }

    pub fn list(&self, filters: &[String]) -> SnapResult<Vec<Info>> {
        let f = crate::snapshotter::filters::Filters::parse(filters)
            .map_err(|e| MetaError::InvalidArgument(e.to_string()))?;
        Ok(self
            .meta
            .list()?
            .iter()
            .filter(|s| f.matches(s))
            .map(to_info)
            .collect())
    }

    /// Prepare (active) or View.
    pub fn create(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: HashMap<String, String>,
    ) -> SnapResult<Vec<Mount>> {
        let labels: BTreeMap<String, String> = labels.into_iter().collect();
        let chain = if parent.is_empty() {
            Vec::new()
        } else {
            self.chain_from(parent)?
        };
        let (normal, block) = split_chain(&chain)?;
        let unpack = is_unpack(key, &labels);
        if kind == Kind::Active && normal.is_empty() && self.remote.is_some() {
            if let Some(remote) = RemoteLayer::from_labels(&labels, self.cfg.trust_image_ref_label)?
            {
                if self.may_pull_lazily(&remote, parent) {
                    return Err(self.create_remote(key, parent, labels, remote));
                }
            }
        }
        let mode = if kind == Kind::Active
            && !unpack
            && (!block.is_empty() || chain.is_empty())
            && normal.is_empty()
        {
            let m = match labels.get(LABEL_WRITABLE) {
                Some(v) => RootfsMode::parse(v)
                    .map_err(|e| MetaError::InvalidArgument(format!("{LABEL_WRITABLE}: {e}")))?,
                None if block.is_empty() => RootfsMode::Overlayfs,
                None => self.cfg.rootfs_mode,
            };
            (m != RootfsMode::Overlayfs).then_some(m)
        } else {
            None
        };
        if mode.is_some() && block.is_empty() {
            // A new base layer: its size is checked before anything is made.
            base_vsize(&labels, self.cfg.default_vsize_gb)?;
        }
        let snap =
            self.meta
                .create(key, parent, kind, labels, |draft| -> SnapResult<Snapshot> {
                    let dir = self.dir(draft.id);
                    let mut s = draft.clone();
                    // A leftover directory of a crashed transaction with this id is garbage.
                    let _ = std::fs::remove_dir_all(&dir);
                    std::fs::create_dir_all(dir.join("fs"))
                        .with_context(|| format!("creating {}", dir.display()))?;
                    if kind == Kind::Active {
                        std::fs::create_dir_all(dir.join("work"))?;
                    }
                    if let Some(m) = mode {
                        std::fs::create_dir_all(dir.join("block"))?;
                        s.mode = Some(m.as_str().to_string());
                        s.storage = Storage::Block;
                    }
                    if unpack && !block.is_empty() {
                        // Unpacking onto an OverlayBD image (as upstream): the layer's own directory,
                        // no device for its parents. An OverlayBD layer only drops its file here.
                        s.mode = Some(UNPACK_BIND.to_string());
                    }
                    Ok(s)
                })?;
        match self.mounts_of(&snap, &chain) {
            Ok(m) => Ok(m),
            Err(e) => {
                // Undo: nothing half-made stays behind.
                let _ = self.release(&snap, &chain);
                let _ = self.meta.remove(key);
                let _ = std::fs::remove_dir_all(self.dir(snap.id));
                Err(e)
            }
        }
    }

    /// Whether `remote` may be committed lazily on `parent`. containerd checks the diff IDs
    /// of what it unpacks; a lazy layer is never unpacked, so its name must be the chain ID its
    /// blob makes (an image cannot take another image's layer names by copying its diff IDs),
    /// and a snapshot already under that name must be this same remote layer.
    fn may_pull_lazily(&self, remote: &RemoteLayer, parent: &str) -> bool {
        let chain = chain_id_above(parent, &remote.digest);
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
    fn create_remote(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        remote: RemoteLayer,
    ) -> SnapError {
        let made = (|| -> SnapResult<()> {
            let url = repo_blob_url(&remote.image_ref)?;
            if self.meta.get(&remote.name).is_ok() {
                return Ok(()); // pulled before: AlreadyExists
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
            let committed = self.meta.commit(
                key,
                &remote.name,
                BTreeMap::from([
                    (LABEL_REMOTE.to_string(), "remote snapshot".to_string()),
                    (LABEL_REPO_BLOB_URL.to_string(), url),
                ]),
                |c| -> SnapResult<()> {
                    c.storage = Storage::Block;
                    c.mode = None;
                    c.usage = (0, 1);
                    Ok(())
                },
            );
            if let Err(e) = committed {
                let _ = self.meta.remove(key);
                let _ = std::fs::remove_dir_all(self.dir(snap.id));
                return Err(e);
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
            Ok(()) => MetaError::AlreadyExists(format!("{} (remote layer)", remote.name)).into(),
            Err(e) => e,
        }
    }

    /// How a device config names committed OverlayBD layer `l`: its directory, and for a
    /// remote layer also the blob (read from the registry until a local file is in `fs/`).
    fn lower_config(&self, l: &Snapshot) -> LowerConfig {
        let mut lc = LowerConfig {
            dir: Some(self.dir(l.id).join("fs")),
            ..Default::default()
        };
        if l.labels.contains_key(LABEL_REMOTE) {
            lc.digest = l.labels.get(LABEL_BLOB_DIGEST).cloned();
            lc.size = l.labels.get(LABEL_BLOB_SIZE).and_then(|v| v.parse().ok());
            lc.repo_blob_url = l.labels.get(LABEL_REPO_BLOB_URL).cloned();
        }
        lc
    }

    /// A device config over the OverlayBD layers `block` (bottom to top).
    fn image_config(
        &self,
        block: &[Snapshot],
        upper: Option<UpperConfig>,
        bdir: &Path,
    ) -> ImageConfig {
        let lowers: Vec<LowerConfig> = block.iter().map(|l| self.lower_config(l)).collect();
        ImageConfig {
            // The image's own (the top remote layer's); each remote lower also names its own.
            repo_blob_url: lowers.iter().rev().find_map(|l| l.repo_blob_url.clone()),
            lowers,
            upper,
            result_file: Some(bdir.join("init-debug.log")),
        }
    }

    pub fn mounts(&self, key: &str) -> SnapResult<Vec<Mount>> {
        let s = self.meta.get(key)?;
        if s.kind == Kind::Committed {
            return Err(MetaError::FailedPrecondition(format!(
                "{key} is committed: it has no mounts"
            ))
            .into());
        }
        let chain = if s.parent.is_empty() {
            Vec::new()
        } else {
            self.chain_from(&s.parent)?
        };
        self.mounts_of(&s, &chain)
    }

    /// `parent` and its ancestors, nearest first.
    fn chain_from(&self, parent: &str) -> SnapResult<Vec<Snapshot>> {
        let p = self.meta.get(parent)?;
        let mut chain = vec![p];
        chain.extend(self.meta.parents(parent)?);
        Ok(chain)
    }

    /// The mounts of an active or view snapshot; attaches and mounts devices as needed
    /// (idempotent: a device already up is reused).
    fn mounts_of(&self, s: &Snapshot, chain: &[Snapshot]) -> SnapResult<Vec<Mount>> {
        let dir = self.dir(s.id);
        let (normal, block) = split_chain(chain)?;
        if s.mode.as_deref() == Some(UNPACK_BIND) {
            return Ok(vec![mnt(
                "bind",
                &dir.join("fs"),
                vec!["rw".into(), "rbind".into()],
            )]);
        }
        match s.mode.as_deref().map(RootfsMode::parse).transpose()? {
            Some(RootfsMode::Dir) => {
                let (_dev, mp) = self.ensure_writable(s, &block)?;
                return Ok(vec![mnt("bind", &mp, vec!["rw".into(), "rbind".into()])]);
            }
            Some(RootfsMode::Dev) => {
                let (dev, _) = self.ensure_writable(s, &block)?;
                return Ok(vec![mnt(
                    "ext4",
                    Path::new(&dev),
                    vec!["rw".into(), "discard".into()],
                )]);
            }
            _ => {}
        }
        let mut lowers: Vec<PathBuf> = normal.iter().map(|p| self.dir(p.id).join("fs")).collect();
        if let Some(top) = block.last() {
            lowers.push(self.ensure_shared(top, &block, s.id)?);
        }
        let ro = s.kind == Kind::View;
        if lowers.is_empty() {
            let opt = if ro { "ro" } else { "rw" };
            return Ok(vec![mnt(
                "bind",
                &dir.join("fs"),
                vec![opt.into(), "rbind".into()],
            )]);
        }
        if ro && lowers.len() == 1 {
            return Ok(vec![mnt(
                "bind",
                &lowers[0],
                vec!["ro".into(), "rbind".into()],
            )]);
        }
        let lowerdir = lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let mut options = Vec::new();
        if !ro {
            options.push(format!("workdir={}", dir.join("work").display()));
            options.push(format!("upperdir={}", dir.join("fs").display()));
        }
        options.push(format!("lowerdir={lowerdir}"));
        Ok(vec![mnt("overlay", Path::new("overlay"), options)])
    }

    /// The read-only device of the image whose top layer is `top` (`block` bottom to top),
    /// attached and mounted once, shared by every user. Returns its mountpoint.
    fn ensure_shared(&self, top: &Snapshot, block: &[Snapshot], user: u64) -> SnapResult<PathBuf> {
        self.with_slot(shared_slots, top.id, |slot| {
            if let Some(d) = slot.as_mut().filter(|d| !d.users.is_empty()) {
                d.users.insert(user);
                return Ok(d.mountpoint.clone());
            }
            // A device left by a failed release is finished off, not reused half torn down.
            self.free_shared(slot)?;
            let (dev, mountpoint) = self.attach_shared(top, block)?;
            *slot = Some(SharedDevice {
                dev,
                mountpoint: mountpoint.clone(),
                users: BTreeSet::from([user]),
            });
            Ok(mountpoint)
        })
    }

    /// Attaches and mounts the read-only device of the image whose top layer is `top`.
    fn attach_shared(
        &self,
        top: &Snapshot,
        block: &[Snapshot],
    ) -> SnapResult<(AttachedDevice, PathBuf)> {
        let bdir = self.dir(top.id).join("block");
        std::fs::create_dir_all(bdir.join("mountpoint"))
            .with_context(|| format!("creating {}", bdir.display()))?;
        let cfg = self.image_config(block, None, &bdir);
        save_config(&cfg, &bdir.join("config.v1.json"))?;
        let dev = self.attach(&cfg, &bdir)?;
        let mountpoint = bdir.join("mountpoint");
        if !mount::is_mounted(&mountpoint) {
            if let Err(e) =
                mount::mount(&dev.block_path(), &mountpoint, "ext4", libc::MS_RDONLY, "")
            {
                let _ = device::stop_device(dev.id);
                return Err(e.into());
            }
        }
        Ok((dev, mountpoint))
    }

    /// The writable device of a dir/dev snapshot; returns (device path, mountpoint).
    fn ensure_writable(&self, s: &Snapshot, block: &[Snapshot]) -> SnapResult<(String, PathBuf)> {
        let mountpoint = self.dir(s.id).join("block/mountpoint");
        self.with_slot(writable_slots, s.id, |slot| {
            if let Some(d) = slot {
                return Ok((d.block_path(), mountpoint));
            }
            let dev = self.attach_writable(s, block, &mountpoint)?;
            let path = dev.block_path();
            *slot = Some(dev);
            Ok((path, mountpoint))
        })
    }

    /// Makes (when new) and attaches the writable layer of `s`, formatted and mounted as its
    /// mode asks.
    fn attach_writable(
        &self,
        s: &Snapshot,
        block: &[Snapshot],
        mountpoint: &Path,
    ) -> SnapResult<AttachedDevice> {
        let bdir = self.dir(s.id).join("block");
        let (data, index) = (bdir.join("writable_data"), bdir.join("writable_index"));
        let fresh = !data.exists();
        if fresh {
            let vsize = if block.is_empty() {
                base_vsize(&s.labels, self.cfg.default_vsize_gb)?
            } else {
                0 // inherit the image's
            };
            let mode = match self.cfg.writable_layer_type {
                WritableLayerType::Append => RwMode::Append,
                WritableLayerType::Sparse => RwMode::Sparse,
            };
            RwLayer::create(&data, &index, vsize, mode, None)?;
        }
        let cfg = self.image_config(block, Some(UpperConfig { index, data }), &bdir);
        save_config(&cfg, &bdir.join("config.v1.json"))?;
        let dev = self.attach(&cfg, &bdir)?;
        let path = dev.block_path();
        let ready = (|| -> Result<()> {
            if fresh && block.is_empty() {
                mkfs_ext4(&path)?;
            }
            if s.mode.as_deref() == Some("dir") && !mount::is_mounted(mountpoint) {
                std::fs::create_dir_all(mountpoint)?;
                mount::mount(&path, mountpoint, "ext4", 0, "discard")?;
            }
            Ok(())
        })();
        if let Err(e) = ready {
            let _ = device::stop_device(dev.id);
            return Err(e.into());
        }
        Ok(dev)
    }

    /// Attaches `cfg`'s image, re-attaching the device recorded in `bdir` if the kernel kept it
    /// (the daemon restarted while it was in use).
    fn attach(&self, cfg: &ImageConfig, bdir: &Path) -> Result<AttachedDevice> {
        let mark = bdir.join("backstore_mark");
        let recorded = std::fs::read_to_string(&mark).ok().and_then(|t| {
            t.trim()
                .strip_prefix("/dev/ublkb")
                .and_then(|n| n.parse::<u32>().ok())
        });
        let image = match cfg.open_image(self.remote.as_deref()) {
            Ok(i) => Arc::new(i),
            Err(e) => {
                cfg.write_result(&Err(anyhow!("{e:#}")));
                return Err(e);
            }
        };
        let mut attached = None;
        // Only a device still ours is recovered: after a restart the id may be another's.
        if let Some(id) = recorded.filter(|&id| self.still_ours(id)) {
            match device::attach(
                image.clone(),
                device::device_pool(),
                AttachOptions {
                    id: Some(id),
                    recover: true,
                },
            ) {
                Ok(d) => attached = Some(d),
                Err(e) => log::warn!("re-attaching /dev/ublkb{id}: {e:#}; attaching anew"),
            }
        }
        let dev = match attached {
            Some(d) => d,
            None => match device::attach(image, device::device_pool(), AttachOptions::default()) {
                Ok(d) => d,
                Err(e) => {
                    cfg.write_result(&Err(anyhow!("{e:#}")));
                    return Err(e);
                }
            },
        };
        self.own_device(dev.id, Some(dev.identity()));
        std::fs::write(&mark, dev.block_path())
            .with_context(|| format!("writing {}", mark.display()))?;
        cfg.write_result(&Ok(()));
        Ok(dev)
    }

    pub fn commit(&self, name: &str, key: &str, labels: HashMap<String, String>) -> SnapResult<()> {
        let s = self.meta.get(key)?;
        // A taken name is refused before the layer is touched (the metadata commit checks again).
        if self.meta.get(name).is_ok() {
            return Err(MetaError::AlreadyExists(name.to_string()).into());
        }
        if s.kind == Kind::Active && matches!(s.mode.as_deref(), Some("dir") | Some("dev")) {
            // Seal the writable layer into a read-only OverlayBD layer of this snapshot, undone
            // if the commit fails: the container's data must outlive a failed Commit.
            self.detach_writable(&s)?;
            let sealed = SealedUpper::seal(&self.dir(s.id))?;
            return match self.commit_meta(name, key, &s, labels) {
                Ok(()) => {
                    sealed.finish();
                    Ok(())
                }
                Err(e) => {
                    if let Err(undo) = sealed.undo() {
                        log::error!(
                            "commit of {key} failed ({e}) and undoing its seal too: {undo:#}"
                        );
                    }
                    Err(e)
                }
            };
        }
        self.commit_meta(name, key, &s, labels)
    }

    /// Commits active snapshot `s` (`key`) as `name`, its layer as it is on disk now.
    fn commit_meta(
        &self,
        name: &str,
        key: &str,
        s: &Snapshot,
        labels: HashMap<String, String>,
    ) -> SnapResult<()> {
        let dir = self.dir(s.id);
        // Read the disk before the metadata transaction: a slow or stuck file must not hold
        // the store's write lock (every other call would wait behind it).
        let layer_file = block_layer_file(&dir.join("fs"));
        let usage = disk_usage(&dir)?;
        let mut labels: BTreeMap<String, String> = labels.into_iter().collect();
        if let Some(file) = layer_file {
            labels.insert(LABEL_LOCAL_COMMIT.into(), format!("{}/fs/{file}", s.id));
        }
        self.meta.commit(key, name, labels, |c| -> SnapResult<()> {
            if c.id != s.id {
                return Err(MetaError::FailedPrecondition(format!(
                    "{key} was replaced while it was being committed"
                ))
                .into());
            }
            c.mode = None;
            c.storage = if layer_file.is_some() {
                Storage::Block
            } else {
                Storage::Normal
            };
            c.usage = usage;
            Ok(())
        })?;
        Ok(())
    }

    fn detach_writable(&self, s: &Snapshot) -> Result<()> {
        self.with_slot(writable_slots, s.id, |slot| {
            self.free_writable(s.id, slot, false)
        })
    }

    /// Unmounts and stops the writable device of snapshot `id` in `slot`; it stays there if
    /// that fails. `lazy_if_busy`: a busy filesystem is detached lazily (the snapshot is gone).
    fn free_writable(
        &self,
        id: u64,
        slot: &mut Option<AttachedDevice>,
        lazy_if_busy: bool,
    ) -> Result<()> {
        self.unmount(&self.dir(id).join("block/mountpoint"), lazy_if_busy)?;
        if let Some(d) = slot {
            self.ops.stop(d)?;
            self.own_device(d.id, None);
        }
        *slot = None;
        Ok(())
    }

    /// Unmounts and stops the shared device in `slot`, which nobody uses any more; it stays
    /// there if that fails.
    fn free_shared(&self, slot: &mut Option<SharedDevice>) -> Result<()> {
        if let Some(d) = slot {
            self.unmount(&d.mountpoint, true)?;
            self.ops.stop(&mut d.dev)?;
            self.own_device(d.dev.id, None);
        }
        *slot = None;
        Ok(())
    }

    /// Unmounts `mountpoint` if mounted; `lazy_if_busy`: detached lazily if a plain unmount
    /// fails (the filesystem goes once its last user lets go).
    fn unmount(&self, mountpoint: &Path, lazy_if_busy: bool) -> Result<()> {
        if !self.ops.is_mounted(mountpoint) {
            return Ok(());
        }
        match self.ops.unmount(mountpoint, false) {
            Err(e) if lazy_if_busy => {
                log::warn!("{e:#}; detaching it lazily");
                self.ops.unmount(mountpoint, true)
            }
            r => r,
        }
    }

    /// Lets go of the devices snapshot `s` uses.
    fn release(&self, s: &Snapshot, chain: &[Snapshot]) -> Result<()> {
        if matches!(s.mode.as_deref(), Some("dir") | Some("dev")) {
            self.detach_writable(s)?;
        }
        let (_, block) = split_chain(chain).map_err(|e| anyhow!("{e}"))?;
        if s.mode.as_deref() == Some(UNPACK_BIND) {
            return Ok(());
        }
        if let Some(top) = block.last() {
            self.with_slot(shared_slots, top.id, |slot| -> Result<()> {
                let last = slot.as_mut().is_some_and(|d| {
                    d.users.remove(&s.id);
                    d.users.is_empty()
                });
                if last {
                    self.free_shared(slot)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    pub fn remove(&self, key: &str) -> SnapResult<()> {
        let s = self.meta.get(key)?;
        let chain = if s.parent.is_empty() {
            Vec::new()
        } else {
            self.chain_from(&s.parent)?
        };
        self.meta.remove(key)?;
        if let Err(e) = self.release(&s, &chain) {
            log::warn!("removing {key}: {e:#}; Cleanup will retry");
            return Ok(());
        }
        if let Err(e) = remove_snapshot_dir(&self.dir(s.id)) {
            log::warn!("removing {key}: {e:#}; Cleanup will retry");
        }
        Ok(())
    }

    /// Frees devices whose release failed (a busy unmount, a failed stop), then removes
    /// directories no snapshot owns (left by crashes or failed removals).
    pub fn cleanup(&self) -> SnapResult<()> {
        // Ids at or past `next` belong to creates still in flight: not orphans.
        let (live, next) = self.meta.ids()?;
        let held = self.free_released_devices(&live, next);
        let dir = self.cfg.root.join("snapshots");
        for e in std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .flatten()
        {
            let Some(id) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            // A device still held may be serving files in the directory.
            if id < next && !live.contains(&id) && !held.contains(&id) {
                if let Err(err) = remove_snapshot_dir(&e.path()) {
                    log::warn!("cleanup of {}: {err:#}", e.path().display());
                }
            }
        }
        Ok(())
    }

    /// Retries taking down the writable devices of removed snapshots and the shared devices
    /// nobody uses; devices someone is busy with are left alone. Returns the ids of snapshots
    /// whose device could not be freed.
    fn free_released_devices(&self, live: &BTreeSet<u64>, next: u64) -> BTreeSet<u64> {
        let (shared, writable): (Vec<u64>, Vec<u64>) = {
            let devs = self.lock();
            (
                devs.shared.keys().copied().collect(),
                devs.writable.keys().copied().collect(),
            )
        };
        let mut held = BTreeSet::new();
        for id in writable {
            if id >= next || live.contains(&id) {
                continue;
            }
            let freed = self.with_free_slot(writable_slots, id, |slot| {
                self.free_writable(id, slot, true)
            });
            if let Some(Err(e)) = freed {
                log::warn!("cleanup: device of removed snapshot {id}: {e:#}");
                held.insert(id);
            }
        }
        for id in shared {
            let freed = self.with_free_slot(shared_slots, id, |slot| {
                match slot.as_ref().is_some_and(|d| d.users.is_empty()) {
                    true => self.free_shared(slot),
                    false => Ok(()),
                }
            });
            if let Some(Err(e)) = freed {
                log::warn!("cleanup: image device of snapshot {id}: {e:#}");
                held.insert(id);
            }
        }
        held
    }

    /// At start: bring back what live snapshots need (devices the kernel kept are re-attached
    /// in place, so running containers keep their rootfs), then remove orphans.
    pub fn reconcile(&self) -> Result<()> {
        let all = self.meta.list()?;
        for s in all.iter().filter(|s| s.kind != Kind::Committed) {
            let chain = if s.parent.is_empty() {
                Vec::new()
            } else {
                self.chain_from(&s.parent).map_err(|e| anyhow!("{e}"))?
            };
            let (_, block) = split_chain(&chain).map_err(|e| anyhow!("{e}"))?;
            if s.mode.as_deref() != Some(UNPACK_BIND) && (s.mode.is_some() || !block.is_empty()) {
                if let Err(e) = self.mounts_of(s, &chain) {
                    log::error!("restoring snapshot {}: {e}", s.key);
                }
            }
        }
        self.cleanup().map_err(|e| anyhow!("{e}"))?;
        self.delete_orphan_devices();
        Ok(())
    }

    /// Records that ublk device `id` is ours and what the driver says of it (`None`: forgets
    /// it), so a later start can tell our orphans (kept by the kernel for recovery, but no
    /// snapshot needs them any more) from devices other programs made with a reused id.
    fn own_device(&self, id: u32, identity: Option<device::DeviceIdentity>) {
        let dir = self.cfg.root.join("devices");
        let path = dir.join(id.to_string());
        let r = match identity {
            Some(i) => std::fs::create_dir_all(&dir).and_then(|_| {
                std::fs::write(
                    &path,
                    serde_json::to_vec(&i).map_err(std::io::Error::other)?,
                )
            }),
            None => std::fs::remove_file(&path),
        };
        if let Err(e) = r {
            log::warn!("{}: {e}", path.display());
        }
    }

    /// What we recorded of device `id` when we made it: `None` if nothing.
    fn recorded_device(&self, id: u32) -> Option<Recorded> {
        let path = self.cfg.root.join("devices").join(id.to_string());
        let text = std::fs::read(path).ok()?;
        Some(match serde_json::from_slice(&text) {
            Ok(i) => Recorded::Identity(i),
            Err(_) => Recorded::Unknown,
        })
    }

    /// Whether device `id` (named by a snapshot's backstore_mark) exists and is still the one
    /// we recorded, so it may be recovered: the driver names the server and size we recorded.
    /// A record of an older ovbd, which names neither, is trusted as that ovbd did.
    fn still_ours(&self, id: u32) -> bool {
        match self.ops.identity(id) {
            Ok(Some(now)) => match self.recorded_device(id) {
                Some(Recorded::Identity(r)) => r == now,
                Some(Recorded::Unknown) => true,
                // Released since: the id may be another program's now.
                None => false,
            },
            Ok(None) => false,
            Err(e) => {
                log::warn!("{e:#}");
                false
            }
        }
    }

    /// Deletes devices we made that nothing re-attached at start.
    fn delete_orphan_devices(&self) {
        let (shared, writable): (Vec<_>, Vec<_>) = {
            let devs = self.lock();
            (
                devs.shared.values().cloned().collect(),
                devs.writable.values().cloned().collect(),
            )
        };
        let attached: BTreeSet<u32> = shared
            .iter()
            .filter_map(|s| lock_slot(s).as_ref().map(|d| d.dev.id))
            .chain(
                writable
                    .iter()
                    .filter_map(|s| lock_slot(s).as_ref().map(|d| d.id)),
            )
            .collect();
        let Ok(entries) = std::fs::read_dir(self.cfg.root.join("devices")) else {
            return;
        };
        for e in entries.flatten() {
            let Some(id) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if attached.contains(&id) {
                continue;
            }
            let recorded = self.recorded_device(id);
            match self.ops.identity(id) {
                Ok(Some(now)) if recorded == Some(Recorded::Identity(now)) => {
                    log::info!("deleting orphaned /dev/ublkb{id}");
                    if let Err(err) = self.ops.delete(id) {
                        log::warn!("{err:#}");
                        continue;
                    }
                }
                Ok(Some(_)) if recorded == Some(Recorded::Unknown) => log::warn!(
                    "leaving /dev/ublkb{id} alone: an older ovbd recorded it without what tells it from another program's device; `ovbd device detach {id}` deletes it if it is ours"
                ),
                Ok(Some(now)) => log::warn!(
                    "leaving /dev/ublkb{id} alone: another program's device now (served by pid {} with {} sectors, not as recorded)",
                    now.pid,
                    now.sectors
                ),
                Ok(None) => {}
                Err(err) => {
                    log::warn!("{err:#}");
                    continue;
                }
            }
            self.own_device(id, None);
        }
    }
}

/// Splits a parent chain (nearest first) into plain OCI layers on top and OverlayBD layers at
/// the bottom (returned bottom to top). OverlayBD layers above plain ones are not supported.
fn split_chain(chain: &[Snapshot]) -> SnapResult<(Vec<Snapshot>, Vec<Snapshot>)> {
    let first_block = chain
        .iter()
        .position(|s| s.storage == Storage::Block)
        .unwrap_or(chain.len());
    let (normal, block) = chain.split_at(first_block);
    if let Some(s) = block.iter().find(|s| s.storage != Storage::Block) {
        return Err(MetaError::FailedPrecondition(format!(
            "unsupported image: plain OCI layer {} lies below OverlayBD layers (OverlayBD layers must be at the bottom)",
            s.key
        ))
        .into());
    }
    let mut block = block.to_vec();
    block.reverse();
    Ok((normal.to_vec(), block))
}

/// A dir/dev snapshot's writable layer sealed for Commit (`fs/overlaybd.sealed`, a hard link
/// to `block/writable_data`); until the metadata commit succeeds it can be undone.
struct SealedUpper {
    data: PathBuf,
    index: PathBuf,
    sealed: PathBuf,
    /// The data file's length before sealing: sealing only appends the index and a trailer.
    len: u64,
}

impl SealedUpper {
    fn seal(dir: &Path) -> SnapResult<SealedUpper> {
        let bdir = dir.join("block");
        let data = bdir.join("writable_data");
        let len = std::fs::metadata(&data)
            .with_context(|| format!("writable layer {}", data.display()))?
            .len();
        let u = SealedUpper {
            index: bdir.join("writable_index"),
            sealed: dir.join("fs/overlaybd.sealed"),
            data,
            len,
        };
        let done = (|| -> SnapResult<()> {
            // A link left by an attempt that stopped before its metadata commit.
            remove_if_present(&u.sealed)?;
            RwLayer::open(&u.data, &u.index)?.seal()?;
            std::fs::hard_link(&u.data, &u.sealed).with_context(|| {
                format!("linking {} to {}", u.sealed.display(), u.data.display())
            })?;
            Ok(())
        })();
        match done {
            Ok(()) => Ok(u),
            Err(e) => {
                if let Err(undo) = u.undo() {
                    log::error!("undoing the seal of {}: {undo:#}", u.data.display());
                }
                Err(e)
            }
        }
    }

    /// Back to a writable layer: the link goes, the data file is cut back to its old length.
    fn undo(&self) -> Result<()> {
        remove_if_present(&self.sealed)?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.data)
            .with_context(|| format!("opening {}", self.data.display()))?;
        f.set_len(self.len)
            .and_then(|()| f.sync_data())
            .with_context(|| format!("truncating {} to {}", self.data.display(), self.len))
    }

    /// The commit is stored: the writable layer's own names go.
    fn finish(self) {
        for p in [&self.data, &self.index] {
            if let Err(e) = remove_if_present(p) {
                log::warn!("{e:#}");
            }
        }
    }
}

fn remove_if_present(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", p.display()))
        }
        _ => Ok(()),
    }
}

/// The OverlayBD layer file a layer directory holds, if any (checked by magic, as upstream).
/// Only a regular file counts: a symlink may point anywhere on the node, a FIFO would block.
fn block_layer_file(fs: &Path) -> Option<&'static str> {
    ["overlaybd.commit", "overlaybd.sealed"]
        .into_iter()
        .find(|n| {
            let mut head = [0u8; 24];
            FileSource::open(fs.join(n))
                .and_then(|f| ovbd_format::source::read_exact_at(&f, &mut head, 0))
                .is_ok()
                && sniff(&head).is_some()
        })
}

fn save_config(cfg: &ImageConfig, path: &Path) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(cfg)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

fn mkfs_ext4(dev: &str) -> Result<()> {
    // upstream's options for a writable base layer
    let out = std::process::Command::new("mkfs.ext4")
        .args([
            "-q",
            "-O",
            "^has_journal,sparse_super,flex_bg",
            "-G",
            "1",
            "-E",
            "discard",
            "-F",
            dev,
        ])
        .output()
        .context("running mkfs.ext4")?;
    if !out.status.success() {
        bail!(
            "mkfs.ext4 {dev}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Unmounts anything under `dir` (deepest first), then removes it.
fn remove_snapshot_dir(dir: &Path) -> Result<()> {
    let prefix = format!("{}/", dir.display());
    let mut under: Vec<String> = mount::mounts()
        .into_iter()
        .map(|(mp, _)| mp)
        .filter(|mp| mp.starts_with(&prefix))
        .collect();
    under.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mp in under {
        mount::unmount(Path::new(&mp), true)?;
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// Bytes (allocated) and inodes under `dir`, not crossing into mounts.
fn disk_usage(dir: &Path) -> Result<(i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut size = 0i64;
    let mut inodes = 0i64;
    let mut seen = BTreeSet::new();
    let root_dev = std::fs::symlink_metadata(dir).map(|m| m.dev()).unwrap_or(0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.dev() != root_dev || !seen.insert(md.ino()) {
            continue;
        }
        inodes += 1;
        size += (md.blocks() * 512) as i64;
        if md.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    Ok((size, inodes))
}

/// The gRPC face: each call runs the (blocking) snapshotter operation off the async threads.
pub struct Service(pub Arc<Snapshotter>);

async fn blocking<T: Send + 'static>(
    s: &Arc<Snapshotter>,
    f: impl FnOnce(&Snapshotter) -> SnapResult<T> + Send + 'static,
) -> Result<T, tonic::Status> {
    let s = s.clone();
    match tokio::task::spawn_blocking(move || f(&s)).await {
        Ok(r) => r.map_err(|e| {
            log::debug!("{e}");
            e.into()
        }),
        Err(e) => Err(tonic::Status::internal(format!(
            "snapshotter task failed: {e}"
        ))),
    }
}

#[tonic::async_trait]
impl containerd_snapshots::Snapshotter for Service {
    type Error = tonic::Status;

    async fn stat(&self, key: String) -> Result<Info, Self::Error> {
        blocking(&self.0, move |s| s.stat(&key)).await
    }

    async fn update(
        &self,
        info: Info,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<Info, Self::Error> {
        blocking(&self.0, move |s| s.update(info, fieldpaths)).await
    }

    async fn usage(&self, key: String) -> Result<Usage, Self::Error> {
        blocking(&self.0, move |s| s.usage(&key)).await
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Self::Error> {
        blocking(&self.0, move |s| s.mounts(&key)).await
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        log::info!("prepare {key} (parent {parent:?})");
        blocking(&self.0, move |s| {
            s.create(&key, &parent, Kind::Active, labels)
        })
        .await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        log::info!("view {key} (parent {parent:?})");
        blocking(&self.0, move |s| {
            s.create(&key, &parent, Kind::View, labels)
        })
        .await
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), Self::Error> {
        log::info!("commit {key} as {name}");
        blocking(&self.0, move |s| s.commit(&name, &key, labels)).await
    }

    async fn remove(&self, key: String) -> Result<(), Self::Error> {
        log::info!("remove {key}");
        blocking(&self.0, move |s| s.remove(&key)).await
    }

    async fn clear(&self) -> Result<(), Self::Error> {
        blocking(&self.0, |s| s.cleanup()).await
    }

    type InfoStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<Info, tonic::Status>> + Send + 'static>,
    >;

    async fn list(
        &self,
        _snapshotter: String,
        filters: Vec<String>,
    ) -> Result<Self::InfoStream, Self::Error> {
        let infos = blocking(&self.0, move |s| s.list(&filters)).await?;
        Ok(Box::pin(tokio_stream::iter(infos.into_iter().map(Ok))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshotter() -> (tempfile::TempDir, Snapshotter) {
        let d = tempfile::tempdir().unwrap();
        let cfg = Config {
            root: d.path().join("root"),
            ..Config::default()
        };
        (d, Snapshotter::open(cfg).unwrap())
    }

    fn code(e: SnapError) -> tonic::Code {
        tonic::Status::from(e).code()
    }

    #[test]
    fn overlay_snapshots_behave_like_containerds() {
        let (_d, s) = snapshotter();
        let m = s
            .create("l1-extract", "", Kind::Active, HashMap::new())
            .unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].r#type, "bind");
        assert!(m[0].options.contains(&"rw".to_string()));
        let fs1 = PathBuf::from(&m[0].source);
        std::fs::write(fs1.join("a"), "1").unwrap();
        s.commit(
            "l1",
            "l1-extract",
            HashMap::from([("k".into(), "v".into())]),
        )
        .unwrap();
        assert_eq!(
            code(s.stat("l1-extract").unwrap_err()),
            tonic::Code::NotFound
        );
        let info = s.stat("l1").unwrap();
        assert_eq!(info.kind, containerd_snapshots::Kind::Committed);
        assert_eq!(info.labels["k"], "v");
        assert!(s.usage("l1").unwrap().size > 0);

        let m = s
            .create("l2-extract", "l1", Kind::Active, HashMap::new())
            .unwrap();
        assert_eq!(m[0].r#type, "overlay");
        let lower = format!("lowerdir={}", fs1.display());
        assert!(m[0].options.contains(&lower), "{:?}", m[0].options);
        s.commit("l2", "l2-extract", HashMap::new()).unwrap();

        // A view of one layer is a read-only bind; of two, a read-only overlay (no upperdir).
        let v = s.create("v1", "l1", Kind::View, HashMap::new()).unwrap();
        assert_eq!(
            (v[0].r#type.as_str(), v[0].options[0].as_str()),
            ("bind", "ro")
        );
        let v = s.create("v2", "l2", Kind::View, HashMap::new()).unwrap();
        assert_eq!(v[0].r#type, "overlay");
        assert!(v[0].options.iter().all(|o| !o.starts_with("upperdir")));
        let lowers = v[0]
            .options
            .iter()
            .find(|o| o.starts_with("lowerdir="))
            .unwrap();
        assert_eq!(
            lowers.matches(':').count(),
            1,
            "nearest layer first, two lowers: {lowers}"
        );
        assert_eq!(s.mounts("v2").unwrap(), v);

        // Errors map to containerd's codes.
        assert_eq!(
            code(
                s.create("v2", "l2", Kind::View, HashMap::new())
                    .unwrap_err()
            ),
            tonic::Code::AlreadyExists
        );
        assert_eq!(
            code(
                s.create("x", "nope", Kind::Active, HashMap::new())
                    .unwrap_err()
            ),
            tonic::Code::NotFound
        );
        assert_eq!(
            code(
                s.create("x", "v2", Kind::Active, HashMap::new())
                    .unwrap_err()
            ),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            code(s.remove("l1").unwrap_err()),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            code(s.commit("y", "v2", HashMap::new()).unwrap_err()),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            code(s.mounts("l1").unwrap_err()),
            tonic::Code::FailedPrecondition
        );

        // Filters.
        let names = |f: &[&str]| {
            let mut v: Vec<String> = s
                .list(&f.iter().map(|x| x.to_string()).collect::<Vec<_>>())
                .unwrap()
                .into_iter()
                .map(|i| i.name)
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&["kind==committed"]), vec!["l1", "l2"]);
        assert_eq!(names(&["parent==l2"]), vec!["v2"]);
        assert_eq!(names(&["labels.k==v"]), vec!["l1"]);

        // Update by field path.
        let mut info = s.stat("l2").unwrap();
        info.labels.insert("a".into(), "b".into());
        s.update(info, Some(vec!["labels.a".into()])).unwrap();
        assert_eq!(s.stat("l2").unwrap().labels["a"], "b");

        for k in ["v1", "v2", "l2", "l1"] {
            s.remove(k).unwrap();
        }
        assert!(s.list(&[]).unwrap().is_empty());
        assert_eq!(
            std::fs::read_dir(s.cfg.root.join("snapshots"))
                .unwrap()
                .count(),
            0
        );
    }

    /// Serves blobs from the fixture layout by digest, recording what was asked for.
    #[derive(Default)]
    struct FixtureRemote {
        asked: Mutex<Vec<(String, String, u64)>>,
    }

    impl RemoteSource for FixtureRemote {
        fn open(
            &self,
            url: &str,
            digest: &str,
            size: u64,
            _dir: Option<&Path>,
        ) -> Result<Arc<dyn ovbd_format::ReadAt>> {
            self.asked
                .lock()
                .unwrap()
                .push((url.to_owned(), digest.to_owned(), size));
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/hello-world-oci/blobs/sha256")
                .join(digest.trim_start_matches("sha256:"));
            Ok(Arc::new(ovbd_format::source::FileSource::open(&path)?))
        }
    }

    const HELLO_BLOB: &str =
        "sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d";

    fn remote_labels(name: &str, image_ref_label: &str) -> HashMap<String, String> {
        remote_labels_of(name, HELLO_BLOB, image_ref_label)
    }

    fn remote_labels_of(
        name: &str,
        digest: &str,
        image_ref_label: &str,
    ) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_SNAPSHOT_REF.into(), name.into()),
            (LABEL_BLOB_DIGEST.into(), digest.into()),
            (LABEL_BLOB_SIZE.into(), "641024".into()),
            (
                image_ref_label.into(),
                "127.0.0.1:5000/hello-world:obd".into(),
            ),
        ])
    }

    #[test]
    fn remote_layer_is_committed_at_prepare_and_read_from_the_registry() {
        let (_d, s) = snapshotter();
        // Without a registry source, the same Prepare is an ordinary unpack.
        let m = s
            .create(
                "k0",
                "",
                Kind::Active,
                remote_labels("chain-0", LABEL_IMAGE_REF),
            )
            .unwrap();
        assert_eq!(m[0].r#type, "bind");
        s.remove("k0").unwrap();

        let remote = Arc::new(FixtureRemote::default());
        let s = s.with_remote(remote.clone());
        // Pulled, then pulled again (already there).
        for pull in ["first", "again"] {
            let e = s
                .create(
                    "extract-1",
                    "",
                    Kind::Active,
                    remote_labels(HELLO_BLOB, LABEL_CRI_IMAGE_REF),
                )
                .unwrap_err();
            assert_eq!(code(e), tonic::Code::AlreadyExists, "{pull}");
        }
        assert!(
            s.meta.get("extract-1").is_err(),
            "no active snapshot is left"
        );
        let c = s.meta.get(HELLO_BLOB).unwrap();
        assert_eq!((c.kind, c.storage), (Kind::Committed, Storage::Block));
        assert_eq!(c.labels[LABEL_REMOTE], "remote snapshot");
        assert_eq!(
            c.labels[LABEL_REPO_BLOB_URL],
            "https://127.0.0.1:5000/v2/hello-world/blobs"
        );
        // Missing an image reference, or the blob annotations: not lazy.
        let mut l = remote_labels("chain-2", LABEL_CRI_IMAGE_REF);
        l.remove(LABEL_CRI_IMAGE_REF);
        assert_eq!(
            s.create("k2", "", Kind::Active, l).unwrap()[0].r#type,
            "bind"
        );
        // A bad size is refused, naming the label.
        let mut l = remote_labels("chain-3", LABEL_CRI_IMAGE_REF);
        l.insert(LABEL_BLOB_SIZE.into(), "big".into());
        let e = s.create("k3", "", Kind::Active, l).unwrap_err();
        assert!(e.to_string().contains(LABEL_BLOB_SIZE), "{e}");
        // So is a size no blob has: the cache keeps per-block state of what it is told.
        let mut l = remote_labels("chain-3", LABEL_CRI_IMAGE_REF);
        l.insert(LABEL_BLOB_SIZE.into(), (u64::MAX / 2).to_string());
        let e = s.create("k3", "", Kind::Active, l).unwrap_err();
        assert!(e.to_string().contains(LABEL_BLOB_SIZE), "{e}");
        assert_eq!(code(e), tonic::Code::InvalidArgument);
        assert!(s.meta.get("chain-3").is_err() && s.meta.get("k3").is_err());

        // The device config names the blob; the image opens through the registry source.
        let bdir = s.dir(c.id).join("block");
        let cfg = s.image_config(std::slice::from_ref(&c), None, &bdir);
        assert_eq!(cfg.lowers[0].digest.as_deref(), Some(HELLO_BLOB));
        assert_eq!(
            cfg.repo_blob_url.as_deref(),
            Some("https://127.0.0.1:5000/v2/hello-world/blobs")
        );
        let image = cfg.open_image(Some(&*remote)).unwrap();
        assert_eq!(image.virtual_size(), 64 << 30);
        assert_eq!(remote.asked.lock().unwrap().len(), 1);
        let e = cfg.open_image(None).err().unwrap();
        assert!(format!("{e:#}").contains("remote only"), "{e:#}");
        // A finished download in fs/ wins over the registry.
        let bytes = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/hello-world-oci/blobs/sha256")
                .join(&HELLO_BLOB[7..]),
        )
        .unwrap();
        std::fs::write(s.dir(c.id).join("fs/overlaybd.commit"), bytes).unwrap();
        let cfg = s.image_config(std::slice::from_ref(&c), None, &bdir);
        cfg.open_image(None).unwrap();
    }

    #[test]
    fn only_a_client_written_image_ref_makes_a_layer_lazy() {
        let (d, s) = snapshotter();
        let s = s.with_remote(Arc::new(FixtureRemote::default()));
        // containerd copies the image's own containerd.io/snapshot/image-ref annotation into the
        // labels: by default it is not trusted to say where the blob is read from.
        let m = s
            .create(
                "k1",
                "",
                Kind::Active,
                remote_labels(HELLO_BLOB, LABEL_IMAGE_REF),
            )
            .unwrap();
        assert_eq!(m[0].r#type, "bind");
        s.remove("k1").unwrap();
        assert!(s.meta.get(HELLO_BLOB).is_err());
        // cri.image-ref (CRI and rpull write it over the manifest's) is, whatever image-ref says.
        let mut l = remote_labels(HELLO_BLOB, LABEL_CRI_IMAGE_REF);
        l.insert(LABEL_IMAGE_REF.into(), "127.0.0.1:6000/elsewhere:x".into());
        let e = s.create("k2", "", Kind::Active, l).unwrap_err();
        assert_eq!(code(e), tonic::Code::AlreadyExists);
        assert_eq!(
            s.meta.get(HELLO_BLOB).unwrap().labels[LABEL_REPO_BLOB_URL],
            "https://127.0.0.1:5000/v2/hello-world/blobs"
        );

        // For clients that overwrite image-ref (nerdctl), the operator may trust it.
        let mut cfg: Config = toml::from_str("trust_image_ref_label = true").unwrap();
        cfg.root = d.path().join("root2");
        let s = Snapshotter::open(cfg)
            .unwrap()
            .with_remote(Arc::new(FixtureRemote::default()));
        let e = s
            .create(
                "k3",
                "",
                Kind::Active,
                remote_labels(HELLO_BLOB, LABEL_IMAGE_REF),
            )
            .unwrap_err();
        assert_eq!(code(e), tonic::Code::AlreadyExists);
    }

    #[test]
    fn prepare_refuses_malformed_digest_and_vsize_labels() {
        let (_d, s) = snapshotter();
        let s = s.with_remote(Arc::new(FixtureRemote::default()));
        // 64 characters after "sha256:" are not enough: the digest ends up in paths and URLs.
        for bad in [
            format!("sha256:{}", "../".repeat(21) + "a"),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "é".repeat(32)),
            format!("sha256:{}", "g".repeat(64)),
        ] {
            let e = s
                .create(
                    "k",
                    "",
                    Kind::Active,
                    remote_labels_of(&bad, &bad, LABEL_CRI_IMAGE_REF),
                )
                .unwrap_err();
            assert!(e.to_string().contains(LABEL_BLOB_DIGEST), "{bad}: {e}");
            assert_eq!(code(e), tonic::Code::InvalidArgument, "{bad}");
            assert!(s.meta.get(&bad).is_err() && s.meta.get("k").is_err());
        }

        // The writable layer's size (GiB) is checked at Prepare, before anything is made.
        let writable = |vsize: &str| {
            HashMap::from([
                (LABEL_WRITABLE.to_string(), "dir".to_string()),
                (LABEL_VSIZE.to_string(), vsize.to_string()),
            ])
        };
        for bad in [
            "18446744073709551615",
            "17179869184",
            "262145",
            "0",
            "-1",
            "1e3",
        ] {
            let e = s.create("w", "", Kind::Active, writable(bad)).unwrap_err();
            assert!(e.to_string().contains(LABEL_VSIZE), "{bad}: {e}");
            assert_eq!(code(e), tonic::Code::InvalidArgument, "{bad}");
            assert!(s.meta.get("w").is_err());
        }
        // A sane size passes the check (the device then needs ublk, which this host may lack).
        if let Err(e) = s.create("w", "", Kind::Active, writable("1")) {
            let msg = e.to_string();
            assert_ne!(code(e), tonic::Code::InvalidArgument, "{msg}");
        }
    }

    /// The OCI chain ID of `diff_id` above `parent` (image-spec config.md).
    fn oci_chain_id(parent: &str, diff_id: &str) -> String {
        use sha2::Digest as _;
        let h = sha2::Sha256::digest(format!("{parent} {diff_id}").as_bytes());
        format!(
            "sha256:{}",
            h.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
    }

    #[test]
    fn a_remote_layer_is_committed_only_under_its_blobs_chain_id() {
        let (_d, s) = snapshotter();
        let s = s.with_remote(Arc::new(FixtureRemote::default()));
        let cri = LABEL_CRI_IMAGE_REF;
        let is_lazy = |key: &str, parent: &str, name: &str, digest: &str| {
            match s.create(
                key,
                parent,
                Kind::Active,
                remote_labels_of(name, digest, cri),
            ) {
                Err(e) => {
                    assert_eq!(code(e), tonic::Code::AlreadyExists, "{key}");
                    true
                }
                Ok(m) => {
                    // The ordinary unpack: containerd fetches the blob and checks its diff ID.
                    assert_eq!(m[0].r#type, "bind", "{key}");
                    let remote = s
                        .meta
                        .get(name)
                        .map(|c| c.labels.contains_key(LABEL_REMOTE));
                    assert!(!remote.unwrap_or(false), "{key}: no remote layer {name}");
                    s.remove(key).unwrap();
                    false
                }
            }
        };
        // A bottom layer's chain ID is its diff ID (for OverlayBD, the blob digest).
        let victim = format!("sha256:{}", "ab".repeat(32));
        assert!(!is_lazy("k1", "", &victim, HELLO_BLOB));
        assert!(is_lazy("k2", "", HELLO_BLOB, HELLO_BLOB));
        let c = s.meta.get(HELLO_BLOB).unwrap();
        assert_eq!((c.kind, c.storage), (Kind::Committed, Storage::Block));
        // Pulled before, from the same blob: AlreadyExists again.
        assert!(is_lazy("k2b", "", HELLO_BLOB, HELLO_BLOB));

        // Above a parent: sha256(parent chain + " " + digest).
        let d2 = format!("sha256:{}", "cd".repeat(32));
        assert!(!is_lazy("k3", HELLO_BLOB, &oci_chain_id(&victim, &d2), &d2));
        assert!(!is_lazy("k4", HELLO_BLOB, &d2, &d2));
        let right = oci_chain_id(HELLO_BLOB, &d2);
        assert!(is_lazy("k5", HELLO_BLOB, &right, &d2));
        let c = s.meta.get(&right).unwrap();
        assert_eq!((c.kind, c.parent.as_str()), (Kind::Committed, HELLO_BLOB));
        // Its parent named in containerd's namespaced form ("<ns>/<n>/<chain id>").
        s.create("plain-extract", "", Kind::Active, HashMap::new())
            .unwrap();
        let d3 = format!("sha256:{}", "ef".repeat(32));
        std::fs::write(
            s.dir(s.meta.get("plain-extract").unwrap().id)
                .join("fs/overlaybd.commit"),
            hello_zfile(),
        )
        .unwrap();
        s.commit(&format!("default/7/{d3}"), "plain-extract", HashMap::new())
            .unwrap();
        let d4 = format!("sha256:{}", "12".repeat(32));
        assert!(is_lazy(
            "k6",
            &format!("default/7/{d3}"),
            &oci_chain_id(&d3, &d4),
            &d4
        ));

        // A name taken by a snapshot not committed from that blob is not "already there".
        s.create("other-extract", "", Kind::Active, HashMap::new())
            .unwrap();
        let d5 = format!("sha256:{}", "34".repeat(32));
        s.commit(&d5, "other-extract", HashMap::new()).unwrap();
        assert!(!is_lazy("k7", "", &d5, &d5));
    }

    #[test]
    fn unpacked_overlaybd_layer_commits_as_block_and_mixed_stacks_are_defined() {
        let (_d, s) = snapshotter();
        let m = s
            .create(
                "obd-extract",
                "",
                Kind::Active,
                HashMap::from([(LABEL_SNAPSHOT_REF.into(), "x".into())]),
            )
            .unwrap();
        let fs = PathBuf::from(&m[0].source);
        let blob = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hello-world-oci/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d");
        // containerd extracts the PAX tar: fs/overlaybd.commit is the ZFile.
        let bytes = std::fs::read(blob).unwrap();
        std::fs::write(fs.join("overlaybd.commit"), &bytes[1536..1536 + 639_491]).unwrap();
        s.commit("obd", "obd-extract", HashMap::new()).unwrap();
        let c = s.meta.get("obd").unwrap();
        assert_eq!(c.storage, Storage::Block);
        assert!(c.labels[LABEL_LOCAL_COMMIT].ends_with("/fs/overlaybd.commit"));

        // The next layer unpacks into its own directory (no device needed), as upstream.
        let m = s
            .create(
                "default/9/extract-1-sha256:abc",
                "obd",
                Kind::Active,
                HashMap::new(),
            )
            .unwrap();
        assert_eq!(m[0].r#type, "bind");
        assert!(m[0].source.ends_with("/fs"));
        s.remove("default/9/extract-1-sha256:abc").unwrap();

        // A container on it needs the image's device, which this host lacks (no ublk):
        // Prepare fails cleanly and leaves nothing behind.
        let count = || {
            std::fs::read_dir(s.cfg.root.join("snapshots"))
                .unwrap()
                .count()
        };
        let n_before = count();
        if let Err(e) = s.create("ctr", "obd", Kind::Active, HashMap::new()) {
            assert_eq!(code(e), tonic::Code::Internal);
            assert_eq!(count(), n_before);
            assert_eq!(code(s.stat("ctr").unwrap_err()), tonic::Code::NotFound);
        }

        // An OverlayBD layer above a plain one is refused with a clear reason.
        s.create("plain-extract", "", Kind::Active, HashMap::new())
            .unwrap();
        s.commit("plain", "plain-extract", HashMap::new()).unwrap();
        let mut chain = vec![s.meta.get("obd").unwrap(), s.meta.get("plain").unwrap()];
        let e = split_chain(&chain).unwrap_err();
        assert_eq!(code(e), tonic::Code::FailedPrecondition);
        chain.reverse();
        let (normal, block) = split_chain(&chain).unwrap();
        assert_eq!((normal.len(), block.len()), (1, 1));
    }

    /// A registry that answers nothing until the test lets it (a blackholed host).
    struct StuckRemote {
        entered: Mutex<std::sync::mpsc::Sender<()>>,
        gate: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl RemoteSource for StuckRemote {
        fn open(
            &self,
            url: &str,
            _digest: &str,
            _size: u64,
            _dir: Option<&Path>,
        ) -> Result<Arc<dyn ovbd_format::ReadAt>> {
            let _ = self.entered.lock().unwrap().send(());
            let _ = self.gate.lock().unwrap().recv();
            bail!("{url}: no answer")
        }
    }

    /// Commits `name` as a local OverlayBD layer (the hello-world fixture's ZFile).
    fn local_overlaybd_layer(s: &Snapshotter, name: &str) {
        let key = format!("{name}-extract");
        let m = s
            .create(
                &key,
                "",
                Kind::Active,
                HashMap::from([(LABEL_SNAPSHOT_REF.into(), name.into())]),
            )
            .unwrap();
        let bytes = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/hello-world-oci/blobs/sha256")
                .join(&HELLO_BLOB[7..]),
        )
        .unwrap();
        let fs = PathBuf::from(&m[0].source);
        std::fs::write(fs.join("overlaybd.commit"), &bytes[1536..1536 + 639_491]).unwrap();
        s.commit(name, &key, HashMap::new()).unwrap();
        assert_eq!(s.meta.get(name).unwrap().storage, Storage::Block);
    }

    #[test]
    fn a_stuck_registry_does_not_hold_up_other_images() {
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let (_d, s) = snapshotter();
        let s = Arc::new(s.with_remote(Arc::new(StuckRemote {
            entered: Mutex::new(entered_tx),
            gate: Mutex::new(gate_rx),
        })));
        // Image A: a remote layer; image B: a local OverlayBD layer.
        let e = s
            .create(
                "extract-a",
                "",
                Kind::Active,
                remote_labels(HELLO_BLOB, LABEL_CRI_IMAGE_REF),
            )
            .unwrap_err();
        assert_eq!(code(e), tonic::Code::AlreadyExists);
        local_overlaybd_layer(&s, "b");

        let on_a = {
            let s = s.clone();
            std::thread::spawn(move || {
                s.create("ctr-a", HELLO_BLOB, Kind::Active, HashMap::new())
                    .map(|_| ())
            })
        };
        entered_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("Prepare on image A never asked the registry");

        // While A waits for its registry, B's calls return (failing here for want of ublk).
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        {
            let s = s.clone();
            std::thread::spawn(move || {
                let _ = s.create("ctr-b", "b", Kind::Active, HashMap::new());
                let _ = s.create("view-b", "b", Kind::View, HashMap::new());
                let _ = s.remove("ctr-b");
                let _ = s.remove("view-b");
                // A dev-mode container whose device is down (as after a restart) is removed.
                s.meta
                    .create(
                        "dev-b",
                        "b",
                        Kind::Active,
                        BTreeMap::new(),
                        |d| -> SnapResult<Snapshot> {
                            let mut d = d.clone();
                            d.mode = Some("dev".into());
                            d.storage = Storage::Block;
                            Ok(d)
                        },
                    )
                    .unwrap();
                let _ = done_tx.send(s.remove("dev-b").map_err(|e| e.to_string()));
            });
        }
        // A hang guard only: B never needs A's registry.
        let on_b = done_rx.recv_timeout(Duration::from_secs(20));
        // Let A's registry answer in any case, so nothing is left hanging.
        drop(gate_tx);
        let on_a = on_a.join().unwrap();
        let on_b = on_b.expect("image B's calls waited for image A's registry");
        assert_eq!(on_b, Ok(()));
        let e = on_a.unwrap_err();
        assert!(e.to_string().contains("no answer"), "{e}");
        assert_eq!(code(s.stat("ctr-a").unwrap_err()), tonic::Code::NotFound);
    }

    /// Stands in for mounts and ublk: records what it is asked, fails as told.
    #[derive(Default)]
    struct FakeOps {
        mounted: Mutex<BTreeSet<PathBuf>>,
        /// While set, plain unmounts fail with EBUSY (a process still uses the filesystem).
        busy: std::sync::atomic::AtomicBool,
        /// How many stops are still to fail.
        failing_stops: std::sync::atomic::AtomicUsize,
        stopped: Mutex<Vec<u32>>,
        lazy_unmounts: Mutex<Vec<PathBuf>>,
        identities: Mutex<HashMap<u32, device::DeviceIdentity>>,
        deleted: Mutex<Vec<u32>>,
    }

    impl DeviceOps for Arc<FakeOps> {
        fn is_mounted(&self, mountpoint: &Path) -> bool {
            self.mounted.lock().unwrap().contains(mountpoint)
        }
        fn unmount(&self, mountpoint: &Path, lazy: bool) -> Result<()> {
            use std::sync::atomic::Ordering::SeqCst;
            if !lazy && self.busy.load(SeqCst) {
                return Err(std::io::Error::from_raw_os_error(libc::EBUSY))
                    .with_context(|| format!("umount {}", mountpoint.display()));
            }
            if lazy {
                self.lazy_unmounts
                    .lock()
                    .unwrap()
                    .push(mountpoint.to_owned());
            }
            self.mounted.lock().unwrap().remove(mountpoint);
            Ok(())
        }
        fn stop(&self, dev: &mut AttachedDevice) -> Result<()> {
            use std::sync::atomic::Ordering::SeqCst;
            let fail = self
                .failing_stops
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if fail {
                bail!("stopping ublk device {}: injected failure", dev.id);
            }
            self.stopped.lock().unwrap().push(dev.id);
            Ok(())
        }
        fn identity(&self, id: u32) -> Result<Option<device::DeviceIdentity>> {
            Ok(self.identities.lock().unwrap().get(&id).copied())
        }
        fn delete(&self, id: u32) -> Result<()> {
            self.deleted.lock().unwrap().push(id);
            Ok(())
        }
    }

    fn fake_ops(s: &mut Snapshotter) -> Arc<FakeOps> {
        let ops = Arc::new(FakeOps::default());
        s.ops = Box::new(ops.clone());
        ops
    }

    /// A dir-mode container snapshot's metadata and directories, as Prepare makes them.
    fn dir_mode_snapshot(s: &Snapshotter, key: &str) -> Snapshot {
        s.meta
            .create(
                key,
                "",
                Kind::Active,
                BTreeMap::new(),
                |draft| -> SnapResult<Snapshot> {
                    let dir = s.dir(draft.id);
                    for d in ["fs", "work", "block"] {
                        std::fs::create_dir_all(dir.join(d))?;
                    }
                    let mut x = draft.clone();
                    x.mode = Some(RootfsMode::Dir.as_str().to_string());
                    x.storage = Storage::Block;
                    Ok(x)
                },
            )
            .unwrap()
    }

    /// A dir-mode container `key` whose (server-less) device `id` is attached and mounted.
    fn with_writable_device(s: &Snapshotter, ops: &FakeOps, key: &str, id: u32) -> Snapshot {
        let snap = dir_mode_snapshot(s, key);
        std::fs::create_dir_all(s.dir(snap.id).join("block/mountpoint")).unwrap();
        let mountpoint = s.dir(snap.id).join("block/mountpoint");
        ops.mounted.lock().unwrap().insert(mountpoint);
        let dev = AttachedDevice::without_server(id);
        s.own_device(id, Some(dev.identity()));
        s.lock()
            .writable
            .insert(snap.id, Arc::new(Mutex::new(Some(dev))));
        snap
    }

    /// Ids of the devices the snapshotter holds.
    fn held_devices(s: &Snapshotter) -> BTreeSet<u32> {
        let devs = s.lock();
        let shared = devs
            .shared
            .values()
            .filter_map(|d| lock_slot(d).as_ref().map(|d| d.dev.id));
        let writable = devs
            .writable
            .values()
            .filter_map(|d| lock_slot(d).as_ref().map(|d| d.id));
        shared.chain(writable).collect()
    }

    #[test]
    fn cleanup_frees_devices_whose_release_failed() {
        use std::sync::atomic::Ordering::SeqCst;
        let (_d, mut s) = snapshotter();
        let ops = fake_ops(&mut s);
        let gone = with_writable_device(&s, &ops, "gone", 41);
        let live = with_writable_device(&s, &ops, "live", 42);

        // Something still uses the removed container's filesystem: Remove cannot unmount it.
        ops.busy.store(true, SeqCst);
        s.remove("gone").unwrap();
        assert!(ops.stopped.lock().unwrap().is_empty());
        assert_eq!(held_devices(&s), BTreeSet::from([41, 42]));

        // Cleanup frees it, with a lazy unmount as the last resort; the live one stays.
        s.cleanup().unwrap();
        assert_eq!(*ops.stopped.lock().unwrap(), vec![41]);
        assert_eq!(
            *ops.lazy_unmounts.lock().unwrap(),
            vec![s.dir(gone.id).join("block/mountpoint")]
        );
        assert_eq!(held_devices(&s), BTreeSet::from([42]));
        assert!(!s.cfg.root.join("devices/41").exists());
        assert!(s.cfg.root.join("devices/42").exists());
        assert!(!s.dir(gone.id).exists() && s.dir(live.id).exists());

        // A device whose stop fails is kept until a stop works, and so is its directory.
        ops.busy.store(false, SeqCst);
        ops.failing_stops.store(2, SeqCst);
        s.remove("live").unwrap();
        s.cleanup().unwrap();
        assert_eq!(held_devices(&s), BTreeSet::from([42]));
        assert!(s.dir(live.id).exists());
        s.cleanup().unwrap();
        assert_eq!(*ops.stopped.lock().unwrap(), vec![41, 42]);
        assert!(held_devices(&s).is_empty());
        assert!(!s.cfg.root.join("devices/42").exists());
        assert!(!s.dir(live.id).exists());
    }

    #[test]
    fn cleanup_frees_a_shared_device_whose_release_failed() {
        use std::sync::atomic::Ordering::SeqCst;
        let (_d, mut s) = snapshotter();
        let ops = fake_ops(&mut s);
        local_overlaybd_layer(&s, "img");
        let img = s.meta.get("img").unwrap();
        // A view on the image, served by its shared device 43.
        let view = s
            .meta
            .create(
                "v",
                "img",
                Kind::View,
                BTreeMap::new(),
                |d| -> SnapResult<Snapshot> { Ok(d.clone()) },
            )
            .unwrap();
        let mountpoint = s.dir(img.id).join("block/mountpoint");
        ops.mounted.lock().unwrap().insert(mountpoint.clone());
        let dev = AttachedDevice::without_server(43);
        s.own_device(43, Some(dev.identity()));
        s.lock().shared.insert(
            img.id,
            Arc::new(Mutex::new(Some(SharedDevice {
                dev,
                mountpoint,
                users: BTreeSet::from([view.id]),
            }))),
        );
        ops.failing_stops.store(1, SeqCst);
        s.remove("v").unwrap();
        assert_eq!(held_devices(&s), BTreeSet::from([43]));
        // Cleanup passes over a device someone is busy with (a Prepare attaching it).
        let s = Arc::new(s);
        let slot = s.lock().shared[&img.id].clone();
        let busy = slot.lock().unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        {
            let s = s.clone();
            std::thread::spawn(move || done_tx.send(s.cleanup().is_ok()));
        }
        // A hang guard only: Cleanup never waits for a busy device.
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(20)), Ok(true));
        assert!(ops.stopped.lock().unwrap().is_empty());
        drop(busy);
        s.cleanup().unwrap();
        assert_eq!(*ops.stopped.lock().unwrap(), vec![43]);
        assert!(held_devices(&s).is_empty());
        assert!(!s.cfg.root.join("devices/43").exists());
    }

    #[test]
    fn orphan_devices_are_deleted_only_while_still_ours() {
        let (_d, mut s) = snapshotter();
        let ops = fake_ops(&mut s);
        let ours = device::DeviceIdentity {
            pid: 4000,
            sectors: 1 << 20,
        };
        let devices = s.cfg.root.join("devices");
        std::fs::create_dir_all(&devices).unwrap();
        let record =
            |id: u32, text: &str| std::fs::write(devices.join(id.to_string()), text).unwrap();
        let json = serde_json::to_string(&ours).unwrap();
        let mut ids = ops.identities.lock().unwrap();
        // 1: ours, its server gone: the driver still names our old server and our size.
        record(1, &json);
        ids.insert(1, ours);
        // 2 and 3: ids another program's devices got after a restart.
        record(2, &json);
        ids.insert(2, device::DeviceIdentity { pid: 5000, ..ours });
        record(3, &json);
        ids.insert(3, device::DeviceIdentity { sectors: 8, ..ours });
        // 4: gone.
        record(4, &json);
        // 5: a record that tells nothing (an older ovbd's): the device is left alone.
        record(5, "");
        ids.insert(5, ours);
        // 6: recorded as attach records it, and still ours.
        s.own_device(6, Some(ours));
        ids.insert(6, ours);
        // 7: exists, but we released it (no record): another program may have it now.
        ids.insert(7, ours);
        drop(ids);
        // Those are the devices a snapshot may recover too (an older ovbd's record as before).
        let recoverable: Vec<u32> = (1..=7).filter(|&id| s.still_ours(id)).collect();
        assert_eq!(recoverable, vec![1, 5, 6]);
        s.delete_orphan_devices();
        let mut deleted = ops.deleted.lock().unwrap().clone();
        deleted.sort();
        assert_eq!(deleted, vec![1, 6]);
        // No record stays: the devices left alone are not ours any more, or cannot be told.
        assert_eq!(std::fs::read_dir(&devices).unwrap().count(), 0);
    }

    fn mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    /// The fixture's ZFile (the payload of its PAX tar), as containerd extracts it.
    fn hello_zfile() -> Vec<u8> {
        let bytes = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/hello-world-oci/blobs/sha256")
                .join(&HELLO_BLOB[7..]),
        )
        .unwrap();
        bytes[1536..1536 + 639_491].to_vec()
    }

    #[test]
    fn commit_takes_only_regular_files_as_overlaybd_layers() {
        let (d, s) = snapshotter();
        let unpack = || HashMap::from([(LABEL_SNAPSHOT_REF.to_string(), "x".to_string())]);
        // overlaybd.commit as a symlink to an OverlayBD file elsewhere on the node: a plain layer.
        let elsewhere = d.path().join("elsewhere.commit");
        std::fs::write(&elsewhere, hello_zfile()).unwrap();
        let m = s.create("sym-extract", "", Kind::Active, unpack()).unwrap();
        let fs = PathBuf::from(&m[0].source);
        std::os::unix::fs::symlink(&elsewhere, fs.join("overlaybd.commit")).unwrap();
        s.commit("sym", "sym-extract", HashMap::new()).unwrap();
        let c = s.meta.get("sym").unwrap();
        assert_eq!(c.storage, Storage::Normal);
        assert!(!c.labels.contains_key(LABEL_LOCAL_COMMIT));

        // A FIFO of that name: Commit returns (a plain layer) and the store keeps working.
        let m = s
            .create("fifo-extract", "", Kind::Active, unpack())
            .unwrap();
        let fifo = PathBuf::from(&m[0].source).join("overlaybd.commit");
        mkfifo(&fifo);
        let s = Arc::new(s);
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = s.clone();
        std::thread::spawn(move || {
            let r = s2.commit("fifo", "fifo-extract", HashMap::new());
            let _ = tx.send(r.map_err(|e| e.to_string()));
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(r) => r.unwrap(),
            Err(_) => {
                // Hang detector: let the stuck open go before failing.
                let _w = std::fs::OpenOptions::new().write(true).open(&fifo);
                panic!("Commit of a layer with a FIFO overlaybd.commit did not return");
            }
        }
        assert_eq!(s.meta.get("fifo").unwrap().storage, Storage::Normal);
        s.create("next-extract", "fifo", Kind::Active, unpack())
            .unwrap();
        s.commit("next", "next-extract", HashMap::new()).unwrap();
        s.remove("next").unwrap();
    }

    /// A dir-mode container snapshot as Prepare makes it, its writable layer holding `data` at
    /// 1 MiB (made directly: this host has no ublk for the device).
    fn writable_snapshot(s: &Snapshotter, key: &str, data: &[u8]) -> Snapshot {
        let snap = dir_mode_snapshot(s, key);
        let bdir = s.dir(snap.id).join("block");
        let rw = RwLayer::create(
            &bdir.join("writable_data"),
            &bdir.join("writable_index"),
            64 << 20,
            RwMode::Append,
            None,
        )
        .unwrap();
        rw.write(data, 1 << 20).unwrap();
        rw.flush().unwrap();
        snap
    }

    #[test]
    fn failed_commit_of_a_writable_layer_keeps_the_containers_data() {
        let (_d, s) = snapshotter();
        s.create("taken-extract", "", Kind::Active, HashMap::new())
            .unwrap();
        s.commit("taken", "taken-extract", HashMap::new()).unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let snap = writable_snapshot(&s, "ctr", &data);
        let bdir = s.dir(snap.id).join("block");

        let e = s.commit("taken", "ctr", HashMap::new()).unwrap_err();
        assert_eq!(code(e), tonic::Code::AlreadyExists);
        // The container's layer is still its writable layer, holding what it wrote.
        let rw = RwLayer::open(&bdir.join("writable_data"), &bdir.join("writable_index")).unwrap();
        let img = ovbd_format::ImageStack::writable(None, rw).unwrap();
        let mut buf = vec![0u8; data.len()];
        img.read(&mut buf, 1 << 20).unwrap();
        assert_eq!(buf, data);
        drop(img);

        // A retry under a free name commits it, every byte included.
        s.commit("image-v2", "ctr", HashMap::new()).unwrap();
        let c = s.meta.get("image-v2").unwrap();
        assert_eq!((c.kind, c.storage), (Kind::Committed, Storage::Block));
        let cfg = s.image_config(std::slice::from_ref(&c), None, &bdir);
        let img = cfg.open_image(None).unwrap();
        let mut buf = vec![0u8; data.len()];
        img.read(&mut buf, 1 << 20).unwrap();
        assert_eq!(buf, data);
        assert!(!bdir.join("writable_data").exists());
    }

    #[test]
    fn a_seal_is_undone_or_redone_without_losing_data() {
        let (_d, s) = snapshotter();
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 241) as u8).collect();
        let snap = writable_snapshot(&s, "ctr", &data);
        let dir = s.dir(snap.id);
        let (wdata, windex) = (
            dir.join("block/writable_data"),
            dir.join("block/writable_index"),
        );
        let before = std::fs::read(&wdata).unwrap();
        let read_upper = || {
            let rw = RwLayer::open(&wdata, &windex).unwrap();
            let img = ovbd_format::ImageStack::writable(None, rw).unwrap();
            let mut buf = vec![0u8; data.len()];
            img.read(&mut buf, 1 << 20).unwrap();
            buf
        };

        // Undone (the metadata commit failed): the writable layer is as it was.
        let u = SealedUpper::seal(&dir).unwrap();
        assert!(block_layer_file(&dir.join("fs")).is_some());
        u.undo().unwrap();
        assert_eq!(std::fs::read(&wdata).unwrap(), before);
        assert!(block_layer_file(&dir.join("fs")).is_none());
        assert_eq!(read_upper(), data);

        // Left sealed (the daemon stopped before the metadata commit): the layer still opens
        // writable with its data, and a later Commit seals it again.
        let u = SealedUpper::seal(&dir).unwrap();
        drop(u);
        assert_eq!(read_upper(), data);
        s.commit("image", "ctr", HashMap::new()).unwrap();
        let c = s.meta.get("image").unwrap();
        let cfg = s.image_config(std::slice::from_ref(&c), None, &dir.join("block"));
        let mut buf = vec![0u8; data.len()];
        cfg.open_image(None)
            .unwrap()
            .read(&mut buf, 1 << 20)
            .unwrap();
        assert_eq!(buf, data);
    }

    #[test]
    fn cleanup_removes_orphan_directories_only() {
        let (_d, s) = snapshotter();
        s.create("a", "", Kind::Active, HashMap::new()).unwrap();
        s.create("b", "", Kind::Active, HashMap::new()).unwrap();
        // b's metadata gone, its directory left (a crash between the two steps).
        let orphan = s.dir(s.meta.remove("b").unwrap().id);
        // A directory past the next id belongs to a create still in flight.
        let in_flight = s.cfg.root.join("snapshots/999");
        std::fs::create_dir_all(in_flight.join("fs")).unwrap();
        assert!(orphan.exists());
        s.cleanup().unwrap();
        assert!(!orphan.exists());
        assert!(in_flight.exists());
        assert!(s.dir(s.meta.get("a").unwrap().id).exists());
    }
}
