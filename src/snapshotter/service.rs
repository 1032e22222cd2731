//! The gRPC adapter: containerd's Snapshots service over [`Snapshotter`]. Each call runs the
//! (blocking) operation off the async threads; a failure goes back as its gRPC code
//! ([`SnapshotterError::code`]) and is logged with the call and the snapshot key, since
//! containerd often reports no more than the code.

use super::error::{SnapResult, SnapshotterError};
use super::Snapshotter;
use crate::snapshotter::metadata::Kind;
use containerd_snapshots::api::snapshots::v1::snapshots_server::{Snapshots, SnapshotsServer};
use containerd_snapshots::{api::types::Mount, tonic, Info, Usage};
use std::collections::HashMap;
use std::sync::Arc;

pub struct Service(pub Arc<Snapshotter>);

/// The Snapshots gRPC service over `snap`, as the daemon serves it.
pub fn grpc_server(snap: Arc<Snapshotter>) -> SnapshotsServer<impl Snapshots> {
    containerd_snapshots::server(Arc::new(Service(snap)))
}

impl Service {
    /// Runs `f` for call `method` on snapshot `key` (as the log names them).
    async fn call<T: Send + 'static>(
        &self,
        method: &'static str,
        key: String,
        f: impl FnOnce(&Snapshotter) -> SnapResult<T> + Send + 'static,
    ) -> Result<T, tonic::Status> {
        let s = self.0.clone();
        let done = match tokio::task::spawn_blocking(move || f(&s)).await {
            Ok(r) => r,
            Err(e) => Err(SnapshotterError::Internal(anyhow::anyhow!(
                "snapshotter task failed: {e}"
            ))),
        };
        done.map_err(|e| {
            log_failure(method, &key, &e);
            e.into()
        })
    }
}

fn log_failure(method: &str, key: &str, e: &SnapshotterError) {
    match e {
        // A lazy pull's answer, not a failure.
        SnapshotterError::RemoteLayerCommitted(_) => log::info!("{method} {key}: {e}"),
        // containerd's unpacker stats every layer to learn whether it exists: an answer too.
        SnapshotterError::NotFound(_) if method == "stat" => log::debug!("{method} {key}: {e}"),
        _ => log::warn!("{method} {key}: {:?}: {e}", e.code()),
    }
}

#[tonic::async_trait]
impl containerd_snapshots::Snapshotter for Service {
    type Error = tonic::Status;

    async fn stat(&self, key: String) -> Result<Info, Self::Error> {
        self.call("stat", key.clone(), move |s| s.stat(&key)).await
    }

    async fn update(
        &self,
        info: Info,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<Info, Self::Error> {
        self.call("update", info.name.clone(), move |s| {
            s.update(info, fieldpaths)
        })
        .await
    }

    async fn usage(&self, key: String) -> Result<Usage, Self::Error> {
        self.call("usage", key.clone(), move |s| s.usage(&key))
            .await
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Self::Error> {
        self.call("mounts", key.clone(), move |s| s.mounts(&key))
            .await
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        log::info!("prepare {key} (parent {parent:?})");
        self.call("prepare", key.clone(), move |s| {
            s.create(&key, &parent, Kind::Active, labels)
        })
        .await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        log::info!("view {key} (parent {parent:?})");
        self.call("view", key.clone(), move |s| {
            s.create(&key, &parent, Kind::View, labels)
        })
        .await
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), Self::Error> {
        log::info!("commit {key} as {name}");
        self.call("commit", format!("{key} (as {name})"), move |s| {
            s.commit(&name, &key, labels)
        })
        .await
    }

    async fn remove(&self, key: String) -> Result<(), Self::Error> {
        log::info!("remove {key}");
        self.call("remove", key.clone(), move |s| s.remove(&key))
            .await
    }

    async fn clear(&self) -> Result<(), Self::Error> {
        self.call("cleanup", "(all snapshots)".into(), |s| s.cleanup())
            .await
    }

    type InfoStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<Info, tonic::Status>> + Send + 'static>,
    >;

    async fn list(
        &self,
        _snapshotter: String,
        filters: Vec<String>,
    ) -> Result<Self::InfoStream, Self::Error> {
        let what = format!("(filters {filters:?})");
        let infos = self.call("list", what, move |s| s.list(&filters)).await?;
        Ok(Box::pin(tokio_stream::iter(infos.into_iter().map(Ok))))
    }
}
