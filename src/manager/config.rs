//! Configuration of the push-manager role: a plain struct with documented defaults.

use std::path::PathBuf;
use std::time::Duration;

use super::error::{Error, Result};
use crate::etcd;
use crate::grpc::{ClientTls, ClientTlsFlags, ServerTls};
use crate::proto::MAX_PUSH_USERS_LIMIT;

/// Everything `push-manager serve` can be told. Defaults match the CLI's.
#[derive(Clone, Debug)]
pub struct Config {
    /// gRPC address for `protocol.PushServer`. Default `0.0.0.0:50053`.
    pub listen: String,
    /// etcd endpoints and per-call deadline. Default `127.0.0.1:2379`, 2 s.
    pub etcd: etcd::Config,
    /// etcd key prefix under which connect-nodes register. Default `/services/connect-node/`.
    pub prefix: String,
    /// Worker threads per connect-node. Default 10.
    pub routine_size: usize,
    /// Messages each node's queue holds before broadcasts are dropped for it. Default 1000.
    pub queue_size: usize,
    /// How often the node set is re-listed from etcd (the watch applies changes sooner). Default 3 s.
    pub poll_interval: Duration,
    /// Watch the prefix so changes apply at once; off leaves only the periodic list. Default on.
    pub watch: bool,
    /// Deadline of one batch to a connect-node: its reply on the worker's stream, or its call.
    /// Default 5 s.
    pub rpc_timeout: Duration,
    /// Most messages a worker sends in one batch when more are already queued. Default 512: under
    /// load the batch rate, not the bytes, is what limits a node (~16k calls/s per client here).
    pub batch_max: usize,
    /// Largest `proto.body` accepted, in bytes. Default 1 MiB.
    pub max_message_bytes: usize,
    /// `--max-push-users`: most user ids in one `PushUsers` request, 1..=100,000. Default 1000.
    pub max_push_users: usize,
    /// Retries of a failed RPC to a node that is still registered.
    pub retry: RetryPolicy,
    /// How long a removed node (or every node, at shutdown) may take to deliver what it has
    /// queued before the rest is counted as failed. Default 10 s.
    pub drain_timeout: Duration,
    /// gRPC completion-queue threads, shared by the server and the etcd clients; the node clients
    /// have one of their own (`grpc-nodes-0`). Default 1: on a small machine more pollers contend
    /// more than they help (measured on 2 cores: 1 gives ~20% more deliveries/s than 2 with 32
    /// calls in flight, and no less with 128).
    pub grpc_threads: usize,
    /// TLS for `PushServer` (`--tls-cert`, `--tls-key`, and `--tls-client-ca` to require client
    /// certificates). Default `None`: plaintext.
    pub tls: Option<ServerTls>,
    /// `--api-key-file`: callers must send one of its keys as `authorization: Bearer <key>`.
    /// Default `None`.
    pub api_key_file: Option<PathBuf>,
    /// `--allow-unauthenticated`: serve a non-loopback address with neither API keys nor mutual
    /// TLS, so anyone who reaches the port may broadcast. Default off: such a serve refuses to
    /// start.
    pub allow_unauthenticated: bool,
    /// TLS to the connect-nodes (`--node-tls-ca`, and `--node-tls-cert`/`--node-tls-key` for
    /// nodes that require client certificates). Default `None`: plaintext.
    pub node_tls: Option<ClientTls>,
    /// `--node-token-file`: the token sent to every connect-node (the file's first key).
    /// Default `None`.
    pub node_token_file: Option<PathBuf>,
    /// The instance's own record in etcd, which lets clients find it without an address.
    pub instance: InstanceConfig,
}

/// How a push-manager instance registers itself (`<prefix><id>` = an
/// [`crate::registry::instance::InstanceRecord`], under a lease).
#[derive(Clone, Debug)]
pub struct InstanceConfig {
    /// Register at all; `--no-register` turns it off. Default on.
    pub register: bool,
    /// Key prefix. Default `/services/push-manager/`.
    pub prefix: String,
    /// `--instance-id`. Default (`None`): `<hostname>-<gRPC port>`.
    pub id: Option<String>,
    /// `--advertise`: the gRPC address clients should call. Default (`None`): the bound address,
    /// with `127.0.0.1` for a wildcard IP.
    pub advertise: Option<String>,
    /// How long the record outlives an instance that died without deregistering. Default 10 s.
    pub lease_ttl: Duration,
}

impl Default for InstanceConfig {
    fn default() -> Self {
        InstanceConfig {
            register: true,
            prefix: crate::registry::DEFAULT_INSTANCE_PREFIX.into(),
            id: None,
            advertise: None,
            lease_ttl: Duration::from_secs(10),
        }
    }
}

impl InstanceConfig {
    /// Checks every field, whether registering or not (a flag given is a flag meant); the error
    /// names the flag.
    fn validate(&self) -> std::result::Result<(), String> {
        if self.prefix.is_empty() {
            return Err("--instance-prefix must not be empty".into());
        }
        if let Some(id) = &self.id {
            crate::registry::validate_instance_id(id).map_err(|e| format!("--instance-id: {e}"))?;
        }
        if let Some(addr) = &self.advertise {
            crate::addr::validate_host_port(addr).map_err(|e| format!("--advertise: {e}"))?;
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return Err("--lease-ttl must be at least 1s (etcd counts whole seconds)".into());
        }
        crate::duration::check("--lease-ttl", self.lease_ttl)
    }
}

/// The flag names of the connect-node client's TLS files.
pub const NODE_TLS_FLAGS: ClientTlsFlags =
    ClientTlsFlags { ca: "--node-tls-ca", cert: "--node-tls-cert", key: "--node-tls-key" };

/// Exponential backoff between attempts of one RPC.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. Default 3.
    pub max_attempts: u32,
    /// Wait before the first retry, doubled each time. Default 100 ms.
    pub initial_backoff: Duration,
    /// Cap on the wait between attempts. Default 1 s.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt number `attempt` (2 for the first retry).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(2).min(16);
        self.initial_backoff.saturating_mul(1 << doublings).min(self.max_backoff)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:50053".into(),
            etcd: etcd::Config::default(),
            prefix: crate::registry::DEFAULT_PREFIX.into(),
            routine_size: 10,
            queue_size: 1000,
            poll_interval: Duration::from_secs(3),
            watch: true,
            rpc_timeout: Duration::from_secs(5),
            batch_max: 512,
            max_message_bytes: 1 << 20,
            max_push_users: 1000,
            retry: RetryPolicy::default(),
            drain_timeout: Duration::from_secs(10),
            grpc_threads: 1,
            tls: None,
            api_key_file: None,
            allow_unauthenticated: false,
            node_tls: None,
            node_token_file: None,
            instance: InstanceConfig::default(),
        }
    }
}

/// Most worker threads per node: each is an OS thread, and their names (`n<number>-w<n>`) must
/// stay distinct within Linux's 15 bytes.
const MAX_ROUTINE_SIZE: usize = 1024;

impl Config {
    /// Checks every field; the error names the first bad one by its flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidConfig(msg));
        if self.prefix.is_empty() {
            return bad("--prefix must not be empty: every key in etcd would be taken for a node".into());
        }
        if !(1..=MAX_ROUTINE_SIZE).contains(&self.routine_size) {
            return bad(format!(
                "--routine-size must be 1..={MAX_ROUTINE_SIZE} worker threads per node, got {}",
                self.routine_size
            ));
        }
        if self.queue_size == 0 {
            return bad("--queue-size must be at least 1 message".into());
        }
        if self.batch_max == 0 {
            return bad("--batch-max must be at least 1 (1 sends one batch per message)".into());
        }
        if self.poll_interval.is_zero() {
            return bad("--poll-interval must be greater than 0".into());
        }
        if self.rpc_timeout.is_zero() {
            return bad("--rpc-timeout must be greater than 0".into());
        }
        if self.retry.max_attempts == 0 {
            return bad("--max-attempts must be at least 1".into());
        }
        if self.max_message_bytes == 0 {
            return bad("--max-message-bytes must be at least 1".into());
        }
        if !(1..=MAX_PUSH_USERS_LIMIT).contains(&self.max_push_users) {
            return bad(format!("--max-push-users must be 1..={MAX_PUSH_USERS_LIMIT}, got {}", self.max_push_users));
        }
        if self.grpc_threads == 0 {
            return bad("--grpc-threads must be at least 1".into());
        }
        let authenticates = self.api_key_file.is_some() || self.tls.as_ref().is_some_and(ServerTls::verifies_clients);
        if !authenticates && !self.allow_unauthenticated && !crate::grpc::is_loopback(&self.listen) {
            return bad(format!(
                "--listen {} is reachable from other hosts and callers are not authenticated: give \
                 --api-key-file or --tls-client-ca (mutual TLS), or --allow-unauthenticated to let anyone \
                 who reaches the port broadcast to every user",
                self.listen
            ));
        }
        self.instance.validate().map_err(Error::InvalidConfig)?;
        self.etcd.validate().map_err(|e| Error::InvalidConfig(format!("--etcd: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_on_loopback() {
        Config { listen: "127.0.0.1:50053".into(), ..Config::default() }.validate().unwrap();
    }

    #[test]
    fn an_open_address_needs_caller_authentication_or_the_explicit_flag() {
        let open = Config::default();
        let err = open.validate().unwrap_err().to_string();
        assert!(err.contains("--allow-unauthenticated") && err.contains("--api-key-file"), "{err}");
        Config { allow_unauthenticated: true, ..Config::default() }.validate().unwrap();
        Config { api_key_file: Some("keys".into()), ..Config::default() }.validate().unwrap();
        let mtls = ServerTls { cert: "c".into(), key: "k".into(), client_ca: Some("ca".into()) };
        Config { tls: Some(mtls.clone()), ..Config::default() }.validate().unwrap();
        let tls_only = ServerTls { client_ca: None, ..mtls };
        assert!(Config { tls: Some(tls_only), ..Config::default() }.validate().is_err(), "TLS alone proves nothing");
    }

    #[test]
    fn zero_and_oversized_limits_are_refused_with_the_flag_name() {
        type BreakIt = fn(&mut Config);
        let cases: Vec<(BreakIt, &str)> = vec![
            (|c| c.routine_size = 0, "--routine-size"),
            (|c| c.queue_size = 0, "--queue-size"),
            (|c| c.batch_max = 0, "--batch-max"),
            (|c| c.poll_interval = Duration::ZERO, "--poll-interval"),
            (|c| c.prefix.clear(), "--prefix"),
            (|c| c.retry.max_attempts = 0, "--max-attempts"),
            (|c| c.max_push_users = 0, "--max-push-users"),
            (|c| c.max_push_users = MAX_PUSH_USERS_LIMIT + 1, "--max-push-users"),
            (|c| c.instance.id = Some("a b".into()), "--instance-id"),
            (|c| c.instance.id = Some(String::new()), "--instance-id"),
            (|c| c.instance.prefix.clear(), "--instance-prefix"),
            (|c| c.instance.advertise = Some("nowhere".into()), "--advertise"),
            (|c| c.instance.lease_ttl = Duration::from_millis(500), "--lease-ttl"),
        ];
        for (break_it, flag) in cases {
            let mut config = Config { listen: "127.0.0.1:0".into(), ..Config::default() };
            break_it(&mut config);
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(flag), "{err:?} should name {flag}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(2), Duration::from_millis(100));
        assert_eq!(p.backoff(3), Duration::from_millis(200));
        assert_eq!(p.backoff(10), Duration::from_secs(1));
    }
}
