//! One ovbd socket registered under two names in containerd's config (`ovbd`, and `overlaybd`
//! for nerdctl on containerd 1.x): each name's snapshots are its own, as containerd's metadata
//! has them (a bucket per snapshotter name, with its own key sequence).

use super::*;
use crate::snapshotter::grpc_server;
use containerd_snapshots::api::snapshots::v1::{
    snapshots_client::SnapshotsClient, CommitSnapshotRequest, ListSnapshotsRequest,
    PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use tonic::transport::Channel;

/// The daemon's gRPC service on a loopback port, and a client of it.
async fn serve(s: Snapshotter) -> SnapshotsClient<Channel> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(grpc_server(Arc::new(s)))
            .serve_with_incoming(incoming),
    );
    SnapshotsClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// A containerd proxy plugin: every request carries its name.
struct Plugin<'a>(&'a str, SnapshotsClient<Channel>);

impl Plugin<'_> {
    async fn prepare(&mut self, key: &str, parent: &str) -> Result<(), tonic::Status> {
        let r = PrepareSnapshotRequest {
            snapshotter: self.0.into(),
            key: key.into(),
            parent: parent.into(),
            labels: HashMap::new(),
        };
        self.1.prepare(r).await.map(|_| ())
    }

    async fn commit(&mut self, name: &str, key: &str) -> Result<(), tonic::Status> {
        let r = CommitSnapshotRequest {
            snapshotter: self.0.into(),
            name: name.into(),
            key: key.into(),
            labels: HashMap::new(),
        };
        self.1.commit(r).await.map(|_| ())
    }

    async fn stat(&mut self, key: &str) -> Result<String, tonic::Status> {
        let r = StatSnapshotRequest {
            snapshotter: self.0.into(),
            key: key.into(),
        };
        let info = self.1.stat(r).await?.into_inner().info.unwrap_or_default();
        Ok(info.parent)
    }

    async fn remove(&mut self, key: &str) -> Result<(), tonic::Status> {
        let r = RemoveSnapshotRequest {
            snapshotter: self.0.into(),
            key: key.into(),
        };
        self.1.remove(r).await.map(|_| ())
    }

    /// Keys as List (containerd's Walk) shows them, children before parents.
    async fn list(&mut self) -> Vec<String> {
        let r = ListSnapshotsRequest {
            snapshotter: self.0.into(),
            filters: vec![],
        };
        let mut stream = self.1.list(r).await.unwrap().into_inner();
        let mut infos = Vec::new();
        while let Some(batch) = stream.message().await.unwrap() {
            infos.extend(batch.info);
        }
        // Leaves first, as containerd's GC removes them.
        infos.sort_by_key(|i| i.parent.is_empty());
        infos.into_iter().map(|i| i.name).collect()
    }
}

#[tokio::test]
async fn gc_under_one_name_keeps_the_snapshots_of_another() {
    let (_d, s) = snapshotter();
    let client = serve(s).await;
    let mut ovbd = Plugin("ovbd", client.clone());
    let mut other = Plugin("overlaybd", client);

    // A layer and a running container's rootfs on it, made under "ovbd".
    ovbd.prepare("default/1/extract", "").await.unwrap();
    ovbd.commit("default/2/layer", "default/1/extract")
        .await
        .unwrap();
    ovbd.prepare("default/3/ctr", "default/2/layer")
        .await
        .unwrap();

    // containerd's GC of "overlaybd", whose metadata holds none of them: it removes every
    // snapshot List shows under that name.
    let seen = other.list().await;
    for key in &seen {
        let _ = other.remove(key).await;
    }
    assert!(
        seen.is_empty(),
        "overlaybd lists ovbd's snapshots: {seen:?}"
    );
    assert_eq!(ovbd.stat("default/3/ctr").await.unwrap(), "default/2/layer");
    assert_eq!(ovbd.stat("default/2/layer").await.unwrap(), "");
    let mut listed = ovbd.list().await;
    listed.sort();
    assert_eq!(listed, ["default/2/layer", "default/3/ctr"]);

    // Key sequences are per name: the same key under the other name is another snapshot.
    other.prepare("default/1/extract", "").await.unwrap();
    other
        .commit("default/2/layer", "default/1/extract")
        .await
        .unwrap();
    assert_eq!(other.list().await, ["default/2/layer"]);
    assert_eq!(
        other.remove("default/3/ctr").await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    other.remove("default/2/layer").await.unwrap();
    assert_eq!(ovbd.stat("default/2/layer").await.unwrap(), "");
}
