//! Issue #10 end to end, with the real binary: TLS on every hop (callers, connect-nodes, etcd),
//! API keys for callers and a token for nodes, etcd's own users and roles, rotation on SIGHUP
//! without dropping anyone, refusing to serve an open address unauthenticated, and secrets kept
//! out of logs, messages and `--help`. Certificates are made here with `openssl`; every socket
//! is on loopback but the wildcard binds that failing closed is about.

mod common;

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};

use grpcio::{CallOption, MetadataBuilder, RpcStatusCode};
use tempfile::TempDir;

use common::etcd::Etcd;
use common::grpc::{batch, node_client, push_client, refused, with_key, OP};
use common::process::Process;
use common::ws::Client;
use common::{free_addr, wait_until, BIN, PATIENCE};
use push_manager::etcd;
use push_manager::manager::{self, Manager};
use push_manager::proto::broadcast_request;
use push_manager::registry::DEFAULT_INSTANCE_PREFIX;
use push_manager::testkit::{admin_on_free_port, signal, EtcdTls, Identity, LocalEtcd, Sink, TestPki};

const PREFIX: &str = "/secure/nodes/";
/// What the WebSocket subscribers listen to.
const TOPIC: &str = "news";
/// Where probes go while a test waits for something: nobody listens to it.
const PROBE: &str = "probe";
/// The etcd user push-manager and the nodes log in as.
const ETCD_USER: &str = "pm";

/// Secrets a test hands to the processes, a file each, deleted with the test.
struct Secrets(TempDir);

impl Secrets {
    fn new() -> Secrets {
        Secrets(tempfile::Builder::new().prefix("push-manager-secrets-").tempdir().expect("a temp dir"))
    }

    /// Writes `text` to the file `name` (again, for a rotation) and returns its path.
    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.path().join(name);
        std::fs::write(&path, text).expect("write a secret file");
        path.to_str().expect("a UTF-8 temp path").to_string()
    }
}

/// An etcd serving TLS only and requiring client certificates, with auth enabled and a user
/// [`ETCD_USER`] (`password`) whose role may read and write [`PREFIX`], the nodes' WebSocket
/// URLs beside it and the instances' prefix, and nothing else.
fn secured_etcd(pki: &TestPki, password: &str) -> LocalEtcd {
    etcd_granting(pki, password, &[PREFIX, "/secure/nodes-ws/", DEFAULT_INSTANCE_PREFIX])
}

/// [`secured_etcd`] whose role may read and write only under `prefixes`.
fn etcd_granting(pki: &TestPki, password: &str, prefixes: &[&str]) -> LocalEtcd {
    let tls = EtcdTls { ca: pki.ca(), server: pki.issue("etcd"), client: pki.issue("root") };
    let etcd = LocalEtcd::start_tls(tls).unwrap_or_else(|e| panic!("{e}"));
    let user = format!("{ETCD_USER}:{password}");
    etcd.etcdctl(&["user", "add", "root:rootpw"]);
    etcd.etcdctl(&["user", "grant-role", "root", "root"]);
    etcd.etcdctl(&["role", "add", "nodes"]);
    for prefix in prefixes {
        etcd.etcdctl(&["role", "grant-permission", "nodes", "--prefix=true", "readwrite", prefix]);
    }
    etcd.etcdctl(&["user", "add", &user]);
    etcd.etcdctl(&["user", "grant-role", ETCD_USER, "nodes"]);
    etcd.etcdctl(&["auth", "enable"]);
    etcd
}

fn path(p: &Path) -> String {
    p.to_str().expect("a UTF-8 temp path").to_string()
}

/// The flags of a process reaching [`secured_etcd`] with `identity`'s certificate, as
/// [`ETCD_USER`] with the password in `password_file`. The certificate's name is no etcd user:
/// only the password gets anything past etcd's auth.
fn etcd_flags(pki: &TestPki, identity: &Identity, password_file: &str) -> Vec<String> {
    [
        "--etcd-ca",
        &path(&pki.ca()),
        "--etcd-cert",
        &path(&identity.cert),
        "--etcd-key",
        &path(&identity.key),
        "--etcd-user",
        ETCD_USER,
        "--etcd-password-file",
        password_file,
    ]
    .map(String::from)
    .to_vec()
}

/// A gRPC server's flags for TLS with `identity`, requiring callers' certificates signed by
/// the test CA.
fn mutual_tls_flags(pki: &TestPki, identity: &Identity) -> Vec<String> {
    ["--tls-cert", &path(&identity.cert), "--tls-key", &path(&identity.key), "--tls-client-ca", &path(&pki.ca())]
        .map(String::from)
        .to_vec()
}

/// `send`'s TLS flags: trust `ca`, present `identity` if any.
fn caller_tls_flags(ca: &Path, identity: Option<&Identity>) -> Vec<String> {
    let mut flags = vec!["--tls-ca".to_string(), path(ca)];
    if let Some(id) = identity {
        flags.extend(["--tls-cert".to_string(), path(&id.cert), "--tls-key".to_string(), path(&id.key)]);
    }
    flags
}

/// `push-manager serve` on a free loopback port watching [`PREFIX`] in the etcd at `etcd`, with
/// `extra` flags; returns it with the address it printed.
#[track_caller]
fn start_serve(etcd: &str, extra: &[impl AsRef<OsStr>]) -> (Process, String) {
    let mut args: Vec<&OsStr> =
        ["serve", "--listen", "127.0.0.1:0", "--etcd", etcd, "--prefix", PREFIX].map(OsStr::new).to_vec();
    args.extend(admin_on_free_port(&[]).iter().map(OsStr::new));
    args.extend(extra.iter().map(AsRef::as_ref));
    let mut process = Process::start(&args, &[]);
    let addr = process.line_after("listening ");
    (process, addr)
}

/// A `push-manager node` process and the addresses it printed.
struct Node {
    process: Process,
    grpc: String,
    ws: SocketAddr,
}

/// `push-manager node` `id` on free loopback ports, registering under [`PREFIX`] in the etcd at
/// `etcd`, with `extra` flags.
#[track_caller]
fn start_node(etcd: &str, id: &str, extra: &[impl AsRef<OsStr>]) -> Node {
    let mut args: Vec<&OsStr> =
        ["node", "--grpc-listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0", "--etcd", etcd, "--prefix", PREFIX]
            .map(OsStr::new)
            .to_vec();
    args.extend(["--node-id", id].map(OsStr::new));
    args.extend(admin_on_free_port(&[]).iter().map(OsStr::new));
    args.extend(extra.iter().map(AsRef::as_ref));
    let mut process = Process::start(&args, &[]);
    // "node <id> grpc <addr> ws ws://<addr>/ws"
    let line = process.line_after(&format!("node {id} grpc "));
    let [grpc, "ws", url] = line.split_whitespace().collect::<Vec<_>>()[..] else { panic!("unexpected line {line:?}") };
    let ws = url.strip_prefix("ws://").and_then(|a| a.strip_suffix("/ws")).and_then(|a| a.parse().ok());
    Node { grpc: grpc.to_string(), ws: ws.unwrap_or_else(|| panic!("unexpected WebSocket URL {url:?}")), process }
}

/// `push-manager send --server <server> --topic <topic> <flags> <body>`.
fn send(server: &str, flags: &[impl AsRef<OsStr>], topic: &str, body: &str) -> Output {
    Command::new(BIN)
        .args(["send", "--server", server, "--topic", topic, "--timeout", "3s"])
        .args(flags)
        .arg(body)
        .output()
        .expect("the binary runs")
}

fn is_unauthenticated<T>(result: grpcio::Result<T>) -> bool {
    matches!(result, Err(grpcio::Error::RpcFailure(s)) if s.code() == RpcStatusCode::UNAUTHENTICATED)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Both streams of a finished command, for looking through.
fn printed(out: &Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

#[test]
fn a_broadcast_crosses_every_secured_hop_to_subscribers_on_two_nodes() {
    let pki = TestPki::new();
    let etcd = secured_etcd(&pki, "s3cret");
    let secrets = Secrets::new();
    let password = secrets.write("etcd-password", "s3cret\n");
    let api_keys = secrets.write("api-keys", "# business servers\nkey-of-the-business-server\n");
    let token = secrets.write("node-token", "token-of-push-manager\n");

    let nodes: Vec<Node> = ["node-1", "node-2"]
        .iter()
        .map(|id| {
            let me = pki.issue(id);
            let mut flags = mutual_tls_flags(&pki, &me);
            flags.extend(["--node-token-file".into(), token.clone()]);
            flags.extend(etcd_flags(&pki, &me, &password));
            start_node(&etcd.endpoint(), id, &flags)
        })
        .collect();
    let me = pki.issue("push-manager");
    let mut flags = mutual_tls_flags(&pki, &me);
    flags.extend(["--api-key-file".into(), api_keys.clone()]);
    flags.extend(["--node-tls-ca".into(), path(&pki.ca())]);
    flags.extend(["--node-tls-cert".into(), path(&me.cert), "--node-tls-key".into(), path(&me.key)]);
    flags.extend(["--node-token-file".into(), token.clone()]);
    flags.extend(etcd_flags(&pki, &me, &password));
    let (mut serve, addr) = start_serve(&etcd.endpoint(), &flags);

    let mut subscribers: Vec<Client> = nodes.iter().map(|n| Client::subscribed(n.ws, &[TOPIC])).collect();
    let mut caller = caller_tls_flags(&pki.ca(), Some(&pki.issue("business-server")));
    caller.extend(["--api-key-file".into(), api_keys]);
    wait_until("push-manager found both nodes in etcd", PATIENCE, || {
        stdout(&send(&addr, &caller, PROBE, "probe")).contains("targeted 2 node(s), accepted by 2")
    });
    let out = send(&addr, &caller, TOPIC, "over every hop");
    assert!(out.status.success(), "{out:?}");
    for ws in &mut subscribers {
        assert_eq!(ws.next_json()["body"], "over every hop");
    }

    // `nodes` reads the registry through the same TLS and login.
    let listed = Command::new(BIN)
        .args(["nodes", "--etcd", &etcd.endpoint(), "--prefix", PREFIX])
        .args(etcd_flags(&pki, &pki.issue("operator"), &password))
        .output()
        .unwrap();
    assert!(listed.status.success(), "{listed:?}");
    for n in &nodes {
        assert!(stdout(&listed).contains(&n.grpc), "{} not in {listed:?}", n.grpc);
    }

    // So does `send --etcd`, to find push-manager's address where serve registered it.
    let send_found = |etcd_access: &[String]| {
        Command::new(BIN)
            .args(["send", "--etcd", &etcd.endpoint(), "--topic", TOPIC, "--timeout", "3s"])
            .args(etcd_access)
            .args(&caller)
            .arg("found through the secured etcd")
            .output()
            .unwrap()
    };
    let out = send_found(&etcd_flags(&pki, &pki.issue("operator"), &password));
    assert!(out.status.success(), "{out:?}");
    for ws in &mut subscribers {
        assert_eq!(ws.next_json()["body"], "found through the secured etcd");
    }
    // Without them it cannot read etcd, and says so; with them but no --etcd, it says what is missing.
    let out = send_found(&[]);
    assert!(!out.status.success() && stderr(&out).contains("--etcd"), "{}", printed(&out));
    let out = Command::new(BIN)
        .args(["send", "--topic", TOPIC, "--etcd-ca", &path(&pki.ca()), "x"])
        .args(&caller)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", printed(&out));
    assert!(stderr(&out).contains("give --etcd too"), "{}", printed(&out));

    for mut n in nodes {
        assert!(n.process.stop().success(), "{}", n.process.output());
    }
    assert!(serve.stop().success(), "{}", serve.output());
}

#[test]
fn callers_without_the_right_certificates_are_refused_and_a_good_one_is_served_after() {
    let pki = TestPki::new();
    let etcd = Etcd::start();
    let sink = Sink::start();
    etcd.client().put(&format!("{PREFIX}sink"), sink.addr.as_bytes(), None).unwrap();
    let (mut serve, addr) = start_serve(&etcd.endpoint(), &mutual_tls_flags(&pki, &pki.issue("push-manager")));
    let good = caller_tls_flags(&pki.ca(), Some(&pki.issue("business-server")));
    wait_until("push-manager found the node", PATIENCE, || {
        stdout(&send(&addr, &good, PROBE, "probe")).contains("accepted by 1")
    });

    let elsewhere = TestPki::new();
    let rogue = pki.issue_untrusted("business-server");
    // Each with the flag its message points to.
    let cases = [
        ("plaintext to the TLS port", vec![], "give --tls-ca"),
        (
            "trusting a CA that did not sign the server's certificate",
            caller_tls_flags(&elsewhere.ca(), Some(&rogue)),
            "check that --tls-ca signed",
        ),
        (
            "a certificate from a CA the server does not trust",
            caller_tls_flags(&pki.ca(), Some(&rogue)),
            "--tls-client-ca signed --tls-cert",
        ),
        ("no client certificate", caller_tls_flags(&pki.ca(), None), "give --tls-cert and --tls-key"),
    ];
    for (what, flags, hint) in &cases {
        let out = send(&addr, flags, TOPIC, what);
        assert!(!out.status.success(), "{what}: {out:?}");
        let said = stderr(&out);
        assert!(said.contains(&format!("cannot connect to {addr}")) && said.contains(hint), "{what}: {said}");
        let after = format!("after {what}");
        let out = send(&addr, &good, TOPIC, &after);
        assert!(stdout(&out).contains("accepted by 1"), "{what}: a good caller is served after: {out:?}");
    }
    let wanted: Vec<String> = cases.iter().map(|(what, _, _)| format!("after {what}")).collect();
    let delivered = || -> Vec<String> {
        let bodies = sink.bodies().into_iter().map(|b| String::from_utf8(b).unwrap());
        bodies.filter(|b| b != "probe").collect()
    };
    wait_until("the good caller's broadcasts reach the node", PATIENCE, || delivered().len() == wanted.len());
    assert_eq!(delivered(), wanted, "only the good caller's broadcasts got through");
    assert!(serve.stop().success(), "{}", serve.output());
}

#[test]
fn without_the_right_api_key_nothing_is_queued_and_the_refusal_says_how_to_send_one() {
    let etcd = Etcd::start();
    let sink = Sink::start();
    etcd.client().put(&format!("{PREFIX}sink"), sink.addr.as_bytes(), None).unwrap();
    let secrets = Secrets::new();
    let keys = secrets.write("api-keys", "# one key\nright-key\n");
    let manager = Manager::start(manager::Config {
        listen: "127.0.0.1:0".into(),
        etcd: etcd::Config { endpoints: vec![etcd.endpoint()], ..etcd::Config::default() },
        prefix: PREFIX.into(),
        api_key_file: Some(keys.into()),
        ..manager::Config::default()
    })
    .unwrap();
    wait_until("the node is known", PATIENCE, || manager.nodes().len() == 1);
    let addr = manager.addr().to_string();
    let client = push_client(&addr);
    let req = |body: &str| broadcast_request(TOPIC, OP, 0, body);
    let header = |value: &str| {
        let mut headers = MetadataBuilder::new();
        headers.add_str("authorization", value).unwrap();
        CallOption::default().headers(headers.build())
    };

    let refusals = [
        ("no key", client.broadcast(&req("no key"))),
        ("a wrong key", client.broadcast_opt(&req("wrong"), with_key("wrong-key"))),
        ("a prefix of the key", client.broadcast_opt(&req("prefix"), with_key("right-ke"))),
        ("the key and more", client.broadcast_opt(&req("longer"), with_key("right-key2"))),
        ("another scheme", client.broadcast_opt(&req("basic"), header("Basic right-key"))),
        ("no scheme", client.broadcast_opt(&req("bare"), header("right-key"))),
    ];
    for (what, result) in refusals {
        let status = refused(result, RpcStatusCode::UNAUTHENTICATED);
        assert!(status.message().contains("authorization: Bearer"), "{what}: {status:?}");
    }
    let from_env = |key: &str, body: &str| {
        let mut send = Command::new(BIN);
        send.args(["send", "--server", &addr, "--topic", TOPIC, body]).env("PUSH_MANAGER_API_KEY", key);
        send.output().unwrap()
    };
    let out = from_env("wrong-key", "wrong from the environment");
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr(&out).contains("authorization: Bearer"), "{out:?}");

    let node = &manager.nodes()[0];
    let offered = (node.enqueued, node.dropped_full, node.dropped_closing, node.rpcs);
    assert_eq!(offered, (0, 0, 0, 0), "nothing refused was queued: {node:?}");
    assert_eq!(sink.count(), 0);

    let reply = client.broadcast_opt(&req("right key"), with_key("right-key")).expect("the right key works");
    assert_eq!(reply.get_accepted(), 1);
    let out = from_env("right-key", "right key from the environment");
    assert!(stdout(&out).contains("accepted by 1"), "{out:?}");
    wait_until("both delivered", PATIENCE, || sink.count() == 2);
    assert_eq!(sink.bodies(), [&b"right key"[..], b"right key from the environment"]);
    assert_eq!(manager.nodes()[0].enqueued, 2);
}

#[test]
fn connect_node_refuses_calls_without_its_token_or_over_its_limits_and_delivers_none_of_them() {
    let etcd = Etcd::start();
    let secrets = Secrets::new();
    let token = secrets.write("node-token", "the-node-token\n");
    let flags = ["--node-token-file", &token, "--max-message-bytes", "64", "--max-batch-messages", "4"];
    let mut node = start_node(&etcd.endpoint(), "guarded", &flags);
    let mut ws = Client::subscribed(node.ws, &[TOPIC]);
    let client = node_client(&node.grpc);
    let msg = |seq: i32, body: &[u8]| broadcast_request(TOPIC, OP, seq, body);
    let ok = || with_key("the-node-token");

    let unauthenticated = [
        ("no token", client.broadcast(&msg(1, b"no token"))),
        ("a wrong token", client.broadcast_opt(&msg(2, b"wrong token"), with_key("not-the-token"))),
        ("a batch without a token", client.broadcast_batch(&batch(vec![msg(3, b"batch")]))),
    ];
    for (what, result) in unauthenticated {
        let status = refused(result, RpcStatusCode::UNAUTHENTICATED);
        assert!(status.message().contains("authorization: Bearer"), "{what}: {status:?}");
    }
    let too_many = batch((4..9).map(|seq| msg(seq, b"one of five")).collect());
    let one_bad = batch(vec![msg(9, b"fine"), msg(10, &[b'x'; 65])]);
    let invalid = [
        ("a body over the limit", client.broadcast_opt(&msg(4, &[b'x'; 65]), ok()), "--max-message-bytes"),
        ("a bad topic", client.broadcast_opt(&broadcast_request("a b", OP, 5, "x"), ok()), "whitespace"),
        ("a batch over the limit", client.broadcast_batch_opt(&too_many, ok()), "--max-batch-messages"),
        ("a batch with one bad message", client.broadcast_batch_opt(&one_bad, ok()), "messages[1]"),
    ];
    for (what, result, reason) in invalid {
        let status = refused(result, RpcStatusCode::INVALID_ARGUMENT);
        assert!(status.message().contains(reason), "{what}: {status:?}");
    }

    // The limits are inclusive: a full batch with a body at the limit goes through, and is the
    // first thing the subscriber receives.
    let full = batch((11..15).map(|seq| msg(seq, if seq == 14 { &[b'y'; 64] } else { b"ok" })).collect());
    let reply = client.broadcast_batch_opt(&full, ok()).expect("a full batch with the token");
    assert_eq!((reply.get_received(), reply.get_delivered()), (4, 4));
    for seq in 11..15 {
        assert_eq!(ws.next_json()["seq"], seq, "nothing refused reached the subscriber");
    }
    assert!(node.process.stop().success(), "{}", node.process.output());
}

#[test]
fn sighup_rotates_api_keys_and_node_tokens_without_dropping_a_subscriber() {
    let etcd = Etcd::start();
    let secrets = Secrets::new();
    let api_keys = secrets.write("api-keys", "key-a\n");
    let serve_token = secrets.write("serve-token", "token-a\n");
    let node_token = secrets.write("node-token", "token-a\n");
    let mut node = start_node(&etcd.endpoint(), "rotating", &["--node-token-file", &node_token]);
    let (mut serve, addr) =
        start_serve(&etcd.endpoint(), &["--api-key-file", &api_keys, "--node-token-file", &serve_token]);
    let mut ws = Client::subscribed(node.ws, &[TOPIC]);
    let push = push_client(&addr);
    let broadcast =
        |key: &str, topic: &str, body: &str| push.broadcast_opt(&broadcast_request(topic, OP, 0, body), with_key(key));
    wait_until("push-manager found the node", PATIENCE, || {
        broadcast("key-a", PROBE, "probe").is_ok_and(|r| r.get_accepted() == 1)
    });
    broadcast("key-a", TOPIC, "with key a").unwrap();
    assert_eq!(ws.next_json()["body"], "with key a");

    secrets.write("api-keys", "key-b\n");
    signal(&serve.child, libc::SIGHUP);
    wait_until("key a is refused", PATIENCE, || is_unauthenticated(broadcast("key-a", PROBE, "probe")));
    assert_eq!(broadcast("key-b", TOPIC, "with key b").expect("key b works").get_accepted(), 1);
    assert!(is_unauthenticated(broadcast("key-a", TOPIC, "with key a again")));
    assert_eq!(
        ws.next_json()["body"],
        "with key b",
        "the subscriber is still connected, and key a got nothing through"
    );

    secrets.write("serve-token", "token-b\n");
    secrets.write("node-token", "token-b\n");
    signal(&node.process.child, libc::SIGHUP);
    signal(&serve.child, libc::SIGHUP);
    let direct = node_client(&node.grpc);
    let call = |token: &str| direct.broadcast_opt(&broadcast_request(PROBE, OP, 0, "direct"), with_key(token));
    wait_until("the node refuses token a", PATIENCE, || is_unauthenticated(call("token-a")));
    call("token-b").expect("the node takes token b");
    // One reload line per SIGHUP: the second says push-manager sends token b from now on.
    serve.wait_for("reloaded node token", 2);
    assert_eq!(broadcast("key-b", TOPIC, "with token b").unwrap().get_accepted(), 1);
    assert_eq!(ws.next_json()["body"], "with token b", "push-manager reached the node with the new token");

    assert!(node.process.stop().success(), "{}", node.process.output());
    assert!(serve.stop().success(), "{}", serve.output());
}

#[test]
fn serve_and_node_refuse_an_open_address_without_authentication_unless_told_to() {
    let pki = TestPki::new();
    let server = pki.issue("push-manager");
    // Nothing listens there: starting does not wait for etcd.
    let etcd = free_addr();
    let open_serve =
        ["serve", "--listen", "0.0.0.0:0", "--etcd", &etcd, "--etcd-timeout", "300ms", "--admin-listen", "127.0.0.1:0"];
    let open_node = [
        "node",
        "--admin-listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "0.0.0.0:0",
        "--ws-listen",
        "127.0.0.1:0",
        "--etcd",
        &etcd,
        "--etcd-timeout",
        "300ms",
        "--node-id",
        "open",
    ];
    // TLS without client certificates proves nothing about the caller.
    let tls_only = ["--tls-cert", &path(&server.cert), "--tls-key", &path(&server.key)];
    for (role, open, flag) in [("serve", &open_serve[..], "--listen"), ("node", &open_node[..], "--grpc-listen")] {
        for extra in [&[][..], &tls_only[..]] {
            // A process, not `output()`: one that wrongly serves fails the test instead of hanging it.
            let mut refused = Process::start(&[open, extra].concat(), &[]);
            assert!(!refused.wait().success(), "{role} {extra:?}: {}", refused.output());
            let said = refused.output();
            assert!(said.contains("--allow-unauthenticated") && said.contains(&format!("{flag} 0.0.0.0:0")), "{said}");
            assert!(!said.contains("listening") && !said.contains(" grpc "), "{role} never started serving: {said}");
        }
    }

    let mut serve = Process::start(&[&open_serve[..], &["--allow-unauthenticated"]].concat(), &[]);
    assert!(serve.line_after("listening ").starts_with("0.0.0.0:"), "{}", serve.output());
    let mut node = Process::start(&[&open_node[..], &["--allow-unauthenticated"]].concat(), &[]);
    assert!(node.line_after("node open grpc ").starts_with("0.0.0.0:"), "{}", node.output());
    assert!(serve.stop().success(), "{}", serve.output());
    assert!(node.stop().success(), "{}", node.output());
}

#[test]
fn secrets_stay_out_of_logs_messages_and_help() {
    const API_KEY: &str = "api-key-5b2c9e0d";
    const TOKEN: &str = "node-token-8d41a7f3";
    const PASSWORD: &str = "etcd-password-0f5e19c4";
    const WRONG_KEY: &str = "wrong-key-c3f0a1b8";
    const WRONG_TOKEN: &str = "wrong-token-77e2d0aa";
    const WRONG_PASSWORD: &str = "wrong-password-4a9be6c1";
    let pki = TestPki::new();
    let etcd = secured_etcd(&pki, PASSWORD);
    let ep = etcd.endpoint();
    let secrets = Secrets::new();
    let keys = secrets.write("api-keys", &format!("{API_KEY}\n"));
    let token = secrets.write("node-token", &format!("{TOKEN}\n"));
    let wrong_keys = secrets.write("wrong-api-keys", &format!("{WRONG_KEY}\n"));
    let password = secrets.write("etcd-password", &format!("{PASSWORD}\n"));
    let wrong_password = secrets.write("wrong-etcd-password", &format!("{WRONG_PASSWORD}\n"));
    let me = pki.issue("push-manager");
    let debug_with = |flags: &[&str], etcd: Vec<String>| -> Vec<String> {
        let mut all: Vec<String> = ["--log-level", "debug"].iter().chain(flags).map(|s| s.to_string()).collect();
        all.extend(etcd);
        all
    };
    let mut shown: Vec<(String, String)> = Vec::new();

    // A wrong API key and a wrong node token, everything else right, everything logged.
    let mut node = start_node(&ep, "n1", &debug_with(&["--node-token-file", &token], etcd_flags(&pki, &me, &password)));
    let flags = ["--api-key-file", &keys, "--node-token-file", &token];
    let (mut serve, addr) = start_serve(&ep, &debug_with(&flags, etcd_flags(&pki, &me, &password)));
    let mut ws = Client::subscribed(node.ws, &[TOPIC]);
    wait_until("push-manager found the node", PATIENCE, || {
        stdout(&send(&addr, &["--api-key-file", &keys], PROBE, "probe")).contains("accepted by 1")
    });
    let out = send(&addr, &["--api-key-file", &wrong_keys], TOPIC, "wrong key");
    assert!(!out.status.success(), "{out:?}");
    shown.push(("send with a wrong key".into(), printed(&out)));
    let status = refused(
        node_client(&node.grpc).broadcast_opt(&broadcast_request(TOPIC, OP, 0, "x"), with_key(WRONG_TOKEN)),
        RpcStatusCode::UNAUTHENTICATED,
    );
    shown.push(("the node's refusal".into(), status.message().to_string()));
    // The right key and token at work, at debug level.
    assert!(send(&addr, &["--api-key-file", &keys], TOPIC, "right key").status.success());
    assert_eq!(ws.next_json()["body"], "right key");
    assert!(serve.stop().success(), "{}", serve.output());
    assert!(node.process.stop().success(), "{}", node.process.output());
    shown.push(("serve's log".into(), serve.output()));
    shown.push(("the node's log".into(), node.process.output()));

    // A wrong etcd password, from a file and from the environment.
    let wrong = etcd_flags(&pki, &me, &wrong_password);
    let (mut serve, _) = start_serve(&ep, &debug_with(&[], wrong.clone()));
    // push-manager goes on serving (etcd may be fixed under it) and logs why it finds no node.
    serve.wait_for("refused to authenticate user \"pm\"", 1);
    assert!(serve.stop().success(), "{}", serve.output());
    shown.push(("serve's log with a wrong etcd password".into(), serve.output()));
    // A node cannot register with it, for good: it says so and exits.
    let mut args =
        ["node", "--grpc-listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0", "--etcd", &ep, "--prefix", PREFIX]
            .map(String::from)
            .to_vec();
    args.extend(admin_on_free_port(&[]).iter().map(|a| a.to_string()));
    args.extend(debug_with(&["--node-token-file", &token], wrong.clone()));
    let mut node = Process::start(&args, &[]);
    assert!(!node.wait().success(), "{}", node.output());
    assert!(node.output().contains("refused to authenticate user \"pm\""), "{}", node.output());
    shown.push(("the node's log with a wrong etcd password".into(), node.output()));
    let out = Command::new(BIN).args(["nodes", "--etcd", &ep, "--prefix", PREFIX]).args(&wrong).output().unwrap();
    assert!(!out.status.success() && stderr(&out).contains("--etcd-user"), "{out:?}");
    shown.push(("nodes with a wrong etcd password".into(), printed(&out)));
    let out = Command::new(BIN)
        .args(["nodes", "--etcd", &ep, "--prefix", PREFIX, "--etcd-user", ETCD_USER])
        .args(["--etcd-ca", &path(&pki.ca()), "--etcd-cert", &path(&me.cert), "--etcd-key", &path(&me.key)])
        .env("PUSH_MANAGER_ETCD_PASSWORD", WRONG_PASSWORD)
        .output()
        .unwrap();
    assert!(!out.status.success() && stderr(&out).contains("--etcd-user"), "{out:?}");
    shown.push(("nodes with a wrong etcd password from the environment".into(), printed(&out)));

    // Help, with the secrets in the environment `send` and the etcd flags read.
    for sub in ["serve", "node", "send", "nodes"] {
        let out = Command::new(BIN)
            .args([sub, "--help"])
            .env("PUSH_MANAGER_API_KEY", API_KEY)
            .env("PUSH_MANAGER_ETCD_PASSWORD", PASSWORD)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        shown.push((format!("{sub} --help"), printed(&out)));
    }

    for (what, text) in &shown {
        for secret in [API_KEY, TOKEN, PASSWORD, WRONG_KEY, WRONG_TOKEN, WRONG_PASSWORD] {
            assert!(!text.contains(secret), "{what} shows {secret}:\n{text}");
        }
    }
}

#[test]
fn a_refused_etcd_user_is_named_to_callers_instead_of_no_node_registered() {
    let pki = TestPki::new();
    let etcd = secured_etcd(&pki, "s3cret");
    let wrong = etcd::Config {
        auth: Some(etcd::Credentials { user: ETCD_USER.into(), password: push_manager::secret::Secret::new("nope") }),
        ..etcd.config()
    };
    let manager = Manager::start(manager::Config {
        listen: "127.0.0.1:0".into(),
        etcd: wrong,
        prefix: PREFIX.into(),
        ..manager::Config::default()
    })
    .unwrap();
    let client = push_client(manager.addr());
    let mut message = String::new();
    wait_until("the listing has failed once", PATIENCE, || {
        match client.broadcast(&broadcast_request("", OP, 0, "x")) {
            Err(grpcio::Error::RpcFailure(status)) => message = status.message().to_string(),
            other => panic!("no node can be known: {other:?}"),
        }
        message.contains("fails")
    });
    assert!(message.contains("refused to authenticate") && message.contains(ETCD_USER), "{message}");
    assert!(!message.contains("nope"), "the password stays out of the reply: {message}");
}

#[test]
fn a_node_whose_etcd_role_predates_the_websocket_record_still_registers_and_is_used() {
    let pki = TestPki::new();
    // As granted before nodes published their WebSocket URL: the nodes' prefix only.
    let etcd = etcd_granting(&pki, "s3cret", &[PREFIX]);
    let secrets = Secrets::new();
    let password = secrets.write("etcd-password", "s3cret\n");
    let me = pki.issue("old-role");
    let mut node = start_node(&etcd.endpoint(), "old-role", &etcd_flags(&pki, &me, &password));
    node.process.wait_for("/secure/nodes-ws/old-role", 1);
    assert!(node.process.output().contains("registering without it"), "{}", node.process.output());

    let mut flags = etcd_flags(&pki, &pki.issue("push-manager"), &password);
    flags.push("--no-register".into());
    let (mut serve, addr) = start_serve(&etcd.endpoint(), &flags);
    let mut user = Client::subscribed(node.ws, &[TOPIC]);
    wait_until("push-manager found the node by its gRPC record", PATIENCE, || {
        stdout(&send(&addr, &[] as &[&str], PROBE, "probe")).contains("accepted by 1")
    });
    assert!(send(&addr, &[] as &[&str], TOPIC, "still delivered").status.success());
    assert_eq!(user.next_json()["body"], "still delivered");
    assert!(node.process.stop().success(), "{}", node.process.output());
    assert!(serve.stop().success(), "{}", serve.output());
}
