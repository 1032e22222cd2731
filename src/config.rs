//! The daemon's configuration (`/etc/ovbd/config.toml`).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG: &str = "/etc/ovbd/config.toml";

/// How a container's rootfs is made on OverlayBD layers (spec §4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RootfsMode {
    /// The image's device read-only, ext4 mounted ro, overlayfs on top (default).
    #[default]
    Overlayfs,
    /// A writable block layer on the image, ext4 mounted rw, bind-mounted.
    Dir,
    /// As dir, but the block device is handed out unmounted (for VMs).
    Dev,
}

impl RootfsMode {
    pub fn parse(s: &str) -> Result<RootfsMode> {
        match s {
            "overlayfs" => Ok(RootfsMode::Overlayfs),
            "dir" => Ok(RootfsMode::Dir),
            "dev" => Ok(RootfsMode::Dev),
            _ => bail!("unknown rootfs mode {s:?} (overlayfs, dir or dev)"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WritableLayerType {
    #[default]
    Append,
    Sparse,
}

/// Which block device frontend serves images (`[device] frontend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FrontendChoice {
    /// ublk when /dev/ublk-control exists, else FUSE + loop.
    #[default]
    Auto,
    Ublk,
    Fuse,
}

impl FrontendChoice {
    pub fn resolve(self) -> crate::device::Frontend {
        use crate::device::Frontend;
        match self {
            FrontendChoice::Auto => Frontend::auto(),
            FrontendChoice::Ublk => Frontend::Ublk,
            FrontendChoice::Fuse => Frontend::Fuse,
        }
    }
}

/// `[device]`: how images become block devices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceConfig {
    pub frontend: FrontendChoice,
    /// The devices' read-ahead in KiB (the kernel's default for disks; a loop device over a
    /// FUSE file would otherwise read ahead 2.5 MiB, all fetched from the registry).
    pub read_ahead_kb: u32,
    /// FUSE frontend: the loop device reads the image file through the page cache (repeated
    /// reads never reach ovbd) instead of with direct I/O (one cached copy fewer).
    pub fuse_page_cache: bool,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            frontend: FrontendChoice::default(),
            read_ahead_kb: 128,
            fuse_page_cache: false,
        }
    }
}

/// How log lines are written (`log_format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where snapshots and metadata live.
    pub root: PathBuf,
    /// The containerd Snapshots API socket.
    pub socket: PathBuf,
    /// containerd's name for this snapshotter (its `proxy_plugins` key). Requests under another
    /// name (a second proxy plugin on the same socket) see snapshots of their own.
    pub name: String,
    pub rootfs_mode: RootfsMode,
    pub writable_layer_type: WritableLayerType,
    /// Virtual size of a new writable base layer (no OverlayBD parent), GiB.
    pub default_vsize_gb: u64,
    /// error, warn, info, debug or trace.
    pub log_level: String,
    /// Log line format: human-readable text or one JSON object per line.
    pub log_format: LogFormat,
    /// Whether a layer Prepare's `containerd.io/snapshot/image-ref` label may name the image a
    /// lazily pulled layer is read from. containerd copies it from the image's own manifest, so
    /// it is trusted only where every client overwrites it (nerdctl); `cri.image-ref` always is.
    pub trust_image_ref_label: bool,
    /// How registries are reached for lazily pulled layers (`[registry]`).
    pub registry: RegistryConfig,
    /// The on-disk block cache in front of registry blobs (`[cache]`).
    pub cache: CacheConfig,
    /// Background download of whole remote layers (`[download]`).
    pub download: DownloadConfig,
    /// Block device frontend (`[device]`).
    pub device: DeviceConfig,
    /// The root-only control socket `ovbd status` asks; default: `control.sock` next to
    /// `socket`.
    pub control_socket: Option<PathBuf>,
    /// Prometheus metrics (`[metrics]`).
    pub metrics: MetricsConfig,
    /// The CRI image-service proxy that captures Kubernetes pull secrets (`[cri_proxy]`).
    pub cri_proxy: CriProxyConfig,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `ip:port` to serve `/metrics` on (e.g. `127.0.0.1:9863`); unset: no metrics endpoint.
    pub address: Option<String>,
}

impl MetricsConfig {
    /// The address to listen on, if any; a malformed one is an error naming the key.
    pub fn listen_address(&self) -> Result<Option<std::net::SocketAddr>> {
        self.address
            .as_deref()
            .map(|a| {
                a.parse().with_context(|| {
                    format!("[metrics] address {a:?} is not an ip:port (e.g. 127.0.0.1:9863)")
                })
            })
            .transpose()
    }
}

/// `[cri_proxy]`: off unless `listen` is set. `ovbd serve` then listens there as the kubelet's
/// image service (`--image-service-endpoint`), forwards every call to containerd's CRI at
/// `upstream`, and keeps each PullImage's auth in memory for the lazy layers that pull prepares.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CriProxyConfig {
    pub listen: Option<PathBuf>,
    pub upstream: PathBuf,
    /// containerd's namespace of CRI: a pull secret binds only to layers prepared there.
    pub namespace: String,
}

impl Default for CriProxyConfig {
    fn default() -> Self {
        CriProxyConfig {
            listen: None,
            upstream: PathBuf::from("/run/containerd/containerd.sock"),
            namespace: "k8s.io".into(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from("/var/lib/ovbd"),
            socket: PathBuf::from("/run/ovbd/ovbd.sock"),
            name: "ovbd".into(),
            rootfs_mode: RootfsMode::Overlayfs,
            writable_layer_type: WritableLayerType::Append,
            default_vsize_gb: 64,
            log_level: "info".into(),
            log_format: LogFormat::Text,
            trust_image_ref_label: false,
            registry: RegistryConfig::default(),
            cache: CacheConfig::default(),
            download: DownloadConfig::default(),
            device: DeviceConfig::default(),
            control_socket: None,
            metrics: MetricsConfig::default(),
            cri_proxy: CriProxyConfig::default(),
        }
    }
}

impl Config {
    /// Reads `path`; a missing default config file means all defaults.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let (path, explicit) = match path {
            Some(p) => (p, true),
            None => (Path::new(DEFAULT_CONFIG), false),
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default())
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let cfg: Config =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if cfg.default_vsize_gb == 0 {
            bail!("{}: default_vsize_gb must be > 0", path.display());
        }
        cfg.metrics
            .listen_address()
            .with_context(|| format!("{}", path.display()))?;
        Ok(cfg)
    }

    /// The control socket `ovbd status` asks (see `control_socket`).
    pub fn control_socket_path(&self) -> PathBuf {
        self.control_socket.clone().unwrap_or_else(|| {
            self.socket
                .parent()
                .unwrap_or(Path::new("/run/ovbd"))
                .join("control.sock")
        })
    }
}

/// `[registry]`: how layer blobs are read from registries (src/registry/).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Per-host mirrors, tried in order before the host itself.
    pub mirrors: Vec<MirrorConfig>,
    /// `host[:port]` of registries spoken to over plain http (and allowed loopback hosts).
    pub insecure: Vec<String>,
    /// `host[:port]` (no port: any) of registries, redirect targets and token servers that
    /// may be loopback, link-local, private or cloud metadata addresses (refused otherwise).
    /// Hosts in `insecure` and mirrors count as listed.
    pub allow_hosts: Vec<String>,
    /// Token servers on another host than their registry that may receive its credentials:
    /// registry `host[:port]` (as in image references) → realm `host[:port]`s (no port: any).
    /// Built in: Docker Hub's.
    pub auth_realms: BTreeMap<String, Vec<String>>,
    /// An HTTP proxy for every registry request (e.g. a P2P agent): `http://host:port`.
    pub proxy: Option<String>,
    /// Credentials: a docker `config.json` (`auths`, `credHelpers`, `credsStore`; see
    /// `registry::credentials`). Default `$DOCKER_CONFIG/config.json`, else
    /// `~/.docker/config.json`. Re-read whenever a registry asks for authentication.
    pub docker_config: Option<PathBuf>,
    /// Deadline of one read, retries included (seconds; fractions allowed).
    pub timeout_secs: f64,
    /// Retries of a read after a transient failure (5xx, 429, resets, truncations, stalls).
    pub retries: u32,
    /// A response that delivers no bytes for this long is abandoned and retried (seconds).
    pub stall_timeout_secs: f64,
    /// TCP (and TLS) connect timeout (seconds).
    pub connect_timeout_secs: f64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            mirrors: Vec::new(),
            insecure: Vec::new(),
            allow_hosts: Vec::new(),
            auth_realms: BTreeMap::new(),
            proxy: None,
            docker_config: None,
            timeout_secs: 30.0,
            retries: 5,
            stall_timeout_secs: 10.0,
            connect_timeout_secs: 5.0,
        }
    }
}

/// One `[[registry.mirrors]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// The registry mirrored, `host[:port]` as in image references (`docker.io`).
    pub host: String,
    /// Mirror base URLs (`https://mirror.example.com`, `http://10.0.0.1:5000`; a bare
    /// `host[:port]` is https unless insecure or loopback), tried in order.
    pub mirrors: Vec<String>,
}

impl RegistryConfig {
    /// Checks the values a daemon cannot work with.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("timeout_secs", self.timeout_secs),
            ("stall_timeout_secs", self.stall_timeout_secs),
            ("connect_timeout_secs", self.connect_timeout_secs),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 86400.0) {
                bail!("[registry] {name} must be > 0 and at most a day, not {v}");
            }
        }
        for m in &self.mirrors {
            if m.host.trim().is_empty() {
                bail!("[registry] a mirrors entry has an empty host");
            }
        }
        Ok(())
    }
}

/// `[download]`: remote layers downloaded whole in the background (upstream's `download`):
/// the blob is written next to the layer, its sha256 checked, then reads switch to the file.
/// On by default (as stargz and SOCI fetch whole layers in the background): the download is
/// the only check of a lazily pulled blob against its digest, and a verified blob is what the
/// block cache shares between registries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownloadConfig {
    pub enable: bool,
    /// Seconds after a remote layer is first opened before its download starts (at most a week).
    pub delay_secs: f64,
    /// Bandwidth limit per download, MB/s (0: none, else at least [`Self::MIN_MBPS`]).
    pub max_mbps: f64,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig {
            enable: true,
            delay_secs: 300.0,
            max_mbps: 100.0,
        }
    }
}

impl DownloadConfig {
    /// The longest `delay_secs` (a week): beyond, durations overflow; to never download, set
    /// `enable = false`.
    pub const MAX_DELAY_SECS: f64 = 7.0 * 86400.0;
    /// The lowest non-zero `max_mbps` (1 kB/s): below, the pacing of a large blob overflows a
    /// duration.
    pub const MIN_MBPS: f64 = 0.001;

    pub fn validate(&self) -> Result<()> {
        if !(self.delay_secs.is_finite()
            && self.delay_secs >= 0.0
            && self.delay_secs <= Self::MAX_DELAY_SECS)
        {
            bail!(
                "[download] delay_secs must be between 0 and {} (a week), not {}",
                Self::MAX_DELAY_SECS,
                self.delay_secs
            );
        }
        if !(self.max_mbps.is_finite() && (self.max_mbps == 0.0 || self.max_mbps >= Self::MIN_MBPS))
        {
            bail!(
                "[download] max_mbps must be 0 (no limit) or at least {}, not {}",
                Self::MIN_MBPS,
                self.max_mbps
            );
        }
        Ok(())
    }
}

/// `[cache]`: the on-disk block cache of registry blobs (src/source/cache/).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Default `<root>/cache`.
    pub dir: Option<PathBuf>,
    /// Size limit in GiB (fractions allowed); least recently used blocks are evicted above it.
    pub size_gb: f64,
    /// The unit cached and the smallest refill from the registry, KiB (a multiple of 4); refills
    /// of sequential runs grow to 4 MiB.
    pub refill_kb: u64,
    /// Blobs (compressed layers) of at most this many KiB are fetched whole on their first
    /// read, in one request (0: never; at most 4096, one request's limit).
    pub whole_blob_kb: u64,
    /// On a lazily pulled image, the first read of a file's data fetches the file's aligned
    /// chunk of this many KiB around it, one request (0: only what is read; at most 4096).
    pub file_chunk_kb: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: None,
            size_gb: 4.0,
            refill_kb: 32,
            whole_blob_kb: 2048,
            file_chunk_kb: 1024,
        }
    }
}

impl CacheConfig {
    /// The size limit in bytes.
    pub fn size_bytes(&self) -> u64 {
        (self.size_gb * (1u64 << 30) as f64) as u64
    }

    /// The size up to which a blob is fetched whole, in bytes.
    pub fn whole_blob_bytes(&self) -> u64 {
        self.whole_blob_kb.saturating_mul(1024)
    }

    /// The file readahead's chunk in bytes (0: off).
    pub fn file_chunk_bytes(&self) -> u64 {
        self.file_chunk_kb.saturating_mul(1024)
    }

    /// The refill (block) size in bytes.
    pub fn refill_bytes(&self) -> u64 {
        self.refill_kb.saturating_mul(1024)
    }

    /// Checks the values the cache cannot work with.
    pub fn validate(&self) -> Result<()> {
        if !(self.size_gb.is_finite() && self.size_gb > 0.0) {
            bail!("[cache] size_gb must be > 0, not {}", self.size_gb);
        }
        if self.whole_blob_kb > 4096 {
            bail!(
                "[cache] whole_blob_kb must be at most 4096 (one registry request), not {}",
                self.whole_blob_kb
            );
        }
        if self.file_chunk_kb > 4096 {
            bail!(
                "[cache] file_chunk_kb must be at most 4096 (one registry request), not {}",
                self.file_chunk_kb
            );
        }
        if self.refill_kb == 0 || self.refill_kb & 3 != 0 || self.refill_kb > 64 * 1024 {
            bail!(
                "[cache] refill_kb must be a multiple of 4 between 4 and 65536, not {}",
                self.refill_kb
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_config_parses_and_unknown_keys_are_errors() {
        let sample = include_str!("../config/ovbd.toml");
        let c: Config = toml::from_str(sample).unwrap();
        assert_eq!(c.rootfs_mode, RootfsMode::Overlayfs);
        assert!(toml::from_str::<Config>("rootfs_mode = \"dir\"\nbogus = 1").is_err());
        assert!(toml::from_str::<Config>("rootfs_mode = \"disk\"").is_err());
    }

    #[test]
    fn metrics_address_is_checked_and_named() {
        let c: Config = toml::from_str("[metrics]\naddress = \"127.0.0.1:9863\"").unwrap();
        assert_eq!(
            c.metrics.listen_address().unwrap(),
            Some("127.0.0.1:9863".parse().unwrap())
        );
        assert_eq!(Config::default().metrics.listen_address().unwrap(), None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[metrics]\naddress = \"localhost\"").unwrap();
        let e = format!("{:#}", Config::load(Some(&path)).unwrap_err());
        assert!(
            e.contains("[metrics] address") && e.contains("c.toml"),
            "{e}"
        );
        // The control socket sits next to the snapshotter's unless configured.
        let c: Config = toml::from_str("socket = \"/run/x/ovbd.sock\"").unwrap();
        assert_eq!(
            c.control_socket_path(),
            PathBuf::from("/run/x/control.sock")
        );
    }

    #[test]
    fn registry_and_cache_sections() {
        // The sample documents the defaults.
        let sample: Config = toml::from_str(include_str!("../config/ovbd.toml")).unwrap();
        assert_eq!(sample.registry, RegistryConfig::default());
        assert_eq!(sample.cache, CacheConfig::default());
        assert_eq!(sample.download, DownloadConfig::default());
        assert_eq!(sample.device, DeviceConfig::default());
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.device.frontend, FrontendChoice::Auto);
        let c: Config = toml::from_str("[device]\nfrontend = \"fuse\"").unwrap();
        assert_eq!(c.device.frontend.resolve(), crate::device::Frontend::Fuse);
        assert!(toml::from_str::<Config>("[device]\nfrontend = \"nbd\"").is_err());
        assert!(!c.device.fuse_page_cache);
        assert_eq!(c.device.read_ahead_kb, 128);
        let c: Config = toml::from_str("[device]\nfuse_page_cache = true").unwrap();
        assert!(c.device.fuse_page_cache);
        assert_eq!(c.registry, RegistryConfig::default());
        assert_eq!(c.cache, CacheConfig::default());
        assert_eq!(c.registry.timeout_secs, 30.0);
        assert_eq!(c.registry.retries, 5);
        assert_eq!(c.cache.size_bytes(), 4 << 30);
        assert_eq!(c.cache.refill_bytes(), 32 << 10);
        let c: Config = toml::from_str(
            r#"
[registry]
insecure = ["reg.local:5000"]
allow_hosts = ["127.0.0.1:5000", "reg.lan"]
proxy = "http://127.0.0.1:65001"
docker_config = "/etc/ovbd/auth.json"
timeout_secs = 10
stall_timeout_secs = 2.5
retries = 2
[[registry.mirrors]]
host = "docker.io"
mirrors = ["https://mirror.example.com", "http://10.0.0.1:5000"]
[registry.auth_realms]
"reg.lan" = ["auth.lan", "auth2.lan:8443"]
[cache]
dir = "/var/cache/ovbd"
size_gb = 0.5
refill_kb = 1024
file_chunk_kb = 256
"#,
        )
        .unwrap();
        assert_eq!(c.registry.insecure, ["reg.local:5000"]);
        assert_eq!(c.registry.allow_hosts, ["127.0.0.1:5000", "reg.lan"]);
        assert_eq!(
            c.registry.auth_realms["reg.lan"],
            ["auth.lan", "auth2.lan:8443"]
        );
        assert_eq!(c.registry.proxy.as_deref(), Some("http://127.0.0.1:65001"));
        assert_eq!(c.registry.timeout_secs, 10.0);
        assert_eq!(c.registry.stall_timeout_secs, 2.5);
        assert_eq!(c.registry.retries, 2);
        assert_eq!(c.registry.mirrors[0].host, "docker.io");
        assert_eq!(c.registry.mirrors[0].mirrors.len(), 2);
        assert_eq!(c.cache.dir.as_deref(), Some(Path::new("/var/cache/ovbd")));
        assert_eq!(c.cache.size_bytes(), 512 << 20);
        assert_eq!(c.cache.refill_bytes(), 1 << 20);
        assert_eq!(c.cache.file_chunk_bytes(), 256 << 10);
        c.registry.validate().unwrap();
        c.cache.validate().unwrap();
        assert!(toml::from_str::<Config>("[registry]\nbogus = 1").is_err());
        assert!(toml::from_str::<Config>("[cache]\nsize = 1").is_err());
        let bad: Config = toml::from_str("[cache]\nrefill_kb = 6").unwrap();
        assert!(bad.cache.validate().is_err());
        let bad: Config = toml::from_str("[cache]\nfile_chunk_kb = 4100").unwrap();
        assert!(bad.cache.validate().is_err());
        let bad: Config = toml::from_str("[registry]\ntimeout_secs = 0").unwrap();
        assert!(bad.registry.validate().is_err());
    }

    /// `[download]` values that would overflow a duration (or stop the download for good) are
    /// refused by validate(), naming the key; the limits themselves pass.
    #[test]
    fn download_values_are_bounded() {
        let d = DownloadConfig::default();
        assert!(d.enable, "the verifying download is on by default");
        d.validate().unwrap();
        for (bad, key) in [
            ("delay_secs = 1e30", "delay_secs"),
            ("delay_secs = 604801", "delay_secs"),
            ("delay_secs = -1", "delay_secs"),
            ("delay_secs = nan", "delay_secs"),
            ("max_mbps = 1e-300", "max_mbps"),
            ("max_mbps = -1", "max_mbps"),
            ("max_mbps = inf", "max_mbps"),
        ] {
            let c: Config = toml::from_str(&format!("[download]\n{bad}")).unwrap();
            let e = c.download.validate().expect_err(bad).to_string();
            assert!(e.contains(&format!("[download] {key}")), "{bad}: {e}");
        }
        for good in [
            "delay_secs = 0",
            "delay_secs = 604800",
            "max_mbps = 0",
            "max_mbps = 0.001",
            "max_mbps = 1e6",
        ] {
            let c: Config = toml::from_str(&format!("[download]\n{good}")).unwrap();
            c.download.validate().expect(good);
        }
    }
}
