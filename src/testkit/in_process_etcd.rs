//! An in-process stand-in for etcd: a gRPC server speaking the subset of the etcd v3 API that
//! our client uses (KV Range/Put/DeleteRange, Lease Grant/Revoke/KeepAlive/TimeToLive, Watch), so
//! the demo runs the very same client, discovery and registration code on a machine without the
//! `etcd` binary. Single member, in memory, no compaction, no auth: a demo fallback, not a store.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, tick, Sender};
use futures::channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};
use futures::{future, SinkExt, Stream, StreamExt};
use grpcio::{
    ChannelBuilder, DuplexSink, EnvBuilder, RequestStream, RpcContext, RpcStatus, RpcStatusCode, ServerBuilder,
    ServerCredentials, UnarySink, WriteFlags,
};
use parking_lot::Mutex;

use crate::proto::kv::{Event, Event_EventType, KeyValue};
use crate::proto::rpc::*;
use crate::proto::rpc_grpc::{create_kv, create_lease, create_watch, Kv, Lease, Watch};

/// How often expired leases are swept.
const LEASE_SWEEP: Duration = Duration::from_millis(100);

struct LeaseState {
    ttl: i64,
    deadline: Instant,
}

/// One watch stream: the range it covers and where its events go.
struct WatchSubscription {
    key: Vec<u8>,
    range_end: Vec<u8>,
    tx: UnboundedSender<WatchResponse>,
}

#[derive(Default)]
struct Store {
    revision: i64,
    kvs: BTreeMap<Vec<u8>, KeyValue>,
    leases: HashMap<i64, LeaseState>,
    next_lease: i64,
    next_watch: i64,
    /// Every event, for watches that start from an old revision (the demo's history is small).
    history: Vec<Event>,
    subscriptions: Vec<WatchSubscription>,
}

/// `key` alone, `[key, range_end)`, or everything from `key` on when `range_end` is `"\0"`.
fn in_range(k: &[u8], key: &[u8], range_end: &[u8]) -> bool {
    match range_end {
        [] => k == key,
        [0] => k >= key,
        end => k >= key && k < end,
    }
}

impl Store {
    fn header(&self) -> ResponseHeader {
        let mut h = ResponseHeader::new();
        h.set_cluster_id(1);
        h.set_member_id(1);
        h.set_revision(self.revision);
        h
    }

    fn publish(&mut self, event: Event) {
        let key = event.get_kv().get_key().to_vec();
        self.subscriptions.retain(|w| {
            if !in_range(&key, &w.key, &w.range_end) {
                return true;
            }
            let mut resp = WatchResponse::new();
            resp.set_events(vec![event.clone()].into());
            w.tx.unbounded_send(resp).is_ok()
        });
        self.history.push(event);
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>, lease: i64) {
        self.revision += 1;
        let mut kv = self.kvs.remove(&key).unwrap_or_else(|| {
            let mut kv = KeyValue::new();
            kv.set_create_revision(self.revision);
            kv
        });
        kv.set_key(key.clone());
        kv.set_value(value);
        kv.set_mod_revision(self.revision);
        kv.set_version(kv.get_version() + 1);
        kv.set_lease(lease);
        self.kvs.insert(key, kv.clone());
        let mut event = Event::new();
        event.set_field_type(Event_EventType::PUT);
        event.set_kv(kv);
        self.publish(event);
    }

    fn delete(&mut self, keys: Vec<Vec<u8>>) -> i64 {
        if keys.is_empty() {
            return 0;
        }
        self.revision += 1;
        for key in &keys {
            self.kvs.remove(key);
            let mut kv = KeyValue::new();
            kv.set_key(key.clone());
            kv.set_mod_revision(self.revision);
            let mut event = Event::new();
            event.set_field_type(Event_EventType::DELETE);
            event.set_kv(kv);
            self.publish(event);
        }
        keys.len() as i64
    }

    fn keys_in(&self, key: &[u8], range_end: &[u8]) -> Vec<Vec<u8>> {
        self.kvs.keys().filter(|k| in_range(k, key, range_end)).cloned().collect()
    }

    fn revoke(&mut self, id: i64) -> bool {
        if self.leases.remove(&id).is_none() {
            return false;
        }
        let keys = self.kvs.iter().filter(|(_, kv)| kv.get_lease() == id).map(|(k, _)| k.clone()).collect();
        self.delete(keys);
        true
    }

    fn expire(&mut self, now: Instant) {
        let expired: Vec<i64> = self.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            self.revoke(id);
        }
    }

    /// Renews lease `id`; TTL 0 in the answer tells the client the lease is gone, as etcd does.
    fn keep_alive(&mut self, id: i64) -> LeaseKeepAliveResponse {
        let mut resp = LeaseKeepAliveResponse::new();
        resp.set_ID(id);
        if let Some(lease) = self.leases.get_mut(&id) {
            lease.deadline = Instant::now() + Duration::from_secs(lease.ttl as u64);
            resp.set_TTL(lease.ttl);
        }
        resp.set_header(self.header());
        resp
    }

    /// A new watch: its `created` answer, the history it asks for, then every event as it
    /// happens. All under the caller's one lock, so no event is missed or doubled.
    fn subscribe(&mut self, create: &WatchCreateRequest) -> UnboundedReceiver<WatchResponse> {
        let (tx, responses) = unbounded();
        self.next_watch += 1;
        let mut created = WatchResponse::new();
        created.set_header(self.header());
        created.set_watch_id(self.next_watch);
        created.set_created(true);
        let _ = tx.unbounded_send(created);
        let start = create.get_start_revision();
        let past: Vec<Event> = self
            .history
            .iter()
            .filter(|e| start > 0 && e.get_kv().get_mod_revision() >= start)
            .filter(|e| in_range(e.get_kv().get_key(), create.get_key(), create.get_range_end()))
            .cloned()
            .collect();
        if !past.is_empty() {
            let mut resp = WatchResponse::new();
            resp.set_header(self.header());
            resp.set_events(past.into());
            let _ = tx.unbounded_send(resp);
        }
        let (key, range_end) = (create.get_key().to_vec(), create.get_range_end().to_vec());
        self.subscriptions.push(WatchSubscription { key, range_end, tx });
        responses
    }
}

type Shared = Arc<Mutex<Store>>;

#[derive(Clone)]
struct Service(Shared);

fn reply<T: Send + 'static>(ctx: &RpcContext, sink: UnarySink<T>, result: Result<T, RpcStatus>) {
    ctx.spawn(async move {
        let _ = match result {
            Ok(resp) => sink.success(resp).await,
            Err(status) => sink.fail(status).await,
        };
    });
}

fn lease_not_found() -> RpcStatus {
    RpcStatus::with_message(RpcStatusCode::NOT_FOUND, "etcdserver: requested lease not found".into())
}

impl Kv for Service {
    fn range(&mut self, ctx: RpcContext, req: RangeRequest, sink: UnarySink<RangeResponse>) {
        let store = self.0.lock();
        let mut resp = RangeResponse::new();
        resp.set_header(store.header());
        let kvs: Vec<KeyValue> = store
            .kvs
            .values()
            .filter(|kv| in_range(kv.get_key(), req.get_key(), req.get_range_end()))
            .cloned()
            .collect();
        resp.set_count(kvs.len() as i64);
        resp.set_kvs(kvs.into());
        drop(store);
        reply(&ctx, sink, Ok(resp));
    }

    fn put(&mut self, ctx: RpcContext, mut req: PutRequest, sink: UnarySink<PutResponse>) {
        let mut store = self.0.lock();
        let lease = req.get_lease();
        let result = if lease != 0 && !store.leases.contains_key(&lease) {
            Err(lease_not_found())
        } else {
            store.put(req.take_key(), req.take_value(), lease);
            let mut resp = PutResponse::new();
            resp.set_header(store.header());
            Ok(resp)
        };
        drop(store);
        reply(&ctx, sink, result);
    }

    fn delete_range(&mut self, ctx: RpcContext, req: DeleteRangeRequest, sink: UnarySink<DeleteRangeResponse>) {
        let mut store = self.0.lock();
        let keys = store.keys_in(req.get_key(), req.get_range_end());
        let deleted = store.delete(keys);
        let mut resp = DeleteRangeResponse::new();
        resp.set_deleted(deleted);
        resp.set_header(store.header());
        drop(store);
        reply(&ctx, sink, Ok(resp));
    }
}

impl Lease for Service {
    fn lease_grant(&mut self, ctx: RpcContext, req: LeaseGrantRequest, sink: UnarySink<LeaseGrantResponse>) {
        let mut store = self.0.lock();
        store.next_lease += 1;
        let id = if req.get_ID() != 0 { req.get_ID() } else { store.next_lease };
        let ttl = req.get_TTL().max(1);
        store.leases.insert(id, LeaseState { ttl, deadline: Instant::now() + Duration::from_secs(ttl as u64) });
        let mut resp = LeaseGrantResponse::new();
        resp.set_ID(id);
        resp.set_TTL(ttl);
        resp.set_header(store.header());
        drop(store);
        reply(&ctx, sink, Ok(resp));
    }

    fn lease_revoke(&mut self, ctx: RpcContext, req: LeaseRevokeRequest, sink: UnarySink<LeaseRevokeResponse>) {
        let mut store = self.0.lock();
        let result = if store.revoke(req.get_ID()) {
            let mut resp = LeaseRevokeResponse::new();
            resp.set_header(store.header());
            Ok(resp)
        } else {
            Err(lease_not_found())
        };
        drop(store);
        reply(&ctx, sink, result);
    }

    fn lease_keep_alive(
        &mut self,
        ctx: RpcContext,
        requests: RequestStream<LeaseKeepAliveRequest>,
        sink: DuplexSink<LeaseKeepAliveResponse>,
    ) {
        let store = self.0.clone();
        // A request that fails to arrive ends the stream, as the client going away does.
        let responses =
            requests.scan((), |_, req| future::ready(req.ok())).map(move |req| store.lock().keep_alive(req.get_ID()));
        ctx.spawn(send_each(sink, responses));
    }

    fn lease_time_to_live(
        &mut self,
        ctx: RpcContext,
        req: LeaseTimeToLiveRequest,
        sink: UnarySink<LeaseTimeToLiveResponse>,
    ) {
        let store = self.0.lock();
        let mut resp = LeaseTimeToLiveResponse::new();
        resp.set_ID(req.get_ID());
        resp.set_TTL(-1);
        if let Some(lease) = store.leases.get(&req.get_ID()) {
            resp.set_TTL(lease.deadline.saturating_duration_since(Instant::now()).as_secs() as i64);
            resp.set_grantedTTL(lease.ttl);
        }
        resp.set_header(store.header());
        drop(store);
        reply(&ctx, sink, Ok(resp));
    }
}

impl Watch for Service {
    fn watch(&mut self, ctx: RpcContext, mut requests: RequestStream<WatchRequest>, sink: DuplexSink<WatchResponse>) {
        let store = self.0.clone();
        ctx.spawn(async move {
            let Some(Ok(req)) = requests.next().await else { return };
            if !req.has_create_request() {
                return;
            }
            let responses = store.lock().subscribe(req.get_create_request());
            send_each(sink, responses).await;
        });
    }
}

/// Sends each response until `responses` ends or the client goes away, then ends the stream.
async fn send_each<T>(mut sink: DuplexSink<T>, responses: impl Stream<Item = T>) {
    let mut responses = std::pin::pin!(responses);
    while let Some(resp) = responses.next().await {
        if sink.send((resp, WriteFlags::default())).await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}

/// A running in-process etcd; dropping it stops the server and joins its threads.
pub struct InProcessEtcd {
    server: Option<grpcio::Server>,
    addr: SocketAddr,
    store: Shared,
    stop_sweeper: Option<Sender<()>>,
    sweeper: Option<JoinHandle<()>>,
}

impl InProcessEtcd {
    /// Serves on a free loopback port.
    pub fn start() -> Result<InProcessEtcd, String> {
        let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("etcd-inproc").build());
        let store: Shared = Arc::default();
        let service = Service(store.clone());
        let args = ChannelBuilder::new(env.clone()).reuse_port(false).build_args();
        let mut server = ServerBuilder::new(env)
            .channel_args(args)
            .register_service(create_kv(service.clone()))
            .register_service(create_lease(service.clone()))
            .register_service(create_watch(service))
            .build()
            .map_err(|e| format!("in-process etcd: {e}"))?;
        let port = server
            .add_listening_port("127.0.0.1:0", ServerCredentials::insecure())
            .map_err(|e| format!("in-process etcd: {e}"))?;
        server.start();
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let swept = store.clone();
        let sweeper = thread::Builder::new()
            .name("etcd-leases".into())
            .spawn(move || {
                let ticks = tick(LEASE_SWEEP);
                loop {
                    select! {
                        recv(stop_rx) -> _ => return,
                        recv(ticks) -> _ => swept.lock().expire(Instant::now()),
                    }
                }
            })
            .map_err(|e| format!("in-process etcd: {e}"))?;
        Ok(InProcessEtcd {
            server: Some(server),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            store,
            stop_sweeper: Some(stop_tx),
            sweeper: Some(sweeper),
        })
    }

    /// `127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for InProcessEtcd {
    fn drop(&mut self) {
        self.stop_sweeper.take();
        if let Some(t) = self.sweeper.take() {
            let _ = t.join();
        }
        // Ends every watch stream, so the server can shut down.
        self.store.lock().subscriptions.clear();
        if let Some(mut server) = self.server.take() {
            let _ = futures::executor::block_on(server.shutdown());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::in_range;

    #[test]
    fn ranges_as_etcd_reads_them() {
        assert!(in_range(b"a", b"a", b""));
        assert!(!in_range(b"ab", b"a", b""));
        assert!(in_range(b"zzz", b"a", b"\0"));
        assert!(in_range(b"/p/x", b"/p/", b"/p0"));
        assert!(!in_range(b"/p0", b"/p/", b"/p0"));
    }
}
