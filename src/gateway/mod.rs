//! The connect-node ("gateway") role: receives broadcasts from push-manager over gRPC
//! (`protocol.ConnectNode`) and pushes each to the WebSocket users subscribed to its topic.
//!
//! [`Gateway::start`] binds both listeners and starts its named threads: grpcio's
//! completion-queue threads (`grpc-gateway-*`) run the service, `ws-accept` takes WebSocket
//! connections and deals them to `ws-loop-<n>` event loops, which own the connections and their
//! subscriptions (see [`protocol`] for the wire format, close codes and commands). Registering
//! the node in etcd is the caller's business; dropping the [`Gateway`] stops everything.

mod accept;
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
use std::time::Duration;

use crossbeam_channel::Sender;
use grpcio::{EnvBuilder, ServerBuilder, ServerCredentials};
use log::{info, warn};

pub use error::{Error, Result};
pub use hub::Hub;
pub use registration::{Registration, RegistrationConfig};
pub use stats::StatsSnapshot;

use event_loop::{LoopConfig, LoopParts};
use hub::{LoopHandle, TopicCounts};
use protocol::TopicLimits;
use stats::Stats;

/// How a connect-node listens and treats its clients. Plain data: build it, `validate()` it (as
/// [`Gateway::start`] does) and pass it by value.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address the `ConnectNode` gRPC service listens on, `ip:port` (port 0 picks a free one).
    /// Default `0.0.0.0:50061`.
    pub grpc_listen: String,
    /// Address the WebSocket endpoint (`/ws`) listens on, `ip:port` (port 0 picks a free one).
    /// Default `0.0.0.0:8090`.
    pub ws_listen: String,
    /// Event-loop threads (`ws-loop-<n>`) sharing the WebSocket connections. Default 2.
    pub event_loops: usize,
    /// Per connection, bytes of deliveries that may wait to be written; a delivery that would
    /// pass it closes the connection with 4000. Default 1 MiB.
    pub max_out_buffer: usize,
    /// Biggest frame or message accepted from a client, in bytes; bigger closes with 1009.
    /// Default 64 KiB.
    pub max_frame_bytes: usize,
    /// How often each connection is pinged. Default 20 s.
    pub ping_interval: Duration,
    /// A connection from which nothing (pong or any frame) arrived for this long is dropped;
    /// also the time allowed for the handshake. Default 60 s.
    pub pong_timeout: Duration,
    /// Longest topic name, in bytes. Default 128.
    pub max_topic_len: usize,
    /// Most topics one connection may hold. Default 64.
    pub max_topics_per_connection: usize,
    /// gRPC completion-queue threads. Default 2.
    pub grpc_threads: usize,
    /// Deliveries that may wait in one event loop's queue. While any loop has this many, the
    /// node refuses broadcasts with RESOURCE_EXHAUSTED (push-manager retries them with backoff)
    /// rather than let its queues grow without bound. Default 10,000.
    pub max_loop_backlog: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            grpc_listen: "0.0.0.0:50061".into(),
            ws_listen: "0.0.0.0:8090".into(),
            event_loops: 2,
            max_out_buffer: 1 << 20,
            max_frame_bytes: 64 << 10,
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(60),
            max_topic_len: crate::topic::MAX_TOPIC_BYTES,
            max_topics_per_connection: 64,
            grpc_threads: 2,
            max_loop_backlog: 10_000,
        }
    }
}

impl Config {
    /// Checks every field; the error names the first bad one and what it must be.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        for (name, addr) in [("grpc_listen", &self.grpc_listen), ("ws_listen", &self.ws_listen)] {
            if addr.parse::<SocketAddr>().is_err() {
                return bad(format!("{name} must be ip:port (e.g. 0.0.0.0:8090), got {addr:?}"));
            }
        }
        if !(1..=256).contains(&self.event_loops) {
            return bad(format!("event_loops must be 1..=256, got {}", self.event_loops));
        }
        if !(1..=64).contains(&self.grpc_threads) {
            return bad(format!("grpc_threads must be 1..=64, got {}", self.grpc_threads));
        }
        if self.max_frame_bytes < 256 {
            return bad(format!(
                "max_frame_bytes must be at least 256 (a subscribe command), got {}",
                self.max_frame_bytes
            ));
        }
        if self.max_out_buffer < 1024 {
            return bad(format!("max_out_buffer must be at least 1024 bytes, got {}", self.max_out_buffer));
        }
        if self.ping_interval.is_zero() {
            return bad("ping_interval must be more than zero".into());
        }
        if self.pong_timeout <= self.ping_interval {
            return bad(format!(
                "pong_timeout ({:?}) must be longer than ping_interval ({:?}), or live clients get dropped",
                self.pong_timeout, self.ping_interval
            ));
        }
        if !(1..=1024).contains(&self.max_topic_len) {
            return bad(format!("max_topic_len must be 1..=1024, got {}", self.max_topic_len));
        }
        if self.max_topics_per_connection == 0 {
            return bad("max_topics_per_connection must be at least 1".into());
        }
        if self.max_loop_backlog == 0 {
            return bad("max_loop_backlog must be at least 1".into());
        }
        Ok(())
    }

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
    fn default_config_is_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn validate_names_the_bad_field() {
        let check = |config: Config, needle: &str| {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        };
        check(Config { ws_listen: "localhost".into(), ..Config::default() }, "ws_listen");
        check(Config { event_loops: 0, ..Config::default() }, "event_loops");
        check(Config { grpc_threads: 0, ..Config::default() }, "grpc_threads");
        check(Config { max_frame_bytes: 10, ..Config::default() }, "max_frame_bytes");
        check(Config { max_out_buffer: 10, ..Config::default() }, "max_out_buffer");
        check(Config { pong_timeout: Duration::from_secs(1), ..Config::default() }, "pong_timeout");
        check(Config { max_topic_len: 0, ..Config::default() }, "max_topic_len");
        check(Config { max_topics_per_connection: 0, ..Config::default() }, "max_topics_per_connection");
        check(Config { max_loop_backlog: 0, ..Config::default() }, "max_loop_backlog");
    }

    #[test]
    fn nofile_limit_is_raised_to_the_hard_limit() {
        let soft = raise_nofile_limit().unwrap();
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
        assert_eq!(soft, limit.rlim_cur);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }
}
