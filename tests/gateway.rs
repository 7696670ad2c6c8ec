//! End-to-end tests of the connect-node: a real in-process gateway on loopback, real gRPC and
//! WebSocket clients. No fixed ports, no sleeping to synchronise: reads block with a timeout and
//! conditions are polled with a deadline.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::gateway::{start_gateway, wait_connections};
use common::grpc::{batch, batches_until_refused, node_broadcast, node_client, OP};
use common::ws::{raw_exchange, upgrade_request, Client};
use common::{wait_until, PATIENCE};
use push_manager::gateway::Gateway;
use push_manager::proto::broadcast_request;
use push_manager::proto::protocol::BroadCastReq;
use serde_json::{json, Value};
use tungstenite::Message;

#[track_caller]
fn assert_delivery(frame: &Value, topic: &str, seq: i64, body: &str) {
    assert_eq!(frame["type"], "message", "{frame}");
    assert_eq!(frame["topic"], topic, "{frame}");
    assert_eq!(frame["seq"], seq, "{frame}");
    assert_eq!(frame["body"], body, "{frame}");
}

/// Proves `client` is still served: a broadcast to everyone reaches it.
#[track_caller]
fn assert_still_served(gw: &Gateway, client: &mut Client) {
    gw.hub().publish(&broadcast_request("", OP, 9999, b"still here"));
    assert_delivery(&client.next_json(), "", 9999, "still here");
}

#[test]
fn topic_broadcast_reaches_exactly_its_subscribers() {
    let gw = start_gateway(|_| {});
    let node = node_client(gw.grpc_addr());
    let mut a1 = Client::connect(gw.ws_addr(), "/ws?topic=a");
    let mut a2 = Client::subscribed(gw.ws_addr(), &["a"]);
    let mut b = Client::subscribed(gw.ws_addr(), &["b"]);
    wait_connections(&gw, 3);

    let reply = node_broadcast(&node, "a", 1, b"hello");
    assert_eq!((reply.received, reply.delivered), (1, 2));
    let reply = node_broadcast(&node, "", 2, b"marker");
    assert_eq!((reply.received, reply.delivered), (1, 3));

    for a in [&mut a1, &mut a2] {
        let first = a.next_json();
        assert_eq!(first, json!({"type":"message","topic":"a","op":1000,"seq":1,"ver":1,"body":"hello"}));
        assert_delivery(&a.next_json(), "", 2, "marker");
    }
    // Had b been sent "hello", it would come before the marker.
    assert_delivery(&b.next_json(), "", 2, "marker");
    assert_eq!(gw.stats().messages_received, 2);
}

#[test]
fn broadcast_without_topic_reaches_every_connection() {
    let gw = start_gateway(|_| {});
    let node = node_client(gw.grpc_addr());
    let mut clients: Vec<Client> = vec![
        Client::connect(gw.ws_addr(), "/ws"),
        Client::connect(gw.ws_addr(), "/ws?topic=x"),
        Client::subscribed(gw.ws_addr(), &["y", "z"]),
        Client::connect(gw.ws_addr(), "/ws"),
    ];
    wait_connections(&gw, 4);
    let reply = node_broadcast(&node, "", 7, b"to all");
    assert_eq!(reply.delivered, 4);
    for client in &mut clients {
        assert_delivery(&client.next_json(), "", 7, "to all");
    }
    wait_until("4 frames are sent", PATIENCE, || gw.stats().frames_sent >= 4);
}

#[test]
fn subscribe_and_unsubscribe_take_effect_once_acknowledged() {
    let gw = start_gateway(|_| {});
    let mut client = Client::connect(gw.ws_addr(), "/ws");
    let ack = client.command("subscribe", &["a", "b", "a"]);
    assert_eq!(ack, json!({"type":"subscribed","topics":["a","b"]}));
    assert_eq!(gw.hub().publish(&broadcast_request("a", OP, 1, b"one")), 1);
    assert_delivery(&client.next_json(), "a", 1, "one");

    let ack = client.command("unsubscribe", &["a", "never-held"]);
    assert_eq!(ack, json!({"type":"unsubscribed","topics":["b"]}));
    assert_eq!(gw.hub().publish(&broadcast_request("a", OP, 2, b"gone")), 0);
    assert_eq!(gw.hub().publish(&broadcast_request("b", OP, 3, b"kept")), 1);
    assert_delivery(&client.next_json(), "b", 3, "kept");

    let ack = client.command("subscribe", &["c"]);
    assert_eq!(ack, json!({"type":"subscribed","topics":["b","c"]}));
}

#[test]
fn batch_order_is_preserved_on_every_connection() {
    let gw = start_gateway(|c| c.event_loops = 2);
    let node = node_client(gw.grpc_addr());
    // Consecutive connections land on different loops.
    let mut clients: Vec<Client> = (0..4).map(|_| Client::subscribed(gw.ws_addr(), &["t"])).collect();
    const N: i32 = 500;
    let messages: Vec<BroadCastReq> =
        (0..N).map(|seq| broadcast_request("t", OP, seq, format!("m{seq}").as_bytes())).collect();
    let reply = node.broadcast_batch(&batch(messages)).expect("BroadcastBatch succeeds");
    assert_eq!((reply.received, reply.delivered), (N as u32, 4 * N as u64));
    for client in &mut clients {
        for seq in 0..N {
            assert_delivery(&client.next_json(), "t", seq as i64, &format!("m{seq}"));
        }
    }
}

#[test]
fn non_utf8_body_arrives_as_base64() {
    let gw = start_gateway(|_| {});
    let node = node_client(gw.grpc_addr());
    let mut client = Client::subscribed(gw.ws_addr(), &["bin"]);
    node_broadcast(&node, "bin", 5, &[0xff, 0xfe, 0x00, 0x41]);
    let frame = client.next_json();
    assert_eq!(frame["body_base64"], "//4AQQ==", "{frame}");
    assert!(frame.get("body").is_none(), "{frame}");
}

#[test]
fn slow_consumer_is_closed_while_a_fast_one_gets_everything() {
    let gw = start_gateway(|c| {
        c.event_loops = 1;
        c.max_out_buffer = 256 << 10;
    });
    let mut slow = Client::subscribed(gw.ws_addr(), &["big"]);
    let mut fast = Client::subscribed(gw.ws_addr(), &["big"]);
    wait_connections(&gw, 2);

    // 12.5 MiB: more than the kernel buffers of a connection that never reads (~4 MiB on
    // loopback) plus max_out_buffer. The publisher keeps at most WINDOW messages ahead of the
    // fast client, so the fast client is never behind by more than its buffer allows.
    const N: i32 = 400;
    const WINDOW: i32 = 4;
    let body = vec![b'x'; 32 << 10];
    let (received, progress) = crossbeam_channel::unbounded();
    let reader = std::thread::spawn(move || {
        for seq in 0..N {
            let frame = fast.next_json();
            assert_eq!(frame["seq"], seq, "the fast client must get every message, in order");
            received.send(seq).unwrap();
        }
        fast
    });
    for seq in 0..N {
        if seq >= WINDOW {
            let got = progress.recv_timeout(PATIENCE).expect("the fast client keeps up");
            assert_eq!(got, seq - WINDOW);
        }
        gw.hub().publish(&broadcast_request("big", OP, seq, body.as_slice()));
    }
    let mut fast = reader.join().expect("the fast client received all messages");
    wait_until("the slow consumer is closed", PATIENCE, || gw.stats().closed_slow == 1);
    assert_eq!(gw.hub().connections(), 1);

    let (code, reason) = slow.expect_close();
    assert_eq!((code, reason.as_str()), (4000, "slow consumer: outgoing buffer overflow"));
    assert_still_served(&gw, &mut fast);
    assert_eq!(gw.stats().closed_slow, 1);
}

/// `bytes` worth of empty pong frames as a client sends them (masked), encoded once.
fn masked_pongs(bytes: usize) -> Vec<u8> {
    // FIN + pong, masked with a zero-length payload, then the 4-byte mask key.
    const PONG: [u8; 6] = [0x8A, 0x80, 1, 2, 3, 4];
    PONG.repeat(bytes / PONG.len())
}

#[test]
fn clients_flooding_frames_do_not_hold_up_the_others_on_their_loop() {
    let gw = start_gateway(|c| c.event_loops = 1);
    let mut quiet = Client::subscribed(gw.ws_addr(), &["news"]);
    let mut flooders = [Client::connect(gw.ws_addr(), "/ws"), Client::connect(gw.ws_addr(), "/ws")];
    wait_connections(&gw, 3);

    // Frames encoded once and written in large chunks cost a flooder next to nothing and the
    // loop a parse each, so with two of them the loop always has more to read.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let floods: Vec<_> = flooders
        .iter()
        .map(|flooder| {
            let mut socket = flooder.ws.get_ref().try_clone().unwrap();
            let (stop, written) = (stop.clone(), written.clone());
            std::thread::spawn(move || {
                let chunk = masked_pongs(64 << 10);
                while !stop.load(Ordering::SeqCst) {
                    socket.write_all(&chunk).expect("the gateway keeps reading the flood");
                    written.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                }
            })
        })
        .collect();
    wait_until("the flood fills the socket buffers", PATIENCE, || written.load(Ordering::SeqCst) >= 2 << 20);
    let node = node_client(gw.grpc_addr());
    assert_eq!(node_broadcast(&node, "news", 1, b"meanwhile").get_delivered(), 1);
    let flooded_before = written.load(Ordering::SeqCst);
    let delivered = quiet.next_json();
    let flooded_meanwhile = written.load(Ordering::SeqCst) - flooded_before;
    stop.store(true, Ordering::SeqCst);
    floods.into_iter().for_each(|flood| flood.join().unwrap());
    assert_delivery(&delivered, "news", 1, "meanwhile");
    // A loop that reads a connection until it pauses took in 80-400 MiB of this flood before
    // serving anyone else (measured); a turn-taking loop serves the quiet client first, and
    // took in less than one 64 KiB chunk meanwhile.
    assert!(flooded_meanwhile < 8 << 20, "the loop read {flooded_meanwhile} bytes of flood before serving anyone else");

    // Flooding with valid frames is not misbehaviour: the flooders are still served.
    for flooder in &mut flooders {
        let ack = flooder.command("subscribe", &["news"]);
        assert_eq!(ack["type"], "subscribed", "{ack}");
    }
    node_broadcast(&node, "news", 2, b"all");
    for client in std::iter::once(&mut quiet).chain(&mut flooders) {
        assert_delivery(&client.next_json(), "news", 2, "all");
    }
}

/// Performs the upgrade by hand and then says nothing, not even pongs.
fn silent_client(gw: &Gateway) -> TcpStream {
    let mut stream = TcpStream::connect(gw.ws_addr()).unwrap();
    stream.write_all(upgrade_request(gw.ws_addr(), "/ws").as_bytes()).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "the gateway answers the upgrade");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    stream
}

#[test]
fn client_silent_past_pong_timeout_is_dropped() {
    let gw = start_gateway(|c| {
        c.ping_interval = Duration::from_millis(50);
        c.pong_timeout = Duration::from_millis(400);
    });
    let mut silent = silent_client(&gw);
    let mut lively = Client::connect(gw.ws_addr(), "/ws");
    wait_connections(&gw, 2);
    silent.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    lively.ws.get_ref().set_read_timeout(Some(Duration::from_millis(20))).unwrap();

    let deadline = Instant::now() + PATIENCE;
    let mut chunk = [0u8; 256];
    let mut pings_seen = 0;
    loop {
        assert!(Instant::now() < deadline, "the silent client was never dropped");
        // Reading makes the lively client answer the gateway's pings.
        match lively.ws.read() {
            Ok(Message::Ping(_)) => pings_seen += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("the lively client lost its connection: {e}"),
        }
        match silent.read(&mut chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(pings_seen > 0, "the gateway pings");
    assert_eq!(gw.stats().closed_timeout, 1);
    assert_eq!(gw.hub().connections(), 1);
    lively.ws.get_ref().set_read_timeout(Some(PATIENCE)).unwrap();
    assert_still_served(&gw, &mut lively);
}

/// Opens a bystander, lets `misbehave` run on a fresh connection, expects the gateway to close
/// it with `code` and a reason starting with `reason`, and the bystander to be unaffected.
#[track_caller]
fn assert_closed_for_bad_input(
    config: impl FnOnce(&mut push_manager::gateway::Config),
    misbehave: impl FnOnce(&mut Client),
    code: u16,
    reason: &str,
) {
    let gw = start_gateway(config);
    let mut bystander = Client::subscribed(gw.ws_addr(), &["a"]);
    let mut culprit = Client::subscribed(gw.ws_addr(), &["a"]);
    misbehave(&mut culprit);
    let (got_code, got_reason) = culprit.expect_close();
    assert_eq!(got_code, code, "reason: {got_reason}");
    assert!(got_reason.starts_with(reason), "{got_reason:?} should start with {reason:?}");
    wait_until("the culprit is counted", PATIENCE, || gw.stats().closed_bad_input == 1);
    assert_eq!(gw.hub().connections(), 1);
    assert_still_served(&gw, &mut bystander);
}

#[test]
fn invalid_json_closes_with_1007() {
    assert_closed_for_bad_input(|_| {}, |c| c.send_text("{\"action\": "), 1007, "invalid JSON: ");
}

#[test]
fn unknown_action_closes_with_1008() {
    assert_closed_for_bad_input(
        |_| {},
        |c| c.send_text(r#"{"action":"dance","topics":["a"]}"#),
        1008,
        r#"unknown action "dance""#,
    );
}

#[test]
fn empty_topic_closes_with_1008() {
    assert_closed_for_bad_input(
        |_| {},
        |c| c.send_text(r#"{"action":"subscribe","topics":[""]}"#),
        1008,
        "empty topic",
    );
}

#[test]
fn topic_with_whitespace_closes_with_1008_as_push_manager_could_never_target_it() {
    assert_closed_for_bad_input(
        |_| {},
        |c| c.send_text(r#"{"action":"subscribe","topics":["breaking news"]}"#),
        1008,
        "topic contains ' '",
    );
}

#[test]
fn over_long_topic_closes_with_1008() {
    let topic = "t".repeat(17);
    let command = json!({"action":"subscribe","topics":[topic]}).to_string();
    assert_closed_for_bad_input(
        |c| c.max_topic_len = 16,
        |c| c.send_text(&command),
        1008,
        "topic longer than 16 bytes",
    );
}

#[test]
fn too_many_topics_closes_with_1008() {
    assert_closed_for_bad_input(
        |c| c.max_topics_per_connection = 2,
        |c| c.send_text(r#"{"action":"subscribe","topics":["b","c"]}"#),
        1008,
        "too many topics: 3 > 2",
    );
}

#[test]
fn binary_frame_closes_with_1003() {
    assert_closed_for_bad_input(
        |_| {},
        |c| c.ws.send(Message::Binary(vec![1, 2, 3].into())).unwrap(),
        1003,
        "binary frames are not supported",
    );
}

#[test]
fn oversized_frame_closes_with_1009() {
    let huge = "x".repeat(4096);
    assert_closed_for_bad_input(|c| c.max_frame_bytes = 1024, |c| c.send_text(&huge), 1009, "message too big");
}

#[track_caller]
fn assert_http_rejected(gw: &Gateway, answer: &str, status: &str, body_mentions: &str, rejected: u64) {
    assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{answer:?}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert!(body.contains(body_mentions), "{answer:?} should explain with {body_mentions:?}");
    wait_until("the rejection is counted", PATIENCE, || gw.stats().http_rejected == rejected);
}

#[test]
fn http_without_upgrade_wrong_path_bad_query_and_garbage_are_refused() {
    let gw = start_gateway(|_| {});
    let mut bystander = Client::connect(gw.ws_addr(), "/ws");

    let plain = format!("GET /ws HTTP/1.1\r\nHost: {}\r\n\r\n", gw.ws_addr());
    assert_http_rejected(&gw, &raw_exchange(gw.ws_addr(), plain.as_bytes()), "426", "WebSocket", 1);

    assert_http_rejected(
        &gw,
        &raw_exchange(gw.ws_addr(), upgrade_request(gw.ws_addr(), "/chat").as_bytes()),
        "404",
        "/ws",
        2,
    );
    match Client::try_connect(gw.ws_addr(), "/elsewhere") {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 404)
        }
        other => panic!("expected HTTP 404, got {:?}", other.map(|_| "a WebSocket")),
    }
    wait_until("the tungstenite client's 404 is counted", PATIENCE, || gw.stats().http_rejected == 3);

    let bad_query = upgrade_request(gw.ws_addr(), "/ws?topic=");
    assert_http_rejected(&gw, &raw_exchange(gw.ws_addr(), bad_query.as_bytes()), "400", "empty topic", 4);

    let garbage = raw_exchange(gw.ws_addr(), b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n");
    assert!(garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"), "{garbage:?}");
    wait_until("the garbage is counted", PATIENCE, || gw.stats().http_rejected == 5);

    assert_eq!(gw.hub().connections(), 1);
    assert_still_served(&gw, &mut bystander);
}

#[test]
fn a_backlogged_event_loop_makes_the_node_refuse_broadcasts_until_it_catches_up() {
    let gw = start_gateway(|c| {
        c.event_loops = 1;
        c.max_loop_backlog = 8;
    });
    // With this many subscribers each delivery costs the loop a write per connection, so a
    // batch of 64 keeps it busy long enough for the next RPC to find most of it still queued.
    const SUBSCRIBERS: usize = 400;
    let mut clients: Vec<Client> = (0..SUBSCRIBERS).map(|_| Client::connect(gw.ws_addr(), "/ws?topic=busy")).collect();
    wait_connections(&gw, SUBSCRIBERS);
    let node = node_client(gw.grpc_addr());
    let (admitted, status) = batches_until_refused(&node, 64, |seq| broadcast_request("busy", OP, seq, b"x"));
    assert_eq!(status.code(), grpcio::RpcStatusCode::RESOURCE_EXHAUSTED);
    assert!(status.message().contains("--max-loop-backlog"), "{}", status.message());
    assert!(gw.stats().refused_busy >= 1);

    // Once the loop has caught up the node admits broadcasts again; the refused batch was
    // delivered to no one, so every client sees the admitted messages, then this one.
    let last = admitted + 1000;
    wait_until("the node admits broadcasts again", PATIENCE, || {
        node.broadcast(&broadcast_request("busy", OP, last, b"x")).is_ok()
    });
    let expected: Vec<i64> = (0..admitted).chain([last]).map(i64::from).collect();
    for i in [0, SUBSCRIBERS - 1] {
        let client = &mut clients[i];
        let seqs: Vec<i64> = (0..expected.len()).map(|_| client.next_json()["seq"].as_i64().unwrap()).collect();
        assert_eq!(seqs, expected);
    }
}

#[test]
fn broadcast_without_proto_is_invalid_argument() {
    let gw = start_gateway(|_| {});
    let node = node_client(gw.grpc_addr());
    let mut client = Client::connect(gw.ws_addr(), "/ws");
    wait_connections(&gw, 1);

    let mut no_proto = BroadCastReq::new();
    no_proto.set_topic("".into());
    match node.broadcast(&no_proto) {
        Err(grpcio::Error::RpcFailure(status)) => {
            assert_eq!(status.code(), grpcio::RpcStatusCode::INVALID_ARGUMENT);
            assert!(status.message().contains("proto is required"), "{}", status.message());
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    let half_bad = batch(vec![broadcast_request("", OP, 1, b"first"), no_proto]);
    match node.broadcast_batch(&half_bad) {
        Err(grpcio::Error::RpcFailure(status)) => {
            assert_eq!(status.code(), grpcio::RpcStatusCode::INVALID_ARGUMENT);
            assert!(status.message().contains("messages[1]"), "{}", status.message());
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    // Nothing of the refused batch was delivered: the marker comes first.
    node_broadcast(&node, "", 2, b"marker");
    assert_delivery(&client.next_json(), "", 2, "marker");
    assert_eq!(gw.stats().messages_received, 1);
}

#[test]
fn shutdown_flushes_then_closes_every_client_with_1001_and_joins() {
    let mut gw = start_gateway(|c| c.event_loops = 2);
    let ws_addr = gw.ws_addr();
    let clients: Vec<Client> = (0..3).map(|_| Client::connect(gw.ws_addr(), "/ws")).collect();
    wait_connections(&gw, 3);
    gw.hub().publish(&broadcast_request("", OP, 1, b"last words"));

    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            std::thread::spawn(move || {
                assert_delivery(&client.next_json(), "", 1, "last words");
                let close = client.expect_close();
                // The close handshake completes: the gateway hangs up after our reply.
                loop {
                    match client.ws.read() {
                        Ok(_) => continue,
                        Err(tungstenite::Error::ConnectionClosed) => break,
                        Err(e) => panic!("expected a clean close, got {e}"),
                    }
                }
                close
            })
        })
        .collect();
    let started = Instant::now();
    gw.shutdown();
    for reader in readers {
        let (code, reason) = reader.join().expect("client saw the close");
        assert_eq!((code, reason.as_str()), (1001, "server shutting down"));
    }
    assert!(started.elapsed() < PATIENCE);
    assert_eq!(gw.stats().connections_open, 0);
    assert_eq!(gw.stats().closed_shutdown, 3, "each close counted under its reason");
    assert!(TcpStream::connect(ws_addr).is_err(), "the WebSocket listener is closed");
    gw.shutdown();
}
