//! Issue #11 at the WebSocket edge: connection tokens made by `push-manager token`, shown at the
//! upgrade (`?token=`) or in an `auth` frame, the topics they grant, their expiry and refresh,
//! the `--ws-auth` modes and the Origin check. Real gateways on loopback, real WebSocket
//! clients, real tokens; the tokens no honest signer would make (tampered, `alg: none`, expired)
//! are built here by hand.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use tempfile::TempDir;

use common::gateway::{start_gateway, wait_connections};
use common::ws::{raw_exchange, upgrade_request, Client};
use common::{wait_until, BIN, PATIENCE};
use push_manager::gateway::{Gateway, WsAuth};
use push_manager::proto::broadcast_request;
use push_manager::token::{Claims, TokenKeys};

const KEY: &str = "0123456789abcdef0123456789abcdef-first";
const OTHER_KEY: &str = "fedcba9876543210fedcba9876543210-other";

/// Key files in a temp dir, deleted with the test.
struct Keys {
    dir: TempDir,
}

impl Keys {
    fn new() -> Keys {
        let keys = Keys { dir: tempfile::tempdir().unwrap() };
        keys.write("keys", &format!("# signing key first\n{KEY}\n"));
        keys.write("other", &format!("{OTHER_KEY}\n"));
        keys
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn node_file(&self) -> PathBuf {
        self.dir.path().join("keys")
    }

    fn other_file(&self) -> PathBuf {
        self.dir.path().join("other")
    }
}

/// A token from the real `push-manager token` command.
#[track_caller]
fn token(key_file: &Path, sub: &str, topics: Option<&str>, ttl: &str) -> String {
    let mut cmd = Command::new(BIN);
    cmd.arg("token").arg("--token-key-file").arg(key_file).args(["--sub", sub, "--ttl", ttl]);
    if let Some(topics) = topics {
        cmd.args(["--topics", topics]);
    }
    let out = cmd.output().expect("run push-manager token");
    assert!(out.status.success(), "token failed: {}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap();
    assert!(token.ends_with('\n') && token.matches('.').count() == 2, "{token:?}");
    token.trim_end().to_string()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A gateway that requires tokens signed with [`Keys::node_file`], with no leeway.
fn secured(keys: &Keys, tweak: impl FnOnce(&mut push_manager::gateway::Config)) -> Gateway {
    start_gateway(|c| {
        c.token_key_file = Some(keys.node_file());
        c.token_leeway = Duration::ZERO;
        tweak(c);
    })
}

/// Publishes as the node's gRPC handler does; returns the connections it reached
/// (`NodeReply.delivered`).
fn publish(gw: &Gateway, topic: &str, body: &str) -> u64 {
    gw.hub().publish(&broadcast_request(topic, 1000, 0, body))
}

/// Reads frames until a message for `topic` arrives; returns its body.
#[track_caller]
fn next_message_on(client: &mut Client, topic: &str) -> String {
    loop {
        let frame = client.next_json();
        if frame["type"] == "message" && frame["topic"] == topic {
            return frame["body"].as_str().unwrap().to_string();
        }
    }
}

/// The status line and body of an upgrade refused at the HTTP stage.
#[track_caller]
fn refused_upgrade(gw: &Gateway, path: &str, extra_headers: &str) -> String {
    let request = upgrade_request(gw.ws_addr(), path).replace("\r\n\r\n", &format!("\r\n{extra_headers}\r\n"));
    raw_exchange(gw.ws_addr(), request.as_bytes())
}

/// The response head to an upgrade of `/ws` with `extra_headers`, the connection left open.
#[track_caller]
fn upgrade_head(gw: &Gateway, extra_headers: &str) -> String {
    let request = upgrade_request(gw.ws_addr(), "/ws").replace("\r\n\r\n", &format!("\r\n{extra_headers}\r\n"));
    let mut stream = TcpStream::connect(gw.ws_addr()).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("the response head");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

#[test]
fn a_valid_token_in_the_url_subscribes_within_its_claims_and_receives() {
    let keys = Keys::new();
    let gw = secured(&keys, |_| {});
    let t = token(&keys.node_file(), "alice", Some("news,room:42:*"), "1h");
    let mut client = Client::connect(gw.ws_addr(), &format!("/ws?token={t}&topic=news&topic=room:42:a"));
    wait_connections(&gw, 1);
    publish(&gw, "room:42:a", "in the room");
    assert_eq!(next_message_on(&mut client, "room:42:a"), "in the room");
    // A prefix grant covers topics subscribed later too.
    let ack = client.command("subscribe", &["room:42:b"]);
    assert_eq!(ack["type"], "subscribed", "{ack}");
    publish(&gw, "room:42:b", "b");
    assert_eq!(next_message_on(&mut client, "room:42:b"), "b");
}

#[test]
fn an_auth_frame_identifies_a_connection_made_without_a_token() {
    let keys = Keys::new();
    let gw = secured(&keys, |_| {});
    let t = token(&keys.node_file(), "bob", Some("*"), "1h");
    let mut client = Client::connect(gw.ws_addr(), "/ws");
    client.send_text(&serde_json::json!({"action": "auth", "token": t}).to_string());
    let ack = client.next_json();
    assert_eq!(ack["type"], "authenticated", "{ack}");
    assert_eq!(ack["user"], "bob");
    assert!(ack["exp"].as_u64().unwrap() > now());
    assert_eq!(client.command("subscribe", &["anything"])["type"], "subscribed");
    publish(&gw, "anything", "hi bob");
    assert_eq!(next_message_on(&mut client, "anything"), "hi bob");
    // A second auth is an error frame, not a close.
    client.send_text(&serde_json::json!({"action": "auth", "token": t}).to_string());
    let err = client.next_json();
    assert_eq!((err["type"].as_str(), err["action"].as_str()), (Some("error"), Some("auth")), "{err}");
    assert!(err["reason"].as_str().unwrap().contains("refresh"), "{err}");
}

/// The tokens a signer we trust never makes, each refused at the upgrade with HTTP 401 and a
/// reason, while a good client keeps receiving.
#[test]
fn bad_tokens_are_refused_at_the_upgrade_and_others_are_unaffected() {
    let keys = Keys::new();
    let gw = secured(&keys, |_| {});
    let good = token(&keys.node_file(), "alice", Some("news"), "1h");
    let mut alice = Client::connect(gw.ws_addr(), &format!("/ws?token={good}&topic=news"));
    wait_connections(&gw, 1);

    let parts: Vec<&str> = good.split('.').collect();
    let mut claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["sub"] = "mallory".into();
    let tampered = format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(claims.to_string()), parts[2]);
    let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let alg_none = format!("{none_header}.{}.", parts[1]);
    let wrong_key = token(&keys.other_file(), "alice", Some("news"), "1h");
    let signer = TokenKeys::load(&keys.node_file()).unwrap();
    let expired = signer.sign(&Claims { sub: "alice".into(), exp: now() - 60, nbf: None, iat: None, topics: None });

    for (what, bad, says) in [
        ("tampered", tampered.as_str(), "signature"),
        ("alg none", alg_none.as_str(), "HS256"),
        ("wrong key", wrong_key.as_str(), "signature"),
        ("expired", expired.as_str(), "expired"),
        ("garbage", "not-a-token", "malformed"),
    ] {
        let answer = refused_upgrade(&gw, &format!("/ws?token={bad}&topic=news"), "");
        assert!(answer.starts_with("HTTP/1.1 401"), "{what}: {answer}");
        assert!(answer.contains(says), "{what}: the answer should say {says:?}: {answer}");
    }
    assert_eq!(gw.stats().refused_token, 5);
    publish(&gw, "news", "still here");
    assert_eq!(next_message_on(&mut alice, "news"), "still here");
    assert_eq!(gw.stats().connections_open, 1);
}

#[test]
fn a_bad_token_in_an_auth_frame_closes_with_4001_and_the_reason() {
    let keys = Keys::new();
    let gw = secured(&keys, |_| {});
    let wrong_key = token(&keys.other_file(), "alice", None, "1h");
    let mut client = Client::connect(gw.ws_addr(), "/ws");
    client.send_text(&serde_json::json!({"action": "auth", "token": wrong_key}).to_string());
    let (code, reason) = client.expect_close();
    assert_eq!(code, 4001);
    assert!(reason.contains("signature"), "{reason}");

    // Subscribing before authenticating is refused the same way.
    let mut early = Client::connect(gw.ws_addr(), "/ws");
    early.send_text(r#"{"action":"subscribe","topics":["news"]}"#);
    let (code, reason) = early.expect_close();
    assert_eq!(code, 4001);
    assert!(reason.contains("authentication required"), "{reason}");
    wait_until("both closes are counted", PATIENCE, || gw.stats().closed_auth == 2);
}

/// One event loop, so a delivery seen by one client was handled before a later command from
/// the other.
#[test]
fn a_connection_owing_its_token_gets_no_broadcast_to_everyone() {
    let keys = Keys::new();
    let gw = secured(&keys, |c| c.event_loops = 1);
    let t = token(&keys.node_file(), "alice", None, "1h");
    let mut pending = Client::connect(gw.ws_addr(), "/ws");
    let mut alice = Client::connect(gw.ws_addr(), &format!("/ws?token={t}"));
    wait_connections(&gw, 2);
    assert_eq!(gw.stats().connections_pending_auth, 1);
    assert_eq!(publish(&gw, "", "to everyone"), 1, "delivered counts alice, not the one owing its token");
    assert_eq!(next_message_on(&mut alice, ""), "to everyone");
    pending.send_text(&serde_json::json!({"action": "auth", "token": t}).to_string());
    let first = pending.next_json();
    assert_eq!(first["type"], "authenticated", "the broadcast before auth must not reach it: {first}");
    assert_eq!(gw.stats().connections_pending_auth, 0);
    assert_eq!(publish(&gw, "", "after auth"), 2);
    assert_eq!(next_message_on(&mut pending, ""), "after auth");
    // One that never authenticates and goes away leaves the count as it found it.
    let quitter = Client::connect(gw.ws_addr(), "/ws");
    wait_connections(&gw, 3);
    assert_eq!(gw.stats().connections_pending_auth, 1);
    drop(quitter);
    wait_until("the quitter is gone", PATIENCE, || gw.stats().connections_open == 2);
    assert_eq!(gw.stats().connections_pending_auth, 0);
}

#[test]
fn a_connection_that_never_authenticates_is_closed_after_the_auth_timeout() {
    let keys = Keys::new();
    let gw = secured(&keys, |c| c.ws_auth_timeout = Duration::from_millis(300));
    let mut client = Client::connect(gw.ws_addr(), "/ws");
    let (code, reason) = client.expect_close();
    assert_eq!(code, 4001);
    assert!(reason.contains("no auth within 300ms"), "{reason}");
    // ?topic= without ?token= cannot subscribe before authenticating: refused at once.
    let answer = refused_upgrade(&gw, "/ws?topic=news", "");
    assert!(answer.starts_with("HTTP/1.1 401") && answer.contains("?token="), "{answer}");
}

#[test]
fn a_topic_outside_the_claims_is_refused_and_the_connection_keeps_working() {
    let keys = Keys::new();
    let gw = secured(&keys, |_| {});
    let t = token(&keys.node_file(), "alice", Some("news,room:42:*"), "1h");
    let mut client = Client::connect(gw.ws_addr(), &format!("/ws?token={t}&topic=news"));
    let err = client.command("subscribe", &["room:42:x", "secret", "room:4"]);
    assert_eq!(err["type"], "error", "{err}");
    assert_eq!(err["action"], "subscribe");
    assert_eq!(err["topics"], serde_json::json!(["secret", "room:4"]), "names exactly the refused topics");
    assert_eq!(gw.stats().refused_topics, 1);
    // Nothing of the refused command was subscribed, and the connection still works.
    assert_eq!(client.command("unsubscribe", &["nothing"])["topics"], serde_json::json!(["news"]));
    publish(&gw, "room:42:x", "not subscribed");
    publish(&gw, "news", "news");
    assert_eq!(next_message_on(&mut client, "news"), "news");
    // At the upgrade, a topic outside the claims refuses the connection with 403.
    let answer = refused_upgrade(&gw, &format!("/ws?token={t}&topic=secret"), "");
    assert!(answer.starts_with("HTTP/1.1 403") && answer.contains("secret"), "{answer}");
    // A token without a topics claim grants none.
    let bare = token(&keys.node_file(), "carol", None, "1h");
    let mut carol = Client::connect(gw.ws_addr(), &format!("/ws?token={bare}"));
    assert_eq!(carol.command("subscribe", &["news"])["type"], "error");
}

/// Two connections share one token that expires in two seconds; one refreshes in time. The
/// other is closed with 4002, and after that the refreshed one still receives.
#[test]
fn expiry_closes_with_4002_unless_the_token_was_refreshed() {
    let keys = Keys::new();
    let gw = secured(&keys, |_| {});
    let short = token(&keys.node_file(), "alice", Some("news"), "2s");
    let mut kept = Client::connect(gw.ws_addr(), &format!("/ws?token={short}&topic=news"));
    let mut lapsed = Client::connect(gw.ws_addr(), &format!("/ws?token={short}&topic=news"));
    wait_connections(&gw, 2);

    let fresh = token(&keys.node_file(), "alice", Some("news"), "1h");
    kept.send_text(&serde_json::json!({"action": "refresh", "token": fresh}).to_string());
    let ack = kept.next_json();
    assert_eq!(ack["type"], "refreshed", "{ack}");
    assert_eq!(ack["topics"], serde_json::json!(["news"]));

    let (code, reason) = lapsed.expect_close();
    assert_eq!((code, reason.as_str()), (4002, "token expired"));
    assert_eq!(gw.stats().closed_expired, 1);
    publish(&gw, "news", "after the first expiry");
    assert_eq!(next_message_on(&mut kept, "news"), "after the first expiry");

    // A refresh for another user closes the connection.
    let bob = token(&keys.node_file(), "bob", Some("news"), "1h");
    kept.send_text(&serde_json::json!({"action": "refresh", "token": bob}).to_string());
    let (code, reason) = kept.expect_close();
    assert_eq!(code, 4001);
    assert!(reason.contains("another user"), "{reason}");
}

#[test]
fn a_refresh_drops_topics_the_new_token_no_longer_grants() {
    let keys = Keys::new();
    let gw = secured(&keys, |_| {});
    let wide = token(&keys.node_file(), "alice", Some("news,sports"), "1h");
    let mut client = Client::connect(gw.ws_addr(), &format!("/ws?token={wide}&topic=news&topic=sports"));
    let narrow = token(&keys.node_file(), "alice", Some("news"), "1h");
    client.send_text(&serde_json::json!({"action": "refresh", "token": narrow}).to_string());
    let ack = client.next_json();
    assert_eq!(ack["topics"], serde_json::json!(["news"]), "{ack}");
    publish(&gw, "sports", "dropped");
    publish(&gw, "news", "kept");
    assert_eq!(client.next_json()["body"], "kept");
}

#[test]
fn optional_mode_lets_anonymous_clients_in_and_holds_token_holders_to_their_claims() {
    let keys = Keys::new();
    let gw = secured(&keys, |c| c.ws_auth = Some(WsAuth::Optional));
    let mut anonymous = Client::subscribed(gw.ws_addr(), &["anything"]);
    let t = token(&keys.node_file(), "alice", Some("news"), "1h");
    let mut alice = Client::connect(gw.ws_addr(), &format!("/ws?token={t}"));
    assert_eq!(alice.command("subscribe", &["anything"])["type"], "error");
    // An anonymous connection may still identify itself, and is then held to the claims.
    anonymous.send_text(&serde_json::json!({"action": "auth", "token": t}).to_string());
    let ack = anonymous.next_json();
    assert_eq!((ack["type"].as_str(), ack["topics"].clone()), (Some("authenticated"), serde_json::json!([])));
    // A bad token in the URL is refused even where tokens are optional.
    let answer = refused_upgrade(&gw, "/ws?token=bad", "");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
}

#[test]
fn with_tokens_off_the_node_ignores_them_and_says_so_to_an_auth_frame() {
    let gw = start_gateway(|_| {});
    let mut client = Client::connect(gw.ws_addr(), "/ws?token=whatever&topic=news");
    client.send_text(r#"{"action":"auth","token":"whatever"}"#);
    let err = client.next_json();
    assert_eq!(err["type"], "error", "{err}");
    assert!(err["reason"].as_str().unwrap().contains("--ws-auth off"), "{err}");
    publish(&gw, "news", "open node");
    assert_eq!(next_message_on(&mut client, "news"), "open node");
}

#[test]
fn origins_outside_the_allowed_list_are_refused_with_403_and_counted() {
    let gw = start_gateway(|c| c.allowed_origins = vec!["https://app.example.com".into(), "*.example.org".into()]);
    for origin in ["https://evil.example.net", "null", "https://example.org"] {
        let answer = refused_upgrade(&gw, "/ws", &format!("Origin: {origin}\r\n"));
        assert!(answer.starts_with("HTTP/1.1 403"), "{origin}: {answer}");
        assert!(answer.contains("--allowed-origins"), "{answer}");
    }
    assert_eq!(gw.stats().refused_origin, 3);
    for origin in ["https://app.example.com", "https://chat.example.org:8443"] {
        let head = upgrade_head(&gw, &format!("Origin: {origin}\r\n"));
        assert!(head.starts_with("HTTP/1.1 101"), "{origin}: {head}");
    }
    // Non-browser clients send no Origin: allowed unless --require-origin.
    let mut client = Client::subscribed(gw.ws_addr(), &["news"]);
    publish(&gw, "news", "no origin");
    assert_eq!(next_message_on(&mut client, "news"), "no origin");

    let strict = start_gateway(|c| c.require_origin = true);
    let answer = refused_upgrade(&strict, "/ws", "");
    assert!(answer.starts_with("HTTP/1.1 403") && answer.contains("--require-origin"), "{answer}");
}

#[test]
fn a_node_refuses_to_start_with_contradictory_or_missing_auth_settings() {
    let keys = Keys::new();
    let short = keys.write("short", "too-short-a-key\n");
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["node", "--grpc-listen", "127.0.0.1:0", "--etcd", "127.0.0.1:1", "--etcd-timeout", "200ms"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let open = run(&["--ws-listen", "0.0.0.0:0"]);
    assert!(
        open.contains("--ws-listen") && open.contains("--token-key-file") && open.contains("--ws-auth off"),
        "{open}"
    );
    let needs_keys = run(&["--ws-listen", "127.0.0.1:0", "--ws-auth", "required"]);
    assert!(needs_keys.contains("--ws-auth required needs --token-key-file"), "{needs_keys}");
    let node_file = keys.node_file();
    let contradiction =
        run(&["--ws-listen", "127.0.0.1:0", "--ws-auth", "off", "--token-key-file", node_file.to_str().unwrap()]);
    assert!(contradiction.contains("contradict"), "{contradiction}");
    let weak = run(&["--ws-listen", "127.0.0.1:0", "--token-key-file", short.to_str().unwrap()]);
    assert!(weak.contains("--token-key-file") && weak.contains("32"), "{weak}");
    let bad_mode = Command::new(BIN).args(["node", "--ws-auth", "on"]).output().unwrap();
    assert_eq!(bad_mode.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_mode.stderr).contains("off, optional or required"));
    let bad_origin = run(&["--ws-listen", "127.0.0.1:0", "--allowed-origins", "app.example.com"]);
    assert!(bad_origin.contains("--allowed-origins"), "{bad_origin}");
}

#[test]
fn keys_rotate_on_reload_without_dropping_connections() {
    let keys = Keys::new();
    let gw = secured(&keys, |_| {});
    let old = token(&keys.node_file(), "alice", Some("news"), "1h");
    let mut alice = Client::connect(gw.ws_addr(), &format!("/ws?token={old}&topic=news"));
    wait_connections(&gw, 1);
    // The other key becomes the signing key; the node must accept both after the reload.
    keys.write("keys", &format!("{OTHER_KEY}\n{KEY}\n"));
    gw.reload_credentials();
    let new = token(&keys.other_file(), "bob", Some("news"), "1h");
    let mut bob = Client::connect(gw.ws_addr(), &format!("/ws?token={new}&topic=news"));
    wait_connections(&gw, 2);
    publish(&gw, "news", "both");
    assert_eq!(next_message_on(&mut alice, "news"), "both");
    assert_eq!(next_message_on(&mut bob, "news"), "both");
}

/// `subscribe --token` (and the environment variable) connects to a node that requires tokens,
/// never prints the token, and a node refusing it is a clear error.
#[test]
fn subscribe_shows_its_token_and_keeps_it_out_of_its_output() {
    use push_manager::testkit::Reaped;
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let keys = Keys::new();
    let gw = secured(&keys, |_| {});
    let url = format!("ws://{}/ws", gw.ws_addr());
    let t = token(&keys.node_file(), "alice", Some("news"), "1h");
    for via_env in [false, true] {
        let mut cmd = Command::new(BIN);
        cmd.args(["subscribe", "--url", &url, "--topic", "news", "--count", "1"]);
        if via_env {
            cmd.env("PUSH_MANAGER_WS_TOKEN", &t);
        } else {
            cmd.args(["--token", &t]);
        }
        let mut child = Reaped::spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()));
        let mut line = String::new();
        BufReader::new(child.stderr.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert!(line.starts_with("connected to") && !line.contains(&t), "{line:?}");
        wait_connections(&gw, 1);
        publish(&gw, "news", "for alice");
        let out = child.output_within(PATIENCE);
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("\"body\":\"for alice\""));
        wait_connections(&gw, 0);
    }
    let out =
        Command::new(BIN).args(["subscribe", "--url", &url, "--topic", "news", "--token", "bad"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("401"), "{said}");
}
