//! tar::detect and layer::open_layer on arbitrary bytes; what opens is read (budgeted).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ovbd_format::{open_layer, tar, MemSource, ReadAt};
use ovbd_fuzz::{check_err, read_lsmt, read_source, BUDGET, NAME};
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let src = Arc::new(MemSource::new(data.to_vec(), NAME));
    match tar::detect(&*src) {
        Ok(w) => {
            assert!(w
                .payload_offset
                .checked_add(w.payload_size)
                .is_some_and(|e| e <= src.size()))
        }
        Err(e) => check_err(&e),
    }
    let layer = match open_layer(src) {
        Ok(l) => l,
        Err(e) => return check_err(&e),
    };
    if let Some(z) = &layer.zfile {
        if let Err(e) = read_source(&**z, BUDGET / 2) {
            check_err(&e);
        }
    }
    if let Err(e) = read_lsmt(layer.lsmt, BUDGET / 2) {
        check_err(&e);
    }
});
