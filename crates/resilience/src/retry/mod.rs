//! Retry: max attempts, constant or exponential backoff with jitter, a cap on
//! total time, server-hinted delays (Retry-After) and a shared retry budget.
//!
//! The operation sees which attempt it is running:
//!
//! ```
//! use std::time::Duration;
//! use tidegate_resilience::retry::{Config, Retry};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let retry = Retry::new(Config { base_delay: Duration::from_millis(10), ..Config::default() });
//! let result = retry
//!     .call(|attempt| async move {
//!         if attempt.number() < 3 { Err("flaky") } else { Ok(attempt.number()) }
//!     })
//!     .await;
//! assert_eq!(result.unwrap(), 3);
//! # }
//! ```

mod backoff;
mod budget;
mod layer;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub use self::backoff::{Backoff, BackoffKind, Jitter};
pub use self::budget::RetryBudget;
pub use self::layer::{RetryLayer, RetryService};
use crate::settings::{check, ConfigError};
use crate::Error;

/// Settings of a retry policy; the defaults are those of DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct Config {
    /// Attempts in all, the first call included. Default 3.
    pub max_attempts: u32,
    /// Constant or exponential. Default exponential.
    pub backoff: BackoffKind,
    /// The first delay. Default 100 ms.
    #[cfg_attr(feature = "serde", serde(with = "crate::settings::duration"))]
    pub base_delay: Duration,
    /// Growth per retry. Default 2.
    pub multiplier: f64,
    /// The longest delay, also the cap on a server's Retry-After. Default 5 s.
    #[cfg_attr(feature = "serde", serde(with = "crate::settings::duration"))]
    pub max_delay: Duration,
    /// Default full.
    pub jitter: Jitter,
    /// No retry starts after this much time since the first attempt. Default none.
    #[cfg_attr(feature = "serde", serde(with = "crate::settings::duration::option"))]
    pub max_elapsed: Option<Duration>,
    /// Retries may be this share of recent requests... Default 0.2.
    pub budget_ratio: f64,
    /// ...plus this many per second. Default 3.
    pub budget_min_per_sec: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_attempts: 3,
            backoff: BackoffKind::Exponential,
            base_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(5),
            jitter: Jitter::Full,
            max_elapsed: None,
            budget_ratio: 0.2,
            budget_min_per_sec: 3,
        }
    }
}

impl Config {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(self.max_attempts >= 1, "max_attempts", "must be at least 1")?;
        check(
            self.multiplier >= 1.0 && self.multiplier.is_finite(),
            "multiplier",
            "must be at least 1",
        )?;
        check(
            self.base_delay <= self.max_delay,
            "base_delay",
            "must not exceed max_delay",
        )?;
        check(
            self.budget_ratio >= 0.0 && self.budget_ratio.is_finite(),
            "budget_ratio",
            "must be 0 or more",
        )
    }

    /// The backoff schedule these settings describe.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            kind: self.backoff,
            base: self.base_delay,
            multiplier: self.multiplier,
            max: self.max_delay,
            jitter: self.jitter,
        }
    }
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAction {
    /// Return this result.
    Return,
    /// Retry after the backoff delay.
    Retry,
    /// Retry after this server-hinted delay (capped by `max_delay`).
    RetryAfter(Duration),
}

/// Decides whether a result is worth another attempt.
///
/// Any `Fn(&Result<T, E>) -> RetryAction` is one.
pub trait ShouldRetry<T, E> {
    /// What to do after an attempt that gave `result`.
    fn should_retry(&self, result: &Result<T, E>) -> RetryAction;
}

/// Retries every `Err`; returns every `Ok`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryOnErr;

impl<T, E> ShouldRetry<T, E> for RetryOnErr {
    fn should_retry(&self, result: &Result<T, E>) -> RetryAction {
        match result {
            Ok(_) => RetryAction::Return,
            Err(_) => RetryAction::Retry,
        }
    }
}

/// The pipeline's default: retries the operation's errors and attempt
/// timeouts, never local rejections (breaker open, bulkhead full, rate
/// limited, throttled) nor a passed deadline.
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryTransient;

impl<T, E> ShouldRetry<T, Error<E>> for RetryTransient {
    fn should_retry(&self, result: &Result<T, Error<E>>) -> RetryAction {
        match result {
            Err(e) if !e.is_rejection() && !e.is_deadline_exceeded() => RetryAction::Retry,
            _ => RetryAction::Return,
        }
    }
}

impl<T, E, F> ShouldRetry<T, E> for F
where
    F: Fn(&Result<T, E>) -> RetryAction,
{
    fn should_retry(&self, result: &Result<T, E>) -> RetryAction {
        self(result)
    }
}

/// What the operation knows about the attempt it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    number: u32,
    max: u32,
    deadline: Option<Instant>,
    /// Time left as the attempt began.
    left: Option<Duration>,
    /// When the attempt is cut off, and whether that is the deadline.
    cut: Option<(Instant, bool)>,
}

impl Attempt {
    pub(crate) fn new(number: u32, max: u32, deadline: Option<Instant>) -> Self {
        Attempt {
            number,
            max,
            deadline,
            left: None,
            cut: None,
        }
    }

    /// This attempt, beginning `now`, to be cut off at `cut`.
    pub(crate) fn beginning(mut self, now: Instant, cut: Option<(Instant, bool)>) -> Self {
        self.left = self.deadline.map(|d| d.saturating_duration_since(now));
        self.cut = cut;
        self
    }

    /// 1 for the first call, 2 for the first retry, …
    pub fn number(&self) -> u32 {
        self.number
    }

    /// Attempts allowed in all.
    pub fn max_attempts(&self) -> u32 {
        self.max
    }

    /// Whether this is the first call (not a retry).
    pub fn is_retry(&self) -> bool {
        self.number > 1
    }

    /// The overall deadline, if one is set.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Time left until the overall deadline, if one is set.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Time left until the overall deadline as a [`Pipeline`](crate::Pipeline)
    /// began this attempt, if one is set: what to tell the upstream, known
    /// without reading the clock again.
    pub fn remaining_at_start(&self) -> Option<Duration> {
        self.left
    }

    /// When a [`Pipeline`](crate::Pipeline) cuts this attempt off: the
    /// earlier of the end of its timeout and the deadline, if either is set.
    pub fn cut_off(&self) -> Option<Instant> {
        self.cut.map(|(at, _)| at)
    }

    /// Whether [`cut_off`](Attempt::cut_off) is the overall deadline
    /// (after which nothing is retried) rather than the attempt's timeout.
    pub fn cut_off_is_deadline(&self) -> bool {
        self.cut.is_some_and(|(_, deadline)| deadline)
    }
}

/// A retry policy; clones share the retry budget.
#[derive(Debug, Clone)]
pub struct Retry {
    config: Config,
    backoff: Backoff,
    budget: Option<Arc<RetryBudget>>,
}

impl Default for Retry {
    fn default() -> Self {
        Retry::new(Config::default())
    }
}

/// Where a retry loop stands: the attempt count, the last delay, the clock.
#[derive(Debug)]
pub(crate) struct Schedule<'a> {
    retry: &'a Retry,
    started: Instant,
    attempts: u32,
    previous: Duration,
}

/// What the loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Sleep this long, then attempt again.
    After(Duration),
    /// Stop. `exhausted` when the result wanted a retry but none was allowed.
    Stop { exhausted: bool },
}

impl Schedule<'_> {
    pub(crate) fn attempt(&self, deadline: Option<Instant>) -> Attempt {
        let (number, max) = self.numbers();
        Attempt::new(number, max, deadline)
    }

    /// The number of the next attempt, and the most attempts allowed.
    pub(crate) fn numbers(&self) -> (u32, u32) {
        (self.attempts, self.retry.config.max_attempts)
    }

    pub(crate) fn next(&mut self, action: RetryAction, deadline: Option<Instant>) -> Next {
        let cfg = &self.retry.config;
        let delay = match action {
            RetryAction::Return => return Next::Stop { exhausted: false },
            RetryAction::Retry => {
                self.retry
                    .backoff
                    .delay(self.attempts, self.previous, crate::rng::unit())
            }
            RetryAction::RetryAfter(hint) => hint.min(cfg.max_delay),
        };
        let now = Instant::now();
        let resume = now + delay;
        let allowed = self.attempts < cfg.max_attempts
            && cfg
                .max_elapsed
                .is_none_or(|max| resume.saturating_duration_since(self.started) <= max)
            && deadline.is_none_or(|deadline| resume < deadline)
            && self.retry.budget.as_ref().is_none_or(|b| b.try_withdraw());
        if !allowed {
            return Next::Stop { exhausted: true };
        }
        self.attempts += 1;
        self.previous = delay;
        Next::After(delay)
    }

    /// The result to hand back: after more than one attempt, a final error is
    /// wrapped as "retries exhausted" with the attempt count.
    pub(crate) fn finish<T, E>(
        &self,
        result: Result<T, Error<E>>,
        exhausted: bool,
    ) -> Result<T, Error<E>> {
        match result {
            Err(e) if exhausted && self.attempts > 1 => {
                Err(Error::retry_exhausted(self.attempts, e))
            }
            other => other,
        }
    }
}

impl Retry {
    /// A retry policy with its own budget.
    pub fn new(config: Config) -> Self {
        Retry {
            backoff: config.backoff(),
            budget: Some(Arc::new(RetryBudget::new(
                config.budget_ratio,
                config.budget_min_per_sec,
            ))),
            config,
        }
    }

    /// Shares `budget` with other policies (e.g. every route to one upstream).
    pub fn with_budget(mut self, budget: Arc<RetryBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Retries without a budget: only `max_attempts` and the clock limit them.
    pub fn without_budget(mut self) -> Self {
        self.budget = None;
        self
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The budget, if any.
    pub fn budget(&self) -> Option<&Arc<RetryBudget>> {
        self.budget.as_ref()
    }

    /// Starts a retry loop at `now`: counts the request in the budget.
    pub(crate) fn start(&self, now: Instant) -> Schedule<'_> {
        if let Some(budget) = &self.budget {
            budget.deposit_at(now);
        }
        Schedule {
            retry: self,
            started: now,
            attempts: 1,
            previous: self.config.base_delay,
        }
    }

    /// Runs `op`, retrying every `Err`.
    pub async fn call<F, Fut, T, E>(&self, op: F) -> Result<T, Error<E>>
    where
        F: FnMut(Attempt) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_with(op, RetryOnErr).await
    }

    /// Runs `op`; `policy` decides which results are retried and after what
    /// delay. A result that still wants a retry when none is left is returned
    /// as it is if `Ok` (say, the last 503 response), and wrapped as
    /// [`Error::is_retry_exhausted`] if `Err`.
    pub async fn call_with<F, Fut, T, E, P>(&self, mut op: F, policy: P) -> Result<T, Error<E>>
    where
        F: FnMut(Attempt) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        P: ShouldRetry<T, E>,
    {
        let mut schedule = self.start(Instant::now());
        loop {
            let result = op(schedule.attempt(None)).await;
            match schedule.next(policy.should_retry(&result), None) {
                Next::After(delay) => tokio::time::sleep(delay).await,
                Next::Stop { exhausted } => {
                    return schedule.finish(result.map_err(Error::inner_error), exhausted)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> Config {
        Config {
            base_delay: Duration::from_millis(100),
            jitter: Jitter::None,
            ..Config::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_attempts_with_the_last_error() {
        let retry = Retry::new(fast());
        let start = Instant::now();
        let err = retry
            .call(|a| async move { Err::<(), _>(a.number()) })
            .await
            .unwrap_err();
        assert_eq!(err.attempts(), Some(3));
        assert_eq!(err.into_inner(), Some(3));
        assert_eq!(start.elapsed(), Duration::from_millis(300), "100 + 200");
    }

    #[tokio::test(start_paused = true)]
    async fn server_hint_is_capped_by_max_delay() {
        let retry = Retry::new(Config {
            max_delay: Duration::from_secs(2),
            ..fast()
        });
        let start = Instant::now();
        let policy = |r: &Result<u32, u32>| match r {
            Err(_) => RetryAction::RetryAfter(Duration::from_secs(30)),
            Ok(_) => RetryAction::Return,
        };
        let r = retry
            .call_with(
                |a| async move {
                    if a.number() == 1 {
                        Err(1)
                    } else {
                        Ok(2)
                    }
                },
                policy,
            )
            .await;
        assert_eq!(r.unwrap(), 2);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn non_retryable_errors_return_at_once() {
        let retry = Retry::new(fast());
        let policy = |_: &Result<(), &str>| RetryAction::Return;
        let err = retry
            .call_with(|_| async { Err("bad request") }, policy)
            .await
            .unwrap_err();
        assert!(!err.is_retry_exhausted());
        assert_eq!(err.into_inner(), Some("bad request"));
    }

    #[tokio::test(start_paused = true)]
    async fn max_elapsed_stops_retries() {
        let retry = Retry::new(Config {
            max_attempts: 10,
            max_elapsed: Some(Duration::from_millis(350)),
            ..fast()
        });
        let err = retry
            .call(|_| async { Err::<(), _>(()) })
            .await
            .unwrap_err();
        // Delays 100, 200 fit in 350 ms; the next (400) would not.
        assert_eq!(err.attempts(), Some(3));
    }

    #[tokio::test(start_paused = true)]
    async fn budget_is_shared_by_clones() {
        let retry = Retry::new(Config {
            budget_ratio: 0.0,
            budget_min_per_sec: 0,
            ..fast()
        });
        let other = retry.clone();
        let err = other
            .call(|_| async { Err::<(), _>(()) })
            .await
            .unwrap_err();
        assert!(!err.is_retry_exhausted(), "no retry was allowed at all");
        assert_eq!(retry.budget().unwrap().remaining(), 0);
    }
}
