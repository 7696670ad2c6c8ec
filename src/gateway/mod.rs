//! The connect-node ("gateway") role: receives broadcasts from push-manager over gRPC
//! (`protocol.ConnectNode`) and pushes each to the WebSocket users subscribed to its topic, or
//! to every connection of the users it names.
//!
//! [`Gateway::start`] binds both listeners and starts its named threads: grpcio's
//! completion-queue threads (`grpc-gateway-*`) run the service, `ws-accept` takes WebSocket
//! connections and deals them to `ws-loop-<n>` event loops, which own the connections and their
//! subscriptions (see `protocol.rs` for the wire format, close codes and commands), and
//! `seq-sweep` skips gaps in a push-manager's order that stay open past `--reorder-hold` (see
//! `sequencer.rs`) even when nothing else arrives. Registering
//! the node in etcd is the caller's business ([`crate::registry::Registration`]); a caller that deregistered
//! lets push-manager finish sending with [`Gateway::wait_until_quiet`] before stopping.
//! Dropping the [`Gateway`] stops everything, in a bounded time whatever clients do.
//!
//! The gRPC server also hosts `grpc.health.v1.Health`, NOT_SERVING from [`Gateway::begin_drain`]
//! on, and server reflection ([`crate::reflection`]); [`Gateway::probe`] is what the admin
//! endpoint reads (`observe.rs`).

mod accept;
mod access;
mod config;
mod error;
mod hub;
mod observe;
mod protocol;
mod sequencer;
mod service;
mod stats;
mod ws;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpcio::{EnvBuilder, Environment};
use log::{info, warn};

pub use config::{Config, NodeConfig, WsAuth, WsTls};
pub use error::{Error, Result};
pub use hub::Hub;
pub use stats::StatsSnapshot;

use crate::admin::{Histogram, Probe, Serving, HEALTH_SERVICE};
use crate::auth::KeyFile;
use crate::registry::RegistrationState;
use crate::thread::StoppableThread;
use crate::token::TokenKeys;
use access::{Gatekeeper, OriginPolicy};
use hub::{Backlog, BacklogLimits, LoopHandle, SharedCounts};
use observe::DELIVERY_LATENCY_BOUNDS_US;
use observe::{GatewayProbe, Liveness};
use sequencer::{HoldLimits, Sequencer};
use service::{Activity, OpenStreams};
use stats::Stats;
use ws::{LoopConfig, LoopParts, LoopState};

/// How long no ConnectNode call may have arrived before a stopping node takes push-manager to
/// have stopped sending ([`Gateway::wait_until_quiet`]): push-manager hears of a deregistration
/// through its etcd watch within milliseconds, then sends what it had queued back to back.
pub const QUIET_BEFORE_STOP: Duration = Duration::from_millis(500);

/// The service the gRPC server hosts, as `grpc.health.v1.Health` names it.
const SERVICE_NAME: &str = "protocol.ConnectNode";

/// How long gRPC calls in flight may take to end when the server stops, before they are
/// cancelled. Handlers never block, so only a stalled client is still in a call by then.
const GRPC_STOP_GRACE: Duration = Duration::from_secs(2);

/// A running connect-node. Dropping it shuts it down.
pub struct Gateway {
    /// The process's gRPC environment: the server and the registration's etcd client share its
    /// threads (see [`crate::etcd::Client::connect_on`]).
    env: Arc<Environment>,
    grpc: Option<grpcio::Server>,
    activity: Arc<Activity>,
    /// push-manager's `BroadcastBatchStream`s, ended before the gRPC server stops.
    streams: Arc<OpenStreams>,
    grpc_addr: SocketAddr,
    ws_addr: SocketAddr,
    hub: Arc<Hub>,
    stats: Arc<Stats>,
    accept: Option<StoppableThread>,
    loops: Vec<StoppableThread>,
    sequencer: Arc<Sequencer>,
    /// `seq-sweep`: skips gaps open past the hold time.
    sweep: Option<StoppableThread>,
    /// The node token callers must send, re-read on SIGHUP.
    token: Option<Arc<KeyFile>>,
    /// The keys WebSocket connection tokens are signed with, re-read on SIGHUP.
    token_keys: Option<Arc<TokenKeys>>,
    /// SERVING until the drain begins; reported by gRPC health and `/readyz`.
    serving: Arc<Serving>,
    /// Which of the threads above have ended, for `/healthz`.
    liveness: Arc<Liveness>,
    /// Subscriptions per topic and connections per user, for the metrics.
    counts: Arc<SharedCounts>,
    /// Each event loop's way in, for the metrics' backlog.
    loop_handles: Vec<LoopHandle>,
}

impl Gateway {
    /// Binds the WebSocket and gRPC listeners and starts every thread.
    pub fn start(config: Config) -> Result<Gateway> {
        config.validate()?;
        let token = match &config.node_token_file {
            Some(path) => Some(Arc::new(KeyFile::load("--node-token-file", path).map_err(Error::Config)?)),
            None => None,
        };
        let token_keys = match &config.token_key_file {
            Some(path) => Some(Arc::new(TokenKeys::load(path).map_err(Error::Config)?)),
            None => None,
        };
        let origins = OriginPolicy::new(&config.allowed_origins, config.require_origin).map_err(Error::Config)?;
        let gatekeeper = Arc::new(Gatekeeper::new(
            config.ws_auth_mode(),
            token_keys.clone(),
            config.token_leeway,
            config.ws_auth_timeout,
            origins,
        ));
        // Read once, here rather than in `validate` (which reads no files, like the token keys
        // above): every wss connection shares it. Nothing is bound yet.
        let ws_tls = config.ws_tls.as_ref().map(WsTls::server_config).transpose()?;
        let stats = Arc::new(Stats::default());
        let counts = Arc::new(SharedCounts::default());

        let ws_addr: SocketAddr = config.ws_listen.parse().expect("validated");
        let listener = mio::net::TcpListener::bind(ws_addr)
            .map_err(|e| Error::Bind { addr: config.ws_listen.clone(), reason: e.to_string() })?;
        let ws_addr = listener.local_addr()?;

        let liveness = Arc::new(Liveness::default());
        let mut loops = Vec::with_capacity(config.event_loops);
        let mut handles = Vec::with_capacity(config.event_loops);
        for n in 0..config.event_loops {
            let parts = (gatekeeper.clone(), ws_tls.clone(), counts.clone(), stats.clone());
            let (thread, handle) = spawn_loop(n, &config, parts, &liveness)?;
            loops.push(thread);
            handles.push(handle);
        }
        let limits = BacklogLimits { deliveries: config.max_loop_backlog, bytes: config.max_loop_backlog_bytes };
        let hub = Arc::new(Hub::new(handles.clone(), counts.clone(), stats.clone(), limits));
        let hold = HoldLimits { time: config.reorder_hold, messages: config.reorder_hold_messages };
        let sequencer = Arc::new(Sequencer::new(hold, stats.clone()));
        // From here on, an error drops `gateway`, which stops what was started.
        let env = Arc::new(EnvBuilder::new().cq_count(config.grpc_threads).name_prefix("grpc-gateway").build());
        let mut gateway = Gateway {
            env: env.clone(),
            grpc: None,
            activity: Arc::new(Activity::new()),
            streams: Arc::new(OpenStreams::new(stats.clone())),
            grpc_addr: "0.0.0.0:0".parse().expect("literal"),
            ws_addr,
            hub,
            stats,
            accept: None,
            loops,
            sequencer: sequencer.clone(),
            sweep: None,
            token: token.clone(),
            token_keys,
            serving: Arc::new(Serving::new(&[SERVICE_NAME])),
            liveness: liveness.clone(),
            counts,
            loop_handles: handles.clone(),
        };
        gateway.sweep = Some(spawn_sweep(sequencer.clone(), gateway.hub.clone(), liveness.alive("seq-sweep"))?);

        let answers_plain_http = ws_tls.is_none();
        let (acceptor, waker) = accept::Acceptor::new(
            listener,
            handles,
            gateway.stats.clone(),
            config.max_connections,
            answers_plain_http,
        )?;
        let alive = liveness.alive("ws-accept");
        let accept = StoppableThread::spawn("ws-accept", move |stop| {
            let _alive = alive;
            acceptor.run(stop)
        })?;
        gateway.accept = Some(accept.with_wake(wake_to_stop(waker)));

        let admission = service::Admission {
            token,
            max_message_bytes: config.max_message_bytes,
            max_batch_messages: config.max_batch_messages,
            max_push_users: config.max_push_users,
        };
        let service = service::ConnectNodeService::new(
            gateway.hub.clone(),
            gateway.activity.clone(),
            admission,
            sequencer,
            gateway.streams.clone(),
        );
        let (server, grpc_addr) = start_grpc(env, &config, service, gateway.serving.health_service())?;
        gateway.grpc = Some(server);
        gateway.grpc_addr = grpc_addr;
        let scheme = if answers_plain_http { "ws" } else { "wss" };
        info!("gateway up: gRPC on {grpc_addr}, WebSocket on {scheme}://{ws_addr}{}", ws::WS_PATH);
        Ok(gateway)
    }

    /// Re-reads the node token file and the token key file (SIGHUP): calls and connections in
    /// flight are not disturbed, and a file that cannot be read keeps what was loaded before.
    /// Logs counts, never secrets.
    pub fn reload_credentials(&self) {
        if let Some(token) = &self.token {
            match token.reload() {
                Ok((before, after)) => info!("reloaded the node token file: {before} token(s) before, {after} now"),
                Err(e) => {
                    warn!("reloading the node token file failed, keeping the {} loaded before: {e}", token.len())
                }
            }
        }
        if let Some(keys) = &self.token_keys {
            match keys.reload() {
                Ok((before, after)) => info!("reloaded the token key file: {before} key(s) before, {after} now"),
                Err(e) => warn!("reloading the token key file failed, keeping the keys loaded before: {e}"),
            }
        }
    }

    /// From now on NOT_SERVING (gRPC health) and not ready (`/readyz`): call it first when
    /// stopping, while the gRPC port still answers. Idempotent.
    pub fn begin_drain(&self) {
        self.serving.begin_drain();
    }

    /// What the admin endpoint reads: metrics, health, and readiness, which waits for
    /// `registration` when there is one.
    pub fn probe(&self, registration: Option<Arc<RegistrationState>>) -> Arc<dyn Probe> {
        Arc::new(GatewayProbe {
            stats: self.stats.clone(),
            sequencer: self.sequencer.clone(),
            streams: self.streams.clone(),
            counts: self.counts.clone(),
            loops: self.loop_handles.clone(),
            liveness: self.liveness.clone(),
            serving: self.serving.clone(),
            registration,
        })
    }

    /// The gRPC environment this node runs on, for the process's other gRPC clients.
    pub fn grpc_environment(&self) -> Arc<Environment> {
        self.env.clone()
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
        StatsSnapshot {
            held_now: self.sequencer.held_now() as u64,
            batch_streams_open: self.streams.count() as u64,
            ..self.stats.snapshot()
        }
    }

    /// Publishes without gRPC (tests, demos).
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Waits, for at most `grace`, until no ConnectNode call has arrived for
    /// [`QUIET_BEFORE_STOP`] (counted from this call at the earliest): once deregistered, a
    /// node keeps taking what push-manager had queued for it until that has come. Returns
    /// whether it went quiet within `grace`.
    pub fn wait_until_quiet(&self, grace: Duration) -> bool {
        let start = Instant::now();
        let deadline = start + grace;
        loop {
            let quiet_from = self.activity.last_call().max(start) + QUIET_BEFORE_STOP;
            let now = Instant::now();
            if now >= quiet_from {
                return true;
            }
            if now >= deadline {
                return false;
            }
            // Not a poll: until then the answer cannot change.
            std::thread::sleep(quiet_from.min(deadline) - now);
        }
    }

    /// Stops accepting RPCs: ends push-manager's streams between two batches, waits a short
    /// while for the calls in flight (handlers never block), then cancels the rest, so a client
    /// stalled mid-call cannot hold the node up. Returns whether every call ended without being
    /// cancelled (`true` too when gRPC was stopped already).
    pub fn stop_grpc(&mut self) -> bool {
        self.streams.end_all();
        // Dropping the server (and with it the last handle on its environment) joins the
        // completion-queue threads.
        self.grpc.take().is_none_or(|server| crate::grpc::stop_server(server, GRPC_STOP_GRACE))
    }

    /// Stops gRPC and the accept thread, closes every WebSocket connection with 1001 "server
    /// shutting down" (after what was queued for it), waits a bounded time for the close
    /// handshakes and joins every thread. Idempotent.
    pub fn shutdown(&mut self) {
        self.begin_drain();
        let _ = self.stop_grpc();
        // What is still held behind a gap is dropped with the node, as a restart would.
        if let Some(sweep) = &mut self.sweep {
            sweep.shutdown();
        }
        if let Some(accept) = &mut self.accept {
            accept.shutdown();
        }
        // All loops close their connections at once; then each is waited for.
        for thread in &mut self.loops {
            thread.signal();
        }
        for thread in &mut self.loops {
            thread.join();
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

/// What every event loop shares.
type LoopShared = (Arc<Gatekeeper>, Option<Arc<rustls::ServerConfig>>, Arc<SharedCounts>, Arc<Stats>);

fn spawn_loop(
    n: usize,
    config: &Config,
    (gatekeeper, tls, counts, stats): LoopShared,
    liveness: &Arc<Liveness>,
) -> Result<(StoppableThread, LoopHandle)> {
    let poll = mio::Poll::new()?;
    let waker = Arc::new(mio::Waker::new(poll.registry(), ws::WAKER)?);
    // Bounded by admission (`Hub::admit` refuses broadcasts while it is long), not by the
    // channel: a full channel would make the publisher block or drop half a fan-out.
    let (tx, inbox) = crossbeam_channel::unbounded();
    let wake_pending = Arc::new(AtomicBool::new(false));
    let backlog = Arc::new(Backlog::default());
    let delivery_latency_us = Arc::new(Histogram::new(DELIVERY_LATENCY_BOUNDS_US));
    let parts = LoopParts {
        poll,
        waker: waker.clone(),
        inbox,
        wake_pending: wake_pending.clone(),
        backlog: backlog.clone(),
        delivery_latency_us: delivery_latency_us.clone(),
        counts,
        stats,
        config: LoopConfig::new(config, gatekeeper),
        tls,
    };
    let (poll, state) = LoopState::new(parts)?;
    let name = format!("ws-loop-{n}");
    let alive = liveness.alive(name.clone());
    let polled = state.clone();
    let thread = StoppableThread::spawn(name, move |stop| {
        let _alive = alive;
        ws::run(poll, polled, stop)
    })?;
    Ok((
        thread.with_wake(wake_to_stop(waker.clone())),
        LoopHandle { tx, waker, wake_pending, backlog, delivery_latency_us, state },
    ))
}

/// The wake-up that makes a thread sleeping in a mio poll look at its stop channel.
fn wake_to_stop(waker: Arc<mio::Waker>) -> impl FnOnce() + Send + 'static {
    move || {
        if let Err(e) = waker.wake() {
            warn!("cannot wake a gateway thread to stop it: {e}");
        }
    }
}

/// Largest ConnectNode request accepted: room for push-manager's batches (at most 2 MiB) and
/// large bodies.
const GRPC_MAX_RECEIVE_BYTES: usize = 64 << 20;

/// `seq-sweep`: runs the sequencer's sweep on a tick, publishing what it releases.
fn spawn_sweep(sequencer: Arc<Sequencer>, hub: Arc<Hub>, alive: observe::Alive) -> Result<StoppableThread> {
    let ticks = crossbeam_channel::tick(sequencer.sweep_interval());
    Ok(StoppableThread::spawn("seq-sweep", move |stop| {
        let _alive = alive;
        loop {
            crossbeam_channel::select! {
                recv(stop) -> _ => return,
                recv(ticks) -> _ => sequencer.sweep(Instant::now(), |batch| hub.publish_batch(batch)),
            }
        }
    })?)
}

fn start_grpc(
    env: Arc<Environment>,
    config: &Config,
    service: service::ConnectNodeService,
    health: grpcio::Service,
) -> Result<(grpcio::Server, SocketAddr)> {
    let service = crate::proto::protocol_grpc::create_connect_node(service);
    let reflection = crate::reflection::services(&[SERVICE_NAME, HEALTH_SERVICE]);
    let services = [service, health].into_iter().chain(reflection);
    Ok(crate::grpc::start_server(env, &config.grpc_listen, GRPC_MAX_RECEIVE_BYTES, config.tls.as_ref(), services)?)
}

/// Raises this process's soft limit on open files to its hard limit (a node holds a socket per
/// client). Returns the new soft limit.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a live, writable rlimit for the whole call; getrlimit only writes it.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: `limit` is a live rlimit that setrlimit only reads; a soft limit equal to the
        // hard one is always allowed.
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
        // SAFETY: as in `raise_nofile_limit`, getrlimit only writes the live struct we pass.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
        assert_eq!(soft, limit.rlim_cur);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }
}
