//! What the integration tests share: a real etcd per test, in-process gateways, gRPC and
//! WebSocket clients, the binary's path, and the binary as a process whose output is kept.
//! Waiting is [`wait_until`] (a condition polled with a deadline, never a sleep); the stand-ins
//! and child processes shared with the benchmarks live in `push_manager::testkit`. Each test
//! binary uses a part of this, hence `dead_code`.
#![allow(dead_code)]

pub mod etcd;
pub mod gateway;
pub mod grpc;
pub mod manager;
pub mod process;
pub mod ws;

use std::process::Output;
use std::time::Duration;

use push_manager::testkit::free_port;
pub use push_manager::testkit::wait_until;

/// The `push-manager` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_push-manager");

/// How long any single expected event may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// `127.0.0.1:<free port>`: an address nothing listens on.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// The names of process `pid`'s threads (Linux: /proc/<pid>/task/*/comm); a thread names itself
/// once it runs, so one just spawned may not be listed under its name yet.
pub fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim_end().to_string())
        .collect()
}

/// Asserts that the binary exited non-zero and said `needle` on standard error.
#[track_caller]
pub fn assert_fails_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr.contains(needle), "wanted {needle:?} in: {stderr}");
}
