//! How the roles appear in etcd, the one place writers and readers agree on it.
//!
//! A connect-node registers `<prefix><node-id>` with its gRPC address as the value (a plain
//! `host:port`, which every consumer of the original layout reads); push-manager lists
//! `<prefix>` and reads every key directly under it as a node. Its WebSocket URL, which `bench`
//! needs, goes to a sibling prefix ([`ws_prefix`]) rather than under `<prefix>`, where readers
//! would take it for a malformed node. A push-manager instance registers
//! `<instance-prefix><instance-id>` with a small JSON object ([`instance`]) so that clients find
//! one without being given its address. Ids come from a flag on one side and from etcd on the
//! other, so both check them with the same rule. [`Registration`] keeps a role's records under
//! a lease for both roles.

pub mod instance;
mod registration;

pub use registration::{Record, Registration, RegistrationConfig, RegistrationState};

/// The prefix connect-nodes register under unless told otherwise.
pub const DEFAULT_PREFIX: &str = "/services/connect-node/";

/// The prefix push-manager instances register under unless told otherwise.
pub const DEFAULT_INSTANCE_PREFIX: &str = "/services/push-manager/";

/// Where nodes registered under `prefix` publish their WebSocket URLs:
/// `/services/connect-node/` gives `/services/connect-node-ws/`. A sibling, not a child: a key
/// under `prefix` would be listed as a malformed node by every reader of the node records.
pub fn ws_prefix(prefix: &str) -> String {
    format!("{}-ws/", prefix.trim_end_matches('/'))
}

/// The id a role takes when none is given: `<hostname>-<port>`, the port being its gRPC port,
/// so that a role restarted on the same host and port takes its own record back instead of
/// leaving a dead one beside it for a lease TTL.
pub fn default_id(port: u16) -> String {
    format!("{}-{port}", hostname())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it on success.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(0);
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if ok && !name.is_empty() => name.to_string(),
        _ => "node".to_string(),
    }
}

/// Longest node or instance id, in bytes: room for a fully qualified host name and a port.
pub const MAX_NODE_ID_BYTES: usize = 128;

/// A node id is 1-128 bytes without `/` (it is one key segment), whitespace or control
/// characters (it is printed in logs and thread names). The error says what is wrong.
pub fn validate_node_id(id: &str) -> Result<(), String> {
    validate_id("node id", id)
}

/// An instance id follows the node id rule, for the same reasons.
pub fn validate_instance_id(id: &str) -> Result<(), String> {
    validate_id("instance id", id)
}

fn validate_id(noun: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("the {noun} is empty"));
    }
    if id.len() > MAX_NODE_ID_BYTES {
        return Err(format!("the {noun} is {} bytes; the limit is {MAX_NODE_ID_BYTES}", id.len()));
    }
    if id.contains('/') {
        return Err(format!("the {noun} {id:?} contains '/': it must be one key segment"));
    }
    if let Some(c) = id.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("the {noun} {id:?} contains {c:?}: whitespace and control characters are not allowed"));
    }
    Ok(())
}

/// The key a node or an instance `id` registers under.
pub fn key(prefix: &str, id: &str) -> String {
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
        assert_eq!(key(DEFAULT_PREFIX, "n1"), "/services/connect-node/n1");
    }

    #[test]
    fn refuses_with_the_reason() {
        assert!(validate_node_id("").unwrap_err().contains("empty"));
        assert!(validate_node_id(&"x".repeat(MAX_NODE_ID_BYTES + 1)).unwrap_err().contains("limit is 128"));
        assert!(validate_node_id("a/b").unwrap_err().contains("'/'"));
        assert!(validate_node_id("a b").unwrap_err().contains("whitespace"));
        assert!(validate_node_id("a\0b").unwrap_err().contains("control"));
        assert!(validate_node_id("a\u{7f}").unwrap_err().contains("control"));
        assert!(validate_instance_id("a/b").unwrap_err().contains("the instance id \"a/b\" contains '/'"));
    }

    #[test]
    fn websocket_urls_live_beside_the_node_records_not_under_them() {
        assert_eq!(ws_prefix(DEFAULT_PREFIX), "/services/connect-node-ws/");
        assert_eq!(ws_prefix("/nodes"), "/nodes-ws/");
        assert!(!ws_prefix(DEFAULT_PREFIX).starts_with(DEFAULT_PREFIX));
    }
}
