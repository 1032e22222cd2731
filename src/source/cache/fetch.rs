//! Filling missing blocks: the blocks one read claims (other readers wait for them), fetched
//! as runs of adjacent blocks in one call, checked (verified entries), written, marked present.
//! How far past the read a refill reaches adapts to the access pattern ([`Refill`]).

use super::cached_blob::CachedBlob;
use super::lock;
use super::state::{set_bit, BlobState, Flight, Inner};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Blocks claimed for fetching by one reader. Dropped without [`Claim::release`]: the waiters
/// are told it failed and the blocks are free to be claimed again.
pub(super) struct Claim<'a> {
    pub(super) state: &'a BlobState,
    pub(super) blocks: Vec<u64>,
    pub(super) flight: Arc<Flight>,
    pub(super) finished: bool,
}

/// The largest refill (one registry request: [`crate::registry::MAX_REQUEST_BYTES`]).
pub(super) const MAX_REFILL_BYTES: u64 = 4 << 20;

/// Missing runs of one refill this close are fetched as one range, the present blocks between
/// them fetched again and dropped (a request costs more than this many bytes); never across a
/// block another reader is fetching.
pub(super) const MERGE_GAP_BYTES: u64 = 64 << 10;

/// How many sequential runs of one open blob the refill follows at once: a start reads several
/// files of a layer in turn (python's imports interleave `.pyc` files with a library's pages),
/// and each keeps growing its own refill.
pub(super) const RUNS: usize = 8;

/// The adaptive refill of one open blob: a miss within one refill's length of one of the
/// [`RUNS`] latest refills (a sequential run, its reads maybe out of order across the device's
/// workers) plans twice that refill's plan, ahead of the read, up to [`MAX_REFILL_BYTES`]; any
/// other miss plans one block, the read's own blocks only (scattered small reads stay small)
/// and starts a run.
#[derive(Debug, Default)]
pub(super) struct Refill {
    /// The latest refills, the last first.
    runs: Vec<Run>,
    /// The plan [`Refill::plan`] made last: its size, and the run it continues.
    planned: u64,
    continues: Option<usize>,
}

#[derive(Debug, Clone, Copy)]
struct Run {
    /// The first block of the refill, and the block after it.
    first: u64,
    next: u64,
    /// Its plan, blocks.
    size: u64,
}

impl Run {
    fn is_near(&self, block: u64) -> bool {
        block.saturating_add(self.size) >= self.first
            && block <= self.next.saturating_add(self.size)
    }
}

impl Refill {
    /// Blocks to claim from `first_missing` on (at least the read's own, counted by the
    /// caller), and notes it as the plan. A miss where a run's refill began (a retry) keeps
    /// that run's plan.
    pub(super) fn plan(&mut self, first_missing: u64, max_blocks: u64) -> u64 {
        let retry = self.runs.iter().position(|r| r.first == first_missing);
        let (continues, size) = match retry {
            Some(i) => (Some(i), self.runs[i].size),
            None => match self.runs.iter().position(|r| r.is_near(first_missing)) {
                Some(i) => (Some(i), (self.runs[i].size * 2).min(max_blocks).max(1)),
                None => (None, 1),
            },
        };
        self.continues = continues;
        self.planned = size;
        size
    }

    /// Notes the refill of blocks `first..end`, planned by the last [`Refill::plan`]: it
    /// becomes the latest refill of the run it continues, or starts one (the run refilled
    /// longest ago is forgotten).
    pub(super) fn record(&mut self, first: u64, end: u64) {
        if let Some(i) = self.continues.take() {
            self.runs.remove(i);
        }
        let run = Run {
            first,
            next: end,
            size: self.planned,
        };
        self.runs.insert(0, run);
        self.runs.truncate(RUNS);
    }
}

impl Claim<'_> {
    /// Claims the missing blocks after `last` (the read's last block) that `refill` plans
    /// from the claim's first block on (`whole`: all of them, to the blob's end), stopping at
    /// the first block present or in flight. A plan never passes [`MAX_REFILL_BYTES`], nor an
    /// eighth of `cache_limit`: what a small cache fetched ahead would evict before it is read.
    /// Called with the entry's lock held, right after the read's own blocks were claimed.
    pub(super) fn extend(
        &mut self,
        inner: &mut Inner,
        refill: &mut Refill,
        last: u64,
        whole: bool,
        cache_limit: u64,
    ) {
        let Some(&first) = self.blocks.first() else {
            return;
        };
        let st = self.state;
        let max_blocks = (MAX_REFILL_BYTES.min(cache_limit / 8) / st.block).max(1);
        let end = match whole {
            true => st.nblocks,
            false => first
                .saturating_add(refill.plan(first, max_blocks))
                .min(st.nblocks),
        };
        let mut b = last + 1;
        while b < end && !inner.is_present(b) && !inner.inflight.contains_key(&b) {
            inner.inflight.insert(b, self.flight.clone());
            self.blocks.push(b);
            b += 1;
        }
        if !whole {
            let claimed_end = self.blocks.last().map_or(first, |l| l + 1);
            refill.record(first, claimed_end);
        }
    }

    pub(super) fn release(&mut self, r: Result<(), (io::ErrorKind, String)>) {
        if self.finished {
            return;
        }
        self.finished = true;
        {
            let mut inner = lock(&self.state.inner);
            for b in &self.blocks {
                if inner
                    .inflight
                    .get(b)
                    .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
                {
                    inner.inflight.remove(b);
                }
            }
        }
        self.flight.complete(r);
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.release(Err((
            io::ErrorKind::Other,
            "the fetch was abandoned".into(),
        )));
    }
}

impl CachedBlob {
    /// Fetches the claimed blocks (runs of adjacent ones as one range each, all at once),
    /// writes and syncs them, marks them present and copies what the read wants into `buf`.
    pub(super) fn fill(
        &self,
        claim: &mut Claim<'_>,
        buf: &mut [u8],
        offset: u64,
    ) -> io::Result<()> {
        let st = &*self.state;
        let mut runs: Vec<(u64, u64)> = Vec::new(); // (first block, count)
        for &b in &claim.blocks {
            match runs.last_mut() {
                Some((f, c)) if *f + *c == b => *c += 1,
                _ => runs.push((b, 1)),
            }
        }
        let range_of = |f: u64, c: u64| {
            let s = f * st.block;
            let e = ((f + c) * st.block).min(st.size);
            (s, (e - s) as usize)
        };
        let ranges: Vec<(u64, usize)> = runs.iter().map(|&(f, c)| range_of(f, c)).collect();
        // Runs with a small gap between them: one request (`gets`), each run's bytes cut out.
        let mut gets: Vec<(u64, u64)> = Vec::new(); // (first block, count)
        {
            let inner = lock(&st.inner);
            for &(f, c) in &runs {
                match gets.last_mut() {
                    Some((gf, gc))
                        if (f - (*gf + *gc)) * st.block <= MERGE_GAP_BYTES
                            && (*gf + *gc..f).all(|b| !inner.inflight.contains_key(&b)) =>
                    {
                        *gc = f + c - *gf
                    }
                    _ => gets.push((f, c)),
                }
            }
        }
        let get_ranges: Vec<(u64, usize)> = gets.iter().map(|&(f, c)| range_of(f, c)).collect();
        let fail = |claim: &mut Claim<'_>, e: io::Error| {
            claim.release(Err((e.kind(), e.to_string())));
            e
        };
        log::trace!("{}: fetching {get_ranges:?}", self.name);
        let started = std::time::Instant::now();
        let got = match self.source.fetch_ranges(&get_ranges) {
            Ok(d)
                if d.len() == get_ranges.len()
                    && d.iter().zip(&get_ranges).all(|(d, r)| d.len() == r.1) =>
            {
                d
            }
            Ok(_) => {
                let e = self.short_fetch(offset);
                return Err(fail(claim, e));
            }
            Err(e) => return Err(fail(claim, e)),
        };
        let data: Vec<Vec<u8>> = if gets.len() == runs.len() {
            got
        } else {
            let mut data = Vec::with_capacity(ranges.len());
            let mut g = 0;
            for r in &ranges {
                while get_ranges[g].0 + get_ranges[g].1 as u64 <= r.0 {
                    g += 1;
                }
                let at = (r.0 - get_ranges[g].0) as usize;
                data.push(got[g][at..at + r.1].to_vec());
            }
            data
        };
        let files = match st.files(true) {
            Ok(f) => f,
            Err(e) => {
                let e = io::Error::from(e);
                return Err(fail(claim, e));
            }
        };
        if let Err(e) = self.check_blocks(&files, &ranges, &data) {
            return Err(fail(claim, e));
        }
        // Not synced here: the flusher syncs before it records the blocks in the map.
        let written = (|| {
            for (r, d) in ranges.iter().zip(&data) {
                files.data.write_all_at(d, r.0)?;
            }
            Ok::<(), io::Error>(())
        })();
        if let Err(e) = written {
            let e = self.io_err(offset, "writing", e);
            // The data is at hand all the same: serve this read, cache nothing. Waiters look
            // again (and fetch for themselves).
            claim.release(Ok(()));
            for (r, d) in ranges.iter().zip(&data) {
                Self::copy_overlap(buf, offset, r.0, d);
            }
            log::warn!("{e}");
            return Ok(());
        }
        let bytes: u64 = ranges.iter().map(|r| r.1 as u64).sum();
        log::trace!(
            "{}: fetched {bytes} bytes in {:?}",
            self.name,
            started.elapsed()
        );
        {
            let stamp = self.cache.tick();
            let mut inner = lock(&st.inner);
            for &b in &claim.blocks {
                set_bit(&mut inner.present, b, true);
                inner.stamp[b as usize] = stamp;
                inner.pending.insert(b);
            }
        }
        st.cached.fetch_add(bytes, Relaxed);
        self.cache.total.fetch_add(bytes, Relaxed);
        self.cache.fetched.fetch_add(bytes, Relaxed);
        claim.release(Ok(()));
        for (r, d) in ranges.iter().zip(&data) {
            Self::copy_overlap(buf, offset, r.0, d);
        }
        self.cache.flusher.mark(&self.state);
        self.cache.maybe_evict();
        Ok(())
    }
}
