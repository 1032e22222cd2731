//! A registry's `multipart/byteranges` answer to a request for several ranges: the input's
//! first line is the boundary, the rest the body. Parts must lie within the body and the blob.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ovbd::fuzzing::registry_byteranges(data);
});
