//! The command line: one binary, one subcommand per role or tool.

mod bench;
mod config_file;
mod demo;
mod logging;
mod node;
mod nodes;
mod send;
mod serve;
mod status;
mod subscribe;
mod systemd;
mod token;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::etcd;
use crate::grpc::{ClientTls, ServerTls};
use crate::registry::instance::{self, Instance};
use crate::secret::Secret;

pub use config_file::ConfigFileArgs;
use config_file::Invocation;
pub use logging::{LogArgs, LogFormat};

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

// Parsed once at start-up and moved into its command: the variants' sizes cost nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Measure a running deployment: N WebSocket subscribers, M messages through Broadcast; prints
    /// deliveries/s, latency, lost/duplicated/out-of-order counts.
    Bench(bench::BenchArgs),
    /// Run the whole path on loopback: etcd, push-manager, three connect-nodes, WebSocket users.
    Demo(demo::DemoArgs),
    /// Run a connect-node: serve ConnectNode and WebSocket users, registered in etcd under a lease.
    Node(node::NodeArgs),
    /// Run push-manager: serve protocol.PushServer and fan broadcasts out to connect-nodes found in etcd.
    Serve(serve::ServeArgs),
    /// Call PushServer/Broadcast or PushUsers (--user) once, or stream many messages (--count, --lines), and print the outcome.
    Send(send::SendArgs),
    /// Connect to a connect-node's WebSocket endpoint and print each message as it arrives.
    Subscribe(subscribe::SubscribeArgs),
    /// List the connect-nodes registered in etcd (id, address, lease TTL left).
    Nodes(nodes::NodesArgs),
    /// Print a connection token (JWT, HS256) for a WebSocket user.
    Token(token::TokenArgs),
    /// Summarize a running serve or node from its admin endpoint (--admin URL, or --etcd), once or with --watch.
    Status(status::StatusArgs),
    /// Print a hardened systemd unit for a role (serve or node), to install as push-manager-<role>.service.
    SystemdUnit(systemd::SystemdUnitArgs),
}

/// Where connect-nodes register, and how to reach etcd: shared by every subcommand that talks
/// to etcd.
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
    #[command(flatten)]
    pub access: EtcdAccessArgs,
}

/// How to talk to etcd: TLS and login. Shared by the roles (`EtcdArgs`) and by the clients that
/// find an instance with `--etcd` (`LocateArgs`), so a secured etcd is reached the same way by all.
#[derive(Args, Debug, Clone)]
pub struct EtcdAccessArgs {
    /// CA certificate (PEM) that signed etcd's: talk to etcd over TLS.
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for an etcd started with --client-cert-auth (with --etcd-key).
    #[arg(long, requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert.
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user to authenticate as; the password comes from --etcd-password-file or the
    /// environment variable PUSH_MANAGER_ETCD_PASSWORD.
    #[arg(long)]
    pub etcd_user: Option<String>,
    /// File holding --etcd-user's password (one line).
    #[arg(long, requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

/// A gRPC server's TLS flags, shared by `serve` and `node`.
#[derive(Args, Debug, Clone)]
pub struct ServerTlsArgs {
    /// Certificate chain (PEM) to serve gRPC over TLS with (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM): callers must present a certificate it signed (mutual TLS).
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl ServerTlsArgs {
    pub fn config(&self) -> Option<ServerTls> {
        let (cert, key) = self.tls_cert.clone().zip(self.tls_key.clone())?;
        Some(ServerTls { cert, key, client_ca: self.tls_client_ca.clone() })
    }
}

/// How a client reaches push-manager's `PushServer`: TLS and the API key. Shared by `send` and
/// `bench`, so both take the same flags and say the same things.
#[derive(Args, Debug, Clone)]
pub struct CallerArgs {
    /// CA certificate (PEM) that signed push-manager's: call it over TLS.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a push-manager that requires one (with --tls-key).
    #[arg(long, requires = "tls_key", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// File whose first key is sent as `authorization: Bearer <key>`; the environment variable
    /// PUSH_MANAGER_API_KEY is used when this is absent.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
}

/// push-manager's address when neither `--server` nor `--etcd` says otherwise.
pub const DEFAULT_SERVER: &str = "127.0.0.1:50053";

/// How a client finds a running push-manager instance when it is not given its address: in etcd,
/// where `serve` registers (see `registry::instance`). Shared by `send`, `bench` and `status`.
#[derive(Args, Debug, Clone)]
pub struct LocateArgs {
    /// etcd endpoints (host:port, comma-separated) to find a registered push-manager instance in
    /// when its address is not given.
    #[arg(long)]
    pub etcd: Option<String>,
    /// Deadline of one etcd call (with --etcd).
    #[arg(long, default_value_t = etcd::Config::default().timeout.into(), value_parser = parse_duration)]
    pub etcd_timeout: humantime::Duration,
    /// etcd key prefix under which push-manager instances register (with --etcd).
    #[arg(long, default_value_t = crate::manager::InstanceConfig::default().prefix)]
    pub instance_prefix: String,
    /// With --etcd: the instance to use, by id [default: the first registered, in key order].
    #[arg(long, requires = "etcd")]
    pub instance: Option<String>,
    #[command(flatten)]
    pub access: EtcdAccessArgs,
}

impl LocateArgs {
    /// A client of `--etcd`, if given.
    pub fn client(&self) -> Result<Option<etcd::Client>, String> {
        let Some(endpoints) = &self.etcd else {
            if self.access.is_given() {
                return Err("--etcd-ca, --etcd-cert and --etcd-user say how to reach --etcd: give --etcd too".into());
            }
            return Ok(None);
        };
        // `connect` validates the config, endpoints included.
        let config = self.access.config(endpoints, self.etcd_timeout.into())?;
        etcd::Client::connect(config).map(Some).map_err(|e| format!("--etcd {endpoints}: {e}"))
    }

    /// The instance registered in `--etcd` to use (`None` without `--etcd`); says on standard
    /// error which one was picked when there was a choice.
    pub fn find(&self) -> Result<Option<Instance>, String> {
        let Some(client) = self.client()? else { return Ok(None) };
        let prefix = &self.instance_prefix;
        let (instances, bad) =
            instance::list(&client, prefix).map_err(|e| format!("--etcd {}: {e}", client.endpoints().join(",")))?;
        let ids: Vec<String> = instances.iter().map(|i| i.id.clone()).collect();
        let chosen = instance::choose(instances, &bad, prefix, self.instance.as_deref())?;
        if ids.len() > 1 {
            eprintln!(
                "push-manager: using instance {} at {} ({} registered under {prefix:?}: {}; --instance picks one)",
                chosen.id,
                chosen.record.addr,
                ids.len(),
                ids.join(", ")
            );
        }
        Ok(Some(chosen))
    }

    /// push-manager's gRPC address: `server` if given, else the instance found in `--etcd`, else
    /// [`DEFAULT_SERVER`].
    pub fn server(&self, server: Option<&str>) -> Result<String, String> {
        if let Some(server) = server {
            return Ok(server.to_string());
        }
        Ok(self.find()?.map_or_else(|| DEFAULT_SERVER.to_string(), |i| i.record.addr))
    }
}

/// The environment variable an API key may come from.
pub const API_KEY_ENV: &str = "PUSH_MANAGER_API_KEY";

impl CallerArgs {
    const TLS_FLAGS: crate::grpc::ClientTlsFlags =
        crate::grpc::ClientTlsFlags { ca: "--tls-ca", cert: "--tls-cert", key: "--tls-key" };

    /// TLS credentials when `--tls-ca` is given; an unreadable file is an error naming its flag.
    pub fn credentials(&self) -> Result<Option<grpcio::ChannelCredentials>, String> {
        let tls =
            ClientTls::from_flags(self.tls_ca.as_ref(), self.tls_cert.as_ref(), self.tls_key.as_ref(), Self::TLS_FLAGS);
        tls.map(|tls| tls.credentials().map_err(|e| e.to_string())).transpose()
    }

    /// The API key to send: the first of `--api-key-file`, else `PUSH_MANAGER_API_KEY`, else none.
    pub fn api_key(&self) -> Result<Option<Secret>, String> {
        if let Some(path) = &self.api_key_file {
            return crate::auth::KeyFile::load("--api-key-file", path).map(|keys| Some(keys.first()));
        }
        Ok(std::env::var(API_KEY_ENV).ok().filter(|k| !k.is_empty()).map(Secret::new))
    }
}

/// The environment variable `--etcd-user`'s password may come from.
pub const ETCD_PASSWORD_ENV: &str = "PUSH_MANAGER_ETCD_PASSWORD";

impl EtcdArgs {
    /// The etcd client config; reads the password (never shown in an error).
    pub fn config(&self) -> Result<etcd::Config, String> {
        self.access.config(&self.etcd, self.etcd_timeout.into())
    }
}

impl EtcdAccessArgs {
    fn is_given(&self) -> bool {
        self.etcd_ca.is_some() || self.etcd_cert.is_some() || self.etcd_user.is_some()
    }

    /// The config of a client of `endpoints` with these flags; reads the password (never shown
    /// in an error).
    pub fn config(&self, endpoints: &str, timeout: Duration) -> Result<etcd::Config, String> {
        if self.etcd_ca.is_none() && (self.etcd_cert.is_some() || self.etcd_key.is_some()) {
            return Err("--etcd-cert and --etcd-key need --etcd-ca (the CA that signed etcd's certificate)".into());
        }
        let tls = ClientTls::from_flags(
            self.etcd_ca.as_ref(),
            self.etcd_cert.as_ref(),
            self.etcd_key.as_ref(),
            etcd::TLS_FLAGS,
        );
        let auth = match &self.etcd_user {
            None => None,
            Some(user) => {
                let password = match &self.etcd_password_file {
                    Some(path) => Secret::from_file(path).map_err(|e| format!("--etcd-password-file {e}"))?,
                    None => match std::env::var(ETCD_PASSWORD_ENV) {
                        Ok(p) if !p.is_empty() => Secret::new(p),
                        _ => {
                            return Err(format!(
                                "--etcd-user {user} needs a password: --etcd-password-file or {ETCD_PASSWORD_ENV}"
                            ))
                        }
                    },
                };
                Some(etcd::Credentials { user: user.clone(), password })
            }
        };
        Ok(etcd::Config { endpoints: parse_endpoints(endpoints), timeout, tls, auth })
    }
}

/// Durations like `3s`, `500ms`, `1m`, up to ten years.
pub fn parse_duration(s: &str) -> Result<humantime::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 3s or 500ms: {e}"))?;
    if d > crate::duration::MAX_DURATION {
        return Err(format!(
            "{s:?} is longer than the longest duration taken, {}",
            humantime::format_duration(crate::duration::MAX_DURATION)
        ));
    }
    Ok(d.into())
}

/// Comma-separated `host:port` list.
pub fn parse_endpoints(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_string).collect()
}

/// What a subcommand fails with: its own error, printed after `push-manager: `.
pub type CmdResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The binary: parses the process's arguments (with the `--config` file's values) and does what
/// they ask for. Bad arguments exit 2 with clap's message, as do a bad config file's.
pub fn main() -> ExitCode {
    match config_file::parse(std::env::args_os()) {
        Ok(Invocation::Run(cli)) => run(cli),
        Ok(Invocation::Print(text)) => {
            exit_code(std::io::stdout().lock().write_all(text.as_bytes()).map_err(Into::into))
        }
        Err(e) => e.exit(),
    }
}

/// Runs a parsed command and returns the process's exit code.
pub fn run(cli: Cli) -> ExitCode {
    let result: CmdResult = match cli.command {
        Command::Bench(args) => bench::run(args),
        Command::Demo(args) => demo::run(args).map_err(Into::into),
        Command::Node(args) => node::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Send(args) => send::run(args).map_err(Into::into),
        Command::Subscribe(args) => subscribe::run(args).map_err(Into::into),
        Command::Nodes(args) => nodes::run(args),
        Command::Token(args) => token::run(args),
        Command::Status(args) => status::run(args),
        Command::SystemdUnit(args) => systemd::run(args),
    };
    exit_code(result)
}

/// 0 on success, and also when standard output was closed under us (`push-manager subscribe ...
/// | head -1`), 1 otherwise.
fn exit_code(result: CmdResult) -> ExitCode {
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

/// What a [`Signals::wait`] tick asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    Continue,
    /// Return now, as if a signal had come.
    Stop,
}

/// SIGINT, SIGTERM and SIGHUP, noted from the moment [`Signals::install`] returns, so that a
/// signal that comes while a role starts (binding, registering) is not lost, and neither kills the
/// process before its orderly shutdown nor goes unanswered. The handlers only set a flag and write
/// a byte to a socket pair, which [`Signals::wait`] reads with a timeout.
pub struct Signals {
    wake: std::os::unix::net::UnixStream,
    stop: Arc<AtomicBool>,
    reload: Arc<AtomicBool>,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let (wake, on_signal) = std::os::unix::net::UnixStream::pair()?;
        let stop = Arc::new(AtomicBool::new(false));
        let reload = Arc::new(AtomicBool::new(false));
        for signal in [SIGINT, SIGTERM] {
            signal_hook::flag::register(signal, stop.clone())?;
        }
        signal_hook::flag::register(SIGHUP, reload.clone())?;
        for signal in [SIGINT, SIGTERM, SIGHUP] {
            signal_hook::low_level::pipe::register(signal, on_signal.try_clone()?)?;
        }
        Ok(Signals { wake, stop, reload })
    }

    /// Blocks until SIGINT or SIGTERM (one that came before this call included) or a tick says
    /// `Stop`, calling `on_tick` every `tick` meanwhile (never if `None`) and `on_reload` on each
    /// SIGHUP.
    pub fn wait(
        &mut self,
        tick: Option<Duration>,
        mut on_tick: impl FnMut() -> Tick,
        mut on_reload: impl FnMut(),
    ) -> std::io::Result<()> {
        use std::io::{ErrorKind, Read};
        self.wake.set_read_timeout(tick)?;
        loop {
            if self.reload.swap(false, Ordering::SeqCst) {
                on_reload();
            }
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            match self.wake.read(&mut [0u8]) {
                Ok(_) => {}
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
}
