//! `push-manager serve`: the push-manager role until SIGINT/SIGTERM.

use std::time::Duration;

use clap::Args;
use log::info;

use super::{parse_duration, wait_for_signal, EtcdArgs, LogArgs};
use crate::manager::{Config, Manager, RetryPolicy};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// gRPC address for protocol.PushServer.
    #[arg(long, default_value = "0.0.0.0:50053")]
    pub listen: String,
    #[command(flatten)]
    pub registry: EtcdArgs,
    /// Worker threads per connect-node.
    #[arg(long, default_value_t = 10)]
    pub routine_size: usize,
    /// Bounded queue length per connect-node (messages).
    #[arg(long, default_value_t = 1000)]
    pub queue_size: usize,
    /// How often the node set is re-listed from etcd.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// Do not watch the prefix; rely on the periodic list only.
    #[arg(long)]
    pub no_watch: bool,
    /// Deadline of one RPC to a connect-node.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub rpc_timeout: Duration,
    /// Most messages sent to a node in one RPC when more are queued (1 = one RPC per message).
    #[arg(long, default_value_t = 64)]
    pub batch_max: usize,
    /// Largest broadcast body accepted, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_message_bytes: usize,
    /// Attempts per RPC to a node (first included) on retryable errors.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,
    /// gRPC completion-queue threads for the server, and as many for the node clients.
    #[arg(long, default_value_t = 1)]
    pub grpc_threads: usize,
    /// Time a removed node, or every node at shutdown, has to deliver what it has queued.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    #[command(flatten)]
    pub log: LogArgs,
}

impl ServeArgs {
    pub fn config(&self) -> Config {
        Config {
            listen: self.listen.clone(),
            etcd: self.registry.config(),
            prefix: self.registry.prefix.clone(),
            routine_size: self.routine_size,
            queue_size: self.queue_size,
            poll_interval: self.poll_interval,
            watch: !self.no_watch,
            rpc_timeout: self.rpc_timeout,
            batch_max: self.batch_max,
            max_message_bytes: self.max_message_bytes,
            retry: RetryPolicy { max_attempts: self.max_attempts, ..RetryPolicy::default() },
            drain_timeout: self.drain_timeout,
            grpc_threads: self.grpc_threads,
        }
    }
}

pub fn run(args: ServeArgs) -> crate::manager::Result<()> {
    super::init_logging(args.log.log_level);
    let mut manager = Manager::start(args.config())?;
    // Machine-readable line for scripts and tests that bind port 0.
    println!("listening {}", manager.addr());
    let signal = wait_for_signal().map_err(|source| crate::manager::Error::Spawn { name: "signal handler".into(), source })?;
    info!("signal {signal} received");
    manager.shutdown();
    Ok(())
}
