//! Service errors and the one place that maps them (and store errors) to gRPC status codes.
//! `Internal` answers with a generic message and logs the full error chain.

use tonic::Status;

use crate::store::StoreError;
use mxscope_proto::target::TargetError;

/// What a gRPC handler can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unimplemented(String),
    /// No credential, or not the kind the call needs.
    #[error("{0}")]
    Unauthenticated(String),
    /// The credential does not allow the call (or the agent is revoked).
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The peer went away.
    #[error("{0}")]
    Cancelled(String),
    /// The operation was ended in favour of another (a newer session of the same agent).
    #[error("{0}")]
    Aborted(String),
    /// The collector is not set up for the call (e.g. enrolment without --ca-key).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Status {
        match err {
            ServiceError::InvalidArgument(m) => Status::invalid_argument(m),
            ServiceError::NotFound(m) => Status::not_found(m),
            ServiceError::ResourceExhausted(m) => Status::resource_exhausted(m),
            ServiceError::Unimplemented(m) => Status::unimplemented(m),
            ServiceError::Unauthenticated(m) => Status::unauthenticated(m),
            ServiceError::PermissionDenied(m) => Status::permission_denied(m),
            ServiceError::DeadlineExceeded(m) => Status::deadline_exceeded(m),
            ServiceError::Cancelled(m) => Status::cancelled(m),
            ServiceError::Aborted(m) => Status::aborted(m),
            ServiceError::FailedPrecondition(m) => Status::failed_precondition(m),
            ServiceError::Target(e) => Status::invalid_argument(e.to_string()),
            ServiceError::Store(e) => store_status(e),
        }
    }
}

fn store_status(err: StoreError) -> Status {
    match err {
        StoreError::TargetExists(name) => Status::already_exists(format!(
            "target '{name}' already exists (change it with 'mxscopectl target update')"
        )),
        StoreError::TargetNotFound(name) => Status::not_found(unknown_target(&name)),
        StoreError::WriterClosed => Status::unavailable("collector is shutting down"),
        // Retryable: the agent keeps its results in its spool and reconnects with backoff.
        StoreError::DiskFull { .. } => Status::unavailable(
            "collector storage is full (disk full): results not stored, keep them and retry later",
        ),
        other => {
            tracing::error!(error = %chain(&other), "internal error");
            Status::internal("internal error (see the collector log)")
        }
    }
}

/// The message for a target name that is not known.
pub fn unknown_target(name: &str) -> String {
    format!("unknown target '{name}' (see 'mxscopectl target list')")
}

/// An error and its sources, joined by ": ".
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;
    use tonic::Code;

    #[test]
    fn codes() {
        let s: Status = ServiceError::from(StoreError::TargetNotFound("x".into())).into();
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(
            s.message(),
            "unknown target 'x' (see 'mxscopectl target list')"
        );
        let s: Status = ServiceError::from(StoreError::TargetExists("x".into())).into();
        assert_eq!(s.code(), Code::AlreadyExists);
        let s: Status = ServiceError::from(StoreError::OutOfRange("seq")).into();
        assert_eq!(s.code(), Code::Internal);
        assert!(
            !s.message().contains("seq"),
            "internal details must not leak: {}",
            s.message()
        );
        let s: Status = ServiceError::from(TargetError::IntervalTooShort(5)).into();
        assert_eq!(s.code(), Code::InvalidArgument);
        // `source()` is used by `chain`, keep the import honest.
        assert!(StoreError::from(crate::store::sqlite::SqliteError::Commit(
            std::sync::Arc::new(rusqlite::Error::InvalidQuery),
        ))
        .source()
        .is_some());
    }
}
