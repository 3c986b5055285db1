//! The loop's deadlines, in one ordered set.
//!
//! The loop sleeps in `epoll_wait` with the timeout of the earliest
//! deadline, or forever when there is none: an idle agent has no timer at
//! all. Owners keep the [`TimerKey`] of each deadline they set and cancel
//! it when it no longer matters (a session that finishes before its linger
//! time is up), so the set holds only live deadlines and its size is
//! bounded by what is live, whatever a host asks for.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What a deadline is for; the loop dispatches on it when it is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// Session `key` has lingered for its `linger_ms`: its streams get
    /// their final pass. `seq` tells it from a later session in the slot.
    Linger { key: usize, seq: u64 },
    /// Connection `key` did not connect within its `timeout_ms`.
    Connect { key: usize, seq: u64 },
    /// Session `key`'s `timeout_ms` has passed: SIGTERM to its tree.
    Deadline { key: usize, seq: u64 },
    /// Session `key`'s `kill_grace_ms` after its deadline: SIGKILL.
    DeadlineKill { key: usize, seq: u64 },
}

/// A deadline in the set, for cancelling it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct TimerKey(Instant, u64);

#[derive(Debug, Default)]
pub(crate) struct Timers {
    set: BTreeMap<TimerKey, Timer>,
    next: u64,
}

impl Timers {
    /// Sets a deadline.
    pub(crate) fn add(&mut self, at: Instant, timer: Timer) -> TimerKey {
        let key = TimerKey(at, self.next);
        self.next += 1;
        self.set.insert(key, timer);
        key
    }

    /// Removes a deadline (nothing if it has fired already).
    pub(crate) fn cancel(&mut self, key: TimerKey) {
        self.set.remove(&key);
    }

    /// The earliest deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.set.keys().next().map(|k| k.0)
    }

    /// Takes the earliest deadline if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        let (&key, _) = self.set.iter().next()?;
        if key.0 > now {
            return None;
        }
        self.set.remove(&key)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.set.len()
    }
}

/// `poll`'s timeout for a deadline: rounded up to the next millisecond
/// (epoll's resolution), so the deadline has passed when poll returns.
pub(crate) fn timeout_until(deadline: Instant, now: Instant) -> Duration {
    deadline.saturating_duration_since(now) + Duration::from_micros(999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_in_order_and_cancelled_ones_never() {
        let mut t = Timers::default();
        let now = Instant::now();
        let later = t.add(
            now + Duration::from_secs(9),
            Timer::Linger { key: 3, seq: 3 },
        );
        t.add(now, Timer::Linger { key: 1, seq: 1 });
        t.add(now, Timer::Linger { key: 2, seq: 2 });
        assert_eq!(t.next_deadline(), Some(now));
        assert_eq!(t.pop_due(now), Some(Timer::Linger { key: 1, seq: 1 }));
        assert_eq!(t.pop_due(now), Some(Timer::Linger { key: 2, seq: 2 }));
        assert_eq!(t.pop_due(now), None, "not due yet");
        t.cancel(later);
        assert_eq!(t.len(), 0);
        assert_eq!(t.next_deadline(), None);
    }
}
