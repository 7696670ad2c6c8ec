//! What travels over a WebSocket between a connect-node and its users: the JSON commands a
//! client sends, the acknowledgements and deliveries the node sends back, and the close codes it
//! uses when it ends a connection. Kept apart from the I/O so it can be tested byte for byte.
//!
//! # Connecting
//! `GET /ws` with a WebSocket upgrade; `?topic=a&topic=b` (form-encoded: `%XX` escapes of UTF-8,
//! `+` for a space) subscribes at connect time. Another path gets HTTP 404, a request without
//! an upgrade gets HTTP 426, a bad query topic gets HTTP 400. A connection made while the node
//! holds `max_connections` sockets gets HTTP 503; one whose request has not arrived whole
//! within `handshake_timeout` gets HTTP 408. An `Origin` outside `--allowed-origins` (or none,
//! with `--require-origin`) gets HTTP 403. Each of these answers is closed after it is sent.
//!
//! # Connection tokens
//! Where the node reads tokens (`--ws-auth optional|required`), a client shows a JWT (see
//! [`crate::token`]) as `?token=` on the upgrade URL or in a first command
//! `{"action":"auth","token":"..."}`. A bad, expired or not-yet-valid token in the URL gets
//! HTTP 401 with the reason; so do `?topic=` parameters with `--ws-auth required` and no
//! `?token=`, and HTTP 403 a `?topic=` the token does not grant. With `required`, a connection
//! that showed no token at the upgrade may only send `auth`, within `--ws-auth-timeout`.
//! A verified connection is its token's user (`sub`), may subscribe only to the token's
//! `topics`, and is closed with 4002 at its `exp` (plus `--token-leeway`) unless it sent
//! `{"action":"refresh","token":"..."}` with a fresh token for the same user before then. The
//! node answers `auth` and `refresh` with
//! `{"type":"authenticated"|"refreshed","user":"alice","exp":1767225600,"topics":[...]}`,
//! `topics` being what the connection holds afterwards (a refresh drops topics the new token
//! no longer grants).
//!
//! # Client commands (text frames)
//! ```json
//! {"action":"subscribe","topics":["a","b"]}
//! {"action":"unsubscribe","topics":["a"]}
//! ```
//! The node answers with every topic the connection holds afterwards:
//! `{"type":"subscribed","topics":["a","b"]}` (resp. `"type":"unsubscribed"`).
//! Subscribing twice to a topic or unsubscribing from one not held is not an error.
//! A subscribe naming a topic the connection's token does not grant adds nothing and is answered
//! `{"type":"error","action":"subscribe","topics":["secret"],"reason":"..."}` naming the refused
//! topics; the connection stays open. An `auth` or `refresh` that cannot apply (tokens off, already
//! authenticated, not authenticated) gets the same kind of error frame with its action.
//!
//! # Deliveries (text frames)
//! One JSON object per broadcast, in the order the node received them:
//! ```json
//! {"type":"message","topic":"a","op":1000,"seq":3,"ver":1,"body":"hello"}
//! ```
//! `op`, `seq` and `ver` come from `BroadCastReq.proto` (`op` falls back to
//! `BroadCastReq.protoOp` when `proto.op` is 0). `topic` is `""` for a broadcast to every
//! connection. A body that is not valid UTF-8 is sent as `"body_base64":"..."` (standard
//! alphabet, padded) instead of `"body"`.
//!
//! A push to users (`PushServer.PushUsers`) reaches every connection of the named users (the
//! `sub` of each connection's token) whatever topics they hold, as a `direct` frame: the same
//! fields and body rule, without `topic`.
//! ```json
//! {"type":"direct","op":1000,"seq":3,"ver":1,"body":"hello"}
//! ```
//! A user named twice in one push gets it once per connection.
//!
//! A delivery longer than 4 KiB is sent as a fragmented WebSocket message, each fragment whole
//! UTF-8 characters; WebSocket clients reassemble it.
//!
//! # Close codes
//! | code | reason starts with | when |
//! | --- | --- | --- |
//! | 1001 | `server shutting down` | the node stops |
//! | 1003 | `binary frames are not supported` | a binary frame arrived |
//! | 1007 | `invalid JSON: ...` / `text frame is not valid UTF-8` | a command that does not parse |
//! | 1008 | `unknown action "x"`, `empty topic`, `topic longer than ...`, `too many topics ...`, ... | a command that parses but is refused |
//! | 1009 | `message too big ...` | a frame or message over `max_frame_bytes` |
//! | 1002 | `protocol error: ...` | a WebSocket protocol violation (e.g. unmasked frame) |
//! | 4001 | `token ...` / `authentication required ...` | a bad token in `auth`/`refresh`, a refresh for another user, a command before `auth`, or no `auth` within `--ws-auth-timeout` |
//! | 4002 | `token expired` | the token's `exp` (plus `--token-leeway`) passed without a `refresh` |
//! | 4000 | `slow consumer: outgoing buffer overflow` | a delivery came while bytes were unsent, and with it they would pass `max_out_buffer` (one delivery of any size is taken when nothing is unsent) |
//!
//! A client from which nothing (not even a pong) arrived for `pong_timeout` is dropped without a
//! close frame: it is not listening anyway.

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::proto::protocol::BroadCastReq;

pub(crate) const CLOSE_SHUTDOWN: u16 = 1001;
pub(crate) const CLOSE_PROTOCOL: u16 = 1002;
pub(crate) const CLOSE_UNSUPPORTED: u16 = 1003;
pub(crate) const CLOSE_INVALID_DATA: u16 = 1007;
pub(crate) const CLOSE_POLICY: u16 = 1008;
pub(crate) const CLOSE_TOO_BIG: u16 = 1009;
pub(crate) const CLOSE_SLOW: u16 = 4000;
pub(crate) const CLOSE_AUTH: u16 = 4001;
pub(crate) const CLOSE_EXPIRED: u16 = 4002;

pub(crate) const REASON_SHUTDOWN: &str = "server shutting down";
pub(crate) const REASON_BINARY: &str = "binary frames are not supported";
pub(crate) const REASON_SLOW: &str = "slow consumer: outgoing buffer overflow";
pub(crate) const REASON_EXPIRED: &str = "token expired";

/// A close frame's payload holds at most 125 bytes, two of them the code.
const MAX_REASON_BYTES: usize = 123;

/// Limits on topics, from the gateway config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TopicLimits {
    pub(crate) max_len: usize,
    pub(crate) max_per_connection: usize,
}

/// A client command that parsed and whose topics are valid.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Command {
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
    /// A connection token shown after the upgrade.
    Auth(String),
    /// A fresh token for the same user, before the current one expires.
    Refresh(String),
}

/// Why a connection is being closed: a close code and a reason fit for a close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reject {
    pub(crate) code: u16,
    pub(crate) reason: String,
}

impl Reject {
    pub(crate) fn new(code: u16, reason: impl Into<String>) -> Reject {
        Reject { code, reason: truncate_reason(reason.into()) }
    }

    fn policy(reason: impl Into<String>) -> Reject {
        Reject::new(CLOSE_POLICY, reason)
    }
}

#[derive(Deserialize)]
struct RawCommand {
    action: Option<String>,
    #[serde(default)]
    topics: Vec<String>,
    token: Option<String>,
}

/// Parses one text frame from a client.
pub(crate) fn parse_command(text: &str, limits: TopicLimits) -> Result<Command, Reject> {
    let raw: RawCommand = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            Reject::policy(format!("bad command: {e}"))
        } else {
            Reject::new(CLOSE_INVALID_DATA, format!("invalid JSON: {e}"))
        }
    })?;
    let action = raw.action.ok_or_else(|| Reject::policy("missing \"action\""))?;
    match action.as_str() {
        "auth" | "refresh" => {
            let token = raw.token.filter(|t| !t.is_empty()).ok_or_else(|| {
                Reject::policy(format!("{action} needs a \"token\": {{\"action\":\"{action}\",\"token\":\"...\"}}"))
            })?;
            Ok(if action == "auth" { Command::Auth(token) } else { Command::Refresh(token) })
        }
        "subscribe" | "unsubscribe" => {
            if raw.topics.is_empty() {
                return Err(Reject::policy("no topics given"));
            }
            if raw.topics.len() > limits.max_per_connection {
                return Err(too_many_topics(raw.topics.len(), limits));
            }
            for topic in &raw.topics {
                crate::topic::validate(topic, limits.max_len).map_err(Reject::policy)?;
            }
            Ok(if action == "subscribe" { Command::Subscribe(raw.topics) } else { Command::Unsubscribe(raw.topics) })
        }
        other => Err(Reject::policy(format!("unknown action {:?}", other))),
    }
}

pub(crate) fn too_many_topics(count: usize, limits: TopicLimits) -> Reject {
    Reject::policy(format!("too many topics: {count} > {} per connection", limits.max_per_connection))
}

/// Reads `topic=` parameters from a query string, form-decoded (other parameters are ignored).
pub(crate) fn topics_from_query(query: &str, limits: TopicLimits) -> Result<Vec<String>, String> {
    let masked = mask_replacement_characters(query);
    let pairs = form_urlencoded::parse(query.as_bytes()).zip(form_urlencoded::parse(masked.as_bytes()));
    let mut topics: Vec<String> = Vec::new();
    for ((key, topic), (_, masked_topic)) in pairs {
        if key != "topic" {
            continue;
        }
        if masked_topic.contains(char::REPLACEMENT_CHARACTER) {
            return Err("topic is not valid percent-encoded UTF-8".into());
        }
        crate::topic::validate(&topic, limits.max_len)?;
        if !topics.iter().any(|t| *t == topic) {
            topics.push(topic.into_owned());
        }
    }
    if topics.len() > limits.max_per_connection {
        return Err(too_many_topics(topics.len(), limits).reason);
    }
    Ok(topics)
}

/// `form_urlencoded` turns bytes that are not UTF-8 into U+FFFD, which a client may also send
/// on purpose (as `%EF%BF%BD`, or as it is). This copy of the query has `_` for each of the
/// client's own, so U+FFFD in its decoding can only come from bytes that are not UTF-8: `_` is
/// a whole character like the one it replaces, so no other byte becomes valid or invalid.
fn mask_replacement_characters(query: &str) -> String {
    const ENCODED: &str = "%EF%BF%BD";
    let mut masked = String::with_capacity(query.len());
    let mut rest = query;
    while let Some(c) = rest.chars().next() {
        if rest.get(..ENCODED.len()).is_some_and(|s| s.eq_ignore_ascii_case(ENCODED)) {
            masked.push('_');
            rest = &rest[ENCODED.len()..];
        } else {
            masked.push(if c == char::REPLACEMENT_CHARACTER { '_' } else { c });
            rest = &rest[c.len_utf8()..];
        }
    }
    masked
}

/// Which command an ack answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum AckKind {
    Subscribed,
    Unsubscribed,
}

#[derive(Serialize)]
struct AckFrame<'a> {
    #[serde(rename = "type")]
    kind: AckKind,
    topics: &'a [Box<str>],
}

/// `{"type":"subscribed"|"unsubscribed","topics":[...]}`.
pub(crate) fn encode_ack(kind: AckKind, topics: &[Box<str>]) -> String {
    serde_json::to_string(&AckFrame { kind, topics }).expect("an ack always serialises")
}

/// Which command an identity frame answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum IdentityKind {
    Authenticated,
    Refreshed,
}

#[derive(Serialize)]
struct IdentityFrame<'a> {
    #[serde(rename = "type")]
    kind: IdentityKind,
    user: &'a str,
    exp: u64,
    topics: &'a [Box<str>],
}

/// `{"type":"authenticated"|"refreshed","user":...,"exp":...,"topics":[...]}`.
pub(crate) fn encode_identity(kind: IdentityKind, user: &str, exp: u64, topics: &[Box<str>]) -> String {
    serde_json::to_string(&IdentityFrame { kind, user, exp, topics }).expect("an identity frame always serialises")
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    action: &'a str,
    #[serde(skip_serializing_if = "no_topics")]
    topics: &'a [String],
    reason: &'a str,
}

fn no_topics(topics: &&[String]) -> bool {
    topics.is_empty()
}

/// `{"type":"error","action":...,"topics":[...],"reason":...}`: a command refused while the
/// connection stays open (`topics` left out when there are none to name).
pub(crate) fn encode_error(action: &str, topics: &[String], reason: &str) -> String {
    serde_json::to_string(&ErrorFrame { kind: "error", action, topics, reason })
        .expect("an error frame always serialises")
}

/// `{"type":"message",...}`: what a connection gets for one broadcast.
/// `{"type":"message",...}` or `{"type":"direct",...}`: what a connection gets for one
/// broadcast or push to users.
#[derive(Serialize)]
struct MessageFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    /// `None` for a direct frame, which is for a user, not a topic.
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    op: i32,
    seq: i32,
    ver: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
}

/// The message frame for one broadcast (see the module doc); encoded once per broadcast.
pub(crate) fn encode_message_frame(msg: &BroadCastReq) -> String {
    encode_frame("message", Some(msg.get_topic()), msg)
}

/// The direct frame for one push to users (see the module doc); encoded once per push.
pub(crate) fn encode_direct_frame(msg: &BroadCastReq) -> String {
    encode_frame("direct", None, msg)
}

fn encode_frame(kind: &'static str, topic: Option<&str>, msg: &BroadCastReq) -> String {
    let proto = msg.get_proto();
    let op = if proto.get_op() != 0 { proto.get_op() } else { msg.get_protoOp() };
    let (body, body_base64) = match std::str::from_utf8(proto.get_body()) {
        Ok(text) => (Some(text), None),
        Err(_) => (None, Some(base64::engine::general_purpose::STANDARD.encode(proto.get_body()))),
    };
    let frame = MessageFrame { kind, topic, op, seq: proto.get_seq(), ver: proto.get_ver(), body, body_base64 };
    serde_json::to_string(&frame).expect("a message frame always serialises")
}

/// Cuts a reason to what a close frame can carry, at a character boundary.
fn truncate_reason(mut reason: String) -> String {
    if reason.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::protocol::Proto;

    const LIMITS: TopicLimits = TopicLimits { max_len: 8, max_per_connection: 3 };

    fn reject(text: &str) -> Reject {
        parse_command(text, LIMITS).unwrap_err()
    }

    #[test]
    fn parses_subscribe_and_unsubscribe() {
        assert_eq!(
            parse_command(r#"{"action":"subscribe","topics":["a","b"]}"#, LIMITS),
            Ok(Command::Subscribe(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            parse_command(r#"{"topics":["a"],"action":"unsubscribe"}"#, LIMITS),
            Ok(Command::Unsubscribe(vec!["a".into()]))
        );
    }

    #[test]
    fn refuses_bad_commands_with_their_close_code() {
        let r = reject("{nope");
        assert_eq!(r.code, CLOSE_INVALID_DATA);
        assert!(r.reason.starts_with("invalid JSON: "), "{}", r.reason);
        assert_eq!(reject(r#"{"action":"x","topics":["a"]}"#), Reject::policy(r#"unknown action "x""#));
        assert_eq!(reject(r#"{"topics":["a"]}"#).reason, r#"missing "action""#);
        assert_eq!(reject(r#"{"action":"subscribe","topics":[]}"#).reason, "no topics given");
        assert_eq!(reject(r#"{"action":"subscribe","topics":[""]}"#).reason, "empty topic");
        assert_eq!(
            reject(r#"{"action":"subscribe","topics":["a\u0001"]}"#).reason,
            "topic contains '\\u{1}': whitespace and control characters are not allowed"
        );
        assert!(reject(r#"{"action":"subscribe","topics":["123456789"]}"#)
            .reason
            .starts_with("topic longer than 8 bytes"));
        assert!(reject(r#"{"action":"subscribe","topics":["a","b","c","d"]}"#).reason.starts_with("too many topics"));
        let wrong_type = reject(r#"{"action":"subscribe","topics":"a"}"#);
        assert_eq!(wrong_type.code, CLOSE_POLICY);
        assert!(wrong_type.reason.starts_with("bad command: "), "{}", wrong_type.reason);
    }

    #[test]
    fn parses_auth_and_refresh() {
        assert_eq!(parse_command(r#"{"action":"auth","token":"a.b.c"}"#, LIMITS), Ok(Command::Auth("a.b.c".into())));
        assert_eq!(parse_command(r#"{"action":"refresh","token":"x"}"#, LIMITS), Ok(Command::Refresh("x".into())));
        for bad in [r#"{"action":"auth"}"#, r#"{"action":"refresh","token":""}"#] {
            let r = reject(bad);
            assert_eq!(r.code, CLOSE_POLICY);
            assert!(r.reason.contains("needs a \"token\""), "{}", r.reason);
        }
        assert!(reject(r#"{"action":"auth","token":7}"#).reason.starts_with("bad command: "));
    }

    #[test]
    fn encodes_identity_and_error_frames() {
        let topics: Vec<Box<str>> = vec!["news".into()];
        assert_eq!(
            encode_identity(IdentityKind::Authenticated, "alice", 17, &topics),
            r#"{"type":"authenticated","user":"alice","exp":17,"topics":["news"]}"#
        );
        assert_eq!(
            encode_identity(IdentityKind::Refreshed, "a\"b", 1, &[]),
            r#"{"type":"refreshed","user":"a\"b","exp":1,"topics":[]}"#
        );
        assert_eq!(
            encode_error("subscribe", &["x".into()], "no"),
            r#"{"type":"error","action":"subscribe","topics":["x"],"reason":"no"}"#
        );
        assert_eq!(encode_error("auth", &[], "no"), r#"{"type":"error","action":"auth","reason":"no"}"#);
    }

    #[test]
    fn reasons_fit_a_close_frame() {
        let r = Reject::new(CLOSE_POLICY, "é".repeat(100));
        assert!(r.reason.len() <= MAX_REASON_BYTES);
        assert!(r.reason.chars().all(|c| c == 'é'));
    }

    #[test]
    fn query_topics_are_decoded_validated_and_deduplicated() {
        assert_eq!(topics_from_query("topic=a&x=1&topic=b%2Fc&topic=a", LIMITS), Ok(vec!["a".into(), "b/c".into()]));
        assert!(topics_from_query("topic=b%20c", LIMITS).unwrap_err().contains("whitespace"));
        assert_eq!(topics_from_query("", LIMITS), Ok(vec![]));
        assert_eq!(topics_from_query("topic=", LIMITS), Err("empty topic".into()));
        // Form decoding keeps what is not an escape as it is.
        assert_eq!(topics_from_query("topic=%zz", LIMITS), Ok(vec!["%zz".into()]));
        assert!(topics_from_query("topic=%ff", LIMITS).is_err());
        assert!(topics_from_query("topic=a&topic=b&topic=c&topic=d", LIMITS)
            .unwrap_err()
            .starts_with("too many topics"));
    }

    fn broadcast(topic: &str, proto_op: i32, op: i32, body: &[u8]) -> BroadCastReq {
        let mut proto = Proto::new();
        proto.set_ver(1);
        proto.set_op(op);
        proto.set_seq(3);
        proto.set_body(body.to_vec());
        let mut msg = BroadCastReq::new();
        msg.set_topic(topic.into());
        msg.set_protoOp(proto_op);
        msg.set_proto(proto);
        msg
    }

    #[test]
    fn only_bytes_that_are_not_utf8_are_refused() {
        let not_utf8 = Err("topic is not valid percent-encoded UTF-8".to_string());
        assert_eq!(
            topics_from_query("topic=%E2%82%AC&topic=%ef%bf%bd", LIMITS),
            Ok(vec!["€".into(), "\u{fffd}".into()])
        );
        assert_eq!(topics_from_query("topic=a\u{fffd}", LIMITS), Ok(vec!["a\u{fffd}".into()]));
        assert_eq!(topics_from_query("x=%ff&topic=a", LIMITS), Ok(vec!["a".into()]));
        for bad in ["topic=%E2%82", "topic=%E2%82%EF%BF%BD%AC", "topic=%EF%BF%BD%AC", "topic=%ef%bf"] {
            assert_eq!(topics_from_query(bad, LIMITS), not_utf8, "{bad}");
        }
    }

    #[test]
    fn encodes_message_frames() {
        assert_eq!(
            encode_message_frame(&broadcast("a", 7, 1000, b"hello")),
            r#"{"type":"message","topic":"a","op":1000,"seq":3,"ver":1,"body":"hello"}"#
        );
        assert_eq!(
            encode_message_frame(&broadcast("", 7, 0, b"say \"hi\"")),
            r#"{"type":"message","topic":"","op":7,"seq":3,"ver":1,"body":"say \"hi\""}"#
        );
        assert_eq!(
            encode_message_frame(&broadcast("a", 7, 1, &[0xff, 0x00, 0x41])),
            r#"{"type":"message","topic":"a","op":1,"seq":3,"ver":1,"body_base64":"/wBB"}"#
        );
    }

    #[test]
    fn encodes_direct_frames_without_a_topic() {
        assert_eq!(
            encode_direct_frame(&broadcast("", 7, 1000, b"hello")),
            r#"{"type":"direct","op":1000,"seq":3,"ver":1,"body":"hello"}"#
        );
        assert_eq!(
            encode_direct_frame(&broadcast("", 7, 0, b"say \"hi\"")),
            r#"{"type":"direct","op":7,"seq":3,"ver":1,"body":"say \"hi\""}"#
        );
        assert_eq!(
            encode_direct_frame(&broadcast("", 7, 1, &[0xff, 0x00, 0x41])),
            r#"{"type":"direct","op":1,"seq":3,"ver":1,"body_base64":"/wBB"}"#
        );
    }

    #[test]
    fn encodes_acks() {
        let topics: Vec<Box<str>> = vec!["a".into(), "b".into()];
        assert_eq!(encode_ack(AckKind::Subscribed, &topics), r#"{"type":"subscribed","topics":["a","b"]}"#);
        assert_eq!(encode_ack(AckKind::Unsubscribed, &[]), r#"{"type":"unsubscribed","topics":[]}"#);
    }
}
