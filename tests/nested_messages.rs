//! protobuf 2.28 is named in RUSTSEC-2024-0437 (a stack overflow from deeply nested input). Both
//! gRPC servers parse untrusted requests with it, so each is sent the nesting that advisory is
//! about, as raw bytes: it must answer with an error status, and go on serving.

use std::sync::Arc;
use std::time::Duration;

use grpcio::{CallOption, Channel, ChannelBuilder, EnvBuilder, Marshaller, Method, MethodType, RpcStatusCode};
use push_manager::gateway::{self, Gateway};
use push_manager::manager::{self, Manager};
use push_manager::proto::protocol::{BroadCastReply, NodeReply};
use push_manager::testkit::free_port;

/// Levels of nesting: far past protobuf's recursion limit (100) and deep enough to overflow any
/// thread's stack if each level were a recursive call.
const DEPTH: usize = 200_000;

// `&Vec`, not a slice: grpcio's `Marshaller::ser` takes `&T` of the request type.
#[allow(clippy::ptr_arg)]
fn ser_raw(bytes: &Vec<u8>, buf: &mut grpcio::GrpcSlice) -> grpcio::Result<()> {
    *buf = grpcio::GrpcSlice::from(bytes.clone());
    Ok(())
}

fn de_unused(_: grpcio::MessageReader) -> grpcio::Result<Vec<u8>> {
    unreachable!("requests are only sent")
}

fn raw_method<Reply>(name: &'static str) -> Method<Vec<u8>, Reply>
where
    Reply: protobuf::Message,
{
    Method {
        ty: MethodType::Unary,
        name,
        req_mar: Marshaller { ser: ser_raw, de: de_unused },
        resp_mar: Marshaller { ser: grpcio::pb_ser, de: grpcio::pb_de },
    }
}

/// Unknown field 15 as a group, opened `DEPTH` times and never closed.
fn nested_groups() -> Vec<u8> {
    vec![(15 << 3) | 3; DEPTH]
}

/// Field `field`, length-delimited, each level wrapping the next, `DEPTH / 100` levels deep
/// (each level re-copies the ones inside it).
fn nested(field: u8) -> Vec<u8> {
    let mut inner: Vec<u8> = Vec::new();
    for _ in 0..DEPTH / 100 {
        let mut outer = vec![(field << 3) | 2];
        let mut len = inner.len();
        while len >= 0x80 {
            outer.push((len as u8) | 0x80);
            len >>= 7;
        }
        outer.push(len as u8);
        outer.extend_from_slice(&inner);
        inner = outer;
    }
    inner
}

fn channel(addr: &str) -> Channel {
    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("t-nested").build());
    ChannelBuilder::new(env).max_send_message_len(64 << 20).connect(addr)
}

/// Sends `payload` raw and returns the status it got: the call must be answered (with a reply or
/// an error status), not break the connection or the server.
#[track_caller]
fn call_raw<R: protobuf::Message + Unpin>(
    channel: &Channel,
    method: &Method<Vec<u8>, R>,
    payload: &[u8],
) -> RpcStatusCode {
    let client = grpcio::Client::new(channel.clone());
    let opt = CallOption::default().timeout(Duration::from_secs(10));
    match client.unary_call(method, &payload.to_vec(), opt) {
        Ok(_) => RpcStatusCode::OK,
        Err(grpcio::Error::RpcFailure(status)) => {
            assert_ne!(status.code(), RpcStatusCode::UNAVAILABLE, "the server went away: {status:?}");
            assert_ne!(status.code(), RpcStatusCode::DEADLINE_EXCEEDED, "no answer: {status:?}");
            status.code()
        }
        Err(e) => panic!("a {}-byte nested payload broke the call: {e}", payload.len()),
    }
}

/// The three nestings, each answered: unclosed groups and the request's message field
/// (`message_field`) nested in itself fail to parse (INTERNAL, grpcio's status for an
/// undecodable request: that field's own field of the same number is not a message); an unknown
/// field nested in itself is kept as opaque bytes, never descended into.
#[track_caller]
fn assert_each_answered<R: protobuf::Message + Unpin>(
    channel: &Channel,
    method: &Method<Vec<u8>, R>,
    message_field: u8,
) {
    assert_eq!(call_raw(channel, method, &nested_groups()), RpcStatusCode::INTERNAL);
    assert_eq!(call_raw(channel, method, &nested(message_field)), RpcStatusCode::INTERNAL);
    call_raw(channel, method, &nested(15));
}

#[test]
fn push_server_refuses_deeply_nested_requests_and_keeps_serving() {
    let mut manager = Manager::start(manager::Config {
        listen: "127.0.0.1:0".into(),
        // Nothing listens there: no node is ever known, so a valid broadcast gets UNAVAILABLE.
        etcd: push_manager::etcd::Config {
            endpoints: vec![format!("127.0.0.1:{}", free_port())],
            timeout: Duration::from_millis(200),
            ..push_manager::etcd::Config::default()
        },
        ..manager::Config::default()
    })
    .unwrap();
    let ch = channel(&manager.addr().to_string());
    let method = raw_method::<BroadCastReply>("/protocol.PushServer/Broadcast");
    assert_each_answered(&ch, &method, 2);
    let valid = push_manager::proto::broadcast_request("news", 1000, 1, b"hi".to_vec());
    let client = push_manager::proto::protocol_grpc::PushServerClient::new(ch);
    match client.broadcast(&valid) {
        Err(grpcio::Error::RpcFailure(s)) => assert_eq!(s.code(), RpcStatusCode::UNAVAILABLE, "{s:?}"),
        other => panic!("the server should still answer a valid broadcast: {other:?}"),
    }
    manager.shutdown();
}

#[test]
fn connect_node_refuses_deeply_nested_requests_and_keeps_serving() {
    let gw = Gateway::start(gateway::Config {
        grpc_listen: "127.0.0.1:0".into(),
        ws_listen: "127.0.0.1:0".into(),
        ..gateway::Config::default()
    })
    .unwrap();
    let ch = channel(&gw.grpc_addr().to_string());
    // BroadCastReq.proto is field 2; BroadcastBatch.messages is field 1.
    for (name, field) in [("/protocol.ConnectNode/Broadcast", 2), ("/protocol.ConnectNode/BroadcastBatch", 1)] {
        assert_each_answered(&ch, &raw_method::<NodeReply>(name), field);
    }
    let valid = push_manager::proto::broadcast_request("news", 1000, 1, b"hi".to_vec());
    let reply = push_manager::proto::protocol_grpc::ConnectNodeClient::new(ch).broadcast(&valid).unwrap();
    assert_eq!(reply.get_received(), 1);
}
