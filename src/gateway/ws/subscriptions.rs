//! One event loop's subscription index: which of its connections hold which topic, both ways,
//! and which belong to which user (the `sub` of its token), both ways.
//!
//! Fan-out looks a topic or a user up to find its connections; acks and closing look a
//! connection up to find its topics and user. The hub's [`SharedCounts`] (shared by every loop,
//! read to answer "how many will get it") must move with these maps, so this is the one place
//! that edits any of them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::gateway::hub::{Counts, SharedCounts};
use crate::gateway::protocol::{self, Reject, TopicLimits};

/// The topics and users of one loop's connections, keyed by their slab keys.
pub(crate) struct Subscriptions {
    /// topic -> connections subscribed to it.
    by_topic: HashMap<Box<str>, HashSet<usize>>,
    /// connection -> its topics, in the order acks list them. No entry for a connection
    /// without topics.
    by_conn: HashMap<usize, Vec<Box<str>>>,
    /// user -> their connections on this loop.
    by_user: HashMap<Box<str>, HashSet<usize>>,
    /// connection -> its user. No entry for a connection not authenticated.
    user_of: HashMap<usize, Box<str>>,
    counts: Arc<SharedCounts>,
    limits: TopicLimits,
}

impl Subscriptions {
    pub(crate) fn new(counts: Arc<SharedCounts>, limits: TopicLimits) -> Subscriptions {
        Subscriptions {
            by_topic: HashMap::new(),
            by_conn: HashMap::new(),
            by_user: HashMap::new(),
            user_of: HashMap::new(),
            counts,
            limits,
        }
    }

    /// Records that connection `key` is `user`'s, once it has authenticated. A connection
    /// belongs to one user for its life: a second call naming another user is a bug (in a
    /// release build the connection moves to the new user, so the counts stay right).
    pub(crate) fn set_user(&mut self, key: usize, user: Box<str>) {
        if let Some(old) = self.user_of.get(&key) {
            debug_assert_eq!(*old, user, "connection {key} authenticated as a second user");
            if *old == user {
                return;
            }
            self.forget_user(key);
        }
        self.by_user.entry(user.clone()).or_default().insert(key);
        self.counts.users.add(&user);
        self.user_of.insert(key, user);
    }

    /// The connections of `user` on this loop.
    pub(crate) fn connections_of(&self, user: &str) -> Vec<usize> {
        self.by_user.get(user).map_or_else(Vec::new, |keys| keys.iter().copied().collect())
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
            self.counts.topics.add(&topic);
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
            Self::forget(&mut self.by_topic, &self.counts.topics, key, topic);
        }
        if held.is_empty() {
            self.by_conn.remove(&key);
        }
    }

    /// Removes every topic of `key`, and its user: it is closing or gone.
    pub(crate) fn remove_all(&mut self, key: usize) {
        for topic in self.by_conn.remove(&key).unwrap_or_default() {
            Self::forget(&mut self.by_topic, &self.counts.topics, key, &topic);
        }
        self.forget_user(key);
    }

    /// Takes `key` off its user's connections and the shared user counts.
    fn forget_user(&mut self, key: usize) {
        let Some(user) = self.user_of.remove(&key) else { return };
        Self::forget(&mut self.by_user, &self.counts.users, key, &user);
    }

    /// The topics `key` holds, oldest first except where unsubscribing moved the last one.
    pub(crate) fn topics(&self, key: usize) -> &[Box<str>] {
        self.by_conn.get(&key).map_or(&[], Vec::as_slice)
    }

    /// The connections subscribed to `topic`.
    pub(crate) fn subscribers(&self, topic: &str) -> Vec<usize> {
        self.by_topic.get(topic).map_or_else(Vec::new, |keys| keys.iter().copied().collect())
    }

    /// How many connections are subscribed to `topic`.
    pub(crate) fn subscriber_count(&self, topic: &str) -> usize {
        self.by_topic.get(topic).map_or(0, HashSet::len)
    }

    /// How many connections `user` has on this loop.
    pub(crate) fn connection_count(&self, user: &str) -> usize {
        self.by_user.get(user).map_or(0, HashSet::len)
    }

    /// Takes `key` off `name` (a topic or a user) in `index` and in `counts`.
    fn forget(index: &mut HashMap<Box<str>, HashSet<usize>>, counts: &Counts, key: usize, name: &str) {
        counts.remove(name);
        if let Some(keys) = index.get_mut(name) {
            keys.remove(&key);
            if keys.is_empty() {
                index.remove(name);
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
        assert_eq!(subs.counts.topics.get("a"), 2);

        subs.unsubscribe(1, &strings(&["a", "x"]));
        assert_eq!(subs.topics(1), [Box::from("b")]);
        assert_eq!(subs.subscribers("a"), [2]);
        assert_eq!(subs.counts.topics.get("a"), 1);

        subs.remove_all(1);
        subs.remove_all(2);
        assert!(subs.topics(1).is_empty());
        assert!(subs.subscribers("b").is_empty());
        assert_eq!((subs.counts.topics.get("a"), subs.counts.topics.get("b")), (0, 0));
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

    fn sorted(mut keys: Vec<usize>) -> Vec<usize> {
        keys.sort();
        keys
    }

    #[test]
    fn the_user_index_and_its_counts_move_together() {
        let mut subs = index();
        subs.set_user(1, "alice".into());
        subs.set_user(2, "alice".into());
        subs.set_user(3, "bob".into());
        subs.subscribe(3, strings(&["a"])).unwrap();
        // Authenticating again as the same user changes nothing.
        subs.set_user(1, "alice".into());
        assert_eq!(sorted(subs.connections_of("alice")), [1, 2]);
        assert_eq!(subs.connections_of("bob"), [3]);
        assert!(subs.connections_of("carol").is_empty());
        assert_eq!((subs.counts.users.get("alice"), subs.counts.users.get("bob")), (2, 1));
        // Users and topics are separate names: a user called like a topic is no subscriber.
        assert_eq!(subs.counts.topics.get("alice"), 0);

        subs.remove_all(1);
        assert_eq!(subs.connections_of("alice"), [2]);
        assert_eq!(subs.counts.users.get("alice"), 1);
        subs.remove_all(3);
        assert!(subs.connections_of("bob").is_empty());
        assert_eq!((subs.counts.users.get("bob"), subs.counts.topics.get("a")), (0, 0));
        subs.remove_all(2);
        // A connection without a user or topics leaves nothing behind either.
        subs.remove_all(4);
        assert!(subs.by_user.is_empty() && subs.user_of.is_empty() && subs.by_conn.is_empty());
        assert_eq!(subs.counts.users.get("alice"), 0);
    }

    #[test]
    #[cfg(not(debug_assertions))]
    fn a_second_user_moves_the_connection_in_release_builds() {
        let mut subs = index();
        subs.set_user(1, "alice".into());
        subs.set_user(1, "bob".into());
        assert!(subs.connections_of("alice").is_empty());
        assert_eq!(subs.connections_of("bob"), [1]);
        assert_eq!((subs.counts.users.get("alice"), subs.counts.users.get("bob")), (0, 1));
    }
}
