//! Registration: a role announces itself in etcd as one or more records (a connect-node its
//! gRPC address and its WebSocket URL, a push-manager instance its addresses) under one lease
//! it keeps alive. The `etcd-register` thread keeps them so whatever happens to etcd: it
//! registers in the background while etcd cannot be reached (a role starts and serves without
//! etcd), registers again under a new lease when the lease is lost (etcd unreachable for longer
//! than the TTL, or the lease revoked behind our back), and puts a record back under the live
//! lease when its key is deleted or overwritten, all with backoff and a log line for each change
//! of state. Deregistering revokes the lease, which deletes every record at once, so watchers
//! see the role gone at once rather than after the TTL.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{at, never, select, tick, Receiver};
use log::{debug, info, warn};

use crate::etcd::{self, KeepAlive, KeyValue, LeaseLost};
use crate::thread::StoppableThread;

/// How often the role reads its own keys back, to restore it if it was deleted or overwritten.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// First wait before registering again after a failure; doubled up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One key and the value kept there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The full key, e.g. `<prefix><node-id>`.
    pub key: String,
    pub value: String,
    /// An advisory record (a node's WebSocket URL): if etcd refuses it for good (a role without
    /// rights on its prefix), the role registers and serves without it, and says so once.
    pub optional: bool,
}

impl Record {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Record {
        Record { key: key.into(), value: value.into(), optional: false }
    }

    /// See [`Record::optional`].
    pub fn optional(key: impl Into<String>, value: impl Into<String>) -> Record {
        Record { optional: true, ..Record::new(key, value) }
    }
}

/// What a role registers, and for how long.
#[derive(Clone, Debug)]
pub struct RegistrationConfig {
    /// The records, all under one lease; the first names the registration in log lines.
    pub records: Vec<Record>,
    /// Lease TTL: how long the records outlive a role that died without deregistering.
    pub ttl: Duration,
}

impl RegistrationConfig {
    /// The key log lines name the registration by.
    fn name(&self) -> &str {
        self.records.first().map_or("(nothing)", |r| r.key.as_str())
    }

    /// `key = value` for each record, for a log line.
    fn describe(&self) -> String {
        self.records.iter().map(|r| format!("{} = {}", r.key, r.value)).collect::<Vec<_>>().join(", ")
    }
}

/// Whether the role is registered now, and how often it registered: what the admin endpoint
/// reports, kept by the `etcd-register` thread.
#[derive(Debug, Default)]
pub struct RegistrationState {
    registered: AtomicBool,
    registrations: AtomicU64,
}

impl RegistrationState {
    /// Whether the records are in etcd under a live lease, as far as the thread knows.
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Relaxed)
    }

    /// Successful registrations, the first included: more than one means it registered again.
    pub fn registrations(&self) -> u64 {
        self.registrations.load(Ordering::Relaxed)
    }

    fn set(&self, keep_alive: Option<&KeepAlive>) {
        if keep_alive.is_some() {
            self.registrations.fetch_add(1, Ordering::Relaxed);
        }
        self.registered.store(keep_alive.is_some(), Ordering::Relaxed);
    }
}

/// A registration kept alive by its thread; dropping it deregisters.
pub struct Registration {
    client: etcd::Client,
    state: Arc<RegistrationState>,
    /// `etcd-register`; ends with the keep-alive it holds, if any, for us to revoke.
    thread: StoppableThread<Option<KeepAlive>>,
}

/// Grants a lease, puts every record under it, and keeps the lease alive. Returns with it the
/// keys of the optional records etcd refused.
fn register(client: &etcd::Client, config: &RegistrationConfig) -> etcd::Result<(KeepAlive, Vec<String>)> {
    let lease = client.grant(config.ttl)?;
    let mut refused = Vec::new();
    for record in &config.records {
        match client.put(&record.key, record.value.as_bytes(), Some(lease.id)) {
            Ok(_) => {}
            Err(e) if record.optional && !is_transient(&e) => {
                warn!("cannot write {} ({e}); registering without it", record.key);
                refused.push(record.key.clone());
            }
            Err(e) => {
                // Best effort: the lease (and what was put under it) would expire by itself anyway.
                let _ = client.revoke(lease.id);
                return Err(e);
            }
        }
    }
    Ok((client.keep_alive(lease)?, refused))
}

impl Registration {
    /// Registers once, so that the role is discoverable when this returns if etcd is up; if
    /// etcd cannot be reached, says so and goes on registering in the background.
    ///
    /// Fails only when etcd refuses the registration for good (a request it will never
    /// accept, such as one without the rights to write the key), or with
    /// [`etcd::Error::Spawn`] naming the thread that could not start (the lease then expires by
    /// itself).
    pub fn start(client: etcd::Client, config: RegistrationConfig) -> etcd::Result<Registration> {
        let (first, refused) = match register(&client, &config) {
            Ok((keep_alive, refused)) => {
                info!("registered {} (lease {:x}, ttl {:?})", config.describe(), keep_alive.lease().id, config.ttl);
                (Some(keep_alive), refused)
            }
            Err(e) if is_transient(&e) => {
                warn!("cannot register {} yet ({e}); serving unregistered, retrying in the background", config.name());
                (None, Vec::new())
            }
            Err(e) => return Err(e),
        };
        let state = Arc::new(RegistrationState::default());
        state.set(first.as_ref());
        let keeper = Keeper { client: client.clone(), config, state: state.clone(), refused };
        let thread = StoppableThread::spawn("etcd-register", move |stop| keeper.run(first, stop))?;
        Ok(Registration { client, state, thread })
    }

    /// Whether the role is registered now and how often it registered.
    pub fn state(&self) -> Arc<RegistrationState> {
        self.state.clone()
    }

    /// Idempotent: stops re-registering and revokes the lease, which deletes the records now.
    pub fn deregister(&mut self) {
        // `None`: deregistered before, never registered, registering again was failing, or the
        // thread panicked (logged by the handle); there is no lease to revoke.
        let ended = self.thread.shutdown();
        self.state.set(None);
        let Some(Some(mut keep_alive)) = ended else { return };
        let id = keep_alive.lease().id;
        keep_alive.shutdown();
        match self.client.revoke(id) {
            Ok(()) => info!("deregistered (lease {id:x} revoked)"),
            Err(e) => warn!("could not revoke lease {id:x} ({e}); the records expire with its TTL"),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.deregister();
    }
}

/// Whether registering may work later. A lease that vanished between grant and put is as
/// transient as an unreachable etcd.
fn is_transient(e: &etcd::Error) -> bool {
    e.is_retryable() || matches!(e, etcd::Error::LeaseNotFound(_))
}

/// The body of `etcd-register`.
struct Keeper {
    client: etcd::Client,
    config: RegistrationConfig,
    state: Arc<RegistrationState>,
    /// Optional records etcd refused under the current lease: not read back every second (each
    /// check would only be refused again), tried again with the next registration.
    refused: Vec<String>,
}

impl Keeper {
    /// Runs until `stop` disconnects; returns the live keep-alive (if any) so the caller can
    /// revoke it.
    fn run(mut self, first: Option<KeepAlive>, stop: Receiver<()>) -> Option<KeepAlive> {
        let mut current = first;
        let mut backoff = INITIAL_BACKOFF;
        // A deadline, not a fresh timer per turn: the checks in between must not postpone it.
        let mut retry_at = Instant::now() + backoff;
        let checks = tick(CHECK_INTERVAL);
        loop {
            let lost = current.as_ref().map_or(never(), |k| k.lost().clone());
            let retry = if current.is_some() { never() } else { at(retry_at) };
            let lease_gone = select! {
                recv(stop) -> _ => return current,
                recv(lost) -> why => {
                    let why = why.map_or("keep-alive stopped".to_string(), |w| match w {
                        LeaseLost::Expired => "the lease expired".to_string(),
                        LeaseLost::Unreachable { for_ } => format!("etcd unreachable for {for_:?}"),
                    });
                    warn!("registration of {} lost ({why}); registering again", self.config.name());
                    true
                }
                recv(retry) -> _ => {
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    current = self.try_register(backoff);
                    self.state.set(current.as_ref());
                    retry_at = Instant::now() + backoff;
                    false
                }
                recv(checks) -> _ => current.as_ref().is_some_and(|k| !self.check_all(k)),
            };
            if lease_gone {
                drop(current.take()); // stops the old keep-alive thread
                self.state.set(None);
                backoff = INITIAL_BACKOFF;
                current = self.try_register(backoff);
                self.state.set(current.as_ref());
                retry_at = Instant::now() + backoff;
            }
        }
    }

    /// One attempt; a failure is logged with when the next one comes.
    fn try_register(&mut self, next_in: Duration) -> Option<KeepAlive> {
        match register(&self.client, &self.config) {
            Ok((k, refused)) => {
                info!("registered {} (lease {:x})", self.config.describe(), k.lease().id);
                self.refused = refused;
                Some(k)
            }
            Err(e) => {
                warn!("registering {} failed ({e}); unregistered, retrying in {next_in:?}", self.config.name());
                None
            }
        }
    }

    /// [`Keeper::check`] for each record etcd took; false as soon as one finds the lease gone.
    fn check_all(&self, keep_alive: &KeepAlive) -> bool {
        let mut taken = self.config.records.iter().filter(|record| !self.refused.contains(&record.key));
        taken.all(|record| self.check(record, keep_alive))
    }

    /// Reads a key back and puts its record back under our lease if anyone deleted or
    /// overwrote it. False when the lease turned out to be gone: register from scratch.
    fn check(&self, record: &Record, keep_alive: &KeepAlive) -> bool {
        let key = &record.key;
        let lease = keep_alive.lease().id;
        let found = match self.client.get(key) {
            Ok(found) => found,
            Err(e) => {
                // The keep-alive reports the lease lost if this lasts.
                debug!("cannot read {key} back ({e})");
                return true;
            }
        };
        let what = match &found {
            Some(kv) if kv.value == record.value.as_bytes() && kv.lease == lease => return true,
            None => "deleted".to_string(),
            Some(kv) => format!("overwritten with {}", describe(kv)),
        };
        match self.client.put(key, record.value.as_bytes(), Some(lease)) {
            Ok(_) => {
                warn!("registration {key} was {what}; restored it as {} under lease {lease:x}", record.value);
                true
            }
            Err(etcd::Error::LeaseNotFound(_)) => {
                warn!("registration {key} was {what} and lease {lease:x} is gone; registering again");
                false
            }
            // Refused for good, as when registering: said once then.
            Err(e) if record.optional && !is_transient(&e) => {
                debug!("{key} is {what}; etcd refuses it ({e})");
                true
            }
            Err(e) => {
                warn!("registration {key} was {what}; restoring it failed ({e}), trying again in {CHECK_INTERVAL:?}");
                true
            }
        }
    }
}

/// A key's value and lease, for a log line.
fn describe(kv: &KeyValue) -> String {
    let lease = if kv.lease == 0 { "no lease".to_string() } else { format!("lease {:x}", kv.lease) };
    format!("{:?} ({lease})", String::from_utf8_lossy(&kv.value))
}
