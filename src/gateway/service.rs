//! The gRPC face of a connect-node: `protocol.ConnectNode`, through which push-manager hands it
//! broadcasts. Publishing only encodes and queues, so the handlers run directly on grpcio's
//! completion-queue threads without blocking them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use grpcio::{RpcContext, RpcStatus, RpcStatusCode, UnarySink};
use log::debug;

use super::hub::Hub;
use crate::proto::protocol::{BroadCastReq, BroadcastBatch, NodeReply};
use crate::proto::protocol_grpc::ConnectNode;

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

/// `ConnectNode` over a [`Hub`]; cloned by grpcio once per completion queue.
#[derive(Clone)]
pub(crate) struct ConnectNodeService {
    hub: Arc<Hub>,
    activity: Arc<Activity>,
}

impl ConnectNodeService {
    pub(crate) fn new(hub: Arc<Hub>, activity: Arc<Activity>) -> ConnectNodeService {
        ConnectNodeService { hub, activity }
    }
}

impl ConnectNode for ConnectNodeService {
    fn broadcast(&mut self, ctx: RpcContext, req: BroadCastReq, sink: UnarySink<NodeReply>) {
        self.activity.touch();
        if !req.has_proto() {
            return fail(&ctx, sink, RpcStatusCode::INVALID_ARGUMENT, "BroadCastReq.proto is required".into());
        }
        if let Err(busy) = self.hub.admit() {
            return fail(&ctx, sink, RpcStatusCode::RESOURCE_EXHAUSTED, busy);
        }
        let delivered = self.hub.publish(&req);
        succeed(&ctx, sink, 1, delivered);
    }

    fn broadcast_batch(&mut self, ctx: RpcContext, batch: BroadcastBatch, sink: UnarySink<NodeReply>) {
        self.activity.touch();
        // All or nothing: a bad message refuses the batch before any of it is delivered.
        if let Some(i) = batch.get_messages().iter().position(|m| !m.has_proto()) {
            return fail(
                &ctx,
                sink,
                RpcStatusCode::INVALID_ARGUMENT,
                format!("BroadcastBatch.messages[{i}].proto is required"),
            );
        }
        if let Err(busy) = self.hub.admit() {
            return fail(&ctx, sink, RpcStatusCode::RESOURCE_EXHAUSTED, busy);
        }
        let delivered = batch.get_messages().iter().map(|m| self.hub.publish(m)).sum();
        succeed(&ctx, sink, batch.get_messages().len() as u32, delivered);
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
