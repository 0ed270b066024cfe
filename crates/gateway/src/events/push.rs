//! Push subscriptions: each event of the group is POSTed to the
//! subscription's upstream and path, through that upstream's policies
//! (breaker, bulkhead, limits, timeout). The subscription's redelivery
//! stands in for HTTP retries: a call is never sent twice once it may have
//! arrived, and is bounded to nine tenths of `ack_wait`, so a 2xx is acked
//! within the lease and never followed by a redelivery.
//!
//! The answer decides: 2xx acks; 429 and 503 (after their `Retry-After`),
//! 408, 425, other 5xx and timeouts deliver again after the backoff; any
//! other 4xx is poison, straight to the dead-letter topic. A delivery
//! counts against `max_deliveries` only if it may have reached the
//! subscriber: one whose connection was refused (or found no healthy
//! endpoint), or that the upstream's own policies turned away, is given
//! back uncounted. While the upstream's breaker is open, or no endpoint
//! is healthy, nothing is taken from the group; while it is half-open,
//! one event at a time (the probe). So a dead subscriber pauses its
//! subscription instead of burning its events into the dead-letter
//! topic.
//!
//! Binary mode (the default) sends the attributes as `ce-*` headers and the
//! data as the body; structured mode sends the event as
//! `application/cloudevents+json`. Every delivery carries
//! `tidegate-delivery: N`, and the publisher's `x-correlation-id` and a
//! child of its `traceparent`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::uri::PathAndQuery;
use http::{HeaderMap, StatusCode};
use tidegate_events::{Consumer, Delivery, Store};
use tidegate_resilience::breaker::CircuitState;
use tokio::sync::watch;

use super::cloudevents::{self, CORRELATION_ATTRIBUTE, TRACEPARENT_ATTRIBUTE};
use super::Events;
use crate::config::{Push, PushMode, Subscription};
use crate::http::headers::{self, CORRELATION_ID, TRACEPARENT};
use crate::observe::telemetry::{Attributes, Kind};
use crate::observe::watch::until_stopped;
use crate::proxy::upstream::Upstream;
use crate::proxy::{Called, Gateway};

/// The delivery count header of every push.
pub static DELIVERY: HeaderName = HeaderName::from_static("tidegate-delivery");

/// What the push tasks share: who runs, and how to reach the gateway.
#[derive(Debug)]
pub(super) struct Pushers {
    gateway: Weak<Gateway>,
    stop: watch::Receiver<bool>,
    running: Mutex<HashSet<String>>,
}

impl Pushers {
    pub(super) fn new(gateway: Weak<Gateway>, stop: watch::Receiver<bool>) -> Self {
        Pushers {
            gateway,
            stop,
            running: Mutex::new(HashSet::new()),
        }
    }
}

/// Starts a task for every push subscription of `events`' settings that
/// has none (at start, and after a reload adds one). A task ends when its
/// subscription is gone or pulled, or the gateway stops.
pub(super) fn start(events: &Arc<Events>) {
    let Some(pushers) = events.pushers.get() else {
        return;
    };
    let Some(gateway) = pushers.gateway.upgrade() else {
        return;
    };
    let settings = events.settings();
    let mut running = pushers.running.lock().unwrap_or_else(|e| e.into_inner());
    for subscription in settings.subscriptions.iter().filter(|s| s.push.is_some()) {
        let name = subscription.config.name.clone();
        if running.insert(name.clone()) {
            let task = run(gateway.clone(), events.clone(), name, pushers.stop.clone());
            tokio::spawn(task);
        }
    }
}

/// Delivers group `name`'s events while it is a push subscription.
async fn run(
    gateway: Arc<Gateway>,
    events: Arc<Events>,
    name: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut generation = events.generation.subscribe();
    loop {
        generation.borrow_and_update();
        let Some(subscription) = events.subscription(&name) else {
            break;
        };
        let Some(push) = subscription.push.clone() else {
            break;
        };
        // The config names only upstreams it has.
        let Some(upstream) = gateway.table().upstream(&push.upstream).cloned() else {
            break;
        };
        // Paused while the breaker is open or no endpoint is healthy:
        // nothing is taken.
        let mut wait = (!upstream.has_available_endpoint()).then_some(Duration::from_secs(1));
        let mut probing = false;
        if let Some(breaker) = upstream.pipeline.circuit_breaker() {
            match breaker.try_acquire() {
                Err(open) => {
                    wait = Some(open.retry_after().unwrap_or(Duration::from_secs(1)));
                }
                Ok(_permit) => probing = breaker.state() == CircuitState::HalfOpen,
            }
        }
        if let Some(wait) = wait {
            tokio::select! {
                () = tokio::time::sleep(wait.max(Duration::from_millis(10))) => {}
                _ = generation.changed() => {}
                () = until_stopped(&mut stop) => break,
            }
            continue;
        }
        // Half-open: one event, the probe.
        let batch = if probing {
            1
        } else {
            usize::try_from(subscription.config.max_in_flight).unwrap_or(1)
        };
        let consumer = Consumer::new(events.store().clone(), name.clone()).batch(batch);
        let deliveries = tokio::select! {
            deliveries = consumer.next() => deliveries,
            // Settings changed: look at them again.
            _ = generation.changed() => continue,
            () = until_stopped(&mut stop) => break,
        };
        match deliveries {
            Ok(deliveries) => {
                join_all(deliveries.iter().map(|delivery| {
                    deliver(
                        &gateway,
                        &**events.store(),
                        &upstream,
                        &subscription,
                        &push,
                        delivery,
                    )
                }))
                .await;
            }
            Err(e) => {
                tracing::warn!(subscription = %name, error = %e, "cannot take events to push");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = until_stopped(&mut stop) => break,
                }
            }
        }
    }
    if let Some(pushers) = events.pushers.get() {
        pushers
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&name);
    }
}

/// The request of one delivery: its headers and body. Its
/// `traceparent` is a child of `parent` (the delivery's span, or the
/// publisher's).
fn request(push: &Push, delivery: &Delivery, parent: Option<&HeaderValue>) -> (HeaderMap, Bytes) {
    let event = &delivery.event;
    let (mut headers, body) = match push.mode {
        PushMode::Binary => (
            cloudevents::binary_headers(event),
            Bytes::from(event.data.clone()),
        ),
        PushMode::Structured => {
            let mut headers = HeaderMap::new();
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static(cloudevents::STRUCTURED),
            );
            let body = cloudevents::to_json(event).to_string();
            (headers, Bytes::from(body))
        }
    };
    headers.insert(&DELIVERY, HeaderValue::from(delivery.delivery));
    if let Some(id) = event
        .extensions
        .get(CORRELATION_ATTRIBUTE)
        .and_then(|id| HeaderValue::from_str(id).ok())
    {
        headers.insert(&CORRELATION_ID, id);
    }
    headers.insert(&TRACEPARENT, headers::child_traceparent(parent));
    (headers, body)
}

/// What to do with a delivery after the subscriber's answer.
#[derive(Debug, PartialEq, Eq)]
enum Settle {
    Ack,
    /// Delivered again, after this or the backoff.
    Again(Option<Duration>),
    /// Nothing reached the subscriber: again, uncounted, after this or
    /// the backoff's first delay.
    Uncounted(Option<Duration>),
    Poison(String),
}

impl Settle {
    /// Its name, in a delivery's span.
    fn label(&self) -> &'static str {
        match self {
            Settle::Ack => "ack",
            Settle::Again(_) => "again",
            Settle::Uncounted(_) => "uncounted",
            Settle::Poison(_) => "dead_letter",
        }
    }
}

/// The answer rules of DESIGN.md "Events".
fn settle_for(called: &Called) -> Settle {
    match called {
        Called::Answered { status, .. } if status.is_success() => Settle::Ack,
        Called::Answered {
            status: StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE,
            retry_after,
        } => Settle::Again(*retry_after),
        Called::Answered { status, .. }
            if status.is_client_error()
                && *status != StatusCode::REQUEST_TIMEOUT
                && status.as_u16() != 425 =>
        {
            Settle::Poison(format!("the subscriber answered {status}"))
        }
        Called::Answered { .. } | Called::Failed(_) => Settle::Again(None),
        Called::NotSent(_) => Settle::Uncounted(None),
        Called::Refused { retry_after } => Settle::Uncounted(*retry_after),
    }
}

async fn deliver(
    gateway: &Gateway,
    store: &dyn Store,
    upstream: &Arc<Upstream>,
    subscription: &Subscription,
    push: &Push,
    delivery: &Delivery,
) {
    let name = &subscription.config.name;
    let publisher = delivery
        .event
        .extensions
        .get(TRACEPARENT_ATTRIBUTE)
        .and_then(|parent| HeaderValue::from_str(parent).ok());
    // The delivery is a span in the publisher's trace, the push its child.
    let span = gateway
        .telemetry()
        .map(|telemetry| telemetry.begin(publisher.as_ref()));
    let parent = span.map(|s| s.traceparent()).or(publisher);
    let (headers, body) = request(push, delivery, parent.as_ref());
    let path = PathAndQuery::try_from(push.path.as_str())
        .unwrap_or_else(|_| PathAndQuery::from_static("/"));
    let limit = subscription.config.ack_wait.mul_f64(0.9);
    let called = gateway
        .call_upstream(
            upstream,
            path,
            headers,
            body,
            limit,
            span.and_then(|s| s.recorded()),
        )
        .await;
    let settle = settle_for(&called);
    if let (Some(telemetry), Some(span)) = (gateway.telemetry(), span) {
        let topic = &subscription.config.topic;
        let attributes: Attributes = vec![
            ("messaging.system", "tidegate".into()),
            ("messaging.operation.type", "process".into()),
            ("messaging.destination.name", topic.clone().into()),
            ("messaging.consumer.group.name", name.clone().into()),
            ("messaging.message.id", delivery.event.id.clone().into()),
            ("tidegate.delivery", i64::from(delivery.delivery).into()),
            ("tidegate.upstream", upstream.name().to_owned().into()),
            ("tidegate.settle", settle.label().into()),
        ];
        let error = match &called {
            Called::Answered { status, .. } if status.is_success() => None,
            Called::Answered { status, .. } => Some(format!("the subscriber answered {status}")),
            Called::Failed(why) | Called::NotSent(why) => Some(why.clone()),
            Called::Refused { .. } => Some("the upstream's policies refused it".to_owned()),
        };
        telemetry.end(
            span,
            format!("process {topic}"),
            Kind::Consumer,
            attributes,
            error,
        );
    }
    let settled = match settle {
        Settle::Ack => store
            .ack(name, std::slice::from_ref(&delivery.ack_id))
            .await
            .map(|acked| acked.first().copied().unwrap_or(false)),
        Settle::Again(delay) => {
            if let Called::Failed(why) = &called {
                tracing::debug!(subscription = %name, error = %why, "push failed; delivering again later");
            }
            store.nack(name, &delivery.ack_id, delay).await
        }
        Settle::Uncounted(delay) => {
            if let Called::NotSent(why) = &called {
                tracing::debug!(subscription = %name, error = %why, "push not sent; delivering again later");
            }
            let delay = delay.unwrap_or(subscription.config.backoff.base_delay);
            store.release(name, &delivery.ack_id, Some(delay)).await
        }
        Settle::Poison(reason) => store.dead_letter(name, &delivery.ack_id, &reason).await,
    };
    match settled {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            subscription = %name,
            position = delivery.event.position,
            "a push outlived its lease; the event may be delivered again"
        ),
        Err(e) => tracing::warn!(subscription = %name, error = %e, "cannot settle a push"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_become_acks_redeliveries_and_dead_letters() {
        let answered = |code: u16, retry_after: Option<u64>| Called::Answered {
            status: StatusCode::from_u16(code).unwrap(),
            retry_after: retry_after.map(Duration::from_secs),
        };
        for (called, settle) in [
            (answered(200, None), Settle::Ack),
            (answered(204, None), Settle::Ack),
            (
                answered(503, Some(7)),
                Settle::Again(Some(Duration::from_secs(7))),
            ),
            (answered(429, None), Settle::Again(None)),
            (answered(408, None), Settle::Again(None)),
            (answered(425, None), Settle::Again(None)),
            (answered(500, None), Settle::Again(None)),
            (answered(502, None), Settle::Again(None)),
            (answered(302, None), Settle::Again(None)),
            (
                answered(400, None),
                Settle::Poison("the subscriber answered 400 Bad Request".into()),
            ),
            (
                answered(404, None),
                Settle::Poison("the subscriber answered 404 Not Found".into()),
            ),
            (Called::Failed("timed out".into()), Settle::Again(None)),
            (Called::NotSent("refused".into()), Settle::Uncounted(None)),
            (
                Called::Refused {
                    retry_after: Some(Duration::from_secs(3)),
                },
                Settle::Uncounted(Some(Duration::from_secs(3))),
            ),
        ] {
            assert_eq!(settle_for(&called), settle, "{called:?}");
        }
    }
}
