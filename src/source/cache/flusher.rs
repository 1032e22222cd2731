//! The flusher thread: syncs written blocks and records them in their maps, in batches.

use super::lock;
use super::record::Key;
use super::state::BlobState;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Syncs written blocks and records them in their maps, off the read path, in batches.
pub(super) struct Flusher {
    pub(super) queue: Arc<FlushQueue>,
    pub(super) thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

pub(super) struct FlushQueue {
    pub(super) state: Mutex<FlushState>,
    pub(super) cv: Condvar,
    pub(super) delay: Duration,
    /// The cache's byte count (lowered when a failed sync drops blocks).
    pub(super) total: Arc<AtomicU64>,
}

#[derive(Default)]
pub(super) struct FlushState {
    pub(super) dirty: HashMap<Key, Arc<BlobState>>,
    pub(super) stop: bool,
}

impl Flusher {
    pub(super) fn start(delay: Duration, total: Arc<AtomicU64>) -> io::Result<Flusher> {
        let queue = Arc::new(FlushQueue {
            state: Mutex::new(FlushState::default()),
            cv: Condvar::new(),
            delay,
            total,
        });
        let q = queue.clone();
        let thread = std::thread::Builder::new()
            .name("ovbd-cache-flush".into())
            .spawn(move || q.run())?;
        Ok(Flusher {
            queue,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// `s` has blocks to flush.
    pub(super) fn mark(&self, s: &Arc<BlobState>) {
        let mut st = lock(&self.queue.state);
        if st.dirty.insert(s.key(), s.clone()).is_none() {
            self.queue.cv.notify_all();
        }
    }

    /// Flushes what is marked and ends the thread.
    pub(super) fn stop(&self) {
        lock(&self.queue.state).stop = true;
        self.queue.cv.notify_all();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl FlushQueue {
    pub(super) fn run(&self) {
        loop {
            let mut st = lock(&self.state);
            while st.dirty.is_empty() && !st.stop {
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            // Let the batch fill up.
            let until = Instant::now() + self.delay;
            while !st.stop {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                st = self
                    .cv
                    .wait_timeout(st, until - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let stop = st.stop;
            let dirty = std::mem::take(&mut st.dirty);
            drop(st);
            for s in dirty.values() {
                // On failure the blocks are dropped: read again, they are fetched again.
                if let Err(e) = s.flush(&self.total) {
                    log::warn!("block cache: syncing the blocks of {}: {e}", s.digest);
                }
            }
            if stop {
                let rest = std::mem::take(&mut lock(&self.state).dirty);
                for s in rest.values() {
                    if let Err(e) = s.flush(&self.total) {
                        log::warn!("block cache: syncing the blocks of {}: {e}", s.digest);
                    }
                }
                return;
            }
        }
    }
}
