//! The etcd client's one error type, so callers can tell "try again" from "give up" without
//! parsing messages.

use std::time::Duration;

use grpcio::RpcStatusCode;

/// `Result` of every fallible etcd client call.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything the etcd client can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The `Config` cannot work (no endpoints, an endpoint that is not `host:port`...).
    #[error("invalid etcd config: {0}")]
    InvalidConfig(String),
    /// No endpoint answered: each refused, broke the call or ran out of its share of the deadline.
    #[error("no etcd endpoint of {endpoints:?} is available (last error: {last_error})")]
    Unavailable { endpoints: Vec<String>, last_error: String },
    /// The call's overall deadline (`Config::timeout`) passed before any endpoint answered.
    #[error("etcd call timed out after {0:?}")]
    Timeout(Duration),
    /// etcd answered with a non-OK gRPC status.
    #[error("etcd returned {code:?}: {message}")]
    Rpc { code: RpcStatusCode, message: String },
    /// The lease does not exist (never granted, revoked or expired).
    #[error("etcd lease {0:#x} not found")]
    LeaseNotFound(i64),
    /// The requested revision has been compacted away.
    #[error("etcd revision compacted (compact revision {compact_revision})")]
    Compacted { compact_revision: i64 },
    /// gRPC failed below etcd (call could not start, stream broke, undecodable message).
    #[error("gRPC transport error: {0}")]
    Transport(String),
    /// etcd refused our user name or password.
    #[error("etcd refused to authenticate user {user:?}: {reason} (check --etcd-user and its password)")]
    Auth { user: String, reason: String },
    /// The OS refused to start a keep-alive or watch thread.
    #[error(transparent)]
    Spawn(#[from] crate::thread::SpawnError),
}

impl Error {
    /// Whether the same call may succeed if tried again (on this or another endpoint, later).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unavailable { .. } | Error::Timeout(_) | Error::Transport(_) => true,
            // etcd uses UNAVAILABLE for leader changes and stopping servers as gRPC does for refused
            // connections; DEADLINE_EXCEEDED is most often a connect that never completed.
            Error::Rpc { code, .. } => crate::grpc::is_retryable_code(*code),
            Error::InvalidConfig(_)
            | Error::LeaseNotFound(_)
            | Error::Compacted { .. }
            | Error::Spawn(_)
            | Error::Auth { .. } => false,
        }
    }
}

impl Error {
    /// etcd no longer accepts the auth token sent (it expired, or etcd restarted): get a new one.
    pub fn is_invalid_token(&self) -> bool {
        matches!(self, Error::Rpc { code: RpcStatusCode::UNAUTHENTICATED, message } if message.contains("invalid auth token"))
    }
}

impl From<grpcio::Error> for Error {
    fn from(e: grpcio::Error) -> Error {
        match e {
            grpcio::Error::RpcFailure(status) => {
                Error::Rpc { code: status.code(), message: status.message().to_owned() }
            }
            grpcio::Error::RpcFinished(Some(status)) if status.code() != RpcStatusCode::OK => {
                Error::Rpc { code: status.code(), message: status.message().to_owned() }
            }
            other => Error::Transport(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpc(code: RpcStatusCode) -> Error {
        Error::Rpc { code, message: String::new() }
    }

    #[test]
    fn connection_trouble_is_retryable() {
        assert!(rpc(RpcStatusCode::UNAVAILABLE).is_retryable());
        assert!(rpc(RpcStatusCode::DEADLINE_EXCEEDED).is_retryable());
        assert!(Error::Timeout(Duration::from_secs(2)).is_retryable());
        assert!(Error::Unavailable { endpoints: vec![], last_error: String::new() }.is_retryable());
        assert!(Error::Transport("stream ended".into()).is_retryable());
    }

    #[test]
    fn wrong_requests_are_not_retryable() {
        assert!(!rpc(RpcStatusCode::INVALID_ARGUMENT).is_retryable());
        assert!(!rpc(RpcStatusCode::NOT_FOUND).is_retryable());
        assert!(!rpc(RpcStatusCode::PERMISSION_DENIED).is_retryable());
        assert!(!Error::InvalidConfig("no endpoints".into()).is_retryable());
        assert!(!Error::LeaseNotFound(7).is_retryable());
        assert!(!Error::Compacted { compact_revision: 3 }.is_retryable());
        let spawn = crate::thread::SpawnError {
            name: "etcd-watch".into(),
            source: std::sync::Arc::new(std::io::Error::other("out of threads")),
        };
        assert!(!Error::Spawn(spawn).is_retryable());
    }

    #[test]
    fn grpc_failures_convert_by_status() {
        let unavailable = grpcio::Error::RpcFailure(grpcio::RpcStatus::with_message(
            RpcStatusCode::UNAVAILABLE,
            "connection refused".into(),
        ));
        match Error::from(unavailable) {
            Error::Rpc { code, message } => {
                assert_eq!(code, RpcStatusCode::UNAVAILABLE);
                assert_eq!(message, "connection refused");
            }
            other => panic!("expected Rpc, got {other:?}"),
        }
        assert!(Error::from(grpcio::Error::RemoteStopped).is_retryable());
    }
}
