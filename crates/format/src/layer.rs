//! Opening a layer blob whatever its shape (spec §2.6): tar wrapper, then ZFile, then LSMT.

use crate::error::{Error, Result};
use crate::lsmt::{LsmtFile, MAGIC0 as LSMT_MAGIC0, MAGIC1 as LSMT_MAGIC1};
use crate::source::{read_exact_at, FileSource, ReadAt, SubSource};
use crate::tar::{detect, Wrapper, WrapperKind};
use crate::zfile::{ZFileHeader, ZFileReader, MAGIC0 as Z_MAGIC0, MAGIC1 as Z_MAGIC1};
use std::path::Path;
use std::sync::Arc;

/// What the first bytes of a file say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    ZFile,
    Lsmt,
}

/// Recognises a ZFile or LSMT by its first 24 bytes (the snapshotter's magic check).
pub fn sniff(b: &[u8]) -> Option<Sniffed> {
    if b.len() < 24 {
        return None;
    }
    if b[..8] == Z_MAGIC0 && b[8..24] == Z_MAGIC1 {
        Some(Sniffed::ZFile)
    } else if b[..8] == LSMT_MAGIC0 && b[8..24] == LSMT_MAGIC1 {
        Some(Sniffed::Lsmt)
    } else {
        None
    }
}

/// A layer blob opened down to its LSMT index.
pub struct OpenedLayer {
    pub wrapper: Wrapper,
    pub zfile: Option<Arc<ZFileReader>>,
    pub lsmt: LsmtFile,
}

impl OpenedLayer {
    /// The decompressed LSMT bytes.
    pub fn lsmt_source(&self) -> &Arc<dyn ReadAt> {
        self.lsmt.source()
    }
}

/// A blob with its tar wrapper and ZFile compression peeled off.
pub struct Unwrapped {
    pub wrapper: Wrapper,
    pub zfile: Option<Arc<ZFileReader>>,
    /// The raw LSMT bytes.
    pub lsmt: Arc<dyn ReadAt>,
}

/// Strips the tar wrapper and ZFile compression.
pub fn unwrap(src: Arc<dyn ReadAt>) -> Result<Unwrapped> {
    let wrapper = detect(&*src)?;
    let payload: Arc<dyn ReadAt> = if wrapper.kind == WrapperKind::None {
        src
    } else {
        Arc::new(SubSource::new(
            src,
            wrapper.payload_offset,
            wrapper.payload_size,
        ))
    };
    let mut head = [0u8; 512];
    let n = payload.size().min(512) as usize;
    read_exact_at(&*payload, &mut head[..n], 0)?;
    if ZFileHeader::is_zfile_header(&head[..n]) {
        let z = Arc::new(ZFileReader::open(payload)?);
        return Ok(Unwrapped {
            wrapper,
            zfile: Some(z.clone()),
            lsmt: z,
        });
    }
    if sniff(&head[..n]) == Some(Sniffed::Lsmt) {
        return Ok(Unwrapped {
            wrapper,
            zfile: None,
            lsmt: payload,
        });
    }
    Err(Error::corrupt(
        payload.name(),
        wrapper.payload_offset,
        "not an OverlayBD layer: no ZFile or LSMT magic",
    ))
}

/// Opens a layer blob from any source.
pub fn open_layer(src: Arc<dyn ReadAt>) -> Result<OpenedLayer> {
    let u = unwrap(src)?;
    let lsmt = LsmtFile::open(u.lsmt)?;
    Ok(OpenedLayer {
        wrapper: u.wrapper,
        zfile: u.zfile,
        lsmt,
    })
}

/// As [`open_layer`], with the decompressed LSMT file passed through `wrap` first (a
/// [`crate::trace::TraceRecorder`] records the reads at that level, as upstream's traces do).
pub fn open_layer_wrapped(
    src: Arc<dyn ReadAt>,
    wrap: impl FnOnce(Arc<dyn ReadAt>) -> Arc<dyn ReadAt>,
) -> Result<OpenedLayer> {
    let u = unwrap(src)?;
    let lsmt = LsmtFile::open(wrap(u.lsmt))?;
    Ok(OpenedLayer {
        wrapper: u.wrapper,
        zfile: u.zfile,
        lsmt,
    })
}

/// Opens a layer blob stored in a local file.
pub fn open_layer_file(path: &Path) -> Result<OpenedLayer> {
    open_layer(Arc::new(FileSource::open(path)?))
}

/// How a committed LSMT is packaged as a blob.
#[derive(Clone, Copy, Debug)]
pub struct BlobOptions {
    /// ZFile-compress (`-z`) with these options, or store the LSMT raw.
    pub zfile: Option<crate::zfile::ZFileOptions>,
    /// Wrap in the PAX tar (`-t`).
    pub tar: bool,
}

/// Writes `lsmt` as a layer blob to `out` (from its start), exactly as `overlaybd-commit -z -t`
/// lays it out. Returns the blob length.
pub fn write_blob(lsmt: &dyn ReadAt, out: &mut std::fs::File, opts: BlobOptions) -> Result<u64> {
    use std::io::{Seek, SeekFrom, Write};
    let oname = "blob output";
    let base = if opts.tar { 1536 } else { 0 };
    out.seek(SeekFrom::Start(base))
        .map_err(|e| Error::io(oname, base, e))?;
    let payload = match opts.zfile {
        Some(z) => crate::zfile::compress(lsmt, out, z)?,
        None => {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut *out);
            let mut buf = vec![0u8; 1 << 20];
            let mut pos = 0;
            while pos < lsmt.size() {
                let n = (lsmt.size() - pos).min(buf.len() as u64) as usize;
                read_exact_at(lsmt, &mut buf[..n], pos)?;
                w.write_all(&buf[..n])
                    .map_err(|e| Error::io(oname, base + pos, e))?;
                pos += n as u64;
            }
            w.flush().map_err(|e| Error::io(oname, base + pos, e))?;
            pos
        }
    };
    let mut total = base + payload;
    if opts.tar {
        let tail = vec![0u8; crate::tar::tail_len(payload) as usize];
        out.write_all(&tail)
            .map_err(|e| Error::io(oname, total, e))?;
        total += tail.len() as u64;
        out.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(oname, 0, e))?;
        out.write_all(&crate::tar::pax_prefix(payload, crate::tar::DEFAULT_MODE))
            .map_err(|e| Error::io(oname, 0, e))?;
    }
    out.set_len(total).map_err(|e| Error::io(oname, total, e))?;
    // Leave the position at the end, like any writer.
    out.seek(SeekFrom::Start(total))
        .map_err(|e| Error::io(oname, total, e))?;
    Ok(total)
}
