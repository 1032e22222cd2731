//! The gRPC adapter: containerd's Snapshots service over [`Snapshotter`].

use super::error::SnapResult;
use super::Snapshotter;
use crate::snapshotter::metadata::Kind;
use containerd_snapshots::{api::types::Mount, tonic, Info, Usage};
use std::collections::HashMap;
use std::sync::Arc;

/// The gRPC face: each call runs the (blocking) snapshotter operation off the async threads.
pub struct Service(pub Arc<Snapshotter>);

async fn blocking<T: Send + 'static>(
    s: &Arc<Snapshotter>,
    f: impl FnOnce(&Snapshotter) -> SnapResult<T> + Send + 'static,
) -> Result<T, tonic::Status> {
    let s = s.clone();
    match tokio::task::spawn_blocking(move || f(&s)).await {
        Ok(r) => r.map_err(|e| {
            log::debug!("{e}");
            e.into()
        }),
        Err(e) => Err(tonic::Status::internal(format!(
            "snapshotter task failed: {e}"
        ))),
    }
}

#[tonic::async_trait]
impl containerd_snapshots::Snapshotter for Service {
    type Error = tonic::Status;

    async fn stat(&self, key: String) -> Result<Info, Self::Error> {
        blocking(&self.0, move |s| s.stat(&key)).await
    }

    async fn update(
        &self,
        info: Info,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<Info, Self::Error> {
        blocking(&self.0, move |s| s.update(info, fieldpaths)).await
    }

    async fn usage(&self, key: String) -> Result<Usage, Self::Error> {
        blocking(&self.0, move |s| s.usage(&key)).await
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Self::Error> {
        blocking(&self.0, move |s| s.mounts(&key)).await
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        log::info!("prepare {key} (parent {parent:?})");
        blocking(&self.0, move |s| {
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
        blocking(&self.0, move |s| {
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
        blocking(&self.0, move |s| s.commit(&name, &key, labels)).await
    }

    async fn remove(&self, key: String) -> Result<(), Self::Error> {
        log::info!("remove {key}");
        blocking(&self.0, move |s| s.remove(&key)).await
    }

    async fn clear(&self) -> Result<(), Self::Error> {
        blocking(&self.0, |s| s.cleanup()).await
    }

    type InfoStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<Info, tonic::Status>> + Send + 'static>,
    >;

    async fn list(
        &self,
        _snapshotter: String,
        filters: Vec<String>,
    ) -> Result<Self::InfoStream, Self::Error> {
        let infos = blocking(&self.0, move |s| s.list(&filters)).await?;
        Ok(Box::pin(tokio_stream::iter(infos.into_iter().map(Ok))))
    }
}
