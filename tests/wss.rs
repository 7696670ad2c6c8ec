//! Secure WebSockets served by the connect-node itself (`--ws-tls-cert`, `--ws-tls-key`): real
//! certificates made by the test's own CA, real tungstenite clients over rustls trusting it, a
//! real etcd and push-manager for the whole path, and the real binary for its flags.

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::gateway::{start_gateway, wait_connections};
use common::grpc::{batch, broadcast, node_client, push_client, OP};
use common::ws::{raw_exchange, upgrade_request, Client, TlsStream};
use common::{free_addr, wait_until, BIN, PATIENCE};
use push_manager::gateway::{Gateway, WsTls};
use push_manager::manager::Manager;
use push_manager::proto::broadcast_request;
use push_manager::registry::{Record, Registration, RegistrationConfig};
use push_manager::testkit::{signal, spawn_node, wait_exit, Identity, Reaped, TestPki};
use serde_json::Value;

const PREFIX: &str = "/wss/nodes/";

/// A gateway serving `wss://` with a certificate for 127.0.0.1 signed by `pki`'s CA.
fn start_tls_gateway(pki: &TestPki, tweak: impl FnOnce(&mut push_manager::gateway::Config)) -> Gateway {
    let Identity { cert, key } = pki.issue("node");
    start_gateway(|c| {
        c.ws_tls = Some(WsTls { cert, key });
        tweak(c);
    })
}

#[track_caller]
fn assert_delivery(frame: &Value, topic: &str, seq: i64, body: &str) {
    assert_eq!(frame["type"], "message", "{frame}");
    assert_eq!(frame["topic"], topic, "{frame}");
    assert_eq!(frame["seq"], seq, "{frame}");
    assert_eq!(frame["body"], body, "{frame}");
}

/// Proves `client` is still served: a broadcast to everyone reaches it.
#[track_caller]
fn assert_still_served(gw: &Gateway, client: &mut Client<TlsStream>, seq: i32) {
    gw.hub().publish(&broadcast_request("", OP, seq, b"still here"));
    assert_delivery(&client.next_json(), "", seq.into(), "still here");
}

#[test]
fn wss_end_to_end_carries_small_fragmented_and_bursts_of_broadcasts_in_order() {
    let pki = TestPki::new();
    let etcd = Etcd::start();
    let manager = Manager::start(common::manager::config(&etcd, PREFIX)).unwrap();
    let gw = start_tls_gateway(&pki, |_| {});
    let _registration = Registration::start(
        etcd.client(),
        RegistrationConfig {
            records: vec![Record::new(format!("{PREFIX}n1"), gw.grpc_addr().to_string())],
            ttl: Duration::from_secs(5),
        },
    )
    .unwrap();
    wait_until("the TLS node is discovered", PATIENCE, || manager.nodes().len() == 1);
    let mut by_query = Client::connect_tls(gw.ws_addr(), "/ws?topic=news", &pki.ca());
    let mut by_command = Client::subscribed_tls(gw.ws_addr(), &["news"], &pki.ca());
    wait_connections(&gw, 2);
    let business = push_client(manager.addr());

    assert_eq!(broadcast(&business, "news", "hello over TLS").get_accepted(), 1);
    // Bigger than a fragment (4 KiB), a TLS record (16 KiB) and rustls' buffer limit (32 KiB).
    let big: String = ('a'..='z').cycle().take(100 << 10).collect();
    assert_eq!(broadcast(&business, "news", &big).get_accepted(), 1);
    for client in [&mut by_query, &mut by_command] {
        assert_eq!(client.next_json()["body"], "hello over TLS");
        assert_eq!(client.next_json()["body"], big.as_str());
    }

    // The burst goes to the node directly, whose batches keep their order.
    let node = node_client(gw.grpc_addr());
    const BURST: i32 = 1000;
    for start in (1..=BURST).step_by(100) {
        let messages = (start..start + 100).map(|seq| broadcast_request("news", OP, seq, format!("m{seq}"))).collect();
        assert_eq!(node.broadcast_batch(&batch(messages)).unwrap().get_received(), 100);
    }
    for client in [&mut by_query, &mut by_command] {
        for seq in 1..=BURST {
            assert_delivery(&client.next_json(), "news", seq.into(), &format!("m{seq}"));
        }
    }
    assert_eq!(gw.stats().tls_rejected, 0);
}

#[test]
fn plaintext_and_garbage_clients_on_the_tls_port_are_refused_and_counted_while_wss_clients_keep_receiving() {
    let pki = TestPki::new();
    let gw = start_tls_gateway(&pki, |_| {});
    let mut bystander = Client::connect_tls(gw.ws_addr(), "/ws", &pki.ca());
    wait_connections(&gw, 1);

    match Client::try_connect(gw.ws_addr(), "/ws") {
        Err(e) => assert!(!matches!(e, tungstenite::Error::Http(_)), "no HTTP answer in plaintext: {e}"),
        Ok(_) => panic!("a plaintext WebSocket client was upgraded on the TLS port"),
    }
    wait_until("the plaintext client is counted", PATIENCE, || gw.stats().tls_rejected == 1);

    // Whatever comes back is a TLS alert at most, never HTTP; then the socket is closed.
    let answer = raw_exchange(gw.ws_addr(), upgrade_request(gw.ws_addr(), "/ws").as_bytes());
    assert!(!answer.contains("HTTP"), "{answer:?}");
    let answer = raw_exchange(gw.ws_addr(), b"\x00\x01garbage\r\n\r\n\xff\xfe");
    assert!(!answer.contains("HTTP"), "{answer:?}");
    wait_until("each refusal is counted", PATIENCE, || gw.stats().tls_rejected == 3);
    wait_until("the refused sockets are let go", PATIENCE, || gw.stats().connections_held == 1);

    assert_eq!(gw.stats().http_rejected, 0);
    assert_still_served(&gw, &mut bystander, 1);
    // The wss endpoint still upgrades new clients.
    let mut late = Client::connect_tls(gw.ws_addr(), "/ws", &pki.ca());
    wait_connections(&gw, 2);
    assert_still_served(&gw, &mut late, 2);
}

#[test]
fn a_client_that_does_not_trust_the_node_certificate_cannot_connect_and_the_node_goes_on() {
    let pki = TestPki::new();
    let stranger = TestPki::new();
    let gw = start_tls_gateway(&pki, |_| {});
    let mut bystander = Client::connect_tls(gw.ws_addr(), "/ws", &pki.ca());
    wait_connections(&gw, 1);

    let err = Client::try_connect_tls(gw.ws_addr(), "/ws", &stranger.ca()).err().expect("the handshake fails");
    assert!(err.to_string().contains("certificate"), "{err}");
    wait_until("the failed handshake is counted", PATIENCE, || gw.stats().tls_rejected == 1);
    assert_still_served(&gw, &mut bystander, 1);
}

#[test]
fn wss_refusals_of_the_upgrade_itself_are_answered_in_http_through_tls() {
    let pki = TestPki::new();
    let gw = start_tls_gateway(&pki, |_| {});
    match Client::try_connect_tls(gw.ws_addr(), "/elsewhere", &pki.ca()) {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 404),
        other => panic!("expected HTTP 404, got {:?}", other.map(|_| "a WebSocket")),
    }
    wait_until("the 404 is counted", PATIENCE, || gw.stats().http_rejected == 1);
    assert_eq!(gw.stats().tls_rejected, 0);
}

#[test]
fn a_slow_wss_consumer_is_closed_with_4000_while_a_fast_one_gets_everything() {
    let pki = TestPki::new();
    let gw = start_tls_gateway(&pki, |c| {
        c.event_loops = 1;
        c.max_out_buffer = 256 << 10;
    });
    let mut slow = Client::subscribed_tls(gw.ws_addr(), &["big"], &pki.ca());
    let mut fast = Client::subscribed_tls(gw.ws_addr(), &["big"], &pki.ca());
    wait_connections(&gw, 2);

    // As in the plaintext test: more than the kernel buffers of a client that never reads plus
    // max_out_buffer, with the publisher at most WINDOW messages ahead of the fast client.
    const N: i32 = 400;
    const WINDOW: i32 = 4;
    let body = vec![b'x'; 32 << 10];
    let (received, progress) = crossbeam_channel::unbounded();
    let reader = std::thread::spawn(move || {
        for seq in 0..N {
            let frame = fast.next_json();
            assert_eq!(frame["seq"], seq, "the fast client must get every message, in order");
            received.send(seq).unwrap();
        }
        fast
    });
    for seq in 0..N {
        if seq >= WINDOW {
            let got = progress.recv_timeout(PATIENCE).expect("the fast client keeps up");
            assert_eq!(got, seq - WINDOW);
        }
        gw.hub().publish(&broadcast_request("big", OP, seq, body.as_slice()));
    }
    let mut fast = reader.join().expect("the fast client received all messages");
    wait_until("the slow consumer is closed", PATIENCE, || gw.stats().closed_slow == 1);
    assert_eq!(gw.hub().connections(), 1);

    let (code, reason) = slow.expect_close();
    assert_eq!((code, reason.as_str()), (4000, "slow consumer: outgoing buffer overflow"));
    assert_still_served(&gw, &mut fast, N);
}

#[test]
fn shutdown_closes_wss_clients_with_1001_then_close_notify() {
    let pki = TestPki::new();
    let mut gw = start_tls_gateway(&pki, |c| c.event_loops = 2);
    let ws_addr = gw.ws_addr();
    let ca = pki.ca();
    let clients: Vec<Client<TlsStream>> = (0..3).map(|_| Client::connect_tls(ws_addr, "/ws", &ca)).collect();
    wait_connections(&gw, 3);
    gw.hub().publish(&broadcast_request("", OP, 1, b"last words"));

    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            std::thread::spawn(move || {
                assert_delivery(&client.next_json(), "", 1, "last words");
                let close = client.expect_close();
                // A clean end: the node's close_notify, not a truncated TLS stream.
                loop {
                    match client.ws.read() {
                        Ok(_) => continue,
                        Err(tungstenite::Error::ConnectionClosed) => break,
                        Err(e) => panic!("expected a clean close, got {e}"),
                    }
                }
                close
            })
        })
        .collect();
    let started = Instant::now();
    gw.shutdown();
    for reader in readers {
        let (code, reason) = reader.join().expect("client saw the close");
        assert_eq!((code, reason.as_str()), (1001, "server shutting down"));
    }
    assert!(started.elapsed() < PATIENCE);
    assert_eq!(gw.stats().connections_open, 0);
    assert!(TcpStream::connect(ws_addr).is_err(), "the WebSocket listener is closed");
}

/// Runs `push-manager node` with `flags` and returns its standard error, asserting it refused
/// to start.
#[track_caller]
fn node_refuses(flags: &[&Path]) -> String {
    let args: Vec<&std::ffi::OsStr> = flags.iter().map(|f| f.as_os_str()).collect();
    let out = Command::new(BIN)
        .args(["node", "--grpc-listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0", "--etcd", &free_addr()])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{flags:?} should be refused; stderr {stderr:?}");
    stderr
}

#[test]
fn bad_ws_tls_flags_stop_the_node_with_a_message_naming_the_flag() {
    let pki = TestPki::new();
    let node = pki.issue("node");
    let other = pki.issue("other");
    let cert_flag = Path::new("--ws-tls-cert");
    let key_flag = Path::new("--ws-tls-key");
    let missing = pki.dir().join("missing.pem");
    let empty = pki.dir().join("empty.pem");
    std::fs::write(&empty, "no PEM in here\n").unwrap();

    let stderr = node_refuses(&[cert_flag, &node.cert]);
    assert!(stderr.contains("--ws-tls-key"), "{stderr}");
    let stderr = node_refuses(&[key_flag, &node.key]);
    assert!(stderr.contains("--ws-tls-cert"), "{stderr}");

    let stderr = node_refuses(&[cert_flag, &missing, key_flag, &node.key]);
    assert!(stderr.contains("--ws-tls-cert") && stderr.contains("cannot read"), "{stderr}");
    let stderr = node_refuses(&[cert_flag, &node.cert, key_flag, &missing]);
    assert!(stderr.contains("--ws-tls-key") && stderr.contains("cannot read"), "{stderr}");
    // A key where the certificate should be, and a file with no PEM at all.
    let stderr = node_refuses(&[cert_flag, &node.key, key_flag, &node.key]);
    assert!(stderr.contains("--ws-tls-cert") && stderr.contains("no PEM certificate"), "{stderr}");
    let stderr = node_refuses(&[cert_flag, &node.cert, key_flag, &empty]);
    assert!(stderr.contains("--ws-tls-key") && stderr.contains("no PEM private key"), "{stderr}");
    let stderr = node_refuses(&[cert_flag, &node.cert, key_flag, &other.key]);
    assert!(stderr.contains("--ws-tls-key") && stderr.contains("does not go with"), "{stderr}");

    // The same files in a config built in code: refused before anything starts.
    let config = push_manager::gateway::Config {
        grpc_listen: "127.0.0.1:0".into(),
        ws_listen: "127.0.0.1:0".into(),
        ws_tls: Some(WsTls { cert: node.cert.clone(), key: other.key.clone() }),
        ..push_manager::gateway::Config::default()
    };
    let err = Gateway::start(config).expect_err("refused").to_string();
    assert!(err.contains("--ws-tls-key"), "{err}");

    // And the right pair serves.
    let gw = start_gateway(|c| c.ws_tls = Some(WsTls { cert: node.cert.clone(), key: node.key.clone() }));
    let mut client = Client::connect_tls(gw.ws_addr(), "/ws", &pki.ca());
    wait_connections(&gw, 1);
    assert_still_served(&gw, &mut client, 1);
}

#[test]
fn the_node_binary_serves_wss_and_closes_it_with_1001_on_sigterm() {
    let pki = TestPki::new();
    let Identity { cert, key } = pki.issue("node");
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    // etcd is unreachable: the node serves and registers in the background.
    let mut node = spawn_node(BIN, &free_addr(), PREFIX, "tls-node", &["--ws-tls-cert", cert, "--ws-tls-key", key]);
    let mut client = Client::connect_tls(node.ws_addr, "/ws", &pki.ca());
    let ack = client.command("subscribe", &["a"]);
    assert_eq!(ack["type"], "subscribed", "{ack}");
    signal(&node.child, libc::SIGTERM);
    assert_eq!(client.expect_close().0, 1001);
    assert!(wait_exit(&mut node.child, PATIENCE).success());
}

#[test]
fn subscribe_follows_a_wss_url_with_its_ca_and_says_what_is_missing_without_it() {
    let pki = TestPki::new();
    let gw = start_tls_gateway(&pki, |_| {});
    let url = format!("wss://{}/ws", gw.ws_addr());

    let out = Command::new(BIN).args(["subscribe", "--url", &url]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca"), "{out:?}");
    let stranger = TestPki::new();
    let out = Command::new(BIN).args(["subscribe", "--url", &url, "--ca"]).arg(stranger.ca()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("certificate"), "{out:?}");

    let mut child = Reaped::spawn(
        Command::new(BIN)
            .args(["subscribe", "--url", &url, "--topic", "news", "--count", "1", "--ca"])
            .arg(pki.ca())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    wait_connections(&gw, 1);
    gw.hub().publish(&broadcast_request("news", OP, 5, "over wss"));
    let out = child.output_within(PATIENCE);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let frame: Value = serde_json::from_str(stdout.lines().next().expect("one delivery")).unwrap();
    assert_delivery(&frame, "news", 5, "over wss");
}
