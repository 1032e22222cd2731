//! The ublk side of a device: the control thread ([`serve`]: add or recover, run, delete),
//! the queue thread ([`queue_main`]) with one task per tag ([`io_task`]), and the [`Reply`]
//! through which a worker answers a tag and wakes the queue's io_uring.

use super::error::DeviceError;
use super::pool::WorkerPool;
use super::request::{run_request, try_read_inline};
use super::{enter_private_mount_namespace, AttachOptions, QUEUE_DEPTH};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{sys, BufDesc, UblkError, UblkFlags, UblkUringData};
use ovbd_format::ImageStack;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;

/// Largest request the kernel sends us (as upstream's ublk frontend).
pub(super) const IO_BUF_BYTES: u32 = 512 * 1024;
/// Reads up to this size are tried on the queue thread first (see `io_task`).
const INLINE_READ_MAX: usize = 128 * 1024;
/// Discard / write-zeroes limits advertised for writable devices (4 MiB).
const MAX_DISCARD_SECTORS: u32 = 8192;

/// The control thread: adds (or recovers) the device, runs it until stopped, deletes it.
/// `started` gets the device's id once `/dev/ublkbN` exists.
pub(super) fn serve(
    image: Arc<ImageStack>,
    pool: Arc<WorkerPool>,
    opts: AttachOptions,
    recoverable: bool,
    started: impl FnOnce(u32) + Send + Sync + 'static,
) -> Result<(), DeviceError> {
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
        .map_err(|source| DeviceError::Ublk {
            id: opts.id,
            what: "creating the device (is ublk_drv loaded?)",
            source,
        })?;
    let id = Some(ctrl.dev_info().dev_id);
    if opts.recover {
        ctrl.start_user_recover()
            .map_err(|source| DeviceError::Ublk {
                id,
                what: "starting its recovery",
                source,
            })?;
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
    let q_metrics = opts.metrics.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| queue_main(qid, dev, q_image, pool, q_metrics);
    let on_started = move |c: &UblkCtrl| started(c.dev_info().dev_id);
    let ran = ctrl.run_target(tgt_init, q_fn, on_started);
    // run_target returns once the device is stopped; delete it so no /dev/ublkcN is left.
    let deleted = ctrl.del_dev();
    ran.map_err(|source| DeviceError::Ublk {
        id,
        what: "serving it",
        source,
    })?;
    if let Err(e) = deleted {
        // Already deleted by someone else is fine.
        log::debug!("deleting ublk device: {e}");
    }
    image
        .flush()
        .map_err(|source| DeviceError::Flush { id, source })?;
    Ok(())
}

/// Pointer to a tag's I/O buffer handed to a worker. The tag's task awaits the worker's reply
/// before it touches the buffer again, so the worker has it exclusively meanwhile.
struct IoBufPtr(*mut u8, usize);
// SAFETY: see above: exactly one side uses the buffer at a time.
unsafe impl Send for IoBufPtr {}

/// One queue thread: a task per tag plus the eventfd waker, on a local executor.
fn queue_main(
    qid: u16,
    dev: &UblkDev,
    image: Arc<ImageStack>,
    pool: Arc<WorkerPool>,
    metrics: crate::metrics::DeviceMetrics,
) {
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
        let metrics = metrics.clone();
        tasks.push(exe.spawn(async move {
            match io_task(&q, tag, image, pool, kick, metrics).await {
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
    metrics: crate::metrics::DeviceMetrics,
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
            if let Some(res) = try_read_inline(
                &format_args!("ublk device {dev_id}"),
                &metrics,
                &image,
                &mut buf.as_mut_slice()[..len],
                offset,
            ) {
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
        let metrics = metrics.clone();
        pool.submit(Box::new(move || {
            let (ptr, mut reply) = (ptr, reply);
            // SAFETY: the tag's task waits for this reply before using the buffer again.
            let data = unsafe { std::slice::from_raw_parts_mut(ptr.0, ptr.1) };
            reply.answer(run_request(
                &format_args!("ublk device {dev_id}"),
                &metrics,
                &image,
                op,
                offset,
                nr_bytes,
                data,
            ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_job_lost_to_a_panic_answers_eio_and_kicks_the_queue() {
        // SAFETY: eventfd returns a new descriptor we own, or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(raw >= 0);
        let kick = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let (tx, rx) = smol::channel::bounded::<i32>(1);
        let pool = WorkerPool::new("ovbd-io", 1, 1);
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
}
