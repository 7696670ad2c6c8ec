//! Waiting for a condition with a deadline, never for a guessed time: the demo, the tests and
//! the benchmarks poll what they wait for.

use std::thread;
use std::time::{Duration, Instant};

/// Often enough that a wait ends soon after its condition holds, rarely enough to cost nothing.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Calls `done` every 10 ms until it returns true, for at most `timeout`; says whether it did.
pub fn poll_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// [`poll_until`] as an assertion: panics, naming `what` and the caller's line, when `timeout`
/// passes first.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, done: impl FnMut() -> bool) {
    if !poll_until(timeout, done) {
        panic!("timed out after {timeout:?} waiting until {what}");
    }
}
