//! Which hosts requests may go to (the SSRF guard): forbidden addresses, allowed hosts,
//! the resolver that drops forbidden addresses.

use super::*;

// ------------------------------------------------------------------------------------- hosts

/// Names of cloud metadata services (they resolve to link-local addresses in clouds).
pub(super) const METADATA_NAMES: &[&str] = &[
    "metadata.google.internal",
    "metadata.goog",
    "metadata",
    "instance-data",
    "instance-data.ec2.internal",
];

/// A host of a URL or of the configuration: an IP address or a (lowercase) name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum HostName {
    Ip(IpAddr),
    Name(String),
}

impl HostName {
    /// `name` (a trailing dot and case dropped) or an IP literal, `[v6]` or bare.
    pub(super) fn parse(s: &str) -> HostName {
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
    pub(super) fn forbidden(&self) -> Option<&'static str> {
        match self {
            HostName::Ip(ip) => forbidden_ip(*ip),
            HostName::Name(n) if n == "localhost" || n.ends_with(".localhost") => Some("loopback"),
            HostName::Name(n) if METADATA_NAMES.contains(&n.as_str()) => Some("cloud metadata"),
            HostName::Name(_) => None,
        }
    }

    pub(super) fn is_loopback(&self) -> bool {
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
pub(super) fn url_host(u: &Url) -> Option<HostName> {
    // The URL parser has turned every IPv4 spelling (`0x7f.1`, `2130706433`) into a.b.c.d.
    u.host_str().filter(|h| !h.is_empty()).map(HostName::parse)
}

/// What kind of address `ip` is, if no registry named by an image may be there: loopback,
/// link-local, private (RFC 1918, shared, unique local), unspecified, multicast/reserved, and
/// the cloud metadata services.
pub(super) fn forbidden_ip(ip: IpAddr) -> Option<&'static str> {
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

pub(super) fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
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
pub(super) const BUILTIN_AUTH_REALMS: &[(&str, &str)] = &[("docker.io", "auth.docker.io")];

/// A `host[:port]` entry of the configuration; no port: every port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct HostPattern {
    pub(super) host: HostName,
    pub(super) port: Option<u16>,
}

impl HostPattern {
    /// `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address; a scheme and a path
    /// are ignored (as in `insecure`).
    pub(super) fn parse(s: &str) -> Result<HostPattern, String> {
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
                .ok_or_else(|| format!("{s:?}: no closing ]"))?;
            match after.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if after.is_empty() => (h, None),
                None => return Err(format!("{s:?}: junk after ]")),
            }
        } else {
            match t.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (t, None),
            }
        };
        let port = port
            .map(|p| p.parse::<u16>().ok().filter(|&n| n > 0))
            .map(|p| p.ok_or_else(|| format!("{s:?}: not a port number")))
            .transpose()?;
        let host = HostName::parse(host);
        if let HostName::Name(n) = &host {
            let ok = !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
            if !ok {
                return Err(format!("{s:?}: not a host name or IP address"));
            }
        }
        Ok(HostPattern { host, port })
    }

    pub(super) fn matches(&self, host: &HostName, port: u16) -> bool {
        self.host == *host && self.port.is_none_or(|p| p == port)
    }
}

/// A refusal of our resolver: a name of a host that is not allowed resolved only to
/// forbidden addresses. Found in a reqwest error's chain, it fails the request at once.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct RefusedAddress(String);

/// The DNS resolver of requests to hosts that are not allowed: drops the forbidden addresses
/// a name resolves to (a name may not lead where its IP literal could not go).
pub(super) struct PublicResolver {
    /// Resolved as they are (the proxy's host).
    pub(super) trusted: Vec<String>,
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
pub(super) const ALLOW_HINT: &str = "registries, redirect targets and token servers at \
    loopback, link-local, private and cloud metadata addresses are reached only when \
    [registry] allow_hosts lists them (ovbd convert and rpull: or the reference names them)";

/// Which hosts requests may go to, and over what (see the module doc).
#[derive(Debug, Default)]
pub(super) struct HostPolicy {
    /// `allow_hosts`, `insecure` and the mirrors' hosts.
    pub(super) allowed: Vec<HostPattern>,
    /// The registries an operator named (`ovbd convert` / `rpull` references: trusted as if
    /// listed in `allow_hosts`, every port); never filled by the daemon.
    pub(super) named: std::sync::RwLock<Vec<HostPattern>>,
    /// `insecure`, normalised as [`normalize_registry_host`] does.
    pub(super) insecure: Vec<String>,
    /// `(host, port)` of the mirrors configured `http://`.
    pub(super) http_mirrors: Vec<(HostName, u16)>,
    /// Registry (normalised as [`normalize_registry_host`] does) → token servers on other
    /// hosts that may receive its credentials.
    pub(super) auth_realms: Vec<(String, HostPattern)>,
}

impl HostPolicy {
    pub(super) fn new(
        cfg: &RegistryConfig,
        mirrors: &[(String, Vec<Url>)],
    ) -> Result<HostPolicy, RegistryError> {
        let mut p = HostPolicy::default();
        for (key, list) in [
            ("allow_hosts", &cfg.allow_hosts),
            ("insecure", &cfg.insecure),
        ] {
            for s in list {
                p.allowed.push(HostPattern::parse(s).map_err(|e| {
                    RegistryError::InvalidInput(format!("[registry] {key} entry {e}"))
                })?);
            }
        }
        for (reg, realm) in BUILTIN_AUTH_REALMS {
            let pattern = HostPattern::parse(realm).map_err(RegistryError::InvalidInput)?;
            p.auth_realms.push((reg.to_string(), pattern));
        }
        for (reg, realms) in &cfg.auth_realms {
            for r in realms {
                let pattern = HostPattern::parse(r).map_err(|e| {
                    RegistryError::InvalidInput(format!("[registry.auth_realms] {reg:?}: {e}"))
                })?;
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
    pub(super) fn allows(&self, u: &Url) -> bool {
        match (url_host(u), u.port_or_known_default()) {
            (Some(h), Some(port)) => {
                self.allowed.iter().any(|a| a.matches(&h, port))
                    || self
                        .named
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .iter()
                        .any(|a| a.matches(&h, port))
            }
            _ => false,
        }
    }

    /// Why no request may go to `u`'s host, if so (DNS names: see [`PublicResolver`]).
    pub(super) fn refusal(&self, u: &Url) -> Option<String> {
        let host = url_host(u)?;
        let why = host.forbidden()?;
        (!self.allows(u)).then(|| format!("{host} is a {why} address; {ALLOW_HINT}"))
    }

    /// Whether `u` may be plain http: an `insecure` host, an http mirror, or an allowed
    /// loopback host.
    pub(super) fn plain_http_ok(&self, u: &Url) -> bool {
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
    pub(super) fn creds_may_go_to(&self, ep: &Endpoint, realm: &Url) -> bool {
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
    pub(super) fn check(&self, u: &Url, from_https: bool) -> Result<bool, String> {
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
