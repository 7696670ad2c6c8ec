//! `push-manager send`: one Broadcast call (or, with `--user`, one PushUsers call), its reply
//! printed.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use grpcio::{CallOption, ChannelBuilder, EnvBuilder, RpcStatusCode};

use super::parse_duration;
use crate::auth::{bearer, KeyFile};
use crate::grpc::{ClientTls, ClientTlsFlags};
use crate::proto::protocol_grpc::PushServerClient;
use crate::proto::{broadcast_request, push_users_request};
use crate::secret::Secret;

#[derive(Args, Debug)]
pub struct SendArgs {
    /// push-manager's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50053")]
    pub server: String,
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
    /// Deadline of the call.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: humantime::Duration,
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
    /// The message body; read from standard input when absent.
    pub body: Option<String>,
}

/// The environment variable an API key may come from.
pub const API_KEY_ENV: &str = "PUSH_MANAGER_API_KEY";

/// The flag names of `send`'s TLS files.
const TLS_FLAGS: ClientTlsFlags = ClientTlsFlags { ca: "--tls-ca", cert: "--tls-cert", key: "--tls-key" };

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
}

pub fn run(args: SendArgs) -> Result<(), SendError> {
    let body = match &args.body {
        Some(b) => b.clone().into_bytes(),
        None => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            buf
        }
    };

    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("grpc-send").build());
    let mut channel = ChannelBuilder::new(env);
    if let Some(tls) =
        ClientTls::from_flags(args.tls_ca.as_ref(), args.tls_cert.as_ref(), args.tls_key.as_ref(), TLS_FLAGS)
    {
        channel = channel.set_credentials(tls.credentials().map_err(|e| SendError::Credentials(e.to_string()))?);
    }
    let client = PushServerClient::new(channel.connect(&args.server));
    let mut opt = CallOption::default().timeout(args.timeout.into());
    if let Some(key) = api_key(&args).map_err(SendError::Credentials)? {
        opt = opt.headers(bearer(&key));
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

/// The API key to send: the first of `--api-key-file`, else `PUSH_MANAGER_API_KEY`, else none.
fn api_key(args: &SendArgs) -> Result<Option<Secret>, String> {
    if let Some(path) = &args.api_key_file {
        return KeyFile::load("--api-key-file", path).map(|keys| Some(keys.first()));
    }
    Ok(std::env::var(API_KEY_ENV).ok().filter(|k| !k.is_empty()).map(Secret::new))
}

fn describe(args: &SendArgs, e: grpcio::Error) -> String {
    let server = &args.server;
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
    match (&args.tls_ca, &args.tls_cert) {
        (None, _) => "if push-manager serves TLS, give --tls-ca, and --tls-cert/--tls-key if it requires client certificates",
        (Some(_), None) => "if push-manager requires client certificates (--tls-client-ca), give --tls-cert and --tls-key",
        (Some(_), Some(_)) => {
            "check that --tls-ca signed push-manager's certificate and that push-manager's --tls-client-ca signed --tls-cert"
        }
    }
}
