//! How fast push-manager fans broadcasts out, against the same client calling the connect-nodes
//! directly in the same run.
//!
//! For 1, 4 and 16 sink nodes (in-process `ConnectNode` servers that count what they get), three
//! paths: "direct" (the load generator calls every sink's `ConnectNode/Broadcast` itself, the
//! baseline), and the real `push-manager serve` binary, in a process of its own, with
//! `--batch-max 1` (one RPC per message per node, goim's way) and with the default batching.
//! Each path is driven at several offered loads: one load-generator thread keeping 4 to 256
//! `Broadcast` calls in flight, 256-byte bodies, for a fixed time. deliveries/s counts messages
//! that reached sinks, until the last one arrived.
//!
//! A path's capacity is not one load's figure: batching only saturates with many calls in
//! flight, while one RPC per message saturates early and then loses ground as accepting
//! broadcasts it must drop takes CPU from delivering. And on this machine the load generator
//! and the sinks share push-manager's cores, so deliveries/s also measures them. Hence the
//! program prints every load, then each path's best, and default batching against `--batch-max
//! 1` at the same load, best against best, and per push-manager CPU-second (its process's user
//! plus system time): deliveries per CPU-second is what push-manager would deliver per core of
//! its own, the figure that sizes a deployment.
//!
//! With default batching, one more path: "stream", one caller connection publishing over one
//! `BroadcastStream` call as fast as push-manager's flow control lets it, run by run alternately
//! with unary calls at the heaviest load ("unary (alt.)"), so both see the same machine; the
//! issue's target for it is 1,000,000 node deliveries/s with 4 nodes.
//!
//! Each figure is the median of REPS runs. Real etcd, loopback. Latency is
//! `benches/fanout_latency.rs`'s question.
//!
//! `cargo bench --bench fanout`; environment: FANOUT_SECS (run length, default 2), FANOUT_REPS
//! (default 3), FANOUT_NODES (e.g. `4` or `1,16`), FANOUT_IN_FLIGHT (e.g. `32` or `8,128`),
//! FANOUT_CLIENTS (load-generator threads, default 1), FANOUT_BATCH_MAX (the batched paths'
//! `--batch-max`, default serve's).

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpcio::{ChannelBuilder, Environment};
use push_manager::proto::protocol_grpc::{ConnectNodeClient, PushServerClient};
use push_manager::testkit::{wait_until, LocalEtcd, Sink};
use support::{
    env_or, grpc_env, hammer, median, publish_stream, register, request, start_etcd, Load, Serve, BODY_BYTES,
};

const NODE_COUNTS: [usize; 3] = [1, 4, 16];
/// The "calls in flight" of the streaming path, printed as `stream`: one caller connection with
/// one `BroadcastStream` call, paced by flow control rather than by a number of calls.
const STREAM: usize = 0;
/// Calls each load-generator thread keeps in flight, from light to past saturation for every path.
const IN_FLIGHT: [usize; 7] = [4, 8, 16, 32, 64, 128, 256];

/// The `--batch-max` of the batched paths: serve's default unless FANOUT_BATCH_MAX says otherwise.
fn batched_max() -> usize {
    env_or("FANOUT_BATCH_MAX", push_manager::manager::Config::default().batch_max as u64) as usize
}

/// A comma-separated list of numbers from the environment, or `default`.
fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(name) {
        Ok(list) => list.split(',').filter_map(|n| n.trim().parse().ok()).collect(),
        Err(_) => default.to_vec(),
    }
}

struct Run {
    broadcasts_per_s: f64,
    dropped: u64,
    /// Messages delivered, and the time from the first call until the last of them arrived.
    delivered: u64,
    elapsed: Duration,
    /// push-manager's CPU time over `elapsed` (none for direct).
    cpu: Option<Duration>,
    /// Messages the sinks received over the run, and the RPCs that carried them.
    received: u64,
    rpcs: u64,
}

impl Run {
    fn deliveries_per_s(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64()
    }
}

/// One path at one offered load: medians of the runs, sums where the name says so.
struct Point {
    in_flight: usize,
    broadcasts_per_s: f64,
    deliveries_per_s: f64,
    dropped: u64,
    msgs_per_rpc: f64,
    /// push-manager's CPU time per second of run: the cores it kept busy.
    cores: Option<f64>,
    /// Deliveries per second of push-manager CPU time: what one core of its own would deliver.
    per_cpu_s: Option<f64>,
}

impl Point {
    fn of(in_flight: usize, runs: Vec<Run>) -> Point {
        let medians = |f: &dyn Fn(&Run) -> Option<f64>| -> Option<f64> {
            runs.iter().map(f).collect::<Option<Vec<f64>>>().map(median)
        };
        let (received, rpcs) = runs.iter().fold((0, 0), |(m, r), run| (m + run.received, r + run.rpcs));
        Point {
            in_flight,
            broadcasts_per_s: median(runs.iter().map(|r| r.broadcasts_per_s).collect()),
            deliveries_per_s: median(runs.iter().map(Run::deliveries_per_s).collect()),
            dropped: runs.iter().map(|r| r.dropped).sum(),
            msgs_per_rpc: received as f64 / rpcs.max(1) as f64,
            cores: medians(&|r| r.cpu.map(|cpu| cpu.as_secs_f64() / r.elapsed.as_secs_f64())),
            per_cpu_s: medians(&|r| r.cpu.map(|cpu| r.delivered as f64 / cpu.as_secs_f64().max(1e-3))),
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
    /// One `BroadcastStream` connection against default batching, and unary calls at the heaviest
    /// load run alternately with it.
    stream: Point,
    unary_alongside: Point,
}

impl Paths {
    /// Default batching against `--batch-max 1`, each at its best load.
    fn peak_ratio(&self) -> f64 {
        self.batched.peak().deliveries_per_s / self.one_per_message.peak().deliveries_per_s
    }

    /// Default batching against `--batch-max 1` in deliveries per push-manager CPU-second, each
    /// at its most efficient load.
    fn efficiency_ratio(&self) -> f64 {
        let per_cpu_s = |c: &Curve| c.most_efficient().per_cpu_s.unwrap_or(0.0);
        per_cpu_s(&self.batched) / per_cpu_s(&self.one_per_message)
    }

    /// Default batching against `--batch-max 1`, both offered the same load.
    fn same_load_ratio(&self, in_flight: usize) -> f64 {
        self.batched.at(in_flight).deliveries_per_s / self.one_per_message.at(in_flight).deliveries_per_s
    }
}

impl Curve {
    /// The load with the most deliveries/s.
    fn peak(&self) -> &Point {
        self.best_by(|p| p.deliveries_per_s)
    }

    /// The load with the most deliveries per push-manager CPU-second.
    fn most_efficient(&self) -> &Point {
        self.best_by(|p| p.per_cpu_s.unwrap_or(0.0))
    }

    fn best_by(&self, figure: impl Fn(&Point) -> f64) -> &Point {
        self.points.iter().max_by(|a, b| figure(a).total_cmp(&figure(b))).expect("at least one load")
    }

    fn at(&self, in_flight: usize) -> &Point {
        self.points.iter().find(|p| p.in_flight == in_flight).expect("every path runs every load")
    }
}

fn total(sinks: &[Sink]) -> u64 {
    sinks.iter().map(|s| s.count() as u64).sum()
}

fn rpcs(sinks: &[Sink]) -> u64 {
    sinks.iter().map(Sink::rpcs).sum()
}

fn through_serve(load: Load, env: &Arc<Environment>, serve: &Serve, sinks: &[Sink], secs: Duration) -> Run {
    let (before, rpcs_before, cpu_before) = (total(sinks), rpcs(sinks), serve.cpu());
    let start = Instant::now();
    let dropped = Arc::new(AtomicU64::new(0));
    let (broadcasts, accepted) = hammer(load, secs, || {
        let client = PushServerClient::new(ChannelBuilder::new(env.clone()).connect(&serve.addr));
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
    let elapsed = start.elapsed();
    Run {
        broadcasts_per_s: broadcasts as f64 / secs.as_secs_f64(),
        dropped: dropped.load(Ordering::Relaxed),
        delivered: accepted,
        elapsed,
        cpu: Some(serve.cpu() - cpu_before),
        received: total(sinks) - before,
        rpcs: rpcs(sinks) - rpcs_before,
    }
}

/// One caller connection publishing over `BroadcastStream` as fast as push-manager takes it.
fn streamed(env: &Arc<Environment>, serve: &Serve, sinks: &[Sink], secs: Duration) -> Run {
    let (before, rpcs_before, cpu_before) = (total(sinks), rpcs(sinks), serve.cpu());
    let start = Instant::now();
    let client = PushServerClient::new(ChannelBuilder::new(env.clone()).connect(&serve.addr));
    let published = publish_stream(&client, request(vec![b'x'; BODY_BYTES]), secs);
    wait_until("accepted deliveries arrive", Duration::from_secs(120), || total(sinks) - before >= published.accepted);
    let elapsed = start.elapsed();
    Run {
        broadcasts_per_s: published.sent as f64 / published.elapsed.as_secs_f64(),
        dropped: published.dropped,
        delivered: published.accepted,
        elapsed,
        cpu: Some(serve.cpu() - cpu_before),
        received: total(sinks) - before,
        rpcs: rpcs(sinks) - rpcs_before,
    }
}

fn direct(load: Load, env: &Arc<Environment>, sinks: &[Sink], secs: Duration) -> Run {
    let addrs: Vec<String> = sinks.iter().map(|s| s.addr.clone()).collect();
    let (calls, _) = hammer(load, secs, || {
        let clients: Vec<_> =
            addrs.iter().map(|a| ConnectNodeClient::new(ChannelBuilder::new(env.clone()).connect(a))).collect();
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
    Run {
        broadcasts_per_s: calls as f64 / secs.as_secs_f64() / sinks.len() as f64,
        dropped: 0,
        delivered: calls,
        elapsed: secs,
        cpu: None,
        received: calls,
        rpcs: calls,
    }
}

const HEADER: [&str; 10] = [
    "nodes",
    "path",
    "in flight",
    "broadcasts/s",
    "deliveries/s",
    "vs direct",
    "dropped",
    "msgs/RPC",
    "pm cores",
    "per pm CPU-s",
];

fn print_point(nodes: usize, path: &str, p: &Point, direct: &Point) {
    let or_dash = |v: Option<f64>, precision: usize| v.map_or("-".to_string(), |v| format!("{v:.precision$}"));
    let in_flight = if p.in_flight == STREAM { "stream".to_string() } else { p.in_flight.to_string() };
    println!(
        "{nodes:>5}  {path:<13} {in_flight:>9} {:>13.0} {:>13.0} {:>9.2}x {:>9} {:>9.1} {:>9} {:>13}",
        p.broadcasts_per_s,
        p.deliveries_per_s,
        p.deliveries_per_s / direct.deliveries_per_s,
        p.dropped,
        p.msgs_per_rpc,
        or_dash(p.cores, 2),
        or_dash(p.per_cpu_s, 0),
    );
}

/// Every path at every load for one node count, printed as it goes.
fn measure(
    nodes: usize,
    loads: &[Load],
    secs: Duration,
    reps: usize,
    etcd: &LocalEtcd,
    env: &Arc<Environment>,
) -> Paths {
    let prefix = format!("/bench/{nodes}/");
    let sinks: Vec<Sink> = (0..nodes).map(|_| Sink::counting()).collect();
    register(etcd, &prefix, &sinks);
    let direct = Curve {
        points: loads
            .iter()
            .map(|&load| {
                let point = Point::of(load.in_flight, (0..reps).map(|_| direct(load, env, &sinks, secs)).collect());
                print_point(nodes, "direct", &point, &point);
                point
            })
            .collect(),
    };
    let (mut curves, mut streams) = (vec![], vec![]);
    let batched_max = batched_max();
    for batch_max in [1, batched_max] {
        let serve = Serve::start(etcd, env, &prefix, nodes, batch_max);
        let path = format!("batch-max {batch_max}");
        let mut points = vec![];
        for &load in loads {
            let runs = (0..reps).map(|_| through_serve(load, env, &serve, &sinks, secs)).collect();
            let point = Point::of(load.in_flight, runs);
            print_point(nodes, &path, &point, direct.at(load.in_flight));
            points.push(point);
        }
        curves.push(Curve { points });
        if batch_max == batched_max {
            streams.push(stream_against_unary(nodes, loads, secs, reps, env, &serve, &sinks, &direct));
        }
    }
    let batched = curves.pop().expect("batched curve");
    let one_per_message = curves.pop().expect("--batch-max 1 curve");
    let (stream, unary_alongside) = streams.pop().expect("stream figures");
    Paths { direct, one_per_message, batched, stream, unary_alongside }
}

/// One `BroadcastStream` connection, alternated run by run with unary calls at the heaviest load,
/// so that both see the same machine; printed as two rows.
#[allow(clippy::too_many_arguments)]
fn stream_against_unary(
    nodes: usize,
    loads: &[Load],
    secs: Duration,
    reps: usize,
    env: &Arc<Environment>,
    serve: &Serve,
    sinks: &[Sink],
    direct: &Curve,
) -> (Point, Point) {
    let heaviest = *loads.last().expect("at least one load");
    let (mut streamed_runs, mut unary_runs) = (vec![], vec![]);
    for _ in 0..reps {
        streamed_runs.push(streamed(env, serve, sinks, secs));
        unary_runs.push(through_serve(heaviest, env, serve, sinks, secs));
    }
    let (stream, unary) = (Point::of(STREAM, streamed_runs), Point::of(heaviest.in_flight, unary_runs));
    let baseline = direct.at(heaviest.in_flight);
    print_point(nodes, "stream", &stream, baseline);
    print_point(nodes, "unary (alt.)", &unary, baseline);
    (stream, unary)
}

fn main() {
    // `cargo bench` passes --bench; this program has no options of its own.
    let secs = Duration::from_secs(env_or("FANOUT_SECS", 2));
    let reps = env_or("FANOUT_REPS", 3) as usize;
    let threads = env_or("FANOUT_CLIENTS", 1) as usize;
    let loads: Vec<Load> =
        env_list("FANOUT_IN_FLIGHT", &IN_FLIGHT).into_iter().map(|in_flight| Load { threads, in_flight }).collect();
    let node_counts = env_list("FANOUT_NODES", &NODE_COUNTS);
    let etcd = start_etcd();
    let env = grpc_env();
    println!(
        "fanout: {threads} load-generator thread(s), {BODY_BYTES}-byte bodies, {secs:?} per run, median of {reps} runs \
         (about {} s)",
        node_counts.len() * 3 * loads.len() * reps * secs.as_secs() as usize
    );
    let [n, path, in_flight, broadcasts, deliveries, vs, dropped, per_rpc, cores, per_cpu] = HEADER;
    println!("{n:>5}  {path:<13} {in_flight:>9} {broadcasts:>13} {deliveries:>13} {vs:>10} {dropped:>9} {per_rpc:>9} {cores:>9} {per_cpu:>13}");
    let results: Vec<(usize, Paths)> =
        node_counts.iter().map(|&n| (n, measure(n, &loads, secs, reps, &etcd, &env))).collect();
    summarize(&results);
}

/// Each path's best load by deliveries/s and by deliveries per push-manager CPU-second, then
/// default batching against one RPC per message: at every load, peak to peak, and per CPU-second.
fn summarize(results: &[(usize, Paths)]) {
    let Some((_, first)) = results.first() else { return };
    let peak = |c: &Curve| format!("{:.0} ({})", c.peak().deliveries_per_s, c.peak().in_flight);
    let efficient =
        |c: &Curve| format!("{:.0} ({})", c.most_efficient().per_cpu_s.unwrap_or(0.0), c.most_efficient().in_flight);
    println!("\nbest of each path (calls in flight there): deliveries/s; deliveries per push-manager CPU-second");
    println!(
        "{:>5}  {:>14} {:>14} {:>14}   {:>14} {:>14}",
        "nodes",
        "direct",
        "batch-max 1",
        format!("batch-max {}", batched_max()),
        "batch-max 1",
        format!("batch-max {}", batched_max())
    );
    for (nodes, paths) in results {
        let (direct, one, batched) = (peak(&paths.direct), peak(&paths.one_per_message), peak(&paths.batched));
        let (one_cpu, batched_cpu) = (efficient(&paths.one_per_message), efficient(&paths.batched));
        println!("{nodes:>5}  {direct:>14} {one:>14} {batched:>14}   {one_cpu:>14} {batched_cpu:>14}");
    }
    println!(
        "\ndefault batching / --batch-max 1: deliveries/s at the same calls in flight; peak to peak; per CPU-second"
    );
    let loads: String = first.batched.points.iter().map(|p| format!("{:>7}", p.in_flight)).collect();
    println!("{:>5}{loads} {:>9} {:>9}", "nodes", "peaks", "per CPU");
    for (nodes, paths) in results {
        let ratios: String =
            paths.batched.points.iter().map(|p| format!("{:>6.1}x", paths.same_load_ratio(p.in_flight))).collect();
        println!("{nodes:>5}{ratios} {:>8.1}x {:>8.1}x", paths.peak_ratio(), paths.efficiency_ratio());
    }
    println!("\none caller connection: BroadcastStream against unary calls at the heaviest load, run alternately");
    println!(
        "{:>5} {:>16} {:>16} {:>16} {:>16}",
        "nodes", "stream msgs/s", "stream deliv/s", "unary msgs/s", "unary deliv/s"
    );
    for (nodes, paths) in results {
        let (s, u) = (&paths.stream, &paths.unary_alongside);
        println!(
            "{nodes:>5} {:>16.0} {:>16.0} {:>16.0} {:>16.0}",
            s.broadcasts_per_s, s.deliveries_per_s, u.broadcasts_per_s, u.deliveries_per_s
        );
    }
    if let Some((_, paths)) = results.iter().find(|(nodes, _)| *nodes == 4) {
        println!(
            "4 nodes: one BroadcastStream connection publishes {:.0} messages/s, {:.0} node deliveries/s \
             (target >= 1,000,000)",
            paths.stream.broadcasts_per_s, paths.stream.deliveries_per_s
        );
        let heaviest = paths.batched.points.last().expect("at least one load").in_flight;
        println!(
            "4 nodes: default batching delivers {:.1}x per push-manager CPU-second what --batch-max 1 does \
             (target >= 5x); on this shared box {:.1}x peak to peak, {:.1}x at {heaviest} calls in flight",
            paths.efficiency_ratio(),
            paths.peak_ratio(),
            paths.same_load_ratio(heaviest),
        );
    }
}
