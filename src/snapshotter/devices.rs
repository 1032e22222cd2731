//! OverlayBD block devices behind snapshots: each device's `config.v1.json`, attach (and
//! re-attach after a restart) and detach, the read-only device an image's containers share, the
//! writable layer of a dir/dev container, and the records telling our devices from others'.

use super::error::SnapResult;
use super::{base_vsize, split_chain, Snapshotter};
use crate::config::WritableLayerType;
use crate::device::{self, AttachOptions, AttachedDevice, DeviceFrontend, Frontend};
use crate::mount;
use crate::snapshotter::metadata::{Snapshot, SnapshotMode};
use crate::source::config::{ImageConfig, LowerConfig, UpperConfig};
use anyhow::{anyhow, bail, Context, Result};
use ovbd_format::{RwLayer, RwMode};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A read-only image device shared by every container on the same image.
pub(super) struct SharedDevice {
    pub(super) dev: AttachedDevice,
    pub(super) mountpoint: PathBuf,
    /// Active snapshots using it.
    pub(super) users: BTreeSet<u64>,
}

/// One device's place: empty until attached. Its own lock is held across the slow steps
/// (opening the image, attach, mkfs, mount, unmount, stop), so users of the same device wait
/// for one another and nobody else waits: a registry that does not answer for one image
/// holds up no other image.
type Slot<T> = Arc<Mutex<Option<T>>>;

#[derive(Default)]
pub(super) struct Devices {
    /// By the id of the top committed OverlayBD snapshot of the image.
    pub(super) shared: HashMap<u64, Slot<SharedDevice>>,
    /// Writable (dir/dev mode) devices by the active snapshot's id.
    pub(super) writable: HashMap<u64, Slot<AttachedDevice>>,
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

pub(super) fn lock_slot<T>(slot: &Mutex<Option<T>>) -> std::sync::MutexGuard<'_, Option<T>> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

/// The system calls that take devices down and tell whose a device is; tests replace them
/// (this host has no ublk).
pub(super) trait DeviceOps: Send + Sync {
    fn is_mounted(&self, mountpoint: &Path) -> bool;
    fn unmount(&self, mountpoint: &Path, lazy: bool) -> Result<()>;
    /// Stops `dev` and waits until its server has deleted it.
    fn stop(&self, dev: &mut AttachedDevice) -> Result<()>;
    /// Who serves device `id`; `None` if there is no such device.
    fn identity(&self, id: u32) -> Result<Option<device::DeviceIdentity>>;
    /// Deletes device `id`, whose server is gone.
    fn delete(&self, id: u32) -> Result<()>;
}

pub(super) struct SystemDeviceOps;

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
            dev.stop()?;
        }
        Ok(dev.join()?)
    }
    fn identity(&self, id: u32) -> Result<Option<device::DeviceIdentity>> {
        Ok(device::identity(id)?)
    }
    fn delete(&self, id: u32) -> Result<()> {
        Ok(device::delete_device(id)?)
    }
}

impl Snapshotter {
    /// The configured device frontend, set up on first use.
    pub(super) fn frontend(&self) -> Result<&DeviceFrontend> {
        if let Some(f) = self.frontend.get() {
            return Ok(f);
        }
        let _one = self.frontend_init.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = self.frontend.get() {
            return Ok(f);
        }
        let kind = self.cfg.device.frontend.resolve();
        let dir = self.cfg.root.join("fuse");
        // Restartable: FUSE devices outlive the daemon, as ublk ones do (see `attach`). Not in
        // unit tests: their binary is not `ovbd`, which the holder process runs.
        let open = match cfg!(test) {
            false => DeviceFrontend::open_restartable,
            true => DeviceFrontend::open,
        };
        let f = open(kind, &dir).with_context(|| format!("starting the {kind} device frontend"))?;
        f.set_fuse_page_cache(self.cfg.device.fuse_page_cache);
        log::info!("device frontend: {kind}");
        Ok(self.frontend.get_or_init(|| f))
    }

    /// Forgets the record of our ublk device `dev` (fuse devices have none: see `own_device`).
    fn forget_device(&self, dev: &AttachedDevice) {
        crate::metrics::metrics().device_gone(&dev.block_path());
        if dev.frontend() == Frontend::Ublk {
            self.own_device(dev.id, None);
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Devices> {
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

    /// A device config over the OverlayBD layers `block` (bottom to top).
    pub(super) fn image_config(
        &self,
        block: &[Snapshot],
        upper: Option<UpperConfig>,
        bdir: &Path,
    ) -> ImageConfig {
        // An acceleration layer is not part of the disk: only the top one is named (last, with
        // `accelerationLayer`, as upstream), to be replayed; one lower in the stack is dropped.
        let top = block.len().saturating_sub(1);
        let lowers: Vec<LowerConfig> = block
            .iter()
            .enumerate()
            .filter(|&(i, l)| i == top || !is_acceleration_layer(l))
            .map(|(_, l)| self.lower_config(l))
            .collect();
        ImageConfig {
            // The image's own (the top remote layer's); each remote lower also names its own.
            repo_blob_url: lowers.iter().rev().find_map(|l| l.repo_blob_url.clone()),
            lowers,
            upper,
            result_file: Some(bdir.join("init-debug.log")),
            acceleration_layer: block.last().is_some_and(is_acceleration_layer),
            record_trace_path: None,
        }
    }

    /// The read-only device of the image whose top layer is `top` (`block` bottom to top),
    /// attached and mounted once, shared by every user. Returns its mountpoint.
    pub(super) fn ensure_shared(
        &self,
        top: &Snapshot,
        block: &[Snapshot],
        user: u64,
    ) -> SnapResult<PathBuf> {
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
        let started = std::time::Instant::now();
        let dev = self.attach(&cfg, &bdir)?;
        let attached = started.elapsed();
        let mountpoint = bdir.join("mountpoint");
        if !mount::is_mounted(&mountpoint) {
            if let Err(e) =
                mount::mount(&dev.block_path(), &mountpoint, "ext4", libc::MS_RDONLY, "")
            {
                let _ = dev.stop();
                return Err(e.into());
            }
        }
        log::debug!(
            "image device ready: attached in {attached:?}, mounted in {:?}",
            started.elapsed() - attached
        );
        Ok((dev, mountpoint))
    }

    /// The writable device of a dir/dev snapshot; returns (device path, mountpoint).
    pub(super) fn ensure_writable(
        &self,
        s: &Snapshot,
        block: &[Snapshot],
    ) -> SnapResult<(String, PathBuf)> {
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
            if s.mode == Some(SnapshotMode::Dir) && !mount::is_mounted(mountpoint) {
                std::fs::create_dir_all(mountpoint)?;
                mount::mount(&path, mountpoint, "ext4", 0, "discard")?;
            }
            Ok(())
        })();
        if let Err(e) = ready {
            let _ = dev.stop();
            return Err(e.into());
        }
        Ok(dev)
    }

    /// Attaches `cfg`'s image, re-attaching the device recorded in `bdir` if the kernel kept it
    /// (the daemon restarted while it was in use).
    pub(super) fn attach(&self, cfg: &ImageConfig, bdir: &Path) -> Result<AttachedDevice> {
        // The device's span: its worker pool (made below) enters it in every thread.
        let frontend_name = match self.frontend() {
            Ok(DeviceFrontend::Fuse(_)) => "fuse",
            Ok(_) => "ublk",
            Err(_) => "none",
        };
        let span = tracing::info_span!(
            "device",
            image = %bdir.display(),
            frontend = frontend_name,
            id = tracing::field::Empty
        );
        let _entered = span.enter();
        let attached = self.attach_in_span(cfg, bdir);
        match &attached {
            Ok(dev) => {
                span.record("id", dev.id);
                let kb = self.cfg.device.read_ahead_kb;
                if let Err(e) = crate::device::set_read_ahead(&dev.block_path(), kb) {
                    tracing::warn!(device = %dev.block_path(), "setting read-ahead to {kb} KiB: {e}");
                }
                tracing::info!(device = %dev.block_path(), "attached");
            }
            Err(e) => tracing::warn!(reason = %format!("{e:#}"), "attach failed"),
        }
        attached
    }

    fn attach_in_span(&self, cfg: &ImageConfig, bdir: &Path) -> Result<AttachedDevice> {
        let mark = bdir.join("backstore_mark");
        let recorded = std::fs::read_to_string(&mark).ok().and_then(|t| {
            t.trim()
                .strip_prefix("/dev/ublkb")
                .and_then(|n| n.parse::<u32>().ok())
        });
        let image = match cfg.open_image(self.remote.as_deref()) {
            Ok(mut i) => {
                let chunk = self.cfg.cache.file_chunk_bytes();
                if cfg.has_remote_lowers() && chunk > 0 {
                    if let Some(ra) = crate::readahead::FileReadahead::open(&i, chunk) {
                        i.set_advisor(Box::new(ra));
                    }
                }
                Arc::new(i)
            }
            Err(e) => {
                cfg.write_result(&Err(anyhow!("{e:#}")));
                return Err(e);
            }
        };
        let frontend = match self.frontend() {
            Ok(f) => f,
            Err(e) => {
                cfg.write_result(&Err(anyhow!("{e:#}")));
                return Err(e);
            }
        };
        // The counters of the device in `bdir`, by its snapshot id (stable across restarts).
        let key = bdir
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let frontend_name = match frontend {
            DeviceFrontend::Fuse(_) => "fuse",
            _ => "ublk",
        };
        let counters = crate::metrics::metrics().device(&key, frontend_name);
        let prefetched = image.clone();
        let dev = if let DeviceFrontend::Fuse(_) = frontend {
            self.attach_fuse(frontend, image, cfg, bdir, counters.clone())?
        } else {
            self.attach_ublk(image, cfg, bdir, recorded, counters.clone())?
        };
        // Runs on its own; it stops by itself once the device lets go of the image.
        drop(crate::prefetch::start(
            cfg,
            &prefetched,
            self.remote.clone(),
        ));
        drop(prefetched);
        let top = cfg.lowers.last();
        crate::metrics::metrics().device_attached(
            &dev.block_path(),
            crate::metrics::DeviceEntry {
                device: key,
                frontend: frontend_name.to_owned(),
                image: cfg
                    .repo_blob_url
                    .clone()
                    .or_else(|| {
                        top.and_then(|l| l.dir.as_ref().or(l.file.as_ref()))
                            .map(|p| p.display().to_string())
                    })
                    .unwrap_or_default(),
                mode: if cfg.upper.is_some() { "rw" } else { "ro" }.to_owned(),
                remote_blobs: cfg
                    .lowers
                    .iter()
                    .filter(|l| l.repo_blob_url.is_some() || cfg.repo_blob_url.is_some())
                    .filter_map(|l| Some((l.digest.clone()?, l.size?)))
                    .collect(),
                counters,
            },
        );
        Ok(dev)
    }

    /// `attach` on the ublk frontend.
    fn attach_ublk(
        &self,
        image: Arc<ovbd_format::ImageStack>,
        cfg: &ImageConfig,
        bdir: &Path,
        recorded: Option<u32>,
        counters: crate::metrics::DeviceMetrics,
    ) -> Result<AttachedDevice> {
        let mark = bdir.join("backstore_mark");
        let mut attached = None;
        // Only a device still ours is recovered: after a restart the id may be another's.
        if let Some(id) = recorded.filter(|&id| self.still_ours(id)) {
            match device::attach(
                image.clone(),
                device::device_pool(),
                AttachOptions {
                    id: Some(id),
                    recover: true,
                    fuse_file: None,
                    metrics: counters.clone(),
                },
            ) {
                Ok(d) => attached = Some(d),
                Err(e) => log::warn!("re-attaching /dev/ublkb{id}: {e:#}; attaching anew"),
            }
        }
        let dev = match attached {
            Some(d) => d,
            None => match device::attach(
                image,
                device::device_pool(),
                AttachOptions {
                    metrics: counters,
                    ..AttachOptions::default()
                },
            ) {
                Ok(d) => d,
                Err(e) => {
                    cfg.write_result(&Err(anyhow!("{e:#}")));
                    return Err(e.into());
                }
            },
        };
        self.own_device(dev.id, Some(dev.identity()));
        std::fs::write(&mark, dev.block_path())
            .with_context(|| format!("writing {}", mark.display()))?;
        cfg.write_result(&Ok(()));
        Ok(dev)
    }

    /// `attach` on the FUSE frontend: after a restart, the image is re-bound to the file and
    /// loop device recorded in `bdir/fuse_file.json` if the kept connection still has them
    /// (the container's filesystem on it stays mounted), else attached anew.
    fn attach_fuse(
        &self,
        frontend: &DeviceFrontend,
        image: Arc<ovbd_format::ImageStack>,
        cfg: &ImageConfig,
        bdir: &Path,
        counters: crate::metrics::DeviceMetrics,
    ) -> Result<AttachedDevice> {
        let record = bdir.join("fuse_file.json");
        let kept = std::fs::read(&record)
            .ok()
            .and_then(|t| serde_json::from_slice::<device::FuseFile>(&t).ok())
            // Still bound as recorded: a survivor of the previous daemon (a device released
            // since is unbound, or another's).
            .filter(|f| device::loop_backing(f.loop_number) == Some(f.backing));
        let mut attached = None;
        if let Some(file) = kept {
            let opts = AttachOptions {
                recover: true,
                fuse_file: Some(file),
                metrics: counters.clone(),
                ..AttachOptions::default()
            };
            match frontend.attach(image.clone(), device::device_pool(), opts) {
                Ok(d) => attached = Some(d),
                Err(e) => log::warn!(
                    "re-binding /dev/loop{}: {e:#}; attaching anew",
                    file.loop_number
                ),
            }
        }
        let dev = match attached {
            Some(d) => d,
            None => match frontend.attach(
                image,
                device::device_pool(),
                AttachOptions {
                    metrics: counters,
                    ..AttachOptions::default()
                },
            ) {
                Ok(d) => d,
                Err(e) => {
                    cfg.write_result(&Err(anyhow!("{e:#}")));
                    return Err(e.into());
                }
            },
        };
        log::info!("{}: {} (fuse frontend)", bdir.display(), dev.block_path());
        if let Some(file) = dev.fuse_file() {
            let tmp = record.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec(&file)?)
                .and_then(|()| std::fs::rename(&tmp, &record))
                .with_context(|| format!("writing {}", record.display()))?;
        }
        let mark = bdir.join("backstore_mark");
        std::fs::write(&mark, dev.block_path())
            .with_context(|| format!("writing {}", mark.display()))?;
        cfg.write_result(&Ok(()));
        Ok(dev)
    }

    /// At the end of a start: the FUSE frontend's devices of the previous daemon that no live
    /// snapshot re-bound are detached, and requests waiting for them fail.
    pub(super) fn finish_device_recovery(&self) {
        if let Some(f) = self.frontend.get() {
            f.finish_recovery();
        }
    }

    /// The daemon exits leaving its devices to the next start (which re-attaches them).
    pub fn hand_over_devices(&self) {
        if let Some(f) = self.frontend.get() {
            f.hand_over();
        }
    }

    pub(super) fn detach_writable(&self, s: &Snapshot) -> Result<()> {
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
            self.forget_device(d);
            tracing::info!(snapshot = id, device = %d.block_path(), "detached its writable device");
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
            self.forget_device(&d.dev);
            tracing::info!(
                device = %d.dev.block_path(),
                mountpoint = %d.mountpoint.display(),
                "detached a shared image device: no user left"
            );
        }
        *slot = None;
        Ok(())
    }

    /// Unmounts `mountpoint` if mounted; `lazy_if_busy`: detached lazily if a plain unmount
    /// fails (the filesystem goes once its last user lets go).
    pub(super) fn unmount(&self, mountpoint: &Path, lazy_if_busy: bool) -> Result<()> {
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
    pub(super) fn release(&self, s: &Snapshot, chain: &[Snapshot]) -> Result<()> {
        if s.mode.is_some_and(SnapshotMode::has_writable_device) {
            self.detach_writable(s)?;
        }
        let (_, block) = split_chain(chain)?;
        if s.mode == Some(SnapshotMode::UnpackBind) {
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

    /// Retries taking down the writable devices of removed snapshots and the shared devices
    /// nobody uses; devices someone is busy with are left alone. Returns the ids of snapshots
    /// whose device could not be freed.
    pub(super) fn free_released_devices(&self, live: &BTreeSet<u64>, next: u64) -> BTreeSet<u64> {
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

    /// Records that ublk device `id` is ours and what the driver says of it (`None`: forgets
    /// it), so a later start can tell our orphans (kept by the kernel for recovery, but no
    /// snapshot needs them any more) from devices other programs made with a reused id.
    pub(super) fn own_device(&self, id: u32, identity: Option<device::DeviceIdentity>) {
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
    pub(super) fn still_ours(&self, id: u32) -> bool {
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
    pub(super) fn delete_orphan_devices(&self) {
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

/// Whether `l` is upstream's acceleration layer (its annotation, passed on as a label).
pub(super) fn is_acceleration_layer(l: &Snapshot) -> bool {
    l.labels
        .get(crate::labels::LABEL_ACCELERATION_LAYER)
        .is_some_and(|v| v == "yes")
}
