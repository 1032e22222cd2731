//! The worker pool that runs a device's blocking requests.

use super::QUEUE_DEPTH;
pub use crate::pool::WorkerPool;
use std::sync::Arc;

/// A worker pool for one device. A device has at most `QUEUE_DEPTH` requests in flight, so
/// with that many threads none of its requests waits for another, and a device whose reads
/// are stuck (a registry that does not answer) holds threads of its own pool only.
pub fn device_pool() -> Arc<WorkerPool> {
    // No idle minimum: once the device is gone, its workers time out and the pool is freed.
    WorkerPool::new("ovbd-io", 0, QUEUE_DEPTH as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

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
}
