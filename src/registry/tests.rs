use super::*;
use crate::testing::*;

use crate::testing::start_registry;
use ovbd_format::ReadAt;

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering::SeqCst;
use std::time::Instant as StdInstant;

// ------------------------------------------------------------------------ test helpers
/// `ADDR/test/blob` (the repository [`registry_with_blob`] pushes to) through `registry`.
fn test_blob(registry: &Arc<Registry>, addr: &str, digest: &str, size: u64) -> RemoteBlob {
    RemoteBlob::new(registry.clone(), &format!("{addr}/test/blob"), digest, size).unwrap()
}

fn read(blob: &RemoteBlob, off: u64, len: usize) -> io::Result<Vec<u8>> {
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

// ------------------------------------------------------------------- hostile references

/// The error of using `host/test/blob` through `registry`: at the blob's creation, else at
/// its first read (which must fail).
fn refusal(registry: &Arc<Registry>, host: &str, digest: &str, size: u64) -> io::Error {
    match RemoteBlob::new(registry.clone(), &format!("{host}/test/blob"), digest, size) {
        Err(e) => io::Error::new(io::ErrorKind::PermissionDenied, format!("{e:#}")),
        Ok(blob) => match read(&blob, 0, 10) {
            Err(e) => e,
            Ok(_) => panic!("{host}: read through a registry that is not allowed"),
        },
    }
}

/// Image references name their registry: loopback, link-local, private, unspecified and
/// cloud metadata hosts are refused before anything is sent, unless `allow_hosts` (or
/// `insecure`) lists them.
#[test]
fn registry_refuses_loopback_private_and_metadata_hosts() {
    let (reg, data, digest) = registry_with_blob(100_000, 31);
    let front = Front::start(&reg.addr, None);
    let port = front.addr.rsplit(':').next().unwrap().to_owned();
    let strict = Registry::new(&RegistryConfig {
        timeout_secs: 3.0,
        retries: 0,
        connect_timeout_secs: 1.0,
        ..Default::default()
    })
    .unwrap();
    for host in [
        front.addr.clone(),
        format!("localhost:{port}"),
        format!("0.0.0.0:{port}"),
        "127.1.2.3:5000".into(),
        "10.1.2.3:5000".into(),
        "172.16.0.1:5000".into(),
        "192.168.1.10".into(),
        "100.64.0.1:5000".into(),
        "169.254.169.254".into(),
        "169.254.1.1:5000".into(),
        "metadata.google.internal".into(),
    ] {
        let e = refusal(&strict, &host, &digest, data.len() as u64);
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{host}: {e}");
        assert!(e.to_string().contains("allow_hosts"), "{host}: {e}");
    }
    assert!(
        front.seen.lock().unwrap().is_empty(),
        "a refused host got a request"
    );

    // Listed: read over plain http, as before. A host without a port: every port.
    for allow in [front.addr.clone(), "127.0.0.1".into()] {
        let registry = Registry::new(&RegistryConfig {
            allow_hosts: vec![allow.clone()],
            ..quick_config()
        })
        .unwrap();
        let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
        assert_eq!(read(&blob, 5, 10).unwrap(), &data[5..15], "{allow}");
    }
    // Another port of the host, or another name for it: still refused.
    for (allow, host) in [
        ("127.0.0.1:1", front.addr.clone()),
        ("localhost", front.addr.clone()),
        ("127.0.0.1", format!("localhost:{port}")),
    ] {
        let registry = Registry::new(&RegistryConfig {
            allow_hosts: vec![allow.into()],
            ..quick_config()
        })
        .unwrap();
        let e = refusal(&registry, &host, &digest, data.len() as u64);
        assert_eq!(
            e.kind(),
            io::ErrorKind::PermissionDenied,
            "{allow} {host}: {e}"
        );
    }
    // A name listed is reached by name; a host listed `insecure` counts as allowed.
    for (allow, insecure, host) in [
        (
            vec!["localhost".to_owned()],
            vec![],
            format!("localhost:{port}"),
        ),
        (vec![], vec![front.addr.clone()], front.addr.clone()),
    ] {
        let registry = Registry::new(&RegistryConfig {
            allow_hosts: allow,
            insecure,
            ..quick_config()
        })
        .unwrap();
        let blob = test_blob(&registry, &host, &digest, data.len() as u64);
        assert_eq!(read(&blob, 0, 10).unwrap(), &data[..10], "{host}");
    }
}

/// Redirect targets are checked like registries: no loopback, private or metadata address
/// that is not listed, and plain http only to `insecure` (or allowed loopback) hosts.
#[test]
fn registry_checks_every_redirect_target() {
    let (reg, data, digest) = registry_with_blob(100_000, 33);
    let storage = Front::start(&reg.addr, None);
    let port = storage.addr.rsplit(':').next().unwrap().to_owned();
    let front = Front::start(&reg.addr, None);
    let registry = Registry::new(&RegistryConfig {
        retries: 0,
        timeout_secs: 3.0,
        connect_timeout_secs: 1.0,
        allow_hosts: vec!["127.0.0.1".into(), "10.1.2.3".into()],
        ..quick_config()
    })
    .unwrap();
    let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
    for (target, why) in [
        (format!("http://localhost:{port}"), "allow_hosts"),
        ("http://169.254.169.254".to_owned(), "allow_hosts"),
        ("http://[fd00:ec2::254]".to_owned(), "allow_hosts"),
        ("http://192.168.1.1:5000".to_owned(), "allow_hosts"),
        ("http://10.1.2.3:9".to_owned(), "insecure"),
    ] {
        *front.redirect.lock().unwrap() = Some(target.clone());
        let e = read(&blob, 0, 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{target}: {e}");
        assert!(e.to_string().contains(why), "{target}: {e}");
    }
    assert!(storage.seen.lock().unwrap().is_empty());
    // To an allowed loopback host, followed.
    *front.redirect.lock().unwrap() = Some(format!("http://{}", storage.addr));
    assert_eq!(read(&blob, 0, 10).unwrap(), &data[..10]);
}

/// A redirect from https to plain http is refused, even to an allowed host.
#[test]
fn registry_refuses_https_to_http_redirects() {
    let (reg, data, digest) = registry_with_blob(100_000, 34);
    let sink = Front::start(&reg.addr, None);
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = test_certificate(tmp.path());
    let tls = TlsRedirect::start(&cert, &key, &format!("http://{}", sink.addr));
    let root = reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
    // An https mirror (loopback registries are plain http) of a host that is not there.
    let registry = Registry::with_roots(
        &RegistryConfig {
            retries: 0,
            timeout_secs: 3.0,
            connect_timeout_secs: 1.0,
            mirrors: vec![crate::config::MirrorConfig {
                host: "registry.invalid".into(),
                mirrors: vec![format!("https://{}", tls.addr)],
            }],
            ..quick_config()
        },
        vec![root],
    )
    .unwrap();
    let blob = RemoteBlob::new(
        registry.clone(),
        "registry.invalid/test/blob",
        &digest,
        data.len() as u64,
    )
    .unwrap();
    let e = read(&blob, 0, 10).expect_err("read through an https -> http redirect");
    assert_eq!(tls.hits.load(SeqCst), 1, "{e}");
    assert!(e.to_string().contains("https to plain http"), "{e}");
    assert!(sink.seen.lock().unwrap().is_empty());
}

#[test]
fn registry_redacts_urls() {
    for (u, want) in [
        ("http://u:p@h:1/a/b?sig=x#f", "http://h:1/a/b"),
        ("https://h/a?X-Amz-Signature=x", "https://h/a"),
        ("http://u:p@[zz/a?sig=x", "http://[zz/a"),
        ("no url?sig=x", "no url"),
    ] {
        assert_eq!(redact_str(u), want, "{u}");
    }
}

#[test]
fn registry_host_patterns_and_forbidden_addresses() {
    for (ip, want) in [
        ("127.0.0.1", Some("loopback")),
        ("127.255.0.9", Some("loopback")),
        ("::1", Some("loopback")),
        ("::ffff:127.0.0.1", Some("loopback")),
        ("64:ff9b::7f00:1", Some("loopback")),
        ("169.254.169.254", Some("cloud metadata")),
        ("fd00:ec2::254", Some("cloud metadata")),
        ("100.100.100.200", Some("cloud metadata")),
        ("169.254.1.1", Some("link-local")),
        ("fe80::1", Some("link-local")),
        ("10.0.0.1", Some("private")),
        ("172.31.255.255", Some("private")),
        ("192.168.0.1", Some("private")),
        ("100.64.0.1", Some("private")),
        ("fd12::1", Some("private")),
        ("0.0.0.0", Some("unspecified")),
        ("0.1.2.3", Some("unspecified")),
        ("::", Some("unspecified")),
        ("224.0.0.1", Some("multicast or reserved")),
        ("255.255.255.255", Some("multicast or reserved")),
        ("ff02::1", Some("multicast")),
        ("1.2.3.4", None),
        ("172.32.0.1", None),
        ("100.128.0.1", None),
        ("2001:db8::1", None),
    ] {
        assert_eq!(forbidden_ip(ip.parse().unwrap()), want, "{ip}");
    }
    let p = |s: &str| HostPattern::parse(s).unwrap();
    let ip = |s: &str| HostName::Ip(s.parse().unwrap());
    let name = |s: &str| HostName::Name(s.into());
    assert_eq!(
        p("127.0.0.1:5000"),
        HostPattern {
            host: ip("127.0.0.1"),
            port: Some(5000)
        }
    );
    assert_eq!(
        p("localhost"),
        HostPattern {
            host: name("localhost"),
            port: None
        }
    );
    assert_eq!(
        p("[::1]:5000"),
        HostPattern {
            host: ip("::1"),
            port: Some(5000)
        }
    );
    assert_eq!(
        p("::1"),
        HostPattern {
            host: ip("::1"),
            port: None
        }
    );
    assert_eq!(
        p("[::1]"),
        HostPattern {
            host: ip("::1"),
            port: None
        }
    );
    assert_eq!(
        p("::ffff:127.0.0.1"),
        HostPattern {
            host: ip("127.0.0.1"),
            port: None
        }
    );
    assert_eq!(
        p(" Reg.Local.:5000"),
        HostPattern {
            host: name("reg.local"),
            port: Some(5000)
        }
    );
    assert_eq!(
        p("http://reg.local:5000/x"),
        HostPattern {
            host: name("reg.local"),
            port: Some(5000)
        }
    );
    for bad in [
        "",
        "reg:x",
        "reg:0",
        "reg:99999",
        "[::1",
        "[::1]x",
        "a b",
        ":5000",
    ] {
        assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
    }
    assert!(p("127.0.0.1").matches(&ip("127.0.0.1"), 1));
    assert!(p("127.0.0.1:5000").matches(&ip("127.0.0.1"), 5000));
    assert!(!p("127.0.0.1:5000").matches(&ip("127.0.0.1"), 5001));
    assert!(!p("localhost").matches(&ip("127.0.0.1"), 80));
    let e = Registry::new(&RegistryConfig {
        allow_hosts: vec!["reg:x".into()],
        ..Default::default()
    })
    .unwrap_err();
    assert!(format!("{e:#}").contains("[registry] allow_hosts"), "{e:#}");
}

/// Names of hosts that are not allowed may not resolve to forbidden addresses (checked
/// here below the name check: `localhost` resolves to 127.0.0.1); allowed hosts' may.
#[test]
fn registry_resolver_drops_forbidden_addresses() {
    let reg = start_registry("");
    let port = reg.addr.rsplit(':').next().unwrap().to_owned();
    let registry = Registry::new(&quick_config()).unwrap();
    let url = format!("http://localhost:{port}/v2/");
    let (inner, u) = (registry.inner.clone(), url.clone());
    let e = registry
        .handle
        .block_on(async move { inner.client.get(u).send().await })
        .unwrap_err();
    let f = http_failure("GET", e);
    assert!(matches!(f, RegistryError::Refused(_)), "{f}");
    assert_eq!(f.kind(), io::ErrorKind::PermissionDenied, "{f}");
    assert!(f.to_string().contains("resolves to 127.0.0.1"), "{f}");
    let inner = registry.inner.clone();
    let status = registry
        .handle
        .block_on(async move { inner.trusted_client.get(url).send().await })
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::OK);
}

/// A registry's Basic credentials go to its token server only on the registry's own host,
/// or on one `auth_realms` maps it to: a registry (or whoever answers for it) cannot have
/// them sent elsewhere by naming another realm.
#[test]
fn registry_credentials_only_to_the_registrys_realm() {
    let (reg, data, digest) = registry_with_blob(100_000, 35);
    let front = Front::start(
        &reg.addr,
        Some(FrontAuth::Bearer {
            uses: 1000,
            basic: Some(basic_header("alice", "s3cret")),
        }),
    );
    let port = front.addr.rsplit(':').next().unwrap().to_owned();
    // The same token server under another host name (its tokens work for the front).
    *front.realm.lock().unwrap() = Some(format!("http://localhost:{port}/token"));
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.json");
    std::fs::write(
        &config,
        serde_json::to_vec(&serde_json::json!({
            "auths": { (front.addr.clone()): { "username": "alice", "password": "s3cret" } }
        }))
        .unwrap(),
    )
    .unwrap();
    let cfg = RegistryConfig {
        docker_config: Some(config),
        allow_hosts: vec!["127.0.0.1".into(), "localhost".into()],
        retries: 0,
        ..quick_config()
    };
    let token_auths = |front: &Front| -> Vec<Option<String>> {
        let seen = front.seen.lock().unwrap();
        seen.iter()
            .filter(|s| s.target.starts_with("/token"))
            .map(|s| s.authorization.clone())
            .collect()
    };
    let registry = Registry::new(&cfg).unwrap();
    let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
    let e = read(&blob, 0, 10).expect_err("credentials went to another host's realm");
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("auth_realms"), "{e}");
    let auths = token_auths(&front);
    assert!(
        !auths.is_empty() && auths.iter().all(|a| a.is_none()),
        "{auths:?}"
    );

    // Mapped by the configuration: sent, and the read works.
    let registry = Registry::new(&RegistryConfig {
        auth_realms: [(front.addr.clone(), vec![format!("localhost:{port}")])].into(),
        ..cfg.clone()
    })
    .unwrap();
    let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
    assert_eq!(read(&blob, 0, 10).unwrap(), &data[..10]);
    let want = basic_header("alice", "s3cret");
    assert!(token_auths(&front).contains(&Some(want)));

    // A realm at a forbidden address is not even asked.
    *front.realm.lock().unwrap() = Some("http://169.254.169.254/token".into());
    let registry = Registry::new(&cfg).unwrap();
    let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
    let e = read(&blob, 0, 10).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("allow_hosts"), "{e}");
}

/// Credentials are looked up for the endpoint asked: a mirror never gets the upstream
/// host's, nor the upstream host the mirror's.
#[test]
fn registry_mirror_and_host_credentials_stay_apart() {
    let (reg, data, digest) = registry_with_blob(100_000, 36);
    let host = Front::start(
        &reg.addr,
        Some(FrontAuth::Basic(basic_header("up", "up-pw"))),
    );
    let mirror = Front::start(
        &reg.addr,
        Some(FrontAuth::Basic(basic_header("mi", "mi-pw"))),
    );
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.json");
    let registry = Registry::new(&RegistryConfig {
        docker_config: Some(config.clone()),
        retries: 0,
        mirrors: vec![crate::config::MirrorConfig {
            host: host.addr.clone(),
            mirrors: vec![mirror.addr.clone()],
        }],
        ..quick_config()
    })
    .unwrap();
    let blob = test_blob(&registry, &host.addr, &digest, data.len() as u64);
    let write = |key: &str, user: &str, pass: &str| {
        std::fs::write(
            &config,
            serde_json::to_vec(&serde_json::json!({
                "auths": { key: { "username": user, "password": pass } }
            }))
            .unwrap(),
        )
        .unwrap();
    };
    let auths = |f: &Front| -> Vec<String> {
        let seen = f.seen.lock().unwrap();
        seen.iter()
            .filter_map(|s| s.authorization.clone())
            .collect()
    };
    // Only the host's credentials: the mirror asks in vain, the host serves.
    write(&host.addr, "up", "up-pw");
    assert_eq!(read(&blob, 0, 10).unwrap(), &data[..10]);
    assert!(auths(&mirror).is_empty(), "{:?}", auths(&mirror));
    assert!(!auths(&host).is_empty());
    // Only the mirror's: the mirror serves; when it fails, the host is read with its own
    // (cached) credentials, never the mirror's.
    write(&mirror.addr, "mi", "mi-pw");
    assert_eq!(read(&blob, 20, 10).unwrap(), &data[20..30]);
    assert!(auths(&mirror).contains(&basic_header("mi", "mi-pw")));
    *mirror.always.lock().unwrap() = Some(Fault::Status(404));
    let before = auths(&host).len();
    assert_eq!(read(&blob, 40, 10).unwrap(), &data[40..50]);
    let sent = auths(&host)[before..].to_vec();
    assert!(!sent.is_empty(), "the host was not asked");
    assert!(
        sent.iter().all(|a| *a == basic_header("up", "up-pw")),
        "{sent:?}"
    );
    assert!(!auths(&host).contains(&basic_header("mi", "mi-pw")));
}

/// Which token servers may have a registry's credentials: its own host's, the ones
/// `auth_realms` names for it, and the built-in one for Docker Hub.
#[test]
fn registry_auth_realms_per_registry() {
    let (hub, hub_realm) = BUILTIN_AUTH_REALMS[0];
    let reg = Registry::new(&RegistryConfig {
        auth_realms: [(
            "reg.invalid:5000".to_owned(),
            vec!["auth.invalid".to_owned()],
        )]
        .into(),
        ..Default::default()
    })
    .unwrap();
    let policy = &reg.inner.policy;
    let url = |s: &str| Url::parse(s).unwrap();
    let hub_ep = reg.endpoints(hub).unwrap().pop().unwrap();
    let ep = reg.endpoints("reg.invalid:5000").unwrap().pop().unwrap();
    let other = reg.endpoints("other.invalid").unwrap().pop().unwrap();
    for (ep, realm, ok) in [
        (&hub_ep, format!("https://{hub_realm}/token"), true),
        (&hub_ep, "https://auth.invalid/token".into(), false),
        (&ep, "https://reg.invalid:5001/token".into(), true),
        (&ep, "https://auth.invalid:8443/token".into(), true),
        (&ep, "https://sub.auth.invalid/token".into(), false),
        (&ep, format!("https://{hub_realm}/token"), false),
        (&other, "https://auth.invalid/token".into(), false),
        (&other, "https://other.invalid/token".into(), true),
    ] {
        assert_eq!(
            policy.creds_may_go_to(ep, &url(&realm)),
            ok,
            "{} {realm}",
            ep.label()
        );
    }
    assert!(Registry::new(&RegistryConfig {
        auth_realms: [("x".to_owned(), vec!["bad host".to_owned()])].into(),
        ..Default::default()
    })
    .is_err());
}

/// A registry that accepts connections and never answers holds only its own request slots:
/// reads from another registry complete while its reads are all still pending.
#[test]
fn registry_blackholed_host_does_not_stall_others() {
    use std::sync::mpsc::{channel, TryRecvError};
    let (reg, data, digest) = registry_with_blob(100_000, 37);
    // Accepts, never answers; hands each connection over (kept open while held).
    let hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_addr = hole.local_addr().unwrap().to_string();
    let (conn_tx, conn_rx) = channel::<TcpStream>();
    std::thread::spawn(move || {
        for c in hole.incoming() {
            let Ok(c) = c else { return };
            if conn_tx.send(c).is_err() {
                return;
            }
        }
    });
    let registry = Registry::new(&RegistryConfig {
        timeout_secs: 3600.0,
        stall_timeout_secs: 3600.0,
        retries: 0,
        ..quick_config()
    })
    .unwrap();
    // Registry A: more reads at once than one host has request slots.
    let a = test_blob(&registry, &hole_addr, &digest, data.len() as u64);
    let (a_tx, a_rx) = channel();
    let ranges = vec![(0u64, 10usize); MAX_CONCURRENT_REQUESTS + 4];
    std::thread::spawn(move || {
        let _ = a_tx.send(a.read_ranges(&ranges));
    });
    // (Hang guards only: on time, these come at once.)
    let guard = Duration::from_secs(120);
    let mut held = Vec::new();
    for i in 0..MAX_CONCURRENT_REQUESTS {
        held.push(
            conn_rx
                .recv_timeout(guard)
                .unwrap_or_else(|_| panic!("only {i} of A's requests connected")),
        );
    }
    // Registry B, meanwhile: read.
    let b = test_blob(&registry, &reg.addr, &digest, data.len() as u64);
    let (b_tx, b_rx) = channel();
    std::thread::spawn(move || {
        let _ = b_tx.send(read(&b, 100, 1000));
    });
    let got = b_rx
        .recv_timeout(guard)
        .expect("registry B's read waited for registry A's request slots");
    assert_eq!(got.unwrap(), &data[100..1100]);
    // ... and A's are all still pending, on no more connections than its slots.
    assert!(matches!(a_rx.try_recv(), Err(TryRecvError::Empty)));
    assert!(
        conn_rx.try_recv().is_err(),
        "more requests to A than its slots"
    );
    // A's connections closed (and no more taken): its reads fail.
    drop(held);
    drop(conn_rx);
    let e = a_rx
        .recv_timeout(guard)
        .expect("A's reads did not end")
        .unwrap_err();
    assert!(e.to_string().contains(&hole_addr), "{e}");
}

/// Presigned redirect URLs carry their signature in the query, mirror URLs may carry a
/// password: errors (and log lines) name URLs without query and userinfo.
#[test]
fn registry_errors_hide_url_queries_and_userinfo() {
    let (reg, data, digest) = registry_with_blob(100_000, 38);
    let storage = Front::start(&reg.addr, None);
    let front = Front::start(&reg.addr, None);
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let registry = Registry::new(&RegistryConfig {
        retries: 1,
        timeout_secs: 5.0,
        ..quick_config()
    })
    .unwrap();
    let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
    for (what, target, fault, named) in [
        (
            "404",
            storage.addr.clone(),
            Some(Fault::Status(404)),
            storage.addr.clone(),
        ),
        (
            "503",
            storage.addr.clone(),
            Some(Fault::Status(503)),
            storage.addr.clone(),
        ),
        ("refused", dead.clone(), None, dead.clone()),
        ("bad Location", "[zz".into(), None, "Location".into()),
    ] {
        *front.redirect.lock().unwrap() = Some(format!("http://{target}"));
        *storage.always.lock().unwrap() = fault;
        let e = read(&blob, 0, 10).unwrap_err().to_string();
        assert!(!e.contains("secret"), "{what}: {e}");
        assert!(e.contains(&named), "{what}: {e}");
    }
    // Userinfo in a mirror URL.
    let registry = Registry::new(&RegistryConfig {
        retries: 0,
        timeout_secs: 5.0,
        mirrors: vec![crate::config::MirrorConfig {
            host: "registry.invalid".into(),
            mirrors: vec![format!("http://mirror-user:mirror-secret@{dead}")],
        }],
        ..quick_config()
    })
    .unwrap();
    let blob = RemoteBlob::new(registry, "registry.invalid/test/blob", &digest, 100).unwrap();
    let e = read(&blob, 0, 10).unwrap_err().to_string();
    assert!(!e.contains("secret"), "{e}");
    assert!(e.contains(&dead), "{e}");
}
