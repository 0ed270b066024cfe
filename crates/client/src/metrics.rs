//! Client metrics, with the names the reference services already chart:
//! `inter_service_requests_total{source_service,target_service,method,status}`,
//! `inter_service_request_duration_seconds{source_service,target_service,method}`,
//! `active_service_connections{source_service,target_service}`.
//!
//! `status` is `success` for an answer below 400, else the
//! [`ErrorKind`](crate::ErrorKind) (`server`, `timeout`, `circuit_open`, …).
//! The duration runs to the end of a read-whole body, or to the head of a
//! streamed one.

use std::sync::{Arc, Mutex};

use http::Method;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The method as a label: the standard ones by name, anything else as
/// `OTHER`, so that no one can make up new series.
pub fn method_label(method: &Method) -> &'static str {
    [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
        Method::TRACE,
        Method::CONNECT,
    ]
    .iter()
    .zip([
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
    ])
    .find_map(|(m, name)| (m == method).then_some(name))
    .unwrap_or("OTHER")
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
        let method = method_label(method);
        let mut kept = series.kept.lock().unwrap_or_else(|e| e.into_inner());
        let index = match kept
            .iter()
            .position(|k| k.method == method && k.status == status)
        {
            Some(index) => index,
            None => {
                kept.push(Kept {
                    method,
                    status,
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
                });
                kept.len() - 1
            }
        };
        let found = &kept[index];
        found.requests.inc();
        found.duration.observe(seconds);
    }
}

/// One client's series by method and outcome, found in the families once
/// and kept: a family lookup hashes every label with SipHash under a lock,
/// which cost more than the rest of the counting. At most the ten method
/// labels times the outcomes.
#[derive(Debug, Default)]
pub(crate) struct CallSeries {
    kept: Mutex<Vec<Kept>>,
}

#[derive(Debug)]
struct Kept {
    method: &'static str,
    status: &'static str,
    requests: Counter,
    duration: Histogram,
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
