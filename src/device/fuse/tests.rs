//! The FUSE frontend's read paths against the image's own reads: spliced replies (plain local
//! layers, from the page cache on the session thread or from disk on the pool) and copied ones
//! (ZFile, small reads), through the image file (any offset) and the loop device over it.

use super::*;
use crate::metrics::DeviceMetrics;
use ovbd_format::layer::{write_blob, BlobOptions};
use ovbd_format::{open_layer_file, LayerStack, LsmtFile, RwLayer, RwMode, ZFileOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

const VSIZE: u64 = 8 << 20;

/// Deterministic bytes (xorshift), different per `seed`.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A sealed layer `dir/name` with `writes` (byte offset, length) of data then `discards`
/// (zeroed mappings); tar-wrapped and/or ZFile-compressed as asked.
fn layer(
    dir: &Path,
    name: &str,
    writes: &[(u64, usize)],
    discards: &[(u64, u64)],
    tar: bool,
    zfile: bool,
) -> LsmtFile {
    let (d, i) = (
        dir.join(format!("{name}.lsmt")),
        dir.join(format!("{name}.idx")),
    );
    let rw = RwLayer::create(&d, &i, VSIZE, RwMode::Append, None).unwrap();
    for (k, &(at, len)) in writes.iter().enumerate() {
        rw.write(&bytes(at ^ k as u64 ^ name.len() as u64, len), at)
            .unwrap();
    }
    for &(at, len) in discards {
        rw.discard(at, len).unwrap();
    }
    rw.seal().unwrap();
    if !tar && !zfile {
        return open_layer_file(&d).unwrap().lsmt;
    }
    let blob = dir.join(name);
    let mut out = File::create(&blob).unwrap();
    let opts = BlobOptions {
        zfile: zfile.then(ZFileOptions::default),
        tar,
    };
    write_blob(&ovbd_format::FileSource::open(&d).unwrap(), &mut out, opts).unwrap();
    open_layer_file(&blob).unwrap().lsmt
}

/// Three plain layers, bottom bare, middle tar-wrapped, top bare: overlapping mappings,
/// holes, zeroed ranges, mappings that end inside 1 MiB reads.
fn plain_lowers(dir: &Path) -> Vec<LsmtFile> {
    vec![
        layer(
            dir,
            "bottom",
            &[(0, 3 << 20), (4 << 20, 3 << 20)],
            &[],
            false,
            false,
        ),
        layer(
            dir,
            "middle",
            &[(512 << 10, 1 << 20), (3 << 20, 1536 << 10), (6 << 20, 4096)],
            &[(2 << 20, 256 << 10)],
            true,
            false,
        ),
        layer(
            dir,
            "top",
            &[(1 << 20, 512), (1536 << 10, 8192), (5 << 20, 700 << 10)],
            &[(4 << 20, 4096), (7 << 20, 64 << 10)],
            false,
            false,
        ),
    ]
}

/// Drops the page cache of the files under `dir` (written, then fsynced), so the next reads
/// of the layers come from disk: spliced on the pool, not the session thread.
fn drop_cache(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.is_file() {
            let f = File::open(&path).unwrap();
            f.sync_all().unwrap();
            // SAFETY: fadvise on a descriptor we own.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

/// The ranges read: 1 MiB ones at every 256 KiB step (across every mapping edge), big odd
/// ones, small ones (copied), and unaligned ones (through the file only).
fn ranges(aligned: bool) -> Vec<(u64, usize)> {
    let mut v: Vec<(u64, usize)> = (0..(VSIZE >> 18) - 3).map(|k| (k << 18, 1 << 20)).collect();
    v.extend([
        (0, VSIZE as usize),
        (4096, 3 << 20),
        (VSIZE - (96 << 10), 96 << 10),
    ]);
    v.extend([
        (1 << 20, 4096),
        (2 << 20, 512),
        ((5 << 20) + 512, 130 << 10),
    ]);
    if !aligned {
        v.extend([
            (1000, 300 << 10),
            ((3 << 20) - 7, 1 << 20),
            (VSIZE - 70_001, 70_001),
        ]);
    }
    v
}

/// What the image reads at `[at, at + len)`.
fn expected(image: &ImageStack, at: u64, len: usize) -> Vec<u8> {
    let start = at & !511;
    let end = (at + len as u64).next_multiple_of(512);
    let mut buf = vec![0u8; (end - start) as usize];
    image.read(&mut buf, start).unwrap();
    let skip = (at - start) as usize;
    buf[skip..skip + len].to_vec()
}

/// A buffer of `len` bytes at a 4 KiB-aligned address (O_DIRECT).
struct Aligned {
    raw: Vec<u8>,
    at: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + 4096];
        let at = raw.as_ptr().align_offset(4096);
        Aligned { raw, at, len }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.raw[self.at..self.at + self.len]
    }
}

/// Reads `ranges` of `path` with O_DIRECT, as `threads` threads at once; checks each against
/// the image.
fn read_and_check(path: &Path, image: &Arc<ImageStack>, ranges: &[(u64, usize)], threads: usize) {
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .unwrap(),
    );
    std::thread::scope(|s| {
        for t in 0..threads {
            let file = file.clone();
            s.spawn(move || {
                for &(at, len) in ranges.iter().skip(t).step_by(threads) {
                    let mut b = Aligned::new(len);
                    file.read_exact_at(b.buf(), at).unwrap_or_else(|e| {
                        panic!("{}: read at {at} (+{len}): {e}", path.display())
                    });
                    assert!(
                        b.buf() == &expected(image, at, len)[..],
                        "{}: [{at}, +{len}) differs from the image",
                        path.display()
                    );
                }
            });
        }
    });
}

struct Served {
    _dir: tempfile::TempDir,
    frontend: Arc<FuseFrontend>,
}

fn serve() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let frontend = FuseFrontend::mount(&dir.path().join("mnt")).unwrap();
    Served {
        _dir: dir,
        frontend,
    }
}

/// Attaches `image` to the frontend `served`.
fn attach(served: &Served, image: &Arc<ImageStack>) -> FuseAttachment {
    served
        .frontend
        .attach(
            image.clone(),
            super::super::pool::device_pool(),
            DeviceMetrics::default(),
        )
        .unwrap()
}

/// Attaches `image`; reads it through its FUSE file and its loop device, with its layers in
/// the page cache and not; returns how many reads were spliced.
fn check_image(served: &Served, image: ImageStack, layers: &Path) -> u64 {
    let image = Arc::new(image);
    let att = attach(served, &image);
    let file = served.frontend.mountpoint.join(&att.file.name);
    let dev = PathBuf::from(format!("/dev/loop{}", att.number));
    for pass in 0..2 {
        if pass == 1 {
            drop_cache(layers);
        }
        read_and_check(&file, &image, &ranges(false), 3);
        if pass == 1 {
            drop_cache(layers);
        }
        read_and_check(&dev, &image, &ranges(true), 3);
    }
    let spliced = att.file.spliced.load(Ordering::Relaxed);
    drop(att);
    spliced
}

#[test]
fn plain_read_only_stacks_are_spliced_and_read_right() {
    let served = serve();
    let dir = tempfile::tempdir().unwrap();
    let image = ImageStack::read_only(LayerStack::new(plain_lowers(dir.path())).unwrap());
    assert!(
        check_image(&served, image, dir.path()) > 0,
        "nothing spliced"
    );
}

#[test]
fn writable_images_are_spliced_and_read_right() {
    let served = serve();
    for mode in [RwMode::Append, RwMode::Sparse] {
        let dir = tempfile::tempdir().unwrap();
        let upper = RwLayer::create(
            &dir.path().join("up.data"),
            &dir.path().join("up.index"),
            0,
            mode,
            None,
        )
        .unwrap();
        let lowers = LayerStack::new(plain_lowers(dir.path())).unwrap();
        let image = ImageStack::writable(Some(lowers), upper).unwrap();
        for (k, at) in [0u64, 768 << 10, 3 << 20, (6 << 20) + 4096]
            .into_iter()
            .enumerate()
        {
            image.write(&bytes(100 + k as u64, 300 << 10), at).unwrap();
        }
        image.discard(2 << 20, 128 << 10).unwrap();
        assert!(
            check_image(&served, image, dir.path()) > 0,
            "{mode:?}: nothing spliced"
        );
    }
}

#[test]
fn zfile_layers_are_copied_and_read_right() {
    let served = serve();
    let dir = tempfile::tempdir().unwrap();
    let z = layer(
        dir.path(),
        "z",
        &[(0, VSIZE as usize)],
        &[(1 << 20, 64 << 10)],
        true,
        true,
    );
    let image = ImageStack::read_only(LayerStack::new(vec![z]).unwrap());
    assert_eq!(check_image(&served, image, dir.path()), 0);
}

#[test]
fn a_truncated_layer_fails_its_damaged_range_only() {
    let served = serve();
    let dir = tempfile::tempdir().unwrap();
    let l = layer(dir.path(), "l", &[(0, 4 << 20)], &[], false, false);
    let image = Arc::new(ImageStack::read_only(LayerStack::new(vec![l]).unwrap()));
    // The data lies after the 4 KiB header: its second half is cut off.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("l.lsmt"))
        .unwrap();
    f.set_len(4096 + (2 << 20)).unwrap();
    let att = attach(&served, &image);
    let path = served.frontend.mountpoint.join(&att.file.name);
    for pass in 0..2 {
        if pass == 1 {
            drop_cache(dir.path());
        }
        let intact = [(0, 512 << 10), (1 << 20, 512 << 10), (5 << 20, 512 << 10)];
        read_and_check(&path, &image, &intact, 1);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap();
        for (at, len) in [
            (2 << 20, 1 << 20),
            ((1 << 20) + (512 << 10), 1 << 20),
            (3 << 20, 4096),
        ] {
            let mut b = Aligned::new(len);
            let e = file.read_exact_at(b.buf(), at).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "[{at}, +{len}): {e}");
        }
    }
    assert!(att.file.spliced.load(Ordering::Relaxed) > 0);
}

/// `[device] fuse_page_cache`: the loop device reads its file through the page cache, and
/// what is written through it, discarded, then read again agrees with the image underneath.
#[test]
fn the_page_cache_mode_reads_writes_and_discards_right() {
    let served = serve();
    served.frontend.set_page_cache(true);
    let dir = tempfile::tempdir().unwrap();
    let upper = RwLayer::create(
        &dir.path().join("up.data"),
        &dir.path().join("up.index"),
        0,
        // Append: a discard maps zeros (a sparse upper would show the lowers again).
        RwMode::Append,
        None,
    )
    .unwrap();
    let lowers = LayerStack::new(plain_lowers(dir.path())).unwrap();
    let image = Arc::new(ImageStack::writable(Some(lowers), upper).unwrap());
    let att = attach(&served, &image);
    let dio = std::fs::read_to_string(format!("/sys/block/loop{}/loop/dio", att.number)).unwrap();
    if std::env::var("OVBD_LOOP_DIRECT_IO").is_err() {
        assert_eq!(dio.trim(), "0", "the loop device still uses direct I/O");
    }
    let dev = PathBuf::from(format!("/dev/loop{}", att.number));
    // Cached by a first pass: the writes below must replace what the page cache holds.
    read_and_check(&dev, &image, &ranges(true), 2);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev)
        .unwrap();
    for (k, at) in [0u64, 3 << 20, (6 << 20) + 4096].into_iter().enumerate() {
        let mut b = Aligned::new(256 << 10);
        b.buf().copy_from_slice(&bytes(200 + k as u64, 256 << 10));
        f.write_all_at(b.buf(), at).unwrap();
    }
    // BLKDISCARD: the loop punches a hole in the file, which drops the cached pages.
    let range: [u64; 2] = [3 << 20, 128 << 10];
    // SAFETY: BLKDISCARD with a two-u64 range on a block device we opened.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), 0x1277, range.as_ptr()) };
    assert_eq!(r, 0, "BLKDISCARD: {}", std::io::Error::last_os_error());
    f.sync_all().unwrap();
    let mut zeros = vec![1u8; 128 << 10];
    image.read(&mut zeros, 3 << 20).unwrap();
    assert!(
        zeros.iter().all(|&b| b == 0),
        "the discard did not reach the image"
    );
    let mut first = vec![0u8; 256 << 10];
    image.read(&mut first, 0).unwrap();
    assert!(
        first == bytes(200, 256 << 10),
        "the write did not reach the image"
    );
    // Through the loop device again (its page cache) and after dropping it: the image's bytes.
    read_and_check(&dev, &image, &ranges(true), 2);
    drop(f);
    std::fs::File::open(&dev).unwrap().sync_all().unwrap();
    // SAFETY: BLKFLSBUF on a block device we opened: drops its cached pages.
    unsafe { libc::ioctl(std::fs::File::open(&dev).unwrap().as_raw_fd(), 0x1261) };
    drop_cache(dir.path());
    read_and_check(&dev, &image, &ranges(true), 2);
    drop(att);
}
