//! `protocol.PushServer`: validates a broadcast and offers it to every node's queue.
//!
//! The handler never blocks (it only `try_send`s), so it runs on gRPC's completion-queue
//! threads directly.

use std::sync::Arc;

use grpcio::{RpcContext, RpcStatus, RpcStatusCode, UnarySink};
use log::debug;

use super::fanout::Fanout;
use super::message::Outgoing;
use crate::auth::KeyFile;
use crate::discovery;
use crate::proto::protocol::{BroadCastReply, BroadCastReq};
use crate::proto::protocol_grpc::PushServer;
use crate::proto::validate_broadcast;

#[derive(Clone)]
pub(crate) struct PushService {
    pub(crate) fanout: Arc<Fanout>,
    pub(crate) discovery: Arc<discovery::Status>,
    pub(crate) max_message_bytes: usize,
    pub(crate) prefix: String,
    pub(crate) etcd_endpoints: String,
    /// Callers must send one of these; `None` when callers are not authenticated by key.
    pub(crate) api_keys: Option<Arc<KeyFile>>,
}

impl PushServer for PushService {
    fn broadcast(&mut self, ctx: RpcContext, req: BroadCastReq, sink: UnarySink<BroadCastReply>) {
        if let Some(Err(refusal)) = self.api_keys.as_ref().map(|keys| keys.check(ctx.request_headers())) {
            debug!("refused a broadcast from {}: {refusal}", ctx.peer());
            ctx.spawn(reply_error(sink, RpcStatusCode::UNAUTHENTICATED, refusal.to_string()));
            return;
        }
        if let Err(msg) = validate_broadcast(&req, self.max_message_bytes) {
            debug!("refused a broadcast from {}: {msg}", ctx.peer());
            ctx.spawn(reply_error(sink, RpcStatusCode::INVALID_ARGUMENT, msg));
            return;
        }
        if self.fanout.node_count() == 0 {
            let msg = if let Some(why) = self.discovery.listing_error() {
                format!(
                    "no connect-node known: listing {:?} in etcd fails ({why}); nothing can deliver this broadcast",
                    self.prefix
                )
            } else if self.discovery.etcd_reachable() {
                format!(
                    "no connect-node is registered under {:?} in etcd; nothing can deliver this broadcast",
                    self.prefix
                )
            } else {
                format!(
                    "no connect-node known and etcd ({}) is unreachable; nothing can deliver this broadcast",
                    self.etcd_endpoints
                )
            };
            ctx.spawn(reply_error(sink, RpcStatusCode::UNAVAILABLE, msg));
            return;
        }
        let report = self.fanout.offer(&Outgoing::new(&req));
        let mut reply = BroadCastReply::new();
        reply.set_targeted(report.targeted);
        reply.set_accepted(report.accepted);
        reply.set_dropped(report.dropped.into());
        ctx.spawn(async move {
            // The caller may have gone away; nothing to do about it.
            let _ = sink.success(reply).await;
        });
    }
}

async fn reply_error(sink: UnarySink<BroadCastReply>, code: RpcStatusCode, msg: String) {
    let _ = sink.fail(RpcStatus::with_message(code, msg)).await;
}
