//! The `ws-accept` thread: takes connections off the WebSocket listener and deals them
//! round-robin to the event loops, which do everything else. Kept on its own thread so a burst
//! of connects never waits behind a loop busy fanning out.
//!
//! Every accepted socket is handed to a loop, or refused with an HTTP answer (503 once
//! `max_connections` sockets are held; on a `wss://` endpoint only closed and counted, since a
//! plaintext answer would be garbage to a TLS client and a TLS handshake here would hold up the
//! accepts), or, if no loop can take it, counted and logged: none is closed without a trace.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use log::{debug, error, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use super::hub::{LoopHandle, LoopMsg};
use super::stats::Stats;
use super::ws::{http_response, WAKER};

const LISTENER: Token = Token(0);
/// How long to wait before accepting again after the process ran out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Least time between two warnings about refused connections.
const REFUSAL_WARNING_INTERVAL: Duration = Duration::from_secs(1);
/// Reads of a refused client's request, so that closing does not reset the connection (which
/// can take our answer with it); a client sending more than this gets the reset.
const REFUSED_READS: usize = 4;

/// The accept thread before it runs: built on the caller's thread so errors surface at start.
pub(crate) struct Acceptor {
    poll: Poll,
    listener: TcpListener,
    loops: Vec<LoopHandle>,
    stats: Arc<Stats>,
    /// `Config::max_connections`.
    max_connections: u64,
    /// Whether the endpoint is plaintext, where a refusal can be answered in HTTP.
    answers_plain_http: bool,
    /// When refusals were last logged, and how many came since.
    refusals: (Option<Instant>, u64),
    /// Kept for as long as the poll runs: if the stopping side dropped the last handle right
    /// after waking us, closing the waker would take its event out of the poll unseen.
    _waker: Arc<Waker>,
}

impl Acceptor {
    /// Registers `listener`; returns the acceptor and the waker that makes it look at its stop
    /// channel.
    pub(crate) fn new(
        mut listener: TcpListener,
        loops: Vec<LoopHandle>,
        stats: Arc<Stats>,
        max_connections: usize,
        answers_plain_http: bool,
    ) -> io::Result<(Acceptor, Arc<Waker>)> {
        let poll = Poll::new()?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let max_connections = max_connections as u64;
        let acceptor = Acceptor {
            poll,
            listener,
            loops,
            stats,
            max_connections,
            answers_plain_http,
            refusals: (None, 0),
            _waker: waker.clone(),
        };
        Ok((acceptor, waker))
    }

    /// Accepts until `stop` disconnects.
    pub(crate) fn run(mut self, stop: Receiver<()>) {
        let mut events = Events::with_capacity(64);
        let mut next = 0usize;
        let mut backoff: Option<Duration> = None;
        loop {
            if let Err(e) = self.poll.poll(&mut events, backoff) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!("ws-accept: poll failed, no more connections will be accepted: {e}");
                return;
            }
            if matches!(stop.try_recv(), Err(TryRecvError::Disconnected)) {
                debug!("ws-accept: stopped");
                return;
            }
            backoff = None;
            loop {
                match self.listener.accept() {
                    Ok((stream, peer)) => {
                        Stats::inc(&self.stats.accepted);
                        if self.stats.connections_held.load(Relaxed) >= self.max_connections {
                            self.refuse(stream, peer);
                            continue;
                        }
                        // Deliveries are small and latency-bound.
                        let _ = stream.set_nodelay(true);
                        // Only this thread adds to the gauge, so it cannot pass the limit.
                        Stats::inc(&self.stats.connections_held);
                        if !self.loops[next % self.loops.len()].send(LoopMsg::Accepted(stream)) {
                            // The socket went down with the message.
                            Stats::dec(&self.stats.connections_held);
                            Stats::inc(&self.stats.dropped_unserved);
                            warn!("ws-accept: closed a connection from {peer} unanswered: its event loop has stopped");
                        }
                        next = next.wrapping_add(1);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => {}
                    Err(e) => {
                        // Typically EMFILE: the connection stays in the backlog; try again soon
                        // (no new readiness edge would come for it).
                        warn!("ws-accept: accept failed, retrying in {ACCEPT_BACKOFF:?}: {e}");
                        backoff = Some(ACCEPT_BACKOFF);
                        break;
                    }
                }
            }
        }
    }

    /// Answers a connection past `max_connections` with HTTP 503 (plaintext endpoints only) and
    /// closes it: the client learns why, and the node spends nothing more on it.
    fn refuse(&mut self, stream: TcpStream, peer: SocketAddr) {
        Stats::inc(&self.stats.refused_max_connections);
        if self.answers_plain_http {
            self.answer_503(&stream, peer);
        }
        let (last, since) = &mut self.refusals;
        *since += 1;
        if last.is_none_or(|at| at.elapsed() >= REFUSAL_WARNING_INTERVAL) {
            warn!(
                "ws-accept: refusing connections{}: {} held, --max-connections {} ({} refused since the last warning)",
                if self.answers_plain_http { " with HTTP 503" } else { "" },
                self.stats.connections_held.load(Relaxed),
                self.max_connections,
                since
            );
            *last = Some(Instant::now());
            *since = 0;
        }
    }

    fn answer_503(&self, stream: &TcpStream, peer: SocketAddr) {
        let body = format!("connect-node at its limit of {} connections; try again later\n", self.max_connections);
        let mut socket = stream;
        // A fresh socket's buffer takes a short answer at once; if not, the client gets a close.
        if let Err(e) = socket.write_all(http_response("503 Service Unavailable", &body).as_bytes()) {
            debug!("ws-accept: could not answer {peer} with 503: {e}");
        }
        let _ = stream.shutdown(Shutdown::Write);
        let mut scratch = [0u8; 4096];
        for _ in 0..REFUSED_READS {
            if !matches!(socket.read(&mut scratch), Ok(n) if n > 0) {
                break;
            }
        }
    }
}
