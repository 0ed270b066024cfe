//! The admin API, on its own listener (loopback by default):
//!
//! | endpoint | what |
//! |---|---|
//! | `GET /health` | liveness: `{"status":"healthy","service":"tidegate","version",…}` |
//! | `GET /ready` | 200 when every upstream has a healthy endpoint and rate limits can be enforced (the shared store is up, or `failure_mode` is open), else 503; a check per upstream and for the store |
//! | `GET /status/services` | breaker state, failure numbers, endpoints and in-flight count per upstream |
//! | `GET /metrics` | Prometheus / OpenMetrics text |
//! | `GET /events` | server-sent events: breaker and endpoint state changes as JSON |

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::stream::{self, Stream};
use serde_json::{json, Map, Value};
use tokio::sync::broadcast::error::RecvError;

use crate::proxy::Gateway;
use tidegate_client::clock::{instant_rfc3339, now_rfc3339};

/// The admin routes.
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/status/services", get(status))
        .route("/metrics", get(metrics))
        .route("/events", get(events))
        .with_state(gateway)
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        value.to_string(),
    )
        .into_response()
}

async fn health() -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "status": "healthy",
            "service": "tidegate",
            "version": env!("CARGO_PKG_VERSION"),
            "timestamp": now_rfc3339(),
        }),
    )
}

async fn ready(State(gateway): State<Arc<Gateway>>) -> Response {
    let mut checks = Map::new();
    let mut ready = true;
    for u in &gateway.table().upstreams {
        let healthy = u.endpoints.iter().filter(|e| e.is_healthy()).count();
        ready &= healthy > 0;
        checks.insert(
            u.name().to_owned(),
            json!({
                "status": if healthy > 0 { "ok" } else { "no healthy endpoint" },
                "healthy_endpoints": healthy,
                "endpoints": u.endpoints.len(),
            }),
        );
    }
    if let Some((up, enforced)) = gateway.table().edge.store_check() {
        ready &= enforced;
        let status = match (up, enforced) {
            (true, _) => "ok",
            (false, true) => "unreachable: counting locally (failure_mode = open)",
            (false, false) => "unreachable: refusing limited requests (failure_mode = closed)",
        };
        checks.insert(
            "rate_limit_store".to_owned(),
            json!({ "status": status, "up": up }),
        );
    }
    let (status, word) = if ready {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    };
    json_response(status, &json!({ "status": word, "checks": checks }))
}

/// The JSON of `GET /status/services`.
pub fn services_json(gateway: &Gateway) -> Value {
    let mut services = Map::new();
    for u in &gateway.table().upstreams {
        let breaker = u.pipeline.circuit_breaker().map(|b| b.snapshot());
        let endpoints: Vec<Value> = u
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                json!({
                    "url": e.label,
                    "healthy": e.is_healthy(),
                    "ejected": u.is_ejected(i),
                    "in_flight": e.in_flight.load(Ordering::Relaxed),
                })
            })
            .collect();
        services.insert(
            u.name().to_owned(),
            json!({
                "service": u.name(),
                "state": breaker.map_or("disabled", |b| b.state.as_str()),
                "failure_count": breaker.map_or(0, |b| b.failure_count),
                "consecutive_failures": breaker.map_or(0, |b| b.consecutive_failures),
                "failure_rate": breaker.map_or(0.0, |b| b.failure_rate),
                "slow_call_rate": breaker.map_or(0.0, |b| b.slow_call_rate),
                "last_failure": breaker.and_then(|b| b.last_failure).map(instant_rfc3339),
                "last_state_change": breaker.map(|b| instant_rfc3339(b.last_state_change)),
                "retry_after_seconds": breaker.and_then(|b| b.retry_after).map(|d| d.as_secs_f64()),
                "endpoints": endpoints,
                "in_flight": u.in_flight.load(Ordering::Relaxed),
                "pool": { "connections": u.gate.open(), "pending": u.gate.pending() },
                "rejections": u.rejections.load(Ordering::Relaxed),
            }),
        );
    }
    json!({ "services": services, "timestamp": now_rfc3339() })
}

async fn status(State(gateway): State<Arc<Gateway>>) -> Response {
    json_response(StatusCode::OK, &services_json(&gateway))
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    if let Some((up, _)) = gateway.table().edge.store_check() {
        gateway.metrics.store_up(up);
    }
    for u in &gateway.table().upstreams {
        if let Some(breaker) = u.pipeline.circuit_breaker() {
            gateway
                .metrics
                .circuit_state(u.name(), breaker.state().as_str());
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        gateway.metrics.encode(),
    )
        .into_response()
}

async fn events(
    State(gateway): State<Arc<Gateway>>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let receiver = gateway.events.subscribe();
    let stream = stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(event) => {
                    let data = serde_json::to_string(&event).unwrap_or_default();
                    return Some((Ok(SseEvent::default().data(data)), receiver));
                }
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
