//! The file readahead's ext4 parsing (superblock, group descriptors, inodes' extents) on a disk
//! made of the input: what it notes must be chunks of at most 64 KiB inside the disk.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ovbd::fuzzing::ext4_readahead(data);
});
