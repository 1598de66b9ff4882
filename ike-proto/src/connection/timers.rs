//! One table of an IKE_SA's timers, keyed by what each is for. The next
//! deadline is the earliest entry. A timer that fires leaves the table and
//! is set again only by its handler, so no timer stays due after it ran.

use std::{collections::BTreeMap, time::Instant};

/// What a timer is for. They fire in this order when several are due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timer {
    /// Our outstanding request is resent, or given up on (§2.1, §2.4).
    Retransmit,
    /// IKE_SA_INIT and IKE_AUTH must be done by then.
    Negotiation,
    /// A rekeyed IKE_SA is dropped if no DELETE has ended it (§2.8).
    Linger,
    /// The IKE_SA is rekeyed (§2.8).
    IkeRekey,
    /// Dead peer detection looks at the peer's silence (§2.4).
    Dpd,
    /// A NAT-keepalive is due (RFC 3948 §4).
    Keepalive,
    /// The CHILD_SA with this inbound SPI is rekeyed.
    ChildRekey(u32),
    /// The CHILD_SA with this inbound SPI reached its hard lifetime.
    ChildExpire(u32),
}

#[derive(Debug, Default)]
pub(super) struct TimerTable(BTreeMap<Timer, Instant>);

impl TimerTable {
    pub(super) fn set(&mut self, timer: Timer, at: Instant) {
        self.0.insert(timer, at);
    }

    pub(super) fn stop(&mut self, timer: Timer) {
        self.0.remove(&timer);
    }

    pub(super) fn get(&self, timer: Timer) -> Option<Instant> {
        self.0.get(&timer).copied()
    }

    /// The earliest deadline.
    pub(super) fn next(&self) -> Option<Instant> {
        self.0.values().min().copied()
    }

    /// Removes and returns the timers due at `now`, in [`Timer`] order.
    pub(super) fn expire(&mut self, now: Instant) -> Vec<Timer> {
        let due: Vec<Timer> = self
            .0
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in &due {
            self.0.remove(t);
        }
        due
    }

    /// Stops every timer.
    pub(super) fn clear(&mut self) {
        self.0.clear();
    }

    /// Moves the timers of the CHILD_SA `spi_in` to `to`.
    pub(super) fn move_child(&mut self, spi_in: u32, to: &mut TimerTable) {
        for t in [Timer::ChildRekey(spi_in), Timer::ChildExpire(spi_in)] {
            if let Some(at) = self.0.remove(&t) {
                to.0.insert(t, at);
            }
        }
    }

    /// Test aid: the timers due at `now`, without firing them.
    #[cfg(test)]
    pub(super) fn due(&self, now: Instant) -> Vec<Timer> {
        self.0
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(t, _)| *t)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn fires_each_due_timer_once_in_order() {
        let t0 = Instant::now();
        let mut t = TimerTable::default();
        t.set(Timer::ChildRekey(7), t0 + Duration::from_secs(1));
        t.set(Timer::Retransmit, t0 + Duration::from_secs(2));
        t.set(Timer::Dpd, t0 + Duration::from_secs(9));
        assert_eq!(t.next(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(
            t.expire(t0 + Duration::from_secs(2)),
            [Timer::Retransmit, Timer::ChildRekey(7)]
        );
        assert!(t.expire(t0 + Duration::from_secs(2)).is_empty());
        assert_eq!(t.next(), Some(t0 + Duration::from_secs(9)));
        let mut other = TimerTable::default();
        t.set(Timer::ChildExpire(7), t0);
        t.move_child(7, &mut other);
        assert_eq!(other.get(Timer::ChildExpire(7)), Some(t0));
        assert_eq!(t.get(Timer::ChildExpire(7)), None);
    }
}
