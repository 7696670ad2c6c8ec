//! The gateway's one error type: what can go wrong while starting or running a connect-node.
//!
//! Per-connection trouble (bad client input, slow consumers, timeouts) is not an error of the
//! gateway: it closes that connection, counts it in [`super::StatsSnapshot`] and goes on.

use std::io;

/// Errors from starting or stopping a [`super::Gateway`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A [`super::Config`] field is out of range; the message names the field and the rule.
    #[error("invalid gateway config: {0}")]
    Config(String),
    /// A listener could not be bound (address in use, no permission, address not local).
    #[error("cannot bind the {what} listener on {addr}: {reason}")]
    Bind {
        /// Which listener: "gRPC" or "WebSocket".
        what: &'static str,
        /// The address from the config.
        addr: String,
        /// What the OS or gRPC said.
        reason: String,
    },
    /// The gRPC server could not be built or started.
    #[error("gRPC server: {0}")]
    Grpc(#[from] grpcio::Error),
    /// An OS call failed: spawning a thread, creating a poller, changing a resource limit.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

impl Error {
    /// Whether trying the same call again later may succeed (a port freed, a thread limit
    /// relieved); a bad config will fail the same way every time.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Bind { .. } | Error::Io(_) => true,
            Error::Config(_) | Error::Grpc(_) => false,
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
        let bind = Error::Bind { what: "gRPC", addr: "a".into(), reason: "in use".into() };
        assert!(bind.is_retryable());
        assert!(bind.to_string().contains("gRPC listener on a"));
    }
}
