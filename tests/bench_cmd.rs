//! `push-manager bench` against a real small deployment: etcd, `serve` and one `node`, each the
//! real binary in a process of its own. Every message reaches every subscriber once and in order;
//! bad flags and unreachable addresses give clear errors, quickly.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::{assert_fails_with, free_addr, wait_until, BIN, PATIENCE};
use push_manager::testkit::{spawn_node, spawn_serve, NodeProcess, Reaped};

const PREFIX: &str = "/bench-test/nodes/";
const KEY: &str = "0123456789abcdef0123456789abcdef-bench";

/// etcd, `serve` and one `node` (with `node_flags`), killed on drop.
struct Deployment {
    _etcd: Etcd,
    _serve: Reaped,
    node: NodeProcess,
    server: String,
}

impl Deployment {
    fn start(node_flags: &[&str]) -> Deployment {
        let etcd = Etcd::start();
        let node = spawn_node(BIN, &etcd.endpoint(), PREFIX, "n1", node_flags);
        let (serve, server) = spawn_serve(BIN, &etcd.endpoint(), PREFIX, &["--log-level", "warn"], Stdio::inherit());
        wait_until("serve finds the node", PATIENCE, || {
            let out =
                Command::new(BIN).args(["send", "--server", &server, "--timeout", "2s", "probe"]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).contains("accepted by 1")
        });
        Deployment { _etcd: etcd, _serve: serve, node, server }
    }

    fn ws(&self) -> String {
        format!("ws://{}/ws", self.node.ws_addr)
    }

    fn etcd_endpoint(&self) -> String {
        self._etcd.endpoint()
    }
}

/// Runs `push-manager bench` with `args`; returns its output and how long it took.
fn bench(args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let out = Command::new(BIN).arg("bench").args(args).output().unwrap();
    (out, started.elapsed())
}

#[track_caller]
fn assert_clean_run(out: &Output, deliveries: u64) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains(&format!("delivered:  {deliveries} in")), "{stdout}");
    assert!(stdout.contains("lost 0, duplicated 0, out of order 0"), "{stdout}");
    assert!(stdout.contains("0 failed, 0 node deliveries dropped"), "{stdout}");
    assert!(stdout.contains("latency:    p50 "), "{stdout}");
}

#[test]
fn every_message_reaches_every_subscriber_once_and_in_order() {
    let d = Deployment::start(&[]);
    let ws = d.ws();
    let (flat_out, _) = bench(&["--server", &d.server, "--ws", &ws, "--subscribers", "20", "--messages", "200"]);
    assert_clean_run(&flat_out, 20 * 200);
    assert!(String::from_utf8_lossy(&flat_out.stdout).contains("20 subscribers, 128 B messages, flat out"));

    // One call at a time and a fixed rate: every message is ordered after the one before it.
    let args = ["--server", &d.server, "--ws", &ws, "--subscribers", "20", "--messages", "200", "--rate", "400"];
    let (paced, took) = bench(&[&args[..], &["--in-flight", "1", "--size", "1000"]].concat());
    assert_clean_run(&paced, 20 * 200);
    assert!(String::from_utf8_lossy(&paced.stdout).contains("1000 B messages, at 400 msgs/s"));
    assert!(took >= Duration::from_millis(490), "200 messages at 400/s take half a second, not {took:?}");

    // Over one BroadcastStream call: flat out in elements, and one message per element at a rate.
    let streamed = ["--server", &d.server, "--ws", &ws, "--subscribers", "20", "--messages", "1000", "--stream"];
    assert_clean_run(&bench(&streamed).0, 20 * 1000);
    assert_clean_run(&bench(&[&streamed[..], &["--rate", "2000", "--in-flight", "1"]].concat()).0, 20 * 1000);
}

#[test]
fn a_stream_refused_for_its_api_key_fails_the_run_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, format!("{KEY}\n")).unwrap();
    let etcd = Etcd::start();
    let node = spawn_node(BIN, &etcd.endpoint(), PREFIX, "n1", &[]);
    let key_flag = keys.to_str().unwrap();
    let (_serve, server) = spawn_serve(BIN, &etcd.endpoint(), PREFIX, &["--api-key-file", key_flag], Stdio::inherit());
    let ws = format!("ws://{}/ws", node.ws_addr);
    let base = ["--server", &server, "--ws", &ws, "--subscribers", "2", "--messages", "10", "--stream", "--quiet"];
    let (refused, took) = bench(&base);
    assert_fails_with(&refused, "UNAUTHENTICATED");
    assert!(took < Duration::from_secs(8), "{took:?}");
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-key-at-all-but-long-enough-000\n").unwrap();
    assert_fails_with(&bench(&[&base[..], &["--api-key-file", wrong.to_str().unwrap()]].concat()).0, "UNAUTHENTICATED");
    wait_until("serve finds the node", PATIENCE, || {
        let out = Command::new(BIN)
            .args(["send", "--server", &server, "--api-key-file", key_flag, "--timeout", "2s", "probe"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("accepted by 1")
    });
    assert_clean_run(&bench(&[&base[..], &["--api-key-file", key_flag]].concat()).0, 2 * 10);
}

#[test]
fn signs_a_token_per_subscriber_for_nodes_that_require_one() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("{KEY}\n")).unwrap();
    let key_flag = keys.to_str().unwrap();
    let d = Deployment::start(&["--ws-auth", "required", "--token-key-file", key_flag]);
    let ws = d.ws();
    let base = ["--server", &d.server, "--ws", &ws, "--subscribers", "5", "--messages", "20", "--quiet"];

    let (without, took) = bench(&[&base[..], &["--timeout", "3s"]].concat());
    assert_fails_with(&without, "of 5 subscribers were subscribed");
    assert!(took < Duration::from_secs(8), "{took:?}");

    let (signed, _) = bench(&[&base[..], &["--token-key-file", key_flag]].concat());
    assert_clean_run(&signed, 5 * 20);
}

#[test]
fn bad_flags_are_refused_by_name_and_a_good_run_follows() {
    let d = Deployment::start(&[]);
    let ws = d.ws();
    // A small run, with `extra` flags replacing or adding to it.
    let with = |extra: &[&str]| {
        let mut args = vec!["--server", &d.server, "--ws", &ws];
        for (flag, value) in [("--subscribers", "3"), ("--messages", "10")] {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        bench(&[&args[..], extra].concat()).0
    };

    assert_fails_with(&with(&["--size", "10"]), "--size 10 is out of range");
    assert_fails_with(&with(&["--subscribers", "0"]), "--subscribers must be at least 1");
    assert_fails_with(&with(&["--messages", "0"]), "--messages must be at least 1");
    assert_fails_with(&with(&["--in-flight", "0"]), "--in-flight must be at least 1");
    assert_fails_with(&with(&["--topic", "a b"]), "--topic \"a b\"");
    assert_fails_with(&with(&["--rate", "fast"]), "--rate");
    assert_fails_with(&with(&["--token", "t", "--token-key-file", "/nonexistent"]), "cannot be used with");
    assert_fails_with(&with(&["--token-key-file", "/nonexistent/keys"]), "--token-key-file /nonexistent/keys");
    assert_fails_with(&bench(&["--server", &d.server, "--ws", "http://127.0.0.1:1/ws"]).0, "is not a ws:// URL");
    assert_fails_with(&bench(&["--server", &d.server]).0, "give the nodes' WebSocket URLs with --ws");
    // A node that published no WebSocket URL (registered by another program): the error says
    // --ws is needed, naming the node.
    let etcd = d.etcd_endpoint();
    let legacy = format!("{PREFIX}legacy");
    d._etcd.client().put(&legacy, b"127.0.0.1:1", None).unwrap();
    let out = bench(&["--server", &d.server, "--etcd", &etcd, "--prefix", PREFIX]).0;
    d._etcd.client().delete(&legacy).unwrap();
    assert_fails_with(&out, "legacy (127.0.0.1:1) under \"/bench-test/nodes/\" without a WebSocket URL");

    assert_clean_run(&with(&[]), 3 * 10);
}

#[test]
fn unreachable_addresses_fail_clearly_and_quickly() {
    let d = Deployment::start(&[]);
    let ws = d.ws();
    let nowhere = free_addr();
    let (no_server, took) = bench(&["--server", &nowhere, "--ws", &ws, "--timeout", "2s"]);
    assert_fails_with(&no_server, &format!("cannot connect to push-manager at {nowhere} within 2s"));
    assert!(took < Duration::from_secs(6), "{took:?}");

    let no_node = format!("ws://{}/ws", free_addr());
    let (out, took) = bench(&["--server", &d.server, "--ws", &no_node, "--timeout", "2s"]);
    assert_fails_with(&out, &format!("cannot connect to {no_node}"));
    assert!(took < Duration::from_secs(6), "{took:?}");

    let wrong_path = format!("ws://{}/nope", d.node.ws_addr);
    assert_fails_with(
        &bench(&["--server", &d.server, "--ws", &wrong_path]).0,
        "refused the WebSocket upgrade: HTTP/1.1 404",
    );
}
