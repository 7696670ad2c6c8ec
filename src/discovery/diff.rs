//! The difference between the node set we run and the one etcd describes.

use std::collections::BTreeMap;

/// Node id -> gRPC address.
pub type NodeAddrs = BTreeMap<String, String>;

/// What to do to turn the current set into the desired one.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// New ids, with their address.
    pub add: Vec<(String, String)>,
    /// Ids that are gone.
    pub remove: Vec<String>,
    /// Ids whose address changed, with the new address.
    pub replace: Vec<(String, String)>,
    /// Ids that stay as they are.
    pub keep: Vec<String>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty() && self.replace.is_empty()
    }
}

pub fn diff(current: &NodeAddrs, desired: &NodeAddrs) -> Diff {
    let mut d = Diff::default();
    for (id, addr) in desired {
        match current.get(id) {
            None => d.add.push((id.clone(), addr.clone())),
            Some(old) if old != addr => d.replace.push((id.clone(), addr.clone())),
            Some(_) => d.keep.push(id.clone()),
        }
    }
    d.remove = current.keys().filter(|id| !desired.contains_key(*id)).cloned().collect();
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> NodeAddrs {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn add_remove_replace_keep() {
        let current = set(&[("a", "h:1"), ("b", "h:2"), ("c", "h:3")]);
        let desired = set(&[("a", "h:1"), ("c", "h:33"), ("d", "h:4")]);
        let d = diff(&current, &desired);
        assert_eq!(d.add, vec![("d".to_string(), "h:4".to_string())]);
        assert_eq!(d.remove, vec!["b".to_string()]);
        assert_eq!(d.replace, vec![("c".to_string(), "h:33".to_string())]);
        assert_eq!(d.keep, vec!["a".to_string()]);
        assert!(!d.is_empty());
    }

    #[test]
    fn same_set_is_empty() {
        let s = set(&[("a", "h:1")]);
        assert!(diff(&s, &s).is_empty());
        assert!(diff(&NodeAddrs::new(), &NodeAddrs::new()).is_empty());
    }

    #[test]
    fn from_and_to_nothing() {
        let s = set(&[("a", "h:1"), ("b", "h:2")]);
        assert_eq!(diff(&NodeAddrs::new(), &s).add.len(), 2);
        assert_eq!(diff(&s, &NodeAddrs::new()).remove.len(), 2);
    }
}
