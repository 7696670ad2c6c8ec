//! Load, bounded and on loopback: one real `push-manager node` process holds 10,000 idle
//! WebSocket connections, and a broadcast reaches every one of them. The clients live in this
//! process, the node in its own (each needs 10,000 descriptors; the limit here is 20,000 per
//! process). Resident memory per connection is measured by `benches/ws_idle.rs`, not here.

mod common;

use std::time::Duration;

use common::etcd::Etcd;
use common::grpc::{node_client, OP};
use common::ws::Client;
use common::{wait_until, BIN};
use push_manager::proto::broadcast_request;
use push_manager::testkit::{signal, spawn_node, NodeProcess};
use tungstenite::Message;

const CONNECTIONS: usize = 10_000;

#[test]
fn ten_thousand_idle_connections_stay_connected_and_all_receive_a_broadcast() {
    push_manager::gateway::raise_nofile_limit().unwrap();
    let etcd = Etcd::start();
    let NodeProcess { child: mut node, grpc, ws_addr } = spawn_node(BIN, &etcd.endpoint(), "/load/", "load", &[]);

    let mut clients = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        clients.push(Client::connect(ws_addr, "/ws?topic=load"));
        if (i + 1) % 2_000 == 0 {
            eprintln!("{} connections open", i + 1);
        }
    }

    let grpc_client = node_client(&grpc);
    let mut seq = 0;
    wait_until("a broadcast counts every connection as a subscriber", Duration::from_secs(30), || {
        seq += 1;
        grpc_client.broadcast(&broadcast_request("load", OP, seq, "still there?")).unwrap().get_delivered()
            == CONNECTIONS as u64
    });
    for (i, client) in clients.iter_mut().enumerate() {
        loop {
            match client.ws.read().unwrap_or_else(|e| panic!("connection {i}: {e}")) {
                Message::Text(t) if t.as_str().contains(&format!("\"seq\":{seq},")) => break,
                Message::Close(f) => panic!("connection {i} was closed: {f:?}"),
                _ => {}
            }
        }
    }
    drop(clients);
    signal(&node, libc::SIGTERM);
    assert!(node.wait().unwrap().success());
}
