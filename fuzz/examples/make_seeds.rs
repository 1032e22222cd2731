//! Writes the seed inputs in fuzz/seeds/<target>/ (small; the RW ones carry random UUIDs):
//! `cd fuzz && cargo run --release --example make_seeds [TARGET...]` (only those targets'
//! seeds when targets are named).

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
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    if !wanted.is_empty() && !wanted.iter().any(|w| w == target) {
        return;
    }
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

    // Stacks (u32 LE length + layer, bottom first): layers that overlap, cut and hide each
    // other, with zeroed mappings on top of data and an empty layer in between.
    let upper = lsmt(&[
        (2, 4, false),
        (10, 1, true),
        (17, 2, false),
        (44, 30, false),
    ]);
    let top = lsmt(&[(0, 1, true), (12, 20, false), (41, 2, true)]);
    let stack = |layers: &[&[u8]]| -> Vec<u8> {
        let mut v = Vec::new();
        for l in layers {
            v.extend_from_slice(&(l.len() as u32).to_le_bytes());
            v.extend_from_slice(l);
        }
        v
    };
    put("stack", "three.stack", &stack(&[&small, &upper, &top]));
    put(
        "stack",
        "with_empty.stack",
        &stack(&[&upper, &lsmt(&[]), &small, &top]),
    );

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

    registry_text_seeds();
    oci_layout_seeds();
    block_cache_seeds();
    layer_tar_seeds();
}

fn registry_text_seeds() {
    let seeds: [(&str, &[u8]); 7] = [
        (
            "bearer.txt",
            br#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:library/busybox:pull""#,
        ),
        (
            "two_challenges.txt",
            b"Basic realm=\"x\", Bearer realm=\"http://127.0.0.1:1/t\",error=\"insufficient_scope\"\nNegotiate abc==",
        ),
        ("content_range.txt", b"bytes 262144-524287/641024"),
        ("content_range_star.txt", b"bytes 0-0/*"),
        ("retry_after.txt", b"120"),
        (
            "docker_config.json",
            br#"{"auths":{"http://localhost:5000/v2/":{"auth":"YWxpY2U6czNjcmV0"},"other:1":{"username":"u","password":"p"}},"credHelpers":{"localhost:5000":"pass"}}"#,
        ),
        (
            "image_refs.txt",
            b"docker://localhost:5000/library/busybox:1.36@sha256:abababababababababababababababababababababababababababababababab",
        ),
    ];
    for (name, bytes) in seeds {
        put("registry_text", name, bytes);
    }
    put("registry_text", "oci_ref.txt", b"oci:/tmp/layout:v1");
}

/// Layouts in `ovbd_fuzz::write_layout`'s form: parts joined by NUL, `@N`/`#N` for blob N.
fn oci_layout_seeds() {
    let layer_tar = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "hello", &b"hi\n"[..]).unwrap();
        b.into_inner().unwrap()
    };
    let config = br#"{"architecture":"amd64","os":"linux","created":"2024-05-01T12:34:56.789Z","rootfs":{"type":"layers","diff_ids":["sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"]},"config":{"Cmd":["/hello"]}}"#;
    let manifest = |cfg: usize, layer: usize, docker: bool| {
        let (m, c, l) = if docker {
            (
                "application/vnd.docker.distribution.manifest.v2+json",
                "application/vnd.docker.container.image.v1+json",
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            )
        } else {
            (
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.oci.image.layer.v1.tar",
            )
        };
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{m}","config":{{"mediaType":"{c}","digest":"@{cfg}","size":#{cfg}}},"layers":[{{"mediaType":"{l}","digest":"@{layer}","size":#{layer}}}]}}"#
        )
    };
    let tagged = |media: &str, n: usize, platform: &str| {
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{media}","digest":"@{n}","size":#{n}{platform},"annotations":{{"org.opencontainers.image.ref.name":"t"}}}}]}}"#
        )
    };
    let join = |parts: &[&[u8]]| parts.join(&0u8);
    let oci = "application/vnd.oci.image.manifest.v1+json";
    put(
        "oci_layout",
        "manifest.layout",
        &join(&[
            tagged(oci, 1, "").as_bytes(),
            manifest(2, 3, false).as_bytes(),
            config,
            &layer_tar,
        ]),
    );
    put(
        "oci_layout",
        "docker_manifest.layout",
        &join(&[
            tagged(
                "application/vnd.docker.distribution.manifest.v2+json",
                1,
                "",
            )
            .as_bytes(),
            manifest(2, 3, true).as_bytes(),
            config,
            &layer_tar,
        ]),
    );
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"{oci}","digest":"@3","size":#3,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},{{"mediaType":"{oci}","digest":"@2","size":#2,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
    );
    put(
        "oci_layout",
        "nested_index.layout",
        &join(&[
            tagged("application/vnd.oci.image.index.v1+json", 1, "").as_bytes(),
            index.as_bytes(),
            manifest(4, 5, false).as_bytes(),
            manifest(4, 5, false).as_bytes(),
            config,
            &layer_tar,
        ]),
    );
}

/// Cache files as a clean stop leaves them: a 600 KiB blob (3 blocks of 256 KiB) from one
/// origin, blocks 0 and 2 recorded, and another as a verified entry with block 1; the maps and
/// block hashes whole, the data files as their length and trailer.
fn block_cache_seeds() {
    use ovbd_fuzz::{encode_cache_files, CacheFile, CACHE_BLOB_SIZE, CACHE_DIGESTS, CACHE_ORIGIN};
    let tmp = tempfile::tempdir().unwrap();
    let size = CACHE_BLOB_SIZE;
    let trailer_at = (size as usize).div_ceil(4096) * 4096;
    let entry = |origin, digest, present: &[u64], kinds: [u8; 3]| {
        let (data, map, sums) =
            ovbd::fuzzing::block_cache_sample(tmp.path(), origin, digest, size, present).unwrap();
        let (map, data) = (std::fs::read(map).unwrap(), std::fs::read(data).unwrap());
        let mut files = vec![
            CacheFile {
                kind: kinds[0],
                fix_crc: false,
                len: map.len() as u64,
                write_at: 0,
                bytes: map.clone(),
            },
            CacheFile {
                kind: kinds[1],
                fix_crc: false,
                len: data.len() as u64,
                write_at: trailer_at as u64,
                bytes: data[trailer_at..].to_vec(),
            },
        ];
        if origin.is_none() {
            let sums = std::fs::read(sums).unwrap();
            files.push(CacheFile {
                kind: kinds[2],
                fix_crc: false,
                len: sums.len() as u64,
                write_at: 0,
                bytes: sums,
            });
        }
        files
    };
    let files = entry(Some(CACHE_ORIGIN), CACHE_DIGESTS[0], &[0, 2], [0, 1, 0]);
    put("block_cache", "one_blob.cache", &encode_cache_files(&files));
    let mut more = files.clone();
    more.push(CacheFile {
        kind: 6,
        fix_crc: false,
        len: 10,
        write_at: 0,
        bytes: b"tmp".to_vec(),
    });
    more.push(CacheFile {
        kind: 3,
        fix_crc: false,
        len: 8192,
        write_at: 0,
        bytes: Vec::new(),
    });
    put(
        "block_cache",
        "with_strays.cache",
        &encode_cache_files(&more),
    );
    let mut both = files;
    both.extend(entry(None, CACHE_DIGESTS[1], &[1], [2, 3, 5]));
    put("block_cache", "verified.cache", &encode_cache_files(&both));
}

/// Layer tars with every kind of entry `ovbd convert` handles.
fn layer_tar_seeds() {
    use tar::{EntryType, Header};
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: EntryType, data: &[u8], link: Option<&str>, mode: u32| {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_700_000_000);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        if kind == EntryType::Char {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        h.set_cksum();
        b.append_data(&mut h, path, data).unwrap();
    };
    add("etc/", EntryType::Directory, b"", None, 0o755);
    add(
        "etc/passwd",
        EntryType::Regular,
        b"root:x:0:0::/root:/bin/sh\n",
        None,
        0o644,
    );
    add("etc/link", EntryType::Symlink, b"", Some("passwd"), 0o777);
    add("etc/hard", EntryType::Link, b"", Some("etc/passwd"), 0o644);
    add("dev/null", EntryType::Char, b"", None, 0o666);
    add("run/fifo", EntryType::Fifo, b"", None, 0o600);
    add("bin/sh", EntryType::Regular, &[0x7f; 5000], None, 0o4755);
    add("old/.wh..wh..opq", EntryType::Regular, b"", None, 0o644);
    add("etc/.wh.shadow", EntryType::Regular, b"", None, 0o644);
    let mut pax = tar::Builder::new(Vec::new());
    pax.append_pax_extensions([
        ("SCHILY.xattr.user.k", &b"v"[..]),
        ("mtime", &b"1700000000.5"[..]),
        ("path", &b"pax/long-name"[..]),
    ])
    .unwrap();
    let mut h = Header::new_ustar();
    h.set_size(2);
    h.set_mode(0o640);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_cksum();
    pax.append_data(&mut h, "pax/short", &b"ok"[..]).unwrap();
    let kinds = b.into_inner().unwrap();
    put("layer_tar", "kinds.tar", &kinds);
    put("layer_tar", "pax.tar", &pax.into_inner().unwrap());
}
