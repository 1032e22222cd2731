//! Credentials captured from Kubernetes pull secrets: the auth of each CRI `PullImage` that
//! `[cri_proxy]` forwarded, kept in memory only, for the lazy reads of that image.
//!
//! A captured credential is keyed by the (normalised registry host, repository) of the
//! `PullImage` reference it came with and is used only for requests to that same repository on
//! that registry's own endpoint (never a mirror; the token realm policy applies as for any
//! credential). Nothing a snapshot label says widens that. Entries are forgotten `ttl` after
//! their last `PullImage`, and the oldest go first past `max_entries`.

use super::credentials::Credential;
use super::normalize_registry_host;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The default lifetime of a captured credential after its last `PullImage`.
pub(crate) const DEFAULT_TTL: Duration = Duration::from_secs(12 * 3600);
/// The default number of (registry, repository) entries kept.
pub(crate) const DEFAULT_MAX_ENTRIES: usize = 1024;

struct Entry {
    credential: Credential,
    captured: Instant,
}

/// The credentials of recent CRI pulls by (registry host, repository). Send + Sync.
pub(crate) struct CapturedCredentials {
    entries: Mutex<HashMap<(String, String), Entry>>,
    ttl: Duration,
    max_entries: usize,
}

/// Why a `PullImage`'s auth was not kept.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CaptureError {
    #[error("image reference {0:?}: not a registry reference")]
    NotRegistry(String),
    #[error("image reference {image:?}: {why}")]
    BadReference { image: String, why: String },
    #[error("image {image:?}: the auth is for server {server:?}, not for registry {registry}")]
    OtherServer {
        image: String,
        server: String,
        registry: String,
    },
}

impl CapturedCredentials {
    pub(crate) fn new(ttl: Duration, max_entries: usize) -> CapturedCredentials {
        CapturedCredentials {
            entries: Mutex::new(HashMap::new()),
            ttl,
            max_entries: max_entries.max(1),
        }
    }

    /// Keeps `credential` for the repository of `image` (a `PullImage` reference).
    /// `server_address` (the CRI AuthConfig's, may be empty) must name that registry.
    /// Returns the (registry, repository) it is kept for.
    pub(crate) fn capture(
        &self,
        image: &str,
        server_address: &str,
        credential: Credential,
    ) -> Result<(String, String), CaptureError> {
        let r = match crate::oci::ImageRef::parse(image) {
            Ok(crate::oci::ImageRef::Registry(r)) => r,
            Ok(_) => return Err(CaptureError::NotRegistry(image.to_owned())),
            Err(e) => {
                return Err(CaptureError::BadReference {
                    image: image.to_owned(),
                    why: format!("{e:#}"),
                })
            }
        };
        let registry = normalize_registry_host(r.registry());
        let server = server_host(server_address);
        if !server.is_empty() && normalize_registry_host(&server) != registry {
            return Err(CaptureError::OtherServer {
                image: image.to_owned(),
                server: server_address.to_owned(),
                registry,
            });
        }
        let key = (registry, r.repository().to_owned());
        let mut map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        map.retain(|_, e| now.duration_since(e.captured) < self.ttl);
        if !map.contains_key(&key) && map.len() >= self.max_entries {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, e)| e.captured)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(
            key.clone(),
            Entry {
                credential,
                captured: now,
            },
        );
        Ok(key)
    }

    /// The credential captured for `repo` on `host` (`host[:port]`), if one is fresh.
    pub(crate) fn get(&self, host: &str, repo: &str) -> Option<Credential> {
        let key = (normalize_registry_host(host), repo.to_owned());
        let mut map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&key) {
            Some(e) if e.captured.elapsed() < self.ttl => Some(e.credential.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }
}

/// `host[:port]` of a CRI `server_address`, which kubelet may give as a URL or a bare host.
fn server_host(server_address: &str) -> String {
    let s = server_address.trim();
    let s = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    s.split('/').next().unwrap_or("").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str) -> Credential {
        Credential::Basic {
            username: u.into(),
            password: "pw".into(),
        }
    }

    #[test]
    fn captured_credentials_are_per_registry_and_repository() {
        let c = CapturedCredentials::new(DEFAULT_TTL, 8);
        let key = c
            .capture("reg.example:5000/team-a/app:v1", "", basic("a"))
            .unwrap();
        assert_eq!(key, ("reg.example:5000".into(), "team-a/app".into()));
        assert_eq!(c.get("reg.example:5000", "team-a/app"), Some(basic("a")));
        // Another repository on the same registry, or the same path elsewhere: nothing.
        assert_eq!(c.get("reg.example:5000", "team-b/app"), None);
        assert_eq!(c.get("reg.example", "team-a/app"), None);
        // A server_address naming another registry: refused, nothing kept.
        let e = c
            .capture(
                "reg.example:5000/team-b/app:v1",
                "https://other.example/v1/",
                basic("b"),
            )
            .unwrap_err();
        assert!(e.to_string().contains("other.example"), "{e}");
        assert_eq!(c.get("reg.example:5000", "team-b/app"), None);
        // The same registry as a URL: kept.
        c.capture("reg.example:5000/team-b/app@sha256:0000000000000000000000000000000000000000000000000000000000000000", "http://reg.example:5000", basic("b"))
            .unwrap();
        assert_eq!(c.get("reg.example:5000", "team-b/app"), Some(basic("b")));
        // Debug output never shows the secret.
        assert!(!format!("{:?}", basic("a")).contains("pw"));
    }

    #[test]
    fn captured_credentials_are_bounded_in_number_and_time() {
        let c = CapturedCredentials::new(DEFAULT_TTL, 2);
        c.capture("r.example/a:1", "", basic("a")).unwrap();
        c.capture("r.example/b:1", "", basic("b")).unwrap();
        c.capture("r.example/c:1", "", basic("c")).unwrap();
        assert_eq!(c.get("r.example", "a"), None, "the oldest is dropped");
        assert_eq!(c.get("r.example", "c"), Some(basic("c")));
        let expired = CapturedCredentials::new(Duration::ZERO, 2);
        expired.capture("r.example/a:1", "", basic("a")).unwrap();
        assert_eq!(expired.get("r.example", "a"), None);
    }
}
