//! A small synchronous etcd v3 client on grpcio, for discovery and registration.
//!
//! push-manager is thread-based, so every call here blocks its caller until etcd answers or the
//! per-call deadline (`Config::timeout`) passes — never longer. A call tries the endpoint that
//! worked last and fails over to the next ones within that one deadline. Lease renewal and
//! watching run on their own named threads (`etcd-keepalive`, `etcd-watch`) behind handles that
//! stop and join them on drop; they report what callers must react to (a lost lease, a
//! compacted or broken watch) on crossbeam channels.

mod error;
mod keys;
mod lease;
mod watch;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpcio::{
    CallOption, Channel, ChannelBuilder, ChannelCredentials, EnvBuilder, Environment, MetadataBuilder, RpcStatusCode,
};
use parking_lot::RwLock;

use crate::proto::kv as mvccpb;
use crate::proto::rpc::{
    AuthenticateRequest, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest, PutRequest,
    RangeRequest,
};
use crate::proto::rpc_grpc::{AuthClient, KvClient, LeaseClient};
use crate::secret::Secret;

pub use crate::grpc::{ClientTls, ClientTlsFlags};

pub use error::{Error, Result};
pub use lease::{KeepAlive, LeaseLost};
pub use watch::{WatchEvent, Watcher};

/// Keys read per call when listing a prefix. Small enough that a page of values at etcd's own
/// size limit (1.5 MiB by default) stays under [`MAX_RECEIVE_BYTES`].
pub const LIST_PAGE_KEYS: i64 = 32;

/// Largest response accepted from etcd (gRPC's default is 4 MiB).
const MAX_RECEIVE_BYTES: i32 = 64 << 20;

/// Where etcd is, how long a call may take, and how to prove who we are.
#[derive(Clone, Debug)]
pub struct Config {
    /// etcd client endpoints as `host:port`, tried in order. Default `["127.0.0.1:2379"]`.
    pub endpoints: Vec<String>,
    /// Deadline of one call, failover included. Default 2 s.
    pub timeout: Duration,
    /// TLS to etcd (`--etcd-ca`, and `--etcd-cert`/`--etcd-key` for a client certificate).
    /// Default `None`: plaintext.
    pub tls: Option<ClientTls>,
    /// etcd's own user/password authentication. Default `None`.
    pub auth: Option<Credentials>,
}

impl Default for Config {
    fn default() -> Config {
        Config { endpoints: vec!["127.0.0.1:2379".to_owned()], timeout: Duration::from_secs(2), tls: None, auth: None }
    }
}

/// An etcd user and its password (`--etcd-user`, the password from a file or the environment).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: Secret,
}

/// The flag names etcd's TLS files are given with.
pub const TLS_FLAGS: ClientTlsFlags = ClientTlsFlags { ca: "--etcd-ca", cert: "--etcd-cert", key: "--etcd-key" };

impl Config {
    /// Checks that every endpoint is `host:port` and the timeout is not zero.
    pub fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            return Err(Error::InvalidConfig("no etcd endpoints given (expected at least one host:port)".into()));
        }
        for endpoint in &self.endpoints {
            validate_endpoint(endpoint)?;
        }
        if self.timeout.is_zero() {
            return Err(Error::InvalidConfig("etcd timeout must be greater than zero".into()));
        }
        if let Some(auth) = &self.auth {
            if auth.user.is_empty() || auth.password.is_empty() {
                return Err(Error::InvalidConfig("--etcd-user needs a user name and a non-empty password".into()));
            }
        }
        Ok(())
    }
}

fn validate_endpoint(endpoint: &str) -> Result<()> {
    crate::addr::validate_host_port(endpoint).map_err(|why| Error::InvalidConfig(format!("etcd endpoint {why}")))
}

/// One key as etcd stores it.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyValue {
    /// The key; non-UTF-8 bytes are replaced (push-manager only writes UTF-8 keys).
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the put that created the key.
    pub create_revision: i64,
    /// Revision of the last put to the key.
    pub mod_revision: i64,
    /// Lease the key is attached to, 0 for none.
    pub lease: i64,
}

impl From<mvccpb::KeyValue> for KeyValue {
    fn from(mut kv: mvccpb::KeyValue) -> KeyValue {
        KeyValue {
            key: String::from_utf8_lossy(kv.get_key()).into_owned(),
            value: kv.take_value(),
            create_revision: kv.get_create_revision(),
            mod_revision: kv.get_mod_revision(),
            lease: kv.get_lease(),
        }
    }
}

/// The keys under a prefix, as of one revision.
#[derive(Clone, Debug)]
pub struct Listing {
    /// The store revision the listing was read at: watch from `revision + 1` to miss nothing.
    pub revision: i64,
    pub kvs: Vec<KeyValue>,
}

/// A granted lease.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lease {
    pub id: i64,
    /// The TTL etcd granted (it may raise a too-small request to its minimum).
    pub ttl: Duration,
}

/// A handle on etcd; clones share channels and the remembered good endpoint.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<String>,
    /// `channels[i]` talks to `endpoints[i]`; each connects lazily on first use.
    channels: Vec<Channel>,
    /// Index of the endpoint that answered last; calls start there.
    preferred: AtomicUsize,
    timeout: Duration,
    auth: Option<Credentials>,
    /// etcd's token for `auth`, sent as `token` metadata with every call; renewed when etcd
    /// says it is no longer valid (it expires after etcd's `--auth-token-ttl` of disuse).
    token: RwLock<Option<Secret>>,
}

impl Client {
    /// Validates `config` and sets up one channel per endpoint; etcd need not be up yet.
    /// Certificate files are read here, so a bad one is reported at once. The client gets a gRPC
    /// environment (one `etcd-grpc-0` thread) of its own: for tools and tests; a process that
    /// already has one gives it to [`Client::connect_on`].
    pub fn connect(config: Config) -> Result<Client> {
        Client::connect_on(config, Arc::new(EnvBuilder::new().cq_count(1).name_prefix("etcd-grpc").build()))
    }

    /// [`Client::connect`] on `env`, the process's gRPC environment. gRPC polls every socket of
    /// a process from one set (epoll1), so a second environment does not keep etcd apart: its
    /// thread only adds a poller that reads the other calls' sockets and hands each completion
    /// over to its own thread, a wake-up on every message's path.
    pub fn connect_on(config: Config, env: Arc<Environment>) -> Result<Client> {
        config.validate()?;
        let mut channels = Vec::with_capacity(config.endpoints.len());
        for endpoint in &config.endpoints {
            let credentials = match &config.tls {
                Some(tls) => Some(tls.credentials().map_err(|e| Error::InvalidConfig(e.to_string()))?),
                None => None,
            };
            channels.push(channel(&env, endpoint, credentials));
        }
        Ok(Client {
            inner: Arc::new(Inner {
                endpoints: config.endpoints,
                channels,
                preferred: AtomicUsize::new(0),
                timeout: config.timeout,
                auth: config.auth,
                token: RwLock::new(None),
            }),
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// Every key starting with `prefix` (all keys for `""`), sorted by key, as of one revision.
    /// Read in pages of [`LIST_PAGE_KEYS`], so a prefix holding many or large values is listed
    /// rather than refused by gRPC's receive limit; each page is one call with its own deadline.
    pub fn get_prefix(&self, prefix: &str) -> Result<Listing> {
        let (mut key, range_end) = keys::prefix_range(prefix.as_bytes());
        let mut listing = Listing { revision: 0, kvs: Vec::new() };
        loop {
            let mut req = RangeRequest::default();
            req.set_key(key);
            req.set_range_end(range_end.clone());
            req.set_limit(LIST_PAGE_KEYS);
            // Every page after the first reads the first page's revision: one consistent listing.
            req.set_revision(listing.revision);
            let mut resp = self.with_failover(|ch, opt| KvClient::new(ch.clone()).range_opt(&req, opt))?;
            if listing.revision == 0 {
                listing.revision = resp.get_header().get_revision();
            }
            let page = resp.take_kvs();
            let Some(last) = page.last() else { break };
            // The next page starts just after the last key read.
            key = [last.get_key(), &[0]].concat();
            listing.kvs.extend(page.into_iter().map(KeyValue::from));
            if !resp.get_more() {
                break;
            }
        }
        Ok(listing)
    }

    pub fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let mut req = RangeRequest::default();
        req.set_key(key.as_bytes().to_vec());
        let mut resp = self.with_failover(|ch, opt| KvClient::new(ch.clone()).range_opt(&req, opt))?;
        Ok(resp.take_kvs().into_iter().next().map(KeyValue::from))
    }

    /// Stores `value` under `key`, attached to `lease` if given; returns the new store revision.
    /// A put that timed out on one endpoint may be retried on another, so it can apply twice
    /// (same value, one more revision).
    pub fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<i64> {
        let mut req = PutRequest::default();
        req.set_key(key.as_bytes().to_vec());
        req.set_value(value.to_vec());
        req.set_lease(lease.unwrap_or(0));
        let resp =
            self.with_failover(|ch, opt| KvClient::new(ch.clone()).put_opt(&req, opt)).map_err(|e| match lease {
                Some(id) => lease_error(e, id),
                None => e,
            })?;
        Ok(resp.get_header().get_revision())
    }

    /// Deletes `key`; returns how many keys were deleted (0 or 1).
    pub fn delete(&self, key: &str) -> Result<i64> {
        self.delete_range(key.as_bytes().to_vec(), Vec::new())
    }

    /// Deletes every key starting with `prefix`; returns how many were deleted.
    pub fn delete_prefix(&self, prefix: &str) -> Result<i64> {
        let (key, range_end) = keys::prefix_range(prefix.as_bytes());
        self.delete_range(key, range_end)
    }

    fn delete_range(&self, key: Vec<u8>, range_end: Vec<u8>) -> Result<i64> {
        let mut req = DeleteRangeRequest::default();
        req.set_key(key);
        req.set_range_end(range_end);
        let resp = self.with_failover(|ch, opt| KvClient::new(ch.clone()).delete_range_opt(&req, opt))?;
        Ok(resp.get_deleted())
    }

    /// Grants a lease of `ttl` rounded up to whole seconds (at least 1).
    pub fn grant(&self, ttl: Duration) -> Result<Lease> {
        let mut req = LeaseGrantRequest::default();
        req.set_TTL(ttl_seconds(ttl));
        let resp = self.with_failover(|ch, opt| LeaseClient::new(ch.clone()).lease_grant_opt(&req, opt))?;
        if !resp.get_error().is_empty() {
            return Err(Error::Rpc { code: RpcStatusCode::UNKNOWN, message: resp.get_error().to_owned() });
        }
        Ok(Lease { id: resp.get_ID(), ttl: Duration::from_secs(resp.get_TTL().max(0) as u64) })
    }

    /// Revokes the lease, deleting its keys at once; `LeaseNotFound` if it is already gone.
    pub fn revoke(&self, lease_id: i64) -> Result<()> {
        let mut req = LeaseRevokeRequest::default();
        req.set_ID(lease_id);
        self.with_failover(|ch, opt| LeaseClient::new(ch.clone()).lease_revoke_opt(&req, opt))
            .map_err(|e| lease_error(e, lease_id))?;
        Ok(())
    }

    /// Seconds the lease has left; `None` if it expired, was revoked or never existed.
    pub fn time_to_live(&self, lease_id: i64) -> Result<Option<i64>> {
        let mut req = LeaseTimeToLiveRequest::default();
        req.set_ID(lease_id);
        let resp = self.with_failover(|ch, opt| LeaseClient::new(ch.clone()).lease_time_to_live_opt(&req, opt));
        match resp.map_err(|e| lease_error(e, lease_id)) {
            Ok(resp) if resp.get_TTL() >= 0 => Ok(Some(resp.get_TTL())),
            Ok(_) | Err(Error::LeaseNotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Renews `lease` every TTL/3 on an `etcd-keepalive` thread until the handle is dropped
    /// or the lease is lost (reported on `KeepAlive::lost`).
    pub fn keep_alive(&self, lease: Lease) -> Result<KeepAlive> {
        KeepAlive::spawn(self.clone(), lease)
    }

    /// Streams changes under `prefix` from `start_revision` (0: from now) on an `etcd-watch`
    /// thread until the handle is dropped.
    pub fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<Watcher> {
        Watcher::spawn(self.clone(), prefix, start_revision)
    }

    fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The endpoints' channels, starting with the preferred one.
    fn channels_in_order(&self) -> impl Iterator<Item = (usize, &Channel)> {
        let n = self.inner.channels.len();
        let first = self.inner.preferred.load(Ordering::Relaxed) % n;
        (0..n).map(move |i| {
            let idx = (first + i) % n;
            (idx, &self.inner.channels[idx])
        })
    }

    fn prefer(&self, idx: usize) {
        self.inner.preferred.store(idx, Ordering::Relaxed);
    }

    /// A call option carrying the auth token, if there is one (`timeout` for unary calls; none
    /// for a long-lived stream).
    pub(crate) fn call_option(&self, timeout: Option<Duration>) -> CallOption {
        let mut opt = CallOption::default();
        if let Some(timeout) = timeout {
            opt = opt.timeout(timeout);
        }
        if let Some(token) = &*self.inner.token.read() {
            let mut headers = MetadataBuilder::new();
            // A token is ASCII; etcd would refuse a call without it anyway.
            if headers.add_str("token", token.expose()).is_ok() {
                opt = opt.headers(headers.build());
            }
        }
        opt
    }

    /// Gets a token if authentication is configured and there is none yet.
    pub(crate) fn ensure_token(&self) -> Result<()> {
        if self.inner.auth.is_some() && self.inner.token.read().is_none() {
            self.authenticate()?;
        }
        Ok(())
    }

    /// Gets a fresh auth token for the configured user (no-op without `auth`).
    fn authenticate(&self) -> Result<()> {
        let Some(auth) = &self.inner.auth else { return Ok(()) };
        *self.inner.token.write() = None;
        let mut req = AuthenticateRequest::default();
        req.set_name(auth.user.clone());
        req.set_password(auth.password.expose().to_owned());
        let resp = self.failover_once(|ch, opt| AuthClient::new(ch.clone()).authenticate_opt(&req, opt)).map_err(
            |e| match e {
                Error::Rpc { code: RpcStatusCode::INVALID_ARGUMENT, message } => {
                    Error::Auth { user: auth.user.clone(), reason: message }
                }
                e => e,
            },
        )?;
        *self.inner.token.write() = Some(Secret::new(resp.get_token()));
        Ok(())
    }

    /// After a stream (watch) failed with `error`: renews the token if that is why.
    pub(crate) fn renew_token_after(&self, error: &Error) {
        if self.inner.auth.is_some() && error.is_invalid_token() {
            if let Err(e) = self.authenticate() {
                log::warn!("renewing the etcd auth token failed: {e}");
            }
        }
    }

    /// [`Client::failover_once`], authenticated: gets a token first if there is none, and once
    /// more if etcd says the one sent is no longer valid.
    fn with_failover<T>(&self, mut attempt: impl FnMut(&Channel, CallOption) -> grpcio::Result<T>) -> Result<T> {
        self.ensure_token()?;
        match self.failover_once(&mut attempt) {
            Err(e) if self.inner.auth.is_some() && e.is_invalid_token() => {
                self.authenticate()?;
                self.failover_once(&mut attempt)
            }
            result => result,
        }
    }

    /// Runs `attempt` on the preferred endpoint, then on the others while failures are
    /// retryable, all within one `Config::timeout`. Each attempt gets an equal share of the time
    /// left, so one black-holed endpoint cannot eat the whole deadline.
    fn failover_once<T>(&self, mut attempt: impl FnMut(&Channel, CallOption) -> grpcio::Result<T>) -> Result<T> {
        let deadline = Instant::now() + self.timeout();
        let n = self.inner.channels.len();
        let mut last_error = String::new();
        for (i, (idx, channel)) in self.channels_in_order().enumerate() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::Timeout(self.timeout()));
            }
            let share = remaining / u32::try_from(n - i).unwrap_or(u32::MAX);
            match attempt(channel, self.call_option(Some(share))).map_err(Error::from) {
                Ok(v) => {
                    self.prefer(idx);
                    return Ok(v);
                }
                Err(e) if !e.is_retryable() => {
                    // etcd itself answered: the endpoint works, the request does not.
                    self.prefer(idx);
                    return Err(e);
                }
                Err(e) => {
                    log::debug!("etcd endpoint {} failed: {e}", self.inner.endpoints[idx]);
                    last_error = format!("{}: {e}", self.inner.endpoints[idx]);
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout(self.timeout()));
        }
        Err(Error::Unavailable { endpoints: self.inner.endpoints.clone(), last_error })
    }
}

/// A lease TTL in etcd's whole seconds: rounded up, so a lease never lives shorter than asked.
fn ttl_seconds(ttl: Duration) -> i64 {
    let secs = (ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).max(1);
    i64::try_from(secs).unwrap_or(i64::MAX)
}

/// etcd reports a missing lease as NOT_FOUND with this message; give it its own variant.
fn lease_error(e: Error, lease_id: i64) -> Error {
    match e {
        Error::Rpc { code, ref message } if code == RpcStatusCode::NOT_FOUND && message.contains("lease not found") => {
            Error::LeaseNotFound(lease_id)
        }
        e => e,
    }
}

fn channel(env: &Arc<Environment>, endpoint: &str, tls: Option<ChannelCredentials>) -> Channel {
    let mut builder = ChannelBuilder::new(env.clone());
    if let Some(credentials) = tls {
        builder = builder.set_credentials(credentials);
    }
    builder
        // Detects a dead etcd under a quiet watch stream. etcd answers pings more frequent than
        // every 5 s with GOAWAY, and without data it would stop us after 2 pings unless allowed.
        .keepalive_time(Duration::from_secs(10))
        .keepalive_timeout(Duration::from_secs(3))
        .http2_max_pings_without_data(0)
        // gRPC's default backoff grows to 120 s; a restarted etcd should be used within seconds.
        .initial_reconnect_backoff(Duration::from_millis(100))
        .max_reconnect_backoff(Duration::from_secs(2))
        .max_receive_message_len(MAX_RECEIVE_BYTES)
        .connect(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}

    #[test]
    fn handles_can_move_between_threads() {
        assert_send_sync::<Client>();
        assert_send_sync::<Error>();
        assert_send::<KeepAlive>();
        assert_send::<Watcher>();
    }

    #[test]
    fn grant_rounds_ttl_up_to_whole_seconds() {
        assert_eq!(ttl_seconds(Duration::ZERO), 1);
        assert_eq!(ttl_seconds(Duration::from_millis(1)), 1);
        assert_eq!(ttl_seconds(Duration::from_secs(2)), 2);
        assert_eq!(ttl_seconds(Duration::from_millis(2001)), 3);
    }
}
