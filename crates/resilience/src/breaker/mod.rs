//! Circuit breaker: closed → open → half-open → closed, plus forced-open and disabled.
//!
//! The breaker trips on `consecutive_failures`, or, once `minimum_calls` are
//! in the window, on `failure_rate` or `slow_call_rate`. The window is the
//! last N calls or the last T seconds in 1 s buckets. After `open_duration`
//! it admits exactly `half_open_probes` probes, reserved atomically; a probe
//! whose caller is cancelled gives its slot back. All probes succeeding
//! closes the breaker; one failing re-opens it and restarts the timer.
//!
//! A closed breaker admits calls without taking its lock. With a count
//! window, a healthy one (a full window without a failure or slow call)
//! records quick successes without it too, so callers on many threads do
//! not queue on it; failures, slow calls and time windows take the lock.
//!
//! ```
//! use tidegate_resilience::breaker::{CircuitBreaker, CircuitState, Config};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let breaker = CircuitBreaker::new(Config { consecutive_failures: 2, ..Config::default() });
//! for _ in 0..2 {
//!     let _ = breaker.call(|| async { Err::<(), _>("boom") }).await;
//! }
//! assert_eq!(breaker.state(), CircuitState::Open);
//! let err = breaker.call(|| async { Ok::<_, &str>(()) }).await.unwrap_err();
//! assert!(err.is_circuit_open());
//! # }
//! ```

mod layer;
mod state;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

pub use self::layer::{CircuitBreakerLayer, CircuitBreakerService};
use self::state::{Machine, Phase, Ticket};
use crate::settings::{check, ConfigError};
use crate::Error;

/// Settings of a circuit breaker; the defaults are those of DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct Config {
    /// Trip after this many failures in a row (0 turns this trigger off). Default 5.
    pub consecutive_failures: u32,
    /// Trip when this share of the window's calls failed. Default 0.5.
    pub failure_rate: f64,
    /// Trip when this share of the window's calls were slow. Default 1.0.
    pub slow_call_rate: f64,
    /// A call at least this long is slow. Default 5 s.
    #[cfg_attr(feature = "serde", serde(with = "crate::settings::duration"))]
    pub slow_call_duration: Duration,
    /// The rates are judged only once the window holds this many calls. Default 20.
    pub minimum_calls: u32,
    /// Count-based or time-based window. Default count.
    pub window: WindowKind,
    /// Calls in a count window. Default 100.
    pub window_size: u32,
    /// Length of a time window, in 1 s buckets. Default 60 s.
    #[cfg_attr(feature = "serde", serde(with = "crate::settings::duration"))]
    pub window_duration: Duration,
    /// How long the breaker stays open before probing. Default 60 s.
    #[cfg_attr(feature = "serde", serde(with = "crate::settings::duration"))]
    pub open_duration: Duration,
    /// Probes admitted in half-open; all must succeed to close. Default 1.
    pub half_open_probes: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            consecutive_failures: 5,
            failure_rate: 0.5,
            slow_call_rate: 1.0,
            slow_call_duration: Duration::from_secs(5),
            minimum_calls: 20,
            window: WindowKind::Count,
            window_size: 100,
            window_duration: Duration::from_secs(60),
            open_duration: Duration::from_secs(60),
            half_open_probes: 1,
        }
    }
}

impl Config {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            self.failure_rate > 0.0 && self.failure_rate <= 1.0,
            "failure_rate",
            "must be greater than 0 and at most 1",
        )?;
        check(
            self.slow_call_rate > 0.0 && self.slow_call_rate <= 1.0,
            "slow_call_rate",
            "must be greater than 0 and at most 1",
        )?;
        check(
            !self.slow_call_duration.is_zero(),
            "slow_call_duration",
            "must be greater than 0",
        )?;
        check(self.window_size > 0, "window_size", "must be at least 1")?;
        check(
            self.window_duration >= Duration::from_secs(1),
            "window_duration",
            "must be at least 1s",
        )?;
        check(
            self.window != WindowKind::Count || self.minimum_calls <= self.window_size,
            "minimum_calls",
            "must not exceed window_size, or the rates could never trip",
        )?;
        check(
            !self.open_duration.is_zero(),
            "open_duration",
            "must be greater than 0",
        )?;
        check(
            self.half_open_probes > 0,
            "half_open_probes",
            "must be at least 1",
        )
    }
}

/// Which calls the failure and slow-call rates look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum WindowKind {
    /// The last `window_size` calls.
    #[default]
    Count,
    /// The calls of the last `window_duration`.
    Time,
}

/// The state of a breaker.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Calls flow; outcomes are counted.
    Closed,
    /// Calls are rejected until the open duration ends.
    Open,
    /// A few probes are let through to test the upstream.
    HalfOpen,
    /// Opened by hand; stays open until reset.
    ForcedOpen,
    /// Turned off by hand: every call flows and nothing is counted.
    Disabled,
}

impl CircuitState {
    /// `closed`, `open`, `half_open`, `forced_open` or `disabled`.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
            CircuitState::ForcedOpen => "forced_open",
            CircuitState::Disabled => "disabled",
        }
    }

    /// Every state, for metrics that show one series per state.
    pub const ALL: [CircuitState; 5] = [
        CircuitState::Closed,
        CircuitState::Open,
        CircuitState::HalfOpen,
        CircuitState::ForcedOpen,
        CircuitState::Disabled,
    ];
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a call's result counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Counts as a success.
    Success,
    /// Counts as a failure.
    Failure,
    /// Not counted at all (e.g. a 404, or a local rejection further in).
    Ignore,
}

/// Why the breaker changed state.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TransitionReason {
    /// `count` failures in a row reached `threshold`.
    ConsecutiveFailures {
        /// Failures in a row.
        count: u32,
        /// The configured threshold.
        threshold: u32,
    },
    /// The failure rate of the window reached the threshold.
    FailureRate {
        /// The measured rate.
        rate: f64,
        /// The configured threshold.
        threshold: f64,
    },
    /// The slow-call rate of the window reached the threshold.
    SlowCallRate {
        /// The measured rate.
        rate: f64,
        /// The configured threshold.
        threshold: f64,
    },
    /// A half-open probe failed.
    ProbeFailed,
    /// A half-open probe succeeded but was slow.
    ProbeSlow,
    /// The open duration ended; probes are admitted.
    OpenDurationElapsed,
    /// Every half-open probe succeeded.
    ProbesSucceeded,
    /// Opened by hand.
    ForcedOpen,
    /// Disabled by hand.
    Disabled,
    /// Reset to closed by hand.
    Reset,
}

impl fmt::Display for TransitionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransitionReason::ConsecutiveFailures { count, threshold } => {
                write!(f, "{count}/{threshold} consecutive failures")
            }
            TransitionReason::FailureRate { rate, threshold } => {
                write!(
                    f,
                    "failure rate {:.0}% ≥ {:.0}%",
                    rate * 100.0,
                    threshold * 100.0
                )
            }
            TransitionReason::SlowCallRate { rate, threshold } => write!(
                f,
                "slow-call rate {:.0}% ≥ {:.0}%",
                rate * 100.0,
                threshold * 100.0
            ),
            TransitionReason::ProbeFailed => f.write_str("half-open probe failed"),
            TransitionReason::ProbeSlow => f.write_str("half-open probe was slow"),
            TransitionReason::OpenDurationElapsed => f.write_str("open duration elapsed"),
            TransitionReason::ProbesSucceeded => f.write_str("half-open probes succeeded"),
            TransitionReason::ForcedOpen => f.write_str("forced open"),
            TransitionReason::Disabled => f.write_str("disabled"),
            TransitionReason::Reset => f.write_str("reset"),
        }
    }
}

/// A state change, as sent to subscribers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StateChange {
    /// The state before.
    pub from: CircuitState,
    /// The state after.
    pub to: CircuitState,
    /// Why it changed.
    pub reason: TransitionReason,
    /// When it changed.
    pub at: Instant,
}

/// The breaker's numbers at one instant, for status pages.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// The current state.
    pub state: CircuitState,
    /// Failures in the current window.
    pub failure_count: u32,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Calls in the current window.
    pub calls: u32,
    /// Failures / calls in the window (0 when empty).
    pub failure_rate: f64,
    /// Slow calls / calls in the window (0 when empty).
    pub slow_call_rate: f64,
    /// When the last failure was recorded.
    pub last_failure: Option<Instant>,
    /// When the state last changed (or the breaker was made).
    pub last_state_change: Instant,
    /// While open: time until the breaker admits a probe.
    pub retry_after: Option<Duration>,
}

/// The breaker rejected a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitOpen {
    retry_after: Option<Duration>,
}

impl CircuitOpen {
    /// A rejection; `retry_after` is when the breaker will probe, if known.
    pub fn new(retry_after: Option<Duration>) -> Self {
        CircuitOpen { retry_after }
    }

    /// Time until the breaker admits a probe, when it knows.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("circuit breaker is open")
    }
}

impl std::error::Error for CircuitOpen {}

// The gate word: `epoch << EPOCH_SHIFT | QUIET? | CLOSED/DISABLED/OTHER`.
const CLOSED: u64 = 0;
const DISABLED: u64 = 1;
const OTHER: u64 = 2;
const PHASE: u64 = 3;
/// Set while a success that is not slow would change nothing (`Machine::quiet`).
const QUIET: u64 = 4;
const EPOCH_SHIFT: u32 = 3;

/// The gate word for the machine as it stands.
fn gate_of(machine: &Machine) -> u64 {
    let phase = match machine.phase() {
        Phase::Closed => CLOSED,
        Phase::Disabled => DISABLED,
        _ => OTHER,
    };
    let quiet = if machine.quiet() { QUIET } else { 0 };
    machine.epoch() << EPOCH_SHIFT | quiet | phase
}

struct Shared {
    machine: Mutex<Machine>,
    /// Written only under the machine's lock, read without it: calls into a
    /// closed breaker are admitted from it, and their successes in a quiet
    /// one are recorded from it, so a healthy breaker takes no lock at all.
    gate: AtomicU64,
    /// From the config, which never changes: what makes a call slow.
    slow_call_duration: Duration,
    events: broadcast::Sender<StateChange>,
}

/// A circuit breaker; clones share one state.
#[derive(Clone)]
pub struct CircuitBreaker {
    shared: Arc<Shared>,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("state", &self.state())
            .finish()
    }
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker::new(Config::default())
    }
}

impl CircuitBreaker {
    /// A closed breaker with these settings.
    pub fn new(config: Config) -> Self {
        let (events, _) = broadcast::channel(64);
        let machine = Machine::new(config, Instant::now());
        CircuitBreaker {
            shared: Arc::new(Shared {
                gate: AtomicU64::new(gate_of(&machine)),
                machine: Mutex::new(machine),
                slow_call_duration: config.slow_call_duration,
                events,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Machine> {
        // A panic while holding the lock cannot leave the machine half-updated
        // in a way that matters more than losing the breaker, so go on.
        self.shared
            .machine
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Publishes what the locked `machine` now is: the gate word, and the
    /// change, if any, to the event stream.
    fn publish(&self, machine: &Machine, change: Option<StateChange>) {
        let gate = gate_of(machine);
        // Only lock holders write the gate, so this load is the latest word.
        if self.shared.gate.load(Ordering::Relaxed) != gate {
            self.shared.gate.store(gate, Ordering::Release);
        }
        if let Some(change) = change {
            // No subscriber is not an error.
            let _ = self.shared.events.send(change);
        }
    }

    /// Asks to make one call. On success, record the outcome on the permit;
    /// dropping it unrecorded gives back a half-open probe slot.
    pub fn try_acquire(&self) -> Result<Permit<'_>, CircuitOpen> {
        self.try_acquire_at(Instant::now())
    }

    /// As [`try_acquire`](Self::try_acquire), at a `now` the caller already read
    /// (one clock read can serve every policy of a request).
    pub fn try_acquire_at(&self, now: Instant) -> Result<Permit<'_>, CircuitOpen> {
        let gate = self.shared.gate.load(Ordering::Acquire);
        let ticket = match gate & PHASE {
            CLOSED | DISABLED => Ticket {
                epoch: gate >> EPOCH_SHIFT,
                probe: false,
            },
            _ => {
                let mut machine = self.lock();
                let mut change = None;
                let result = machine.acquire(now, &mut change);
                self.publish(&machine, change);
                result.map_err(CircuitOpen::new)?
            }
        };
        Ok(Permit {
            breaker: self,
            ticket,
            disabled: gate & PHASE == DISABLED,
            start: now,
            recorded: false,
        })
    }

    /// Runs `f` if the breaker admits it; an `Err` counts as a failure.
    pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_classified(f, |result| match result {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        })
        .await
    }

    /// Runs `f` if the breaker admits it; `classify` says how the result counts.
    pub async fn call_classified<F, Fut, T, E, C>(&self, f: F, classify: C) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: FnOnce(&Result<T, E>) -> Outcome,
    {
        let permit = self.try_acquire()?;
        let result = f().await;
        permit.record(classify(&result));
        result.map_err(Error::inner_error)
    }

    /// The current state (an expired open timer shows as half-open).
    pub fn state(&self) -> CircuitState {
        self.snapshot().state
    }

    /// Counters and timestamps for a status page.
    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let mut machine = self.lock();
        let change = machine.poll_timer(now);
        self.publish(&machine, change);
        let numbers = machine.numbers(now);
        let calls = numbers.counts.calls;
        let rate = |n: u32| {
            if calls == 0 {
                0.0
            } else {
                f64::from(n) / f64::from(calls)
            }
        };
        Snapshot {
            state: numbers.phase.state(),
            failure_count: numbers.counts.failures,
            consecutive_failures: numbers.consecutive,
            calls,
            failure_rate: rate(numbers.counts.failures),
            slow_call_rate: rate(numbers.counts.slow),
            last_failure: numbers.last_failure,
            last_state_change: numbers.last_change,
            retry_after: match numbers.phase {
                Phase::Open { until } => Some(until.saturating_duration_since(now)),
                _ => None,
            },
        }
    }

    /// The settings this breaker runs with.
    pub fn config(&self) -> Config {
        *self.lock().config()
    }

    /// Receives every state change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<StateChange> {
        self.shared.events.subscribe()
    }

    fn force(&self, phase: Phase) {
        let mut machine = self.lock();
        let change = machine.force(phase, Instant::now());
        self.publish(&machine, change);
    }

    /// Opens the breaker until [`reset`](Self::reset).
    pub fn force_open(&self) {
        self.force(Phase::ForcedOpen);
    }

    /// Lets every call through and counts nothing, until [`reset`](Self::reset).
    pub fn disable(&self) {
        self.force(Phase::Disabled);
    }

    /// Back to closed with an empty window.
    pub fn reset(&self) {
        self.force(Phase::Closed);
    }
}

/// Permission to make one call through the breaker.
///
/// Record the outcome with [`success`](Permit::success),
/// [`failure`](Permit::failure), [`ignore`](Permit::ignore) or
/// [`record`](Permit::record). Dropped unrecorded (the caller was cancelled),
/// it counts nothing and a half-open probe slot goes back.
#[must_use = "record the call's outcome on the permit"]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    ticket: Ticket,
    disabled: bool,
    start: Instant,
    recorded: bool,
}

impl fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("probe", &self.ticket.probe)
            .finish()
    }
}

impl Permit<'_> {
    /// Whether this call is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.ticket.probe
    }

    /// Records how the call went; its duration is measured from acquiring.
    pub fn record(self, outcome: Outcome) {
        // Nothing is counted when disabled, so no clock is read.
        let now = if self.disabled {
            self.start
        } else {
            Instant::now()
        };
        self.record_at(outcome, now);
    }

    /// As [`record`](Self::record), with the call's end time already read.
    pub fn record_at(mut self, outcome: Outcome, now: Instant) {
        self.recorded = true;
        if self.disabled {
            return;
        }
        let elapsed = now.saturating_duration_since(self.start);
        let shared = &self.breaker.shared;
        // A call admitted while closed, in this epoch or an older one.
        if !self.ticket.probe {
            match outcome {
                // Closed ignores it; an older epoch drops it.
                Outcome::Ignore => return,
                Outcome::Success if elapsed < shared.slow_call_duration => {
                    let quiet = self.ticket.epoch << EPOCH_SHIFT | QUIET | CLOSED;
                    if shared.gate.load(Ordering::Acquire) == quiet {
                        return;
                    }
                }
                Outcome::Success | Outcome::Failure => {}
            }
        }
        let mut machine = self.breaker.lock();
        // Successes that still see a quiet gate are ordered before this
        // record: they change nothing, so no count is lost.
        let gate = shared.gate.load(Ordering::Relaxed);
        if gate & QUIET != 0 {
            shared.gate.store(gate & !QUIET, Ordering::Relaxed);
        }
        let change = machine.record(self.ticket, outcome, elapsed, now);
        self.breaker.publish(&machine, change);
    }

    /// Records a success.
    pub fn success(self) {
        self.record(Outcome::Success);
    }

    /// Records a failure.
    pub fn failure(self) {
        self.record(Outcome::Failure);
    }

    /// Counts nothing, and gives back a probe slot.
    pub fn ignore(self) {
        self.record(Outcome::Ignore);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.recorded && self.ticket.probe {
            self.breaker.lock().release(self.ticket);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> Config {
        Config {
            consecutive_failures: 2,
            open_duration: Duration::from_secs(30),
            ..Config::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_probes_and_closes_with_events() {
        let breaker = CircuitBreaker::new(quick());
        let mut events = breaker.subscribe();
        for _ in 0..2 {
            breaker.try_acquire().unwrap().failure();
        }
        let open = events.recv().await.unwrap();
        assert_eq!(
            (open.from, open.to),
            (CircuitState::Closed, CircuitState::Open)
        );
        let err = breaker.try_acquire().unwrap_err();
        assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));

        tokio::time::advance(Duration::from_secs(30)).await;
        let probe = breaker.try_acquire().unwrap();
        assert!(probe.is_probe());
        assert!(breaker.try_acquire().is_err(), "one probe at a time");
        probe.success();
        let events: Vec<_> = std::iter::from_fn(|| events.try_recv().ok())
            .map(|c| c.to)
            .collect();
        assert_eq!(events, [CircuitState::HalfOpen, CircuitState::Closed]);
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_probe_gives_its_slot_back() {
        let breaker = CircuitBreaker::new(quick());
        breaker.force_open();
        breaker.reset();
        for _ in 0..2 {
            breaker.try_acquire().unwrap().failure();
        }
        tokio::time::advance(Duration::from_secs(30)).await;
        let pending = breaker.call(std::future::pending::<Result<(), ()>>);
        let cancelled = tokio::time::timeout(Duration::from_secs(1), pending).await;
        assert!(cancelled.is_err());
        assert!(breaker.try_acquire().is_ok(), "probe slot released on drop");
    }

    #[tokio::test(start_paused = true)]
    async fn slow_calls_trip_the_breaker() {
        let breaker = CircuitBreaker::new(Config {
            consecutive_failures: 0,
            minimum_calls: 3,
            slow_call_duration: Duration::from_secs(1),
            ..Config::default()
        });
        for _ in 0..3 {
            let permit = breaker.try_acquire().unwrap();
            tokio::time::advance(Duration::from_secs(2)).await;
            permit.success();
        }
        let snap = breaker.snapshot();
        assert_eq!(snap.state, CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn forced_states() {
        let breaker = CircuitBreaker::new(quick());
        breaker.force_open();
        assert_eq!(breaker.state(), CircuitState::ForcedOpen);
        assert_eq!(breaker.try_acquire().unwrap_err().retry_after(), None);
        breaker.disable();
        for _ in 0..10 {
            breaker.try_acquire().unwrap().failure();
        }
        assert_eq!(breaker.state(), CircuitState::Disabled);
        breaker.reset();
        assert_eq!(breaker.snapshot().calls, 0);
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn classifier_can_ignore_results() {
        let breaker = CircuitBreaker::new(quick());
        for _ in 0..5 {
            let r = breaker
                .call_classified(|| async { Err::<(), _>(404) }, |_| Outcome::Ignore)
                .await;
            assert_eq!(r.unwrap_err().into_inner(), Some(404));
        }
        assert_eq!(breaker.state(), CircuitState::Closed);
        assert_eq!(breaker.snapshot().calls, 0);
    }
}
