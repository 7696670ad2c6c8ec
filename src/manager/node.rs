//! One connect-node as push-manager sees it: a gRPC channel, a bounded queue, and the
//! `routine_size` worker threads (`n<number>-w<n>`) that drain it.
//!
//! Workers take turns building batches: the first message waiting, whatever else is queued, and
//! (only while another RPC to the node is in flight) what arrives before that RPC completes, up
//! to `batch_max`. Nothing waits for a batch to fill, so light traffic pays no latency; under
//! load, messages share RPCs, which is what lets one node take far more than ~11k RPCs/s.
//! Failed RPCs with a retryable status are retried with backoff while the node is registered.
//! Closing drops the queue's sender: workers deliver what is queued, give up on the rest at the
//! drain deadline (counted as `abandoned`), and end when the channel is empty and disconnected.
//!
//! Parallel RPCs and retries can reach the node out of order, so every message is numbered where
//! the queue accepts it (a [`Window`] per node, taken with the send so numbers follow queue order
//! and a refused message takes none) and every call is a sequenced `BroadcastBatch`: the node
//! puts each sender's messages back in order and drops what it has already applied. The window
//! also tracks which numbers are settled (acknowledged or given up), so each call carries the
//! low water mark that tells the node what it need not wait for.
//!
//! Each worker sends its batches over a stream of its own to the node ([`BatchStream`]), one
//! batch at a time, or as `BroadcastBatch` calls to a node from before the stream. "RPC" here
//! (and in the counters: `rpcs`, the RPC latency) is one batch's exchange with the node either
//! way: a message and its reply on the stream, or a call.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, Receiver, Sender, TrySendError};
use grpcio::{CallOption, ChannelBuilder, Client, Environment, RpcStatusCode};
use log::{debug, info, warn};
use parking_lot::{Mutex, RwLock};

use super::config::Config;
use super::error::Error;
use super::message::{BatchRequest, Queued, SenderId, SharedMessage, BROADCAST_BATCH};
use super::stream::BatchStream;
use super::throttle::Throttle;
use crate::admin::{Histogram, HistogramSnapshot};
use crate::auth::{bearer, KeyFile};
use crate::grpc::is_retryable;
use crate::grpc::{ClientTls, TlsError};
use crate::proto::protocol::NodeReply;
use crate::secret::Secret;
use crate::thread::StoppableThread;

/// A batch stops growing at this many encoded bytes (a single larger message still goes alone),
/// well under gRPC's default 4 MiB receive limit on the connect-node.
const BATCH_MAX_BYTES: usize = 2 << 20;

/// Bounds of the messages-per-RPC histogram.
const BATCH_SIZE_BOUNDS: &[u64] = &[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000];
/// Bounds of the RPC latency histogram, in microseconds (0.5 ms to 10 s).
const RPC_LATENCY_BOUNDS_US: &[u64] =
    &[500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 10_000_000];

/// Running totals for one node. Messages, not RPCs, unless the name says otherwise.
#[derive(Debug)]
struct Counters {
    enqueued: AtomicU64,
    dropped_full: AtomicU64,
    dropped_closing: AtomicU64,
    sent: AtomicU64,
    failed: AtomicU64,
    abandoned: AtomicU64,
    retried: AtomicU64,
    rpcs: AtomicU64,
    /// Messages per RPC attempt.
    batch_sizes: Histogram,
    /// Time from an RPC attempt's start to its answer (or failure), in microseconds.
    rpc_latency_us: Histogram,
}

impl Counters {
    fn new() -> Counters {
        Counters {
            enqueued: AtomicU64::default(),
            dropped_full: AtomicU64::default(),
            dropped_closing: AtomicU64::default(),
            sent: AtomicU64::default(),
            failed: AtomicU64::default(),
            abandoned: AtomicU64::default(),
            retried: AtomicU64::default(),
            rpcs: AtomicU64::default(),
            batch_sizes: Histogram::new(BATCH_SIZE_BOUNDS),
            rpc_latency_us: Histogram::new(RPC_LATENCY_BOUNDS_US),
        }
    }
}

/// A snapshot of one node's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    pub id: String,
    /// The number its worker threads are named after (`n<number>-w<n>`).
    pub number: u32,
    pub addr: String,
    /// Messages its queue accepted.
    pub enqueued: u64,
    /// Broadcasts refused because its queue was full.
    pub dropped_full: u64,
    /// Broadcasts refused because the node was closing (removed from etcd, or shutdown).
    pub dropped_closing: u64,
    /// Messages the node acknowledged.
    pub sent: u64,
    /// Messages given up after the last attempt failed.
    pub failed: u64,
    /// Messages still queued at the drain deadline, never attempted.
    pub abandoned: u64,
    /// RPC attempts that were retries.
    pub retried: u64,
    /// RPCs made: batch attempts, on a stream or as calls.
    pub rpcs: u64,
    /// Messages waiting in its queue now.
    pub queue_depth: u64,
    /// Messages per RPC attempt.
    pub batch_sizes: HistogramSnapshot,
    /// RPC attempts' latency, in microseconds.
    pub rpc_latency_us: HistogramSnapshot,
}

impl NodeStats {
    /// Every accepted message has met its end: sent, failed or abandoned.
    pub fn settled(&self) -> bool {
        self.queue_depth == 0 && self.enqueued == self.sent + self.failed + self.abandoned
    }
}

/// Why an offer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The queue is at `queue_size`.
    Full,
    /// The node is being removed or the manager is shutting down.
    Closing,
}

/// State the workers consult to know whether to retry and when to give up.
struct Lifecycle {
    registered: AtomicBool,
    drain_deadline: Mutex<Option<Instant>>,
    /// Dropped on close, which wakes workers sleeping in a retry backoff.
    closing_tx: Mutex<Option<Sender<()>>>,
    closing_rx: Receiver<()>,
}

impl Lifecycle {
    fn past_drain_deadline(&self) -> bool {
        matches!(*self.drain_deadline.lock(), Some(d) if Instant::now() >= d)
    }

    /// The RPC deadline: the configured timeout, cut short by a drain deadline.
    fn rpc_timeout(&self, configured: Duration) -> Duration {
        match *self.drain_deadline.lock() {
            Some(d) => configured.min(d.saturating_duration_since(Instant::now())).max(Duration::from_millis(1)),
            None => configured,
        }
    }
}

/// Whether a closing node's workers may still retry failed RPCs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retries {
    /// The node is still registered (push-manager is shutting down): retry until the drain
    /// deadline.
    UntilDrained,
    /// The node left etcd: one attempt per batch, no retries.
    Stop,
}

/// The numbers one node client has given out, and which of them are settled: acknowledged by
/// the node or given up on. Short critical sections only (a `try_send`, a few flags).
#[derive(Debug, Default)]
struct Window {
    /// The number the next accepted message gets.
    next: u64,
    /// The lowest number not yet settled (`next` when all are).
    low_water: u64,
    /// Whether each number from `low_water` up to `next` is settled.
    settled: VecDeque<bool>,
}

impl Window {
    fn take_number(&mut self) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.settled.push_back(false);
        seq
    }

    /// Marks `seqs` settled and moves the low water mark past every settled number at its foot.
    fn settle(&mut self, seqs: impl Iterator<Item = u64>) {
        for seq in seqs {
            if let Some(flag) = seq.checked_sub(self.low_water).and_then(|i| self.settled.get_mut(i as usize)) {
                *flag = true;
            }
        }
        while self.settled.front() == Some(&true) {
            self.settled.pop_front();
            self.low_water += 1;
        }
    }
}

pub(crate) struct NodeClient {
    id: String,
    number: u32,
    sender_id: SenderId,
    window: Arc<Mutex<Window>>,
    /// Where the node is now, and the client that calls it there: swapped together when the
    /// node re-registers at a new address, so its queue and counters carry over.
    target: Arc<RwLock<Target>>,
    access: Arc<NodeAccess>,
    sender: RwLock<Option<Sender<Queued>>>,
    counters: Arc<Counters>,
    lifecycle: Arc<Lifecycle>,
    workers: Mutex<Vec<StoppableThread>>,
    full_warnings: Throttle,
}

/// The name of worker `n` of the node numbered `number`: `n3-w0`. Numbers, not node ids, so
/// that every worker keeps a distinct name within Linux's 15 bytes whatever the id is.
/// Node numbers wrap at 10^8 so that with up to 1024 workers (`w1023`) a name always fits; a
/// process adds far fewer nodes in its life.
pub(crate) fn worker_name(number: u32, n: usize) -> String {
    format!("n{}-w{n}", number % 100_000_000)
}

impl NodeClient {
    /// Connects (lazily) to `addr` and starts the workers, named after `number` (unique in the
    /// process; the log line here maps it to the id).
    pub(crate) fn start(
        instance: u64,
        number: u32,
        id: &str,
        addr: &str,
        access: &Arc<NodeAccess>,
        config: &Arc<Config>,
    ) -> Result<NodeClient, Error> {
        let target = Arc::new(RwLock::new(Target::new(access, addr)?));
        let (tx, rx) = bounded(config.queue_size);
        let (closing_tx, closing_rx) = bounded(0);
        let counters = Arc::new(Counters::new());
        let (completed_tx, completed_rx) = bounded(config.routine_size);
        let pipeline = Arc::new(Pipeline {
            collecting: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            completed_tx,
            completed_rx,
        });
        let lifecycle = Arc::new(Lifecycle {
            registered: AtomicBool::new(true),
            drain_deadline: Mutex::new(None),
            closing_tx: Mutex::new(Some(closing_tx)),
            closing_rx,
        });
        let window = Arc::new(Mutex::new(Window::default()));
        let node = NodeClient {
            id: id.to_string(),
            number,
            sender_id: SenderId::new(instance, number),
            window: window.clone(),
            target: target.clone(),
            access: access.clone(),
            sender: RwLock::new(Some(tx)),
            counters: counters.clone(),
            lifecycle: lifecycle.clone(),
            workers: Mutex::new(Vec::with_capacity(config.routine_size)),
            full_warnings: Throttle::new(Duration::from_secs(1)),
        };
        // One per node, not per worker: a dead node is one warning a second, not routine_size.
        let failures = Arc::new(Throttle::new(Duration::from_secs(1)));
        for n in 0..config.routine_size {
            let worker = Worker {
                node_id: node.id.clone(),
                sender_id: node.sender_id,
                window: window.clone(),
                target: target.clone(),
                access: access.clone(),
                queue: rx.clone(),
                pipeline: pipeline.clone(),
                counters: counters.clone(),
                lifecycle: lifecycle.clone(),
                config: config.clone(),
                failures: failures.clone(),
                stream: None,
                unary_at: None,
            };
            // Workers end when the queue disconnects (`close`), after draining it, not on the
            // stop channel.
            match StoppableThread::spawn(worker_name(number, n), move |_stop| worker.run()) {
                Ok(thread) => node.workers.lock().push(thread),
                Err(e) => {
                    node.close(Duration::ZERO, Retries::Stop);
                    node.join();
                    return Err(e.into());
                }
            }
        }
        info!(
            "node {number} = {id}: added at {addr} (threads {}..{}, queue {}, sender {})",
            worker_name(number, 0),
            worker_name(number, config.routine_size - 1),
            config.queue_size,
            node.sender_id
        );
        Ok(node)
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn addr(&self) -> String {
        self.target.read().addr.clone()
    }

    /// Points the node's workers at `addr` from their next RPC on. The node re-registered there:
    /// it is still the same node to callers, so what is queued for it goes to the new address
    /// (and an RPC that fails at the old one is retried there) instead of being lost with it.
    pub(crate) fn move_to(&self, addr: &str) {
        let target = match Target::new(&self.access, addr) {
            Ok(target) => target,
            Err(e) => return warn!("node {}: cannot move to {addr} ({e}); keeps {}", self.id, self.addr()),
        };
        let old = std::mem::replace(&mut *self.target.write(), target);
        info!("node {}: moved from {} to {addr}; its queue follows", self.id, old.addr);
    }

    /// Queues `msg` without blocking, numbered in queue order.
    pub(crate) fn offer(&self, msg: &SharedMessage) -> Result<(), Refused> {
        // try_send never blocks, so holding the locks across it is fine; the window's lock makes
        // numbering and queueing one step, so numbers follow queue order, and a refused message
        // gives its number back (no gap for the node to wait on).
        let result = match &*self.sender.read() {
            Some(tx) => {
                let mut window = self.window.lock();
                let seq = window.next;
                let sent = tx.try_send(Queued { seq, msg: msg.clone() });
                if sent.is_ok() {
                    window.take_number();
                }
                sent
            }
            None => Err(TrySendError::Disconnected(Queued { seq: 0, msg: msg.clone() })),
        };
        let refused = match result {
            Ok(()) => {
                self.counters.enqueued.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Err(TrySendError::Full(_)) => {
                self.counters.dropped_full.fetch_add(1, Ordering::Relaxed);
                Refused::Full
            }
            Err(TrySendError::Disconnected(_)) => {
                self.counters.dropped_closing.fetch_add(1, Ordering::Relaxed);
                Refused::Closing
            }
        };
        if let Some(suppressed) = self.full_warnings.allow() {
            let why = if refused == Refused::Full { "queue full" } else { "node closing" };
            warn!("node {}: dropped a broadcast, {why} ({suppressed} more dropped since the last warning)", self.id);
        }
        Err(refused)
    }

    /// Stops accepting: workers deliver what is queued until `drain_timeout` has passed, then
    /// count the rest as abandoned. Does not wait; `join` does.
    pub(crate) fn close(&self, drain_timeout: Duration, retries: Retries) {
        let queued = self.sender.read().as_ref().map_or(0, |tx| tx.len());
        *self.lifecycle.drain_deadline.lock() = Some(Instant::now() + drain_timeout);
        self.lifecycle.registered.store(retries == Retries::UntilDrained, Ordering::Relaxed);
        if self.sender.write().take().is_some() {
            debug!("node {}: closing with {queued} queued, drain within {drain_timeout:?}", self.id);
        }
        self.lifecycle.closing_tx.lock().take();
    }

    /// Whether every worker has ended (after `close`).
    pub(crate) fn is_finished(&self) -> bool {
        self.workers.lock().iter().all(StoppableThread::is_finished)
    }

    /// Joins the workers. Call after `close`, or it waits forever.
    pub(crate) fn join(&self) {
        // Taken out first so the lock is not held across the joins.
        let workers = std::mem::take(&mut *self.workers.lock());
        for mut w in workers {
            w.join();
        }
    }

    pub(crate) fn stats(&self) -> NodeStats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NodeStats {
            id: self.id.clone(),
            number: self.number,
            addr: self.addr(),
            enqueued: load(&c.enqueued),
            dropped_full: load(&c.dropped_full),
            dropped_closing: load(&c.dropped_closing),
            sent: load(&c.sent),
            failed: load(&c.failed),
            abandoned: load(&c.abandoned),
            retried: load(&c.retried),
            rpcs: load(&c.rpcs),
            queue_depth: self.sender.read().as_ref().map_or(0, |tx| tx.len() as u64),
            batch_sizes: c.batch_sizes.snapshot(),
            rpc_latency_us: c.rpc_latency_us.snapshot(),
        }
    }
}

impl Drop for NodeClient {
    fn drop(&mut self) {
        self.close(Duration::ZERO, Retries::Stop);
        self.join();
    }
}

/// What every node client of one manager connects and authenticates with.
pub(crate) struct NodeAccess {
    /// The node clients' gRPC environment (its thread is `grpc-nodes-0`).
    pub(crate) env: Arc<Environment>,
    /// TLS to the nodes; `None` for plaintext.
    pub(crate) tls: Option<ClientTls>,
    /// The node token, sent with every call; re-read on SIGHUP.
    pub(crate) token: Option<Arc<KeyFile>>,
}

impl NodeAccess {
    /// The node token to send now, if there is one.
    fn current_token(&self) -> Option<Secret> {
        self.token.as_ref().map(|token| token.first())
    }
}

/// A call option carrying `token`, if any, as its bearer header.
fn call_option(token: Option<&Secret>) -> CallOption {
    match token {
        Some(token) => CallOption::default().headers(bearer(token)),
        None => CallOption::default(),
    }
}

/// A node's address and the gRPC client connected (lazily) to it.
struct Target {
    addr: String,
    client: Client,
}

impl Target {
    fn new(access: &NodeAccess, addr: &str) -> Result<Target, TlsError> {
        let mut builder = ChannelBuilder::new(access.env.clone());
        if let Some(tls) = &access.tls {
            builder = builder.set_credentials(tls.credentials()?);
        }
        Ok(Target { addr: addr.to_string(), client: Client::new(builder.connect(addr)) })
    }
}

/// What a node's workers share to take turns building batches.
struct Pipeline {
    /// Held by the worker collecting the next batch; holds a message that did not fit the
    /// previous batch (byte limit), which starts the next one.
    collecting: Mutex<Option<Queued>>,
    /// RPCs to this node under way.
    in_flight: AtomicUsize,
    /// A token per finished RPC, to wake a collector waiting for one.
    completed_tx: Sender<()>,
    completed_rx: Receiver<()>,
}

/// Messages for one RPC, bounded in count and in encoded bytes.
struct Batch {
    messages: Vec<Queued>,
    bytes: usize,
    max: usize,
}

impl Batch {
    fn new(first: Queued, max: usize) -> Batch {
        Batch { bytes: first.msg.encoded_len(), messages: vec![first], max }
    }

    fn is_full(&self) -> bool {
        self.messages.len() >= self.max
    }

    /// Adds `m`, or leaves it in `carried` for the next batch if it would pass the byte limit.
    fn push_or_carry(&mut self, m: Queued, carried: &mut Option<Queued>) {
        if self.bytes + m.msg.encoded_len() > BATCH_MAX_BYTES {
            *carried = Some(m);
        } else {
            self.bytes += m.msg.encoded_len();
            self.messages.push(m);
        }
    }

    /// Takes what is already queued, without waiting.
    fn fill(&mut self, queue: &Receiver<Queued>, carried: &mut Option<Queued>) {
        while !self.is_full() && carried.is_none() {
            let Ok(m) = queue.try_recv() else { return };
            self.push_or_carry(m, carried);
        }
    }
}

/// One `n<number>-w<n>` thread.
struct Worker {
    node_id: String,
    sender_id: SenderId,
    window: Arc<Mutex<Window>>,
    target: Arc<RwLock<Target>>,
    access: Arc<NodeAccess>,
    queue: Receiver<Queued>,
    pipeline: Arc<Pipeline>,
    counters: Arc<Counters>,
    lifecycle: Arc<Lifecycle>,
    config: Arc<Config>,
    failures: Arc<Throttle>,
    /// The worker's stream to the node, once it has sent a batch; `None` after an error.
    stream: Option<BatchStream>,
    /// The node's address if it refused the stream as a method it lacks (a node from before
    /// it): batches to it go as `BroadcastBatch` calls while it stays there.
    unary_at: Option<String>,
}

impl Worker {
    /// Ends when the queue is disconnected and empty: nothing queued is left behind uncounted.
    fn run(mut self) {
        loop {
            let batch = {
                // One worker collects at a time; waiting for the queue under this lock is the
                // point (the others wait their turn), and no RPC or send happens under it.
                let mut carried = self.pipeline.collecting.lock();
                let Some(batch) = self.collect(&mut carried) else { return };
                // Counted before the next collector looks, so it sees this RPC as in flight.
                self.pipeline.in_flight.fetch_add(1, Ordering::SeqCst);
                batch
            };
            let batch = self.deliver(batch);
            self.window.lock().settle(batch.iter().map(|q| q.seq));
            self.pipeline.in_flight.fetch_sub(1, Ordering::SeqCst);
            let _ = self.pipeline.completed_tx.try_send(());
        }
    }

    /// The next batch: the first message waiting (blocking until one comes), what else is
    /// queued, and — only while other RPCs to this node are in flight — what arrives until they
    /// have completed or the batch is full. With nothing in flight a message goes at once, so
    /// light traffic waits for nothing; under load, messages ride together instead of each
    /// paying for an RPC (Nagle's algorithm, for RPCs: one partial batch in flight at a time,
    /// full ones in parallel up to `routine_size`). The wait is for completions, not for each
    /// arrival, so a busy node costs a wake-up per RPC rather than per message. `None` once the
    /// queue is closed and empty.
    fn collect(&self, carried: &mut Option<Queued>) -> Option<Vec<Queued>> {
        let first = carried.take().or_else(|| self.queue.recv().ok())?;
        let mut batch = Batch::new(first, self.config.batch_max);
        batch.fill(&self.queue, carried);
        // Tokens of RPCs that ended before this batch began say nothing about the ones under way.
        while self.pipeline.completed_rx.try_recv().is_ok() {}
        // Bounded by the RPC deadline in any case, so a lost token cannot stall the node.
        let deadline = Instant::now() + self.config.rpc_timeout;
        while !batch.is_full() && carried.is_none() && self.pipeline.in_flight.load(Ordering::SeqCst) > 0 {
            if self.pipeline.completed_rx.recv_deadline(deadline).is_err() {
                break;
            }
            batch.fill(&self.queue, carried);
        }
        Some(batch.messages)
    }

    /// Sends `messages` until acknowledged or given up on; hands them back to be settled.
    fn deliver(&mut self, messages: Vec<Queued>) -> Vec<Queued> {
        let n = messages.len() as u64;
        let mut request = BatchRequest { sender: self.sender_id, messages, low_water: 0 };
        let mut attempt = 1;
        loop {
            if self.lifecycle.past_drain_deadline() {
                self.counters.abandoned.fetch_add(n, Ordering::Relaxed);
                return request.messages;
            }
            let timeout = self.lifecycle.rpc_timeout(self.config.rpc_timeout);
            self.counters.rpcs.fetch_add(1, Ordering::Relaxed);
            // Read at each attempt: what was settled meanwhile need not be waited for.
            request.low_water = self.window.lock().low_water;
            // Cloned (the client is an Arc) so the lock is not held across the RPC.
            let (client, addr) = {
                let target = self.target.read();
                (target.client.clone(), target.addr.clone())
            };
            self.counters.batch_sizes.observe(n);
            let started = Instant::now();
            let result = self.attempt(&client, &addr, &request, timeout);
            self.counters.rpc_latency_us.observe(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
            let error = match result {
                Ok(_) => {
                    self.counters.sent.fetch_add(n, Ordering::Relaxed);
                    return request.messages;
                }
                Err(e) => e,
            };
            let registered = self.lifecycle.registered.load(Ordering::Relaxed);
            if is_retryable(&error)
                && attempt < self.config.retry.max_attempts
                && registered
                && self.wait_before_retry(self.config.retry.backoff(attempt + 1))
            {
                attempt += 1;
                self.counters.retried.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.counters.failed.fetch_add(n, Ordering::Relaxed);
            if let Some(suppressed) = self.failures.allow() {
                warn!(
                    "node {}: gave up on {n} message(s) after {attempt} attempt(s): {error} \
                     ({suppressed} more failures since the last warning)",
                    self.node_id
                );
            }
            return request.messages;
        }
    }

    /// One attempt at `request`: over the worker's stream to the node at `addr` (a new one if
    /// it has none that fits), or as a `BroadcastBatch` call to a node without the stream.
    fn attempt(
        &mut self,
        client: &Client,
        addr: &str,
        request: &BatchRequest,
        timeout: Duration,
    ) -> grpcio::Result<NodeReply> {
        let token = self.access.current_token();
        let unary = || client.unary_call(&BROADCAST_BATCH, request, call_option(token.as_ref()).timeout(timeout));
        if self.unary_at.as_deref() == Some(addr) {
            return unary();
        }
        let (stream, fresh) = match self.stream.take() {
            Some(stream) if stream.fits(addr, token.as_ref()) => (stream, false),
            _ => (BatchStream::open(client, addr, call_option(token.as_ref()), token.clone())?, true),
        };
        let result = self.stream.insert(stream).exchange(request, timeout);
        if result.is_err() {
            self.stream = None;
        }
        match result {
            // A node from before the stream answers UNIMPLEMENTED, or CANCELLED when the batch
            // races that answer (grpcio aborts a call to a method it lacks without reading it);
            // a node with the stream never cancels one. Nothing of the batch was taken.
            Err(grpcio::Error::RpcFailure(status))
                if fresh && matches!(status.code(), RpcStatusCode::UNIMPLEMENTED | RpcStatusCode::CANCELLED) =>
            {
                let reply = unary()?;
                info!(
                    "node {}: {addr} does not serve BroadcastBatchStream (a node from before it); \
                     this worker sends it BroadcastBatch calls",
                    self.node_id
                );
                self.unary_at = Some(addr.to_string());
                Ok(reply)
            }
            result => result,
        }
    }

    /// Sleeps for `backoff` before a retry; `false` if there must be no retry after all. Closing
    /// does not cut the sleep short (a busy node answering RESOURCE_EXHAUSTED needs the time,
    /// drain or not), except that a node removed from etcd gets no more retries and no sleep
    /// outlasts the drain deadline.
    fn wait_before_retry(&self, backoff: Duration) -> bool {
        let until = Instant::now() + backoff;
        select! {
            recv(self.lifecycle.closing_rx) -> _ => {
                if !self.lifecycle.registered.load(Ordering::Relaxed) {
                    return false;
                }
                let until = self.lifecycle.drain_deadline.lock().map_or(until, |d| d.min(until));
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
                true
            }
            default(backoff) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_names_stay_distinct_within_linux_limit() {
        assert_eq!(worker_name(3, 0), "n3-w0");
        // The largest a name gets: the last number before the wrap, the 1024th worker.
        assert_eq!(worker_name(99_999_999, 1023), "n99999999-w1023");
        assert!(worker_name(99_999_999, 1023).len() <= crate::thread::MAX_NAME_BYTES);
        assert_eq!(worker_name(100_000_003, 0), "n3-w0");
    }

    #[test]
    fn the_low_water_mark_waits_for_the_lowest_unsettled_number() {
        let mut w = Window::default();
        let seqs: Vec<u64> = (0..5).map(|_| w.take_number()).collect();
        assert_eq!(seqs, [0, 1, 2, 3, 4]);
        w.settle([1, 2].into_iter());
        assert_eq!(w.low_water, 0, "0 is still in flight");
        w.settle([0].into_iter());
        assert_eq!(w.low_water, 3);
        w.settle([4, 3, 99].into_iter());
        assert_eq!((w.low_water, w.next), (5, 5), "all settled; unknown numbers are ignored");
        assert!(w.settled.is_empty());
    }
}
