//! The CRI proxy against a fake upstream image service and a registry that requires a token.

use super::*;
use crate::registry::{Registry, RemoteBlob};
use crate::testing::{push_blob, quick_config, random_bytes, registry_with_blob, Front, FrontAuth};
use k8s_cri::v1::{Image, ImageSpec};
use std::io;
use std::sync::Mutex;

/// What the fake upstream saw: (method, `containerd-namespace` header, request as Debug).
pub(crate) type Calls = Arc<Mutex<Vec<(String, Option<String>, String)>>>;

/// What the fake upstream does while it runs a PullImage (containerd: unpack, Prepare calls).
pub(crate) type OnPull = Arc<dyn Fn(&PullImageRequest) + Send + Sync>;

/// containerd's CRI image service, as far as the proxy can tell.
#[derive(Default)]
pub(crate) struct FakeUpstream {
    pub(crate) calls: Calls,
    pub(crate) on_pull: Option<OnPull>,
}

impl FakeUpstream {
    fn record<T: std::fmt::Debug>(&self, method: &str, req: &Request<T>) {
        let ns = req
            .metadata()
            .get("containerd-namespace")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.calls
            .lock()
            .unwrap()
            .push((method.into(), ns, format!("{:?}", req.get_ref())));
    }
}

#[tonic::async_trait]
impl ImageService for FakeUpstream {
    async fn list_images(
        &self,
        req: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        self.record("ListImages", &req);
        Ok(Response::new(ListImagesResponse {
            images: vec![Image {
                id: "sha256:listed".into(),
                ..Default::default()
            }],
        }))
    }
    async fn image_status(
        &self,
        req: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        self.record("ImageStatus", &req);
        Err(Status::not_found("no such image upstream"))
    }
    async fn pull_image(
        &self,
        req: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        self.record("PullImage", &req);
        if let Some(f) = &self.on_pull {
            f(req.get_ref());
        }
        let mut resp = Response::new(PullImageResponse {
            image_ref: "sha256:pulled".into(),
        });
        resp.metadata_mut()
            .insert("x-upstream", "containerd".parse().unwrap());
        Ok(resp)
    }
    async fn remove_image(
        &self,
        req: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        self.record("RemoveImage", &req);
        Ok(Response::new(RemoveImageResponse {}))
    }
    async fn image_fs_info(
        &self,
        req: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        self.record("ImageFsInfo", &req);
        Ok(Response::new(ImageFsInfoResponse::default()))
    }
}

pub(crate) fn serve_on<S>(rt: &tokio::runtime::Runtime, path: &std::path::Path, svc: S)
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<tonic::transport::Body>,
            Response = tonic::codegen::http::Response<tonic::body::BoxBody>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let listener = {
        let _enter = rt.enter();
        tokio::net::UnixListener::bind(path).unwrap()
    };
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
}

pub(crate) async fn client(path: PathBuf) -> ImageServiceClient<Channel> {
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            tokio::net::UnixStream::connect(path.clone())
        }))
        .await
        .unwrap();
    ImageServiceClient::new(channel)
}

pub(crate) fn pull_request(image: &str, auth: AuthConfig) -> Request<PullImageRequest> {
    let mut req = Request::new(PullImageRequest {
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        auth: Some(auth),
        sandbox_config: None,
    });
    req.metadata_mut()
        .insert("containerd-namespace", "k8s.io".parse().unwrap());
    req
}

fn read(blob: &RemoteBlob, len: usize) -> io::Result<Vec<u8>> {
    use ovbd_format::ReadAt as _;
    let mut buf = vec![0u8; len];
    let n = blob.read_at(&mut buf, 0)?;
    buf.truncate(n);
    Ok(buf)
}

/// Every ImageService call reaches the upstream as sent (message and namespace header) and
/// its answer comes back; a PullImage's auth then serves the lazy reads of that repository on
/// a registry whose token server wants it, and of no other repository.
#[test]
fn cri_proxy_forwards_and_pull_secret_reaches_lazy_reads() {
    use base64::Engine as _;
    let (reg, data, digest) = registry_with_blob(300_000, 21);
    let other = random_bytes(300_000, 22);
    let other_digest = push_blob(&reg.addr, "team-b/private", &other, None);
    let front = Front::start(
        &reg.addr,
        Some(FrontAuth::Bearer {
            uses: 1000,
            basic: Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
            )),
        }),
    );
    let registry = Registry::new(&quick_config()).unwrap();
    // The blob as read for a snapshot layer, and as read for none.
    let layer = std::path::PathBuf::from("/snapshots/1/fs");
    let blob = RemoteBlob::new(
        registry.clone(),
        &format!("{}/test/blob", front.addr),
        &digest,
        300_000,
    )
    .unwrap();
    let unbound = blob.clone();
    let blob = blob.for_layer(Some(&layer));
    // Without a captured pull secret the token server refuses: the lazy read fails.
    let e = read(&blob, 4096).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");

    let tmp = tempfile::tempdir().unwrap();
    let (up_sock, proxy_sock) = (
        tmp.path().join("containerd.sock"),
        tmp.path().join("cri.sock"),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let calls = Calls::default();
    serve_on(
        &rt,
        &up_sock,
        ImageServiceServer::new(FakeUpstream {
            calls: calls.clone(),
            // containerd's unpack: the snapshotter binds the pull's secret to the layer.
            on_pull: Some(Arc::new({
                let (captured, layer) = (registry.captured_credentials(), layer.clone());
                move |req: &PullImageRequest| {
                    let image = &req.image.as_ref().unwrap().image;
                    assert!(captured.bind(&layer, image).is_some(), "{image}");
                }
            })),
        }),
    );
    let proxy = {
        let _enter = rt.enter();
        ImageProxy::new(up_sock.clone(), registry.captured_credentials()).unwrap()
    };
    serve_on(&rt, &proxy_sock, proxy.into_service());

    let image = format!("{}/test/blob:v1", front.addr);
    rt.block_on(async {
        let mut c = client(proxy_sock.clone()).await;
        let resp = c
            .pull_image(pull_request(
                &image,
                AuthConfig {
                    username: "alice".into(),
                    password: "s3cret".into(),
                    server_address: front.addr.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
        assert_eq!(
            resp.metadata().get("x-upstream").unwrap().to_str().unwrap(),
            "containerd"
        );
        assert_eq!(resp.get_ref().image_ref, "sha256:pulled");
        let listed = c
            .list_images(Request::new(ListImagesRequest::default()))
            .await
            .unwrap();
        assert_eq!(listed.get_ref().images[0].id, "sha256:listed");
        let status = c
            .image_status(Request::new(ImageStatusRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(status.message(), "no such image upstream");
        c.remove_image(Request::new(RemoveImageRequest::default()))
            .await
            .unwrap();
        c.image_fs_info(Request::new(ImageFsInfoRequest::default()))
            .await
            .unwrap();
    });
    let calls = calls.lock().unwrap().clone();
    let methods: Vec<&str> = calls.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(
        methods,
        [
            "PullImage",
            "ListImages",
            "ImageStatus",
            "RemoveImage",
            "ImageFsInfo"
        ]
    );
    // The pull went upstream as it came: namespace header, image and auth.
    assert_eq!(calls[0].1.as_deref(), Some("k8s.io"));
    assert!(calls[0].2.contains(&image) && calls[0].2.contains("s3cret"));

    // Now the same lazy read authenticates with the pod's pull secret.
    assert_eq!(read(&blob, 4096).unwrap(), &data[..4096]);
    // Not a read for that layer (nor its token): refused.
    let e = read(&unbound, 4096).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    assert!(front
        .seen
        .lock()
        .unwrap()
        .iter()
        .any(|s| s.target.starts_with("/token") && s.authorization.is_some()));

    // Another repository on the same registry (a label could name it): not with this secret.
    let foreign = RemoteBlob::new(
        registry.clone(),
        &format!("{}/team-b/private", front.addr),
        &other_digest,
        300_000,
    )
    .unwrap()
    .for_layer(Some(&layer));
    let e = read(&foreign, 4096).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    drop(rt);
}

#[test]
fn cri_auth_config_to_credential() {
    use base64::Engine as _;
    let auth = |f: fn(&mut AuthConfig)| {
        let mut a = AuthConfig::default();
        f(&mut a);
        credential_of(&a)
    };
    assert_eq!(auth(|_| {}), Ok(Credential::Anonymous));
    let basic = Credential::Basic {
        username: "u".into(),
        password: "p:w".into(),
    };
    assert_eq!(
        auth(|a| {
            a.username = "u".into();
            a.password = "p:w".into()
        }),
        Ok(basic.clone())
    );
    let encoded = base64::engine::general_purpose::STANDARD.encode("u:p:w");
    let mut a = AuthConfig {
        auth: encoded,
        ..Default::default()
    };
    assert_eq!(credential_of(&a), Ok(basic));
    a.identity_token = "refresh".into();
    assert_eq!(
        credential_of(&a),
        Ok(Credential::IdentityToken("refresh".into()))
    );
    assert_eq!(
        auth(|a| a.registry_token = "bearer".into()),
        Ok(Credential::RegistryToken("bearer".into()))
    );
    let e = auth(|a| a.auth = "!!".into()).unwrap_err();
    assert!(e.contains("base64"), "{e}");
}
