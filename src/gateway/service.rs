//! The gRPC face of a connect-node: `protocol.ConnectNode`, through which push-manager hands it
//! broadcasts. Publishing only encodes and queues, so the handlers run directly on grpcio's
//! completion-queue threads without blocking them.

use std::sync::Arc;

use futures::FutureExt;
use grpcio::{RpcContext, RpcStatus, RpcStatusCode, UnarySink};
use log::debug;

use super::hub::Hub;
use crate::proto::protocol::{BroadCastReq, BroadcastBatch, NodeReply};
use crate::proto::protocol_grpc::ConnectNode;

/// `ConnectNode` over a [`Hub`]; cloned by grpcio once per completion queue.
#[derive(Clone)]
pub(crate) struct ConnectNodeService {
    hub: Arc<Hub>,
}

impl ConnectNodeService {
    pub(crate) fn new(hub: Arc<Hub>) -> ConnectNodeService {
        ConnectNodeService { hub }
    }
}

impl ConnectNode for ConnectNodeService {
    fn broadcast(&mut self, ctx: RpcContext, req: BroadCastReq, sink: UnarySink<NodeReply>) {
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
