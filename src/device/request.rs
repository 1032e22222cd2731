//! One block request against the image: a read tried on the queue thread without blocking
//! ([`try_read_inline`]), or any request run by a worker, where blocking is fine
//! ([`run_request`] → [`handle_request_range`]). Both fail with EIO rather than panic. The
//! operations are ublk's op codes, for the FUSE frontend too (its read / write / fsync /
//! fallocate map onto them).

use crate::metrics::DeviceMetrics;
use crate::pool::panic_text;
use libublk::sys;
use ovbd_format::ImageStack;

/// A worker's job for one request of device `dev_id`: [`handle_request_range`]'s answer, or
/// EIO if serving it panics (a bug must fail one request, not hang its tag or kill a worker).
/// Counted in `metrics` (atomics only).
pub(super) fn run_request(
    dev: &dyn std::fmt::Display,
    metrics: &DeviceMetrics,
    image: &ImageStack,
    op: u32,
    offset: u64,
    nr_bytes: u64,
    buf: &mut [u8],
) -> i32 {
    let started = std::time::Instant::now();
    log::trace!("{dev}: op {op} at {offset} (+{nr_bytes}) on a worker");
    let run =
        std::panic::AssertUnwindSafe(|| handle_request_range(image, op, offset, nr_bytes, buf));
    let r = std::panic::catch_unwind(run).unwrap_or_else(|p| {
        log::error!(
            "{dev}: op {op} at {offset} (+{nr_bytes}) panicked: {}; failing it with EIO",
            panic_text(&*p)
        );
        -libc::EIO
    });
    metrics.record(op, nr_bytes, r, started.elapsed());
    r
}

/// A read served on the queue thread if its data is at hand: `None` if it would wait. A panic
/// fails the read with EIO rather than take down the queue thread. A served read is counted
/// in `metrics`.
pub(super) fn try_read_inline(
    dev: &dyn std::fmt::Display,
    metrics: &DeviceMetrics,
    image: &ImageStack,
    buf: &mut [u8],
    offset: u64,
) -> Option<i32> {
    let started = std::time::Instant::now();
    let r = try_read_inline_uncounted(dev, image, buf, offset);
    if let Some(r) = r {
        let len = buf.len() as u64;
        metrics.record(sys::UBLK_IO_OP_READ, len, r, started.elapsed());
    }
    r
}

fn try_read_inline_uncounted(
    dev: &dyn std::fmt::Display,
    image: &ImageStack,
    buf: &mut [u8],
    offset: u64,
) -> Option<i32> {
    let len = buf.len();
    let run = std::panic::AssertUnwindSafe(|| image.try_read(buf, offset));
    match std::panic::catch_unwind(run) {
        Ok(Ok(true)) => Some(len as i32),
        Ok(Ok(false)) => None,
        Ok(Err(e)) => Some(-e.errno()),
        Err(p) => {
            log::error!(
                "{dev}: read at {offset} (+{len}) panicked: {}; failing it with EIO",
                panic_text(&*p)
            );
            Some(-libc::EIO)
        }
    }
}

/// Serves one block request against the image: the byte count on success, `-errno` on failure.
#[cfg(test)]
fn handle_request(image: &ImageStack, op: u32, offset: u64, buf: &mut [u8]) -> i32 {
    handle_request_range(image, op, offset, buf.len() as u64, buf)
}

/// As `handle_request` (tests), for a request of `nr_bytes`: READ / WRITE move `buf` (its length),
/// DISCARD / WRITE_ZEROES cover all `nr_bytes`, which may exceed the I/O buffer.
pub(super) fn handle_request_range(
    image: &ImageStack,
    op: u32,
    offset: u64,
    nr_bytes: u64,
    buf: &mut [u8],
) -> i32 {
    let len = buf.len() as u64;
    let r = match op {
        // FLUSH carries no range (its start sector is u64::MAX on 6.12): handle it first.
        sys::UBLK_IO_OP_FLUSH => image.flush().map(|_| 0),
        sys::UBLK_IO_OP_READ => image.read(buf, offset).map(|_| len as i32),
        sys::UBLK_IO_OP_WRITE => image.write(buf, offset).map(|_| len as i32),
        sys::UBLK_IO_OP_DISCARD => image.discard(offset, nr_bytes).map(|_| 0),
        sys::UBLK_IO_OP_WRITE_ZEROES => image.write_zeroes(offset, nr_bytes).map(|_| 0),
        _ => return -libc::EOPNOTSUPP,
    };
    match r {
        Ok(n) => n,
        Err(e) => {
            log::warn!("op {op} at {offset} (+{len}): {e}");
            -e.errno()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::ublk::IO_BUF_BYTES;
    use ovbd_format::{RwLayer, RwMode};
    use std::sync::Arc;

    #[test]
    fn requests_map_to_image_operations() {
        let dir = tempfile::tempdir().unwrap();
        let rw = RwLayer::create(
            &dir.path().join("d"),
            &dir.path().join("i"),
            1 << 20,
            RwMode::Append,
            None,
        )
        .unwrap();
        let img = ImageStack::writable(None, rw).unwrap();
        let mut data = vec![7u8; 8192];
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_WRITE, 4096, &mut data),
            8192
        );
        let mut back = vec![0u8; 8192];
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_READ, 4096, &mut back),
            8192
        );
        assert_eq!(back, data);
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_FLUSH, u64::MAX, &mut []),
            0
        );
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_DISCARD, 4096, &mut vec![0u8; 4096]),
            0
        );
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_READ, 4096, &mut back),
            8192
        );
        assert!(back[..4096].iter().all(|&b| b == 0) && back[4096..].iter().all(|&b| b == 7));
        // Out of range and unaligned requests fail without touching anything.
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_READ, 1 << 20, &mut back),
            -libc::EINVAL
        );
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_READ, 100, &mut back),
            -libc::EINVAL
        );
        assert_eq!(handle_request(&img, 99, 0, &mut back), -libc::EOPNOTSUPP);
    }

    #[test]
    fn discard_covers_more_than_the_io_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let rw = RwLayer::create(
            &dir.path().join("d"),
            &dir.path().join("i"),
            8 << 20,
            RwMode::Append,
            None,
        )
        .unwrap();
        let img = ImageStack::writable(None, rw).unwrap();
        let mut data = vec![7u8; 4 << 20];
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_WRITE, 0, &mut data),
            4 << 20
        );
        // A 4 MiB discard arrives with a buffer of at most IO_BUF_BYTES.
        let mut small = vec![0u8; IO_BUF_BYTES as usize];
        for op in [sys::UBLK_IO_OP_DISCARD, sys::UBLK_IO_OP_WRITE_ZEROES] {
            assert_eq!(
                handle_request(&img, sys::UBLK_IO_OP_WRITE, 0, &mut data),
                4 << 20
            );
            assert_eq!(handle_request_range(&img, op, 0, 4 << 20, &mut small), 0);
            let mut back = vec![1u8; 4 << 20];
            assert_eq!(
                handle_request(&img, sys::UBLK_IO_OP_READ, 0, &mut back),
                4 << 20
            );
            assert!(back.iter().all(|&b| b == 0), "op {op} left data behind");
        }
    }

    #[test]
    fn read_only_image_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (d, i) = (dir.path().join("d"), dir.path().join("i"));
        RwLayer::create(&d, &i, 1 << 20, RwMode::Append, None)
            .unwrap()
            .seal()
            .unwrap();
        let sealed = ovbd_format::LsmtFile::open(std::sync::Arc::new(
            ovbd_format::FileSource::open(&d).unwrap(),
        ))
        .unwrap();
        let img = ImageStack::read_only(ovbd_format::LayerStack::new(vec![sealed]).unwrap());
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_WRITE, 0, &mut [1u8; 512]),
            -libc::EROFS
        );
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_DISCARD, 0, &mut [0u8; 512]),
            -libc::EROFS
        );
        assert_eq!(
            handle_request(&img, sys::UBLK_IO_OP_READ, 0, &mut [1u8; 512]),
            512
        );
    }

    /// A source that panics on reads once armed (a bug in a format or cache layer).
    struct PanicSource {
        inner: ovbd_format::FileSource,
        armed: std::sync::atomic::AtomicBool,
    }

    impl ovbd_format::ReadAt for PanicSource {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            if self.armed.load(std::sync::atomic::Ordering::SeqCst) {
                panic!("injected panic reading at {offset}");
            }
            self.inner.read_at(buf, offset)
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn name(&self) -> &str {
            "panicking source"
        }
        fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            self.read_at(buf, offset)
        }
    }

    #[test]
    fn a_panicking_read_fails_with_eio() {
        let dir = tempfile::tempdir().unwrap();
        let (d, i) = (dir.path().join("d"), dir.path().join("i"));
        let rw = RwLayer::create(&d, &i, 1 << 20, RwMode::Append, None).unwrap();
        rw.write(&[5u8; 4096], 0).unwrap();
        rw.seal().unwrap();
        let src = Arc::new(PanicSource {
            inner: ovbd_format::FileSource::open(&d).unwrap(),
            armed: false.into(),
        });
        let sealed = ovbd_format::LsmtFile::open(src.clone()).unwrap();
        let img = ImageStack::read_only(ovbd_format::LayerStack::new(vec![sealed]).unwrap());
        let mut buf = vec![0u8; 4096];
        let m = DeviceMetrics::default();
        assert_eq!(
            run_request(&7, &m, &img, sys::UBLK_IO_OP_READ, 0, 4096, &mut buf),
            4096
        );
        src.armed.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            run_request(&7, &m, &img, sys::UBLK_IO_OP_READ, 0, 4096, &mut buf),
            -libc::EIO
        );
        // So does one served on the queue thread.
        assert_eq!(try_read_inline(&7, &m, &img, &mut buf, 0), Some(-libc::EIO));
        // Every request counted; the failed ones as EIO, without bytes.
        assert_eq!(
            (m.reads.get(), m.read_bytes.get(), m.eio.get()),
            (3, 4096, 2)
        );
    }

    /// A layer blob (tar-wrapped ZFile if `zfile`, else a bare LSMT) holding `data` at
    /// virtual offset 1 MiB of a 4 MiB disk.
    fn layer_blob(dir: &std::path::Path, data: &[u8], zfile: bool) -> Vec<u8> {
        let (d, i) = (dir.join("layer.data"), dir.join("layer.index"));
        let rw = RwLayer::create(&d, &i, 4 << 20, RwMode::Append, None).unwrap();
        rw.write(data, 1 << 20).unwrap();
        rw.seal().unwrap();
        if !zfile {
            return std::fs::read(&d).unwrap();
        }
        let lsmt = ovbd_format::FileSource::open(&d).unwrap();
        let out_path = dir.join("layer.blob");
        let mut out = std::fs::File::create(&out_path).unwrap();
        let opts = ovbd_format::layer::BlobOptions {
            zfile: Some(ovbd_format::ZFileOptions::default()),
            tar: true,
        };
        ovbd_format::layer::write_blob(&lsmt, &mut out, opts).unwrap();
        std::fs::read(&out_path).unwrap()
    }

    /// The read path through a whole stack (image → layer, bare or ZFile → block cache →
    /// block source): on the queue thread a read that misses the cache must not block, so it
    /// answers "would block" and fetches nothing (the request goes to the pool); the pool's
    /// read may block: it fetches and answers the data; then the queue thread serves it.
    #[test]
    fn a_cache_miss_goes_to_the_pool_and_is_fetched_there() {
        use crate::config::CacheConfig;
        use crate::source::cache::{BlobCache, CachedBlob};
        use crate::testing::{random_bytes, Fake, BS};
        use ovbd_format::{Blocking, LayerStack};
        for zfile in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let data = random_bytes(1 << 20, 7);
            let blob = layer_blob(dir.path(), &data, zfile);
            let digest = crate::oci::sha256_digest(&blob).to_string();
            let fake = Fake::served(blob, &digest, "127.0.0.1:5000/app");
            let cfg = CacheConfig {
                dir: Some(dir.path().join("cache")),
                size_gb: 1.0,
                refill_kb: BS >> 10,
                whole_blob_kb: 0,
                file_chunk_kb: 0,
            };
            let cache = BlobCache::open(&cfg, dir.path()).unwrap();
            let cached = Arc::new(CachedBlob::with_source(cache.clone(), fake.clone()).unwrap());
            let m = DeviceMetrics::default();
            let layer = ovbd_format::open_layer(cached).unwrap();
            let img = ImageStack::read_only(LayerStack::new(vec![layer.lsmt]).unwrap());
            // Opening read the header, index and trailer; the middle of the data is not cached.
            let opened = fake.fetched();
            assert!(opened > 0 && opened < 1 << 20, "{opened}");
            let (at, len) = ((1u64 << 20) + (512 << 10), 64usize << 10);
            let want = &data[512 << 10..(512 << 10) + len];
            let mut buf = vec![0u8; len];
            assert_eq!(
                try_read_inline(&1, &m, &img, &mut buf, at),
                None,
                "zfile {zfile}"
            );
            assert!(
                matches!(
                    img.read_with(&mut buf, at, Blocking::Never),
                    Err(ovbd_format::Error::WouldBlock)
                ),
                "zfile {zfile}"
            );
            assert_eq!(
                fake.fetched(),
                opened,
                "zfile {zfile}: fetched without blocking"
            );
            let op = sys::UBLK_IO_OP_READ;
            assert_eq!(
                run_request(&1, &m, &img, op, at, len as u64, &mut buf),
                len as i32,
                "zfile {zfile}"
            );
            assert!(buf == want, "zfile {zfile}: wrong bytes");
            let fetched = fake.fetched();
            assert!(fetched > opened, "zfile {zfile}");
            // The would-block try is not a request served: one read so far, a cache miss.
            assert_eq!((m.reads.get(), m.read_bytes.get()), (1, len as u64));
            let (hits, misses) = (cache.stats().hit_reads, cache.stats().miss_reads);
            assert!(misses >= 1, "zfile {zfile}: {misses} misses");
            // Cached now: served on the queue thread, nothing fetched.
            let mut again = vec![0u8; len];
            assert_eq!(
                try_read_inline(&1, &m, &img, &mut again, at),
                Some(len as i32)
            );
            assert!(again == want, "zfile {zfile}: wrong bytes inline");
            assert_eq!(fake.fetched(), fetched, "zfile {zfile}");
            assert_eq!((m.reads.get(), m.read_bytes.get()), (2, 2 * len as u64));
            let stats = cache.stats();
            assert!(
                stats.hit_reads > hits,
                "zfile {zfile}: no cache hit counted"
            );
            assert_eq!(stats.miss_reads, misses, "zfile {zfile}");
            assert!(stats.hit_bytes >= len as u64 && stats.fetched_bytes > 0);
        }
    }
}
