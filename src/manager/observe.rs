//! What the admin endpoint shows of a running push-manager: its metrics (`push_manager_*`),
//! health, readiness and node set, all read from the counters the fan-out and discovery keep.

use std::sync::Arc;

use serde_json::json;

use super::fanout::Fanout;
use super::node::NodeStats;
use super::server::Outcomes;
use crate::admin::{Exposition, HistogramSnapshot, Probe, Serving};
use crate::discovery;

/// Reads a [`super::Manager`]'s state for the admin endpoint; outlives nothing it reads.
pub(crate) struct ManagerProbe {
    pub(crate) fanout: Arc<Fanout>,
    pub(crate) discovery: Arc<discovery::Status>,
    pub(crate) serving: Arc<Serving>,
    pub(crate) outcomes: Arc<Outcomes>,
}

/// A node's counters and whether it is in the node set or retiring.
fn every_node(fanout: &Fanout) -> Vec<(&'static str, NodeStats)> {
    let active = fanout.stats().into_iter().map(|n| ("active", n));
    let retiring = fanout.retiring_stats().into_iter().map(|n| ("retiring", n));
    let mut nodes: Vec<_> = active.chain(retiring).collect();
    nodes.sort_by(|a, b| (&a.1.id, a.0).cmp(&(&b.1.id, b.0)));
    nodes
}

impl Probe for ManagerProbe {
    fn metrics(&self, out: &mut Exposition) {
        let version = env!("CARGO_PKG_VERSION");
        out.gauge("push_manager_build_info", "Always 1; the version is its label.", &[(&[("version", version)], 1.0)]);
        let draining = if self.serving.is_draining() { 1.0 } else { 0.0 };
        out.gauge("push_manager_draining", "1 once shutdown has begun (health NOT_SERVING).", &[(&[], draining)]);
        let known = self.fanout.node_count() as f64;
        out.gauge("push_manager_nodes_known", "Connect-nodes in the node set.", &[(&[], known)]);
        let retiring = self.fanout.retiring_stats().len() as f64;
        out.gauge(
            "push_manager_nodes_retiring",
            "Removed connect-nodes still draining their queue.",
            &[(&[], retiring)],
        );
        let o = &self.outcomes;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        out.counter(
            "push_manager_broadcasts_total",
            "Messages callers sent (broadcasts and pushes to users, unary or streamed), by result; \
             unauthenticated counts calls and streams, whose messages are not read.",
            &[
                (&[("result", "ok")], load(&o.ok)),
                (&[("result", "invalid")], load(&o.invalid)),
                (&[("result", "unauthenticated")], load(&o.unauthenticated)),
                (&[("result", "no_nodes")], load(&o.no_nodes)),
            ],
        );
        let listings = self.discovery.listings();
        out.counter(
            "push_manager_discovery_listings_total",
            "Successful listings of the node set in etcd.",
            &[(&[], listings)],
        );
        out.counter(
            "push_manager_discovery_watch_restarts_total",
            "Times the etcd watch on the prefix broke, was compacted or canceled, and was started again.",
            &[(&[], self.discovery.watch_restarts())],
        );
        let reachable = if self.discovery.etcd_reachable() { 1.0 } else { 0.0 };
        out.gauge("push_manager_etcd_reachable", "1 if the last listing attempt reached etcd.", &[(&[], reachable)]);
        node_metrics(out, &every_node(&self.fanout));
    }

    fn health(&self) -> Result<(), String> {
        if self.discovery.is_running() {
            Ok(())
        } else {
            Err("the discovery thread stopped: the node set no longer follows etcd".into())
        }
    }

    fn readiness(&self) -> Result<(), String> {
        if self.serving.is_draining() {
            return Err("draining: shutting down, no new broadcasts".into());
        }
        if self.discovery.listings() == 0 {
            let etcd = if self.discovery.etcd_reachable() { "" } else { " (etcd unreachable)" };
            return Err(format!("the node set has not been listed from etcd yet{etcd}"));
        }
        if self.fanout.node_count() == 0 {
            return Err("no connect-node is registered in etcd".into());
        }
        Ok(())
    }

    fn nodes(&self) -> Option<serde_json::Value> {
        let nodes: Vec<_> = every_node(&self.fanout)
            .into_iter()
            .map(|(state, n)| {
                json!({
                    "id": n.id, "number": n.number, "addr": n.addr, "state": state,
                    "enqueued": n.enqueued, "dropped_full": n.dropped_full, "dropped_closing": n.dropped_closing,
                    "sent": n.sent, "failed": n.failed, "abandoned": n.abandoned, "retried": n.retried,
                    "rpcs": n.rpcs, "queue_depth": n.queue_depth,
                })
            })
            .collect();
        Some(json!({ "draining": self.serving.is_draining(), "nodes": nodes }))
    }
}

/// The per-node families, labelled by node id and state (a node replaced at a new address is
/// briefly both).
fn node_metrics(out: &mut Exposition, nodes: &[(&'static str, NodeStats)]) {
    let labels: Vec<[(&str, &str); 2]> =
        nodes.iter().map(|(state, n)| [("node", n.id.as_str()), ("state", *state)]).collect();
    let counter = |out: &mut Exposition, name: &str, help: &str, value: fn(&NodeStats) -> u64| {
        let samples: Vec<_> = labels.iter().zip(nodes).map(|(l, (_, n))| (&l[..], value(n))).collect();
        out.counter(name, help, &samples);
    };
    counter(out, "push_manager_enqueued_total", "Messages a node's queue accepted.", |n| n.enqueued);
    counter(out, "push_manager_sent_total", "Messages a node acknowledged.", |n| n.sent);
    counter(out, "push_manager_failed_total", "Messages given up on after the last attempt failed.", |n| n.failed);
    counter(out, "push_manager_abandoned_total", "Messages still queued at the drain deadline.", |n| n.abandoned);
    counter(out, "push_manager_retried_total", "RPC attempts to a node that were retries.", |n| n.retried);
    counter(out, "push_manager_rpcs_total", "RPC attempts to a node (a batch is one).", |n| n.rpcs);

    let dropped: Vec<([(&str, &str); 3], u64)> = nodes
        .iter()
        .flat_map(|(state, n)| {
            [("full", n.dropped_full), ("closing", n.dropped_closing)]
                .map(|(reason, v)| ([("node", n.id.as_str()), ("state", *state), ("reason", reason)], v))
        })
        .collect();
    let dropped: Vec<_> = dropped.iter().map(|(l, v)| (&l[..], *v)).collect();
    out.counter(
        "push_manager_dropped_total",
        "Messages refused by a node's queue: full (at --queue-size) or closing (node removed, shutdown).",
        &dropped,
    );

    let depth: Vec<_> = labels.iter().zip(nodes).map(|(l, (_, n))| (&l[..], n.queue_depth as f64)).collect();
    out.gauge("push_manager_queue_depth", "Messages waiting in a node's queue.", &depth);

    let histogram = |value: fn(&NodeStats) -> &HistogramSnapshot| -> Vec<_> {
        labels.iter().zip(nodes).map(|(l, (_, n))| (&l[..], value(n))).collect()
    };
    out.histogram(
        "push_manager_messages_per_rpc",
        "Messages carried by each RPC attempt to a node.",
        1.0,
        &histogram(|n| &n.batch_sizes),
    );
    out.histogram(
        "push_manager_rpc_latency_seconds",
        "Time from an RPC attempt's start to the node's answer or the failure.",
        1e-6,
        &histogram(|n| &n.rpc_latency_us),
    );
}
