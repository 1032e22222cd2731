use super::*;
use crate::testing::*;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};

use std::time::Duration;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/hello-world-oci"
);
const AMD64: &str = "sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3";
const AMD64_LAYER: &str = "sha256:719385e32844401d57ecfd3eacab360bf551a1491c05b85806ed8f1b08d792f6";
const AMD64_CONFIG: &str =
    "sha256:9c7a54a9a43cca047013b82af109fe963fde787f63f9e016fdc3384500c2823d";
const CONVERTED: &str = "sha256:42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88";
const CONVERTED_LAYER: &str =
    "sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d";
const ARM64: &str = "sha256:efebf0f7aee69450f99deafe11121afa720abed733943e50581a9dc7540689c8";

fn io() -> ImageIo {
    ImageIo::new(RegistryOptions::default()).unwrap()
}

fn fixture(tag: &str) -> ImageRef {
    ImageRef::parse(&format!("oci:{FIXTURE}:{tag}")).unwrap()
}

fn sha256_file(p: &Path) -> String {
    sha256_digest(&fs::read(p).unwrap()).to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            fs::copy(e.path(), dest).unwrap();
        }
    }
}

fn err_text(e: anyhow::Error) -> String {
    format!("{e:#}")
}

// -------------------------------------------------------------------------- references

#[test]
fn parse_references() {
    let d64 = "sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3";
    let layout = |dir: &str, target: LayoutTarget| ImageRef::Layout {
        dir: dir.into(),
        target,
    };
    let tag = |t: &str| LayoutTarget::Tag(t.into());
    let by_digest = format!("oci:dir@{d64}");
    let cases: Vec<(&str, ImageRef)> = vec![
        ("oci:some/dir:amd64", layout("some/dir", tag("amd64"))),
        ("oci:/abs/dir:v1.0_x-y", layout("/abs/dir", tag("v1.0_x-y"))),
        ("oci:dir", layout("dir", LayoutTarget::Only)),
        ("oci:/a:b/c", layout("/a:b/c", LayoutTarget::Only)),
        ("oci:/a:b/c:t", layout("/a:b/c", tag("t"))),
        (
            &by_digest,
            layout("dir", LayoutTarget::Digest(d64.parse().unwrap())),
        ),
    ];
    for (s, want) in cases {
        let got = ImageRef::parse(s).unwrap_or_else(|e| panic!("{s}: {e:#}"));
        assert_eq!(got, want, "{s}");
        assert_eq!(got.to_string(), s, "display of {s}");
    }

    // (reference, registry, repository, tag, digest)
    type Case<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, Option<&'a str>);
    let registry: Vec<Case> = vec![
        ("busybox", "docker.io", "library/busybox", Some("latest"), None),
        ("docker://busybox:1.36", "docker.io", "library/busybox", Some("1.36"), None),
        ("library/busybox", "docker.io", "library/busybox", Some("latest"), None),
        ("index.docker.io/foo/bar", "docker.io", "foo/bar", Some("latest"), None),
        ("ghcr.io/a/b/c:t", "ghcr.io", "a/b/c", Some("t"), None),
        ("localhost:5000/foo:t", "localhost:5000", "foo", Some("t"), None),
        ("localhost/foo", "localhost", "foo", Some("latest"), None),
        ("127.0.0.1:5000/hello-world@sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3",
         "127.0.0.1:5000", "hello-world", None, Some(d64)),
        ("reg.io:443/x:t@sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3",
         "reg.io:443", "x", Some("t"), Some(d64)),
    ];
    for (s, reg, repo, tag, digest) in registry {
        let ImageRef::Registry(r) = ImageRef::parse(s).unwrap_or_else(|e| panic!("{s}: {e:#}"))
        else {
            panic!("{s}: not a registry reference");
        };
        assert_eq!(
            (r.registry(), r.repository(), r.tag(), r.digest()),
            (reg, repo, tag, digest),
            "{s}"
        );
    }
    assert_eq!(
        ImageRef::parse("busybox").unwrap().to_string(),
        "docker.io/library/busybox:latest"
    );

    let bad: Vec<(&str, &str)> = vec![
        ("oci:", "needs a directory"),
        ("oci:dir:", "bad tag"),
        ("oci::tag", "needs a directory"),
        ("oci:dir:bad tag", "bad tag"),
        ("oci:dir:-x", "bad tag"),
        ("oci:dir@sha256:abc", "bad digest"),
        (
            "oci:@sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3",
            "needs a directory",
        ),
        (
            "oci:dir@md5:d41d8cd98f00b204e9800998ecf8427e",
            "only sha256",
        ),
        ("", "image reference"),
        ("Busybox", "image reference"),
        ("Jdock00/library/busybox", "is not lowercase"),
        ("a//b", "image reference"),
        ("busybox@sha256:abc", "image reference"),
        ("busybox:bad tag", "image reference"),
    ];
    for (s, want) in bad {
        match ImageRef::parse(s) {
            Ok(r) => panic!("{s:?} parsed as {r:?}"),
            Err(e) => {
                let e = err_text(e);
                assert!(e.contains(want), "{s:?}: {e}");
            }
        }
    }
}

/// The reference parser against oci-spec's (the regex of distribution's grammar): on ASCII
/// strings built from the grammar's pieces, both take or refuse the same ones and split them
/// the same way.
#[test]
fn registry_references_parse_as_oci_spec_parses_them() {
    let d = |n: usize| "0123456789abcdef".repeat(8)[..n].to_string();
    let pieces: Vec<String> = [
        "a",
        "b9",
        "Z",
        "x-y",
        "--",
        ".",
        "_",
        "__",
        "___",
        "-",
        "/",
        "//",
        ":",
        ":5000",
        "@",
        "localhost",
        "index.docker.io",
        "docker.io",
        "reg.io",
        "127.0.0.1",
        "my-host.local",
        "library",
        "v1.0",
        ":latest",
        ":_t",
        ":-t",
        ":.t",
        "sha256:",
        "md5:",
        "sha512:",
        "SHA256:",
        "a+b.c:",
        " ",
        "é",
    ]
    .iter()
    .map(|p| p.to_string())
    .chain([
        d(32),
        d(64),
        d(96),
        d(128),
        format!("@sha256:{}", d(64)),
        "A".repeat(140),
    ])
    .collect();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let mut agreed = (0, 0);
    for _ in 0..30_000 {
        let len = 1 + next(7);
        let s: String = (0..len)
            .map(|_| pieces[next(pieces.len())].as_str())
            .collect();
        let ours = reference::parse_registry_ref(&s);
        let theirs = s.parse::<Reference>();
        let split = |r: &Reference| {
            let (g, p, t, d) = (r.registry(), r.repository(), r.tag(), r.digest());
            (
                g.to_owned(),
                p.to_owned(),
                t.map(str::to_owned),
                d.map(str::to_owned),
            )
        };
        match (&ours, &theirs) {
            (Ok(a), Ok(b)) => {
                assert_eq!(split(a), split(b), "{s:?}");
                agreed.0 += 1;
            }
            (Err(_), Err(_)) => agreed.1 += 1,
            // oci-spec's tag is Unicode `\w`; Docker's (and ours) is ASCII.
            (Err(e), Ok(_)) if !s.is_ascii() && e.contains("bad tag") => {}
            _ => panic!("{s:?}: ours {ours:?}, oci-spec {theirs:?}"),
        }
    }
    // Both sides of the grammar were tried.
    assert!(agreed.0 > 1000 && agreed.1 > 1000, "{agreed:?}");
}

#[test]
fn platforms() {
    assert_eq!(Platform::default().to_string(), "linux/amd64");
    let p: Platform = "linux/arm64/v8".parse().unwrap();
    assert_eq!(p.variant.as_deref(), Some("v8"));
    for bad in ["linux", "linux/", "/amd64", "a/b/c/d", ""] {
        assert!(bad.parse::<Platform>().is_err(), "{bad}");
    }
    let cases = [
        ("linux/amd64", ("linux", "amd64", None), true),
        ("linux/amd64", ("linux", "x86_64", None), true),
        ("linux/amd64", ("linux", "amd64", Some("v3")), true),
        ("linux/amd64", ("windows", "amd64", None), false),
        ("linux/amd64", ("linux", "arm64", None), false),
        ("linux/arm64", ("linux", "arm64", Some("v8")), true),
        ("linux/arm64", ("linux", "aarch64", None), true),
        ("linux/arm64/v8", ("linux", "arm64", None), true),
        ("linux/arm", ("linux", "arm", Some("v7")), true),
        ("linux/arm", ("linux", "arm", Some("v5")), false),
        ("linux/arm/v5", ("linux", "arm", Some("v5")), true),
        ("linux/arm/v6", ("linux", "arm", Some("v7")), false),
    ];
    for (want, (os, arch, var), expected) in cases {
        let p: Platform = want.parse().unwrap();
        assert_eq!(
            p.matches(os, arch, var),
            expected,
            "{want} vs {os}/{arch}/{var:?}"
        );
    }
}

#[test]
fn docker_config_path_given_wins_over_the_environment() {
    let path = PathBuf::from("/etc/ovbd/docker-config.json");
    let opts = RegistryOptions {
        docker_config: Some(path.clone()),
        ..Default::default()
    };
    assert_eq!(opts.docker_config_path(), Some(path));
}

// ------------------------------------------------------------------------------ layouts

#[test]
fn resolve_layout() {
    let io = io();
    let amd64 = io.resolve(&fixture("amd64"), &Platform::default()).unwrap();
    assert_eq!(amd64.manifest_digest.as_ref(), AMD64);
    assert_eq!(amd64.manifest_media_type, MEDIA_DOCKER_MANIFEST);
    assert_eq!(sha256_digest(&amd64.manifest_raw).as_ref(), AMD64);
    assert_eq!(amd64.config.digest().as_ref(), AMD64_CONFIG);
    assert_eq!(sha256_digest(&amd64.config_raw).as_ref(), AMD64_CONFIG);
    assert_eq!(amd64.config_raw.len() as u64, amd64.config.size());
    assert_eq!(amd64.layers.len(), 1);
    assert_eq!(amd64.layers[0].digest().as_ref(), AMD64_LAYER);
    assert_eq!(amd64.layers[0].size(), 2457);
    assert_eq!(
        amd64.layers[0].media_type().as_ref(),
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    assert_eq!(amd64.manifest_raw.len(), 525);

    // The manifest list, linux/amd64: the same manifest.
    let list = io
        .resolve(&fixture("docker-list"), &Platform::default())
        .unwrap();
    assert_eq!(list.manifest_digest.as_ref(), AMD64);
    assert_eq!(list.manifest_raw, amd64.manifest_raw);
    assert_eq!(list.layers, amd64.layers);
    let arm64 = io
        .resolve(&fixture("docker-list"), &"linux/arm64".parse().unwrap())
        .unwrap();
    assert_eq!(arm64.manifest_digest.as_ref(), ARM64);
    let e = err_text(
        io.resolve(&fixture("docker-list"), &"linux/sparc64".parse().unwrap())
            .unwrap_err(),
    );
    assert!(
        e.contains("no linux/sparc64 image") && e.contains("linux/amd64"),
        "{e}"
    );

    // By digest: listed in index.json, or reachable only through the list.
    let by_digest = ImageRef::parse(&format!("oci:{FIXTURE}@{AMD64}")).unwrap();
    assert_eq!(
        io.resolve(&by_digest, &Platform::default())
            .unwrap()
            .manifest_digest
            .as_ref(),
        AMD64
    );

    // The converted OverlayBD image: an OCI manifest with annotated layers.
    let obd = io
        .resolve(&fixture("amd64-converted"), &Platform::default())
        .unwrap();
    assert_eq!(obd.manifest_digest.as_ref(), CONVERTED);
    assert_eq!(obd.manifest_media_type, MEDIA_OCI_MANIFEST);
    assert_eq!(obd.layers[0].digest().as_ref(), CONVERTED_LAYER);
    assert_eq!(obd.layers[0].size(), 642560);
    let ann = obd.layers[0].annotations().as_ref().unwrap();
    assert_eq!(ann["containerd.io/snapshot/overlaybd/version"], "0.1.0");

    // Errors name what is missing.
    let e = err_text(
        io.resolve(&fixture("no-such-tag"), &Platform::default())
            .unwrap_err(),
    );
    assert!(
        e.contains("\"no-such-tag\"") && e.contains("amd64-converted"),
        "{e}"
    );
    let e = err_text(
        io.resolve(
            &ImageRef::parse(&format!("oci:{FIXTURE}")).unwrap(),
            &Platform::default(),
        )
        .unwrap_err(),
    );
    assert!(e.contains("oci:DIR:TAG"), "{e}");
    let e = err_text(
        io.resolve(
            &ImageRef::parse("oci:/nonexistent/layout:x").unwrap(),
            &Platform::default(),
        )
        .unwrap_err(),
    );
    assert!(e.contains("/nonexistent/layout/index.json"), "{e}");
}

#[test]
fn fetch_blob_from_layout() {
    let io = io();
    let img = io.resolve(&fixture("amd64"), &Platform::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("sub/layer.tar.gz");
    io.fetch_blob(&img.reference, &img.layers[0], &dest)
        .unwrap();
    assert_eq!(sha256_file(&dest), AMD64_LAYER);

    // A corrupted copy of the layout: a flipped byte in the layer, same size.
    let bad = tmp.path().join("bad");
    copy_dir(Path::new(FIXTURE), &bad);
    let blob = bad.join("blobs/sha256").join(&AMD64_LAYER[7..]);
    let mut bytes = fs::read(&blob).unwrap();
    bytes[100] ^= 0x01;
    fs::write(&blob, &bytes).unwrap();
    let bad_ref = ImageRef::parse(&format!("oci:{}:amd64", bad.display())).unwrap();
    let dest2 = tmp.path().join("bad-layer");
    let e = err_text(io.fetch_blob(&bad_ref, &img.layers[0], &dest2).unwrap_err());
    assert!(
        e.contains(AMD64_LAYER) && e.contains("digest mismatch"),
        "{e}"
    );
    assert!(e.contains(&blob.display().to_string()), "{e}");
    assert!(!dest2.exists(), "a failed download leaves no file");
    // The earlier download is not touched by a failed one over it.
    let e = err_text(io.fetch_blob(&bad_ref, &img.layers[0], &dest).unwrap_err());
    assert!(e.contains(AMD64_LAYER), "{e}");
    assert_eq!(sha256_file(&dest), AMD64_LAYER);

    // Truncated: the size is wrong.
    fs::write(&blob, &bytes[..1000]).unwrap();
    let e = err_text(io.fetch_blob(&bad_ref, &img.layers[0], &dest2).unwrap_err());
    assert!(e.contains(AMD64_LAYER) && e.contains("1000 bytes"), "{e}");

    // A corrupted config fails the resolve, naming it.
    let config = bad.join("blobs/sha256").join(&AMD64_CONFIG[7..]);
    let mut c = fs::read(&config).unwrap();
    c[10] ^= 0x20;
    fs::write(&config, &c).unwrap();
    let e = err_text(io.resolve(&bad_ref, &Platform::default()).unwrap_err());
    assert!(
        e.contains(AMD64_CONFIG) && e.contains("digest mismatch"),
        "{e}"
    );

    // Leftover temporary files: none.
    let names: Vec<_> = fs::read_dir(tmp.path().join("sub"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("layer.tar.gz")]);
}

/// Downloads `img`'s layers into `dir`; returns them as files to write.
fn download_layers(io: &ImageIo, img: &ResolvedImage, dir: &Path) -> Vec<LayerFile> {
    img.layers
        .iter()
        .map(|l| {
            let path = dir.join(l.digest().digest());
            io.fetch_blob(&img.reference, l, &path).unwrap();
            LayerFile {
                descriptor: l.clone(),
                path,
            }
        })
        .collect()
}

fn to_write<'a>(img: &'a ResolvedImage, layers: &'a [LayerFile]) -> ImageToWrite<'a> {
    ImageToWrite {
        layers,
        config: &img.config_raw,
        manifest: &img.manifest_raw,
        manifest_media_type: &img.manifest_media_type,
    }
}

fn index_entries(dir: &Path) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    v["manifests"].as_array().unwrap().clone()
}

#[test]
fn layout_round_trip() {
    let io = io();
    let tmp = tempfile::tempdir().unwrap();
    let src = io.resolve(&fixture("amd64"), &Platform::default()).unwrap();
    let layers = download_layers(&io, &src, tmp.path());
    let out = tmp.path().join("out");
    let dst = ImageRef::parse(&format!("oci:{}:v1", out.display())).unwrap();
    let desc = io.write_image(&dst, &to_write(&src, &layers)).unwrap();
    assert_eq!(desc.digest().as_ref(), AMD64);
    assert_eq!(desc.size(), 525);
    assert_eq!(
        fs::read_to_string(out.join("oci-layout")).unwrap(),
        r#"{"imageLayoutVersion":"1.0.0"}"#
    );
    let entries = index_entries(&out);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["digest"], AMD64);
    assert_eq!(entries[0]["mediaType"], MEDIA_DOCKER_MANIFEST);
    assert_eq!(entries[0]["annotations"][ANNOTATION_REF_NAME], "v1");
    assert_eq!(entries[0]["platform"]["architecture"], "amd64");
    assert_eq!(entries[0]["platform"]["os"], "linux");

    {
        use std::os::unix::fs::PermissionsExt as _;
        for f in [
            out.join("index.json"),
            out.join("blobs/sha256").join(&AMD64_LAYER[7..]),
        ] {
            let mode = fs::metadata(&f).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644, "{}", f.display());
        }
    }

    let back = io.resolve(&dst, &Platform::default()).unwrap();
    assert_eq!(back.manifest_digest, src.manifest_digest);
    assert_eq!(back.manifest_raw, src.manifest_raw);
    assert_eq!(back.config_raw, src.config_raw);
    assert_eq!(back.layers, src.layers);
    let again = tmp.path().join("again");
    io.fetch_blob(&dst, &back.layers[0], &again).unwrap();
    assert_eq!(sha256_file(&again), AMD64_LAYER);

    // A second tag, then the first tag re-written with another image: replaced.
    let dst2 = ImageRef::parse(&format!("oci:{}:v2", out.display())).unwrap();
    io.write_image(&dst2, &to_write(&src, &layers)).unwrap();
    let obd = io
        .resolve(&fixture("amd64-converted"), &Platform::default())
        .unwrap();
    let obd_layers = download_layers(&io, &obd, tmp.path());
    io.write_image(&dst, &to_write(&obd, &obd_layers)).unwrap();
    let entries = index_entries(&out);
    let tagged = |t: &str| -> Vec<&serde_json::Value> {
        entries
            .iter()
            .filter(|e| e["annotations"][ANNOTATION_REF_NAME] == t)
            .collect()
    };
    assert_eq!(entries.len(), 2);
    assert_eq!(tagged("v1").len(), 1);
    assert_eq!(tagged("v1")[0]["digest"], CONVERTED);
    assert_eq!(tagged("v2")[0]["digest"], AMD64);
    assert_eq!(
        io.resolve(&dst, &Platform::default())
            .unwrap()
            .manifest_digest
            .as_ref(),
        CONVERTED
    );
    assert_eq!(
        io.resolve(&dst2, &Platform::default())
            .unwrap()
            .manifest_digest
            .as_ref(),
        AMD64
    );

    // Blobs already in the layout need not be given again.
    let dst3 = ImageRef::parse(&format!("oci:{}:v3", out.display())).unwrap();
    io.write_image(&dst3, &to_write(&src, &[])).unwrap();

    // No temporary files left behind.
    let mut names: Vec<String> = fs::read_dir(out.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = [AMD64, AMD64_CONFIG, AMD64_LAYER, CONVERTED, CONVERTED_LAYER]
        .iter()
        .map(|d| d[7..].to_owned())
        .chain([obd.config.digest().digest().to_owned()])
        .collect();
    want.sort();
    assert_eq!(names, want);
    let top: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(top.is_empty(), "{top:?}");
}

#[test]
fn layout_write_errors() {
    let io = io();
    let tmp = tempfile::tempdir().unwrap();
    let src = io.resolve(&fixture("amd64"), &Platform::default()).unwrap();
    let layers = download_layers(&io, &src, tmp.path());
    let out = tmp.path().join("out");
    let dst = ImageRef::parse(&format!("oci:{}:v1", out.display())).unwrap();

    // A missing layer: nothing is written (no index.json).
    let e = err_text(io.write_image(&dst, &to_write(&src, &[])).unwrap_err());
    assert!(
        e.contains(AMD64_LAYER) && e.contains("neither given"),
        "{e}"
    );
    assert!(!out.join("index.json").exists());

    // No tag.
    let no_tag = ImageRef::parse(&format!("oci:{}", out.display())).unwrap();
    let e = err_text(
        io.write_image(&no_tag, &to_write(&src, &layers))
            .unwrap_err(),
    );
    assert!(e.contains("needs a tag"), "{e}");

    // The wrong config, the wrong media type, a layer file of the wrong content.
    let mut img = to_write(&src, &layers);
    img.config = b"{}";
    let e = err_text(io.write_image(&dst, &img).unwrap_err());
    assert!(e.contains("not the manifest's"), "{e}");
    let mut img = to_write(&src, &layers);
    img.manifest_media_type = MEDIA_OCI_MANIFEST;
    let e = err_text(io.write_image(&dst, &img).unwrap_err());
    assert!(e.contains("says it is"), "{e}");
    let mut bytes = fs::read(&layers[0].path).unwrap();
    bytes[7] ^= 0xff;
    let wrong = tmp.path().join("wrong");
    fs::write(&wrong, &bytes).unwrap();
    let wrong_layers = [LayerFile {
        descriptor: layers[0].descriptor.clone(),
        path: wrong.clone(),
    }];
    let e = err_text(
        io.write_image(&dst, &to_write(&src, &wrong_layers))
            .unwrap_err(),
    );
    assert!(
        e.contains(AMD64_LAYER) && e.contains(&wrong.display().to_string()),
        "{e}"
    );
    assert!(!out.join("blobs/sha256").join(&AMD64_LAYER[7..]).exists());
    assert!(!out.join("index.json").exists());
}

// ---------------------------------------------------------------------------- registries

fn registry_ref(addr: &str, name: &str) -> ImageRef {
    ImageRef::parse(&format!("{addr}/{name}")).unwrap()
}

#[test]
fn registry_push_pull_round_trip() {
    let reg = start_registry("");
    let io = io();
    let tmp = tempfile::tempdir().unwrap();
    let src = io.resolve(&fixture("amd64"), &Platform::default()).unwrap();
    let layers = download_layers(&io, &src, tmp.path());

    // A layer neither given nor in the registry: nothing is pushed, not even a blob.
    let dst = registry_ref(&reg.addr, "hello-world:amd64");
    let e = err_text(io.write_image(&dst, &to_write(&src, &[])).unwrap_err());
    assert!(
        e.contains(AMD64_LAYER) && e.contains("neither given"),
        "{e}"
    );
    assert_eq!(
        http_status(&reg.addr, &format!("/v2/hello-world/blobs/{AMD64_CONFIG}")),
        Some(404)
    );
    assert!(io.resolve(&dst, &Platform::default()).is_err());

    let desc = io.write_image(&dst, &to_write(&src, &layers)).unwrap();
    assert_eq!(desc.digest().as_ref(), AMD64);
    let back = io.resolve(&dst, &Platform::default()).unwrap();
    assert_eq!(back.manifest_digest.as_ref(), AMD64);
    assert_eq!(back.manifest_media_type, MEDIA_DOCKER_MANIFEST);
    assert_eq!(back.manifest_raw, src.manifest_raw);
    assert_eq!(back.config_raw, src.config_raw);
    assert_eq!(back.layers, src.layers);
    let got = tmp.path().join("pulled");
    io.fetch_blob(&dst, &back.layers[0], &got).unwrap();
    assert_eq!(sha256_file(&got), AMD64_LAYER);

    // Blobs there already are not needed again; by digest works too.
    let dst2 = registry_ref(&reg.addr, "hello-world:again");
    io.write_image(&dst2, &to_write(&src, &[])).unwrap();
    let by_digest = registry_ref(&reg.addr, &format!("hello-world@{AMD64}"));
    assert_eq!(
        io.resolve(&by_digest, &Platform::default())
            .unwrap()
            .manifest_digest
            .as_ref(),
        AMD64
    );

    // The OverlayBD image (OCI media types, annotations) round trips as well.
    let obd = io
        .resolve(&fixture("amd64-converted"), &Platform::default())
        .unwrap();
    let obd_layers = download_layers(&io, &obd, tmp.path());
    let dst3 = registry_ref(&reg.addr, "hello-world:obd");
    io.write_image(&dst3, &to_write(&obd, &obd_layers)).unwrap();
    let back = io.resolve(&dst3, &Platform::default()).unwrap();
    assert_eq!(back.manifest_digest.as_ref(), CONVERTED);
    assert_eq!(back.manifest_media_type, MEDIA_OCI_MANIFEST);
    assert_eq!(back.layers, obd.layers);
    io.fetch_blob(&dst3, &back.layers[0], &got).unwrap();
    assert_eq!(sha256_file(&got), CONVERTED_LAYER);

    // Errors: an unknown tag; a descriptor with the wrong size.
    let e = err_text(
        io.resolve(
            &registry_ref(&reg.addr, "hello-world:nope"),
            &Platform::default(),
        )
        .unwrap_err(),
    );
    assert!(
        e.contains("hello-world:nope") && e.contains("manifest unknown"),
        "{e}"
    );
    let mut wrong = back.layers[0].clone();
    wrong.set_size(back.layers[0].size() - 1);
    let e = err_text(
        io.fetch_blob(&dst3, &wrong, &tmp.path().join("x"))
            .unwrap_err(),
    );
    assert!(
        e.contains(CONVERTED_LAYER) && e.contains("registry") && e.contains("642559 bytes"),
        "{e}"
    );
    assert!(!tmp.path().join("x").exists());
}

/// htpasswd: the registry answers with a `Basic` challenge; the credentials come from a
/// docker config.json.
#[test]
fn registry_basic_auth() {
    // bcrypt of "ovbd-test-pass" (cost 4).
    const HASH: &str = "$2b$04$mZwH7wGeEVlhyQEKuXlAQu/wM/RzhODQOto7p4KjrEKXtv6/P1hL.";
    let pwdir = tempfile::tempdir().unwrap();
    let htpasswd = pwdir.path().join("htpasswd");
    fs::write(&htpasswd, format!("ovbd:{HASH}\n")).unwrap();
    let reg = start_registry(&format!(
        "auth:\n  htpasswd:\n    realm: ovbd-test\n    path: {}\n",
        htpasswd.display()
    ));
    assert_eq!(http_status(&reg.addr, "/v2/"), Some(401));

    let tmp = tempfile::tempdir().unwrap();
    let src = io()
        .resolve(&fixture("amd64"), &Platform::default())
        .unwrap();
    let layers = download_layers(&io(), &src, tmp.path());
    let dst = registry_ref(&reg.addr, "private/hello:v1");

    let write_config = |user: &str, pass: &str| {
        let path = tmp.path().join(format!("config-{pass}.json"));
        let config = serde_json::json!({
            "auths": { (reg.addr.clone()): { "username": user, "password": pass } }
        });
        fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
        ImageIo::new(RegistryOptions {
            docker_config: Some(path),
            ..Default::default()
        })
        .unwrap()
    };
    let anonymous = ImageIo::new(RegistryOptions {
        docker_config: Some(tmp.path().join("absent.json")),
        ..Default::default()
    })
    .unwrap();
    let e = err_text(
        anonymous
            .write_image(&dst, &to_write(&src, &layers))
            .unwrap_err(),
    );
    assert!(e.contains("401") && e.contains(AMD64_LAYER), "{e}");
    let wrong = write_config("ovbd", "wrong");
    let e = err_text(
        wrong
            .write_image(&dst, &to_write(&src, &layers))
            .unwrap_err(),
    );
    assert!(e.contains("401"), "{e}");

    let authed = write_config("ovbd", "ovbd-test-pass");
    authed.write_image(&dst, &to_write(&src, &layers)).unwrap();
    let back = authed.resolve(&dst, &Platform::default()).unwrap();
    assert_eq!(back.manifest_digest.as_ref(), AMD64);
    let got = tmp.path().join("pulled");
    authed.fetch_blob(&dst, &back.layers[0], &got).unwrap();
    assert_eq!(sha256_file(&got), AMD64_LAYER);
    let e = err_text(anonymous.resolve(&dst, &Platform::default()).unwrap_err());
    assert!(
        e.contains("wants Basic credentials") && e.contains("private/hello:v1"),
        "{e}"
    );
}

/// Token auth: a registry stand-in answering with a `Bearer` challenge, and its token
/// endpoint, which wants the config.json's credentials.
#[test]
fn registry_bearer_token_auth() {
    use base64::Engine as _;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
    );
    let scopes = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
    let blobs = Path::new(FIXTURE).join("blobs/sha256");
    {
        let addr = addr.clone();
        let scopes = scopes.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let _ = serve_mock(conn, &addr, &basic, &blobs, &scopes);
            }
        });
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.json");
    fs::write(
        &config,
        serde_json::to_vec(&serde_json::json!({
            "auths": { (format!("http://{addr}")): { "username": "alice", "password": "s3cret" } }
        }))
        .unwrap(),
    )
    .unwrap();
    let io = ImageIo::new(RegistryOptions {
        docker_config: Some(config),
        ..Default::default()
    })
    .unwrap();
    let r = registry_ref(&addr, "hello:v1");
    let img = io.resolve(&r, &Platform::default()).unwrap();
    assert_eq!(img.manifest_digest.as_ref(), AMD64);
    assert_eq!(img.config.digest().as_ref(), AMD64_CONFIG);
    let got = tmp.path().join("layer");
    io.fetch_blob(&r, &img.layers[0], &got).unwrap();
    assert_eq!(sha256_file(&got), AMD64_LAYER);
    // Content that is not what its digest says: an error naming the blob and the registry.
    let corrupt = Descriptor::new(MediaType::ImageLayer, 7, CORRUPT.parse::<Digest>().unwrap());
    let bad = tmp.path().join("corrupt");
    let e = err_text(io.fetch_blob(&r, &corrupt, &bad).unwrap_err());
    assert!(e.contains(CORRUPT) && e.contains(&addr), "{e}");
    assert!(!bad.exists());
    let scopes = scopes.lock().unwrap().clone();
    assert!(
        !scopes.is_empty() && scopes.iter().all(|s| s == "repository:hello:pull"),
        "{scopes:?}"
    );

    // Without the credentials the token endpoint refuses: the pull fails.
    let anonymous = ImageIo::new(RegistryOptions {
        docker_config: Some(tmp.path().join("absent.json")),
        ..Default::default()
    })
    .unwrap();
    let e = err_text(anonymous.resolve(&r, &Platform::default()).unwrap_err());
    assert!(
        e.contains("token from") && e.contains("401") && e.contains("hello:v1"),
        "{e}"
    );
}

/// A blob the mock registry serves with other content ("corrupt").
const CORRUPT: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// One request of the mock registry (`Connection: close`).
fn serve_mock(
    mut conn: TcpStream,
    addr: &str,
    basic: &str,
    blobs: &Path,
    scopes: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    const TOKEN: &str = "Bearer tok-123";
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut authz = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                authz = v.trim().to_owned();
            }
        }
    }
    let mut parts = request.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let challenge =
        format!("WWW-Authenticate: Bearer realm=\"http://{addr}/token\",service=\"mock\"\r\n");
    let respond = |conn: &mut TcpStream, status: &str, headers: &str, body: &[u8]| {
        write!(
            conn,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
            body.len()
        )?;
        if method != "HEAD" {
            conn.write_all(body)?;
        }
        conn.flush()
    };
    if path == "/token" {
        for kv in query.split('&') {
            if let Some(scope) = kv.strip_prefix("scope=") {
                let scope = scope.replace("%3A", ":").replace("%3a", ":");
                scopes.lock().unwrap().push(scope);
            }
        }
        return if authz == basic {
            respond(
                &mut conn,
                "200 OK",
                "Content-Type: application/json\r\n",
                br#"{"token":"tok-123"}"#,
            )
        } else {
            respond(&mut conn, "401 Unauthorized", "", b"")
        };
    }
    if authz != TOKEN {
        return respond(&mut conn, "401 Unauthorized", &challenge, b"");
    }
    if path == "/v2/" {
        return respond(&mut conn, "200 OK", "", b"");
    }
    if path == "/v2/hello/manifests/v1" || path == format!("/v2/hello/manifests/{AMD64}") {
        let body = fs::read(blobs.join(&AMD64[7..]))?;
        let headers =
            format!("Content-Type: {MEDIA_DOCKER_MANIFEST}\r\nDocker-Content-Digest: {AMD64}\r\n");
        return respond(&mut conn, "200 OK", &headers, &body);
    }
    if path == format!("/v2/hello/blobs/{CORRUPT}") {
        return respond(&mut conn, "200 OK", "", b"corrupt");
    }
    if let Some(digest) = path.strip_prefix("/v2/hello/blobs/sha256:") {
        if digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            if let Ok(body) = fs::read(blobs.join(digest)) {
                return respond(&mut conn, "200 OK", "", &body);
            }
        }
    }
    respond(&mut conn, "404 Not Found", "", b"")
}
