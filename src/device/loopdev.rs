//! Loop devices over the FUSE frontend's image files, by ioctl.
//!
//! A small libc module rather than a crate: the maintained `loopdev-3` attaches with
//! LOOP_SET_FD + LOOP_SET_STATUS64 (a window where the device is bound but not yet read-only
//! or direct) and offers no logical block size; LOOP_CONFIGURE sets all of it at once.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` (linux/loop.h).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// What tells our loop device from one another program got with the same number later: the
/// backing file's device and inode, as the loop driver reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Backing {
    pub dev: u64,
    pub ino: u64,
}

impl Backing {
    pub fn of(file: &File) -> io::Result<Backing> {
        let m = file.metadata()?;
        Ok(Backing {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// How a loop device is set up.
#[derive(Clone, Copy, Debug)]
pub struct LoopOptions {
    pub read_only: bool,
    pub direct_io: bool,
    /// Logical block size: 512 or 4096.
    pub block_size: u32,
}

pub fn device_path(number: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{number}"))
}

fn ioctl_error(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Binds a free loop device to `backing` (its fd is taken by the driver, which keeps its own
/// reference); returns the device number. Without autoclear: nothing must hold the device open
/// for it to stay, and [`clear`] (from any process) lets it go once unused.
pub fn attach(backing: &File, opts: LoopOptions) -> io::Result<u32> {
    let control = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(ioctl_error("opening /dev/loop-control".into()))?;
    // Another process may take the free device between GET_FREE and CONFIGURE: try again.
    for _ in 0..16 {
        // SAFETY: ioctl without argument on our fd.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io::Error::last_os_error())
                .map_err(ioctl_error("LOOP_CTL_GET_FREE".into()));
        }
        let number = n as u32;
        let path = device_path(number);
        let dev = match std::fs::OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(&path)
        {
            Ok(d) => d,
            // udev-less hosts: the node may appear a moment after GET_FREE made the device.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(ioctl_error(format!("opening {}", path.display()))(e)),
        };
        let mut flags = 0;
        if opts.read_only {
            flags |= LO_FLAGS_READ_ONLY;
        }
        if opts.direct_io {
            flags |= LO_FLAGS_DIRECT_IO;
        }
        // SAFETY: an all-zero loop_config is valid (plain integers and arrays).
        let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
        cfg.fd = backing.as_raw_fd() as u32;
        cfg.block_size = opts.block_size;
        cfg.info.lo_flags = flags;
        // SAFETY: LOOP_CONFIGURE reads a loop_config we own.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
        if r == 0 {
            return Ok(number);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(ioctl_error(format!("LOOP_CONFIGURE {}", path.display()))(e));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::ResourceBusy,
        "no free loop device: every one found was taken before it could be configured",
    ))
}

/// What backs loop device `number`: `None` if it is unbound (or gone).
pub fn backing(number: u32) -> Option<Backing> {
    let dev = File::open(device_path(number)).ok()?;
    status(&dev).ok().map(|i| Backing {
        dev: i.lo_device,
        ino: i.lo_inode,
    })
}

fn status(dev: &File) -> io::Result<LoopInfo64> {
    // SAFETY: zeroed loop_info64 is valid; the kernel fills it.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 writes a loop_info64 we own.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_GET_STATUS64, &mut info as *mut _) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// Unbinds loop device `number` if it is still bound to `expect` (never another program's that
/// got the number since). The driver unbinds at once if nobody has it open, else once its last
/// user (a mount) lets go. Returns whether it was ours to clear.
pub fn clear(number: u32, expect: Backing) -> io::Result<bool> {
    let path = device_path(number);
    let dev = match File::open(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(ioctl_error(format!("opening {}", path.display()))(e)),
    };
    match status(&dev) {
        Ok(i) if i.lo_device == expect.dev && i.lo_inode == expect.ino => {}
        // ENXIO: unbound.
        _ => return Ok(false),
    }
    // SAFETY: ioctl without argument on our fd.
    if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD, 0) } != 0 {
        let e = io::Error::last_os_error();
        // ENXIO: unbound meanwhile.
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(false);
        }
        return Err(ioctl_error(format!("LOOP_CLR_FD {}", path.display()))(e));
    }
    Ok(true)
}

/// N of a `/dev/loopN` path.
pub fn number_of(device: &str) -> Option<u32> {
    device.strip_prefix("/dev/loop")?.parse().ok()
}

/// The file loop device `number` is bound to, as `/sys/block/loopN/loop/backing_file` names
/// it (`None`: unbound).
pub fn backing_file(number: u32) -> Option<PathBuf> {
    let text =
        std::fs::read_to_string(format!("/sys/block/loop{number}/loop/backing_file")).ok()?;
    Some(PathBuf::from(text.trim_end_matches('\n')))
}

/// Loop devices whose backing file lies under `dir` (as `/sys/block/loopN/loop/backing_file`
/// names it), with that path.
pub fn loops_under(dir: &Path) -> Vec<(u32, PathBuf)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return found;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_prefix("loop"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let path = PathBuf::from(text.trim_end_matches('\n'));
        if path.starts_with(dir) {
            found.push((number, path));
        }
    }
    found.sort();
    found
}

/// Unbinds loop device `number` whatever backs it (a stale one of a previous run).
pub fn clear_any(number: u32) -> io::Result<()> {
    let path = device_path(number);
    let dev = File::open(&path).map_err(ioctl_error(format!("opening {}", path.display())))?;
    // SAFETY: ioctl without argument on our fd.
    if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD, 0) } != 0 {
        return Err(ioctl_error(format!("LOOP_CLR_FD {}", path.display()))(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}
