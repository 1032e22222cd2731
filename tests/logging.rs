//! `ovbd serve` logs: JSON lines with the fields of the gRPC call they belong to.

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::RemoveSnapshotRequest;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
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
