//! `ovbd device` end to end, through the CLI, on one block-device frontend: the one in
//! $OVBD_TEST_FRONTEND (`fuse`, the default: loop devices over the server's FUSE mount, which
//! this host has; `ublk`: what tests/e2e/guest/10-device.sh runs inside the QEMU guest). One
//! body per behaviour, whatever the frontend. Needs root and the frontend's kernel devices;
//! without them the tests fail (saying so) rather than pass unchecked. $OVBD_BIN overrides the
//! ovbd binary (the guest runs a private copy).

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

const HELLO_BLOB: &str =
    "hello-world-oci/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d";
/// sha256 of /hello in the hello-world layer's ext4.
const HELLO_SHA: &str = "d3f7d10e296e5c626ea78539cb38cd8dffd043bea3627da35ce3b20c0ac68014";
const MIB: u64 = 1 << 20;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn hello_blob() -> PathBuf {
    fixture(HELLO_BLOB)
}

/// The frontend under test.
fn frontend() -> String {
    let f = std::env::var("OVBD_TEST_FRONTEND").unwrap_or_else(|_| "fuse".into());
    assert!(
        f == "fuse" || f == "ublk",
        "OVBD_TEST_FRONTEND is {f:?}; fuse or ublk"
    );
    f
}

/// Fails the test unless this host can run the frontend under test.
fn require_host() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let needs: &[&str] = match frontend().as_str() {
        "ublk" => &["/dev/ublk-control"],
        _ => &["/dev/fuse", "/dev/loop-control"],
    };
    let missing: Vec<&&str> = needs.iter().filter(|p| !Path::new(p).exists()).collect();
    assert!(
        root && missing.is_empty(),
        "the {} device tests need root (have: {root}) and {needs:?} (missing: {missing:?})",
        frontend()
    );
}

fn ovbd_bin() -> PathBuf {
    std::env::var_os("OVBD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_ovbd").into())
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

/// Runs `cmd`, asserts it succeeded, returns its stdout.
fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Polls `ok` for up to a minute (a hang guard, not a timing check).
fn wait_for(mut ok: impl FnMut() -> bool) -> bool {
    for _ in 0..600 {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Reads `len` bytes at `offset` with O_DIRECT (past the page cache, to the device's server).
fn read_direct(dev: &str, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)?;
    let mut raw = vec![0u8; len + 4096];
    let pad = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[pad..pad + len];
    for (i, chunk) in buf.chunks_mut(MIB as usize).enumerate() {
        f.read_exact_at(chunk, offset + i as u64 * MIB)?;
    }
    Ok(buf.to_vec())
}

fn write_direct(dev: &str, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap();
    let mut raw = vec![0u8; data.len() + 4096];
    let pad = raw.as_ptr().align_offset(4096);
    raw[pad..pad + data.len()].copy_from_slice(data);
    f.write_all_at(&raw[pad..pad + data.len()], offset)
        .unwrap_or_else(|e| panic!("writing {dev} at {offset}: {e}"));
    f.sync_all().unwrap();
}

/// Deterministic pseudo-random bytes (xorshift64*), different per seed.
fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// e2fsck -fn: its exit code, then the lines that are not progress/summary noise (banner,
/// "Pass N:", the statistics line, blank lines), with the device path replaced by DEV.
fn e2fsck_report(dev: &str) -> String {
    let out = run("e2fsck", &["-fn", dev]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let mut lines = vec![out.status.code().unwrap_or(-1).to_string()];
    for l in text.lines() {
        let noise = l.is_empty()
            || (l.starts_with("e2fsck ") && l.contains('('))
            || l.starts_with("Pass ")
            || (l.contains(" files (") && l.ends_with(" blocks"));
        if !noise {
            lines.push(l.replace(dev, "DEV"));
        }
    }
    lines.join("\n")
}

fn e2fsck_clean(dev: &str) {
    let rep = e2fsck_report(dev);
    assert_eq!(rep, "0", "e2fsck -fn {dev} is not clean");
}

/// A mount, lazily unmounted on drop if the test did not unmount it.
struct Mounted {
    dir: PathBuf,
    done: bool,
}

impl Mounted {
    fn new(dev: &str, dir: &Path, ro: bool) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        let d = dir.to_str().unwrap();
        let args: Vec<&str> = if ro {
            vec!["-o", "ro", dev, d]
        } else {
            vec![dev, d]
        };
        ok("mount", &args);
        Mounted {
            dir: dir.to_path_buf(),
            done: false,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Unmounts, retrying while it is busy for a moment: a process another test forks at the
    /// same time holds copies of this one's descriptors until it execs. Still busy after 10 s:
    /// fails, naming the processes holding it.
    fn umount(mut self) {
        let dir = self.dir.to_str().unwrap();
        for _ in 0..50 {
            let out = run("umount", &[dir]);
            if out.status.success() {
                self.done = true;
                return;
            }
            if !String::from_utf8_lossy(&out.stderr).contains("busy") {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("umount {dir} failed; held by: {}", holders(&self.dir));
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !self.done {
            let _ = run("umount", &["-l", self.dir.to_str().unwrap()]);
        }
    }
}

/// The processes with a descriptor or working directory under `dir` (pid and command).
fn holders(dir: &Path) -> String {
    let mut found = Vec::new();
    for proc_dir in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = proc_dir.file_name();
        if !pid.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let p = proc_dir.path();
        let mut links: Vec<PathBuf> = std::fs::read_dir(p.join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        links.push(p.join("cwd"));
        if links
            .iter()
            .any(|l| std::fs::read_link(l).is_ok_and(|t| t.starts_with(dir)))
        {
            let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
            found.push(format!("{} ({})", pid.to_string_lossy(), comm.trim()));
        }
    }
    if found.is_empty() {
        "no process (a mount copied into another namespace, or the kernel)".into()
    } else {
        found.join(", ")
    }
}

/// A run directory of its own and the devices attached in it, detached on drop.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        require_host();
        Host {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn p(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }

    /// `ovbd ARGS` under a hang guard (timeout(1) kills it after 3 minutes: exit 124).
    fn ovbd(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .arg("180")
            .arg(ovbd_bin())
            .args(args)
            .env("OVBD_RUN_DIR", self.path("run"))
            .output()
            .unwrap()
    }

    fn ovbd_ok(&self, args: &[&str]) -> String {
        let out = self.ovbd(args);
        assert!(
            out.status.success(),
            "ovbd {args:?} (exit {:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes NAME.json: `lowers` bottom to top (a directory becomes {"dir": ...}), an optional
    /// upper (data, index), resultFile NAME.result.
    fn config(&self, name: &str, lowers: &[&Path], upper: Option<(&Path, &Path)>) -> PathBuf {
        let lowers: Vec<_> = lowers
            .iter()
            .map(|l| {
                if l.is_dir() {
                    serde_json::json!({ "dir": l })
                } else {
                    serde_json::json!({ "file": l })
                }
            })
            .collect();
        let mut cfg = serde_json::json!({
            "lowers": lowers,
            "resultFile": self.path(&format!("{name}.result")),
        });
        if let Some((data, index)) = upper {
            cfg["upper"] = serde_json::json!({"data": data, "index": index});
        }
        let p = self.path(&format!("{name}.json"));
        std::fs::write(&p, serde_json::to_vec(&cfg).unwrap()).unwrap();
        p
    }

    fn result(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.result"))).unwrap_or_default()
    }

    /// Attaches `configs` in one background server; returns the devices it printed.
    fn attach(&self, configs: &[&Path]) -> Vec<String> {
        let fe = frontend();
        let mut args = vec!["device", "attach", "--background", "--frontend", &fe];
        args.extend(configs.iter().map(|c| c.to_str().unwrap()));
        let devs: Vec<String> = self.ovbd_ok(&args).lines().map(String::from).collect();
        assert_eq!(devs.len(), configs.len(), "attach printed {devs:?}");
        let pattern = if fe == "ublk" {
            "/dev/ublkb"
        } else {
            "/dev/loop"
        };
        for d in &devs {
            let n = d.strip_prefix(pattern).unwrap_or("");
            assert!(
                !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()),
                "attach printed {d}, expected {pattern}N"
            );
            assert!(
                std::fs::metadata(d).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_block_device()
                }),
                "{d} is not a block device"
            );
        }
        devs
    }

    fn attach1(&self, config: &Path) -> String {
        self.attach(&[config]).remove(0)
    }

    /// Detaches `dev` and checks the kernel let go of it.
    fn detach(&self, dev: &str) {
        // A loop device node stays; its backing file must be gone. Another test running
        // alongside may bind the freed number at once: then it backs onto a file of its own.
        let backing = dev
            .strip_prefix("/dev/loop")
            .map(|n| format!("/sys/block/loop{n}/loop/backing_file"));
        let ours = backing
            .as_ref()
            .and_then(|b| std::fs::read_to_string(b).ok());
        self.ovbd_ok(&["device", "detach", dev]);
        if let Some(id) = dev.strip_prefix("/dev/ublkb") {
            assert!(
                !Path::new(dev).exists() && !Path::new(&format!("/dev/ublkc{id}")).exists(),
                "/dev/ublk[bc]{id} still present after detach"
            );
        } else if let (Some(backing), Some(ours)) = (backing, ours) {
            let now = std::fs::read_to_string(&backing).ok();
            assert!(
                now.as_ref() != Some(&ours),
                "{dev} still has its backing file after detach: {ours:?}"
            );
        }
    }

    fn list(&self) -> Vec<serde_json::Value> {
        let out = self.ovbd_ok(&["device", "list", "--json"]);
        serde_json::from_str(&out).unwrap()
    }

    fn serving(&self) -> usize {
        self.list()
            .iter()
            .filter(|d| d["state"] == "serving")
            .count()
    }

    /// A fresh writable layer (data, index) of `vsize_gb` GiB (0: the lowers').
    fn layer(&self, name: &str, vsize_gb: u32) -> (PathBuf, PathBuf) {
        let (d, i) = (
            self.path(&format!("{name}.data")),
            self.path(&format!("{name}.index")),
        );
        let gb = vsize_gb.to_string();
        self.ovbd_ok(&[
            "layer",
            "create",
            d.to_str().unwrap(),
            i.to_str().unwrap(),
            "--vsize-gb",
            &gb,
        ]);
        (d, i)
    }

    /// Commits a writable layer to `out` (`-z`: ZFile + tar), then deletes the writable files.
    fn commit(&self, (data, index): &(PathBuf, PathBuf), outs: &[(&Path, bool)]) {
        for (out, z) in outs {
            let mut args = vec!["layer", "commit"];
            if *z {
                args.push("-z");
            }
            args.extend([
                data.to_str().unwrap(),
                index.to_str().unwrap(),
                out.to_str().unwrap(),
            ]);
            self.ovbd_ok(&args);
        }
        std::fs::remove_file(data).unwrap();
        std::fs::remove_file(index).unwrap();
    }

    fn inspect(&self, layer: &Path) -> serde_json::Value {
        serde_json::from_str(&self.ovbd_ok(&[
            "layer",
            "inspect",
            "--json",
            layer.to_str().unwrap(),
        ]))
        .unwrap()
    }

    /// Asserts every server of this run dir is gone and no device is listed.
    fn assert_all_gone(&self) {
        let pids: Vec<u64> = self
            .list()
            .iter()
            .filter_map(|d| d["pid"].as_u64())
            .collect();
        assert!(
            wait_for(|| pids
                .iter()
                .all(|p| !Path::new(&format!("/proc/{p}")).exists())),
            "device servers {pids:?} still run after every device was detached"
        );
        assert!(
            self.list().iter().all(|d| d["state"] == "gone"),
            "devices left: {:?}",
            self.list()
        );
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(self.dir.path().to_str().unwrap_or("-")))
            .filter(|m| !m.contains("/run/"))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = run("umount", &["-l", m]);
        }
        for d in self.list() {
            if d["state"] != "gone" {
                let _ = self.ovbd(&["device", "detach", d["block"].as_str().unwrap_or("")]);
            }
        }
        // Servers exit once their devices are gone; their FUSE mounts go with them.
        wait_for(|| {
            self.list()
                .iter()
                .all(|d| !Path::new(&format!("/proc/{}", d["pid"])).exists())
        });
    }
}

/// The empty 64 GiB ext4 base layer (upstream's ext4_64), extracted into the host's dir.
fn extract_base(host: &Host) -> PathBuf {
    ok(
        "tar",
        &[
            "-xzf",
            fixture("ext4_64.tar.gz").to_str().unwrap(),
            "-C",
            host.dir.path().to_str().unwrap(),
        ],
    );
    host.path("ext4_64")
}

/// sha256 of every regular file under `root` (relative paths), lost+found left out.
fn hash_tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            if rel == "lost+found" {
                continue;
            }
            let t = e.file_type().unwrap();
            if t.is_dir() {
                walk(root, &p, out);
            } else if t.is_file() {
                let data = std::fs::read(&p).unwrap_or_else(|e| panic!("reading {rel}: {e}"));
                out.insert(rel, sha256_hex(&data));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Writes `files` (path -> contents) under `root`; returns their manifest (path -> sha256).
fn write_tree(root: &Path, files: &[(String, Vec<u8>)]) -> BTreeMap<String, String> {
    let mut manifest = BTreeMap::new();
    for (rel, data) in files {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        manifest.insert(rel.clone(), sha256_hex(data));
    }
    manifest
}

/// `total` pseudo-random bytes cut into `piece`-byte files DIR/f000, f001, ...
fn split_files(dir: &str, seed: u64, total: usize, piece: usize) -> Vec<(String, Vec<u8>)> {
    pseudo_random(seed, total)
        .chunks(piece)
        .enumerate()
        .map(|(i, c)| (format!("{dir}/f{i:03}"), c.to_vec()))
        .collect()
}

fn assert_tree(mnt: &Mounted, want: &BTreeMap<String, String>, what: &str) {
    let got = hash_tree(&mnt.dir);
    if &got != want {
        let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
        let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        let differ: Vec<_> = want
            .iter()
            .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
            .map(|(k, _)| k)
            .collect();
        panic!("{what}: missing {missing:?}, unexpected {extra:?}, contents differ {differ:?}");
    }
}

// ---- the read-only vector

#[test]
fn read_only_vector_reads_as_upstream_made_it_and_refuses_writes() {
    let host = Host::new();
    let blob = hello_blob();
    let cfg = host.config("hello", &[&blob], None);
    let dev = host.attach1(&cfg);
    assert_eq!(host.result("hello"), "success");
    assert_eq!(
        ok("blockdev", &["--getsize64", &dev]).trim(),
        (64u64 << 30).to_string()
    );

    // Read-only: the kernel refuses a write (EROFS/EACCES before it reaches the server).
    assert_eq!(ok("blockdev", &["--getro", &dev]).trim(), "1");
    let dd = run(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={dev}"),
            "bs=4096",
            "count=1",
            "oflag=direct",
        ],
    );
    assert!(
        !dd.status.success(),
        "a direct write to read-only {dev} succeeded"
    );

    // ovbd device list (table and --json): this device, read-only, serving, a live server.
    let listed = host.list();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let d = &listed[0];
    assert_eq!(d["block"], dev.as_str());
    assert_eq!(d["frontend"], frontend().as_str());
    assert_eq!(d["state"], "serving");
    assert_eq!(d["writable"], false);
    let pid = d["pid"].as_u64().unwrap();
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "server {pid} not running"
    );
    let table = host.ovbd_ok(&["device", "list"]);
    let row = table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(dev.as_str()))
        .unwrap_or_else(|| panic!("ovbd device list does not show {dev}:\n{table}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert!(
        cols.contains(&"ro")
            && cols.contains(&"serving")
            && cols.contains(&pid.to_string().as_str()),
        "ovbd device list row: {row}"
    );

    // The ext4 inside mounts; /hello has upstream's hash.
    let mnt = Mounted::new(&dev, &host.path("mnt"), true);
    assert_eq!(
        ok(
            "findmnt",
            &["-n", "-o", "FSTYPE", mnt.dir.to_str().unwrap()]
        )
        .trim(),
        "ext4"
    );
    assert_eq!(
        sha256_hex(&std::fs::read(mnt.path("hello")).unwrap()),
        HELLO_SHA
    );
    mnt.umount();

    // e2fsck: exactly upstream's own complaint about /lost+found's HTREE (exit 4), nothing else.
    let expected = "4
Problem in HTREE directory inode 11: block #2 not referenced
Invalid HTREE directory inode 11 (/lost+found).  Clear HTree index? no
DEV: ********** WARNING: Filesystem still has errors **********";
    assert_eq!(
        e2fsck_report(&dev),
        expected,
        "e2fsck differs from upstream's known complaint"
    );

    // The device's bytes are the flattened image's: the first 256 MiB (superblock, tables,
    // /hello) and windows around the backup superblocks at 128 MiB * 3^k.
    let flat = host.p("flat.img");
    host.ovbd_ok(&["image", "export", blob.to_str().unwrap(), &flat]);
    let flat_f = std::fs::File::open(&flat).unwrap();
    let flat_at = |off: u64, len: usize| {
        let mut b = vec![0u8; len];
        flat_f.read_exact_at(&mut b, off).unwrap();
        b
    };
    for (off, len) in [(0, 256 * MIB)]
        .into_iter()
        .chain([384u64, 1152, 3456, 10368, 31104].map(|m| (m * MIB, 4 * MIB)))
    {
        assert!(
            read_direct(&dev, off, len as usize).unwrap() == flat_at(off, len as usize),
            "{dev} differs from ovbd image export's at {} MiB",
            off / MIB
        );
    }
    drop(flat_f);
    std::fs::remove_file(&flat).unwrap();

    host.detach(&dev);
    host.assert_all_gone();
}

// ---- writable layers, commit, stacks

#[test]
fn rw_layers_commit_and_stack_three_and_four_deep() {
    let host = Host::new();
    let base = extract_base(&host);
    let mnt_dir = host.path("mnt");

    // rw session: attach writable, mount; end: umount, e2fsck clean, detach.
    let rw_session = |cfg: &Path| {
        let dev = host.attach1(cfg);
        assert_eq!(
            ok("blockdev", &["--getro", &dev]).trim(),
            "0",
            "{dev} (writable) is read-only"
        );
        let m = Mounted::new(&dev, &mnt_dir, false);
        (dev, m)
    };
    let end_rw = |dev: &str, m: Mounted| {
        ok("sync", &[]);
        m.umount();
        e2fsck_clean(dev);
        host.detach(dev);
    };
    let check_ro = |want: &BTreeMap<String, String>, lowers: &[&Path], what: &str| {
        let cfg = host.config("ro", lowers, None);
        let dev = host.attach1(&cfg);
        assert_eq!(
            ok("blockdev", &["--getro", &dev]).trim(),
            "1",
            "{dev} (no upper) is writable"
        );
        let m = Mounted::new(&dev, &mnt_dir, true);
        assert_tree(&m, want, what);
        m.umount();
        e2fsck_clean(&dev);
        host.detach(&dev);
    };

    // 1. RW layer over the base: files of varied sizes, nested dirs, a sparse and an empty file.
    let up1 = host.layer("up1", 0);
    let cfg = host.config("rw1", &[&base], Some((&up1.0, &up1.1)));
    let (dev, m) = rw_session(&cfg);
    assert_eq!(
        ok("blockdev", &["--getsize64", &dev]).trim(),
        (64u64 << 30).to_string()
    );
    let mut files = vec![
        ("big/a.bin".to_string(), pseudo_random(1, 16 << 20)),
        ("big/b.bin".to_string(), pseudo_random(2, (8 << 20) + 123)),
        ("empty".to_string(), Vec::new()),
    ];
    files.extend(split_files("mid", 3, 12 << 20, 1_234_567));
    for d in 1..=6u64 {
        for e in 1..=3u64 {
            let piece = 13000 + ((d * 3 + e) * 4999) as usize;
            files.extend(split_files(
                &format!("tree/d{d}/e{e}"),
                10 * d + e,
                512 << 10,
                piece,
            ));
        }
    }
    let mut m1 = write_tree(&m.dir, &files);
    drop(files);
    // A sparse file: 256 MiB with 1 MiB of data at 100 MiB.
    let sparse_data = pseudo_random(4, MIB as usize);
    {
        let f = std::fs::File::create(m.path("sparse.img")).unwrap();
        f.set_len(256 * MIB).unwrap();
        f.write_all_at(&sparse_data, 100 * MIB).unwrap();
    }
    let mut sparse = vec![0u8; 256 * MIB as usize];
    sparse[100 * MIB as usize..101 * MIB as usize].copy_from_slice(&sparse_data);
    m1.insert("sparse.img".into(), sha256_hex(&sparse));
    drop(sparse);
    end_rw(&dev, m);
    let layer1 = host.path("layer1");
    let layer1z = host.path("layer1.z");
    host.commit(&up1, &[(&layer1, false), (&layer1z, true)]);
    let z = host.inspect(&layer1z);
    assert_eq!(
        (z["wrapper"].as_str(), z["zfile"]["algorithm"].as_str()),
        (Some("pax"), Some("lz4"))
    );

    // 2. base + layer1 read-only: every file, nothing else.
    check_ro(&m1, &[&base, &layer1], "base + layer1");

    // 3. RW layer 2 over base + layer1: new files, an overwrite, deletions.
    let up2 = host.layer("up2", 0);
    let cfg = host.config("rw2", &[&base, &layer1], Some((&up2.0, &up2.1)));
    let (dev, m) = rw_session(&cfg);
    assert_tree(&m, &m1, "base + layer1 under a writable layer");
    let mut files = vec![
        ("big/c.bin".to_string(), pseudo_random(20, 4 << 20)),
        // big/a.bin (layer 1's) gets new, shorter contents.
        ("big/a.bin".to_string(), pseudo_random(21, 2 << 20)),
    ];
    for i in 0..4u64 {
        files.extend(split_files(
            &format!("new/n{i}"),
            30 + i,
            1 << 20,
            70000 + i as usize * 33333,
        ));
    }
    let m2_new = write_tree(&m.dir, &files);
    let deleted = [
        "big/b.bin",
        "mid/f002",
        "mid/f007",
        "tree/d3",
        "tree/d1/e1/f012",
        "empty",
    ];
    for p in deleted {
        let path = m.path(p);
        assert!(path.exists(), "{p} (to delete) does not exist");
        if path.is_dir() {
            std::fs::remove_dir_all(&path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
    }
    let mut m2: BTreeMap<String, String> = m1
        .into_iter()
        .filter(|(k, _)| {
            !deleted
                .iter()
                .any(|d| k == d || k.starts_with(&format!("{d}/")))
        })
        .collect();
    m2.extend(m2_new);
    assert_tree(&m, &m2, "layer 2 before commit");
    end_rw(&dev, m);
    let layer2 = host.path("layer2");
    let layer2_dir = host.path("layer2.dir");
    std::fs::create_dir(&layer2_dir).unwrap();
    host.commit(
        &up2,
        &[
            (&layer2, false),
            (&layer2_dir.join("overlaybd.commit"), true),
        ],
    );

    // 4. Three-deep stacks, read-only: plain, and -z with layer 2 as a {"dir": ...} lower.
    check_ro(&m2, &[&base, &layer1, &layer2], "base + layer1 + layer2");
    check_ro(
        &m2,
        &[&base, &layer1z, &layer2_dir],
        "base + layer1.z + layer2.dir",
    );

    // A fourth layer over the compressed lowers: written, committed, read back.
    let up3 = host.layer("up3", 0);
    let cfg = host.config(
        "rw3",
        &[&base, &layer1z, &layer2_dir],
        Some((&up3.0, &up3.1)),
    );
    let (dev, m) = rw_session(&cfg);
    let top = pseudo_random(40, MIB as usize);
    std::fs::write(m.path("top.bin"), &top).unwrap();
    m2.insert("top.bin".into(), sha256_hex(&top));
    end_rw(&dev, m);
    let layer3 = host.path("layer3");
    host.commit(&up3, &[(&layer3, false)]);
    check_ro(&m2, &[&base, &layer1z, &layer2_dir, &layer3], "four layers");
    host.assert_all_gone();
}

// ---- discard

#[test]
fn fstrim_shrinks_the_committed_layer_and_discarded_ranges_read_zeros() {
    let host = Host::new();
    let base = extract_base(&host);
    let mnt_dir = host.path("mnt");

    // The files both runs write; the odd-numbered half is deleted again.
    let files: Vec<(String, Vec<u8>)> = (0..20u64)
        .map(|i| {
            let len = (3 << 18) + (i as usize * 37_813) % (1 << 20) + i as usize;
            (format!("d{}/f{i}.bin", i % 4), pseudo_random(100 + i, len))
        })
        .collect();
    let (deleted, kept): (Vec<_>, Vec<_>) = files.iter().partition(|(p, _)| {
        let n: u32 = p
            .trim_end_matches(".bin")
            .rsplit('f')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        n % 2 == 1
    });
    let deleted_bytes: u64 = deleted.iter().map(|(_, d)| d.len() as u64).sum();
    let want: BTreeMap<String, String> = kept
        .iter()
        .map(|(p, d)| (p.clone(), sha256_hex(d)))
        .collect();

    // One RW session over the base, committed to NAME.layer; `trim`: fstrim before umount.
    let session = |name: &str, trim: bool| -> PathBuf {
        let up = host.layer(name, 0);
        let cfg = host.config(name, &[&base], Some((&up.0, &up.1)));
        let dev = host.attach1(&cfg);
        let sys = format!(
            "/sys/block/{}/queue/discard_max_bytes",
            dev.trim_start_matches("/dev/")
        );
        let max: u64 = std::fs::read_to_string(&sys)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(max > 0, "{dev} does not advertise discard");
        let m = Mounted::new(&dev, &mnt_dir, false);
        write_tree(&m.dir, &files);
        ok("sync", &[]);
        for (p, _) in &deleted {
            std::fs::remove_file(m.path(p)).unwrap();
        }
        ok("sync", &[]);
        if trim {
            ok("fstrim", &["-v", m.dir.to_str().unwrap()]);
        }
        m.umount();
        e2fsck_clean(&dev);
        host.detach(&dev);
        let layer = host.path(&format!("{name}.layer"));
        host.commit(&up, &[(&layer, false)]);
        layer
    };
    let plain = session("plain", false);
    let trimmed = session("trim", true);
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    let (pi, ti) = (host.inspect(&plain), host.inspect(&trimmed));
    let field = |v: &serde_json::Value, f: &str| v["lsmt"][f].as_u64().unwrap();
    assert!(
        size(&trimmed) < size(&plain),
        "the trimmed layer ({}) is not smaller than the plain one ({})",
        size(&trimmed),
        size(&plain)
    );
    assert!(
        field(&ti, "data_bytes") + deleted_bytes / 2 < field(&pi, "data_bytes"),
        "fstrim saved only {} data bytes of {deleted_bytes} deleted",
        field(&pi, "data_bytes") - field(&ti, "data_bytes")
    );
    assert!(
        field(&ti, "zeroed_entries") > 0,
        "the trimmed layer has no zeroed index entries"
    );

    // base + trimmed layer: the kept files intact, the deleted ones gone, nothing else.
    let cfg = host.config("ro", &[&base, &trimmed], None);
    let dev = host.attach1(&cfg);
    let m = Mounted::new(&dev, &mnt_dir, true);
    assert_tree(&m, &want, "base + trimmed layer");
    m.umount();
    e2fsck_clean(&dev);
    host.detach(&dev);

    // A raw discard: written data reads zeros after blkdiscard, also after a re-attach of the
    // same upper; data next to it survives both.
    let up = host.layer("raw", 1);
    let cfg = host.config("raw", &[], Some((&up.0, &up.1)));
    let dev = host.attach1(&cfg);
    let (at, keep_at) = (512 * MIB, 600 * MIB);
    write_direct(&dev, at, &[0x5a; MIB as usize]);
    write_direct(&dev, keep_at, &[0xa5; MIB as usize]);
    assert!(read_direct(&dev, at, MIB as usize)
        .unwrap()
        .iter()
        .all(|&b| b == 0x5a));
    ok(
        "blkdiscard",
        &["-o", &at.to_string(), "-l", &MIB.to_string(), &dev],
    );
    let zeros = |dev: &str| {
        read_direct(dev, at, MIB as usize)
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    };
    assert!(zeros(&dev), "the discarded range does not read zeros");
    host.detach(&dev);
    let dev = host.attach1(&cfg);
    assert!(
        zeros(&dev),
        "the discarded range does not read zeros after re-attach"
    );
    assert!(
        read_direct(&dev, keep_at, MIB as usize)
            .unwrap()
            .iter()
            .all(|&b| b == 0xa5),
        "data written before the detach is lost"
    );
    host.detach(&dev);
    host.assert_all_gone();
}

// ---- recovery

/// The processes whose command line is `ovbd fuse-holder` with a socket under `dir`.
fn fuse_holders_under(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "fuse-holder")
            && args.iter().any(|a| Path::new(a).starts_with(dir))
        {
            pids.push(pid);
        }
    }
    pids
}

/// Reads a range of a device over and over (O_DIRECT: each read reaches the server), counting
/// rounds and recording every failure or wrong content.
struct BusyReader {
    stop: Arc<std::sync::atomic::AtomicBool>,
    rounds: Arc<std::sync::atomic::AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BusyReader {
    fn start(dev: &str, offset: u64, want: &[u8]) -> BusyReader {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rounds = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, r, f) = (stop.clone(), rounds.clone(), failures.clone());
        let (dev, want_len, want) = (dev.to_string(), want.len(), sha256_hex(want));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match read_direct(&dev, offset, want_len) {
                    Ok(got) if sha256_hex(&got) == want => {}
                    Ok(_) => f.lock().unwrap().push(format!("{dev}: wrong content")),
                    Err(e) => f.lock().unwrap().push(format!("{dev}: {e}")),
                }
                r.fetch_add(1, Ordering::SeqCst);
            }
        });
        BusyReader {
            stop,
            rounds,
            failures,
            thread: Some(thread),
        }
    }

    /// Waits (a hang guard: up to a minute) for `n` more rounds.
    fn wait_rounds(&self, n: u64) {
        use std::sync::atomic::Ordering;
        let start = self.rounds.load(Ordering::SeqCst);
        assert!(
            wait_for(|| self.rounds.load(Ordering::SeqCst) >= start + n),
            "the reader is stuck; failures: {:?}",
            self.failures.lock().unwrap()
        );
    }

    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.failures.lock().unwrap())
    }
}

/// The device server killed with SIGKILL under a reader: the device stays (ublk: user recovery;
/// fuse: its `ovbd fuse-holder` keeps the FUSE connection), the reader waits, and `attach
/// --recover --id N` serves it again in place: the reader goes on with the same data, nothing
/// fails, writes after it persist.
#[test]
fn a_killed_server_is_recovered_in_place_under_a_reader() {
    let host = Host::new();
    let base = extract_base(&host);
    let upper = host.layer("rec", 0);
    let cfg = host.config("rec", &[&base], Some((&upper.0, &upper.1)));
    let dev = host.attach1(&cfg);
    let id = dev
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .to_string();
    let fe = frontend();
    let before = pseudo_random(31, 4 * MIB as usize);
    write_direct(&dev, 64 * MIB, &before);

    // fuse: recovery refuses a device still served, saying so (ublk: the driver refuses it).
    if fe == "fuse" {
        let refused = host.ovbd(&[
            "device",
            "attach",
            "--background",
            "--frontend",
            &fe,
            "--recover",
            "--id",
            &id,
            cfg.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && err.contains("still served by pid"),
            "{err}"
        );
    }

    let reader = BusyReader::start(&dev, 64 * MIB, &before);
    reader.wait_rounds(3);
    let pid = host.list()[0]["pid"].as_u64().unwrap();
    // SAFETY: kill(2) on the server this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(wait_for(|| !Path::new(&format!("/proc/{pid}")).exists()));
    assert_eq!(
        host.list()[0]["state"],
        "orphaned (recoverable)",
        "{:?}",
        host.list()
    );

    let again = host.ovbd_ok(&[
        "device",
        "attach",
        "--background",
        "--frontend",
        &fe,
        "--recover",
        "--id",
        &id,
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(again.trim(), dev, "recovered as another device");
    reader.wait_rounds(3);
    let failures = reader.finish();
    assert!(
        failures.is_empty(),
        "reads failed across the recovery: {failures:?}"
    );
    assert_eq!(host.serving(), 1, "{:?}", host.list());

    // Writes after the recovery land, and both survive a fresh attach of the same layers.
    let after = pseudo_random(32, 2 * MIB as usize);
    write_direct(&dev, 256 * MIB, &after);
    host.detach(&dev);
    let dev = host.attach1(&cfg);
    assert_eq!(
        sha256_hex(&read_direct(&dev, 64 * MIB, before.len()).unwrap()),
        sha256_hex(&before)
    );
    assert_eq!(
        sha256_hex(&read_direct(&dev, 256 * MIB, after.len()).unwrap()),
        sha256_hex(&after)
    );
    host.detach(&dev);
    host.assert_all_gone();
    if fe == "fuse" {
        assert!(
            wait_for(|| fuse_holders_under(host.dir.path()).is_empty()),
            "fuse holders outlived their devices: {:?}",
            fuse_holders_under(host.dir.path())
        );
    }
}

/// fuse: a device whose holder died with its server cannot be recovered: `attach --recover`
/// says so and what to do; `detach` still releases it.
#[test]
fn fuse_recovery_without_a_holder_says_what_to_do() {
    if frontend() != "fuse" {
        return;
    }
    let host = Host::new();
    let cfg = host.config("hello", &[&hello_blob()], None);
    let dev = host.attach1(&cfg);
    let id = dev.trim_start_matches("/dev/loop").to_string();
    let pid = host.list()[0]["pid"].as_u64().unwrap();
    let holders = fuse_holders_under(host.dir.path());
    assert_eq!(holders.len(), 1, "one holder per device: {holders:?}");
    for p in [pid as u32, holders[0]] {
        // SAFETY: kill(2) on processes this test started.
        unsafe { libc::kill(p as i32, libc::SIGKILL) };
        assert!(wait_for(|| !Path::new(&format!("/proc/{p}")).exists()));
    }
    assert_eq!(host.list()[0]["state"], "orphaned", "{:?}", host.list());
    let out = host.ovbd(&[
        "device",
        "attach",
        "--background",
        "--frontend",
        "fuse",
        "--recover",
        "--id",
        &id,
        cfg.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("no fuse holder for /dev/loop{id}"))
            && err.contains(&format!("ovbd device detach {id}")),
        "{err}"
    );
    let out = host.ovbd(&[
        "device",
        "attach",
        "--frontend",
        "fuse",
        "--recover",
        "--id",
        "999999",
        cfg.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no record of /dev/loop999999"), "{err}");
    host.detach(&dev);
    host.assert_all_gone();
}

/// The holder keeping a fuse device's connection sleeps through its I/O. /dev/fuse wakes every
/// process polling it whenever it queues a request: a holder waiting on it there would be woken
/// on every block read, a context switch per I/O that cost the frontend about a fifth of its 4k
/// random-read rate (device bench). 2000 reads here wake it a few times at most (it looks
/// whether the connection is gone every half second).
#[test]
fn the_fuse_holder_is_not_woken_by_block_io() {
    if frontend() != "fuse" {
        return;
    }
    let host = Host::new();
    let cfg = host.config("hello", &[&hello_blob()], None);
    let dev = host.attach1(&cfg);
    let holders = fuse_holders_under(host.dir.path());
    assert_eq!(holders.len(), 1, "one holder per device: {holders:?}");
    let switches = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", holders[0])).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .map(|n| n.trim().parse::<u64>().unwrap())
            .expect("voluntary_ctxt_switches in /proc/PID/status")
    };
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev)
        .unwrap();
    let mut raw = vec![0u8; 2 * 4096];
    let pad = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[pad..pad + 4096];
    let before = switches();
    let reads = 2000;
    for i in 0..reads {
        // O_DIRECT: every read is a FUSE request.
        f.read_exact_at(buf, (i % 256) * 4096).unwrap();
    }
    let woken = switches() - before;
    assert!(
        woken < reads / 20,
        "the holder was woken {woken} times during {reads} reads"
    );
    drop(f);
    host.detach(&dev);
    host.assert_all_gone();
}

// ---- many devices

#[test]
fn twenty_devices_in_one_server() {
    const N_HELLO: usize = 18;
    let host = Host::new();
    let blob = hello_blob();
    let base = extract_base(&host);
    let mut configs: Vec<PathBuf> = (0..N_HELLO)
        .map(|i| host.config(&format!("hello{i}"), &[&blob], None))
        .collect();
    configs.push(host.config("base", &[&base], None));
    let up = host.layer("up", 0);
    configs.push(host.config("rw", &[&base], Some((&up.0, &up.1))));
    let n = configs.len();
    let refs: Vec<&Path> = configs.iter().map(|c| c.as_path()).collect();
    let devs = host.attach(&refs);
    let distinct: std::collections::BTreeSet<_> = devs.iter().collect();
    assert_eq!(
        distinct.len(),
        n,
        "attach printed duplicate devices: {devs:?}"
    );
    for c in &configs {
        let name = c.file_stem().unwrap().to_str().unwrap();
        assert_eq!(host.result(name), "success", "{name}");
    }
    let (hello_devs, base_dev, rw_dev) = (&devs[..N_HELLO], &devs[N_HELLO], &devs[N_HELLO + 1]);

    // All served by one process, listed as serving; only the RW one writable.
    let listed = host.list();
    assert_eq!(listed.len(), n);
    assert_eq!(host.serving(), n);
    let pids: std::collections::BTreeSet<_> = listed.iter().map(|d| d["pid"].as_u64()).collect();
    assert_eq!(
        pids.len(),
        1,
        "devices served by several processes: {pids:?}"
    );
    let server = pids.into_iter().next().flatten().unwrap();
    let cmdline = std::fs::read(format!("/proc/{server}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("device\0attach"),
        "pid {server} is not an ovbd device attach"
    );
    let writable: Vec<_> = listed
        .iter()
        .filter(|d| d["writable"] == true)
        .map(|d| d["block"].clone())
        .collect();
    assert_eq!(writable, vec![serde_json::json!(rw_dev)]);
    assert_eq!(
        host.ovbd_ok(&["device", "list"]).lines().count(),
        n + 1,
        "table: header + {n} rows"
    );

    // debugfs `cat /hello` on every hello device at once.
    let hash_all = |devs: &[String]| {
        let readers: Vec<_> = devs
            .iter()
            .cloned()
            .map(|d| {
                std::thread::spawn(move || {
                    let out = run("debugfs", &["-R", "cat /hello", &d]);
                    (d, out.status.success(), sha256_hex(&out.stdout))
                })
            })
            .collect();
        for r in readers {
            let (d, success, sum) = r.join().unwrap();
            assert!(
                success && sum == HELLO_SHA,
                "/hello via debugfs on {d}: {sum}"
            );
        }
    };
    hash_all(hello_devs);

    // Every device mounted at once; read in parallel, the RW one written too.
    let mounts: Vec<Mounted> = devs
        .iter()
        .enumerate()
        .map(|(i, d)| Mounted::new(d, &host.path(&format!("m{i}")), d != rw_dev))
        .collect();
    let blob8 = Arc::new(pseudo_random(8, 8 << 20));
    let mut jobs: Vec<std::thread::JoinHandle<Result<(), String>>> = mounts[..N_HELLO]
        .iter()
        .map(|m| {
            let p = m.path("hello");
            std::thread::spawn(move || {
                let sum = sha256_hex(&std::fs::read(&p).map_err(|e| e.to_string())?);
                (sum == HELLO_SHA)
                    .then_some(())
                    .ok_or(format!("{}: {sum}", p.display()))
            })
        })
        .collect();
    let (rw_file, b8) = (mounts[N_HELLO + 1].path("blob"), blob8.clone());
    jobs.push(std::thread::spawn(move || {
        let f = std::fs::File::create(&rw_file).map_err(|e| e.to_string())?;
        f.write_all_at(&b8, 0)
            .and_then(|_| f.sync_all())
            .map_err(|e| e.to_string())
    }));
    let base_root = mounts[N_HELLO].dir.clone();
    jobs.push(std::thread::spawn(move || {
        let names: Vec<_> = std::fs::read_dir(&base_root)
            .map_err(|e| e.to_string())?
            .map(|e| e.unwrap().file_name())
            .collect();
        (names == ["lost+found"])
            .then_some(())
            .ok_or(format!("base root holds {names:?}"))
    }));
    for j in jobs {
        j.join().unwrap().unwrap();
    }
    for m in mounts {
        m.umount();
    }

    // Detach half; the rest keep working, the server keeps running.
    let half = N_HELLO / 2;
    for d in &hello_devs[..half] {
        host.detach(d);
    }
    assert!(
        Path::new(&format!("/proc/{server}")).exists(),
        "the server exited after detaching {half} of {n}"
    );
    assert_eq!(host.serving(), n - half);
    hash_all(&hello_devs[half..]);
    let m = Mounted::new(rw_dev, &host.path("m-rw"), true);
    assert!(
        std::fs::read(m.path("blob")).unwrap() == *blob8,
        "the file written to {rw_dev} reads back wrong"
    );
    m.umount();
    e2fsck_clean(rw_dev);
    for d in hello_devs[half..].iter().chain([base_dev, rw_dev]) {
        host.detach(d);
    }
    host.assert_all_gone();
}

// ---- bad input

/// `ovbd device attach` (in the background, then in the foreground) must fail (not hang), say
/// `expect` on stderr, and leave no device.
fn attach_must_fail(host: &Host, what: &str, expect: &[&str], configs: &[&Path]) {
    let fe = frontend();
    for bg in [true, false] {
        let mut args = vec!["device", "attach", "--frontend", &fe];
        if bg {
            args.push("--background");
        }
        args.extend(configs.iter().map(|c| c.to_str().unwrap()));
        let out = host.ovbd(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(
            out.status.code(),
            Some(124),
            "{what}: attach (bg {bg}) hung"
        );
        assert!(!out.status.success(), "{what}: attach (bg {bg}) succeeded");
        assert!(
            expect.iter().any(|e| err.contains(e)),
            "{what}: attach error does not say {expect:?}:\n{err}"
        );
        // In the foreground, devices that came up before the failure were printed (then torn down).
        if bg || configs.len() == 1 {
            assert!(
                out.stdout.is_empty(),
                "{what}: printed {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        assert_eq!(
            host.serving(),
            0,
            "{what}: a device was left: {:?}",
            host.list()
        );
    }
}

#[test]
fn truncated_layers_and_bad_configs_fail_attach_clearly() {
    let host = Host::new();
    let blob = std::fs::read(hello_blob()).unwrap();
    let truncated = host.path("truncated.blob");
    std::fs::write(&truncated, &blob[..blob.len() * 2 / 3]).unwrap();
    let bad = host.config("trunc", &[&truncated], None);
    attach_must_fail(&host, "truncated blob", &["truncated.blob"], &[&bad]);
    let res = host.result("trunc");
    assert!(
        res.starts_with("failed:") && res.contains(truncated.to_str().unwrap()),
        "{res}"
    );

    // After a good config in one attach: the good device is torn down again.
    let good = host.config("good", &[&hello_blob()], None);
    attach_must_fail(
        &host,
        "good + truncated",
        &["truncated.blob"],
        &[&good, &bad],
    );
    assert!(
        host.result("good").starts_with("failed:"),
        "good: {}",
        host.result("good")
    );

    let notjson = host.path("notjson.json");
    std::fs::write(&notjson, "{\"lowers\": [ {\"file\": ").unwrap();
    attach_must_fail(&host, "config not JSON", &["notjson.json"], &[&notjson]);
    attach_must_fail(
        &host,
        "missing config",
        &["no-such-config.json"],
        &[&host.path("no-such-config.json")],
    );

    let missing = host.config("missing", &[&host.path("no-such-layer.blob")], None);
    attach_must_fail(&host, "missing lower", &["no-such-layer.blob"], &[&missing]);
    let res = host.result("missing");
    assert!(
        res.starts_with("failed:") && res.contains("no-such-layer.blob"),
        "{res}"
    );

    let empty = host.config("empty", &[], None);
    attach_must_fail(
        &host,
        "no layers",
        &["neither lowers nor an upper"],
        &[&empty],
    );
    assert!(host.result("empty").starts_with("failed:"));

    let (d, i) = (host.path("no-such.data"), host.path("no-such.index"));
    let noupper = host.config("noupper", &[&hello_blob()], Some((&d, &i)));
    attach_must_fail(
        &host,
        "missing upper",
        &["no-such.data", "no-such.index"],
        &[&noupper],
    );
    assert!(host.result("noupper").starts_with("failed:"));

    // A lower that is not a layer at all (an ext4 image).
    let plain = host.path("plain.img");
    std::fs::File::create(&plain)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    ok("mkfs.ext4", &["-q", "-F", plain.to_str().unwrap()]);
    let notlayer = host.config("notlayer", &[&plain], None);
    attach_must_fail(&host, "lower is not a layer", &["plain.img"], &[&notlayer]);
    host.assert_all_gone();
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// Where /hello's first block lives in the hello blob: (fs block size, fs block, byte offset
/// of the start and the length of the compressed ZFile block holding it), found through
/// ext4 -> LSMT index -> ZFile jump table.
fn locate_hello_block(host: &Host, flat: &str) -> (u64, u64, usize, usize) {
    let blob = hello_blob();
    let dump = ok("dumpe2fs", &["-h", flat]);
    let fs_bs: u64 = dump
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("dumpe2fs: no block size");
    let fs_blk: u64 = ok("debugfs", &["-R", "bmap /hello 0", flat])
        .trim()
        .parse()
        .expect("debugfs bmap /hello");
    assert!(fs_blk > 0);
    let v = fs_blk * fs_bs;
    // LSMT: the index entry mapping V; P = its byte offset inside the raw LSMT file.
    let raw = host.p("raw.lsmt");
    host.ovbd_ok(&["layer", "decompress", blob.to_str().unwrap(), &raw]);
    let lsmt = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    let trailer = lsmt.len() - 4096;
    let (idx_off, idx_n) = (
        u64_at(&lsmt, trailer + 32) as usize,
        u64_at(&lsmt, trailer + 40) as usize,
    );
    let vsec = v / 512;
    let p = (0..idx_n)
        .map(|k| {
            (
                u64_at(&lsmt, idx_off + 16 * k),
                u64_at(&lsmt, idx_off + 16 * k + 8),
            )
        })
        .find_map(|(lo, hi)| {
            let (off, len) = (lo & ((1 << 50) - 1), (lo >> 50) & 0x3fff);
            let (moff, zeroed) = (hi & ((1 << 55) - 1), (hi >> 55) & 1);
            (zeroed == 0 && off <= vsec && vsec < off + len).then_some((moff + vsec - off) * 512)
        })
        .expect("no LSMT index entry maps /hello's first block");
    let mut block = vec![0u8; fs_bs as usize];
    std::fs::File::open(flat)
        .unwrap()
        .read_exact_at(&mut block, v)
        .unwrap();
    assert!(
        lsmt[p as usize..(p + fs_bs) as usize] == block[..],
        "LSMT offset {p} does not hold /hello's first block"
    );
    // ZFile at the PAX payload offset: block P / block_size; its bytes follow the header (512),
    // the dictionary and the blocks before it (jump table entries include the 4-byte CRC).
    let zoff = host.inspect(&blob)["payload_offset"].as_u64().unwrap() as usize;
    let b = std::fs::read(&blob).unwrap();
    let (z_idx, z_n) = (u64_at(&b, zoff + 40) as usize, u64_at(&b, zoff + 48));
    let (z_bs, z_dict) = (u32_at(&b, zoff + 72) as u64, u32_at(&b, zoff + 84) as usize);
    let blk = (p / z_bs) as usize;
    assert!((blk as u64) < z_n, "ZFile block {blk} out of range ({z_n})");
    let lens: Vec<usize> = (0..=blk)
        .map(|k| u32_at(&b, zoff + z_idx + 4 * k) as usize)
        .collect();
    let start = zoff + 512 + z_dict + lens[..blk].iter().sum::<usize>();
    (fs_bs, fs_blk, start, lens[blk])
}

#[test]
fn a_corrupt_block_reads_eio_and_spares_the_rest_and_other_devices() {
    let host = Host::new();
    let flat = host.p("flat.img");
    host.ovbd_ok(&["image", "export", hello_blob().to_str().unwrap(), &flat]);
    let (fs_bs, fs_blk, start, len) = locate_hello_block(&host, &flat);
    let mut corrupt = std::fs::read(hello_blob()).unwrap();
    for b in &mut corrupt[start + len / 2..start + len / 2 + 4] {
        *b ^= 0xff;
    }
    let corrupt_blob = host.path("corrupt.blob");
    std::fs::write(&corrupt_blob, &corrupt).unwrap();
    let inspect = host.ovbd(&["layer", "inspect", corrupt_blob.to_str().unwrap()]);
    assert!(
        !inspect.status.success(),
        "layer inspect (which checks every block CRC) accepts the corrupted copy"
    );

    // Headers and indexes are intact: attach succeeds.
    let healthy = host.config("healthy", &[&hello_blob()], None);
    let bad_cfg = host.config("corrupt", &[&corrupt_blob], None);
    let devs = host.attach(&[&healthy, &bad_cfg]);
    let (good, bad) = (devs[0].clone(), devs[1].clone());
    assert_eq!(host.result("corrupt"), "success");
    let flat_f = std::fs::File::open(&flat).unwrap();
    let mut want = vec![0u8; fs_bs as usize];
    flat_f.read_exact_at(&mut want, fs_blk * fs_bs).unwrap();

    // Read the damaged block directly while the healthy device is read in a loop.
    let (g, w) = (good.clone(), want.clone());
    let reader = std::thread::spawn(move || {
        (0..20).all(|_| read_direct(&g, fs_blk * fs_bs, fs_bs as usize).is_ok_and(|b| b == w))
    });
    let err = read_direct(&bad, fs_blk * fs_bs, fs_bs as usize)
        .expect_err("reading the corrupted block succeeded");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EIO),
        "reading the corrupted block: {err}"
    );
    assert!(
        reader.join().unwrap(),
        "the healthy {good} read wrong or failed while {bad} returned EIO"
    );

    // The rest of the corrupted device reads right; a buffered read of /hello through a mount
    // fails with EIO; the healthy device still serves.
    let mut head = vec![0u8; 4 * MIB as usize];
    flat_f.read_exact_at(&mut head, 0).unwrap();
    assert!(
        read_direct(&bad, 0, head.len()).unwrap() == head,
        "the first 4 MiB of {bad} read wrong"
    );
    let m = Mounted::new(&bad, &host.path("mnt"), true);
    let err =
        std::fs::read(m.path("hello")).expect_err("cat /hello on the corrupted device succeeded");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "cat /hello: {err}");
    m.umount();
    let out = run("debugfs", &["-R", "cat /hello", &good]);
    assert_eq!(
        sha256_hex(&out.stdout),
        HELLO_SHA,
        "/hello on the healthy {good} after the errors"
    );
    assert_eq!(host.serving(), 2);
    host.detach(&bad);
    host.detach(&good);
    host.assert_all_gone();
}

// ---- a stuck source stalls nobody else

/// A FUSE filesystem with one file, `layer`: a real file's bytes, except that while the gate is
/// shut, reads at or past `stall_from` wait for it to open (a source that stopped answering).
struct GatedFs {
    file: std::fs::File,
    size: u64,
    stall_from: u64,
    gate: Arc<Gate>,
}

#[derive(Default)]
struct Gate {
    shut: std::sync::Mutex<bool>,
    changed: std::sync::Condvar,
    waiting: std::sync::atomic::AtomicUsize,
}

impl Gate {
    fn set(&self, shut: bool) {
        *self.shut.lock().unwrap() = shut;
        self.changed.notify_all();
    }

    fn pass(&self) {
        let mut shut = self.shut.lock().unwrap();
        if *shut {
            self.waiting
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            while *shut {
                shut = self.changed.wait(shut).unwrap();
            }
            self.waiting
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl GatedFs {
    fn attr(&self, ino: u64) -> fuser::FileAttr {
        let t = std::time::SystemTime::UNIX_EPOCH;
        let (kind, size, perm) = if ino == 1 {
            (fuser::FileType::Directory, 0, 0o755)
        } else {
            (fuser::FileType::RegularFile, self.size, 0o444)
        };
        fuser::FileAttr {
            ino: fuser::INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl fuser::Filesystem for GatedFs {
    fn lookup(
        &self,
        _r: &fuser::Request,
        parent: fuser::INodeNo,
        name: &std::ffi::OsStr,
        reply: fuser::ReplyEntry,
    ) {
        if parent == fuser::INodeNo::ROOT && name == "layer" {
            reply.entry(
                &Duration::from_secs(3600),
                &self.attr(2),
                fuser::Generation(0),
            );
        } else {
            reply.error(fuser::Errno::ENOENT);
        }
    }

    fn getattr(
        &self,
        _r: &fuser::Request,
        ino: fuser::INodeNo,
        _fh: Option<fuser::FileHandle>,
        reply: fuser::ReplyAttr,
    ) {
        match ino.0 {
            1 | 2 => reply.attr(&Duration::from_secs(3600), &self.attr(ino.0)),
            _ => reply.error(fuser::Errno::ENOENT),
        }
    }

    fn open(
        &self,
        _r: &fuser::Request,
        _ino: fuser::INodeNo,
        _flags: fuser::OpenFlags,
        reply: fuser::ReplyOpen,
    ) {
        // Direct I/O: every read reaches us (no page cache hides the stuck source).
        reply.opened(fuser::FileHandle(0), fuser::FopenFlags::FOPEN_DIRECT_IO);
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _r: &fuser::Request,
        _ino: fuser::INodeNo,
        _fh: fuser::FileHandle,
        offset: u64,
        size: u32,
        _flags: fuser::OpenFlags,
        _lock: Option<fuser::LockOwner>,
        reply: fuser::ReplyData,
    ) {
        let file = self.file.try_clone().unwrap();
        let len = (size as u64).min(self.size.saturating_sub(offset)) as usize;
        let serve = move || {
            let mut buf = vec![0u8; len];
            match file.read_exact_at(&mut buf, offset) {
                Ok(()) => reply.data(&buf),
                Err(_) => reply.error(fuser::Errno::EIO),
            }
        };
        if offset + len as u64 > self.stall_from {
            // Wait off the session threads, so reads of the rest still get answers.
            let gate = self.gate.clone();
            std::thread::spawn(move || {
                gate.pass();
                serve();
            });
        } else {
            serve();
        }
    }
}

/// The gated filesystem mounted on `dir` (mount(2) on our own /dev/fuse fd, as ovbd does);
/// unmounted on drop.
struct GatedMount {
    dir: PathBuf,
    gate: Arc<Gate>,
}

impl GatedMount {
    fn new(dir: &Path, fs: GatedFs) -> GatedMount {
        let gate = fs.gate.clone();
        use std::os::fd::{AsRawFd, OwnedFd};
        std::fs::create_dir_all(dir).unwrap();
        let fuse: OwnedFd = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .unwrap()
            .into();
        let opts = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0",
            fuse.as_raw_fd()
        );
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let (target, opts) = (c(dir.to_str().unwrap()), c(&opts));
        // SAFETY: mount(2) with valid C strings.
        let r = unsafe {
            libc::mount(
                c"gated".as_ptr(),
                target.as_ptr(),
                c"fuse.gated".as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(
            r,
            0,
            "mounting the gated FUSE fs: {}",
            std::io::Error::last_os_error()
        );
        let mut config = fuser::Config::default();
        config.n_threads = Some(2);
        let session = fuser::Session::from_fd(fs, fuse, fuser::SessionACL::Owner, config).unwrap();
        // The session ends when the connection does: after the unmount, once the last file
        // on it is closed (a failed test may leave the device server holding one).
        std::thread::spawn(move || session.run());
        GatedMount {
            dir: dir.to_path_buf(),
            gate,
        }
    }
}

impl Drop for GatedMount {
    fn drop(&mut self) {
        // Whatever still waits on the source gets its answer, so the device can be detached.
        self.gate.set(false);
        let _ = run("umount", &["-l", self.dir.to_str().unwrap()]);
    }
}

#[test]
fn a_stuck_source_stalls_no_other_device_nor_its_other_ranges() {
    let host = Host::new();
    // A dense 64 MiB layer: written through a device, then committed (uncompressed).
    let up = host.layer("w", 1);
    let cfg = host.config("w", &[], Some((&up.0, &up.1)));
    let w = host.attach1(&cfg);
    let data = pseudo_random(70, 64 * MIB as usize);
    write_direct(&w, 0, &data);
    host.detach(&w);
    let dense = host.path("dense.commit");
    host.commit(&up, &[(&dense, false)]);

    // Device A reads its copy through the gated filesystem; B reads the plain file. Both in one
    // server. Layer bytes past 16 MiB (A's data from about 16 MiB on, and the index, read at
    // attach) stall while the gate is shut.
    let gate = Arc::new(Gate::default());
    let fs = GatedFs {
        file: std::fs::File::open(&dense).unwrap(),
        size: std::fs::metadata(&dense).unwrap().len(),
        stall_from: 16 * MIB,
        gate: gate.clone(),
    };
    let gated = GatedMount::new(&host.path("gated"), fs);
    let a_cfg = host.config("a", &[&gated.dir.join("layer")], None);
    let b_cfg = host.config("b", &[&dense], None);
    let devs = host.attach(&[&a_cfg, &b_cfg]);
    let (a, b) = (devs[0].clone(), devs[1].clone());
    assert!(read_direct(&a, 0, MIB as usize).unwrap() == data[..MIB as usize]);
    gate.set(true);

    // Stall A: a read far into the disk needs the stuck source.
    let a2 = a.clone();
    let stalled = std::thread::spawn(move || read_direct(&a2, 32 * MIB, 24 * MIB as usize));
    assert!(
        wait_for(|| gate.waiting.load(std::sync::atomic::Ordering::SeqCst) > 0),
        "A's read of its cold range never reached the source"
    );

    // B reads 16 MiB while A's reader waits on its source; A still serves its early range.
    assert!(read_direct(&b, 0, 16 * MIB as usize).unwrap() == data[..16 * MIB as usize]);
    assert!(
        !stalled.is_finished(),
        "A's stalled read finished before B's: the test proves nothing"
    );
    assert!(
        read_direct(&a, 0, MIB as usize).unwrap() == data[..MIB as usize],
        "A's early range read wrong"
    );
    assert!(
        !stalled.is_finished(),
        "A's stalled read finished before A's re-read: void"
    );

    // The source recovers: the stalled read completes with the right data.
    gate.set(false);
    let got = stalled.join().unwrap().expect("A's stalled read failed");
    assert!(
        got == data[32 * MIB as usize..56 * MIB as usize],
        "A's stalled read returned wrong data"
    );
    assert!(
        read_direct(&a, 0, 64 * MIB as usize).unwrap() == data,
        "A reads wrong after recovery"
    );
    host.detach(&a);
    host.detach(&b);
    host.assert_all_gone();
    drop(gated);
}

/// Layer files on a loop-mounted filesystem (a disk image, as device-bench.sh keeps its files in)
/// open in the device server: its private mount namespace detaches the mounts of its own
/// devices, not every loop device's.
#[test]
fn layers_on_a_loop_mounted_filesystem_attach() {
    let host = Host::new();
    let img = host.path("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    ok("mkfs.ext4", &["-q", img.to_str().unwrap()]);
    let store = Mounted::new(img.to_str().unwrap(), &host.path("store"), false);
    let blob = store.path("hello.blob");
    std::fs::copy(hello_blob(), &blob).unwrap();
    let cfg = host.config("hello", &[&blob], None);
    let dev = host.attach1(&cfg);
    assert_eq!(host.result("hello"), "success");
    let mnt = Mounted::new(&dev, &host.path("mnt"), true);
    let hello = std::fs::read(mnt.path("hello")).unwrap();
    assert_eq!(sha256_hex(&hello), HELLO_SHA);
    mnt.umount();
    host.detach(&dev);
    store.umount();
}
