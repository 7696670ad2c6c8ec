//! `push-manager demo`: the whole path in one process, on loopback.
//!
//! A real etcd (spawned in a temp dir when `etcd` is on PATH, else an in-process stand-in that
//! speaks the same gRPC API), push-manager, three connect-nodes
//! registered under leases, and WebSocket subscribers on them, each showing a connection token
//! (made here with a fresh key) that names its user and grants its topics. It sends a broadcast
//! per topic and one to everyone, a private message to one user (PushUsers), prints who got what
//! through which node, stops one node and shows discovery dropping it, then shuts everything down
//! and exits 0 — or 1, saying what went wrong.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use clap::Args;
use crossbeam_channel::{unbounded, Receiver, Sender};
use grpcio::{ChannelBuilder, EnvBuilder};
use log::LevelFilter;
use tungstenite::{Message, WebSocket};

use super::subscribe::subscribe_url;
use super::LogFormat;
use crate::etcd;
use crate::gateway::{self, Gateway};
use crate::manager::{self, Manager};
use crate::proto::protocol::BroadCastReply;
use crate::proto::protocol_grpc::PushServerClient;
use crate::proto::{broadcast_request, push_users_request};
use crate::registry::{Record, Registration, RegistrationConfig};
use crate::testkit::{poll_until, InProcessEtcd, LocalEtcd};
use crate::token::{Claims, TokenKeys};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Log level for the components' own logs (the account is printed regardless).
    #[arg(long, default_value = "warn", value_parser = super::logging::parse_level)]
    pub log_level: LevelFilter,
    /// Format of those logs on standard error: text, or json (one object per line).
    #[arg(long, value_enum, default_value_t = LogFormat::default())]
    pub log_format: LogFormat,
}

const PREFIX: &str = "/demo/connect-node/";
const WAIT: Duration = Duration::from_secs(10);

/// (subscriber, node index, topics)
const SUBSCRIBERS: &[(&str, usize, &[&str])] = &[
    ("alice", 0, &["sports"]),
    ("bob", 1, &["news"]),
    ("carol", 2, &["sports", "news"]),
    ("dave", 0, &[]),
    ("erin", 1, &["weather"]),
];

type Failure = String;

/// A frame a subscriber received: a delivery, or `{"type":"closed",...}` when its node closed it.
struct Received {
    subscriber: &'static str,
    node: String,
    frame: serde_json::Value,
    /// The frame as it came over the wire.
    text: String,
}

pub fn run(args: DemoArgs) -> Result<(), Failure> {
    super::logging::init(args.log_level, args.log_format);
    let registry = start_registry()?;
    let etcd_config = etcd::Config {
        endpoints: vec![registry.endpoint()],
        timeout: Duration::from_secs(2),
        ..etcd::Config::default()
    };
    let client = etcd::Client::connect(etcd_config.clone()).map_err(|e| e.to_string())?;

    let mut manager = Manager::start(manager::Config {
        listen: "127.0.0.1:0".into(),
        etcd: etcd_config,
        prefix: PREFIX.into(),
        ..manager::Config::default()
    })
    .map_err(|e| e.to_string())?;
    println!("push-manager: serving PushServer on {}, discovering nodes under {PREFIX}", manager.addr());

    let (_key_dir, key_file, keys) = token_keys()?;
    println!("connection tokens: HS256 with a fresh key in {}", key_file.display());
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let gateway = Gateway::start(gateway::Config {
            grpc_listen: "127.0.0.1:0".into(),
            ws_listen: "127.0.0.1:0".into(),
            token_key_file: Some(key_file.clone()),
            ..gateway::Config::default()
        })
        .map_err(|e| e.to_string())?;
        let id = format!("node-{i}");
        let registration = Registration::start(
            client.clone(),
            RegistrationConfig {
                records: vec![Record::new(format!("{PREFIX}{id}"), gateway.grpc_addr().to_string())],
                ttl: Duration::from_secs(5),
            },
        )
        .map_err(|e| e.to_string())?;
        println!(
            "connect-node {id}: gRPC {} WebSocket ws://{}/ws, registered with a 5 s lease",
            gateway.grpc_addr(),
            gateway.ws_addr()
        );
        nodes.push((id, gateway, Some(registration)));
    }
    wait_for("push-manager to discover 3 nodes", || manager.nodes().len() == 3)?;
    println!("push-manager: discovered {}", node_list(&manager));

    let (deliveries_tx, deliveries) = unbounded();
    let mut readers = Vec::new();
    println!();
    for (name, node, topics) in SUBSCRIBERS {
        let (id, gateway, _) = &nodes[*node];
        let url = subscribe_url(
            &format!("ws://{}/ws", gateway.ws_addr()),
            &topics.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
            Some(&token_for(&keys, name, topics)),
        );
        readers.push(subscribe(name, id.clone(), &url, deliveries_tx.clone())?);
        let shown =
            if topics.is_empty() { "no topic (broadcasts to everyone only)".to_string() } else { topics.join(", ") };
        println!("subscriber {name:<6} on {id}: {shown} (its token: sub {name:?}, granting {topics:?})");
    }
    drop(deliveries_tx);
    wait_for("every subscriber to be connected", || {
        nodes.iter().map(|(_, g, _)| g.hub().connections()).sum::<usize>() == SUBSCRIBERS.len()
    })?;

    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("grpc-demo").build());
    let push = PushServerClient::new(ChannelBuilder::new(env).connect(&format!("127.0.0.1:{}", manager.addr().port())));
    let mut seq = 0;
    for topic in ["sports", "news", ""] {
        seq += 1;
        let body = match topic {
            "" => "Server maintenance at 02:00 UTC".to_string(),
            t => format!("Latest {t} headline #{seq}"),
        };
        send_and_show(&push, &deliveries, topic, seq, &body, &[])?;
    }
    seq += 1;
    send_private_and_show(&push, &deliveries, "bob", seq, "Your order #1234 has shipped")?;

    let (id, mut gateway, registration) = nodes.pop().expect("three nodes");
    println!("\nstopping {id}: revoking its lease, then closing its connections");
    let stopped_at = Instant::now();
    registration.expect("registered").deregister();
    wait_for(&format!("push-manager to drop {id}"), || manager.nodes().len() == 2)?;
    println!("push-manager: dropped {id} after {} ms; now {}", stopped_at.elapsed().as_millis(), node_list(&manager));
    gateway.shutdown();
    let on_stopped: Vec<&str> = SUBSCRIBERS.iter().filter(|s| s.1 == 2).map(|s| s.0).collect();
    for _ in &on_stopped {
        let d = deliveries.recv_timeout(WAIT).map_err(|_| format!("{id}'s subscribers were not closed"))?;
        if d.frame["type"] != "closed" {
            return Err(format!("{} received {} after {id} stopped", d.subscriber, d.text));
        }
        println!("  {:<6} was closed by {}: {} {}", d.subscriber, d.node, d.frame["code"], d.frame["reason"]);
    }
    seq += 1;
    send_and_show(&push, &deliveries, "", seq, "Everyone still connected gets this", &on_stopped)?;

    wait_for("node counters to settle", || manager.nodes().iter().all(|n| n.settled()))?;
    println!();
    for n in manager.nodes() {
        println!(
            "push-manager counters for {}: enqueued {} sent {} in {} RPC(s), failed {}, dropped {}",
            n.id, n.enqueued, n.sent, n.rpcs, n.failed, n.dropped_full
        );
    }
    println!("\nshutting down");
    manager.shutdown();
    for (_, mut gateway, registration) in nodes {
        drop(registration);
        gateway.shutdown();
    }
    for r in readers {
        let _ = r.join();
    }
    println!("demo complete");
    Ok(())
}

/// A key file with one fresh random key (in a temp dir deleted when the first value drops), its
/// path, and the keys loaded from it.
fn token_keys() -> Result<(tempfile::TempDir, std::path::PathBuf, TokenKeys), Failure> {
    use std::io::Read;
    let dir = tempfile::Builder::new().prefix("push-manager-demo-").tempdir().map_err(|e| e.to_string())?;
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut random)).map_err(|e| e.to_string())?;
    let key = hex::encode(random);
    let path = dir.path().join("token-keys");
    std::fs::write(&path, format!("{key}\n")).map_err(|e| e.to_string())?;
    let keys = TokenKeys::load(&path)?;
    Ok((dir, path, keys))
}

/// A token for subscriber `name`, granting exactly its topics, valid for an hour.
fn token_for(keys: &TokenKeys, name: &str, topics: &[&str]) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let topics = Some(topics.iter().map(|t| t.to_string()).collect());
    keys.sign(&Claims { sub: name.into(), exp: now + 3600, nbf: None, iat: Some(now), topics })
}

/// Keeps whichever registry the demo runs on alive until dropped.
enum Registry {
    Etcd(LocalEtcd),
    InProcess(InProcessEtcd),
}

impl Registry {
    fn endpoint(&self) -> String {
        match self {
            Registry::Etcd(etcd) => etcd.endpoint(),
            Registry::InProcess(registry) => registry.endpoint(),
        }
    }
}

/// A real etcd when the binary is on PATH, else the in-process stand-in; says which.
fn start_registry() -> Result<Registry, Failure> {
    match LocalEtcd::start() {
        Ok(etcd) => {
            println!(
                "etcd: a real etcd process (pid {}) on {}, data in {}",
                etcd.pid().unwrap_or_default(),
                etcd.endpoint(),
                etcd.data_dir().display()
            );
            Ok(Registry::Etcd(etcd))
        }
        Err(why) if why.starts_with("cannot run etcd") => {
            let registry = InProcessEtcd::start()?;
            println!(
                "etcd: no etcd binary on PATH ({why}); using the in-process registry on {} \
                 (the etcd v3 gRPC API, in memory; install etcd-server for the real thing)",
                registry.endpoint()
            );
            Ok(Registry::InProcess(registry))
        }
        Err(why) => Err(why),
    }
}

fn node_list(manager: &Manager) -> String {
    let nodes: Vec<String> = manager.nodes().into_iter().map(|n| format!("{} at {}", n.id, n.addr)).collect();
    nodes.join(", ")
}

/// Sends one broadcast and prints which subscribers it reached, and through which node;
/// `gone` are subscribers whose node was stopped.
fn send_and_show(
    push: &PushServerClient,
    deliveries: &Receiver<Received>,
    topic: &str,
    seq: i32,
    body: &str,
    gone: &[&str],
) -> Result<(), Failure> {
    let expected: Vec<&str> = SUBSCRIBERS
        .iter()
        .filter(|(name, _, topics)| !gone.contains(name) && (topic.is_empty() || topics.contains(&topic)))
        .map(|(name, _, _)| *name)
        .collect();
    let reply = broadcast(push, topic, seq, body)?;
    let shown_topic = if topic.is_empty() { "everyone".to_string() } else { format!("topic {topic:?}") };
    println!(
        "\nbroadcast #{seq} to {shown_topic}: {body:?}\n  push-manager: targeted {} node(s), accepted by {}, dropped by {}",
        reply.get_targeted(),
        reply.get_accepted(),
        reply.get_dropped().len()
    );
    let mut got: BTreeMap<&str, String> = BTreeMap::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < expected.len() {
        let d = deliveries.recv_deadline(deadline).map_err(|_| {
            format!("broadcast #{seq}: only {:?} of {expected:?} received it", got.keys().collect::<Vec<_>>())
        })?;
        if d.frame["seq"] != seq {
            return Err(format!("{} received an unexpected frame {}", d.subscriber, d.frame));
        }
        if !expected.contains(&d.subscriber) {
            return Err(format!("{} received broadcast #{seq} but is not subscribed to it", d.subscriber));
        }
        if got.insert(d.subscriber, d.node.clone()).is_some() {
            return Err(format!("{} received broadcast #{seq} twice", d.subscriber));
        }
        println!("  {:<6} got it through {}: {}", d.subscriber, d.node, d.text);
    }
    let missed: Vec<&str> =
        SUBSCRIBERS.iter().map(|s| s.0).filter(|n| !expected.contains(n) && !gone.contains(n)).collect();
    if !missed.is_empty() {
        println!("  not subscribed, not sent: {}", missed.join(", "));
    }
    Ok(())
}

/// Sends one PushUsers to `user` and shows that it alone received it, as a `direct` frame.
fn send_private_and_show(
    push: &PushServerClient,
    deliveries: &Receiver<Received>,
    user: &str,
    seq: i32,
    body: &str,
) -> Result<(), Failure> {
    let reply = push
        .push_users(&push_users_request(&[user], 1000, seq, body))
        .map_err(|e| format!("PushUsers #{seq} failed: {e}"))?;
    println!(
        "\nprivate message #{seq} to user {user:?} (PushUsers): {body:?}\n  push-manager: targeted {} node(s), accepted by {}, dropped by {}",
        reply.get_targeted(),
        reply.get_accepted(),
        reply.get_dropped().len()
    );
    let d = deliveries.recv_timeout(WAIT).map_err(|_| format!("private message #{seq}: {user} did not receive it"))?;
    if d.subscriber != user || d.frame["type"] != "direct" || d.frame["seq"] != seq {
        return Err(format!("private message #{seq} for {user}: {} received {}", d.subscriber, d.text));
    }
    println!("  {:<6} got it through {}: {}", d.subscriber, d.node, d.text);
    // Everyone else is checked by the next broadcast: a stray copy would arrive before it.
    println!("  nobody else: it goes to the connections whose token names {user:?}, whatever their topics");
    Ok(())
}

fn broadcast(push: &PushServerClient, topic: &str, seq: i32, body: &str) -> Result<BroadCastReply, Failure> {
    let req = broadcast_request(topic, 1000, seq, body);
    push.broadcast(&req).map_err(|e| format!("Broadcast #{seq} failed: {e}"))
}

/// A WebSocket user on its own thread, forwarding each delivery.
fn subscribe(name: &'static str, node: String, url: &str, out: Sender<Received>) -> Result<JoinHandle<()>, Failure> {
    let (socket, _) = tungstenite::connect(url).map_err(|e| format!("{name} cannot connect to {url}: {e}"))?;
    let socket: WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>> = socket;
    thread::Builder::new()
        .name(format!("demo-{name}"))
        .spawn(move || read_deliveries(name, node, socket, out))
        .map_err(|e| e.to_string())
}

fn read_deliveries(
    name: &'static str,
    node: String,
    mut socket: WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    out: Sender<Received>,
) {
    while let Ok(msg) = socket.read() {
        let (frame, text) = match msg {
            Message::Text(text) => match serde_json::from_str::<serde_json::Value>(text.as_str()) {
                Ok(frame) if frame["type"] == "message" || frame["type"] == "direct" => (frame, text.to_string()),
                _ => continue,
            },
            Message::Close(close) => {
                let (code, reason) = close.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                let frame = serde_json::json!({"type": "closed", "code": code, "reason": reason});
                let text = frame.to_string();
                let _ = out.send(Received { subscriber: name, node, frame, text });
                return;
            }
            _ => continue,
        };
        if out.send(Received { subscriber: name, node: node.clone(), frame, text }).is_err() {
            return;
        }
    }
}

/// Waits up to [`WAIT`] for `done` to hold; the failure names `what` it waited for.
fn wait_for(what: &str, done: impl FnMut() -> bool) -> Result<(), Failure> {
    if poll_until(WAIT, done) {
        Ok(())
    } else {
        Err(format!("gave up waiting for {what} after {WAIT:?}"))
    }
}
