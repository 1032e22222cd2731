//! OCI image layouts: reading entries and blobs, writing blobs, `oci-layout` and `index.json`
//! atomically.

use super::*;

// ---------------------------------------------------------------------------------- OCI layouts

pub(super) fn blob_path(layout: &Path, digest: &Digest) -> Result<PathBuf> {
    ensure!(
        *digest.algorithm() == DigestAlgorithm::Sha256,
        "blob {digest}: only sha256 digests are supported"
    );
    // Digest parsing checked the hex part: 64 lowercase hex digits, no path separators.
    Ok(layout.join("blobs").join("sha256").join(digest.digest()))
}

/// A blob of a layout read into memory (at most `max` bytes), digest and size checked.
pub(super) fn read_layout_blob(
    layout: &Path,
    desc: &Descriptor,
    max: u64,
    what: &str,
) -> Result<Vec<u8>> {
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
pub(super) fn read_index(layout: &Path) -> Result<ImageIndex> {
    let path = layout.join("index.json");
    let text = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The manifest or index an `oci:` reference names: (bytes, digest, media type from index.json).
pub(super) fn layout_root(
    dir: &Path,
    target: &LayoutTarget,
) -> Result<(Vec<u8>, Digest, Option<String>)> {
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

/// Writes `bytes` to `path` through a synced temporary file in the same directory and a rename.
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = temp_in(path.parent().unwrap_or(Path::new(".")))?;
    tmp.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    commit_temp(tmp, path)
}

/// A temporary file in `dir` (hidden, removed when dropped), mode 0644 like a file made
/// under the usual umask rather than tempfile's 0600.
pub(super) fn temp_in(dir: &Path) -> Result<tempfile::NamedTempFile> {
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
pub(super) fn commit_temp(tmp: tempfile::NamedTempFile, dest: &Path) -> Result<()> {
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
pub(super) fn layout_has_blob(layout: &Path, desc: &Descriptor) -> Result<bool> {
    let path = blob_path(layout, desc.digest())?;
    Ok(fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == desc.size()))
}

pub(super) fn write_layout(
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
pub(super) fn update_index(dir: &Path, tag: &str, entry: &Descriptor) -> Result<()> {
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
