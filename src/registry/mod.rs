//! ovbd's one registry client: blobs read by HTTP Range GETs (the data source of lazily pulled
//! layers, [`RemoteBlob`]), and the pulls and pushes of `ovbd convert` and `ovbd rpull`
//! (manifests by tag or digest, whole blobs streamed with their digest checked, HEAD / upload /
//! manifest PUT: `image.rs`, `push.rs`), all through the endpoints, proxy, host policy, auth,
//! retries and deadlines below (a push goes to the registry itself, not its mirrors, with
//! tokens of scope `repository:NAME:pull,push`).
//!
//! [`Registry`] is shared by every blob: one HTTP client (reqwest, rustls with the ring provider
//! and the platform's trust roots, loaded at the first https handshake: `tls.rs`), the bearer
//! tokens per (endpoint, repository), the configuration, and a small tokio runtime of its own
//! on which every request runs. Callers block on a channel, never on a runtime, so
//! [`RemoteBlob`]'s `read_at` works from any plain thread of a process that has other runtimes
//! (`ovbd serve`).
//!
//! A read `GET`s `<endpoint>/v2/<repo>/blobs/<digest>` with `Range: bytes=a-b`:
//! - endpoints: the mirrors configured for the host, in order, then the host itself
//!   (`docker.io` is `registry-1.docker.io`); plain http for hosts listed `insecure` and
//!   allowed loopback hosts, https otherwise; every request through the configured proxy, if
//!   any;
//! - a `206` whose `Content-Range` is exactly the range asked is required; a `200` is accepted
//!   only when the whole blob was asked for;
//! - a read of a few ranges apart (a layer's head and tail, a refill's runs) asks for them in
//!   one request, `Range: bytes=a-b,c-d`, answered `multipart/byteranges` (`multipart.rs`); a
//!   registry that answers it otherwise (a `200` with the whole blob, as S3 does behind a
//!   redirect, whose body is then not read) is asked range by range, then and from then on;
//! - redirects (to blob storage) are followed by hand, up to [`MAX_REDIRECTS`]; the
//!   `Authorization` header goes only to the endpoint's own scheme/host/port;
//! - auth: anonymous first; a `401` challenge `Bearer realm,service` makes us fetch a token
//!   (`GET realm?service=..&scope=repository:<repo>:pull`, with the host's Basic
//!   credentials if it has some and the realm is on the endpoint's host (any port) or
//!   `[registry.auth_realms]` names it for the registry (built in: Docker Hub's), else
//!   anonymously; with an identity token instead, `POST realm` an OAuth2 `refresh_token`
//!   grant; `token` or `access_token`), cached per (endpoint, repo, access),
//!   refreshed when it expires (`expires_in`) or a request gets `401` again; a `Basic`
//!   challenge makes us send the credentials. Credentials ([`credentials`]: the docker
//!   config.json, re-read whenever authentication is needed, so a rotated password works
//!   without a restart; or the credential helpers it names, whose answers are kept a minute
//!   and forgotten when refused).
//!
//! Hosts: the registry of a lazily pulled layer comes from its image reference, which an
//! image's publisher chooses, so every request (endpoint, redirect hop, token realm) is
//! checked before it is sent (`HostPolicy`). Loopback (`localhost` too), link-local,
//! private (RFC 1918, RFC 6598 shared, IPv6 unique local), unspecified, multicast/reserved
//! and cloud metadata addresses (169.254.169.254, fd00:ec2::254, `metadata.google.internal`,
//! ...) are refused unless `[registry] allow_hosts` lists the host (`host[:port]`, no port:
//! every port); hosts listed `insecure` and the mirrors (root's configuration) count as
//! listed. IP literals are checked as written (the URL parser has normalised `2130706433` and
//! `::ffff:127.0.0.1`); names of hosts that are not listed go through a resolver that drops
//! forbidden addresses (`PublicResolver`). Through a proxy the proxy resolves names: only
//! literals and the names above are checked then. Plain http only to `insecure` hosts, http
//! mirrors and allowed loopback hosts, and never after an https hop (an https registry may
//! redirect to another host, not to http). A refusal is a permanent `PermissionDenied`.
//!
//! At most `MAX_CONCURRENT_REQUESTS` (32) requests are in flight to one endpoint (scheme, host,
//! port); each endpoint has its own slots, so a registry that never answers delays only the
//! reads of its own blobs.
//!
//! Faults: 5xx, 408, 429, connection errors, truncated bodies and stalls (no bytes for
//! `stall_timeout_secs`) are retried, resuming after the bytes already received, with
//! exponential backoff (100 ms doubling to 3 s, jittered; `Retry-After` honoured), at most
//! `retries` times and never past the read's deadline (`timeout_secs`). A mirror that fails is
//! skipped for the next endpoint (and left out of later rounds if it failed for good). 404,
//! 403, 416, auth failures and protocol violations from the host itself fail at once. Every
//! failure is a [`RegistryError`] naming host, repository, digest and range, classified
//! (transient, not found, denied, refused by the host policy, invalid response, invalid
//! input); a read's `io::Error` carries it. A whole-blob transfer is bounded by its stall
//! timeouts rather than a deadline, and resumes after the bytes received (`Range: bytes=N-`).
//! A read never hangs (the deadline bounds it, and a guard on the caller's wait as well).
//! Errors and log lines name URLs without their query and userinfo (a presigned redirect
//! carries its signature in the query).

use crate::config::RegistryConfig;
use crate::oci::digest::valid_digest;
use crate::oci::RegistryOptions;
use captured::Grant;
use credentials::{Credential, CredentialStore, HelperSetup};
use reqwest::header::{self, HeaderMap};
use reqwest::{StatusCode, Url};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

mod auth;
mod blob;
pub(crate) mod captured;
pub(crate) mod credentials;
mod error;
mod fetch;
mod host;
mod image;
#[cfg(test)]
mod image_tests;
pub(crate) mod multipart;
mod policy;
#[cfg(test)]
mod policy_tests;
mod push;
#[cfg(test)]
mod tests;
mod tls;

pub(crate) use auth::parse_challenges;
use auth::*;
pub use blob::RemoteBlob;
use blob::*;
use error::*;
pub use error::{find_registry_error, RegistryError};
use fetch::*;
pub(crate) use fetch::{parse_content_range, retry_after};
use host::*;
pub(crate) use host::{normalize_registry_host, registry_api_host};
use image::*;
use policy::*;
pub use push::Upload;

/// Redirect hops followed for one request.
pub const MAX_REDIRECTS: usize = 5;
/// A long read is split into range requests of at most this many bytes, fetched concurrently.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Requests in flight at once to one endpoint (scheme, host, port), all blobs together.
const MAX_CONCURRENT_REQUESTS: usize = 32;
/// Request slot tables kept for endpoints with no request in flight.
const MAX_IDLE_LIMITS: usize = 1024;
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);
/// A token is refreshed this long before the `expires_in` the token server gave.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);
/// Chunks of a file streamed as a request body.
const COPY_CHUNK: usize = 1 << 20;
/// Largest token response read.
const MAX_TOKEN_RESPONSE: usize = 1 << 20;

// ---------------------------------------------------------------------------------- registry

/// The shared part of every blob read: HTTP client, tokens, configuration. Send + Sync.
pub struct Registry {
    /// `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    inner: Arc<Inner>,
}

/// Auth state by (endpoint base URL, repository, access, CRI pull secret if one): a token got
/// with a layer's pull secret serves only the layers bound to that secret.
type AuthSlots = HashMap<(String, String, Access, Option<u64>), Arc<tokio::sync::Mutex<AuthSlot>>>;

struct Inner {
    /// For hosts that are not allowed: their names may not resolve to forbidden addresses.
    client: reqwest::Client,
    /// For hosts the configuration allows (`allow_hosts`, `insecure`, mirrors).
    trusted_client: reqwest::Client,
    /// The platform's trust roots both clients use, if not the test's own (tests: loaded yet?).
    #[cfg(test)]
    platform_roots: Option<Arc<tls::PlatformRoots>>,
    policy: HostPolicy,
    /// `insecure` hosts → http.
    opts: RegistryOptions,
    /// The hosts' credentials: docker config.json, credential helpers.
    creds: CredentialStore,
    /// Credentials of CRI pulls (`[cri_proxy]`), bound to the layers those pulls prepared.
    captured: Arc<captured::CapturedCredentials>,
    /// Mirrors by normalised host.
    mirrors: Vec<(String, Vec<Url>)>,
    timeout: Duration,
    stall: Duration,
    retries: u32,
    auth: Mutex<AuthSlots>,
    /// Request slots by endpoint origin: a slow or hostile registry holds only its own.
    limits: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    token_requests: AtomicU64,
    jitter: AtomicU64,
    /// Registries (`host[:port]`) that answered a request for several ranges with the whole
    /// blob or one range: asked range by range since.
    single_range: Mutex<HashSet<String>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("insecure", &self.inner.opts.insecure)
            .field("timeout", &self.inner.timeout)
            .field("retries", &self.inner.retries)
            .finish_non_exhaustive()
    }
}

impl Registry {
    pub fn new(cfg: &RegistryConfig) -> Result<Arc<Registry>, RegistryError> {
        Self::with_roots(cfg, Vec::new())
    }

    /// [`Registry::new`] trusting only `roots` for https, if there are some (tests: a
    /// self-signed server).
    fn with_roots(
        cfg: &RegistryConfig,
        roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    ) -> Result<Arc<Registry>, RegistryError> {
        let bad = |e: String| RegistryError::InvalidInput(e);
        cfg.validate().map_err(|e| bad(format!("{e:#}")))?;
        install_crypto_provider();
        #[cfg_attr(not(test), allow(unused_variables))]
        let (tls, platform_roots) = tls::client_config(&roots)
            .map_err(|e| bad(format!("the registry client's TLS configuration: {e}")))?;
        let opts = RegistryOptions {
            insecure: cfg.insecure.clone(),
            docker_config: cfg.docker_config.clone(),
            ..Default::default()
        };
        let mut mirrors = Vec::new();
        for m in &cfg.mirrors {
            let mut urls = Vec::new();
            for s in &m.mirrors {
                urls.push(mirror_url(s, &cfg.insecure).map_err(|e| {
                    bad(format!(
                        "[registry] mirror {:?} of {}: {e}",
                        redact_str(s),
                        m.host
                    ))
                })?);
            }
            mirrors.push((normalize_registry_host(&m.host), urls));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ovbd-registry")
            .enable_all()
            .build()
            .map_err(|e| RegistryError::local("starting the registry client's runtime", &e))?;
        let handle = rt.handle().clone();
        let policy = HostPolicy::new(cfg, &mirrors)?;
        let proxy_host =
            match &cfg.proxy {
                Some(p) => Some(Url::parse(p).ok().and_then(|u| url_host(&u)).ok_or_else(
                    || bad(format!("[registry] proxy {p:?}: not a URL with a host")),
                )?),
                None => None,
            };
        // Two clients: requests to allowed hosts resolve names as they are; the others through
        // a resolver that drops forbidden addresses. (The pools are per host anyway.)
        let make_client =
            |resolver: Option<PublicResolver>| -> Result<reqwest::Client, RegistryError> {
                let _enter = rt.enter();
                let mut b = reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .connect_timeout(Duration::from_secs_f64(cfg.connect_timeout_secs))
                    .pool_idle_timeout(Duration::from_secs(60))
                    .pool_max_idle_per_host(MAX_CONCURRENT_REQUESTS)
                    .tcp_nodelay(true)
                    .user_agent(concat!("ovbd/", env!("CARGO_PKG_VERSION")));
                b = match &cfg.proxy {
                    Some(p) => b.proxy(
                        reqwest::Proxy::all(p.as_str())
                            .map_err(|e| bad(format!("[registry] proxy {p:?}: {e}")))?,
                    ),
                    None => b.no_proxy(),
                };
                if let Some(r) = resolver {
                    b = b.dns_resolver(r);
                }
                b.tls_backend_preconfigured(tls.clone())
                    .build()
                    .map_err(|e| bad(format!("making the registry HTTP client: {e}")))
            };
        let client = make_client(Some(PublicResolver {
            // The proxy is root's choice, wherever it is.
            trusted: match &proxy_host {
                Some(HostName::Name(n)) => vec![n.clone()],
                _ => Vec::new(),
            },
        }))?;
        let trusted_client = make_client(None)?;
        Ok(Arc::new(Registry {
            rt: Some(rt),
            handle,
            inner: Arc::new(Inner {
                client,
                trusted_client,
                #[cfg(test)]
                platform_roots,
                policy,
                creds: CredentialStore::new(opts.docker_config_path(), HelperSetup::from_env()),
                captured: Arc::new(captured::CapturedCredentials::new(
                    captured::DEFAULT_TTL,
                    captured::DEFAULT_MAX_ENTRIES,
                )),
                opts,
                mirrors,
                timeout: Duration::from_secs_f64(cfg.timeout_secs),
                stall: Duration::from_secs_f64(cfg.stall_timeout_secs),
                retries: cfg.retries,
                auth: Mutex::new(HashMap::new()),
                limits: Mutex::new(HashMap::new()),
                token_requests: AtomicU64::new(0),
                single_range: Mutex::default(),
                jitter: AtomicU64::new(0x9E37_79B9_7F4A_7C15),
            }),
        }))
    }

    /// The credential store (tests: where its helpers are looked for).
    #[cfg(test)]
    pub(crate) fn credential_store(&self) -> &CredentialStore {
        &self.inner.creds
    }

    /// Where `[cri_proxy]` keeps the credentials of the pulls it forwards.
    pub(crate) fn captured_credentials(&self) -> Arc<captured::CapturedCredentials> {
        self.inner.captured.clone()
    }

    /// Token requests made so far (all endpoints).
    #[allow(dead_code)] // API for the daemon's stats, benchmarks and tests
    pub fn token_requests(&self) -> u64 {
        self.inner.token_requests.load(Relaxed)
    }

    /// Runs `fut` on the registry's runtime (where its connections live) and waits for it from
    /// any runtime; dropping the wait aborts it.
    async fn spawned<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, RegistryError>> + Send + 'static,
    ) -> Result<T, RegistryError> {
        let mut task = AbortOnDrop(self.handle.spawn(fut));
        (&mut task.0)
            .await
            .map_err(|e| RegistryError::transient(format!("registry request task: {e}")))?
    }

    /// Runs `fut` on the registry's runtime and waits for it on this (plain) thread, at most
    /// `guard` (a backstop: the futures have deadlines of their own).
    fn run<T: Send + 'static>(
        &self,
        guard: Duration,
        fut: impl Future<Output = io::Result<T>> + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        // The caller's span (a blob's, a device's) goes along: events there name it.
        let fut = tracing::Instrument::in_current_span(fut);
        let task = self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        match rx.recv_timeout(guard) {
            Ok(r) => r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                task.abort();
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {guard:?}"),
                ))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(io::Error::other(
                "the registry request task ended without an answer",
            )),
        }
    }
}

/// Installs ring as the process's rustls crypto provider (reqwest is built without a default
/// one); the only place that does. An error only says one is installed already.
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Drop for Registry {
    fn drop(&mut self) {
        // May be dropped inside another runtime (a daemon task): never block here.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
