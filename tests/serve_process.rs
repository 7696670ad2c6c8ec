//! The real `push-manager serve` binary: start-up, bad flags, and a clean SIGTERM drain.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::{free_addr, thread_names, wait_until, BIN};
use push_manager::testkit::{signal, spawn_serve, wait_exit, Reaped, Sink};

const PREFIX: &str = "/proc-test/nodes/";

/// Starts `serve` (logging warnings) and returns it with the address it printed.
fn serve(etcd: &Etcd, extra: &[&str]) -> (Reaped, String) {
    let mut args = vec!["--log-level", "warn"];
    args.extend(extra);
    spawn_serve(BIN, &etcd.endpoint(), PREFIX, &args, Stdio::inherit())
}

fn send(server: &str, body: &str) -> Output {
    Command::new(BIN).args(["send", "--server", server, "--timeout", "2s", body]).output().unwrap()
}

#[test]
fn sigterm_drains_queued_messages_then_exits_zero() {
    let etcd = Etcd::start();
    let sink = Sink::start();
    etcd.client().put(&format!("{PREFIX}only"), sink.addr.as_bytes(), None).unwrap();
    // --rpc-timeout: the held call must not time out and be sent again while the test holds it.
    let args = [
        "--routine-size",
        "1",
        "--batch-max",
        "1",
        "--drain-timeout",
        "20s",
        "--rpc-timeout",
        "60s",
        "--log-level",
        "info",
    ];
    let (mut child, addr) = spawn_serve(BIN, &etcd.endpoint(), PREFIX, &args, Stdio::piped());
    let log = Lines::collect(child.stderr.take().unwrap());

    wait_until("the node is discovered", Duration::from_secs(10), || send(&addr, "probe").status.success());
    wait_until("the probe is answered", Duration::from_secs(10), || sink.count() > 0);
    // The node holds every call unanswered: the one worker waits on the first message and the
    // other nineteen stay queued until after the signal.
    sink.stall();
    let n = 20;
    for i in 0..n {
        let out = send(&addr, &format!("queued-{i}"));
        assert!(String::from_utf8_lossy(&out.stdout).contains("accepted by 1"), "{out:?}");
    }
    wait_until("the worker waits on the node", Duration::from_secs(10), || sink.parked() == 1);
    signal(&child, libc::SIGTERM);
    log.wait_for("saying the signal arrived", |l| l.contains("shutdown signal received"));
    sink.unstall();
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    let got: Vec<_> = sink.bodies().into_iter().filter(|b| b.starts_with(b"queued-")).collect();
    assert_eq!(got.len(), n, "every queued message was delivered before exit");
}

/// Lines a child wrote, collected as they come.
struct Lines(crossbeam_channel::Receiver<String>);

impl Lines {
    fn collect(stream: impl std::io::Read + Send + 'static) -> Lines {
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::spawn(move || BufReader::new(stream).lines().map_while(Result::ok).for_each(|l| drop(tx.send(l))));
        Lines(rx)
    }

    /// Waits for a line that is `what`; panics if none comes within 10 s.
    #[track_caller]
    fn wait_for(&self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.0.recv_deadline(deadline) {
                Ok(line) if wanted(&line) => return line,
                Ok(_) => {}
                Err(_) => panic!("no line {what} within 10 s"),
            }
        }
    }
}

#[test]
fn send_reports_an_error_status_and_exits_non_zero() {
    let etcd = Etcd::start();
    let (mut child, addr) = serve(&etcd, &[]);
    let out = send(&addr, "nobody");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no connect-node is registered"), "{stderr}");
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
}

#[test]
fn with_etcd_unreachable_send_is_told_so() {
    let dead = free_addr();
    let (mut child, addr) =
        spawn_serve(BIN, &dead, PREFIX, &["--etcd-timeout", "200ms", "--log-level", "error"], Stdio::inherit());
    wait_until("the first listing has failed", Duration::from_secs(10), || {
        let out = send(&addr, "anyone?");
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains(&format!("etcd ({dead}) is unreachable"))
    });
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
}

#[test]
fn node_counters_are_logged_every_stats_interval_when_they_change() {
    let etcd = Etcd::start();
    let sink = Sink::start();
    etcd.client().put(&format!("{PREFIX}counted"), sink.addr.as_bytes(), None).unwrap();
    let (mut child, addr) = spawn_serve(
        BIN,
        &etcd.endpoint(),
        PREFIX,
        &["--stats-interval", "100ms", "--log-level", "info"],
        Stdio::piped(),
    );
    let log = Lines::collect(child.stderr.take().unwrap());

    wait_until("delivered", Duration::from_secs(10), || send(&addr, "count me").status.success() && sink.count() > 0);
    let wanted = format!("sent {} ", sink.count());
    let logged =
        log.wait_for("with the node's counters", |l| l.contains("node counted 127.0.0.1:") && l.contains(&wanted));
    assert!(logged.contains("failed 0"), "{logged}");
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
}

#[test]
fn bad_flags_exit_non_zero_with_a_clear_message() {
    let cases: &[(&[&str], &str)] = &[
        (&["serve", "--routine-size", "0"], "--routine-size"),
        (&["serve", "--poll-interval", "soon"], "not a duration"),
        // On loopback, so the fail-closed rule for open addresses does not answer first.
        (&["serve", "--listen", "127.0.0.1:0", "--etcd", ""], "--etcd"),
        (&["serve", "--listen", "127.0.0.1:notaport"], "127.0.0.1:notaport"),
    ];
    for (args, needle) in cases {
        let out = Command::new(BIN).args(*args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr:?} should mention {needle:?}");
    }
}

#[test]
fn each_role_serves_grpc_and_etcd_on_one_thread_and_serve_calls_its_nodes_on_another() {
    // gRPC polls all of a process's sockets from one set: a second environment for etcd would
    // only add a thread that reads the other calls and hands them over, a wake-up per message.
    // serve's calls to its nodes are the exception: on the server's thread, one caller's stream
    // could keep their replies waiting (see `Manager::start`).
    let etcd = Etcd::start();
    let node = push_manager::testkit::spawn_node(BIN, &etcd.endpoint(), PREFIX, "one-env", &[]);
    let (serve, addr) = serve(&etcd, &[]);
    // Both registered (each through an etcd client) and serve's discovery uses the node.
    wait_until("the node is used", Duration::from_secs(10), || send(&addr, "probe").status.success());
    wait_until("serve registered itself", Duration::from_secs(10), || {
        !etcd.client().get_prefix("/services/push-manager/").unwrap().kvs.is_empty()
    });
    for (role, pid, expected) in
        [("serve", serve.id(), &["grpc-0", "grpc-nodes-0"][..]), ("node", node.child.id(), &["grpc-gateway-0"][..])]
    {
        let names = thread_names(pid);
        let mut grpc_threads: Vec<_> = names.iter().filter(|n| n.starts_with("grpc-")).collect();
        grpc_threads.sort();
        assert_eq!(grpc_threads, expected, "{role}: its completion-queue threads by default: {names:?}");
        assert!(
            !names.iter().any(|n| n.starts_with("etcd-grpc")),
            "{role}: etcd has no gRPC thread of its own: {names:?}"
        );
    }
}
