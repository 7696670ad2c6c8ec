//! Shared integration-test harness: real `etcd` processes on free loopback ports, each in its own
//! temporary directory, stopped on drop; and polling helpers so tests wait on conditions, not
//! on sleeps.
#![allow(dead_code)]

use std::fs::{self, OpenOptions};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use push_manager::etcd::{Client, Config};
use tempfile::TempDir;

/// How long etcd may take to answer after being started.
const ETCD_START_TIMEOUT: Duration = Duration::from_secs(20);
/// A free port can be taken by someone else before etcd binds it; start again on new ones.
const ETCD_START_ATTEMPTS: usize = 5;
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A port nothing listens on right now (the OS picked it; it may be reused later).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("listener address").port()
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Polls `f` every 20 ms until it returns true; panics naming `what` after `timeout`.
#[track_caller]
pub fn wait_until<F: FnMut() -> bool>(what: &str, timeout: Duration, mut f: F) {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// A single-member etcd cluster of its own, killed and deleted on drop.
pub struct Etcd {
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl Etcd {
    /// Starts etcd on free ports and returns once it answers.
    #[track_caller]
    pub fn start() -> Etcd {
        let mut failures = Vec::new();
        for _ in 0..ETCD_START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("push-manager-etcd-")
                .tempdir()
                .expect("create temp dir");
            let mut etcd = Etcd {
                dir,
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            };
            match etcd.spawn_and_wait() {
                Ok(()) => return etcd,
                Err(e) => failures.push(e),
            }
        }
        panic!(
            "etcd did not start in {ETCD_START_ATTEMPTS} attempts:\n{}",
            failures.join("\n---\n")
        );
    }

    /// `127.0.0.1:<client port>`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// A config for this etcd with a 2 s deadline.
    pub fn config(&self) -> Config {
        Config {
            endpoints: vec![self.endpoint()],
            timeout: Duration::from_secs(2),
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(self.config()).expect("valid config")
    }

    /// SIGKILLs etcd and reaps it: no clean shutdown, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd if it runs and starts it again on the same data dir and ports.
    #[track_caller]
    pub fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.spawn_and_wait() {
            panic!("etcd did not restart: {e}");
        }
    }

    /// The tail of etcd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open etcd log");
        let client_url = format!("http://127.0.0.1:{}", self.client_port);
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .arg("--name=t")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=t={peer_url}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run etcd: {e}"))?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let probe = Client::connect(Config {
            endpoints: vec![self.endpoint()],
            timeout: Duration::from_millis(200),
        })
        .expect("valid config");
        let deadline = Instant::now() + ETCD_START_TIMEOUT;
        loop {
            if probe.get("/push-manager-test/ready").is_ok() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(format!(
                    "etcd exited ({status}); log tail:\n{}",
                    self.log_tail()
                ));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "etcd not ready after {ETCD_START_TIMEOUT:?}; log tail:\n{}",
                    self.log_tail()
                ));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
