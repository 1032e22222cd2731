//! The worker pool that runs a device's blocking requests.

use super::QUEUE_DEPTH;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

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
    /// The device's span (made current by whoever creates the pool): every worker thread enters
    /// it once, so its lines carry the device's fields at no cost per request.
    span: tracing::Span,
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
            span: tracing::Span::current(),
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
        let span = self.span.clone();
        let spawned = std::thread::Builder::new()
            .name("ovbd-io".into())
            .spawn(move || span.in_scope(|| me.worker()));
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

/// The text of a panic's payload.
pub(super) fn panic_text(p: &(dyn std::any::Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(|s| s.as_str()))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;

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
