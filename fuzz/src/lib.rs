//! Shared helpers for the fuzz targets: every target parses, then reads everything the parser
//! exposes, within a byte budget so that no input can make one run allocate or read gigabytes.

use ovbd_format::source::read_exact_at;
use ovbd_format::{Error, LayerStack, LsmtFile, ReadAt};

/// The name every fuzzed source carries; errors about it must mention it.
pub const NAME: &str = "fuzz-input";

/// At most this many bytes are read from one disk or decompressed stream per run.
pub const BUDGET: u64 = 2 << 20;

/// Errors that come from reading the input must name it (the crate promises file + offset).
pub fn check_err(e: &Error) {
    if let Error::InvalidArgument(_) = e {
        return;
    }
    let msg = e.to_string();
    assert!(msg.contains(NAME), "error does not name the input: {msg}");
}

/// Reads `[0, min(size, budget))` of a source in uneven chunks, then its last bytes.
pub fn read_source(src: &dyn ReadAt, budget: u64) -> Result<(), Error> {
    let size = src.size();
    let mut buf = vec![0u8; 70_001];
    let mut pos = 0u64;
    let end = size.min(budget);
    while pos < end {
        let n = (end - pos).min(buf.len() as u64) as usize;
        read_exact_at(src, &mut buf[..n], pos)?;
        pos += n as u64;
    }
    if size > end {
        let n = (size - end).min(4099) as usize;
        read_exact_at(src, &mut buf[..n], size - n as u64)?;
    }
    Ok(())
}

/// Stacks one layer and reads, within the budget: the start of the disk, every mapped range
/// (zeroed ones must read as zeros), and the last sectors of the virtual disk.
pub fn read_lsmt(lsmt: LsmtFile, budget: u64) -> Result<(), Error> {
    let stack = LayerStack::new(vec![lsmt])?;
    let vsize = stack.virtual_size();
    let mut left = budget;
    let mut buf = vec![0u8; 64 << 10];
    // The first sectors, as a kernel partition scan would.
    let head = vsize.min(36 << 10) / 512 * 512;
    stack.read(&mut buf[..head as usize], 0)?;
    left = left.saturating_sub(head);
    let segs = stack.index().segments().to_vec();
    for s in segs {
        if left == 0 {
            break;
        }
        let (mut pos, end) = (s.offset * 512, s.end() * 512);
        while pos < end && left > 0 {
            let n = (end - pos).min(buf.len() as u64).min(left) as usize / 512 * 512;
            if n == 0 {
                break;
            }
            stack.read(&mut buf[..n], pos)?;
            if s.zeroed {
                assert!(
                    buf[..n].iter().all(|&b| b == 0),
                    "zeroed mapping read non-zero"
                );
            }
            pos += n as u64;
            left -= n as u64;
        }
    }
    // The end of the disk: holes past every mapping, or the last mapping.
    if vsize >= 4096 {
        stack.read(&mut buf[..4096], vsize / 512 * 512 - 4096)?;
    }
    Ok(())
}

/// What a [`Liar`] claims to hold: 1 TiB.
pub const LIAR_SIZE: u64 = 1 << 40;

/// A source whose size claims more than it holds, as a blob whose registry or manifest lies
/// about its length: `inner` but for its last `tail` bytes at 0, those at the claimed end
/// (where trailers are read), and nothing in between (reads there find the end of the data).
pub struct Liar {
    inner: std::sync::Arc<dyn ReadAt>,
    tail: u64,
}

impl Liar {
    pub fn new(inner: std::sync::Arc<dyn ReadAt>, tail: u64) -> Liar {
        let tail = tail.min(inner.size());
        Liar { inner, tail }
    }

    /// The input bytes, lying.
    pub fn bytes(data: &[u8], tail: u64) -> Liar {
        Liar::new(
            std::sync::Arc::new(ovbd_format::MemSource::new(data.to_vec(), NAME)),
            tail,
        )
    }
}

impl ReadAt for Liar {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let head = self.inner.size() - self.tail;
        if offset < head {
            let n = (buf.len() as u64).min(head - offset) as usize;
            return self.inner.read_at(&mut buf[..n], offset);
        }
        let tail_at = LIAR_SIZE - self.tail;
        if offset >= tail_at && offset < LIAR_SIZE {
            return self.inner.read_at(buf, head + (offset - tail_at));
        }
        Ok(0)
    }
    fn size(&self) -> u64 {
        LIAR_SIZE
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
}

/// This process's scratch directory in `/dev/shm` (else the temp dir), made empty on the
/// first call (named for `target` then): libFuzzer exits without running destructors, so a
/// target reuses one directory per run.
pub fn scratch_dir(target: &str) -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            std::path::PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("ovbd-fuzz-{target}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("creating the fuzz scratch directory");
        d
    })
}

// ------------------------------------------------------------------------- oci_layout input

/// Splits an `oci_layout` input into its parts: `index.json`, then blobs 1, 2, ... (at most
/// 9), separated by NUL bytes.
pub fn layout_parts(data: &[u8]) -> Vec<Vec<u8>> {
    data.split(|&b| b == 0)
        .take(10)
        .map(<[u8]>::to_vec)
        .collect()
}

/// Writes an OCI layout from `parts` (see [`layout_parts`]) into `dir`. In each part, `@N`
/// becomes `sha256:<digest of part N>` and `#N` its length, for N after the part itself (blob
/// N is finished first), so a fuzzed index or manifest can point at real blobs.
pub fn write_layout(dir: &std::path::Path, parts: &[Vec<u8>]) -> std::io::Result<()> {
    use sha2::{Digest, Sha256};
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut done: Vec<Option<(String, usize)>> = vec![None; parts.len()];
    for i in (0..parts.len()).rev() {
        let mut out = Vec::with_capacity(parts[i].len());
        let p = &parts[i];
        let mut k = 0;
        while k < p.len() {
            let target = p
                .get(k + 1)
                .filter(|c| c.is_ascii_digit())
                .map(|c| (c - b'0') as usize)
                .filter(|&n| n > i)
                .and_then(|n| done.get(n).cloned().flatten());
            match (p[k], target) {
                (b'@', Some((hex, _))) => out.extend_from_slice(format!("sha256:{hex}").as_bytes()),
                (b'#', Some((_, len))) => out.extend_from_slice(len.to_string().as_bytes()),
                (c, _) => {
                    out.push(c);
                    k += 1;
                    continue;
                }
            }
            k += 2;
        }
        if i == 0 {
            std::fs::write(dir.join("index.json"), &out)?;
        } else {
            let hex: String = Sha256::digest(&out)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            std::fs::write(blobs.join(&hex), &out)?;
            done[i] = Some((hex, out.len()));
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------ block_cache input

/// The digests whose cache files a `block_cache` input writes: kinds 0/1 are the map and
/// data file of the first (an entry of [`CACHE_ORIGIN`]), 2/3 of the second (a verified
/// entry) and 5 its block hashes (`.sums`). Both entries are of [`CACHE_BLOB_SIZE`] bytes.
pub const CACHE_DIGESTS: [&str; 2] = [
    "sha256:abababababababababababababababababababababababababababababababab",
    "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
];

/// The registry repository whose entry kinds 0/1 make.
pub const CACHE_ORIGIN: &str = "127.0.0.1:5000/fuzz";

/// The blob size in the names of the entries' files (a record of another size is dropped).
pub const CACHE_BLOB_SIZE: u64 = 600 << 10;

/// The largest file a `block_cache` input makes (sparse), and the most it writes in one.
pub const CACHE_MAX_FILE: u64 = 64 << 20;

/// One file of a `block_cache` input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheFile {
    /// 0..=3 and 5, see [`CACHE_DIGESTS`]; other values: a stray file `.tmp-<kind>` /
    /// `junk.<kind>` next to the first entry's files.
    pub kind: u8,
    /// Recompute the CRC32C of the 4 KiB record written at `write_at` (`crc32c` of its first
    /// 4092 bytes, stored LE in the last 4), so the fuzzer gets past the checksum.
    pub fix_crc: bool,
    pub len: u64,
    pub write_at: u64,
    pub bytes: Vec<u8>,
}

/// `block_cache` input: per file, a kind byte (bit 7: fix the CRC), then u32 LE length,
/// u32 LE write offset, u32 LE byte count and the bytes.
pub fn cache_files(mut data: &[u8]) -> Vec<CacheFile> {
    let mut out = Vec::new();
    while data.len() >= 13 && out.len() < 8 {
        let u32_at =
            |o: usize| u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
        let (kind, len, at, n) = (data[0], u32_at(1), u32_at(5), u32_at(9) as usize);
        let n = n.min(data.len() - 13);
        out.push(CacheFile {
            kind: kind & 0x7f,
            fix_crc: kind & 0x80 != 0,
            len: len as u64 % (CACHE_MAX_FILE + 1),
            write_at: at as u64 % (CACHE_MAX_FILE + 1),
            bytes: data[13..13 + n].to_vec(),
        });
        data = &data[13 + n..];
    }
    out
}

/// The inverse of [`cache_files`] (for the seeds).
pub fn encode_cache_files(files: &[CacheFile]) -> Vec<u8> {
    let mut v = Vec::new();
    for f in files {
        v.push(f.kind | if f.fix_crc { 0x80 } else { 0 });
        v.extend_from_slice(&(f.len as u32).to_le_bytes());
        v.extend_from_slice(&(f.write_at as u32).to_le_bytes());
        v.extend_from_slice(&(f.bytes.len() as u32).to_le_bytes());
        v.extend_from_slice(&f.bytes);
    }
    v
}

/// Writes `files` into a cache directory `dir` (where the cache keeps them).
pub fn write_cache_files(dir: &std::path::Path, files: &[CacheFile]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let paths = |i: usize| {
        let origin = (i == 0).then_some(CACHE_ORIGIN);
        ovbd::fuzzing::block_cache_paths(dir, origin, CACHE_DIGESTS[i], CACHE_BLOB_SIZE)
    };
    let (first_data, first_map, _) = paths(0);
    let (second_data, second_map, second_sums) = paths(1);
    for f in files {
        let path = match f.kind {
            0 => first_map.clone(),
            1 => first_data.clone(),
            2 => second_map.clone(),
            3 => second_data.clone(),
            5 => second_sums.clone(),
            k => first_map.with_file_name(if k % 2 == 0 {
                format!(".tmp-{k}")
            } else {
                format!("junk.{k}")
            }),
        };
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(f.len)?;
        file.write_all_at(&f.bytes, f.write_at)?;
        if f.fix_crc {
            let mut rec = vec![0u8; 4096];
            let got = file.read_at(&mut rec, f.write_at)?;
            if got == rec.len() {
                let crc = ovbd_format::crc::crc32c_raw(0, &rec[..4092]);
                file.write_all_at(&crc.to_le_bytes(), f.write_at + 4092)?;
            }
        }
    }
    Ok(())
}
