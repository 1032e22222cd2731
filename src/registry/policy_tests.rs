//! The host policy against hostile references, redirects and token realms; credentials kept
//! apart; one host's trouble kept from the others; URLs redacted in errors.

use super::tests::{read, test_blob};
use super::*;
use crate::testing::*;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering::SeqCst;

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

/// `registry.invalid` (not there), mirrored by the https server at `addr`; no retries.
fn https_mirror_config(addr: &str) -> RegistryConfig {
    RegistryConfig {
        retries: 0,
        timeout_secs: 3.0,
        connect_timeout_secs: 1.0,
        mirrors: vec![crate::config::MirrorConfig {
            host: "registry.invalid".into(),
            mirrors: vec![format!("https://{addr}")],
        }],
        ..quick_config()
    }
}

/// The test blob through [`https_mirror_config`]'s mirror.
fn mirrored_blob(registry: &Arc<Registry>, digest: &str, size: u64) -> RemoteBlob {
    RemoteBlob::new(registry.clone(), "registry.invalid/test/blob", digest, size).unwrap()
}

/// A redirect from https to plain http is refused, even to an allowed host.
#[test]
fn registry_refuses_https_to_http_redirects() {
    let (reg, data, digest) = registry_with_blob(100_000, 34);
    let sink = Front::start(&reg.addr, None);
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = test_certificate(tmp.path());
    let tls = TlsRedirect::start(&cert, &key, &format!("http://{}", sink.addr));
    let root = {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        CertificateDer::from_pem_file(&cert).unwrap()
    };
    // An https mirror (loopback registries are plain http) of a host that is not there.
    let registry = Registry::with_roots(&https_mirror_config(&tls.addr), vec![root]).unwrap();
    let blob = mirrored_blob(&registry, &digest, data.len() as u64);
    let e = read(&blob, 0, 10).expect_err("read through an https -> http redirect");
    assert_eq!(tls.hits.load(SeqCst), 1, "{e}");
    assert!(e.to_string().contains("https to plain http"), "{e}");
    assert!(sink.seen.lock().unwrap().is_empty());
}

/// The platform's trust roots are loaded at the first https handshake, not for plain http,
/// once for both HTTP clients; and an https server's certificate is checked against them (a
/// self-signed one is refused before any request is sent).
#[test]
fn registry_loads_the_platform_roots_at_the_first_https_handshake() {
    let (reg, data, digest) = registry_with_blob(100_000, 35);
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = test_certificate(tmp.path());
    let tls = TlsRedirect::start(&cert, &key, &format!("http://{}", reg.addr));
    let registry = Registry::new(&https_mirror_config(&tls.addr)).unwrap();
    let roots = registry
        .inner
        .platform_roots
        .clone()
        .expect("platform roots");
    // Plain http (an allowed loopback registry): none loaded.
    let blob = test_blob(&registry, &reg.addr, &digest, data.len() as u64);
    assert_eq!(read(&blob, 0, 10).unwrap(), &data[..10]);
    assert!(!roots.loaded());
    // https: loaded, and the self-signed certificate is not among them.
    let blob = mirrored_blob(&registry, &digest, data.len() as u64);
    let e = read(&blob, 0, 10).expect_err("read from a server with a self-signed certificate");
    assert!(roots.loaded());
    assert_eq!(tls.hits.load(SeqCst), 0, "{e}");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
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
