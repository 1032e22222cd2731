//! mount(2)/umount(2) and mountinfo: the few mount operations the snapshotter needs.

use anyhow::{Context, Result};
use std::ffi::CString;
use std::path::Path;

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).with_context(|| format!("{s:?} contains NUL"))
}

/// Mounts `source` of `fstype` at `target` with comma-separated fs `data` options.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<()> {
    let (s, t, f, d) = (
        cstr(source)?,
        cstr(&target.to_string_lossy())?,
        cstr(fstype)?,
        cstr(data)?,
    );
    // SAFETY: valid NUL-terminated strings.
    let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mount -t {fstype} -o {data} {source} {}", target.display()));
    }
    Ok(())
}

pub fn unmount(target: &Path, detach: bool) -> Result<()> {
    let t = cstr(&target.to_string_lossy())?;
    let flags = if detach { libc::MNT_DETACH } else { 0 };
    // SAFETY: valid path string.
    if unsafe { libc::umount2(t.as_ptr(), flags) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("umount {}", target.display()));
    }
    Ok(())
}

/// Mount points (unescaped) and sources in the calling thread's mount namespace.
pub fn mounts() -> Vec<(String, String)> {
    let text = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mp = left.split_whitespace().nth(4)?;
            let src = right.split_whitespace().nth(1).unwrap_or("");
            Some((unescape(mp), src.to_string()))
        })
        .collect()
}

/// Mount points of the filesystems of type `fs_type` (as mountinfo names it, e.g. `fuse.ovbd`).
pub fn mounts_of_type(fs_type: &str) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == fs_type)
                .then(|| unescape(left.split_whitespace().nth(4).unwrap_or("")))
        })
        .collect()
}

pub fn is_mounted(target: &Path) -> bool {
    let t = target.to_string_lossy();
    mounts().iter().any(|(mp, _)| *mp == t)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn unescape_octal() {
        assert_eq!(super::unescape("/a\\040b"), "/a b");
        assert_eq!(super::unescape("/x\\"), "/x\\");
        assert_eq!(super::unescape("/plain"), "/plain");
    }
}
