//! `ovbd convert` on OCI layouts: the upstream hello-world source, a multi-layer image built
//! here (whiteouts, opaque dirs, hard links, symlinks, xattrs, modes, devices), tar entries
//! that try to escape the root, and bad input. The ext4 inside the result is read with
//! e2fsprogs' debugfs and checked with e2fsck.

use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ovbd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ovbd"))
        .args(args)
        .output()
        .expect("run ovbd")
}

fn ok(args: &[&str]) -> String {
    let o = ovbd(args);
    assert!(
        o.status.success(),
        "ovbd {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn sha256(data: &[u8]) -> String {
    let h: String = Sha256::digest(data)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect();
    format!("sha256:{h}")
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

// ----------------------------------------------------------------- building source images

/// One tar layer under construction (PAX format, fixed times).
struct Layer {
    b: tar::Builder<Vec<u8>>,
}

const MTIME: u64 = 1_700_000_000;

impl Layer {
    fn new() -> Layer {
        Layer {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(MTIME);
        h.set_size(0);
        h
    }

    /// Raw names (no normalisation by the tar crate): "../x" and "/x" go in as they are.
    fn put(&mut self, mut h: tar::Header, name: &str, link: Option<&str>, data: &[u8]) {
        let old = h.as_old_mut();
        old.name.fill(0);
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            old.linkname.fill(0);
            old.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
    }

    fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.put(
            Self::header(tar::EntryType::Directory, mode, 0, 0),
            name,
            None,
            b"",
        );
        self
    }

    fn file(&mut self, name: &str, data: &[u8], mode: u32) -> &mut Self {
        self.put(
            Self::header(tar::EntryType::Regular, mode, 0, 0),
            name,
            None,
            data,
        );
        self
    }

    fn owned(&mut self, name: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> &mut Self {
        self.put(
            Self::header(tar::EntryType::Regular, mode, uid, gid),
            name,
            None,
            data,
        );
        self
    }

    fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        let h = Self::header(tar::EntryType::Symlink, 0o777, 0, 0);
        self.put(h, name, Some(target), b"");
        self
    }

    fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        let h = Self::header(tar::EntryType::Link, 0o644, 0, 0);
        self.put(h, name, Some(target), b"");
        self
    }

    fn node(&mut self, name: &str, kind: tar::EntryType, major: u32, minor: u32) -> &mut Self {
        let mut h = Self::header(kind, 0o666, 0, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.put(h, name, None, b"");
        self
    }

    /// A file with PAX `SCHILY.xattr.*` records.
    fn file_xattrs(&mut self, name: &str, data: &[u8], xattrs: &[(&str, &[u8])]) -> &mut Self {
        let recs: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
            .collect();
        self.b
            .append_pax_extensions(recs.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap();
        self.file(name, data, 0o644)
    }

    fn tar(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Writes an OCI layout at `dir` holding one image `tag` made of `layers` (uncompressed tars;
/// stored gzip-compressed). Returns `oci:DIR:TAG`.
fn write_layout(dir: &Path, tag: &str, layers: &[Vec<u8>]) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| -> (String, u64) {
        let d = sha256(data);
        std::fs::write(blobs.join(&d[7..]), data).unwrap();
        (d, data.len() as u64)
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        diff_ids.push(sha256(l));
        let (d, n) = put(&gzip(l));
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n}));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "created": "2024-01-02T03:04:05Z",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    let (cd, cn) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn},
        "layers": descs});
    let (md, mn) = put(&serde_json::to_vec(&manifest).unwrap());
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mn,
        "annotations": {"org.opencontainers.image.ref.name": tag}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    format!("oci:{}:{tag}", dir.display())
}

// ----------------------------------------------------------------- reading the result

struct Converted {
    summary: serde_json::Value,
    layout: PathBuf,
}

fn convert(src: &str, out: &Path, extra: &[&str]) -> Converted {
    let dst = format!("oci:{}:obd", out.display());
    let mut args = vec!["convert", src, &dst, "--json"];
    args.extend_from_slice(extra);
    let summary: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    Converted {
        summary,
        layout: out.to_path_buf(),
    }
}

impl Converted {
    fn blobs(&self) -> Vec<PathBuf> {
        self.summary["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let d = l["digest"].as_str().unwrap();
                self.layout.join("blobs/sha256").join(&d[7..])
            })
            .collect()
    }

    /// The flattened disk, exported raw next to the layout.
    fn export(&self) -> PathBuf {
        let raw = self.layout.with_extension("raw");
        let mut args: Vec<String> = vec!["image".into(), "export".into()];
        args.extend(self.blobs().iter().map(|p| s(p).to_owned()));
        args.push(s(&raw).to_owned());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&a);
        raw
    }
}

fn debugfs(img: &Path, cmd: &str) -> String {
    let o = Command::new("debugfs")
        .args(["-R", cmd, s(img)])
        .output()
        .expect("debugfs (e2fsprogs) must be installed");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn cat(img: &Path, path: &str) -> Vec<u8> {
    Command::new("debugfs")
        .args(["-R", &format!("cat {path}"), s(img)])
        .output()
        .expect("debugfs")
        .stdout
}

/// (type, mode, uid, gid, links, size) from `debugfs stat`, or None when the path is absent.
fn stat(img: &Path, path: &str) -> Option<(String, u32, u32, u32, u32, u64)> {
    let out = debugfs(img, &format!("stat {path}"));
    let field = |key: &str| -> Option<String> {
        let at = out.find(key)? + key.len();
        Some(out[at..].split_whitespace().next()?.to_owned())
    };
    Some((
        field("Type: ")?,
        u32::from_str_radix(&field("Mode: ")?, 8).ok()?,
        field("User: ")?.parse().ok()?,
        field("Group: ")?.parse().ok()?,
        field("Links: ")?.parse().ok()?,
        field("Size: ")?.parse().ok()?,
    ))
}

fn inode_of(img: &Path, path: &str) -> String {
    debugfs(img, &format!("stat {path}"))
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

fn e2fsck_clean(img: &Path) {
    let o = Command::new("e2fsck")
        .args(["-fn", s(img)])
        .output()
        .expect("e2fsck");
    assert!(
        o.status.success(),
        "e2fsck -fn {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn check_layers(c: &Converted) {
    for b in c.blobs() {
        let o = ovbd(&["layer", "inspect", s(&b), "--json"]);
        assert!(
            o.status.success(),
            "inspect {}: {}",
            b.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

// ----------------------------------------------------------------- tests

#[test]
fn hello_world_converts_reproducibly() {
    let t = tempfile::tempdir().unwrap();
    let src = format!("oci:{}:amd64", s(&fixture("hello-world-oci")));
    let a = convert(&src, &t.path().join("a"), &[]);
    let b = convert(&src, &t.path().join("b"), &[]);
    assert_eq!(
        a.summary["manifest"], b.summary["manifest"],
        "same source, same manifest"
    );
    check_layers(&a);
    // The LSMT uuid is the chain ID's first 32 hex digits, as upstream derives it.
    let o = ok(&["layer", "inspect", s(&a.blobs()[0]), "--json"]);
    assert!(o.contains("01BB4FCE-3EB1-B56B-05AD-F99504DAFD31"), "{o}");
    let raw = a.export();
    e2fsck_clean(&raw);
    assert_eq!(
        sha256(&cat(&raw, "/hello")),
        "sha256:d3f7d10e296e5c626ea78539cb38cd8dffd043bea3627da35ce3b20c0ac68014"
    );
    // Manifest and config as upstream lays them out.
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            a.layout
                .join("blobs/sha256")
                .join(&a.summary["manifest"].as_str().unwrap()[7..]),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    let l = &m["layers"][0];
    assert_eq!(l["mediaType"], "application/vnd.oci.image.layer.v1.tar");
    assert_eq!(
        l["annotations"]["containerd.io/snapshot/overlaybd/blob-digest"],
        l["digest"]
    );
    assert_eq!(
        l["annotations"]["containerd.io/snapshot/overlaybd/blob-size"],
        l["size"].to_string()
    );
    assert_eq!(
        l["annotations"]["containerd.io/snapshot/overlaybd/version"],
        "0.1.0"
    );
    let cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            a.layout
                .join("blobs/sha256")
                .join(&m["config"]["digest"].as_str().unwrap()[7..]),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        cfg["rootfs"]["diff_ids"][0], l["digest"],
        "diff_id = blob digest"
    );
    assert_eq!(cfg["config"]["Cmd"][0], "/hello");
}

fn multi_layer_image() -> Vec<Vec<u8>> {
    let big: Vec<u8> = (0..3 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut l1 = Layer::new();
    l1.dir("etc/", 0o755)
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644)
        .dir("data/", 0o755)
        .file("data/gone.txt", b"whited out in layer 2\n", 0o644)
        .dir("data/old/", 0o755)
        .file("data/old/inside.txt", b"dir whited out\n", 0o644)
        .dir("data/opq/", 0o750)
        .file("data/opq/a", b"hidden by opaque\n", 0o644)
        .dir("data/opq/sub/", 0o755)
        .file("data/opq/sub/b", b"hidden too\n", 0o644)
        .file("data/keep.txt", b"kept\n", 0o644)
        .file("data/f2d", b"becomes a dir\n", 0o644)
        .dir("data/d2f/", 0o755)
        .file("data/d2f/child", b"goes with its dir\n", 0o644)
        .file_xattrs(
            "data/caps",
            b"capable\n",
            &[
                (
                    "security.capability",
                    &[
                        1, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    ],
                ),
                ("user.mime", b"text/plain"),
            ],
        )
        .symlink("data/rel", "../etc/passwd")
        .symlink("data/abs", "/etc/passwd");
    let mut l2 = Layer::new();
    l2.file("data/.wh.gone.txt", b"", 0o644)
        .file("data/.wh.old", b"", 0o644)
        .dir("data/opq/", 0o700)
        .file("data/opq/.wh..wh..opq", b"", 0o644)
        .file("data/opq/new", b"only this is left\n", 0o644)
        .hardlink("data/hard", "data/keep.txt")
        .owned("data/suid", b"setuid\n", 0o4755, 1000, 1001)
        .dir("data/sticky/", 0o1777)
        .node("dev-null", tar::EntryType::Char, 1, 3)
        .node("dev-big", tar::EntryType::Block, 259, 300)
        .node("fifo", tar::EntryType::Fifo, 0, 0)
        .dir("data/f2d/", 0o711)
        .file("data/f2d/now", b"a dir now\n", 0o644)
        .file("data/d2f", b"a file now\n", 0o600)
        .file("implied/parents/file", b"parents not in the tar\n", 0o644)
        .file("data/big.bin", &big, 0o644);
    for i in 0..600 {
        l2.file(
            &format!("many/file-{i:04}-with-a-longish-name"),
            format!("{i}\n").as_bytes(),
            0o644,
        );
    }
    let mut l3 = Layer::new();
    l3.file("data/keep.txt", b"rewritten in layer 3\n", 0o640);
    for i in (0..600).step_by(2) {
        l3.file(
            &format!("many/.wh.file-{i:04}-with-a-longish-name"),
            b"",
            0o644,
        );
    }
    vec![l1.tar(), l2.tar(), l3.tar()]
}

#[test]
fn multi_layer_image_applies_like_overlayfs() {
    let t = tempfile::tempdir().unwrap();
    let src = write_layout(&t.path().join("src"), "v1", &multi_layer_image());
    let c = convert(&src, &t.path().join("out"), &["--vsize", "4"]);
    assert_eq!(c.blobs().len(), 3);
    check_layers(&c);
    let raw = c.export();
    e2fsck_clean(&raw);

    let absent = [
        "/data/gone.txt",
        "/data/old",
        "/data/opq/a",
        "/data/opq/sub",
        "/data/d2f/child",
    ];
    for p in absent {
        assert!(stat(&raw, p).is_none(), "{p} should be gone");
    }
    assert_eq!(cat(&raw, "/data/opq/new"), b"only this is left\n");
    let opq = stat(&raw, "/data/opq").unwrap();
    assert_eq!((opq.0.as_str(), opq.1), ("directory", 0o700));
    // A hard link made in layer 2 to a layer-1 file, rewritten in layer 3: containerd replaces
    // the name (new inode), the other name keeps the old content.
    assert_eq!(cat(&raw, "/data/keep.txt"), b"rewritten in layer 3\n");
    assert_eq!(cat(&raw, "/data/hard"), b"kept\n");
    assert_eq!(stat(&raw, "/data/hard").unwrap().4, 1);
    assert_eq!(stat(&raw, "/data/keep.txt").unwrap().1, 0o640);
    let suid = stat(&raw, "/data/suid").unwrap();
    assert_eq!((suid.1, suid.2, suid.3), (0o4755, 1000, 1001));
    assert_eq!(stat(&raw, "/data/sticky").unwrap().1, 0o1777);
    assert_eq!(stat(&raw, "/data/f2d").unwrap().0, "directory");
    assert_eq!(stat(&raw, "/data/f2d").unwrap().1, 0o711);
    assert_eq!(cat(&raw, "/data/f2d/now"), b"a dir now\n");
    let d2f = stat(&raw, "/data/d2f").unwrap();
    assert_eq!((d2f.0.as_str(), d2f.1), ("regular", 0o600));
    assert_eq!(stat(&raw, "/implied/parents").unwrap().1, 0o755);
    assert_eq!(
        cat(&raw, "/implied/parents/file"),
        b"parents not in the tar\n"
    );
    assert_eq!(stat(&raw, "/dev-null").unwrap().0, "character");
    assert!(debugfs(&raw, "stat /dev-null").contains("Device major/minor number: 01:03"));
    assert!(debugfs(&raw, "stat /dev-big").contains("Device major/minor number: 259:300"));
    assert_eq!(stat(&raw, "/fifo").unwrap().0, "FIFO");
    assert!(debugfs(&raw, "stat /data/rel").contains("Fast link dest: \"../etc/passwd\""));
    assert!(debugfs(&raw, "stat /data/abs").contains("Fast link dest: \"/etc/passwd\""));
    let big: Vec<u8> = (0..3 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    assert_eq!(sha256(&cat(&raw, "/data/big.bin")), sha256(&big));
    let ea = debugfs(&raw, "ea_list /data/caps");
    assert!(ea.contains("user.mime (10) = \"text/plain\""), "{ea}");
    assert!(ea.contains("security.capability (20)"), "{ea}");
    let many = debugfs(&raw, "ls -p /many");
    let names = many.lines().filter(|l| l.contains("file-")).count();
    assert_eq!(names, 300, "every other file whited out");
    assert!(many.contains("file-0001-with") && !many.contains("file-0000-with"));
    // Times come from the tar (directories too, set after their contents).
    assert!(
        debugfs(&raw, "stat /data/f2d").contains("mtime: 0x6553f100"),
        "{}",
        debugfs(&raw, "stat /data/f2d")
    );

    // Same source, same bytes.
    let again = convert(&src, &t.path().join("again"), &["--vsize", "4"]);
    assert_eq!(c.summary["manifest"], again.summary["manifest"]);
}

#[test]
fn escaping_entries_are_confined_to_the_image() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    let mut l1 = Layer::new();
    l1.dir("etc/", 0o755).file("etc/passwd", b"root\n", 0o644);
    let mut l2 = Layer::new();
    let rel = format!("../../../../../../../..{}", outside.display());
    l2.file("../../escape1", b"1\n", 0o644)
        .file("/abs1", b"2\n", 0o644)
        .file("a/../../escape2", b"3\n", 0o644)
        .file(&rel, b"4\n", 0o644)
        .symlink("toroot", "/")
        .file("toroot/etc/via-abs-link", b"5\n", 0o644)
        .symlink("up", "../../../..")
        .file("up/escape3", b"6\n", 0o644)
        .hardlink("hl", "../../../etc/passwd")
        .symlink("loop", "loop")
        .file("plain", b"ok\n", 0o644);
    let src = write_layout(&t.path().join("src"), "v1", &[l1.tar(), l2.tar()]);
    let c = convert(&src, &t.path().join("out"), &["--vsize", "1"]);
    let raw = c.export();
    e2fsck_clean(&raw);
    assert!(
        !outside.exists(),
        "nothing may be written outside the image"
    );
    for (p, want) in [
        ("/escape1", &b"1\n"[..]),
        ("/abs1", b"2\n"),
        ("/escape2", b"3\n"),
        ("/etc/via-abs-link", b"5\n"),
        ("/escape3", b"6\n"),
        ("/plain", b"ok\n"),
    ] {
        assert_eq!(cat(&raw, p), want, "{p}");
    }
    assert_eq!(cat(&raw, &format!("{}", outside.display())), b"4\n");
    assert_eq!(inode_of(&raw, "/hl"), inode_of(&raw, "/etc/passwd"));
    assert_eq!(stat(&raw, "/etc/passwd").unwrap().4, 2);
}

#[test]
fn bad_input_gives_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    // A diff_id that does not match the layer.
    let mut l = Layer::new();
    l.file("f", b"x", 0o644);
    let src = write_layout(&t.path().join("src"), "v1", &[l.tar()]);
    let cfg_dir = t.path().join("src/blobs/sha256");
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.path().join("src/index.json")).unwrap()).unwrap();
    let md = idx["manifests"][0]["digest"].as_str().unwrap()[7..].to_owned();
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cfg_dir.join(&md)).unwrap()).unwrap();
    let layer_digest = m["layers"][0]["digest"].as_str().unwrap().to_owned();

    // Corrupt the layer blob: the digest check names it.
    let blob = cfg_dir.join(&layer_digest[7..]);
    let mut data = std::fs::read(&blob).unwrap();
    let n = data.len();
    data[n / 2] ^= 0xff;
    std::fs::write(&blob, &data).unwrap();
    let dst = format!("oci:{}:obd", t.path().join("out").display());
    let o = ovbd(&["convert", &src, &dst]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&layer_digest), "{err}");
    assert!(
        !t.path().join("out/index.json").exists(),
        "nothing written on failure"
    );

    // A file larger than the disk: the error says so and points at --vsize.
    let t2 = tempfile::tempdir().unwrap();
    let mut l = Layer::new();
    let zeros = vec![0u8; (1 << 30) + (64 << 20)];
    l.file("huge", &zeros, 0o644);
    drop(zeros);
    let src = write_layout(&t2.path().join("src"), "v1", &[l.tar()]);
    let dst = format!("oci:{}:obd", t2.path().join("out").display());
    let o = ovbd(&["convert", &src, &dst, "--vsize", "1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--vsize") && err.contains("huge"), "{err}");
}

/// Interrupted conversions: SIGTERM removes the scratch directory and exits 130; SIGKILL at any
/// moment leaves the destination as it was (a tag is only ever added by the last, atomic write).
#[test]
fn interrupted_conversion_leaves_the_destination_as_it_was() {
    use std::io::{BufRead, BufReader};
    let t = tempfile::tempdir().unwrap();
    // Pseudo-random (incompressible) data, so the later layers take a while even in release.
    let noise = |seed: u32, n: usize| -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    };
    let mut l1 = Layer::new();
    l1.file("first", b"1\n", 0o644);
    let mut l2 = Layer::new();
    l2.file("second.bin", &noise(2, 16 << 20), 0o644);
    let mut l3 = Layer::new();
    l3.file("third.bin", &noise(3, 16 << 20), 0o644);
    let src = write_layout(&t.path().join("src"), "v1", &[l1.tar(), l2.tar(), l3.tar()]);
    // The destination already holds one image.
    let out = t.path().join("out");
    let small = write_layout(&t.path().join("small"), "v1", &[Layer::new().tar()]);
    convert(&small, &out, &["--vsize", "1"]);
    let index_before = std::fs::read(out.join("index.json")).unwrap();

    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGKILL, "SIGKILL")] {
        let work = t.path().join(format!("work-{name}"));
        std::fs::create_dir_all(&work).unwrap();
        let dst = format!("oci:{}:new", out.display());
        let mut child = Command::new(env!("CARGO_BIN_EXE_ovbd"))
            .args(["convert", &src, &dst, "--vsize", "1", "--workdir", s(&work)])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Interrupt once layer 2 has started: layer 1 is converted, nothing is written yet.
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            let started = line.starts_with("layer 2/3");
            seen.push(line);
            if started {
                break;
            }
        }
        assert!(seen.last().unwrap().starts_with("layer 2/3"), "{seen:?}");
        unsafe { libc::kill(child.id() as i32, sig) };
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "{name}: the conversion finished first: {rest:?}"
        );
        assert_eq!(
            std::fs::read(out.join("index.json")).unwrap(),
            index_before,
            "{name}: the destination's index changed"
        );
        if sig == libc::SIGTERM {
            assert_eq!(status.code(), Some(130), "{rest:?}");
            assert!(rest.iter().any(|l| l.contains("interrupted")), "{rest:?}");
            let left: Vec<_> = std::fs::read_dir(&work).unwrap().collect();
            assert!(left.is_empty(), "scratch left behind: {left:?}");
        }
    }
    // And an uninterrupted run adds the tag next to the old one.
    ok(&[
        "convert",
        &src,
        &format!("oci:{}:new", out.display()),
        "--vsize",
        "1",
    ]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    let tags: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(tags.len(), 2, "{tags:?}");
    assert!(tags.contains(&"obd") && tags.contains(&"new"), "{tags:?}");
}

/// `--algo` / `--block-size` reach the ZFile of every layer, and each layer's LSMT uuid and
/// parent uuid come from the chain IDs of the source's diff_ids (upstream's `--uuid` /
/// `--parent-uuid`: the first 32 hex digits, 8-4-4-4-12, upper case).
#[test]
fn zfile_options_and_uuid_chain() {
    let t = tempfile::tempdir().unwrap();
    let layers = multi_layer_image();
    let src = write_layout(&t.path().join("src"), "v1", &layers);
    let c = convert(
        &src,
        &t.path().join("out"),
        &["--vsize", "4", "--algo", "zstd", "--block-size", "16384"],
    );
    let uuid = |chain: &str| {
        let h = chain[7..39].to_uppercase();
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    };
    let mut chain = String::new();
    let mut parent = "00000000-0000-0000-0000-000000000000".to_owned();
    for (layer, blob) in layers.iter().zip(c.blobs()) {
        let diff_id = sha256(layer);
        chain = if chain.is_empty() {
            diff_id
        } else {
            sha256(format!("{chain} {diff_id}").as_bytes())
        };
        let info: serde_json::Value =
            serde_json::from_str(&ok(&["layer", "inspect", s(&blob), "--json"])).unwrap();
        assert_eq!(info["zfile"]["algorithm"], "zstd", "{info}");
        assert_eq!(info["zfile"]["block_size"], 16384, "{info}");
        assert_eq!(
            info["zfile"]["blocks"], info["zfile"]["blocks_crc_checked"],
            "{info}"
        );
        assert_eq!(info["wrapper"], "pax", "{info}");
        assert_eq!(info["lsmt"]["uuid"], uuid(&chain), "{info}");
        assert_eq!(info["lsmt"]["parent_uuid"], parent.as_str(), "{info}");
        parent = uuid(&chain);
    }
    // The content is the same as with the defaults.
    let lz4 = convert(&src, &t.path().join("lz4"), &["--vsize", "4"]);
    let (a, b) = (c.export(), lz4.export());
    assert_eq!(cat(&a, "/data/big.bin"), cat(&b, "/data/big.bin"));
    assert_eq!(debugfs(&a, "ls -p /many"), debugfs(&b, "ls -p /many"));
}

/// `--priority-list`: the list goes on top as upstream's acceleration layer (an uncompressed tar
/// of one entry `trace`, the acceleration-layer annotation), reproducibly; a file that is not a
/// priority list is refused before anything is written.
#[test]
fn priority_list_becomes_an_acceleration_layer() {
    let t = tempfile::tempdir().unwrap();
    let src = format!("oci:{}:amd64", s(&fixture("hello-world-oci")));
    let list = t.path().join("list");
    std::fs::write(&list, b"/hello\n").unwrap();
    let a = convert(&src, &t.path().join("a"), &["--priority-list", s(&list)]);
    let b = convert(&src, &t.path().join("b"), &["--priority-list", s(&list)]);
    assert_eq!(a.summary["manifest"], b.summary["manifest"]);
    let blob = |d: &str| std::fs::read(a.layout.join("blobs/sha256").join(&d[7..])).unwrap();
    let m: serde_json::Value =
        serde_json::from_slice(&blob(a.summary["manifest"].as_str().unwrap())).unwrap();
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    let top = &layers[1];
    assert_eq!(top["digest"], a.summary["acceleration_layer"]);
    assert_eq!(top["mediaType"], "application/vnd.oci.image.layer.v1.tar");
    let ann = &top["annotations"];
    assert_eq!(
        ann["containerd.io/snapshot/overlaybd/acceleration-layer"],
        "yes"
    );
    assert_eq!(
        ann["containerd.io/snapshot/overlaybd/blob-digest"],
        top["digest"]
    );
    assert_eq!(
        ann["containerd.io/snapshot/overlaybd/blob-size"],
        top["size"].to_string()
    );
    assert!(layers[0]["annotations"]
        .get("containerd.io/snapshot/overlaybd/acceleration-layer")
        .is_none());
    // The blob: a tar whose only entry is `trace`, holding the list.
    let tar_bytes = blob(top["digest"].as_str().unwrap());
    let mut ar = tar::Archive::new(&tar_bytes[..]);
    let entries: Vec<(String, u32, Vec<u8>)> = ar
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            (
                e.path().unwrap().display().to_string(),
                e.header().mode().unwrap(),
                data,
            )
        })
        .collect();
    assert_eq!(entries, vec![("trace".into(), 0o444, b"/hello\n".to_vec())]);
    let cfg: serde_json::Value =
        serde_json::from_slice(&blob(m["config"]["digest"].as_str().unwrap())).unwrap();
    assert_eq!(cfg["rootfs"]["diff_ids"][1], top["digest"]);

    // A binary trace, or a list naming no path, is not a priority list.
    let mut trace = 0xC2EF_1820u32.to_le_bytes().to_vec();
    trace.resize(24, 0);
    for (name, data) in [("trace", trace), ("empty", b"\n  \nnot a path!\n".to_vec())] {
        let bad = t.path().join(name);
        std::fs::write(&bad, data).unwrap();
        let out = t.path().join(format!("out-{name}"));
        let dst = format!("oci:{}:obd", out.display());
        let o = ovbd(&["convert", &src, &dst, "--priority-list", s(&bad)]);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(s(&bad)), "{err}");
        assert!(!out.join("index.json").exists());
    }
}

// ----------------------------------------------------------------- ovbd record-trace

/// The trace inside an image's acceleration layer (its top layer), parsed.
fn trace_of(
    layout: &Path,
    manifest: &str,
) -> (serde_json::Value, Vec<ovbd_format::trace::TraceRecord>) {
    let blob = |d: &str| std::fs::read(layout.join("blobs/sha256").join(&d[7..])).unwrap();
    let m: serde_json::Value = serde_json::from_slice(&blob(manifest)).unwrap();
    let top = m["layers"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        top["annotations"]["containerd.io/snapshot/overlaybd/acceleration-layer"],
        "yes"
    );
    let tar_bytes = blob(top["digest"].as_str().unwrap());
    let mut ar = tar::Archive::new(&tar_bytes[..]);
    let mut e = ar.entries().unwrap().next().unwrap().unwrap();
    assert_eq!(e.path().unwrap().to_str(), Some("trace"));
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut e, &mut data).unwrap();
    (m, ovbd_format::trace::parse_trace(&data, "trace").unwrap())
}

/// Mounts whose path is under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(s(dir)))
        .map(str::to_owned)
        .collect()
}

/// What `ovbd record-trace` tests need (root, /dev/fuse, loop devices, a static busybox to
/// put in images); a scratch directory and the `work` directory in it.
fn record_trace_scratch() -> (tempfile::TempDir, PathBuf) {
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() } == 0
            && Path::new("/dev/fuse").exists()
            && Path::new("/dev/loop-control").exists()
            && Path::new("/bin/busybox").exists(),
        "this test needs root, /dev/fuse, /dev/loop-control and a static /bin/busybox"
    );
    let t = tempfile::tempdir().unwrap();
    let work = t.path().join("work");
    std::fs::create_dir(&work).unwrap();
    (t, work)
}

/// A layer with a static busybox, /proc and /dev: enough for a command to run in.
fn busybox_layer() -> Layer {
    let mut l = Layer::new();
    l.dir("bin", 0o755)
        .file(
            "bin/busybox",
            &std::fs::read("/bin/busybox").unwrap(),
            0o755,
        )
        .dir("proc", 0o555)
        .dir("dev", 0o755);
    l
}

/// `ovbd record-trace --json --frontend fuse --workdir WORK EXTRA... FROM TO -- CMD...`.
fn record_trace(work: &Path, extra: &[&str], from: &str, to: &str, cmd: &[&str]) -> Output {
    let mut args = vec!["record-trace", "--json", "--frontend", "fuse", "--workdir"];
    args.push(s(work));
    args.extend_from_slice(extra);
    args.extend_from_slice(&[from, to, "--"]);
    args.extend_from_slice(cmd);
    ovbd(&args)
}

/// `ovbd record-trace`: a command run in a converted image leaves a trace of its reads in
/// upstream's format, on top of the image; `ovbd device attach` replays exactly those reads;
/// recording again replaces the trace; `--time` ends a command that runs on; bad input fails
/// clearly and leaves nothing mounted and nothing written.
#[test]
fn record_trace_round_trips() {
    let (t, work) = record_trace_scratch();
    // A failed or stopped recording leaves no destination, no mount and no scratch.
    let left_nothing = |dst: &Path| {
        assert!(
            !dst.join("index.json").exists(),
            "{} written",
            dst.display()
        );
        let mounts = mounts_under(t.path());
        assert!(mounts.is_empty(), "{mounts:?}");
        let scratch = std::fs::read_dir(&work).unwrap().count();
        assert_eq!(scratch, 0, "scratch left behind");
    };
    let conf: Vec<u8> = (0..300u32 << 10)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut l = busybox_layer();
    l.symlink("bin/cat", "busybox")
        .symlink("bin/sleep", "busybox")
        .dir("etc", 0o755)
        .file("etc/app.conf", &conf, 0o644);
    let src = write_layout(&t.path().join("src"), "v1", &[l.tar()]);
    let obd = convert(&src, &t.path().join("obd"), &[]);
    let obd_ref = format!("oci:{}:obd", obd.layout.display());
    let record = |from: &str, to: &str, extra: &[&str], cmd: &[&str]| {
        record_trace(&work, extra, from, to, cmd)
    };

    let out = t.path().join("traced");
    let traced = format!("oci:{}:trace", out.display());
    let o = record(&obd_ref, &traced, &[], &["/bin/cat", "/etc/app.conf"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["command"], "exit 0");
    let (m, records) = trace_of(&out, summary["manifest"].as_str().unwrap());
    assert_eq!(m["layers"].as_array().unwrap().len(), 2);
    assert_eq!(m["layers"][0]["digest"], obd.summary["layers"][0]["digest"]);
    assert_eq!(records.len() as u64, summary["records"].as_u64().unwrap());
    assert!(records
        .iter()
        .all(|r| r.layer_index == 0 && r.op == ovbd_format::trace::TraceOp::Read));
    let bytes: u64 = records.iter().map(|r| r.count).sum();
    assert_eq!(bytes, summary["bytes"].as_u64().unwrap());
    // cat read the whole file (plus the filesystem's metadata and the binary).
    assert!(bytes > conf.len() as u64, "{bytes} bytes recorded");
    assert!(
        mounts_under(t.path()).is_empty(),
        "{:?}",
        mounts_under(t.path())
    );

    // Replayed at attach: as many reads as records, none failed or skipped.
    let accel = t.path().join("accel");
    std::fs::create_dir(&accel).unwrap();
    let top = m["layers"][1]["digest"].as_str().unwrap();
    tar::Archive::new(std::fs::File::open(out.join("blobs/sha256").join(&top[7..])).unwrap())
        .unpack(&accel)
        .unwrap();
    let cfg = t.path().join("config.v1.json");
    let config = serde_json::json!({"lowers": [{"file": obd.blobs()[0]}, {"dir": accel}],
        "accelerationLayer": true});
    std::fs::write(&cfg, serde_json::to_vec(&config).unwrap()).unwrap();
    let run_dir = t.path().join("run");
    let attach = Command::new(env!("CARGO_BIN_EXE_ovbd"))
        .args([
            "device",
            "attach",
            "--background",
            "--frontend",
            "fuse",
            s(&cfg),
        ])
        .env("OVBD_RUN_DIR", &run_dir)
        .env("OVBD_LOG", "info")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(
        attach.status.success(),
        "{}",
        String::from_utf8_lossy(&attach.stderr)
    );
    let dev = String::from_utf8_lossy(&attach.stdout).trim().to_owned();
    let want = format!(
        "{} reads, {bytes} bytes, 0 failed, 0 skipped",
        records.len()
    );
    let mut logged = String::new();
    for _ in 0..100 {
        logged = std::fs::read_dir(run_dir.join("logs"))
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect();
        if logged.contains("prefetch of") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let detach = Command::new(env!("CARGO_BIN_EXE_ovbd"))
        .args(["device", "detach", &dev])
        .env("OVBD_RUN_DIR", &run_dir)
        .output()
        .unwrap();
    assert!(
        detach.status.success(),
        "{}",
        String::from_utf8_lossy(&detach.stderr)
    );
    assert!(logged.contains(&want), "want {want:?} in:\n{logged}");

    // CMD's confinement: its own root (the host's tree out of reach), its own /dev, no
    // CAP_SYS_ADMIN (21) or CAP_MKNOD (27) in its bounding set.
    let o = record(
        &obd_ref,
        &format!("oci:{}:x", t.path().join("confined").display()),
        &[],
        &[
            "/bin/busybox",
            "sh",
            "-c",
            &format!(
                "busybox grep CapBnd /proc/self/status; busybox ls /dev; busybox test -e {} && echo HOST",
                t.path().display()
            ),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let bnd = err
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap_or_else(|| panic!("no CapBnd in {err}"));
    assert_eq!(bnd & (1 << 21 | 1 << 27), 0, "CapBnd {bnd:x}");
    assert!(bnd & 1 != 0, "CapBnd {bnd:x}: CAP_CHOWN dropped too");
    assert!(
        err.contains("urandom") && !err.contains("loop-control"),
        "{err}"
    );
    assert!(!err.contains("HOST"), "the host's tree is visible: {err}");

    // ...its own PID namespace: CMD is its pid 1, cannot signal the host's processes (as root
    // with CAP_KILL it could otherwise kill any of them), and what it leaves running ends with
    // it, a daemon that left its process group too.
    let me = std::process::id();
    let marker = "31337.5";
    let o = record(
        &obd_ref,
        &format!("oci:{}:x", t.path().join("pidns").display()),
        &[],
        &[
            "/bin/busybox",
            "sh",
            "-c",
            &format!(
                "echo PID=$$; busybox kill -0 {me} && echo SIGNALLED; \
                 busybox setsid busybox sleep {marker} </dev/null >/dev/null 2>&1 & \
                 busybox sleep 0.2; echo done"
            ),
        ],
    );
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(marker))
        .collect();
    if !left.is_empty() {
        let _ = Command::new("pkill").args(["-9", "-f", marker]).status();
    }
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("done"), "{err}");
    assert!(
        err.contains("PID=1\n"),
        "CMD is not its namespace's pid 1: {err}"
    );
    assert!(
        !err.contains("SIGNALLED"),
        "CMD could signal a host process: {err}"
    );
    assert!(left.is_empty(), "CMD's daemon outlived it: {left:?}");

    // ...and /proc as a container has it (runc's read-only and masked paths): root in the
    // host's user namespace, CMD could otherwise set kernel.core_pattern (a program the
    // kernel runs as host root at the next crash) or read the host's timers in /proc; and the
    // system calls Docker's seccomp profile refuses are refused.
    let o = record(
        &obd_ref,
        &format!("oci:{}:x", t.path().join("procfs").display()),
        &[],
        &[
            "/bin/busybox",
            "sh",
            "-c",
            // (busybox's `test -w` is true for root whatever the mount; the hostname is
            // CMD's own UTS namespace's, so the write, if it lands, changes nothing outside.)
            "echo ovbd-record > /proc/sys/kernel/hostname && echo WRITABLE; \
             echo TIMERS=$(busybox cat /proc/timer_list 2>/dev/null | busybox wc -c); \
             busybox unshare -U busybox true && echo USERNS; \
             busybox grep Seccomp: /proc/self/status; \
             busybox test -r /proc/self/status && echo PROC",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("PROC"), "{err}");
    assert!(!err.contains("WRITABLE"), "/proc/sys is writable: {err}");
    // A user namespace would give CMD every capability again (in it), and with them the
    // kernel's whole unprivileged-namespace surface: refused, as Docker's seccomp profile does.
    assert!(!err.contains("USERNS"), "CMD made a user namespace: {err}");
    assert!(err.contains("Seccomp:\t2\n"), "no seccomp filter: {err}");
    assert!(
        err.contains("TIMERS=0\n") || !Path::new("/proc/timer_list").exists(),
        "/proc/timer_list is not masked: {err}"
    );

    // Recording the traced image again replaces its trace; --time ends a command that runs on.
    let again = t.path().join("again");
    let o = record(
        &traced,
        &format!("oci:{}:trace", again.display()),
        &["--time", "1"],
        &["/bin/sleep", "60"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["command"], "killed after 1 s");
    let (m, _) = trace_of(&again, summary["manifest"].as_str().unwrap());
    assert_eq!(m["layers"].as_array().unwrap().len(), 2);
    let cfg_blob = std::fs::read(
        again
            .join("blobs/sha256")
            .join(&m["config"]["digest"].as_str().unwrap()[7..]),
    )
    .unwrap();
    let c: serde_json::Value = serde_json::from_slice(&cfg_blob).unwrap();
    assert_eq!(c["rootfs"]["diff_ids"].as_array().unwrap().len(), 2);
    assert!(
        mounts_under(t.path()).is_empty(),
        "{:?}",
        mounts_under(t.path())
    );

    // A signal while CMD runs stops it and takes down the device and mounts; nothing is written.
    let stopped = t.path().join("stopped");
    let child = Command::new(env!("CARGO_BIN_EXE_ovbd"))
        .args([
            "record-trace",
            "--frontend",
            "fuse",
            "--workdir",
            s(&work),
            &obd_ref,
        ])
        .arg(format!("oci:{}:x", stopped.display()))
        .args(["--", "/bin/sleep", "60"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !mounts_under(&work).iter().any(|m| m.ends_with("/rootfs")) {
        assert!(t0.elapsed().as_secs() < 60, "the image was never mounted");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: kill(2) of our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("interrupted"), "{err}");
    left_nothing(&stopped);

    // Bad input: a source that is not OverlayBD; a command the image does not have.
    for (from, cmd, says) in [
        (src.as_str(), "/bin/cat", "is not an OverlayBD layer"),
        (
            obd_ref.as_str(),
            "/bin/nope",
            "running /bin/nope in the image",
        ),
    ] {
        let bad = t.path().join("bad");
        let o = record(from, &format!("oci:{}:x", bad.display()), &[], &[cmd]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{err}");
        left_nothing(&bad);
    }
}

/// The cgroups `ovbd record-trace` left behind: directories named `ovbd-record-PID` in the
/// cgroup hierarchies this process is in (where it makes CMD's) and at their roots, whose
/// PID has ended (a recording running alongside keeps its own).
fn leaked_record_cgroups() -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let mut found = Vec::new();
    for l in mountinfo.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        let Some(dash) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        let (mnt, fstype) = (f[4], f[dash + 1]);
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        let opts = f.get(dash + 3).copied().unwrap_or("");
        for line in own.lines() {
            let mut p = line.splitn(3, ':');
            let (_, ctrls, path) = (p.next(), p.next().unwrap_or(""), p.next().unwrap_or(""));
            let ours = match fstype {
                "cgroup2" => ctrls.is_empty(),
                _ => !ctrls.is_empty() && ctrls.split(',').all(|c| opts.split(',').any(|o| o == c)),
            };
            if !ours {
                continue;
            }
            for dir in [
                Path::new(mnt).join(path.trim_start_matches('/')),
                PathBuf::from(mnt),
            ] {
                let Ok(rd) = std::fs::read_dir(&dir) else {
                    continue;
                };
                found.extend(
                    rd.filter_map(|e| e.ok())
                        .filter(|e| {
                            let name = e.file_name().to_string_lossy().into_owned();
                            name.strip_prefix("ovbd-record-")
                                .is_some_and(|pid| !Path::new("/proc").join(pid).exists())
                        })
                        .map(|e| e.path()),
                );
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// CMD (its image publisher's choice) runs in a cgroup of its own: a fork bomb stops at
/// `--pids`, a memory hog is killed at `--memory-mb` and the summary says so, and the cgroups
/// are gone afterwards; its writes stop at `--scratch-mb`.
#[test]
fn record_trace_limits_what_cmd_can_take() {
    let (t, work) = record_trace_scratch();
    let src = write_layout(&t.path().join("src"), "v1", &[busybox_layer().tar()]);
    let obd = convert(&src, &t.path().join("obd"), &[]);
    let obd_ref = format!("oci:{}:obd", obd.layout.display());
    let record = |dst: &str, extra: &[&str], cmd: &[&str]| {
        let dst = format!("oci:{}:x", t.path().join(dst).display());
        record_trace(&work, extra, &obd_ref, &dst, cmd)
    };

    // 64 background sleeps against a limit of 32 processes: forks are refused, and said so.
    let o = record(
        "forks",
        &["--pids", "32", "--time", "20"],
        &[
            "/bin/busybox",
            "sh",
            "-c",
            "for i in $(busybox seq 64); do busybox sleep 30 & done; echo ALL-FORKED",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("can't fork"), "no fork was refused: {err}");
    assert!(
        !err.contains("ALL-FORKED"),
        "64 forks under --pids 32: {err}"
    );
    assert!(err.contains("process limit (32)"), "{err}");

    // How CMD ended (the summary's word) and the recording's stderr; the recording succeeds.
    let ended = |dst: &str, extra: &[&str], cmd: &[&str]| {
        let o = record(dst, extra, cmd);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{extra:?}: {err}");
        let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (summary["command"].as_str().unwrap().to_owned(), err)
    };
    let dd = |of: &'static str, bs: &'static str, count: &'static str| {
        ["/bin/busybox", "dd", "if=/dev/zero", of, bs, count]
    };

    // A 96 MiB buffer under a 64 MiB limit: CMD is killed, and the summary says why.
    let (how, err) = ended(
        "memory",
        &["--memory-mb", "64"],
        &dd("of=/dev/null", "bs=96M", "count=1"),
    );
    assert_eq!(how, "killed: out of memory (limit 64 MiB)", "{err}");

    // 64 MiB written under a scratch limit of 16 MiB: the writes fail (ENOSPC), and CMD
    // with them; under the default limit they fit.
    let write64 = [&dd("of=/big", "bs=1M", "count=64")[..], &["conv=fsync"]].concat();
    let (how, err) = ended("scratch", &["--scratch-mb", "16"], &write64);
    assert_ne!(how, "exit 0", "64 MiB written: {err}");
    assert!(
        err.contains("full: the layer may take 16777216 bytes"),
        "{err}"
    );
    let (how, err) = ended("scratch-fits", &[], &write64);
    assert_eq!(how, "exit 0", "{err}");

    // Within its limits CMD runs as before; --no-limits runs it with none.
    for extra in [&[][..], &["--no-limits"][..]] {
        let (how, err) = ended("fits", extra, &dd("of=/dev/null", "bs=1M", "count=1"));
        assert_eq!(how, "exit 0", "{extra:?}: {err}");
    }
    let leaked = leaked_record_cgroups();
    assert!(leaked.is_empty(), "CMD's cgroups left behind: {leaked:?}");
    let o = record(
        "both",
        &["--no-limits", "--pids", "64"],
        &["/bin/busybox", "true"],
    );
    assert!(!o.status.success());
}
