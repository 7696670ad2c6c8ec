//! How many deliveries per second, and at what cost in write syscalls and event-loop CPU, does
//! one connect-node push to many WebSocket subscribers of one topic, with coalesced writes
//! (the defaults) and with the one-frame-per-write behaviour they replace?
//!
//! An in-process gateway (defaults: two event loops) gets `WS_FANOUT_SUBSCRIBERS` (default
//! 1,000) subscribers on one topic, all read by ONE client thread over non-blocking sockets and
//! a mio poll, so the reader costs less CPU than the node. 128-byte broadcasts (carrying their
//! publish time) go through the real gRPC `ConnectNode`, from four caller threads:
//! `BroadcastBatch`es of 64 as push-manager sends them, and single `Broadcast`s, flat out for
//! `WS_FANOUT_SECS` (default 3) seconds; then single `Broadcast`s at a fixed 300/s and 1,000/s; then the
//! light case: 10 subscribers, 20 messages/s. For each it prints deliveries/s, socket writes
//! per delivery (the node's `socket_writes` over `frames_sent`), p50/p99 publish -> frame
//! latency (sampled on 20 connections spread over all), and the CPU seconds of the `ws-loop-*`
//! threads per million deliveries. Deliveries/s count until the last frame arrived.
//!
//! "old" is `--ws-write-delay 0 --ws-write-bytes 4096`: a loop that keeps up message by message
//! writes each frame in a syscall of its own, as before coalescing. "new" is the defaults. The
//! two alternate, `WS_FANOUT_RUNS` (default 3) runs each; medians are printed.
//!
//! `cargo bench --bench ws_fanout`; it stops by itself.

mod support;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use grpcio::{ChannelBuilder, RpcStatusCode};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use push_manager::gateway::{raise_nofile_limit, Config, Gateway};
use push_manager::proto::broadcast_request;
use push_manager::proto::protocol::{BroadCastReq, BroadcastBatch};
use push_manager::proto::protocol_grpc::ConnectNodeClient;
use support::{env_or, grpc_env, median};

const TOPIC: &str = "fanout";
const BODY: usize = 128;
const BATCH: usize = 64;
const CALLERS: usize = 4;
/// How many connections have their deliveries' latencies recorded (all of them when fewer).
const SAMPLED: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Old,
    New,
}

#[derive(Clone, Copy, Debug)]
enum Load {
    /// Flat out, `BroadcastBatch`es of [`BATCH`].
    Batches,
    /// Flat out, single `Broadcast`s.
    Singles,
    /// Single `Broadcast`s at this many per second, from one caller.
    Rate(u64),
}

#[derive(Debug, Default, Clone)]
struct Outcome {
    deliveries_per_s: f64,
    writes_per_delivery: f64,
    p50_ms: f64,
    p99_ms: f64,
    loop_cpu_s_per_m: f64,
}

fn main() {
    raise_nofile_limit().expect("raise the open-files limit");
    let subscribers = env_or("WS_FANOUT_SUBSCRIBERS", 1000) as usize;
    let secs = Duration::from_secs(env_or("WS_FANOUT_SECS", 3));
    let runs = env_or("WS_FANOUT_RUNS", 3) as usize;
    let cases: [(&str, usize, Load); 5] = [
        ("batches of 64, flat out", subscribers, Load::Batches),
        ("single Broadcast, flat out", subscribers, Load::Singles),
        ("single Broadcast, 300/s", subscribers, Load::Rate(300)),
        ("single Broadcast, 1000/s", subscribers, Load::Rate(1000)),
        ("light: 10 subscribers, 20/s", 10, Load::Rate(20)),
    ];
    println!("ws_fanout: {subscribers} subscribers, {BODY}-byte bodies, {secs:?} per run, {runs} runs alternating");
    for (name, subs, load) in cases {
        let mut results: HashMap<&str, Vec<Outcome>> = HashMap::new();
        for run in 0..runs {
            for mode in [Mode::Old, Mode::New] {
                let outcome = measure(mode, subs, load, secs);
                eprintln!("  {name} run {run} {mode:?}: {outcome:?}");
                results.entry(if mode == Mode::Old { "old" } else { "new" }).or_default().push(outcome);
            }
        }
        println!("\n{name}:");
        println!(
            "  {:<4} {:>14} {:>16} {:>9} {:>9} {:>22}",
            "", "deliveries/s", "writes/delivery", "p50 ms", "p99 ms", "ws-loop CPU s / M del."
        );
        for key in ["old", "new"] {
            let r = &results[key];
            let med = |f: fn(&Outcome) -> f64| median(r.iter().map(f).collect());
            println!(
                "  {key:<4} {:>14.0} {:>16.3} {:>9.2} {:>9.2} {:>22.2}",
                med(|o| o.deliveries_per_s),
                med(|o| o.writes_per_delivery),
                med(|o| o.p50_ms),
                med(|o| o.p99_ms),
                med(|o| o.loop_cpu_s_per_m),
            );
        }
    }
}

fn measure(mode: Mode, subscribers: usize, load: Load, secs: Duration) -> Outcome {
    let gw = Gateway::start(Config {
        grpc_listen: "127.0.0.1:0".into(),
        ws_listen: "127.0.0.1:0".into(),
        max_batch_messages: BATCH,
        ..match mode {
            Mode::Old => Config { ws_write_delay: Duration::ZERO, ws_write_bytes: 4096, ..Config::default() },
            Mode::New => Config::default(),
        }
    })
    .expect("gateway starts");
    let sockets: Vec<TcpStream> = (0..subscribers).map(|_| subscribe(gw.ws_addr())).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while gw.stats().connections_open < subscribers as u64 {
        assert!(Instant::now() < deadline, "subscribers did not all connect");
        thread::sleep(Duration::from_millis(10));
    }
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        thread::Builder::new().name("reader".into()).spawn(move || read_all(sockets, epoch, &stop)).unwrap()
    };

    let env = grpc_env();
    let channel = ChannelBuilder::new(env).connect(&gw.grpc_addr().to_string());
    let client = ConnectNodeClient::new(channel);
    let before = gw.stats();
    let cpu_before = loop_cpu();
    let started = Instant::now();
    let end = started + secs;
    let callers = match load {
        Load::Rate(_) => 1,
        _ => CALLERS,
    };
    thread::scope(|scope| {
        for _ in 0..callers {
            let client = &client;
            scope.spawn(move || publish(client, load, epoch, end));
        }
    });
    // Let what was accepted reach the reader (the node's count stops moving), then stop it.
    let drain = Instant::now() + Duration::from_secs(10);
    let mut sent = gw.stats().frames_sent;
    loop {
        thread::sleep(Duration::from_millis(200));
        let now = gw.stats().frames_sent;
        if now == sent || Instant::now() > drain {
            break;
        }
        sent = now;
    }
    // Until the last delivery, give or take the quiet period above: what queued in the node
    // while publishing counts when it is written, not when it was accepted.
    let delivered_for = started.elapsed().saturating_sub(Duration::from_millis(200));
    let cpu = loop_cpu() - cpu_before;
    let after = gw.stats();
    stop.store(true, Ordering::Relaxed);
    let (received, mut latencies) = reader.join().unwrap();
    let frames = after.frames_sent - before.frames_sent;
    let writes = after.socket_writes - before.socket_writes;
    latencies.sort_unstable();
    let pct = |p: f64| latencies.get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)));
    let ms = |ns: Option<&u64>| ns.map_or(f64::NAN, |&ns| ns as f64 / 1e6);
    Outcome {
        deliveries_per_s: received as f64 / delivered_for.as_secs_f64(),
        writes_per_delivery: writes as f64 / frames.max(1) as f64,
        p50_ms: ms(pct(0.50)),
        p99_ms: ms(pct(0.99)),
        loop_cpu_s_per_m: cpu.as_secs_f64() / (frames.max(1) as f64 / 1e6),
    }
}

/// Opens a WebSocket connection subscribed to [`TOPIC`] by its query string, and returns its
/// socket, non-blocking, with the upgrade answer read.
fn subscribe(addr: SocketAddr) -> TcpStream {
    let mut socket = std::net::TcpStream::connect(addr).expect("connect");
    socket.set_nodelay(true).unwrap();
    let request = format!(
        "GET /ws?topic={TOPIC} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    socket.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        socket.read_exact(&mut byte).expect("read the upgrade answer");
        answer.push(byte[0]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&answer));
    socket.set_nonblocking(true).unwrap();
    TcpStream::from_std(socket)
}

/// Reads every socket until `stop`; returns the frames received and the latencies (ns) of
/// those on sampled connections.
fn read_all(mut sockets: Vec<TcpStream>, epoch: Instant, stop: &AtomicBool) -> (u64, Vec<u64>) {
    let mut poll = Poll::new().unwrap();
    for (i, socket) in sockets.iter_mut().enumerate() {
        poll.registry().register(socket, Token(i), Interest::READABLE).unwrap();
    }
    let mut pending: Vec<Vec<u8>> = vec![Vec::new(); sockets.len()];
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 256 << 10];
    let mut frames = 0u64;
    let mut latencies = Vec::new();
    let sample_every = sockets.len().div_ceil(SAMPLED);
    while !stop.load(Ordering::Relaxed) {
        poll.poll(&mut events, Some(Duration::from_millis(50))).unwrap();
        for event in events.iter() {
            let i = event.token().0;
            loop {
                match sockets[i].read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let sampled = i % sample_every == 0;
                        let mut on_frame = |payload: &[u8]| {
                            frames += 1;
                            if sampled {
                                if let Some(at) = published_at(payload) {
                                    latencies.push((epoch.elapsed().as_nanos() as u64).saturating_sub(at));
                                }
                            }
                        };
                        // Parsed where it was read unless a frame was cut short last time.
                        let pending = &mut pending[i];
                        if pending.is_empty() {
                            let used = parse_frames(&buf[..n], &mut on_frame);
                            pending.extend_from_slice(&buf[used..n]);
                        } else {
                            pending.extend_from_slice(&buf[..n]);
                            let used = parse_frames(pending, &mut on_frame);
                            pending.drain(..used);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("read: {e}"),
                }
            }
        }
    }
    (frames, latencies)
}

/// Calls `each` with the payload of every whole (unmasked, unfragmented) frame at the start of
/// `data`; returns the bytes used.
fn parse_frames(data: &[u8], mut each: impl FnMut(&[u8])) -> usize {
    let mut at = 0;
    loop {
        let rest = &data[at..];
        if rest.len() < 2 {
            return at;
        }
        let (len, head) = match rest[1] & 0x7f {
            126 if rest.len() >= 4 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
            127 if rest.len() >= 10 => (u64::from_be_bytes(rest[2..10].try_into().unwrap()) as usize, 10),
            126 | 127 => return at,
            n => (n as usize, 2),
        };
        if rest.len() < head + len {
            return at;
        }
        each(&rest[head..head + len]);
        at += head + len;
    }
}

/// The publish time a frame's body carries, in ns since the run's epoch.
fn published_at(payload: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"body\":\"";
    let start = payload.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    std::str::from_utf8(payload.get(start..start + 20)?).ok()?.parse().ok()
}

fn message(epoch: Instant, seq: i32) -> BroadCastReq {
    let mut body = format!("{:020}", epoch.elapsed().as_nanos() as u64);
    body.push_str(&"x".repeat(BODY - body.len()));
    broadcast_request(TOPIC, 1000, seq, body)
}

/// Publishes until `end`; a call refused as busy is retried after a short pause.
fn publish(client: &ConnectNodeClient, load: Load, epoch: Instant, end: Instant) {
    let mut seq = 0;
    let started = Instant::now();
    while Instant::now() < end {
        let result = match load {
            Load::Batches => {
                let mut batch = BroadcastBatch::new();
                batch.set_messages((0..BATCH).map(|i| message(epoch, seq + i as i32)).collect());
                seq += BATCH as i32;
                client.broadcast_batch(&batch).map(drop)
            }
            Load::Singles => {
                seq += 1;
                client.broadcast(&message(epoch, seq)).map(drop)
            }
            Load::Rate(per_s) => {
                let due = started + Duration::from_secs_f64(seq as f64 / per_s as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    thread::sleep(wait);
                }
                seq += 1;
                client.broadcast(&message(epoch, seq)).map(drop)
            }
        };
        match result {
            Ok(()) => {}
            Err(grpcio::Error::RpcFailure(s)) if s.code() == RpcStatusCode::RESOURCE_EXHAUSTED => {
                thread::sleep(Duration::from_micros(200))
            }
            Err(e) => panic!("publish failed: {e}"),
        }
    }
}

/// CPU time of this process's `ws-loop-*` threads, from /proc.
fn loop_cpu() -> Duration {
    let ticks_per_s = 100.0; // USER_HZ on Linux.
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        if !stat[open + 1..close].starts_with("ws-loop") {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        // utime and stime: fields 14 and 15 of stat, 12 and 13 after the name.
        ticks += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    Duration::from_secs_f64(ticks as f64 / ticks_per_s)
}
