//! Manifests and blobs checked: media types, the image to write (`Plan`), digests and sizes
//! of blobs as they pass (`BlobCheck`).

use super::*;

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> Digest {
    digest_from_hasher(Sha256::new_with_prefix(data))
}

pub(super) fn digest_from_hasher(h: Sha256) -> Digest {
    // 64 lowercase hex digits always make a valid sha256 digest.
    Digest::try_from(digest::digest_of_hashed(h)).expect("a sha256 digest")
}

// ------------------------------------------------------------------------------ blob checking

/// Hashes and counts a blob's bytes as they pass; says which blob and where it came from when
/// they do not match its descriptor.
pub(super) struct BlobCheck {
    pub(super) digest: Digest,
    pub(super) size: u64,
    pub(super) from: String,
    pub(super) hasher: Sha256,
    pub(super) seen: u64,
}

impl BlobCheck {
    pub(super) fn new(desc: &Descriptor, from: String) -> Result<Self> {
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

    pub(super) fn update(&mut self, chunk: &[u8]) -> Result<()> {
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

    pub(super) fn finish(self) -> Result<()> {
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

pub(super) fn copy_checked(
    mut src: impl Read,
    dst: &mut impl Write,
    check: &mut BlobCheck,
) -> Result<()> {
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

pub(super) fn is_index(media: &str) -> bool {
    media == MEDIA_OCI_INDEX || media == MEDIA_DOCKER_LIST
}

/// A manifest's media type: its own `mediaType` field, else the descriptor's, else its shape
/// (`manifests` makes an OCI index, anything else an OCI manifest).
pub(super) fn manifest_media_type(raw: &[u8], hint: Option<&str>) -> Result<String> {
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
pub(super) struct Plan<'a> {
    pub(super) manifest: ImageManifest,
    pub(super) descriptor: Descriptor,
    pub(super) files: HashMap<&'a str, &'a Path>,
}

pub(super) fn check_image<'a>(img: &ImageToWrite<'a>) -> Result<Plan<'a>> {
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
pub(super) fn platform_of_config(config: &[u8]) -> Option<oci_spec::image::Platform> {
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
