//! `push-manager bench`: measures a running deployment end to end, in the spirit of `nats bench`.
//! Subscribers connect to the nodes' WebSocket endpoints (all on one event-loop thread, see
//! [`crate::loadgen`]), then numbered, timestamped messages go in through push-manager's
//! Broadcast; the command prints deliveries/s, the publish rate, latency from publish to frame
//! received, and what was lost, duplicated or out of order.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use futures::executor::block_on;
use grpcio::{CallOption, ChannelBuilder, EnvBuilder};

use super::{parse_duration, CallerArgs, LocateArgs};
use crate::auth::bearer;
use crate::discovery::parse;
use crate::loadgen::{self, BroadcastPublisher, Config, Dialect, Publisher, StreamPublisher};
use crate::registry;
use crate::token::{Claims, TokenKeys};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// push-manager's gRPC address [default: an instance registered in --etcd if given, else
    /// 127.0.0.1:50053].
    #[arg(long)]
    pub server: Option<String>,
    /// A connect-node's WebSocket URL (ws://host:port/ws); repeat for several nodes: subscribers
    /// are spread over them round-robin.
    #[arg(long = "ws", value_name = "URL")]
    pub ws: Vec<String>,
    /// With --etcd and no --ws: the etcd key prefix under which connect-nodes register; their
    /// WebSocket URLs are read beside it (/services/connect-node-ws/<id> for the default).
    #[arg(long, default_value = crate::registry::DEFAULT_PREFIX)]
    pub prefix: String,
    /// Subscriber connections.
    #[arg(long, default_value_t = Config::default().subscribers)]
    pub subscribers: usize,
    /// Messages to publish.
    #[arg(long, default_value_t = Config::default().messages)]
    pub messages: u64,
    /// Bytes per message body (at least the 51-byte header).
    #[arg(long, default_value_t = Config::default().size)]
    pub size: usize,
    /// Messages per second; 0 publishes flat out.
    #[arg(long, default_value_t = Config::default().rate)]
    pub rate: u64,
    /// Topic subscribed to and published on.
    #[arg(long, default_value_t = Config::default().topic)]
    pub topic: String,
    /// Broadcast calls kept in flight at once (with --stream: stream elements unanswered).
    #[arg(long, default_value_t = Config::default().in_flight)]
    pub in_flight: usize,
    /// Publish over one BroadcastStream call instead of unary Broadcast calls: flat out in
    /// elements of 256 messages, at a --rate one message per element.
    #[arg(long)]
    pub stream: bool,
    /// How long connecting and subscribing everyone may take; also each Broadcast's deadline.
    #[arg(long, default_value_t = Config::default().connect_timeout.into(), value_parser = parse_duration)]
    pub timeout: humantime::Duration,
    /// How long to wait for the last deliveries once everything is published; what has not come
    /// by then counts as lost.
    #[arg(long, default_value_t = Config::default().drain_timeout.into(), value_parser = parse_duration)]
    pub drain_timeout: humantime::Duration,
    /// No progress lines on standard error.
    #[arg(long)]
    pub quiet: bool,
    /// Connection token every subscriber shows (?token=), for nodes with --ws-auth.
    #[arg(long, conflicts_with = "token_key_file")]
    pub token: Option<String>,
    /// The nodes' token key file: sign one token per subscriber (user bench-<i>, granted --topic).
    #[arg(long)]
    pub token_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub caller: CallerArgs,
    #[command(flatten)]
    pub locate: LocateArgs,
}

/// How long a signed subscriber token lives: far longer than any run.
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

pub fn run(args: BenchArgs) -> super::CmdResult {
    let config = Config {
        subscribers: args.subscribers,
        messages: args.messages,
        size: args.size,
        rate: args.rate,
        topic: args.topic.clone(),
        in_flight: args.in_flight,
        connect_timeout: args.timeout.into(),
        drain_timeout: args.drain_timeout.into(),
        progress: !args.quiet,
    };
    config.validate()?;
    let urls = ws_urls(&args)?;
    let token = tokens(&args)?;
    let server = args.locate.server(args.server.as_deref())?;
    loadgen::raise_open_files_limit(config.subscribers + 64);

    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("grpc-bench").build());
    let mut channel = ChannelBuilder::new(env);
    if let Some(credentials) = args.caller.credentials()? {
        channel = channel.set_credentials(credentials);
    }
    let channel = channel.connect(&server);
    // Before opening a thousand connections: a wrong --server should fail at once, and clearly.
    if !block_on(channel.wait_for_connected(config.connect_timeout)) {
        return Err(format!(
            "cannot connect to push-manager at {server} within {} (is it running? if it serves TLS, give --tls-ca)",
            args.timeout
        )
        .into());
    }
    let mut option = CallOption::default();
    if let Some(key) = args.caller.api_key()? {
        option = option.headers(bearer(&key));
    }
    // A stream lasts the whole run; a unary call gets --timeout.
    let mut publisher: Box<dyn Publisher> = if args.stream {
        Box::new(StreamPublisher::open(channel, option, &config.topic, config.in_flight, config.rate)?)
    } else {
        let option = option.timeout(config.connect_timeout);
        Box::new(BroadcastPublisher::new(channel, option, &config.topic, config.in_flight))
    };
    let report = loadgen::run(&config, &urls, Dialect::PushManager, &*token, publisher.as_mut())?;
    println!("{report}");
    Ok(())
}

/// The subscribers' URLs: --ws, else those the nodes registered in etcd published.
fn ws_urls(args: &BenchArgs) -> Result<Vec<String>, String> {
    for url in &args.ws {
        check_ws_url(url).map_err(|why| format!("--ws {url:?} {why}"))?;
    }
    if !args.ws.is_empty() {
        return Ok(args.ws.clone());
    }
    let Some(client) = args.locate.client()? else {
        return Err("give the nodes' WebSocket URLs with --ws (repeatable), or --etcd to list the nodes".into());
    };
    let endpoints = client.endpoints().join(",");
    let failed = |e| format!("--etcd {endpoints}: {e}");
    let listing = client.get_prefix(&args.prefix).map_err(failed)?;
    let ws_prefix = registry::ws_prefix(&args.prefix);
    let published = client.get_prefix(&ws_prefix).map_err(failed)?;
    let mut urls = Vec::new();
    let mut without = Vec::new();
    for kv in &listing.kvs {
        let Ok(record) = parse(&args.prefix, &kv.key, &kv.value) else { continue };
        let ws_key = registry::key(&ws_prefix, &record.id);
        let beside =
            published.kvs.iter().find(|p| p.key == ws_key).map(|p| String::from_utf8_lossy(&p.value).into_owned());
        // A node record may also be a JSON object with a `ws` field (see discovery's record).
        let inside = || {
            serde_json::from_slice::<serde_json::Value>(&kv.value)
                .ok()
                .and_then(|v| v.get("ws").and_then(|w| w.as_str()).map(str::to_string))
        };
        match beside.or_else(inside) {
            Some(url) => {
                check_ws_url(&url)
                    .map_err(|why| format!("node {} published the WebSocket URL {url:?}, which {why}", record.id))?;
                urls.push(url);
            }
            None => without.push(format!("{} ({})", record.id, record.addr)),
        }
    }
    if !without.is_empty() {
        return Err(format!(
            "etcd lists node(s) {} under {:?} without a WebSocket URL under {ws_prefix:?} (nodes older than this \
             bench publish none): give each node's URL with --ws",
            without.join(", "),
            args.prefix
        ));
    }
    if urls.is_empty() {
        return Err(format!("etcd at {endpoints} lists no connect-node under {:?}", args.prefix));
    }
    Ok(urls)
}

/// Whether bench can connect to `url`; the error completes "<url> ...".
fn check_ws_url(url: &str) -> Result<(), String> {
    let host = url.strip_prefix("ws://").unwrap_or_default();
    if host.is_empty() || url.contains('#') {
        return Err("is not a ws:// URL like ws://127.0.0.1:8090/ws (bench speaks plain ws:// only)".into());
    }
    Ok(())
}

/// Subscriber `i`'s token: --token for everyone, or one signed per subscriber with
/// --token-key-file, or none.
fn tokens(args: &BenchArgs) -> Result<Box<dyn Fn(usize) -> Option<String>>, String> {
    if let Some(token) = args.token.clone() {
        return Ok(Box::new(move |_| Some(token.clone())));
    }
    let Some(path) = &args.token_key_file else { return Ok(Box::new(|_| None)) };
    let keys = TokenKeys::load(path).map_err(|e| format!("--token-key-file {}: {e}", path.display()))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|_| "the clock is before 1970")?.as_secs();
    let topic = args.topic.clone();
    Ok(Box::new(move |i| {
        Some(keys.sign(&Claims {
            sub: format!("bench-{i}"),
            exp: now + TOKEN_TTL.as_secs(),
            nbf: None,
            iat: Some(now),
            topics: Some(vec![topic.clone()]),
        }))
    }))
}
