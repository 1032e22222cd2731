//! A snapshot's directory on disk: the OverlayBD layer file it holds, a writable layer sealed
//! for Commit, its usage, its removal.

use super::error::SnapResult;
use crate::mount;
use anyhow::{Context, Result};
use ovbd_format::layer::sniff;
use ovbd_format::{FileSource, RwLayer};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A dir/dev snapshot's writable layer sealed for Commit (`fs/overlaybd.sealed`, a hard link
/// to `block/writable_data`); until the metadata commit succeeds it can be undone.
pub(super) struct SealedUpper {
    data: PathBuf,
    index: PathBuf,
    sealed: PathBuf,
    /// The data file's length before sealing: sealing only appends the index and a trailer.
    len: u64,
}

impl SealedUpper {
    pub(super) fn seal(dir: &Path) -> SnapResult<SealedUpper> {
        let bdir = dir.join("block");
        let data = bdir.join("writable_data");
        let len = std::fs::metadata(&data)
            .with_context(|| format!("writable layer {}", data.display()))?
            .len();
        let u = SealedUpper {
            index: bdir.join("writable_index"),
            sealed: dir.join("fs/overlaybd.sealed"),
            data,
            len,
        };
        let done = (|| -> SnapResult<()> {
            // A link left by an attempt that stopped before its metadata commit.
            remove_if_present(&u.sealed)?;
            RwLayer::open(&u.data, &u.index)?.seal()?;
            std::fs::hard_link(&u.data, &u.sealed).with_context(|| {
                format!("linking {} to {}", u.sealed.display(), u.data.display())
            })?;
            Ok(())
        })();
        match done {
            Ok(()) => Ok(u),
            Err(e) => {
                if let Err(undo) = u.undo() {
                    log::error!("undoing the seal of {}: {undo:#}", u.data.display());
                }
                Err(e)
            }
        }
    }

    /// Back to a writable layer: the link goes, the data file is cut back to its old length.
    pub(super) fn undo(&self) -> Result<()> {
        remove_if_present(&self.sealed)?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.data)
            .with_context(|| format!("opening {}", self.data.display()))?;
        f.set_len(self.len)
            .and_then(|()| f.sync_data())
            .with_context(|| format!("truncating {} to {}", self.data.display(), self.len))
    }

    /// The commit is stored: the writable layer's own names go.
    pub(super) fn finish(self) {
        for p in [&self.data, &self.index] {
            if let Err(e) = remove_if_present(p) {
                log::warn!("{e:#}");
            }
        }
    }
}

fn remove_if_present(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", p.display()))
        }
        _ => Ok(()),
    }
}

/// The OverlayBD layer file a layer directory holds, if any (checked by magic, as upstream).
/// Only a regular file counts: a symlink may point anywhere on the node, a FIFO would block.
pub(super) fn block_layer_file(fs: &Path) -> Option<&'static str> {
    ["overlaybd.commit", "overlaybd.sealed"]
        .into_iter()
        .find(|n| {
            let mut head = [0u8; 24];
            FileSource::open(fs.join(n))
                .and_then(|f| ovbd_format::source::read_exact_at(&f, &mut head, 0))
                .is_ok()
                && sniff(&head).is_some()
        })
}

/// Unmounts anything under `dir` (deepest first), then removes it.
pub(super) fn remove_snapshot_dir(dir: &Path) -> Result<()> {
    let prefix = format!("{}/", dir.display());
    let mut under: Vec<String> = mount::mounts()
        .into_iter()
        .map(|(mp, _)| mp)
        .filter(|mp| mp.starts_with(&prefix))
        .collect();
    under.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mp in under {
        mount::unmount(Path::new(&mp), true)?;
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// Bytes (allocated) and inodes under `dir`, not crossing into mounts.
pub(super) fn disk_usage(dir: &Path) -> Result<(i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut size = 0i64;
    let mut inodes = 0i64;
    let mut seen = BTreeSet::new();
    let root_dev = std::fs::symlink_metadata(dir).map(|m| m.dev()).unwrap_or(0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.dev() != root_dev || !seen.insert(md.ino()) {
            continue;
        }
        inodes += 1;
        size += (md.blocks() * 512) as i64;
        if md.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    Ok((size, inodes))
}

/// overlayfs' magic number in statfs' `f_type`.
const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;

/// Fails, naming `root` and why, if overlayfs cannot put upper directories under `root` (as
/// containerd's overlay snapshotter checks at init): a root on overlayfs, or on a filesystem
/// where a test overlay mount fails. Without the check every container start fails later with
/// a bare EINVAL from mount(2).
pub(super) fn check_overlay_upper(root: &Path) -> Result<()> {
    let refuse = |why: String| {
        anyhow::anyhow!(
            "root {} cannot hold overlayfs upper directories: {why}",
            root.display()
        )
    };
    let c = std::ffi::CString::new(root.as_os_str().as_encoded_bytes())
        .map_err(|_| refuse("its path contains NUL".into()))?;
    // SAFETY: a valid path and a zeroed statfs for the kernel to fill.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(refuse(format!(
            "statfs: {}",
            std::io::Error::last_os_error()
        )));
    }
    if st.f_type as i64 == OVERLAYFS_SUPER_MAGIC {
        return Err(refuse(
            "it is on overlayfs (put it on ext4, xfs or tmpfs)".into(),
        ));
    }
    // A tiny overlay with two lowers, as containerd's check mounts (a random name: a crashed
    // check's leftover is harmless, outside snapshots/).
    let dir = tempfile::Builder::new()
        .prefix(".overlay-check-")
        .tempdir_in(root)
        .map_err(|e| refuse(format!("creating a test directory: {e}")))?;
    for d in ["lower1", "lower2", "upper", "work", "merged"] {
        std::fs::create_dir(dir.path().join(d))
            .map_err(|e| refuse(format!("creating a test directory: {e}")))?;
    }
    let p = |d: &str| dir.path().join(d).display().to_string();
    let merged = dir.path().join("merged");
    let data = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        p("lower2"),
        p("lower1"),
        p("upper"),
        p("work")
    );
    match mount::mount("overlay", &merged, "overlay", 0, &data) {
        Ok(()) => {
            if mount::unmount(&merged, false).is_err() {
                mount::unmount(&merged, true)
                    .map_err(|e| refuse(format!("unmounting the test overlay: {e:#}")))?;
            }
            Ok(())
        }
        Err(e) => match e
            .downcast_ref::<std::io::Error>()
            .and_then(|e| e.raw_os_error())
        {
            // Unprivileged (a test run as a user): nothing can be mounted, so nothing is known.
            Some(libc::EPERM) => {
                log::debug!(
                    "not privileged to test-mount overlayfs under {}",
                    root.display()
                );
                Ok(())
            }
            _ => Err(refuse(format!(
                "a test overlay mount under it failed: {e:#}"
            ))),
        },
    }
}
