//! Filling missing blocks: the blocks one read claims (other readers wait for them), fetched
//! as runs of adjacent blocks in one call, checked (verified entries), written, marked present.

use super::cached_blob::CachedBlob;
use super::lock;
use super::state::{set_bit, BlobState, Flight};
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

impl Claim<'_> {
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
        let ranges: Vec<(u64, usize)> = runs
            .iter()
            .map(|&(f, c)| {
                let s = f * st.block;
                let e = ((f + c) * st.block).min(st.size);
                (s, (e - s) as usize)
            })
            .collect();
        let fail = |claim: &mut Claim<'_>, e: io::Error| {
            claim.release(Err((e.kind(), e.to_string())));
            e
        };
        let data = match self.source.fetch_ranges(&ranges) {
            Ok(d)
                if d.len() == ranges.len()
                    && d.iter().zip(&ranges).all(|(d, r)| d.len() == r.1) =>
            {
                d
            }
            Ok(_) => {
                let e = self.short_fetch(offset);
                return Err(fail(claim, e));
            }
            Err(e) => return Err(fail(claim, e)),
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
