//! When the listener runs its next advance: a sweep after `sweep_interval` of idleness (or
//! sooner, once many events were delivered beyond the cursor's snapshot), a fetch of notified
//! references at most once per `fetch_interval` (or sooner, once many wait), and an advance at
//! once when a notification did not decode. Pure: the listener tells it the time and what its
//! cursor holds, and sleeps until the instant it names.

use std::time::Duration;

use tokio::time::Instant;

/// A sweep is due once this many events were delivered beyond the cursor's snapshot, however
/// soon: with inline payloads nothing else moves the snapshot, and a sweep every
/// `sweep_interval` would read back every row of those seconds (30,000 at 15,000 events/s) and
/// keep as many ids in the dedupe set meanwhile.
pub(crate) const SWEEP_AFTER_DELIVERED: usize = 2_000;

/// A fetch of references starts before `fetch_interval` is up once this many notified rows
/// wait: a busy relay then fetches once per this many events (under 0.05 queries per event)
/// and the wait for a fetch shrinks as the rate grows, while a relay at a few hundred events a
/// second fetches once per `fetch_interval` at most.
pub(crate) const EARLY_FETCH_AT: usize = 32;

/// What the cursor holds that an advance would settle.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Demand {
    /// Notified rows waiting for a fetch.
    pub waiting: usize,
    /// Events delivered beyond the cursor's snapshot.
    pub delivered_beyond: usize,
    /// A notification did not decode: rows may stand behind it.
    pub undecodable: bool,
}

/// Which advance is due: one that fetches notified references, or a sweep (rows it finds
/// without a notification count as caught up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Due {
    Fetch,
    Sweep,
}

#[derive(Debug)]
pub(crate) struct Schedule {
    sweep_interval: Duration,
    fetch_interval: Duration,
    /// A deadline rather than an interval: under a steady flood of notifications the listener
    /// always has one ready, and the sweep must still happen.
    next_sweep: Instant,
    /// When the last advance started: fetches and early sweeps wait `fetch_interval` after it.
    last_advance: Instant,
}

impl Schedule {
    pub fn new(sweep_interval: Duration, fetch_interval: Duration, now: Instant) -> Schedule {
        Schedule {
            sweep_interval,
            fetch_interval,
            next_sweep: now + sweep_interval,
            last_advance: now,
        }
    }

    /// The relay is settled as of `now` (an advance's result arrived, or it reconnected and
    /// caught up): the next sweep is a whole interval away.
    pub fn settled(&mut self, now: Instant) {
        self.next_sweep = now + self.sweep_interval;
    }

    /// When to wake up, with no advance out, if nothing arrives first.
    pub fn wake_at(&self, demand: Demand) -> Instant {
        if demand.waiting > 0 {
            self.next_sweep.min(self.fetch_at())
        } else {
            self.next_sweep
        }
    }

    /// The advance due at `now`, if any, noted as started.
    pub fn start_due(&mut self, now: Instant, demand: Demand) -> Option<Due> {
        let spaced = now >= self.fetch_at();
        let sweep_due =
            now >= self.next_sweep || (spaced && demand.delivered_beyond >= SWEEP_AFTER_DELIVERED);
        let fetch_due = demand.waiting > 0 && (spaced || demand.waiting >= EARLY_FETCH_AT);
        if !(sweep_due || fetch_due || demand.undecodable) {
            return None;
        }
        self.last_advance = now;
        Some(if demand.waiting > 0 {
            Due::Fetch
        } else {
            Due::Sweep
        })
    }

    fn fetch_at(&self) -> Instant {
        self.last_advance + self.fetch_interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SWEEP: Duration = Duration::from_secs(2);
    const FETCH: Duration = Duration::from_millis(25);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn waiting(n: usize) -> Demand {
        Demand {
            waiting: n,
            ..Demand::default()
        }
    }

    #[test]
    fn an_idle_relay_sweeps_once_per_interval_of_quiet() {
        let start = Instant::now();
        let mut schedule = Schedule::new(SWEEP, FETCH, start);
        assert_eq!(schedule.wake_at(Demand::default()), start + SWEEP);
        assert_eq!(
            schedule.start_due(start + ms(1999), Demand::default()),
            None
        );
        assert_eq!(
            schedule.start_due(start + SWEEP, Demand::default()),
            Some(Due::Sweep)
        );
        // Its result arrives 10 ms later: the next sweep is an interval after that.
        schedule.settled(start + SWEEP + ms(10));
        assert_eq!(
            schedule.wake_at(Demand::default()),
            start + SWEEP * 2 + ms(10)
        );
    }

    #[test]
    fn references_are_fetched_at_most_once_per_fetch_interval_unless_many_wait() {
        let start = Instant::now();
        let mut schedule = Schedule::new(SWEEP, FETCH, start);
        // The first reference after a quiet spell is fetched at once.
        assert_eq!(
            schedule.start_due(start + ms(100), waiting(1)),
            Some(Due::Fetch)
        );
        schedule.settled(start + ms(102));
        // The next ones wait for the interval after that fetch started...
        assert_eq!(schedule.wake_at(waiting(3)), start + ms(125));
        assert_eq!(schedule.start_due(start + ms(110), waiting(3)), None);
        assert_eq!(
            schedule.start_due(start + ms(125), waiting(3)),
            Some(Due::Fetch)
        );
        // ...unless enough wait to fill a fetch.
        assert_eq!(
            schedule.start_due(start + ms(126), waiting(EARLY_FETCH_AT)),
            Some(Due::Fetch)
        );
    }

    #[test]
    fn a_busy_relay_sweeps_early_and_an_undecodable_notification_advances_at_once() {
        let start = Instant::now();
        let mut schedule = Schedule::new(SWEEP, FETCH, start);
        let flooded = Demand {
            delivered_beyond: SWEEP_AFTER_DELIVERED,
            ..Demand::default()
        };
        assert_eq!(
            schedule.start_due(start + ms(30), flooded),
            Some(Due::Sweep)
        );
        // Early sweeps are spaced like fetches.
        assert_eq!(schedule.start_due(start + ms(40), flooded), None);
        assert_eq!(
            schedule.start_due(start + ms(55), flooded),
            Some(Due::Sweep)
        );
        let undecodable = Demand {
            undecodable: true,
            ..Demand::default()
        };
        assert_eq!(
            schedule.start_due(start + ms(56), undecodable),
            Some(Due::Sweep)
        );
        // A sweep due while references wait fetches them: what it finds is not caught up.
        assert_eq!(
            schedule.start_due(start + SWEEP * 3, waiting(1)),
            Some(Due::Fetch)
        );
    }
}
