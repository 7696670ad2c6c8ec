//! The etcd client against a real etcd: KV, leases, keep-alive, watch, failover and recovery.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::{free_addr, wait_until};
use push_manager::etcd::{Client, Config, Credentials, Error, LeaseLost, WatchEvent, Watcher};
use push_manager::secret::Secret;
use push_manager::testkit::{EtcdTls, LocalEtcd, TestPki};

const EVENT_TIMEOUT: Duration = Duration::from_secs(5);

#[track_caller]
fn next_event(watcher: &Watcher) -> WatchEvent {
    watcher.events().recv_timeout(EVENT_TIMEOUT).expect("a watch event within 5 s")
}

#[track_caller]
fn expect_connected(watcher: &Watcher) {
    match next_event(watcher) {
        WatchEvent::Connected => {}
        other => panic!("expected Connected, got {other:?}"),
    }
}

#[track_caller]
fn expect_put(watcher: &Watcher, key: &str, value: &[u8], revision: i64) {
    match next_event(watcher) {
        WatchEvent::Put(kv) => {
            assert_eq!((kv.key.as_str(), kv.value.as_slice(), kv.mod_revision), (key, value, revision));
        }
        other => panic!("expected Put({key}), got {other:?}"),
    }
}

#[track_caller]
fn expect_delete(watcher: &Watcher, key: &str, revision: i64) {
    match next_event(watcher) {
        WatchEvent::Delete { key: k, mod_revision } => assert_eq!((k.as_str(), mod_revision), (key, revision)),
        other => panic!("expected Delete({key}), got {other:?}"),
    }
}

#[test]
fn get_prefix_lists_exactly_the_prefix_with_revisions() {
    let etcd = Etcd::start();
    let client = etcd.client();
    let r1 = client.put("/a/1", b"one", None).unwrap();
    let r2 = client.put("/a/2", b"two", None).unwrap();
    client.put("/a", b"parent", None).unwrap();
    let r_last = client.put("/a0", b"neighbour", None).unwrap();
    assert!(r1 < r2 && r2 < r_last, "revisions grow: {r1} {r2} {r_last}");

    let listing = client.get_prefix("/a/").unwrap();
    let keys: Vec<&str> = listing.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/a/1", "/a/2"]);
    assert_eq!(listing.revision, r_last);
    assert_eq!(listing.kvs[0].value, b"one");
    assert_eq!((listing.kvs[0].create_revision, listing.kvs[0].mod_revision), (r1, r1));
    assert_eq!(listing.kvs[0].lease, 0);

    let r3 = client.put("/a/1", b"uno", None).unwrap();
    let kv = client.get("/a/1").unwrap().expect("/a/1 exists");
    assert_eq!((kv.value.as_slice(), kv.create_revision, kv.mod_revision), (&b"uno"[..], r1, r3));
    assert_eq!(client.get("/a/missing").unwrap(), None);
    assert_eq!(client.get_prefix("").unwrap().kvs.len(), 4, "empty prefix lists every key");
}

#[test]
fn delete_and_delete_prefix_count_what_they_removed() {
    let etcd = Etcd::start();
    let client = etcd.client();
    for key in ["/d/1", "/d/2", "/d/3", "/d", "/d0"] {
        client.put(key, b"x", None).unwrap();
    }
    assert_eq!(client.delete("/d/1").unwrap(), 1);
    assert_eq!(client.delete("/d/1").unwrap(), 0);
    assert_eq!(client.delete_prefix("/d/").unwrap(), 2);
    assert!(client.get_prefix("/d/").unwrap().kvs.is_empty());
    let left: Vec<String> = client.get_prefix("/d").unwrap().kvs.into_iter().map(|kv| kv.key).collect();
    assert_eq!(left, ["/d", "/d0"]);
}

#[test]
fn lease_key_disappears_after_ttl_without_keep_alive() {
    let etcd = Etcd::start();
    let client = etcd.client();
    let lease = client.grant(Duration::from_millis(1)).unwrap();
    assert!(lease.ttl >= Duration::from_secs(1), "ttl rounded up to at least 1 s: {lease:?}");
    client.put("/lease/k", b"v", Some(lease.id)).unwrap();
    assert_eq!(client.get("/lease/k").unwrap().expect("key under lease").lease, lease.id);
    assert!(client.time_to_live(lease.id).unwrap().is_some());

    wait_until("the leased key expires", Duration::from_secs(10), || client.get("/lease/k").unwrap().is_none());
    assert_eq!(client.time_to_live(lease.id).unwrap(), None);
}

#[test]
fn kept_alive_lease_outlives_its_ttl_and_expires_after_drop() {
    let etcd = Etcd::start();
    let client = etcd.client();
    let lease = client.grant(Duration::from_secs(1)).unwrap();
    client.put("/kept/k", b"v", Some(lease.id)).unwrap();
    let keep_alive = client.keep_alive(lease).unwrap();
    assert_eq!(keep_alive.lease(), lease);

    let until = Instant::now() + lease.ttl * 2 + Duration::from_secs(1);
    while Instant::now() < until {
        let left = client.time_to_live(lease.id).unwrap();
        assert!(matches!(left, Some(s) if s > 0), "lease kept alive, has {left:?} s left");
        assert!(client.get("/kept/k").unwrap().is_some(), "key kept alive");
        assert!(keep_alive.lost().try_recv().is_err(), "lease not reported lost");
        std::thread::sleep(Duration::from_millis(100));
    }

    let dropped = Instant::now();
    drop(keep_alive);
    assert!(dropped.elapsed() < Duration::from_secs(1), "drop stops the thread promptly: {:?}", dropped.elapsed());
    assert!(client.get("/kept/k").unwrap().is_some(), "dropping the handle does not revoke");
    wait_until("the no longer renewed key expires", Duration::from_secs(10), || {
        client.get("/kept/k").unwrap().is_none()
    });
}

#[test]
fn revoke_removes_keys_at_once() {
    let etcd = Etcd::start();
    let client = etcd.client();
    let lease = client.grant(Duration::from_secs(30)).unwrap();
    client.put("/revoke/k", b"v", Some(lease.id)).unwrap();
    client.revoke(lease.id).unwrap();
    assert_eq!(client.get("/revoke/k").unwrap(), None);
    assert_eq!(client.time_to_live(lease.id).unwrap(), None);
    assert!(matches!(client.revoke(lease.id), Err(Error::LeaseNotFound(id)) if id == lease.id));
    assert!(matches!(client.put("/revoke/k", b"v", Some(lease.id)), Err(Error::LeaseNotFound(_))));
}

#[test]
fn keep_alive_reports_expired_when_lease_is_revoked_behind_its_back() {
    let etcd = Etcd::start();
    let client = etcd.client();
    let lease = client.grant(Duration::from_secs(3)).unwrap();
    let keep_alive = client.keep_alive(lease).unwrap();
    client.revoke(lease.id).unwrap();
    match keep_alive.lost().recv_timeout(lease.ttl + Duration::from_secs(2)) {
        Ok(LeaseLost::Expired) => {}
        other => panic!("expected LeaseLost::Expired, got {other:?}"),
    }
}

#[test]
fn keep_alive_reports_unreachable_when_etcd_stays_down() {
    let mut etcd = Etcd::start();
    let client = etcd.client();
    let lease = client.grant(Duration::from_secs(2)).unwrap();
    let keep_alive = client.keep_alive(lease).unwrap();
    etcd.kill();
    match keep_alive.lost().recv_timeout(lease.ttl + Duration::from_secs(3)) {
        Ok(LeaseLost::Unreachable { for_ }) => {
            assert!(for_ >= lease.ttl, "reported after a whole TTL: {for_:?}")
        }
        other => panic!("expected LeaseLost::Unreachable, got {other:?}"),
    }
}

#[test]
fn watch_sees_puts_and_deletes_in_order() {
    let etcd = Etcd::start();
    let client = etcd.client();
    let mut watcher = client.watch_prefix("/w/", 0).unwrap();
    expect_connected(&watcher);

    let r1 = client.put("/w/a", b"1", None).unwrap();
    client.put("/w", b"outside", None).unwrap();
    client.put("/w0", b"outside", None).unwrap();
    let r2 = client.put("/w/b", b"2", None).unwrap();
    client.delete("/w/a").unwrap();
    let r3 = client.get_prefix("/").unwrap().revision;
    expect_put(&watcher, "/w/a", b"1", r1);
    expect_put(&watcher, "/w/b", b"2", r2);
    expect_delete(&watcher, "/w/a", r3);
    assert!(watcher.events().try_recv().is_err(), "keys outside the prefix are not reported");

    let stopping = Instant::now();
    watcher.shutdown();
    watcher.shutdown();
    assert!(stopping.elapsed() < Duration::from_secs(1), "shutdown is prompt: {:?}", stopping.elapsed());
}

#[test]
fn watch_from_an_older_revision_replays_history() {
    let etcd = Etcd::start();
    let client = etcd.client();
    let r1 = client.put("/h/1", b"a", None).unwrap();
    let r2 = client.put("/h/2", b"b", None).unwrap();
    client.delete("/h/1").unwrap();
    let r3 = client.get_prefix("/h/").unwrap().revision;

    let watcher = client.watch_prefix("/h/", r2).unwrap();
    expect_connected(&watcher);
    expect_put(&watcher, "/h/2", b"b", r2);
    expect_delete(&watcher, "/h/1", r3);

    let from_start = client.watch_prefix("/h/", r1).unwrap();
    expect_connected(&from_start);
    expect_put(&from_start, "/h/1", b"a", r1);
}

#[test]
fn watch_from_a_compacted_revision_reports_compacted_and_stops() {
    let etcd = Etcd::start();
    let client = etcd.client();
    let first = client.put("/c/k", b"1", None).unwrap();
    let last = client.put("/c/k", b"2", None).unwrap();
    let status = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.endpoint(), "compact", &last.to_string()])
        .output()
        .expect("run etcdctl");
    assert!(status.status.success(), "etcdctl compact: {status:?}");

    let watcher = client.watch_prefix("/c/", first).unwrap();
    let compacted =
        std::iter::from_fn(|| Some(next_event(&watcher))).find(|e| !matches!(e, WatchEvent::Connected)).unwrap();
    match compacted {
        WatchEvent::Compacted { compact_revision } => assert_eq!(compact_revision, last),
        other => panic!("expected Compacted, got {other:?}"),
    }
}

#[test]
fn fails_over_from_a_dead_endpoint() {
    let etcd = Etcd::start();
    let config =
        Config { endpoints: vec![free_addr(), etcd.endpoint()], timeout: Duration::from_secs(2), ..Config::default() };
    let client = Client::connect(config).unwrap();
    let revision = client.put("/f/k", b"v", None).unwrap();
    assert_eq!(client.get("/f/k").unwrap().expect("key").mod_revision, revision);
    let watcher = client.watch_prefix("/f/", revision).unwrap();
    let events: Vec<WatchEvent> = (0..2).map(|_| next_event(&watcher)).collect();
    assert!(matches!(events.last(), Some(WatchEvent::Put(kv)) if kv.key == "/f/k"), "got {events:?}");
}

#[test]
fn all_endpoints_dead_fails_with_a_typed_error_within_the_deadline() {
    let timeout = Duration::from_secs(1);
    let client =
        Client::connect(Config { endpoints: vec![free_addr(), free_addr()], timeout, ..Config::default() }).unwrap();
    for _ in 0..2 {
        let started = Instant::now();
        let err = client.get("/k").expect_err("no etcd is listening");
        let elapsed = started.elapsed();
        assert!(elapsed < timeout + Duration::from_millis(500), "failed after {elapsed:?}");
        assert!(matches!(err, Error::Unavailable { .. } | Error::Timeout(_)), "got {err:?}");
        assert!(err.is_retryable());
    }
}

#[test]
fn client_and_watcher_recover_after_etcd_restarts() {
    let mut etcd = Etcd::start();
    let client = etcd.client();
    client.put("/r/before", b"kept", None).unwrap();
    let watcher = client.watch_prefix("/r/", 0).unwrap();
    expect_connected(&watcher);

    etcd.kill();
    let err = client.get("/r/before").expect_err("etcd is down");
    assert!(err.is_retryable(), "down etcd gives a retryable error, got {err:?}");
    assert!(matches!(next_event(&watcher), WatchEvent::Disconnected { .. }));
    let mut started_while_down = client.watch_prefix("/r/", 0).unwrap();
    assert!(matches!(next_event(&started_while_down), WatchEvent::Disconnected { .. }));
    let stopping = Instant::now();
    started_while_down.shutdown();
    assert!(
        stopping.elapsed() < Duration::from_secs(1),
        "a reconnecting watcher stops promptly: {:?}",
        stopping.elapsed()
    );

    etcd.restart();
    wait_until("the client reads again after the restart", Duration::from_secs(10), || client.get("/r/before").is_ok());
    assert_eq!(client.get("/r/before").unwrap().expect("data survives the restart").value, b"kept");
    expect_connected(&watcher);
    let revision = client.put("/r/after", b"new", None).unwrap();
    expect_put(&watcher, "/r/after", b"new", revision);
}

#[test]
fn invalid_config_is_rejected_with_a_clear_message() {
    let invalid = |endpoints: Vec<&str>| {
        let config = Config { endpoints: endpoints.into_iter().map(String::from).collect(), ..Config::default() };
        match Client::connect(config) {
            Err(Error::InvalidConfig(message)) => message,
            Err(other) => panic!("expected InvalidConfig, got {other:?}"),
            Ok(_) => panic!("expected InvalidConfig, got a client"),
        }
    };
    assert!(invalid(vec![]).contains("no etcd endpoints"));
    assert!(invalid(vec!["nonsense"]).contains("\"nonsense\""));
    assert!(invalid(vec!["127.0.0.1:2379", "host:port"]).contains("\"host:port\""));
    assert!(invalid(vec!["http://127.0.0.1:2379"]).contains("without a scheme"));
    assert!(invalid(vec![":2379"]).contains("host"));
    let zero = Config { timeout: Duration::ZERO, ..Config::default() };
    assert!(matches!(zero.validate(), Err(Error::InvalidConfig(_))));

    Config::default().validate().unwrap();
    let lazy = Client::connect(Config { endpoints: vec![free_addr()], ..Config::default() });
    assert_eq!(lazy.expect("connect does not need etcd up").endpoints().len(), 1);
}

// ---- TLS and etcd's own authentication (issue #10) -------------------------------------------

/// An etcd serving TLS only with client certificates required, and a user `pm` (password
/// `s3cret`) whose role may read and write `/svc/` and nothing else; auth enabled.
fn secured_etcd(pki: &TestPki) -> LocalEtcd {
    let tls = EtcdTls { ca: pki.ca(), server: pki.issue("etcd"), client: pki.issue("root") };
    let etcd = LocalEtcd::start_tls(tls).unwrap_or_else(|e| panic!("{e}"));
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["role", "add", "nodes"],
        &["role", "grant-permission", "nodes", "--prefix=true", "readwrite", "/svc/"],
        &["user", "add", "pm:s3cret"],
        &["user", "grant-role", "pm", "nodes"],
        &["auth", "enable"],
    ] {
        etcd.etcdctl(args);
    }
    etcd
}

fn as_user(etcd: &LocalEtcd, user: &str, password: &str) -> Config {
    Config { auth: Some(Credentials { user: user.into(), password: Secret::new(password) }), ..etcd.config() }
}

#[test]
fn over_tls_a_user_works_within_its_prefix_and_is_refused_outside_it() {
    let pki = TestPki::new();
    let etcd = secured_etcd(&pki);
    let client = Client::connect(as_user(&etcd, "pm", "s3cret")).unwrap();
    client.put("/svc/a", b"1", None).unwrap();
    assert_eq!(client.get("/svc/a").unwrap().unwrap().value, b"1");
    assert_eq!(client.get_prefix("/svc/").unwrap().kvs.len(), 1);
    let err = client.put("/elsewhere", b"x", None).unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");

    // Leases, keep-alive and watch carry the token too.
    let lease = client.grant(Duration::from_secs(5)).unwrap();
    client.put("/svc/leased", b"2", Some(lease.id)).unwrap();
    let keep_alive = client.keep_alive(lease).unwrap();
    let watcher = client.watch_prefix("/svc/", 0).unwrap();
    expect_connected(&watcher);
    client.put("/svc/b", b"3", None).unwrap();
    match next_event(&watcher) {
        WatchEvent::Put(kv) => assert_eq!(kv.key, "/svc/b"),
        other => panic!("expected the put, got {other:?}"),
    }
    assert!(keep_alive.lost().try_recv().is_err(), "the lease is kept alive");
}

#[test]
fn a_wrong_password_is_refused_by_name_without_showing_the_password() {
    let pki = TestPki::new();
    let etcd = secured_etcd(&pki);
    let err = Client::connect(as_user(&etcd, "pm", "not-the-password")).unwrap().get("/svc/a").unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("\"pm\"") && message.contains("--etcd-user"), "{message}");
    assert!(!message.contains("not-the-password"), "{message}");
    assert!(!err.is_retryable());
    // Nothing else broke: the right password still works.
    Client::connect(as_user(&etcd, "pm", "s3cret")).unwrap().put("/svc/ok", b"1", None).unwrap();
}

#[test]
fn without_the_right_certificates_nothing_gets_through() {
    let pki = TestPki::new();
    let etcd = secured_etcd(&pki);
    let short = |config: Config| Config { timeout: Duration::from_millis(500), ..config };
    // Plaintext to a TLS port.
    let plain = Config { tls: None, ..as_user(&etcd, "pm", "s3cret") };
    assert!(Client::connect(short(plain)).unwrap().get("/svc/a").is_err());
    // A client certificate from a CA etcd does not trust.
    let rogue = pki.issue_untrusted("pm");
    let mut config = as_user(&etcd, "pm", "s3cret");
    config.tls.as_mut().unwrap().identity = Some((rogue.cert, rogue.key));
    assert!(Client::connect(short(config)).unwrap().get("/svc/a").is_err());
    // Not trusting etcd's CA.
    let mut config = as_user(&etcd, "pm", "s3cret");
    config.tls.as_mut().unwrap().ca = pki.issue_untrusted("other").cert;
    assert!(Client::connect(short(config)).unwrap().get("/svc/a").is_err());
    // A file that is not a certificate is refused when connecting, naming the flag.
    let mut config = as_user(&etcd, "pm", "s3cret");
    config.tls.as_mut().unwrap().ca = etcd.data_dir().join("etcd.log");
    let err = Client::connect(config).err().expect("not a PEM file");
    assert!(err.to_string().contains("--etcd-ca"), "{err}");
}

#[test]
fn an_expired_token_is_renewed_without_the_caller_noticing() {
    let pki = TestPki::new();
    let mut etcd = secured_etcd(&pki);
    let client = Client::connect(as_user(&etcd, "pm", "s3cret")).unwrap();
    client.put("/svc/a", b"1", None).unwrap();
    // etcd's simple tokens live in memory: after a restart the one the client holds is unknown.
    etcd.restart().unwrap_or_else(|e| panic!("{e}"));
    wait_until("the client works again", Duration::from_secs(10), || client.get("/svc/a").is_ok());
    assert_eq!(client.get("/svc/a").unwrap().unwrap().value, b"1");
}
