//! The publishing side of a run, behind one small trait so that the transport can change without
//! touching the run: unary `PushServer/Broadcast` calls kept in flight, one `BroadcastStream`
//! call, and NATS `PUB` over TCP (the baseline).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver};
use futures::executor::{block_on, block_on_stream};
use futures::SinkExt;
use grpcio::{CallOption, Channel, ClientDuplexSender, ClientUnaryReceiver, WriteFlags};

use crate::proto::broadcast_request;
use crate::proto::protocol::{BroadCastReply, BroadCastReq, BroadcastStreamReq, StreamReplies};
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

/// Messages per stream element flat out: what one element may carry is 1,024; a few hundred
/// already make the per-element cost vanish.
const STREAM_ELEMENT: usize = 256;

/// One `BroadcastStream` call. Flat out, messages leave in elements of [`STREAM_ELEMENT`]; at a
/// rate, each alone at once, so none waits for company. At most `in_flight` elements go
/// unanswered. A reader thread hands over the replies, one `StreamReplies` per element, in order.
pub struct StreamPublisher {
    /// Holds the channel, and with it the gRPC environment the call runs on.
    _client: PushServerClient,
    sink: ClientDuplexSender<BroadcastStreamReq>,
    topic: String,
    element: Vec<BroadCastReq>,
    element_max: usize,
    in_flight: usize,
    /// Elements sent, and answered.
    sent: u64,
    answered: u64,
    acked: u64,
    replies: Receiver<StreamReplies>,
    reader: Option<JoinHandle<Result<(), String>>>,
    published: Published,
}

impl StreamPublisher {
    /// Opens the stream; `option` carries the API key header (the stream's only deadline is the
    /// run's). `rate` 0 means flat out.
    pub fn open(
        channel: Channel,
        option: CallOption,
        topic: &str,
        in_flight: usize,
        rate: u64,
    ) -> Result<StreamPublisher, String> {
        let client = PushServerClient::new(channel);
        let (sink, receiver) = client.broadcast_stream_opt(option).map_err(describe)?;
        let (tx, replies) = unbounded();
        let reader = std::thread::Builder::new()
            .name("bench-replies".into())
            .spawn(move || {
                for element in block_on_stream(receiver) {
                    let _ = tx.send(element.map_err(describe)?);
                }
                Ok(())
            })
            .map_err(|e| format!("cannot start the reply reader: {e}"))?;
        Ok(StreamPublisher {
            _client: client,
            sink,
            topic: topic.to_string(),
            element: Vec::new(),
            element_max: if rate == 0 { STREAM_ELEMENT } else { 1 },
            in_flight: in_flight.max(1),
            sent: 0,
            answered: 0,
            acked: 0,
            replies,
            reader: Some(reader),
            published: Published::default(),
        })
    }

    fn send_element(&mut self) -> Result<(), String> {
        if self.element.is_empty() {
            return Ok(());
        }
        let element = BroadcastStreamReq { messages: std::mem::take(&mut self.element).into(), ..Default::default() };
        if let Err(e) = block_on(self.sink.send((element, WriteFlags::default()))) {
            // The stream ended: its reader has the reason.
            return Err(self.stream_error().unwrap_or_else(|| describe(e)));
        }
        self.sent += 1;
        Ok(())
    }

    /// Waits for the next element's replies and counts them.
    fn settle_one(&mut self) -> Result<(), String> {
        let Ok(replies) = self.replies.recv() else {
            return Err(self.stream_error().unwrap_or_else(|| "the stream ended before its replies".into()));
        };
        self.answered += 1;
        for reply in replies.get_replies() {
            if reply.get_code() == 0 {
                self.published.node_drops += reply.get_reply().get_dropped().len() as u64;
            } else {
                // As for unary calls: a failure before anything succeeded ends the run.
                if self.acked == self.published.failed.len() as u64 {
                    return Err(format!("Broadcast refused: {}: {}", reply.get_code(), reply.get_error()));
                }
                self.published.failed.push(reply.get_index());
                self.published.first_error.get_or_insert_with(|| reply.get_error().to_string());
            }
            self.acked = reply.get_index() + 1;
        }
        Ok(())
    }

    /// Why the stream failed, once its reader has ended.
    fn stream_error(&mut self) -> Option<String> {
        let reader = self.reader.take()?;
        match reader.join() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some("the reply reader panicked".into()),
        }
    }
}

impl Publisher for StreamPublisher {
    fn ready(&mut self) -> Result<(), String> {
        while self.sent - self.answered >= self.in_flight as u64 {
            self.settle_one()?;
        }
        Ok(())
    }

    fn acked(&self) -> u64 {
        self.acked
    }

    fn publish(&mut self, _seq: u64, body: Vec<u8>) -> Result<(), String> {
        self.element.push(broadcast_request(&self.topic, 1000, 0, body));
        if self.element.len() >= self.element_max {
            self.send_element()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<Published, String> {
        self.send_element()?;
        while self.answered < self.sent {
            self.settle_one()?;
        }
        // push-manager ends the call with OK once we close our side.
        block_on(self.sink.close()).map_err(describe)?;
        if let Some(e) = self.stream_error() {
            return Err(e);
        }
        Ok(std::mem::take(&mut self.published))
    }
}
