//! One event loop's subscription index: which of its connections hold which topic, both ways.
//!
//! Fan-out looks a topic up to find its connections; acks and closing look a connection up to
//! find its topics. The hub's [`TopicCounts`] (shared by every loop, read to answer "how many
//! will get it") must move with both maps, so this is the one place that edits any of them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::gateway::hub::TopicCounts;
use crate::gateway::protocol::{self, Reject, TopicLimits};

/// The topics of one loop's connections, keyed by their slab keys.
pub(crate) struct Subscriptions {
    /// topic -> connections subscribed to it.
    by_topic: HashMap<Box<str>, HashSet<usize>>,
    /// connection -> its topics, in the order acks list them. No entry for a connection
    /// without topics.
    by_conn: HashMap<usize, Vec<Box<str>>>,
    counts: Arc<TopicCounts>,
    limits: TopicLimits,
}

impl Subscriptions {
    pub(crate) fn new(counts: Arc<TopicCounts>, limits: TopicLimits) -> Subscriptions {
        Subscriptions { by_topic: HashMap::new(), by_conn: HashMap::new(), counts, limits }
    }

    /// Adds the topics `key` does not hold yet, or none of them if it would then hold more
    /// than `max_per_connection`.
    pub(crate) fn subscribe(&mut self, key: usize, topics: Vec<String>) -> Result<(), Reject> {
        let held = self.topics(key);
        let mut new: Vec<String> = Vec::new();
        for topic in topics {
            if !held.iter().any(|t| **t == *topic) && !new.contains(&topic) {
                new.push(topic);
            }
        }
        let total = held.len() + new.len();
        if total > self.limits.max_per_connection {
            return Err(protocol::too_many_topics(total, self.limits));
        }
        if new.is_empty() {
            return Ok(());
        }
        let held = self.by_conn.entry(key).or_default();
        for topic in new {
            let topic: Box<str> = topic.into();
            self.by_topic.entry(topic.clone()).or_default().insert(key);
            self.counts.add(&topic);
            held.push(topic);
        }
        Ok(())
    }

    /// Removes the topics `key` holds among `topics`; the others are no error.
    pub(crate) fn unsubscribe(&mut self, key: usize, topics: &[String]) {
        let Some(held) = self.by_conn.get_mut(&key) else { return };
        for topic in topics {
            let Some(pos) = held.iter().position(|t| **t == **topic) else { continue };
            held.swap_remove(pos);
            Self::forget(&mut self.by_topic, &self.counts, key, topic);
        }
        if held.is_empty() {
            self.by_conn.remove(&key);
        }
    }

    /// Removes every topic of `key`: it is closing or gone.
    pub(crate) fn remove_all(&mut self, key: usize) {
        for topic in self.by_conn.remove(&key).unwrap_or_default() {
            Self::forget(&mut self.by_topic, &self.counts, key, &topic);
        }
    }

    /// The topics `key` holds, oldest first except where unsubscribing moved the last one.
    pub(crate) fn topics(&self, key: usize) -> &[Box<str>] {
        self.by_conn.get(&key).map_or(&[], Vec::as_slice)
    }

    /// The connections subscribed to `topic`.
    pub(crate) fn subscribers(&self, topic: &str) -> Vec<usize> {
        self.by_topic.get(topic).map_or_else(Vec::new, |keys| keys.iter().copied().collect())
    }

    /// Notes that `key` is `user`'s connection. Kept in the connection's `Access` only, until
    /// the user index for PushUsers lands here.
    pub(crate) fn set_user(&mut self, key: usize, user: Box<str>) {
        let _ = (key, user);
    }

    /// Takes `key` off `topic` in the topic map and the shared counts.
    fn forget(by_topic: &mut HashMap<Box<str>, HashSet<usize>>, counts: &TopicCounts, key: usize, topic: &str) {
        counts.remove(topic);
        if let Some(keys) = by_topic.get_mut(topic) {
            keys.remove(&key);
            if keys.is_empty() {
                by_topic.remove(topic);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> Subscriptions {
        Subscriptions::new(Arc::default(), TopicLimits { max_len: 8, max_per_connection: 2 })
    }

    fn strings(topics: &[&str]) -> Vec<String> {
        topics.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn both_maps_and_the_counts_move_together() {
        let mut subs = index();
        subs.subscribe(1, strings(&["a", "b", "a"])).unwrap();
        subs.subscribe(2, strings(&["a"])).unwrap();
        assert_eq!(subs.topics(1), [Box::from("a"), Box::from("b")]);
        let mut a = subs.subscribers("a");
        a.sort();
        assert_eq!(a, [1, 2]);
        assert_eq!(subs.counts.get("a"), 2);

        subs.unsubscribe(1, &strings(&["a", "x"]));
        assert_eq!(subs.topics(1), [Box::from("b")]);
        assert_eq!(subs.subscribers("a"), [2]);
        assert_eq!(subs.counts.get("a"), 1);

        subs.remove_all(1);
        subs.remove_all(2);
        assert!(subs.topics(1).is_empty());
        assert!(subs.subscribers("b").is_empty());
        assert_eq!((subs.counts.get("a"), subs.counts.get("b")), (0, 0));
        assert!(subs.by_topic.is_empty() && subs.by_conn.is_empty());
    }

    #[test]
    fn a_subscribe_past_the_limit_adds_nothing() {
        let mut subs = index();
        subs.subscribe(1, strings(&["a"])).unwrap();
        let reject = subs.subscribe(1, strings(&["b", "c"])).unwrap_err();
        assert!(reject.reason.starts_with("too many topics: 3 > 2"), "{}", reject.reason);
        assert_eq!(subs.topics(1), [Box::from("a")]);
        subs.subscribe(1, strings(&["a", "b"])).unwrap();
        assert_eq!(subs.topics(1).len(), 2);
    }
}
