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
