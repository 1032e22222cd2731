//! Several small layers from the input stacked: every read of the merged stack must equal what
//! the topmost layer mapping the sector holds, and a stack with a small entry limit must fail
//! only when the layers or the merged index really pass it.
//!
//! Input: per layer (at most 8, bottom first) a u32 LE length, then that many bytes (the
//! length is taken modulo what is left). Layers that do not open are left out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ovbd_format::lsmt::Segment;
use ovbd_format::source::read_exact_at;
use ovbd_format::{LayerStack, LsmtFile, MemSource, ReadAt};
use ovbd_fuzz::{check_err, BUDGET, NAME};
use std::sync::Arc;

/// The small limit the second stack is built with.
const LIMIT: u64 = 64;
/// Sectors compared per run, at most.
const SECTORS: usize = 2048;

fn layers(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while data.len() >= 4 && out.len() < 8 {
        let n = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let n = n % (data.len() - 4 + 1);
        out.push(data[4..4 + n].to_vec());
        data = &data[4 + n..];
    }
    out
}

fn open(parts: &[Vec<u8>]) -> Vec<LsmtFile> {
    parts
        .iter()
        .filter_map(
            |p| match LsmtFile::open(Arc::new(MemSource::new(p.clone(), NAME))) {
                Ok(l) => Some(l),
                Err(e) => {
                    check_err(&e);
                    None
                }
            },
        )
        .collect()
}

/// What sector `x` reads as: from the topmost layer mapping it, else zeros.
fn model(layers: &[(Arc<dyn ReadAt>, Vec<Segment>)], x: u64) -> [u8; 512] {
    let mut out = [0u8; 512];
    for (src, segs) in layers.iter().rev() {
        let i = segs.partition_point(|s| s.end() <= x);
        if let Some(s) = segs.get(i).filter(|s| s.offset <= x) {
            if !s.zeroed {
                read_exact_at(&**src, &mut out, (s.moffset + (x - s.offset)) * 512)
                    .expect("a mapped sector the layer holds");
            }
            return out;
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let parts = layers(data);
    let files = open(&parts);
    if files.is_empty() {
        return;
    }
    let kept: Vec<(Arc<dyn ReadAt>, Vec<Segment>)> = files
        .iter()
        .map(|l| (l.source().clone(), l.segments.clone()))
        .collect();
    let total: u64 = kept.iter().map(|(_, s)| s.len() as u64).sum();
    let stack = LayerStack::new(files).expect("a few small layers stack");
    let merged = stack.index().len() as u64;
    match LayerStack::with_limit(open(&parts), LIMIT) {
        Ok(s) => {
            assert!(
                total <= LIMIT && merged <= LIMIT,
                "{total}/{merged} entries passed"
            );
            assert_eq!(s.index().segments(), stack.index().segments());
        }
        Err(e) => {
            check_err(&e);
            assert!(
                total > LIMIT || merged > LIMIT,
                "refused {total}/{merged} entries"
            );
        }
    }
    // Segment edges of every layer, where merges cut: the merged stack reads as the model.
    let mut sectors: Vec<u64> = kept
        .iter()
        .flat_map(|(_, segs)| segs.iter())
        .flat_map(|s| [s.offset.saturating_sub(1), s.offset, s.end() - 1, s.end()])
        .collect();
    sectors.sort_unstable();
    sectors.dedup();
    let mut got = [0u8; 512];
    for &x in sectors.iter().take(SECTORS.min(BUDGET as usize / 512)) {
        stack
            .read(&mut got, x * 512)
            .expect("a stack of open layers reads");
        assert!(got == model(&kept, x), "sector {x} reads differently");
    }
});
