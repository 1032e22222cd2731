//! A pool of threads for blocking jobs: it grows while every thread is busy, so one stuck job
//! (a registry that does not answer) never holds up the others, and shrinks when idle.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send>;

/// Threads that run blocking jobs: a device's requests, or a layer's reads ahead of its device.
pub struct WorkerPool {
    /// The span current where the pool is made (a device's): every worker thread enters it
    /// once, so its lines carry the span's fields at no cost per job.
    span: tracing::Span,
    /// Its threads' name.
    name: &'static str,
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
    /// A pool of `min` to `max` threads named `name`.
    pub fn new(name: &'static str, min: usize, max: usize) -> Arc<WorkerPool> {
        let pool = Arc::new(WorkerPool {
            name,
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
            .name(self.name.into())
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
                log::error!("{} worker: a job panicked: {}", self.name, panic_text(&*p));
            }
        }
    }
}

/// The text of a panic's payload.
pub(crate) fn panic_text(p: &(dyn std::any::Any + Send)) -> &str {
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
        let pool = WorkerPool::new("test", 1, 1);
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
    fn pool_runs_jobs_while_one_is_stuck() {
        let pool = WorkerPool::new("test", 1, 8);
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
