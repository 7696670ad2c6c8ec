//! An in-process connect-node stand-in for the manager's tests and the fan-out benchmarks: a
//! real grpcio server implementing `protocol.ConnectNode` that records what it receives (or, for
//! benchmarks, only counts it), and can be told to stall (hold every call unanswered) or to
//! answer each call only after a delay, on a thread of its own. It panics where a test would
//! fail (it cannot bind, say).
//!
//! The recording sink serves the unary calls only, as a node from before `BroadcastBatchStream`
//! does: push-manager's workers fall back to `BroadcastBatch` calls, whose every attempt it can
//! hold, delay or refuse. The counting sink serves the stream too, as a node does, so the
//! benchmarks measure the path push-manager takes to real nodes.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::grpc::ServerTls;
use crate::proto::protocol::{BroadCastReq, BroadcastBatch, NodeReply};
use crate::proto::protocol_grpc::{create_connect_node, ConnectNode};
use futures::{SinkExt, TryStreamExt};
use grpcio::{
    ChannelBuilder, DuplexSink, EnvBuilder, Environment, Marshaller, MessageReader, Method, MethodType, RequestStream,
    RpcContext, RpcStatus, RpcStatusCode, ServerBuilder, ServerCredentials, ServiceBuilder, UnarySink, WriteFlags,
};
use parking_lot::Mutex;

#[derive(Default)]
struct State {
    /// Count only, keep nothing (benchmarks).
    counting_only: bool,
    count: AtomicU64,
    /// Every message with the moment it arrived, in arrival order.
    received: Mutex<Vec<(Instant, BroadCastReq)>>,
    rpcs: AtomicU64,
    batches: AtomicU64,
    stalled: AtomicBool,
    /// Calls held unanswered while stalled.
    parked: Mutex<Vec<(UnarySink<NodeReply>, u32)>>,
    delay_ms: AtomicU64,
    /// Answer every call with this status instead of a reply (a node that is busy or broken).
    refusal: Mutex<Option<RpcStatusCode>>,
}

#[derive(Clone)]
struct Service(Arc<State>);

impl Service {
    fn take(&self, ctx: RpcContext, messages: Vec<BroadCastReq>, sink: UnarySink<NodeReply>) {
        let state = &self.0;
        state.rpcs.fetch_add(1, Ordering::SeqCst);
        let n = messages.len() as u32;
        state.record(messages);
        if let Some(code) = *state.refusal.lock() {
            ctx.spawn(async move {
                let _ = sink.fail(RpcStatus::with_message(code, "refused by the test sink".into())).await;
            });
            return;
        }
        if state.stalled.load(Ordering::SeqCst) {
            state.parked.lock().push((sink, n));
            return;
        }
        let delay = state.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            // Never block a completion-queue thread: answer from a thread of our own.
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(delay));
                futures::executor::block_on(answer(sink, n));
            });
        } else {
            ctx.spawn(answer(sink, n));
        }
    }
}

impl State {
    /// Counts one call, or one batch of a stream, of `n` messages (a counting sink).
    fn counted(&self, n: u32) -> u32 {
        self.count.fetch_add(u64::from(n), Ordering::SeqCst);
        self.rpcs.fetch_add(1, Ordering::SeqCst);
        n
    }

    fn record(&self, messages: Vec<BroadCastReq>) {
        if !self.counting_only {
            let now = Instant::now();
            self.received.lock().extend(messages.iter().map(|m| (now, m.clone())));
        }
        self.count.fetch_add(messages.len() as u64, Ordering::SeqCst);
    }
}

/// A node's reply to a call or a stream batch of `n` messages.
fn received(n: u32) -> NodeReply {
    let mut reply = NodeReply::new();
    reply.set_received(n);
    reply
}

async fn answer(sink: UnarySink<NodeReply>, n: u32) {
    let _ = sink.success(received(n)).await;
}

impl ConnectNode for Service {
    fn broadcast(&mut self, ctx: RpcContext, req: BroadCastReq, sink: UnarySink<NodeReply>) {
        self.take(ctx, vec![req], sink);
    }

    fn broadcast_batch(&mut self, ctx: RpcContext, req: BroadcastBatch, sink: UnarySink<NodeReply>) {
        self.0.batches.fetch_add(1, Ordering::SeqCst);
        let mut req = req;
        self.take(ctx, req.take_messages().into_vec(), sink);
    }
}

fn read_raw(mut reader: MessageReader) -> grpcio::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).map_err(|e| grpcio::Error::Codec(e.into()))?;
    Ok(bytes)
}

fn unused_ser(_: &Vec<u8>, _: &mut grpcio::GrpcSlice) -> grpcio::Result<()> {
    unreachable!("a sink never sends requests")
}

const RAW_BROADCAST: Method<Vec<u8>, NodeReply> = Method {
    ty: MethodType::Unary,
    name: "/protocol.ConnectNode/Broadcast",
    req_mar: Marshaller { ser: unused_ser, de: read_raw },
    resp_mar: Marshaller { ser: grpcio::pb_ser, de: grpcio::pb_de },
};

const RAW_BATCH: Method<Vec<u8>, NodeReply> = Method { name: "/protocol.ConnectNode/BroadcastBatch", ..RAW_BROADCAST };

const RAW_BATCH_STREAM: Method<Vec<u8>, NodeReply> =
    Method { ty: MethodType::Duplex, name: "/protocol.ConnectNode/BroadcastBatchStream", ..RAW_BROADCAST };

/// Messages in an encoded `BroadcastBatch`: its field-1 (length-delimited) entries.
fn count_batch(mut bytes: &[u8]) -> u32 {
    fn varint(bytes: &mut &[u8]) -> u64 {
        let mut v = 0;
        for shift in (0..64).step_by(7) {
            let Some((&b, rest)) = bytes.split_first() else { return v };
            *bytes = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                break;
            }
        }
        v
    }
    let mut n = 0;
    while !bytes.is_empty() {
        let tag = varint(&mut bytes);
        assert_eq!(tag & 7, 2, "BroadcastBatch holds only length-delimited fields");
        let len = varint(&mut bytes) as usize;
        bytes = &bytes[len.min(bytes.len())..];
        n += u32::from(tag >> 3 == 1);
    }
    n
}

fn counting_service(state: Arc<State>) -> grpcio::Service {
    let answer_counted = |state: Arc<State>, count: fn(&[u8]) -> u32| {
        move |ctx: RpcContext, req: Vec<u8>, sink: UnarySink<NodeReply>| {
            ctx.spawn(answer(sink, state.counted(count(&req))));
        }
    };
    let streamed = state.clone();
    ServiceBuilder::new()
        .add_unary_handler(&RAW_BROADCAST, answer_counted(state.clone(), |_| 1))
        .add_unary_handler(&RAW_BATCH, answer_counted(state, count_batch))
        .add_duplex_streaming_handler(&RAW_BATCH_STREAM, move |ctx, batches, sink| {
            ctx.spawn(answer_stream(streamed.clone(), batches, sink));
        })
        .build()
}

/// Counts and answers each batch of a stream, as a node does, until the sender ends it.
async fn answer_stream(state: Arc<State>, mut batches: RequestStream<Vec<u8>>, mut sink: DuplexSink<NodeReply>) {
    while let Ok(Some(batch)) = batches.try_next().await {
        let reply = received(state.counted(count_batch(&batch)));
        if sink.send((reply, WriteFlags::default())).await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}

/// A running stand-in; dropping it answers any held calls and stops serving.
pub struct Sink {
    server: Option<grpcio::Server>,
    pub addr: String,
    /// A second, TLS port on the same server (`counting_with_tls`), counted alike.
    pub tls_addr: Option<String>,
    state: Arc<State>,
}

impl Sink {
    /// Starts on a free loopback port, recording every message.
    pub fn start() -> Sink {
        Sink::start_on("127.0.0.1:0")
    }

    /// Starts on `addr` (e.g. the address of a sink that was stopped, to bring it back).
    pub fn start_on(addr: &str) -> Sink {
        Sink::with_state(addr, State::default())
    }

    /// A sink that only counts the messages it receives, without decoding them: a cheap
    /// instrument for load benchmarks, so the CPU they share goes to what is measured.
    pub fn counting() -> Sink {
        // One completion-queue thread for every counting sink: in a benchmark they stand for
        // remote nodes, so the fewer threads they add to the measured process, the better.
        static ENV: OnceLock<Arc<Environment>> = OnceLock::new();
        let env = ENV.get_or_init(|| Arc::new(EnvBuilder::new().cq_count(1).name_prefix("grpc-sink").build()));
        let state = Arc::new(State { counting_only: true, ..State::default() });
        Sink::serve(env.clone(), "127.0.0.1:0", counting_service(state.clone()), state, None)
    }

    /// [`Sink::counting`], serving TLS with `tls` on a second port (`tls_addr`) as well, so one
    /// run can measure the same nodes with and without TLS.
    pub fn counting_with_tls(tls: &ServerTls) -> Sink {
        let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("grpc-sink").build());
        let state = Arc::new(State { counting_only: true, ..State::default() });
        Sink::serve(env, "127.0.0.1:0", counting_service(state.clone()), state, Some(tls))
    }

    fn with_state(addr: &str, state: State) -> Sink {
        let state = Arc::new(state);
        let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("grpc-sink").build());
        Sink::serve(env, addr, create_connect_node(Service(state.clone())), state, None)
    }

    fn serve(
        env: Arc<Environment>,
        addr: &str,
        service: grpcio::Service,
        state: Arc<State>,
        tls: Option<&ServerTls>,
    ) -> Sink {
        let args = ChannelBuilder::new(env.clone()).reuse_port(false).build_args();
        let mut server =
            ServerBuilder::new(env).channel_args(args).register_service(service).build().expect("sink server builds");
        let port = server.add_listening_port(addr, ServerCredentials::insecure()).expect("sink binds");
        let tls_addr = tls.map(|tls| {
            let credentials = tls.credentials().expect("the sink's certificate is readable");
            let port = server.add_listening_port("127.0.0.1:0", credentials).expect("sink binds its TLS port");
            format!("127.0.0.1:{port}")
        });
        server.start();
        Sink { server: Some(server), addr: format!("127.0.0.1:{port}"), tls_addr, state }
    }

    /// Messages received so far.
    pub fn count(&self) -> usize {
        self.state.count.load(Ordering::SeqCst) as usize
    }

    /// When each message arrived, with its body, in arrival order.
    pub fn arrivals(&self) -> Vec<(Instant, Vec<u8>)> {
        self.state.received.lock().iter().map(|(t, r)| (*t, r.get_proto().get_body().to_vec())).collect()
    }

    /// Each message as received, in arrival order.
    pub fn messages(&self) -> Vec<BroadCastReq> {
        self.state.received.lock().iter().map(|(_, r)| r.clone()).collect()
    }

    /// The body of each message, in arrival order.
    pub fn bodies(&self) -> Vec<Vec<u8>> {
        self.state.received.lock().iter().map(|(_, r)| r.get_proto().get_body().to_vec()).collect()
    }

    /// Calls received so far, batched or not, and batches received on streams (the counting sink).
    pub fn rpcs(&self) -> u64 {
        self.state.rpcs.load(Ordering::SeqCst)
    }

    /// `BroadcastBatch` calls received so far (a recording sink only).
    pub fn batches(&self) -> u64 {
        self.state.batches.load(Ordering::SeqCst)
    }

    /// Holds every call unanswered until `unstall`.
    pub fn stall(&self) {
        self.state.stalled.store(true, Ordering::SeqCst);
    }

    /// Answers the held calls and answers every call again.
    pub fn unstall(&self) {
        self.state.stalled.store(false, Ordering::SeqCst);
        let parked = std::mem::take(&mut *self.state.parked.lock());
        for (sink, n) in parked {
            futures::executor::block_on(answer(sink, n));
        }
    }

    /// Calls held unanswered right now.
    pub fn parked(&self) -> usize {
        self.state.parked.lock().len()
    }

    /// Answers every call from now on with `code` (`None`: answer normally again); what the
    /// calls carried is still recorded, so each attempt shows in `arrivals`.
    pub fn refuse_with(&self, code: Option<RpcStatusCode>) {
        *self.state.refusal.lock() = code;
    }

    /// Each call is answered this long after it arrives.
    pub fn answer_after(&self, delay: Duration) {
        self.state.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Stops serving; the address is free again afterwards.
    pub fn stop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = futures::executor::block_on(s.shutdown());
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.unstall();
        self.stop();
    }
}
