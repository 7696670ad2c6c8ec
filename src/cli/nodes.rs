//! `push-manager nodes`: the connect-nodes registered in etcd, as push-manager would see them.

use clap::Args;

use super::EtcdArgs;
use crate::discovery::parse;
use crate::etcd;

#[derive(Args, Debug)]
pub struct NodesArgs {
    #[command(flatten)]
    pub registry: EtcdArgs,
}

pub fn run(args: NodesArgs) -> etcd::Result<()> {
    let prefix = &args.registry.prefix;
    let client = etcd::Client::connect(args.registry.config())?;
    let listing = client.get_prefix(prefix)?;
    println!("{:<24} {:<24} {}", "ID", "ADDRESS", "LEASE TTL LEFT");
    for kv in &listing.kvs {
        let ttl = match kv.lease {
            0 => "no lease".to_string(),
            id => match client.time_to_live(id)? {
                Some(secs) => format!("{secs}s"),
                None => "expired".to_string(),
            },
        };
        match parse(prefix, &kv.key, &kv.value) {
            Ok(r) => println!("{:<24} {:<24} {ttl}", r.id, r.addr),
            Err(bad) => println!("{:<24} {:<24} {ttl}  ({})", kv.key, "-", bad.reason),
        }
    }
    eprintln!("{} key(s) under {prefix:?} at revision {}", listing.kvs.len(), listing.revision);
    Ok(())
}
