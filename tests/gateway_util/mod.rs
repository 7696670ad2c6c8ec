//! Helpers for the gateway tests: an in-process gateway on loopback port 0, real WebSocket
//! clients (tungstenite over blocking sockets with read timeouts), a real gRPC client, and
//! polling with a deadline instead of sleeping.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpcio::{ChannelBuilder, EnvBuilder};
use push_manager::gateway::{Config, Gateway};
use push_manager::proto::protocol::{BroadCastReq, BroadcastBatch, NodeReply, Proto};
use push_manager::proto::protocol_grpc::ConnectNodeClient;
use serde_json::Value;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

/// How long any single expected event may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Starts a gateway on loopback with free ports, after letting `tweak` change the config.
pub fn start(tweak: impl FnOnce(&mut Config)) -> Gateway {
    let mut config = Config { grpc_listen: "127.0.0.1:0".into(), ws_listen: "127.0.0.1:0".into(), ..Config::default() };
    tweak(&mut config);
    Gateway::start(config).expect("gateway starts")
}

/// Polls `condition` until it holds, failing the test after [`PATIENCE`].
#[track_caller]
pub fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until the gateway counts `n` open WebSocket connections.
#[track_caller]
pub fn wait_connections(gw: &Gateway, n: usize) {
    wait_for(&format!("{n} open connections"), || gw.hub().connections() == n);
}

pub fn message(topic: &str, seq: i32, body: &[u8]) -> BroadCastReq {
    let mut proto = Proto::new();
    proto.set_ver(1);
    proto.set_op(1000);
    proto.set_seq(seq);
    proto.set_body(body.to_vec());
    let mut msg = BroadCastReq::new();
    msg.set_topic(topic.into());
    msg.set_proto(proto);
    msg
}

pub fn batch(messages: Vec<BroadCastReq>) -> BroadcastBatch {
    let mut batch = BroadcastBatch::new();
    batch.set_messages(messages.into());
    batch
}

/// A gRPC client of the gateway's `ConnectNode` service.
pub fn node_client(gw: &Gateway) -> ConnectNodeClient {
    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("test-grpc").build());
    let channel = ChannelBuilder::new(env).connect(&gw.grpc_addr().to_string());
    ConnectNodeClient::new(channel)
}

#[track_caller]
pub fn broadcast(node: &ConnectNodeClient, topic: &str, seq: i32, body: &[u8]) -> NodeReply {
    node.broadcast(&message(topic, seq, body)).expect("Broadcast RPC succeeds")
}

/// A WebSocket client over a blocking socket; every read times out after [`PATIENCE`].
pub struct Client {
    pub ws: WebSocket<TcpStream>,
}

impl Client {
    /// Connects to `path_and_query` (e.g. `/ws?topic=a`), panicking if the upgrade fails.
    #[track_caller]
    pub fn connect(gw: &Gateway, path_and_query: &str) -> Client {
        Client::try_connect(gw, path_and_query).unwrap_or_else(|e| panic!("connecting to {path_and_query}: {e}"))
    }

    pub fn try_connect(gw: &Gateway, path_and_query: &str) -> Result<Client, tungstenite::Error> {
        let stream = TcpStream::connect(gw.ws_addr()).expect("TCP connect");
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.set_write_timeout(Some(PATIENCE)).unwrap();
        let url = format!("ws://{}{}", gw.ws_addr(), path_and_query);
        // Small buffers: the idle bench opens thousands of these.
        let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
        match tungstenite::client::client_with_config(url.as_str(), stream, Some(config)) {
            Ok((ws, _response)) => Ok(Client { ws }),
            Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
            Err(tungstenite::HandshakeError::Interrupted(_)) => unreachable!("blocking sockets do not interrupt"),
        }
    }

    /// Connects and subscribes to `topics` with a command, waiting for the ack.
    #[track_caller]
    pub fn subscribed(gw: &Gateway, topics: &[&str]) -> Client {
        let mut client = Client::connect(gw, "/ws");
        let ack = client.command("subscribe", topics);
        assert_eq!(ack["type"], "subscribed", "{ack}");
        client
    }

    /// Sends a subscribe/unsubscribe command and returns the ack.
    #[track_caller]
    pub fn command(&mut self, action: &str, topics: &[&str]) -> Value {
        let command = serde_json::json!({ "action": action, "topics": topics });
        self.send_text(&command.to_string());
        self.next_json()
    }

    #[track_caller]
    pub fn send_text(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).expect("send a text frame");
    }

    /// The next text frame as JSON, skipping pings and pongs.
    #[track_caller]
    pub fn next_json(&mut self) -> Value {
        match self.next_message() {
            Message::Text(text) => serde_json::from_str(text.as_str()).expect("the gateway sends JSON"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next data or close message (pings and pongs are answered and skipped).
    #[track_caller]
    pub fn next_message(&mut self) -> Message {
        loop {
            match self.ws.read() {
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(message) => return message,
                Err(e) => panic!("reading from the gateway: {e}"),
            }
        }
    }

    /// Reads until the close frame, skipping any deliveries before it; returns code and reason.
    #[track_caller]
    pub fn expect_close(&mut self) -> (u16, String) {
        loop {
            match self.next_message() {
                Message::Close(Some(frame)) => return (u16::from(frame.code), frame.reason.to_string()),
                Message::Close(None) => panic!("close frame without a code"),
                Message::Text(_) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }
}

/// Sends raw bytes on a new TCP connection and returns everything the gateway answers until it
/// closes the connection.
pub fn raw_exchange(gw: &Gateway, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(gw.ws_addr()).expect("TCP connect");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(request).expect("send the request");
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading the answer to a raw request: {e}"),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// A valid upgrade request for `path`.
pub fn upgrade_request(gw: &Gateway, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        gw.ws_addr()
    )
}
