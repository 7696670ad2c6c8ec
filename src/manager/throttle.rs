//! Rate-limited logging: the first event of each interval is logged with a count of the
//! events suppressed since, so a flood shows up as one line a second, not thousands.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

pub(crate) struct Throttle {
    interval: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl Throttle {
    pub(crate) fn new(interval: Duration) -> Throttle {
        Throttle { interval, last: Mutex::new(None), suppressed: AtomicU64::new(0) }
    }

    /// `Some(suppressed since the last allowed event)` when this event may be logged.
    pub(crate) fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock();
        if matches!(*last, Some(t) if now.duration_since(t) < self.interval) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_passes_then_counts_until_the_interval_ends() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        *t.last.lock() = Some(Instant::now() - Duration::from_secs(3601));
        assert_eq!(t.allow(), Some(2));
    }
}
