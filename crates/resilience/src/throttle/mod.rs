//! Adaptive throttling, client side (Google SRE book, "Handling Overload").
//!
//! Over a rolling window the client counts `requests` it wanted to send and
//! `accepts` the upstream took. New requests are rejected locally with
//! probability `max(0, (requests − K·accepts) / (requests + 1))`, so a
//! struggling upstream sees load fall off smoothly instead of a retry storm.
//!
//! ```
//! use tidegate_resilience::throttle::{AdaptiveThrottle, Config};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let throttle = AdaptiveThrottle::new(Config::default());
//! for _ in 0..100 {
//!     if let Ok(permit) = throttle.try_acquire() {
//!         permit.rejected(); // the upstream refused every one
//!     }
//! }
//! assert!(throttle.rejection_probability() > 0.9);
//! # }
//! ```

mod layer;

use std::fmt;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub use self::layer::{AdaptiveThrottleLayer, AdaptiveThrottleService};
use crate::breaker::Outcome;
use crate::rolling::{Counts, Rolling};
use crate::settings::{check, ConfigError};
use crate::Error;

/// Settings of adaptive throttling.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct Config {
    /// K: how many requests per accept are let through before rejecting. Default 2.
    pub k: f64,
    /// How far back requests and accepts are counted. Default 2 min.
    #[cfg_attr(feature = "serde", serde(with = "crate::settings::duration"))]
    pub window: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            k: 2.0,
            window: Duration::from_secs(120),
        }
    }
}

impl Config {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            self.k >= 1.0 && self.k.is_finite(),
            "k",
            "must be at least 1",
        )?;
        check(
            self.window >= Duration::from_secs(1),
            "window",
            "must be at least 1s",
        )
    }
}

/// Adaptive throttling rejected the request locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled;

impl fmt::Display for Throttled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("throttled locally: the upstream is rejecting requests")
    }
}

impl std::error::Error for Throttled {}

#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    requests: u32,
    accepts: u32,
}

impl Counts for Tally {
    fn add(&mut self, o: &Self) {
        self.requests += o.requests;
        self.accepts += o.accepts;
    }
    fn sub(&mut self, o: &Self) {
        self.requests -= o.requests;
        self.accepts -= o.accepts;
    }
}

/// The SRE formula: `max(0, (requests − k·accepts) / (requests + 1))`.
pub fn rejection_probability(requests: u32, accepts: u32, k: f64) -> f64 {
    let requests = f64::from(requests);
    ((requests - k * f64::from(accepts)) / (requests + 1.0)).max(0.0)
}

/// Client-side adaptive throttling; share it (e.g. in an `Arc`) per upstream.
#[derive(Debug)]
pub struct AdaptiveThrottle {
    k: f64,
    window: Mutex<Rolling<Tally>>,
}

impl Default for AdaptiveThrottle {
    fn default() -> Self {
        AdaptiveThrottle::new(Config::default())
    }
}

impl AdaptiveThrottle {
    /// A throttle with an empty history.
    pub fn new(config: Config) -> Self {
        let buckets = config.window.as_secs().clamp(1, 120) as usize;
        AdaptiveThrottle {
            k: config.k,
            window: Mutex::new(Rolling::new(Instant::now(), config.window, buckets)),
        }
    }

    fn add(&self, tally: Tally) -> Tally {
        let now = Instant::now();
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let before = window.total(now);
        window.add(now, tally);
        before
    }

    /// Counts a request and decides whether to send it. The permit records
    /// whether the upstream accepted it; dropped unrecorded, it counts as accepted.
    pub fn try_acquire(&self) -> Result<ThrottlePermit<'_>, Throttled> {
        self.try_acquire_with(crate::rng::unit())
    }

    /// As [`try_acquire`](Self::try_acquire), with the random draw given (for tests).
    pub fn try_acquire_with(&self, unit: f64) -> Result<ThrottlePermit<'_>, Throttled> {
        let before = self.add(Tally {
            requests: 1,
            accepts: 0,
        });
        if unit < rejection_probability(before.requests, before.accepts, self.k) {
            return Err(Throttled);
        }
        Ok(ThrottlePermit {
            throttle: self,
            recorded: false,
        })
    }

    /// The probability a new request is rejected now.
    pub fn rejection_probability(&self) -> f64 {
        let now = Instant::now();
        let tally = self
            .window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .total(now);
        rejection_probability(tally.requests, tally.accepts, self.k)
    }

    /// Runs `f` unless throttled; an `Err` counts as not accepted.
    pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let permit = self.try_acquire()?;
        let result = f().await;
        permit.record(if result.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        });
        result.map_err(Error::inner_error)
    }
}

/// A request let through adaptive throttling.
#[must_use = "record whether the upstream accepted the request"]
#[derive(Debug)]
pub struct ThrottlePermit<'a> {
    throttle: &'a AdaptiveThrottle,
    recorded: bool,
}

impl ThrottlePermit<'_> {
    /// The upstream took the request (any answer that is not an overload signal).
    pub fn accepted(mut self) {
        self.recorded = true;
        self.throttle.add(Tally {
            requests: 0,
            accepts: 1,
        });
    }

    /// The upstream refused the request (overload, 503, connection refused...).
    pub fn rejected(mut self) {
        self.recorded = true;
    }

    /// Records a breaker-style outcome: only `Failure` is a refusal.
    pub fn record(self, outcome: Outcome) {
        match outcome {
            Outcome::Failure => self.rejected(),
            Outcome::Success | Outcome::Ignore => self.accepted(),
        }
    }
}

impl Drop for ThrottlePermit<'_> {
    fn drop(&mut self) {
        if !self.recorded {
            // The caller went away: that says nothing against the upstream.
            self.throttle.add(Tally {
                requests: 0,
                accepts: 1,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula() {
        assert_eq!(rejection_probability(0, 0, 2.0), 0.0);
        assert_eq!(rejection_probability(100, 50, 2.0), 0.0);
        assert!((rejection_probability(100, 10, 2.0) - 80.0 / 101.0).abs() < 1e-12);
    }

    #[tokio::test(start_paused = true)]
    async fn recovers_as_the_window_forgets() {
        let throttle = AdaptiveThrottle::new(Config {
            k: 2.0,
            window: Duration::from_secs(10),
        });
        for _ in 0..50 {
            if let Ok(p) = throttle.try_acquire_with(0.999) {
                p.rejected();
            }
        }
        assert!(throttle.try_acquire_with(0.5).is_err());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(throttle.rejection_probability(), 0.0);
        assert!(throttle.try_acquire_with(0.0).is_ok());
    }
}
