//! The admin endpoint and gRPC health of real `serve` and `node` processes: metrics read with a
//! Prometheus parser we did not write (`prometheus-parse`) and moving as the traffic says,
//! readiness before the first listing and during a drain, NOT_SERVING within 100 ms of SIGTERM,
//! `status`, and bad `--admin-listen` values refused by name.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::grpc::{node_client, push_client};
use common::process::Process;
use common::ws::Client;
use common::{free_addr, wait_until, PATIENCE};
use futures::executor::block_on;
use futures::StreamExt;
use grpcio::{CallOption, ChannelBuilder, EnvBuilder, RpcStatusCode};
use grpcio_health::proto::HealthCheckRequest;
use grpcio_health::{HealthClient, ServingStatus};
use prometheus_parse::{Scrape, Value};
use push_manager::admin;
use push_manager::proto::broadcast_request;
use push_manager::registry;

const PREFIX: &str = "/admin-test/nodes/";
const OP: i32 = 7;

/// `push-manager node` with its admin endpoint on a free port; returns it with its gRPC and
/// WebSocket addresses and its admin URL.
fn start_node(etcd: &Etcd, id: &str, extra: &[&str]) -> (Process, String, std::net::SocketAddr, String) {
    let mut args = vec!["node", "--grpc-listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0", "--node-id", id];
    args.extend(["--admin-listen", "127.0.0.1:0", "--prefix", PREFIX, "--log-level", "warn"]);
    let endpoint = etcd.endpoint();
    args.extend(["--etcd", endpoint.as_str()]);
    args.extend(extra);
    let mut node = Process::start(&args, &[]);
    let line = node.line_after(&format!("node {id} grpc "));
    let words: Vec<&str> = line.split_whitespace().collect();
    let [grpc, "ws", ws_url] = words[..] else { panic!("unexpected line {line:?}") };
    let ws_addr = ws_url.trim_start_matches("ws://").trim_end_matches("/ws").parse().unwrap();
    let admin = node.line_after("admin ");
    (node, grpc.to_string(), ws_addr, admin)
}

/// `push-manager serve` with its admin endpoint on a free port; returns it with its gRPC
/// address and admin URL.
fn start_serve(etcd_endpoint: &str, extra: &[&str]) -> (Process, String, String) {
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--prefix", PREFIX];
    args.extend(["--etcd", etcd_endpoint]);
    args.extend(extra);
    let mut serve = Process::start(&args, &[]);
    let addr = serve.line_after("listening ");
    let admin = serve.line_after("admin ");
    (serve, addr, admin)
}

#[track_caller]
fn get(url: &str) -> admin::Response {
    admin::get(url, PATIENCE).unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// `/metrics`, parsed; every family it holds must be typed (counter, gauge or histogram).
#[track_caller]
fn scrape(admin: &str) -> Scrape {
    let response = get(&format!("{admin}/metrics"));
    assert_eq!(response.status, 200, "{}", response.body);
    let scrape = Scrape::parse(response.body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text");
    let untyped: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| {
            matches!(s.value, Value::Untyped(_)) && !s.metric.ends_with("_sum") && !s.metric.ends_with("_count")
        })
        .map(|s| s.metric.clone())
        .collect();
    assert!(untyped.is_empty(), "samples without a TYPE: {untyped:?}\n{}", response.body);
    scrape
}

/// The value of the one sample of `metric` carrying `labels` (a histogram's count).
#[track_caller]
fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets.iter().map(|b| b.count).fold(0.0, f64::max),
            Value::Summary(_) => panic!("{metric} is a summary"),
        })
        .collect();
    assert_eq!(found.len(), 1, "{metric}{labels:?}: {found:?}");
    found[0]
}

#[track_caller]
fn assert_kind(scrape: &Scrape, metric: &str, kind: fn(&Value) -> bool) {
    let sample = scrape.samples.iter().find(|s| s.metric == metric).unwrap_or_else(|| panic!("no {metric}"));
    assert!(kind(&sample.value), "{metric} is {:?}", sample.value);
}

fn counter(v: &Value) -> bool {
    matches!(v, Value::Counter(_))
}
fn gauge(v: &Value) -> bool {
    matches!(v, Value::Gauge(_))
}
fn histogram(v: &Value) -> bool {
    matches!(v, Value::Histogram(_))
}

#[test]
fn metrics_of_serve_and_two_nodes_move_with_the_traffic() {
    let etcd = Etcd::start();
    // Node a closes slow consumers early: a small buffer.
    let (_a, _, ws_a, admin_a) = start_node(&etcd, "a", &["--max-out-buffer", "65536"]);
    let (_b, _, ws_b, admin_b) = start_node(&etcd, "b", &[]);
    let (_serve, addr, admin_s) = start_serve(&etcd.endpoint(), &[]);
    wait_until("serve is ready with both nodes", PATIENCE, || {
        get(&format!("{admin_s}/readyz")).status == 200
            && value(&scrape(&admin_s), "push_manager_nodes_known", &[]) == 2.0
    });
    let mut users = [Client::subscribed(ws_a, &["t"]), Client::subscribed(ws_b, &["t"])];

    let before = [scrape(&admin_s), scrape(&admin_a), scrape(&admin_b)];
    const N: usize = 5;
    let push = push_client(&addr);
    for i in 0..N {
        let reply = push.broadcast(&broadcast_request("t", OP, i as i32, format!("m{i}").as_bytes())).unwrap();
        assert_eq!(reply.get_accepted(), 2, "{reply:?}");
    }
    let mut frame_bytes = 0;
    for user in &mut users {
        for i in 0..N {
            let frame = user.next_json();
            assert_eq!(frame["seq"], i as i64);
            frame_bytes += frame.to_string().len();
        }
    }
    // A refused broadcast is counted by its result too.
    let refused = push.broadcast(&broadcast_request("bad topic", OP, 0, "x")).unwrap_err();
    assert!(refused.to_string().contains("INVALID_ARGUMENT"), "{refused}");
    let sent = |s: &Scrape, node| value(s, "push_manager_sent_total", &[("node", node), ("state", "active")]);
    wait_until("serve counts every message sent to each node", PATIENCE, || {
        let now = scrape(&admin_s);
        sent(&now, "a") == sent(&before[0], "a") + N as f64 && sent(&now, "b") == sent(&before[0], "b") + N as f64
    });

    let s = scrape(&admin_s);
    for metric in [
        "push_manager_enqueued_total",
        "push_manager_sent_total",
        "push_manager_failed_total",
        "push_manager_abandoned_total",
        "push_manager_retried_total",
        "push_manager_rpcs_total",
        "push_manager_dropped_total",
        "push_manager_discovery_listings_total",
    ] {
        assert_kind(&s, metric, counter);
    }
    for metric in [
        "push_manager_build_info",
        "push_manager_nodes_known",
        "push_manager_nodes_retiring",
        "push_manager_etcd_reachable",
        "push_manager_draining",
        "push_manager_queue_depth",
    ] {
        assert_kind(&s, metric, gauge);
    }
    assert_kind(&s, "push_manager_discovery_watch_restarts_total", counter);
    for metric in ["push_manager_messages_per_rpc", "push_manager_rpc_latency_seconds"] {
        assert_kind(&s, metric, histogram);
    }
    for node in ["a", "b"] {
        let labels = [("node", node), ("state", "active")];
        let enqueued = |s: &Scrape| value(s, "push_manager_enqueued_total", &labels);
        assert_eq!(enqueued(&s) - enqueued(&before[0]), N as f64, "node {node}");
        let rpcs = value(&s, "push_manager_rpcs_total", &labels);
        assert!(rpcs >= 1.0, "node {node}: {rpcs} RPCs");
        assert_eq!(value(&s, "push_manager_rpc_latency_seconds_count", &labels), rpcs, "one latency per RPC");
        assert_eq!(value(&s, "push_manager_messages_per_rpc_sum", &labels), sent(&s, node), "messages per RPC");
        assert_eq!(value(&s, "push_manager_dropped_total", &[("node", node), ("reason", "full")]), 0.0);
    }
    let result = |s: &Scrape, r| value(s, "push_manager_broadcasts_total", &[("result", r)]);
    assert_kind(&s, "push_manager_broadcasts_total", counter);
    assert_eq!(result(&s, "ok") - result(&before[0], "ok"), N as f64);
    assert_eq!(result(&s, "invalid") - result(&before[0], "invalid"), 1.0);
    assert_eq!(result(&s, "unauthenticated"), 0.0);
    assert_eq!(result(&s, "no_nodes"), 0.0);
    assert_eq!(value(&s, "push_manager_etcd_reachable", &[]), 1.0);
    assert!(value(&s, "push_manager_discovery_listings_total", &[]) >= 1.0);

    for (admin, before) in [(&admin_a, &before[1]), (&admin_b, &before[2])] {
        let n = scrape(admin);
        let received = |s: &Scrape| value(s, "push_manager_node_messages_received_total", &[("kind", "broadcast")]);
        assert_eq!(received(&n) - received(before), N as f64, "{admin}");
        let frames = |s: &Scrape| value(s, "push_manager_node_frames_sent_total", &[]);
        assert_eq!(frames(&n) - frames(before), N as f64, "{admin}: one frame per message to its one user");
        // Each frame's JSON, plus its WebSocket header; at least one write for them.
        let bytes = |s: &Scrape| value(s, "push_manager_node_bytes_sent_total", &[]);
        assert!(bytes(&n) - bytes(before) >= (frame_bytes / 2) as f64, "{admin}: {}", bytes(&n) - bytes(before));
        let writes = |s: &Scrape| value(s, "push_manager_node_socket_writes_total", &[]);
        assert!(writes(&n) - writes(before) >= 1.0, "{admin}");
        // One latency per broadcast that reached a connection: the user's loop writes each.
        let latencies = |s: &Scrape| value(s, "push_manager_node_delivery_latency_seconds_count", &[]);
        wait_until("the node observes each delivery's latency", PATIENCE, || {
            latencies(&scrape(admin)) - latencies(before) == N as f64
        });
        assert_eq!(value(&n, "push_manager_node_connections_open", &[]), 1.0);
        assert_eq!(value(&n, "push_manager_node_subscriptions", &[]), 1.0);
        assert_eq!(value(&n, "push_manager_node_topics", &[]), 1.0);
        assert_eq!(value(&n, "push_manager_node_registered", &[]), 1.0);
        assert_eq!(value(&n, "push_manager_node_registrations_total", &[]), 1.0);
        let streams = value(&n, "push_manager_node_batch_streams_open", &[]);
        assert!(streams >= 1.0, "{admin}: push-manager sends over streams ({streams} open)");
        assert!(value(&n, "push_manager_node_batch_streams_opened_total", &[]) >= streams, "{admin}");
        for metric in [
            "push_manager_node_batch_streams_opened_total",
            "push_manager_node_connections_accepted_total",
            "push_manager_node_connections_refused_total",
            "push_manager_node_connections_closed_total",
            "push_manager_node_broadcasts_refused_busy_total",
            "push_manager_node_sequenced_total",
            "push_manager_node_bytes_sent_total",
            "push_manager_node_socket_writes_total",
        ] {
            assert_kind(&n, metric, counter);
        }
        assert_kind(&n, "push_manager_node_delivery_latency_seconds", histogram);
        for metric in [
            "push_manager_node_loop_backlog",
            "push_manager_node_loop_backlog_bytes",
            "push_manager_node_held_messages",
            "push_manager_node_batch_streams_open",
        ] {
            assert_kind(&n, metric, gauge);
        }
    }

    // A user of node a who never reads: closed as a slow consumer, and counted so.
    let slow = Client::subscribed(ws_a, &["big"]);
    let body = vec![b'x'; 64 << 10];
    let closed_slow =
        |s: &Scrape| value(s, "push_manager_node_connections_closed_total", &[("reason", "slow_consumer")]);
    assert_eq!(closed_slow(&scrape(&admin_a)), 0.0);
    let mut seq = 0;
    wait_until("node a closes the slow consumer", PATIENCE, || {
        for _ in 0..20 {
            push.broadcast(&broadcast_request("big", OP, seq, body.as_slice())).unwrap();
            seq += 1;
        }
        closed_slow(&scrape(&admin_a)) == 1.0
    });
    drop(slow);
    assert_eq!(closed_slow(&scrape(&admin_b)), 0.0, "node b has no slow consumer");

    // `/nodes` lists both with their counters, as JSON.
    let nodes: serde_json::Value = serde_json::from_str(&get(&format!("{admin_s}/nodes")).body).unwrap();
    let ids: Vec<_> =
        nodes["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["a", "b"], "{nodes}");
    assert!(nodes["nodes"][1]["sent"].as_u64().unwrap() >= N as u64, "{nodes}");
    assert_eq!(nodes["nodes"][0]["state"], "active");
    assert_eq!(get(&format!("{admin_a}/nodes")).status, 404, "a node has no node set");
    assert_eq!(get(&format!("{admin_s}/nope")).status, 404);

    // `status` summarizes both roles.
    let status = |admin: &str| {
        let out = std::process::Command::new(common::BIN)
            .args(["status", "--admin", admin, "--interval", "200ms"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let serve_status = status(&admin_s);
    assert!(serve_status.starts_with("push-manager serve"), "{serve_status}");
    assert!(serve_status.contains("ready:   yes") && serve_status.contains("nodes known 2"), "{serve_status}");
    let table: Vec<_> = serve_status.lines().skip_while(|l| !l.starts_with("NODE")).skip(1).collect();
    assert_eq!(table.len(), 2, "{serve_status}");
    assert!(table[0].starts_with("a ") && table[1].starts_with("b "), "{serve_status}");
    let node_status = status(&admin_a);
    assert!(node_status.starts_with("connect-node"), "{node_status}");
    assert!(node_status.contains("registered in etcd: yes"), "{node_status}");
    assert!(node_status.contains("slow_consumer 1"), "{node_status}");
}

/// A Health client of the gRPC server at `addr`.
fn health_client(addr: &str) -> HealthClient {
    let env = std::sync::Arc::new(EnvBuilder::new().cq_count(1).name_prefix("test-health").build());
    HealthClient::new(ChannelBuilder::new(env).connect(addr))
}

fn check(client: &HealthClient, service: &str) -> grpcio::Result<ServingStatus> {
    let mut req = HealthCheckRequest::default();
    req.set_service(service.into());
    client.check_opt(&req, CallOption::default().timeout(PATIENCE)).map(|r| r.get_status())
}

#[test]
fn a_node_says_not_serving_within_100ms_of_sigterm_while_it_still_drains() {
    let etcd = Etcd::start();
    let (mut node, grpc, _, admin) = start_node(&etcd, "draining", &["--shutdown-grace", "30s"]);
    wait_until("the node is ready", PATIENCE, || get(&format!("{admin}/readyz")).status == 200);
    assert_eq!(get(&format!("{admin}/healthz")).status, 200);
    let health = health_client(&grpc);
    assert_eq!(check(&health, "").unwrap(), ServingStatus::Serving);
    assert_eq!(check(&health, "protocol.ConnectNode").unwrap(), ServingStatus::Serving);
    let unknown = check(&health, "no.Such").unwrap_err();
    assert!(matches!(&unknown, grpcio::Error::RpcFailure(s) if s.code() == RpcStatusCode::NOT_FOUND), "{unknown:?}");

    let mut req = HealthCheckRequest::default();
    req.set_service(String::new());
    let mut watch = health.watch_opt(&req, CallOption::default().timeout(PATIENCE)).unwrap();
    let first = block_on(watch.next()).expect("a first status").unwrap();
    assert_eq!(first.get_status(), ServingStatus::Serving);

    // Stands in for a push-manager that goes on sending: the node keeps draining meanwhile.
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    let sender_addr = grpc.clone();
    let sender = std::thread::spawn(move || {
        let node = node_client(&sender_addr);
        let mut seq = 0;
        while stop_rx.recv_timeout(Duration::from_millis(50)) == Err(crossbeam_channel::RecvTimeoutError::Timeout) {
            let _ = node.broadcast(&broadcast_request("t", OP, seq, b"x"));
            seq += 1;
        }
    });

    let sigterm = Instant::now();
    push_manager::testkit::signal(&node.child, libc::SIGTERM);
    let next = block_on(watch.next()).expect("a status after SIGTERM").unwrap();
    let elapsed = sigterm.elapsed();
    assert_eq!(next.get_status(), ServingStatus::NotServing);
    assert!(elapsed < Duration::from_millis(100), "NOT_SERVING came {elapsed:?} after SIGTERM");
    drop(watch);

    // Still draining: the gRPC port answers, readiness says why not.
    assert!(node.child.try_wait().unwrap().is_none(), "the node is still draining");
    assert_eq!(check(&health, "protocol.ConnectNode").unwrap(), ServingStatus::NotServing);
    let ready = get(&format!("{admin}/readyz"));
    assert_eq!(ready.status, 503);
    assert!(ready.body.contains("draining"), "{}", ready.body);
    assert_eq!(value(&scrape(&admin), "push_manager_node_draining", &[]), 1.0);

    drop(stop_tx);
    sender.join().unwrap();

    assert!(node.stop().success(), "{}", node.output());
}

#[test]
fn serve_is_not_ready_before_its_first_listing_nor_while_it_drains() {
    // etcd unreachable: never listed, so never ready, though healthy and SERVING.
    let (mut lonely, lonely_addr, lonely_admin) = start_serve(&free_addr(), &["--etcd-timeout", "200ms"]);
    let ready = get(&format!("{lonely_admin}/readyz"));
    assert_eq!(ready.status, 503);
    assert!(ready.body.contains("not been listed"), "{}", ready.body);
    assert_eq!(get(&format!("{lonely_admin}/healthz")).status, 200);
    assert_eq!(check(&health_client(&lonely_addr), "protocol.PushServer").unwrap(), ServingStatus::Serving);
    assert!(lonely.stop().success());

    // A node whose RPCs hang (its port accepts and never answers) keeps serve's queue full, so
    // the drain lasts until --drain-timeout.
    let etcd = Etcd::start();
    let black_hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let hole = black_hole.local_addr().unwrap().to_string();
    etcd.client().put(&registry::key(PREFIX, "stuck"), hole.as_bytes(), None).unwrap();
    let extra = ["--drain-timeout", "5s", "--rpc-timeout", "5s", "--max-attempts", "1"];
    let (mut serve, addr, admin) = start_serve(&etcd.endpoint(), &extra);
    wait_until("serve is ready", PATIENCE, || get(&format!("{admin}/readyz")).status == 200);
    let push = push_client(&addr);
    for i in 0..3 {
        push.broadcast(&broadcast_request("t", OP, i, b"queued")).unwrap();
    }
    let sigterm = Instant::now();
    push_manager::testkit::signal(&serve.child, libc::SIGTERM);
    wait_until("serve reports draining", Duration::from_millis(100), || {
        let ready = get(&format!("{admin}/readyz"));
        ready.status == 503 && ready.body.contains("draining")
    });
    assert!(sigterm.elapsed() < Duration::from_millis(100), "{:?}", sigterm.elapsed());
    assert!(serve.child.try_wait().unwrap().is_none(), "serve is still draining its queue");
    let nodes: serde_json::Value = serde_json::from_str(&get(&format!("{admin}/nodes")).body).unwrap();
    assert_eq!(nodes["draining"], true, "{nodes}");
    assert!(serve.stop().success(), "{}", serve.output());
}

#[test]
fn bad_admin_listen_values_are_refused_by_name_and_off_runs_without_one() {
    for role in ["serve", "node"] {
        let out = std::process::Command::new(common::BIN).args([role, "--admin-listen", "nowhere"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("--admin-listen") && stderr.contains("nowhere") && stderr.contains("off"), "{stderr}");
    }

    // A port that is taken, given explicitly: a clear error, and the process exits.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    let args = ["serve", "--listen", "127.0.0.1:0", "--etcd", &endpoint, "--admin-listen", &taken];
    let mut refused = Process::start(&args, &[]);
    assert!(!refused.wait().success());
    let output = refused.output();
    assert!(output.contains(&format!("--admin-listen {taken}: cannot listen there")), "{output}");

    // `off`: no endpoint, and serve runs as before.
    let args = ["serve", "--listen", "127.0.0.1:0", "--etcd", &endpoint, "--admin-listen", "off"];
    let mut quiet = Process::start(&args, &[]);
    let addr = quiet.line_after("listening ");
    assert_eq!(check(&health_client(&addr), "").unwrap(), ServingStatus::Serving);
    assert!(!quiet.output().contains("admin http"), "{}", quiet.output());
    assert!(quiet.stop().success());

    // `status` against nothing says so.
    let out = std::process::Command::new(common::BIN)
        .args(["status", "--admin", &format!("http://{}", free_addr())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn serve_counts_each_restart_of_its_etcd_watch() {
    let mut etcd = Etcd::start();
    let (_serve, _, admin) = start_serve(&etcd.endpoint(), &["--etcd-timeout", "500ms"]);
    let restarts = || value(&scrape(&admin), "push_manager_discovery_watch_restarts_total", &[]);
    wait_until("the first listing", PATIENCE, || {
        value(&scrape(&admin), "push_manager_discovery_listings_total", &[]) >= 1.0
    });
    assert_eq!(restarts(), 0.0, "a watch that holds is never restarted");
    etcd.restart();
    wait_until("the broken watch is counted", PATIENCE, || restarts() >= 1.0);
    // And it works again: a node registered now is known without waiting for the 3 s poll.
    let sink = push_manager::testkit::Sink::start();
    etcd.client().put(&registry::key(PREFIX, "after"), sink.addr.as_bytes(), None).unwrap();
    wait_until("the node appears", PATIENCE, || value(&scrape(&admin), "push_manager_nodes_known", &[]) == 1.0);
}
