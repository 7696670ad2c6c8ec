//! `PushServer.BroadcastStream` and `PushUsersStream` (issue #12): many messages over one call,
//! one reply per message in order, a refused message answered without ending the stream, the
//! API key checked once at the start, no node reported per message, flow control holding back a
//! caller that does not read its replies; and `push-manager send --count/--rate/--lines`.
//! Real etcd, an in-process push-manager, real connect-nodes or `testkit::Sink` nodes.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use futures::executor::block_on;
use futures::{SinkExt, StreamExt, TryStreamExt};
use grpcio::{ClientDuplexReceiver, RpcStatusCode, WriteFlags};
use tempfile::TempDir;

use common::etcd::Etcd;
use common::gateway::{start_gateway, wait_connections};
use common::grpc::{push_client, with_key, OP};
use common::ws::Client;
use common::{wait_until, BIN, PATIENCE};
use push_manager::manager::{Config, Manager};
use push_manager::proto::protocol::{
    BroadCastReq, BroadcastStreamReq, PushUsersReq, PushUsersStreamReq, StreamReplies, StreamReply,
};
use push_manager::proto::protocol_grpc::PushServerClient;
use push_manager::proto::{broadcast_request, push_users_request};
use push_manager::testkit::{poll_until, Reaped, Sink};

const PREFIX: &str = "/stream/nodes/";

fn register(etcd: &Etcd, id: &str, addr: &str) {
    etcd.client().put(&format!("{PREFIX}{id}"), addr.as_bytes(), None).unwrap();
}

/// A manager with `nodes` sinks registered and known.
fn with_sinks(etcd: &Etcd, nodes: usize, tweak: impl FnOnce(&mut Config)) -> (Manager, Vec<Sink>) {
    let sinks: Vec<Sink> = (0..nodes).map(|_| Sink::start()).collect();
    for (i, sink) in sinks.iter().enumerate() {
        register(etcd, &format!("n{i}"), &sink.addr);
    }
    let mut config = common::manager::config(etcd, PREFIX);
    tweak(&mut config);
    let manager = Manager::start(config).unwrap();
    wait_until("every node known", PATIENCE, || manager.nodes().len() == nodes);
    (manager, sinks)
}

/// Sends `elements` over one stream, closes it, and returns every reply, element by element (or
/// the call's error).
fn stream_all<Element: Send + 'static>(
    (mut tx, rx): (grpcio::ClientDuplexSender<Element>, ClientDuplexReceiver<StreamReplies>),
    elements: Vec<Element>,
) -> grpcio::Result<Vec<Vec<StreamReply>>> {
    let writer = thread::spawn(move || {
        block_on(async {
            for e in elements {
                tx.send((e, WriteFlags::default())).await?;
            }
            tx.close().await
        })
    });
    let replies = block_on(rx.map_ok(|mut r| r.take_replies().into_vec()).try_collect::<Vec<_>>());
    // A write fails when the server ended the call; its status is the reader's error.
    let _ = writer.join().unwrap();
    replies
}

fn broadcasts(messages: Vec<BroadCastReq>) -> BroadcastStreamReq {
    BroadcastStreamReq { messages: messages.into(), ..Default::default() }
}

fn pushes(messages: Vec<PushUsersReq>) -> PushUsersStreamReq {
    PushUsersStreamReq { messages: messages.into(), ..Default::default() }
}

/// `v` sorted: a `Sink` records batches as they arrive, and two workers per node may deliver
/// them out of order (a real node puts them back in order by their sequence numbers).
fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

fn body(i: usize) -> String {
    format!("m{i}")
}

#[test]
fn messages_over_one_stream_get_one_reply_each_in_order_and_reach_users_in_order() {
    const N: usize = 500;
    let etcd = Etcd::start();
    let nodes = [start_gateway(|_| {}), start_gateway(|_| {})];
    for (i, node) in nodes.iter().enumerate() {
        register(&etcd, &format!("n{i}"), &node.grpc_addr().to_string());
    }
    let manager = Manager::start(common::manager::config(&etcd, PREFIX)).unwrap();
    wait_until("both nodes known", PATIENCE, || manager.nodes().len() == 2);
    let mut users: Vec<Client> = nodes.iter().map(|n| Client::subscribed(n.ws_addr(), &["news"])).collect();
    for node in &nodes {
        wait_connections(node, 1);
    }

    let client = push_client(manager.addr());
    // Elements of 1 to 7 messages: indices count messages across them.
    let mut messages = (0..N).map(|i| broadcast_request("news", OP, i as i32, body(i))).peekable();
    let mut elements = vec![];
    for size in (1..=7).cycle() {
        if messages.peek().is_none() {
            break;
        }
        elements.push(broadcasts(messages.by_ref().take(size).collect()));
    }
    let sizes: Vec<usize> = elements.iter().map(|e| e.get_messages().len()).collect();
    let replies = stream_all(client.broadcast_stream().unwrap(), elements).unwrap();
    assert_eq!(replies.iter().map(Vec::len).collect::<Vec<_>>(), sizes, "one reply per message of each element");
    let replies: Vec<StreamReply> = replies.into_iter().flatten().collect();
    assert_eq!(replies.len(), N);
    for (i, r) in replies.iter().enumerate() {
        assert_eq!((r.get_index(), r.get_code(), r.get_error()), (i as u64, 0, ""), "{r:?}");
        assert_eq!((r.get_reply().get_targeted(), r.get_reply().get_accepted()), (2, 2), "{r:?}");
    }
    for user in &mut users {
        for i in 0..N {
            let frame = user.next_json();
            assert_eq!((frame["seq"].as_i64(), frame["body"].as_str()), (Some(i as i64), Some(body(i).as_str())));
        }
    }
}

#[test]
fn a_refused_message_gets_its_reason_and_the_stream_goes_on() {
    let etcd = Etcd::start();
    let (manager, sinks) = with_sinks(&etcd, 1, |_| {});
    let client = push_client(manager.addr());
    let mut with_users = broadcast_request("", OP, 3, "m3");
    with_users.set_user_ids(vec!["alice".to_string()].into());
    let messages = [
        broadcast_request("", OP, 0, "m0"),
        broadcast_request("a b", OP, 1, "m1"),
        broadcast_request("", OP, 2, "m2"),
        with_users,
        BroadCastReq::new(),
        broadcast_request("", OP, 5, "m5"),
    ];
    // The first message alone, the rest in one element.
    let elements = vec![broadcasts(messages[..1].to_vec()), broadcasts(messages[1..].to_vec())];
    let replies: Vec<_> = stream_all(client.broadcast_stream().unwrap(), elements).unwrap().concat();
    let outcomes: Vec<_> =
        replies.iter().map(|r| (r.get_index(), r.get_code(), r.get_reply().get_accepted())).collect();
    assert_eq!(outcomes, [(0, 0, 1), (1, 3, 0), (2, 0, 1), (3, 3, 0), (4, 3, 0), (5, 0, 1)]);
    assert!(replies[1].get_error().contains("whitespace"), "{:?}", replies[1]);
    assert!(replies[3].get_error().contains("call PushServer.PushUsers"), "{:?}", replies[3]);
    assert!(replies[4].get_error().contains("proto is required"), "{:?}", replies[4]);
    assert!(!replies[1].has_reply(), "a refused message has no BroadCastReply");
    wait_until("the good messages arrive", PATIENCE, || sinks[0].count() == 3);
    assert_eq!(sorted(sinks[0].bodies()), [b"m0".to_vec(), b"m2".to_vec(), b"m5".to_vec()]);

    // PushUsersStream, the same way: a bad id refused in the middle, the rest delivered.
    let element = pushes(vec![
        push_users_request(&["alice", "bob", "alice"], OP, 0, "p0"),
        push_users_request(&["al ice"], OP, 1, "p1"),
        push_users_request(&["carol"], OP, 2, "p2"),
    ]);
    let replies = stream_all(client.push_users_stream().unwrap(), vec![element]).unwrap().concat();
    let outcomes: Vec<_> = replies.iter().map(|r| (r.get_index(), r.get_code())).collect();
    assert_eq!(outcomes, [(0, 0), (1, 3), (2, 0)]);
    assert!(replies[1].get_error().starts_with("user_ids[0]: user id contains ' '"), "{:?}", replies[1]);
    wait_until("the good pushes arrive", PATIENCE, || sinks[0].count() == 5);
    let pushed = sorted(sinks[0].messages()[3..].iter().map(|m| m.get_user_ids().to_vec()).collect());
    assert_eq!(pushed, [vec!["alice".to_string(), "bob".to_string()], vec!["carol".to_string()]]);
}

#[test]
fn the_api_key_is_checked_once_when_the_stream_opens() {
    let etcd = Etcd::start();
    let secrets = TempDir::new().unwrap();
    let keys = secrets.path().join("api-keys");
    std::fs::write(&keys, "right-key\n").unwrap();
    let (manager, sinks) = with_sinks(&etcd, 1, |c| c.api_key_file = Some(keys));
    let client = push_client(manager.addr());
    let one = || vec![broadcasts(vec![broadcast_request("", OP, 0, "x")])];

    for opt in [grpcio::CallOption::default(), with_key("wrong-key")] {
        match stream_all(client.broadcast_stream_opt(opt.clone()).unwrap(), one()) {
            Err(grpcio::Error::RpcFailure(s)) => assert_eq!(s.code(), RpcStatusCode::UNAUTHENTICATED, "{s:?}"),
            other => panic!("expected UNAUTHENTICATED, got {other:?}"),
        }
        let push = vec![pushes(vec![push_users_request(&["a"], OP, 0, "x")])];
        match stream_all(client.push_users_stream_opt(opt).unwrap(), push) {
            Err(grpcio::Error::RpcFailure(s)) => assert_eq!(s.code(), RpcStatusCode::UNAUTHENTICATED, "{s:?}"),
            other => panic!("expected UNAUTHENTICATED, got {other:?}"),
        }
    }
    assert_eq!(sinks[0].count(), 0, "nothing from a refused stream was delivered");
    let replies = stream_all(client.broadcast_stream_opt(with_key("right-key")).unwrap(), one()).unwrap().concat();
    assert_eq!((replies.len(), replies[0].get_code()), (1, 0), "{replies:?}");
    wait_until("the message arrives", PATIENCE, || sinks[0].count() == 1);
}

#[test]
fn with_no_node_each_message_is_refused_unavailable_and_the_stream_goes_on_until_one_comes() {
    let etcd = Etcd::start();
    let manager = Manager::start(common::manager::config(&etcd, PREFIX)).unwrap();
    wait_until("etcd listed", PATIENCE, || manager.listings() > 0);
    let client = push_client(manager.addr());
    let (mut tx, mut rx) = client.broadcast_stream().unwrap();
    let mut send = |m: BroadCastReq| block_on(tx.send((broadcasts(vec![m]), WriteFlags::default()))).unwrap();
    let mut next = || {
        let mut replies = block_on(rx.next()).expect("a reply").expect("the stream goes on").take_replies();
        assert_eq!(replies.len(), 1);
        replies.pop().unwrap()
    };

    send(broadcast_request("", OP, 0, "x"));
    let r = next();
    assert_eq!((r.get_index(), r.get_code()), (0, RpcStatusCode::UNAVAILABLE.into()), "{r:?}");
    assert!(r.get_error().starts_with("no connect-node is registered under \"/stream/nodes/\""), "{r:?}");

    let sink = Sink::start();
    register(&etcd, "late", &sink.addr);
    wait_until("the node is known", PATIENCE, || manager.nodes().len() == 1);
    send(broadcast_request("", OP, 1, "y"));
    let r = next();
    assert_eq!((r.get_index(), r.get_code(), r.get_reply().get_accepted()), (1, 0, 1), "{r:?}");
    wait_until("the message arrives", PATIENCE, || sink.count() == 1);
}

#[test]
fn a_caller_that_stops_reading_replies_is_held_back_not_buffered_for() {
    const TOTAL: u64 = 400_000;
    let etcd = Etcd::start();
    let (manager, _sinks) = with_sinks(&etcd, 1, |c| c.queue_size = TOTAL as usize);
    // A caller that says how much it takes (64 KiB of replies, about 5,000): grpc's default
    // window grows with the connection's measured bandwidth, to megabytes on loopback.
    let env = Arc::new(grpcio::EnvBuilder::new().cq_count(1).name_prefix("test-grpc").build());
    let channel = grpcio::ChannelBuilder::new(env)
        .http2_bdp_probe(false)
        .stream_initial_window_size(64 << 10)
        .connect(&manager.addr().to_string());
    let client = PushServerClient::new(channel);
    let (mut tx, rx) = client.broadcast_stream().unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let last_progress = Arc::new(parking_lot::Mutex::new(Instant::now()));
    let (counter, progress) = (sent.clone(), last_progress.clone());
    let writer = thread::spawn(move || {
        block_on(async {
            let msg = broadcasts(vec![broadcast_request("", OP, 0, "x")]);
            for _ in 0..TOTAL {
                tx.send((msg.clone(), WriteFlags::default())).await?;
                counter.fetch_add(1, Ordering::Relaxed);
                *progress.lock() = Instant::now();
            }
            tx.close().await
        })
    });
    // Nobody reads the replies: the writer must come to a stop well before TOTAL.
    let stalled = || last_progress.lock().elapsed() > Duration::from_millis(500);
    assert!(poll_until(Duration::from_secs(60), stalled), "the writer never stopped: {}", sent.load(Ordering::Relaxed));
    let held_at = sent.load(Ordering::Relaxed);
    let taken = manager.nodes()[0].enqueued + manager.nodes()[0].dropped_full;
    eprintln!("held back after {held_at} messages sent, {taken} taken by push-manager");
    // push-manager takes a message only once it can write the reply: about the caller's window
    // of replies. What the writer got out beyond that waits in HTTP/2 windows (push-manager's
    // receive window, which gRPC sizes by the measured bandwidth), bounded, never read.
    assert!(held_at < TOTAL, "the writer never stopped");
    assert!(taken < 20_000, "push-manager took {taken} messages whose replies nobody read");

    // Reading the replies lets the writer go on, to the end.
    let replies = block_on(rx.try_fold(0u64, |n, r| {
        assert_eq!(r.get_replies()[0].get_index(), n);
        futures::future::ready(Ok(n + 1))
    }))
    .unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!(replies, TOTAL);
}

#[test]
fn an_element_of_more_than_1024_messages_ends_the_stream_with_a_reason() {
    let etcd = Etcd::start();
    // Room for the whole element, taken at once.
    let (manager, sinks) = with_sinks(&etcd, 1, |c| c.queue_size = 2048);
    let client = push_client(manager.addr());
    let (mut tx, mut rx) = client.broadcast_stream().unwrap();
    let element = |n| broadcasts(vec![broadcast_request("", OP, 0, "x"); n]);
    block_on(tx.send((element(1024), WriteFlags::default()))).unwrap();
    let replies = block_on(rx.next()).expect("replies").expect("the stream goes on");
    assert_eq!(replies.get_replies().len(), 1024);
    assert_eq!(replies.get_replies()[1023].get_index(), 1023);

    // The writer may or may not see the end before the reader does; the status is the reader's.
    let _ = block_on(tx.send((element(1025), WriteFlags::default())));
    match block_on(rx.next()) {
        Some(Err(grpcio::Error::RpcFailure(s))) => {
            assert_eq!(s.code(), RpcStatusCode::INVALID_ARGUMENT, "{s:?}");
            assert_eq!(s.message(), "a stream element holds 1025 messages; the limit is 1024");
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    wait_until("the first element arrives", PATIENCE, || sinks[0].count() == 1024);
    assert_eq!(manager.nodes()[0].enqueued, 1024, "nothing of the refused element was offered");
}

fn send(server: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Reaped::spawn(
        Command::new(BIN)
            .args(["send", "--server", server])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.output_within(PATIENCE)
}

#[track_caller]
fn stdout_of(out: &Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn send_streams_copies_and_lines_at_a_rate_and_sums_them_up() {
    let etcd = Etcd::start();
    let (manager, sinks) = with_sinks(&etcd, 1, |c| c.max_message_bytes = 8);
    let server = manager.addr().to_string();
    let sink = &sinks[0];

    let stdout = stdout_of(&send(&server, &["--count", "100", "--seq", "7", "hello"], None));
    assert!(stdout.starts_with("sent 100 message(s) in "), "{stdout}");
    assert!(stdout.ends_with("accepted by all nodes 100, dropped somewhere 0, refused 0\n"), "{stdout}");
    wait_until("100 copies arrive", PATIENCE, || sink.count() == 100);
    let seqs = sorted(sink.messages().iter().map(|m| m.get_proto().get_seq()).collect());
    assert_eq!(seqs, (7..107).collect::<Vec<_>>());
    assert!(sink.bodies().iter().all(|b| b == b"hello"));

    let start = Instant::now();
    let stdout = stdout_of(&send(&server, &["--count", "6", "--rate", "50", "--topic", "t"], Some("paced")));
    assert!(start.elapsed() >= Duration::from_millis(100), "6 messages at 50/s take 100 ms: {:?}", start.elapsed());
    assert!(stdout.contains("accepted by all nodes 6"), "{stdout}");
    wait_until("the paced copies arrive", PATIENCE, || sink.count() == 106);

    let out = send(&server, &["--lines"], Some("a\nbb\r\n\nmuch too long\nc"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("sent 5 message(s)") && stdout.contains("accepted by all nodes 4"), "{stdout}");
    assert!(stderr.contains("message 3 refused (3-INVALID_ARGUMENT): proto.body is 13 bytes"), "{stderr}");
    assert!(stderr.contains("push-manager refused 1 of 5 message(s)"), "{stderr}");
    wait_until("the good lines arrive", PATIENCE, || sink.count() == 110);
    assert_eq!(sorted(sink.bodies()[106..].to_vec()), [b"".to_vec(), b"a".to_vec(), b"bb".to_vec(), b"c".to_vec()]);

    let stdout = stdout_of(&send(&server, &["--lines", "--user", "alice"], Some("to alice\n")));
    assert!(stdout.contains("accepted by all nodes 1"), "{stdout}");
    wait_until("the push arrives", PATIENCE, || sink.count() == 111);
    assert_eq!(sink.messages()[110].get_user_ids(), ["alice"]);
}

#[test]
fn send_refuses_bad_stream_flags_by_name() {
    let server = common::free_addr();
    for (args, flag) in [
        (&["--count", "0", "x"][..], "--count"),
        (&["--count=-3", "x"], "--count"),
        (&["--count", "many", "x"], "--count"),
        (&["--count", "2", "--rate", "0", "x"], "--rate"),
        (&["--rate", "10", "x"], "--count"),
        (&["--lines", "x"], "--lines"),
        (&["--lines", "--count", "2"], "--count"),
    ] {
        let out = send(&server, args, None);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
    // Nothing listens there: a stream that cannot connect fails clearly, exit 1.
    let out = send(&server, &["--count", "3", "x"], None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("cannot connect to {server}")), "{stderr}");
}
