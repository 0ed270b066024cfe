//! Webhook alerts: when a breaker opens (an incident begins) or closes
//! again, every `[alerts] webhooks` URL gets a JSON POST.
//!
//! Alerts never wait on the data path: the breaker watcher hands them to a
//! queue and returns. Each delivery runs on its own task and is retried
//! with exponential backoff and full jitter (`base_delay` doubling up to
//! `max_delay`, `max_attempts` in all, `timeout` each) on connection
//! errors, timeouts, 408, 429 and 5xx; other 4xx answers are final. At
//! most [`MAX_DELIVERIES`] deliveries are under way at once; alerts beyond
//! that are dropped and counted, so a receiver that is down for long costs
//! bounded memory. Every alert carries an `id`, also sent as
//! `Idempotency-Key`, so a receiver can drop the copy a retry may bring.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde::Serialize;
use tidegate_resilience::retry::{self, BackoffKind, Jitter, Retry, RetryAction};
use tokio::sync::{mpsc, Semaphore};

use crate::config::{Alerts, Webhook};
use crate::http::body;
use crate::observe::metrics::Metrics;
use crate::proxy::client::UpstreamClient;

/// Deliveries (alert × webhook) under way at most.
pub const MAX_DELIVERIES: usize = 256;

/// One alert, as POSTed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// Unique per alert (and the `Idempotency-Key` header).
    pub id: String,
    /// `circuit_open` or `circuit_closed`.
    pub event: &'static str,
    /// The upstream.
    pub upstream: String,
    /// Breaker state before.
    pub from: &'static str,
    /// Breaker state after.
    pub to: &'static str,
    /// Why it changed.
    pub reason: String,
    /// When (RFC 3339).
    pub timestamp: String,
    /// For `circuit_closed`: seconds since the breaker opened.
    pub recovery_seconds: Option<f64>,
    /// Always `tidegate`.
    pub source: &'static str,
}

impl Alert {
    /// An alert with a fresh id.
    pub fn new(
        event: &'static str,
        upstream: &str,
        from: &'static str,
        to: &'static str,
        reason: String,
        timestamp: String,
        recovery_seconds: Option<f64>,
    ) -> Self {
        Alert {
            id: format!(
                "{:016x}{:016x}",
                tidegate_resilience::rng::next_u64(),
                tidegate_resilience::rng::next_u64()
            ),
            event,
            upstream: upstream.to_owned(),
            from,
            to,
            reason,
            timestamp,
            recovery_seconds,
            source: "tidegate",
        }
    }
}

/// The sending side: hands alerts to the dispatcher without waiting.
#[derive(Debug, Clone)]
pub struct Alerter {
    queue: mpsc::Sender<Alert>,
}

impl Alerter {
    /// The alerter and the receiver [`dispatch`] reads.
    pub fn new() -> (Self, mpsc::Receiver<Alert>) {
        let (queue, receiver) = mpsc::channel(MAX_DELIVERIES);
        (Alerter { queue }, receiver)
    }

    /// Queues `alert`; false (and nothing waits) if the queue is full.
    pub fn send(&self, alert: Alert) -> bool {
        self.queue.try_send(alert).is_ok()
    }
}

/// Sends every queued alert to the webhooks `settings` returns at that
/// moment (so a reload applies to the next alert). Ends when every
/// [`Alerter`] is gone or `stopped` resolves.
pub async fn dispatch(
    mut alerts: mpsc::Receiver<Alert>,
    settings: impl Fn() -> Alerts,
    metrics: Arc<Metrics>,
    stopped: impl std::future::Future<Output = ()>,
) {
    // The upstreams' pooled client, without their gates: https receivers
    // get TLS the same way.
    let client = UpstreamClient::new(Default::default(), metrics.upstream_tls_failures());
    let slots = Arc::new(Semaphore::new(MAX_DELIVERIES));
    tokio::pin!(stopped);
    loop {
        let alert = tokio::select! {
            alert = alerts.recv() => match alert {
                Some(alert) => alert,
                None => return,
            },
            () = &mut stopped => return,
        };
        let settings = settings();
        let body = Bytes::from(serde_json::to_vec(&alert).unwrap_or_default());
        for hook in settings.webhooks.iter().cloned() {
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(webhook = %hook.label, upstream = %alert.upstream, event = alert.event, "alert dropped: too many deliveries under way");
                metrics.alert("dropped");
                continue;
            };
            let (client, body, metrics) = (client.clone(), body.clone(), metrics.clone());
            let (settings, id) = (settings.clone(), alert.id.clone());
            tokio::spawn(async move {
                let result = deliver(&client, &hook, &settings, &id, body).await;
                match result {
                    Ok(()) => metrics.alert("delivered"),
                    Err(e) => {
                        tracing::warn!(webhook = %hook.label, error = %e, "alert not delivered");
                        metrics.alert("failed");
                    }
                }
                drop(slot);
            });
        }
    }
}

/// POSTs `body` to `hook`, retrying as the settings say.
async fn deliver(
    client: &UpstreamClient,
    hook: &Webhook,
    settings: &Alerts,
    id: &str,
    body: Bytes,
) -> Result<(), String> {
    let retry = Retry::new(retry::Config {
        max_attempts: settings.max_attempts,
        backoff: BackoffKind::Exponential,
        base_delay: settings.base_delay,
        max_delay: settings.max_delay,
        jitter: Jitter::Full,
        ..retry::Config::default()
    })
    .without_budget();
    let transient = |result: &Result<(), Failure>| match result {
        Err(Transient(_)) => RetryAction::Retry,
        _ => RetryAction::Return,
    };
    let result = retry
        .call_with(
            |_attempt| async {
                let target = hook.uri.path_and_query().map_or("/", |p| p.as_str());
                let mut request = Request::builder()
                    .method(Method::POST)
                    .uri(target)
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(
                        header::USER_AGENT,
                        concat!("tidegate/", env!("CARGO_PKG_VERSION")),
                    )
                    .header("idempotency-key", id)
                    .body(body::full(body.clone()))
                    .map_err(|e| Permanent(e.to_string()))?;
                if let Some(host) = hook.uri.authority() {
                    if let Ok(host) = header::HeaderValue::from_str(host.as_str()) {
                        request.headers_mut().insert(header::HOST, host);
                    }
                }
                let response =
                    tokio::time::timeout(settings.timeout, client.request(&hook.to, request, None))
                        .await
                        .map_err(|_| Transient(format!("no answer within {:?}", settings.timeout)))?
                        .map_err(|e| Transient(format!("request failed: {e}")))?;
                let status = response.status();
                // Read the answer so the connection can be used again.
                let _ =
                    tokio::time::timeout(settings.timeout, response.into_body().collect()).await;
                match status {
                    s if s.is_success() => Ok(()),
                    StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => {
                        Err(Transient(format!("receiver answered {status}")))
                    }
                    s if s.is_server_error() => {
                        Err(Transient(format!("receiver answered {status}")))
                    }
                    _ => Err(Permanent(format!("receiver answered {status}"))),
                }
            },
            transient,
        )
        .await;
    result.map_err(|e| match e.into_inner() {
        Some(Transient(why) | Permanent(why)) => why,
        None => "gave up".to_owned(),
    })
}

/// Why one attempt failed.
#[derive(Debug)]
enum Failure {
    /// Worth another attempt.
    Transient(String),
    /// Not worth it (a 4xx, a bad request).
    Permanent(String),
}

use Failure::{Permanent, Transient};

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (Transient(why) | Permanent(why)) = self;
        f.write_str(why)
    }
}

impl std::error::Error for Failure {}
