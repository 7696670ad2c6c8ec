//! Keeping a lease alive: a thread renews it every TTL/3 and says so when it is lost, because
//! whoever registered keys under it must re-register (a lost lease took its keys with it).

use std::time::{Duration, Instant};

use crossbeam_channel::{after, bounded, select, Receiver, Sender};
use futures::executor::block_on;
use futures::{SinkExt, StreamExt};
use grpcio::WriteFlags;

use super::{Client, Error, Lease, Result};
use crate::proto::rpc::LeaseKeepAliveRequest;
use crate::proto::rpc_grpc::LeaseClient;
use crate::thread::StoppableThread;

/// How soon a failed renewal is tried again (capped by the time the lease has left).
const RETRY_INTERVAL: Duration = Duration::from_millis(500);
/// Renewing more often than this gains nothing and loads etcd.
const MIN_RENEW_INTERVAL: Duration = Duration::from_millis(100);

/// Why a kept-alive lease is gone; the keep-alive thread has stopped after sending it.
#[derive(Debug, Clone)]
pub enum LeaseLost {
    /// etcd says the lease no longer exists (expired or revoked).
    Expired,
    /// No renewal succeeded for a whole TTL, so etcd has (or soon will have) expired it.
    Unreachable { for_: Duration },
}

/// Handle on an `etcd-keepalive` thread. Dropping it stops and joins the thread; it does not
/// revoke the lease (call `Client::revoke` for that), which then expires after its TTL.
pub struct KeepAlive {
    lease: Lease,
    lost: Receiver<LeaseLost>,
    thread: StoppableThread,
}

impl KeepAlive {
    pub(super) fn spawn(client: Client, lease: Lease) -> Result<KeepAlive> {
        let (lost_tx, lost_rx) = bounded(1);
        let thread =
            StoppableThread::spawn("etcd-keepalive", move |stop| Renewer { client, lease, stop, lost: lost_tx }.run())?;
        Ok(KeepAlive { lease, lost: lost_rx, thread })
    }

    pub fn lease(&self) -> Lease {
        self.lease
    }

    /// Receives one `LeaseLost` if the lease is lost; nothing while it is kept alive.
    pub fn lost(&self) -> &Receiver<LeaseLost> {
        &self.lost
    }

    /// Stops renewing and joins the thread (waiting at most for one in-flight renewal, bounded
    /// by `Config::timeout`). Idempotent; dropping the handle does the same.
    pub fn shutdown(&mut self) {
        self.thread.shutdown();
    }
}

struct Renewer {
    client: Client,
    lease: Lease,
    stop: Receiver<()>,
    lost: Sender<LeaseLost>,
}

impl Renewer {
    fn run(self) {
        // Renewing at once pins the lease's expiry to a time we know, whenever it was granted.
        let mut wait = Duration::ZERO;
        let mut ttl = self.lease.ttl;
        let mut last_renewed = Instant::now();
        loop {
            select! {
                recv(self.stop) -> _ => return,
                recv(after(wait)) -> _ => {}
            }
            match renew(&self.client, self.lease.id) {
                Ok(secs) if secs > 0 => {
                    last_renewed = Instant::now();
                    ttl = Duration::from_secs(secs as u64);
                    wait = (ttl / 3).max(MIN_RENEW_INTERVAL);
                }
                Ok(_) | Err(Error::LeaseNotFound(_)) => return self.report(LeaseLost::Expired),
                Err(e) => {
                    let down_for = last_renewed.elapsed();
                    if down_for >= ttl {
                        return self.report(LeaseLost::Unreachable { for_: down_for });
                    }
                    log::warn!(
                        "renewing etcd lease {:#x} failed ({down_for:?} since last renewal): {e}",
                        self.lease.id
                    );
                    wait = RETRY_INTERVAL.min(ttl - down_for);
                }
            }
        }
    }

    fn report(&self, lost: LeaseLost) {
        log::warn!("etcd lease {:#x} lost: {lost:?}", self.lease.id);
        // The channel holds one message and this is the only one ever sent.
        let _ = self.lost.try_send(lost);
    }
}

/// One renewal: the seconds etcd says the lease has left, 0 if it is gone.
///
/// A fresh bidi stream per renewal keeps each one under the call deadline and failover; it
/// costs a stream set-up every TTL/3, which is nothing at these rates.
fn renew(client: &Client, lease_id: i64) -> Result<i64> {
    let mut req = LeaseKeepAliveRequest::default();
    req.set_ID(lease_id);
    client.with_failover(|channel, opt| {
        let (mut tx, mut rx) = LeaseClient::new(channel.clone()).lease_keep_alive_opt(opt)?;
        // Dropping tx and rx afterwards cancels the stream: nothing more is needed from it.
        block_on(async {
            tx.send((req.clone(), WriteFlags::default())).await?;
            match rx.next().await {
                Some(resp) => Ok(resp?.get_TTL()),
                None => Err(grpcio::Error::RpcFinished(None)),
            }
        })
    })
}
