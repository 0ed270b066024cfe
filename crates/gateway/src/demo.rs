//! `tidegate demo`: sample upstreams on loopback (healthy, flaky, slow, an
//! SSE stream, an analytics service that takes pushed events) and a gateway
//! in front of them, with a composition route `/bff/home` over three of
//! them, and an `orders` topic: pushed to analytics (which
//! fails a share of deliveries, and refuses a few events outright, so
//! redeliveries and dead letters show on the dashboard) and pulled by a
//! fulfilment group.
//!
//! The flaky service fails a share of requests; change the share on the
//! sample itself with `curl -X PUT http://ADDR/error-rate -d 0.9` (`demo`
//! prints ADDR; through the gateway the request would meet the open breaker).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::config::{self, Config};
use crate::http::body::{full, BoxError, ProxyBody};

/// The sample upstreams, serving until dropped.
#[derive(Debug)]
pub struct Samples {
    /// Always answers 200.
    pub healthy: SocketAddr,
    /// Fails a share of requests with 503.
    pub flaky: SocketAddr,
    /// Answers after a delay (`?ms=`, default 3000).
    pub slow: SocketAddr,
    /// A server-sent event every second.
    pub events: SocketAddr,
    /// Takes pushed events: 503 for one in five, 400 the first time it
    /// sees an order whose total is a multiple of 97 (taken when redriven).
    pub analytics: SocketAddr,
    /// Reserves items and ships them (the `checkout` saga's first and
    /// last steps): refuses to ship to `nowhere`.
    pub inventory: SocketAddr,
    /// Charges and refunds (the saga's middle step): declines over 1 000;
    /// `PUT /refunds -d fail` makes refunds fail (a saga gets stuck), `-d ok`
    /// heals them.
    pub billing: SocketAddr,
    _tasks: JoinSet<()>,
}

/// Starts the sample upstreams on 127.0.0.1, free ports.
pub async fn start_samples() -> std::io::Result<Samples> {
    let mut tasks = JoinSet::new();
    let healthy = serve(&mut tasks, |req| async move {
        let path = req.uri().path().to_owned();
        json(
            StatusCode::OK,
            &format!(r#"{{"service":"healthy","path":"{path}"}}"#),
        )
    })
    .await?;
    // Error rate in millionths, shared by every request.
    let rate = Arc::new(AtomicU64::new(300_000));
    let flaky = serve(&mut tasks, move |req| {
        let rate = rate.clone();
        async move { flaky(req, &rate).await }
    })
    .await?;
    let slow = serve(&mut tasks, |req| async move {
        let ms = query_number(&req, "ms")
            .unwrap_or(3000.0)
            .clamp(0.0, 60_000.0);
        tokio::time::sleep(Duration::from_millis(ms as u64)).await;
        json(
            StatusCode::OK,
            &format!(r#"{{"service":"slow","waited_ms":{ms}}}"#),
        )
    })
    .await?;
    let events = serve(&mut tasks, |_req| async move { ticker() }).await?;
    let refused = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let analytics = serve(&mut tasks, move |req| {
        let refused = refused.clone();
        async move { analytics(req, &refused).await }
    })
    .await?;
    let inventory = serve(&mut tasks, |req| async move { inventory(req).await }).await?;
    let refunds_fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let billing = serve(&mut tasks, move |req| {
        let refunds_fail = refunds_fail.clone();
        async move { billing(req, &refunds_fail).await }
    })
    .await?;
    Ok(Samples {
        healthy,
        flaky,
        slow,
        events,
        analytics,
        inventory,
        billing,
        _tasks: tasks,
    })
}

/// A pushed event: refused when its order's total is a multiple of 97 (a
/// dead letter) the first time, taken when it comes back (redriven, once
/// analytics was "fixed"); unavailable one time in five (redelivered);
/// else taken.
async fn analytics(
    req: Request<Incoming>,
    refused: &std::sync::Mutex<std::collections::HashSet<String>>,
) -> Response<ProxyBody> {
    let id = req
        .headers()
        .get("ce-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let total = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["total"].as_u64());
    let first_time = || {
        refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone())
    };
    if total.is_some_and(|t| t % 97 == 0) && first_time() {
        return json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"analytics cannot read this order"}"#,
        );
    }
    if coin() < 200_000 {
        return json(StatusCode::SERVICE_UNAVAILABLE, r#"{"error":"busy"}"#);
    }
    json(StatusCode::OK, r#"{"service":"analytics","ok":true}"#)
}

/// The request's body as JSON (`null` if it is not).
async fn body_json(req: Request<Incoming>) -> serde_json::Value {
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null)
}

/// `POST /reservations` → 201 with an id; `DELETE /reservations/{id}`
/// → 204; `POST /shipments` → 201, or 422 for the address `nowhere`.
async fn inventory(req: Request<Incoming>) -> Response<ProxyBody> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    match (method, path.as_str()) {
        (Method::POST, "/reservations") => json(
            StatusCode::CREATED,
            &format!(r#"{{"id":"r-{}"}}"#, &crate::http::headers::new_id()[..8]),
        ),
        (Method::DELETE, p) if p.starts_with("/reservations/") => json(StatusCode::OK, "{}"),
        (Method::POST, "/shipments") => {
            if body_json(req).await["address"] == "nowhere" {
                return json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    r#"{"error":"we do not ship to nowhere"}"#,
                );
            }
            json(StatusCode::CREATED, r#"{"shipped":true}"#)
        }
        _ => json(StatusCode::NOT_FOUND, r#"{"error":"no such thing"}"#),
    }
}

/// `POST /charges` → 201 with an id, or 402 over 1 000;
/// `POST /charges/{id}/refund` → 200, or 503 while refunds are set to
/// fail; `PUT /refunds` with `fail` or `ok`.
async fn billing(
    req: Request<Incoming>,
    refunds_fail: &std::sync::atomic::AtomicBool,
) -> Response<ProxyBody> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    match (method, path.as_str()) {
        (Method::PUT, "/refunds") => {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let fail = body.as_ref() == b"fail";
            refunds_fail.store(fail, Ordering::Relaxed);
            json(StatusCode::OK, &format!(r#"{{"refunds_fail":{fail}}}"#))
        }
        (Method::POST, "/charges") => {
            if body_json(req).await["amount"].as_f64().unwrap_or(0.0) > 1000.0 {
                return json(StatusCode::PAYMENT_REQUIRED, r#"{"error":"card declined"}"#);
            }
            json(
                StatusCode::CREATED,
                &format!(r#"{{"id":"c-{}"}}"#, &crate::http::headers::new_id()[..8]),
            )
        }
        (Method::POST, p) if p.starts_with("/charges/") && p.ends_with("/refund") => {
            if refunds_fail.load(Ordering::Relaxed) {
                return json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    r#"{"error":"refunds are down"}"#,
                );
            }
            json(StatusCode::OK, r#"{"refunded":true}"#)
        }
        _ => json(StatusCode::NOT_FOUND, r#"{"error":"no such thing"}"#),
    }
}

async fn flaky(req: Request<Incoming>, rate: &AtomicU64) -> Response<ProxyBody> {
    if req.method() == Method::PUT && req.uri().path().ends_with("/error-rate") {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return match std::str::from_utf8(&body)
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
        {
            Some(r) if (0.0..=1.0).contains(&r) => {
                rate.store((r * 1e6) as u64, Ordering::Relaxed);
                json(StatusCode::OK, &format!(r#"{{"error_rate":{r}}}"#))
            }
            _ => json(
                StatusCode::BAD_REQUEST,
                r#"{"error":"send a number from 0 to 1"}"#,
            ),
        };
    }
    let r = rate.load(Ordering::Relaxed);
    if coin() < r {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"service":"flaky","error":"unlucky"}"#,
        )
    } else {
        json(StatusCode::OK, r#"{"service":"flaky","ok":true}"#)
    }
}

/// A number in 0..1_000_000, spread well enough for a demo.
fn coin() -> u64 {
    let id = crate::http::headers::new_id();
    u64::from_str_radix(&id[..12], 16).unwrap_or(0) % 1_000_000
}

fn ticker() -> Response<ProxyBody> {
    let stream = futures_util::stream::unfold(0u64, |n| async move {
        if n > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let event = format!("id: {n}\nevent: tick\ndata: {{\"n\":{n}}}\n\n");
        Some((Ok::<_, BoxError>(Frame::data(Bytes::from(event))), n + 1))
    });
    let mut response = Response::new(ProxyBody::new(StreamBody::new(stream)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    response
}

fn json(status: StatusCode, body: &str) -> Response<ProxyBody> {
    let mut response = Response::new(full(body.to_owned()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn query_number(req: &Request<Incoming>, key: &str) -> Option<f64> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

async fn serve<F, Fut>(tasks: &mut JoinSet<()>, handler: F) -> std::io::Result<SocketAddr>
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let handler = Arc::new(handler);
    tasks.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let answer = handler(req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Sends a little traffic through the gateway at `gateway`, so the
/// dashboard has something to draw: every 200 ms one request to the
/// healthy, flaky and slow samples (one slow request in five passes the
/// 1 s timeout), and an order published to the `orders` topic of the
/// events API at `events`. Runs until the task is aborted.
pub fn traffic(gateway: SocketAddr, events: Option<SocketAddr>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build_http::<http_body_util::Empty<Bytes>>();
        let publisher = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build_http::<http_body_util::Full<Bytes>>();
        let mut every = tokio::time::interval(Duration::from_millis(200));
        for n in 0u64.. {
            every.tick().await;
            if let Some(events) = events {
                let order = n % 40;
                let total = 10 + n * 29 % 500;
                let request = Request::post(format!("http://{events}/v1/topics/orders/events"))
                    .header("content-type", "application/json")
                    .header("ce-type", "OrderPlaced")
                    .header("ce-source", "/demo/shop")
                    .header("tidegate-key", format!("order-{order}"))
                    .body(http_body_util::Full::new(Bytes::from(format!(
                        r#"{{"order":"order-{order}","total":{total}}}"#
                    ))));
                if let Ok(request) = request {
                    let sent = publisher.request(request);
                    tokio::spawn(async move {
                        if let Ok(response) = sent.await {
                            let _ = response.into_body().collect().await;
                        }
                    });
                }
            }
            if let (Some(events), 0) = (events, n % 10) {
                // A checkout every 2 s: one in three declined (compensated),
                // one in five shipped nowhere (refunded and unreserved).
                let round = n / 10;
                let amount = if round % 3 == 2 {
                    5000
                } else {
                    30 + round % 50
                };
                let address = if round % 5 == 4 {
                    "nowhere"
                } else {
                    "221B Baker Street"
                };
                let request = Request::post(format!("http://{events}/v1/sagas/checkout"))
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(Bytes::from(format!(
                        r#"{{"items":["book-{round}"],"amount":{amount},"address":"{address}"}}"#
                    ))));
                if let Ok(request) = request {
                    let sent = publisher.request(request);
                    tokio::spawn(async move {
                        if let Ok(response) = sent.await {
                            let _ = response.into_body().collect().await;
                        }
                    });
                }
            }
            let slow = if n % 5 == 4 { 1200 } else { 20 + n % 7 * 40 };
            let paths = [
                "/healthy/hello".to_owned(),
                "/flaky/order".to_owned(),
                format!("/slow/report?ms={slow}"),
                format!("/bff/home?name=demo&ms={slow}"),
            ];
            for path in paths {
                let Ok(uri) = format!("http://{gateway}{path}").parse::<http::Uri>() else {
                    continue;
                };
                let request = client.get(uri);
                tokio::spawn(async move {
                    if let Ok(response) = request.await {
                        let _ = response.into_body().collect().await;
                    }
                });
            }
        }
    })
}

/// The demo gateway's config: a route per sample, health checks, and
/// policies tight enough to watch them work; the `orders` topic in the
/// store at `store`, served on `events`.
pub fn config(
    samples: &Samples,
    listen: SocketAddr,
    admin: SocketAddr,
    events: SocketAddr,
    store: &std::path::Path,
) -> Result<Config, config::ConfigError> {
    let text = format!(
        r#"
[gateway]
listen = "{listen}"
admin_listen = "{admin}"
drain_timeout = "5s"
admin_token_env = "TIDEGATE_DEMO_ADMIN_TOKEN"

[defaults.policy]
timeout = "1s"
deadline = "5s"
[defaults.policy.retry]
max_attempts = 3
base_delay = "50ms"
max_delay = "500ms"
[defaults.policy.circuit_breaker]
consecutive_failures = 5
open_duration = "10s"

[[upstreams]]
name = "healthy"
endpoints = ["http://{healthy}"]
[upstreams.health_check]
path = "/health"
interval = "5s"
timeout = "1s"

[[upstreams]]
name = "flaky"
endpoints = ["http://{flaky}"]

[[upstreams]]
name = "slow"
endpoints = ["http://{slow}"]
[upstreams.policy.retry]
max_attempts = 1

[[upstreams]]
name = "events"
endpoints = ["http://{events}"]
[upstreams.policy]
deadline = "10s"

[[routes]]
name = "healthy"
path_prefix = "/healthy"
strip_prefix = true
upstream = "healthy"
rate_limit = {{ algorithm = "gcra", limit = 50, per = "1s", key = "client_ip" }}

[[routes]]
name = "flaky"
path_prefix = "/flaky"
strip_prefix = true
upstream = "flaky"
fallback = {{ kind = "stale", max_age = "5m" }}

[[routes]]
name = "slow"
path_prefix = "/slow"
strip_prefix = true
upstream = "slow"

[[routes]]
name = "home"
path_prefix = "/bff/home"
deadline = "1s"
compose = [
  {{ name = "greeting", upstream = "healthy", path = "/hello/{{query.name}}" }},
  {{ name = "order", upstream = "flaky", path = "/order", required = false }},
  {{ name = "report", upstream = "slow", path = "/report?ms={{query.ms}}", required = false, fields = ["waited_ms"] }},
]

[[upstreams]]
name = "analytics"
endpoints = ["http://{analytics}"]
[upstreams.policy.circuit_breaker]
consecutive_failures = 20

[[routes]]
name = "events"
path_prefix = "/events"
strip_prefix = true
upstream = "events"

[events]
path = "{store}"
listen = "{events_listen}"

[[events.topics]]
name = "orders"
max_events = 100000

[[events.subscriptions]]
name = "analytics"
topic = "orders"
push = {{ upstream = "analytics", path = "/events/orders" }}
max_in_flight = 20
max_deliveries = 3
backoff = {{ base_delay = "200ms", max_delay = "2s" }}

[[upstreams]]
name = "inventory"
endpoints = ["http://{inventory}"]

[[upstreams]]
name = "billing"
endpoints = ["http://{billing}"]
[upstreams.policy.retry]
max_attempts = 1

[[sagas]]
name = "checkout"
compensation = {{ max_attempts = 3, base_delay = "500ms" }}
[[sagas.steps]]
name = "reserve"
action = {{ upstream = "inventory", path = "/reservations", body = {{ items = "{{input.items}}" }} }}
compensate = {{ upstream = "inventory", method = "DELETE", path = "/reservations/{{steps.reserve.response.id}}" }}
[[sagas.steps]]
name = "charge"
action = {{ upstream = "billing", path = "/charges", body = {{ amount = "{{input.amount}}" }} }}
compensate = {{ upstream = "billing", path = "/charges/{{steps.charge.response.id}}/refund" }}
[[sagas.steps]]
name = "ship"
action = {{ upstream = "inventory", path = "/shipments", body = {{ address = "{{input.address}}" }} }}

[[events.subscriptions]]
name = "fulfilment"
topic = "orders"
ordering = "key"
ack_wait = "30s"
start = "latest"
"#,
        healthy = samples.healthy,
        flaky = samples.flaky,
        slow = samples.slow,
        events = samples.events,
        analytics = samples.analytics,
        inventory = samples.inventory,
        billing = samples.billing,
        store = store.display(),
        events_listen = events,
    );
    config::parse(&text, "demo", [])
}
