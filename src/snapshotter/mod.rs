//! The containerd Snapshots API (spec §4): plain OCI layers as overlayfs directories, exactly
//! like containerd's overlay snapshotter, and OverlayBD layers as block devices.
//!
//! This file is the contract: Prepare/View (`create`), Commit, Remove, Stat, Update, Usage,
//! Mounts, List (Walk) and Cleanup, each a metadata transaction plus the directory it owns.
//! The rest serves it: `service` (the gRPC adapter: requests in, errors out as gRPC codes),
//! `mounts` (what a snapshot mounts), `devices` (OverlayBD block devices: `config.v1.json`,
//! attach/detach, the shared read-only image devices, writable layers), `remote` (lazily pulled
//! layers), `disk` (a snapshot's files: layer files, sealing, usage, removal), `metadata` (the
//! redb store) and `filters` (List's filter syntax).
//!
//! Layout under `root`: `metadata.db` and `snapshots/<id>/{fs,work,block}`. `fs/` holds a
//! layer's files (or its `overlaybd.commit` / `overlaybd.sealed`), `work/` overlayfs' workdir,
//! `block/` a device's `config.v1.json`, result file, mountpoint and writable layer files.

mod devices;
mod disk;
mod error;
pub mod filters;
pub mod metadata;
mod mounts;
mod remote;
mod service;
#[cfg(test)]
mod tests;

pub use service::grpc_server;

use crate::config::{Config, RootfsMode};
use crate::labels::{LABEL_LOCAL_COMMIT, LABEL_SNAPSHOT_REF, LABEL_VSIZE, LABEL_WRITABLE};
use crate::snapshotter::metadata::{Kind, MetaError, MetaStore, Snapshot, SnapshotMode, Storage};
use crate::source::config::RemoteSource;
use anyhow::{Context, Result};
use containerd_snapshots::{api::types::Mount, Info, Usage};
use devices::{DeviceOps, Devices, SystemDeviceOps};
use disk::{block_layer_file, disk_usage, remove_snapshot_dir, SealedUpper};
use error::{SnapResult, SnapshotterError};
use remote::RemoteLayer;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

/// Whether a Prepare unpacks a layer (containerd's unpacker labels it, and `ctr pull` names
/// it `extract-<n>-<chain id>`) rather than making a container rootfs.
fn is_unpack(key: &str, labels: &BTreeMap<String, String>) -> bool {
    labels.contains_key(LABEL_SNAPSHOT_REF)
        || key
            .rsplit('/')
            .next()
            .is_some_and(|k| k.starts_with("extract-"))
}

/// The snapshots of one containerd snapshotter name ([`Snapshotter::for_name`]), over devices,
/// directories and a database shared by all names.
#[derive(Clone)]
pub struct Snapshotter {
    cfg: Arc<Config>,
    meta: MetaStore,
    /// Held only to find a device's slot, never while a slot is locked.
    devices: Arc<Mutex<Devices>>,
    ops: Arc<dyn DeviceOps>,
    /// Where remote layers are read from (registry + block cache); None: no lazy pulling.
    remote: Option<Arc<dyn RemoteSource>>,
    /// The pull secrets `[cri_proxy]` captures: bound to the remote layers a CRI pull prepares.
    cri_pulls: Option<Arc<crate::registry::captured::CapturedCredentials>>,
    /// The block device frontend (`[device] frontend`), set up at the first attach: the FUSE
    /// one mounts `<root>/fuse` then.
    frontend: Arc<std::sync::OnceLock<crate::device::DeviceFrontend>>,
    frontend_init: Arc<Mutex<()>>,
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
            SnapshotterError::InvalidArgument(format!(
                "{what} is not a size of 1 to {MAX_VSIZE_GB} GiB"
            ))
        })
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

impl Snapshotter {
    pub fn open(cfg: Config) -> Result<Snapshotter> {
        std::fs::create_dir_all(cfg.root.join("snapshots"))
            .with_context(|| format!("creating {}", cfg.root.display()))?;
        disk::check_overlay_upper(&cfg.root)?;
        let meta = MetaStore::open(&cfg.root.join("metadata.db"))?;
        Ok(Snapshotter {
            cfg: Arc::new(cfg),
            meta,
            devices: Arc::default(),
            ops: Arc::new(SystemDeviceOps),
            remote: None,
            cri_pulls: None,
            frontend: Arc::default(),
            frontend_init: Arc::default(),
        })
    }

    /// The snapshotter as containerd's snapshotter `name` sees it. containerd keeps a bucket of
    /// snapshots per name, each with its own key sequence, and its GC removes whatever List shows
    /// that its bucket lacks: one socket registered under two names (`ovbd` and `overlaybd` for
    /// nerdctl) must keep each name's snapshots apart. The daemon's own name (`name` in the
    /// config) and no name (a direct client) are the store every earlier version wrote.
    pub fn for_name(&self, name: &str) -> SnapResult<Snapshotter> {
        if name.is_empty() || name == self.cfg.name {
            return Ok(self.clone());
        }
        Ok(Snapshotter {
            meta: self.meta.of_name(name)?,
            ..self.clone()
        })
    }

    /// containerd's name for this snapshotter (the config's `name`).
    /// The configured rootfs mode (a snapshot's labels may choose another).
    pub fn rootfs_mode(&self) -> crate::config::RootfsMode {
        self.cfg.rootfs_mode
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Enables lazy pulling: remote layers are read through `remote`.
    pub fn with_remote(mut self, remote: Arc<dyn RemoteSource>) -> Snapshotter {
        self.remote = Some(remote);
        self
    }

    /// Remote layers prepared during a CRI PullImage of `[cri_proxy]` (keys in its namespace)
    /// keep that pull's secret from `captured` for their lazy reads.
    pub(crate) fn with_cri_pulls(
        mut self,
        captured: Arc<crate::registry::captured::CapturedCredentials>,
    ) -> Snapshotter {
        self.cri_pulls = Some(captured);
        self
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.cfg.root.join("snapshots").join(id.to_string())
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
            .map_err(|e| SnapshotterError::InvalidArgument(e.to_string()))?;
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
                Some(v) => RootfsMode::parse(v).map_err(|e| {
                    SnapshotterError::InvalidArgument(format!("{LABEL_WRITABLE}: {e}"))
                })?,
                None if block.is_empty() => RootfsMode::Overlayfs,
                None => self.cfg.rootfs_mode,
            };
            SnapshotMode::of_rootfs(m)
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
                        s.mode = Some(m);
                        s.storage = Storage::Block;
                    }
                    if unpack && !block.is_empty() {
                        // Unpacking onto an OverlayBD image (as upstream): the layer's own directory,
                        // no device for its parents. An OverlayBD layer only drops its file here.
                        s.mode = Some(SnapshotMode::UnpackBind);
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

    pub fn mounts(&self, key: &str) -> SnapResult<Vec<Mount>> {
        let s = self.meta.get(key)?;
        if s.kind == Kind::Committed {
            return Err(SnapshotterError::FailedPrecondition(format!(
                "{key} is committed: it has no mounts"
            )));
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

    pub fn commit(&self, name: &str, key: &str, labels: HashMap<String, String>) -> SnapResult<()> {
        let s = self.meta.get(key)?;
        // A taken name is refused before the layer is touched (the metadata commit checks again).
        if self.meta.get(name).is_ok() {
            return Err(MetaError::AlreadyExists(name.to_string()).into());
        }
        if s.kind == Kind::Active && s.mode.is_some_and(SnapshotMode::has_writable_device) {
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
        // An acceleration layer unpacked by containerd holds just its `trace`: a block layer
        // all the same (the device config names it, the disk leaves it out).
        let trace_layer = devices::is_acceleration_layer(s) && dir.join("fs/trace").is_file();
        let usage = disk_usage(&dir)?;
        let mut labels: BTreeMap<String, String> = labels.into_iter().collect();
        if let Some(file) = layer_file {
            labels.insert(LABEL_LOCAL_COMMIT.into(), format!("{}/fs/{file}", s.id));
        }
        self.meta.commit(key, name, labels, |c| -> SnapResult<()> {
            if c.id != s.id {
                return Err(SnapshotterError::FailedPrecondition(format!(
                    "{key} was replaced while it was being committed"
                )));
            }
            c.mode = None;
            c.storage = if layer_file.is_some() || trace_layer {
                Storage::Block
            } else {
                Storage::Normal
            };
            c.usage = usage;
            Ok(())
        })?;
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
        if let Some(c) = &self.cri_pulls {
            c.unbind(&self.dir(s.id).join("fs"));
        }
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

    /// At start: bring back what live snapshots need (devices the kernel kept are re-attached
    /// in place, so running containers keep their rootfs), then remove orphans.
    pub fn reconcile(&self) -> Result<()> {
        // The FUSE frontend clears what a previous run left under <root>/fuse before anything
        // attaches (a failure is retried at the first attach).
        if self.cfg.device.frontend.resolve() == crate::device::Frontend::Fuse {
            if let Err(e) = self.frontend() {
                log::error!("{e:#}");
            }
        }
        for meta in self.meta.all_names()? {
            Snapshotter {
                meta,
                ..self.clone()
            }
            .restore_devices()?;
        }
        self.finish_device_recovery();
        self.cleanup()?;
        self.delete_orphan_devices();
        Ok(())
    }

    /// Re-attaches (or re-serves) the devices this name's live snapshots need.
    fn restore_devices(&self) -> Result<()> {
        let all = self.meta.list()?;
        for s in all.iter().filter(|s| s.kind != Kind::Committed) {
            let chain = if s.parent.is_empty() {
                Vec::new()
            } else {
                self.chain_from(&s.parent)?
            };
            let (_, block) = split_chain(&chain)?;
            if s.mode != Some(SnapshotMode::UnpackBind) && (s.mode.is_some() || !block.is_empty()) {
                if let Err(e) = self.mounts_of(s, &chain) {
                    log::error!("restoring snapshot {}: {e}", s.key);
                }
            }
        }
        Ok(())
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
        return Err(SnapshotterError::FailedPrecondition(format!(
            "unsupported image: plain OCI layer {} lies below OverlayBD layers (OverlayBD layers must be at the bottom)",
            s.key
        )));
    }
    let mut block = block.to_vec();
    block.reverse();
    Ok((normal.to_vec(), block))
}
