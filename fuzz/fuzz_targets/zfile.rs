//! ZFileReader::open on arbitrary bytes, then reads (and prefetches) over its whole (budgeted)
//! range; the same from a source that claims more bytes than it holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ovbd_format::source::read_exact_at;
use ovbd_format::{MemSource, ReadAt, ZFileReader};
use ovbd_fuzz::{check_err, read_source, Liar, BUDGET, NAME};
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    // The same bytes from a source claiming 1 TiB (trailer at the claimed end): sizes the
    // header takes from that claim must not turn into allocations (-malloc_limit_mb).
    match ZFileReader::open(Arc::new(Liar::bytes(data, 512))) {
        Ok(z) => {
            if let Err(e) = read_source(&z, BUDGET) {
                check_err(&e);
            }
        }
        Err(e) => check_err(&e),
    }
    let src = Arc::new(MemSource::new(data.to_vec(), NAME));
    let z = match ZFileReader::open(src) {
        Ok(z) => z,
        Err(e) => return check_err(&e),
    };
    if let Err(e) = read_source(&z, BUDGET) {
        check_err(&e);
    }
    // The same bytes whatever the read pattern: one read vs uneven small reads.
    let size = z.size();
    let n = size.min(256 << 10) as usize;
    let mut whole = vec![0u8; n];
    if read_exact_at(&z, &mut whole, 0).is_ok() {
        let mut piece = vec![0u8; 4097];
        let mut pos = 0usize;
        let mut step = 1usize;
        while pos < n {
            let k = step.min(n - pos);
            read_exact_at(&z, &mut piece[..k], pos as u64).expect("a range that read whole");
            assert!(
                piece[..k] == whole[pos..pos + k],
                "read at {pos}+{k} differs"
            );
            pos += k;
            step = step * 7 % 4097 + 1;
        }
    }
    // Unaligned single reads straddling block edges, straight through ReadAt; and prefetches
    // (the jump table mapped to one source range) over and past the end.
    for off in [1u64, 4095, 4097, size.saturating_sub(3)] {
        let mut b = [0u8; 8];
        if off < size {
            let _ = z.read_at(&mut b, off);
        }
        z.prefetch(off, 1 << 20).expect("a prefetch from memory");
        z.prefetch(off, u64::MAX).expect("a prefetch from memory");
    }
});
