//! How fast push-manager fans broadcasts out, against the same client threads calling the
//! connect-nodes directly in the same run.
//!
//! For 1, 4 and 16 sink nodes (in-process `ConnectNode` servers that count what they get), and
//! for `--batch-max 1` (one RPC per message per node) and the default batching, CLIENT_THREADS
//! threads, each with PIPELINE calls in flight, call `PushServer/Broadcast` with 256-byte bodies
//! for a fixed time; deliveries/s counts
//! messages that reached sinks, until the last one arrived. The baseline ("direct") is the same
//! threads calling every sink's `ConnectNode/Broadcast` themselves. Then p50/p99 from Broadcast to
//! arrival at a fixed moderate rate. Each figure is the median of REPS runs. Real etcd, loopback.
//!
//! `cargo bench --bench fanout` (env FANOUT_SECS, FANOUT_REPS to change the run length,
//! FANOUT_NODES=4 or 1,16 to measure only those node counts).

#[path = "../tests/sink/mod.rs"]
mod sink;
#[path = "../tests/util/mod.rs"]
mod util;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use futures::executor::block_on;
use grpcio::{ChannelBuilder, EnvBuilder, Environment};
use push_manager::etcd;
use push_manager::manager::{Config, Manager};
use push_manager::proto::protocol::{BroadCastReq, Proto};
use push_manager::proto::protocol_grpc::{ConnectNodeClient, PushServerClient};
use sink::Sink;
use util::{wait_until, Etcd};

const BODY_BYTES: usize = 256;
const CLIENT_THREADS: usize = 1;
/// Calls each client thread keeps in flight.
const PIPELINE: usize = 32;
const NODE_COUNTS: [usize; 3] = [1, 4, 16];
const LATENCY_RATE: u64 = 1000;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn request(body: Vec<u8>) -> BroadCastReq {
    let mut proto = Proto::new();
    proto.set_op(1000);
    proto.set_body(body);
    let mut req = BroadCastReq::new();
    req.set_proto(proto);
    req
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Run {
    broadcasts_per_s: f64,
    deliveries_per_s: f64,
    dropped: u64,
}

/// A call under way; resolves to what it counts (deliveries accepted, or 1 for a direct call).
type Pending = Pin<Box<dyn Future<Output = u64> + Send>>;

/// Runs CLIENT_THREADS threads for `secs`, each keeping PIPELINE calls in flight (a cheap load
/// generator, so the CPU goes to what is measured). Returns the calls made and their sum.
fn hammer(secs: Duration, make_caller: impl Fn() -> Box<dyn FnMut() -> Pending + Send>) -> (u64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, units) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let threads: Vec<_> = (0..CLIENT_THREADS)
        .map(|i| {
            let mut call = make_caller();
            let (stop, calls, units) = (stop.clone(), calls.clone(), units.clone());
            thread::Builder::new()
                .name(format!("bench-client-{i}"))
                .spawn(move || {
                    let mut in_flight = VecDeque::with_capacity(PIPELINE);
                    while !stop.load(Ordering::Relaxed) {
                        while in_flight.len() < PIPELINE {
                            in_flight.push_back(call());
                        }
                        let done = in_flight.pop_front().expect("a call is in flight");
                        units.fetch_add(block_on(done), Ordering::Relaxed);
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                    for done in in_flight {
                        units.fetch_add(block_on(done), Ordering::Relaxed);
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .unwrap()
        })
        .collect();
    thread::sleep(secs);
    stop.store(true, Ordering::Relaxed);
    threads.into_iter().for_each(|t| t.join().unwrap());
    (calls.load(Ordering::Relaxed), units.load(Ordering::Relaxed))
}

fn total(sinks: &[Sink]) -> u64 {
    sinks.iter().map(|s| s.count() as u64).sum()
}

fn through_manager(env: &Arc<Environment>, addr: &str, sinks: &[Sink], secs: Duration) -> Run {
    let before = total(sinks);
    let start = Instant::now();
    let dropped = Arc::new(AtomicU64::new(0));
    let (broadcasts, accepted) = hammer(secs, || {
        let client = PushServerClient::new(ChannelBuilder::new(env.clone()).connect(addr));
        let req = request(vec![b'x'; BODY_BYTES]);
        let dropped = dropped.clone();
        Box::new(move || {
            let reply = client.broadcast_async(&req).expect("broadcast starts");
            let dropped = dropped.clone();
            Box::pin(async move {
                let reply = reply.await.expect("broadcast");
                dropped.fetch_add(reply.get_dropped().len() as u64, Ordering::Relaxed);
                reply.get_accepted() as u64
            })
        })
    });
    wait_until("accepted deliveries arrive", Duration::from_secs(120), || total(sinks) - before >= accepted);
    Run {
        broadcasts_per_s: broadcasts as f64 / secs.as_secs_f64(),
        deliveries_per_s: accepted as f64 / start.elapsed().as_secs_f64(),
        dropped: dropped.load(Ordering::Relaxed),
    }
}

fn direct(env: &Arc<Environment>, sinks: &[Sink], secs: Duration) -> Run {
    let addrs: Vec<String> = sinks.iter().map(|s| s.addr.clone()).collect();
    let (calls, _) = hammer(secs, || {
        let clients: Vec<_> = addrs.iter().map(|a| ConnectNodeClient::new(ChannelBuilder::new(env.clone()).connect(a))).collect();
        let req = request(vec![b'x'; BODY_BYTES]);
        let mut next = 0;
        Box::new(move || {
            next = (next + 1) % clients.len();
            let reply = clients[next].broadcast_async(&req).expect("direct call starts");
            Box::pin(async move {
                reply.await.expect("direct call");
                1
            })
        })
    });
    let per_s = calls as f64 / secs.as_secs_f64();
    Run { broadcasts_per_s: per_s / sinks.len() as f64, deliveries_per_s: per_s, dropped: 0 }
}

fn start_manager(etcd: &Etcd, prefix: &str, nodes: usize, batch_max: usize) -> Manager {
    let manager = Manager::start(Config {
        listen: "127.0.0.1:0".into(),
        etcd: etcd::Config { endpoints: vec![etcd.endpoint()], timeout: Duration::from_secs(2) },
        prefix: prefix.into(),
        batch_max,
        ..Config::default()
    })
    .expect("manager starts");
    wait_until("nodes discovered", Duration::from_secs(10), || manager.nodes().len() == nodes);
    manager
}

fn main() {
    // `cargo bench` passes --bench; this program has no options of its own.
    let secs = Duration::from_secs(env_or("FANOUT_SECS", 2));
    let reps = env_or("FANOUT_REPS", 3) as usize;
    let etcd = Etcd::start();
    let env = Arc::new(EnvBuilder::new().cq_count(2).name_prefix("grpc-bench").build());
    println!("fanout: {CLIENT_THREADS} client threads x {PIPELINE} calls in flight, {BODY_BYTES}-byte bodies, {secs:?} per run, median of {reps} runs");
    println!("{:>5}  {:<14} {:>13} {:>13} {:>10} {:>9} {:>9}", "nodes", "path", "broadcasts/s", "deliveries/s", "vs direct", "dropped", "msgs/RPC");
    let mut at_four = (0.0, 0.0);
    let node_counts: Vec<usize> = match std::env::var("FANOUT_NODES") {
        Ok(list) => list.split(',').filter_map(|n| n.trim().parse().ok()).collect(),
        Err(_) => NODE_COUNTS.to_vec(),
    };
    for nodes in node_counts {
        let prefix = format!("/bench/{nodes}/");
        let sinks: Vec<Sink> = (0..nodes).map(|_| Sink::counting()).collect();
        for (i, s) in sinks.iter().enumerate() {
            etcd.client().put(&format!("{prefix}n{i}"), s.addr.as_bytes(), None).unwrap();
        }
        let baseline = median((0..reps).map(|_| direct(&env, &sinks, secs).deliveries_per_s).collect());
        println!("{nodes:>5}  {:<14} {:>13.0} {:>13.0} {:>9.2}x {:>9} {:>9.1}", "direct", baseline / nodes as f64, baseline, 1.0, "-", 1.0);
        for batch_max in [1, 64] {
            let manager = start_manager(&etcd, &prefix, nodes, batch_max);
            let addr = format!("127.0.0.1:{}", manager.addr().port());
            let runs: Vec<Run> = (0..reps).map(|_| through_manager(&env, &addr, &sinks, secs)).collect();
            let deliveries = median(runs.iter().map(|r| r.deliveries_per_s).collect());
            let broadcasts = median(runs.iter().map(|r| r.broadcasts_per_s).collect());
            let dropped: u64 = runs.iter().map(|r| r.dropped).sum();
            let path = format!("batch-max {batch_max}");
            let (sent, rpcs) = manager.nodes().iter().fold((0, 0), |(s, r), n| (s + n.sent, r + n.rpcs));
            let per_rpc = sent as f64 / rpcs.max(1) as f64;
            println!("{nodes:>5}  {path:<14} {broadcasts:>13.0} {deliveries:>13.0} {:>9.2}x {dropped:>9} {per_rpc:>9.1}", deliveries / baseline);
            if nodes == 4 {
                if batch_max == 1 { at_four.0 = deliveries } else { at_four.1 = deliveries }
            }
        }
    }
    if at_four.0 > 0.0 {
        println!(
            "4 nodes: default batching delivers {:.1}x the deliveries/s of --batch-max 1 (target >= 5x)",
            at_four.1 / at_four.0
        );
    }
    latency(&etcd, &env, reps);
}

/// p50/p99 from Broadcast to arrival at a sink, 4 nodes, default batching, LATENCY_RATE/s.
fn latency(etcd: &Etcd, env: &Arc<Environment>, reps: usize) {
    let nodes = 4;
    let prefix = "/bench/latency/";
    let sinks: Vec<Sink> = (0..nodes).map(|_| Sink::start()).collect();
    for (i, s) in sinks.iter().enumerate() {
        etcd.client().put(&format!("{prefix}n{i}"), s.addr.as_bytes(), None).unwrap();
    }
    let manager = start_manager(etcd, prefix, nodes, 64);
    let client = PushServerClient::new(ChannelBuilder::new(env.clone()).connect(&format!("127.0.0.1:{}", manager.addr().port())));
    let base = Instant::now();
    let count = LATENCY_RATE * 2;
    let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let before: usize = sinks.iter().map(Sink::count).sum();
        let start = Instant::now();
        for i in 0..count {
            let due = start + Duration::from_micros(i * 1_000_000 / LATENCY_RATE);
            thread::sleep(due.saturating_duration_since(Instant::now()));
            let mut body = (base.elapsed().as_nanos() as u64).to_le_bytes().to_vec();
            body.resize(BODY_BYTES, b'x');
            client.broadcast(&request(body)).expect("broadcast");
        }
        let expected = before + count as usize * nodes;
        wait_until("all arrive", Duration::from_secs(30), || sinks.iter().map(Sink::count).sum::<usize>() >= expected);
        let mut micros: Vec<f64> = sinks
            .iter()
            .flat_map(|s| s.arrivals().into_iter().skip(before / nodes))
            .map(|(at, body)| {
                let sent = Duration::from_nanos(u64::from_le_bytes(body[..8].try_into().unwrap()));
                (at.duration_since(base) - sent).as_secs_f64() * 1e6
            })
            .collect();
        micros.sort_by(|a, b| a.partial_cmp(b).unwrap());
        p50s.push(micros[micros.len() / 2]);
        p99s.push(micros[micros.len() * 99 / 100]);
    }
    println!(
        "latency, {nodes} nodes, {LATENCY_RATE} broadcasts/s, Broadcast -> arrival: p50 {:.0} us, p99 {:.0} us",
        median(p50s),
        median(p99s)
    );
}
