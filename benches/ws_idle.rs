//! How much resident memory does a connect-node spend per idle WebSocket connection?
//!
//! Runs the gateway in a child process (this program re-executed with `WS_IDLE_CHILD=1`) so its
//! VmRSS is not mixed with the clients', opens `WS_IDLE_CONNECTIONS` (default 10,000) idle
//! WebSocket connections to it over loopback, checks over gRPC that one broadcast reaches every
//! one of them, and prints the child's VmRSS before and after next to the target (16 KiB per
//! connection) and Centrifugo's published figure (~30 KB per idle connection).
//!
//! `cargo bench --bench ws_idle`; it stops by itself.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use grpcio::ChannelBuilder;
use push_manager::gateway::{raise_nofile_limit, Config, Gateway};
use push_manager::proto::broadcast_request;
use push_manager::proto::protocol_grpc::ConnectNodeClient;
use support::{env_or, grpc_env, vm_rss_kib};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

const CHILD_ENV: &str = "WS_IDLE_CHILD";
const TARGET_BYTES: f64 = 16.0 * 1024.0;
const CENTRIFUGO_BYTES: f64 = 30.0 * 1000.0;
/// Longest the whole run may take before it gives up.
const BUDGET: Duration = Duration::from_secs(300);
const TOPIC: &str = "idle";

fn main() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return run_gateway();
    }
    if let Err(e) = run_clients() {
        eprintln!("ws_idle failed: {e}");
        std::process::exit(1);
    }
}

/// The child: a gateway with the default config on loopback, until stdin closes.
fn run_gateway() {
    raise_nofile_limit().expect("raise the open-files limit");
    let gateway = Gateway::start(Config {
        grpc_listen: "127.0.0.1:0".into(),
        ws_listen: "127.0.0.1:0".into(),
        ..Config::default()
    })
    .expect("gateway starts");
    println!("{} {}", gateway.ws_addr(), gateway.grpc_addr());
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(gateway);
}

type Error = Box<dyn std::error::Error>;

fn run_clients() -> Result<(), Error> {
    let wanted = env_or("WS_IDLE_CONNECTIONS", 10_000) as usize;
    let limit = raise_nofile_limit()? as usize;
    if wanted + 64 > limit {
        return Err(format!("{wanted} connections need more than this process's open-files limit ({limit})").into());
    }
    let started = Instant::now();
    let mut child = Command::new(std::env::current_exe()?)
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let result = measure(&mut child, wanted, started);
    drop(child.stdin.take());
    let _ = child.wait();
    result
}

fn measure(child: &mut Child, wanted: usize, started: Instant) -> Result<(), Error> {
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("no child stdout")?).read_line(&mut line)?;
    let mut addrs = line.split_whitespace().map(str::parse::<SocketAddr>);
    let (ws_addr, grpc_addr) = match (addrs.next(), addrs.next()) {
        (Some(Ok(ws)), Some(Ok(grpc))) => (ws, grpc),
        _ => return Err(format!("unexpected child output {line:?}").into()),
    };
    let pid = child.id();
    let rss_before = vm_rss_kib(pid)?;
    println!("gateway pid {pid}: ws://{ws_addr}/ws, gRPC {grpc_addr}; VmRSS {rss_before} KiB with no connections");

    let connect_started = Instant::now();
    let mut clients = Vec::with_capacity(wanted);
    for i in 0..wanted {
        if started.elapsed() > BUDGET {
            return Err(format!("time budget spent after {i} connections").into());
        }
        clients.push(connect(ws_addr)?);
        if (i + 1) % 1000 == 0 {
            println!("  {:>6} connections open ({:.1} s)", i + 1, connect_started.elapsed().as_secs_f64());
        }
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    let rss_idle = vm_rss_kib(pid)?;

    // One broadcast must reach every connection; retry while the last handshakes settle.
    let node = ConnectNodeClient::new(ChannelBuilder::new(grpc_env()).connect(&grpc_addr.to_string()));
    let mut attempt = 0;
    loop {
        attempt += 1;
        let reply = node.broadcast(&broadcast_request(TOPIC, 1000, attempt, "are you there?"))?;
        if reply.delivered == wanted as u64 {
            break;
        }
        if attempt >= 50 {
            return Err(format!("broadcast reached {} of {wanted} connections", reply.delivered).into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for (i, client) in clients.iter_mut().enumerate() {
        read_until_seq(client, attempt).map_err(|e| format!("connection {i}: {e}"))?;
    }
    let rss_after = vm_rss_kib(pid)?;

    let per_idle = (rss_idle.saturating_sub(rss_before) * 1024) as f64 / wanted as f64;
    let per_after = (rss_after.saturating_sub(rss_before) * 1024) as f64 / wanted as f64;
    println!("{wanted} idle WebSocket connections opened in {connect_secs:.1} s; all {wanted} still open and received the broadcast");
    println!("gateway VmRSS: {rss_before} KiB before, {rss_idle} KiB idle, {rss_after} KiB after one broadcast to all");
    println!(
        "resident memory per idle connection: {:.1} KiB ({per_idle:.0} B); after a broadcast: {:.1} KiB",
        per_idle / 1024.0,
        per_after / 1024.0
    );
    println!(
        "target: {:.1} KiB per connection ({}); Centrifugo: ~{:.1} KiB (30 KB) per idle connection",
        TARGET_BYTES / 1024.0,
        if per_after <= TARGET_BYTES { "met" } else { "MISSED" },
        CENTRIFUGO_BYTES / 1024.0
    );
    // Clients hang up first, so the gateway's loops see plain EOFs and stop quickly.
    drop(clients);
    Ok(())
}

fn connect(addr: SocketAddr) -> Result<WebSocket<TcpStream>, Error> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let url = format!("ws://{addr}/ws?topic={TOPIC}");
    let (ws, _) = tungstenite::client::client_with_config(url.as_str(), stream, Some(config))
        .map_err(|e| format!("WebSocket handshake: {e}"))?;
    Ok(ws)
}

/// Reads deliveries until the one with `seq` (earlier attempts may have reached this client).
fn read_until_seq(client: &mut WebSocket<TcpStream>, seq: i32) -> Result<(), Error> {
    loop {
        match client.read()? {
            Message::Text(text) => {
                let frame: serde_json::Value = serde_json::from_str(text.as_str())?;
                if frame["seq"] == seq {
                    return Ok(());
                }
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => return Err(format!("unexpected {other:?}").into()),
        }
    }
}
