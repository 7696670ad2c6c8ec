//! The connect-node's edges (issue #9), each through the real thing: real etcd, real
//! `push-manager node` processes or in-process gateways, real WebSocket and gRPC clients.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::etcd::Etcd;
use common::grpc::{node_broadcast, node_client};
use common::ws::Client;
use common::{BIN, PATIENCE};
use parking_lot::Mutex;
use push_manager::testkit::poll_until;

const PREFIX: &str = "/hardening/nodes/";
const TOPIC: &str = "hardening";

fn key(id: &str) -> String {
    format!("{PREFIX}{id}")
}

/// Kills a child process on drop, so a failing test leaves nothing running.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `push-manager node` with its log (standard error, level info) collected as it comes.
struct LoggedNode {
    /// Held to kill the node when the test ends.
    _child: Reaped,
    grpc: String,
    ws_addr: SocketAddr,
    log: Arc<Mutex<String>>,
    _reader: JoinHandle<()>,
}

impl LoggedNode {
    #[track_caller]
    fn spawn(etcd_endpoint: &str, id: &str, extra: &[&str]) -> LoggedNode {
        let mut child = Command::new(BIN)
            .args(["node", "--grpc-listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0", "--etcd", etcd_endpoint])
            .args(["--prefix", PREFIX, "--node-id", id, "--log-level", "info"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("binary starts");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let lines = log.clone();
        let reader = thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let mut log = lines.lock();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut first = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut first).unwrap();
        let child = Reaped(child);
        // "node <id> grpc <addr> ws ws://<addr>/ws"
        let words: Vec<&str> = first.split_whitespace().collect();
        let [_, _, _, grpc, _, ws_url] = words[..] else {
            panic!("unexpected first line {first:?}; log:\n{}", log.lock())
        };
        let ws_addr = ws_url.trim_start_matches("ws://").trim_end_matches("/ws").parse().unwrap();
        LoggedNode { _child: child, grpc: grpc.to_string(), ws_addr, log, _reader: reader }
    }

    #[track_caller]
    fn wait_for_log(&self, needle: &str) {
        self.wait_until(&format!("the node logs {needle:?}"), PATIENCE, || self.log.lock().contains(needle));
    }

    /// [`wait_until`], showing the node's log when it times out.
    #[track_caller]
    fn wait_until(&self, what: &str, timeout: Duration, done: impl FnMut() -> bool) {
        if !poll_until(timeout, done) {
            panic!("timed out after {timeout:?} waiting until {what}; the node's log:\n{}", self.log.lock());
        }
    }
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
    node.wait_until("the deleted record is back under the same lease", Duration::from_secs(5), restored);
    node.wait_for_log("was deleted; restored");

    etcd_client.put(&key, b"10.0.0.1:1", None).unwrap();
    node.wait_until("the overwritten record is back under the same lease", Duration::from_secs(5), restored);
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
