//! Instances find each other through etcd: `serve` registers its gRPC address and admin URL
//! under a lease and revokes it when stopped; `send`, `status` and `bench` given only `--etcd`
//! find it (and say which one they took when there are several); nodes publish their WebSocket
//! URLs beside their records so that `bench --etcd` finds them too. Real etcd, real processes.

mod common;

use std::process::{Command, Output};

use common::etcd::Etcd;
use common::process::Process;
use common::{assert_fails_with, free_addr, wait_until, BIN, PATIENCE};
use push_manager::registry::DEFAULT_INSTANCE_PREFIX;
use push_manager::testkit::{spawn_node, Reaped};

const NODES: &str = "/inst-test/nodes/";

/// `serve` on free loopback ports, its admin endpoint where `admin` says, plus `extra`.
fn serve(etcd: &Etcd, admin: &str, extra: &[&str]) -> Process {
    let endpoint = etcd.endpoint();
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--etcd", &endpoint, "--prefix", NODES];
    args.extend(["--admin-listen", admin, "--log-level", "info"]);
    args.extend(extra);
    Process::start(&args, &[])
}

/// Runs the binary with `args` to its end, within a deadline.
fn run(args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command.args(args).stdin(std::process::Stdio::null());
    command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    Reaped::spawn(&mut command).output_within(PATIENCE * 3)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[track_caller]
fn assert_ok(out: &Output) {
    assert!(out.status.success(), "stdout: {}\nstderr: {}", stdout(out), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn serve_registers_its_addresses_under_a_lease_and_revokes_them_on_sigterm() {
    let etcd = Etcd::start();
    let mut pm = serve(&etcd, "127.0.0.1:0", &["--instance-id", "pm-a", "--lease-ttl", "7s"]);
    let addr = pm.line_after("listening ");
    let admin = pm.line_after("admin ");
    let key = format!("{DEFAULT_INSTANCE_PREFIX}pm-a");
    pm.wait_for(&format!("instance pm-a registering as {key}"), 1);

    // The first registration is made before the line is printed, when etcd is up.
    let client = etcd.client();
    let kv = client.get(&key).unwrap().expect("the instance's record");
    let record: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
    assert_eq!(record, serde_json::json!({ "addr": addr, "admin": admin }));
    assert_ne!(kv.lease, 0, "the record is under a lease");
    let ttl = client.time_to_live(kv.lease).unwrap().expect("a live lease");
    assert!((1..=7).contains(&ttl), "ttl {ttl}");

    assert!(pm.stop().success(), "{}", pm.output());
    // Revoked on the way out, not left to expire.
    assert_eq!(client.get(&key).unwrap(), None, "{}", pm.output());
    assert!(pm.output().contains("deregistered (lease"), "{}", pm.output());
}

#[test]
fn no_register_leaves_no_record() {
    let etcd = Etcd::start();
    let mut pm = serve(&etcd, "127.0.0.1:0", &["--no-register", "--instance-id", "pm-a"]);
    pm.wait_for("not registering this instance in etcd (--no-register)", 1);
    pm.line_after("admin ");
    assert!(etcd.client().get_prefix(DEFAULT_INSTANCE_PREFIX).unwrap().kvs.is_empty());
    // Nothing to find, and the error names where it looked.
    assert_fails_with(
        &run(&["send", "--etcd", &etcd.endpoint(), "hello"]),
        &format!("no push-manager instance is registered in etcd under {DEFAULT_INSTANCE_PREFIX:?}"),
    );
    assert!(pm.stop().success(), "{}", pm.output());
}

#[test]
fn send_status_and_bench_find_the_instance_and_the_nodes_through_etcd() {
    let etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    let node = spawn_node(BIN, &endpoint, NODES, "n1", &[]);
    let mut pm = serve(&etcd, "127.0.0.1:0", &["--instance-id", "pm-a"]);
    let admin = pm.line_after("admin ");
    pm.wait_for("instance pm-a registering", 1);

    // The node's record stays a plain address; its WebSocket URL is beside it.
    let client = etcd.client();
    assert_eq!(client.get(&format!("{NODES}n1")).unwrap().unwrap().value, node.grpc.as_bytes());
    let ws = client.get("/inst-test/nodes-ws/n1").unwrap().expect("the node's WebSocket URL");
    assert_eq!(String::from_utf8_lossy(&ws.value), format!("ws://{}/ws", node.ws_addr));

    wait_until("send --etcd reaches serve, which found the node", PATIENCE, || {
        stdout(&run(&["send", "--etcd", &endpoint, "--timeout", "2s", "probe"])).contains("accepted by 1")
    });
    let status = run(&["status", "--etcd", &endpoint, "--interval", "200ms"]);
    assert_ok(&status);
    assert!(stdout(&status).contains(&format!("push-manager serve 0.1.0 at {admin}")), "{}", stdout(&status));

    let bench = ["bench", "--etcd", &endpoint, "--prefix", NODES, "--subscribers", "4", "--messages", "10", "--quiet"];
    let out = run(&bench);
    assert_ok(&out);
    assert!(stdout(&out).contains("delivered:  40 in"), "{}", stdout(&out));
    assert!(stdout(&out).contains("lost 0, duplicated 0, out of order 0"), "{}", stdout(&out));

    // A second instance, without an admin endpoint: the clients say which one they took.
    let mut second = serve(&etcd, "off", &["--instance-id", "pm-b"]);
    second.wait_for("instance pm-b registering", 1);
    let out = run(&["send", "--etcd", &endpoint, "--timeout", "2s", "two"]);
    assert_ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("using instance pm-a at 127.0.0.1:") && stderr.contains("2 registered"), "{stderr}");
    assert_ok(&run(&["send", "--etcd", &endpoint, "--instance", "pm-b", "--timeout", "2s", "to b"]));
    assert_fails_with(
        &run(&["send", "--etcd", &endpoint, "--instance", "pm-x", "hi"]),
        "no push-manager instance \"pm-x\" under \"/services/push-manager/\"; registered: pm-a, pm-b",
    );
    assert_fails_with(&run(&["status", "--etcd", &endpoint, "--instance", "pm-b"]), "instance pm-b (127.0.0.1:");
    assert_fails_with(&run(&["status"]), "give the admin endpoint with --admin http://host:port, or --etcd");
    // --server wins over --etcd.
    let nowhere = free_addr();
    assert_fails_with(
        &run(&["send", "--etcd", &endpoint, "--server", &nowhere, "--timeout", "1s", "hi"]),
        &format!("cannot connect to {nowhere}"),
    );
    // An unreachable etcd is named.
    let no_etcd = free_addr();
    assert_fails_with(&run(&["send", "--etcd", &no_etcd, "--etcd-timeout", "1s", "hi"]), &format!("--etcd {no_etcd}"));

    // What is left keeps working.
    assert!(stdout(&run(&["send", "--etcd", &endpoint, "--timeout", "2s", "still"])).contains("accepted by 1"));
    assert!(second.stop().success(), "{}", second.output());
    assert!(pm.stop().success(), "{}", pm.output());
    assert!(client.get_prefix(DEFAULT_INSTANCE_PREFIX).unwrap().kvs.is_empty());
}

#[test]
fn a_bad_instance_id_is_refused_clearly() {
    let etcd = Etcd::start();
    for (id, why) in [
        ("a/b", "--instance-id: the instance id \"a/b\" contains '/': it must be one key segment"),
        ("", "--instance-id: the instance id is empty"),
        ("a b", "--instance-id: the instance id \"a b\" contains ' '"),
    ] {
        let mut pm = serve(&etcd, "127.0.0.1:0", &["--instance-id", id]);
        assert!(!pm.wait().success(), "{}", pm.output());
        assert!(pm.output().contains(why), "wanted {why:?} in:\n{}", pm.output());
    }
    assert!(etcd.client().get_prefix(DEFAULT_INSTANCE_PREFIX).unwrap().kvs.is_empty());
    // A good id still registers.
    let mut pm = serve(&etcd, "127.0.0.1:0", &["--instance-id", "ok"]);
    pm.wait_for("instance ok registering", 1);
    assert!(pm.stop().success(), "{}", pm.output());
}
