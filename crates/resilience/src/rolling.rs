//! A rolling time window of counters in fixed-width buckets.
//!
//! Shared by the breaker's time window, the retry budget and adaptive
//! throttling. Pure: every method takes `now`.

use std::time::Duration;

use tokio::time::Instant;

use crate::clock::TokioClock;

/// Counters that can be added and taken away, bucket by bucket.
pub(crate) trait Counts: Copy + Default {
    fn add(&mut self, other: &Self);
    fn sub(&mut self, other: &Self);
}

#[derive(Debug)]
pub(crate) struct Rolling<C> {
    clock: TokioClock,
    /// Bucket width in nanoseconds (u64 division is much cheaper than u128).
    width: u64,
    buckets: Box<[C]>,
    /// Index (counted on `clock`) of the newest bucket.
    head: u64,
    total: C,
}

impl<C: Counts> Rolling<C> {
    /// A window of `window` split into `buckets` buckets (at least one).
    pub(crate) fn new(origin: Instant, window: Duration, buckets: usize) -> Self {
        let buckets = buckets.max(1);
        let width = crate::nanos(window / buckets as u32).max(1);
        Rolling {
            clock: TokioClock::since(origin),
            width,
            buckets: vec![C::default(); buckets].into_boxed_slice(),
            head: 0,
            total: C::default(),
        }
    }

    fn slot(&self, now: Instant) -> u64 {
        self.clock.nanos_at(now) / self.width
    }

    /// Drops the buckets that have fallen out of the window at `now`.
    fn advance(&mut self, now: Instant) {
        let slot = self.slot(now);
        if slot <= self.head {
            return;
        }
        let n = self.buckets.len() as u64;
        if slot - self.head >= n {
            self.clear();
        } else {
            for s in self.head + 1..=slot {
                let bucket = &mut self.buckets[(s % n) as usize];
                self.total.sub(bucket);
                *bucket = C::default();
            }
        }
        self.head = slot;
    }

    /// Adds `delta` to the bucket of `now`.
    pub(crate) fn add(&mut self, now: Instant, delta: C) {
        self.advance(now);
        let n = self.buckets.len() as u64;
        self.buckets[(self.head % n) as usize].add(&delta);
        self.total.add(&delta);
    }

    /// The sum over the window at `now`.
    pub(crate) fn total(&mut self, now: Instant) -> C {
        self.advance(now);
        self.total
    }

    pub(crate) fn clear(&mut self) {
        self.buckets.fill(C::default());
        self.total = C::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Default, Debug, PartialEq)]
    struct N(u32);
    impl Counts for N {
        fn add(&mut self, o: &Self) {
            self.0 += o.0;
        }
        fn sub(&mut self, o: &Self) {
            self.0 -= o.0;
        }
    }

    #[test]
    fn old_buckets_fall_out() {
        let t0 = Instant::now();
        let mut w = Rolling::new(t0, Duration::from_secs(10), 10);
        w.add(t0, N(1));
        w.add(t0 + Duration::from_millis(4500), N(2));
        assert_eq!(w.total(t0 + Duration::from_millis(9999)), N(3));
        assert_eq!(w.total(t0 + Duration::from_secs(10)), N(2));
        assert_eq!(w.total(t0 + Duration::from_secs(15)), N(0));
        w.add(t0 + Duration::from_secs(100), N(5));
        assert_eq!(w.total(t0 + Duration::from_secs(100)), N(5));
    }
}
