//! Overlay snapshots, commits and cleanup as containerd expects them.

use super::*;

#[test]
fn overlay_snapshots_behave_like_containerds() {
    let (_d, s) = snapshotter();
    let m = s
        .create("l1-extract", "", Kind::Active, HashMap::new())
        .unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].r#type, "bind");
    assert!(m[0].options.contains(&"rw".to_string()));
    let fs1 = PathBuf::from(&m[0].source);
    std::fs::write(fs1.join("a"), "1").unwrap();
    s.commit(
        "l1",
        "l1-extract",
        HashMap::from([("k".into(), "v".into())]),
    )
    .unwrap();
    assert_eq!(
        code(s.stat("l1-extract").unwrap_err()),
        tonic::Code::NotFound
    );
    let info = s.stat("l1").unwrap();
    assert_eq!(info.kind, containerd_snapshots::Kind::Committed);
    assert_eq!(info.labels["k"], "v");
    assert!(s.usage("l1").unwrap().size > 0);

    let m = s
        .create("l2-extract", "l1", Kind::Active, HashMap::new())
        .unwrap();
    assert_eq!(m[0].r#type, "overlay");
    let lower = format!("lowerdir={}", fs1.display());
    assert!(m[0].options.contains(&lower), "{:?}", m[0].options);
    s.commit("l2", "l2-extract", HashMap::new()).unwrap();

    // A view of one layer is a read-only bind; of two, a read-only overlay (no upperdir).
    let v = s.create("v1", "l1", Kind::View, HashMap::new()).unwrap();
    assert_eq!(
        (v[0].r#type.as_str(), v[0].options[0].as_str()),
        ("bind", "ro")
    );
    let v = s.create("v2", "l2", Kind::View, HashMap::new()).unwrap();
    assert_eq!(v[0].r#type, "overlay");
    assert!(v[0].options.iter().all(|o| !o.starts_with("upperdir")));
    let lowers = v[0]
        .options
        .iter()
        .find(|o| o.starts_with("lowerdir="))
        .unwrap();
    assert_eq!(
        lowers.matches(':').count(),
        1,
        "nearest layer first, two lowers: {lowers}"
    );
    assert_eq!(s.mounts("v2").unwrap(), v);

    // Errors map to containerd's codes.
    assert_eq!(
        code(
            s.create("v2", "l2", Kind::View, HashMap::new())
                .unwrap_err()
        ),
        tonic::Code::AlreadyExists
    );
    assert_eq!(
        code(
            s.create("x", "nope", Kind::Active, HashMap::new())
                .unwrap_err()
        ),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(
            s.create("x", "v2", Kind::Active, HashMap::new())
                .unwrap_err()
        ),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(
        code(s.remove("l1").unwrap_err()),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(
        code(s.commit("y", "v2", HashMap::new()).unwrap_err()),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(
        code(s.mounts("l1").unwrap_err()),
        tonic::Code::FailedPrecondition
    );

    // Filters.
    let names = |f: &[&str]| {
        let mut v: Vec<String> = s
            .list(&f.iter().map(|x| x.to_string()).collect::<Vec<_>>())
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&["kind==committed"]), vec!["l1", "l2"]);
    assert_eq!(names(&["parent==l2"]), vec!["v2"]);
    assert_eq!(names(&["labels.k==v"]), vec!["l1"]);

    // Update by field path.
    let mut info = s.stat("l2").unwrap();
    info.labels.insert("a".into(), "b".into());
    s.update(info, Some(vec!["labels.a".into()])).unwrap();
    assert_eq!(s.stat("l2").unwrap().labels["a"], "b");

    for k in ["v1", "v2", "l2", "l1"] {
        s.remove(k).unwrap();
    }
    assert!(s.list(&[]).unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(s.cfg.root.join("snapshots"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn unpacked_overlaybd_layer_commits_as_block_and_mixed_stacks_are_defined() {
    let (_d, s) = snapshotter();
    let m = s
        .create(
            "obd-extract",
            "",
            Kind::Active,
            HashMap::from([(LABEL_SNAPSHOT_REF.into(), "x".into())]),
        )
        .unwrap();
    let fs = PathBuf::from(&m[0].source);
    let blob = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hello-world-oci/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d");
    // containerd extracts the PAX tar: fs/overlaybd.commit is the ZFile.
    let bytes = std::fs::read(blob).unwrap();
    std::fs::write(fs.join("overlaybd.commit"), &bytes[1536..1536 + 639_491]).unwrap();
    s.commit("obd", "obd-extract", HashMap::new()).unwrap();
    let c = s.meta.get("obd").unwrap();
    assert_eq!(c.storage, Storage::Block);
    assert!(c.labels[LABEL_LOCAL_COMMIT].ends_with("/fs/overlaybd.commit"));

    // The next layer unpacks into its own directory (no device needed), as upstream.
    let m = s
        .create(
            "default/9/extract-1-sha256:abc",
            "obd",
            Kind::Active,
            HashMap::new(),
        )
        .unwrap();
    assert_eq!(m[0].r#type, "bind");
    assert!(m[0].source.ends_with("/fs"));
    s.remove("default/9/extract-1-sha256:abc").unwrap();

    // A container on it needs the image's device. Without a frontend that can serve it,
    // Prepare fails cleanly and leaves nothing behind; with one, Remove leaves nothing either.
    let count = || {
        std::fs::read_dir(s.cfg.root.join("snapshots"))
            .unwrap()
            .count()
    };
    let n_before = count();
    match s.create("ctr", "obd", Kind::Active, HashMap::new()) {
        Ok(_) => s.remove("ctr").unwrap(),
        Err(e) => assert_eq!(code(e), tonic::Code::Internal),
    }
    assert_eq!(count(), n_before);
    assert_eq!(code(s.stat("ctr").unwrap_err()), tonic::Code::NotFound);

    // An OverlayBD layer above a plain one is refused with a clear reason.
    s.create("plain-extract", "", Kind::Active, HashMap::new())
        .unwrap();
    s.commit("plain", "plain-extract", HashMap::new()).unwrap();
    let mut chain = vec![s.meta.get("obd").unwrap(), s.meta.get("plain").unwrap()];
    let e = split_chain(&chain).unwrap_err();
    assert_eq!(code(e), tonic::Code::FailedPrecondition);
    chain.reverse();
    let (normal, block) = split_chain(&chain).unwrap();
    assert_eq!((normal.len(), block.len()), (1, 1));
}

#[test]
fn commit_takes_only_regular_files_as_overlaybd_layers() {
    let (d, s) = snapshotter();
    let unpack = || HashMap::from([(LABEL_SNAPSHOT_REF.to_string(), "x".to_string())]);
    // overlaybd.commit as a symlink to an OverlayBD file elsewhere on the node: a plain layer.
    let elsewhere = d.path().join("elsewhere.commit");
    std::fs::write(&elsewhere, hello_zfile()).unwrap();
    let m = s.create("sym-extract", "", Kind::Active, unpack()).unwrap();
    let fs = PathBuf::from(&m[0].source);
    std::os::unix::fs::symlink(&elsewhere, fs.join("overlaybd.commit")).unwrap();
    s.commit("sym", "sym-extract", HashMap::new()).unwrap();
    let c = s.meta.get("sym").unwrap();
    assert_eq!(c.storage, Storage::Normal);
    assert!(!c.labels.contains_key(LABEL_LOCAL_COMMIT));

    // A FIFO of that name: Commit returns (a plain layer) and the store keeps working.
    let m = s
        .create("fifo-extract", "", Kind::Active, unpack())
        .unwrap();
    let fifo = PathBuf::from(&m[0].source).join("overlaybd.commit");
    mkfifo(&fifo);
    let s = Arc::new(s);
    let (tx, rx) = std::sync::mpsc::channel();
    let s2 = s.clone();
    std::thread::spawn(move || {
        let r = s2.commit("fifo", "fifo-extract", HashMap::new());
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(r) => r.unwrap(),
        Err(_) => {
            // Hang detector: let the stuck open go before failing.
            let _w = std::fs::OpenOptions::new().write(true).open(&fifo);
            panic!("Commit of a layer with a FIFO overlaybd.commit did not return");
        }
    }
    assert_eq!(s.meta.get("fifo").unwrap().storage, Storage::Normal);
    s.create("next-extract", "fifo", Kind::Active, unpack())
        .unwrap();
    s.commit("next", "next-extract", HashMap::new()).unwrap();
    s.remove("next").unwrap();
}

#[test]
fn failed_commit_of_a_writable_layer_keeps_the_containers_data() {
    let (_d, s) = snapshotter();
    s.create("taken-extract", "", Kind::Active, HashMap::new())
        .unwrap();
    s.commit("taken", "taken-extract", HashMap::new()).unwrap();
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let snap = writable_snapshot(&s, "ctr", &data);
    let bdir = s.dir(snap.id).join("block");

    let e = s.commit("taken", "ctr", HashMap::new()).unwrap_err();
    assert_eq!(code(e), tonic::Code::AlreadyExists);
    // The container's layer is still its writable layer, holding what it wrote.
    let rw = RwLayer::open(&bdir.join("writable_data"), &bdir.join("writable_index")).unwrap();
    let img = ovbd_format::ImageStack::writable(None, rw).unwrap();
    let mut buf = vec![0u8; data.len()];
    img.read(&mut buf, 1 << 20).unwrap();
    assert_eq!(buf, data);
    drop(img);

    // A retry under a free name commits it, every byte included.
    s.commit("image-v2", "ctr", HashMap::new()).unwrap();
    let c = s.meta.get("image-v2").unwrap();
    assert_eq!((c.kind, c.storage), (Kind::Committed, Storage::Block));
    let cfg = s.image_config(std::slice::from_ref(&c), None, &bdir);
    let img = cfg.open_image(None).unwrap();
    let mut buf = vec![0u8; data.len()];
    img.read(&mut buf, 1 << 20).unwrap();
    assert_eq!(buf, data);
    assert!(!bdir.join("writable_data").exists());
}

#[test]
fn a_seal_is_undone_or_redone_without_losing_data() {
    let (_d, s) = snapshotter();
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 241) as u8).collect();
    let snap = writable_snapshot(&s, "ctr", &data);
    let dir = s.dir(snap.id);
    let (wdata, windex) = (
        dir.join("block/writable_data"),
        dir.join("block/writable_index"),
    );
    let before = std::fs::read(&wdata).unwrap();
    let read_upper = || {
        let rw = RwLayer::open(&wdata, &windex).unwrap();
        let img = ovbd_format::ImageStack::writable(None, rw).unwrap();
        let mut buf = vec![0u8; data.len()];
        img.read(&mut buf, 1 << 20).unwrap();
        buf
    };

    // Undone (the metadata commit failed): the writable layer is as it was.
    let u = SealedUpper::seal(&dir).unwrap();
    assert!(block_layer_file(&dir.join("fs")).is_some());
    u.undo().unwrap();
    assert_eq!(std::fs::read(&wdata).unwrap(), before);
    assert!(block_layer_file(&dir.join("fs")).is_none());
    assert_eq!(read_upper(), data);

    // Left sealed (the daemon stopped before the metadata commit): the layer still opens
    // writable with its data, and a later Commit seals it again.
    let u = SealedUpper::seal(&dir).unwrap();
    drop(u);
    assert_eq!(read_upper(), data);
    s.commit("image", "ctr", HashMap::new()).unwrap();
    let c = s.meta.get("image").unwrap();
    let cfg = s.image_config(std::slice::from_ref(&c), None, &dir.join("block"));
    let mut buf = vec![0u8; data.len()];
    cfg.open_image(None)
        .unwrap()
        .read(&mut buf, 1 << 20)
        .unwrap();
    assert_eq!(buf, data);
}

#[test]
fn cleanup_removes_orphan_directories_only() {
    let (_d, s) = snapshotter();
    s.create("a", "", Kind::Active, HashMap::new()).unwrap();
    s.create("b", "", Kind::Active, HashMap::new()).unwrap();
    // b's metadata gone, its directory left (a crash between the two steps).
    let orphan = s.dir(s.meta.remove("b").unwrap().id);
    // A directory past the next id belongs to a create still in flight.
    let in_flight = s.cfg.root.join("snapshots/999");
    std::fs::create_dir_all(in_flight.join("fs")).unwrap();
    assert!(orphan.exists());
    s.cleanup().unwrap();
    assert!(!orphan.exists());
    assert!(in_flight.exists());
    assert!(s.dir(s.meta.get("a").unwrap().id).exists());
}
