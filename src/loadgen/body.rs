//! What each benchmark message carries so a subscriber can judge it alone: its sequence number,
//! how many messages before it the publisher had seen acknowledged when it sent it (for the
//! ordering check), and when it was sent. Fixed-width ASCII hex, so the body travels unescaped
//! inside push-manager's JSON frames and as-is in NATS's, and is parsed without allocating.

/// Bytes the header takes; `--size` must be at least this.
pub const HEADER_BYTES: usize = 3 * 17;

/// What a subscriber reads from a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// The message's number, from 0.
    pub(crate) seq: u64,
    /// Messages `0..acked` were acknowledged before this one was sent, so must arrive before it.
    pub(crate) acked: u64,
    /// When it was sent, in nanoseconds since the run's epoch.
    pub(crate) sent_ns: u64,
}

/// A body of `size` bytes (at least [`HEADER_BYTES`]) carrying `header`, padded with `x`.
pub(crate) fn encode(header: Header, size: usize) -> Vec<u8> {
    let mut body = vec![b'x'; size.max(HEADER_BYTES)];
    for (i, value) in [header.seq, header.acked, header.sent_ns].into_iter().enumerate() {
        let field = &mut body[i * 17..i * 17 + 17];
        for (j, byte) in field[..16].iter_mut().enumerate() {
            *byte = b"0123456789abcdef"[((value >> (60 - 4 * j)) & 0xf) as usize];
        }
        field[16] = b' ';
    }
    body
}

/// The header at the start of `body`, or `None` if it is not one of ours.
pub(crate) fn decode(body: &[u8]) -> Option<Header> {
    if body.len() < HEADER_BYTES {
        return None;
    }
    let field = |i: usize| -> Option<u64> {
        body[i * 17..i * 17 + 16].iter().try_fold(0u64, |acc, &b| {
            let digit = match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'f' => b - b'a' + 10,
                _ => return None,
            };
            Some(acc << 4 | u64::from(digit))
        })
    };
    Some(Header { seq: field(0)?, acked: field(1)?, sent_ns: field(2)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_pads() {
        let header = Header { seq: 7, acked: 3, sent_ns: u64::MAX - 1 };
        let body = encode(header, 128);
        assert_eq!(body.len(), 128);
        assert!(body[HEADER_BYTES..].iter().all(|&b| b == b'x'));
        assert_eq!(decode(&body), Some(header));
    }

    #[test]
    fn refuses_what_is_not_a_header() {
        assert_eq!(decode(b"hello"), None);
        assert_eq!(decode(&[b'z'; HEADER_BYTES]), None);
    }
}
