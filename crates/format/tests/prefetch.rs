//! `ReadAt::prefetch` through a ZFile in a window (a tar wrapper's payload): it asks the source
//! for one range, and that range holds every byte a read of the same span then reads.

use ovbd_format::source::{MemSource, SubSource};
use ovbd_format::zfile::{compress, Algorithm, ZFileOptions, ZFileReader};
use ovbd_format::ReadAt;
use std::io::Cursor;
use std::sync::{Arc, Mutex};

/// A source in memory that notes the ranges read from it and the ranges prefetched.
struct Noting {
    inner: MemSource,
    reads: Mutex<Vec<(u64, u64)>>,
    prefetched: Mutex<Vec<(u64, u64)>>,
}

impl ReadAt for Noting {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let n = self.inner.read_at(buf, offset)?;
        self.reads.lock().unwrap().push((offset, offset + n as u64));
        Ok(n)
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn name(&self) -> &str {
        "noting"
    }
    fn prefetch(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.prefetched.lock().unwrap().push((offset, offset + len));
        Ok(())
    }
}

#[test]
fn a_zfile_prefetch_asks_its_source_for_exactly_the_blocks_a_read_needs() {
    // Compressible, but not uniformly: blocks of different compressed lengths.
    let data: Vec<u8> = (0..(1u64 << 20))
        .map(|i| {
            if (i / 5000) % 3 == 0 {
                (i * 7 % 251) as u8
            } else {
                0
            }
        })
        .collect();
    let mut z = Cursor::new(Vec::new());
    let opts = ZFileOptions {
        algorithm: Algorithm::Lz4,
        block_size: 16384,
    };
    compress(&MemSource::new(data.clone(), "data"), &mut z, opts).unwrap();
    // The ZFile 512 bytes into a blob, as in a tar.
    const BASE: u64 = 512;
    let zlen = z.get_ref().len() as u64;
    let mut blob = vec![0xeeu8; BASE as usize];
    blob.extend_from_slice(z.get_ref());
    blob.extend_from_slice(&[0xee; 1024]);
    let noting = Arc::new(Noting {
        inner: MemSource::new(blob, "blob"),
        reads: Mutex::default(),
        prefetched: Mutex::default(),
    });
    let window = Arc::new(SubSource::new(noting.clone(), BASE, zlen));
    let reader = ZFileReader::open(window).unwrap();

    for &(offset, len) in &[
        (0u64, 1u64),
        (16383, 2),
        (100_000, 70_000),
        ((1 << 20) - 10, 10),
        ((1 << 20) - 10, 1000), // past the end: clipped
        (5, 1 << 20),
    ] {
        noting.reads.lock().unwrap().clear();
        noting.prefetched.lock().unwrap().clear();
        reader.prefetch(offset, len).unwrap();
        let asked = noting.prefetched.lock().unwrap().clone();
        assert_eq!(asked.len(), 1, "one range for {offset}+{len}");
        let (lo, hi) = asked[0];
        assert!(
            BASE <= lo && hi <= BASE + zlen,
            "{lo}..{hi} inside the ZFile"
        );
        let mut buf = vec![0u8; len.min((1 << 20) - offset) as usize];
        reader.read_at(&mut buf, offset).unwrap();
        assert_eq!(buf, data[offset as usize..offset as usize + buf.len()]);
        let reads = noting.reads.lock().unwrap().clone();
        let (rlo, rhi) = reads
            .iter()
            .fold((u64::MAX, 0), |(a, b), &(s, e)| (a.min(s), b.max(e)));
        assert_eq!(
            (lo, hi),
            (rlo, rhi),
            "{offset}+{len}: prefetched what the read read"
        );
    }
    // Nothing to fetch past the end.
    noting.prefetched.lock().unwrap().clear();
    reader.prefetch(1 << 20, 4096).unwrap();
    reader.prefetch(0, 0).unwrap();
    assert!(noting.prefetched.lock().unwrap().is_empty());
}

/// A committed layer of `segments` (disk sectors `(offset, length)`, written one after the other
/// as a compact commit lays them out), read through a [`Noting`] source.
fn noted_layer(segments: &[(u64, u32)]) -> (Arc<Noting>, ovbd_format::LsmtFile) {
    use ovbd_format::commit::{commit_compact, CommitInfo};
    let total: u64 = segments.iter().map(|s| s.1 as u64).sum();
    let data = MemSource::new(vec![7u8; (total * 512) as usize], "data");
    let mut at = 0;
    let segs: Vec<ovbd_format::Segment> = segments
        .iter()
        .map(|&(offset, length)| {
            let s = ovbd_format::Segment {
                offset,
                length,
                moffset: at,
                zeroed: false,
                tag: 0,
            };
            at += length as u64;
            s
        })
        .collect();
    let info = CommitInfo {
        virtual_size: 64 << 20,
        uuid: ovbd_format::lsmt::random_uuid(),
        parent_uuid: ovbd_format::lsmt::NIL_UUID.into(),
        user_tag: Vec::new(),
    };
    let mut out = Vec::new();
    commit_compact(&segs, &data, &info, &mut out).unwrap();
    let noting = Arc::new(Noting {
        inner: MemSource::new(out, "layer"),
        reads: Mutex::default(),
        prefetched: Mutex::default(),
    });
    let layer = ovbd_format::LsmtFile::open(noting.clone()).unwrap();
    (noting, layer)
}

/// `LayerStack::prefetch`: disk ranges far apart whose bytes the layer holds one after the other
/// (or less than 64 KiB apart) are one prefetch of the layer; ranges farther apart in the layer,
/// or in different layers, are one each; holes ask for nothing.
#[test]
fn a_stack_prefetch_merges_what_lies_together_in_a_layer() {
    // In the layer in disk order: 8, 100 (256 sectors), 5000, 7000 (64 sectors), 9000.
    let (bottom, lower) = noted_layer(&[(8, 8), (100, 256), (5000, 8), (7000, 64), (9000, 8)]);
    let (top, upper) = noted_layer(&[(20000, 8)]);
    let stack = ovbd_format::LayerStack::new(vec![lower, upper]).unwrap();
    let prefetched = |n: &Noting| std::mem::take(&mut *n.prefetched.lock().unwrap());
    // 8.. and 100.. are adjacent in the layer: one call of both (1 + 8 sectors).
    stack
        .prefetch(&[(100 * 512, 512), (8 * 512, 4096)])
        .unwrap();
    let p = prefetched(&bottom);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].1 - p[0].0, 9 * 512);
    // 8.. and 5000.. are 128 KiB apart in the layer (100..'s 256 sectors between): two calls.
    stack
        .prefetch(&[(8 * 512, 4096), (5000 * 512, 4096)])
        .unwrap();
    assert_eq!(prefetched(&bottom).len(), 2);
    // 5000.. and 9000.. are 32 KiB apart: one; the top layer's range: one of its own; a hole:
    // none.
    stack
        .prefetch(&[
            (5000 * 512, 4096),
            (9000 * 512, 4096),
            (20000 * 512, 4096),
            (1 << 20, 4096),
        ])
        .unwrap();
    assert_eq!(prefetched(&bottom).len(), 1);
    assert_eq!(prefetched(&top).len(), 1);
}
