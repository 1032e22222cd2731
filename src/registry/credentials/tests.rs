use super::*;
use crate::config::RegistryConfig;
use crate::registry::{basic_header, Registry, RemoteBlob};
use crate::testing::*;
use ovbd_format::ReadAt;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;

// ------------------------------------------------------------------------------ test helpers

fn b64(s: impl AsRef<[u8]>) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn basic(u: &str, p: &str) -> Credential {
    Credential::Basic {
        username: u.into(),
        password: p.into(),
    }
}

/// Writes `docker-credential-NAME` into `dir`: a shell script running `body`.
fn write_helper(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(format!("docker-credential-{name}"));
    fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A helper that appends the server URL it is asked about to `DIR/NAME.asked` and answers
/// Username `user` and the Secret in `DIR/NAME.secret`.
fn recording_helper(dir: &Path, name: &str, user: &str, secret: &str) {
    let d = dir.display();
    fs::write(dir.join(format!("{name}.secret")), secret).unwrap();
    write_helper(
        dir,
        name,
        &format!(
            "url=$(cat)\nprintf '%s\\n' \"$url\" >> '{d}/{name}.asked'\n\
             printf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"%s\"}}' \
             \"$url\" \"$(cat '{d}/{name}.secret')\""
        ),
    );
}

/// The server URLs helper `name` of [`recording_helper`] was asked about.
fn asked(dir: &Path, name: &str) -> Vec<String> {
    fs::read_to_string(dir.join(format!("{name}.asked")))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn helpers_in(dir: &Path, timeout: Duration) -> HelperSetup {
    HelperSetup {
        dirs: vec![dir.to_owned()],
        timeout,
    }
}

fn write_json(path: &Path, v: serde_json::Value) {
    fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn lookup(config: &serde_json::Value, host: &str) -> Result<Lookup, CredentialError> {
    let text = serde_json::to_vec(config).unwrap();
    let path = Path::new("/etc/ovbd/config.json");
    DockerConfig::parse(&text, path)?.lookup(path, host)
}

fn read(blob: &RemoteBlob, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let n = blob.read_at(&mut buf, off)?;
    buf.truncate(n);
    Ok(buf)
}

/// A registry client reading credentials from `config`, helpers from `helpers`.
fn registry_client(config: &Path, helpers: HelperSetup) -> Arc<Registry> {
    let registry = Registry::new(&RegistryConfig {
        docker_config: Some(config.to_owned()),
        ..quick_config()
    })
    .unwrap();
    registry.credential_store().set_helpers(helpers);
    registry
}

fn blob_at(
    registry: &Arc<Registry>,
    addr: &str,
    repo: &str,
    digest: &str,
    size: usize,
) -> RemoteBlob {
    RemoteBlob::new(
        registry.clone(),
        &format!("{addr}/{repo}"),
        digest,
        size as u64,
    )
    .unwrap()
}

// ------------------------------------------------------------------------------- the file

/// `auths` entries as before: base64 `auth`, `username`/`password`, `registrytoken`, keys in
/// every form docker writes, errors naming file and key; `identitytoken` now too.
#[test]
fn credentials_auths_entries() {
    let config = serde_json::json!({
        "auths": {
            "https://index.docker.io/v1/": { "auth": b64("hubuser:hub:pass") },
            "127.0.0.1:5000": { "username": "alice", "password": "s3cret" },
            "http://reg.lan:5000/v2/": { "auth": b64("bob:pw") },
            "token.lan": { "registrytoken": "tok" },
            "oauth.lan": { "auth": b64("00000000-0000-0000-0000-000000000000:"), "identitytoken": "refresh-1" },
            "onlyid.lan": { "identitytoken": "refresh-2" },
            "empty.lan": {},
            "nopass.lan": { "username": "carol" },
            "nouser.lan": { "password": "p" },
            "emptyuser.lan": { "username": "", "password": "p" },
            "broken.lan": { "auth": "!!!" },
            "nocolon.lan": { "auth": b64("justuser") },
            "notutf8.lan": { "auth": b64([0xff, 0xfe, b':', b'x']) },
            "nopad.lan": { "auth": b64("dave:pw").trim_end_matches('=') },
        },
    });
    let found = |host: &str| match lookup(&config, host).unwrap() {
        Lookup::Found(c) => c,
        other => panic!("{host}: {other:?}"),
    };
    for hub in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
        assert_eq!(found(hub), basic("hubuser", "hub:pass"), "{hub}");
    }
    assert_eq!(found("127.0.0.1:5000"), basic("alice", "s3cret"));
    assert_eq!(found("reg.lan:5000"), basic("bob", "pw"));
    assert_eq!(found("REG.lan:5000"), basic("bob", "pw"));
    assert_eq!(found("reg.lan"), Credential::Anonymous, "another port");
    assert_eq!(found("token.lan"), Credential::RegistryToken("tok".into()));
    // The identity token wins over the placeholder `auth` written beside it.
    assert_eq!(
        found("oauth.lan"),
        Credential::IdentityToken("refresh-1".into())
    );
    assert_eq!(
        found("onlyid.lan"),
        Credential::IdentityToken("refresh-2".into())
    );
    assert_eq!(found("nopad.lan"), basic("dave", "pw"));
    for anonymous in [
        "empty.lan",
        "nopass.lan",
        "nouser.lan",
        "emptyuser.lan",
        "other.lan",
    ] {
        assert_eq!(found(anonymous), Credential::Anonymous, "{anonymous}");
    }
    for (bad, why) in [
        ("broken.lan", "auth is not base64"),
        ("nocolon.lan", "auth is not base64 of user:password"),
        ("notutf8.lan", "auth is not UTF-8"),
    ] {
        let e = lookup(&config, bad).unwrap_err().to_string();
        assert!(
            e.contains("/etc/ovbd/config.json") && e.contains(bad) && e.contains(why),
            "{e}"
        );
    }
    // Not JSON, or `auths` of the wrong type: errors naming the file.
    for text in [
        &b"{not json"[..],
        br#"{"auths": []}"#,
        br#"{"auths": {"h": {"auth": 5}}}"#,
    ] {
        let e = DockerConfig::parse(text, Path::new("/x/config.json"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("parsing /x/config.json: "), "{e}");
    }
    // Secrets stay out of Debug output.
    let shown = format!(
        "{:?} {:?} {:?}",
        basic("u", "pw-secret"),
        Credential::IdentityToken("id-secret".into()),
        Credential::RegistryToken("tok-secret".into())
    );
    assert!(!shown.contains("secret"), "{shown}");
}

/// `credHelpers` per host, else `credsStore`; an `auths` entry with credentials first; a
/// helper name is a name, never a path.
#[test]
fn credentials_helper_lookup_and_names() {
    let config = serde_json::json!({
        "auths": {
            "inline.lan": { "username": "u", "password": "p" },
            "stored.lan": {},
        },
        "credHelpers": { "https://helped.lan:5000": "xyz", "inline.lan": "xyz" },
        "credsStore": "desktop.exe",
    });
    let helper = |name: &str, field: &str| Lookup::Helper {
        name: name.into(),
        field: field.into(),
    };
    assert_eq!(
        lookup(&config, "helped.lan:5000").unwrap(),
        helper("xyz", "credHelpers.\"https://helped.lan:5000\"")
    );
    assert_eq!(
        lookup(&config, "stored.lan").unwrap(),
        helper("desktop.exe", "credsStore")
    );
    assert_eq!(
        lookup(&config, "helped.lan").unwrap(),
        helper("desktop.exe", "credsStore")
    );
    // A host's own helper comes before its `auths` credentials, which come before the store.
    assert_eq!(
        lookup(&config, "inline.lan").unwrap(),
        helper("xyz", "credHelpers.\"inline.lan\"")
    );
    let no_own_helper = serde_json::json!({
        "auths": { "inline.lan": { "username": "u", "password": "p" } },
        "credsStore": "desktop.exe",
    });
    assert_eq!(
        lookup(&no_own_helper, "inline.lan").unwrap(),
        Lookup::Found(basic("u", "p"))
    );
    // An empty credsStore is none.
    let none = serde_json::json!({ "credsStore": "" });
    assert_eq!(
        lookup(&none, "any.lan").unwrap(),
        Lookup::Found(Credential::Anonymous)
    );
    for bad in [
        "../../bin/sh",
        "/usr/bin/evil",
        "a/b",
        "..",
        "x..y",
        "",
        "sp ace",
        "semi;colon",
        "back\\slash",
    ] {
        for config in [
            serde_json::json!({ "credHelpers": { "h.lan": bad } }),
            serde_json::json!({ "credsStore": bad }),
        ] {
            match lookup(&config, "h.lan") {
                // An empty credsStore is no store; an empty credHelpers entry is refused.
                Ok(Lookup::Found(Credential::Anonymous)) if bad.is_empty() => {}
                Ok(other) => panic!("{bad:?} accepted: {other:?}"),
                Err(e) => {
                    let e = e.to_string();
                    assert!(
                        e.contains("/etc/ovbd/config.json")
                            && e.contains("names credential helper"),
                        "{e}"
                    );
                }
            }
        }
    }
}

/// No config, no file: anonymous; a file that cannot be read or parsed: an error naming it.
#[test]
fn credentials_store_reads_the_file_each_time() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let helpers = helpers_in(tmp.path(), HELPER_TIMEOUT);
    let none = CredentialStore::new(None, helpers.clone());
    assert_eq!(
        rt.block_on(none.get("h.lan")).unwrap(),
        Credential::Anonymous
    );
    assert_eq!(none.source_name("h.lan"), "(no docker config.json)");
    let path = tmp.path().join("config.json");
    let store = CredentialStore::new(Some(path.clone()), helpers.clone());
    assert_eq!(
        rt.block_on(store.get("h.lan")).unwrap(),
        Credential::Anonymous
    );
    write_json(
        &path,
        serde_json::json!({ "auths": { "h.lan": { "username": "u", "password": "1" } } }),
    );
    assert_eq!(rt.block_on(store.get("h.lan")).unwrap(), basic("u", "1"));
    write_json(
        &path,
        serde_json::json!({ "auths": { "h.lan": { "username": "u", "password": "2" } } }),
    );
    assert_eq!(rt.block_on(store.get("h.lan")).unwrap(), basic("u", "2"));
    fs::write(&path, "{").unwrap();
    let e = rt.block_on(store.get("h.lan")).unwrap_err().to_string();
    assert!(e.contains(&format!("parsing {}", path.display())), "{e}");
    let dir_store = CredentialStore::new(Some(tmp.path().to_owned()), helpers);
    let e = rt.block_on(dir_store.get("h.lan")).unwrap_err().to_string();
    assert!(
        e.contains(&format!("reading {}", tmp.path().display())),
        "{e}"
    );
}

// --------------------------------------------------------------------------- the helpers

/// The helper protocol: stdin, answers, "not found", failures; answers kept per host until
/// forgotten.
#[test]
fn credentials_helper_protocol() {
    let rt = runtime();
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let path = tmp.path().join("config.json");
    let store = CredentialStore::new(
        Some(path.clone()),
        helpers_in(&bin, Duration::from_secs(20)),
    );
    let with_helper = |name: &str| write_json(&path, serde_json::json!({ "credsStore": name }));
    let get = |host: &str| rt.block_on(store.get(host));

    recording_helper(&bin, "rec", "alice", "pw-1");
    with_helper("rec");
    assert_eq!(get("h.lan:5000").unwrap(), basic("alice", "pw-1"));
    assert_eq!(asked(&bin, "rec"), ["h.lan:5000"]);
    // Kept: the same host does not run it again, another host does.
    fs::write(bin.join("rec.secret"), "pw-2").unwrap();
    assert_eq!(get("h.lan:5000").unwrap(), basic("alice", "pw-1"));
    assert_eq!(get("other.lan").unwrap(), basic("alice", "pw-2"));
    assert_eq!(asked(&bin, "rec"), ["h.lan:5000", "other.lan"]);
    // Forgotten (after a refusal): asked again.
    store.forget("h.lan:5000");
    assert_eq!(get("h.lan:5000").unwrap(), basic("alice", "pw-2"));
    assert_eq!(asked(&bin, "rec").len(), 3);
    // Docker Hub's helpers know it by docker's server URL, whatever alias the image uses.
    for hub in ["docker.io", "index.docker.io"] {
        store.forget(hub);
        get(hub).unwrap();
        assert_eq!(asked(&bin, "rec").last().unwrap(), DOCKER_HUB_SERVER_URL);
    }
    assert_eq!(
        store.source_name("h.lan:5000"),
        format!(
            "credential helper docker-credential-rec (credsStore in {})",
            path.display()
        )
    );

    // `<token>`: an identity token.
    recording_helper(&bin, "oauth", IDENTITY_TOKEN_USERNAME, "refresh-9");
    with_helper("oauth");
    assert_eq!(
        get("h.lan").unwrap(),
        Credential::IdentityToken("refresh-9".into())
    );
    // "not found": anonymous; so is an empty answer.
    write_helper(
        &bin,
        "none",
        "cat >/dev/null; echo 'credentials not found in native keychain'; exit 1",
    );
    with_helper("none");
    assert_eq!(get("h.lan").unwrap(), Credential::Anonymous);
    write_helper(
        &bin,
        "empty",
        r#"cat >/dev/null; echo '{"ServerURL":"","Username":"","Secret":""}'"#,
    );
    with_helper("empty");
    assert_eq!(get("h.lan").unwrap(), Credential::Anonymous);

    // Failures name helper, host and config, never the secret.
    let err = |host: &str| get(host).unwrap_err().to_string();
    write_helper(
        &bin,
        "locked",
        "cat >/dev/null; echo 'keychain is locked'; echo more; exit 3",
    );
    with_helper("locked");
    let e = err("h.lan");
    assert!(
        e.contains("docker-credential-locked")
            && e.contains("h.lan")
            && e.contains(&path.display().to_string())
            && e.contains("exit status: 3: keychain is locked")
            && !e.contains("more"),
        "{e}"
    );
    write_helper(
        &bin,
        "leaky",
        r#"cat >/dev/null; echo '{"Username":"u","Secret":"hunter2-leaked"}'; exit 1"#,
    );
    with_helper("leaky");
    let e = err("h.lan");
    assert!(
        e.contains("docker-credential-leaky") && e.contains("exit status: 1"),
        "{e}"
    );
    assert!(!e.contains("hunter2"), "{e}");
    write_helper(
        &bin,
        "garbled",
        r#"cat >/dev/null; echo '{"Username":"u","Secret":["hunter2-leaked"]}'"#,
    );
    with_helper("garbled");
    let e = err("h.lan");
    assert!(
        e.contains("docker-credential-garbled") && e.contains("not {\"Username\""),
        "{e}"
    );
    assert!(!e.contains("hunter2"), "{e}");
    // Not in the search path (a file that is not executable does not count).
    fs::write(bin.join("docker-credential-noexec"), "#!/bin/sh\nexit 0\n").unwrap();
    for missing in ["absent", "noexec"] {
        with_helper(missing);
        let e = err("h.lan");
        assert!(
            e.contains(&format!("docker-credential-{missing}"))
                && e.contains("not found in the helper search path")
                && e.contains(&bin.display().to_string()),
            "{e}"
        );
    }
}

// ------------------------------------------------------------------- through the registry

/// (a) A `credHelpers` helper answers for a Basic-auth registry: asked with the server URL,
/// once for many reads and repositories, and again after the registry refuses its answer.
#[test]
fn registry_credential_helper_per_host() {
    let (reg, data, digest) = registry_with_blob(700_000, 21);
    let digest2 = push_blob(&reg.addr, "test/other", &data[..1000], None);
    let front = Front::start(
        &reg.addr,
        Some(FrontAuth::Basic(basic_header("alice", "s3cret"))),
    );
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.json");
    write_json(
        &config,
        serde_json::json!({ "credHelpers": { (front.addr.clone()): "xyz" } }),
    );
    recording_helper(tmp.path(), "xyz", "alice", "s3cret");
    let registry = registry_client(&config, helpers_in(tmp.path(), HELPER_TIMEOUT));
    let blob = blob_at(&registry, &front.addr, "test/blob", &digest, data.len());
    check_random_ranges(&blob, &data, 10, 22);
    let other = blob_at(&registry, &front.addr, "test/other", &digest2, 1000);
    assert_eq!(read(&other, 0, 1000).unwrap(), &data[..1000]);
    assert_eq!(asked(tmp.path(), "xyz"), vec![front.addr.clone()]);
    for s in front.seen.lock().unwrap().iter() {
        if let Some(a) = &s.authorization {
            assert_eq!(*a, basic_header("alice", "s3cret"));
        }
    }

    // The helper's answer is refused (a new registry client: no cached header): the read fails
    // naming the helper; fixed in the helper's store, the next read asks it again and works.
    fs::write(tmp.path().join("xyz.secret"), "wrong").unwrap();
    let registry = registry_client(&config, helpers_in(tmp.path(), HELPER_TIMEOUT));
    let blob = blob_at(&registry, &front.addr, "test/blob", &digest, data.len());
    let e = read(&blob, 0, 10).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("docker-credential-xyz"), "{e}");
    assert!(!e.to_string().contains("wrong"), "{e}");
    fs::write(tmp.path().join("xyz.secret"), "s3cret").unwrap();
    assert_eq!(read(&blob, 5, 10).unwrap(), &data[5..15]);
    assert_eq!(asked(tmp.path(), "xyz").len(), 3);
}

/// (b) `credsStore` for every host; its Basic credentials go to the token realm only.
#[test]
fn registry_creds_store_with_token_server() {
    let (reg, data, digest) = registry_with_blob(600_000, 23);
    let front = Front::start(
        &reg.addr,
        Some(FrontAuth::Bearer {
            uses: 1000,
            basic: Some(basic_header("bob", "store-pw")),
        }),
    );
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.json");
    write_json(
        &config,
        serde_json::json!({ "auths": { (front.addr.clone()): {} }, "credsStore": "store" }),
    );
    recording_helper(tmp.path(), "store", "bob", "store-pw");
    let registry = registry_client(&config, helpers_in(tmp.path(), HELPER_TIMEOUT));
    let blob = blob_at(&registry, &front.addr, "test/blob", &digest, data.len());
    check_random_ranges(&blob, &data, 10, 24);
    assert_eq!(asked(tmp.path(), "store"), vec![front.addr.clone()]);
    assert_eq!(registry.token_requests(), 1);
    for s in front.seen.lock().unwrap().iter() {
        match &s.authorization {
            Some(a) if s.target.starts_with("/token") => {
                assert_eq!(*a, basic_header("bob", "store-pw"))
            }
            Some(a) => assert!(a.starts_with("Bearer tok-"), "{a}"),
            None => {}
        }
    }
}

/// (c) An identity token (from `auths`, then from a helper's `<token>` answer) is POSTed to
/// the token realm as an OAuth2 refresh_token grant, never sent as Basic.
#[test]
fn registry_identity_token_refresh_grant() {
    let (reg, data, digest) = registry_with_blob(600_000, 25);
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.json");
    for from_helper in [false, true] {
        let front = Front::start(
            &reg.addr,
            Some(FrontAuth::Bearer {
                uses: 4,
                basic: None,
            }),
        );
        let realm = front.oauth_realm("refresh-abc");
        let entry = if from_helper {
            recording_helper(tmp.path(), "oauth", IDENTITY_TOKEN_USERNAME, "refresh-abc");
            serde_json::json!({ "credHelpers": { (front.addr.clone()): "oauth" } })
        } else {
            serde_json::json!({
                "auths": { (front.addr.clone()): {
                    "auth": b64("00000000-0000-0000-0000-000000000000:"),
                    "identitytoken": "refresh-abc",
                } }
            })
        };
        write_json(&config, entry);
        let registry = registry_client(&config, helpers_in(tmp.path(), HELPER_TIMEOUT));
        let blob = blob_at(&registry, &front.addr, "test/blob", &digest, data.len());
        check_random_ranges(&blob, &data, 8, 26);
        let grants = realm.grants.lock().unwrap().clone();
        assert!(!grants.is_empty());
        for g in &grants {
            assert_eq!(g.method, "POST", "{g:?}");
            assert_eq!(
                g.content_type.as_deref(),
                Some("application/x-www-form-urlencoded")
            );
            assert_eq!(g.authorization, None, "{g:?}");
            let field = |k: &str| g.fields.get(k).map(String::as_str);
            assert_eq!(field("grant_type"), Some("refresh_token"));
            assert_eq!(field("refresh_token"), Some("refresh-abc"));
            assert_eq!(field("client_id"), Some("ovbd"));
            assert_eq!(field("service"), Some("front"));
            assert_eq!(field("scope"), Some("repository:test/blob:pull"));
        }
        assert_eq!(grants.len() as u64, registry.token_requests());
        for s in front.seen.lock().unwrap().iter() {
            if let Some(a) = &s.authorization {
                assert!(a.starts_with("Bearer tok-oauth-"), "{a}");
            }
        }
    }

    // A refresh token the realm refuses: a clear error, not a fall-back to anything else.
    let front = Front::start(
        &reg.addr,
        Some(FrontAuth::Bearer {
            uses: 4,
            basic: None,
        }),
    );
    let realm = front.oauth_realm("another-token");
    write_json(
        &config,
        serde_json::json!({ "auths": { (front.addr.clone()): { "identitytoken": "refresh-abc" } } }),
    );
    let registry = registry_client(&config, helpers_in(tmp.path(), HELPER_TIMEOUT));
    let blob = blob_at(&registry, &front.addr, "test/blob", &digest, data.len());
    let e = read(&blob, 0, 10).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    let e = e.to_string();
    assert!(
        e.contains("refresh_token grant") && e.contains("401") && e.contains("identity token"),
        "{e}"
    );
    assert!(!e.contains("refresh-abc"), "{e}");
    let grants = realm.grants.lock().unwrap().clone();
    assert!(
        grants
            .iter()
            .all(|g| g.method == "POST" && g.authorization.is_none()),
        "{grants:?}"
    );
}

/// (d) A helper that hangs, or floods its output, is killed: the read fails naming it, and
/// reads from other hosts go on meanwhile.
#[test]
fn registry_helper_hangs_or_floods() {
    let (reg, data, digest) = registry_with_blob(300_000, 27);
    let hung = Front::start(&reg.addr, Some(FrontAuth::Basic(basic_header("u", "p"))));
    let flooded = Front::start(&reg.addr, Some(FrontAuth::Basic(basic_header("u", "p"))));
    let fine = Front::start(&reg.addr, Some(FrontAuth::Basic(basic_header("u", "p"))));
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().display();
    write_helper(
        tmp.path(),
        "hang",
        &format!("echo $$ > '{d}/hang.pid'\nexec sleep 600"),
    );
    write_helper(
        tmp.path(),
        "flood",
        "exec yes '{\"Username\":\"u\",\"Secret\":\"p\"}'",
    );
    recording_helper(tmp.path(), "good", "u", "p");
    let config = tmp.path().join("config.json");
    write_json(
        &config,
        serde_json::json!({ "credHelpers": {
            (hung.addr.clone()): "hang",
            (flooded.addr.clone()): "flood",
            (fine.addr.clone()): "good",
        } }),
    );
    let timeout = Duration::from_secs(4);
    let registry = registry_client(&config, helpers_in(tmp.path(), timeout));
    let blob = |front: &Front| blob_at(&registry, &front.addr, "test/blob", &digest, data.len());

    let hung_blob = blob(&hung);
    let waiting = std::thread::spawn(move || read(&hung_blob, 0, 10));
    let pid_file = tmp.path().join("hang.pid");
    while !pid_file.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    // The hanging helper runs: another host's reads (and its helper) are not held up.
    assert_eq!(read(&blob(&fine), 0, 100).unwrap(), &data[..100]);
    assert!(!waiting.is_finished(), "the hanging helper answered?");
    let e = waiting.join().unwrap().unwrap_err().to_string();
    assert!(
        e.contains("docker-credential-hang")
            && e.contains(&hung.addr)
            && e.contains(&format!("no answer within {timeout:?} (killed)")),
        "{e}"
    );
    // Killed, not left behind.
    let pid: i32 = fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: signal 0 only checks that the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 {
        std::thread::sleep(Duration::from_millis(10));
    }

    let e = read(&blob(&flooded), 0, 10).unwrap_err().to_string();
    assert!(
        e.contains("docker-credential-flood")
            && e.contains(&flooded.addr)
            && e.contains(&format!(
                "wrote more than {MAX_HELPER_OUTPUT} bytes (killed)"
            )),
        "{e}"
    );
    assert_eq!(
        hung.blob_gets() + flooded.blob_gets(),
        2,
        "one anonymous try each"
    );
}

/// (e) A helper that fails: the read's error names the helper and the host, not the secret.
#[test]
fn registry_helper_failure_is_named() {
    let (reg, data, digest) = registry_with_blob(300_000, 29);
    let front = Front::start(
        &reg.addr,
        Some(FrontAuth::Basic(basic_header("u", "topsecret"))),
    );
    let tmp = tempfile::tempdir().unwrap();
    write_helper(
        tmp.path(),
        "broken",
        r#"cat >/dev/null; echo '{"ServerURL":"x","Username":"u","Secret":"topsecret"}'; exit 2"#,
    );
    let config = tmp.path().join("config.json");
    write_json(
        &config,
        serde_json::json!({ "credHelpers": { (front.addr.clone()): "broken" } }),
    );
    let registry = registry_client(&config, helpers_in(tmp.path(), HELPER_TIMEOUT));
    let blob = blob_at(&registry, &front.addr, "test/blob", &digest, data.len());
    let e = read(&blob, 0, 10).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    let e = e.to_string();
    assert!(
        e.contains("docker-credential-broken")
            && e.contains(&format!("credentials for {}", front.addr))
            && e.contains("exit status: 2")
            && e.contains(&digest),
        "{e}"
    );
    assert!(!e.contains("topsecret"), "{e}");
}
