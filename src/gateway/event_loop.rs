//! One `ws-loop-<n>` thread: a mio poll over the non-blocking sockets it owns, driving each
//! through the WebSocket handshake, client commands, deliveries, pings and the close handshake.
//!
//! A thread per connection would cost a stack each; here a connection is a slab entry, a small
//! tungstenite read buffer and a queue of `Arc`'d frames shared with every other connection that
//! got the same broadcast, so 10,000 idle connections fit in a few KiB each. Sockets are
//! registered edge-triggered for reading and writing once: a connection reads until `WouldBlock`
//! (or its `READ_BUDGET` for this turn, then it waits its next turn on `unread`, so one client
//! sending without pause cannot hold up the others) and writes only while the socket takes
//! bytes; a connection whose unsent bytes would pass `max_out_buffer` is closed rather than
//! allowed to stall the loop or grow without bound.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use log::{debug, error, info, warn};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::handshake::server::{Callback, ErrorResponse, Request, Response, ServerHandshake};
use tungstenite::handshake::MidHandshake;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Bytes, HandshakeError, Message, Utf8Bytes, WebSocket};

use super::hub::{EncodedBroadcast, LoopMsg, TopicCounts};
use super::protocol::{self, AckKind, Command, Reject, TopicLimits};
use super::stats::Stats;

/// The only path that upgrades.
pub(crate) const WS_PATH: &str = "/ws";
/// The token every gateway poll (the loops' and the accept thread's) gives its waker: slab keys
/// never reach it.
pub(crate) const WAKER: Token = Token(usize::MAX);
/// How long a connection we are closing may take to take its close frame and hang up.
const CLOSE_LINGER: Duration = Duration::from_secs(5);
/// How long a stopping loop waits for its connections to finish their close handshakes.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Bytes of queued frames handed to tungstenite before each flush: bounds both the syscalls per
/// burst and the write buffer tungstenite keeps (it never shrinks) per connection.
const WRITE_BATCH: usize = 4096;
/// Deliveries taken from the inbox between two write passes over the connections.
const PUBLISH_BATCH: usize = 64;
/// Frames (or, from a closing peer, 4 KiB reads) taken from one connection in one turn of the
/// loop; one with more waits for the next turn, after the other connections and the inbox.
const READ_BUDGET: usize = 64;

/// What an event loop needs from the gateway config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoopConfig {
    pub(crate) ws: WebSocketConfig,
    pub(crate) max_out_buffer: usize,
    pub(crate) ping_interval: Duration,
    pub(crate) pong_timeout: Duration,
    pub(crate) limits: TopicLimits,
}

/// Everything a loop thread is started with; the loop itself is built on its own thread
/// (connections hold `Rc`s and never leave it).
pub(crate) struct LoopParts {
    pub(crate) poll: Poll,
    /// Registered under [`WAKER`] with `poll`, and kept by the loop for as long as it polls: if
    /// the stopping side dropped the last handle right after waking it, closing the waker would
    /// take its event out of the poll unseen.
    pub(crate) waker: Arc<Waker>,
    pub(crate) inbox: Receiver<LoopMsg>,
    pub(crate) wake_pending: Arc<AtomicBool>,
    pub(crate) counts: Arc<TopicCounts>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) config: LoopConfig,
}

/// The WebSocket config every connection gets: small eager read buffer, explicit flushing.
pub(crate) fn websocket_config(max_frame_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        // Allocated per connection up front; client commands are small.
        .read_buffer_size(2048)
        // We flush after each batch ourselves; this only matters for a single huge frame.
        .write_buffer_size(2 * WRITE_BATCH)
        .max_message_size(Some(max_frame_bytes))
        .max_frame_size(Some(max_frame_bytes))
}

/// Runs a loop until `stop` disconnects and its connections are closed.
pub(crate) fn run(parts: LoopParts, stop: Receiver<()>) {
    let mut event_loop = EventLoop {
        poll: parts.poll,
        _waker: parts.waker,
        inbox: parts.inbox,
        wake_pending: parts.wake_pending,
        conns: Slab::new(),
        index: HashMap::new(),
        counts: parts.counts,
        stats: parts.stats,
        config: parts.config,
        dirty: Vec::new(),
        unread: Vec::new(),
    };
    event_loop.run(&stop);
}

type Handshake = MidHandshake<ServerHandshake<TcpStream, Upgrade>>;

struct EventLoop {
    poll: Poll,
    _waker: Arc<Waker>,
    inbox: Receiver<LoopMsg>,
    wake_pending: Arc<AtomicBool>,
    conns: Slab<Conn>,
    /// topic -> this loop's connections subscribed to it.
    index: HashMap<Box<str>, HashSet<usize>>,
    counts: Arc<TopicCounts>,
    stats: Arc<Stats>,
    config: LoopConfig,
    /// Connections with something to write; each is listed once (`Open::dirty`).
    dirty: Vec<usize>,
    /// Connections that used up their `READ_BUDGET` with more to read. Edge-triggered polling
    /// will not report them again until new bytes arrive, so the loop must remember them.
    unread: Vec<usize>,
}

enum Conn {
    Handshaking(Box<Handshaking>),
    Open(Box<Open>),
}

struct Handshaking {
    mid: Option<Handshake>,
    /// A duplicate of the socket, to answer a plain HTTP request: tungstenite rejects those
    /// before calling us and drops its stream.
    answer: std::net::TcpStream,
    /// Filled by [`Upgrade`] with the topics of the query string.
    topics: Rc<RefCell<Vec<String>>>,
    deadline: Instant,
}

struct Open {
    ws: WebSocket<TcpStream>,
    topics: Vec<Box<str>>,
    /// Frames not yet handed to tungstenite.
    queue: VecDeque<Utf8Bytes>,
    /// Bytes in `queue`.
    queued: usize,
    /// Bytes handed to tungstenite since its write buffer was last seen empty.
    in_flight: usize,
    /// The socket refused bytes; wait for a writable event.
    blocked: bool,
    /// Listed in `EventLoop::dirty`.
    dirty: bool,
    last_seen: Instant,
    last_ping: Instant,
    phase: Phase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Subscribed topics count, deliveries flow.
    Active,
    /// A close frame is queued (ours or the reply to the peer's); flushing it.
    Closing { deadline: Instant },
    /// Our close frame is out and our side shut; reading until the peer hangs up.
    Draining { deadline: Instant },
}

/// Whether the frames still queued on a connection go out before its close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueuedFrames {
    /// The node is stopping: what the client was promised still reaches it.
    Send,
    /// The client misbehaved or cannot keep up: it gets the close frame only.
    Discard,
}

/// The handshake callback: checks the path and reads `?topic=` parameters.
struct Upgrade {
    limits: TopicLimits,
    topics: Rc<RefCell<Vec<String>>>,
}

impl Callback for Upgrade {
    fn on_request(self, request: &Request, response: Response) -> Result<Response, ErrorResponse> {
        if request.uri().path() != WS_PATH {
            return Err(http_error(404, &format!("not found: the WebSocket endpoint is {WS_PATH}\n")));
        }
        let query = request.uri().query().unwrap_or("");
        let topics = protocol::topics_from_query(query, self.limits)
            .map_err(|e| http_error(400, &format!("bad topic in query string: {e}\n")))?;
        *self.topics.borrow_mut() = topics;
        Ok(response)
    }
}

fn http_error(status: u16, body: &str) -> ErrorResponse {
    tungstenite::http::Response::builder()
        .status(status)
        .header("Content-Type", "text/plain; charset=utf-8")
        .header("Content-Length", body.len())
        .header("Connection", "close")
        .body(Some(body.to_string()))
        .expect("a static status and headers make a valid response")
}

/// Writes a whole HTTP error response on a socket tungstenite gave up on (best effort: the
/// socket buffer of a fresh connection takes a short response at once).
fn answer_http(mut socket: &std::net::TcpStream, status: &str, body: &str) {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Upgrade: websocket\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = socket.write_all(response.as_bytes()) {
        debug!("could not answer a rejected request: {e}");
    }
    let _ = socket.shutdown(Shutdown::Write);
}

fn would_block(e: &WsError) -> bool {
    matches!(e, WsError::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}

impl EventLoop {
    fn run(&mut self, stop: &Receiver<()>) {
        let name = std::thread::current().name().unwrap_or("ws-loop").to_string();
        let tick = sweep_interval(&self.config);
        let mut events = Events::with_capacity(1024);
        let mut next_sweep = Instant::now() + tick;
        let mut stop_deadline: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let mut wait = next_sweep.saturating_duration_since(now);
            if let Some(deadline) = stop_deadline {
                wait = wait.min(deadline.saturating_duration_since(now));
            }
            if !self.unread.is_empty() {
                wait = Duration::ZERO;
            }
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!("{name}: poll failed, dropping its connections: {e}");
                break;
            }
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
            if stop_deadline.is_none() && matches!(stop.try_recv(), Err(TryRecvError::Disconnected)) {
                info!("{name}: closing {} connections", self.conns.len());
                stop_deadline = Some(Instant::now() + SHUTDOWN_GRACE);
                self.close_all();
            }
            self.flush_dirty();
            let now = Instant::now();
            if now >= next_sweep {
                self.sweep(now);
                next_sweep = now + tick;
            }
            if let Some(deadline) = stop_deadline {
                if self.conns.is_empty() || now >= deadline {
                    break;
                }
            }
        }
        let left = self.conns.len();
        for key in self.conns.iter().map(|(key, _)| key).collect::<Vec<_>>() {
            self.drop_conn(key);
        }
        debug!("{name}: stopped ({left} connections dropped without finishing their close)");
    }

    fn drain_inbox(&mut self) {
        // Cleared before draining: a message sent after this point wakes us again.
        self.wake_pending.store(false, Ordering::SeqCst);
        let mut published = 0;
        loop {
            match self.inbox.try_recv() {
                Ok(LoopMsg::Accepted(stream)) => self.adopt(stream),
                Ok(LoopMsg::Publish(broadcast)) => {
                    self.deliver(&broadcast);
                    published += 1;
                    // Write as we go, so a long backlog is not judged against one buffer.
                    if published % PUBLISH_BATCH == 0 {
                        self.flush_dirty();
                    }
                }
                Err(_) => return,
            }
        }
    }

    fn on_event(&mut self, key: usize, readable: bool, writable: bool) {
        match self.conns.get_mut(key) {
            None => {}
            Some(Conn::Handshaking(_)) => self.continue_handshake(key),
            Some(Conn::Open(open)) => {
                if writable {
                    open.blocked = false;
                    self.mark_dirty(key);
                }
                if readable {
                    self.read(key);
                }
            }
        }
    }

    // ---- handshake ------------------------------------------------------------------------

    fn adopt(&mut self, mut stream: TcpStream) {
        let answer = match stream.as_fd().try_clone_to_owned() {
            Ok(answer) => std::net::TcpStream::from(answer),
            Err(e) => {
                warn!("dropping a new connection: cannot duplicate its socket: {e}");
                return;
            }
        };
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(&mut stream, Token(key), Interest::READABLE | Interest::WRITABLE)
        {
            warn!("dropping a new connection: cannot register it: {e}");
            return;
        }
        let topics = Rc::new(RefCell::new(Vec::new()));
        let callback = Upgrade { limits: self.config.limits, topics: topics.clone() };
        let mid = ServerHandshake::start(stream, callback, Some(self.config.ws));
        entry.insert(Conn::Handshaking(Box::new(Handshaking {
            mid: Some(mid),
            answer,
            topics,
            deadline: Instant::now() + self.config.pong_timeout,
        })));
        self.continue_handshake(key);
    }

    fn continue_handshake(&mut self, key: usize) {
        let Some(Conn::Handshaking(hs)) = self.conns.get_mut(key) else { return };
        let Some(mid) = hs.mid.take() else { return };
        match mid.handshake() {
            Ok(ws) => self.open(key, ws),
            Err(HandshakeError::Interrupted(mid)) => hs.mid = Some(mid),
            Err(HandshakeError::Failure(e)) => self.reject_handshake(key, e),
        }
    }

    fn reject_handshake(&mut self, key: usize, e: WsError) {
        let Conn::Handshaking(hs) = self.conns.remove(key) else { unreachable!("only handshakes are rejected") };
        let answered = match &e {
            // Our callback refused it; tungstenite has written our response.
            WsError::Http(response) => {
                debug!("handshake refused with HTTP {}", response.status());
                true
            }
            WsError::Protocol(ProtocolError::HandshakeIncomplete) | WsError::Io(_) => {
                debug!("client left during the handshake: {e}");
                false
            }
            WsError::Protocol(
                ProtocolError::MissingConnectionUpgradeHeader
                | ProtocolError::MissingUpgradeWebSocketHeader
                | ProtocolError::MissingSecWebSocketVersionHeader
                | ProtocolError::MissingSecWebSocketKey,
            ) => {
                debug!("plain HTTP request refused: {e}");
                let body =
                    format!("this endpoint only speaks WebSocket: send GET {WS_PATH} with a WebSocket upgrade ({e})\n");
                answer_http(&hs.answer, "426 Upgrade Required", &body);
                true
            }
            WsError::Protocol(ProtocolError::WrongHttpMethod) => {
                answer_http(&hs.answer, "405 Method Not Allowed", "only GET with a WebSocket upgrade is served\n");
                true
            }
            _ => {
                debug!("malformed handshake: {e}");
                answer_http(&hs.answer, "400 Bad Request", &format!("malformed WebSocket handshake: {e}\n"));
                true
            }
        };
        if answered {
            Stats::inc(&self.stats.http_rejected);
        }
    }

    fn open(&mut self, key: usize, ws: WebSocket<TcpStream>) {
        let Some(Conn::Handshaking(hs)) = self.conns.get_mut(key) else { return };
        let topics = std::mem::take(&mut *hs.topics.borrow_mut());
        let now = Instant::now();
        self.conns[key] = Conn::Open(Box::new(Open {
            ws,
            topics: Vec::new(),
            queue: VecDeque::new(),
            queued: 0,
            in_flight: 0,
            blocked: false,
            dirty: false,
            last_seen: now,
            last_ping: now,
            phase: Phase::Active,
        }));
        Stats::inc(&self.stats.connections_open);
        for topic in topics {
            self.subscribe_one(key, topic.into());
        }
        // Frames may have arrived while the response went out; their edge is gone.
        self.read(key);
    }

    // ---- reading ---------------------------------------------------------------------------

    /// Reads until `WouldBlock`, or lists the connection in `unread` after `READ_BUDGET` frames.
    fn read(&mut self, key: usize) {
        let mut budget = READ_BUDGET;
        loop {
            let Some(Conn::Open(open)) = self.conns.get_mut(key) else { return };
            match open.phase {
                Phase::Active => {}
                Phase::Closing { .. } => return,
                Phase::Draining { .. } => return self.drain(key),
            }
            if budget == 0 {
                self.unread.push(key);
                break;
            }
            budget -= 1;
            match open.ws.read() {
                Ok(message) => {
                    open.last_seen = Instant::now();
                    self.on_message(key, message);
                }
                Err(e) if would_block(&e) => break,
                Err(e) => return self.on_read_error(key, e),
            }
        }
        // Replies to pings are queued inside tungstenite: let the write path flush them.
        self.mark_dirty(key);
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
                debug!("client closed: {frame:?}");
                self.leave_active(key, Phase::Closing { deadline: Instant::now() + CLOSE_LINGER });
                self.mark_dirty(key);
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }

    fn on_read_error(&mut self, key: usize, e: WsError) {
        let reject = match e {
            WsError::Capacity(e) => Reject::new(protocol::CLOSE_TOO_BIG, format!("message too big: {e}")),
            WsError::Utf8(_) => Reject::new(protocol::CLOSE_INVALID_DATA, "text frame is not valid UTF-8"),
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                debug!("client hung up without a close frame");
                return self.drop_conn(key);
            }
            WsError::Protocol(p) => Reject::new(protocol::CLOSE_PROTOCOL, format!("protocol error: {p}")),
            other => {
                debug!("connection lost: {other}");
                return self.drop_conn(key);
            }
        };
        self.close_bad_input(key, reject);
    }

    /// Reads and discards whatever a closing peer still sends, until it hangs up.
    fn drain(&mut self, key: usize) {
        let Some(Conn::Open(open)) = self.conns.get_mut(key) else { return };
        let mut scratch = [0u8; 4096];
        for _ in 0..READ_BUDGET {
            match open.ws.get_mut().read(&mut scratch) {
                Ok(0) => return self.drop_conn(key),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.drop_conn(key),
            }
        }
        self.unread.push(key);
    }

    // ---- subscriptions ---------------------------------------------------------------------

    fn on_command(&mut self, key: usize, command: Command) {
        let Some(Conn::Open(open)) = self.conns.get_mut(key) else { return };
        let kind = match command {
            Command::Subscribe(topics) => {
                let mut new: Vec<String> = Vec::new();
                for topic in topics {
                    if !open.topics.iter().any(|t| **t == *topic) && !new.contains(&topic) {
                        new.push(topic);
                    }
                }
                let total = open.topics.len() + new.len();
                if total > self.config.limits.max_per_connection {
                    return self.close_bad_input(key, protocol::too_many_topics(total, self.config.limits));
                }
                for topic in new {
                    self.subscribe_one(key, topic.into());
                }
                AckKind::Subscribed
            }
            Command::Unsubscribe(topics) => {
                for topic in topics {
                    self.unsubscribe_one(key, &topic);
                }
                AckKind::Unsubscribed
            }
        };
        let Some(Conn::Open(open)) = self.conns.get(key) else { return };
        let ack = protocol::encode_ack(kind, &open.topics);
        self.enqueue(key, &Utf8Bytes::from(ack));
    }

    fn subscribe_one(&mut self, key: usize, topic: Box<str>) {
        let Some(Conn::Open(open)) = self.conns.get_mut(key) else { return };
        self.index.entry(topic.clone()).or_default().insert(key);
        self.counts.add(&topic);
        open.topics.push(topic);
    }

    fn unsubscribe_one(&mut self, key: usize, topic: &str) {
        let Some(Conn::Open(open)) = self.conns.get_mut(key) else { return };
        let Some(pos) = open.topics.iter().position(|t| **t == *topic) else { return };
        open.topics.swap_remove(pos);
        self.counts.remove(topic);
        if let Some(keys) = self.index.get_mut(topic) {
            keys.remove(&key);
            if keys.is_empty() {
                self.index.remove(topic);
            }
        }
    }

    /// Takes an active connection out of the index and the counts, into `phase`.
    fn leave_active(&mut self, key: usize, phase: Phase) {
        let Some(Conn::Open(open)) = self.conns.get_mut(key) else { return };
        if open.phase != Phase::Active {
            return;
        }
        open.phase = phase;
        let topics = std::mem::take(&mut open.topics);
        for topic in topics.iter() {
            self.counts.remove(topic);
            if let Some(keys) = self.index.get_mut(topic) {
                keys.remove(&key);
                if keys.is_empty() {
                    self.index.remove(topic);
                }
            }
        }
        Stats::dec(&self.stats.connections_open);
    }

    // ---- writing ---------------------------------------------------------------------------

    fn deliver(&mut self, broadcast: &EncodedBroadcast) {
        let keys: Vec<usize> = if broadcast.topic.is_empty() {
            self.conns.iter().map(|(key, _)| key).collect()
        } else {
            match self.index.get(&broadcast.topic) {
                Some(keys) => keys.iter().copied().collect(),
                None => return,
            }
        };
        for key in keys {
            self.enqueue(key, &broadcast.frame);
        }
    }

    /// Queues a frame on an active connection, or closes it if its unsent bytes would pass
    /// `max_out_buffer`.
    fn enqueue(&mut self, key: usize, frame: &Utf8Bytes) {
        let Some(Conn::Open(open)) = self.conns.get_mut(key) else { return };
        if open.phase != Phase::Active {
            return;
        }
        if open.queued + open.in_flight + frame.len() > self.config.max_out_buffer {
            debug!("closing a slow consumer ({} bytes unsent)", open.queued + open.in_flight);
            Stats::inc(&self.stats.closed_slow);
            return self.begin_close(key, protocol::CLOSE_SLOW, protocol::REASON_SLOW, QueuedFrames::Discard);
        }
        open.queue.push_back(frame.clone());
        open.queued += frame.len();
        if open.queued >= self.config.max_out_buffer / 2 {
            // A burst is piling up: let the socket take what it can before judging the client.
            self.pump(key);
        }
        self.mark_dirty(key);
    }

    fn mark_dirty(&mut self, key: usize) {
        if let Some(Conn::Open(open)) = self.conns.get_mut(key) {
            if !open.dirty {
                open.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    fn flush_dirty(&mut self) {
        while let Some(key) = self.dirty.pop() {
            let Some(Conn::Open(open)) = self.conns.get_mut(key) else { continue };
            open.dirty = false;
            match open.phase {
                Phase::Active => self.pump(key),
                Phase::Closing { .. } => self.drive_close(key),
                Phase::Draining { .. } => self.drain(key),
            }
        }
    }

    /// Moves queued frames into tungstenite and flushes, batch by batch, while the socket
    /// takes them.
    fn pump(&mut self, key: usize) {
        let Some(Conn::Open(open)) = self.conns.get_mut(key) else { return };
        while !open.blocked {
            let mut batch = 0;
            while batch < WRITE_BATCH {
                let Some(frame) = open.queue.pop_front() else { break };
                let len = frame.len();
                batch += len;
                open.queued -= len;
                open.in_flight += len;
                Stats::inc(&self.stats.frames_sent);
                match open.ws.write(Message::Text(frame)) {
                    Ok(()) => {}
                    // The frame is buffered; the socket is full.
                    Err(e) if would_block(&e) => {
                        open.blocked = true;
                        break;
                    }
                    Err(e) => {
                        debug!("write failed: {e}");
                        return self.drop_conn(key);
                    }
                }
            }
            if open.blocked {
                break;
            }
            match open.ws.flush() {
                Ok(()) => open.in_flight = 0,
                Err(e) if would_block(&e) => open.blocked = true,
                Err(e) => {
                    debug!("flush failed: {e}");
                    return self.drop_conn(key);
                }
            }
            if open.queue.is_empty() {
                break;
            }
        }
    }

    // ---- closing ---------------------------------------------------------------------------

    fn close_bad_input(&mut self, key: usize, reject: Reject) {
        debug!("closing a connection for bad input: {} {}", reject.code, reject.reason);
        Stats::inc(&self.stats.closed_bad_input);
        self.begin_close(key, reject.code, &reject.reason, QueuedFrames::Discard);
    }

    /// Sends a close frame after what tungstenite already holds (and the queued frames, if
    /// `queued` says so), then waits for it to go out.
    fn begin_close(&mut self, key: usize, code: u16, reason: &str, queued: QueuedFrames) {
        self.leave_active(key, Phase::Closing { deadline: Instant::now() + CLOSE_LINGER });
        let Some(Conn::Open(open)) = self.conns.get_mut(key) else { return };
        let queue = std::mem::take(&mut open.queue);
        open.queued = 0;
        if queued == QueuedFrames::Send {
            for frame in queue {
                match open.ws.write(Message::Text(frame)) {
                    Ok(()) => Stats::inc(&self.stats.frames_sent),
                    Err(e) if would_block(&e) => Stats::inc(&self.stats.frames_sent),
                    Err(_) => break,
                }
            }
        }
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
        // Queues the frame whatever the socket does; `drive_close` reports how it went.
        let _ = open.ws.close(Some(frame));
        self.drive_close(key);
    }

    fn drive_close(&mut self, key: usize) {
        let Some(Conn::Open(open)) = self.conns.get_mut(key) else { return };
        match open.ws.flush() {
            Ok(()) => {
                // Our close frame is out: say we are done writing, then wait for the peer.
                let _ = open.ws.get_ref().shutdown(Shutdown::Write);
                open.phase = Phase::Draining { deadline: Instant::now() + CLOSE_LINGER };
                self.drain(key);
            }
            Err(e) if would_block(&e) => {}
            // ConnectionClosed: the peer closed first and our reply is out.
            Err(_) => self.drop_conn(key),
        }
    }

    fn close_all(&mut self) {
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            match &self.conns[key] {
                Conn::Handshaking(_) => self.drop_conn(key),
                Conn::Open(open) if open.phase == Phase::Active => {
                    self.begin_close(key, protocol::CLOSE_SHUTDOWN, protocol::REASON_SHUTDOWN, QueuedFrames::Send)
                }
                Conn::Open(_) => {}
            }
        }
    }

    fn drop_conn(&mut self, key: usize) {
        if !self.conns.contains(key) {
            return;
        }
        self.leave_active(key, Phase::Draining { deadline: Instant::now() });
        // Dropping the socket closes it, which also removes it from the poll.
        self.conns.remove(key);
    }

    // ---- timers ----------------------------------------------------------------------------

    /// Pings connections due for one, drops those silent for `pong_timeout` and those whose
    /// handshake or close took too long.
    fn sweep(&mut self, now: Instant) {
        let mut silent = Vec::new();
        let mut expired = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            let open = match conn {
                Conn::Handshaking(hs) => {
                    if now >= hs.deadline {
                        expired.push(key);
                    }
                    continue;
                }
                Conn::Open(open) => open,
            };
            match open.phase {
                Phase::Closing { deadline } | Phase::Draining { deadline } => {
                    if now >= deadline {
                        expired.push(key);
                    }
                }
                Phase::Active if now.duration_since(open.last_seen) >= self.config.pong_timeout => silent.push(key),
                Phase::Active if now.duration_since(open.last_ping) >= self.config.ping_interval => {
                    open.last_ping = now;
                    match open.ws.write(Message::Ping(Bytes::new())) {
                        Ok(()) => {}
                        Err(e) if would_block(&e) => open.blocked = true,
                        Err(_) => expired.push(key),
                    }
                    if !open.dirty {
                        open.dirty = true;
                        self.dirty.push(key);
                    }
                }
                Phase::Active => {}
            }
        }
        for key in silent {
            debug!("dropping a connection silent for {:?}", self.config.pong_timeout);
            Stats::inc(&self.stats.closed_timeout);
            self.drop_conn(key);
        }
        for key in expired {
            self.drop_conn(key);
        }
        self.flush_dirty();
    }
}

/// How often a loop looks at its timers: often enough to honour the shortest of them.
fn sweep_interval(config: &LoopConfig) -> Duration {
    let shortest = config.ping_interval.min(config.pong_timeout);
    (shortest / 4).clamp(Duration::from_millis(5), Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_often_enough_for_short_timers_and_rarely_for_long_ones() {
        let mut config = LoopConfig {
            ws: websocket_config(1024),
            max_out_buffer: 1 << 20,
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(60),
            limits: TopicLimits { max_len: 8, max_per_connection: 2 },
        };
        assert_eq!(sweep_interval(&config), Duration::from_secs(1));
        config.ping_interval = Duration::from_millis(100);
        assert_eq!(sweep_interval(&config), Duration::from_millis(25));
    }

    #[test]
    fn http_errors_carry_their_body_length() {
        let response = http_error(404, "nope\n");
        assert_eq!(response.status(), 404);
        assert_eq!(response.headers()["Content-Length"], "5");
        assert_eq!(response.body().as_deref(), Some("nope\n"));
    }
}
