//! A circuit breaker per plugin version: a plugin that keeps timing out is
//! suspended (its failure mode applies without calling it), then tried
//! again with one call after a cooldown that doubles while it keeps
//! failing.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Consecutive timeouts that suspend a plugin.
pub const TRIP_AFTER: u32 = 5;
/// First suspension; each failed retry doubles it up to [`MAX_COOLDOWN`].
pub const FIRST_COOLDOWN: Duration = Duration::from_secs(1);
/// Longest suspension.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct State {
    consecutive: u32,
    open_until: Option<Instant>,
    cooldown: Duration,
    trips: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Breaker(Mutex<State>);

impl Default for Breaker {
    fn default() -> Self {
        Breaker(Mutex::new(State {
            consecutive: 0,
            open_until: None,
            cooldown: FIRST_COOLDOWN,
            trips: 0,
        }))
    }
}

impl Breaker {
    /// `Some(remaining)` while suspended: do not call. After the cooldown
    /// one call goes through; if it times out too, the breaker opens again.
    pub fn suspended(&self) -> Option<Duration> {
        let mut s = self.0.lock().expect("breaker lock");
        let until = s.open_until?;
        let now = Instant::now();
        if until > now {
            return Some(until - now);
        }
        // Half open: let this one call through; one more timeout re-trips.
        s.open_until = None;
        s.consecutive = TRIP_AFTER - 1;
        None
    }

    /// Records a call's outcome; returns true if this call tripped it.
    pub fn record(&self, timed_out: bool) -> bool {
        let mut s = self.0.lock().expect("breaker lock");
        if !timed_out {
            s.consecutive = 0;
            s.cooldown = FIRST_COOLDOWN;
            return false;
        }
        s.consecutive += 1;
        if s.consecutive < TRIP_AFTER {
            return false;
        }
        s.open_until = Some(Instant::now() + s.cooldown);
        s.trips += 1;
        s.cooldown = (s.cooldown * 2).min(MAX_COOLDOWN);
        s.consecutive = 0;
        true
    }

    /// `(suspended for, times tripped)`, for `plugin list`.
    pub fn status(&self) -> (Option<Duration>, u64) {
        let s = self.0.lock().expect("breaker lock");
        let now = Instant::now();
        (s.open_until.filter(|u| *u > now).map(|u| u - now), s.trips)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_after_consecutive_timeouts_and_a_success_resets() {
        let b = Breaker::default();
        for _ in 0..TRIP_AFTER - 1 {
            assert!(!b.record(true));
        }
        assert!(!b.record(false), "a success resets the count");
        for _ in 0..TRIP_AFTER - 1 {
            assert!(!b.record(true));
        }
        assert!(b.suspended().is_none());
        assert!(b.record(true), "the fifth in a row trips");
        let left = b.suspended().expect("suspended");
        assert!(left <= FIRST_COOLDOWN);
        assert_eq!(b.status().1, 1);
    }
}
