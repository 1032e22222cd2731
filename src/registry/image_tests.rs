//! `ovbd convert` (its library entry) and the registry client's pulls and pushes against a real
//! registry: through a mirror, through a forward proxy, with transient faults on every kind
//! of request (manifest and blob GETs, HEAD, upload POST and PUT, manifest PUT), and a
//! permanent 404.

use super::*;
use crate::convert::{convert, ConvertOptions, LayerSummary, Progress, Summary};
use crate::oci::{ImageIo, ImageRef, Platform, RegistryOptions, MEDIA_DOCKER_LIST};
use crate::testing::*;
use std::path::Path;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/hello-world-oci"
);
/// The fixture's manifest list (nine platforms) and its linux/amd64 image.
const LIST: &str = "sha256:726023f73a8fc5103fa6776d48090539042cb822531c6b751b1f6dd18cb5705d";
const AMD64: &str = "sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3";
const AMD64_LAYER: &str = "sha256:719385e32844401d57ecfd3eacab360bf551a1491c05b85806ed8f1b08d792f6";

struct Quiet;

impl Progress for Quiet {
    fn layer_start(&mut self, _: usize, _: usize, _: &str, _: u64) {}
    fn layer_bytes(&mut self, _: u64) {}
    fn layer_done(&mut self, _: &LayerSummary) {}
}

fn convert_with(src: &str, dst: &str, config: RegistryConfig) -> anyhow::Result<Summary> {
    let work = tempfile::tempdir().unwrap();
    let opts = ConvertOptions {
        vsize: 64 << 30,
        zfile: Default::default(),
        platform: Platform::default(),
        registry: RegistryOptions {
            config,
            ..Default::default()
        },
        workdir: Some(work.path().to_owned()),
        priority_list: None,
    };
    convert(src, dst, &opts, &mut Quiet)
}

/// What must not change whichever way the source came: the output's manifest and layers.
fn outputs(s: &Summary) -> (String, Vec<String>) {
    (
        s.manifest.clone(),
        s.layers.iter().map(|l| l.digest.clone()).collect(),
    )
}

/// The conversion of the fixture's amd64 image read from its layout.
fn baseline() -> (String, Vec<String>) {
    let out = tempfile::tempdir().unwrap();
    let dst = format!("oci:{}:obd", out.path().display());
    let s = convert_with(&format!("oci:{FIXTURE}:amd64"), &dst, quick_config()).unwrap();
    outputs(&s)
}

/// Pushes every blob of the fixture layout, each platform's manifest (by digest) and the
/// manifest list as `REPO:list` to the registry at `addr`, with the client under test.
fn push_fixture(addr: &str, repo: &str) {
    let registry = Registry::new(&quick_config()).unwrap();
    let r = |s: &str| match ImageRef::parse(&format!("{addr}/{repo}{s}")).unwrap() {
        ImageRef::Registry(r) => r,
        _ => unreachable!(),
    };
    registry.trust_named_registry(addr).unwrap();
    let blobs = Path::new(FIXTURE).join("blobs/sha256");
    let list: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blobs.join(&LIST[7..])).unwrap()).unwrap();
    let manifests: Vec<(String, String)> = list["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["digest"].as_str().unwrap().to_owned(),
                m["mediaType"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    registry.handle.block_on(async {
        for e in std::fs::read_dir(&blobs).unwrap() {
            let path = e.unwrap().path();
            let digest = format!("sha256:{}", path.file_name().unwrap().to_str().unwrap());
            let size = std::fs::metadata(&path).unwrap().len();
            let is_manifest = digest == LIST || manifests.iter().any(|(d, _)| *d == digest);
            if !is_manifest && !registry.blob_exists(&r(""), &digest).await.unwrap() {
                registry
                    .push_blob(&r(""), &digest, Upload::File { path, size })
                    .await
                    .unwrap();
            }
        }
        for (digest, media) in &manifests {
            let raw = std::fs::read(blobs.join(&digest[7..])).unwrap();
            let got = registry
                .push_manifest(&r(&format!("@{digest}")), media, raw)
                .await
                .unwrap();
            assert_eq!(got, *digest);
        }
        let raw = std::fs::read(blobs.join(&LIST[7..])).unwrap();
        registry
            .push_manifest(&r(":list"), MEDIA_DOCKER_LIST, raw)
            .await
            .unwrap();
    });
}

fn count(front: &Front, method: &str, part: &str) -> usize {
    front
        .requests()
        .iter()
        .filter(|(m, t)| m == method && t.contains(part))
        .count()
}

/// A registry known only through its mirror: the index, the platform's manifest, its config
/// and layer all come from the mirror, and the output is what the layout gives.
#[test]
fn convert_pulls_through_a_mirror() {
    let reg = start_registry("");
    push_fixture(&reg.addr, "hello-world");
    let mirror = Front::start(&reg.addr, None);
    let cfg = RegistryConfig {
        mirrors: vec![crate::config::MirrorConfig {
            host: "registry.invalid".into(),
            mirrors: vec![format!("http://{}", mirror.addr)],
        }],
        ..quick_config()
    };
    let out = tempfile::tempdir().unwrap();
    let dst = format!("oci:{}:obd", out.path().display());
    let s = convert_with("registry.invalid/hello-world:list", &dst, cfg).unwrap();
    assert_eq!(outputs(&s), baseline());
    assert_eq!(s.source_manifest, AMD64);
    for part in [
        "/v2/hello-world/manifests/list".to_owned(),
        format!("/v2/hello-world/manifests/{AMD64}"),
        format!("/v2/hello-world/blobs/{AMD64_LAYER}"),
    ] {
        assert_eq!(
            count(&mirror, "GET", &part),
            1,
            "{part}: {:?}",
            mirror.requests()
        );
    }
}

/// Every request of a pull and a push (manifests, blobs, HEAD, upload POST and PUT,
/// manifest PUT) through the configured forward proxy.
#[test]
fn convert_pulls_and_pushes_through_a_proxy() {
    let reg = start_registry("");
    push_fixture(&reg.addr, "hello-world");
    let proxy = Front::start(&reg.addr, None);
    let cfg = RegistryConfig {
        proxy: Some(format!("http://{}", proxy.addr)),
        ..quick_config()
    };
    let src = format!("{}/hello-world:list", reg.addr);
    let dst = format!("{}/hello-world:obd", reg.addr);
    let s = convert_with(&src, &dst, cfg.clone()).unwrap();
    assert_eq!(outputs(&s), baseline());
    let seen = proxy.requests();
    let origin = format!("http://{}/v2/", reg.addr);
    assert!(seen.iter().all(|(_, t)| t.starts_with(&origin)), "{seen:?}");
    for (method, part) in [
        ("GET", "/manifests/list"),
        ("GET", "/blobs/sha256:"),
        ("HEAD", "/blobs/sha256:"),
        ("POST", "/blobs/uploads/"),
        ("PUT", "/blobs/uploads/"),
        ("PUT", "/manifests/obd"),
    ] {
        assert!(count(&proxy, method, part) > 0, "{method} {part}: {seen:?}");
    }
    // What was pushed reads back (directly) as the conversion's manifest.
    let back = ImageIo::new(RegistryOptions::default())
        .unwrap()
        .resolve(&ImageRef::parse(&dst).unwrap(), &Platform::default())
        .unwrap();
    assert_eq!(back.manifest_digest.to_string(), s.manifest);
}

/// 503 (with `Retry-After`), resets and truncations on every kind of request: the
/// conversion still succeeds, with the same output, and every fault was met.
#[test]
fn convert_retries_transient_faults_on_every_request() {
    let reg = start_registry("");
    push_fixture(&reg.addr, "hello-world");
    let front = Front::start(&reg.addr, None);
    use Fault::{Reset, Status, Truncate};
    for (method, part, faults) in [
        ("GET", "/manifests/", vec![Status(503), Reset, Truncate]),
        ("GET", "/blobs/sha256:", vec![Reset, Status(429), Truncate]),
        ("HEAD", "/blobs/sha256:", vec![Status(503), Reset]),
        ("POST", "/blobs/uploads/", vec![Status(502), Reset]),
        ("PUT", "/blobs/uploads/", vec![Status(503), Reset, Truncate]),
        ("PUT", "/manifests/", vec![Status(500), Reset]),
    ] {
        front.push_faults_for(method, part, faults);
    }
    let src = format!("{}/hello-world:list", front.addr);
    let dst = format!("{}/hello-world:obd", front.addr);
    let s = convert_with(&src, &dst, quick_config()).unwrap();
    assert_eq!(front.targeted_left(), 0, "{:?}", front.requests());
    assert_eq!(outputs(&s), baseline());
    let back = ImageIo::new(RegistryOptions::default())
        .unwrap()
        .resolve(&ImageRef::parse(&dst).unwrap(), &Platform::default())
        .unwrap();
    assert_eq!(back.manifest_digest.to_string(), s.manifest);
}

/// A source that is not there: one request, no retries, an error naming the reference and
/// classified as not found.
#[test]
fn convert_fails_at_once_on_a_missing_image() {
    let reg = start_registry("");
    let front = Front::start(&reg.addr, None);
    let src = format!("{}/hello-world:nope", front.addr);
    let out = tempfile::tempdir().unwrap();
    let dst = format!("oci:{}:obd", out.path().display());
    let e = convert_with(&src, &dst, quick_config()).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains(&src) && msg.contains("404"), "{msg}");
    assert_eq!(
        count(&front, "GET", "/manifests/"),
        1,
        "{:?}",
        front.requests()
    );
    let class = e.chain().find_map(|c| c.downcast_ref::<RegistryError>());
    assert!(
        matches!(class, Some(RegistryError::NotFound(_))),
        "{class:?}"
    );
    assert!(!out.path().join("index.json").exists());
}

/// A whole-blob download broken off is resumed after what arrived; a mirror serving other
/// bytes under the digest is skipped for the registry itself; bytes no endpoint has right are
/// an invalid response.
#[test]
fn blob_downloads_are_resumed_and_checked() {
    let reg = start_registry("");
    let data = random_bytes(3 << 20, 41);
    let digest = push_blob(&reg.addr, "test/blob", &data, None);
    let front = Front::start(&reg.addr, None);
    // Answers every request with as many zero bytes as the blob has.
    let liar = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let len = data.len();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                let mut buf = [0u8; 4096];
                let _ = std::io::Read::read(&mut c, &mut buf);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                );
                let _ = std::io::Write::write_all(&mut c, head.as_bytes());
                let _ = std::io::Write::write_all(&mut c, &vec![0u8; len]);
            }
        });
        addr
    };
    let registry = Registry::new(&RegistryConfig {
        mirrors: vec![crate::config::MirrorConfig {
            host: front.addr.clone(),
            mirrors: vec![format!("http://{liar}")],
        }],
        ..quick_config()
    })
    .unwrap();
    let r = |addr: &str| match ImageRef::parse(&format!("{addr}/test/blob")).unwrap() {
        ImageRef::Registry(r) => r,
        _ => unreachable!(),
    };
    registry.trust_named_registry(&front.addr).unwrap();
    let fetch = |addr: &str| {
        registry
            .handle
            .block_on(registry.fetch_blob_bytes(&r(addr), &digest, data.len() as u64))
    };
    // The registry's body broken off twice: the second and third tries ask for the rest.
    front.push_faults_for("GET", "/blobs/", vec![Fault::Reset, Fault::Truncate]);
    let got = fetch(&front.addr).unwrap();
    assert!(got == data);
    assert_eq!(front.targeted_left(), 0);
    let ranges: Vec<Option<String>> = front
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.method == "GET" && s.target.contains("/blobs/"))
        .map(|s| s.range.clone())
        .collect();
    assert_eq!(ranges.len(), 3, "{ranges:?}");
    assert_eq!(ranges[0], None);
    let resumed_at = |r: &Option<String>| -> u64 {
        let r = r
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .unwrap_or("");
        r.strip_suffix('-')
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let (a, b) = (resumed_at(&ranges[1]), resumed_at(&ranges[2]));
    assert!(0 < a && a < b && b < data.len() as u64, "{ranges:?}");
    // Only the liar: its bytes are refused, not retried.
    let alone = Registry::new(&quick_config()).unwrap();
    alone.trust_named_registry(&liar).unwrap();
    let e = alone
        .handle
        .block_on(alone.fetch_blob_bytes(&r(&liar), &digest, data.len() as u64))
        .unwrap_err();
    assert!(matches!(e, RegistryError::InvalidResponse(_)), "{e}");
    assert!(
        e.to_string().contains("digest mismatch") && e.to_string().contains(&digest),
        "{e}"
    );
}

/// A push asks the token server for `repository:NAME:pull,push`, a pull for `pull` only; the
/// registry itself sees only the tokens.
#[test]
fn push_tokens_have_the_push_scope() {
    let reg = start_registry("");
    let front = Front::start(
        &reg.addr,
        Some(FrontAuth::Bearer {
            uses: 1000,
            basic: None,
        }),
    );
    let io = ImageIo::new(RegistryOptions::default()).unwrap();
    let src = ImageRef::parse(&format!("oci:{FIXTURE}:amd64")).unwrap();
    let img = io.resolve(&src, &Platform::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let layers: Vec<crate::oci::LayerFile> = img
        .layers
        .iter()
        .map(|l| {
            let path = tmp.path().join(l.digest().digest());
            io.fetch_blob(&src, l, &path).unwrap();
            crate::oci::LayerFile {
                descriptor: l.clone(),
                path,
            }
        })
        .collect();
    let dst = ImageRef::parse(&format!("{}/app/hello:v1", front.addr)).unwrap();
    let write = crate::oci::ImageToWrite {
        layers: &layers,
        config: &img.config_raw,
        manifest: &img.manifest_raw,
        manifest_media_type: &img.manifest_media_type,
    };
    io.write_image(&dst, &write).unwrap();
    let pushed: Vec<String> = front.token_scopes.lock().unwrap().drain(..).collect();
    let decoded: Vec<String> = pushed.iter().map(|s| s.replace("%2C", ",")).collect();
    assert!(!decoded.is_empty(), "no token asked for");
    assert!(
        decoded
            .iter()
            .all(|s| s == "repository:app/hello:pull,push"),
        "{decoded:?}"
    );
    let back = io.resolve(&dst, &Platform::default()).unwrap();
    assert_eq!(back.manifest_digest.to_string(), AMD64);
    let pulled: Vec<String> = front.token_scopes.lock().unwrap().clone();
    assert!(
        !pulled.is_empty() && pulled.iter().all(|s| s == "repository:app/hello:pull"),
        "{pulled:?}"
    );
    for s in front.seen.lock().unwrap().iter() {
        if let Some(a) = &s.authorization {
            assert!(
                a.starts_with("Bearer tok-"),
                "{} {}: {a}",
                s.method,
                s.target
            );
        }
    }
}

/// Each class of failure, as callers see it: transient or not, its `io::ErrorKind`, and an
/// `io::Error` that carries it.
#[test]
fn registry_errors_classify() {
    use RegistryError as E;
    let m = || "m".to_owned();
    for (e, transient, kind) in [
        (E::transient("m"), true, io::ErrorKind::Other),
        (E::TimedOut(m()), true, io::ErrorKind::TimedOut),
        (E::NotFound(m()), false, io::ErrorKind::NotFound),
        (E::Denied(m()), false, io::ErrorKind::PermissionDenied),
        (E::Refused(m()), false, io::ErrorKind::PermissionDenied),
        (E::InvalidResponse(m()), false, io::ErrorKind::InvalidData),
        (E::InvalidInput(m()), false, io::ErrorKind::InvalidInput),
        (
            E::Local {
                kind: io::ErrorKind::StorageFull,
                msg: m(),
            },
            false,
            io::ErrorKind::StorageFull,
        ),
    ] {
        assert_eq!(e.is_transient(), transient, "{e:?}");
        assert_eq!(e.kind(), kind, "{e:?}");
        let ctx = e.clone().context("blob x");
        assert_eq!(ctx.to_string(), "blob x: m");
        assert_eq!(ctx.kind(), kind);
        let io_err = io::Error::from(e.clone());
        assert_eq!(io_err.kind(), kind);
        let inner = find_registry_error(&io_err).expect("the RegistryError inside");
        assert_eq!(inner.is_transient(), transient);
    }
}

/// An upload whose answer does not come (the body all sent) is abandoned after
/// `timeout_secs` and made again in a new session.
#[test]
fn uploads_without_an_answer_are_retried() {
    let reg = start_registry("");
    let front = Front::start(&reg.addr, None);
    let registry = Registry::new(&RegistryConfig {
        timeout_secs: 1.0,
        stall_timeout_secs: 0.5,
        ..quick_config()
    })
    .unwrap();
    registry.trust_named_registry(&front.addr).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("blob");
    let data = random_bytes(2 << 20, 43);
    std::fs::write(&path, &data).unwrap();
    let digest = crate::oci::sha256_digest(&data).to_string();
    let r = match ImageRef::parse(&format!("{}/up/blob", front.addr)).unwrap() {
        ImageRef::Registry(r) => r,
        _ => unreachable!(),
    };
    front.push_faults_for(
        "PUT",
        "/blobs/uploads/",
        vec![Fault::StallHeaders(std::time::Duration::from_secs(4))],
    );
    let body = Upload::File {
        path,
        size: data.len() as u64,
    };
    registry
        .handle
        .block_on(registry.push_blob(&r, &digest, body))
        .unwrap();
    assert_eq!(front.targeted_left(), 0);
    assert_eq!(count(&front, "POST", "/blobs/uploads/"), 2);
    assert_eq!(count(&front, "PUT", "/blobs/uploads/"), 2);
    let exists = registry.handle.block_on(registry.blob_exists(&r, &digest));
    assert!(exists.unwrap());
}
