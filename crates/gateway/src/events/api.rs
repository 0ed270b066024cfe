//! The events API, on its own listener (`events.listen`, loopback by
//! default). JSON in and out; errors are `{"error": "…"}` with 400 (bad
//! input, nothing stored), 401 / 403 (API keys, with
//! `events.require_api_key`), 404, 409 (an expected version not met:
//! `expected` and `actual` too), 413 (over `events.max_body_bytes`), 503
//! (the store failed).
//!
//! | endpoint | what |
//! |---|---|
//! | `POST /v1/topics/{topic}/events` | publish: one CloudEvent (structured `application/cloudevents+json`, or binary `ce-*` headers and the data as body), or a batch (`application/cloudevents-batch+json`, one key, atomic); key and expected version by `tidegate-key` / `tidegate-expected-version` or the `partitionkey` / `expectedversion` extensions; 201 `{"id","topic","position","key","version","duplicate"}` (a batch: `{"events":[…]}`) |
//! | `GET /v1/topics/{topic}/events?from_position=&limit=` | the topic's events in order: `{"topic","events":[…],"next_position"}` |
//! | `GET /v1/topics/{topic}/streams/{key}?from_version=&limit=` | one key's stream: `{"topic","key","events":[…],"next_version"}` |
//! | `GET /v1/topics`, `GET /v1/topics/{topic}` | positions, event counts, retention, subscriptions and their lag |
//! | `POST /v1/subscriptions/{name}/fetch` | pull `{"max":10,"wait":"5s"}` → `{"messages":[{"ack_id","delivery","event"}]}` |
//! | `POST /v1/subscriptions/{name}/ack` · `/nack` · `/extend` · `/dead-letter` | `{"ack_ids":[…]}` (`nack`: `"delay"`; `dead-letter`: `"reason"`) → `{"settled":N,"expired":[…]}` |

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tidegate_client::config::check_name;
use tidegate_events::{Append, AppendError, Consumer, Event, Stored};

use super::cloudevents::{self, CORRELATION_ATTRIBUTE, TRACEPARENT_ATTRIBUTE};
use super::Events;
use crate::http::headers::{self, CORRELATION_ID, TRACEPARENT};
use crate::proxy::admission::Credential;
use crate::proxy::Gateway;

/// Most events one read or fetch answers.
const MAX_LIMIT: u64 = 1000;
/// Longest a fetch may wait for events.
const MAX_WAIT: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct Api {
    gateway: Arc<Gateway>,
    events: Arc<Events>,
}

/// The events API's routes.
pub fn router(gateway: Arc<Gateway>, events: Arc<Events>) -> Router {
    Router::new()
        .route("/v1/topics", get(topics))
        .route("/v1/topics/{topic}", get(topic))
        .route("/v1/topics/{topic}/events", post(publish).get(read))
        .route("/v1/topics/{topic}/streams/{key}", get(stream))
        .route("/v1/subscriptions/{name}/fetch", post(fetch))
        .route("/v1/subscriptions/{name}/ack", post(ack))
        .route("/v1/subscriptions/{name}/nack", post(nack))
        .route("/v1/subscriptions/{name}/extend", post(extend))
        .route("/v1/subscriptions/{name}/dead-letter", post(dead_letter))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(Api { gateway, events })
}

fn json_response(status: StatusCode, value: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        value.to_string(),
    )
        .into_response()
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    json_response(status, json!({ "error": message.to_string() }))
}

fn store_failed(e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "event store failed");
    error(StatusCode::SERVICE_UNAVAILABLE, e)
}

impl Api {
    /// With `events.require_api_key`, the caller's key must be valid (401)
    /// and one of its `topics` patterns must match `topic` (403).
    fn authorize(&self, headers: &HeaderMap, topic: &str) -> Result<(), Response> {
        if !self.events.settings().require_api_key {
            return Ok(());
        }
        let table = self.gateway.table();
        match table.edge.authenticate(headers) {
            Credential::Valid(key, _) if key.topics.iter().any(|g| g.matches(topic)) => Ok(()),
            Credential::Valid(..) => Err(error(
                StatusCode::FORBIDDEN,
                format!("this API key may not use topic `{topic}`"),
            )),
            Credential::Unknown | Credential::Anonymous => {
                let mut response = error(
                    StatusCode::UNAUTHORIZED,
                    "an API key is required (X-API-Key or Authorization: Bearer)",
                );
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tidegate\""),
                );
                Err(response)
            }
        }
    }

    /// The pull subscription `name` and its topic, after the caller's
    /// key is checked for that topic.
    fn pull_subscription(&self, name: &str, headers: &HeaderMap) -> Result<String, Response> {
        let Some(subscription) = self.events.subscription(name) else {
            return Err(error(
                StatusCode::NOT_FOUND,
                format!("there is no subscription named `{name}`"),
            ));
        };
        self.authorize(headers, &subscription.config.topic)?;
        if let Some(push) = &subscription.push {
            return Err(error(
                StatusCode::CONFLICT,
                format!(
                    "subscription `{name}` is pushed to upstream `{}`; it cannot be pulled",
                    push.upstream
                ),
            ));
        }
        Ok(subscription.config.topic)
    }

    /// The request's body, at most `events.max_body_bytes` (else 413).
    async fn body(&self, body: Body) -> Result<Bytes, Response> {
        let limit = self.events.settings().max_body_bytes;
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        match http_body_util::Limited::new(body, limit).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is over events.max_body_bytes ({limit} bytes)"),
            )),
            Err(e) => Err(error(
                StatusCode::BAD_REQUEST,
                format!("the body could not be read: {e}"),
            )),
        }
    }
}

fn check_topic(topic: &str) -> Result<(), Response> {
    check_name(topic)
        .map_err(|why| error(StatusCode::BAD_REQUEST, format!("topic `{topic}`: {why}")))
}

/// `name=value` pairs of a query string (values as written: the ones read
/// here are numbers).
fn query_number(query: Option<&str>, name: &str, default: u64) -> Result<u64, Response> {
    let Some(query) = query else {
        return Ok(default);
    };
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == name {
            return value.parse().map_err(|_| {
                error(
                    StatusCode::BAD_REQUEST,
                    format!("{name} must be a whole number, not `{value}`"),
                )
            });
        }
    }
    Ok(default)
}

fn limit(query: Option<&str>) -> Result<usize, Response> {
    let limit = query_number(query, "limit", 100)?;
    if limit == 0 || limit > MAX_LIMIT {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("limit must be from 1 to {MAX_LIMIT}"),
        ));
    }
    Ok(usize::try_from(limit).unwrap_or(usize::MAX))
}

fn stored_json(topic: &str, key: Option<&str>, stored: &Stored) -> Value {
    json!({
        "id": stored.id,
        "topic": topic,
        "position": stored.position,
        "key": key,
        "version": stored.version,
        "duplicate": stored.duplicate,
    })
}

/// A `traceparent` as W3C Trace Context writes it (version 00).
fn is_traceparent(value: &HeaderValue) -> bool {
    let b = value.as_bytes();
    let hex = |range: std::ops::Range<usize>| {
        b[range]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    b.len() == 55
        && b[2] == b'-'
        && b[35] == b'-'
        && b[52] == b'-'
        && hex(0..2)
        && hex(3..35)
        && hex(36..52)
        && hex(53..55)
}

async fn publish(
    State(api): State<Api>,
    Path(topic): Path<String>,
    request: Request,
) -> Response {
    if let Err(response) = check_topic(&topic) {
        return response;
    }
    let (parts, body) = request.into_parts();
    if let Err(response) = api.authorize(&parts.headers, &topic) {
        return response;
    }
    let body = match api.body(body).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let mut publish = match cloudevents::parse(&parts.headers, &body) {
        Ok(publish) => publish,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    // The publisher's correlation and trace travel inside its events.
    let correlation = headers::correlation_id(&parts.headers);
    let traceparent = parts
        .headers
        .get(&TRACEPARENT)
        .filter(|v| is_traceparent(v))
        .and_then(|v| v.to_str().ok());
    for event in &mut publish.events {
        if let Ok(id) = correlation.to_str() {
            event
                .extensions
                .entry(CORRELATION_ATTRIBUTE.to_owned())
                .or_insert_with(|| id.to_owned());
        }
        if let Some(parent) = traceparent {
            event
                .extensions
                .entry(TRACEPARENT_ATTRIBUTE.to_owned())
                .or_insert_with(|| parent.to_owned());
        }
    }
    let key = publish.key.clone();
    let append = Append {
        topic: topic.clone(),
        key: publish.key,
        expected: publish.expected,
        events: publish.events,
    };
    let mut response = match api.events.store().append(append).await {
        Ok(appended) => {
            let mut answers = appended
                .events
                .iter()
                .map(|stored| stored_json(&topic, key.as_deref(), stored));
            let body = if publish.batch {
                json!({ "events": answers.collect::<Vec<_>>() })
            } else {
                answers.next().unwrap_or(Value::Null)
            };
            json_response(StatusCode::CREATED, body)
        }
        Err(AppendError::Conflict { expected, actual }) => json_response(
            StatusCode::CONFLICT,
            json!({
                "error": AppendError::Conflict { expected, actual }.to_string(),
                "expected": expected.to_string(),
                "actual": actual,
            }),
        ),
        Err(AppendError::Invalid(why)) => error(StatusCode::BAD_REQUEST, why),
        Err(AppendError::Store(e)) => store_failed(e),
        Err(e) => store_failed(e),
    };
    response.headers_mut().insert(&CORRELATION_ID, correlation);
    response
}

fn events_json(events: &[Event]) -> Vec<Value> {
    events.iter().map(cloudevents::to_json).collect()
}

async fn read(
    State(api): State<Api>,
    Path(topic): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = check_topic(&topic).and_then(|()| api.authorize(&headers, &topic)) {
        return response;
    }
    let (from, limit) = match query_number(query.as_deref(), "from_position", 1)
        .and_then(|from| Ok((from, limit(query.as_deref())?)))
    {
        Ok(read) => read,
        Err(response) => return response,
    };
    match api.events.store().read(&topic, from.max(1), limit).await {
        Ok(events) => {
            let next = events.last().map_or(from.max(1), |e| e.position + 1);
            json_response(
                StatusCode::OK,
                json!({ "topic": topic, "events": events_json(&events), "next_position": next }),
            )
        }
        Err(e) => store_failed(e),
    }
}

async fn stream(
    State(api): State<Api>,
    Path((topic, key)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = check_topic(&topic).and_then(|()| api.authorize(&headers, &topic)) {
        return response;
    }
    let (from, limit) = match query_number(query.as_deref(), "from_version", 1)
        .and_then(|from| Ok((from, limit(query.as_deref())?)))
    {
        Ok(read) => read,
        Err(response) => return response,
    };
    match api
        .events
        .store()
        .read_stream(&topic, &key, from.max(1), limit)
        .await
    {
        Ok(events) => {
            let next = events
                .last()
                .and_then(|e| e.version)
                .map_or(from.max(1), |v| v + 1);
            json_response(
                StatusCode::OK,
                json!({ "topic": topic, "key": key, "events": events_json(&events), "next_version": next }),
            )
        }
        Err(e) => store_failed(e),
    }
}

/// The JSON of every topic the store has or the config names, with its
/// retention and subscriptions; `only`: just that one.
async fn topics_json(api: &Api, only: Option<&str>) -> Result<Vec<Value>, Response> {
    let settings = api.events.settings();
    let stored = api.events.store().topics().await.map_err(store_failed)?;
    let mut names: Vec<&str> = stored.iter().map(|t| t.name.as_str()).collect();
    names.extend(settings.topics.iter().map(|t| t.name.as_str()));
    names.extend(settings.subscriptions.iter().map(|s| s.config.topic.as_str()));
    names.sort_unstable();
    names.dedup();
    let mut out = Vec::new();
    for name in names.into_iter().filter(|n| only.is_none_or(|o| o == *n)) {
        let info = stored.iter().find(|t| t.name == name);
        let retention = settings.topics.iter().find(|t| t.name == name).map(|t| {
            json!({
                "max_age_seconds": t.max_age.map(|a| a.as_secs_f64()),
                "max_events": t.max_events,
            })
        });
        let mut subscriptions = Vec::new();
        for s in settings.subscriptions.iter().filter(|s| s.config.topic == name) {
            let lag = api
                .events
                .store()
                .lag(&s.config.name)
                .await
                .map_err(store_failed)?;
            subscriptions.push(json!({
                "name": s.config.name,
                "lag": lag,
                "push": s.push.as_ref().map(|p| p.upstream.clone()),
            }));
        }
        out.push(json!({
            "name": name,
            "first_position": info.and_then(|t| t.first_position),
            "last_position": info.map_or(0, |t| t.last_position),
            "events": info.map_or(0, |t| t.events()),
            "retention": retention,
            "subscriptions": subscriptions,
        }));
    }
    Ok(out)
}

async fn topics(State(api): State<Api>, headers: HeaderMap) -> Response {
    let settings = api.events.settings();
    let mut listed = match topics_json(&api, None).await {
        Ok(listed) => listed,
        Err(response) => return response,
    };
    if settings.require_api_key {
        // Only the topics the caller's key may use.
        listed.retain(|t| {
            t["name"]
                .as_str()
                .is_some_and(|name| api.authorize(&headers, name).is_ok())
        });
        if listed.is_empty() {
            if let Err(response) = api.authorize(&headers, "") {
                if response.status() == StatusCode::UNAUTHORIZED {
                    return response;
                }
            }
        }
    }
    json_response(StatusCode::OK, json!({ "topics": listed }))
}

async fn topic(
    State(api): State<Api>,
    Path(topic): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = check_topic(&topic).and_then(|()| api.authorize(&headers, &topic)) {
        return response;
    }
    match topics_json(&api, Some(&topic)).await {
        Ok(mut found) if !found.is_empty() => json_response(StatusCode::OK, found.remove(0)),
        Ok(_) => error(
            StatusCode::NOT_FOUND,
            format!("topic `{topic}` has no event and no settings"),
        ),
        Err(response) => response,
    }
}

/// A JSON object body (an empty body is `{}`).
fn object(body: &Bytes) -> Result<serde_json::Map<String, Value>, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(error(StatusCode::BAD_REQUEST, "the body must be a JSON object")),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {e}"),
        )),
    }
}

/// A duration field (`"5s"`, `"250ms"`), if present.
fn duration_field(
    body: &serde_json::Map<String, Value>,
    name: &str,
) -> Result<Option<Duration>, Response> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => tidegate_resilience::config::parse_duration(text)
            .map(Some)
            .map_err(|why| error(StatusCode::BAD_REQUEST, format!("{name}: {why}"))),
        Some(_) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("{name} must be a duration like \"5s\""),
        )),
    }
}

async fn fetch(State(api): State<Api>, Path(name): Path<String>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    if let Err(response) = api.pull_subscription(&name, &parts.headers) {
        return response;
    }
    let body = match api.body(body).await.and_then(|b| object(&b)) {
        Ok(body) => body,
        Err(response) => return response,
    };
    let max = match body.get("max") {
        None => 10,
        Some(value) => match value.as_u64() {
            Some(max) if (1..=MAX_LIMIT).contains(&max) => max,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("max must be from 1 to {MAX_LIMIT}"),
                )
            }
        },
    };
    let wait = match duration_field(&body, "wait") {
        Ok(wait) => wait.unwrap_or(Duration::ZERO),
        Err(response) => return response,
    };
    if wait > MAX_WAIT {
        return error(StatusCode::BAD_REQUEST, "wait must be at most 60s");
    }
    let consumer = Consumer::new(api.events.store().clone(), name)
        .batch(usize::try_from(max).unwrap_or(usize::MAX));
    match consumer.next_within(wait).await {
        Ok(deliveries) => {
            let messages: Vec<Value> = deliveries
                .iter()
                .map(|d| {
                    json!({
                        "ack_id": d.ack_id,
                        "delivery": d.delivery,
                        "event": cloudevents::to_json(&d.event),
                    })
                })
                .collect();
            json_response(StatusCode::OK, json!({ "messages": messages }))
        }
        Err(e) => store_failed(e),
    }
}

/// How a settle endpoint settles each ack id.
enum Settle {
    Ack,
    Nack(Option<Duration>),
    Extend,
    DeadLetter(String),
}

async fn settle(api: Api, name: String, request: Request, how: fn(&serde_json::Map<String, Value>) -> Result<Settle, Response>) -> Response {
    let (parts, body) = request.into_parts();
    if let Err(response) = api.pull_subscription(&name, &parts.headers) {
        return response;
    }
    let body = match api.body(body).await.and_then(|b| object(&b)) {
        Ok(body) => body,
        Err(response) => return response,
    };
    let ack_ids: Vec<String> = match body.get("ack_ids") {
        Some(Value::Array(ids)) if !ids.is_empty() && ids.len() <= MAX_LIMIT as usize => {
            match ids.iter().map(|id| id.as_str().map(str::to_owned)).collect() {
                Some(ids) => ids,
                None => return error(StatusCode::BAD_REQUEST, "ack_ids must be strings"),
            }
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("ack_ids must be a list of 1 to {MAX_LIMIT} ack ids"),
            )
        }
    };
    let how = match how(&body) {
        Ok(how) => how,
        Err(response) => return response,
    };
    let store = api.events.store();
    let done: Result<Vec<bool>, _> = match &how {
        Settle::Ack => store.ack(&name, &ack_ids).await,
        _ => {
            let mut done = Vec::with_capacity(ack_ids.len());
            for id in &ack_ids {
                let settled = match &how {
                    Settle::Nack(delay) => store.nack(&name, id, *delay).await,
                    Settle::Extend => store.extend(&name, id).await,
                    Settle::DeadLetter(reason) => store.dead_letter(&name, id, reason).await,
                    Settle::Ack => unreachable!("acked above"),
                };
                match settled {
                    Ok(settled) => done.push(settled),
                    Err(e) => return store_failed(e),
                }
            }
            Ok(done)
        }
    };
    match done {
        Ok(done) => {
            let expired: Vec<&String> = ack_ids
                .iter()
                .zip(&done)
                .filter(|(_, ok)| !**ok)
                .map(|(id, _)| id)
                .collect();
            json_response(
                StatusCode::OK,
                json!({ "settled": done.iter().filter(|ok| **ok).count(), "expired": expired }),
            )
        }
        Err(e) => store_failed(e),
    }
}

async fn ack(State(api): State<Api>, Path(name): Path<String>, request: Request) -> Response {
    settle(api, name, request, |_| Ok(Settle::Ack)).await
}

async fn nack(State(api): State<Api>, Path(name): Path<String>, request: Request) -> Response {
    settle(api, name, request, |body| {
        Ok(Settle::Nack(duration_field(body, "delay")?))
    })
    .await
}

async fn extend(State(api): State<Api>, Path(name): Path<String>, request: Request) -> Response {
    settle(api, name, request, |_| Ok(Settle::Extend)).await
}

async fn dead_letter(
    State(api): State<Api>,
    Path(name): Path<String>,
    request: Request,
) -> Response {
    settle(api, name, request, |body| {
        let reason = match body.get("reason") {
            None | Some(Value::Null) => "dead-lettered by a worker".to_owned(),
            Some(Value::String(reason)) if !reason.is_empty() && reason.len() <= 1024 => {
                reason.clone()
            }
            Some(_) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "reason must be a string of 1 to 1024 bytes",
                ))
            }
        };
        Ok(Settle::DeadLetter(reason))
    })
    .await
}
