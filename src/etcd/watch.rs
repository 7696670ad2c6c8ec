//! Watching a prefix: a thread holds one long-lived Watch stream, turns etcd's responses into
//! `WatchEvent`s in revision order and re-creates the stream from the next unseen revision when
//! it breaks, so a consumer sees every change once even across etcd restarts.

use std::time::Duration;

use crossbeam_channel::{after, select, unbounded, Receiver, Sender};
use futures::channel::oneshot;
use futures::executor::block_on;
use futures::future::{select as either, Either};
use futures::{SinkExt, StreamExt};
use grpcio::{CallOption, Channel, WriteFlags};

use super::{keys, Client, Error, KeyValue, Result};
use crate::proto::kv::Event_EventType;
use crate::proto::rpc::{WatchCreateRequest, WatchRequest, WatchResponse};
use crate::proto::rpc_grpc::WatchClient;
use crate::thread::StoppableThread;

const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What a `Watcher` reports, in the order it happened.
#[derive(Debug, Clone)]
pub enum WatchEvent {
    /// A key under the prefix was created or updated.
    Put(KeyValue),
    /// A key under the prefix was deleted (or its lease expired).
    Delete { key: String, mod_revision: i64 },
    /// start revision was compacted; the watcher has stopped: re-list and watch again
    Compacted { compact_revision: i64 },
    /// etcd canceled the watch; the watcher has stopped
    Canceled { reason: String },
    /// the stream broke (etcd down); the watcher keeps retrying with backoff and resumes from the last seen revision + 1
    Disconnected { error: String },
    /// the stream is (re)established
    Connected,
}

/// Handle on an `etcd-watch` thread. Dropping it stops and joins the thread, even while the
/// thread waits on the stream.
///
/// Events arrive as `Connected`, then changes; an outage shows as one `Disconnected` (also as
/// the first event if etcd is unreachable at start) and ends with the next `Connected`.
pub struct Watcher {
    events: Receiver<WatchEvent>,
    thread: StoppableThread,
}

impl Watcher {
    pub(super) fn spawn(client: Client, prefix: &str, start_revision: i64) -> Result<Watcher> {
        // The stop channel wakes the thread out of a backoff wait; dropping this sender wakes
        // it out of a stream read, where only a future can reach it.
        let (stop_stream_tx, stop_stream_rx) = oneshot::channel::<()>();
        // Unbounded: a full queue would block the thread and with it shutdown; the consumer
        // keeps up with etcd's write rate or has bigger problems.
        let (events_tx, events_rx) = unbounded();
        let (key, range_end) = keys::prefix_range(prefix.as_bytes());
        let thread = StoppableThread::spawn("etcd-watch", move |stop| {
            let worker = WatchLoop {
                client,
                key,
                range_end,
                next_revision: start_revision,
                events: events_tx,
                stop,
                connected: None,
            };
            worker.run(stop_stream_rx)
        })?
        .with_wake(move || drop(stop_stream_tx));
        Ok(Watcher { events: events_rx, thread })
    }

    pub fn events(&self) -> &Receiver<WatchEvent> {
        &self.events
    }

    /// Stops watching and joins the thread, even while it waits on the stream. Idempotent;
    /// dropping the handle does the same.
    pub fn shutdown(&mut self) {
        self.thread.shutdown();
    }
}

/// How one stream ended.
enum End {
    /// Shutdown, compaction or cancel: the thread is done.
    Stop,
    /// The stream broke; try again.
    Broken(String),
}

struct WatchLoop {
    client: Client,
    key: Vec<u8>,
    range_end: Vec<u8>,
    /// Revision to (re)start from: the last one delivered + 1, or 0 for "from now".
    next_revision: i64,
    events: Sender<WatchEvent>,
    stop: Receiver<()>,
    /// Whether the last stream was established; `None` before the first one.
    connected: Option<bool>,
}

impl WatchLoop {
    fn run(mut self, mut stop_stream: oneshot::Receiver<()>) {
        let mut backoff = INITIAL_BACKOFF;
        let endpoints: Vec<(usize, Channel)> = self.client.channels_in_order().map(|(i, ch)| (i, ch.clone())).collect();
        for (idx, channel) in endpoints.iter().cycle() {
            let error = match self.stream(channel, &mut stop_stream) {
                End::Stop => return,
                End::Broken(error) => format!("{}: {error}", self.client.endpoints()[*idx]),
            };
            if self.connected == Some(true) {
                backoff = INITIAL_BACKOFF;
            }
            if self.connected != Some(false) {
                log::warn!("etcd watch stream broke, retrying: {error}");
                self.emit(WatchEvent::Disconnected { error });
                self.connected = Some(false);
            }
            select! {
                recv(self.stop) -> _ => return,
                recv(after(backoff)) -> _ => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Runs one Watch stream on `channel` until it breaks or the watch is over.
    fn stream(&mut self, channel: &Channel, stop: &mut oneshot::Receiver<()>) -> End {
        // A stream opened on a still-connecting channel would wait out gRPC's 20 s connect
        // timeout; waiting for the connection with our own deadline moves on sooner.
        let connected = Box::pin(channel.wait_for_connected(self.client.timeout()));
        match block_on(either(connected, &mut *stop)) {
            Either::Left((true, _)) => {}
            Either::Left((false, _)) => {
                return End::Broken(format!("not connected within {:?}", self.client.timeout()))
            }
            Either::Right(_) => return End::Stop,
        }
        let (mut tx, mut rx) = match WatchClient::new(channel.clone()).watch_opt(CallOption::default()) {
            Ok(pair) => pair,
            Err(e) => return End::Broken(Error::from(e).to_string()),
        };
        let create = self.create_request();
        // tx stays alive until this returns: dropping it would cancel the stream.
        block_on(async {
            match either(tx.send((create, WriteFlags::default())), &mut *stop).await {
                Either::Left((Ok(()), _)) => {}
                Either::Left((Err(e), _)) => return End::Broken(Error::from(e).to_string()),
                Either::Right(_) => return End::Stop,
            }
            loop {
                let resp = match either(rx.next(), &mut *stop).await {
                    Either::Left((Some(Ok(resp)), _)) => resp,
                    Either::Left((Some(Err(e)), _)) => return End::Broken(Error::from(e).to_string()),
                    Either::Left((None, _)) => return End::Broken("etcd closed the watch stream".into()),
                    Either::Right(_) => return End::Stop,
                };
                if let Some(end) = self.handle(resp) {
                    return end;
                }
            }
        })
    }

    fn create_request(&self) -> WatchRequest {
        let mut create = WatchCreateRequest::default();
        create.set_key(self.key.clone());
        create.set_range_end(self.range_end.clone());
        create.set_start_revision(self.next_revision);
        let mut req = WatchRequest::default();
        req.set_create_request(create);
        req
    }

    fn handle(&mut self, mut resp: WatchResponse) -> Option<End> {
        if resp.get_compact_revision() != 0 {
            self.emit(WatchEvent::Compacted { compact_revision: resp.get_compact_revision() });
            return Some(End::Stop);
        }
        if resp.get_canceled() {
            self.emit(WatchEvent::Canceled { reason: resp.take_cancel_reason() });
            return Some(End::Stop);
        }
        if resp.get_created() {
            if self.next_revision == 0 {
                // "From now" must not become "from whenever we reconnect" after a break.
                self.next_revision = resp.get_header().get_revision() + 1;
            }
            self.connected = Some(true);
            self.emit(WatchEvent::Connected);
        }
        for mut event in resp.take_events().into_iter() {
            let kv = KeyValue::from(event.take_kv());
            self.next_revision = kv.mod_revision + 1;
            self.emit(match event.get_field_type() {
                Event_EventType::PUT => WatchEvent::Put(kv),
                Event_EventType::DELETE => WatchEvent::Delete { key: kv.key, mod_revision: kv.mod_revision },
            });
        }
        None
    }

    fn emit(&self, event: WatchEvent) {
        // Fails only once the handle is gone, and then the thread is stopping anyway.
        let _ = self.events.send(event);
    }
}
