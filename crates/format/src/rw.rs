//! Writable LSMT layers (spec §1.6–1.7): append mode (data + index files, replayed later-wins)
//! and sparse mode (in-place writes, index rebuilt from the file's extents).

use crate::error::{Error, Result};
use crate::index::{resolve, Piece};
use crate::lsmt::{
    LsmtHeader, Segment, FLAG_DATA, FLAG_HEADER, FLAG_SEALED, FLAG_SPARSE, HEADER_SECTORS,
    HEADER_SIZE, MAX_IO_SIZE, MAX_RW_INDEX_SIZE, MAX_SEGMENT_LEN, SECTOR,
};
use crate::source::{read_exact_at, Blocking, FileSource, ReadAt};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RwMode {
    /// Every write appended to the data file, one index entry per write.
    Append,
    /// Writes in place at 4096 + offset; the index is the file's allocated extents.
    Sparse,
}

/// Sorted, non-overlapping map of a writable layer; a new mapping cuts what it overlaps.
#[derive(Clone, Debug, Default)]
pub struct RwIndex {
    map: BTreeMap<u64, Segment>,
}

impl RwIndex {
    pub fn insert(&mut self, seg: Segment) {
        self.remove_range(seg.offset, seg.end());
        self.map.insert(seg.offset, seg);
    }

    /// Unmaps `[start, end)`, cutting mappings at its edges.
    pub fn remove_range(&mut self, start: u64, end: u64) {
        if let Some((&k, &s)) = self.map.range(..start).next_back() {
            if s.end() > start {
                self.map.insert(k, s.slice(s.offset, start));
                if s.end() > end {
                    self.map.insert(end, s.slice(end, s.end()));
                }
            }
        }
        let inside: Vec<u64> = self.map.range(start..end).map(|(k, _)| *k).collect();
        for k in inside {
            if let Some(s) = self.map.remove(&k) {
                if s.end() > end {
                    self.map.insert(end, s.slice(end, s.end()));
                }
            }
        }
    }

    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = Segment> + '_ {
        let before = self
            .map
            .range(..start)
            .next_back()
            .map(|(_, s)| *s)
            .filter(|s| s.end() > start);
        before
            .into_iter()
            .chain(self.map.range(start..end).map(|(_, s)| *s))
    }

    pub fn segments(&self) -> Vec<Segment> {
        self.map.values().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

struct RwState {
    index: RwIndex,
    /// Append mode: end of the data file in sectors (where the next write goes).
    data_end: u64,
    /// Append mode: end of the index file in bytes.
    index_end: u64,
    header: LsmtHeader,
}

/// A writable layer. All methods take `&self`; one lock orders writes and index updates.
pub struct RwLayer {
    mode: RwMode,
    data: File,
    index: File,
    data_name: String,
    index_name: String,
    data_path: PathBuf,
    state: Mutex<RwState>,
    /// Disk the data file may take, in bytes ([`RwLayer::limit_data`]).
    data_limit: Option<u64>,
}

fn open_rw(path: &Path, create: bool) -> Result<File> {
    let name = path.display().to_string();
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if create {
        o.create_new(true);
    }
    o.open(path).map_err(|e| Error::io(&name, 0, e))
}

impl RwLayer {
    /// Creates a new layer (`overlaybd-create`). `virtual_size` may be 0 when stacked on lowers
    /// (it is then taken from them).
    pub fn create(
        data_path: &Path,
        index_path: &Path,
        virtual_size: u64,
        mode: RwMode,
        parent_uuid: Option<&str>,
    ) -> Result<RwLayer> {
        let data = open_rw(data_path, true)?;
        let index = open_rw(index_path, true)?;
        let uuid = crate::lsmt::random_uuid();
        let parent = parent_uuid.unwrap_or(crate::lsmt::NIL_UUID);
        let dflags = FLAG_HEADER
            | FLAG_DATA
            | if mode == RwMode::Sparse {
                FLAG_SPARSE
            } else {
                0
            };
        let dheader = LsmtHeader::new(dflags, virtual_size, &uuid, parent);
        let mut iheader = LsmtHeader::new(FLAG_HEADER, virtual_size, &uuid, parent);
        iheader.index_offset = HEADER_SIZE;
        let dname = data_path.display().to_string();
        let iname = index_path.display().to_string();
        data.write_all_at(&dheader.encode(), 0)
            .map_err(|e| Error::io(&dname, 0, e))?;
        index
            .write_all_at(&iheader.encode(), 0)
            .map_err(|e| Error::io(&iname, 0, e))?;
        if mode == RwMode::Sparse {
            data.set_len(HEADER_SIZE + virtual_size)
                .map_err(|e| Error::io(&dname, 0, e))?;
        }
        Ok(RwLayer {
            mode,
            data,
            index,
            data_name: dname,
            index_name: iname,
            data_path: data_path.to_path_buf(),
            data_limit: None,
            state: Mutex::new(RwState {
                index: RwIndex::default(),
                data_end: HEADER_SECTORS,
                index_end: HEADER_SIZE,
                header: dheader,
            }),
        })
    }

    /// Opens an existing layer and rebuilds its index.
    pub fn open(data_path: &Path, index_path: &Path) -> Result<RwLayer> {
        let data = open_rw(data_path, false)?;
        let index = open_rw(index_path, false)?;
        let dname = data_path.display().to_string();
        let iname = index_path.display().to_string();
        let mut hb = vec![0u8; HEADER_SIZE as usize];
        read_exact_at(
            &FileSource::from_file(
                data.try_clone().map_err(|e| Error::io(&dname, 0, e))?,
                dname.clone(),
            )?,
            &mut hb,
            0,
        )?;
        let dheader = LsmtHeader::decode(&hb, &dname, 0)?;
        if !dheader.is_header() || !dheader.is_data_file() {
            return Err(Error::corrupt(
                &dname,
                28,
                format!("flags {:#x}: not an RW data file", dheader.flags),
            ));
        }
        if dheader.is_sealed() {
            return Err(Error::corrupt(&dname, 28, "RW data file is already sealed"));
        }
        // Index entries address 50-bit sectors; a larger disk cannot be mapped (and would
        // overflow the sparse scan's end and the seal's index position).
        if dheader.virtual_size > crate::lsmt::MAX_OFFSET * SECTOR {
            return Err(Error::corrupt(
                &dname,
                48,
                format!(
                    "virtual size {} is beyond what an LSMT index can address",
                    dheader.virtual_size
                ),
            ));
        }
        let dsize = data.metadata().map_err(|e| Error::io(&dname, 0, e))?.len();
        let mode = if dheader.is_sparse() {
            RwMode::Sparse
        } else {
            RwMode::Append
        };
        let isrc = FileSource::from_file(
            index.try_clone().map_err(|e| Error::io(&iname, 0, e))?,
            iname.clone(),
        )?;
        read_exact_at(&isrc, &mut hb, 0)?;
        let iheader = LsmtHeader::decode(&hb, &iname, 0)?;
        if !iheader.is_header()
            || iheader.is_data_file()
            || iheader.is_sealed()
            || iheader.index_offset != HEADER_SIZE
        {
            return Err(Error::corrupt(
                &iname,
                28,
                format!(
                    "flags {:#x} / index offset {}: not an RW index file",
                    iheader.flags, iheader.index_offset
                ),
            ));
        }
        let (rwindex, data_end, index_end) = match mode {
            RwMode::Append => {
                if dsize % SECTOR != 0 {
                    return Err(Error::corrupt(
                        &dname,
                        dsize,
                        "data file size is not a multiple of 512",
                    ));
                }
                let (idx, end) = replay_index(&isrc, dsize / SECTOR)?;
                (idx, dsize / SECTOR, end)
            }
            RwMode::Sparse => (
                scan_sparse(&data, &dname, dheader.virtual_size)?,
                0,
                HEADER_SIZE,
            ),
        };
        Ok(RwLayer {
            mode,
            data,
            index,
            data_name: dname,
            index_name: iname,
            data_path: data_path.to_path_buf(),
            data_limit: None,
            state: Mutex::new(RwState {
                index: rwindex,
                data_end,
                index_end,
                header: dheader,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, RwState> {
        // A panic while holding the lock cannot leave the map half-updated in a way reads care
        // about, so recover the guard rather than propagate poison.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn mode(&self) -> RwMode {
        self.mode
    }

    pub fn virtual_size(&self) -> u64 {
        self.lock().header.virtual_size
    }

    pub fn uuid(&self) -> String {
        self.lock().header.uuid.clone()
    }

    pub fn parent_uuid(&self) -> String {
        self.lock().header.parent_uuid.clone()
    }

    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    /// Rewrites both headers with a new virtual size (a vsize-0 upper inherits its lowers').
    pub fn set_virtual_size(&self, vsize: u64) -> Result<()> {
        let mut st = self.lock();
        st.header.virtual_size = vsize;
        self.data
            .write_all_at(&st.header.encode(), 0)
            .map_err(|e| Error::io(&self.data_name, 0, e))?;
        let mut ih = st.header.clone();
        ih.flags = FLAG_HEADER;
        ih.index_offset = HEADER_SIZE;
        self.index
            .write_all_at(&ih.encode(), 0)
            .map_err(|e| Error::io(&self.index_name, 0, e))?;
        if self.mode == RwMode::Sparse {
            let len = self
                .data
                .metadata()
                .map_err(|e| Error::io(&self.data_name, 0, e))?
                .len();
            if len < HEADER_SIZE + vsize {
                self.data
                    .set_len(HEADER_SIZE + vsize)
                    .map_err(|e| Error::io(&self.data_name, 0, e))?;
            }
        }
        Ok(())
    }

    /// Sorted snapshot of the current mappings.
    pub fn segments(&self) -> Vec<Segment> {
        self.lock().index.segments()
    }

    /// From now on, a write that could take the data file past `bytes` of disk (blocks
    /// allocated, with the write counted whole) fails with [`Error::Full`] (ENOSPC): a scratch
    /// layer a command of someone else's writes to.
    pub fn limit_data(&mut self, bytes: u64) {
        self.data_limit = Some(bytes);
    }

    /// Writes `buf` at byte `offset` (512-aligned).
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut st = self.lock();
        crate::lsmt::check_io(offset, buf.len() as u64, st.header.virtual_size)?;
        if let Some(limit) = self.data_limit {
            let used = self
                .data
                .metadata()
                .map_err(|e| Error::io(&self.data_name, 0, e))?
                .blocks()
                * 512;
            if used.saturating_add(buf.len() as u64) > limit {
                return Err(Error::Full {
                    file: self.data_name.clone(),
                    limit,
                });
            }
        }
        for (i, chunk) in buf.chunks(MAX_IO_SIZE as usize).enumerate() {
            let off = offset + i as u64 * MAX_IO_SIZE;
            let sectors = chunk.len() as u64 / SECTOR;
            match self.mode {
                RwMode::Append => {
                    let moffset = st.data_end;
                    self.data
                        .write_all_at(chunk, moffset * SECTOR)
                        .map_err(|e| Error::io(&self.data_name, moffset * SECTOR, e))?;
                    st.data_end += sectors;
                    let seg = Segment {
                        offset: off / SECTOR,
                        length: sectors as u32,
                        moffset,
                        zeroed: false,
                        tag: 0,
                    };
                    self.append_index(&mut st, &[seg])?;
                    st.index.insert(seg);
                }
                RwMode::Sparse => {
                    let pos = HEADER_SIZE + off;
                    self.data
                        .write_all_at(chunk, pos)
                        .map_err(|e| Error::io(&self.data_name, pos, e))?;
                    st.index.insert(Segment {
                        offset: off / SECTOR,
                        length: sectors as u32,
                        moffset: off / SECTOR + HEADER_SECTORS,
                        zeroed: false,
                        tag: 0,
                    });
                }
            }
        }
        Ok(())
    }

    /// Discards `[offset, offset + len)`: append mode records zeroed entries (reads give zeros);
    /// sparse mode punches a hole (the range becomes unmapped in this layer).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let mut st = self.lock();
        crate::lsmt::check_io(offset, len, st.header.virtual_size)?;
        let (start, end) = (offset / SECTOR, (offset + len) / SECTOR);
        match self.mode {
            RwMode::Append => {
                let mut segs = Vec::new();
                let mut cur = start;
                while cur < end {
                    let n = (end - cur).min(MAX_SEGMENT_LEN as u64);
                    segs.push(Segment {
                        offset: cur,
                        length: n as u32,
                        moffset: st.data_end,
                        zeroed: true,
                        tag: 0,
                    });
                    cur += n;
                }
                self.append_index(&mut st, &segs)?;
                for s in segs {
                    st.index.insert(s);
                }
            }
            RwMode::Sparse => {
                let pos = HEADER_SIZE + offset;
                let r = unsafe {
                    libc::fallocate(
                        self.data.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        pos as libc::off_t,
                        len as libc::off_t,
                    )
                };
                if r != 0 {
                    return Err(Error::io(&self.data_name, pos, io::Error::last_os_error()));
                }
                st.index.remove_range(start, end);
            }
        }
        Ok(())
    }

    fn append_index(&self, st: &mut RwState, segs: &[Segment]) -> Result<()> {
        let mut raw = Vec::with_capacity(segs.len() * 16);
        for s in segs {
            raw.extend_from_slice(&s.encode());
        }
        self.index
            .write_all_at(&raw, st.index_end)
            .map_err(|e| Error::io(&self.index_name, st.index_end, e))?;
        st.index_end += raw.len() as u64;
        Ok(())
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> Result<()> {
        self.data
            .sync_data()
            .map_err(|e| Error::io(&self.data_name, 0, e))?;
        self.index
            .sync_data()
            .map_err(|e| Error::io(&self.index_name, 0, e))?;
        Ok(())
    }

    /// Resolves `[start, end)` (sectors) against this layer.
    pub fn resolve(&self, start: u64, end: u64, out: &mut Vec<Piece>) {
        let st = self.lock();
        resolve(st.index.overlapping(start, end), start, end, out);
    }

    /// Reads mapped data: `seg` from [`RwLayer::resolve`]. May block.
    pub fn read_mapped(&self, buf: &mut [u8], seg: &Segment) -> Result<()> {
        self.read_mapped_with(buf, seg, Blocking::Allowed)
    }

    /// As [`read_mapped`](Self::read_mapped); with [`Blocking::Never`] data not in the page
    /// cache (or a filesystem that cannot tell) fails with [`Error::WouldBlock`].
    pub fn read_mapped_with(
        &self,
        buf: &mut [u8],
        seg: &Segment,
        blocking: Blocking,
    ) -> Result<()> {
        let pos = seg.moffset * SECTOR;
        let mut done = 0;
        while done < buf.len() {
            let at = pos + done as u64;
            let r = match blocking {
                Blocking::Never => crate::source::pread_nowait(&self.data, &mut buf[done..], at),
                Blocking::Allowed => self.data.read_at(&mut buf[done..], at),
            };
            match r {
                Ok(0) => {
                    return Err(Error::corrupt(
                        &self.data_name,
                        pos + done as u64,
                        "RW data file ends inside a mapping",
                    ))
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Unsupported
                    ) =>
                {
                    return Err(Error::WouldBlock)
                }
                Err(e) => return Err(Error::io(&self.data_name, pos + done as u64, e)),
            }
        }
        Ok(())
    }

    /// The data file, where [`RwLayer::resolve`]'s mappings point (at `moffset` sectors).
    pub fn data_file(&self) -> &File {
        &self.data
    }

    /// The data file as a read source (for commit).
    pub fn data_source(&self) -> Result<Arc<dyn ReadAt>> {
        let f = self
            .data
            .try_clone()
            .map_err(|e| Error::io(&self.data_name, 0, e))?;
        Ok(Arc::new(FileSource::from_file(f, self.data_name.clone())?))
    }

    /// Seals in place (`overlaybd-commit --seal`): appends the index and a trailer to the data
    /// file, which then opens as a read-only layer.
    pub fn seal(self) -> Result<()> {
        let st = self.lock();
        let segs = st.index.segments();
        let end = match self.mode {
            RwMode::Append => st.data_end * SECTOR,
            RwMode::Sparse => HEADER_SIZE + st.header.virtual_size.div_ceil(SECTOR) * SECTOR,
        };
        let mut raw = Vec::with_capacity(segs.len() * 16 + SECTOR as usize);
        for s in &segs {
            raw.extend_from_slice(&s.encode());
        }
        raw.resize(raw.len().div_ceil(SECTOR as usize) * SECTOR as usize, 0);
        let mut trailer = st.header.clone();
        trailer.flags = FLAG_DATA | FLAG_SEALED;
        trailer.index_offset = end;
        trailer.index_size = segs.len() as u64;
        raw.extend_from_slice(&trailer.encode());
        self.data
            .set_len(end)
            .map_err(|e| Error::io(&self.data_name, end, e))?;
        self.data
            .write_all_at(&raw, end)
            .map_err(|e| Error::io(&self.data_name, end, e))?;
        self.data
            .sync_data()
            .map_err(|e| Error::io(&self.data_name, 0, e))?;
        Ok(())
    }
}

/// Replays an append-mode index file: entries in write order, later ones win.
fn replay_index(src: &FileSource, data_sectors: u64) -> Result<(RwIndex, u64)> {
    let size = src.size();
    let count = (size - HEADER_SIZE) / 16;
    if count > MAX_RW_INDEX_SIZE {
        return Err(Error::corrupt(
            src.name(),
            0,
            format!("index has {count} entries, limit {MAX_RW_INDEX_SIZE}"),
        ));
    }
    let mut idx = RwIndex::default();
    let mut buf = vec![0u8; 16 * 4096];
    let mut pos = HEADER_SIZE;
    let end = HEADER_SIZE + count * 16;
    while pos < end {
        let n = ((end - pos) as usize).min(buf.len());
        read_exact_at(src, &mut buf[..n], pos)?;
        for (i, e) in buf[..n].chunks_exact(16).enumerate() {
            let at = pos + 16 * i as u64;
            let mut b = [0u8; 16];
            b.copy_from_slice(e);
            let Some(mut s) = Segment::decode(&b) else {
                continue;
            };
            s.tag = 0;
            if s.length == 0 {
                continue;
            }
            let bad = s.moffset < HEADER_SECTORS
                || if s.zeroed {
                    s.moffset > data_sectors
                } else {
                    s.mend() > data_sectors
                };
            if bad {
                return Err(Error::corrupt(
                    src.name(),
                    at,
                    format!(
                        "index entry maps [{}, {}) beyond the data file's {data_sectors} sectors",
                        s.moffset,
                        s.mend()
                    ),
                ));
            }
            idx.insert(s);
        }
        pos += n as u64;
    }
    Ok((idx, end))
}

/// Rebuilds a sparse layer's index from the data file's allocated extents.
fn scan_sparse(data: &File, name: &str, vsize: u64) -> Result<RwIndex> {
    let fd = data.as_raw_fd();
    let end = HEADER_SIZE + vsize;
    let mut idx = RwIndex::default();
    let mut pos = HEADER_SIZE as i64;
    loop {
        let d = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if d < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(Error::io(name, pos as u64, e));
        }
        if d as u64 >= end {
            break;
        }
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        if h < 0 {
            return Err(Error::io(name, d as u64, io::Error::last_os_error()));
        }
        // Extents are in filesystem blocks; clamp to whole sectors inside the virtual disk.
        let s = (d as u64 - HEADER_SIZE) / SECTOR;
        let e = ((h as u64).min(end) - HEADER_SIZE).div_ceil(SECTOR);
        let mut cur = s;
        while cur < e {
            let n = (e - cur).min(MAX_SEGMENT_LEN as u64);
            idx.insert(Segment {
                offset: cur,
                length: n as u32,
                moffset: cur + HEADER_SECTORS,
                zeroed: false,
                tag: 0,
            });
            cur += n;
        }
        pos = h;
    }
    Ok(idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data limit refuses the write that could pass it (ENOSPC, naming the file and the
    /// limit), in both modes; what was written before reads back, and the file stays under it.
    #[test]
    fn writes_past_the_data_limit_fail_with_enospc() {
        for mode in [RwMode::Append, RwMode::Sparse] {
            let dir = tempfile::tempdir().unwrap();
            let (d, i) = (dir.path().join("d"), dir.path().join("i"));
            let mut layer = RwLayer::create(&d, &i, 64 << 20, mode, None).unwrap();
            layer.limit_data(1 << 20);
            let chunk = vec![9u8; 256 << 10];
            let mut written = 0;
            let err = loop {
                match layer.write(&chunk, written) {
                    Ok(()) => written += chunk.len() as u64,
                    Err(e) => break e,
                }
                assert!(written <= 1 << 20, "{mode:?}: {written} bytes written");
            };
            assert_eq!(err.errno(), libc::ENOSPC, "{mode:?}");
            let msg = err.to_string();
            assert!(
                msg.contains(&d.display().to_string()) && msg.contains("1048576"),
                "{msg}"
            );
            assert!(
                written >= 512 << 10,
                "{mode:?}: only {written} bytes before the limit"
            );
            assert!(std::fs::metadata(&d).unwrap().blocks() * 512 <= 1 << 20);
            let mut back = vec![0u8; written as usize];
            let img = crate::ImageStack::writable(None, layer).unwrap();
            img.read(&mut back, 0).unwrap();
            assert!(back.iter().all(|&b| b == 9), "{mode:?}");
        }
    }
}
