//! Topic names, checked by one rule where they are published (`PushServer.Broadcast`) and where
//! they are subscribed (WebSocket), so a subscription can never name a topic that no broadcast
//! is allowed to target.

/// Longest topic a broadcast may target, in bytes (and the connect-node's default limit).
pub const MAX_TOPIC_BYTES: usize = 128;

/// A non-empty topic of at most `max_len` bytes, without whitespace or control characters.
/// The error is short enough for a WebSocket close reason.
pub fn validate(topic: &str, max_len: usize) -> Result<(), String> {
    check_name("topic", topic, max_len)
}

/// The rule topics and user ids share (both are printed in logs and frames): non-empty, at most
/// `max_len` bytes, no whitespace or control characters; `noun` names the value in the error.
pub(crate) fn check_name(noun: &str, value: &str, max_len: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("empty {noun}"));
    }
    if value.len() > max_len {
        return Err(format!("{noun} longer than {max_len} bytes ({} bytes)", value.len()));
    }
    if let Some(c) = value.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{noun} contains {c:?}: whitespace and control characters are not allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in ["a", "room-1/a.b", "news:eu", "ünïcode", &"t".repeat(MAX_TOPIC_BYTES)] {
            validate(ok, MAX_TOPIC_BYTES).unwrap();
        }
    }

    #[test]
    fn refuses_with_the_reason() {
        assert_eq!(validate("", 8).unwrap_err(), "empty topic");
        assert!(validate("123456789", 8).unwrap_err().starts_with("topic longer than 8 bytes (9 bytes)"));
        assert!(validate("a b", 8).unwrap_err().contains("whitespace"));
        assert!(validate("a\tb", 8).unwrap_err().contains("whitespace"));
        assert!(validate("a\u{1}", 8).unwrap_err().contains("control"));
    }
}
