//! An RW layer pair (writable_data + writable_index) from arbitrary bytes: RwLayer::open, read
//! every mapping (budgeted), then seal it and check the sealed file opens read-only and reads
//! the same, also from a source that claims more bytes than the file holds.
//!
//! Input: a u32 (LE) split point, then the data file's bytes up to it and the index file's after.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ovbd_format::index::Piece;
use ovbd_format::{FileSource, LsmtFile, ReadAt, RwLayer};
use ovbd_fuzz::{Liar, BUDGET};
use std::sync::Arc;

/// Reads every mapping within the budget: (sector offset, bytes) per piece read.
fn read_all(layer: &RwLayer, vsize: u64) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut left = BUDGET;
    let mut pieces: Vec<Piece> = Vec::new();
    for s in layer.segments() {
        let n = (s.length as u64 * 512).min(left);
        if n == 0 || s.offset * 512 >= vsize {
            continue;
        }
        left -= n;
        pieces.clear();
        layer.resolve(s.offset, s.offset + n / 512, &mut pieces);
        for p in &pieces {
            let mut buf = vec![0u8; (p.length * 512) as usize];
            match p.seg {
                Some(seg) if seg.zeroed => {}
                Some(seg) => {
                    if let Err(e) = layer.read_mapped(&mut buf, &seg) {
                        check_err_in(&e);
                        return out;
                    }
                }
                None => panic!("a segment of the index resolved to a hole"),
            }
            out.push((p.offset, buf));
        }
    }
    out
}

fn check_err_in(e: &ovbd_format::Error) {
    let msg = e.to_string();
    assert!(
        msg.contains(ovbd_fuzz::scratch_dir("rw").to_str().unwrap()),
        "error does not name the file: {msg}"
    );
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 4 {
        return;
    }
    let split = u32::from_le_bytes(input[..4].try_into().unwrap()) as usize % (input.len() - 3);
    let (data, index) = input[4..].split_at(split);
    let dir = ovbd_fuzz::scratch_dir("rw");
    let (d, i) = (dir.join("writable_data"), dir.join("writable_index"));
    std::fs::write(&d, data).unwrap();
    std::fs::write(&i, index).unwrap();
    let layer = match RwLayer::open(&d, &i) {
        Ok(l) => l,
        Err(e) => return check_err_in(&e),
    };
    let vsize = layer.virtual_size();
    let before = read_all(&layer, vsize);
    // Sealing writes the index at the end of the data (sparse: at 4096 + vsize); keep the
    // files small.
    if vsize > 1 << 30 {
        return;
    }
    if let Err(e) = layer.seal() {
        return check_err_in(&e);
    }
    let file: Arc<dyn ReadAt> = Arc::new(FileSource::open(&d).unwrap());
    // As a file, and from a source claiming 1 TiB with the trailer at the claimed end (the
    // index read in pieces from a size that is not the file's): both read the same.
    for src in [
        file.clone(),
        Arc::new(Liar::new(file, 4096)) as Arc<dyn ReadAt>,
    ] {
        let sealed = match LsmtFile::open(src) {
            Ok(l) => l,
            Err(e) => panic!("a layer that opened and sealed does not open read-only: {e}"),
        };
        let stack = ovbd_format::LayerStack::new(vec![sealed]).unwrap();
        for (sector, want) in &before {
            let mut got = vec![0u8; want.len()];
            stack.read(&mut got, sector * 512).unwrap();
            assert!(
                got == *want,
                "sealed layer reads differently at sector {sector}"
            );
        }
    }
});
