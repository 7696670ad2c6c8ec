//! `push-manager send`: one Broadcast call (or, with `--user`, one PushUsers call), its reply
//! printed; or, with `--count` or `--lines`, many messages over one BroadcastStream (PushUsersStream)
//! call, summed up.
//!
//! A stream is written by a thread of its own, as fast as push-manager's flow control lets it
//! (or at `--rate`), while the calling thread reads the replies; a third prints progress every
//! second on standard error, so a long run shows it is moving.

use std::io::{BufRead, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::{ArgGroup, Args};
use futures::executor::block_on;
use futures::{SinkExt, TryStreamExt};
use grpcio::{
    CallOption, ChannelBuilder, ClientDuplexReceiver, ClientDuplexSender, EnvBuilder, MetadataBuilder, RpcStatusCode,
    WriteFlags,
};

use super::{parse_duration, CallerArgs, LocateArgs};
use crate::auth::add_bearer;
use crate::proto::protocol::{BroadcastStreamReq, PushUsersStreamReq, StreamReplies, StreamReply};
use crate::proto::protocol_grpc::PushServerClient;
use crate::proto::{broadcast_request, push_users_request};
use crate::trace::TraceParent;

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("stream").args(["count", "lines"])))]
pub struct SendArgs {
    /// push-manager's gRPC address [default: an instance registered in --etcd if given, else
    /// 127.0.0.1:50053].
    #[arg(long)]
    pub server: Option<String>,
    #[command(flatten)]
    pub locate: LocateArgs,
    /// Topic to deliver to; empty (the default) means every connected user.
    #[arg(long, default_value = "", conflicts_with = "users")]
    pub topic: String,
    /// Deliver to every connection of this user (a token's `sub`) instead, whatever its topics
    /// (PushServer.PushUsers); repeat for several users. Not with --topic.
    #[arg(long = "user", value_name = "ID")]
    pub users: Vec<String>,
    /// Operation code carried in the frame.
    #[arg(long, default_value_t = 1000)]
    pub op: i32,
    /// Sequence number carried in the frame.
    #[arg(long, default_value_t = 0)]
    pub seq: i32,
    /// Deadline of the call. A stream (--count, --lines) has none: it lasts as long as its input.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: humantime::Duration,
    /// Send N copies of the body over one stream (BroadcastStream, or PushUsersStream with
    /// --user), the frame's seq counting up from --seq, and print a summary.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Send each line of standard input as one message over one stream, as lines come (without
    /// the line end; an empty line is an empty body), seq counting up from --seq.
    #[arg(long, conflicts_with = "body")]
    pub lines: bool,
    /// With --count or --lines: send at most R messages per second (default: as fast as
    /// push-manager takes them).
    #[arg(long, value_name = "R", requires = "stream", value_parser = clap::value_parser!(u64).range(1..))]
    pub rate: Option<u64>,
    /// W3C trace context to send as `traceparent` metadata (00-<32 hex trace id>-<16 hex parent
    /// id>-<2 hex flags>): push-manager and the connect-nodes name its trace id in their
    /// debug-level lines about the message (every message, for a stream).
    #[arg(long, value_name = "VALUE", value_parser = TraceParent::parse)]
    pub traceparent: Option<TraceParent>,
    #[command(flatten)]
    pub caller: CallerArgs,
    /// The message body; read from standard input when absent.
    pub body: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Standard input could not be read.
    #[error("reading the body from standard input: {0}")]
    Stdin(#[from] std::io::Error),
    /// push-manager answered with an error status, or could not be reached.
    #[error("{0}")]
    Rpc(String),
    /// The certificate files or the API key could not be read.
    #[error("{0}")]
    Credentials(String),
    /// No push-manager to call was found in etcd (`--etcd`).
    #[error("{0}")]
    Locate(String),
    /// push-manager refused some messages of a stream (each was reported on standard error).
    #[error("push-manager refused {refused} of {sent} message(s)")]
    Refused { refused: u64, sent: u64 },
}

pub fn run(mut args: SendArgs) -> Result<(), SendError> {
    // Resolved once: every message below names the address actually called.
    let server = args.locate.server(args.server.as_deref()).map_err(SendError::Locate)?;
    args.server = Some(server.clone());
    let body = if args.lines {
        Vec::new()
    } else {
        match &args.body {
            Some(b) => b.clone().into_bytes(),
            None => {
                let mut buf = Vec::new();
                std::io::stdin().read_to_end(&mut buf)?;
                buf
            }
        }
    };

    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("grpc-send").build());
    let mut channel = ChannelBuilder::new(env);
    if let Some(credentials) = args.caller.credentials().map_err(SendError::Credentials)? {
        channel = channel.set_credentials(credentials);
    }
    let client = PushServerClient::new(channel.connect(&server));
    let mut headers = MetadataBuilder::with_capacity(2);
    if let Some(key) = args.caller.api_key().map_err(SendError::Credentials)? {
        add_bearer(&mut headers, &key);
    }
    if let Some(trace) = &args.traceparent {
        trace.add_to(&mut headers);
    }
    let opt = CallOption::default().timeout(args.timeout.into()).headers(headers.build());
    if args.count.is_some() || args.lines {
        return stream(&args, &client, opt, body);
    }
    let reply = if args.users.is_empty() {
        client.broadcast_opt(&broadcast_request(&args.topic, args.op, args.seq, body), opt)
    } else {
        let users: Vec<&str> = args.users.iter().map(String::as_str).collect();
        client.push_users_opt(&push_users_request(&users, args.op, args.seq, body), opt)
    };
    let reply = reply.map_err(|e| SendError::Rpc(describe(&args, e)))?;
    let dropped = reply.get_dropped();
    println!(
        "targeted {} node(s), accepted by {}, dropped by {}{}",
        reply.get_targeted(),
        reply.get_accepted(),
        dropped.len(),
        if dropped.is_empty() { String::new() } else { format!(": {}", dropped.join(", ")) }
    );
    Ok(())
}

/// The messages of a stream: `--count` copies of the body, or standard input's lines.
enum Bodies {
    Copies { body: Vec<u8>, left: u64 },
    Lines(std::io::BufReader<std::io::Stdin>),
}

impl Bodies {
    /// The next body, and whether another is at hand without waiting (if not, what was fed so far
    /// must be flushed before waiting for the input); `None` at the end.
    fn next(&mut self) -> Option<std::io::Result<(Vec<u8>, bool)>> {
        match self {
            Bodies::Copies { body, left } => {
                *left = left.checked_sub(1)?;
                Some(Ok((body.clone(), *left > 0)))
            }
            Bodies::Lines(input) => {
                let mut line = Vec::new();
                match input.read_until(b'\n', &mut line) {
                    Ok(0) => None,
                    Ok(_) => {
                        let end = line.strip_suffix(b"\n").map_or(line.len(), <[u8]>::len);
                        let end = line[..end].strip_suffix(b"\r").map_or(end, <[u8]>::len);
                        line.truncate(end);
                        Some(Ok((line, !input.buffer().is_empty())))
                    }
                    Err(e) => Some(Err(e)),
                }
            }
        }
    }
}

/// What a stream did so far, shared by the thread writing it, the one reading its replies and
/// the one reporting progress.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    replied: AtomicU64,
    /// Messages every targeted node accepted.
    accepted: AtomicU64,
    /// Messages at least one node dropped (queue full or closing).
    dropped: AtomicU64,
    refused: AtomicU64,
}

/// How many refusals are printed one by one; the rest are only counted.
const REFUSALS_SHOWN: u64 = 10;

/// `--count`/`--lines`: opens the stream, writes the messages from a thread of its own, reads
/// the replies here, and prints the summary.
fn stream(args: &SendArgs, client: &PushServerClient, opt: CallOption, body: Vec<u8>) -> Result<(), SendError> {
    let bodies = match args.count {
        Some(left) => Bodies::Copies { body, left },
        None => Bodies::Lines(std::io::BufReader::new(std::io::stdin())),
    };
    let (op, seq, rate) = (args.op, args.seq, args.rate);
    let open_failed = |e| SendError::Rpc(describe(args, e));
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let (writer, replies) = if args.users.is_empty() {
        let topic = args.topic.clone();
        let (tx, rx) = client.broadcast_stream_opt(opt).map_err(open_failed)?;
        let make = move |seq, body| broadcast_request(&topic, op, seq, body);
        let element = |messages: Vec<_>| BroadcastStreamReq { messages: messages.into(), ..Default::default() };
        (spawn_writer(tx, bodies, make, element, seq, rate, tally.clone()), rx)
    } else {
        let users = args.users.clone();
        let (tx, rx) = client.push_users_stream_opt(opt).map_err(open_failed)?;
        let make = move |seq, body| {
            let users: Vec<&str> = users.iter().map(String::as_str).collect();
            push_users_request(&users, op, seq, body)
        };
        let element = |messages: Vec<_>| PushUsersStreamReq { messages: messages.into(), ..Default::default() };
        (spawn_writer(tx, bodies, make, element, seq, rate, tally.clone()), rx)
    };
    let progress = Progress::start(tally.clone(), start);
    let read = read_replies(replies, &tally);
    drop(progress);
    let written = writer.join().expect("the stream's writer does not panic");
    // The call's own status explains a failed write better than the write's error does.
    read.map_err(|e| SendError::Rpc(describe(args, e)))?;
    written?;
    let elapsed = start.elapsed().as_secs_f64();
    let [sent, accepted, dropped, refused] =
        [&tally.sent, &tally.accepted, &tally.dropped, &tally.refused].map(|n| n.load(Ordering::Relaxed));
    println!(
        "sent {sent} message(s) in {elapsed:.2} s ({:.0} messages/s): accepted by all nodes {accepted}, \
         dropped somewhere {dropped}, refused {refused}",
        sent as f64 / elapsed.max(1e-9)
    );
    match refused {
        0 => Ok(()),
        refused => Err(SendError::Refused { refused, sent }),
    }
}

/// The most messages, and bytes of bodies, `send` puts in one stream element: a few hundred
/// amortise the cost of a gRPC message; the byte bound keeps an element far below what
/// push-manager receives in one (a larger body goes alone).
const ELEMENT_MESSAGES: usize = 256;
const ELEMENT_BYTES: usize = 1 << 20;

/// Starts the thread writing `bodies` to the stream as `make(seq, body)`, at most `rate` per
/// second, whatever is at hand (up to [`ELEMENT_MESSAGES`]) in one element built by `element`.
fn spawn_writer<Req: Send + 'static, Element: Send + 'static>(
    mut tx: ClientDuplexSender<Element>,
    mut bodies: Bodies,
    make: impl Fn(i32, Vec<u8>) -> Req + Send + 'static,
    element: fn(Vec<Req>) -> Element,
    first_seq: i32,
    rate: Option<u64>,
    tally: Arc<Tally>,
) -> thread::JoinHandle<Result<(), SendError>> {
    let body = move || {
        // Elements leave in batches while push-manager is busy, one by one when it is not.
        tx.enhance_batch(true);
        let start = Instant::now();
        block_on(async {
            let (mut seq, mut n) = (first_seq, 0u64);
            let (mut pending, mut pending_bytes) = (Vec::new(), 0);
            while let Some(next) = bodies.next() {
                let (body, more_at_hand) = next?;
                let due = rate.map(|rate| start + Duration::from_secs_f64(n as f64 / rate as f64));
                if let Some(wait) = due.and_then(|due| due.checked_duration_since(Instant::now())) {
                    // What is ready leaves before the wait, not after it.
                    send_pending(&mut tx, &mut pending, &tally, element).await?;
                    pending_bytes = 0;
                    tx.flush().await.map_err(ended)?;
                    thread::sleep(wait);
                }
                if pending_bytes + body.len() > ELEMENT_BYTES {
                    send_pending(&mut tx, &mut pending, &tally, element).await?;
                    pending_bytes = 0;
                }
                pending_bytes += body.len();
                pending.push(make(seq, body));
                if !more_at_hand || pending.len() == ELEMENT_MESSAGES {
                    send_pending(&mut tx, &mut pending, &tally, element).await?;
                    pending_bytes = 0;
                }
                if !more_at_hand {
                    tx.flush().await.map_err(ended)?;
                }
                (seq, n) = (seq.wrapping_add(1), n + 1);
            }
            send_pending(&mut tx, &mut pending, &tally, element).await?;
            tx.close().await.map_err(ended)
        })
    };
    thread::Builder::new().name("send-stream".into()).spawn(body).expect("spawning the stream's writer")
}

/// Feeds what `pending` holds to the stream as one element, if anything.
async fn send_pending<Req, Element>(
    tx: &mut ClientDuplexSender<Element>,
    pending: &mut Vec<Req>,
    tally: &Tally,
    element: fn(Vec<Req>) -> Element,
) -> Result<(), SendError> {
    if pending.is_empty() {
        return Ok(());
    }
    let count = pending.len() as u64;
    tx.feed((element(std::mem::take(pending)), WriteFlags::default())).await.map_err(ended)?;
    tally.sent.fetch_add(count, Ordering::Relaxed);
    Ok(())
}

/// A write to a stream failed: push-manager ended the call, whose status the reader reports.
fn ended(e: grpcio::Error) -> SendError {
    SendError::Rpc(format!("the stream ended while sending: {e}"))
}

/// Reads replies until push-manager ends the stream, counting outcomes and printing refusals.
fn read_replies(replies: ClientDuplexReceiver<StreamReplies>, tally: &Tally) -> grpcio::Result<()> {
    block_on(replies.try_for_each(|element| {
        for r in element.get_replies() {
            count_reply(r, tally);
        }
        futures::future::ready(Ok(()))
    }))
}

fn count_reply(r: &StreamReply, tally: &Tally) {
    tally.replied.fetch_add(1, Ordering::Relaxed);
    if r.get_code() != 0 {
        let refused = tally.refused.fetch_add(1, Ordering::Relaxed);
        if refused < REFUSALS_SHOWN {
            eprintln!("message {} refused ({:?}): {}", r.get_index(), RpcStatusCode::from(r.get_code()), r.get_error());
        }
    } else if r.get_reply().get_dropped().is_empty() {
        tally.accepted.fetch_add(1, Ordering::Relaxed);
    } else {
        tally.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Prints what a stream did every second on standard error until dropped.
struct Progress {
    done: Option<crossbeam_channel::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Progress {
    fn start(tally: Arc<Tally>, start: Instant) -> Progress {
        let (done, stopped) = crossbeam_channel::bounded::<()>(0);
        let ticks = crossbeam_channel::tick(Duration::from_secs(1));
        let report = move || loop {
            crossbeam_channel::select! {
                recv(ticks) -> _ => {
                    let (sent, replied) = (tally.sent.load(Ordering::Relaxed), tally.replied.load(Ordering::Relaxed));
                    let secs = start.elapsed().as_secs_f64();
                    eprintln!(
                        "{secs:.0} s: sent {sent}, replied {replied} ({:.0} messages/s), refused {}",
                        sent as f64 / secs,
                        tally.refused.load(Ordering::Relaxed)
                    );
                }
                recv(stopped) -> _ => return,
            }
        };
        let thread = thread::Builder::new().name("send-progress".into()).spawn(report).expect("spawning progress");
        Progress { done: Some(done), thread: Some(thread) }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // Dropping the sender disconnects the channel, which ends the thread's select.
        self.done.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn describe(args: &SendArgs, e: grpcio::Error) -> String {
    let server = args.server.as_deref().unwrap_or(super::DEFAULT_SERVER);
    match e {
        // gRPC's own status for a connection that failed: push-manager never saw the call. A TLS
        // mismatch shows only as "Socket closed", so say which flags to check.
        grpcio::Error::RpcFailure(s)
            if s.code() == RpcStatusCode::UNAVAILABLE && s.message().starts_with("failed to connect") =>
        {
            format!("cannot connect to {server}: {} ({})", s.message(), tls_hint(args))
        }
        grpcio::Error::RpcFailure(s) => format!("{server} answered {:?}: {}", s.code(), s.message()),
        other => format!("calling {server}: {other}"),
    }
}

/// What to check, given the TLS flags used, when the connection itself failed.
fn tls_hint(args: &SendArgs) -> &'static str {
    match (&args.caller.tls_ca, &args.caller.tls_cert) {
        (None, _) => "if push-manager serves TLS, give --tls-ca, and --tls-cert/--tls-key if it requires client certificates",
        (Some(_), None) => "if push-manager requires client certificates (--tls-client-ca), give --tls-cert and --tls-key",
        (Some(_), Some(_)) => {
            "check that --tls-ca signed push-manager's certificate and that push-manager's --tls-client-ca signed --tls-cert"
        }
    }
}
