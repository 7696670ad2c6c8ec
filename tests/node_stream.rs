//! push-manager's stream to each connect-node (`ConnectNode/BroadcastBatchStream`): one per
//! worker, kept from batch to batch; each batch held to the unary call's rules (token, limits,
//! sequence), a refused one ending its stream with the call's status; a stopping node ending
//! its streams instead of waiting on them; and `BroadcastBatch` calls to a node without it.

mod common;

use std::time::Duration;

use futures::executor::block_on;
use futures::{SinkExt, StreamExt};
use grpcio::{CallOption, ClientDuplexReceiver, ClientDuplexSender, RpcStatus, RpcStatusCode, WriteFlags};

use common::etcd::Etcd;
use common::gateway::{start_gateway, wait_connections};
use common::grpc::{batch, broadcast, node_client, push_client, with_key, OP};
use common::ws::Client;
use common::{wait_until, PATIENCE};
use push_manager::gateway::Gateway;
use push_manager::manager::Manager;
use push_manager::proto::broadcast_request;
use push_manager::proto::protocol::{BroadcastBatch, NodeReply, Sequence};
use push_manager::proto::protocol_grpc::ConnectNodeClient;
use push_manager::registry::{Record, Registration, RegistrationConfig};
use push_manager::testkit::Sink;

const PREFIX: &str = "/stream-test/nodes/";
const TOPIC: &str = "news";

/// One stream to a node, driven a batch at a time as push-manager drives it.
struct Stream {
    sink: ClientDuplexSender<BroadcastBatch>,
    replies: ClientDuplexReceiver<NodeReply>,
    /// Its channel, which must outlive the stream.
    _client: ConnectNodeClient,
}

impl Stream {
    fn open(gw: &Gateway, opt: CallOption) -> Stream {
        let client = node_client(gw.grpc_addr());
        let (sink, replies) = client.broadcast_batch_stream_opt(opt).expect("a stream opens");
        Stream { sink, replies, _client: client }
    }

    /// Sends `batch` and returns its reply, or the status the stream ended with.
    fn exchange(&mut self, batch: BroadcastBatch) -> Result<NodeReply, RpcStatus> {
        // A send on a stream the node has ended fails; its status then comes with the replies.
        let _ = block_on(self.sink.send((batch, WriteFlags::default())));
        self.next()
    }

    /// The next reply, or the status the stream ended with.
    fn next(&mut self) -> Result<NodeReply, RpcStatus> {
        match block_on(self.replies.next()) {
            Some(Ok(reply)) => Ok(reply),
            Some(Err(grpcio::Error::RpcFailure(status))) => Err(status),
            other => panic!("expected a reply or an error status, got {other:?}"),
        }
    }
}

/// A batch of one broadcast of `body` to [`TOPIC`].
fn one(body: &str) -> BroadcastBatch {
    batch(vec![broadcast_request(TOPIC, OP, 0, body)])
}

#[track_caller]
fn assert_refused(result: Result<NodeReply, RpcStatus>, code: RpcStatusCode, reason: &str) {
    let status = result.expect_err("the batch is refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(reason), "{reason:?} not in {status:?}");
}

/// Registers `addr` as the node `n1` for push-manager to find.
fn register(etcd: &Etcd, addr: String) -> Registration {
    let records = vec![Record::new(format!("{PREFIX}n1"), addr)];
    Registration::start(etcd.client(), RegistrationConfig { records, ttl: Duration::from_secs(5) }).unwrap()
}

fn start_manager(etcd: &Etcd) -> Manager {
    let manager = Manager::start(common::manager::config(etcd, PREFIX)).unwrap();
    wait_until("the node is discovered", PATIENCE, || manager.nodes().len() == 1);
    manager
}

#[test]
fn push_manager_sends_over_one_stream_per_worker_and_closes_them_when_it_stops() {
    const N: usize = 300;
    let etcd = Etcd::start();
    let gw = start_gateway(|_| {});
    let _registration = register(&etcd, gw.grpc_addr().to_string());
    let mut manager = start_manager(&etcd);
    let mut user = Client::subscribed(gw.ws_addr(), &[TOPIC]);
    wait_connections(&gw, 1);

    let push = push_client(manager.addr());
    for i in 0..N {
        assert_eq!(broadcast(&push, TOPIC, &format!("m{i}")).get_accepted(), 1);
    }
    let expected: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(user.next_bodies(N), expected, "in order, once");
    let stats = gw.stats();
    let rpcs = manager.nodes()[0].rpcs;
    // Two workers (the test config's routine_size): a stream each at most, kept for every batch.
    assert!((1..=2).contains(&stats.batch_streams_opened), "{stats:?}");
    assert_eq!(stats.batch_streams_open, stats.batch_streams_opened, "{stats:?}");
    assert!(rpcs >= 2, "{rpcs} batches: too few to show that streams are kept");

    manager.shutdown();
    wait_until("push-manager's streams are closed", PATIENCE, || gw.stats().batch_streams_open == 0);
}

#[test]
fn a_stream_needs_the_node_token_when_it_opens_and_with_every_batch() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("node-token");
    std::fs::write(&token_file, "token-a\n").unwrap();
    let gw = start_gateway(|c| c.node_token_file = Some(token_file.clone()));
    let mut user = Client::subscribed(gw.ws_addr(), &[TOPIC]);
    wait_connections(&gw, 1);

    for (what, opt) in [("no token", CallOption::default()), ("a wrong token", with_key("token-x"))] {
        let mut stream = Stream::open(&gw, opt);
        let status = stream.next().expect_err(what);
        assert_eq!(status.code(), RpcStatusCode::UNAUTHENTICATED, "{what}: {status:?}");
        assert!(status.message().contains("authorization: Bearer"), "{what}: {status:?}");
    }

    let mut stream = Stream::open(&gw, with_key("token-a"));
    assert_eq!(stream.exchange(one("with token a")).unwrap().get_delivered(), 1);
    // The node drops token a (SIGHUP): the stream opened with it takes nothing more.
    std::fs::write(&token_file, "token-b\n").unwrap();
    gw.reload_credentials();
    assert_refused(stream.exchange(one("token a, dropped")), RpcStatusCode::UNAUTHENTICATED, "authorization");

    let mut stream = Stream::open(&gw, with_key("token-b"));
    assert_eq!(stream.exchange(one("with token b")).unwrap().get_delivered(), 1);
    assert_eq!(user.next_bodies(2), ["with token a", "with token b"], "nothing refused was delivered");
    assert_eq!(gw.stats().batch_streams_open, 1, "the refused streams ended");
}

#[test]
fn a_batch_the_call_would_refuse_ends_its_stream_with_the_calls_status_and_delivers_nothing() {
    let gw = start_gateway(|c| {
        c.max_message_bytes = 64;
        c.max_batch_messages = 4;
    });
    let mut user = Client::subscribed(gw.ws_addr(), &[TOPIC]);
    wait_connections(&gw, 1);
    let msg = |body: &[u8]| broadcast_request(TOPIC, OP, 0, body);
    let mut sequence = Sequence::new();
    sequence.set_sender(vec![1; 12]);
    sequence.set_seqs(vec![1, 2]);
    let mut bad_sequence = one("bad sequence");
    bad_sequence.set_sequence(sequence);

    let refusals = [
        ("a batch over the limit", batch((0..5).map(|_| msg(b"one of five")).collect()), "--max-batch-messages"),
        ("a batch with one bad message", batch(vec![msg(b"fine"), msg(&[b'x'; 65])]), "messages[1]"),
        ("a sequence that does not match the batch", bad_sequence, "seqs"),
    ];
    for (n, (what, refused_batch, reason)) in refusals.into_iter().enumerate() {
        let mut stream = Stream::open(&gw, CallOption::default());
        let good = format!("before {what}");
        assert_eq!(stream.exchange(one(&good)).unwrap().get_delivered(), 1, "{what}");
        assert_refused(stream.exchange(refused_batch), RpcStatusCode::INVALID_ARGUMENT, reason);
        assert_eq!(user.next_bodies(1), [good], "{what}: refused #{n}, nothing of it delivered");
    }
    // The node goes on: a new stream delivers, and the old ones have ended.
    let mut stream = Stream::open(&gw, CallOption::default());
    assert_eq!(stream.exchange(one("after")).unwrap().get_delivered(), 1);
    assert_eq!(user.next_bodies(1), ["after"]);
    assert_eq!(gw.stats().batch_streams_open, 1);
}

#[test]
fn a_stopping_node_ends_its_streams_instead_of_waiting_for_them() {
    let mut gw = start_gateway(|_| {});
    let mut idle = Stream::open(&gw, CallOption::default());
    assert_eq!(idle.exchange(one("before")).unwrap().get_received(), 1);
    // Without being ended, the idle stream would hold the gRPC server's shutdown until it had
    // to be cancelled.
    assert!(gw.stop_grpc(), "every call ended without being cancelled");
    assert_refused(idle.next(), RpcStatusCode::UNAVAILABLE, "the node is stopping");
}

#[test]
fn a_node_without_the_stream_is_sent_broadcast_batch_calls() {
    let etcd = Etcd::start();
    // The test sink serves only the unary calls, as a node from before the stream.
    let sink = Sink::start();
    let _registration = register(&etcd, sink.addr.clone());
    let manager = start_manager(&etcd);
    let push = push_client(manager.addr());
    for i in 0..5 {
        assert_eq!(broadcast(&push, TOPIC, &format!("m{i}")).get_accepted(), 1);
    }
    wait_until("the sink has every message", PATIENCE, || sink.count() == 5);
    let stats = &manager.nodes()[0];
    assert_eq!((stats.sent, stats.failed, stats.retried), (5, 0, 0), "{stats:?}");
    assert_eq!(sink.batches(), stats.rpcs, "each batch was one BroadcastBatch call");
}
