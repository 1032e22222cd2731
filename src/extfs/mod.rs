//! ext4 written in user space through e2fsprogs' libext2fs, on any block device ovbd can stack
//! (the converter's image stack). No kernel block device, mount or root is needed, and every byte
//! is a function of the input: times come from the caller, never from the clock.

mod sys {
    #![allow(
        non_camel_case_types,
        non_upper_case_globals,
        non_snake_case,
        dead_code
    )]
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/ext2fs.rs"));
}

mod io;
pub mod layout;

pub use io::BlockDevice;

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int, c_void};
use std::sync::Arc;

pub type Ino = u32;
pub const ROOT_INO: Ino = sys::EXT2_ROOT_INO;

const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFBLK: u32 = 0o060000;
pub const S_IFIFO: u32 = 0o010000;
pub const S_IFSOCK: u32 = 0o140000;

#[derive(Debug, thiserror::Error)]
pub enum ExtfsError {
    /// A libext2fs call failed; `what` names the operation and the path or inode.
    #[error("ext4: {what}: {msg}")]
    Lib {
        what: String,
        code: i64,
        msg: String,
    },
    #[error("ext4: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, ExtfsError>;

fn check(code: sys::errcode_t, what: impl FnOnce() -> String) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    // error_message() returns a static string for libext2fs (and errno) codes.
    let msg = unsafe { CStr::from_ptr(sys::error_message(code)) }
        .to_string_lossy()
        .into_owned();
    let msg = io::take_device_error().map_or(msg.clone(), |dev| format!("{msg} ({dev})"));
    Err(ExtfsError::Lib {
        what: what(),
        code,
        msg,
    })
}

/// A point in time as ext4 stores it (seconds since the epoch, nanoseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

/// Owner, permissions and times of an inode.
#[derive(Clone, Copy, Debug, Default)]
pub struct Meta {
    /// Permission bits incl. setuid/setgid/sticky (the type bits are kept from the inode).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: Time,
    pub mtime: Time,
    /// Deterministic stand-in for the change and creation times, which a kernel sets from the
    /// clock.
    pub ctime: Time,
}

/// The fixed parameters of a new filesystem.
#[derive(Clone, Debug)]
pub struct MkfsParams {
    pub uuid: [u8; 16],
    /// Written as mkfs/check/write time, and the time of anything created without its own.
    pub now: i64,
}

/// An open ext4 filesystem. Not `Send`: libext2fs is used from one thread.
pub struct ExtFs {
    fs: sys::ext2_filsys,
    _dev: io::Registration,
}

/// Splits seconds into ext4's 32-bit field and the epoch bits of the `_extra` field.
fn encode_time(t: Time) -> (u32, u32) {
    let lo = t.sec as i32;
    let epoch = ((t.sec - lo as i64) >> 32) as u32 & 3;
    (lo as u32, (t.nsec.min(999_999_999) << 2) | epoch)
}

impl ExtFs {
    /// Creates a new empty ext4 over the whole device (sized by it), with the feature set of
    /// upstream's userspace converter (no journal, 4 KiB blocks, 256-byte inodes, extents,
    /// flex_bg, dir_index) and every identifier fixed by `p`.
    pub fn mkfs(dev: Arc<dyn BlockDevice>, p: &MkfsParams) -> Result<ExtFs> {
        let block_size = 4096u64;
        let blocks = dev.size() / block_size;
        if blocks < 1024 {
            return Err(ExtfsError::Invalid(format!(
                "device of {} bytes is too small for ext4",
                dev.size()
            )));
        }
        let reg = io::Registration::new(dev);
        let mut param = sys::ext2_super_block {
            s_rev_level: 1,
            s_feature_compat: sys::EXT2_FEATURE_COMPAT_DIR_INDEX
                | sys::EXT2_FEATURE_COMPAT_EXT_ATTR
                | sys::EXT4_FEATURE_COMPAT_SPARSE_SUPER2,
            s_feature_incompat: sys::EXT2_FEATURE_INCOMPAT_FILETYPE
                | sys::EXT3_FEATURE_INCOMPAT_EXTENTS
                | sys::EXT4_FEATURE_INCOMPAT_64BIT
                | sys::EXT4_FEATURE_INCOMPAT_FLEX_BG,
            s_feature_ro_compat: sys::EXT2_FEATURE_RO_COMPAT_SPARSE_SUPER
                | sys::EXT2_FEATURE_RO_COMPAT_LARGE_FILE
                | sys::EXT4_FEATURE_RO_COMPAT_HUGE_FILE
                | sys::EXT4_FEATURE_RO_COMPAT_DIR_NLINK
                | sys::EXT4_FEATURE_RO_COMPAT_EXTRA_ISIZE,
            s_log_block_size: 2,
            s_log_cluster_size: 2,
            s_desc_size: sys::EXT2_MIN_DESC_SIZE_64BIT as u16,
            s_log_groups_per_flex: 4,
            s_inode_size: 256,
            s_blocks_count: blocks as u32,
            s_blocks_count_hi: (blocks >> 32) as u32,
            s_inodes_count: (blocks * block_size / 16384).min(u32::MAX as u64) as u32,
            s_backup_bgs: [1, !0],
            ..Default::default()
        };
        let name = reg.name();
        let mut fs: sys::ext2_filsys = std::ptr::null_mut();
        let rc = unsafe {
            sys::ext2fs_initialize(
                name.as_ptr(),
                sys::EXT2_FLAG_64BITS as c_int,
                &mut param,
                io::manager(),
                &mut fs,
            )
        };
        check(rc, || "initialize superblock".into())?;
        let me = ExtFs { fs, _dev: reg };
        unsafe {
            let s = &mut *(*fs).super_;
            (*fs).now = p.now;
            (*fs).umask = 0o022;
            s.s_uuid = p.uuid;
            s.s_hash_seed = std::mem::transmute::<[u8; 16], [u32; 4]>(p.uuid);
            s.s_def_hash_version = sys::EXT2_HASH_HALF_MD4 as u8;
            s.s_mkfs_time = p.now as u32;
            s.s_lastcheck = p.now as u32;
            s.s_max_mnt_count = u16::MAX as i16;
            s.s_min_extra_isize = 32;
            s.s_want_extra_isize = 32;
        }
        let rc = unsafe { sys::ext2fs_allocate_tables(fs) };
        check(rc, || "allocate group tables".into())?;
        let rc = unsafe { sys::ext2fs_mkdir(fs, ROOT_INO, ROOT_INO, std::ptr::null()) };
        check(rc, || "create the root directory".into())?;
        // lost+found as mke2fs makes it: at least 16 KiB so e2fsck never has to grow it.
        let lpf = me.mkdir(ROOT_INO, b"lost+found")?;
        me.update(lpf, |i| i.i_mode = (S_IFDIR | 0o700) as u16)?;
        for _ in 1..4 {
            let rc = unsafe { sys::ext2fs_expand_dir(fs, lpf) };
            check(rc, || "expand /lost+found".into())?;
        }
        unsafe {
            // Inodes below the first ordinary one are reserved.
            let first = (*(*fs).super_).s_first_ino;
            sys::ext2fs_inode_alloc_stats2(fs, sys::EXT2_BAD_INO, 1, 0);
            for ino in (ROOT_INO + 1)..first {
                sys::ext2fs_inode_alloc_stats2(fs, ino, 1, 0);
            }
        }
        let rc = unsafe { sys::ext2fs_update_bb_inode(fs, std::ptr::null_mut()) };
        check(rc, || "write the bad-blocks inode".into())?;
        Ok(me)
    }

    /// Opens the ext4 on `dev` for writing; `now` stands in for the clock.
    pub fn open(dev: Arc<dyn BlockDevice>, now: i64) -> Result<ExtFs> {
        let reg = io::Registration::new(dev);
        let name = reg.name();
        let mut fs: sys::ext2_filsys = std::ptr::null_mut();
        let rc = unsafe {
            sys::ext2fs_open(
                name.as_ptr(),
                (sys::EXT2_FLAG_RW | sys::EXT2_FLAG_64BITS) as c_int,
                0,
                0,
                io::manager(),
                &mut fs,
            )
        };
        check(rc, || "open the filesystem".into())?;
        let me = ExtFs { fs, _dev: reg };
        unsafe {
            (*fs).now = now;
            (*fs).umask = 0o022;
        }
        let rc = unsafe { sys::ext2fs_read_bitmaps(fs) };
        check(rc, || "read the allocation bitmaps".into())?;
        Ok(me)
    }

    /// Opens the ext4 on `dev` to read it (prefetch resolves paths with it); dropped, not
    /// closed: nothing is written.
    pub fn open_read_only(dev: Arc<dyn BlockDevice>) -> Result<ExtFs> {
        let reg = io::Registration::new(dev);
        let name = reg.name();
        let mut fs: sys::ext2_filsys = std::ptr::null_mut();
        let rc = unsafe {
            sys::ext2fs_open(
                name.as_ptr(),
                sys::EXT2_FLAG_64BITS as c_int,
                0,
                0,
                io::manager(),
                &mut fs,
            )
        };
        check(rc, || "open the filesystem".into())?;
        Ok(ExtFs { fs, _dev: reg })
    }

    /// A file's size in bytes.
    pub fn file_size(&self, ino: Ino) -> Result<u64> {
        let i = self.read_inode(ino)?;
        Ok(i.i_size as u64 | (i.i_size_high as u64) << 32)
    }

    /// A file's data on the device: (byte offset, byte length) runs in file order.
    pub fn data_runs(&self, ino: Ino) -> Result<Vec<(u64, u64)>> {
        let bs = self.block_size();
        Ok(self
            .extents(ino)?
            .into_iter()
            .map(|(_, phys, len)| (phys * bs, len * bs))
            .collect())
    }

    /// Writes bitmaps, group descriptors and superblocks, and closes.
    pub fn close(mut self) -> Result<()> {
        let rc = unsafe { sys::ext2fs_close_free(&mut self.fs) };
        check(rc, || "write and close the filesystem".into())
    }

    pub fn block_size(&self) -> u64 {
        unsafe { (*self.fs).blocksize as u64 }
    }

    /// Blocks still free.
    pub fn free_blocks(&self) -> u64 {
        unsafe {
            let s = &*(*self.fs).super_;
            s.s_free_blocks_count as u64 | (s.s_free_blocks_hi as u64) << 32
        }
    }

    fn read_inode(&self, ino: Ino) -> Result<sys::ext2_inode_large> {
        let mut inode: sys::ext2_inode_large = Default::default();
        let rc = unsafe {
            sys::ext2fs_read_inode_full(
                self.fs,
                ino,
                &mut inode as *mut _ as *mut sys::ext2_inode,
                std::mem::size_of::<sys::ext2_inode_large>() as c_int,
            )
        };
        check(rc, || format!("read inode {ino}"))?;
        Ok(inode)
    }

    fn write_inode(&self, ino: Ino, inode: &mut sys::ext2_inode_large) -> Result<()> {
        let rc = unsafe {
            sys::ext2fs_write_inode_full(
                self.fs,
                ino,
                inode as *mut _ as *mut sys::ext2_inode,
                std::mem::size_of::<sys::ext2_inode_large>() as c_int,
            )
        };
        check(rc, || format!("write inode {ino}"))
    }

    fn update(&self, ino: Ino, f: impl FnOnce(&mut sys::ext2_inode_large)) -> Result<()> {
        let mut inode = self.read_inode(ino)?;
        f(&mut inode);
        self.write_inode(ino, &mut inode)
    }

    /// The inode's type bits (`S_IF*`).
    pub fn file_type(&self, ino: Ino) -> Result<u32> {
        Ok(self.read_inode(ino)?.i_mode as u32 & S_IFMT)
    }

    pub fn lookup(&self, dir: Ino, name: &[u8]) -> Result<Option<Ino>> {
        let mut ino: Ino = 0;
        let rc = unsafe {
            sys::ext2fs_lookup(
                self.fs,
                dir,
                name.as_ptr() as *const c_char,
                name.len() as c_int,
                std::ptr::null_mut(),
                &mut ino,
            )
        };
        if rc == sys::EXT2_ET_FILE_NOT_FOUND as sys::errcode_t {
            return Ok(None);
        }
        check(rc, || format!("look up {:?} in inode {dir}", show(name)))?;
        Ok(Some(ino))
    }

    /// Entries of a directory (without `.` and `..`), in on-disk order.
    pub fn list(&self, dir: Ino) -> Result<Vec<(Vec<u8>, Ino)>> {
        unsafe extern "C" fn each(
            _dir: sys::ext2_ino_t,
            _entry: c_int,
            dirent: *mut sys::ext2_dir_entry,
            _offset: c_int,
            _blocksize: c_int,
            _buf: *mut c_char,
            priv_: *mut c_void,
        ) -> c_int {
            let out = &mut *(priv_ as *mut Vec<(Vec<u8>, Ino)>);
            let d = &*dirent;
            let len = (d.name_len & 0xff) as usize;
            let name = std::slice::from_raw_parts(d.name.as_ptr() as *const u8, len);
            if d.inode != 0 && name != b"." && name != b".." {
                out.push((name.to_vec(), d.inode));
            }
            0
        }
        let mut out: Vec<(Vec<u8>, Ino)> = Vec::new();
        let rc = unsafe {
            sys::ext2fs_dir_iterate2(
                self.fs,
                dir,
                0,
                std::ptr::null_mut(),
                Some(each),
                &mut out as *mut _ as *mut c_void,
            )
        };
        check(rc, || format!("list directory inode {dir}"))?;
        Ok(out)
    }

    /// Runs `op` (which links a new entry into `dir`), growing the directory once if it is full.
    fn with_dir_space(
        &self,
        dir: Ino,
        what: impl Fn() -> String,
        op: impl Fn() -> sys::errcode_t,
    ) -> Result<()> {
        let mut rc = op();
        if rc == sys::EXT2_ET_DIR_NO_SPACE as sys::errcode_t {
            let e = unsafe { sys::ext2fs_expand_dir(self.fs, dir) };
            check(e, || format!("{}: grow directory inode {dir}", what()))?;
            rc = op();
        }
        check(rc, what)
    }

    pub fn mkdir(&self, parent: Ino, name: &[u8]) -> Result<Ino> {
        let c = cname(name)?;
        self.with_dir_space(
            parent,
            || format!("mkdir {:?} in inode {parent}", show(name)),
            || unsafe { sys::ext2fs_mkdir(self.fs, parent, 0, c.as_ptr()) },
        )?;
        self.lookup(parent, name)?
            .ok_or_else(|| ExtfsError::Invalid(format!("mkdir {:?}: not found after", show(name))))
    }

    /// Creates a non-directory, non-symlink inode (`mode` with its `S_IF*` type) linked as
    /// `name`; `rdev` is used for devices.
    pub fn create(&self, parent: Ino, name: &[u8], mode: u32, rdev: (u32, u32)) -> Result<Ino> {
        let c = cname(name)?;
        let what = || format!("create {:?} in inode {parent}", show(name));
        let mut ino: Ino = 0;
        let rc = unsafe {
            sys::ext2fs_new_inode(
                self.fs,
                parent,
                mode as c_int,
                std::ptr::null_mut(),
                &mut ino,
            )
        };
        check(rc, what)?;
        let ft = match mode & S_IFMT {
            S_IFREG => sys::EXT2_FT_REG_FILE,
            S_IFCHR => sys::EXT2_FT_CHRDEV,
            S_IFBLK => sys::EXT2_FT_BLKDEV,
            S_IFIFO => sys::EXT2_FT_FIFO,
            S_IFSOCK => sys::EXT2_FT_SOCK,
            t => return Err(ExtfsError::Invalid(format!("{}: file type {t:o}", what()))),
        };
        self.with_dir_space(parent, what, || unsafe {
            sys::ext2fs_link(self.fs, parent, c.as_ptr(), ino, ft as c_int)
        })?;
        unsafe { sys::ext2fs_inode_alloc_stats2(self.fs, ino, 1, 0) };
        let mut inode = sys::ext2_inode_large {
            i_mode: mode as u16,
            i_links_count: 1,
            ..Default::default()
        };
        match mode & S_IFMT {
            S_IFREG => {
                // An empty extent tree, so data can be allocated as extents.
                let mut h: sys::ext2_extent_handle_t = std::ptr::null_mut();
                let rc = unsafe {
                    sys::ext2fs_extent_open2(
                        self.fs,
                        ino,
                        &mut inode as *mut _ as *mut sys::ext2_inode,
                        &mut h,
                    )
                };
                check(rc, what)?;
                unsafe { sys::ext2fs_extent_free(h) };
            }
            S_IFCHR | S_IFBLK => {
                let (major, minor) = rdev;
                if major < 256 && minor < 256 {
                    inode.i_block[0] = major * 256 + minor;
                } else {
                    inode.i_block[1] = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
                }
            }
            _ => {}
        }
        let rc = unsafe {
            sys::ext2fs_write_new_inode(self.fs, ino, &mut inode as *mut _ as *mut sys::ext2_inode)
        };
        check(rc, what)?;
        Ok(ino)
    }

    /// Fills a new regular file with `size` bytes from `data`: blocks are allocated as few
    /// extents first, then written straight to the device in large pieces.
    pub fn write_file(&self, ino: Ino, data: &mut dyn std::io::Read, size: u64) -> Result<()> {
        let bs = self.block_size();
        let nblocks = size.div_ceil(bs);
        let what = || format!("write {size} bytes to inode {ino}");
        if nblocks > 0 {
            let rc = unsafe {
                sys::ext2fs_fallocate(
                    self.fs,
                    sys::EXT2_FALLOCATE_FORCE_INIT as c_int,
                    ino,
                    std::ptr::null_mut(),
                    !0,
                    0,
                    nblocks,
                )
            };
            if rc == sys::EXT2_ET_BLOCK_ALLOC_FAIL as sys::errcode_t {
                return Err(ExtfsError::Invalid(format!(
                    "no space left for a file of {size} bytes ({} blocks free): use a larger --vsize",
                    self.free_blocks()
                )));
            }
            check(rc, what)?;
            let runs = self.extents(ino)?;
            let dev = io::device(self.fs);
            let mut buf = vec![0u8; 1 << 20];
            let mut done = 0u64; // blocks written
            for (lblk, pblk, len) in runs {
                if lblk != done {
                    return Err(ExtfsError::Invalid(format!(
                        "{}: allocation left a hole at block {done}",
                        what()
                    )));
                }
                let mut off = 0u64;
                while off < len {
                    let n = (len - off).min(buf.len() as u64 / bs);
                    let bytes = (n * bs) as usize;
                    let start = (lblk + off) * bs;
                    let want = (size.saturating_sub(start)).min(bytes as u64) as usize;
                    read_full(data, &mut buf[..want]).map_err(|e| {
                        ExtfsError::Invalid(format!("{}: reading the source: {e}", what()))
                    })?;
                    buf[want..bytes].fill(0);
                    dev.write_at(&buf[..bytes], (pblk + off) * bs)
                        .map_err(|e| ExtfsError::Invalid(format!("{}: {e}", what())))?;
                    off += n;
                }
                done += len;
            }
            if done < nblocks {
                return Err(ExtfsError::Invalid(format!(
                    "{}: only {done} of {nblocks} blocks allocated",
                    what()
                )));
            }
        }
        self.update(ino, |i| {
            i.i_size = size as u32;
            i.i_size_high = (size >> 32) as u32;
        })
    }

    /// The (logical, physical, length) block runs of a file, in logical order.
    fn extents(&self, ino: Ino) -> Result<Vec<(u64, u64, u64)>> {
        let what = || format!("map the extents of inode {ino}");
        let mut h: sys::ext2_extent_handle_t = std::ptr::null_mut();
        let rc = unsafe { sys::ext2fs_extent_open2(self.fs, ino, std::ptr::null_mut(), &mut h) };
        check(rc, what)?;
        let mut runs: Vec<(u64, u64, u64)> = Vec::new();
        let mut ext: sys::ext2fs_extent = Default::default();
        let mut op = sys::EXT2_EXTENT_ROOT;
        let result = loop {
            let rc = unsafe { sys::ext2fs_extent_get(h, op as c_int, &mut ext) };
            if rc == sys::EXT2_ET_EXTENT_NO_NEXT as sys::errcode_t
                || rc == sys::EXT2_ET_EXTENT_NO_DOWN as sys::errcode_t
            {
                break Ok(());
            }
            if let Err(e) = check(rc, what) {
                break Err(e);
            }
            op = sys::EXT2_EXTENT_NEXT;
            if ext.e_flags & sys::EXT2_EXTENT_FLAGS_LEAF == 0 {
                continue;
            }
            match runs.last_mut() {
                Some(r) if r.0 + r.2 == ext.e_lblk && r.1 + r.2 == ext.e_pblk => {
                    r.2 += ext.e_len as u64
                }
                _ => runs.push((ext.e_lblk, ext.e_pblk, ext.e_len as u64)),
            }
        };
        unsafe { sys::ext2fs_extent_free(h) };
        result.map(|()| runs)
    }

    pub fn symlink(&self, parent: Ino, name: &[u8], target: &[u8]) -> Result<Ino> {
        let c = cname(name)?;
        let t = cname(target)?;
        if target.is_empty() || target.len() >= self.block_size() as usize {
            return Err(ExtfsError::Invalid(format!(
                "symlink {:?}: target of {} bytes",
                show(name),
                target.len()
            )));
        }
        self.with_dir_space(
            parent,
            || format!("symlink {:?} in inode {parent}", show(name)),
            || unsafe { sys::ext2fs_symlink(self.fs, parent, 0, c.as_ptr(), t.as_ptr()) },
        )?;
        self.lookup(parent, name)?.ok_or_else(|| {
            ExtfsError::Invalid(format!("symlink {:?}: not found after", show(name)))
        })
    }

    /// The target of a symlink.
    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let mut inode = self.read_inode(ino)?;
        let len = inode.i_size as usize;
        let fast =
            unsafe { sys::ext2fs_is_fast_symlink(&mut inode as *mut _ as *mut sys::ext2_inode) }
                != 0;
        if fast {
            let raw: &[u8] =
                unsafe { std::slice::from_raw_parts(inode.i_block.as_ptr() as *const u8, 60) };
            return Ok(raw[..len.min(60)].to_vec());
        }
        let mut buf = vec![0u8; len];
        let mut file: sys::ext2_file_t = std::ptr::null_mut();
        let what = || format!("read symlink inode {ino}");
        let rc = unsafe { sys::ext2fs_file_open(self.fs, ino, 0, &mut file) };
        check(rc, what)?;
        let mut got: u32 = 0;
        let rc = unsafe {
            sys::ext2fs_file_read(file, buf.as_mut_ptr() as *mut c_void, len as u32, &mut got)
        };
        unsafe { sys::ext2fs_file_close(file) };
        check(rc, what)?;
        buf.truncate(got as usize);
        Ok(buf)
    }

    /// Adds another name for `target` (a hard link).
    pub fn hardlink(&self, parent: Ino, name: &[u8], target: Ino) -> Result<()> {
        let c = cname(name)?;
        let mut inode = self.read_inode(target)?;
        let ft = match inode.i_mode as u32 & S_IFMT {
            S_IFREG => sys::EXT2_FT_REG_FILE,
            S_IFLNK => sys::EXT2_FT_SYMLINK,
            S_IFCHR => sys::EXT2_FT_CHRDEV,
            S_IFBLK => sys::EXT2_FT_BLKDEV,
            S_IFIFO => sys::EXT2_FT_FIFO,
            S_IFSOCK => sys::EXT2_FT_SOCK,
            _ => {
                return Err(ExtfsError::Invalid(format!(
                    "hard link {:?}: target inode {target} is a directory",
                    show(name)
                )))
            }
        };
        if inode.i_links_count == u16::MAX {
            return Err(ExtfsError::Invalid(format!(
                "hard link {:?}: too many links to inode {target}",
                show(name)
            )));
        }
        self.with_dir_space(
            parent,
            || format!("hard link {:?} in inode {parent}", show(name)),
            || unsafe { sys::ext2fs_link(self.fs, parent, c.as_ptr(), target, ft as c_int) },
        )?;
        inode.i_links_count += 1;
        self.write_inode(target, &mut inode)
    }

    /// Removes `name` from `parent` and everything below it (`rm -rf`).
    pub fn remove(&self, parent: Ino, name: &[u8]) -> Result<()> {
        let Some(ino) = self.lookup(parent, name)? else {
            return Ok(());
        };
        let is_dir = self.file_type(ino)? == S_IFDIR;
        if is_dir {
            self.clear_dir(ino)?;
        }
        let c = cname(name)?;
        let rc = unsafe { sys::ext2fs_unlink(self.fs, parent, c.as_ptr(), ino, 0) };
        check(rc, || {
            format!("unlink {:?} from inode {parent}", show(name))
        })?;
        if is_dir {
            // The child's ".." no longer counts towards the parent.
            self.update(parent, |i| {
                if i.i_links_count > 2 {
                    i.i_links_count -= 1
                }
            })?;
        }
        self.drop_link(ino, is_dir)
    }

    /// Removes every entry of a directory.
    pub fn clear_dir(&self, dir: Ino) -> Result<()> {
        for (name, _) in self.list(dir)? {
            self.remove(dir, &name)?;
        }
        Ok(())
    }

    fn drop_link(&self, ino: Ino, is_dir: bool) -> Result<()> {
        let mut inode = self.read_inode(ino)?;
        let now = unsafe { (*self.fs).now } as u32;
        if is_dir || inode.i_links_count <= 1 {
            inode.i_links_count = 0;
            inode.i_dtime = now;
            let rc = unsafe { sys::ext2fs_free_ext_attr(self.fs, ino, &mut inode) };
            check(rc, || format!("free the xattrs of inode {ino}"))?;
            let valid = unsafe {
                sys::ext2fs_inode_has_valid_blocks2(
                    self.fs,
                    &mut inode as *mut _ as *mut sys::ext2_inode,
                )
            };
            if valid != 0 {
                let rc = unsafe {
                    sys::ext2fs_punch(
                        self.fs,
                        ino,
                        &mut inode as *mut _ as *mut sys::ext2_inode,
                        std::ptr::null_mut(),
                        0,
                        !0,
                    )
                };
                check(rc, || format!("free the blocks of inode {ino}"))?;
            }
            unsafe { sys::ext2fs_inode_alloc_stats2(self.fs, ino, -1, is_dir as c_int) };
        } else {
            inode.i_links_count -= 1;
        }
        self.write_inode(ino, &mut inode)
    }

    /// Sets an extended attribute (`user.x`, `security.capability`, POSIX ACLs in their xattr
    /// form...).
    pub fn set_xattr(&self, ino: Ino, key: &[u8], value: &[u8]) -> Result<()> {
        let k = cname(key)?;
        let what = || format!("set xattr {:?} on inode {ino}", show(key));
        let mut h: *mut sys::ext2_xattr_handle = std::ptr::null_mut();
        let rc = unsafe { sys::ext2fs_xattrs_open(self.fs, ino, &mut h) };
        check(rc, what)?;
        let mut rc = unsafe { sys::ext2fs_xattrs_read(h) };
        if rc == 0 {
            rc = unsafe {
                sys::ext2fs_xattr_set(h, k.as_ptr(), value.as_ptr() as *const c_void, value.len())
            };
        }
        let rc2 = unsafe { sys::ext2fs_xattrs_close(&mut h) };
        check(rc, what)?;
        check(rc2, what)
    }

    /// Sets owner, permissions and times; the file type is kept.
    pub fn set_meta(&self, ino: Ino, m: &Meta) -> Result<()> {
        self.update(ino, |i| {
            i.i_mode = ((i.i_mode as u32 & S_IFMT) | (m.perm & 0o7777)) as u16;
            i.i_uid = m.uid as u16;
            i.i_gid = m.gid as u16;
            i.osd2.linux2.l_i_uid_high = (m.uid >> 16) as u16;
            i.osd2.linux2.l_i_gid_high = (m.gid >> 16) as u16;
            i.i_extra_isize = 32;
            (i.i_atime, i.i_atime_extra) = encode_time(m.atime);
            (i.i_mtime, i.i_mtime_extra) = encode_time(m.mtime);
            (i.i_ctime, i.i_ctime_extra) = encode_time(m.ctime);
            (i.i_crtime, i.i_crtime_extra) = encode_time(m.ctime);
        })
    }

    /// Sets only the times (directory times are applied after their contents).
    pub fn set_times(&self, ino: Ino, atime: Time, mtime: Time) -> Result<()> {
        self.update(ino, |i| {
            (i.i_atime, i.i_atime_extra) = encode_time(atime);
            (i.i_mtime, i.i_mtime_extra) = encode_time(mtime);
        })
    }
}

impl Drop for ExtFs {
    fn drop(&mut self) {
        // Only reached without close(): drop what is in memory, write nothing.
        if !self.fs.is_null() {
            unsafe { sys::ext2fs_free(self.fs) };
        }
    }
}

fn cname(name: &[u8]) -> Result<CString> {
    CString::new(name)
        .map_err(|_| ExtfsError::Invalid(format!("name {:?} holds a NUL", show(name))))
}

fn show(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

fn read_full(r: &mut dyn std::io::Read, mut buf: &mut [u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match r.read(buf) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "source ended early",
                ))
            }
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
