//! A libext2fs I/O manager over a Rust [`BlockDevice`], so libext2fs reads and writes ovbd's
//! image stack directly instead of a file or kernel device.

use super::sys;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int, c_ulong, c_ulonglong, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// What libext2fs writes to: byte-addressed, 512-byte aligned I/O.
pub trait BlockDevice: Send + Sync {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    fn flush(&self) -> std::io::Result<()>;
}

thread_local! {
    /// The device error behind the last failed libext2fs call, for the error message.
    static LAST_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
}

pub(super) fn take_device_error() -> Option<String> {
    LAST_ERROR.with(|e| e.borrow_mut().take())
}

fn set_device_error(msg: String) {
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(msg));
}

/// libext2fs opens devices by name: names map to devices while an `ExtFs` holds them.
fn registry() -> &'static Mutex<HashMap<String, Arc<dyn BlockDevice>>> {
    static R: OnceLock<Mutex<HashMap<String, Arc<dyn BlockDevice>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

pub(super) struct Registration {
    name: CString,
}

impl Registration {
    pub(super) fn new(dev: Arc<dyn BlockDevice>) -> Registration {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!("ovbd-image-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), dev);
        Registration {
            name: CString::new(name).expect("no NUL in a generated name"),
        }
    }

    pub(super) fn name(&self) -> &CStr {
        &self.name
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let name = self.name.to_string_lossy().into_owned();
        registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name);
    }
}

struct Channel {
    dev: Arc<dyn BlockDevice>,
    name: CString,
}

/// The device behind an open filesystem.
pub(super) fn device(fs: sys::ext2_filsys) -> Arc<dyn BlockDevice> {
    unsafe {
        let ch = &*((*(*fs).io).private_data as *const Channel);
        ch.dev.clone()
    }
}

struct Manager(sys::struct_io_manager);
// The manager is an immutable table of function pointers and a static name.
unsafe impl Sync for Manager {}
unsafe impl Send for Manager {}

pub(super) fn manager() -> sys::io_manager {
    static M: OnceLock<Manager> = OnceLock::new();
    let m = M.get_or_init(|| {
        Manager(sys::struct_io_manager {
            magic: sys::EXT2_ET_MAGIC_IO_MANAGER as sys::errcode_t,
            name: c"ovbd image I/O manager".as_ptr(),
            open: Some(open),
            close: Some(close),
            set_blksize: Some(set_blksize),
            read_blk: Some(read_blk),
            write_blk: Some(write_blk),
            flush: Some(flush),
            write_byte: None,
            set_option: None,
            get_stats: None,
            read_blk64: Some(read_blk64),
            write_blk64: Some(write_blk64),
            discard: None,
            cache_readahead: None,
            zeroout: None,
            reserved: [0; 14],
        })
    });
    &m.0 as *const sys::struct_io_manager as sys::io_manager
}

unsafe extern "C" fn open(
    name: *const c_char,
    _flags: c_int,
    out: *mut sys::io_channel,
) -> sys::errcode_t {
    let key = CStr::from_ptr(name).to_string_lossy().into_owned();
    let Some(dev) = registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .cloned()
    else {
        return libc::ENODEV as sys::errcode_t;
    };
    let ch = Box::new(Channel {
        dev,
        name: CString::new(key).unwrap_or_default(),
    });
    let chan = Box::new(sys::struct_io_channel {
        magic: sys::EXT2_ET_MAGIC_IO_CHANNEL as sys::errcode_t,
        manager: manager(),
        name: ch.name.as_ptr() as *mut c_char,
        block_size: 1024,
        read_error: None,
        write_error: None,
        refcount: 1,
        flags: 0,
        reserved: [0; 14],
        private_data: Box::into_raw(ch) as *mut c_void,
        app_data: std::ptr::null_mut(),
        align: 0,
    });
    *out = Box::into_raw(chan);
    0
}

unsafe extern "C" fn close(chan: sys::io_channel) -> sys::errcode_t {
    (*chan).refcount -= 1;
    if (*chan).refcount > 0 {
        return 0;
    }
    let chan = Box::from_raw(chan);
    drop(Box::from_raw(chan.private_data as *mut Channel));
    0
}

unsafe extern "C" fn set_blksize(chan: sys::io_channel, blksize: c_int) -> sys::errcode_t {
    (*chan).block_size = blksize;
    0
}

/// A negative count is a byte count, a positive one a block count.
unsafe fn span(chan: sys::io_channel, block: u64, count: c_int) -> (u64, usize) {
    let bs = (*chan).block_size as u64;
    let len = if count < 0 {
        (-(count as i64)) as usize
    } else {
        count as usize * bs as usize
    };
    (block * bs, len)
}

/// libext2fs wants an error code; the device's error is kept for the caller's message.
fn errcode<E: std::fmt::Display>(
    r: Result<(), E>,
    what: impl FnOnce() -> String,
    code: sys::errcode_t,
) -> sys::errcode_t {
    match r {
        Ok(()) => 0,
        Err(e) => {
            set_device_error(format!("{}: {e}", what()));
            code
        }
    }
}

unsafe fn dev_of(chan: sys::io_channel) -> &'static dyn BlockDevice {
    &*(*((*chan).private_data as *const Channel)).dev
}

unsafe extern "C" fn read_blk64(
    chan: sys::io_channel,
    block: c_ulonglong,
    count: c_int,
    data: *mut c_void,
) -> sys::errcode_t {
    let (off, len) = span(chan, block, count);
    let buf = std::slice::from_raw_parts_mut(data as *mut u8, len);
    errcode(
        dev_of(chan).read_at(buf, off),
        || format!("reading {len} bytes at {off}"),
        sys::EXT2_ET_SHORT_READ as sys::errcode_t,
    )
}

unsafe extern "C" fn write_blk64(
    chan: sys::io_channel,
    block: c_ulonglong,
    count: c_int,
    data: *const c_void,
) -> sys::errcode_t {
    let (off, len) = span(chan, block, count);
    let buf = std::slice::from_raw_parts(data as *const u8, len);
    errcode(
        dev_of(chan).write_at(buf, off),
        || format!("writing {len} bytes at {off}"),
        sys::EXT2_ET_SHORT_WRITE as sys::errcode_t,
    )
}

unsafe extern "C" fn read_blk(
    chan: sys::io_channel,
    block: c_ulong,
    count: c_int,
    data: *mut c_void,
) -> sys::errcode_t {
    read_blk64(chan, block as c_ulonglong, count, data)
}

unsafe extern "C" fn write_blk(
    chan: sys::io_channel,
    block: c_ulong,
    count: c_int,
    data: *const c_void,
) -> sys::errcode_t {
    write_blk64(chan, block as c_ulonglong, count, data)
}

unsafe extern "C" fn flush(chan: sys::io_channel) -> sys::errcode_t {
    errcode(
        dev_of(chan).flush(),
        || "flush".to_owned(),
        libc::EIO as sys::errcode_t,
    )
}
