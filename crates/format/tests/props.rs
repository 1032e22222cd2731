//! Property tests: random operations checked against an in-memory model disk.

mod common;

use common::*;
use ovbd_format::commit::{commit_compact, CommitInfo};
use ovbd_format::layer::{unwrap, write_blob, BlobOptions};
use ovbd_format::lsmt::NIL_UUID;
use ovbd_format::zfile::{Algorithm, ZFileOptions};
use ovbd_format::{Blocking, ImageStack, LayerStack, LsmtFile, MemSource, ReadAt, RwLayer, RwMode};

use proptest::prelude::*;
use std::sync::Arc;

const VSIZE: u64 = 1 << 20;
const SECTORS: u64 = VSIZE / 512;

#[derive(Clone, Debug)]
enum Op {
    Write { sector: u64, sectors: u64, seed: u8 },
    Discard { sector: u64, sectors: u64 },
    WriteZeroes { sector: u64, sectors: u64 },
    Flush,
    Reopen,
}

/// Ops on `align`-sector boundaries (sparse layers track allocation in filesystem blocks).
fn ops(align: u64, max: usize) -> impl Strategy<Value = Vec<Op>> {
    let units = SECTORS / align;
    let range = (0..units, 1..=(64 / align).max(1)).prop_map(move |(u, n)| {
        let n = n.min(units - u);
        (u * align, n * align)
    });
    let op = prop_oneof![
        6 => (range.clone(), any::<u8>()).prop_map(|((sector, sectors), seed)| Op::Write { sector, sectors, seed }),
        2 => range.clone().prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        1 => range.prop_map(|(sector, sectors)| Op::WriteZeroes { sector, sectors }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ];
    prop::collection::vec(op, 1..max)
}

fn pattern(seed: u8, sector: u64, sectors: u64) -> Vec<u8> {
    (0..sectors * 512)
        .map(|i| seed.wrapping_add((i / 7) as u8).wrapping_mul(31) ^ (sector as u8))
        .collect()
}

fn read_stack(img: &ImageStack) -> Vec<u8> {
    let mut v = vec![0u8; img.virtual_size() as usize];
    // Odd-sized chunks cross mapping edges.
    for (i, c) in v.chunks_mut(512 * 37).enumerate() {
        img.read(c, (i * 512 * 37) as u64).unwrap();
    }
    v
}

fn read_lower(s: &LayerStack) -> Vec<u8> {
    let mut v = vec![0u8; s.virtual_size() as usize];
    for (i, c) in v.chunks_mut(512 * 29).enumerate() {
        s.read(c, (i * 512 * 29) as u64).unwrap();
    }
    v
}

/// A random lower layer (or none) the writable layer is stacked on.
fn lower_image(seed: u8, present: bool) -> (Option<LayerStack>, Vec<u8>) {
    if !present {
        return (None, vec![0u8; VSIZE as usize]);
    }
    let mut model = vec![0u8; VSIZE as usize];
    let mut writes = Vec::new();
    for k in 0..8u64 {
        let sector = (k * 211 + seed as u64 * 13) % (SECTORS - 64);
        let data = pattern(seed ^ k as u8, sector, 48);
        model[(sector * 512) as usize..][..data.len()].copy_from_slice(&data);
        writes.push((sector, LayerWrite::Data(data)));
    }
    let layer = open_mem(build_layer(VSIZE, &writes), "lower");
    (Some(LayerStack::new(vec![layer]).unwrap()), model)
}

fn run_rw_model(mode: RwMode, with_lower: bool, lower_seed: u8, ops: &[Op]) {
    let dir = tempfile::tempdir().unwrap();
    let (dpath, ipath) = (dir.path().join("data"), dir.path().join("index"));
    let vsize = if with_lower { 0 } else { VSIZE };
    let (lower, lower_model) = lower_image(lower_seed, with_lower);
    let upper = RwLayer::create(&dpath, &ipath, vsize, mode, None).unwrap();
    let mut img = ImageStack::writable(lower, upper).unwrap();
    assert_eq!(img.virtual_size(), VSIZE);
    let mut model = lower_model.clone();
    for op in ops {
        match *op {
            Op::Write {
                sector,
                sectors,
                seed,
            } => {
                let d = pattern(seed, sector, sectors);
                img.write(&d, sector * 512).unwrap();
                model[(sector * 512) as usize..][..d.len()].copy_from_slice(&d);
            }
            Op::Discard { sector, sectors } => {
                img.discard(sector * 512, sectors * 512).unwrap();
                let r = (sector * 512) as usize..((sector + sectors) * 512) as usize;
                match mode {
                    // Append mode records zeroed entries; sparse mode punches a hole, which
                    // shows the lower layer again.
                    RwMode::Append => model[r].fill(0),
                    RwMode::Sparse => model[r.clone()].copy_from_slice(&lower_model[r]),
                }
            }
            Op::WriteZeroes { sector, sectors } => {
                img.write_zeroes(sector * 512, sectors * 512).unwrap();
                model[(sector * 512) as usize..((sector + sectors) * 512) as usize].fill(0);
            }
            Op::Flush => img.flush().unwrap(),
            Op::Reopen => {
                let lower = img
                    .lower()
                    .is_some()
                    .then(|| lower_image(lower_seed, true).0.unwrap());
                drop(img);
                let upper = RwLayer::open(&dpath, &ipath).unwrap();
                img = ImageStack::writable(lower, upper).unwrap();
            }
        }
    }
    assert!(
        read_stack(&img) == model,
        "read-back differs from the model"
    );

    // Commit the upper alone, stack it on the lower again: same disk.
    let upper = img.into_upper().unwrap();
    let info = CommitInfo {
        virtual_size: upper.virtual_size(),
        uuid: NIL_UUID.into(),
        parent_uuid: upper.parent_uuid(),
        user_tag: vec![],
    };
    let mut committed = Vec::new();
    commit_compact(
        &upper.segments(),
        &*upper.data_source().unwrap(),
        &info,
        &mut committed,
    )
    .unwrap();
    let committed_layer = open_mem(committed, "committed");
    assert!(committed_layer.segments.iter().all(|s| s.length < 16383));
    let mut lowers = Vec::new();
    if with_lower {
        lowers.push(lower_layer_file(lower_seed));
    }
    lowers.push(committed_layer);
    assert!(
        read_lower(&LayerStack::new(lowers).unwrap()) == model,
        "committed stack differs"
    );

    // Seal in place: the data file becomes a read-only layer.
    upper.seal().unwrap();
    let sealed = LsmtFile::open(Arc::new(ovbd_format::FileSource::open(&dpath).unwrap())).unwrap();
    let mut lowers = Vec::new();
    if with_lower {
        lowers.push(lower_layer_file(lower_seed));
    }
    lowers.push(sealed);
    assert!(
        read_lower(&LayerStack::new(lowers).unwrap()) == model,
        "sealed stack differs"
    );
}

fn lower_layer_file(seed: u8) -> LsmtFile {
    let mut writes = Vec::new();
    for k in 0..8u64 {
        let sector = (k * 211 + seed as u64 * 13) % (SECTORS - 64);
        writes.push((
            sector,
            LayerWrite::Data(pattern(seed ^ k as u8, sector, 48)),
        ));
    }
    open_mem(build_layer(VSIZE, &writes), "lower")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn append_layer_matches_model(ops in ops(1, 60), lower in any::<bool>(), seed in any::<u8>()) {
        run_rw_model(RwMode::Append, lower, seed, &ops);
    }

    #[test]
    fn sparse_layer_matches_model(ops in ops(8, 60), lower in any::<bool>(), seed in any::<u8>()) {
        run_rw_model(RwMode::Sparse, lower, seed, &ops);
    }
}

/// One random layer: writes and zeroed ranges at sector granularity.
fn layer_writes() -> impl Strategy<Value = Vec<(u64, u64, Option<u8>)>> {
    prop::collection::vec(
        (
            0..SECTORS - 1,
            1u64..40,
            prop::option::weighted(0.8, any::<u8>()),
        ),
        0..6,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn stacks_match_model(layers in prop::collection::vec((layer_writes(), any::<bool>()), 1..=255)) {
        let mut model = vec![0u8; VSIZE as usize];
        let mut files = Vec::new();
        for (i, (writes, zero_vsize)) in layers.iter().enumerate() {
            let mut ws = Vec::new();
            for &(sector, n, seed) in writes {
                let n = n.min(SECTORS - sector);
                let r = (sector * 512) as usize..((sector + n) * 512) as usize;
                match seed {
                    Some(seed) => {
                        let d = pattern(seed, sector, n);
                        model[r].copy_from_slice(&d);
                        ws.push((sector, LayerWrite::Data(d)));
                    }
                    None => {
                        model[r].fill(0);
                        ws.push((sector, LayerWrite::Zero(n as u32)));
                    }
                }
            }
            // Upper layers may carry vsize 0: the topmost non-zero one counts.
            let vsize = if i > 0 && *zero_vsize { 0 } else { VSIZE };
            files.push(open_mem(build_layer(vsize, &ws), &format!("layer{i}")));
        }
        let stack = LayerStack::new(files).unwrap();
        prop_assert_eq!(stack.virtual_size(), VSIZE);
        let segs = stack.index().segments();
        prop_assert!(segs.windows(2).all(|w| w[0].end() <= w[1].offset));
        prop_assert!(read_lower(&stack) == model);
        for s in (0..SECTORS).step_by(17) {
            let hit = stack.index().lookup(s);
            let want = segs.iter().find(|x| x.offset <= s && s < x.end());
            prop_assert_eq!(hit, want);
        }
    }
}

#[test]
fn too_many_layers_is_an_error() {
    let files: Vec<_> = (0..256)
        .map(|i| open_mem(build_layer(VSIZE, &[]), &format!("l{i}")))
        .collect();
    assert!(LayerStack::new(files).is_err());
}

fn compressible(len: usize, seed: u8) -> Vec<u8> {
    let mut x = seed as u32 | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            // Runs of repeated bytes mixed with noise.
            if (i / 300) % 3 == 0 {
                (x >> 24) as u8
            } else {
                (i / 1000) as u8
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn zfile_roundtrips_for_every_codec_and_block_size(
        len in 0usize..300_000,
        seed in any::<u8>(),
        tar in any::<bool>(),
        reads in prop::collection::vec((0usize..300_000, 0usize..70_000), 1..20),
    ) {
        let data = compressible(len, seed);
        for algorithm in [Algorithm::Lz4, Algorithm::Zstd] {
            for block_size in [4096u32, 8192, 16384, 32768, 65536] {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("z");
                let mut f = std::fs::File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
                let opts = BlobOptions { zfile: Some(ZFileOptions { algorithm, block_size }), tar };
                write_blob(&MemSource::new(data.clone(), "in"), &mut f, opts).unwrap();
                let blob = std::fs::read(&path).unwrap();
                let u = unwrap(Arc::new(MemSource::new(blob, "blob"))).unwrap();
                let (z, raw) = (u.zfile.unwrap(), u.lsmt);
                prop_assert_eq!(z.algorithm(), algorithm);
                prop_assert_eq!(z.info.block_size, block_size);
                prop_assert_eq!(raw.size(), len as u64);
                prop_assert!(read_all(&*raw) == data);
                for &(off, n) in &reads {
                    let off = off.min(len);
                    let n = n.min(len - off);
                    let mut b = vec![0u8; n];
                    ovbd_format::source::read_exact_at(&*raw, &mut b, off as u64).unwrap();
                    prop_assert!(b[..] == data[off..off + n]);
                }
            }
        }
    }
}

/// A source that can only block (like a registry blob): non-blocking reads must defer to it.
struct BlockingOnly(MemSource);

impl ovbd_format::ReadAt for BlockingOnly {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn name(&self) -> &str {
        "blocking-only"
    }
}

#[test]
fn non_blocking_reads_serve_cached_data_and_defer_the_rest() {
    // A file-backed, ZFile-compressed layer just read (so in the page cache): served without
    // blocking, same bytes as a normal read.
    let layer = ovbd_format::open_layer_file(&fixture(HELLO_BLOB)).unwrap();
    let img = ImageStack::read_only(LayerStack::new(vec![layer.lsmt]).unwrap());
    let mut want = vec![0u8; 1 << 20];
    img.read(&mut want, 0).unwrap();
    let mut got = vec![0u8; 1 << 20];
    assert!(img.try_read(&mut got, 0).unwrap());
    assert!(got == want);
    // A source that cannot read without blocking: nothing is served, the caller retries.
    let bytes = build_layer(VSIZE, &[(0, LayerWrite::Data(pattern(1, 0, 8)))]);
    let l = LsmtFile::open(Arc::new(BlockingOnly(MemSource::new(bytes, "b")))).unwrap();
    let img = ImageStack::read_only(LayerStack::new(vec![l]).unwrap());
    let mut b = vec![0u8; 4096];
    assert!(!img.try_read(&mut b, 0).unwrap());
    img.read(&mut b, 0).unwrap();
    assert_eq!(b, pattern(1, 0, 8));
    // Misaligned requests are still errors, not "would block".
    assert!(img.try_read(&mut b[..100], 0).is_err());

    // The same layer ZFile-compressed (tar-wrapped) over that source: the choice goes through
    // the decompressor to the source under it, in the ZFile's own reads as well as the stack's.
    let bytes = build_layer(VSIZE, &[(0, LayerWrite::Data(pattern(2, 0, 8)))]);
    let mut f = tempfile::tempfile().unwrap();
    let opts = BlobOptions {
        zfile: Some(ZFileOptions::default()),
        tar: true,
    };
    write_blob(&MemSource::new(bytes, "lsmt"), &mut f, opts).unwrap();
    let blob = read_all(&ovbd_format::FileSource::from_file(f, "z".into()).unwrap());
    let layer = ovbd_format::open_layer(Arc::new(BlockingOnly(MemSource::new(blob, "z")))).unwrap();
    let z = layer.zfile.clone().unwrap();
    let mut b = vec![0u8; 4096];
    let e = z.read_at_nowait(&mut b, 4096).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
    let img = ImageStack::read_only(LayerStack::new(vec![layer.lsmt]).unwrap());
    assert!(!img.try_read(&mut b, 0).unwrap());
    img.read(&mut b, 0).unwrap();
    assert_eq!(b, pattern(2, 0, 8));
    let mut c = vec![0u8; 4096];
    img.read_with(&mut c, 0, Blocking::Allowed).unwrap();
    assert_eq!(c, b);
    assert!(matches!(
        img.read_with(&mut c, 0, Blocking::Never),
        Err(ovbd_format::Error::WouldBlock)
    ));
}
