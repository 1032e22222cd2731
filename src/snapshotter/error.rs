//! What the snapshotter's operations fail with, and the one mapping of each failure to the gRPC
//! code containerd acts on (NotFound and AlreadyExists steer its unpacker; Unavailable says a
//! retry may work).

use crate::registry::RegistryError;
use crate::snapshotter::metadata::MetaError;
use containerd_snapshots::tonic;
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotterError {
    /// No snapshot (or parent) of that key.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// Not a failure: a lazy pull's answer. The layer is committed as a remote layer under this
    /// name, and containerd's unpacker takes AlreadyExists as "already unpacked".
    #[error("snapshot {0} (remote layer): already exists")]
    RemoteLayerCommitted(String),
    /// Bad input: a malformed label, filter or key.
    #[error("{0}")]
    InvalidArgument(String),
    /// The snapshot's state forbids it: it has children, is committed (or not active), or its
    /// stack is one ovbd cannot serve.
    #[error("{0}")]
    FailedPrecondition(String),
    /// May pass if tried again: a registry or device that timed out or dropped the connection.
    #[error("{0:#}")]
    Unavailable(anyhow::Error),
    #[error("{0:#}")]
    Internal(anyhow::Error),
}

pub(super) type SnapResult<T> = Result<T, SnapshotterError>;

impl SnapshotterError {
    /// The gRPC code containerd gets.
    pub fn code(&self) -> tonic::Code {
        match self {
            SnapshotterError::NotFound(_) => tonic::Code::NotFound,
            SnapshotterError::AlreadyExists(_) | SnapshotterError::RemoteLayerCommitted(_) => {
                tonic::Code::AlreadyExists
            }
            SnapshotterError::InvalidArgument(_) => tonic::Code::InvalidArgument,
            SnapshotterError::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            SnapshotterError::Unavailable(_) => tonic::Code::Unavailable,
            SnapshotterError::Internal(_) => tonic::Code::Internal,
        }
    }
}

impl From<SnapshotterError> for tonic::Status {
    fn from(e: SnapshotterError) -> tonic::Status {
        tonic::Status::new(e.code(), e.to_string())
    }
}

impl From<MetaError> for SnapshotterError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::NotFound(_) => SnapshotterError::NotFound(e.to_string()),
            MetaError::AlreadyExists(_) => SnapshotterError::AlreadyExists(e.to_string()),
            MetaError::FailedPrecondition(m) => SnapshotterError::FailedPrecondition(m),
            MetaError::InvalidArgument(m) => SnapshotterError::InvalidArgument(m),
            MetaError::Store(_) => SnapshotterError::Internal(e.into()),
        }
    }
}

/// Failures of the layers below (files, devices, the registry): a registry failure by its
/// class (a missing blob is NotFound, a bad reference InvalidArgument); else Unavailable if
/// they may pass, Internal otherwise.
impl From<anyhow::Error> for SnapshotterError {
    fn from(e: anyhow::Error) -> Self {
        let registry = e.chain().find_map(crate::registry::find_registry_error);
        match registry {
            Some(RegistryError::NotFound(_)) => {
                return SnapshotterError::NotFound(format!("{e:#}"))
            }
            Some(RegistryError::InvalidInput(_)) => {
                return SnapshotterError::InvalidArgument(format!("{e:#}"))
            }
            _ => {}
        }
        if is_transient(&e) {
            SnapshotterError::Unavailable(e)
        } else {
            SnapshotterError::Internal(e)
        }
    }
}

impl From<io::Error> for SnapshotterError {
    fn from(e: io::Error) -> Self {
        anyhow::Error::from(e).into()
    }
}

impl From<ovbd_format::Error> for SnapshotterError {
    fn from(e: ovbd_format::Error) -> Self {
        anyhow::Error::from(e).into()
    }
}

/// Whether `e` may pass if containerd tries again: the first cause in its chain that tells
/// decides.
pub(super) fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().find_map(transient_class).unwrap_or(false)
}

/// Whether `cause` may pass, if it tells.
fn transient_class(cause: &(dyn std::error::Error + 'static)) -> Option<bool> {
    if let Some(r) = cause.downcast_ref::<RegistryError>() {
        return Some(r.is_transient());
    }
    // Other failures reach the snapshotter as io::Errors (block reads' type): their kind tells.
    let io = cause.downcast_ref::<io::Error>()?;
    // An io::Error's payload is not in the chain (its source() skips it): ask the payload first.
    if let Some(class) = io.get_ref().and_then(|inner| transient_class(inner)) {
        return Some(class);
    }
    Some(matches!(
        io.kind(),
        io::ErrorKind::TimedOut
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::NetworkDown
            // A device or mount still busy: free once its user lets go.
            | io::ErrorKind::ResourceBusy
    ))
}
