//! Puts each sender's broadcasts back in the order it numbered them, and applies each once.
//!
//! push-manager sends to a node over several calls at once and retries calls that failed or
//! timed out, so batches can arrive out of order, and a batch the node applied can come again.
//! Each push-manager instance numbers what it sends to this node (a `Sequence` on the batch);
//! per sender, the sequencer publishes message `next` and whatever it holds right behind it,
//! holds messages that arrive ahead of a gap, and acknowledges without publishing what it has
//! already applied or holds. A gap is skipped (counted, logged) when the sender says it gave up
//! on it (its low water mark has passed it), when it has been open for `hold`, or when
//! `hold_messages` wait behind it; a message of a skipped gap that arrives later is dropped as a
//! duplicate, since delivering it then would break the order.
//!
//! An unknown sender (a new push-manager instance, or any sender after this node restarted)
//! starts at its low water mark at once: nothing below it is still on the way. Senders idle for
//! [`FORGET_IDLE_SENDER`] are forgotten, so restarts of push-manager do not add up.
//!
//! Publishing happens under the sender's lock, which is what keeps the order; it never blocks
//! (the hub only queues). What one call releases is published as one batch, so that a batch
//! from push-manager stays one batch on the way to the event loops. Time is passed in, so the rules are tested without clocks.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use parking_lot::Mutex;

use super::stats::Stats;
use crate::proto::protocol::{BroadCastReq, Sequence};

/// A sender that sent nothing for this long is forgotten (unless it has messages held, which the
/// hold time releases first). Far longer than any retry schedule: a sender that comes back after
/// it starts again at its low water mark, which is where it would have been anyway.
pub(crate) const FORGET_IDLE_SENDER: Duration = Duration::from_secs(600);

/// Longest sender id accepted, in bytes (push-manager's are 12).
pub(crate) const MAX_SENDER_BYTES: usize = 64;

/// How long, and how many messages, may wait for a gap to fill.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HoldLimits {
    /// `Config::reorder_hold`.
    pub(crate) time: Duration,
    /// `Config::reorder_hold_messages`, per sender.
    pub(crate) messages: usize,
}

/// Why a sequence is refused, for INVALID_ARGUMENT.
pub(crate) fn validate(sequence: &Sequence, messages: usize) -> Result<(), String> {
    let sender = sequence.get_sender().len();
    if !(1..=MAX_SENDER_BYTES).contains(&sender) {
        return Err(format!("sequence.sender is {sender} bytes; it must be 1 to {MAX_SENDER_BYTES}"));
    }
    let seqs = sequence.get_seqs().len();
    if seqs != messages {
        return Err(format!("sequence.seqs has {seqs} numbers for {messages} messages; it needs one per message"));
    }
    Ok(())
}

/// One sender's place in its stream.
struct SenderState {
    /// The number to publish next: everything below is published or skipped.
    next: u64,
    /// Messages that arrived ahead of `next`, by number.
    held: BTreeMap<u64, BroadCastReq>,
    /// When the gap in front of `held` opened (the oldest of `held` is at least this old).
    gap_since: Option<Instant>,
    last_seen: Instant,
}

/// Why a gap was skipped, for the log.
#[derive(Debug, Clone, Copy)]
enum SkipReason {
    SenderGaveUp,
    HoldTime,
    HoldMessages,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SkipReason::SenderGaveUp => "the sender gave up on them",
            SkipReason::HoldTime => "they did not come within --reorder-hold",
            SkipReason::HoldMessages => "--reorder-hold-messages messages waited behind them",
        })
    }
}

/// What the rules act on for one sender: its state, the counters, and where released messages go.
struct Apply<'a, P: FnMut(&[BroadCastReq]) -> u64> {
    state: &'a mut SenderState,
    sender: &'a [u8],
    stats: &'a Stats,
    publish: P,
    now: Instant,
    /// Released in this call, in order, published together by [`Apply::finish`].
    released: Vec<BroadCastReq>,
    /// Deliveries the hub reported for what was published.
    delivered: u64,
}

impl<'a, P: FnMut(&[BroadCastReq]) -> u64> Apply<'a, P> {
    fn new(state: &'a mut SenderState, sender: &'a [u8], stats: &'a Stats, publish: P, now: Instant) -> Self {
        Apply { state, sender, stats, publish, now, released: Vec::new(), delivered: 0 }
    }

    fn publish(&mut self, msg: BroadCastReq) {
        self.released.push(msg);
    }

    /// Publishes what was released, still under the sender's lock: the order is kept.
    fn finish(mut self) -> u64 {
        if !self.released.is_empty() {
            self.delivered += (self.publish)(&self.released);
        }
        self.delivered
    }

    /// Publishes what is held right behind `next`, and restarts the gap clock for what remains.
    fn release(&mut self) {
        let mut released = false;
        while let Some(entry) = self.state.held.first_entry() {
            if *entry.key() != self.state.next {
                break;
            }
            let msg = entry.remove();
            self.publish(msg);
            self.state.next += 1;
            released = true;
        }
        if self.state.held.is_empty() {
            self.state.gap_since = None;
        } else if released {
            self.state.gap_since = Some(self.now);
        }
    }

    /// Moves `next` up to `to`: publishes, in order, what is held below it, and counts the rest
    /// as skipped (before publishing what follows them, so whoever has seen what follows sees
    /// the skip counted); then releases what follows `to`.
    fn skip_to(&mut self, to: u64, reason: SkipReason) {
        let mut skipped = 0;
        while self.state.next < to {
            match self.state.held.first_key_value() {
                Some((&seq, _)) if seq == self.state.next => {
                    let msg = self.state.held.remove(&seq).expect("just seen");
                    self.publish(msg);
                    self.state.next += 1;
                }
                first => {
                    let resume = first.map_or(to, |(&seq, _)| seq.min(to));
                    let gap = resume - self.state.next;
                    self.stats.skipped_messages.fetch_add(gap, std::sync::atomic::Ordering::Relaxed);
                    skipped += gap;
                    self.state.next = resume;
                }
            }
        }
        if skipped > 0 {
            warn!("sender {}: skipped {skipped} message(s) before number {to}: {reason}", hex::encode(self.sender));
        }
        self.release();
    }

    fn take(&mut self, seq: u64, msg: BroadCastReq) {
        if seq < self.state.next || self.state.held.contains_key(&seq) {
            Stats::inc(&self.stats.duplicate_messages);
        } else if seq == self.state.next {
            self.publish(msg);
            self.state.next += 1;
            self.release();
        } else {
            self.state.held.insert(seq, msg);
            Stats::inc(&self.stats.held_messages);
            self.state.gap_since.get_or_insert(self.now);
        }
    }
}

/// Each sender's state behind a lock of its own, so senders do not wait on one another.
type Senders = HashMap<Box<[u8]>, Arc<Mutex<SenderState>>>;

/// Every known sender's state; shared by the gRPC service and the `seq-sweep` thread.
pub(crate) struct Sequencer {
    senders: Mutex<Senders>,
    limits: HoldLimits,
    stats: Arc<Stats>,
}

impl Sequencer {
    pub(crate) fn new(limits: HoldLimits, stats: Arc<Stats>) -> Sequencer {
        Sequencer { senders: Mutex::new(HashMap::new()), limits, stats }
    }

    /// How often the sweep should run: often enough that a gap is skipped within a quarter of
    /// the hold time past it, at most every 100 ms.
    pub(crate) fn sweep_interval(&self) -> Duration {
        (self.limits.time / 4).clamp(Duration::from_millis(1), Duration::from_millis(100))
    }

    /// Applies one validated batch (`sequence.seqs[i]` numbers `messages[i]`): publishes what is
    /// next in its sender's order (and what that releases), holds what is ahead, drops what was
    /// applied already. Returns the deliveries `publish` reported.
    pub(crate) fn apply(
        &self,
        sequence: &Sequence,
        messages: Vec<BroadCastReq>,
        now: Instant,
        publish: impl FnMut(&[BroadCastReq]) -> u64,
    ) -> u64 {
        let sender = sequence.get_sender();
        let low_water = sequence.get_low_water();
        let state = {
            let mut senders = self.senders.lock();
            match senders.get(sender) {
                Some(state) => state.clone(),
                None => {
                    info!("sender {}: new, starting at number {low_water}", hex::encode(sender));
                    let state = SenderState { next: low_water, held: BTreeMap::new(), gap_since: None, last_seen: now };
                    let state = Arc::new(Mutex::new(state));
                    senders.insert(sender.into(), state.clone());
                    state
                }
            }
        };
        // The map's lock is not held while publishing; a sender forgotten meanwhile (idle for
        // ten minutes, then this batch) is applied here and starts afresh with its next batch.
        let mut state = state.lock();
        state.last_seen = now;
        let mut apply = Apply::new(&mut state, sender, &self.stats, publish, now);
        if low_water > apply.state.next {
            apply.skip_to(low_water, SkipReason::SenderGaveUp);
        }
        for (&seq, msg) in sequence.get_seqs().iter().zip(messages) {
            apply.take(seq, msg);
        }
        self.enforce_message_limit(&mut apply);
        apply.finish()
    }

    fn enforce_message_limit<P: FnMut(&[BroadCastReq]) -> u64>(&self, apply: &mut Apply<'_, P>) {
        while apply.state.held.len() > self.limits.messages {
            let first = *apply.state.held.keys().next().expect("more than the limit, so not empty");
            apply.skip_to(first, SkipReason::HoldMessages);
        }
    }

    /// Skips every gap open for the hold time (publishing what waited behind it) and forgets
    /// senders idle for [`FORGET_IDLE_SENDER`].
    pub(crate) fn sweep(&self, now: Instant, mut publish: impl FnMut(&[BroadCastReq]) -> u64) {
        let mut senders = self.senders.lock();
        senders.retain(|sender, state| {
            let mut state = state.lock();
            if state.gap_since.is_some_and(|since| now.saturating_duration_since(since) >= self.limits.time) {
                let first = *state.held.keys().next().expect("a gap has something held behind it");
                let mut apply = Apply::new(&mut state, sender, &self.stats, &mut publish, now);
                apply.skip_to(first, SkipReason::HoldTime);
                apply.finish();
            }
            let idle = state.held.is_empty() && now.saturating_duration_since(state.last_seen) >= FORGET_IDLE_SENDER;
            if idle {
                info!("sender {}: idle for {FORGET_IDLE_SENDER:?}, forgotten", hex::encode(sender));
            }
            !idle
        });
    }

    /// Messages held now, over all senders.
    pub(crate) fn held_now(&self) -> usize {
        let senders: Vec<_> = self.senders.lock().values().cloned().collect();
        senders.iter().map(|s| s.lock().held.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    const HOLD: Duration = Duration::from_secs(1);

    /// A sequencer publishing into a list of bodies, with a clock the test moves.
    struct Fixture {
        seq: Sequencer,
        published: Vec<String>,
        now: Instant,
    }

    impl Fixture {
        fn new(hold_messages: usize) -> Fixture {
            let limits = HoldLimits { time: HOLD, messages: hold_messages };
            Fixture {
                seq: Sequencer::new(limits, Arc::new(Stats::default())),
                published: Vec::new(),
                now: Instant::now(),
            }
        }

        /// Sends `seqs` from `sender` with `low_water`; returns the deliveries reported.
        fn send(&mut self, sender: &[u8], seqs: &[u64], low_water: u64) -> u64 {
            let mut sequence = Sequence::new();
            sequence.set_sender(sender.to_vec());
            sequence.set_seqs(seqs.to_vec());
            sequence.set_low_water(low_water);
            let messages = seqs.iter().map(|s| body(&format!("{}{s}", sender[0] as char))).collect();
            validate(&sequence, seqs.len()).unwrap();
            let published = &mut self.published;
            self.seq.apply(&sequence, messages, self.now, |batch| {
                published.extend(batch.iter().map(|m| String::from_utf8(m.get_proto().get_body().to_vec()).unwrap()));
                batch.len() as u64
            })
        }

        fn sweep(&mut self) {
            let published = &mut self.published;
            self.seq.sweep(self.now, |batch| {
                published.extend(batch.iter().map(|m| String::from_utf8(m.get_proto().get_body().to_vec()).unwrap()));
                batch.len() as u64
            });
        }

        fn take(&mut self) -> Vec<String> {
            std::mem::take(&mut self.published)
        }

        fn counters(&self) -> (u64, u64, u64) {
            let s = &self.seq.stats;
            (s.held_messages.load(Relaxed), s.duplicate_messages.load(Relaxed), s.skipped_messages.load(Relaxed))
        }
    }

    fn body(text: &str) -> BroadCastReq {
        crate::proto::broadcast_request("t", 1, 0, text)
    }

    fn names(prefix: char, seqs: impl IntoIterator<Item = u64>) -> Vec<String> {
        seqs.into_iter().map(|s| format!("{prefix}{s}")).collect()
    }

    #[test]
    fn batches_out_of_order_are_published_in_order() {
        let mut f = Fixture::new(100);
        assert_eq!(f.send(b"a", &[0, 1], 0), 2);
        assert_eq!(f.send(b"a", &[4, 5], 2), 0, "held: nothing published by this call");
        assert_eq!(f.send(b"a", &[2, 3], 2), 4, "the gap and what it released");
        assert_eq!(f.take(), names('a', 0..6));
        assert_eq!(f.counters(), (2, 0, 0));
        assert_eq!(f.seq.held_now(), 0);
    }

    #[test]
    fn retries_of_applied_or_held_messages_are_dropped() {
        let mut f = Fixture::new(100);
        f.send(b"a", &[0, 1], 0);
        f.send(b"a", &[3], 0);
        f.send(b"a", &[0, 1], 0);
        f.send(b"a", &[3], 0);
        f.send(b"a", &[2], 0);
        assert_eq!(f.take(), names('a', 0..4));
        assert_eq!(f.counters(), (1, 3, 0));
    }

    #[test]
    fn a_gap_open_past_the_hold_time_is_skipped_without_further_traffic() {
        let mut f = Fixture::new(100);
        f.send(b"a", &[0], 0);
        f.send(b"a", &[2, 3], 1);
        f.now += HOLD / 2;
        f.sweep();
        assert_eq!(f.take(), names('a', [0]), "still within the hold time");
        f.now += HOLD / 2;
        f.sweep();
        assert_eq!(f.take(), names('a', [2, 3]));
        assert_eq!(f.counters(), (2, 0, 1));
        f.send(b"a", &[1], 1);
        assert!(f.take().is_empty(), "a message of a skipped gap comes too late");
        assert_eq!(f.counters(), (2, 1, 1));
    }

    #[test]
    fn the_hold_clock_restarts_for_the_next_gap() {
        let mut f = Fixture::new(100);
        f.send(b"a", &[1], 0);
        f.send(b"a", &[3], 0);
        f.now += HOLD - Duration::from_millis(1);
        f.send(b"a", &[0], 0);
        assert_eq!(f.take(), names('a', [0, 1]));
        f.now += HOLD / 2;
        f.sweep();
        assert!(f.take().is_empty(), "3 has waited for its own gap only half the hold time");
        f.now += HOLD / 2;
        f.sweep();
        assert_eq!(f.take(), names('a', [3]));
    }

    #[test]
    fn the_low_water_mark_skips_what_the_sender_gave_up_on_at_once() {
        let mut f = Fixture::new(100);
        f.send(b"a", &[0], 0);
        f.send(b"a", &[3], 1);
        f.send(b"a", &[2], 1);
        // 1 failed for good at the sender: its next call says so.
        f.send(b"a", &[4], 2);
        assert_eq!(f.take(), names('a', [0, 2, 3, 4]));
        assert_eq!(f.counters(), (2, 0, 1));
    }

    #[test]
    fn too_many_held_messages_skip_the_gap() {
        let mut f = Fixture::new(3);
        f.send(b"a", &[0], 0);
        f.send(b"a", &[2, 3, 4], 1);
        assert_eq!(f.take(), names('a', [0]), "three may wait");
        f.send(b"a", &[6], 1);
        assert_eq!(f.take(), names('a', [2, 3, 4]), "a fourth skips 1; 6 waits behind 5");
        assert_eq!(f.counters(), (4, 0, 1));
        assert_eq!(f.seq.held_now(), 1);
    }

    #[test]
    fn a_new_sender_starts_at_its_low_water_mark_and_senders_are_independent() {
        let mut f = Fixture::new(100);
        f.send(b"a", &[0, 1], 0);
        // A restarted push-manager: a new id, its first call arriving after its second.
        f.send(b"b", &[1], 0);
        f.send(b"b", &[0], 0);
        // This node restarted under a sender already far along: nothing below 500 will come.
        f.send(b"c", &[501], 500);
        f.send(b"c", &[500], 500);
        f.send(b"a", &[2], 0);
        assert_eq!(
            f.take(),
            [names('a', [0, 1]), names('b', [0, 1]), names('c', [500, 501]), names('a', [2])].concat()
        );
        assert_eq!(f.counters(), (2, 0, 0), "b1 and c501 waited");
    }

    #[test]
    fn idle_senders_are_forgotten_and_start_afresh() {
        let mut f = Fixture::new(100);
        f.send(b"a", &[0, 1], 0);
        f.now += FORGET_IDLE_SENDER;
        f.sweep();
        assert!(f.seq.senders.lock().is_empty());
        f.send(b"a", &[7], 7);
        assert_eq!(f.take(), names('a', [0, 1, 7]));
    }

    #[test]
    fn a_sender_with_held_messages_is_not_forgotten_before_they_are_released() {
        let mut f = Fixture::new(100);
        f.send(b"a", &[1], 0);
        f.now += FORGET_IDLE_SENDER;
        f.sweep();
        assert_eq!(f.take(), names('a', [1]), "the hold time released it first");
        f.sweep();
        assert!(f.seq.senders.lock().is_empty());
    }

    #[test]
    fn bad_sequences_are_refused_with_a_reason() {
        let mut s = Sequence::new();
        s.set_seqs(vec![1]);
        assert!(validate(&s, 1).unwrap_err().contains("sequence.sender is 0 bytes"));
        s.set_sender(vec![0; MAX_SENDER_BYTES + 1]);
        assert!(validate(&s, 1).unwrap_err().contains("must be 1 to 64"));
        s.set_sender(vec![1]);
        assert!(validate(&s, 2).unwrap_err().contains("one per message"));
        validate(&s, 1).unwrap();
    }
}
