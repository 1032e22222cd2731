//! The snapshotter's metadata: keys, parents, kinds, labels, ids, timestamps, in one redb file.
//! Every change is one transaction, so a crash never leaves a half-made snapshot behind;
//! directories made before a transaction that never committed are orphans `Cleanup` removes.

use crate::config::RootfsMode;
use redb::{Database, ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The snapshots of the snapshotter's own name; another name's are in `snapshots@<name>`.
const SNAPSHOTS: &str = "snapshots";
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

/// How a snapshot's content is stored (upstream's storage types, spec §4.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Storage {
    /// Plain OCI layer or container upper: a directory, served with overlayfs.
    #[default]
    Normal,
    /// An OverlayBD layer file in the snapshot's `fs/` (committed), or a writable block layer.
    Block,
}

/// How an active snapshot is served when not as an overlay of its parents (the default, stored
/// as no mode). Stored as the strings ovbd has always written: metadata.db files keep opening.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotMode {
    /// A writable block layer on the image, its ext4 mounted and bind-mounted.
    #[serde(rename = "dir")]
    Dir,
    /// As `Dir`, but the block device is handed out unmounted (for VMs).
    #[serde(rename = "dev")]
    Dev,
    /// A layer unpacked onto OverlayBD parents: a plain bind of its own `fs/`, no device for
    /// its parents (as upstream). A plain OCI layer unpacked so cannot hide (whiteout) files
    /// of the OverlayBD layers below it; upstream has the same limit.
    #[serde(rename = "unpack")]
    UnpackBind,
}

impl SnapshotMode {
    /// The mode of a container rootfs served as `m`; None for overlayfs.
    pub fn of_rootfs(m: RootfsMode) -> Option<SnapshotMode> {
        match m {
            RootfsMode::Overlayfs => None,
            RootfsMode::Dir => Some(SnapshotMode::Dir),
            RootfsMode::Dev => Some(SnapshotMode::Dev),
        }
    }

    /// Whether the snapshot has a writable block device of its own.
    pub fn has_writable_device(self) -> bool {
        matches!(self, SnapshotMode::Dir | SnapshotMode::Dev)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: u64,
    pub key: String,
    pub kind: Kind,
    /// Empty for none.
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    /// Nanoseconds since the epoch.
    pub created: u64,
    pub updated: u64,
    #[serde(default)]
    pub storage: Storage,
    /// How an active snapshot is served; None: an overlay of its parents (or committed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<SnapshotMode>,
    /// Disk usage recorded at commit (bytes, inodes).
    #[serde(default)]
    pub usage: (i64, i64),
    /// A remote layer prepared during a CRI PullImage of `[cri_proxy]`: the (registry,
    /// repository) whose pull secret its lazy reads use. ovbd's own record: no label sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cri_pull: Option<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("snapshot {0}: not found")]
    NotFound(String),
    #[error("snapshot {0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("metadata store: {0}")]
    Store(String),
}

macro_rules! store_err {
    ($($t:ty),*) => {$(
        impl From<$t> for MetaError {
            fn from(e: $t) -> Self {
                MetaError::Store(e.to_string())
            }
        }
    )*};
}
store_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);

pub type MetaResult<T> = Result<T, MetaError>;

pub fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The snapshots of one containerd snapshotter name (a table of the shared database; snapshot
/// ids come from one counter, so every name's snapshot directories live side by side).
#[derive(Clone)]
pub struct MetaStore {
    db: Arc<Database>,
    table: String,
}

/// The longest snapshotter name other than the daemon's own that gets snapshots of its own.
const MAX_NAME_LEN: usize = 128;

fn decode(bytes: &[u8]) -> MetaResult<Snapshot> {
    Ok(serde_json::from_slice(bytes)?)
}

/// The snapshot stored under `key`, or NotFound.
fn load(t: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> MetaResult<Snapshot> {
    match t.get(key)? {
        Some(v) => decode(v.value()),
        None => Err(MetaError::NotFound(key.to_string())),
    }
}

fn store(
    t: &mut redb::Table<&'static str, &'static [u8]>,
    key: &str,
    snap: &Snapshot,
) -> MetaResult<()> {
    t.insert(key, serde_json::to_vec(snap)?.as_slice())?;
    Ok(())
}

impl MetaStore {
    /// Opens the database at `path`; the store of the daemon's own name.
    pub fn open(path: &Path) -> MetaResult<MetaStore> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(TableDefinition::<&str, &[u8]>::new(SNAPSHOTS))?;
        tx.open_table(COUNTERS)?;
        tx.commit()?;
        Ok(MetaStore {
            db: Arc::new(db),
            table: SNAPSHOTS.into(),
        })
    }

    /// The store of another snapshotter name: its own table, made on its first write.
    pub fn of_name(&self, name: &str) -> MetaResult<MetaStore> {
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
            return Err(MetaError::InvalidArgument(format!(
                "snapshotter name {name:?}: not 1 to {MAX_NAME_LEN} printable characters"
            )));
        }
        Ok(MetaStore {
            db: self.db.clone(),
            table: format!("{SNAPSHOTS}@{name}"),
        })
    }

    /// The stores of every name that has snapshots (the daemon's own first).
    pub fn all_names(&self) -> MetaResult<Vec<MetaStore>> {
        self.all_names_in(&self.db.begin_read()?)
    }

    fn all_names_in(&self, tx: &redb::ReadTransaction) -> MetaResult<Vec<MetaStore>> {
        let mut tables: Vec<String> = tx
            .list_tables()?
            .map(|t| t.name().to_string())
            .filter(|n| n == SNAPSHOTS || n.starts_with(&format!("{SNAPSHOTS}@")))
            .collect();
        tables.sort_by_key(|n| n != SNAPSHOTS);
        Ok(tables
            .into_iter()
            .map(|table| MetaStore {
                db: self.db.clone(),
                table,
            })
            .collect())
    }

    fn def(&self) -> TableDefinition<'_, &'static str, &'static [u8]> {
        TableDefinition::new(&self.table)
    }

    /// This store's table in a read transaction; a name never written to has no table yet.
    fn read_table(
        &self,
        tx: &redb::ReadTransaction,
    ) -> MetaResult<Option<redb::ReadOnlyTable<&'static str, &'static [u8]>>> {
        match tx.open_table(self.def()) {
            Ok(t) => Ok(Some(t)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn get(&self, key: &str) -> MetaResult<Snapshot> {
        let tx = self.db.begin_read()?;
        match self.read_table(&tx)? {
            Some(t) => load(&t, key),
            None => Err(MetaError::NotFound(key.to_string())),
        }
    }

    pub fn list(&self) -> MetaResult<Vec<Snapshot>> {
        let tx = self.db.begin_read()?;
        let Some(t) = self.read_table(&tx)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode(v.value())?);
        }
        Ok(out)
    }

    /// Ids of every stored snapshot, of every name, and the next id to be given out, read
    /// together: a directory with a smaller id and no snapshot is an orphan; one with a larger
    /// id may belong to a create still in flight.
    pub fn ids(&self) -> MetaResult<(std::collections::BTreeSet<u64>, u64)> {
        let tx = self.db.begin_read()?;
        let mut ids = std::collections::BTreeSet::new();
        for store in self.all_names_in(&tx)? {
            let Some(t) = store.read_table(&tx)? else {
                continue;
            };
            for row in t.iter()? {
                let (_, v) = row?;
                ids.insert(decode(v.value())?.id);
            }
        }
        let c = tx.open_table(COUNTERS)?;
        let next = c.get("next_id")?.map(|v| v.value()).unwrap_or(1);
        Ok((ids, next))
    }

    /// The chain from `key`'s parent up to the root: nearest first.
    pub fn parents(&self, key: &str) -> MetaResult<Vec<Snapshot>> {
        let mut out = Vec::new();
        let mut cur = self.get(key)?.parent;
        while !cur.is_empty() {
            let s = self.get(&cur)?;
            cur = s.parent.clone();
            out.push(s);
            if out.len() > 4096 {
                return Err(MetaError::Store(format!("parent chain of {key} loops")));
            }
        }
        Ok(out)
    }

    /// Creates an active or view snapshot; `prepare` runs inside the transaction after the
    /// checks (it makes the directories), and the record is stored only if it succeeds.
    pub fn create<E>(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: BTreeMap<String, String>,
        prepare: impl FnOnce(&Snapshot) -> Result<Snapshot, E>,
    ) -> Result<Snapshot, E>
    where
        E: From<MetaError>,
    {
        if key.is_empty() {
            return Err(MetaError::InvalidArgument("empty snapshot key".into()).into());
        }
        let tx = self.db.begin_write().map_err(MetaError::from)?;
        let snap = {
            let mut t = tx.open_table(self.def()).map_err(MetaError::from)?;
            if t.get(key).map_err(MetaError::from)?.is_some() {
                return Err(MetaError::AlreadyExists(key.to_string()).into());
            }
            if !parent.is_empty() {
                let p = match t.get(parent).map_err(MetaError::from)? {
                    Some(v) => decode(v.value())?,
                    None => return Err(MetaError::NotFound(format!("parent {parent}")).into()),
                };
                if p.kind != Kind::Committed {
                    return Err(MetaError::FailedPrecondition(format!(
                        "parent {parent} is not committed"
                    ))
                    .into());
                }
            }
            let mut c = tx.open_table(COUNTERS).map_err(MetaError::from)?;
            let id = c
                .get("next_id")
                .map_err(MetaError::from)?
                .map(|v| v.value())
                .unwrap_or(1);
            c.insert("next_id", id + 1).map_err(MetaError::from)?;
            let now = now_nanos();
            let draft = Snapshot {
                id,
                key: key.to_string(),
                kind,
                parent: parent.to_string(),
                labels,
                created: now,
                updated: now,
                storage: Storage::Normal,
                mode: None,
                usage: (0, 0),
                cri_pull: None,
            };
            let snap = prepare(&draft)?;
            store(&mut t, key, &snap)?;
            snap
        };
        tx.commit().map_err(MetaError::from)?;
        Ok(snap)
    }

    /// Commits active snapshot `key` as `name`; `finish` may amend the new record (storage
    /// type, usage) before it is stored.
    pub fn commit<E>(
        &self,
        key: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        finish: impl FnOnce(&mut Snapshot) -> Result<(), E>,
    ) -> Result<Snapshot, E>
    where
        E: From<MetaError>,
    {
        let tx = self.db.begin_write().map_err(MetaError::from)?;
        let snap = {
            let mut t = tx.open_table(self.def()).map_err(MetaError::from)?;
            if t.get(name).map_err(MetaError::from)?.is_some() {
                return Err(MetaError::AlreadyExists(name.to_string()).into());
            }
            let active = load(&t, key)?;
            if active.kind != Kind::Active {
                return Err(MetaError::FailedPrecondition(format!(
                    "{key} is not an active snapshot"
                ))
                .into());
            }
            let mut snap = active.clone();
            snap.key = name.to_string();
            snap.kind = Kind::Committed;
            snap.labels.extend(labels);
            snap.updated = now_nanos();
            finish(&mut snap)?;
            t.remove(key).map_err(MetaError::from)?;
            store(&mut t, name, &snap)?;
            snap
        };
        tx.commit().map_err(MetaError::from)?;
        Ok(snap)
    }

    /// Removes `key` if nothing descends from it.
    pub fn remove(&self, key: &str) -> MetaResult<Snapshot> {
        let tx = self.db.begin_write()?;
        let snap = {
            let mut t = tx.open_table(self.def())?;
            let snap = load(&t, key)?;
            for row in t.iter()? {
                let (_, v) = row?;
                let s = decode(v.value())?;
                if s.parent == key {
                    return Err(MetaError::FailedPrecondition(format!(
                        "cannot remove {key}: snapshot {} depends on it",
                        s.key
                    )));
                }
            }
            t.remove(key)?;
            snap
        };
        tx.commit()?;
        Ok(snap)
    }

    /// Stores changed labels (and anything else `change` does) of an existing snapshot.
    pub fn update(&self, key: &str, change: impl FnOnce(&mut Snapshot)) -> MetaResult<Snapshot> {
        let tx = self.db.begin_write()?;
        let snap = {
            let mut t = tx.open_table(self.def())?;
            let mut snap = load(&t, key)?;
            change(&mut snap);
            snap.updated = now_nanos();
            store(&mut t, key, &snap)?;
            snap
        };
        tx.commit()?;
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, MetaStore) {
        let d = tempfile::tempdir().unwrap();
        let s = MetaStore::open(&d.path().join("metadata.db")).unwrap();
        (d, s)
    }

    fn ok(s: &Snapshot) -> Result<Snapshot, MetaError> {
        Ok(s.clone())
    }

    #[test]
    fn lifecycle_and_errors() {
        let (_d, m) = store();
        let a = m
            .create("a", "", Kind::Active, BTreeMap::new(), ok)
            .unwrap();
        assert!(matches!(
            m.create("a", "", Kind::Active, BTreeMap::new(), ok),
            Err(MetaError::AlreadyExists(_))
        ));
        assert!(matches!(
            m.create("b", "a", Kind::Active, BTreeMap::new(), ok),
            Err(MetaError::FailedPrecondition(_))
        ));
        assert!(matches!(
            m.create("b", "zz", Kind::Active, BTreeMap::new(), ok),
            Err(MetaError::NotFound(_))
        ));
        let c = m
            .commit("a", "A", BTreeMap::new(), |_| Ok::<(), MetaError>(()))
            .unwrap();
        assert_eq!((c.id, c.kind), (a.id, Kind::Committed));
        assert!(matches!(m.get("a"), Err(MetaError::NotFound(_))));
        let b = m
            .create("b", "A", Kind::Active, BTreeMap::new(), ok)
            .unwrap();
        assert_ne!(b.id, a.id);
        assert!(matches!(
            m.remove("A"),
            Err(MetaError::FailedPrecondition(_))
        ));
        assert_eq!(
            m.parents("b")
                .unwrap()
                .iter()
                .map(|s| s.key.as_str())
                .collect::<Vec<_>>(),
            vec!["A"]
        );
        m.remove("b").unwrap();
        m.remove("A").unwrap();
        assert!(m.list().unwrap().is_empty());
    }

    #[test]
    fn failed_prepare_stores_nothing_and_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("metadata.db");
        {
            let m = MetaStore::open(&path).unwrap();
            let r: Result<Snapshot, MetaError> =
                m.create("x", "", Kind::Active, BTreeMap::new(), |_| {
                    Err(MetaError::Store("mkdir failed".into()))
                });
            assert!(r.is_err());
            m.create(
                "y",
                "",
                Kind::View,
                BTreeMap::from([("k".into(), "v".into())]),
                ok,
            )
            .unwrap();
        }
        let m = MetaStore::open(&path).unwrap();
        assert!(matches!(m.get("x"), Err(MetaError::NotFound(_))));
        assert_eq!(m.get("y").unwrap().labels["k"], "v");
    }

    #[test]
    fn records_written_with_mode_strings_still_open() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("metadata.db");
        // Records as ovbd wrote them when the mode was a string, straight into the table.
        let old = |id: u64, key: &str, mode: &str| {
            format!(
                r#"{{"id":{id},"key":"{key}","kind":"Active","parent":"","labels":{{}},"created":1,"updated":2,"storage":"Block","mode":"{mode}","usage":[0,0]}}"#
            )
        };
        let records = [
            ("ctr-dir", old(1, "ctr-dir", "dir")),
            ("ctr-dev", old(2, "ctr-dev", "dev")),
            ("layer-unpack", old(3, "layer-unpack", "unpack")),
            (
                "ctr-overlay",
                r#"{"id":4,"key":"ctr-overlay","kind":"Active","parent":"","labels":{},"created":1,"updated":2}"#.to_string(),
            ),
        ];
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut t = tx
                    .open_table(TableDefinition::<&str, &[u8]>::new("snapshots"))
                    .unwrap();
                for (key, json) in &records {
                    t.insert(*key, json.as_bytes()).unwrap();
                }
            }
            tx.commit().unwrap();
        }
        let m = MetaStore::open(&path).unwrap();
        let mode = |key: &str| m.get(key).unwrap().mode;
        assert_eq!(mode("ctr-dir"), Some(SnapshotMode::Dir));
        assert_eq!(mode("ctr-dev"), Some(SnapshotMode::Dev));
        assert_eq!(mode("layer-unpack"), Some(SnapshotMode::UnpackBind));
        assert_eq!(mode("ctr-overlay"), None);
        assert_eq!(m.get("ctr-overlay").unwrap().storage, Storage::Normal);
        // Written back, a record keeps the same strings: an older ovbd still reads it.
        m.update("ctr-dir", |_| {}).unwrap();
        m.update("ctr-overlay", |_| {}).unwrap();
        drop(m);
        let db = Database::create(&path).unwrap();
        let tx = db.begin_read().unwrap();
        let t = tx
            .open_table(TableDefinition::<&str, &[u8]>::new("snapshots"))
            .unwrap();
        let raw = |key: &str| -> serde_json::Value {
            serde_json::from_slice(t.get(key).unwrap().unwrap().value()).unwrap()
        };
        assert_eq!(raw("ctr-dir")["mode"], "dir");
        assert!(raw("ctr-overlay").get("mode").is_none());
        for (mode, text) in [
            (SnapshotMode::Dir, "dir"),
            (SnapshotMode::Dev, "dev"),
            (SnapshotMode::UnpackBind, "unpack"),
        ] {
            assert_eq!(serde_json::to_value(mode).unwrap(), text);
        }
    }
}
