//! The snapshotter's tests, by part: the contract (overlay snapshots, commits, cleanup), remote
//! layers, devices (through the `DeviceOps` seam: this host has no ublk). Shared fixtures here.

mod contract;
mod devices;
mod names;
mod remote;
mod service;

use super::devices::{lock_slot, DeviceOps, SharedDevice};
use super::disk::{block_layer_file, SealedUpper};
use super::error::{SnapResult, SnapshotterError};
use super::*;
use crate::device::{self, AttachedDevice};
use crate::labels::*;
use crate::oci::digest::chain_id_above;
use anyhow::{bail, Context};
use containerd_snapshots::api::snapshots::v1::{self as grpc, snapshots_client::SnapshotsClient};
use containerd_snapshots::tonic;
use ovbd_format::{RwLayer, RwMode};
use std::collections::BTreeSet;
use std::path::Path;

fn snapshotter() -> (tempfile::TempDir, Snapshotter) {
    let d = tempfile::tempdir().unwrap();
    let cfg = Config {
        root: d.path().join("root"),
        ..Config::default()
    };
    (d, Snapshotter::open(cfg).unwrap())
}

/// The daemon's gRPC service over `s` on a loopback port, and a client of it that speaks as
/// containerd's proxy plugin `name` does (every request carries the name).
async fn serve_grpc(s: Snapshotter, name: &str) -> Plugin {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(super::grpc_server(Arc::new(s)))
            .serve_with_incoming(incoming),
    );
    let client = SnapshotsClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Plugin(name.into(), client)
}

/// A client of the Snapshots service, as containerd's proxy plugin named `.0`.
struct Plugin(String, SnapshotsClient<tonic::transport::Channel>);

impl Plugin {
    /// The same socket under another name in containerd's config.
    fn named(&self, name: &str) -> Plugin {
        Plugin(name.into(), self.1.clone())
    }

    async fn prepare(
        &mut self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, tonic::Status> {
        let r = grpc::PrepareSnapshotRequest {
            snapshotter: self.0.clone(),
            key,
            parent,
            labels,
        };
        Ok(self.1.prepare(r).await?.into_inner().mounts)
    }

    async fn view(
        &mut self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, tonic::Status> {
        let r = grpc::ViewSnapshotRequest {
            snapshotter: self.0.clone(),
            key,
            parent,
            labels,
        };
        Ok(self.1.view(r).await?.into_inner().mounts)
    }

    async fn mounts(&mut self, key: String) -> Result<Vec<Mount>, tonic::Status> {
        let r = grpc::MountsRequest {
            snapshotter: self.0.clone(),
            key,
        };
        Ok(self.1.mounts(r).await?.into_inner().mounts)
    }

    async fn commit(
        &mut self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), tonic::Status> {
        let r = grpc::CommitSnapshotRequest {
            snapshotter: self.0.clone(),
            name,
            key,
            labels,
        };
        self.1.commit(r).await.map(|_| ())
    }

    async fn stat(&mut self, key: String) -> Result<Info, tonic::Status> {
        let r = grpc::StatSnapshotRequest {
            snapshotter: self.0.clone(),
            key,
        };
        let info = self.1.stat(r).await?.into_inner().info.unwrap_or_default();
        Ok(info.try_into().unwrap())
    }

    async fn remove(&mut self, key: String) -> Result<(), tonic::Status> {
        let r = grpc::RemoveSnapshotRequest {
            snapshotter: self.0.clone(),
            key,
        };
        self.1.remove(r).await.map(|_| ())
    }

    /// The snapshots List (containerd's Walk) shows, in the order sent.
    async fn list(&mut self, filters: Vec<String>) -> Result<Vec<Info>, tonic::Status> {
        let r = grpc::ListSnapshotsRequest {
            snapshotter: self.0.clone(),
            filters,
        };
        let mut stream = self.1.list(r).await?.into_inner();
        let mut infos = Vec::new();
        while let Some(batch) = stream.message().await? {
            for info in batch.info {
                infos.push(info.try_into().unwrap());
            }
        }
        Ok(infos)
    }
}

fn code(e: SnapshotterError) -> tonic::Code {
    tonic::Status::from(e).code()
}

/// Serves blobs from the fixture layout by digest, recording what was asked for.
#[derive(Default)]
struct FixtureRemote {
    asked: Mutex<Vec<(String, String, u64)>>,
    /// What `prefetch_metadata` was asked for: (url, digest, size, layer dir).
    prefetched: Mutex<Vec<(String, String, u64, PathBuf)>>,
}

impl RemoteSource for FixtureRemote {
    fn open(
        &self,
        url: &str,
        digest: &str,
        size: u64,
        _dir: Option<&Path>,
    ) -> Result<Arc<dyn ovbd_format::ReadAt>> {
        self.asked
            .lock()
            .unwrap()
            .push((url.to_owned(), digest.to_owned(), size));
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hello-world-oci/blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        Ok(Arc::new(ovbd_format::source::FileSource::open(&path)?))
    }

    fn prefetch_metadata(&self, url: &str, digest: &str, size: u64, dir: &Path) {
        self.prefetched.lock().unwrap().push((
            url.to_owned(),
            digest.to_owned(),
            size,
            dir.to_owned(),
        ));
    }
}

const HELLO_BLOB: &str = "sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d";

fn remote_labels(name: &str, image_ref_label: &str) -> HashMap<String, String> {
    remote_labels_of(name, HELLO_BLOB, image_ref_label)
}

fn remote_labels_of(name: &str, digest: &str, image_ref_label: &str) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_SNAPSHOT_REF.into(), name.into()),
        (LABEL_BLOB_DIGEST.into(), digest.into()),
        (LABEL_BLOB_SIZE.into(), "641024".into()),
        (
            image_ref_label.into(),
            "127.0.0.1:5000/hello-world:obd".into(),
        ),
    ])
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

/// Stands in for mounts and ublk: records what it is asked, fails as told.
#[derive(Default)]
struct FakeOps {
    mounted: Mutex<BTreeSet<PathBuf>>,
    /// While set, plain unmounts fail with EBUSY (a process still uses the filesystem).
    busy: std::sync::atomic::AtomicBool,
    /// How many stops are still to fail.
    failing_stops: std::sync::atomic::AtomicUsize,
    stopped: Mutex<Vec<u32>>,
    lazy_unmounts: Mutex<Vec<PathBuf>>,
    identities: Mutex<HashMap<u32, device::DeviceIdentity>>,
    deleted: Mutex<Vec<u32>>,
}

impl DeviceOps for Arc<FakeOps> {
    fn is_mounted(&self, mountpoint: &Path) -> bool {
        self.mounted.lock().unwrap().contains(mountpoint)
    }
    fn unmount(&self, mountpoint: &Path, lazy: bool) -> Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        if !lazy && self.busy.load(SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::EBUSY))
                .with_context(|| format!("umount {}", mountpoint.display()));
        }
        if lazy {
            self.lazy_unmounts
                .lock()
                .unwrap()
                .push(mountpoint.to_owned());
        }
        self.mounted.lock().unwrap().remove(mountpoint);
        Ok(())
    }
    fn stop(&self, dev: &mut AttachedDevice) -> Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let fail = self
            .failing_stops
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            bail!("stopping ublk device {}: injected failure", dev.id);
        }
        self.stopped.lock().unwrap().push(dev.id);
        Ok(())
    }
    fn identity(&self, id: u32) -> Result<Option<device::DeviceIdentity>> {
        Ok(self.identities.lock().unwrap().get(&id).copied())
    }
    fn delete(&self, id: u32) -> Result<()> {
        self.deleted.lock().unwrap().push(id);
        Ok(())
    }
}

fn fake_ops(s: &mut Snapshotter) -> Arc<FakeOps> {
    let ops = Arc::new(FakeOps::default());
    s.ops = Arc::new(ops.clone());
    ops
}

/// A dir-mode container snapshot's metadata and directories, as Prepare makes them.
fn dir_mode_snapshot(s: &Snapshotter, key: &str) -> Snapshot {
    s.meta
        .create(
            key,
            "",
            Kind::Active,
            BTreeMap::new(),
            |draft| -> SnapResult<Snapshot> {
                let dir = s.dir(draft.id);
                for d in ["fs", "work", "block"] {
                    std::fs::create_dir_all(dir.join(d))?;
                }
                let mut x = draft.clone();
                x.mode = Some(SnapshotMode::Dir);
                x.storage = Storage::Block;
                Ok(x)
            },
        )
        .unwrap()
}

/// A dir-mode container `key` whose (server-less) device `id` is attached and mounted.
fn with_writable_device(s: &Snapshotter, ops: &FakeOps, key: &str, id: u32) -> Snapshot {
    let snap = dir_mode_snapshot(s, key);
    std::fs::create_dir_all(s.dir(snap.id).join("block/mountpoint")).unwrap();
    let mountpoint = s.dir(snap.id).join("block/mountpoint");
    ops.mounted.lock().unwrap().insert(mountpoint);
    let dev = AttachedDevice::without_server(id);
    s.own_device(id, Some(dev.identity()));
    s.lock()
        .writable
        .insert(snap.id, Arc::new(Mutex::new(Some(dev))));
    snap
}

/// Ids of the devices the snapshotter holds.
fn held_devices(s: &Snapshotter) -> BTreeSet<u32> {
    let devs = s.lock();
    let shared = devs
        .shared
        .values()
        .filter_map(|d| lock_slot(d).as_ref().map(|d| d.dev.id));
    let writable = devs
        .writable
        .values()
        .filter_map(|d| lock_slot(d).as_ref().map(|d| d.id));
    shared.chain(writable).collect()
}

fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// The fixture's ZFile (the payload of its PAX tar), as containerd extracts it.
fn hello_zfile() -> Vec<u8> {
    let bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hello-world-oci/blobs/sha256")
            .join(&HELLO_BLOB[7..]),
    )
    .unwrap();
    bytes[1536..1536 + 639_491].to_vec()
}

/// A dir-mode container snapshot as Prepare makes it, its writable layer holding `data` at
/// 1 MiB (made directly: this host has no ublk for the device).
fn writable_snapshot(s: &Snapshotter, key: &str, data: &[u8]) -> Snapshot {
    let snap = dir_mode_snapshot(s, key);
    let bdir = s.dir(snap.id).join("block");
    let rw = RwLayer::create(
        &bdir.join("writable_data"),
        &bdir.join("writable_index"),
        64 << 20,
        RwMode::Append,
        None,
    )
    .unwrap();
    rw.write(data, 1 << 20).unwrap();
    rw.flush().unwrap();
    snap
}
