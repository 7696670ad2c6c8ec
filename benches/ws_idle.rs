//! How much resident memory does a connect-node spend per idle WebSocket connection, plain
//! (`ws://`) and over TLS (`wss://`)?
//!
//! For each, runs the gateway in a child process (this program re-executed with
//! `WS_IDLE_CHILD=1`, and the certificate of a throwaway CA for TLS) so its VmRSS is not mixed
//! with the clients', opens `WS_IDLE_CONNECTIONS` (default 10,000) idle WebSocket connections
//! to it over loopback, checks over gRPC that one broadcast reaches every one of them, and
//! prints the child's VmRSS before and after. The two results are printed side by side next to
//! the target (16 KiB per connection) and Centrifugo's published figure (~30 KB per idle
//! connection).
//!
//! `cargo bench --bench ws_idle`; it stops by itself.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpcio::ChannelBuilder;
use push_manager::gateway::{raise_nofile_limit, Config, Gateway, WsTls};
use push_manager::proto::broadcast_request;
use push_manager::proto::protocol_grpc::ConnectNodeClient;
use push_manager::testkit::TestPki;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use support::{env_or, grpc_env, vm_rss_kib};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

const CHILD_ENV: &str = "WS_IDLE_CHILD";
/// Set for a TLS child: its certificate and key files.
const CERT_ENV: &str = "WS_IDLE_TLS_CERT";
const KEY_ENV: &str = "WS_IDLE_TLS_KEY";
const TARGET_BYTES: f64 = 16.0 * 1024.0;
const CENTRIFUGO_BYTES: f64 = 30.0 * 1000.0;
/// Longest each half of the run (plain, TLS) may take before it gives up.
const BUDGET: Duration = Duration::from_secs(300);
const TOPIC: &str = "idle";

fn main() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return run_gateway();
    }
    if let Err(e) = run_clients() {
        eprintln!("ws_idle failed: {e}");
        std::process::exit(1);
    }
}

/// The child: a gateway with the default config on loopback (with TLS when given the files),
/// until stdin closes.
fn run_gateway() {
    raise_nofile_limit().expect("raise the open-files limit");
    let ws_tls = match (std::env::var_os(CERT_ENV), std::env::var_os(KEY_ENV)) {
        (Some(cert), Some(key)) => Some(WsTls { cert: cert.into(), key: key.into() }),
        _ => None,
    };
    let gateway = Gateway::start(Config {
        grpc_listen: "127.0.0.1:0".into(),
        ws_listen: "127.0.0.1:0".into(),
        ws_tls,
        ..Config::default()
    })
    .expect("gateway starts");
    println!("{} {}", gateway.ws_addr(), gateway.grpc_addr());
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(gateway);
}

type Error = Box<dyn std::error::Error>;

/// What one half of the run measured.
struct Figures {
    /// Resident bytes per connection once all are open and idle.
    per_idle: f64,
    /// Resident bytes per connection after one broadcast reached them all.
    per_after: f64,
    connect_secs: f64,
}

fn run_clients() -> Result<(), Error> {
    let wanted = env_or("WS_IDLE_CONNECTIONS", 10_000) as usize;
    let limit = raise_nofile_limit()? as usize;
    if wanted + 64 > limit {
        return Err(format!("{wanted} connections need more than this process's open-files limit ({limit})").into());
    }
    println!("== plain ws://");
    let plain = run_child(wanted, None)?;
    let pki = TestPki::new();
    let identity = pki.issue("node");
    let tls = ClientTls { config: tls_client_config(&pki.ca())? };
    println!("== TLS wss:// (rustls, ring)");
    let secure = run_child(wanted, Some((&identity.cert, &identity.key, &tls)))?;

    println!();
    println!("{wanted} idle connections        {:>14} {:>14}", "ws://", "wss://");
    let kib = |bytes: f64| format!("{:.1} KiB", bytes / 1024.0);
    println!("memory per idle connection  {:>14} {:>14}", kib(plain.per_idle), kib(secure.per_idle));
    println!("after one broadcast to all  {:>14} {:>14}", kib(plain.per_after), kib(secure.per_after));
    let secs = |s: f64| format!("{s:.1} s");
    println!("time to open them all       {:>14} {:>14}", secs(plain.connect_secs), secs(secure.connect_secs));
    let verdict = |f: &Figures| if f.per_after <= TARGET_BYTES { "met" } else { "MISSED" };
    println!(
        "target: {:.1} KiB per connection (ws:// {}, wss:// {}); Centrifugo: ~{:.1} KiB (30 KB) per idle connection",
        TARGET_BYTES / 1024.0,
        verdict(&plain),
        verdict(&secure),
        CENTRIFUGO_BYTES / 1024.0
    );
    Ok(())
}

/// What a TLS client trusts.
struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

/// Starts a gateway child (TLS with `tls`'s certificate and key), measures it, stops it.
fn run_child(wanted: usize, tls: Option<(&Path, &Path, &ClientTls)>) -> Result<Figures, Error> {
    let started = Instant::now();
    let mut command = Command::new(std::env::current_exe()?);
    command.env(CHILD_ENV, "1").stdin(Stdio::piped()).stdout(Stdio::piped());
    if let Some((cert, key, _)) = tls {
        command.env(CERT_ENV, cert).env(KEY_ENV, key);
    }
    let mut child = command.spawn()?;
    let result = measure(&mut child, wanted, started, tls.map(|(_, _, client)| client));
    drop(child.stdin.take());
    let _ = child.wait();
    result
}

fn measure(child: &mut Child, wanted: usize, started: Instant, tls: Option<&ClientTls>) -> Result<Figures, Error> {
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("no child stdout")?).read_line(&mut line)?;
    let mut addrs = line.split_whitespace().map(str::parse::<SocketAddr>);
    let (ws_addr, grpc_addr) = match (addrs.next(), addrs.next()) {
        (Some(Ok(ws)), Some(Ok(grpc))) => (ws, grpc),
        _ => return Err(format!("unexpected child output {line:?}").into()),
    };
    let pid = child.id();
    let rss_before = vm_rss_kib(pid)?;
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    println!(
        "gateway pid {pid}: {scheme}://{ws_addr}/ws, gRPC {grpc_addr}; VmRSS {rss_before} KiB with no connections"
    );

    let connect_started = Instant::now();
    let mut clients = Vec::with_capacity(wanted);
    for i in 0..wanted {
        if started.elapsed() > BUDGET {
            return Err(format!("time budget spent after {i} connections").into());
        }
        clients.push(connect(ws_addr, tls)?);
        if (i + 1) % 1000 == 0 {
            println!("  {:>6} connections open ({:.1} s)", i + 1, connect_started.elapsed().as_secs_f64());
        }
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    let rss_idle = vm_rss_kib(pid)?;

    // One broadcast must reach every connection; retry while the last handshakes settle.
    let node = ConnectNodeClient::new(ChannelBuilder::new(grpc_env()).connect(&grpc_addr.to_string()));
    let mut attempt = 0;
    loop {
        attempt += 1;
        let reply = node.broadcast(&broadcast_request(TOPIC, 1000, attempt, "are you there?"))?;
        if reply.delivered == wanted as u64 {
            break;
        }
        if attempt >= 50 {
            return Err(format!("broadcast reached {} of {wanted} connections", reply.delivered).into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for (i, client) in clients.iter_mut().enumerate() {
        read_until_seq(client, attempt).map_err(|e| format!("connection {i}: {e}"))?;
    }
    let rss_after = vm_rss_kib(pid)?;

    let per_idle = (rss_idle.saturating_sub(rss_before) * 1024) as f64 / wanted as f64;
    let per_after = (rss_after.saturating_sub(rss_before) * 1024) as f64 / wanted as f64;
    println!("{wanted} idle WebSocket connections opened in {connect_secs:.1} s; all {wanted} still open and received the broadcast");
    println!("gateway VmRSS: {rss_before} KiB before, {rss_idle} KiB idle, {rss_after} KiB after one broadcast to all");
    println!(
        "resident memory per idle connection: {:.1} KiB ({per_idle:.0} B); after a broadcast: {:.1} KiB",
        per_idle / 1024.0,
        per_after / 1024.0
    );
    // Clients hang up first, so the gateway's loops see plain EOFs and stop quickly.
    drop(clients);
    Ok(Figures { per_idle, per_after, connect_secs })
}

/// A client's stream: the socket, or a rustls session over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// A client config trusting only the CA in `ca`.
fn tls_client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn connect(addr: SocketAddr, tls: Option<&ClientTls>) -> Result<WebSocket<Stream>, Error> {
    let socket = TcpStream::connect(addr)?;
    socket.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (stream, scheme) = match tls {
        None => (Stream::Plain(socket), "ws"),
        Some(tls) => {
            let session = rustls::ClientConnection::new(tls.config.clone(), ServerName::from(addr.ip()))?;
            (Stream::Tls(Box::new(rustls::StreamOwned::new(session, socket))), "wss")
        }
    };
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let url = format!("{scheme}://{addr}/ws?topic={TOPIC}");
    let (ws, _) = tungstenite::client::client_with_config(url.as_str(), stream, Some(config))
        .map_err(|e| format!("WebSocket handshake: {e}"))?;
    Ok(ws)
}

/// Reads deliveries until the one with `seq` (earlier attempts may have reached this client).
fn read_until_seq(client: &mut WebSocket<Stream>, seq: i32) -> Result<(), Error> {
    loop {
        match client.read()? {
            Message::Text(text) => {
                let frame: serde_json::Value = serde_json::from_str(text.as_str())?;
                if frame["seq"] == seq {
                    return Ok(());
                }
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => return Err(format!("unexpected {other:?}").into()),
        }
    }
}
