//! Pulling what `ovbd convert` and `ovbd rpull` need: a manifest (or index) by tag or digest,
//! and whole blobs into memory or a file, every byte checked against its digest. Through the
//! same endpoints (mirrors first), proxy, host policy, auth and retries as the range reads.

use super::*;
use crate::oci::Reference;
use sha2::{Digest as _, Sha256};
use std::io::{Seek as _, Write as _};

/// A manifest or index as a registry served it.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// The bytes served (their sha256 is `digest`).
    pub raw: Vec<u8>,
    /// `sha256:<hex>` of `raw`, checked against the reference's digest and the registry's
    /// `Docker-Content-Digest`.
    pub digest: String,
    /// The response's `Content-Type` without parameters, if any.
    pub media_type: Option<String>,
}

/// `sha256:<hex>` of what `h` has seen.
pub(super) fn sha256_of(h: &Sha256) -> String {
    format!("sha256:{:x}", h.clone().finalize())
}

/// The tag or digest a reference asks for: its digest if it has one (as docker), else its
/// tag, else `latest`.
pub(super) fn reference_name(r: &Reference) -> &str {
    r.digest().or(r.tag()).unwrap_or("latest")
}

struct ManifestGet<'a> {
    repo: &'a str,
    name: &'a str,
    want: Option<&'a str>,
    accept: &'a str,
    max: u64,
    requests: AtomicU64,
}

impl Attempt for ManifestGet<'_> {
    type Output = Manifest;
    async fn once<'a>(
        &'a mut self,
        inner: &'a Inner,
        ep: &'a Endpoint,
    ) -> Result<Manifest, RegistryError> {
        let url = ep.api_url(self.repo, "manifests", self.name)?;
        let req = Request::new(reqwest::Method::GET).header(header::ACCEPT, self.accept);
        let (resp, _) = inner
            .authorized(ep, self.repo, Access::Pull, &self.requests, &req, &url)
            .await?;
        let what = format!("GET {}", redact(resp.url()));
        if resp.status() != StatusCode::OK {
            return Err(status_error(&what, resp).await);
        }
        let text = |name: header::HeaderName| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim().to_owned())
        };
        let media_type = text(header::CONTENT_TYPE)
            .map(|v| v.split(';').next().unwrap_or("").trim().to_owned())
            .filter(|v| !v.is_empty());
        let served_digest = text(header::HeaderName::from_static("docker-content-digest"));
        let raw = read_limited(resp, self.max, inner.stall, &what).await?;
        let digest = sha256_of(&Sha256::new_with_prefix(&raw));
        if let Some(want) = self.want.filter(|w| *w != digest) {
            return Err(RegistryError::InvalidResponse(format!(
                "{what}: the content's digest is {digest}, not {want}"
            )));
        }
        if let Some(said) = served_digest.filter(|d| d.starts_with("sha256:") && *d != digest) {
            return Err(RegistryError::InvalidResponse(format!(
                "{what}: the content's digest is {digest}, Docker-Content-Digest says {said}"
            )));
        }
        Ok(Manifest {
            raw,
            digest,
            media_type,
        })
    }
}

/// Where a downloaded blob goes.
enum Sink {
    Memory(Vec<u8>),
    File(std::fs::File),
}

impl Sink {
    fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        match self {
            Sink::Memory(v) => {
                v.extend_from_slice(chunk);
                Ok(())
            }
            Sink::File(f) => f.write_all(chunk),
        }
    }

    /// Empty again (a registry that sends the whole blob again, or a mirror's bad copy).
    fn reset(&mut self) -> io::Result<()> {
        match self {
            Sink::Memory(v) => {
                v.clear();
                Ok(())
            }
            Sink::File(f) => {
                f.set_len(0)?;
                f.rewind().map(drop)
            }
        }
    }
}

/// A whole blob, resumed after the bytes already received (`Range: bytes=N-`) when a try
/// breaks off, its sha256 checked at the end.
struct BlobGet<'a> {
    repo: &'a str,
    digest: &'a str,
    size: u64,
    sink: Sink,
    hasher: Sha256,
    got: u64,
    /// The most bytes held at once (progress, even across restarts from 0).
    high: u64,
    requests: AtomicU64,
}

impl BlobGet<'_> {
    fn restart(&mut self) -> Result<(), RegistryError> {
        self.sink.reset().map_err(|e| {
            RegistryError::local(format!("blob {}: emptying its copy", self.digest), &e)
        })?;
        self.hasher = Sha256::new();
        self.got = 0;
        Ok(())
    }
}

impl Attempt for BlobGet<'_> {
    type Output = ();
    async fn once<'a>(
        &'a mut self,
        inner: &'a Inner,
        ep: &'a Endpoint,
    ) -> Result<(), RegistryError> {
        let url = ep.blob_url(self.repo, self.digest)?;
        let mut req = Request::new(reqwest::Method::GET);
        if self.got > 0 {
            req = req.header(header::RANGE, &format!("bytes={}-", self.got));
        }
        let (mut resp, _) = inner
            .authorized(ep, self.repo, Access::Pull, &self.requests, &req, &url)
            .await?;
        let what = format!("GET {}", redact(resp.url()));
        let size = self.size;
        match resp.status() {
            StatusCode::OK => {
                if self.got > 0 {
                    // No Range support here: the whole blob again.
                    self.restart()?;
                }
                if let Some(n) = resp.content_length().filter(|&n| n != size) {
                    return Err(RegistryError::InvalidResponse(format!(
                        "{what}: Content-Length {n}, its descriptor says {size} bytes"
                    )));
                }
            }
            StatusCode::PARTIAL_CONTENT if self.got > 0 => {
                let cr = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range);
                let ok = matches!(cr, Some((a, b, total))
                    if a == self.got && b + 1 == size && total.is_none_or(|t| t == size));
                if !ok {
                    return Err(RegistryError::InvalidResponse(format!(
                        "{what}: asked for bytes {}-, got 206 with Content-Range {cr:?} \
                         (the blob is {size} bytes)",
                        self.got
                    )));
                }
            }
            _ => return Err(status_error(&what, resp).await),
        }
        let stall = inner.stall;
        loop {
            let chunk = match tokio::time::timeout(stall, resp.chunk()).await {
                Err(_) => {
                    return Err(RegistryError::transient(format!(
                        "{what}: stalled, no bytes for {stall:?} after {} of {size}",
                        self.got
                    )))
                }
                Ok(Err(e)) => {
                    return Err(http_failure(
                        &format!("{what}: body broke off after {} of {size} bytes", self.got),
                        e,
                    ))
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(c))) => c,
            };
            if self.got + chunk.len() as u64 > size {
                self.restart()?;
                return Err(RegistryError::InvalidResponse(format!(
                    "{what}: more than the {size} bytes its descriptor says"
                )));
            }
            self.hasher.update(&chunk);
            self.sink.write(&chunk).map_err(|e| {
                RegistryError::local(format!("blob {}: writing its copy", self.digest), &e)
            })?;
            self.got += chunk.len() as u64;
            self.high = self.high.max(self.got);
        }
        if self.got < size {
            return Err(RegistryError::transient(format!(
                "{what}: truncated body, {} of {size} bytes",
                self.got
            )));
        }
        let digest = sha256_of(&self.hasher);
        if digest != self.digest {
            // A mirror's bad copy: the next endpoint starts afresh.
            self.restart()?;
            return Err(RegistryError::InvalidResponse(format!(
                "{what}: digest mismatch, the content's digest is {digest}"
            )));
        }
        Ok(())
    }
    fn moved(&self) -> u64 {
        self.high
    }
    fn resumes(&self) -> bool {
        true
    }
    fn done(&self) -> Option<String> {
        Some(format!("{} of {} bytes received", self.got, self.size))
    }
}

/// `sha256:<64 hex>` only: what a whole blob is checked against.
fn check_sha256(digest: &str) -> Result<(), RegistryError> {
    if crate::oci::digest::is_sha256_digest(digest) {
        Ok(())
    } else {
        Err(RegistryError::InvalidInput(format!(
            "blob digest {digest:?}: only sha256:<64 lowercase hex digits> is supported"
        )))
    }
}

impl Registry {
    /// The manifest (or index) `r` names (by digest if it has one, else by tag), asking for
    /// the media types `accept`, at most `max_size` bytes. Mirrors first, then the registry.
    pub async fn get_manifest(
        &self,
        r: &Reference,
        accept: &[&str],
        max_size: u64,
    ) -> Result<Manifest, RegistryError> {
        let endpoints = self.endpoints(r.registry())?;
        let inner = self.inner.clone();
        let (repo, name) = (r.repository().to_owned(), reference_name(r).to_owned());
        let want = r.digest().map(str::to_owned);
        let accept = accept.join(", ");
        let what = format!("manifest {}", r.whole());
        self.spawned(async move {
            let mut op = ManifestGet {
                repo: &repo,
                name: &name,
                want: want.as_deref(),
                accept: &accept,
                max: max_size,
                requests: AtomicU64::new(0),
            };
            let deadline = Deadline::At(Instant::now() + inner.timeout);
            inner.attempt(&what, &endpoints, deadline, &mut op).await
        })
        .await
    }

    /// Downloads blob `digest` (`size` bytes) of `r`'s repository into memory.
    pub async fn fetch_blob_bytes(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let capacity = usize::try_from(size).unwrap_or(0).min(64 << 20);
        match self
            .fetch_blob(r, digest, size, Sink::Memory(Vec::with_capacity(capacity)))
            .await?
        {
            Sink::Memory(v) => Ok(v),
            Sink::File(_) => Err(RegistryError::InvalidInput("blob sink changed".into())),
        }
    }

    /// Downloads blob `digest` (`size` bytes) of `r`'s repository into `file` (written from
    /// its current position, which should be its start; emptied and rewritten if the registry
    /// sends the whole blob again). Returns the file.
    pub async fn fetch_blob_to_file(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        file: std::fs::File,
    ) -> Result<std::fs::File, RegistryError> {
        match self.fetch_blob(r, digest, size, Sink::File(file)).await? {
            Sink::File(f) => Ok(f),
            Sink::Memory(_) => Err(RegistryError::InvalidInput("blob sink changed".into())),
        }
    }

    async fn fetch_blob(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        sink: Sink,
    ) -> Result<Sink, RegistryError> {
        let what = format!(
            "blob {digest} from registry {}/{}",
            r.registry(),
            r.repository()
        );
        check_sha256(digest).map_err(|e| e.context(&what))?;
        let endpoints = self.endpoints(r.registry())?;
        let inner = self.inner.clone();
        let (repo, digest) = (r.repository().to_owned(), digest.to_owned());
        self.spawned(async move {
            let mut op = BlobGet {
                repo: &repo,
                digest: &digest,
                size,
                sink,
                hasher: Sha256::new(),
                got: 0,
                high: 0,
                requests: AtomicU64::new(0),
            };
            inner
                .attempt(&what, &endpoints, Deadline::Transfer, &mut op)
                .await?;
            Ok(op.sink)
        })
        .await
    }
}
