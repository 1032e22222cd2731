//! ZFileReader::open on arbitrary bytes, then reads over its whole (budgeted) range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ovbd_format::{MemSource, ReadAt, ZFileReader};
use ovbd_fuzz::{check_err, read_source, BUDGET, NAME};
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let src = Arc::new(MemSource::new(data.to_vec(), NAME));
    let z = match ZFileReader::open(src) {
        Ok(z) => z,
        Err(e) => return check_err(&e),
    };
    if let Err(e) = read_source(&z, BUDGET) {
        check_err(&e);
    }
    // Unaligned single reads straddling block edges, straight through ReadAt.
    let size = z.size();
    for off in [1u64, 4095, 4097, size.saturating_sub(3)] {
        let mut b = [0u8; 8];
        if off < size {
            let _ = z.read_at(&mut b, off);
        }
    }
});
