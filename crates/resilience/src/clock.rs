//! Where policies read the time, as nanoseconds on a clock's own scale.
//!
//! [`TokioClock`] is tokio's `Instant` counted from an origin: paused-time
//! tests drive it and tokio's timers agree with it. Every policy keeps
//! time on it, and a request that already read the time hands it on
//! ([`RateLimiter::check_at`](crate::ratelimit::RateLimiter::check_at),
//! [`admit_at`](crate::ratelimit::RateLimiter::admit_at)) at no further
//! cost. A [`RateLimiter`](crate::ratelimit::RateLimiter) can read any
//! other [`Clock`] instead.
//! `TscClock` (feature `quanta`) reads the CPU's time-stamp counter, for
//! a limiter checked on its own where a clock read is most of the cost; it
//! ignores tokio's paused time.

use std::fmt;
use std::sync::Arc;

use tokio::time::Instant;

/// A monotonic source of time for a limiter.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Nanoseconds since an origin of the clock's choosing; never decreases.
    fn now_nanos(&self) -> u64;
}

/// A shared clock: one a test moves by hand, handed to a limiter.
impl<C: Clock> Clock for Arc<C> {
    #[inline]
    fn now_nanos(&self) -> u64 {
        (**self).now_nanos()
    }
}

/// tokio's clock, counted from when it was made (the default).
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: Instant,
}

impl TokioClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        TokioClock::since(Instant::now())
    }

    /// A clock whose origin is `origin`.
    pub fn since(origin: Instant) -> Self {
        TokioClock { origin }
    }

    /// Nanoseconds from the origin to `now` (0 for an earlier `now`).
    #[inline]
    pub fn nanos_at(&self, now: Instant) -> u64 {
        crate::nanos(now.saturating_duration_since(self.origin))
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock::new()
    }
}

impl Clock for TokioClock {
    #[inline]
    fn now_nanos(&self) -> u64 {
        self.nanos_at(Instant::now())
    }
}

/// The CPU's time-stamp counter scaled to nanoseconds, through `quanta`
/// (which falls back to the OS's monotonic clock where the counter is not
/// reliable). The clock `governor` reads by default.
#[cfg(feature = "quanta")]
#[derive(Debug, Clone)]
pub struct TscClock {
    clock: quanta::Clock,
}

#[cfg(feature = "quanta")]
impl TscClock {
    /// Calibrates the counter against the OS clock (once per process).
    pub fn new() -> Self {
        TscClock {
            clock: quanta::Clock::new(),
        }
    }
}

#[cfg(feature = "quanta")]
impl Default for TscClock {
    fn default() -> Self {
        TscClock::new()
    }
}

#[cfg(feature = "quanta")]
impl Clock for TscClock {
    #[inline]
    fn now_nanos(&self) -> u64 {
        self.clock.delta_as_nanos(0, self.clock.raw())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::ratelimit::{Algorithm, Limit, Quota, RateLimiter};

    #[derive(Debug, Default)]
    struct Manual(AtomicU64);

    impl Clock for Manual {
        fn now_nanos(&self) -> u64 {
            self.0.load(Ordering::Relaxed)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_limiter_follows_its_own_clock_not_tokios() {
        let time = Arc::new(Manual::default());
        let quota = Quota::per_second(2);
        for algorithm in Algorithm::ALL {
            time.0.store(7_000_000_000, Ordering::Relaxed);
            let limiter = RateLimiter::with_clock(Limit::new(algorithm, quota), time.clone());
            assert!(limiter.admit().is_ok() && limiter.admit().is_ok());
            assert!(limiter.admit().is_err(), "{algorithm:?}: quota spent");
            tokio::time::advance(Duration::from_secs(60)).await;
            assert!(
                limiter.admit().is_err(),
                "{algorithm:?}: tokio's time is not its time"
            );
            // Two periods on: even the sliding window has forgotten them.
            time.0.store(9_000_000_000, Ordering::Relaxed);
            assert!(limiter.admit().is_ok(), "{algorithm:?}: later on its clock");
        }
    }

    #[cfg(feature = "quanta")]
    #[test]
    fn the_tsc_clock_keeps_time_with_the_os_clock() {
        let tsc = TscClock::new();
        let before = tsc.now_nanos();
        let start = Instant::now();
        // A busy wait of 2 ms on the OS clock, counted on both.
        while start.elapsed() < Duration::from_millis(2) {
            std::hint::spin_loop();
        }
        let counted = tsc.now_nanos() - before;
        let elapsed = crate::nanos(start.elapsed());
        assert!(
            counted >= 1_900_000 && counted <= elapsed + 1_000_000,
            "{counted} ns on the counter, {elapsed} ns on the OS clock"
        );
    }

    /// Counters of different cores may disagree by a few nanoseconds (seen
    /// here: 4 ns), which limiters take in their stride: callers reach them
    /// out of order anyway. More than a millisecond would not be a clock.
    #[cfg(feature = "quanta")]
    #[test]
    fn the_tsc_clock_agrees_across_threads() {
        const SKEW: u64 = 1_000_000;
        let tsc = TscClock::new();
        let shared = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (tsc, shared) = (tsc.clone(), shared.clone());
                std::thread::spawn(move || {
                    for _ in 0..100_000 {
                        let seen = shared.load(Ordering::Acquire);
                        let now = tsc.now_nanos();
                        assert!(now + SKEW >= seen, "{now} read after {seen} was published");
                        shared.fetch_max(now, Ordering::AcqRel);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[cfg(feature = "quanta")]
    #[test]
    fn a_gcra_limiter_on_the_tsc_clock_admits_its_burst() {
        let limiter = RateLimiter::with_clock(
            Limit::new(Algorithm::Gcra, Quota::per_hour(2)),
            TscClock::new(),
        );
        assert!(limiter.admit().is_ok() && limiter.admit().is_ok());
        let refused = limiter.admit().unwrap_err();
        let wait = refused.retry_after().expect("a wait");
        assert!(
            wait > Duration::from_secs(29 * 60) && wait <= Duration::from_secs(30 * 60),
            "{wait:?}"
        );
        assert_eq!(refused.decision().remaining, 0);
    }
}
