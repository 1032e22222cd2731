//! [`RemoteBlob`]: one registry blob read by HTTP Range GETs.

use super::*;

// ------------------------------------------------------------------------------------ blobs

/// What a blob read needs, shared with the request tasks.
pub(super) struct Target {
    /// `host[:port]/repo@digest`, for messages.
    pub(super) name: String,
    pub(super) repo: String,
    pub(super) digest: String,
    pub(super) size: u64,
    pub(super) endpoints: Vec<Endpoint>,
    pub(super) fetched: AtomicU64,
    pub(super) requests: AtomicU64,
    /// The snapshot layer (directory) it is read for: a CRI pull secret bound to that layer
    /// authenticates its reads.
    pub(super) layer: Option<std::path::PathBuf>,
}

/// A registry blob read by HTTP Range GETs; [`ovbd_format::ReadAt`].
#[derive(Clone)]
pub struct RemoteBlob {
    pub(super) registry: Arc<Registry>,
    pub(super) t: Arc<Target>,
}

impl fmt::Debug for RemoteBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteBlob")
            .field("name", &self.t.name)
            .field("size", &self.t.size)
            .finish_non_exhaustive()
    }
}

impl RemoteBlob {
    /// `image_ref` like "127.0.0.1:5000/library/app:v1" or "docker.io/library/busybox" (registry
    /// host and repo are taken from it); digest "sha256:..."; size in bytes.
    pub fn new(
        registry: Arc<Registry>,
        image_ref: &str,
        digest: &str,
        size: u64,
    ) -> Result<RemoteBlob, RegistryError> {
        // The same parse as `ovbd convert` / `rpull` (and its checks), registry references only.
        let r = match crate::oci::ImageRef::parse(image_ref) {
            Ok(crate::oci::ImageRef::Registry(r)) => r,
            Ok(_) => {
                return Err(RegistryError::InvalidInput(format!(
                    "image reference {image_ref:?} is not a registry reference"
                )))
            }
            Err(e) => return Err(RegistryError::InvalidInput(format!("{e:#}"))),
        };
        if !valid_digest(digest) {
            return Err(RegistryError::InvalidInput(format!(
                "blob digest {digest:?}: want sha256:<64 hex digits> (or sha512)"
            )));
        }
        let endpoints = registry.endpoints(r.registry())?;
        Ok(RemoteBlob {
            t: Arc::new(Target {
                name: format!("{}/{}@{digest}", r.registry(), r.repository()),
                repo: r.repository().to_owned(),
                digest: digest.to_owned(),
                size,
                endpoints,
                fetched: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                layer: None,
            }),
            registry,
        })
    }

    /// The blob as read for snapshot layer `layer` (its directory): with the CRI pull secret
    /// bound to that layer, if there is one.
    pub fn for_layer(self, layer: Option<&std::path::Path>) -> RemoteBlob {
        let t = Target {
            name: self.t.name.clone(),
            repo: self.t.repo.clone(),
            digest: self.t.digest.clone(),
            size: self.t.size,
            endpoints: self.t.endpoints.clone(),
            fetched: AtomicU64::new(self.t.fetched.load(Relaxed)),
            requests: AtomicU64::new(self.t.requests.load(Relaxed)),
            layer: layer.map(|l| l.to_owned()),
        };
        RemoteBlob {
            registry: self.registry,
            t: Arc::new(t),
        }
    }

    /// Body bytes received so far (all reads of this blob, retries included).
    #[allow(dead_code)] // API for the daemon's stats, benchmarks and tests
    pub fn fetched_bytes(&self) -> u64 {
        self.t.fetched.load(Relaxed)
    }

    /// HTTP requests made for this blob (redirect hops included, token requests not).
    #[allow(dead_code)] // API for the daemon's stats, benchmarks and tests
    pub fn requests(&self) -> u64 {
        self.t.requests.load(Relaxed)
    }

    pub fn digest(&self) -> &str {
        &self.t.digest
    }

    /// The repository (`library/busybox`).
    #[allow(dead_code)] // API for the daemon's stats, benchmarks and tests
    pub fn repository(&self) -> &str {
        &self.t.repo
    }

    /// Reads each `(offset, len)` range (within the blob) into its own buffer. Ranges longer
    /// than [`MAX_REQUEST_BYTES`] are split; all requests run concurrently, under one deadline.
    pub fn read_ranges(&self, ranges: &[(u64, usize)]) -> io::Result<Vec<Vec<u8>>> {
        for &(off, len) in ranges {
            if off.checked_add(len as u64).is_none_or(|e| e > self.t.size) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "registry blob {}: range {off}+{len} is past its end ({} bytes)",
                        self.t.name, self.t.size
                    ),
                ));
            }
        }
        if let Some(got) = self.read_ranges_at_once(ranges)? {
            return Ok(got);
        }
        let mut pieces = Vec::new();
        for (i, &(off, len)) in ranges.iter().enumerate() {
            let mut done = 0usize;
            while done < len {
                let n = (len - done).min(MAX_REQUEST_BYTES);
                pieces.push((i, off + done as u64, n));
                done += n;
            }
        }
        let inner = self.registry.inner.clone();
        let t = self.t.clone();
        let timeout = inner.timeout;
        let lens: Vec<usize> = ranges.iter().map(|r| r.1).collect();
        // Every event of this read (retries, auth, failures) carries the blob: `run` and the
        // spawns below take the current span along to the registry's threads.
        let span = tracing::info_span!(
            "blob",
            digest = %self.t.digest,
            registry = %self.t.name.split('/').next().unwrap_or_default(),
            repo = %self.t.repo
        );
        let _entered = span.enter();
        tracing::debug!(ranges = ranges.len(), "lazy read");
        self.registry
            .run(timeout + Duration::from_secs(10), async move {
                let deadline = Instant::now() + timeout;
                let mut tasks = Vec::with_capacity(pieces.len());
                for &(i, offset, len) in &pieces {
                    let (inner, t) = (inner.clone(), t.clone());
                    let fut = async move {
                        let what = format!(
                            "registry blob {} bytes {offset}..{}",
                            t.name,
                            offset + len as u64
                        );
                        let mut op = RangeRead {
                            t: &t,
                            offset,
                            len,
                            out: Vec::with_capacity(len),
                        };
                        inner
                            .attempt(&what, &t.endpoints, Deadline::At(deadline), &mut op)
                            .await?;
                        Ok::<_, io::Error>(op.out)
                    };
                    let fut = tracing::Instrument::in_current_span(fut);
                    tasks.push((i, AbortOnDrop(tokio::spawn(fut))));
                }
                let mut out: Vec<Vec<u8>> = lens.iter().map(|&l| Vec::with_capacity(l)).collect();
                for (i, mut task) in tasks {
                    let piece = (&mut task.0)
                        .await
                        .map_err(|e| io::Error::other(format!("registry request task: {e}")))??;
                    out[i].extend_from_slice(&piece);
                }
                Ok(out)
            })
    }
}

impl RemoteBlob {
    /// Reads a few ranges in one request where the registry serves several ranges at once (a
    /// request costs the registry more than the bytes: a layer's head and tail at its open,
    /// a refill's runs apart). `None`: not tried (one range, too many or too long, or a
    /// registry known to answer such requests with the whole blob), or the registry would not:
    /// it is remembered, and the caller asks range by range.
    fn read_ranges_at_once(&self, ranges: &[(u64, usize)]) -> io::Result<Option<Vec<Vec<u8>>>> {
        let total: usize = ranges.iter().map(|r| r.1).sum();
        if ranges.len() < 2
            || ranges.len() > MAX_RANGES_AT_ONCE
            || ranges.iter().any(|r| r.1 == 0)
            || total > MAX_REQUEST_BYTES
        {
            return Ok(None);
        }
        let host = self.t.name.split('/').next().unwrap_or_default().to_owned();
        let single = || {
            self.registry
                .inner
                .single_range
                .lock()
                .unwrap_or_else(|e| e.into_inner())
        };
        if single().contains(&host) {
            return Ok(None);
        }
        let inner = self.registry.inner.clone();
        let t = self.t.clone();
        let timeout = inner.timeout;
        let span = tracing::info_span!(
            "blob",
            digest = %self.t.digest,
            registry = %host,
            repo = %self.t.repo
        );
        let _entered = span.enter();
        tracing::debug!(ranges = ranges.len(), "lazy read, one request");
        let owned = ranges.to_vec();
        let got = self
            .registry
            .run(timeout + Duration::from_secs(10), async move {
                let what = format!("registry blob {} ({} ranges)", t.name, owned.len());
                let mut op = super::fetch::MultiRangeRead {
                    t: &t,
                    ranges: &owned,
                };
                let fut = inner.attempt(
                    &what,
                    &t.endpoints,
                    Deadline::At(Instant::now() + timeout),
                    &mut op,
                );
                Ok::<_, io::Error>(tracing::Instrument::in_current_span(fut).await?)
            })?;
        if got.is_none() {
            log::info!(
                "registry {host}: no answer to several ranges at once; asking range by range"
            );
            let mut hosts = single();
            // Image references name the hosts: a bounded memory of them.
            if hosts.len() >= MAX_SINGLE_RANGE_HOSTS {
                hosts.clear();
            }
            hosts.insert(host);
        }
        Ok(got)
    }
}

/// The most ranges asked for in one request.
const MAX_RANGES_AT_ONCE: usize = 16;

/// Registries remembered as serving one range per request, at most (then forgotten).
const MAX_SINGLE_RANGE_HOSTS: usize = 256;

/// Aborts a spawned request when the read that wanted it gave up (another piece failed).
pub(super) struct AbortOnDrop<T>(pub(super) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ovbd_format::ReadAt for RemoteBlob {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.t.size || buf.is_empty() {
            return Ok(0);
        }
        let n = (self.t.size - offset).min(buf.len() as u64) as usize;
        let mut got = self.read_ranges(&[(offset, n)])?;
        let data = got.pop().unwrap_or_default();
        if data.len() != n {
            return Err(io::Error::other(format!(
                "registry blob {}: {} bytes at {offset}, wanted {n}",
                self.t.name,
                data.len()
            )));
        }
        buf[..n].copy_from_slice(&data);
        Ok(n)
    }
    fn size(&self) -> u64 {
        self.t.size
    }
    fn name(&self) -> &str {
        &self.t.name
    }
    /// Never touches the network: always `WouldBlock`.
    fn read_at_nowait(&self, _buf: &mut [u8], _offset: u64) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}
