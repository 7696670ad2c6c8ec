//! `PushServer.PushUsers` (issue #11): push-manager checks the ids and forwards the push, each id
//! once and without a topic, to every connect-node (real etcd, `testkit::Sink` nodes); a real
//! connect-node takes such a message, and one for users it has no connection of is no error.
//! Delivery to authenticated connections is tested with the connection tokens, end to end.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use grpcio::RpcStatusCode;
use tempfile::TempDir;

use common::etcd::Etcd;
use common::gateway::{start_gateway, wait_connections};
use common::grpc::{batch, node_client, push_client, refused, with_key, OP};
use common::ws::Client;
use common::{wait_until, BIN, PATIENCE};
use push_manager::gateway::{self, Gateway};
use push_manager::manager::{Config, Manager};
use push_manager::proto::protocol::{BroadCastReq, PushUsersReq};
use push_manager::proto::{broadcast_request, push_users_request};
use push_manager::testkit::Sink;
use push_manager::token::{Claims, TokenKeys};

const PREFIX: &str = "/users/nodes/";
const KEY: &str = "the-api-key";

fn register(etcd: &Etcd, id: &str, sink: &Sink) {
    etcd.client().put(&format!("{PREFIX}{id}"), sink.addr.as_bytes(), None).unwrap();
}

/// A message as push-manager sends a node a push to `users`.
fn users_message(users: &[&str], seq: i32, body: &str) -> BroadCastReq {
    let mut msg = broadcast_request("", OP, seq, body);
    msg.set_user_ids(users.iter().map(|u| u.to_string()).collect());
    msg
}

/// The user ids and topic of every message `sink` received, in order.
fn audiences(sink: &Sink) -> Vec<(Vec<String>, String)> {
    sink.messages().iter().map(|m| (m.get_user_ids().to_vec(), m.get_topic().to_string())).collect()
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_push_reaches_every_node_with_each_id_once_and_no_topic() {
    let etcd = Etcd::start();
    let sinks = [Sink::start(), Sink::start()];
    register(&etcd, "n1", &sinks[0]);
    register(&etcd, "n2", &sinks[1]);
    let manager = Manager::start(common::manager::config(&etcd, PREFIX)).unwrap();
    wait_until("both nodes known", PATIENCE, || manager.nodes().len() == 2);

    let client = push_client(manager.addr());
    let reply = client.push_users(&push_users_request(&["bob", "alice", "bob", "carol"], OP, 7, "hi")).unwrap();
    assert_eq!((reply.get_targeted(), reply.get_accepted()), (2, 2));
    assert!(reply.get_dropped().is_empty(), "{reply:?}");
    for sink in &sinks {
        wait_until("the push arrives", PATIENCE, || sink.count() == 1);
        let msg = &sink.messages()[0];
        assert_eq!(msg.get_user_ids(), ["bob", "alice", "carol"], "deduplicated, in first-seen order");
        assert_eq!((msg.get_topic(), msg.get_proto().get_seq(), msg.get_proto().get_body()), ("", 7, &b"hi"[..]));
    }
}

#[test]
fn bad_pushes_are_refused_with_a_reason_and_broadcasts_still_work_after_each() {
    let etcd = Etcd::start();
    let secrets = TempDir::new().unwrap();
    let keys = secrets.path().join("api-keys");
    std::fs::write(&keys, format!("{KEY}\n")).unwrap();
    let config = Config {
        max_push_users: 3,
        max_message_bytes: 64,
        api_key_file: Some(keys),
        ..common::manager::config(&etcd, PREFIX)
    };
    let manager = Manager::start(config).unwrap();
    let client = push_client(manager.addr());
    wait_until("the first listing", PATIENCE, || manager.listings() >= 1);
    let status = refused(
        client.push_users_opt(&push_users_request(&["alice"], OP, 0, "x"), with_key(KEY)),
        RpcStatusCode::UNAVAILABLE,
    );
    assert!(status.message().contains("no connect-node is registered"), "{status:?}");
    assert!(status.message().contains("nothing can deliver this push"), "{status:?}");

    let sink = Sink::start();
    register(&etcd, "n", &sink);
    wait_until("the node is known", PATIENCE, || manager.nodes().len() == 1);
    let mut no_proto = push_users_request(&["alice"], OP, 0, "x");
    no_proto.clear_proto();
    let with_users = users_message(&["alice"], 0, "smuggled");
    let cases: [(&str, grpcio::Result<_>, RpcStatusCode, &str); 9] = [
        (
            "no API key",
            client.push_users(&push_users_request(&["alice"], OP, 0, "x")),
            RpcStatusCode::UNAUTHENTICATED,
            "authorization: Bearer",
        ),
        (
            "a wrong API key",
            client.push_users_opt(&push_users_request(&["alice"], OP, 0, "x"), with_key("wrong")),
            RpcStatusCode::UNAUTHENTICATED,
            "authorization: Bearer",
        ),
        (
            "no ids",
            client.push_users_opt(&push_users_request(&[], OP, 0, "x"), with_key(KEY)),
            RpcStatusCode::INVALID_ARGUMENT,
            "user_ids is empty: name at least one user",
        ),
        (
            "too many ids, duplicates counted",
            client.push_users_opt(&push_users_request(&["a", "b", "a", "c"], OP, 0, "x"), with_key(KEY)),
            RpcStatusCode::INVALID_ARGUMENT,
            "user_ids holds 4 ids; the limit is 3 (--max-push-users)",
        ),
        (
            "an empty id",
            client.push_users_opt(&push_users_request(&["a", ""], OP, 0, "x"), with_key(KEY)),
            RpcStatusCode::INVALID_ARGUMENT,
            "user_ids[1]: empty user id",
        ),
        (
            "an id with a space",
            client.push_users_opt(&push_users_request(&["a", "b", "c d"], OP, 0, "x"), with_key(KEY)),
            RpcStatusCode::INVALID_ARGUMENT,
            "user_ids[2]: user id contains ' ': whitespace and control characters are not allowed",
        ),
        (
            "an id too long",
            client.push_users_opt(&push_users_request(&[&"u".repeat(257)], OP, 0, "x"), with_key(KEY)),
            RpcStatusCode::INVALID_ARGUMENT,
            "user_ids[0]: user id longer than 256 bytes (257 bytes)",
        ),
        (
            "no proto",
            client.push_users_opt(&no_proto, with_key(KEY)),
            RpcStatusCode::INVALID_ARGUMENT,
            "proto is required: PushUsersReq.proto carries the body to deliver",
        ),
        (
            "a body too big",
            client.push_users_opt(&push_users_request(&["a"], OP, 0, "b".repeat(65)), with_key(KEY)),
            RpcStatusCode::INVALID_ARGUMENT,
            "proto.body is 65 bytes; the limit is 64 (--max-message-bytes)",
        ),
    ];
    let mut delivered = 0;
    for (what, result, code, message) in cases {
        let status = refused(result, code);
        assert!(status.message().contains(message), "{what}: {status:?}");
        let reply = client.broadcast_opt(&broadcast_request("", OP, 0, what), with_key(KEY)).expect(what);
        assert_eq!(reply.get_accepted(), 1, "after {what}: {reply:?}");
        delivered += 1;
        wait_until("the broadcast after the refusal arrives", PATIENCE, || sink.count() == delivered);
    }
    let status = refused(client.broadcast_opt(&with_users, with_key(KEY)), RpcStatusCode::INVALID_ARGUMENT);
    assert_eq!(status.message(), "user_ids is set by push-manager on its way to nodes; call PushServer.PushUsers");

    // The limits are inclusive, and only what was accepted reached the node.
    let full = push_users_request(&["a", "b", &"c".repeat(256)], OP, 0, "y".repeat(64));
    assert_eq!(client.push_users_opt(&full, with_key(KEY)).unwrap().get_accepted(), 1);
    wait_until("the good push arrives", PATIENCE, || sink.count() == delivered + 1);
    let pushed: Vec<_> = audiences(&sink).into_iter().filter(|(users, _)| !users.is_empty()).collect();
    assert_eq!(pushed, [(strings(&["a", "b", &"c".repeat(256)]), String::new())]);
    assert_eq!(manager.nodes()[0].enqueued, delivered as u64 + 1, "nothing refused was queued");
}

#[test]
fn send_with_user_calls_push_users_and_refuses_a_topic_with_it() {
    let etcd = Etcd::start();
    let sink = Sink::start();
    register(&etcd, "n", &sink);
    let manager = Manager::start(common::manager::config(&etcd, PREFIX)).unwrap();
    wait_until("the node is known", PATIENCE, || manager.nodes().len() == 1);
    let server = manager.addr().to_string();
    let send = |args: &[&str]| Command::new(BIN).args(["send", "--server", &server]).args(args).output().unwrap();

    let out = send(&["--user", "alice", "--user", "bob", "--seq", "5", "hello"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "targeted 1 node(s), accepted by 1, dropped by 0\n");
    wait_until("the push arrives", PATIENCE, || sink.count() == 1);
    assert_eq!(audiences(&sink), [(strings(&["alice", "bob"]), String::new())]);

    let out = send(&["--topic", "news", "--user", "alice", "both"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("'--topic <TOPIC>' cannot be used with '--user <ID>'"), "{stderr}");

    let out = send(&["--user", "al ice", "bad id"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("INVALID_ARGUMENT") && stderr.contains("user_ids[0]"), "{stderr}");

    // Nothing refused was sent; a plain broadcast still goes out as one.
    let out = send(&["--topic", "news", "plain"]);
    assert!(out.status.success(), "{out:?}");
    wait_until("the broadcast arrives", PATIENCE, || sink.count() == 2);
    assert_eq!(audiences(&sink)[1], (vec![], "news".to_string()));
}

#[test]
fn max_push_users_out_of_range_is_refused_by_both_roles_naming_the_flag() {
    let etcd = Etcd::start();
    for bad in [0, 100_001] {
        let config = Config { max_push_users: bad, ..common::manager::config(&etcd, PREFIX) };
        let err = Manager::start(config).err().expect("refused").to_string();
        assert!(err.contains("--max-push-users must be 1..=100000"), "{err}");
        let config = gateway::Config { max_push_users: bad, grpc_listen: "127.0.0.1:0".into(), ..Default::default() };
        let err = Gateway::start(config).expect_err("refused").to_string();
        assert!(err.contains("--max-push-users must be 1..=100000"), "{err}");
    }
    let out = Command::new(BIN).args(["node", "--max-push-users", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-push-users"), "{out:?}");
}

#[test]
fn a_node_takes_a_push_for_users_without_connections_and_delivers_it_to_nobody() {
    let gw = start_gateway(|c| c.max_push_users = 2);
    let node = node_client(gw.grpc_addr());
    let mut everyone = Client::connect(gw.ws_addr(), "/ws");
    let mut news = Client::subscribed(gw.ws_addr(), &["news"]);
    wait_connections(&gw, 2);

    // No connection has a user yet (none authenticated): no one gets it, and that is no error.
    let reply = node.broadcast(&users_message(&["alice", "news"], 1, "for alice")).unwrap();
    assert_eq!((reply.get_received(), reply.get_delivered()), (1, 0));
    let reply = node.broadcast_batch(&batch(vec![users_message(&["bob"], 2, "for bob")])).unwrap();
    assert_eq!((reply.get_received(), reply.get_delivered()), (1, 0));

    let refusals = [
        (
            "a topic as well",
            node.broadcast(&{
                let mut msg = users_message(&["alice"], 3, "x");
                msg.set_topic("news".into());
                msg
            }),
            "topic must be empty when user_ids is set",
        ),
        ("too many ids", node.broadcast(&users_message(&["a", "b", "c"], 4, "x")), "the limit is 2 (--max-push-users)"),
        (
            "a bad id in a batch",
            node.broadcast_batch(&batch(vec![users_message(&["a"], 5, "x"), users_message(&["a\u{1}"], 6, "x")])),
            "messages[1]: user_ids[0]: user id contains",
        ),
    ];
    for (what, result, reason) in refusals {
        let status = refused(result, RpcStatusCode::INVALID_ARGUMENT);
        assert!(status.message().contains(reason), "{what}: {status:?}");
    }

    // A broadcast after them is the first thing either connection receives.
    let reply = node.broadcast(&broadcast_request("", OP, 9, "marker")).unwrap();
    assert_eq!(reply.get_delivered(), 2);
    for client in [&mut everyone, &mut news] {
        let frame = client.next_json();
        assert_eq!((frame["type"].as_str(), frame["seq"].as_i64()), (Some("message"), Some(9)), "{frame}");
    }
    let stats = gw.stats();
    assert_eq!((stats.messages_received, stats.direct_received), (3, 2));
}

/// `PushUsersReq` as a business server in another language would build it, field by field.
#[test]
fn the_wire_format_of_push_users_req_is_the_documented_one() {
    use protobuf::Message;
    let req: PushUsersReq = push_users_request(&["a"], 1, 0, "b");
    // user_ids = 1 (tag 0x0a), proto = 2 (tag 0x12) holding ver 1, op 1, body "b".
    let bytes = req.write_to_bytes().unwrap();
    assert_eq!(bytes, [0x0a, 1, b'a', 0x12, 7, 0x08, 1, 0x10, 1, 0x22, 1, b'b']);
}

/// A token for `sub`, valid for an hour, signed with the first key of `keys`.
fn token_for(keys: &TokenKeys, sub: &str) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    keys.sign(&Claims { sub: sub.into(), exp: now + 3600, nbf: None, iat: None, topics: None })
}

/// A connect-node verifying tokens with `key_file`, registered as `id` under [`PREFIX`].
fn token_node(etcd: &Etcd, id: &str, key_file: &Path) -> Gateway {
    let gw = start_gateway(|c| c.token_key_file = Some(key_file.to_path_buf()));
    etcd.client().put(&format!("{PREFIX}{id}"), gw.grpc_addr().to_string().as_bytes(), None).unwrap();
    gw
}

#[test]
fn a_push_reaches_every_connection_of_the_named_users_on_both_nodes_and_nobody_else() {
    let etcd = Etcd::start();
    let secrets = TempDir::new().unwrap();
    let key_file = secrets.path().join("token-keys");
    std::fs::write(&key_file, "a-token-key-of-at-least-thirty-two-bytes\n").unwrap();
    let keys = TokenKeys::load(&key_file).expect("the token key file loads");
    let nodes = [token_node(&etcd, "n1", &key_file), token_node(&etcd, "n2", &key_file)];
    let manager = Manager::start(common::manager::config(&etcd, PREFIX)).unwrap();
    wait_until("both nodes known", PATIENCE, || manager.nodes().len() == 2);

    let connect =
        |node: &Gateway, user: &str| Client::connect(node.ws_addr(), &format!("/ws?token={}", token_for(&keys, user)));
    let mut named = vec![
        ("alice on n1", connect(&nodes[0], "alice")),
        ("alice on n2", connect(&nodes[1], "alice")),
        ("alice again on n2", connect(&nodes[1], "alice")),
        ("bob on n1", connect(&nodes[0], "bob")),
    ];
    let mut others = vec![("carol on n1", connect(&nodes[0], "carol")), ("dave on n2", connect(&nodes[1], "dave"))];
    wait_connections(&nodes[0], 3);
    wait_connections(&nodes[1], 3);
    // A broadcast every connection has received proves each loop finished opening (and
    // authenticating) its connections before the push below.
    for node in &nodes {
        node.hub().publish(&broadcast_request("", OP, 1, "ready"));
    }
    for (who, client) in named.iter_mut().chain(others.iter_mut()) {
        assert_eq!(client.next_json()["body"], "ready", "{who}");
    }

    let client = push_client(manager.addr());
    let reply = client.push_users(&push_users_request(&["alice", "bob", "alice", "nobody"], OP, 2, "for you")).unwrap();
    assert_eq!((reply.get_targeted(), reply.get_accepted()), (2, 2), "{reply:?}");
    assert!(reply.get_dropped().is_empty(), "{reply:?}");
    // Then a broadcast to everyone: what a connection receives before it is all the push gave it.
    let reply = client.broadcast(&broadcast_request("", OP, 3, "after")).unwrap();
    assert_eq!(reply.get_accepted(), 2);

    for (who, client) in &mut named {
        let frame = client.next_json();
        assert_eq!(frame, serde_json::json!({"type":"direct","op":OP,"seq":2,"ver":1,"body":"for you"}), "{who}");
        let next = client.next_json();
        assert_eq!(
            (next["type"].as_str(), next["body"].as_str()),
            (Some("message"), Some("after")),
            "{who}: one push only"
        );
    }
    for (who, client) in &mut others {
        let next = client.next_json();
        assert_eq!(
            (next["type"].as_str(), next["body"].as_str()),
            (Some("message"), Some("after")),
            "{who} got the push"
        );
    }
    for node in &nodes {
        // "ready" (published directly), the push and "after".
        let stats = node.stats();
        assert_eq!((stats.messages_received, stats.direct_received), (3, 1), "{stats:?}");
    }
    // What a node reports delivered: each listed user's connections there, a user listed twice
    // counted once (n2 holds alice twice and dave).
    let mut msg = broadcast_request("", OP, 4, "counted");
    msg.set_user_ids(["alice", "dave", "alice", "bob"].map(String::from).to_vec().into());
    let reply = node_client(nodes[1].grpc_addr()).broadcast(&msg).unwrap();
    assert_eq!((reply.get_received(), reply.get_delivered()), (1, 3));
}
