//! What the dashboard draws: per-upstream traffic counted on the request
//! path, sampled once a second into a short history, and the timeline of
//! breaker transitions with the time each incident took to recover.
//!
//! The request path only adds to a few relaxed atomics ([`Traffic`]); the
//! sampler turns their differences into [`Sample`]s, keyed by upstream name
//! so the history survives reloads that rebuild an upstream.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tidegate_client::clock::{instant_rfc3339, unix_millis};
use tidegate_resilience::breaker::{CircuitState, StateChange};
use tokio::time::Instant;

use crate::observe::striped::{stripe, STRIPES};

/// Samples kept per upstream: five minutes at one a second.
pub const HISTORY_SAMPLES: usize = 300;
/// The window of the latency percentiles and rates on the cards.
pub const WINDOW_SAMPLES: usize = 60;
const TRANSITIONS_KEPT: usize = 200;
const INCIDENTS_KEPT: usize = 100;

/// Latency buckets: four per power of two of microseconds, up to ~4.5 min.
const BUCKETS: usize = 112;

fn bucket(micros: u64) -> usize {
    if micros < 4 {
        return micros as usize;
    }
    let log2 = 63 - micros.leading_zeros() as usize;
    let sub = (micros >> (log2 - 2)) as usize & 3;
    ((log2 - 1) * 4 + sub).min(BUCKETS - 1)
}

/// The middle of bucket `index`, in milliseconds.
fn bucket_middle_ms(index: usize) -> f64 {
    if index < 4 {
        return index as f64 / 1000.0;
    }
    let (log2, sub) = (index / 4 + 1, index % 4);
    let lower = ((4 + sub) as u64) << (log2 - 2);
    let upper = ((5 + sub) as u64) << (log2 - 2);
    (lower + upper) as f64 / 2000.0
}

/// Counts of one upstream's requests, added to on the request path: a
/// stripe per thread (see [`crate::observe::striped`]), added up once a
/// second.
#[derive(Debug)]
pub struct Traffic {
    stripes: Box<[Counts; STRIPES]>,
}

/// One stripe of [`Traffic`].
#[derive(Debug)]
#[repr(align(128))]
struct Counts {
    requests: AtomicU64,
    errors: AtomicU64,
    rate_limited: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            stripes: Box::new(std::array::from_fn(|_| Counts::default())),
        }
    }
}

impl Traffic {
    /// One answered request: whether its upstream call failed (an error, a
    /// 5xx or a local rejection, even if a fallback answered) and how long
    /// the client waited for the head.
    pub fn record(&self, failed: bool, took: Duration) {
        let stripe = stripe();
        let counts = &self.stripes[stripe.index()];
        stripe.add(&counts.requests, 1);
        if failed {
            stripe.add(&counts.errors, 1);
        }
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        stripe.add(&counts.latency[bucket(micros)], 1);
    }

    /// One request refused by a rate limit.
    pub fn rate_limited(&self) {
        let stripe = stripe();
        stripe.add(&self.stripes[stripe.index()].rate_limited, 1);
    }

    fn read(&self) -> Totals {
        let mut totals = Totals {
            requests: 0,
            errors: 0,
            rate_limited: 0,
            latency: [0; BUCKETS],
        };
        for counts in self.stripes.iter() {
            totals.requests += counts.requests.load(Ordering::Relaxed);
            totals.errors += counts.errors.load(Ordering::Relaxed);
            totals.rate_limited += counts.rate_limited.load(Ordering::Relaxed);
            for (total, count) in totals.latency.iter_mut().zip(&counts.latency) {
                *total += count.load(Ordering::Relaxed);
            }
        }
        totals
    }
}

#[derive(Debug, Clone)]
struct Totals {
    requests: u64,
    errors: u64,
    rate_limited: u64,
    latency: [u64; BUCKETS],
}

/// One second of one upstream.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// End of the second, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Requests answered.
    pub requests: u64,
    /// Of which the upstream call failed (error, 5xx, local rejection),
    /// whether or not a fallback answered.
    pub errors: u64,
    /// Refused locally (breaker open, bulkhead full, rate limited, …).
    pub rejected: u64,
    /// Of which by a rate limit.
    pub rate_limited: u64,
    /// Median latency, when there were requests.
    pub p50_ms: Option<f64>,
    /// 99th-percentile latency, when there were requests.
    pub p99_ms: Option<f64>,
}

/// The last [`WINDOW_SAMPLES`] seconds of one upstream, for its card.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Window {
    /// How many seconds the numbers cover (fewer right after start).
    pub seconds: usize,
    /// Requests answered per second.
    pub requests_per_second: f64,
    /// Failed upstream calls / requests (0 without requests).
    pub error_rate: f64,
    /// Requests refused by a rate limit in the window.
    pub rate_limited: u64,
    /// Requests refused locally in the window.
    pub rejected: u64,
    /// Median latency over the window.
    pub p50_ms: Option<f64>,
    /// 99th-percentile latency over the window.
    pub p99_ms: Option<f64>,
}

fn quantile(counts: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    // The rank of the q-quantile, 1-based: the smallest value with at
    // least q of the requests at or below it.
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, &n) in counts.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(bucket_middle_ms(i));
        }
    }
    None
}

#[derive(Debug)]
struct Series {
    /// The counters the previous sample was taken from.
    source: Arc<Traffic>,
    last: Totals,
    last_rejected: u64,
    samples: VecDeque<Sample>,
    /// Latency counts of the newest samples, for the window percentiles.
    latency: VecDeque<[u64; BUCKETS]>,
}

/// One breaker transition, as the timeline shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Transition {
    /// The upstream.
    pub upstream: String,
    /// State before.
    pub from: &'static str,
    /// State after.
    pub to: &'static str,
    /// Why.
    pub reason: String,
    /// When (RFC 3339).
    pub timestamp: String,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// An incident: the breaker left closed, and (maybe) came back.
#[derive(Debug, Clone, Serialize)]
pub struct Incident {
    /// The upstream.
    pub upstream: String,
    /// When it opened (RFC 3339).
    pub opened_at: String,
    /// When it closed again, if it has.
    pub closed_at: Option<String>,
    /// Seconds from open to closed, once closed.
    pub recovery_seconds: Option<f64>,
    #[serde(skip)]
    opened: Instant,
}

/// What a breaker transition did to the upstream's incidents.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum IncidentChange {
    /// The breaker opened: an incident began.
    Opened,
    /// The breaker closed again after `seconds`.
    Recovered {
        /// Time to recovery.
        seconds: f64,
    },
    /// Neither (a probe, a re-trip while open).
    None,
}

/// Recovery figures of one upstream since the gateway started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Recovery {
    /// Incidents that ended.
    pub recovered: u64,
    /// Their mean time to recovery, in seconds.
    pub mean_seconds: Option<f64>,
    /// Seconds the current incident has lasted, if one is under way.
    pub open_for_seconds: Option<f64>,
}

#[derive(Debug, Default)]
struct State {
    series: HashMap<String, Series>,
    transitions: VecDeque<Transition>,
    incidents: VecDeque<Incident>,
    /// (recovered incidents, their total seconds) per upstream.
    recovered: HashMap<String, (u64, f64)>,
}

/// The history and timeline of every upstream, shared by the sampler, the
/// breaker watchers and the admin API.
#[derive(Debug, Default)]
pub struct Stats {
    state: Mutex<State>,
}

/// The per-upstream input of [`Stats::sample`].
#[derive(Debug)]
pub struct SampleInput<'a> {
    /// The upstream's name.
    pub name: &'a str,
    /// Its counters.
    pub traffic: &'a Arc<Traffic>,
    /// Its local rejections so far.
    pub rejected: u64,
}

impl Stats {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one sample of every upstream in `inputs`; series of upstreams
    /// no longer listed are dropped.
    pub fn sample<'a>(&self, inputs: impl IntoIterator<Item = SampleInput<'a>>) {
        let at_ms = unix_millis();
        let mut state = self.lock();
        let mut seen = Vec::new();
        for input in inputs {
            seen.push(input.name.to_owned());
            let now = input.traffic.read();
            let series = state
                .series
                .entry(input.name.to_owned())
                .or_insert_with(|| Series {
                    source: input.traffic.clone(),
                    last: now.clone(),
                    last_rejected: input.rejected,
                    samples: VecDeque::with_capacity(HISTORY_SAMPLES),
                    latency: VecDeque::with_capacity(WINDOW_SAMPLES),
                });
            // A reload that rebuilt the upstream starts its counts from 0.
            if !Arc::ptr_eq(&series.source, input.traffic) {
                series.source = input.traffic.clone();
                series.last = Traffic::default().read();
                series.last_rejected = 0;
            }
            let latency: [u64; BUCKETS] =
                std::array::from_fn(|i| now.latency[i].saturating_sub(series.last.latency[i]));
            let sample = Sample {
                at_ms,
                requests: now.requests.saturating_sub(series.last.requests),
                errors: now.errors.saturating_sub(series.last.errors),
                rejected: input.rejected.saturating_sub(series.last_rejected),
                rate_limited: now.rate_limited.saturating_sub(series.last.rate_limited),
                p50_ms: quantile(&latency, 0.5),
                p99_ms: quantile(&latency, 0.99),
            };
            if series.samples.len() == HISTORY_SAMPLES {
                series.samples.pop_front();
            }
            series.samples.push_back(sample);
            if series.latency.len() == WINDOW_SAMPLES {
                series.latency.pop_front();
            }
            series.latency.push_back(latency);
            series.last = now;
            series.last_rejected = input.rejected;
        }
        state.series.retain(|name, _| seen.contains(name));
    }

    /// The card numbers of `upstream` over the last minute.
    pub fn window(&self, upstream: &str) -> Window {
        let state = self.lock();
        let Some(series) = state.series.get(upstream) else {
            return Window::default();
        };
        let recent = series.samples.iter().rev().take(WINDOW_SAMPLES);
        let (mut requests, mut errors, mut rejected, mut rate_limited) = (0, 0, 0, 0);
        for s in recent {
            requests += s.requests;
            errors += s.errors;
            rejected += s.rejected;
            rate_limited += s.rate_limited;
        }
        let mut latency = [0u64; BUCKETS];
        for counts in &series.latency {
            for (sum, n) in latency.iter_mut().zip(counts) {
                *sum += n;
            }
        }
        let seconds = series.samples.len().min(WINDOW_SAMPLES);
        Window {
            seconds,
            requests_per_second: if seconds == 0 {
                0.0
            } else {
                requests as f64 / seconds as f64
            },
            error_rate: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            rate_limited,
            rejected,
            p50_ms: quantile(&latency, 0.5),
            p99_ms: quantile(&latency, 0.99),
        }
    }

    /// The samples of every upstream, oldest first.
    pub fn history(&self) -> HashMap<String, Vec<Sample>> {
        self.lock()
            .series
            .iter()
            .map(|(name, s)| (name.clone(), s.samples.iter().cloned().collect()))
            .collect()
    }

    /// The newest sample of every upstream.
    pub fn latest(&self) -> HashMap<String, Sample> {
        self.lock()
            .series
            .iter()
            .filter_map(|(name, s)| Some((name.clone(), s.samples.back()?.clone())))
            .collect()
    }

    /// Adds a breaker transition to the timeline; opens or closes an
    /// incident and says which.
    pub fn transition(
        &self,
        upstream: &str,
        change: &StateChange,
        reason: String,
    ) -> IncidentChange {
        let timestamp = instant_rfc3339(change.at);
        let at_ms = unix_millis()
            .saturating_sub(u64::try_from(change.at.elapsed().as_millis()).unwrap_or(u64::MAX));
        let mut state = self.lock();
        if state.transitions.len() == TRANSITIONS_KEPT {
            state.transitions.pop_front();
        }
        state.transitions.push_back(Transition {
            upstream: upstream.to_owned(),
            from: change.from.as_str(),
            to: change.to.as_str(),
            reason,
            timestamp: timestamp.clone(),
            at_ms,
        });
        let current = state
            .incidents
            .iter()
            .rposition(|i| i.upstream == upstream && i.closed_at.is_none());
        match (change.to, current) {
            (CircuitState::Open | CircuitState::ForcedOpen, None) => {
                if state.incidents.len() == INCIDENTS_KEPT {
                    state.incidents.pop_front();
                }
                state.incidents.push_back(Incident {
                    upstream: upstream.to_owned(),
                    opened_at: timestamp,
                    closed_at: None,
                    recovery_seconds: None,
                    opened: change.at,
                });
                IncidentChange::Opened
            }
            (CircuitState::Closed | CircuitState::Disabled, Some(index)) => {
                let incident = &mut state.incidents[index];
                let seconds = change.at.duration_since(incident.opened).as_secs_f64();
                incident.closed_at = Some(timestamp);
                incident.recovery_seconds = Some(seconds);
                let totals = state.recovered.entry(upstream.to_owned()).or_default();
                totals.0 += 1;
                totals.1 += seconds;
                IncidentChange::Recovered { seconds }
            }
            _ => IncidentChange::None,
        }
    }

    /// The latest transitions and incidents, oldest first.
    pub fn timeline(&self) -> (Vec<Transition>, Vec<Incident>) {
        let state = self.lock();
        (
            state.transitions.iter().cloned().collect(),
            state.incidents.iter().cloned().collect(),
        )
    }

    /// The recovery figures of `upstream`.
    pub fn recovery(&self, upstream: &str) -> Recovery {
        let state = self.lock();
        let (recovered, total) = state.recovered.get(upstream).copied().unwrap_or_default();
        let open_for_seconds = state
            .incidents
            .iter()
            .rev()
            .find(|i| i.upstream == upstream && i.closed_at.is_none())
            .map(|i| i.opened.elapsed().as_secs_f64());
        Recovery {
            recovered,
            mean_seconds: (recovered > 0).then(|| total / recovered as f64),
            open_for_seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidegate_resilience::breaker::TransitionReason;

    #[test]
    fn buckets_grow_by_quarters_of_a_power_of_two() {
        for micros in [
            0u64, 1, 3, 4, 5, 7, 8, 100, 1_000, 65_000, 1_000_000, 60_000_000,
        ] {
            let middle_us = bucket_middle_ms(bucket(micros)) * 1000.0;
            let error = (middle_us - micros as f64).abs();
            assert!(
                error <= micros as f64 * 0.125 + 0.5,
                "{micros} µs lands in a bucket around {middle_us} µs"
            );
        }
        assert!((1..100_000u64).all(|m| bucket(m) >= bucket(m - 1)));
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn samples_count_the_differences_and_take_percentiles() {
        let stats = Stats::default();
        let traffic = Arc::new(Traffic::default());
        let input = |rejected| SampleInput {
            name: "a",
            traffic: &traffic,
            rejected,
        };
        stats.sample([input(0)]);
        for ms in 1..=100 {
            traffic.record(ms % 10 == 0, Duration::from_millis(ms));
        }
        traffic.rate_limited();
        stats.sample([input(4)]);
        let history = stats.history();
        let last = history["a"].last().unwrap();
        assert_eq!((last.requests, last.errors), (100, 10));
        assert_eq!((last.rejected, last.rate_limited), (4, 1));
        let p50 = last.p50_ms.unwrap();
        let p99 = last.p99_ms.unwrap();
        assert!((44.0..=56.0).contains(&p50), "p50 {p50}");
        assert!((87.0..=112.0).contains(&p99), "p99 {p99}");

        let window = stats.window("a");
        assert_eq!(window.seconds, 2);
        assert_eq!(window.requests_per_second, 50.0);
        assert_eq!(window.error_rate, 0.1);

        // A rebuilt upstream's counters start again from zero.
        let rebuilt = Arc::new(Traffic::default());
        rebuilt.record(false, Duration::from_millis(1));
        stats.sample([SampleInput {
            name: "a",
            traffic: &rebuilt,
            rejected: 0,
        }]);
        assert_eq!(stats.history()["a"].last().unwrap().requests, 1);
        // An upstream gone from the config loses its series.
        stats.sample([]);
        assert!(stats.history().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn incidents_last_from_open_to_closed() {
        let stats = Stats::default();
        let change = |from, to| StateChange {
            from,
            to,
            reason: TransitionReason::Reset,
            at: Instant::now(),
        };
        use CircuitState::*;
        stats.transition("a", &change(Closed, Open), "tripped".into());
        tokio::time::advance(Duration::from_secs(10)).await;
        stats.transition("a", &change(Open, HalfOpen), "elapsed".into());
        stats.transition("a", &change(HalfOpen, Open), "probe failed".into());
        assert_eq!(stats.recovery("a").open_for_seconds, Some(10.0));
        tokio::time::advance(Duration::from_secs(20)).await;
        stats.transition("a", &change(Open, HalfOpen), "elapsed".into());
        stats.transition("a", &change(HalfOpen, Closed), "probes ok".into());
        stats.transition("a", &change(Closed, ForcedOpen), "by hand".into());
        tokio::time::advance(Duration::from_secs(10)).await;
        stats.transition("a", &change(ForcedOpen, Closed), "reset".into());

        let (transitions, incidents) = stats.timeline();
        assert_eq!(transitions.len(), 7);
        let recoveries: Vec<_> = incidents.iter().map(|i| i.recovery_seconds).collect();
        assert_eq!(recoveries, [Some(30.0), Some(10.0)]);
        let recovery = stats.recovery("a");
        assert_eq!(recovery.recovered, 2);
        assert_eq!(recovery.mean_seconds, Some(20.0));
        assert_eq!(recovery.open_for_seconds, None);
        assert_eq!(stats.recovery("b"), Recovery::default());
    }
}
