//! The gRPC adapter: containerd's Snapshots service over [`Snapshotter`]. Each request runs
//! (blocking) off the async threads against the snapshots of the name it carries
//! ([`Snapshotter::for_name`]); a failure goes back as its gRPC code ([`SnapshotterError::code`])
//! and is logged with the call and the snapshot key, since containerd often reports no more
//! than the code.

use super::error::{SnapResult, SnapshotterError};
use super::Snapshotter;
use crate::snapshotter::metadata::Kind;
use containerd_snapshots::api::snapshots::v1::{
    snapshots_server::{Snapshots, SnapshotsServer},
    *,
};
use containerd_snapshots::tonic::{self, Request, Response, Status};
use std::sync::Arc;

/// containerd's List answers come in batches of this many snapshots.
const LIST_BATCH: usize = 100;

pub struct Service(pub Arc<Snapshotter>);

/// The Snapshots gRPC service over `snap`, as the daemon serves it.
pub fn grpc_server(snap: Arc<Snapshotter>) -> SnapshotsServer<Service> {
    SnapshotsServer::new(Service(snap))
}

impl Service {
    /// Counts a snapshot of `kind` made under the daemon's rootfs mode.
    fn made(&self, kind: &str) {
        let mode = match self.0.rootfs_mode() {
            crate::config::RootfsMode::Overlayfs => "overlayfs",
            crate::config::RootfsMode::Dir => "dir",
            crate::config::RootfsMode::Dev => "dev",
        };
        crate::metrics::metrics().snapshot_made(kind, mode);
    }

    /// Runs `f` for call `method` on snapshot `key` (as the log names them) against the
    /// snapshots of snapshotter `name`.
    async fn call<T: Send + 'static>(
        &self,
        method: &'static str,
        name: &str,
        key: String,
        f: impl FnOnce(&Snapshotter) -> SnapResult<T> + Send + 'static,
    ) -> Result<T, Status> {
        // Another name's key is logged with it: the same key may exist under both.
        let key = if name.is_empty() || name == self.0.name() {
            key
        } else {
            format!("[{name}] {key}")
        };
        // Every line of the call, log:: ones included, carries these fields.
        let span = tracing::info_span!("grpc", method, key = %key, snapshotter = name);
        let s = self.0.for_name(name);
        let call_span = span.clone();
        let done = match s {
            Ok(s) => {
                match tokio::task::spawn_blocking(move || call_span.in_scope(|| f(&s))).await {
                    Ok(r) => r,
                    Err(e) => Err(SnapshotterError::Internal(anyhow::anyhow!(
                        "snapshotter task failed: {e}"
                    ))),
                }
            }
            Err(e) => Err(e),
        };
        let code = match &done {
            Ok(_) => tonic::Code::Ok,
            Err(e) => e.code(),
        };
        crate::metrics::metrics().grpc_call(method, code_name(code));
        done.map_err(|e| {
            span.in_scope(|| log_failure(method, &key, &e));
            e.into()
        })
    }
}

/// A gRPC code as metrics label it (its name in the gRPC spec, e.g. `NOT_FOUND`).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

fn log_failure(method: &str, key: &str, e: &SnapshotterError) {
    match e {
        // A lazy pull's answer, not a failure.
        SnapshotterError::RemoteLayerCommitted(_) => log::info!("{method} {key}: {e}"),
        // containerd's unpacker stats every layer to learn whether it exists: an answer too.
        SnapshotterError::NotFound(_) if method == "stat" => log::debug!("{method} {key}: {e}"),
        // What containerd gets back, with the code it gets (the span names method and key).
        _ => tracing::warn!(code = ?e.code(), error = %e, "{method} {key}: {:?}: {e}", e.code()),
    }
}

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        request: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        log::info!("prepare {} (parent {:?})", r.key, r.parent);
        let started = std::time::Instant::now();
        let (key, parent, labels) = (r.key.clone(), r.parent, r.labels);
        let what = r.key.clone();
        let mounts = self
            .call("prepare", &r.snapshotter, r.key, move |s| {
                s.create(&key, &parent, Kind::Active, labels)
            })
            .await?;
        log::debug!("prepare {what}: answered in {:?}", started.elapsed());
        self.made("active");
        Ok(Response::new(PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        log::info!("view {} (parent {:?})", r.key, r.parent);
        let (key, parent, labels) = (r.key.clone(), r.parent, r.labels);
        let mounts = self
            .call("view", &r.snapshotter, r.key, move |s| {
                s.create(&key, &parent, Kind::View, labels)
            })
            .await?;
        self.made("view");
        Ok(Response::new(ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<MountsRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let mounts = self
            .call("mounts", &r.snapshotter, r.key, move |s| s.mounts(&key))
            .await?;
        Ok(Response::new(MountsResponse { mounts }))
    }

    async fn commit(
        &self,
        request: Request<CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        log::info!("commit {} as {}", r.key, r.name);
        let what = format!("{} (as {})", r.key, r.name);
        let (name, key, labels) = (r.name, r.key, r.labels);
        self.call("commit", &r.snapshotter, what, move |s| {
            s.commit(&name, &key, labels)
        })
        .await?;
        self.made("committed");
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        log::info!("remove {}", r.key);
        let key = r.key.clone();
        self.call("remove", &r.snapshotter, r.key, move |s| s.remove(&key))
            .await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let info = self
            .call("stat", &r.snapshotter, r.key, move |s| s.stat(&key))
            .await?;
        Ok(Response::new(StatSnapshotResponse {
            info: Some(info.into()),
        }))
    }

    async fn update(
        &self,
        request: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info: containerd_snapshots::Info = r
            .info
            .ok_or_else(|| Status::invalid_argument("update: no snapshot info"))?
            .try_into()
            .map_err(|e| Status::invalid_argument(format!("update: {e}")))?;
        let paths = r.update_mask.map(|m| m.paths);
        let info = self
            .call("update", &r.snapshotter, info.name.clone(), move |s| {
                s.update(info, paths)
            })
            .await?;
        Ok(Response::new(UpdateSnapshotResponse {
            info: Some(info.into()),
        }))
    }

    type ListStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<ListSnapshotsResponse, Status>> + Send>,
    >;

    async fn list(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let what = format!("(filters {:?})", r.filters);
        let filters = r.filters;
        let infos = self
            .call("list", &r.snapshotter, what, move |s| s.list(&filters))
            .await?;
        let mut batches = Vec::new();
        let mut infos = infos.into_iter().map(Info::from).peekable();
        while infos.peek().is_some() {
            let info = infos.by_ref().take(LIST_BATCH).collect();
            batches.push(Ok(ListSnapshotsResponse { info }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<UsageRequest>,
    ) -> Result<Response<UsageResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        let u = self
            .call("usage", &r.snapshotter, r.key, move |s| s.usage(&key))
            .await?;
        Ok(Response::new(UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, request: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        // Orphans are found across every name: one pass serves them all.
        self.call("cleanup", &r.snapshotter, "(all snapshots)".into(), |s| {
            s.cleanup()
        })
        .await?;
        Ok(Response::new(()))
    }
}
