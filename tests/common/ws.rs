//! Real WebSocket clients of a connect-node: tungstenite over blocking sockets whose reads time
//! out after [`PATIENCE`] (plain, or through a rustls client session for `wss://`), and raw HTTP
//! for what a WebSocket client would never send.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

use super::PATIENCE;

/// The stream under a `wss://` client: a rustls client session over a blocking socket.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A WebSocket client over a blocking socket (`S` = [`TlsStream`] for `wss://`); every read
/// times out after [`PATIENCE`].
pub struct Client<S = TcpStream> {
    pub ws: WebSocket<S>,
}

/// The config of a `wss://` client that trusts only the CA certificate(s) in `ca`.
pub fn tls_client_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap_or_else(|e| panic!("{}: {e}", ca.display())) {
        roots.add(cert.expect("a PEM certificate")).expect("a CA certificate rustls accepts");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// Small buffers: the load test opens 10,000 clients.
fn client_ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0)
}

/// Runs a client handshake over a blocking `stream`.
fn handshake<S: Read + Write>(url: &str, stream: S) -> Result<Client<S>, tungstenite::Error> {
    match tungstenite::client::client_with_config(url, stream, Some(client_ws_config())) {
        Ok((ws, _response)) => Ok(Client { ws }),
        Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
        Err(tungstenite::HandshakeError::Interrupted(_)) => unreachable!("blocking sockets do not interrupt"),
    }
}

impl Client<TlsStream> {
    /// Connects to `wss://<addr><path_and_query>` trusting the CA in `ca`, panicking if the TLS
    /// handshake or the upgrade fails.
    #[track_caller]
    pub fn connect_tls(addr: SocketAddr, path_and_query: &str, ca: &Path) -> Client<TlsStream> {
        Client::try_connect_tls(addr, path_and_query, ca)
            .unwrap_or_else(|e| panic!("connecting to wss://{addr}{path_and_query}: {e}"))
    }

    /// [`Client::connect_tls`], handing back a failed TLS handshake or a refused upgrade.
    pub fn try_connect_tls(
        addr: SocketAddr,
        path_and_query: &str,
        ca: &Path,
    ) -> Result<Client<TlsStream>, tungstenite::Error> {
        let stream = TcpStream::connect(addr).expect("TCP connect");
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.set_write_timeout(Some(PATIENCE)).unwrap();
        let name = ServerName::from(addr.ip());
        let session = rustls::ClientConnection::new(tls_client_config(ca), name).expect("a TLS client session");
        handshake(&format!("wss://{addr}{path_and_query}"), rustls::StreamOwned::new(session, stream))
    }

    /// Connects over TLS and subscribes to `topics` with a command, waiting for the ack.
    #[track_caller]
    pub fn subscribed_tls(addr: SocketAddr, topics: &[&str], ca: &Path) -> Client<TlsStream> {
        let mut client = Client::connect_tls(addr, "/ws", ca);
        let ack = client.command("subscribe", topics);
        assert_eq!(ack["type"], "subscribed", "{ack}");
        client
    }
}

impl Client {
    /// Connects to `ws://<addr><path_and_query>` (e.g. `/ws?topic=a`), panicking if the upgrade
    /// fails.
    #[track_caller]
    pub fn connect(addr: SocketAddr, path_and_query: &str) -> Client {
        Client::try_connect(addr, path_and_query).unwrap_or_else(|e| panic!("connecting to {path_and_query}: {e}"))
    }

    /// [`Client::connect`], handing back a refused upgrade (an HTTP error status, say).
    pub fn try_connect(addr: SocketAddr, path_and_query: &str) -> Result<Client, tungstenite::Error> {
        let stream = TcpStream::connect(addr).expect("TCP connect");
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.set_write_timeout(Some(PATIENCE)).unwrap();
        handshake(&format!("ws://{addr}{path_and_query}"), stream)
    }

    /// Connects and subscribes to `topics` with a command, waiting for the ack.
    #[track_caller]
    pub fn subscribed(addr: SocketAddr, topics: &[&str]) -> Client {
        let mut client = Client::connect(addr, "/ws");
        let ack = client.command("subscribe", topics);
        assert_eq!(ack["type"], "subscribed", "{ack}");
        client
    }
}

impl<S: Read + Write> Client<S> {
    /// Sends a subscribe/unsubscribe command and returns the ack.
    #[track_caller]
    pub fn command(&mut self, action: &str, topics: &[&str]) -> Value {
        let command = serde_json::json!({ "action": action, "topics": topics });
        self.send_text(&command.to_string());
        self.next_json()
    }

    /// Sends `text` as a text frame.
    #[track_caller]
    pub fn send_text(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).expect("send a text frame");
    }

    /// The next text frame as JSON, skipping pings and pongs.
    #[track_caller]
    pub fn next_json(&mut self) -> Value {
        match self.next_message() {
            Message::Text(text) => serde_json::from_str(text.as_str()).expect("the gateway sends JSON"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The bodies (text) of the next `n` deliveries, in arrival order.
    #[track_caller]
    pub fn next_bodies(&mut self, n: usize) -> Vec<String> {
        (0..n).map(|_| self.next_json()["body"].as_str().expect("a text body").to_string()).collect()
    }

    /// The next data or close message (pings and pongs are answered and skipped).
    #[track_caller]
    pub fn next_message(&mut self) -> Message {
        loop {
            match self.ws.read() {
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(message) => return message,
                Err(e) => panic!("reading from the gateway: {e}"),
            }
        }
    }

    /// Reads until the close frame, skipping any deliveries before it; returns code and reason.
    #[track_caller]
    pub fn expect_close(&mut self) -> (u16, String) {
        loop {
            match self.next_message() {
                Message::Close(Some(frame)) => return (u16::from(frame.code), frame.reason.to_string()),
                Message::Close(None) => panic!("close frame without a code"),
                Message::Text(_) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }
}

/// Sends raw bytes on a new TCP connection to `addr` and returns everything the gateway answers
/// until it closes the connection.
pub fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).expect("TCP connect");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(request).expect("send the request");
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading the answer to a raw request: {e}"),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// A valid upgrade request for `path` on `addr`.
pub fn upgrade_request(addr: SocketAddr, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}
