//! The running node set and the fan-out of one broadcast over it.
//!
//! The set is an immutable map behind an `Arc`, swapped whole under a short write lock when
//! discovery reconciles; a broadcast clones the `Arc` under a read lock and offers the message to
//! every node with the lock released. Removed nodes move to `retiring` until their workers have
//! drained and ended; they are joined without ever blocking the discovery thread.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use log::{error, info};
use parking_lot::{Mutex, RwLock};

use super::config::Config;
use super::message::{random_instance_id, SharedMessage};
use super::node::{NodeAccess, NodeClient, NodeStats, Retries};
use crate::discovery::{diff, NodeAddrs};

type NodeMap = BTreeMap<String, Arc<NodeClient>>;

/// What happened to one broadcast.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct FanoutReport {
    pub(crate) targeted: u32,
    pub(crate) accepted: u32,
    /// Nodes whose queue refused it.
    pub(crate) dropped: Vec<String>,
}

/// The number the next node client gets, for its thread names (`n<number>-w<n>`): unique in the
/// process, so two managers in one process (tests, an embedding program) never share a name.
static NEXT_NODE_NUMBER: AtomicU32 = AtomicU32::new(1);

pub(crate) struct Fanout {
    nodes: RwLock<Arc<NodeMap>>,
    retiring: Mutex<Vec<Arc<NodeClient>>>,
    /// Serialises reconciliations (one writer at a time), never held by a broadcast.
    reconciling: Mutex<()>,
    access: Arc<NodeAccess>,
    config: Arc<Config>,
    /// This instance's random id: with a node's number, the sender id its messages are
    /// numbered under, so a restarted push-manager starts fresh sequences.
    instance: u64,
}

impl Fanout {
    pub(crate) fn new(access: Arc<NodeAccess>, config: Arc<Config>) -> Fanout {
        Fanout {
            nodes: RwLock::new(Arc::new(NodeMap::new())),
            retiring: Mutex::new(Vec::new()),
            reconciling: Mutex::new(()),
            access,
            config,
            instance: random_instance_id(),
        }
    }

    /// This instance's random id, which every sender id it uses starts with.
    pub(crate) fn instance(&self) -> u64 {
        self.instance
    }

    fn snapshot(&self) -> Arc<NodeMap> {
        self.nodes.read().clone()
    }

    pub(crate) fn node_count(&self) -> usize {
        self.nodes.read().len()
    }

    /// Offers `msg` to every node's queue without blocking.
    pub(crate) fn offer(&self, msg: &SharedMessage) -> FanoutReport {
        let nodes = self.snapshot();
        let mut report = FanoutReport { targeted: nodes.len() as u32, ..FanoutReport::default() };
        for node in nodes.values() {
            match node.offer(msg) {
                Ok(()) => report.accepted += 1,
                Err(_) => report.dropped.push(node.id().to_string()),
            }
        }
        report
    }

    /// Makes the running set match `desired`: starts new nodes, retires gone ones, replaces
    /// those whose address changed, and joins retired nodes that have finished draining.
    pub(crate) fn reconcile(&self, desired: &NodeAddrs) {
        let _one_at_a_time = self.reconciling.lock();
        let current = self.snapshot();
        let addrs: NodeAddrs = current.iter().map(|(id, n)| (id.clone(), n.addr())).collect();
        let d = diff(&addrs, desired);
        if !d.is_empty() {
            let mut next = (*current).clone();
            let mut retired = Vec::new();
            for id in &d.remove {
                info!("node {id}: no longer registered; draining and removing it");
                retired.extend(next.remove(id));
            }
            for (id, addr) in &d.replace {
                // Same node, new address: its queue and counters stay, its workers follow.
                if let Some(node) = next.get(id) {
                    node.move_to(addr);
                }
            }
            for (id, addr) in &d.add {
                // Started before the swap, without any lock held.
                let number = NEXT_NODE_NUMBER.fetch_add(1, Ordering::Relaxed);
                match NodeClient::start(self.instance, number, id, addr, &self.access, &self.config) {
                    Ok(node) => {
                        next.insert(id.clone(), Arc::new(node));
                    }
                    Err(e) => error!("node {id}: cannot start its workers ({e}); will retry on the next listing"),
                }
            }
            *self.nodes.write() = Arc::new(next);
            for node in &retired {
                node.close(self.config.drain_timeout, Retries::Stop);
            }
            self.retiring.lock().extend(retired);
        }
        self.reap();
    }

    /// Joins retired nodes whose workers have ended.
    fn reap(&self) {
        let finished: Vec<_> = {
            let mut retiring = self.retiring.lock();
            let (done, pending) = retiring.drain(..).partition(|n: &Arc<NodeClient>| n.is_finished());
            *retiring = pending;
            done
        };
        for node in finished {
            node.join();
            log_final(&node.stats());
        }
    }

    /// Counters of the registered nodes.
    pub(crate) fn stats(&self) -> Vec<NodeStats> {
        self.snapshot().values().map(|n| n.stats()).collect()
    }

    /// Counters of nodes removed but still draining.
    pub(crate) fn retiring_stats(&self) -> Vec<NodeStats> {
        self.retiring.lock().iter().map(|n| n.stats()).collect()
    }

    /// Closes every node (retries allowed until the drain deadline) and joins all workers.
    pub(crate) fn shutdown(&self) {
        let _one_at_a_time = self.reconciling.lock();
        let nodes = std::mem::take(&mut *self.nodes.write());
        let retiring = std::mem::take(&mut *self.retiring.lock());
        for node in nodes.values() {
            node.close(self.config.drain_timeout, Retries::UntilDrained);
        }
        // Joined with no lock but `reconciling` held, which broadcasts never take.
        for node in nodes.values().chain(&retiring) {
            node.join();
            log_final(&node.stats());
        }
    }
}

fn log_final(s: &NodeStats) {
    info!(
        "node {}: stopped; enqueued {} sent {} failed {} abandoned {} dropped (full) {} dropped (closing) {} retried {}",
        s.id, s.enqueued, s.sent, s.failed, s.abandoned, s.dropped_full, s.dropped_closing, s.retried
    );
}
