//! Rate limiters: fixed window, sliding window (weighted counter), sliding
//! log (exact), token bucket and GCRA; single or keyed with bounded memory.
//!
//! Every decision reports the limit, what remains, when the quota is whole
//! again and, when denied, how long to wait: what `X-RateLimit-*` and
//! `Retry-After` headers need. The quota can change at runtime; the counts
//! are kept.
//!
//! ```
//! use std::time::Duration;
//! use tidegate_resilience::ratelimit::{Algorithm, Limit, Quota, RateLimiter};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let limiter = RateLimiter::new(Limit::new(Algorithm::Gcra, Quota::per_second(2)));
//! assert!(limiter.check().allowed);
//! assert!(limiter.check().allowed);
//! let denied = limiter.check();
//! assert!(!denied.allowed);
//! assert_eq!(denied.retry_after, Some(Duration::from_millis(500)));
//!
//! limiter.set_quota(Quota::per_second(4));
//! assert!(limiter.check().allowed, "a larger quota applies at once");
//! # }
//! ```

mod algorithm;
mod keyed;
mod layer;
mod store;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub use self::algorithm::LimiterState;
use self::algorithm::{rescale_gcra, GcraTerms};
pub use self::keyed::{KeyedConfig, KeyedRateLimiter, LocalStore};
pub use self::layer::{
    KeyedRateLimitLayer, KeyedRateLimitService, RateLimitLayer, RateLimitService, ResponseFuture,
};
pub use self::store::{Store, StoreError};
#[cfg(feature = "quanta")]
pub use crate::clock::TscClock;
pub use crate::clock::{Clock, TokioClock};
use crate::settings::{check, ConfigError};
use crate::stripe::{self, STRIPES};
use crate::Error;

/// Which algorithm a limiter runs.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Algorithm {
    /// `limit` per aligned window of `period`; cheap, bursty at edges.
    FixedWindow,
    /// Weighted count of this and the previous window (Cloudflare style).
    #[default]
    SlidingWindow,
    /// Exact: remembers every admission of the last period.
    SlidingLog,
    /// A bucket of `burst` tokens refilled at `limit / period`.
    TokenBucket,
    /// GCRA: the token bucket as one timestamp (as `governor`, and Redis-friendly).
    Gcra,
}

impl Algorithm {
    /// Every algorithm.
    pub const ALL: [Algorithm; 5] = [
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
        Algorithm::SlidingLog,
        Algorithm::TokenBucket,
        Algorithm::Gcra,
    ];

    /// The config name: `fixed_window`, `sliding_window`, `sliding_log`, `token_bucket`, `gcra`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::SlidingLog => "sliding_log",
            Algorithm::TokenBucket => "token_bucket",
            Algorithm::Gcra => "gcra",
        }
    }
}

/// `limit` requests per `period`, with bursts up to `burst` for the bucket algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    /// Requests per period.
    pub limit: u32,
    /// The period.
    pub period: Duration,
    /// Largest burst (token bucket, GCRA); `None` means `limit`.
    pub burst: Option<u32>,
}

impl Quota {
    /// `limit` per `period`.
    pub fn new(limit: u32, period: Duration) -> Self {
        Quota {
            limit,
            period,
            burst: None,
        }
    }

    /// `limit` per second.
    pub fn per_second(limit: u32) -> Self {
        Quota::new(limit, Duration::from_secs(1))
    }

    /// `limit` per minute.
    pub fn per_minute(limit: u32) -> Self {
        Quota::new(limit, Duration::from_secs(60))
    }

    /// `limit` per hour.
    pub fn per_hour(limit: u32) -> Self {
        Quota::new(limit, Duration::from_secs(3600))
    }

    /// Allows bursts of `burst` (token bucket and GCRA).
    pub fn with_burst(mut self, burst: u32) -> Self {
        self.burst = Some(burst);
        self
    }

    /// The largest burst.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.limit).max(1)
    }

    pub(crate) fn period_nanos(&self) -> u64 {
        crate::nanos(self.period).max(1)
    }

    /// Nanoseconds between requests at the steady rate.
    pub(crate) fn emission_interval_nanos(&self) -> u64 {
        (self.period_nanos() / u64::from(self.limit.max(1))).max(1)
    }

    /// Checks the quota; the error names the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(self.limit >= 1, "limit", "must be at least 1")?;
        check(!self.period.is_zero(), "per", "must be greater than 0")?;
        check(self.burst != Some(0), "burst", "must be at least 1")
    }
}

/// An algorithm and its quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(try_from = "RawLimit"))]
pub struct Limit {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// The quota.
    pub quota: Quota,
}

impl Limit {
    /// `quota` enforced by `algorithm`.
    pub fn new(algorithm: Algorithm, quota: Quota) -> Self {
        Limit { algorithm, quota }
    }
}

/// One limiter decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request is admitted (and counted).
    pub allowed: bool,
    /// The quota's limit (`X-RateLimit-Limit`).
    pub limit: u32,
    /// Requests left now (`X-RateLimit-Remaining`).
    pub remaining: u32,
    /// Time until the whole quota is available again (`X-RateLimit-Reset`).
    pub reset: Duration,
    /// When denied: time until a request of this cost would be admitted
    /// (`Retry-After`); `None` if it never can (cost above capacity).
    pub retry_after: Option<Duration>,
}

/// A rate limiter refused the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    decision: Decision,
}

impl RateLimited {
    /// A refusal carrying its decision.
    pub fn new(decision: Decision) -> Self {
        RateLimited { decision }
    }

    /// The decision, for headers.
    pub fn decision(&self) -> &Decision {
        &self.decision
    }

    /// Time until a retry could be admitted.
    pub fn retry_after(&self) -> Option<Duration> {
        self.decision.retry_after
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("rate limit exceeded")
    }
}

impl std::error::Error for RateLimited {}

impl Decision {
    /// `Ok(self)` if allowed, else the [`RateLimited`] error.
    pub fn into_result(self) -> Result<Decision, RateLimited> {
        if self.allowed {
            Ok(self)
        } else {
            Err(RateLimited::new(self))
        }
    }
}

#[derive(Debug)]
struct Cell {
    quota: Quota,
    state: LimiterState,
}

/// GCRA's whole state is one timestamp, so it needs no lock: a
/// compare-and-swap on the TAT, with the quota's terms in atomics beside it.
///
/// Every admission writes that one word, so threads admitting at once take
/// turns at its cache line: two threads took over four times as long a
/// decision as one. So a thread with a [stripe](crate::stripe) of its own
/// takes a run of the TAT's time at once, a lease, and admits from it with
/// plain writes until it is spent or past (see [`Lease`]).
///
/// A decision racing a quota change may see the old interval with the new
/// window (or the reverse) once; the TAT itself is always rescaled whole.
#[derive(Debug)]
struct GcraCell {
    tat: AtomicU64,
    limit: AtomicU32,
    interval: AtomicU64,
    window: AtomicU64,
    reciprocal: AtomicU64,
    /// How long a lease runs, in nanoseconds: 0 when a lease would not
    /// hold two requests at the steady rate.
    span: AtomicU64,
    /// Bumped by each quota change: a lease taken before it is void.
    epoch: AtomicU64,
    /// The leases of threads that have a stripe of their own, by stripe.
    leases: Box<[Lease; STRIPES]>,
    /// The quota as given; its lock serialises changes.
    quota: Mutex<Quota>,
}

/// A run of GCRA time, `next..end`, that one thread took from the shared
/// TAT, which has moved past it. The thread admits a request from it as
/// GCRA would from a TAT of its own at `next`, without the shared word,
/// until the request would end past `end`. Then it takes the next run,
/// which continues its lease if no other thread took time since.
///
/// The quota holds exactly as GCRA's: every admitted request still has
/// its own slot of the TAT's time, which ends at most `window` after the
/// request was judged (a lease ends at most half of it ahead) and no
/// sooner than one interval after. What a lease costs is time it holds
/// and no request uses: another thread sees it as taken, so its burst is
/// smaller by at most the leases of the other threads, each at most a
/// sixty-fourth of the window. To one thread alone the decisions are
/// GCRA's own, each one.
///
/// Only its thread writes it (its stripe's owner; the next owner, once the
/// thread ends, takes it over), so plain loads and stores serve.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Lease {
    next: AtomicU64,
    end: AtomicU64,
    epoch: AtomicU64,
}

/// The longest lease: what a worker admits in a millisecond, at most,
/// does without the shared word.
const LEASE: u64 = 1_000_000;

/// How long a lease runs under `terms`, 0 when leases do not pay.
fn lease_span(terms: &GcraTerms) -> u64 {
    let span = LEASE.min(terms.window / (4 * STRIPES as u64));
    if terms.interval > span / 2 {
        0
    } else {
        span
    }
}

/// What a thread's claim on the TAT admitted.
enum Claimed {
    /// From the thread's lease, which holds `unused` nanoseconds more.
    Leased { unused: u64 },
    /// With the TAT, as the thread sees it, at `tat` after it.
    At { tat: u64 },
}

impl GcraCell {
    fn new(quota: Quota) -> Self {
        let terms = GcraTerms::new(&quota);
        GcraCell {
            tat: AtomicU64::new(0),
            limit: AtomicU32::new(terms.limit),
            interval: AtomicU64::new(terms.interval),
            window: AtomicU64::new(terms.window),
            reciprocal: AtomicU64::new(terms.reciprocal),
            span: AtomicU64::new(lease_span(&terms)),
            epoch: AtomicU64::new(1),
            leases: Box::default(),
            quota: Mutex::new(quota),
        }
    }

    fn quota(&self) -> Quota {
        *self.quota.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[inline]
    fn terms(&self) -> GcraTerms {
        GcraTerms {
            limit: self.limit.load(Ordering::Relaxed),
            interval: self.interval.load(Ordering::Relaxed),
            window: self.window.load(Ordering::Relaxed),
            reciprocal: self.reciprocal.load(Ordering::Relaxed),
        }
    }

    /// Admits `cost` units at `now` from the calling thread's lease, a
    /// new lease or the TAT itself; `Err` with the TAT to judge the
    /// refusal on.
    #[inline]
    fn claim(&self, terms: &GcraTerms, epoch: u64, now: u64, cost: u32) -> Result<Claimed, u64> {
        let price = u64::from(cost).saturating_mul(terms.interval);
        let stripe = stripe::current();
        let own = stripe.is_own().then(|| &self.leases[stripe.index()]);
        let lease = own
            .filter(|lease| lease.epoch.load(Ordering::Relaxed) == epoch)
            .map(|lease| {
                (
                    lease.next.load(Ordering::Relaxed),
                    lease.end.load(Ordering::Relaxed),
                )
            });
        if let (Some(own), Some((next, end))) = (own, lease) {
            let taken = next.max(now).saturating_add(price);
            // A caller's time may be older than the lease (it read the
            // clock, then waited): the request is judged at it all the same.
            if taken <= end && taken - now <= terms.window {
                own.next.store(taken, Ordering::Relaxed);
                return Ok(Claimed::Leased {
                    unused: end - taken,
                });
            }
        }
        let span = self.span.load(Ordering::Relaxed);
        let may_lease = own.is_some() && price > 0 && price <= span / 2;
        let mut current = self.tat.load(Ordering::Acquire);
        loop {
            // Where the TAT has not moved since the thread's lease, the
            // time the lease has left is the thread's to go on from.
            let base = match lease {
                Some((next, end)) if end == current => next,
                _ => current,
            };
            let taken = base.max(now).saturating_add(price);
            let until = current.max(now).saturating_add(span);
            let (stored, leased) = if may_lease && until - now <= terms.window / 2 {
                (until, true)
            } else if taken - now <= terms.window {
                (taken, false)
            } else {
                return Err(base);
            };
            if price == 0 {
                return Ok(Claimed::At { tat: base });
            }
            match self.tat.compare_exchange_weak(
                current,
                stored,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    if let Some(own) = own {
                        // Without a new lease, an empty one at the TAT:
                        // the next request goes on from it if no other did.
                        own.next.store(taken, Ordering::Relaxed);
                        own.end.store(stored, Ordering::Relaxed);
                        own.epoch.store(epoch, Ordering::Relaxed);
                    }
                    return Ok(if leased {
                        Claimed::Leased {
                            unused: stored - taken,
                        }
                    } else {
                        Claimed::At { tat: stored }
                    });
                }
                Err(actual) => current = actual,
            }
        }
    }

    #[inline]
    fn check(&self, now: u64, cost: u32) -> Decision {
        let epoch = self.epoch.load(Ordering::Acquire);
        let terms = self.terms();
        match self.claim(&terms, epoch, now, cost) {
            Ok(claimed) => {
                let tat = match claimed {
                    Claimed::Leased { unused } => {
                        self.tat.load(Ordering::Relaxed).saturating_sub(unused)
                    }
                    Claimed::At { tat } => tat,
                };
                terms.admitted(tat.max(now) - now)
            }
            Err(tat) => terms.decide(tat, now, cost).0,
        }
    }

    /// As [`check`](Self::check), with the decision's figures worked out
    /// only for a refusal.
    #[inline]
    fn admit(&self, now: u64, cost: u32) -> Result<(), RateLimited> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let terms = self.terms();
        match self.claim(&terms, epoch, now, cost) {
            Ok(_) => Ok(()),
            Err(tat) => Err(RateLimited::new(terms.decide(tat, now, cost).0)),
        }
    }

    /// Rescales what was consumed to the new quota, then swaps the quota
    /// in; the leases taken before are void.
    fn set_quota(&self, quota: Quota, now: u64) {
        let mut current = self.quota.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.interval.load(Ordering::Relaxed);
        let terms = GcraTerms::new(&quota);
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |mut tat| {
                let mut used = old;
                rescale_gcra(&mut tat, &mut used, terms.interval, now);
                Some(tat)
            });
        self.limit.store(terms.limit, Ordering::Relaxed);
        self.interval.store(terms.interval, Ordering::Relaxed);
        self.window.store(terms.window, Ordering::Relaxed);
        self.reciprocal.store(terms.reciprocal, Ordering::Relaxed);
        self.span.store(lease_span(&terms), Ordering::Relaxed);
        // Release: a thread that sees the new epoch sees the new terms.
        self.epoch.fetch_add(1, Ordering::Release);
        *current = quota;
    }
}

#[derive(Debug)]
enum Engine {
    Locked(Mutex<Cell>),
    Gcra(GcraCell),
}

/// One limiter shared by every caller (see [`KeyedRateLimiter`] for one per key).
///
/// GCRA runs lock-free; the other algorithms hold a short lock. The time
/// comes from tokio's clock unless another [`Clock`] is given
/// ([`with_clock`](RateLimiter::with_clock)).
#[derive(Debug)]
pub struct RateLimiter<C = TokioClock> {
    clock: C,
    algorithm: Algorithm,
    engine: Engine,
}

impl RateLimiter {
    /// A limiter with its whole quota available, on tokio's clock.
    pub fn new(limit: Limit) -> Self {
        RateLimiter::with_clock(limit, TokioClock::new())
    }

    /// Decides on a request of `cost` units at a `now` the caller already read.
    pub fn check_at(&self, now: Instant, cost: u32) -> Decision {
        self.check_nanos(self.clock.nanos_at(now), cost)
    }

    /// [`admit`](Self::admit) for `cost` units at a `now` the caller already read.
    pub fn admit_at(&self, now: Instant, cost: u32) -> Result<(), RateLimited> {
        self.admit_nanos(self.clock.nanos_at(now), cost)
    }
}

impl<C: Clock> RateLimiter<C> {
    /// A limiter with its whole quota available, reading the time from `clock`.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use tidegate_resilience::ratelimit::{Algorithm, Clock, Limit, Quota, RateLimiter};
    ///
    /// /// A clock the caller moves by hand.
    /// #[derive(Debug, Default)]
    /// struct Manual(std::sync::atomic::AtomicU64);
    ///
    /// impl Clock for Manual {
    ///     fn now_nanos(&self) -> u64 {
    ///         self.0.load(std::sync::atomic::Ordering::Relaxed)
    ///     }
    /// }
    ///
    /// let time = Arc::new(Manual::default());
    /// let limiter = RateLimiter::with_clock(Limit::new(Algorithm::Gcra, Quota::per_second(1)), time.clone());
    /// assert!(limiter.admit().is_ok());
    /// assert!(limiter.admit().is_err());
    /// time.0.store(1_000_000_000, std::sync::atomic::Ordering::Relaxed);
    /// assert!(limiter.admit().is_ok(), "a second later");
    /// ```
    pub fn with_clock(limit: Limit, clock: C) -> Self {
        let now = clock.now_nanos();
        let engine = match limit.algorithm {
            Algorithm::Gcra => Engine::Gcra(GcraCell::new(limit.quota)),
            algorithm => Engine::Locked(Mutex::new(Cell {
                state: LimiterState::new(algorithm, &limit.quota, now),
                quota: limit.quota,
            })),
        };
        RateLimiter {
            clock,
            algorithm: limit.algorithm,
            engine,
        }
    }

    /// The clock the limiter reads.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// Decides on one request and counts it if admitted.
    pub fn check(&self) -> Decision {
        self.check_nanos(self.clock.now_nanos(), 1)
    }

    /// Decides on a request of `cost` units.
    pub fn check_n(&self, cost: u32) -> Decision {
        self.check_nanos(self.clock.now_nanos(), cost)
    }

    fn check_nanos(&self, now: u64, cost: u32) -> Decision {
        match &self.engine {
            Engine::Gcra(cell) => cell.check(now, cost),
            Engine::Locked(cell) => {
                let cell = &mut *cell.lock().unwrap_or_else(|p| p.into_inner());
                cell.state.check(&cell.quota, now, cost)
            }
        }
    }

    /// The decision as a result: `Err` when denied.
    pub fn try_acquire(&self) -> Result<Decision, RateLimited> {
        self.check().into_result()
    }

    /// Admits one request or refuses it, as [`try_acquire`](Self::try_acquire)
    /// but without the figures of an admitted request's decision (what
    /// `X-RateLimit-Remaining` needs), so GCRA's admission is a write to
    /// its lease or its TAT alone. A refusal carries the whole decision.
    pub fn admit(&self) -> Result<(), RateLimited> {
        self.admit_nanos(self.clock.now_nanos(), 1)
    }

    /// [`admit`](Self::admit) for a request of `cost` units.
    pub fn admit_n(&self, cost: u32) -> Result<(), RateLimited> {
        self.admit_nanos(self.clock.now_nanos(), cost)
    }

    fn admit_nanos(&self, now: u64, cost: u32) -> Result<(), RateLimited> {
        match &self.engine {
            Engine::Gcra(cell) => cell.admit(now, cost),
            Engine::Locked(_) => self.check_nanos(now, cost).into_result().map(drop),
        }
    }

    /// Runs `f` if the limiter admits it.
    pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.admit()?;
        f().await.map_err(Error::inner_error)
    }

    /// The limit in force.
    pub fn limit(&self) -> Limit {
        let quota = match &self.engine {
            Engine::Gcra(cell) => cell.quota(),
            Engine::Locked(cell) => cell.lock().unwrap_or_else(|p| p.into_inner()).quota,
        };
        Limit::new(self.algorithm, quota)
    }

    /// Changes the quota; what was counted so far stays counted.
    pub fn set_quota(&self, quota: Quota) {
        match &self.engine {
            Engine::Gcra(cell) => cell.set_quota(quota, self.clock.now_nanos()),
            Engine::Locked(cell) => cell.lock().unwrap_or_else(|p| p.into_inner()).quota = quota,
        }
    }
}

/// A rate limit as written in config: `{ algorithm, limit, per, burst }`.
#[cfg(feature = "serde")]
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    #[serde(default)]
    algorithm: Algorithm,
    limit: u32,
    #[serde(with = "crate::settings::duration")]
    per: Duration,
    #[serde(default)]
    burst: Option<u32>,
}

#[cfg(feature = "serde")]
impl TryFrom<RawLimit> for Limit {
    type Error = ConfigError;

    fn try_from(raw: RawLimit) -> Result<Self, ConfigError> {
        let quota = Quota {
            limit: raw.limit,
            period: raw.per,
            burst: raw.burst,
        };
        quota.validate()?;
        Ok(Limit::new(raw.algorithm, quota))
    }
}
