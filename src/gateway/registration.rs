//! Registration: a connect-node announces itself in etcd as `<prefix><node-id>` = its gRPC
//! address, under a lease it keeps alive. If the lease is lost (etcd unreachable for longer than
//! the TTL, or the lease revoked behind our back) the `etcd-register` thread registers again
//! under a new lease, retrying with backoff. Deregistering revokes the lease, so push-manager's
//! watch removes the node at once rather than after the TTL.

use std::time::Duration;

use crossbeam_channel::{after, never, select, Receiver};
use log::{info, warn};

use crate::etcd::{self, KeepAlive, LeaseLost};
use crate::thread::StoppableThread;

/// Where and how long a node registers.
#[derive(Clone, Debug)]
pub struct RegistrationConfig {
    /// The full key, `<prefix><node-id>`.
    pub key: String,
    /// The gRPC address push-manager should call.
    pub addr: String,
    /// Lease TTL: how long the key outlives a node that died without deregistering.
    pub ttl: Duration,
}

/// A live registration; dropping it deregisters.
pub struct Registration {
    client: etcd::Client,
    /// `etcd-register`; ends with the keep-alive it holds, if any, for us to revoke.
    thread: StoppableThread<Option<KeepAlive>>,
}

/// Grants a lease, puts the key under it, and keeps the lease alive.
fn register(client: &etcd::Client, config: &RegistrationConfig) -> etcd::Result<KeepAlive> {
    let lease = client.grant(config.ttl)?;
    if let Err(e) = client.put(&config.key, config.addr.as_bytes(), Some(lease.id)) {
        // Best effort: the lease would expire by itself anyway.
        let _ = client.revoke(lease.id);
        return Err(e);
    }
    client.keep_alive(lease)
}

impl Registration {
    /// Registers once (so the node is discoverable when this returns), then keeps it so.
    ///
    /// Fails like any etcd call, or with [`etcd::Error::Spawn`] naming the thread that could
    /// not start (the lease then expires by itself).
    pub fn start(client: etcd::Client, config: RegistrationConfig) -> etcd::Result<Registration> {
        let keep_alive = register(&client, &config)?;
        info!("registered {} = {} (lease {:x}, ttl {:?})", config.key, config.addr, keep_alive.lease().id, config.ttl);
        let thread_client = client.clone();
        let thread = StoppableThread::spawn("etcd-register", move |stop| {
            keep_registered(thread_client, config, keep_alive, stop)
        })?;
        Ok(Registration { client, thread })
    }

    /// Idempotent: stops re-registering and revokes the lease, which deletes the key now.
    pub fn deregister(&mut self) {
        // `None`: deregistered before, registering again was failing, or the thread panicked
        // (logged by the handle); there is no lease to revoke.
        let Some(Some(mut keep_alive)) = self.thread.shutdown() else { return };
        let id = keep_alive.lease().id;
        keep_alive.shutdown();
        match self.client.revoke(id) {
            Ok(()) => info!("deregistered (lease {id:x} revoked)"),
            Err(e) => warn!("could not revoke lease {id:x} ({e}); the key expires with its TTL"),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.deregister();
    }
}

/// Runs until `stop` disconnects; returns the live keep-alive (if any) so the caller can revoke
/// it.
fn keep_registered(
    client: etcd::Client,
    config: RegistrationConfig,
    keep_alive: KeepAlive,
    stop: Receiver<()>,
) -> Option<KeepAlive> {
    let mut current = Some(keep_alive);
    let mut backoff = Duration::from_millis(200);
    loop {
        let lost = current.as_ref().map_or(never(), |k| k.lost().clone());
        let retry = if current.is_some() { never() } else { after(backoff) };
        select! {
            recv(stop) -> _ => return current,
            recv(lost) -> why => {
                let why = why.map_or("keep-alive stopped".to_string(), |w| match w {
                    LeaseLost::Expired => "the lease expired".to_string(),
                    LeaseLost::Unreachable { for_ } => format!("etcd unreachable for {for_:?}"),
                });
                warn!("registration of {} lost ({why}); registering again", config.key);
                drop(current.take()); // stops the old keep-alive thread
                backoff = Duration::from_millis(200);
                current = try_register(&client, &config);
            }
            recv(retry) -> _ => {
                current = try_register(&client, &config);
                if current.is_none() {
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

fn try_register(client: &etcd::Client, config: &RegistrationConfig) -> Option<KeepAlive> {
    match register(client, config) {
        Ok(k) => {
            info!("registered {} again (lease {:x})", config.key, k.lease().id);
            Some(k)
        }
        Err(e) => {
            warn!("registering {} failed ({e}); retrying", config.key);
            None
        }
    }
}
