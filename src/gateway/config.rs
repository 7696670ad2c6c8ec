//! Configuration of the connect-node role: plain structs whose `Default` is the only place a
//! default is written (the CLI shows and uses these), and whose `validate()` names the flag.

use std::net::SocketAddr;
use std::time::Duration;

use super::error::{Error, Result};
use crate::etcd;
use crate::registry;

/// Longest duration any field takes: far beyond a sensible timeout, and far enough from
/// `Instant`'s range that adding it to the clock can never overflow. The same bound as the
/// CLI's duration parser, so a config built in code is held to what a flag could say.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Refuses a duration past [`MAX_DURATION`], naming its flag.
fn check_duration(flag: &str, value: Duration) -> Result<()> {
    if value > MAX_DURATION {
        return Err(Error::Config(format!(
            "{flag} must be at most {} (ten years), got {value:?}",
            humantime::format_duration(MAX_DURATION)
        )));
    }
    Ok(())
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
    /// gRPC completion-queue threads. Default 2.
    pub grpc_threads: usize,
    /// Deliveries that may wait in one event loop's queue. While any loop has this many, the
    /// node refuses broadcasts with RESOURCE_EXHAUSTED (push-manager retries them with backoff)
    /// rather than let its queues grow without bound. Default 10,000.
    pub max_loop_backlog: usize,
    /// Bytes of message frames that may wait in one event loop's queue, with the same effect
    /// as `max_loop_backlog`: a few large broadcasts weigh as much as many small ones. A
    /// broadcast is admitted whenever the backlog is under it. Default 64 MiB.
    pub max_loop_backlog_bytes: usize,
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
            handshake_timeout: Duration::from_secs(10),
            max_connections: 100_000,
            max_topic_len: crate::topic::MAX_TOPIC_BYTES,
            max_topics_per_connection: 64,
            grpc_threads: 2,
            max_loop_backlog: 10_000,
            max_loop_backlog_bytes: 64 << 20,
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
        Ok(())
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

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
        NodeConfig::default().validate().unwrap();
    }

    #[test]
    fn validate_names_the_flag() {
        let check = |config: Config, flag: &str| {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(flag), "{err:?} should name {flag:?}");
        };
        check(Config { ws_listen: "localhost".into(), ..Config::default() }, "--ws-listen");
        check(Config { event_loops: 0, ..Config::default() }, "--event-loops");
        check(Config { grpc_threads: 0, ..Config::default() }, "--grpc-threads");
        check(Config { max_frame_bytes: 10, ..Config::default() }, "--max-frame-bytes");
        check(Config { max_out_buffer: 10, ..Config::default() }, "--max-out-buffer");
        check(Config { pong_timeout: Duration::from_secs(1), ..Config::default() }, "--pong-timeout");
        check(Config { max_topic_len: 0, ..Config::default() }, "--max-topic-len");
        check(Config { max_topics_per_connection: 0, ..Config::default() }, "--max-topics-per-connection");
        check(Config { max_loop_backlog: 0, ..Config::default() }, "--max-loop-backlog");
        check(Config { max_loop_backlog_bytes: 0, ..Config::default() }, "--max-loop-backlog-bytes");
        check(Config { max_connections: 0, ..Config::default() }, "--max-connections");
        check(Config { handshake_timeout: Duration::ZERO, ..Config::default() }, "--handshake-timeout");
    }

    #[test]
    fn durations_that_would_overflow_the_clock_are_refused() {
        let check = |config: Config, flag: &str| {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(flag) && err.contains("at most"), "{err:?} should name {flag:?}");
        };
        check(Config { handshake_timeout: Duration::MAX, ..Config::default() }, "--handshake-timeout");
        check(Config { pong_timeout: Duration::MAX, ..Config::default() }, "--pong-timeout");
        check(
            Config { ping_interval: Duration::MAX, pong_timeout: Duration::MAX, ..Config::default() },
            "--ping-interval",
        );
        let err = NodeConfig { shutdown_grace: Duration::MAX, ..NodeConfig::default() }.validate().unwrap_err();
        assert!(err.to_string().contains("--shutdown-grace"), "{err}");
        let err = NodeConfig { lease_ttl: Duration::MAX, ..NodeConfig::default() }.validate().unwrap_err();
        assert!(err.to_string().contains("--lease-ttl"), "{err}");
        Config { handshake_timeout: MAX_DURATION, pong_timeout: MAX_DURATION, ..Config::default() }.validate().unwrap();
    }

    #[test]
    fn node_validate_names_the_flag() {
        let check = |config: NodeConfig, flag: &str| {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(flag), "{err:?} should name {flag:?}");
        };
        check(NodeConfig { node_id: Some("a/b".into()), ..NodeConfig::default() }, "--node-id");
        check(NodeConfig { node_id: Some(String::new()), ..NodeConfig::default() }, "--node-id");
        check(NodeConfig { advertise: Some("nonsense".into()), ..NodeConfig::default() }, "--advertise");
        check(NodeConfig { lease_ttl: Duration::from_millis(500), ..NodeConfig::default() }, "--lease-ttl");
        check(NodeConfig { prefix: String::new(), ..NodeConfig::default() }, "--prefix");
        let no_etcd = etcd::Config { endpoints: vec![], ..etcd::Config::default() };
        check(NodeConfig { etcd: no_etcd, ..NodeConfig::default() }, "--etcd");
        let gateway = Config { event_loops: 0, ..Config::default() };
        check(NodeConfig { gateway, ..NodeConfig::default() }, "--event-loops");
    }
}
