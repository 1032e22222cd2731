//! A layer tar from arbitrary bytes applied onto a new in-memory ext4 as `ovbd convert`
//! applies it, then applied again over the result (an upper layer meeting every entry).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = ovbd::fuzzing::layer_tar(data) {
        assert!(!format!("{e:#}").is_empty());
    }
});
