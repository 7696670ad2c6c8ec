//! Configuration of the connect-node role: plain structs whose `Default` is the only place a
//! default is written (the CLI shows and uses these), and whose `validate()` names the flag.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::access::OriginPolicy;
pub use super::access::WsAuth;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::error::{Error, Result};
use crate::etcd;
use crate::grpc::ServerTls;
use crate::proto::MAX_PUSH_USERS_LIMIT;
use crate::registry;

/// Refuses a duration past [`crate::duration::MAX_DURATION`], naming its flag.
fn check_duration(flag: &str, value: Duration) -> Result<()> {
    crate::duration::check(flag, value).map_err(Error::Config)
}

/// How a connect-node listens and treats its clients. Plain data: build it, `validate()` it (as
/// [`super::Gateway::start`] does) and pass it by value.
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
    /// pass it closes the connection with 4000. A single delivery may always be queued on a
    /// connection with nothing unsent, whatever its size (a broadcast push-manager accepted can
    /// encode to several times this: 1 MiB of control characters is ~6 MiB of JSON escapes);
    /// the bound applies to what waits behind it. Default 1 MiB.
    pub max_out_buffer: usize,
    /// Biggest frame or message accepted from a client, in bytes; bigger closes with 1009.
    /// Default 64 KiB.
    pub max_frame_bytes: usize,
    /// How often each connection is pinged. Default 20 s.
    pub ping_interval: Duration,
    /// A connection from which nothing (pong or any frame) arrived for this long is dropped.
    /// Default 60 s.
    pub pong_timeout: Duration,
    /// Time a new socket has to complete its HTTP upgrade; past it the node answers HTTP 408
    /// (if the request has not been read yet) and closes it. Default 10 s.
    pub handshake_timeout: Duration,
    /// WebSocket sockets the node holds at once: handshaking, open and closing ones. Past it a
    /// new connection is answered HTTP 503 and closed. Default 100,000.
    pub max_connections: usize,
    /// Longest topic name, in bytes. Default 128.
    pub max_topic_len: usize,
    /// Most topics one connection may hold. Default 64.
    pub max_topics_per_connection: usize,
    /// gRPC completion-queue threads, shared by the server and the registration's etcd client.
    /// Default 1: a call's work here is per message, not per delivery, and with one thread the
    /// thread that reads a call also runs it (with more, gRPC may read it on one and hand it to
    /// another, a wake-up on the message's path).
    pub grpc_threads: usize,
    /// Deliveries that may wait in one event loop's queue. While any loop has this many, the
    /// node refuses broadcasts with RESOURCE_EXHAUSTED (push-manager retries them with backoff)
    /// rather than let its queues grow without bound. Default 10,000.
    pub max_loop_backlog: usize,
    /// Bytes of message frames that may wait in one event loop's queue, with the same effect
    /// as `max_loop_backlog`: a few large broadcasts weigh as much as many small ones. A
    /// broadcast is admitted whenever the backlog is under it. Default 64 MiB.
    pub max_loop_backlog_bytes: usize,
    /// TLS for `ConnectNode` (`--tls-cert`, `--tls-key`, and `--tls-client-ca` to require
    /// push-manager to present a certificate). Default `None`: plaintext.
    pub tls: Option<ServerTls>,
    /// TLS for the WebSocket endpoint (`--ws-tls-cert`, `--ws-tls-key`): users connect with
    /// `wss://`, and a client that does not speak TLS is dropped. Default `None`: plain `ws://`.
    pub ws_tls: Option<WsTls>,
    /// `--node-token-file`: push-manager must send one of its tokens as
    /// `authorization: Bearer <token>`. Default `None`.
    pub node_token_file: Option<PathBuf>,
    /// `--allow-unauthenticated`: serve a non-loopback `--grpc-listen` with neither a node
    /// token nor mutual TLS, so anyone who reaches the port can push to every user. Default off:
    /// such a node refuses to start.
    pub allow_unauthenticated: bool,
    /// Largest `proto.body` a `ConnectNode` call may carry, in bytes: the same limit as
    /// push-manager's `--max-message-bytes`, so nothing reaches users that push-manager would
    /// have refused. Default 1 MiB.
    pub max_message_bytes: usize,
    /// Most messages in one `BroadcastBatch`. Default 1024 (push-manager sends at most
    /// `--batch-max`, 64 by default).
    pub max_batch_messages: usize,
    /// `--token-key-file`: the keys WebSocket connection tokens (JWT, HS256) are signed with,
    /// one per line, at least 32 bytes each. Default `None`.
    pub token_key_file: Option<PathBuf>,
    /// `--ws-auth`: whether WebSocket clients must show a connection token. Default (`None`):
    /// `required` when `token_key_file` is given, else `off` on a loopback `ws_listen`; any
    /// other address refuses to start, as the gRPC side does without caller authentication.
    pub ws_auth: Option<WsAuth>,
    /// `--ws-auth-timeout`: with `--ws-auth required`, how long a connection that showed no
    /// token at the upgrade has to send its `auth` frame before it is closed with 4001.
    /// Default 10 s.
    pub ws_auth_timeout: Duration,
    /// `--token-leeway`: clock skew allowed between whoever signs tokens and this node, on
    /// `exp` and `nbf`; a connection is closed with 4002 this long after its token's `exp`.
    /// Default 5 s.
    pub token_leeway: Duration,
    /// `--allowed-origins`: origins whose pages may open connections (`https://app.example.com`,
    /// `*.example.com`, `*`); others are answered HTTP 403. Default empty: every origin.
    pub allowed_origins: Vec<String>,
    /// `--require-origin`: also refuse (HTTP 403) requests without an `Origin` header, which
    /// only non-browser clients send. Default off.
    pub require_origin: bool,
    /// `--max-push-users`: most user ids one message from push-manager may carry, 1..=100,000;
    /// the same limit as push-manager's. Default 1000.
    pub max_push_users: usize,
    /// How long sequenced messages that arrived ahead of a gap in their sender's order wait for
    /// it to fill before the gap is skipped. Default 1 s: past push-manager's default retry
    /// schedule (100 ms then 200 ms of backoff), so a batch retried after a transient refusal
    /// still fills its gap in order, while a batch stuck until its RPC deadline (5 s, times
    /// three attempts) does not hold everything behind it that long. push-manager reports a
    /// batch it gives up on with its next call, which skips the gap at once.
    pub reorder_hold: Duration,
    /// Most sequenced messages one sender may have waiting behind a gap; one more skips the
    /// gap. Bounds the memory a stuck gap takes (this many times `max_message_bytes` at worst).
    /// Default 4096: more than push-manager keeps in flight to one node with default flags
    /// (`--queue-size` 1000 plus `--routine-size` 10 times `--batch-max` 64).
    pub reorder_hold_messages: usize,
    /// `--ws-write-delay`: the longest an event loop holds its connections' writes back so that
    /// more frames share each syscall. Writes are paced by what they cost: after writes that
    /// took `t`, the next wait until 4 × `t` after them, at most this. A loop that wrote nothing
    /// for that long writes a delivery in the turn it arrives, so light traffic never waits; a
    /// connection with `ws_write_bytes` queued writes at once all the same. Zero: never wait.
    /// At most [`MAX_WS_WRITE_DELAY`]. Default 10 ms.
    pub ws_write_delay: Duration,
    /// `--ws-write-bytes`: most bytes of queued frames a connection writes in one syscall; one
    /// with this much queued writes at once, without waiting for the end of the loop's turn or
    /// `ws_write_delay`. The buffer it takes is given back once written out. 1 KiB..=256 KiB.
    /// Default 32 KiB.
    pub ws_write_bytes: usize,
}

/// Longest `--ws-write-delay`: beyond it the wait would be felt as latency, not saved as CPU.
pub(crate) const MAX_WS_WRITE_DELAY: Duration = Duration::from_millis(100);

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
            handshake_timeout: Duration::from_secs(10),
            max_connections: 100_000,
            max_topic_len: crate::topic::MAX_TOPIC_BYTES,
            max_topics_per_connection: 64,
            grpc_threads: 1,
            max_loop_backlog: 10_000,
            max_loop_backlog_bytes: 64 << 20,
            tls: None,
            ws_tls: None,
            node_token_file: None,
            allow_unauthenticated: false,
            max_message_bytes: 1 << 20,
            max_batch_messages: 1024,
            token_key_file: None,
            ws_auth: None,
            ws_auth_timeout: Duration::from_secs(10),
            token_leeway: Duration::from_secs(5),
            allowed_origins: Vec::new(),
            require_origin: false,
            max_push_users: 1000,
            reorder_hold: Duration::from_secs(1),
            reorder_hold_messages: 4096,
            ws_write_delay: Duration::from_millis(10),
            ws_write_bytes: 32 << 10,
        }
    }
}

impl Config {
    /// Checks every field; the error names the first bad one by its flag and what it must be.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        for (flag, addr) in [("--grpc-listen", &self.grpc_listen), ("--ws-listen", &self.ws_listen)] {
            if addr.parse::<SocketAddr>().is_err() {
                return bad(format!("{flag} must be ip:port (e.g. 0.0.0.0:8090), got {addr:?}"));
            }
        }
        if !(1..=256).contains(&self.event_loops) {
            return bad(format!("--event-loops must be 1..=256, got {}", self.event_loops));
        }
        if !(1..=64).contains(&self.grpc_threads) {
            return bad(format!("--grpc-threads must be 1..=64, got {}", self.grpc_threads));
        }
        if self.max_frame_bytes < 256 {
            return bad(format!(
                "--max-frame-bytes must be at least 256 (a subscribe command), got {}",
                self.max_frame_bytes
            ));
        }
        if self.max_out_buffer < 1024 {
            return bad(format!("--max-out-buffer must be at least 1024 bytes, got {}", self.max_out_buffer));
        }
        for (flag, value) in [
            ("--ping-interval", self.ping_interval),
            ("--pong-timeout", self.pong_timeout),
            ("--handshake-timeout", self.handshake_timeout),
            ("--ws-auth-timeout", self.ws_auth_timeout),
            ("--token-leeway", self.token_leeway),
        ] {
            check_duration(flag, value)?;
        }
        if self.ping_interval.is_zero() {
            return bad("--ping-interval must be more than zero".into());
        }
        if self.handshake_timeout.is_zero() {
            return bad("--handshake-timeout must be more than zero".into());
        }
        if self.max_connections == 0 {
            return bad("--max-connections must be at least 1".into());
        }
        if self.pong_timeout <= self.ping_interval {
            return bad(format!(
                "--pong-timeout ({:?}) must be longer than --ping-interval ({:?}), or live clients get dropped",
                self.pong_timeout, self.ping_interval
            ));
        }
        if !(1..=1024).contains(&self.max_topic_len) {
            return bad(format!("--max-topic-len must be 1..=1024, got {}", self.max_topic_len));
        }
        if self.max_topics_per_connection == 0 {
            return bad("--max-topics-per-connection must be at least 1".into());
        }
        if self.max_loop_backlog == 0 {
            return bad("--max-loop-backlog must be at least 1".into());
        }
        if self.max_loop_backlog_bytes == 0 {
            return bad("--max-loop-backlog-bytes must be at least 1".into());
        }
        if self.max_message_bytes == 0 {
            return bad("--max-message-bytes must be at least 1".into());
        }
        if self.max_batch_messages == 0 {
            return bad("--max-batch-messages must be at least 1".into());
        }
        if self.ws_auth_timeout.is_zero() {
            return bad("--ws-auth-timeout must be more than zero".into());
        }
        OriginPolicy::new(&self.allowed_origins, self.require_origin).map_err(Error::Config)?;
        if !(1..=MAX_PUSH_USERS_LIMIT).contains(&self.max_push_users) {
            return bad(format!("--max-push-users must be 1..={MAX_PUSH_USERS_LIMIT}, got {}", self.max_push_users));
        }
        if self.ws_write_delay > MAX_WS_WRITE_DELAY {
            return bad(format!(
                "--ws-write-delay must be at most {} (0 never waits), got {}",
                humantime::format_duration(MAX_WS_WRITE_DELAY),
                humantime::format_duration(self.ws_write_delay)
            ));
        }
        let max_write_bytes = super::ws::MAX_WRITE_BATCH;
        if !(1024..=max_write_bytes).contains(&self.ws_write_bytes) {
            return bad(format!("--ws-write-bytes must be 1024..={max_write_bytes}, got {}", self.ws_write_bytes));
        }
        check_duration("--reorder-hold", self.reorder_hold)?;
        if self.reorder_hold.is_zero() {
            return bad(
                "--reorder-hold must be more than zero: with none, a batch overtaken by the next would be lost".into(),
            );
        }
        if self.reorder_hold_messages == 0 {
            return bad("--reorder-hold-messages must be at least 1".into());
        }
        let authenticates =
            self.node_token_file.is_some() || self.tls.as_ref().is_some_and(ServerTls::verifies_clients);
        if !authenticates && !self.allow_unauthenticated && !crate::grpc::is_loopback(&self.grpc_listen) {
            return bad(format!(
                "--grpc-listen {} is reachable from other hosts and callers are not authenticated: give \
                 --node-token-file (the same file as push-manager's) or --tls-client-ca (mutual TLS), or \
                 --allow-unauthenticated to let anyone who reaches the port push to every user",
                self.grpc_listen
            ));
        }
        self.check_ws_auth()
    }
}

impl Config {
    /// The `--ws-auth` mode in force, its default resolved (see [`Config::ws_auth`]).
    pub fn ws_auth_mode(&self) -> WsAuth {
        match (self.ws_auth, &self.token_key_file) {
            (Some(mode), _) => mode,
            (None, Some(_)) => WsAuth::Required,
            (None, None) => WsAuth::Off,
        }
    }

    /// Fail-closed, like the gRPC side: a node reachable from other hosts reads tokens unless
    /// told in so many words that anyone may subscribe to anything.
    fn check_ws_auth(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        match (self.ws_auth, &self.token_key_file) {
            (Some(WsAuth::Off), Some(_)) => {
                bad("--ws-auth off and --token-key-file contradict each other: tokens would not be read; drop one"
                    .into())
            }
            (Some(mode @ (WsAuth::Optional | WsAuth::Required)), None) => {
                bad(format!("--ws-auth {mode} needs --token-key-file (the keys connection tokens are signed with)"))
            }
            (None, None) if !crate::grpc::is_loopback(&self.ws_listen) => bad(format!(
                "--ws-listen {} is reachable from other hosts and WebSocket clients are not authenticated: give \
                 --token-key-file (connection tokens), or --ws-auth off to let any client subscribe to any topic",
                self.ws_listen
            )),
            _ => Ok(()),
        }
    }
}

/// The WebSocket endpoint's certificate and key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsTls {
    /// `--ws-tls-cert`: the certificate chain, leaf first.
    pub cert: PathBuf,
    /// `--ws-tls-key`: the private key of the leaf (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl WsTls {
    /// Reads both files into the rustls config every `wss://` connection shares (TLS 1.2 and
    /// 1.3, ring's cipher suites); the error names the flag and the file.
    pub(crate) fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let bad = |flag: &str, path: &Path, what: String| Error::Config(format!("{flag} {}: {what}", path.display()));
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| bad("--ws-tls-cert", &self.cert, pem_error(e)))?;
        if certs.is_empty() {
            return Err(bad("--ws-tls-cert", &self.cert, "holds no PEM certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| bad("--ws-tls-key", &self.key, pem_error(e)))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("--ws-tls-cert: no usable TLS version: {e}")))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                Error::Config(format!(
                    "--ws-tls-key {} does not go with the certificate in --ws-tls-cert {}: {e}",
                    self.key.display(),
                    self.cert.display()
                ))
            })?;
        Ok(Arc::new(config))
    }
}

/// What went wrong reading a PEM file, in words for an operator.
fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as Pem;
    match e {
        Pem::Io(e) => format!("cannot read it: {e}"),
        Pem::NoItemsFound => "holds no PEM private key".into(),
        other => format!("not valid PEM: {other}"),
    }
}

/// Everything `push-manager node` runs with: the gateway, and how it registers in etcd.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub gateway: Config,
    /// etcd endpoints and per-call deadline. Default `127.0.0.1:2379`, 2 s.
    pub etcd: etcd::Config,
    /// Key prefix to register under. Default `/services/connect-node/`.
    pub prefix: String,
    /// This node's id. Default (`None`): `<hostname>-<gRPC port>`.
    pub node_id: Option<String>,
    /// The gRPC address push-manager should call. Default (`None`): the bound gRPC address,
    /// with `127.0.0.1` for a wildcard IP.
    pub advertise: Option<String>,
    /// How long the key outlives a node that died without deregistering. Default 10 s.
    pub lease_ttl: Duration,
    /// On SIGINT/SIGTERM, after deregistering: how long the node may keep taking and delivering
    /// broadcasts while push-manager sends what it had queued for it. It stops sooner once no
    /// ConnectNode call came for [`super::QUIET_BEFORE_STOP`]. Default 5 s.
    pub shutdown_grace: Duration,
}

impl Default for NodeConfig {
    fn default() -> NodeConfig {
        NodeConfig {
            gateway: Config::default(),
            etcd: etcd::Config::default(),
            prefix: registry::DEFAULT_PREFIX.into(),
            node_id: None,
            advertise: None,
            lease_ttl: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl NodeConfig {
    /// Checks every field; the error names the flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        self.gateway.validate()?;
        self.etcd.validate().map_err(|e| Error::Config(format!("--etcd: {e}")))?;
        if self.prefix.is_empty() {
            return bad("--prefix must not be empty".into());
        }
        if let Some(id) = &self.node_id {
            registry::validate_node_id(id).map_err(|e| Error::Config(format!("--node-id: {e}")))?;
        }
        if let Some(addr) = &self.advertise {
            crate::addr::validate_host_port(addr).map_err(|e| Error::Config(format!("--advertise: {e}")))?;
        }
        check_duration("--lease-ttl", self.lease_ttl)?;
        if self.lease_ttl < Duration::from_secs(1) {
            return bad("--lease-ttl must be at least 1s (etcd counts whole seconds)".into());
        }
        check_duration("--shutdown-grace", self.shutdown_grace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults on loopback, where callers need not authenticate.
    fn local() -> Config {
        Config { grpc_listen: "127.0.0.1:50061".into(), ws_listen: "127.0.0.1:8090".into(), ..Config::default() }
    }

    fn local_node() -> NodeConfig {
        NodeConfig { gateway: local(), ..NodeConfig::default() }
    }

    #[test]
    fn an_open_grpc_address_needs_caller_authentication_or_the_explicit_flag() {
        let open_ws = Config { ws_auth: Some(WsAuth::Off), ..Config::default() };
        let err = open_ws.validate().unwrap_err().to_string();
        assert!(err.contains("--allow-unauthenticated") && err.contains("--node-token-file"), "{err}");
        Config { allow_unauthenticated: true, ..open_ws.clone() }.validate().unwrap();
        Config { node_token_file: Some("token".into()), ..open_ws.clone() }.validate().unwrap();
        let mtls = ServerTls { cert: "c".into(), key: "k".into(), client_ca: Some("ca".into()) };
        Config { tls: Some(mtls), ..open_ws }.validate().unwrap();
    }

    #[test]
    fn an_open_websocket_address_needs_tokens_or_the_explicit_off() {
        let grpc_ok = Config { allow_unauthenticated: true, ..Config::default() };
        let err = grpc_ok.validate().unwrap_err().to_string();
        assert!(err.contains("--ws-listen 0.0.0.0:8090") && err.contains("--token-key-file"), "{err}");
        assert!(err.contains("--ws-auth off"), "{err}");
        Config { ws_auth: Some(WsAuth::Off), ..grpc_ok.clone() }.validate().unwrap();
        let with_keys = Config { token_key_file: Some("keys".into()), ..grpc_ok.clone() };
        with_keys.validate().unwrap();
        assert_eq!(with_keys.ws_auth_mode(), WsAuth::Required, "keys without a mode: required");
        assert_eq!(local().ws_auth_mode(), WsAuth::Off, "loopback without keys: off");
        let err = Config { ws_auth: Some(WsAuth::Optional), ..local() }.validate().unwrap_err().to_string();
        assert!(err.contains("--ws-auth optional needs --token-key-file"), "{err}");
        let err = Config { ws_auth: Some(WsAuth::Off), ..with_keys }.validate().unwrap_err().to_string();
        assert!(err.contains("contradict"), "{err}");
    }

    #[test]
    fn defaults_are_valid() {
        local().validate().unwrap();
        local_node().validate().unwrap();
    }

    #[test]
    fn validate_names_the_flag() {
        let check = |config: Config, flag: &str| {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(flag), "{err:?} should name {flag:?}");
        };
        check(Config { ws_listen: "localhost".into(), ..local() }, "--ws-listen");
        check(Config { event_loops: 0, ..local() }, "--event-loops");
        check(Config { grpc_threads: 0, ..local() }, "--grpc-threads");
        check(Config { max_frame_bytes: 10, ..local() }, "--max-frame-bytes");
        check(Config { max_out_buffer: 10, ..local() }, "--max-out-buffer");
        check(Config { pong_timeout: Duration::from_secs(1), ..local() }, "--pong-timeout");
        check(Config { max_topic_len: 0, ..local() }, "--max-topic-len");
        check(Config { max_topics_per_connection: 0, ..local() }, "--max-topics-per-connection");
        check(Config { max_loop_backlog: 0, ..local() }, "--max-loop-backlog");
        check(Config { max_loop_backlog_bytes: 0, ..local() }, "--max-loop-backlog-bytes");
        check(Config { max_connections: 0, ..local() }, "--max-connections");
        check(Config { handshake_timeout: Duration::ZERO, ..local() }, "--handshake-timeout");
        check(Config { ws_auth_timeout: Duration::ZERO, ..local() }, "--ws-auth-timeout");
        check(Config { token_leeway: Duration::MAX, ..local() }, "--token-leeway");
        check(Config { allowed_origins: vec!["example.com".into()], ..local() }, "--allowed-origins");
        check(Config { max_push_users: 0, ..local() }, "--max-push-users");
        check(Config { max_push_users: MAX_PUSH_USERS_LIMIT + 1, ..local() }, "--max-push-users");
        check(Config { reorder_hold: Duration::ZERO, ..local() }, "--reorder-hold");
        check(Config { reorder_hold: Duration::MAX, ..local() }, "--reorder-hold");
        check(Config { reorder_hold_messages: 0, ..local() }, "--reorder-hold-messages");
        check(Config { ws_write_delay: MAX_WS_WRITE_DELAY + Duration::from_nanos(1), ..local() }, "--ws-write-delay");
        Config { ws_write_delay: Duration::ZERO, ..local() }.validate().expect("0: never wait");
        Config { ws_write_delay: MAX_WS_WRITE_DELAY, ..local() }.validate().unwrap();
        check(Config { ws_write_bytes: 1023, ..local() }, "--ws-write-bytes");
        check(Config { ws_write_bytes: (256 << 10) + 1, ..local() }, "--ws-write-bytes");
    }

    #[test]
    fn durations_that_would_overflow_the_clock_are_refused() {
        let check = |config: Config, flag: &str| {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(flag) && err.contains("at most"), "{err:?} should name {flag:?}");
        };
        check(Config { handshake_timeout: Duration::MAX, ..local() }, "--handshake-timeout");
        check(Config { pong_timeout: Duration::MAX, ..local() }, "--pong-timeout");
        check(Config { ping_interval: Duration::MAX, pong_timeout: Duration::MAX, ..local() }, "--ping-interval");
        let err = NodeConfig { shutdown_grace: Duration::MAX, ..local_node() }.validate().unwrap_err();
        assert!(err.to_string().contains("--shutdown-grace"), "{err}");
        let err = NodeConfig { lease_ttl: Duration::MAX, ..local_node() }.validate().unwrap_err();
        assert!(err.to_string().contains("--lease-ttl"), "{err}");
        Config {
            handshake_timeout: crate::duration::MAX_DURATION,
            pong_timeout: crate::duration::MAX_DURATION,
            ..local()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn node_validate_names_the_flag() {
        let check = |config: NodeConfig, flag: &str| {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(flag), "{err:?} should name {flag:?}");
        };
        check(NodeConfig { node_id: Some("a/b".into()), ..local_node() }, "--node-id");
        check(NodeConfig { node_id: Some(String::new()), ..local_node() }, "--node-id");
        check(NodeConfig { advertise: Some("nonsense".into()), ..local_node() }, "--advertise");
        check(NodeConfig { lease_ttl: Duration::from_millis(500), ..local_node() }, "--lease-ttl");
        check(NodeConfig { prefix: String::new(), ..local_node() }, "--prefix");
        let no_etcd = etcd::Config { endpoints: vec![], ..etcd::Config::default() };
        check(NodeConfig { etcd: no_etcd, ..local_node() }, "--etcd");
        let gateway = Config { event_loops: 0, ..local() };
        check(NodeConfig { gateway, ..local_node() }, "--event-loops");
    }
}
