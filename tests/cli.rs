//! The `ovbd` command line on the upstream vectors.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const HELLO_BLOB: &str =
    "hello-world-oci/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d";

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn ovbd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ovbd"))
        .args(args)
        .output()
        .expect("run ovbd")
}

fn ok(args: &[&str]) -> String {
    let o = ovbd(args);
    assert!(
        o.status.success(),
        "ovbd {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn sha256_file(p: &Path) -> String {
    Sha256::digest(std::fs::read(p).unwrap())
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs e2fsck read-only; returns its exit code and the lines that are not routine progress.
fn e2fsck_findings(img: &Path) -> (i32, Vec<String>) {
    let o = Command::new("e2fsck")
        .args(["-fn", s(img)])
        .output()
        .expect("e2fsck (e2fsprogs) must be installed");
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    let routine = |l: &str| {
        l.trim().is_empty()
            || l.starts_with("e2fsck ")
            || l.starts_with("Pass ")
            || l.contains(" files (")
            || l.contains("WARNING: Filesystem still has errors")
    };
    let findings = text
        .lines()
        .filter(|l| !routine(l))
        .map(str::to_string)
        .collect();
    (o.status.code().unwrap_or(-1), findings)
}

#[test]
fn hello_world_decompress_compress_is_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let lsmt = dir.path().join("hello.lsmt");
    let blob = dir.path().join("hello.blob");
    ok(&["layer", "decompress", s(&fixture(HELLO_BLOB)), s(&lsmt)]);
    assert_eq!(
        sha256_file(&lsmt),
        "39195424aa10572fe002262190877b4306a66be9c62c8f1594141b01dc79c2ea"
    );
    ok(&["layer", "compress", s(&lsmt), s(&blob)]);
    assert_eq!(
        sha256_file(&blob),
        "022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
    );
    // Other codecs and block sizes round-trip through decompress.
    for (algo, bs, tar) in [("zstd", "65536", true), ("lz4", "16384", false)] {
        let out = dir.path().join(format!("{algo}-{bs}"));
        let back = dir.path().join(format!("{algo}-{bs}.lsmt"));
        let mut args = vec![
            "layer",
            "compress",
            s(&lsmt),
            s(&out),
            "--algo",
            algo,
            "--block-size",
            bs,
        ];
        if !tar {
            args.push("--no-tar");
        }
        ok(&args);
        let info: serde_json::Value =
            serde_json::from_str(&ok(&["layer", "inspect", "--json", s(&out)])).unwrap();
        assert_eq!(info["zfile"]["algorithm"], algo);
        assert_eq!(info["wrapper"], if tar { "pax" } else { "none" });
        ok(&["layer", "decompress", s(&out), s(&back)]);
        assert_eq!(sha256_file(&back), sha256_file(&lsmt));
    }
}

#[test]
fn hello_world_inspect_reports_the_layer() {
    let v: serde_json::Value = serde_json::from_str(&ok(&[
        "layer",
        "inspect",
        "--json",
        s(&fixture(HELLO_BLOB)),
    ]))
    .unwrap();
    assert_eq!(v["wrapper"], "pax");
    assert_eq!(v["zfile"]["blocks"], 17463);
    assert_eq!(v["zfile"]["blocks_crc_checked"], 17463);
    assert_eq!(v["lsmt"]["uuid"], "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31");
    assert_eq!(v["lsmt"]["index_entries"], 768);
    assert_eq!(v["lsmt"]["valid_entries"], 515);
    assert_eq!(v["lsmt"]["padding_entries"], 253);
    assert_eq!(v["lsmt"]["virtual_size"], 68719476736u64);
}

#[test]
fn hello_world_export_has_hello_and_only_upstreams_fsck_complaint() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    ok(&["image", "export", s(&fixture(HELLO_BLOB)), s(&img)]);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 64 << 30);
    let out = Command::new("debugfs")
        .args(["-R", "cat /hello", s(&img)])
        .output()
        .expect("debugfs");
    let sum: String = Sha256::digest(&out.stdout)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect();
    assert_eq!(
        sum,
        "d3f7d10e296e5c626ea78539cb38cd8dffd043bea3627da35ce3b20c0ac68014"
    );
    let (code, findings) = e2fsck_findings(&img);
    // The image as upstream made it has exactly this one problem (vectors README).
    assert_eq!(code, 4, "{findings:?}");
    assert_eq!(
        findings,
        vec![
            "Problem in HTREE directory inode 11: block #2 not referenced",
            "Invalid HTREE directory inode 11 (/lost+found).  Clear HTree index? no",
        ],
    );
}

#[test]
fn ext4_64_exports_fsck_clean() {
    let dir = tempfile::tempdir().unwrap();
    let st = Command::new("tar")
        .args(["xzf", s(&fixture("ext4_64.tar.gz")), "-C", s(dir.path())])
        .status()
        .unwrap();
    assert!(st.success());
    let base = dir.path().join("ext4_64");
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["layer", "inspect", "--json", s(&base)])).unwrap();
    assert_eq!(v["wrapper"], "none");
    assert_eq!(v["lsmt"]["index_entries"], 8448);
    assert_eq!(v["lsmt"]["valid_entries"], 8323);
    assert_eq!(v["lsmt"]["zeroed_entries"], 8209);
    let img = dir.path().join("base.img");
    ok(&["image", "export", s(&base), s(&img)]);
    let (code, findings) = e2fsck_findings(&img);
    assert_eq!((code, findings), (0, vec![]));
}

#[test]
fn writable_layer_commit_via_cli() {
    let dir = tempfile::tempdir().unwrap();
    let (data, index) = (
        dir.path().join("writable_data"),
        dir.path().join("writable_index"),
    );
    ok(&["layer", "create", s(&data), s(&index), "--vsize-gb", "1"]);
    // Fill the layer through the library the way a device would, then commit via the CLI.
    {
        let rw = ovbd_format::RwLayer::open(&data, &index).unwrap();
        rw.write(&vec![0xabu8; 1 << 20], 4096).unwrap();
        rw.discard(8192, 4096).unwrap();
        rw.flush().unwrap();
    }
    let out = dir.path().join("layer.commit");
    ok(&[
        "layer",
        "commit",
        s(&data),
        s(&index),
        s(&out),
        "--uuid",
        "01bb4fce-3eb1-b56b-05ad-f99504dafd31",
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["layer", "inspect", "--json", s(&out)])).unwrap();
    assert_eq!(v["lsmt"]["uuid"], "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31");
    assert_eq!(v["lsmt"]["zeroed_entries"], 1);
    assert_eq!(v["lsmt"]["data_bytes"], (1 << 20) - 4096);
    assert_eq!(v["lsmt"]["index_entries"], 256);
    let blob = dir.path().join("layer.blob");
    ok(&["layer", "commit", "-z", s(&data), s(&index), s(&blob)]);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["layer", "inspect", "--json", s(&blob)])).unwrap();
    assert_eq!(v["wrapper"], "pax");
    assert_eq!(v["lsmt"]["data_bytes"], (1 << 20) - 4096);
    ok(&["layer", "seal", s(&data), s(&index)]);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["layer", "inspect", "--json", s(&data)])).unwrap();
    assert_eq!(v["lsmt"]["header_flags"], 3);
    assert_eq!(v["lsmt"]["trailer_flags"], 6);
}

#[test]
fn bad_input_fails_with_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let blob = std::fs::read(fixture(HELLO_BLOB)).unwrap();
    let cut = dir.path().join("truncated.blob");
    std::fs::write(&cut, &blob[..300_000]).unwrap();
    let o = ovbd(&["layer", "inspect", s(&cut)]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("truncated.blob") && err.contains("offset"),
        "{err}"
    );
    let out = dir.path().join("never");
    let o = ovbd(&["layer", "decompress", s(&cut), s(&out)]);
    assert!(!o.status.success());
    assert!(
        !out.exists(),
        "a failed command must not leave output behind"
    );
}

/// A virtual size that does not fit in bytes is refused as a usage error naming the option,
/// not wrapped around (`GiB << 30` of 2^34 GiB is 0).
#[test]
fn vsize_options_are_bounded() {
    let d = tempfile::tempdir().unwrap();
    let src = format!("oci:{}:x", d.path().join("src").display());
    let dst = format!("oci:{}:y", d.path().join("dst").display());
    let (data, index) = (d.path().join("data"), d.path().join("index"));
    for args in [
        vec!["convert", "--vsize", "17179869184", &src, &dst],
        vec!["convert", "--vsize", "0", &src, &dst],
        vec![
            "layer",
            "create",
            s(&data),
            s(&index),
            "--vsize-gb",
            "17179869184",
        ],
    ] {
        let o = ovbd(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("--vsize"), "{args:?}: {err}");
    }
    assert!(!data.exists() && !index.exists());
}

/// `convert --config FILE` reaches registries as `ovbd serve` does: the file's `[registry]`
/// mirrors are tried (here a dead one, named in the error), its values are checked, and a file
/// that is not there is an error naming it.
#[test]
fn convert_takes_the_registry_section_of_config() {
    let d = tempfile::tempdir().unwrap();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let config = d.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[registry]\nretries = 0\ntimeout_secs = 5.0\nconnect_timeout_secs = 1.0\n\
             [[registry.mirrors]]\nhost = \"registry.invalid\"\nmirrors = [\"http://{dead}\"]\n"
        ),
    )
    .unwrap();
    let dst = format!("oci:{}:obd", d.path().join("out").display());
    let o = ovbd(&[
        "convert",
        "--config",
        s(&config),
        "registry.invalid/hello-world:v1",
        &dst,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("mirror http://{dead}")) && err.contains("hello-world:v1"),
        "{err}"
    );

    std::fs::write(&config, "[registry]\ntimeout_secs = -1.0\n").unwrap();
    let o = ovbd(&[
        "convert",
        "--config",
        s(&config),
        "registry.invalid/x:v1",
        &dst,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("[registry] timeout_secs"), "{err}");

    let missing = d.path().join("missing.toml");
    let o = ovbd(&["rpull", "--config", s(&missing), "registry.invalid/x:v1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(s(&missing)), "{err}");
    assert!(!d.path().join("out").exists());
}

/// A `docker-registry` on a free loopback port that wants `ovbd:ovbd-test-pass` (htpasswd,
/// Basic); killed on drop.
struct AuthRegistry {
    child: std::process::Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_auth_registry() -> AuthRegistry {
    // bcrypt of "ovbd-test-pass" (cost 4).
    const HASH: &str = "$2b$04$mZwH7wGeEVlhyQEKuXlAQu/wM/RzhODQOto7p4KjrEKXtv6/P1hL.";
    let dir = tempfile::tempdir().unwrap();
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("ovbd:{HASH}\n")).unwrap();
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\n\
             auth:\n  htpasswd:\n    realm: ovbd-test\n    path: {}\n",
            dir.path().join("storage").display(),
            htpasswd.display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("docker-registry (scripts/setup.sh installs it)");
    let reg = AuthRegistry {
        child,
        addr,
        _dir: dir,
    };
    for _ in 0..600 {
        if std::net::TcpStream::connect(&reg.addr).is_ok() {
            return reg;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("docker-registry did not listen on {}", reg.addr);
}

/// `convert` (its push) and `rpull` (its registry part, before it talks to containerd: the
/// manifest and config pulls `convert` makes too) take their credentials from the docker
/// config's credential helper, found on `PATH`, as docker does; without it the same registry
/// refuses them.
#[test]
fn convert_and_rpull_use_credential_helpers() {
    let reg = start_auth_registry();
    let d = tempfile::tempdir().unwrap();
    let bin = d.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let asked = d.path().join("asked");
    let helper = bin.join("docker-credential-ovbdtest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread -r url\necho \"$url\" >> {}\n\
             printf '{{\"ServerURL\":\"%s\",\"Username\":\"ovbd\",\"Secret\":\"ovbd-test-pass\"}}' \"$url\"\n",
            asked.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let docker = d.path().join("docker");
    std::fs::create_dir(&docker).unwrap();
    std::fs::write(
        docker.join("config.json"),
        format!(r#"{{"credHelpers": {{"{}": "ovbdtest"}}}}"#, reg.addr),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = |docker_config: &Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ovbd"))
            .args(args)
            .env("PATH", &path)
            .env("DOCKER_CONFIG", docker_config)
            .env_remove("HOME")
            .output()
            .expect("run ovbd")
    };
    let src = format!("oci:{}:amd64", s(&fixture("hello-world-oci")));
    let dst = format!("{}/private/hello:obd", reg.addr);

    // No credentials: refused.
    let o = run(&d.path().join("none"), &["convert", &src, &dst]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("401") || err.contains("Basic"), "{err}");
    assert!(!asked.exists());

    // Through the helper: pushed.
    let o = run(&docker, &["convert", &src, &dst]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let asked_for = std::fs::read_to_string(&asked).unwrap();
    assert!(
        asked_for.lines().all(|l| l.contains(reg.addr.as_str())) && !asked_for.is_empty(),
        "{asked_for}"
    );

    // rpull resolves the converted image through the helper, then finds no containerd.
    std::fs::remove_file(&asked).unwrap();
    let sock = d.path().join("no-containerd.sock");
    let o = run(&docker, &["rpull", "--address", s(&sock), &dst]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("connecting to containerd"), "{err}");
    assert!(std::fs::read_to_string(&asked).is_ok_and(|a| a.contains(reg.addr.as_str())));
    let o = run(
        &d.path().join("none"),
        &["rpull", "--address", s(&sock), &dst],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("connecting to containerd"), "{err}");
}
