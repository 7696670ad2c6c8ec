//! `push-manager node`: the connect-node role. Serves `protocol.ConnectNode` and WebSocket users,
//! registers in etcd under a lease (its gRPC address under `--prefix`, its WebSocket URL beside
//! it under `registry::ws_prefix`; in the background while etcd is unreachable), and on
//! SIGINT/SIGTERM deregisters first (so push-manager stops sending), keeps delivering what
//! push-manager had already queued for it until its calls stop (at most `--shutdown-grace`),
//! then closes every connection with a close frame and exits 0.

use std::path::PathBuf;

use clap::Args;
use log::{info, warn};

use super::{parse_duration, ConfigFileArgs, EtcdArgs, LogArgs, ServerTlsArgs, Signals, Tick};
use crate::addr::advertised;
use crate::admin;
use crate::etcd;
use crate::gateway::{self, Config, Gateway, NodeConfig, WsAuth};
use crate::registry::{self, Record, Registration, RegistrationConfig};

/// Every default comes from `gateway::Config::default()` / `NodeConfig::default()`: written
/// once, shown by `--help`.
#[derive(Args, Debug)]
pub struct NodeArgs {
    /// gRPC address for protocol.ConnectNode (what push-manager calls).
    #[arg(long, default_value_t = Config::default().grpc_listen)]
    pub grpc_listen: String,
    /// WebSocket address; users connect to ws://<this>/ws (wss:// with --ws-tls-cert).
    #[arg(long, default_value_t = Config::default().ws_listen)]
    pub ws_listen: String,
    /// Certificate chain (PEM, leaf first) to serve WebSocket users over TLS (wss://) with
    /// (with --ws-tls-key); clients that do not speak TLS are dropped.
    #[arg(long, requires = "ws_tls_key")]
    pub ws_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --ws-tls-cert.
    #[arg(long, requires = "ws_tls_cert")]
    pub ws_tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub registry: EtcdArgs,
    /// This node's id: 1-128 bytes, no '/', whitespace or control characters [default: <hostname>-<grpc port>].
    #[arg(long)]
    pub node_id: Option<String>,
    /// gRPC address push-manager should call [default: the bound address, 127.0.0.1 for a wildcard]; its
    /// host also stands for a wildcard --ws-listen in the WebSocket URL published for `bench --etcd`.
    #[arg(long)]
    pub advertise: Option<String>,
    /// TTL of the registration lease; a node that dies unannounced disappears after it.
    #[arg(long, default_value_t = NodeConfig::default().lease_ttl.into(), value_parser = parse_duration)]
    pub lease_ttl: humantime::Duration,
    /// On SIGINT/SIGTERM, after deregistering: longest time to keep delivering what push-manager
    /// still sends (it stops sooner once no call came for 500ms).
    #[arg(long, default_value_t = NodeConfig::default().shutdown_grace.into(), value_parser = parse_duration)]
    pub shutdown_grace: humantime::Duration,
    /// WebSocket event-loop threads.
    #[arg(long, default_value_t = Config::default().event_loops)]
    pub event_loops: usize,
    /// gRPC completion-queue threads.
    #[arg(long, default_value_t = Config::default().grpc_threads)]
    pub grpc_threads: usize,
    /// Bytes a connection may have waiting to be sent before it is dropped as a slow consumer
    /// (one message of any size is always taken when nothing else waits).
    #[arg(long, default_value_t = Config::default().max_out_buffer)]
    pub max_out_buffer: usize,
    /// WebSocket sockets held at once (handshaking, open, closing); more are answered HTTP 503.
    #[arg(long, default_value_t = Config::default().max_connections)]
    pub max_connections: usize,
    /// Largest frame or message accepted from a WebSocket client, in bytes.
    #[arg(long, default_value_t = Config::default().max_frame_bytes)]
    pub max_frame_bytes: usize,
    /// Longest topic a client may subscribe to, in bytes.
    #[arg(long, default_value_t = Config::default().max_topic_len)]
    pub max_topic_len: usize,
    /// Most topics one connection may hold.
    #[arg(long, default_value_t = Config::default().max_topics_per_connection)]
    pub max_topics_per_connection: usize,
    /// Deliveries that may wait in one event loop before broadcasts are refused as busy
    /// (RESOURCE_EXHAUSTED, which push-manager retries).
    #[arg(long, default_value_t = Config::default().max_loop_backlog)]
    pub max_loop_backlog: usize,
    /// Bytes of deliveries that may wait in one event loop before broadcasts are refused as busy.
    #[arg(long, default_value_t = Config::default().max_loop_backlog_bytes)]
    pub max_loop_backlog_bytes: usize,
    /// How often idle connections are pinged.
    #[arg(long, default_value_t = Config::default().ping_interval.into(), value_parser = parse_duration)]
    pub ping_interval: humantime::Duration,
    /// A connection silent (no pong, no frame) for this long is dropped.
    #[arg(long, default_value_t = Config::default().pong_timeout.into(), value_parser = parse_duration)]
    pub pong_timeout: humantime::Duration,
    /// Time a new connection has to complete its WebSocket upgrade (then HTTP 408 and closed).
    #[arg(long, default_value_t = Config::default().handshake_timeout.into(), value_parser = parse_duration)]
    pub handshake_timeout: humantime::Duration,
    /// Largest broadcast body a ConnectNode call may carry, in bytes (as serve's).
    #[arg(long, default_value_t = Config::default().max_message_bytes)]
    pub max_message_bytes: usize,
    /// Most messages in one ConnectNode batch.
    #[arg(long, default_value_t = Config::default().max_batch_messages)]
    pub max_batch_messages: usize,
    /// Most user ids one push to users may carry (1..=100000; as serve's).
    #[arg(long, default_value_t = Config::default().max_push_users)]
    pub max_push_users: usize,
    /// How long messages that arrived ahead of a gap in their push-manager's order wait for it
    /// to fill before the gap is skipped (counted and logged).
    #[arg(long, default_value_t = Config::default().reorder_hold.into(), value_parser = parse_duration)]
    pub reorder_hold: humantime::Duration,
    /// Most messages one push-manager instance may have waiting behind a gap; one more skips it.
    #[arg(long, default_value_t = Config::default().reorder_hold_messages)]
    pub reorder_hold_messages: usize,
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// File of node tokens, one per line (# comments): push-manager must send one as gRPC
    /// metadata `authorization: Bearer <token>` (give serve the same file). Re-read on SIGHUP.
    #[arg(long)]
    pub node_token_file: Option<PathBuf>,
    /// Serve a non-loopback --grpc-listen address with neither --node-token-file nor
    /// --tls-client-ca: anyone who reaches the port may push to every user.
    #[arg(long)]
    pub allow_unauthenticated: bool,
    /// File of keys WebSocket connection tokens (JWT, HS256) are signed with, one per line, at
    /// least 32 bytes each; the first signs (`push-manager token`), all verify. Re-read on SIGHUP.
    #[arg(long)]
    pub token_key_file: Option<PathBuf>,
    /// Whether WebSocket clients must show a connection token: off, optional or required
    /// [default: required with --token-key-file, else off on a loopback --ws-listen].
    #[arg(long, value_parser = clap::builder::ValueParser::new(str::parse::<WsAuth>))]
    pub ws_auth: Option<WsAuth>,
    /// With --ws-auth required: time a connection without ?token= has to send its auth frame.
    #[arg(long, default_value_t = Config::default().ws_auth_timeout.into(), value_parser = parse_duration)]
    pub ws_auth_timeout: humantime::Duration,
    /// Clock skew allowed on a token's exp and nbf.
    #[arg(long, default_value_t = Config::default().token_leeway.into(), value_parser = parse_duration)]
    pub token_leeway: humantime::Duration,
    /// Origins whose web pages may connect, comma-separated: https://app.example.com,
    /// *.example.com or * [default: every origin].
    #[arg(long, value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Also refuse upgrade requests without an Origin header (non-browser clients send none).
    #[arg(long)]
    pub require_origin: bool,
    /// The longest an event loop holds writes back so more frames share each syscall (at most
    /// 100ms): after writes that took t it waits 4 x t, up to this. 0 never waits. A delivery to
    /// a loop that has not written for that long goes out at once.
    #[arg(long, default_value_t = Config::default().ws_write_delay.into(), value_parser = parse_duration)]
    pub ws_write_delay: humantime::Duration,
    /// Most bytes of queued frames one connection writes in one syscall (1024..=262144).
    #[arg(long, default_value_t = Config::default().ws_write_bytes)]
    pub ws_write_bytes: usize,
    /// Admin HTTP endpoint (/metrics, /healthz, /readyz): host:port, or off [default: 127.0.0.1:9254;
    /// if that is taken the role runs without one, whereas an address given here must be free].
    #[arg(long)]
    pub admin_listen: Option<admin::Listen>,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub file: ConfigFileArgs,
}

impl NodeArgs {
    pub fn config(&self) -> Result<NodeConfig, String> {
        Ok(NodeConfig {
            gateway: Config {
                grpc_listen: self.grpc_listen.clone(),
                ws_listen: self.ws_listen.clone(),
                event_loops: self.event_loops,
                max_out_buffer: self.max_out_buffer,
                max_frame_bytes: self.max_frame_bytes,
                ping_interval: self.ping_interval.into(),
                pong_timeout: self.pong_timeout.into(),
                handshake_timeout: self.handshake_timeout.into(),
                max_connections: self.max_connections,
                max_topic_len: self.max_topic_len,
                max_topics_per_connection: self.max_topics_per_connection,
                grpc_threads: self.grpc_threads,
                max_loop_backlog: self.max_loop_backlog,
                max_loop_backlog_bytes: self.max_loop_backlog_bytes,
                tls: self.tls.config(),
                ws_tls: self
                    .ws_tls_cert
                    .clone()
                    .zip(self.ws_tls_key.clone())
                    .map(|(cert, key)| gateway::WsTls { cert, key }),
                node_token_file: self.node_token_file.clone(),
                allow_unauthenticated: self.allow_unauthenticated,
                max_message_bytes: self.max_message_bytes,
                max_batch_messages: self.max_batch_messages,
                token_key_file: self.token_key_file.clone(),
                ws_auth: self.ws_auth,
                ws_auth_timeout: self.ws_auth_timeout.into(),
                token_leeway: self.token_leeway.into(),
                allowed_origins: self.allowed_origins.clone(),
                require_origin: self.require_origin,
                max_push_users: self.max_push_users,
                reorder_hold: self.reorder_hold.into(),
                reorder_hold_messages: self.reorder_hold_messages,
                ws_write_delay: self.ws_write_delay.into(),
                ws_write_bytes: self.ws_write_bytes,
            },
            etcd: self.registry.config()?,
            prefix: self.registry.prefix.clone(),
            node_id: self.node_id.clone(),
            advertise: self.advertise.clone(),
            lease_ttl: self.lease_ttl.into(),
            shutdown_grace: self.shutdown_grace.into(),
        })
    }
}

pub fn run(args: NodeArgs) -> super::CmdResult {
    let log_node = super::logging::init(args.log.log_level, args.log.log_format);
    let config = args.config()?;
    if let Some(id) = &config.node_id {
        log_node.set(id);
    }
    config.validate()?;
    // From here on SIGINT/SIGTERM stop the node the orderly way, even one that comes while it
    // starts (registering can take the etcd timeout).
    let mut signals = Signals::install().map_err(|e| format!("installing signal handlers: {e}"))?;
    let max_connections = config.gateway.max_connections as u64;
    match gateway::raise_nofile_limit() {
        Ok(limit) if limit <= max_connections => warn!(
            "open-file limit {limit} is below --max-connections {max_connections}: past it new connections wait \
             in the listen backlog instead of being answered 503"
        ),
        Ok(limit) => info!("open-file limit {limit}"),
        Err(e) => warn!("cannot raise the open-file limit ({e}); fewer connections fit"),
    }
    let mut gateway = Gateway::start(config.gateway.clone())?;
    let addr = config.advertise.clone().unwrap_or_else(|| advertised(gateway.grpc_addr(), None));
    let node_id = match config.node_id.clone() {
        Some(id) => id,
        None => {
            let id = registry::default_id(gateway.grpc_addr().port());
            registry::validate_node_id(&id)
                .map_err(|e| format!("the default node id (hostname-port) is not usable, give --node-id: {e}"))?;
            log_node.set(&id);
            id
        }
    };
    let scheme = if config.gateway.ws_tls.is_some() { "wss" } else { "ws" };
    // Published under the host push-manager calls, so a node behind a name (a container) is
    // reached under that name on both ports.
    let ws_url = format!("{scheme}://{}/ws", advertised(gateway.ws_addr(), Some(crate::addr::host_of(&addr))));
    let client = etcd::Client::connect_on(config.etcd.clone(), gateway.grpc_environment())?;
    let ws_prefix = registry::ws_prefix(&config.prefix);
    let mut registration = Registration::start(
        client,
        RegistrationConfig {
            records: vec![
                Record::new(registry::key(&config.prefix, &node_id), addr.clone()),
                // Only bench reads it: a node whose etcd role may not write it still serves.
                Record::optional(registry::key(&ws_prefix, &node_id), ws_url),
            ],
            ttl: config.lease_ttl,
        },
    )
    .map_err(|e| {
        format!("registering in etcd: {e} (the etcd user needs readwrite on {:?} and {ws_prefix:?})", config.prefix)
    })?;
    // Outlives the gateway's shutdown, so `/readyz` says "draining" while the node drains.
    let probe = gateway.probe(Some(registration.state()));
    let admin = admin::start_from_flag(args.admin_listen, admin::NODE_DEFAULT_LISTEN, probe)?;
    // Machine-readable lines for scripts and tests that bind port 0.
    println!("node {node_id} grpc {} ws {scheme}://{}/ws", gateway.grpc_addr(), gateway.ws_addr());
    if let Some(admin) = &admin {
        println!("admin http://{}", admin.addr());
    }
    info!("connect-node {node_id} serving, advertised as {addr}");

    signals.wait(None, || Tick::Continue, || gateway.reload_credentials())?;
    info!("shutdown signal received: deregistering, then delivering what push-manager still sends");
    // First: load balancers hear NOT_SERVING while the node still answers.
    gateway.begin_drain();
    registration.deregister();
    let grace = config.shutdown_grace;
    if gateway.wait_until_quiet(grace) {
        info!("push-manager stopped sending; closing connections");
    } else {
        warn!("ConnectNode calls still arriving after --shutdown-grace {grace:?}; stopping anyway");
    }
    gateway.shutdown();
    let stats = gateway.stats();
    info!("connect-node {node_id} stopped: {stats:?}");
    if stats.connections_open != 0 {
        warn!("{} connection(s) did not close cleanly", stats.connections_open);
    }
    drop(admin);
    Ok(())
}
