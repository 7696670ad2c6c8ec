//! Discovery: which connect-nodes exist, read from etcd.
//!
//! The `discovery` thread lists the prefix at start and then every poll interval, and watches it
//! from the listed revision so a change is applied within a moment: any watch event just wakes
//! the thread to list again, so the periodic list stays the single source of truth (it also
//! covers a compacted or lost watch). While etcd is unreachable the last known set is kept; the
//! thread logs once when etcd goes away and once when it comes back. It knows nothing of node
//! clients: it hands each listing to a callback.

mod diff;
mod record;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{after, never, select, Receiver};
use log::{debug, info, warn};

pub use diff::{diff, Diff, NodeAddrs};
pub use record::{parse, BadRecord, NodeRecord};

use crate::etcd::{self, WatchEvent, Watcher};
use crate::thread::{SpawnError, StoppableThread};

/// One read of the prefix.
#[derive(Debug, Default)]
pub struct NodeListing {
    pub nodes: NodeAddrs,
    /// Keys under the prefix that are not node records.
    pub bad: Vec<BadRecord>,
    /// The etcd revision the listing reflects.
    pub revision: i64,
}

/// Lists and parses every node record under `prefix`. Two ids at one address are one node to
/// call: the first id (in key order) keeps it, the others are listed as bad, so no node gets
/// every message twice.
pub fn list(client: &etcd::Client, prefix: &str) -> etcd::Result<NodeListing> {
    let raw = client.get_prefix(prefix)?;
    let mut listing = NodeListing { revision: raw.revision, ..NodeListing::default() };
    let mut owners: HashMap<String, String> = HashMap::new();
    for kv in raw.kvs {
        let record = match parse(prefix, &kv.key, &kv.value) {
            Ok(record) => record,
            Err(bad) => {
                listing.bad.push(bad);
                continue;
            }
        };
        if let Some(owner) = owners.get(&record.addr) {
            let reason = format!("node {} already has address {}; one client per address", owner, record.addr);
            listing.bad.push(BadRecord { key: kv.key, reason });
            continue;
        }
        owners.insert(record.addr.clone(), record.id.clone());
        listing.nodes.insert(record.id, record.addr);
    }
    Ok(listing)
}

#[derive(Clone, Debug)]
pub struct Config {
    pub prefix: String,
    pub poll_interval: Duration,
    pub watch: bool,
}

/// The `discovery` thread's handle; dropping it stops and joins the thread.
pub struct Discovery {
    thread: StoppableThread,
    status: Arc<Status>,
}

/// What the thread reports about itself; shared with whoever wants to read it.
#[derive(Debug)]
pub struct Status {
    etcd_reachable: AtomicBool,
    listings: AtomicU64,
    watch_restarts: AtomicU64,
    /// Why the last listing failed, when etcd answered but the listing did not work (a refused
    /// user, a permission, a compaction); `None` after a success or when etcd is unreachable.
    listing_error: parking_lot::Mutex<Option<String>>,
    /// Set when the thread's body ends, however it ends (a panic included).
    ended: AtomicBool,
}

impl Status {
    /// Whether the last listing attempt reached etcd.
    pub fn etcd_reachable(&self) -> bool {
        self.etcd_reachable.load(Ordering::Relaxed)
    }

    /// Successful listings so far (each one applied through the callback).
    pub fn listings(&self) -> u64 {
        self.listings.load(Ordering::Relaxed)
    }

    /// Times the watch broke (etcd unreachable), was compacted or canceled, or ended, and was
    /// started again: a number that climbs says the watch does not hold and changes wait for the
    /// next poll.
    pub fn watch_restarts(&self) -> u64 {
        self.watch_restarts.load(Ordering::Relaxed)
    }

    /// Why listing the prefix fails although etcd answers, if it does.
    pub fn listing_error(&self) -> Option<String> {
        self.listing_error.lock().clone()
    }

    /// Whether the thread is still at work: what [`Discovery::is_running`] says, for those who
    /// hold only the status.
    pub fn is_running(&self) -> bool {
        !self.ended.load(Ordering::Relaxed)
    }
}

/// Marks the status ended when dropped: at the end of the thread's body, or during a panic's
/// unwinding.
struct EndsWith(Arc<Status>);

impl Drop for EndsWith {
    fn drop(&mut self) {
        self.0.ended.store(true, Ordering::Relaxed);
    }
}

impl Discovery {
    /// Starts the thread; `on_list` is called on it with every successful listing's node set.
    pub fn start<F>(client: etcd::Client, config: Config, on_list: F) -> Result<Discovery, SpawnError>
    where
        F: FnMut(&NodeAddrs) + Send + 'static,
    {
        let status = Arc::new(Status {
            etcd_reachable: AtomicBool::new(true),
            listings: AtomicU64::new(0),
            watch_restarts: AtomicU64::new(0),
            listing_error: Default::default(),
            ended: AtomicBool::new(false),
        });
        let shared = status.clone();
        let thread = StoppableThread::spawn("discovery", move |shutdown| {
            let _ends = EndsWith(shared.clone());
            let poller = Poller {
                client,
                config,
                on_list: Box::new(on_list),
                shutdown,
                status: shared,
                warned: HashMap::new(),
                watcher: None,
                failure: None,
            };
            poller.run()
        })?;
        Ok(Discovery { thread, status })
    }

    /// The thread's status, readable from anywhere while it runs.
    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    /// Whether the thread is still at work. It only ends when shut down, so `false` before that
    /// means it died (a panic, logged): the node set is frozen and whoever owns it must not
    /// carry on as if it were not.
    pub fn is_running(&self) -> bool {
        !self.thread.is_finished()
    }

    /// Idempotent: stops the thread (and its watcher) and joins it; dropping the handle does
    /// the same.
    pub fn shutdown(&mut self) {
        self.thread.shutdown();
    }
}

/// Retry delay after a failed listing: short at first so a restarted etcd is seen quickly.
const FIRST_RETRY: Duration = Duration::from_millis(200);

struct Poller {
    client: etcd::Client,
    config: Config,
    on_list: Box<dyn FnMut(&NodeAddrs) + Send>,
    shutdown: Receiver<()>,
    status: Arc<Status>,
    /// Bad keys already warned about, with the reason we gave.
    warned: HashMap<String, String>,
    watcher: Option<Watcher>,
    /// Why the last listing failed; `None` after a success.
    failure: Option<Failure>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// No etcd endpoint answered.
    Unreachable,
    /// etcd answered, but the listing failed (e.g. a compacted revision, a page too large).
    Listing,
}

impl Poller {
    fn run(mut self) {
        let mut retry = FIRST_RETRY;
        loop {
            let next_list = match self.list_once() {
                Ok(()) => {
                    retry = FIRST_RETRY;
                    Instant::now() + self.config.poll_interval
                }
                Err(()) => {
                    let at = Instant::now() + retry.min(self.config.poll_interval);
                    retry = (retry * 2).min(self.config.poll_interval);
                    at
                }
            };
            if !self.wait(next_list) {
                return;
            }
        }
    }

    /// Waits until `deadline` or until a watch event says the set changed.
    /// Returns false on shutdown.
    fn wait(&mut self, deadline: Instant) -> bool {
        loop {
            let events = self.watcher.as_ref().map_or(never(), |w| w.events().clone());
            let timeout = after(deadline.saturating_duration_since(Instant::now()));
            select! {
                recv(self.shutdown) -> _ => return false,
                recv(timeout) -> _ => return true,
                recv(events) -> event => match event {
                    Ok(WatchEvent::Put(_)) | Ok(WatchEvent::Delete { .. }) | Ok(WatchEvent::Connected) => {
                        // Coalesce a burst of events into one listing.
                        while events.try_recv().is_ok() {}
                        return true;
                    }
                    Ok(WatchEvent::Disconnected { error }) => {
                        debug!("watch on {} interrupted: {error}", self.config.prefix);
                        // The watcher resumes the stream by itself.
                        self.status.watch_restarts.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(WatchEvent::Compacted { compact_revision }) => {
                        debug!("watch on {} compacted at {compact_revision}; listing again", self.config.prefix);
                        return self.restart_watch();
                    }
                    Ok(WatchEvent::Canceled { reason }) => {
                        info!("etcd canceled the watch on {}: {reason}; listing again", self.config.prefix);
                        return self.restart_watch();
                    }
                    Err(_) => return self.restart_watch(),
                },
            }
        }
    }

    /// Drops the watcher so the next listing starts another; returns true (list now).
    fn restart_watch(&mut self) -> bool {
        self.watcher = None;
        self.status.watch_restarts.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn list_once(&mut self) -> Result<(), ()> {
        let listing = match list(&self.client, &self.config.prefix) {
            Ok(l) => l,
            Err(e) => {
                // Unreachable and "etcd answered, but the listing fails" call for different
                // fixes: say which, once per change.
                let failure = if matches!(e, etcd::Error::Unavailable { .. } | etcd::Error::Timeout(_)) {
                    Failure::Unreachable
                } else {
                    Failure::Listing
                };
                self.status.etcd_reachable.store(failure == Failure::Listing, Ordering::Relaxed);
                *self.status.listing_error.lock() = (failure == Failure::Listing).then(|| e.to_string());
                if self.failure.replace(failure) != Some(failure) {
                    match failure {
                        Failure::Unreachable => {
                            warn!("etcd unreachable ({e}); keeping the last known connect-nodes and retrying")
                        }
                        Failure::Listing => warn!(
                            "listing {:?} in etcd failed ({e}); keeping the last known connect-nodes and retrying",
                            self.config.prefix
                        ),
                    }
                }
                return Err(());
            }
        };
        self.status.etcd_reachable.store(true, Ordering::Relaxed);
        *self.status.listing_error.lock() = None;
        if self.failure.take().is_some() {
            info!("listing {:?} works again; {} connect-node(s) registered", self.config.prefix, listing.nodes.len());
        }
        self.warn_bad_records(&listing.bad);
        (self.on_list)(&listing.nodes);
        self.status.listings.fetch_add(1, Ordering::Relaxed);
        if self.config.watch && self.watcher.is_none() {
            match self.client.watch_prefix(&self.config.prefix, listing.revision + 1) {
                Ok(w) => self.watcher = Some(w),
                Err(e) => debug!("cannot watch {} yet: {e}", self.config.prefix),
            }
        }
        Ok(())
    }

    /// One warning per bad key (again only if its problem changes).
    fn warn_bad_records(&mut self, bad: &[BadRecord]) {
        self.warned.retain(|key, _| bad.iter().any(|b| &b.key == key));
        for b in bad {
            if self.warned.get(&b.key) != Some(&b.reason) {
                warn!("{b}");
                self.warned.insert(b.key.clone(), b.reason.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::InProcessEtcd;

    #[test]
    fn a_dead_discovery_thread_shows_as_not_running() {
        let etcd = InProcessEtcd::start().unwrap();
        let client = etcd::Client::connect(etcd::Config {
            endpoints: vec![etcd.endpoint()],
            timeout: Duration::from_secs(2),
            ..etcd::Config::default()
        })
        .unwrap();
        let config = Config { prefix: "/t/".into(), poll_interval: Duration::from_secs(3600), watch: false };
        let discovery = Discovery::start(client, config, |_| panic!("reconciling failed")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while discovery.is_running() {
            assert!(Instant::now() < deadline, "the thread should have died on the first listing");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
