use super::block_source::BlockSource;
use super::record::{sums_path, Key, Scope, META_LEN};
use super::state::BlobState;
use super::*;
use crate::config::{CacheConfig, RegistryConfig};
use crate::registry::{Registry, RemoteBlob};
use crate::testing::*;
use crate::testing::{check_random_ranges, random_bytes, registry_with_blob, Rng};
use ovbd_format::ReadAt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn cfg(dir: &Path, limit: u64, block: u64) -> CacheConfig {
    CacheConfig {
        dir: Some(dir.to_path_buf()),
        size_gb: limit as f64 / (1u64 << 30) as f64,
        refill_kb: block >> 10,
        whole_blob_kb: 0,
        file_chunk_kb: 0,
    }
}

/// Opens the cache at `dir`, waiting out a lock held by another test's child for a moment:
/// a process spawned elsewhere in this test binary shares every open file, the lock file
/// of a cache a test just dropped too, until it execs (seen as `Busy` under CI's load).
fn open_cache(cfg: &CacheConfig, dir: &Path) -> Arc<BlobCache> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match BlobCache::open(cfg, dir) {
            Err(CacheError::Busy { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            r => return r.unwrap(),
        }
    }
}

fn paths_of(cache: &BlobCache, fake: &Fake) -> (PathBuf, PathBuf) {
    cache.paths(&Key {
        scope: Scope::of_origin(&fake.origin),
        digest: fake.digest.clone(),
        size: fake.data.len() as u64,
    })
}

pub(crate) fn cached(cache: &Arc<BlobCache>, fake: &Arc<Fake>) -> CachedBlob {
    CachedBlob::with_source(cache.clone(), fake.clone()).unwrap()
}

fn read(b: &dyn ReadAt, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let n = b.read_at(&mut buf, off).unwrap();
    buf.truncate(n);
    buf
}

fn nowait(b: &dyn ReadAt, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let n = b.read_at_nowait(&mut buf, off)?;
    buf.truncate(n);
    Ok(buf)
}

fn is_would_block(r: io::Result<Vec<u8>>) -> bool {
    matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Through a real registry: right bytes, a second read fetches nothing, nowait serves
/// what is cached only, and a new cache on the same directory serves it too.
#[test]
fn blob_cache_reads_through_registry() {
    let (reg, data, digest) = registry_with_blob((3 << 20) + 4321, 21);
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::new(&RegistryConfig {
        timeout_secs: 10.0,
        allow_hosts: vec!["127.0.0.1".into()],
        ..Default::default()
    })
    .unwrap();
    let image = format!("{}/test/blob:v1", reg.addr);
    let remote = RemoteBlob::new(registry.clone(), &image, &digest, data.len() as u64).unwrap();
    let counter = remote.clone();
    // Its origin: registry host and repository, the tag left out.
    assert_eq!(
        BlockSource::origin(&remote),
        format!("{}/test/blob", reg.addr)
    );
    // 64 KiB blocks: the offsets below are chosen for them.
    let cache_cfg = CacheConfig {
        refill_kb: 64,
        ..CacheConfig::default()
    };
    let cache = open_cache(&cache_cfg, &tmp.path().join("cache"));
    let blob = CachedBlob::new(cache.clone(), remote).unwrap();
    assert_eq!(blob.size(), data.len() as u64);
    assert!(blob.name().contains(&digest));

    // Nothing cached: nowait never fetches.
    assert!(is_would_block(nowait(&blob, 1000, 10)));
    assert_eq!(counter.requests(), 0);

    // One read of 10 bytes fetches the (64 KiB) block around it.
    let bs = cache_cfg.refill_bytes();
    assert_eq!(bs, 64 << 10);
    assert_eq!(read(&blob, 300_000, 10), &data[300_000..300_010]);
    assert_eq!(counter.fetched_bytes(), bs);
    assert_eq!(blob.cached_bytes(), bs);
    assert_eq!(
        nowait(&blob, 262_144, 1000).unwrap(),
        &data[262_144..263_144]
    );
    assert!(is_would_block(nowait(&blob, 262_143, 2)));

    check_random_ranges(&blob, &data, 20, 23);
    let fetched = counter.fetched_bytes();
    // Each block once, but present blocks between missing ones (fetched again in one range).
    assert!(fetched <= data.len() as u64 * 3 / 2, "{fetched}");
    assert_eq!(blob.cached_bytes(), data.len() as u64);
    check_random_ranges(&blob, &data, 20, 29);
    assert_eq!(
        counter.fetched_bytes(),
        fetched,
        "second reads fetch nothing"
    );
    assert_eq!(nowait(&blob, 0, data.len()).unwrap(), data);
    let stats = cache.stats();
    assert_eq!(stats.cached_bytes, data.len() as u64);
    assert_eq!(stats.blobs.len(), 1);
    assert!(stats.blobs[0].open && stats.blobs[0].digest == digest);
    assert!(stats.blobs[0].disk_bytes >= data.len() as u64);

    // A new cache on the directory (a restart) serves it all, without the registry.
    drop(blob);
    drop(cache);
    drop(reg);
    let cache = open_cache(&cache_cfg, &tmp.path().join("cache"));
    let remote = RemoteBlob::new(registry, &image, &digest, data.len() as u64).unwrap();
    let counter = remote.clone();
    let blob = CachedBlob::new(cache, remote).unwrap();
    assert_eq!(nowait(&blob, 5, 100).unwrap(), &data[5..105]);
    check_random_ranges(&blob, &data, 10, 31);
    assert_eq!(counter.requests(), 0);
}

/// Reads are rounded out to blocks; the missing runs of one read are fetched in one call
/// (one range per run), not block after block.
#[test]
fn blob_cache_rounds_to_blocks_and_coalesces_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
    let fake = Fake::new(20 * BS as usize + 1000, 1);
    let blob = cached(&cache, &fake);
    assert_eq!(
        read(&blob, BS + 5, 10),
        &fake.data[BS as usize + 5..BS as usize + 15]
    );
    assert_eq!(lock(&fake.ranges).clone(), vec![vec![(BS, BS as usize)]]);
    assert_eq!(
        read(&blob, 4 * BS - 1, 2),
        &fake.data[4 * BS as usize - 1..4 * BS as usize + 1]
    );
    assert_eq!(lock(&fake.ranges)[1], vec![(3 * BS, 2 * BS as usize)]);
    // Blocks 0..10 with 1, 3, 4 present: runs [0], [2], [5..10) in one call, the first two
    // (a block apart) as one range.
    let all = read(&blob, 0, 10 * BS as usize);
    assert!(all == fake.data[..10 * BS as usize]);
    assert_eq!(
        lock(&fake.ranges)[2],
        vec![(0, 3 * BS as usize), (5 * BS, 5 * BS as usize)]
    );
    // The short last block.
    let tail = read(&blob, 20 * BS + 999, 100);
    assert_eq!(tail, &fake.data[20 * BS as usize + 999..]);
    assert_eq!(lock(&fake.ranges)[3], vec![(20 * BS, 1000)]);
    assert_eq!(fake.calls.load(SeqCst), 4);
    // Each block once, but block 1 (between the merged runs).
    let pb = lock(&fake.per_block).clone();
    assert!(
        pb.iter().all(|(&b, &c)| c == 1 + (b == 1) as usize),
        "{pb:?}"
    );
    // All cached now: no more calls.
    let _ = read(&blob, 0, 10 * BS as usize);
    assert_eq!(fake.calls.load(SeqCst), 4);
    assert_eq!(blob.cached_bytes(), 10 * BS + 1000);
}

/// Readers of the same blocks at the same time: each block is fetched once, the others
/// wait for it; a second CachedBlob of the same digest shares the cache.
#[test]
fn blob_cache_concurrent_readers_share_one_fetch() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
    let fake = Fake::new(16 * BS as usize, 2);
    *lock(&fake.delay) = Duration::from_millis(300);
    let a = Arc::new(cached(&cache, &fake));
    let b = Arc::new(cached(&cache, &fake));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let blob = if i % 2 == 0 { a.clone() } else { b.clone() };
            let data = fake.data.clone();
            std::thread::spawn(move || {
                // Overlapping reads: all want block 3; some want 2..6.
                let (off, len) = if i < 4 {
                    (3 * BS + i as u64 * 100, 1000)
                } else {
                    (2 * BS + 7, 3 * BS as usize)
                };
                let got = read(&*blob, off, len);
                assert!(got == data[off as usize..off as usize + len], "reader {i}");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let pb = lock(&fake.per_block).clone();
    assert!(pb.values().all(|&c| c == 1), "{pb:?}");
    assert_eq!(pb.len(), 4, "{pb:?}"); // blocks 2, 3, 4, 5
    assert!(fake.calls.load(SeqCst) <= 3, "{}", fake.calls.load(SeqCst));
    assert_eq!(cache.stats().blobs.len(), 1);
    assert_eq!(a.cached_bytes(), 4 * BS);
}

#[test]
fn blob_cache_survives_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = Fake::new(8 * BS as usize + 123, 3);
    {
        let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
        let blob = cached(&cache, &fake);
        let _ = read(&blob, BS, 3 * BS as usize);
        let _ = read(&blob, 8 * BS, 123);
        // Another cache on the same directory meanwhile: refused.
        let e = BlobCache::open(&cfg(tmp.path(), 1 << 30, BS), tmp.path()).unwrap_err();
        assert!(format!("{e:#}").contains("in use"), "{e:#}");
    }
    let fetched = fake.fetched();
    let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
    assert_eq!(cache.stats().cached_bytes, 3 * BS + 123);
    assert!(!cache.stats().blobs[0].open);
    let blob = cached(&cache, &fake);
    assert_eq!(
        nowait(&blob, BS, 3 * BS as usize).unwrap(),
        &fake.data[BS as usize..4 * BS as usize]
    );
    assert_eq!(
        nowait(&blob, 8 * BS + 100, 100).unwrap(),
        &fake.data[8 * BS as usize + 100..]
    );
    assert!(is_would_block(nowait(&blob, 0, 1)));
    assert_eq!(
        read(&blob, 2 * BS, 10),
        &fake.data[2 * BS as usize..2 * BS as usize + 10]
    );
    assert_eq!(fake.fetched(), fetched);
    // Another refill size: the old record is not used.
    drop(blob);
    drop(cache);
    let cache = open_cache(&cfg(tmp.path(), 1 << 30, 2 * BS), tmp.path());
    assert_eq!(cache.stats().cached_bytes, 0);
    let blob = cached(&cache, &fake);
    assert!(is_would_block(nowait(&blob, BS, 10)));
    assert_eq!(
        read(&blob, BS, 10),
        &fake.data[BS as usize..BS as usize + 10]
    );
}

/// Records that do not match their data file are dropped, never served.
#[test]
fn blob_cache_torn_state_is_not_served() {
    type Damage = fn(&Path, &Path);
    let cases: Vec<(&str, Damage)> = vec![
        ("data file truncated", |data, _| {
            let f = OpenOptions::new().write(true).open(data).unwrap();
            f.set_len(3 * BS).unwrap();
        }),
        ("data file cut to nothing", |data, _| {
            OpenOptions::new()
                .write(true)
                .open(data)
                .unwrap()
                .set_len(0)
                .unwrap();
        }),
        ("data file extended", |data, _| {
            let f = OpenOptions::new().write(true).open(data).unwrap();
            let len = f.metadata().unwrap().len();
            f.set_len(len + 4096).unwrap();
        }),
        (
            "data file made anew (same length, no trailer)",
            |data, _| {
                let len = fs::metadata(data).unwrap().len();
                fs::remove_file(data).unwrap();
                File::create(data).unwrap().set_len(len).unwrap();
            },
        ),
        ("data file missing", |data, _| {
            fs::remove_file(data).unwrap()
        }),
        // An entry made again is not synced: after a crash its new data file (another nonce)
        // can lie beside the old map, whose blocks it does not hold.
        (
            "data file of an entry made again (another nonce), the old map beside it",
            |data, _| {
                let at = 6 * BS as usize; // the trailer, as `trailer` below
                let mut b = fs::read(data).unwrap();
                b[at + 32] ^= 1; // inside the nonce; the CRC is fixed up below
                let end = at + META_LEN as usize;
                let crc = ovbd_format::crc::crc32c_raw(0, &b[at..end - 4]);
                b[end - 4..end].copy_from_slice(&crc.to_le_bytes());
                fs::write(data, b).unwrap();
            },
        ),
        ("map header garbled", |_, map| {
            let f = OpenOptions::new().write(true).open(map).unwrap();
            f.write_all_at(b"x", 20).unwrap();
        }),
        ("map bitmap cut short", |_, map| {
            OpenOptions::new()
                .write(true)
                .open(map)
                .unwrap()
                .set_len(META_LEN)
                .unwrap();
        }),
        ("map extended", |_, map| {
            let f = OpenOptions::new().write(true).open(map).unwrap();
            let len = f.metadata().unwrap().len();
            f.set_len(len + (1 << 30)).unwrap();
        }),
        ("map claiming a blob of 2^63 bytes", |_, map| {
            let mut b = fs::read(map).unwrap();
            b[24..32].copy_from_slice(&(1u64 << 63).to_le_bytes());
            let crc = ovbd_format::crc::crc32c_raw(0, &b[..META_LEN as usize - 4]);
            b[META_LEN as usize - 4..META_LEN as usize].copy_from_slice(&crc.to_le_bytes());
            fs::write(map, b).unwrap();
        }),
        ("map of another blob", |_, map| {
            let mut b = fs::read(map).unwrap();
            b[60] ^= 1; // inside the digest; the CRC is fixed up below
            let crc = ovbd_format::crc::crc32c_raw(0, &b[..META_LEN as usize - 4]);
            b[META_LEN as usize - 4..META_LEN as usize].copy_from_slice(&crc.to_le_bytes());
            fs::write(map, b).unwrap();
        }),
    ];
    for (what, damage) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let fake = Fake::new(6 * BS as usize, 4);
        let (data_path, map_path) = {
            let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
            let blob = cached(&cache, &fake);
            let _ = read(&blob, 0, 6 * BS as usize);
            assert_eq!(blob.cached_bytes(), 6 * BS);
            paths_of(&cache, &fake)
        };
        damage(&data_path, &map_path);
        // The error names the file and the offset of what does not check out.
        let key = Key {
            scope: Scope::of_origin(&fake.origin),
            digest: fake.digest.clone(),
            size: fake.data.len() as u64,
        };
        let trailer = 6 * BS; // the data file's trailer: right after the (4 KiB-aligned) data
        let (file, at) = match what {
            "data file missing" => (&data_path, None),
            "map header garbled" => (&map_path, Some(META_LEN - 4)), // its CRC
            "map bitmap cut short" | "map extended" => (&map_path, Some(META_LEN)),
            "map claiming a blob of 2^63 bytes" => (&map_path, Some(24)),
            "map of another blob" => (&map_path, Some(50)),
            _ => (&data_path, Some(trailer)),
        };
        let e = BlobState::load((data_path.clone(), map_path.clone()), &key, BS)
            .err()
            .unwrap_or_else(|| panic!("{what}: loaded"));
        match (&e, at) {
            (CacheError::BadRecord { path, offset, .. }, Some(at)) => {
                assert_eq!((path, *offset), (file, at), "{what}: {e}");
                assert!(e.to_string().contains(&format!("at offset {at}")), "{e}");
            }
            (CacheError::Io { path, source, .. }, None) => {
                assert_eq!(path, file, "{what}: {e}");
                assert_eq!(source.kind(), io::ErrorKind::NotFound, "{what}: {e}");
            }
            _ => panic!("{what}: {e:?}"),
        }
        assert!(e.to_string().contains(&file.display().to_string()), "{e}");
        let fetched = fake.fetched();
        let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
        assert_eq!(cache.stats().cached_bytes, 0, "{what}");
        let blob = cached(&cache, &fake);
        for b in 0..6 {
            assert!(
                is_would_block(nowait(&blob, b * BS, 10)),
                "{what}: block {b} served"
            );
        }
        assert!(
            read(&blob, 0, 6 * BS as usize) == fake.data,
            "{what}: wrong bytes"
        );
        assert_eq!(fake.fetched() - fetched, 6 * BS, "{what}");
        // And the fresh record is good for the next start.
        drop(blob);
        drop(cache);
        let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
        assert_eq!(cache.stats().cached_bytes, 6 * BS, "{what}");
    }
}

/// Over the limit, the least recently used blocks go (holes punched); the hot ones stay;
/// evicted ones come back right.
#[test]
fn blob_cache_lru_eviction_keeps_under_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let limit = 10 * BS;
    let cache = open_cache(&cfg(tmp.path(), limit, BS), tmp.path());
    let fake = Fake::new(64 * BS as usize, 5);
    let other = Fake::new(16 * BS as usize, 6);
    let blob = cached(&cache, &fake);
    let blob2 = cached(&cache, &other);
    let hot = [0u64, 1, 2];
    for b in 10..60u64 {
        for h in hot {
            assert_eq!(
                read(&blob, h * BS + 17, 100),
                &fake.data[(h * BS) as usize + 17..(h * BS) as usize + 117]
            );
        }
        let got = read(&blob, b * BS, BS as usize);
        assert!(got == fake.data[(b * BS) as usize..((b + 1) * BS) as usize]);
        if b % 5 == 0 {
            let o = (b / 5) % 16;
            assert_eq!(
                read(&blob2, o * BS, 10),
                &other.data[(o * BS) as usize..(o * BS) as usize + 10]
            );
        }
        let total = cache.stats().cached_bytes;
        assert!(total <= limit, "{total} cached after block {b}");
    }
    for h in hot {
        assert!(
            nowait(&blob, h * BS, 10).is_ok(),
            "hot block {h} was evicted"
        );
    }
    assert!(
        is_would_block(nowait(&blob, 10 * BS, 10)),
        "cold block kept"
    );
    let stats = cache.stats();
    assert!(stats.evicted_bytes >= 40 * BS, "{stats:?}");
    let disk: u64 = stats.blobs.iter().map(|b| b.disk_bytes).sum();
    // Holes punched: the data files take about what is cached (+ trailers, fs blocks).
    assert!(disk <= limit + 4 * 8192, "{disk} bytes on disk");
    // Evicted blocks come back right, fetched again.
    let before = fake.fetched();
    let got = read(&blob, 10 * BS, 2 * BS as usize);
    assert!(got == fake.data[(10 * BS) as usize..(12 * BS) as usize]);
    assert_eq!(fake.fetched() - before, 2 * BS);
    assert!(cache.stats().cached_bytes <= limit);
    // Blobs with nothing left and no handle are deleted.
    drop(blob2);
    let (data2, map2) = paths_of(&cache, &other);
    let freed = cache.clear();
    assert!(freed > 0);
    assert!(!data2.exists() && !map2.exists());
    assert_eq!(cache.stats().blobs.len(), 1);
    assert_eq!(cache.stats().cached_bytes, 0);
    assert!(is_would_block(nowait(&blob, 0, 10)));
    assert_eq!(read(&blob, 0, 10), &fake.data[..10]);
}

/// evict() (a failed CRC above) drops the blocks: the next read fetches them again.
#[test]
fn blob_cache_evict_forces_refetch() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
    let fake = Fake::new(8 * BS as usize, 7);
    let blob = cached(&cache, &fake);
    let _ = read(&blob, 0, 8 * BS as usize);
    // The cached copy of block 3 goes bad on disk.
    let (data_path, _) = paths_of(&cache, &fake);
    let f = OpenOptions::new().write(true).open(&data_path).unwrap();
    f.write_all_at(&[0xEE; 100], 3 * BS + 50).unwrap();
    assert_ne!(
        read(&blob, 3 * BS + 50, 100),
        &fake.data[(3 * BS + 50) as usize..(3 * BS + 150) as usize]
    );
    // Evicting a range inside block 3 and touching 4: both go.
    blob.evict(3 * BS + 10, BS);
    assert!(is_would_block(nowait(&blob, 3 * BS, 1)));
    assert!(is_would_block(nowait(&blob, 4 * BS, 1)));
    assert!(nowait(&blob, 2 * BS, 1).is_ok() && nowait(&blob, 5 * BS, 1).is_ok());
    assert_eq!(blob.cached_bytes(), 6 * BS);
    let before = fake.fetched();
    assert!(
        read(&blob, 3 * BS, 2 * BS as usize) == fake.data[(3 * BS) as usize..(5 * BS) as usize]
    );
    assert_eq!(fake.fetched() - before, 2 * BS);
    assert_eq!(blob.cached_bytes(), 8 * BS);
    // Through a restart as well: the eviction was recorded.
    blob.evict(7 * BS, 1);
    drop(blob);
    drop(cache);
    let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
    let blob = cached(&cache, &fake);
    assert!(is_would_block(nowait(&blob, 7 * BS, 1)));
    assert!(
        nowait(&blob, 3 * BS + 50, 100).unwrap()
            == fake.data[(3 * BS + 50) as usize..(3 * BS + 150) as usize]
    );
    // Out-of-range and empty evictions are harmless.
    blob.evict(100 * BS, 10);
    blob.evict(0, 0);
    assert_eq!(blob.cached_bytes(), 7 * BS);
}

/// A failed fetch caches nothing and fails every reader waiting for it; later reads work.
#[test]
fn blob_cache_fetch_errors_are_not_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
    let fake = Fake::new(4 * BS as usize, 8);
    fake.fail.store(true, SeqCst);
    *lock(&fake.delay) = Duration::from_millis(200);
    let blob = Arc::new(cached(&cache, &fake));
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let blob = blob.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 10];
                blob.read_at(&mut buf, BS).map(|_| ())
            })
        })
        .collect();
    for w in waiters {
        let e = w.join().unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("registry down"), "{e}");
    }
    assert_eq!(
        fake.calls.load(SeqCst),
        1,
        "the waiters shared the failed fetch"
    );
    assert_eq!(blob.cached_bytes(), 0);
    assert!(is_would_block(nowait(&*blob, BS, 10)));
    fake.fail.store(false, SeqCst);
    *lock(&fake.delay) = Duration::ZERO;
    assert_eq!(
        read(&*blob, BS, 10),
        &fake.data[BS as usize..BS as usize + 10]
    );
    assert_eq!(blob.cached_bytes(), BS);
}

#[test]
fn blob_cache_random_reads_match_under_eviction_pressure() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = open_cache(&cfg(tmp.path(), 6 * BS, BS), tmp.path());
    let fake = Fake::new(40 * BS as usize + 333, 9);
    let blob = Arc::new(cached(&cache, &fake));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let blob = blob.clone();
            let data = fake.data.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(100 + t);
                for _ in 0..150 {
                    let off = rng.below(data.len() as u64);
                    let len = 1 + rng.below(3 * BS) as usize;
                    let got = read(&*blob, off, len);
                    let end = (off as usize + len).min(data.len());
                    assert!(got == data[off as usize..end], "read {len} at {off}");
                    if rng.below(10) == 0 {
                        blob.evict(rng.below(data.len() as u64), BS);
                    }
                    if let Ok(got) = nowait(&*blob, off, len) {
                        assert!(got[..] == data[off as usize..off as usize + got.len()]);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Fills that raced the evictor may leave it a little over until the next fill.
    let total = cache.stats().cached_bytes;
    assert!(
        total <= 6 * BS + 4 * 3 * BS,
        "{total} bytes cached ({} blocks), limit {}",
        total.div_ceil(BS),
        6 * BS
    );
    drop(blob);
    drop(cache);
    // Whatever was left on disk is right.
    let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
    let blob = cached(&cache, &fake);
    let mut served = 0;
    for b in 0..41 {
        if let Ok(got) = nowait(&blob, b * BS, BS as usize) {
            assert!(got[..] == fake.data[(b * BS) as usize..(b * BS) as usize + got.len()]);
            served += 1;
        }
    }
    assert!(served > 0);
}

/// A fill that lands while another evicts leaves its eviction to that pass. If the pass
/// frees nothing (every block it chose was read again meanwhile, so is no longer the least
/// recently used), the cache must still come back under its limit: over it, it would grow
/// without bound while eviction passes keep losing such races (CI saw 37 blocks cached
/// against a limit of 6).
#[test]
fn fills_during_a_fruitless_eviction_pass_are_still_evicted_for() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = open_cache(&cfg(tmp.path(), 4 * BS, BS), tmp.path());
    let fake = Fake::new(16 * BS as usize, 5);
    let blob = Arc::new(cached(&cache, &fake));
    for b in 0..4 {
        assert_eq!(
            read(&*blob, b * BS, 1),
            &fake.data[(b * BS) as usize..][..1]
        );
    }
    assert_eq!(cache.stats().cached_bytes, 4 * BS);
    // The next fill goes over the limit; once its eviction pass has chosen, every cached
    // block is read again and four more blocks are fetched (their fills find it evicting).
    let during = blob.clone();
    let data = fake.data.clone();
    *lock(&cache.mid_eviction) = Some(Box::new(move || {
        for b in (0..5).chain(6..10) {
            assert_eq!(read(&*during, b * BS, 1), &data[(b * BS) as usize..][..1]);
        }
    }));
    assert_eq!(
        read(&*blob, 4 * BS, 1),
        &fake.data[(4 * BS) as usize..][..1]
    );
    assert!(lock(&cache.mid_eviction).is_none(), "no eviction pass ran");
    let total = cache.stats().cached_bytes;
    assert!(
        total <= 4 * BS,
        "{total} bytes cached ({} blocks) after the fills, limit {} (4 blocks)",
        total.div_ceil(BS),
        4 * BS
    );
    // And what is cached is right.
    for b in 0..16 {
        if let Ok(got) = nowait(&*blob, b * BS, BS as usize) {
            assert!(got[..] == fake.data[(b * BS) as usize..][..got.len()]);
        }
    }
}

/// Through a registry that fails now and then, then for good: faults are retried below
/// the cache; cached blocks are served during the outage; the others fail (every waiter)
/// within the deadline, are not cached, and work once the registry is back.
#[test]
fn blob_cache_over_a_failing_registry() {
    use crate::testing::{Fault, Front};
    let (reg, data, digest) = registry_with_blob(2 << 20, 41);
    let front = Front::start(&reg.addr, None);
    let deadline = Duration::from_millis(2500);
    let registry = Registry::new(&RegistryConfig {
        timeout_secs: deadline.as_secs_f64(),
        retries: 100,
        stall_timeout_secs: 0.5,
        allow_hosts: vec!["127.0.0.1".into()],
        ..Default::default()
    })
    .unwrap();
    let remote = RemoteBlob::new(
        registry,
        &format!("{}/test/blob", front.addr),
        &digest,
        data.len() as u64,
    )
    .unwrap();
    let counter = remote.clone();
    let tmp = tempfile::tempdir().unwrap();
    // Reads fetch what they ask (this blob is small enough to come whole by default).
    let no_whole = CacheConfig {
        whole_blob_kb: 0,
        file_chunk_kb: 0,
        ..CacheConfig::default()
    };
    let cache = open_cache(&no_whole, tmp.path());
    let blob = Arc::new(CachedBlob::new(cache, remote).unwrap());
    front.push_faults([
        Fault::Status(503),
        Fault::Reset,
        Fault::Truncate,
        Fault::Stall(Duration::from_secs(5)),
    ]);
    assert!(read(&*blob, 100, 1 << 20) == data[100..(1 << 20) + 100]);
    assert!(front.faults.lock().unwrap().is_empty());
    let bs = CacheConfig::default().refill_bytes();
    let first_read = ((1 << 20) + 100u64).div_ceil(bs) * bs;
    assert_eq!(blob.cached_bytes(), first_read);

    *front.always.lock().unwrap() = Some(Fault::Status(503));
    let gets = front.blob_gets();
    assert_eq!(read(&*blob, 200, 1000), &data[200..1200]);
    assert_eq!(front.blob_gets(), gets, "cached: no request");
    let t = std::time::Instant::now();
    let readers: Vec<_> = (0..3)
        .map(|i| {
            let blob = blob.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 100];
                blob.read_at(&mut buf, (3 << 19) + i * 100)
            })
        })
        .collect();
    for r in readers {
        let e = r.join().unwrap().unwrap_err();
        assert!(e.to_string().contains(&digest), "{e}");
    }
    assert!(
        t.elapsed() < deadline + Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(blob.cached_bytes(), first_read);
    assert!(is_would_block(nowait(&*blob, 3 << 19, 10)));

    *front.always.lock().unwrap() = None;
    let before = counter.fetched_bytes();
    assert_eq!(read(&*blob, 3 << 19, 100), &data[3 << 19..(3 << 19) + 100]);
    assert_eq!(counter.fetched_bytes() - before, bs);
}

/// A block goes into the on-disk map only after its data is synced (by the flusher, in
/// batches, or flush()); a crash before that loses the block, never serves it. An evicted
/// block leaves the on-disk map before its hole is punched.
#[test]
fn blob_cache_records_blocks_only_after_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let cache =
        BlobCache::open_with(&cfg(&dir, 1 << 30, BS), &dir, Duration::from_secs(3600)).unwrap();
    let fake = Fake::new(8 * BS as usize, 12);
    let blob = cached(&cache, &fake);
    let (data_path, map_path) = paths_of(&cache, &fake);
    let on_disk = || fs::read(&map_path).unwrap()[META_LEN as usize];
    // What a restart after a crash right now would find: a copy of the files.
    let crash_copy = |name: &str| -> (tempfile::TempDir, Arc<BlobCache>) {
        let t = tempfile::tempdir().unwrap();
        for p in [&data_path, &map_path] {
            let copy = t.path().join(name).join(p.strip_prefix(&dir).unwrap());
            fs::create_dir_all(copy.parent().unwrap()).unwrap();
            fs::copy(p, copy).unwrap();
        }
        let root = t.path().join(name);
        let c = open_cache(&cfg(&root, 1 << 30, BS), &root);
        (t, c)
    };

    let _ = read(&blob, 0, 3 * BS as usize);
    assert!(
        nowait(&blob, 0, 3 * BS as usize).is_ok(),
        "served before it is synced"
    );
    assert_eq!(on_disk(), 0, "recorded before it was synced");
    let (_t, c) = crash_copy("before");
    assert_eq!(c.stats().cached_bytes, 0);

    cache.flush().unwrap();
    assert_eq!(on_disk(), 0b111);
    let (_t, c) = crash_copy("after");
    assert_eq!(c.stats().cached_bytes, 3 * BS);
    let b = cached(&c, &fake);
    assert!(nowait(&b, 0, 3 * BS as usize).unwrap() == fake.data[..3 * BS as usize]);

    // Eviction: off the disk map at once.
    blob.evict(BS, 1);
    assert_eq!(on_disk(), 0b101);
    // Written, evicted and written again before any flush: recorded once synced.
    let _ = read(&blob, 5 * BS, 10);
    blob.evict(5 * BS, 1);
    let _ = read(&blob, 5 * BS, 10);
    assert_eq!(on_disk(), 0b101);
    drop(blob); // the last handle flushes
    assert_eq!(on_disk(), 0b10_0101);
    drop(cache);

    // In the background, shortly after the writes.
    let dir2 = tmp.path().join("cache2");
    let cache =
        BlobCache::open_with(&cfg(&dir2, 1 << 30, BS), &dir2, Duration::from_millis(50)).unwrap();
    let blob = cached(&cache, &fake);
    let _ = read(&blob, 2 * BS, 10);
    let map2 = paths_of(&cache, &fake).1;
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::read(&map2).unwrap()[META_LEN as usize] != 0b100 {
        assert!(Instant::now() < deadline, "not flushed in the background");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = data_path;
}

#[test]
fn blob_cache_rejects_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path(), 1 << 30, BS);
    c.refill_kb = 3;
    assert!(BlobCache::open(&c, tmp.path()).is_err());
    let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
    let fake = Fake::new(BS as usize, 10);
    let blob = cached(&cache, &fake);
    // The same digest with another size (one of them is wrong): an entry of its own.
    let mut other = Fake::new(2 * BS as usize, 10);
    Arc::get_mut(&mut other).unwrap().digest = fake.digest.clone();
    let first = blob;
    let blob = CachedBlob::with_source(cache.clone(), other.clone()).unwrap();
    assert_eq!(read(&first, 0, 10), &fake.data[..10]);
    assert_eq!(
        read(&blob, BS, 10),
        &other.data[BS as usize..BS as usize + 10]
    );
    let mut bad = Fake::new(10, 11);
    Arc::get_mut(&mut bad).unwrap().digest = "sha256:../../x".into();
    assert!(CachedBlob::with_source(cache.clone(), bad).is_err());
    // A size no blob has (from a descriptor): refused, not allocated for.
    struct Huge(Arc<Fake>);
    impl BlockSource for Huge {
        fn fetch_ranges(&self, r: &[(u64, usize)]) -> io::Result<Vec<Vec<u8>>> {
            self.0.fetch_ranges(r)
        }
        fn size(&self) -> u64 {
            MAX_BLOB_SIZE + 1
        }
        fn name(&self) -> &str {
            self.0.name()
        }
        fn digest(&self) -> &str {
            self.0.digest()
        }
        fn origin(&self) -> String {
            self.0.origin()
        }
    }
    let huge = Arc::new(Huge(Fake::new(10, 12)));
    let e = CachedBlob::with_source(cache.clone(), huge).err().unwrap();
    assert!(
        format!("{e:#}").contains("larger than the cache takes"),
        "{e:#}"
    );
    // Reads at or past the end, empty reads.
    assert_eq!(read(&blob, 2 * BS, 10).len(), 0);
    assert_eq!(read(&blob, 0, 0).len(), 0);
    assert_eq!(nowait(&blob, 5 * BS, 10).unwrap().len(), 0);
}

/// Blocks cached from one registry repository are not served to a reader of the same
/// digest from another: a hostile registry that served a tampered copy under the real
/// digest poisons its own entry only, also after a restart.
#[test]
fn blob_cache_origins_do_not_share_unverified_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let honest = Fake::new(8 * BS as usize, 31);
    let mut bad = honest.data.clone();
    for b in 0..8 {
        bad[(b * BS + 100) as usize] ^= 0xff;
    }
    let evil = Fake::served(bad.clone(), &honest.digest, "127.0.0.1:6000/evil/app");
    let honest = Fake::served(honest.data.clone(), &honest.digest, "127.0.0.1:5000/app");
    {
        let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
        let e = cached(&cache, &evil);
        assert!(read(&e, 0, 8 * BS as usize) == bad, "its own bytes");
        cache.flush().unwrap();
        let h = cached(&cache, &honest);
        assert!(
            is_would_block(nowait(&h, 0, 200)),
            "the other origin's block is served"
        );
        assert!(read(&h, 0, 8 * BS as usize) == honest.data);
        assert_eq!(honest.fetched(), 8 * BS, "fetched its own bytes");
        // Both entries live side by side.
        assert!(nowait(&e, 0, 8 * BS as usize).unwrap() == bad);
        assert!(nowait(&h, 0, 8 * BS as usize).unwrap() == honest.data);
    }
    // After a restart, each origin still gets its own bytes only.
    let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
    let third = Fake::served(honest.data.clone(), &honest.digest, "127.0.0.1:7000/other");
    let t = cached(&cache, &third);
    assert!(is_would_block(nowait(&t, 0, 200)));
    assert!(read(&t, 3 * BS, BS as usize) == honest.data[3 * BS as usize..4 * BS as usize]);
    let h = cached(&cache, &honest);
    assert!(nowait(&h, 0, 8 * BS as usize).unwrap() == honest.data);
}

/// One image's size claim for a digest cannot break another's entry: the two sizes are
/// two entries, each works (or fails) alone, in either order, open or closed.
#[test]
fn blob_cache_size_lie_does_not_break_another_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
    let real = Fake::new(4 * BS as usize, 41);
    let honest = Fake::served(real.data.clone(), &real.digest, "127.0.0.1:5000/app");
    let mut long = real.data.clone();
    long.extend_from_slice(&random_bytes(2 * BS as usize, 42));
    for origin in ["127.0.0.1:6000/evil", "127.0.0.1:5000/app"] {
        let liar = Fake::served(long.clone(), &real.digest, origin);
        // The liar first, still open: the honest open and reads work.
        let l = cached(&cache, &liar);
        assert!(read(&l, 0, 6 * BS as usize) == long);
        let h = CachedBlob::with_source(cache.clone(), honest.clone())
            .unwrap_or_else(|e| panic!("{origin}: honest open: {e:#}"));
        assert!(read(&h, 0, 4 * BS as usize) == real.data, "{origin}");
        // The honest entry, closed, survives the liar's next open.
        drop(h);
        drop(l);
        let before = honest.fetched();
        let l = cached(&cache, &liar);
        let h = cached(&cache, &honest);
        assert!(
            nowait(&h, 0, 4 * BS as usize).unwrap() == real.data,
            "{origin}: the honest entry was dropped"
        );
        assert!(read(&l, 4 * BS, 2 * BS as usize) == long[4 * BS as usize..]);
        assert_eq!(honest.fetched(), before, "{origin}");
        drop(h);
        drop(l);
        // The honest entry first, then the liar: the same.
        let h = cached(&cache, &honest);
        let l = cached(&cache, &liar);
        assert!(nowait(&h, 0, 4 * BS as usize).unwrap() == real.data);
        assert_eq!(
            read(&l, 5 * BS, 10),
            &long[5 * BS as usize..5 * BS as usize + 10]
        );
    }
}

/// Once a whole download matched the digest, every origin shares one verified entry: the
/// blocks the downloading origin had cached are copied in from the download, and a block
/// fetched into it must hash as the download's did (a tampered one fails, uncached).
#[test]
fn blob_cache_verified_blob_is_shared_across_origins() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let real = Fake::new(8 * BS as usize + 500, 61);
    let a = Fake::served(real.data.clone(), &real.digest, "127.0.0.1:5000/a");
    let b = Fake::served(real.data.clone(), &real.digest, "127.0.0.1:5001/b");
    let mut bad = real.data.clone();
    bad[6 * BS as usize + 1] ^= 1;
    let evil = Fake::served(bad, &real.digest, "127.0.0.1:6000/evil");
    let file = tmp.path().join("download");
    fs::write(&file, &real.data).unwrap();
    {
        let cache = open_cache(&cfg(&dir, 1 << 30, BS), &dir);
        let ra = cached(&cache, &a);
        assert!(!ra.is_verified());
        let _ = read(&ra, 0, 3 * BS as usize);
        // A file that is not the blob verifies nothing.
        let wrong = tmp.path().join("wrong");
        fs::write(&wrong, &real.data[1..]).unwrap();
        let e = cache
            .add_verified(&real.digest, &wrong, Some(&ra))
            .unwrap_err();
        assert!(format!("{e:#}").contains("not sha256:"), "{e:#}");
        assert!(!cached(&cache, &b).is_verified());

        cache.add_verified(&real.digest, &file, Some(&ra)).unwrap();
        let rb = cached(&cache, &b);
        assert!(rb.is_verified());
        assert!(nowait(&rb, 0, 3 * BS as usize).unwrap() == real.data[..3 * BS as usize]);
        assert_eq!(b.fetched(), 0, "copied from the download");
        assert!(read(&rb, 5 * BS, 10) == real.data[5 * BS as usize..5 * BS as usize + 10]);
        assert_eq!(b.fetched(), BS);
        // Another origin reads what b fetched, and cannot put its tampered block in.
        let re = cached(&cache, &evil);
        assert!(re.is_verified());
        assert!(
            nowait(&re, 5 * BS, 10).unwrap() == real.data[5 * BS as usize..5 * BS as usize + 10]
        );
        let mut buf = vec![0u8; 10];
        let e = re.read_at(&mut buf, 6 * BS).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        assert!(is_would_block(nowait(&re, 6 * BS, 10)));
        assert!(read(&rb, 6 * BS, 10) == real.data[6 * BS as usize..6 * BS as usize + 10]);
        // An image that claims another size for a verified digest is refused.
        let liar = Fake::served(
            real.data[..4 * BS as usize].to_vec(),
            &real.digest,
            "127.0.0.1:6000/evil",
        );
        let e = CachedBlob::with_source(cache.clone(), liar).unwrap_err();
        assert!(format!("{e:#}").contains("matched the digest"), "{e:#}");
    }
    // After a restart: the same, for a new origin too.
    let cache = open_cache(&cfg(&dir, 1 << 30, BS), &dir);
    let c = Fake::served(real.data.clone(), &real.digest, "127.0.0.1:5002/c");
    let rc = cached(&cache, &c);
    assert!(rc.is_verified());
    assert!(
        nowait(&rc, 5 * BS, 2 * BS as usize).unwrap()
            == real.data[5 * BS as usize..7 * BS as usize]
    );
    assert_eq!(c.fetched(), 0);
    // Damaged block hashes drop the verified entry (never trusted, never wrongly refusing).
    let sums = sums_path(&rc.state.map_path);
    drop(rc);
    drop(cache);
    let f = OpenOptions::new().write(true).open(&sums).unwrap();
    f.write_all_at(&[0xAA; 4], META_LEN + 40).unwrap();
    // Named: the hash over the block hashes (after them) no longer matches.
    let key = Key {
        scope: Scope::Verified,
        digest: real.digest.clone(),
        size: real.data.len() as u64,
    };
    let map = sums.with_extension("map");
    let hashes_end = META_LEN + 9 * 32; // 9 blocks
    match BlobState::load((map.with_extension("data"), map), &key, BS).err() {
        Some(CacheError::BadRecord { path, offset, .. }) => {
            assert_eq!((path, offset), (sums.clone(), hashes_end))
        }
        other => panic!("{other:?}"),
    }
    let cache = open_cache(&cfg(&dir, 1 << 30, BS), &dir);
    assert!(!sums.exists());
    let rc = cached(&cache, &c);
    assert!(!rc.is_verified());
    assert!(is_would_block(nowait(&rc, 0, 10)));
}

/// Files of the earlier layout (one entry per digest, whoever served it) are deleted at
/// start; an entry moved into another origin's directory is not taken as that origin's.
#[test]
fn blob_cache_does_not_trust_old_or_moved_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let fake = Fake::new(4 * BS as usize, 71);
    let other = Fake::served(fake.data.clone(), &fake.digest, "127.0.0.1:7000/other");
    let (data, map) = {
        let cache = open_cache(&cfg(&dir, 1 << 30, BS), &dir);
        let _ = read(&cached(&cache, &fake), 0, 4 * BS as usize);
        paths_of(&cache, &fake)
    };
    let old = dir.join("sha256");
    fs::create_dir_all(&old).unwrap();
    let hex_digest = &fake.digest[7..];
    fs::copy(&data, old.join(format!("{hex_digest}.data"))).unwrap();
    fs::copy(&map, old.join(format!("{hex_digest}.map"))).unwrap();
    // The entry's files under the other origin's name.
    let (odata, omap) = {
        let c = BlobCache::open(
            &cfg(&tmp.path().join("x"), 1 << 30, BS),
            &tmp.path().join("x"),
        )
        .unwrap();
        let p = paths_of(&c, &other);
        let rel = |p: &Path| dir.join(p.strip_prefix(tmp.path().join("x")).unwrap());
        (rel(&p.0), rel(&p.1))
    };
    fs::create_dir_all(omap.parent().unwrap()).unwrap();
    fs::rename(&data, &odata).unwrap();
    fs::rename(&map, &omap).unwrap();
    let cache = open_cache(&cfg(&dir, 1 << 30, BS), &dir);
    assert!(!old.exists(), "the earlier version's files are left");
    assert_eq!(cache.stats().cached_bytes, 0);
    assert!(!omap.exists() && !odata.exists());
    let r = cached(&cache, &other);
    assert!(is_would_block(nowait(&r, 0, 10)));
}

/// A failed sync of the data file loses the blocks written before it (Linux reports a
/// writeback error once and marks the pages clean, so a later sync succeeds over lost
/// data): they are not recorded, not served, and a read fetches them again.
#[test]
fn blob_cache_drops_blocks_whose_sync_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let cache =
        BlobCache::open_with(&cfg(&dir, 1 << 30, BS), &dir, Duration::from_secs(3600)).unwrap();
    let fake = Fake::new(4 * BS as usize, 81);
    let blob = cached(&cache, &fake);
    let map = paths_of(&cache, &fake).1;
    let on_disk = || fs::read(&map).unwrap()[META_LEN as usize];
    let _ = read(&blob, 0, 2 * BS as usize);
    blob.state.fail_sync.store(true, SeqCst);
    let e = cache.flush().unwrap_err();
    assert!(e.to_string().contains(&fake.digest), "{e}");
    // The next sync succeeds: the lost blocks must not be recorded.
    cache.flush().unwrap();
    assert_eq!(on_disk(), 0, "blocks whose sync failed were recorded");
    assert!(
        is_would_block(nowait(&blob, 0, 10)),
        "served after a failed sync"
    );
    assert_eq!(blob.cached_bytes(), 0);
    assert_eq!(cache.stats().cached_bytes, 0);
    let before = fake.fetched();
    assert!(read(&blob, 0, 2 * BS as usize) == fake.data[..2 * BS as usize]);
    assert_eq!(fake.fetched() - before, 2 * BS, "fetched again");
    cache.flush().unwrap();
    assert_eq!(on_disk(), 0b11);
}

/// Eviction over a large blob with few blocks cached (candidates are its set bits) still
/// takes the least recently used blocks, and they come back right.
#[test]
fn blob_cache_evicts_lru_blocks_of_a_large_sparse_blob() {
    /// 16 GiB of bytes made from their offsets.
    struct Synth(AtomicU64);
    const SIZE: u64 = 16 << 30;
    fn byte(o: u64) -> u8 {
        (o.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
    }
    impl BlockSource for Synth {
        fn fetch_ranges(&self, ranges: &[(u64, usize)]) -> io::Result<Vec<Vec<u8>>> {
            self.0.fetch_add(ranges.len() as u64, SeqCst);
            Ok(ranges
                .iter()
                .map(|&(off, len)| (off..off + len as u64).map(byte).collect())
                .collect())
        }
        fn size(&self) -> u64 {
            SIZE
        }
        fn name(&self) -> &str {
            "synth"
        }
        fn digest(&self) -> &str {
            "sha256:5555555555555555555555555555555555555555555555555555555555555555"
        }
        fn origin(&self) -> String {
            "127.0.0.1:5000/synth".into()
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let cache = open_cache(&cfg(tmp.path(), 4 * BS, BS), tmp.path());
    let src = Arc::new(Synth(AtomicU64::new(0)));
    let blob = CachedBlob::with_source(cache.clone(), src.clone()).unwrap();
    let last = SIZE / BS - 1;
    let check = |b: u64| {
        let got = read(&blob, b * BS + 3, 100);
        assert!(
            got.iter().zip(b * BS + 3..).all(|(&v, o)| v == byte(o)),
            "block {b}"
        );
    };
    for b in [7, 100_000, 200_000, last, 7] {
        check(b);
    }
    assert_eq!(cache.stats().cached_bytes, 4 * BS);
    // Over the limit: down to 90% of it, the two least recently used go.
    check(150_000);
    for (b, kept) in [
        (7, true),
        (100_000, false),
        (200_000, false),
        (last, true),
        (150_000, true),
    ] {
        assert_eq!(nowait(&blob, b * BS, 10).is_ok(), kept, "block {b}");
    }
    assert_eq!(cache.stats().cached_bytes, 3 * BS);
    let calls = src.0.load(SeqCst);
    check(100_000);
    assert_eq!(src.0.load(SeqCst), calls + 1, "fetched again");
}

/// The sizes, in blocks, of the ranges of each fetch call so far.
fn call_blocks(fake: &Fake) -> Vec<Vec<u64>> {
    lock(&fake.ranges)
        .iter()
        .map(|call| call.iter().map(|r| (r.1 as u64).div_ceil(BS)).collect())
        .collect()
}

/// A sequential run grows the refill (each miss fetches twice the last refill, ahead of the
/// read, up to 4 MiB); a scattered read after it fetches its own block only; the bytes are
/// right, and the blocks fetched ahead are in the cache after a restart.
#[test]
fn blob_cache_sequential_reads_grow_the_refill() {
    let tmp = tempfile::tempdir().unwrap();
    let max = (fetch::MAX_REFILL_BYTES / BS) as usize;
    let fake = Fake::new(400 * BS as usize + 77, 51);
    {
        let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
        let blob = cached(&cache, &fake);
        // 16 KiB reads from 0 to 12 MiB.
        let mut off = 0u64;
        while off < 192 * BS {
            assert!(
                read(&blob, off, 16 << 10) == fake.data[off as usize..off as usize + (16 << 10)]
            );
            off += 16 << 10;
        }
        let sizes: Vec<u64> = call_blocks(&fake).iter().map(|c| c.iter().sum()).collect();
        let want: Vec<u64> = [1, 2, 4, 8, 16, 32, 64, 64]
            .into_iter()
            .map(|b: u64| b.min(max as u64))
            .collect();
        assert_eq!(sizes[..want.len()], want[..], "{sizes:?}");
        assert!(sizes.iter().all(|&s| s <= max as u64), "{sizes:?}");
        // Each a single range (one request), each block once.
        assert!(call_blocks(&fake).iter().all(|c| c.len() == 1));
        assert!(lock(&fake.per_block).values().all(|&c| c == 1));
        let seq_bytes = fake.fetched();
        assert!((192 * BS..=192 * BS + fetch::MAX_REFILL_BYTES).contains(&seq_bytes));

        // Scattered reads, far from the run (backwards, two blocks apart): one block each,
        // nothing ahead.
        let calls = fake.calls.load(SeqCst);
        let mut b = 398u64;
        while b > 360 {
            let off = b * BS + 1000;
            assert_eq!(
                read(&blob, off, 500),
                &fake.data[off as usize..off as usize + 500]
            );
            b -= 3;
        }
        let scattered = fake.calls.load(SeqCst) - calls;
        assert_eq!(scattered, 13);
        assert_eq!(
            fake.fetched() - seq_bytes,
            13 * BS,
            "one block per scattered read"
        );
        // Two in a row again: the second continues the first, and fetches ahead.
        let _ = read(&blob, 257 * BS, 100);
        let _ = read(&blob, 258 * BS, 100);
        let last = call_blocks(&fake).last().unwrap().clone();
        assert_eq!(last, vec![2]);
    }
    // A restart: every fetched block (read or fetched ahead) is served from disk, right.
    let fetched = fake.fetched();
    let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
    let blob = cached(&cache, &fake);
    let end = 192 * BS as usize;
    let got = nowait(&blob, 0, end).unwrap();
    assert_eq!(
        crate::oci::sha256_digest(&got).to_string(),
        crate::oci::sha256_digest(&fake.data[..end]).to_string()
    );
    assert_eq!(cache.stats().cached_bytes, fetched);
    assert!(read(&blob, 0, fake.data.len()) == fake.data);
    let pb = lock(&fake.per_block).clone();
    assert!(
        (0..192).all(|b| pb[&b] == 1),
        "cached blocks are not fetched again"
    );
}

/// Files read in turn (a start interleaves several): each sequential run grows its own
/// refill, as a run read alone does; more runs at once than the refill follows
/// ([`fetch::RUNS`]) fetch one block per miss. The bytes are right throughout.
#[test]
fn blob_cache_interleaved_sequential_reads_each_grow_their_refill() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = Fake::new(2000 * BS as usize, 53);
    let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
    let blob = cached(&cache, &fake);
    // Three runs, 63 blocks each, a 16 KiB read of each in turn.
    let starts = [0u64, 100 * BS, 200 * BS];
    let mut at = starts;
    while at[0] < 63 * BS {
        for off in &mut at {
            let got = read(&blob, *off, 16 << 10);
            assert!(got == fake.data[*off as usize..*off as usize + (16 << 10)]);
            *off += 16 << 10;
        }
    }
    // Each run alone: 1, 2, 4, 8, 16, 32 blocks (all 63 in six fetches), each block once.
    let mut per_run = vec![Vec::new(); starts.len()];
    for call in lock(&fake.ranges).iter() {
        assert_eq!(call.len(), 1, "one range per fetch: {call:?}");
        let (off, len) = call[0];
        let run = starts.iter().rposition(|&s| off >= s).unwrap();
        per_run[run].push((len as u64).div_ceil(BS));
    }
    for sizes in &per_run {
        assert_eq!(sizes, &[1, 2, 4, 8, 16, 32], "{per_run:?}");
    }
    assert!(lock(&fake.per_block).values().all(|&c| c == 1));

    // One run more than the refill follows, far apart: each miss fetches its own block.
    let calls = fake.calls.load(SeqCst);
    let runs = fetch::RUNS as u64 + 1;
    let mut at: Vec<u64> = (0..runs).map(|r| (400 + r * 100) * BS).collect();
    for _ in 0..4 {
        for off in &mut at {
            let got = read(&blob, *off, BS as usize);
            assert!(got == fake.data[*off as usize..(*off + BS) as usize]);
            *off += BS;
        }
    }
    assert_eq!(fake.calls.load(SeqCst) - calls, 4 * runs);
    assert!(call_blocks(&fake)[calls as usize..]
        .iter()
        .all(|c| c == &[1]));
}

/// Readers of one missing range at the same time: one fetch, every reader right.
#[test]
fn blob_cache_identical_concurrent_misses_make_one_request() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
    let fake = Fake::new(16 * BS as usize, 52);
    *lock(&fake.delay) = Duration::from_millis(200);
    let blob = Arc::new(cached(&cache, &fake));
    let start = Arc::new(std::sync::Barrier::new(8));
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let (blob, start, data) = (blob.clone(), start.clone(), fake.data.clone());
            std::thread::spawn(move || {
                start.wait();
                let off = 5 * BS + 300;
                assert!(read(&*blob, off, 3000) == data[off as usize..off as usize + 3000]);
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    assert_eq!(fake.calls.load(SeqCst), 1);
    assert_eq!(fake.fetched(), BS);
}

/// A registry error during a refill that reached ahead: every reader gets it (naming the
/// blob), no block of the refill is cached, and the next reads fetch and serve them right.
#[test]
fn blob_cache_failed_refill_ahead_caches_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
    let fake = Fake::new(64 * BS as usize, 53);
    let blob = cached(&cache, &fake);
    let _ = read(&blob, 0, 100);
    let _ = read(&blob, BS, 100); // blocks 1, 2
    fake.fail.store(true, SeqCst);
    let mut buf = vec![0u8; 100];
    let e = blob.read_at(&mut buf, 3 * BS).unwrap_err(); // would be blocks 3..7
    assert!(e.to_string().contains("registry down"), "{e}");
    assert_eq!(
        call_blocks(&fake).len(),
        2,
        "the failed call records no ranges"
    );
    assert_eq!(blob.cached_bytes(), 3 * BS);
    for b in 3..8 {
        assert!(is_would_block(nowait(&blob, b * BS, 10)), "block {b}");
    }
    fake.fail.store(false, SeqCst);
    assert!(read(&blob, 3 * BS, 5 * BS as usize) == fake.data[3 * BS as usize..8 * BS as usize]);
    assert!(read(&blob, 0, fake.data.len()) == fake.data);
}

/// Through a real registry (an HTTP front counting its requests): the missing runs of a read
/// a block apart are one ranged GET; a sequential run makes fewer, growing GETs; the bytes
/// are right; an outage fails the read with the blob's digest named and caches nothing.
#[test]
fn blob_cache_registry_requests_follow_the_access_pattern() {
    use crate::testing::{Fault, Front};
    let (reg, data, digest) = registry_with_blob(6 << 20, 54);
    let front = Front::start(&reg.addr, None);
    let registry = Registry::new(&RegistryConfig {
        timeout_secs: 3.0,
        retries: 1,
        allow_hosts: vec!["127.0.0.1".into()],
        ..Default::default()
    })
    .unwrap();
    let image = format!("{}/test/blob", front.addr);
    let remote = RemoteBlob::new(registry, &image, &digest, data.len() as u64).unwrap();
    let counter = remote.clone();
    let tmp = tempfile::tempdir().unwrap();
    let cache = open_cache(&cfg(tmp.path(), 1 << 30, BS), tmp.path());
    let blob = CachedBlob::new(cache, remote).unwrap();
    let ranges = || -> Vec<String> {
        front
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.target.contains("/blobs/") && s.method == "GET")
            .map(|s| s.range.clone().unwrap_or_default())
            .collect()
    };
    let bs = BS as usize;
    // Blocks 10 and 13 cached, then a read of 9..14: runs [9], [11, 12] in one GET.
    let _ = read(&blob, 10 * BS, 10);
    let _ = read(&blob, 13 * BS, 10);
    assert!(read(&blob, 9 * BS, 5 * bs) == data[9 * bs..14 * bs]);
    let got = ranges();
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[2], format!("bytes={}-{}", 9 * BS, 13 * BS - 1));
    assert_eq!(counter.fetched_bytes(), 6 * BS);

    // 32 KiB reads through 2 MiB from 1 MiB on: 6 growing GETs (1, 2, 4, 8, 16 blocks...).
    let before = ranges().len();
    let mut off = 1 << 20;
    while off < 3 << 20 {
        assert!(read(&blob, off as u64, 32 << 10) == data[off..off + (32 << 10)]);
        off += 32 << 10;
    }
    let seq = &ranges()[before..];
    assert_eq!(seq.len(), 6, "{seq:?}");
    assert_eq!(seq[0], format!("bytes={}-{}", 1 << 20, (1 << 20) + BS - 1));

    // The registry fails: an uncached read fails naming the digest; nothing is cached.
    *front.always.lock().unwrap() = Some(Fault::Status(503));
    let cached = blob.cached_bytes();
    let mut buf = vec![0u8; 100];
    let e = blob.read_at(&mut buf, 5 << 20).unwrap_err();
    assert!(e.to_string().contains(&digest), "{e}");
    assert_eq!(blob.cached_bytes(), cached);
    *front.always.lock().unwrap() = None;
    assert!(read(&blob, 0, data.len()) == data);
}

/// `[cache] whole_blob_kb`: a blob up to that size comes whole with its first miss, in one
/// request (a container's start reads most of a small layer, one page fault at a time
/// otherwise); a larger one is fetched as reads ask.
#[test]
fn small_blobs_are_fetched_whole_on_their_first_miss() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path(), 1 << 30, BS);
    c.whole_blob_kb = (20 * BS) >> 10;
    let cache = open_cache(&c, tmp.path());
    let small = Fake::new(20 * BS as usize - 100, 61);
    let blob = cached(&cache, &small);
    assert_eq!(
        read(&blob, 5 * BS + 10, 100),
        &small.data[5 * BS as usize + 10..][..100]
    );
    assert_eq!(small.calls.load(SeqCst), 1);
    assert_eq!(small.fetched(), small.data.len() as u64 - 5 * BS);
    // The head, before the first miss, is the next miss: the rest of the blob, once.
    assert_eq!(read(&blob, 10, 100), &small.data[10..110]);
    assert_eq!(small.calls.load(SeqCst), 2);
    assert_eq!(small.fetched(), small.data.len() as u64);
    assert!(nowait(&blob, 0, small.data.len()).unwrap() == small.data);

    let large = Fake::new(20 * BS as usize + 1, 62);
    let blob = cached(&cache, &large);
    assert_eq!(
        read(&blob, 5 * BS + 10, 100),
        &large.data[5 * BS as usize + 10..][..100]
    );
    assert_eq!(large.fetched(), BS, "one block, as reads ask");
    assert!(CacheConfig {
        whole_blob_kb: 4097,
        file_chunk_kb: 0,
        ..CacheConfig::default()
    }
    .validate()
    .is_err());
}
