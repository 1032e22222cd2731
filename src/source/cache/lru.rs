//! Eviction: every access stamps a block with the cache's clock; over the limit, the least
//! recently stamped blocks of all entries go (bits cleared and synced, then holes punched).

use super::blob_cache::BlobCache;
use super::lock;
use super::record::{punch_hole, sums_path};
use super::state::{get_bit, set_bit, BlobState, Flight};
use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;

/// Eviction passes in a row that free nothing before [`BlobCache::maybe_evict`] leaves
/// the rest to the next fill: a bound on spinning while readers keep winning the race.
const FRUITLESS_PASSES: usize = 4;

impl BlobCache {
    pub(super) fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Relaxed) + 1
    }

    /// Evicts down to the low-water mark if over the limit (one evictor at a time). Fills
    /// that land during a pass leave their eviction to it: it looks again once it lets go,
    /// also after a pass that freed nothing (every block it chose was read again before it
    /// got to them, or was still being filled): the next pass chooses among the blocks as
    /// they are then. After [`FRUITLESS_PASSES`] such passes in a row, the next fill looks.
    pub(super) fn maybe_evict(&self) {
        let mut fruitless = 0;
        while self.total.load(SeqCst) > self.limit {
            let Ok(g) = self.evicting.try_lock() else {
                return;
            };
            let freed = self.evict_to(self.low_water);
            drop(g);
            if freed == 0 {
                fruitless += 1;
                if fruitless == FRUITLESS_PASSES {
                    return;
                }
                // Let the readers and fills that beat this pass finish theirs.
                std::thread::yield_now();
            }
        }
    }

    /// Evicts the least recently used blocks until at most `target` bytes are cached.
    pub(super) fn evict_to(&self, target: u64) -> u64 {
        let over = self.total.load(Relaxed).saturating_sub(target);
        if over == 0 {
            return 0;
        }
        let blobs: Vec<Arc<BlobState>> = lock(&self.blobs).values().cloned().collect();
        let mut candidates = Vec::new();
        for (i, s) in blobs.iter().enumerate() {
            // The set bits only: a large blob with few blocks cached costs little.
            let inner = lock(&s.inner);
            candidates.extend(
                inner
                    .present_blocks()
                    .filter(|b| !inner.inflight.contains_key(b))
                    .map(|b| (inner.stamp[b as usize], i, b)),
            );
        }
        candidates.sort_unstable();
        let mut chosen: Vec<Vec<(u64, Option<u64>)>> = vec![Vec::new(); blobs.len()];
        let mut acc = 0;
        for (stamp, i, b) in candidates {
            if acc >= over {
                break;
            }
            acc += blobs[i].block_len(b);
            chosen[i].push((b, Some(stamp)));
        }
        #[cfg(test)]
        if let Some(f) = lock(&self.mid_eviction).take() {
            f();
        }
        let mut freed = 0;
        for (i, list) in chosen.iter().enumerate() {
            if !list.is_empty() {
                freed += blobs[i].evict_blocks(self, list);
            }
        }
        self.drop_empty_closed();
        log::debug!(
            "block cache {}: evicted {freed} bytes, {} cached",
            self.dir.display(),
            self.total.load(Relaxed)
        );
        freed
    }

    /// Deletes the files of blobs that have no block and no open handle.
    pub(super) fn drop_empty_closed(&self) {
        let mut blobs = lock(&self.blobs);
        blobs.retain(|_, s| {
            let inner = lock(&s.inner);
            let keep = s.open.load(Relaxed) > 0
                || s.cached.load(Relaxed) > 0
                || !inner.inflight.is_empty();
            if !keep {
                let _ = fs::remove_file(&s.map_path);
                let _ = fs::remove_file(&s.data_path);
                let _ = fs::remove_file(sums_path(&s.map_path));
                // The algo and origin directories, if that emptied them.
                let algo_dir = s.map_path.parent();
                for d in [algo_dir, algo_dir.and_then(Path::parent)]
                    .into_iter()
                    .flatten()
                {
                    let _ = fs::remove_dir(d);
                }
            }
            keep
        });
    }

    /// Evicts every block not being fetched right now and deletes the files of blobs not
    /// open. Returns the bytes freed.
    #[allow(dead_code)] // API for the daemon's cache management
    pub fn clear(&self) -> u64 {
        let _g = lock(&self.evicting);
        let blobs: Vec<Arc<BlobState>> = lock(&self.blobs).values().cloned().collect();
        let mut freed = 0;
        for s in blobs {
            let all: Vec<(u64, Option<u64>)> =
                lock(&s.inner).present_blocks().map(|b| (b, None)).collect();
            freed += s.evict_blocks(self, &all);
        }
        self.drop_empty_closed();
        freed
    }
}

impl BlobState {
    /// Evicts `blocks` that are present and not in flight (and, where a stamp is given, not
    /// used since): bits cleared (and the map synced if it had any of them), then holes
    /// punched. Returns bytes freed.
    pub(super) fn evict_blocks(&self, cache: &BlobCache, blocks: &[(u64, Option<u64>)]) -> u64 {
        let flight = Flight::new();
        let mut victims = Vec::new();
        let mut freed = 0;
        let mut recorded = false;
        {
            let mut inner = lock(&self.inner);
            for &(b, stamp) in blocks {
                if b >= self.nblocks
                    || !inner.is_present(b)
                    || inner.inflight.contains_key(&b)
                    || stamp.is_some_and(|s| inner.stamp[b as usize] != s)
                {
                    continue;
                }
                set_bit(&mut inner.present, b, false);
                if get_bit(&inner.durable, b) {
                    set_bit(&mut inner.durable, b, false);
                    recorded = true;
                }
                inner.inflight.insert(b, flight.clone());
                victims.push(b);
                freed += self.block_len(b);
            }
            if victims.is_empty() {
                return 0;
            }
            if recorded {
                inner.dirty_gen += 1;
            }
        }
        self.cached.fetch_sub(freed, Relaxed);
        cache.total.fetch_sub(freed, Relaxed);
        cache.evicted.fetch_add(freed, Relaxed);
        let done = match self.files(false) {
            // The map must not say present over a hole: its bits go first.
            Ok(files) => match if recorded {
                self.persist(&files)
            } else {
                Ok(())
            } {
                Ok(()) => {
                    let _w = self.punch.write().unwrap_or_else(|e| e.into_inner());
                    for &b in &victims {
                        let (s, e) = self.block_range(b);
                        if let Err(err) = punch_hole(&files.data, s, e - s) {
                            if !cache.punch_warned.swap(true, Relaxed) {
                                log::warn!(
                                    "cache {}: cannot punch holes ({err}): evicted blocks keep their disk space",
                                    cache.dir.display()
                                );
                            }
                        }
                    }
                    Ok(())
                }
                // The cleared bits may not be on disk: keep the data (correct, just not
                // counted any more) rather than punch under a bit that may still say present.
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            log::warn!(
                "cache of {}: evicting {} block(s): {e}",
                self.digest,
                victims.len()
            );
        }
        let mut inner = lock(&self.inner);
        for b in victims {
            if inner
                .inflight
                .get(&b)
                .is_some_and(|f| Arc::ptr_eq(f, &flight))
            {
                inner.inflight.remove(&b);
            }
        }
        drop(inner);
        flight.complete(Ok(()));
        freed
    }
}
