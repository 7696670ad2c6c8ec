//! The other end of the admin endpoint: one plain HTTP GET, for `push-manager status` and the
//! tests. HTTP/1.0 with `Connection: close`, so the body is whatever comes before the close and
//! no HTTP client library (nor runtime) is needed.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// A response: its status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// GETs `url` (`http://host:port/path`, or `host:port/path`) within `timeout` for each of
/// connecting, writing and every read.
pub fn get(url: &str, timeout: Duration) -> Result<Response, String> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    if rest.contains("://") {
        return Err(format!("{url}: only http:// is served by the admin endpoint"));
    }
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let addr = host
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {host:?} is not a host:port ({e})"))?
        .next()
        .ok_or_else(|| format!("{url}: {host} resolves to no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{url}: cannot connect: {e}"))?;
    let io = |e: std::io::Error| format!("{url}: {e}");
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n").map_err(io)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(io)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("{url}: not an HTTP response"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("{url}: no status in {:?}", head.lines().next().unwrap_or("")))?;
    Ok(Response { status, body: body.to_string() })
}
