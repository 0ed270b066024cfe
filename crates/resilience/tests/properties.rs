//! Property tests: the breaker against a reference model, backoff and jitter
//! bounds, and every limiter against its quota.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tidegate_resilience::breaker::{CircuitBreaker, CircuitState, Config, Outcome};
use tidegate_resilience::ratelimit::{Algorithm, Clock, Limit, LimiterState, Quota, RateLimiter};
use tidegate_resilience::retry::{Backoff, BackoffKind, Jitter};

/// The breaker as the DESIGN.md text says it, written as plainly as possible.
#[derive(Debug)]
enum Model {
    Closed {
        /// `(failed, slow)` of the last `window_size` calls.
        window: VecDeque<(bool, bool)>,
        consecutive: u32,
    },
    Open {
        until: u64,
    },
    HalfOpen {
        successes: u32,
    },
}

fn closed() -> Model {
    Model::Closed {
        window: VecDeque::new(),
        consecutive: 0,
    }
}

impl Model {
    fn state(&self) -> CircuitState {
        match self {
            Model::Closed { .. } => CircuitState::Closed,
            Model::Open { .. } => CircuitState::Open,
            Model::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// `(calls, failures, consecutive failures)` while closed.
    fn counts(&self) -> Option<(u32, u32, u32)> {
        match self {
            Model::Closed {
                window,
                consecutive,
            } => {
                let failures = window.iter().filter(|(f, _)| *f).count() as u32;
                Some((window.len() as u32, failures, *consecutive))
            }
            _ => None,
        }
    }

    /// One call admitted at `now` (ms) and ended `held` ms later; returns
    /// whether it was admitted.
    fn call(&mut self, cfg: &Config, now: u64, held: u64, outcome: Outcome) -> bool {
        let open_ms = cfg.open_duration.as_millis() as u64;
        let slow = Duration::from_millis(held) >= cfg.slow_call_duration;
        let end = now + held;
        if let Model::Open { until } = self {
            if now < *until {
                return false;
            }
            *self = Model::HalfOpen { successes: 0 };
        }
        match self {
            Model::Open { .. } => unreachable!(),
            Model::HalfOpen { successes } => match outcome {
                Outcome::Ignore => {}
                Outcome::Failure => {
                    *self = Model::Open {
                        until: end + open_ms,
                    }
                }
                Outcome::Success if slow => {
                    *self = Model::Open {
                        until: end + open_ms,
                    }
                }
                Outcome::Success => {
                    *successes += 1;
                    if *successes >= cfg.half_open_probes {
                        *self = closed();
                    }
                }
            },
            Model::Closed {
                window,
                consecutive,
            } => {
                let failed = match outcome {
                    Outcome::Ignore => return true,
                    Outcome::Success => false,
                    Outcome::Failure => true,
                };
                *consecutive = if failed { *consecutive + 1 } else { 0 };
                window.push_back((failed, slow));
                if window.len() > cfg.window_size as usize {
                    window.pop_front();
                }
                let failures = window.iter().filter(|(f, _)| *f).count() as f64;
                let slows = window.iter().filter(|(_, s)| *s).count() as f64;
                let calls = window.len() as f64;
                let judged = window.len() >= cfg.minimum_calls as usize;
                let trip = (cfg.consecutive_failures > 0
                    && *consecutive >= cfg.consecutive_failures)
                    || (judged && failures > 0.0 && failures / calls >= cfg.failure_rate)
                    || (judged && slows > 0.0 && slows / calls >= cfg.slow_call_rate);
                if trip {
                    *self = Model::Open {
                        until: end + open_ms,
                    };
                }
            }
        }
        true
    }
}

/// An outcome from a percentile draw: 5 % ignored, `failures` % failed.
fn outcome(draw: u8, failures: u8) -> Outcome {
    match draw {
        d if d < 5 => Outcome::Ignore,
        d if d < 5 + failures => Outcome::Failure,
        _ => Outcome::Success,
    }
}

/// A clock the test sets.
#[derive(Debug, Default)]
struct Manual(AtomicU64);

impl Clock for Manual {
    fn now_nanos(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Runs of successes long enough to fill the window leave the breaker
    /// quiet, where successes are recorded without its lock: the counts
    /// must still be the model's, call by call.
    #[test]
    fn breaker_matches_the_model(
        consecutive in 0u32..6,
        minimum_calls in 1u32..8,
        window_size in 8u32..16,
        failure_rate in 0.2f64..1.0,
        slow_call_rate in 0.2f64..=1.0,
        probes in 1u32..4,
        failures in 1u8..40,
        calls in prop::collection::vec((0u8..100, 0u64..400, prop::bool::weighted(0.1)), 1..300),
    ) {
        let cfg = Config {
            consecutive_failures: consecutive,
            minimum_calls,
            window_size,
            failure_rate,
            slow_call_rate,
            slow_call_duration: Duration::from_millis(500),
            half_open_probes: probes,
            open_duration: Duration::from_millis(1000),
            ..Config::default()
        };
        paused_runtime().block_on(async {
            let breaker = CircuitBreaker::new(cfg);
            let mut model = closed();
            let mut now = 0;
            for (i, (draw, wait, slow)) in calls.into_iter().enumerate() {
                let outcome = outcome(draw, failures);
                let held = if slow { 500 } else { 0 };
                tokio::time::advance(Duration::from_millis(wait)).await;
                now += wait;
                let expected = model.call(&cfg, now, held, outcome);
                match breaker.try_acquire() {
                    Ok(permit) => {
                        prop_assert!(expected, "call {i}: admitted, model rejects");
                        tokio::time::advance(Duration::from_millis(held)).await;
                        permit.record(outcome);
                    }
                    Err(_) => prop_assert!(!expected, "call {i}: rejected, model admits"),
                }
                if expected {
                    now += held;
                }
                let snapshot = breaker.snapshot();
                prop_assert_eq!(snapshot.state, model.state(), "after call {}", i);
                if let Some(counts) = model.counts() {
                    let got = (snapshot.calls, snapshot.failure_count, snapshot.consecutive_failures);
                    prop_assert_eq!(got, counts, "calls, failures, streak after call {}", i);
                }
            }
            Ok(())
        })?;
    }

    #[test]
    fn backoff_stays_within_bounds(
        kind in prop_oneof![Just(BackoffKind::Constant), Just(BackoffKind::Exponential)],
        jitter in prop_oneof![Just(Jitter::None), Just(Jitter::Full), Just(Jitter::Equal), Just(Jitter::Decorrelated)],
        base_ms in 1u64..2_000,
        max_ms in 1u64..60_000,
        multiplier in 1.0f64..10.0,
        retry in 1u32..200,
        previous_ms in 0u64..120_000,
        unit in 0.0f64..1.0,
    ) {
        let backoff = Backoff {
            kind,
            base: Duration::from_millis(base_ms),
            multiplier,
            max: Duration::from_millis(max_ms),
            jitter,
        };
        let delay = backoff.delay(retry, Duration::from_millis(previous_ms), unit);
        prop_assert!(delay <= backoff.max, "{delay:?} > max");
        let raw = Backoff { jitter: Jitter::None, ..backoff }.delay(retry, Duration::ZERO, 0.0);
        let base = backoff.base.min(backoff.max);
        let tolerance = Duration::from_micros(1);
        match jitter {
            Jitter::None => prop_assert_eq!(delay, raw),
            Jitter::Full => prop_assert!(delay <= raw + tolerance),
            Jitter::Equal => prop_assert!(delay + tolerance >= raw / 2 && delay <= raw + tolerance),
            Jitter::Decorrelated => prop_assert!(delay + tolerance >= base),
        }
    }

    #[test]
    fn no_limiter_admits_more_than_its_quota(
        limit in prop_oneof![Just(1u32), Just(2), Just(4), Just(5), Just(10), Just(20), Just(50)],
        burst in prop::option::of(1u32..20),
        requests in prop::collection::vec((0u64..300_000_000, 1u32..4, prop::option::weighted(0.2, 0u64..400_000_000)), 1..400),
    ) {
        let period: u64 = 1_000_000_000;
        let quota = Quota { limit, period: Duration::from_nanos(period), burst };
        for algorithm in Algorithm::ALL {
            let mut state = LimiterState::new(algorithm, &quota, 0);
            let mut now = 0u64;
            // Callers read the time before they reach the limiter, so some
            // arrive with a time older than one already counted. The quota
            // must hold at the latest time seen, whatever the order, except
            // for GCRA: its state is one timestamp, and it judges a request
            // at its caller's time (as governor does), so there the quota
            // holds over callers' times.
            let mut latest = 0u64;
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for &(wait, cost, late) in &requests {
                now += wait;
                let at = now.saturating_sub(late.unwrap_or(0));
                latest = latest.max(at);
                let decision = state.check(&quota, at, cost);
                prop_assert!(decision.remaining <= limit.max(quota.burst()));
                if decision.allowed {
                    let when = if algorithm == Algorithm::Gcra { at } else { latest };
                    admitted.push((when, u64::from(cost)));
                } else if let Some(after) = decision.retry_after {
                    prop_assert!(after > Duration::ZERO, "{algorithm:?}: denied with retry_after 0");
                }
            }
            let sum = |from: u64, to: u64| -> u64 {
                admitted.iter().filter(|(t, _)| *t >= from && *t < to).map(|(_, c)| c).sum()
            };
            for &(start, _) in &admitted {
                match algorithm {
                    Algorithm::FixedWindow | Algorithm::SlidingWindow => {
                        let window = start / period * period;
                        prop_assert!(sum(window, window + period) <= u64::from(limit), "{algorithm:?} aligned window at {window}");
                    }
                    Algorithm::SlidingLog => {
                        prop_assert!(sum(start, start + period) <= u64::from(limit), "{algorithm:?} window from {start}");
                    }
                    Algorithm::TokenBucket | Algorithm::Gcra => {
                        for &(end, _) in admitted.iter().filter(|(t, _)| *t >= start) {
                            let span = end - start;
                            let cap = u64::from(quota.burst()) + span * u64::from(limit) / period;
                            prop_assert!(sum(start, end + 1) <= cap, "{algorithm:?} from {start} to {end}");
                        }
                    }
                    _ => unreachable!(),
                }
            }
        }
    }

    /// `admit` is `check` without an admitted request's figures: the same
    /// requests pass, a refusal carries the same decision, and quota
    /// changes on the way keep them in step.
    #[test]
    fn admit_agrees_with_check(
        limit in 1u32..50,
        burst in prop::option::of(1u32..20),
        requests in prop::collection::vec((0u64..200_000_000, 1u32..4, prop::option::of(1u32..50)), 1..300),
    ) {
        let quota = Quota { limit, period: Duration::from_secs(1), burst };
        paused_runtime().block_on(async {
            for algorithm in Algorithm::ALL {
                let checked = RateLimiter::new(Limit::new(algorithm, quota));
                let admitted = RateLimiter::new(Limit::new(algorithm, quota));
                let start = tokio::time::Instant::now();
                let mut now = start;
                for (i, &(wait, cost, change)) in requests.iter().enumerate() {
                    now += Duration::from_nanos(wait);
                    if let Some(limit) = change.filter(|_| i % 7 == 3) {
                        tokio::time::advance(now - tokio::time::Instant::now()).await;
                        checked.set_quota(Quota { limit, ..quota });
                        admitted.set_quota(Quota { limit, ..quota });
                    }
                    let decision = checked.check_at(now, cost);
                    match admitted.admit_at(now, cost) {
                        Ok(()) => prop_assert!(decision.allowed, "{algorithm:?} request {i}: admitted, check refused"),
                        Err(refused) => prop_assert_eq!(*refused.decision(), decision, "{:?} request {}", algorithm, i),
                    }
                }
            }
            Ok(())
        })?;
    }

    /// A quota fast enough that a thread leases runs of GCRA's time: the
    /// thread's decisions, figures and all, are still those of GCRA on a
    /// TAT of its own, callers' late times included.
    #[test]
    fn one_thread_leasing_decides_as_gcra(
        limit in 2_000u32..4_000_000,
        burst in prop::option::of(128u32..100_000),
        requests in prop::collection::vec(
            (0u64..12, 1u32..4, prop::option::weighted(0.1, 0u64..20), prop::option::weighted(0.02, 0u64..3_000)),
            1..600,
        ),
    ) {
        let quota = Quota { limit, period: Duration::from_secs(1), burst };
        let interval = 1_000_000_000 / u64::from(limit);
        let time = Arc::new(Manual::default());
        let checked = RateLimiter::with_clock(Limit::new(Algorithm::Gcra, quota), time.clone());
        let admitted = RateLimiter::with_clock(Limit::new(Algorithm::Gcra, quota), time.clone());
        let mut gcra = LimiterState::new(Algorithm::Gcra, &quota, 0);
        let mut now = 0u64;
        for (i, &(quarters, cost, late, idle)) in requests.iter().enumerate() {
            // Mostly a quarter to three intervals apart: twice the rate
            // and more, or less; now and then idle for up to 3 000.
            now += quarters * interval / 4 + idle.unwrap_or(0) * interval;
            let at = now.saturating_sub(late.unwrap_or(0) * interval);
            time.0.store(at, Ordering::Relaxed);
            let expected = gcra.check(&quota, at, cost);
            prop_assert_eq!(checked.check_n(cost), expected, "request {}", i);
            prop_assert_eq!(admitted.admit_n(cost).is_ok(), expected.allowed, "request {}", i);
        }
    }
}
