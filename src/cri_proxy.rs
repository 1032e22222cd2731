//! `[cri_proxy]`: a CRI image-service proxy that captures Kubernetes pull secrets.
//!
//! containerd never passes a pod's pull secret to a snapshotter, so the lazy reads of a private
//! image would go to the registry anonymously. The kubelet is pointed at our socket
//! (`--image-service-endpoint`); every `runtime.v1.ImageService` call is forwarded to
//! containerd's CRI as it came (message and metadata), and the auth of each `PullImage` is kept
//! in memory ([`CapturedCredentials`]) for the lazy layers containerd prepares while that pull
//! runs (and only for blobs of that same registry + repository). Secrets are never logged.

use crate::registry::captured::{CapturedCredentials, PullWindow};
use crate::registry::credentials::{basic_from_auth, Credential};
use containerd_snapshots::tonic::{
    self,
    transport::{Channel, Endpoint, Uri},
    Request, Response, Status,
};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::image_service_server::{ImageService, ImageServiceServer};
use k8s_cri::v1::{
    AuthConfig, ImageFsInfoRequest, ImageFsInfoResponse, ImageStatusRequest, ImageStatusResponse,
    ListImagesRequest, ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse,
};
use std::path::PathBuf;
use std::sync::Arc;

/// Forwards the CRI image service to `upstream`, capturing pull auth into `captured`.
pub(crate) struct ImageProxy {
    upstream: ImageServiceClient<Channel>,
    captured: Arc<CapturedCredentials>,
}

impl ImageProxy {
    /// A proxy to the CRI socket at `upstream`, connected on first use (containerd may start
    /// after us, or restart).
    pub(crate) fn new(
        upstream: PathBuf,
        captured: Arc<CapturedCredentials>,
    ) -> Result<ImageProxy, tonic::transport::Error> {
        let channel = Endpoint::try_from("http://[::]:50051")?.connect_with_connector_lazy(
            tower::service_fn(move |_: Uri| tokio::net::UnixStream::connect(upstream.clone())),
        );
        Ok(ImageProxy {
            upstream: ImageServiceClient::new(channel),
            captured,
        })
    }

    pub(crate) fn into_service(self) -> ImageServiceServer<ImageProxy> {
        ImageServiceServer::new(self)
    }

    /// Opens the window in which `req`'s auth binds to the layers containerd prepares.
    fn capture(&self, req: &PullImageRequest) -> Option<PullWindow> {
        let image = req.image.as_ref().map(|i| i.image.as_str()).unwrap_or("");
        let Some(auth) = &req.auth else {
            log::debug!("CRI PullImage {image:?}: no auth to keep");
            return None;
        };
        let credential = match credential_of(auth) {
            Ok(Credential::Anonymous) => {
                log::debug!("CRI PullImage {image:?}: empty auth");
                return None;
            }
            Ok(c) => c,
            Err(why) => {
                log::warn!("CRI PullImage {image:?}: auth not kept: {why}");
                return None;
            }
        };
        let kind = match &credential {
            Credential::Basic { .. } => "username/password",
            Credential::IdentityToken(_) => "identity token",
            Credential::RegistryToken(_) => "registry token",
            Credential::Anonymous => "none",
        };
        match self
            .captured
            .begin_pull(image, &auth.server_address, credential)
        {
            Ok((window, (registry, repo))) => {
                log::info!(
                    "CRI PullImage {image:?}: keeping its auth ({kind}) for the lazy reads of \
                     the {registry}/{repo} layers prepared during this pull"
                );
                Some(window)
            }
            Err(e) => {
                log::warn!("CRI PullImage: auth not kept: {e}");
                None
            }
        }
    }
}

/// The credential a CRI AuthConfig carries, in the order containerd's CRI reads it.
fn credential_of(auth: &AuthConfig) -> Result<Credential, String> {
    if !auth.identity_token.is_empty() {
        return Ok(Credential::IdentityToken(auth.identity_token.clone()));
    }
    if !auth.registry_token.is_empty() {
        return Ok(Credential::RegistryToken(auth.registry_token.clone()));
    }
    if !auth.username.is_empty() {
        return Ok(Credential::Basic {
            username: auth.username.clone(),
            password: auth.password.clone(),
        });
    }
    if !auth.auth.trim().is_empty() {
        return basic_from_auth(auth.auth.trim());
    }
    Ok(Credential::Anonymous)
}

/// `req` for the upstream with the caller's metadata (containerd's namespace header and the
/// like) and message.
fn forwarded<T>(req: Request<T>) -> Request<T> {
    let (metadata, _, message) = req.into_parts();
    Request::from_parts(metadata, Default::default(), message)
}

/// The upstream's answer (message and metadata) for our caller.
fn answered<T>(resp: Response<T>) -> Response<T> {
    let (metadata, message, _) = resp.into_parts();
    Response::from_parts(metadata, message, Default::default())
}

#[tonic::async_trait]
impl ImageService for ImageProxy {
    async fn list_images(
        &self,
        req: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let mut up = self.upstream.clone();
        up.list_images(forwarded(req)).await.map(answered)
    }

    async fn image_status(
        &self,
        req: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        let mut up = self.upstream.clone();
        up.image_status(forwarded(req)).await.map(answered)
    }

    async fn pull_image(
        &self,
        req: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        // Open until containerd answers (or the kubelet gives up): it prepares the lazy layers
        // while the pull runs.
        let _window = self.capture(req.get_ref());
        let mut up = self.upstream.clone();
        up.pull_image(forwarded(req)).await.map(answered)
    }

    async fn remove_image(
        &self,
        req: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let mut up = self.upstream.clone();
        up.remove_image(forwarded(req)).await.map(answered)
    }

    async fn image_fs_info(
        &self,
        req: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        let mut up = self.upstream.clone();
        up.image_fs_info(forwarded(req)).await.map(answered)
    }
}

#[cfg(test)]
#[path = "cri_proxy_tests.rs"]
pub(crate) mod tests;
