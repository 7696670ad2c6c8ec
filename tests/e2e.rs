//! The whole path: business client -> push-manager -> connect-nodes -> WebSocket users, with a
//! real etcd, real grpcio, real WebSocket clients, and the real binary where processes matter.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::gateway::start_gateway;
use common::grpc::{broadcast, push_client, OP};
use common::ws::Client;
use common::{free_addr, wait_until, BIN, PATIENCE};
use push_manager::etcd;
use push_manager::gateway::Gateway;
use push_manager::manager::{self, Manager};
use push_manager::proto::broadcast_request;
use push_manager::registry::{Record, Registration, RegistrationConfig};
use push_manager::testkit::{signal, spawn_node, NodeProcess, Reaped};

const PREFIX: &str = "/e2e/nodes/";

fn start_manager(etcd: &Etcd) -> Manager {
    Manager::start(manager::Config {
        listen: "127.0.0.1:0".into(),
        etcd: etcd::Config {
            endpoints: vec![etcd.endpoint()],
            timeout: Duration::from_secs(1),
            ..etcd::Config::default()
        },
        prefix: PREFIX.into(),
        routine_size: 2,
        // Long: whatever is seen quickly came through the watch.
        poll_interval: Duration::from_secs(60),
        ..manager::Config::default()
    })
    .unwrap()
}

/// An in-process connect-node registered in etcd.
struct Node {
    gateway: Gateway,
    // Held so the node stays registered for as long as the test keeps it.
    _registration: Registration,
}

fn start_node(etcd: &Etcd, id: &str) -> Node {
    let gateway = start_gateway(|_| {});
    let registration = Registration::start(
        etcd.client(),
        RegistrationConfig {
            records: vec![Record::new(format!("{PREFIX}{id}"), gateway.grpc_addr().to_string())],
            ttl: Duration::from_secs(5),
        },
    )
    .unwrap();
    Node { gateway, _registration: registration }
}

fn node_ids(manager: &Manager) -> Vec<String> {
    manager.nodes().into_iter().map(|n| n.id).collect()
}

#[test]
fn topic_broadcasts_reach_exactly_their_subscribers_on_every_node() {
    let etcd = Etcd::start();
    let manager = start_manager(&etcd);
    let nodes = [start_node(&etcd, "n1"), start_node(&etcd, "n2")];
    wait_until("both nodes discovered", PATIENCE, || manager.nodes().len() == 2);
    let addr = |i: usize| nodes[i].gateway.ws_addr();
    let mut a = [Client::connect(addr(0), "/ws?topic=a"), Client::connect(addr(1), "/ws?topic=a")];
    let mut b = [Client::connect(addr(0), "/ws?topic=b"), Client::connect(addr(1), "/ws?topic=b")];
    let mut everyone_only = Client::connect(addr(1), "/ws");
    wait_until("subscriptions in place", PATIENCE, || {
        nodes.iter().map(|n| n.gateway.hub().connections()).sum::<usize>() == 5
    });
    let client = push_client(manager.addr());

    assert_eq!(broadcast(&client, "a", "for-a").get_accepted(), 2);
    for ws in &mut a {
        assert_eq!(ws.next_json()["body"], "for-a");
    }
    // Both nodes have handled for-a, so anything they send a connection after this comes after
    // it: a subscriber of b whose first frame is for-all never got for-a.
    assert_eq!(broadcast(&client, "", "for-all").get_accepted(), 2);
    for ws in &mut a {
        assert_eq!(ws.next_json()["body"], "for-all", "for-a arrived once, then the broadcast to all");
    }
    for ws in b.iter_mut().chain([&mut everyone_only]) {
        let first = ws.next_json();
        assert_eq!(first["body"], "for-all", "a non-subscriber of a got nothing before it");
        assert_eq!(first["topic"], "");
    }
}

#[test]
fn a_node_started_after_push_manager_gets_traffic_through_the_watch() {
    let etcd = Etcd::start();
    let manager = start_manager(&etcd);
    wait_until("first listing", PATIENCE, || manager.listings() >= 1);
    let node = start_node(&etcd, "late");
    // The next poll is a minute away (`start_manager`): found sooner, it came through the watch.
    wait_until("discovered", PATIENCE, || manager.nodes().len() == 1);
    let mut ws = Client::connect(node.gateway.ws_addr(), "/ws");
    wait_until("connected", PATIENCE, || node.gateway.hub().connections() == 1);
    broadcast(&push_client(manager.addr()), "", "hi");
    assert_eq!(ws.next_json()["body"], "hi");
}

#[test]
fn registration_comes_back_after_its_lease_is_revoked_behind_its_back() {
    let etcd = Etcd::start();
    let node = start_node(&etcd, "phoenix");
    let key = format!("{PREFIX}phoenix");
    let first = etcd.client().get(&key).unwrap().expect("registered").lease;
    etcd.client().revoke(first).unwrap();
    wait_until(
        "registered again under a new lease",
        Duration::from_secs(10),
        || matches!(etcd.client().get(&key).unwrap(), Some(kv) if kv.lease != 0 && kv.lease != first),
    );
    drop(node);
}

/// `push-manager node` as a child process with a lease of `lease_ttl`, once `manager` uses it.
#[track_caller]
fn spawn_discovered_node(etcd: &Etcd, manager: &Manager, id: &str, lease_ttl: &str) -> NodeProcess {
    let node = spawn_node(BIN, &etcd.endpoint(), PREFIX, id, &["--lease-ttl", lease_ttl]);
    wait_until("discovered", PATIENCE, || node_ids(manager) == [id]);
    node
}

#[test]
fn a_node_killed_with_sigkill_is_dropped_after_its_lease_ttl() {
    let etcd = Etcd::start();
    let manager = start_manager(&etcd);
    let mut node = spawn_discovered_node(&etcd, &manager, "doomed", "2s");
    signal(&node.child, libc::SIGKILL);
    node.child.wait().unwrap();
    let killed = Instant::now();
    wait_until("dropped once the lease expires", Duration::from_secs(10), || manager.nodes().is_empty());
    assert!(killed.elapsed() >= Duration::from_millis(500), "nothing but the lease could have removed it");
}

#[test]
fn a_node_stopped_with_sigterm_is_dropped_at_once_and_closes_its_clients() {
    let etcd = Etcd::start();
    let manager = start_manager(&etcd);
    let mut node = spawn_discovered_node(&etcd, &manager, "polite", "30s");
    let mut client = Client::connect(node.ws_addr, "/ws");
    signal(&node.child, libc::SIGTERM);
    // With a 30 s lease, only the revocation can remove it this fast.
    wait_until("dropped at once", PATIENCE, || manager.nodes().is_empty());
    let (code, _reason) = client.expect_close();
    assert_eq!(code, 1001);
    assert!(node.child.wait().unwrap().success());
}

#[test]
fn a_second_node_on_a_taken_port_fails_to_start_instead_of_sharing_it() {
    let etcd = Etcd::start();
    let first = start_node(&etcd, "first");
    let taken = first.gateway.grpc_addr().to_string();
    let out = Command::new(BIN)
        .args([
            "node",
            "--grpc-listen",
            &taken,
            "--ws-listen",
            "127.0.0.1:0",
            "--etcd",
            &etcd.endpoint(),
            "--prefix",
            PREFIX,
        ])
        .args(["--node-id", "second"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&taken), "{stderr}");
    assert!(etcd.client().get(&format!("{PREFIX}second")).unwrap().is_none(), "it never registered");
}

#[test]
fn node_refuses_bad_flags_with_a_clear_message() {
    let etcd = Etcd::start();
    let cases: &[(&[&str], &str)] = &[
        (&["--lease-ttl", "0s"], "--lease-ttl"),
        (&["--node-id", "a/b"], "--node-id"),
        (&["--advertise", "nonsense"], "--advertise"),
        (&["--ws-listen", "127.0.0.1:notaport"], "127.0.0.1:notaport"),
        (&["--max-loop-backlog", "0"], "--max-loop-backlog"),
    ];
    for (args, needle) in cases {
        let mut argv: Vec<String> =
            ["node", "--grpc-listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0", "--prefix", PREFIX]
                .iter()
                .map(|s| s.to_string())
                .collect();
        argv.extend(["--etcd".to_string(), etcd.endpoint()]);
        // A flag under test replaces its default above.
        if let Some(i) = argv.iter().position(|a| a == args[0]) {
            argv[i + 1] = args[1].to_string();
        } else {
            argv.extend(args.iter().map(|s| s.to_string()));
        }
        let out = Command::new(BIN).args(&argv).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr:?} should mention {needle:?}");
    }
    assert!(etcd.client().get_prefix(PREFIX).unwrap().kvs.is_empty(), "no failed start left a registration behind");
}

#[test]
fn the_demo_runs_to_completion_and_shows_its_deliveries() {
    let stdout = run_demo(None);
    assert!(stdout.contains("etcd: a real etcd process"), "{stdout}");
    assert_demo_deliveries(&stdout);
}

#[test]
fn without_etcd_on_path_the_demo_runs_on_the_in_process_registry_and_says_so() {
    let stdout = run_demo(Some("/nonexistent"));
    assert!(stdout.contains("no etcd binary on PATH"), "{stdout}");
    assert!(stdout.contains("using the in-process registry"), "{stdout}");
    assert_demo_deliveries(&stdout);
}

fn run_demo(path: Option<&str>) -> String {
    let mut demo = Command::new(BIN);
    demo.arg("demo");
    if let Some(p) = path {
        demo.env("PATH", p);
    }
    let out = demo.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[track_caller]
fn assert_demo_deliveries(stdout: &str) {
    for line in [
        "alice  got it through node-1",
        "carol  got it through node-3",
        "bob    got it through node-2",
        "dave   got it through node-1",
        "its token: sub \"carol\", granting [\"sports\", \"news\"]",
        "private message #4 to user \"bob\" (PushUsers)",
        "bob    got it through node-2: {\"type\":\"direct\"",
        "push-manager: dropped node-3",
        "carol  was closed by node-3: 1001",
        "targeted 2 node(s), accepted by 2",
        "demo complete",
    ] {
        assert!(stdout.contains(line), "demo output lacks {line:?}:\n{stdout}");
    }
}

#[test]
fn subscribe_prints_each_delivery_as_it_arrives() {
    let etcd = Etcd::start();
    let node = start_node(&etcd, "sub");
    let url = format!("ws://{}/ws", node.gateway.ws_addr());
    let mut child = Reaped::spawn(
        Command::new(BIN)
            .args(["subscribe", "--url", &url, "--topic", "news", "--count", "2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let mut line = String::new();
    BufReader::new(child.stderr.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("connected to"), "{line:?}");
    wait_until("subscribed", PATIENCE, || node.gateway.hub().connections() == 1);
    node.gateway.hub().publish(&broadcast_request("sports", OP, 0, "not for news readers"));
    node.gateway.hub().publish(&broadcast_request("news", OP, 0, "first"));
    node.gateway.hub().publish(&broadcast_request("", OP, 0, "second"));
    let out = child.output_within(Duration::from_secs(10));
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deliveries: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["type"] == "message")
        .collect();
    let bodies: Vec<&str> = deliveries.iter().map(|v| v["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, ["first", "second"], "{stdout}");
}

#[test]
fn subscribe_exits_zero_quietly_when_its_reader_closes_the_pipe() {
    let etcd = Etcd::start();
    let node = start_node(&etcd, "pipe");
    let url = format!("ws://{}/ws", node.gateway.ws_addr());
    // As `push-manager subscribe ... | head -1`: read one line, then close the pipe.
    let mut child = Reaped::spawn(
        Command::new(BIN)
            .args(["subscribe", "--url", &url, "--topic", "news"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let mut line = String::new();
    BufReader::new(child.stderr.as_mut().unwrap()).read_line(&mut line).unwrap();
    wait_until("subscribed", PATIENCE, || node.gateway.hub().connections() == 1);
    node.gateway.hub().publish(&broadcast_request("news", OP, 0, "first"));
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.contains("\"first\""), "{first:?}");
    // The reader is gone; the next delivery is written into a closed pipe.
    let mut status = None;
    wait_until("subscribe exits", Duration::from_secs(10), || {
        node.gateway.hub().publish(&broadcast_request("news", OP, 0, "more"));
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.unwrap().success(), "a closed pipe is not a failure: {stderr}");
    assert!(!stderr.contains("push-manager:"), "nothing to report: {stderr}");
}

#[test]
fn subscribe_to_a_dead_url_exits_non_zero_with_the_reason() {
    let out = Command::new(BIN).args(["subscribe", "--url", &format!("ws://{}/ws", free_addr())]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Connection refused"), "{out:?}");
    for bad in ["nonsense", "http://127.0.0.1:1/ws", "ws://", "wss://"] {
        let out = Command::new(BIN).args(["subscribe", "--url", bad]).output().unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("is not a ws:// URL"), "{bad}: {out:?}");
    }
}

#[test]
fn nodes_lists_registered_nodes_with_their_lease_and_flags_bad_records() {
    let etcd = Etcd::start();
    let node = start_node(&etcd, "leased");
    etcd.client().put(&format!("{PREFIX}static"), b"10.0.0.9:50061", None).unwrap();
    etcd.client().put(&format!("{PREFIX}broken"), b"not an address", None).unwrap();
    let out = Command::new(BIN).args(["nodes", "--etcd", &etcd.endpoint(), "--prefix", PREFIX]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line =
        |id: &str| stdout.lines().find(|l| l.contains(id)).unwrap_or_else(|| panic!("no {id} in {stdout}")).to_string();
    let leased = line("leased");
    assert!(leased.contains(&node.gateway.grpc_addr().to_string()), "{leased}");
    let ttl: u64 = leased.split_whitespace().last().unwrap().trim_end_matches('s').parse().expect("a TTL in seconds");
    assert!((1..=5).contains(&ttl), "{leased}");
    assert!(line("static").contains("no lease"));
    assert!(line("broken").contains("not host:port"));
}

#[test]
fn nodes_with_etcd_down_fails_with_a_clear_error() {
    let out = Command::new(BIN).args(["nodes", "--etcd", &free_addr(), "--etcd-timeout", "300ms"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("etcd"), "{out:?}");
}

#[test]
fn a_node_registers_again_after_an_etcd_outage_longer_than_its_lease() {
    let mut etcd = Etcd::start();
    let gateway = start_gateway(|_| {});
    let key = format!("{PREFIX}survivor");
    let ttl = Duration::from_secs(2);
    let _registration = Registration::start(
        etcd::Client::connect(etcd::Config {
            endpoints: vec![etcd.endpoint()],
            timeout: Duration::from_millis(500),
            ..etcd::Config::default()
        })
        .unwrap(),
        RegistrationConfig { records: vec![Record::new(key.clone(), gateway.grpc_addr().to_string())], ttl },
    )
    .unwrap();
    let first = etcd.client().get(&key).unwrap().expect("registered").lease;

    etcd.kill();
    // The scenario is an outage longer than the TTL, so this sleep is the outage itself, not a
    // wait for readiness: past the TTL the keep-alive gives the lease up, and registering again
    // fails and is retried with backoff until etcd is back.
    std::thread::sleep(ttl * 2);
    etcd.restart();
    wait_until(
        "registered under a new lease",
        Duration::from_secs(15),
        || matches!(etcd.client().get(&key), Ok(Some(kv)) if kv.lease != first && kv.lease != 0),
    );
    let manager = start_manager(&etcd);
    wait_until("push-manager finds it", PATIENCE, || node_ids(&manager) == ["survivor"]);
}
