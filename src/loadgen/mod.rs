//! The load generator behind `push-manager bench` and `benches/e2e.rs`: N WebSocket subscribers
//! on one event-loop thread ([`subscribers`]), a publisher sending M numbered, timestamped
//! messages of S bytes at a rate or flat out ([`publisher`]), and the figures a run ends with:
//! deliveries/s, publish rate, latency from publish to frame received ([`histogram`]), and what
//! was lost, duplicated or out of order, per subscriber, summed.
//!
//! A run waits (bounded) for every subscription to be confirmed before it publishes, and for the
//! tail of deliveries after; what has not come by then is lost.

mod body;
mod histogram;
mod publisher;
mod subscribers;

use std::fmt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub use body::HEADER_BYTES;
pub use histogram::Histogram;
pub use publisher::{BroadcastPublisher, NatsPublisher, Published, Publisher, StreamPublisher};
pub use subscribers::Dialect;

use subscribers::{Plan, Subscribers};

/// One run's shape. Each field is a `push-manager bench` flag of the same name.
#[derive(Debug, Clone)]
pub struct Config {
    /// Subscriber connections, spread round-robin over the WebSocket URLs. Default 1000.
    pub subscribers: usize,
    /// Messages to publish. Default 10,000.
    pub messages: u64,
    /// Bytes per message body, at least [`HEADER_BYTES`]. Default 128.
    pub size: usize,
    /// Messages per second; 0 publishes flat out. Default 0.
    pub rate: u64,
    /// The topic subscribed to and published on. Default `bench`.
    pub topic: String,
    /// Broadcast calls in flight at once. Default 16.
    pub in_flight: usize,
    /// How long connecting and subscribing everyone may take, and the deadline of each call.
    /// Default 10 s.
    pub connect_timeout: Duration,
    /// How long to wait for the last deliveries once everything is published. Default 10 s.
    pub drain_timeout: Duration,
    /// Print progress to standard error every second.
    pub progress: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            subscribers: 1000,
            messages: 10_000,
            size: 128,
            rate: 0,
            topic: "bench".into(),
            in_flight: 16,
            connect_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            progress: false,
        }
    }
}

/// Largest `--size`: a body must fit a node's frame limit with room to spare.
pub const MAX_SIZE: usize = 1 << 20;
/// Largest `--subscribers` × `--messages`: each subscriber keeps a bit per message.
pub const MAX_DELIVERIES: u64 = 4_000_000_000;

impl Config {
    /// Why this configuration cannot run, naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.subscribers == 0 {
            return Err("--subscribers must be at least 1".into());
        }
        if self.messages == 0 {
            return Err("--messages must be at least 1".into());
        }
        if !(HEADER_BYTES..=MAX_SIZE).contains(&self.size) {
            return Err(format!(
                "--size {} is out of range: a body carries a {HEADER_BYTES}-byte header (sequence, acknowledged, \
                 timestamp), so it is {HEADER_BYTES} to {MAX_SIZE} bytes",
                self.size
            ));
        }
        if (self.subscribers as u64).saturating_mul(self.messages) > MAX_DELIVERIES {
            return Err(format!(
                "--subscribers {} x --messages {} is over {MAX_DELIVERIES} deliveries, which the tallies (a bit per \
                 message per subscriber) would not fit in memory",
                self.subscribers, self.messages
            ));
        }
        if self.topic.is_empty() || self.topic.contains(char::is_whitespace) {
            return Err(format!("--topic {:?}: a topic is non-empty, without whitespace", self.topic));
        }
        if self.in_flight == 0 {
            return Err("--in-flight must be at least 1".into());
        }
        if self.connect_timeout.is_zero() || self.drain_timeout.is_zero() {
            return Err("--timeout and --drain-timeout must be longer than 0".into());
        }
        Ok(())
    }
}

/// What a run measured.
#[derive(Clone)]
pub struct Report {
    pub subscribers: usize,
    pub size: usize,
    pub rate: u64,
    /// Messages sent, and those whose call failed.
    pub published: u64,
    pub publish_failed: u64,
    pub node_drops: u64,
    pub first_publish_error: Option<String>,
    /// From the first publish to the last acknowledgement.
    pub publish_time: Duration,
    /// Deliveries, duplicates included.
    pub deliveries: u64,
    /// From the first publish to the last delivery.
    pub delivery_time: Duration,
    /// Publish -> frame received, in nanoseconds, first deliveries only.
    pub latency: Histogram,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    /// Frames that were not benchmark messages.
    pub foreign: u64,
    /// Subscribers whose connection closed during the run, and why the first did.
    pub closed: usize,
    pub first_close: Option<String>,
}

impl Report {
    pub fn deliveries_per_s(&self) -> f64 {
        self.deliveries as f64 / self.delivery_time.as_secs_f64().max(1e-9)
    }

    pub fn publish_per_s(&self) -> f64 {
        self.published as f64 / self.publish_time.as_secs_f64().max(1e-9)
    }

    /// Latency quantile `q` in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        self.latency.quantile(q) as f64 / 1e6
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rate = if self.rate == 0 { "flat out".to_string() } else { format!("at {} msgs/s", self.rate) };
        writeln!(f, "{} subscribers, {} B messages, {rate}", self.subscribers, self.size)?;
        writeln!(
            f,
            "published:  {} messages in {:.2}s ({:.0} msgs/s), {} failed, {} node deliveries dropped",
            self.published,
            self.publish_time.as_secs_f64(),
            self.publish_per_s(),
            self.publish_failed,
            self.node_drops
        )?;
        if let Some(e) = &self.first_publish_error {
            writeln!(f, "first publish error: {e}")?;
        }
        writeln!(
            f,
            "delivered:  {} in {:.2}s ({:.0} deliveries/s)",
            self.deliveries,
            self.delivery_time.as_secs_f64(),
            self.deliveries_per_s()
        )?;
        writeln!(
            f,
            "latency:    p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            self.latency_ms(0.5),
            self.latency_ms(0.9),
            self.latency_ms(0.99),
            self.latency.max() as f64 / 1e6
        )?;
        write!(f, "lost {}, duplicated {}, out of order {}", self.lost, self.duplicated, self.out_of_order)?;
        if self.foreign > 0 {
            write!(f, ", {} frames that were not benchmark messages", self.foreign)?;
        }
        if self.closed > 0 {
            write!(
                f,
                "\n{} subscriber connection(s) closed: {}",
                self.closed,
                self.first_close.as_deref().unwrap_or("?")
            )?;
        }
        Ok(())
    }
}

/// Runs one benchmark: subscribes `config.subscribers` connections spread over `urls` (each a
/// `ws://` URL, with its query), publishes through `publisher`, and reports. `token(i)` gives
/// subscriber `i`'s connection token, if the nodes want one.
pub fn run(
    config: &Config,
    urls: &[String],
    dialect: Dialect,
    token: &dyn Fn(usize) -> Option<String>,
    publisher: &mut dyn Publisher,
) -> Result<Report, String> {
    config.validate()?;
    if urls.is_empty() {
        return Err("no WebSocket URL to subscribe at".into());
    }
    let epoch = Instant::now();
    let urls = (0..config.subscribers)
        .map(|i| {
            let url = &urls[i % urls.len()];
            match token(i) {
                Some(t) => format!("{url}{}token={t}", if url.contains('?') { '&' } else { '?' }),
                None => url.clone(),
            }
        })
        .collect();
    let subscribers = Subscribers::start(Plan {
        urls,
        dialect,
        topic: &config.topic,
        messages: config.messages,
        connect_timeout: config.connect_timeout,
        epoch,
    })?;
    let shared = subscribers.shared.clone();
    let deadline = Instant::now() + config.connect_timeout;
    while shared.subscribed.load(Ordering::Relaxed) < config.subscribers {
        if shared.closed.load(Ordering::Relaxed) > 0 || Instant::now() >= deadline {
            let why = shared.first_close.lock().clone().unwrap_or_else(|| "no answer".into());
            return Err(format!(
                "{} of {} subscribers were subscribed within {:?}: {why}",
                shared.subscribed.load(Ordering::Relaxed),
                config.subscribers,
                config.connect_timeout
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }

    let mut progress = Progress::new(config.progress, epoch);
    let start = epoch.elapsed();
    for seq in 0..config.messages {
        if config.rate > 0 {
            let due = start + Duration::from_secs_f64(seq as f64 / config.rate as f64);
            if let Some(wait) = due.checked_sub(epoch.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        publisher.ready()?;
        let header = body::Header { seq, acked: publisher.acked(), sent_ns: epoch.elapsed().as_nanos() as u64 };
        publisher.publish(seq, body::encode(header, config.size))?;
        progress.tick(seq + 1, &shared);
    }
    let published = publisher.finish()?;
    let publish_time = epoch.elapsed() - start;

    let expected = (config.messages - published.failed.len() as u64) * config.subscribers as u64;
    let drained = Instant::now() + config.drain_timeout;
    while shared.unique.load(Ordering::Relaxed) < expected
        && shared.closed.load(Ordering::Relaxed) < config.subscribers
        && Instant::now() < drained
    {
        progress.tick(config.messages, &shared);
        std::thread::sleep(Duration::from_millis(2));
    }
    let outcome = subscribers.stop();
    let last = Duration::from_nanos(shared.last_delivery_ns.load(Ordering::Relaxed));

    let mut report = Report {
        subscribers: config.subscribers,
        size: config.size,
        rate: config.rate,
        published: config.messages,
        publish_failed: published.failed.len() as u64,
        node_drops: published.node_drops,
        first_publish_error: published.first_error.clone(),
        publish_time,
        deliveries: shared.deliveries.load(Ordering::Relaxed),
        delivery_time: last.saturating_sub(start),
        latency: outcome.latency,
        lost: 0,
        duplicated: 0,
        out_of_order: 0,
        foreign: 0,
        closed: shared.closed.load(Ordering::Relaxed),
        first_close: shared.first_close.lock().clone(),
    };
    let failed: std::collections::HashSet<u64> = published.failed.iter().copied().collect();
    for tally in &outcome.tallies {
        let got_failed = failed.iter().filter(|&&s| tally.has(s)).count() as u64;
        report.lost += (config.messages - failed.len() as u64) - (tally.unique - got_failed);
        report.duplicated += tally.duplicates;
        report.out_of_order += tally.out_of_order;
        report.foreign += tally.foreign;
    }
    Ok(report)
}

/// Raises this process's soft limit on open files to the hard one when it is below `needed`: a
/// thousand subscribers need more descriptors than the usual soft limit of 1024 leaves, and
/// raising it needs no privilege.
pub fn raise_open_files_limit(needed: usize) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write only the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && (limit.rlim_cur as usize) < needed {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The once-a-second line on standard error.
struct Progress {
    on: bool,
    epoch: Instant,
    next: Duration,
    last: (u64, u64),
}

impl Progress {
    fn new(on: bool, epoch: Instant) -> Progress {
        let next = epoch.elapsed() + Duration::from_secs(1);
        Progress { on, epoch, next, last: (0, 0) }
    }

    fn tick(&mut self, published: u64, shared: &subscribers::Shared) {
        let now = self.epoch.elapsed();
        if !self.on || now < self.next {
            return;
        }
        let deliveries = shared.deliveries.load(Ordering::Relaxed);
        eprintln!(
            "bench: {:>4.0}s published {published} (+{}/s), delivered {deliveries} (+{}/s)",
            now.as_secs_f64(),
            published - self.last.0,
            deliveries - self.last.1
        );
        self.last = (published, deliveries);
        self.next += Duration::from_secs(1);
    }
}
