//! The tar wrapper around a layer blob (spec §2.5–2.6): detection of PAX, plain ustar or none,
//! and the exact PAX wrapper `overlaybd-commit -t` writes.

use crate::error::{Error, Result};
use crate::source::{read_exact_at, ReadAt};

const BLOCK: u64 = 512;
/// Largest PAX extended header we accept (ours is one block).
const MAX_PAX: u64 = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WrapperKind {
    /// No tar: the blob is the ZFile or LSMT itself.
    None,
    /// One ustar header, payload at 512 (Go `archive/tar`).
    Ustar,
    /// PAX header + ustar header, payload at 1536, size from the PAX record (`overlaybd-commit -t`).
    Pax,
}

impl WrapperKind {
    pub fn name(self) -> &'static str {
        match self {
            WrapperKind::None => "none",
            WrapperKind::Ustar => "ustar",
            WrapperKind::Pax => "pax",
        }
    }
}

/// Where the payload of a blob lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wrapper {
    pub kind: WrapperKind,
    pub payload_offset: u64,
    pub payload_size: u64,
}

/// Whether a 512-byte block is a ustar header with a valid checksum.
fn is_tar_header(b: &[u8]) -> bool {
    if b.len() < BLOCK as usize || &b[257..262] != b"ustar" || &b[263..265] != b"00" {
        return false;
    }
    let Some(stored) = parse_octal(&b[148..156]) else {
        return false;
    };
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &c) in b[..BLOCK as usize].iter().enumerate() {
        let c = if (148..156).contains(&i) { b' ' } else { c };
        unsigned += c as u64;
        signed += c as i8 as i64;
    }
    stored == unsigned || stored as i64 == signed
}

/// Parses a numeric tar field: octal text padded with spaces/NULs, or base-256 when the high
/// bit of the first byte is set.
fn parse_octal(f: &[u8]) -> Option<u64> {
    if f.first().is_some_and(|&c| c & 0x80 != 0) {
        let mut v: u64 = (f[0] & 0x7f) as u64;
        for &c in &f[1..] {
            v = v.checked_mul(256)?.checked_add(c as u64)?;
        }
        return Some(v);
    }
    let s: Vec<u8> = f
        .iter()
        .copied()
        .skip_while(|&c| c == b' ')
        .take_while(|&c| c != 0 && c != b' ')
        .collect();
    if s.is_empty() {
        return Some(0);
    }
    let mut v = 0u64;
    for c in s {
        if !(b'0'..=b'7').contains(&c) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add((c - b'0') as u64)?;
    }
    Some(v)
}

/// Finds the `size` record in PAX extended header data.
fn pax_size(data: &[u8]) -> Option<u64> {
    let mut rest = data;
    while !rest.is_empty() && rest[0] != 0 {
        let sp = rest.iter().position(|&c| c == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
        if len <= sp || len > rest.len() {
            return None;
        }
        let rec = &rest[sp + 1..len];
        let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
        if let Some(v) = rec.strip_prefix(b"size=") {
            return std::str::from_utf8(v).ok()?.parse().ok();
        }
        rest = &rest[len..];
    }
    None
}

/// Detects the wrapper of a blob, as overlaybd does when opening a layer.
pub fn detect(src: &dyn ReadAt) -> Result<Wrapper> {
    let name = src.name();
    let size = src.size();
    let none = Wrapper {
        kind: WrapperKind::None,
        payload_offset: 0,
        payload_size: size,
    };
    if size < BLOCK {
        return Ok(none);
    }
    let mut h = [0u8; BLOCK as usize];
    read_exact_at(src, &mut h, 0)?;
    if !is_tar_header(&h) {
        return Ok(none);
    }
    let hsize = parse_octal(&h[124..136])
        .ok_or_else(|| Error::corrupt(name, 124, "tar header size field is not a number"))?;
    let (kind, header_at, pax) = if h[156] == b'x' {
        if hsize > MAX_PAX {
            return Err(Error::corrupt(
                name,
                124,
                format!("PAX header of {hsize} bytes is too large"),
            ));
        }
        let mut data = vec![0u8; hsize as usize];
        read_exact_at(src, &mut data, BLOCK)?;
        let next = BLOCK + hsize.div_ceil(BLOCK) * BLOCK;
        (WrapperKind::Pax, next, pax_size(&data))
    } else {
        (WrapperKind::Ustar, 0, None)
    };
    if kind == WrapperKind::Pax {
        if size < header_at + BLOCK {
            return Err(Error::corrupt(
                name,
                header_at,
                "tar ends after its PAX header (truncated?)",
            ));
        }
        read_exact_at(src, &mut h, header_at)?;
        if !is_tar_header(&h) {
            return Err(Error::corrupt(
                name,
                header_at,
                "no valid tar header after the PAX header",
            ));
        }
    }
    let entry_size = match pax {
        Some(s) => s,
        None => parse_octal(&h[124..136]).ok_or_else(|| {
            Error::corrupt(name, header_at + 124, "tar size field is not a number")
        })?,
    };
    let payload_offset = header_at + BLOCK;
    if payload_offset
        .checked_add(entry_size)
        .is_none_or(|e| e > size)
    {
        return Err(Error::corrupt(
            name,
            payload_offset,
            format!("tar entry says {entry_size} bytes at offset {payload_offset}, but the blob has {size} bytes (truncated?)"),
        ));
    }
    Ok(Wrapper {
        kind,
        payload_offset,
        payload_size: entry_size,
    })
}

fn put(b: &mut [u8], off: usize, s: &[u8]) {
    b[off..off + s.len()].copy_from_slice(s);
}

fn set_checksum(h: &mut [u8]) {
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&c| c as u64).sum();
    put(h, 148, format!("{sum:6o} \0").as_bytes());
}

/// The 1536 bytes before the payload of a PAX-wrapped layer blob: PAX header, its `size`
/// record, and the `overlaybd.commit` header with size 0 (the real size is in the record).
pub fn pax_prefix(payload_len: u64, mode: u32) -> [u8; 1536] {
    let mut out = [0u8; 1536];
    let body = format!("size={payload_len}\n");
    // The record's length counts its own digits.
    let mut n = body.len() + 2;
    while format!("{n} {body}").len() != n {
        n += 1;
    }
    let record = format!("{n} {body}");
    {
        let h = &mut out[..512];
        put(h, 0, b"overlaybd.pax");
        put(h, 124, format!("{:11o} ", record.len()).as_bytes());
        h[156] = b'x';
        put(h, 257, b"ustar\0");
        put(h, 263, b"00");
        set_checksum(h);
    }
    put(&mut out[512..1024], 0, record.as_bytes());
    {
        let h = &mut out[1024..];
        put(h, 0, b"overlaybd.commit");
        put(h, 100, format!("{mode:6o} \0").as_bytes());
        put(h, 108, format!("{:6o} \0", 0).as_bytes());
        put(h, 116, format!("{:6o} \0", 0).as_bytes());
        put(h, 124, format!("{:11o} ", 0).as_bytes());
        put(h, 136, format!("{:11o} ", 0).as_bytes());
        h[156] = b'0';
        put(h, 257, b"ustar\0");
        put(h, 263, b"00");
        put(h, 265, b"root");
        put(h, 297, b"root");
        set_checksum(h);
    }
    out
}

/// Bytes after the payload: zero padding to 512, then two zero blocks.
pub fn tail_len(payload_len: u64) -> u64 {
    payload_len.div_ceil(BLOCK) * BLOCK - payload_len + 2 * BLOCK
}

/// The mode upstream records for `overlaybd.commit` (a regular file, 0644).
pub const DEFAULT_MODE: u32 = 0o100644;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::MemSource;

    #[test]
    fn pax_roundtrip() {
        for len in [0u64, 1, 511, 512, 639_491, 10_000_000_000] {
            let pre = pax_prefix(len, DEFAULT_MODE);
            let mut blob = pre.to_vec();
            let short = len.min(4096);
            blob.resize(1536 + short as usize, 7);
            if len == short {
                blob.resize(blob.len() + tail_len(len) as usize, 0);
                let w = detect(&MemSource::new(blob, "t")).unwrap();
                assert_eq!(
                    w,
                    Wrapper {
                        kind: WrapperKind::Pax,
                        payload_offset: 1536,
                        payload_size: len
                    }
                );
            } else {
                let e = detect(&MemSource::new(blob, "t")).unwrap_err().to_string();
                assert!(e.contains("truncated"), "{e}");
            }
        }
    }

    #[test]
    fn record_length_counts_itself() {
        let pre = pax_prefix(639_491, DEFAULT_MODE);
        assert_eq!(&pre[512..527], b"15 size=639491\n");
        assert_eq!(pax_size(b"9 size=5\n"), Some(5));
        assert_eq!(pax_size(b"99 size=5\n"), None);
    }
}
