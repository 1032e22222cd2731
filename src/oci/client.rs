//! [`ImageClient`] (async) and [`ImageIo`] (sync): resolve, fetch and write images in layouts
//! and registries.

use super::*;

// ------------------------------------------------------------------------------------ the client

/// The async image I/O API. Registries are reached through one [`Registry`] (made when first
/// needed): mirrors, proxy, host policy, auth, retries and deadlines of `[registry]`. The
/// registries of the references it is given are trusted as the operator's choice (see
/// [`Registry::trust_named_registry`]): this client serves the CLI, never image labels.
pub struct ImageClient {
    pub(super) opts: RegistryOptions,
    pub(super) registry: Mutex<Option<Arc<Registry>>>,
}

impl ImageClient {
    pub fn new(opts: RegistryOptions) -> Self {
        ImageClient {
            opts,
            registry: Mutex::new(None),
        }
    }

    /// The registry client, with `r`'s registry trusted.
    pub(super) fn registry(&self, r: &Reference) -> Result<Arc<Registry>> {
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

    pub(super) async fn resolve_inner(
        &self,
        r: &ImageRef,
        platform: &Platform,
    ) -> Result<ResolvedImage> {
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
    pub(super) async fn registry_manifest(
        &self,
        r: &Reference,
    ) -> Result<(Vec<u8>, Digest, Option<String>)> {
        let m = self
            .registry(r)?
            .get_manifest(r, ACCEPTED_MANIFESTS, MAX_MANIFEST_SIZE)
            .await?;
        let digest = Digest::from_str(&m.digest)
            .map_err(|e| anyhow!("manifest {} has digest {}: {e}", r.whole(), m.digest))?;
        Ok((m.raw, digest, m.media_type))
    }

    /// A small blob (a config) from a registry into memory, digest and size checked.
    pub(super) async fn registry_small_blob(
        &self,
        r: &Reference,
        desc: &Descriptor,
    ) -> Result<Vec<u8>> {
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

    pub(super) async fn push(
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
    pub(super) rt: tokio::runtime::Runtime,
    pub(super) client: ImageClient,
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
