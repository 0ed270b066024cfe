//! The limiter algorithms as pure state: `check` takes the quota and `now`
//! (nanoseconds since the limiter's origin) and never reads a clock.

use std::collections::VecDeque;
use std::time::Duration;

use super::{Algorithm, Decision, Quota};

/// The state one limiter (or one key of a keyed limiter) keeps.
#[derive(Debug, Clone, PartialEq)]
pub enum LimiterState {
    /// Count in the current aligned window.
    FixedWindow {
        /// Index of the window (`now / period`).
        window: u64,
        /// Admitted in that window.
        count: u64,
    },
    /// Counts of the current and previous windows, weighted by overlap.
    SlidingWindow {
        /// Index of the current window.
        window: u64,
        /// Admitted in the previous window.
        previous: u64,
        /// Admitted in the current window.
        current: u64,
    },
    /// The time of every admission in the last period (exact, one entry per unit).
    SlidingLog {
        /// Admission times, oldest first.
        log: VecDeque<u64>,
        /// The latest time judged, admitted or not.
        latest: u64,
    },
    /// Tokens left, refilled continuously.
    TokenBucket {
        /// Tokens in the bucket at `last`.
        tokens: f64,
        /// When `tokens` was computed.
        last: u64,
    },
    /// Generic cell rate algorithm: the theoretical arrival time of the next request.
    Gcra {
        /// Theoretical arrival time.
        tat: u64,
        /// The emission interval `tat` was computed with, so a quota change
        /// rescales what was consumed instead of re-pricing it.
        interval: u64,
    },
}

fn dur(ns: u64) -> Duration {
    Duration::from_nanos(ns)
}

/// GCRA: re-expresses what was consumed (`tat - now`, at emission interval
/// `used`) under a new `interval`, so a quota change keeps the count of
/// requests rather than their time.
pub(crate) fn rescale_gcra(tat: &mut u64, used: &mut u64, interval: u64, now: u64) {
    if *used == interval {
        return;
    }
    if *tat > now {
        let ahead = u128::from(*tat - now) * u128::from(interval) / u128::from(*used);
        *tat = now + u64::try_from(ahead).unwrap_or(u64::MAX - now);
    }
    *used = interval;
}

/// GCRA's quota as the two numbers its decision needs, so a limiter can
/// compute them once per quota instead of once per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GcraTerms {
    pub(crate) limit: u32,
    /// Nanoseconds between requests at the steady rate.
    pub(crate) interval: u64,
    /// How far the TAT may run ahead of now: `burst × interval`.
    pub(crate) window: u64,
    /// About `2^64 / interval`: turns the division for `remaining`
    /// into a multiplication (a hardware divide is a third of a decision).
    pub(crate) reciprocal: u64,
}

impl GcraTerms {
    pub(crate) fn new(quota: &Quota) -> Self {
        let interval = quota.emission_interval_nanos();
        GcraTerms {
            limit: quota.limit,
            interval,
            window: u64::from(quota.burst()).saturating_mul(interval),
            reciprocal: reciprocal(interval),
        }
    }

    /// `x / interval`, rounded down, by multiplying with the reciprocal.
    #[inline]
    fn per_interval(&self, x: u64) -> u64 {
        // The estimate is the quotient or one less; one step corrects it.
        let estimate = ((u128::from(x) * u128::from(self.reciprocal)) >> 64) as u64;
        let next = u128::from(estimate + 1) * u128::from(self.interval);
        estimate + u64::from(next <= u128::from(x))
    }

    /// What `cost` units cost, and the TAT once they are paid at `now`.
    #[inline]
    fn price(&self, tat: u64, now: u64, cost: u32) -> (u64, u64) {
        let price = u64::from(cost).saturating_mul(self.interval);
        (price, tat.max(now).saturating_add(price))
    }

    /// The decision on `cost` units at `now` given the TAT, and the TAT to
    /// store if it is admitted. One division, for `remaining`.
    #[inline]
    pub(crate) fn decide(&self, tat: u64, now: u64, cost: u32) -> (Decision, u64) {
        let (price, next) = self.price(tat, now, cost);
        let allowed = next - now <= self.window;
        let ahead = if allowed { next } else { tat.max(now) } - now;
        let decision = Decision {
            allowed,
            retry_after: (!allowed && price <= self.window).then(|| dur(next - now - self.window)),
            ..self.admitted(ahead)
        };
        (decision, next)
    }

    /// The decision on a request admitted with the TAT now `ahead` of the
    /// time it was judged at.
    #[inline]
    pub(crate) fn admitted(&self, ahead: u64) -> Decision {
        Decision {
            allowed: true,
            limit: self.limit,
            remaining: clamp_u32(self.per_interval(self.window - ahead.min(self.window))),
            reset: dur(ahead),
            retry_after: None,
        }
    }
}

/// `(2^64 - 1) / d` rounded down, for [`GcraTerms::per_interval`]: at most
/// one below `2^64 / d`, so the quotient estimate is off by at most one.
fn reciprocal(d: u64) -> u64 {
    u64::MAX / d.max(1)
}

/// GCRA on a TAT kept with the interval it was computed at (`used`).
fn check_gcra(tat: &mut u64, used: &mut u64, terms: &GcraTerms, now: u64, cost: u32) -> Decision {
    rescale_gcra(tat, used, terms.interval, now);
    let (decision, next) = terms.decide(*tat, now, cost);
    if decision.allowed {
        *tat = next;
    }
    decision
}

fn clamp_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl LimiterState {
    /// Fresh state: the whole quota is available.
    pub fn new(algorithm: Algorithm, quota: &Quota, now: u64) -> Self {
        match algorithm {
            Algorithm::FixedWindow => LimiterState::FixedWindow {
                window: 0,
                count: 0,
            },
            Algorithm::SlidingWindow => LimiterState::SlidingWindow {
                window: 0,
                previous: 0,
                current: 0,
            },
            Algorithm::SlidingLog => LimiterState::SlidingLog {
                log: VecDeque::new(),
                latest: now,
            },
            Algorithm::TokenBucket => LimiterState::TokenBucket {
                tokens: f64::from(quota.burst()),
                last: now,
            },
            Algorithm::Gcra => LimiterState::Gcra {
                tat: 0,
                interval: quota.emission_interval_nanos(),
            },
        }
    }

    /// The algorithm this state belongs to.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            LimiterState::FixedWindow { .. } => Algorithm::FixedWindow,
            LimiterState::SlidingWindow { .. } => Algorithm::SlidingWindow,
            LimiterState::SlidingLog { .. } => Algorithm::SlidingLog,
            LimiterState::TokenBucket { .. } => Algorithm::TokenBucket,
            LimiterState::Gcra { .. } => Algorithm::Gcra,
        }
    }

    /// Decides on a request of `cost` units at `now`, and admits it if allowed.
    ///
    /// Callers read the time before they reach the state, so `now` may be
    /// older than a time already counted. The windows, the log and the
    /// bucket judge such a request as of the latest time they have seen: a
    /// late arrival never reopens a window that has passed. GCRA, whose
    /// state is one timestamp, judges it at `now` (as governor does), which
    /// can give away at most the lateness times the rate.
    pub fn check(&mut self, quota: &Quota, now: u64, cost: u32) -> Decision {
        let limit = u64::from(quota.limit);
        let period = quota.period_nanos();
        let cost = u64::from(cost);
        match self {
            LimiterState::FixedWindow { window, count } => {
                let w = (now / period).max(*window);
                if w != *window {
                    *window = w;
                    *count = 0;
                }
                let end = (w + 1) * period - now.max(w * period);
                let allowed = *count + cost <= limit;
                if allowed {
                    *count += cost;
                }
                Decision {
                    allowed,
                    limit: quota.limit,
                    remaining: clamp_u32(limit.saturating_sub(*count)),
                    reset: if *count == 0 {
                        Duration::ZERO
                    } else {
                        dur(end)
                    },
                    retry_after: (!allowed && cost <= limit).then(|| dur(end)),
                }
            }
            LimiterState::SlidingWindow {
                window,
                previous,
                current,
            } => {
                let w = (now / period).max(*window);
                if w == *window + 1 {
                    *previous = *current;
                    *current = 0;
                } else if w != *window {
                    *previous = 0;
                    *current = 0;
                }
                *window = w;
                let elapsed = u128::from(now.saturating_sub(w * period));
                let p = u128::from(period);
                // Weighted count, scaled by the period to stay in integers.
                let scaled =
                    |prev: u64, cur: u64| u128::from(prev) * (p - elapsed) + u128::from(cur) * p;
                let cap = u128::from(limit) * p;
                let allowed = scaled(*previous, *current) + u128::from(cost) * p <= cap;
                if allowed {
                    *current += cost;
                }
                let used = scaled(*previous, *current);
                let remaining = clamp_u32((cap.saturating_sub(used) / p) as u64);
                let to_end = p - elapsed;
                let reset = if *current > 0 {
                    to_end + p
                } else if *previous > 0 {
                    to_end
                } else {
                    0
                };
                let retry_after = (!allowed && cost <= limit).then(|| {
                    let needed = u128::from(*current + cost) * p;
                    if needed <= cap {
                        // Wait for the previous window's weight to shrink enough.
                        let room = cap - needed;
                        to_end - (room / u128::from((*previous).max(1))).min(to_end)
                    } else {
                        // Wait into the next window, where `current` becomes the previous.
                        let room = u128::from(limit - cost) * p;
                        to_end + p - (room / u128::from((*current).max(1))).min(p)
                    }
                });
                Decision {
                    allowed,
                    limit: quota.limit,
                    remaining,
                    reset: dur(reset as u64),
                    retry_after: retry_after.map(|t| dur(t as u64)),
                }
            }
            LimiterState::SlidingLog { log, latest } => {
                *latest = (*latest).max(now);
                let now = *latest;
                while log.front().is_some_and(|&t| t + period <= now) {
                    log.pop_front();
                }
                let len = log.len() as u64;
                let allowed = len + cost <= limit;
                if allowed {
                    log.extend(std::iter::repeat_n(now, cost as usize));
                }
                let retry_after = (!allowed && cost <= limit).then(|| {
                    let expiring = (len + cost - limit - 1) as usize;
                    dur(log[expiring] + period - now)
                });
                Decision {
                    allowed,
                    limit: quota.limit,
                    remaining: clamp_u32(limit.saturating_sub(log.len() as u64)),
                    reset: log
                        .back()
                        .map_or(Duration::ZERO, |&t| dur(t + period - now)),
                    retry_after,
                }
            }
            LimiterState::TokenBucket { tokens, last } => {
                let capacity = f64::from(quota.burst());
                let (limit, period) = (limit as f64, period as f64);
                // elapsed × limit / period, in this order, keeps round numbers exact.
                let refill = now.saturating_sub(*last) as f64 * limit / period;
                *tokens = (*tokens + refill).min(capacity);
                *last = now.max(*last);
                let cost = cost as f64;
                let allowed = *tokens >= cost;
                if allowed {
                    *tokens -= cost;
                }
                let nanos_for = |missing: f64| dur((missing * period / limit).ceil() as u64);
                Decision {
                    allowed,
                    limit: quota.limit,
                    remaining: tokens.floor() as u32,
                    reset: nanos_for(capacity - *tokens),
                    retry_after: (!allowed && cost <= capacity).then(|| nanos_for(cost - *tokens)),
                }
            }
            LimiterState::Gcra { tat, interval } => {
                check_gcra(tat, interval, &GcraTerms::new(quota), now, cost as u32)
            }
        }
    }

    /// [`check`](Self::check) with GCRA's terms computed once by the caller
    /// for `quota`; other algorithms take the quota.
    #[inline]
    pub(crate) fn check_with(
        &mut self,
        quota: &Quota,
        terms: &GcraTerms,
        now: u64,
        cost: u32,
    ) -> Decision {
        match self {
            LimiterState::Gcra { tat, interval } => check_gcra(tat, interval, terms, now, cost),
            _ => self.check(quota, now, cost),
        }
    }

    /// Whether the state is as good as fresh at `now`, so forgetting it
    /// changes no decision.
    pub fn is_idle(&self, quota: &Quota, now: u64) -> bool {
        let period = quota.period_nanos();
        match self {
            LimiterState::FixedWindow { window, count } => *count == 0 || now / period != *window,
            LimiterState::SlidingWindow {
                window,
                previous,
                current,
            } => now / period >= window + 2 || (*previous == 0 && *current == 0),
            LimiterState::SlidingLog { log, .. } => log.back().is_none_or(|&t| t + period <= now),
            LimiterState::TokenBucket { tokens, last } => {
                let refill =
                    now.saturating_sub(*last) as f64 * f64::from(quota.limit) / period as f64;
                *tokens + refill >= f64::from(quota.burst())
            }
            LimiterState::Gcra { tat, .. } => *tat <= now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn division_by_reciprocal_is_exact() {
        let samples = [
            0,
            1,
            2,
            3,
            7,
            999,
            1_000_000_000,
            u64::from(u32::MAX),
            u64::MAX / 3,
            u64::MAX - 1,
            u64::MAX,
        ];
        for interval in samples.into_iter().filter(|&d| d > 0) {
            let quota = Quota::per_second(1);
            let terms = GcraTerms {
                interval,
                reciprocal: reciprocal(interval),
                ..GcraTerms::new(&quota)
            };
            for x in samples
                .into_iter()
                .chain(samples.map(|s| s.saturating_mul(interval)))
            {
                for x in [x.saturating_sub(1), x, x.saturating_add(1)] {
                    assert_eq!(terms.per_interval(x), x / interval, "{x} / {interval}");
                }
            }
        }
    }

    const SEC: u64 = 1_000_000_000;

    fn run(alg: Algorithm, quota: Quota, times: &[u64]) -> Vec<bool> {
        let mut state = LimiterState::new(alg, &quota, 0);
        times
            .iter()
            .map(|&t| state.check(&quota, t, 1).allowed)
            .collect()
    }

    #[test]
    fn fixed_window_resets_at_the_boundary() {
        let q = Quota::new(2, Duration::from_secs(1));
        assert_eq!(
            run(Algorithm::FixedWindow, q, &[0, 1, 2, SEC, SEC + 1]),
            [true, true, false, true, true]
        );
        let mut s = LimiterState::new(Algorithm::FixedWindow, &q, 0);
        s.check(&q, 0, 2);
        let d = s.check(&q, SEC / 4, 1);
        assert_eq!(d.retry_after, Some(Duration::from_millis(750)));
        assert_eq!(d.remaining, 0);
    }

    #[test]
    fn sliding_window_weighs_the_previous_window() {
        let q = Quota::new(10, Duration::from_secs(1));
        let mut s = LimiterState::new(Algorithm::SlidingWindow, &q, 0);
        assert!(s.check(&q, 0, 10).allowed);
        // Half way into the next window the previous counts for 5.
        let d = s.check(&q, SEC + SEC / 2, 5);
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        let d = s.check(&q, SEC + SEC / 2, 1);
        assert!(!d.allowed);
        // One more fits once the previous weight drops by one request: 100 ms.
        assert_eq!(d.retry_after, Some(Duration::from_millis(100)));
        assert!(s.check(&q, SEC + SEC * 6 / 10, 1).allowed);
    }

    #[test]
    fn sliding_log_is_exact() {
        let q = Quota::new(2, Duration::from_secs(1));
        assert_eq!(
            run(
                Algorithm::SlidingLog,
                q,
                &[0, SEC / 2, SEC - 1, SEC, SEC + SEC / 2]
            ),
            [true, true, false, true, true]
        );
    }

    #[test]
    fn token_bucket_and_gcra_allow_burst_then_rate() {
        let q = Quota::new(10, Duration::from_secs(1)).with_burst(3);
        for alg in [Algorithm::TokenBucket, Algorithm::Gcra] {
            let mut s = LimiterState::new(alg, &q, 0);
            let burst: Vec<bool> = (0..4).map(|_| s.check(&q, 0, 1).allowed).collect();
            assert_eq!(burst, [true, true, true, false], "{alg:?}");
            let d = s.check(&q, 0, 1);
            assert_eq!(d.retry_after, Some(Duration::from_millis(100)), "{alg:?}");
            assert_eq!(d.reset, Duration::from_millis(300), "{alg:?}");
            assert!(s.check(&q, SEC / 10, 1).allowed, "{alg:?}");
            assert!(!s.check(&q, SEC / 10, 1).allowed, "{alg:?}");
        }
    }

    #[test]
    fn cost_above_capacity_never_fits() {
        let q = Quota::new(2, Duration::from_secs(1));
        for alg in Algorithm::ALL {
            let mut s = LimiterState::new(alg, &q, 0);
            let d = s.check(&q, 0, 3);
            assert!(!d.allowed && d.retry_after.is_none(), "{alg:?}");
        }
    }
}
