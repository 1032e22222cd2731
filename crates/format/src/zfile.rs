//! ZFile: block-compressed files with a jump table and per-block CRCs (spec §2.1–2.4).

use crate::crc::{crc32c_raw, BLOCK_CRC_SALT};
use crate::error::{Error, Result};
use crate::source::{read_exact_at, read_exact_at_with, Blocking, ReadAt};
use std::cell::RefCell;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::raw::{c_char, c_int};
use std::sync::Arc;

pub const HEADER_SIZE: u64 = 512;
pub const STRUCT_SIZE: u32 = 96;
pub const MAGIC0: [u8; 8] = *b"ZFile\0\x01\0";
pub const MAGIC1: [u8; 16] = *b"tuji.yyf@Alibaba";

pub const FLAG_HEADER: u64 = 1;
pub const FLAG_DATA: u64 = 2;
pub const FLAG_SEALED: u64 = 4;
/// The header holds the final index information (no need to read the trailer).
pub const FLAG_HEADER_OVERWRITE: u64 = 8;
pub const FLAG_DIGEST: u64 = 0x10;
pub const FLAG_INDEX_COMPRESSED: u64 = 0x20;
/// Old writers left stack garbage in the high bits; only these mean anything.
const FLAG_MASK: u64 = 0x3f;

pub const MIN_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 65536;
/// Jump-table entries, at most: the kernel module's 1 GiB table, 1 TiB of 4 KiB blocks in one
/// layer. Upstream's user space allows 1e9 (12 GB of tables here); no real image comes near.
pub const MAX_INDEX_SIZE: u64 = 1 << 28;
/// The jump table is read and checked this many entries at a time, so memory follows the bytes
/// that actually arrive, not the count a header claims.
const TABLE_CHUNK: u64 = 64 * 1024;
/// Compressed bytes fetched from the source in one read, at most (unless one block is larger).
const MAX_READ: u64 = 64 * 1024;
/// A block whose CRC fails is read again this many times before the read fails.
const CRC_RETRIES: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Lz4,
    Zstd,
}

impl Algorithm {
    pub fn code(self) -> u8 {
        match self {
            Algorithm::Lz4 => 1,
            Algorithm::Zstd => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Lz4 => "lz4",
            Algorithm::Zstd => "zstd",
        }
    }
}

/// The 96-byte header/trailer struct in its 512-byte slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZFileHeader {
    pub digest: u32,
    pub flags: u64,
    pub index_offset: u64,
    pub index_size: u64,
    pub original_file_size: u64,
    pub index_crc: u32,
    pub block_size: u32,
    pub algo: u8,
    pub level: u8,
    pub use_dict: u8,
    pub dict_size: u32,
    pub verify: bool,
}

impl ZFileHeader {
    pub fn has(&self, flag: u64) -> bool {
        self.flags & FLAG_MASK & flag != 0
    }

    /// Whether 512 bytes start with the ZFile magic and have the header flag set.
    pub fn is_zfile_header(b: &[u8]) -> bool {
        b.len() >= 40 && b[..8] == MAGIC0 && b[8..24] == MAGIC1 && b[32] & FLAG_HEADER as u8 != 0
    }

    /// Parses a 512-byte slot at `at` of `file`; checks the magic and, when flagged, the digest.
    pub fn decode(b: &[u8], file: &str, at: u64) -> Result<ZFileHeader> {
        if b.len() < HEADER_SIZE as usize || b[..8] != MAGIC0 || b[8..24] != MAGIC1 {
            return Err(Error::corrupt(
                file,
                at,
                "not a ZFile header/trailer: bad magic",
            ));
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let h = ZFileHeader {
            digest: u32_at(28),
            flags: u64_at(32),
            index_offset: u64_at(40),
            index_size: u64_at(48),
            original_file_size: u64_at(56),
            index_crc: u32_at(64),
            block_size: u32_at(72),
            algo: b[76],
            level: b[77],
            use_dict: b[78],
            dict_size: u32_at(84),
            verify: b[88] != 0,
        };
        if h.has(FLAG_DIGEST) {
            let mut copy = [0u8; HEADER_SIZE as usize];
            copy.copy_from_slice(&b[..HEADER_SIZE as usize]);
            copy[28..32].fill(0);
            let want = crc32c_raw(0, &copy);
            if want != h.digest {
                return Err(Error::corrupt(
                    file,
                    at + 28,
                    format!(
                        "ZFile header digest {:#010x} does not match its content ({want:#010x})",
                        h.digest
                    ),
                ));
            }
        }
        Ok(h)
    }

    /// Encodes into a 512-byte slot; the digest is computed when the digest flag is set.
    pub fn encode(&self) -> [u8; HEADER_SIZE as usize] {
        let mut b = [0u8; HEADER_SIZE as usize];
        b[..8].copy_from_slice(&MAGIC0);
        b[8..24].copy_from_slice(&MAGIC1);
        b[24..28].copy_from_slice(&STRUCT_SIZE.to_le_bytes());
        b[32..40].copy_from_slice(&self.flags.to_le_bytes());
        b[40..48].copy_from_slice(&self.index_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.index_size.to_le_bytes());
        b[56..64].copy_from_slice(&self.original_file_size.to_le_bytes());
        b[64..68].copy_from_slice(&self.index_crc.to_le_bytes());
        b[72..76].copy_from_slice(&self.block_size.to_le_bytes());
        b[76] = self.algo;
        b[77] = self.level;
        b[78] = self.use_dict;
        b[84..88].copy_from_slice(&self.dict_size.to_le_bytes());
        b[88] = self.verify as u8;
        if self.flags & FLAG_DIGEST != 0 {
            let d = crc32c_raw(0, &b);
            b[28..32].copy_from_slice(&d.to_le_bytes());
        }
        b
    }
}

/// Random-access reader of a ZFile: reads return the original (decompressed) bytes.
pub struct ZFileReader {
    src: Arc<dyn ReadAt>,
    /// The header or trailer that holds the final index information.
    pub info: ZFileHeader,
    algo: Algorithm,
    /// Start of block i is `starts[i]`; `starts[n]` is the end of the last block.
    starts: Vec<u64>,
}

impl ZFileReader {
    pub fn open(src: Arc<dyn ReadAt>) -> Result<ZFileReader> {
        let name = src.name().to_string();
        let size = src.size();
        if size < 2 * HEADER_SIZE {
            return Err(Error::corrupt(
                &name,
                0,
                format!("too small for a ZFile: {size} bytes"),
            ));
        }
        let mut b = [0u8; HEADER_SIZE as usize];
        read_exact_at(&*src, &mut b, 0)?;
        let header = ZFileHeader::decode(&b, &name, 0)?;
        if !header.has(FLAG_HEADER) {
            return Err(Error::corrupt(
                &name,
                32,
                "ZFile header lacks the header flag",
            ));
        }
        let toff = size - HEADER_SIZE;
        let (info, info_at) = if header.has(FLAG_HEADER_OVERWRITE) {
            (header, 0)
        } else {
            read_exact_at(&*src, &mut b, toff)?;
            let t = ZFileHeader::decode(&b, &name, toff).map_err(|e| match e {
                Error::Corrupt { what, .. } if what.contains("magic") => {
                    Error::corrupt(&name, toff, "no ZFile trailer (truncated or unsealed file)")
                }
                e => e,
            })?;
            if t.has(FLAG_HEADER) {
                return Err(Error::corrupt(
                    &name,
                    toff + 32,
                    "ZFile trailer has the header flag set",
                ));
            }
            (t, toff)
        };
        let bad = |off: u64, what: String| Error::corrupt(&name, info_at + off, what);
        let algo = match info.algo {
            1 => Algorithm::Lz4,
            2 => Algorithm::Zstd,
            0 => {
                return Err(Error::Unsupported {
                    file: name,
                    what: "mini-LZO compression".into(),
                })
            }
            a => return Err(bad(76, format!("unknown compression algorithm {a}"))),
        };
        if !info.block_size.is_power_of_two()
            || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&info.block_size)
        {
            return Err(bad(
                72,
                format!(
                    "block size {} is not a power of two in 4..64 KiB",
                    info.block_size
                ),
            ));
        }
        if info.dict_size != 0 || info.use_dict != 0 {
            return Err(Error::Unsupported {
                file: name,
                what: "compression dictionaries".into(),
            });
        }
        if info.has(FLAG_INDEX_COMPRESSED) {
            return Err(Error::Unsupported {
                file: name,
                what: "compressed jump table".into(),
            });
        }
        let bs = info.block_size as u64;
        if info.index_size != info.original_file_size.div_ceil(bs) {
            return Err(bad(
                48,
                format!(
                    "jump table of {} entries does not match the original size {} in {bs}-byte blocks",
                    info.index_size, info.original_file_size
                ),
            ));
        }
        if info.index_size > MAX_INDEX_SIZE {
            return Err(bad(
                48,
                format!(
                    "jump table of {} entries exceeds the limit of {MAX_INDEX_SIZE}",
                    info.index_size
                ),
            ));
        }
        let table_end = info.index_offset.checked_add(info.index_size * 4);
        if info.index_offset < HEADER_SIZE || table_end.is_none_or(|e| e > toff) {
            return Err(bad(
                40,
                format!(
                    "jump table ({} entries at {}) does not fit before the trailer at {toff} (truncated?)",
                    info.index_size, info.index_offset
                ),
            ));
        }
        let min_len = if info.verify { 5 } else { 1 };
        // Every block takes at least min_len bytes between the header and the table.
        if info.index_size * min_len > info.index_offset - HEADER_SIZE {
            return Err(bad(
                48,
                format!(
                    "{} blocks of at least {min_len} bytes each do not fit between the header and the jump table at {}",
                    info.index_size, info.index_offset
                ),
            ));
        }
        let max_len = max_compressed(algo, info.block_size) + 4;
        let mut starts: Vec<u64> = Vec::new();
        let mut pos = HEADER_SIZE;
        starts.push(pos);
        let mut table = Vec::new();
        let mut crc = 0u32;
        // The first bad entry, reported once the CRC (if any) has been checked: a damaged
        // table should say so rather than blame one of its entries.
        let mut bad_entry: Option<Error> = None;
        let mut done = 0u64;
        while done < info.index_size {
            let n = (info.index_size - done).min(TABLE_CHUNK);
            table.resize(4 * n as usize, 0);
            read_exact_at(&*src, &mut table, info.index_offset + 4 * done).map_err(|e| {
                e.within(format_args!(
                    "jump table ({} entries at {})",
                    info.index_size, info.index_offset
                ))
            })?;
            crc = crc32c_raw(crc, &table);
            if bad_entry.is_none() {
                // Grown only by entries read, so a false count costs at most one chunk.
                starts.try_reserve(n as usize).map_err(|_| {
                    bad(
                        48,
                        format!("no memory for a jump table of {} entries", info.index_size),
                    )
                })?;
                for (k, e) in table.chunks_exact(4).enumerate() {
                    let i = done + k as u64;
                    let len = u32::from_le_bytes([e[0], e[1], e[2], e[3]]) as u64;
                    if len < min_len || len > max_len {
                        bad_entry = Some(Error::corrupt(
                            &name,
                            info.index_offset + 4 * i,
                            format!(
                                "jump table entry {i}: block length {len} outside [{min_len}, {max_len}]"
                            ),
                        ));
                        break;
                    }
                    pos += len;
                    starts.push(pos);
                }
            }
            if bad_entry.is_some() && !info.has(FLAG_DIGEST) {
                break;
            }
            done += n;
        }
        if info.has(FLAG_DIGEST) && crc != info.index_crc {
            return Err(bad(
                64,
                format!(
                    "jump table CRC {crc:#010x} does not match {:#010x}",
                    info.index_crc
                ),
            ));
        }
        if let Some(e) = bad_entry {
            return Err(e);
        }
        starts.shrink_to_fit();
        if pos > info.index_offset {
            return Err(bad(
                40,
                format!(
                    "blocks end at {pos}, past the jump table at {}",
                    info.index_offset
                ),
            ));
        }
        Ok(ZFileReader {
            src,
            info,
            algo,
            starts,
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algo
    }

    pub fn block_count(&self) -> u64 {
        self.info.index_size
    }

    /// Bytes of block `i` in the original file.
    fn block_len(&self, i: u64) -> usize {
        let bs = self.info.block_size as u64;
        (self.info.original_file_size - i * bs).min(bs) as usize
    }

    /// Reads, checks and decompresses blocks `first..=last` and copies `[offset, offset+len)` out.
    /// `blocking` goes to every read of the compressed source.
    fn read_blocks(&self, out: &mut [u8], offset: u64, blocking: Blocking) -> Result<()> {
        let bs = self.info.block_size as u64;
        let first = offset / bs;
        let last = (offset + out.len() as u64 - 1) / bs;
        SCRATCH.with(|cell| {
            let mut fallback = Scratch::default();
            let mut guard = cell.try_borrow_mut();
            let scratch = match guard.as_mut() {
                Ok(s) => &mut **s,
                Err(_) => &mut fallback,
            };
            let mut i = first;
            while i <= last {
                // One source read for a run of blocks of at most MAX_READ compressed bytes.
                let mut j = i + 1;
                while j <= last && self.starts[j as usize + 1] - self.starts[i as usize] <= MAX_READ
                {
                    j += 1;
                }
                let base = self.starts[i as usize];
                let run = (self.starts[j as usize] - base) as usize;
                // Grow only: shrinking and regrowing would zero-fill on every read.
                if scratch.compressed.len() < run {
                    scratch.compressed.resize(run, 0);
                }
                read_exact_at_with(&*self.src, &mut scratch.compressed[..run], base, blocking)?;
                for k in i..j {
                    let s = (self.starts[k as usize] - base) as usize;
                    let e = (self.starts[k as usize + 1] - base) as usize;
                    self.check_block(&mut scratch.compressed[s..e], k, blocking)?;
                    let data_len = if self.info.verify { e - s - 4 } else { e - s };
                    let blen = self.block_len(k);
                    let bstart = k * bs;
                    // Copy out the part of this block inside the request.
                    let lo = offset.max(bstart);
                    let hi = (offset + out.len() as u64).min(bstart + blen as u64);
                    let dst = &mut out[(lo - offset) as usize..(hi - offset) as usize];
                    let src = &scratch.compressed[s..s + data_len];
                    if lo == bstart && dst.len() == blen {
                        self.decompress(src, dst, k)?;
                    } else {
                        if scratch.block.len() < bs as usize {
                            scratch.block.resize(bs as usize, 0);
                        }
                        self.decompress(src, &mut scratch.block[..blen], k)?;
                        let from = (lo - bstart) as usize;
                        dst.copy_from_slice(&scratch.block[from..from + dst.len()]);
                    }
                }
                i = j;
            }
            Ok(())
        })
    }

    /// Verifies block `k`'s CRC, re-reading it into `buf` up to `CRC_RETRIES` times.
    fn check_block(&self, buf: &mut [u8], k: u64, blocking: Blocking) -> Result<()> {
        if !self.info.verify {
            return Ok(());
        }
        let pos = self.starts[k as usize];
        let mut attempts = 1;
        loop {
            let n = buf.len() - 4;
            let stored = u32::from_le_bytes([buf[n], buf[n + 1], buf[n + 2], buf[n + 3]]);
            if crc32c_raw(BLOCK_CRC_SALT, &buf[..n]) == stored {
                return Ok(());
            }
            if attempts > CRC_RETRIES {
                return Err(Error::BlockCrc {
                    file: self.src.name().to_string(),
                    block: k,
                    offset: pos,
                    attempts,
                });
            }
            self.src.evict(pos, buf.len() as u64);
            read_exact_at_with(&*self.src, buf, pos, blocking)?;
            attempts += 1;
        }
    }

    fn decompress(&self, src: &[u8], dst: &mut [u8], k: u64) -> Result<()> {
        let got = decompress_block(self.algo, src, dst);
        match got {
            Ok(n) if n == dst.len() => Ok(()),
            Ok(n) => Err(Error::corrupt(
                self.src.name(),
                self.starts[k as usize],
                format!(
                    "block {k} decompressed to {n} bytes, expected {}",
                    dst.len()
                ),
            )),
            Err(why) => Err(Error::corrupt(
                self.src.name(),
                self.starts[k as usize],
                format!("block {k}: {why}"),
            )),
        }
    }
}

impl ReadAt for ZFileReader {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.read_at_with(buf, offset, Blocking::Allowed)
    }
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.read_at_with(buf, offset, Blocking::Never)
    }
    fn read_at_with(&self, buf: &mut [u8], offset: u64, blocking: Blocking) -> io::Result<usize> {
        let size = self.info.original_file_size;
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(size - offset) as usize;
        self.read_blocks(&mut buf[..n], offset, blocking)?;
        Ok(n)
    }
    fn size(&self) -> u64 {
        self.info.original_file_size
    }
    fn name(&self) -> &str {
        self.src.name()
    }
    /// Prefetches the compressed bytes of the blocks holding `[offset, offset + len)`: one
    /// range of the source (blocks are stored in order).
    fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        let size = self.info.original_file_size;
        if offset >= size || len == 0 {
            return Ok(());
        }
        let bs = self.info.block_size as u64;
        let first = offset / bs;
        let last = (offset + len.min(size - offset) - 1) / bs;
        let start = self.starts[first as usize];
        let end = self.starts[last as usize + 1];
        self.src.prefetch(start, end - start)
    }
}

#[derive(Default)]
struct Scratch {
    compressed: Vec<u8>,
    block: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn max_compressed(algo: Algorithm, block_size: u32) -> u64 {
    match algo {
        Algorithm::Lz4 => unsafe { lz4_sys::LZ4_compressBound(block_size as c_int) as u64 },
        Algorithm::Zstd => zstd::zstd_safe::compress_bound(block_size as usize) as u64,
    }
}

/// Decompresses one block into `dst` (whose length is the block's original length).
pub fn decompress_block(
    algo: Algorithm,
    src: &[u8],
    dst: &mut [u8],
) -> std::result::Result<usize, String> {
    match algo {
        Algorithm::Lz4 => {
            let n = unsafe {
                lz4_sys::LZ4_decompress_safe(
                    src.as_ptr() as *const c_char,
                    dst.as_mut_ptr() as *mut c_char,
                    src.len() as c_int,
                    dst.len() as c_int,
                )
            };
            if n < 0 {
                Err("corrupt LZ4 data".into())
            } else {
                Ok(n as usize)
            }
        }
        Algorithm::Zstd => zstd::bulk::decompress_to_buffer(src, dst)
            .map_err(|e| format!("corrupt ZSTD data: {e}")),
    }
}

/// Compresses one block into `dst`, which must hold `max_compressed` bytes.
fn compress_block(
    algo: Algorithm,
    src: &[u8],
    dst: &mut Vec<u8>,
) -> std::result::Result<(), String> {
    match algo {
        Algorithm::Lz4 => {
            let cap = unsafe { lz4_sys::LZ4_compressBound(src.len() as c_int) };
            dst.resize(cap as usize, 0);
            let n = unsafe {
                lz4_sys::LZ4_compress_default(
                    src.as_ptr() as *const c_char,
                    dst.as_mut_ptr() as *mut c_char,
                    src.len() as c_int,
                    cap,
                )
            };
            if n <= 0 {
                return Err("LZ4 compression failed".into());
            }
            dst.truncate(n as usize);
            Ok(())
        }
        Algorithm::Zstd => {
            // Upstream always uses level 3.
            *dst = zstd::bulk::compress(src, 3)
                .map_err(|e| format!("ZSTD compression failed: {e}"))?;
            Ok(())
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct ZFileOptions {
    pub algorithm: Algorithm,
    pub block_size: u32,
}

impl Default for ZFileOptions {
    fn default() -> Self {
        ZFileOptions {
            algorithm: Algorithm::Lz4,
            block_size: 4096,
        }
    }
}

/// Compresses all of `input` as a ZFile written to `out` starting at its current position, the
/// way `overlaybd-commit -z` does: initial header (flags 0x13), blocks each followed by its CRC,
/// jump table, trailer (0x16), then the header overwritten with the final index (0x1B).
/// Returns the ZFile's length.
pub fn compress<W: Write + Seek>(
    input: &dyn ReadAt,
    out: &mut W,
    opts: ZFileOptions,
) -> Result<u64> {
    let bs = opts.block_size;
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(Error::InvalidArgument(format!(
            "block size {bs}: must be a power of two in 4..64 KiB"
        )));
    }
    let oname = "zfile output";
    let base = out.stream_position().map_err(|e| Error::io(oname, 0, e))?;
    let total = input.size();
    let mut header = ZFileHeader {
        digest: 0,
        flags: FLAG_HEADER | FLAG_DATA | FLAG_DIGEST,
        index_offset: 0,
        index_size: 0,
        original_file_size: 0,
        index_crc: 0,
        block_size: bs,
        algo: opts.algorithm.code(),
        level: 0,
        use_dict: 0,
        dict_size: 0,
        verify: true,
    };
    let mut w = io::BufWriter::with_capacity(1 << 20, &mut *out);
    let put = |w: &mut io::BufWriter<&mut W>, b: &[u8], at: u64| {
        w.write_all(b).map_err(|e| Error::io(oname, at, e))
    };
    put(&mut w, &header.encode(), 0)?;
    let mut pos = HEADER_SIZE;
    let blocks = total.div_ceil(bs as u64);
    let mut table = Vec::with_capacity(blocks as usize * 4);
    let mut raw = vec![0u8; bs as usize];
    let mut packed = Vec::with_capacity(bs as usize * 2);
    for i in 0..blocks {
        let n = (total - i * bs as u64).min(bs as u64) as usize;
        read_exact_at(input, &mut raw[..n], i * bs as u64)?;
        compress_block(opts.algorithm, &raw[..n], &mut packed)
            .map_err(|e| Error::corrupt(input.name(), i * bs as u64, e))?;
        let crc = crc32c_raw(BLOCK_CRC_SALT, &packed);
        put(&mut w, &packed, pos)?;
        put(&mut w, &crc.to_le_bytes(), pos)?;
        let len = packed.len() as u32 + 4;
        table.extend_from_slice(&len.to_le_bytes());
        pos += len as u64;
    }
    put(&mut w, &table, pos)?;
    header.index_offset = pos;
    header.index_size = blocks;
    header.original_file_size = total;
    header.index_crc = crc32c_raw(0, &table);
    pos += table.len() as u64;
    let mut trailer = header.clone();
    trailer.flags = FLAG_DATA | FLAG_SEALED | FLAG_DIGEST;
    put(&mut w, &trailer.encode(), pos)?;
    pos += HEADER_SIZE;
    w.flush().map_err(|e| Error::io(oname, pos, e))?;
    drop(w);
    header.flags = FLAG_HEADER | FLAG_DATA | FLAG_HEADER_OVERWRITE | FLAG_DIGEST;
    out.seek(SeekFrom::Start(base))
        .map_err(|e| Error::io(oname, 0, e))?;
    out.write_all(&header.encode())
        .map_err(|e| Error::io(oname, 0, e))?;
    out.seek(SeekFrom::Start(base + pos))
        .map_err(|e| Error::io(oname, pos, e))?;
    Ok(pos)
}
