//! gRPC clients of push-manager's `PushServer` and of a connect-node's `ConnectNode`, each on an
//! environment of its own (one completion-queue thread), as a separate business server would be.

use std::sync::Arc;

use grpcio::{Channel, ChannelBuilder, EnvBuilder, RpcStatus};
use push_manager::proto::broadcast_request;
use push_manager::proto::protocol::{BroadCastReply, BroadCastReq, BroadcastBatch, NodeReply};
use push_manager::proto::protocol_grpc::{ConnectNodeClient, PushServerClient};

/// The operation code of every test broadcast (`push-manager send`'s default).
pub const OP: i32 = 1000;

fn channel(addr: impl ToString) -> Channel {
    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("test-grpc").build());
    ChannelBuilder::new(env).connect(&addr.to_string())
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
