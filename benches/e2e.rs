//! End to end, against nats-server on the same box: does push-manager deliver as fast, as soon
//! and as cheaply? Starts a real etcd, `push-manager serve` and two `push-manager node` processes
//! (default flags), and runs the `push-manager bench` harness ([`push_manager::loadgen`]) against
//! them: 1,000 WebSocket subscribers on one topic, 128-byte bodies, flat out and at a fixed 300
//! and 1,000 messages/s, plus light traffic (10 subscribers, 20 messages/s). When `nats-server` is
//! on PATH it is started with a WebSocket listener and the SAME subscribers (speaking NATS's text
//! protocol over WebSocket; publishing `PUB` over its TCP port) measure it, alternating with
//! push-manager, three runs each; the medians are printed side by side with their ratio.
//!
//! CPU per million deliveries counts the system's processes from `/proc/<pid>/stat` over each
//! run (subscriber connection set-up included): `serve` plus both nodes for push-manager, with
//! etcd shown apart; `nats-server` for NATS. The harness's own CPU (this process) is shown too.
//! Loopback only.
//!
//! `cargo bench --bench e2e`; environment: E2E_RUNS (3), E2E_SUBSCRIBERS (1000), E2E_FLAT_MESSAGES
//! (3000), E2E_SECS (5, the length of the fixed-rate runs), E2E_NATS=0 to skip nats-server,
//! E2E_ONLY (run the scenarios whose name contains it, e.g. `msgs/s`), E2E_NODE_FLAGS (extra
//! flags for both nodes, e.g. `--ws-write-delay 2ms`, to try a setting against the same baseline).

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use grpcio::{CallOption, Environment};
use push_manager::loadgen::{self, BroadcastPublisher, Config, Dialect, NatsPublisher, Publisher, Report};
use push_manager::testkit::{free_port, poll_until, signal, spawn_node, wait_exit, LocalEtcd, NodeProcess};
use support::{channel, cpu_time, env_or, grpc_env, median, start_etcd, Serve, BIN};

const PREFIX: &str = "/e2e-bench/nodes/";
const SIZE: usize = 128;

struct Scenario {
    name: &'static str,
    subscribers: usize,
    rate: u64,
    messages: u64,
}

fn main() {
    let runs = env_or("E2E_RUNS", 3) as usize;
    let subscribers = env_or("E2E_SUBSCRIBERS", 1000) as usize;
    let secs = env_or("E2E_SECS", 5);
    let scenarios = [
        Scenario { name: "flat out", subscribers, rate: 0, messages: env_or("E2E_FLAT_MESSAGES", 3000) },
        Scenario { name: "300 msgs/s", subscribers, rate: 300, messages: 300 * secs },
        Scenario { name: "1000 msgs/s", subscribers, rate: 1000, messages: 1000 * secs },
        Scenario { name: "light: 20 msgs/s", subscribers: 10, rate: 20, messages: 20 * secs },
    ];
    let only = std::env::var("E2E_ONLY").unwrap_or_default();
    let node_flags = std::env::var("E2E_NODE_FLAGS").unwrap_or_default();
    let node_flags: Vec<&str> = node_flags.split_whitespace().collect();
    loadgen::raise_open_files_limit(1000 + 64);

    let etcd = start_etcd();
    let env = grpc_env();
    let pm = PushManager::start(&etcd, &env, &node_flags);
    let nats = (env_or("E2E_NATS", 1) == 1).then(Nats::start).flatten();
    if nats.is_none() {
        println!("nats-server is not on PATH (or E2E_NATS=0): push-manager alone");
    }
    let mut systems: Vec<&dyn System> = vec![&pm];
    if let Some(n) = &nats {
        systems.push(n);
    }

    for scenario in scenarios.iter().filter(|s| s.name.contains(only.as_str())) {
        let config = Config {
            subscribers: scenario.subscribers,
            messages: scenario.messages,
            size: SIZE,
            rate: scenario.rate,
            drain_timeout: Duration::from_secs(30),
            ..Config::default()
        };
        let mut results: Vec<Vec<Measured>> = vec![Vec::new(); systems.len()];
        for run in 0..runs {
            for (i, system) in systems.iter().enumerate() {
                let m = measure(*system, &config);
                eprintln!(
                    "e2e: {} run {}/{runs} {}: {:.0} deliveries/s, p50 {:.2} ms, p99 {:.2} ms, lost {}",
                    scenario.name,
                    run + 1,
                    system.name(),
                    m.report.deliveries_per_s(),
                    m.report.latency_ms(0.5),
                    m.report.latency_ms(0.99),
                    m.report.lost
                );
                results[i].push(m);
            }
        }
        print_scenario(scenario, &systems, &results);
    }
}

/// One run's report and the CPU time spent on it.
#[derive(Clone)]
struct Measured {
    report: Report,
    /// The system's processes (etcd excluded).
    system_cpu: Duration,
    /// etcd's, for push-manager.
    etcd_cpu: Duration,
    /// This process: subscribers and publisher.
    harness_cpu: Duration,
}

fn measure(system: &dyn System, config: &Config) -> Measured {
    let me = || cpu_time(std::process::id()).unwrap_or_else(|e| panic!("{e}"));
    let (sys0, etcd0, me0) = (system.cpu(), system.etcd_cpu(), me());
    let mut publisher = system.publisher(config);
    let report = loadgen::run(config, &system.ws_urls(), system.dialect(), &|_| None, publisher.as_mut())
        .unwrap_or_else(|e| panic!("{}: {e}", system.name()));
    Measured { report, system_cpu: system.cpu() - sys0, etcd_cpu: system.etcd_cpu() - etcd0, harness_cpu: me() - me0 }
}

fn print_scenario(scenario: &Scenario, systems: &[&dyn System], results: &[Vec<Measured>]) {
    println!(
        "\n## {}: {} subscribers, {SIZE} B, {} messages (medians of {} runs)",
        scenario.name,
        scenario.subscribers,
        scenario.messages,
        results[0].len()
    );
    println!(
        "| system | deliveries/s | publish msgs/s | p50 ms | p90 ms | p99 ms | max ms | lost | dup | ooo | CPU s per 1M deliveries | harness CPU s per 1M |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (system, runs) in systems.iter().zip(results) {
        let med = |f: &dyn Fn(&Measured) -> f64| median(runs.iter().map(f).collect());
        let per_million = |cpu: Duration, r: &Report| cpu.as_secs_f64() / (r.deliveries.max(1) as f64 / 1e6);
        let row = [
            med(&|m| m.report.deliveries_per_s()),
            med(&|m| m.report.publish_per_s()),
            med(&|m| m.report.latency_ms(0.5)),
            med(&|m| m.report.latency_ms(0.9)),
            med(&|m| m.report.latency_ms(0.99)),
            med(&|m| m.report.latency.max() as f64 / 1e6),
            med(&|m| m.report.lost as f64),
            med(&|m| m.report.duplicated as f64),
            med(&|m| m.report.out_of_order as f64),
            med(&|m| per_million(m.system_cpu, &m.report)),
            med(&|m| per_million(m.harness_cpu, &m.report)),
        ];
        let etcd = med(&|m| per_million(m.etcd_cpu, &m.report));
        let cpu_note = if system.has_etcd() { format!(" (+{etcd:.2} etcd)") } else { String::new() };
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2}{cpu_note} | {:.2} |",
            system.name(),
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            row[7],
            row[8],
            row[9],
            row[10]
        );
        rows.push(row);
    }
    if rows.len() == 2 {
        let (pm, nats) = (&rows[0], &rows[1]);
        println!(
            "push-manager / nats-server: deliveries/s {:.2}x, p50 {:.2}x, p99 {:.2}x, CPU per delivery {:.2}x",
            pm[0] / nats[0],
            pm[2] / nats[2],
            pm[4] / nats[4],
            pm[9] / nats[9]
        );
    }
    let _ = std::io::stdout().flush();
}

/// A system under test, as the harness sees it.
trait System {
    fn name(&self) -> &'static str;
    fn dialect(&self) -> Dialect;
    fn ws_urls(&self) -> Vec<String>;
    fn publisher(&self, config: &Config) -> Box<dyn Publisher>;
    /// CPU time of the system's processes so far (etcd excluded).
    fn cpu(&self) -> Duration;
    /// etcd's, counted apart; zero for a system without it.
    fn etcd_cpu(&self) -> Duration;
    fn has_etcd(&self) -> bool;
}

/// etcd, `serve` and two nodes, default flags (plus E2E_NODE_FLAGS).
struct PushManager<'a> {
    etcd: &'a LocalEtcd,
    env: Arc<Environment>,
    nodes: Vec<NodeProcess>,
    serve: Serve,
}

impl<'a> PushManager<'a> {
    fn start(etcd: &'a LocalEtcd, env: &Arc<Environment>, node_flags: &[&str]) -> PushManager<'a> {
        let nodes = (1..=2).map(|i| spawn_node(BIN, &etcd.endpoint(), PREFIX, &format!("n{i}"), node_flags)).collect();
        let serve = Serve::start_with(etcd, env, PREFIX, 2, &[], None);
        PushManager { etcd, env: env.clone(), nodes, serve }
    }
}

impl Drop for PushManager<'_> {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            signal(&node.child, libc::SIGTERM);
            let _ = wait_exit(&mut node.child, Duration::from_secs(10));
        }
    }
}

impl System for PushManager<'_> {
    fn name(&self) -> &'static str {
        "push-manager"
    }

    fn dialect(&self) -> Dialect {
        Dialect::PushManager
    }

    fn ws_urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("ws://{}/ws", n.ws_addr)).collect()
    }

    fn publisher(&self, config: &Config) -> Box<dyn Publisher> {
        let option = CallOption::default().timeout(config.connect_timeout);
        let channel = channel(&self.env, &self.serve.addr, None);
        Box::new(BroadcastPublisher::new(channel, option, &config.topic, config.in_flight))
    }

    fn cpu(&self) -> Duration {
        let nodes: Duration = self.nodes.iter().map(|n| cpu_time(n.child.id()).unwrap_or_else(|e| panic!("{e}"))).sum();
        nodes + self.serve.cpu()
    }

    fn etcd_cpu(&self) -> Duration {
        let pid = self.etcd.pid().expect("etcd runs");
        cpu_time(pid).unwrap_or_else(|e| panic!("{e}"))
    }

    fn has_etcd(&self) -> bool {
        true
    }
}

/// nats-server with a plain WebSocket listener, on loopback.
struct Nats {
    child: Child,
    client_addr: String,
    ws_url: String,
    _dir: tempfile::TempDir,
}

impl Nats {
    /// Starts it, or `None` when it is not installed.
    fn start() -> Option<Nats> {
        let dir = tempfile::tempdir().unwrap();
        let (client, ws) = (free_port(), free_port());
        let conf = dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!("listen: \"127.0.0.1:{client}\"\nwebsocket {{\n  listen: \"127.0.0.1:{ws}\"\n  no_tls: true\n}}\n"),
        )
        .unwrap();
        let child = match Command::new("nats-server")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => panic!("starting nats-server: {e}"),
        };
        let client_addr = format!("127.0.0.1:{client}");
        let up = poll_until(Duration::from_secs(10), || {
            TcpStream::connect(&client_addr).is_ok() && TcpStream::connect(("127.0.0.1", ws)).is_ok()
        });
        assert!(up, "nats-server did not listen on {client_addr} and port {ws} within 10s");
        Some(Nats { child, client_addr, ws_url: format!("ws://127.0.0.1:{ws}/"), _dir: dir })
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        signal(&self.child, libc::SIGTERM);
        let _ = wait_exit(&mut self.child, Duration::from_secs(10));
    }
}

impl System for Nats {
    fn name(&self) -> &'static str {
        "nats-server"
    }

    fn dialect(&self) -> Dialect {
        Dialect::Nats
    }

    fn ws_urls(&self) -> Vec<String> {
        vec![self.ws_url.clone()]
    }

    fn publisher(&self, config: &Config) -> Box<dyn Publisher> {
        Box::new(
            NatsPublisher::connect(&self.client_addr, &config.topic, config.rate > 0).unwrap_or_else(|e| panic!("{e}")),
        )
    }

    fn cpu(&self) -> Duration {
        cpu_time(self.child.id()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn etcd_cpu(&self) -> Duration {
        Duration::ZERO
    }

    fn has_etcd(&self) -> bool {
        false
    }
}
