//! `ovbd serve` with `[metrics]` and its control socket: the numbers a scrape of `/metrics`
//! and `ovbd status --json` show follow the Snapshots API calls made.

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, StatSnapshotRequest, ViewSnapshotRequest,
};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// A free TCP port on loopback (released for the daemon to bind).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /metrics` on `addr`: the body.
fn scrape(addr: &str) -> String {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    text.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// The value of the sample `name{labels}` in `text` (absent: 0).
fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

fn wait_for(what: &str, child: &mut Child, log: &Path, cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        if let Some(s) = child.try_wait().unwrap() {
            panic!(
                "ovbd serve exited ({s}) waiting for {what}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no {what} after 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn metrics_and_status_follow_the_calls_made() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, control) = (dir.path().join("ovbd.sock"), dir.path().join("ctl.sock"));
    let addr = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("ovbd.toml");
    std::fs::write(
        &config,
        format!(
            "root = {:?}\nsocket = {:?}\ncontrol_socket = {:?}\n[metrics]\naddress = {addr:?}\n",
            dir.path().join("root"),
            socket,
            control
        ),
    )
    .unwrap();
    let log = dir.path().join("serve.err");
    let mut daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_ovbd"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("the socket", &mut daemon.0, &log, || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    // Root only: whoever can talk to it learns what every container runs.
    let mode = std::fs::metadata(&control).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let before = scrape(&addr);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = containerd_client::connect(&socket).await.unwrap();
        let mut c = SnapshotsClient::new(channel);
        let sn = || "ovbd".to_owned();
        for key in ["a", "b"] {
            c.prepare(PrepareSnapshotRequest {
                snapshotter: sn(),
                key: key.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        c.commit(CommitSnapshotRequest {
            snapshotter: sn(),
            name: "layer".into(),
            key: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        c.view(ViewSnapshotRequest {
            snapshotter: sn(),
            key: "v".into(),
            parent: "layer".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let missing = c
            .stat(StatSnapshotRequest {
                snapshotter: sn(),
                key: "nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound);
    });

    let after = scrape(&addr);
    let moved = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(
        moved("ovbd_grpc_calls_total{method=\"prepare\",code=\"OK\"}"),
        2,
        "{after}"
    );
    assert_eq!(
        moved("ovbd_grpc_calls_total{method=\"commit\",code=\"OK\"}"),
        1
    );
    assert_eq!(
        moved("ovbd_grpc_calls_total{method=\"view\",code=\"OK\"}"),
        1
    );
    assert_eq!(
        moved("ovbd_grpc_calls_total{method=\"stat\",code=\"NOT_FOUND\"}"),
        1
    );
    assert_eq!(
        moved("ovbd_snapshots_total{kind=\"active\",mode=\"overlayfs\"}"),
        2
    );
    assert_eq!(
        moved("ovbd_snapshots_total{kind=\"committed\",mode=\"overlayfs\"}"),
        1
    );
    assert_eq!(
        moved("ovbd_snapshots_total{kind=\"view\",mode=\"overlayfs\"}"),
        1
    );
    // The block cache is the daemon's (its limit: the default 4 GiB).
    assert_eq!(sample(&after, "ovbd_cache_limit_bytes"), 4 << 30, "{after}");

    let out = Command::new(env!("CARGO_BIN_EXE_ovbd"))
        .args(["status", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let count = |kind: &str| {
        status["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kind"] == kind)
            .map_or(0, |k| k["count"].as_u64().unwrap())
    };
    assert_eq!(
        (count("active"), count("committed"), count("view")),
        (1, 1, 1),
        "{status}"
    );
    assert_eq!(status["cache"]["limit_bytes"], 4u64 << 30, "{status}");
    // No layer is an OverlayBD one: no device.
    assert_eq!(status["devices"].as_array().unwrap().len(), 0, "{status}");
    // The table names the same.
    let out = Command::new(env!("CARGO_BIN_EXE_ovbd"))
        .args(["status", "--socket"])
        .arg(&control)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("snapshots: 1 active, 1 committed, 1 view"),
        "{table}"
    );
    // A socket nobody serves is a clear error.
    let out = Command::new(env!("CARGO_BIN_EXE_ovbd"))
        .args(["status", "--socket"])
        .arg(dir.path().join("none.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is ovbd serve running?"));
}

#[test]
fn a_bad_metrics_address_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ovbd.toml");
    std::fs::write(&config, "[metrics]\naddress = \"nine-eight-six-three\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ovbd"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[metrics] address") && err.contains("ovbd.toml"),
        "{err}"
    );
}
