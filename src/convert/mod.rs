//! `ovbd convert SRC DST`: an OCI/Docker image to an OverlayBD image, layer by layer.
//!
//! Each source layer is applied onto an ext4 held in a new sparse RW layer stacked over the
//! layers converted so far (ext4 is made once, for the bottom layer), then committed compact
//! and packaged as ZFile + PAX tar, as upstream's userspace converter does. ext4 is written in
//! user space (libext2fs), so no block device or root is needed and the output is a function
//! of the input: times come from the image config's `created`, the ext4 UUID and hash seed
//! from the first chain ID, and allocation from the order of the tar entries.

pub(crate) mod apply;
mod cgroup;
pub(crate) mod layer;
pub mod record;

use crate::extfs::MkfsParams;
use crate::labels::{LABEL_BLOB_DIGEST, LABEL_BLOB_SIZE, LABEL_VERSION};
use crate::oci::digest::{chain_ids, digest_of, digest_of_hashed};
use crate::oci::{
    ImageIo, ImageRef, ImageToWrite, LayerFile, Platform, RegistryOptions, ResolvedImage,
    MEDIA_OCI_MANIFEST,
};
use anyhow::{anyhow, bail, Context, Result};
use oci_spec::image::{Descriptor, Digest, MediaType};
use ovbd_format::lsmt::{uuid_from_chain_id, NIL_UUID};
use ovbd_format::zfile::ZFileOptions;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::PathBuf;
use std::time::Instant;

pub const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

pub struct ConvertOptions {
    pub vsize: u64,
    pub zfile: ZFileOptions,
    pub platform: Platform,
    pub registry: RegistryOptions,
    /// Scratch space (one uncompressed copy of every converted layer); default: `$TMPDIR`.
    pub workdir: Option<PathBuf>,
    /// A priority list (upstream's prefetch file list) pushed as an acceleration layer on top.
    pub priority_list: Option<PathBuf>,
}

/// What a conversion produced, for `--json`.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub source: String,
    pub source_manifest: String,
    pub destination: String,
    pub manifest: String,
    pub config: String,
    pub layers: Vec<LayerSummary>,
    /// The digest of the acceleration layer `--priority-list` put on top.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acceleration_layer: Option<String>,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct LayerSummary {
    pub source_digest: String,
    pub source_size: u64,
    pub diff_id: String,
    pub digest: String,
    pub size: u64,
    pub entries: u64,
    pub file_bytes: u64,
    pub seconds: f64,
}

/// Reports progress: a bar per layer on a terminal, plain lines otherwise.
pub trait Progress {
    fn layer_start(&mut self, index: usize, count: usize, digest: &str, size: u64);
    fn layer_bytes(&mut self, read: u64);
    fn layer_done(&mut self, s: &LayerSummary);
}

/// A scratch directory named `prefix…` in `workdir` (default `$TMPDIR`), removed when dropped.
pub(crate) fn scratch_dir(
    workdir: Option<&std::path::Path>,
    prefix: &str,
) -> Result<tempfile::TempDir> {
    let b = tempfile::Builder::new().prefix(prefix).clone();
    match workdir {
        Some(d) => b.tempdir_in(d),
        None => b.tempdir(),
    }
    .with_context(|| {
        format!(
            "creating a scratch directory in {}",
            workdir.map_or("$TMPDIR".into(), |d| d.display().to_string())
        )
    })
}

/// The source image's config (to be rewritten), its diff_ids (one per layer, checked) and the
/// time it was created (0 if it does not say), from which the output's times come.
pub(crate) fn source_config(
    img: &ResolvedImage,
    src: &str,
) -> Result<(serde_json::Value, Vec<String>, i64)> {
    let config: serde_json::Value = serde_json::from_slice(&img.config_raw)
        .with_context(|| format!("image config {} is not JSON", img.config.digest()))?;
    let diff_ids: Vec<String> = config
        .pointer("/rootfs/diff_ids")
        .and_then(|v| v.as_array())
        .ok_or_else(|| {
            anyhow!(
                "image config {} has no rootfs.diff_ids",
                img.config.digest()
            )
        })?
        .iter()
        .map(|v| v.as_str().map(str::to_owned))
        .collect::<Option<_>>()
        .ok_or_else(|| {
            anyhow!(
                "image config {}: a diff_id is not a string",
                img.config.digest()
            )
        })?;
    if diff_ids.len() != img.layers.len() {
        bail!(
            "image {src}: {} layers but {} diff_ids in its config",
            img.layers.len(),
            diff_ids.len()
        );
    }
    if img.layers.is_empty() {
        bail!("image {src} has no layers");
    }
    let now = config
        .get("created")
        .and_then(|v| v.as_str())
        .and_then(parse_rfc3339)
        .unwrap_or(0);
    Ok((config, diff_ids, now))
}

pub fn convert(
    src: &str,
    dst: &str,
    opts: &ConvertOptions,
    progress: &mut dyn Progress,
) -> Result<Summary> {
    let started = Instant::now();
    // Checked before any work: a list upstream would not read is refused, not pushed.
    let priority_list = match &opts.priority_list {
        Some(p) => Some(read_priority_list(p)?),
        None => None,
    };
    let src_ref = ImageRef::parse(src)?;
    let dst_ref = ImageRef::parse(dst)?;
    let io = ImageIo::new(opts.registry.clone())?;
    let img = io.resolve(&src_ref, &opts.platform)?;
    let (mut config, diff_ids, now) = source_config(&img, src)?;
    let chain_ids = chain_ids(&diff_ids);
    let fs_uuid = fs_uuid(&chain_ids[0]);

    let work = scratch_dir(opts.workdir.as_deref(), "ovbd-convert-")?;

    let mut lowers: Vec<PathBuf> = Vec::new();
    let mut outputs: Vec<LayerFile> = Vec::new();
    let mut summaries: Vec<LayerSummary> = Vec::new();
    for (i, desc) in img.layers.iter().enumerate() {
        let t0 = Instant::now();
        let dir = work.path().join(format!("{i:04}"));
        // Not create_dir_all: after an interrupt removed the scratch, nothing may recreate it.
        std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        let src_blob = dir.join("source");
        io.fetch_blob(&src_ref, desc, &src_blob)?;
        progress.layer_start(i, img.layers.len(), desc.digest().as_ref(), desc.size());

        let job = layer::LayerJob {
            lowers: &lowers,
            dir: &dir,
            vsize: opts.vsize,
            uuid: uuid_from_chain_id(&chain_ids[i])?,
            parent_uuid: match i {
                0 => NIL_UUID.to_owned(),
                _ => uuid_from_chain_id(&chain_ids[i - 1])?,
            },
            mkfs: MkfsParams { uuid: fs_uuid, now },
            zfile: opts.zfile,
        };
        let (out, got) = {
            let file = std::fs::File::open(&src_blob)
                .with_context(|| format!("open {}", src_blob.display()))?;
            let counted = Counting {
                inner: file,
                read: 0,
                progress: &mut *progress,
            };
            let mut tar = Hashing {
                inner: decompress(BufReader::with_capacity(1 << 20, counted))
                    .with_context(|| format!("layer {}", desc.digest()))?,
                hasher: Sha256::new(),
            };
            let out = layer::convert_layer(&job, &mut tar)
                .with_context(|| format!("converting layer {} ({})", i + 1, desc.digest()))?;
            std::io::copy(&mut tar, &mut std::io::sink())
                .with_context(|| format!("reading layer {}", desc.digest()))?;
            (out, digest_of_hashed(tar.hasher))
        };
        if got != diff_ids[i] {
            bail!(
                "layer {} uncompresses to {got}, but the config's diff_id is {}",
                desc.digest(),
                diff_ids[i]
            );
        }
        std::fs::remove_file(&src_blob).ok();

        let (digest, size) = file_digest(&out.blob)?;
        let mut annotations = std::collections::HashMap::new();
        annotations.insert(LABEL_BLOB_DIGEST.to_owned(), digest.clone());
        annotations.insert(LABEL_BLOB_SIZE.to_owned(), size.to_string());
        annotations.insert(LABEL_VERSION.to_owned(), "0.1.0".to_owned());
        let mut d = Descriptor::new(MediaType::from(MEDIA_LAYER), size, parse_digest(&digest)?);
        d.set_annotations(Some(annotations));
        outputs.push(LayerFile {
            descriptor: d,
            path: out.blob,
        });
        let s = LayerSummary {
            source_digest: desc.digest().to_string(),
            source_size: desc.size(),
            diff_id: diff_ids[i].clone(),
            digest,
            size,
            entries: out.apply.entries,
            file_bytes: out.apply.file_bytes,
            seconds: t0.elapsed().as_secs_f64(),
        };
        progress.layer_done(&s);
        summaries.push(s);
        lowers.push(out.lsmt);
    }

    let mut accel_layer = None;
    if let Some(list) = &priority_list {
        let (file, digest, size, _) = acceleration_layer(work.path(), list, &mut config)?;
        outputs.push(file);
        accel_layer = Some((digest, size));
    }

    // The config: the source's, with the new layers as its diff_ids.
    let new_ids: Vec<serde_json::Value> = summaries
        .iter()
        .map(|s| s.digest.clone())
        .chain(accel_layer.iter().map(|(d, _)| d.clone()))
        .map(Into::into)
        .collect();
    *config
        .pointer_mut("/rootfs/diff_ids")
        .ok_or_else(|| anyhow!("image config lost rootfs.diff_ids"))? = new_ids.into();
    let config_raw = serde_json::to_vec(&config)?;
    let config_digest = digest_of(&config_raw);
    let manifest = Manifest {
        schema_version: 2,
        media_type: MEDIA_OCI_MANIFEST,
        config: ManifestDescriptor {
            media_type: MEDIA_CONFIG.to_owned(),
            digest: config_digest.clone(),
            size: config_raw.len() as u64,
            annotations: None,
        },
        layers: summaries
            .iter()
            .map(|s| ManifestDescriptor {
                media_type: MEDIA_LAYER.to_owned(),
                digest: s.digest.clone(),
                size: s.size,
                annotations: Some(BTreeMap::from([
                    (LABEL_BLOB_DIGEST.to_owned(), s.digest.clone()),
                    (LABEL_BLOB_SIZE.to_owned(), s.size.to_string()),
                    (LABEL_VERSION.to_owned(), "0.1.0".to_owned()),
                ])),
            })
            .chain(accel_layer.iter().map(|(digest, size)| ManifestDescriptor {
                media_type: MEDIA_LAYER.to_owned(),
                digest: digest.clone(),
                size: *size,
                annotations: Some(accel_annotations(digest, *size)),
            }))
            .collect(),
    };
    let manifest_raw = serde_json::to_vec(&manifest)?;
    let written = io.write_image(
        &dst_ref,
        &ImageToWrite {
            layers: &outputs,
            config: &config_raw,
            manifest: &manifest_raw,
            manifest_media_type: MEDIA_OCI_MANIFEST,
        },
    )?;
    Ok(Summary {
        source: src.to_owned(),
        source_manifest: img.manifest_digest.to_string(),
        destination: dst.to_owned(),
        manifest: written.digest().to_string(),
        config: config_digest,
        layers: summaries,
        acceleration_layer: accel_layer.map(|(d, _)| d),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Reads a priority list for `--priority-list`: one upstream reads (at most 64 KiB) naming at
/// least one path.
fn read_priority_list(path: &std::path::Path) -> Result<Vec<u8>> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let name = path.display().to_string();
    if ovbd_format::trace::is_binary_trace(&data) {
        bail!("{name} is a binary trace, not a priority list");
    }
    let entries = ovbd_format::trace::parse_priority_list(&data, &name)?;
    if entries.is_empty() {
        bail!("{name}: no path in the priority list (one absolute path a line)");
    }
    Ok(data)
}

/// The acceleration layer upstream's `ctr record-trace` pushes: an uncompressed tar of one
/// entry `trace`, mode 0444, owner 0, time 0 (so the same list gives the same blob).
pub(crate) fn acceleration_layer_tar(trace: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    // A fixed short name cannot fail.
    let _ = h.set_path("trace");
    h.set_mode(0o444);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(trace.len() as u64);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(trace);
    out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
    out
}

/// An acceleration layer holding `trace` (a binary trace or a priority list), written in `work`:
/// the file, its digest, size and annotations; `config` gets the history entry upstream's
/// record-trace adds in front (its `created` the source's, so the same input gives the same
/// image). The caller adds the digest to the config's diff_ids.
pub(crate) fn acceleration_layer(
    work: &std::path::Path,
    trace: &[u8],
    config: &mut serde_json::Value,
) -> Result<(LayerFile, String, u64, BTreeMap<String, String>)> {
    let path = work.join("acceleration.tar");
    std::fs::write(&path, acceleration_layer_tar(trace))
        .with_context(|| format!("writing {}", path.display()))?;
    let (digest, size) = file_digest(&path)?;
    let annotations = accel_annotations(&digest, size);
    let mut d = Descriptor::new(MediaType::from(MEDIA_LAYER), size, parse_digest(&digest)?);
    d.set_annotations(Some(annotations.clone().into_iter().collect()));
    let entry = serde_json::json!({
        "created": config.get("created").cloned().unwrap_or(serde_json::Value::Null),
        "created_by": "Acceleration Layer",
    });
    if let Some(h) = config.get_mut("history").and_then(|h| h.as_array_mut()) {
        h.insert(0, entry);
    }
    Ok((
        LayerFile {
            descriptor: d,
            path,
        },
        digest,
        size,
        annotations,
    ))
}

/// The annotations of an acceleration layer (upstream's, for the snapshotter to see it).
fn accel_annotations(digest: &str, size: u64) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_BLOB_DIGEST.to_owned(), digest.to_owned()),
        (LABEL_BLOB_SIZE.to_owned(), size.to_string()),
        (LABEL_VERSION.to_owned(), "0.1.0".to_owned()),
        (
            crate::labels::LABEL_ACCELERATION_LAYER.to_owned(),
            "yes".to_owned(),
        ),
    ])
}

/// The manifest as upstream writes it, field order fixed so the same image gives the same
/// bytes.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    media_type: &'static str,
    config: ManifestDescriptor,
    layers: Vec<ManifestDescriptor>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDescriptor {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    annotations: Option<BTreeMap<String, String>>,
}

/// The ext4 UUID (also its directory hash seed): a v4-shaped UUID from the first chain ID,
/// so the same source gives the same filesystem.
fn fs_uuid(chain_id: &str) -> [u8; 16] {
    let h = Sha256::new_with_prefix(format!("ovbd ext4 {chain_id}").as_bytes()).finalize();
    let mut u = [0u8; 16];
    u.copy_from_slice(&h[..16]);
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

fn parse_digest(s: &str) -> Result<Digest> {
    Digest::try_from(s.to_owned()).map_err(|e| anyhow!("digest {s}: {e}"))
}

fn file_digest(path: &std::path::Path) -> Result<(String, u64)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f, &mut h).with_context(|| format!("read {}", path.display()))?;
    Ok((digest_of_hashed(h), n))
}

/// A layer blob's tar stream: gzip and zstd are recognised by their magic, anything else is
/// taken as a plain tar.
fn decompress<'a, R: std::io::BufRead + 'a>(mut r: R) -> Result<Box<dyn Read + 'a>> {
    let head = r.fill_buf().context("reading the layer")?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(r))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(r).context("zstd layer")?)
    } else {
        Box::new(r)
    })
}

struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

struct Counting<'a, R> {
    inner: R,
    read: u64,
    progress: &'a mut dyn Progress,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        self.progress.layer_bytes(self.read);
        Ok(n)
    }
}

/// Seconds since the epoch of an RFC 3339 time (`2023-05-04T17:37:03.872958712Z`, or with an
/// offset); fractions are dropped.
fn parse_rfc3339(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_as_unix_seconds() {
        // RFC 3339 §5.8's examples and docker's nanosecond form; the seconds come from
        // `date -u -d '<the time in UTC>' +%s`.
        for (text, secs) in [
            ("1970-01-01T00:00:00Z", 0),
            ("1985-04-12T23:20:50.52Z", 482_196_050),
            ("1996-12-19T16:39:57-08:00", 851_042_397),
            ("1937-01-01T12:00:27.87+00:20", -1_041_337_173),
            ("2023-05-04T17:37:03.872958712Z", 1_683_221_823),
            ("2023-05-04T19:37:03+02:00", 1_683_221_823),
            ("2000-02-29T00:00:00Z", 951_782_400),
            // Lower-case separators (RFC 3339 §5.6 allows them).
            ("1985-04-12t23:20:50z", 482_196_050),
        ] {
            assert_eq!(parse_rfc3339(text), Some(secs), "{text}");
        }
        // The leap second, in UTC and at -08:00: the last second of 1990 (1990-12-31 23:59:59).
        assert_eq!(parse_rfc3339("1990-12-31T23:59:60Z"), Some(662_687_999));
        assert_eq!(
            parse_rfc3339("1990-12-31T15:59:60-08:00"),
            Some(662_687_999)
        );
        for bad in [
            "yesterday",
            "2023-02-30T00:00:00Z",
            "2023-05-04T17:37:03",
            "2023-05-04T24:00:00Z",
            "2023-05-04",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
