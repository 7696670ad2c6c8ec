//! Coalesced writes on the connect-node, end to end: a `BroadcastBatch` leaves in far fewer
//! socket writes than it has frames, in order; `--ws-write-delay` is validated by name; held
//! writes go out without more traffic to push them. Speed is measured in `benches/ws_fanout.rs`,
//! not asserted here: these tests check delivery and order only.

mod common;

use std::time::Duration;

use common::gateway::{start_gateway, wait_connections};
use common::grpc::{batch, node_client, OP};
use common::ws::Client;
use common::{wait_until, PATIENCE};
use push_manager::gateway::{Config, Gateway};
use push_manager::proto::broadcast_request;
use serde_json::Value;

#[track_caller]
fn assert_delivery(frame: &Value, topic: &str, seq: i64) {
    assert_eq!(frame["type"], "message", "{frame}");
    assert_eq!(frame["topic"], topic, "{frame}");
    assert_eq!(frame["seq"], seq, "{frame}");
}

#[test]
fn a_batch_of_a_thousand_reaches_a_subscriber_in_order_in_far_fewer_writes_than_frames() {
    let gw = start_gateway(|_| {});
    let mut client = Client::subscribed(gw.ws_addr(), &["t"]);
    wait_connections(&gw, 1);
    let before = gw.stats();

    const N: i32 = 1000;
    let node = node_client(gw.grpc_addr());
    let messages = (0..N).map(|seq| broadcast_request("t", OP, seq, format!("message {seq:04}"))).collect();
    let reply = node.broadcast_batch(&batch(messages)).expect("BroadcastBatch succeeds");
    assert_eq!((reply.get_received(), reply.get_delivered()), (N as u32, N as u64));
    for seq in 0..N {
        assert_delivery(&client.next_json(), "t", seq.into());
    }

    wait_until("the frames are counted", PATIENCE, || gw.stats().frames_sent - before.frames_sent == N as u64);
    let writes = gw.stats().socket_writes - before.socket_writes;
    // ~40 KiB of frames: a few 32 KiB writes when the socket takes them; more if it filled
    // while this (busy, shared) machine was slow to read, each write then taking what the
    // reader made room for. Still far fewer writes than frames either way.
    assert!((1..=N as u64 / 4).contains(&writes), "{N} frames took {writes} socket writes");
}

#[test]
fn the_write_delay_is_validated_by_name_and_zero_never_waits() {
    let too_long = Config {
        grpc_listen: "127.0.0.1:0".into(),
        ws_listen: "127.0.0.1:0".into(),
        ws_write_delay: Duration::from_secs(1),
        ..Config::default()
    };
    let err = Gateway::start(too_long).expect_err("a 1s write delay is refused").to_string();
    assert!(err.contains("--ws-write-delay") && err.contains("at most"), "{err}");

    let gw = start_gateway(|c| c.ws_write_delay = Duration::ZERO);
    let mut client = Client::subscribed(gw.ws_addr(), &["t"]);
    wait_connections(&gw, 1);
    for seq in 0..100 {
        gw.hub().publish(&broadcast_request("t", OP, seq, "x"));
    }
    for seq in 0..100 {
        assert_delivery(&client.next_json(), "t", seq.into());
    }
}

#[test]
fn writes_held_for_the_longest_delay_go_out_with_no_more_traffic_and_a_lone_message_arrives() {
    let gw = start_gateway(|c| c.ws_write_delay = Duration::from_millis(100));
    let mut client = Client::subscribed(gw.ws_addr(), &["t"]);
    wait_connections(&gw, 1);
    // Back to back: the loop may be busy and hold the writes; nothing comes after them to
    // trigger a write, so only the delay running out sends them.
    for seq in 0..3 {
        gw.hub().publish(&broadcast_request("t", OP, seq, "burst"));
    }
    for seq in 0..3 {
        assert_delivery(&client.next_json(), "t", seq.into());
    }
    // Alone, after the burst was read: delivered, and in order behind it.
    gw.hub().publish(&broadcast_request("t", OP, 3, "alone"));
    assert_delivery(&client.next_json(), "t", 3);
    // A batch from push-manager behind it, then a single message: one order.
    let node = node_client(gw.grpc_addr());
    let messages = (4..68).map(|seq| broadcast_request("t", OP, seq, "batched")).collect();
    node.broadcast_batch(&batch(messages)).expect("BroadcastBatch succeeds");
    gw.hub().publish(&broadcast_request("t", OP, 68, "after"));
    for seq in 4..=68 {
        assert_delivery(&client.next_json(), "t", seq.into());
    }
}
