//! The push-manager role: the `protocol.PushServer` service, the discovery of connect-nodes,
//! and the fan-out of every broadcast to each node through its own queue and workers.
//!
//! Threads: gRPC completion-queue threads (`grpc-<n>`, shared by the server and the etcd
//! client; `grpc-nodes-0`, the node clients'), `discovery` (and the etcd client's `etcd-watch`),
//! and `n<number>-w<n>` per node (the log maps each node's number to its id when it is added).
//! All are joined by `shutdown`.
//!
//! Each instance numbers what it sends to each node under a random instance id (logged at
//! start), so that a node applies it in order and once; see `message` and `node`.
//!
//! The gRPC server also hosts `grpc.health.v1.Health`, NOT_SERVING from the start of `shutdown`,
//! and server reflection ([`crate::reflection`]); [`Manager::probe`] is what the admin endpoint
//! reads (`observe.rs`).

mod config;
mod error;
mod fanout;
mod message;
mod node;
mod observe;
mod server;
mod stream;
mod throttle;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use grpcio::{EnvBuilder, Environment};
use log::{info, warn};

pub use config::{Config, InstanceConfig, RetryPolicy, NODE_TLS_FLAGS};
pub use error::{Error, Result};
pub use node::NodeStats;

use crate::admin::{Probe, Serving, HEALTH_SERVICE};
use crate::auth::KeyFile;
use crate::discovery::{self, Discovery};
use crate::etcd;
use crate::proto::protocol_grpc::create_push_server;
use fanout::Fanout;
use node::NodeAccess;
use observe::ManagerProbe;
use server::PushService;

/// The service the gRPC server hosts, as `grpc.health.v1.Health` names it.
const SERVICE_NAME: &str = "protocol.PushServer";

/// How long calls in flight may take to end at shutdown before they are cancelled.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// A running push-manager. Dropping it shuts it down.
pub struct Manager {
    /// The process's gRPC environment: the server, the node clients and discovery's etcd client
    /// share its threads (see [`etcd::Client::connect_on`]).
    env: Arc<Environment>,
    server: Option<grpcio::Server>,
    discovery: Option<Discovery>,
    /// Discovery's status, kept past its shutdown for the admin endpoint.
    discovery_status: Arc<discovery::Status>,
    fanout: Arc<Fanout>,
    /// SERVING until shutdown begins; reported by gRPC health and `/readyz`.
    serving: Arc<Serving>,
    /// What became of the messages callers sent, for the admin endpoint.
    outcomes: Arc<server::Outcomes>,
    addr: SocketAddr,
    api_keys: Option<Arc<KeyFile>>,
    node_token: Option<Arc<KeyFile>>,
}

impl Manager {
    /// Binds the gRPC server, starts discovery, and serves. etcd need not be up yet.
    pub fn start(config: Config) -> Result<Manager> {
        config.validate()?;
        let env = Arc::new(EnvBuilder::new().cq_count(config.grpc_threads).name_prefix("grpc").build());
        let api_keys = load_keys("--api-key-file", &config.api_key_file)?;
        let node_token = load_keys("--node-token-file", &config.node_token_file)?;
        if let Some(tls) = &config.node_tls {
            // Read now so that a bad file stops start-up instead of every node later.
            tls.credentials()?;
        }
        // The node clients have a completion-queue thread of their own: the server's can be kept
        // busy by one caller's stream (a completion ready at once for each element it already
        // holds), and a thread that never waits never polls, so the nodes' replies, and with
        // them every worker, would wait behind that caller. One thread more for the calls to
        // the nodes, named for them.
        let node_env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("grpc-nodes").build());
        let access = Arc::new(NodeAccess { env: node_env, tls: config.node_tls.clone(), token: node_token.clone() });
        let fanout = Arc::new(Fanout::new(access, Arc::new(config.clone())));

        // Discovery first, so the service can tell callers whether etcd is reachable. Until the
        // server starts, the nodes it finds just wait for traffic; if binding fails, dropping it
        // stops it.
        let client = etcd::Client::connect_on(config.etcd.clone(), env.clone())?;
        let reconciled = fanout.clone();
        let discovery = Discovery::start(
            client,
            discovery::Config {
                prefix: config.prefix.clone(),
                poll_interval: config.poll_interval,
                watch: config.watch,
            },
            move |nodes| reconciled.reconcile(nodes),
        )?;

        let outcomes = Arc::new(server::Outcomes::default());
        let service = PushService {
            fanout: fanout.clone(),
            discovery: discovery.status(),
            max_message_bytes: config.max_message_bytes,
            max_push_users: config.max_push_users,
            prefix: config.prefix.clone(),
            etcd_endpoints: config.etcd.endpoints.join(","),
            api_keys: api_keys.clone(),
            outcomes: outcomes.clone(),
        };
        let serving = Arc::new(Serving::new(&[SERVICE_NAME]));
        let (server, addr) = crate::grpc::start_server(
            env.clone(),
            &config.listen,
            receive_limit(&config),
            config.tls.as_ref(),
            [create_push_server(service), serving.health_service()]
                .into_iter()
                .chain(crate::reflection::services(&[SERVICE_NAME, HEALTH_SERVICE])),
        )?;
        info!(
            "push-manager serving protocol.PushServer on {addr}; connect-nodes from {:?} under {:?}; instance {:016x}",
            config.etcd.endpoints,
            config.prefix,
            fanout.instance()
        );
        Ok(Manager {
            env,
            server: Some(server),
            discovery_status: discovery.status(),
            discovery: Some(discovery),
            fanout,
            serving,
            outcomes,
            addr,
            api_keys,
            node_token,
        })
    }

    /// The gRPC environment this manager runs on, for the process's other gRPC clients.
    pub fn grpc_environment(&self) -> Arc<Environment> {
        self.env.clone()
    }

    /// The address the gRPC server is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counters of every registered connect-node, by id.
    pub fn nodes(&self) -> Vec<NodeStats> {
        self.fanout.stats()
    }

    /// Counters of removed connect-nodes still draining their queue.
    pub fn retiring_nodes(&self) -> Vec<NodeStats> {
        self.fanout.retiring_stats()
    }

    /// Whether the last attempt to list the node set reached etcd.
    pub fn etcd_reachable(&self) -> bool {
        self.discovery.as_ref().is_some_and(|d| d.status().etcd_reachable())
    }

    /// Whether discovery is still running: `false` before `shutdown` means its thread died and
    /// the node set no longer follows etcd.
    pub fn discovery_running(&self) -> bool {
        self.discovery.as_ref().is_some_and(Discovery::is_running)
    }

    /// Successful listings of the node set so far.
    pub fn listings(&self) -> u64 {
        self.discovery.as_ref().map_or(0, |d| d.status().listings())
    }

    /// What the admin endpoint reads: metrics, health, readiness and the node set.
    pub fn probe(&self) -> Arc<dyn Probe> {
        Arc::new(ManagerProbe {
            fanout: self.fanout.clone(),
            discovery: self.discovery_status.clone(),
            serving: self.serving.clone(),
            outcomes: self.outcomes.clone(),
        })
    }

    /// Re-reads the API key and node token files (SIGHUP). Calls in flight are not disturbed; a
    /// file that cannot be read keeps its old keys. Logs counts, never keys.
    pub fn reload_credentials(&self) {
        for (what, keys) in [("API keys", &self.api_keys), ("node token", &self.node_token)] {
            let Some(keys) = keys else { continue };
            match keys.reload() {
                Ok((before, after)) => info!("reloaded {what}: {before} key(s) before, {after} now"),
                Err(e) => warn!("reloading {what} failed, keeping the {} loaded before: {e}", keys.len()),
            }
        }
    }

    /// Idempotent: stops accepting RPCs, stops discovery, drains every queue within the drain
    /// timeout, and joins every thread.
    pub fn shutdown(&mut self) {
        let Some(server) = self.server.take() else { return };
        // First, so health checkers hear it while the port still answers.
        self.serving.begin_drain();
        info!("push-manager shutting down: no new broadcasts, draining node queues");
        // Handlers never block, so whatever is still open after this is a stalled client.
        crate::grpc::stop_server(server, STOP_GRACE);
        if let Some(mut d) = self.discovery.take() {
            d.shutdown();
        }
        self.fanout.shutdown();
        info!("push-manager stopped");
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn load_keys(flag: &'static str, path: &Option<std::path::PathBuf>) -> Result<Option<Arc<KeyFile>>> {
    match path {
        Some(path) => Ok(Some(Arc::new(KeyFile::load(flag, path).map_err(Error::InvalidConfig)?))),
        None => Ok(None),
    }
}

/// gRPC's receive limit for a request carrying a body of the largest allowed size (and, for
/// `PushUsers`, the most ids of the longest allowed size), so an oversized body or list reaches
/// our validation (and its clear message) instead of a transport error.
fn receive_limit(config: &Config) -> usize {
    // Each id costs its bytes plus a tag and a length of at most two bytes.
    let ids = config.max_push_users.saturating_mul(crate::proto::MAX_USER_ID_BYTES + 3);
    config.max_message_bytes.saturating_mul(2).saturating_add(ids).max(4 << 20)
}
