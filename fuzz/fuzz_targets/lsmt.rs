//! LsmtFile::open on arbitrary bytes, then a LayerStack read of what it maps; the same from a
//! source that claims more bytes than it holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ovbd_format::{LsmtFile, MemSource};
use ovbd_fuzz::{check_err, read_lsmt, Liar, BUDGET, NAME};
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let src = Arc::new(MemSource::new(data.to_vec(), NAME));
    let r = LsmtFile::open(src).and_then(|l| read_lsmt(l, BUDGET));
    if let Err(e) = r {
        check_err(&e);
    }
    // From a source claiming 1 TiB, the trailer at the claimed end: the index count and
    // offset the trailer gives must not turn into allocations (-malloc_limit_mb).
    let r = LsmtFile::open(Arc::new(Liar::bytes(data, 4096))).and_then(|l| read_lsmt(l, BUDGET));
    if let Err(e) = r {
        check_err(&e);
    }
});
