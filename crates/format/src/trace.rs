//! Upstream overlaybd's prefetch inputs (`src/prefetch.{h,cpp}` of containerd/overlaybd, read at
//! 063821fc; spec §3.1): the binary I/O trace and the "priority list" of paths.
//!
//! Both arrive as the file `trace` of an *acceleration layer*: an uncompressed tar (Go
//! `archive/tar`, one ustar entry `trace`, mode 0444) pushed as the image's top layer with the
//! annotation `containerd.io/snapshot/overlaybd/acceleration-layer: yes` (plus the usual
//! `overlaybd/blob-digest`, `blob-size`, `version`). The device config then has
//! `"accelerationLayer": true`: its last lower is that layer (only a `dir` holding `trace`) and is
//! not part of the disk. Which of the two the file is: binary if it starts with the magic,
//! else a priority list.
//!
//! Binary trace, all little-endian (x86-64 C structs, so with their padding):
//! - header, 24 bytes: u32 magic `0xC2EF1820` (zlib CRC-32 of "Container Image Trace Format"),
//!   4 padding bytes, u64 `data_size` (bytes of records), u32 checksum, 4 padding bytes;
//! - records, 24 bytes each: u8 op (`R` read, `W` write), 3 padding bytes, u32 `layer_index`
//!   (0 = the bottom lower), u64 `count` (bytes), i64 `offset` — a range of that layer's
//!   decompressed LSMT file (recorded above the tar and ZFile);
//! - checksum: raw CRC-32C (no inversions) chained from 0 over each whole 24-byte record,
//!   padding included (upstream checksums the struct's bytes as they lie in memory);
//! - the file is exactly `24 + data_size` bytes. Upstream replays `R` records only, each with
//!   one `pread` of the layer file (at most 1 MiB), `prefetchConfig.concurrency` (16) at once.
//!
//! Priority list: text of at most 64 KiB, one path per line; spaces trimmed at both ends; empty
//! lines and lines that are not plain paths (`[A-Za-z0-9_.-]` names separated by `/`) are
//! skipped; a path ending in `/` names a directory whose files (recursively) are all taken.
//! Upstream resolves each file through the ext4 (or EROFS) on the image's lowers into its
//! extents, up to the file size rounded up to 512, read from the lower image in 1 MiB pieces.

use crate::crc::crc32c_raw;
use crate::source::ReadAt;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// `magic` of a binary trace.
pub const TRACE_MAGIC: u32 = 0xC2EF_1820;
pub const HEADER_SIZE: usize = 24;
pub const RECORD_SIZE: usize = 24;
/// Largest priority list upstream reads.
pub const MAX_PRIORITY_LIST: usize = 64 * 1024;
/// Largest read of one replayed record (upstream's buffer).
pub const MAX_IO_SIZE: u64 = 1024 * 1024;
/// Largest trace taken (about 11 M records): the records are held in memory.
pub const MAX_TRACE_SIZE: u64 = 256 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceOp {
    Read,
    Write,
}

impl TraceOp {
    pub fn byte(self) -> u8 {
        match self {
            TraceOp::Read => b'R',
            TraceOp::Write => b'W',
        }
    }
}

/// One recorded I/O of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceRecord {
    pub op: TraceOp,
    /// 0 = the bottom lower.
    pub layer_index: u32,
    pub count: u64,
    pub offset: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TraceError {
    #[error("{file}: {what} (at offset {offset})")]
    Corrupt {
        file: String,
        offset: u64,
        what: String,
    },
    #[error("{file}: priority list of {size} bytes is larger than {MAX_PRIORITY_LIST} bytes")]
    ListTooLarge { file: String, size: usize },
}

fn corrupt(file: &str, offset: u64, what: impl Into<String>) -> TraceError {
    TraceError::Corrupt {
        file: file.to_string(),
        offset,
        what: what.into(),
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Whether `data` is a binary trace (starts with the magic), as upstream decides.
pub fn is_binary_trace(data: &[u8]) -> bool {
    data.len() >= 4 && u32_at(data, 0) == TRACE_MAGIC
}

/// Parses a binary trace; `file` names it in errors. Any mismatch (size, checksum, op, a range
/// past the end of 64-bit offsets) rejects the whole trace, as upstream does: a partly trusted
/// trace would be replayed partly wrong.
pub fn parse_trace(data: &[u8], file: &str) -> Result<Vec<TraceRecord>, TraceError> {
    if data.len() < HEADER_SIZE {
        return Err(corrupt(
            file,
            data.len() as u64,
            format!(
                "trace of {} bytes is shorter than its {HEADER_SIZE}-byte header",
                data.len()
            ),
        ));
    }
    let magic = u32_at(data, 0);
    if magic != TRACE_MAGIC {
        return Err(corrupt(
            file,
            0,
            format!("magic {magic:#010x} is not the trace magic {TRACE_MAGIC:#010x}"),
        ));
    }
    let data_size = u64_at(data, 8);
    let stored = u32_at(data, 16);
    let body = (data.len() - HEADER_SIZE) as u64;
    if data_size != body {
        return Err(corrupt(
            file,
            8,
            format!("data_size {data_size} but {body} bytes follow the header"),
        ));
    }
    if data_size > MAX_TRACE_SIZE {
        return Err(corrupt(
            file,
            8,
            format!("data_size {data_size} is past the limit of {MAX_TRACE_SIZE} bytes"),
        ));
    }
    if !body.is_multiple_of(RECORD_SIZE as u64) {
        return Err(corrupt(
            file,
            8,
            format!("data_size {data_size} is not a whole number of {RECORD_SIZE}-byte records"),
        ));
    }
    let records = &data[HEADER_SIZE..];
    let sum = records.chunks_exact(RECORD_SIZE).fold(0u32, crc32c_raw);
    if sum != stored {
        return Err(corrupt(
            file,
            16,
            format!("checksum {stored:#010x} but the records sum to {sum:#010x}"),
        ));
    }
    let mut out = Vec::with_capacity(records.len() / RECORD_SIZE);
    for (i, r) in records.chunks_exact(RECORD_SIZE).enumerate() {
        let at = (HEADER_SIZE + i * RECORD_SIZE) as u64;
        let op = match r[0] {
            b'R' => TraceOp::Read,
            b'W' => TraceOp::Write,
            b => {
                return Err(corrupt(
                    file,
                    at,
                    format!("record {i}: op {b:#04x} is neither 'R' nor 'W'"),
                ))
            }
        };
        let count = u64_at(r, 8);
        let offset = u64_at(r, 16);
        if offset > i64::MAX as u64
            || offset
                .checked_add(count)
                .is_none_or(|e| e > i64::MAX as u64)
        {
            return Err(corrupt(
                file,
                at + 8,
                format!(
                    "record {i}: {count} bytes at offset {} do not fit a file",
                    offset as i64
                ),
            ));
        }
        out.push(TraceRecord {
            op,
            layer_index: u32_at(r, 4),
            count,
            offset,
        });
    }
    Ok(out)
}

/// Encodes records as upstream's recorder dumps them (padding zero).
pub fn encode_trace(records: &[TraceRecord]) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_SIZE];
    let mut sum = 0u32;
    for r in records {
        let mut rec = [0u8; RECORD_SIZE];
        rec[0] = r.op.byte();
        rec[4..8].copy_from_slice(&r.layer_index.to_le_bytes());
        rec[8..16].copy_from_slice(&r.count.to_le_bytes());
        rec[16..24].copy_from_slice(&r.offset.to_le_bytes());
        sum = crc32c_raw(sum, &rec);
        out.extend_from_slice(&rec);
    }
    out[0..4].copy_from_slice(&TRACE_MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&((records.len() * RECORD_SIZE) as u64).to_le_bytes());
    out[16..20].copy_from_slice(&sum.to_le_bytes());
    out
}

/// Records the reads of an image's lowers as trace records, in the order they are made (what
/// upstream's recorder writes when `recordTracePath` names an empty file): wrap each lower's
/// decompressed LSMT file with [`TraceRecorder::wrap`], then [`start`](Self::start) and
/// [`stop`](Self::stop) around the run to record.
#[derive(Default)]
pub struct TraceRecorder {
    on: AtomicBool,
    records: Mutex<Vec<TraceRecord>>,
    /// Records dropped past [`MAX_TRACE_SIZE`].
    dropped: std::sync::atomic::AtomicU64,
}

impl TraceRecorder {
    pub fn new() -> Arc<TraceRecorder> {
        Arc::new(TraceRecorder::default())
    }

    /// `src` (layer `layer_index`'s decompressed LSMT file, 0 = the bottom lower), its reads
    /// recorded while recording is on.
    pub fn wrap(self: &Arc<Self>, layer_index: u32, src: Arc<dyn ReadAt>) -> Arc<dyn ReadAt> {
        Arc::new(RecordedSource {
            inner: src,
            layer_index,
            recorder: self.clone(),
        })
    }

    pub fn start(&self) {
        self.on.store(true, Ordering::SeqCst);
    }

    /// Stops recording; returns the records and how many were dropped past the size cap.
    pub fn stop(&self) -> (Vec<TraceRecord>, u64) {
        self.on.store(false, Ordering::SeqCst);
        let records = std::mem::take(&mut *self.records.lock().unwrap_or_else(|p| p.into_inner()));
        (records, self.dropped.swap(0, Ordering::SeqCst))
    }

    /// Records a read, in pieces of at most [`MAX_IO_SIZE`]: a replay (upstream's too) reads
    /// each record with one read of at most that size.
    fn record(&self, layer_index: u32, offset: u64, count: usize) {
        if count == 0 || !self.on.load(Ordering::Relaxed) {
            return;
        }
        let mut v = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let (mut at, end) = (offset, offset.saturating_add(count as u64));
        while at < end {
            if ((v.len() + 1) * RECORD_SIZE) as u64 > MAX_TRACE_SIZE {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let n = (end - at).min(MAX_IO_SIZE);
            v.push(TraceRecord {
                op: TraceOp::Read,
                layer_index,
                count: n,
                offset: at,
            });
            at += n;
        }
    }
}

/// A lower whose reads go to a [`TraceRecorder`].
struct RecordedSource {
    inner: Arc<dyn ReadAt>,
    layer_index: u32,
    recorder: Arc<TraceRecorder>,
}

impl ReadAt for RecordedSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let n = self.inner.read_at(buf, offset)?;
        self.recorder.record(self.layer_index, offset, n);
        Ok(n)
    }

    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let n = self.inner.read_at_nowait(buf, offset)?;
        self.recorder.record(self.layer_index, offset, n);
        Ok(n)
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn evict(&self, offset: u64, len: u64) {
        self.inner.evict(offset, len)
    }

    /// None: a reader moving the bytes itself (splice) would bypass the recording.
    fn local_file(&self) -> Option<(&File, u64)> {
        None
    }
}

/// One entry of a priority list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListEntry {
    File(String),
    /// Every file under this directory (the line ended in `/` or `*`).
    Dir(String),
}

/// Whether a trimmed line is a path upstream accepts (its regular expression, as a function).
fn is_plain_path(line: &str) -> bool {
    let rest = line.strip_prefix('/').unwrap_or(line);
    if rest.is_empty() || rest == "." || rest == ".." {
        return true;
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    !rest.is_empty()
        && rest.split('/').all(|name| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
        })
}

/// Parses a priority list as upstream reads it (see the module comment).
pub fn parse_priority_list(data: &[u8], file: &str) -> Result<Vec<ListEntry>, TraceError> {
    if data.len() > MAX_PRIORITY_LIST {
        return Err(TraceError::ListTooLarge {
            file: file.to_string(),
            size: data.len(),
        });
    }
    let text = String::from_utf8_lossy(data);
    let mut out = Vec::new();
    // Lines end at '\n' only (a '\r' stays and fails the pattern, as with getline).
    for line in text.split('\n') {
        let line = line.trim_matches(' ');
        if line.is_empty() {
            continue;
        }
        // Upstream also takes a line ending in '*' as a directory, but such a line never
        // passes its pattern: it is skipped there as here.
        if !is_plain_path(line) {
            continue;
        }
        if line.ends_with('/') {
            out.push(ListEntry::Dir(line.to_string()));
        } else {
            out.push(ListEntry::File(line.to_string()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_recorder_records_reads_while_on_in_order_and_round_trips() {
        let rec = TraceRecorder::new();
        let a = rec.wrap(0, Arc::new(crate::MemSource::new(vec![7u8; 8192], "a")));
        let b = rec.wrap(1, Arc::new(crate::MemSource::new(vec![9u8; 4096], "b")));
        let mut buf = [0u8; 512];
        a.read_at(&mut buf, 0).unwrap(); // before start: not recorded
        rec.start();
        b.read_at(&mut buf, 1024).unwrap();
        a.read_at(&mut buf, 7680).unwrap();
        assert_eq!(a.read_at(&mut buf, 8192).unwrap(), 0); // past the end: nothing read
        let (records, dropped) = rec.stop();
        a.read_at(&mut buf, 512).unwrap(); // after stop: not recorded
        assert_eq!(dropped, 0);
        let want = vec![
            TraceRecord {
                op: TraceOp::Read,
                layer_index: 1,
                count: 512,
                offset: 1024,
            },
            TraceRecord {
                op: TraceOp::Read,
                layer_index: 0,
                count: 512,
                offset: 7680,
            },
        ];
        assert_eq!(records, want);
        assert_eq!(parse_trace(&encode_trace(&records), "t").unwrap(), want);
        assert!(a.local_file().is_none());
        // A read larger than a replay's reads is recorded in pieces of that size.
        let big = rec.wrap(
            2,
            Arc::new(crate::MemSource::new(vec![1u8; 3 << 20], "big")),
        );
        rec.start();
        let mut buf = vec![0u8; (2 << 20) + 512];
        big.read_at(&mut buf, 4096).unwrap();
        let (records, _) = rec.stop();
        let pieces: Vec<(u64, u64)> = records.iter().map(|r| (r.offset, r.count)).collect();
        assert_eq!(
            pieces,
            vec![
                (4096, 1 << 20),
                (4096 + (1 << 20), 1 << 20),
                (4096 + (2 << 20), 512)
            ]
        );
    }
    use super::*;

    /// A trace laid out field by field from the C structs (not through `encode_trace`),
    /// padding filled with junk as uninitialised stack memory may hold.
    fn c_layout(records: &[(u8, u32, u64, i64)], padding: u8) -> Vec<u8> {
        let mut body = Vec::new();
        for &(op, layer, count, offset) in records {
            body.push(op);
            body.extend_from_slice(&[padding; 3]);
            body.extend_from_slice(&layer.to_le_bytes());
            body.extend_from_slice(&count.to_le_bytes());
            body.extend_from_slice(&offset.to_le_bytes());
        }
        let mut sum = 0u32;
        for r in body.chunks(24) {
            sum = !crc32c::crc32c_append(!sum, r);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&3_270_449_184u32.to_le_bytes());
        out.extend_from_slice(&[padding; 4]);
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&sum.to_le_bytes());
        out.extend_from_slice(&[padding; 4]);
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn magic_is_crc32_of_its_name() {
        // zlib's CRC-32 (reflected 0xEDB88320, inverted), computed here bit by bit.
        let mut c = !0u32;
        for &b in b"Container Image Trace Format" {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
            }
        }
        assert_eq!(!c, TRACE_MAGIC);
    }

    #[test]
    fn parses_upstream_layout_with_padding_junk() {
        let recs = [
            (b'R', 2, 4096, 1 << 20),
            (b'W', 0, 512, 0),
            (b'R', 1, 65536, 123_456),
        ];
        let bytes = c_layout(&recs, 0xAB);
        let got = parse_trace(&bytes, "t").unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[0],
            TraceRecord {
                op: TraceOp::Read,
                layer_index: 2,
                count: 4096,
                offset: 1 << 20
            }
        );
        assert_eq!(got[1].op, TraceOp::Write);
        assert_eq!(
            (got[2].layer_index, got[2].count, got[2].offset),
            (1, 65536, 123_456)
        );
        assert!(is_binary_trace(&bytes));
    }

    #[test]
    fn encoder_matches_upstream_layout() {
        let bytes = c_layout(&[(b'R', 7, 1000, 5000)], 0);
        let recs = parse_trace(&bytes, "t").unwrap();
        assert_eq!(encode_trace(&recs), bytes);
        assert_eq!(parse_trace(&encode_trace(&[]), "t").unwrap(), vec![]);
    }

    #[test]
    fn corrupt_traces_name_the_offset() {
        let good = c_layout(&[(b'R', 0, 4096, 0), (b'R', 0, 4096, 8192)], 0);
        let err = |b: &[u8]| match parse_trace(b, "trace").unwrap_err() {
            TraceError::Corrupt { offset, what, .. } => (offset, what),
            e => panic!("{e}"),
        };
        // A flipped record byte: the checksum (at 16) no longer matches.
        let mut b = good.clone();
        b[24 + 9] ^= 1;
        assert_eq!(err(&b).0, 16);
        // Truncated: data_size (at 8) disagrees with the length.
        assert_eq!(err(&good[..good.len() - 1]).0, 8);
        // Short and magic-less files.
        assert_eq!(err(&good[..10]).0, 10);
        let mut b = good.clone();
        b[0] ^= 1;
        assert_eq!(err(&b).0, 0);
        // A bad op with a correct checksum: named at its record.
        let b = c_layout(&[(b'R', 0, 1, 0), (b'X', 0, 1, 0)], 0);
        assert_eq!(
            err(&b),
            (48, "record 1: op 0x58 is neither 'R' nor 'W'".into())
        );
        // A negative offset.
        let b = c_layout(&[(b'R', 0, 1, -4096)], 0);
        assert_eq!(err(&b).0, 32);
        // data_size not a multiple of 24 (header and length agree).
        let mut b = c_layout(&[(b'R', 0, 1, 0)], 0);
        b.push(0);
        b[8] = 25;
        assert_eq!(err(&b).0, 8);
    }

    /// fuzz/seeds/trace/two_layers.trace was written by a Python generator (`struct.pack`
    /// of the C structs, padding 0xAB, a bitwise CRC-32C), not by this crate.
    #[test]
    fn parses_the_python_made_seed() {
        let bytes = include_bytes!("../../../fuzz/seeds/trace/two_layers.trace");
        let got = parse_trace(bytes, "seed").unwrap();
        let r = |op, layer_index, count, offset| TraceRecord {
            op,
            layer_index,
            count,
            offset,
        };
        assert_eq!(
            got,
            vec![
                r(TraceOp::Read, 0, 4096, 512),
                r(TraceOp::Read, 1, 65536, 1 << 20),
                r(TraceOp::Write, 0, 512, 0)
            ]
        );
    }

    #[test]
    fn priority_list_as_upstream_reads_it() {
        let text = b"  /usr/bin/python3  \n\n/etc/\nnot a path!\n/opt/app/*\nrel/path\n/a//b\n";
        let got = parse_priority_list(text, "l").unwrap();
        assert_eq!(
            got,
            vec![
                ListEntry::File("/usr/bin/python3".into()),
                ListEntry::Dir("/etc/".into()),
                ListEntry::File("rel/path".into()),
            ]
        );
        let big = vec![b'a'; MAX_PRIORITY_LIST + 1];
        assert!(matches!(
            parse_priority_list(&big, "l"),
            Err(TraceError::ListTooLarge { .. })
        ));
        assert!(!is_binary_trace(text));
    }
}
