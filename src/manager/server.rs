//! `protocol.PushServer`: validates a broadcast or a push to users and offers it to every
//! node's queue.
//!
//! Both methods take the same steps, in one place ([`PushService::offer`]): the caller's key,
//! the request's own rule, a node to deliver to, then the offer and the reply. The handlers
//! never block (they only `try_send`), so they run on gRPC's completion-queue threads directly.

use std::sync::Arc;

use grpcio::{RpcContext, RpcStatus, RpcStatusCode, UnarySink};
use log::debug;

use super::fanout::Fanout;
use super::message::Outgoing;
use crate::auth::KeyFile;
use crate::discovery;
use crate::proto::protocol::{BroadCastReply, BroadCastReq, PushUsersReq};
use crate::proto::protocol_grpc::PushServer;
use crate::proto::{users_broadcast, validate_broadcast, validate_push_users};

#[derive(Clone)]
pub(crate) struct PushService {
    pub(crate) fanout: Arc<Fanout>,
    pub(crate) discovery: Arc<discovery::Status>,
    pub(crate) max_message_bytes: usize,
    /// `Config::max_push_users`.
    pub(crate) max_push_users: usize,
    pub(crate) prefix: String,
    pub(crate) etcd_endpoints: String,
    /// Callers must send one of these; `None` when callers are not authenticated by key.
    pub(crate) api_keys: Option<Arc<KeyFile>>,
}

impl PushService {
    /// Authenticates the caller, then checks the request with `validate` (which also turns it
    /// into what the nodes are sent), then offers that to every node and replies how it went.
    /// `what` names the request in logs and in the no-node refusal.
    fn offer(
        &self,
        ctx: RpcContext,
        sink: UnarySink<BroadCastReply>,
        what: &str,
        validate: impl FnOnce() -> Result<BroadCastReq, String>,
    ) {
        if let Some(Err(refusal)) = self.api_keys.as_ref().map(|keys| keys.check(ctx.request_headers())) {
            debug!("refused a {what} from {}: {refusal}", ctx.peer());
            ctx.spawn(reply_error(sink, RpcStatusCode::UNAUTHENTICATED, refusal.to_string()));
            return;
        }
        let req = match validate() {
            Ok(req) => req,
            Err(msg) => {
                debug!("refused a {what} from {}: {msg}", ctx.peer());
                ctx.spawn(reply_error(sink, RpcStatusCode::INVALID_ARGUMENT, msg));
                return;
            }
        };
        if self.fanout.node_count() == 0 {
            ctx.spawn(reply_error(sink, RpcStatusCode::UNAVAILABLE, self.no_node(what)));
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

    /// Why no node can take a `what`, as precisely as discovery knows.
    fn no_node(&self, what: &str) -> String {
        if let Some(why) = self.discovery.listing_error() {
            format!(
                "no connect-node known: listing {:?} in etcd fails ({why}); nothing can deliver this {what}",
                self.prefix
            )
        } else if self.discovery.etcd_reachable() {
            format!("no connect-node is registered under {:?} in etcd; nothing can deliver this {what}", self.prefix)
        } else {
            format!(
                "no connect-node known and etcd ({}) is unreachable; nothing can deliver this {what}",
                self.etcd_endpoints
            )
        }
    }
}

impl PushServer for PushService {
    fn broadcast(&mut self, ctx: RpcContext, req: BroadCastReq, sink: UnarySink<BroadCastReply>) {
        let max_body = self.max_message_bytes;
        self.offer(ctx, sink, "broadcast", || validate_broadcast(&req, max_body).map(|()| req));
    }

    fn push_users(&mut self, ctx: RpcContext, req: PushUsersReq, sink: UnarySink<BroadCastReply>) {
        let (max_body, max_users) = (self.max_message_bytes, self.max_push_users);
        self.offer(ctx, sink, "push", || {
            validate_push_users(&req, max_body, max_users).map(|()| users_broadcast(&req))
        });
    }
}

async fn reply_error(sink: UnarySink<BroadCastReply>, code: RpcStatusCode, msg: String) {
    let _ = sink.fail(RpcStatus::with_message(code, msg)).await;
}
