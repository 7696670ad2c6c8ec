//! `protocol.PushServer`: validates a broadcast or a push to users and offers it to every
//! node's queue, one request per call or many over a stream.
//!
//! Every method takes the same steps, in one place: the caller's key ([`PushService::admit`],
//! once per call, so once per stream), then per message the request's own rule, a node to
//! deliver to, the offer and the outcome ([`PushService::offer`]). A unary call turns the outcome
//! into its reply or status; a stream turns it into one [`StreamReply`] and goes on. The handlers
//! never block (they only `try_send`), so they run on gRPC's completion-queue threads directly.
//! A caller's W3C `traceparent` (see [`crate::trace`]) rides along with each of its messages.
//!
//! A stream element carries one message or many, answered by one `StreamReplies`: a gRPC
//! message (a receive, a send, their completion-queue round trips and a write syscall) costs
//! far more than offering a broadcast, so only batches let one connection publish 100k+
//! messages per second. A stream is flow-controlled by grpcio's futures: `DuplexSink::send_all`
//! asks for the next element only once the sink can take the previous replies, so a caller
//! publishing faster than the replies drain (or one that stops reading them) is held back by
//! HTTP/2 flow control, and push-manager holds the replies of an element or two per stream. A
//! message the node queues cannot take is reported `dropped`, as in unary, never waited for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::{FutureExt, SinkExt, StreamExt};
use grpcio::{DuplexSink, RequestStream, RpcContext, RpcStatus, RpcStatusCode, UnarySink, WriteFlags};
use log::debug;

use super::fanout::Fanout;
use super::message::Outgoing;
use crate::auth::KeyFile;
use crate::discovery;
use crate::proto::protocol::{
    BroadCastReply, BroadCastReq, BroadcastStreamReq, PushUsersReq, PushUsersStreamReq, StreamReplies, StreamReply,
};
use crate::proto::protocol_grpc::PushServer;
use crate::proto::{describe_message, users_broadcast, validate_broadcast, validate_push_users};
use crate::trace::TraceParent;

/// The most messages one stream element may carry: bounds the replies built for one element
/// (and the work done before the next reply can leave) whatever the element's byte size.
pub(crate) const MAX_STREAM_ELEMENT: usize = 1024;

/// What became of the messages callers sent (broadcasts and pushes to users, unary or
/// streamed), for the admin endpoint's `push_manager_broadcasts_total{result}`.
#[derive(Debug, Default)]
pub(crate) struct Outcomes {
    /// Offered to the node set.
    pub(crate) ok: AtomicU64,
    /// Refused by the request's rule (INVALID_ARGUMENT).
    pub(crate) invalid: AtomicU64,
    /// Calls or streams refused for their API key (UNAUTHENTICATED); their messages are not read.
    pub(crate) unauthenticated: AtomicU64,
    /// Refused because no connect-node was known (UNAVAILABLE).
    pub(crate) no_nodes: AtomicU64,
}

impl Outcomes {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

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
    pub(crate) outcomes: Arc<Outcomes>,
}

impl PushService {
    /// Whether the caller may call at all: its API key, when keys are required. `what` names the
    /// call in the log.
    fn admit(&self, ctx: &RpcContext, what: &str) -> Result<(), RpcStatus> {
        match self.api_keys.as_ref().map(|keys| keys.check(ctx.request_headers())) {
            Some(Err(refusal)) => {
                debug!("refused a {what} from {}: {refusal}", ctx.peer());
                Outcomes::count(&self.outcomes.unauthenticated);
                Err(RpcStatus::with_message(RpcStatusCode::UNAUTHENTICATED, refusal.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// The caller's trace context, from the call's metadata; an invalid one is ignored (and said
    /// so at debug level), as W3C wants, not a reason to refuse the call.
    fn trace(&self, ctx: &RpcContext, what: &str) -> Option<TraceParent> {
        match TraceParent::from_metadata(ctx.request_headers())? {
            Ok(trace) => Some(trace),
            Err(why) => {
                debug!("ignored the trace context of a {what} from {}: {why}", ctx.peer());
                None
            }
        }
    }

    /// Checks one message with `validate` (which also turns it into what the nodes are sent),
    /// then offers that, with the caller's `trace` if any, to every node and says how it went.
    /// `what` names the message in the no-node refusal.
    fn offer(
        &self,
        what: &str,
        trace: Option<&TraceParent>,
        validate: impl FnOnce() -> Result<BroadCastReq, String>,
    ) -> Result<BroadCastReply, RpcStatus> {
        let mut req = validate().map_err(|msg| {
            Outcomes::count(&self.outcomes.invalid);
            RpcStatus::with_message(RpcStatusCode::INVALID_ARGUMENT, msg)
        })?;
        if self.fanout.node_count() == 0 {
            Outcomes::count(&self.outcomes.no_nodes);
            return Err(RpcStatus::with_message(RpcStatusCode::UNAVAILABLE, self.no_node(what)));
        }
        Outcomes::count(&self.outcomes.ok);
        // Replaces whatever the caller put in the field: only its metadata says what its trace is.
        req.set_traceparent(trace.map(|t| t.as_str().to_string()).unwrap_or_default());
        let report = self.fanout.offer(&Outgoing::new(&req));
        if let Some(trace) = trace {
            debug!(
                "{}: offered to {} node(s), accepted by {}; trace {}",
                describe_message(&req),
                report.targeted,
                report.accepted,
                trace.trace_id()
            );
        }
        let mut reply = BroadCastReply::new();
        reply.set_targeted(report.targeted);
        reply.set_accepted(report.accepted);
        reply.set_dropped(report.dropped.into());
        Ok(reply)
    }

    /// A unary call: admits the caller, offers its one message, and replies.
    fn unary(
        &self,
        ctx: RpcContext,
        sink: UnarySink<BroadCastReply>,
        what: &str,
        validate: impl FnOnce() -> Result<BroadCastReq, String>,
    ) {
        let outcome = self.admit(&ctx, what).and_then(|()| self.offer(what, self.trace(&ctx, what).as_ref(), validate));
        // The caller may have gone away; nothing to do about it.
        match outcome {
            Ok(reply) => ctx.spawn(sink.success(reply).map(drop)),
            Err(status) => {
                if status.code() == RpcStatusCode::INVALID_ARGUMENT {
                    debug!("refused a {what} from {}: {}", ctx.peer(), status.message());
                }
                ctx.spawn(sink.fail(status).map(drop))
            }
        }
    }

    /// A stream: admits the caller once, then answers each element with the outcome of each of
    /// its messages, in order, until the caller closes its side (the stream then ends with OK),
    /// sends an element of more than [`MAX_STREAM_ELEMENT`] messages, or goes away.
    fn stream<Element: Send + 'static, Req: Send + 'static>(
        &self,
        ctx: RpcContext,
        elements: RequestStream<Element>,
        mut sink: DuplexSink<StreamReplies>,
        what: &'static str,
        messages: fn(Element) -> Vec<Req>,
        validate: fn(&PushService, Req) -> Result<BroadCastReq, String>,
    ) {
        if let Err(status) = self.admit(&ctx, what) {
            // Dropping an unfinished request stream cancels the call, which would replace the
            // status by CANCELLED: it goes only once the status is out.
            ctx.spawn(sink.fail(status).map(move |_| drop(elements)));
            return;
        }
        let service = self.clone();
        // One trace context for the whole stream: metadata comes once, with the call.
        let trace = self.trace(&ctx, what);
        let mut index = 0;
        let mut replies = elements.map(move |element| {
            let batch = messages(element?);
            if batch.len() > MAX_STREAM_ELEMENT {
                let msg = format!("a stream element holds {} messages; the limit is {MAX_STREAM_ELEMENT}", batch.len());
                return Err(grpcio::Error::RpcFinished(Some(RpcStatus::with_message(
                    RpcStatusCode::INVALID_ARGUMENT,
                    msg,
                ))));
            }
            let mut out = StreamReplies::new();
            out.set_replies(
                batch
                    .into_iter()
                    .map(|req| {
                        let reply =
                            stream_reply(index, service.offer(what, trace.as_ref(), || validate(&service, req)));
                        index += 1;
                        reply
                    })
                    .collect(),
            );
            Ok((out, WriteFlags::default()))
        });
        // Replies leave in batches when they queue up, one at a time when they do not.
        sink.enhance_batch(true);
        let peer = ctx.peer();
        ctx.spawn(async move {
            let sent = sink.send_all(&mut replies).await;
            let ended = match sent {
                Ok(()) => sink.close().await,
                Err(grpcio::Error::RpcFinished(Some(status))) => {
                    debug!("ended a {what} stream from {peer}: {}", status.message());
                    sink.fail(status).await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = ended {
                debug!("a {what} stream from {peer} ended early: {e}");
            }
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

    fn check_broadcast(&self, req: BroadCastReq) -> Result<BroadCastReq, String> {
        validate_broadcast(&req, self.max_message_bytes).map(|()| req)
    }

    fn check_push_users(&self, req: PushUsersReq) -> Result<BroadCastReq, String> {
        validate_push_users(&req, self.max_message_bytes, self.max_push_users).map(|()| users_broadcast(&req))
    }
}

/// The reply to message `index` of a stream, whatever its outcome.
fn stream_reply(index: u64, outcome: Result<BroadCastReply, RpcStatus>) -> StreamReply {
    let mut reply = StreamReply::new();
    reply.set_index(index);
    match outcome {
        Ok(offered) => reply.set_reply(offered),
        Err(status) => {
            reply.set_code(status.code().into());
            reply.set_error(status.message().to_string());
        }
    }
    reply
}

impl PushServer for PushService {
    fn broadcast(&mut self, ctx: RpcContext, req: BroadCastReq, sink: UnarySink<BroadCastReply>) {
        self.unary(ctx, sink, "broadcast", || self.check_broadcast(req));
    }

    fn push_users(&mut self, ctx: RpcContext, req: PushUsersReq, sink: UnarySink<BroadCastReply>) {
        self.unary(ctx, sink, "push", || self.check_push_users(req));
    }

    fn broadcast_stream(
        &mut self,
        ctx: RpcContext,
        elements: RequestStream<BroadcastStreamReq>,
        sink: DuplexSink<StreamReplies>,
    ) {
        let messages = |mut e: BroadcastStreamReq| e.take_messages().into_vec();
        self.stream(ctx, elements, sink, "broadcast", messages, PushService::check_broadcast);
    }

    fn push_users_stream(
        &mut self,
        ctx: RpcContext,
        elements: RequestStream<PushUsersStreamReq>,
        sink: DuplexSink<StreamReplies>,
    ) {
        let messages = |mut e: PushUsersStreamReq| e.take_messages().into_vec();
        self.stream(ctx, elements, sink, "push", messages, PushService::check_push_users);
    }
}
