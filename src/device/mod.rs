//! Device frontends: serve an [`ImageStack`] as a block device. Two of them
//! ([`DeviceFrontend`]): ublk (`/dev/ublkbN`, this file and [`ublk`]), and, for kernels
//! without ublk, FUSE + loop (`/dev/loopN` over a file on a FUSE mount this process serves:
//! [`fuse`], [`loopdev`]). Both answer requests through [`request`] on worker pools.
//!
//! The ublk frontend:
//!
//! One control thread per device runs libublk's `run_target`; its queue thread receives
//! requests and hands each to the device's own elastic worker pool, so a slow read (a registry
//! fetch, a cold disk) never stalls other tags or other devices. Workers wake the queue's
//! io_uring through an eventfd whose READ is always armed in that ring.
//!
//! A read, from the kernel to the registry:
//! 1. `ublk::queue_main` runs one `ublk::io_task` per tag; a READ of at most 128 KiB is
//!    first tried right there: [`request::try_read_inline`] → [`ImageStack::try_read`], which
//!    reads with [`ovbd_format::Blocking::Never`]: only data at hand (page cache, block cache)
//!    is served; anything that would wait answers `WouldBlock` and the request goes on to 2.
//! 2. [`WorkerPool::submit`] runs the job on a worker: [`request::run_request`] →
//!    [`request::handle_request_range`] → [`ImageStack::read`] (`Blocking::Allowed`).
//! 3. [`ImageStack::read_with`] → the upper's `RwLayer::read_mapped_with`, or the lowers'
//!    `LayerStack::read_with` → `ovbd_format::source::read_exact_at_with` on the layer's
//!    source, `ReadAt::read_at_with` (a ZFile layer: `ZFileReader` decompresses, reading its
//!    compressed source the same way).
//! 4. The layer source: a local file (`FileSource::read_at`, `pread`), or a remote layer:
//!    [`crate::source::remote::SwitchingBlob`] (the downloaded file once there is one) over
//!    [`crate::source::cache::CachedBlob`]: `read_cached` serves present blocks from the
//!    cache's data file and claims the missing ones, `fill` fetches them.
//! 5. `BlockSource::fetch_ranges` → [`crate::registry::RemoteBlob::read_ranges`]: HTTP range
//!    GETs to the registry, concurrent, one per run of missing blocks (long runs split).
//!
//! Files: [`ublk`] (control and queue threads), [`request`] (one request against the image),
//! [`pool`] (the worker pool), [`error`] ([`DeviceError`]); this file: attach, stop, delete,
//! identity.

mod error;
mod fuse;
pub mod fuse_holder;
mod loopdev;
mod pool;
mod request;
mod ublk;

pub use error::DeviceError;
pub use fuse::{FuseFile, FuseFrontend};
pub use loopdev::Backing;
pub use pool::{device_pool, WorkerPool};

use fuse::FUSE_FS_TYPE;
use libublk::ctrl::UblkCtrl;
use libublk::{sys, UblkError};
use ovbd_format::ImageStack;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Requests in flight per device (tags of its one queue).
const QUEUE_DEPTH: u16 = 64;

#[derive(Clone, Debug, Default)]
pub struct AttachOptions {
    /// Device id to use (`None`: the kernel picks).
    pub id: Option<u32>,
    /// Re-attach a device whose server died (`UBLK_F_USER_RECOVERY`) instead of adding one.
    pub recover: bool,
    /// fuse, with `recover`: the file and loop device the image had under the previous daemon
    /// ([`AttachedDevice::fuse_file`]), re-bound if the kept connection still has them.
    pub fuse_file: Option<FuseFile>,
    /// The counters its requests bump ([`crate::metrics::Metrics::device`]).
    pub metrics: crate::metrics::DeviceMetrics,
}

/// Which kind of block device serves an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Frontend {
    /// `/dev/ublkbN` (needs CONFIG_BLK_DEV_UBLK).
    #[default]
    Ublk,
    /// `/dev/loopN` over a file on this process's FUSE mount.
    Fuse,
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Frontend::Ublk => "ublk",
            Frontend::Fuse => "fuse",
        })
    }
}

impl Frontend {
    /// ublk where the kernel has it, else FUSE + loop.
    pub fn auto() -> Frontend {
        if std::path::Path::new("/dev/ublk-control").exists() {
            Frontend::Ublk
        } else {
            Frontend::Fuse
        }
    }
}

/// Sets how far the kernel reads ahead on block device `block` (`/dev/ublkbN`, `/dev/loopN`):
/// what one read that looks sequential makes the device read, which for a lazily pulled image
/// is what the registry sends.
pub fn set_read_ahead(block: &str, kb: u32) -> std::io::Result<()> {
    let name = block.strip_prefix("/dev/").unwrap_or(block);
    std::fs::write(
        format!("/sys/block/{name}/queue/read_ahead_kb"),
        kb.to_string(),
    )
}

/// A frontend ready to attach images: ublk needs no state; FUSE its one mount.
#[derive(Clone)]
pub enum DeviceFrontend {
    Ublk,
    Fuse(Arc<FuseFrontend>),
}

impl DeviceFrontend {
    /// Sets up frontend `kind`; `fuse_dir`: where the FUSE frontend mounts (root-only).
    pub fn open(kind: Frontend, fuse_dir: &std::path::Path) -> Result<DeviceFrontend, DeviceError> {
        Ok(match kind {
            Frontend::Ublk => DeviceFrontend::Ublk,
            Frontend::Fuse => DeviceFrontend::Fuse(FuseFrontend::mount(fuse_dir)?),
        })
    }

    pub fn kind(&self) -> Frontend {
        match self {
            DeviceFrontend::Ublk => Frontend::Ublk,
            DeviceFrontend::Fuse(_) => Frontend::Fuse,
        }
    }

    /// As [`Self::open`], but FUSE devices outlive this process and a previous daemon's are
    /// served again (see [`FuseFrontend::open_restartable`]).
    pub fn open_restartable(
        kind: Frontend,
        fuse_dir: &std::path::Path,
    ) -> Result<DeviceFrontend, DeviceError> {
        Ok(match kind {
            Frontend::Ublk => DeviceFrontend::Ublk,
            Frontend::Fuse => DeviceFrontend::Fuse(FuseFrontend::open_restartable(fuse_dir)?),
        })
    }

    /// FUSE: whether loop devices attached from now on read through the page cache instead
    /// of with direct I/O (`[device] fuse_page_cache`); ublk has no such layer.
    pub fn set_fuse_page_cache(&self, on: bool) {
        if let DeviceFrontend::Fuse(f) = self {
            f.set_page_cache(on);
        }
    }

    /// Ends the recovery of a restartable frontend: devices of the previous daemon nobody
    /// re-attached are detached (ublk: nothing to do here).
    pub fn finish_recovery(&self) {
        if let DeviceFrontend::Fuse(f) = self {
            f.finish_recovery();
        }
    }

    /// This process exits leaving its devices to the next one (ublk ones stay by themselves).
    pub fn hand_over(&self) {
        if let DeviceFrontend::Fuse(f) = self {
            f.hand_over();
        }
    }

    /// Starts serving `image`; returns once its block device exists.
    pub fn attach(
        &self,
        image: Arc<ImageStack>,
        pool: Arc<WorkerPool>,
        opts: AttachOptions,
    ) -> Result<AttachedDevice, DeviceError> {
        let fuse = match self {
            DeviceFrontend::Ublk => return attach(image, pool, opts),
            DeviceFrontend::Fuse(f) => f,
        };
        if opts.id.is_some() || opts.recover != opts.fuse_file.is_some() {
            return Err(DeviceError::Unsupported {
                frontend: Frontend::Fuse,
                what: "choosing the device id or recovering a device without its file",
            });
        }
        let sectors = image.virtual_size() >> 9;
        let attached = match opts.fuse_file {
            Some(file) => fuse.adopt(image, pool, file, opts.metrics)?,
            None => fuse.attach(image, pool, opts.metrics)?,
        };
        Ok(AttachedDevice {
            id: attached.number,
            recoverable: false,
            identity: DeviceIdentity {
                pid: std::process::id() as i32,
                sectors,
            },
            server: Server::Fuse(attached),
        })
    }
}

/// A device being served by this process.
pub struct AttachedDevice {
    /// ublk: the device id (`/dev/ublkbN`); fuse: the loop device's number (`/dev/loopN`).
    pub id: u32,
    /// Whether the device survives this process dying (and can be re-attached).
    pub recoverable: bool,
    identity: DeviceIdentity,
    server: Server,
}

enum Server {
    Ublk(Option<JoinHandle<Result<(), DeviceError>>>),
    Fuse(fuse::FuseAttachment),
}

/// Stops a device from another thread than the one waiting on it.
#[derive(Clone)]
pub enum DeviceStopper {
    Ublk(u32),
    Fuse(fuse::FuseStopper),
}

impl DeviceStopper {
    /// ublk: the driver stops the device, its server deletes it. fuse: the loop device is
    /// detached (once its last user lets go); `join` then drops the image's file.
    pub fn stop(&self) -> Result<(), DeviceError> {
        match self {
            DeviceStopper::Ublk(id) => stop_device(*id),
            DeviceStopper::Fuse(s) => s.stop(),
        }
    }
}

impl AttachedDevice {
    /// A device with no server behind it, for tests of the bookkeeping around devices.
    #[cfg(test)]
    pub fn without_server(id: u32) -> AttachedDevice {
        AttachedDevice {
            id,
            recoverable: false,
            identity: DeviceIdentity {
                pid: std::process::id() as i32,
                sectors: 0,
            },
            server: Server::Ublk(None),
        }
    }

    pub fn frontend(&self) -> Frontend {
        match self.server {
            Server::Ublk(_) => Frontend::Ublk,
            Server::Fuse(_) => Frontend::Fuse,
        }
    }

    pub fn stopper(&self) -> DeviceStopper {
        match &self.server {
            Server::Ublk(_) => DeviceStopper::Ublk(self.id),
            Server::Fuse(f) => DeviceStopper::Fuse(f.stopper()),
        }
    }

    /// Asks the device to stop (see [`DeviceStopper::stop`]); [`Self::join`] waits for it.
    pub fn stop(&self) -> Result<(), DeviceError> {
        self.stopper().stop()
    }

    /// fuse: what backs the loop device (tells it from a later user of its number).
    pub fn backing(&self) -> Option<Backing> {
        match &self.server {
            Server::Ublk(_) => None,
            Server::Fuse(f) => Some(f.backing()),
        }
    }

    /// fuse: what a restarted daemon needs to re-bind the image ([`AttachOptions::fuse_file`]).
    pub fn fuse_file(&self) -> Option<FuseFile> {
        match &self.server {
            Server::Ublk(_) => None,
            Server::Fuse(f) => Some(f.fuse_file()),
        }
    }

    /// What the driver reports of this device while this process serves it.
    pub fn identity(&self) -> DeviceIdentity {
        self.identity
    }

    pub fn block_path(&self) -> String {
        match self.server {
            Server::Ublk(_) => format!("/dev/ublkb{}", self.id),
            Server::Fuse(_) => format!("/dev/loop{}", self.id),
        }
    }

    /// Whether its server still runs (the device is not yet stopped and deleted).
    pub fn is_served(&self) -> bool {
        match &self.server {
            Server::Ublk(thread) => thread.as_ref().is_some_and(|t| !t.is_finished()),
            Server::Fuse(f) => f.is_served(),
        }
    }

    /// Waits until the device stops (detached from elsewhere) and is deleted.
    pub fn join(&mut self) -> Result<(), DeviceError> {
        match &mut self.server {
            Server::Ublk(thread) => match thread.take() {
                Some(t) => t
                    .join()
                    .map_err(|_| DeviceError::Panicked { id: self.id })?,
                None => Ok(()),
            },
            Server::Fuse(f) => f.join(),
        }
    }
}

/// Asks the driver to stop device `id`; its server then deletes it.
pub fn stop_device(id: u32) -> Result<(), DeviceError> {
    // A fresh control object: the control ring is per thread.
    let ctrl = control(id)?;
    ctrl.kill_dev().map_err(ublk_error(id, "stopping it"))?;
    Ok(())
}

/// A control object for existing device `id`.
fn control(id: u32) -> Result<UblkCtrl, DeviceError> {
    UblkCtrl::new_simple(id as i32).map_err(ublk_error(id, "opening its control"))
}

fn ublk_error(id: u32, what: &'static str) -> impl FnOnce(UblkError) -> DeviceError {
    move |source| DeviceError::Ublk {
        id: Some(id),
        what,
        source,
    }
}

/// What backs loop device `number` (`None`: unbound or gone).
pub fn loop_backing(number: u32) -> Option<Backing> {
    loopdev::backing(number)
}

/// Detaches loop device `number` if `expect` still backs it (see [`loopdev::clear`]); whether
/// it did.
pub fn clear_loop(number: u32, expect: Backing) -> Result<bool, DeviceError> {
    loopdev::clear(number, expect).map_err(|source| DeviceError::Loop {
        what: "detaching",
        source,
    })
}

/// Whether the driver has a device `id` (ours or not, served or not).
pub fn exists(id: u32) -> bool {
    std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
}

/// Deletes device `id` whose server is gone (killed while the device was kept for recovery).
/// Stopping fails the I/O waiting on it; the asynchronous delete does not wait for users such
/// as a still-mounted filesystem: the kernel frees the device when the last one lets go.
pub fn delete_device(id: u32) -> Result<(), DeviceError> {
    let ctrl = control(id)?;
    let _ = ctrl.kill_dev();
    ctrl.del_dev_async()
        .map_err(ublk_error(id, "deleting it"))?;
    Ok(())
}

/// What tells a device of ours from another program's that got its id after a restart: the
/// process that serves (or last served) it, and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceIdentity {
    pub pid: i32,
    pub sectors: u64,
}

/// Who serves device `id` as the driver has it: `None` if there is no such device.
pub fn identity(id: u32) -> Result<Option<DeviceIdentity>, DeviceError> {
    if !exists(id) {
        return Ok(None);
    }
    let ctrl = control(id)?;
    let mut params = sys::ublk_params::default();
    ctrl.get_params(&mut params)
        .map_err(ublk_error(id, "reading its parameters"))?;
    Ok(Some(DeviceIdentity {
        pid: ctrl.dev_info().ublksrv_pid,
        sectors: params.basic.dev_sectors,
    }))
}

/// Whether the kernel offers `UBLK_F_USER_RECOVERY`.
pub fn recovery_supported() -> bool {
    UblkCtrl::get_features().is_some_and(|f| f & sys::UBLK_F_USER_RECOVERY as u64 != 0)
}

/// Starts serving `image` as a ublk device; returns once `/dev/ublkbN` exists.
pub fn attach(
    image: Arc<ImageStack>,
    pool: Arc<WorkerPool>,
    opts: AttachOptions,
) -> Result<AttachedDevice, DeviceError> {
    let recoverable = recovery_supported();
    // The driver has the pid libublk passes at start or recovery (getpid) and the size `serve`
    // sets.
    let identity = DeviceIdentity {
        pid: std::process::id() as i32,
        sectors: image.virtual_size() >> 9,
    };
    let (tx, rx) = std::sync::mpsc::channel::<Result<u32, DeviceError>>();
    let fail = tx.clone();
    let started = Arc::new(AtomicBool::new(false));
    let on_started = {
        let started = started.clone();
        move |id| {
            started.store(true, Ordering::SeqCst);
            let _ = tx.send(Ok(id));
        }
    };
    let thread = std::thread::Builder::new()
        .name("ublk-ctrl".into())
        .spawn(move || {
            match ublk::serve(image, pool, opts, recoverable, on_started) {
                // Not started: `attach` waits for this answer, and nobody joins the thread.
                Err(e) if !started.load(Ordering::SeqCst) => {
                    let _ = fail.send(Err(e));
                    Ok(())
                }
                r => r,
            }
        })
        .map_err(|source| DeviceError::Spawn {
            what: "ublk control",
            source,
        })?;
    match rx.recv() {
        Ok(Ok(id)) => Ok(AttachedDevice {
            id,
            recoverable,
            identity,
            server: Server::Ublk(Some(thread)),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => Err(DeviceError::NotStarted),
    }
}

/// Moves the calling thread into its own mount namespace, private, holding no mounts of ublk or loop
/// devices. A thread that serves a device must not hold a mount of it: when the process exits,
/// dropping that mount would flush to a device nobody serves any more (libublk-rs#50).
pub fn enter_private_mount_namespace() -> Result<(), DeviceError> {
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        if libc::unshare(libc::CLONE_FS | libc::CLONE_NEWNS) != 0 {
            return Err(DeviceError::Namespace {
                what: "unshare(CLONE_NEWNS)",
                source: std::io::Error::last_os_error(),
            });
        }
        let root = c"/";
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(DeviceError::Namespace {
                what: "making mounts private",
                source: std::io::Error::last_os_error(),
            });
        }
    }
    // ovbd's FUSE mounts: a loop device over a file on one is a fuse frontend device.
    let fuse_mounts: Vec<std::path::PathBuf> = crate::mount::mounts_of_type(FUSE_FS_TYPE)
        .into_iter()
        .map(std::path::PathBuf::from)
        .collect();
    for (mount_point, source) in crate::mount::mounts() {
        // Devices' filesystems (ublk, or a loop over a file on an ovbd FUSE mount: ours, or
        // another server's, whose mount this namespace does not show): a device whose server
        // started while another one's filesystem was mounted would otherwise keep that
        // filesystem alive past its umount. Other loop mounts (a disk image holding the layer
        // files) stay: the server reads through them.
        let ours = source.starts_with("/dev/ublkb")
            || loopdev::number_of(&source).is_some_and(|n| {
                loopdev::backing_file(n)
                    .is_none_or(|b| fuse_mounts.iter().any(|m| b.starts_with(m)) || !b.exists())
            });
        if ours {
            // Only this private namespace's copy is detached.
            let _ = crate::mount::unmount(std::path::Path::new(&mount_point), true);
        }
    }
    Ok(())
}
