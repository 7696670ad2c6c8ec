//! Generated protobuf messages and grpcio stubs (see `build.rs`): `protocol` is push-manager's
//! public API and the connect-node service; `kv`/`rpc` are the trimmed etcd v3 API; `health`,
//! `reflection_v1` and `reflection_v1alpha` describe the other services our gRPC servers host,
//! for [`crate::reflection`]. Plus the one way to build a broadcast or a push to users (shared by
//! `send`, the demo, the tests and the benchmarks) and the one rule each must follow (applied by
//! `PushServer` and again by `ConnectNode`, so nothing reaches users that push-manager would
//! have refused).

include!(concat!(env!("OUT_DIR"), "/mod.rs"));

use self::protocol::{BroadCastReq, Proto, PushUsersReq};

/// Longest user id, in bytes: the limit on a connection token's `sub`.
pub const MAX_USER_ID_BYTES: usize = 256;

/// Highest `--max-push-users` either role accepts: a push to more users than this belongs in
/// several requests (or a topic).
pub const MAX_PUSH_USERS_LIMIT: usize = 100_000;

/// A broadcast as business servers send it: frame version 1, `op` both in the frame and as
/// `protoOp` (goim's clients read either), to `topic` (`""` for every connected user).
pub fn broadcast_request(topic: &str, op: i32, seq: i32, body: impl Into<Vec<u8>>) -> BroadCastReq {
    let mut proto = Proto::new();
    proto.set_ver(1);
    proto.set_op(op);
    proto.set_seq(seq);
    proto.set_body(body.into());
    let mut req = BroadCastReq::new();
    req.set_protoOp(op);
    req.set_topic(topic.into());
    req.set_proto(proto);
    req
}

/// A push to every connection of `user_ids`, frame version 1, as business servers send it.
pub fn push_users_request(user_ids: &[&str], op: i32, seq: i32, body: impl Into<Vec<u8>>) -> PushUsersReq {
    let mut req = PushUsersReq::new();
    req.set_user_ids(user_ids.iter().map(|id| id.to_string()).collect());
    req.set_proto(broadcast_request("", op, seq, body).take_proto());
    req
}

/// What push-manager sends connect-nodes for a `PushUsers` request that passed
/// [`validate_push_users`]: its proto (`op` also as `protoOp`, as in [`broadcast_request`]),
/// no topic, and each id once, in the order first given.
pub(crate) fn users_broadcast(req: &PushUsersReq) -> BroadCastReq {
    let mut out = BroadCastReq::new();
    out.set_protoOp(req.get_proto().get_op());
    out.set_proto(req.get_proto().clone());
    out.set_user_ids(dedup_user_ids(req.get_user_ids()).into_iter().map(String::from).collect());
    out
}

/// What a message to nodes is, for log lines: a broadcast to a topic or to everyone, or a push
/// to users.
pub(crate) fn describe_message(req: &BroadCastReq) -> String {
    let body = req.get_proto().get_body().len();
    match (req.get_user_ids().len(), req.get_topic()) {
        (0, "") => format!("broadcast to every user ({body} bytes)"),
        (0, topic) => format!("broadcast to topic {topic:?} ({body} bytes)"),
        (users, _) => format!("push to {users} user(s) ({body} bytes)"),
    }
}

/// `ids` without repeats, in the order each first appears.
pub(crate) fn dedup_user_ids(ids: &[String]) -> Vec<&str> {
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    ids.iter().map(String::as_str).filter(|id| seen.insert(*id)).collect()
}

/// Why a broadcast is refused by `PushServer.Broadcast`, as the caller will read it: `proto` is
/// required, its body at most `max_body_bytes`, the topic empty (everyone) or a topic as
/// [`crate::topic`] defines it, and `user_ids` unset (that is [`validate_push_users`]'s way).
pub fn validate_broadcast(req: &BroadCastReq, max_body_bytes: usize) -> Result<(), String> {
    if !req.get_user_ids().is_empty() {
        return Err("user_ids is set by push-manager on its way to nodes; call PushServer.PushUsers".into());
    }
    validate_proto(req.has_proto().then(|| req.get_proto()), "BroadCastReq", max_body_bytes)?;
    match req.get_topic() {
        "" => Ok(()),
        topic => crate::topic::validate(topic, crate::topic::MAX_TOPIC_BYTES),
    }
}

/// Why `PushServer.PushUsers` refuses a request: the ids as [`validate_user_ids`] wants them,
/// and `proto` as a broadcast's.
pub fn validate_push_users(req: &PushUsersReq, max_body_bytes: usize, max_users: usize) -> Result<(), String> {
    validate_user_ids(req.get_user_ids(), max_users)?;
    validate_proto(req.has_proto().then(|| req.get_proto()), "PushUsersReq", max_body_bytes)
}

/// Why a connect-node refuses a message from push-manager: one without `user_ids` by
/// [`validate_broadcast`]'s rule, one with them by [`validate_push_users`]'s, and no topic.
pub fn validate_node_message(req: &BroadCastReq, max_body_bytes: usize, max_users: usize) -> Result<(), String> {
    if req.get_user_ids().is_empty() {
        return validate_broadcast(req, max_body_bytes);
    }
    if !req.get_topic().is_empty() {
        return Err("topic must be empty when user_ids is set: a push to users ignores topics".into());
    }
    validate_user_ids(req.get_user_ids(), max_users)?;
    validate_proto(req.has_proto().then(|| req.get_proto()), "BroadCastReq", max_body_bytes)
}

/// Why a list of user ids is refused: it must hold 1 to `max` ids (`--max-push-users`), each
/// as a connection token's `sub` must be: 1 to [`MAX_USER_ID_BYTES`] bytes, without whitespace
/// or control characters. An id listed twice is no error.
pub fn validate_user_ids(ids: &[String], max: usize) -> Result<(), String> {
    if ids.is_empty() {
        return Err("user_ids is empty: name at least one user".into());
    }
    if ids.len() > max {
        return Err(format!("user_ids holds {} ids; the limit is {max} (--max-push-users)", ids.len()));
    }
    for (i, id) in ids.iter().enumerate() {
        check_user_id(id).map_err(|why| format!("user_ids[{i}]: {why}"))?;
    }
    Ok(())
}

/// The one rule for a user id, in `PushUsers` and as a connection token's `sub`: 1 to
/// [`MAX_USER_ID_BYTES`] bytes, no whitespace or control characters (it is printed in logs).
pub fn check_user_id(id: &str) -> Result<(), String> {
    crate::topic::check_name("user id", id, MAX_USER_ID_BYTES)
}

/// The body rule shared by every request: `proto` is required and its body at most
/// `max_body_bytes`. `message` names the request type in the refusal.
fn validate_proto(proto: Option<&Proto>, message: &str, max_body_bytes: usize) -> Result<(), String> {
    let Some(proto) = proto else {
        return Err(format!("proto is required: {message}.proto carries the body to deliver"));
    };
    let body = proto.get_body().len();
    if body > max_body_bytes {
        return Err(format!("proto.body is {body} bytes; the limit is {max_body_bytes} (--max-message-bytes)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::MAX_TOPIC_BYTES;

    fn req(topic: &str, body: usize) -> BroadCastReq {
        broadcast_request(topic, 1, 0, vec![0; body])
    }

    #[test]
    fn accepts_plain_requests() {
        validate_broadcast(&req("", 10), 10).unwrap();
        validate_broadcast(&req("room-1/a.b", 0), 10).unwrap();
        validate_broadcast(&req(&"t".repeat(MAX_TOPIC_BYTES), 0), 10).unwrap();
    }

    #[test]
    fn refuses_with_a_reason() {
        assert!(validate_broadcast(&BroadCastReq::new(), 10).unwrap_err().contains("proto is required"));
        assert!(validate_broadcast(&req("", 11), 10).unwrap_err().contains("--max-message-bytes"));
        let long = req(&"t".repeat(MAX_TOPIC_BYTES + 1), 0);
        assert!(validate_broadcast(&long, 10).unwrap_err().contains("longer than 128 bytes"));
        assert!(validate_broadcast(&req("a b", 0), 10).unwrap_err().contains("whitespace"));
        assert!(validate_broadcast(&req("a\u{7}", 0), 10).unwrap_err().contains("control"));
        let mut with_users = req("", 0);
        with_users.set_user_ids(vec!["alice".to_string()].into());
        assert!(validate_broadcast(&with_users, 10).unwrap_err().contains("call PushServer.PushUsers"));
    }

    fn ids(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|id| id.to_string()).collect()
    }

    #[test]
    fn user_ids_follow_the_rule_of_a_tokens_sub() {
        validate_user_ids(&ids(&["alice", "bob", "alice", "ünï:42/x"]), 4).unwrap();
        validate_user_ids(&[("u".repeat(MAX_USER_ID_BYTES))], 1).unwrap();
        let refused = |list: &[String], max| validate_user_ids(list, max).unwrap_err();
        assert_eq!(refused(&[], 4), "user_ids is empty: name at least one user");
        assert_eq!(refused(&ids(&["a", "b", "c"]), 2), "user_ids holds 3 ids; the limit is 2 (--max-push-users)");
        assert_eq!(refused(&ids(&["a", ""]), 4), "user_ids[1]: empty user id");
        assert_eq!(
            refused(&ids(&["a", "b", "c", &"u".repeat(257)]), 4),
            "user_ids[3]: user id longer than 256 bytes (257 bytes)"
        );
        assert!(refused(&ids(&["al ice"]), 4).starts_with("user_ids[0]: user id contains ' ': whitespace"));
        assert!(refused(&ids(&["a", "b\tc"]), 4).starts_with("user_ids[1]: user id contains '\\t'"));
        assert!(refused(&ids(&["a\u{0}"]), 4).contains("control characters are not allowed"));
        assert!(refused(&ids(&["a\u{a0}"]), 4).contains("whitespace"), "a no-break space is whitespace too");
    }

    #[test]
    fn a_push_to_users_needs_a_proto_within_the_body_limit() {
        validate_push_users(&push_users_request(&["a"], 1, 0, vec![0; 10]), 10, 1).unwrap();
        let refused = |req: &PushUsersReq| validate_push_users(req, 10, 1).unwrap_err();
        assert!(refused(&push_users_request(&["a"], 1, 0, vec![0; 11])).contains("--max-message-bytes"));
        let mut no_proto = push_users_request(&["a"], 1, 0, "x");
        no_proto.clear_proto();
        assert_eq!(refused(&no_proto), "proto is required: PushUsersReq.proto carries the body to deliver");
        assert!(refused(&push_users_request(&["a", "b"], 1, 0, "x")).contains("--max-push-users"));
    }

    #[test]
    fn a_push_to_users_travels_with_each_id_once_and_no_topic() {
        let msg = users_broadcast(&push_users_request(&["b", "a", "b", "c", "a"], 7, 3, "hi"));
        assert_eq!(msg.get_user_ids(), ["b", "a", "c"]);
        assert_eq!((msg.get_topic(), msg.get_protoOp(), msg.get_proto().get_seq()), ("", 7, 3));
        assert_eq!(msg.get_proto().get_body(), b"hi");
        validate_node_message(&msg, 10, 3).unwrap();
    }

    #[test]
    fn a_node_checks_a_message_by_its_audience() {
        validate_node_message(&req("room", 1), 10, 1).unwrap();
        assert!(validate_node_message(&req("a b", 1), 10, 1).unwrap_err().contains("whitespace"));
        let mut users = req("", 1);
        users.set_user_ids(ids(&["a", "b"]).into());
        validate_node_message(&users, 10, 2).unwrap();
        assert!(validate_node_message(&users, 10, 1).unwrap_err().contains("--max-push-users"));
        assert!(validate_node_message(&users, 0, 2).unwrap_err().contains("--max-message-bytes"));
        users.set_topic("room".into());
        assert!(validate_node_message(&users, 10, 2).unwrap_err().contains("topic must be empty"));
        users.set_topic(String::new());
        users.set_user_ids(ids(&["a", "b c"]).into());
        assert!(validate_node_message(&users, 10, 2).unwrap_err().starts_with("user_ids[1]:"));
    }
}
