//! `push-manager node`: the connect-node role. Serves `protocol.ConnectNode` and WebSocket users,
//! registers in etcd under a lease, and on SIGINT/SIGTERM deregisters first (so push-manager
//! stops sending at once), then closes every connection with a close frame and exits 0.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use log::{info, warn};

use super::{parse_duration, run_until_signal, EtcdArgs, LogArgs};
use crate::etcd;
use crate::gateway::{self, Gateway, Registration, RegistrationConfig};

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// gRPC address for protocol.ConnectNode (what push-manager calls).
    #[arg(long, default_value = "0.0.0.0:50061")]
    pub grpc_listen: String,
    /// WebSocket address; users connect to ws://<this>/ws.
    #[arg(long, default_value = "0.0.0.0:8090")]
    pub ws_listen: String,
    #[command(flatten)]
    pub registry: EtcdArgs,
    /// This node's id [default: <hostname>-<grpc port>].
    #[arg(long)]
    pub node_id: Option<String>,
    /// gRPC address push-manager should call [default: the bound address, 127.0.0.1 for a wildcard].
    #[arg(long)]
    pub advertise: Option<String>,
    /// TTL of the registration lease; a node that dies unannounced disappears after it.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// WebSocket event-loop threads.
    #[arg(long, default_value_t = 2)]
    pub event_loops: usize,
    /// Bytes a connection may have waiting to be sent before it is dropped as a slow consumer.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_out_buffer: usize,
    /// Deliveries that may wait in one event loop before broadcasts are refused as busy
    /// (RESOURCE_EXHAUSTED, which push-manager retries).
    #[arg(long, default_value_t = 10_000)]
    pub max_loop_backlog: usize,
    /// How often idle connections are pinged.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub ping_interval: Duration,
    /// A connection silent (no pong, no frame) for this long is dropped.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub pong_timeout: Duration,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The connect-node could not start serving.
    #[error("{0}")]
    Gateway(#[from] gateway::Error),
    /// Registration in etcd failed.
    #[error("registering in etcd: {0}")]
    Etcd(#[from] etcd::Error),
    /// A flag is out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// Signal handling could not be set up.
    #[error("installing signal handlers: {0}")]
    Signals(#[from] std::io::Error),
}

/// The address to advertise for a bound one: a wildcard host is not callable from elsewhere.
pub fn advertised(bound: SocketAddr) -> String {
    if bound.ip().is_unspecified() {
        format!("127.0.0.1:{}", bound.port())
    } else {
        bound.to_string()
    }
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it on success.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(0);
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if ok && !name.is_empty() => name.to_string(),
        _ => "node".to_string(),
    }
}

pub fn run(args: NodeArgs) -> Result<(), NodeError> {
    super::init_logging(args.log.log_level);
    if args.lease_ttl < Duration::from_secs(1) {
        return Err(NodeError::InvalidArgument("--lease-ttl must be at least 1s (etcd counts whole seconds)".into()));
    }
    let etcd_config = args.registry.config();
    etcd_config.validate().map_err(|e| NodeError::InvalidArgument(format!("--etcd: {e}")))?;
    match gateway::raise_nofile_limit() {
        Ok(limit) => info!("open-file limit {limit}"),
        Err(e) => warn!("cannot raise the open-file limit ({e}); fewer connections fit"),
    }
    let mut gateway = Gateway::start(gateway::Config {
        grpc_listen: args.grpc_listen.clone(),
        ws_listen: args.ws_listen.clone(),
        event_loops: args.event_loops,
        max_out_buffer: args.max_out_buffer,
        max_loop_backlog: args.max_loop_backlog,
        ping_interval: args.ping_interval,
        pong_timeout: args.pong_timeout,
        ..gateway::Config::default()
    })?;
    let addr = args.advertise.clone().unwrap_or_else(|| advertised(gateway.grpc_addr()));
    crate::addr::validate_host_port(&addr).map_err(|e| NodeError::InvalidArgument(format!("--advertise: {e}")))?;
    let node_id = args.node_id.clone().unwrap_or_else(|| format!("{}-{}", hostname(), gateway.grpc_addr().port()));
    if node_id.is_empty() || node_id.contains('/') {
        return Err(NodeError::InvalidArgument(format!("--node-id {node_id:?} must be non-empty and contain no '/'")));
    }
    let client = etcd::Client::connect(etcd_config)?;
    let mut registration = Registration::start(
        client,
        RegistrationConfig {
            key: format!("{}{node_id}", args.registry.prefix),
            addr: addr.clone(),
            ttl: args.lease_ttl,
        },
    )?;
    // Machine-readable line for scripts and tests that bind port 0.
    println!("node {node_id} grpc {} ws ws://{}/ws", gateway.grpc_addr(), gateway.ws_addr());
    info!("connect-node {node_id} registered as {addr}");

    run_until_signal(None, || {})?;
    info!("shutdown signal received: deregistering, then closing connections");
    registration.deregister();
    gateway.shutdown();
    let stats = gateway.stats();
    info!("connect-node {node_id} stopped: {stats:?}");
    if stats.connections_open != 0 {
        warn!("{} connection(s) did not close cleanly", stats.connections_open);
    }
    Ok(())
}
