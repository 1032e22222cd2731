//! Prefetch at attach, compatible with upstream overlaybd (issue 15): an image's trace or
//! priority list (see [`ovbd_format::trace`] for both formats and where they come from) is
//! replayed into the block cache by a few threads of its own, so the container's first reads
//! find their blocks there.
//!
//! - The replay starts after the device is attached and never delays it: loading the input
//!   (maybe a registry fetch of the acceleration layer's blob) and resolving paths run in the
//!   replay's own thread.
//! - At most [`CONCURRENCY`] reads at once, each of at most 1 MiB, so the container's own reads
//!   are never queued behind a long replay (they go straight to the cache and the registry).
//! - The replay holds the image weakly: once the device is detached and the image dropped,
//!   the next step finds it gone and stops (no read is made after that).
//! - A bad input (corrupt trace, unknown path) is logged and not replayed; the device works
//!   as without it.

use crate::extfs::{BlockDevice, ExtFs, Ino, ROOT_INO, S_IFDIR, S_IFREG};
use crate::source::config::{ImageConfig, PrefetchInput, RemoteSource};
use anyhow::{bail, Context, Result};
use ovbd_format::trace::{
    is_binary_trace, parse_priority_list, parse_trace, ListEntry, TraceOp, MAX_IO_SIZE,
    MAX_TRACE_SIZE,
};
use ovbd_format::{ImageStack, LayerStack, ReadAt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Weak};

/// Replay reads in flight at once (upstream's `prefetchConfig.concurrency` is 16; ovbd's
/// cache already splits each missing run into concurrent range requests).
pub(crate) const CONCURRENCY: usize = 8;

/// What one replay read reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// A lower's decompressed LSMT file (a trace record); 0 = the bottom lower.
    Layer(u32),
    /// The lowers' merged disk (a priority-list file's extents).
    Disk,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PrefetchRead {
    pub target: Target,
    pub offset: u64,
    pub len: u64,
}

/// The outcome of a replay.
#[derive(Debug, Default)]
pub(crate) struct ReplayStats {
    pub reads: AtomicU64,
    pub bytes: AtomicU64,
    pub failed: AtomicU64,
    /// Records of layers the image does not have (upstream skips them too).
    pub skipped: AtomicU64,
}

/// A running replay.
pub(crate) struct Replay {
    cancel: Arc<AtomicBool>,
    #[cfg_attr(not(test), allow(dead_code))] // the daemon reads the log line
    stats: Arc<ReplayStats>,
    #[cfg_attr(not(test), allow(dead_code))] // the daemon lets the thread run detached
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Replay {
    /// Stops after the reads in flight.
    #[allow(dead_code)] // the device's detach stops a replay by dropping the image
    pub(crate) fn cancel(&self) {
        self.cancel.store(true, Relaxed);
    }

    /// Waits for the end; the error says why nothing was replayed (bad input).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn wait(mut self) -> Result<()> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("prefetch thread panicked"),
            None => Ok(()),
        }
    }
}

/// Starts the prefetch `cfg` asks for (if any) on `image`, the image attached from it.
pub(crate) fn start(
    cfg: &ImageConfig,
    image: &Arc<ImageStack>,
    remote: Option<Arc<dyn RemoteSource>>,
) -> Option<Replay> {
    let input = cfg.prefetch_input()?;
    let image = Arc::downgrade(image);
    let cancel = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(ReplayStats::default());
    let (c, s) = (cancel.clone(), stats.clone());
    let spawned = std::thread::Builder::new()
        .name("ovbd-prefetch".into())
        .spawn(move || {
            let r = run(&input, remote.as_deref(), &image, &c, &s);
            match &r {
                Ok(()) => log::info!(
                    "prefetch of {input:?}: {} reads, {} bytes, {} failed, {} skipped",
                    s.reads.load(Relaxed),
                    s.bytes.load(Relaxed),
                    s.failed.load(Relaxed),
                    s.skipped.load(Relaxed)
                ),
                Err(e) => log::warn!("prefetch not replayed: {e:#}"),
            }
            r
        });
    match spawned {
        Ok(t) => Some(Replay {
            cancel,
            stats,
            thread: Some(t),
        }),
        Err(e) => {
            log::warn!("prefetch not started: {e}");
            None
        }
    }
}

fn run(
    input: &PrefetchInput,
    remote: Option<&dyn RemoteSource>,
    image: &Weak<ImageStack>,
    cancel: &AtomicBool,
    stats: &ReplayStats,
) -> Result<()> {
    let (data, name) = load_input(input, remote)?;
    let reads = {
        let Some(img) = image.upgrade() else {
            return Ok(());
        };
        plan(&data, &name, &img, cancel)?
    };
    replay(&reads, image, CONCURRENCY, cancel, stats);
    Ok(())
}

/// The bytes of the trace file, and a name for messages.
pub(crate) fn load_input(
    input: &PrefetchInput,
    remote: Option<&dyn RemoteSource>,
) -> Result<(Vec<u8>, String)> {
    match input {
        PrefetchInput::File(path) => {
            let len = std::fs::metadata(path)
                .with_context(|| format!("reading {}", path.display()))?
                .len();
            if len > MAX_TRACE_SIZE + 24 {
                bail!("{}: {len} bytes is too large for a trace", path.display());
            }
            let data =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            Ok((data, path.display().to_string()))
        }
        PrefetchInput::Blob {
            repo_blob_url,
            digest,
            size,
            dir,
        } => {
            let Some(remote) = remote else {
                bail!("acceleration layer {digest} is remote only and no registry source is configured");
            };
            let blob = remote
                .open(repo_blob_url, digest, *size, None)
                .with_context(|| format!("acceleration layer {digest}"))?;
            let data = trace_in_layer(&*blob)?;
            if let Some(dir) = dir {
                keep_file(dir, &data);
            }
            Ok((data, format!("acceleration layer {digest}")))
        }
    }
}

/// The `trace` file of an acceleration layer's blob (one ustar entry, spec §2.6 (b)).
pub(crate) fn trace_in_layer(blob: &dyn ReadAt) -> Result<Vec<u8>> {
    let w = ovbd_format::tar::detect(blob)?;
    if w.kind == ovbd_format::tar::WrapperKind::None {
        bail!("{}: an acceleration layer must be a tar", blob.name());
    }
    if w.payload_size > MAX_TRACE_SIZE + 24 {
        bail!(
            "{}: trace of {} bytes is too large",
            blob.name(),
            w.payload_size
        );
    }
    let mut data = vec![0u8; w.payload_size as usize];
    ovbd_format::source::read_exact_at(blob, &mut data, w.payload_offset)?;
    Ok(data)
}

/// Keeps the trace as `<dir>/trace` (where upstream's containerd unpack puts it) so the next
/// attach reads no registry. Best effort: the replay goes on without it.
fn keep_file(dir: &Path, data: &[u8]) {
    let tmp = dir.join(".trace.tmp");
    let done = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&tmp, data))
        .and_then(|()| std::fs::rename(&tmp, dir.join("trace")));
    if let Err(e) = done {
        log::warn!("keeping the trace in {}: {e}", dir.display());
        let _ = std::fs::remove_file(&tmp);
    }
}

/// The reads a trace or priority list asks for on `image`.
pub(crate) fn plan(
    data: &[u8],
    name: &str,
    image: &Arc<ImageStack>,
    cancel: &AtomicBool,
) -> Result<Vec<PrefetchRead>> {
    if data.is_empty() {
        return Ok(Vec::new()); // upstream: an empty file means "record", nothing to replay
    }
    let mut reads = Vec::new();
    if is_binary_trace(data) {
        for r in parse_trace(data, name)? {
            if r.op != TraceOp::Read {
                continue;
            }
            split(&mut reads, Target::Layer(r.layer_index), r.offset, r.count);
        }
        return Ok(reads);
    }
    let entries = parse_priority_list(data, name)?;
    if image.lower().is_none() {
        return Ok(reads);
    }
    let disk: Arc<dyn BlockDevice> = Arc::new(LowerDisk(image.clone()));
    let fs = ExtFs::open_read_only(disk).context("the image's ext4 (for the priority list)")?;
    for e in entries {
        if cancel.load(Relaxed) {
            break;
        }
        let (path, is_dir) = match &e {
            ListEntry::File(p) => (p.as_str(), false),
            ListEntry::Dir(p) => (p.as_str(), true),
        };
        let mut files = Vec::new();
        let found = resolve(&fs, path).and_then(|ino| {
            if is_dir {
                walk(&fs, ino, &mut files, 0)
            } else {
                files.push(ino);
                Ok(())
            }
        });
        if let Err(err) = found {
            log::warn!("prefetch: {name}: {path}: {err:#}");
            continue;
        }
        for ino in files {
            if let Err(err) = file_reads(&fs, ino, &mut reads) {
                log::warn!("prefetch: {name}: {path}: {err:#}");
            }
        }
    }
    Ok(reads)
}

/// Appends `[offset, offset + len)` of `target` in pieces of at most 1 MiB (upstream's
/// buffer; its longer records would overrun it).
fn split(reads: &mut Vec<PrefetchRead>, target: Target, offset: u64, len: u64) {
    let mut at = offset;
    let end = offset.saturating_add(len);
    while at < end {
        let n = (end - at).min(MAX_IO_SIZE);
        reads.push(PrefetchRead {
            target,
            offset: at,
            len: n,
        });
        at += n;
    }
}

/// The inode of an absolute (or root-relative) path, following no symlinks (upstream's
/// extfs does not follow a final one either).
fn resolve(fs: &ExtFs, path: &str) -> Result<Ino> {
    let mut ino = ROOT_INO;
    for name in path.split('/').filter(|n| !n.is_empty() && *n != ".") {
        ino = fs
            .lookup(ino, name.as_bytes())?
            .with_context(|| format!("no {name:?}"))?;
    }
    Ok(ino)
}

/// Regular files under directory `dir`, depth first.
fn walk(fs: &ExtFs, dir: Ino, out: &mut Vec<Ino>, depth: usize) -> Result<()> {
    if fs.file_type(dir)? != S_IFDIR {
        bail!("not a directory");
    }
    if depth > 64 {
        bail!("directories nested more than 64 deep");
    }
    for (name, ino) in fs.list(dir)? {
        if name == b".." || name == b"." {
            continue;
        }
        match fs.file_type(ino)? {
            S_IFREG => out.push(ino),
            S_IFDIR => walk(fs, ino, out, depth + 1)?,
            _ => {}
        }
    }
    Ok(())
}

/// A file's extents on the disk, up to its size rounded up to 512 (as upstream).
fn file_reads(fs: &ExtFs, ino: Ino, reads: &mut Vec<PrefetchRead>) -> Result<()> {
    if fs.file_type(ino)? != S_IFREG {
        bail!("not a regular file");
    }
    let mut left = fs.file_size(ino)?.div_ceil(512) * 512;
    for (at, len) in fs.data_runs(ino)? {
        if left == 0 {
            break;
        }
        let n = len.min(left);
        split(reads, Target::Disk, at, n);
        left -= n;
    }
    Ok(())
}

/// The image's lowers (not its writable layer) as libext2fs's read-only device: upstream
/// resolves paths on them.
pub(crate) struct LowerDisk(pub(crate) Arc<ImageStack>);

impl BlockDevice for LowerDisk {
    fn size(&self) -> u64 {
        self.0.lower().map_or(0, |l| l.virtual_size())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match self.0.lower() {
            Some(l) => l.read(buf, offset).map_err(std::io::Error::other),
            None => Err(std::io::Error::other("the image has no lowers")),
        }
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EROFS))
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The longest range of a layer one replay step fetches (the cache's largest refill).
const MAX_MERGED: u64 = 4 << 20;
/// Layer reads at most this far apart are fetched as one range, the gap with them. A python
/// start's trace (376 records, 17 MB decompressed) took 140 registry requests read record by
/// record; merged with gaps of 64 KiB, 76 requests for 10.10 MB; of 128 KiB, 57 for 10.04 MB;
/// of 256 KiB, 41 for 10.69 MB (coldstart bench; the cache's refill fetched more around lone
/// records than the gaps add).
const MERGE_GAP: u64 = 128 << 10;

/// One replay step: a layer range made of neighbouring trace records, or one read of the
/// merged disk.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Step {
    read: PrefetchRead,
    /// The reads of the plan it stands for, `(offset, len)`.
    spans: Vec<(u64, u64)>,
    /// The position of its first read in the plan: steps run in the order the reads came.
    first: usize,
}

/// The plan's layer reads merged where they are at most [`MERGE_GAP`] apart (up to
/// [`MAX_MERGED`]), so that the small reads a container made of neighbouring files are fetched
/// in one request rather than one each; disk reads as they are. In the order of each step's
/// first read.
fn steps(reads: &[PrefetchRead]) -> Vec<Step> {
    let mut out = Vec::new();
    let mut layered: Vec<(u32, u64, u64, usize)> = Vec::new();
    for (i, r) in reads.iter().enumerate() {
        match r.target {
            Target::Layer(l) => layered.push((l, r.offset, r.len, i)),
            Target::Disk => out.push(Step {
                read: *r,
                spans: vec![(r.offset, r.len)],
                first: i,
            }),
        }
    }
    layered.sort_unstable();
    let mut cur: Option<Step> = None;
    for (layer, offset, len, i) in layered {
        let end = offset.saturating_add(len);
        if let Some(step) = &mut cur {
            let r = &mut step.read;
            let r_end = r.offset + r.len;
            if r.target == Target::Layer(layer)
                && offset <= r_end.saturating_add(MERGE_GAP)
                && end.max(r_end) - r.offset <= MAX_MERGED
            {
                r.len = end.max(r_end) - r.offset;
                step.spans.push((offset, len));
                step.first = step.first.min(i);
                continue;
            }
        }
        out.extend(cur.take());
        cur = Some(Step {
            read: PrefetchRead {
                target: Target::Layer(layer),
                offset,
                len: end - offset,
            },
            spans: vec![(offset, len)],
            first: i,
        });
    }
    out.extend(cur);
    out.sort_by_key(|s| s.first);
    out
}

/// Replays `reads` with `concurrency` threads; stops when `cancel` is set or the image is gone.
pub(crate) fn replay(
    reads: &[PrefetchRead],
    image: &Weak<ImageStack>,
    concurrency: usize,
    cancel: &AtomicBool,
    stats: &ReplayStats,
) {
    let steps = steps(reads);
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..concurrency.clamp(1, steps.len().max(1)) {
            s.spawn(|| {
                loop {
                    if cancel.load(Relaxed) {
                        return;
                    }
                    let i = next.fetch_add(1, Relaxed);
                    let Some(step) = steps.get(i) else {
                        return;
                    };
                    let Some(img) = image.upgrade() else {
                        return; // detached
                    };
                    let records = step.spans.len() as u64;
                    match run_step(&img, step) {
                        Ok(Some(n)) => {
                            stats.reads.fetch_add(records, Relaxed);
                            stats.bytes.fetch_add(n, Relaxed);
                        }
                        Ok(None) => {
                            stats.skipped.fetch_add(records, Relaxed);
                        }
                        Err(e) => {
                            stats.failed.fetch_add(records, Relaxed);
                            log::debug!("prefetch {:?}: {e:#}", step.read);
                        }
                    }
                }
            });
        }
    });
}

/// One step: a layer range prefetched by its source (into the block cache for a remote layer:
/// no decompression), a disk range prefetched through the lowers. Returns the bytes the plan's reads asked for (up to
/// the layer's end, as upstream's pread comes up short there), None if the layer is not in the
/// image.
fn run_step(img: &ImageStack, step: &Step) -> Result<Option<u64>> {
    let Some(lower) = img.lower() else {
        return Ok(None);
    };
    let r = &step.read;
    match r.target {
        Target::Layer(index) => {
            let n = lower.layer_count();
            let Some(tag) = (n as u64).checked_sub(index as u64 + 1) else {
                return Ok(None);
            };
            let src = lower.source(tag as u8);
            let size = src.size();
            src.prefetch(r.offset, r.len.min(size.saturating_sub(r.offset)))?;
            Ok(Some(
                step.spans
                    .iter()
                    .map(|&(offset, len)| len.min(size.saturating_sub(offset)))
                    .sum(),
            ))
        }
        Target::Disk => prefetch_disk(lower, r),
    }
}

/// A range of the merged disk (a priority-list file's extent), up to its end: prefetched into
/// the lowers' caches as the file readahead's chunks are, without decompressing it here.
fn prefetch_disk(lower: &LayerStack, r: &PrefetchRead) -> Result<Option<u64>> {
    let end = r.offset.saturating_add(r.len).min(lower.virtual_size());
    if end <= r.offset {
        return Ok(Some(0));
    }
    lower.prefetch(&[(r.offset, end - r.offset)])?;
    Ok(Some(end - r.offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::cache::{BlobCache, CachedBlob};
    use crate::source::config::LowerConfig;
    use crate::testing::{random_bytes, Fake};
    use std::collections::BTreeSet;
    use std::sync::atomic::Ordering::SeqCst;

    const BS: u64 = 64 << 10;
    const DATA: u64 = 4 << 20;
    const URL: &str = "http://127.0.0.1:5000/v2/fake/blobs";

    /// The registry as the test's fake blobs, each read through the block cache.
    struct Blobs(Arc<BlobCache>, Vec<Arc<Fake>>);

    impl RemoteSource for Blobs {
        fn open(&self, _: &str, digest: &str, _: u64, _: Option<&Path>) -> Result<Arc<dyn ReadAt>> {
            let f = self
                .1
                .iter()
                .find(|f| f.digest == digest)
                .context("no such blob")?;
            Ok(Arc::new(CachedBlob::with_source(
                self.0.clone(),
                f.clone(),
            )?))
        }
    }

    /// An uncompressed LSMT layer of `DATA` random bytes at disk offset 0.
    fn lsmt_layer() -> Vec<u8> {
        crate::testing::lsmt_layer(DATA as usize, 3)
    }

    /// A trace written field by field as upstream's C structs lie in memory (padding junk).
    fn upstream_trace(records: &[(u8, u32, u64, u64)]) -> Vec<u8> {
        let mut body = Vec::new();
        for &(op, layer, count, offset) in records {
            body.push(op);
            body.extend_from_slice(&[0x5a; 3]);
            body.extend_from_slice(&layer.to_le_bytes());
            body.extend_from_slice(&count.to_le_bytes());
            body.extend_from_slice(&offset.to_le_bytes());
        }
        // Raw CRC-32C (reflected 0x82F63B78, no inversions), bit by bit as the spec says.
        let mut sum = 0u32;
        for &b in &body {
            sum ^= b as u32;
            for _ in 0..8 {
                sum = if sum & 1 != 0 {
                    (sum >> 1) ^ 0x82F6_3B78
                } else {
                    sum >> 1
                };
            }
        }
        let mut t = 0xC2EF_1820u32.to_le_bytes().to_vec();
        t.extend_from_slice(&[0x5a; 4]);
        t.extend_from_slice(&(body.len() as u64).to_le_bytes());
        t.extend_from_slice(&sum.to_le_bytes());
        t.extend_from_slice(&[0x5a; 4]);
        t.extend_from_slice(&body);
        t
    }

    /// The acceleration layer as upstream's `ctr record-trace` pushes it: one ustar entry.
    fn accel_tar(trace: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_path("trace").unwrap();
        h.set_mode(0o444);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(trace.len() as u64);
        h.set_cksum();
        b.append(&h, trace).unwrap();
        b.into_inner().unwrap()
    }

    struct Setup {
        _t: tempfile::TempDir,
        layer: Arc<Fake>,
        accel: Arc<Fake>,
        blobs: Arc<Blobs>,
        cfg: ImageConfig,
        accel_dir: std::path::PathBuf,
    }

    fn setup(trace: &[u8]) -> Setup {
        let t = tempfile::tempdir().unwrap();
        let cache = crate::testing::block_cache(&t.path().join("cache"));
        let data = lsmt_layer();
        let layer = Fake::served(
            data.clone(),
            crate::oci::sha256_digest(&data).as_ref(),
            "h/r",
        );
        let tarred = accel_tar(trace);
        let accel = Fake::served(
            tarred.clone(),
            crate::oci::sha256_digest(&tarred).as_ref(),
            "h/r",
        );
        let accel_dir = t.path().join("accel");
        let lower = |f: &Fake, dir: Option<std::path::PathBuf>| LowerConfig {
            dir,
            digest: Some(f.digest.clone()),
            size: Some(f.data.len() as u64),
            ..Default::default()
        };
        let cfg = ImageConfig {
            repo_blob_url: Some(URL.into()),
            lowers: vec![lower(&layer, None), lower(&accel, Some(accel_dir.clone()))],
            acceleration_layer: true,
            ..Default::default()
        };
        let blobs = Arc::new(Blobs(cache, vec![layer.clone(), accel.clone()]));
        Setup {
            _t: t,
            layer,
            accel,
            blobs,
            cfg,
            accel_dir,
        }
    }

    /// The refill blocks fetched so far.
    fn fetched_blocks(f: &Fake) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        for call in f.ranges.lock().unwrap().iter() {
            for &(off, len) in call {
                out.extend(off / BS..(off + len as u64).div_ceil(BS));
            }
        }
        out
    }

    #[test]
    fn trace_layer_replays_exactly_its_reads_into_the_cache() {
        // Layer offsets are of the LSMT file: its header comes before the data.
        let header = ovbd_format::lsmt::HEADER_SIZE;
        let recs = [
            (b'R', 0, 8192, header + (1 << 20) + 100),
            (b'R', 0, 3 * BS, header + 2 * (1 << 20)),
            (b'W', 0, 4096, header + 3 * (1 << 20)), // writes are not replayed
            (b'R', 5, 4096, 0),                      // a layer the image does not have
        ];
        let s = setup(&upstream_trace(&recs));
        let image = Arc::new(s.cfg.open_image(Some(&*s.blobs)).unwrap());
        let at_open = fetched_blocks(&s.layer);
        let remote: Arc<dyn RemoteSource> = s.blobs.clone();
        let r = start(&s.cfg, &image, Some(remote)).expect("a replay");
        let stats = r.stats.clone();
        r.wait().unwrap();
        assert_eq!(stats.reads.load(SeqCst), 2);
        assert_eq!(stats.skipped.load(SeqCst), 1);
        assert_eq!(stats.failed.load(SeqCst), 0);
        // The raw LSMT blob: layer offsets are blob offsets.
        let mut want: BTreeSet<u64> = BTreeSet::new();
        for &(op, layer, count, offset) in &recs {
            if op == b'R' && layer == 0 {
                want.extend(offset / BS..(offset + count).div_ceil(BS));
            }
        }
        let replayed: BTreeSet<u64> = fetched_blocks(&s.layer)
            .difference(&at_open)
            .copied()
            .collect();
        let expected: BTreeSet<u64> = want.difference(&at_open).copied().collect();
        assert!(!expected.is_empty());
        assert_eq!(replayed, expected);
        // Fetched once into the cache: reading the traced ranges again fetches nothing.
        let calls = s.layer.calls.load(SeqCst);
        let mut buf = vec![0u8; 8192];
        image
            .lower()
            .unwrap()
            .source(0)
            .read_at(&mut buf, recs[0].3)
            .unwrap();
        assert_eq!(s.layer.calls.load(SeqCst), calls);
        // The trace was kept where containerd would have unpacked it.
        assert_eq!(
            std::fs::read(s.accel_dir.join("trace")).unwrap(),
            upstream_trace(&recs)
        );
        assert!(s.accel.fetched() > 0);
    }

    #[test]
    fn neighbouring_trace_records_are_fetched_in_one_request() {
        // Two small reads 32 KiB apart, in two cache blocks, and a third far away: two
        // registry requests, not three.
        let near = (1 << 20) + BS - 4096;
        let recs = [
            (b'R', 0, 4096, near),
            (b'R', 0, 4096, near + 4096 + (32 << 10)),
            (b'R', 0, 4096, 3 << 20),
        ];
        let s = setup(&upstream_trace(&recs));
        let image = Arc::new(s.cfg.open_image(Some(&*s.blobs)).unwrap());
        let (calls, at_open) = (s.layer.calls.load(SeqCst), fetched_blocks(&s.layer));
        let remote: Arc<dyn RemoteSource> = s.blobs.clone();
        let r = start(&s.cfg, &image, Some(remote)).expect("a replay");
        let stats = r.stats.clone();
        r.wait().unwrap();
        assert_eq!(stats.reads.load(SeqCst), 3);
        assert_eq!(s.layer.calls.load(SeqCst) - calls, 2);
        let want: BTreeSet<u64> = [near / BS, near / BS + 1, (3 << 20) / BS].into();
        let replayed: BTreeSet<u64> = fetched_blocks(&s.layer)
            .difference(&at_open)
            .copied()
            .collect();
        assert_eq!(replayed, want.difference(&at_open).copied().collect());
    }

    #[test]
    fn records_past_a_layers_end_are_cut_there() {
        // A hostile trace: one record of 1 GiB from the layer's start, one wholly past its
        // end. The replay fetches the layer once, nothing past it, and fails nothing.
        let size = lsmt_layer().len() as u64;
        let recs = [(b'R', 0, 1 << 30, 0), (b'R', 0, 4096, size + (1 << 20))];
        let s = setup(&upstream_trace(&recs));
        let image = Arc::new(s.cfg.open_image(Some(&*s.blobs)).unwrap());
        let calls = s.layer.calls.load(SeqCst);
        let remote: Arc<dyn RemoteSource> = s.blobs.clone();
        let r = start(&s.cfg, &image, Some(remote)).expect("a replay");
        let stats = r.stats.clone();
        r.wait().unwrap();
        assert_eq!(stats.failed.load(SeqCst), 0);
        assert_eq!(
            stats.reads.load(SeqCst),
            1024 + 1,
            "1 MiB pieces, then the stray one"
        );
        assert_eq!(stats.bytes.load(SeqCst), size);
        let all: BTreeSet<u64> = (0..size.div_ceil(BS)).collect();
        assert_eq!(fetched_blocks(&s.layer), all);
        // Fetched in ranges of up to 4 MiB, each block once (the Fake counts per block).
        assert!(s.layer.calls.load(SeqCst) - calls <= size.div_ceil(MAX_MERGED) + 1);
        assert!(s.layer.per_block.lock().unwrap().values().all(|&n| n == 1));
    }

    #[test]
    fn replay_steps_merge_neighbouring_layer_reads_in_trace_order() {
        let l = |layer, offset, len| PrefetchRead {
            target: Target::Layer(layer),
            offset,
            len,
        };
        let disk = PrefetchRead {
            target: Target::Disk,
            offset: 0,
            len: 4096,
        };
        let reads = [
            l(1, 1 << 30, 4096),                         // 0: alone
            l(0, 100 << 10, 4096),                       // 1: merges with 3 and 4
            disk,                                        // 2: as it is
            l(0, 100 << 10, 8192),                       // 3: overlaps 1
            l(0, (108 << 10) + MERGE_GAP, 4096),         // 4: MERGE_GAP after 1 and 3's end
            l(0, (112 << 10) + 2 * MERGE_GAP + 1, 4096), // 5: a byte further
            l(1, 100 << 10, 4096),                       // 6: another layer
            l(2, 0, MAX_MERGED - 4096),                  // 7: merges with 8 ...
            l(2, MAX_MERGED - 4096, 4096),               // 8
            l(2, MAX_MERGED, 4096),                      // 9: ... but 9 would make it too long
        ];
        let got: Vec<(PrefetchRead, usize, usize)> = steps(&reads)
            .into_iter()
            .map(|s| (s.read, s.spans.len(), s.first))
            .collect();
        assert_eq!(
            got,
            [
                (l(1, 1 << 30, 4096), 1, 0),
                (l(0, 100 << 10, (12 << 10) + MERGE_GAP), 3, 1),
                (disk, 1, 2),
                (l(0, (112 << 10) + 2 * MERGE_GAP + 1, 4096), 1, 5),
                (l(1, 100 << 10, 4096), 1, 6),
                (l(2, 0, MAX_MERGED), 2, 7),
                (l(2, MAX_MERGED, 4096), 1, 9),
            ]
        );
        assert!(steps(&[]).is_empty());
    }

    #[test]
    fn corrupt_trace_is_refused_and_the_image_still_reads() {
        let header = ovbd_format::lsmt::HEADER_SIZE;
        let mut trace = upstream_trace(&[(b'R', 0, 3 * BS, header + (2 << 20))]);
        trace[24 + 9] ^= 0x10; // a record byte: the checksum no longer matches
        let s = setup(&trace);
        let image = Arc::new(s.cfg.open_image(Some(&*s.blobs)).unwrap());
        let at_open = s.layer.fetched();
        let remote: Arc<dyn RemoteSource> = s.blobs.clone();
        let err = start(&s.cfg, &image, Some(remote))
            .unwrap()
            .wait()
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("checksum") && msg.contains("offset 16"),
            "{msg}"
        );
        assert_eq!(s.layer.fetched(), at_open, "nothing replayed");
        // The disk is the layer alone: the acceleration layer is not part of it.
        assert_eq!(image.lower().unwrap().layer_count(), 1);
        let mut buf = vec![0u8; 4096];
        image.read(&mut buf, 4096).unwrap();
        assert_eq!(buf, random_bytes(DATA as usize, 3)[4096..8192]);
    }

    #[test]
    fn replay_stops_once_the_image_is_dropped() {
        let s = setup(&[]);
        let image = Arc::new(s.cfg.open_image(Some(&*s.blobs)).unwrap());
        let header = ovbd_format::lsmt::HEADER_SIZE;
        let reads: Vec<PrefetchRead> = (0..8)
            .map(|i| PrefetchRead {
                target: Target::Layer(0),
                offset: header + i * BS,
                len: BS,
            })
            .collect();
        let weak = Arc::downgrade(&image);
        drop(image); // the device let go of it
        let stats = ReplayStats::default();
        let before = s.layer.fetched();
        replay(&reads, &weak, 4, &AtomicBool::new(false), &stats);
        assert_eq!(stats.reads.load(SeqCst), 0);
        assert_eq!(s.layer.fetched(), before);
        // And a cancelled replay reads nothing either.
        let image = Arc::new(s.cfg.open_image(Some(&*s.blobs)).unwrap());
        replay(
            &reads,
            &Arc::downgrade(&image),
            4,
            &AtomicBool::new(true),
            &stats,
        );
        assert_eq!(stats.reads.load(SeqCst), 0);
        replay(
            &reads,
            &Arc::downgrade(&image),
            4,
            &AtomicBool::new(false),
            &stats,
        );
        assert_eq!(stats.reads.load(SeqCst), 8);
    }

    /// A converted image (ext4 in one layer) holding `files`.
    fn ext4_image(t: &Path, files: &[(&str, Vec<u8>)]) -> Arc<ImageStack> {
        let lsmt = crate::testing::ext4_layer(t, files);
        let src: Arc<dyn ReadAt> = Arc::new(ovbd_format::FileSource::open(&lsmt).unwrap());
        let lsmt = ovbd_format::LsmtFile::open(src).unwrap();
        Arc::new(ImageStack::read_only(
            ovbd_format::LayerStack::new(vec![lsmt]).unwrap(),
        ))
    }

    #[test]
    fn priority_list_resolves_files_through_the_ext4() {
        let t = tempfile::tempdir().unwrap();
        let big = random_bytes(300 * 1024 + 17, 5);
        let small = random_bytes(10 * 1024 + 3, 6);
        let other = random_bytes(5000, 7);
        let image = ext4_image(
            t.path(),
            &[
                ("app/big", big.clone()),
                ("app/sub/x", small.clone()),
                ("etc/other", other.clone()),
            ],
        );
        let list = b"/app/\n  /etc/missing \n/etc/other\nbad path!\n";
        let reads = plan(list, "list", &image, &AtomicBool::new(false)).unwrap();
        assert!(reads
            .iter()
            .all(|r| r.target == Target::Disk && r.len <= MAX_IO_SIZE));
        let total: u64 = reads.iter().map(|r| r.len).sum();
        let padded = |n: usize| (n as u64).div_ceil(512) * 512;
        assert_eq!(
            total,
            padded(big.len()) + padded(small.len()) + padded(other.len())
        );
        // The ranges hold the files' bytes, file by file (the directory's in its own order).
        let mut got = Vec::new();
        for r in &reads {
            let mut buf = vec![0u8; r.len as usize];
            image.lower().unwrap().read(&mut buf, r.offset).unwrap();
            got.extend_from_slice(&buf);
        }
        let pad = |d: &[u8], out: &mut Vec<u8>, at: usize| {
            assert_eq!(&out[at..at + d.len()], d);
            at + padded(d.len()) as usize
        };
        let dir_first_big = got[..big.len()] == big[..];
        let at = if dir_first_big {
            let at = pad(&big, &mut got, 0);
            pad(&small, &mut got, at)
        } else {
            let at = pad(&small, &mut got, 0);
            pad(&big, &mut got, at)
        };
        pad(&other, &mut got, at);
        // A list naming nothing the image has plans nothing, and the ext4 is left as it was.
        let none = plan(b"/nothing/here\n", "list", &image, &AtomicBool::new(false)).unwrap();
        assert!(none.is_empty());
    }
}
