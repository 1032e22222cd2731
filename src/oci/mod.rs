//! Image I/O for `ovbd convert`: read one platform's image from an OCI image layout or a
//! registry, download its blobs with digest and size checked, and write an image to a layout or
//! push it to a registry.
//!
//! References ([`ImageRef::parse`]):
//! - `oci:DIR:TAG` — an OCI image layout directory; TAG is matched against the
//!   `org.opencontainers.image.ref.name` annotation of `DIR/index.json`;
//! - `oci:DIR@sha256:HEX` — the manifest (or index) with that digest in the layout;
//! - `oci:DIR` — the layout's only entry (reading only);
//! - anything else is a registry reference, `[docker://]host[:port]/repo[:tag][@digest]`,
//!   normalised like docker and containerd (`busybox` is `docker.io/library/busybox:latest`).
//!
//! Registries are reached through [`crate::registry::Registry`], the client the daemon's lazy
//! reads use: mirrors (for pulls), proxy, TLS, host policy, token and Basic auth, redirects,
//! retries with backoff and deadlines, all as `[registry]` says ([`RegistryOptions::config`],
//! `ovbd convert --config` / `rpull --config`; defaults otherwise). A registry is spoken to over
//! plain http when its `host[:port]` is in [`RegistryOptions::insecure`] (or `[registry]
//! insecure`) or its host is a loopback address (`localhost`, `127.0.0.0/8`, `::1`), as docker
//! does by default; https otherwise. The registries the references name are the operator's
//! choice: trusted as if `allow_hosts` listed them (a loopback or private registry works), while
//! redirects and token realms they name are checked as for the daemon. Credentials come from a
//! docker `config.json` (`auths`: `auth` = base64 `user:pass`, or `username`/`password`, or
//! `registrytoken`), at [`RegistryOptions::docker_config`], else `[registry] docker_config`,
//! else `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`; anonymous when it has none
//! for the registry. Credential helpers (`credsStore`, `credHelpers`) are not run.
//!
//! Writes never leave a half-written file under its final name: blobs, `oci-layout` and
//! `index.json` are written to a temporary file in the same directory, synced, and renamed. A
//! push uploads every missing blob (checked with HEAD first) before the manifest.
//!
//! [`ImageClient`] is the async API; [`ImageIo`] is the same for sync callers and owns a
//! current-thread tokio runtime (do not call it from inside a runtime). Local files are read and
//! written with blocking std calls, even in the async API.

// The converter is being written alongside this module: not every item is used by it yet.

pub(crate) mod digest;

use crate::config::RegistryConfig;
use crate::registry::{Registry, Upload};
use anyhow::{anyhow, bail, ensure, Context, Result};
use oci_spec::image::{
    Arch, Descriptor, Digest, DigestAlgorithm, ImageIndex, ImageManifest, MediaType, Os,
    PlatformBuilder,
};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

pub use oci_spec::distribution::Reference;

/// OCI image manifest.
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// The index.json annotation that names an image in a layout.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

const ACCEPTED_MANIFESTS: &[&str] = &[
    MEDIA_OCI_MANIFEST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_INDEX,
    MEDIA_DOCKER_LIST,
];
/// Largest manifest or index read (from a layout or a registry).
const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// Largest image config read into memory.
const MAX_CONFIG_SIZE: u64 = 64 << 20;
/// Indexes pointing at indexes: how deep to follow them.
const MAX_INDEX_DEPTH: usize = 4;
const COPY_CHUNK: usize = 1 << 20;

mod client;
mod layout;
mod manifest;
mod reference;
#[cfg(test)]
mod tests;

pub use client::{ImageClient, ImageIo};
use layout::*;
// Test fixtures hash their blobs as the code under test does.
#[cfg(test)]
pub(crate) use manifest::sha256_digest;
use manifest::*;
pub(crate) use reference::parse_registry_ref;
use reference::*;
pub use reference::{ImageRef, LayoutTarget, Platform};

// ---------------------------------------------------------------------------- options and types

/// How `ovbd convert` and `ovbd rpull` reach registries.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// `host[:port]` of registries reached over plain http (besides loopback hosts, which
    /// always are); added to `config.insecure`.
    pub insecure: Vec<String>,
    /// The docker `config.json` with credentials (overrides `config.docker_config`); `None`:
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// The daemon's `[registry]` section (mirrors, proxy, allow_hosts, auth_realms, timeouts,
    /// retries), read from `--config`; defaults otherwise.
    pub config: RegistryConfig,
}

impl RegistryOptions {
    pub(crate) fn docker_config_path(&self) -> Option<PathBuf> {
        if let Some(p) = self
            .docker_config
            .as_ref()
            .or(self.config.docker_config.as_ref())
        {
            return Some(p.clone());
        }
        if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
            return Some(PathBuf::from(d).join("config.json"));
        }
        std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".docker").join("config.json"))
    }

    /// The `[registry]` configuration the client works with: `config`, with `insecure` and
    /// `docker_config` added.
    pub fn registry_config(&self) -> RegistryConfig {
        let mut cfg = self.config.clone();
        cfg.insecure.extend(self.insecure.iter().cloned());
        if self.docker_config.is_some() {
            cfg.docker_config = self.docker_config.clone();
        }
        cfg
    }
}

/// One platform's image, resolved. (The converter reads the config and layers; the manifest
/// fields are for clients that store the image, such as the lazy-pull client.)
#[allow(dead_code)]
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    /// What was resolved.
    pub reference: ImageRef,
    /// The image manifest's own digest (of the platform's manifest when the reference named an
    /// index).
    pub manifest_digest: Digest,
    /// `application/vnd.oci.image.manifest.v1+json` or
    /// `application/vnd.docker.distribution.manifest.v2+json`.
    pub manifest_media_type: String,
    /// The manifest exactly as stored (its sha256 is `manifest_digest`).
    pub manifest_raw: Vec<u8>,
    pub manifest: ImageManifest,
    /// The config's descriptor (from the manifest).
    pub config: Descriptor,
    /// The config blob, digest checked.
    pub config_raw: Vec<u8>,
    /// The layers' descriptors, bottom first (digest, size, mediaType, annotations).
    pub layers: Vec<Descriptor>,
}

/// A layer blob to write: its descriptor and the local file holding it.
#[derive(Clone, Debug)]
pub struct LayerFile {
    pub descriptor: Descriptor,
    pub path: PathBuf,
}

/// An image to write. Every layer of the manifest must either be among `layers` or already be
/// at the destination; `config` must be the manifest's config blob.
#[derive(Clone, Copy, Debug)]
pub struct ImageToWrite<'a> {
    pub layers: &'a [LayerFile],
    pub config: &'a [u8],
    pub manifest: &'a [u8],
    /// [`MEDIA_OCI_MANIFEST`] or [`MEDIA_DOCKER_MANIFEST`].
    pub manifest_media_type: &'a str,
}
