//! Registry blobs read by HTTP Range GETs: the data source of lazily pulled layers.
//!
//! [`Registry`] is shared by every blob: one HTTP client (reqwest, rustls with the ring provider
//! and the platform's trust roots), the bearer tokens per (endpoint, repository), the
//! configuration, and a small tokio runtime of its own on which every request runs. Callers
//! block on a channel, never on a runtime, so [`RemoteBlob::read_at`] works from any plain
//! thread of a process that has other runtimes (`ovbd serve`).
//!
//! A read `GET`s `<endpoint>/v2/<repo>/blobs/<digest>` with `Range: bytes=a-b`:
//! - endpoints: the mirrors configured for the host, in order, then the host itself
//!   (`docker.io` is `registry-1.docker.io`); plain http for hosts listed `insecure` and
//!   allowed loopback hosts, https otherwise; every request through the configured proxy, if
//!   any;
//! - a `206` whose `Content-Range` is exactly the range asked is required; a `200` is accepted
//!   only when the whole blob was asked for;
//! - redirects (to blob storage) are followed by hand, up to [`MAX_REDIRECTS`]; the
//!   `Authorization` header goes only to the endpoint's own scheme/host/port;
//! - auth: anonymous first; a `401` challenge `Bearer realm,service` makes us fetch a token
//!   (`GET realm?service=..&scope=repository:<repo>:pull`, with the host's Basic
//!   credentials if it has some and the realm is on the endpoint's host (any port) or
//!   `[registry.auth_realms]` names it for the registry (built in: Docker Hub's), else
//!   anonymously; with an identity token instead, `POST realm` an OAuth2 `refresh_token`
//!   grant; `token` or `access_token`), cached per (endpoint, repo),
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
//! skipped for the next endpoint. 404, 403, 416, auth failures and protocol violations from the
//! host itself fail at once. Every failure is an `io::Error` naming host, repository, digest and
//! range; a read never hangs (the deadline bounds it, and a guard on the caller's wait as well).
//! Errors and log lines name URLs without their query and userinfo (a presigned redirect
//! carries its signature in the query).

pub(crate) mod credentials;

use crate::config::RegistryConfig;
use crate::oci::{normalize_registry_host, RegistryOptions};
use credentials::{Credential, CredentialStore, HelperSetup};
use reqwest::header::{self, HeaderMap};
use reqwest::{StatusCode, Url};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

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
/// Largest token response read.
const MAX_TOKEN_RESPONSE: usize = 1 << 20;

// ---------------------------------------------------------------------------------- failures

/// Why one request failed, and whether to try again.
#[derive(Debug, Clone, thiserror::Error)]
enum Failure {
    /// Worth retrying (5xx, 429, resets, truncation, stalls, timeouts).
    #[error("{msg}")]
    Transient {
        msg: String,
        retry_after: Option<Duration>,
    },
    /// Retrying will not help (404, 403, auth, protocol violations).
    #[error("{msg}")]
    Permanent { kind: io::ErrorKind, msg: String },
}

impl Failure {
    fn transient(msg: impl Into<String>) -> Failure {
        Failure::Transient {
            msg: msg.into(),
            retry_after: None,
        }
    }
    fn permanent(kind: io::ErrorKind, msg: impl Into<String>) -> Failure {
        Failure::Permanent {
            kind,
            msg: msg.into(),
        }
    }
    fn is_permanent(&self) -> bool {
        matches!(self, Failure::Permanent { .. })
    }
    fn kind(&self) -> io::ErrorKind {
        match self {
            Failure::Transient { .. } => io::ErrorKind::Other,
            Failure::Permanent { kind, .. } => *kind,
        }
    }
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::Transient { retry_after, .. } => *retry_after,
            Failure::Permanent { .. } => None,
        }
    }
}

/// A request error from reqwest: the connection, a timeout, the body. All worth retrying
/// except a request we could not even build.
fn http_failure(what: &str, e: reqwest::Error) -> Failure {
    // Its URL may be a presigned one: `what` names it, redacted.
    let e = e.without_url();
    // The chain carries the cause (connection refused, reset by peer, ...).
    let mut msg = format!("{what}: {e}");
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    if e.is_builder() {
        Failure::permanent(io::ErrorKind::InvalidInput, msg)
    } else if let Some(refused) = find_in_chain::<RefusedAddress>(&e) {
        // Our resolver refused the host's addresses: the same next time.
        Failure::permanent(
            io::ErrorKind::PermissionDenied,
            format!("{what}: {refused}"),
        )
    } else if is_certificate_error(&e) {
        // The same certificate next time: retrying will not help.
        Failure::permanent(io::ErrorKind::InvalidData, msg)
    } else {
        Failure::transient(msg)
    }
}

/// The first `E` in `e`'s chain (io::Error payloads included).
fn find_in_chain<'a, E: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        if let Some(inner) = err.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            if let Some(found) = find_in_chain::<E>(inner) {
                return Some(found);
            }
        }
        cur = err.source();
    }
    None
}

/// Whether a TLS certificate (the server's, or a CRL) was refused somewhere in `e`'s chain.
fn is_certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return matches!(
                tls,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::InvalidCertRevocationList(_)
            );
        }
        // io::Error's source() skips its own payload: look at the payload too.
        if let Some(inner) = err.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            if is_certificate_error(inner) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

// -------------------------------------------------------------------------------- challenges

/// One challenge of a `WWW-Authenticate` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// The `Bearer` and `Basic` challenges of `WWW-Authenticate` header values (RFC 7235:
/// `scheme param=value, param="quoted \" value", other-scheme ...`). Unknown schemes, token68
/// forms and malformed parts are skipped; never panics.
// Not the http-auth crate: its parser stops at the first token68 (`Negotiate abc==`), non-ASCII
// byte or double space after a scheme, losing the challenges after it.
pub(crate) fn parse_challenges<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Challenge> {
    let mut out = Vec::new();
    for v in values {
        for (scheme, params) in split_challenges(v) {
            let get = |k: &str| {
                params
                    .iter()
                    .find(|(pk, _)| pk.eq_ignore_ascii_case(k))
                    .map(|(_, pv)| pv.clone())
            };
            if scheme.eq_ignore_ascii_case("bearer") {
                if let Some(realm) = get("realm").filter(|r| !r.is_empty()) {
                    out.push(Challenge::Bearer {
                        realm,
                        service: get("service"),
                        scope: get("scope"),
                    });
                }
            } else if scheme.eq_ignore_ascii_case("basic") {
                out.push(Challenge::Basic);
            }
        }
    }
    out
}

/// `(scheme, [(param, value)])` of each challenge in one header value.
fn split_challenges(v: &str) -> Vec<(String, Vec<(String, String)>)> {
    let b = v.as_bytes();
    let mut i = 0;
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let is_delim = |c: u8| c.is_ascii_whitespace() || c == b',' || c == b'=' || c == b'"';
    while i < b.len() {
        while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b',') {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        if b[i] == b'=' || b[i] == b'"' {
            // Stray: a token68's padding or garbage. Skip one byte (ASCII, a char boundary).
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_delim(b[i]) {
            i += 1;
        }
        // Every delimiter is ASCII, so `start` and `i` are char boundaries.
        let token = &v[start..i];
        let mut j = i;
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        if j < b.len() && b[j] == b'=' {
            // A parameter of the current challenge.
            j += 1;
            while j < b.len() && b[j].is_ascii_whitespace() {
                j += 1;
            }
            let mut value = String::new();
            if j < b.len() && b[j] == b'"' {
                j += 1;
                let mut seg = j;
                while j < b.len() && b[j] != b'"' {
                    if b[j] == b'\\' && j + 1 < b.len() {
                        value.push_str(&v[seg..j]);
                        // The escaped char may be multi-byte: take the whole char.
                        let ch = v[j + 1..].chars().next().unwrap_or('\\');
                        value.push(ch);
                        j += 1 + ch.len_utf8();
                        seg = j;
                        continue;
                    }
                    j += 1;
                }
                value.push_str(&v[seg..j.min(b.len())]);
                j = (j + 1).min(b.len());
            } else {
                let vs = j;
                while j < b.len() && !(b[j].is_ascii_whitespace() || b[j] == b',') {
                    j += 1;
                }
                value.push_str(&v[vs..j]);
            }
            if let Some(last) = out.last_mut() {
                last.1.push((token.to_owned(), value));
            }
            i = j;
        } else {
            out.push((token.to_owned(), Vec::new()));
            i = j;
        }
    }
    out
}

// --------------------------------------------------------------------------------- endpoints

/// Where a blob can be read from: a mirror or the registry itself.
#[derive(Clone, Debug)]
struct Endpoint {
    /// `scheme://host[:port][/prefix]`, no trailing slash.
    base: Url,
    /// The key looked up in the docker config.json (`host[:port]`; `docker.io` for Hub).
    cred_host: String,
    is_mirror: bool,
}

impl Endpoint {
    fn blob_url(&self, repo: &str, digest: &str) -> Result<Url, Failure> {
        let base = self.base.as_str().trim_end_matches('/');
        Url::parse(&format!("{base}/v2/{repo}/blobs/{digest}")).map_err(|e| {
            Failure::permanent(
                io::ErrorKind::InvalidInput,
                format!(
                    "bad blob URL from {}, {repo}, {digest}: {e}",
                    redact(&self.base)
                ),
            )
        })
    }
    fn label(&self) -> String {
        let kind = if self.is_mirror { "mirror " } else { "" };
        format!("{kind}{}", redact(&self.base).trim_end_matches('/'))
    }
}

/// Whether two URLs are the same origin (scheme, host, port): who may see our credentials.
fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// `u` for messages and logs: without userinfo, query and fragment (a presigned URL carries
/// its signature in the query).
fn redact(u: &Url) -> String {
    let mut r = u.clone();
    let _ = r.set_username("");
    let _ = r.set_password(None);
    r.set_query(None);
    r.set_fragment(None);
    r.to_string()
}

/// [`redact`] of a URL that may not parse: cut at the query, without userinfo.
fn redact_str(s: &str) -> String {
    if let Ok(u) = Url::parse(s) {
        return redact(&u);
    }
    let s = s.split(['?', '#']).next().unwrap_or("");
    match s.split_once("://") {
        Some((scheme, rest)) => {
            let (auth, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = auth.rsplit('@').next().unwrap_or(auth);
            format!("{scheme}://{host}{path}")
        }
        None => s.to_owned(),
    }
}

/// `host[:port]` of a URL.
fn host_port(u: &Url) -> String {
    match (u.host_str(), u.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => String::new(),
    }
}

// ------------------------------------------------------------------------------------- hosts

/// Names of cloud metadata services (they resolve to link-local addresses in clouds).
const METADATA_NAMES: &[&str] = &[
    "metadata.google.internal",
    "metadata.goog",
    "metadata",
    "instance-data",
    "instance-data.ec2.internal",
];

/// A host of a URL or of the configuration: an IP address or a (lowercase) name.
#[derive(Clone, Debug, PartialEq, Eq)]
enum HostName {
    Ip(IpAddr),
    Name(String),
}

impl HostName {
    /// `name` (a trailing dot and case dropped) or an IP literal, `[v6]` or bare.
    fn parse(s: &str) -> HostName {
        let bare = s
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(s);
        match bare.parse::<IpAddr>() {
            // `::ffff:a.b.c.d` is a.b.c.d.
            Ok(ip) => HostName::Ip(ip.to_canonical()),
            Err(_) => HostName::Name(s.trim_end_matches('.').to_ascii_lowercase()),
        }
    }

    /// Why an image-named registry may not be here (before any DNS lookup), if so.
    fn forbidden(&self) -> Option<&'static str> {
        match self {
            HostName::Ip(ip) => forbidden_ip(*ip),
            HostName::Name(n) if n == "localhost" || n.ends_with(".localhost") => Some("loopback"),
            HostName::Name(n) if METADATA_NAMES.contains(&n.as_str()) => Some("cloud metadata"),
            HostName::Name(_) => None,
        }
    }

    fn is_loopback(&self) -> bool {
        self.forbidden() == Some("loopback")
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostName::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            HostName::Ip(ip) => write!(f, "{ip}"),
            HostName::Name(n) => f.write_str(n),
        }
    }
}

/// The host of an http(s) URL.
fn url_host(u: &Url) -> Option<HostName> {
    // The URL parser has turned every IPv4 spelling (`0x7f.1`, `2130706433`) into a.b.c.d.
    u.host_str().filter(|h| !h.is_empty()).map(HostName::parse)
}

/// What kind of address `ip` is, if no registry named by an image may be there: loopback,
/// link-local, private (RFC 1918, shared, unique local), unspecified, multicast/reserved, and
/// the cloud metadata services.
fn forbidden_ip(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                // NAT64: the IPv4 address inside decides.
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return forbidden_v4(Ipv4Addr::new(a, b, c, d));
            }
            if v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
                Some("cloud metadata")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if s[0] & 0xfe00 == 0xfc00 || s[0] & 0xffc0 == 0xfec0 {
                Some("private")
            } else if v6.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if matches!(
        o,
        [169, 254, 169, 254] | [169, 254, 170, 2] | [100, 100, 100, 200]
    ) {
        Some("cloud metadata")
    } else if o[0] == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_private() || (o[0] == 100 && o[1] & 0xc0 == 64) {
        // RFC 1918, and RFC 6598's shared space (carrier-grade NAT, some clouds' services).
        Some("private")
    } else if ip.is_multicast() || ip.is_broadcast() || o[0] >= 240 {
        Some("multicast or reserved")
    } else {
        None
    }
}

/// Token servers on another host than their registry that may have its credentials, built
/// in: Docker Hub's (`auth_realms` adds others).
const BUILTIN_AUTH_REALMS: &[(&str, &str)] = &[("docker.io", "auth.docker.io")];

/// A `host[:port]` entry of the configuration; no port: every port.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HostPattern {
    host: HostName,
    port: Option<u16>,
}

impl HostPattern {
    /// `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address; a scheme and a path
    /// are ignored (as in `insecure`).
    fn parse(s: &str) -> anyhow::Result<HostPattern> {
        let t = s.trim();
        let t = t
            .strip_prefix("https://")
            .or_else(|| t.strip_prefix("http://"))
            .unwrap_or(t);
        let t = t.split('/').next().unwrap_or("");
        let (host, port) = if t.parse::<Ipv6Addr>().is_ok() {
            (t, None)
        } else if let Some(rest) = t.strip_prefix('[') {
            let (h, after) = rest
                .split_once(']')
                .ok_or_else(|| anyhow::anyhow!("{s:?}: no closing ]"))?;
            match after.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if after.is_empty() => (h, None),
                None => anyhow::bail!("{s:?}: junk after ]"),
            }
        } else {
            match t.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (t, None),
            }
        };
        let port = port
            .map(|p| p.parse::<u16>().ok().filter(|&n| n > 0))
            .map(|p| p.ok_or_else(|| anyhow::anyhow!("{s:?}: not a port number")))
            .transpose()?;
        let host = HostName::parse(host);
        if let HostName::Name(n) = &host {
            anyhow::ensure!(
                !n.is_empty()
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')),
                "{s:?}: not a host name or IP address"
            );
        }
        Ok(HostPattern { host, port })
    }

    fn matches(&self, host: &HostName, port: u16) -> bool {
        self.host == *host && self.port.is_none_or(|p| p == port)
    }
}

/// A refusal of our resolver: a name of a host that is not allowed resolved only to
/// forbidden addresses. Found in a reqwest error's chain, it fails the request at once.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RefusedAddress(String);

/// The DNS resolver of requests to hosts that are not allowed: drops the forbidden addresses
/// a name resolves to (a name may not lead where its IP literal could not go).
struct PublicResolver {
    /// Resolved as they are (the proxy's host).
    trusted: Vec<String>,
}

impl reqwest::dns::Resolve for PublicResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str().to_owned();
        let trusted = self
            .trusted
            .iter()
            .any(|t| *t == name.trim_end_matches('.').to_ascii_lowercase());
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            if trusted {
                return Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs);
            }
            let (ok, refused): (Vec<_>, Vec<_>) = addrs
                .into_iter()
                .partition(|a| forbidden_ip(a.ip()).is_none());
            match (ok.is_empty(), refused.first()) {
                (true, Some(a)) => Err(Box::new(RefusedAddress(format!(
                    "{name} resolves to {}, a {} address; {ALLOW_HINT}",
                    a.ip(),
                    forbidden_ip(a.ip()).unwrap_or("forbidden")
                )))
                    as Box<dyn std::error::Error + Send + Sync>),
                _ => Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// What the refusal of a host says to do about it.
const ALLOW_HINT: &str = "lazily pulled layers reach loopback, link-local, private and cloud \
                          metadata addresses only on hosts listed in [registry] allow_hosts";

/// Which hosts requests may go to, and over what (see the module doc).
#[derive(Debug, Default)]
struct HostPolicy {
    /// `allow_hosts`, `insecure` and the mirrors' hosts.
    allowed: Vec<HostPattern>,
    /// `insecure`, normalised as [`normalize_registry_host`] does.
    insecure: Vec<String>,
    /// `(host, port)` of the mirrors configured `http://`.
    http_mirrors: Vec<(HostName, u16)>,
    /// Registry (normalised as [`normalize_registry_host`] does) → token servers on other
    /// hosts that may receive its credentials.
    auth_realms: Vec<(String, HostPattern)>,
}

impl HostPolicy {
    fn new(cfg: &RegistryConfig, mirrors: &[(String, Vec<Url>)]) -> anyhow::Result<HostPolicy> {
        let mut p = HostPolicy::default();
        for (key, list) in [
            ("allow_hosts", &cfg.allow_hosts),
            ("insecure", &cfg.insecure),
        ] {
            for s in list {
                p.allowed.push(
                    HostPattern::parse(s)
                        .map_err(|e| anyhow::anyhow!("[registry] {key} entry {e}"))?,
                );
            }
        }
        for (reg, realm) in BUILTIN_AUTH_REALMS {
            p.auth_realms
                .push((reg.to_string(), HostPattern::parse(realm)?));
        }
        for (reg, realms) in &cfg.auth_realms {
            for r in realms {
                let pattern = HostPattern::parse(r)
                    .map_err(|e| anyhow::anyhow!("[registry.auth_realms] {reg:?}: {e}"))?;
                p.auth_realms.push((normalize_registry_host(reg), pattern));
            }
        }
        p.insecure = cfg
            .insecure
            .iter()
            .map(|h| normalize_registry_host(h))
            .collect();
        for u in mirrors.iter().flat_map(|(_, urls)| urls) {
            let (Some(host), Some(port)) = (url_host(u), u.port_or_known_default()) else {
                continue;
            };
            if u.scheme() == "http" {
                p.http_mirrors.push((host.clone(), port));
            }
            p.allowed.push(HostPattern {
                host,
                port: Some(port),
            });
        }
        Ok(p)
    }

    /// Whether the configuration lists `u`'s host (and port).
    fn allows(&self, u: &Url) -> bool {
        match (url_host(u), u.port_or_known_default()) {
            (Some(h), Some(port)) => self.allowed.iter().any(|a| a.matches(&h, port)),
            _ => false,
        }
    }

    /// Why no request may go to `u`'s host, if so (DNS names: see [`PublicResolver`]).
    fn refusal(&self, u: &Url) -> Option<String> {
        let host = url_host(u)?;
        let why = host.forbidden()?;
        (!self.allows(u)).then(|| format!("{host} is a {why} address; {ALLOW_HINT}"))
    }

    /// Whether `u` may be plain http: an `insecure` host, an http mirror, or an allowed
    /// loopback host.
    fn plain_http_ok(&self, u: &Url) -> bool {
        let (Some(host), Some(port)) = (url_host(u), u.port_or_known_default()) else {
            return false;
        };
        self.insecure
            .contains(&normalize_registry_host(&host_port(u)))
            || self.http_mirrors.contains(&(host.clone(), port))
            || (host.is_loopback() && self.allows(u))
    }

    /// Whether `ep`'s credentials may go to the token server at `realm`: on the endpoint's own
    /// host (any port), or one `auth_realms` names for it.
    fn creds_may_go_to(&self, ep: &Endpoint, realm: &Url) -> bool {
        let (Some(host), Some(port)) = (url_host(realm), realm.port_or_known_default()) else {
            return false;
        };
        if url_host(&ep.base).as_ref() == Some(&host) {
            return true;
        }
        let key = normalize_registry_host(&ep.cred_host);
        self.auth_realms
            .iter()
            .any(|(reg, p)| *reg == key && p.matches(&host, port))
    }

    /// Checks one request's URL; `from_https`: an earlier hop (or the endpoint) was https.
    /// `Ok(true)`: an allowed host (resolved as it is).
    fn check(&self, u: &Url, from_https: bool) -> Result<bool, String> {
        if let Some(why) = self.refusal(u) {
            return Err(why);
        }
        match u.scheme() {
            "https" => {}
            "http" if from_https => {
                return Err("refusing to go from https to plain http".into());
            }
            "http" if !self.plain_http_ok(u) => {
                return Err(format!(
                    "refusing plain http to {}: not listed in [registry] insecure",
                    host_port(u)
                ));
            }
            "http" => {}
            other => return Err(format!("refusing a {other}: URL (http or https only)")),
        }
        Ok(self.allows(u))
    }
}

// ------------------------------------------------------------------------------------- auth

/// What we send to one (endpoint, repository), and how we got it.
#[derive(Default)]
struct AuthSlot {
    /// The `Authorization` value; `None`: anonymous.
    header: Option<String>,
    /// When a bearer token stops being good (`expires_in`).
    expires: Option<Instant>,
    /// The challenge that made us authenticate (to refresh without a 401 first).
    challenge: Option<Challenge>,
    /// Bumped on every change: a request that got 401 with an older generation retries with
    /// the newer credentials instead of authenticating again.
    generation: u64,
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

fn basic_header(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

// ---------------------------------------------------------------------------------- registry

/// The shared part of every blob read: HTTP client, tokens, configuration. Send + Sync.
pub struct Registry {
    /// `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    inner: Arc<Inner>,
}

/// Auth state by (endpoint base URL, repository).
type AuthSlots = HashMap<(String, String), Arc<tokio::sync::Mutex<AuthSlot>>>;

struct Inner {
    /// For hosts that are not allowed: their names may not resolve to forbidden addresses.
    client: reqwest::Client,
    /// For hosts the configuration allows (`allow_hosts`, `insecure`, mirrors).
    trusted_client: reqwest::Client,
    policy: HostPolicy,
    /// `insecure` hosts → http.
    opts: RegistryOptions,
    /// The hosts' credentials: docker config.json, credential helpers.
    creds: CredentialStore,
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
    pub fn new(cfg: &RegistryConfig) -> anyhow::Result<Arc<Registry>> {
        Self::with_roots(cfg, Vec::new())
    }

    /// [`Registry::new`] trusting only `roots` for https, if there are some (tests: a
    /// self-signed server).
    fn with_roots(
        cfg: &RegistryConfig,
        roots: Vec<reqwest::Certificate>,
    ) -> anyhow::Result<Arc<Registry>> {
        use anyhow::Context as _;
        cfg.validate()?;
        // reqwest is built without a default rustls provider; ring is ours. An error only says
        // a provider is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let opts = RegistryOptions {
            plain_http: false,
            insecure: cfg.insecure.clone(),
            docker_config: cfg.docker_config.clone(),
        };
        let mut mirrors = Vec::new();
        for m in &cfg.mirrors {
            let mut urls = Vec::new();
            for s in &m.mirrors {
                urls.push(mirror_url(s, &opts).with_context(|| {
                    format!("[registry] mirror {:?} of {}", redact_str(s), m.host)
                })?);
            }
            mirrors.push((normalize_registry_host(&m.host), urls));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ovbd-registry")
            .enable_all()
            .build()
            .context("starting the registry client's runtime")?;
        let handle = rt.handle().clone();
        let policy = HostPolicy::new(cfg, &mirrors)?;
        let proxy_host =
            match &cfg.proxy {
                Some(p) => Some(Url::parse(p).ok().and_then(|u| url_host(&u)).ok_or_else(
                    || anyhow::anyhow!("[registry] proxy {p:?}: not a URL with a host"),
                )?),
                None => None,
            };
        // Two clients: requests to allowed hosts resolve names as they are; the others through
        // a resolver that drops forbidden addresses. (The pools are per host anyway.)
        let make_client = |resolver: Option<PublicResolver>| -> anyhow::Result<reqwest::Client> {
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
                        .with_context(|| format!("[registry] proxy {p:?}"))?,
                ),
                None => b.no_proxy(),
            };
            if let Some(r) = resolver {
                b = b.dns_resolver(r);
            }
            if !roots.is_empty() {
                b = b.tls_certs_only(roots.clone());
            }
            b.build().context("making the registry HTTP client")
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
                policy,
                creds: CredentialStore::new(opts.docker_config_path(), HelperSetup::from_env()),
                opts,
                mirrors,
                timeout: Duration::from_secs_f64(cfg.timeout_secs),
                stall: Duration::from_secs_f64(cfg.stall_timeout_secs),
                retries: cfg.retries,
                auth: Mutex::new(HashMap::new()),
                limits: Mutex::new(HashMap::new()),
                token_requests: AtomicU64::new(0),
                jitter: AtomicU64::new(0x9E37_79B9_7F4A_7C15),
            }),
        }))
    }

    /// The credential store (tests: where its helpers are looked for).
    #[cfg(test)]
    pub(crate) fn credential_store(&self) -> &CredentialStore {
        &self.inner.creds
    }

    /// Token requests made so far (all endpoints).
    #[allow(dead_code)] // API for the daemon's stats, benchmarks and tests
    pub fn token_requests(&self) -> u64 {
        self.inner.token_requests.load(Relaxed)
    }

    /// The endpoints of `registry` (`host[:port]` as in an image reference): its mirrors, then
    /// itself.
    fn endpoints(&self, registry: &str) -> anyhow::Result<Vec<Endpoint>> {
        let norm = normalize_registry_host(registry);
        let mut out = Vec::new();
        if let Some((_, urls)) = self.inner.mirrors.iter().find(|(h, _)| *h == norm) {
            for u in urls {
                out.push(Endpoint {
                    base: u.clone(),
                    cred_host: host_port(u),
                    is_mirror: true,
                });
            }
        }
        let host = if norm == "docker.io" {
            "registry-1.docker.io".to_owned()
        } else {
            registry.to_ascii_lowercase()
        };
        let url = |scheme: &str| {
            Url::parse(&format!("{scheme}://{host}"))
                .map_err(|e| anyhow::anyhow!("registry host {registry:?}: {e}"))
        };
        // Plain http for `insecure` hosts and allowed loopback ones (as docker does).
        let http = url("http")?;
        let base = if self.inner.policy.plain_http_ok(&http) {
            http
        } else {
            url("https")?
        };
        // Refused now, unless a mirror may serve it.
        if out.is_empty() {
            if let Some(why) = self.inner.policy.refusal(&base) {
                anyhow::bail!("registry {registry}: {why}");
            }
        }
        out.push(Endpoint {
            base,
            cred_host: registry.to_owned(),
            is_mirror: false,
        });
        Ok(out)
    }

    /// Runs `fut` on the registry's runtime and waits for it on this (plain) thread, at most
    /// `guard` (a backstop: the futures have deadlines of their own).
    fn run<T: Send + 'static>(
        &self,
        guard: Duration,
        fut: impl Future<Output = io::Result<T>> + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
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

impl Drop for Registry {
    fn drop(&mut self) {
        // May be dropped inside another runtime (a daemon task): never block here.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A mirror's base URL: `scheme://host[:port][/prefix]`, or a bare `host[:port][/prefix]`
/// (http if loopback or insecure, else https).
fn mirror_url(s: &str, opts: &RegistryOptions) -> anyhow::Result<Url> {
    let s = s.trim().trim_end_matches('/');
    let full = if s.contains("://") {
        s.to_owned()
    } else {
        let host = s.split('/').next().unwrap_or("");
        let scheme = if opts.uses_plain_http(host) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{s}")
    };
    let u = Url::parse(&full).map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(
        matches!(u.scheme(), "http" | "https") && u.host_str().is_some(),
        "not an http(s) URL with a host"
    );
    anyhow::ensure!(
        u.query().is_none() && u.fragment().is_none(),
        "a mirror URL takes no query or fragment"
    );
    Ok(u)
}

impl Inner {
    fn slot(&self, ep: &Endpoint, repo: &str) -> Arc<tokio::sync::Mutex<AuthSlot>> {
        let key = (ep.base.as_str().to_owned(), repo.to_owned());
        let mut map = self.auth.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key).or_default().clone()
    }

    /// The request slots of `ep`'s origin.
    fn limit(&self, ep: &Endpoint) -> Arc<tokio::sync::Semaphore> {
        let key = ep.base.origin().ascii_serialization();
        let mut map = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_IDLE_LIMITS && !map.contains_key(&key) {
            // Image references name the hosts: forget the ones nobody is reading from.
            map.retain(|_, s| Arc::strong_count(s) > 1);
        }
        map.entry(key)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_REQUESTS)))
            .clone()
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let exp = BACKOFF_FIRST
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(BACKOFF_MAX);
        // splitmix64 of a counter: a jitter factor in [0.5, 1).
        let mut z = self.jitter.fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let frac = 0.5 + (z >> 11) as f64 / (1u64 << 53) as f64 / 2.0;
        exp.mul_f64(frac)
    }

    /// The credentials for `ep`: the docker config.json read now, or its helper's answer.
    async fn credentials(&self, ep: &Endpoint) -> Result<Credential, Failure> {
        self.creds.get(&ep.cred_host).await.map_err(|e| {
            Failure::permanent(
                io::ErrorKind::PermissionDenied,
                format!("credentials for {}: {e}", ep.cred_host),
            )
        })
    }

    /// Where `ep`'s credentials come from: the config file, or the helper it names.
    fn config_name(&self, ep: &Endpoint) -> String {
        self.creds.source_name(&ep.cred_host)
    }

    /// Authenticates to `ep` for `repo` after `challenge`: fills `slot`.
    async fn authenticate(
        &self,
        ep: &Endpoint,
        repo: &str,
        challenge: &Challenge,
        slot: &mut AuthSlot,
    ) -> Result<(), Failure> {
        let creds = self.credentials(ep).await?;
        let (header, expires) = match (challenge, &creds) {
            (_, Credential::RegistryToken(token)) => (format!("Bearer {token}"), None),
            (Challenge::Basic, Credential::Basic { username, password }) => {
                (basic_header(username, password), None)
            }
            (Challenge::Basic, Credential::Anonymous | Credential::IdentityToken(_)) => {
                // A refused or missing credential: the helper is asked again next time.
                self.creds.forget(&ep.cred_host);
                return Err(Failure::permanent(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} wants Basic credentials and {} has none for {}{}",
                        ep.label(),
                        self.config_name(ep),
                        ep.cred_host,
                        if creds.is_anonymous() {
                            ""
                        } else {
                            " (only an identity token, which goes to a Bearer token realm)"
                        }
                    ),
                ));
            }
            (
                Challenge::Bearer {
                    realm,
                    service,
                    scope: _,
                },
                creds,
            ) => {
                let (token, expires) = self
                    .fetch_token(ep, repo, realm, service, creds)
                    .await
                    .inspect_err(|_| self.creds.forget(&ep.cred_host))?;
                (format!("Bearer {token}"), expires)
            }
        };
        slot.header = Some(header);
        slot.expires = expires;
        slot.challenge = Some(challenge.clone());
        slot.generation += 1;
        Ok(())
    }

    async fn fetch_token(
        &self,
        ep: &Endpoint,
        repo: &str,
        realm: &str,
        service: &Option<String>,
        creds: &Credential,
    ) -> Result<(String, Option<Instant>), Failure> {
        let mut url = Url::parse(realm).map_err(|e| {
            Failure::permanent(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: bad token realm {:?}: {e}",
                    ep.label(),
                    redact_str(realm)
                ),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Failure::permanent(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: token realm {} is not http(s)",
                    ep.label(),
                    redact(&url)
                ),
            ));
        }
        // The realm as given: an identity token's grant is POSTed there, in a form.
        let realm_url = url.clone();
        let scope = format!("repository:{repo}:pull");
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", &scope);
        }
        let trusted = self
            .policy
            .check(&url, ep.base.scheme() == "https")
            .map_err(|why| {
                Failure::permanent(
                    io::ErrorKind::PermissionDenied,
                    format!("{}: token realm {}: {why}", ep.label(), redact(&url)),
                )
            })?;
        let client = if trusted {
            &self.trusted_client
        } else {
            &self.client
        };
        // Credentials only to the registry's own host, or a realm configured for them.
        let withheld = matches!(
            creds,
            Credential::Basic { .. } | Credential::IdentityToken(_)
        ) && !self.policy.creds_may_go_to(ep, &url);
        if withheld {
            log::warn!(
                "{}: token realm {} is not on the registry's host: asking it without the \
                 credentials for {} (see [registry.auth_realms])",
                ep.label(),
                redact(&url),
                ep.cred_host
            );
        }
        let (rb, what) = match (withheld, creds) {
            (false, Credential::Basic { username, password }) => (
                client
                    .get(url.clone())
                    .header(header::AUTHORIZATION, basic_header(username, password)),
                format!("token from {}", redact(&url)),
            ),
            (false, Credential::IdentityToken(refresh_token)) => (
                credentials::refresh_token_grant(
                    client,
                    realm_url.clone(),
                    service.as_deref(),
                    &scope,
                    refresh_token,
                ),
                format!("token from {} (refresh_token grant)", redact(&realm_url)),
            ),
            _ => (
                client.get(url.clone()),
                format!("token from {}", redact(&url)),
            ),
        };
        self.token_requests.fetch_add(1, Relaxed);
        let mut resp = tokio::time::timeout(self.stall, rb.send())
            .await
            .map_err(|_| Failure::transient(format!("{what}: no answer within {:?}", self.stall)))?
            .map_err(|e| http_failure(&what, e))?;
        let status = resp.status();
        if !status.is_success() {
            let msg = format!(
                "{what}: HTTP {status}{}",
                if withheld {
                    format!(
                        " (the credentials for {} in {} were not sent: the realm is not on \
                         the registry's host, and [registry.auth_realms] does not name it for \
                         {})",
                        ep.cred_host,
                        self.config_name(ep),
                        normalize_registry_host(&ep.cred_host)
                    )
                } else if creds.is_anonymous() {
                    format!(
                        " (anonymous: {} has no credentials for {})",
                        self.config_name(ep),
                        ep.cred_host
                    )
                } else if matches!(creds, Credential::IdentityToken(_)) {
                    format!(
                        " (with the identity token for {} from {})",
                        ep.cred_host,
                        self.config_name(ep)
                    )
                } else {
                    format!(
                        " (with the credentials for {} in {})",
                        ep.cred_host,
                        self.config_name(ep)
                    )
                }
            );
            return Err(
                if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                    Failure::Transient {
                        msg,
                        retry_after: retry_after(resp.headers()),
                    }
                } else {
                    Failure::permanent(io::ErrorKind::PermissionDenied, msg)
                },
            );
        }
        let mut body = Vec::new();
        loop {
            let chunk = tokio::time::timeout(self.stall, resp.chunk())
                .await
                .map_err(|_| Failure::transient(format!("{what}: stalled")))?
                .map_err(|e| http_failure(&what, e))?;
            let Some(chunk) = chunk else { break };
            if body.len() + chunk.len() > MAX_TOKEN_RESPONSE {
                return Err(Failure::permanent(
                    io::ErrorKind::InvalidData,
                    format!("{what}: response larger than {MAX_TOKEN_RESPONSE} bytes"),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            Failure::permanent(
                io::ErrorKind::InvalidData,
                format!("{what}: not a token response: {e}"),
            )
        })?;
        let token = parsed
            .token
            .filter(|t| !t.is_empty())
            .or(parsed.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| {
                Failure::permanent(
                    io::ErrorKind::InvalidData,
                    format!("{what}: neither token nor access_token in the response"),
                )
            })?;
        let expires = parsed.expires_in.filter(|&s| s > 0).map(|s| {
            let life = Duration::from_secs(s.min(86400 * 365));
            Instant::now() + life.saturating_sub(TOKEN_MARGIN).max(life / 2)
        });
        Ok((token, expires))
    }

    /// The `Authorization` to send to `ep` for `repo` now (refreshing an expired token first)
    /// and the slot's generation.
    async fn current_auth(
        &self,
        ep: &Endpoint,
        repo: &str,
        slot: &tokio::sync::Mutex<AuthSlot>,
    ) -> Result<(Option<String>, u64), Failure> {
        let mut s = slot.lock().await;
        if s.expires.is_some_and(|e| Instant::now() >= e) {
            match s.challenge.clone() {
                Some(c) => self.authenticate(ep, repo, &c, &mut s).await?,
                None => {
                    s.header = None;
                    s.expires = None;
                    s.generation += 1;
                }
            }
        }
        Ok((s.header.clone(), s.generation))
    }

    /// One GET of `url` for `[start, end]`, redirects followed. Returns the final response and
    /// whether it came from another origin than `url`'s.
    async fn send(
        &self,
        t: &Target,
        url: &Url,
        auth: Option<&str>,
        start: u64,
        end: u64,
    ) -> Result<(reqwest::Response, bool), Failure> {
        let mut cur = url.clone();
        let mut from_https = false;
        let mut from: Option<Url> = None;
        for _ in 0..=MAX_REDIRECTS {
            let trusted = self.policy.check(&cur, from_https).map_err(|why| {
                let msg = match &from {
                    Some(f) => format!("GET {}: redirected to {}: {why}", redact(f), redact(&cur)),
                    None => format!("GET {}: {why}", redact(&cur)),
                };
                Failure::permanent(io::ErrorKind::PermissionDenied, msg)
            })?;
            from_https |= cur.scheme() == "https";
            let client = if trusted {
                &self.trusted_client
            } else {
                &self.client
            };
            let foreign = !same_origin(&cur, url);
            let mut rb = client
                .get(cur.clone())
                .header(header::RANGE, format!("bytes={start}-{end}"));
            if let (false, Some(a)) = (foreign, auth) {
                rb = rb.header(header::AUTHORIZATION, a);
            }
            t.requests.fetch_add(1, Relaxed);
            let what = format!("GET {}", redact(&cur));
            let resp = tokio::time::timeout(self.stall, rb.send())
                .await
                .map_err(|_| {
                    Failure::transient(format!("{what}: no response within {:?}", self.stall))
                })?
                .map_err(|e| http_failure(&what, e))?;
            let status = resp.status();
            if matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
                let loc = resp
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        Failure::permanent(
                            io::ErrorKind::InvalidData,
                            format!("{what}: HTTP {status} without a Location"),
                        )
                    })?;
                let next = cur.join(loc).map_err(|e| {
                    Failure::permanent(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{what}: HTTP {status} to a bad Location {:?}: {e}",
                            redact_str(loc)
                        ),
                    )
                })?;
                if !matches!(next.scheme(), "http" | "https") {
                    return Err(Failure::permanent(
                        io::ErrorKind::InvalidData,
                        format!("{what}: redirect to {}, not http(s)", redact(&next)),
                    ));
                }
                log::trace!("{what}: redirected to {}", next.host_str().unwrap_or("?"));
                from = Some(std::mem::replace(&mut cur, next));
                continue;
            }
            return Ok((resp, foreign));
        }
        Err(Failure::permanent(
            io::ErrorKind::InvalidData,
            format!("GET {}: more than {MAX_REDIRECTS} redirects", redact(url)),
        ))
    }

    /// Reads `[offset + out.len(), offset + len)` of the blob from `ep` onto the end of `out`.
    /// On failure `out` keeps what did arrive (the next try resumes after it).
    async fn get_range(
        &self,
        t: &Target,
        ep: &Endpoint,
        offset: u64,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), Failure> {
        let start = offset + out.len() as u64;
        let end = offset + len as u64 - 1;
        let url = ep.blob_url(&t.repo, &t.digest)?;
        let slot = self.slot(ep, &t.repo);
        let mut refreshed = false;
        for _ in 0..4 {
            let (auth, generation) = self.current_auth(ep, &t.repo, &slot).await?;
            let (resp, foreign) = self.send(t, &url, auth.as_deref(), start, end).await?;
            if resp.status() == StatusCode::UNAUTHORIZED && !foreign {
                let challenges = parse_challenges(
                    resp.headers()
                        .get_all(header::WWW_AUTHENTICATE)
                        .iter()
                        .filter_map(|v| v.to_str().ok()),
                );
                let mut s = slot.lock().await;
                if s.generation != generation {
                    continue; // Someone else authenticated meanwhile: try theirs.
                }
                if refreshed {
                    return Err(Failure::permanent(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "GET {}: HTTP 401 Unauthorized even after authenticating \
                             (credentials for {} from {})",
                            redact(&url),
                            ep.cred_host,
                            self.config_name(ep)
                        ),
                    ));
                }
                let challenge = challenges
                    .iter()
                    .find(|c| matches!(c, Challenge::Bearer { .. }))
                    .or(challenges.first())
                    .cloned()
                    .ok_or_else(|| {
                        Failure::permanent(
                            io::ErrorKind::PermissionDenied,
                            format!(
                                "GET {}: HTTP 401 without a Bearer or Basic challenge",
                                redact(&url)
                            ),
                        )
                    })?;
                if auth.is_some() {
                    // What we sent was refused: a credential helper is asked again.
                    self.creds.forget(&ep.cred_host);
                }
                self.authenticate(ep, &t.repo, &challenge, &mut s).await?;
                refreshed = true;
                continue;
            }
            return read_body(t, resp, start, end, out, self.stall).await;
        }
        Err(Failure::permanent(
            io::ErrorKind::PermissionDenied,
            format!("GET {}: authentication did not settle", redact(&url)),
        ))
    }

    /// Reads `len` bytes at `offset` of the blob, trying every endpoint and retrying transient
    /// failures until `deadline`.
    async fn fetch(
        self: Arc<Self>,
        t: Arc<Target>,
        offset: u64,
        len: usize,
        deadline: Instant,
    ) -> io::Result<Vec<u8>> {
        let started = Instant::now();
        let fail = |kind: io::ErrorKind, msg: String| {
            io::Error::new(
                kind,
                format!(
                    "registry blob {} bytes {offset}..{}: {msg}",
                    t.name,
                    offset + len as u64
                ),
            )
        };
        let mut out = Vec::with_capacity(len);
        // The failures of this round of endpoints, and of the round before.
        let mut round: Vec<(String, Failure)> = Vec::new();
        let mut prev: Vec<(String, Failure)> = Vec::new();
        let mut attempt = 0u32;
        let describe = |round: &[(String, Failure)], prev: &[(String, Failure)]| {
            let errs = if round.is_empty() { prev } else { round };
            if errs.is_empty() {
                return "no endpoint answered".to_owned();
            }
            errs.iter()
                .map(|(ep, e)| format!("{ep}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        loop {
            attempt += 1;
            if !round.is_empty() {
                prev = std::mem::take(&mut round);
            }
            for ep in &t.endpoints {
                let limit = self.limit(ep);
                let _permit = match tokio::time::timeout_at(deadline, limit.acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Err(fail(io::ErrorKind::Other, "client closed".into())),
                    Err(_) => {
                        return Err(fail(
                            io::ErrorKind::TimedOut,
                            format!(
                                "deadline ({:?}) passed waiting for a request slot for {} \
                                 ({MAX_CONCURRENT_REQUESTS} requests in flight there); last \
                                 errors: {}",
                                self.timeout,
                                ep.label(),
                                describe(&round, &prev)
                            ),
                        ))
                    }
                };
                match tokio::time::timeout_at(
                    deadline,
                    self.get_range(&t, ep, offset, len, &mut out),
                )
                .await
                {
                    Err(_) => {
                        return Err(fail(
                            io::ErrorKind::TimedOut,
                            format!(
                                "deadline ({:?}) passed after {attempt} attempt(s), {} of {len} \
                                 bytes received; last errors: {}",
                                self.timeout,
                                out.len(),
                                describe(&round, &prev)
                            ),
                        ))
                    }
                    Ok(Ok(())) => {
                        if attempt > 1 || !round.is_empty() {
                            log::info!(
                                "registry blob {} bytes {offset}+{len}: read after {attempt} \
                                 attempt(s) in {:?}",
                                t.name,
                                started.elapsed()
                            );
                        }
                        return Ok(out);
                    }
                    Ok(Err(e)) => {
                        log::debug!(
                            "registry blob {} bytes {offset}+{len}: {}: {e}",
                            t.name,
                            ep.label()
                        );
                        let permanent = e.is_permanent();
                        let kind = e.kind();
                        round.push((ep.label(), e));
                        if permanent && !ep.is_mirror {
                            return Err(fail(kind, describe(&round, &prev)));
                        }
                    }
                }
            }
            if attempt > self.retries {
                return Err(fail(
                    io::ErrorKind::Other,
                    format!(
                        "gave up after {attempt} attempt(s): {}",
                        describe(&round, &prev)
                    ),
                ));
            }
            let mut delay = self.backoff(attempt);
            if let Some(ra) = round.iter().filter_map(|(_, e)| e.retry_after()).max() {
                delay = delay.max(ra);
            }
            if Instant::now() + delay >= deadline {
                return Err(fail(
                    io::ErrorKind::TimedOut,
                    format!(
                        "deadline ({:?}) too close for another attempt after {attempt}: {}",
                        self.timeout,
                        describe(&round, &prev)
                    ),
                ));
            }
            log::debug!(
                "registry blob {} bytes {offset}+{len}: retrying in {delay:?}",
                t.name
            );
            tokio::time::sleep(delay).await;
        }
    }
}

pub(crate) fn retry_after(h: &HeaderMap) -> Option<Duration> {
    h.get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(3600)))
}

/// `Content-Range: bytes a-b/total` → `(a, b, total)` (`None` total for `*`).
pub(crate) fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.trim().split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?, total))
}

/// Checks the response to a range request for `[start, end]` and appends its body to `out`.
async fn read_body(
    t: &Target,
    mut resp: reqwest::Response,
    start: u64,
    end: u64,
    out: &mut Vec<u8>,
    stall: Duration,
) -> Result<(), Failure> {
    let status = resp.status();
    let what = format!("GET {}", redact(resp.url()));
    let want = (end - start + 1) as usize;
    match status {
        StatusCode::PARTIAL_CONTENT => {
            let cr = resp
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_content_range);
            match cr {
                Some((a, b, total)) if a == start && b == end => {
                    if let Some(total) = total.filter(|&n| n != t.size) {
                        return Err(Failure::permanent(
                            io::ErrorKind::InvalidData,
                            format!(
                                "{what}: the blob is {total} bytes, its descriptor says {}",
                                t.size
                            ),
                        ));
                    }
                }
                other => {
                    return Err(Failure::permanent(
                        io::ErrorKind::InvalidData,
                        format!("{what}: asked for bytes {start}-{end}, got 206 with Content-Range {other:?}"),
                    ))
                }
            }
        }
        StatusCode::OK if start == 0 && end + 1 == t.size => {}
        StatusCode::OK => {
            return Err(Failure::permanent(
                io::ErrorKind::InvalidData,
                format!("{what}: asked for bytes {start}-{end}, got the whole blob (200): no Range support"),
            ))
        }
        s if s.is_server_error()
            || s == StatusCode::TOO_MANY_REQUESTS
            || s == StatusCode::REQUEST_TIMEOUT =>
        {
            return Err(Failure::Transient {
                msg: format!("{what}: HTTP {s}"),
                retry_after: retry_after(resp.headers()),
            })
        }
        StatusCode::NOT_FOUND => {
            return Err(Failure::permanent(
                io::ErrorKind::NotFound,
                format!("{what}: HTTP 404 Not Found (no such blob in this repository)"),
            ))
        }
        StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
            return Err(Failure::permanent(
                io::ErrorKind::PermissionDenied,
                format!("{what}: HTTP {status}"),
            ))
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            return Err(Failure::permanent(
                io::ErrorKind::InvalidInput,
                format!(
                    "{what}: HTTP 416 for bytes {start}-{end}: the blob is smaller than the {} bytes its descriptor says",
                    t.size
                ),
            ))
        }
        s => {
            return Err(Failure::permanent(
                io::ErrorKind::InvalidData,
                format!("{what}: unexpected HTTP {s}"),
            ))
        }
    }
    if let Some(n) = resp.content_length().filter(|&n| n != want as u64) {
        return Err(Failure::permanent(
            io::ErrorKind::InvalidData,
            format!("{what}: Content-Length {n}, asked for {want} bytes"),
        ));
    }
    let base = out.len();
    loop {
        let got = out.len() - base;
        let chunk = match tokio::time::timeout(stall, resp.chunk()).await {
            Err(_) => {
                return Err(Failure::transient(format!(
                    "{what}: stalled, no bytes for {stall:?} after {got} of {want}"
                )))
            }
            Ok(Err(e)) => {
                return Err(http_failure(
                    &format!("{what}: body broke off after {got} of {want} bytes"),
                    e,
                ))
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(c))) => c,
        };
        if got + chunk.len() > want {
            return Err(Failure::permanent(
                io::ErrorKind::InvalidData,
                format!("{what}: more than the {want} bytes asked for"),
            ));
        }
        t.fetched.fetch_add(chunk.len() as u64, Relaxed);
        out.extend_from_slice(&chunk);
    }
    let got = out.len() - base;
    if got < want {
        return Err(Failure::transient(format!(
            "{what}: truncated body, {got} of {want} bytes"
        )));
    }
    Ok(())
}

// ------------------------------------------------------------------------------------ blobs

/// What a blob read needs, shared with the request tasks.
struct Target {
    /// `host[:port]/repo@digest`, for messages.
    name: String,
    repo: String,
    digest: String,
    size: u64,
    endpoints: Vec<Endpoint>,
    fetched: AtomicU64,
    requests: AtomicU64,
}

/// A registry blob read by HTTP Range GETs; [`ovbd_format::ReadAt`].
#[derive(Clone)]
pub struct RemoteBlob {
    registry: Arc<Registry>,
    t: Arc<Target>,
}

impl fmt::Debug for RemoteBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteBlob")
            .field("name", &self.t.name)
            .field("size", &self.t.size)
            .finish_non_exhaustive()
    }
}

/// Whether `d` is `sha256:<64 lowercase hex>` or `sha512:<128 lowercase hex>` (safe as a file
/// name).
pub(crate) fn valid_digest(d: &str) -> bool {
    let Some((algo, hex)) = d.split_once(':') else {
        return false;
    };
    let want = match algo {
        "sha256" => 64,
        "sha512" => 128,
        _ => return false,
    };
    hex.len() == want && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl RemoteBlob {
    /// `image_ref` like "127.0.0.1:5000/library/app:v1" or "docker.io/library/busybox" (registry
    /// host and repo are taken from it); digest "sha256:..."; size in bytes.
    pub fn new(
        registry: Arc<Registry>,
        image_ref: &str,
        digest: &str,
        size: u64,
    ) -> anyhow::Result<RemoteBlob> {
        // The same parse as `ovbd convert` / `rpull` (and its checks), registry references only.
        let crate::oci::ImageRef::Registry(r) = crate::oci::ImageRef::parse(image_ref)? else {
            anyhow::bail!("image reference {image_ref:?} is not a registry reference");
        };
        anyhow::ensure!(
            valid_digest(digest),
            "blob digest {digest:?}: want sha256:<64 hex digits> (or sha512)"
        );
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
            }),
            registry,
        })
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
        self.registry
            .run(timeout + Duration::from_secs(10), async move {
                let deadline = Instant::now() + timeout;
                let mut tasks = Vec::with_capacity(pieces.len());
                for &(i, off, n) in &pieces {
                    let fut = inner.clone().fetch(t.clone(), off, n, deadline);
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

/// Aborts a spawned request when the read that wanted it gave up (another piece failed).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    use crate::testing::start_registry;
    use ovbd_format::ReadAt;

    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::Ordering::SeqCst;
    use std::time::Instant as StdInstant;

    // ------------------------------------------------------------------------ test helpers
    /// `ADDR/test/blob` (the repository [`registry_with_blob`] pushes to) through `registry`.
    fn test_blob(registry: &Arc<Registry>, addr: &str, digest: &str, size: u64) -> RemoteBlob {
        RemoteBlob::new(registry.clone(), &format!("{addr}/test/blob"), digest, size).unwrap()
    }

    fn read(blob: &RemoteBlob, off: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let n = blob.read_at(&mut buf, off)?;
        buf.truncate(n);
        Ok(buf)
    }

    // ------------------------------------------------------------------------------- units

    #[test]
    fn registry_parses_www_authenticate() {
        let c = parse_challenges([
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        ]);
        assert_eq!(
            c,
            vec![Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull".into()),
            }]
        );
        assert_eq!(
            parse_challenges([r#"Basic realm="Registry Realm""#]),
            vec![Challenge::Basic]
        );
        // Several challenges in one value, odd spacing, escapes, unquoted values, case.
        let c = parse_challenges([
            r#"Negotiate abc==, basic realm=x , BEARER  realm = "http://h/t\"x\"" , service=svc"#,
        ]);
        assert_eq!(
            c,
            vec![
                Challenge::Basic,
                Challenge::Bearer {
                    realm: "http://h/t\"x\"".into(),
                    service: Some("svc".into()),
                    scope: None,
                }
            ]
        );
        // Garbage never panics; a Bearer without a realm is no challenge.
        for junk in [
            "",
            "=",
            "\"",
            "Bearer",
            "Bearer realm",
            "Bearer realm=",
            "Bearer realm=\"unterminated",
            "Bearer realm=\"x\\",
            "Bearer realm=\"é\\é\"",
            ",,, ==\"\" Basic",
        ] {
            let _ = parse_challenges([junk]);
        }
        assert_eq!(parse_challenges(["Bearer service=x"]), vec![]);
        assert_eq!(
            parse_challenges(["Bearer realm=\"é\\é\""]),
            vec![Challenge::Bearer {
                realm: "éé".into(),
                service: None,
                scope: None
            }]
        );
        assert_eq!(
            parse_content_range("bytes 0-9/100"),
            Some((0, 9, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn registry_endpoints_hosts_schemes_mirrors() {
        let reg = Registry::new(&RegistryConfig {
            insecure: vec!["reg.local:5000".into()],
            mirrors: vec![crate::config::MirrorConfig {
                host: "docker.io".into(),
                mirrors: vec![
                    "https://mirror.example.com/prefix/".into(),
                    "10.0.0.1:5000".into(),
                    "localhost:5001".into(),
                ],
            }],
            allow_hosts: vec!["127.0.0.1:5000".into()],
            ..Default::default()
        })
        .unwrap();
        let urls = |r: &str| -> Vec<String> {
            reg.endpoints(r)
                .unwrap()
                .iter()
                .map(|e| {
                    e.blob_url("library/busybox", "sha256:00")
                        .unwrap()
                        .to_string()
                })
                .collect()
        };
        assert_eq!(
            urls("docker.io"),
            [
                "https://mirror.example.com/prefix/v2/library/busybox/blobs/sha256:00",
                "https://10.0.0.1:5000/v2/library/busybox/blobs/sha256:00",
                "http://localhost:5001/v2/library/busybox/blobs/sha256:00",
                "https://registry-1.docker.io/v2/library/busybox/blobs/sha256:00",
            ]
        );
        assert_eq!(urls("index.docker.io").len(), 4);
        assert_eq!(
            urls("reg.local:5000"),
            ["http://reg.local:5000/v2/library/busybox/blobs/sha256:00"]
        );
        assert_eq!(
            urls("127.0.0.1:5000"),
            ["http://127.0.0.1:5000/v2/library/busybox/blobs/sha256:00"]
        );
        // Loopback and private hosts that are not allowed (mirrors count): refused.
        for r in ["127.0.0.1:5001", "localhost:5000", "10.0.0.2:5000"] {
            let e = reg.endpoints(r).unwrap_err().to_string();
            assert!(e.contains("allow_hosts"), "{r}: {e}");
        }
        assert_eq!(urls("10.0.0.1:5000").len(), 1);
        assert_eq!(
            urls("ghcr.io"),
            ["https://ghcr.io/v2/library/busybox/blobs/sha256:00"]
        );
        let eps = reg.endpoints("docker.io").unwrap();
        assert_eq!(eps[0].cred_host, "mirror.example.com");
        assert_eq!(eps[3].cred_host, "docker.io");
        assert!(eps[0].is_mirror && !eps[3].is_mirror);

        let digest = format!("sha256:{}", "ab".repeat(32));
        let b = RemoteBlob::new(reg.clone(), "busybox", &digest, 10).unwrap();
        assert_eq!(b.name(), format!("docker.io/library/busybox@{digest}"));
        assert_eq!(b.repository(), "library/busybox");
        let b = RemoteBlob::new(reg.clone(), "127.0.0.1:5000/library/app:v1", &digest, 10).unwrap();
        assert_eq!(b.name(), format!("127.0.0.1:5000/library/app@{digest}"));
        // Nowait never fetches (nothing listens there, it would fail, not WouldBlock).
        let mut buf = [0u8; 4];
        assert_eq!(
            b.read_at_nowait(&mut buf, 0).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert_eq!(b.requests(), 0);
        for bad in ["sha256:AB", "md5:00", "sha256:../../etc/passwd", "sha256"] {
            assert!(
                RemoteBlob::new(reg.clone(), "busybox", bad, 1).is_err(),
                "{bad}"
            );
        }
        assert!(RemoteBlob::new(reg.clone(), "UPPER/Case:x:y", &digest, 1).is_err());
        assert!(RemoteBlob::new(reg.clone(), "Jdock00/library/app", &digest, 1).is_err());
        assert!(RemoteBlob::new(reg.clone(), "oci:/some/dir:v1", &digest, 1).is_err());
        assert!(Registry::new(&RegistryConfig {
            mirrors: vec![crate::config::MirrorConfig {
                host: "docker.io".into(),
                mirrors: vec!["ftp://x".into()],
            }],
            ..Default::default()
        })
        .is_err());
        assert!(Registry::new(&RegistryConfig {
            proxy: Some("::not a url".into()),
            ..Default::default()
        })
        .is_err());
    }

    // ------------------------------------------------------------------- against a registry

    #[test]
    fn registry_reads_random_ranges() {
        let (reg, data, digest) = registry_with_blob((3 << 20) + 17, 1);
        let registry = Registry::new(&quick_config()).unwrap();
        let blob = RemoteBlob::new(
            registry.clone(),
            &format!("{}/test/blob:v1", reg.addr),
            &digest,
            data.len() as u64,
        )
        .unwrap();
        check_random_ranges(&blob, &data, 30, 7);
        assert!(blob.fetched_bytes() > data.len() as u64);
        let before = (blob.fetched_bytes(), blob.requests());
        assert_eq!(read(&blob, 1000, 5000).unwrap(), &data[1000..6000]);
        assert_eq!(blob.fetched_bytes() - before.0, 5000);
        assert_eq!(blob.requests() - before.1, 1);
        // A long read is split into concurrent pieces.
        let before = blob.requests();
        assert_eq!(read(&blob, 0, data.len()).unwrap(), data);
        assert_eq!(
            blob.requests() - before,
            data.len().div_ceil(MAX_REQUEST_BYTES) as u64
        );
        // Several ranges at once.
        let got = blob
            .read_ranges(&[(5, 10), (3 << 20, 17), (100, 0)])
            .unwrap();
        assert_eq!(got[0], &data[5..15]);
        assert_eq!(got[1], &data[3 << 20..]);
        assert!(got[2].is_empty());
        assert!(blob.read_ranges(&[(data.len() as u64 - 1, 2)]).is_err());
        assert_eq!(registry.token_requests(), 0);

        // A wrong size in the descriptor is caught by Content-Range.
        let wrong = test_blob(&registry, &reg.addr, &digest, data.len() as u64 + 1);
        let e = read(&wrong, 0, 10).unwrap_err().to_string();
        assert!(e.contains("descriptor says"), "{e}");
    }

    #[test]
    fn registry_not_found_fails_at_once() {
        let (reg, data, _digest) = registry_with_blob(1000, 2);
        let registry = Registry::new(&RegistryConfig {
            retries: 5,
            timeout_secs: 20.0,
            ..quick_config()
        })
        .unwrap();
        let missing = format!("sha256:{}", "0".repeat(64));
        let blob = test_blob(&registry, &reg.addr, &missing, data.len() as u64);
        let t = StdInstant::now();
        let e = read(&blob, 0, 10).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let msg = e.to_string();
        assert!(
            msg.contains(&reg.addr) && msg.contains("test/blob") && msg.contains(&missing),
            "{msg}"
        );
        assert!(msg.contains("404"), "{msg}");
        assert_eq!(blob.requests(), 1);

        // 403 as well.
        let front = Front::start(&reg.addr, None);
        *front.always.lock().unwrap() = Some(Fault::Status(403));
        let blob = test_blob(&registry, &front.addr, &_digest, data.len() as u64);
        let t = StdInstant::now();
        let e = read(&blob, 0, 10).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(
            e.to_string().contains("403") && e.to_string().contains(&_digest),
            "{e}"
        );
        assert_eq!(blob.requests(), 1);
    }

    /// https with the ring provider and the platform's roots: a certificate nobody trusts is
    /// a permanent failure (not retried), and a mirror with one is skipped for the host.
    #[test]
    fn registry_https_untrusted_certificate() {
        let tmp = tempfile::tempdir().unwrap();
        let (cert, key) = test_certificate(tmp.path());
        let tls = start_registry(&format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            cert.display(),
            key.display()
        ));
        let registry = Registry::new(&quick_config()).unwrap();
        let url = format!("https://{}/v2/", tls.addr);
        let inner = registry.inner.clone();
        let e = registry
            .handle
            .block_on(async move { inner.client.get(url).send().await })
            .unwrap_err();
        let f = http_failure("GET", e);
        assert!(f.is_permanent(), "{f}");
        assert!(
            f.to_string().to_ascii_lowercase().contains("certificate"),
            "{f}"
        );

        let (reg, data, digest) = registry_with_blob(100_000, 15);
        let registry = Registry::new(&RegistryConfig {
            mirrors: vec![crate::config::MirrorConfig {
                host: reg.addr.clone(),
                mirrors: vec![format!("https://{}", tls.addr)],
            }],
            ..quick_config()
        })
        .unwrap();
        let blob = test_blob(&registry, &reg.addr, &digest, data.len() as u64);
        assert_eq!(read(&blob, 10, 100).unwrap(), &data[10..110]);
        assert_eq!(blob.requests(), 2);
    }

    /// htpasswd: Basic challenge, credentials from a config.json that is re-read when the
    /// registry refuses: a password fixed in the file works without a new Registry.
    #[test]
    fn registry_basic_auth_and_rotated_password() {
        // bcrypt of "ovbd-test-pass" (cost 4), as in image_io's tests.
        const HASH: &str = "$2b$04$mZwH7wGeEVlhyQEKuXlAQu/wM/RzhODQOto7p4KjrEKXtv6/P1hL.";
        let tmp = tempfile::tempdir().unwrap();
        let htpasswd = tmp.path().join("htpasswd");
        std::fs::write(&htpasswd, format!("ovbd:{HASH}\n")).unwrap();
        let reg = start_registry(&format!(
            "auth:\n  htpasswd:\n    realm: ovbd-test\n    path: {}\n",
            htpasswd.display()
        ));
        let good = basic_header("ovbd", "ovbd-test-pass");
        let data = random_bytes(600_000, 3);
        let digest = push_blob(&reg.addr, "private/blob", &data, Some(&good));
        let config = tmp.path().join("config.json");
        let write_config = |key: &str, entry: serde_json::Value| {
            std::fs::write(
                &config,
                serde_json::to_vec(&serde_json::json!({ "auths": { key: entry } })).unwrap(),
            )
            .unwrap();
        };
        let registry = Registry::new(&RegistryConfig {
            docker_config: Some(config.clone()),
            ..quick_config()
        })
        .unwrap();
        let blob = RemoteBlob::new(
            registry.clone(),
            &format!("{}/private/blob:v1", reg.addr),
            &digest,
            data.len() as u64,
        )
        .unwrap();

        // No config file: anonymous, refused at once.
        let t = StdInstant::now();
        let e = read(&blob, 0, 100).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("Basic credentials"), "{e}");
        assert!(e.to_string().contains(&digest), "{e}");

        // A wrong password: refused at once.
        write_config(
            &reg.addr,
            serde_json::json!({"username": "ovbd", "password": "wrong"}),
        );
        let e = read(&blob, 0, 100).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("401"), "{e}");

        // The password fixed in the file (base64 `auth`, https:// key): the same client works.
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode("ovbd:ovbd-test-pass");
        write_config(
            &format!("https://{}", reg.addr),
            serde_json::json!({ "auth": auth }),
        );
        check_random_ranges(&blob, &data, 10, 11);
        // The Basic header is cached: no re-authentication per read.
        let before = blob.requests();
        read(&blob, 7, 7).unwrap();
        assert_eq!(blob.requests() - before, 1);
        // Rotated again to a wrong one: the cached header still works until refused.
        write_config(
            &reg.addr,
            serde_json::json!({"username": "ovbd", "password": "nope"}),
        );
        assert_eq!(read(&blob, 8, 8).unwrap(), &data[8..16]);
    }

    /// A token server stand-in whose tokens are good for three requests: a 401 makes the
    /// client fetch a new token (with the config.json's Basic credentials) and go on.
    #[test]
    fn registry_bearer_token_expires_and_is_refetched() {
        let (reg, data, digest) = registry_with_blob(1 << 20, 4);
        let front = Front::start(
            &reg.addr,
            Some(FrontAuth::Bearer {
                uses: 3,
                basic: Some(basic_header("alice", "s3cret")),
            }),
        );
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("config.json");
        std::fs::write(
            &config,
            serde_json::to_vec(&serde_json::json!({
                "auths": { (format!("http://{}", front.addr)): { "username": "alice", "password": "s3cret" } }
            }))
            .unwrap(),
        )
        .unwrap();
        let registry = Registry::new(&RegistryConfig {
            docker_config: Some(config.clone()),
            ..quick_config()
        })
        .unwrap();
        let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
        let mut rng = Rng(5);
        for _ in 0..12 {
            let off = rng.below(data.len() as u64 - 5000);
            assert_eq!(
                read(&blob, off, 5000).unwrap(),
                &data[off as usize..off as usize + 5000]
            );
        }
        // 12 reads, 3 per token: 4 tokens at least (the first after an anonymous 401).
        let tokens = registry.token_requests();
        assert!((4..=6).contains(&tokens), "{tokens} token requests");
        let scopes = front.token_scopes.lock().unwrap().clone();
        assert!(
            scopes.iter().all(|s| s == "repository:test/blob:pull"),
            "{scopes:?}"
        );
        // The registry itself saw bearer tokens only; the Basic credentials went to /token.
        for s in front.seen.lock().unwrap().iter() {
            match &s.authorization {
                Some(a) if s.target.starts_with("/token") => assert!(a.starts_with("Basic ")),
                Some(a) => assert!(a.starts_with("Bearer tok-"), "{a}"),
                None => {}
            }
        }

        // Without credentials the token server refuses: a clear, immediate error.
        std::fs::write(&config, b"{}").unwrap();
        let registry2 = Registry::new(&RegistryConfig {
            docker_config: Some(config.clone()),
            ..quick_config()
        })
        .unwrap();
        let blob2 = test_blob(&registry2, &front.addr, &digest, data.len() as u64);
        let t = StdInstant::now();
        let e = read(&blob2, 0, 10).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("token from"), "{e}");
    }

    /// Blob GETs redirected to another host (blob storage): followed, without our
    /// Authorization.
    #[test]
    fn registry_redirect_drops_authorization() {
        let (reg, data, digest) = registry_with_blob(700_000, 6);
        let storage = Front::start(&reg.addr, None);
        let front = Front::start(&reg.addr, Some(FrontAuth::Basic(basic_header("u", "p"))));
        // `localhost` vs `127.0.0.1`: another host, not only another port.
        let port = storage.addr.rsplit(':').next().unwrap();
        *front.redirect.lock().unwrap() = Some(format!("http://localhost:{port}"));
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("config.json");
        std::fs::write(
            &config,
            serde_json::to_vec(&serde_json::json!({
                "auths": { (front.addr.clone()): { "username": "u", "password": "p" } }
            }))
            .unwrap(),
        )
        .unwrap();
        let registry = Registry::new(&RegistryConfig {
            docker_config: Some(config),
            // The storage's name is a loopback one too.
            allow_hosts: vec!["127.0.0.1".into(), "localhost".into()],
            ..quick_config()
        })
        .unwrap();
        let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
        check_random_ranges(&blob, &data, 5, 13);
        let seen = storage.seen.lock().unwrap().clone();
        assert!(seen.len() >= 5, "{seen:?}");
        assert!(seen.iter().all(|s| s.authorization.is_none()), "{seen:?}");
        assert!(seen.iter().all(|s| s.target.contains("signature=abc")));
        assert!(front
            .seen
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.authorization.as_deref() == Some(basic_header("u", "p").as_str())));
    }

    /// 503s, 429, resets, truncations and stalls are retried; the reads come back right.
    #[test]
    fn registry_retries_transient_faults() {
        let (reg, data, digest) = registry_with_blob(2 << 20, 8);
        let front = Front::start(&reg.addr, None);
        let registry = Registry::new(&RegistryConfig {
            timeout_secs: 20.0,
            retries: 6,
            stall_timeout_secs: 0.5,
            ..quick_config()
        })
        .unwrap();
        let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
        let cases: Vec<(&str, Vec<Fault>)> = vec![
            ("503 x3", vec![Fault::Status(503); 3]),
            (
                "429, 502, 500",
                vec![Fault::Status(429), Fault::Status(502), Fault::Status(500)],
            ),
            ("reset mid-body x2", vec![Fault::Reset, Fault::Reset]),
            ("truncated body", vec![Fault::Truncate]),
            ("stall mid-body", vec![Fault::Stall(Duration::from_secs(3))]),
            (
                "stall before headers",
                vec![Fault::StallHeaders(Duration::from_secs(3))],
            ),
            (
                "mixed",
                vec![Fault::Reset, Fault::Status(503), Fault::Truncate],
            ),
        ];
        for (i, (what, faults)) in cases.into_iter().enumerate() {
            let k = faults.len() as u64;
            front.push_faults(faults);
            let before = (blob.requests(), blob.fetched_bytes());
            let off = 1000 + i as u64 * 100_000;
            let len = 300_000;
            let t = StdInstant::now();
            let got = read(&blob, off, len).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(
                got == data[off as usize..off as usize + len],
                "{what}: wrong bytes"
            );
            assert!(
                front.faults.lock().unwrap().is_empty(),
                "{what}: faults left"
            );
            let requests = blob.requests() - before.0;
            assert_eq!(requests, k + 1, "{what}: {requests} requests");
            // Stalls are given up after the stall timeout, not waited out.
            assert!(
                t.elapsed() < Duration::from_secs(3),
                "{what}: {:?}",
                t.elapsed()
            );
            // A resumed read asks only for what is missing.
            let fetched = blob.fetched_bytes() - before.1;
            assert!(fetched < 2 * len as u64, "{what}: {fetched} bytes fetched");
        }
    }

    /// A registry that keeps failing, hangs or is gone: the read fails within its deadline.
    #[test]
    fn registry_failures_end_at_the_deadline() {
        let (reg, data, digest) = registry_with_blob(100_000, 9);
        let front = Front::start(&reg.addr, None);
        let deadline = Duration::from_millis(2500);
        let slack = Duration::from_millis(1500);
        let registry = Registry::new(&RegistryConfig {
            timeout_secs: deadline.as_secs_f64(),
            retries: 1000,
            stall_timeout_secs: 30.0,
            connect_timeout_secs: 1.0,
            allow_hosts: vec!["127.0.0.1".into()],
            ..Default::default()
        })
        .unwrap();
        let blob_at = |addr: &str| {
            RemoteBlob::new(
                registry.clone(),
                &format!("{addr}/test/blob"),
                &digest,
                data.len() as u64,
            )
            .unwrap()
        };
        let blob = blob_at(&front.addr);
        assert_eq!(read(&blob, 0, 1000).unwrap(), &data[..1000]);
        for (what, fault) in [
            ("always 503", Fault::Status(503)),
            (
                "hangs before headers",
                Fault::StallHeaders(Duration::from_secs(60)),
            ),
            ("hangs mid-body", Fault::Stall(Duration::from_secs(60))),
        ] {
            *front.always.lock().unwrap() = Some(fault);
            let t = StdInstant::now();
            let e = read(&blob, 0, 50_000).unwrap_err();
            let took = t.elapsed();
            assert!(took < deadline + slack, "{what}: failed after {took:?}");
            assert!(e.to_string().contains(&digest), "{what}: {e}");
            assert!(e.to_string().contains("test/blob"), "{what}: {e}");
        }
        *front.always.lock().unwrap() = None;
        assert_eq!(read(&blob, 5, 10).unwrap(), &data[5..15]);

        // Gone: nothing listens any more.
        let gone = blob_at(&reg.addr);
        assert_eq!(read(&gone, 0, 10).unwrap(), &data[..10]);
        drop(reg);
        let t = StdInstant::now();
        let e = read(&gone, 0, 10).unwrap_err();
        assert!(t.elapsed() < deadline + slack, "{:?}", t.elapsed());
        assert!(
            e.to_string().contains("deadline") || e.to_string().contains("gave up"),
            "{e}"
        );
        // The retries budget ends it before the deadline, too.
        let few = Registry::new(&RegistryConfig {
            timeout_secs: 60.0,
            retries: 2,
            ..quick_config()
        })
        .unwrap();
        let b =
            RemoteBlob::new(few, &format!("{}/test/blob", front.addr), &digest, 100_000).unwrap();
        *front.always.lock().unwrap() = Some(Fault::Status(500));
        let before = front.blob_gets();
        let t = StdInstant::now();
        let e = read(&b, 0, 10).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(e.to_string().contains("gave up after 3 attempt"), "{e}");
        assert_eq!(front.blob_gets() - before, 3);
    }

    /// Mirrors in order, then the host: dead or empty mirrors are skipped.
    #[test]
    fn registry_mirrors_then_host() {
        let (reg, data, digest) = registry_with_blob(300_000, 10);
        let empty = start_registry("");
        let dead = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let front = Front::start(&reg.addr, None);
        let registry = Registry::new(&RegistryConfig {
            timeout_secs: 4.0,
            retries: 1,
            mirrors: vec![crate::config::MirrorConfig {
                host: "registry.invalid".into(),
                mirrors: vec![
                    format!("http://{dead}"),
                    empty.addr.clone(),
                    format!("http://{}", front.addr),
                ],
            }],
            ..quick_config()
        })
        .unwrap();
        let blob = RemoteBlob::new(
            registry.clone(),
            "registry.invalid/test/blob:v1",
            &digest,
            data.len() as u64,
        )
        .unwrap();
        assert_eq!(read(&blob, 10, 1000).unwrap(), &data[10..1010]);
        // dead (refused), empty (404), front: three requests, the last one served.
        assert_eq!(blob.requests(), 3);
        assert_eq!(front.blob_gets(), 1);
        // Every mirror failing and the host unreachable: an error naming the host.
        *front.always.lock().unwrap() = Some(Fault::Status(404));
        let e = read(&blob, 0, 10).unwrap_err().to_string();
        assert!(e.contains("registry.invalid"), "{e}");

        // A host of its own behind the mirrors: reached when they fail.
        let registry = Registry::new(&RegistryConfig {
            mirrors: vec![crate::config::MirrorConfig {
                host: reg.addr.clone(),
                mirrors: vec![empty.addr.clone()],
            }],
            ..quick_config()
        })
        .unwrap();
        let blob = test_blob(&registry, &reg.addr, &digest, 300_000);
        check_random_ranges(&blob, &data, 3, 17);
    }

    /// Every request through the configured HTTP proxy (a P2P agent's place).
    #[test]
    fn registry_through_proxy() {
        let (reg, data, digest) = registry_with_blob(400_000, 12);
        let proxy = Front::start(&reg.addr, None);
        let registry = Registry::new(&RegistryConfig {
            proxy: Some(format!("http://{}", proxy.addr)),
            ..quick_config()
        })
        .unwrap();
        let blob = test_blob(&registry, &reg.addr, &digest, data.len() as u64);
        check_random_ranges(&blob, &data, 5, 19);
        let seen = proxy.seen.lock().unwrap().clone();
        assert!(seen.len() >= 5);
        let want = format!("http://{}/v2/test/blob/blobs/{digest}", reg.addr);
        assert!(seen.iter().all(|s| s.target == want), "{seen:?}");
    }

    /// The pieces of a long read are fetched at the same time, not one after another.
    #[test]
    fn registry_long_reads_are_concurrent() {
        let (reg, data, digest) = registry_with_blob(4 * MAX_REQUEST_BYTES, 14);
        let front = Front::start(&reg.addr, None);
        let registry = Registry::new(&quick_config()).unwrap();
        let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
        let delay = Duration::from_millis(400);
        front.push_faults(vec![Fault::Delay(delay); 4]);
        let t = StdInstant::now();
        assert!(read(&blob, 0, data.len()).unwrap() == data);
        assert!(t.elapsed() < delay * 3, "{:?}", t.elapsed());
        assert!(front.max_inflight.load(SeqCst) >= 2);
        assert_eq!(blob.requests(), 4);
    }

    // ------------------------------------------------------------------- hostile references

    /// The error of using `host/test/blob` through `registry`: at the blob's creation, else at
    /// its first read (which must fail).
    fn refusal(registry: &Arc<Registry>, host: &str, digest: &str, size: u64) -> io::Error {
        match RemoteBlob::new(registry.clone(), &format!("{host}/test/blob"), digest, size) {
            Err(e) => io::Error::new(io::ErrorKind::PermissionDenied, format!("{e:#}")),
            Ok(blob) => match read(&blob, 0, 10) {
                Err(e) => e,
                Ok(_) => panic!("{host}: read through a registry that is not allowed"),
            },
        }
    }

    /// Image references name their registry: loopback, link-local, private, unspecified and
    /// cloud metadata hosts are refused before anything is sent, unless `allow_hosts` (or
    /// `insecure`) lists them.
    #[test]
    fn registry_refuses_loopback_private_and_metadata_hosts() {
        let (reg, data, digest) = registry_with_blob(100_000, 31);
        let front = Front::start(&reg.addr, None);
        let port = front.addr.rsplit(':').next().unwrap().to_owned();
        let strict = Registry::new(&RegistryConfig {
            timeout_secs: 3.0,
            retries: 0,
            connect_timeout_secs: 1.0,
            ..Default::default()
        })
        .unwrap();
        for host in [
            front.addr.clone(),
            format!("localhost:{port}"),
            format!("0.0.0.0:{port}"),
            "127.1.2.3:5000".into(),
            "10.1.2.3:5000".into(),
            "172.16.0.1:5000".into(),
            "192.168.1.10".into(),
            "100.64.0.1:5000".into(),
            "169.254.169.254".into(),
            "169.254.1.1:5000".into(),
            "metadata.google.internal".into(),
        ] {
            let e = refusal(&strict, &host, &digest, data.len() as u64);
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{host}: {e}");
            assert!(e.to_string().contains("allow_hosts"), "{host}: {e}");
        }
        assert!(
            front.seen.lock().unwrap().is_empty(),
            "a refused host got a request"
        );

        // Listed: read over plain http, as before. A host without a port: every port.
        for allow in [front.addr.clone(), "127.0.0.1".into()] {
            let registry = Registry::new(&RegistryConfig {
                allow_hosts: vec![allow.clone()],
                ..quick_config()
            })
            .unwrap();
            let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
            assert_eq!(read(&blob, 5, 10).unwrap(), &data[5..15], "{allow}");
        }
        // Another port of the host, or another name for it: still refused.
        for (allow, host) in [
            ("127.0.0.1:1", front.addr.clone()),
            ("localhost", front.addr.clone()),
            ("127.0.0.1", format!("localhost:{port}")),
        ] {
            let registry = Registry::new(&RegistryConfig {
                allow_hosts: vec![allow.into()],
                ..quick_config()
            })
            .unwrap();
            let e = refusal(&registry, &host, &digest, data.len() as u64);
            assert_eq!(
                e.kind(),
                io::ErrorKind::PermissionDenied,
                "{allow} {host}: {e}"
            );
        }
        // A name listed is reached by name; a host listed `insecure` counts as allowed.
        for (allow, insecure, host) in [
            (
                vec!["localhost".to_owned()],
                vec![],
                format!("localhost:{port}"),
            ),
            (vec![], vec![front.addr.clone()], front.addr.clone()),
        ] {
            let registry = Registry::new(&RegistryConfig {
                allow_hosts: allow,
                insecure,
                ..quick_config()
            })
            .unwrap();
            let blob = test_blob(&registry, &host, &digest, data.len() as u64);
            assert_eq!(read(&blob, 0, 10).unwrap(), &data[..10], "{host}");
        }
    }

    /// Redirect targets are checked like registries: no loopback, private or metadata address
    /// that is not listed, and plain http only to `insecure` (or allowed loopback) hosts.
    #[test]
    fn registry_checks_every_redirect_target() {
        let (reg, data, digest) = registry_with_blob(100_000, 33);
        let storage = Front::start(&reg.addr, None);
        let port = storage.addr.rsplit(':').next().unwrap().to_owned();
        let front = Front::start(&reg.addr, None);
        let registry = Registry::new(&RegistryConfig {
            retries: 0,
            timeout_secs: 3.0,
            connect_timeout_secs: 1.0,
            allow_hosts: vec!["127.0.0.1".into(), "10.1.2.3".into()],
            ..quick_config()
        })
        .unwrap();
        let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
        for (target, why) in [
            (format!("http://localhost:{port}"), "allow_hosts"),
            ("http://169.254.169.254".to_owned(), "allow_hosts"),
            ("http://[fd00:ec2::254]".to_owned(), "allow_hosts"),
            ("http://192.168.1.1:5000".to_owned(), "allow_hosts"),
            ("http://10.1.2.3:9".to_owned(), "insecure"),
        ] {
            *front.redirect.lock().unwrap() = Some(target.clone());
            let e = read(&blob, 0, 10).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{target}: {e}");
            assert!(e.to_string().contains(why), "{target}: {e}");
        }
        assert!(storage.seen.lock().unwrap().is_empty());
        // To an allowed loopback host, followed.
        *front.redirect.lock().unwrap() = Some(format!("http://{}", storage.addr));
        assert_eq!(read(&blob, 0, 10).unwrap(), &data[..10]);
    }

    /// A redirect from https to plain http is refused, even to an allowed host.
    #[test]
    fn registry_refuses_https_to_http_redirects() {
        let (reg, data, digest) = registry_with_blob(100_000, 34);
        let sink = Front::start(&reg.addr, None);
        let tmp = tempfile::tempdir().unwrap();
        let (cert, key) = test_certificate(tmp.path());
        let tls = TlsRedirect::start(&cert, &key, &format!("http://{}", sink.addr));
        let root = reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
        // An https mirror (loopback registries are plain http) of a host that is not there.
        let registry = Registry::with_roots(
            &RegistryConfig {
                retries: 0,
                timeout_secs: 3.0,
                connect_timeout_secs: 1.0,
                mirrors: vec![crate::config::MirrorConfig {
                    host: "registry.invalid".into(),
                    mirrors: vec![format!("https://{}", tls.addr)],
                }],
                ..quick_config()
            },
            vec![root],
        )
        .unwrap();
        let blob = RemoteBlob::new(
            registry.clone(),
            "registry.invalid/test/blob",
            &digest,
            data.len() as u64,
        )
        .unwrap();
        let e = read(&blob, 0, 10).expect_err("read through an https -> http redirect");
        assert_eq!(tls.hits.load(SeqCst), 1, "{e}");
        assert!(e.to_string().contains("https to plain http"), "{e}");
        assert!(sink.seen.lock().unwrap().is_empty());
    }

    #[test]
    fn registry_redacts_urls() {
        for (u, want) in [
            ("http://u:p@h:1/a/b?sig=x#f", "http://h:1/a/b"),
            ("https://h/a?X-Amz-Signature=x", "https://h/a"),
            ("http://u:p@[zz/a?sig=x", "http://[zz/a"),
            ("no url?sig=x", "no url"),
        ] {
            assert_eq!(redact_str(u), want, "{u}");
        }
    }

    #[test]
    fn registry_host_patterns_and_forbidden_addresses() {
        for (ip, want) in [
            ("127.0.0.1", Some("loopback")),
            ("127.255.0.9", Some("loopback")),
            ("::1", Some("loopback")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("64:ff9b::7f00:1", Some("loopback")),
            ("169.254.169.254", Some("cloud metadata")),
            ("fd00:ec2::254", Some("cloud metadata")),
            ("100.100.100.200", Some("cloud metadata")),
            ("169.254.1.1", Some("link-local")),
            ("fe80::1", Some("link-local")),
            ("10.0.0.1", Some("private")),
            ("172.31.255.255", Some("private")),
            ("192.168.0.1", Some("private")),
            ("100.64.0.1", Some("private")),
            ("fd12::1", Some("private")),
            ("0.0.0.0", Some("unspecified")),
            ("0.1.2.3", Some("unspecified")),
            ("::", Some("unspecified")),
            ("224.0.0.1", Some("multicast or reserved")),
            ("255.255.255.255", Some("multicast or reserved")),
            ("ff02::1", Some("multicast")),
            ("1.2.3.4", None),
            ("172.32.0.1", None),
            ("100.128.0.1", None),
            ("2001:db8::1", None),
        ] {
            assert_eq!(forbidden_ip(ip.parse().unwrap()), want, "{ip}");
        }
        let p = |s: &str| HostPattern::parse(s).unwrap();
        let ip = |s: &str| HostName::Ip(s.parse().unwrap());
        let name = |s: &str| HostName::Name(s.into());
        assert_eq!(
            p("127.0.0.1:5000"),
            HostPattern {
                host: ip("127.0.0.1"),
                port: Some(5000)
            }
        );
        assert_eq!(
            p("localhost"),
            HostPattern {
                host: name("localhost"),
                port: None
            }
        );
        assert_eq!(
            p("[::1]:5000"),
            HostPattern {
                host: ip("::1"),
                port: Some(5000)
            }
        );
        assert_eq!(
            p("::1"),
            HostPattern {
                host: ip("::1"),
                port: None
            }
        );
        assert_eq!(
            p("[::1]"),
            HostPattern {
                host: ip("::1"),
                port: None
            }
        );
        assert_eq!(
            p("::ffff:127.0.0.1"),
            HostPattern {
                host: ip("127.0.0.1"),
                port: None
            }
        );
        assert_eq!(
            p(" Reg.Local.:5000"),
            HostPattern {
                host: name("reg.local"),
                port: Some(5000)
            }
        );
        assert_eq!(
            p("http://reg.local:5000/x"),
            HostPattern {
                host: name("reg.local"),
                port: Some(5000)
            }
        );
        for bad in [
            "",
            "reg:x",
            "reg:0",
            "reg:99999",
            "[::1",
            "[::1]x",
            "a b",
            ":5000",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
        }
        assert!(p("127.0.0.1").matches(&ip("127.0.0.1"), 1));
        assert!(p("127.0.0.1:5000").matches(&ip("127.0.0.1"), 5000));
        assert!(!p("127.0.0.1:5000").matches(&ip("127.0.0.1"), 5001));
        assert!(!p("localhost").matches(&ip("127.0.0.1"), 80));
        let e = Registry::new(&RegistryConfig {
            allow_hosts: vec!["reg:x".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("[registry] allow_hosts"), "{e:#}");
    }

    /// Names of hosts that are not allowed may not resolve to forbidden addresses (checked
    /// here below the name check: `localhost` resolves to 127.0.0.1); allowed hosts' may.
    #[test]
    fn registry_resolver_drops_forbidden_addresses() {
        let reg = start_registry("");
        let port = reg.addr.rsplit(':').next().unwrap().to_owned();
        let registry = Registry::new(&quick_config()).unwrap();
        let url = format!("http://localhost:{port}/v2/");
        let (inner, u) = (registry.inner.clone(), url.clone());
        let e = registry
            .handle
            .block_on(async move { inner.client.get(u).send().await })
            .unwrap_err();
        let f = http_failure("GET", e);
        assert!(f.is_permanent(), "{f}");
        assert_eq!(f.kind(), io::ErrorKind::PermissionDenied, "{f}");
        assert!(f.to_string().contains("resolves to 127.0.0.1"), "{f}");
        let inner = registry.inner.clone();
        let status = registry
            .handle
            .block_on(async move { inner.trusted_client.get(url).send().await })
            .unwrap()
            .status();
        assert_eq!(status, StatusCode::OK);
    }

    /// A registry's Basic credentials go to its token server only on the registry's own host,
    /// or on one `auth_realms` maps it to: a registry (or whoever answers for it) cannot have
    /// them sent elsewhere by naming another realm.
    #[test]
    fn registry_credentials_only_to_the_registrys_realm() {
        let (reg, data, digest) = registry_with_blob(100_000, 35);
        let front = Front::start(
            &reg.addr,
            Some(FrontAuth::Bearer {
                uses: 1000,
                basic: Some(basic_header("alice", "s3cret")),
            }),
        );
        let port = front.addr.rsplit(':').next().unwrap().to_owned();
        // The same token server under another host name (its tokens work for the front).
        *front.realm.lock().unwrap() = Some(format!("http://localhost:{port}/token"));
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("config.json");
        std::fs::write(
            &config,
            serde_json::to_vec(&serde_json::json!({
                "auths": { (front.addr.clone()): { "username": "alice", "password": "s3cret" } }
            }))
            .unwrap(),
        )
        .unwrap();
        let cfg = RegistryConfig {
            docker_config: Some(config),
            allow_hosts: vec!["127.0.0.1".into(), "localhost".into()],
            retries: 0,
            ..quick_config()
        };
        let token_auths = |front: &Front| -> Vec<Option<String>> {
            let seen = front.seen.lock().unwrap();
            seen.iter()
                .filter(|s| s.target.starts_with("/token"))
                .map(|s| s.authorization.clone())
                .collect()
        };
        let registry = Registry::new(&cfg).unwrap();
        let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
        let e = read(&blob, 0, 10).expect_err("credentials went to another host's realm");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("auth_realms"), "{e}");
        let auths = token_auths(&front);
        assert!(
            !auths.is_empty() && auths.iter().all(|a| a.is_none()),
            "{auths:?}"
        );

        // Mapped by the configuration: sent, and the read works.
        let registry = Registry::new(&RegistryConfig {
            auth_realms: [(front.addr.clone(), vec![format!("localhost:{port}")])].into(),
            ..cfg.clone()
        })
        .unwrap();
        let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
        assert_eq!(read(&blob, 0, 10).unwrap(), &data[..10]);
        let want = basic_header("alice", "s3cret");
        assert!(token_auths(&front).contains(&Some(want)));

        // A realm at a forbidden address is not even asked.
        *front.realm.lock().unwrap() = Some("http://169.254.169.254/token".into());
        let registry = Registry::new(&cfg).unwrap();
        let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
        let e = read(&blob, 0, 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("allow_hosts"), "{e}");
    }

    /// Credentials are looked up for the endpoint asked: a mirror never gets the upstream
    /// host's, nor the upstream host the mirror's.
    #[test]
    fn registry_mirror_and_host_credentials_stay_apart() {
        let (reg, data, digest) = registry_with_blob(100_000, 36);
        let host = Front::start(
            &reg.addr,
            Some(FrontAuth::Basic(basic_header("up", "up-pw"))),
        );
        let mirror = Front::start(
            &reg.addr,
            Some(FrontAuth::Basic(basic_header("mi", "mi-pw"))),
        );
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("config.json");
        let registry = Registry::new(&RegistryConfig {
            docker_config: Some(config.clone()),
            retries: 0,
            mirrors: vec![crate::config::MirrorConfig {
                host: host.addr.clone(),
                mirrors: vec![mirror.addr.clone()],
            }],
            ..quick_config()
        })
        .unwrap();
        let blob = test_blob(&registry, &host.addr, &digest, data.len() as u64);
        let write = |key: &str, user: &str, pass: &str| {
            std::fs::write(
                &config,
                serde_json::to_vec(&serde_json::json!({
                    "auths": { key: { "username": user, "password": pass } }
                }))
                .unwrap(),
            )
            .unwrap();
        };
        let auths = |f: &Front| -> Vec<String> {
            let seen = f.seen.lock().unwrap();
            seen.iter()
                .filter_map(|s| s.authorization.clone())
                .collect()
        };
        // Only the host's credentials: the mirror asks in vain, the host serves.
        write(&host.addr, "up", "up-pw");
        assert_eq!(read(&blob, 0, 10).unwrap(), &data[..10]);
        assert!(auths(&mirror).is_empty(), "{:?}", auths(&mirror));
        assert!(!auths(&host).is_empty());
        // Only the mirror's: the mirror serves; when it fails, the host is read with its own
        // (cached) credentials, never the mirror's.
        write(&mirror.addr, "mi", "mi-pw");
        assert_eq!(read(&blob, 20, 10).unwrap(), &data[20..30]);
        assert!(auths(&mirror).contains(&basic_header("mi", "mi-pw")));
        *mirror.always.lock().unwrap() = Some(Fault::Status(404));
        let before = auths(&host).len();
        assert_eq!(read(&blob, 40, 10).unwrap(), &data[40..50]);
        let sent = auths(&host)[before..].to_vec();
        assert!(!sent.is_empty(), "the host was not asked");
        assert!(
            sent.iter().all(|a| *a == basic_header("up", "up-pw")),
            "{sent:?}"
        );
        assert!(!auths(&host).contains(&basic_header("mi", "mi-pw")));
    }

    /// Which token servers may have a registry's credentials: its own host's, the ones
    /// `auth_realms` names for it, and the built-in one for Docker Hub.
    #[test]
    fn registry_auth_realms_per_registry() {
        let (hub, hub_realm) = BUILTIN_AUTH_REALMS[0];
        let reg = Registry::new(&RegistryConfig {
            auth_realms: [(
                "reg.invalid:5000".to_owned(),
                vec!["auth.invalid".to_owned()],
            )]
            .into(),
            ..Default::default()
        })
        .unwrap();
        let policy = &reg.inner.policy;
        let url = |s: &str| Url::parse(s).unwrap();
        let hub_ep = reg.endpoints(hub).unwrap().pop().unwrap();
        let ep = reg.endpoints("reg.invalid:5000").unwrap().pop().unwrap();
        let other = reg.endpoints("other.invalid").unwrap().pop().unwrap();
        for (ep, realm, ok) in [
            (&hub_ep, format!("https://{hub_realm}/token"), true),
            (&hub_ep, "https://auth.invalid/token".into(), false),
            (&ep, "https://reg.invalid:5001/token".into(), true),
            (&ep, "https://auth.invalid:8443/token".into(), true),
            (&ep, "https://sub.auth.invalid/token".into(), false),
            (&ep, format!("https://{hub_realm}/token"), false),
            (&other, "https://auth.invalid/token".into(), false),
            (&other, "https://other.invalid/token".into(), true),
        ] {
            assert_eq!(
                policy.creds_may_go_to(ep, &url(&realm)),
                ok,
                "{} {realm}",
                ep.label()
            );
        }
        assert!(Registry::new(&RegistryConfig {
            auth_realms: [("x".to_owned(), vec!["bad host".to_owned()])].into(),
            ..Default::default()
        })
        .is_err());
    }

    /// A registry that accepts connections and never answers holds only its own request slots:
    /// reads from another registry complete while its reads are all still pending.
    #[test]
    fn registry_blackholed_host_does_not_stall_others() {
        use std::sync::mpsc::{channel, TryRecvError};
        let (reg, data, digest) = registry_with_blob(100_000, 37);
        // Accepts, never answers; hands each connection over (kept open while held).
        let hole = TcpListener::bind("127.0.0.1:0").unwrap();
        let hole_addr = hole.local_addr().unwrap().to_string();
        let (conn_tx, conn_rx) = channel::<TcpStream>();
        std::thread::spawn(move || {
            for c in hole.incoming() {
                let Ok(c) = c else { return };
                if conn_tx.send(c).is_err() {
                    return;
                }
            }
        });
        let registry = Registry::new(&RegistryConfig {
            timeout_secs: 3600.0,
            stall_timeout_secs: 3600.0,
            retries: 0,
            ..quick_config()
        })
        .unwrap();
        // Registry A: more reads at once than one host has request slots.
        let a = test_blob(&registry, &hole_addr, &digest, data.len() as u64);
        let (a_tx, a_rx) = channel();
        let ranges = vec![(0u64, 10usize); MAX_CONCURRENT_REQUESTS + 4];
        std::thread::spawn(move || {
            let _ = a_tx.send(a.read_ranges(&ranges));
        });
        // (Hang guards only: on time, these come at once.)
        let guard = Duration::from_secs(120);
        let mut held = Vec::new();
        for i in 0..MAX_CONCURRENT_REQUESTS {
            held.push(
                conn_rx
                    .recv_timeout(guard)
                    .unwrap_or_else(|_| panic!("only {i} of A's requests connected")),
            );
        }
        // Registry B, meanwhile: read.
        let b = test_blob(&registry, &reg.addr, &digest, data.len() as u64);
        let (b_tx, b_rx) = channel();
        std::thread::spawn(move || {
            let _ = b_tx.send(read(&b, 100, 1000));
        });
        let got = b_rx
            .recv_timeout(guard)
            .expect("registry B's read waited for registry A's request slots");
        assert_eq!(got.unwrap(), &data[100..1100]);
        // ... and A's are all still pending, on no more connections than its slots.
        assert!(matches!(a_rx.try_recv(), Err(TryRecvError::Empty)));
        assert!(
            conn_rx.try_recv().is_err(),
            "more requests to A than its slots"
        );
        // A's connections closed (and no more taken): its reads fail.
        drop(held);
        drop(conn_rx);
        let e = a_rx
            .recv_timeout(guard)
            .expect("A's reads did not end")
            .unwrap_err();
        assert!(e.to_string().contains(&hole_addr), "{e}");
    }

    /// Presigned redirect URLs carry their signature in the query, mirror URLs may carry a
    /// password: errors (and log lines) name URLs without query and userinfo.
    #[test]
    fn registry_errors_hide_url_queries_and_userinfo() {
        let (reg, data, digest) = registry_with_blob(100_000, 38);
        let storage = Front::start(&reg.addr, None);
        let front = Front::start(&reg.addr, None);
        let dead = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let registry = Registry::new(&RegistryConfig {
            retries: 1,
            timeout_secs: 5.0,
            ..quick_config()
        })
        .unwrap();
        let blob = test_blob(&registry, &front.addr, &digest, data.len() as u64);
        for (what, target, fault, named) in [
            (
                "404",
                storage.addr.clone(),
                Some(Fault::Status(404)),
                storage.addr.clone(),
            ),
            (
                "503",
                storage.addr.clone(),
                Some(Fault::Status(503)),
                storage.addr.clone(),
            ),
            ("refused", dead.clone(), None, dead.clone()),
            ("bad Location", "[zz".into(), None, "Location".into()),
        ] {
            *front.redirect.lock().unwrap() = Some(format!("http://{target}"));
            *storage.always.lock().unwrap() = fault;
            let e = read(&blob, 0, 10).unwrap_err().to_string();
            assert!(!e.contains("secret"), "{what}: {e}");
            assert!(e.contains(&named), "{what}: {e}");
        }
        // Userinfo in a mirror URL.
        let registry = Registry::new(&RegistryConfig {
            retries: 0,
            timeout_secs: 5.0,
            mirrors: vec![crate::config::MirrorConfig {
                host: "registry.invalid".into(),
                mirrors: vec![format!("http://mirror-user:mirror-secret@{dead}")],
            }],
            ..quick_config()
        })
        .unwrap();
        let blob = RemoteBlob::new(registry, "registry.invalid/test/blob", &digest, 100).unwrap();
        let e = read(&blob, 0, 10).unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
        assert!(e.contains(&dead), "{e}");
    }
}
