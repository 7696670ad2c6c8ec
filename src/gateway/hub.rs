//! The hub turns one broadcast into deliveries. Subscriptions and users are sharded over the
//! event loops: each loop keeps its own topic -> connections and user -> connections index, so
//! publishing encodes the frame once, hands the same `Arc` to every loop and lets each look up
//! its own audience. The hub itself only keeps counts per topic and per user (updated by the
//! loops) to answer "how many will get it" at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Sender;
use parking_lot::Mutex;
use tungstenite::Utf8Bytes;

use super::protocol;
use super::stats::Stats;
use super::ws::LoopState;
use crate::admin::Histogram;
use crate::proto::dedup_user_ids;
use crate::proto::protocol::BroadCastReq;

/// One broadcast as the event loops see it: who gets it, and its frame encoded once and queued
/// by reference on every connection that gets it.
#[derive(Debug)]
pub(crate) struct EncodedBroadcast {
    pub(crate) audience: Audience,
    pub(crate) frame: Utf8Bytes,
}

/// The connections a broadcast is for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Audience {
    /// Every open connection (a broadcast to topic `""`).
    Everyone,
    /// The connections subscribed to this topic.
    Topic(Box<str>),
    /// Every connection of these users, each listed once.
    Users(Box<[Box<str>]>),
}

/// What an event loop is told from outside.
pub(crate) enum LoopMsg {
    /// A freshly accepted socket for the loop to shake hands with and own.
    Accepted(mio::net::TcpStream),
    /// Broadcasts to fan out to the loop's matching connections, in order: one from a unary
    /// call, a whole `BroadcastBatch` from push-manager, so that a batch reaches each loop as one
    /// hand-off and leaves each connection in as few writes as its bytes allow. `taken` is when
    /// the hub took it off its RPC, for the delivery latency.
    Publish { batch: Arc<[EncodedBroadcast]>, taken: Instant },
}

/// What waits in one loop's inbox, for admission: added by the hub before sending, taken off by
/// the loop as it takes each batch.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    /// Broadcasts (not batches) waiting.
    pub(crate) broadcasts: AtomicUsize,
    /// Bytes of their frames.
    pub(crate) bytes: AtomicUsize,
}

impl Backlog {
    fn add(&self, broadcasts: usize, bytes: usize) {
        self.broadcasts.fetch_add(broadcasts, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn sub(&self, broadcasts: usize, bytes: usize) {
        self.broadcasts.fetch_sub(broadcasts, Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// The way into one event loop: its inbound channel and the waker that interrupts its poll.
#[derive(Clone)]
pub(crate) struct LoopHandle {
    pub(crate) tx: Sender<LoopMsg>,
    pub(crate) waker: Arc<mio::Waker>,
    /// Set by the first sender after the loop last looked at its queue; only that sender pays
    /// for the wake-up syscall. The loop clears it *before* draining the queue.
    pub(crate) wake_pending: Arc<AtomicBool>,
    /// Broadcasts and bytes of frames in `tx` not yet taken by the loop.
    pub(crate) backlog: Arc<Backlog>,
    /// Microseconds from the hub taking a broadcast to the loop's writes of its frames; one per
    /// loop, so the loops never share its counters' cache lines.
    pub(crate) delivery_latency_us: Arc<Histogram>,
    /// The loop's state, for writing to its connections inline while it sleeps.
    pub(crate) state: LoopState,
}

impl LoopHandle {
    /// Queues `msg` and wakes the loop unless a wake-up is already pending. Returns false once
    /// the loop is gone.
    pub(crate) fn send(&self, msg: LoopMsg) -> bool {
        if self.tx.send(msg).is_err() {
            return false;
        }
        if !self.wake_pending.swap(true, Ordering::SeqCst) {
            if let Err(e) = self.waker.wake() {
                log::warn!("cannot wake an event loop: {e}");
            }
        }
        true
    }
}

/// Connections per name over all loops, for `NodeReply.delivered`: one `Counts` holds the
/// subscribers of each topic, another the connections of each user.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    counts: Mutex<HashMap<Box<str>, u64>>,
}

impl Counts {
    pub(crate) fn add(&self, name: &str) {
        *self.counts.lock().entry(name.into()).or_insert(0) += 1;
    }

    pub(crate) fn remove(&self, name: &str) {
        let mut counts = self.counts.lock();
        if let Some(n) = counts.get_mut(name) {
            *n -= 1;
            if *n == 0 {
                counts.remove(name);
            }
        }
    }

    pub(crate) fn get(&self, name: &str) -> u64 {
        self.counts.lock().get(name).copied().unwrap_or(0)
    }

    /// How many names have at least one, and how many there are over all names (for metrics:
    /// O(names) under the lock, once per scrape).
    pub(crate) fn totals(&self) -> (usize, u64) {
        let counts = self.counts.lock();
        (counts.len(), counts.values().sum())
    }
}

/// The topic and user counts every loop keeps up to date.
#[derive(Debug, Default)]
pub(crate) struct SharedCounts {
    /// Subscribers per topic.
    pub(crate) topics: Counts,
    /// Open connections per user.
    pub(crate) users: Counts,
}

/// How much may wait in one event loop's queue before broadcasts are refused.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BacklogLimits {
    pub(crate) deliveries: usize,
    pub(crate) bytes: usize,
}

/// Fans broadcasts out to the event loops; shared by the gRPC service and the [`super::Gateway`].
pub struct Hub {
    loops: Vec<LoopHandle>,
    counts: Arc<SharedCounts>,
    stats: Arc<Stats>,
    /// `Config::max_loop_backlog` and `Config::max_loop_backlog_bytes`.
    limits: BacklogLimits,
    /// Held while a broadcast is handed to every loop (or written inline to an idle one's few
    /// connections), so that two concurrent publishers cannot interleave differently on
    /// different loops: all connections see one order.
    order: Mutex<()>,
}

impl Hub {
    pub(crate) fn new(
        loops: Vec<LoopHandle>,
        counts: Arc<SharedCounts>,
        stats: Arc<Stats>,
        limits: BacklogLimits,
    ) -> Hub {
        Hub { loops, counts, stats, limits, order: Mutex::new(()) }
    }

    /// Admits a broadcast unless an event loop has `limits.deliveries` or more deliveries, or
    /// `limits.bytes` or more bytes of frames, waiting; a refusal is counted and says why.
    /// Called before publishing, so a refused batch delivers nothing; the queues can still pass
    /// the limits by what broadcasts admitted meanwhile carry.
    pub(crate) fn admit(&self) -> Result<(), String> {
        let backlog = self.loops.iter().map(|l| l.backlog.broadcasts.load(Ordering::Relaxed)).max().unwrap_or(0);
        let bytes = self.loops.iter().map(|l| l.backlog.bytes.load(Ordering::Relaxed)).max().unwrap_or(0);
        let why = if backlog >= self.limits.deliveries {
            format!(
                "{backlog} deliveries wait in one of its event loops (limit {}, --max-loop-backlog)",
                self.limits.deliveries
            )
        } else if bytes >= self.limits.bytes {
            format!(
                "{bytes} bytes of deliveries wait in one of its event loops (limit {}, --max-loop-backlog-bytes)",
                self.limits.bytes
            )
        } else {
            return Ok(());
        };
        Stats::inc(&self.stats.refused_busy);
        Err(format!("connect-node busy: {why}; retry later"))
    }

    /// Delivers `msg` to every connection of its `user_ids` if it names any, else to every
    /// connection subscribed to its topic (every connection for an empty topic), after whatever
    /// was published before. Never blocks on a connection.
    ///
    /// Returns the connections it was fanned out to: the count at this moment (a connection
    /// subscribing, authenticating or leaving concurrently may or may not be among them).
    pub fn publish(&self, msg: &BroadCastReq) -> u64 {
        self.publish_batch(std::slice::from_ref(msg))
    }

    /// [`Hub::publish`] for each of `messages`, in order, handed to each event loop as one
    /// message: the loop fans the whole batch out before it writes, so each connection gets it
    /// in as few writes as the bytes allow. A loop asleep with nothing to do, for which the
    /// batch is a few frames, is not woken: the calling thread writes them
    /// ([`LoopState::deliver_inline`]). Returns the deliveries over all of them.
    pub fn publish_batch(&self, messages: &[BroadCastReq]) -> u64 {
        if messages.is_empty() {
            return 0;
        }
        let mut delivered = 0;
        let batch: Arc<[EncodedBroadcast]> = messages
            .iter()
            .map(|msg| {
                let (broadcast, count) = self.encode(msg);
                delivered += count;
                broadcast
            })
            .collect();
        let bytes = batch.iter().map(|b| b.frame.len()).sum();
        let taken = Instant::now();
        let _order = self.order.lock();
        for handle in &self.loops {
            if handle.state.deliver_inline(&batch, taken) {
                continue;
            }
            handle.backlog.add(batch.len(), bytes);
            // A loop that is gone (gateway shutting down) has no connections left to reach.
            if !handle.send(LoopMsg::Publish { batch: batch.clone(), taken }) {
                handle.backlog.sub(batch.len(), bytes);
            }
        }
        delivered
    }

    /// One broadcast's audience and frame, and how many connections it reaches now.
    fn encode(&self, msg: &BroadCastReq) -> (EncodedBroadcast, u64) {
        Stats::inc(&self.stats.messages_received);
        let (audience, delivered, frame) = if !msg.get_user_ids().is_empty() {
            Stats::inc(&self.stats.direct_received);
            let users: Box<[Box<str>]> = dedup_user_ids(msg.get_user_ids()).into_iter().map(Box::from).collect();
            let delivered = users.iter().map(|user| self.counts.users.get(user)).sum();
            (Audience::Users(users), delivered, protocol::encode_direct_frame(msg))
        } else if msg.get_topic().is_empty() {
            // Not the connections still owing their token: the loops skip them.
            let reached = self.stats.connections_open.load(Ordering::Relaxed);
            let pending = self.stats.connections_pending_auth.load(Ordering::Relaxed);
            (Audience::Everyone, reached.saturating_sub(pending), protocol::encode_message_frame(msg))
        } else {
            let topic = msg.get_topic();
            (Audience::Topic(topic.into()), self.counts.topics.get(topic), protocol::encode_message_frame(msg))
        };
        (EncodedBroadcast { audience, frame: Utf8Bytes::from(frame) }, delivered)
    }

    /// WebSocket connections currently open (past the handshake, not closing).
    pub fn connections(&self) -> usize {
        self.stats.connections_open.load(Ordering::Relaxed) as usize
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("loops", &self.loops.len()).field("connections", &self.connections()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::broadcast_request;

    #[test]
    fn a_push_to_users_counts_each_listed_users_connections_once() {
        let counts = Arc::new(SharedCounts::default());
        let stats = Arc::new(Stats::default());
        let limits = BacklogLimits { deliveries: 1, bytes: 1 };
        let hub = Hub::new(Vec::new(), counts.clone(), stats.clone(), limits);
        counts.users.add("alice");
        counts.users.add("alice");
        counts.users.add("bob");
        counts.topics.add("carol");

        let mut push = broadcast_request("", 1, 0, "hi");
        push.set_user_ids(["alice", "carol", "alice", "dave"].map(String::from).to_vec().into());
        assert_eq!(hub.publish(&push), 2, "alice's two connections, alice once; a topic is no user");
        assert_eq!(hub.publish(&broadcast_request("carol", 1, 0, "hi")), 1);
        let seen = stats.snapshot();
        assert_eq!((seen.messages_received, seen.direct_received), (2, 1));
    }
}
