//! The events part of the admin API (admin listener):
//!
//! | endpoint | what |
//! |---|---|
//! | `GET /status/events` | topics (positions, events kept), subscriptions (cursor, lag, in flight, redelivering, oldest unacked age) and dead-letter topics (letters waiting, the oldest with their reasons) |
//! | `POST /v1/subscriptions/{name}/seek` | `{"position": N \| "earliest" \| "latest"}`: the group starts again there (rebuild a read model); admin token |
//! | `POST /v1/topics/{topic}/redrive` | `{"limit": 100}` (and optionally `"to"`, the topic the letters came from): dead letters of `topic` back to work in the groups that dead-lettered them; admin token |
//! | `GET /status/sagas` | sagas by name and status (running, compensating, completed, compensated, stuck), and the latest 20 with each step's status and attempts |
//! | `POST /v1/sagas/{name}/{id}/retry` | a stuck saga's compensations tried again (after the upstream was fixed); admin token |

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use tidegate_client::clock::now_rfc3339;
use tidegate_events::{Seek, Store};

use super::Events;
use crate::observe::admin::{error, json_response, refused_write};
use crate::proxy::Gateway;

/// Letters of each dead-letter topic shown, oldest first.
const LETTERS_SHOWN: usize = 20;

/// The events service for an admin write, or the answer refusing it: no
/// admin token, or no `[events]`.
fn for_write(gateway: &Gateway, headers: &HeaderMap) -> Result<Arc<Events>, Box<Response>> {
    if let Some(refused) = refused_write(gateway, headers) {
        return Err(Box::new(refused));
    }
    gateway
        .events()
        .cloned()
        .ok_or_else(|| Box::new(events_off()))
}

fn events_off() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "events are not configured: add an [events] table",
    )
}

/// A dead letter as the status shows it.
fn letter(event: &tidegate_events::Event) -> Value {
    let ext = |name: &str| event.extensions.get(name).cloned();
    json!({
        "id": event.id,
        "type": event.ty,
        "position": event.position,
        "time": event.time,
        "reason": ext("deadletterreason"),
        "subscription": ext("deadlettersubscription"),
        "original_position": ext("deadletterposition").and_then(|p| p.parse::<u64>().ok()),
    })
}

/// The JSON of `GET /status/events` (also in the dashboard's stream).
pub async fn status_json(gateway: &Gateway) -> Result<Value, String> {
    let Some(events) = gateway.events() else {
        return Err("events are not configured".into());
    };
    let store: &dyn Store = &**events.store();
    let settings = events.settings();
    let topics = store.topics().await.map_err(|e| e.to_string())?;
    let mut subscriptions = Vec::new();
    let mut dead_topics = BTreeSet::new();
    for s in &settings.subscriptions {
        let status = store
            .subscription_status(&s.config.name)
            .await
            .map_err(|e| e.to_string())?;
        let dead = s.config.dead_letter_topic();
        subscriptions.push(json!({
            "name": s.config.name,
            "topic": s.config.topic,
            "mode": if s.push.is_some() { "push" } else { "pull" },
            "upstream": s.push.as_ref().map(|p| p.upstream.clone()),
            "cursor": status.cursor,
            "lag": status.lag,
            "in_flight": status.in_flight,
            "redelivering": status.redelivering,
            "oldest_unacked_age_seconds": status.oldest_unfinished_age_ms.map(|ms| ms as f64 / 1000.0),
            "dead_letter_topic": dead,
        }));
        dead_topics.insert(dead);
    }
    let mut dead_letters = Vec::new();
    for topic in dead_topics {
        let letters = store
            .dead_letters(&topic, LETTERS_SHOWN)
            .await
            .map_err(|e| e.to_string())?;
        dead_letters.push(json!({
            "topic": topic,
            "waiting": letters.waiting,
            "oldest": letters.oldest.iter().map(letter).collect::<Vec<_>>(),
        }));
    }
    let topics: Vec<Value> = topics
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "first_position": t.first_position,
                "last_position": t.last_position,
                "events": t.events(),
            })
        })
        .collect();
    Ok(json!({
        "topics": topics,
        "subscriptions": subscriptions,
        "dead_letters": dead_letters,
        "timestamp": now_rfc3339(),
    }))
}

/// `GET /status/events`.
pub async fn status(State(gateway): State<Arc<Gateway>>) -> Response {
    if gateway.events().is_none() {
        return events_off();
    }
    match status_json(&gateway).await {
        Ok(status) => json_response(StatusCode::OK, &status),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e),
    }
}

/// `POST /v1/subscriptions/{name}/seek`.
pub async fn seek(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let events = match for_write(&gateway, &headers) {
        Ok(events) => events,
        Err(refused) => return *refused,
    };
    if events.subscription(&name).is_none() {
        return error(StatusCode::NOT_FOUND, "no subscription by that name");
    }
    let to = match serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("position").cloned())
    {
        Some(Value::String(s)) if s == "earliest" => Seek::Earliest,
        Some(Value::String(s)) if s == "latest" => Seek::Latest,
        Some(Value::Number(n)) if n.as_u64().is_some() => {
            Seek::Position(n.as_u64().unwrap_or_default())
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                r#"expected {"position": N | "earliest" | "latest"}"#,
            )
        }
    };
    if let Err(e) = events.store().seek(&name, to).await {
        return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
    }
    tracing::warn!(subscription = %name, ?to, "subscription moved through the admin API");
    let status = events.store().subscription_status(&name).await;
    json_response(
        StatusCode::OK,
        &json!({
            "subscription": name,
            "cursor": status.as_ref().map(|s| s.cursor).ok(),
            "lag": status.as_ref().map(|s| s.lag).ok(),
            "timestamp": now_rfc3339(),
        }),
    )
}

/// `POST /v1/topics/{topic}/redrive`.
pub async fn redrive(
    State(gateway): State<Arc<Gateway>>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let events = match for_write(&gateway, &headers) {
        Ok(events) => events,
        Err(refused) => return *refused,
    };
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(body @ Value::Object(_)) => body,
            _ => return error(StatusCode::BAD_REQUEST, "the body must be a JSON object"),
        }
    };
    let limit = match &body["limit"] {
        Value::Null => 100,
        value => match value.as_u64().filter(|n| (1..=10_000).contains(n)) {
            Some(n) => usize::try_from(n).unwrap_or(100),
            None => return error(StatusCode::BAD_REQUEST, "limit must be from 1 to 10000"),
        },
    };
    let settings = events.settings();
    let sources: BTreeSet<&str> = settings
        .subscriptions
        .iter()
        .filter(|s| s.config.dead_letter_topic() == topic)
        .map(|s| s.config.topic.as_str())
        .collect();
    if sources.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            "no subscription dead-letters to this topic",
        );
    }
    match &body["to"] {
        Value::Null => {}
        Value::String(to) if sources.contains(to.as_str()) => {}
        _ => {
            let from: Vec<&str> = sources.into_iter().collect();
            return error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "dead letters go back to the topic they came from: `to` may be {}",
                    from.join(" or ")
                ),
            );
        }
    }
    match events.store().redrive(&topic, limit).await {
        Ok(back) => {
            tracing::warn!(topic = %topic, back, "dead letters redriven through the admin API");
            let waiting = events
                .store()
                .dead_letters(&topic, 0)
                .await
                .map(|d| d.waiting)
                .ok();
            json_response(
                StatusCode::OK,
                &json!({ "topic": topic, "redriven": back, "waiting": waiting, "timestamp": now_rfc3339() }),
            )
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// Sagas shown by `/status/sagas`, the latest first.
const SAGAS_SHOWN: usize = 20;

/// `GET /status/sagas`.
pub async fn sagas_status(State(gateway): State<Arc<Gateway>>) -> Response {
    let Some(events) = gateway.events() else {
        return events_off();
    };
    let Some(sagas) = events.sagas() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "sagas are not running yet");
    };
    match sagas.status(SAGAS_SHOWN).await {
        Ok(mut status) => {
            status["timestamp"] = json!(now_rfc3339());
            json_response(StatusCode::OK, &status)
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// `POST /v1/sagas/{name}/{id}/retry`.
pub async fn retry_saga(
    State(gateway): State<Arc<Gateway>>,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    use super::sagas::RetryError;
    let events = match for_write(&gateway, &headers) {
        Ok(events) => events,
        Err(refused) => return *refused,
    };
    let Some(sagas) = events.sagas() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "sagas are not running yet");
    };
    match sagas.retry(&name, &id).await {
        Ok(state) => {
            tracing::warn!(saga = %name, saga_id = %id, "a stuck saga retried through the admin API");
            json_response(
                StatusCode::OK,
                &serde_json::to_value(&state).unwrap_or(Value::Null),
            )
        }
        Err(RetryError::Unknown) => error(StatusCode::NOT_FOUND, "no saga by that name and id"),
        Err(RetryError::NotStuck(status)) => error(
            StatusCode::CONFLICT,
            &format!("the saga is {status}, not stuck"),
        ),
        Err(RetryError::Store(e)) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}
