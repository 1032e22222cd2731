//! ZFile checksums: CRC-32C in "raw" form (no initial inversion, no final XOR), spec §2.4.

/// Seed of the per-block CRC.
pub const BLOCK_CRC_SALT: u32 = 100_007;

/// raw CRC-32C of `data` starting from `init`.
pub fn crc32c_raw(init: u32, data: &[u8]) -> u32 {
    // crc32c_append applies the standard inversions; undo them on both ends.
    !crc32c::crc32c_append(!init, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_check_values() {
        assert_eq!(crc32c_raw(0, b"123456789"), 0x58E3_FA20);
        assert_eq!(crc32c_raw(BLOCK_CRC_SALT, b"123456789"), 0x3C9B_D4E0);
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }
}
