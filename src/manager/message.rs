//! A broadcast as it travels to connect-nodes: encoded once, shared by every node's queue.
//!
//! The node client does not re-encode per node or per batch. `ConnectNode.Broadcast` takes the
//! encoded `BroadCastReq` as is, and `ConnectNode.BroadcastBatch` is written by hand as the
//! concatenation of `messages` fields (tag, length, encoded request), which is exactly what
//! protobuf would produce for `BroadcastBatch { repeated BroadCastReq messages = 1; }`.
//! So a message costs one allocation however many nodes and batches carry it.

use std::sync::Arc;

use grpcio::{GrpcSlice, Marshaller, MessageReader, Method, MethodType};
use protobuf::Message as _;

use crate::proto::protocol::{BroadCastReq, NodeReply};

/// One broadcast, encoded.
#[derive(Debug)]
pub(crate) struct Outgoing {
    encoded: Vec<u8>,
}

pub(crate) type SharedMessage = Arc<Outgoing>;

impl Outgoing {
    pub(crate) fn new(req: &BroadCastReq) -> SharedMessage {
        let encoded = req.write_to_bytes().expect("encoding a BroadCastReq into a Vec cannot fail");
        Arc::new(Outgoing { encoded })
    }

    pub(crate) fn encoded_len(&self) -> usize {
        self.encoded.len()
    }
}

/// `BroadcastBatch.messages` is field 1, length-delimited: tag byte (1 << 3) | 2.
const MESSAGES_FIELD_TAG: u8 = 0x0a;

fn varint_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// The encoded `BroadcastBatch` carrying `messages` in order.
pub(crate) fn encode_batch(messages: &[SharedMessage]) -> Vec<u8> {
    let total: usize = messages.iter().map(|m| 1 + varint_len(m.encoded.len() as u64) + m.encoded.len()).sum();
    // Exact capacity lets grpcio take the Vec without copying it.
    let mut out = Vec::with_capacity(total);
    for m in messages {
        out.push(MESSAGES_FIELD_TAG);
        put_varint(&mut out, m.encoded.len() as u64);
        out.extend_from_slice(&m.encoded);
    }
    debug_assert_eq!(out.len(), total);
    out
}

fn ser_one(msg: &SharedMessage, buf: &mut GrpcSlice) -> grpcio::Result<()> {
    // gRPC owns its send buffer, so one copy per send is the floor (pb_ser copies too).
    *buf = GrpcSlice::from(msg.encoded.clone());
    Ok(())
}

// `&Vec`, not a slice: grpcio's `Marshaller::ser` takes `&T` of the request type.
#[allow(clippy::ptr_arg)]
fn ser_batch(messages: &Vec<SharedMessage>, buf: &mut GrpcSlice) -> grpcio::Result<()> {
    *buf = GrpcSlice::from(encode_batch(messages));
    Ok(())
}

/// Requests are only ever sent by this side, never received.
fn de_unused<T>(_: MessageReader) -> grpcio::Result<T> {
    Err(grpcio::Error::Codec("push-manager never decodes its own outgoing requests".into()))
}

const REPLY_MARSHALLER: Marshaller<NodeReply> = Marshaller { ser: grpcio::pb_ser, de: grpcio::pb_de };

/// `protocol.ConnectNode/Broadcast` with a pre-encoded request.
pub(crate) const BROADCAST: Method<SharedMessage, NodeReply> = Method {
    ty: MethodType::Unary,
    name: "/protocol.ConnectNode/Broadcast",
    req_mar: Marshaller { ser: ser_one, de: de_unused },
    resp_mar: REPLY_MARSHALLER,
};

/// `protocol.ConnectNode/BroadcastBatch` built from pre-encoded requests.
pub(crate) const BROADCAST_BATCH: Method<Vec<SharedMessage>, NodeReply> = Method {
    ty: MethodType::Unary,
    name: "/protocol.ConnectNode/BroadcastBatch",
    req_mar: Marshaller { ser: ser_batch, de: de_unused },
    resp_mar: REPLY_MARSHALLER,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::protocol::{BroadcastBatch, Proto};

    fn request(topic: &str, body_len: usize) -> BroadCastReq {
        let mut proto = Proto::new();
        proto.set_op(7);
        proto.set_body(vec![b'x'; body_len]);
        let mut req = BroadCastReq::new();
        req.set_topic(topic.into());
        req.set_proto(proto);
        req
    }

    #[test]
    fn hand_built_batch_decodes_as_the_protobuf_message() {
        // 200-byte bodies need a two-byte length varint; the empty topic a one-byte one.
        let reqs = [request("a", 3), request("", 200), request("topic-b", 0)];
        let shared: Vec<_> = reqs.iter().map(Outgoing::new).collect();
        let decoded = BroadcastBatch::parse_from_bytes(&encode_batch(&shared)).unwrap();
        assert_eq!(decoded.get_messages(), &reqs[..]);
    }

    #[test]
    fn varint_lengths() {
        for n in [0u64, 1, 127, 128, 16_383, 16_384, u32::MAX as u64] {
            let mut v = Vec::new();
            put_varint(&mut v, n);
            assert_eq!(v.len(), varint_len(n), "n = {n}");
        }
    }
}
