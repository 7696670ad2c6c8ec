//! In order and at most once to every node (issue 13): push-manager with parallel workers and
//! retries, a real connect-node (in-process gateway, real hub, real WebSocket subscriber), and
//! between them a relay that delays, answers late or fails chosen batches, as a slow or flaky
//! network and node would. The relay takes push-manager's streams, as a node does; the jittery
//! test also runs over `BroadcastBatch` calls, what push-manager sends a node without streams.

mod common;

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::gateway::{start_gateway, wait_connections};
use common::grpc::{batch, broadcast, node_client, push_client, refused, OP};
use common::ws::Client;
use common::{wait_until, PATIENCE};
use futures::executor::{block_on, block_on_stream};
use futures::SinkExt;
use grpcio::{
    CallOption, ChannelBuilder, DuplexSink, EnvBuilder, Environment, Marshaller, MessageReader, Method, MethodType,
    RequestStream, RpcStatus, RpcStatusCode, ServerBuilder, ServerCredentials, ServiceBuilder, UnarySink, WriteFlags,
};
use parking_lot::Mutex;
use protobuf::Message as _;
use push_manager::gateway::Gateway;
use push_manager::manager::{self, Manager};
use push_manager::proto::broadcast_request;
use push_manager::proto::protocol::{BroadcastBatch, Sequence};
use push_manager::registry::{Record, Registration, RegistrationConfig};

const PREFIX: &str = "/ordering/nodes/";
const TOPIC: &str = "t";

/// What the relay does with one call, chosen from what the call carries.
#[derive(Debug, Clone, Copy)]
enum Action {
    /// Forward after this long, then pass the answer back.
    Forward(Duration),
    /// Forward at once (the node applies it), pass the answer back only this much later.
    AnswerLate(Duration),
    /// Hold the call this long without forwarding, then fail it with UNAVAILABLE.
    FailAfter(Duration),
}

type Policy = dyn Fn(&BroadcastBatch) -> Action + Send + Sync;

fn read_raw(mut reader: MessageReader) -> grpcio::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).map_err(|e| grpcio::Error::Codec(e.into()))?;
    Ok(bytes)
}

#[allow(clippy::ptr_arg)]
fn write_raw(bytes: &Vec<u8>, buf: &mut grpcio::GrpcSlice) -> grpcio::Result<()> {
    *buf = grpcio::GrpcSlice::from(bytes.clone());
    Ok(())
}

/// `ConnectNode/BroadcastBatch`, both ways as bytes: the relay passes calls on untouched.
const RAW_BATCH: Method<Vec<u8>, Vec<u8>> = Method {
    ty: MethodType::Unary,
    name: "/protocol.ConnectNode/BroadcastBatch",
    req_mar: Marshaller { ser: write_raw, de: read_raw },
    resp_mar: Marshaller { ser: write_raw, de: read_raw },
};

/// `ConnectNode/BroadcastBatchStream`, both ways as bytes.
const RAW_BATCH_STREAM: Method<Vec<u8>, Vec<u8>> =
    Method { ty: MethodType::Duplex, name: "/protocol.ConnectNode/BroadcastBatchStream", ..RAW_BATCH };

/// How push-manager's batches reach the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// Over a stream per worker, as to a node.
    Streams,
    /// As `BroadcastBatch` calls, as to a node from before the stream (the relay lacks it).
    Calls,
}

/// A `ConnectNode` server that passes each batch on to a real node as its policy says, from a
/// thread per call or per stream, so that batches overtake one another as on a real network.
struct Relay {
    server: grpcio::Server,
    addr: String,
    calls: Arc<AtomicU64>,
    /// Streams push-manager opened to it.
    streams: Arc<AtomicU64>,
}

impl Relay {
    fn start(upstream: &str, policy: Arc<Policy>, transport: Transport) -> Relay {
        let env: Arc<Environment> = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("relay").build());
        let client = grpcio::Client::new(ChannelBuilder::new(env.clone()).connect(upstream));
        let calls = Arc::new(AtomicU64::new(0));
        let relay = Relayed { client, policy, calls: calls.clone() };
        let one = relay.clone();
        let mut service = ServiceBuilder::new().add_unary_handler(&RAW_BATCH, move |_ctx, req, sink| {
            let one = one.clone();
            thread::spawn(move || one.relay_call(req, sink));
        });
        let streams = Arc::new(AtomicU64::new(0));
        let opened = streams.clone();
        if transport == Transport::Streams {
            service = service.add_duplex_streaming_handler(&RAW_BATCH_STREAM, move |_ctx, batches, sink| {
                opened.fetch_add(1, Ordering::SeqCst);
                let relay = relay.clone();
                thread::spawn(move || relay.relay_stream(batches, sink));
            });
        }
        let mut server = ServerBuilder::new(env).register_service(service.build()).build().expect("relay builds");
        let port = server.add_listening_port("127.0.0.1:0", ServerCredentials::insecure()).expect("relay binds");
        server.start();
        Relay { server, addr: format!("127.0.0.1:{port}"), calls, streams }
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    fn streams(&self) -> u64 {
        self.streams.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = block_on(self.server.shutdown());
    }
}

/// What the relay's threads share.
#[derive(Clone)]
struct Relayed {
    client: grpcio::Client,
    policy: Arc<Policy>,
    /// Batches relayed, by call or on a stream.
    calls: Arc<AtomicU64>,
}

impl Relayed {
    /// Does what the policy says with one batch; the node's answer, or the status to fail with.
    fn relay(&self, req: &Vec<u8>) -> Result<Vec<u8>, RpcStatus> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let action = (self.policy)(&BroadcastBatch::parse_from_bytes(req).expect("push-manager sends a valid batch"));
        let forward = || self.client.unary_call(&RAW_BATCH, req, CallOption::default().timeout(PATIENCE));
        let answer = match action {
            Action::Forward(delay) => {
                thread::sleep(delay);
                forward()
            }
            Action::AnswerLate(late) => {
                let answer = forward();
                thread::sleep(late);
                answer
            }
            Action::FailAfter(after) => {
                thread::sleep(after);
                return Err(RpcStatus::with_message(RpcStatusCode::UNAVAILABLE, "relay drops it".into()));
            }
        };
        answer.map_err(|e| match e {
            grpcio::Error::RpcFailure(status) => status,
            e => RpcStatus::with_message(RpcStatusCode::UNAVAILABLE, e.to_string()),
        })
    }

    fn relay_call(&self, req: Vec<u8>, sink: UnarySink<Vec<u8>>) {
        let _ = match self.relay(&req) {
            Ok(reply) => block_on(sink.success(reply)),
            Err(status) => block_on(sink.fail(status)),
        };
    }

    /// Relays each batch of one stream in turn; a failure ends the stream with its status.
    fn relay_stream(&self, batches: RequestStream<Vec<u8>>, mut sink: DuplexSink<Vec<u8>>) {
        for req in block_on_stream(batches) {
            // An error: push-manager cancelled the stream (a deadline passed, or it stopped).
            let Ok(req) = req else { return };
            match self.relay(&req) {
                Ok(reply) => {
                    if block_on(sink.send((reply, WriteFlags::default()))).is_err() {
                        return;
                    }
                }
                Err(status) => {
                    let _ = block_on(sink.fail(status));
                    return;
                }
            }
        }
        let _ = block_on(sink.close());
    }
}

/// A uniformly random delay of 0 to `max_ms` milliseconds (xorshift: no crate for so little).
fn random_delay(max_ms: u64) -> impl Fn() -> Duration + Send + Sync {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let seed = now.as_nanos() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let state = Mutex::new(seed | 1);
    move || {
        let mut s = state.lock();
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        Duration::from_millis(*s % (max_ms + 1))
    }
}

/// The bodies (UTF-8) of a batch's messages.
fn bodies_of(batch: &BroadcastBatch) -> Vec<String> {
    batch.get_messages().iter().map(|m| String::from_utf8_lossy(m.get_proto().get_body()).into_owned()).collect()
}

/// A real node behind a relay, registered (at the relay's address) for push-manager to find.
struct Setup {
    // Dropped in this order: deregistered while etcd still runs.
    _registration: Registration,
    relay: Relay,
    gateway: Gateway,
    etcd: Etcd,
}

fn setup(tweak: impl FnOnce(&mut push_manager::gateway::Config), policy: Arc<Policy>) -> Setup {
    setup_over(Transport::Streams, tweak, policy)
}

fn setup_over(
    transport: Transport,
    tweak: impl FnOnce(&mut push_manager::gateway::Config),
    policy: Arc<Policy>,
) -> Setup {
    let etcd = Etcd::start();
    let gateway = start_gateway(tweak);
    let relay = Relay::start(&gateway.grpc_addr().to_string(), policy, transport);
    let registration = Registration::start(
        etcd.client(),
        RegistrationConfig {
            records: vec![Record::new(format!("{PREFIX}n1"), relay.addr.clone())],
            ttl: Duration::from_secs(5),
        },
    )
    .unwrap();
    Setup { _registration: registration, relay, gateway, etcd }
}

impl Setup {
    fn manager(&self, tweak: impl FnOnce(&mut manager::Config)) -> Manager {
        let mut config = manager::Config { routine_size: 10, ..common::manager::config(&self.etcd, PREFIX) };
        tweak(&mut config);
        let manager = Manager::start(config).unwrap();
        wait_until("the node is discovered", PATIENCE, || manager.nodes().len() == 1);
        manager
    }

    fn subscriber(&self) -> Client {
        let client = Client::subscribed(self.gateway.ws_addr(), &[TOPIC]);
        wait_connections(&self.gateway, 1);
        client
    }
}

fn names(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

/// Broadcasts `m<i>` for every `i` in `range`, one call after the other, each accepted.
fn publish(manager: &Manager, range: std::ops::Range<usize>) {
    let client = push_client(manager.addr());
    for i in range {
        assert_eq!(broadcast(&client, TOPIC, &format!("m{i}")).get_accepted(), 1, "m{i} is queued");
    }
}

#[test]
fn twenty_thousand_broadcasts_over_ten_streams_and_a_jittery_link_arrive_in_order_once() {
    twenty_thousand_over_a_jittery_link(Transport::Streams);
}

#[test]
fn twenty_thousand_broadcasts_over_ten_workers_calls_and_a_jittery_link_arrive_in_order_once() {
    twenty_thousand_over_a_jittery_link(Transport::Calls);
}

fn twenty_thousand_over_a_jittery_link(transport: Transport) {
    const N: usize = 20_000;
    let delay = random_delay(20);
    // The first batch is held long enough for full batches to pile up behind it and overtake
    // it however slowly a loaded machine publishes (a worker sends a partial batch only when
    // nothing else is in flight); the rest get random delays.
    let first = AtomicU64::new(0);
    let policy = move |_: &BroadcastBatch| match first.fetch_add(1, Ordering::SeqCst) {
        0 => Action::Forward(Duration::from_millis(100)),
        _ => Action::Forward(delay()),
    };
    let s = setup_over(transport, |_| {}, Arc::new(policy));
    // Room for the whole burst: this is about order, not about what a full queue drops. Small
    // batches: many calls in flight at once, so that they overtake one another.
    let manager = s.manager(|c| {
        c.queue_size = N;
        c.batch_max = 64;
    });
    let mut user = s.subscriber();
    let started = Instant::now();
    let reader = thread::spawn(move || user.next_bodies(N));
    publish(&manager, 0..N);
    let got = reader.join().expect("every broadcast arrives");
    let elapsed = started.elapsed();
    assert!(got == names(0..N), "out of order or repeated: first difference at {:?}", first_difference(&got, N));
    let stats = s.gateway.stats();
    assert_eq!((stats.skipped_messages, stats.held_now), (0, 0), "{stats:?}");
    assert!(s.relay.calls() > 10, "the batches went through the relay");
    let streams = s.relay.streams();
    assert_eq!(streams > 0, transport == Transport::Streams, "{streams} streams over {transport:?}");
    assert!(stats.held_messages > 0, "calls overtook one another (or this test proves nothing)");
    println!(
        "{N} broadcasts in {elapsed:?} over {} calls; {} held on the node for a while, {} duplicates",
        s.relay.calls(),
        stats.held_messages,
        stats.duplicate_messages
    );
}

fn first_difference(got: &[String], n: usize) -> Option<(usize, String)> {
    let want = names(0..n);
    got.iter().zip(&want).position(|(g, w)| g != w).map(|i| (i, got[i].clone()))
}

#[test]
fn a_retry_after_a_deadline_the_node_had_met_delivers_once() {
    // The first call reaches the node, but its answer comes after push-manager's deadline.
    let first = AtomicU64::new(0);
    let policy = move |_: &BroadcastBatch| match first.fetch_add(1, Ordering::SeqCst) {
        0 => Action::AnswerLate(Duration::from_millis(800)),
        _ => Action::Forward(Duration::ZERO),
    };
    let s = setup(|_| {}, Arc::new(policy));
    let manager = s.manager(|c| c.rpc_timeout = Duration::from_millis(300));
    let mut user = s.subscriber();
    publish(&manager, 0..1);
    wait_until("m0 is acknowledged on a retry", PATIENCE, || {
        manager.nodes().first().is_some_and(|n| n.sent == 1 && n.retried >= 1)
    });
    publish(&manager, 1..2);
    assert_eq!(user.next_bodies(2), names(0..2), "m0 once, then m1");
    assert!(s.gateway.stats().duplicate_messages >= 1, "{:?}", s.gateway.stats());
}

#[test]
fn a_batch_that_fails_for_good_leaves_a_gap_skipped_after_the_hold_time() {
    let hold = Duration::from_millis(200);
    // m1's call is held far past the hold time, then fails; push-manager does not retry it.
    let policy = |b: &BroadcastBatch| {
        if bodies_of(b).contains(&"m1".to_string()) {
            Action::FailAfter(Duration::from_secs(3))
        } else {
            Action::Forward(Duration::ZERO)
        }
    };
    let s = setup(|c| c.reorder_hold = hold, Arc::new(policy));
    // One message per call, so m2 and m3 need not wait for m1's call to end to be sent.
    let manager = s.manager(|c| {
        c.retry.max_attempts = 1;
        c.batch_max = 1;
    });
    let mut user = s.subscriber();
    publish(&manager, 0..1);
    assert_eq!(user.next_bodies(1), names(0..1));
    let sent = Instant::now();
    // m1 takes a worker; m2 and m3 go on others, and wait on the node behind m1's gap.
    publish(&manager, 1..4);
    assert_eq!(user.next_bodies(2), ["m2", "m3"], "the rest, in order");
    let waited = sent.elapsed();
    assert!(waited >= hold && waited < Duration::from_secs(3), "skipped after the hold time: {waited:?}");
    assert_eq!(s.gateway.stats().skipped_messages, 1, "{:?}", s.gateway.stats());
    wait_until("push-manager gives m1 up", PATIENCE, || manager.nodes().first().is_some_and(|n| n.failed == 1));
    publish(&manager, 4..5);
    assert_eq!(user.next_bodies(1), ["m4"], "m1 never comes; what follows does");
}

#[test]
fn a_restarted_push_manager_is_applied_at_once_without_waiting_on_the_old_sequence() {
    let delay = random_delay(5);
    // A hold longer than the test's patience: had anything waited on it, the test would fail.
    let s = setup(
        |c| c.reorder_hold = Duration::from_secs(60),
        Arc::new(move |_: &BroadcastBatch| Action::Forward(delay())),
    );
    let mut user = s.subscriber();
    let mut first = s.manager(|_| {});
    publish(&first, 0..500);
    assert_eq!(user.next_bodies(500), names(0..500));
    // Mid-stream: the first instance stops with some of its numbers given out, a second starts.
    first.shutdown();
    drop(first);
    let second = s.manager(|_| {});
    publish(&second, 500..1000);
    assert_eq!(user.next_bodies(500), names(500..1000), "the new instance's messages, at once and in order");
    let stats = s.gateway.stats();
    assert_eq!((stats.skipped_messages, stats.held_now), (0, 0), "{stats:?}");
}

/// A batch as an older push-manager (or a tool) sends it: no sequence.
fn plain_batch(range: std::ops::Range<usize>) -> BroadcastBatch {
    batch(range.map(|i| broadcast_request(TOPIC, OP, 0, format!("m{i}"))).collect())
}

fn sequenced(range: std::ops::Range<usize>, sender: &[u8], low_water: u64) -> BroadcastBatch {
    let mut b = plain_batch(range.clone());
    let mut sequence = Sequence::new();
    sequence.set_sender(sender.to_vec());
    sequence.set_seqs(range.map(|i| i as u64).collect());
    sequence.set_low_water(low_water);
    b.set_sequence(sequence);
    b
}

#[test]
fn batches_without_a_sequence_are_delivered_as_they_come() {
    let gateway = start_gateway(|_| {});
    let mut user = Client::subscribed(gateway.ws_addr(), &[TOPIC]);
    wait_connections(&gateway, 1);
    let node = node_client(gateway.grpc_addr());
    // Out of order and repeated, as an older sender might: nothing is held or dropped.
    for range in [2..4, 0..2, 0..1] {
        let len = range.len() as u32;
        assert_eq!(node.broadcast_batch(&plain_batch(range)).unwrap().get_received(), len);
    }
    assert_eq!(user.next_bodies(5), ["m2", "m3", "m0", "m1", "m0"]);
    let stats = gateway.stats();
    assert_eq!((stats.held_messages, stats.duplicate_messages, stats.skipped_messages), (0, 0, 0));
}

#[test]
fn a_malformed_sequence_is_refused_with_the_reason_and_the_sender_carries_on() {
    let gateway = start_gateway(|_| {});
    let mut user = Client::subscribed(gateway.ws_addr(), &[TOPIC]);
    wait_connections(&gateway, 1);
    let node = node_client(gateway.grpc_addr());
    let mut short = sequenced(0..2, b"s", 0);
    short.mut_sequence().set_seqs(vec![0]);
    let status = refused(node.broadcast_batch(&short), RpcStatusCode::INVALID_ARGUMENT);
    assert!(status.message().contains("one per message"), "{status:?}");
    let status = refused(node.broadcast_batch(&sequenced(0..2, b"", 0)), RpcStatusCode::INVALID_ARGUMENT);
    assert!(status.message().contains("sequence.sender is 0 bytes"), "{status:?}");
    // Nothing of the refused calls was applied: the same numbers are taken afterwards.
    let reply = node.broadcast_batch(&sequenced(1..2, b"s", 0)).unwrap();
    assert_eq!((reply.get_received(), reply.get_delivered()), (1, 0), "m1 waits for m0");
    let reply = node.broadcast_batch(&sequenced(0..1, b"s", 0)).unwrap();
    assert_eq!(reply.get_delivered(), 2, "m0 and the m1 it released");
    assert_eq!(user.next_bodies(2), ["m0", "m1"]);
}

#[test]
fn the_node_refuses_bad_reorder_flags_by_name_and_shows_their_defaults() {
    let cases = [
        (["--reorder-hold", "0s"], "--reorder-hold must be more than zero"),
        (["--reorder-hold-messages", "0"], "--reorder-hold-messages must be at least 1"),
    ];
    for (flag, needle) in cases {
        let out = std::process::Command::new(common::BIN)
            .args(["node", "--grpc-listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0"])
            .args(flag)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{flag:?}: {stderr:?} should say {needle:?}");
    }
    let help = std::process::Command::new(common::BIN).args(["node", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for default in ["[default: 1s]", "[default: 4096]"] {
        assert!(help.contains(default), "node --help should show {default}: {help}");
    }
}
