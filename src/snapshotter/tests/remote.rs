//! Remote (lazily pulled) layers.

use super::*;

#[test]
fn remote_layer_is_committed_at_prepare_and_read_from_the_registry() {
    let (_d, s) = snapshotter();
    // Without a registry source, the same Prepare is an ordinary unpack.
    let m = s
        .create(
            "k0",
            "",
            Kind::Active,
            remote_labels("chain-0", LABEL_IMAGE_REF),
        )
        .unwrap();
    assert_eq!(m[0].r#type, "bind");
    s.remove("k0").unwrap();

    let remote = Arc::new(FixtureRemote::default());
    let s = s.with_remote(remote.clone());
    // Pulled, then pulled again (already there).
    for pull in ["first", "again"] {
        let e = s
            .create(
                "extract-1",
                "",
                Kind::Active,
                remote_labels(HELLO_BLOB, LABEL_CRI_IMAGE_REF),
            )
            .unwrap_err();
        assert_eq!(code(e), tonic::Code::AlreadyExists, "{pull}");
    }
    assert!(
        s.meta.get("extract-1").is_err(),
        "no active snapshot is left"
    );
    let c = s.meta.get(HELLO_BLOB).unwrap();
    assert_eq!((c.kind, c.storage), (Kind::Committed, Storage::Block));
    // The first pull has what the device's open reads fetched ahead, as the layer's own.
    assert_eq!(
        *remote.prefetched.lock().unwrap(),
        [(
            "https://127.0.0.1:5000/v2/hello-world/blobs".to_string(),
            HELLO_BLOB.to_string(),
            641024,
            s.dir(c.id).join("fs")
        )]
    );
    assert_eq!(c.labels[LABEL_REMOTE], "remote snapshot");
    assert_eq!(
        c.labels[LABEL_REPO_BLOB_URL],
        "https://127.0.0.1:5000/v2/hello-world/blobs"
    );
    // Missing an image reference, or the blob annotations: not lazy.
    let mut l = remote_labels("chain-2", LABEL_CRI_IMAGE_REF);
    l.remove(LABEL_CRI_IMAGE_REF);
    assert_eq!(
        s.create("k2", "", Kind::Active, l).unwrap()[0].r#type,
        "bind"
    );
    // A bad size is refused, naming the label.
    let mut l = remote_labels("chain-3", LABEL_CRI_IMAGE_REF);
    l.insert(LABEL_BLOB_SIZE.into(), "big".into());
    let e = s.create("k3", "", Kind::Active, l).unwrap_err();
    assert!(e.to_string().contains(LABEL_BLOB_SIZE), "{e}");
    // So is a size no blob has: the cache keeps per-block state of what it is told.
    let mut l = remote_labels("chain-3", LABEL_CRI_IMAGE_REF);
    l.insert(LABEL_BLOB_SIZE.into(), (u64::MAX / 2).to_string());
    let e = s.create("k3", "", Kind::Active, l).unwrap_err();
    assert!(e.to_string().contains(LABEL_BLOB_SIZE), "{e}");
    assert_eq!(code(e), tonic::Code::InvalidArgument);
    assert!(s.meta.get("chain-3").is_err() && s.meta.get("k3").is_err());

    // The device config names the blob; the image opens through the registry source.
    let bdir = s.dir(c.id).join("block");
    let cfg = s.image_config(std::slice::from_ref(&c), None, &bdir);
    assert_eq!(cfg.lowers[0].digest.as_deref(), Some(HELLO_BLOB));
    assert_eq!(
        cfg.repo_blob_url.as_deref(),
        Some("https://127.0.0.1:5000/v2/hello-world/blobs")
    );
    let image = cfg.open_image(Some(&*remote)).unwrap();
    assert_eq!(image.virtual_size(), 64 << 30);
    assert_eq!(remote.asked.lock().unwrap().len(), 1);
    let e = cfg.open_image(None).err().unwrap();
    assert!(format!("{e:#}").contains("remote only"), "{e:#}");
    // A finished download in fs/ wins over the registry.
    let bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hello-world-oci/blobs/sha256")
            .join(&HELLO_BLOB[7..]),
    )
    .unwrap();
    std::fs::write(s.dir(c.id).join("fs/overlaybd.commit"), bytes).unwrap();
    let cfg = s.image_config(std::slice::from_ref(&c), None, &bdir);
    cfg.open_image(None).unwrap();
}

/// An acceleration layer is replayed by the prefetcher, never opened as a layer: a lazy pull
/// of one fetches nothing ahead.
#[test]
fn an_acceleration_layer_has_nothing_fetched_ahead() {
    let (_d, s) = snapshotter();
    let remote = Arc::new(FixtureRemote::default());
    let s = s.with_remote(remote.clone());
    let digest = format!("sha256:{}", "ab".repeat(32));
    let mut l = remote_labels_of(&digest, &digest, LABEL_CRI_IMAGE_REF);
    l.insert(LABEL_ACCELERATION_LAYER.into(), "yes".into());
    let e = s.create("extract-accel", "", Kind::Active, l).unwrap_err();
    assert_eq!(code(e), tonic::Code::AlreadyExists);
    assert!(s.meta.get(&digest).is_ok());
    assert!(remote.prefetched.lock().unwrap().is_empty());
}

#[test]
fn only_a_client_written_image_ref_makes_a_layer_lazy() {
    let (d, s) = snapshotter();
    let s = s.with_remote(Arc::new(FixtureRemote::default()));
    // containerd copies the image's own containerd.io/snapshot/image-ref annotation into the
    // labels: by default it is not trusted to say where the blob is read from.
    let m = s
        .create(
            "k1",
            "",
            Kind::Active,
            remote_labels(HELLO_BLOB, LABEL_IMAGE_REF),
        )
        .unwrap();
    assert_eq!(m[0].r#type, "bind");
    s.remove("k1").unwrap();
    assert!(s.meta.get(HELLO_BLOB).is_err());
    // cri.image-ref (CRI and rpull write it over the manifest's) is, whatever image-ref says.
    let mut l = remote_labels(HELLO_BLOB, LABEL_CRI_IMAGE_REF);
    l.insert(LABEL_IMAGE_REF.into(), "127.0.0.1:6000/elsewhere:x".into());
    let e = s.create("k2", "", Kind::Active, l).unwrap_err();
    assert_eq!(code(e), tonic::Code::AlreadyExists);
    assert_eq!(
        s.meta.get(HELLO_BLOB).unwrap().labels[LABEL_REPO_BLOB_URL],
        "https://127.0.0.1:5000/v2/hello-world/blobs"
    );

    // For clients that overwrite image-ref (nerdctl), the operator may trust it.
    let mut cfg: Config = toml::from_str("trust_image_ref_label = true").unwrap();
    cfg.root = d.path().join("root2");
    let s = Snapshotter::open(cfg)
        .unwrap()
        .with_remote(Arc::new(FixtureRemote::default()));
    let e = s
        .create(
            "k3",
            "",
            Kind::Active,
            remote_labels(HELLO_BLOB, LABEL_IMAGE_REF),
        )
        .unwrap_err();
    assert_eq!(code(e), tonic::Code::AlreadyExists);
}

#[test]
fn prepare_refuses_malformed_digest_and_vsize_labels() {
    let (_d, s) = snapshotter();
    let s = s.with_remote(Arc::new(FixtureRemote::default()));
    // 64 characters after "sha256:" are not enough: the digest ends up in paths and URLs.
    for bad in [
        format!("sha256:{}", "../".repeat(21) + "a"),
        format!("sha256:{}", "A".repeat(64)),
        format!("sha256:{}", "é".repeat(32)),
        format!("sha256:{}", "g".repeat(64)),
    ] {
        let e = s
            .create(
                "k",
                "",
                Kind::Active,
                remote_labels_of(&bad, &bad, LABEL_CRI_IMAGE_REF),
            )
            .unwrap_err();
        assert!(e.to_string().contains(LABEL_BLOB_DIGEST), "{bad}: {e}");
        assert_eq!(code(e), tonic::Code::InvalidArgument, "{bad}");
        assert!(s.meta.get(&bad).is_err() && s.meta.get("k").is_err());
    }

    // The writable layer's size (GiB) is checked at Prepare, before anything is made.
    let writable = |vsize: &str| {
        HashMap::from([
            (LABEL_WRITABLE.to_string(), "dir".to_string()),
            (LABEL_VSIZE.to_string(), vsize.to_string()),
        ])
    };
    for bad in [
        "18446744073709551615",
        "17179869184",
        "262145",
        "0",
        "-1",
        "1e3",
    ] {
        let e = s.create("w", "", Kind::Active, writable(bad)).unwrap_err();
        assert!(e.to_string().contains(LABEL_VSIZE), "{bad}: {e}");
        assert_eq!(code(e), tonic::Code::InvalidArgument, "{bad}");
        assert!(s.meta.get("w").is_err());
    }
    // A sane size passes the check (the device then needs a frontend this host may lack).
    match s.create("w", "", Kind::Active, writable("1")) {
        Ok(_) => s.remove("w").unwrap(),
        Err(e) => {
            let msg = e.to_string();
            assert_ne!(code(e), tonic::Code::InvalidArgument, "{msg}");
        }
    }
}

#[test]
fn a_remote_layer_is_committed_only_under_its_blobs_chain_id() {
    let (_d, s) = snapshotter();
    let s = s.with_remote(Arc::new(FixtureRemote::default()));
    let cri = LABEL_CRI_IMAGE_REF;
    let is_lazy = |key: &str, parent: &str, name: &str, digest: &str| {
        match s.create(
            key,
            parent,
            Kind::Active,
            remote_labels_of(name, digest, cri),
        ) {
            Err(e) => {
                assert_eq!(code(e), tonic::Code::AlreadyExists, "{key}");
                true
            }
            Ok(m) => {
                // The ordinary unpack: containerd fetches the blob and checks its diff ID.
                assert_eq!(m[0].r#type, "bind", "{key}");
                let remote = s
                    .meta
                    .get(name)
                    .map(|c| c.labels.contains_key(LABEL_REMOTE));
                assert!(!remote.unwrap_or(false), "{key}: no remote layer {name}");
                s.remove(key).unwrap();
                false
            }
        }
    };
    // A bottom layer's chain ID is its diff ID (for OverlayBD, the blob digest).
    let victim = format!("sha256:{}", "ab".repeat(32));
    assert!(!is_lazy("k1", "", &victim, HELLO_BLOB));
    assert!(is_lazy("k2", "", HELLO_BLOB, HELLO_BLOB));
    let c = s.meta.get(HELLO_BLOB).unwrap();
    assert_eq!((c.kind, c.storage), (Kind::Committed, Storage::Block));
    // Pulled before, from the same blob: AlreadyExists again.
    assert!(is_lazy("k2b", "", HELLO_BLOB, HELLO_BLOB));

    // Above a parent: sha256(parent chain + " " + digest).
    let d2 = format!("sha256:{}", "cd".repeat(32));
    assert!(!is_lazy(
        "k3",
        HELLO_BLOB,
        &chain_id_above(&victim, &d2),
        &d2
    ));
    assert!(!is_lazy("k4", HELLO_BLOB, &d2, &d2));
    let right = chain_id_above(HELLO_BLOB, &d2);
    assert!(is_lazy("k5", HELLO_BLOB, &right, &d2));
    let c = s.meta.get(&right).unwrap();
    assert_eq!((c.kind, c.parent.as_str()), (Kind::Committed, HELLO_BLOB));
    // Its parent named in containerd's namespaced form ("<ns>/<n>/<chain id>").
    s.create("plain-extract", "", Kind::Active, HashMap::new())
        .unwrap();
    let d3 = format!("sha256:{}", "ef".repeat(32));
    std::fs::write(
        s.dir(s.meta.get("plain-extract").unwrap().id)
            .join("fs/overlaybd.commit"),
        hello_zfile(),
    )
    .unwrap();
    s.commit(&format!("default/7/{d3}"), "plain-extract", HashMap::new())
        .unwrap();
    let d4 = format!("sha256:{}", "12".repeat(32));
    assert!(is_lazy(
        "k6",
        &format!("default/7/{d3}"),
        &chain_id_above(&d3, &d4),
        &d4
    ));

    // A name taken by a snapshot not committed from that blob is not "already there".
    s.create("other-extract", "", Kind::Active, HashMap::new())
        .unwrap();
    let d5 = format!("sha256:{}", "34".repeat(32));
    s.commit(&d5, "other-extract", HashMap::new()).unwrap();
    assert!(!is_lazy("k7", "", &d5, &d5));
}

/// A registry that answers nothing until the test lets it (a blackholed host).
struct StuckRemote {
    entered: Mutex<std::sync::mpsc::Sender<()>>,
    gate: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl RemoteSource for StuckRemote {
    fn open(
        &self,
        url: &str,
        _digest: &str,
        _size: u64,
        _dir: Option<&Path>,
    ) -> Result<Arc<dyn ovbd_format::ReadAt>> {
        let _ = self.entered.lock().unwrap().send(());
        let _ = self.gate.lock().unwrap().recv();
        bail!("{url}: no answer")
    }
}

/// Commits `name` as a local OverlayBD layer (the hello-world fixture's ZFile).
fn local_overlaybd_layer(s: &Snapshotter, name: &str) {
    let key = format!("{name}-extract");
    let m = s
        .create(
            &key,
            "",
            Kind::Active,
            HashMap::from([(LABEL_SNAPSHOT_REF.into(), name.into())]),
        )
        .unwrap();
    let bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hello-world-oci/blobs/sha256")
            .join(&HELLO_BLOB[7..]),
    )
    .unwrap();
    let fs = PathBuf::from(&m[0].source);
    std::fs::write(fs.join("overlaybd.commit"), &bytes[1536..1536 + 639_491]).unwrap();
    s.commit(name, &key, HashMap::new()).unwrap();
    assert_eq!(s.meta.get(name).unwrap().storage, Storage::Block);
}

#[test]
fn a_stuck_registry_does_not_hold_up_other_images() {
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
    let (_d, s) = snapshotter();
    let s = Arc::new(s.with_remote(Arc::new(StuckRemote {
        entered: Mutex::new(entered_tx),
        gate: Mutex::new(gate_rx),
    })));
    // Image A: a remote layer; image B: a local OverlayBD layer.
    let e = s
        .create(
            "extract-a",
            "",
            Kind::Active,
            remote_labels(HELLO_BLOB, LABEL_CRI_IMAGE_REF),
        )
        .unwrap_err();
    assert_eq!(code(e), tonic::Code::AlreadyExists);
    local_overlaybd_layer(&s, "b");

    let on_a = {
        let s = s.clone();
        std::thread::spawn(move || {
            s.create("ctr-a", HELLO_BLOB, Kind::Active, HashMap::new())
                .map(|_| ())
        })
    };
    entered_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("Prepare on image A never asked the registry");

    // While A waits for its registry, B's calls return (failing here for want of ublk).
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    {
        let s = s.clone();
        std::thread::spawn(move || {
            let _ = s.create("ctr-b", "b", Kind::Active, HashMap::new());
            let _ = s.create("view-b", "b", Kind::View, HashMap::new());
            let _ = s.remove("ctr-b");
            let _ = s.remove("view-b");
            // A dev-mode container whose device is down (as after a restart) is removed.
            s.meta
                .create(
                    "dev-b",
                    "b",
                    Kind::Active,
                    BTreeMap::new(),
                    |d| -> SnapResult<Snapshot> {
                        let mut d = d.clone();
                        d.mode = Some(SnapshotMode::Dev);
                        d.storage = Storage::Block;
                        Ok(d)
                    },
                )
                .unwrap();
            let _ = done_tx.send(s.remove("dev-b").map_err(|e| e.to_string()));
        });
    }
    // A hang guard only: B never needs A's registry.
    let on_b = done_rx.recv_timeout(Duration::from_secs(20));
    // Let A's registry answer in any case, so nothing is left hanging.
    drop(gate_tx);
    let on_a = on_a.join().unwrap();
    let on_b = on_b.expect("image B's calls waited for image A's registry");
    assert_eq!(on_b, Ok(()));
    let e = on_a.unwrap_err();
    assert!(e.to_string().contains("no answer"), "{e}");
    assert_eq!(code(s.stat("ctr-a").unwrap_err()), tonic::Code::NotFound);
}

/// A layer blob pushed to `repo` on `reg`, prepared as a lazy bottom layer of `image` (named by
/// `cri.image-ref`) under containerd key `key`: the name of its committed snapshot.
fn prepare_lazy_layer(s: &Snapshotter, key: &str, image: &str, digest: &str, size: usize) {
    let labels = HashMap::from([
        (LABEL_SNAPSHOT_REF.into(), digest.into()),
        (LABEL_BLOB_DIGEST.into(), digest.into()),
        (LABEL_BLOB_SIZE.into(), size.to_string()),
        (LABEL_CRI_IMAGE_REF.into(), image.into()),
    ]);
    let e = s.create(key, "", Kind::Active, labels).unwrap_err();
    assert_eq!(code(e), tonic::Code::AlreadyExists, "{key}");
}

/// The first 4 KiB of committed remote layer `name`, read as its device would read it.
fn read_lazy_layer(
    s: &Snapshotter,
    source: &crate::source::remote::RegistrySource,
    name: &str,
) -> Result<Vec<u8>> {
    let c = s.meta.get(name)?;
    let lc = s.lower_config(&c);
    let blob = source.open(
        lc.repo_blob_url.as_deref().context("no repoBlobUrl")?,
        lc.digest.as_deref().context("no digest")?,
        lc.size.context("no size")?,
        lc.dir.as_deref(),
    )?;
    let mut buf = vec![0u8; 4096];
    let n = blob.read_at(&mut buf, 0)?;
    buf.truncate(n);
    Ok(buf)
}

/// A pull secret captured by the CRI proxy serves the lazy reads of the layers prepared while
/// its PullImage ran, in the CRI namespace, and no other layer, not even one whose labels name
/// that same image: on a non-CRI pull (ctr, nerdctl) containerd copies an image's own layer
/// annotations (`containerd.io/snapshot/*`, `cri.image-ref` included) into the labels, so any
/// publisher can name another tenant's private repository there.
#[test]
fn a_cri_pull_secret_serves_only_the_layers_prepared_during_its_pull() {
    use crate::cri_proxy::tests::{client, pull_request, serve_on, FakeUpstream};
    use crate::cri_proxy::ImageProxy;
    use crate::testing::{push_blob, quick_config, random_bytes, start_registry, Front, FrontAuth};
    use base64::Engine as _;
    use k8s_cri::v1::{image_service_server::ImageServiceServer, AuthConfig};

    let reg = start_registry("");
    let size = 300_000;
    // The victim's private repository holds three layers.
    let blobs: Vec<(Vec<u8>, String)> = (0..3)
        .map(|i| {
            let data = random_bytes(size, 100 + 10 * i);
            let digest = push_blob(&reg.addr, "team-a/app", &data, None);
            (data, digest)
        })
        .collect();
    let front = Front::start(
        &reg.addr,
        Some(FrontAuth::Bearer {
            uses: 1000,
            basic: Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
            )),
        }),
    );
    let d = tempfile::tempdir().unwrap();
    let cfg = Config {
        root: d.path().join("root"),
        registry: quick_config(),
        download: crate::config::DownloadConfig {
            enable: false,
            ..Default::default()
        },
        ..Config::default()
    };
    let source = Arc::new(crate::source::remote::RegistrySource::from_config(&cfg).unwrap());
    let s = Arc::new(
        Snapshotter::open(cfg.clone())
            .unwrap()
            .with_remote(source.clone())
            .with_cri_pulls(source.captured_credentials()),
    );
    let image = format!("{}/team-a/app:v1", front.addr);

    // containerd's CRI, while it runs the pull: layer 0 unpacked in the CRI namespace (a lazy
    // layer), and meanwhile layer 2 by another client in its own namespace, same labels.
    let on_pull = {
        let (s, image) = (s.clone(), image.clone());
        let layers = [blobs[0].1.clone(), blobs[2].1.clone()];
        move |_: &k8s_cri::v1::PullImageRequest| {
            prepare_lazy_layer(&s, "k8s.io/1/extract-0", &image, &layers[0], size);
            prepare_lazy_layer(&s, "default/2/extract-2", &image, &layers[1], size);
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let (up_sock, proxy_sock) = (
        tmp.path().join("containerd.sock"),
        tmp.path().join("cri.sock"),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    serve_on(
        &rt,
        &up_sock,
        ImageServiceServer::new(FakeUpstream {
            on_pull: Some(Arc::new(on_pull)),
            ..Default::default()
        }),
    );
    let proxy = {
        let _enter = rt.enter();
        ImageProxy::new(up_sock, source.captured_credentials()).unwrap()
    };
    serve_on(&rt, &proxy_sock, proxy.into_service());
    rt.block_on(async {
        client(proxy_sock)
            .await
            .pull_image(pull_request(
                &image,
                AuthConfig {
                    username: "alice".into(),
                    password: "s3cret".into(),
                    server_address: front.addr.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
    });

    // The layer the pull prepared reads with its secret, after the pull returned.
    assert_eq!(
        read_lazy_layer(&s, &source, &blobs[0].1).unwrap(),
        &blobs[0].0[..4096]
    );
    // A layer prepared after the pull (a `ctr pull` of an image whose annotations name the
    // victim's image, in the CRI namespace even): the registry refuses it, no secret for it.
    prepare_lazy_layer(&s, "k8s.io/3/extract-1", &image, &blobs[1].1, size);
    let e = read_lazy_layer(&s, &source, &blobs[1].1).unwrap_err();
    assert!(format!("{e:#}").contains("401"), "{e:#}");
    // Nor a layer prepared during the pull but by another namespace's client.
    let e = read_lazy_layer(&s, &source, &blobs[2].1).unwrap_err();
    assert!(format!("{e:#}").contains("401"), "{e:#}");
    drop(rt);

    // The daemon restarts: secrets are gone, the binding is on disk. The bound layer reads
    // again once a PullImage of its repository brings a secret back; the others never do.
    drop((s, source));
    // Without the blocks cached so far: the reads below go to the registry.
    std::fs::remove_dir_all(cfg.root.join("cache")).unwrap();
    let source = Arc::new(crate::source::remote::RegistrySource::from_config(&cfg).unwrap());
    let s = Snapshotter::open(cfg)
        .unwrap()
        .with_remote(source.clone())
        .with_cri_pulls(source.captured_credentials());
    let e = read_lazy_layer(&s, &source, &blobs[0].1).unwrap_err();
    assert!(format!("{e:#}").contains("401"), "{e:#}");
    let (window, _) = source
        .captured_credentials()
        .begin_pull(
            &format!("{}/team-a/app:v2", front.addr),
            "",
            crate::registry::credentials::Credential::Basic {
                username: "alice".into(),
                password: "s3cret".into(),
            },
        )
        .unwrap();
    drop(window);
    assert_eq!(
        read_lazy_layer(&s, &source, &blobs[0].1).unwrap(),
        &blobs[0].0[..4096]
    );
    for (_, digest) in &blobs[1..] {
        let e = read_lazy_layer(&s, &source, digest).unwrap_err();
        assert!(format!("{e:#}").contains("401"), "{e:#}");
    }
    // Removed, the layer's binding goes with it.
    let layer = s.dir(s.meta.get(&blobs[0].1).unwrap().id).join("fs");
    s.remove(&blobs[0].1).unwrap();
    assert!(source
        .captured_credentials()
        .for_layer(&layer, &front.addr, "team-a/app")
        .is_none());
}
