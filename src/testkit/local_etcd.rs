//! An etcd process of our own: a single-member cluster on free loopback ports in a temporary
//! directory, stopped and deleted on drop. The demo runs discovery through one, and every
//! integration test starts its own.

use std::fs::{self, OpenOptions};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::poll_until;
use super::Identity;
use crate::etcd::{Client, ClientTls, Config};

/// How long etcd may take to answer after being started.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// A free port can be taken by someone else before etcd binds it; start again on new ones.
const START_ATTEMPTS: usize = 5;

/// A port nothing listens on right now (the OS picked it; it may be reused later).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 works on any machine with loopback")
}

pub struct LocalEtcd {
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    tls: Option<EtcdTls>,
}

/// An etcd that speaks only TLS on its client port and requires client certificates
/// (`--client-cert-auth`): its own identity, the CA both sides trust, and the client identity
/// this handle's own calls (`config`, `client`, `etcdctl`) use.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub server: Identity,
    pub client: Identity,
}

impl LocalEtcd {
    /// Starts `etcd` (from PATH) on free ports and returns once it answers.
    pub fn start() -> Result<LocalEtcd, String> {
        LocalEtcd::start_with(None)
    }

    /// [`LocalEtcd::start`], serving clients over TLS only, with client certificates required.
    pub fn start_tls(tls: EtcdTls) -> Result<LocalEtcd, String> {
        LocalEtcd::start_with(Some(tls))
    }

    fn start_with(tls: Option<EtcdTls>) -> Result<LocalEtcd, String> {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("push-manager-etcd-")
                .tempdir()
                .map_err(|e| format!("cannot create a temp dir: {e}"))?;
            let mut etcd =
                LocalEtcd { dir, client_port: free_port(), peer_port: free_port(), child: None, tls: tls.clone() };
            match etcd.spawn_and_wait() {
                Ok(()) => return Ok(etcd),
                Err(e) if e.starts_with("cannot run etcd") => return Err(e),
                Err(e) => failures.push(e),
            }
        }
        Err(format!("etcd did not start in {START_ATTEMPTS} attempts:\n{}", failures.join("\n---\n")))
    }

    /// `127.0.0.1:<client port>`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// A client config for this etcd with a 2 s deadline (and TLS with the client identity).
    pub fn config(&self) -> Config {
        Config {
            endpoints: vec![self.endpoint()],
            timeout: Duration::from_secs(2),
            tls: self.tls.as_ref().map(|tls| ClientTls {
                ca: tls.ca.clone(),
                identity: Some((tls.client.cert.clone(), tls.client.key.clone())),
                flags: crate::etcd::TLS_FLAGS,
            }),
            auth: None,
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(self.config()).expect("a loopback endpoint is a valid config")
    }

    /// Runs `etcdctl <args>` against this etcd (with its client certificate when TLS) and
    /// returns its standard output; panics, with what it said, if it fails.
    #[track_caller]
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let mut command = Command::new("etcdctl");
        command.env("ETCDCTL_API", "3").arg(format!("--endpoints={}", self.endpoint()));
        if let Some(tls) = &self.tls {
            command
                .arg(format!("--cacert={}", tls.ca.display()))
                .arg(format!("--cert={}", tls.client.cert.display()))
                .arg(format!("--key={}", tls.client.key.display()));
        }
        let out = command.args(args).output().unwrap_or_else(|e| panic!("cannot run etcdctl: {e}"));
        assert!(out.status.success(), "etcdctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILLs etcd and reaps it: no clean shutdown, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd if it runs and starts it again on the same data dir and ports.
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.spawn_and_wait()
    }

    /// The last lines of etcd's log, for failure messages.
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
            .map_err(|e| format!("cannot open etcd's log: {e}"))?;
        let log_too = log.try_clone().map_err(|e| format!("cannot open etcd's log: {e}"))?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new("etcd");
        if let Some(tls) = &self.tls {
            command
                .arg(format!("--cert-file={}", tls.server.cert.display()))
                .arg(format!("--key-file={}", tls.server.key.display()))
                .arg(format!("--trusted-ca-file={}", tls.ca.display()))
                .arg("--client-cert-auth");
        }
        let child = command
            .arg("--name=t")
            .arg(format!("--data-dir={}", self.dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=t={peer_url}"))
            .stdin(Stdio::null())
            .stdout(log_too)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run etcd: {e}"))?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let probe = Client::connect(Config { timeout: Duration::from_millis(200), ..self.config() })
            .expect("a loopback endpoint and readable certificates are a valid config");
        let child = &mut self.child;
        let mut exited = None;
        let answered = poll_until(START_TIMEOUT, || {
            if probe.get("/push-manager/ready").is_ok() {
                return true;
            }
            exited = child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            exited.is_some()
        });
        if let Some(status) = exited {
            self.child = None;
            return Err(format!("etcd exited ({status}); log tail:\n{}", self.log_tail()));
        }
        if !answered {
            self.kill();
            return Err(format!("etcd not ready after {START_TIMEOUT:?}; log tail:\n{}", self.log_tail()));
        }
        Ok(())
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.kill();
    }
}
