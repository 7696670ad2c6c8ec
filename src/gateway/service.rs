//! The gRPC face of a connect-node: `protocol.ConnectNode`, through which push-manager hands it
//! broadcasts. Publishing only encodes and queues, so the handlers run directly on grpcio's
//! completion-queue threads without blocking them. A sequenced batch goes through the
//! [`Sequencer`], which publishes it in its sender's order, once. A message carrying a trace
//! context (see [`crate::trace`]) gets a debug line naming its trace when it arrives.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use grpcio::{RpcContext, RpcStatus, RpcStatusCode, UnarySink};
use log::debug;

use super::hub::Hub;
use super::sequencer::{self, Sequencer};
use crate::auth::KeyFile;
use crate::proto::protocol::{BroadCastReq, BroadcastBatch, NodeReply};
use crate::proto::protocol_grpc::ConnectNode;
use crate::proto::{describe_message, validate_node_message};
use crate::trace::TraceParent;

/// When the last ConnectNode call arrived: how a stopping node tells that push-manager has
/// stopped sending to it.
#[derive(Debug)]
pub(crate) struct Activity {
    since: Instant,
    /// Milliseconds from `since` to the last call; 0 before any.
    last_call_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity { since: Instant::now(), last_call_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_call_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// When the last call arrived, to the millisecond (the start for none yet).
    pub(crate) fn last_call(&self) -> Instant {
        self.since + Duration::from_millis(self.last_call_ms.load(Ordering::Relaxed))
    }
}

/// What a `ConnectNode` call must satisfy before anything of it is delivered.
#[derive(Clone, Debug)]
pub(crate) struct Admission {
    /// push-manager must send one of these; `None` when callers are not authenticated by token.
    pub(crate) token: Option<Arc<KeyFile>>,
    /// `Config::max_message_bytes`.
    pub(crate) max_message_bytes: usize,
    /// `Config::max_batch_messages`.
    pub(crate) max_batch_messages: usize,
    /// `Config::max_push_users`.
    pub(crate) max_push_users: usize,
}

/// `ConnectNode` over a [`Hub`]; cloned by grpcio once per completion queue.
#[derive(Clone)]
pub(crate) struct ConnectNodeService {
    hub: Arc<Hub>,
    activity: Arc<Activity>,
    admission: Admission,
    sequencer: Arc<Sequencer>,
}

impl ConnectNodeService {
    pub(crate) fn new(
        hub: Arc<Hub>,
        activity: Arc<Activity>,
        admission: Admission,
        sequencer: Arc<Sequencer>,
    ) -> ConnectNodeService {
        ConnectNodeService { hub, activity, admission, sequencer }
    }

    /// The caller's token, then every message against the same rule as `PushServer`'s (`Broadcast`'s,
    /// or `PushUsers`' for a message carrying `user_ids`; all or nothing for a batch), then the
    /// event loops' backlog.
    fn admit(&self, ctx: &RpcContext, messages: &[BroadCastReq]) -> Result<(), (RpcStatusCode, String)> {
        if let Some(Err(refusal)) = self.admission.token.as_ref().map(|t| t.check(ctx.request_headers())) {
            return Err((RpcStatusCode::UNAUTHENTICATED, refusal.to_string()));
        }
        if messages.len() > self.admission.max_batch_messages {
            return Err((
                RpcStatusCode::INVALID_ARGUMENT,
                format!(
                    "the batch holds {} messages; the limit is {} (--max-batch-messages)",
                    messages.len(),
                    self.admission.max_batch_messages
                ),
            ));
        }
        for (i, m) in messages.iter().enumerate() {
            let Admission { max_message_bytes, max_push_users, .. } = self.admission;
            if let Err(why) = validate_node_message(m, max_message_bytes, max_push_users) {
                let which = if messages.len() == 1 { String::new() } else { format!("messages[{i}]: ") };
                return Err((RpcStatusCode::INVALID_ARGUMENT, format!("{which}{why}")));
            }
        }
        self.hub.admit().map_err(|busy| (RpcStatusCode::RESOURCE_EXHAUSTED, busy))
    }
}

impl ConnectNode for ConnectNodeService {
    fn broadcast(&mut self, ctx: RpcContext, req: BroadCastReq, sink: UnarySink<NodeReply>) {
        self.activity.touch();
        let messages = std::slice::from_ref(&req);
        if let Err((code, why)) = self.admit(&ctx, messages) {
            return fail(&ctx, sink, code, why);
        }
        log_traced(messages);
        let delivered = self.hub.publish(&req);
        succeed(&ctx, sink, 1, delivered);
    }

    fn broadcast_batch(&mut self, ctx: RpcContext, mut batch: BroadcastBatch, sink: UnarySink<NodeReply>) {
        self.activity.touch();
        // All or nothing: a bad message refuses the batch before any of it is delivered.
        if let Err((code, why)) = self.admit(&ctx, batch.get_messages()) {
            return fail(&ctx, sink, code, why);
        }
        log_traced(batch.get_messages());
        let received = batch.get_messages().len();
        // Without a sequence (an older push-manager, a tool): delivered as it comes.
        if !batch.has_sequence() {
            let delivered = self.hub.publish_batch(batch.get_messages());
            return succeed(&ctx, sink, received as u32, delivered);
        }
        if let Err(why) = sequencer::validate(batch.get_sequence(), received) {
            return fail(&ctx, sink, RpcStatusCode::INVALID_ARGUMENT, why);
        }
        let messages = batch.take_messages().into_vec();
        let now = Instant::now();
        let delivered = self.sequencer.apply(batch.get_sequence(), messages, now, |m| self.hub.publish_batch(m));
        succeed(&ctx, sink, received as u32, delivered);
    }
}

/// A debug line for each message that carries a trace context, naming its trace, so that a
/// traced message can be followed from push-manager's log into this node's.
fn log_traced(messages: &[BroadCastReq]) {
    if !log::log_enabled!(log::Level::Debug) {
        return;
    }
    for m in messages.iter().filter(|m| !m.get_traceparent().is_empty()) {
        match TraceParent::parse(m.get_traceparent()) {
            Ok(trace) => debug!("received {}; trace {}", describe_message(m), trace.trace_id()),
            Err(why) => debug!("received {}; ignored its trace context: {why}", describe_message(m)),
        }
    }
}

fn succeed(ctx: &RpcContext, sink: UnarySink<NodeReply>, received: u32, delivered: u64) {
    let mut reply = NodeReply::new();
    reply.set_received(received);
    reply.set_delivered(delivered);
    ctx.spawn(sink.success(reply).map(|sent| {
        if let Err(e) = sent {
            debug!("could not send a NodeReply: {e}");
        }
    }));
}

fn fail(ctx: &RpcContext, sink: UnarySink<NodeReply>, code: RpcStatusCode, message: String) {
    debug!("refusing a broadcast: {message}");
    let status = RpcStatus::with_message(code, message);
    ctx.spawn(sink.fail(status).map(|sent| {
        if let Err(e) = sent {
            debug!("could not send an error status: {e}");
        }
    }));
}
