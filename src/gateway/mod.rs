//! The connect-node ("gateway") role: receives broadcasts from push-manager over gRPC
//! (`protocol.ConnectNode`) and pushes each to the WebSocket users subscribed to its topic.
//!
//! [`Gateway::start`] binds both listeners and starts its named threads: grpcio's
//! completion-queue threads (`grpc-gateway-*`) run the service, `ws-accept` takes WebSocket
//! connections and deals them to `ws-loop-<n>` event loops, which own the connections and their
//! subscriptions (see [`protocol`] for the wire format, close codes and commands). Registering
//! the node in etcd is the caller's business; dropping the [`Gateway`] stops everything.

mod accept;
mod config;
mod error;
mod event_loop;
mod hub;
pub mod protocol;
mod registration;
mod service;
mod stats;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use grpcio::{EnvBuilder, ServerBuilder, ServerCredentials};
use log::{info, warn};

pub use config::{Config, NodeConfig};
pub use error::{Error, Result};
pub use hub::Hub;
pub use registration::{Registration, RegistrationConfig};
pub use stats::StatsSnapshot;

use event_loop::{LoopConfig, LoopParts};
use hub::{LoopHandle, TopicCounts};
use protocol::TopicLimits;
use stats::Stats;

impl Config {
    fn loop_config(&self) -> LoopConfig {
        LoopConfig {
            ws: event_loop::websocket_config(self.max_frame_bytes),
            max_out_buffer: self.max_out_buffer,
            ping_interval: self.ping_interval,
            pong_timeout: self.pong_timeout,
            limits: TopicLimits { max_len: self.max_topic_len, max_per_connection: self.max_topics_per_connection },
        }
    }
}

/// A thread that stops when its `stop` sender is dropped and its waker rung.
struct Worker {
    stop: Option<Sender<()>>,
    waker: Arc<mio::Waker>,
    join: Option<JoinHandle<()>>,
}

impl Worker {
    fn signal(&mut self) {
        if self.stop.take().is_some() {
            if let Err(e) = self.waker.wake() {
                warn!("cannot wake a gateway thread to stop it: {e}");
            }
        }
    }

    fn join(&mut self) {
        if let Some(join) = self.join.take() {
            let name = join.thread().name().unwrap_or("gateway thread").to_string();
            if join.join().is_err() {
                warn!("{name} panicked");
            }
        }
    }
}

/// A running connect-node. Dropping it shuts it down.
pub struct Gateway {
    grpc: Option<grpcio::Server>,
    grpc_addr: SocketAddr,
    ws_addr: SocketAddr,
    hub: Arc<Hub>,
    stats: Arc<Stats>,
    accept: Option<Worker>,
    loops: Vec<Worker>,
}

impl Gateway {
    /// Binds the WebSocket and gRPC listeners and starts every thread.
    pub fn start(config: Config) -> Result<Gateway> {
        config.validate()?;
        let stats = Arc::new(Stats::default());
        let counts = Arc::new(TopicCounts::default());

        let ws_addr: SocketAddr = config.ws_listen.parse().expect("validated");
        let listener = mio::net::TcpListener::bind(ws_addr).map_err(|e| Error::Bind {
            what: "WebSocket",
            addr: config.ws_listen.clone(),
            reason: e.to_string(),
        })?;
        let ws_addr = listener.local_addr()?;

        let mut loops = Vec::with_capacity(config.event_loops);
        let mut handles = Vec::with_capacity(config.event_loops);
        for n in 0..config.event_loops {
            let (worker, handle) = spawn_loop(n, &config, counts.clone(), stats.clone())?;
            loops.push(worker);
            handles.push(handle);
        }
        let hub = Arc::new(Hub::new(handles.clone(), counts, stats.clone(), config.max_loop_backlog));
        // From here on, an error drops `gateway`, which stops what was started.
        let mut gateway = Gateway {
            grpc: None,
            grpc_addr: "0.0.0.0:0".parse().expect("literal"),
            ws_addr,
            hub,
            stats,
            accept: None,
            loops,
        };

        let (stop, stop_rx) = crossbeam_channel::bounded(0);
        let (acceptor, waker) = accept::Acceptor::new(listener, handles, gateway.stats.clone(), stop_rx)?;
        let join = std::thread::Builder::new().name("ws-accept".into()).spawn(move || acceptor.run())?;
        gateway.accept = Some(Worker { stop: Some(stop), waker, join: Some(join) });

        let (server, grpc_addr) = start_grpc(&config, gateway.hub.clone())?;
        gateway.grpc = Some(server);
        gateway.grpc_addr = grpc_addr;
        info!("gateway up: gRPC on {grpc_addr}, WebSocket on ws://{ws_addr}{}", event_loop::WS_PATH);
        Ok(gateway)
    }

    /// The address the gRPC service is bound to (the real port when 0 was asked for).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The address the WebSocket endpoint is bound to (the real port when 0 was asked for).
    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_addr
    }

    /// The counters as they are now.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Publishes without gRPC (tests, demos).
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Stops accepting RPCs: waits for those in flight (they never block), then cancels the rest.
    pub fn stop_grpc(&mut self) {
        if let Some(mut server) = self.grpc.take() {
            if let Err(e) = futures::executor::block_on(server.shutdown()) {
                warn!("gRPC server shutdown: {e}");
            }
            // Dropping the server (and with it the last handle on its environment) joins the
            // completion-queue threads.
        }
    }

    /// Stops gRPC and the accept thread, closes every WebSocket connection with 1001 "server
    /// shutting down" (after what was queued for it), waits a bounded time for the close
    /// handshakes and joins every thread. Idempotent.
    pub fn shutdown(&mut self) {
        self.stop_grpc();
        if let Some(accept) = &mut self.accept {
            accept.signal();
            accept.join();
        }
        for worker in &mut self.loops {
            worker.signal();
        }
        for worker in &mut self.loops {
            worker.join();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("grpc_addr", &self.grpc_addr)
            .field("ws_addr", &self.ws_addr)
            .field("event_loops", &self.loops.len())
            .finish()
    }
}

fn spawn_loop(n: usize, config: &Config, counts: Arc<TopicCounts>, stats: Arc<Stats>) -> Result<(Worker, LoopHandle)> {
    let poll = mio::Poll::new()?;
    let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(usize::MAX))?);
    // Bounded by admission (`Hub::admit` refuses broadcasts while it is long), not by the
    // channel: a full channel would make the publisher block or drop half a fan-out.
    let (tx, inbox) = crossbeam_channel::unbounded();
    let (stop, stop_rx) = crossbeam_channel::bounded(0);
    let wake_pending = Arc::new(AtomicBool::new(false));
    let parts = LoopParts {
        poll,
        inbox,
        stop: stop_rx,
        wake_pending: wake_pending.clone(),
        counts,
        stats,
        config: config.loop_config(),
    };
    let join = std::thread::Builder::new().name(format!("ws-loop-{n}")).spawn(move || event_loop::run(parts))?;
    let worker = Worker { stop: Some(stop), waker: waker.clone(), join: Some(join) };
    Ok((worker, LoopHandle { tx, waker, wake_pending }))
}

/// Largest ConnectNode request accepted.
const GRPC_MAX_RECEIVE_BYTES: i32 = 64 << 20;

fn start_grpc(config: &Config, hub: Arc<Hub>) -> Result<(grpcio::Server, SocketAddr)> {
    let env = Arc::new(EnvBuilder::new().cq_count(config.grpc_threads).name_prefix("grpc-gateway").build());
    let service = crate::proto::protocol_grpc::create_connect_node(service::ConnectNodeService::new(hub));
    // No SO_REUSEPORT (gRPC's default): a second node on the same port must fail, not share it.
    // The receive limit leaves room for push-manager's batches (at most 2 MiB) and large bodies.
    let args = grpcio::ChannelBuilder::new(env.clone())
        .reuse_port(false)
        .max_receive_message_len(GRPC_MAX_RECEIVE_BYTES)
        .build_args();
    let mut server = ServerBuilder::new(env).channel_args(args).register_service(service).build()?;
    let port = server
        .add_listening_port(config.grpc_listen.clone(), ServerCredentials::insecure())
        .map_err(|e| Error::Bind { what: "gRPC", addr: config.grpc_listen.clone(), reason: e.to_string() })?;
    server.start();
    let mut addr: SocketAddr = config.grpc_listen.parse().expect("validated");
    addr.set_port(port);
    Ok((server, addr))
}

/// Raises this process's soft limit on open files to its hard limit (a node holds a socket per
/// client). Returns the new soft limit.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read or write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nofile_limit_is_raised_to_the_hard_limit() {
        let soft = raise_nofile_limit().unwrap();
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
        assert_eq!(soft, limit.rlim_cur);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }
}
