//! The admin API, on its own listener (loopback by default):
//!
//! | endpoint | what |
//! |---|---|
//! | `GET /health` | liveness: `{"status":"healthy","service":"tidegate","version",…}` |
//! | `GET /ready` | 200 when every upstream has a healthy endpoint and rate limits can be enforced (the shared store is up, or `failure_mode` is open), else 503; a check per upstream and for the store |
//! | `GET /status/services` | breaker state, failure numbers, endpoints and in-flight count per upstream |
//! | `GET /metrics` | Prometheus / OpenMetrics text |
//! | `GET /events` | server-sent events: breaker and endpoint state changes as JSON; with `?stats=true` also the status of every upstream once a second |
//! | `GET /status/history` | the last five minutes of traffic per upstream, one sample a second |
//! | `GET /status/timeline` | breaker transitions and incidents with their time to recovery |
//! | `GET /config` | the config in effect, defaults filled in, secrets redacted |
//! | `POST /upstreams/{name}/circuit` | `{"action": "force_open" \| "force_closed" \| "reset"}`; needs `Authorization: Bearer` with the admin token |
//! | `GET /openapi.json` | the OpenAPI 3 description of all of these |
//! | `GET /` | the live dashboard |

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream::{self, Stream};
use serde_json::{json, Map, Value};
use tokio::sync::broadcast::{self, error::RecvError};

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
        .route("/status/history", get(history))
        .route("/status/timeline", get(timeline))
        .route("/config", get(config))
        .route("/upstreams/{name}/circuit", post(circuit))
        .route("/status/events", get(crate::events::admin::status))
        .route(
            "/v1/subscriptions/{name}/seek",
            post(crate::events::admin::seek),
        )
        .route(
            "/v1/topics/{topic}/redrive",
            post(crate::events::admin::redrive),
        )
        .route("/status/sagas", get(crate::events::admin::sagas_status))
        .route(
            "/v1/sagas/{name}/{id}/retry",
            post(crate::events::admin::retry_saga),
        )
        .route("/openapi.json", get(openapi))
        .route("/", get(dashboard))
        .with_state(gateway)
}

/// The OpenAPI 3 document of the admin API.
pub const OPENAPI: &str = include_str!("admin/openapi.json");
const DASHBOARD: &str = include_str!("admin/dashboard.html");

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        OPENAPI,
    )
        .into_response()
}

async fn dashboard() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            // Everything is inline; the page talks only to this listener.
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                ),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        DASHBOARD,
    )
        .into_response()
}

async fn history(State(gateway): State<Arc<Gateway>>) -> Response {
    let upstreams: Map<String, Value> = gateway
        .stats
        .history()
        .into_iter()
        .map(|(name, samples)| (name, json!(samples)))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({ "interval_seconds": 1, "upstreams": upstreams, "timestamp": now_rfc3339() }),
    )
}

async fn timeline(State(gateway): State<Arc<Gateway>>) -> Response {
    let (transitions, incidents) = gateway.stats.timeline();
    let recovery: Map<String, Value> = gateway
        .table()
        .upstreams
        .iter()
        .map(|u| (u.name().to_owned(), json!(gateway.stats.recovery(u.name()))))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "transitions": transitions,
            "incidents": incidents,
            "recovery": recovery,
            "timestamp": now_rfc3339(),
        }),
    )
}

async fn config(State(gateway): State<Arc<Gateway>>) -> Response {
    json_response(StatusCode::OK, &gateway.table().effective)
}

/// The refusal of a write endpoint's request unless `headers` carry the
/// admin token: 403 when writes are off (no token configured), 401
/// without the token.
pub(crate) fn refused_write(gateway: &Gateway, headers: &HeaderMap) -> Option<Response> {
    let table = gateway.table();
    if !table.has_admin_token() {
        return Some(error(
            StatusCode::FORBIDDEN,
            "admin writes are off: set gateway.admin_token_env to the variable holding the admin token",
        ));
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    if !presented.is_some_and(|token| table.is_admin_token(token)) {
        let mut response = error(StatusCode::UNAUTHORIZED, "a valid admin token is required");
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"tidegate-admin\""),
        );
        return Some(response);
    }
    None
}

pub(crate) fn error(status: StatusCode, message: &str) -> Response {
    json_response(
        status,
        &json!({ "error": message, "timestamp": now_rfc3339() }),
    )
}

async fn circuit(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = refused_write(&gateway, &headers) {
        return refused;
    }
    let table = gateway.table();
    let Some(upstream) = table.upstream(&name) else {
        return error(StatusCode::NOT_FOUND, "no upstream by that name");
    };
    let Some(breaker) = upstream.pipeline.circuit_breaker() else {
        return error(StatusCode::CONFLICT, "this upstream has no circuit breaker");
    };
    let action = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("action").and_then(Value::as_str).map(str::to_owned));
    match action.as_deref() {
        Some("force_open") => breaker.force_open(),
        Some("force_closed") => breaker.disable(),
        Some("reset") => breaker.reset(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                r#"expected {"action": "force_open" | "force_closed" | "reset"}"#,
            )
        }
    }
    let action = action.unwrap_or_default();
    tracing::warn!(upstream = %name, %action, "circuit breaker changed through the admin API");
    json_response(
        StatusCode::OK,
        &json!({
            "upstream": name,
            "action": action,
            "state": breaker.state().as_str(),
            "timestamp": now_rfc3339(),
        }),
    )
}

pub(crate) fn json_response(status: StatusCode, value: &Value) -> Response {
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
    if let Some(events) = gateway.events() {
        let check = match events.probe().await {
            Ok(()) => json!({ "status": "ok", "store": events.kind() }),
            Err(e) => {
                ready = false;
                json!({ "status": e.to_string(), "store": events.kind() })
            }
        };
        checks.insert("event_store".to_owned(), check);
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
                    "in_flight": e.in_flight.get(),
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
                "in_flight": u.in_flight.get(),
                "pool": { "connections": u.gate.open(), "pending": u.gate.pending() },
                "rejections": u.rejections.load(Ordering::Relaxed),
                "bulkhead": u.pipeline.bulkhead().map(|b| json!({
                    "in_flight": b.in_flight(),
                    "queued": b.queued(),
                    "max_concurrent": b.config().max_concurrent,
                    "max_queued": b.config().max_queued,
                })),
                "traffic": gateway.stats.window(u.name()),
                "recovery": gateway.stats.recovery(u.name()),
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
    uri: Uri,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let wants_stats = uri.query().is_some_and(|q| {
        q.split('&')
            .any(|pair| pair == "stats=true" || pair == "stats=1")
    });
    let changes = gateway.notices.subscribe();
    let ticks = wants_stats.then(|| gateway.notices.subscribe_ticks());
    let stream = stream::unfold((changes, ticks), |(mut changes, mut ticks)| async move {
        loop {
            let data = tokio::select! {
                change = changes.recv() => match change {
                    Ok(event) => serde_json::to_string(&event).unwrap_or_default(),
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return None,
                },
                tick = next_tick(&mut ticks) => match tick {
                    Ok(json) => json.to_string(),
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return None,
                },
            };
            return Some((Ok(SseEvent::default().data(data)), (changes, ticks)));
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// The next status tick, or never when the client did not ask for them.
async fn next_tick(
    ticks: &mut Option<broadcast::Receiver<Arc<str>>>,
) -> Result<Arc<str>, RecvError> {
    match ticks {
        Some(ticks) => ticks.recv().await,
        None => std::future::pending().await,
    }
}
