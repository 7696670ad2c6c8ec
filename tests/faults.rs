//! Faults injected for real, on loopback: connect-node processes killed and stopped, etcd killed
//! and restarted, a network stall between push-manager and one node (a pausable TCP proxy), and
//! push-manager stopped while a node stalls or a client stalls mid-call. Each case ends with the
//! accounting: every broadcast was accepted by a node's queue or named in its reply's `dropped`,
//! and per node `enqueued = sent + failed + abandoned` once its queue is empty.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::grpc::{broadcast, push_client};
use common::ws::Client;
use common::{wait_until, BIN, PATIENCE};
use parking_lot::{Condvar, Mutex};
use push_manager::manager::{self, Manager, NodeStats};
use push_manager::proto::protocol::BroadCastReply;
use push_manager::proto::protocol_grpc::PushServerClient;
use push_manager::testkit::{signal, spawn_node, spawn_serve, wait_exit, NodeProcess, Reaped};

const PREFIX: &str = "/faults/nodes/";
const TOPIC: &str = "faults";

fn manager_config(etcd: &Etcd) -> manager::Config {
    manager::Config {
        queue_size: 100,
        poll_interval: Duration::from_secs(1),
        rpc_timeout: Duration::from_secs(1),
        drain_timeout: Duration::from_secs(3),
        retry: manager::RetryPolicy { max_attempts: 2, ..manager::RetryPolicy::default() },
        ..common::manager::config(etcd, PREFIX)
    }
}

fn node(etcd: &Etcd, id: &str, extra: &[&str]) -> NodeProcess {
    spawn_node(BIN, &etcd.endpoint(), PREFIX, id, extra)
}

fn stats(manager: &Manager, id: &str) -> NodeStats {
    manager.nodes().into_iter().find(|n| n.id == id).unwrap_or_else(|| panic!("node {id} is not registered"))
}

fn node_ids(manager: &Manager) -> BTreeSet<String> {
    manager.nodes().into_iter().map(|n| n.id).collect()
}

/// What the business side saw: each reply, kept to check that every broadcast is accounted for.
#[derive(Default)]
struct Ledger {
    replies: Vec<BroadCastReply>,
}

impl Ledger {
    fn send(&mut self, client: &PushServerClient, body: &str) {
        self.replies.push(broadcast(client, TOPIC, body));
    }

    /// Replies naming `id` as a node that did not take the broadcast.
    fn dropped_by(&self, id: &str) -> u64 {
        self.replies.iter().filter(|r| r.get_dropped().iter().any(|d| d == id)).count() as u64
    }

    /// Every broadcast was taken by each targeted node's queue or named as dropped.
    #[track_caller]
    fn assert_accounted(&self) {
        for (i, r) in self.replies.iter().enumerate() {
            assert_eq!(r.get_accepted() + r.get_dropped().len() as u32, r.get_targeted(), "broadcast #{i}: {r:?}");
        }
    }
}

/// Waits until `id`'s queue is empty and every message it accepted is sent, failed or abandoned.
#[track_caller]
fn assert_settles(manager: &Manager, id: &str) -> NodeStats {
    wait_until(&format!("node {id} settles"), PATIENCE, || stats(manager, id).settled());
    let s = stats(manager, id);
    assert_eq!(s.enqueued, s.sent + s.failed + s.abandoned, "{s:?}");
    s
}

/// Reads deliveries from `client` until `n` distinct bodies arrived; returns them.
#[track_caller]
fn receive(client: &mut Client, n: usize) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    while seen.len() < n {
        let frame = client.next_json();
        assert_eq!(frame["type"], "message", "{frame}");
        seen.insert(frame["body"].as_str().expect("a text body").to_string());
    }
    seen
}

fn bodies(range: std::ops::Range<usize>) -> BTreeSet<String> {
    range.map(|i| format!("m{i}")).collect()
}

/// Publishes `range` in chunks, letting the healthy node `keeper` drain between chunks so that
/// only a faulty node can ever fill its queue, whatever the speed of this machine.
fn publish(
    ledger: &mut Ledger,
    client: &PushServerClient,
    manager: &Manager,
    keeper: &str,
    range: std::ops::Range<usize>,
) {
    for i in range {
        ledger.send(client, &format!("m{i}"));
        if i % 20 == 19 {
            wait_until("the healthy node keeps up", PATIENCE, || stats(manager, keeper).queue_depth == 0);
        }
    }
}

#[test]
fn a_node_killed_under_load_is_accounted_for_and_the_others_get_everything() {
    let etcd = Etcd::start();
    let (a, b) = (node(&etcd, "a", &[]), node(&etcd, "b", &[]));
    let (mut a_child, b_child) = (a.child, b.child);
    let manager = Manager::start(manager_config(&etcd)).unwrap();
    wait_until("both nodes found", PATIENCE, || node_ids(&manager).len() == 2);
    let mut a_user = Client::subscribed(a.ws_addr, &[TOPIC]);
    let client = push_client(manager.addr());
    let mut ledger = Ledger::default();

    publish(&mut ledger, &client, &manager, "a", 0..100);
    signal(&b_child.0, libc::SIGKILL);
    publish(&mut ledger, &client, &manager, "a", 100..300);

    assert_eq!(receive(&mut a_user, 300), bodies(0..300));
    ledger.assert_accounted();
    let b = assert_settles(&manager, "b");
    assert!(b.failed > 0, "messages sent to the dead node failed: {b:?}");
    assert_eq!(b.dropped_full, ledger.dropped_by("b"), "{b:?}");
    let a = assert_settles(&manager, "a");
    assert_eq!((a.sent, a.failed, a.dropped_full), (300, 0, 0), "{a:?}");
    let _ = a_child.0.kill();
}

#[test]
fn a_stopped_node_fills_its_queue_then_catches_up_when_continued() {
    let etcd = Etcd::start();
    let (a, b) = (node(&etcd, "a", &[]), node(&etcd, "b", &[]));
    let (_a_child, b_child) = (a.child, b.child);
    let manager = Manager::start(manager_config(&etcd)).unwrap();
    wait_until("both nodes found", PATIENCE, || node_ids(&manager).len() == 2);
    let mut a_user = Client::subscribed(a.ws_addr, &[TOPIC]);
    let mut b_user = Client::subscribed(b.ws_addr, &[TOPIC]);
    let client = push_client(manager.addr());
    let mut ledger = Ledger::default();

    signal(&b_child.0, libc::SIGSTOP);
    publish(&mut ledger, &client, &manager, "a", 0..300);
    assert!(ledger.dropped_by("b") > 0, "b's queue of 100 filled and the replies said so");
    assert_eq!(ledger.dropped_by("a"), 0);
    signal(&b_child.0, libc::SIGCONT);
    let b = assert_settles(&manager, "b");
    assert_eq!(b.dropped_full, ledger.dropped_by("b"), "{b:?}");

    // b serves again: a new broadcast reaches its user, after whatever b did deliver.
    ledger.send(&client, "after");
    let mut got = BTreeSet::new();
    while !got.contains("after") {
        got.insert(b_user.next_json()["body"].as_str().unwrap().to_string());
    }
    assert_eq!(receive(&mut a_user, 301), bodies(0..300).into_iter().chain(["after".to_string()]).collect());
    ledger.assert_accounted();
}

#[test]
fn etcd_restarted_under_load_with_node_changes_made_while_it_was_down() {
    let mut etcd = Etcd::start();
    let (a, b) = (node(&etcd, "a", &["--lease-ttl", "2s"]), node(&etcd, "b", &["--lease-ttl", "2s"]));
    let (_a_child, mut b_child) = (a.child, b.child);
    let manager = Manager::start(manager_config(&etcd)).unwrap();
    wait_until("both nodes found", PATIENCE, || node_ids(&manager).len() == 2);
    let mut a_user = Client::subscribed(a.ws_addr, &[TOPIC]);
    let client = push_client(manager.addr());
    let mut ledger = Ledger::default();
    publish(&mut ledger, &client, &manager, "a", 0..100);

    etcd.kill();
    // While etcd is down: b stops (it cannot deregister), c starts (it cannot register yet).
    signal(&b_child.0, libc::SIGTERM);
    wait_exit(&mut b_child.0, PATIENCE);
    let c = node(&etcd, "c", &["--lease-ttl", "2s"]);
    let _c_child = c.child;
    publish(&mut ledger, &client, &manager, "a", 100..200);
    assert!(!manager.etcd_reachable() || node_ids(&manager).contains("b"), "the last known set is kept");

    etcd.restart();
    // c registers once etcd is back; b's lease runs out its TTL after the restart.
    wait_until("c found and b gone", Duration::from_secs(20), || {
        node_ids(&manager) == ["a", "c"].iter().map(|s| s.to_string()).collect()
    });
    publish(&mut ledger, &client, &manager, "a", 200..300);
    assert_eq!(receive(&mut a_user, 300), bodies(0..300));
    let mut c_user = Client::subscribed(c.ws_addr, &[TOPIC]);
    ledger.send(&client, "to c");
    assert_eq!(c_user.next_json()["body"], "to c");
    ledger.assert_accounted();
    assert_settles(&manager, "a");
}

/// A TCP proxy in front of one node that can stop passing bytes (both ways) and start again,
/// like a network that stalls: sockets stay open, nothing moves.
struct Proxy {
    addr: String,
    shared: Arc<ProxyShared>,
    accept: Option<JoinHandle<()>>,
}

struct ProxyShared {
    upstream: Mutex<Option<String>>,
    paused: Mutex<bool>,
    changed: Condvar,
    stopping: AtomicBool,
    sockets: Mutex<Vec<TcpStream>>,
    copiers: Mutex<Vec<JoinHandle<()>>>,
}

impl ProxyShared {
    /// Blocks while paused; false once the proxy is stopping.
    fn wait_while_paused(&self) -> bool {
        let mut paused = self.paused.lock();
        while *paused && !self.stopping.load(Ordering::SeqCst) {
            self.changed.wait(&mut paused);
        }
        !self.stopping.load(Ordering::SeqCst)
    }
}

impl Proxy {
    fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(ProxyShared {
            upstream: Mutex::new(None),
            paused: Mutex::new(false),
            changed: Condvar::new(),
            stopping: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
            copiers: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let accept = thread::spawn(move || {
            for downstream in listener.incoming() {
                if s.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(downstream) = downstream else { continue };
                let Some(target) = s.upstream.lock().clone() else { continue };
                let Ok(upstream) = TcpStream::connect(&target) else { continue };
                for socket in [&downstream, &upstream] {
                    s.sockets.lock().push(socket.try_clone().unwrap());
                }
                let pairs = [(downstream.try_clone().unwrap(), upstream.try_clone().unwrap()), (upstream, downstream)];
                for (from, to) in pairs {
                    let s2 = s.clone();
                    s.copiers.lock().push(thread::spawn(move || copy(from, to, &s2)));
                }
            }
        });
        Proxy { addr, shared, accept: Some(accept) }
    }

    fn forward_to(&self, upstream: &str) {
        *self.shared.upstream.lock() = Some(upstream.to_string());
    }

    fn pause(&self, paused: bool) {
        *self.shared.paused.lock() = paused;
        self.shared.changed.notify_all();
    }
}

fn copy(mut from: TcpStream, mut to: TcpStream, shared: &ProxyShared) {
    let mut buf = [0u8; 16 << 10];
    while shared.wait_while_paused() {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // A pause that began during the read holds these bytes too.
        if !shared.wait_while_paused() || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.pause(false);
        for socket in self.shared.sockets.lock().drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
        // Wakes the accept loop, which then sees `stopping`.
        let _ = TcpStream::connect(&self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for copier in self.shared.copiers.lock().drain(..) {
            let _ = copier.join();
        }
    }
}

/// Node `a`, and node `b` reached only through `proxy`; both killed when the pair is dropped.
fn behind_proxy(etcd: &Etcd, proxy: &Proxy) -> (RunningNode, RunningNode) {
    let a = node(etcd, "a", &[]);
    let b = node(etcd, "b", &["--advertise", &proxy.addr]);
    proxy.forward_to(&b.grpc);
    (RunningNode::from(a), RunningNode::from(b))
}

/// A node process and the WebSocket address its users connect to.
struct RunningNode {
    ws_addr: std::net::SocketAddr,
    _child: Reaped,
}

impl From<NodeProcess> for RunningNode {
    fn from(node: NodeProcess) -> RunningNode {
        RunningNode { ws_addr: node.ws_addr, _child: node.child }
    }
}

#[test]
fn a_network_stall_to_one_node_leaves_the_others_at_full_speed() {
    let etcd = Etcd::start();
    let proxy = Proxy::start();
    let (a, b) = behind_proxy(&etcd, &proxy);
    let manager = Manager::start(manager_config(&etcd)).unwrap();
    wait_until("both nodes found", PATIENCE, || node_ids(&manager).len() == 2);
    let mut a_user = Client::subscribed(a.ws_addr, &[TOPIC]);
    let mut b_user = Client::subscribed(b.ws_addr, &[TOPIC]);
    let client = push_client(manager.addr());
    let mut ledger = Ledger::default();
    publish(&mut ledger, &client, &manager, "a", 0..20);
    assert_eq!(receive(&mut b_user, 20), bodies(0..20), "b is reachable through the proxy");

    proxy.pause(true);
    publish(&mut ledger, &client, &manager, "a", 20..300);
    assert!(ledger.dropped_by("b") > 0, "b's queue filled behind the stall and the replies said so");
    assert_eq!(ledger.dropped_by("a"), 0, "a never waited for b");
    proxy.pause(false);

    let b_stats = assert_settles(&manager, "b");
    assert_eq!(b_stats.dropped_full, ledger.dropped_by("b"), "{b_stats:?}");
    assert_eq!(receive(&mut a_user, 300), bodies(0..300));
    ledger.assert_accounted();
}

/// `serve`'s final per-node line: `node <id>: stopped; enqueued E sent S failed F abandoned A ...`.
fn final_counters(log: &str) -> BTreeMap<String, [u64; 4]> {
    let mut out = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains(": stopped; enqueued ")) {
        let after = &line[line.find("node ").unwrap() + 5..];
        let id = after[..after.find(':').unwrap()].to_string();
        let number = |key: &str| -> u64 {
            let rest = &line[line.find(key).unwrap() + key.len()..];
            rest.split_whitespace().next().unwrap().parse().unwrap()
        };
        out.insert(id, [number(" enqueued "), number(" sent "), number(" failed "), number(" abandoned ")]);
    }
    out
}

#[test]
fn sigterm_with_full_queues_and_a_stalled_node_exits_within_the_drain_time() {
    let etcd = Etcd::start();
    let proxy = Proxy::start();
    // Held to the end: the nodes stop when the pair is dropped.
    let _nodes = behind_proxy(&etcd, &proxy);
    let flags = ["--queue-size", "50", "--drain-timeout", "2s", "--rpc-timeout", "1s", "--log-level", "info"];
    let (serve, addr) = spawn_serve(BIN, &etcd.endpoint(), PREFIX, &flags, Stdio::piped());
    let mut serve = serve;
    let client = push_client(&addr);
    wait_until("serve finds both nodes", PATIENCE, || {
        client
            .broadcast(&push_manager::proto::broadcast_request(TOPIC, 1, 0, "probe"))
            .is_ok_and(|r| r.get_targeted() == 2)
    });

    proxy.pause(true);
    let mut ledger = Ledger::default();
    let mut i = 0;
    while ledger.dropped_by("b") == 0 {
        ledger.send(&client, &format!("m{i}"));
        i += 1;
        assert!(i < 10_000, "b's queue of 50 never filled");
    }
    let stopped_at = Instant::now();
    signal(&serve.0, libc::SIGTERM);
    // Drain time (2 s) plus the gRPC stop grace (2 s) plus room for a slow machine.
    let status = wait_exit(&mut serve.0, Duration::from_secs(15));
    assert!(status.success(), "serve exited with {status}");
    eprintln!("serve stopped {:?} after SIGTERM with b stalled", stopped_at.elapsed());
    let mut log = String::new();
    serve.0.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    let counters = final_counters(&log);
    assert_eq!(counters.keys().collect::<Vec<_>>(), ["a", "b"], "{log}");
    for (id, [enqueued, sent, failed, abandoned]) in &counters {
        assert_eq!(*enqueued, sent + failed + abandoned, "node {id}: {log}");
    }
    assert!(counters["b"][3] + counters["b"][2] > 0, "b's queue was not delivered and is counted: {log}");
    ledger.assert_accounted();
    proxy.pause(false);
}

/// Opens an HTTP/2 connection to `addr` and starts a unary call to `path` (headers only, never
/// the message): a client that stalls mid-call.
fn stall_mid_call(addr: &str, path: &str) -> TcpStream {
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    // HPACK "literal header field without indexing, new name", lengths under 127.
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", addr),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.push(0);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    stream.write_all(&frame(0x4, 0, 0, &[])).unwrap(); // SETTINGS
    stream.write_all(&frame(0x1, 0x4, 1, &block)).unwrap(); // HEADERS, END_HEADERS, no END_STREAM
    stream
}

#[test]
fn sigterm_is_bounded_while_a_client_stalls_mid_call() {
    let etcd = Etcd::start();
    let (serve, addr) = spawn_serve(BIN, &etcd.endpoint(), PREFIX, &["--log-level", "warn"], Stdio::inherit());
    let mut serve = serve;
    let _stalled = stall_mid_call(&addr, "/protocol.PushServer/Broadcast");
    // The server has the call: a normal call made after it is answered, so the stalled one is open.
    let reply = push_client(&addr).broadcast(&push_manager::proto::broadcast_request(TOPIC, 1, 0, "x"));
    assert!(reply.is_err(), "no node is registered, so UNAVAILABLE: {reply:?}");
    signal(&serve.0, libc::SIGTERM);
    let status = wait_exit(&mut serve.0, Duration::from_secs(15));
    assert!(status.success(), "serve exited with {status}");
}

#[test]
fn node_sigterm_is_bounded_while_a_client_stalls_mid_call() {
    let etcd = Etcd::start();
    let n = node(&etcd, "n", &[]);
    let mut child = n.child;
    let _stalled = stall_mid_call(&n.grpc, "/protocol.ConnectNode/Broadcast");
    let reply = common::grpc::node_client(&n.grpc)
        .broadcast(&push_manager::proto::broadcast_request(TOPIC, 1, 0, "x"))
        .expect("the node still answers other calls");
    assert_eq!(reply.get_received(), 1);
    signal(&child.0, libc::SIGTERM);
    let status = wait_exit(&mut child.0, Duration::from_secs(15));
    assert!(status.success(), "node exited with {status}");
}
