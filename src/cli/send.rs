//! `push-manager send`: one Broadcast call, its reply printed.

use std::io::Read;
use std::sync::Arc;

use clap::Args;
use grpcio::{CallOption, ChannelBuilder, EnvBuilder};

use super::parse_duration;
use crate::proto::broadcast_request;
use crate::proto::protocol_grpc::PushServerClient;

#[derive(Args, Debug)]
pub struct SendArgs {
    /// push-manager's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50053")]
    pub server: String,
    /// Topic to deliver to; empty (the default) means every connected user.
    #[arg(long, default_value = "")]
    pub topic: String,
    /// Operation code carried in the frame.
    #[arg(long, default_value_t = 1000)]
    pub op: i32,
    /// Sequence number carried in the frame.
    #[arg(long, default_value_t = 0)]
    pub seq: i32,
    /// Deadline of the call.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: humantime::Duration,
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
    let req = broadcast_request(&args.topic, args.op, args.seq, body);

    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("grpc-send").build());
    let client = PushServerClient::new(ChannelBuilder::new(env).connect(&args.server));
    let reply = client
        .broadcast_opt(&req, CallOption::default().timeout(args.timeout.into()))
        .map_err(|e| SendError::Rpc(describe(&args.server, e)))?;
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

fn describe(server: &str, e: grpcio::Error) -> String {
    match e {
        grpcio::Error::RpcFailure(s) => format!("{server} answered {:?}: {}", s.code(), s.message()),
        other => format!("calling {server}: {other}"),
    }
}
