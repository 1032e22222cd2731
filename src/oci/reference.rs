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
        let reference =
            parse_registry_ref(name).map_err(|e| anyhow!("image reference {s:?}: {e}"))?;
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

/// A registry reference, `[DOMAIN[:PORT]/]PATH[:TAG][@DIGEST]`, by the grammar of
/// distribution's `reference` package (ASCII, as Docker reads it), split as oci-spec splits
/// it. Not oci-spec's own parser: its first use compiles a regex with 128 Unicode `\w`
/// classes, 50 ms of every `ovbd rpull` and of a daemon's first lazy pull.
pub(crate) fn parse_registry_ref(s: &str) -> std::result::Result<Reference, String> {
    let (rest, digest) = match s.split_once('@') {
        Some((rest, d)) => {
            check_digest(d)?;
            (rest, Some(d))
        }
        None => (s, None),
    };
    // A ':' after the last '/' starts the tag; one before it is a port.
    let (name, tag) = match rest.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => {
            if !valid_tag(tag) {
                return Err(format!(
                    "bad tag {tag:?} (want [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})"
                ));
            }
            (name, Some(tag))
        }
        _ => (rest, None),
    };
    if !valid_name(name) {
        return Err(format!(
            "bad name {name:?} (want [DOMAIN[:PORT]/]PATH, PATH lowercase components \
             like a, a.b, a_b, a__b or a-b joined by /)"
        ));
    }
    let (registry, repository) = split_domain(name);
    if repository.len() > 255 {
        return Err(format!("repository name {repository:?} is longer than 255"));
    }
    let (registry, repository) = (registry.to_owned(), repository.into_owned());
    Ok(match (tag, digest) {
        (Some(t), Some(d)) => {
            Reference::with_tag_and_digest(registry, repository, t.to_owned(), d.to_owned())
        }
        (None, Some(d)) => Reference::with_digest(registry, repository, d.to_owned()),
        (t, None) => Reference::with_tag(registry, repository, t.unwrap_or("latest").to_owned()),
    })
}

/// `ALGORITHM:HEX`: sha256, sha384 or sha512 with as many hex digits as the hash has.
fn check_digest(d: &str) -> std::result::Result<(), String> {
    let bad = || format!("bad digest {d:?}");
    let (algorithm, hex) = d.split_once(':').ok_or_else(bad)?;
    let alg_ok = !algorithm.is_empty()
        && algorithm.split(['-', '_', '+', '.']).all(|c| {
            c.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
                && c.bytes().all(|b| b.is_ascii_alphanumeric())
        });
    if !alg_ok || hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let want = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err(format!("{d:?}: unsupported digest algorithm")),
    };
    if hex.len() != want {
        return Err(format!("{d:?}: a {algorithm} digest has {want} hex digits"));
    }
    Ok(())
}

/// `[DOMAIN[:PORT]/]COMPONENT(/COMPONENT)*`.
fn valid_name(name: &str) -> bool {
    let mut parts = name.split('/');
    let first = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    let path_ok = |c: &[&str]| c.iter().all(|p| valid_path_component(p));
    (valid_path_component(first) && path_ok(&rest))
        || (!rest.is_empty() && valid_domain(first) && path_ok(&rest))
}

/// `[a-z0-9]+` runs joined by one of `.`, `_`, `__` or any number of `-`.
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let lower = |x: &u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !b.first().is_some_and(lower) || !b.last().is_some_and(lower) {
        return false;
    }
    let mut sep = String::new();
    for &x in b {
        if lower(&x) {
            let ok = sep.is_empty()
                || sep == "."
                || sep == "_"
                || sep == "__"
                || sep.bytes().all(|y| y == b'-');
            if !ok {
                return false;
            }
            sep.clear();
        } else if matches!(x, b'.' | b'_' | b'-') {
            sep.push(x as char);
        } else {
            return false;
        }
    }
    true
}

/// Host name labels (`[a-zA-Z0-9]`, `-` inside) joined by dots, then maybe `:PORT`.
fn valid_domain(d: &str) -> bool {
    let (host, port) = match d.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    let label_ok = |l: &str| {
        let b = l.as_bytes();
        b.first().is_some_and(u8::is_ascii_alphanumeric)
            && b.last().is_some_and(u8::is_ascii_alphanumeric)
            && b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-')
    };
    host.split('.').all(label_ok)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|x| x.is_ascii_digit()))
}

/// Registry and repository of a valid name, as Docker (and oci-spec) split it: the first
/// component is a host if it has a `.` or `:` or is `localhost`; Docker Hub's official
/// images are `library/`.
fn split_domain(name: &str) -> (&str, std::borrow::Cow<'_, str>) {
    let (domain, remainder) = match name.split_once('/') {
        Some((left, right)) if left.contains(['.', ':']) || left == "localhost" => (left, right),
        _ => ("docker.io", name),
    };
    let domain = if domain == "index.docker.io" {
        "docker.io"
    } else {
        domain
    };
    if domain == "docker.io" && !remainder.contains('/') {
        (domain, format!("library/{remainder}").into())
    } else {
        (domain, remainder.into())
    }
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
