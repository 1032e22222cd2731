//! An image: read-only lowers merged into one index at open, optionally under a writable upper.

use crate::error::{Error, Result};
use crate::index::{merge_layers_limited, Piece, SegmentIndex};
use crate::lsmt::{LsmtFile, Segment, HEADER_SIZE, MAX_RW_INDEX_SIZE, MAX_STACK_LAYERS, SECTOR};
use crate::rw::RwLayer;
use crate::source::{read_exact_at, read_exact_at_with, Blocking, ReadAt};
use std::fs::File;
use std::sync::Arc;

/// Where a run of the disk's bytes lies: what [`ImageStack::map_range`] answers.
#[derive(Clone, Copy, Debug)]
pub enum Extent<'a> {
    /// `len` bytes that read as zeros (a hole, a zeroed mapping, no layer below).
    Zeros { len: u64 },
    /// `len` bytes stored as they are at byte `offset` of `file`.
    File {
        file: &'a File,
        offset: u64,
        len: u64,
    },
}

impl Extent<'_> {
    pub fn len(&self) -> u64 {
        match *self {
            Extent::Zeros { len } | Extent::File { len, .. } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Appends `e` to `out`, merged into the last extent where it continues it (zeros after zeros,
/// the next bytes of the same file), so a reader moves each run in one call.
fn push_extent<'a>(out: &mut Vec<Extent<'a>>, e: Extent<'a>) {
    match (out.last_mut(), e) {
        (Some(Extent::Zeros { len }), Extent::Zeros { len: more }) => *len += more,
        (
            Some(Extent::File { file, offset, len }),
            Extent::File {
                file: next,
                offset: at,
                len: more,
            },
        ) if std::ptr::eq(*file, next) && *offset + *len == at => *len += more,
        _ => out.push(e),
    }
}

/// Read-only layers merged into one index (spec §1.8).
pub struct LayerStack {
    /// By tag: 0 = top.
    sources: Vec<Arc<dyn ReadAt>>,
    index: SegmentIndex,
    virtual_size: u64,
}

impl LayerStack {
    /// `lowers` bottom→top, as in `config.v1.json`.
    pub fn new(lowers: Vec<LsmtFile>) -> Result<LayerStack> {
        Self::with_limit(lowers, MAX_RW_INDEX_SIZE)
    }

    /// As [`new`](Self::new), with at most `max_entries` index entries: in the layers together
    /// (counted top down before anything is merged) and in the merged index (checked as each
    /// merge grows). Upstream bounds only the merged index; real images hold a tiny fraction
    /// of either (hello-world 515 entries, a 64 GiB ext4 base layer 8,323).
    pub fn with_limit(lowers: Vec<LsmtFile>, max_entries: u64) -> Result<LayerStack> {
        if lowers.len() > MAX_STACK_LAYERS {
            return Err(Error::InvalidArgument(format!(
                "{} layers: a stack holds at most {MAX_STACK_LAYERS}",
                lowers.len()
            )));
        }
        let n = lowers.len();
        // The trailer's index_size field: where a layer's entry count comes from.
        let count_field = |src: &Arc<dyn ReadAt>| src.size().saturating_sub(HEADER_SIZE) + 40;
        let mut total = 0u64;
        for (k, l) in lowers.iter().rev().enumerate() {
            total += l.segments.len() as u64;
            if total > max_entries {
                return Err(Error::corrupt(
                    l.source().name(),
                    count_field(l.source()),
                    format!(
                        "index of {} entries takes the stack's layers to {total} entries, past the limit of {max_entries} (layer {} of {n} from the top)",
                        l.segments.len(),
                        k + 1
                    ),
                ));
            }
        }
        let virtual_size = lowers
            .iter()
            .rev()
            .map(|l| l.virtual_size())
            .find(|&v| v != 0)
            .unwrap_or(0);
        let mut sources = Vec::with_capacity(lowers.len());
        let mut indexes = Vec::with_capacity(lowers.len());
        for l in lowers.into_iter().rev() {
            sources.push(l.source().clone());
            indexes.push(l.segments);
        }
        let limit = usize::try_from(max_entries).unwrap_or(usize::MAX);
        let merged = merge_layers_limited(indexes, limit).map_err(|tag| {
            let src = &sources[tag];
            Error::corrupt(
                src.name(),
                count_field(src),
                format!(
                    "merging this layer's index (layer {} of {n} from the top) under the ones above takes the merged index past the limit of {max_entries} entries",
                    tag + 1
                ),
            )
        })?;
        Ok(LayerStack {
            sources,
            index: SegmentIndex::new(merged),
            virtual_size,
        })
    }

    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    pub fn index(&self) -> &SegmentIndex {
        &self.index
    }

    pub fn layer_count(&self) -> usize {
        self.sources.len()
    }

    /// The source of the layer with `tag` (0 = top).
    pub fn source(&self, tag: u8) -> &Arc<dyn ReadAt> {
        &self.sources[tag as usize]
    }

    /// Reads `buf` at byte `offset`; both 512-aligned. Holes and zeroed ranges read as zeros.
    /// May block.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_with(buf, offset, Blocking::Allowed)
    }

    /// As [`read`](Self::read); with [`Blocking::Never`] every layer source is read with
    /// [`ReadAt::read_at_nowait`], and data not at hand fails with [`Error::WouldBlock`].
    pub fn read_with(&self, buf: &mut [u8], offset: u64, blocking: Blocking) -> Result<()> {
        if !offset.is_multiple_of(SECTOR) || !(buf.len() as u64).is_multiple_of(SECTOR) {
            return Err(Error::InvalidArgument(format!(
                "unaligned read: offset {offset} length {}",
                buf.len()
            )));
        }
        let start = offset / SECTOR;
        let end = start + buf.len() as u64 / SECTOR;
        let mut cur = start;
        for s in self.index.overlapping(start, end) {
            let s = s.slice(start, end);
            if s.offset > cur {
                zero(buf, start, cur, s.offset);
            }
            self.read_segment(sub(buf, start, s.offset, s.end()), &s, blocking)?;
            cur = s.end();
        }
        if cur < end {
            zero(buf, start, cur, end);
        }
        Ok(())
    }

    /// Appends to `out` where the bytes `[offset, offset + len)` (512-aligned) lie, in order;
    /// `Ok(false)` if some of them are not stored as-is in a local file (a compressed, cached
    /// or remote layer, or a mapping past its layer's end): read those with [`Self::read`].
    pub fn map_range<'a>(
        &'a self,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent<'a>>,
    ) -> Result<bool> {
        if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
            return Err(Error::InvalidArgument(format!(
                "unaligned mapping: offset {offset} length {len}"
            )));
        }
        let start = offset / SECTOR;
        let end = start + len / SECTOR;
        let mut cur = start;
        for s in self.index.overlapping(start, end) {
            let s = s.slice(start, end);
            if s.offset > cur {
                push_extent(
                    out,
                    Extent::Zeros {
                        len: (s.offset - cur) * SECTOR,
                    },
                );
            }
            let bytes = s.length as u64 * SECTOR;
            if s.zeroed {
                push_extent(out, Extent::Zeros { len: bytes });
            } else {
                let src = self.source(s.tag);
                let at = s.moffset * SECTOR;
                // Past the layer's end the copying read fails with a clear error: let it.
                let Some((file, base)) = src.local_file().filter(|_| at + bytes <= src.size())
                else {
                    return Ok(false);
                };
                push_extent(
                    out,
                    Extent::File {
                        file,
                        offset: base + at,
                        len: bytes,
                    },
                );
            }
            cur = s.end();
        }
        if cur < end {
            push_extent(
                out,
                Extent::Zeros {
                    len: (end - cur) * SECTOR,
                },
            );
        }
        Ok(true)
    }

    /// Brings the lowers' bytes of the disk's `ranges` (`(offset, len)`, 512-aligned) close at
    /// hand without reading them out ([`ReadAt::prefetch`]: into the block cache for a remote
    /// layer). Their bytes in each layer are prefetched in layer order, ones less than 64 KiB
    /// apart in one call (the bytes between too), so ranges apart on the disk but written one
    /// after the other (a file's extents) are one request where they come from.
    pub fn prefetch(&self, ranges: &[(u64, u64)]) -> Result<()> {
        // (tag, first sector in the layer, sectors)
        let mut runs: Vec<(u8, u64, u64)> = Vec::new();
        for &(offset, len) in ranges {
            let start = offset / SECTOR;
            let end = (offset.saturating_add(len) / SECTOR).min(self.virtual_size / SECTOR);
            for s in self.index.overlapping(start, end) {
                let s = s.slice(start, end);
                if !s.zeroed {
                    runs.push((s.tag, s.moffset, s.length as u64));
                }
            }
        }
        runs.sort_unstable();
        let mut merged: Vec<(u8, u64, u64)> = Vec::with_capacity(runs.len());
        for r in runs {
            match merged.last_mut() {
                Some((tag, at, n)) if *tag == r.0 && r.1 <= *at + *n + PREFETCH_GAP_SECTORS => {
                    *n = (*n).max(r.1 + r.2 - *at)
                }
                _ => merged.push(r),
            }
        }
        for (tag, at, n) in merged {
            let src = self.source(tag);
            src.prefetch(at * SECTOR, n * SECTOR)
                .map_err(|e| Error::io(src.name(), at * SECTOR, e))?;
        }
        Ok(())
    }

    fn read_segment(&self, buf: &mut [u8], s: &Segment, blocking: Blocking) -> Result<()> {
        if s.zeroed {
            buf.fill(0);
            return Ok(());
        }
        read_exact_at_with(&**self.source(s.tag), buf, s.moffset * SECTOR, blocking)
    }
}

fn sub(buf: &mut [u8], base: u64, s: u64, e: u64) -> &mut [u8] {
    &mut buf[((s - base) * SECTOR) as usize..((e - base) * SECTOR) as usize]
}

fn zero(buf: &mut [u8], base: u64, s: u64, e: u64) {
    sub(buf, base, s, e).fill(0);
}

/// [`LayerStack::prefetch`] fetches a layer's runs this close together as one (a request costs
/// more than the bytes between).
const PREFETCH_GAP_SECTORS: u64 = (64 << 10) / SECTOR;

/// Told of an [`ImageStack`]'s reads, to fetch ahead what their content says comes next (the
/// daemon's ext4-aware readahead). It sees the bytes the reader gets and may only prefetch the
/// lowers: what it does changes what is close at hand, never what a read returns.
pub trait ReadAdvisor: Send + Sync {
    /// Before a read of `[offset, offset + len)` that may wait.
    fn before_read(&self, lower: &LayerStack, offset: u64, len: u64);
    /// After a read returned `data` from `offset`.
    fn after_read(&self, data: &[u8], offset: u64);
}

/// What a block device serves: lowers, an optional writable upper, one virtual size.
pub struct ImageStack {
    lower: Option<LayerStack>,
    upper: Option<RwLayer>,
    virtual_size: u64,
    advisor: Option<Box<dyn ReadAdvisor>>,
}

impl ImageStack {
    /// A read-only image.
    pub fn read_only(lower: LayerStack) -> ImageStack {
        let virtual_size = lower.virtual_size();
        ImageStack {
            lower: Some(lower),
            upper: None,
            virtual_size,
            advisor: None,
        }
    }

    /// A writable image. An upper with virtual size 0 inherits the lowers' and has its headers
    /// rewritten, as upstream's `update_vsize` does.
    pub fn writable(lower: Option<LayerStack>, upper: RwLayer) -> Result<ImageStack> {
        let mut virtual_size = upper.virtual_size();
        if virtual_size == 0 {
            virtual_size = lower.as_ref().map(|l| l.virtual_size()).unwrap_or(0);
            if virtual_size == 0 {
                return Err(Error::InvalidArgument(
                    "writable layer and lowers all have virtual size 0".into(),
                ));
            }
            upper.set_virtual_size(virtual_size)?;
        }
        Ok(ImageStack {
            lower,
            upper: Some(upper),
            virtual_size,
            advisor: None,
        })
    }

    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    pub fn is_writable(&self) -> bool {
        self.upper.is_some()
    }

    pub fn lower(&self) -> Option<&LayerStack> {
        self.lower.as_ref()
    }

    pub fn upper(&self) -> Option<&RwLayer> {
        self.upper.as_ref()
    }

    /// Takes the writable layer out (to seal or commit it).
    pub fn into_upper(self) -> Option<RwLayer> {
        self.upper
    }

    /// Reads `buf` at byte `offset` (512-aligned, inside the disk). May block: on a device,
    /// a worker thread's read.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_with(buf, offset, Blocking::Allowed)
    }

    /// Reads only what is at hand without waiting (page cache, memory, block cache): `Ok(false)`
    /// if some of it would have to wait; the caller then reads again where blocking is fine
    /// (a device's queue thread hands the request to its worker pool).
    pub fn try_read(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        match self.read_with(buf, offset, Blocking::Never) {
            Ok(()) => Ok(true),
            Err(Error::WouldBlock) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// [`read`](Self::read) or [`try_read`](Self::try_read)'s read, as `blocking` says; the
    /// choice goes down to every layer source. With [`Blocking::Never`], data not at hand
    /// fails with [`Error::WouldBlock`].
    pub fn read_with(&self, buf: &mut [u8], offset: u64, blocking: Blocking) -> Result<()> {
        crate::lsmt::check_io(offset, buf.len() as u64, self.virtual_size)?;
        let Some(advisor) = &self.advisor else {
            return self.read_unadvised(buf, offset, blocking);
        };
        if let (Some(lower), Blocking::Allowed) = (&self.lower, blocking) {
            advisor.before_read(lower, offset, buf.len() as u64);
        }
        self.read_unadvised(buf, offset, blocking)?;
        advisor.after_read(buf, offset);
        Ok(())
    }

    /// Has `advisor` told of this image's reads from now on.
    pub fn set_advisor(&mut self, advisor: Box<dyn ReadAdvisor>) {
        self.advisor = Some(advisor);
    }

    fn read_unadvised(&self, buf: &mut [u8], offset: u64, blocking: Blocking) -> Result<()> {
        let Some(upper) = &self.upper else {
            return self.read_lower(buf, offset, blocking);
        };
        let start = offset / SECTOR;
        let mut pieces: Vec<Piece> = Vec::new();
        upper.resolve(start, start + buf.len() as u64 / SECTOR, &mut pieces);
        for p in pieces {
            let b = sub(buf, start, p.offset, p.offset + p.length);
            match p.seg {
                Some(s) if s.zeroed => b.fill(0),
                Some(s) => upper.read_mapped_with(b, &s, blocking)?,
                None => self.read_lower(b, p.offset * SECTOR, blocking)?,
            }
        }
        Ok(())
    }

    /// Where the bytes `[offset, offset + len)` (512-aligned, inside the disk) lie: appended to
    /// `out` in order, zeros and runs of local files, for a reader that moves them without
    /// copying (the FUSE frontend splices them). `Ok(false)` if some are not stored as-is in a
    /// local file (ZFile, cached or remote layers): read the range with [`Self::read`] then.
    /// A mapping only: data written after it returns may be elsewhere.
    pub fn map_range<'a>(
        &'a self,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent<'a>>,
    ) -> Result<bool> {
        crate::lsmt::check_io(offset, len, self.virtual_size)?;
        let Some(upper) = &self.upper else {
            return self.map_lower(offset, len, out);
        };
        let start = offset / SECTOR;
        let mut pieces: Vec<Piece> = Vec::new();
        upper.resolve(start, start + len / SECTOR, &mut pieces);
        for p in pieces {
            let bytes = p.length * SECTOR;
            match p.seg {
                Some(s) if s.zeroed => push_extent(out, Extent::Zeros { len: bytes }),
                Some(s) => push_extent(
                    out,
                    Extent::File {
                        file: upper.data_file(),
                        offset: s.moffset * SECTOR,
                        len: bytes,
                    },
                ),
                None => {
                    if !self.map_lower(p.offset * SECTOR, bytes, out)? {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }

    fn map_lower<'a>(&'a self, offset: u64, len: u64, out: &mut Vec<Extent<'a>>) -> Result<bool> {
        match &self.lower {
            Some(l) => l.map_range(offset, len, out),
            None => {
                push_extent(out, Extent::Zeros { len });
                Ok(true)
            }
        }
    }

    fn read_lower(&self, buf: &mut [u8], offset: u64, blocking: Blocking) -> Result<()> {
        match &self.lower {
            Some(l) => l.read_with(buf, offset, blocking),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn upper_or_err(&self) -> Result<&RwLayer> {
        self.upper
            .as_ref()
            .ok_or_else(|| Error::ReadOnly("image".into()))
    }

    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        crate::lsmt::check_io(offset, buf.len() as u64, self.virtual_size)?;
        self.upper_or_err()?.write(buf, offset)
    }

    /// DISCARD: the range may read as anything afterwards (zeros in append mode).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        crate::lsmt::check_io(offset, len, self.virtual_size)?;
        self.upper_or_err()?.discard(offset, len)
    }

    /// WRITE_ZEROES: the range must read as zeros afterwards.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        crate::lsmt::check_io(offset, len, self.virtual_size)?;
        let upper = self.upper_or_err()?;
        match upper.mode() {
            crate::rw::RwMode::Append => upper.discard(offset, len),
            crate::rw::RwMode::Sparse => {
                // A punched hole would expose lower data: write real zeros, in bounded chunks.
                let chunk = vec![0u8; (crate::lsmt::MAX_IO_SIZE as usize).min(len as usize)];
                let mut pos = offset;
                while pos < offset + len {
                    let n = ((offset + len - pos) as usize).min(chunk.len());
                    upper.write(&chunk[..n], pos)?;
                    pos += n as u64;
                }
                Ok(())
            }
        }
    }

    pub fn flush(&self) -> Result<()> {
        match &self.upper {
            Some(u) => u.flush(),
            None => Ok(()),
        }
    }
}

impl LayerStack {
    /// Writes the flattened disk to `out` as a sparse file: mapped data at its offset, holes
    /// where unmapped or zeroed.
    pub fn export_raw(&self, out: &std::fs::File, out_name: &str) -> Result<()> {
        use std::os::unix::fs::FileExt;
        out.set_len(0).map_err(|e| Error::io(out_name, 0, e))?;
        out.set_len(self.virtual_size)
            .map_err(|e| Error::io(out_name, 0, e))?;
        const CHUNK: u64 = 4 << 20;
        let mut buf = vec![0u8; CHUNK as usize];
        for s in self.index.segments().iter().filter(|s| !s.zeroed) {
            let mut done = 0u64;
            let len = s.length as u64 * SECTOR;
            while done < len {
                let n = (len - done).min(CHUNK) as usize;
                read_exact_at(
                    &**self.source(s.tag),
                    &mut buf[..n],
                    s.moffset * SECTOR + done,
                )?;
                let at = s.offset * SECTOR + done;
                if at + n as u64 > self.virtual_size {
                    return Err(Error::corrupt(
                        self.source(s.tag).name(),
                        s.moffset * SECTOR,
                        format!(
                            "mapping at sector {} lies beyond the virtual size {}",
                            s.offset, self.virtual_size
                        ),
                    ));
                }
                out.write_all_at(&buf[..n], at)
                    .map_err(|e| Error::io(out_name, at, e))?;
                done += n as u64;
            }
        }
        Ok(())
    }
}
