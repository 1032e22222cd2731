//! The daemon's configuration (`/etc/ovbd/config.toml`).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
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
    pub fn as_str(self) -> &'static str {
        match self {
            RootfsMode::Overlayfs => "overlayfs",
            RootfsMode::Dir => "dir",
            RootfsMode::Dev => "dev",
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

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where snapshots and metadata live.
    pub root: PathBuf,
    /// The containerd Snapshots API socket.
    pub socket: PathBuf,
    pub rootfs_mode: RootfsMode,
    pub writable_layer_type: WritableLayerType,
    /// Virtual size of a new writable base layer (no OverlayBD parent), GiB.
    pub default_vsize_gb: u64,
    /// error, warn, info, debug or trace.
    pub log_level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from("/var/lib/ovbd"),
            socket: PathBuf::from("/run/ovbd/ovbd.sock"),
            rootfs_mode: RootfsMode::Overlayfs,
            writable_layer_type: WritableLayerType::Append,
            default_vsize_gb: 64,
            log_level: "info".into(),
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
        Ok(cfg)
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
}
