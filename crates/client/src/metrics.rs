//! Client metrics, with the names the reference services already chart:
//! `inter_service_requests_total{source_service,target_service,method,status}`,
//! `inter_service_request_duration_seconds{source_service,target_service,method}`,
//! `active_service_connections{source_service,target_service}`.
//!
//! `status` is `success` for an answer below 400, else the
//! [`ErrorKind`](crate::ErrorKind) (`server`, `timeout`, `circuit_open`, …).
//! The duration runs to the end of a read-whole body, or to the head of a
//! streamed one.

use std::sync::{Arc, Mutex, OnceLock};

use http::Method;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The method labels: the standard methods by name, and `OTHER` last.
const METHOD_LABELS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "OTHER",
];

/// The index of `method`'s label in [`METHOD_LABELS`].
fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        Method::TRACE => 7,
        Method::CONNECT => 8,
        _ => 9,
    }
}

/// The method as a label: the standard ones by name, anything else as
/// `OTHER`, so that no one can make up new series.
pub fn method_label(method: &Method) -> &'static str {
    METHOD_LABELS[method_index(method)]
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    source_service: Arc<String>,
    target_service: Arc<String>,
    method: &'static str,
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DurationLabels {
    source_service: Arc<String>,
    target_service: Arc<String>,
    method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PairLabels {
    source_service: Arc<String>,
    target_service: Arc<String>,
}

/// The client metrics; clones share them.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Family<RequestLabels, Counter>,
    duration: Family<DurationLabels, Histogram>,
    active: Family<PairLabels, Gauge>,
}

fn duration_histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        let requests = Family::default();
        let duration = Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        let active = Family::default();
        let mut registry = Registry::default();
        register(&mut registry, &requests, &duration, &active);
        Metrics {
            registry: Arc::new(registry),
            requests,
            duration,
            active,
        }
    }
}

fn register(
    registry: &mut Registry,
    requests: &Family<RequestLabels, Counter>,
    duration: &Family<DurationLabels, Histogram>,
    active: &Family<PairLabels, Gauge>,
) {
    registry.register(
        "inter_service_requests",
        "Calls to other services, by outcome",
        requests.clone(),
    );
    registry.register(
        "inter_service_request_duration_seconds",
        "Duration of calls to other services, retries included",
        duration.clone(),
    );
    registry.register(
        "active_service_connections",
        "Calls to other services in flight",
        active.clone(),
    );
}

impl Metrics {
    /// Adds these metrics to `registry` (an application's own), sharing their values.
    pub fn register(&self, registry: &mut Registry) {
        register(registry, &self.requests, &self.duration, &self.active);
    }

    /// The Prometheus text exposition of these metrics.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    pub(crate) fn active(&self, source: &Arc<String>, target: &Arc<String>) -> Gauge {
        self.active
            .get_or_create(&PairLabels {
                source_service: source.clone(),
                target_service: target.clone(),
            })
            .clone()
    }

    /// Counts one call: its outcome and its time. `series` keeps the
    /// calling client's series once found.
    pub(crate) fn request(
        &self,
        series: &CallSeries,
        source: &Arc<String>,
        target: &Arc<String>,
        method: &Method,
        status: &'static str,
        seconds: f64,
    ) {
        let index = method_index(method);
        let find = || self.series(source, target, METHOD_LABELS[index], status);
        if status == SUCCESS {
            series.successes[index].get_or_init(find).count(seconds);
            return;
        }
        let mut kept = series.others.lock().unwrap_or_else(|e| e.into_inner());
        let at = match kept
            .iter()
            .position(|k| k.method == index && k.status == status)
        {
            Some(at) => at,
            None => {
                kept.push(Other {
                    method: index,
                    status,
                    series: find(),
                });
                kept.len() - 1
            }
        };
        kept[at].series.count(seconds);
    }

    fn series(
        &self,
        source: &Arc<String>,
        target: &Arc<String>,
        method: &'static str,
        status: &'static str,
    ) -> Series {
        Series {
            requests: self
                .requests
                .get_or_create(&RequestLabels {
                    source_service: source.clone(),
                    target_service: target.clone(),
                    method,
                    status,
                })
                .clone(),
            duration: self
                .duration
                .get_or_create(&DurationLabels {
                    source_service: source.clone(),
                    target_service: target.clone(),
                    method,
                })
                .clone(),
        }
    }
}

/// The `status` label of a call that succeeded.
pub(crate) const SUCCESS: &str = "success";

/// One client's series, found in the families once and kept: a family
/// lookup hashes every label with SipHash under a lock, which cost more
/// than the rest of the counting. Successes, by method, are found without
/// a lock; the other outcomes (at most the ten methods times the error
/// kinds) in a short locked list.
#[derive(Debug, Default)]
pub(crate) struct CallSeries {
    successes: [OnceLock<Series>; METHOD_LABELS.len()],
    others: Mutex<Vec<Other>>,
}

#[derive(Debug)]
struct Other {
    method: usize,
    status: &'static str,
    series: Series,
}

/// The two series a call counts in.
#[derive(Debug)]
struct Series {
    requests: Counter,
    duration: Histogram,
}

impl Series {
    fn count(&self, seconds: f64) {
        self.requests.inc();
        self.duration.observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_methods_share_one_label() {
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "OTHER");
    }
}
