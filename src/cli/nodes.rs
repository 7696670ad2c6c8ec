//! `push-manager nodes`: the connect-nodes registered in etcd, as push-manager would see them.

use std::io::Write;

use clap::Args;

use super::EtcdArgs;
use crate::discovery::parse;
use crate::etcd;

#[derive(Args, Debug)]
pub struct NodesArgs {
    #[command(flatten)]
    pub registry: EtcdArgs,
}

pub fn run(args: NodesArgs) -> super::CmdResult {
    let prefix = &args.registry.prefix;
    let client = etcd::Client::connect(args.registry.config()?)?;
    let listing = client.get_prefix(prefix)?;
    // Written, not printed: `nodes | head -1` closes the pipe, which is no error (see cli::run).
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<24} {:<24} LEASE TTL LEFT", "ID", "ADDRESS")?;
    for kv in &listing.kvs {
        let ttl = match kv.lease {
            0 => "no lease".to_string(),
            id => match client.time_to_live(id)? {
                Some(secs) => format!("{secs}s"),
                None => "expired".to_string(),
            },
        };
        match parse(prefix, &kv.key, &kv.value) {
            Ok(r) => writeln!(out, "{:<24} {:<24} {ttl}", r.id, r.addr)?,
            Err(bad) => writeln!(out, "{:<24} {:<24} {ttl}  ({})", kv.key, "-", bad.reason)?,
        }
    }
    eprintln!("{} key(s) under {prefix:?} at revision {}", listing.kvs.len(), listing.revision);
    Ok(())
}
