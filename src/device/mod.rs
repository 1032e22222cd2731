//! The ublk frontend: serves an [`ImageStack`] as `/dev/ublkbN`.
//!
//! One control thread per device runs libublk's `run_target`; its queue thread receives
//! requests and hands each to the device's own elastic worker pool, so a slow read (a registry
//! fetch, a cold disk) never stalls other tags or other devices. Workers wake the queue's
//! io_uring through an eventfd whose READ is always armed in that ring.

use anyhow::{anyhow, Context, Result};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{sys, BufDesc, UblkError, UblkFlags, UblkUringData};
use ovbd_format::ImageStack;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Largest request the kernel sends us (as upstream's ublk frontend).
const IO_BUF_BYTES: u32 = 512 * 1024;
const QUEUE_DEPTH: u16 = 64;
/// Reads up to this size are tried on the queue thread first (see `io_task`).
const INLINE_READ_MAX: usize = 128 * 1024;
/// Discard / write-zeroes limits advertised for writable devices (4 MiB).
const MAX_DISCARD_SECTORS: u32 = 8192;

#[derive(Clone, Debug, Default)]
pub struct AttachOptions {
    /// Device id to use (`None`: the kernel picks).
    pub id: Option<u32>,
    /// Re-attach a device whose server died (`UBLK_F_USER_RECOVERY`) instead of adding one.
    pub recover: bool,
}

/// A device being served by this process.
pub struct AttachedDevice {
    pub id: u32,
    /// Whether the device survives this process dying (and can be re-attached).
    pub recoverable: bool,
    identity: DeviceIdentity,
    thread: Option<JoinHandle<Result<()>>>,
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
            thread: None,
        }
    }

    /// What the driver reports of this device while this process serves it.
    pub fn identity(&self) -> DeviceIdentity {
        self.identity
    }

    pub fn block_path(&self) -> String {
        format!("/dev/ublkb{}", self.id)
    }

    /// Whether its server still runs (the device is not yet stopped and deleted).
    pub fn is_served(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Waits until the device stops (detached from elsewhere) and is deleted.
    pub fn join(&mut self) -> Result<()> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow!("ublk device {} server thread panicked", self.id))?,
            None => Ok(()),
        }
    }
}

/// Asks the driver to stop device `id`; its server then deletes it.
pub fn stop_device(id: u32) -> Result<()> {
    // A fresh control object: the control ring is per thread.
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(|e| anyhow!("ublk device {id}: {e}"))?;
    ctrl.kill_dev()
        .map_err(|e| anyhow!("stopping ublk device {id}: {e}"))?;
    Ok(())
}

/// Deletes device `id` whose server is gone (killed while the device was kept for recovery).
/// Stopping fails the I/O waiting on it; the asynchronous delete does not wait for users such
/// as a still-mounted filesystem: the kernel frees the device when the last one lets go.
pub fn delete_device(id: u32) -> Result<()> {
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(|e| anyhow!("ublk device {id}: {e}"))?;
    let _ = ctrl.kill_dev();
    ctrl.del_dev_async()
        .map_err(|e| anyhow!("deleting ublk device {id}: {e}"))?;
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
pub fn identity(id: u32) -> Result<Option<DeviceIdentity>> {
    if !std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists() {
        return Ok(None);
    }
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(|e| anyhow!("ublk device {id}: {e}"))?;
    let mut params = sys::ublk_params::default();
    ctrl.get_params(&mut params)
        .map_err(|e| anyhow!("reading the parameters of ublk device {id}: {e}"))?;
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
) -> Result<AttachedDevice> {
    let recoverable = recovery_supported();
    // The driver has the pid libublk passes at start or recovery (getpid) and the size `serve`
    // sets.
    let identity = DeviceIdentity {
        pid: std::process::id() as i32,
        sectors: image.virtual_size() >> 9,
    };
    let (tx, rx) = std::sync::mpsc::channel::<Result<u32>>();
    let fail = tx.clone();
    let thread = std::thread::Builder::new()
        .name("ublk-ctrl".into())
        .spawn(move || {
            let r = serve(image, pool, opts, recoverable, tx);
            if let Err(e) = &r {
                let _ = fail.send(Err(anyhow!("{e:#}")));
            }
            r
        })
        .context("spawning the ublk control thread")?;
    match rx.recv() {
        Ok(Ok(id)) => Ok(AttachedDevice {
            id,
            recoverable,
            identity,
            thread: Some(thread),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => Err(anyhow!(
            "ublk control thread ended before the device started"
        )),
    }
}

/// The control thread: adds (or recovers) the device, runs it until stopped, deletes it.
fn serve(
    image: Arc<ImageStack>,
    pool: Arc<WorkerPool>,
    opts: AttachOptions,
    recoverable: bool,
    started: std::sync::mpsc::Sender<Result<u32>>,
) -> Result<()> {
    let writable = image.is_writable();
    let mut ctrl_flags = 0u64;
    if recoverable {
        // REISSUE: requests in flight when the server died go to the new server instead of
        // failing (reads and our appending writes are safe to repeat).
        ctrl_flags |= (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
    }
    let dev_flags = if opts.recover {
        UblkFlags::UBLK_DEV_F_RECOVER_DEV
    } else {
        UblkFlags::UBLK_DEV_F_ADD_DEV
    };
    let ctrl = UblkCtrlBuilder::default()
        .name("ovbd")
        .id(opts.id.map(|i| i as i32).unwrap_or(-1))
        .nr_queues(1)
        .depth(QUEUE_DEPTH)
        .io_buf_bytes(IO_BUF_BYTES)
        .ctrl_flags(ctrl_flags)
        .dev_flags(dev_flags)
        .build()
        .map_err(|e| anyhow!("creating the ublk device (is ublk_drv loaded?): {e}"))?;
    if opts.recover {
        ctrl.start_user_recover()
            .map_err(|e| anyhow!("starting recovery of ublk device: {e}"))?;
    }
    let vsize = image.virtual_size();
    let tgt_init = move |dev: &mut UblkDev| {
        dev.set_default_params(vsize);
        // One extra slot for the eventfd READ that wakes the queue.
        dev.tgt.extra_ios = 1;
        dev.tgt.sq_depth = QUEUE_DEPTH + 2;
        dev.tgt.cq_depth = QUEUE_DEPTH + 2;
        let p = &mut dev.tgt.params;
        p.basic.logical_bs_shift = 9;
        p.basic.physical_bs_shift = 12;
        p.basic.io_opt_shift = 12;
        p.basic.io_min_shift = 9;
        if writable {
            // Volatile cache: FLUSH requests arrive and become fdatasync of the upper files.
            p.basic.attrs = sys::UBLK_ATTR_VOLATILE_CACHE;
            p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
            p.discard.discard_alignment = 0;
            p.discard.discard_granularity = 4096;
            p.discard.max_discard_sectors = MAX_DISCARD_SECTORS;
            p.discard.max_write_zeroes_sectors = MAX_DISCARD_SECTORS;
            p.discard.max_discard_segments = 1;
        } else {
            p.basic.attrs = sys::UBLK_ATTR_READ_ONLY;
        }
        Ok(())
    };
    let q_image = image.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| queue_main(qid, dev, q_image, pool);
    let on_started = move |c: &UblkCtrl| {
        let _ = started.send(Ok(c.dev_info().dev_id));
    };
    let ran = ctrl.run_target(tgt_init, q_fn, on_started);
    // run_target returns once the device is stopped; delete it so no /dev/ublkcN is left.
    let deleted = ctrl.del_dev();
    ran.map_err(|e| anyhow!("serving the ublk device: {e}"))?;
    if let Err(e) = deleted {
        // Already deleted by someone else is fine.
        log::debug!("deleting ublk device: {e}");
    }
    image
        .flush()
        .context("flushing the writable layer after detach")?;
    Ok(())
}

/// Pointer to a tag's I/O buffer handed to a worker. The tag's task awaits the worker's reply
/// before it touches the buffer again, so the worker has it exclusively meanwhile.
struct IoBufPtr(*mut u8, usize);
// SAFETY: see above: exactly one side uses the buffer at a time.
unsafe impl Send for IoBufPtr {}

/// One queue thread: a task per tag plus the eventfd waker, on a local executor.
fn queue_main(qid: u16, dev: &UblkDev, image: Arc<ImageStack>, pool: Arc<WorkerPool>) {
    if let Err(e) = enter_private_mount_namespace() {
        log::warn!("queue thread: cannot enter a private mount namespace: {e:#}");
    }
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            log::error!("ublk queue {qid}: {e}");
            return;
        }
    };
    // SAFETY: eventfd returns a new descriptor we own, or -1.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if raw < 0 {
        log::error!("eventfd: {}", std::io::Error::last_os_error());
        return;
    }
    let kick = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
    let exe = Rc::new(smol::LocalExecutor::new());
    let mut tasks = Vec::new();
    for tag in q.tags() {
        let (q, image, pool, kick) = (q.clone(), image.clone(), pool.clone(), kick.clone());
        tasks.push(exe.spawn(async move {
            match io_task(&q, tag, image, pool, kick).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => log::error!("ublk tag {tag}: {e}"),
            }
        }));
    }
    let waker_fd = kick.clone();
    exe.spawn(async move {
        // Keep a READ of the eventfd armed in this ring: a worker's write completes it, which
        // wakes the ring so the tasks those workers woke get polled.
        let mut counter = [0u8; 8];
        loop {
            let sqe = io_uring::opcode::Read::new(
                io_uring::types::Fd(waker_fd.as_raw_fd()),
                counter.as_mut_ptr(),
                8,
            )
            .build();
            if ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
                .await
                .is_err()
            {
                break;
            }
        }
    })
    .detach();
    let run = exe.clone();
    smol::block_on(run.run(async {
        let run_ops = || while exe.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            log::error!("ublk queue {qid}: {e}");
        }
    }));
}

async fn io_task(
    q: &UblkQueue<'_>,
    tag: u16,
    image: Arc<ImageStack>,
    pool: Arc<WorkerPool>,
    kick: Arc<OwnedFd>,
) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    let (reply_tx, reply_rx) = smol::channel::bounded::<i32>(1);
    loop {
        let iod = q.get_iod(tag);
        let op = iod.op_flags & 0xff;
        let offset = iod.start_sector << 9;
        // DISCARD / WRITE_ZEROES carry no data and may span more than the buffer (up to
        // MAX_DISCARD_SECTORS): their range is nr_bytes, not the buffer's length.
        let nr_bytes = (iod.nr_sectors as u64) << 9;
        let len = (nr_bytes as usize).min(buf.len());
        // A small read whose data is at hand (page cache, memory) is served right here; what
        // would wait goes to the pool, so a slow source still stalls no other tag, and so do
        // large reads, which decode faster in parallel there.
        if op == sys::UBLK_IO_OP_READ && len <= INLINE_READ_MAX {
            let dev_id = q.dev.dev_info.dev_id;
            if let Some(res) =
                try_read_inline(dev_id, &image, &mut buf.as_mut_slice()[..len], offset)
            {
                q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
                    .await?;
                continue;
            }
        }
        let ptr = IoBufPtr(buf.as_mut_slice().as_mut_ptr(), len);
        let image = image.clone();
        let reply = Reply {
            tx: reply_tx.clone(),
            kick: kick.clone(),
            sent: false,
        };
        let dev_id = q.dev.dev_info.dev_id;
        pool.submit(Box::new(move || {
            let (ptr, mut reply) = (ptr, reply);
            // SAFETY: the tag's task waits for this reply before using the buffer again.
            let data = unsafe { std::slice::from_raw_parts_mut(ptr.0, ptr.1) };
            reply.answer(run_request(dev_id, &image, op, offset, nr_bytes, data));
        }));
        let res = reply_rx.recv().await.unwrap_or(-libc::EIO);
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

/// The answer to a tag's task, given exactly once: the job's result, or EIO if the job ends
/// without one (dropped unrun, or lost to a panic), so no tag waits forever.
struct Reply {
    tx: smol::channel::Sender<i32>,
    kick: Arc<OwnedFd>,
    sent: bool,
}

impl Reply {
    fn answer(&mut self, res: i32) {
        if std::mem::replace(&mut self.sent, true) {
            return;
        }
        let _ = self.tx.try_send(res);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes to our eventfd.
        unsafe { libc::write(self.kick.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.answer(-libc::EIO);
    }
}

/// The text of a panic's payload.
fn panic_text(p: &(dyn std::any::Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(|s| s.as_str()))
        .unwrap_or("(no message)")
}

/// A worker's job for one request of device `dev_id`: [`handle_request_range`]'s answer, or
/// EIO if serving it panics (a bug must fail one request, not hang its tag or kill a worker).
pub fn run_request(
    dev_id: u32,
    image: &ImageStack,
    op: u32,
    offset: u64,
    nr_bytes: u64,
    buf: &mut [u8],
) -> i32 {
    let run =
        std::panic::AssertUnwindSafe(|| handle_request_range(image, op, offset, nr_bytes, buf));
    std::panic::catch_unwind(run).unwrap_or_else(|p| {
        log::error!(
            "ublk device {dev_id}: op {op} at {offset} (+{nr_bytes}) panicked: {}; failing it with EIO",
            panic_text(&*p)
        );
        -libc::EIO
    })
}

/// A read served on the queue thread if its data is at hand: `None` if it would wait. A panic
/// fails the read with EIO rather than take down the queue thread.
fn try_read_inline(dev_id: u32, image: &ImageStack, buf: &mut [u8], offset: u64) -> Option<i32> {
    let len = buf.len();
    let run = std::panic::AssertUnwindSafe(|| image.try_read(buf, offset));
    match std::panic::catch_unwind(run) {
        Ok(Ok(true)) => Some(len as i32),
        Ok(Ok(false)) => None,
        Ok(Err(e)) => Some(-e.errno()),
        Err(p) => {
            log::error!(
                "ublk device {dev_id}: read at {offset} (+{len}) panicked: {}; failing it with EIO",
                panic_text(&*p)
            );
            Some(-libc::EIO)
        }
    }
}

/// Serves one block request against the image: the byte count on success, `-errno` on failure.
#[cfg(test)]
pub fn handle_request(image: &ImageStack, op: u32, offset: u64, buf: &mut [u8]) -> i32 {
    handle_request_range(image, op, offset, buf.len() as u64, buf)
}

/// As [`handle_request`], for a request of `nr_bytes`: READ / WRITE move `buf` (its length),
/// DISCARD / WRITE_ZEROES cover all `nr_bytes`, which may exceed the I/O buffer.
pub fn handle_request_range(
    image: &ImageStack,
    op: u32,
    offset: u64,
    nr_bytes: u64,
    buf: &mut [u8],
) -> i32 {
    let len = buf.len() as u64;
    let r = match op {
        // FLUSH carries no range (its start sector is u64::MAX on 6.12): handle it first.
        sys::UBLK_IO_OP_FLUSH => image.flush().map(|_| 0),
        sys::UBLK_IO_OP_READ => image.read(buf, offset).map(|_| len as i32),
        sys::UBLK_IO_OP_WRITE => image.write(buf, offset).map(|_| len as i32),
        sys::UBLK_IO_OP_DISCARD => image.discard(offset, nr_bytes).map(|_| 0),
        sys::UBLK_IO_OP_WRITE_ZEROES => image.write_zeroes(offset, nr_bytes).map(|_| 0),
        _ => return -libc::EOPNOTSUPP,
    };
    match r {
        Ok(n) => n,
        Err(e) => {
            log::warn!("ublk op {op} at {offset} (+{len}): {e}");
            -e.errno()
        }
    }
}

/// A worker pool for one device. A device has at most `QUEUE_DEPTH` requests in flight, so
/// with that many threads none of its requests waits for another, and a device whose reads
/// are stuck (a registry that does not answer) holds threads of its own pool only.
pub fn device_pool() -> Arc<WorkerPool> {
    // No idle minimum: once the device is gone, its workers time out and the pool is freed.
    WorkerPool::new(0, QUEUE_DEPTH as usize)
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads that run blocking requests. It grows when every worker is busy (so one stuck read
/// never holds up another request) and shrinks back when idle.
pub struct WorkerPool {
    state: Mutex<PoolState>,
    cv: Condvar,
    min: usize,
    max: usize,
}

struct PoolState {
    jobs: VecDeque<Job>,
    threads: usize,
    idle: usize,
}

impl WorkerPool {
    pub fn new(min: usize, max: usize) -> Arc<WorkerPool> {
        let pool = Arc::new(WorkerPool {
            state: Mutex::new(PoolState {
                jobs: VecDeque::new(),
                threads: 0,
                idle: 0,
            }),
            cv: Condvar::new(),
            min,
            max: max.max(1),
        });
        for _ in 0..min {
            pool.spawn_worker();
        }
        pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn_worker(self: &Arc<Self>) {
        self.lock().threads += 1;
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("ovbd-io".into())
            .spawn(move || me.worker());
        if spawned.is_err() {
            self.lock().threads -= 1;
        }
    }

    pub fn submit(self: &Arc<Self>, job: Job) {
        let grow = {
            let mut st = self.lock();
            st.jobs.push_back(job);
            st.idle < st.jobs.len() && st.threads < self.max
        };
        if grow {
            self.spawn_worker();
        }
        self.cv.notify_one();
    }

    fn worker(self: Arc<Self>) {
        loop {
            let job = {
                let mut st = self.lock();
                loop {
                    if let Some(j) = st.jobs.pop_front() {
                        break j;
                    }
                    st.idle += 1;
                    let (g, t) = self
                        .cv
                        .wait_timeout(st, Duration::from_secs(30))
                        .unwrap_or_else(|p| p.into_inner());
                    st = g;
                    st.idle -= 1;
                    if t.timed_out() && st.jobs.is_empty() && st.threads > self.min {
                        st.threads -= 1;
                        return;
                    }
                }
            };
            // A panicking job must not take its worker with it: the pool's count would leak.
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)) {
                log::error!("ovbd-io worker: a job panicked: {}", panic_text(&*p));
            }
        }
    }
}

/// Moves the calling thread into its own mount namespace, private, holding no mounts of ublk
/// devices. A thread that serves a device must not hold a mount of it: when the process exits,
/// dropping that mount would flush to a device nobody serves any more (libublk-rs#50).
pub fn enter_private_mount_namespace() -> Result<()> {
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        if libc::unshare(libc::CLONE_FS | libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNS)");
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
            return Err(std::io::Error::last_os_error()).context("making mounts private");
        }
    }
    for (mount_point, source) in crate::mount::mounts() {
        if source.starts_with("/dev/ublkb") {
            // Only this private namespace's copy is detached.
            let _ = crate::mount::unmount(std::path::Path::new(&mount_point), true);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ovbd_format::{RwLayer, RwMode};

    #[test]
    fn requests_map_to_image_operations() {
        let dir = tempfile::tempdir().unwrap();
        let rw = RwLayer::create(
            &dir.path().join("d"),
            &dir.path().join("i"),
            1 << 20,
            RwMode::Append,
            None,
        )
        .unwrap();
        let img = ImageStack::writable(None, rw).unwrap();
        let mut data = vec![7u8; 8192];
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_WRITE, 4096, &mut data),
            8192
        );
        let mut back = vec![0u8; 8192];
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_READ, 4096, &mut back),
            8192
        );
        assert_eq!(back, data);
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_FLUSH, u64::MAX, &mut []),
            0
        );
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_DISCARD, 4096, &mut vec![0u8; 4096]),
            0
        );
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_READ, 4096, &mut back),
            8192
        );
        assert!(back[..4096].iter().all(|&b| b == 0) && back[4096..].iter().all(|&b| b == 7));
        // Out of range and unaligned requests fail without touching anything.
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_READ, 1 << 20, &mut back),
            -libc::EINVAL
        );
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_READ, 100, &mut back),
            -libc::EINVAL
        );
        assert_eq!(handle_request(&img, 99, 0, &mut back), -libc::EOPNOTSUPP);
    }

    #[test]
    fn discard_covers_more_than_the_io_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let rw = RwLayer::create(
            &dir.path().join("d"),
            &dir.path().join("i"),
            8 << 20,
            RwMode::Append,
            None,
        )
        .unwrap();
        let img = ImageStack::writable(None, rw).unwrap();
        let mut data = vec![7u8; 4 << 20];
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_WRITE, 0, &mut data),
            4 << 20
        );
        // A 4 MiB discard arrives with a buffer of at most IO_BUF_BYTES.
        let mut small = vec![0u8; IO_BUF_BYTES as usize];
        for op in [sys::UBLK_IO_OP_DISCARD, sys::UBLK_IO_OP_WRITE_ZEROES] {
            assert_eq!(
                handle_request(&img, sys::UBLK_IO_OP_WRITE, 0, &mut data),
                4 << 20
            );
            assert_eq!(handle_request_range(&img, op, 0, 4 << 20, &mut small), 0);
            let mut back = vec![1u8; 4 << 20];
            assert_eq!(
                handle_request(&img, sys::UBLK_IO_OP_READ, 0, &mut back),
                4 << 20
            );
            assert!(back.iter().all(|&b| b == 0), "op {op} left data behind");
        }
    }

    #[test]
    fn read_only_image_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (d, i) = (dir.path().join("d"), dir.path().join("i"));
        RwLayer::create(&d, &i, 1 << 20, RwMode::Append, None)
            .unwrap()
            .seal()
            .unwrap();
        let sealed = ovbd_format::LsmtFile::open(std::sync::Arc::new(
            ovbd_format::FileSource::open(&d).unwrap(),
        ))
        .unwrap();
        let img = ImageStack::read_only(ovbd_format::LayerStack::new(vec![sealed]).unwrap());
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_WRITE, 0, &mut [1u8; 512]),
            -libc::EROFS
        );
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_DISCARD, 0, &mut [0u8; 512]),
            -libc::EROFS
        );
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_READ, 0, &mut [1u8; 512]),
            512
        );
    }

    /// A source that panics on reads once armed (a bug in a format or cache layer).
    struct PanicSource {
        inner: ovbd_format::FileSource,
        armed: std::sync::atomic::AtomicBool,
    }

    impl ovbd_format::ReadAt for PanicSource {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            if self.armed.load(std::sync::atomic::Ordering::SeqCst) {
                panic!("injected panic reading at {offset}");
            }
            self.inner.read_at(buf, offset)
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn name(&self) -> &str {
            "panicking source"
        }
        fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            self.read_at(buf, offset)
        }
    }

    #[test]
    fn a_panicking_read_fails_with_eio() {
        let dir = tempfile::tempdir().unwrap();
        let (d, i) = (dir.path().join("d"), dir.path().join("i"));
        let rw = RwLayer::create(&d, &i, 1 << 20, RwMode::Append, None).unwrap();
        rw.write(&[5u8; 4096], 0).unwrap();
        rw.seal().unwrap();
        let src = Arc::new(PanicSource {
            inner: ovbd_format::FileSource::open(&d).unwrap(),
            armed: false.into(),
        });
        let sealed = ovbd_format::LsmtFile::open(src.clone()).unwrap();
        let img = ImageStack::read_only(ovbd_format::LayerStack::new(vec![sealed]).unwrap());
        let mut buf = vec![0u8; 4096];
        assert_eq!(
            run_request(7, &img, sys::UBLK_IO_OP_READ, 0, 4096, &mut buf),
            4096
        );
        src.armed.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            run_request(7, &img, sys::UBLK_IO_OP_READ, 0, 4096, &mut buf),
            -libc::EIO
        );
        // So does one served on the queue thread.
        assert_eq!(try_read_inline(7, &img, &mut buf, 0), Some(-libc::EIO));
    }

    #[test]
    fn a_job_lost_to_a_panic_answers_eio_and_kicks_the_queue() {
        // SAFETY: eventfd returns a new descriptor we own, or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(raw >= 0);
        let kick = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let (tx, rx) = smol::channel::bounded::<i32>(1);
        let pool = WorkerPool::new(1, 1);
        let reply = Reply {
            tx,
            kick: kick.clone(),
            sent: false,
        };
        pool.submit(Box::new(move || {
            let _reply = reply;
            panic!("injected panic before answering");
        }));
        // One worker runs jobs in order: once this one ran, the panicked one has ended.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        pool.submit(Box::new(move || done_tx.send(()).unwrap()));
        done_rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(rx.try_recv(), Ok(-libc::EIO));
        let mut counter = [0u8; 8];
        // SAFETY: reading 8 bytes from our eventfd into `counter`.
        let n = unsafe { libc::read(kick.as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
        assert_eq!((n, u64::from_ne_bytes(counter)), (8, 1));
    }

    #[test]
    fn pool_survives_panicking_jobs() {
        // One thread at most: a worker lost to a panic would leave nobody to run jobs.
        let pool = WorkerPool::new(1, 1);
        for _ in 0..3 {
            pool.submit(Box::new(|| panic!("injected job panic")));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        pool.submit(Box::new(move || tx.send(()).unwrap()));
        // A hang guard only: the job runs at once on a healthy pool.
        rx.recv_timeout(Duration::from_secs(20))
            .expect("a job after panicking ones never ran");
        assert_eq!(pool.lock().threads, 1);
    }

    #[test]
    fn a_device_pool_runs_a_job_for_every_tag_at_once() {
        let pool = device_pool();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        for _ in 0..QUEUE_DEPTH {
            let (gate, started) = (gate.clone(), started_tx.clone());
            pool.submit(Box::new(move || {
                started.send(()).unwrap();
                let (open, cv) = &*gate;
                let mut g = open.lock().unwrap();
                while !*g {
                    g = cv.wait(g).unwrap();
                }
            }));
        }
        // Every tag's job runs while all the others are stuck (a hang guard only).
        for _ in 0..QUEUE_DEPTH {
            started_rx.recv_timeout(Duration::from_secs(20)).unwrap();
        }
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }

    #[test]
    fn pool_runs_jobs_while_one_is_stuck() {
        let pool = WorkerPool::new(1, 8);
        let (tx, rx) = std::sync::mpsc::channel();
        let (block_tx, block_rx) = std::sync::mpsc::channel::<()>();
        pool.submit(Box::new(move || {
            let _ = block_rx.recv();
        }));
        for i in 0..4 {
            let tx = tx.clone();
            pool.submit(Box::new(move || tx.send(i).unwrap()));
        }
        let mut got: Vec<i32> = (0..4)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        got.sort();
        assert_eq!(got, vec![0, 1, 2, 3]);
        block_tx.send(()).unwrap();
    }
}
