//! LSMT layer files (spec §1): header/trailer, 16-byte segment mappings, read-only layer open.

use crate::error::{Error, Result};
use crate::source::{read_exact_at, ReadAt};
use std::sync::Arc;

pub const SECTOR: u64 = 512;
pub const HEADER_SIZE: u64 = 4096;
/// Header/trailer space in sectors: data of a layer file starts at this moffset.
pub const HEADER_SECTORS: u64 = HEADER_SIZE / SECTOR;
pub const STRUCT_SIZE: u32 = 390;
pub const MAX_SEGMENT_LEN: u32 = 16383;
pub const MAX_OFFSET: u64 = (1 << 50) - 1;
pub const MAX_MOFFSET: u64 = (1 << 55) - 1;
pub const MAX_RO_INDEX_SIZE: u64 = 1_000_000;
pub const MAX_RW_INDEX_SIZE: u64 = 128_000_000;
pub const MAX_STACK_LAYERS: usize = 255;
/// A read-only index is read and checked this many entries (64 KiB) at a time.
const INDEX_CHUNK: u64 = 4096;
/// Writes are split into entries of at most this many bytes.
pub const MAX_IO_SIZE: u64 = 4 << 20;

pub const MAGIC0: [u8; 8] = *b"LSMT\0\x01\x02\0";
pub const MAGIC1: [u8; 16] = [
    0x65, 0x7E, 0x63, 0xD2, 0x94, 0x44, 0x08, 0x4C, 0xA2, 0xD2, 0xC8, 0xEC, 0x4F, 0xCF, 0xAE, 0x8A,
];

pub const FLAG_HEADER: u32 = 1;
pub const FLAG_DATA: u32 = 2;
pub const FLAG_SEALED: u32 = 4;
pub const FLAG_SPARSE: u32 = 0x10;

/// The text of a cleared UUID.
pub const NIL_UUID: &str = "00000000-0000-0000-0000-000000000000";

/// One index entry ("SegmentMapping"): `length` sectors at logical sector `offset` are stored at
/// sector `moffset` of the layer file, or read as zeros when `zeroed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Segment {
    pub offset: u64,
    pub length: u32,
    pub moffset: u64,
    pub zeroed: bool,
    /// Layer position in a merged index (0 = top); 0 in files we write.
    pub tag: u8,
}

impl Segment {
    pub fn end(&self) -> u64 {
        self.offset + self.length as u64
    }
    pub fn mend(&self) -> u64 {
        self.moffset + self.length as u64
    }

    /// The padding entry written after a committed index.
    pub const INVALID_BYTES: [u8; 16] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];

    pub fn encode(&self) -> [u8; 16] {
        let lo = (self.offset & MAX_OFFSET) | ((self.length as u64 & 0x3fff) << 50);
        let hi =
            (self.moffset & MAX_MOFFSET) | ((self.zeroed as u64) << 55) | ((self.tag as u64) << 56);
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&lo.to_le_bytes());
        b[8..].copy_from_slice(&hi.to_le_bytes());
        b
    }

    /// Decodes an entry; `None` for the invalid/padding entry (offset 2^50-1).
    pub fn decode(b: &[u8; 16]) -> Option<Segment> {
        let lo = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
        let hi = u64::from_le_bytes(b[8..].try_into().unwrap_or_default());
        let offset = lo & MAX_OFFSET;
        if offset == MAX_OFFSET {
            return None;
        }
        Some(Segment {
            offset,
            length: (lo >> 50) as u32,
            moffset: hi & MAX_MOFFSET,
            zeroed: (hi >> 55) & 1 == 1,
            tag: (hi >> 56) as u8,
        })
    }

    /// The part of this mapping covering `[start, end)` (which must overlap it). A zeroed
    /// mapping has no data, so its moffset stays put (as upstream's `forward_offset_to`).
    pub fn slice(&self, start: u64, end: u64) -> Segment {
        let s = start.max(self.offset);
        let e = end.min(self.end());
        Segment {
            offset: s,
            length: (e - s) as u32,
            moffset: if self.zeroed {
                self.moffset
            } else {
                self.moffset + (s - self.offset)
            },
            ..*self
        }
    }
}

/// The LSMT header (at 0) or trailer (at the last 4096 bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LsmtHeader {
    pub flags: u32,
    /// Byte offset of the index (index files: 4096).
    pub index_offset: u64,
    /// Number of 16-byte entries (committed files: padding included).
    pub index_size: u64,
    pub virtual_size: u64,
    pub uuid: String,
    pub parent_uuid: String,
    pub version: u8,
    pub sub_version: u8,
    pub user_tag: Vec<u8>,
}

impl LsmtHeader {
    pub fn new(flags: u32, virtual_size: u64, uuid: &str, parent_uuid: &str) -> Self {
        LsmtHeader {
            flags,
            index_offset: 0,
            index_size: 0,
            virtual_size,
            uuid: uuid.to_string(),
            parent_uuid: parent_uuid.to_string(),
            version: 1,
            sub_version: 1,
            user_tag: Vec::new(),
        }
    }

    pub fn is_header(&self) -> bool {
        self.flags & FLAG_HEADER != 0
    }
    pub fn is_data_file(&self) -> bool {
        self.flags & FLAG_DATA != 0
    }
    pub fn is_sealed(&self) -> bool {
        self.flags & FLAG_SEALED != 0
    }
    pub fn is_sparse(&self) -> bool {
        self.flags & FLAG_SPARSE != 0
    }

    /// Parses 4096 (or at least 390) bytes; checks the magic only.
    pub fn decode(b: &[u8], file: &str, at: u64) -> Result<LsmtHeader> {
        if b.len() < STRUCT_SIZE as usize || b[..8] != MAGIC0 || b[8..24] != MAGIC1 {
            return Err(Error::corrupt(
                file,
                at,
                "not an LSMT header/trailer: bad magic",
            ));
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let text = |o: usize, n: usize| {
            let raw = &b[o..o + n];
            let end = raw.iter().position(|&c| c == 0).unwrap_or(n);
            String::from_utf8_lossy(&raw[..end]).into_owned()
        };
        let tag = &b[134..390];
        let tag_end = tag.iter().position(|&c| c == 0).unwrap_or(tag.len());
        Ok(LsmtHeader {
            flags: u32_at(28),
            index_offset: u64_at(32),
            index_size: u64_at(40),
            virtual_size: u64_at(48),
            uuid: text(56, 37),
            parent_uuid: text(93, 37),
            version: b[132],
            sub_version: b[133],
            user_tag: tag[..tag_end].to_vec(),
        })
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE as usize] {
        let mut b = [0u8; HEADER_SIZE as usize];
        b[..8].copy_from_slice(&MAGIC0);
        b[8..24].copy_from_slice(&MAGIC1);
        b[24..28].copy_from_slice(&STRUCT_SIZE.to_le_bytes());
        b[28..32].copy_from_slice(&self.flags.to_le_bytes());
        b[32..40].copy_from_slice(&self.index_offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.index_size.to_le_bytes());
        b[48..56].copy_from_slice(&self.virtual_size.to_le_bytes());
        let put = |b: &mut [u8], o: usize, n: usize, s: &[u8]| {
            let k = s.len().min(n - 1);
            b[o..o + k].copy_from_slice(&s[..k]);
        };
        put(&mut b, 56, 37, self.uuid.as_bytes());
        put(&mut b, 93, 37, self.parent_uuid.as_bytes());
        b[132] = self.version;
        b[133] = self.sub_version;
        let k = self.user_tag.len().min(256);
        b[134..134 + k].copy_from_slice(&self.user_tag[..k]);
        b
    }
}

/// Checks a block-device request: 512-aligned and inside the virtual disk.
pub fn check_io(offset: u64, len: u64, virtual_size: u64) -> Result<()> {
    if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
        return Err(Error::InvalidArgument(format!(
            "unaligned I/O: offset {offset} length {len}"
        )));
    }
    if offset.checked_add(len).is_none_or(|e| e > virtual_size) {
        return Err(Error::InvalidArgument(format!(
            "I/O [{offset}, +{len}) beyond the virtual size {virtual_size}"
        )));
    }
    Ok(())
}

/// Formats 16 bytes as upper-case 8-4-4-4-12 UUID text, as Photon writes it.
pub fn uuid_text(bytes: &[u8; 16]) -> String {
    let h: String = bytes.iter().map(|b| format!("{b:02X}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Parses UUID text (either case, dashes optional) to canonical upper-case text.
pub fn parse_uuid(s: &str) -> Result<String> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32
        || !hex.chars().all(|c| c.is_ascii_hexdigit())
        || s.len() != 36 && s.len() != 32
    {
        return Err(Error::InvalidArgument(format!("not a UUID: {s:?}")));
    }
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| Error::InvalidArgument(format!("not a UUID: {s:?}")))?;
    }
    Ok(uuid_text(&b))
}

/// The UUID upstream's converter derives from a chain ID: its first 32 hex digits.
pub fn uuid_from_chain_id(chain_id: &str) -> Result<String> {
    let hex = chain_id.strip_prefix("sha256:").unwrap_or(chain_id);
    parse_uuid(
        hex.get(..32)
            .ok_or_else(|| Error::InvalidArgument(format!("chain ID too short: {chain_id}")))?,
    )
}

/// A random (v4) UUID for a new writable layer.
pub fn random_uuid() -> String {
    let mut b = [0u8; 16];
    // getrandom(2) via libc keeps the crate free of an RNG dependency.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 16, 0) };
    if n != 16 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = (t ^ ((std::process::id() as u128) << 64)).to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid_text(&b)
}

/// A sealed (read-only) LSMT layer: committed, or a sealed RW data file.
pub struct LsmtFile {
    pub header: LsmtHeader,
    pub trailer: LsmtHeader,
    /// Valid entries, sorted by offset, non-overlapping, tags reset to 0.
    pub segments: Vec<Segment>,
    /// Entries in the index including padding.
    pub index_entries: u64,
    source: Arc<dyn ReadAt>,
}

impl std::fmt::Debug for LsmtFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LsmtFile")
            .field("name", &self.source.name())
            .field("trailer", &self.trailer)
            .field("segments", &self.segments.len())
            .finish()
    }
}

impl LsmtFile {
    /// Opens and validates a sealed layer (spec §1.3–1.4).
    pub fn open(source: Arc<dyn ReadAt>) -> Result<LsmtFile> {
        let name = source.name().to_string();
        let size = source.size();
        if size < 2 * HEADER_SIZE {
            return Err(Error::corrupt(
                &name,
                0,
                format!("too small for an LSMT layer: {size} bytes"),
            ));
        }
        let mut buf = vec![0u8; HEADER_SIZE as usize];
        read_exact_at(&*source, &mut buf, 0)?;
        let header = LsmtHeader::decode(&buf, &name, 0)?;
        if !header.is_header() {
            return Err(Error::corrupt(
                &name,
                28,
                "LSMT header lacks the header flag",
            ));
        }
        let toff = size - HEADER_SIZE;
        read_exact_at(&*source, &mut buf, toff)?;
        let trailer = LsmtHeader::decode(&buf, &name, toff).map_err(|_| {
            Error::corrupt(
                &name,
                toff,
                "no LSMT trailer (layer not sealed, or truncated)",
            )
        })?;
        if trailer.is_header() || !trailer.is_data_file() || !trailer.is_sealed() {
            return Err(Error::corrupt(
                &name,
                toff + 28,
                format!(
                    "LSMT trailer flags {:#x}: expected a sealed data trailer",
                    trailer.flags
                ),
            ));
        }
        if trailer.index_size > MAX_RO_INDEX_SIZE {
            return Err(Error::corrupt(
                &name,
                toff + 40,
                format!(
                    "index size {} exceeds {MAX_RO_INDEX_SIZE}",
                    trailer.index_size
                ),
            ));
        }
        if trailer.index_offset < HEADER_SIZE
            || trailer.index_offset % SECTOR != 0
            || trailer.index_offset > toff
            || trailer.index_size * 16 > toff - trailer.index_offset
        {
            return Err(Error::corrupt(
                &name,
                toff + 32,
                format!(
                    "index ({} entries at offset {}) does not fit before the trailer at {toff}",
                    trailer.index_size, trailer.index_offset
                ),
            ));
        }
        // Read in pieces: memory follows the entries that actually arrive, not the count the
        // trailer claims (a source may claim more bytes than it has).
        let mut segments = Vec::new();
        let mut raw = Vec::new();
        let mut done = 0u64;
        while done < trailer.index_size {
            let n = (trailer.index_size - done).min(INDEX_CHUNK);
            raw.resize(16 * n as usize, 0);
            read_exact_at(&*source, &mut raw, trailer.index_offset + 16 * done).map_err(|e| {
                e.within(format_args!(
                    "index ({} entries at {})",
                    trailer.index_size, trailer.index_offset
                ))
            })?;
            segments.try_reserve(n as usize).map_err(|_| {
                Error::corrupt(
                    &name,
                    toff + 40,
                    format!("no memory for an index of {} entries", trailer.index_size),
                )
            })?;
            validate_index(&raw, done, &name, trailer.index_offset, &mut segments)?;
            done += n;
        }
        segments.shrink_to_fit();
        Ok(LsmtFile {
            index_entries: trailer.index_size,
            header,
            trailer,
            segments,
            source,
        })
    }

    pub fn source(&self) -> &Arc<dyn ReadAt> {
        &self.source
    }

    pub fn virtual_size(&self) -> u64 {
        self.trailer.virtual_size
    }
}

/// Decodes entries `first..` of a committed index onto `out`: drops padding, resets tags,
/// checks order and bounds.
fn validate_index(
    raw: &[u8],
    first: u64,
    name: &str,
    index_offset: u64,
    out: &mut Vec<Segment>,
) -> Result<()> {
    let data_end = index_offset / SECTOR;
    for (k, chunk) in raw.chunks_exact(16).enumerate() {
        let i = first + k as u64;
        let at = index_offset + 16 * i;
        let mut e = [0u8; 16];
        e.copy_from_slice(chunk);
        let Some(mut s) = Segment::decode(&e) else {
            continue;
        };
        s.tag = 0;
        if s.length == 0 {
            continue;
        }
        if let Some(prev) = out.last() {
            if s.offset < prev.end() {
                return Err(Error::corrupt(
                    name,
                    at,
                    format!("index entry {i} (sector {}) is out of order or overlaps the previous one (ends {})", s.offset, prev.end()),
                ));
            }
        }
        let ok = if s.zeroed {
            s.moffset >= HEADER_SECTORS && s.moffset <= data_end
        } else {
            s.moffset >= HEADER_SECTORS && s.mend() <= data_end
        };
        if !ok {
            return Err(Error::corrupt(
                name,
                at,
                format!(
                    "index entry {i} maps sectors [{}, {}) outside the data area [{HEADER_SECTORS}, {data_end})",
                    s.moffset,
                    s.mend()
                ),
            ));
        }
        out.push(s);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_roundtrip_and_spec_example() {
        let raw = [0, 0, 0, 0, 0, 0, 0, 0x84, 0x08, 0, 0, 0, 0, 0, 0, 0];
        let s = Segment::decode(&raw).unwrap();
        assert_eq!(
            (s.offset, s.length, s.moffset, s.zeroed, s.tag),
            (0, 8448, 8, false, 0)
        );
        assert_eq!(s.encode(), raw);
        assert_eq!(Segment::decode(&Segment::INVALID_BYTES), None);
        let z = Segment {
            offset: MAX_OFFSET - 5,
            length: 16383,
            moffset: MAX_MOFFSET,
            zeroed: true,
            tag: 254,
        };
        assert_eq!(Segment::decode(&z.encode()), Some(z));
    }

    #[test]
    fn uuid_forms() {
        assert_eq!(
            uuid_from_chain_id(
                "sha256:01bb4fce3eb1b56b05adf99504dafd31aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            )
            .unwrap(),
            "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31"
        );
        assert!(parse_uuid("zz").is_err());
        let r = random_uuid();
        assert_eq!(parse_uuid(&r).unwrap(), r);
    }
}
