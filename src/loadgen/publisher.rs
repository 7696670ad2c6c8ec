//! The publishing side of a run, behind one small trait so that the transport can change without
//! touching the run: unary `PushServer/Broadcast` calls kept in flight (today's only input), and
//! NATS `PUB` over TCP (the baseline). A streaming Broadcast is one more implementation of
//! [`Publisher`].

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::time::Duration;

use futures::executor::block_on;
use grpcio::{CallOption, Channel, ClientUnaryReceiver};

use crate::proto::broadcast_request;
use crate::proto::protocol::BroadCastReply;
use crate::proto::protocol_grpc::PushServerClient;

/// Sends the run's messages, numbered from 0, in order.
pub trait Publisher {
    /// Blocks until another message may be sent (a call slot is free); called before the message
    /// is stamped, so waiting here is not counted as latency.
    fn ready(&mut self) -> Result<(), String>;
    /// How many leading messages were acknowledged: `0..acked()` all were.
    fn acked(&self) -> u64;
    /// Sends message `seq`; may return before it is acknowledged.
    fn publish(&mut self, seq: u64, body: Vec<u8>) -> Result<(), String>;
    /// Waits for every acknowledgement and says how it went.
    fn finish(&mut self) -> Result<Published, String>;
}

/// How publishing went.
#[derive(Debug, Default, Clone)]
pub struct Published {
    /// Messages whose call failed: not expected at any subscriber.
    pub failed: Vec<u64>,
    /// Node deliveries the server reported dropped (a node's queue full, or the node gone); the
    /// subscribers behind those nodes miss the message and count it lost.
    pub node_drops: u64,
    /// The first failure, to show.
    pub first_error: Option<String>,
}

type Call = (u64, ClientUnaryReceiver<BroadCastReply>);

/// Unary Broadcast calls, `in_flight` of them at once on one channel, answered in the order sent
/// (the oldest is waited for first, which is what makes [`Publisher::acked`] exact enough).
pub struct BroadcastPublisher {
    client: PushServerClient,
    option: CallOption,
    topic: String,
    in_flight: usize,
    calls: VecDeque<Call>,
    acked: u64,
    published: Published,
}

impl BroadcastPublisher {
    /// `option` carries the deadline and the API key header.
    pub fn new(channel: Channel, option: CallOption, topic: &str, in_flight: usize) -> BroadcastPublisher {
        BroadcastPublisher {
            client: PushServerClient::new(channel),
            option,
            topic: topic.to_string(),
            in_flight: in_flight.max(1),
            calls: VecDeque::new(),
            acked: 0,
            published: Published::default(),
        }
    }

    /// Waits for the oldest call. A failure before anything succeeded ends the run: the server
    /// is not there, or refuses us, and every other call would fail the same way.
    fn settle_oldest(&mut self) -> Result<(), String> {
        let Some((seq, call)) = self.calls.pop_front() else { return Ok(()) };
        match block_on(call) {
            Ok(reply) => self.published.node_drops += reply.get_dropped().len() as u64,
            Err(e) => {
                if self.acked == self.published.failed.len() as u64 {
                    return Err(describe(e));
                }
                self.published.failed.push(seq);
                self.published.first_error.get_or_insert_with(|| describe(e));
            }
        }
        self.acked = seq + 1;
        Ok(())
    }
}

fn describe(e: grpcio::Error) -> String {
    match e {
        grpcio::Error::RpcFailure(s) => format!("Broadcast failed: {:?}: {}", s.code(), s.message()),
        other => format!("Broadcast failed: {other}"),
    }
}

impl Publisher for BroadcastPublisher {
    fn ready(&mut self) -> Result<(), String> {
        while self.calls.len() >= self.in_flight {
            self.settle_oldest()?;
        }
        Ok(())
    }

    fn acked(&self) -> u64 {
        self.acked
    }

    fn publish(&mut self, seq: u64, body: Vec<u8>) -> Result<(), String> {
        let request = broadcast_request(&self.topic, 1000, 0, body);
        let call = self.client.broadcast_async_opt(&request, self.option.clone()).map_err(describe)?;
        self.calls.push_back((seq, call));
        Ok(())
    }

    fn finish(&mut self) -> Result<Published, String> {
        while !self.calls.is_empty() {
            self.settle_oldest()?;
        }
        Ok(std::mem::take(&mut self.published))
    }
}

/// NATS `PUB` on one TCP connection. The stream keeps the order, so every message is "acknowledged"
/// once written: a subscriber must get them in order. Flat out, writes are buffered (up to 64 KiB)
/// as a NATS client library would; at a fixed rate each message is flushed at once.
pub struct NatsPublisher {
    out: BufWriter<TcpStream>,
    subject: String,
    flush_each: bool,
    written: u64,
}

impl NatsPublisher {
    /// Connects to nats-server's client port `addr` (`host:port`).
    pub fn connect(addr: &str, subject: &str, flush_each: bool) -> Result<NatsPublisher, String> {
        let stream = TcpStream::connect(addr).map_err(|e| format!("cannot connect to nats-server at {addr}: {e}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let mut info = String::new();
        BufReader::new(stream.try_clone().map_err(|e| e.to_string())?)
            .read_line(&mut info)
            .map_err(|e| format!("nats-server at {addr}: reading INFO: {e}"))?;
        if !info.starts_with("INFO ") {
            return Err(format!("nats-server at {addr} did not start with INFO: {info:?}"));
        }
        let mut out = BufWriter::with_capacity(64 * 1024, stream);
        out.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n").map_err(|e| e.to_string())?;
        out.flush().map_err(|e| e.to_string())?;
        Ok(NatsPublisher { out, subject: subject.to_string(), flush_each, written: 0 })
    }
}

impl Publisher for NatsPublisher {
    fn ready(&mut self) -> Result<(), String> {
        Ok(())
    }

    fn acked(&self) -> u64 {
        self.written
    }

    fn publish(&mut self, seq: u64, body: Vec<u8>) -> Result<(), String> {
        let subject = &self.subject;
        let out = &mut self.out;
        let mut write = || -> std::io::Result<()> {
            write!(out, "PUB {subject} {}\r\n", body.len())?;
            out.write_all(&body)?;
            out.write_all(b"\r\n")
        };
        write().map_err(|e| format!("writing to nats-server: {e}"))?;
        if self.flush_each {
            self.out.flush().map_err(|e| format!("writing to nats-server: {e}"))?;
        }
        self.written = seq + 1;
        Ok(())
    }

    fn finish(&mut self) -> Result<Published, String> {
        self.out.flush().map_err(|e| format!("writing to nats-server: {e}"))?;
        Ok(Published::default())
    }
}
