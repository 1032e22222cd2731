//! A cgroup of its own for the command `ovbd record-trace` runs from an image: the command is
//! its publisher's choice, and a memory and a process limit keep it from starving the node
//! it is recorded on. cgroup v2 where its memory and pids controllers are, else cgroup v1's
//! memory and pids hierarchies (hybrid hosts mount v2 without controllers).

use anyhow::{bail, Context, Result};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What CMD's processes may take together.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub memory_mib: u64,
    pub pids: u64,
}

/// CMD's cgroup: made by [`CmdCgroup::create`], joined by the child before exec
/// ([`join`]), removed (its processes killed first) when dropped.
pub struct CmdCgroup {
    /// One directory (v2) or one per hierarchy (v1: memory, pids), all made by us.
    dirs: Vec<PathBuf>,
    v2: bool,
    pub limits: Limits,
}

/// A cgroup filesystem this process is in: where it is mounted and this process's directory
/// in it.
struct Hierarchy {
    mount: PathBuf,
    own: PathBuf,
}

impl CmdCgroup {
    /// Makes the cgroup `name` with `limits`, next to (v2: below, or else at the root of the
    /// hierarchy) this process's own.
    pub fn create(name: &str, limits: Limits) -> Result<CmdCgroup> {
        let mountinfo = read("/proc/self/mountinfo")?;
        let own = read("/proc/self/cgroup")?;
        if let Some(h) = hierarchy(&mountinfo, &own, None) {
            let ctrls =
                std::fs::read_to_string(h.mount.join("cgroup.controllers")).unwrap_or_default();
            if has_all(&ctrls, &["memory", "pids"]) {
                return create_v2(&h, name, limits);
            }
        }
        let mut cg = CmdCgroup {
            dirs: Vec::new(),
            v2: false,
            limits,
        };
        let bytes = limits.memory_mib << 20;
        // (file, value, whether the kernel may lack it: memsw, RAM + swap, exists only with
        // swap accounting; it must stay >= the RAM limit, so it comes after it.)
        for (ctrl, files) in [
            (
                "memory",
                &[
                    ("memory.limit_in_bytes", bytes, false),
                    ("memory.memsw.limit_in_bytes", bytes, true),
                ][..],
            ),
            ("pids", &[("pids.max", limits.pids, false)][..]),
        ] {
            let Some(h) = hierarchy(&mountinfo, &own, Some(ctrl)) else {
                bail!("no cgroup hierarchy with the {ctrl} controller (cgroup v2 without it, and no v1 {ctrl} mount)");
            };
            let dir = h.mount.join(&h.own).join(name);
            make_dir(&dir)?;
            cg.dirs.push(dir.clone());
            for &(file, value, optional) in files {
                let path = dir.join(file);
                if !optional || path.exists() {
                    write(&path, &value.to_string())?;
                }
            }
        }
        Ok(cg)
    }

    /// The `cgroup.procs` files the child writes itself into ([`join`]).
    pub fn procs_files(&self) -> Result<Vec<CString>> {
        self.dirs
            .iter()
            .map(|d| {
                CString::new(d.join("cgroup.procs").into_os_string().into_encoded_bytes())
                    .context("a cgroup path with NUL")
            })
            .collect()
    }

    /// How often the kernel killed one of CMD's processes for lack of memory.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        self.counter(file, "oom_kill")
    }

    /// How many of CMD's forks the process limit refused.
    pub fn forks_refused(&self) -> u64 {
        self.counter("pids.events", "max")
    }

    /// The counter `key` of the flat-keyed `file` of whichever of our directories has it.
    fn counter(&self, file: &str, key: &str) -> u64 {
        let in_text = |text: String| -> u64 {
            text.lines()
                .filter_map(|l| l.split_once(' '))
                .filter(|(k, _)| *k == key)
                .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
                .sum()
        };
        self.dirs
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join(file)).ok())
            .map(in_text)
            .sum()
    }

    /// Kills what is left in the cgroup and removes it (a cgroup goes only once empty).
    fn remove(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for dir in std::mem::take(&mut self.dirs) {
            loop {
                kill_all(&dir);
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() >= deadline => {
                        log::warn!("removing CMD's cgroup {}: {e}; left behind", dir.display());
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }
}

impl Drop for CmdCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

fn create_v2(h: &Hierarchy, name: &str, limits: Limits) -> Result<CmdCgroup> {
    // Below our own cgroup if its controllers reach there; else (our cgroup holds processes,
    // so it cannot hand controllers down) at the root, which always can.
    let mut why = String::new();
    for parent in [h.mount.join(&h.own), h.mount.clone()] {
        let ctrls =
            std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
        if !has_all(&ctrls, &["memory", "pids"]) {
            if let Err(e) = write(&parent.join("cgroup.subtree_control"), "+memory +pids") {
                why = format!("{e:#}");
                continue;
            }
        }
        let dir = parent.join(name);
        make_dir(&dir)?;
        let cg = CmdCgroup {
            dirs: vec![dir.clone()],
            v2: true,
            limits,
        };
        write(
            &dir.join("memory.max"),
            &(limits.memory_mib << 20).to_string(),
        )?;
        // No swap either: the limit is on what CMD holds, not only on its RAM.
        if dir.join("memory.swap.max").exists() {
            write(&dir.join("memory.swap.max"), "0")?;
        }
        write(&dir.join("pids.max"), &limits.pids.to_string())?;
        return Ok(cg);
    }
    bail!("no cgroup v2 directory can have the memory and pids controllers: {why}")
}

/// The cgroup hierarchy this process is in that has `controller` (v1), or the v2 one (`None`).
fn hierarchy(mountinfo: &str, own: &str, controller: Option<&str>) -> Option<Hierarchy> {
    // /proc/self/cgroup: "ID:controllers:path"; v2's line has no controllers.
    let path = own.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        let wanted = match controller {
            None => ctrls.is_empty(),
            Some(c) => ctrls.split(',').any(|x| x == c),
        };
        wanted.then(|| path.trim_start_matches('/').to_owned())
    })?;
    // mountinfo: "... mount-point ... - fstype source super-options".
    let mount = mountinfo.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let dash = f.iter().position(|x| *x == "-")?;
        let (point, fstype, opts) = (f.get(4)?, f.get(dash + 1)?, f.get(dash + 3)?);
        let fits = match controller {
            None => *fstype == "cgroup2",
            Some(c) => *fstype == "cgroup" && opts.split(',').any(|o| o == c),
        };
        fits.then(|| PathBuf::from(unescape_mount_point(point)))
    })?;
    Some(Hierarchy {
        mount,
        own: PathBuf::from(path),
    })
}

/// mountinfo writes space, tab, newline and backslash in paths as octal escapes.
fn unescape_mount_point(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (b[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn has_all(list: &str, wanted: &[&str]) -> bool {
    wanted
        .iter()
        .all(|w| list.split_whitespace().any(|x| x == *w))
}

/// Makes `dir`; one left by an earlier run of the same pid is removed first (if empty).
fn make_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        let _ = std::fs::remove_dir(dir);
    }
    std::fs::create_dir(dir).with_context(|| format!("creating cgroup {}", dir.display()))
}

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {path}"))
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

/// SIGKILLs every process in cgroup `dir` (v2's cgroup.kill where the kernel has it).
fn kill_all(dir: &Path) {
    let kill = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.kill"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"1"));
    if kill.is_ok() {
        return;
    }
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
        // SAFETY: kill(2); the pids are the cgroup's, which only CMD's processes join.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// In the child, before exec: moves it into each cgroup whose `cgroup.procs` is in `procs`.
/// Async-signal-safe calls only.
///
/// # Safety
/// Only between fork and exec, or in a process that means to move itself.
pub unsafe fn join(procs: &[CString]) -> std::io::Result<()> {
    for p in procs {
        let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // "0": the writing process itself.
        let n = libc::write(fd, c"0".as_ptr().cast(), 1);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if n != 1 {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 1 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
27 25 0:24 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
28 25 0:25 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
29 25 0:26 / /sys/fs/cgroup/cpu\\040x rw,relatime - cgroup cgroup rw,cpu,cpuacct";
    const CGROUP: &str = "\
9:cpu,cpuacct:/
8:pids:/a
4:memory:/process_api/b
0::/user.slice/s.scope";

    #[test]
    fn hierarchies_are_found_from_mountinfo_and_proc_cgroup() {
        let h = hierarchy(MOUNTINFO, CGROUP, Some("memory")).unwrap();
        assert_eq!(h.mount, Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(h.own, Path::new("process_api/b"));
        let h = hierarchy(MOUNTINFO, CGROUP, Some("pids")).unwrap();
        assert_eq!(h.mount.join(&h.own), Path::new("/sys/fs/cgroup/pids/a"));
        let h = hierarchy(MOUNTINFO, CGROUP, None).unwrap();
        assert_eq!(h.mount, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(h.own, Path::new("user.slice/s.scope"));
        let h = hierarchy(MOUNTINFO, CGROUP, Some("cpuacct")).unwrap();
        assert_eq!(h.mount, Path::new("/sys/fs/cgroup/cpu x"));
        assert!(hierarchy(MOUNTINFO, CGROUP, Some("blkio")).is_none());
        assert!(hierarchy("", CGROUP, None).is_none());
    }

    /// v2 on a stand-in tree (the host may only have v1 controllers): below our own cgroup
    /// when it hands the controllers down, else at the root; the limits are written.
    #[test]
    fn v2_cgroup_goes_below_ours_or_else_to_the_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let own = root.join("user.slice/s.scope");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "cpu memory pids\n").unwrap();
        let h = Hierarchy {
            mount: root.to_owned(),
            own: "user.slice/s.scope".into(),
        };
        let limits = Limits {
            memory_mib: 64,
            pids: 32,
        };
        // Our cgroup holds processes: enabling controllers in it fails (EBUSY; here EISDIR).
        std::fs::create_dir(own.join("cgroup.subtree_control")).unwrap();
        let cg = create_v2(&h, "ovbd-record-1", limits).unwrap();
        let dir = root.join("ovbd-record-1");
        assert_eq!(cg.dirs, std::slice::from_ref(&dir));
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max"), (64u64 << 20).to_string());
        assert_eq!(read("pids.max"), "32");
        // (cgroupfs removes a cgroup with its interface files; a plain directory needs them gone.)
        let empty = |d: &Path| {
            for e in std::fs::read_dir(d).unwrap() {
                std::fs::remove_file(e.unwrap().path()).unwrap();
            }
        };
        empty(&dir);
        drop(cg);
        assert!(!dir.exists(), "not removed");

        // It hands them down: CMD's cgroup goes below it.
        std::fs::remove_dir(own.join("cgroup.subtree_control")).unwrap();
        std::fs::write(own.join("cgroup.subtree_control"), "memory pids").unwrap();
        let cg = create_v2(&h, "ovbd-record-2", limits).unwrap();
        assert_eq!(cg.dirs, [own.join("ovbd-record-2")]);
        empty(&own.join("ovbd-record-2"));
    }

    #[test]
    fn controller_lists_are_matched_by_word() {
        assert!(has_all("cpuset cpu io memory pids", &["memory", "pids"]));
        assert!(!has_all("cpuset cpu io memory", &["memory", "pids"]));
        assert!(!has_all("memory_x pids", &["memory", "pids"]));
    }
}
