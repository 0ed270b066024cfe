//! The circuit breaker as a pure state machine: every method takes `now`.

use std::time::Duration;

use tokio::time::Instant;

use super::{CircuitState, Config, Outcome, StateChange, TransitionReason, WindowKind};
use crate::rolling::{Counts, Rolling};

/// Calls, failures and slow calls in a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CallCounts {
    pub(crate) calls: u32,
    pub(crate) failures: u32,
    pub(crate) slow: u32,
}

impl Counts for CallCounts {
    fn add(&mut self, o: &Self) {
        self.calls += o.calls;
        self.failures += o.failures;
        self.slow += o.slow;
    }
    fn sub(&mut self, o: &Self) {
        self.calls -= o.calls;
        self.failures -= o.failures;
        self.slow -= o.slow;
    }
}

const FAILED: u8 = 1;
const SLOW: u8 = 2;

/// The last N calls, as a ring of outcome bits.
#[derive(Debug)]
struct CountWindow {
    ring: Box<[u8]>,
    next: usize,
    counts: CallCounts,
}

impl CountWindow {
    fn push(&mut self, bits: u8) {
        let size = self.ring.len();
        if self.counts.calls as usize == size {
            let old = self.ring[self.next];
            self.counts.calls -= 1;
            self.counts.failures -= u32::from(old & FAILED);
            self.counts.slow -= u32::from((old & SLOW) >> 1);
        }
        self.ring[self.next] = bits;
        self.next += 1;
        if self.next == size {
            self.next = 0;
        }
        self.counts.calls += 1;
        self.counts.failures += u32::from(bits & FAILED);
        self.counts.slow += u32::from((bits & SLOW) >> 1);
    }
}

#[derive(Debug)]
enum Window {
    Count(CountWindow),
    Time(Rolling<CallCounts>),
}

impl Window {
    fn new(cfg: &Config, origin: Instant) -> Self {
        match cfg.window {
            WindowKind::Count => Window::Count(CountWindow {
                ring: vec![0; cfg.window_size.max(1) as usize].into_boxed_slice(),
                next: 0,
                counts: CallCounts::default(),
            }),
            WindowKind::Time => {
                let secs = cfg.window_duration.as_secs().max(1) as usize;
                Window::Time(Rolling::new(origin, cfg.window_duration, secs))
            }
        }
    }

    fn record(&mut self, now: Instant, failed: bool, slow: bool) -> CallCounts {
        match self {
            Window::Count(w) => {
                w.push(u8::from(failed) | (u8::from(slow) << 1));
                w.counts
            }
            Window::Time(w) => {
                let delta = CallCounts {
                    calls: 1,
                    failures: u32::from(failed),
                    slow: u32::from(slow),
                };
                w.add(now, delta);
                w.total(now)
            }
        }
    }

    fn counts(&mut self, now: Instant) -> CallCounts {
        match self {
            Window::Count(w) => w.counts,
            Window::Time(w) => w.total(now),
        }
    }

    fn clear(&mut self) {
        match self {
            Window::Count(w) => {
                w.next = 0;
                w.counts = CallCounts::default();
            }
            Window::Time(w) => w.clear(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, successes: u32 },
    ForcedOpen,
    Disabled,
}

impl Phase {
    pub(crate) fn state(self) -> CircuitState {
        match self {
            Phase::Closed => CircuitState::Closed,
            Phase::Open { .. } => CircuitState::Open,
            Phase::HalfOpen { .. } => CircuitState::HalfOpen,
            Phase::ForcedOpen => CircuitState::ForcedOpen,
            Phase::Disabled => CircuitState::Disabled,
        }
    }
}

/// What a caller holds between acquiring and recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub(crate) epoch: u64,
    pub(crate) probe: bool,
}

/// The state machine. Not thread-safe by itself; the handle locks it.
#[derive(Debug)]
pub(crate) struct Machine {
    cfg: Config,
    phase: Phase,
    /// Bumped on every transition, so late outcomes of an older phase are dropped.
    epoch: u64,
    window: Window,
    consecutive: u32,
    last_failure: Option<Instant>,
    last_change: Instant,
}

/// The machine's numbers at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Numbers {
    pub(crate) phase: Phase,
    pub(crate) counts: CallCounts,
    pub(crate) consecutive: u32,
    pub(crate) last_failure: Option<Instant>,
    pub(crate) last_change: Instant,
}

impl Machine {
    pub(crate) fn new(cfg: Config, now: Instant) -> Self {
        Machine {
            window: Window::new(&cfg, now),
            cfg,
            phase: Phase::Closed,
            epoch: 0,
            consecutive: 0,
            last_failure: None,
            last_change: now,
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.cfg
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether a success that was not slow would change nothing: closed,
    /// a full count window with no failure or slow call in it, and no
    /// failure streak. The pushed success would only replace another.
    pub(crate) fn quiet(&self) -> bool {
        match &self.window {
            Window::Count(w) => {
                self.phase == Phase::Closed
                    && self.consecutive == 0
                    && w.counts.calls as usize == w.ring.len()
                    && w.counts.failures == 0
                    && w.counts.slow == 0
            }
            Window::Time(_) => false,
        }
    }

    fn transition(&mut self, to: Phase, reason: TransitionReason, now: Instant) -> StateChange {
        let from = self.phase.state();
        self.phase = to;
        self.epoch += 1;
        self.last_change = now;
        self.window.clear();
        self.consecutive = 0;
        StateChange {
            from,
            to: to.state(),
            reason,
            at: now,
        }
    }

    fn open(&mut self, reason: TransitionReason, now: Instant) -> StateChange {
        let until = now + self.cfg.open_duration;
        self.transition(Phase::Open { until }, reason, now)
    }

    /// Moves an open breaker whose timer ran out to half-open.
    pub(crate) fn poll_timer(&mut self, now: Instant) -> Option<StateChange> {
        match self.phase {
            Phase::Open { until } if now >= until => Some(self.transition(
                Phase::HalfOpen {
                    in_flight: 0,
                    successes: 0,
                },
                TransitionReason::OpenDurationElapsed,
                now,
            )),
            _ => None,
        }
    }

    /// Asks to make a call. `Err` carries when the breaker will next admit a probe.
    pub(crate) fn acquire(
        &mut self,
        now: Instant,
        change: &mut Option<StateChange>,
    ) -> Result<Ticket, Option<Duration>> {
        *change = self.poll_timer(now);
        let probe = match &mut self.phase {
            Phase::Closed | Phase::Disabled => false,
            Phase::Open { until } => return Err(Some(until.saturating_duration_since(now))),
            Phase::ForcedOpen => return Err(None),
            Phase::HalfOpen {
                in_flight,
                successes,
            } => {
                if *in_flight + *successes >= self.cfg.half_open_probes {
                    return Err(None);
                }
                *in_flight += 1;
                true
            }
        };
        Ok(Ticket {
            epoch: self.epoch,
            probe,
        })
    }

    /// A ticket was dropped without an outcome: give a probe slot back.
    pub(crate) fn release(&mut self, ticket: Ticket) {
        if ticket.epoch != self.epoch {
            return;
        }
        if let Phase::HalfOpen { in_flight, .. } = &mut self.phase {
            *in_flight = in_flight.saturating_sub(1);
        }
    }

    /// Records the outcome of a call that took `elapsed`.
    pub(crate) fn record(
        &mut self,
        ticket: Ticket,
        outcome: Outcome,
        elapsed: Duration,
        now: Instant,
    ) -> Option<StateChange> {
        if ticket.epoch != self.epoch {
            return None;
        }
        let slow = elapsed >= self.cfg.slow_call_duration;
        match self.phase {
            Phase::Closed => self.record_closed(outcome, slow, now),
            Phase::HalfOpen {
                in_flight,
                successes,
            } => {
                let in_flight = in_flight.saturating_sub(1);
                match outcome {
                    Outcome::Ignore => {
                        self.phase = Phase::HalfOpen {
                            in_flight,
                            successes,
                        };
                        None
                    }
                    Outcome::Failure => {
                        self.last_failure = Some(now);
                        Some(self.open(TransitionReason::ProbeFailed, now))
                    }
                    Outcome::Success if slow => Some(self.open(TransitionReason::ProbeSlow, now)),
                    Outcome::Success => {
                        let successes = successes + 1;
                        if successes >= self.cfg.half_open_probes {
                            Some(self.transition(
                                Phase::Closed,
                                TransitionReason::ProbesSucceeded,
                                now,
                            ))
                        } else {
                            self.phase = Phase::HalfOpen {
                                in_flight,
                                successes,
                            };
                            None
                        }
                    }
                }
            }
            Phase::Open { .. } | Phase::ForcedOpen | Phase::Disabled => None,
        }
    }

    fn record_closed(&mut self, outcome: Outcome, slow: bool, now: Instant) -> Option<StateChange> {
        let failed = match outcome {
            Outcome::Ignore => return None,
            Outcome::Success => {
                self.consecutive = 0;
                false
            }
            Outcome::Failure => {
                self.consecutive += 1;
                self.last_failure = Some(now);
                true
            }
        };
        let counts = self.window.record(now, failed, slow);
        let threshold = self.cfg.consecutive_failures;
        if threshold > 0 && self.consecutive >= threshold {
            let count = self.consecutive;
            return Some(self.open(
                TransitionReason::ConsecutiveFailures { count, threshold },
                now,
            ));
        }
        if counts.calls >= self.cfg.minimum_calls.max(1) {
            let calls = f64::from(counts.calls);
            let rate = f64::from(counts.failures) / calls;
            if counts.failures > 0 && rate >= self.cfg.failure_rate {
                return Some(self.open(
                    TransitionReason::FailureRate {
                        rate,
                        threshold: self.cfg.failure_rate,
                    },
                    now,
                ));
            }
            let rate = f64::from(counts.slow) / calls;
            if counts.slow > 0 && rate >= self.cfg.slow_call_rate {
                return Some(self.open(
                    TransitionReason::SlowCallRate {
                        rate,
                        threshold: self.cfg.slow_call_rate,
                    },
                    now,
                ));
            }
        }
        None
    }

    /// Forces a state by hand: open, closed (reset) or disabled.
    pub(crate) fn force(&mut self, to: Phase, now: Instant) -> Option<StateChange> {
        let reason = match to {
            Phase::ForcedOpen => TransitionReason::ForcedOpen,
            Phase::Disabled => TransitionReason::Disabled,
            _ => TransitionReason::Reset,
        };
        if self.phase == to && to != Phase::Closed {
            return None;
        }
        let change = self.transition(to, reason, now);
        self.last_failure = None;
        Some(change)
    }

    pub(crate) fn numbers(&mut self, now: Instant) -> Numbers {
        Numbers {
            phase: self.phase,
            counts: self.window.counts(now),
            consecutive: self.consecutive,
            last_failure: self.last_failure,
            last_change: self.last_change,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            consecutive_failures: 3,
            minimum_calls: 4,
            failure_rate: 0.5,
            window_size: 4,
            open_duration: Duration::from_secs(10),
            half_open_probes: 2,
            ..Config::default()
        }
    }

    fn call(m: &mut Machine, outcome: Outcome, now: Instant) -> Option<StateChange> {
        let mut change = None;
        let ticket = m.acquire(now, &mut change).expect("admitted");
        m.record(ticket, outcome, Duration::ZERO, now)
    }

    #[test]
    fn consecutive_failures_trip_and_probes_close() {
        let t0 = Instant::now();
        let mut m = Machine::new(cfg(), t0);
        call(&mut m, Outcome::Failure, t0);
        call(&mut m, Outcome::Failure, t0);
        let change = call(&mut m, Outcome::Failure, t0).expect("tripped");
        assert_eq!(change.to, CircuitState::Open);
        assert_eq!(
            change.reason,
            TransitionReason::ConsecutiveFailures {
                count: 3,
                threshold: 3
            }
        );
        let mut c = None;
        assert_eq!(
            m.acquire(t0 + Duration::from_secs(4), &mut c),
            Err(Some(Duration::from_secs(6)))
        );

        let later = t0 + Duration::from_secs(10);
        let mut c = None;
        let p1 = m.acquire(later, &mut c).unwrap();
        assert_eq!(c.map(|c| c.to), Some(CircuitState::HalfOpen));
        let p2 = m.acquire(later, &mut c).unwrap();
        assert_eq!(m.acquire(later, &mut c), Err(None), "only two probes");
        assert!(p1.probe && p2.probe);
        assert!(m
            .record(p1, Outcome::Success, Duration::ZERO, later)
            .is_none());
        let closed = m
            .record(p2, Outcome::Success, Duration::ZERO, later)
            .unwrap();
        assert_eq!(closed.to, CircuitState::Closed);
    }

    #[test]
    fn failure_rate_trips_after_minimum_calls() {
        let t0 = Instant::now();
        let cfg = Config {
            consecutive_failures: 0,
            ..cfg()
        };
        let mut m = Machine::new(cfg, t0);
        assert!(call(&mut m, Outcome::Failure, t0).is_none());
        assert!(call(&mut m, Outcome::Success, t0).is_none());
        assert!(call(&mut m, Outcome::Failure, t0).is_none());
        let change = call(&mut m, Outcome::Success, t0).expect("2 of 4 failed");
        assert!(matches!(
            change.reason,
            TransitionReason::FailureRate { .. }
        ));
    }

    #[test]
    fn released_probe_can_be_taken_again_and_stale_outcomes_are_dropped() {
        let t0 = Instant::now();
        let mut m = Machine::new(cfg(), t0);
        let mut c = None;
        let stale = m.acquire(t0, &mut c).unwrap();
        for _ in 0..3 {
            call(&mut m, Outcome::Failure, t0);
        }
        assert!(m
            .record(stale, Outcome::Failure, Duration::ZERO, t0)
            .is_none());
        let later = t0 + Duration::from_secs(10);
        let p1 = m.acquire(later, &mut c).unwrap();
        let _p2 = m.acquire(later, &mut c).unwrap();
        m.release(p1);
        assert!(
            m.acquire(later, &mut c).is_ok(),
            "released slot is reusable"
        );
    }

    #[test]
    fn time_window_forgets_old_failures() {
        let t0 = Instant::now();
        let cfg = Config {
            consecutive_failures: 0,
            window: WindowKind::Time,
            window_duration: Duration::from_secs(10),
            ..cfg()
        };
        let mut m = Machine::new(cfg, t0);
        call(&mut m, Outcome::Failure, t0);
        call(&mut m, Outcome::Failure, t0);
        let later = t0 + Duration::from_secs(11);
        call(&mut m, Outcome::Success, later);
        call(&mut m, Outcome::Success, later);
        call(&mut m, Outcome::Failure, later);
        assert!(
            call(&mut m, Outcome::Success, later).is_none(),
            "1 of 4 failed"
        );
    }
}
