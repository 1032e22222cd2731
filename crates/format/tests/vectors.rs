//! The upstream-made vectors: opened, decompressed, rebuilt byte for byte.

mod common;

use common::*;
use ovbd_format::commit::{commit_compact, CommitInfo};
use ovbd_format::layer::{open_layer, open_layer_file, write_blob, BlobOptions};
use ovbd_format::tar::WrapperKind;
use ovbd_format::zfile::{Algorithm, ZFileOptions};
use ovbd_format::{LsmtFile, MemSource, ReadAt};
use std::sync::Arc;

const HELLO_LSMT_SHA: &str = "39195424aa10572fe002262190877b4306a66be9c62c8f1594141b01dc79c2ea";
const HELLO_BLOB_SHA: &str = "022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d";

#[test]
fn hello_world_blob_opens_as_upstream_describes() {
    let l = open_layer_file(&fixture(HELLO_BLOB)).unwrap();
    assert_eq!(l.wrapper.kind, WrapperKind::Pax);
    assert_eq!(
        (l.wrapper.payload_offset, l.wrapper.payload_size),
        (1536, 639_491)
    );
    let z = l.zfile.as_ref().unwrap();
    assert_eq!(z.algorithm(), Algorithm::Lz4);
    assert_eq!(
        (z.info.block_size, z.info.index_size, z.info.flags),
        (4096, 17_463, 0x1b)
    );
    assert_eq!(l.lsmt.trailer.uuid, "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31");
    assert_eq!(l.lsmt.index_entries, 768);
    assert_eq!(l.lsmt.segments.len(), 515);
    let first = l.lsmt.segments[0];
    assert_eq!(
        (first.offset, first.length, first.moffset, first.zeroed),
        (0, 8448, 8, false)
    );
    assert_eq!(l.lsmt.virtual_size(), 64 << 30);
    assert_eq!(z.size(), 71_528_448);
}

#[test]
fn hello_world_decompresses_and_rebuilds_byte_exact() {
    let l = open_layer_file(&fixture(HELLO_BLOB)).unwrap();
    let lsmt = read_all(&**l.lsmt_source());
    assert_eq!(sha256_hex(&lsmt), HELLO_LSMT_SHA);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    let mut f = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let opts = BlobOptions {
        zfile: Some(ZFileOptions {
            algorithm: Algorithm::Lz4,
            block_size: 4096,
        }),
        tar: true,
    };
    let n = write_blob(&MemSource::new(lsmt, "lsmt"), &mut f, opts).unwrap();
    assert_eq!(n, 642_560);
    assert_eq!(sha256_hex(&std::fs::read(&path).unwrap()), HELLO_BLOB_SHA);
}

#[test]
fn recommitting_a_committed_layer_reproduces_it() {
    // The vector was written by overlaybd-commit's compaction; running ours over its own index
    // and data must give the same bytes (chunking, greedy merge, padding, trailer).
    let l = open_layer_file(&fixture(HELLO_BLOB)).unwrap();
    let lsmt = read_all(&**l.lsmt_source());
    let t = &l.lsmt.trailer;
    let info = CommitInfo {
        virtual_size: t.virtual_size,
        uuid: t.uuid.clone(),
        parent_uuid: t.parent_uuid.clone(),
        user_tag: t.user_tag.clone(),
    };
    let mut out = Vec::new();
    commit_compact(&l.lsmt.segments, &**l.lsmt_source(), &info, &mut out).unwrap();
    assert_eq!(out.len(), lsmt.len());
    assert!(out == lsmt, "recommitted layer differs");
}

#[test]
fn ext4_64_old_zfile_opens() {
    let raw = ext4_64_bytes();
    assert_eq!(raw.len(), 4_737_695);
    assert_eq!(
        sha256_hex(&raw),
        "c3a417552a6cf9ffa959b541850bab7d7f08f4255425bf8b48c85f7b36b378d9"
    );
    let l = open_layer(Arc::new(MemSource::new(raw, "ext4_64"))).unwrap();
    assert_eq!(l.wrapper.kind, WrapperKind::None);
    let z = l.zfile.as_ref().unwrap();
    // Old file: no digest flag, garbage in the high flag bits, CRCs still per block.
    assert_eq!(z.info.flags & ovbd_format::zfile::FLAG_DIGEST, 0);
    assert!(z.info.verify);
    assert_eq!(z.info.index_size, 132_309);
    assert_eq!(z.size(), 541_937_664);
    assert_eq!(l.lsmt.virtual_size(), 64 << 30);
    assert_eq!(l.lsmt.trailer.uuid, "C02FB491-B4D4-4904-8684-A014D032AF78");
    assert_eq!(l.lsmt.index_entries, 8448);
    assert_eq!(l.lsmt.segments.len(), 8323);
    assert_eq!(l.lsmt.segments.iter().filter(|s| s.zeroed).count(), 8209);
    // Every block decompresses and passes its CRC.
    let all = read_all(&**z);
    assert_eq!(all.len(), 541_937_664);
    let reopened = LsmtFile::open(Arc::new(MemSource::new(all, "ext4_64.lsmt"))).unwrap();
    assert_eq!(reopened.segments, l.lsmt.segments);
}
