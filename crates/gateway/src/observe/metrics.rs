//! The gateway's Prometheus metrics (names as in DESIGN.md).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use crate::observe::striped::{StripedCounter, StripedHistogram};
use prometheus_client::registry::Registry;
use std::time::Duration;

use tidegate_resilience::breaker::CircuitState;
use tidegate_resilience::ratelimit::{Decision, StoreError};

use crate::config::FailureMode;

pub use tidegate_client::metrics::method_label;

/// Labels of `tidegate_requests_total`. Names are shared (`Arc`) so a
/// request copies no strings to count itself.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route name (`none` when nothing matched).
    pub route: Arc<String>,
    /// Upstream name (`none` when nothing matched).
    pub upstream: Arc<String>,
    /// Request method; see [`method_label`].
    pub method: &'static str,
    /// Response status.
    pub status: u16,
}

/// An answered request's labels, borrowed: they are cloned only for a
/// series a worker has not counted into yet.
#[derive(Debug, Clone, Copy)]
pub struct Answered<'a> {
    /// Route name (`none` when nothing matched).
    pub route: &'a Arc<String>,
    /// Upstream name (`none` when nothing matched).
    pub upstream: &'a Arc<String>,
    /// Request method; see [`method_label`].
    pub method: &'static str,
    /// Response status.
    pub status: u16,
}

impl Answered<'_> {
    fn owned(&self) -> RequestLabels {
        RequestLabels {
            route: self.route.clone(),
            upstream: self.upstream.clone(),
            method: self.method,
            status: self.status,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Arc<String>,
    upstream: Arc<String>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: Arc<String>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    upstream: String,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    upstream: String,
    from: &'static str,
    to: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectionLabels {
    upstream: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    upstream: String,
    endpoint: String,
}

/// Labels of per-route counts of a kind (fallbacks, faults).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    route: Arc<String>,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SagaLabels {
    saga: String,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideLabels {
    side: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureModeLabels {
    failure_mode: &'static str,
}

/// Every gateway metric, registered once.
#[derive(Debug)]
pub struct Metrics {
    /// Tells this instance's series apart in the per-thread cache.
    id: u64,
    registry: Registry,
    requests: Family<RequestLabels, StripedCounter>,
    duration: Family<RouteLabels, StripedHistogram>,
    attempts: Family<UpstreamLabels, StripedCounter>,
    retries: Family<UpstreamLabels, StripedCounter>,
    circuit_state: Family<StateLabels, Gauge>,
    transitions: Family<TransitionLabels, Counter>,
    rejections: Family<RejectionLabels, Counter>,
    endpoint_healthy: Family<EndpointLabels, Gauge>,
    ejections: Family<EndpointLabels, Counter>,
    fallbacks: Family<FallbackLabels, Counter>,
    sagas: Family<SagaLabels, Counter>,
    faults: Family<FallbackLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    tls_failures: Family<SideLabels, Counter>,
    spans: Family<ResultLabels, Counter>,
    alerts: Family<ResultLabels, Counter>,
    store_decisions: Family<ResultLabels, Counter>,
    store_errors: Family<KindLabels, Counter>,
    store_duration: Histogram,
    store_fallbacks: Family<FailureModeLabels, Counter>,
    store_up: Gauge,
    /// The event store's metrics (`tidegate_events_*`).
    pub events: tidegate_events::metrics::EventMetrics,
}

/// A request's series in [`SERIES`]: which metrics, and the addresses of
/// its labels (the entry holds the labels, so no other label can take an
/// address while it is kept).
#[derive(Debug, Hash, PartialEq, Eq)]
struct SeriesKey {
    metrics: u64,
    route: usize,
    upstream: usize,
    method: usize,
    status: u16,
}

/// The series one kind of answer counts into.
#[derive(Debug)]
struct Series {
    labels: RequestLabels,
    requests: StripedCounter,
    duration: StripedHistogram,
    attempts: Option<StripedCounter>,
    retries: Option<StripedCounter>,
}

/// Past this many, the cache starts over (old routes after many reloads).
const MAX_SERIES_KEPT: usize = 4096;

thread_local! {
    static SERIES: RefCell<HashMap<SeriesKey, Series, crate::proxy::client::Fnv>> =
        RefCell::new(HashMap::default());
}

fn duration_histogram() -> StripedHistogram {
    // 1 ms to about 65 s.
    StripedHistogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::default();
        let duration = Family::new_with_constructor(duration_histogram as fn() -> StripedHistogram);
        let attempts = Family::default();
        let retries = Family::default();
        let circuit_state = Family::default();
        let transitions = Family::default();
        let rejections = Family::default();
        let endpoint_healthy = Family::default();
        let ejections = Family::default();
        let fallbacks = Family::default();
        let sagas = Family::default();
        let faults = Family::default();
        let reloads = Family::default();
        let tls_failures = Family::<SideLabels, Counter>::default();
        let spans = Family::<ResultLabels, Counter>::default();
        let alerts = Family::default();
        let store_decisions = Family::default();
        let store_errors = Family::default();
        // 100 µs to about 0.8 s: a loopback round trip is well under a millisecond.
        let store_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 14));
        let store_fallbacks = Family::default();
        let store_up = Gauge::default();
        registry.register("tidegate_requests", "Requests answered", requests.clone());
        registry.register(
            "tidegate_request_duration_seconds",
            "Time from request to response head",
            duration.clone(),
        );
        registry.register(
            "tidegate_upstream_attempts",
            "Attempts sent upstream",
            attempts.clone(),
        );
        registry.register(
            "tidegate_retries",
            "Attempts after the first",
            retries.clone(),
        );
        registry.register(
            "tidegate_circuit_state",
            "1 for the breaker's current state",
            circuit_state.clone(),
        );
        registry.register(
            "tidegate_circuit_transitions",
            "Breaker state changes",
            transitions.clone(),
        );
        registry.register(
            "tidegate_rejections",
            "Requests refused by a local policy",
            rejections.clone(),
        );
        registry.register(
            "tidegate_endpoint_healthy",
            "1 when the endpoint passes its health checks",
            endpoint_healthy.clone(),
        );
        registry.register(
            "tidegate_outlier_ejections",
            "Endpoints ejected by outlier detection",
            ejections.clone(),
        );
        registry.register(
            "tidegate_fallbacks",
            "Requests answered by a route's fallback",
            fallbacks.clone(),
        );
        registry.register(
            "tidegate_sagas",
            "Sagas ended: completed, compensated, or stuck (waiting for an operator's retry)",
            sagas.clone(),
        );
        registry.register(
            "tidegate_faults",
            "Faults injected by a route's fault settings (delay or abort)",
            faults.clone(),
        );
        registry.register(
            "tidegate_tls_handshake_failures",
            "TLS handshakes that failed or timed out: side=\"listener\" with clients, side=\"upstream\" with https endpoints",
            tls_failures.clone(),
        );
        registry.register(
            "tidegate_telemetry_spans",
            "Spans for OTLP export: exported, dropped (the queue was full) or failed (the export failed)",
            spans.clone(),
        );
        registry.register(
            "tidegate_config_reloads",
            "Config reloads, applied or rejected",
            reloads.clone(),
        );
        registry.register(
            "tidegate_alerts",
            "Webhook alert deliveries: delivered, failed (every attempt failed) or dropped (too many under way)",
            alerts.clone(),
        );
        registry.register(
            "tidegate_ratelimit_store_decisions",
            "Decisions made by the shared rate-limit store (Redis), allowed or denied",
            store_decisions.clone(),
        );
        registry.register(
            "tidegate_ratelimit_store_errors",
            "Decisions the shared rate-limit store could not make: timeout, error, or unavailable (its breaker open)",
            store_errors.clone(),
        );
        registry.register(
            "tidegate_ratelimit_store_duration_seconds",
            "Time the shared rate-limit store took per decision, answered or not",
            store_duration.clone(),
        );
        registry.register(
            "tidegate_ratelimit_store_fallbacks",
            "Requests decided by the failure mode: open counts locally, closed refuses",
            store_fallbacks.clone(),
        );
        registry.register(
            "tidegate_ratelimit_store_up",
            "1 when the shared rate-limit store answered its last request",
            store_up.clone(),
        );
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let events = tidegate_events::metrics::EventMetrics::default();
        events.register(&mut registry);
        Metrics {
            events,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            registry,
            requests,
            duration,
            attempts,
            retries,
            circuit_state,
            transitions,
            rejections,
            endpoint_healthy,
            ejections,
            fallbacks,
            sagas,
            faults,
            reloads,
            tls_failures,
            spans,
            alerts,
            store_decisions,
            store_errors,
            store_duration,
            store_fallbacks,
            store_up,
        }
    }
}

impl Metrics {
    /// Counts one answered request: its time to response head and the
    /// attempts it made upstream. The series are looked up once per worker
    /// thread and kept: a family lookup hashes every label with SipHash
    /// under a lock, which cost more than the rest of the counting.
    pub fn answered(&self, labels: Answered<'_>, seconds: f64, attempts: u32) {
        let key = SeriesKey {
            metrics: self.id,
            route: Arc::as_ptr(labels.route) as usize,
            upstream: Arc::as_ptr(labels.upstream) as usize,
            method: labels.method.as_ptr() as usize,
            status: labels.status,
        };
        SERIES.with(|series| {
            let mut series = series.borrow_mut();
            if series.len() >= MAX_SERIES_KEPT && !series.contains_key(&key) {
                series.clear();
            }
            let found = series.entry(key).or_insert_with(|| {
                let labels = labels.owned();
                Series {
                    requests: self.requests.get_or_create(&labels).clone(),
                    duration: self
                        .duration
                        .get_or_create(&RouteLabels {
                            route: labels.route.clone(),
                            upstream: labels.upstream.clone(),
                        })
                        .clone(),
                    attempts: None,
                    retries: None,
                    labels,
                }
            });
            found.duration.observe(seconds);
            found.requests.inc();
            if attempts == 0 {
                return;
            }
            let upstream = || UpstreamLabels {
                upstream: found.labels.upstream.clone(),
            };
            found
                .attempts
                .get_or_insert_with(|| self.attempts.get_or_create(&upstream()).clone())
                .inc_by(u64::from(attempts));
            if attempts > 1 {
                found
                    .retries
                    .get_or_insert_with(|| self.retries.get_or_create(&upstream()).clone())
                    .inc_by(u64::from(attempts - 1));
            }
        });
    }

    /// Counts a local rejection (`circuit_open`, `bulkhead_full`, …).
    pub fn rejection(&self, upstream: &str, reason: &'static str) {
        self.rejections
            .get_or_create(&RejectionLabels {
                upstream: upstream.to_owned(),
                reason,
            })
            .inc();
    }

    /// Sets the breaker state gauges of `upstream`: 1 for `state`, 0 for the rest.
    pub fn circuit_state(&self, upstream: &str, state: &'static str) {
        for s in CircuitState::ALL.map(CircuitState::as_str) {
            self.circuit_state
                .get_or_create(&StateLabels {
                    upstream: upstream.to_owned(),
                    state: s,
                })
                .set(i64::from(s == state));
        }
    }

    /// Counts a breaker transition.
    pub fn transition(&self, upstream: &str, from: &'static str, to: &'static str) {
        self.transitions
            .get_or_create(&TransitionLabels {
                upstream: upstream.to_owned(),
                from,
                to,
            })
            .inc();
    }

    /// Sets whether an endpoint is healthy.
    pub fn endpoint_healthy(&self, upstream: &str, endpoint: &str, healthy: bool) {
        self.endpoint_healthy
            .get_or_create(&EndpointLabels {
                upstream: upstream.to_owned(),
                endpoint: endpoint.to_owned(),
            })
            .set(i64::from(healthy));
    }

    /// Counts an outlier ejection.
    pub fn ejection(&self, upstream: &str, endpoint: &str) {
        self.ejections
            .get_or_create(&EndpointLabels {
                upstream: upstream.to_owned(),
                endpoint: endpoint.to_owned(),
            })
            .inc();
    }

    /// Counts an answer from a route's fallback.
    pub fn fallback(&self, route: &Arc<String>, kind: &'static str) {
        self.fallbacks
            .get_or_create(&FallbackLabels {
                route: route.clone(),
                kind,
            })
            .inc();
    }

    /// Counts a saga that ended `result` (completed, compensated, stuck).
    pub fn saga(&self, saga: &str, result: &'static str) {
        self.sagas
            .get_or_create(&SagaLabels {
                saga: saga.to_owned(),
                result,
            })
            .inc();
    }

    /// Counts an injected fault: `delay` or `abort`.
    pub fn fault(&self, route: &Arc<String>, kind: &'static str) {
        self.faults
            .get_or_create(&FallbackLabels {
                route: route.clone(),
                kind,
            })
            .inc();
    }

    /// The counters of spans exported, dropped and failed, for the tracer.
    pub fn span_counters(&self) -> [Counter; 3] {
        ["exported", "dropped", "failed"]
            .map(|result| self.spans.get_or_create(&ResultLabels { result }).clone())
    }

    /// Counts a TLS handshake with a client that failed or timed out.
    pub fn tls_handshake_failed(&self) {
        self.tls_failures
            .get_or_create(&SideLabels { side: "listener" })
            .inc();
    }

    /// The counter of failed TLS handshakes with upstream endpoints, for
    /// the upstream clients to count in.
    pub fn upstream_tls_failures(&self) -> Counter {
        self.tls_failures
            .get_or_create(&SideLabels { side: "upstream" })
            .clone()
    }

    /// Counts a config reload: `applied` or `rejected`.
    pub fn reload(&self, result: &'static str) {
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts one webhook delivery: `delivered`, `failed` or `dropped`.
    pub fn alert(&self, result: &'static str) {
        self.alerts.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts one decision asked of the shared store and its time.
    pub fn store_decision(&self, result: &Result<Decision, StoreError>, took: Duration) {
        self.store_duration.observe(took.as_secs_f64());
        match result {
            Ok(d) => {
                let result = if d.allowed { "allowed" } else { "denied" };
                self.store_decisions
                    .get_or_create(&ResultLabels { result })
                    .inc();
            }
            Err(e) => {
                let kind = if e.is_timeout() {
                    "timeout"
                } else if e.is_unavailable() {
                    "unavailable"
                } else {
                    "error"
                };
                self.store_errors.get_or_create(&KindLabels { kind }).inc();
            }
        }
    }

    /// Counts a request the failure mode decided.
    pub fn store_fallback(&self, mode: FailureMode) {
        self.store_fallbacks
            .get_or_create(&FailureModeLabels {
                failure_mode: mode.as_str(),
            })
            .inc();
    }

    /// Sets whether the shared store is reachable.
    pub fn store_up(&self, up: bool) {
        self.store_up.set(i64::from(up));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_instance_counts_its_own_requests_through_the_cache() {
        let (a, b) = (Metrics::default(), Metrics::default());
        let route = Arc::new("r".to_owned());
        let upstream = Arc::new("u".to_owned());
        let labels = |status| Answered {
            route: &route,
            upstream: &upstream,
            method: "GET",
            status,
        };
        a.answered(labels(200), 0.01, 1);
        a.answered(labels(200), 0.01, 3);
        a.answered(labels(503), 0.01, 0);
        b.answered(labels(200), 0.01, 1);
        let a = a.encode();
        let b = b.encode();
        let series = |status, n| {
            format!(
                "tidegate_requests_total{{route=\"r\",upstream=\"u\",method=\"GET\",status=\"{status}\"}} {n}\n"
            )
        };
        assert!(a.contains(&series(200, 2)), "{a}");
        assert!(a.contains(&series(503, 1)), "{a}");
        assert!(a.contains("tidegate_upstream_attempts_total{upstream=\"u\"} 4\n"));
        assert!(a.contains("tidegate_retries_total{upstream=\"u\"} 2\n"));
        assert!(
            a.contains("tidegate_request_duration_seconds_count{route=\"r\",upstream=\"u\"} 3\n")
        );
        assert!(b.contains(&series(200, 1)), "{b}");
        assert!(b.contains("tidegate_upstream_attempts_total{upstream=\"u\"} 1\n"));
        assert!(!b.contains("tidegate_retries_total{"), "{b}");
    }
}
