//! The gateway's one error type: what can go wrong while starting or running a connect-node.
//!
//! Per-connection trouble (bad client input, slow consumers, timeouts) is not an error of the
//! gateway: it closes that connection, counts it in [`super::StatsSnapshot`] and goes on.

use std::io;

use crate::grpc::ServerError;
use crate::thread::SpawnError;

/// Errors from starting or stopping a [`super::Gateway`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A [`super::Config`] field is out of range; the message names the field and the rule.
    #[error("invalid gateway config: {0}")]
    Config(String),
    /// The WebSocket listener could not be bound (address in use, no permission, address not
    /// local).
    #[error("cannot bind the WebSocket listener on {addr}: {reason}")]
    Bind {
        /// The address from the config.
        addr: String,
        /// What the OS said.
        reason: String,
    },
    /// The gRPC server could not be built, or its listener bound.
    #[error(transparent)]
    Grpc(#[from] ServerError),
    /// A gateway thread (`ws-accept`, `ws-loop-<n>`) could not be started.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// An OS call failed: creating a poller or a waker, reading the bound address.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

impl Error {
    /// Whether trying the same call again later may succeed (a port freed, a thread limit
    /// relieved); a bad config, or a gRPC server grpcio cannot build, fails the same way every
    /// time.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Bind { .. } | Error::Grpc(ServerError::Bind { .. }) | Error::Spawn(_) | Error::Io(_) => true,
            Error::Config(_) | Error::Grpc(ServerError::Build(_) | ServerError::Tls(_)) => false,
        }
    }
}

/// The gateway's result type.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_environmental_errors_are_retryable() {
        assert!(!Error::Config("x".into()).is_retryable());
        assert!(Error::Io(io::Error::other("x")).is_retryable());
        let bind = Error::Bind { addr: "a".into(), reason: "in use".into() };
        assert!(bind.is_retryable());
        assert!(bind.to_string().contains("WebSocket listener on a"));
        let grpc_bind = Error::from(ServerError::Bind { addr: "b".into(), reason: "in use".into() });
        assert!(grpc_bind.is_retryable());
        assert!(grpc_bind.to_string().contains("gRPC listener on b"));
        assert!(!Error::from(ServerError::Build(grpcio::Error::Codec("x".into()))).is_retryable());
        let spawn = SpawnError { name: "ws-loop-0".into(), source: io::Error::other("no threads").into() };
        assert!(Error::from(spawn).to_string().contains("ws-loop-0"));
    }
}
