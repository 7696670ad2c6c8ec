//! `push-manager nodes`: the connect-nodes registered in etcd, as push-manager would see them.

use std::time::Duration;

use clap::Args;

use super::{parse_duration, parse_endpoints};
use crate::discovery::parse;
use crate::etcd;

#[derive(Args, Debug)]
pub struct NodesArgs {
    /// etcd endpoints, comma-separated host:port.
    #[arg(long, default_value = "127.0.0.1:2379")]
    pub etcd: String,
    /// etcd key prefix under which connect-nodes register.
    #[arg(long, default_value = crate::manager::DEFAULT_PREFIX)]
    pub prefix: String,
    /// Deadline of one etcd call.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
}

pub fn run(args: NodesArgs) -> etcd::Result<()> {
    let client = etcd::Client::connect(etcd::Config { endpoints: parse_endpoints(&args.etcd), timeout: args.timeout })?;
    let listing = client.get_prefix(&args.prefix)?;
    println!("{:<24} {:<24} {}", "ID", "ADDRESS", "LEASE TTL LEFT");
    for kv in &listing.kvs {
        let ttl = match kv.lease {
            0 => "no lease".to_string(),
            id => match client.time_to_live(id)? {
                Some(secs) => format!("{secs}s"),
                None => "expired".to_string(),
            },
        };
        match parse(&args.prefix, &kv.key, &kv.value) {
            Ok(r) => println!("{:<24} {:<24} {ttl}", r.id, r.addr),
            Err(bad) => println!("{:<24} {:<24} {ttl}  ({})", kv.key, "-", bad.reason),
        }
    }
    eprintln!("{} key(s) under {:?} at revision {}", listing.kvs.len(), args.prefix, listing.revision);
    Ok(())
}
