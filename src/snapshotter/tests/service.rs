//! Failures as containerd sees them: through the gRPC service, each with its gRPC code and a
//! log line naming the call and the snapshot key.

use super::*;
use crate::snapshotter::error::is_transient;
use std::io;

/// The adapter's log records, kept for the tests (the only logger of the test binary).
struct AdapterLogs(Mutex<Vec<(log::Level, String)>>);

static LOGS: AdapterLogs = AdapterLogs(Mutex::new(Vec::new()));

impl AdapterLogs {
    /// The lines so far (a failed test's panic must not hide them from the others).
    fn lines(&self) -> std::sync::MutexGuard<'_, Vec<(log::Level, String)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl log::Log for AdapterLogs {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.target() == "ovbd::snapshotter::service"
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let line = r.args().to_string();
            self.lines().push((r.level(), line));
        }
    }
    fn flush(&self) {}
}

/// The levels of the adapter's log lines that start with `prefix` (a call and a key).
fn logged(prefix: &str) -> Vec<log::Level> {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&LOGS).expect("no other logger in the test binary");
        log::set_max_level(log::LevelFilter::Debug);
    });
    LOGS.lines()
        .iter()
        .filter(|(_, line)| line.starts_with(prefix))
        .map(|(level, _)| *level)
        .collect()
}

/// Asserts `r` failed with `code` and that the failure was logged at `level` under `prefix`.
fn assert_failed<T: std::fmt::Debug>(
    r: Result<T, tonic::Status>,
    code: tonic::Code,
    level: log::Level,
    prefix: &str,
) -> tonic::Status {
    let status = r.expect_err(prefix);
    assert_eq!(status.code(), code, "{prefix}: {}", status.message());
    let levels = logged(prefix);
    assert!(levels.contains(&level), "{prefix}: logged at {levels:?}");
    status
}

#[tokio::test]
async fn failures_reach_containerd_as_their_grpc_codes_and_are_logged() {
    logged(""); // the logger is in place before the first call
    let (_d, s) = snapshotter();
    let mut svc = serve_grpc(s.with_remote(Arc::new(FixtureRemote::default())), "ovbd").await;
    let none = HashMap::new;
    let warn = log::Level::Warn;

    // Stat's NotFound answers containerd's "does this layer exist?": not worth a warning.
    let r = svc.stat("svc-missing".into()).await;
    assert_failed(
        r,
        tonic::Code::NotFound,
        log::Level::Debug,
        "stat svc-missing:",
    );
    assert!(!logged("stat svc-missing:").contains(&warn));
    let r = svc.mounts("svc-missing".into()).await;
    assert_failed(r, tonic::Code::NotFound, warn, "mounts svc-missing:");

    svc.prepare("svc-a".into(), String::new(), none())
        .await
        .unwrap();
    let r = svc.prepare("svc-a".into(), String::new(), none()).await;
    assert_failed(r, tonic::Code::AlreadyExists, warn, "prepare svc-a:");

    // Malformed labels: the writable layer's size, a blob digest.
    let vsize = HashMap::from([
        (LABEL_WRITABLE.to_string(), "dir".to_string()),
        (LABEL_VSIZE.to_string(), "1e3".to_string()),
    ]);
    let r = svc.prepare("svc-vsize".into(), String::new(), vsize).await;
    let st = assert_failed(r, tonic::Code::InvalidArgument, warn, "prepare svc-vsize:");
    assert!(st.message().contains(LABEL_VSIZE), "{}", st.message());
    let bad = format!("sha256:{}", "G".repeat(64));
    let r = svc
        .prepare(
            "svc-digest".into(),
            String::new(),
            remote_labels_of(&bad, &bad, LABEL_CRI_IMAGE_REF),
        )
        .await;
    let st = assert_failed(r, tonic::Code::InvalidArgument, warn, "prepare svc-digest:");
    assert!(st.message().contains(LABEL_BLOB_DIGEST), "{}", st.message());
    let r = svc.list(vec!["labels.\"k".into()]).await;
    assert_failed(r.map(|_| ()), tonic::Code::InvalidArgument, warn, "list");

    // State conflicts: a parent with children, a committed snapshot's mounts, a view's commit.
    svc.commit("svc-l".into(), "svc-a".into(), none())
        .await
        .unwrap();
    svc.view("svc-v".into(), "svc-l".into(), none())
        .await
        .unwrap();
    let r = svc.remove("svc-l".into()).await;
    let st = assert_failed(r, tonic::Code::FailedPrecondition, warn, "remove svc-l:");
    assert!(st.message().contains("svc-v"), "{}", st.message());
    let r = svc.mounts("svc-l".into()).await;
    assert_failed(r, tonic::Code::FailedPrecondition, warn, "mounts svc-l:");
    let r = svc.commit("svc-x".into(), "svc-v".into(), none()).await;
    assert_failed(
        r,
        tonic::Code::FailedPrecondition,
        warn,
        "commit svc-v (as svc-x):",
    );
    let r = svc.commit("svc-l".into(), "svc-v".into(), none()).await;
    assert_failed(
        r,
        tonic::Code::AlreadyExists,
        warn,
        "commit svc-v (as svc-l):",
    );

    // A lazy pull's AlreadyExists is its success: logged, but not as a warning.
    let r = svc
        .prepare(
            "svc-extract".into(),
            String::new(),
            remote_labels(HELLO_BLOB, LABEL_CRI_IMAGE_REF),
        )
        .await;
    assert_failed(
        r,
        tonic::Code::AlreadyExists,
        log::Level::Info,
        "prepare svc-extract:",
    );
    assert!(!logged("prepare svc-extract:").contains(&warn));
}

/// A registry whose blobs fail to open with an I/O error of one kind.
struct FailingRemote(io::ErrorKind);

impl RemoteSource for FailingRemote {
    fn open(
        &self,
        url: &str,
        _digest: &str,
        _size: u64,
        _dir: Option<&Path>,
    ) -> anyhow::Result<Arc<dyn ovbd_format::ReadAt>> {
        Err(io::Error::new(self.0, format!("{url}: injected failure")).into())
    }
}

#[tokio::test]
async fn a_registry_that_times_out_is_unavailable_and_one_that_refuses_internal() {
    logged("");
    for (kind, code, key) in [
        (
            io::ErrorKind::TimedOut,
            tonic::Code::Unavailable,
            "svc-ctr-t",
        ),
        (
            io::ErrorKind::ConnectionReset,
            tonic::Code::Unavailable,
            "svc-ctr-r",
        ),
        (
            io::ErrorKind::PermissionDenied,
            tonic::Code::Internal,
            "svc-ctr-p",
        ),
    ] {
        let (_d, s) = snapshotter();
        let mut svc = serve_grpc(s.with_remote(Arc::new(FailingRemote(kind))), "ovbd").await;
        // The lazy pull commits the layer without reading it...
        let r = svc
            .prepare(
                format!("{key}-extract"),
                String::new(),
                remote_labels(HELLO_BLOB, LABEL_CRI_IMAGE_REF),
            )
            .await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::AlreadyExists);
        // ...a container on it opens the blob for the image's device.
        let r = svc
            .prepare(key.into(), HELLO_BLOB.into(), HashMap::new())
            .await;
        let st = assert_failed(r, code, log::Level::Warn, &format!("prepare {key}:"));
        assert!(
            st.message().contains("injected failure"),
            "{}",
            st.message()
        );
        let r = svc.stat(key.into()).await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::NotFound, "{kind:?}");
    }
}

#[tokio::test]
async fn a_busy_writable_device_makes_commit_unavailable() {
    use std::sync::atomic::Ordering::SeqCst;
    logged("");
    let (_d, mut s) = snapshotter();
    let ops = fake_ops(&mut s);
    with_writable_device(&s, &ops, "svc-busy", 51);
    // Something still uses the container's filesystem: its device cannot be detached yet.
    ops.busy.store(true, SeqCst);
    let mut svc = serve_grpc(s, "ovbd").await;
    let r = svc
        .commit("svc-busy-image".into(), "svc-busy".into(), HashMap::new())
        .await;
    assert_failed(
        r,
        tonic::Code::Unavailable,
        log::Level::Warn,
        "commit svc-busy (as svc-busy-image):",
    );
    let info = svc.stat("svc-busy".into()).await.unwrap();
    assert_eq!(info.kind, containerd_snapshots::Kind::Active);
    assert!(ops.stopped.lock().unwrap().is_empty());
}

#[test]
fn transient_failures_are_told_by_the_first_cause_that_knows() {
    let io_err = |kind: io::ErrorKind| io::Error::new(kind, "x");
    // Through context and the format engine's error, as a block read reports it.
    let read = |kind| {
        anyhow::Error::from(ovbd_format::Error::Io {
            file: "blob".into(),
            offset: 4096,
            source: io_err(kind),
        })
        .context("lowers[0]: opening the blob")
    };
    assert!(is_transient(&read(io::ErrorKind::TimedOut)));
    assert!(is_transient(&read(io::ErrorKind::ConnectionRefused)));
    assert!(!is_transient(&read(io::ErrorKind::NotFound)));
    assert!(!is_transient(&read(io::ErrorKind::InvalidData)));
    // An io::Error carrying another: the payload tells (its kind may be only Other).
    let wrapped = anyhow::Error::from(io::Error::other(io_err(io::ErrorKind::TimedOut)));
    assert!(is_transient(&wrapped));
    let wrapped = anyhow::Error::from(io::Error::new(
        io::ErrorKind::TimedOut,
        io_err(io::ErrorKind::PermissionDenied),
    ));
    assert!(!is_transient(&wrapped));
    // Nothing that tells: not transient.
    assert!(!is_transient(&anyhow::anyhow!("no answer")));
    let e = SnapshotterError::from(read(io::ErrorKind::ConnectionReset));
    assert_eq!(e.code(), tonic::Code::Unavailable);
    let e = SnapshotterError::from(io_err(io::ErrorKind::NotFound));
    assert_eq!(e.code(), tonic::Code::Internal);
}

#[test]
fn registry_failures_reach_containerd_by_their_class() {
    use crate::registry::RegistryError;
    // As a block read reports them: a RegistryError inside the io::Error of a format error.
    let read = |r: RegistryError| {
        anyhow::Error::from(ovbd_format::Error::Io {
            file: "blob".into(),
            offset: 0,
            source: io::Error::new(r.kind(), r),
        })
        .context("lowers[0]: opening the blob")
    };
    let code = |r| SnapshotterError::from(read(r)).code();
    assert_eq!(
        code(RegistryError::transient("HTTP 503")),
        tonic::Code::Unavailable
    );
    assert_eq!(
        code(RegistryError::TimedOut("deadline".into())),
        tonic::Code::Unavailable
    );
    assert_eq!(
        code(RegistryError::NotFound("HTTP 404".into())),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(RegistryError::InvalidInput("bad digest".into())),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(RegistryError::Denied("HTTP 403".into())),
        tonic::Code::Internal
    );
    assert_eq!(
        code(RegistryError::Refused("allow_hosts".into())),
        tonic::Code::Internal
    );
    // "gave up after N attempts" of a transient fault is still transient, whatever io kind.
    let gave_up = anyhow::Error::from(io::Error::other(RegistryError::transient("gave up")));
    assert_eq!(
        SnapshotterError::from(gave_up).code(),
        tonic::Code::Unavailable
    );
}
