//! The HTTP part of a connection's life: tungstenite's server handshake driven over a
//! non-blocking socket, the callback that checks the path, the `Origin` and the `?token=`, and
//! reads `?topic=` parameters, and the plain HTTP answers to requests that are not WebSocket
//! upgrades.
//!
//! tungstenite refuses a request without the upgrade headers before calling us and drops its
//! socket without a word; a client (or an operator with curl) deserves to be told why, so each
//! plaintext handshake keeps a second descriptor of its socket to answer on. On a `wss://`
//! endpoint the TLS handshake comes first, inside this phase and its timeout; a client that
//! fails it (one speaking plain HTTP or WebSocket, or garbage) is dropped and counted.

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use log::debug;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use parking_lot::Mutex;
use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::handshake::server::{Callback, ErrorResponse, Request, Response, ServerHandshake};
use tungstenite::handshake::MidHandshake;
use tungstenite::HandshakeError;

use super::connection::Connection;
use super::transport::{self, Transport};
use super::LoopConfig;
use crate::gateway::access::{Gatekeeper, Identity};
use crate::gateway::protocol::{self, TopicLimits};

/// The only path that upgrades.
pub(crate) const WS_PATH: &str = "/ws";

/// Where a handshake stands after the socket was ready.
pub(crate) enum Step {
    /// It needs more bytes (or room to write its response).
    Pending,
    /// Upgraded, with what its request said.
    Open(Box<Connection>, Opening),
    /// Refused with an HTTP error response, for the reason it names.
    Refused(RefusedBy),
    /// Failed the TLS handshake: not a TLS client, or one that refused our certificate.
    TlsRefused,
    /// The client left or broke the connection before finishing.
    Abandoned,
}

/// What an accepted upgrade request asked for and proved.
#[derive(Debug, Default)]
pub(crate) struct Opening {
    /// The `?topic=` parameters, each granted by `identity` if there is one.
    pub(crate) topics: Vec<String>,
    /// The verified `?token=`, if one came.
    pub(crate) identity: Option<Identity>,
}

/// Why an upgrade was refused, for the node's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefusedBy {
    /// Not a WebSocket upgrade we serve: wrong path or method, bad query, malformed request.
    #[default]
    Request,
    /// `--allowed-origins` / `--require-origin` (HTTP 403).
    Origin,
    /// A missing, bad or expired `?token=`, or a `?topic=` it does not grant (HTTP 401/403).
    Token,
}

/// What the handshake callback learns from the request, for the handshake to act on.
#[derive(Debug, Default)]
struct Learned {
    /// Filled from an accepted request.
    opening: Opening,
    /// Set when it refuses for a reason other than the request's form.
    refused_by: RefusedBy,
    /// Set once the request is read: from then on the socket carries our answer.
    request_read: bool,
}

/// A connection still in its HTTP handshake.
pub(crate) struct Handshaking {
    mid: Option<MidHandshake<ServerHandshake<Transport, Upgrade>>>,
    /// A duplicate of the socket, to answer a request tungstenite refused. `None` on TLS
    /// sockets: plaintext bytes there would be garbage to the client, and the TLS session went
    /// down with tungstenite's handshake, so those refusals are a closed connection (the
    /// callback's own refusals, 404, 401, 403 and bad topics, are written by tungstenite
    /// through TLS).
    answer: Option<std::net::TcpStream>,
    /// What [`Upgrade`] learns from the request. Shared through a lock, not an `Rc`, because a
    /// loop's state (this with it) is locked by publishers too ([`super::LoopState`]).
    learned: Arc<Mutex<Learned>>,
    deadline: Instant,
    /// The open connection's bytes per write (`--ws-write-bytes`).
    write_bytes: usize,
}

impl Handshaking {
    /// Registers a freshly accepted socket under `token` and starts its handshake (TLS first
    /// when `tls` is given), which has `config.handshake_timeout` to finish.
    pub(crate) fn start(
        stream: TcpStream,
        tls: Option<&Arc<rustls::ServerConfig>>,
        registry: &Registry,
        token: Token,
        config: &LoopConfig,
    ) -> io::Result<Handshaking> {
        let (mut stream, answer) = match tls {
            Some(tls) => (Transport::tls(stream, tls).map_err(io::Error::other)?, None),
            None => {
                let answer = std::net::TcpStream::from(stream.as_fd().try_clone_to_owned()?);
                (Transport::plain(stream), Some(answer))
            }
        };
        registry.register(stream.socket_mut(), token, Interest::READABLE | Interest::WRITABLE)?;
        let learned = Arc::new(Mutex::new(Learned::default()));
        let callback =
            Upgrade { limits: config.limits, gatekeeper: config.gatekeeper.clone(), learned: learned.clone() };
        let mid = ServerHandshake::start(stream, callback, Some(config.ws));
        let deadline = Instant::now() + config.handshake_timeout;
        let write_bytes = config.write_bytes;
        Ok(Handshaking { mid: Some(mid), answer, learned, deadline, write_bytes })
    }

    /// Takes the handshake as far as the socket allows.
    pub(crate) fn advance(&mut self) -> Step {
        let Some(mid) = self.mid.take() else { return Step::Pending };
        match mid.handshake() {
            Ok(ws) => {
                let conn = Box::new(Connection::new(ws, self.write_bytes));
                Step::Open(conn, std::mem::take(&mut self.learned.lock().opening))
            }
            Err(HandshakeError::Interrupted(mid)) => {
                self.mid = Some(mid);
                Step::Pending
            }
            Err(HandshakeError::Failure(e)) => self.refuse(e),
        }
    }

    /// Whether it has taken longer than it may.
    pub(crate) fn expired(&self, now: Instant) -> bool {
        now >= self.deadline
    }

    /// Tells a client that never finished its request why it is being dropped (HTTP 408);
    /// one whose request was read is in the middle of getting our answer, and is just dropped.
    pub(crate) fn time_out(&self, timeout: std::time::Duration) {
        debug!("handshake not done within {timeout:?}; dropping the socket");
        if !self.learned.lock().request_read {
            let body =
                format!("the WebSocket handshake must complete within {}\n", humantime::format_duration(timeout));
            self.answer_http("408 Request Timeout", &body);
        }
    }

    /// Answers a failed handshake with the HTTP error that says why, when the client is there
    /// to read it.
    fn refuse(&self, e: WsError) -> Step {
        let (status, body) = match &e {
            // Our callback refused it; tungstenite has written our response.
            WsError::Http(response) => {
                debug!("handshake refused with HTTP {}", response.status());
                return Step::Refused(self.learned.lock().refused_by);
            }
            WsError::Io(e) if transport::is_tls_failure(e) => {
                debug!("TLS handshake failed: {e}");
                return Step::TlsRefused;
            }
            WsError::Protocol(ProtocolError::HandshakeIncomplete) | WsError::Io(_) => {
                debug!("client left during the handshake: {e}");
                return Step::Abandoned;
            }
            WsError::Protocol(
                ProtocolError::MissingConnectionUpgradeHeader
                | ProtocolError::MissingUpgradeWebSocketHeader
                | ProtocolError::MissingSecWebSocketVersionHeader
                | ProtocolError::MissingSecWebSocketKey,
            ) => {
                debug!("plain HTTP request refused: {e}");
                let body =
                    format!("this endpoint only speaks WebSocket: send GET {WS_PATH} with a WebSocket upgrade ({e})\n");
                ("426 Upgrade Required", body)
            }
            WsError::Protocol(ProtocolError::WrongHttpMethod) => {
                ("405 Method Not Allowed", "only GET with a WebSocket upgrade is served\n".to_string())
            }
            _ => {
                debug!("malformed handshake: {e}");
                ("400 Bad Request", format!("malformed WebSocket handshake: {e}\n"))
            }
        };
        self.answer_http(status, &body);
        Step::Refused(RefusedBy::Request)
    }

    /// Writes a whole HTTP error response on the socket tungstenite gave up on (best effort:
    /// the socket buffer of a fresh connection takes a short response at once).
    fn answer_http(&self, status: &str, body: &str) {
        let Some(mut socket) = self.answer.as_ref() else { return };
        if let Err(e) = socket.write_all(http_response(status, body).as_bytes()) {
            debug!("could not answer a rejected request: {e}");
        }
        let _ = socket.shutdown(Shutdown::Write);
    }
}

/// A whole plain-text HTTP error response that closes the connection, for the sockets the
/// node refuses without tungstenite's help (at accept, or after tungstenite gave up on them).
pub(crate) fn http_response(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Upgrade: websocket\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The handshake callback: checks the path, the `Origin` and the `?token=`, and reads
/// `?topic=` parameters.
struct Upgrade {
    limits: TopicLimits,
    gatekeeper: Arc<Gatekeeper>,
    learned: Arc<Mutex<Learned>>,
}

impl Upgrade {
    fn refuse(&self, by: RefusedBy, status: u16, body: &str) -> ErrorResponse {
        self.learned.lock().refused_by = by;
        http_error(status, body)
    }
}

impl Callback for Upgrade {
    fn on_request(self, request: &Request, response: Response) -> Result<Response, ErrorResponse> {
        self.learned.lock().request_read = true;
        if request.uri().path() != WS_PATH {
            return Err(http_error(404, &format!("not found: the WebSocket endpoint is {WS_PATH}\n")));
        }
        let origin = match request.headers().get("origin").map(|o| o.to_str()) {
            None => None,
            Some(Ok(origin)) => Some(origin),
            Some(Err(_)) => return Err(self.refuse(RefusedBy::Origin, 403, "the Origin header is not text\n")),
        };
        self.gatekeeper.origins.check(origin).map_err(|why| self.refuse(RefusedBy::Origin, 403, &why))?;
        let query = request.uri().query().unwrap_or("");
        let topics = protocol::topics_from_query(query, self.limits)
            .map_err(|e| http_error(400, &format!("bad topic in query string: {e}\n")))?;
        let identity =
            self.identity(query, &topics).map_err(|(status, body)| self.refuse(RefusedBy::Token, status, &body))?;
        self.learned.lock().opening = Opening { topics, identity };
        Ok(response)
    }
}

impl Upgrade {
    /// The verified `?token=`, if the node reads tokens and one came; refuses a bad one, and
    /// `?topic=` parameters that the token does not grant or that need a token, with the HTTP
    /// status and body to answer.
    fn identity(&self, query: &str, topics: &[String]) -> Result<Option<Identity>, (u16, String)> {
        if !self.gatekeeper.reads_tokens() {
            return Ok(None);
        }
        let token = form_urlencoded::parse(query.as_bytes()).find(|(key, _)| key == "token").map(|(_, t)| t);
        let Some(token) = token else {
            if !topics.is_empty() && self.gatekeeper.mode == crate::gateway::WsAuth::Required {
                return Err((
                    401,
                    "?topic= needs ?token= on this node (--ws-auth required); or connect without topics, \
                     send {\"action\":\"auth\",\"token\":\"...\"} and subscribe\n"
                        .into(),
                ));
            }
            return Ok(None);
        };
        let identity = self.gatekeeper.verify(&token).map_err(|e| (401, format!("connection token refused: {e}\n")))?;
        let denied: Vec<&str> = topics.iter().filter(|t| !identity.grants.allows(t)).map(String::as_str).collect();
        if !denied.is_empty() {
            let body = format!("the token does not grant these topics: {}\n", denied.join(", "));
            return Err((403, body));
        }
        Ok(Some(identity))
    }
}

fn http_error(status: u16, body: &str) -> ErrorResponse {
    tungstenite::http::Response::builder()
        .status(status)
        .header("Content-Type", "text/plain; charset=utf-8")
        .header("Content-Length", body.len())
        .header("Connection", "close")
        .body(Some(body.to_string()))
        .expect("a static status and headers make a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_errors_carry_their_body_length() {
        let response = http_error(404, "nope\n");
        assert_eq!(response.status(), 404);
        assert_eq!(response.headers()["Content-Length"], "5");
        assert_eq!(response.body().as_deref(), Some("nope\n"));
    }
}
