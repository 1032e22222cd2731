//! `ovbd serve` logs: JSON lines with the fields of the gRPC call, device and registry blob
//! they belong to; the filter's sources in order (OVBD_LOG, RUST_LOG, `log_level`).

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn config(dir: &std::path::Path, format: &str) -> std::path::PathBuf {
    let config = dir.join("ovbd.toml");
    std::fs::write(
        &config,
        format!(
            "root = {:?}\nsocket = {:?}\nlog_level = \"info\"\nlog_format = \"{format}\"\n",
            dir.join("root"),
            dir.join("ovbd.sock")
        ),
    )
    .unwrap();
    config
}

#[test]
fn a_failed_call_is_a_json_warn_line_with_method_key_and_code() {
    let dir = tempfile::tempdir().unwrap();
    let err = dir.path().join("serve.err");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ovbd"))
        .arg("serve")
        .arg("--config")
        .arg(config(dir.path(), "json"))
        .env_remove("OVBD_LOG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let socket = dir.path().join("ovbd.sock");
    let t0 = Instant::now();
    while UnixStream::connect(&socket).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "serve exited");
        assert!(t0.elapsed() < Duration::from_secs(60), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        let channel = containerd_client::connect(&socket).await.unwrap();
        SnapshotsClient::new(channel)
            .remove(RemoveSnapshotRequest {
                snapshotter: "ovbd".into(),
                key: "no-such-key".into(),
            })
            .await
            .unwrap_err()
    });
    assert_eq!(status.code(), containerd_client::tonic::Code::NotFound);
    // SIGTERM, not kill: a killed daemon leaves its FUSE mount behind for the next daemon.
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let text = std::fs::read_to_string(&err).unwrap();
    let warn: serde_json::Value = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["level"] == "WARN")
        .unwrap_or_else(|| panic!("no JSON WARN line in:\n{text}"));
    assert_eq!(
        text.matches("\"WARN\"").count(),
        1,
        "one WARN line:\n{text}"
    );
    assert_eq!(warn["span"]["method"], "remove", "{warn}");
    assert_eq!(warn["span"]["key"], "no-such-key", "{warn}");
    assert_eq!(warn["fields"]["code"], "NotFound", "{warn}");
}

#[test]
fn a_bad_log_format_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "xml");
    let out = Command::new(env!("CARGO_BIN_EXE_ovbd"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("log_format"), "{err}");
    assert!(err.contains("xml"), "{err}");
}

/// `ovbd serve` with `config` and `env` (OVBD_LOG and RUST_LOG unset unless given), its
/// stderr in `dir/serve.err`, once its socket answers.
fn start_serve(dir: &Path, config: &Path, env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ovbd"));
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .env_remove("OVBD_LOG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("serve.err")).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let t0 = Instant::now();
    while UnixStream::connect(dir.join("ovbd.sock")).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "serve exited");
        assert!(t0.elapsed() < Duration::from_secs(60), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Stops `child` with SIGTERM (a killed daemon leaves its FUSE mount) and returns its JSON
/// log lines.
fn stop_serve(dir: &Path, mut child: Child) -> Vec<serde_json::Value> {
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    std::fs::read_to_string(dir.join("serve.err"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .collect()
}

/// Which of OVBD_LOG, RUST_LOG and the config's `log_level` sets the filter: the first that
/// is set and parses; one that does not parse is skipped with a warning naming it.
#[test]
fn the_log_filter_is_ovbd_log_else_rust_log_else_log_level() {
    /// log_level, environment, whether INFO lines appear.
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], bool);
    let cases: &[Case] = &[
        ("error", &[], false),
        ("info", &[], true),
        ("error", &[("RUST_LOG", "info")], true),
        ("info", &[("RUST_LOG", "error")], false),
        (
            "error",
            &[("OVBD_LOG", "info"), ("RUST_LOG", "error")],
            true,
        ),
        (
            "info",
            &[("OVBD_LOG", "error"), ("RUST_LOG", "info")],
            false,
        ),
        // A bad filter is skipped for the next source, with a warning.
        (
            "error",
            &[("OVBD_LOG", "info,[bad"), ("RUST_LOG", "info")],
            true,
        ),
    ];
    for (level, env, info) in cases {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), "json");
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("log_level = \"info\"", &format!("log_level = \"{level}\""));
        std::fs::write(&config, text).unwrap();
        let child = start_serve(dir.path(), &config, env);
        let lines = stop_serve(dir.path(), child);
        let what = format!("log_level {level}, {env:?}: {lines:#?}");
        assert_eq!(lines.iter().any(|l| l["level"] == "INFO"), *info, "{what}");
        let warned = lines.iter().any(|l| {
            l["level"] == "WARN"
                && l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("bad log filter OVBD_LOG"))
        });
        assert_eq!(
            warned,
            env.iter().any(|(_, v)| v.contains("[bad")),
            "{what}"
        );
    }
}

const HELLO_BLOB: &str = "sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d";

/// A registry on 127.0.0.1 that serves one blob (ranged GETs) of `repo`, nothing else, and
/// answers the first GET of it with a 503 (the client retries).
fn blob_registry(repo: &str, digest: &str, data: Vec<u8>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let path = format!("/v2/{repo}/blobs/{digest}");
    let failed_once = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (path, data, failed_once) = (path.clone(), data.clone(), failed_once.clone());
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                let target = line.split(' ').nth(1).unwrap_or_default().to_owned();
                let mut range = None;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        let (a, b) = v.trim().split_once('-').unwrap_or(("0", ""));
                        let a: usize = a.parse().unwrap_or(0);
                        let b: usize = b.parse().unwrap_or(data.len() - 1);
                        range = Some((a, b.min(data.len() - 1)));
                    }
                }
                let mut w = conn;
                if target == path && !failed_once.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    let _ = write!(
                        w,
                        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    return;
                }
                let _ = match (target == path, range) {
                    (true, Some((a, b))) => write!(
                        w,
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/{}\r\nConnection: close\r\n\r\n",
                        b + 1 - a,
                        data.len()
                    )
                    .and_then(|_| w.write_all(&data[a..=b])),
                    (true, None) => write!(
                        w,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        data.len()
                    )
                    .and_then(|_| w.write_all(&data)),
                    _ => write!(
                        w,
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    ),
                };
            });
        }
    });
    addr
}

/// The spans (name → fields) a JSON log line was in.
fn spans_of(line: &serde_json::Value) -> HashMap<String, serde_json::Value> {
    line["spans"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| (s["name"].as_str().unwrap_or_default().to_owned(), s.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// A lazily pulled image's device (FUSE frontend, as on any host without ublk): its attach
/// and detach lines carry the device span (id, image, frontend), and the lazy reads of its
/// layer, the blob span (digest, registry) inside it.
#[test]
fn device_and_blob_spans_name_what_an_event_belongs_to() {
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() } == 0
            && Path::new("/dev/fuse").exists()
            && Path::new("/dev/loop-control").exists(),
        "this test needs root, /dev/fuse and /dev/loop-control"
    );
    let blob = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hello-world-oci/blobs/sha256")
            .join(&HELLO_BLOB[7..]),
    )
    .unwrap();
    let size = blob.len().to_string();
    let registry = blob_registry("hello-world", HELLO_BLOB, blob);
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "json");
    let mut text = std::fs::read_to_string(&config).unwrap();
    // Not fetched whole (it is under whole_blob_kb): the layer's Prepare fetches its headers
    // and index ahead, and the device must still have blocks of its own to read.
    text += "\n[device]\nfrontend = \"fuse\"\nread_ahead_kb = 96\n\n[download]\nenable = false\n\n[cache]\nwhole_blob_kb = 0\n\n[registry]\nallow_hosts = [\"127.0.0.1\"]\n";
    std::fs::write(&config, text).unwrap();
    let child = start_serve(
        dir.path(),
        &config,
        &[("OVBD_LOG", "info,ovbd::registry=debug")],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let socket = dir.path().join("ovbd.sock");
    let image = format!("{registry}/hello-world:obd");
    let prepared = rt.block_on(async {
        let mut c = SnapshotsClient::new(containerd_client::connect(&socket).await.unwrap());
        let labels = HashMap::from([
            (
                "containerd.io/snapshot.ref".to_string(),
                HELLO_BLOB.to_string(),
            ),
            (
                "containerd.io/snapshot/overlaybd/blob-digest".into(),
                HELLO_BLOB.into(),
            ),
            (
                "containerd.io/snapshot/overlaybd/blob-size".into(),
                size.clone(),
            ),
            ("containerd.io/snapshot/cri.image-ref".into(), image.clone()),
        ]);
        let layer = c
            .prepare(PrepareSnapshotRequest {
                snapshotter: "ovbd".into(),
                key: "default/1/extract".into(),
                parent: String::new(),
                labels,
            })
            .await
            .unwrap_err();
        assert_eq!(
            layer.code(),
            containerd_client::tonic::Code::AlreadyExists,
            "{layer}"
        );
        let ctr = c
            .prepare(PrepareSnapshotRequest {
                snapshotter: "ovbd".into(),
                key: "default/2/ctr".into(),
                parent: HELLO_BLOB.into(),
                labels: HashMap::new(),
            })
            .await;
        // The image's loop device (its backing file is on the daemon's FUSE mount under
        // `dir`) reads ahead as `[device] read_ahead_kb` says.
        let read_ahead: Vec<String> = std::fs::read_dir("/sys/block")
            .unwrap()
            .filter_map(|e| {
                let p = e.ok()?.path();
                let backing = std::fs::read_to_string(p.join("loop/backing_file")).ok()?;
                backing
                    .starts_with(&*dir.path().to_string_lossy())
                    .then(|| {
                        std::fs::read_to_string(p.join("queue/read_ahead_kb")).unwrap_or_default()
                    })
            })
            .collect();
        let removed = c
            .remove(RemoveSnapshotRequest {
                snapshotter: "ovbd".into(),
                key: "default/2/ctr".into(),
            })
            .await;
        (ctr.map(|_| ()), removed.map(|_| ()), read_ahead)
    });
    let lines = stop_serve(dir.path(), child);
    let all = format!("{lines:#?}");
    assert!(
        prepared.0.is_ok() && prepared.1.is_ok(),
        "{prepared:?}\n{all}"
    );
    assert_eq!(prepared.2, vec!["96\n".to_string()], "{all}");

    let attached = lines
        .iter()
        .find(|l| l["fields"]["message"] == "attached")
        .unwrap_or_else(|| panic!("no attach line:\n{all}"));
    let device = &spans_of(attached)["device"];
    assert_eq!(device["frontend"], "fuse", "{attached}");
    assert!(device["id"].is_u64(), "{attached}");
    assert!(
        device["image"]
            .as_str()
            .is_some_and(|i| i.starts_with(&*dir.path().to_string_lossy())),
        "{attached}"
    );
    let read = lines
        .iter()
        .find(|l| spans_of(l).contains_key("blob") && spans_of(l).contains_key("device"))
        .unwrap_or_else(|| panic!("no line in a blob span on a device:\n{all}"));
    let spans = spans_of(read);
    assert_eq!(spans["blob"]["digest"], HELLO_BLOB, "{read}");
    assert_eq!(spans["blob"]["registry"], registry.as_str(), "{read}");
    assert_eq!(
        spans["device"]["image"], device["image"],
        "the read is the device's: {read}"
    );
    // The retry after the 503, logged on the registry client's threads, is in the blob span too.
    let retried = lines
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("attempt(s)"))
        })
        .unwrap_or_else(|| panic!("no line on the retried request:\n{all}"));
    assert_eq!(spans_of(retried)["blob"]["digest"], HELLO_BLOB, "{retried}");
    assert!(
        lines.iter().any(|l| l["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("detached"))),
        "no detach line:\n{all}"
    );
}
