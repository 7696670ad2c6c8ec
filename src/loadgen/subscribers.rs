//! The subscribers: many WebSocket client connections on ONE event-loop thread (mio, non-blocking
//! sockets, WebSocket frames parsed in place), so that a thousand of them cost the machine less
//! than the system they measure. Each connection keeps its own tally (which messages came, how
//! many twice, how many behind one that had to follow them) and the loop keeps one latency
//! histogram.
//!
//! Two dialects share the machinery: push-manager's JSON frames, and NATS's text protocol carried
//! in WebSocket frames (`CONNECT`, `SUB`, `PING`/`PONG`, `MSG`), so that the same harness measures
//! both systems.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use parking_lot::Mutex;

use super::body::{self, Header};
use super::histogram::Histogram;

/// Which protocol the subscribers speak over their WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// A connect-node's: subscribe with a JSON command, deliveries as JSON text frames.
    PushManager,
    /// nats-server's WebSocket listener: NATS's text protocol inside WebSocket frames.
    Nats,
}

/// What the loop shares with whoever drives the run, while it runs.
#[derive(Default)]
pub(crate) struct Shared {
    /// Connections whose subscription the server confirmed.
    pub(crate) subscribed: AtomicUsize,
    /// Every delivery, duplicates included.
    pub(crate) deliveries: AtomicU64,
    /// Deliveries of a message the connection had not had yet.
    pub(crate) unique: AtomicU64,
    /// When the latest delivery came, in nanoseconds since the epoch.
    pub(crate) last_delivery_ns: AtomicU64,
    /// Connections the server closed, or that broke.
    pub(crate) closed: AtomicUsize,
    /// Why the first of them closed.
    pub(crate) first_close: Mutex<Option<String>>,
    stop: AtomicBool,
}

/// What one connection saw.
pub(crate) struct Tally {
    seen: Vec<u64>,
    pub(crate) unique: u64,
    pub(crate) duplicates: u64,
    pub(crate) out_of_order: u64,
    /// Frames that were not a benchmark message (bad body, unknown type).
    pub(crate) foreign: u64,
    /// The highest `acked` of any message received: messages below it must already be here.
    acked: u64,
}

impl Tally {
    fn new(messages: u64) -> Tally {
        Tally {
            seen: vec![0; messages.div_ceil(64) as usize],
            unique: 0,
            duplicates: 0,
            out_of_order: 0,
            foreign: 0,
            acked: 0,
        }
    }

    /// Whether message `seq` arrived.
    pub(crate) fn has(&self, seq: u64) -> bool {
        self.seen.get((seq / 64) as usize).is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }

    /// Notes `header`; true if it is the first time.
    fn note(&mut self, header: Header) -> bool {
        let Some(word) = self.seen.get_mut((header.seq / 64) as usize) else {
            self.foreign += 1;
            return false;
        };
        let bit = 1 << (header.seq % 64);
        if *word & bit != 0 {
            self.duplicates += 1;
            return false;
        }
        *word |= bit;
        self.unique += 1;
        if header.seq < self.acked {
            self.out_of_order += 1;
        }
        self.acked = self.acked.max(header.acked);
        true
    }
}

/// What the loop hands back when it stops.
pub(crate) struct Outcome {
    pub(crate) tallies: Vec<Tally>,
    pub(crate) latency: Histogram,
}

/// The running loop; [`Subscribers::stop`] ends it and returns what it saw.
pub(crate) struct Subscribers {
    pub(crate) shared: Arc<Shared>,
    thread: Option<JoinHandle<Outcome>>,
}

/// Where and how to connect.
pub(crate) struct Plan<'a> {
    /// WebSocket URLs (`ws://host:port/path?query`), one per subscriber.
    pub(crate) urls: Vec<String>,
    pub(crate) dialect: Dialect,
    pub(crate) topic: &'a str,
    pub(crate) messages: u64,
    pub(crate) connect_timeout: Duration,
    pub(crate) epoch: Instant,
}

impl Subscribers {
    /// Opens every connection (upgrade and subscription request, one after the other), then
    /// starts the loop. Fails on the first connection that cannot be opened, naming its URL.
    pub(crate) fn start(plan: Plan<'_>) -> Result<Subscribers, String> {
        let poll = Poll::new().map_err(|e| format!("creating the event loop: {e}"))?;
        let opening = opening(plan.dialect, plan.topic);
        let mut conns = Vec::with_capacity(plan.urls.len());
        for (i, url) in plan.urls.iter().enumerate() {
            let (stream, leftover) = open(url, &opening, plan.connect_timeout)?;
            stream.set_nonblocking(true).map_err(|e| format!("{}: {e}", shown(url)))?;
            let mut stream = mio::net::TcpStream::from_std(stream);
            poll.registry()
                .register(&mut stream, Token(i), Interest::READABLE)
                .map_err(|e| format!("registering {}: {e}", shown(url)))?;
            conns.push(Conn::new(stream, leftover, plan.messages));
        }
        let shared = Arc::new(Shared::default());
        let mut event_loop = Loop { poll, conns, dialect: plan.dialect, shared: shared.clone(), epoch: plan.epoch };
        let thread = std::thread::Builder::new()
            .name("bench-subscribers".into())
            .spawn(move || event_loop.run())
            .map_err(|e| format!("starting the subscriber thread: {e}"))?;
        Ok(Subscribers { shared, thread: Some(thread) })
    }

    /// Ends the loop and returns what every connection saw.
    pub(crate) fn stop(mut self) -> Outcome {
        self.shared.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("stop is called once");
        thread.join().expect("the subscriber loop does not panic")
    }
}

impl Drop for Subscribers {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The URL without its query, which may hold a token.
fn shown(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

/// What a new connection sends once upgraded: its subscription, and for NATS a PING whose PONG
/// says the subscription is in place (NATS answers in order).
fn opening(dialect: Dialect, topic: &str) -> Vec<u8> {
    let command = match dialect {
        Dialect::PushManager => {
            let topic = serde_json::to_string(topic).expect("a string serializes");
            format!("{{\"action\":\"subscribe\",\"topics\":[{topic}]}}")
        }
        Dialect::Nats => format!("CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB {topic} 1\r\nPING\r\n"),
    };
    frame(OP_TEXT, command.as_bytes())
}

/// Connects to `url`, upgrades, sends `opening`; returns the socket and whatever arrived after
/// the upgrade answer.
fn open(url: &str, opening: &[u8], timeout: Duration) -> Result<(TcpStream, Vec<u8>), String> {
    let name = shown(url);
    let rest = url.strip_prefix("ws://").ok_or_else(|| format!("{name} is not a ws:// URL"))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    let with_port = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("{name}: cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{name}: {authority} resolves to no address"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("cannot connect to {name}: {e}"))?;
    let _ = stream.set_nodelay(true);
    stream.set_read_timeout(Some(timeout)).map_err(|e| format!("{name}: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(|e| format!("{name}: sending the upgrade: {e}"))?;
    let mut answer = Vec::new();
    let end = loop {
        if let Some(i) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut buf = [0u8; 4096];
        match stream.read(&mut buf) {
            Ok(0) => return Err(format!("{name} closed the connection during the WebSocket upgrade")),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!("{name} did not answer the WebSocket upgrade within {timeout:?}"))
            }
            Err(e) => return Err(format!("{name}: reading the upgrade answer: {e}")),
        }
        if answer.len() > 64 * 1024 {
            return Err(format!("{name}: the upgrade answer has no end"));
        }
    };
    let status = String::from_utf8_lossy(answer.split(|&b| b == b'\r').next().unwrap_or_default()).to_string();
    if status.split_whitespace().nth(1) != Some("101") {
        let body = String::from_utf8_lossy(&answer[end..]).trim().to_string();
        return Err(format!(
            "{name} refused the WebSocket upgrade: {status}{}",
            if body.is_empty() { String::new() } else { format!(": {body}") }
        ));
    }
    stream.write_all(opening).map_err(|e| format!("{name}: subscribing: {e}"))?;
    Ok((stream, answer[end..].to_vec()))
}

const OP_CONTINUATION: u8 = 0;
const OP_TEXT: u8 = 1;
const OP_BINARY: u8 = 2;
const OP_CLOSE: u8 = 8;
const OP_PING: u8 = 9;
const OP_PONG: u8 = 10;

/// A whole client frame: final, masked (as RFC 6455 requires of clients).
fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x5a, 0xc3, 0x17, 0x8e];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Largest message taken from a server; anything bigger means we are not reading a WebSocket.
const MAX_MESSAGE_BYTES: u64 = 16 << 20;

struct Conn {
    stream: mio::net::TcpStream,
    /// Bytes of a frame not yet whole.
    pending: Vec<u8>,
    /// The fragments of a message not yet whole.
    fragments: Vec<u8>,
    /// NATS protocol bytes not yet parsed: its messages may span frames.
    nats: Vec<u8>,
    /// Bytes to send (pongs) that the socket did not take yet.
    out: Vec<u8>,
    subscribed: bool,
    open: bool,
    tally: Tally,
}

impl Conn {
    fn new(stream: mio::net::TcpStream, leftover: Vec<u8>, messages: u64) -> Conn {
        Conn {
            stream,
            pending: leftover,
            fragments: Vec::new(),
            nats: Vec::new(),
            out: Vec::new(),
            subscribed: false,
            open: true,
            tally: Tally::new(messages),
        }
    }
}

struct Loop {
    poll: Poll,
    conns: Vec<Conn>,
    dialect: Dialect,
    shared: Arc<Shared>,
    epoch: Instant,
}

/// What handling a message may leave for the loop's counters.
#[derive(Default)]
struct Counts {
    deliveries: u64,
    unique: u64,
    subscribed: usize,
}

impl Loop {
    fn run(&mut self) -> Outcome {
        let mut events = Events::with_capacity(1024);
        let mut scratch = vec![0u8; 256 * 1024];
        let mut latency = Histogram::default();
        // Bytes that came with the upgrade answer are handled before waiting for more.
        for i in 0..self.conns.len() {
            let mut counts = Counts::default();
            let pending = std::mem::take(&mut self.conns[i].pending);
            self.consume(i, &pending, &mut latency, &mut counts);
            self.publish(counts);
        }
        while !self.shared.stop.load(Ordering::Relaxed) {
            if let Err(e) = self.poll.poll(&mut events, Some(Duration::from_millis(20))) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                self.close_all(&format!("event loop: {e}"));
                break;
            }
            let mut counts = Counts::default();
            for event in events.iter() {
                self.read(event.token().0, &mut scratch, &mut latency, &mut counts);
            }
            self.publish(counts);
        }
        let tallies = self.conns.drain(..).map(|c| c.tally).collect();
        Outcome { tallies, latency }
    }

    fn publish(&self, counts: Counts) {
        if counts.deliveries > 0 {
            let now = self.epoch.elapsed().as_nanos() as u64;
            self.shared.last_delivery_ns.store(now, Ordering::Relaxed);
            self.shared.deliveries.fetch_add(counts.deliveries, Ordering::Relaxed);
            self.shared.unique.fetch_add(counts.unique, Ordering::Relaxed);
        }
        if counts.subscribed > 0 {
            self.shared.subscribed.fetch_add(counts.subscribed, Ordering::Relaxed);
        }
    }

    fn read(&mut self, i: usize, scratch: &mut [u8], latency: &mut Histogram, counts: &mut Counts) {
        loop {
            let conn = &mut self.conns[i];
            if !conn.open {
                return;
            }
            match conn.stream.read(scratch) {
                Ok(0) => return self.close(i, "the server closed the connection"),
                Ok(n) => {
                    if conn.pending.is_empty() {
                        self.consume(i, &scratch[..n], latency, counts);
                    } else {
                        let mut pending = std::mem::take(&mut conn.pending);
                        pending.extend_from_slice(&scratch[..n]);
                        self.consume(i, &pending, latency, counts);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.close(i, &format!("reading: {e}")),
            }
        }
    }

    /// Handles every whole frame in `bytes`; keeps the rest for the next read.
    fn consume(&mut self, i: usize, bytes: &[u8], latency: &mut Histogram, counts: &mut Counts) {
        let mut at = 0;
        while let Some((fin, opcode, start, end)) = parse_frame(&bytes[at..]) {
            if (end - start) as u64 > MAX_MESSAGE_BYTES {
                return self.close(i, "a frame over 16 MiB: not a WebSocket server we can read");
            }
            let payload = &bytes[at + start..at + end];
            at += end;
            match opcode {
                OP_PING => self.send(i, &frame(OP_PONG, payload)),
                OP_PONG => {}
                OP_CLOSE => {
                    let code = payload.get(..2).map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
                    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).to_string();
                    return self.close(i, &format!("the server closed the connection: {code} {reason}"));
                }
                OP_TEXT | OP_BINARY if fin => self.message(i, payload, latency, counts),
                OP_TEXT | OP_BINARY | OP_CONTINUATION => {
                    let conn = &mut self.conns[i];
                    conn.fragments.extend_from_slice(payload);
                    if fin {
                        let whole = std::mem::take(&mut conn.fragments);
                        self.message(i, &whole, latency, counts);
                    }
                }
                other => return self.close(i, &format!("a frame with unknown opcode {other}")),
            }
            if !self.conns[i].open {
                return;
            }
        }
        let conn = &mut self.conns[i];
        conn.pending.clear();
        conn.pending.extend_from_slice(&bytes[at..]);
    }

    fn message(&mut self, i: usize, payload: &[u8], latency: &mut Histogram, counts: &mut Counts) {
        match self.dialect {
            Dialect::PushManager => self.push_manager_message(i, payload, latency, counts),
            Dialect::Nats => {
                let mut nats = std::mem::take(&mut self.conns[i].nats);
                nats.extend_from_slice(payload);
                let used = self.nats_protocol(i, &nats, latency, counts);
                nats.drain(..used);
                self.conns[i].nats = nats;
            }
        }
    }

    fn push_manager_message(&mut self, i: usize, payload: &[u8], latency: &mut Histogram, counts: &mut Counts) {
        const MESSAGE: &[u8] = b"{\"type\":\"message\"";
        const BODY: &[u8] = b"\"body\":\"";
        if payload.starts_with(MESSAGE) {
            let body = payload.windows(BODY.len()).position(|w| w == BODY).map(|p| &payload[p + BODY.len()..]);
            return self.deliver(i, body.unwrap_or_default(), latency, counts);
        }
        if payload.starts_with(b"{\"type\":\"subscribed\"") {
            self.subscribed(i, counts);
        } else if payload.starts_with(b"{\"type\":\"error\"") {
            let text = String::from_utf8_lossy(payload).to_string();
            self.close(i, &format!("the node refused the subscription: {text}"));
        } else {
            self.conns[i].tally.foreign += 1;
        }
    }

    /// Handles the whole NATS protocol lines in `bytes`; returns how many bytes it used.
    fn nats_protocol(&mut self, i: usize, bytes: &[u8], latency: &mut Histogram, counts: &mut Counts) -> usize {
        let mut at = 0;
        while let Some(eol) = bytes[at..].windows(2).position(|w| w == b"\r\n") {
            let line = &bytes[at..at + eol];
            let next = at + eol + 2;
            if line.starts_with(b"MSG ") {
                // MSG <subject> <sid> [reply-to] <#bytes>
                let size = line.rsplit(|&b| b == b' ').next().and_then(|s| std::str::from_utf8(s).ok());
                let Some(size) = size.and_then(|s| s.parse::<usize>().ok()) else {
                    self.close(i, &format!("a MSG line without a size: {}", String::from_utf8_lossy(line)));
                    return bytes.len();
                };
                if bytes.len() < next + size + 2 {
                    return at;
                }
                self.deliver(i, &bytes[next..next + size], latency, counts);
                at = next + size + 2;
                continue;
            }
            if line == b"PING" {
                self.send(i, &frame(OP_TEXT, b"PONG\r\n"));
            } else if line == b"PONG" {
                self.subscribed(i, counts);
            } else if line.starts_with(b"-ERR") {
                self.close(i, &format!("nats-server: {}", String::from_utf8_lossy(line)));
                return bytes.len();
            }
            at = next;
        }
        at
    }

    fn subscribed(&mut self, i: usize, counts: &mut Counts) {
        let conn = &mut self.conns[i];
        if !conn.subscribed {
            conn.subscribed = true;
            counts.subscribed += 1;
        }
    }

    fn deliver(&mut self, i: usize, body: &[u8], latency: &mut Histogram, counts: &mut Counts) {
        let tally = &mut self.conns[i].tally;
        let Some(header) = body::decode(body) else {
            tally.foreign += 1;
            return;
        };
        counts.deliveries += 1;
        if tally.note(header) {
            counts.unique += 1;
            let now = self.epoch.elapsed().as_nanos() as u64;
            latency.record(now.saturating_sub(header.sent_ns));
        }
    }

    /// Writes `bytes` (a pong: small, so the socket takes it unless it is wedged).
    fn send(&mut self, i: usize, bytes: &[u8]) {
        let conn = &mut self.conns[i];
        conn.out.extend_from_slice(bytes);
        match conn.stream.write(&conn.out) {
            Ok(n) => {
                conn.out.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => self.close(i, &format!("writing: {e}")),
        }
    }

    fn close(&mut self, i: usize, why: &str) {
        let conn = &mut self.conns[i];
        if !conn.open {
            return;
        }
        conn.open = false;
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.shared.closed.fetch_add(1, Ordering::Relaxed);
        self.shared.first_close.lock().get_or_insert_with(|| why.to_string());
    }

    fn close_all(&mut self, why: &str) {
        for i in 0..self.conns.len() {
            self.close(i, why);
        }
    }
}

/// The first whole frame at the start of `bytes`: (final, opcode, payload start, payload end),
/// or `None` if it is not all there yet. Server frames are not masked.
fn parse_frame(bytes: &[u8]) -> Option<(bool, u8, usize, usize)> {
    let (&b0, &b1) = (bytes.first()?, bytes.get(1)?);
    let (len, mut start) = match b1 & 0x7f {
        126 => (u64::from(u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?)), 4),
        127 => (u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    if b1 & 0x80 != 0 {
        start += 4;
    }
    let len = len.min(MAX_MESSAGE_BYTES + 1) as usize;
    let end = start + len;
    if len as u64 > MAX_MESSAGE_BYTES {
        return Some((b0 & 0x80 != 0, b0 & 0x0f, start, end));
    }
    (bytes.len() >= end).then_some((b0 & 0x80 != 0, b0 & 0x0f, start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_whole_or_not_at_all() {
        let f = [0x81, 3, b'a', b'b', b'c', 0x82];
        assert_eq!(parse_frame(&f), Some((true, OP_TEXT, 2, 5)));
        assert_eq!(parse_frame(&f[..4]), None);
        let mut long = vec![0x01, 126, 0x01, 0x00];
        long.extend(vec![b'x'; 256]);
        assert_eq!(parse_frame(&long), Some((false, OP_TEXT, 4, 260)));
    }

    #[test]
    fn a_tally_counts_duplicates_and_order() {
        let mut t = Tally::new(10);
        let h = |seq, acked| Header { seq, acked, sent_ns: 0 };
        assert!(t.note(h(1, 0)));
        assert!(t.note(h(0, 0)), "0 was not acknowledged before 1 was sent: no order between them");
        assert!(t.note(h(3, 3)));
        assert!(t.note(h(2, 2)), "2 came after 3, which was sent once 2 was acknowledged");
        assert!(!t.note(h(2, 2)));
        assert_eq!((t.unique, t.duplicates, t.out_of_order), (4, 1, 1));
        assert!(!t.note(h(99, 0)));
        assert_eq!(t.foreign, 1);
    }
}
