//! The command line: one binary, one subcommand per role or tool.

mod demo;
mod node;
mod nodes;
mod send;
mod serve;
mod subscribe;

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use log::LevelFilter;

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
    #[arg(long, default_value = "127.0.0.1:2379")]
    pub etcd: String,
    /// Deadline of one etcd call.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub etcd_timeout: Duration,
    /// etcd key prefix under which connect-nodes register.
    #[arg(long, default_value = crate::manager::DEFAULT_PREFIX)]
    pub prefix: String,
}

impl EtcdArgs {
    pub fn config(&self) -> crate::etcd::Config {
        crate::etcd::Config { endpoints: parse_endpoints(&self.etcd), timeout: self.etcd_timeout }
    }
}

fn parse_level(s: &str) -> Result<LevelFilter, String> {
    s.parse().map_err(|_| format!("{s:?} is not a log level; use error, warn, info, debug or trace"))
}

/// Durations like `3s`, `500ms`, `1m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 3s or 500ms: {e}"))
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

/// Runs a parsed command; the exit code is the process's.
pub fn run(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Node(args) => node::run(args).map_err(|e| e.to_string()),
        Command::Serve(args) => serve::run(args).map_err(|e| e.to_string()),
        Command::Send(args) => send::run(args).map_err(|e| e.to_string()),
        Command::Subscribe(args) => subscribe::run(args).map_err(|e| e.to_string()),
        Command::Nodes(args) => nodes::run(args).map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("push-manager: {e}");
            1
        }
    }
}

/// Blocks until SIGINT or SIGTERM, calling `on_tick` every `tick` meanwhile (never if `None`).
/// The signal handlers only write to a socket pair, which this thread reads with a timeout.
pub fn run_until_signal(tick: Option<Duration>, mut on_tick: impl FnMut()) -> std::io::Result<()> {
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
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => on_tick(),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
