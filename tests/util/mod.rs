//! Shared integration-test harness: a real `etcd` per test (the library's `LocalEtcd`, which
//! panics here instead of returning errors), and polling helpers so tests wait on conditions,
//! not on sleeps.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::ops::{Deref, DerefMut};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub use push_manager::etcd::free_port;
use push_manager::etcd::LocalEtcd;
use push_manager::proto::protocol::{BroadCastReq, Proto};

const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Polls `f` every 20 ms until it returns true; panics naming `what` after `timeout`.
#[track_caller]
pub fn wait_until<F: FnMut() -> bool>(what: &str, timeout: Duration, mut f: F) {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// A broadcast of `body` to `topic` ("" for everyone), op 1000.
pub fn request(topic: &str, body: &str) -> BroadCastReq {
    let mut proto = Proto::new();
    proto.set_op(1000);
    proto.set_body(body.as_bytes().to_vec());
    let mut req = BroadCastReq::new();
    req.set_topic(topic.into());
    req.set_proto(proto);
    req
}

/// `push-manager node` as a child process, with the addresses it printed.
pub struct NodeProcess {
    pub child: Child,
    pub grpc: String,
    pub ws_url: String,
}

/// Starts `push-manager serve` on a free loopback port with etcd at `etcd_endpoint`, watching
/// `prefix`, plus `extra` flags and standard error going to `stderr`; returns it with the address
/// it printed.
pub fn spawn_serve(etcd_endpoint: &str, prefix: &str, extra: &[&str], stderr: Stdio) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_push-manager"))
        .args(["serve", "--listen", "127.0.0.1:0", "--etcd", etcd_endpoint, "--prefix", prefix])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("binary starts");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let addr =
        line.trim().strip_prefix("listening ").unwrap_or_else(|| panic!("unexpected first line {line:?}")).to_string();
    let port = addr.rsplit(':').next().unwrap();
    (child, format!("127.0.0.1:{port}"))
}

/// Starts `push-manager node` on free loopback ports, registering as `id` under `prefix`.
pub fn spawn_node(etcd_endpoint: &str, prefix: &str, id: &str, extra: &[&str]) -> NodeProcess {
    let mut child = Command::new(env!("CARGO_BIN_EXE_push-manager"))
        .args(["node", "--grpc-listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0", "--etcd", etcd_endpoint])
        .args(["--prefix", prefix, "--node-id", id, "--log-level", "warn"])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    // "node <id> grpc <addr> ws ws://<addr>/ws"
    let words: Vec<&str> = line.split_whitespace().collect();
    let [_, _, _, grpc, _, ws_url] = words[..] else { panic!("unexpected first line {line:?}") };
    NodeProcess { grpc: grpc.to_string(), ws_url: ws_url.to_string(), child }
}

/// A single-member etcd of the test's own, killed and deleted on drop.
pub struct Etcd(LocalEtcd);

impl Etcd {
    #[track_caller]
    pub fn start() -> Etcd {
        Etcd(LocalEtcd::start().unwrap_or_else(|e| panic!("{e}")))
    }

    /// Kills etcd if it runs and starts it again on the same data dir and ports.
    #[track_caller]
    pub fn restart(&mut self) {
        if let Err(e) = self.0.restart() {
            panic!("etcd did not restart: {e}");
        }
    }
}

impl Deref for Etcd {
    type Target = LocalEtcd;
    fn deref(&self) -> &LocalEtcd {
        &self.0
    }
}

impl DerefMut for Etcd {
    fn deref_mut(&mut self) -> &mut LocalEtcd {
        &mut self.0
    }
}
