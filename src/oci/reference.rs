//! Image references (`oci:DIR[:TAG|@DIGEST]` or a registry reference) and platforms.

use super::*;

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

pub(super) fn parse_layout_ref(rest: &str) -> Result<ImageRef> {
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

pub(super) fn valid_tag(tag: &str) -> bool {
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

pub(super) fn normalize_arch(arch: &str, variant: Option<&str>) -> (String, Option<String>) {
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

pub(super) fn describe_platform(d: &Descriptor) -> String {
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

pub(super) fn pick_platform<'a>(
    index: &'a ImageIndex,
    platform: &Platform,
) -> Option<&'a Descriptor> {
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
