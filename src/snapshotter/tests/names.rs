//! One ovbd socket registered under two names in containerd's config (`ovbd`, and `overlaybd`
//! for nerdctl on containerd 1.x): each name's snapshots are its own, as containerd's metadata
//! has them (a bucket per snapshotter name, with its own key sequence).

use super::*;

impl Plugin {
    /// Keys as List shows them, children before parents (as containerd's GC removes them).
    async fn keys(&mut self) -> Vec<String> {
        let mut infos = self.list(vec![]).await.unwrap();
        infos.sort_by_key(|i| i.parent.is_empty());
        infos.into_iter().map(|i| i.name).collect()
    }

    async fn parent(&mut self, key: &str) -> Result<String, tonic::Status> {
        Ok(self.stat(key.into()).await?.parent)
    }
}

#[tokio::test]
async fn gc_under_one_name_keeps_the_snapshots_of_another() {
    let (_d, s) = snapshotter();
    let mut ovbd = serve_grpc(s, "ovbd").await;
    let mut other = ovbd.named("overlaybd");
    let none = HashMap::new;

    // A layer and a running container's rootfs on it, made under "ovbd".
    ovbd.prepare("default/1/extract".into(), "".into(), none())
        .await
        .unwrap();
    ovbd.commit("default/2/layer".into(), "default/1/extract".into(), none())
        .await
        .unwrap();
    ovbd.prepare("default/3/ctr".into(), "default/2/layer".into(), none())
        .await
        .unwrap();

    // containerd's GC of "overlaybd", whose metadata holds none of them: it removes every
    // snapshot List shows under that name.
    let seen = other.keys().await;
    for key in &seen {
        let _ = other.remove(key.clone()).await;
    }
    assert!(
        seen.is_empty(),
        "overlaybd lists ovbd's snapshots: {seen:?}"
    );
    assert_eq!(
        ovbd.parent("default/3/ctr").await.unwrap(),
        "default/2/layer"
    );
    assert_eq!(ovbd.parent("default/2/layer").await.unwrap(), "");
    let mut listed = ovbd.keys().await;
    listed.sort();
    assert_eq!(listed, ["default/2/layer", "default/3/ctr"]);

    // Key sequences are per name: the same key under the other name is another snapshot.
    other
        .prepare("default/1/extract".into(), "".into(), none())
        .await
        .unwrap();
    other
        .commit("default/2/layer".into(), "default/1/extract".into(), none())
        .await
        .unwrap();
    other
        .prepare("default/4/ctr".into(), "default/2/layer".into(), none())
        .await
        .unwrap();
    assert_eq!(other.keys().await, ["default/4/ctr", "default/2/layer"]);
    let err = other.remove("default/3/ctr".into()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Cleanup under either name keeps every name's directories.
    ovbd.1
        .cleanup(grpc::CleanupRequest {
            snapshotter: "ovbd".into(),
        })
        .await
        .unwrap();
    for (p, key) in [(&mut ovbd, "default/3/ctr"), (&mut other, "default/4/ctr")] {
        for m in p.mounts(key.into()).await.unwrap() {
            for dir in m.options.iter().filter_map(|o| o.split_once('=')) {
                for d in dir.1.split(':') {
                    assert!(Path::new(d).is_dir(), "{key}: {d} is gone");
                }
            }
        }
    }

    other.remove("default/4/ctr".into()).await.unwrap();
    other.remove("default/2/layer".into()).await.unwrap();
    assert_eq!(ovbd.parent("default/2/layer").await.unwrap(), "");
    assert_eq!(
        ovbd.parent("default/3/ctr").await.unwrap(),
        "default/2/layer"
    );
}

#[tokio::test]
async fn the_daemons_own_name_and_no_name_share_the_snapshots_earlier_versions_made() {
    let d = tempfile::tempdir().unwrap();
    let cfg = Config {
        root: d.path().join("root"),
        name: "overlaybd".into(),
        ..Config::default()
    };
    // Made by a direct client (no name), as the store of an earlier version holds it.
    let s = Snapshotter::open(cfg.clone()).unwrap();
    s.create("k", "", Kind::Active, HashMap::new()).unwrap();
    drop(s);
    let s = Snapshotter::open(cfg).unwrap();
    s.reconcile().unwrap();
    let mut own = serve_grpc(s, "overlaybd").await;
    assert_eq!(own.keys().await, ["k"]);
    assert!(own.named("").stat("k".into()).await.is_ok());
    assert!(own.named("ovbd").keys().await.is_empty());
    // A name that cannot be one: refused, not stored.
    let err = own.named("a\nb").stat("k".into()).await.unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::InvalidArgument,
        "{}",
        err.message()
    );
}
