//! Node records: what a connect-node writes under the prefix, and how we read it.
//!
//! The key's last segment is the node id; the value is its gRPC address `host:port`, or a JSON
//! object with an `addr` field (other fields are metadata for other readers and are ignored).

use std::fmt;

/// A connect-node as registered in etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: String,
    pub addr: String,
}

/// Why a key under the prefix is not a usable node record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadRecord {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "skipping key {:?}: {}", self.key, self.reason)
    }
}

/// Largest value read as a node record: an address, or a small JSON object around one. A bigger
/// value is not a node's record, and listing many of them would cost every poll.
pub const MAX_RECORD_BYTES: usize = 4096;

/// Parses one key/value found under `prefix`. The key must be `<prefix><node-id>` exactly: a key
/// with more segments is someone else's data (reading its last segment as an id would let
/// `<prefix>x/<id>` take over node `<id>`'s traffic).
pub fn parse(prefix: &str, key: &str, value: &[u8]) -> Result<NodeRecord, BadRecord> {
    let bad = |reason: String| BadRecord { key: key.to_string(), reason };
    let id = key.strip_prefix(prefix).unwrap_or(key);
    if id.is_empty() {
        return Err(bad("the key has no node id after the prefix".into()));
    }
    if id.contains('/') {
        return Err(bad(format!("the key is nested below the prefix; a node record is {prefix}<node-id>")));
    }
    crate::registry::validate_node_id(id).map_err(bad)?;
    if value.len() > MAX_RECORD_BYTES {
        return Err(bad(format!("the value is {} bytes; a node record is at most {MAX_RECORD_BYTES}", value.len())));
    }
    let text = std::str::from_utf8(value).map_err(|_| bad("the value is not UTF-8".into()))?.trim();
    let addr = if text.starts_with('{') { address_from_json(text).map_err(bad)? } else { text.to_string() };
    crate::addr::validate_host_port(&addr).map_err(bad)?;
    Ok(NodeRecord { id: id.to_string(), addr })
}

fn address_from_json(text: &str) -> Result<String, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON value: {e}"))?;
    match value.get("addr") {
        Some(serde_json::Value::String(addr)) => Ok(addr.trim().to_string()),
        Some(_) => Err("the JSON field \"addr\" is not a string".into()),
        None => Err("the JSON value has no \"addr\" field".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/services/connect-node/";

    fn ok(key: &str, value: &str) -> NodeRecord {
        parse(P, key, value.as_bytes()).unwrap()
    }

    fn err(key: &str, value: &[u8]) -> String {
        parse(P, key, value).unwrap_err().reason
    }

    #[test]
    fn plain_address() {
        assert_eq!(
            ok("/services/connect-node/n1", "127.0.0.1:50061"),
            NodeRecord { id: "n1".into(), addr: "127.0.0.1:50061".into() }
        );
        assert_eq!(ok("/services/connect-node/n1", " host.example:1 \n").addr, "host.example:1");
        assert_eq!(ok("/services/connect-node/n1", "[::1]:9000").addr, "[::1]:9000");
    }

    #[test]
    fn nested_keys_are_not_node_records() {
        assert!(err("/services/connect-node/zone-a/n7", b"h:1").contains("nested below the prefix"));
    }

    #[test]
    fn ids_follow_the_node_id_rule() {
        assert!(err("/services/connect-node/a\0b", b"h:1").contains("control characters"));
        assert!(err("/services/connect-node/a b", b"h:1").contains("whitespace"));
        assert!(err(&format!("/services/connect-node/{}", "x".repeat(129)), b"h:1").contains("limit is 128"));
    }

    #[test]
    fn oversized_values_are_refused_before_parsing() {
        let big = format!("{{\"addr\":\"h:1\",\"pad\":\"{}\"}}", "x".repeat(MAX_RECORD_BYTES));
        assert!(err("/services/connect-node/n", big.as_bytes()).contains("at most 4096"));
    }

    #[test]
    fn json_with_addr_and_metadata() {
        let r = ok("/services/connect-node/n2", r#"{"addr":"10.0.0.2:50061","zone":"a","weight":3}"#);
        assert_eq!(r.addr, "10.0.0.2:50061");
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        assert!(err("/services/connect-node/n", b"nonsense").contains("not host:port"));
        assert!(err("/services/connect-node/n", b"h:0").contains("port"));
        assert!(err("/services/connect-node/n", b"h:70000").contains("port"));
        assert!(err("/services/connect-node/n", b":80").contains("host"));
        assert!(err("/services/connect-node/n", b"::1:80").contains("brackets"));
        assert!(err("/services/connect-node/n", b"{\"addr\":").contains("invalid JSON"));
        assert!(err("/services/connect-node/n", b"{\"address\":\"h:1\"}").contains("no \"addr\""));
        assert!(err("/services/connect-node/n", b"{\"addr\":5}").contains("not a string"));
        assert!(err("/services/connect-node/n", &[0xff, 0xfe]).contains("UTF-8"));
        assert!(err("/services/connect-node/", b"h:1").contains("no node id"));
    }
}
