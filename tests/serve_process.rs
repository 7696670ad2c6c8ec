//! The real `push-manager serve` binary: start-up, bad flags, and a clean SIGTERM drain.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::{free_addr, wait_until, BIN};
use push_manager::testkit::{signal, spawn_serve, wait_exit, Sink};

const PREFIX: &str = "/proc-test/nodes/";

/// Starts `serve` (logging warnings) and returns it with the address it printed.
fn serve(etcd: &Etcd, extra: &[&str]) -> (Child, String) {
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
    // One worker answering each call after 50 ms keeps messages queued when SIGTERM arrives.
    sink.answer_after(Duration::from_millis(50));
    etcd.client().put(&format!("{PREFIX}only"), sink.addr.as_bytes(), None).unwrap();
    let (mut child, addr) = serve(&etcd, &["--routine-size", "1", "--batch-max", "1", "--drain-timeout", "20s"]);

    wait_until("the node is discovered", Duration::from_secs(10), || send(&addr, "probe").status.success());
    let probes = sink.count();
    let n = 20;
    for i in 0..n {
        let out = send(&addr, &format!("queued-{i}"));
        assert!(String::from_utf8_lossy(&out.stdout).contains("accepted by 1"), "{out:?}");
    }
    assert!(sink.count() < probes + n, "messages are still queued when the signal is sent");
    signal(&child, libc::SIGTERM);
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    let got: Vec<_> = sink.bodies().into_iter().filter(|b| b.starts_with(b"queued-")).collect();
    assert_eq!(got.len(), n, "every queued message was delivered before exit");
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
    let (lines_tx, lines) = crossbeam_channel::unbounded();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || stderr.lines().map_while(Result::ok).for_each(|l| drop(lines_tx.send(l))));

    wait_until("delivered", Duration::from_secs(10), || send(&addr, "count me").status.success() && sink.count() > 0);
    let sent = sink.count();
    let deadline = Instant::now() + Duration::from_secs(10);
    let wanted = format!("sent {sent} ");
    let logged = loop {
        let l = lines.recv_deadline(deadline).expect("a counters line before the deadline");
        if l.contains("node counted 127.0.0.1:") && l.contains(&wanted) {
            break l;
        }
    };
    assert!(logged.contains("failed 0"), "{logged}");
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
    reader.join().unwrap();
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
