//! push-manager instances in etcd: `serve` registers `<instance-prefix><instance-id>` with an
//! [`InstanceRecord`], so that `send`, `bench` and `status` find a running instance given only
//! etcd, and say which one they took when there are several.

use serde::{Deserialize, Serialize};

use crate::etcd;

/// What an instance publishes: where to call it and where its admin endpoint is. A JSON object,
/// so that fields can be added without breaking older readers (unknown fields are ignored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// `host:port` of `protocol.PushServer`.
    pub addr: String,
    /// `http://host:port` of the admin endpoint; absent when it runs without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
}

impl InstanceRecord {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("two strings serialize")
    }
}

/// A registered instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub record: InstanceRecord,
}

/// Every instance registered under `prefix`, in key order, and a line for each key there that is
/// not one (so a caller can say why it found none).
pub fn list(client: &etcd::Client, prefix: &str) -> etcd::Result<(Vec<Instance>, Vec<String>)> {
    let mut instances = Vec::new();
    let mut bad = Vec::new();
    for kv in client.get_prefix(prefix)?.kvs {
        match parse(prefix, &kv.key, &kv.value) {
            Ok(instance) => instances.push(instance),
            Err(reason) => bad.push(format!("{}: {reason}", kv.key)),
        }
    }
    Ok((instances, bad))
}

fn parse(prefix: &str, key: &str, value: &[u8]) -> Result<Instance, String> {
    let id = key.strip_prefix(prefix).unwrap_or(key);
    super::validate_instance_id(id)?;
    let record: InstanceRecord =
        serde_json::from_slice(value).map_err(|e| format!("not an instance record ({{\"addr\":...}}): {e}"))?;
    crate::addr::validate_host_port(&record.addr)?;
    Ok(Instance { id: id.to_string(), record })
}

/// The instance to use: the one named `wanted`, else the first. The error names the prefix
/// and what is there instead.
pub fn choose(
    instances: Vec<Instance>,
    bad: &[String],
    prefix: &str,
    wanted: Option<&str>,
) -> Result<Instance, String> {
    let ids = || instances.iter().map(|i| i.id.as_str()).collect::<Vec<_>>().join(", ");
    if let Some(wanted) = wanted {
        return match instances.iter().find(|i| i.id == wanted) {
            Some(instance) => Ok(instance.clone()),
            None if instances.is_empty() => Err(none_registered(prefix, bad)),
            None => Err(format!("no push-manager instance {wanted:?} under {prefix:?}; registered: {}", ids())),
        };
    }
    instances.into_iter().next().ok_or_else(|| none_registered(prefix, bad))
}

fn none_registered(prefix: &str, bad: &[String]) -> String {
    let mut text = format!(
        "no push-manager instance is registered in etcd under {prefix:?} (is serve running, without \
         --no-register, with the same --etcd and --instance-prefix?)"
    );
    if !bad.is_empty() {
        text.push_str(&format!("; keys there that are not instance records: {}", bad.join("; ")));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/services/push-manager/";

    fn instance(id: &str) -> Instance {
        Instance { id: id.into(), record: InstanceRecord { addr: format!("{id}:50053"), admin: None } }
    }

    #[test]
    fn the_record_is_a_small_json_object_that_reads_back() {
        let record = InstanceRecord { addr: "h:50053".into(), admin: Some("http://h:9253".into()) };
        assert_eq!(record.to_json(), r#"{"addr":"h:50053","admin":"http://h:9253"}"#);
        let read = parse(P, "/services/push-manager/a", br#"{"addr":"h:50053","admin":"http://h:9253","x":1}"#);
        assert_eq!(read.unwrap().record, record);
        let without_admin = InstanceRecord { admin: None, ..record };
        assert_eq!(without_admin.to_json(), r#"{"addr":"h:50053"}"#);
    }

    #[test]
    fn bad_records_say_why() {
        assert!(parse(P, "/services/push-manager/a", b"h:1").unwrap_err().contains("not an instance record"));
        assert!(parse(P, "/services/push-manager/a", br#"{"addr":"h"}"#).unwrap_err().contains("not host:port"));
        assert!(parse(P, "/services/push-manager/a/b", br#"{"addr":"h:1"}"#).unwrap_err().contains("'/'"));
    }

    #[test]
    fn choosing_takes_the_named_or_the_first_and_explains_none() {
        let two = vec![instance("a"), instance("b")];
        assert_eq!(choose(two.clone(), &[], P, None).unwrap().id, "a");
        assert_eq!(choose(two.clone(), &[], P, Some("b")).unwrap().id, "b");
        let err = choose(two, &[], P, Some("c")).unwrap_err();
        assert!(err.contains("no push-manager instance \"c\"") && err.contains("registered: a, b"), "{err}");
        let err = choose(vec![], &["/services/push-manager/x: junk".into()], P, None).unwrap_err();
        assert!(err.contains(P) && err.contains("x: junk"), "{err}");
    }
}
