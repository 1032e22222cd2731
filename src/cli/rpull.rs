//! `ovbd rpull REF`: a lazy pull through containerd, like `ctr rpull` / `ctr-remote image
//! rpull` (spec §4.5). Only the manifest and config are downloaded: they go into containerd's
//! content store and an image record; each layer is "unpacked" by a Prepare whose labels
//! (snapshot.ref + blob digest/size + cri.image-ref) make ovbd commit it at once as a remote layer
//! and answer AlreadyExists. `ctr run --snapshotter ovbd REF` then finds the image unpacked.

use crate::labels::{
    LABEL_BLOB_DIGEST, LABEL_CRI_IMAGE_REF, LABEL_IMAGE_REF, LABEL_SNAPSHOT_REF,
    SNAPSHOT_LABEL_PREFIX,
};
use crate::oci::digest::chain_ids;
use crate::oci::{ImageClient, ImageRef, Platform, RegistryOptions, ResolvedImage};
use anyhow::{anyhow, bail, Context, Result};
use containerd_client::services::v1::snapshots::{
    snapshots_client::SnapshotsClient, PrepareSnapshotRequest, RemoveSnapshotRequest,
    StatSnapshotRequest,
};
use containerd_client::services::v1::{
    content_client::ContentClient, images_client::ImagesClient, leases_client::LeasesClient,
    CreateImageRequest, CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest,
    Image, Info, UpdateImageRequest, UpdateRequest as UpdateContentRequest, WriteAction,
    WriteContentRequest,
};
use containerd_client::tonic::{self, transport::Channel, Code, Request};
use containerd_client::types::Descriptor;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

pub struct RpullOptions {
    /// containerd's socket.
    pub address: PathBuf,
    pub namespace: String,
    pub snapshotter: String,
    pub platform: Platform,
    pub registry: RegistryOptions,
}

/// Adds the namespace (and the lease, if any) to a containerd request.
struct Ctx {
    namespace: String,
    lease: Option<String>,
}

impl Ctx {
    fn req<T>(&self, msg: T) -> Result<Request<T>> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(
            "containerd-namespace",
            self.namespace.parse().map_err(|_| {
                anyhow!("namespace {:?} is not a valid header value", self.namespace)
            })?,
        );
        if let Some(l) = &self.lease {
            r.metadata_mut().insert(
                "containerd-lease",
                l.parse().map_err(|_| anyhow!("bad lease id {l:?}"))?,
            );
        }
        Ok(r)
    }
}

pub fn run(reference: &str, opts: RpullOptions) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a tokio runtime")?;
    rt.block_on(rpull(reference, &opts))
}

async fn rpull(reference: &str, opts: &RpullOptions) -> Result<()> {
    let t0 = Instant::now();
    let (name, img, chain) = remote_image(reference, opts).await?;

    let channel = containerd_client::connect(&opts.address)
        .await
        .with_context(|| format!("connecting to containerd at {}", opts.address.display()))?;
    let mut ctx = Ctx {
        namespace: opts.namespace.clone(),
        lease: None,
    };
    // A lease keeps what we write from containerd's GC until the image record holds it.
    let lease_id = format!(
        "ovbd-rpull-{}-{}",
        std::process::id(),
        t0.elapsed().as_nanos()
    );
    let mut leases = LeasesClient::new(channel.clone());
    leases
        .create(ctx.req(CreateLeaseRequest {
            id: lease_id.clone(),
            labels: HashMap::from([("containerd.io/gc.expire".to_string(), rfc3339_in(3600))]),
        })?)
        .await
        .context("creating a containerd lease")?;
    ctx.lease = Some(lease_id.clone());
    let done = store_and_unpack(&channel, &ctx, reference, &name, &img, &chain, opts, t0).await;
    ctx.lease = None;
    let _ = leases
        .delete(ctx.req(DeleteLeaseRequest {
            id: lease_id,
            sync: false,
        })?)
        .await;
    done
}

/// The registry part of a lazy pull: `reference` resolved for the platform (manifest and
/// config through the registry client: mirrors, proxy, retries), its layers checked to be
/// OverlayBD layers. Returns the reference's full name, the image and its chain IDs.
async fn remote_image(
    reference: &str,
    opts: &RpullOptions,
) -> Result<(String, ResolvedImage, Vec<String>)> {
    let r = ImageRef::parse(reference)?;
    let ImageRef::Registry(reg) = &r else {
        bail!("rpull needs a registry reference, not {reference}");
    };
    let name = reg.whole();
    let img = ImageClient::new(opts.registry.clone())
        .resolve(&r, &opts.platform)
        .await?;
    let config: serde_json::Value = serde_json::from_slice(&img.config_raw)
        .with_context(|| format!("image config {} is not JSON", img.config.digest()))?;
    let diff_ids: Vec<String> = config
        .pointer("/rootfs/diff_ids")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if diff_ids.len() != img.layers.len() || diff_ids.is_empty() {
        bail!(
            "image {name}: {} layers but {} diff_ids in its config",
            img.layers.len(),
            diff_ids.len()
        );
    }
    for (i, l) in img.layers.iter().enumerate() {
        let has = l
            .annotations()
            .as_ref()
            .is_some_and(|a| a.contains_key(LABEL_BLOB_DIGEST));
        if !has {
            bail!(
                "image {name}: layer {} ({}) is not an OverlayBD layer (no {LABEL_BLOB_DIGEST} annotation); \
                 pull it with `ctr image pull` instead",
                i + 1,
                l.digest()
            );
        }
    }
    let chain = chain_ids(&diff_ids);
    Ok((name, img, chain))
}

#[allow(clippy::too_many_arguments)]
async fn store_and_unpack(
    channel: &Channel,
    ctx: &Ctx,
    reference: &str,
    name: &str,
    img: &ResolvedImage,
    chain: &[String],
    opts: &RpullOptions,
    t0: Instant,
) -> Result<()> {
    let mut content = ContentClient::new(channel.clone());
    let top = chain.last().cloned().unwrap_or_default();
    // The config holds the image's snapshots (as containerd's unpacker labels it), the manifest
    // holds the config.
    write_content(
        &mut content,
        ctx,
        img.config.digest().as_ref(),
        &img.config_raw,
        HashMap::from([(
            format!("containerd.io/gc.ref.snapshot.{}", opts.snapshotter),
            top.clone(),
        )]),
    )
    .await?;
    write_content(
        &mut content,
        ctx,
        img.manifest_digest.as_ref(),
        &img.manifest_raw,
        HashMap::from([(
            "containerd.io/gc.ref.content.config".to_string(),
            img.config.digest().to_string(),
        )]),
    )
    .await?;

    let mut snapshots = SnapshotsClient::new(channel.clone());
    let n = img.layers.len();
    for (i, layer) in img.layers.iter().enumerate() {
        let parent = if i == 0 {
            String::new()
        } else {
            chain[i - 1].clone()
        };
        let labels = layer_labels(layer.annotations().as_ref(), &chain[i], reference);
        let key = format!("ovbd-rpull-{}-{}", std::process::id(), chain[i]);
        let prepared = snapshots
            .prepare(ctx.req(PrepareSnapshotRequest {
                snapshotter: opts.snapshotter.clone(),
                key: key.clone(),
                parent,
                labels,
            })?)
            .await;
        match prepared {
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => bail!(
                "layer {}/{n} ({}): snapshotter {} refused it: {}",
                i + 1,
                layer.digest(),
                opts.snapshotter,
                s.message()
            ),
            Ok(_) => {
                let _ = snapshots
                    .remove(ctx.req(RemoveSnapshotRequest {
                        snapshotter: opts.snapshotter.clone(),
                        key,
                    })?)
                    .await;
                bail!(
                    "layer {}/{n} ({}): snapshotter {} did not take it as a remote layer \
                     (is it ovbd with a registry source?)",
                    i + 1,
                    layer.digest(),
                    opts.snapshotter
                );
            }
        }
        snapshots
            .stat(ctx.req(StatSnapshotRequest {
                snapshotter: opts.snapshotter.clone(),
                key: chain[i].clone(),
            })?)
            .await
            .map_err(|s| {
                anyhow!(
                    "layer {}/{n}: snapshot {} is missing after the pull: {}",
                    i + 1,
                    chain[i],
                    s.message()
                )
            })?;
        eprintln!(
            "layer {}/{n}: {} ({} bytes) remote, snapshot {}",
            i + 1,
            layer.digest(),
            layer.size(),
            short(&chain[i])
        );
    }

    let mut images = ImagesClient::new(channel.clone());
    let image = Image {
        name: name.to_owned(),
        labels: HashMap::new(),
        target: Some(Descriptor {
            media_type: img.manifest_media_type.clone(),
            digest: img.manifest_digest.to_string(),
            size: img.manifest_raw.len() as i64,
            annotations: HashMap::new(),
        }),
        created_at: None,
        updated_at: None,
    };
    match images
        .create(ctx.req(CreateImageRequest {
            image: Some(image.clone()),
        })?)
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == Code::AlreadyExists => {
            images
                .update(ctx.req(UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".into()],
                    }),
                })?)
                .await
                .with_context(|| format!("updating image {name} in containerd"))?;
        }
        Err(s) => {
            return Err(anyhow!(
                "creating image {name} in containerd: {}",
                s.message()
            ))
        }
    }
    eprintln!(
        "pulled {name} lazily: manifest {}, {n} layers, {} + {} bytes fetched, {:.2} s",
        img.manifest_digest,
        img.manifest_raw.len(),
        img.config_raw.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes one blob into containerd's content store with `labels` (or, if it is there already,
/// sets the labels on it).
async fn write_content(
    content: &mut ContentClient<Channel>,
    ctx: &Ctx,
    digest: &str,
    data: &[u8],
    labels: HashMap<String, String>,
) -> Result<()> {
    let r#ref = format!("ovbd-rpull-{digest}");
    let reqs = vec![
        WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: r#ref.clone(),
            total: data.len() as i64,
            expected: digest.to_owned(),
            offset: 0,
            data: data.to_vec(),
            labels: HashMap::new(),
        },
        WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref,
            total: data.len() as i64,
            expected: digest.to_owned(),
            offset: data.len() as i64,
            data: Vec::new(),
            labels: labels.clone(),
        },
    ];
    let request = ctx.req(tokio_stream::iter(reqs))?;
    let written = async {
        let mut responses = content.write(request).await?.into_inner();
        while responses.message().await?.is_some() {}
        Ok::<(), tonic::Status>(())
    }
    .await;
    match written {
        Ok(()) => Ok(()),
        Err(s) if s.code() == Code::AlreadyExists => {
            let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
            content
                .update(ctx.req(UpdateContentRequest {
                    info: Some(Info {
                        digest: digest.to_owned(),
                        size: data.len() as i64,
                        created_at: None,
                        updated_at: None,
                        labels,
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                })?)
                .await
                .with_context(|| format!("labelling {digest} in containerd's content store"))?;
            Ok(())
        }
        Err(s) => Err(anyhow!(
            "writing {digest} into containerd's content store: {}",
            s.message()
        )),
    }
}

/// The labels of a layer's Prepare, as containerd's unpacker makes them: the layer's
/// `containerd.io/snapshot/` annotations, its chain ID as snapshot.ref, and the image reference.
fn layer_labels(
    annotations: Option<&HashMap<String, String>>,
    chain_id: &str,
    reference: &str,
) -> HashMap<String, String> {
    let mut labels: HashMap<String, String> = annotations
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.starts_with(SNAPSHOT_LABEL_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(LABEL_SNAPSHOT_REF.into(), chain_id.to_owned());
    // As CRI does: the snapshotter trusts cri.image-ref, written over the manifest's.
    labels.insert(LABEL_CRI_IMAGE_REF.into(), reference.to_owned());
    labels.insert(LABEL_IMAGE_REF.into(), reference.to_owned());
    labels
}

fn short(d: &str) -> &str {
    let hex = d.strip_prefix("sha256:").unwrap_or(d);
    hex.get(..12).unwrap_or(hex)
}

/// An RFC 3339 UTC time `secs` seconds from now (containerd's lease expiry label).
fn rfc3339_in(secs: u64) -> String {
    rfc3339_utc(SystemTime::now() + Duration::from_secs(secs))
}

/// `t` in RFC 3339, UTC, whole seconds (`1996-12-20T00:39:57Z`), as Go's `time.RFC3339` reads it.
fn rfc3339_utc(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_labels_name_the_image_as_the_client() {
        let reference = "127.0.0.1:5000/hello-world:obd";
        // The publisher's annotations may name any image; the client's reference wins.
        let annotations = HashMap::from([
            (LABEL_BLOB_DIGEST.to_string(), "sha256:aa".to_string()),
            (
                LABEL_CRI_IMAGE_REF.to_string(),
                "127.0.0.1:6000/other:x".to_string(),
            ),
            (
                "org.opencontainers.image.title".to_string(),
                "t".to_string(),
            ),
        ]);
        let l = layer_labels(Some(&annotations), "sha256:cc", reference);
        assert_eq!(l[LABEL_CRI_IMAGE_REF], reference);
        assert_eq!(l[LABEL_IMAGE_REF], reference);
        assert_eq!(l[LABEL_SNAPSHOT_REF], "sha256:cc");
        assert_eq!(l[LABEL_BLOB_DIGEST], "sha256:aa");
        assert!(!l.contains_key("org.opencontainers.image.title"));
    }

    #[test]
    fn lease_expiry_is_rfc3339_utc() {
        use std::time::UNIX_EPOCH;
        // RFC 3339 §5.8's examples, in UTC; seconds from `date -u -d '...' +%s`.
        let at = |secs: i64| {
            let d = Duration::from_secs(secs.unsigned_abs());
            if secs < 0 {
                UNIX_EPOCH - d
            } else {
                UNIX_EPOCH + d
            }
        };
        assert_eq!(rfc3339_utc(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(at(482_196_050)), "1985-04-12T23:20:50Z");
        // 1996-12-19T16:39:57-08:00
        assert_eq!(rfc3339_utc(at(851_042_397)), "1996-12-20T00:39:57Z");
        // 1937-01-01T12:00:27.87+00:20, fraction dropped
        assert_eq!(rfc3339_utc(at(-1_041_337_173)), "1937-01-01T11:40:27Z");
        assert_eq!(rfc3339_utc(at(951_782_400)), "2000-02-29T00:00:00Z");
        // Sub-second parts are not written: containerd parses the label with time.RFC3339.
        assert_eq!(
            rfc3339_utc(at(482_196_050) + Duration::from_millis(520)),
            "1985-04-12T23:20:50Z"
        );
        let later = rfc3339_in(3600);
        assert!(later.ends_with('Z') && later.len() == 20, "{later}");
    }

    // ------------------------------------------------- the registry part, against a registry

    use crate::config::{MirrorConfig, RegistryConfig};
    use crate::oci::{ImageIo, ImageToWrite, LayerFile};
    use crate::registry::{Registry, RegistryError, RemoteBlob};
    use crate::testing::{quick_config, start_registry, Fault, Front};
    use ovbd_format::ReadAt as _;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hello-world-oci"
    );
    /// Upstream's converted hello-world: an OverlayBD image of one layer.
    const CONVERTED: &str =
        "sha256:42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88";

    /// Pushes the fixture's OverlayBD image to the registry at `addr` as `hello-world:obd`.
    fn push_converted(addr: &str) {
        let io = ImageIo::new(RegistryOptions::default()).unwrap();
        let src = ImageRef::parse(&format!("oci:{FIXTURE}:amd64-converted")).unwrap();
        let img = io.resolve(&src, &Platform::default()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let layers: Vec<LayerFile> = img
            .layers
            .iter()
            .map(|l| {
                let path = tmp.path().join(l.digest().digest());
                io.fetch_blob(&src, l, &path).unwrap();
                LayerFile {
                    descriptor: l.clone(),
                    path,
                }
            })
            .collect();
        let dst = ImageRef::parse(&format!("{addr}/hello-world:obd")).unwrap();
        let img = ImageToWrite {
            layers: &layers,
            config: &img.config_raw,
            manifest: &img.manifest_raw,
            manifest_media_type: &img.manifest_media_type,
        };
        io.write_image(&dst, &img).unwrap();
    }

    fn options(config: RegistryConfig) -> RpullOptions {
        RpullOptions {
            address: "/nonexistent/containerd.sock".into(),
            namespace: "default".into(),
            snapshotter: "ovbd".into(),
            platform: Platform::default(),
            registry: RegistryOptions {
                config,
                ..Default::default()
            },
        }
    }

    fn remote(
        reference: &str,
        opts: &RpullOptions,
    ) -> Result<(String, ResolvedImage, Vec<String>)> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(remote_image(reference, opts))
    }

    /// rpull's registry part through a mirror that fails now and then (503, a reset, a
    /// truncated config), then the layer read lazily through the same `[registry]`: the image
    /// and its bytes as pushed.
    #[test]
    fn rpull_resolves_through_a_mirror_with_faults() {
        let reg = start_registry("");
        push_converted(&reg.addr);
        let mirror = Front::start(&reg.addr, None);
        mirror.push_faults_for("GET", "/manifests/", vec![Fault::Status(503), Fault::Reset]);
        mirror.push_faults_for("GET", "/blobs/", vec![Fault::Truncate]);
        let opts = options(RegistryConfig {
            mirrors: vec![MirrorConfig {
                host: "registry.invalid".into(),
                mirrors: vec![format!("http://{}", mirror.addr)],
            }],
            ..quick_config()
        });
        let (name, img, chain) = remote("registry.invalid/hello-world:obd", &opts).unwrap();
        assert_eq!(name, "registry.invalid/hello-world:obd");
        assert_eq!(img.manifest_digest.to_string(), CONVERTED);
        assert_eq!(chain.len(), 1);
        assert_eq!(mirror.targeted_left(), 0, "{:?}", mirror.requests());

        // The daemon's lazy reads of the layer, configured alike, come from the mirror too.
        let layer = &img.layers[0];
        let registry = Registry::new(&opts.registry.registry_config()).unwrap();
        let blob = RemoteBlob::new(
            registry,
            "registry.invalid/hello-world",
            layer.digest().as_ref(),
            layer.size(),
        )
        .unwrap();
        let mut data = vec![0u8; layer.size() as usize];
        assert_eq!(blob.read_at(&mut data, 0).unwrap(), data.len());
        let digest = crate::oci::digest::digest_of(&data);
        assert_eq!(digest, layer.digest().to_string());
    }

    /// Through a forward proxy: every request of the resolve goes through it.
    #[test]
    fn rpull_resolves_through_a_proxy() {
        let reg = start_registry("");
        push_converted(&reg.addr);
        let proxy = Front::start(&reg.addr, None);
        let opts = options(RegistryConfig {
            proxy: Some(format!("http://{}", proxy.addr)),
            ..quick_config()
        });
        let reference = format!("{}/hello-world:obd", reg.addr);
        let (_, img, _) = remote(&reference, &opts).unwrap();
        assert_eq!(img.manifest_digest.to_string(), CONVERTED);
        let seen = proxy.requests();
        let origin = format!("http://{}/v2/hello-world/", reg.addr);
        assert!(seen.len() >= 2, "{seen:?}");
        assert!(seen.iter().all(|(_, t)| t.starts_with(&origin)), "{seen:?}");
    }

    /// A tag that is not there: one request, an error naming the reference, not found.
    #[test]
    fn rpull_fails_at_once_on_a_missing_tag() {
        let reg = start_registry("");
        let front = Front::start(&reg.addr, None);
        let reference = format!("{}/hello-world:nope", front.addr);
        let e = remote(&reference, &options(quick_config())).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains(&reference) && msg.contains("404"), "{msg}");
        assert_eq!(front.requests().len(), 1, "{:?}", front.requests());
        let class = e.chain().find_map(|c| c.downcast_ref::<RegistryError>());
        assert!(
            matches!(class, Some(RegistryError::NotFound(_))),
            "{class:?}"
        );
    }
}
