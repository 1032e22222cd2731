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

use crate::config::RegistryConfig;
use crate::registry::{normalize_registry_host, Registry, Upload};
use anyhow::{anyhow, bail, ensure, Context, Result};
use oci_spec::image::{
    Arch, Descriptor, Digest, DigestAlgorithm, ImageIndex, ImageManifest, MediaType, Os,
    PlatformBuilder,
};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
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
/// Largest manifest or index read from a layout.
const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// Largest image config read into memory.
const MAX_CONFIG_SIZE: u64 = 64 << 20;
/// Indexes pointing at indexes: how deep to follow them.
const MAX_INDEX_DEPTH: usize = 4;
const COPY_CHUNK: usize = 1 << 20;

// ------------------------------------------------------------------------------------ references

/// Where an image is: an OCI image layout directory or a registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    Layout { dir: PathBuf, target: LayoutTarget },
    Registry(Reference),
}

/// Which entry of a layout's `index.json` (or which blob) an `oci:` reference names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayoutTarget {
    /// `oci:DIR:TAG`: the entry whose `org.opencontainers.image.ref.name` is TAG.
    Tag(String),
    /// `oci:DIR@sha256:...`: the manifest or index with this digest.
    Digest(Digest),
    /// `oci:DIR`: the only entry of index.json.
    Only,
}

impl ImageRef {
    /// Parses `oci:DIR[:TAG]`, `oci:DIR@DIGEST` or a registry reference (see the module doc).
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("oci:") {
            return parse_layout_ref(rest).with_context(|| format!("image reference {s:?}"));
        }
        let name = s.strip_prefix("docker://").unwrap_or(s);
        let reference: Reference = name
            .parse()
            .map_err(|e| anyhow!("image reference {s:?}: {e}"))?;
        // The parser takes `Host/x` (no dot, port or localhost) for a Docker Hub repository
        // with a capital in it, which no registry accepts; Docker would take Host for a host.
        ensure!(
            !reference
                .repository()
                .bytes()
                .any(|b| b.is_ascii_uppercase()),
            "image reference {s:?}: repository {:?} is not lowercase (a registry host needs a \
             dot or a port, e.g. {}.local/...)",
            reference.repository(),
            name.split('/').next().unwrap_or(name)
        );
        Ok(ImageRef::Registry(reference))
    }
}

impl FromStr for ImageRef {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Layout { dir, target } => match target {
                LayoutTarget::Tag(t) => write!(f, "oci:{}:{t}", dir.display()),
                LayoutTarget::Digest(d) => write!(f, "oci:{}@{d}", dir.display()),
                LayoutTarget::Only => write!(f, "oci:{}", dir.display()),
            },
            ImageRef::Registry(r) => write!(f, "{}", r.whole()),
        }
    }
}

fn parse_layout_ref(rest: &str) -> Result<ImageRef> {
    ensure!(!rest.is_empty(), "oci: needs a directory");
    if let Some((dir, digest)) = rest.rsplit_once('@') {
        if digest.contains(':') && !digest.contains('/') {
            ensure!(!dir.is_empty(), "oci: needs a directory before @");
            let digest: Digest = digest
                .parse()
                .map_err(|e| anyhow!("bad digest {digest:?}: {e}"))?;
            ensure!(
                *digest.algorithm() == DigestAlgorithm::Sha256,
                "unsupported digest algorithm in {digest} (only sha256)"
            );
            return Ok(ImageRef::Layout {
                dir: dir.into(),
                target: LayoutTarget::Digest(digest),
            });
        }
    }
    if let Some((dir, tag)) = rest.rsplit_once(':') {
        // A ':' followed by a '/' belongs to the directory name.
        if !tag.contains('/') {
            ensure!(!dir.is_empty(), "oci: needs a directory before :{tag}");
            ensure!(
                valid_tag(tag),
                "bad tag {tag:?} (want [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})"
            );
            return Ok(ImageRef::Layout {
                dir: dir.into(),
                target: LayoutTarget::Tag(tag.to_owned()),
            });
        }
    }
    Ok(ImageRef::Layout {
        dir: rest.into(),
        target: LayoutTarget::Only,
    })
}

fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

// ------------------------------------------------------------------------------------- platforms

/// A platform to pick from an index: `os/architecture[/variant]`, default `linux/amd64`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl FromStr for Platform {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        ensure!(
            (2..=3).contains(&parts.len()) && parts.iter().all(|p| !p.is_empty()),
            "bad platform {s:?} (want OS/ARCH[/VARIANT], e.g. linux/arm64/v8)"
        );
        Ok(Platform {
            os: parts[0].to_ascii_lowercase(),
            architecture: parts[1].to_ascii_lowercase(),
            variant: parts.get(2).map(|v| v.to_ascii_lowercase()),
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl Platform {
    /// Whether an index entry's platform is this one, after containerd's normalisation
    /// (`aarch64` is `arm64` whose default variant is `v8`; `arm` defaults to `v7`; `x86_64` is
    /// `amd64`, whose `v1` is no variant). Without a variant (after normalisation) any variant
    /// matches.
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        let (want_arch, want_var) = normalize_arch(&self.architecture, self.variant.as_deref());
        let (arch, var) = normalize_arch(architecture, variant);
        os.eq_ignore_ascii_case(&self.os)
            && arch == want_arch
            && (want_var.is_none() || var == want_var)
    }
}

fn normalize_arch(arch: &str, variant: Option<&str>) -> (String, Option<String>) {
    let arch = arch.to_ascii_lowercase();
    let variant = variant
        .map(str::to_ascii_lowercase)
        .filter(|v| !v.is_empty());
    match arch.as_str() {
        "x86_64" | "x86-64" | "amd64" => {
            ("amd64".into(), variant.filter(|v| v != "v1" && v != "1"))
        }
        "i386" | "i686" | "386" => ("386".into(), None),
        "aarch64" | "arm64" => {
            let v = match variant.as_deref() {
                None | Some("8") | Some("v8") => "v8".to_owned(),
                Some(v) => v.to_owned(),
            };
            ("arm64".into(), Some(v))
        }
        "armhf" => ("arm".into(), Some("v7".into())),
        "armel" => ("arm".into(), Some("v6".into())),
        "arm" => {
            let v = match variant.as_deref() {
                None | Some("7") | Some("v7") => "v7".to_owned(),
                Some("5") => "v5".to_owned(),
                Some("6") => "v6".to_owned(),
                Some("8") => "v8".to_owned(),
                Some(v) => v.to_owned(),
            };
            ("arm".into(), Some(v))
        }
        _ => (arch, variant),
    }
}

fn describe_platform(d: &Descriptor) -> String {
    match d.platform() {
        Some(p) => {
            let mut s = format!("{}/{}", p.os(), p.architecture());
            if let Some(v) = p.variant() {
                s.push('/');
                s.push_str(v);
            }
            s
        }
        None => "(no platform)".into(),
    }
}

fn pick_platform<'a>(index: &'a ImageIndex, platform: &Platform) -> Option<&'a Descriptor> {
    index.manifests().iter().find(|d| {
        d.platform().as_ref().is_some_and(|p| {
            platform.matches(
                &p.os().to_string(),
                &p.architecture().to_string(),
                p.variant().as_deref(),
            )
        })
    })
}

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

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> Digest {
    digest_from_hasher(Sha256::new_with_prefix(data))
}

fn digest_from_hasher(h: Sha256) -> Digest {
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    // 64 lowercase hex digits always make a valid sha256 digest.
    Digest::try_from(format!("sha256:{hex}")).expect("a sha256 digest")
}

// ------------------------------------------------------------------------------------ the client

/// The async image I/O API. Registries are reached through one [`Registry`] (made when first
/// needed): mirrors, proxy, host policy, auth, retries and deadlines of `[registry]`. The
/// registries of the references it is given are trusted as the operator's choice (see
/// [`Registry::trust_named_registry`]): this client serves the CLI, never image labels.
pub struct ImageClient {
    opts: RegistryOptions,
    registry: Mutex<Option<Arc<Registry>>>,
}

impl ImageClient {
    pub fn new(opts: RegistryOptions) -> Self {
        ImageClient {
            opts,
            registry: Mutex::new(None),
        }
    }

    /// The registry client, with `r`'s registry trusted.
    fn registry(&self, r: &Reference) -> Result<Arc<Registry>> {
        // Only ever set once: a panic elsewhere cannot leave it inconsistent.
        let mut slot = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let registry = match &*slot {
            Some(reg) => reg.clone(),
            None => {
                let reg =
                    Registry::new(&self.opts.registry_config()).context("the registry client")?;
                *slot = Some(reg.clone());
                reg
            }
        };
        registry.trust_named_registry(r.registry())?;
        Ok(registry)
    }

    /// Resolves `r` to one platform's image: follows an index or manifest list to `platform`'s
    /// manifest, reads the manifest and the config (both digest checked).
    pub async fn resolve(&self, r: &ImageRef, platform: &Platform) -> Result<ResolvedImage> {
        self.resolve_inner(r, platform)
            .await
            .with_context(|| format!("resolving {r} ({platform})"))
    }

    async fn resolve_inner(&self, r: &ImageRef, platform: &Platform) -> Result<ResolvedImage> {
        let (mut raw, mut digest, hint) = match r {
            ImageRef::Layout { dir, target } => layout_root(dir, target)?,
            ImageRef::Registry(rr) => self.registry_manifest(rr).await?,
        };
        let mut media = manifest_media_type(&raw, hint.as_deref())
            .with_context(|| format!("manifest {digest}"))?;
        let mut depth = 0;
        while is_index(&media) {
            depth += 1;
            ensure!(
                depth <= MAX_INDEX_DEPTH,
                "indexes nested deeper than {MAX_INDEX_DEPTH}"
            );
            let index: ImageIndex =
                serde_json::from_slice(&raw).with_context(|| format!("parsing index {digest}"))?;
            let Some(child) = pick_platform(&index, platform) else {
                let have: Vec<String> = index.manifests().iter().map(describe_platform).collect();
                bail!(
                    "index {digest} has no {platform} image (it has: {})",
                    have.join(", ")
                );
            };
            raw = match r {
                ImageRef::Layout { dir, .. } => {
                    read_layout_blob(dir, child, MAX_MANIFEST_SIZE, "manifest")?
                }
                ImageRef::Registry(rr) => {
                    let child_ref = rr.clone_with_digest(child.digest().to_string());
                    let (raw, _, _) = self.registry_manifest(&child_ref).await?;
                    ensure!(
                        raw.len() as u64 == child.size(),
                        "manifest {} from {}: {} bytes, index {digest} says {}",
                        child.digest(),
                        child_ref.whole(),
                        raw.len(),
                        child.size()
                    );
                    raw
                }
            };
            digest = child.digest().clone();
            media = manifest_media_type(&raw, Some(child.media_type().as_ref()))
                .with_context(|| format!("manifest {digest}"))?;
        }
        ensure!(
            media == MEDIA_OCI_MANIFEST || media == MEDIA_DOCKER_MANIFEST,
            "{digest} has media type {media}, not an image manifest"
        );
        let manifest: ImageManifest =
            serde_json::from_slice(&raw).with_context(|| format!("parsing manifest {digest}"))?;
        let config = manifest.config().clone();
        let config_raw = match r {
            ImageRef::Layout { dir, .. } => {
                read_layout_blob(dir, &config, MAX_CONFIG_SIZE, "config")?
            }
            ImageRef::Registry(rr) => self.registry_small_blob(rr, &config).await?,
        };
        let layers = manifest.layers().clone();
        Ok(ResolvedImage {
            reference: r.clone(),
            manifest_digest: digest,
            manifest_media_type: media,
            manifest_raw: raw,
            manifest,
            config,
            config_raw,
            layers,
        })
    }

    /// A manifest (or index) from a registry, its digest checked against the reference's, and
    /// its media type as served (`Content-Type`).
    async fn registry_manifest(&self, r: &Reference) -> Result<(Vec<u8>, Digest, Option<String>)> {
        let m = self
            .registry(r)?
            .get_manifest(r, ACCEPTED_MANIFESTS, MAX_MANIFEST_SIZE)
            .await?;
        let digest = Digest::from_str(&m.digest)
            .map_err(|e| anyhow!("manifest {} has digest {}: {e}", r.whole(), m.digest))?;
        Ok((m.raw, digest, m.media_type))
    }

    /// A small blob (a config) from a registry into memory, digest and size checked.
    async fn registry_small_blob(&self, r: &Reference, desc: &Descriptor) -> Result<Vec<u8>> {
        ensure!(
            desc.size() <= MAX_CONFIG_SIZE,
            "blob {} is {} bytes: too large for a config (max {MAX_CONFIG_SIZE})",
            desc.digest(),
            desc.size()
        );
        let from = format!("registry {}/{}", r.registry(), r.repository());
        // Checked here too: what is handed on is what was hashed.
        let mut check = BlobCheck::new(desc, from)?;
        let out = self
            .registry(r)?
            .fetch_blob_bytes(r, desc.digest().as_ref(), desc.size())
            .await?;
        check.update(&out)?;
        check.finish()?;
        Ok(out)
    }

    /// Downloads the blob `desc` of image `r` to `dest` (created or replaced; its directory is
    /// created if missing), checking its sha256 digest and size. On any error `dest` is left as
    /// it was.
    pub async fn fetch_blob(&self, r: &ImageRef, desc: &Descriptor, dest: &Path) -> Result<()> {
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut tmp = temp_in(&dir)?;
        match r {
            ImageRef::Layout { dir: layout, .. } => {
                let path = blob_path(layout, desc.digest())?;
                let from = format!("{}", path.display());
                let mut check = BlobCheck::new(desc, from)?;
                let src = File::open(&path).with_context(|| {
                    format!(
                        "blob {} from {r}: opening {}",
                        desc.digest(),
                        path.display()
                    )
                })?;
                copy_checked(src, tmp.as_file_mut(), &mut check)?;
                check.finish()?;
            }
            ImageRef::Registry(rr) => {
                let from = format!("registry {}/{}", rr.registry(), rr.repository());
                // Only sha256 (the registry streams it through its own check).
                BlobCheck::new(desc, from)?;
                let file = tmp
                    .as_file()
                    .try_clone()
                    .with_context(|| format!("writing {}", dest.display()))?;
                self.registry(rr)?
                    .fetch_blob_to_file(rr, desc.digest().as_ref(), desc.size(), file)
                    .await?;
            }
        }
        commit_temp(tmp, dest)?;
        Ok(())
    }

    /// Writes `img` to `dst`: `oci:DIR:TAG` (the layout is created if missing; an entry with
    /// the same tag is replaced) or a registry reference (missing blobs pushed, then the
    /// manifest). Returns the manifest's descriptor.
    pub async fn write_image(&self, dst: &ImageRef, img: &ImageToWrite<'_>) -> Result<Descriptor> {
        let plan = check_image(img)?;
        match dst {
            ImageRef::Layout {
                dir,
                target: LayoutTarget::Tag(tag),
            } => write_layout(dir, tag, img, &plan).with_context(|| format!("writing {dst}")),
            ImageRef::Layout { .. } => {
                bail!("writing {dst}: an oci: destination needs a tag (oci:DIR:TAG)")
            }
            ImageRef::Registry(r) => self
                .push(r, img, &plan)
                .await
                .with_context(|| format!("pushing to {dst}")),
        }
    }

    async fn push(
        &self,
        r: &Reference,
        img: &ImageToWrite<'_>,
        plan: &Plan<'_>,
    ) -> Result<Descriptor> {
        let registry = self.registry(r)?;
        let repo = format!("{}/{}", r.registry(), r.repository());

        // What to upload: every layer not there yet. Nothing is uploaded before it is known that
        // every missing layer was given.
        let mut seen = HashSet::new();
        let mut uploads = Vec::new();
        for layer in plan.manifest.layers() {
            let digest = layer.digest().to_string();
            if !seen.insert(digest.clone()) {
                continue;
            }
            if registry.blob_exists(r, &digest).await? {
                log::debug!("{repo}: blob {digest} is there already");
                continue;
            }
            match plan.files.get(digest.as_str()) {
                Some(path) => uploads.push((layer, *path)),
                None => bail!("layer {digest} is neither given nor in {repo}"),
            }
        }
        for (layer, path) in uploads {
            let body = Upload::File {
                path: path.to_owned(),
                size: layer.size(),
            };
            registry
                .push_blob(r, layer.digest().as_ref(), body)
                .await
                .with_context(|| {
                    format!("pushing layer {} from {}", layer.digest(), path.display())
                })?;
        }
        let config_digest = plan.manifest.config().digest().to_string();
        if !registry.blob_exists(r, &config_digest).await? {
            registry
                .push_blob(r, &config_digest, Upload::Bytes(img.config.to_vec()))
                .await
                .with_context(|| format!("pushing config {config_digest}"))?;
        }
        registry
            .push_manifest(r, img.manifest_media_type, img.manifest.to_vec())
            .await?;
        Ok(plan.descriptor.clone())
    }
}

/// The sync facade of [`ImageClient`]: owns a current-thread tokio runtime.
pub struct ImageIo {
    rt: tokio::runtime::Runtime,
    client: ImageClient,
}

impl ImageIo {
    pub fn new(opts: RegistryOptions) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a tokio runtime for image I/O")?;
        Ok(ImageIo {
            rt,
            client: ImageClient::new(opts),
        })
    }

    /// See [`ImageClient::resolve`].
    pub fn resolve(&self, r: &ImageRef, platform: &Platform) -> Result<ResolvedImage> {
        self.rt.block_on(self.client.resolve(r, platform))
    }

    /// See [`ImageClient::fetch_blob`].
    pub fn fetch_blob(&self, r: &ImageRef, desc: &Descriptor, dest: &Path) -> Result<()> {
        self.rt.block_on(self.client.fetch_blob(r, desc, dest))
    }

    /// See [`ImageClient::write_image`].
    pub fn write_image(&self, dst: &ImageRef, img: &ImageToWrite<'_>) -> Result<Descriptor> {
        self.rt.block_on(self.client.write_image(dst, img))
    }
}

// ------------------------------------------------------------------------------ blob checking

/// Hashes and counts a blob's bytes as they pass; says which blob and where it came from when
/// they do not match its descriptor.
struct BlobCheck {
    digest: Digest,
    size: u64,
    from: String,
    hasher: Sha256,
    seen: u64,
}

impl BlobCheck {
    fn new(desc: &Descriptor, from: String) -> Result<Self> {
        ensure!(
            *desc.digest().algorithm() == DigestAlgorithm::Sha256,
            "blob {} from {from}: only sha256 digests are supported",
            desc.digest()
        );
        Ok(BlobCheck {
            digest: desc.digest().clone(),
            size: desc.size(),
            from,
            hasher: Sha256::new(),
            seen: 0,
        })
    }

    fn update(&mut self, chunk: &[u8]) -> Result<()> {
        self.seen += chunk.len() as u64;
        ensure!(
            self.seen <= self.size,
            "blob {} from {}: more than the {} bytes its descriptor says",
            self.digest,
            self.from,
            self.size
        );
        self.hasher.update(chunk);
        Ok(())
    }

    fn finish(self) -> Result<()> {
        ensure!(
            self.seen == self.size,
            "blob {} from {}: {} bytes, its descriptor says {}",
            self.digest,
            self.from,
            self.seen,
            self.size
        );
        let got = digest_from_hasher(self.hasher);
        ensure!(
            got == self.digest,
            "blob {} from {}: digest mismatch, the content's digest is {got}",
            self.digest,
            self.from
        );
        Ok(())
    }
}

fn copy_checked(mut src: impl Read, dst: &mut impl Write, check: &mut BlobCheck) -> Result<()> {
    let mut buf = vec![0u8; COPY_CHUNK];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("blob {}: reading {}", check.digest, check.from))
            }
        };
        check.update(&buf[..n])?;
        dst.write_all(&buf[..n])
            .with_context(|| format!("blob {}: writing its copy", check.digest))?;
    }
}

// ---------------------------------------------------------------------------------- OCI layouts

fn blob_path(layout: &Path, digest: &Digest) -> Result<PathBuf> {
    ensure!(
        *digest.algorithm() == DigestAlgorithm::Sha256,
        "blob {digest}: only sha256 digests are supported"
    );
    // Digest parsing checked the hex part: 64 lowercase hex digits, no path separators.
    Ok(layout.join("blobs").join("sha256").join(digest.digest()))
}

/// A blob of a layout read into memory (at most `max` bytes), digest and size checked.
fn read_layout_blob(layout: &Path, desc: &Descriptor, max: u64, what: &str) -> Result<Vec<u8>> {
    ensure!(
        desc.size() <= max,
        "{what} {} is {} bytes, more than the {max} allowed",
        desc.digest(),
        desc.size()
    );
    let path = blob_path(layout, desc.digest())?;
    let file = File::open(&path)
        .with_context(|| format!("{what} {}: opening {}", desc.digest(), path.display()))?;
    let mut check = BlobCheck::new(desc, path.display().to_string())?;
    let mut out = Vec::with_capacity(desc.size() as usize);
    // One byte more than expected, so an oversized blob is caught.
    copy_checked(file.take(desc.size() + 1), &mut out, &mut check)?;
    check.finish()?;
    Ok(out)
}

/// The layout's index.json.
fn read_index(layout: &Path) -> Result<ImageIndex> {
    let path = layout.join("index.json");
    let text = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The manifest or index an `oci:` reference names: (bytes, digest, media type from index.json).
fn layout_root(dir: &Path, target: &LayoutTarget) -> Result<(Vec<u8>, Digest, Option<String>)> {
    let index = read_index(dir)?;
    let entry: Descriptor = match target {
        LayoutTarget::Tag(tag) => index
            .manifests()
            .iter()
            .find(|d| {
                d.annotations()
                    .as_ref()
                    .and_then(|a| a.get(ANNOTATION_REF_NAME))
                    .is_some_and(|n| n == tag)
            })
            .cloned()
            .ok_or_else(|| {
                let tags: Vec<&str> = index
                    .manifests()
                    .iter()
                    .filter_map(|d| d.annotations().as_ref()?.get(ANNOTATION_REF_NAME))
                    .map(String::as_str)
                    .collect();
                anyhow!(
                    "no image tagged {tag:?} in {} (tags: {})",
                    dir.join("index.json").display(),
                    tags.join(", ")
                )
            })?,
        LayoutTarget::Digest(digest) => {
            match index.manifests().iter().find(|d| d.digest() == digest) {
                Some(d) => d.clone(),
                None => {
                    // Not listed: a manifest only reachable through an index. Its media type
                    // comes from its content.
                    let path = blob_path(dir, digest)?;
                    let size = fs::metadata(&path)
                        .with_context(|| format!("no blob {digest} in {}", dir.display()))?
                        .len();
                    Descriptor::new(MediaType::Other(String::new()), size, digest.clone())
                }
            }
        }
        LayoutTarget::Only => match index.manifests().as_slice() {
            [only] => only.clone(),
            [] => bail!("{} lists no image", dir.join("index.json").display()),
            many => bail!(
                "{} lists {} images: name one with oci:DIR:TAG or oci:DIR@DIGEST",
                dir.join("index.json").display(),
                many.len()
            ),
        },
    };
    let raw = read_layout_blob(dir, &entry, MAX_MANIFEST_SIZE, "manifest")?;
    let hint = Some(entry.media_type().to_string()).filter(|m| !m.is_empty());
    Ok((raw, entry.digest().clone(), hint))
}

fn is_index(media: &str) -> bool {
    media == MEDIA_OCI_INDEX || media == MEDIA_DOCKER_LIST
}

/// A manifest's media type: its own `mediaType` field, else the descriptor's, else its shape
/// (`manifests` makes an OCI index, anything else an OCI manifest).
fn manifest_media_type(raw: &[u8], hint: Option<&str>) -> Result<String> {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(raw).context("not a JSON manifest")?;
    if let Some(m) = probe.media_type.filter(|m| !m.is_empty()) {
        return Ok(m);
    }
    if let Some(h) = hint.filter(|h| !h.is_empty()) {
        return Ok(h.to_owned());
    }
    Ok(if probe.manifests.is_some() {
        MEDIA_OCI_INDEX
    } else {
        MEDIA_OCI_MANIFEST
    }
    .to_owned())
}

/// An image to write, checked: its manifest parsed, its descriptor, its layer files by digest.
struct Plan<'a> {
    manifest: ImageManifest,
    descriptor: Descriptor,
    files: HashMap<&'a str, &'a Path>,
}

fn check_image<'a>(img: &ImageToWrite<'a>) -> Result<Plan<'a>> {
    let media = img.manifest_media_type;
    ensure!(
        media == MEDIA_OCI_MANIFEST || media == MEDIA_DOCKER_MANIFEST,
        "cannot write a manifest of media type {media:?} (want {MEDIA_OCI_MANIFEST} or {MEDIA_DOCKER_MANIFEST})"
    );
    let own = manifest_media_type(img.manifest, Some(media)).context("the manifest to write")?;
    ensure!(
        own == media,
        "the manifest to write says it is {own}, but was given as {media}"
    );
    let manifest: ImageManifest =
        serde_json::from_slice(img.manifest).context("parsing the manifest to write")?;
    let config = manifest.config();
    let config_digest = sha256_digest(img.config);
    ensure!(
        config_digest == *config.digest() && img.config.len() as u64 == config.size(),
        "the config given ({config_digest}, {} bytes) is not the manifest's ({}, {} bytes)",
        img.config.len(),
        config.digest(),
        config.size()
    );
    let mut files = HashMap::new();
    for lf in img.layers {
        let d = lf.descriptor.digest();
        let Some(in_manifest) = manifest.layers().iter().find(|l| l.digest() == d) else {
            bail!("layer {d} ({}) is not in the manifest", lf.path.display());
        };
        ensure!(
            in_manifest.size() == lf.descriptor.size(),
            "layer {d}: the manifest says {} bytes, its descriptor {}",
            in_manifest.size(),
            lf.descriptor.size()
        );
        let len = fs::metadata(&lf.path)
            .with_context(|| format!("layer {d}: {}", lf.path.display()))?
            .len();
        ensure!(
            len == lf.descriptor.size(),
            "layer {d}: {} has {len} bytes, its descriptor says {}",
            lf.path.display(),
            lf.descriptor.size()
        );
        files.insert(d.as_ref(), lf.path.as_path());
    }
    let mut descriptor = Descriptor::new(
        MediaType::from(media),
        img.manifest.len() as u64,
        sha256_digest(img.manifest),
    );
    descriptor.set_platform(platform_of_config(img.config));
    Ok(Plan {
        manifest,
        descriptor,
        files,
    })
}

/// The platform an image config declares (`os`, `architecture`, `variant`), if it does.
fn platform_of_config(config: &[u8]) -> Option<oci_spec::image::Platform> {
    #[derive(Deserialize)]
    struct Probe {
        os: Option<String>,
        architecture: Option<String>,
        variant: Option<String>,
    }
    let p: Probe = serde_json::from_slice(config).ok()?;
    let (os, arch) = (
        p.os.filter(|s| !s.is_empty())?,
        p.architecture.filter(|s| !s.is_empty())?,
    );
    let mut b = PlatformBuilder::default()
        .os(Os::from(os.as_str()))
        .architecture(Arch::from(arch.as_str()));
    if let Some(v) = p.variant.filter(|s| !s.is_empty()) {
        b = b.variant(v);
    }
    b.build().ok()
}

/// Writes `bytes` to `path` through a synced temporary file in the same directory and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = temp_in(path.parent().unwrap_or(Path::new(".")))?;
    tmp.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    commit_temp(tmp, path)
}

/// A temporary file in `dir` (hidden, removed when dropped), mode 0644 like a file made
/// under the usual umask rather than tempfile's 0600.
fn temp_in(dir: &Path) -> Result<tempfile::NamedTempFile> {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::Builder::new()
        .prefix(".ovbd-tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))
        .with_context(|| format!("chmod {}", tmp.path().display()))?;
    Ok(tmp)
}

/// Syncs `tmp` and renames it to `dest` (replacing it), then syncs the directory (best effort).
fn commit_temp(tmp: tempfile::NamedTempFile, dest: &Path) -> Result<()> {
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("writing {}", dest.display()))?;
    tmp.persist(dest)
        .map_err(|e| e.error)
        .with_context(|| format!("renaming into {}", dest.display()))?;
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Whether the layout has blob `desc` (by name and size; contents are trusted).
fn layout_has_blob(layout: &Path, desc: &Descriptor) -> Result<bool> {
    let path = blob_path(layout, desc.digest())?;
    Ok(fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == desc.size()))
}

fn write_layout(
    dir: &Path,
    tag: &str,
    img: &ImageToWrite<'_>,
    plan: &Plan<'_>,
) -> Result<Descriptor> {
    let blobs = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let layout_file = dir.join("oci-layout");
    if !layout_file.exists() {
        write_atomic(&layout_file, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    }
    let mut seen = HashSet::new();
    for layer in plan.manifest.layers() {
        if !seen.insert(layer.digest().clone()) || layout_has_blob(dir, layer)? {
            continue;
        }
        let Some(src) = plan.files.get(layer.digest().as_ref()) else {
            bail!(
                "layer {} is neither given nor in {}",
                layer.digest(),
                dir.display()
            );
        };
        let dest = blob_path(dir, layer.digest())?;
        let mut tmp = temp_in(&blobs)?;
        let file = File::open(src).with_context(|| format!("opening {}", src.display()))?;
        let mut check = BlobCheck::new(layer, src.display().to_string())?;
        copy_checked(file, tmp.as_file_mut(), &mut check)?;
        check.finish()?;
        commit_temp(tmp, &dest)?;
    }
    for (bytes, desc) in [
        (img.config, plan.manifest.config()),
        (img.manifest, &plan.descriptor),
    ] {
        if !layout_has_blob(dir, desc)? {
            write_atomic(&blob_path(dir, desc.digest())?, bytes)?;
        }
    }
    let mut entry = plan.descriptor.clone();
    entry.set_annotations(Some(HashMap::from([(
        ANNOTATION_REF_NAME.to_owned(),
        tag.to_owned(),
    )])));
    update_index(dir, tag, &entry)?;
    Ok(entry)
}

/// Replaces index.json's entries tagged `tag` with `entry` (appended last); every other field
/// and entry kept as it was.
fn update_index(dir: &Path, tag: &str, entry: &Descriptor) -> Result<()> {
    let path = dir.join("index.json");
    let mut index: serde_json::Value = match fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_INDEX,
            "manifests": [],
        }),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let obj = index
        .as_object_mut()
        .ok_or_else(|| anyhow!("{} is not a JSON object", path.display()))?;
    let manifests = obj
        .entry("manifests")
        .or_insert_with(|| serde_json::Value::Array(Vec::new()))
        .as_array_mut()
        .ok_or_else(|| anyhow!("{}: manifests is not an array", path.display()))?;
    manifests.retain(|m| m["annotations"][ANNOTATION_REF_NAME].as_str() != Some(tag));
    manifests.push(serde_json::to_value(entry).context("encoding the index entry")?);
    let mut text = serde_json::to_vec_pretty(&index).context("encoding index.json")?;
    text.push(b'\n');
    write_atomic(&path, &text)
}

// ------------------------------------------------------------------------------- credentials

/// What a registry gets from us, from a docker config.json.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RegistryAuth {
    Anonymous,
    /// User and password.
    Basic(String, String),
    /// A registry token (`registrytoken`), sent as `Bearer`.
    Bearer(String),
}

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(rename = "credHelpers", default)]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    #[serde(rename = "registrytoken")]
    registry_token: Option<String>,
    #[serde(rename = "identitytoken")]
    identity_token: Option<String>,
}

/// The credentials for `registry` (`host[:port]`, `docker.io` for Docker Hub) in the docker
/// config at `path`: anonymous when there is no file or no entry for it.
pub(crate) fn registry_auth(path: Option<&Path>, registry: &str) -> Result<RegistryAuth> {
    let Some(path) = path else {
        return Ok(RegistryAuth::Anonymous);
    };
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    docker_config_auth(&text, path, registry)
}

/// [`registry_auth`] on the text of the docker config at `path` (named in errors).
pub(crate) fn docker_config_auth(text: &[u8], path: &Path, registry: &str) -> Result<RegistryAuth> {
    let config: DockerConfig =
        serde_json::from_slice(text).with_context(|| format!("parsing {}", path.display()))?;
    let want = normalize_registry_host(registry);
    if let Some((key, entry)) = config
        .auths
        .iter()
        .find(|(k, _)| normalize_registry_host(k) == want)
    {
        let auth =
            auth_from_entry(entry).with_context(|| format!("{}: auths.{key:?}", path.display()))?;
        if !matches!(auth, RegistryAuth::Anonymous) {
            return Ok(auth);
        }
    }
    let helper = config
        .cred_helpers
        .iter()
        .find(|(k, _)| normalize_registry_host(k) == want)
        .map(|(_, v)| v)
        .or(config.creds_store.as_ref());
    if let Some(helper) = helper {
        log::warn!(
            "{}: credential helper {helper:?} is not supported; {registry} is accessed anonymously",
            path.display()
        );
    }
    Ok(RegistryAuth::Anonymous)
}

fn auth_from_entry(entry: &AuthEntry) -> Result<RegistryAuth> {
    use base64::Engine as _;
    if let Some(auth) = entry
        .auth
        .as_deref()
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(auth))
            .context("auth is not base64")?;
        let decoded = String::from_utf8(decoded).context("auth is not UTF-8")?;
        let (user, pass) = decoded
            .split_once(':')
            .ok_or_else(|| anyhow!("auth is not base64 of user:password"))?;
        return Ok(RegistryAuth::Basic(user.to_owned(), pass.to_owned()));
    }
    if let (Some(user), Some(pass)) = (&entry.username, &entry.password) {
        if !user.is_empty() {
            return Ok(RegistryAuth::Basic(user.clone(), pass.clone()));
        }
    }
    if let Some(token) = entry.registry_token.as_ref().filter(|t| !t.is_empty()) {
        return Ok(RegistryAuth::Bearer(token.clone()));
    }
    if entry.identity_token.as_ref().is_some_and(|t| !t.is_empty()) {
        log::warn!("identity tokens (OAuth refresh tokens) are not supported");
    }
    Ok(RegistryAuth::Anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use std::io::{BufRead, BufReader};
    use std::net::{TcpListener, TcpStream};

    use std::time::Duration;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hello-world-oci"
    );
    const AMD64: &str = "sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3";
    const AMD64_LAYER: &str =
        "sha256:719385e32844401d57ecfd3eacab360bf551a1491c05b85806ed8f1b08d792f6";
    const AMD64_CONFIG: &str =
        "sha256:9c7a54a9a43cca047013b82af109fe963fde787f63f9e016fdc3384500c2823d";
    const CONVERTED: &str =
        "sha256:42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88";
    const CONVERTED_LAYER: &str =
        "sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d";
    const ARM64: &str = "sha256:efebf0f7aee69450f99deafe11121afa720abed733943e50581a9dc7540689c8";

    fn io() -> ImageIo {
        ImageIo::new(RegistryOptions::default()).unwrap()
    }

    fn fixture(tag: &str) -> ImageRef {
        ImageRef::parse(&format!("oci:{FIXTURE}:{tag}")).unwrap()
    }

    fn sha256_file(p: &Path) -> String {
        sha256_digest(&fs::read(p).unwrap()).to_string()
    }

    fn copy_dir(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for e in fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let dest = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &dest);
            } else {
                fs::copy(e.path(), dest).unwrap();
            }
        }
    }

    fn err_text(e: anyhow::Error) -> String {
        format!("{e:#}")
    }

    // -------------------------------------------------------------------------- references

    #[test]
    fn parse_references() {
        let d64 = "sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3";
        let layout = |dir: &str, target: LayoutTarget| ImageRef::Layout {
            dir: dir.into(),
            target,
        };
        let tag = |t: &str| LayoutTarget::Tag(t.into());
        let by_digest = format!("oci:dir@{d64}");
        let cases: Vec<(&str, ImageRef)> = vec![
            ("oci:some/dir:amd64", layout("some/dir", tag("amd64"))),
            ("oci:/abs/dir:v1.0_x-y", layout("/abs/dir", tag("v1.0_x-y"))),
            ("oci:dir", layout("dir", LayoutTarget::Only)),
            ("oci:/a:b/c", layout("/a:b/c", LayoutTarget::Only)),
            ("oci:/a:b/c:t", layout("/a:b/c", tag("t"))),
            (
                &by_digest,
                layout("dir", LayoutTarget::Digest(d64.parse().unwrap())),
            ),
        ];
        for (s, want) in cases {
            let got = ImageRef::parse(s).unwrap_or_else(|e| panic!("{s}: {e:#}"));
            assert_eq!(got, want, "{s}");
            assert_eq!(got.to_string(), s, "display of {s}");
        }

        // (reference, registry, repository, tag, digest)
        type Case<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, Option<&'a str>);
        let registry: Vec<Case> = vec![
            ("busybox", "docker.io", "library/busybox", Some("latest"), None),
            ("docker://busybox:1.36", "docker.io", "library/busybox", Some("1.36"), None),
            ("library/busybox", "docker.io", "library/busybox", Some("latest"), None),
            ("index.docker.io/foo/bar", "docker.io", "foo/bar", Some("latest"), None),
            ("ghcr.io/a/b/c:t", "ghcr.io", "a/b/c", Some("t"), None),
            ("localhost:5000/foo:t", "localhost:5000", "foo", Some("t"), None),
            ("localhost/foo", "localhost", "foo", Some("latest"), None),
            ("127.0.0.1:5000/hello-world@sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3",
             "127.0.0.1:5000", "hello-world", None, Some(d64)),
            ("reg.io:443/x:t@sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3",
             "reg.io:443", "x", Some("t"), Some(d64)),
        ];
        for (s, reg, repo, tag, digest) in registry {
            let ImageRef::Registry(r) = ImageRef::parse(s).unwrap_or_else(|e| panic!("{s}: {e:#}"))
            else {
                panic!("{s}: not a registry reference");
            };
            assert_eq!(
                (r.registry(), r.repository(), r.tag(), r.digest()),
                (reg, repo, tag, digest),
                "{s}"
            );
        }
        assert_eq!(
            ImageRef::parse("busybox").unwrap().to_string(),
            "docker.io/library/busybox:latest"
        );

        let bad: Vec<(&str, &str)> = vec![
            ("oci:", "needs a directory"),
            ("oci:dir:", "bad tag"),
            ("oci::tag", "needs a directory"),
            ("oci:dir:bad tag", "bad tag"),
            ("oci:dir:-x", "bad tag"),
            ("oci:dir@sha256:abc", "bad digest"),
            (
                "oci:@sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3",
                "needs a directory",
            ),
            (
                "oci:dir@md5:d41d8cd98f00b204e9800998ecf8427e",
                "only sha256",
            ),
            ("", "image reference"),
            ("Busybox", "image reference"),
            ("Jdock00/library/busybox", "is not lowercase"),
            ("a//b", "image reference"),
            ("busybox@sha256:abc", "image reference"),
            ("busybox:bad tag", "image reference"),
        ];
        for (s, want) in bad {
            match ImageRef::parse(s) {
                Ok(r) => panic!("{s:?} parsed as {r:?}"),
                Err(e) => {
                    let e = err_text(e);
                    assert!(e.contains(want), "{s:?}: {e}");
                }
            }
        }
    }

    #[test]
    fn platforms() {
        assert_eq!(Platform::default().to_string(), "linux/amd64");
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.variant.as_deref(), Some("v8"));
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", ""] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
        let cases = [
            ("linux/amd64", ("linux", "amd64", None), true),
            ("linux/amd64", ("linux", "x86_64", None), true),
            ("linux/amd64", ("linux", "amd64", Some("v3")), true),
            ("linux/amd64", ("windows", "amd64", None), false),
            ("linux/amd64", ("linux", "arm64", None), false),
            ("linux/arm64", ("linux", "arm64", Some("v8")), true),
            ("linux/arm64", ("linux", "aarch64", None), true),
            ("linux/arm64/v8", ("linux", "arm64", None), true),
            ("linux/arm", ("linux", "arm", Some("v7")), true),
            ("linux/arm", ("linux", "arm", Some("v5")), false),
            ("linux/arm/v5", ("linux", "arm", Some("v5")), true),
            ("linux/arm/v6", ("linux", "arm", Some("v7")), false),
        ];
        for (want, (os, arch, var), expected) in cases {
            let p: Platform = want.parse().unwrap();
            assert_eq!(
                p.matches(os, arch, var),
                expected,
                "{want} vs {os}/{arch}/{var:?}"
            );
        }
    }

    #[test]
    fn docker_config_credentials() {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let config = serde_json::json!({
            "auths": {
                "https://index.docker.io/v1/": { "auth": b64("hubuser:hub:pass") },
                "127.0.0.1:5000": { "username": "alice", "password": "s3cret" },
                "http://reg.lan:5000/v2/": { "auth": b64("bob:pw") },
                "token.example": { "registrytoken": "tok" },
                "empty.example": {},
                "broken.example": { "auth": "!!!" },
                "nocolon.example": { "auth": b64("justuser") },
            },
            "credHelpers": { "helped.example": "gcloud" },
        });
        fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
        let auth = |reg: &str| registry_auth(Some(&path), reg);
        let basic = |u: &str, p: &str| RegistryAuth::Basic(u.into(), p.into());
        assert_eq!(auth("docker.io").unwrap(), basic("hubuser", "hub:pass"));
        assert_eq!(auth("127.0.0.1:5000").unwrap(), basic("alice", "s3cret"));
        assert_eq!(auth("reg.lan:5000").unwrap(), basic("bob", "pw"));
        assert_eq!(
            auth("token.example").unwrap(),
            RegistryAuth::Bearer("tok".into())
        );
        assert_eq!(auth("empty.example").unwrap(), RegistryAuth::Anonymous);
        assert_eq!(auth("helped.example").unwrap(), RegistryAuth::Anonymous);
        assert_eq!(auth("127.0.0.1:5001").unwrap(), RegistryAuth::Anonymous);
        for bad in ["broken.example", "nocolon.example"] {
            let e = err_text(auth(bad).unwrap_err());
            assert!(e.contains(bad) && e.contains("config.json"), "{e}");
        }
        // No file: anonymous. A file that is not JSON: an error naming it.
        assert_eq!(
            registry_auth(Some(&dir.path().join("none.json")), "docker.io").unwrap(),
            RegistryAuth::Anonymous
        );
        assert_eq!(
            registry_auth(None, "docker.io").unwrap(),
            RegistryAuth::Anonymous
        );
        fs::write(&path, "{not json").unwrap();
        let e = err_text(auth("docker.io").unwrap_err());
        assert!(e.contains(&path.display().to_string()), "{e}");
        // An explicit path wins over the environment.
        let opts = RegistryOptions {
            docker_config: Some(path.clone()),
            ..Default::default()
        };
        assert_eq!(opts.docker_config_path(), Some(path));
    }

    // ------------------------------------------------------------------------------ layouts

    #[test]
    fn resolve_layout() {
        let io = io();
        let amd64 = io.resolve(&fixture("amd64"), &Platform::default()).unwrap();
        assert_eq!(amd64.manifest_digest.as_ref(), AMD64);
        assert_eq!(amd64.manifest_media_type, MEDIA_DOCKER_MANIFEST);
        assert_eq!(sha256_digest(&amd64.manifest_raw).as_ref(), AMD64);
        assert_eq!(amd64.config.digest().as_ref(), AMD64_CONFIG);
        assert_eq!(sha256_digest(&amd64.config_raw).as_ref(), AMD64_CONFIG);
        assert_eq!(amd64.config_raw.len() as u64, amd64.config.size());
        assert_eq!(amd64.layers.len(), 1);
        assert_eq!(amd64.layers[0].digest().as_ref(), AMD64_LAYER);
        assert_eq!(amd64.layers[0].size(), 2457);
        assert_eq!(
            amd64.layers[0].media_type().as_ref(),
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        );
        assert_eq!(amd64.manifest_raw.len(), 525);

        // The manifest list, linux/amd64: the same manifest.
        let list = io
            .resolve(&fixture("docker-list"), &Platform::default())
            .unwrap();
        assert_eq!(list.manifest_digest.as_ref(), AMD64);
        assert_eq!(list.manifest_raw, amd64.manifest_raw);
        assert_eq!(list.layers, amd64.layers);
        let arm64 = io
            .resolve(&fixture("docker-list"), &"linux/arm64".parse().unwrap())
            .unwrap();
        assert_eq!(arm64.manifest_digest.as_ref(), ARM64);
        let e = err_text(
            io.resolve(&fixture("docker-list"), &"linux/sparc64".parse().unwrap())
                .unwrap_err(),
        );
        assert!(
            e.contains("no linux/sparc64 image") && e.contains("linux/amd64"),
            "{e}"
        );

        // By digest: listed in index.json, or reachable only through the list.
        let by_digest = ImageRef::parse(&format!("oci:{FIXTURE}@{AMD64}")).unwrap();
        assert_eq!(
            io.resolve(&by_digest, &Platform::default())
                .unwrap()
                .manifest_digest
                .as_ref(),
            AMD64
        );

        // The converted OverlayBD image: an OCI manifest with annotated layers.
        let obd = io
            .resolve(&fixture("amd64-converted"), &Platform::default())
            .unwrap();
        assert_eq!(obd.manifest_digest.as_ref(), CONVERTED);
        assert_eq!(obd.manifest_media_type, MEDIA_OCI_MANIFEST);
        assert_eq!(obd.layers[0].digest().as_ref(), CONVERTED_LAYER);
        assert_eq!(obd.layers[0].size(), 642560);
        let ann = obd.layers[0].annotations().as_ref().unwrap();
        assert_eq!(ann["containerd.io/snapshot/overlaybd/version"], "0.1.0");

        // Errors name what is missing.
        let e = err_text(
            io.resolve(&fixture("no-such-tag"), &Platform::default())
                .unwrap_err(),
        );
        assert!(
            e.contains("\"no-such-tag\"") && e.contains("amd64-converted"),
            "{e}"
        );
        let e = err_text(
            io.resolve(
                &ImageRef::parse(&format!("oci:{FIXTURE}")).unwrap(),
                &Platform::default(),
            )
            .unwrap_err(),
        );
        assert!(e.contains("oci:DIR:TAG"), "{e}");
        let e = err_text(
            io.resolve(
                &ImageRef::parse("oci:/nonexistent/layout:x").unwrap(),
                &Platform::default(),
            )
            .unwrap_err(),
        );
        assert!(e.contains("/nonexistent/layout/index.json"), "{e}");
    }

    #[test]
    fn fetch_blob_from_layout() {
        let io = io();
        let img = io.resolve(&fixture("amd64"), &Platform::default()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("sub/layer.tar.gz");
        io.fetch_blob(&img.reference, &img.layers[0], &dest)
            .unwrap();
        assert_eq!(sha256_file(&dest), AMD64_LAYER);

        // A corrupted copy of the layout: a flipped byte in the layer, same size.
        let bad = tmp.path().join("bad");
        copy_dir(Path::new(FIXTURE), &bad);
        let blob = bad.join("blobs/sha256").join(&AMD64_LAYER[7..]);
        let mut bytes = fs::read(&blob).unwrap();
        bytes[100] ^= 0x01;
        fs::write(&blob, &bytes).unwrap();
        let bad_ref = ImageRef::parse(&format!("oci:{}:amd64", bad.display())).unwrap();
        let dest2 = tmp.path().join("bad-layer");
        let e = err_text(io.fetch_blob(&bad_ref, &img.layers[0], &dest2).unwrap_err());
        assert!(
            e.contains(AMD64_LAYER) && e.contains("digest mismatch"),
            "{e}"
        );
        assert!(e.contains(&blob.display().to_string()), "{e}");
        assert!(!dest2.exists(), "a failed download leaves no file");
        // The earlier download is not touched by a failed one over it.
        let e = err_text(io.fetch_blob(&bad_ref, &img.layers[0], &dest).unwrap_err());
        assert!(e.contains(AMD64_LAYER), "{e}");
        assert_eq!(sha256_file(&dest), AMD64_LAYER);

        // Truncated: the size is wrong.
        fs::write(&blob, &bytes[..1000]).unwrap();
        let e = err_text(io.fetch_blob(&bad_ref, &img.layers[0], &dest2).unwrap_err());
        assert!(e.contains(AMD64_LAYER) && e.contains("1000 bytes"), "{e}");

        // A corrupted config fails the resolve, naming it.
        let config = bad.join("blobs/sha256").join(&AMD64_CONFIG[7..]);
        let mut c = fs::read(&config).unwrap();
        c[10] ^= 0x20;
        fs::write(&config, &c).unwrap();
        let e = err_text(io.resolve(&bad_ref, &Platform::default()).unwrap_err());
        assert!(
            e.contains(AMD64_CONFIG) && e.contains("digest mismatch"),
            "{e}"
        );

        // Leftover temporary files: none.
        let names: Vec<_> = fs::read_dir(tmp.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("layer.tar.gz")]);
    }

    /// Downloads `img`'s layers into `dir`; returns them as files to write.
    fn download_layers(io: &ImageIo, img: &ResolvedImage, dir: &Path) -> Vec<LayerFile> {
        img.layers
            .iter()
            .map(|l| {
                let path = dir.join(l.digest().digest());
                io.fetch_blob(&img.reference, l, &path).unwrap();
                LayerFile {
                    descriptor: l.clone(),
                    path,
                }
            })
            .collect()
    }

    fn to_write<'a>(img: &'a ResolvedImage, layers: &'a [LayerFile]) -> ImageToWrite<'a> {
        ImageToWrite {
            layers,
            config: &img.config_raw,
            manifest: &img.manifest_raw,
            manifest_media_type: &img.manifest_media_type,
        }
    }

    fn index_entries(dir: &Path) -> Vec<serde_json::Value> {
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
        v["manifests"].as_array().unwrap().clone()
    }

    #[test]
    fn layout_round_trip() {
        let io = io();
        let tmp = tempfile::tempdir().unwrap();
        let src = io.resolve(&fixture("amd64"), &Platform::default()).unwrap();
        let layers = download_layers(&io, &src, tmp.path());
        let out = tmp.path().join("out");
        let dst = ImageRef::parse(&format!("oci:{}:v1", out.display())).unwrap();
        let desc = io.write_image(&dst, &to_write(&src, &layers)).unwrap();
        assert_eq!(desc.digest().as_ref(), AMD64);
        assert_eq!(desc.size(), 525);
        assert_eq!(
            fs::read_to_string(out.join("oci-layout")).unwrap(),
            r#"{"imageLayoutVersion":"1.0.0"}"#
        );
        let entries = index_entries(&out);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0]["digest"], AMD64);
        assert_eq!(entries[0]["mediaType"], MEDIA_DOCKER_MANIFEST);
        assert_eq!(entries[0]["annotations"][ANNOTATION_REF_NAME], "v1");
        assert_eq!(entries[0]["platform"]["architecture"], "amd64");
        assert_eq!(entries[0]["platform"]["os"], "linux");

        {
            use std::os::unix::fs::PermissionsExt as _;
            for f in [
                out.join("index.json"),
                out.join("blobs/sha256").join(&AMD64_LAYER[7..]),
            ] {
                let mode = fs::metadata(&f).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o644, "{}", f.display());
            }
        }

        let back = io.resolve(&dst, &Platform::default()).unwrap();
        assert_eq!(back.manifest_digest, src.manifest_digest);
        assert_eq!(back.manifest_raw, src.manifest_raw);
        assert_eq!(back.config_raw, src.config_raw);
        assert_eq!(back.layers, src.layers);
        let again = tmp.path().join("again");
        io.fetch_blob(&dst, &back.layers[0], &again).unwrap();
        assert_eq!(sha256_file(&again), AMD64_LAYER);

        // A second tag, then the first tag re-written with another image: replaced.
        let dst2 = ImageRef::parse(&format!("oci:{}:v2", out.display())).unwrap();
        io.write_image(&dst2, &to_write(&src, &layers)).unwrap();
        let obd = io
            .resolve(&fixture("amd64-converted"), &Platform::default())
            .unwrap();
        let obd_layers = download_layers(&io, &obd, tmp.path());
        io.write_image(&dst, &to_write(&obd, &obd_layers)).unwrap();
        let entries = index_entries(&out);
        let tagged = |t: &str| -> Vec<&serde_json::Value> {
            entries
                .iter()
                .filter(|e| e["annotations"][ANNOTATION_REF_NAME] == t)
                .collect()
        };
        assert_eq!(entries.len(), 2);
        assert_eq!(tagged("v1").len(), 1);
        assert_eq!(tagged("v1")[0]["digest"], CONVERTED);
        assert_eq!(tagged("v2")[0]["digest"], AMD64);
        assert_eq!(
            io.resolve(&dst, &Platform::default())
                .unwrap()
                .manifest_digest
                .as_ref(),
            CONVERTED
        );
        assert_eq!(
            io.resolve(&dst2, &Platform::default())
                .unwrap()
                .manifest_digest
                .as_ref(),
            AMD64
        );

        // Blobs already in the layout need not be given again.
        let dst3 = ImageRef::parse(&format!("oci:{}:v3", out.display())).unwrap();
        io.write_image(&dst3, &to_write(&src, &[])).unwrap();

        // No temporary files left behind.
        let mut names: Vec<String> = fs::read_dir(out.join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut want: Vec<String> = [AMD64, AMD64_CONFIG, AMD64_LAYER, CONVERTED, CONVERTED_LAYER]
            .iter()
            .map(|d| d[7..].to_owned())
            .chain([obd.config.digest().digest().to_owned()])
            .collect();
        want.sort();
        assert_eq!(names, want);
        let top: Vec<String> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(top.is_empty(), "{top:?}");
    }

    #[test]
    fn layout_write_errors() {
        let io = io();
        let tmp = tempfile::tempdir().unwrap();
        let src = io.resolve(&fixture("amd64"), &Platform::default()).unwrap();
        let layers = download_layers(&io, &src, tmp.path());
        let out = tmp.path().join("out");
        let dst = ImageRef::parse(&format!("oci:{}:v1", out.display())).unwrap();

        // A missing layer: nothing is written (no index.json).
        let e = err_text(io.write_image(&dst, &to_write(&src, &[])).unwrap_err());
        assert!(
            e.contains(AMD64_LAYER) && e.contains("neither given"),
            "{e}"
        );
        assert!(!out.join("index.json").exists());

        // No tag.
        let no_tag = ImageRef::parse(&format!("oci:{}", out.display())).unwrap();
        let e = err_text(
            io.write_image(&no_tag, &to_write(&src, &layers))
                .unwrap_err(),
        );
        assert!(e.contains("needs a tag"), "{e}");

        // The wrong config, the wrong media type, a layer file of the wrong content.
        let mut img = to_write(&src, &layers);
        img.config = b"{}";
        let e = err_text(io.write_image(&dst, &img).unwrap_err());
        assert!(e.contains("not the manifest's"), "{e}");
        let mut img = to_write(&src, &layers);
        img.manifest_media_type = MEDIA_OCI_MANIFEST;
        let e = err_text(io.write_image(&dst, &img).unwrap_err());
        assert!(e.contains("says it is"), "{e}");
        let mut bytes = fs::read(&layers[0].path).unwrap();
        bytes[7] ^= 0xff;
        let wrong = tmp.path().join("wrong");
        fs::write(&wrong, &bytes).unwrap();
        let wrong_layers = [LayerFile {
            descriptor: layers[0].descriptor.clone(),
            path: wrong.clone(),
        }];
        let e = err_text(
            io.write_image(&dst, &to_write(&src, &wrong_layers))
                .unwrap_err(),
        );
        assert!(
            e.contains(AMD64_LAYER) && e.contains(&wrong.display().to_string()),
            "{e}"
        );
        assert!(!out.join("blobs/sha256").join(&AMD64_LAYER[7..]).exists());
        assert!(!out.join("index.json").exists());
    }

    // ---------------------------------------------------------------------------- registries

    fn registry_ref(addr: &str, name: &str) -> ImageRef {
        ImageRef::parse(&format!("{addr}/{name}")).unwrap()
    }

    #[test]
    fn registry_push_pull_round_trip() {
        let reg = start_registry("");
        let io = io();
        let tmp = tempfile::tempdir().unwrap();
        let src = io.resolve(&fixture("amd64"), &Platform::default()).unwrap();
        let layers = download_layers(&io, &src, tmp.path());

        // A layer neither given nor in the registry: nothing is pushed, not even a blob.
        let dst = registry_ref(&reg.addr, "hello-world:amd64");
        let e = err_text(io.write_image(&dst, &to_write(&src, &[])).unwrap_err());
        assert!(
            e.contains(AMD64_LAYER) && e.contains("neither given"),
            "{e}"
        );
        assert_eq!(
            http_status(&reg.addr, &format!("/v2/hello-world/blobs/{AMD64_CONFIG}")),
            Some(404)
        );
        assert!(io.resolve(&dst, &Platform::default()).is_err());

        let desc = io.write_image(&dst, &to_write(&src, &layers)).unwrap();
        assert_eq!(desc.digest().as_ref(), AMD64);
        let back = io.resolve(&dst, &Platform::default()).unwrap();
        assert_eq!(back.manifest_digest.as_ref(), AMD64);
        assert_eq!(back.manifest_media_type, MEDIA_DOCKER_MANIFEST);
        assert_eq!(back.manifest_raw, src.manifest_raw);
        assert_eq!(back.config_raw, src.config_raw);
        assert_eq!(back.layers, src.layers);
        let got = tmp.path().join("pulled");
        io.fetch_blob(&dst, &back.layers[0], &got).unwrap();
        assert_eq!(sha256_file(&got), AMD64_LAYER);

        // Blobs there already are not needed again; by digest works too.
        let dst2 = registry_ref(&reg.addr, "hello-world:again");
        io.write_image(&dst2, &to_write(&src, &[])).unwrap();
        let by_digest = registry_ref(&reg.addr, &format!("hello-world@{AMD64}"));
        assert_eq!(
            io.resolve(&by_digest, &Platform::default())
                .unwrap()
                .manifest_digest
                .as_ref(),
            AMD64
        );

        // The OverlayBD image (OCI media types, annotations) round trips as well.
        let obd = io
            .resolve(&fixture("amd64-converted"), &Platform::default())
            .unwrap();
        let obd_layers = download_layers(&io, &obd, tmp.path());
        let dst3 = registry_ref(&reg.addr, "hello-world:obd");
        io.write_image(&dst3, &to_write(&obd, &obd_layers)).unwrap();
        let back = io.resolve(&dst3, &Platform::default()).unwrap();
        assert_eq!(back.manifest_digest.as_ref(), CONVERTED);
        assert_eq!(back.manifest_media_type, MEDIA_OCI_MANIFEST);
        assert_eq!(back.layers, obd.layers);
        io.fetch_blob(&dst3, &back.layers[0], &got).unwrap();
        assert_eq!(sha256_file(&got), CONVERTED_LAYER);

        // Errors: an unknown tag; a descriptor with the wrong size.
        let e = err_text(
            io.resolve(
                &registry_ref(&reg.addr, "hello-world:nope"),
                &Platform::default(),
            )
            .unwrap_err(),
        );
        assert!(
            e.contains("hello-world:nope") && e.contains("manifest unknown"),
            "{e}"
        );
        let mut wrong = back.layers[0].clone();
        wrong.set_size(back.layers[0].size() - 1);
        let e = err_text(
            io.fetch_blob(&dst3, &wrong, &tmp.path().join("x"))
                .unwrap_err(),
        );
        assert!(
            e.contains(CONVERTED_LAYER) && e.contains("registry") && e.contains("642559 bytes"),
            "{e}"
        );
        assert!(!tmp.path().join("x").exists());
    }

    /// htpasswd: the registry answers with a `Basic` challenge; the credentials come from a
    /// docker config.json.
    #[test]
    fn registry_basic_auth() {
        // bcrypt of "ovbd-test-pass" (cost 4).
        const HASH: &str = "$2b$04$mZwH7wGeEVlhyQEKuXlAQu/wM/RzhODQOto7p4KjrEKXtv6/P1hL.";
        let pwdir = tempfile::tempdir().unwrap();
        let htpasswd = pwdir.path().join("htpasswd");
        fs::write(&htpasswd, format!("ovbd:{HASH}\n")).unwrap();
        let reg = start_registry(&format!(
            "auth:\n  htpasswd:\n    realm: ovbd-test\n    path: {}\n",
            htpasswd.display()
        ));
        assert_eq!(http_status(&reg.addr, "/v2/"), Some(401));

        let tmp = tempfile::tempdir().unwrap();
        let src = io()
            .resolve(&fixture("amd64"), &Platform::default())
            .unwrap();
        let layers = download_layers(&io(), &src, tmp.path());
        let dst = registry_ref(&reg.addr, "private/hello:v1");

        let write_config = |user: &str, pass: &str| {
            let path = tmp.path().join(format!("config-{pass}.json"));
            let config = serde_json::json!({
                "auths": { (reg.addr.clone()): { "username": user, "password": pass } }
            });
            fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
            ImageIo::new(RegistryOptions {
                docker_config: Some(path),
                ..Default::default()
            })
            .unwrap()
        };
        let anonymous = ImageIo::new(RegistryOptions {
            docker_config: Some(tmp.path().join("absent.json")),
            ..Default::default()
        })
        .unwrap();
        let e = err_text(
            anonymous
                .write_image(&dst, &to_write(&src, &layers))
                .unwrap_err(),
        );
        assert!(e.contains("401") && e.contains(AMD64_LAYER), "{e}");
        let wrong = write_config("ovbd", "wrong");
        let e = err_text(
            wrong
                .write_image(&dst, &to_write(&src, &layers))
                .unwrap_err(),
        );
        assert!(e.contains("401"), "{e}");

        let authed = write_config("ovbd", "ovbd-test-pass");
        authed.write_image(&dst, &to_write(&src, &layers)).unwrap();
        let back = authed.resolve(&dst, &Platform::default()).unwrap();
        assert_eq!(back.manifest_digest.as_ref(), AMD64);
        let got = tmp.path().join("pulled");
        authed.fetch_blob(&dst, &back.layers[0], &got).unwrap();
        assert_eq!(sha256_file(&got), AMD64_LAYER);
        let e = err_text(anonymous.resolve(&dst, &Platform::default()).unwrap_err());
        assert!(
            e.contains("wants Basic credentials") && e.contains("private/hello:v1"),
            "{e}"
        );
    }

    /// Token auth: a registry stand-in answering with a `Bearer` challenge, and its token
    /// endpoint, which wants the config.json's credentials.
    #[test]
    fn registry_bearer_token_auth() {
        use base64::Engine as _;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
        );
        let scopes = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
        let blobs = Path::new(FIXTURE).join("blobs/sha256");
        {
            let addr = addr.clone();
            let scopes = scopes.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let _ = serve_mock(conn, &addr, &basic, &blobs, &scopes);
                }
            });
        }
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("config.json");
        fs::write(
            &config,
            serde_json::to_vec(&serde_json::json!({
                "auths": { (format!("http://{addr}")): { "username": "alice", "password": "s3cret" } }
            }))
            .unwrap(),
        )
        .unwrap();
        let io = ImageIo::new(RegistryOptions {
            docker_config: Some(config),
            ..Default::default()
        })
        .unwrap();
        let r = registry_ref(&addr, "hello:v1");
        let img = io.resolve(&r, &Platform::default()).unwrap();
        assert_eq!(img.manifest_digest.as_ref(), AMD64);
        assert_eq!(img.config.digest().as_ref(), AMD64_CONFIG);
        let got = tmp.path().join("layer");
        io.fetch_blob(&r, &img.layers[0], &got).unwrap();
        assert_eq!(sha256_file(&got), AMD64_LAYER);
        // Content that is not what its digest says: an error naming the blob and the registry.
        let corrupt = Descriptor::new(MediaType::ImageLayer, 7, CORRUPT.parse::<Digest>().unwrap());
        let bad = tmp.path().join("corrupt");
        let e = err_text(io.fetch_blob(&r, &corrupt, &bad).unwrap_err());
        assert!(e.contains(CORRUPT) && e.contains(&addr), "{e}");
        assert!(!bad.exists());
        let scopes = scopes.lock().unwrap().clone();
        assert!(
            !scopes.is_empty() && scopes.iter().all(|s| s == "repository:hello:pull"),
            "{scopes:?}"
        );

        // Without the credentials the token endpoint refuses: the pull fails.
        let anonymous = ImageIo::new(RegistryOptions {
            docker_config: Some(tmp.path().join("absent.json")),
            ..Default::default()
        })
        .unwrap();
        let e = err_text(anonymous.resolve(&r, &Platform::default()).unwrap_err());
        assert!(
            e.contains("token from") && e.contains("401") && e.contains("hello:v1"),
            "{e}"
        );
    }

    /// A blob the mock registry serves with other content ("corrupt").
    const CORRUPT: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    /// One request of the mock registry (`Connection: close`).
    fn serve_mock(
        mut conn: TcpStream,
        addr: &str,
        basic: &str,
        blobs: &Path,
        scopes: &Mutex<Vec<String>>,
    ) -> std::io::Result<()> {
        const TOKEN: &str = "Bearer tok-123";
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut request = String::new();
        reader.read_line(&mut request)?;
        let mut authz = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("authorization") {
                    authz = v.trim().to_owned();
                }
            }
        }
        let mut parts = request.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let challenge =
            format!("WWW-Authenticate: Bearer realm=\"http://{addr}/token\",service=\"mock\"\r\n");
        let respond = |conn: &mut TcpStream, status: &str, headers: &str, body: &[u8]| {
            write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
                body.len()
            )?;
            if method != "HEAD" {
                conn.write_all(body)?;
            }
            conn.flush()
        };
        if path == "/token" {
            for kv in query.split('&') {
                if let Some(scope) = kv.strip_prefix("scope=") {
                    let scope = scope.replace("%3A", ":").replace("%3a", ":");
                    scopes.lock().unwrap().push(scope);
                }
            }
            return if authz == basic {
                respond(
                    &mut conn,
                    "200 OK",
                    "Content-Type: application/json\r\n",
                    br#"{"token":"tok-123"}"#,
                )
            } else {
                respond(&mut conn, "401 Unauthorized", "", b"")
            };
        }
        if authz != TOKEN {
            return respond(&mut conn, "401 Unauthorized", &challenge, b"");
        }
        if path == "/v2/" {
            return respond(&mut conn, "200 OK", "", b"");
        }
        if path == "/v2/hello/manifests/v1" || path == format!("/v2/hello/manifests/{AMD64}") {
            let body = fs::read(blobs.join(&AMD64[7..]))?;
            let headers = format!(
                "Content-Type: {MEDIA_DOCKER_MANIFEST}\r\nDocker-Content-Digest: {AMD64}\r\n"
            );
            return respond(&mut conn, "200 OK", &headers, &body);
        }
        if path == format!("/v2/hello/blobs/{CORRUPT}") {
            return respond(&mut conn, "200 OK", "", b"corrupt");
        }
        if let Some(digest) = path.strip_prefix("/v2/hello/blobs/sha256:") {
            if digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                if let Ok(body) = fs::read(blobs.join(digest)) {
                    return respond(&mut conn, "200 OK", "", &body);
                }
            }
        }
        respond(&mut conn, "404 Not Found", "", b"")
    }
}
