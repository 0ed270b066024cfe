//! The status snapshot of a client, in the shape the reference services'
//! `/status/services` endpoints already serve.

use serde::Serialize;
use tidegate_resilience::breaker::{CircuitState, Snapshot};

use crate::clock::instant_rfc3339;
use crate::config::BaseUrl;

/// One service's status, as JSON:
/// `{"service","state","failure_count","failure_rate","last_failure","last_state_change","endpoints","in_flight"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ServiceStatus {
    /// The display name.
    pub service: String,
    /// `closed`, `open`, `half_open`, `forced_open` or `disabled`.
    pub state: &'static str,
    /// Failures in the breaker's window.
    pub failure_count: u32,
    /// Failures / calls in the window.
    pub failure_rate: f64,
    /// When the last failure was recorded (RFC 3339), if ever.
    pub last_failure: Option<String>,
    /// When the breaker last changed state (RFC 3339).
    pub last_state_change: Option<String>,
    /// While open: seconds until a probe is admitted.
    pub retry_after_seconds: Option<f64>,
    /// The base URL.
    pub endpoints: Vec<String>,
    /// Calls in flight.
    pub in_flight: u64,
}

impl ServiceStatus {
    pub(crate) fn of(
        service: &str,
        base: &BaseUrl,
        breaker: Option<Snapshot>,
        in_flight: u64,
    ) -> Self {
        ServiceStatus {
            service: service.to_owned(),
            state: breaker.map_or(CircuitState::Disabled, |b| b.state).as_str(),
            failure_count: breaker.map_or(0, |b| b.failure_count),
            failure_rate: breaker.map_or(0.0, |b| b.failure_rate),
            last_failure: breaker.and_then(|b| b.last_failure).map(instant_rfc3339),
            last_state_change: breaker.map(|b| instant_rfc3339(b.last_state_change)),
            retry_after_seconds: breaker.and_then(|b| b.retry_after).map(|d| d.as_secs_f64()),
            endpoints: vec![base.to_string()],
            in_flight,
        }
    }
}
