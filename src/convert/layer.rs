//! One layer of a conversion: a sparse RW layer over the layers converted so far, ext4 written
//! into it through libext2fs, then committed compact (upstream's `overlaybd-commit`) and
//! packaged as ZFile + PAX tar.

use super::apply::{Applier, ApplyStats};
use crate::extfs::{BlockDevice, ExtFs, MkfsParams};
use anyhow::{Context, Result};
use ovbd_format::commit::{commit_compact, CommitInfo};
use ovbd_format::layer::{write_blob, BlobOptions};
use ovbd_format::lsmt::LsmtFile;
use ovbd_format::source::FileSource;
use ovbd_format::zfile::ZFileOptions;
use ovbd_format::{ImageStack, LayerStack, ReadAt, RwLayer, RwMode};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The image stack as libext2fs's device. A write of what the stack already holds is dropped,
/// so rewriting unchanged metadata (bitmaps, descriptors, superblock copies) at every close
/// adds nothing to the new layer.
struct StackDevice {
    stack: ImageStack,
}

impl BlockDevice for StackDevice {
    fn size(&self) -> u64 {
        self.stack.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.stack.read(buf, offset).map_err(std::io::Error::other)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut cur = vec![0u8; buf.len()];
        self.stack
            .read(&mut cur, offset)
            .map_err(std::io::Error::other)?;
        if cur == buf {
            return Ok(());
        }
        self.stack.write(buf, offset).map_err(std::io::Error::other)
    }

    fn flush(&self) -> std::io::Result<()> {
        Ok(()) // the RW layer is sealed and committed, never served: no fsync needed
    }
}

pub struct LayerJob<'a> {
    /// Committed (uncompressed) LSMT files of the layers below, bottom first.
    pub lowers: &'a [PathBuf],
    /// Where this layer's files go.
    pub dir: &'a Path,
    /// Virtual size of the disk (only used for the bottom layer).
    pub vsize: u64,
    /// Identity written into the committed LSMT.
    pub uuid: String,
    pub parent_uuid: String,
    /// ext4 identity and time, for the bottom layer's mkfs; `now` dates what the tar does not.
    pub mkfs: MkfsParams,
    pub zfile: ZFileOptions,
}

pub struct LayerOutput {
    pub lsmt: PathBuf,
    pub blob: PathBuf,
    pub apply: ApplyStats,
}

/// Applies `tar` (uncompressed) as a new layer over `job.lowers`.
pub fn convert_layer(job: &LayerJob, tar: impl Read) -> Result<LayerOutput> {
    // Not create_dir_all: the parent is the conversion's scratch, which an interrupt removes.
    match std::fs::create_dir(job.dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(e).with_context(|| format!("create {}", job.dir.display()));
        }
        _ => {}
    }
    let lower = if job.lowers.is_empty() {
        None
    } else {
        let mut files = Vec::new();
        for p in job.lowers {
            let src: Arc<dyn ReadAt> = Arc::new(FileSource::open(p)?);
            files.push(LsmtFile::open(src).with_context(|| format!("open {}", p.display()))?);
        }
        Some(LayerStack::new(files)?)
    };
    let vsize = lower.as_ref().map_or(job.vsize, |l| l.virtual_size());
    let (data, index) = (
        job.dir.join("writable_data"),
        job.dir.join("writable_index"),
    );
    let upper = RwLayer::create(&data, &index, vsize, RwMode::Sparse, None)?;
    let dev = Arc::new(StackDevice {
        stack: ImageStack::writable(lower, upper)?,
    });
    let fs = if job.lowers.is_empty() {
        ExtFs::mkfs(dev.clone(), &job.mkfs)?
    } else {
        ExtFs::open(dev.clone(), job.mkfs.now)?
    };
    let stats = Applier::new(&fs, job.mkfs.now).apply(tar)?;
    fs.close()?;
    let dev = Arc::try_unwrap(dev)
        .map_err(|_| anyhow::anyhow!("the filesystem still holds the image after close"))?;
    let upper = dev
        .stack
        .into_upper()
        .context("the converted image has no writable layer")?;

    let lsmt = job.dir.join("overlaybd.commit");
    {
        let mut out = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(&lsmt).with_context(|| format!("create {}", lsmt.display()))?,
        );
        commit_compact(
            &upper.segments(),
            &*upper.data_source()?,
            &CommitInfo {
                virtual_size: vsize,
                uuid: job.uuid.clone(),
                parent_uuid: job.parent_uuid.clone(),
                user_tag: Vec::new(),
            },
            &mut out,
        )?;
        std::io::Write::flush(&mut out).with_context(|| format!("write {}", lsmt.display()))?;
    }
    drop(upper);
    std::fs::remove_file(&data).ok();
    std::fs::remove_file(&index).ok();

    let blob = job.dir.join("layer.tar");
    let src = FileSource::open(&lsmt)?;
    let mut out =
        std::fs::File::create(&blob).with_context(|| format!("create {}", blob.display()))?;
    write_blob(
        &src,
        &mut out,
        BlobOptions {
            zfile: Some(job.zfile),
            tar: true,
        },
    )?;
    Ok(LayerOutput {
        lsmt,
        blob,
        apply: stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;

    /// Bytes of real disk the files in `dir` take (st_blocks), not their apparent size.
    fn disk_usage(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.blocks() * 512)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Streams a tar and notes the scratch's disk usage at every read: the applier reads as it
    /// writes, so the largest value seen is the scratch's peak while the layer was applied.
    struct Probe<'a, R> {
        inner: R,
        dir: &'a Path,
        peak: &'a Cell<u64>,
    }

    impl<R: Read> Read for Probe<'_, R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.peak.set(self.peak.get().max(disk_usage(self.dir)));
            self.inner.read(buf)
        }
    }

    fn header(path: &str, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.set_path(path).unwrap();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn job<'a>(dir: &'a Path, vsize: u64) -> LayerJob<'a> {
        LayerJob {
            lowers: &[],
            dir,
            vsize,
            uuid: "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31".into(),
            parent_uuid: ovbd_format::lsmt::NIL_UUID.into(),
            mkfs: MkfsParams {
                uuid: [7; 16],
                now: 1_700_000_000,
            },
            zfile: ZFileOptions::default(),
        }
    }

    const TIB: u64 = 1 << 40;
    const ZEROS: u64 = 256 << 20;
    /// Far above the few KiB the layer's files hold, far below the 256 MiB file.
    const SMALL: u64 = 4 << 20;

    /// A 1 TiB virtual disk and a layer that compresses to almost nothing (a 256 MiB file of
    /// zeros, a short file): forced-init fallocate only marks blocks in ext4's metadata (it
    /// zeroes nothing without EXT2_FALLOCATE_ZERO_BLOCKS), zeros over holes are dropped before
    /// they reach the writable layer, and that layer is sparse, so the scratch stays small.
    #[test]
    fn huge_vsize_small_layer_keeps_scratch_small() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("layer");
        let peak = Cell::new(0);
        let hello = b"hello, world\n";
        let mut rest = header("hello", hello.len() as u64);
        rest.extend_from_slice(hello);
        // Pad the entry to 512 bytes, then the two empty blocks that end a tar.
        rest.resize(rest.len() + 512 - hello.len() + 1024, 0);
        let stream = std::io::Cursor::new(header("zeros", ZEROS))
            .chain(std::io::repeat(0).take(ZEROS))
            .chain(std::io::Cursor::new(rest));
        let probe = Probe {
            inner: stream,
            dir: &dir,
            peak: &peak,
        };
        let out = match convert_layer(&job(&dir, TIB), probe) {
            Ok(o) => o,
            Err(e) => panic!("{e:#}"),
        };
        assert_eq!(out.apply.entries, 2);
        let peak = peak.get();
        assert!(peak < SMALL, "the scratch took {peak} bytes while applying");
        // What the layer holds in the end is ext4's own metadata for a 1 TiB disk, about 1/30000 of
        // it (37 MB: mostly inode bitmaps, whose unused tail bits are set), nothing per file.
        let lsmt = std::fs::metadata(&out.lsmt).unwrap().blocks() * 512;
        assert!(lsmt < TIB / 16384, "committed layer: {lsmt} bytes");
        let blob = std::fs::metadata(&out.blob).unwrap().len();
        assert!(blob < SMALL, "blob: {blob} bytes");
        // The committed layer serves the 1 TiB disk.
        let l = LsmtFile::open(Arc::new(FileSource::open(&out.lsmt).unwrap())).unwrap();
        assert_eq!(l.virtual_size(), TIB);
    }

    /// A tar entry claiming 64 GiB of which only 1 MiB arrives: fallocate reserves the blocks
    /// in ext4 first, but nothing of them lands in the scratch before the short read fails.
    #[test]
    fn huge_claimed_file_fails_without_filling_scratch() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("layer");
        let peak = Cell::new(0);
        let stream = std::io::Cursor::new(header("huge", 64 << 30))
            .chain(std::io::repeat(0x5a).take(1 << 20));
        let probe = Probe {
            inner: stream,
            dir: &dir,
            peak: &peak,
        };
        let e = convert_layer(&job(&dir, TIB), probe)
            .err()
            .expect("a truncated tar converted");
        assert!(format!("{e:#}").contains("huge"), "{e:#}");
        // The 1 MiB that arrived, and a little metadata.
        let used = disk_usage(&dir).max(peak.get());
        assert!(used < SMALL, "the scratch took {used} bytes");
    }
}
