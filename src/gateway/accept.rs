//! The `ws-accept` thread: takes connections off the WebSocket listener and deals them
//! round-robin to the event loops, which do everything else. Kept on its own thread so a burst
//! of connects never waits behind a loop busy fanning out.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, TryRecvError};
use log::{debug, error, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};

use super::hub::{LoopHandle, LoopMsg};
use super::stats::Stats;
use super::ws::WAKER;

const LISTENER: Token = Token(0);
/// How long to wait before accepting again after the process ran out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The accept thread before it runs: built on the caller's thread so errors surface at start.
pub(crate) struct Acceptor {
    poll: Poll,
    listener: TcpListener,
    loops: Vec<LoopHandle>,
    stats: Arc<Stats>,
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
    ) -> io::Result<(Acceptor, Arc<Waker>)> {
        let poll = Poll::new()?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        Ok((Acceptor { poll, listener, loops, stats, _waker: waker.clone() }, waker))
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
                    Ok((stream, _peer)) => {
                        Stats::inc(&self.stats.accepted);
                        // Deliveries are small and latency-bound.
                        let _ = stream.set_nodelay(true);
                        self.loops[next % self.loops.len()].send(LoopMsg::Accepted(stream));
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
}
