//! A pipeline: every policy in one declaration, applied in the documented
//! order, outermost first:
//!
//! fallback → deadline → retry (+budget) → circuit breaker → adaptive
//! throttle → rate limit → bulkhead → per-attempt timeout → the call.
//!
//! Errors stay flat (`Error<E>`, never `Error<Error<E>>`), and a call on the
//! happy path allocates nothing.
//!
//! ```
//! use std::time::Duration;
//! use tidegate_resilience::{breaker::CircuitBreaker, retry::Retry, Pipeline};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let pipeline = Pipeline::builder()
//!     .deadline(Duration::from_secs(5))
//!     .retry(Retry::default())
//!     .circuit_breaker(CircuitBreaker::default())
//!     .timeout(Duration::from_secs(1))
//!     .fallback_when(|e| e.is_circuit_open(), |_| async { Ok("fallback".to_string()) })
//!     .build();
//!
//! let answer = pipeline
//!     .call(|attempt| async move {
//!         assert!(attempt.remaining().unwrap() <= Duration::from_secs(5));
//!         if attempt.number() == 1 { Err("connection reset") } else { Ok("fresh".to_string()) }
//!     })
//!     .await;
//! assert_eq!(answer.unwrap(), "fresh");
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{timeout_at, Instant};

use crate::breaker::{CircuitBreaker, Outcome, Permit};
use crate::bulkhead::{Bulkhead, BulkheadPermit};
use crate::config::{ConfigError, PolicyConfig};
use crate::ratelimit::RateLimiter;
use crate::retry::{Attempt, Next, Retry, RetryAction, RetryTransient, Schedule, ShouldRetry};
use crate::throttle::{AdaptiveThrottle, ThrottlePermit};
use crate::{BoxFuture, Error};

type ClassifyFn<T, E> = Box<dyn Fn(&Result<T, E>) -> Outcome + Send + Sync>;
type RetryFn<T, E> = Box<dyn Fn(&Result<T, Error<E>>) -> RetryAction + Send + Sync>;
type WhenFn<E> = Box<dyn Fn(&Error<E>) -> bool + Send + Sync>;
type HandlerFn<T, E> = Box<dyn Fn(Error<E>) -> BoxFuture<Result<T, Error<E>>> + Send + Sync>;

struct Policies<T, E> {
    deadline: Option<Duration>,
    retry: Option<Retry>,
    breaker: Option<CircuitBreaker>,
    throttle: Option<Arc<AdaptiveThrottle>>,
    limiter: Option<Arc<RateLimiter>>,
    bulkhead: Option<Bulkhead>,
    timeout: Option<Duration>,
    /// The operation applies each attempt's cut-off itself.
    cut_by_operation: bool,
    /// The breaker judges whole calls, not attempts.
    breaker_per_call: bool,
    classify: Option<ClassifyFn<T, E>>,
    retry_on: Option<RetryFn<T, E>>,
    fallback: Option<(WhenFn<E>, HandlerFn<T, E>)>,
}

/// Policies composed in the documented order; clones share their state.
pub struct Pipeline<T, E> {
    policies: Arc<Policies<T, E>>,
}

impl<T, E> Clone for Pipeline<T, E> {
    fn clone(&self) -> Self {
        Pipeline {
            policies: self.policies.clone(),
        }
    }
}

impl<T, E> fmt::Debug for Pipeline<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &*self.policies;
        f.debug_struct("Pipeline")
            .field("deadline", &p.deadline)
            .field("retry", &p.retry)
            .field("breaker", &p.breaker)
            .field("throttle", &p.throttle.is_some())
            .field("limiter", &p.limiter.is_some())
            .field("bulkhead", &p.bulkhead)
            .field("timeout", &p.timeout)
            .field("fallback", &p.fallback.is_some())
            .finish()
    }
}

/// Builds a [`Pipeline`]; every policy is optional.
#[must_use = "call build() to get the pipeline"]
pub struct PipelineBuilder<T, E> {
    policies: Policies<T, E>,
}

impl<T, E> fmt::Debug for PipelineBuilder<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PipelineBuilder").finish_non_exhaustive()
    }
}

impl<T, E> Default for PipelineBuilder<T, E> {
    fn default() -> Self {
        PipelineBuilder {
            policies: Policies {
                deadline: None,
                retry: None,
                breaker: None,
                throttle: None,
                limiter: None,
                bulkhead: None,
                timeout: None,
                cut_by_operation: false,
                breaker_per_call: false,
                classify: None,
                retry_on: None,
                fallback: None,
            },
        }
    }
}

impl<T, E> PipelineBuilder<T, E> {
    /// The whole call, retries included, must end within `deadline`.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.policies.deadline = Some(deadline);
        self
    }

    /// Retries with this policy (and its budget).
    pub fn retry(mut self, retry: Retry) -> Self {
        self.policies.retry = Some(retry);
        self
    }

    /// Guards every attempt with this breaker.
    pub fn circuit_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.policies.breaker = Some(breaker);
        self
    }

    /// Throttles attempts adaptively.
    pub fn adaptive_throttle(mut self, throttle: Arc<AdaptiveThrottle>) -> Self {
        self.policies.throttle = Some(throttle);
        self
    }

    /// Rate-limits attempts.
    pub fn rate_limiter(mut self, limiter: Arc<RateLimiter>) -> Self {
        self.policies.limiter = Some(limiter);
        self
    }

    /// Runs attempts in this bulkhead.
    pub fn bulkhead(mut self, bulkhead: Bulkhead) -> Self {
        self.policies.bulkhead = Some(bulkhead);
        self
    }

    /// Cuts off each attempt after `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.policies.timeout = Some(timeout);
        self
    }

    /// Leaves cutting off each attempt to the operation, which reads when
    /// from [`Attempt::cut_off`] (the earlier of its timeout and the
    /// deadline): the pipeline arms no timer of its own. For an operation
    /// that runs a timer anyway because it must tell its own timeouts apart
    /// (a proxy that may send a timed-out request again only when it can
    /// replay the body), so that an attempt needs one timer, not two. Its
    /// cut-off result then counts for the breaker as `classify` says.
    pub fn cut_off_by_operation(mut self) -> Self {
        self.policies.cut_by_operation = true;
        self
    }

    /// Has the breaker judge each call once, by the outcome of its last
    /// attempt, rather than every attempt: a call that failed once and
    /// then succeeded on a retry is a success. The breaker is asked before
    /// the first attempt (an open breaker ends the call at once, and a
    /// half-open one admits a whole call, retries included, as its probe),
    /// and told when the last attempt ends; a slow call is one whose
    /// attempts and backoffs together took longer than the breaker's
    /// `slow_call_duration`. For callers whose retries go elsewhere than
    /// the attempt that failed (a proxy retrying on another endpoint),
    /// where a failed attempt says something of that endpoint, judged by
    /// outlier detection, and not of the service the breaker stands for.
    /// A call that no attempt reached (turned away by the limiter or the
    /// bulkhead) counts for nothing.
    pub fn breaker_per_call(mut self) -> Self {
        self.policies.breaker_per_call = true;
        self
    }

    /// How results count for the breaker and throttle (default: `Err` fails).
    /// Timeouts always count as failures.
    pub fn classify(
        mut self,
        classify: impl Fn(&Result<T, E>) -> Outcome + Send + Sync + 'static,
    ) -> Self {
        self.policies.classify = Some(Box::new(classify));
        self
    }

    /// Which results are retried (default [`RetryTransient`]: errors and
    /// attempt timeouts, never local rejections nor a passed deadline).
    pub fn retry_on(
        mut self,
        retry_on: impl Fn(&Result<T, Error<E>>) -> RetryAction + Send + Sync + 'static,
    ) -> Self {
        self.policies.retry_on = Some(Box::new(retry_on));
        self
    }

    /// Answers errors for which `when` holds with `handler`, outside everything else.
    pub fn fallback_when<W, H, Fut>(mut self, when: W, handler: H) -> Self
    where
        W: Fn(&Error<E>) -> bool + Send + Sync + 'static,
        H: Fn(Error<E>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, Error<E>>> + Send + 'static,
    {
        self.policies.fallback = Some((
            Box::new(when),
            Box::new(move |err| Box::pin(handler(err)) as BoxFuture<_>),
        ));
        self
    }

    /// The pipeline.
    pub fn build(self) -> Pipeline<T, E> {
        Pipeline {
            policies: Arc::new(self.policies),
        }
    }
}

impl<T, E> Pipeline<T, E> {
    /// An empty builder.
    pub fn builder() -> PipelineBuilder<T, E> {
        PipelineBuilder::default()
    }

    /// A builder with the policies of `config` (validated first): timeout,
    /// deadline, retry, breaker and bulkhead, plus adaptive throttling and a
    /// rate limit when configured.
    pub fn from_config(config: &PolicyConfig) -> Result<PipelineBuilder<T, E>, ConfigError> {
        config.validate()?;
        let mut builder = Pipeline::builder()
            .retry(Retry::new(config.retry))
            .circuit_breaker(CircuitBreaker::new(config.circuit_breaker))
            .bulkhead(Bulkhead::new(config.bulkhead));
        if let Some(deadline) = config.deadline {
            builder = builder.deadline(deadline);
        }
        if let Some(timeout) = config.timeout {
            builder = builder.timeout(timeout);
        }
        if let Some(throttle) = config.adaptive_throttle {
            builder = builder.adaptive_throttle(Arc::new(AdaptiveThrottle::new(throttle)));
        }
        if let Some(limit) = config.rate_limit {
            builder = builder.rate_limiter(Arc::new(RateLimiter::new(limit)));
        }
        Ok(builder)
    }

    /// A builder for another pipeline over the same policies: breaker,
    /// bulkhead, retry budget, limiter and throttle share their state with
    /// this one; deadline and timeout are copied; classify, retry_on and
    /// fallback start empty. For calls that need different retry rules
    /// against the same protections.
    pub fn share_policies<T2, E2>(&self) -> PipelineBuilder<T2, E2> {
        let p = &*self.policies;
        let mut builder = PipelineBuilder::default();
        builder.policies.deadline = p.deadline;
        builder.policies.retry = p.retry.clone();
        builder.policies.breaker = p.breaker.clone();
        builder.policies.throttle = p.throttle.clone();
        builder.policies.limiter = p.limiter.clone();
        builder.policies.bulkhead = p.bulkhead.clone();
        builder.policies.timeout = p.timeout;
        builder.policies.cut_by_operation = p.cut_by_operation;
        builder.policies.breaker_per_call = p.breaker_per_call;
        builder
    }

    /// The breaker, for its state and events.
    pub fn circuit_breaker(&self) -> Option<&CircuitBreaker> {
        self.policies.breaker.as_ref()
    }

    /// The bulkhead, for its use.
    pub fn bulkhead(&self) -> Option<&Bulkhead> {
        self.policies.bulkhead.as_ref()
    }

    /// The retry policy, for its budget.
    pub fn retry(&self) -> Option<&Retry> {
        self.policies.retry.as_ref()
    }

    /// The rate limiter.
    pub fn rate_limiter(&self) -> Option<&RateLimiter> {
        self.policies.limiter.as_deref()
    }

    /// The adaptive throttle.
    pub fn adaptive_throttle(&self) -> Option<&AdaptiveThrottle> {
        self.policies.throttle.as_deref()
    }

    /// Runs `op` through every policy. `op` is called once per attempt and
    /// learns the attempt number and the remaining deadline from [`Attempt`].
    /// The clock starts when the call is first polled.
    pub async fn call<'a, F, Fut>(&'a self, op: F) -> Result<T, Error<E>>
    where
        F: FnMut(Attempt) -> Fut + 'a,
        Fut: Future<Output = Result<T, E>> + 'a,
    {
        self.call_observed_at(Instant::now(), op, |_, _, _| {})
            .await
    }

    /// [`call`](Pipeline::call) at `now`, the time as the caller just read
    /// it (one read of the clock serves both): the deadline runs from
    /// there, and the first attempt begins there.
    pub fn call_at<'a, F, Fut>(
        &'a self,
        now: Instant,
        op: F,
    ) -> impl Future<Output = Result<T, Error<E>>> + 'a
    where
        F: FnMut(Attempt) -> Fut + 'a,
        Fut: Future<Output = Result<T, E>> + 'a,
    {
        self.call_observed_at(now, op, |_, _, _| {})
    }

    /// [`call`](Pipeline::call), telling `on_retry` of every retry before
    /// its backoff: the result being retried, the number of the attempt
    /// that gave it, and the delay before the next one.
    pub async fn call_observed<'a, F, Fut, R>(&'a self, op: F, on_retry: R) -> Result<T, Error<E>>
    where
        F: FnMut(Attempt) -> Fut + 'a,
        Fut: Future<Output = Result<T, E>> + 'a,
        R: FnMut(&Result<T, Error<E>>, u32, Duration) + 'a,
    {
        self.call_observed_at(Instant::now(), op, on_retry).await
    }

    /// [`call_observed`](Pipeline::call_observed) at `now`, the time as
    /// the caller just read it (see [`call_at`](Pipeline::call_at)).
    pub fn call_observed_at<'a, F, Fut, R>(
        &'a self,
        now: Instant,
        op: F,
        on_retry: R,
    ) -> impl Future<Output = Result<T, Error<E>>> + 'a
    where
        F: FnMut(Attempt) -> Fut + 'a,
        Fut: Future<Output = Result<T, E>> + 'a,
        R: FnMut(&Result<T, Error<E>>, u32, Duration) + 'a,
    {
        Then {
            run: self.run(now, None, op, on_retry),
            then: |(result, _)| result,
        }
    }

    /// [`call_observed_at`](Pipeline::call_observed_at), and the time the
    /// call ended if a clock read timed it: the breaker's after the last
    /// attempt, so a caller that times the whole call (for a metric) need
    /// not read the clock again. `None` when nothing read it (no breaker,
    /// or a fallback answered): the caller reads it then.
    pub fn call_timed_at<'a, F, Fut, R>(
        &'a self,
        now: Instant,
        op: F,
        on_retry: R,
    ) -> impl Future<Output = (Result<T, Error<E>>, Option<Instant>)> + 'a
    where
        F: FnMut(Attempt) -> Fut + 'a,
        Fut: Future<Output = Result<T, E>> + 'a,
        R: FnMut(&Result<T, Error<E>>, u32, Duration) + 'a,
    {
        self.call_timed_within(now, None, op, on_retry)
    }

    /// [`call_timed_at`](Pipeline::call_timed_at), ending within `limit`
    /// as well when that comes before the policy's deadline: a caller's
    /// own deadline, such as a gRPC call's `grpc-timeout`. Attempts learn
    /// the earlier of the two as their deadline.
    pub fn call_timed_within<'a, F, Fut, R>(
        &'a self,
        now: Instant,
        limit: Option<Duration>,
        op: F,
        on_retry: R,
    ) -> impl Future<Output = (Result<T, Error<E>>, Option<Instant>)> + 'a
    where
        F: FnMut(Attempt) -> Fut + 'a,
        Fut: Future<Output = Result<T, E>> + 'a,
        R: FnMut(&Result<T, Error<E>>, u32, Duration) + 'a,
    {
        self.run(now, limit, op, on_retry)
    }

    /// The error of a call with a deadline of `budget` that passed.
    fn passed(budget: Option<Duration>) -> Error<E> {
        Error::deadline_exceeded(budget.unwrap_or_default())
    }

    /// The deadline of a call that begins now: the policy's, or `limit`
    /// when that is shorter.
    fn budget(&self, limit: Option<Duration>) -> Option<Duration> {
        match (self.policies.deadline, limit) {
            (Some(deadline), Some(limit)) => Some(deadline.min(limit)),
            (deadline, limit) => deadline.or(limit),
        }
    }

    /// Whether the fallback answers a call that ended in `err`.
    fn falls_back(&self, err: &Error<E>) -> bool {
        self.policies
            .fallback
            .as_ref()
            .is_some_and(|(when, _)| when(err))
    }

    /// The fallback's answer to `err` (see [`falls_back`](Self::falls_back)).
    fn fall_back(&self, err: Error<E>) -> BoxFuture<Result<T, Error<E>>> {
        let (_, handler) = self.policies.fallback.as_ref().expect("a fallback is set");
        handler(err)
    }

    /// A whole call: every attempt through breaker, throttle, limiter,
    /// bulkhead and timeout, the backoffs between them, and the fallback.
    /// Returns the time the call ended too, if the breaker read it (see
    /// [`call_timed_at`](Self::call_timed_at)).
    ///
    /// One `async` block, not an `async fn` calling others: a caller's task
    /// carries this future, so its size and its moves are paid on every
    /// call. An `async fn` keeps a second copy of its arguments; each
    /// future awaited inside another keeps its own copy of what both use,
    /// and its result is moved once more on the way out.
    #[allow(clippy::manual_async_fn)] // an `async fn` would copy its arguments: see above
    fn run<'a, F, Fut, R>(
        &'a self,
        mut now: Instant,
        limit: Option<Duration>,
        mut op: F,
        mut on_retry: R,
    ) -> impl Future<Output = (Result<T, Error<E>>, Option<Instant>)> + 'a
    where
        F: FnMut(Attempt) -> Fut + 'a,
        Fut: Future<Output = Result<T, E>> + 'a,
        R: FnMut(&Result<T, Error<E>>, u32, Duration) + 'a,
    {
        // Outside the block: only what it needs is kept in the future.
        let budget = self.budget(limit);
        async move {
            let p = &*self.policies;
            // `now` is the start until the first attempt has begun.
            let deadline = budget.map(|d| now + d);
            let mut schedule = p.retry.as_ref().map(|retry| retry.start(now));
            // A breaker that judges whole calls is asked once, before the first attempt.
            let (result, ended) = 'call: {
                // The breaker's leave: the call's, or (taken anew for each
                // attempt) the attempt's; one slot in the future for both.
                let mut breaker = match self.judge(now) {
                    Ok(judge) => judge,
                    Err(err) => break 'call (Err(err), None),
                };
                // The outcome of the last attempt that ran, for such a breaker.
                let mut outcome = Outcome::Ignore;
                // Only the last attempt's end counts, and only if it got that far.
                let (result, mut ended) = loop {
                    let (number, max) = schedule.as_ref().map_or((1, 1), Schedule::numbers);
                    // One attempt, and the clock read that ended it. A policy that
                    // turns it away ends it with its error, before any read.
                    let (result, ended) = 'attempt: {
                        // One clock read serves every policy on the way in, one on the way out.
                        let throttle = match self.admit(now, &mut breaker) {
                            Ok(throttle) => throttle,
                            Err(err) => break 'attempt (Err(err), None),
                        };
                        // A free slot is taken at once; only a wait in the queue moves the clock on.
                        let _slot = match &p.bulkhead {
                            None => None,
                            Some(b) => match b.try_acquire() {
                                Ok(slot) => Some(slot),
                                Err(_) => match self.queue(b, deadline, budget).await {
                                    Ok(slot) => {
                                        now = Instant::now();
                                        Some(slot)
                                    }
                                    Err(err) => break 'attempt (Err(err), None),
                                },
                            },
                        };
                        // In a block: what is needed only before the await
                        // keeps no room in the future after it.
                        let (attempt, timer) = {
                            let cut = self.cut(now, deadline);
                            let attempt = Attempt::new(number, max, deadline).beginning(now, cut);
                            (attempt, cut.filter(|_| !p.cut_by_operation))
                        };
                        let timed: Result<Result<T, E>, Error<E>> = match timer {
                            None => Ok(op(attempt).await),
                            Some((at, is_deadline)) => match timeout_at(at, op(attempt)).await {
                                Ok(result) => Ok(result),
                                Err(_) if is_deadline => Err(Self::passed(budget)),
                                Err(_) => Err(Error::timeout(p.timeout.unwrap_or_default())),
                            },
                        };
                        let attempts = breaker.take_if(|_| !p.breaker_per_call);
                        let (result, ended, judged) = self.settle(timed, attempts, throttle);
                        outcome = judged;
                        (result, ended)
                    };
                    // An attempt the bulkhead turned away leaves its leave unused.
                    if !p.breaker_per_call {
                        breaker = None;
                    }
                    // The result is moved on, never borrowed here: a borrowed
                    // local keeps its room in the future across every await.
                    let delay =
                        match self.next(schedule.as_mut(), result, number, deadline, &mut on_retry)
                        {
                            ControlFlow::Continue(delay) => delay,
                            ControlFlow::Break(result) => break (result, ended),
                        };
                    tokio::time::sleep(delay).await;
                    now = Instant::now();
                };
                if let Some(permit) = breaker.filter(|_| p.breaker_per_call) {
                    let end = Instant::now();
                    permit.record_at(outcome, end);
                    ended = Some(end);
                }
                (result, ended)
            };
            // Matched in place: the result is moved no more than it must be.
            match result {
                Err(err) if self.falls_back(&err) => (self.fall_back(err).await, None),
                result => (result, ended),
            }
        }
    }

    /// The breaker's leave for a whole call, when it judges calls.
    fn judge(&self, now: Instant) -> Result<Option<Permit<'_>>, Error<E>> {
        let p = &*self.policies;
        match &p.breaker {
            Some(breaker) if p.breaker_per_call => Ok(Some(breaker.try_acquire_at(now)?)),
            _ => Ok(None),
        }
    }

    /// A slot of `bulkhead` once one is free, waited for in its queue no
    /// later than `deadline` (of a call with a deadline of `budget`).
    async fn queue<'b>(
        &self,
        bulkhead: &'b Bulkhead,
        deadline: Option<Instant>,
        budget: Option<Duration>,
    ) -> Result<BulkheadPermit<'b>, Error<E>> {
        let slot = match deadline {
            None => bulkhead.acquire().await,
            Some(at) => timeout_at(at, bulkhead.acquire())
                .await
                .map_err(|_| Self::passed(budget))?,
        };
        Ok(slot?)
    }

    /// The way into an attempt at `now`: the breaker's leave into
    /// `breaker` (unless it judges whole calls: then `breaker` holds the
    /// call's), the throttle's and the limiter's, or the first refusal.
    fn admit<'b>(
        &'b self,
        now: Instant,
        breaker: &mut Option<Permit<'b>>,
    ) -> Result<Option<ThrottlePermit<'b>>, Error<E>> {
        let p = &*self.policies;
        let attempts = p.breaker.as_ref().filter(|_| !p.breaker_per_call);
        let permit = attempts.map(|b| b.try_acquire_at(now)).transpose()?;
        let throttle = p.throttle.as_ref().map(|t| t.try_acquire()).transpose()?;
        if let Some(limiter) = &p.limiter {
            limiter.admit_at(now, 1)?;
        }
        if permit.is_some() {
            *breaker = permit;
        }
        Ok(throttle)
    }

    /// When an attempt that begins at `begun` is cut off: at its timeout
    /// or at the deadline, whichever comes first, and whether that is the
    /// deadline.
    fn cut(&self, begun: Instant, deadline: Option<Instant>) -> Option<(Instant, bool)> {
        match (self.policies.timeout.map(|t| begun + t), deadline) {
            (Some(a), Some(d)) => Some((a.min(d), d <= a)),
            (Some(a), None) => Some((a, false)),
            (None, Some(d)) => Some((d, true)),
            (None, None) => None,
        }
    }

    /// The way out of an attempt: its outcome told to the breaker and the
    /// throttle, and its result, with the time the breaker read and the
    /// outcome.
    fn settle(
        &self,
        timed: Result<Result<T, E>, Error<E>>,
        breaker: Option<Permit<'_>>,
        throttle: Option<ThrottlePermit<'_>>,
    ) -> (Result<T, Error<E>>, Option<Instant>, Outcome) {
        let outcome = match (&timed, &self.policies.classify) {
            (Err(_), _) => Outcome::Failure,
            (Ok(result), Some(classify)) => classify(result),
            (Ok(Ok(_)), None) => Outcome::Success,
            (Ok(Err(_)), None) => Outcome::Failure,
        };
        let ended = breaker.map(|permit| {
            let now = Instant::now();
            permit.record_at(outcome, now);
            now
        });
        if let Some(permit) = throttle {
            permit.record(outcome);
        }
        (
            timed.and_then(|result| result.map_err(Error::inner_error)),
            ended,
            outcome,
        )
    }

    /// After attempt `number`: the delay before the next, or the call's result.
    fn next<R>(
        &self,
        schedule: Option<&mut Schedule<'_>>,
        result: Result<T, Error<E>>,
        number: u32,
        deadline: Option<Instant>,
        on_retry: &mut R,
    ) -> ControlFlow<Result<T, Error<E>>, Duration>
    where
        R: FnMut(&Result<T, Error<E>>, u32, Duration),
    {
        let Some(schedule) = schedule else {
            return ControlFlow::Break(result);
        };
        let action = match &self.policies.retry_on {
            Some(retry_on) => retry_on(&result),
            None => RetryTransient.should_retry(&result),
        };
        match schedule.next(action, deadline) {
            Next::After(delay) => {
                on_retry(&result, number, delay);
                ControlFlow::Continue(delay)
            }
            Next::Stop { exhausted } => ControlFlow::Break(schedule.finish(result, exhausted)),
        }
    }
}

pin_project_lite::pin_project! {
    /// A call's future with its output passed through `then`: no future of
    /// its own, so nothing more to carry or move.
    struct Then<Run, F> {
        #[pin]
        run: Run,
        then: F,
    }
}

impl<Run: Future, F: Fn(Run::Output) -> O, O> Future for Then<Run, F> {
    type Output = O;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<O> {
        let this = self.project();
        this.run.poll(cx).map(|output| (this.then)(output))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::{CircuitState, Config as BreakerConfig};
    use crate::ratelimit::{Algorithm, Limit, Quota};
    use crate::retry::{Config as RetryConfig, Jitter};
    use std::sync::atomic::{AtomicU32, Ordering};

    fn retry() -> Retry {
        Retry::new(RetryConfig {
            jitter: Jitter::None,
            ..RetryConfig::default()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn attempt_timeouts_are_retried_and_count_against_the_breaker() {
        let breaker = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 3,
            ..BreakerConfig::default()
        });
        let pipeline: Pipeline<(), ()> = Pipeline::builder()
            .retry(retry())
            .circuit_breaker(breaker.clone())
            .timeout(Duration::from_millis(50))
            .build();
        let err = pipeline
            .call(|_| std::future::pending::<Result<(), ()>>())
            .await
            .unwrap_err();
        assert_eq!(err.attempts(), Some(3));
        assert!(err.last_error().unwrap().is_timeout());
        assert_eq!(breaker.state(), CircuitState::Open);
        let rejected = pipeline.call(|_| async { Ok(()) }).await.unwrap_err();
        assert!(rejected.is_circuit_open(), "open breaker is not retried");
    }

    #[tokio::test(start_paused = true)]
    async fn a_breaker_per_call_judges_the_last_attempt_of_each_call() {
        let breaker_with = |consecutive_failures| {
            CircuitBreaker::new(BreakerConfig {
                consecutive_failures,
                ..BreakerConfig::default()
            })
        };
        let pipeline = |breaker: &CircuitBreaker, per_call: bool| {
            let builder: PipelineBuilder<u32, &str> = Pipeline::builder()
                .retry(retry())
                .circuit_breaker(breaker.clone());
            if per_call {
                builder.breaker_per_call()
            } else {
                builder
            }
            .build()
        };
        let flaky = |a: Attempt| async move {
            if a.number() == 1 {
                Err("refused")
            } else {
                Ok(a.number())
            }
        };

        // A failed first attempt opens a breaker of one failure that judges attempts…
        let attempts = breaker_with(1);
        let err = pipeline(&attempts, false).call(flaky).await.unwrap_err();
        assert!(err.is_circuit_open(), "{err:?}");
        // …but not one that judges calls: the call succeeded.
        let calls = breaker_with(1);
        let per_call = pipeline(&calls, true);
        for _ in 0..5 {
            assert_eq!(per_call.call(flaky).await.unwrap(), 2);
        }
        assert_eq!(calls.state(), CircuitState::Closed);

        // A call whose three attempts fail is one failure.
        let twice = breaker_with(2);
        let per_call = pipeline(&twice, true);
        let ran = AtomicU32::new(0);
        let failing = |_| {
            ran.fetch_add(1, Ordering::SeqCst);
            async { Err::<u32, _>("refused") }
        };
        let err = per_call.call(failing).await.unwrap_err();
        assert_eq!(err.attempts(), Some(3));
        assert_eq!(twice.state(), CircuitState::Closed);
        per_call.call(failing).await.unwrap_err();
        assert_eq!(twice.state(), CircuitState::Open);
        let err = per_call.call(failing).await.unwrap_err();
        assert!(err.is_circuit_open(), "{err:?}");
        assert_eq!(
            ran.load(Ordering::SeqCst),
            6,
            "an open breaker lets no attempt run"
        );

        // Half-open, one whole call is the probe, its retries included.
        tokio::time::advance(BreakerConfig::default().open_duration).await;
        assert_eq!(per_call.call(flaky).await.unwrap(), 2);
        assert_eq!(twice.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_callers_limit_shortens_the_deadline_never_lengthens_it() {
        let pipeline: Pipeline<(), &str> = Pipeline::builder()
            .deadline(Duration::from_secs(30))
            .retry(retry())
            .build();
        for (limit, expected) in [
            (Some(Duration::from_secs(2)), Duration::from_secs(2)),
            (Some(Duration::from_secs(60)), Duration::from_secs(30)),
            (None, Duration::from_secs(30)),
        ] {
            let start = Instant::now();
            let (result, _) = pipeline
                .call_timed_within(
                    start,
                    limit,
                    |a| {
                        assert_eq!(a.remaining_at_start(), Some(expected));
                        std::future::pending()
                    },
                    |_, _, _| {},
                )
                .await;
            let err = result.unwrap_err();
            assert!(err.is_deadline_exceeded(), "{err:?}");
            assert_eq!(start.elapsed(), expected);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_observed_with_their_delays() {
        let pipeline: Pipeline<(), &str> = Pipeline::builder().retry(retry()).build();
        let mut seen = Vec::new();
        let err = pipeline
            .call_observed(
                |_| async { Err("reset") },
                |result, number, delay| seen.push((result.is_err(), number, delay)),
            )
            .await
            .unwrap_err();
        assert_eq!(err.attempts(), Some(3));
        assert_eq!(
            seen,
            [
                (true, 1, Duration::from_millis(100)),
                (true, 2, Duration::from_millis(200))
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_bounds_retries_and_attempts() {
        let pipeline: Pipeline<(), &str> = Pipeline::builder()
            .deadline(Duration::from_millis(250))
            .retry(retry())
            .timeout(Duration::from_secs(10))
            .build();
        let calls = AtomicU32::new(0);
        let start = Instant::now();
        let err = pipeline
            .call(|a| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if a.number() == 1 {
                        Err("reset")
                    } else {
                        std::future::pending().await
                    }
                }
            })
            .await
            .unwrap_err();
        assert!(
            err.is_deadline_exceeded(),
            "a passed deadline is not retried: {err:?}"
        );
        assert_eq!(start.elapsed(), Duration::from_millis(250));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    /// A call waiting in the bulkhead's queue: its attempt begins (and its
    /// timeout runs) once it has a slot, and a deadline that passes in the
    /// queue ends it without calling the operation.
    #[tokio::test(start_paused = true)]
    async fn a_queued_call_begins_when_it_has_a_slot_and_not_after_its_deadline() {
        let ms = Duration::from_millis;
        let bulkhead = Bulkhead::new(crate::bulkhead::Config {
            max_concurrent: 1,
            max_queued: 2,
            max_wait: Duration::from_secs(60),
        });
        let holder: Pipeline<(), &str> = Pipeline::builder().bulkhead(bulkhead.clone()).build();
        let queued: Pipeline<Duration, &str> = Pipeline::builder()
            .bulkhead(bulkhead.clone())
            .deadline(ms(1000))
            .timeout(ms(300))
            .build();
        let start = Instant::now();

        // The slot is held for 600 ms; the queued call's attempt then has
        // 400 ms of its deadline left, and its own 300 ms to run.
        let hold = holder.call(|_| async {
            tokio::time::sleep(ms(600)).await;
            Ok(())
        });
        let waited = queued.call(|a| async move {
            assert_eq!(a.cut_off(), Some(start + ms(900)));
            Ok(a.remaining_at_start().unwrap())
        });
        let (held, waited) = tokio::join!(hold, waited);
        held.unwrap();
        assert_eq!(waited.unwrap(), ms(400));

        // Held for 5 s: the deadline passes in the queue.
        let calls = AtomicU32::new(0);
        let hold = holder.call(|_| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        });
        let start = Instant::now();
        let late = queued.call(|_| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok(Duration::ZERO) }
        });
        let late = async {
            let err = late.await.unwrap_err();
            (err, start.elapsed())
        };
        let (held, (err, waited)) = tokio::join!(hold, late);
        held.unwrap();
        assert!(err.is_deadline_exceeded(), "{err:?}");
        assert_eq!(waited, ms(1000));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(bulkhead.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_know_the_time_left_as_they_begin() {
        let pipeline: Pipeline<(), &str> = Pipeline::builder()
            .deadline(Duration::from_millis(250))
            .retry(retry())
            .build();
        let mut told = Vec::new();
        let err = pipeline
            .call_at(Instant::now(), |a| {
                told.push((a.number(), a.remaining_at_start(), a.remaining()));
                async { Err("reset") }
            })
            .await
            .unwrap_err();
        // Backoffs of 100 ms, then 200 ms (no jitter): the second would end
        // past the 250 ms deadline, so there is no third.
        assert_eq!(err.attempts(), Some(2));
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(told, [(1, ms(250), ms(250)), (2, ms(150), ms(150))]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_call_tells_when_it_ended() {
        let ms = Duration::from_millis;
        let slow = |a: Attempt| async move {
            tokio::time::sleep(ms(300)).await;
            if a.number() == 1 {
                Err("reset")
            } else {
                Ok(7)
            }
        };
        // With a breaker, its read of the clock after the last attempt:
        // two attempts of 300 ms and a backoff of 100 ms.
        let retrying: Pipeline<u32, &str> = Pipeline::builder()
            .retry(retry())
            .circuit_breaker(CircuitBreaker::default())
            .build();
        let start = Instant::now();
        let (done, ended) = retrying.call_timed_at(start, slow, |_, _, _| {}).await;
        assert_eq!(done.unwrap(), 7);
        assert_eq!(ended, Some(start + ms(700)));

        // Without one, or after a fallback, nothing read it: the caller does.
        let bare: Pipeline<u32, &str> = Pipeline::builder().build();
        let (done, ended) = bare.call_timed_at(start, slow, |_, _, _| {}).await;
        assert!(done.is_err());
        assert_eq!(ended, None);
        let falling_back: Pipeline<u32, &str> = Pipeline::builder()
            .circuit_breaker(CircuitBreaker::default())
            .fallback_when(
                |_| true,
                |_| async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(0)
                },
            )
            .build();
        let (done, ended) = falling_back.call_timed_at(start, slow, |_, _, _| {}).await;
        assert_eq!(done.unwrap(), 0);
        assert_eq!(ended, None);

        // A last attempt turned away before it ran read no clock either:
        // not where the first attempt ended.
        let limited: Pipeline<u32, &str> = Pipeline::builder()
            .retry(retry())
            .circuit_breaker(CircuitBreaker::default())
            .rate_limiter(Arc::new(RateLimiter::new(Limit::new(
                Algorithm::FixedWindow,
                Quota::per_hour(1),
            ))))
            .build();
        let (done, ended) = limited.call_timed_at(start, slow, |_, _, _| {}).await;
        assert_eq!(done.unwrap_err().kind(), crate::ErrorKind::RateLimited);
        assert_eq!(ended, None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_operation_can_keep_the_cut_off_itself() {
        let pipeline: Pipeline<u32, &str> = Pipeline::builder()
            .deadline(Duration::from_millis(250))
            .timeout(Duration::from_millis(100))
            .cut_off_by_operation()
            .build();
        let start = Instant::now();
        let mut seen = None;
        // Told when it would be cut, and not cut: it runs past both limits.
        let done = pipeline
            .call_at(start, |a| {
                seen = Some((a.cut_off(), a.cut_off_is_deadline()));
                async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok(7)
                }
            })
            .await;
        assert_eq!(done.unwrap(), 7);
        assert_eq!(
            seen,
            Some((Some(start + Duration::from_millis(100)), false))
        );

        // A deadline nearer than the timeout is the cut-off.
        let near: Pipeline<u32, &str> = pipeline
            .share_policies()
            .deadline(Duration::from_millis(50))
            .build();
        let start = Instant::now();
        near.call_at(start, |a| {
            seen = Some((a.cut_off(), a.cut_off_is_deadline()));
            async { Ok(1) }
        })
        .await
        .unwrap();
        assert_eq!(seen, Some((Some(start + Duration::from_millis(50)), true)));
    }

    #[tokio::test(start_paused = true)]
    async fn pipelines_can_share_policies() {
        let first: Pipeline<(), &str> = Pipeline::builder()
            .circuit_breaker(CircuitBreaker::new(BreakerConfig {
                consecutive_failures: 1,
                ..BreakerConfig::default()
            }))
            .build();
        let second: Pipeline<u8, ()> = first.share_policies().build();
        first.call(|_| async { Err("down") }).await.unwrap_err();
        let err = second.call(|_| async { Ok(1) }).await.unwrap_err();
        assert!(err.is_circuit_open(), "one breaker for both");
    }

    /// What a call through every policy adds to its operation's future,
    /// which every task that makes a call carries: 1 015 bytes when the
    /// steps were `async fn`s, 679 with the call, its attempts and each
    /// attempt in blocks of their own, 559 in one.
    #[test]
    fn a_call_adds_little_to_its_operation() {
        let pipeline: Pipeline<u64, ()> = Pipeline::from_config(&PolicyConfig::default())
            .unwrap()
            .build();
        let op = |_: Attempt| async { Ok::<u64, ()>(1) };
        let alone = std::mem::size_of_val(&op(Attempt::new(1, 1, None)));
        let timed = pipeline.call_timed_at(Instant::now(), op, |_, _, _| {});
        let added = std::mem::size_of_val(&timed) - alone;
        assert!(added <= 640, "{added} bytes over the operation's own");
    }

    #[tokio::test(start_paused = true)]
    async fn from_config_builds_every_configured_policy() {
        let config = PolicyConfig::default();
        let pipeline: Pipeline<u8, ()> = Pipeline::from_config(&config).unwrap().build();
        assert!(pipeline.circuit_breaker().is_some());
        assert!(pipeline.bulkhead().is_some());
        assert!(pipeline.retry().is_some());
        assert!(pipeline.rate_limiter().is_none());
        assert_eq!(pipeline.call(|_| async { Ok(7) }).await.unwrap(), 7);

        let bad = PolicyConfig {
            timeout: Some(Duration::ZERO),
            ..PolicyConfig::default()
        };
        assert_eq!(
            Pipeline::<u8, ()>::from_config(&bad).unwrap_err().field(),
            "timeout"
        );
    }
}
