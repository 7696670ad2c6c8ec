//! The command line: one binary, one subcommand per role or tool.

mod demo;
mod node;
mod nodes;
mod send;
mod serve;
mod subscribe;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use log::LevelFilter;

use crate::etcd;

#[derive(Parser, Debug)]
#[command(
    name = "push-manager",
    version,
    about = "Fan-out service for real-time push: business servers -> push-manager -> connect-nodes -> WebSocket users"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the whole path on loopback: etcd, push-manager, three connect-nodes, WebSocket users.
    Demo(demo::DemoArgs),
    /// Run a connect-node: serve ConnectNode and WebSocket users, registered in etcd under a lease.
    Node(node::NodeArgs),
    /// Run push-manager: serve protocol.PushServer and fan broadcasts out to connect-nodes found in etcd.
    Serve(serve::ServeArgs),
    /// Call PushServer/Broadcast once and print the reply.
    Send(send::SendArgs),
    /// Connect to a connect-node's WebSocket endpoint and print each message as it arrives.
    Subscribe(subscribe::SubscribeArgs),
    /// List the connect-nodes registered in etcd (id, address, lease TTL left).
    Nodes(nodes::NodesArgs),
}

/// Flags every long-running subcommand shares.
#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info", value_parser = parse_level)]
    pub log_level: LevelFilter,
}

/// Where connect-nodes register: shared by every subcommand that talks to etcd.
#[derive(Args, Debug, Clone)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated host:port.
    #[arg(long, default_value_t = etcd::Config::default().endpoints.join(","))]
    pub etcd: String,
    /// Deadline of one etcd call.
    #[arg(long, default_value_t = etcd::Config::default().timeout.into(), value_parser = parse_duration)]
    pub etcd_timeout: humantime::Duration,
    /// etcd key prefix under which connect-nodes register.
    #[arg(long, default_value = crate::registry::DEFAULT_PREFIX)]
    pub prefix: String,
}

impl EtcdArgs {
    pub fn config(&self) -> etcd::Config {
        etcd::Config { endpoints: parse_endpoints(&self.etcd), timeout: self.etcd_timeout.into() }
    }
}

fn parse_level(s: &str) -> Result<LevelFilter, String> {
    s.parse().map_err(|_| format!("{s:?} is not a log level; use error, warn, info, debug or trace"))
}

/// Longest duration a flag takes: far beyond any sensible timeout, and far enough from
/// `Instant`'s range that adding it to the clock can never overflow later.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Durations like `3s`, `500ms`, `1m`, up to ten years.
pub fn parse_duration(s: &str) -> Result<humantime::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 3s or 500ms: {e}"))?;
    if d > MAX_DURATION {
        return Err(format!(
            "{s:?} is longer than the longest duration taken, {}",
            humantime::format_duration(MAX_DURATION)
        ));
    }
    Ok(d.into())
}

/// Comma-separated `host:port` list.
pub fn parse_endpoints(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_string).collect()
}

pub fn init_logging(level: LevelFilter) {
    let config = simplelog::ConfigBuilder::new()
        .set_thread_level(LevelFilter::Error)
        .set_thread_mode(simplelog::ThreadLogMode::Names)
        .set_target_level(LevelFilter::Off)
        .build();
    // Only fails if a logger is already set, e.g. when a test runs two commands.
    let _ = simplelog::TermLogger::init(level, config, simplelog::TerminalMode::Stderr, simplelog::ColorChoice::Never);
}

/// What a subcommand fails with: its own error, printed after `push-manager: `.
pub type CmdResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Runs a parsed command and returns the process's exit code: 0 on success, and also when
/// standard output was closed under us (`push-manager subscribe ... | head -1`), 1 otherwise.
pub fn run(cli: Cli) -> ExitCode {
    let result: CmdResult = match cli.command {
        Command::Demo(args) => demo::run(args).map_err(Into::into),
        Command::Node(args) => node::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Send(args) => send::run(args).map_err(Into::into),
        Command::Subscribe(args) => subscribe::run(args).map_err(Into::into),
        Command::Nodes(args) => nodes::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(e.as_ref()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("push-manager: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Whether an error, or any error it wraps, is a write to a closed pipe: whoever read our
/// output has what it wanted, which is no failure of ours.
fn is_broken_pipe(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) {
            return true;
        }
        next = e.source();
    }
    false
}

/// What a `run_until_signal` tick asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    Continue,
    /// Return now, as if a signal had come.
    Stop,
}

/// Blocks until SIGINT or SIGTERM (or a tick says `Stop`), calling `on_tick` every `tick`
/// meanwhile (never if `None`). The signal handlers only write to a socket pair, which this
/// thread reads with a timeout.
pub fn run_until_signal(tick: Option<Duration>, mut on_tick: impl FnMut() -> Tick) -> std::io::Result<()> {
    use std::io::{ErrorKind, Read};
    use std::os::unix::net::UnixStream;
    let (mut wake, on_signal) = UnixStream::pair()?;
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::low_level::pipe::register(signal, on_signal.try_clone()?)?;
    }
    wake.set_read_timeout(tick)?;
    loop {
        match wake.read(&mut [0u8]) {
            Ok(_) => return Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if on_tick() == Tick::Stop {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
