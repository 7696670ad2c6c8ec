//! One WebSocket connection past its handshake: the socket, the frames waiting to be written to
//! it and where it is in its life (active, closing, draining).
//!
//! The event loop owns the lists a connection can be on (`dirty`, `unread`) and the subscription
//! index; a connection owns its socket and its counters. So each method here does the
//! connection's own I/O and bookkeeping and returns a [`Next`] saying what the loop must do
//! about it, instead of the loop reaching into the connection's fields.

use std::collections::VecDeque;
use std::io::{self, Read as _};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use log::debug;
use mio::net::TcpStream;
use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Bytes, Message, Utf8Bytes, WebSocket};

use super::LoopConfig;
use crate::gateway::protocol::{self, Reject};
use crate::gateway::stats::Stats;

/// How long a connection we are closing may take to take its close frame and hang up.
const CLOSE_LINGER: Duration = Duration::from_secs(5);
/// Bytes of queued frames handed to tungstenite before each flush: bounds both the syscalls per
/// burst and the write buffer tungstenite keeps (it never shrinks) per connection.
pub(crate) const WRITE_BATCH: usize = 4096;
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
    /// A close frame is queued (ours or the reply to the peer's); flushing it.
    Closing { deadline: Instant },
    /// Our close frame is out and our side shut; reading until the peer hangs up.
    Draining { deadline: Instant },
}

/// An upgraded connection.
pub(crate) struct Connection {
    ws: WebSocket<TcpStream>,
    /// Frames not yet handed to tungstenite.
    queue: VecDeque<Utf8Bytes>,
    /// Bytes in `queue`.
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
}

impl Connection {
    pub(crate) fn new(ws: WebSocket<TcpStream>) -> Connection {
        let now = Instant::now();
        Connection {
            ws,
            queue: VecDeque::new(),
            queued: 0,
            in_flight: 0,
            blocked: false,
            dirty: false,
            last_seen: now,
            last_ping: now,
            phase: Phase::Active,
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
            Phase::Closing { .. } => self.drive_close(),
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
            while batch < WRITE_BATCH {
                let Some(frame) = self.queue.pop_front() else { break };
                let len = frame.len();
                batch += len;
                self.queued -= len;
                self.in_flight += len;
                Stats::inc(&stats.frames_sent);
                match self.ws.write(Message::Text(frame)) {
                    Ok(()) => {}
                    // The frame is buffered; the socket is full.
                    Err(e) if would_block(&e) => {
                        self.blocked = true;
                        break;
                    }
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
        Next::Keep
    }

    /// Sends a close frame after what tungstenite already holds (and the queued frames, if
    /// `queued` says so), then waits for it to go out. Call [`Connection::leave_active`] first.
    pub(crate) fn begin_close(&mut self, code: u16, reason: &str, queued: QueuedFrames, stats: &Stats) -> Next {
        let queue = std::mem::take(&mut self.queue);
        self.queued = 0;
        if queued == QueuedFrames::Send {
            for frame in queue {
                match self.ws.write(Message::Text(frame)) {
                    Ok(()) => Stats::inc(&stats.frames_sent),
                    Err(e) if would_block(&e) => Stats::inc(&stats.frames_sent),
                    Err(_) => break,
                }
            }
        }
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
        // Queues the frame whatever the socket does; `drive_close` reports how it went.
        let _ = self.ws.close(Some(frame));
        self.drive_close()
    }

    fn drive_close(&mut self) -> Next {
        match self.ws.flush() {
            Ok(()) => {
                // Our close frame is out: say we are done writing, then wait for the peer.
                let _ = self.ws.get_ref().shutdown(Shutdown::Write);
                self.phase = Phase::Draining { deadline: Instant::now() + CLOSE_LINGER };
                self.drain()
            }
            Err(e) if would_block(&e) => Next::Keep,
            // ConnectionClosed: the peer closed first and our reply is out.
            Err(_) => Next::Drop,
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
