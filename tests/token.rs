//! `push-manager token` as a user runs it: the token it prints verifies with the same key file,
//! and every bad input is refused with exit 1 and a message saying what to fix.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::BIN;
use push_manager::token::{Claims, TokenKeys, TopicGrants};

const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn key_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn run_token(key_file: &Path, args: &[&str]) -> Output {
    Command::new(BIN).arg("token").arg("--token-key-file").arg(key_file).args(args).output().unwrap()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[track_caller]
fn printed_token(out: &Output) -> String {
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let token = stdout.strip_suffix('\n').expect("one line");
    assert!(!token.contains(['\n', ' ']), "one token and nothing else: {stdout:?}");
    token.to_string()
}

/// Exit 1 and `push-manager: <message>` on stderr containing every `needle`; nothing on stdout.
#[track_caller]
fn fails(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.starts_with("push-manager: "), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
}

#[test]
fn prints_a_token_that_verifies_with_the_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = key_file(dir.path(), "keys", &format!("# signing key\n{KEY}\n"));
    let keys = TokenKeys::load(&path).unwrap();

    let before = now();
    let token = printed_token(&run_token(&path, &["--sub", "alice", "--topics", "news, room:42:*", "--ttl", "90m"]));
    let after = now();
    let claims = keys.verify(&token, SystemTime::now(), Duration::ZERO).unwrap();
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.topics, Some(vec!["news".to_string(), "room:42:*".to_string()]));
    assert_eq!(claims.nbf, None);
    let iat = claims.iat.unwrap();
    assert!((before..=after).contains(&iat), "iat {iat} not in {before}..={after}");
    assert!((iat + 5400..=iat + 5401).contains(&claims.exp), "exp {} for iat {iat}", claims.exp);
    assert_eq!(claims.grants(), TopicGrants::parse(&["news", "room:42:*"]).unwrap());

    // Defaults: one hour, no topics claim (so no subscription).
    let claims: Claims =
        keys.verify(&printed_token(&run_token(&path, &["--sub", "bob"])), SystemTime::now(), Duration::ZERO).unwrap();
    assert_eq!(claims.topics, None);
    assert!((3600..=3601).contains(&(claims.exp - claims.iat.unwrap())), "{claims:?}");
    let late = SystemTime::now() + Duration::from_secs(3602);
    assert!(keys.verify(&printed_token(&run_token(&path, &["--sub", "bob"])), late, Duration::ZERO).is_err());
}

#[test]
fn signs_with_the_first_key_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let other = "x".repeat(32);
    let path = key_file(dir.path(), "rotating", &format!("{KEY}\n{other}\n"));
    let token = printed_token(&run_token(&path, &["--sub", "alice"]));
    let first_only = key_file(dir.path(), "first-only", &format!("{KEY}\n"));
    TokenKeys::load(&first_only).unwrap().verify(&token, SystemTime::now(), Duration::ZERO).unwrap();
}

#[test]
fn bad_inputs_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = key_file(dir.path(), "keys", &format!("{KEY}\n"));
    let short = key_file(dir.path(), "short-keys", "too-short-a-key\n");
    let short_name = short.display().to_string();
    fails(&run_token(&short, &["--sub", "alice"]), &["--token-key-file", &short_name, "line 1 is 15 bytes", "32"]);
    let missing = dir.path().join("missing");
    fails(&run_token(&missing, &["--sub", "alice"]), &["--token-key-file", &missing.display().to_string()]);
    fails(&run_token(&good, &["--sub", ""]), &["--sub: empty user id"]);
    fails(&run_token(&good, &["--sub", "a b"]), &["--sub", "whitespace"]);
    fails(
        &run_token(&good, &["--sub", "alice", "--topics", "news,a*b"]),
        &["--topics", "topics[1]", "only at the end"],
    );
    fails(&run_token(&good, &["--sub", "alice", "--topics", "news,,x"]), &["--topics", "empty topic pattern"]);
    fails(&run_token(&good, &["--sub", "alice", "--ttl", "0s"]), &["--ttl must be longer than 0s"]);

    // And the same command with good input still works.
    printed_token(&run_token(&good, &["--sub", "alice", "--topics", "*", "--ttl", "1s"]));
}
