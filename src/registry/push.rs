//! Pushing an image (`ovbd convert` to a registry): whether a blob is there (HEAD), a
//! monolithic upload (POST, then PUT with the digest), the manifest (PUT). To the registry
//! itself, never a mirror; tokens with the scope `repository:NAME:pull,push`.

use super::*;
use crate::oci::Reference;
use sha2::{Digest as _, Sha256};
use std::path::PathBuf;

/// A blob to upload.
pub enum Upload {
    Bytes(Vec<u8>),
    /// A file of `size` bytes.
    File {
        path: PathBuf,
        size: u64,
    },
}

struct BlobHead<'a> {
    repo: &'a str,
    digest: &'a str,
    requests: AtomicU64,
}

impl Attempt for BlobHead<'_> {
    type Output = bool;
    async fn once<'a>(
        &'a mut self,
        inner: &'a Inner,
        ep: &'a Endpoint,
    ) -> Result<bool, RegistryError> {
        let url = ep.blob_url(self.repo, self.digest)?;
        let req = Request::new(reqwest::Method::HEAD);
        let (resp, _) = inner
            .authorized(ep, self.repo, Access::Push, &self.requests, &req, &url)
            .await?;
        match resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(status_error(&format!("HEAD {}", redact(resp.url())), resp).await),
        }
    }
}

/// One upload session per try: POST for a location, PUT the whole blob there.
struct BlobUpload<'a> {
    repo: &'a str,
    digest: &'a str,
    body: &'a Upload,
    requests: AtomicU64,
}

impl Attempt for BlobUpload<'_> {
    type Output = ();
    async fn once<'a>(
        &'a mut self,
        inner: &'a Inner,
        ep: &'a Endpoint,
    ) -> Result<(), RegistryError> {
        let start = ep.api_url(self.repo, "blobs/uploads", "")?;
        let post = Request::new(reqwest::Method::POST).header(header::CONTENT_LENGTH, "0");
        let (resp, _) = inner
            .authorized(ep, self.repo, Access::Push, &self.requests, &post, &start)
            .await?;
        let what = format!("POST {}", redact(&start));
        if resp.status() != StatusCode::ACCEPTED {
            return Err(status_error(&what, resp).await);
        }
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                RegistryError::InvalidResponse(format!("{what}: HTTP 202 without a Location"))
            })?;
        let mut url = start.join(location).map_err(|e| {
            RegistryError::InvalidResponse(format!(
                "{what}: a bad upload Location {:?}: {e}",
                redact_str(location)
            ))
        })?;
        url.query_pairs_mut().append_pair("digest", self.digest);
        let payload = match self.body {
            Upload::Bytes(b) => Payload::Bytes(bytes::Bytes::copy_from_slice(b)),
            Upload::File { path, size } => Payload::File {
                path: path.clone(),
                size: *size,
            },
        };
        let put = Request::new(reqwest::Method::PUT)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(payload);
        // Our credentials go with the upload only where they went with the POST.
        let resp = if same_origin(&url, &ep.base) {
            inner
                .authorized(ep, self.repo, Access::Push, &self.requests, &put, &url)
                .await?
                .0
        } else {
            inner.send(&self.requests, &put, &url, None).await?.0
        };
        if resp.status() != StatusCode::CREATED {
            return Err(status_error(&format!("PUT {}", redact(&url)), resp).await);
        }
        Ok(())
    }
}

struct ManifestPut<'a> {
    repo: &'a str,
    name: &'a str,
    media_type: &'a str,
    raw: bytes::Bytes,
    digest: &'a str,
    requests: AtomicU64,
}

impl Attempt for ManifestPut<'_> {
    type Output = ();
    async fn once<'a>(
        &'a mut self,
        inner: &'a Inner,
        ep: &'a Endpoint,
    ) -> Result<(), RegistryError> {
        let url = ep.api_url(self.repo, "manifests", self.name)?;
        let req = Request::new(reqwest::Method::PUT)
            .header(header::CONTENT_TYPE, self.media_type)
            .body(Payload::Bytes(self.raw.clone()));
        let (resp, _) = inner
            .authorized(ep, self.repo, Access::Push, &self.requests, &req, &url)
            .await?;
        let what = format!("PUT {}", redact(&url));
        if resp.status() != StatusCode::CREATED {
            return Err(status_error(&what, resp).await);
        }
        let said = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        if let Some(said) = said.filter(|d| d.starts_with("sha256:") && *d != self.digest) {
            return Err(RegistryError::InvalidResponse(format!(
                "{what}: the registry stored digest {said}, the manifest's is {}",
                self.digest
            )));
        }
        Ok(())
    }
}

impl Registry {
    /// Whether `r`'s repository has blob `digest` (HEAD).
    pub async fn blob_exists(&self, r: &Reference, digest: &str) -> Result<bool, RegistryError> {
        let what = format!(
            "checking for blob {digest} in {}/{}",
            r.registry(),
            r.repository()
        );
        let ep = self.push_endpoint(r.registry())?;
        let inner = self.inner.clone();
        let (repo, digest) = (r.repository().to_owned(), digest.to_owned());
        self.spawned(async move {
            let mut op = BlobHead {
                repo: &repo,
                digest: &digest,
                requests: AtomicU64::new(0),
            };
            let deadline = Deadline::At(Instant::now() + inner.timeout);
            inner.attempt(&what, &[ep], deadline, &mut op).await
        })
        .await
    }

    /// Uploads `body` as blob `digest` of `r`'s repository (monolithic: one PUT).
    pub async fn push_blob(
        &self,
        r: &Reference,
        digest: &str,
        body: Upload,
    ) -> Result<(), RegistryError> {
        let what = format!(
            "pushing blob {digest} to {}/{}",
            r.registry(),
            r.repository()
        );
        if !valid_digest(digest) {
            return Err(RegistryError::InvalidInput(format!("{what}: not a digest")));
        }
        let ep = self.push_endpoint(r.registry())?;
        let inner = self.inner.clone();
        let (repo, digest) = (r.repository().to_owned(), digest.to_owned());
        self.spawned(async move {
            let mut op = BlobUpload {
                repo: &repo,
                digest: &digest,
                body: &body,
                requests: AtomicU64::new(0),
            };
            inner
                .attempt(&what, &[ep], Deadline::Transfer, &mut op)
                .await
        })
        .await
    }

    /// Stores `raw` (of `media_type`) as the manifest `r` names: its tag, else its digest
    /// (which must be the manifest's), else `latest`. Returns the manifest's digest.
    pub async fn push_manifest(
        &self,
        r: &Reference,
        media_type: &str,
        raw: Vec<u8>,
    ) -> Result<String, RegistryError> {
        let digest = sha256_of(&Sha256::new_with_prefix(&raw));
        let what = format!("pushing manifest {digest} to {}", r.whole());
        if let Some(d) = r.digest().filter(|d| *d != digest) {
            return Err(RegistryError::InvalidInput(format!(
                "{what}: the reference says {d} but the manifest's digest is {digest}"
            )));
        }
        let name = r.tag().or(r.digest()).unwrap_or("latest").to_owned();
        let ep = self.push_endpoint(r.registry())?;
        let inner = self.inner.clone();
        let (repo, media_type) = (r.repository().to_owned(), media_type.to_owned());
        self.spawned(async move {
            let mut op = ManifestPut {
                repo: &repo,
                name: &name,
                media_type: &media_type,
                raw: bytes::Bytes::from(raw),
                digest: &digest,
                requests: AtomicU64::new(0),
            };
            let deadline = Deadline::At(Instant::now() + inner.timeout);
            inner.attempt(&what, &[ep], deadline, &mut op).await?;
            Ok(digest)
        })
        .await
    }
}
