//! What the admin endpoint shows of a running connect-node: its metrics
//! (`push_manager_node_*`), health (its threads run), and readiness (registered in etcd, not
//! draining), all read from the counters the accept thread, the event loops and the hub keep.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;

use super::hub::{LoopHandle, SharedCounts};
use super::sequencer::Sequencer;
use super::service::OpenStreams;
use super::stats::Stats;
use crate::admin::{Exposition, Probe, Serving};
use crate::registry::RegistrationState;

/// Bounds of `push_manager_node_delivery_latency_seconds`, in microseconds: from a tenth of a
/// millisecond (an idle node) to seconds (a backlog).
pub(crate) const DELIVERY_LATENCY_BOUNDS_US: &[u64] = &[
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    10_000_000,
];

/// The names of the gateway's threads that have ended. Each thread holds a [`Alive`] from its
/// start; dropping it (the body returning, or a panic unwinding) records the name.
#[derive(Debug, Default)]
pub(crate) struct Liveness {
    ended: Mutex<Vec<String>>,
}

impl Liveness {
    /// What a thread called `name` holds while it runs.
    pub(crate) fn alive(self: &Arc<Self>, name: impl Into<String>) -> Alive {
        Alive { liveness: self.clone(), name: name.into() }
    }

    fn ended(&self) -> Vec<String> {
        self.ended.lock().clone()
    }
}

/// See [`Liveness`].
pub(crate) struct Alive {
    liveness: Arc<Liveness>,
    name: String,
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.liveness.ended.lock().push(std::mem::take(&mut self.name));
    }
}

/// Reads a [`super::Gateway`]'s state for the admin endpoint.
pub(crate) struct GatewayProbe {
    pub(crate) stats: Arc<Stats>,
    pub(crate) sequencer: Arc<Sequencer>,
    pub(crate) streams: Arc<OpenStreams>,
    pub(crate) counts: Arc<SharedCounts>,
    /// Each event loop's way in, for its backlog (deliveries and bytes waiting).
    pub(crate) loops: Vec<LoopHandle>,
    pub(crate) liveness: Arc<Liveness>,
    pub(crate) serving: Arc<Serving>,
    /// `None` for a gateway that does not register (tests, demos): then ready means not draining.
    pub(crate) registration: Option<Arc<RegistrationState>>,
}

impl Probe for GatewayProbe {
    fn metrics(&self, out: &mut Exposition) {
        let s = self.stats.snapshot();
        let version = env!("CARGO_PKG_VERSION");
        out.gauge(
            "push_manager_node_build_info",
            "Always 1; the version is its label.",
            &[(&[("version", version)], 1.0)],
        );
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        out.gauge(
            "push_manager_node_draining",
            "1 once shutdown has begun (health NOT_SERVING).",
            &[(&[], flag(self.serving.is_draining()))],
        );
        if let Some(reg) = &self.registration {
            out.gauge(
                "push_manager_node_registered",
                "1 while the node's key is in etcd under a live lease.",
                &[(&[], flag(reg.is_registered()))],
            );
            out.counter(
                "push_manager_node_registrations_total",
                "Successful registrations in etcd; more than 1 means it registered again.",
                &[(&[], reg.registrations())],
            );
        }
        out.gauge(
            "push_manager_node_connections_open",
            "WebSocket connections past the handshake.",
            &[(&[], s.connections_open as f64)],
        );
        out.gauge(
            "push_manager_node_connections_pending_auth",
            "Open connections still owing their token; they receive nothing until they authenticate.",
            &[(&[], s.connections_pending_auth as f64)],
        );
        out.gauge(
            "push_manager_node_connections_held",
            "Sockets held (handshaking, open, closing); --max-connections bounds it.",
            &[(&[], s.connections_held as f64)],
        );
        out.counter(
            "push_manager_node_connections_accepted_total",
            "TCP connections accepted on the WebSocket port.",
            &[(&[], s.accepted)],
        );
        out.counter(
            "push_manager_node_connections_refused_total",
            "Connections refused before the upgrade, by reason.",
            &[
                (&[("reason", "limit")], s.refused_max_connections),
                (&[("reason", "origin")], s.refused_origin),
                (&[("reason", "auth")], s.refused_token),
                (&[("reason", "bad_handshake")], s.http_rejected),
                (&[("reason", "tls")], s.tls_rejected),
                (&[("reason", "handshake_timeout")], s.closed_handshake_timeout),
                (&[("reason", "unserved")], s.dropped_unserved),
            ],
        );
        out.counter(
            "push_manager_node_connections_closed_total",
            "Open connections closed by the node, by reason.",
            &[
                (&[("reason", "slow_consumer")], s.closed_slow),
                (&[("reason", "timeout")], s.closed_timeout),
                (&[("reason", "bad_input")], s.closed_bad_input),
                (&[("reason", "auth")], s.closed_auth),
                (&[("reason", "token_expired")], s.closed_expired),
                (&[("reason", "shutdown")], s.closed_shutdown),
            ],
        );
        let (topics, subscriptions) = self.counts.topics.totals();
        out.gauge("push_manager_node_topics", "Topics with at least one subscriber.", &[(&[], topics as f64)]);
        out.gauge(
            "push_manager_node_subscriptions",
            "Subscriptions over all topics and connections.",
            &[(&[], subscriptions as f64)],
        );
        let (users, _) = self.counts.users.totals();
        out.gauge("push_manager_node_users", "Users with at least one open connection.", &[(&[], users as f64)]);
        out.counter(
            "push_manager_node_messages_received_total",
            "Messages handed to the hub, by kind: broadcast (to a topic) or direct (to users).",
            &[
                (&[("kind", "broadcast")], s.messages_received - s.direct_received.min(s.messages_received)),
                (&[("kind", "direct")], s.direct_received),
            ],
        );
        out.counter(
            "push_manager_node_frames_sent_total",
            "Text frames handed to connections.",
            &[(&[], s.frames_sent)],
        );
        out.counter(
            "push_manager_node_socket_writes_total",
            "write calls that reached client sockets; frames_sent over this is frames per syscall.",
            &[(&[], s.socket_writes)],
        );
        out.counter(
            "push_manager_node_inline_batches_total",
            "Batches written to an idle event loop's connections by the publishing thread, not handed to the loop.",
            &[(&[], s.inline_batches)],
        );
        out.counter(
            "push_manager_node_bytes_sent_total",
            "WebSocket bytes (frames with headers, before TLS) written to client sockets.",
            &[(&[], s.bytes_sent)],
        );
        let latency = self.loops.iter().map(|l| l.delivery_latency_us.snapshot()).reduce(|mut all, one| {
            all.merge(&one);
            all
        });
        if let Some(latency) = latency {
            out.histogram(
                "push_manager_node_delivery_latency_seconds",
                "From the hub taking a broadcast off its RPC to the event loop's writes of its frames.",
                1e-6,
                &[(&[], &latency)],
            );
        }
        out.counter(
            "push_manager_node_broadcasts_refused_busy_total",
            "ConnectNode calls refused RESOURCE_EXHAUSTED because an event loop's backlog was full.",
            &[(&[], s.refused_busy)],
        );
        out.counter(
            "push_manager_node_subscribes_refused_total",
            "Subscribe commands refused because the token does not grant the topic.",
            &[(&[], s.refused_topics)],
        );
        out.counter(
            "push_manager_node_sequenced_total",
            "Sequenced messages by what the reorder stage did: held behind a gap, duplicate, skipped.",
            &[
                (&[("outcome", "held")], s.held_messages),
                (&[("outcome", "duplicate")], s.duplicate_messages),
                (&[("outcome", "skipped")], s.skipped_messages),
            ],
        );
        out.gauge(
            "push_manager_node_held_messages",
            "Sequenced messages waiting behind a gap now.",
            &[(&[], self.sequencer.held_now() as f64)],
        );
        out.gauge(
            "push_manager_node_batch_streams_open",
            "BroadcastBatchStreams open now: push-manager keeps one per worker while it sends here.",
            &[(&[], self.streams.count() as f64)],
        );
        out.counter(
            "push_manager_node_batch_streams_opened_total",
            "BroadcastBatchStreams opened: against the open ones, how often senders had to open new ones.",
            &[(&[], s.batch_streams_opened)],
        );
        let names: Vec<String> = (0..self.loops.len()).map(|n| n.to_string()).collect();
        let backlog: Vec<_> = self.loops.iter().map(|l| l.backlog.broadcasts.load(Ordering::Relaxed) as f64).collect();
        let bytes: Vec<_> = self.loops.iter().map(|l| l.backlog.bytes.load(Ordering::Relaxed) as f64).collect();
        let labels: Vec<[(&str, &str); 1]> = names.iter().map(|n| [("loop", n.as_str())]).collect();
        let samples = |values: &[f64]| -> Vec<_> { labels.iter().zip(values).map(|(l, v)| (&l[..], *v)).collect() };
        out.gauge("push_manager_node_loop_backlog", "Broadcasts waiting in an event loop's inbox.", &samples(&backlog));
        out.gauge(
            "push_manager_node_loop_backlog_bytes",
            "Frame bytes waiting in an event loop's inbox.",
            &samples(&bytes),
        );
    }

    fn health(&self) -> Result<(), String> {
        let ended = self.liveness.ended();
        if ended.is_empty() {
            Ok(())
        } else {
            Err(format!("thread(s) stopped: {}", ended.join(", ")))
        }
    }

    fn readiness(&self) -> Result<(), String> {
        if self.serving.is_draining() {
            return Err("draining: deregistered, delivering what push-manager still sends".into());
        }
        match &self.registration {
            Some(reg) if !reg.is_registered() => Err("not registered in etcd (yet)".into()),
            _ => Ok(()),
        }
    }
}
