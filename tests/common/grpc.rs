//! gRPC clients of push-manager's `PushServer` and of a connect-node's `ConnectNode`, each on an
//! environment of its own (one completion-queue thread), as a separate business server would be.

use std::path::Path;
use std::sync::Arc;

use grpcio::{
    CallOption, Channel, ChannelBuilder, ChannelCredentialsBuilder, EnvBuilder, MetadataBuilder, RpcStatus,
    RpcStatusCode,
};
use push_manager::proto::broadcast_request;
use push_manager::proto::protocol::{BroadCastReply, BroadCastReq, BroadcastBatch, NodeReply};
use push_manager::proto::protocol_grpc::{ConnectNodeClient, PushServerClient};
use push_manager::testkit::Identity;

/// The operation code of every test broadcast (`push-manager send`'s default).
pub const OP: i32 = 1000;

fn builder() -> ChannelBuilder {
    ChannelBuilder::new(Arc::new(EnvBuilder::new().cq_count(1).name_prefix("test-grpc").build()))
}

fn channel(addr: impl ToString) -> Channel {
    builder().connect(&addr.to_string())
}

/// A channel to `addr` over TLS, trusting `ca` and presenting `identity` (mutual TLS) if given.
pub fn tls_channel(addr: impl ToString, ca: &Path, identity: Option<&Identity>) -> Channel {
    let read = |path: &Path| std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut credentials = ChannelCredentialsBuilder::new().root_cert(read(ca));
    if let Some(id) = identity {
        credentials = credentials.cert(read(&id.cert), read(&id.key));
    }
    builder().set_credentials(credentials.build()).connect(&addr.to_string())
}

/// A call carrying `authorization: Bearer <key>`, written here rather than with the crate's own
/// helper so that the tests check the wire format, not agree with the code.
pub fn with_key(key: &str) -> CallOption {
    let mut headers = MetadataBuilder::new();
    headers.add_str("authorization", &format!("Bearer {key}")).expect("a valid header value");
    CallOption::default().headers(headers.build())
}

/// The status a call failed with; panics if it succeeded or failed without one.
#[track_caller]
pub fn refusal<T: std::fmt::Debug>(result: grpcio::Result<T>) -> RpcStatus {
    match result {
        Err(grpcio::Error::RpcFailure(status)) => status,
        other => panic!("expected an error status, got {other:?}"),
    }
}

/// [`refusal`], checking its code.
#[track_caller]
pub fn refused<T: std::fmt::Debug>(result: grpcio::Result<T>, code: RpcStatusCode) -> RpcStatus {
    let status = refusal(result);
    assert_eq!(status.code(), code, "{status:?}");
    status
}

/// A client of push-manager's `PushServer` at `addr`.
pub fn push_client(addr: impl ToString) -> PushServerClient {
    PushServerClient::new(channel(addr))
}

/// A client of the `ConnectNode` service at `addr`.
pub fn node_client(addr: impl ToString) -> ConnectNodeClient {
    ConnectNodeClient::new(channel(addr))
}

/// One `PushServer/Broadcast` of `body` to `topic`, as a business server sends it.
#[track_caller]
pub fn broadcast(client: &PushServerClient, topic: &str, body: &str) -> BroadCastReply {
    client.broadcast(&broadcast_request(topic, OP, 0, body)).expect("broadcast succeeds")
}

/// One `ConnectNode/Broadcast` of `body` to `topic` with sequence number `seq`, as push-manager
/// sends it.
#[track_caller]
pub fn node_broadcast(node: &ConnectNodeClient, topic: &str, seq: i32, body: &[u8]) -> NodeReply {
    node.broadcast(&broadcast_request(topic, OP, seq, body)).expect("Broadcast RPC succeeds")
}

/// `messages` as one `ConnectNode/BroadcastBatch` request.
pub fn batch(messages: Vec<BroadCastReq>) -> BroadcastBatch {
    let mut batch = BroadcastBatch::new();
    batch.set_messages(messages.into());
    batch
}

/// Sends batches of `len` messages (`message(seq)`, `seq` counting up from 0) until the node
/// refuses one; returns how many messages it admitted before, and the refusal. Fails the test if
/// a batch is admitted short, if twenty in a row are admitted (nothing bounds what the node
/// takes in), or if a call fails other than with a status.
#[track_caller]
pub fn batches_until_refused(
    node: &ConnectNodeClient,
    len: i32,
    message: impl Fn(i32) -> BroadCastReq,
) -> (i32, RpcStatus) {
    let mut admitted = 0;
    loop {
        match node.broadcast_batch(&batch((admitted..admitted + len).map(&message).collect())) {
            Ok(reply) => {
                assert_eq!(reply.get_received(), len as u32);
                admitted += len;
                assert!(admitted < len * 20, "twenty batches in a row were admitted: the backlog is not bounded");
            }
            Err(grpcio::Error::RpcFailure(status)) => return (admitted, status),
            Err(e) => panic!("expected RESOURCE_EXHAUSTED, got {e}"),
        }
    }
}
