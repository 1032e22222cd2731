//! `ImageStack::map_range`: the extents it answers hold exactly the bytes a read returns, for
//! stacks of local layers (bare and tar-wrapped) with overlapping mappings, holes and zeroed
//! ranges, under a writable layer or not; layers it cannot express (ZFile, memory) say so.

mod common;

use common::*;
use ovbd_format::layer::{write_blob, BlobOptions};
use ovbd_format::zfile::ZFileOptions;
use ovbd_format::{open_layer_file, Extent, ImageStack, LayerStack, LsmtFile, RwLayer, RwMode};
use std::os::unix::fs::FileExt;
use std::path::Path;

const VSIZE: u64 = 4 << 20;
const SECTORS: u64 = VSIZE / 512;

/// A small deterministic generator (the ranges must be the same on every run).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A layer of random data and zeroed writes, overlapping each other and the other layers'.
fn random_layer(rng: &mut Rng) -> Vec<u8> {
    let mut writes = Vec::new();
    for _ in 0..24 {
        let sector = rng.below(SECTORS - 300);
        let sectors = 1 + rng.below(256) as u32;
        if rng.below(5) == 0 {
            writes.push((sector, LayerWrite::Zero(sectors)));
        } else {
            let seed = rng.next() as u8;
            let data = (0..sectors as usize * 512)
                .map(|i| seed.wrapping_add((i / 13) as u8) ^ (sector as u8))
                .collect();
            writes.push((sector, LayerWrite::Data(data)));
        }
    }
    build_layer(VSIZE, &writes)
}

/// Writes `lsmt` (bytes of a bare layer) to `dir/name` as a blob: bare, tar-wrapped, or ZFile.
fn layer_file(dir: &Path, name: &str, lsmt: Vec<u8>, tar: bool, zfile: bool) -> LsmtFile {
    let path = dir.join(name);
    if !tar && !zfile {
        std::fs::write(&path, &lsmt).unwrap();
    } else {
        let mut out = std::fs::File::create(&path).unwrap();
        let opts = BlobOptions {
            zfile: zfile.then(ZFileOptions::default),
            tar,
        };
        write_blob(&ovbd_format::MemSource::new(lsmt, name), &mut out, opts).unwrap();
    }
    open_layer_file(&path).unwrap().lsmt
}

/// The bytes `extents` describe, read from their files.
fn gather(extents: &[Extent<'_>]) -> Vec<u8> {
    let mut v = Vec::new();
    for e in extents {
        match *e {
            Extent::Zeros { len } => v.resize(v.len() + len as usize, 0),
            Extent::File { file, offset, len } => {
                let at = v.len();
                v.resize(at + len as usize, 0);
                file.read_exact_at(&mut v[at..], offset).unwrap();
            }
        }
    }
    v
}

/// Maps random ranges (and a few edge ones) of `img` and checks them against reads.
fn check_ranges(img: &ImageStack, rng: &mut Rng) {
    let vsize = img.virtual_size();
    let mut ranges = vec![
        (0, vsize),
        (0, 512),
        (vsize - 512, 512),
        (vsize - (1 << 20), 1 << 20),
    ];
    for _ in 0..300 {
        let len = 512 * (1 + rng.below(2048));
        let offset = 512 * rng.below((vsize - len) / 512 + 1);
        ranges.push((offset, len));
    }
    for (offset, len) in ranges {
        let mut extents = Vec::new();
        assert!(img.map_range(offset, len, &mut extents).unwrap());
        assert_eq!(extents.iter().map(|e| e.len()).sum::<u64>(), len);
        assert!(extents.iter().all(|e| !e.is_empty()));
        // Runs that continue each other come merged.
        for w in extents.windows(2) {
            match (w[0], w[1]) {
                (Extent::Zeros { .. }, Extent::Zeros { .. }) => panic!("unmerged zeros"),
                (
                    Extent::File { file, offset, len },
                    Extent::File {
                        file: f2,
                        offset: o2,
                        ..
                    },
                ) => assert!(!(std::ptr::eq(file, f2) && offset + len == o2), "unmerged"),
                _ => {}
            }
        }
        let mut want = vec![0xa5u8; len as usize];
        img.read(&mut want, offset).unwrap();
        assert!(gather(&extents) == want, "[{offset}, +{len}) differs");
    }
}

#[test]
fn extents_hold_what_reads_return() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Bottom to top: bare, tar-wrapped, bare, tar-wrapped.
    let lowers = |rng: &mut Rng| -> Vec<LsmtFile> {
        (0..4)
            .map(|i| {
                layer_file(
                    dir.path(),
                    &format!("l{i}"),
                    random_layer(rng),
                    i % 2 == 1,
                    false,
                )
            })
            .collect()
    };
    let img = ImageStack::read_only(LayerStack::new(lowers(&mut rng)).unwrap());
    check_ranges(&img, &mut rng);

    // Under a writable layer in each mode: written, discarded and untouched ranges.
    for mode in [RwMode::Append, RwMode::Sparse] {
        let (d, i) = (dir.path().join("up.data"), dir.path().join("up.index"));
        let _ = (std::fs::remove_file(&d), std::fs::remove_file(&i));
        let upper = RwLayer::create(&d, &i, 0, mode, None).unwrap();
        let img =
            ImageStack::writable(Some(LayerStack::new(lowers(&mut rng)).unwrap()), upper).unwrap();
        for k in 0..40u64 {
            // Sparse layers track allocation in 4 KiB blocks.
            let at = 4096 * rng.below(VSIZE / 4096 - 64);
            let len = 4096 * (1 + rng.below(32));
            if k % 4 == 3 {
                img.discard(at, len).unwrap();
            } else {
                img.write(&vec![k as u8 + 1; len as usize], at).unwrap();
            }
        }
        check_ranges(&img, &mut rng);
    }
}

#[test]
fn a_writable_layer_alone_maps_holes_to_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let (d, i) = (dir.path().join("d"), dir.path().join("i"));
    let upper = RwLayer::create(&d, &i, VSIZE, RwMode::Append, None).unwrap();
    let img = ImageStack::writable(None, upper).unwrap();
    img.write(&[7u8; 8192], 1 << 20).unwrap();
    let mut extents = Vec::new();
    assert!(img.map_range(0, 2 << 20, &mut extents).unwrap());
    assert!(matches!(
        extents[..],
        [
            Extent::Zeros { len: 1048576 },
            Extent::File { len: 8192, .. },
            Extent::Zeros { .. }
        ]
    ));
    check_ranges(&img, &mut Rng(7));
}

#[test]
fn layers_not_stored_as_is_are_not_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(42);
    let bottom = random_layer(&mut rng);
    // A ZFile layer over a bare one: ranges reaching its data are refused, the rest mapped.
    let z = layer_file(
        dir.path(),
        "z",
        build_layer(VSIZE, &[(8, LayerWrite::Data(vec![3; 4096]))]),
        true,
        true,
    );
    let bare = layer_file(dir.path(), "bare", bottom.clone(), false, false);
    let img = ImageStack::read_only(LayerStack::new(vec![bare, z]).unwrap());
    let mut extents = Vec::new();
    assert!(!img.map_range(0, 8192, &mut extents).unwrap());
    extents.clear();
    assert!(img.map_range(8192, VSIZE - 8192, &mut extents).unwrap());
    // A layer in memory has no file.
    let img = ImageStack::read_only(LayerStack::new(vec![open_mem(bottom, "mem")]).unwrap());
    let mut extents = Vec::new();
    assert!(!img.map_range(0, VSIZE, &mut extents).unwrap());
    // Bad ranges are errors, as for reads.
    assert!(img.map_range(100, 512, &mut extents).is_err());
    assert!(img.map_range(VSIZE - 512, 1024, &mut extents).is_err());
}
