//! Applies an OCI layer tar onto an ext4 image the way containerd's applier (`archive.Apply`)
//! applies it onto a directory: whiteouts and opaque directories remove what lower layers
//! hold, an existing entry is replaced unless both are directories, parents are resolved with
//! symlinks confined to the root, and directory times are set last. Paths never leave the
//! image: everything happens inside the ext4.

use crate::extfs::{
    ExtFs, Ino, Meta, Time, ROOT_INO, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG,
};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashSet;
use std::io::Read;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";
const PAX_XATTR: &str = "SCHILY.xattr.";
/// Symlinks followed while resolving one path, as Linux's MAXSYMLINKS.
const MAX_LINKS: usize = 40;

/// What applying one layer did.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyStats {
    pub entries: u64,
    pub file_bytes: u64,
    pub whiteouts: u64,
}

pub struct Applier<'a> {
    fs: &'a ExtFs,
    /// Time of what the tar does not date (parents it implies).
    now: Time,
    /// (parent, name) of everything this layer created: an opaque whiteout keeps these.
    unpacked: HashSet<(Ino, Vec<u8>)>,
    /// Directories and their times, applied after the layer's content.
    dir_times: Vec<(Ino, Time, Time)>,
    stats: ApplyStats,
}

impl<'a> Applier<'a> {
    pub fn new(fs: &'a ExtFs, now: i64) -> Applier<'a> {
        Applier {
            fs,
            now: Time { sec: now, nsec: 0 },
            unpacked: HashSet::new(),
            dir_times: Vec::new(),
            stats: ApplyStats::default(),
        }
    }

    /// Applies every entry of an uncompressed tar stream.
    pub fn apply(mut self, tar: impl Read) -> Result<ApplyStats> {
        let mut archive = tar::Archive::new(tar);
        for entry in archive.entries().context("reading the layer tar")? {
            let mut entry = entry.context("reading the layer tar")?;
            let name = entry.path_bytes().into_owned();
            self.entry(&mut entry)
                .with_context(|| format!("tar entry {:?}", String::from_utf8_lossy(&name)))?;
        }
        for (ino, atime, mtime) in std::mem::take(&mut self.dir_times) {
            self.fs.set_times(ino, atime, mtime)?;
        }
        Ok(self.stats)
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<R>) -> Result<()> {
        use tar::EntryType as T;
        self.stats.entries += 1;
        let kind = entry.header().entry_type();
        if matches!(kind, T::XGlobalHeader | T::XHeader) {
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        let Some((parent_comps, base)) = split_clean(&raw) else {
            return Ok(()); // resolves to the root: containerd ignores it
        };
        let parent = self.resolve_dir(&parent_comps, true)?;

        if let Some(orig) = base.strip_prefix(WHITEOUT_PREFIX) {
            self.stats.whiteouts += 1;
            if base == WHITEOUT_OPAQUE {
                return self.opaque(parent);
            }
            return Ok(self.fs.remove(parent, orig)?);
        }

        let meta = self.meta(entry)?;
        let is_dir = kind == T::Directory;
        if let Some(old) = self.fs.lookup(parent, &base)? {
            if !(is_dir && self.fs.file_type(old)? == S_IFDIR) {
                self.fs.remove(parent, &base)?;
            }
        }
        let perm = meta.perm;
        let ino = match kind {
            T::Directory => match self.fs.lookup(parent, &base)? {
                Some(ino) => ino,
                None => self.fs.mkdir(parent, &base)?,
            },
            T::Regular | T::Continuous | T::GNUSparse => {
                let size = entry.size();
                let ino = self.fs.create(parent, &base, S_IFREG | perm, (0, 0))?;
                self.fs.write_file(ino, entry, size)?;
                self.stats.file_bytes += size;
                ino
            }
            T::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| anyhow!("symlink without a target"))?;
                self.fs.symlink(parent, &base, &target)?
            }
            T::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| anyhow!("hard link without a target"))?;
                let ino = self.hardlink_target(&target)?;
                self.fs.hardlink(parent, &base, ino)?;
                ino
            }
            T::Char | T::Block => {
                let h = entry.header();
                let major = h.device_major()?.unwrap_or(0);
                let minor = h.device_minor()?.unwrap_or(0);
                let t = if kind == T::Char { S_IFCHR } else { S_IFBLK };
                self.fs.create(parent, &base, t | perm, (major, minor))?
            }
            T::Fifo => self.fs.create(parent, &base, S_IFIFO | perm, (0, 0))?,
            other => bail!("unhandled tar entry type {:?}", other.as_byte() as char),
        };
        for (key, value) in xattrs(entry)? {
            self.fs.set_xattr(ino, &key, &value)?;
        }
        let mut meta = meta;
        if kind == T::Symlink {
            meta.perm = 0o777; // no lchmod
        }
        self.fs.set_meta(ino, &meta)?;
        if is_dir {
            self.dir_times.push((ino, meta.atime, meta.mtime));
        }
        self.unpacked.insert((parent, base));
        Ok(())
    }

    /// Owner, mode and times from the header and its PAX records.
    fn meta<R: Read>(&self, entry: &mut tar::Entry<R>) -> Result<Meta> {
        let h = entry.header();
        let mut uid = h.uid()? as u32;
        let mut gid = h.gid()? as u32;
        let mut mtime = Time {
            sec: h.mtime()? as i64,
            nsec: 0,
        };
        let mut atime = None;
        if let Some(exts) = entry.pax_extensions()? {
            for ext in exts {
                let ext = ext?;
                let v = ext.value().unwrap_or("");
                match ext.key().unwrap_or("") {
                    "uid" => uid = v.parse().context("PAX uid")?,
                    "gid" => gid = v.parse().context("PAX gid")?,
                    "mtime" => mtime = parse_pax_time(v).context("PAX mtime")?,
                    "atime" => atime = Some(parse_pax_time(v).context("PAX atime")?),
                    _ => {}
                }
            }
        }
        // containerd: atime is the later of atime and mtime.
        let atime = match atime {
            Some(a) if (a.sec, a.nsec) > (mtime.sec, mtime.nsec) => a,
            _ => mtime,
        };
        Ok(Meta {
            perm: entry.header().mode()? & 0o7777,
            uid,
            gid,
            atime,
            mtime,
            ctime: mtime,
        })
    }

    /// `.wh..wh..opq`: everything in `dir` that this layer did not put there goes.
    fn opaque(&mut self, dir: Ino) -> Result<()> {
        for (name, ino) in self.fs.list(dir)? {
            if !self.unpacked.contains(&(dir, name.clone())) {
                self.fs.remove(dir, &name)?;
            } else if self.fs.file_type(ino)? == S_IFDIR {
                self.opaque(ino)?;
            }
        }
        Ok(())
    }

    /// containerd's hardlinkRootPath: the link name's directory is resolved inside the root,
    /// its last component is not followed.
    fn hardlink_target(&mut self, link: &[u8]) -> Result<Ino> {
        let (dir, base) =
            split_clean(link).ok_or_else(|| anyhow!("hard link to the root directory"))?;
        let parent = self.resolve_dir(&dir, false)?;
        self.fs.lookup(parent, &base)?.ok_or_else(|| {
            anyhow!(
                "hard link target {:?} does not exist",
                String::from_utf8_lossy(link)
            )
        })
    }

    /// Walks `comps` from the root as containerd's fs.RootPath does: symlinks are followed but
    /// confined (absolute targets and `..` stop at the root). Missing directories are created
    /// (0755, root) when `create` is set, else they are an error.
    fn resolve_dir(&mut self, comps: &[Vec<u8>], create: bool) -> Result<Ino> {
        let mut stack: Vec<Ino> = vec![ROOT_INO];
        let mut todo: Vec<Vec<u8>> = comps.iter().rev().cloned().collect();
        let mut links = 0;
        while let Some(c) = todo.pop() {
            let cur = *stack.last().unwrap_or(&ROOT_INO);
            if c.is_empty() || c == b"." {
                continue;
            }
            if c == b".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            let next = match self.fs.lookup(cur, &c)? {
                Some(ino) => ino,
                None if create => {
                    let ino = self.fs.mkdir(cur, &c)?;
                    self.fs.set_meta(
                        ino,
                        &Meta {
                            perm: 0o755,
                            atime: self.now,
                            mtime: self.now,
                            ctime: self.now,
                            ..Meta::default()
                        },
                    )?;
                    ino
                }
                None => bail!("directory {:?} does not exist", String::from_utf8_lossy(&c)),
            };
            match self.fs.file_type(next)? {
                S_IFDIR => stack.push(next),
                S_IFLNK => {
                    links += 1;
                    if links > MAX_LINKS {
                        bail!("too many levels of symbolic links");
                    }
                    let target = self.fs.readlink(next)?;
                    if target.first() == Some(&b'/') {
                        stack.truncate(1);
                    }
                    todo.extend(target.split(|&b| b == b'/').rev().map(<[u8]>::to_vec));
                }
                _ => bail!("{:?} is not a directory", String::from_utf8_lossy(&c)),
            }
        }
        Ok(*stack.last().unwrap_or(&ROOT_INO))
    }
}

/// Lexically cleans a tar name (Go's filepath.Clean) and splits it into parent components and
/// base. None when it names the root.
fn split_clean(raw: &[u8]) -> Option<(Vec<Vec<u8>>, Vec<u8>)> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if out.last().is_some_and(|l| l != b"..") {
                    out.pop();
                } else {
                    out.push(c.to_vec());
                }
            }
            _ => out.push(c.to_vec()),
        }
    }
    let base = out.pop()?;
    if base == b".." {
        return None;
    }
    Some((out, base))
}

fn xattrs<R: Read>(entry: &mut tar::Entry<R>) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            if let Some(k) = ext.key_bytes().strip_prefix(PAX_XATTR.as_bytes()) {
                out.push((k.to_vec(), ext.value_bytes().to_vec()));
            }
        }
    }
    // PAX records come from a map in Go: apply in a fixed order.
    out.sort();
    Ok(out)
}

/// A PAX time: seconds with an optional fraction, possibly negative.
fn parse_pax_time(v: &str) -> Result<Time> {
    let (neg, v) = match v.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, v),
    };
    let (s, frac) = v.split_once('.').unwrap_or((v, ""));
    let sec: i64 = s.parse().with_context(|| format!("bad time {v:?}"))?;
    let mut digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        bail!("bad time {v:?}");
    }
    while digits.len() < 9 {
        digits.push('0');
    }
    let nsec: u32 = digits.parse().unwrap_or(0);
    Ok(if neg && nsec > 0 {
        Time {
            sec: -sec - 1,
            nsec: 1_000_000_000 - nsec,
        }
    } else if neg {
        Time { sec: -sec, nsec: 0 }
    } else {
        Time { sec, nsec }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_names() {
        let s = |n: &str| {
            split_clean(n.as_bytes()).map(|(p, b)| {
                let mut v: Vec<String> = p
                    .iter()
                    .map(|c| String::from_utf8_lossy(c).into())
                    .collect();
                v.push(String::from_utf8_lossy(&b).into());
                v.join("/")
            })
        };
        assert_eq!(s("./"), None);
        assert_eq!(s("/"), None);
        assert_eq!(s(".."), None);
        assert_eq!(s("a/.."), None);
        assert_eq!(s("./a/b/"), Some("a/b".into()));
        assert_eq!(s("/a//b/./c"), Some("a/b/c".into()));
        assert_eq!(s("a/../../b"), Some("../b".into()));
        assert_eq!(s("../../etc/passwd"), Some("../../etc/passwd".into()));
    }

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time("12.5").unwrap(),
            Time {
                sec: 12,
                nsec: 500_000_000
            }
        );
        assert_eq!(parse_pax_time("7").unwrap(), Time { sec: 7, nsec: 0 });
        assert_eq!(
            parse_pax_time("-1.25").unwrap(),
            Time {
                sec: -2,
                nsec: 750_000_000
            }
        );
        assert!(parse_pax_time("x").is_err());
    }
}
