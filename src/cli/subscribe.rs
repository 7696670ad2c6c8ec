//! `push-manager subscribe`: a WebSocket user on the command line, printing each delivery, over
//! `ws://` or, trusting the CA given with `--ca`, `wss://` (rustls, as the node serves it).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::Request;
use tungstenite::{Message, WebSocket};

#[derive(Args, Debug)]
pub struct SubscribeArgs {
    /// WebSocket URL of a connect-node: ws://host:port/ws, or wss:// with --ca.
    #[arg(long, default_value = "ws://127.0.0.1:8090/ws")]
    pub url: String,
    /// CA certificate(s) (PEM) to trust for a wss:// URL: the one that signed the node's
    /// --ws-tls-cert.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Topic to subscribe to (repeat for several); none means only broadcasts to everyone.
    #[arg(long = "topic")]
    pub topics: Vec<String>,
    /// Exit after this many deliveries (0: run until the connection closes).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
    /// Connection token (`push-manager token`) sent as ?token=; the environment variable
    /// PUSH_MANAGER_WS_TOKEN is used when this is absent.
    #[arg(long)]
    pub token: Option<String>,
}

/// How the frames that count towards `--count` begin: the node writes `type` first.
const DELIVERY_PREFIXES: [&str; 2] = [r#"{"type":"message""#, r#"{"type":"direct""#];

/// The environment variable a connection token may come from (kept out of `ps` that way).
pub const TOKEN_ENV: &str = "PUSH_MANAGER_WS_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// The URL is not a `ws://host:port/path` (or `wss://`) one.
    #[error("{0:?} is not a ws:// URL (like ws://127.0.0.1:8090/ws, or wss://... with --ca)")]
    InvalidUrl(String),
    /// A `wss://` URL without `--ca`, or a `--ca` file that cannot be used.
    #[error("{0}")]
    Ca(String),
    /// The connection could not be opened or broke.
    #[error("{url}: {source}")]
    WebSocket { url: String, source: Box<tungstenite::Error> },
    /// The node closed the connection with a code that is not a normal close.
    #[error("{url} closed the connection: {code} {reason}")]
    Closed { url: String, code: u16, reason: String },
    /// Standard output went away.
    #[error("writing to standard output: {0}")]
    Stdout(#[from] std::io::Error),
}

/// The URL with `?token=..` (if any) and `?topic=..` for each topic appended, form-encoded as
/// the node decodes them.
pub fn subscribe_url(url: &str, topics: &[String], token: Option<&str>) -> String {
    let mut out = url.to_string();
    let params = token.map(|t| ("token", t)).into_iter().chain(topics.iter().map(|t| ("topic", t.as_str())));
    for (name, value) in params {
        out.push(if out.contains('?') { '&' } else { '?' });
        out.push_str(name);
        out.push('=');
        out.extend(form_urlencoded::byte_serialize(value.as_bytes()));
    }
    out
}

/// Opens the TCP connection ourselves so a refused or unreachable node is reported with the OS
/// error (tungstenite's `connect` only says it was "unable to connect"). Returns the request
/// and the connected socket, for the handshake.
fn connect(url: &str, default_port: u16) -> Result<(Request, TcpStream), tungstenite::Error> {
    let request = url.into_client_request()?;
    let uri = request.uri();
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(default_port);
    let stream = TcpStream::connect((host.as_str(), port))?;
    Ok((request, stream))
}

fn handshake<S: Read + Write>(request: Request, stream: S) -> Result<WebSocket<S>, tungstenite::Error> {
    let (socket, _) = tungstenite::client(request, stream).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(e) => e,
        tungstenite::HandshakeError::Interrupted(_) => unreachable!("a blocking stream never interrupts a handshake"),
    })?;
    Ok(socket)
}

/// A TLS client config trusting only the certificates in `ca`.
fn tls_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, SubscribeError> {
    let bad = |what: String| SubscribeError::Ca(format!("--ca {}: {what}", ca.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad(e.to_string()))? {
        roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

pub fn run(args: SubscribeArgs) -> Result<(), SubscribeError> {
    let secure = args.url.starts_with("wss://") && args.url.len() > "wss://".len();
    if !secure && (!args.url.starts_with("ws://") || args.url.len() == "ws://".len()) {
        return Err(SubscribeError::InvalidUrl(args.url));
    }
    let token = args.token.clone().or_else(|| std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()));
    let url = subscribe_url(&args.url, &args.topics, token.as_deref());
    let ws_error = |e: tungstenite::Error| SubscribeError::WebSocket { url: args.url.clone(), source: Box::new(e) };
    // Printed as given: the token is a secret.
    let shown = subscribe_url(&args.url, &args.topics, None);
    if !secure {
        let (request, stream) = connect(&url, 80).map_err(ws_error)?;
        return deliver(handshake(request, stream).map_err(ws_error)?, &shown, &args);
    }
    let Some(ca) = &args.ca else {
        return Err(SubscribeError::Ca(format!(
            "{} is a wss:// URL: give --ca with the CA certificate that signed the node's",
            args.url
        )));
    };
    let config = tls_config(ca)?;
    let (request, stream) = connect(&url, 443).map_err(ws_error)?;
    let host = request.uri().host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| SubscribeError::InvalidUrl(format!("{}: host {host:?}: {e}", args.url)))?;
    let session = rustls::ClientConnection::new(config, name).map_err(|e| ws_error(std::io::Error::other(e).into()))?;
    let socket = handshake(request, rustls::StreamOwned::new(session, stream)).map_err(ws_error)?;
    deliver(socket, &shown, &args)
}

/// Prints each delivery until `--count` of them, or the node closes.
fn deliver<S: Read + Write>(mut socket: WebSocket<S>, url: &str, args: &SubscribeArgs) -> Result<(), SubscribeError> {
    let ws_error = |e: tungstenite::Error| SubscribeError::WebSocket { url: args.url.clone(), source: Box::new(e) };
    eprintln!("connected to {url}");
    let mut stdout = std::io::stdout().lock();
    let mut delivered = 0;
    loop {
        match socket.read().map_err(ws_error)? {
            Message::Text(text) => {
                writeln!(stdout, "{}", text.as_str())?;
                stdout.flush()?;
                if DELIVERY_PREFIXES.iter().any(|prefix| text.as_str().starts_with(prefix)) {
                    delivered += 1;
                    if delivered == args.count {
                        let _ = socket.close(None);
                        return Ok(());
                    }
                }
            }
            Message::Close(frame) => {
                let (code, reason) = frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                if code == 1000 || code == 1001 {
                    eprintln!("closed by the node: {code} {reason}");
                    return Ok(());
                }
                return Err(SubscribeError::Closed { url: args.url.clone(), code, reason });
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_become_query_parameters() {
        assert_eq!(subscribe_url("ws://h/ws", &[], None), "ws://h/ws");
        assert_eq!(subscribe_url("ws://h/ws", &["a".into(), "b c".into()], None), "ws://h/ws?topic=a&topic=b+c");
        assert_eq!(subscribe_url("ws://h/ws?x=1", &["a".into()], None), "ws://h/ws?x=1&topic=a");
        assert_eq!(subscribe_url("ws://h/ws", &["a".into()], Some("x.y+z")), "ws://h/ws?token=x.y%2Bz&topic=a");
    }
}
