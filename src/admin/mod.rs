//! The admin endpoint both roles serve next to their gRPC port, so that Prometheus, a load
//! balancer or Kubernetes can see what a process does and whether to send it work, without
//! reading its log: `GET /metrics` (Prometheus text), `/healthz` (its threads run), `/readyz`
//! (it should be sent work) and, on serve, `/nodes` (the node set as JSON).
//!
//! The HTTP server is `tiny_http`, synchronous: one named thread (`admin-http`) answers the
//! requests one at a time (tiny_http reads them on threads of its own), so an operator's scrape
//! never competes with the data path for anything but a snapshot of atomics. What is served
//! comes from a [`Probe`] the role implements over the counters it already keeps: counting
//! stays where the events happen, and a scrape only reads. [`Serving`] is the other half: the
//! draining state a role flips at SIGTERM, which `/readyz` and `grpc.health.v1.Health` report.

mod client;
mod exposition;
mod serving;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, TryRecvError};
use log::{debug, info, warn};

pub use client::{get, Response};
pub use exposition::{Exposition, Histogram, HistogramSnapshot};
pub use serving::{Serving, HEALTH_SERVICE};

use crate::thread::{SpawnError, StoppableThread};

/// `--admin-listen`'s default for `serve`.
pub const SERVE_DEFAULT_LISTEN: &str = "127.0.0.1:9253";
/// `--admin-listen`'s default for `node`.
pub const NODE_DEFAULT_LISTEN: &str = "127.0.0.1:9254";

/// How long a stopping admin server waits for the request it is answering (a client that does
/// not read its response) before it is left behind, so stopping the process stays bounded.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Where the admin endpoint listens: `--admin-listen host:port`, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    Off,
    At(SocketAddr),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Listen, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Listen::Off);
        }
        s.parse().map(Listen::At).map_err(|_| {
            format!("--admin-listen {s:?} is not an address like {SERVE_DEFAULT_LISTEN} (an IP and a port), nor off")
        })
    }
}

/// Why the admin endpoint did not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address could not be bound (in use, not local, no permission).
    #[error("--admin-listen {addr}: cannot listen there: {reason}")]
    Bind { addr: SocketAddr, reason: String },
    /// The `admin-http` thread could not start.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
}

/// What a role tells the admin endpoint. Every method reads a snapshot and never blocks on the
/// data path.
pub trait Probe: Send + Sync {
    /// Appends this role's metrics.
    fn metrics(&self, out: &mut Exposition);
    /// `Ok` while the process's threads run; otherwise which one stopped.
    fn health(&self) -> Result<(), String>;
    /// `Ok` when the role should be sent work; otherwise why not.
    fn readiness(&self) -> Result<(), String>;
    /// The JSON `/nodes` answers with; `None` where the role has no node set.
    fn nodes(&self) -> Option<serde_json::Value> {
        None
    }
}

/// The running admin endpoint. Dropping it stops it.
pub struct AdminServer {
    addr: SocketAddr,
    thread: Option<StoppableThread>,
    /// Disconnects when the thread ends, so stopping can wait for it with a deadline.
    ended: Receiver<()>,
}

impl AdminServer {
    /// Binds `addr` (port 0 picks one) and answers on the `admin-http` thread.
    pub fn start(addr: SocketAddr, probe: Arc<dyn Probe>) -> Result<AdminServer, Error> {
        let server = tiny_http::Server::http(addr).map_err(|e| Error::Bind { addr, reason: e.to_string() })?;
        let bound = server.server_addr().to_ip().unwrap_or(addr);
        let server = Arc::new(server);
        let (ended_tx, ended) = bounded::<()>(0);
        let serving = server.clone();
        let thread = StoppableThread::spawn("admin-http", move |stop| {
            let _ended = ended_tx;
            answer(&serving, probe.as_ref(), &stop);
        })?
        // tiny_http's wait for a request is out of the stop channel's reach.
        .with_wake(move || server.unblock());
        info!("admin endpoint on http://{bound} (/metrics /healthz /readyz /nodes)");
        Ok(AdminServer { addr: bound, thread: Some(thread), ended })
    }

    /// The address the endpoint is bound to (the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops answering and joins the thread, waiting at most [`STOP_GRACE`] for a response
    /// being written. Idempotent.
    pub fn shutdown(&mut self) {
        let Some(mut thread) = self.thread.take() else { return };
        thread.signal();
        // `ended` disconnects when the thread's body returns, whatever it returned.
        if self.ended.recv_timeout(STOP_GRACE).is_err_and(|e| e.is_timeout()) {
            warn!("the admin endpoint is still writing a response after {STOP_GRACE:?}; leaving it");
            std::mem::forget(thread);
            return;
        }
        thread.join();
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts the admin endpoint as `--admin-listen` asks: `None` (the flag not given) binds
/// `default`, and only warns if that is taken (another instance on the host has it; the role
/// runs on without one), whereas an address given explicitly must be bound.
pub fn start_from_flag(
    flag: Option<Listen>,
    default: &str,
    probe: Arc<dyn Probe>,
) -> Result<Option<AdminServer>, Error> {
    match flag {
        Some(Listen::Off) => Ok(None),
        Some(Listen::At(addr)) => AdminServer::start(addr, probe).map(Some),
        None => {
            let addr = default.parse().expect("a literal address");
            match AdminServer::start(addr, probe) {
                Ok(server) => Ok(Some(server)),
                Err(Error::Bind { addr, reason }) => {
                    warn!("no admin endpoint: the default --admin-listen {addr} is taken ({reason}); give another");
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        }
    }
}

/// The body of `admin-http`: answers until stopped.
fn answer(server: &tiny_http::Server, probe: &dyn Probe, stop: &Receiver<()>) {
    loop {
        if matches!(stop.try_recv(), Err(TryRecvError::Disconnected)) {
            return;
        }
        match server.recv() {
            Ok(request) => respond(request, probe),
            // The wake-up (`unblock`), or the listener failing: either way, check the stop.
            Err(e) => debug!("admin endpoint: {e}"),
        }
    }
}

fn respond(request: tiny_http::Request, probe: &dyn Probe) {
    let path = request.url().split('?').next().unwrap_or("").to_string();
    let (status, content_type, body) = if *request.method() != tiny_http::Method::Get {
        (405, "text/plain", "only GET is served\n".to_string())
    } else {
        route(&path, probe)
    };
    let header = tiny_http::Header::from_bytes("Content-Type", content_type).expect("a valid header");
    let response = tiny_http::Response::from_string(body).with_status_code(status).with_header(header);
    if let Err(e) = request.respond(response) {
        debug!("admin endpoint: answering {path}: {e}");
    }
}

fn route(path: &str, probe: &dyn Probe) -> (u16, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let verdict = |result: Result<(), String>, ok: &str| match result {
        Ok(()) => (200, TEXT, format!("{ok}\n")),
        Err(why) => (503, TEXT, format!("{why}\n")),
    };
    match path {
        "/metrics" => {
            let mut out = Exposition::default();
            probe.metrics(&mut out);
            (200, "text/plain; version=0.0.4; charset=utf-8", out.finish())
        }
        "/healthz" => verdict(probe.health(), "ok"),
        "/readyz" => verdict(probe.readiness(), "ready"),
        "/nodes" => match probe.nodes() {
            Some(json) => (200, "application/json", format!("{json:#}\n")),
            None => (404, TEXT, "no node set here: /nodes is served by push-manager serve\n".into()),
        },
        _ => (404, TEXT, "not found; try /metrics, /healthz, /readyz or /nodes\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_takes_an_address_or_off_and_names_itself_otherwise() {
        assert_eq!("off".parse::<Listen>(), Ok(Listen::Off));
        assert_eq!("127.0.0.1:0".parse::<Listen>(), Ok(Listen::At("127.0.0.1:0".parse().unwrap())));
        let err = "localhost:x".parse::<Listen>().unwrap_err();
        assert!(err.contains("--admin-listen") && err.contains("localhost:x"), "{err}");
    }
}
