//! How connect-nodes appear in etcd, the one place both sides agree on it: a node registers
//! `<prefix><node-id>` with its gRPC address as the value; push-manager lists `<prefix>` and
//! reads every key directly under it as a node. A node id comes from a flag on one side and
//! from etcd on the other, so both check it with the same rule.

/// The prefix both roles use unless told otherwise.
pub const DEFAULT_PREFIX: &str = "/services/connect-node/";

/// Longest node id, in bytes: room for a fully qualified host name and a port.
pub const MAX_NODE_ID_BYTES: usize = 128;

/// A node id is 1-128 bytes without `/` (it is one key segment), whitespace or control
/// characters (it is printed in logs and thread names). The error says what is wrong.
pub fn validate_node_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("the node id is empty".into());
    }
    if id.len() > MAX_NODE_ID_BYTES {
        return Err(format!("the node id is {} bytes; the limit is {MAX_NODE_ID_BYTES}", id.len()));
    }
    if id.contains('/') {
        return Err(format!("the node id {id:?} contains '/': it must be one key segment"));
    }
    if let Some(c) = id.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("the node id {id:?} contains {c:?}: whitespace and control characters are not allowed"));
    }
    Ok(())
}

/// The key a node registers under.
pub fn node_key(prefix: &str, id: &str) -> String {
    format!("{prefix}{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_host_port_style_ids() {
        for ok in ["n1", "web-01.example.com-50061", "ünï", &"x".repeat(MAX_NODE_ID_BYTES)] {
            validate_node_id(ok).unwrap();
        }
        assert_eq!(node_key(DEFAULT_PREFIX, "n1"), "/services/connect-node/n1");
    }

    #[test]
    fn refuses_with_the_reason() {
        assert!(validate_node_id("").unwrap_err().contains("empty"));
        assert!(validate_node_id(&"x".repeat(MAX_NODE_ID_BYTES + 1)).unwrap_err().contains("limit is 128"));
        assert!(validate_node_id("a/b").unwrap_err().contains("'/'"));
        assert!(validate_node_id("a b").unwrap_err().contains("whitespace"));
        assert!(validate_node_id("a\0b").unwrap_err().contains("control"));
        assert!(validate_node_id("a\u{7f}").unwrap_err().contains("control"));
    }
}
