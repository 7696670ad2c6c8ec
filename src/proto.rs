//! Generated protobuf messages and grpcio stubs (see `build.rs`): `protocol` is push-manager's
//! public API and the connect-node service; `kv`/`rpc` are the trimmed etcd v3 API. Plus the one
//! way to build a broadcast, shared by `send`, the demo, the tests and the benchmarks.

include!(concat!(env!("OUT_DIR"), "/mod.rs"));

use self::protocol::{BroadCastReq, Proto};

/// A broadcast as business servers send it: frame version 1, `op` both in the frame and as
/// `protoOp` (goim's clients read either), to `topic` (`""` for every connected user).
pub fn broadcast_request(topic: &str, op: i32, seq: i32, body: impl Into<Vec<u8>>) -> BroadCastReq {
    let mut proto = Proto::new();
    proto.set_ver(1);
    proto.set_op(op);
    proto.set_seq(seq);
    proto.set_body(body.into());
    let mut req = BroadCastReq::new();
    req.set_protoOp(op);
    req.set_topic(topic.into());
    req.set_proto(proto);
    req
}
