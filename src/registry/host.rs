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
    pub(super) fn blob_url(&self, repo: &str, digest: &str) -> Result<Url, Failure> {
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

/// A mirror's base URL: `scheme://host[:port][/prefix]`, or a bare `host[:port][/prefix]`
/// (http if loopback or insecure, else https).
pub(super) fn mirror_url(s: &str, opts: &RegistryOptions) -> anyhow::Result<Url> {
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

impl Registry {
    /// The endpoints of `registry` (`host[:port]` as in an image reference): its mirrors, then
    /// itself.
    pub(super) fn endpoints(&self, registry: &str) -> anyhow::Result<Vec<Endpoint>> {
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
}
