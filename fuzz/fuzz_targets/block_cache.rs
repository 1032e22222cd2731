//! The block cache's start-up scan over arbitrary files: map and data files of two blobs
//! (optionally with their record CRCs made valid), temporary and stray files. Opening must
//! keep only records that check out, and a second open must find the same bytes cached.
//!
//! Input: see `ovbd_fuzz::cache_files`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cache = ovbd_fuzz::scratch_dir("cache").join("cache");
    let _ = std::fs::remove_dir_all(&cache);
    let files = ovbd_fuzz::cache_files(data);
    ovbd_fuzz::write_cache_files(&cache, &files).expect("writing the cache files");
    let (first, second) = ovbd::fuzzing::block_cache(&cache).expect("opening the cache");
    // The first open evicts down to the limit (1 MiB); what it keeps is recorded.
    assert!(first <= 1 << 20, "over the limit after eviction: {first}");
    assert_eq!(first, second, "a clean stop lost or gained cached bytes");
});
