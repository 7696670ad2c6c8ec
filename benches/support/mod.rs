//! What the benchmark programs share: the real `push-manager serve` in a process of its own,
//! sinks registered in a real etcd, the broadcast they send, settings from the environment, and
//! what `/proc` says about a child process. Each program uses a part of this, hence `dead_code`.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use futures::executor::block_on;
use futures::{SinkExt, TryStreamExt};
use grpcio::{Channel, ChannelBuilder, EnvBuilder, Environment, WriteFlags};
use push_manager::grpc::ClientTls;
use push_manager::proto::broadcast_request;
use push_manager::proto::protocol::{BroadCastReq, BroadcastStreamReq};
use push_manager::proto::protocol_grpc::PushServerClient;
use push_manager::testkit::{signal, spawn_serve, wait_until, LocalEtcd, Reaped, Sink};

/// The `push-manager` binary cargo built for these benchmarks.
pub const BIN: &str = env!("CARGO_BIN_EXE_push-manager");
/// The size of every broadcast's body.
pub const BODY_BYTES: usize = 256;

/// The number in environment variable `name`, or `default` when it is unset.
pub fn env_or(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|e| panic!("{name}={v:?}: {e}")),
        Err(_) => default,
    }
}

/// The median of `v` (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One gRPC environment with one completion-queue thread for all of a program's clients.
pub fn grpc_env() -> Arc<Environment> {
    Arc::new(EnvBuilder::new().cq_count(1).name_prefix("grpc-bench").build())
}

/// A real etcd of the program's own, killed and deleted on drop.
pub fn start_etcd() -> LocalEtcd {
    LocalEtcd::start().unwrap_or_else(|e| panic!("{e}"))
}

/// Registers each of `sinks` in `etcd` under `prefix`, as node `n<i>`.
pub fn register(etcd: &LocalEtcd, prefix: &str, sinks: &[Sink]) {
    for (i, s) in sinks.iter().enumerate() {
        etcd.client().put(&format!("{prefix}n{i}"), s.addr.as_bytes(), None).unwrap();
    }
}

/// Load-generator threads, and the calls each keeps in flight.
#[derive(Clone, Copy)]
pub struct Load {
    pub threads: usize,
    pub in_flight: usize,
}

/// A call under way; resolves to what it counts (deliveries accepted, or 1 for a direct call).
pub type Pending = Pin<Box<dyn Future<Output = u64> + Send>>;

/// Runs `load.threads` threads for `secs`, each keeping `load.in_flight` calls in flight (a
/// cheap load generator, so the CPU goes to what is measured). Returns the calls made and their sum.
pub fn hammer(load: Load, secs: Duration, make_caller: impl Fn() -> Box<dyn FnMut() -> Pending + Send>) -> (u64, u64) {
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

/// What one `BroadcastStream` call did.
pub struct Published {
    /// Messages sent, and the time from opening the stream to its last reply.
    pub sent: u64,
    pub elapsed: Duration,
    /// Node queues that took a message, summed over messages; and those that dropped one.
    pub accepted: u64,
    pub dropped: u64,
}

/// Messages per `BroadcastStream` element in [`publish_stream`], as `push-manager send` batches
/// what it has at hand.
pub const STREAM_ELEMENT: usize = 256;

/// Publishes copies of `req` over one `BroadcastStream` call for `secs`, [`STREAM_ELEMENT`] per
/// element, as fast as push-manager takes them (its flow control paces the sending thread),
/// while this thread reads the replies.
pub fn publish_stream(client: &PushServerClient, req: BroadCastReq, secs: Duration) -> Published {
    let start = Instant::now();
    let (mut tx, rx) = client.broadcast_stream().expect("the stream opens");
    let element = BroadcastStreamReq { messages: vec![req; STREAM_ELEMENT].into(), ..Default::default() };
    let sender = thread::Builder::new()
        .name("bench-stream".into())
        .spawn(move || {
            // Elements leave in batches while the stream is busy.
            tx.enhance_batch(true);
            let mut sent = 0u64;
            block_on(async {
                while start.elapsed() < secs {
                    tx.feed((element.clone(), WriteFlags::default())).await.expect("stream send");
                    sent += STREAM_ELEMENT as u64;
                }
                tx.close().await.expect("the stream closes");
            });
            sent
        })
        .unwrap();
    let (accepted, dropped) = block_on(rx.try_fold((0u64, 0u64), |(mut accepted, mut dropped), replies| {
        for r in replies.get_replies() {
            assert_eq!(r.get_code(), 0, "a stream reply: {}", r.get_error());
            accepted += r.get_reply().get_accepted() as u64;
            dropped += r.get_reply().get_dropped().len() as u64;
        }
        futures::future::ready(Ok((accepted, dropped)))
    }))
    .expect("the stream's replies");
    let sent = sender.join().expect("the sending thread");
    Published { sent, elapsed: start.elapsed(), accepted, dropped }
}

/// A channel to `addr`, over TLS when `tls` is given.
pub fn channel(env: &Arc<Environment>, addr: &str, tls: Option<&ClientTls>) -> Channel {
    let mut builder = ChannelBuilder::new(env.clone());
    if let Some(tls) = tls {
        builder = builder.set_credentials(tls.credentials().expect("the benchmark's CA is readable"));
    }
    builder.connect(addr)
}

/// A broadcast of `body` to every user, as business servers send them.
pub fn request(body: Vec<u8>) -> BroadCastReq {
    broadcast_request("", 1000, 0, body)
}

/// `push-manager serve` in a process of its own, so its CPU time can be told from the load
/// generator's and the sinks'. Stopped with SIGTERM (a clean drain) on drop.
pub struct Serve {
    child: Reaped,
    pub addr: String,
}

impl Serve {
    /// Starts it and waits until a broadcast reaches all `nodes`.
    pub fn start(etcd: &LocalEtcd, env: &Arc<Environment>, prefix: &str, nodes: usize, batch_max: usize) -> Serve {
        Serve::start_with(etcd, env, prefix, nodes, &["--batch-max", &batch_max.to_string()], None)
    }

    /// [`Serve::start`] with `flags`, called over TLS with `tls` when given.
    pub fn start_with(
        etcd: &LocalEtcd,
        env: &Arc<Environment>,
        prefix: &str,
        nodes: usize,
        flags: &[&str],
        tls: Option<&ClientTls>,
    ) -> Serve {
        let mut args = vec!["--log-level", "error"];
        args.extend_from_slice(flags);
        let (child, addr) = spawn_serve(BIN, &etcd.endpoint(), prefix, &args, Stdio::inherit());
        let client = PushServerClient::new(channel(env, &addr, tls));
        let probe = request(vec![b'x'; BODY_BYTES]);
        wait_until("nodes discovered", Duration::from_secs(10), || {
            client.broadcast(&probe).is_ok_and(|reply| reply.get_targeted() as usize == nodes)
        });
        Serve { child, addr }
    }

    /// User plus system CPU time the process has used so far.
    pub fn cpu(&self) -> Duration {
        cpu_time(self.child.id()).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        signal(&self.child, libc::SIGTERM);
        let _ = self.child.wait();
    }
}

/// User plus system CPU time process `pid` has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Result<Duration, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .ok_or("unexpected /proc/<pid>/stat format")?
        .1
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf reads a configuration value; it takes an integer and touches no memory of ours.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(Duration::from_secs_f64((fields[11] + fields[12]) as f64 / ticks_per_s))
}

/// Resident set size of process `pid` in KiB, from `/proc/<pid>/status`.
pub fn vm_rss_kib(pid: u32) -> Result<u64, String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or("no VmRSS line")?;
    let kib = line.split_whitespace().nth(1).ok_or("empty VmRSS line")?;
    kib.parse().map_err(|e| format!("VmRSS {kib:?}: {e}"))
}
