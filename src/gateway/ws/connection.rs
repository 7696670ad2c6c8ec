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
//!
//! Frames leave in batches: tungstenite passes each one straight to the [`Transport`], which
//! gathers them until [`Connection::flush`] (once per turn of the loop, after the inbox is
//! drained) or `--ws-write-bytes` are queued, whichever comes first, and writes them in one
//! syscall (several if the batch holds more than that). A
//! frame alone in its turn goes out in that turn; frames that arrive together leave together.

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
/// The largest `--ws-write-bytes`: what a connection's transport may gather for one write.
pub(crate) const MAX_WRITE_BATCH: usize = 256 << 10;
/// A message longer than this goes out in fragments of this size, so that it takes no more of
/// tungstenite's write buffer than one fragment.
const FRAGMENT_BYTES: usize = 4096;
/// Most bytes tungstenite may hold for a connection: it writes each frame through to the
/// transport, and keeps only what the transport refused (its buffer full, the socket too): a
/// frame or fragment, and room to spare for control frames. A data frame past it drops the
/// connection: only a client that floods us with pings while not reading fills it.
pub(crate) const MAX_WRITE_BUFFER: usize = 8 * FRAGMENT_BYTES;
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

/// How much of its queue a connection writes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Batches {
    /// Everything (the end of a turn, a flush).
    All,
    /// Only whole batches of `write_bytes`, leaving the rest for the flush at the end of the
    /// turn.
    Full,
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
    /// Frames started since the last [`Connection::report`].
    frames: u64,
    /// Most bytes of queued frames per write (`--ws-write-bytes`).
    write_bytes: usize,
    last_seen: Instant,
    last_ping: Instant,
    phase: Phase,
    /// Our close frame, sent once `queue` is written out (the node is stopping).
    close_after_queue: Option<CloseFrame>,
    /// Who is at the other end and what it may subscribe to; set by the loop when it opens.
    pub(crate) access: Access,
}

impl Connection {
    pub(crate) fn new(ws: WebSocket<Transport>, write_bytes: usize) -> Connection {
        let now = Instant::now();
        Connection {
            ws,
            queue: VecDeque::new(),
            front_sent: 0,
            queued: 0,
            in_flight: 0,
            blocked: false,
            dirty: false,
            frames: 0,
            write_bytes,
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
        let next = match self.phase {
            Phase::Active => self.pump(stats, Batches::All),
            Phase::Closing { .. } => self.drive_close(stats),
            Phase::Draining { .. } => self.drain(),
        };
        // Control frames and the close frame go out here too.
        self.report(stats);
        next
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
        if self.queued >= max_out_buffer / 2 && self.pump(stats, Batches::All) == Next::Drop {
            return Ok(Next::Drop);
        }
        // A full batch need not wait for the end of the turn.
        if self.queued >= self.write_bytes && self.pump(stats, Batches::Full) == Next::Drop {
            return Ok(Next::Drop);
        }
        Ok(self.mark_dirty())
    }

    /// Moves queued frames into tungstenite and flushes, batch by batch, while the socket
    /// takes them: every frame, or only as many whole batches as are queued.
    fn pump(&mut self, stats: &Stats, batches: Batches) -> Next {
        let next = self.pump_batches(batches, stats);
        self.report(stats);
        next
    }

    /// Adds the frames started and the writes made since the last report to the node's
    /// counters: once per pump, not once per frame, as every connection shares them.
    fn report(&mut self, stats: &Stats) {
        Stats::add(&stats.socket_writes, self.ws.get_mut().take_writes());
        Stats::add(&stats.bytes_sent, self.ws.get_mut().take_bytes());
        self.count_frames(stats);
    }

    /// Counts the frames started so far, before they are written: a client that has read a
    /// frame finds it counted.
    fn count_frames(&mut self, stats: &Stats) {
        Stats::add(&stats.frames_sent, std::mem::take(&mut self.frames));
    }

    fn pump_batches(&mut self, batches: Batches, stats: &Stats) -> Next {
        // What is already written goes first (control frames, or what the socket refused last
        // time: tungstenite keeps a frame the transport refused, and would grow by each frame
        // added behind a full socket). Free when there is nothing.
        if !self.blocked && !self.write_out() {
            return Next::Drop;
        }
        while !self.blocked && !self.queue.is_empty() {
            if batches == Batches::Full && self.queued < self.write_bytes {
                break;
            }
            let mut batch = 0;
            while batch < self.write_bytes && !self.blocked {
                let Some((message, len)) = self.next_frame() else { break };
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
            self.count_frames(stats);
            if !self.blocked && !self.write_out() {
                return Next::Drop;
            }
        }
        if self.queue.is_empty() && self.queue.capacity() > IDLE_QUEUE_CAPACITY {
            self.queue = VecDeque::new();
        }
        Next::Keep
    }

    /// Writes what tungstenite and the transport hold, in one syscall if the socket takes it;
    /// false when the connection failed.
    fn write_out(&mut self) -> bool {
        match self.ws.flush() {
            Ok(()) => {
                self.in_flight = 0;
                true
            }
            Err(e) if would_block(&e) => {
                self.blocked = true;
                true
            }
            Err(e) => {
                debug!("flush failed: {e}");
                false
            }
        }
    }

    /// Takes the next message for tungstenite off the queue: the front frame whole, or the
    /// next fragment of a frame longer than [`FRAGMENT_BYTES`]. Returns it with its payload
    /// length; counts a frame in `frames` when its first byte goes.
    fn next_frame(&mut self) -> Option<(Message, usize)> {
        let front = self.queue.front()?;
        let len = front.len();
        if self.front_sent == 0 && len <= FRAGMENT_BYTES {
            self.frames += 1;
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
            self.frames += 1;
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
            if self.pump(stats, Batches::All) == Next::Drop {
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
    use tungstenite::protocol::Role;

    /// A server-side connection and the raw client socket at its other end, with a send buffer
    /// small enough that the client's receive buffer plus a few KiB fill it.
    fn pair() -> (Connection, std::net::TcpStream) {
        pair_with_send_buffer(4096)
    }

    /// [`pair`] with a send buffer of `size` bytes (as the kernel rounds it).
    fn pair_with_send_buffer(size: libc::c_int) -> (Connection, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
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
        let config = super::super::websocket_config(1 << 20);
        let socket = Transport::plain(mio::net::TcpStream::from_std(server));
        let ws = WebSocket::from_raw_socket(socket, Role::Server, Some(config));
        (Connection::new(ws, crate::gateway::Config::default().ws_write_bytes), client)
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

    fn writes(stats: &Stats) -> u64 {
        stats.socket_writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Frame `i` of a numbered run: its number, padded to `len` bytes.
    fn numbered(i: usize, len: usize) -> Utf8Bytes {
        Utf8Bytes::from(format!("{i:0len$}"))
    }

    /// Reads whole messages (fragments put together) off the raw client socket.
    fn read_message(client: &mut std::net::TcpStream) -> Vec<u8> {
        let mut message = Vec::new();
        loop {
            let (fin, _, payload) = read_frame(client);
            message.extend_from_slice(&payload);
            if fin {
                return message;
            }
        }
    }

    #[test]
    fn many_queued_small_frames_leave_in_a_few_writes_each_within_the_batch_bound_in_order() {
        // Room in the socket for all of it: every write goes through whole.
        let (mut conn, mut client) = pair_with_send_buffer(4 << 20);
        let stats = Stats::default();
        const FRAMES: usize = 1000;
        const LEN: usize = 100;
        for i in 0..FRAMES {
            let _ = conn.enqueue(&numbered(i, LEN), 1 << 20, &stats).unwrap();
        }
        assert_eq!(conn.flush(&stats), Next::Keep);
        // A write takes frames until `write_bytes` bytes of them: no fewer writes than that
        // allows, and no more.
        let per_write = conn.write_bytes.div_ceil(LEN);
        assert_eq!(writes(&stats), FRAMES.div_ceil(per_write) as u64, "{FRAMES} frames of {LEN} bytes");
        assert_eq!(stats.frames_sent.load(std::sync::atomic::Ordering::Relaxed), FRAMES as u64);
        for i in 0..FRAMES {
            assert_eq!(read_message(&mut client), numbered(i, LEN).as_bytes(), "frame {i}");
        }
        assert!(conn.ws.get_ref().holds_nothing(), "the write buffer is given back once written out");
    }

    #[test]
    fn a_lone_frame_on_an_idle_connection_is_written_by_the_flush_that_follows_it() {
        let (mut conn, mut client) = pair();
        let stats = Stats::default();
        let frame = Utf8Bytes::from("alone");
        assert_eq!(conn.enqueue(&frame, 1 << 20, &stats).unwrap(), Next::Flush, "the loop is asked to flush it");
        assert_eq!(writes(&stats), 0, "nothing is written before the flush");
        assert_eq!(conn.flush(&stats), Next::Keep);
        assert_eq!(writes(&stats), 1);
        assert_eq!(read_message(&mut client), b"alone");
    }

    #[test]
    fn order_holds_across_coalesced_and_partial_writes_with_fragmented_frames_among_small_ones() {
        // A small send buffer: writes are cut short and wait for the socket.
        let (mut conn, mut client) = pair();
        let stats = Stats::default();
        let sizes: Vec<usize> = (0..600).map(|i| [100, 20, 9000, 300, 5000][i % 5]).collect();
        let expected: Vec<Utf8Bytes> = sizes.iter().enumerate().map(|(i, &len)| numbered(i, len)).collect();
        let count = expected.len();
        let reader = std::thread::spawn(move || (0..count).map(|_| read_message(&mut client)).collect::<Vec<_>>());
        for frame in &expected {
            let _ = conn.enqueue(frame, 64 << 20, &stats).unwrap();
            let _ = conn.writable();
            let _ = conn.flush(&stats);
        }
        let got = flush_while(&mut conn, &stats, reader);
        for (i, (got, want)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(got.as_slice(), want.as_bytes(), "message {i}");
        }
        assert!(writes(&stats) < count as u64, "{} writes for {count} messages", writes(&stats));
    }

    #[test]
    fn a_slow_consumer_is_refused_at_the_same_bound_with_bytes_held_for_coalescing_counted() {
        let (mut conn, _client) = pair();
        let stats = Stats::default();
        const MAX_OUT: usize = 64 << 10;
        let frame = Utf8Bytes::from("z".repeat(100));
        let mut taken = 0;
        let slow = loop {
            match conn.enqueue(&frame, MAX_OUT, &stats) {
                Ok(_) => taken += 1,
                Err(slow) => break slow,
            }
            assert!(taken < 100_000, "the client reads nothing, so the bound must be reached");
        };
        assert!(slow.unsent <= MAX_OUT && slow.unsent + frame.len() > MAX_OUT, "unsent {}", slow.unsent);
        assert!(writes(&stats) > 0, "what fit went to the socket before the client was judged");
        // Once closing, the queued frames are dropped and only the close frame waits.
        let _ = conn.leave_active();
        let _ = conn.begin_close(protocol::CLOSE_SLOW, protocol::REASON_SLOW, QueuedFrames::Discard, &stats);
        assert_eq!(conn.queued, 0);
    }
}
