//! Connection tokens: a WebSocket client proves who it is, and which topics it may subscribe to,
//! with a token a business server signed, so a connect-node learns the user without calling
//! anyone back. The format is a JWT (RFC 7519) signed with HMAC-SHA256 (`HS256`, RFC 7518 3.2)
//! under a key shared through `--token-key-file`, because every business stack can make one.
//!
//! Only what this module understands is accepted: `alg` exactly `HS256` (never `none`), no
//! `crit` extension, unpadded base64url, a bounded size, and claims of the right types; anything
//! else is refused with a reason short enough for a WebSocket close frame. Several keys may be
//! listed so they can rotate: a token signed with any of them verifies, new ones are signed with
//! the first.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::auth::{KeyFile, MinLen};

/// The flag naming the key file, for messages.
pub const TOKEN_KEY_FLAG: &str = "--token-key-file";
/// Longest token looked at, in bytes; a longer one is refused before any decoding.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Longest user id (`sub`), in bytes.
pub const MAX_SUB_BYTES: usize = crate::proto::MAX_USER_ID_BYTES;
/// Shortest key, in bytes: an HMAC-SHA256 key shorter than the hash is weak.
pub const MIN_KEY_BYTES: usize = 32;
/// How long `push-manager token` makes a token valid for when `--ttl` is not given.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// The one header this module writes: `{"alg":"HS256","typ":"JWT"}`, base64url-encoded.
const HEADER: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";
/// The latest `exp` or `nbf` taken (9999-12-31T23:59:59Z), so a time computed from one never
/// overflows.
const MAX_TIME: u64 = 253_402_300_799;
/// Longest piece of a token's content quoted in an error, so the reason stays under 100 bytes.
const QUOTE_BYTES: usize = 24;

type HmacSha256 = Hmac<Sha256>;

/// The keys tokens are signed with: a [`KeyFile`] whose keys are at least [`MIN_KEY_BYTES`]
/// long, re-read on SIGHUP like the others.
pub struct TokenKeys {
    file: KeyFile,
}

impl TokenKeys {
    /// Reads the key file; an unreadable file, one without a key, or a key shorter than
    /// [`MIN_KEY_BYTES`] is an error naming the flag and the file.
    pub fn load(path: &Path) -> Result<TokenKeys, String> {
        Ok(TokenKeys { file: KeyFile::load_min(TOKEN_KEY_FLAG, path, min_len())? })
    }

    /// Reads the file again and swaps the keys in; on error (a short key included) the old keys
    /// stay. Returns how many keys there were and are.
    pub fn reload(&self) -> Result<(usize, usize), String> {
        self.file.reload()
    }

    /// A token for `claims`, signed with the first key. The claims are written as given: check
    /// them first (see [`check_sub`], [`TopicGrants::parse`]) if they come from outside.
    pub fn sign(&self, claims: &Claims) -> String {
        let claims = serde_json::to_vec(claims).expect("claims of strings and integers always serialize");
        let signed = format!("{HEADER}.{}", URL_SAFE_NO_PAD.encode(claims));
        let signature = mac(self.file.first().expose().as_bytes(), signed.as_bytes()).finalize().into_bytes();
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// The claims of `token` if it is well formed, signed with one of the keys, and valid at
    /// `now` give or take `leeway` (for clocks that differ between the signer and us).
    pub fn verify(&self, token: &str, now: SystemTime, leeway: Duration) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLong);
        }
        let parts: Vec<&str> = token.split('.').collect();
        let [header, claims, signature] = parts[..] else {
            return Err(malformed("expected three base64url parts separated by '.'"));
        };
        check_header(&decode("header", header)?)?;
        let signature = decode("signature", signature)?;
        let signed = &token[..header.len() + 1 + claims.len()];
        // Every key is tried, each in constant time (`verify_slice`), so the time taken does not
        // say which key matched or how much of a signature was right.
        let matched = self.file.keys().iter().fold(false, |found, key| {
            mac(key.expose().as_bytes(), signed.as_bytes()).verify_slice(&signature).is_ok() | found
        });
        if !matched {
            return Err(TokenError::BadSignature);
        }
        let claims = parse_claims(&decode("claims", claims)?)?;
        check_time(&claims, now, leeway)?;
        Ok(claims)
    }
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys").field("keys", &self.file.len()).finish_non_exhaustive()
    }
}

fn min_len() -> MinLen {
    MinLen {
        bytes: MIN_KEY_BYTES,
        why: "an HS256 key shorter than its 32-byte hash is weak (RFC 7518 3.2); `openssl rand -hex 32` makes one",
    }
}

fn mac(key: &[u8], data: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(data);
    mac
}

/// What a token says: who the user is (`sub`), until when (`exp`), and which topics it may
/// subscribe to. Times are seconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topics: Option<Vec<String>>,
}

impl Claims {
    /// What the connection may subscribe to: no `topics` claim grants nothing. A malformed
    /// pattern (only in claims built in code: [`TokenKeys::verify`] refuses them) grants nothing.
    pub fn grants(&self) -> TopicGrants {
        let mut grants = TopicGrants::nothing();
        for pattern in self.topics.iter().flatten() {
            grants.add(pattern);
        }
        grants
    }

    /// `exp` as a `SystemTime` (at most 9999-12-31, so adding to it cannot overflow).
    pub fn expires(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.exp.min(MAX_TIME))
    }
}

/// Which topics a connection may subscribe to: exact names, prefixes, or all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicGrants {
    exact: BTreeSet<String>,
    prefixes: BTreeSet<String>,
    all: bool,
}

impl TopicGrants {
    /// Every topic: for anonymous connections where tokens are off or optional.
    pub fn everything() -> TopicGrants {
        TopicGrants { exact: BTreeSet::new(), prefixes: BTreeSet::new(), all: true }
    }

    pub fn nothing() -> TopicGrants {
        TopicGrants { exact: BTreeSet::new(), prefixes: BTreeSet::new(), all: false }
    }

    /// The grants of a `topics` claim; the error names the first bad pattern by its index.
    pub fn parse<S: AsRef<str>>(patterns: &[S]) -> Result<TopicGrants, String> {
        let mut grants = TopicGrants::nothing();
        for (i, pattern) in patterns.iter().enumerate() {
            check_pattern(pattern.as_ref()).map_err(|e| format!("topics[{i}]: {e}"))?;
            grants.add(pattern.as_ref());
        }
        Ok(grants)
    }

    pub fn allows(&self, topic: &str) -> bool {
        self.all || self.exact.contains(topic) || self.prefixes.iter().any(|p| topic.starts_with(p.as_str()))
    }

    fn add(&mut self, pattern: &str) {
        if check_pattern(pattern).is_err() {
            return;
        }
        match pattern.strip_suffix('*') {
            Some("") => self.all = true,
            Some(prefix) => _ = self.prefixes.insert(prefix.to_string()),
            None => _ = self.exact.insert(pattern.to_string()),
        }
    }
}

/// A topic pattern: `*` (every topic), a prefix ending in `*` (`room:42:*`), or an exact topic
/// (`news`); `*` anywhere but at the end is malformed. The error does not quote the pattern.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    let name = pattern.strip_suffix('*').unwrap_or(pattern);
    if name.contains('*') {
        return Err("'*' is allowed only at the end of a topic pattern".into());
    }
    if name.is_empty() && pattern.is_empty() {
        return Err("empty topic pattern".into());
    }
    if name.is_empty() {
        return Ok(());
    }
    crate::topic::validate(name, crate::topic::MAX_TOPIC_BYTES)
}

/// A `sub` is a user id as `PushUsers` names them: the one rule is [`crate::proto::check_user_id`].
pub fn check_sub(sub: &str) -> Result<(), String> {
    crate::proto::check_user_id(sub)
}

/// Why a token is refused. `Display` is a short reason (under 100 bytes) fit for a WebSocket
/// close frame and an HTTP 401 body; it never quotes more than a few bytes of the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Longer than [`MAX_TOKEN_BYTES`].
    #[error("token longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    /// Not three base64url parts, bad JSON, claims of the wrong type, a bad topic pattern or sub.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// A header this module does not accept: `alg` not `HS256`, `typ` not `JWT`, `crit` present.
    #[error("token {0}")]
    Algorithm(String),
    /// Signed with none of the keys (or altered since).
    #[error("token signature does not match any key")]
    BadSignature,
    /// `now` is past `exp` plus the leeway.
    #[error("token expired")]
    Expired,
    /// `now` plus the leeway is before `nbf`.
    #[error("token not valid yet (nbf)")]
    NotYetValid,
}

fn malformed(reason: impl Into<String>) -> TokenError {
    TokenError::Malformed(reason.into())
}

/// Unpadded base64url, strictly: padding, `+`, `/` and non-canonical trailing bits are refused.
fn decode(part: &str, text: &str) -> Result<Vec<u8>, TokenError> {
    URL_SAFE_NO_PAD.decode(text).map_err(|_| malformed(format!("{part} is not unpadded base64url")))
}

fn json_object(part: &str, bytes: &[u8]) -> Result<Map<String, Value>, TokenError> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(malformed(format!("{part} is not a JSON object"))),
    }
}

fn check_header(bytes: &[u8]) -> Result<(), TokenError> {
    let header = json_object("header", bytes)?;
    match header.get("alg") {
        Some(Value::String(alg)) if alg == "HS256" => {}
        Some(other) => return Err(TokenError::Algorithm(format!("algorithm must be HS256, got {}", quote(other)))),
        None => return Err(TokenError::Algorithm("algorithm must be HS256; the header has no alg".into())),
    }
    match header.get("typ") {
        None => {}
        Some(Value::String(typ)) if typ == "JWT" => {}
        Some(other) => return Err(TokenError::Algorithm(format!("type must be JWT, got {}", quote(other)))),
    }
    if header.contains_key("crit") {
        return Err(TokenError::Algorithm("header has crit: no extension is understood".into()));
    }
    Ok(())
}

/// A JSON value as written, cut to [`QUOTE_BYTES`].
fn quote(value: &Value) -> String {
    let text = value.to_string();
    if text.len() <= QUOTE_BYTES {
        return text;
    }
    let mut end = QUOTE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// The claims, read field by field so that every error is ours and short (serde's would quote
/// the offending value, however long).
fn parse_claims(bytes: &[u8]) -> Result<Claims, TokenError> {
    let map = json_object("claims", bytes)?;
    let sub = match map.get("sub") {
        Some(Value::String(sub)) => sub.clone(),
        Some(_) => return Err(malformed("sub must be a string")),
        None => return Err(malformed("missing sub")),
    };
    check_sub(&sub).map_err(malformed)?;
    let exp = time(&map, "exp")?.ok_or_else(|| malformed("missing exp"))?;
    let nbf = time(&map, "nbf")?;
    let iat = time(&map, "iat")?;
    let topics = match map.get("topics") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let topics = items
                .iter()
                .map(|item| item.as_str().map(str::to_string))
                .collect::<Option<Vec<String>>>()
                .ok_or_else(|| malformed("topics must be an array of strings"))?;
            TopicGrants::parse(&topics).map_err(malformed)?;
            Some(topics)
        }
        Some(_) => return Err(malformed("topics must be an array of strings")),
    };
    Ok(Claims { sub, exp, nbf, iat, topics })
}

/// An optional time claim: an integer number of seconds since the epoch, up to 9999-12-31.
fn time(map: &Map<String, Value>, name: &str) -> Result<Option<u64>, TokenError> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match value.as_u64() {
            Some(secs) if secs <= MAX_TIME => Ok(Some(secs)),
            Some(_) => Err(malformed(format!("{name} is after the year 9999"))),
            None => Err(malformed(format!("{name} must be a non-negative integer (seconds since the epoch)"))),
        },
    }
}

fn check_time(claims: &Claims, now: SystemTime, leeway: Duration) -> Result<(), TokenError> {
    // A clock before 1970 is taken as 1970: no token is expired then, none is early for long.
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    // exp and nbf are at most MAX_TIME and leeway is checked by whoever configures it, so
    // these sums cannot overflow; saturate anyway rather than panic on a caller's huge leeway.
    if now > Duration::from_secs(claims.exp).saturating_add(leeway) {
        return Err(TokenError::Expired);
    }
    if claims.nbf.is_some_and(|nbf| now.saturating_add(leeway) < Duration::from_secs(nbf)) {
        return Err(TokenError::NotYetValid);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const KEY_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const KEY_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const NOW: u64 = 1_700_000_000;
    const LEEWAY: Duration = Duration::from_secs(30);

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token-keys");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn keys(text: &str) -> (tempfile::TempDir, TokenKeys) {
        let (dir, path) = file(text);
        (dir, TokenKeys::load(&path).unwrap())
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn claims(sub: &str) -> Claims {
        Claims { sub: sub.into(), exp: NOW + 60, nbf: None, iat: Some(NOW), topics: None }
    }

    /// A JWT built by hand, independently of `TokenKeys::sign`: the header and claims as given,
    /// signed with `key` (RFC 7515 appendix A.1 style).
    fn hand_made(header: &str, claims: &str, key: &[u8]) -> String {
        let signed = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
        let mut mac = HmacSha256::new_from_slice(key).unwrap();
        mac.update(signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
    }

    const HS256: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

    fn claims_json(extra: &str) -> String {
        format!(r#"{{"sub":"alice","exp":{}{extra}}}"#, NOW + 60)
    }

    #[track_caller]
    fn refused(keys: &TokenKeys, token: &str) -> TokenError {
        let err = keys.verify(token, at(NOW), LEEWAY).unwrap_err();
        assert!(err.to_string().len() < 100, "{err}");
        err
    }

    #[test]
    fn sign_verify_round_trip() {
        let (_dir, keys) = keys(&format!("{KEY_A}\n"));
        let mut c = claims("alice");
        c.topics = Some(vec!["news".into(), "room:42:*".into()]);
        let token = keys.sign(&c);
        assert!(token.starts_with("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."), "{token}");
        assert!(!token.contains('='), "{token}");
        assert_eq!(keys.verify(&token, at(NOW), LEEWAY), Ok(c.clone()));
        assert!(c.grants().allows("room:42:chat"));
        assert_eq!(c.expires(), at(NOW + 60));
    }

    #[test]
    fn a_token_made_by_another_encoder_verifies() {
        let (_dir, keys) = keys(&format!("{KEY_A}\n"));
        let claims = format!(r#"{{"iss":"shop","sub":"bob","exp":{},"nbf":{NOW},"topics":["*"],"x":[1]}}"#, NOW + 5);
        let token = hand_made(r#"{"typ":"JWT","alg":"HS256","kid":"k1"}"#, &claims, KEY_A.as_bytes());
        let got = keys.verify(&token, at(NOW), LEEWAY).unwrap();
        assert_eq!(
            got,
            Claims { sub: "bob".into(), exp: NOW + 5, nbf: Some(NOW), iat: None, topics: Some(vec!["*".into()]) }
        );
        assert_eq!(got.grants(), TopicGrants::everything());
        // No typ at all is fine too.
        keys.verify(&hand_made(r#"{"alg":"HS256"}"#, &claims, KEY_A.as_bytes()), at(NOW), LEEWAY).unwrap();
    }

    #[test]
    fn altered_tokens_are_refused() {
        let (_dir, keys) = keys(&format!("{KEY_A}\n"));
        let token = keys.sign(&claims("alice"));
        let parts: Vec<&str> = token.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(claims_json(r#","topics":["*"]"#).replace("alice", "mallory"));
        assert_eq!(refused(&keys, &format!("{}.{forged}.{}", parts[0], parts[2])), TokenError::BadSignature);
        let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        sig[0] ^= 1;
        let tampered = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(&sig));
        assert_eq!(refused(&keys, &tampered), TokenError::BadSignature);
        let truncated = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(&sig[..16]));
        assert_eq!(refused(&keys, &truncated), TokenError::BadSignature);
        assert_eq!(refused(&keys, &hand_made(HS256, &claims_json(""), KEY_B.as_bytes())), TokenError::BadSignature);
        assert_eq!(keys.verify(&token, at(NOW), LEEWAY).unwrap().sub, "alice", "the genuine one still verifies");
    }

    #[test]
    fn only_hs256_is_accepted() {
        let (_dir, keys) = keys(&format!("{KEY_A}\n"));
        let body = URL_SAFE_NO_PAD.encode(claims_json(""));
        let none = format!("{}.{body}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#));
        let err = refused(&keys, &none);
        assert_eq!(err.to_string(), r#"token algorithm must be HS256, got "none""#);
        for (header, got) in [
            (r#"{"alg":"HS512","typ":"JWT"}"#, r#""HS512""#),
            (r#"{"alg":"hs256","typ":"JWT"}"#, r#""hs256""#),
            (r#"{"alg":null}"#, "null"),
            (r#"{"typ":"JWT"}"#, "the header has no alg"),
        ] {
            let err = refused(&keys, &hand_made(header, &claims_json(""), KEY_A.as_bytes()));
            assert!(matches!(err, TokenError::Algorithm(_)), "{header}: {err:?}");
            assert!(err.to_string().ends_with(got), "{header}: {err}");
        }
        let crit = hand_made(r#"{"alg":"HS256","crit":["b64"],"b64":false}"#, &claims_json(""), KEY_A.as_bytes());
        assert_eq!(refused(&keys, &crit).to_string(), "token header has crit: no extension is understood");
        let typ = hand_made(r#"{"alg":"HS256","typ":"JWS"}"#, &claims_json(""), KEY_A.as_bytes());
        assert_eq!(refused(&keys, &typ).to_string(), r#"token type must be JWT, got "JWS""#);
        let long = hand_made(&format!(r#"{{"alg":"{}"}}"#, "X".repeat(1000)), &claims_json(""), KEY_A.as_bytes());
        assert!(refused(&keys, &long).to_string().ends_with("..."));
    }

    #[test]
    fn time_claims_are_checked_with_leeway() {
        let (_dir, keys) = keys(&format!("{KEY_A}\n"));
        let token = keys.sign(&claims("alice"));
        let exp = NOW + 60;
        keys.verify(&token, at(exp), LEEWAY).unwrap();
        keys.verify(&token, at(exp + 30), LEEWAY).unwrap();
        assert_eq!(keys.verify(&token, at(exp + 31), LEEWAY), Err(TokenError::Expired));
        assert_eq!(keys.verify(&token, at(exp + 1), Duration::ZERO), Err(TokenError::Expired));
        assert_eq!(TokenError::Expired.to_string(), "token expired");

        let early = keys.sign(&Claims { nbf: Some(NOW + 100), ..claims("alice") });
        assert_eq!(keys.verify(&early, at(NOW), LEEWAY), Err(TokenError::NotYetValid));
        assert_eq!(TokenError::NotYetValid.to_string(), "token not valid yet (nbf)");
        keys.verify(&early, at(NOW + 70), LEEWAY).unwrap();
        // A clock before the epoch, or a leeway too large to add, is no panic.
        keys.verify(&token, UNIX_EPOCH - Duration::from_secs(1), LEEWAY).unwrap();
        keys.verify(&token, at(exp + 31), Duration::MAX).unwrap();
    }

    #[test]
    fn claims_of_the_wrong_shape_are_malformed() {
        let (_dir, keys) = keys(&format!("{KEY_A}\n"));
        let sign = |claims: &str| hand_made(HS256, claims, KEY_A.as_bytes());
        let exp = NOW + 60;
        for (claims, reason) in [
            (r#"{"sub":"alice"}"#.to_string(), "missing exp"),
            (format!(r#"{{"exp":{exp}}}"#), "missing sub"),
            (format!(r#"{{"sub":"","exp":{exp}}}"#), "empty user id"),
            (format!(r#"{{"sub":"a b","exp":{exp}}}"#), "whitespace"),
            (format!(r#"{{"sub":"{}","exp":{exp}}}"#, "u".repeat(MAX_SUB_BYTES + 1)), "longer than 256"),
            (format!(r#"{{"sub":7,"exp":{exp}}}"#), "sub must be a string"),
            (format!(r#"{{"sub":"alice","exp":"{exp}"}}"#), "exp must be a non-negative integer"),
            (format!(r#"{{"sub":"alice","exp":{exp}.5}}"#), "exp must be a non-negative integer"),
            (r#"{"sub":"alice","exp":-1}"#.to_string(), "exp must be a non-negative integer"),
            (r#"{"sub":"alice","exp":99999999999999}"#.to_string(), "after the year 9999"),
            (format!(r#"{{"sub":"alice","exp":{exp},"nbf":"soon"}}"#), "nbf must be"),
            (format!(r#"{{"sub":"alice","exp":{exp},"topics":"news"}}"#), "array of strings"),
            (format!(r#"{{"sub":"alice","exp":{exp},"topics":["news",1]}}"#), "array of strings"),
            (format!(r#"{{"sub":"alice","exp":{exp},"topics":["news","a*b"]}}"#), "topics[1]: '*' is allowed only"),
            (format!(r#"{{"sub":"alice","exp":{exp},"topics":[""]}}"#), "topics[0]: empty topic pattern"),
            ("[1,2]".to_string(), "claims is not a JSON object"),
            ("{".to_string(), "claims is not a JSON object"),
        ] {
            let err = refused(&keys, &sign(&claims));
            assert!(matches!(&err, TokenError::Malformed(r) if r.contains(reason)), "{claims}: {err}");
        }
    }

    #[test]
    fn encodings_other_than_unpadded_base64url_are_malformed() {
        let (_dir, keys) = keys(&format!("{KEY_A}\n"));
        let token = keys.sign(&claims("alice"));
        let parts: Vec<&str> = token.split('.').collect();
        // The signature is 32 bytes: 43 characters unpadded, one '=' padded.
        let padded = format!("{token}=");
        assert!(
            matches!(refused(&keys, &padded), TokenError::Malformed(r) if r == "signature is not unpadded base64url")
        );
        // The standard alphabet's '+' and '/' are not base64url.
        for c in ["+", "/"] {
            let token = format!("{}.{}.{c}{}", parts[0], parts[1], &parts[2][1..]);
            assert!(
                matches!(refused(&keys, &token), TokenError::Malformed(r) if r == "signature is not unpadded base64url")
            );
        }
        for bad in ["", "a.b", "a.b.c.d", &format!("{}.{}", parts[0], parts[1]), "..", "!.!.!"] {
            assert!(matches!(refused(&keys, bad), TokenError::Malformed(_)), "{bad:?}");
        }
        let not_json = format!("{}.{}.{}", URL_SAFE_NO_PAD.encode("alg"), parts[1], parts[2]);
        assert_eq!(refused(&keys, &not_json).to_string(), "malformed token: header is not a JSON object");
    }

    #[test]
    fn tokens_past_the_size_bound_are_refused_before_decoding() {
        let (_dir, keys) = keys(&format!("{KEY_A}\n"));
        let big = Claims { topics: Some(vec!["t".repeat(100); 100]), ..claims("alice") };
        let token = keys.sign(&big);
        assert!(token.len() > MAX_TOKEN_BYTES);
        assert_eq!(refused(&keys, &token), TokenError::TooLong);
        assert_eq!(refused(&keys, &"!".repeat(MAX_TOKEN_BYTES + 1)), TokenError::TooLong);
        assert!(matches!(refused(&keys, &"!".repeat(MAX_TOKEN_BYTES)), TokenError::Malformed(_)));
    }

    #[test]
    fn every_key_verifies_and_the_first_signs() {
        let (dir, path) = file(&format!("# new\n{KEY_A}\n\n# old, until every token it signed expired\n{KEY_B}\n"));
        let rotated = TokenKeys::load(&path).unwrap();
        let (_old_dir, old) = keys(&format!("{KEY_B}\n"));
        let by_old = old.sign(&claims("alice"));
        assert_eq!(rotated.verify(&by_old, at(NOW), LEEWAY).unwrap().sub, "alice");
        let by_new = rotated.sign(&claims("alice"));
        assert_eq!(old.verify(&by_new, at(NOW), LEEWAY), Err(TokenError::BadSignature), "signed with the first");

        std::fs::write(&path, format!("{KEY_A}\n")).unwrap();
        assert_eq!(rotated.reload(), Ok((2, 1)));
        assert_eq!(rotated.verify(&by_old, at(NOW), LEEWAY), Err(TokenError::BadSignature), "retired");
        std::fs::write(&path, "short\n").unwrap();
        assert!(rotated.reload().unwrap_err().contains("shorter than 32"));
        rotated.verify(&by_new, at(NOW), LEEWAY).expect("the old keys stay after a failed reload");
        drop(dir);
    }

    #[test]
    fn short_keys_are_refused_at_load_naming_flag_and_file() {
        let (_dir, path) = file(&format!("{KEY_A}\n# comment\n{}\n", &KEY_B[..31]));
        let err = TokenKeys::load(&path).unwrap_err();
        assert!(
            err.starts_with(&format!("--token-key-file {}: the key on line 3 is 31 bytes", path.display())),
            "{err}"
        );
        assert!(err.contains("RFC 7518"), "{err}");
        assert!(!err.contains(&KEY_B[..31]), "never the key itself: {err}");
        assert!(TokenKeys::load(Path::new("/nonexistent/keys"))
            .unwrap_err()
            .starts_with("--token-key-file /nonexistent"));
    }

    #[test]
    fn debug_never_shows_a_key() {
        let (_dir, keys) = keys(&format!("{KEY_A}\n{KEY_B}\n"));
        let shown = format!("{keys:?}");
        assert!(!shown.contains("aaaa") && !shown.contains("bbbb"), "{shown}");
        assert_eq!(shown, "TokenKeys { keys: 2, .. }");
    }

    #[test]
    fn topic_grants() {
        let grants = TopicGrants::parse(&["news", "room:42:*"]).unwrap();
        assert!(grants.allows("news"));
        assert!(!grants.allows("news2"));
        assert!(!grants.allows("new"));
        assert!(grants.allows("room:42:chat"));
        assert!(grants.allows("room:42:"));
        assert!(!grants.allows("room:421"));
        assert!(!grants.allows("room:43:chat"));

        let all = TopicGrants::parse(&["*"]).unwrap();
        assert_eq!(all, TopicGrants::everything());
        assert!(all.allows("anything"));
        assert!(!TopicGrants::nothing().allows("news"));
        assert_eq!(TopicGrants::parse::<&str>(&[]).unwrap(), TopicGrants::nothing());
        assert_eq!(claims("alice").grants(), TopicGrants::nothing(), "no topics claim: nothing");

        assert_eq!(
            TopicGrants::parse(&["news", "a*b"]).unwrap_err(),
            "topics[1]: '*' is allowed only at the end of a topic pattern"
        );
        assert!(TopicGrants::parse(&["**"]).unwrap_err().contains("only at the end"));
        assert!(TopicGrants::parse(&["*a"]).unwrap_err().contains("only at the end"));
        assert!(TopicGrants::parse(&["a b*"]).unwrap_err().contains("whitespace"));
        assert!(TopicGrants::parse(&[""]).unwrap_err().contains("empty topic pattern"));
        let c = Claims { topics: Some(vec!["a*b".into(), "news".into()]), ..claims("alice") };
        assert_eq!(c.grants(), TopicGrants::parse(&["news"]).unwrap(), "a malformed pattern grants nothing");
    }
}
