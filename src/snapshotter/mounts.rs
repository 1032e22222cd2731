//! The mount list of an active or view snapshot: a bind of its own directory, an overlay on
//! its parents (an image's shared device as the bottom lower), or its writable device.

use super::error::SnapResult;
use super::{split_chain, Snapshotter};
use crate::snapshotter::metadata::{Kind, Snapshot, SnapshotMode};
use containerd_snapshots::api::types::Mount;
use std::path::{Path, PathBuf};

fn mnt(kind: &str, source: &Path, options: Vec<String>) -> Mount {
    Mount {
        r#type: kind.into(),
        source: source.display().to_string(),
        target: String::new(),
        options,
    }
}

impl Snapshotter {
    /// The mounts of an active or view snapshot; attaches and mounts devices as needed
    /// (idempotent: a device already up is reused).
    pub(super) fn mounts_of(&self, s: &Snapshot, chain: &[Snapshot]) -> SnapResult<Vec<Mount>> {
        let dir = self.dir(s.id);
        let (normal, block) = split_chain(chain)?;
        match s.mode {
            Some(SnapshotMode::UnpackBind) => {
                return Ok(vec![mnt(
                    "bind",
                    &dir.join("fs"),
                    vec!["rw".into(), "rbind".into()],
                )]);
            }
            Some(SnapshotMode::Dir) => {
                let (_dev, mp) = self.ensure_writable(s, &block)?;
                return Ok(vec![mnt("bind", &mp, vec!["rw".into(), "rbind".into()])]);
            }
            Some(SnapshotMode::Dev) => {
                let (dev, _) = self.ensure_writable(s, &block)?;
                return Ok(vec![mnt(
                    "ext4",
                    Path::new(&dev),
                    vec!["rw".into(), "discard".into()],
                )]);
            }
            None => {}
        }
        let mut lowers: Vec<PathBuf> = normal.iter().map(|p| self.dir(p.id).join("fs")).collect();
        if let Some(top) = block.last() {
            lowers.push(self.ensure_shared(top, &block, s.id)?);
        }
        let ro = s.kind == Kind::View;
        if lowers.is_empty() {
            let opt = if ro { "ro" } else { "rw" };
            return Ok(vec![mnt(
                "bind",
                &dir.join("fs"),
                vec![opt.into(), "rbind".into()],
            )]);
        }
        if ro && lowers.len() == 1 {
            return Ok(vec![mnt(
                "bind",
                &lowers[0],
                vec!["ro".into(), "rbind".into()],
            )]);
        }
        let lowerdir = lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let mut options = Vec::new();
        if !ro {
            options.push(format!("workdir={}", dir.join("work").display()));
            options.push(format!("upperdir={}", dir.join("fs").display()));
        }
        options.push(format!("lowerdir={lowerdir}"));
        Ok(vec![mnt("overlay", Path::new("overlay"), options)])
    }
}
