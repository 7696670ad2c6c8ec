//! `push-manager token`: one connection token printed, for trying a node that requires tokens
//! and for business servers to compare their own encoder's output with.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;

use super::parse_duration;
use crate::token::{check_sub, Claims, TokenKeys, TopicGrants, DEFAULT_TTL};

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// Signing keys, one per line, each at least 32 bytes; the first signs.
    #[arg(long)]
    pub token_key_file: PathBuf,
    /// The user id (`sub` claim): at most 256 bytes, no whitespace or control characters.
    #[arg(long)]
    pub sub: String,
    /// Topics the connection may subscribe to, comma-separated: exact names, prefixes ending in
    /// `*` (`room:42:*`), or `*` for all. Absent: no `topics` claim, so no subscription at all.
    #[arg(long)]
    pub topics: Option<String>,
    /// How long the token is valid from now.
    #[arg(long, default_value_t = DEFAULT_TTL.into(), value_parser = parse_duration)]
    pub ttl: humantime::Duration,
}

pub fn run(args: TokenArgs) -> super::CmdResult {
    check_sub(&args.sub).map_err(|e| format!("--sub: {e}"))?;
    let topics = args.topics.as_deref().map(parse_topics).transpose()?;
    let ttl: Duration = args.ttl.into();
    if ttl.is_zero() {
        return Err("--ttl must be longer than 0s".into());
    }
    let keys = TokenKeys::load(&args.token_key_file)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|_| "the clock is before 1970")?;
    let claims = Claims { sub: args.sub, exp: ceil_secs(now + ttl), nbf: None, iat: Some(now.as_secs()), topics };
    // Written, not printed: `token ... | head -c 10` closes the pipe, which is no error.
    writeln!(std::io::stdout().lock(), "{}", keys.sign(&claims))?;
    Ok(())
}

/// `--topics`: comma-separated patterns, each checked like a token's `topics` claim.
fn parse_topics(list: &str) -> Result<Vec<String>, String> {
    let topics: Vec<String> = list.split(',').map(|p| p.trim().to_string()).collect();
    TopicGrants::parse(&topics).map_err(|e| format!("--topics {list:?}: {e}"))?;
    Ok(topics)
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}
