//! What TLS costs on the fan-out path, measured against the same path without it in one run.
//!
//! Four counting sinks, each serving one port in plaintext and one over TLS, registered under two
//! prefixes; two real `push-manager serve` processes with default batching: one plaintext on
//! both hops, one with TLS on both (`--tls-cert`/`--tls-key` for callers, `--node-tls-ca` to the
//! nodes). The same load generator (one thread, 256-byte bodies) drives each at a few loads,
//! plaintext and TLS runs alternated so that the machine's noise falls on both; each figure is
//! the median of REPS runs. Printed: deliveries/s and deliveries per push-manager CPU-second of
//! each, and TLS's share of the plaintext figure.
//!
//! `cargo bench --bench fanout_tls`; environment: FANOUT_SECS (run length, default 2),
//! FANOUT_REPS (default 3).

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpcio::Environment;
use push_manager::grpc::{ClientTls, ClientTlsFlags, ServerTls};
use push_manager::proto::protocol_grpc::PushServerClient;
use push_manager::testkit::{wait_until, Sink, TestPki};
use support::{channel, env_or, grpc_env, hammer, median, request, start_etcd, Load, Serve, BODY_BYTES};

const NODES: usize = 4;
const IN_FLIGHT: [usize; 3] = [16, 64, 256];

/// deliveries/s and deliveries per push-manager CPU-second of one run.
fn run(
    load: Load,
    env: &Arc<Environment>,
    serve: &Serve,
    tls: Option<&ClientTls>,
    sinks: &[Sink],
    secs: Duration,
) -> (f64, f64) {
    let total = || sinks.iter().map(|s| s.count() as u64).sum::<u64>();
    let (before, cpu_before) = (total(), serve.cpu());
    let start = Instant::now();
    let accepted = Arc::new(AtomicU64::new(0));
    let (_, delivered) = hammer(load, secs, || {
        let client = PushServerClient::new(channel(env, &serve.addr, tls));
        let req = request(vec![b'x'; BODY_BYTES]);
        let accepted = accepted.clone();
        Box::new(move || {
            let reply = client.broadcast_async(&req).expect("broadcast starts");
            let accepted = accepted.clone();
            Box::pin(async move {
                let n = u64::from(reply.await.expect("broadcast").get_accepted());
                accepted.fetch_add(n, Ordering::Relaxed);
                n
            })
        })
    });
    wait_until("accepted deliveries arrive", Duration::from_secs(120), || total() - before >= delivered);
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = (serve.cpu() - cpu_before).as_secs_f64().max(1e-3);
    (delivered as f64 / elapsed, delivered as f64 / cpu)
}

fn main() {
    let secs = Duration::from_secs(env_or("FANOUT_SECS", 2));
    let reps = env_or("FANOUT_REPS", 3) as usize;
    let pki = TestPki::new();
    let identity = pki.issue("bench");
    let server_tls = ServerTls { cert: identity.cert.clone(), key: identity.key.clone(), client_ca: None };
    let flags = ClientTlsFlags { ca: "--tls-ca", cert: "--tls-cert", key: "--tls-key" };
    let client_tls = ClientTls { ca: pki.ca(), identity: None, flags };
    let etcd = start_etcd();
    let env = grpc_env();
    let sinks: Vec<Sink> = (0..NODES).map(|_| Sink::counting_with_tls(&server_tls)).collect();
    for (i, s) in sinks.iter().enumerate() {
        etcd.client().put(&format!("/bench/plain/n{i}"), s.addr.as_bytes(), None).unwrap();
        let tls_addr = s.tls_addr.as_ref().expect("a TLS port");
        etcd.client().put(&format!("/bench/tls/n{i}"), tls_addr.as_bytes(), None).unwrap();
    }
    let plain = Serve::start_with(&etcd, &env, "/bench/plain/", NODES, &[], None);
    let (cert, key, ca) = (identity.cert.to_str().unwrap(), identity.key.to_str().unwrap(), pki.ca());
    let tls_flags = ["--tls-cert", cert, "--tls-key", key, "--node-tls-ca", ca.to_str().unwrap()];
    let secure = Serve::start_with(&etcd, &env, "/bench/tls/", NODES, &tls_flags, Some(&client_tls));

    println!("fanout_tls: {NODES} nodes, default batching, 1 load-generator thread, {BODY_BYTES}-byte bodies, {secs:?} per run, median of {reps}");
    println!(
        "{:>9}  {:>14} {:>14} {:>7}   {:>14} {:>14} {:>7}",
        "in flight", "plain deliv/s", "TLS deliv/s", "TLS/pl", "plain per CPU", "TLS per CPU", "TLS/pl"
    );
    for in_flight in IN_FLIGHT {
        let load = Load { threads: 1, in_flight };
        let (mut plain_runs, mut tls_runs) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            plain_runs.push(run(load, &env, &plain, None, &sinks, secs));
            tls_runs.push(run(load, &env, &secure, Some(&client_tls), &sinks, secs));
        }
        let med = |runs: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| median(runs.iter().map(f).collect());
        let (p_rate, t_rate) = (med(&plain_runs, |r| r.0), med(&tls_runs, |r| r.0));
        let (p_cpu, t_cpu) = (med(&plain_runs, |r| r.1), med(&tls_runs, |r| r.1));
        println!(
            "{in_flight:>9}  {p_rate:>14.0} {t_rate:>14.0} {:>6.2}x   {p_cpu:>14.0} {t_cpu:>14.0} {:>6.2}x",
            t_rate / p_rate,
            t_cpu / p_cpu
        );
    }
}
