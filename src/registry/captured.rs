//! Credentials captured from Kubernetes pull secrets: the auth of each CRI `PullImage` that
//! `[cri_proxy]` forwarded, kept in memory only, for the lazy reads of the layers that very
//! pull prepared.
//!
//! Snapshot labels do not say who pulled: on a non-CRI pull (ctr, nerdctl) containerd copies an
//! image's own `containerd.io/snapshot/*` layer annotations into the Prepare labels, so an
//! image can name any repository in `cri.image-ref`. A secret is therefore bound to a layer
//! only while its `PullImage` is in flight ([`PullWindow`]), by a Prepare in the CRI namespace
//! naming that image ([`CapturedCredentials::bind`]); the layer keeps it for its life.
//! A bound secret serves requests to the layer's own repository on that registry's own
//! endpoint (never a mirror; the token realm policy applies as for any credential). The
//! newest secret of each repository is also kept, `ttl` after its last `PullImage` and the
//! oldest first past `max_entries`, for layers whose binding outlived a daemon restart (the
//! binding is on disk, a secret never is).

use super::credentials::Credential;
use super::normalize_registry_host;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The default lifetime of a repository's newest credential after its last `PullImage`.
pub(crate) const DEFAULT_TTL: Duration = Duration::from_secs(12 * 3600);
/// The default number of (registry, repository) entries kept.
pub(crate) const DEFAULT_MAX_ENTRIES: usize = 1024;

/// A captured credential and its number: auth state (tokens) made with it is kept apart.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Grant {
    pub(crate) id: u64,
    pub(crate) credential: Credential,
}

/// A `PullImage` in flight.
struct Pull {
    grant: Grant,
    /// (registry, repository, `:tag` or `@digest`) of its reference.
    image: (String, String, String),
}

/// The secret a layer's lazy reads use.
struct Binding {
    registry: String,
    repo: String,
    /// The secret of the pull that prepared the layer; None after a restart: the repository's
    /// newest.
    own: Option<Grant>,
}

struct Newest {
    grant: Grant,
    captured: Instant,
}

#[derive(Default)]
struct State {
    next_id: u64,
    pulls: HashMap<u64, Pull>,
    newest: HashMap<(String, String), Newest>,
    bindings: HashMap<PathBuf, Binding>,
}

/// The credentials of CRI pulls: in flight, bound to layers, newest by repository. Send + Sync.
pub(crate) struct CapturedCredentials {
    state: Mutex<State>,
    ttl: Duration,
    max_entries: usize,
}

/// A `PullImage` of the proxy in flight: Prepares of its image may bind its secret until this
/// is dropped (when the answer is on its way back, or the call was cancelled).
pub(crate) struct PullWindow {
    store: Arc<CapturedCredentials>,
    id: u64,
}

impl Drop for PullWindow {
    fn drop(&mut self) {
        self.store.lock().pulls.remove(&self.id);
    }
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

/// (registry, repository, `:tag` or `@digest`) of registry reference `image`, as containerd's
/// CRI writes it into `cri.image-ref` (a digest wins over a tag; no tag is `latest`).
fn image_key(image: &str) -> Result<(String, String, String), CaptureError> {
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
    let version = match (r.digest(), r.tag()) {
        (Some(d), _) => format!("@{d}"),
        (None, t) => format!(":{}", t.unwrap_or("latest")),
    };
    Ok((
        normalize_registry_host(r.registry()),
        r.repository().to_owned(),
        version,
    ))
}

impl CapturedCredentials {
    pub(crate) fn new(ttl: Duration, max_entries: usize) -> CapturedCredentials {
        CapturedCredentials {
            state: Mutex::new(State::default()),
            ttl,
            max_entries: max_entries.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A `PullImage` of `image` with `credential` starts: until the returned window is dropped,
    /// Prepares of that image bind it. `server_address` (the CRI AuthConfig's, may be empty)
    /// must name that registry. Also returns the (registry, repository) it is for.
    pub(crate) fn begin_pull(
        self: &Arc<Self>,
        image: &str,
        server_address: &str,
        credential: Credential,
    ) -> Result<(PullWindow, (String, String)), CaptureError> {
        let key = image_key(image)?;
        let (registry, repo) = (key.0.clone(), key.1.clone());
        let server = server_host(server_address);
        if !server.is_empty() && normalize_registry_host(&server) != registry {
            return Err(CaptureError::OtherServer {
                image: image.to_owned(),
                server: server_address.to_owned(),
                registry,
            });
        }
        let mut st = self.lock();
        st.next_id += 1;
        let grant = Grant {
            id: st.next_id,
            credential,
        };
        let now = Instant::now();
        st.newest
            .retain(|_, e| now.duration_since(e.captured) < self.ttl);
        let repo_key = (registry.clone(), repo.clone());
        if !st.newest.contains_key(&repo_key) && st.newest.len() >= self.max_entries {
            if let Some(oldest) = st
                .newest
                .iter()
                .min_by_key(|(_, e)| e.captured)
                .map(|(k, _)| k.clone())
            {
                st.newest.remove(&oldest);
            }
        }
        st.newest.insert(
            repo_key,
            Newest {
                grant: grant.clone(),
                captured: now,
            },
        );
        st.pulls.insert(grant.id, Pull { grant, image: key });
        let window = PullWindow {
            store: self.clone(),
            id: st.next_id,
        };
        Ok((window, (registry, repo)))
    }

    /// Binds to `layer` (its directory) the secret of the `PullImage` of `image` in flight, if
    /// there is one (the newest, if several): called by a Prepare of that image in the CRI
    /// namespace. Returns the (registry, repository) bound.
    pub(crate) fn bind(&self, layer: &Path, image: &str) -> Option<(String, String)> {
        let key = image_key(image).ok()?;
        let mut st = self.lock();
        let grant = st
            .pulls
            .values()
            .filter(|p| p.image == key)
            .max_by_key(|p| p.grant.id)?
            .grant
            .clone();
        st.bindings.insert(
            layer.to_owned(),
            Binding {
                registry: key.0.clone(),
                repo: key.1.clone(),
                own: Some(grant),
            },
        );
        Some((key.0, key.1))
    }

    /// `layer` was bound to a pull of `repo` on `registry` before the daemon restarted: its
    /// reads use the newest secret captured for that repository, if any. A binding of this run
    /// stays as it is.
    pub(crate) fn restore(&self, layer: &Path, registry: &str, repo: &str) {
        self.lock()
            .bindings
            .entry(layer.to_owned())
            .or_insert_with(|| Binding {
                registry: normalize_registry_host(registry),
                repo: repo.to_owned(),
                own: None,
            });
    }

    /// `layer` is gone: its secret with it.
    pub(crate) fn unbind(&self, layer: &Path) {
        self.lock().bindings.remove(layer);
    }

    /// The secret a read of `repo` on `host` (`host[:port]`) for `layer` may use: the one bound
    /// to the layer, for its own repository only.
    pub(crate) fn for_layer(&self, layer: &Path, host: &str, repo: &str) -> Option<Grant> {
        let st = self.lock();
        let b = st.bindings.get(layer)?;
        if b.registry != normalize_registry_host(host) || b.repo != repo {
            return None;
        }
        if let Some(g) = &b.own {
            return Some(g.clone());
        }
        st.newest
            .get(&(b.registry.clone(), b.repo.clone()))
            .filter(|e| e.captured.elapsed() < self.ttl)
            .map(|e| e.grant.clone())
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

    fn cred(g: Option<Grant>) -> Option<Credential> {
        g.map(|g| g.credential)
    }

    #[test]
    fn a_pull_secret_binds_only_in_its_window_and_only_its_repository() {
        let c = Arc::new(CapturedCredentials::new(DEFAULT_TTL, 8));
        let (a, b, other) = (Path::new("/l/a"), Path::new("/l/b"), Path::new("/l/o"));
        let (window, key) = c
            .begin_pull("reg.example:5000/team-a/app:v1", "", basic("a"))
            .unwrap();
        assert_eq!(key, ("reg.example:5000".into(), "team-a/app".into()));
        // Another image (tag) of the repository, or another repository: not this pull's.
        assert_eq!(c.bind(other, "reg.example:5000/team-a/app:v2"), None);
        assert_eq!(c.bind(other, "reg.example:5000/team-b/app:v1"), None);
        assert_eq!(
            c.bind(a, "reg.example:5000/team-a/app:v1"),
            Some(key.clone())
        );
        drop(window);
        // The window closed: nothing binds any more; the bound layer keeps its secret.
        assert_eq!(c.bind(b, "reg.example:5000/team-a/app:v1"), None);
        assert_eq!(
            cred(c.for_layer(a, "reg.example:5000", "team-a/app")),
            Some(basic("a"))
        );
        for l in [b, other] {
            assert_eq!(c.for_layer(l, "reg.example:5000", "team-a/app"), None);
        }
        // The layer's secret goes to its own repository only.
        assert_eq!(c.for_layer(a, "reg.example:5000", "team-b/app"), None);
        assert_eq!(c.for_layer(a, "reg.example", "team-a/app"), None);
        c.unbind(a);
        assert_eq!(c.for_layer(a, "reg.example:5000", "team-a/app"), None);

        // A server_address naming another registry: refused, no window.
        let e = c
            .begin_pull(
                "reg.example:5000/team-b/app:v1",
                "https://other.example/v1/",
                basic("b"),
            )
            .err()
            .unwrap();
        assert!(e.to_string().contains("other.example"), "{e}");
        assert_eq!(c.bind(b, "reg.example:5000/team-b/app:v1"), None);
        // The same registry as a URL, and a reference spelled differently (default tag).
        let (_w, _) = c
            .begin_pull(
                "reg.example:5000/team-b/app",
                "http://reg.example:5000",
                basic("b"),
            )
            .unwrap();
        assert!(c.bind(b, "reg.example:5000/team-b/app:latest").is_some());
        assert_eq!(
            cred(c.for_layer(b, "reg.example:5000", "team-b/app")),
            Some(basic("b"))
        );
        // Debug output never shows the secret.
        assert!(!format!("{:?}", basic("a")).contains("pw"));
    }

    #[test]
    fn a_restored_binding_takes_the_newest_secret_of_its_repository_while_fresh() {
        let c = Arc::new(CapturedCredentials::new(DEFAULT_TTL, 2));
        let l = Path::new("/l/a");
        c.restore(l, "r.example", "a");
        assert_eq!(c.for_layer(l, "r.example", "a"), None, "no pull yet");
        drop(c.begin_pull("r.example/a:1", "", basic("a1")).unwrap());
        assert_eq!(cred(c.for_layer(l, "r.example", "a")), Some(basic("a1")));
        drop(c.begin_pull("r.example/a:2", "", basic("a2")).unwrap());
        assert_eq!(cred(c.for_layer(l, "r.example", "a")), Some(basic("a2")));
        // Past max_entries the oldest repository goes first.
        drop(c.begin_pull("r.example/b:1", "", basic("b")).unwrap());
        drop(c.begin_pull("r.example/c:1", "", basic("c")).unwrap());
        assert_eq!(c.for_layer(l, "r.example", "a"), None);
        let expired = Arc::new(CapturedCredentials::new(Duration::ZERO, 2));
        expired.restore(l, "r.example", "a");
        drop(expired.begin_pull("r.example/a:1", "", basic("a")).unwrap());
        assert_eq!(expired.for_layer(l, "r.example", "a"), None);
    }
}
