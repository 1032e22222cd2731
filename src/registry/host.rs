//! Registry hosts and their endpoints: mirrors, then the host itself; URLs for messages.

use super::*;

// --------------------------------------------------------------------------------- endpoints

/// Where a blob can be read from: a mirror or the registry itself.
#[derive(Clone, Debug)]
pub(super) struct Endpoint {
    /// `scheme://host[:port][/prefix]`, no trailing slash.
    pub(super) base: Url,
    /// The key looked up in the docker config.json (`host[:port]`; `docker.io` for Hub).
    pub(super) cred_host: String,
    pub(super) is_mirror: bool,
}

impl Endpoint {
    pub(super) fn blob_url(&self, repo: &str, digest: &str) -> Result<Url, RegistryError> {
        self.api_url(repo, "blobs", digest)
    }

    /// `<base>/v2/<repo>/<kind>/<name>`: `kind` is `blobs`, `manifests` or `blobs/uploads`.
    pub(super) fn api_url(&self, repo: &str, kind: &str, name: &str) -> Result<Url, RegistryError> {
        let base = self.base.as_str().trim_end_matches('/');
        Url::parse(&format!("{base}/v2/{repo}/{kind}/{name}")).map_err(|e| {
            RegistryError::InvalidInput(format!(
                "bad {kind} URL from {}, {repo}, {name}: {e}",
                redact(&self.base)
            ))
        })
    }

    pub(super) fn label(&self) -> String {
        let kind = if self.is_mirror { "mirror " } else { "" };
        format!("{kind}{}", redact(&self.base).trim_end_matches('/'))
    }
}

/// Whether two URLs are the same origin (scheme, host, port): who may see our credentials.
pub(super) fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// `u` for messages and logs: without userinfo, query and fragment (a presigned URL carries
/// its signature in the query).
pub(super) fn redact(u: &Url) -> String {
    let mut r = u.clone();
    let _ = r.set_username("");
    let _ = r.set_password(None);
    r.set_query(None);
    r.set_fragment(None);
    r.to_string()
}

/// [`redact`] of a URL that may not parse: cut at the query, without userinfo.
pub(super) fn redact_str(s: &str) -> String {
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
pub(super) fn host_port(u: &Url) -> String {
    match (u.host_str(), u.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => String::new(),
    }
}

/// `host[:port]` of a registry reference or of a docker config.json key: scheme and path
/// dropped, lowercased, Docker Hub's aliases (`index.docker.io`, `registry-1.docker.io`,
/// `registry.hub.docker.com`) mapped to `docker.io`. The one place that knows them.
pub(crate) fn normalize_registry_host(s: &str) -> String {
    let s = s.trim();
    let s = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    let host = s.split('/').next().unwrap_or("").to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => host,
    }
}

/// The `host[:port]` the API of `registry` (as in a reference) is at: `registry-1.docker.io`
/// for Docker Hub, the registry itself (lowercased) otherwise.
pub(crate) fn registry_api_host(registry: &str) -> String {
    match normalize_registry_host(registry) {
        h if h == "docker.io" => "registry-1.docker.io".into(),
        h => h,
    }
}

/// Whether `registry` (`host[:port]`) is a loopback host: `localhost`, 127.0.0.0/8, `::1`.
pub(crate) fn is_loopback_host(registry: &str) -> bool {
    // host, host:port, [v6]:port, [v6]
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        match registry.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => registry,
        }
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether a registry named without a scheme is plain http: a loopback host (as docker does)
/// or one listed `insecure`.
pub(crate) fn plain_http_by_default(registry: &str, insecure: &[String]) -> bool {
    let registry = normalize_registry_host(registry);
    is_loopback_host(&registry)
        || insecure
            .iter()
            .any(|h| normalize_registry_host(h) == registry)
}

/// A mirror's base URL: `scheme://host[:port][/prefix]`, or a bare `host[:port][/prefix]`
/// (http if loopback or insecure, else https).
pub(super) fn mirror_url(s: &str, insecure: &[String]) -> Result<Url, String> {
    let s = s.trim().trim_end_matches('/');
    let full = if s.contains("://") {
        s.to_owned()
    } else {
        let host = s.split('/').next().unwrap_or("");
        let scheme = if plain_http_by_default(host, insecure) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{s}")
    };
    let u = Url::parse(&full).map_err(|e| e.to_string())?;
    if !(matches!(u.scheme(), "http" | "https") && u.host_str().is_some()) {
        return Err("not an http(s) URL with a host".into());
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err("a mirror URL takes no query or fragment".into());
    }
    Ok(u)
}

impl Registry {
    /// The endpoints of `registry` (`host[:port]` as in an image reference): its mirrors, then
    /// itself.
    pub(super) fn endpoints(&self, registry: &str) -> Result<Vec<Endpoint>, RegistryError> {
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
        let host = registry_api_host(registry);
        let url = |scheme: &str| {
            Url::parse(&format!("{scheme}://{host}")).map_err(|e| {
                RegistryError::InvalidInput(format!("registry host {registry:?}: {e}"))
            })
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
                return Err(RegistryError::Refused(format!(
                    "registry {registry}: {why}"
                )));
            }
        }
        out.push(Endpoint {
            base,
            cred_host: registry.to_owned(),
            is_mirror: false,
        });
        Ok(out)
    }

    /// The endpoint uploads to `registry` go to: the registry itself, never a mirror.
    pub(super) fn push_endpoint(&self, registry: &str) -> Result<Endpoint, RegistryError> {
        let eps = self.endpoints(registry)?;
        eps.into_iter()
            .find(|e| !e.is_mirror)
            .ok_or_else(|| RegistryError::InvalidInput(format!("registry {registry}: no endpoint")))
    }

    /// Trusts `registry` (`host[:port]` of a reference an operator typed, `ovbd convert` /
    /// `rpull`) as if `[registry] allow_hosts` listed its host (every port): a loopback or
    /// private registry the operator names is reached (loopback over plain http, as docker
    /// does); redirects and token realms it names are still checked.
    pub fn trust_named_registry(&self, registry: &str) -> Result<(), RegistryError> {
        let host = registry_api_host(registry);
        let mut pattern = HostPattern::parse(&host)
            .map_err(|e| RegistryError::InvalidInput(format!("registry host {registry:?}: {e}")))?;
        pattern.port = None;
        let mut named = self
            .inner
            .policy
            .named
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if !named.contains(&pattern) {
            named.push(pattern);
        }
        Ok(())
    }
}
