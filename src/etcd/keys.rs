//! Key-range arithmetic: etcd selects a prefix as the half-open range `[prefix, range_end)`.

/// The `range_end` that makes `[prefix, range_end)` exactly the keys starting with `prefix`:
/// the prefix with its last byte below 0xff incremented and everything after it dropped.
/// An empty prefix, or one of only 0xff bytes, has no such bound; etcd reads `"\0"` as
/// "every key from `key` on", which is then the right answer.
fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The `(key, range_end)` pair selecting every key that starts with `prefix`. etcd refuses an
/// empty key, so the empty prefix (every key) is spelled `("\0", "\0")` as etcd's clients do.
pub(crate) fn prefix_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let key = if prefix.is_empty() { vec![0] } else { prefix.to_vec() };
    (key, prefix_range_end(prefix))
}

#[cfg(test)]
mod tests {
    use super::{prefix_range, prefix_range_end};

    #[test]
    fn empty_prefix_is_the_whole_keyspace() {
        assert_eq!(prefix_range(b""), (vec![0], vec![0]));
        assert_eq!(prefix_range(b"/a/"), (b"/a/".to_vec(), b"/a0".to_vec()));
    }

    #[test]
    fn increments_the_last_byte() {
        assert_eq!(prefix_range_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_range_end(b"abc"), b"abd".to_vec());
        assert_eq!(prefix_range_end(b"a"), b"b".to_vec());
    }

    #[test]
    fn drops_trailing_ff_bytes() {
        assert_eq!(prefix_range_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_range_end(&[b'a', 0xfe, 0xff, 0xff]), vec![b'a', 0xff]);
    }

    #[test]
    fn empty_or_all_ff_means_every_key() {
        assert_eq!(prefix_range_end(b""), vec![0]);
        assert_eq!(prefix_range_end(&[0xff, 0xff]), vec![0]);
    }
}
