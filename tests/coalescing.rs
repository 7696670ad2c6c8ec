//! Coalesced writes on the connect-node, end to end: a `BroadcastBatch` leaves in far fewer
//! socket writes than it has frames, in order; `--ws-write-delay` is validated by name; held
//! writes go out without more traffic to push them; a few frames for an idle event loop are
//! written by the publishing thread, many go through the loop, and a connection sees one order
//! either way. Speed is measured in `benches/ws_fanout.rs` and `benches/e2e.rs`, not asserted
//! here: these tests check delivery and order only.

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

/// More than `INLINE_AUDIENCE` (32) connections of one loop: a broadcast to them all is always
/// handed to the loop.
const CROWD: usize = 40;

#[test]
fn a_message_for_a_few_connections_of_an_idle_loop_is_written_inline_and_one_for_a_crowd_is_not() {
    // No write hold: right after its writes a loop holds the next ones for a multiple of what
    // they took, which on a loaded machine can outlast the test's round trip.
    let gw = start_gateway(|c| {
        c.event_loops = 1;
        c.ws_write_delay = Duration::ZERO;
    });
    let mut solo = Client::subscribed(gw.ws_addr(), &["solo"]);
    wait_connections(&gw, 1);
    // The loop is asleep between these unless a sweep happens to run: one of them is enough.
    let before = gw.stats().inline_batches;
    let mut seq = 0;
    while gw.stats().inline_batches == before && seq < 50 {
        gw.hub().publish(&broadcast_request("solo", OP, seq, "alone"));
        assert_delivery(&solo.next_json(), "solo", seq.into());
        seq += 1;
    }
    assert!(gw.stats().inline_batches > before, "none of {seq} lone messages to an idle loop was written inline");

    let mut crowd: Vec<Client> = (0..CROWD).map(|_| Client::subscribed(gw.ws_addr(), &["crowd"])).collect();
    wait_connections(&gw, 1 + CROWD);
    let before = gw.stats();
    assert_eq!(gw.hub().publish(&broadcast_request("crowd", OP, 0, "to all")), CROWD as u64);
    for client in &mut crowd {
        assert_delivery(&client.next_json(), "crowd", 0);
    }
    assert_eq!(gw.stats().inline_batches, before.inline_batches, "{CROWD} connections are the loop's to write");
}

#[test]
fn a_connection_sees_inline_and_loop_written_frames_in_the_order_they_were_published() {
    let gw = start_gateway(|c| c.event_loops = 1);
    let mut both = Client::subscribed(gw.ws_addr(), &["crowd", "solo"]);
    let mut crowd: Vec<Client> = (1..CROWD).map(|_| Client::subscribed(gw.ws_addr(), &["crowd"])).collect();
    wait_connections(&gw, CROWD);

    // Back to back, so each lone message finds the loop idle or still busy with the crowd's.
    const N: i32 = 200;
    for seq in 0..N {
        let topic = if seq % 2 == 0 { "crowd" } else { "solo" };
        gw.hub().publish(&broadcast_request(topic, OP, seq, "mixed"));
    }
    for seq in 0..N {
        assert_delivery(&both.next_json(), if seq % 2 == 0 { "crowd" } else { "solo" }, seq.into());
    }
    for client in &mut crowd {
        for seq in (0..N).step_by(2) {
            assert_delivery(&client.next_json(), "crowd", seq.into());
        }
    }
}
