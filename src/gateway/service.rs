//! The gRPC face of a connect-node: `protocol.ConnectNode`, through which push-manager hands it
//! broadcasts. Publishing only encodes and queues, so the handlers run directly on grpcio's
//! completion-queue threads without blocking them. A sequenced batch goes through the
//! [`Sequencer`], which publishes it in its sender's order, once. A message carrying a trace
//! context (see [`crate::trace`]) gets a debug line naming its trace when it arrives.
//!
//! push-manager sends its batches over `BroadcastBatchStream`, one long-lived stream per worker:
//! a message on an open stream spares both sides a call's set-up and teardown (about 0.05 ms of
//! a lone batch's trip here). Each batch on a stream follows the unary call's path
//! ([`ConnectNodeService::take_batch`]); a batch the call would refuse ends the stream with the
//! call's status. Stopping ends every open stream ([`OpenStreams`]), since an idle one never
//! ends by itself and the gRPC server's shutdown waits for every call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::future::{select, Either};
use futures::{FutureExt, SinkExt, TryStreamExt};
use grpcio::{DuplexSink, Metadata, RequestStream, RpcContext, RpcStatus, RpcStatusCode, UnarySink, WriteFlags};
use log::debug;
use parking_lot::Mutex;

use super::hub::Hub;
use super::sequencer::{self, Sequencer};
use super::stats::Stats;
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

/// The `BroadcastBatchStream` calls being served, so that stopping can end them.
#[derive(Debug)]
pub(crate) struct OpenStreams {
    /// One per stream being served; dropping it ends that stream. `None` once stopping, which
    /// refuses new streams.
    enders: Mutex<Option<Vec<oneshot::Sender<()>>>>,
    /// Where the streams opened are counted (`batch_streams_opened`).
    stats: Arc<Stats>,
}

impl OpenStreams {
    pub(crate) fn new(stats: Arc<Stats>) -> OpenStreams {
        OpenStreams { enders: Mutex::new(Some(Vec::new())), stats }
    }

    /// What ends a new stream when the node stops; `None` if it is stopping already.
    fn register(&self) -> Option<oneshot::Receiver<()>> {
        let mut enders = self.enders.lock();
        let enders = enders.as_mut()?;
        // A stream that ended dropped its receiver: forget it here, so the list stays as long
        // as the streams open now, whatever the number opened over the node's life.
        enders.retain(|ender| !ender.is_canceled());
        let (ender, ended) = oneshot::channel();
        enders.push(ender);
        Stats::inc(&self.stats.batch_streams_opened);
        Some(ended)
    }

    /// Streams being served now.
    pub(crate) fn count(&self) -> usize {
        self.enders.lock().as_ref().map_or(0, |enders| enders.iter().filter(|e| !e.is_canceled()).count())
    }

    /// Ends every stream with UNAVAILABLE (between batches, never inside one) and refuses new
    /// ones. Idempotent.
    pub(crate) fn end_all(&self) {
        self.enders.lock().take();
    }
}

/// Why a call or a batch of a stream is refused: its status code and message.
type Refusal = (RpcStatusCode, String);

/// `ConnectNode` over a [`Hub`]; cloned by grpcio once per completion queue.
#[derive(Clone)]
pub(crate) struct ConnectNodeService {
    hub: Arc<Hub>,
    activity: Arc<Activity>,
    admission: Admission,
    sequencer: Arc<Sequencer>,
    streams: Arc<OpenStreams>,
}

impl ConnectNodeService {
    pub(crate) fn new(
        hub: Arc<Hub>,
        activity: Arc<Activity>,
        admission: Admission,
        sequencer: Arc<Sequencer>,
        streams: Arc<OpenStreams>,
    ) -> ConnectNodeService {
        ConnectNodeService { hub, activity, admission, sequencer, streams }
    }

    /// The caller's token (`headers` are its call's), when callers must send one.
    fn check_token(&self, headers: &Metadata) -> Result<(), Refusal> {
        match self.admission.token.as_ref().map(|t| t.check(headers)) {
            Some(Err(refusal)) => Err((RpcStatusCode::UNAUTHENTICATED, refusal.to_string())),
            _ => Ok(()),
        }
    }

    /// The caller's token, then every message against the same rule as `PushServer`'s (`Broadcast`'s,
    /// or `PushUsers`' for a message carrying `user_ids`; all or nothing for a batch), then the
    /// event loops' backlog.
    fn admit(&self, headers: &Metadata, messages: &[BroadCastReq]) -> Result<(), Refusal> {
        self.check_token(headers)?;
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

    /// One batch, as `BroadcastBatch` or one element of `BroadcastBatchStream` carries it: all
    /// or nothing (a bad message refuses the batch before any of it is delivered), then in its
    /// sender's order, once.
    fn take_batch(&self, headers: &Metadata, mut batch: BroadcastBatch) -> Result<NodeReply, Refusal> {
        self.activity.touch();
        self.admit(headers, batch.get_messages())?;
        log_traced(batch.get_messages());
        let received = batch.get_messages().len() as u32;
        // Without a sequence (an older push-manager, a tool): delivered as it comes.
        if !batch.has_sequence() {
            return Ok(reply(received, self.hub.publish_batch(batch.get_messages())));
        }
        sequencer::validate(batch.get_sequence(), received as usize)
            .map_err(|why| (RpcStatusCode::INVALID_ARGUMENT, why))?;
        let messages = batch.take_messages().into_vec();
        let now = Instant::now();
        let delivered = self.sequencer.apply(batch.get_sequence(), messages, now, |m| self.hub.publish_batch(m));
        Ok(reply(received, delivered))
    }

    /// Answers each batch of a stream in turn until the sender closes it, a batch is refused
    /// (which ends it with that status) or the node stops.
    async fn serve_stream(
        self,
        headers: Metadata,
        mut batches: RequestStream<BroadcastBatch>,
        mut sink: DuplexSink<NodeReply>,
        mut ended: oneshot::Receiver<()>,
    ) {
        let status = loop {
            let batch = match select(batches.try_next(), &mut ended).await {
                Either::Left((Ok(Some(batch)), _)) => batch,
                Either::Left((Ok(None), _)) => break None,
                Either::Left((Err(e), _)) => return debug!("a BroadcastBatchStream broke: {e}"),
                Either::Right(_) => break Some(stopping()),
            };
            match self.take_batch(&headers, batch) {
                Ok(reply) => {
                    if let Err(e) = sink.send((reply, WriteFlags::default())).await {
                        return debug!("could not send a NodeReply on a stream: {e}");
                    }
                }
                Err(refusal) => break Some(refusal),
            }
        };
        let closed = match status {
            None => sink.close().await,
            Some((code, why)) => {
                debug!("ending a BroadcastBatchStream: {why}");
                sink.fail(RpcStatus::with_message(code, why)).await
            }
        };
        if let Err(e) = closed {
            debug!("could not end a BroadcastBatchStream: {e}");
        }
    }
}

impl ConnectNode for ConnectNodeService {
    fn broadcast(&mut self, ctx: RpcContext, req: BroadCastReq, sink: UnarySink<NodeReply>) {
        self.activity.touch();
        let messages = std::slice::from_ref(&req);
        if let Err((code, why)) = self.admit(ctx.request_headers(), messages) {
            return fail(&ctx, sink, code, why);
        }
        log_traced(messages);
        let delivered = self.hub.publish(&req);
        succeed(&ctx, sink, reply(1, delivered));
    }

    fn broadcast_batch(&mut self, ctx: RpcContext, batch: BroadcastBatch, sink: UnarySink<NodeReply>) {
        match self.take_batch(ctx.request_headers(), batch) {
            Ok(reply) => succeed(&ctx, sink, reply),
            Err((code, why)) => fail(&ctx, sink, code, why),
        }
    }

    fn broadcast_batch_stream(
        &mut self,
        ctx: RpcContext,
        batches: RequestStream<BroadcastBatch>,
        sink: DuplexSink<NodeReply>,
    ) {
        // The token is checked here too, not only with each batch: a sender with a wrong one
        // learns it before it sends anything.
        let opened =
            self.check_token(ctx.request_headers()).and_then(|()| self.streams.register().ok_or_else(stopping));
        match opened {
            Ok(ended) => {
                let headers = ctx.request_headers().clone();
                ctx.spawn(self.clone().serve_stream(headers, batches, sink, ended));
            }
            Err((code, why)) => {
                debug!("refusing a BroadcastBatchStream: {why}");
                ctx.spawn(sink.fail(RpcStatus::with_message(code, why)).map(log_unsent_status));
            }
        }
    }
}

/// What ends a stream, or refuses one, when the node stops.
fn stopping() -> Refusal {
    (RpcStatusCode::UNAVAILABLE, "the node is stopping".to_string())
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

fn reply(received: u32, delivered: u64) -> NodeReply {
    let mut reply = NodeReply::new();
    reply.set_received(received);
    reply.set_delivered(delivered);
    reply
}

fn succeed(ctx: &RpcContext, sink: UnarySink<NodeReply>, reply: NodeReply) {
    ctx.spawn(sink.success(reply).map(|sent| {
        if let Err(e) = sent {
            debug!("could not send a NodeReply: {e}");
        }
    }));
}

fn fail(ctx: &RpcContext, sink: UnarySink<NodeReply>, code: RpcStatusCode, message: String) {
    debug!("refusing a broadcast: {message}");
    ctx.spawn(sink.fail(RpcStatus::with_message(code, message)).map(log_unsent_status));
}

fn log_unsent_status(sent: grpcio::Result<()>) {
    if let Err(e) = sent {
        debug!("could not send an error status: {e}");
    }
}
