//! LsmtFile::open on arbitrary bytes, then a LayerStack read of what it maps.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ovbd_format::{LsmtFile, MemSource};
use ovbd_fuzz::{check_err, read_lsmt, BUDGET, NAME};
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let src = Arc::new(MemSource::new(data.to_vec(), NAME));
    let r = LsmtFile::open(src).and_then(|l| read_lsmt(l, BUDGET));
    if let Err(e) = r {
        check_err(&e);
    }
});
