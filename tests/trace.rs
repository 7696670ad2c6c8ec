//! W3C trace context end to end, on real `serve` and `node` processes logging at debug level: a
//! caller's `traceparent` travels with each message, and both roles' lines about that message
//! name its trace id; an invalid one is ignored and the message delivered all the same.

mod common;

use std::process::{Command, Stdio};

use grpcio::{CallOption, MetadataBuilder};

use common::etcd::Etcd;
use common::grpc::push_client;
use common::process::Process;
use common::ws::Client;
use common::{wait_until, BIN, PATIENCE};
use push_manager::proto::broadcast_request;
use push_manager::testkit::Reaped;

const PREFIX: &str = "/trace/nodes/";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const STREAM_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const STREAM_TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";

/// `push-manager send <args>`, bounded in time; returns its exit, standard output and error.
#[track_caller]
fn send(args: &[&str]) -> (bool, String, String) {
    let mut send = Reaped::spawn(
        Command::new(BIN)
            .arg("send")
            .args(["--timeout", "5s"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let out = send.output_within(PATIENCE);
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// A `serve` and a `node` at debug level, the node known to serve; returns them with serve's
/// address and the node's WebSocket address.
fn start(etcd: &Etcd) -> (Process, Process, String, std::net::SocketAddr) {
    let endpoint = etcd.endpoint();
    let shared = ["--etcd", &endpoint, "--prefix", PREFIX, "--admin-listen", "127.0.0.1:0", "--log-level", "debug"];
    let node_args = ["node", "--grpc-listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0", "--node-id", "n1"];
    let mut node = Process::start(&[&node_args[..], &shared].concat(), &[]);
    let line = node.line_after("node n1 grpc ");
    let ws_url = line.split_whitespace().last().expect("the WebSocket URL");
    let ws = ws_url.trim_start_matches("ws://").trim_end_matches("/ws").parse().expect("a socket address");
    let mut serve = Process::start(&[&["serve", "--listen", "127.0.0.1:0"][..], &shared].concat(), &[]);
    let addr = serve.line_after("listening ");
    let client = push_client(&addr);
    wait_until("serve discovers the node", PATIENCE, || {
        client.broadcast(&broadcast_request("nobody", 1, 0, "warm-up")).is_ok_and(|r| r.get_accepted() == 1)
    });
    (serve, node, addr, ws)
}

#[test]
fn a_traced_message_is_named_by_its_trace_on_serve_and_node_and_a_bad_trace_is_ignored() {
    let etcd = Etcd::start();
    let (mut serve, mut node, addr, ws) = start(&etcd);
    let mut user = Client::subscribed(ws, &["room"]);

    // One Broadcast with a trace context: both roles name the trace in their line about it.
    let (ok, stdout, stderr) = send(&["--server", &addr, "--topic", "room", "--traceparent", TRACEPARENT, "traced"]);
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(user.next_json()["body"], "traced");
    serve.wait_for(
        &format!("broadcast to topic \"room\" (6 bytes): offered to 1 node(s), accepted by 1; trace {TRACE}"),
        1,
    );
    node.wait_for(&format!("received broadcast to topic \"room\" (6 bytes); trace {TRACE}"), 1);

    // A stream: its one traceparent goes with each of its messages.
    let stream = ["--server", &addr, "--topic", "room", "--count", "3", "--traceparent", STREAM_TRACEPARENT, "s"];
    let (ok, stdout, stderr) = send(&stream);
    assert!(ok, "{stdout}{stderr}");
    for _ in 0..3 {
        assert_eq!(user.next_json()["body"], "s");
    }
    serve.wait_for(&format!("trace {STREAM_TRACE}"), 3);
    node.wait_for(&format!("trace {STREAM_TRACE}"), 3);

    // An invalid traceparent is ignored (said at debug level) and the message goes all the same.
    let client = push_client(&addr);
    let mut headers = MetadataBuilder::new();
    headers.add_str("traceparent", "00-not-a-trace").unwrap();
    let reply = client
        .broadcast_opt(&broadcast_request("room", 1, 0, "untraced"), CallOption::default().headers(headers.build()))
        .unwrap();
    assert_eq!(reply.get_accepted(), 1);
    assert_eq!(user.next_json()["body"], "untraced");
    serve.wait_for("ignored the trace context of a broadcast from", 1);
    assert!(serve.output().contains("traceparent \"00-not-a-trace\" is 14 characters, not 55"), "{}", serve.output());

    // A traceparent in the request body instead of the metadata is not the caller's trace
    // context: push-manager replaces it, so the node names no trace for that message.
    let mut in_body = broadcast_request("room", 1, 0, "body-field");
    in_body.set_traceparent("00-11111111111111111111111111111111-2222222222222222-01".into());
    assert_eq!(client.broadcast(&in_body).unwrap().get_accepted(), 1);
    assert_eq!(user.next_json()["body"], "body-field");
    // Once the node has logged a traced message sent after it, its log covers that message.
    let mut traced = MetadataBuilder::new();
    traced.add_str("traceparent", TRACEPARENT).unwrap();
    let last = broadcast_request("room", 1, 0, "last");
    assert_eq!(client.broadcast_opt(&last, CallOption::default().headers(traced.build())).unwrap().get_accepted(), 1);
    assert_eq!(user.next_json()["body"], "last");
    serve.wait_for(&format!("trace {TRACE}"), 2);
    node.wait_for(&format!("trace {TRACE}"), 2);
    let traced_lines = |p: &Process| p.output().lines().filter(|l| l.contains("; trace ")).count();
    assert_eq!(traced_lines(&serve), 5, "{}", serve.output());
    assert_eq!(traced_lines(&node), 5, "{}", node.output());
    assert!(!node.output().contains("11111111111111111111111111111111"), "{}", node.output());
}

#[test]
fn send_refuses_an_invalid_traceparent_before_calling() {
    // Nothing listens there: the flag is refused before any call.
    let addr = common::free_addr();
    for (bad, why) in [
        ("bad", "traceparent \"bad\" is 3 characters, not 55"),
        ("trace-me", "does not start with a 2-digit lowercase hex version"),
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", "is not lowercase hex"),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", "the trace id is all zeros"),
    ] {
        let (ok, stdout, stderr) = send(&["--server", &addr, "--traceparent", bad, "x"]);
        assert!(!ok, "{bad}: {stdout}");
        assert!(stderr.contains(&format!("invalid value '{bad}' for '--traceparent <VALUE>'")), "{bad}: {stderr}");
        assert!(stderr.contains(why), "{bad}: {stderr}");
    }
}
