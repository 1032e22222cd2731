//! The few on-disk ext4 structures the readahead ([`crate::readahead`]) reads, parsed in plain
//! Rust from bytes a device served: the superblock, the group descriptors (where each group's
//! inode table is) and an inode's in-inode extents. The bytes come from an image, so anything
//! may be in them: every field is checked or bounded, and a bad one makes the parse fail (the
//! readahead then does nothing), never panic.

use super::{ExtfsError, Result, S_IFDIR, S_IFMT, S_IFREG};

/// Where the superblock is on the disk, and its length.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
pub const SUPERBLOCK_LEN: usize = 1024;

const MAGIC: u16 = 0xEF53;
const INCOMPAT_64BIT: u32 = 0x80;
const EXTENTS_FL: u32 = 0x80000;
const INLINE_DATA_FL: u32 = 0x1000_0000;
const EXTENT_MAGIC: u16 = 0xF30A;
/// An extent longer than this is an unwritten one (it reads as zeros).
const MAX_INIT_EXTENT_LEN: u16 = 32768;
/// At most this many groups are described: 2^20 groups of 128 MiB is 128 TiB, past any image.
const MAX_GROUPS: u64 = 1 << 20;
/// ext4's largest group descriptor (EXT4_MAX_DESC_SIZE).
const MAX_DESC_SIZE: u64 = 1024;
/// The largest descriptor table read: 2^17 descriptors of 64 bytes, 16 TiB of 128 MiB groups.
const MAX_GDT_BYTES: u64 = 8 << 20;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn invalid(what: impl Into<String>) -> ExtfsError {
    ExtfsError::Invalid(what.into())
}

/// What the superblock says about where things are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u64,
    pub inode_size: u64,
    pub inodes_per_group: u64,
    pub groups: u64,
    /// Where the group descriptor table starts (bytes), and each descriptor's size.
    pub gdt_offset: u64,
    pub desc_size: u64,
}

impl Geometry {
    /// Parses the superblock's 1024 bytes (the disk's bytes 1024..2048) of a disk of
    /// `disk_size` bytes.
    pub fn parse(sb: &[u8], disk_size: u64) -> Result<Geometry> {
        if sb.len() < SUPERBLOCK_LEN {
            return Err(invalid(format!("superblock: {} bytes", sb.len())));
        }
        if u16_at(sb, 0x38) != MAGIC {
            return Err(invalid("superblock: no ext2/3/4 magic at offset 1080"));
        }
        let log = u32_at(sb, 0x18);
        if log > 6 {
            return Err(invalid(format!("superblock: block size 1024 << {log}")));
        }
        let block_size = 1024u64 << log;
        let incompat = u32_at(sb, 0x60);
        let mut blocks = u32_at(sb, 0x04) as u64;
        let desc_size = if incompat & INCOMPAT_64BIT != 0 {
            blocks |= (u32_at(sb, 0x150) as u64) << 32;
            u16_at(sb, 0xFE) as u64
        } else {
            32
        };
        if !(32..=MAX_DESC_SIZE).contains(&desc_size) || !desc_size.is_power_of_two() {
            return Err(invalid(format!("superblock: descriptor size {desc_size}")));
        }
        let inode_size = if u32_at(sb, 0x4C) == 0 {
            128
        } else {
            u16_at(sb, 0x58) as u64
        };
        if !(128..=block_size).contains(&inode_size) || !inode_size.is_power_of_two() {
            return Err(invalid(format!("superblock: inode size {inode_size}")));
        }
        let first_data_block = u32_at(sb, 0x14) as u64;
        let blocks_per_group = u32_at(sb, 0x20) as u64;
        let inodes_per_group = u32_at(sb, 0x28) as u64;
        if blocks_per_group == 0 || inodes_per_group == 0 || first_data_block >= blocks {
            return Err(invalid(format!(
                "superblock: {blocks} blocks, {blocks_per_group} per group, {inodes_per_group} inodes per group, first data block {first_data_block}"
            )));
        }
        if blocks.saturating_mul(block_size) > disk_size {
            return Err(invalid(format!(
                "superblock: {blocks} blocks of {block_size} bytes on a disk of {disk_size}"
            )));
        }
        let groups = (blocks - first_data_block).div_ceil(blocks_per_group);
        if groups > MAX_GROUPS || groups * desc_size >= MAX_GDT_BYTES {
            return Err(invalid(format!(
                "superblock: {groups} groups of {desc_size}-byte descriptors, past the {MAX_GDT_BYTES} bytes read"
            )));
        }
        Ok(Geometry {
            block_size,
            inode_size,
            inodes_per_group,
            groups,
            gdt_offset: (first_data_block + 1) * block_size,
            desc_size,
        })
    }

    /// The group descriptor table's length in bytes.
    pub fn gdt_len(&self) -> u64 {
        self.groups * self.desc_size
    }

    /// Each group's inode table as `(byte offset, bytes)` from the descriptor table `gdt`
    /// ([`Self::gdt_len`] bytes at [`Self::gdt_offset`]), sorted; tables that lie past
    /// `disk_size` or on the ones before them are left out.
    pub fn inode_tables(&self, gdt: &[u8], disk_size: u64) -> Result<Vec<InodeTable>> {
        if (gdt.len() as u64) < self.gdt_len() {
            return Err(invalid(format!(
                "group descriptors: {} bytes of {}",
                gdt.len(),
                self.gdt_len()
            )));
        }
        let len = self.inodes_per_group * self.inode_size;
        let mut tables = Vec::with_capacity(self.groups as usize);
        for g in 0..self.groups {
            let d = &gdt[(g * self.desc_size) as usize..((g + 1) * self.desc_size) as usize];
            let mut block = u32_at(d, 0x08) as u64;
            if self.desc_size >= 64 {
                block |= (u32_at(d, 0x28) as u64) << 32;
            }
            let Some(offset) = block.checked_mul(self.block_size) else {
                continue;
            };
            if offset == 0 || offset.saturating_add(len) > disk_size {
                continue;
            }
            tables.push(InodeTable {
                offset,
                len,
                first_ino: g * self.inodes_per_group + 1,
            });
        }
        tables.sort_by_key(|t| t.offset);
        let mut end = 0;
        tables.retain(|t| {
            let keep = t.offset >= end;
            if keep {
                end = t.offset + t.len;
            }
            keep
        });
        Ok(tables)
    }
}

/// One group's inode table on the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InodeTable {
    pub offset: u64,
    pub len: u64,
    pub first_ino: u64,
}

/// A run of a file's (or directory's) data on the disk, in bytes: `len` bytes of the file from
/// `logical` on are at `offset` on the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataRun {
    pub logical: u64,
    pub offset: u64,
    pub len: u64,
}

/// The data runs of the regular file or directory in the inode `raw` (one inode table slot):
/// the extents held in the inode itself (a tree of depth 0), written ones only, each cut to the
/// file's size and to `disk_size`. Empty for anything else: other types, inline data, block
/// maps (ext2/3), deeper trees, unused slots.
pub fn inode_data_runs(raw: &[u8], block_size: u64, disk_size: u64, out: &mut Vec<DataRun>) {
    if raw.len() < 128 {
        return;
    }
    let mode = u16_at(raw, 0x00) as u32 & S_IFMT;
    if mode != S_IFREG && mode != S_IFDIR {
        return;
    }
    let flags = u32_at(raw, 0x20);
    if flags & EXTENTS_FL == 0 || flags & INLINE_DATA_FL != 0 || u16_at(raw, 0x1A) == 0 {
        return; // block map, inline data, or no links (a deleted inode)
    }
    let size = u32_at(raw, 0x04) as u64 | (u32_at(raw, 0x6C) as u64) << 32;
    let ib = &raw[0x28..0x28 + 60];
    if u16_at(ib, 0) != EXTENT_MAGIC || u16_at(ib, 6) != 0 {
        return;
    }
    let entries = (u16_at(ib, 2) as usize).min(4);
    // ext4 keeps a node's extents in file order, apart: one that is not is skipped.
    let mut next = 0;
    for e in 0..entries {
        let x = &ib[12 + 12 * e..24 + 12 * e];
        let logical = u32_at(x, 0) as u64 * block_size;
        let len = u16_at(x, 4);
        if len == 0 || len > MAX_INIT_EXTENT_LEN || logical >= size || logical < next {
            continue;
        }
        next = logical + len as u64 * block_size;
        let start = (u16_at(x, 6) as u64) << 32 | u32_at(x, 8) as u64;
        let Some(offset) = start.checked_mul(block_size).filter(|&o| o > 0) else {
            continue;
        };
        let len = (len as u64 * block_size)
            .min(size - logical)
            .div_ceil(block_size)
            * block_size;
        let len = len.min(disk_size.saturating_sub(offset));
        if len > 0 {
            out.push(DataRun {
                logical,
                offset,
                len,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// A 64bit ext4 superblock: 4 KiB blocks, `blocks`, 32768 blocks and 8192 inodes per group.
    fn superblock(blocks: u32) -> Vec<u8> {
        let mut sb = vec![0u8; SUPERBLOCK_LEN];
        put32(&mut sb, 0x04, blocks);
        put32(&mut sb, 0x18, 2);
        put32(&mut sb, 0x20, 32768);
        put32(&mut sb, 0x28, 8192);
        put16(&mut sb, 0x38, MAGIC);
        put32(&mut sb, 0x4C, 1);
        put16(&mut sb, 0x58, 256);
        put32(&mut sb, 0x60, INCOMPAT_64BIT | 0x40);
        put16(&mut sb, 0xFE, 64);
        sb
    }

    fn inode(mode: u32, size: u64, extents: &[(u32, u16, u64)]) -> Vec<u8> {
        let mut raw = vec![0u8; 256];
        put16(&mut raw, 0x00, mode as u16 | 0o644);
        put32(&mut raw, 0x04, size as u32);
        put32(&mut raw, 0x6C, (size >> 32) as u32);
        put16(&mut raw, 0x1A, 1);
        put32(&mut raw, 0x20, EXTENTS_FL);
        put16(&mut raw, 0x28, EXTENT_MAGIC);
        put16(&mut raw, 0x2A, extents.len() as u16);
        put16(&mut raw, 0x2C, 4);
        for (e, &(logical, len, start)) in extents.iter().enumerate() {
            let at = 0x28 + 12 + 12 * e;
            put32(&mut raw, at, logical);
            put16(&mut raw, at + 4, len);
            put16(&mut raw, at + 6, (start >> 32) as u16);
            put32(&mut raw, at + 8, start as u32);
        }
        raw
    }

    #[test]
    fn geometry_and_inode_tables() {
        let disk = 1u64 << 30; // 262144 blocks: 8 groups
        let g = Geometry::parse(&superblock(262144), disk).unwrap();
        assert_eq!(
            (
                g.block_size,
                g.inode_size,
                g.groups,
                g.gdt_offset,
                g.desc_size
            ),
            (4096, 256, 8, 4096, 64)
        );
        let mut gdt = vec![0u8; g.gdt_len() as usize];
        for grp in 0..8u64 {
            // flex_bg style: tables back to back from block 1000, group 3 listed out of order.
            let block = if grp == 3 { 900 } else { 1000 + 512 * grp };
            put32(&mut gdt[(grp * 64) as usize..], 0x08, block as u32);
        }
        // Group 5's table past the disk: left out.
        put32(&mut gdt[5 * 64..], 0x08, 0);
        put32(&mut gdt[5 * 64..], 0x28, 1);
        let t = g.inode_tables(&gdt, disk).unwrap();
        assert_eq!(t.len(), 6, "{t:?}"); // 5 is past the disk; 3 (900..1412) overlaps 0 (1000..)
        assert_eq!(t[0].offset, 900 * 4096);
        assert_eq!(t[0].first_ino, 3 * 8192 + 1);
        assert_eq!(t[0].len, 8192 * 256);
        assert!(t.windows(2).all(|w| w[0].offset + w[0].len <= w[1].offset));
    }

    #[test]
    fn bad_superblocks_fail() {
        let disk = 1u64 << 30;
        let good = superblock(262144);
        type Spoil = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(&str, Spoil)> = vec![
            ("magic", Box::new(|sb| put16(sb, 0x38, 0))),
            ("block size", Box::new(|sb| put32(sb, 0x18, 40))),
            ("desc size", Box::new(|sb| put16(sb, 0xFE, 48))),
            ("inode size", Box::new(|sb| put16(sb, 0x58, 8192))),
            ("per group", Box::new(|sb| put32(sb, 0x20, 0))),
            ("past the disk", Box::new(|sb| put32(sb, 0x150, 1))),
            ("short", Box::new(|sb| sb.truncate(100))),
        ];
        for (what, f) in cases {
            let mut sb = good.clone();
            f(&mut sb);
            assert!(Geometry::parse(&sb, disk).is_err(), "{what}");
        }
        let g = Geometry::parse(&good, disk).unwrap();
        assert!(g.inode_tables(&[0u8; 64], disk).is_err());
        // Descriptor tables no real ext4 has, which reading would allocate: descriptors past
        // ext4's 1024 bytes, or a table past 8 MiB (2^20 groups of 64 bytes on a 128 TiB disk).
        let huge = |desc: u16, groups: u32| {
            let mut sb = superblock(groups * 8);
            put32(&mut sb, 0x18, 6); // 64 KiB blocks
            put32(&mut sb, 0x20, 8); // 8 per group
            put16(&mut sb, 0xFE, desc);
            Geometry::parse(&sb, u64::MAX)
        };
        assert!(huge(4096, 16).is_err(), "descriptors of 4096 bytes");
        assert!(huge(1024, 1 << 20).is_err(), "a table of 1 GiB");
        assert!(huge(64, 1 << 17).is_err(), "a table of 8 MiB and more");
        assert_eq!(huge(64, (1 << 17) - 1).unwrap().gdt_len(), (8 << 20) - 64);
    }

    fn run(logical: u64, offset: u64, len: u64) -> DataRun {
        DataRun {
            logical,
            offset,
            len,
        }
    }

    #[test]
    fn data_runs_of_files_and_directories_only() {
        let bs = 4096;
        let disk = 1u64 << 30;
        let mut out = Vec::new();
        // A 10000-byte file in 3 blocks at 5000, the extent claiming 8: cut to the size.
        inode_data_runs(&inode(S_IFREG, 10000, &[(0, 8, 5000)]), bs, disk, &mut out);
        assert_eq!(out, [run(0, 5000 * bs, 3 * bs)]);
        out.clear();
        // Two extents, an unwritten one between them; a directory.
        let f = inode(
            S_IFREG,
            40 * bs,
            &[(0, 4, 100), (4, 32768 + 4, 200), (8, 2, 300)],
        );
        inode_data_runs(&f, bs, disk, &mut out);
        assert_eq!(
            out,
            [run(0, 100 * bs, 4 * bs), run(8 * bs, 300 * bs, 2 * bs)]
        );
        out.clear();
        inode_data_runs(&inode(S_IFDIR, bs, &[(0, 1, 77)]), bs, disk, &mut out);
        assert_eq!(out, [run(0, 77 * bs, bs)]);
        out.clear();
        // Nothing from: a symlink, a deeper tree, an extent past the disk or at block 0,
        // an extent past the size, a slot never used.
        inode_data_runs(&inode(0o120000, 10, &[(0, 1, 9)]), bs, disk, &mut out);
        let mut deep = inode(S_IFREG, bs, &[(0, 1, 9)]);
        put16(&mut deep, 0x28 + 6, 1);
        inode_data_runs(&deep, bs, disk, &mut out);
        inode_data_runs(&inode(S_IFREG, bs, &[(0, 1, 1 << 20)]), bs, disk, &mut out);
        inode_data_runs(&inode(S_IFREG, bs, &[(0, 1, 0)]), bs, disk, &mut out);
        inode_data_runs(&inode(S_IFREG, bs, &[(5, 1, 9)]), bs, disk, &mut out);
        inode_data_runs(&[0u8; 256], bs, disk, &mut out);
        assert!(out.is_empty(), "{out:?}");
        // Extents out of file order or on each other: each one that starts before the end of
        // the one before is skipped (no chunk of a file can then hold more than its length).
        let f = inode(
            S_IFREG,
            40 * bs,
            &[(0, 8, 100), (4, 8, 200), (8, 2, 300), (2, 1, 400)],
        );
        inode_data_runs(&f, bs, disk, &mut out);
        assert_eq!(
            out,
            [run(0, 100 * bs, 8 * bs), run(8 * bs, 300 * bs, 2 * bs)]
        );
    }
}
