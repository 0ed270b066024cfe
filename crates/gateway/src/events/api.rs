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
//! | `GET /v1/topics/{topic}/events?from_position=&limit=` | the topic's events in order: `{"topic","events":[…],"next_position"}`; with `follow=true`, server-sent events, one event each, as they are stored (`from_position` defaults to after the last) |
//! | `GET /v1/topics/{topic}/streams/{key}?from_version=&limit=` | one key's stream: `{"topic","key","events":[…],"next_version"}` |
//! | `GET /v1/topics`, `GET /v1/topics/{topic}` | positions, event counts, retention, subscriptions and their lag |
//! | `POST /v1/subscriptions/{name}/fetch` | pull `{"max":10,"wait":"5s"}` → `{"messages":[{"ack_id","delivery","event"}]}` |
//! | `POST /v1/subscriptions/{name}/ack` · `/nack` · `/extend` · `/dead-letter` | `{"ack_ids":[…]}` (`nack`: `"delay"`; `dead-letter`: `"reason"`) → `{"settled":N,"expired":[…]}` |
//! | `POST /v1/sagas/{name}` | start a saga with the JSON body as its input (`Idempotency-Key`: its id, so a start sent again is the same saga); 202 + `Location` and its state, or with `?wait=10s` 200 once it has ended (or is stuck) |
//! | `GET /v1/sagas/{name}/{id}` | a saga's state: status, each step's status, attempts, response and error |
//! | `GET /openapi.json` | the OpenAPI 3 description of all of these |

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
use crate::observe::watch::until_stopped;
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
    /// Becomes true when the gateway stops: followed topics end.
    stopped: tokio::sync::watch::Receiver<bool>,
}

/// The events API's routes; streams end when `stopped` turns true.
pub fn router(
    gateway: Arc<Gateway>,
    events: Arc<Events>,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> Router {
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
        .route("/v1/sagas/{name}", post(start_saga))
        .route("/v1/sagas/{name}/{id}", get(saga))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint").into_response() })
        .with_state(Api {
            gateway,
            events,
            stopped,
        })
}

/// The OpenAPI 3 document of the events API.
pub const OPENAPI: &str = include_str!("openapi.json");

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

fn json_response(status: StatusCode, value: Value) -> Response {
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

/// An error answer: `{"error": …}` (and more for a conflict).
struct Refusal {
    status: StatusCode,
    body: Value,
    /// 401: with `WWW-Authenticate`.
    challenge: bool,
    /// 503 from the store: with `Retry-After` (seconds).
    retry_after: Option<u32>,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = json_response(self.status, self.body);
        if self.challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tidegate\""),
            );
        }
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Refusal {
    Refusal {
        status,
        body: json!({ "error": message.to_string() }),
        challenge: false,
        retry_after: None,
    }
}

/// 503 with `Retry-After: 1`: the store failed or is unreachable (a NATS
/// server away); nothing waits for it.
fn store_failed(e: impl std::fmt::Display) -> Refusal {
    tracing::warn!(error = %e, "event store failed");
    Refusal {
        retry_after: Some(1),
        ..error(StatusCode::SERVICE_UNAVAILABLE, e)
    }
}

impl Api {
    /// With `events.require_api_key`, the caller's key must be valid (401)
    /// and one of its `topics` patterns must match `topic` (403).
    fn authorize(&self, headers: &HeaderMap, topic: &str) -> Result<(), Refusal> {
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
            Credential::Unknown | Credential::Anonymous => Err(Refusal {
                challenge: true,
                ..error(
                    StatusCode::UNAUTHORIZED,
                    "an API key is required (X-API-Key or Authorization: Bearer)",
                )
            }),
        }
    }

    /// The pull subscription `name` and its topic, after the caller's
    /// key is checked for that topic.
    fn pull_subscription(&self, name: &str, headers: &HeaderMap) -> Result<String, Refusal> {
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
    async fn body(&self, body: Body) -> Result<Bytes, Refusal> {
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

fn check_topic(topic: &str) -> Result<(), Refusal> {
    check_name(topic)
        .map_err(|why| error(StatusCode::BAD_REQUEST, format!("topic `{topic}`: {why}")))
}

/// `name=value` pairs of a query string (values as written: the ones read
/// here are numbers).
fn query_number(query: Option<&str>, name: &str, default: u64) -> Result<u64, Refusal> {
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

/// Whether `name=true` (or a bare `name`) is in the query.
fn query_flag(query: Option<&str>, name: &str) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|pair| pair == name || pair == format!("{name}=true"))
    })
}

/// `topic`'s events from position `from` on as server-sent events, each
/// as it is stored: the store's change counter wakes the stream, no
/// interval is polled. Ends if the store fails.
fn follow(
    store: Arc<dyn tidegate_events::Store>,
    topic: String,
    from: u64,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> axum::response::sse::Sse<
    impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    use futures_util::stream::{self, StreamExt};
    let changes = store.changes();
    let batches = stream::unfold(
        (store, topic, from, changes, stopped),
        |(store, topic, next, mut changes, mut stopped)| async move {
            loop {
                changes.borrow_and_update();
                let events = store.read(&topic, next, 100).await.ok()?;
                if let Some(last) = events.last() {
                    let next = last.position + 1;
                    return Some((events, (store, topic, next, changes, stopped)));
                }
                tokio::select! {
                    changed = changes.changed() => changed.ok()?,
                    () = until_stopped(&mut stopped) => return None,
                }
            }
        },
    );
    let events = batches.flat_map(|events| {
        stream::iter(events.into_iter().map(|event| {
            Ok(SseEvent::default()
                .id(event.position.to_string())
                .data(cloudevents::to_json(&event).to_string()))
        }))
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

fn limit(query: Option<&str>) -> Result<usize, Refusal> {
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
) -> Result<Response, Refusal> {
    check_topic(&topic)?;
    let (parts, body) = request.into_parts();
    api.authorize(&parts.headers, &topic)?;
    let body = api.body(body).await?;
    let mut publish = cloudevents::parse(&parts.headers, &body)
        .map_err(|why| error(StatusCode::BAD_REQUEST, why))?;
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
    let contracts = api.events.contracts();
    if !contracts.is_empty() {
        for (index, event) in publish.events.iter().enumerate() {
            if let Some(violation) = contracts.check(&topic, event) {
                let mut body = json!({
                    "error": violation.error,
                    "pointer": violation.pointer,
                    "rule": violation.rule,
                    "schema": violation.schema,
                    "id": event.id,
                });
                if publish.batch {
                    body["index"] = json!(index);
                }
                return Err(Refusal {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    body,
                    challenge: false,
                    retry_after: None,
                });
            }
        }
    }
    let key = publish.key.clone();
    let append = Append {
        topic: topic.clone(),
        key: publish.key,
        expected: publish.expected,
        events: publish.events,
    };
    let appended = match api.events.store().append(append).await {
        Ok(appended) => appended,
        Err(AppendError::Conflict { expected, actual }) => {
            return Err(Refusal {
                status: StatusCode::CONFLICT,
                body: json!({
                    "error": AppendError::Conflict { expected, actual }.to_string(),
                    "expected": expected.to_string(),
                    "actual": actual,
                }),
                challenge: false,
                retry_after: None,
            })
        }
        Err(AppendError::Invalid(why)) => return Err(error(StatusCode::BAD_REQUEST, why)),
        Err(e) => return Err(store_failed(e)),
    };
    let mut answers = appended
        .events
        .iter()
        .map(|stored| stored_json(&topic, key.as_deref(), stored));
    let body = if publish.batch {
        json!({ "events": answers.collect::<Vec<_>>() })
    } else {
        answers.next().unwrap_or(Value::Null)
    };
    let mut response = json_response(StatusCode::CREATED, body);
    response.headers_mut().insert(&CORRELATION_ID, correlation);
    Ok(response)
}

fn events_json(events: &[Event]) -> Vec<Value> {
    events.iter().map(cloudevents::to_json).collect()
}

async fn read(
    State(api): State<Api>,
    Path(topic): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    check_topic(&topic)?;
    api.authorize(&headers, &topic)?;
    if query_flag(query.as_deref(), "follow") {
        let store = api.events.store().clone();
        let last = store.last_position(&topic).await.map_err(store_failed)?;
        let from = query_number(query.as_deref(), "from_position", last + 1)?.max(1);
        return Ok(follow(store, topic, from, api.stopped.clone()).into_response());
    }
    let from = query_number(query.as_deref(), "from_position", 1)?.max(1);
    let limit = limit(query.as_deref())?;
    let events = api
        .events
        .store()
        .read(&topic, from, limit)
        .await
        .map_err(store_failed)?;
    let next = events.last().map_or(from, |e| e.position + 1);
    Ok(json_response(
        StatusCode::OK,
        json!({ "topic": topic, "events": events_json(&events), "next_position": next }),
    ))
}

async fn stream(
    State(api): State<Api>,
    Path((topic, key)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    check_topic(&topic)?;
    api.authorize(&headers, &topic)?;
    let from = query_number(query.as_deref(), "from_version", 1)?.max(1);
    let limit = limit(query.as_deref())?;
    let events = api
        .events
        .store()
        .read_stream(&topic, &key, from, limit)
        .await
        .map_err(store_failed)?;
    let next = events
        .last()
        .and_then(|e| e.version)
        .map_or(from, |v| v + 1);
    Ok(json_response(
        StatusCode::OK,
        json!({ "topic": topic, "key": key, "events": events_json(&events), "next_version": next }),
    ))
}

/// The JSON of every topic the store has or the config names, with its
/// retention and subscriptions; `only`: just that one.
async fn topics_json(api: &Api, only: Option<&str>) -> Result<Vec<Value>, Refusal> {
    let settings = api.events.settings();
    let stored = api.events.store().topics().await.map_err(store_failed)?;
    let mut names: Vec<&str> = stored.iter().map(|t| t.name.as_str()).collect();
    names.extend(settings.topics.iter().map(|t| t.name.as_str()));
    names.extend(
        settings
            .subscriptions
            .iter()
            .map(|s| s.config.topic.as_str()),
    );
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
        for s in settings
            .subscriptions
            .iter()
            .filter(|s| s.config.topic == name)
        {
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

async fn topics(State(api): State<Api>, headers: HeaderMap) -> Result<Response, Refusal> {
    let mut listed = topics_json(&api, None).await?;
    if api.events.settings().require_api_key {
        // A key is needed to list; the list holds the topics it may use.
        if let Err(refusal) = api.authorize(&headers, "") {
            if refusal.status == StatusCode::UNAUTHORIZED {
                return Err(refusal);
            }
        }
        listed.retain(|t| {
            t["name"]
                .as_str()
                .is_some_and(|name| api.authorize(&headers, name).is_ok())
        });
    }
    Ok(json_response(StatusCode::OK, json!({ "topics": listed })))
}

async fn topic(
    State(api): State<Api>,
    Path(topic): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    check_topic(&topic)?;
    api.authorize(&headers, &topic)?;
    let mut found = topics_json(&api, Some(&topic)).await?;
    if found.is_empty() {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("topic `{topic}` has no event and no settings"),
        ));
    }
    Ok(json_response(StatusCode::OK, found.remove(0)))
}

/// A JSON object body (an empty body is `{}`).
fn object(body: &Bytes) -> Result<serde_json::Map<String, Value>, Refusal> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(error(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        )),
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
) -> Result<Option<Duration>, Refusal> {
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

/// The sagas, or 503 while they are not running.
fn sagas(api: &Api) -> Result<Arc<super::sagas::Sagas>, Refusal> {
    api.events
        .sagas()
        .cloned()
        .ok_or_else(|| error(StatusCode::SERVICE_UNAVAILABLE, "sagas are not running yet"))
}

/// The value of `name` in a query string.
fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

fn saga_answer(status: StatusCode, state: &super::sagas::SagaState) -> Response {
    let body = serde_json::to_value(state).unwrap_or(Value::Null);
    let mut response = json_response(status, body);
    let location = format!("/v1/sagas/{}/{}", state.saga, state.id);
    if let Ok(location) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

async fn start_saga(
    State(api): State<Api>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Result<Response, Refusal> {
    use super::sagas::StartError;
    let (parts, body) = request.into_parts();
    api.authorize(&parts.headers, super::sagas::TOPIC)?;
    let sagas = sagas(&api)?;
    let wait = match query_value(query.as_deref(), "wait") {
        Some(text) => Some(
            tidegate_resilience::config::parse_duration(text)
                .map_err(|why| error(StatusCode::BAD_REQUEST, format!("wait: {why}")))?
                .min(Duration::from_secs(60)),
        ),
        None => None,
    };
    let id = match parts.headers.get(&super::sagas::IDEMPOTENCY_KEY) {
        None => None,
        Some(key) => {
            let key = key.to_str().ok().filter(|k| {
                !k.is_empty()
                    && k.len() <= 100
                    && k.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
                    })
            });
            Some(
                key.ok_or_else(|| {
                    error(
                        StatusCode::BAD_REQUEST,
                        "Idempotency-Key (the saga's id): 1 to 100 letters, digits, - _ . ~",
                    )
                })?
                .to_owned(),
            )
        }
    };
    let body = api.body(body).await?;
    let input: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("the input must be JSON: {e}"),
            )
        })?
    };
    let started = match sagas.start(&name, id, input).await {
        Ok(state) => state,
        Err(StartError::Unknown) => {
            return Err(error(
                StatusCode::NOT_FOUND,
                format!("there is no saga named `{name}`"),
            ))
        }
        Err(StartError::Input(why)) => return Err(error(StatusCode::BAD_REQUEST, why)),
        Err(StartError::Taken(other)) => {
            return Err(error(
                StatusCode::CONFLICT,
                format!("that id is a saga of `{other}`"),
            ))
        }
        Err(StartError::Store(e)) => return Err(store_failed(e)),
    };
    let state = match wait {
        Some(wait) => sagas
            .wait(&started.id, tokio::time::Instant::now() + wait)
            .await
            .map_err(store_failed)?
            .unwrap_or(started),
        None => started,
    };
    let settled = state.is_finished() || state.status == "stuck";
    let status = if wait.is_some() && settled {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok(saga_answer(status, &state))
}

async fn saga(
    State(api): State<Api>,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    api.authorize(&headers, super::sagas::TOPIC)?;
    let state = sagas(&api)?
        .state(&id)
        .await
        .map_err(store_failed)?
        .filter(|s| s.saga == name)
        .ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                format!("there is no saga `{name}` with id `{id}`"),
            )
        })?;
    Ok(saga_answer(StatusCode::OK, &state))
}

async fn fetch(
    State(api): State<Api>,
    Path(name): Path<String>,
    request: Request,
) -> Result<Response, Refusal> {
    let (parts, body) = request.into_parts();
    api.pull_subscription(&name, &parts.headers)?;
    let body = object(&api.body(body).await?)?;
    let max = match body.get("max") {
        None => 10,
        Some(value) => value
            .as_u64()
            .filter(|max| (1..=MAX_LIMIT).contains(max))
            .ok_or_else(|| {
                error(
                    StatusCode::BAD_REQUEST,
                    format!("max must be from 1 to {MAX_LIMIT}"),
                )
            })?,
    };
    let wait = duration_field(&body, "wait")?.unwrap_or(Duration::ZERO);
    if wait > MAX_WAIT {
        return Err(error(StatusCode::BAD_REQUEST, "wait must be at most 60s"));
    }
    let consumer = Consumer::new(api.events.store().clone(), name)
        .batch(usize::try_from(max).unwrap_or(usize::MAX));
    let deliveries = consumer.next_within(wait).await.map_err(store_failed)?;
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
    Ok(json_response(
        StatusCode::OK,
        json!({ "messages": messages }),
    ))
}

/// How a settle endpoint settles each ack id.
enum Settle {
    Ack,
    Nack(Option<Duration>),
    Extend,
    DeadLetter(String),
}

/// Settles the `ack_ids` of the body as `how` reads it from the body.
async fn settle(
    api: Api,
    name: String,
    request: Request,
    how: fn(&serde_json::Map<String, Value>) -> Result<Settle, Refusal>,
) -> Result<Response, Refusal> {
    let (parts, body) = request.into_parts();
    api.pull_subscription(&name, &parts.headers)?;
    let body = object(&api.body(body).await?)?;
    let ack_ids: Vec<String> = body
        .get("ack_ids")
        .and_then(Value::as_array)
        .filter(|ids| !ids.is_empty() && ids.len() <= MAX_LIMIT as usize)
        .and_then(|ids| {
            ids.iter()
                .map(|id| id.as_str().map(str::to_owned))
                .collect()
        })
        .ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                format!("ack_ids must be a list of 1 to {MAX_LIMIT} ack ids"),
            )
        })?;
    let how = how(&body)?;
    let store = api.events.store();
    let done = match &how {
        Settle::Ack => store.ack(&name, &ack_ids).await.map_err(store_failed)?,
        _ => {
            let mut done = Vec::with_capacity(ack_ids.len());
            for id in &ack_ids {
                let settled = match &how {
                    Settle::Nack(delay) => store.nack(&name, id, *delay).await,
                    Settle::Extend => store.extend(&name, id).await,
                    Settle::DeadLetter(reason) => store.dead_letter(&name, id, reason).await,
                    Settle::Ack => unreachable!("acked above"),
                };
                done.push(settled.map_err(store_failed)?);
            }
            done
        }
    };
    let expired: Vec<&String> = ack_ids
        .iter()
        .zip(&done)
        .filter(|(_, ok)| !**ok)
        .map(|(id, _)| id)
        .collect();
    Ok(json_response(
        StatusCode::OK,
        json!({ "settled": done.iter().filter(|ok| **ok).count(), "expired": expired }),
    ))
}

async fn ack(
    State(api): State<Api>,
    Path(name): Path<String>,
    request: Request,
) -> Result<Response, Refusal> {
    settle(api, name, request, |_| Ok(Settle::Ack)).await
}

async fn nack(
    State(api): State<Api>,
    Path(name): Path<String>,
    request: Request,
) -> Result<Response, Refusal> {
    settle(api, name, request, |body| {
        Ok(Settle::Nack(duration_field(body, "delay")?))
    })
    .await
}

async fn extend(
    State(api): State<Api>,
    Path(name): Path<String>,
    request: Request,
) -> Result<Response, Refusal> {
    settle(api, name, request, |_| Ok(Settle::Extend)).await
}

async fn dead_letter(
    State(api): State<Api>,
    Path(name): Path<String>,
    request: Request,
) -> Result<Response, Refusal> {
    settle(api, name, request, |body| match body.get("reason") {
        None | Some(Value::Null) => Ok(Settle::DeadLetter("dead-lettered by a worker".into())),
        Some(Value::String(reason)) if !reason.is_empty() && reason.len() <= 1024 => {
            Ok(Settle::DeadLetter(reason.clone()))
        }
        Some(_) => Err(error(
            StatusCode::BAD_REQUEST,
            "reason must be a string of 1 to 1024 bytes",
        )),
    })
    .await
}
