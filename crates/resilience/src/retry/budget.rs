//! A retry budget shared by many callers: retries may be at most a ratio of
//! recent requests, plus a minimum per second (Finagle / linkerd style).
//!
//! Every request deposits, so the count is kept without a lock: one atomic
//! word per second of the window holds that second's number next to its
//! count, and a new second takes over the word of the one ten seconds
//! older in a single compare-and-swap. Requests are counted on the
//! depositing thread's stripe (see [`crate::stripe`]), so that workers do
//! not write one word on every request; only a withdrawal, a retry, adds
//! the stripes up.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use crate::stripe::{self, STRIPES};

/// Seconds requests and retries are remembered.
const WINDOW_SECS: u32 = 10;

/// Retries allowed ≤ `ratio × requests + min_per_sec × 10 s` over the last 10 s.
///
/// Deposits are exact; a withdrawal checks, then counts, so callers racing
/// for the last retry may each get one (the overshoot is at most one retry
/// a concurrent caller).
///
/// ```
/// use tidegate_resilience::retry::RetryBudget;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let budget = RetryBudget::new(0.5, 0);
/// for _ in 0..4 {
///     budget.deposit();
/// }
/// assert!(budget.try_withdraw());
/// assert!(budget.try_withdraw());
/// assert!(!budget.try_withdraw(), "half of 4 requests");
/// # }
/// ```
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    reserve: u32,
    origin: Instant,
    requests: [Window; STRIPES],
    retries: Window,
}

/// The seconds of a window, on cache lines of their own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Window([Second; WINDOW_SECS as usize]);

impl RetryBudget {
    /// A budget of `ratio` retries per request plus `min_per_sec` retries per second.
    pub fn new(ratio: f64, min_per_sec: u32) -> Self {
        RetryBudget {
            ratio: ratio.max(0.0),
            reserve: min_per_sec.saturating_mul(WINDOW_SECS),
            origin: Instant::now(),
            requests: Default::default(),
            retries: Default::default(),
        }
    }

    /// The second of `now`, counted from the budget's creation.
    fn second(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.origin).as_secs()).unwrap_or(u32::MAX)
    }

    /// Counts a request.
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// Counts a request made at `now`.
    pub fn deposit_at(&self, now: Instant) {
        let second = self.second(now);
        let stripe = stripe::current();
        self.requests[stripe.index()].0[slot(second)].add_on(stripe, second);
    }

    /// Takes a retry if the budget has one left.
    pub fn try_withdraw(&self) -> bool {
        let second = self.second(Instant::now());
        if self.left(second) == 0 {
            return false;
        }
        self.retries.0[slot(second)].add(second);
        true
    }

    /// Retries left right now.
    pub fn remaining(&self) -> u64 {
        self.left(self.second(Instant::now()))
    }

    fn left(&self, second: u32) -> u64 {
        let requests = self
            .requests
            .iter()
            .map(|w| total(&w.0, second))
            .sum::<u64>();
        let retries = total(&self.retries.0, second);
        ((self.ratio * requests as f64) as u64 + u64::from(self.reserve)).saturating_sub(retries)
    }
}

fn slot(second: u32) -> usize {
    (second % WINDOW_SECS) as usize
}

/// The count of the window that ends at `second`.
fn total(seconds: &[Second], second: u32) -> u64 {
    seconds.iter().map(|s| u64::from(s.count(second))).sum()
}

/// One second of the window: its number in the high half of the word, its
/// count in the low half.
#[derive(Debug, Default)]
struct Second(AtomicU64);

impl Second {
    fn add(&self, second: u32) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |current| {
                Second::next(current, second)
            });
    }

    /// [`add`](Second::add), on a stripe's second: written plainly when
    /// the stripe is the calling thread's own.
    fn add_on(&self, stripe: stripe::Stripe, second: u32) {
        stripe.update(&self.0, |current| Second::next(current, second));
    }

    /// The word after one more request at `second`, if it changes.
    fn next(current: u64, second: u32) -> Option<u64> {
        let (held, count) = ((current >> 32) as u32, current as u32);
        if held < second {
            // Ten seconds on: the old count leaves the window.
            Some(u64::from(second) << 32 | 1)
        } else if count == u32::MAX {
            None
        } else {
            // This second's (or, for a caller held up past it, a later one's).
            Some(current + 1)
        }
    }

    /// Its count if it lies in the window ending at `second`.
    fn count(&self, second: u32) -> u32 {
        let word = self.0.load(Ordering::Relaxed);
        let held = (word >> 32) as u32;
        if held <= second && second - held < WINDOW_SECS {
            word as u32
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn reserve_refills_as_the_window_moves() {
        let budget = RetryBudget::new(0.0, 1);
        let taken = std::iter::from_fn(|| budget.try_withdraw().then_some(())).count();
        assert_eq!(taken, 10, "1 per second over 10 s");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(budget.remaining(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_leave_the_window_second_by_second() {
        let budget = RetryBudget::new(1.0, 0);
        let t0 = Instant::now();
        for s in 0..10 {
            for _ in 0..=s {
                budget.deposit_at(t0 + Duration::from_secs(s));
            }
        }
        // 1 + 2 + … + 10 requests in the window.
        assert_eq!(budget.left(9), 55);
        // Second 0 (1 request) falls out at 10, second 1 (2) at 11, …
        assert_eq!(budget.left(10), 54);
        assert_eq!(budget.left(11), 52);
        // A new second takes the slot of the one ten seconds older.
        budget.deposit_at(t0 + Duration::from_secs(10));
        assert_eq!(budget.left(10), 55);
        assert_eq!(budget.left(19), 1);
        assert_eq!(budget.left(20), 0);
    }

    #[test]
    fn concurrent_deposits_are_all_counted() {
        let budget = std::sync::Arc::new(RetryBudget::new(1.0, 0));
        let now = budget.origin;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        budget.deposit_at(now);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(budget.left(0), 40_000);
    }
}
