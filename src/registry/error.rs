//! Why a registry request failed, and whether to try again.

use super::*;

// ---------------------------------------------------------------------------------- failures

/// Why one request failed, and whether to try again.
#[derive(Debug, Clone, thiserror::Error)]
pub(super) enum Failure {
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
    pub(super) fn transient(msg: impl Into<String>) -> Failure {
        Failure::Transient {
            msg: msg.into(),
            retry_after: None,
        }
    }
    pub(super) fn permanent(kind: io::ErrorKind, msg: impl Into<String>) -> Failure {
        Failure::Permanent {
            kind,
            msg: msg.into(),
        }
    }
    pub(super) fn is_permanent(&self) -> bool {
        matches!(self, Failure::Permanent { .. })
    }
    pub(super) fn kind(&self) -> io::ErrorKind {
        match self {
            Failure::Transient { .. } => io::ErrorKind::Other,
            Failure::Permanent { kind, .. } => *kind,
        }
    }
    pub(super) fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::Transient { retry_after, .. } => *retry_after,
            Failure::Permanent { .. } => None,
        }
    }
}

/// A request error from reqwest: the connection, a timeout, the body. All worth retrying
/// except a request we could not even build.
pub(super) fn http_failure(what: &str, e: reqwest::Error) -> Failure {
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
