//! The byte stream under a WebSocket connection: the non-blocking socket itself (`ws://`), or
//! the socket through a rustls `ServerConnection` (`wss://`). tungstenite and the event loop see
//! one `Read + Write` type either way, with the socket's non-blocking contract: `WouldBlock`
//! means "wait for the next readiness event", and never comes while there is something to do
//! without one.
//!
//! rustls' synchronous API is a state machine, not a stream: TLS records go in with `read_tls`
//! and out with `write_tls`, plaintext in and out through its reader and writer. Gluing it to an
//! edge-triggered poll takes care in two places. Reading returns `WouldBlock` only once the
//! socket did *and* rustls holds no plaintext, so the loop's read-until-`WouldBlock` (and its
//! `unread` list for a spent budget) leaves nothing decrypted behind without a wake-up to come.
//! Writing reports bytes as written as soon as rustls took them, even if the socket then took
//! none of the records: what waits in rustls is pushed by the next `write` or `flush`, and
//! `flush` returns `WouldBlock` for as long as some remains, which is what the connection's
//! unsent-bytes accounting and its wait for a writable event go by.
//!
//! Writes are coalesced here, for both: tungstenite writes each frame through at once (its own
//! buffer would keep its peak size for the life of the connection), and `write` only appends it
//! to `out`; `flush` hands `out` to the socket in one `write` (or to rustls as full records, then
//! one vectored `write`). So the connection decides how many frames share a syscall by when it
//! flushes, and `out` is given back once empty: an idle connection holds no write buffer.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::{ServerConfig, ServerConnection};

use super::connection::{MAX_WRITE_BATCH, MAX_WRITE_BUFFER};

/// Most bytes rustls may hold for a connection's outgoing side (plaintext waiting for the
/// handshake, or records the socket has not taken), as tungstenite's own write buffer is held to
/// `MAX_WRITE_BUFFER`: past it writes return `WouldBlock`, frames wait in the connection's queue,
/// and `max_out_buffer` judges a slow TLS client as it does a plaintext one.
const TLS_BUFFER_LIMIT: usize = MAX_WRITE_BUFFER;
/// Most bytes `out` holds before `write` first tries the socket: the largest batch, the frame or
/// fragment that passed it and a control frame. The connection flushes at its batch size, so
/// only a batch the socket refused comes near it.
const OUT_LIMIT: usize = 2 * MAX_WRITE_BATCH;
/// What `out` starts with: room for a batch of small frames at the default size without
/// growing, without taking the largest batch's worth for a lone frame.
const OUT_START: usize = 16 << 10;

/// A connection's stream, plaintext or TLS, and what was written to it but not yet flushed.
pub(crate) struct Transport {
    stream: Stream,
    /// Written and not yet handed to the socket (or to rustls): sent by `flush`. Allocated while
    /// it holds something, freed once empty.
    out: Vec<u8>,
    /// `write` calls that reached the socket, since the last [`Transport::take_writes`].
    writes: u64,
    /// Bytes of `out` the stream took, since the last [`Transport::take_bytes`].
    bytes: u64,
}

enum Stream {
    Plain(TcpStream),
    /// Boxed: a `ServerConnection` is a few hundred bytes, which plaintext connections should not
    /// carry.
    Tls(Box<Tls>),
}

/// A socket and the TLS session over it.
pub(crate) struct Tls {
    session: ServerConnection,
    socket: TcpStream,
    /// Our close_notify is queued: it is sent once.
    close_notify_queued: bool,
    /// `write_tls` calls that reached the socket (each one vectored `write`).
    writes: u64,
}

impl Transport {
    /// The plaintext stream over `socket`.
    pub(crate) fn plain(socket: TcpStream) -> Transport {
        Transport { stream: Stream::Plain(socket), out: Vec::new(), writes: 0, bytes: 0 }
    }

    /// A TLS server session over `socket`, to be driven by the first reads.
    pub(crate) fn tls(socket: TcpStream, config: &Arc<ServerConfig>) -> Result<Transport, rustls::Error> {
        let mut session = ServerConnection::new(config.clone())?;
        session.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
        let tls = Tls { session, socket, close_notify_queued: false, writes: 0 };
        Ok(Transport { stream: Stream::Tls(Box::new(tls)), out: Vec::new(), writes: 0, bytes: 0 })
    }

    /// The socket, to register it with a poll.
    pub(crate) fn socket_mut(&mut self) -> &mut TcpStream {
        match &mut self.stream {
            Stream::Plain(socket) => socket,
            Stream::Tls(tls) => &mut tls.socket,
        }
    }

    /// Nothing written waits here, and no buffer is kept for it.
    #[cfg(test)]
    pub(crate) fn holds_nothing(&self) -> bool {
        self.out.capacity() == 0
    }

    /// How many bytes the stream took since the last call.
    pub(crate) fn take_bytes(&mut self) -> u64 {
        std::mem::take(&mut self.bytes)
    }

    /// How many `write` calls reached the socket since the last call.
    pub(crate) fn take_writes(&mut self) -> u64 {
        let tls = match &mut self.stream {
            Stream::Plain(_) => 0,
            Stream::Tls(tls) => std::mem::take(&mut tls.writes),
        };
        std::mem::take(&mut self.writes) + tls
    }

    /// Hands `out` to the stream until it is empty (`Ok`) or the stream takes no more
    /// (`WouldBlock`). Gives the buffer back once empty.
    fn send_out(&mut self) -> io::Result<()> {
        let mut sent = 0;
        let result = loop {
            if sent == self.out.len() {
                break Ok(());
            }
            let written = match &mut self.stream {
                Stream::Plain(socket) => {
                    let written = socket.write(&self.out[sent..]);
                    if written.is_ok() {
                        self.writes += 1;
                    }
                    written
                }
                Stream::Tls(tls) => tls.write(&self.out[sent..]),
            };
            match written {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.bytes += sent as u64;
        if sent == self.out.len() {
            self.out = Vec::new();
        } else {
            self.out.drain(..sent);
        }
        result
    }

    /// Ends our direction of the stream once what was written is out: for TLS, a close_notify
    /// goes after the last record (so the client can tell an end from a truncation), then the
    /// socket's write side is shut. `WouldBlock` while the socket has not taken it all; call
    /// again when it is writable.
    pub(crate) fn shutdown_write(&mut self) -> io::Result<()> {
        self.flush()?;
        match &mut self.stream {
            Stream::Plain(socket) => socket.shutdown(Shutdown::Write),
            Stream::Tls(tls) => {
                if !tls.close_notify_queued {
                    tls.session.send_close_notify();
                    tls.close_notify_queued = true;
                }
                tls.send_pending()?;
                tls.socket.shutdown(Shutdown::Write)
            }
        }
    }
}

/// Whether an I/O error from a [`Transport`] is the TLS session failing (a client that does not
/// speak TLS, or does not accept our certificate), rather than the socket.
pub(crate) fn is_tls_failure(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>())
}

impl Tls {
    /// Writes the records rustls holds until it holds none (`Ok`) or the socket is full
    /// (`WouldBlock`).
    fn send_pending(&mut self) -> io::Result<()> {
        while self.session.wants_write() {
            match self.session.write_tls(&mut self.socket) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => self.writes += 1,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// [`Tls::send_pending`] as far as the socket takes: a full socket is no error here.
    fn send_what_fits(&mut self) -> io::Result<()> {
        match self.send_pending() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(()),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // What an earlier read made (handshake messages, alerts) may be what the peer waits for.
        self.send_what_fits()?;
        loop {
            // Plaintext rustls already holds comes first: the socket may have nothing more, and
            // no readiness event would come for what is buffered here.
            match self.session.reader().read(buf) {
                // Ok(0): the peer's close_notify; UnexpectedEof: it hung up without one.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            match self.session.read_tls(&mut self.socket) {
                // End of stream: the reader reports it on the next turn.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if let Err(e) = self.session.process_new_packets() {
                // rustls has queued an alert saying why; the peer may read it before we hang up.
                let _ = self.send_pending();
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            // Handshake replies go out as soon as they are made.
            self.send_what_fits()?;
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut taken = self.session.writer().write(buf)?;
        if taken == 0 {
            // At its buffer limit: make room, or tell the caller to wait for the socket.
            self.send_pending()?;
            taken = self.session.writer().write(buf)?;
            if taken == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        // Taken means written: what the socket does not take now goes with the next write or flush.
        self.send_what_fits()?;
        Ok(taken)
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Plain(socket) => socket.read(buf),
            Stream::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Transport {
    /// Takes what fits of `buf` into `out`, to go with the next `flush`; tries the socket only
    /// when `out` is full, and is `WouldBlock` when that makes no room.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.out.len() >= OUT_LIMIT {
            match self.send_out() {
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                _ if self.out.len() >= OUT_LIMIT => return Err(io::ErrorKind::WouldBlock.into()),
                _ => {}
            }
        }
        if self.out.capacity() == 0 {
            // One allocation for most batches rather than a doubling every few frames.
            self.out.reserve(OUT_START);
        }
        let taken = buf.len().min(OUT_LIMIT - self.out.len());
        self.out.extend_from_slice(&buf[..taken]);
        Ok(taken)
    }

    /// `WouldBlock` until everything written is in the socket (for TLS: every record).
    fn flush(&mut self) -> io::Result<()> {
        self.send_out()?;
        match &mut self.stream {
            Stream::Plain(_) => Ok(()),
            Stream::Tls(tls) => tls.send_pending(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::WsTls;
    use crate::testkit::TestPki;
    use mio::{Events, Interest, Poll, Token};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    use std::time::{Duration, Instant};

    const PATIENCE: Duration = Duration::from_secs(10);

    /// A server-side TLS transport registered edge-triggered with `poll`, and a blocking rustls
    /// client at the other end (its handshake is driven by the server's first reads).
    fn tls_pair(
        pki: &TestPki,
        poll: &Poll,
    ) -> (Transport, rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>) {
        let id = pki.issue("node");
        let server_config = WsTls { cert: id.cert, key: id.key }.server_config().unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(pki.ca()).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let client_config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.set_read_timeout(Some(PATIENCE)).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut transport = Transport::tls(TcpStream::from_std(server), &server_config).unwrap();
        poll.registry().register(transport.socket_mut(), Token(0), Interest::READABLE | Interest::WRITABLE).unwrap();
        let name = rustls::pki_types::ServerName::from(std::net::IpAddr::from([127, 0, 0, 1]));
        let session = rustls::ClientConnection::new(Arc::new(client_config), name).unwrap();
        (transport, rustls::StreamOwned::new(session, client))
    }

    fn server_handshaking(transport: &Transport) -> bool {
        matches!(&transport.stream, Stream::Tls(tls) if tls.session.is_handshaking())
    }

    /// Waits for the next readiness event, failing the test if none comes.
    fn next_event(poll: &mut Poll, events: &mut Events, deadline: Instant) {
        loop {
            let left = deadline.checked_duration_since(Instant::now()).expect("a readiness event in time");
            poll.poll(events, Some(left)).unwrap();
            if !events.is_empty() {
                return;
            }
        }
    }

    #[test]
    fn reading_to_would_block_leaves_nothing_behind_for_an_edge_triggered_poll() {
        let pki = TestPki::new();
        let mut poll = Poll::new().unwrap();
        let (mut server, mut client) = tls_pair(&pki, &poll);
        // Three records in one go, then the client waits for our answer: every byte must come
        // out of reads between edges, or no event would come for what is left.
        let sender = std::thread::spawn(move || {
            for part in [b'a', b'b', b'c'] {
                client.write_all(&[part; 100]).unwrap();
            }
            let mut answer = [0u8; 2];
            client.read_exact(&mut answer).unwrap();
            answer
        });
        let mut events = Events::with_capacity(8);
        let deadline = Instant::now() + PATIENCE;
        let mut got = Vec::new();
        while got.len() < 300 {
            next_event(&mut poll, &mut events, deadline);
            let mut small = [0u8; 7];
            loop {
                match server.read(&mut small) {
                    Ok(0) => panic!("the client hung up"),
                    Ok(n) => got.extend_from_slice(&small[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("read failed: {e}"),
                }
            }
        }
        let want: Vec<u8> = [[b'a'; 100], [b'b'; 100], [b'c'; 100]].concat();
        assert_eq!(got, want);
        server.write_all(b"ok").unwrap();
        while let Err(e) = server.flush() {
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
            next_event(&mut poll, &mut events, deadline);
        }
        assert_eq!(&sender.join().unwrap(), b"ok");
    }

    #[test]
    fn every_byte_a_write_took_arrives_and_flush_blocks_until_the_records_are_out() {
        let pki = TestPki::new();
        let mut poll = Poll::new().unwrap();
        let (mut server, mut client) = tls_pair(&pki, &poll);
        // The client completes its handshake (our reads answer it), then reads nothing until
        // the socket and rustls' buffer are full.
        let (full_tx, full_rx) = crossbeam_channel::bounded::<()>(1);
        let reader = std::thread::spawn(move || {
            while client.conn.is_handshaking() {
                client.conn.complete_io(&mut client.sock).unwrap();
            }
            full_rx.recv().unwrap();
            let mut all = Vec::new();
            client.read_to_end(&mut all).unwrap();
            all
        });
        let mut events = Events::with_capacity(8);
        let deadline = Instant::now() + PATIENCE;
        // More than loopback's socket buffers hold.
        let payload: Vec<u8> = (0..(16u32 << 20)).map(|i| (i % 251) as u8).collect();
        let mut sent = 0;
        let mut blocked = 0;
        while sent < payload.len() {
            let mut scratch = [0u8; 64];
            assert!(matches!(server.read(&mut scratch), Err(e) if e.kind() == io::ErrorKind::WouldBlock));
            match server.write(&payload[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !server_handshaking(&server) {
                        blocked += 1;
                        let _ = full_tx.try_send(());
                    }
                    next_event(&mut poll, &mut events, deadline);
                }
                Err(e) => panic!("write failed: {e}"),
            }
        }
        while let Err(e) = server.flush() {
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
            next_event(&mut poll, &mut events, deadline);
        }
        assert!(blocked > 0, "16 MiB to a client not reading yet fill the socket and rustls' buffer");
        server.shutdown_write().unwrap();
        assert_eq!(reader.join().unwrap(), payload, "every byte write() took arrives, in order, then close_notify");
    }
}
