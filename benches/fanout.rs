//! How fast push-manager fans broadcasts out, against the same client calling the connect-nodes
//! directly in the same run.
//!
//! For 1, 4 and 16 sink nodes (in-process `ConnectNode` servers that count what they get), three
//! paths: "direct" (the load generator calls every sink's `ConnectNode/Broadcast` itself, the
//! baseline), push-manager with `--batch-max 1` (one RPC per message per node, goim's way) and
//! push-manager with the default batching. Each path is driven at several offered loads: one
//! load-generator thread keeping 4 to 256 `Broadcast` calls in flight, 256-byte bodies, for a
//! fixed time. A path's capacity is not one load's figure: batching only saturates with many
//! calls in flight, while one-RPC-per-message saturates early and then loses ground as accepting
//! broadcasts it must drop takes CPU from delivering. So the program prints every load, then each
//! path's best ("peak") and the ratios both at the same load and best against best.
//! deliveries/s counts messages that reached sinks, until the last one arrived. Then p50/p99 from
//! Broadcast to arrival at a fixed moderate rate. Each figure is the median of REPS runs. Real
//! etcd, loopback.
//!
//! `cargo bench --bench fanout`; environment: FANOUT_SECS (run length, default 2), FANOUT_REPS
//! (default 3), FANOUT_NODES (e.g. `4` or `1,16`), FANOUT_IN_FLIGHT (e.g. `32` or `8,128`),
//! FANOUT_CLIENTS (load-generator threads, default 1).

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
const NODE_COUNTS: [usize; 3] = [1, 4, 16];
/// Calls each load-generator thread keeps in flight, from light to past saturation for every path.
const IN_FLIGHT: [usize; 7] = [4, 8, 16, 32, 64, 128, 256];
const LATENCY_RATE: u64 = 1000;

/// Load-generator threads, and the calls each keeps in flight.
#[derive(Clone, Copy)]
struct Load {
    threads: usize,
    in_flight: usize,
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A comma-separated list of numbers from the environment, or `default`.
fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(name) {
        Ok(list) => list.split(',').filter_map(|n| n.trim().parse().ok()).collect(),
        Err(_) => default.to_vec(),
    }
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

/// One path at one offered load: medians of the runs, dropped summed over them.
struct Point {
    in_flight: usize,
    broadcasts_per_s: f64,
    deliveries_per_s: f64,
    dropped: u64,
    msgs_per_rpc: f64,
}

impl Point {
    fn of(in_flight: usize, runs: Vec<Run>, msgs_per_rpc: f64) -> Point {
        Point {
            in_flight,
            broadcasts_per_s: median(runs.iter().map(|r| r.broadcasts_per_s).collect()),
            deliveries_per_s: median(runs.iter().map(|r| r.deliveries_per_s).collect()),
            dropped: runs.iter().map(|r| r.dropped).sum(),
            msgs_per_rpc,
        }
    }
}

/// Every load of one path.
struct Curve {
    points: Vec<Point>,
}

/// The three paths measured for one node count.
struct Paths {
    direct: Curve,
    one_per_message: Curve,
    batched: Curve,
}

impl Paths {
    /// Default batching against `--batch-max 1`, each at its best load.
    fn peak_ratio(&self) -> f64 {
        self.batched.peak().deliveries_per_s / self.one_per_message.peak().deliveries_per_s
    }
}

impl Curve {
    fn peak(&self) -> &Point {
        self.points.iter().max_by(|a, b| a.deliveries_per_s.total_cmp(&b.deliveries_per_s)).expect("at least one load")
    }

    fn at(&self, in_flight: usize) -> &Point {
        self.points.iter().find(|p| p.in_flight == in_flight).expect("every path runs every load")
    }
}

/// A call under way; resolves to what it counts (deliveries accepted, or 1 for a direct call).
type Pending = Pin<Box<dyn Future<Output = u64> + Send>>;

/// Runs `load.threads` threads for `secs`, each keeping `load.in_flight` calls in flight (a
/// cheap load generator, so the CPU goes to what is measured). Returns the calls made and their sum.
fn hammer(load: Load, secs: Duration, make_caller: impl Fn() -> Box<dyn FnMut() -> Pending + Send>) -> (u64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, units) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let threads: Vec<_> = (0..load.threads)
        .map(|i| {
            let mut call = make_caller();
            let (stop, calls, units) = (stop.clone(), calls.clone(), units.clone());
            thread::Builder::new()
                .name(format!("bench-client-{i}"))
                .spawn(move || {
                    let mut in_flight = VecDeque::with_capacity(load.in_flight);
                    while !stop.load(Ordering::Relaxed) {
                        while in_flight.len() < load.in_flight {
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

fn through_manager(load: Load, env: &Arc<Environment>, addr: &str, sinks: &[Sink], secs: Duration) -> Run {
    let before = total(sinks);
    let start = Instant::now();
    let dropped = Arc::new(AtomicU64::new(0));
    let (broadcasts, accepted) = hammer(load, secs, || {
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

fn direct(load: Load, env: &Arc<Environment>, sinks: &[Sink], secs: Duration) -> Run {
    let addrs: Vec<String> = sinks.iter().map(|s| s.addr.clone()).collect();
    let (calls, _) = hammer(load, secs, || {
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

fn print_point(nodes: usize, path: &str, p: &Point, direct: &Point) {
    println!(
        "{nodes:>5}  {path:<13} {:>9} {:>13.0} {:>13.0} {:>9.2}x {:>9} {:>9.1}",
        p.in_flight,
        p.broadcasts_per_s,
        p.deliveries_per_s,
        p.deliveries_per_s / direct.deliveries_per_s,
        p.dropped,
        p.msgs_per_rpc
    );
}

/// Every path at every load for one node count, printed as it goes.
fn measure(nodes: usize, loads: &[Load], secs: Duration, reps: usize, etcd: &Etcd, env: &Arc<Environment>) -> Paths {
    let prefix = format!("/bench/{nodes}/");
    let sinks: Vec<Sink> = (0..nodes).map(|_| Sink::counting()).collect();
    for (i, s) in sinks.iter().enumerate() {
        etcd.client().put(&format!("{prefix}n{i}"), s.addr.as_bytes(), None).unwrap();
    }
    let direct = Curve {
        points: loads
            .iter()
            .map(|&load| {
                let point = Point::of(load.in_flight, (0..reps).map(|_| direct(load, env, &sinks, secs)).collect(), 1.0);
                print_point(nodes, "direct", &point, &point);
                point
            })
            .collect(),
    };
    let mut curves = vec![];
    for batch_max in [1, 64] {
        let manager = start_manager(etcd, &prefix, nodes, batch_max);
        let addr = format!("127.0.0.1:{}", manager.addr().port());
        let path = format!("batch-max {batch_max}");
        let mut points = vec![];
        for &load in loads {
            let sent_and_rpcs = || manager.nodes().iter().fold((0, 0), |(s, r), n| (s + n.sent, r + n.rpcs));
            let before = sent_and_rpcs();
            let runs = (0..reps).map(|_| through_manager(load, env, &addr, &sinks, secs)).collect();
            let after = sent_and_rpcs();
            let msgs_per_rpc = (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64;
            let point = Point::of(load.in_flight, runs, msgs_per_rpc);
            print_point(nodes, &path, &point, direct.at(load.in_flight));
            points.push(point);
        }
        curves.push(Curve { points });
    }
    let batched = curves.pop().expect("batched curve");
    let one_per_message = curves.pop().expect("--batch-max 1 curve");
    Paths { direct, one_per_message, batched }
}

fn main() {
    // `cargo bench` passes --bench; this program has no options of its own.
    let secs = Duration::from_secs(env_or("FANOUT_SECS", 2));
    let reps = env_or("FANOUT_REPS", 3) as usize;
    let threads = env_or("FANOUT_CLIENTS", 1) as usize;
    let loads: Vec<Load> = env_list("FANOUT_IN_FLIGHT", &IN_FLIGHT).into_iter().map(|in_flight| Load { threads, in_flight }).collect();
    let node_counts = env_list("FANOUT_NODES", &NODE_COUNTS);
    let etcd = Etcd::start();
    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("grpc-bench").build());
    println!(
        "fanout: {threads} load-generator thread(s), {BODY_BYTES}-byte bodies, {secs:?} per run, median of {reps} runs \
         (about {} s)",
        node_counts.len() * 3 * loads.len() * reps * secs.as_secs() as usize
    );
    println!(
        "{:>5}  {:<13} {:>9} {:>13} {:>13} {:>10} {:>9} {:>9}",
        "nodes", "path", "in flight", "broadcasts/s", "deliveries/s", "vs direct", "dropped", "msgs/RPC"
    );
    let results: Vec<(usize, Paths)> = node_counts.iter().map(|&n| (n, measure(n, &loads, secs, reps, &etcd, &env))).collect();
    summarize(&results);
    latency(&etcd, &env, reps);
}

/// Each path's best load; then batching against one RPC per message at every load, the heaviest
/// first: that is the figure the target is about, since push-manager does not choose its load and
/// one RPC per message delivers less the more it is offered.
fn summarize(results: &[(usize, Paths)]) {
    println!("\npeak deliveries/s (in flight at the peak):");
    println!("{:>5}  {:>16} {:>16} {:>16} {:>13}", "nodes", "direct", "batch-max 1", "batch-max 64", "64 vs 1");
    let cell = |c: &Curve| format!("{:.0} ({})", c.peak().deliveries_per_s, c.peak().in_flight);
    for (nodes, paths) in results {
        let (direct, one, batched) = (cell(&paths.direct), cell(&paths.one_per_message), cell(&paths.batched));
        println!("{nodes:>5}  {direct:>16} {one:>16} {batched:>16} {:>12.1}x", paths.peak_ratio());
    }
    println!();
    for (nodes, paths) in results {
        let mut same_load: Vec<String> = paths
            .batched
            .points
            .iter()
            .map(|p| format!("{:.1}x at {}", p.deliveries_per_s / paths.one_per_message.at(p.in_flight).deliveries_per_s, p.in_flight))
            .collect();
        same_load.reverse();
        let target = if *nodes == 4 { " (target >= 5x)" } else { "" };
        println!(
            "{nodes} node{}: default batching delivers {}{target}, the deliveries/s of --batch-max 1 \
             at the same calls in flight; {:.1}x, each at its peak",
            if *nodes == 1 { "" } else { "s" },
            same_load.join(", "),
            paths.peak_ratio()
        );
    }
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
