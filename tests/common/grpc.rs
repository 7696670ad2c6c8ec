//! gRPC clients of push-manager's `PushServer` and of a connect-node's `ConnectNode`, each on an
//! environment of its own (one completion-queue thread), as a separate business server would be.

use std::sync::Arc;

use grpcio::{Channel, ChannelBuilder, EnvBuilder};
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
