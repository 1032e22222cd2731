//! `ovbd device attach --frontend fuse` on this host: loop devices over files on the server's
//! FUSE mount. Needs root, /dev/fuse and /dev/loop-control; without them these tests fail
//! (saying so) rather than pass unchecked. The helpers (`Host`, `attach`, `detach`) take the
//! frontend as an argument so the same checks can run against another one.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const HELLO_BLOB: &str =
    "hello-world-oci/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d";
const FRONTEND: &str = "fuse";

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// Fails the test unless this host can run loop devices over FUSE.
fn require_host() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let missing: Vec<&str> = ["/dev/fuse", "/dev/loop-control"]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    assert!(
        root && missing.is_empty(),
        "the fuse device tests need root (have: {root}), /dev/fuse and /dev/loop-control (missing: {missing:?})"
    );
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

    fn ovbd(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ovbd"))
            .args(args)
            .env("OVBD_RUN_DIR", self.path("run"))
            .output()
            .unwrap()
    }

    /// Writes a config.v1.json with `lowers` and an optional upper (data, index).
    fn config(&self, name: &str, lowers: &[&Path], upper: Option<(&Path, &Path)>) -> PathBuf {
        let mut cfg = serde_json::json!({
            "lowers": lowers.iter().map(|l| serde_json::json!({"file": l})).collect::<Vec<_>>(),
            "resultFile": self.path(&format!("{name}.result")),
        });
        if let Some((data, index)) = upper {
            cfg["upper"] = serde_json::json!({"data": data, "index": index});
        }
        let p = self.path(&format!("{name}.json"));
        std::fs::write(&p, serde_json::to_vec(&cfg).unwrap()).unwrap();
        p
    }

    /// Attaches `configs` in one background server; returns the devices it printed.
    fn attach(&self, frontend: &str, configs: &[&Path]) -> Vec<String> {
        let mut args = vec!["device", "attach", "--background", "--frontend", frontend];
        args.extend(configs.iter().map(|c| c.to_str().unwrap()));
        let out = self.ovbd(&args);
        assert!(
            out.status.success(),
            "attach failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn detach(&self, dev: &str) {
        let out = self.ovbd(&["device", "detach", dev]);
        assert!(
            out.status.success(),
            "detach {dev}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn list(&self) -> Vec<serde_json::Value> {
        let out = self.ovbd(&["device", "list", "--json"]);
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// A fresh writable layer (upper data, index) of `vsize_gb` GiB (0: the lowers').
    fn layer(&self, name: &str, vsize_gb: u32) -> (PathBuf, PathBuf) {
        let (d, i) = (
            self.path(&format!("{name}.data")),
            self.path(&format!("{name}.index")),
        );
        let gb = vsize_gb.to_string();
        let out = self.ovbd(&[
            "layer",
            "create",
            d.to_str().unwrap(),
            i.to_str().unwrap(),
            "--vsize-gb",
            &gb,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (d, i)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
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

/// Polls `ok` for up to a minute (a hang guard, not a timing check).
fn wait_for(mut ok: impl FnMut() -> bool) -> bool {
    for _ in 0..600 {
        if ok() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

fn read_at(dev: &str, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(dev)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

#[test]
fn read_only_vector_reads_as_exported_and_refuses_writes() {
    let host = Host::new();
    let blob = fixture(HELLO_BLOB);
    let cfg = host.config("hello", &[&blob], None);
    let devs = host.attach(FRONTEND, &[&cfg]);
    assert_eq!(devs.len(), 1);
    let dev = &devs[0];
    assert!(dev.starts_with("/dev/loop"), "{dev}");
    assert_eq!(
        std::fs::read_to_string(host.path("hello.result")).unwrap(),
        "success"
    );
    let listed = host.list();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["frontend"], FRONTEND);
    assert_eq!(listed[0]["state"], "serving");
    assert_eq!(listed[0]["writable"], false);

    // The device's bytes are the flattened image's (first 64 MiB: superblock, tables, /hello).
    let flat = host.path("flat.img");
    let out = host.ovbd(&[
        "image",
        "export",
        blob.to_str().unwrap(),
        flat.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = read_at(flat.to_str().unwrap(), 0, 64 << 20).unwrap();
    assert!(
        read_at(dev, 0, 64 << 20).unwrap() == want,
        "device bytes differ from the export"
    );
    // e2fsck: upstream's own known /lost+found complaint (exit 4), nothing else.
    let fsck = run("fsck.ext4", &["-fn", dev]);
    let text = String::from_utf8_lossy(&fsck.stdout);
    assert_eq!(fsck.status.code(), Some(4), "{text}");
    assert!(
        text.contains("Problem in HTREE directory inode 11"),
        "{text}"
    );
    assert_eq!(text.matches("Problem in").count(), 1, "{text}");

    // Read-only: a direct write fails.
    assert_eq!(run("blockdev", &["--getro", dev]).stdout, b"1\n");
    let of = format!("of={dev}");
    let dd = run(
        "dd",
        &["if=/dev/zero", &of, "bs=4096", "count=1", "oflag=direct"],
    );
    assert!(!dd.status.success(), "a write to read-only {dev} succeeded");
    host.detach(dev);
    assert!(wait_for(|| host
        .list()
        .iter()
        .all(|d| d["state"] == "gone")
        || host.list().is_empty()));
}

#[test]
fn writable_layer_survives_detach_and_discard_reads_zeros() {
    let host = Host::new();
    let (data, index) = host.layer("up", 1);
    let cfg = host.config("rw", &[], Some((&data, &index)));
    let dev = host.attach(FRONTEND, &[&cfg]).remove(0);
    assert_eq!(run("blockdev", &["--getro", &dev]).stdout, b"0\n");
    let mkfs = run("mkfs.ext4", &["-q", "-F", &dev]);
    assert!(
        mkfs.status.success(),
        "{}",
        String::from_utf8_lossy(&mkfs.stderr)
    );
    let mnt = host.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let payload: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    assert!(run("mount", &[&dev, mnt.to_str().unwrap()])
        .status
        .success());
    std::fs::write(mnt.join("payload"), &payload).unwrap();
    assert!(run("sync", &[]).status.success());
    assert!(run("umount", &[mnt.to_str().unwrap()]).status.success());
    host.detach(&dev);

    let dev = host.attach(FRONTEND, &[&cfg]).remove(0);
    let fsck = run("fsck.ext4", &["-fn", &dev]);
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    assert!(run("mount", &["-o", "ro", &dev, mnt.to_str().unwrap()])
        .status
        .success());
    let back = std::fs::read(mnt.join("payload"));
    assert!(run("umount", &[mnt.to_str().unwrap()]).status.success());
    assert!(back.unwrap() == payload, "payload differs after re-attach");

    // Discard: write a pattern, blkdiscard it, read zeros (through FALLOC_FL_PUNCH_HOLE).
    let at = 512u64 << 20;
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&[0x5a; 1 << 20]).unwrap();
        f.sync_all().unwrap();
    }
    assert!(read_at(&dev, at, 1 << 20)
        .unwrap()
        .iter()
        .all(|&b| b == 0x5a));
    let off = at.to_string();
    let out = run("blkdiscard", &["-o", &off, "-l", "1048576", &dev]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        read_at(&dev, at, 1 << 20).unwrap().iter().all(|&b| b == 0),
        "discarded range does not read zeros"
    );
    host.detach(&dev);
}

#[test]
fn twenty_devices_in_one_server() {
    let host = Host::new();
    let blob = fixture(HELLO_BLOB);
    let configs: Vec<PathBuf> = (0..20)
        .map(|i| host.config(&format!("h{i}"), &[&blob], None))
        .collect();
    let refs: Vec<&Path> = configs.iter().map(|c| c.as_path()).collect();
    let devs = host.attach(FRONTEND, &refs);
    assert_eq!(devs.len(), 20);
    let first = read_at(&devs[0], 0, 4 << 20).unwrap();
    let readers: Vec<_> = devs
        .iter()
        .cloned()
        .map(|d| std::thread::spawn(move || read_at(&d, 0, 4 << 20).unwrap()))
        .collect();
    for r in readers {
        assert!(r.join().unwrap() == first);
    }
    let listed = host.list();
    assert_eq!(
        listed.iter().filter(|d| d["state"] == "serving").count(),
        20
    );
    let pids: std::collections::BTreeSet<_> = listed.iter().map(|d| d["pid"].as_u64()).collect();
    assert_eq!(pids.len(), 1, "one server");
    // Half detached: the other half still reads.
    for d in &devs[..10] {
        host.detach(d);
    }
    for d in &devs[10..] {
        assert!(read_at(d, 0, 4 << 20).unwrap() == first);
    }
}

#[test]
fn a_truncated_layer_fails_attach_naming_it() {
    let host = Host::new();
    let blob = std::fs::read(fixture(HELLO_BLOB)).unwrap();
    let truncated = host.path("truncated.blob");
    std::fs::write(&truncated, &blob[..blob.len() / 2]).unwrap();
    let good = host.config("good", &[&fixture(HELLO_BLOB)], None);
    let bad = host.config("bad", &[&truncated], None);
    for args in [vec!["--background"], vec![]] {
        let mut a = vec!["device", "attach", "--frontend", FRONTEND];
        a.extend(args);
        a.extend([good.to_str().unwrap(), bad.to_str().unwrap()]);
        let out = host.ovbd(&a);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("truncated.blob"), "{err}");
        let result = std::fs::read_to_string(host.path("bad.result")).unwrap();
        assert!(
            result.starts_with("failed:") && result.contains("truncated.blob"),
            "{result}"
        );
        assert!(
            host.list().is_empty(),
            "a device was left: {:?}",
            host.list()
        );
    }
}
