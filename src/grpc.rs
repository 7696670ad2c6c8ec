//! gRPC plumbing both roles and the etcd client share: which statuses mean "try again", and how
//! a server is built, bound and started.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::bounded;

use grpcio::{ChannelBuilder, Environment, RpcStatusCode, Server, ServerBuilder, ServerCredentials, Service};

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
}

/// Builds a server for `service` on `listen` (`host:port`, port 0 picks one), accepting
/// requests up to `max_receive_bytes`, starts it, and returns it with the address it is bound
/// to.
pub fn start_server(
    env: Arc<Environment>,
    listen: &str,
    max_receive_bytes: usize,
    service: Service,
) -> Result<(Server, SocketAddr), ServerError> {
    // gRPC sets SO_REUSEPORT by default, which would let a second server share the port
    // silently instead of failing to start.
    let args = ChannelBuilder::new(env.clone())
        .reuse_port(false)
        .max_receive_message_len(max_receive_bytes.min(i32::MAX as usize) as i32)
        .build_args();
    let mut server = ServerBuilder::new(env).channel_args(args).register_service(service).build()?;
    let port = server
        .add_listening_port(listen, ServerCredentials::insecure())
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
    fn bound_address_keeps_the_ip_and_takes_the_port() {
        assert_eq!(bound_addr("127.0.0.1:0", 5), "127.0.0.1:5".parse().unwrap());
        assert_eq!(bound_addr("[::1]:0", 5), "[::1]:5".parse().unwrap());
        assert_eq!(bound_addr("0.0.0.0:50053", 50053), "0.0.0.0:50053".parse().unwrap());
        assert_eq!(bound_addr("localhost:7", 7), "127.0.0.1:7".parse().unwrap());
    }
}
