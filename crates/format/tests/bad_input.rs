//! Bad input: truncated, bit-flipped and absurd layer blobs and writable layers must never panic
//! or hang, and must fail with a typed error that names the source and the offending offset.
//!
//! Every mutated input is opened with `open_layer` and, when that succeeds, the WHOLE virtual
//! disk is read through a `LayerStack` (capped for the 64 GiB hello-world disk), so damage that
//! only shows when data is read is caught too.

use ovbd_format::commit::{commit_compact, CommitInfo};
use ovbd_format::layer::{open_layer, write_blob, BlobOptions};
use ovbd_format::lsmt::{Segment, NIL_UUID};
use ovbd_format::source::read_exact_at;
use ovbd_format::zfile::{Algorithm, ZFileHeader, ZFileOptions, ZFileReader};
use ovbd_format::{Error, FileSource, LayerStack, LsmtFile, MemSource, ReadAt, RwLayer, RwMode};
use std::sync::{Arc, OnceLock};

mod common;

const NAME: &str = "sha256:bad-input-under-test";
const HELLO: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/hello-world-oci/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
);

/// Virtual size of the small test disk.
const VSIZE: u64 = 1 << 20;
/// Reads of a mutated disk stop here (a flipped virtual size may claim exabytes).
const READ_CAP: u64 = 4 << 20;
/// Start of the ZFile inside a PAX-wrapped blob.
const Z: usize = 1536;

// ---------------------------------------------------------------------------------------------
// Building valid inputs

/// A small committed LSMT: 16 mappings (one zeroed), so its index has exactly 16 valid entries
/// followed by padding, and the disk ends in a hole. Returns (layer bytes, expected disk).
fn small_lsmt() -> &'static (Vec<u8>, Vec<u8>) {
    static CELL: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    CELL.get_or_init(|| {
        let mut data = vec![0u8; 4096];
        let mut disk = vec![0u8; VSIZE as usize];
        let mut segs = Vec::new();
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        for i in 0..16u64 {
            let offset = i * 128;
            let length = 8 + 3 * i as u32;
            let moffset = data.len() as u64 / 512;
            let zeroed = i == 7;
            if !zeroed {
                // Partly random, partly repetitive: compressible but never trivially so.
                for s in 0..length as u64 {
                    let mut sector = [0u8; 512];
                    for (j, b) in sector.iter_mut().enumerate() {
                        *b = if j < 96 {
                            rng ^= rng << 13;
                            rng ^= rng >> 7;
                            rng ^= rng << 17;
                            rng as u8
                        } else {
                            (offset + s) as u8 ^ (j as u8)
                        };
                    }
                    data.extend_from_slice(&sector);
                    let at = ((offset + s) * 512) as usize;
                    disk[at..at + 512].copy_from_slice(&sector);
                }
            }
            segs.push(Segment {
                offset,
                length,
                moffset,
                zeroed,
                tag: 0,
            });
        }
        let info = CommitInfo {
            virtual_size: VSIZE,
            uuid: "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31".into(),
            parent_uuid: NIL_UUID.into(),
            user_tag: b"bad input".to_vec(),
        };
        let mut out = Vec::new();
        commit_compact(&segs, &MemSource::new(data, "data"), &info, &mut out).unwrap();
        (out, disk)
    })
}

/// `lsmt` as ZFile(LZ4, 4 KiB) in the PAX tar wrapper, as `overlaybd-commit -z -t` writes it.
fn blob_of(lsmt: &[u8], tar: bool) -> Vec<u8> {
    let mut f = tempfile::tempfile().unwrap();
    let opts = BlobOptions {
        zfile: Some(ZFileOptions {
            algorithm: Algorithm::Lz4,
            block_size: 4096,
        }),
        tar,
    };
    write_blob(&MemSource::new(lsmt.to_vec(), "lsmt"), &mut f, opts).unwrap();
    std::io::Seek::rewind(&mut f).unwrap();
    let mut v = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut v).unwrap();
    v
}

fn small_blob() -> &'static Vec<u8> {
    static CELL: OnceLock<Vec<u8>> = OnceLock::new();
    CELL.get_or_init(|| blob_of(&small_lsmt().0, true))
}

fn hello_blob() -> &'static Vec<u8> {
    static CELL: OnceLock<Vec<u8>> = OnceLock::new();
    CELL.get_or_init(|| std::fs::read(HELLO).unwrap())
}

fn src(bytes: Vec<u8>) -> Arc<dyn ReadAt> {
    Arc::new(MemSource::new(bytes, NAME))
}

/// The ZFile inside a PAX-wrapped blob: (length, index_offset, index_size), read from its header.
fn zfile_layout(blob: &[u8]) -> (usize, usize, usize) {
    let h = ZFileHeader::decode(&blob[Z..Z + 512], "z", 0).unwrap();
    let rec = std::str::from_utf8(&blob[512..540]).unwrap();
    let len: usize = rec
        .split("size=")
        .nth(1)
        .unwrap()
        .split('\n')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (len, h.index_offset as usize, h.index_size as usize)
}

/// Start (relative to the ZFile) of every compressed block, plus the end of the last.
fn block_starts(blob: &[u8]) -> Vec<usize> {
    let (_, ioff, n) = zfile_layout(blob);
    let mut pos = 512;
    let mut v = vec![pos];
    for i in 0..n {
        let at = Z + ioff + 4 * i;
        pos += u32::from_le_bytes(blob[at..at + 4].try_into().unwrap()) as usize;
        v.push(pos);
    }
    v
}

/// Rewrites the ZFile header slot at `at` (blob offset) through `f`, with a fresh digest.
fn patch_zheader(blob: &mut [u8], at: usize, f: impl FnOnce(&mut ZFileHeader)) {
    let mut h = ZFileHeader::decode(&blob[at..at + 512], "z", 0).unwrap();
    f(&mut h);
    blob[at..at + 512].copy_from_slice(&h.encode());
}

/// Recomputes the checksum of the tar header at `at`.
fn fix_tar_checksum(blob: &mut [u8], at: usize) {
    let h = &mut blob[at..at + 512];
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&c| c as u64).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

// ---------------------------------------------------------------------------------------------
// Reading a whole disk

/// Opens `bytes` as a layer blob and reads its whole virtual disk (at most `READ_CAP`).
fn read_disk(bytes: Vec<u8>) -> Result<Vec<u8>, Error> {
    let layer = open_layer(src(bytes))?;
    read_stack(layer.lsmt, READ_CAP)
}

fn read_stack(lsmt: LsmtFile, cap: u64) -> Result<Vec<u8>, Error> {
    let stack = LayerStack::new(vec![lsmt])?;
    let len = stack.virtual_size().min(cap).div_ceil(512) * 512;
    let mut disk = vec![0u8; len as usize];
    // 28 KiB reads: chunk edges fall inside mappings, in holes and past the last mapping.
    for (i, chunk) in disk.chunks_mut(28 << 10).enumerate() {
        stack.read(chunk, i as u64 * (28 << 10))?;
    }
    Ok(disk)
}

/// Every mapped sector of the (64 GiB) hello-world disk, mapping after mapping.
fn read_hello(bytes: Vec<u8>) -> Result<Vec<u8>, Error> {
    let layer = open_layer(src(bytes))?;
    let stack = LayerStack::new(vec![layer.lsmt])?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for s in stack.index().segments().to_vec() {
        let (mut pos, end) = (s.offset * 512, s.end() * 512);
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            stack.read(&mut buf[..n], pos)?;
            out.extend_from_slice(&buf[..n]);
            pos += n as u64;
        }
    }
    Ok(out)
}

fn hello_disk() -> &'static Vec<u8> {
    static CELL: OnceLock<Vec<u8>> = OnceLock::new();
    CELL.get_or_init(|| read_hello(hello_blob().clone()).unwrap())
}

/// Ok with the expected disk, or any error: never a panic, never different content.
/// When it opens, the ZFile under it must also decompress whole to the original LSMT.
fn ok_same_or_err(bytes: Vec<u8>, want: &[u8], what: &str) -> bool {
    match read_disk(bytes.clone()) {
        Ok(d) => {
            assert!(d == want, "{what}: opened but read different content");
            let z = open_layer(src(bytes)).unwrap().zfile.unwrap();
            let mut all = vec![0u8; z.size() as usize];
            read_exact_at(&*z, &mut all, 0).unwrap();
            assert!(all == small_lsmt().0, "{what}: the ZFile reads differently");
            true
        }
        Err(e) => {
            assert!(
                e.to_string().contains(NAME),
                "{what}: error without the name: {e}"
            );
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Asserting errors

#[track_caller]
fn assert_corrupt<T>(r: Result<T, Error>, offset: u64, phrase: &str) {
    let e = match r {
        Ok(_) => panic!("expected a Corrupt error at offset {offset} ({phrase}), got Ok"),
        Err(e) => e,
    };
    let msg = e.to_string();
    match &e {
        Error::Corrupt {
            file,
            offset: at,
            what,
        } => {
            assert_eq!(file, NAME, "{msg}");
            assert_eq!(*at, offset, "wrong offset: {msg}");
            assert!(what.contains(phrase), "message lacks {phrase:?}: {msg}");
        }
        other => panic!("expected Corrupt at {offset} ({phrase}), got {other:?}"),
    }
    assert!(msg.contains(NAME), "{msg}");
    assert!(msg.contains(&format!("(at offset {offset})")), "{msg}");
}

#[track_caller]
fn assert_truncated<T>(r: Result<T, Error>, what: &str) {
    let e = match r {
        Ok(_) => panic!("{what}: a truncated blob opened"),
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(msg.contains(NAME), "{what}: {msg}");
    assert!(
        [
            "truncated",
            "unexpected end",
            "no ZFile trailer",
            "no LSMT trailer",
            "too small"
        ]
        .iter()
        .any(|p| msg.contains(p)),
        "{what}: error does not say the blob is cut short: {msg}"
    );
}

// ---------------------------------------------------------------------------------------------
// Baselines: the valid inputs read back

#[test]
fn valid_inputs_read_back() {
    let (lsmt, disk) = small_lsmt();
    assert_eq!(read_disk(lsmt.clone()).unwrap(), *disk, "raw LSMT");
    assert_eq!(read_disk(small_blob().clone()).unwrap(), *disk, "tar+ZFile");
    assert_eq!(read_disk(blob_of(lsmt, false)).unwrap(), *disk, "ZFile");
    // The ZFile reader on its own, read whole and at odd offsets.
    let z = ZFileReader::open(src(blob_of(lsmt, false))).unwrap();
    assert_eq!(z.size(), lsmt.len() as u64);
    let mut all = vec![0u8; lsmt.len()];
    read_exact_at(&z, &mut all, 0).unwrap();
    assert!(all == *lsmt);
    for (off, n) in [(1u64, 4095usize), (4095, 2), (12_345, 70_000)] {
        let mut b = vec![0u8; n];
        read_exact_at(&z, &mut b, off).unwrap();
        assert!(b == lsmt[off as usize..off as usize + n]);
    }
    let l = open_layer(src(small_blob().clone())).unwrap();
    assert_eq!(l.lsmt.segments.len(), 16);
    assert_eq!(l.lsmt.index_entries, 256);
    let hello = hello_disk();
    let mapped: u64 = l.lsmt.segments.iter().map(|s| s.length as u64 * 512).sum();
    assert!(mapped > 0);
    let h = open_layer(src(hello_blob().clone())).unwrap();
    let hmapped: u64 = h.lsmt.segments.iter().map(|s| s.length as u64 * 512).sum();
    assert_eq!(hello.len() as u64, hmapped);
    assert!(hello.iter().any(|&b| b != 0));
}

// ---------------------------------------------------------------------------------------------
// Truncation

fn truncation_lengths(len: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..len).step_by(512).collect();
    v.extend([
        1, 100, 511, 513, 527, 1023, 1535, 1536, 1537, 2047, 2048, 2049,
    ]);
    v.extend([len - 1, len - 511, len - 512, len - 1024, len - 1025]);
    v.sort_unstable();
    v.dedup();
    v.retain(|&l| l < len);
    v
}

#[test]
fn truncated_small_blob_is_an_error() {
    let blob = small_blob();
    let (zlen, ..) = zfile_layout(blob);
    for n in truncation_lengths(blob.len()) {
        let r = read_disk(blob[..n].to_vec());
        if n >= Z + zlen {
            // Only the tar's zero padding and end blocks are gone: nothing the format reads.
            assert!(r.unwrap() == small_lsmt().1, "cut to {n}");
        } else if n < 512 {
            // Less than one tar header: nothing says it was a tar, so it is just not a layer.
            assert_corrupt(r, 0, "not an OverlayBD layer");
        } else {
            assert_truncated(r, &format!("small blob cut to {n}"));
        }
    }
}

#[test]
fn truncated_raw_zfile_and_raw_lsmt_are_errors() {
    let (lsmt, _) = small_lsmt();
    let z = blob_of(lsmt, false);
    for n in truncation_lengths(z.len()).into_iter().filter(|&n| n >= 40) {
        assert_truncated(read_disk(z[..n].to_vec()), &format!("raw ZFile cut to {n}"));
    }
    // The old layout (trailer holds the index information): the trailer is what goes missing.
    let mut old = z.clone();
    patch_zheader(&mut old, 0, |h| h.flags &= !0x8);
    for n in truncation_lengths(old.len())
        .into_iter()
        .filter(|&n| n >= 1024)
    {
        assert_truncated(
            read_disk(old[..n].to_vec()),
            &format!("old ZFile cut to {n}"),
        );
    }
    for n in truncation_lengths(lsmt.len())
        .into_iter()
        .filter(|&n| n >= 24)
    {
        assert_truncated(
            read_disk(lsmt[..n].to_vec()),
            &format!("raw LSMT cut to {n}"),
        );
    }
}

#[test]
fn truncated_hello_world_blob_is_an_error() {
    let blob = hello_blob();
    let len = blob.len();
    // The payload (639,491 bytes at 1536) ends 1533 bytes before the end of the blob.
    let end = 1536 + 639_491;
    assert_eq!(len - end, 1533);
    let mut lens = vec![512, 1000, 1024, 1536, 2048, 4096, 100_000, 320_000];
    lens.extend([end - 1, end - 512, end - 4096, end - 100_000]);
    for n in lens {
        assert_truncated(read_hello(blob[..n].to_vec()), &format!("hello cut to {n}"));
    }
    // Only the tar's padding and closing zero blocks are gone: nothing the format needs.
    assert!(read_hello(blob[..end].to_vec()).unwrap() == *hello_disk());
}

// ---------------------------------------------------------------------------------------------
// Flipped bytes: tar wrapper

#[test]
fn flipped_tar_headers() {
    let blob = small_blob();
    // PAX header: checksum fails, so the blob is not a tar, and a tar header is not a layer.
    for at in [0usize, 124, 150, 156, 257, 300] {
        let mut b = blob.clone();
        b[at] ^= 0x5a;
        assert_corrupt(read_disk(b), 0, "not an OverlayBD layer");
    }
    // The ustar header after it: the PAX header promised one.
    for at in [1024usize, 1024 + 124, 1024 + 150, 1024 + 257, 1024 + 265] {
        let mut b = blob.clone();
        b[at] ^= 0x5a;
        assert_corrupt(
            read_disk(b),
            1024,
            "no valid tar header after the PAX header",
        );
    }
}

#[test]
fn flipped_pax_size_record() {
    let blob = small_blob();
    let (zlen, ..) = zfile_layout(blob);
    let rec = format!("size={zlen}\n");
    let at = 512 + 3 + "size=".len(); // "NN size=<digits>\n"
    assert_eq!(&blob[515..515 + rec.len()], rec.as_bytes());
    // Larger than the blob.
    let mut b = blob.clone();
    b[at] = b'9';
    assert_corrupt(read_disk(b), 1536, "truncated");
    // A few bytes short: the ZFile's end moves before its jump table.
    let digits = zlen.to_string().len();
    let mut b = blob.clone();
    b[at..at + digits].copy_from_slice((zlen - 11).to_string().as_bytes());
    assert_corrupt(read_disk(b), 40, "does not fit before the trailer");
    // A few bytes long (into the tar's zero tail): the ZFile trailer moves, but with the
    // header overwritten nothing reads it.
    let mut b = blob.clone();
    b[at..at + digits].copy_from_slice((zlen + 11).to_string().as_bytes());
    assert!(read_disk(b).unwrap() == small_lsmt().1);
    // A broken record length: no size record, so the ustar header's size (0) counts.
    let mut b = blob.clone();
    b[512] = b'x';
    assert_corrupt(read_disk(b), 1536, "not an OverlayBD layer");
    // Not a number.
    let mut b = blob.clone();
    b[at + 1] = b'z';
    assert_corrupt(read_disk(b), 1536, "not an OverlayBD layer");
}

// ---------------------------------------------------------------------------------------------
// Flipped bytes: ZFile

#[test]
fn flipped_zfile_header_fails_its_digest() {
    let blob = small_blob();
    for rel in [24usize, 28, 31, 40, 48, 60, 64, 72, 76, 88, 100, 511] {
        let mut b = blob.clone();
        b[Z + rel] ^= 0x01;
        assert_corrupt(read_disk(b), 28, "digest");
    }
    // The magic: then it is no ZFile at all.
    let mut b = blob.clone();
    b[Z + 3] ^= 0x01;
    assert_corrupt(read_disk(b), 1536, "not an OverlayBD layer");
}

#[test]
fn flipped_zfile_trailer() {
    let blob = small_blob();
    let (zlen, ..) = zfile_layout(blob);
    let t = Z + zlen - 512;
    // The header carries the "overwritten" flag: readers never look at the trailer.
    for rel in [0usize, 28, 40, 60, 200] {
        let mut b = blob.clone();
        b[t + rel] ^= 0xff;
        assert!(
            read_disk(b).unwrap() == small_lsmt().1,
            "trailer byte {rel}"
        );
    }
    // Old layout: the trailer holds the index information, so its digest is checked.
    let mut old = blob.clone();
    patch_zheader(&mut old, Z, |h| h.flags &= !0x8);
    assert!(read_disk(old.clone()).unwrap() == small_lsmt().1);
    let toff = (zlen - 512) as u64;
    for rel in [28usize, 40, 48, 60, 72] {
        let mut b = old.clone();
        b[t + rel] ^= 0x01;
        assert_corrupt(read_disk(b), toff + 28, "digest");
    }
    let mut b = old.clone();
    b[t] ^= 0x01;
    assert_corrupt(read_disk(b), toff, "no ZFile trailer");
    // A trailer that says it is a header.
    let mut b = old.clone();
    patch_zheader(&mut b, t, |h| h.flags |= 1);
    assert_corrupt(read_disk(b), toff + 32, "header flag");
}

#[test]
fn flipped_jump_table_fails_its_crc() {
    let blob = small_blob();
    let (_, ioff, n) = zfile_layout(blob);
    for i in [0, 1, n / 2, n - 1] {
        for byte in 0..4 {
            let mut b = blob.clone();
            b[Z + ioff + 4 * i + byte] ^= 0x10;
            assert_corrupt(read_disk(b), 64, "jump table CRC");
        }
    }
}

#[test]
fn flipped_compressed_block_fails_only_its_range() {
    let blob = small_blob();
    let (lsmt, disk) = small_lsmt();
    let starts = block_starts(blob);
    let l = open_layer(src(blob.clone())).unwrap();
    let segs = l.lsmt.segments.clone();
    // Blocks holding data of a mapping (not header, index or trailer, which open reads).
    let data_blocks: Vec<u64> = (1..starts.len() as u64 - 1)
        .filter(|&k| {
            segs.iter().any(|s| {
                !s.zeroed && s.moffset * 512 <= k * 4096 && (k + 1) * 4096 <= s.mend() * 512
            })
        })
        .collect();
    assert!(data_blocks.len() >= 4, "{data_blocks:?}");
    for &k in [
        data_blocks[0],
        data_blocks[data_blocks.len() / 2],
        *data_blocks.last().unwrap(),
    ]
    .iter()
    {
        let (s, e) = (starts[k as usize], starts[k as usize + 1]);
        for at in [s, (s + e) / 2, e - 5, e - 1] {
            let mut b = blob.clone();
            b[Z + at] ^= 0x04;
            let layer = open_layer(src(b)).unwrap();
            // The ZFile itself: reading that block fails its CRC, others read fine.
            let z = layer.zfile.clone().unwrap();
            let mut buf = vec![0u8; 4096];
            match read_exact_at(&*z, &mut buf, k * 4096) {
                Err(Error::BlockCrc {
                    file,
                    block,
                    offset,
                    attempts,
                }) => {
                    assert_eq!((file.as_str(), block, offset), (NAME, k, s as u64));
                    assert_eq!(attempts, 4);
                }
                other => panic!("block {k} byte {at}: expected BlockCrc, got {other:?}"),
            }
            for other in [k - 1, k + 1] {
                read_exact_at(&*z, &mut buf, other * 4096).unwrap();
                let o = (other * 4096) as usize;
                assert_eq!(buf, lsmt[o..o + 4096]);
            }
            // Through the disk: exactly the sectors stored in block k fail.
            let seg = segs
                .iter()
                .find(|s| s.moffset * 512 <= k * 4096 && (k + 1) * 4096 <= s.mend() * 512)
                .unwrap();
            let disk_at = seg.offset * 512 + (k * 4096 - seg.moffset * 512);
            let stack = LayerStack::new(vec![layer.lsmt]).unwrap();
            let mut sector = vec![0u8; 512];
            let msg = match stack.read(&mut sector, disk_at + 1024) {
                Err(e @ Error::BlockCrc { .. }) => e.to_string(),
                other => panic!("disk read over block {k}: expected BlockCrc, got {other:?}"),
            };
            assert!(
                msg.contains(NAME) && msg.contains(&format!("block {k} at offset {s}")),
                "{msg}"
            );
            let mut all = vec![0u8; VSIZE as usize];
            for (i, c) in all.chunks_mut(4096).enumerate() {
                let off = i as u64 * 4096;
                let hit = off < disk_at + 4096 && disk_at < off + 4096;
                match stack.read(c, off) {
                    Ok(()) => {
                        assert!(!hit, "read over the bad block {k} succeeded");
                        assert_eq!(c, &disk[off as usize..off as usize + 4096]);
                    }
                    Err(Error::BlockCrc { block, .. }) => {
                        assert!(hit, "read at {off} failed but does not touch block {k}");
                        assert_eq!(block, k);
                    }
                    Err(e) => panic!("unexpected error at {off}: {e}"),
                }
            }
        }
    }
}

#[test]
fn hello_world_flips() {
    let blob = hello_blob();
    // ZFile header.
    let mut b = blob.clone();
    b[Z + 56] ^= 0x01;
    assert_corrupt(read_hello(b), 28, "digest");
    // Jump table.
    let (_, ioff, _) = zfile_layout(blob);
    let mut b = blob.clone();
    b[Z + ioff + 400] ^= 0x01;
    assert_corrupt(read_hello(b), 64, "jump table CRC");
    // A data block in the middle: reading the disk fails with that block's CRC error.
    let starts = block_starts(blob);
    let k = starts.len() / 2;
    let mut b = blob.clone();
    b[Z + starts[k] + 3] ^= 0x80;
    match read_hello(b) {
        Err(Error::BlockCrc { block, file, .. }) => {
            assert_eq!((block, file.as_str()), (k as u64, NAME))
        }
        other => panic!(
            "expected BlockCrc for block {k}, got {:?}",
            other.map(|_| ())
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Flipped bytes: LSMT (raw, so flips reach the LSMT parser)

#[test]
fn flipped_lsmt_header_magic() {
    let (lsmt, _) = small_lsmt();
    for at in 0..24 {
        let mut b = lsmt.clone();
        b[at] ^= 0x01;
        assert_corrupt(read_disk(b), 0, "not an OverlayBD layer");
    }
    // Magic intact, header flag gone.
    let mut b = lsmt.clone();
    b[28] &= !1;
    assert_corrupt(read_disk(b), 28, "header flag");
}

#[test]
fn flipped_lsmt_trailer() {
    let (lsmt, _) = small_lsmt();
    let toff = lsmt.len() - 4096;
    for at in [0usize, 7, 8, 23] {
        let mut b = lsmt.clone();
        b[toff + at] ^= 0x01;
        assert_corrupt(read_disk(b), toff as u64, "no LSMT trailer");
    }
    // Flags: header bit set, data bit or sealed bit cleared.
    for flip in [1u8, 2, 4] {
        let mut b = lsmt.clone();
        b[toff + 28] ^= flip;
        assert_corrupt(
            read_disk(b),
            toff as u64 + 28,
            "expected a sealed data trailer",
        );
    }
}

fn index_offset(lsmt: &[u8]) -> usize {
    let t = lsmt.len() - 4096 + 32;
    u64::from_le_bytes(lsmt[t..t + 8].try_into().unwrap()) as usize
}

fn put_entry(lsmt: &mut [u8], i: usize, s: &Segment) {
    let at = index_offset(lsmt) + 16 * i;
    lsmt[at..at + 16].copy_from_slice(&s.encode());
}

fn entry(lsmt: &[u8], i: usize) -> Segment {
    let at = index_offset(lsmt) + 16 * i;
    Segment::decode(&lsmt[at..at + 16].try_into().unwrap()).unwrap()
}

#[test]
fn bad_lsmt_index_entries_name_their_offset() {
    let (lsmt, _) = small_lsmt();
    let ioff = index_offset(lsmt);
    let at = |i: usize| (ioff + 16 * i) as u64;
    // Out of order: swap entries 3 and 4 (entry 4 is then behind entry 3).
    let mut b = lsmt.clone();
    let (e3, e4) = (entry(lsmt, 3), entry(lsmt, 4));
    put_entry(&mut b, 3, &e4);
    put_entry(&mut b, 4, &e3);
    assert_corrupt(read_disk(b), at(4), "out of order");
    // Overlapping the previous entry.
    let mut b = lsmt.clone();
    let mut e = entry(lsmt, 5);
    e.offset = entry(lsmt, 4).end() - 1;
    put_entry(&mut b, 5, &e);
    assert_corrupt(read_disk(b), at(5), "overlaps");
    // Data beyond the data area (into the index), before the header, or absurdly far.
    for moffset in [(ioff / 512) as u64 - 1, 0, 7, (1 << 55) - 1] {
        let mut b = lsmt.clone();
        let mut e = entry(lsmt, 9);
        e.moffset = moffset;
        put_entry(&mut b, 9, &e);
        assert_corrupt(read_disk(b), at(9), "outside the data area");
    }
    // A zeroed entry's position must be inside the file too.
    let mut b = lsmt.clone();
    let mut e = entry(lsmt, 7);
    assert!(e.zeroed);
    e.moffset = (ioff / 512) as u64 + 1;
    put_entry(&mut b, 7, &e);
    assert_corrupt(read_disk(b), at(7), "outside the data area");
    // The 16th (last valid) entry after the padding started: still checked.
    let mut b = lsmt.clone();
    let mut e = entry(lsmt, 15);
    e.offset = 0;
    put_entry(&mut b, 20, &e);
    assert_corrupt(read_disk(b), at(20), "out of order");
}

// ---------------------------------------------------------------------------------------------
// Absurd sizes and counts

fn set_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn absurd_lsmt_trailer_fields() {
    let (lsmt, disk) = small_lsmt();
    let toff = lsmt.len() - 4096;
    let t = toff as u64;
    for size in [1u64 << 40, 1_000_001, u64::MAX, 1 << 60] {
        let mut b = lsmt.clone();
        set_u64(&mut b, toff + 40, size);
        assert_corrupt(read_disk(b), t + 40, "exceeds");
    }
    // An index that runs into the trailer.
    let mut b = lsmt.clone();
    set_u64(&mut b, toff + 40, 257);
    assert_corrupt(read_disk(b), t + 32, "does not fit");
    for off in [
        t + 512,
        t + 4096,
        1 << 50,
        u64::MAX - 511,
        100,
        0,
        t - 4096 + 1,
        t - 4096 - 1,
        t - 8192 + 16,
    ] {
        let mut b = lsmt.clone();
        set_u64(&mut b, toff + 32, off);
        assert_corrupt(read_disk(b), t + 32, "does not fit");
    }
    // A huge virtual size is not the parser's business: the disk just reads as holes there.
    let mut b = lsmt.clone();
    set_u64(&mut b, toff + 48, u64::MAX);
    let l = open_layer(src(b)).unwrap();
    assert_eq!(l.lsmt.virtual_size(), u64::MAX);
    let stack = LayerStack::new(vec![l.lsmt]).unwrap();
    let mut head = vec![0u8; VSIZE as usize];
    stack.read(&mut head, 0).unwrap();
    assert!(head == *disk);
    let mut last = vec![1u8; 4096];
    stack
        .read(&mut last, u64::MAX / 4096 * 4096 - 4096)
        .unwrap();
    assert!(last.iter().all(|&c| c == 0));
}

#[test]
fn absurd_zfile_fields() {
    let blob = small_blob();
    let (zlen, ioff, n) = zfile_layout(blob);
    let toff = (zlen - 512) as u64;
    let patched = |f: &dyn Fn(&mut ZFileHeader)| {
        let mut b = blob.clone();
        patch_zheader(&mut b, Z, f);
        read_disk(b)
    };
    for size in [
        u64::MAX,
        1 << 40,
        1_000_000_001,
        n as u64 + 1,
        n as u64 - 1,
        0,
    ] {
        assert_corrupt(patched(&|h| h.index_size = size), 48, "does not match");
    }
    for bs in [0u32, 3, 512, 4095, 4097, 6144, 1 << 17, 1 << 20, u32::MAX] {
        assert_corrupt(patched(&|h| h.block_size = bs), 72, "block size");
    }
    // Original size inconsistent with the block count.
    for size in [
        0u64,
        u64::MAX,
        (n as u64 + 1) * 4096 + 1,
        (n as u64 - 1) * 4096,
    ] {
        assert_corrupt(
            patched(&|h| h.original_file_size = size),
            48,
            "does not match",
        );
    }
    // Consistent block count, wrong length: the last block decompresses to the wrong size, or
    // the LSMT's trailer is not where the size says.
    let r = patched(&|h| h.original_file_size -= 1);
    assert!(r.is_err());
    // Both moved together, so the table no longer fits.
    assert_corrupt(
        patched(&|h| {
            h.index_size = 1 << 28;
            h.original_file_size = (1u64 << 28) * 4096;
        }),
        40,
        "does not fit",
    );
    for off in [
        0u64,
        511,
        toff - 4 * n as u64 + 1,
        toff,
        u64::MAX,
        u64::MAX - 3,
    ] {
        assert_corrupt(patched(&|h| h.index_offset = off), 40, "");
    }
    assert_corrupt(
        patched(&|h| h.index_offset = ioff as u64 - 1),
        64,
        "jump table CRC",
    );
    assert!(matches!(
        patched(&|h| h.algo = 0),
        Err(Error::Unsupported { .. })
    ));
    assert_corrupt(patched(&|h| h.algo = 9), 76, "algorithm");
    assert!(matches!(
        patched(&|h| h.dict_size = 1 << 30),
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(
        patched(&|h| h.flags |= 0x20),
        Err(Error::Unsupported { .. })
    ));
    assert_corrupt(patched(&|h| h.flags &= !1), 1536, "not an OverlayBD layer");
}

/// Sets jump-table entry `i` to `len` and re-seals the header's table CRC and digest.
fn with_jump_entry(blob: &[u8], i: usize, len: u32) -> Vec<u8> {
    let (_, ioff, n) = zfile_layout(blob);
    let mut b = blob.to_vec();
    let at = Z + ioff + 4 * i;
    b[at..at + 4].copy_from_slice(&len.to_le_bytes());
    let crc = ovbd_format::crc::crc32c_raw(0, &b[Z + ioff..Z + ioff + 4 * n]);
    patch_zheader(&mut b, Z, |h| h.index_crc = crc);
    b
}

#[test]
fn absurd_jump_table_entries() {
    let blob = small_blob();
    let (_, ioff, n) = zfile_layout(blob);
    for i in [0, n / 2, n - 1] {
        let at = (ioff + 4 * i) as u64;
        for len in [0u32, 1, 4, 4096 + 64, 70_000, u32::MAX] {
            assert_corrupt(read_disk(with_jump_entry(blob, i, len)), at, "outside");
        }
    }
    // Every entry at the maximum: the blocks then run past the jump table.
    let mut b = blob.clone();
    for i in 0..n {
        b = with_jump_entry(&b, i, 4096 + 16 + 4);
    }
    assert_corrupt(read_disk(b), 40, "past the jump table");
    // Valid lengths that shift block boundaries: a block CRC fails when the data is read.
    let starts = block_starts(blob);
    let mut b = with_jump_entry(blob, n / 2, (starts[n / 2 + 1] - starts[n / 2] + 1) as u32);
    b = with_jump_entry(
        &b,
        n / 2 + 1,
        (starts[n / 2 + 2] - starts[n / 2 + 1] - 1) as u32,
    );
    assert!(matches!(read_disk(b), Err(Error::BlockCrc { .. })));
}

/// A ustar-only (Go `archive/tar`) wrapper around the ZFile, with `size` as the 12-byte field.
fn ustar_blob(size: &[u8; 12]) -> Vec<u8> {
    let blob = small_blob();
    let mut b = blob[1024..].to_vec();
    b[124..136].copy_from_slice(size);
    fix_tar_checksum(&mut b, 0);
    b
}

#[test]
fn absurd_tar_sizes() {
    let blob = small_blob();
    let (zlen, ..) = zfile_layout(blob);
    // The plain ustar form with the right size opens.
    let ok = ustar_blob(format!("{zlen:011o}\0").as_bytes().try_into().unwrap());
    assert!(read_disk(ok).unwrap() == small_lsmt().1);
    // Base-256 sizes: beyond the blob, beyond u64.
    let mut huge = [0xffu8; 12];
    huge[0] = 0x80;
    huge[1..4].fill(0);
    assert_corrupt(read_disk(ustar_blob(&huge)), 512, "truncated");
    assert_corrupt(read_disk(ustar_blob(&[0xff; 12])), 124, "not a number");
    let mut one_more = [0u8; 12];
    one_more[0] = 0x80;
    one_more[4..].copy_from_slice(&(zlen as u64 + 2048).to_be_bytes());
    assert_corrupt(read_disk(ustar_blob(&one_more)), 512, "truncated");
    assert_corrupt(read_disk(ustar_blob(b"77777777777\0")), 512, "truncated");
    assert_corrupt(
        read_disk(ustar_blob(b"9\0\0\0\0\0\0\0\0\0\0\0")),
        124,
        "not a number",
    );
    // The PAX header's own size field.
    let mut b = blob.clone();
    b[124..136].copy_from_slice(&huge);
    fix_tar_checksum(&mut b, 0);
    assert_corrupt(read_disk(b), 124, "too large");
    // A PAX size record far beyond the blob (and beyond u64).
    for rec in [
        "29 size=18446744073709551615\n",
        "29 size=99999999999999999999\n",
    ] {
        assert_eq!(rec.len(), 29);
        let mut b = blob.clone();
        b[512..1024].fill(0);
        b[512..512 + rec.len()].copy_from_slice(rec.as_bytes());
        b[124..136].copy_from_slice(format!("{:011o} ", rec.len()).as_bytes());
        fix_tar_checksum(&mut b, 0);
        let e = read_disk(b);
        if rec.contains("1844") {
            assert_corrupt(e, 1536, "truncated");
        } else {
            // Not a u64: no size record, so the ustar header's 0 counts.
            assert_corrupt(e, 1536, "not an OverlayBD layer");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sweeps: every single-byte flip of the ends of a blob

#[test]
fn every_flip_in_first_and_last_2k_of_small_blob() {
    let blob = small_blob();
    let want = &small_lsmt().1;
    let len = blob.len();
    let (zlen, ..) = zfile_layout(blob);
    let trailer = Z + zlen - 512..Z + zlen;
    let pax_len = format!("size={zlen}\n").len() + 3;
    let digits = 512 + pax_len - 1 - zlen.to_string().len()..512 + pax_len - 1;
    let mut harmless = Vec::new();
    for at in (0..2048).chain(len - 2048..len) {
        for flip in [0xffu8, 0x01] {
            let mut b = blob.clone();
            b[at] ^= flip;
            let size_digit = if digits.contains(&at) {
                std::str::from_utf8(&b[digits.clone()])
                    .ok()
                    .and_then(|t| t.parse().ok())
            } else {
                None
            };
            if !ok_same_or_err(b, want, &format!("flip {flip:#x} at {at}")) {
                continue;
            }
            harmless.push(at);
            // Only bytes the format ignores may flip harmlessly: the NUL ending the tar
            // checksums' text, the PAX data block's padding, the tar's zero tail and the
            // (unread, as the header is overwritten) ZFile trailer.
            let ignored = at == 155
                || at == 1024 + 155
                || (512 + pax_len..1024).contains(&at)
                || at >= trailer.start
                // "15 size=..\n" read as "14 ..": the record loses its newline, tolerated.
                || (at == 513 && flip == 1 && pax_len == 15)
                // A PAX size grown into the tar's zero tail only moves the unread trailer.
                || size_digit.is_some_and(|n: usize| n > zlen && Z + n <= len);
            assert!(
                ignored,
                "flip {flip:#x} at {at} was harmless (trailer {trailer:?})"
            );
        }
    }
    assert!(harmless.contains(&(len - 1)) && harmless.contains(&trailer.start));
}

#[test]
fn every_flip_in_raw_lsmt_metadata_never_panics() {
    // A raw LSMT has no checksums: flips may change what the disk reads, but must not panic.
    let (lsmt, disk) = small_lsmt();
    let ioff = index_offset(lsmt);
    let toff = lsmt.len() - 4096;
    let ranges = [0..400, ioff..ioff + 16 * 18, toff..toff + 400];
    for at in ranges.into_iter().flatten() {
        for flip in [0xffu8, 0x01, 0x80] {
            let mut b = lsmt.clone();
            b[at] ^= flip;
            match read_disk(b) {
                Ok(d) => {
                    // Flips of the trailer's vsize change the disk size; everything else that
                    // opens keeps the mapped data at or under the first MiB.
                    assert!(d.len() as u64 <= READ_CAP);
                    if at < 400 && !(0..24).contains(&at) && at != 28 {
                        assert!(
                            d == *disk,
                            "header byte {at} (ignored by readers) changed the disk"
                        );
                    }
                }
                Err(e) => assert!(e.to_string().contains(NAME), "{e}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writable layers

fn rw_pair(dir: &std::path::Path, mode: RwMode) -> (std::path::PathBuf, std::path::PathBuf) {
    let d = dir.join(format!("{mode:?}.data"));
    let i = dir.join(format!("{mode:?}.index"));
    let l = RwLayer::create(&d, &i, VSIZE, mode, None).unwrap();
    l.write(&[7u8; 8192], 4096).unwrap();
    l.write(&[9u8; 1024], 0).unwrap();
    l.discard(65536, 4096).unwrap();
    l.flush().unwrap();
    drop(l);
    (d, i)
}

#[track_caller]
fn assert_rw_corrupt(
    d: &std::path::Path,
    i: &std::path::Path,
    file: &std::path::Path,
    offset: u64,
    phrase: &str,
) {
    let name = file.display().to_string();
    match RwLayer::open(d, i) {
        Ok(_) => panic!("expected Corrupt in {name} at {offset} ({phrase}), got Ok"),
        Err(Error::Corrupt {
            file: f,
            offset: at,
            what,
        }) => {
            assert_eq!(f, name);
            assert_eq!(at, offset, "{what}");
            assert!(what.contains(phrase), "{what}");
        }
        Err(e) => panic!("expected Corrupt in {name} at {offset} ({phrase}), got {e:?}"),
    }
}

fn with_file(path: &std::path::Path, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let orig = std::fs::read(path).unwrap();
    let mut b = orig.clone();
    f(&mut b);
    std::fs::write(path, &b).unwrap();
    orig
}

#[test]
fn garbled_rw_layers_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [RwMode::Append, RwMode::Sparse] {
        let (d, i) = rw_pair(dir.path(), mode);
        RwLayer::open(&d, &i).unwrap();
        let restore = |p: &std::path::Path, orig: Vec<u8>| std::fs::write(p, orig).unwrap();

        // Index and data files cut short of their header.
        for n in [0usize, 1, 100, 4095] {
            let o = with_file(&i, |b| b.truncate(n));
            let r = RwLayer::open(&d, &i);
            let msg = r.err().unwrap().to_string();
            assert!(
                msg.contains(&i.display().to_string()) && msg.contains("unexpected end"),
                "{msg}"
            );
            restore(&i, o);
            let o = with_file(&d, |b| b.truncate(n));
            let msg = RwLayer::open(&d, &i).err().unwrap().to_string();
            assert!(
                msg.contains(&d.display().to_string()) && msg.contains("unexpected end"),
                "{msg}"
            );
            restore(&d, o);
        }
        // Bad magic, wrong flags.
        let o = with_file(&i, |b| b[5] ^= 1);
        assert_rw_corrupt(&d, &i, &i, 0, "bad magic");
        restore(&i, o);
        let o = with_file(&d, |b| b[20] ^= 1);
        assert_rw_corrupt(&d, &i, &d, 0, "bad magic");
        restore(&d, o);
        for flags in [0u8, 2, 3, 5] {
            let o = with_file(&i, |b| b[28] = flags);
            assert_rw_corrupt(&d, &i, &i, 28, "not an RW index file");
            restore(&i, o);
        }
        let o = with_file(&i, |b| b[32] = 1);
        assert_rw_corrupt(&d, &i, &i, 28, "not an RW index file");
        restore(&i, o);
        for flags in [1u8, 2, 7, 0x17] {
            let o = with_file(&d, |b| b[28] = flags);
            assert_rw_corrupt(&d, &i, &d, 28, "");
            restore(&d, o);
        }
        // An absurd virtual size in the data header.
        for vsize in [u64::MAX, u64::MAX - 4095, 1 << 63] {
            let o = with_file(&d, |b| set_u64(b, 48, vsize));
            assert_rw_corrupt(&d, &i, &d, 48, "virtual size");
            restore(&d, o);
        }
        RwLayer::open(&d, &i).unwrap();
    }

    // Append mode only: the index replay.
    let (d, i) = (
        dir.path().join("Append.data"),
        dir.path().join("Append.index"),
    );
    let dsize = std::fs::metadata(&d).unwrap().len();
    let o = with_file(&d, |b| b.truncate(b.len() - 100));
    assert_rw_corrupt(&d, &i, &d, dsize - 100, "multiple of 512");
    std::fs::write(&d, o).unwrap();
    // Data cut by whole sectors: the last write's entry now points past the end.
    let o = with_file(&d, |b| b.truncate(b.len() - 512));
    assert_rw_corrupt(&d, &i, &i, 4096 + 16, "beyond the data file");
    std::fs::write(&d, o).unwrap();
    for (field, v) in [(8usize, 0u64), (8, 7), (8, 1 << 54)] {
        let o = with_file(&i, |b| set_u64(b, 4096 + field, v));
        assert_rw_corrupt(&d, &i, &i, 4096, "beyond the data file");
        std::fs::write(&i, o).unwrap();
    }
    // A torn last entry is ignored (its write never completed); garbage entries never panic.
    let o = with_file(&i, |b| b.extend_from_slice(&[0xab; 9]));
    RwLayer::open(&d, &i).unwrap();
    std::fs::write(&i, &o).unwrap();
    for at in 4096..o.len() {
        for flip in [0xffu8, 0x01, 0x80] {
            let mut b = o.clone();
            b[at] ^= flip;
            std::fs::write(&i, &b).unwrap();
            if let Err(e) = RwLayer::open(&d, &i) {
                assert!(e.to_string().contains(&i.display().to_string()), "{e}");
            }
        }
    }
    std::fs::write(&i, &o).unwrap();
    RwLayer::open(&d, &i).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Regressions from the fuzz targets (fuzz/)

/// fuzz/rw_index: a write inside a discarded range cut the zeroed entry and moved the cut-off
/// tail's moffset forward as if it had data, past the end of the data file. Sealing then wrote
/// an index the read-only loader rejects ("maps sectors [..] outside the data area"). Upstream
/// never moves a zeroed mapping's moffset when trimming it.
#[test]
fn rw_write_inside_a_discard_seals_to_an_openable_layer() {
    let dir = tempfile::tempdir().unwrap();
    for reopen in [false, true] {
        let d = dir.path().join(format!("data-{reopen}"));
        let i = dir.path().join(format!("index-{reopen}"));
        let l = RwLayer::create(&d, &i, VSIZE, RwMode::Append, None).unwrap();
        l.discard(0, 8192).unwrap();
        l.write(&[0x42; 512], 5120).unwrap();
        let l = if reopen {
            drop(l);
            RwLayer::open(&d, &i).unwrap()
        } else {
            l
        };
        let segs = l.segments();
        assert_eq!(segs.len(), 3, "{segs:?}");
        for s in segs.iter().filter(|s| s.zeroed) {
            assert_eq!(s.moffset, 8, "a zeroed mapping moved: {segs:?}");
        }
        l.seal().unwrap();
        let sealed = LsmtFile::open(Arc::new(FileSource::open(&d).unwrap())).unwrap();
        let stack = LayerStack::new(vec![sealed]).unwrap();
        let mut got = vec![1u8; 16384];
        stack.read(&mut got, 0).unwrap();
        let mut want = vec![0u8; 16384];
        want[5120..5632].fill(0x42);
        assert!(got == want, "reopen={reopen}");
    }
}

// ---------------------------------------------------------------------------------------------
// Sources that claim more than they hold (a registry or manifest lying about a blob's length)

/// A ZFile whose jump table the source claims to hold (1 TiB) but does not: the table is read
/// as it arrives, so the error comes at the table and names it (tests/alloc_limits.rs checks
/// that nothing sized by the claim is allocated first).
#[test]
fn lying_source_zfile_jump_table() {
    // At the limit (2^28 entries: 1 TiB of 4 KiB blocks), placed where its blocks fit.
    let at = 1u64 << 39;
    let liar: Arc<dyn ReadAt> = Arc::new(common::lying_zfile(1 << 28, at, NAME));
    assert_corrupt(ZFileReader::open(liar.clone()), at, "jump table");
    assert_corrupt(open_layer(liar), at, "jump table");
    // Past the limit: refused from the header alone.
    for n in [(1u64 << 28) + 1, 1_000_000_000] {
        let liar = Arc::new(common::lying_zfile(n, 512, NAME));
        assert_corrupt(ZFileReader::open(liar), 48, "exceeds");
    }
    // More blocks than fit between the header and the table, even at 5 bytes each.
    let liar = Arc::new(common::lying_zfile(1 << 20, 512 + 5 * (1 << 20) - 1, NAME));
    assert_corrupt(ZFileReader::open(liar), 48, "do not fit");
}

/// An LSMT index the source claims to hold but does not: the error comes where its data ends
/// and names the index.
#[test]
fn lying_source_lsmt_index() {
    let liar: Arc<dyn ReadAt> = Arc::new(common::lying_lsmt(1_000_000, &[], NAME));
    assert_corrupt(LsmtFile::open(liar.clone()), 4096, "index");
    assert_corrupt(open_layer(liar), 4096, "index");
    // The first 300 entries are there (valid, zeroed): the error is at the 301st.
    let mut held = Vec::new();
    for i in 0..300u64 {
        let s = Segment {
            offset: i * 16,
            length: 8,
            moffset: 8,
            zeroed: true,
            tag: 0,
        };
        held.extend_from_slice(&s.encode());
    }
    let liar = Arc::new(common::lying_lsmt(1_000_000, &held, NAME));
    assert_corrupt(LsmtFile::open(liar), 4096 + 300 * 16, "index");
}
