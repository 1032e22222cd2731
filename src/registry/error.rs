//! Why a registry request failed, and whether to try again.

use super::*;

/// Why a registry operation failed, classified for callers: whether to try again later
/// ([`RegistryError::is_transient`]: the snapshotter answers `Unavailable`), or what is wrong.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// Worth retrying: 5xx, 408, 429, connection errors and resets, truncated bodies, stalls.
    #[error("{msg}")]
    Transient {
        msg: String,
        retry_after: Option<Duration>,
    },
    /// The operation's deadline passed (after retries): try again later.
    #[error("{0}")]
    TimedOut(String),
    /// No such manifest, blob or repository (404).
    #[error("{0}")]
    NotFound(String),
    /// Authentication failed or access was refused (401 after authenticating, 403, a token
    /// server's refusal, unusable credentials).
    #[error("{0}")]
    Denied(String),
    /// The host policy refused the request before it was sent (`allow_hosts`, plain http,
    /// https to http).
    #[error("{0}")]
    Refused(String),
    /// The registry answered something unusable: a protocol violation, a digest or size that
    /// does not match, an oversized response, a certificate nobody trusts.
    #[error("{0}")]
    InvalidResponse(String),
    /// The request is wrong: a bad reference, digest, range or configuration.
    #[error("{0}")]
    InvalidInput(String),
    /// A local file (a blob being downloaded or uploaded) could not be read or written.
    #[error("{msg}")]
    Local { kind: io::ErrorKind, msg: String },
}

impl RegistryError {
    pub(crate) fn transient(msg: impl Into<String>) -> RegistryError {
        RegistryError::Transient {
            msg: msg.into(),
            retry_after: None,
        }
    }

    pub(crate) fn local(msg: impl fmt::Display, e: &io::Error) -> RegistryError {
        RegistryError::Local {
            kind: e.kind(),
            msg: format!("{msg}: {e}"),
        }
    }

    /// The class metrics count this error under.
    pub fn class(&self) -> &'static str {
        match self {
            RegistryError::Transient { .. } => "transient",
            RegistryError::TimedOut(_) => "timed_out",
            RegistryError::NotFound(_) => "not_found",
            RegistryError::Denied(_) => "denied",
            RegistryError::Refused(_) => "refused",
            RegistryError::InvalidResponse(_) => "invalid_response",
            RegistryError::InvalidInput(_) => "invalid_input",
            RegistryError::Local { .. } => "local",
        }
    }

    /// Whether trying again later may succeed (a transient fault or a deadline passed).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RegistryError::Transient { .. } | RegistryError::TimedOut(_)
        )
    }

    /// The `io::ErrorKind` of a block read that failed this way.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            RegistryError::Transient { .. } => io::ErrorKind::Other,
            RegistryError::TimedOut(_) => io::ErrorKind::TimedOut,
            RegistryError::NotFound(_) => io::ErrorKind::NotFound,
            RegistryError::Denied(_) | RegistryError::Refused(_) => io::ErrorKind::PermissionDenied,
            RegistryError::InvalidResponse(_) => io::ErrorKind::InvalidData,
            RegistryError::InvalidInput(_) => io::ErrorKind::InvalidInput,
            RegistryError::Local { kind, .. } => *kind,
        }
    }

    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            RegistryError::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The same failure, its message prefixed with `what` (`what: message`).
    pub(crate) fn context(self, what: impl fmt::Display) -> RegistryError {
        self.map_msg(|m| format!("{what}: {m}"))
    }

    /// The same kind of failure with another message.
    pub(crate) fn map_msg(self, f: impl FnOnce(String) -> String) -> RegistryError {
        use RegistryError as E;
        match self {
            E::Transient { msg, retry_after } => E::Transient {
                msg: f(msg),
                retry_after,
            },
            E::TimedOut(m) => E::TimedOut(f(m)),
            E::NotFound(m) => E::NotFound(f(m)),
            E::Denied(m) => E::Denied(f(m)),
            E::Refused(m) => E::Refused(f(m)),
            E::InvalidResponse(m) => E::InvalidResponse(f(m)),
            E::InvalidInput(m) => E::InvalidInput(f(m)),
            E::Local { kind, msg } => E::Local { kind, msg: f(msg) },
        }
    }
}

/// An `io::Error` of the same kind whose payload is the `RegistryError` (callers may
/// downcast it to classify).
impl From<RegistryError> for io::Error {
    fn from(e: RegistryError) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}

/// The `RegistryError` inside an error chain (an `io::Error` payload or an anyhow context), if
/// there is one.
#[allow(dead_code)] // API for the snapshotter's classification
pub fn find_registry_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a RegistryError> {
    find_in_chain::<RegistryError>(e)
}

/// A request error from reqwest: the connection, a timeout, the body. All worth retrying
/// except a request we could not even build.
pub(super) fn http_failure(what: &str, e: reqwest::Error) -> RegistryError {
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
        RegistryError::InvalidInput(msg)
    } else if let Some(refused) = find_in_chain::<RefusedAddress>(&e) {
        // Our resolver refused the host's addresses: the same next time.
        RegistryError::Refused(format!("{what}: {refused}"))
    } else if is_certificate_error(&e) {
        // The same certificate next time: retrying will not help.
        RegistryError::InvalidResponse(msg)
    } else {
        RegistryError::transient(msg)
    }
}

/// The first `E` in `e`'s chain (io::Error payloads included).
pub(super) fn find_in_chain<'a, E: std::error::Error + 'static>(
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
pub(super) fn is_certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
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
