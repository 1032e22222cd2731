//! What the snapshotter's operations fail with, and how containerd hears of it (gRPC codes).

use crate::snapshotter::metadata::MetaError;
use containerd_snapshots::tonic;

/// What Remove and Commit report when they cannot do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl From<SnapError> for tonic::Status {
    fn from(e: SnapError) -> tonic::Status {
        match &e {
            SnapError::Meta(MetaError::NotFound(_)) => tonic::Status::not_found(e.to_string()),
            SnapError::Meta(MetaError::AlreadyExists(_)) => {
                tonic::Status::already_exists(e.to_string())
            }
            SnapError::Meta(MetaError::FailedPrecondition(_)) => {
                tonic::Status::failed_precondition(e.to_string())
            }
            SnapError::Meta(MetaError::InvalidArgument(_)) => {
                tonic::Status::invalid_argument(e.to_string())
            }
            _ => tonic::Status::internal(e.to_string()),
        }
    }
}

impl From<std::io::Error> for SnapError {
    fn from(e: std::io::Error) -> Self {
        SnapError::Other(e.into())
    }
}

impl From<ovbd_format::Error> for SnapError {
    fn from(e: ovbd_format::Error) -> Self {
        SnapError::Other(e.into())
    }
}

pub(super) type SnapResult<T> = Result<T, SnapError>;
