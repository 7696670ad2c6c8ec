//! Counters a connect-node keeps so operators and tests can see what it did with its clients
//! and messages without reading logs. Plain relaxed atomics: each is independent.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters shared by the accept thread, the event loops and the hub.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) connections_open: AtomicU64,
    pub(crate) connections_pending_auth: AtomicU64,
    pub(crate) connections_held: AtomicU64,
    pub(crate) accepted: AtomicU64,
    pub(crate) refused_max_connections: AtomicU64,
    pub(crate) dropped_unserved: AtomicU64,
    pub(crate) closed_handshake_timeout: AtomicU64,
    pub(crate) closed_slow: AtomicU64,
    pub(crate) closed_timeout: AtomicU64,
    pub(crate) closed_bad_input: AtomicU64,
    pub(crate) http_rejected: AtomicU64,
    pub(crate) tls_rejected: AtomicU64,
    pub(crate) messages_received: AtomicU64,
    pub(crate) direct_received: AtomicU64,
    pub(crate) frames_sent: AtomicU64,
    pub(crate) refused_busy: AtomicU64,
    pub(crate) refused_origin: AtomicU64,
    pub(crate) refused_token: AtomicU64,
    pub(crate) refused_topics: AtomicU64,
    pub(crate) closed_auth: AtomicU64,
    pub(crate) closed_expired: AtomicU64,
    pub(crate) held_messages: AtomicU64,
    pub(crate) duplicate_messages: AtomicU64,
    pub(crate) skipped_messages: AtomicU64,
    pub(crate) socket_writes: AtomicU64,
    pub(crate) inline_batches: AtomicU64,
    pub(crate) batch_streams_opened: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) closed_shutdown: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// WebSocket connections past the handshake and not yet closing (a gauge).
    pub connections_open: u64,
    /// Of those, connections still owing their token (`--ws-auth required`, no `?token=`):
    /// they receive nothing until they authenticate (a gauge).
    pub connections_pending_auth: u64,
    /// Sockets the event loops hold: handshaking, open and closing; what `max_connections`
    /// bounds (a gauge).
    pub connections_held: u64,
    /// TCP connections accepted on the WebSocket port (handshake not yet done), refused ones
    /// included.
    pub accepted: u64,
    /// Connections answered HTTP 503 and closed because `max_connections` sockets were held.
    pub refused_max_connections: u64,
    /// Accepted sockets closed without an answer because no event loop could take them (the
    /// node was stopping, or the OS refused to register or duplicate the socket); each is
    /// logged.
    pub dropped_unserved: u64,
    /// Sockets closed because their handshake did not finish within `handshake_timeout`.
    pub closed_handshake_timeout: u64,
    /// Connections closed with 4000 because their outgoing buffer would overflow.
    pub closed_slow: u64,
    /// Connections dropped because nothing arrived from them for `pong_timeout`.
    pub closed_timeout: u64,
    /// Connections closed for a bad command, topic, frame type or frame size.
    pub closed_bad_input: u64,
    /// Sockets answered with an HTTP error (or closed) instead of upgraded: plain HTTP, wrong
    /// path, bad query topics, malformed requests.
    pub http_rejected: u64,
    /// Sockets on a `wss://` endpoint dropped because their TLS handshake failed: clients
    /// speaking plaintext (HTTP, `ws://`) or garbage, or refusing the node's certificate.
    pub tls_rejected: u64,
    /// Broadcasts handed to the hub (gRPC or direct `publish`), pushes to users included.
    pub messages_received: u64,
    /// Of `messages_received`, the pushes to users (messages carrying `user_ids`).
    pub direct_received: u64,
    /// Text frames handed to connections: one message (or direct) frame per broadcast per
    /// matching connection, plus the acks of subscribe/unsubscribe commands.
    pub frames_sent: u64,
    /// Broadcast RPCs refused with RESOURCE_EXHAUSTED because an event loop's backlog was at
    /// `max_loop_backlog` deliveries or `max_loop_backlog_bytes`.
    pub refused_busy: u64,
    /// Upgrades answered HTTP 403 for their `Origin` (`--allowed-origins`, `--require-origin`).
    pub refused_origin: u64,
    /// Upgrades answered HTTP 401/403 for their `?token=`: missing where `?topic=` needs it,
    /// bad, expired, or not granting a `?topic=`.
    pub refused_token: u64,
    /// Subscribe commands refused with an error frame because the token does not grant a topic.
    pub refused_topics: u64,
    /// Connections closed with 4001: a bad token in `auth`/`refresh`, a refresh for another
    /// user, a command before `auth`, or no `auth` within `--ws-auth-timeout`.
    pub closed_auth: u64,
    /// Connections closed with 4002: their token expired without a `refresh`.
    pub closed_expired: u64,
    /// Sequenced messages that arrived ahead of a gap in their sender's order and were held
    /// until it filled or was skipped.
    pub held_messages: u64,
    /// Sequenced messages acknowledged without being delivered: already delivered or held (a
    /// retry), or part of a gap that had been skipped.
    pub duplicate_messages: u64,
    /// Sequence numbers given up on: gaps skipped because the sender gave up on them, they
    /// stayed open for `reorder_hold`, or `reorder_hold_messages` waited behind them.
    pub skipped_messages: u64,
    /// Sequenced messages waiting behind a gap right now (a gauge).
    pub held_now: u64,
    /// `BroadcastBatchStream`s open now: push-manager keeps one per worker while it sends to
    /// this node (a gauge).
    pub batch_streams_open: u64,
    /// `BroadcastBatchStream`s served since the start: against `batch_streams_open`, how often
    /// senders had to open new ones (after an error, or when they restarted).
    pub batch_streams_opened: u64,
    /// `write` calls that reached a WebSocket client's socket (on `wss://`, vectored writes of
    /// TLS records): against `frames_sent`, how many frames share a syscall.
    pub socket_writes: u64,
    /// Batches (a unary broadcast is a batch of one) written to an event loop's connections by
    /// the thread that published them, because the loop was asleep with nothing to do and the
    /// batch was for a few of its connections; the others go through the loops' inboxes.
    pub inline_batches: u64,
    /// WebSocket bytes (frames with their headers, before any TLS) handed to client sockets.
    pub bytes_sent: u64,
    /// Open connections closed with 1001 because the node was shutting down.
    pub closed_shutdown: u64,
}

impl Stats {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub(crate) fn dec(counter: &AtomicU64) {
        counter.fetch_sub(1, Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            connections_open: self.connections_open.load(Relaxed),
            connections_pending_auth: self.connections_pending_auth.load(Relaxed),
            connections_held: self.connections_held.load(Relaxed),
            accepted: self.accepted.load(Relaxed),
            refused_max_connections: self.refused_max_connections.load(Relaxed),
            dropped_unserved: self.dropped_unserved.load(Relaxed),
            closed_handshake_timeout: self.closed_handshake_timeout.load(Relaxed),
            closed_slow: self.closed_slow.load(Relaxed),
            closed_timeout: self.closed_timeout.load(Relaxed),
            closed_bad_input: self.closed_bad_input.load(Relaxed),
            http_rejected: self.http_rejected.load(Relaxed),
            tls_rejected: self.tls_rejected.load(Relaxed),
            messages_received: self.messages_received.load(Relaxed),
            direct_received: self.direct_received.load(Relaxed),
            frames_sent: self.frames_sent.load(Relaxed),
            refused_busy: self.refused_busy.load(Relaxed),
            refused_origin: self.refused_origin.load(Relaxed),
            refused_token: self.refused_token.load(Relaxed),
            refused_topics: self.refused_topics.load(Relaxed),
            closed_auth: self.closed_auth.load(Relaxed),
            closed_expired: self.closed_expired.load(Relaxed),
            held_messages: self.held_messages.load(Relaxed),
            duplicate_messages: self.duplicate_messages.load(Relaxed),
            skipped_messages: self.skipped_messages.load(Relaxed),
            // Kept by the sequencer and the gRPC service, not here: filled in by `Gateway::stats`.
            held_now: 0,
            batch_streams_open: 0,
            batch_streams_opened: self.batch_streams_opened.load(Relaxed),
            socket_writes: self.socket_writes.load(Relaxed),
            inline_batches: self.inline_batches.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            closed_shutdown: self.closed_shutdown.load(Relaxed),
        }
    }
}
