use super::*;
use crate::testing::*;

use crate::testing::start_registry;
use ovbd_format::ReadAt;

use std::net::TcpListener;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Instant as StdInstant;

// ------------------------------------------------------------------------ test helpers
/// `ADDR/test/blob` (the repository [`registry_with_blob`] pushes to) through `registry`.
pub(super) fn test_blob(
    registry: &Arc<Registry>,
    addr: &str,
    digest: &str,
    size: u64,
) -> RemoteBlob {
    RemoteBlob::new(registry.clone(), &format!("{addr}/test/blob"), digest, size).unwrap()
}

pub(super) fn read(blob: &RemoteBlob, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let n = blob.read_at(&mut buf, off)?;
    buf.truncate(n);
    Ok(buf)
}

// ------------------------------------------------------------------------------- units

#[test]
fn registry_parses_www_authenticate() {
    let c = parse_challenges([
        r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
    ]);
    assert_eq!(
        c,
        vec![Challenge::Bearer {
            realm: "https://auth.docker.io/token".into(),
            service: Some("registry.docker.io".into()),
            scope: Some("repository:library/busybox:pull".into()),
        }]
    );
    assert_eq!(
        parse_challenges([r#"Basic realm="Registry Realm""#]),
        vec![Challenge::Basic]
    );
    // Several challenges in one value, odd spacing, escapes, unquoted values, case.
    let c = parse_challenges([
        r#"Negotiate abc==, basic realm=x , BEARER  realm = "http://h/t\"x\"" , service=svc"#,
    ]);
    assert_eq!(
        c,
        vec![
            Challenge::Basic,
            Challenge::Bearer {
                realm: "http://h/t\"x\"".into(),
                service: Some("svc".into()),
                scope: None,
            }
        ]
    );
    // Garbage never panics; a Bearer without a realm is no challenge.
    for junk in [
        "",
        "=",
        "\"",
        "Bearer",
        "Bearer realm",
        "Bearer realm=",
        "Bearer realm=\"unterminated",
        "Bearer realm=\"x\\",
        "Bearer realm=\"é\\é\"",
        ",,, ==\"\" Basic",
    ] {
        let _ = parse_challenges([junk]);
    }
    assert_eq!(parse_challenges(["Bearer service=x"]), vec![]);
    assert_eq!(
        parse_challenges(["Bearer realm=\"é\\é\""]),
        vec![Challenge::Bearer {
            realm: "éé".into(),
            service: None,
            scope: None
        }]
    );
    assert_eq!(
        parse_content_range("bytes 0-9/100"),
        Some((0, 9, Some(100)))
    );
    assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
    assert_eq!(parse_content_range("bytes */100"), None);
    assert_eq!(parse_content_range("items 0-1/2"), None);
}

/// Registries named without a scheme (bare mirrors): plain http for loopback hosts (as docker
/// does) and `insecure` ones.
#[test]
fn registry_plain_http_hosts() {
    let insecure = ["reg.lan:5000".to_owned(), "http://other.lan/".to_owned()];
    for (host, plain) in [
        ("127.0.0.1:5000", true),
        ("127.1.2.3", true),
        ("localhost:5000", true),
        ("LOCALHOST", true),
        ("[::1]:5000", true),
        ("reg.lan:5000", true),
        ("reg.lan:5001", false),
        ("other.lan", true),
        ("docker.io", false),
        ("10.0.0.1:5000", false),
    ] {
        assert_eq!(plain_http_by_default(host, &insecure), plain, "{host}");
    }
    for (host, want) in [
        ("docker.io", "registry-1.docker.io"),
        ("index.docker.io", "registry-1.docker.io"),
        ("Registry.Hub.Docker.com", "registry-1.docker.io"),
        ("registry-1.docker.io", "registry-1.docker.io"),
        ("Reg.Local:5000", "reg.local:5000"),
        ("127.0.0.1:5000", "127.0.0.1:5000"),
    ] {
        assert_eq!(registry_api_host(host), want, "{host}");
    }
    for (key, want) in [
        ("https://index.docker.io/v1/", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("http://Reg.Lan:5000/v2/", "reg.lan:5000"),
        ("127.0.0.1:5000", "127.0.0.1:5000"),
    ] {
        assert_eq!(normalize_registry_host(key), want, "{key}");
    }
}

#[test]
fn registry_endpoints_hosts_schemes_mirrors() {
    let reg = Registry::new(&RegistryConfig {
        insecure: vec!["reg.local:5000".into()],
        mirrors: vec![crate::config::MirrorConfig {
            host: "docker.io".into(),
            mirrors: vec![
                "https://mirror.example.com/prefix/".into(),
                "10.0.0.1:5000".into(),
                "localhost:5001".into(),
            ],
        }],
        allow_hosts: vec!["127.0.0.1:5000".into()],
        ..Default::default()
    })
    .unwrap();
    let urls = |r: &str| -> Vec<String> {
        reg.endpoints(r)
            .unwrap()
            .iter()
            .map(|e| {
                e.blob_url("library/busybox", "sha256:00")
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    assert_eq!(
        urls("docker.io"),
        [
            "https://mirror.example.com/prefix/v2/library/busybox/blobs/sha256:00",
            "https://10.0.0.1:5000/v2/library/busybox/blobs/sha256:00",
            "http://localhost:5001/v2/library/busybox/blobs/sha256:00",
            "https://registry-1.docker.io/v2/library/busybox/blobs/sha256:00",
        ]
    );
    assert_eq!(urls("index.docker.io").len(), 4);
    assert_eq!(
        urls("reg.local:5000"),
        ["http://reg.local:5000/v2/library/busybox/blobs/sha256:00"]
    );
    assert_eq!(
        urls("127.0.0.1:5000"),
        ["http://127.0.0.1:5000/v2/library/busybox/blobs/sha256:00"]
    );
    // Loopback and private hosts that are not allowed (mirrors count): refused.
    for r in ["127.0.0.1:5001", "localhost:5000", "10.0.0.2:5000"] {
        let e = reg.endpoints(r).unwrap_err().to_string();
        assert!(e.contains("allow_hosts"), "{r}: {e}");
    }
    assert_eq!(urls("10.0.0.1:5000").len(), 1);
    assert_eq!(
        urls("ghcr.io"),
        ["https://ghcr.io/v2/library/busybox/blobs/sha256:00"]
    );
    let eps = reg.endpoints("docker.io").unwrap();
    assert_eq!(eps[0].cred_host, "mirror.example.com");
    assert_eq!(eps[3].cred_host, "docker.io");
    assert!(eps[0].is_mirror && !eps[3].is_mirror);

    let digest = format!("sha256:{}", "ab".repeat(32));
    let b = RemoteBlob::new(reg.clone(), "busybox", &digest, 10).unwrap();
    assert_eq!(b.name(), format!("docker.io/library/busybox@{digest}"));
    assert_eq!(b.repository(), "library/busybox");
    let b = RemoteBlob::new(reg.clone(), "127.0.0.1:5000/library/app:v1", &digest, 10).unwrap();
    assert_eq!(b.name(), format!("127.0.0.1:5000/library/app@{digest}"));
    // Nowait never fetches (nothing listens there, it would fail, not WouldBlock).
    let mut buf = [0u8; 4];
    assert_eq!(
        b.read_at_nowait(&mut buf, 0).unwrap_err().kind(),
        io::ErrorKind::WouldBlock
    );
    assert_eq!(b.requests(), 0);
    for bad in ["sha256:AB", "md5:00", "sha256:../../etc/passwd", "sha256"] {
        assert!(
            RemoteBlob::new(reg.clone(), "busybox", bad, 1).is_err(),
            "{bad}"
        );
    }
    assert!(RemoteBlob::new(reg.clone(), "UPPER/Case:x:y", &digest, 1).is_err());
    assert!(RemoteBlob::new(reg.clone(), "Jdock00/library/app", &digest, 1).is_err());
    assert!(RemoteBlob::new(reg.clone(), "oci:/some/dir:v1", &digest, 1).is_err());
    assert!(Registry::new(&RegistryConfig {
        mirrors: vec![crate::config::MirrorConfig {
            host: "docker.io".into(),
            mirrors: vec!["ftp://x".into()],
        }],
        ..Default::default()
    })
    .is_err());
    assert!(Registry::new(&RegistryConfig {
        proxy: Some("::not a url".into()),
        ..Default::default()
    })
    .is_err());
}

// ------------------------------------------------------------------- against a registry

#[test]
fn registry_reads_random_ranges() {
    let (reg, data, digest) = registry_with_blob((3 << 20) + 17, 1);
    let registry = Registry::new(&quick_config()).unwrap();
    let blob = RemoteBlob::new(
        registry.clone(),
        &format!("{}/test/blob:v1", reg.addr),
        &digest,
        data.len() as u64,
    )
    .unwrap();
    check_random_ranges(&blob, &data, 30, 7);
    assert!(blob.fetched_bytes() > data.len() as u64);
    let before = (blob.fetched_bytes(), blob.requests());
    assert_eq!(read(&blob, 1000, 5000).unwrap(), &data[1000..6000]);
    assert_eq!(blob.fetched_bytes() - before.0, 5000);
    assert_eq!(blob.requests() - before.1, 1);
    // A long read is split into concurrent pieces.
    let before = blob.requests();
    assert_eq!(read(&blob, 0, data.len()).unwrap(), data);
    assert_eq!(
        blob.requests() - before,
        data.len().div_ceil(MAX_REQUEST_BYTES) as u64
    );
    // Several ranges at once.
    let got = blob
        .read_ranges(&[(5, 10), (3 << 20, 17), (100, 0)])
        .unwrap();
    assert_eq!(got[0], &data[5..15]);
    assert_eq!(got[1], &data[3 << 20..]);
    assert!(got[2].is_empty());
    assert!(blob.read_ranges(&[(data.len() as u64 - 1, 2)]).is_err());
    assert_eq!(registry.token_requests(), 0);

    // A wrong size in the descriptor is caught by Content-Range.
    let wrong = test_blob(&registry, &reg.addr, &digest, data.len() as u64 + 1);
    let e = read(&wrong, 0, 10).unwrap_err().to_string();
    assert!(e.contains("descriptor says"), "{e}");
}

/// Ranges apart go in one request where the registry answers several ranges at once
/// (docker-registry does, multipart/byteranges); where it answers with the whole blob (S3
/// does), they are asked for one by one, then and from then on, and the whole blob is not read.
#[test]
fn registry_reads_several_ranges_in_one_request() {
    let (reg, data, digest) = registry_with_blob(3 << 20, 5);
    let ranges = [(5u64, 10usize), (2 << 20, 17), ((3 << 20) - 100, 100)];
    let check = |got: Vec<Vec<u8>>| {
        for (g, &(off, len)) in got.iter().zip(&ranges) {
            assert!(
                g[..] == data[off as usize..off as usize + len],
                "bytes at {off}"
            );
        }
    };
    let registry = Registry::new(&quick_config()).unwrap();
    let blob = test_blob(&registry, &reg.addr, &digest, data.len() as u64);
    let before = blob.requests();
    check(blob.read_ranges(&ranges).unwrap());
    assert_eq!(blob.requests() - before, 1);
    // The parts' headers on top of the 127 bytes.
    assert!(
        blob.fetched_bytes() < 127 + 1024,
        "{}",
        blob.fetched_bytes()
    );

    let front = Front::start(&reg.addr, None);
    *front.always.lock().unwrap() = Some(Fault::OneRangeOnly);
    let registry = Registry::new(&quick_config()).unwrap();
    let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
    check(blob.read_ranges(&ranges).unwrap());
    // The one request the registry answered with a 200, then one per range; not the blob.
    assert_eq!(blob.requests(), 4);
    assert!(blob.fetched_bytes() < 1 << 20, "{}", blob.fetched_bytes());
    check(blob.read_ranges(&ranges).unwrap());
    assert_eq!(blob.requests(), 7);
    let seen = front.seen.lock().unwrap();
    let several = |s: &Seen| s.range.as_deref().is_some_and(|r| r.contains(','));
    assert_eq!(seen.iter().filter(|s| several(s)).count(), 1);
    drop(seen);

    // A multipart answer whose parts do not hold what was asked (each claims to start a byte
    // later): not served from, and the ranges are asked for one by one.
    let front = Front::start(&reg.addr, None);
    *front.always.lock().unwrap() = Some(Fault::ShiftParts);
    let registry = Registry::new(&quick_config()).unwrap();
    let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
    check(blob.read_ranges(&ranges).unwrap());
    assert_eq!(blob.requests(), 4);
}

#[test]
fn registry_not_found_fails_at_once() {
    let (reg, data, _digest) = registry_with_blob(1000, 2);
    let registry = Registry::new(&RegistryConfig {
        retries: 5,
        timeout_secs: 20.0,
        ..quick_config()
    })
    .unwrap();
    let missing = format!("sha256:{}", "0".repeat(64));
    let blob = test_blob(&registry, &reg.addr, &missing, data.len() as u64);
    let t = StdInstant::now();
    let e = read(&blob, 0, 10).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    let msg = e.to_string();
    assert!(
        msg.contains(&reg.addr) && msg.contains("test/blob") && msg.contains(&missing),
        "{msg}"
    );
    assert!(msg.contains("404"), "{msg}");
    assert_eq!(blob.requests(), 1);
    // Counted by class, and kept as the registry's last error (addresses are this test's own).
    let m = crate::metrics::metrics();
    assert_eq!(m.registry_errors_of(&reg.addr, "not_found"), 1);
    let last = m.registries().into_iter().find(|(r, _)| *r == reg.addr);
    assert!(last.is_some_and(|(_, e)| e.contains("404")));

    // 403 as well.
    let front = Front::start(&reg.addr, None);
    *front.always.lock().unwrap() = Some(Fault::Status(403));
    let blob = test_blob(&registry, &front.addr, &_digest, data.len() as u64);
    let t = StdInstant::now();
    let e = read(&blob, 0, 10).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    assert!(
        e.to_string().contains("403") && e.to_string().contains(&_digest),
        "{e}"
    );
    assert_eq!(blob.requests(), 1);
    assert_eq!(m.registry_errors_of(&front.addr, "denied"), 1);
    assert_eq!(m.registry_errors_of(&front.addr, "not_found"), 0);
}

/// https with the ring provider and the platform's roots: a certificate nobody trusts is
/// a permanent failure (not retried), and a mirror with one is skipped for the host.
#[test]
fn registry_https_untrusted_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = test_certificate(tmp.path());
    let tls = start_registry(&format!(
        "  tls:\n    certificate: {}\n    key: {}\n",
        cert.display(),
        key.display()
    ));
    let registry = Registry::new(&quick_config()).unwrap();
    let url = format!("https://{}/v2/", tls.addr);
    let inner = registry.inner.clone();
    let e = registry
        .handle
        .block_on(async move { inner.client.get(url).send().await })
        .unwrap_err();
    let f = http_failure("GET", e);
    assert!(matches!(f, RegistryError::InvalidResponse(_)), "{f}");
    assert!(
        f.to_string().to_ascii_lowercase().contains("certificate"),
        "{f}"
    );

    let (reg, data, digest) = registry_with_blob(100_000, 15);
    let registry = Registry::new(&RegistryConfig {
        mirrors: vec![crate::config::MirrorConfig {
            host: reg.addr.clone(),
            mirrors: vec![format!("https://{}", tls.addr)],
        }],
        ..quick_config()
    })
    .unwrap();
    let blob = test_blob(&registry, &reg.addr, &digest, data.len() as u64);
    assert_eq!(read(&blob, 10, 100).unwrap(), &data[10..110]);
    assert_eq!(blob.requests(), 2);
}

/// htpasswd: Basic challenge, credentials from a config.json that is re-read when the
/// registry refuses: a password fixed in the file works without a new Registry.
#[test]
fn registry_basic_auth_and_rotated_password() {
    // bcrypt of "ovbd-test-pass" (cost 4), as in image_io's tests.
    const HASH: &str = "$2b$04$mZwH7wGeEVlhyQEKuXlAQu/wM/RzhODQOto7p4KjrEKXtv6/P1hL.";
    let tmp = tempfile::tempdir().unwrap();
    let htpasswd = tmp.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("ovbd:{HASH}\n")).unwrap();
    let reg = start_registry(&format!(
        "auth:\n  htpasswd:\n    realm: ovbd-test\n    path: {}\n",
        htpasswd.display()
    ));
    let good = basic_header("ovbd", "ovbd-test-pass");
    let data = random_bytes(600_000, 3);
    let digest = push_blob(&reg.addr, "private/blob", &data, Some(&good));
    let config = tmp.path().join("config.json");
    let write_config = |key: &str, entry: serde_json::Value| {
        std::fs::write(
            &config,
            serde_json::to_vec(&serde_json::json!({ "auths": { key: entry } })).unwrap(),
        )
        .unwrap();
    };
    let registry = Registry::new(&RegistryConfig {
        docker_config: Some(config.clone()),
        ..quick_config()
    })
    .unwrap();
    let blob = RemoteBlob::new(
        registry.clone(),
        &format!("{}/private/blob:v1", reg.addr),
        &digest,
        data.len() as u64,
    )
    .unwrap();

    // No config file: anonymous, refused at once.
    let t = StdInstant::now();
    let e = read(&blob, 0, 100).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("Basic credentials"), "{e}");
    assert!(e.to_string().contains(&digest), "{e}");

    // A wrong password: refused at once.
    write_config(
        &reg.addr,
        serde_json::json!({"username": "ovbd", "password": "wrong"}),
    );
    let e = read(&blob, 0, 100).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("401"), "{e}");

    // The password fixed in the file (base64 `auth`, https:// key): the same client works.
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode("ovbd:ovbd-test-pass");
    write_config(
        &format!("https://{}", reg.addr),
        serde_json::json!({ "auth": auth }),
    );
    check_random_ranges(&blob, &data, 10, 11);
    // The Basic header is cached: no re-authentication per read.
    let before = blob.requests();
    read(&blob, 7, 7).unwrap();
    assert_eq!(blob.requests() - before, 1);
    // Rotated again to a wrong one: the cached header still works until refused.
    write_config(
        &reg.addr,
        serde_json::json!({"username": "ovbd", "password": "nope"}),
    );
    assert_eq!(read(&blob, 8, 8).unwrap(), &data[8..16]);
}

/// A token server stand-in whose tokens are good for three requests: a 401 makes the
/// client fetch a new token (with the config.json's Basic credentials) and go on.
#[test]
fn registry_bearer_token_expires_and_is_refetched() {
    let (reg, data, digest) = registry_with_blob(1 << 20, 4);
    let front = Front::start(
        &reg.addr,
        Some(FrontAuth::Bearer {
            uses: 3,
            basic: Some(basic_header("alice", "s3cret")),
        }),
    );
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.json");
    std::fs::write(
        &config,
        serde_json::to_vec(&serde_json::json!({
            "auths": { (format!("http://{}", front.addr)): { "username": "alice", "password": "s3cret" } }
        }))
        .unwrap(),
    )
    .unwrap();
    let registry = Registry::new(&RegistryConfig {
        docker_config: Some(config.clone()),
        ..quick_config()
    })
    .unwrap();
    let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
    let mut rng = Rng(5);
    for _ in 0..12 {
        let off = rng.below(data.len() as u64 - 5000);
        assert_eq!(
            read(&blob, off, 5000).unwrap(),
            &data[off as usize..off as usize + 5000]
        );
    }
    // 12 reads, 3 per token: 4 tokens at least (the first after an anonymous 401).
    let tokens = registry.token_requests();
    assert!((4..=6).contains(&tokens), "{tokens} token requests");
    let scopes = front.token_scopes.lock().unwrap().clone();
    assert!(
        scopes.iter().all(|s| s == "repository:test/blob:pull"),
        "{scopes:?}"
    );
    // The registry itself saw bearer tokens only; the Basic credentials went to /token.
    for s in front.seen.lock().unwrap().iter() {
        match &s.authorization {
            Some(a) if s.target.starts_with("/token") => assert!(a.starts_with("Basic ")),
            Some(a) => assert!(a.starts_with("Bearer tok-"), "{a}"),
            None => {}
        }
    }

    // Without credentials the token server refuses: a clear, immediate error.
    std::fs::write(&config, b"{}").unwrap();
    let registry2 = Registry::new(&RegistryConfig {
        docker_config: Some(config.clone()),
        ..quick_config()
    })
    .unwrap();
    let blob2 = test_blob(&registry2, &front.addr, &digest, data.len() as u64);
    let t = StdInstant::now();
    let e = read(&blob2, 0, 10).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("token from"), "{e}");
}

/// Blob GETs redirected to another host (blob storage): followed, without our
/// Authorization.
#[test]
fn registry_redirect_drops_authorization() {
    let (reg, data, digest) = registry_with_blob(700_000, 6);
    let storage = Front::start(&reg.addr, None);
    let front = Front::start(&reg.addr, Some(FrontAuth::Basic(basic_header("u", "p"))));
    // `localhost` vs `127.0.0.1`: another host, not only another port.
    let port = storage.addr.rsplit(':').next().unwrap();
    *front.redirect.lock().unwrap() = Some(format!("http://localhost:{port}"));
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.json");
    std::fs::write(
        &config,
        serde_json::to_vec(&serde_json::json!({
            "auths": { (front.addr.clone()): { "username": "u", "password": "p" } }
        }))
        .unwrap(),
    )
    .unwrap();
    let registry = Registry::new(&RegistryConfig {
        docker_config: Some(config),
        // The storage's name is a loopback one too.
        allow_hosts: vec!["127.0.0.1".into(), "localhost".into()],
        ..quick_config()
    })
    .unwrap();
    let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
    check_random_ranges(&blob, &data, 5, 13);
    let seen = storage.seen.lock().unwrap().clone();
    assert!(seen.len() >= 5, "{seen:?}");
    assert!(seen.iter().all(|s| s.authorization.is_none()), "{seen:?}");
    assert!(seen.iter().all(|s| s.target.contains("signature=abc")));
    assert!(front
        .seen
        .lock()
        .unwrap()
        .iter()
        .any(|s| s.authorization.as_deref() == Some(basic_header("u", "p").as_str())));
}

/// 503s, 429, resets, truncations and stalls are retried; the reads come back right.
#[test]
fn registry_retries_transient_faults() {
    let (reg, data, digest) = registry_with_blob(2 << 20, 8);
    let front = Front::start(&reg.addr, None);
    let registry = Registry::new(&RegistryConfig {
        timeout_secs: 20.0,
        retries: 6,
        stall_timeout_secs: 0.5,
        ..quick_config()
    })
    .unwrap();
    let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
    let cases: Vec<(&str, Vec<Fault>)> = vec![
        ("503 x3", vec![Fault::Status(503); 3]),
        (
            "429, 502, 500",
            vec![Fault::Status(429), Fault::Status(502), Fault::Status(500)],
        ),
        ("reset mid-body x2", vec![Fault::Reset, Fault::Reset]),
        ("truncated body", vec![Fault::Truncate]),
        ("stall mid-body", vec![Fault::Stall(Duration::from_secs(3))]),
        (
            "stall before headers",
            vec![Fault::StallHeaders(Duration::from_secs(3))],
        ),
        (
            "mixed",
            vec![Fault::Reset, Fault::Status(503), Fault::Truncate],
        ),
    ];
    for (i, (what, faults)) in cases.into_iter().enumerate() {
        let k = faults.len() as u64;
        front.push_faults(faults);
        let before = (blob.requests(), blob.fetched_bytes());
        let off = 1000 + i as u64 * 100_000;
        let len = 300_000;
        let t = StdInstant::now();
        let got = read(&blob, off, len).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            got == data[off as usize..off as usize + len],
            "{what}: wrong bytes"
        );
        assert!(
            front.faults.lock().unwrap().is_empty(),
            "{what}: faults left"
        );
        let requests = blob.requests() - before.0;
        assert_eq!(requests, k + 1, "{what}: {requests} requests");
        // Stalls are given up after the stall timeout, not waited out.
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "{what}: {:?}",
            t.elapsed()
        );
        // A resumed read asks only for what is missing.
        let fetched = blob.fetched_bytes() - before.1;
        assert!(fetched < 2 * len as u64, "{what}: {fetched} bytes fetched");
    }
}

/// A registry that keeps failing, hangs or is gone: the read fails within its deadline.
#[test]
fn registry_failures_end_at_the_deadline() {
    let (reg, data, digest) = registry_with_blob(100_000, 9);
    let front = Front::start(&reg.addr, None);
    let deadline = Duration::from_millis(2500);
    let slack = Duration::from_millis(1500);
    let registry = Registry::new(&RegistryConfig {
        timeout_secs: deadline.as_secs_f64(),
        retries: 1000,
        stall_timeout_secs: 30.0,
        connect_timeout_secs: 1.0,
        allow_hosts: vec!["127.0.0.1".into()],
        ..Default::default()
    })
    .unwrap();
    let blob_at = |addr: &str| {
        RemoteBlob::new(
            registry.clone(),
            &format!("{addr}/test/blob"),
            &digest,
            data.len() as u64,
        )
        .unwrap()
    };
    let blob = blob_at(&front.addr);
    assert_eq!(read(&blob, 0, 1000).unwrap(), &data[..1000]);
    for (what, fault) in [
        ("always 503", Fault::Status(503)),
        (
            "hangs before headers",
            Fault::StallHeaders(Duration::from_secs(60)),
        ),
        ("hangs mid-body", Fault::Stall(Duration::from_secs(60))),
    ] {
        *front.always.lock().unwrap() = Some(fault);
        let t = StdInstant::now();
        let e = read(&blob, 0, 50_000).unwrap_err();
        let took = t.elapsed();
        assert!(took < deadline + slack, "{what}: failed after {took:?}");
        assert!(e.to_string().contains(&digest), "{what}: {e}");
        assert!(e.to_string().contains("test/blob"), "{what}: {e}");
    }
    *front.always.lock().unwrap() = None;
    assert_eq!(read(&blob, 5, 10).unwrap(), &data[5..15]);

    // Gone: nothing listens any more.
    let gone = blob_at(&reg.addr);
    assert_eq!(read(&gone, 0, 10).unwrap(), &data[..10]);
    drop(reg);
    let t = StdInstant::now();
    let e = read(&gone, 0, 10).unwrap_err();
    assert!(t.elapsed() < deadline + slack, "{:?}", t.elapsed());
    assert!(
        e.to_string().contains("deadline") || e.to_string().contains("gave up"),
        "{e}"
    );
    // The retries budget ends it before the deadline, too.
    let few = Registry::new(&RegistryConfig {
        timeout_secs: 60.0,
        retries: 2,
        ..quick_config()
    })
    .unwrap();
    let b = RemoteBlob::new(few, &format!("{}/test/blob", front.addr), &digest, 100_000).unwrap();
    *front.always.lock().unwrap() = Some(Fault::Status(500));
    let before = front.blob_gets();
    let t = StdInstant::now();
    let e = read(&b, 0, 10).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(e.to_string().contains("gave up after 3 attempt"), "{e}");
    assert_eq!(front.blob_gets() - before, 3);
}

/// Mirrors in order, then the host: dead or empty mirrors are skipped.
#[test]
fn registry_mirrors_then_host() {
    let (reg, data, digest) = registry_with_blob(300_000, 10);
    let empty = start_registry("");
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let front = Front::start(&reg.addr, None);
    let registry = Registry::new(&RegistryConfig {
        timeout_secs: 4.0,
        retries: 1,
        mirrors: vec![crate::config::MirrorConfig {
            host: "registry.invalid".into(),
            mirrors: vec![
                format!("http://{dead}"),
                empty.addr.clone(),
                format!("http://{}", front.addr),
            ],
        }],
        ..quick_config()
    })
    .unwrap();
    let blob = RemoteBlob::new(
        registry.clone(),
        "registry.invalid/test/blob:v1",
        &digest,
        data.len() as u64,
    )
    .unwrap();
    assert_eq!(read(&blob, 10, 1000).unwrap(), &data[10..1010]);
    // dead (refused), empty (404), front: three requests, the last one served.
    assert_eq!(blob.requests(), 3);
    assert_eq!(front.blob_gets(), 1);
    // Every mirror failing and the host unreachable: an error naming the host.
    *front.always.lock().unwrap() = Some(Fault::Status(404));
    let e = read(&blob, 0, 10).unwrap_err().to_string();
    assert!(e.contains("registry.invalid"), "{e}");

    // A host of its own behind the mirrors: reached when they fail.
    let registry = Registry::new(&RegistryConfig {
        mirrors: vec![crate::config::MirrorConfig {
            host: reg.addr.clone(),
            mirrors: vec![empty.addr.clone()],
        }],
        ..quick_config()
    })
    .unwrap();
    let blob = test_blob(&registry, &reg.addr, &digest, 300_000);
    check_random_ranges(&blob, &data, 3, 17);
}

/// Every request through the configured HTTP proxy (a P2P agent's place).
#[test]
fn registry_through_proxy() {
    let (reg, data, digest) = registry_with_blob(400_000, 12);
    let proxy = Front::start(&reg.addr, None);
    let registry = Registry::new(&RegistryConfig {
        proxy: Some(format!("http://{}", proxy.addr)),
        ..quick_config()
    })
    .unwrap();
    let blob = test_blob(&registry, &reg.addr, &digest, data.len() as u64);
    check_random_ranges(&blob, &data, 5, 19);
    let seen = proxy.seen.lock().unwrap().clone();
    assert!(seen.len() >= 5);
    let want = format!("http://{}/v2/test/blob/blobs/{digest}", reg.addr);
    assert!(seen.iter().all(|s| s.target == want), "{seen:?}");
}

/// The pieces of a long read are fetched at the same time, not one after another.
#[test]
fn registry_long_reads_are_concurrent() {
    let (reg, data, digest) = registry_with_blob(4 * MAX_REQUEST_BYTES, 14);
    let front = Front::start(&reg.addr, None);
    let registry = Registry::new(&quick_config()).unwrap();
    let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
    let delay = Duration::from_millis(400);
    front.push_faults(vec![Fault::Delay(delay); 4]);
    let t = StdInstant::now();
    assert!(read(&blob, 0, data.len()).unwrap() == data);
    assert!(t.elapsed() < delay * 3, "{:?}", t.elapsed());
    assert!(front.max_inflight.load(SeqCst) >= 2);
    assert_eq!(blob.requests(), 4);
}
