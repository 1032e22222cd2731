//! Committing a layer to the compact read-only form `overlaybd-commit` writes (spec §1.5).

use crate::error::{Error, Result};
use crate::lsmt::{
    LsmtHeader, Segment, FLAG_DATA, FLAG_HEADER, FLAG_SEALED, HEADER_SECTORS, MAX_SEGMENT_LEN,
    SECTOR,
};
use crate::source::{read_exact_at, ReadAt};
use std::io::Write;

/// Data is copied in chunks of this many sectors (32 KiB); each chunk starts as its own entry.
const CHUNK_SECTORS: u64 = 64;
/// The index is padded with invalid entries to a multiple of this many entries (4 KiB).
const INDEX_ALIGN: usize = 256;

/// Identity written into the committed layer's header and trailer.
#[derive(Clone, Debug)]
pub struct CommitInfo {
    pub virtual_size: u64,
    pub uuid: String,
    pub parent_uuid: String,
    pub user_tag: Vec<u8>,
}

/// Writes `segments` (sorted, non-overlapping; data read from `data` at `moffset * 512`) as a
/// committed layer to `out`. Returns the number of bytes written.
pub fn commit_compact(
    segments: &[Segment],
    data: &dyn ReadAt,
    info: &CommitInfo,
    out: &mut dyn Write,
) -> Result<u64> {
    let mut header = LsmtHeader::new(
        FLAG_HEADER | FLAG_DATA | FLAG_SEALED,
        info.virtual_size,
        &info.uuid,
        &info.parent_uuid,
    );
    header.user_tag = info.user_tag.clone();
    let mut w = Counting {
        inner: out,
        written: 0,
    };
    w.put(&header.encode())?;

    let mut pos = HEADER_SECTORS;
    let mut index: Vec<Segment> = Vec::with_capacity(segments.len());
    let mut buf = vec![0u8; (CHUNK_SECTORS * SECTOR) as usize];
    for s in segments {
        if s.zeroed {
            push_merged(
                &mut index,
                Segment {
                    moffset: pos,
                    tag: 0,
                    ..*s
                },
            );
            continue;
        }
        let mut done = 0u64;
        while done < s.length as u64 {
            let n = (s.length as u64 - done).min(CHUNK_SECTORS);
            let b = &mut buf[..(n * SECTOR) as usize];
            read_exact_at(data, b, (s.moffset + done) * SECTOR)?;
            w.put(b)?;
            push_merged(
                &mut index,
                Segment {
                    offset: s.offset + done,
                    length: n as u32,
                    moffset: pos,
                    zeroed: false,
                    tag: 0,
                },
            );
            pos += n;
            done += n;
        }
    }

    let valid = index.len();
    let padded = valid.div_ceil(INDEX_ALIGN).max(1) * INDEX_ALIGN;
    let mut raw = Vec::with_capacity(padded * 16);
    for s in &index {
        raw.extend_from_slice(&s.encode());
    }
    for _ in valid..padded {
        raw.extend_from_slice(&Segment::INVALID_BYTES);
    }
    let index_offset = pos * SECTOR;
    w.put(&raw)?;
    let mut trailer = header.clone();
    trailer.flags = FLAG_DATA | FLAG_SEALED;
    trailer.index_offset = index_offset;
    trailer.index_size = padded as u64;
    w.put(&trailer.encode())?;
    Ok(w.written)
}

/// Appends `s`, merging it into the last entry when both are contiguous in offset and data
/// position, alike, and the sum stays below the maximum length (strictly, as upstream).
fn push_merged(index: &mut Vec<Segment>, s: Segment) {
    if let Some(last) = index.last_mut() {
        if last.end() == s.offset
            && last.mend() == s.moffset
            && last.zeroed == s.zeroed
            && last.tag == s.tag
            && last.length + s.length < MAX_SEGMENT_LEN
        {
            last.length += s.length;
            return;
        }
    }
    index.push(s);
}

struct Counting<'a> {
    inner: &'a mut dyn Write,
    written: u64,
}

impl Counting<'_> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.inner
            .write_all(b)
            .map_err(|e| Error::io("commit output", self.written, e))?;
        self.written += b.len() as u64;
        Ok(())
    }
}
