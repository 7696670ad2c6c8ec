//! Load, bounded and on loopback: one real `push-manager node` process holds 10,000 idle
//! WebSocket connections, and a broadcast reaches every one of them. The clients live in this
//! process, the node in its own (each needs 10,000 descriptors; the limit here is 20,000 per
//! process). Resident memory per connection is measured by `benches/ws_idle.rs`, not here.

mod util;

use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use grpcio::{ChannelBuilder, EnvBuilder};
use push_manager::proto::protocol::{BroadCastReq, Proto};
use push_manager::proto::protocol_grpc::ConnectNodeClient;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};
use util::{wait_until, Etcd};

const CONNECTIONS: usize = 10_000;

fn connect(url: &str, addr: &str) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Small client buffers: 10,000 of tungstenite's defaults would be gigabytes.
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    tungstenite::client::client_with_config(url, stream, Some(config)).unwrap().0
}

fn broadcast(seq: i32) -> BroadCastReq {
    let mut proto = Proto::new();
    proto.set_seq(seq);
    proto.set_body(b"still there?".to_vec());
    let mut req = BroadCastReq::new();
    req.set_topic("load".into());
    req.set_proto(proto);
    req
}

#[test]
fn ten_thousand_idle_connections_stay_connected_and_all_receive_a_broadcast() {
    push_manager::gateway::raise_nofile_limit().unwrap();
    let etcd = Etcd::start();
    let util::NodeProcess { child: mut node, grpc, ws_url } = util::spawn_node(&etcd.endpoint(), "/load/", "load", &[]);
    let ws_addr = ws_url.trim_start_matches("ws://").trim_end_matches("/ws").to_string();
    let url = format!("{ws_url}?topic=load");

    let mut clients = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        clients.push(connect(&url, &ws_addr));
        if (i + 1) % 2_000 == 0 {
            eprintln!("{} connections open", i + 1);
        }
    }

    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("grpc-load").build());
    let node_client = ConnectNodeClient::new(ChannelBuilder::new(env).connect(&grpc));
    let mut seq = 0;
    wait_until("a broadcast counts every connection as a subscriber", Duration::from_secs(30), || {
        seq += 1;
        node_client.broadcast(&broadcast(seq)).unwrap().get_delivered() == CONNECTIONS as u64
    });
    for (i, ws) in clients.iter_mut().enumerate() {
        loop {
            match ws.read().unwrap_or_else(|e| panic!("connection {i}: {e}")) {
                Message::Text(t) if t.as_str().contains(&format!("\"seq\":{seq},")) => break,
                Message::Close(f) => panic!("connection {i} was closed: {f:?}"),
                _ => {}
            }
        }
    }
    drop(clients);
    unsafe { libc::kill(node.id() as i32, libc::SIGTERM) };
    assert!(node.wait().unwrap().success());
}
