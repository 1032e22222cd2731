//! Writes the seed inputs in fuzz/seeds/<target>/ (small; the RW ones carry random UUIDs):
//! `cd fuzz && cargo run --release --example make_seeds`.

use ovbd_format::commit::{commit_compact, CommitInfo};
use ovbd_format::layer::{write_blob, BlobOptions};
use ovbd_format::lsmt::{Segment, NIL_UUID};
use ovbd_format::zfile::{Algorithm, ZFileHeader, ZFileOptions};
use ovbd_format::{MemSource, RwLayer, RwMode};
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds")
}

fn put(target: &str, name: &str, bytes: &[u8]) {
    let d = root().join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(name), bytes).unwrap();
    println!("{target}/{name}: {} bytes", bytes.len());
}

/// A committed layer: `(sector, sectors, zeroed)` mappings over a 64 KiB disk.
fn lsmt(maps: &[(u64, u32, bool)]) -> Vec<u8> {
    let mut data = vec![0u8; 4096];
    let mut segs = Vec::new();
    for &(offset, length, zeroed) in maps {
        let moffset = data.len() as u64 / 512;
        if !zeroed {
            for s in 0..length as u64 {
                let mut sector = [0u8; 512];
                for (j, b) in sector.iter_mut().enumerate() {
                    *b = ((offset + s) as u8).wrapping_mul(31) ^ (j as u8) ^ (j >> 7) as u8;
                }
                data.extend_from_slice(&sector);
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
        virtual_size: 64 << 10,
        uuid: "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31".into(),
        parent_uuid: NIL_UUID.into(),
        user_tag: Vec::new(),
    };
    let mut out = Vec::new();
    commit_compact(&segs, &MemSource::new(data, "data"), &info, &mut out).unwrap();
    out
}

fn blob(lsmt: &[u8], zfile: Option<ZFileOptions>, tar: bool) -> Vec<u8> {
    let mut f = tempfile().unwrap();
    write_blob(
        &MemSource::new(lsmt.to_vec(), "lsmt"),
        &mut f,
        BlobOptions { zfile, tar },
    )
    .unwrap();
    f.rewind().unwrap();
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

fn tempfile() -> std::io::Result<std::fs::File> {
    let p = std::env::temp_dir().join(format!("ovbd-seed-{}", std::process::id()));
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)?;
    std::fs::remove_file(&p)?;
    Ok(f)
}

fn rw_pair(dir: &Path, mode: RwMode, vsize: u64) -> Vec<u8> {
    let (d, i) = (dir.join("d"), dir.join("i"));
    let _ = std::fs::remove_file(&d);
    let _ = std::fs::remove_file(&i);
    let l = RwLayer::create(&d, &i, vsize, mode, None).unwrap();
    l.write(&[0x5a; 2048], 4096).unwrap();
    l.write(&[0xa5; 512], 5120).unwrap();
    l.write(&[0x11; 1024], 0).unwrap();
    l.discard(8192, 2048).unwrap();
    drop(l);
    let (data, index) = (std::fs::read(&d).unwrap(), std::fs::read(&i).unwrap());
    let mut v = (data.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(&data);
    v.extend_from_slice(&index);
    v
}

fn main() {
    let lz4 = ZFileOptions {
        algorithm: Algorithm::Lz4,
        block_size: 4096,
    };
    let small = lsmt(&[(0, 4, false), (8, 3, false), (16, 8, true), (40, 9, false)]);
    put("lsmt", "small.lsmt", &small);
    put("lsmt", "empty.lsmt", &lsmt(&[]));

    let dir = std::env::temp_dir().join(format!("ovbd-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    put(
        "rw_index",
        "append.pair",
        &rw_pair(&dir, RwMode::Append, 64 << 10),
    );
    put(
        "rw_index",
        "sparse.pair",
        &rw_pair(&dir, RwMode::Sparse, 16 << 10),
    );
    let (d, i) = (dir.join("d"), dir.join("i"));
    let _ = std::fs::remove_file(&d);
    let _ = std::fs::remove_file(&i);
    // A sealed append-mode RW data file: its index is not padded to 256 entries.
    let l = RwLayer::create(&d, &i, 64 << 10, RwMode::Append, None).unwrap();
    l.write(&[0x77; 1536], 2048).unwrap();
    l.seal().unwrap();
    put("lsmt", "sealed_rw.lsmt", &std::fs::read(&d).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();

    let z = blob(&small, Some(lz4), false);
    put("zfile", "small_lz4.zfile", &z);
    let zstd = ZFileOptions {
        algorithm: Algorithm::Zstd,
        block_size: 8192,
    };
    put(
        "zfile",
        "small_zstd.zfile",
        &blob(&small, Some(zstd), false),
    );
    // The old layout: the header is not overwritten, the trailer holds the index information.
    let mut old = z.clone();
    let mut h = ZFileHeader::decode(&old[..512], "z", 0).unwrap();
    h.flags &= !0x8;
    old[..512].copy_from_slice(&h.encode());
    put("zfile", "old_layout.zfile", &old);

    let t = blob(&small, Some(lz4), true);
    put("tar", "small_pax_zfile.blob", &t);
    put("tar", "small_pax_raw.blob", &blob(&small, None, true));
    // Go archive/tar style: one ustar header, payload at 512.
    let mut ustar = t[1024..].to_vec();
    ustar[124..136].copy_from_slice(format!("{:011o}\0", z.len()).as_bytes());
    ustar[148..156].fill(b' ');
    let sum: u64 = ustar[..512].iter().map(|&c| c as u64).sum();
    ustar[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    put("tar", "small_ustar_zfile.blob", &ustar);
    let hello = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/hello-world-oci/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
    ))
    .unwrap();
    put("tar", "hello_world_prefix_8k.blob", &hello[..8192]);
}
