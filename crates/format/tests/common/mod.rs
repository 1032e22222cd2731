//! Shared test helpers: fixture paths, hashing, in-memory layers.
#![allow(dead_code)]

use ovbd_format::commit::{commit_compact, CommitInfo};
use ovbd_format::lsmt::{Segment, NIL_UUID};
use ovbd_format::{LsmtFile, MemSource, ReadAt};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Arc;

pub const HELLO_BLOB: &str =
    "hello-world-oci/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d";

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(rel)
}

pub fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

pub fn read_all(src: &dyn ReadAt) -> Vec<u8> {
    let mut v = vec![0u8; src.size() as usize];
    ovbd_format::source::read_exact_at(src, &mut v, 0).expect("read_all");
    v
}

/// The raw ext4_64 ZFile from its tar.gz fixture.
pub fn ext4_64_bytes() -> Vec<u8> {
    let f = std::fs::File::open(fixture("ext4_64.tar.gz")).expect("fixture");
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    for e in ar.entries().expect("tar") {
        let mut e = e.expect("entry");
        if e.path().expect("path").ends_with("ext4_64") {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut v).expect("read");
            return v;
        }
    }
    panic!("ext4_64 not in fixture");
}

/// Builds a committed layer in memory from (sector offset, data-or-zeroed) writes applied in
/// order, later wins. Returns the layer bytes.
pub fn build_layer(vsize: u64, writes: &[(u64, LayerWrite)]) -> Vec<u8> {
    let mut map = ovbd_format::rw::RwIndex::default();
    let mut data = vec![0u8; 4096];
    for (off, w) in writes {
        match w {
            LayerWrite::Data(bytes) => {
                let moffset = data.len() as u64 / 512;
                data.extend_from_slice(bytes);
                map.insert(Segment {
                    offset: *off,
                    length: (bytes.len() / 512) as u32,
                    moffset,
                    zeroed: false,
                    tag: 0,
                });
            }
            LayerWrite::Zero(sectors) => {
                let moffset = data.len() as u64 / 512;
                map.insert(Segment {
                    offset: *off,
                    length: *sectors,
                    moffset,
                    zeroed: true,
                    tag: 0,
                });
            }
        }
    }
    let info = CommitInfo {
        virtual_size: vsize,
        uuid: NIL_UUID.into(),
        parent_uuid: NIL_UUID.into(),
        user_tag: Vec::new(),
    };
    let mut out = Vec::new();
    commit_compact(
        &map.segments(),
        &MemSource::new(data, "data"),
        &info,
        &mut out,
    )
    .expect("commit");
    out
}

pub enum LayerWrite {
    Data(Vec<u8>),
    Zero(u32),
}

pub fn open_mem(bytes: Vec<u8>, name: &str) -> LsmtFile {
    LsmtFile::open(Arc::new(MemSource::new(bytes, name))).expect("open layer")
}

/// A source whose `size()` claims far more than it holds, as a blob whose registry or manifest
/// lies about its length: `head` at 0, `tail` at the claimed end, and nothing in between (reads
/// there find the end of the data, like a truncated download).
pub struct Liar {
    pub head: Vec<u8>,
    pub tail: Vec<u8>,
    pub size: u64,
    pub name: String,
}

impl ReadAt for Liar {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let tail_at = self.size - self.tail.len() as u64;
        let (part, at) = if offset < self.head.len() as u64 {
            (&self.head, offset as usize)
        } else if offset >= tail_at && offset < self.size {
            (&self.tail, (offset - tail_at) as usize)
        } else {
            return Ok(0);
        };
        let n = buf.len().min(part.len() - at);
        buf[..n].copy_from_slice(&part[at..at + n]);
        Ok(n)
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// One TiB: what a lying source claims.
pub const LIAR_SIZE: u64 = 1 << 40;

/// A ZFile header (final index information in the header) claiming a jump table of `entries`
/// 4 KiB blocks at `index_offset`, followed by 4 KiB of bytes: all a liar holds.
pub fn lying_zfile(entries: u64, index_offset: u64, name: &str) -> Liar {
    use ovbd_format::zfile::*;
    let h = ZFileHeader {
        digest: 0,
        flags: FLAG_HEADER | FLAG_DATA | FLAG_HEADER_OVERWRITE | FLAG_DIGEST,
        index_offset,
        index_size: entries,
        original_file_size: entries * 4096,
        index_crc: 0,
        block_size: 4096,
        algo: Algorithm::Lz4.code(),
        level: 0,
        use_dict: 0,
        dict_size: 0,
        verify: true,
    };
    let mut head = h.encode().to_vec();
    head.extend_from_slice(&[0x11; 4096]);
    Liar {
        head,
        tail: Vec::new(),
        size: LIAR_SIZE,
        name: name.into(),
    }
}

/// An LSMT layer whose trailer, at the claimed end, says `entries` index entries start at 4096;
/// the liar holds the header, `index` (the start of the index) and the trailer.
pub fn lying_lsmt(entries: u64, index: &[u8], name: &str) -> Liar {
    use ovbd_format::lsmt::*;
    let mut head = LsmtHeader::new(
        FLAG_HEADER | FLAG_DATA | FLAG_SEALED,
        1 << 30,
        NIL_UUID,
        NIL_UUID,
    )
    .encode()
    .to_vec();
    head.extend_from_slice(index);
    let mut t = LsmtHeader::new(FLAG_DATA | FLAG_SEALED, 1 << 30, NIL_UUID, NIL_UUID);
    t.index_offset = HEADER_SIZE;
    t.index_size = entries;
    Liar {
        head,
        tail: t.encode().to_vec(),
        size: LIAR_SIZE,
        name: name.into(),
    }
}
