//! The connect-node's edges (issue #9), each through the real thing: legal broadcasts whose
//! frames outgrow `--max-out-buffer`, a registration deleted, overwritten or attempted while
//! etcd is down, a stop that delivers what push-manager had sent, bounded sockets and
//! handshakes, byte-bounded loop backlogs, and bad flag values. Real etcd, real
//! `push-manager node` processes or in-process gateways, real WebSocket and gRPC clients.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use base64::Engine;
use common::etcd::Etcd;
use common::gateway::{start_gateway, wait_connections};
use common::grpc::{batch, node_broadcast, node_client, push_client, OP};
use common::ws::{raw_exchange, upgrade_request, Client};
use common::{free_addr, wait_until, BIN, PATIENCE};
use parking_lot::Mutex;
use push_manager::gateway::{self, Gateway};
use push_manager::manager::{self, Manager, NodeStats};
use push_manager::proto::broadcast_request;
use push_manager::testkit::{node_command, poll_until, serving_line, signal, spawn_node, wait_exit, Reaped};
use serde_json::Value;
use tungstenite::Message;

const PREFIX: &str = "/hardening/nodes/";
const TOPIC: &str = "hardening";

fn manager_config(etcd: &Etcd) -> manager::Config {
    manager::Config {
        // Long: node changes come through the watch, and a removed node stays among the
        // retiring ones (with its counters) until the next listing.
        poll_interval: Duration::from_secs(60),
        rpc_timeout: Duration::from_secs(2),
        drain_timeout: Duration::from_secs(5),
        ..common::manager::config(etcd, PREFIX)
    }
}

fn key(id: &str) -> String {
    format!("{PREFIX}{id}")
}

/// A child's standard error, collected line by line as it comes.
struct Log {
    text: Arc<Mutex<String>>,
    _reader: JoinHandle<()>,
}

impl Log {
    fn collect(child: &mut Child) -> Log {
        let text = Arc::new(Mutex::new(String::new()));
        let stderr = BufReader::new(child.stderr.take().expect("standard error is piped"));
        let lines = text.clone();
        let reader = thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let mut text = lines.lock();
                text.push_str(&line);
                text.push('\n');
            }
        });
        Log { text, _reader: reader }
    }

    #[track_caller]
    fn wait_for(&self, needle: &str) {
        self.wait_until(&format!("the node logs {needle:?}"), PATIENCE, || self.text.lock().contains(needle));
    }

    /// [`wait_until`], showing the log when it times out.
    #[track_caller]
    fn wait_until(&self, what: &str, timeout: Duration, done: impl FnMut() -> bool) {
        if !poll_until(timeout, done) {
            panic!("timed out after {timeout:?} waiting until {what}; the node's log:\n{}", self.text.lock());
        }
    }
}

/// Starts `push-manager node` at log level info, collecting its log; it may not serve yet.
fn start_logged_node(etcd_endpoint: &str, id: &str, extra: &[&str]) -> (Reaped, Log) {
    let mut child = Reaped::spawn(node_command(BIN, etcd_endpoint, PREFIX, id, "info", extra).stderr(Stdio::piped()));
    let log = Log::collect(&mut child);
    (child, log)
}

/// `push-manager node` serving, with its log collected.
struct LoggedNode {
    /// Held to kill the node when the test ends.
    _child: Reaped,
    grpc: String,
    ws_addr: SocketAddr,
    log: Log,
}

impl LoggedNode {
    /// Starts the node and waits for the line it prints once it serves.
    #[track_caller]
    fn spawn(etcd_endpoint: &str, id: &str, extra: &[&str]) -> LoggedNode {
        let (mut child, log) = start_logged_node(etcd_endpoint, id, extra);
        let mut first = String::new();
        BufReader::new(child.0.stdout.as_mut().unwrap()).read_line(&mut first).unwrap();
        let (grpc, ws_addr) = serving_line(&first)
            .unwrap_or_else(|| panic!("unexpected first line {first:?}; log:\n{}", log.text.lock()));
        LoggedNode { _child: child, grpc, ws_addr, log }
    }

    #[track_caller]
    fn wait_for_log(&self, needle: &str) {
        self.log.wait_for(needle);
    }

    #[track_caller]
    fn wait_until(&self, what: &str, timeout: Duration, done: impl FnMut() -> bool) {
        self.log.wait_until(what, timeout, done);
    }
}

/// Reads the next text frame as raw text and JSON, skipping pings.
#[track_caller]
fn next_frame(client: &mut Client) -> (usize, Value) {
    match client.next_message() {
        Message::Text(text) => (text.len(), serde_json::from_str(text.as_str()).expect("JSON")),
        other => panic!("expected a delivery, got {other:?}"),
    }
}

#[test]
fn the_largest_legal_broadcasts_reach_every_subscriber_whatever_their_encoded_size() {
    let etcd = Etcd::start();
    // Defaults on both sides: push-manager takes bodies up to 1 MiB, the node buffers 1 MiB.
    let node = spawn_node(BIN, &etcd.endpoint(), PREFIX, "big", &[]);
    let _child = node.child;
    let manager = Manager::start(manager_config(&etcd)).unwrap();
    wait_until("push-manager finds the node", PATIENCE, || manager.nodes().len() == 1);
    // tungstenite's default limits (64 MiB messages, 16 MiB frames) take a 6 MiB delivery.
    let mut subscribers = [Client::subscribed(node.ws_addr, &[TOPIC]), Client::subscribed(node.ws_addr, &[TOPIC])];
    let client = push_client(manager.addr());
    let max_out_buffer = gateway::Config::default().max_out_buffer;

    let largest = 1 << 20;
    let bodies: [(&str, Vec<u8>); 3] =
        [("ASCII", vec![b'a'; largest]), ("control characters", vec![1; largest]), ("not UTF-8", vec![0xff; largest])];
    for (seq, (what, body)) in bodies.iter().enumerate() {
        let reply = client.broadcast(&broadcast_request(TOPIC, OP, seq as i32, body.clone())).unwrap();
        assert_eq!((reply.get_accepted(), reply.get_targeted()), (1, 1), "{what}: {reply:?}");
        for subscriber in &mut subscribers {
            let (len, frame) = next_frame(subscriber);
            assert!(len > max_out_buffer, "{what}: the frame ({len} bytes) is bigger than --max-out-buffer");
            assert_eq!(frame["seq"], seq, "{what}");
            let got = match frame["body"].as_str() {
                Some(text) => text.as_bytes().to_vec(),
                None => {
                    base64::engine::general_purpose::STANDARD.decode(frame["body_base64"].as_str().unwrap()).unwrap()
                }
            };
            assert!(got == *body, "{what}: the body arrived changed");
        }
    }
    // Neither was closed: both get what comes next.
    client.broadcast(&broadcast_request(TOPIC, OP, 3, "after")).unwrap();
    for subscriber in &mut subscribers {
        assert_eq!(next_frame(subscriber).1["body"], "after");
    }
    wait_until("push-manager's counters settle", PATIENCE, || manager.nodes()[0].settled());
    let stats = &manager.nodes()[0];
    assert_eq!((stats.sent, stats.failed), (4, 0), "{stats:?}");
}

#[test]
fn a_deleted_or_overwritten_registration_is_put_back_under_the_live_lease() {
    let etcd = Etcd::start();
    let node = LoggedNode::spawn(&etcd.endpoint(), "phoenix", &[]);
    let etcd_client = etcd.client();
    let key = key("phoenix");
    let registered = etcd_client.get(&key).unwrap().expect("registered when the node prints its addresses");
    assert_eq!(registered.value, node.grpc.as_bytes());
    let restored = || matches!(etcd_client.get(&key), Ok(Some(kv)) if kv.value == registered.value && kv.lease == registered.lease);

    etcd_client.delete(&key).unwrap();
    node.wait_until("the deleted record is back under the same lease", PATIENCE, restored);
    node.wait_for_log("was deleted; restored");

    etcd_client.put(&key, b"10.0.0.1:1", None).unwrap();
    node.wait_until("the overwritten record is back under the same lease", PATIENCE, restored);
    node.wait_for_log("was overwritten with \"10.0.0.1:1\" (no lease); restored");
}

#[test]
fn a_node_started_while_etcd_is_down_serves_and_registers_once_etcd_is_back() {
    let mut etcd = Etcd::start();
    etcd.kill();
    let node = LoggedNode::spawn(&etcd.endpoint(), "early", &[]);
    node.wait_for_log("serving unregistered, retrying in the background");

    // It serves meanwhile: users connect and get what is sent to it.
    let mut user = Client::subscribed(node.ws_addr, &[TOPIC]);
    let grpc = node_client(&node.grpc);
    assert_eq!(node_broadcast(&grpc, TOPIC, 1, b"before etcd").get_delivered(), 1);
    assert_eq!(user.next_json()["body"], "before etcd");

    // Backoff grows past the node's once-a-second look at its own key: registering must not
    // be put off by it.
    node.wait_for_log("retrying in 1.6s");
    etcd.restart();
    node.wait_until(
        "registered once etcd is back",
        Duration::from_secs(15),
        || matches!(etcd.client().get(&key("early")), Ok(Some(kv)) if kv.value == node.grpc.as_bytes() && kv.lease != 0),
    );
    node.wait_for_log(&format!("registered {}", key("early")));
    assert_eq!(node_broadcast(&grpc, TOPIC, 2, b"after etcd").get_delivered(), 1);
    assert_eq!(user.next_json()["body"], "after etcd");
}

#[test]
fn a_node_signalled_while_it_starts_still_stops_the_orderly_way() {
    // An etcd that takes connections and never answers: registering waits out --etcd-timeout.
    let silent_etcd = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = silent_etcd.local_addr().unwrap().to_string();
    let (mut child, log) = start_logged_node(&endpoint, "hasty", &["--etcd-timeout", "3s"]);
    log.wait_for("gateway up");
    signal(&child.0, libc::SIGTERM);
    let status = wait_exit(&mut child.0, PATIENCE);
    assert!(status.success(), "node exited with {status}; its log:\n{}", log.text.lock());
    log.wait_for("shutdown signal received");
}

#[test]
fn sigterm_delivers_everything_push_manager_sent_then_closes_with_1001() {
    let etcd = Etcd::start();
    let node = spawn_node(BIN, &etcd.endpoint(), PREFIX, "leaving", &[]);
    let mut child = node.child;
    let manager = Manager::start(manager_config(&etcd)).unwrap();
    wait_until("push-manager finds the node", PATIENCE, || manager.nodes().len() == 1);
    let mut user = Client::subscribed(node.ws_addr, &[TOPIC]);

    // Traffic flows, without pause, until the user is closed.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (stop, client) = (stop.clone(), push_client(manager.addr()));
        thread::spawn(move || {
            let mut seq = 0;
            while !stop.load(Ordering::SeqCst) {
                match client.broadcast(&broadcast_request(TOPIC, OP, seq, format!("m{seq}"))) {
                    Ok(reply) if reply.get_targeted() > 0 => seq += 1,
                    // push-manager dropped the node: there is no one left to send to.
                    _ => return,
                }
            }
        })
    };
    let mut received: Vec<i64> = Vec::new();
    let read = |user: &mut Client| -> Option<i64> {
        match user.next_message() {
            Message::Text(text) => {
                let frame: Value = serde_json::from_str(text.as_str()).unwrap();
                Some(frame["seq"].as_i64().unwrap())
            }
            Message::Close(Some(close)) => {
                assert_eq!(u16::from(close.code), 1001, "{close:?}");
                None
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    while received.len() < 200 {
        received.push(read(&mut user).expect("deliveries before the stop"));
    }
    signal(&child.0, libc::SIGTERM);
    while let Some(seq) = read(&mut user) {
        received.push(seq);
    }
    stop.store(true, Ordering::SeqCst);
    publisher.join().unwrap();
    let status = wait_exit(&mut child.0, PATIENCE);
    assert!(status.success(), "node exited with {status}");

    assert!(received.windows(2).all(|w| w[0] < w[1]), "in order, each once");
    let retired = || manager.retiring_nodes().into_iter().find(|n| n.id == "leaving");
    wait_until("push-manager's counters for the node settle", PATIENCE, || retired().is_some_and(|n| n.settled()));
    let stats: NodeStats = retired().unwrap();
    assert_eq!(stats.enqueued, stats.sent + stats.failed + stats.abandoned, "{stats:?}");
    assert_eq!((stats.failed, stats.abandoned), (0, 0), "nothing push-manager had queued was lost: {stats:?}");
    assert_eq!(received.len() as u64, stats.sent, "every message the node took reached its user before 1001");
}

#[test]
fn connections_past_max_connections_are_answered_503_while_the_others_keep_receiving() {
    let gw = start_gateway(|c| c.max_connections = 3);
    let mut users = vec![Client::subscribed(gw.ws_addr(), &["a"]), Client::subscribed(gw.ws_addr(), &["a"])];
    // A socket still in its handshake holds a place too.
    let _handshaking = TcpStream::connect(gw.ws_addr()).unwrap();
    wait_until("three sockets held", PATIENCE, || gw.stats().connections_held == 3);

    let answer = raw_exchange(gw.ws_addr(), upgrade_request(gw.ws_addr(), "/ws").as_bytes());
    assert!(answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{answer:?}");
    assert!(answer.ends_with("connect-node at its limit of 3 connections; try again later\n"), "{answer:?}");
    match Client::try_connect(gw.ws_addr(), "/ws") {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        Err(e) => panic!("expected HTTP 503, got {e}"),
        Ok(_) => panic!("a fourth connection was upgraded"),
    }
    assert_eq!(gw.stats().refused_max_connections, 2);

    gw.hub().publish(&broadcast_request("a", OP, 1, "still served"));
    for user in &mut users {
        assert_eq!(user.next_json()["body"], "still served");
    }
    // A place that frees up is taken again.
    users.pop();
    wait_until("the closed one is let go", PATIENCE, || gw.stats().connections_held == 2);
    let mut late = Client::subscribed(gw.ws_addr(), &["a"]);
    gw.hub().publish(&broadcast_request("a", OP, 2, "welcome"));
    assert_eq!(late.next_json()["body"], "welcome");
    assert_eq!(users[0].next_json()["body"], "welcome");
}

/// Everything a raw socket gets until the node closes it.
#[track_caller]
fn read_until_closed(socket: &mut TcpStream) -> String {
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut answer = Vec::new();
    match socket.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the node did not close the socket: {e}"),
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn a_handshake_not_done_within_the_handshake_timeout_is_answered_408_closed_and_counted() {
    let timeout = Duration::from_millis(300);
    let gw = start_gateway(|c| c.handshake_timeout = timeout);
    let mut bystander = Client::subscribed(gw.ws_addr(), &["a"]);
    let started = Instant::now();
    let mut silent = TcpStream::connect(gw.ws_addr()).unwrap();
    let mut partial = TcpStream::connect(gw.ws_addr()).unwrap();
    partial.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").unwrap();

    for socket in [&mut silent, &mut partial] {
        let answer = read_until_closed(socket);
        assert!(answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{answer:?}");
        assert!(answer.contains("must complete within 300ms"), "{answer:?}");
    }
    assert!(started.elapsed() >= timeout, "closed before its time");
    wait_until("both are counted and let go", PATIENCE, || {
        let stats = gw.stats();
        stats.closed_handshake_timeout == 2 && stats.connections_held == 1
    });
    gw.hub().publish(&broadcast_request("a", OP, 1, "unaffected"));
    assert_eq!(bystander.next_json()["body"], "unaffected");
}

#[test]
fn bad_flag_values_are_refused_with_a_message_naming_the_flag() {
    let cases: &[(&str, &str)] = &[
        ("--max-connections", "0"),
        ("--handshake-timeout", "0s"),
        ("--handshake-timeout", "soon"),
        ("--shutdown-grace", "11years"),
        ("--max-loop-backlog-bytes", "0"),
    ];
    for (flag, value) in cases {
        let out = Command::new(BIN)
            .args(["node", "--grpc-listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0", "--etcd", &free_addr()])
            .args([flag, value])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag} {value} should be refused");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "{flag} {value}: {stderr:?} should name the flag");
    }
    // A config built in code is held to the same bounds: durations that would overflow the clock
    // are refused before any thread starts.
    type BreakIt = fn(&mut gateway::Config);
    let absurd: [(BreakIt, &str); 3] = [
        (|c| c.handshake_timeout = Duration::MAX, "--handshake-timeout"),
        (|c| c.pong_timeout = Duration::MAX, "--pong-timeout"),
        (|c| c.max_connections = 0, "--max-connections"),
    ];
    for (break_it, flag) in absurd {
        let mut config = gateway::Config {
            grpc_listen: "127.0.0.1:0".into(),
            ws_listen: "127.0.0.1:0".into(),
            ..gateway::Config::default()
        };
        break_it(&mut config);
        let err = Gateway::start(config).expect_err("refused").to_string();
        assert!(err.contains(flag), "{err:?} should name {flag}");
    }
}

#[test]
fn a_backlog_heavy_in_bytes_makes_the_node_refuse_broadcasts_until_it_catches_up() {
    // The delivery count stays far below --max-loop-backlog; only the bytes can refuse.
    let gw = start_gateway(|c| {
        c.event_loops = 1;
        c.max_loop_backlog_bytes = 1 << 20;
    });
    // Subscribers that never read make each delivery cost the loop a write per connection.
    const SUBSCRIBERS: usize = 100;
    let _users: Vec<Client> = (0..SUBSCRIBERS).map(|_| Client::connect(gw.ws_addr(), "/ws?topic=heavy")).collect();
    wait_connections(&gw, SUBSCRIBERS);
    let node = node_client(gw.grpc_addr());
    let body = vec![b'x'; 64 << 10];
    let heavy_batch =
        |first: i32| batch((first..first + 16).map(|seq| broadcast_request("heavy", OP, seq, body.clone())).collect());

    let mut admitted = 0;
    let status = loop {
        match node.broadcast_batch(&heavy_batch(admitted)) {
            Ok(_) => {
                admitted += 16;
                assert!(admitted < 16 * 20, "twenty 1 MiB batches in a row were admitted: bytes are not bounded");
            }
            Err(grpcio::Error::RpcFailure(status)) => break status,
            Err(e) => panic!("expected RESOURCE_EXHAUSTED, got {e}"),
        }
    };
    assert_eq!(status.code(), grpcio::RpcStatusCode::RESOURCE_EXHAUSTED);
    assert!(status.message().contains("--max-loop-backlog-bytes"), "{}", status.message());
    assert!(gw.stats().refused_busy >= 1);
    wait_until("the node admits broadcasts again", PATIENCE, || {
        node.broadcast(&broadcast_request("heavy", OP, 9999, "light")).is_ok()
    });
}

/// A text frame as a client sends it (masked), with a payload under 126 bytes.
fn masked_text(payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend(mask);
    frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    frame
}

/// Resident memory of process `pid`, in bytes.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn a_huge_delivery_to_many_connections_leaves_no_copy_of_it_behind_per_connection() {
    let etcd = Etcd::start();
    let node = spawn_node(BIN, &etcd.endpoint(), PREFIX, "frugal", &[]);
    let child = node.child;
    const SUBSCRIBERS: usize = 100;
    let mut users: Vec<Client> = (0..SUBSCRIBERS).map(|_| Client::connect(node.ws_addr, "/ws?topic=huge")).collect();
    let grpc = node_client(&node.grpc);
    // Subscribed once a broadcast counts them all; each attempt has its own seq.
    let mut ready = 0;
    wait_until("every user is subscribed", PATIENCE, || {
        ready += 1;
        grpc.broadcast(&broadcast_request("huge", OP, ready, "ready?")).unwrap().get_delivered() == SUBSCRIBERS as u64
    });
    for user in &mut users {
        while next_frame(user).1["seq"] != ready {}
    }
    let before = resident_bytes(child.0.id());

    // 1 MiB of control characters: a 6 MiB frame, for each of the hundred.
    let huge = ready + 1;
    let reply = grpc.broadcast(&broadcast_request("huge", OP, huge, vec![1u8; 1 << 20])).unwrap();
    assert_eq!(reply.get_delivered(), SUBSCRIBERS as u64);
    for user in &mut users {
        let (len, frame) = next_frame(user);
        assert!(len > 6 << 20, "{len}");
        assert_eq!(frame["seq"], huge);
    }
    let grown = resident_bytes(child.0.id()).saturating_sub(before);
    // A copy per connection would be 600 MiB; the shared frame and a few KiB each are ~10 MiB.
    assert!(grown < 64 << 20, "the node grew by {} MiB delivering one 6 MiB frame", grown >> 20);
}

#[test]
fn a_client_that_pings_without_reading_cannot_make_the_node_buffer_its_pongs_without_bound() {
    let etcd = Etcd::start();
    let node = spawn_node(BIN, &etcd.endpoint(), PREFIX, "pinged", &[]);
    let child = node.child;
    let mut socket = TcpStream::connect(node.ws_addr).unwrap();
    socket.write_all(upgrade_request(node.ws_addr, "/ws").as_bytes()).unwrap();
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(socket.read(&mut byte).unwrap(), 1, "the node answers the upgrade");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    let before = resident_bytes(child.0.id());

    // Masked pings with the largest payload a control frame carries, each answered by a pong
    // the node cannot send: this client never reads.
    let mut ping = vec![0x89, 0x80 | 125, 1, 2, 3, 4];
    ping.extend(std::iter::repeat_n(0u8, 125));
    let chunk = ping.repeat((64 << 10) / ping.len());
    let mut sent = 0;
    while sent < 64 << 20 {
        socket.write_all(&chunk).expect("the node keeps reading");
        sent += chunk.len();
    }
    // Frames are read in order: once the node has taken this subscription, it has read every
    // ping before it.
    socket.write_all(&masked_text(br#"{"action":"subscribe","topics":["after-the-pings"]}"#)).unwrap();
    let grpc = node_client(&node.grpc);
    wait_until("the node has read the pings", PATIENCE, || {
        node_broadcast(&grpc, "after-the-pings", 1, b"").get_delivered() == 1
    });
    let grown = resident_bytes(child.0.id()).saturating_sub(before);
    // Unbounded, the pongs to 64 MiB of pings would take 62 MiB.
    assert!(grown < 16 << 20, "the node grew by {} MiB answering pings nobody reads", grown >> 20);
}
