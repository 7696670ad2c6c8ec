//! One `ws-loop-<n>` thread: a mio poll over the non-blocking sockets it owns, driving each
//! through the WebSocket handshake ([`handshake`]), client commands, deliveries, pings and the
//! close handshake ([`connection`]), with its own subscription index ([`subscriptions`]).
//!
//! A thread per connection would cost a stack each; here a connection is a slab entry, a small
//! tungstenite read buffer and a queue of `Arc`'d frames shared with every other connection that
//! got the same broadcast, so 10,000 idle connections fit in a few KiB each. Sockets are
//! registered edge-triggered for reading and writing once: a connection reads until `WouldBlock`
//! (or its `READ_BUDGET` for this turn, then it waits its next turn on `unread`, so one client
//! sending without pause cannot hold up the others) and writes only while the socket takes
//! bytes; a connection whose unsent bytes would pass `max_out_buffer` is closed rather than
//! allowed to stall the loop or grow without bound (a single frame, whatever its size, is
//! always taken by a connection with nothing unsent).
//!
//! Writes are coalesced per turn of the loop: the inbox is drained (a `BroadcastBatch` from
//! push-manager is one message in it) onto the connections' queues first, then each connection
//! with something queued writes it in one syscall ([`connection`]). Writes are paced by what
//! they cost ([`WriteHold`]): after writes that took `t`, the next wait until `4 × t` after them,
//! at most `write_delay`, for more to share them, so a frame to a loop that has not written for
//! a while leaves in its turn; a connection with a full batch queued writes at once all the
//! same. A small batch for a loop asleep with nothing to do is written by the publisher itself
//! ([`LoopState::deliver_inline`]): waking the loop would cost more than the writes. Every
//! socket a loop is handed counts in `connections_held` until the loop lets go of it, which is
//! what `max_connections` bounds.
//! On a `wss://` endpoint each socket carries a rustls session ([`transport`]), driven by the
//! same reads and writes.

mod connection;
mod handshake;
mod subscriptions;
mod transport;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use log::{debug, error, info, warn};
use mio::net::TcpStream;
use mio::{Events, Poll, Registry, Token, Waker};
use parking_lot::Mutex;
use slab::Slab;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, Utf8Bytes};

use super::access::{Access, Gatekeeper, Identity};
use super::hub::{Audience, Backlog, EncodedBroadcast, LoopMsg, SharedCounts};
use super::protocol::{self, AckKind, Command, IdentityKind, Reject, TopicLimits};
use super::stats::Stats;
use super::Config;
use crate::admin::Histogram;
use connection::{Connection, Next, QueuedFrames, Read, MAX_WRITE_BUFFER, READ_BUDGET};
use handshake::{Handshaking, Opening, RefusedBy, Step};
use subscriptions::Subscriptions;

pub(crate) use connection::MAX_WRITE_BATCH;
pub(crate) use handshake::{http_response, WS_PATH};

/// The token every gateway poll (the loops' and the accept thread's) gives its waker: slab keys
/// never reach it.
pub(crate) const WAKER: Token = Token(usize::MAX);
/// How long a stopping loop waits for its connections to finish their close handshakes.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// An audience past which a loop fans a frame out from a copy of its own: the other loops
/// count references to the shared one on another core, and every clone and drop of it would
/// move that cache line between them.
const OWN_COPY_AUDIENCE: usize = 16;

/// What an event loop needs from the gateway config, read only here and in the child modules.
#[derive(Debug, Clone)]
pub(crate) struct LoopConfig {
    /// Every connection's tungstenite config ([`websocket_config`]).
    ws: WebSocketConfig,
    /// Unsent bytes past which a connection is closed as slow.
    max_out_buffer: usize,
    /// How often each connection is pinged.
    ping_interval: Duration,
    /// Silence that drops a connection.
    pong_timeout: Duration,
    /// The longest a loop holds writes back for more deliveries to share them ([`WriteHold`]);
    /// zero: never.
    write_delay: Duration,
    /// Bytes of queued frames per write.
    write_bytes: usize,
    /// Time a socket has to complete its handshake.
    handshake_timeout: Duration,
    /// Topic length and count limits, for query strings and commands.
    limits: TopicLimits,
    /// Origins, tokens and what they grant.
    gatekeeper: Arc<Gatekeeper>,
}

impl LoopConfig {
    pub(crate) fn new(config: &Config, gatekeeper: Arc<Gatekeeper>) -> LoopConfig {
        LoopConfig {
            ws: websocket_config(config.max_frame_bytes),
            max_out_buffer: config.max_out_buffer,
            ping_interval: config.ping_interval,
            pong_timeout: config.pong_timeout,
            write_delay: config.ws_write_delay,
            write_bytes: config.ws_write_bytes,
            handshake_timeout: config.handshake_timeout,
            limits: TopicLimits { max_len: config.max_topic_len, max_per_connection: config.max_topics_per_connection },
            gatekeeper,
        }
    }
}

/// Everything a loop is built from ([`LoopState::new`]).
pub(crate) struct LoopParts {
    pub(crate) poll: Poll,
    /// Registered under [`WAKER`] with `poll`, and kept by the loop for as long as it polls: if
    /// the stopping side dropped the last handle right after waking it, closing the waker would
    /// take its event out of the poll unseen.
    pub(crate) waker: Arc<Waker>,
    pub(crate) inbox: Receiver<LoopMsg>,
    pub(crate) wake_pending: Arc<AtomicBool>,
    /// The hub's count of what waits in `inbox` ([`super::hub::LoopHandle::backlog`]).
    pub(crate) backlog: Arc<Backlog>,
    /// See [`super::hub::LoopHandle::delivery_latency_us`].
    pub(crate) delivery_latency_us: Arc<Histogram>,
    /// Subscribers per topic and connections per user, over every loop.
    pub(crate) counts: Arc<SharedCounts>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) config: LoopConfig,
    /// The endpoint's TLS config when it serves `wss://`, shared by every connection.
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
}

/// The WebSocket config every connection gets: small eager read buffer, explicit flushing.
fn websocket_config(max_frame_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        // Allocated per connection up front; client commands are small.
        .read_buffer_size(2048)
        // Each frame goes straight through to the transport, which gathers a batch and gives its
        // buffer back once written; tungstenite's own would keep its largest size for good.
        .write_buffer_size(0)
        // Room for the above and the odd control frame. tungstenite buffers a pong for each
        // ping it reads, written or not: without a cap, a client that pings and never reads
        // grows it without bound. At the cap, pongs wait (the latest replacing the others).
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(Some(max_frame_bytes))
        .max_frame_size(Some(max_frame_bytes))
}

/// A loop's state, shared by its thread and the hub. The thread holds the lock for each turn
/// and never while it sleeps in its poll, so a publisher that takes the lock finds the loop
/// asleep, and one that cannot take it leaves the batch in the inbox.
#[derive(Clone)]
pub(crate) struct LoopState(Arc<Mutex<EventLoop>>);

impl LoopState {
    /// Builds a loop's state; its thread then polls with [`run`].
    pub(crate) fn new(parts: LoopParts) -> io::Result<(Poll, LoopState)> {
        let hold = WriteHold::new(parts.config.write_delay);
        let event_loop = EventLoop {
            registry: parts.poll.registry().try_clone()?,
            waker: parts.waker,
            inbox: parts.inbox,
            wake_pending: parts.wake_pending,
            backlog: parts.backlog,
            delivery_latency_us: parts.delivery_latency_us,
            unwritten: Vec::new(),
            conns: Slab::new(),
            subscriptions: Subscriptions::new(parts.counts, parts.config.limits),
            stats: parts.stats,
            config: parts.config,
            tls: parts.tls,
            dirty: Vec::new(),
            unread: Vec::new(),
            hold,
            keys: Vec::new(),
        };
        Ok((parts.poll, LoopState(Arc::new(Mutex::new(event_loop)))))
    }

    /// Fans `batch` out and writes it from the calling thread, when the loop is asleep with
    /// nothing to do and the batch is for at most [`INLINE_AUDIENCE`] of its connections.
    /// Returns false, having done nothing, otherwise: the caller queues it for the loop.
    ///
    /// Waking a sleeping thread costs 0.1-0.2 ms of scheduling on an idle virtual machine, far
    /// more than writing a frame to a few sockets, and a light-traffic message would pay it on
    /// every hop. A busy loop, or a broadcast to many connections (whose writes would keep the
    /// publisher from the other loops), goes through the inbox as before.
    pub(crate) fn deliver_inline(&self, batch: &[EncodedBroadcast], taken: Instant) -> bool {
        let Some(mut event_loop) = self.0.try_lock() else { return false };
        event_loop.deliver_inline(batch, taken)
    }
}

/// The most connections of one loop a batch is written to from the publisher's thread
/// ([`LoopState::deliver_inline`]): a few dozen writes take tens of microseconds.
const INLINE_AUDIENCE: usize = 32;

/// Runs a loop until `stop` disconnects and its connections are closed.
pub(crate) fn run(mut poll: Poll, state: LoopState, stop: Receiver<()>) {
    let name = std::thread::current().name().unwrap_or("ws-loop").to_string();
    let tick = sweep_interval(&state.0.lock().config);
    let mut events = Events::with_capacity(1024);
    let mut next_sweep = Instant::now() + tick;
    let mut stop_deadline: Option<Instant> = None;
    loop {
        let wait = state.0.lock().wait(Instant::now(), next_sweep, stop_deadline);
        // Unlocked while it sleeps: a publisher that takes the lock may deliver inline.
        if let Err(e) = poll.poll(&mut events, Some(wait)) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            error!("{name}: poll failed, dropping its connections: {e}");
            break;
        }
        let mut event_loop = state.0.lock();
        event_loop.turn(&events);
        if stop_deadline.is_none() && matches!(stop.try_recv(), Err(TryRecvError::Disconnected)) {
            info!("{name}: closing {} connections", event_loop.conns.len());
            stop_deadline = Some(Instant::now() + SHUTDOWN_GRACE);
            event_loop.close_all();
        }
        let now = Instant::now();
        if event_loop.hold.due(now) || stop_deadline.is_some() {
            event_loop.flush_dirty();
        }
        if now >= next_sweep {
            event_loop.sweep(now);
            next_sweep = now + tick;
        }
        if let Some(deadline) = stop_deadline {
            if event_loop.conns.is_empty() || now >= deadline {
                break;
            }
        }
    }
    let mut event_loop = state.0.lock();
    let left = event_loop.conns.len();
    for key in event_loop.conns.iter().map(|(key, _)| key).collect::<Vec<_>>() {
        event_loop.drop_conn(key);
    }
    debug!("{name}: stopped ({left} connections dropped without finishing their close)");
}

/// A slab entry: a socket still in its HTTP handshake, or an upgraded connection.
enum Conn {
    Handshaking(Box<Handshaking>),
    Open(Box<Connection>),
}

struct EventLoop {
    /// The loop's poll's registry, for registering the sockets it adopts.
    registry: Registry,
    /// Wakes the loop's poll: a publisher that delivered inline and left work for a turn.
    waker: Arc<Waker>,
    inbox: Receiver<LoopMsg>,
    wake_pending: Arc<AtomicBool>,
    backlog: Arc<Backlog>,
    delivery_latency_us: Arc<Histogram>,
    /// Batches fanned out since the last writes: when the hub took each, and how many of its
    /// broadcasts reached a connection here. Observed into `delivery_latency_us` at the writes.
    unwritten: Vec<(Instant, u64)>,
    conns: Slab<Conn>,
    subscriptions: Subscriptions,
    stats: Arc<Stats>,
    config: LoopConfig,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Connections with something to write; each is listed once (see [`Next::Flush`]).
    dirty: Vec<usize>,
    /// Connections that used up their `READ_BUDGET` with more to read (see [`Next::ReadLater`]).
    unread: Vec<usize>,
    /// Whether this turn's writes wait for more deliveries to share them.
    hold: WriteHold,
    /// The audience of the broadcast being fanned out, kept to reuse its allocation.
    keys: Vec<usize>,
}

impl EventLoop {
    /// How long the loop may sleep: until its next sweep, its stop deadline, or the writes it
    /// holds back, whichever comes first; not at all with connections left to read.
    fn wait(&self, now: Instant, next_sweep: Instant, stop_deadline: Option<Instant>) -> Duration {
        let mut wait = next_sweep.saturating_duration_since(now);
        if let Some(deadline) = stop_deadline {
            wait = wait.min(deadline.saturating_duration_since(now));
        }
        if !self.dirty.is_empty() {
            if let Some(due) = self.hold.deadline() {
                wait = wait.min(due.saturating_duration_since(now));
            }
        }
        if !self.unread.is_empty() {
            wait = Duration::ZERO;
        }
        wait
    }

    /// Handles what the poll reported, the reads left from the last turn and the inbox.
    fn turn(&mut self, events: &Events) {
        for event in events.iter() {
            if event.token() == WAKER {
                continue;
            }
            let readable = event.is_readable() || event.is_read_closed() || event.is_error();
            let writable = event.is_writable() || event.is_write_closed() || event.is_error();
            self.on_event(event.token().0, readable, writable);
        }
        // A key may have been closed (or even reused) since it was listed; reading a
        // connection with nothing to read only costs a WouldBlock.
        for key in std::mem::take(&mut self.unread) {
            self.read(key);
        }
        self.drain_inbox();
    }

    /// See [`LoopState::deliver_inline`].
    fn deliver_inline(&mut self, batch: &[EncodedBroadcast], taken: Instant) -> bool {
        // Anything in the inbox was published earlier and must go first.
        let idle =
            self.inbox.is_empty() && self.dirty.is_empty() && self.unread.is_empty() && self.hold.due(Instant::now());
        if !idle || batch.iter().map(|broadcast| self.audience_len(broadcast)).sum::<usize>() > INLINE_AUDIENCE {
            return false;
        }
        Stats::inc(&self.stats.inline_batches);
        self.fan_out(batch, taken);
        self.flush_dirty();
        // A socket that took only part is finished by its writable event; anything else left
        // (a connection to read or write again) needs a turn of the loop's own.
        if !self.dirty.is_empty() || !self.unread.is_empty() {
            if let Err(e) = self.waker.wake() {
                warn!("cannot wake an event loop: {e}");
            }
        }
        true
    }

    /// Takes everything queued for the loop. Connections write full batches as they fill, the
    /// rest when the turn's writes are due.
    fn drain_inbox(&mut self) {
        // Cleared before draining: a message sent after this point wakes us again.
        self.wake_pending.store(false, Ordering::SeqCst);
        loop {
            match self.inbox.try_recv() {
                Ok(LoopMsg::Accepted(stream)) => self.adopt(stream),
                Ok(LoopMsg::Publish { batch, taken }) => {
                    self.backlog.sub(batch.len(), batch.iter().map(|b| b.frame.len()).sum());
                    self.fan_out(&batch, taken);
                }
                Err(_) => return,
            }
        }
    }

    fn on_event(&mut self, key: usize, readable: bool, writable: bool) {
        match self.conns.get_mut(key) {
            None => {}
            Some(Conn::Handshaking(_)) => self.continue_handshake(key),
            Some(Conn::Open(conn)) => {
                if writable {
                    let next = conn.writable();
                    self.apply(key, next);
                }
                if readable {
                    self.read(key);
                }
            }
        }
    }

    /// Does what a connection said the loop must do with it.
    fn apply(&mut self, key: usize, next: Next) {
        match next {
            Next::Keep => {}
            Next::Flush => self.dirty.push(key),
            Next::ReadLater => self.unread.push(key),
            Next::ReadLaterAndFlush => {
                self.unread.push(key);
                self.dirty.push(key);
            }
            Next::Drop => self.drop_conn(key),
        }
    }

    fn adopt(&mut self, stream: TcpStream) {
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let started = Handshaking::start(stream, self.tls.as_ref(), &self.registry, Token(key), &self.config);
        let handshaking = match started {
            Ok(handshaking) => handshaking,
            Err(e) => {
                warn!("dropping a new connection: cannot start its handshake: {e}");
                Stats::inc(&self.stats.dropped_unserved);
                Stats::dec(&self.stats.connections_held);
                return;
            }
        };
        entry.insert(Conn::Handshaking(Box::new(handshaking)));
        self.continue_handshake(key);
    }

    fn continue_handshake(&mut self, key: usize) {
        let Some(Conn::Handshaking(handshaking)) = self.conns.get_mut(key) else { return };
        match handshaking.advance() {
            Step::Pending => {}
            Step::Open(conn, opening) => self.open(key, conn, opening),
            Step::Refused(by) => {
                Stats::inc(match by {
                    RefusedBy::Request => &self.stats.http_rejected,
                    RefusedBy::Origin => &self.stats.refused_origin,
                    RefusedBy::Token => &self.stats.refused_token,
                });
                self.remove(key);
            }
            Step::TlsRefused => {
                Stats::inc(&self.stats.tls_rejected);
                self.remove(key);
            }
            Step::Abandoned => self.remove(key),
        }
    }

    fn open(&mut self, key: usize, mut conn: Box<Connection>, opening: Opening) {
        conn.access = match opening.identity {
            Some(identity) => {
                self.subscriptions.set_user(key, identity.user.clone());
                Access::User(identity)
            }
            None => self.config.gatekeeper.without_token(Instant::now()),
        };
        if conn.access.is_pending() {
            Stats::inc(&self.stats.connections_pending_auth);
        }
        self.conns[key] = Conn::Open(conn);
        Stats::inc(&self.stats.connections_open);
        if let Err(reject) = self.subscriptions.subscribe(key, opening.topics) {
            return self.close_bad_input(key, reject);
        }
        // Frames may have arrived while the response went out; their edge is gone.
        self.read(key);
    }

    /// Reads until `WouldBlock`, or until `READ_BUDGET` messages, then lists it in `unread`.
    fn read(&mut self, key: usize) {
        for _ in 0..READ_BUDGET {
            let Some(Conn::Open(conn)) = self.conns.get_mut(key) else { return };
            match conn.read() {
                Read::Message(message) => self.on_message(key, message),
                Read::Refused(reject) => return self.close_bad_input(key, reject),
                Read::Done(next) => return self.apply(key, next),
            }
        }
        let Some(Conn::Open(conn)) = self.conns.get_mut(key) else { return };
        let next = conn.budget_spent();
        self.apply(key, next);
    }

    fn on_message(&mut self, key: usize, message: Message) {
        match message {
            Message::Text(text) => match protocol::parse_command(text.as_str(), self.config.limits) {
                Ok(command) => self.on_command(key, command),
                Err(reject) => self.close_bad_input(key, reject),
            },
            Message::Binary(_) => {
                self.close_bad_input(key, Reject::new(protocol::CLOSE_UNSUPPORTED, protocol::REASON_BINARY))
            }
            Message::Close(frame) => {
                // tungstenite has queued the reply; flushing it is the rest of the close.
                debug!("client closed: {frame:?}");
                self.leave_active(key);
                self.mark_dirty(key);
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }

    fn on_command(&mut self, key: usize, command: Command) {
        let Some(Conn::Open(conn)) = self.conns.get(key) else { return };
        let pending = conn.access.is_pending();
        let kind = match command {
            Command::Auth(token) => return self.on_token(key, &token, IdentityKind::Authenticated),
            Command::Refresh(token) => return self.on_token(key, &token, IdentityKind::Refreshed),
            Command::Subscribe(_) | Command::Unsubscribe(_) if pending => {
                let reason = "authentication required: send {\"action\":\"auth\",\"token\":\"...\"} first";
                return self.close_auth(key, Reject::new(protocol::CLOSE_AUTH, reason));
            }
            Command::Subscribe(topics) => {
                let denied: Vec<String> = topics.iter().filter(|t| !conn.access.allows(t)).cloned().collect();
                if !denied.is_empty() {
                    Stats::inc(&self.stats.refused_topics);
                    let reason = "not granted by this connection's token; nothing was subscribed";
                    let frame = protocol::encode_error("subscribe", &denied, reason);
                    return self.enqueue(key, &Utf8Bytes::from(frame));
                }
                if let Err(reject) = self.subscriptions.subscribe(key, topics) {
                    return self.close_bad_input(key, reject);
                }
                AckKind::Subscribed
            }
            Command::Unsubscribe(topics) => {
                self.subscriptions.unsubscribe(key, &topics);
                AckKind::Unsubscribed
            }
        };
        let ack = protocol::encode_ack(kind, self.subscriptions.topics(key));
        self.enqueue(key, &Utf8Bytes::from(ack));
    }

    /// `auth` and `refresh`: a token shown after the upgrade. A bad one closes the connection
    /// with 4001; one that cannot apply here is answered with an error frame.
    fn on_token(&mut self, key: usize, token: &str, kind: IdentityKind) {
        let Some(Conn::Open(conn)) = self.conns.get(key) else { return };
        let action = match kind {
            IdentityKind::Authenticated => "auth",
            IdentityKind::Refreshed => "refresh",
        };
        let current = match &conn.access {
            Access::User(identity) => Some(identity.user.clone()),
            Access::Anonymous | Access::Pending { .. } => None,
        };
        let misplaced = if !self.config.gatekeeper.reads_tokens() {
            Some("connection tokens are not read on this node (--ws-auth off)".to_string())
        } else {
            match (kind, &current) {
                (IdentityKind::Authenticated, Some(user)) => {
                    Some(format!("already authenticated as {user:?}; send refresh with a fresh token"))
                }
                (IdentityKind::Refreshed, None) => Some("not authenticated: send auth first".to_string()),
                _ => None,
            }
        };
        if let Some(reason) = misplaced {
            let frame = protocol::encode_error(action, &[], &reason);
            return self.enqueue(key, &Utf8Bytes::from(frame));
        }
        let identity = match self.config.gatekeeper.verify(token) {
            Ok(identity) => identity,
            Err(e) => return self.close_auth(key, Reject::new(protocol::CLOSE_AUTH, e.to_string())),
        };
        if current.as_ref().is_some_and(|user| *user != identity.user) {
            let reason = "the refresh token is for another user";
            return self.close_auth(key, Reject::new(protocol::CLOSE_AUTH, reason));
        }
        self.identify(key, identity, kind);
    }

    /// Makes a verified identity the connection's: its user for PushUsers, its grants for
    /// what it holds (topics the new token does not grant are dropped) and its expiry.
    fn identify(&mut self, key: usize, identity: Identity, kind: IdentityKind) {
        let Some(Conn::Open(conn)) = self.conns.get_mut(key) else { return };
        if conn.access.is_pending() {
            Stats::dec(&self.stats.connections_pending_auth);
        }
        if !matches!(conn.access, Access::User(_)) {
            self.subscriptions.set_user(key, identity.user.clone());
        }
        let revoked: Vec<String> = self
            .subscriptions
            .topics(key)
            .iter()
            .filter(|t| !identity.grants.allows(t))
            .map(|t| t.to_string())
            .collect();
        self.subscriptions.unsubscribe(key, &revoked);
        let frame = protocol::encode_identity(kind, &identity.user, identity.exp, self.subscriptions.topics(key));
        conn.access = Access::User(identity);
        self.enqueue(key, &Utf8Bytes::from(frame));
    }

    /// Queues each of `batch` on its audience here; what reached someone is counted as
    /// delivered at the writes.
    fn fan_out(&mut self, batch: &[EncodedBroadcast], taken: Instant) {
        let reached = batch.iter().filter(|broadcast| self.deliver(broadcast)).count();
        if reached > 0 {
            self.unwritten.push((taken, reached as u64));
        }
    }

    /// How many connections here `broadcast` is for; for everyone, every socket the loop holds
    /// (an upper bound: some are handshaking, closing or owe their token).
    fn audience_len(&self, broadcast: &EncodedBroadcast) -> usize {
        match &broadcast.audience {
            Audience::Everyone => self.conns.len(),
            Audience::Topic(topic) => self.subscriptions.subscriber_count(topic),
            Audience::Users(users) => users.iter().map(|user| self.subscriptions.connection_count(user)).sum(),
        }
    }

    /// Queues `broadcast` on every connection of its audience here; returns whether there was
    /// one.
    fn deliver(&mut self, broadcast: &EncodedBroadcast) -> bool {
        let mut keys = std::mem::take(&mut self.keys);
        match &broadcast.audience {
            // Not a connection still owing its token: it may receive nothing yet.
            Audience::Everyone => keys.extend(
                self.conns
                    .iter()
                    .filter(|(_, conn)| matches!(conn, Conn::Open(c) if !c.access.is_pending()))
                    .map(|(key, _)| key),
            ),
            Audience::Topic(topic) => keys.extend(self.subscriptions.subscribers(topic)),
            // The hub lists each user once, and a connection has one user: no key twice.
            Audience::Users(users) => {
                keys.extend(users.iter().flat_map(|user| self.subscriptions.connections_of(user)))
            }
        }
        let frame = if keys.len() > OWN_COPY_AUDIENCE {
            Utf8Bytes::from(broadcast.frame.as_str().to_owned())
        } else {
            broadcast.frame.clone()
        };
        for &key in &keys {
            self.enqueue(key, &frame);
        }
        let reached = !keys.is_empty();
        keys.clear();
        self.keys = keys;
        reached
    }

    /// Queues a frame on an active connection, or closes it if its unsent bytes would pass
    /// `max_out_buffer`.
    fn enqueue(&mut self, key: usize, frame: &Utf8Bytes) {
        let Some(Conn::Open(conn)) = self.conns.get_mut(key) else { return };
        match conn.enqueue(frame, self.config.max_out_buffer, &self.stats) {
            Ok(next) => self.apply(key, next),
            Err(slow) => {
                debug!("closing a slow consumer ({} bytes unsent)", slow.unsent);
                Stats::inc(&self.stats.closed_slow);
                self.close(key, protocol::CLOSE_SLOW, protocol::REASON_SLOW, QueuedFrames::Discard);
            }
        }
    }

    fn mark_dirty(&mut self, key: usize) {
        let Some(Conn::Open(conn)) = self.conns.get_mut(key) else { return };
        let next = conn.mark_dirty();
        self.apply(key, next);
    }

    /// The turn's writes, after which what was fanned out counts as delivered (a connection
    /// whose socket is full writes the rest when it drains, uncounted).
    fn flush_dirty(&mut self) {
        if self.dirty.is_empty() && self.unwritten.is_empty() {
            return;
        }
        let started = Instant::now();
        let writes = !self.dirty.is_empty();
        while let Some(key) = self.dirty.pop() {
            let Some(Conn::Open(conn)) = self.conns.get_mut(key) else { continue };
            let next = conn.flush(&self.stats);
            self.apply(key, next);
        }
        let now = Instant::now();
        if writes {
            self.hold.wrote(started, now);
        }
        for (taken, broadcasts) in self.unwritten.drain(..) {
            let us = u64::try_from(now.saturating_duration_since(taken).as_micros()).unwrap_or(u64::MAX);
            self.delivery_latency_us.observe_n(us, broadcasts);
        }
    }

    fn close_auth(&mut self, key: usize, reject: Reject) {
        debug!("closing a connection: {} {}", reject.code, reject.reason);
        Stats::inc(if reject.code == protocol::CLOSE_EXPIRED {
            &self.stats.closed_expired
        } else {
            &self.stats.closed_auth
        });
        self.close(key, reject.code, &reject.reason, QueuedFrames::Discard);
    }

    fn close_bad_input(&mut self, key: usize, reject: Reject) {
        debug!("closing a connection for bad input: {} {}", reject.code, reject.reason);
        Stats::inc(&self.stats.closed_bad_input);
        self.close(key, reject.code, &reject.reason, QueuedFrames::Discard);
    }

    /// Takes a connection out of the subscriptions and starts its close handshake.
    fn close(&mut self, key: usize, code: u16, reason: &str, queued: QueuedFrames) {
        self.leave_active(key);
        let Some(Conn::Open(conn)) = self.conns.get_mut(key) else { return };
        let next = conn.begin_close(code, reason, queued, &self.stats);
        self.apply(key, next);
    }

    /// Takes an active connection out of the subscriptions and the open count, once: the first
    /// step of closing or dropping it.
    fn leave_active(&mut self, key: usize) {
        let Some(Conn::Open(conn)) = self.conns.get_mut(key) else { return };
        if conn.leave_active() {
            if conn.access.is_pending() {
                Stats::dec(&self.stats.connections_pending_auth);
            }
            self.subscriptions.remove_all(key);
            Stats::dec(&self.stats.connections_open);
        }
    }

    fn close_all(&mut self) {
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            match self.conns.get(key) {
                Some(Conn::Handshaking(_)) => self.drop_conn(key),
                Some(Conn::Open(conn)) if conn.is_active() => {
                    Stats::inc(&self.stats.closed_shutdown);
                    self.close(key, protocol::CLOSE_SHUTDOWN, protocol::REASON_SHUTDOWN, QueuedFrames::Send)
                }
                Some(Conn::Open(_)) | None => {}
            }
        }
    }

    fn drop_conn(&mut self, key: usize) {
        self.leave_active(key);
        self.remove(key);
    }

    /// Lets go of a socket: the one place a slab entry is removed.
    fn remove(&mut self, key: usize) {
        // Dropping the socket closes it, which also removes it from the poll.
        if self.conns.try_remove(key).is_some() {
            Stats::dec(&self.stats.connections_held);
        }
    }

    /// Pings connections due for one, drops those silent for `pong_timeout` and those whose
    /// handshake or close took too long.
    fn sweep(&mut self, now: Instant) {
        let mut due = Vec::new();
        let mut overdue_auth = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            let next = match conn {
                Conn::Handshaking(handshaking) if handshaking.expired(now) => {
                    handshaking.time_out(self.config.handshake_timeout);
                    Stats::inc(&self.stats.closed_handshake_timeout);
                    Next::Drop
                }
                Conn::Handshaking(_) => Next::Keep,
                Conn::Open(conn) if conn.is_active() => match overdue(&conn.access, now, &self.config) {
                    Some(reject) => {
                        overdue_auth.push((key, reject));
                        Next::Keep
                    }
                    None => conn.tick(now, &self.config, &self.stats),
                },
                Conn::Open(conn) => conn.tick(now, &self.config, &self.stats),
            };
            if next != Next::Keep {
                due.push((key, next));
            }
        }
        for (key, next) in due {
            self.apply(key, next);
        }
        for (key, reject) in overdue_auth {
            self.close_auth(key, reject);
        }
        self.flush_dirty();
    }
}

/// Why an open connection must be closed now as far as its token goes: no `auth` within the
/// time allowed, or a token past its expiry.
fn overdue(access: &Access, now: Instant, config: &LoopConfig) -> Option<Reject> {
    match access {
        Access::Pending { deadline } if now >= *deadline => {
            let within = humantime::format_duration(config.gatekeeper.auth_timeout());
            Some(Reject::new(protocol::CLOSE_AUTH, format!("authentication required: no auth within {within}")))
        }
        Access::User(identity) if now >= identity.expires_at => {
            Some(Reject::new(protocol::CLOSE_EXPIRED, protocol::REASON_EXPIRED))
        }
        _ => None,
    }
}

/// When a loop's connections write what was queued on them: paced by how long their writes
/// take. Writes that took `t` are followed by at least `PACE × t` (at most `cap`) before the
/// next ones, so what arrives meanwhile shares their syscalls. A loop whose writes are quick —
/// few connections, or little load — hardly waits: writing 20 connections takes tens of
/// microseconds. One that spends milliseconds on a turn's writes (hundreds of connections, or a
/// CPU shared with others) waits a few times that, and the busier it is, the more frames each
/// write carries. So the time a loop spends writing stays a bounded share of its time while the
/// frames per syscall grow with the load, instead of a syscall per frame per connection until
/// it falls behind. A delivery to a loop that wrote nothing for `PACE × t` goes out in its
/// turn; a zero `cap` never holds.
#[derive(Debug)]
struct WriteHold {
    cap: Duration,
    /// When the last writes ended, and how long they took.
    last: Option<(Instant, Duration)>,
}

/// How many times as long as its last writes took a loop waits before the next: the share of
/// its time spent writing, under load, is at most `1 / (1 + PACE)`.
const PACE: u32 = 4;

impl WriteHold {
    fn new(cap: Duration) -> WriteHold {
        WriteHold { cap, last: None }
    }

    /// Whether the connections may write now.
    fn due(&self, now: Instant) -> bool {
        self.deadline().is_none_or(|due| now >= due)
    }

    /// When writes held back are due, for the poll's timeout; `None` when nothing holds them.
    fn deadline(&self) -> Option<Instant> {
        let (ended, took) = self.last?;
        let hold = took.saturating_mul(PACE).min(self.cap);
        (!hold.is_zero()).then(|| ended + hold)
    }

    /// Writes ran from `started` to `ended`.
    fn wrote(&mut self, started: Instant, ended: Instant) {
        self.last = Some((ended, ended.saturating_duration_since(started)));
    }
}

/// How often a loop looks at its timers: often enough to honour the shortest of them.
fn sweep_interval(config: &LoopConfig) -> Duration {
    let shortest = config
        .ping_interval
        .min(config.pong_timeout)
        .min(config.handshake_timeout)
        .min(config.gatekeeper.auth_timeout());
    (shortest / 4).clamp(Duration::from_millis(5), Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_wait_a_multiple_of_what_the_last_ones_took_and_never_with_a_zero_cap() {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let mut hold = WriteHold::new(ms(10));
        assert!(hold.due(start), "nothing written yet: at once");
        assert_eq!(hold.deadline(), None);
        hold.wrote(start, start + ms(1));
        let due = start + ms(1) + ms(u64::from(PACE));
        assert_eq!(hold.deadline(), Some(due));
        assert!(!hold.due(start + ms(2)), "right after writes that took 1 ms: held");
        assert!(hold.due(due), "held no longer than PACE times as long as they took");
        assert!(hold.due(start + ms(500)), "a loop idle since: at once");

        hold.wrote(start, start + ms(20));
        assert_eq!(hold.deadline(), Some(start + ms(30)), "never more than the cap");

        let mut never = WriteHold::new(Duration::ZERO);
        never.wrote(start, start + ms(50));
        assert!(never.due(start + ms(50)), "0 never waits");
        assert_eq!(never.deadline(), None);
    }

    #[test]
    fn sweeps_often_enough_for_short_timers_and_rarely_for_long_ones() {
        let mut config = LoopConfig {
            ws: websocket_config(1024),
            max_out_buffer: 1 << 20,
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(60),
            write_delay: Duration::ZERO,
            write_bytes: 4096,
            handshake_timeout: Duration::from_secs(10),
            limits: TopicLimits { max_len: 8, max_per_connection: 2 },
            gatekeeper: Arc::new(Gatekeeper::open()),
        };
        assert_eq!(sweep_interval(&config), Duration::from_secs(1));
        config.ping_interval = Duration::from_millis(100);
        assert_eq!(sweep_interval(&config), Duration::from_millis(25));
        config.handshake_timeout = Duration::from_millis(40);
        assert_eq!(sweep_interval(&config), Duration::from_millis(10));
    }
}
