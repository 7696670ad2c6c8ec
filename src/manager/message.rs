//! A broadcast as it travels to connect-nodes: encoded once, shared by every node's queue, and
//! numbered per node so that the node can apply what one sender sends it in order, once.
//!
//! The node client does not re-encode per node or per batch. `ConnectNode.BroadcastBatch` is
//! written by hand as the concatenation of `messages` fields (tag, length, encoded request)
//! followed by the `sequence` field, which is exactly what protobuf would produce for
//! `BroadcastBatch { repeated BroadCastReq messages = 1; Sequence sequence = 2; }`. So a message
//! costs one allocation however many nodes and batches carry it. Every batch is sequenced, one
//! message or many: the unary `Broadcast` has no room for a sequence number. The same bytes go
//! as a `BroadcastBatchStream` message or as a `BroadcastBatch` call.

use std::sync::Arc;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::SystemTime;

use std::cell::Cell;

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

/// A message in one node's queue, numbered where the queue accepted it.
#[derive(Debug, Clone)]
pub(crate) struct Queued {
    pub(crate) seq: u64,
    pub(crate) msg: SharedMessage,
}

/// Bytes of a [`SenderId`]: the instance's 8, then the node client's number's 4.
const SENDER_ID_BYTES: usize = 12;

/// Who numbers a node's messages: this push-manager instance (random at start) and its client
/// of that node (a process-unique number). A node client that is started again for the same node
/// (it left etcd and came back) is a new sender, so it can start again at 0 without the node
/// taking its messages for ones it has already applied.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct SenderId([u8; SENDER_ID_BYTES]);

impl SenderId {
    pub(crate) fn new(instance: u64, node_number: u32) -> SenderId {
        let mut id = [0; SENDER_ID_BYTES];
        id[..8].copy_from_slice(&instance.to_be_bytes());
        id[8..].copy_from_slice(&node_number.to_be_bytes());
        SenderId(id)
    }
}

impl std::fmt::Display for SenderId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for SenderId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SenderId({self})")
    }
}

/// A random id for this push-manager instance: std's per-process random hash keys, mixed with
/// the time and the process id so that two instances started together differ too.
pub(crate) fn random_instance_id() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// One `BroadcastBatch` call: the messages, their sender, and the sender's low water mark at
/// this attempt (a retry carries the mark of its own time).
#[derive(Debug)]
pub(crate) struct BatchRequest {
    pub(crate) sender: SenderId,
    pub(crate) messages: Vec<Queued>,
    pub(crate) low_water: u64,
}

/// `BroadcastBatch.messages` is field 1, length-delimited: tag byte (1 << 3) | 2.
const MESSAGES_FIELD_TAG: u8 = 0x0a;
/// `BroadcastBatch.sequence`, field 2, length-delimited.
const SEQUENCE_FIELD_TAG: u8 = 0x12;
/// `Sequence.sender`, field 1, length-delimited.
const SENDER_FIELD_TAG: u8 = 0x0a;
/// `Sequence.seqs`, field 2, packed (length-delimited) varints.
const SEQS_FIELD_TAG: u8 = 0x12;
/// `Sequence.low_water`, field 3, varint.
const LOW_WATER_FIELD_TAG: u8 = 0x18;

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

/// Bytes of a length-delimited field with a one-byte tag and `len` bytes of content.
fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// The encoded `BroadcastBatch` carrying `batch.messages` in order, and their sequence.
pub(crate) fn encode_batch(batch: &BatchRequest) -> Vec<u8> {
    let seqs_len: usize = batch.messages.iter().map(|q| varint_len(q.seq)).sum();
    let sequence_len = field_len(SENDER_ID_BYTES) + field_len(seqs_len) + 1 + varint_len(batch.low_water);
    let messages_len: usize = batch.messages.iter().map(|q| field_len(q.msg.encoded.len())).sum();
    let total = messages_len + field_len(sequence_len);
    // Exact capacity lets grpcio take the Vec without copying it.
    let mut out = Vec::with_capacity(total);
    for q in &batch.messages {
        out.push(MESSAGES_FIELD_TAG);
        put_varint(&mut out, q.msg.encoded.len() as u64);
        out.extend_from_slice(&q.msg.encoded);
    }
    out.push(SEQUENCE_FIELD_TAG);
    put_varint(&mut out, sequence_len as u64);
    out.push(SENDER_FIELD_TAG);
    put_varint(&mut out, SENDER_ID_BYTES as u64);
    out.extend_from_slice(&batch.sender.0);
    out.push(SEQS_FIELD_TAG);
    put_varint(&mut out, seqs_len as u64);
    for q in &batch.messages {
        put_varint(&mut out, q.seq);
    }
    out.push(LOW_WATER_FIELD_TAG);
    put_varint(&mut out, batch.low_water);
    debug_assert_eq!(out.len(), total);
    out
}

fn ser_batch(batch: &BatchRequest, buf: &mut GrpcSlice) -> grpcio::Result<()> {
    *buf = GrpcSlice::from(encode_batch(batch));
    Ok(())
}

/// Requests are only ever sent by this side, never received.
fn de_unused<T>(_: MessageReader) -> grpcio::Result<T> {
    Err(grpcio::Error::Codec("push-manager never decodes its own outgoing requests".into()))
}

const REPLY_MARSHALLER: Marshaller<NodeReply> = Marshaller { ser: grpcio::pb_ser, de: grpcio::pb_de };

/// `protocol.ConnectNode/BroadcastBatch` built from pre-encoded requests.
pub(crate) const BROADCAST_BATCH: Method<BatchRequest, NodeReply> = Method {
    ty: MethodType::Unary,
    name: "/protocol.ConnectNode/BroadcastBatch",
    req_mar: Marshaller { ser: ser_batch, de: de_unused },
    resp_mar: REPLY_MARSHALLER,
};

/// An encoded `BroadcastBatch` for a stream, whose sink takes its messages by value: the bytes
/// are moved into gRPC's buffer when it is sent, not copied (a marshaller only sees a reference).
pub(crate) struct EncodedBatch(Cell<Vec<u8>>);

impl EncodedBatch {
    pub(crate) fn new(batch: &BatchRequest) -> EncodedBatch {
        EncodedBatch(Cell::new(encode_batch(batch)))
    }
}

fn ser_encoded(batch: &EncodedBatch, buf: &mut GrpcSlice) -> grpcio::Result<()> {
    *buf = GrpcSlice::from(batch.0.take());
    Ok(())
}

/// `protocol.ConnectNode/BroadcastBatchStream`, carrying pre-encoded batches.
pub(crate) const BROADCAST_BATCH_STREAM: Method<EncodedBatch, NodeReply> = Method {
    ty: MethodType::Duplex,
    name: "/protocol.ConnectNode/BroadcastBatchStream",
    req_mar: Marshaller { ser: ser_encoded, de: de_unused },
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
        // 200-byte bodies need a two-byte length varint; the empty topic a one-byte one; seqs
        // from one to three bytes.
        let reqs = [request("a", 3), request("", 200), request("topic-b", 0)];
        let seqs = [5, 300, 70_000];
        let messages = reqs.iter().zip(seqs).map(|(r, seq)| Queued { seq, msg: Outgoing::new(r) }).collect();
        let sender = SenderId::new(0x0102_0304_0506_0708, 9);
        let batch = BatchRequest { sender, messages, low_water: 4 };
        let decoded = BroadcastBatch::parse_from_bytes(&encode_batch(&batch)).unwrap();
        assert_eq!(decoded.get_messages(), &reqs[..]);
        let sequence = decoded.get_sequence();
        assert_eq!(sequence.get_sender(), &[1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 9]);
        assert_eq!(sequence.get_seqs(), &seqs);
        assert_eq!(sequence.get_low_water(), 4);
        assert_eq!(sender.to_string(), "010203040506070800000009");
    }

    #[test]
    fn instance_ids_differ() {
        assert_ne!(random_instance_id(), random_instance_id());
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
