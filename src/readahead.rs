//! File-aware readahead for lazily pulled images (issue 15): the first read of a file's data
//! fetches the file's whole chunk, as stargz fetches a file's chunk, instead of only the pages
//! the kernel asked for. A container's start reads file after file, each in a different place
//! (python's modules, a binary's pages faulted in one by one); per request, the registry's
//! latency costs more than the extra bytes.
//!
//! - It learns where files are from the reads themselves: a read that covers part of an inode
//!   table (the kernel reads a file's inode before its data) has each inode's data runs noted
//!   ([`crate::extfs::layout`]), cut into the file's chunks: aligned `chunk` bytes of the file,
//!   maybe in several extents. Only the superblock and group descriptors are read by us, once,
//!   when the device is attached (the mount reads them right after).
//! - The first read that may wait inside a noted chunk prefetches all of it, its extents in one
//!   request where the layer holds them one after the other ([`LayerStack::prefetch`]). Each
//!   chunk is fetched once.
//! - A program or library comes whole (up to [`WHOLE_ELF_MAX`]): once a read of a file's first
//!   bytes shows an ELF header, its chunks not fetched yet become one, fetched by the next read
//!   inside it that may wait. The loader maps it and faults its pages in all over it (python's
//!   binary: 8 requests of its 7 chunks, one after the other).
//! - The inodes are the image's, hence untrusted. They can only choose which chunks of at most
//!   `chunk` bytes of the disk's own data are fetched, and at most [`MAX_RANGES`] ranges are
//!   noted.

use crate::extfs::layout::{
    inode_data_runs, DataRun, Geometry, InodeTable, SUPERBLOCK_LEN, SUPERBLOCK_OFFSET,
};
use ovbd_format::{ImageStack, LayerStack, ReadAdvisor};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// Disk ranges noted at most (about 60 bytes each); inodes read past it are not noted.
pub(crate) const MAX_RANGES: usize = 1 << 16;

/// A chunk that is one range this short is read whole by the kernel's own readahead: not noted.
const MIN_RANGE: u64 = 64 << 10;

/// A file longer than this many chunks is not noted: it is more likely read here and there (a
/// database, a model) than whole, and its reads are left to the cache's adaptive refill, which
/// keeps scattered small reads small. (32 MiB at the default chunk: binaries and libraries
/// are shorter.)
const MAX_FILE_CHUNKS: u64 = 32;

/// An ELF file up to this long is fetched whole once its header is read (python's binary is
/// 6.5 MiB, libcrypto 4.5 MiB); a longer one (a browser's, LLVM's library) chunk by chunk.
pub(crate) const WHOLE_ELF_MAX: u64 = 8 << 20;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

pub(crate) struct FileReadahead {
    disk_size: u64,
    chunk: u64,
    geometry: Geometry,
    tables: Vec<InodeTable>,
    noted: Mutex<Noted>,
}

#[derive(Default)]
struct Noted {
    /// Every noted chunk's disk ranges: start → (end, chunk), never overlapping. Kept after the
    /// chunk is fetched, so an inode read again does not note it again.
    ranges: BTreeMap<u64, (u64, u64)>,
    /// The chunks not fetched yet: their disk ranges, in file order.
    chunks: HashMap<u64, Vec<(u64, u64)>>,
    /// Files of several chunks, up to [`WHOLE_ELF_MAX`], by the disk offset of their first
    /// byte: their chunks, for [`FileReadahead::note_elf`].
    heads: HashMap<u64, Vec<u64>>,
    next: u64,
    full: bool,
}

impl FileReadahead {
    /// The readahead for `image`'s ext4, fetching chunks of `chunk` bytes of a file; `None` if
    /// the lowers hold no ext4 it can read (logged, the image works as without it).
    pub(crate) fn open(image: &ImageStack, chunk: u64) -> Option<FileReadahead> {
        let lower = image.lower()?;
        let disk_size = image.virtual_size();
        let learn = || -> anyhow::Result<(Geometry, Vec<InodeTable>)> {
            let mut sb = vec![0u8; SUPERBLOCK_LEN];
            lower.read(&mut sb, SUPERBLOCK_OFFSET)?;
            let geometry = Geometry::parse(&sb, disk_size)?;
            let start = geometry.gdt_offset;
            let end = (start + geometry.gdt_len()).next_multiple_of(512);
            anyhow::ensure!(end <= disk_size, "group descriptors past the disk's end");
            let mut gdt = vec![0u8; (end - start) as usize];
            lower.read(&mut gdt, start)?;
            let tables = geometry.inode_tables(&gdt, disk_size)?;
            Ok((geometry, tables))
        };
        match learn() {
            Ok((geometry, tables)) => Some(Self::with_layout(disk_size, chunk, geometry, tables)),
            Err(e) => {
                log::info!("file readahead off: the image's ext4 cannot be read: {e:#}");
                None
            }
        }
    }

    /// The readahead for a disk of `disk_size` bytes whose ext4 has `geometry` and `tables`.
    pub(crate) fn with_layout(
        disk_size: u64,
        chunk: u64,
        geometry: Geometry,
        tables: Vec<InodeTable>,
    ) -> FileReadahead {
        FileReadahead {
            disk_size,
            chunk: chunk.max(512),
            geometry,
            tables,
            noted: Mutex::default(),
        }
    }

    fn noted(&self) -> std::sync::MutexGuard<'_, Noted> {
        self.noted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes the chunks of the files whose inodes are in `data`, the disk's bytes at `offset`.
    pub(crate) fn note_inodes(&self, data: &[u8], offset: u64) {
        let end = offset + data.len() as u64;
        let isz = self.geometry.inode_size;
        let first = self.tables.partition_point(|t| t.offset + t.len <= offset);
        let mut chunks: Vec<Vec<(u64, u64)>> = Vec::new();
        // Files that may come whole: their first byte's disk offset and their chunks in `chunks`.
        let mut heads: Vec<(u64, std::ops::Range<usize>)> = Vec::new();
        let mut runs: Vec<DataRun> = Vec::new();
        for t in self.tables[first..].iter().take_while(|t| t.offset < end) {
            // The inode slots wholly inside both the table and the read.
            let s = offset.max(t.offset);
            let mut at = t.offset + (s - t.offset).next_multiple_of(isz);
            let e = end.min(t.offset + t.len);
            while at + isz <= e {
                let slot = &data[(at - offset) as usize..(at - offset + isz) as usize];
                runs.clear();
                inode_data_runs(slot, self.geometry.block_size, self.disk_size, &mut runs);
                let len = runs.iter().map(|r| r.logical + r.len).max().unwrap_or(0);
                if len <= MAX_FILE_CHUNKS * self.chunk {
                    let first = chunks.len();
                    self.split(&runs, &mut chunks);
                    let head = runs.iter().find(|r| r.logical == 0).map(|r| r.offset);
                    if let (Some(head), true) = (head, len <= WHOLE_ELF_MAX) {
                        if chunks.len() - first > 1 {
                            heads.push((head, first..chunks.len()));
                        }
                    }
                }
                at += isz;
            }
        }
        if chunks.is_empty() {
            return;
        }
        let mut noted = self.noted();
        let mut ids: Vec<Option<u64>> = Vec::with_capacity(chunks.len());
        for c in chunks {
            ids.push(None);
            if noted.ranges.len() + c.len() > MAX_RANGES {
                if !noted.full {
                    noted.full = true;
                    log::info!("file readahead: {MAX_RANGES} ranges noted, no more");
                }
                break;
            }
            let overlaps = c.iter().any(|&(s, e)| {
                noted
                    .ranges
                    .range(..e)
                    .next_back()
                    .is_some_and(|(_, &(end, _))| end > s)
            });
            if overlaps {
                continue; // the inode read again (or one claiming another's blocks)
            }
            let id = noted.next;
            noted.next += 1;
            for &(s, e) in &c {
                noted.ranges.insert(s, (e, id));
            }
            noted.chunks.insert(id, c);
            *ids.last_mut().expect("pushed above") = Some(id);
        }
        for (head, of) in heads {
            let file: Vec<u64> = ids[of].iter().flatten().copied().collect();
            if file.len() > 1 {
                noted.heads.insert(head, file);
            }
        }
    }

    /// After a read of `data` at `offset`: if it is the first bytes of a noted file and they
    /// are an ELF header, the file's chunks not fetched yet become one chunk, so that the next
    /// read inside any of them fetches them all.
    pub(crate) fn note_elf(&self, data: &[u8], offset: u64) {
        if !data.starts_with(ELF_MAGIC) {
            return;
        }
        let mut noted = self.noted();
        let Some(file) = noted.heads.remove(&offset) else {
            return;
        };
        let mut whole: Vec<(u64, u64)> = Vec::new();
        for id in &file {
            whole.extend(noted.chunks.remove(id).into_iter().flatten());
        }
        if whole.is_empty() {
            return;
        }
        let id = noted.next;
        noted.next += 1;
        for &(s, _) in &whole {
            if let Some(r) = noted.ranges.get_mut(&s) {
                r.1 = id;
            }
        }
        noted.chunks.insert(id, whole);
    }

    /// Cuts a file's `runs` into its chunks (aligned `chunk` bytes of the file) as disk ranges
    /// `(start, end)`, leaving out a chunk the kernel reads in one request anyway.
    fn split(&self, runs: &[DataRun], out: &mut Vec<Vec<(u64, u64)>>) {
        let mut current: Option<(u64, Vec<(u64, u64)>)> = None;
        let mut done = |c: Option<(u64, Vec<(u64, u64)>)>| {
            if let Some((_, r)) = c {
                if r.len() > 1 || r[0].1 - r[0].0 >= MIN_RANGE {
                    out.push(r);
                }
            }
        };
        for r in runs {
            let mut l = r.logical;
            let end = r.logical + r.len;
            while l < end {
                let k = l / self.chunk;
                let e = end.min((k + 1) * self.chunk);
                let range = (r.offset + (l - r.logical), r.offset + (e - r.logical));
                match &mut current {
                    Some((ck, ranges)) if *ck == k => ranges.push(range),
                    _ => done(current.replace((k, vec![range]))),
                }
                l = e;
            }
        }
        done(current);
    }

    /// The disk ranges of the chunk a read at `offset` starts in, if not fetched yet (then
    /// counted as fetched).
    pub(crate) fn take_chunk(&self, offset: u64) -> Option<Vec<(u64, u64)>> {
        let mut noted = self.noted();
        let (_, &(end, id)) = noted.ranges.range(..=offset).next_back()?;
        if offset >= end {
            return None;
        }
        noted.chunks.remove(&id)
    }
}

impl ReadAdvisor for FileReadahead {
    fn before_read(&self, lower: &LayerStack, offset: u64, len: u64) {
        let Some(chunk) = self.take_chunk(offset) else {
            return;
        };
        if chunk.iter().all(|&(s, e)| s >= offset && e <= offset + len) {
            return; // the read itself covers it
        }
        let ranges: Vec<(u64, u64)> = chunk.iter().map(|&(s, e)| (s, e - s)).collect();
        log::trace!("file readahead at {offset}: {ranges:?}");
        if let Err(e) = lower.prefetch(&ranges) {
            // The read that follows meets the same error and reports it.
            log::debug!("file readahead at {offset}: {e}");
        }
    }

    fn after_read(&self, data: &[u8], offset: u64) {
        self.note_inodes(data, offset);
        self.note_elf(data, offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extfs::{ExtFs, ROOT_INO};
    use crate::prefetch::LowerDisk;
    use crate::source::cache::CachedBlob;
    use crate::testing::{ext4_layer, random_bytes, Fake};
    use ovbd_format::{FileSource, LsmtFile, ReadAt};
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::Arc;

    use crate::testing::BS;
    const CHUNK: u64 = 1 << 20;

    /// A converted ext4 image holding a 3 MiB file, read from a fake registry through the
    /// block cache, with the readahead or without.
    struct Lazy {
        _t: tempfile::TempDir,
        fake: Arc<Fake>,
        image: ImageStack,
        data: Vec<u8>,
        /// The file's data on the disk, `(offset, len)` in file order, and the 4 KiB of inode
        /// table holding its inode.
        runs: Vec<(u64, u64)>,
        inode_block: u64,
    }

    fn lazy(advised: bool) -> Lazy {
        lazy_with(advised, CHUNK)
    }

    /// As [`lazy`], the readahead fetching chunks of `chunk` bytes.
    fn lazy_with(advised: bool, chunk: u64) -> Lazy {
        lazy_of(advised, chunk, random_bytes(3 << 20, 11))
    }

    /// As [`lazy_with`], the big file holding `data`.
    fn lazy_of(advised: bool, chunk: u64, data: Vec<u8>) -> Lazy {
        let t = tempfile::tempdir().unwrap();
        let files = [
            ("app/big", data.clone()),
            ("app/small", random_bytes(5000, 12)),
        ];
        let lsmt = ext4_layer(t.path(), &files);
        // Where things are, from the layer read locally.
        let src: Arc<dyn ReadAt> = Arc::new(FileSource::open(&lsmt).unwrap());
        let local = Arc::new(ImageStack::read_only(
            LayerStack::new(vec![LsmtFile::open(src).unwrap()]).unwrap(),
        ));
        let fs = ExtFs::open_read_only(Arc::new(LowerDisk(local.clone()))).unwrap();
        let app = fs.lookup(ROOT_INO, b"app").unwrap().unwrap();
        let ino = fs.lookup(app, b"big").unwrap().unwrap();
        let runs = fs.data_runs(ino).unwrap();
        assert!(
            runs.len() > 1,
            "the first chunk is in several extents: {runs:?}"
        );
        let ra = FileReadahead::open(&local, CHUNK).unwrap();
        let per_group = ra.geometry.inodes_per_group;
        let table = ra
            .tables
            .iter()
            .find(|t| t.first_ino == (ino as u64 - 1) / per_group * per_group + 1)
            .unwrap();
        let slot = table.offset + (ino as u64 - 1) % per_group * ra.geometry.inode_size;
        // The same layer from the registry.
        let cache = crate::testing::block_cache(&t.path().join("cache"));
        let bytes = std::fs::read(&lsmt).unwrap();
        let digest = crate::oci::sha256_digest(&bytes);
        let fake = Fake::served(bytes, digest.as_ref(), "h/r");
        let blob: Arc<dyn ReadAt> = Arc::new(CachedBlob::with_source(cache, fake.clone()).unwrap());
        let mut image =
            ImageStack::read_only(LayerStack::new(vec![LsmtFile::open(blob).unwrap()]).unwrap());
        if advised {
            let ra = FileReadahead::open(&image, chunk).unwrap();
            image.set_advisor(Box::new(ra));
        }
        Lazy {
            _t: t,
            fake,
            image,
            data,
            runs,
            inode_block: slot / 4096 * 4096,
        }
    }

    impl Lazy {
        /// Reads the file's `[at, at + len)` as the kernel does (one read per extent), checks
        /// the bytes, returns the requests it made.
        fn read_file(&self, at: u64, len: usize) -> u64 {
            let before = self.fake.calls.load(SeqCst);
            let mut logical = 0;
            for &(disk, n) in &self.runs {
                let s = at.max(logical);
                let e = (at + len as u64).min(logical + n);
                if s < e {
                    let mut buf = vec![0u8; (e - s) as usize];
                    self.image.read(&mut buf, disk + (s - logical)).unwrap();
                    assert!(buf == self.data[s as usize..e as usize], "bytes at {s}");
                }
                logical += n;
            }
            self.fake.calls.load(SeqCst) - before
        }

        fn read_inode(&self) {
            let mut buf = vec![0u8; 4096];
            self.image.read(&mut buf, self.inode_block).unwrap();
        }
    }

    /// Once the file's inode was read, its first read fetches the whole chunk in one request
    /// (the file's first chunk is in three extents), the rest of the chunk reads without one, the
    /// next chunk takes one more.
    #[test]
    fn a_files_first_read_fetches_its_chunk() {
        let l = lazy(true);
        l.read_inode();
        assert_eq!(l.read_file(0, 4096), 1);
        assert_eq!(l.read_file(4096, 128 << 10), 0);
        assert_eq!(l.read_file(CHUNK - (64 << 10), 64 << 10), 0);
        let fetched = l.fake.fetched();
        assert_eq!(l.read_file(CHUNK + (200 << 10), 4096), 1);
        let chunk_bytes = l.fake.fetched() - fetched;
        assert!(
            (CHUNK - BS..=CHUNK + 2 * BS).contains(&chunk_bytes),
            "fetched {chunk_bytes}"
        );
        assert_eq!(l.read_file(CHUNK, 200 << 10), 0);
        assert_eq!(l.read_file(CHUNK + (204 << 10), 800 << 10), 0);
        // The last chunk ends with the file.
        assert_eq!(l.read_file(3 * CHUNK - 4096, 4096), 1);
        assert_eq!(l.read_file(2 * CHUNK, CHUNK as usize), 0);
    }

    /// A program (an ELF header at the file's start) comes whole: its first read fetches its
    /// first chunk, the next read elsewhere in it all the rest in one request, and then no read
    /// in it needs another.
    #[test]
    fn an_elf_file_comes_whole_once_its_header_is_read() {
        let mut data = random_bytes(3 << 20, 11);
        data[..4].copy_from_slice(ELF_MAGIC);
        let l = lazy_of(true, CHUNK, data);
        l.read_inode();
        assert_eq!(l.read_file(0, 4096), 1);
        let fetched = l.fake.fetched();
        assert_eq!(l.read_file(2 * CHUNK + 4096, 4096), 1);
        assert!(l.fake.fetched() - fetched >= 2 * CHUNK - BS);
        assert_eq!(l.read_file(0, 3 * CHUNK as usize), 0);
    }

    /// An ELF file longer than [`WHOLE_ELF_MAX`] is fetched chunk by chunk, as any file.
    #[test]
    fn a_long_elf_file_comes_chunk_by_chunk() {
        let mut data = random_bytes(WHOLE_ELF_MAX as usize + CHUNK as usize, 11);
        data[..4].copy_from_slice(ELF_MAGIC);
        let l = lazy_of(true, CHUNK, data);
        l.read_inode();
        assert_eq!(l.read_file(0, 4096), 1);
        assert_eq!(l.read_file(5 * CHUNK + 4096, 4096), 1);
        assert_eq!(l.read_file(6 * CHUNK + 4096, 4096), 1);
        assert_eq!(l.read_file(5 * CHUNK, 2 * CHUNK as usize), 0);
    }

    /// Without the readahead (or without its inode read first), a read fetches what it reads,
    /// so a chunk's reads take more requests: what the readahead saves.
    #[test]
    fn without_the_inode_or_the_readahead_reads_fetch_what_they_read() {
        for advised in [false, true] {
            let l = lazy(advised);
            let fetched = l.fake.fetched();
            assert_eq!(l.read_file(CHUNK + 4096, 4096), 1);
            assert!(l.fake.fetched() - fetched <= 2 * BS, "advised {advised}");
            assert!(
                l.read_file(CHUNK + (256 << 10), 128 << 10) >= 1,
                "advised {advised}"
            );
        }
    }

    /// A file of more than 32 chunks (3 MiB in 64 KiB chunks) is left to the refill: its
    /// first read fetches what it reads.
    #[test]
    fn a_long_file_is_left_to_the_refill() {
        let l = lazy_with(true, 64 << 10);
        l.read_inode();
        let fetched = l.fake.fetched();
        assert_eq!(l.read_file(CHUNK + 4096, 4096), 1);
        assert!(l.fake.fetched() - fetched <= 2 * BS);
        // With chunks of 1 MiB (3 chunks), the same read brings the chunk.
        let l = lazy_with(true, CHUNK);
        l.read_inode();
        let fetched = l.fake.fetched();
        assert_eq!(l.read_file(CHUNK + 4096, 4096), 1);
        assert!(l.fake.fetched() - fetched >= CHUNK - BS);
    }

    /// The fuzz target's entry on its seed (an ext4 by `mkfs.ext4 -d`, 1 KiB blocks, a 70 KB
    /// file in three extents) notes the file's first chunk; on mutated metadata it never panics
    /// and every chunk stays inside the disk, one chunk long at most (the entry's asserts).
    #[test]
    fn ext4_parsing_on_the_fuzz_seed_and_mutations_of_it() {
        let seed = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fuzz/seeds/ext4_readahead/small-ext4"
        ))
        .unwrap();
        assert_eq!(crate::fuzzing::ext4_readahead(&seed).unwrap(), 1);
        let mut rng = crate::testing::Rng(7);
        let mut parsed = 0;
        for _ in 0..3000 {
            let mut d = seed.clone();
            for _ in 0..1 + rng.below(6) {
                let at = 1024 + rng.below(12 << 10) as usize;
                d[at] = rng.next() as u8;
            }
            parsed += crate::fuzzing::ext4_readahead(&d).is_ok() as usize;
        }
        assert!(parsed > 100, "{parsed} of the mutations parsed");
    }
}
