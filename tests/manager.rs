//! push-manager against a real etcd and real grpcio connect-node stand-ins (`testkit::Sink`).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::grpc::{broadcast, push_client, OP};
use common::{free_addr, thread_names, wait_until, PATIENCE};
use grpcio::RpcStatusCode;
use push_manager::manager::{Config, Manager, NodeStats};
use push_manager::proto::broadcast_request;
use push_manager::proto::protocol::BroadCastReq;
use push_manager::proto::protocol_grpc::PushServerClient;
use push_manager::testkit::Sink;

const PREFIX: &str = "/test/nodes/";

fn config(etcd: &Etcd) -> Config {
    Config {
        queue_size: 100,
        // Long, so that a change seen quickly can only have come through the watch.
        poll_interval: Duration::from_secs(60),
        drain_timeout: Duration::from_secs(5),
        rpc_timeout: Duration::from_secs(2),
        ..common::manager::config(etcd, PREFIX)
    }
}

fn register(etcd: &Etcd, id: &str, addr: &str) {
    etcd.client().put(&format!("{PREFIX}{id}"), addr.as_bytes(), None).unwrap();
}

/// A recording sink for each of `ids`, registered under its id.
fn registered_sinks(etcd: &Etcd, ids: &[&str]) -> Vec<Sink> {
    let sinks: Vec<Sink> = ids.iter().map(|_| Sink::start()).collect();
    for (id, sink) in ids.iter().zip(&sinks) {
        register(etcd, id, &sink.addr);
    }
    sinks
}

fn unregister(etcd: &Etcd, id: &str) {
    etcd.client().delete(&format!("{PREFIX}{id}")).unwrap();
}

fn node_ids(manager: &Manager) -> BTreeSet<String> {
    manager.nodes().into_iter().map(|n| n.id).collect()
}

fn ids(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn stats(manager: &Manager, id: &str) -> NodeStats {
    manager.nodes().into_iter().find(|n| n.id == id).unwrap_or_else(|| panic!("node {id} is not registered"))
}

/// Threads of this process whose name starts with `prefix`.
fn threads_named(prefix: &str) -> usize {
    thread_names(std::process::id()).iter().filter(|name| name.starts_with(prefix)).count()
}

#[test]
fn finds_registered_nodes_and_delivers_one_broadcast_to_each_exactly_once() {
    let etcd = Etcd::start();
    let sinks = registered_sinks(&etcd, &["a1", "a2"]);
    // A value that is no node record is skipped, not fatal.
    register(&etcd, "junk", "not-an-address");
    let manager = Manager::start(config(&etcd)).unwrap();
    wait_until("both nodes discovered", PATIENCE, || node_ids(&manager) == ids(&["a1", "a2"]));

    let reply = broadcast(&push_client(manager.addr()), "", "hello");
    assert_eq!((reply.get_targeted(), reply.get_accepted()), (2, 2));
    assert!(reply.get_dropped().is_empty());
    for sink in &sinks {
        wait_until("the broadcast arrives", PATIENCE, || sink.count() == 1);
        assert_eq!(sink.bodies(), vec![b"hello".to_vec()]);
    }
    wait_until("counters settle", PATIENCE, || manager.nodes().iter().all(|n| n.sent == 1 && n.settled()));
}

#[test]
fn a_node_added_later_is_used_through_the_watch_long_before_the_next_poll() {
    let etcd = Etcd::start();
    let manager = Manager::start(config(&etcd)).unwrap();
    wait_until("first listing", PATIENCE, || manager.listings() >= 1);
    let sink = Sink::start();
    register(&etcd, "late", &sink.addr);
    // The next poll is a minute away (`config`): a node found sooner came through the watch.
    // How fast is the fanout bench's business, not a timed test's.
    wait_until("the new node is used", PATIENCE, || node_ids(&manager) == ids(&["late"]));
    broadcast(&push_client(manager.addr()), "", "x");
    wait_until("delivered to the new node", PATIENCE, || sink.count() == 1);
}

#[test]
fn without_the_watch_a_node_is_found_within_one_poll_interval() {
    let etcd = Etcd::start();
    let poll = Duration::from_millis(500);
    let manager = Manager::start(Config { watch: false, poll_interval: poll, ..config(&etcd) }).unwrap();
    wait_until("first listing", PATIENCE, || manager.listings() >= 1);
    let sink = Sink::start();
    register(&etcd, "polled", &sink.addr);
    wait_until("found by polling alone", PATIENCE, || node_ids(&manager) == ids(&["polled"]));
}

#[test]
fn a_deleted_node_is_removed_and_its_threads_joined() {
    let etcd = Etcd::start();
    let sinks = registered_sinks(&etcd, &["d1", "d2"]);
    let manager = Manager::start(config(&etcd)).unwrap();
    wait_until("both discovered", PATIENCE, || node_ids(&manager).len() == 2);
    let d1_workers = format!("n{}-w", stats(&manager, "d1").number);
    // A thread takes its name from inside itself once it runs, so a worker just spawned may not
    // show it yet: wait for both names rather than read them once.
    wait_until("routine_size workers for d1 named", PATIENCE, || threads_named(&d1_workers) == 2);

    unregister(&etcd, "d1");
    wait_until("d1 removed", PATIENCE, || node_ids(&manager) == ids(&["d2"]));
    // Retired nodes are joined on the next listing; the watch event of any change triggers one.
    register(&etcd, "d3", &sinks[0].addr);
    wait_until("d1's workers joined", PATIENCE, || {
        threads_named(&d1_workers) == 0 && manager.retiring_nodes().is_empty()
    });
    let reply = broadcast(&push_client(manager.addr()), "", "after");
    assert_eq!(reply.get_targeted(), 2);
    assert!(!manager.nodes().iter().any(|n| n.id == "d1"));
}

#[test]
fn an_address_change_moves_traffic_to_the_new_address() {
    let etcd = Etcd::start();
    let (old, new) = (Sink::start(), Sink::start());
    register(&etcd, "mover", &old.addr);
    let manager = Manager::start(config(&etcd)).unwrap();
    wait_until("discovered", PATIENCE, || node_ids(&manager).len() == 1);
    let client = push_client(manager.addr());
    broadcast(&client, "", "one");
    wait_until("old address gets it", PATIENCE, || old.count() == 1);

    register(&etcd, "mover", &new.addr);
    wait_until("address replaced", PATIENCE, || stats(&manager, "mover").addr == new.addr);
    broadcast(&client, "", "two");
    wait_until("new address gets it", PATIENCE, || new.count() == 1);
    assert_eq!(new.bodies(), vec![b"two".to_vec()]);
    assert_eq!(old.count(), 1, "nothing more went to the old address");
}

#[test]
fn ten_thousand_broadcasts_reach_three_nodes_with_matching_counters() {
    let etcd = Etcd::start();
    let sinks = registered_sinks(&etcd, &["bulk0", "bulk1", "bulk2"]);
    let manager = Manager::start(Config { queue_size: 20_000, routine_size: 4, ..config(&etcd) }).unwrap();
    wait_until("three nodes", PATIENCE, || node_ids(&manager).len() == 3);
    let client = push_client(manager.addr());
    const N: usize = 10_000;
    for i in 0..N {
        let reply = broadcast(&client, "", &i.to_string());
        assert_eq!(reply.get_accepted(), 3, "broadcast {i}: {reply:?}");
    }
    for s in &sinks {
        wait_until("every message arrives", Duration::from_secs(60), || s.count() >= N);
        assert_eq!(s.count(), N, "no duplicates");
        let distinct: BTreeSet<_> = s.bodies().into_iter().collect();
        assert_eq!(distinct.len(), N, "each message exactly once");
    }
    wait_until("counters settle", PATIENCE, || manager.nodes().iter().all(NodeStats::settled));
    for n in manager.nodes() {
        assert_eq!((n.enqueued, n.sent, n.failed, n.dropped_full), (N as u64, N as u64, 0, 0), "{n:?}");
    }
    assert!(sinks.iter().any(|s| s.batches() > 0), "bursts were batched");
}

#[test]
fn the_benchmarks_counting_sink_counts_batched_messages_exactly() {
    let etcd = Etcd::start();
    let sink = Sink::counting();
    register(&etcd, "counted", &sink.addr);
    // What is counted here is the sink, not the machine: no RPC may time out and fail, however
    // loaded the box is.
    // A queue that holds them all: a full one would refuse some, and the count would be short
    // for a reason that is no fault of the sink's.
    let manager =
        Manager::start(Config { rpc_timeout: Duration::from_secs(60), queue_size: 2_000, ..config(&etcd) }).unwrap();
    wait_until("discovered", PATIENCE, || node_ids(&manager).len() == 1);
    let client = push_client(manager.addr());
    for i in 0..2_000 {
        let reply = broadcast(&client, "", &"x".repeat(i % 300));
        assert_eq!(reply.get_accepted(), 1, "broadcast {i}: {reply:?}");
    }
    wait_until("all counted", Duration::from_secs(20), || stats(&manager, "counted").settled());
    assert_eq!(sink.count(), 2_000);
    assert_eq!(stats(&manager, "counted").sent, 2_000);
}

#[test]
fn a_stalled_node_fills_its_queue_and_is_named_while_the_others_get_everything() {
    let etcd = Etcd::start();
    let (slow, fast) = (Sink::start(), Sink::start());
    slow.stall();
    register(&etcd, "slow", &slow.addr);
    register(&etcd, "fast", &fast.addr);
    let queue_size = 10;
    // One worker: the slow node's is stuck in its first call, so exactly queue_size more fit.
    // Batching stays on so the fast node keeps up however loaded the machine is.
    // A deadline far longer than the test: the held call must not time out and free the worker
    // (and with it a queue slot) while the broadcasts below are counted, however slow the machine.
    let rpc_timeout = Duration::from_secs(60);
    let manager = Manager::start(Config { queue_size, routine_size: 1, rpc_timeout, ..config(&etcd) }).unwrap();
    wait_until("two nodes", PATIENCE, || node_ids(&manager).len() == 2);
    let client = push_client(manager.addr());

    // One message is held by the slow node's only worker; then its queue fills. Each broadcast
    // waits for the fast node to have taken the one before: its queue is as small as the slow
    // one's, and on a loaded machine its one worker could otherwise fall ten behind.
    broadcast(&client, "", "first");
    wait_until("the slow node holds one call", PATIENCE, || slow.parked() == 1);
    let total = 50;
    let mut named = 0;
    for i in 1..total {
        wait_until("the fast node took the last one", Duration::from_secs(10), || fast.count() == i);
        let reply = broadcast(&client, "", &format!("m{i}"));
        if reply.get_dropped() == ["slow".to_string()] {
            named += 1;
            assert_eq!((reply.get_targeted(), reply.get_accepted()), (2, 1));
        } else {
            assert!(reply.get_dropped().is_empty(), "{reply:?}");
        }
    }
    assert_eq!(named, total - 1 - queue_size, "exactly the broadcasts beyond the queue were dropped for slow");
    wait_until("fast got everything", Duration::from_secs(10), || fast.count() == total);
    let s = stats(&manager, "slow");
    assert_eq!((s.enqueued, s.dropped_full), ((1 + queue_size) as u64, named as u64), "{s:?}");
    assert_eq!(stats(&manager, "fast").dropped_full, 0);

    slow.unstall();
    wait_until("slow drains what it accepted", Duration::from_secs(10), || slow.count() == 1 + queue_size);
    wait_until("slow counters settle", PATIENCE, || stats(&manager, "slow").settled());
    assert_eq!(stats(&manager, "slow").sent, (1 + queue_size) as u64);
}

#[test]
fn a_down_node_is_retried_then_counted_failed_and_resumes_when_back() {
    let etcd = Etcd::start();
    let (mut down, up) = (Sink::start(), Sink::start());
    let down_addr = down.addr.clone();
    register(&etcd, "down", &down_addr);
    register(&etcd, "up", &up.addr);
    let manager = Manager::start(config(&etcd)).unwrap();
    wait_until("two nodes", PATIENCE, || node_ids(&manager).len() == 2);
    let client = push_client(manager.addr());
    broadcast(&client, "", "before");
    wait_until("both up at first", PATIENCE, || down.count() == 1 && up.count() == 1);

    down.stop();
    for i in 0..5 {
        broadcast(&client, "", &format!("while-down-{i}"));
    }
    wait_until("failures counted after retries", Duration::from_secs(20), || stats(&manager, "down").failed == 5);
    let s = stats(&manager, "down");
    // Messages may share RPCs; every RPC that failed used all 3 attempts (2 of them retries).
    let attempts_that_failed = s.rpcs - 1;
    assert!(attempts_that_failed >= 3 && attempts_that_failed.is_multiple_of(3), "{s:?}");
    assert_eq!(s.retried, attempts_that_failed / 3 * 2, "each failed RPC was retried first: {s:?}");
    assert!(s.settled(), "{s:?}");
    wait_until("the other node got everything", PATIENCE, || up.count() == 6);

    let back = Sink::start_on(&down_addr);
    wait_until("delivery resumes", Duration::from_secs(20), || {
        broadcast(&client, "", "again");
        back.count() > 0
    });
    assert!(back.bodies().iter().all(|b| b == b"again"));
}

#[test]
fn etcd_outage_keeps_delivering_and_discovery_resumes_after_restart() {
    let mut etcd = Etcd::start();
    let sink = Sink::start();
    register(&etcd, "steady", &sink.addr);
    let manager = Manager::start(Config { poll_interval: Duration::from_millis(300), ..config(&etcd) }).unwrap();
    wait_until("discovered", PATIENCE, || node_ids(&manager).len() == 1);
    let client = push_client(manager.addr());

    etcd.kill();
    wait_until("etcd seen down", Duration::from_secs(10), || !manager.etcd_reachable());
    for i in 0..10 {
        assert_eq!(broadcast(&client, "", &format!("during-{i}")).get_accepted(), 1);
    }
    wait_until("delivered during the outage", PATIENCE, || sink.count() == 10);

    etcd.restart();
    let newcomer = Sink::start();
    register(&etcd, "newcomer", &newcomer.addr);
    wait_until("discovery resumes", Duration::from_secs(10), || node_ids(&manager) == ids(&["steady", "newcomer"]));
    assert!(manager.etcd_reachable());
    broadcast(&client, "", "after");
    wait_until("the newcomer gets traffic", PATIENCE, || newcomer.count() == 1);
}

#[track_caller]
fn assert_refused(client: &PushServerClient, req: &BroadCastReq, code: RpcStatusCode, needle: &str) {
    match client.broadcast(req) {
        Err(grpcio::Error::RpcFailure(s)) => {
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(s.message().contains(needle), "{:?} should mention {needle:?}", s.message());
        }
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

#[test]
fn bad_requests_get_invalid_argument_and_the_server_keeps_serving() {
    let etcd = Etcd::start();
    let sink = Sink::start();
    let manager = Manager::start(Config { max_message_bytes: 1024, ..config(&etcd) }).unwrap();
    let client = push_client(manager.addr());
    wait_until("first listing", PATIENCE, || manager.listings() >= 1);
    assert_refused(
        &client,
        &broadcast_request("", OP, 0, "x"),
        RpcStatusCode::UNAVAILABLE,
        "no connect-node is registered",
    );

    register(&etcd, "n", &sink.addr);
    wait_until("discovered", PATIENCE, || node_ids(&manager).len() == 1);
    assert_refused(&client, &BroadCastReq::new(), RpcStatusCode::INVALID_ARGUMENT, "proto is required");
    assert_refused(
        &client,
        &broadcast_request("", OP, 0, "b".repeat(1025)),
        RpcStatusCode::INVALID_ARGUMENT,
        "--max-message-bytes",
    );
    assert_refused(
        &client,
        &broadcast_request(&"t".repeat(129), OP, 0, "x"),
        RpcStatusCode::INVALID_ARGUMENT,
        "longer than 128 bytes",
    );
    assert_refused(&client, &broadcast_request("has space", OP, 0, "x"), RpcStatusCode::INVALID_ARGUMENT, "whitespace");

    assert_eq!(broadcast(&client, "", "still fine").get_accepted(), 1);
    wait_until("the good one is delivered", PATIENCE, || sink.count() == 1);
    assert_eq!(stats(&manager, "n").enqueued, 1, "no refused request was queued");
}

#[test]
fn invalid_configuration_is_refused_before_anything_starts() {
    let etcd = Etcd::start();
    let err = Manager::start(Config { routine_size: 0, ..config(&etcd) }).err().expect("refused");
    assert!(err.to_string().contains("--routine-size"), "{err}");
    let err = Manager::start(Config { listen: "127.0.0.1:notaport".into(), ..config(&etcd) }).err().expect("refused");
    assert!(err.to_string().contains("127.0.0.1:notaport"), "{err}");
}

// ---- etcd records are untrusted input (issue #9) ----------------------------------------------

#[test]
fn a_key_with_a_nul_byte_is_skipped_and_discovery_keeps_working() {
    let etcd = Etcd::start();
    let sink = Sink::start();
    let bad_key = format!("{PREFIX}evil\0id");
    etcd.client().put(&bad_key, sink.addr.as_bytes(), None).unwrap();
    let manager = Manager::start(config(&etcd)).unwrap();
    wait_until("the first listing", PATIENCE, || manager.listings() >= 1);
    assert!(node_ids(&manager).is_empty(), "the NUL id must be skipped: {:?}", node_ids(&manager));

    // Discovery is alive: a node registered afterwards is found and served.
    let good = Sink::start();
    register(&etcd, "good", &good.addr);
    wait_until("the good node is discovered", PATIENCE, || node_ids(&manager) == ids(&["good"]));
    assert!(manager.discovery_running());
    broadcast(&push_client(manager.addr()), "", "hello");
    wait_until("the good node gets it", PATIENCE, || good.count() == 1);
    assert_eq!(sink.count(), 0);
}

#[test]
fn a_nested_key_cannot_take_over_another_nodes_traffic() {
    let etcd = Etcd::start();
    let (real, intruder) = (Sink::start(), Sink::start());
    register(&etcd, "na", &real.addr);
    // Sorted after "na", so read as node "na" it would be the one that sticks.
    register(&etcd, "zone-b/na", &intruder.addr);
    let manager = Manager::start(config(&etcd)).unwrap();
    wait_until("discovered", PATIENCE, || manager.listings() >= 1 && !node_ids(&manager).is_empty());
    assert_eq!(stats(&manager, "na").addr, real.addr);
    assert_eq!(manager.nodes().len(), 1);
    broadcast(&push_client(manager.addr()), "", "for na");
    wait_until("the real na gets it", PATIENCE, || real.count() == 1);
    assert_eq!(intruder.count(), 0);
}

#[test]
fn two_ids_at_one_address_get_each_message_once() {
    let etcd = Etcd::start();
    let sink = Sink::start();
    register(&etcd, "a", &sink.addr);
    register(&etcd, "b", &sink.addr);
    let manager = Manager::start(config(&etcd)).unwrap();
    wait_until("discovered", PATIENCE, || manager.listings() >= 1 && !node_ids(&manager).is_empty());
    assert_eq!(node_ids(&manager), ids(&["a"]), "the first id keeps the address");
    let reply = broadcast(&push_client(manager.addr()), "", "once");
    assert_eq!(reply.get_targeted(), 1);
    wait_until("delivered", PATIENCE, || sink.count() >= 1);
    // Another broadcast after it proves nothing else was still on its way.
    broadcast(&push_client(manager.addr()), "", "twice?");
    wait_until("the second arrives", PATIENCE, || sink.count() >= 2);
    assert_eq!(sink.bodies(), vec![b"once".to_vec(), b"twice?".to_vec()]);
}

#[test]
fn a_prefix_larger_than_grpcs_receive_limit_is_still_listed() {
    let etcd = Etcd::start();
    let client = etcd.client();
    // Six values of 1 MiB: 6 MiB under the prefix, past gRPC's default 4 MiB receive limit.
    let junk = vec![b'x'; 1 << 20];
    for i in 0..6 {
        client.put(&format!("{PREFIX}junk-{i}"), &junk, None).unwrap();
    }
    let sink = Sink::start();
    register(&etcd, "zz-real", &sink.addr);
    let manager = Manager::start(config(&etcd)).unwrap();
    wait_until("the real node is found", Duration::from_secs(10), || node_ids(&manager) == ids(&["zz-real"]));
    assert!(manager.etcd_reachable());
}

#[test]
fn a_node_that_moves_keeps_what_was_queued_for_it() {
    let etcd = Etcd::start();
    // Nothing listens at the first address: every RPC fails UNAVAILABLE and is retried.
    let dead = free_addr();
    register(&etcd, "mover", &dead);
    let mut cfg = config(&etcd);
    cfg.routine_size = 1;
    cfg.retry.max_attempts = 50;
    let manager = Manager::start(cfg).unwrap();
    wait_until("discovered", PATIENCE, || node_ids(&manager).len() == 1);
    let client = push_client(manager.addr());
    for i in 0..20 {
        broadcast(&client, "", &format!("m{i}"));
    }
    wait_until("retrying against the dead address", PATIENCE, || stats(&manager, "mover").retried > 0);

    let sink = Sink::start();
    register(&etcd, "mover", &sink.addr);
    wait_until("all 20 arrive at the new address", Duration::from_secs(10), || sink.count() == 20);
    // The sink counts a message when it takes it, the manager when the reply is back.
    wait_until("counters settle", PATIENCE, || stats(&manager, "mover").settled());
    let s = stats(&manager, "mover");
    assert_eq!((s.addr.as_str(), s.enqueued, s.sent, s.failed), (sink.addr.as_str(), 20, 20, 0), "{s:?}");
}

#[test]
fn retries_during_a_shutdown_drain_keep_their_backoff() {
    let etcd = Etcd::start();
    let busy = Sink::start();
    busy.refuse_with(Some(RpcStatusCode::RESOURCE_EXHAUSTED));
    register(&etcd, "busy", &busy.addr);
    let mut cfg = config(&etcd);
    cfg.routine_size = 1;
    // Attempts 2, 3 and 4 wait 100, 200 and 400 ms first.
    cfg.retry.max_attempts = 4;
    cfg.drain_timeout = Duration::from_secs(10);
    let mut manager = Manager::start(cfg).unwrap();
    wait_until("discovered", PATIENCE, || node_ids(&manager).len() == 1);
    broadcast(&push_client(manager.addr()), "", "busy");
    wait_until("the first attempt is refused", PATIENCE, || busy.rpcs() >= 1);

    // Shutdown drains with retries allowed: it must not cut the backoff short.
    manager.shutdown();
    let attempts: Vec<Instant> = busy.arrivals().into_iter().map(|(at, _)| at).collect();
    assert_eq!(attempts.len(), 4, "every attempt was made before the drain deadline");
    for (i, pair) in attempts.windows(2).enumerate() {
        let backoff = Duration::from_millis(100 << i);
        assert!(pair[1] - pair[0] >= backoff, "attempt {} came {:?} after the one before", i + 2, pair[1] - pair[0]);
    }
}
