//! `push-manager serve`: the push-manager role until SIGINT/SIGTERM. Unless `--no-register`, the
//! instance registers itself in etcd (`registry::instance`) so that clients find it given only
//! etcd, and revokes that record first when it stops, so none of them picks a stopping instance.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use log::{error, info};

use super::{parse_duration, ConfigFileArgs, EtcdArgs, LogArgs, ServerTlsArgs, Signals, Tick};
use crate::addr::{advertised, host_of};
use crate::admin::{self, AdminServer};
use crate::etcd;
use crate::grpc::ClientTls;
use crate::manager::{Config, InstanceConfig, Manager, NodeStats, RetryPolicy, NODE_TLS_FLAGS};
use crate::registry::{self, instance::InstanceRecord, Record, Registration, RegistrationConfig};

/// How often `serve` checks that its discovery thread is alive.
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Every default comes from `Config::default()`: written once, shown by `--help`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// gRPC address for protocol.PushServer.
    #[arg(long, default_value_t = Config::default().listen)]
    pub listen: String,
    #[command(flatten)]
    pub registry: EtcdArgs,
    /// Worker threads per connect-node.
    #[arg(long, default_value_t = Config::default().routine_size)]
    pub routine_size: usize,
    /// Bounded queue length per connect-node (messages).
    #[arg(long, default_value_t = Config::default().queue_size)]
    pub queue_size: usize,
    /// How often the node set is re-listed from etcd.
    #[arg(long, default_value_t = Config::default().poll_interval.into(), value_parser = parse_duration)]
    pub poll_interval: humantime::Duration,
    /// Do not watch the prefix; rely on the periodic list only.
    #[arg(long)]
    pub no_watch: bool,
    /// Deadline of one batch to a connect-node: its reply on the worker's stream (or its call).
    #[arg(long, default_value_t = Config::default().rpc_timeout.into(), value_parser = parse_duration)]
    pub rpc_timeout: humantime::Duration,
    /// Most messages sent to a node in one batch when more are queued (1 = one batch per message).
    #[arg(long, default_value_t = Config::default().batch_max)]
    pub batch_max: usize,
    /// Largest broadcast body accepted, in bytes.
    #[arg(long, default_value_t = Config::default().max_message_bytes)]
    pub max_message_bytes: usize,
    /// Most user ids in one PushUsers request (1..=100000).
    #[arg(long, default_value_t = Config::default().max_push_users)]
    pub max_push_users: usize,
    /// Attempts per batch to a node (first included) on retryable errors.
    #[arg(long, default_value_t = RetryPolicy::default().max_attempts)]
    pub max_attempts: u32,
    /// Log each node's counters this often when they changed (0s = never).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub stats_interval: humantime::Duration,
    /// gRPC completion-queue threads, shared by the server and the etcd clients (the calls to the
    /// nodes have one of their own, grpc-nodes-0).
    #[arg(long, default_value_t = Config::default().grpc_threads)]
    pub grpc_threads: usize,
    /// Time a removed node, or every node at shutdown, has to deliver what it has queued.
    #[arg(long, default_value_t = Config::default().drain_timeout.into(), value_parser = parse_duration)]
    pub drain_timeout: humantime::Duration,
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// File of API keys, one per line (# comments): callers must send one as gRPC metadata
    /// `authorization: Bearer <key>`. Re-read on SIGHUP.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Serve a non-loopback --listen address with neither --api-key-file nor --tls-client-ca:
    /// anyone who reaches the port may broadcast to every user.
    #[arg(long)]
    pub allow_unauthenticated: bool,
    /// CA certificate (PEM) that signed the connect-nodes' certificates: call them over TLS.
    #[arg(long)]
    pub node_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for connect-nodes that require one (with --node-tls-key).
    #[arg(long, requires = "node_tls_key", requires = "node_tls_ca")]
    pub node_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --node-tls-cert.
    #[arg(long, requires = "node_tls_cert")]
    pub node_tls_key: Option<PathBuf>,
    /// File holding the token sent to every connect-node (its first line; the nodes are given
    /// the same file). Re-read on SIGHUP.
    #[arg(long)]
    pub node_token_file: Option<PathBuf>,
    /// Do not register this instance in etcd (under --instance-prefix), where `send`, `bench` and
    /// `status` given --etcd look for one.
    #[arg(long)]
    pub no_register: bool,
    /// This instance's id in etcd: 1-128 bytes, no '/', whitespace or control characters [default:
    /// <hostname>-<grpc port>].
    #[arg(long)]
    pub instance_id: Option<String>,
    /// etcd key prefix under which push-manager instances register.
    #[arg(long, default_value_t = InstanceConfig::default().prefix)]
    pub instance_prefix: String,
    /// gRPC address clients should call, as registered [default: the bound address, 127.0.0.1 for a
    /// wildcard]; its host also stands for a wildcard --admin-listen in the registered admin URL.
    #[arg(long)]
    pub advertise: Option<String>,
    /// TTL of the instance's registration lease; an instance that dies unannounced disappears after it.
    #[arg(long, default_value_t = InstanceConfig::default().lease_ttl.into(), value_parser = parse_duration)]
    pub lease_ttl: humantime::Duration,
    /// Admin HTTP endpoint (/metrics, /healthz, /readyz, /nodes): host:port, or off [default: 127.0.0.1:9253;
    /// if that is taken the role runs without one, whereas an address given here must be free].
    #[arg(long)]
    pub admin_listen: Option<admin::Listen>,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub file: ConfigFileArgs,
}

impl ServeArgs {
    pub fn config(&self) -> Result<Config, String> {
        Ok(Config {
            listen: self.listen.clone(),
            etcd: self.registry.config()?,
            prefix: self.registry.prefix.clone(),
            routine_size: self.routine_size,
            queue_size: self.queue_size,
            poll_interval: self.poll_interval.into(),
            watch: !self.no_watch,
            rpc_timeout: self.rpc_timeout.into(),
            batch_max: self.batch_max,
            max_message_bytes: self.max_message_bytes,
            max_push_users: self.max_push_users,
            retry: RetryPolicy { max_attempts: self.max_attempts, ..RetryPolicy::default() },
            drain_timeout: self.drain_timeout.into(),
            grpc_threads: self.grpc_threads,
            tls: self.tls.config(),
            api_key_file: self.api_key_file.clone(),
            allow_unauthenticated: self.allow_unauthenticated,
            node_tls: ClientTls::from_flags(
                self.node_tls_ca.as_ref(),
                self.node_tls_cert.as_ref(),
                self.node_tls_key.as_ref(),
                NODE_TLS_FLAGS,
            ),
            node_token_file: self.node_token_file.clone(),
            instance: InstanceConfig {
                register: !self.no_register,
                prefix: self.instance_prefix.clone(),
                id: self.instance_id.clone(),
                advertise: self.advertise.clone(),
                lease_ttl: self.lease_ttl.into(),
            },
        })
    }
}

pub fn run(args: ServeArgs) -> super::CmdResult {
    super::logging::init(args.log.log_level, args.log.log_format);
    // Before anything starts, so a SIGTERM during start-up still stops serve the orderly way.
    let mut signals = Signals::install().map_err(|e| format!("installing signal handlers: {e}"))?;
    let config = args.config()?;
    let mut manager = Manager::start(config.clone())?;
    // Machine-readable line for scripts and tests that bind port 0.
    println!("listening {}", manager.addr());
    // Outlives the manager's shutdown, so `/readyz` says "draining" while queues drain.
    let admin = admin::start_from_flag(args.admin_listen, admin::SERVE_DEFAULT_LISTEN, manager.probe())?;
    if let Some(admin) = &admin {
        println!("admin http://{}", admin.addr());
    }
    let mut registration = register(&config, &manager, admin.as_ref())?;
    let stats_interval: Duration = args.stats_interval.into();
    let mut next_stats = Instant::now() + stats_interval;
    let mut last = Vec::new();
    let mut discovery_died = false;
    // Ticks often enough to notice a dead discovery thread within a second.
    signals.wait(
        Some(HEALTH_CHECK_INTERVAL),
        || {
            if !manager.discovery_running() {
                discovery_died = true;
                return Tick::Stop;
            }
            if !stats_interval.is_zero() && Instant::now() >= next_stats {
                log_changed_counters(&manager, &mut last);
                next_stats = Instant::now() + stats_interval;
            }
            Tick::Continue
        },
        || manager.reload_credentials(),
    )?;
    // First, so that no client picks this instance while it drains.
    if let Some(registration) = &mut registration {
        registration.deregister();
    }
    if discovery_died {
        error!("the discovery thread stopped: the node set no longer follows etcd; shutting down");
        manager.shutdown();
        return Err("the discovery thread stopped unexpectedly (see the log above); exiting".into());
    }
    info!("shutdown signal received");
    manager.shutdown();
    drop(admin);
    Ok(())
}

/// Registers the instance as `config.instance` says (nothing with `--no-register`): its gRPC
/// address and admin URL, under a lease kept alive in the background.
fn register(config: &Config, manager: &Manager, admin: Option<&AdminServer>) -> Result<Option<Registration>, String> {
    let instance = &config.instance;
    if !instance.register {
        info!("not registering this instance in etcd (--no-register)");
        return Ok(None);
    }
    let id = match instance.id.clone() {
        Some(id) => id,
        None => {
            let id = registry::default_id(manager.addr().port());
            registry::validate_instance_id(&id).map_err(|e| {
                format!(
                    "the default instance id (hostname-port) is not usable, give --instance-id or --no-register: {e}"
                )
            })?;
            id
        }
    };
    let addr = instance.advertise.clone().unwrap_or_else(|| advertised(manager.addr(), None));
    let record =
        InstanceRecord { admin: admin.map(|a| format!("http://{}", advertised(a.addr(), Some(host_of(&addr))))), addr };
    let key = registry::key(&instance.prefix, &id);
    let client = etcd::Client::connect_on(config.etcd.clone(), manager.grpc_environment())
        .map_err(|e| format!("registering in etcd: {e}"))?;
    let registration =
        RegistrationConfig { records: vec![Record::new(key.clone(), record.to_json())], ttl: instance.lease_ttl };
    // Serving is this role's job and registering a convenience for clients: an etcd that refuses
    // the record (a role without rights on the prefix, a wrong password) costs the record, not
    // the service. An unreachable etcd is retried in the background.
    let registration = match Registration::start(client, registration) {
        Ok(registration) => registration,
        Err(e) => {
            error!(
                "cannot register {key} in etcd ({e}); serving unregistered, so clients must be given --server \
                 (let the etcd user write under {:?}, or give --no-register)",
                instance.prefix
            );
            return Ok(None);
        }
    };
    // Machine-readable, like the lines above.
    println!("instance {id} registering as {key}");
    Ok(Some(registration))
}

/// One line per node whose counters moved since the last call.
fn log_changed_counters(manager: &Manager, last: &mut Vec<NodeStats>) {
    let now = manager.nodes();
    for n in now.iter().filter(|n| !last.contains(n)) {
        info!(
            "node {} {}: enqueued {} sent {} rpcs {} failed {} abandoned {} dropped (full) {} dropped (closing) {} \
             retried {} queued {}",
            n.id,
            n.addr,
            n.enqueued,
            n.sent,
            n.rpcs,
            n.failed,
            n.abandoned,
            n.dropped_full,
            n.dropped_closing,
            n.retried,
            n.queue_depth
        );
    }
    *last = now;
}
