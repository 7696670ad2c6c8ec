//! How long a broadcast takes from push-manager's `Broadcast` to arrival at a connect-node:
//! p50/p99 through the real `push-manager serve` binary, in a process of its own, with default
//! batching, to 4 in-process sink nodes, at a fixed moderate rate (1000 broadcasts/s, 256-byte
//! bodies, 2 s). Each figure is the median of REPS runs. Real etcd, loopback. Throughput is
//! `benches/fanout.rs`'s question.
//!
//! `cargo bench --bench fanout_latency`; environment: FANOUT_REPS (default 3).

mod support;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use grpcio::{ChannelBuilder, Environment};
use push_manager::proto::protocol_grpc::PushServerClient;
use push_manager::testkit::{wait_until, LocalEtcd, Sink};
use support::{env_or, grpc_env, median, register, request, start_etcd, Serve, BODY_BYTES};

const LATENCY_RATE: u64 = 1000;

fn main() {
    // `cargo bench` passes --bench; this program has no options of its own.
    let reps = env_or("FANOUT_REPS", 3) as usize;
    let etcd = start_etcd();
    latency(&etcd, &grpc_env(), reps);
}

/// Starts the body of a latency probe, followed by when it was sent (nanoseconds since `base`,
/// little-endian); anything else a sink received (the discovery probe) is not one.
const LATENCY_MARK: &[u8; 8] = b"latency:";

/// Broadcast-to-arrival times, in microseconds, of the latency probes sent `since`.
fn latencies(sinks: &[Sink], base: Instant, since: Duration) -> Vec<f64> {
    sinks
        .iter()
        .flat_map(Sink::arrivals)
        .filter_map(|(at, body)| {
            let sent = body.strip_prefix(LATENCY_MARK)?.get(..8)?;
            let sent = Duration::from_nanos(u64::from_le_bytes(sent.try_into().ok()?));
            (sent >= since).then(|| (at.duration_since(base) - sent).as_secs_f64() * 1e6)
        })
        .collect()
}

/// p50/p99 from Broadcast to arrival at a sink, 4 nodes, default batching, LATENCY_RATE/s.
fn latency(etcd: &LocalEtcd, env: &Arc<Environment>, reps: usize) {
    let nodes = 4;
    let prefix = "/bench/latency/";
    let sinks: Vec<Sink> = (0..nodes).map(|_| Sink::start()).collect();
    register(etcd, prefix, &sinks);
    let serve = Serve::start(etcd, env, prefix, nodes, 64);
    let client = PushServerClient::new(ChannelBuilder::new(env.clone()).connect(&serve.addr));
    let base = Instant::now();
    let count = LATENCY_RATE * 2;
    let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let since = base.elapsed();
        let start = Instant::now();
        for i in 0..count {
            let due = start + Duration::from_micros(i * 1_000_000 / LATENCY_RATE);
            thread::sleep(due.saturating_duration_since(Instant::now()));
            let mut body = LATENCY_MARK.to_vec();
            body.extend((base.elapsed().as_nanos() as u64).to_le_bytes());
            body.resize(BODY_BYTES, b'x');
            client.broadcast(&request(body)).expect("broadcast");
        }
        let expected = count as usize * nodes;
        wait_until("all arrive", Duration::from_secs(30), || latencies(&sinks, base, since).len() >= expected);
        let mut micros = latencies(&sinks, base, since);
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
