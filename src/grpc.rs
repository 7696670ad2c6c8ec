//! gRPC plumbing both roles and the etcd client share: which statuses mean "try again", how a
//! server is built, bound, started and stopped, and TLS credentials read from PEM files.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::bounded;

use grpcio::{
    CertificateRequestType, ChannelBuilder, ChannelCredentials, ChannelCredentialsBuilder, Environment, RpcStatusCode,
    Server, ServerBuilder, ServerCredentials, ServerCredentialsBuilder, Service,
};

use crate::thread::StoppableThread;

/// Statuses after which the same call may succeed: the peer could not serve it now (refused
/// connection, leader change, overload, a deadline that may have been a slow connect), not
/// "the request is wrong". DEADLINE_EXCEEDED is among them, so a call that did reach its peer
/// may be applied twice when retried.
pub fn is_retryable_code(code: RpcStatusCode) -> bool {
    matches!(
        code,
        RpcStatusCode::UNAVAILABLE
            | RpcStatusCode::DEADLINE_EXCEEDED
            | RpcStatusCode::RESOURCE_EXHAUSTED
            | RpcStatusCode::ABORTED
    )
}

/// [`is_retryable_code`] for a whole grpcio error: a failed call with such a status, or a peer
/// that went away mid-call.
pub fn is_retryable(error: &grpcio::Error) -> bool {
    match error {
        grpcio::Error::RpcFailure(status) => is_retryable_code(status.code()),
        grpcio::Error::RemoteStopped => true,
        _ => false,
    }
}

/// Why a gRPC server did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// grpcio could not build the server.
    #[error("building the gRPC server: {0}")]
    Build(#[from] grpcio::Error),
    /// The listen address could not be bound (in use, not local, no permission).
    #[error("cannot bind the gRPC listener on {addr}: {reason}")]
    Bind { addr: String, reason: String },
    /// The server's certificate, key or client CA could not be read.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A certificate or key file that cannot be used. Names the file and the flag, never its
/// contents (a key is a secret).
#[derive(Debug, thiserror::Error)]
#[error("{flag} {path}: {reason}")]
pub struct TlsError {
    pub flag: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

/// Reads a PEM file given with `flag`, checking that it holds a PEM block at all (gRPC would
/// only find out at the first handshake, and say less).
fn read_pem(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| TlsError { flag, path: path.into(), reason: e.to_string() })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError { flag, path: path.into(), reason: "not a PEM file (no -----BEGIN line)".into() });
    }
    Ok(bytes)
}

/// A gRPC server's TLS: its certificate and key, and optionally the CA its clients' certificates
/// must be signed by (mutual TLS: a client without such a certificate is refused in the
/// handshake).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    /// `--tls-cert`: PEM certificate chain.
    pub cert: PathBuf,
    /// `--tls-key`: PEM private key.
    pub key: PathBuf,
    /// `--tls-client-ca`: PEM CA certificate(s); clients must present a certificate it signed.
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// Reads the files into gRPC server credentials.
    pub fn credentials(&self) -> Result<ServerCredentials, TlsError> {
        let mut builder = ServerCredentialsBuilder::new()
            .add_cert(read_pem("--tls-cert", &self.cert)?, read_pem("--tls-key", &self.key)?);
        if let Some(ca) = &self.client_ca {
            let ca = read_pem("--tls-client-ca", ca)?;
            builder = builder.root_cert(ca, CertificateRequestType::RequestAndRequireClientCertificateAndVerify);
        }
        Ok(builder.build())
    }

    /// Whether clients must present a certificate (mutual TLS).
    pub fn verifies_clients(&self) -> bool {
        self.client_ca.is_some()
    }
}

/// A gRPC client's TLS: the CA that signed the server's certificate, and optionally our own
/// certificate and key for servers that require one (mutual TLS). `flags` names the flags these
/// came from in error messages (`--tls-ca` for `send`, `--node-tls-ca` for serve's node
/// clients, `--etcd-ca` for etcd).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTls {
    pub ca: PathBuf,
    /// Certificate and key, both or neither.
    pub identity: Option<(PathBuf, PathBuf)>,
    pub flags: ClientTlsFlags,
}

/// The flag names a [`ClientTls`] was given with, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientTlsFlags {
    pub ca: &'static str,
    pub cert: &'static str,
    pub key: &'static str,
}

impl ClientTls {
    /// From the files given with `flags`: `None` without a CA (plaintext); the certificate and
    /// key count only together (the CLI makes each require the other).
    pub fn from_flags(
        ca: Option<&PathBuf>,
        cert: Option<&PathBuf>,
        key: Option<&PathBuf>,
        flags: ClientTlsFlags,
    ) -> Option<ClientTls> {
        Some(ClientTls { ca: ca?.clone(), identity: cert.cloned().zip(key.cloned()), flags })
    }

    /// Reads the files into gRPC channel credentials.
    pub fn credentials(&self) -> Result<ChannelCredentials, TlsError> {
        let mut builder = ChannelCredentialsBuilder::new().root_cert(read_pem(self.flags.ca, &self.ca)?);
        if let Some((cert, key)) = &self.identity {
            builder = builder.cert(read_pem(self.flags.cert, cert)?, read_pem(self.flags.key, key)?);
        }
        Ok(builder.build())
    }
}

/// Builds a server for `services` on `listen` (`host:port`, port 0 picks one), accepting
/// requests up to `max_receive_bytes`, over TLS when `tls` is given, starts it, and returns it
/// with the address it is bound to.
pub fn start_server(
    env: Arc<Environment>,
    listen: &str,
    max_receive_bytes: usize,
    tls: Option<&ServerTls>,
    services: impl IntoIterator<Item = Service>,
) -> Result<(Server, SocketAddr), ServerError> {
    let credentials = match tls {
        Some(tls) => tls.credentials()?,
        None => ServerCredentials::insecure(),
    };
    // gRPC sets SO_REUSEPORT by default, which would let a second server share the port
    // silently instead of failing to start.
    let args = ChannelBuilder::new(env.clone())
        .reuse_port(false)
        .max_receive_message_len(max_receive_bytes.min(i32::MAX as usize) as i32)
        .build_args();
    let builder =
        services.into_iter().fold(ServerBuilder::new(env).channel_args(args), ServerBuilder::register_service);
    let mut server = builder.build()?;
    let port = server
        .add_listening_port(listen, credentials)
        .map_err(|e| ServerError::Bind { addr: listen.to_string(), reason: e.to_string() })?;
    server.start();
    Ok((server, bound_addr(listen, port)))
}

/// How long cancelled calls may take to end once `stop_server` has cancelled them.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// Stops `server`: no new calls, then up to `grace` for the calls in flight to end. A call still
/// open then (a client that sent its headers and stalled, a stream never half-closed) is
/// cancelled, so stopping is bounded whatever clients do. Returns false if it had to cancel.
pub fn stop_server(mut server: Server, grace: Duration) -> bool {
    let shutdown = server.shutdown();
    // The shutdown future completes only when every call has ended; it is awaited on a thread
    // of its own so that this wait has a deadline.
    let (done_tx, done_rx) = bounded(1);
    let waiter = StoppableThread::spawn("grpc-stop", move |_stop| {
        let _ = done_tx.send(futures::executor::block_on(shutdown));
    });
    let mut waiter = match waiter {
        Ok(waiter) => waiter,
        Err(e) => {
            log::warn!("{e}; cancelling every call in flight at once");
            server.cancel_all_calls();
            return false;
        }
    };
    if done_rx.recv_timeout(grace).is_ok() {
        waiter.join();
        return true;
    }
    log::warn!("gRPC calls still open after {grace:?}; cancelling them");
    server.cancel_all_calls();
    if done_rx.recv_timeout(CANCEL_GRACE).is_ok() {
        waiter.join();
    } else {
        // Cannot happen short of a gRPC bug; joining would make shutdown unbounded.
        log::error!("gRPC server still not stopped {CANCEL_GRACE:?} after cancelling its calls; leaving it");
        std::mem::forget(waiter);
        std::mem::forget(server);
    }
    false
}

/// Whether `listen` (`host:port`) only accepts connections from this machine: a loopback IP or
/// `localhost`. A wildcard (`0.0.0.0`, `[::]`) or any other address is reachable from elsewhere.
pub fn is_loopback(listen: &str) -> bool {
    let host = listen.rsplit_once(':').map_or(listen, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The address a server listening on `listen` is reachable at: its IP (loopback for a name
/// gRPC resolved itself) with the port it was given.
fn bound_addr(listen: &str, port: u16) -> SocketAddr {
    let host = listen.rsplit_once(':').map_or(listen, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = host.parse().unwrap_or(IpAddr::from([127, 0, 0, 1]));
    SocketAddr::new(ip, port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use grpcio::RpcStatus;

    #[test]
    fn transient_statuses_are_retryable_and_wrong_requests_are_not() {
        for code in [
            RpcStatusCode::UNAVAILABLE,
            RpcStatusCode::DEADLINE_EXCEEDED,
            RpcStatusCode::RESOURCE_EXHAUSTED,
            RpcStatusCode::ABORTED,
        ] {
            assert!(is_retryable(&grpcio::Error::RpcFailure(RpcStatus::new(code))), "{code:?}");
        }
        for code in [RpcStatusCode::INVALID_ARGUMENT, RpcStatusCode::NOT_FOUND, RpcStatusCode::UNAUTHENTICATED] {
            assert!(!is_retryable_code(code), "{code:?}");
        }
        assert!(is_retryable(&grpcio::Error::RemoteStopped));
        assert!(!is_retryable(&grpcio::Error::Codec("bad".into())));
    }

    #[test]
    fn loopback_addresses_are_told_from_open_ones() {
        for local in ["127.0.0.1:0", "127.1.2.3:80", "[::1]:50053", "localhost:1"] {
            assert!(is_loopback(local), "{local}");
        }
        for open in ["0.0.0.0:50053", "[::]:1", "10.0.0.1:80", "node-1.example:50061"] {
            assert!(!is_loopback(open), "{open}");
        }
    }

    #[test]
    fn bound_address_keeps_the_ip_and_takes_the_port() {
        assert_eq!(bound_addr("127.0.0.1:0", 5), "127.0.0.1:5".parse().unwrap());
        assert_eq!(bound_addr("[::1]:0", 5), "[::1]:5".parse().unwrap());
        assert_eq!(bound_addr("0.0.0.0:50053", 50053), "0.0.0.0:50053".parse().unwrap());
        assert_eq!(bound_addr("localhost:7", 7), "127.0.0.1:7".parse().unwrap());
    }
}
