//! A retry budget shared by many callers: retries may be at most a ratio of
//! recent requests, plus a minimum per second (Finagle / linkerd style).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::rolling::{Counts, Rolling};

#[derive(Debug, Clone, Copy, Default)]
struct Spent {
    requests: u32,
    retries: u32,
}

impl Counts for Spent {
    fn add(&mut self, o: &Self) {
        self.requests += o.requests;
        self.retries += o.retries;
    }
    fn sub(&mut self, o: &Self) {
        self.requests -= o.requests;
        self.retries -= o.retries;
    }
}

/// How long requests and retries are remembered.
const WINDOW: Duration = Duration::from_secs(10);

/// Retries allowed ≤ `ratio × requests + min_per_sec × 10 s` over the last 10 s.
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
    window: Mutex<Rolling<Spent>>,
}

impl RetryBudget {
    /// A budget of `ratio` retries per request plus `min_per_sec` retries per second.
    pub fn new(ratio: f64, min_per_sec: u32) -> Self {
        RetryBudget {
            ratio: ratio.max(0.0),
            reserve: min_per_sec.saturating_mul(WINDOW.as_secs() as u32),
            window: Mutex::new(Rolling::new(
                Instant::now(),
                WINDOW,
                WINDOW.as_secs() as usize,
            )),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Rolling<Spent>) -> R) -> R {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut window)
    }

    /// Counts one original request.
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// As [`deposit`](Self::deposit), at a `now` the caller already read.
    pub fn deposit_at(&self, now: Instant) {
        self.with(|w| {
            w.add(
                now,
                Spent {
                    requests: 1,
                    retries: 0,
                },
            )
        });
    }

    /// Takes one retry from the budget, if there is one left.
    pub fn try_withdraw(&self) -> bool {
        let now = Instant::now();
        self.with(|w| {
            let spent = w.total(now);
            let allowed = (self.ratio * f64::from(spent.requests)) as u64 + u64::from(self.reserve);
            if u64::from(spent.retries) >= allowed {
                return false;
            }
            w.add(
                now,
                Spent {
                    requests: 0,
                    retries: 1,
                },
            );
            true
        })
    }

    /// Retries left right now.
    pub fn remaining(&self) -> u64 {
        let now = Instant::now();
        self.with(|w| {
            let spent = w.total(now);
            ((self.ratio * f64::from(spent.requests)) as u64 + u64::from(self.reserve))
                .saturating_sub(u64::from(spent.retries))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn reserve_refills_as_the_window_moves() {
        let budget = RetryBudget::new(0.0, 1);
        let taken = std::iter::from_fn(|| budget.try_withdraw().then_some(())).count();
        assert_eq!(taken, 10, "1 per second over 10 s");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(budget.remaining(), 10);
    }
}
