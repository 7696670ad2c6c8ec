//! Generated protobuf messages and grpcio stubs (see `build.rs`): `protocol` is push-manager's
//! public API and the connect-node service; `kv`/`rpc` are the trimmed etcd v3 API. Plus the one
//! way to build a broadcast (shared by `send`, the demo, the tests and the benchmarks) and the
//! one rule a broadcast must follow (applied by `PushServer` and again by `ConnectNode`, so
//! nothing reaches users that push-manager would have refused).

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

/// Why a broadcast is refused, as the caller will read it: `proto` is required, its body at most
/// `max_body_bytes`, and the topic empty (everyone) or a topic as [`crate::topic`] defines it.
pub fn validate_broadcast(req: &BroadCastReq, max_body_bytes: usize) -> Result<(), String> {
    if !req.has_proto() {
        return Err("proto is required: BroadCastReq.proto carries the body to deliver".into());
    }
    let body = req.get_proto().get_body().len();
    if body > max_body_bytes {
        return Err(format!("proto.body is {body} bytes; the limit is {max_body_bytes} (--max-message-bytes)"));
    }
    match req.get_topic() {
        "" => Ok(()),
        topic => crate::topic::validate(topic, crate::topic::MAX_TOPIC_BYTES),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::MAX_TOPIC_BYTES;

    fn req(topic: &str, body: usize) -> BroadCastReq {
        broadcast_request(topic, 1, 0, vec![0; body])
    }

    #[test]
    fn accepts_plain_requests() {
        validate_broadcast(&req("", 10), 10).unwrap();
        validate_broadcast(&req("room-1/a.b", 0), 10).unwrap();
        validate_broadcast(&req(&"t".repeat(MAX_TOPIC_BYTES), 0), 10).unwrap();
    }

    #[test]
    fn refuses_with_a_reason() {
        assert!(validate_broadcast(&BroadCastReq::new(), 10).unwrap_err().contains("proto is required"));
        assert!(validate_broadcast(&req("", 11), 10).unwrap_err().contains("--max-message-bytes"));
        let long = req(&"t".repeat(MAX_TOPIC_BYTES + 1), 0);
        assert!(validate_broadcast(&long, 10).unwrap_err().contains("longer than 128 bytes"));
        assert!(validate_broadcast(&req("a b", 0), 10).unwrap_err().contains("whitespace"));
        assert!(validate_broadcast(&req("a\u{7}", 0), 10).unwrap_err().contains("control"));
    }
}
