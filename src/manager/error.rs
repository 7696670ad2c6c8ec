//! Errors of the push-manager role.

use thiserror::Error;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Error)]
pub enum Error {
    /// A configuration value is out of range; the message names the flag.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The gRPC server could not be built or bound.
    #[error(transparent)]
    Server(#[from] crate::grpc::ServerError),
    /// etcd refused something at start-up (the running service tolerates etcd outages).
    #[error("etcd: {0}")]
    Etcd(#[from] crate::etcd::Error),
    /// A certificate or key for the connect-nodes could not be read.
    #[error(transparent)]
    Tls(#[from] crate::grpc::TlsError),
    /// A thread could not be spawned.
    #[error(transparent)]
    Spawn(#[from] crate::thread::SpawnError),
}

impl Error {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::InvalidConfig(_) | Error::Server(_) | Error::Tls(_) => false,
            Error::Spawn(_) => true,
            Error::Etcd(e) => e.is_retryable(),
        }
    }
}
