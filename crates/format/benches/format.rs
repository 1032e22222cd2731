//! Format-engine figures, printed (not asserted): `cargo bench -p ovbd-format`.
//!
//! - merged-index lookups/s at 1k..1M segments, one core (goal: >= 40 M/s at 10k);
//! - ZFile 4 KiB random reads vs raw decode of the same blocks (goal: >= 0.9x);
//! - merge time and memory for 255 layers x 10k entries.

use ovbd_format::index::merge_layers;
use ovbd_format::lsmt::Segment;
use ovbd_format::zfile::{compress, decompress_block, Algorithm, ZFileOptions, ZFileReader};
use ovbd_format::{MemSource, ReadAt, SegmentIndex};
use std::hint::black_box;
use std::io::Cursor;
use std::sync::Arc;
use std::time::Instant;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn segments(n: usize, rng: &mut Rng) -> Vec<Segment> {
    let mut off = 0u64;
    (0..n)
        .map(|_| {
            off += rng.next() % 64;
            let len = 1 + (rng.next() % 128) as u32;
            let s = Segment {
                offset: off,
                length: len,
                moffset: 8 + off,
                zeroed: false,
                tag: 0,
            };
            off += len as u64;
            s
        })
        .collect()
}

fn lookups() {
    println!("merged-index lookups (random sectors, one core)");
    println!(
        "  {:>9} {:>14} {:>18} {:>8}",
        "segments", "ovbd M/s", "partition_point M/s", "ratio"
    );
    let mut rng = Rng(0x9e3779b97f4a7c15);
    for n in [1_000usize, 10_000, 100_000, 1_000_000] {
        let segs = segments(n, &mut rng);
        let max = segs.last().map(|s| s.end()).unwrap_or(1);
        let idx = SegmentIndex::new(segs.clone());
        let queries: Vec<u64> = (0..1 << 22).map(|_| rng.next() % max).collect();
        let mut best = f64::MAX;
        let mut sum = 0usize;
        for _ in 0..3 {
            let t = Instant::now();
            for &q in &queries {
                sum = sum.wrapping_add(idx.first_ending_after(black_box(q)));
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let mut best_pp = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            for &q in &queries {
                sum = sum.wrapping_sub(segs.partition_point(|s| s.end() <= black_box(q)));
            }
            best_pp = best_pp.min(t.elapsed().as_secs_f64());
        }
        black_box(sum);
        let ours = queries.len() as f64 / best / 1e6;
        let pp = queries.len() as f64 / best_pp / 1e6;
        println!("  {n:>9} {ours:>14.1} {pp:>18.1} {:>7.2}x", ours / pp);
    }
}

/// Data that compresses about like a filesystem image: text-ish runs, some noise, some zeros.
fn image_like(len: usize, rng: &mut Rng) -> Vec<u8> {
    let words: [&[u8]; 6] = [
        b"usr/lib/",
        b"#include <stdio.h>\n",
        b"\0\0\0\0\0\0\0\0",
        b"libc.so.6 ",
        b"ELF\x02\x01\x01",
        b"  return 0;\n",
    ];
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        match rng.next() % 8 {
            0 => v.extend((0..64).map(|_| rng.next() as u8)),
            1 => v.extend(std::iter::repeat_n(0u8, 512)),
            _ => v.extend_from_slice(words[(rng.next() % 6) as usize]),
        }
    }
    v.truncate(len);
    v
}

fn zfile_reads() {
    println!("ZFile 4 KiB random reads vs raw decode of the same blocks (in memory, one core)");
    let mut rng = Rng(42);
    let data = image_like(64 << 20, &mut rng);
    for algorithm in [Algorithm::Lz4, Algorithm::Zstd] {
        let mut out = Cursor::new(Vec::new());
        compress(
            &MemSource::new(data.clone(), "in"),
            &mut out,
            ZFileOptions {
                algorithm,
                block_size: 4096,
            },
        )
        .unwrap();
        let blob = out.into_inner();
        let ratio = data.len() as f64 / blob.len() as f64;
        let z = ZFileReader::open(Arc::new(MemSource::new(blob.clone(), "z"))).unwrap();
        let blocks = (data.len() / 4096) as u64;
        let order: Vec<u64> = (0..200_000).map(|_| rng.next() % blocks).collect();
        // Raw decode baseline: the compressed bytes of each block, decoded in the same order.
        let table_off = z.info.index_offset as usize;
        let lens: Vec<u32> = blob[table_off..table_off + blocks as usize * 4]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mut starts = vec![512usize];
        for l in &lens {
            starts.push(starts.last().unwrap() + *l as usize);
        }
        let mut buf = vec![0u8; 4096];
        let (mut best_raw, mut best_z) = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            let t = Instant::now();
            for &b in &order {
                let s = starts[b as usize];
                let e = starts[b as usize + 1] - 4;
                decompress_block(algorithm, &blob[s..e], &mut buf).unwrap();
                black_box(&buf);
            }
            best_raw = best_raw.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            for &b in &order {
                z.read_at(&mut buf, b * 4096).unwrap();
                black_box(&buf);
            }
            best_z = best_z.min(t.elapsed().as_secs_f64());
        }
        let mb = order.len() as f64 * 4096.0 / 1e6;
        println!(
            "  {:<4} ratio {ratio:.2}: reader {:.0} MB/s, raw decode {:.0} MB/s, reader/raw {:.2}x",
            algorithm.name(),
            mb / best_z,
            mb / best_raw,
            best_raw / best_z
        );
    }
}

fn hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn merge() {
    println!("merge of 255 layers x 10k entries");
    let mut rng = Rng(7);
    let layers: Vec<Vec<Segment>> = (0..255)
        .map(|_| {
            // Spread each layer over the same 64 GiB so layers overlap and cut each other.
            let mut segs = segments(10_000, &mut rng);
            let stretch = (64u64 << 21) / segs.last().unwrap().end().max(1);
            for s in &mut segs {
                s.offset *= stretch.max(1);
                s.moffset = s.offset + 8;
            }
            segs
        })
        .collect();
    let before = hwm_kib();
    let t = Instant::now();
    let merged = merge_layers(layers);
    let idx = SegmentIndex::new(merged);
    let secs = t.elapsed().as_secs_f64();
    let after = hwm_kib();
    println!(
        "  {} merged segments in {:.0} ms; resident growth {:.1} MiB ({:.1} bytes/segment)",
        idx.len(),
        secs * 1e3,
        after.saturating_sub(before) as f64 / 1024.0,
        after.saturating_sub(before) as f64 * 1024.0 / idx.len() as f64
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    lookups();
    zfile_reads();
    merge();
}
