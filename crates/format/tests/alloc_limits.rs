//! Sizes read from untrusted layers must not drive allocations: a header or a source's claimed
//! length can say anything, so memory may follow only bytes actually read and numbers checked
//! against the blob. A counting allocator (this test binary only) measures the peak a parse
//! allocates on the test's own thread.

mod common;

use common::{build_layer, open_mem, LayerWrite};
use ovbd_format::lsmt::Segment;
use ovbd_format::{Error, LayerStack, LsmtFile, ReadAt, ZFileReader};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

struct Counting;

thread_local! {
    // const-initialised Cells without destructors: safe to touch from inside the allocator.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let v = live.get() + delta;
        live.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            track(l.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            track(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        track(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            track(new as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`; returns its result and the most bytes it had allocated at once on this thread.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    (r, (PEAK.with(Cell::get) - base).max(0) as usize)
}

const MIB: usize = 1 << 20;
const NAME: &str = "sha256:lying-blob";

#[track_caller]
fn assert_names(e: &Error, file: &str, phrase: &str) {
    let msg = e.to_string();
    assert!(msg.contains(file) && msg.contains(phrase), "{msg}");
}

#[test]
fn zfile_jump_table_from_a_lying_source_allocates_little() {
    // 2^28 entries would be a 1 GiB table and 2 GiB of block offsets; 1e9 would be 4 + 8 GB.
    for (entries, at) in [(1u64 << 28, 1u64 << 39), (1_000_000_000, 512)] {
        let liar: Arc<dyn ReadAt> = Arc::new(common::lying_zfile(entries, at, NAME));
        let (r, peak) = peak_of(|| ZFileReader::open(liar).map(|_| ()));
        assert!(peak < 4 * MIB, "{entries} entries: {peak} bytes allocated");
        let e = r.expect_err("a ZFile without its jump table opened");
        assert_names(&e, NAME, "jump table");
    }
}

#[test]
fn lsmt_index_from_a_lying_source_allocates_little() {
    // 1e6 entries: 16 MB of index and 24 MB of segments, were they believed.
    let liar: Arc<dyn ReadAt> = Arc::new(common::lying_lsmt(1_000_000, &[], NAME));
    let (r, peak) = peak_of(|| LsmtFile::open(liar).map(|_| ()));
    assert!(peak < 4 * MIB, "{peak} bytes allocated");
    assert_names(
        &r.expect_err("an index that is not there opened"),
        NAME,
        "index",
    );
}

/// `count` layers (bottom first, named `layer-<i>`), each with `per_layer` 8-sector mappings
/// 16 sectors apart, shifted by 8 on every other layer so no layer hides the next.
fn layers(count: usize, per_layer: u64) -> Vec<LsmtFile> {
    let bytes = build_layer(1 << 30, &[(0, LayerWrite::Zero(8))]);
    (0..count)
        .map(|i| {
            let mut l = open_mem(bytes.clone(), &format!("layer-{i}"));
            l.segments = (0..per_layer)
                .map(|j| Segment {
                    offset: j * 16 + (i as u64 % 2) * 8,
                    length: 8,
                    moffset: 8,
                    zeroed: true,
                    tag: 0,
                })
                .collect();
            l
        })
        .collect()
}

#[test]
fn stack_fails_at_the_layer_that_passes_the_limit_before_merging() {
    let lowers = layers(255, 1000);
    // Merged whole, 255,000 entries (6 MB) would be built, plus the pairwise merges' copies.
    let (r, peak) = peak_of(|| LayerStack::with_limit(lowers, 50_000).map(|_| ()));
    let e = r.expect_err("a stack past its limit");
    // The 51st layer from the top (lowers[204]) takes the running total past 50,000.
    match &e {
        Error::Corrupt { file, what, .. } => {
            assert_eq!(file, "layer-204", "{e}");
            assert!(
                what.contains("51000") && what.contains("limit of 50000"),
                "{e}"
            );
        }
        other => panic!("expected Corrupt naming the layer, got {other:?}"),
    }
    assert!(peak < MIB, "{peak} bytes allocated before failing");
}

#[test]
fn stack_merge_checks_the_merged_count_as_it_grows() {
    // The top layer's mappings each sit inside one of the bottom's: 1,000 + 2 x 1,000 merged.
    let top_inside = |lowers: &mut Vec<LsmtFile>| {
        lowers[1].segments = (0..1000u64)
            .map(|j| Segment {
                offset: j * 16 + 2,
                length: 2,
                moffset: 8,
                zeroed: true,
                tag: 0,
            })
            .collect();
    };
    let mut lowers = layers(2, 1000);
    top_inside(&mut lowers);
    let s = LayerStack::with_limit(lowers, 3000).expect("exactly at the limit");
    assert_eq!(s.index().len(), 3000);
    let mut lowers = layers(2, 1000);
    top_inside(&mut lowers);
    // 2,000 entries in the layers pass the running check; the merge passes 2,999.
    let (r, peak) = peak_of(|| LayerStack::with_limit(lowers, 2999).map(|_| ()));
    let e = r.expect_err("a merged index past its limit");
    assert_names(&e, "layer-0", "merged");
    // Never more than the limit's worth of merged entries (24 bytes each) plus the inputs.
    assert!(peak < 2 * 3000 * 32 + 64 * 1024, "{peak} bytes allocated");
}
