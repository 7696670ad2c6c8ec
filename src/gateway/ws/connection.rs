//! One WebSocket connection past its handshake: the socket, the frames waiting to be written to
//! it and where it is in its life (active, closing, draining).
//!
//! The event loop owns the lists a connection can be on (`dirty`, `unread`) and the subscription
//! index; a connection owns its socket and its counters. So each method here does the
//! connection's own I/O and bookkeeping and returns a [`Next`] saying what the loop must do
//! about it, instead of the loop reaching into the connection's fields.
//!
//! tungstenite copies each frame it is given into a write buffer of its own, per connection,
//! which never shrinks. So a message bigger than [`FRAGMENT_BYTES`] is handed over as a
//! fragmented WebSocket message, a slice of the shared frame at a time: a 6 MiB broadcast to
//! 10,000 connections costs one 6 MiB frame and a few KiB per connection, not 60 GB.

use std::collections::VecDeque;
use std::io::{self, Read as _};
use std::time::{Duration, Instant};

use log::debug;
use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::protocol::frame::coding::{CloseCode, Data as OpData, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Bytes, Message, Utf8Bytes, WebSocket};

use super::transport::Transport;
use super::LoopConfig;
use crate::gateway::access::Access;
use crate::gateway::protocol::{self, Reject};
use crate::gateway::stats::Stats;

/// How long a connection we are closing may take to take its close frame and hang up.
const CLOSE_LINGER: Duration = Duration::from_secs(5);
/// Bytes of queued frames handed to tungstenite before each flush: bounds both the syscalls per
/// burst and the write buffer tungstenite keeps (it never shrinks) per connection.
pub(crate) const WRITE_BATCH: usize = 4096;
/// A message longer than this goes out in fragments of this size, so that it takes no more of
/// tungstenite's write buffer than a batch of small ones.
const FRAGMENT_BYTES: usize = WRITE_BATCH;
/// Most bytes tungstenite may hold for a connection: what it buffers before writing out
/// (`2 * WRITE_BATCH`, see `websocket_config`), the batch or fragment that passed it, and room
/// to spare for control frames. A data frame past it drops the connection: only a client that
/// floods us with pings while not reading fills it.
pub(crate) const MAX_WRITE_BUFFER: usize = 8 * WRITE_BATCH;
/// Frames a drained queue may keep room for; a queue that grew past it during a burst gives its
/// memory back once empty instead of holding it for the life of the connection.
const IDLE_QUEUE_CAPACITY: usize = 64;
/// Frames (or, from a closing peer, 4 KiB reads) taken from one connection in one turn of the
/// loop; one with more waits for the next turn, after the other connections and the inbox.
pub(crate) const READ_BUDGET: usize = 64;

/// What the event loop must do with a connection after calling one of its methods.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Nothing.
    Keep,
    /// List it in `dirty`: it has something to write. Returned once until it is flushed.
    Flush,
    /// List it in `unread`: it used its read budget with more to read, and edge-triggered
    /// polling will not report it again until new bytes arrive.
    ReadLater,
    /// Both [`Next::ReadLater`] and [`Next::Flush`].
    ReadLaterAndFlush,
    /// Remove it: it hung up, failed, or its close is done or overdue.
    Drop,
}

/// One step of reading an open connection.
#[derive(Debug)]
pub(crate) enum Read {
    /// A message from the client, for the loop to act on.
    Message(Message),
    /// The client sent something the node refuses (too big, not UTF-8, a protocol violation).
    Refused(Reject),
    /// Nothing more to read in this turn.
    Done(Next),
}

/// Whether the frames still queued on a connection go out before its close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueuedFrames {
    /// The node is stopping: what the client was promised still reaches it.
    Send,
    /// The client misbehaved or cannot keep up: it gets the close frame only.
    Discard,
}

/// A frame did not fit: the connection had unsent bytes, and with the frame they would pass
/// `max_out_buffer`.
#[derive(Debug)]
pub(crate) struct SlowConsumer {
    /// Bytes queued or handed to tungstenite and not yet written.
    pub(crate) unsent: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Subscribed topics count, deliveries flow.
    Active,
    /// A close frame is queued (ours or the reply to the peer's), or ours waits in
    /// `close_after_queue` for the queue to go out first; flushing them.
    Closing { deadline: Instant },
    /// Our close frame is out and our side shut; reading until the peer hangs up.
    Draining { deadline: Instant },
}

/// An upgraded connection.
pub(crate) struct Connection {
    ws: WebSocket<Transport>,
    /// Frames not yet (or, the front one, not wholly) handed to tungstenite.
    queue: VecDeque<Utf8Bytes>,
    /// Bytes of the front frame already handed over as fragments; 0 when it is not started.
    front_sent: usize,
    /// Bytes in `queue` not yet handed to tungstenite.
    queued: usize,
    /// Bytes handed to tungstenite since its write buffer was last seen empty.
    in_flight: usize,
    /// The socket refused bytes; wait for a writable event.
    blocked: bool,
    /// Listed in the loop's `dirty`.
    dirty: bool,
    last_seen: Instant,
    last_ping: Instant,
    phase: Phase,
    /// Our close frame, sent once `queue` is written out (the node is stopping).
    close_after_queue: Option<CloseFrame>,
    /// Who is at the other end and what it may subscribe to; set by the loop when it opens.
    pub(crate) access: Access,
}

impl Connection {
    pub(crate) fn new(ws: WebSocket<Transport>) -> Connection {
        let now = Instant::now();
        Connection {
            ws,
            queue: VecDeque::new(),
            front_sent: 0,
            queued: 0,
            in_flight: 0,
            blocked: false,
            dirty: false,
            last_seen: now,
            last_ping: now,
            phase: Phase::Active,
            close_after_queue: None,
            access: Access::Anonymous,
        }
    }

    /// Subscribed and taking deliveries: not closing.
    pub(crate) fn is_active(&self) -> bool {
        self.phase == Phase::Active
    }

    /// Starts closing. True only the first time, when the loop must take the connection out of
    /// its subscriptions and the open count.
    pub(crate) fn leave_active(&mut self) -> bool {
        if self.phase != Phase::Active {
            return false;
        }
        self.phase = Phase::Closing { deadline: Instant::now() + CLOSE_LINGER };
        true
    }

    /// The socket takes bytes again.
    pub(crate) fn writable(&mut self) -> Next {
        self.blocked = false;
        self.mark_dirty()
    }

    /// Asks to be flushed in this turn of the loop.
    pub(crate) fn mark_dirty(&mut self) -> Next {
        if self.dirty {
            return Next::Keep;
        }
        self.dirty = true;
        Next::Flush
    }

    /// Writes what it can: queued frames while active, the close frame while closing, and
    /// discards what a closing peer still sends while draining.
    pub(crate) fn flush(&mut self, stats: &Stats) -> Next {
        self.dirty = false;
        match self.phase {
            Phase::Active => self.pump(stats),
            Phase::Closing { .. } => self.drive_close(stats),
            Phase::Draining { .. } => self.drain(),
        }
    }

    /// Reads one message. A closing connection reads nothing; a draining one discards.
    pub(crate) fn read(&mut self) -> Read {
        match self.phase {
            Phase::Active => {}
            Phase::Closing { .. } => return Read::Done(Next::Keep),
            Phase::Draining { .. } => return Read::Done(self.drain()),
        }
        match self.ws.read() {
            Ok(message) => {
                self.last_seen = Instant::now();
                Read::Message(message)
            }
            // Replies to pings are queued inside tungstenite: let the write path flush them.
            Err(e) if would_block(&e) => Read::Done(self.mark_dirty()),
            Err(e) => refusal(e).map_or(Read::Done(Next::Drop), Read::Refused),
        }
    }

    /// Called after [`READ_BUDGET`] messages were read in one turn: an active connection waits
    /// for the next turn (and flushes what reading queued meanwhile).
    pub(crate) fn budget_spent(&mut self) -> Next {
        match self.phase {
            Phase::Active => match self.mark_dirty() {
                Next::Flush => Next::ReadLaterAndFlush,
                _ => Next::ReadLater,
            },
            Phase::Closing { .. } => Next::Keep,
            Phase::Draining { .. } => self.drain(),
        }
    }

    /// Queues a frame on an active connection. A connection with nothing unsent takes any
    /// frame, however big (a legal broadcast can encode to several times `max_out_buffer`);
    /// past that the frame is refused if the unsent bytes would pass `max_out_buffer`.
    pub(crate) fn enqueue(
        &mut self,
        frame: &Utf8Bytes,
        max_out_buffer: usize,
        stats: &Stats,
    ) -> Result<Next, SlowConsumer> {
        if self.phase != Phase::Active {
            return Ok(Next::Keep);
        }
        let unsent = self.queued + self.in_flight;
        if unsent > 0 && unsent + frame.len() > max_out_buffer {
            return Err(SlowConsumer { unsent });
        }
        self.queue.push_back(frame.clone());
        self.queued += frame.len();
        // A burst is piling up: let the socket take what it can before judging the client.
        if self.queued >= max_out_buffer / 2 && self.pump(stats) == Next::Drop {
            return Ok(Next::Drop);
        }
        Ok(self.mark_dirty())
    }

    /// Moves queued frames into tungstenite and flushes, batch by batch, while the socket
    /// takes them.
    fn pump(&mut self, stats: &Stats) -> Next {
        while !self.blocked {
            let mut batch = 0;
            while batch < WRITE_BATCH && !self.blocked {
                let Some((message, len)) = self.next_frame(stats) else { break };
                batch += len;
                self.queued -= len;
                self.in_flight += len;
                match self.ws.write(message) {
                    Ok(()) => {}
                    // The frame is buffered; the socket is full.
                    Err(e) if would_block(&e) => self.blocked = true,
                    Err(e) => {
                        debug!("write failed: {e}");
                        return Next::Drop;
                    }
                }
            }
            if self.blocked {
                break;
            }
            match self.ws.flush() {
                Ok(()) => self.in_flight = 0,
                Err(e) if would_block(&e) => self.blocked = true,
                Err(e) => {
                    debug!("flush failed: {e}");
                    return Next::Drop;
                }
            }
            if self.queue.is_empty() {
                break;
            }
        }
        if self.queue.is_empty() && self.queue.capacity() > IDLE_QUEUE_CAPACITY {
            self.queue = VecDeque::new();
        }
        Next::Keep
    }

    /// Takes the next message for tungstenite off the queue: the front frame whole, or the
    /// next fragment of a frame longer than [`FRAGMENT_BYTES`]. Returns it with its payload
    /// length; counts a frame in `frames_sent` when its first byte goes.
    fn next_frame(&mut self, stats: &Stats) -> Option<(Message, usize)> {
        let front = self.queue.front()?;
        let len = front.len();
        if self.front_sent == 0 && len <= FRAGMENT_BYTES {
            Stats::inc(&stats.frames_sent);
            let frame = self.queue.pop_front()?;
            return Some((Message::Text(frame), len));
        }
        let start = self.front_sent;
        let mut end = (start + FRAGMENT_BYTES).min(len);
        // Each fragment holds whole characters, for clients that check them one by one.
        while !front.as_str().is_char_boundary(end) {
            end -= 1;
        }
        let payload: &Bytes = front.as_ref();
        let payload = payload.slice(start..end);
        let opcode = if start == 0 {
            Stats::inc(&stats.frames_sent);
            OpCode::Data(OpData::Text)
        } else {
            OpCode::Data(OpData::Continue)
        };
        let last = end == len;
        if last {
            self.queue.pop_front();
            self.front_sent = 0;
        } else {
            self.front_sent = end;
        }
        Some((Message::Frame(Frame::message(payload, opcode, last)), end - start))
    }

    /// Starts our side of the close: the close frame goes after what tungstenite already holds
    /// and, if `queued` says so, after the queued frames. Call [`Connection::leave_active`]
    /// first.
    pub(crate) fn begin_close(&mut self, code: u16, reason: &str, queued: QueuedFrames, stats: &Stats) -> Next {
        if queued == QueuedFrames::Discard {
            // A fragmented frame cut short is no harm: the close frame may come between
            // fragments, and the client stops reading at it.
            self.queue = VecDeque::new();
            self.front_sent = 0;
            self.queued = 0;
        }
        self.close_after_queue = Some(CloseFrame { code: CloseCode::from(code), reason: reason.into() });
        self.drive_close(stats)
    }

    /// Writes what must precede the close frame, then the close frame, then waits for it to go
    /// out.
    fn drive_close(&mut self, stats: &Stats) -> Next {
        if self.close_after_queue.is_some() {
            if self.pump(stats) == Next::Drop {
                return Next::Drop;
            }
            if !self.queue.is_empty() {
                // The socket is full; a writable event brings us back.
                return Next::Keep;
            }
            // Queues the frame whatever the socket does; the flush below reports how it went.
            let _ = self.ws.close(self.close_after_queue.take());
        }
        match self.ws.flush() {
            // Our close frame is out: say we are done writing (TLS: close_notify), then wait
            // for the peer.
            Ok(()) => match self.ws.get_mut().shutdown_write() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Next::Keep,
                _ => {
                    self.phase = Phase::Draining { deadline: Instant::now() + CLOSE_LINGER };
                    self.drain()
                }
            },
            Err(e) if would_block(&e) => Next::Keep,
            // ConnectionClosed: the peer closed first and our reply went to the stream, which
            // for TLS may still hold it in records the socket has not taken: one last try.
            Err(_) => {
                let _ = self.ws.get_mut().shutdown_write();
                Next::Drop
            }
        }
    }

    /// Reads and discards whatever a closing peer still sends, until it hangs up.
    fn drain(&mut self) -> Next {
        let mut scratch = [0u8; 4096];
        for _ in 0..READ_BUDGET {
            match self.ws.get_mut().read(&mut scratch) {
                Ok(0) => return Next::Drop,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Next::Drop,
            }
        }
        Next::ReadLater
    }

    /// Pings the connection if one is due; drops it when nothing came from it for
    /// `pong_timeout` (counted) or its close took longer than it may.
    pub(crate) fn tick(&mut self, now: Instant, config: &LoopConfig, stats: &Stats) -> Next {
        match self.phase {
            Phase::Closing { deadline } | Phase::Draining { deadline } if now >= deadline => Next::Drop,
            Phase::Closing { .. } | Phase::Draining { .. } => Next::Keep,
            Phase::Active if now.duration_since(self.last_seen) >= config.pong_timeout => {
                debug!("dropping a connection silent for {:?}", config.pong_timeout);
                Stats::inc(&stats.closed_timeout);
                Next::Drop
            }
            Phase::Active if now.duration_since(self.last_ping) >= config.ping_interval => {
                self.last_ping = now;
                match self.ws.write(Message::Ping(Bytes::new())) {
                    Ok(()) => {}
                    Err(e) if would_block(&e) => self.blocked = true,
                    Err(_) => return Next::Drop,
                }
                self.mark_dirty()
            }
            Phase::Active => Next::Keep,
        }
    }
}

/// What a failed read means: a close code for the client, or `None` when it is gone anyway.
fn refusal(e: WsError) -> Option<Reject> {
    match e {
        WsError::Capacity(e) => Some(Reject::new(protocol::CLOSE_TOO_BIG, format!("message too big: {e}"))),
        WsError::Utf8(_) => Some(Reject::new(protocol::CLOSE_INVALID_DATA, "text frame is not valid UTF-8")),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            debug!("client hung up without a close frame");
            None
        }
        WsError::Protocol(p) => Some(Reject::new(protocol::CLOSE_PROTOCOL, format!("protocol error: {p}"))),
        other => {
            debug!("connection lost: {other}");
            None
        }
    }
}

fn would_block(e: &WsError) -> bool {
    matches!(e, WsError::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use tungstenite::protocol::{Role, WebSocketConfig};

    /// A server-side connection and the raw client socket at its other end, with a send buffer
    /// small enough that the client's receive buffer plus a few KiB fill it.
    fn pair() -> (Connection, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let size: libc::c_int = 4096;
        // SAFETY: a live socket and a c_int of the size passed; setsockopt only reads it.
        let set = unsafe {
            libc::setsockopt(
                server.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0);
        server.set_nonblocking(true).unwrap();
        // As the accept thread sets it: small writes must not wait for acks.
        server.set_nodelay(true).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let config = WebSocketConfig::default().write_buffer_size(2 * WRITE_BATCH);
        let socket = Transport::Plain(mio::net::TcpStream::from_std(server));
        let ws = WebSocket::from_raw_socket(socket, Role::Server, Some(config));
        (Connection::new(ws), client)
    }

    /// Reads one frame off the raw client socket: (FIN, opcode, payload).
    fn read_frame(client: &mut std::net::TcpStream) -> (bool, u8, Vec<u8>) {
        let mut head = [0u8; 2];
        client.read_exact(&mut head).unwrap();
        let len = match head[1] & 0x7f {
            126 => {
                let mut ext = [0u8; 2];
                client.read_exact(&mut ext).unwrap();
                u16::from_be_bytes(ext) as usize
            }
            127 => {
                let mut ext = [0u8; 8];
                client.read_exact(&mut ext).unwrap();
                u64::from_be_bytes(ext) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        client.read_exact(&mut payload).unwrap();
        (head[0] & 0x80 != 0, head[0] & 0x0f, payload)
    }

    /// Flushes `conn` while `reader` runs, until the reader is done.
    fn flush_while<T>(conn: &mut Connection, stats: &Stats, reader: std::thread::JoinHandle<T>) -> T {
        while !reader.is_finished() {
            let _ = conn.writable();
            assert_eq!(conn.flush(stats), Next::Keep);
            std::thread::yield_now();
        }
        reader.join().unwrap()
    }

    #[test]
    fn one_frame_of_any_size_fits_an_idle_connection_and_the_bound_applies_behind_it() {
        let (mut conn, mut client) = pair();
        let stats = Stats::default();
        // 'é' straddles the first fragment boundary: fragments end on whole characters.
        // Bigger than what the client's receive buffer and our send buffer hold.
        let text = format!("{}é{}", "a".repeat(FRAGMENT_BYTES - 1), "b".repeat(1 << 20));
        let big = Utf8Bytes::from(text.clone());
        assert!(conn.enqueue(&big, 1024, &stats).is_ok(), "nothing was unsent: the frame is taken");
        let small = Utf8Bytes::from("x".repeat(100));
        let slow = conn.enqueue(&small, 1024, &stats).expect_err("something is unsent: the bound applies");
        assert!(slow.unsent > 0);

        let reader = std::thread::spawn(move || {
            let mut fragments = Vec::new();
            loop {
                let (fin, opcode, payload) = read_frame(&mut client);
                fragments.push((opcode, payload));
                if fin {
                    return fragments;
                }
            }
        });
        let fragments = flush_while(&mut conn, &stats, reader);
        assert_eq!(fragments[0].0, 0x1, "a text frame first");
        assert!(fragments[1..].iter().all(|(opcode, _)| *opcode == 0x0), "then continuations");
        assert_eq!(fragments[0].1.len(), FRAGMENT_BYTES - 1, "the first fragment stops before the 'é'");
        for (_, payload) in &fragments {
            assert!(payload.len() <= FRAGMENT_BYTES);
            std::str::from_utf8(payload).expect("each fragment is whole characters");
        }
        assert_eq!(fragments.concat_payloads(), text.as_bytes());
        assert_eq!(stats.frames_sent.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(conn.queued + conn.in_flight, 0);
        assert!(conn.enqueue(&small, 1024, &stats).is_ok(), "all sent: frames are taken again");
    }

    trait ConcatPayloads {
        fn concat_payloads(&self) -> Vec<u8>;
    }

    impl ConcatPayloads for Vec<(u8, Vec<u8>)> {
        fn concat_payloads(&self) -> Vec<u8> {
            self.iter().flat_map(|(_, payload)| payload.iter().copied()).collect()
        }
    }

    #[test]
    fn a_queue_that_grew_in_a_burst_gives_its_room_back_once_sent() {
        let (mut conn, mut client) = pair();
        let stats = Stats::default();
        let frame = Utf8Bytes::from("y".repeat(100));
        const BURST: usize = 2000;
        for _ in 0..BURST {
            let _ = conn.enqueue(&frame, 1 << 20, &stats).unwrap();
        }
        assert!(conn.queue.capacity() > IDLE_QUEUE_CAPACITY, "the burst waits in the queue");
        let reader = std::thread::spawn(move || (0..BURST).map(|_| read_frame(&mut client).2.len()).sum::<usize>());
        assert_eq!(flush_while(&mut conn, &stats, reader), BURST * 100);
        assert!(conn.queue.is_empty());
        assert!(conn.queue.capacity() <= IDLE_QUEUE_CAPACITY, "kept room for {} frames", conn.queue.capacity());
    }
}
