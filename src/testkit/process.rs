//! `push-manager serve` and `push-manager node` as child processes on loopback port 0, for the
//! tests and benchmarks that need the real binary in a process of its own: its exit status, its
//! signal handling, its CPU time. Each takes the binary's path (`env!("CARGO_BIN_EXE_push-manager")`,
//! which cargo gives tests and benches) and panics on failure, as an assertion would. Every
//! child is a [`Reaped`], so a failing test leaves nothing running behind it.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use super::poll_until;

/// A child process that is killed and reaped when dropped, also when a test panics: a process
/// left running would keep the test's standard error, and with it CI's output pipe, open for
/// ever.
pub struct Reaped(pub Child);

impl Reaped {
    /// Starts `command`.
    #[track_caller]
    pub fn spawn(command: &mut Command) -> Reaped {
        Reaped(command.spawn().expect("the binary starts"))
    }

    /// Waits up to `within` for the exit, reading its piped standard output and error meanwhile,
    /// and returns all three; panics (killing it) if it is still running.
    #[track_caller]
    pub fn output_within(&mut self, within: Duration) -> Output {
        let stdout = self.0.stdout.take().map(read_to_end);
        let stderr = self.0.stderr.take().map(read_to_end);
        let status = wait_exit(&mut self.0, within);
        let joined = |reader: Option<JoinHandle<Vec<u8>>>| reader.map_or_else(Vec::new, |r| r.join().unwrap());
        Output { status, stdout: joined(stdout), stderr: joined(stderr) }
    }
}

fn read_to_end(mut stream: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        bytes
    })
}

impl Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `push-manager node` as a child process, with the addresses it printed.
pub struct NodeProcess {
    pub child: Reaped,
    /// Its `ConnectNode` gRPC address.
    pub grpc: String,
    /// Its WebSocket address; users connect to `ws://<ws_addr>/ws` (`wss://` with `--ws-tls-cert`).
    pub ws_addr: SocketAddr,
}

/// Starts `bin serve` on a free loopback port with etcd at `etcd_endpoint`, watching `prefix`,
/// plus `extra` flags and standard error going to `stderr`; returns it with the address it
/// printed. Its admin endpoint is on a free port too unless `extra` names one.
#[track_caller]
pub fn spawn_serve(bin: &str, etcd_endpoint: &str, prefix: &str, extra: &[&str], stderr: Stdio) -> (Reaped, String) {
    let mut child = Reaped::spawn(
        Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--etcd", etcd_endpoint, "--prefix", prefix])
            .args(admin_on_free_port(extra))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(stderr),
    );
    let line = first_line(&mut child);
    let addr =
        line.trim().strip_prefix("listening ").unwrap_or_else(|| panic!("unexpected first line {line:?}")).to_string();
    let port = addr.rsplit(':').next().unwrap();
    (child, format!("127.0.0.1:{port}"))
}

/// Starts `bin node` on free loopback ports, registering as `id` under `prefix`.
#[track_caller]
pub fn spawn_node(bin: &str, etcd_endpoint: &str, prefix: &str, id: &str, extra: &[&str]) -> NodeProcess {
    let mut child = Reaped::spawn(&mut node_command(bin, etcd_endpoint, prefix, id, "warn", extra));
    let line = first_line(&mut child);
    let (grpc, ws_addr) = serving_line(&line).unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    NodeProcess { grpc, ws_addr, child }
}

/// `bin node` on free loopback ports, registering as `id` under `prefix`, logging at `level`,
/// with `extra` flags (and its admin endpoint on a free port unless they name one); standard
/// output piped, for the line it prints once it serves ([`serving_line`]).
pub fn node_command(bin: &str, etcd_endpoint: &str, prefix: &str, id: &str, level: &str, extra: &[&str]) -> Command {
    let mut command = Command::new(bin);
    command
        .args(["node", "--grpc-listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0", "--etcd", etcd_endpoint])
        .args(["--prefix", prefix, "--node-id", id, "--log-level", level])
        .args(admin_on_free_port(extra))
        .args(extra)
        .stdout(Stdio::piped());
    command
}

/// The gRPC address and WebSocket address in the line a node prints once it serves:
/// "node <id> grpc <addr> ws ws://<addr>/ws" (wss:// with --ws-tls-cert).
pub fn serving_line(line: &str) -> Option<(String, SocketAddr)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let [_, _, _, grpc, _, ws_url] = words[..] else { return None };
    let ws_addr = ws_url
        .strip_prefix("ws://")
        .or_else(|| ws_url.strip_prefix("wss://"))
        .and_then(|a| a.strip_suffix("/ws"))
        .and_then(|a| a.parse().ok())?;
    Some((grpc.to_string(), ws_addr))
}

/// `--admin-listen 127.0.0.1:0` unless `extra` gives `--admin-listen`: the default is a fixed
/// port, which tests running side by side would fight over.
pub fn admin_on_free_port(extra: &[&str]) -> &'static [&'static str] {
    if extra.contains(&"--admin-listen") {
        &[]
    } else {
        &["--admin-listen", "127.0.0.1:0"]
    }
}

/// The first line the child printed on its piped standard output.
#[track_caller]
fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("standard output is piped")).read_line(&mut line).unwrap();
    line
}

/// Sends `signal` (e.g. `libc::SIGTERM`) to `child`, which must not have been waited for yet.
pub fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; a child not yet
    // reaped keeps its pid, so the signal reaches it and no other process.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
}

/// Waits up to `within` for `child` to exit and returns how it did; panics if it is still running.
#[track_caller]
pub fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let mut status = None;
    poll_until(within, || {
        status = child.try_wait().expect("the child can be waited for");
        status.is_some()
    });
    status.unwrap_or_else(|| panic!("process still running after {within:?}"))
}
