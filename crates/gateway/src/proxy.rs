//! The proxy: one request from the client, through the route's upstream
//! policies, to an endpoint and back.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tidegate_resilience::Error;
use tokio::time::Instant;

use crate::body::{self, is_body_too_large, ProxyBody, RequestBody};
use crate::config::{Config, GatewaySettings, RouteConfig};
use crate::events::Events;
use crate::headers::{self, CORRELATION_ID};
use crate::metrics::{method_label, Metrics, RequestLabels};
use crate::router::{self, Router};
use crate::upstream::{AttemptError, Upstream};
use tidegate_client::headers::is_retryable_status;

/// The HTTP client every upstream request goes through (pooled, keep-alive).
pub type UpstreamClient = Client<HttpConnector, ProxyBody>;

/// Everything a request needs: settings, routes, upstreams, client, metrics.
#[derive(Debug)]
pub struct Gateway {
    /// `[gateway]` settings.
    pub settings: GatewaySettings,
    router: Router,
    /// The upstreams, in config order.
    pub upstreams: Vec<Arc<Upstream>>,
    client: UpstreamClient,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// State changes, for `/events` and logs.
    pub events: Events,
    internal_token: Option<HeaderValue>,
    /// The `none` label of requests no route matched.
    none: Arc<String>,
}

/// The client for upstream requests.
pub fn upstream_client() -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .build(connector)
}

impl Gateway {
    /// Builds the run-time state of a validated config. The internal token is
    /// read from the environment variable the config names.
    pub fn new(config: Config) -> Result<Arc<Self>, String> {
        let internal_token = match &config.gateway.internal_token_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(token) => Some(HeaderValue::from_str(&token).map_err(|_| {
                    format!("environment variable {var} is not a valid header value")
                })?),
                Err(_) => {
                    return Err(format!(
                        "environment variable {var} (gateway.internal_token_env) is not set"
                    ))
                }
            },
        };
        let metrics = Arc::new(Metrics::default());
        let upstreams = config
            .upstreams
            .into_iter()
            .map(|u| {
                let name = u.name.clone();
                Upstream::new(u).map_err(|e| format!("upstreams `{name}`: policy.{e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for u in &upstreams {
            for e in &u.endpoints {
                metrics.endpoint_healthy(u.name(), &e.label, true);
            }
        }
        Ok(Arc::new(Gateway {
            settings: config.gateway,
            router: Router::new(config.routes),
            upstreams,
            client: upstream_client(),
            metrics,
            events: Events::default(),
            internal_token,
            none: Arc::new("none".to_owned()),
        }))
    }

    /// The HTTP client of health checks and of requests served on the
    /// caller's runtime (worker threads have their own).
    pub fn client(&self) -> &UpstreamClient {
        &self.client
    }

    /// Answers one client request from `client`, sending upstream requests
    /// through `upstream_client`.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: SocketAddr,
        upstream_client: &UpstreamClient,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let request_id = headers::correlation_id(req.headers());
        let method = req.method().clone();
        let mut log = Access {
            route: &self.none,
            upstream: &self.none,
            attempts: 0,
        };
        let mut response = match self
            .route_and_forward(req, client, upstream_client, &request_id, &mut log)
            .await
        {
            Ok(response) => response,
            Err(reply) => reply.into_response(&request_id),
        };
        response
            .headers_mut()
            .insert(&CORRELATION_ID, request_id.clone());
        let status = response.status();
        let elapsed = start.elapsed();
        self.metrics.request(
            RequestLabels {
                route: log.route.clone(),
                upstream: log.upstream.clone(),
                method: method_label(&method),
                status: status.as_u16(),
            },
            elapsed.as_secs_f64(),
        );
        self.metrics.attempts(log.upstream, log.attempts);
        tracing::info!(
            target: "tidegate::access",
            request_id = request_id.to_str().unwrap_or(""),
            method = %method,
            route = log.route.as_str(),
            upstream = log.upstream.as_str(),
            attempts = log.attempts,
            status = status.as_u16(),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
        );
        response
    }

    async fn route_and_forward<'a>(
        &'a self,
        mut req: Request<Incoming>,
        client: SocketAddr,
        upstream_client: &UpstreamClient,
        request_id: &HeaderValue,
        log: &mut Access<'a>,
    ) -> Result<Response<ProxyBody>, Reply> {
        if req.method() == Method::CONNECT {
            return Err(Reply::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported: this is not an open proxy",
            ));
        }
        let target_len = req.uri().path_and_query().map_or(1, |p| p.as_str().len())
            + req.uri().authority().map_or(0, |a| a.as_str().len());
        if target_len > self.settings.max_uri_bytes {
            return Err(Reply::new(
                StatusCode::URI_TOO_LONG,
                "request target too long",
            ));
        }
        // The client's side of a WebSocket handshake, joined once the upstream says 101.
        let upgrade = headers::is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, incoming) = req.into_parts();
        let Some(route) = self.router.route(&parts) else {
            return Err(Reply::new(
                StatusCode::NOT_FOUND,
                "no route matches this request",
            ));
        };
        let upstream = &self.upstreams[route.config.upstream];
        let in_flight = InFlight::new(upstream);
        log.route = &route.label;
        log.upstream = &upstream.label;

        let max_body = route
            .config
            .max_body_bytes
            .unwrap_or(self.settings.max_body_bytes);
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max_body) {
            return Err(
                Reply::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
                    .service(upstream.name()),
            );
        }
        if !upstream.has_healthy_endpoint() {
            upstream.rejections.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .rejection(upstream.name(), "no_healthy_endpoint");
            return Err(
                Reply::new(StatusCode::SERVICE_UNAVAILABLE, "no healthy endpoint")
                    .service(upstream.name()),
            );
        }
        let mut body = if incoming.is_end_stream() {
            RequestBody::empty()
        } else {
            RequestBody::read(incoming, self.settings.max_replay_bytes, max_body)
                .await
                .map_err(|e| {
                    if is_body_too_large(&*e) {
                        Reply::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
                    } else {
                        Reply::new(StatusCode::BAD_REQUEST, "could not read the request body")
                    }
                    .service(upstream.name())
                })?
        };

        let idempotent = headers::is_idempotent(&parts.method)
            || parts.headers.contains_key(&headers::IDEMPOTENCY_KEY);
        let template = self.upstream_head(
            &mut parts,
            &route.config,
            client,
            request_id,
            upgrade.is_some(),
        );
        let attempts = AtomicU32::new(0);
        let result = upstream
            .pipeline
            .call(|attempt| {
                attempts.fetch_add(1, Ordering::Relaxed);
                let head = template.head(attempt.remaining());
                let retryable = idempotent && body.is_replayable();
                self.attempt(upstream_client, upstream, head, body.take(), retryable)
            })
            .await;
        log.attempts = attempts.load(Ordering::Relaxed);
        let mut response = match result {
            Ok(response) => response,
            Err(err) => return self.failed(upstream, err, in_flight),
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_side) = upgrade {
                tunnel(client_side, hyper::upgrade::on(&mut response));
            }
        }
        Ok(downstream(in_flight, response))
    }

    /// The upstream request head, minus body and deadline.
    fn upstream_head(
        &self,
        parts: &mut http::request::Parts,
        route: &RouteConfig,
        client: SocketAddr,
        request_id: &HeaderValue,
        upgrade: bool,
    ) -> Template {
        let mut headers = std::mem::take(&mut parts.headers);
        headers::strip_hop_by_hop(&mut headers, upgrade);
        headers.remove(&headers::INTERNAL_TOKEN);
        headers.remove(&headers::DEADLINE_MS);
        let host = headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        if let Some(host) = host {
            headers.insert(&headers::FORWARDED_HOST, host.clone());
            headers.insert(header::HOST, host);
        }
        let forwarded_for = match headers
            .get(&headers::FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
        {
            Some(before) => format!("{before}, {}", client.ip()),
            None => client.ip().to_string(),
        };
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(forwarded_for)) {
            headers.insert(&headers::FORWARDED_FOR, v);
        }
        headers.insert(&headers::FORWARDED_PROTO, HeaderValue::from_static("http"));
        headers.insert(&CORRELATION_ID, request_id.clone());
        headers.insert(&headers::TRACEPARENT, headers::traceparent(&headers));
        if let Some(token) = &self.internal_token {
            headers.insert(&headers::INTERNAL_TOKEN, token.clone());
        }
        let path_and_query = if route.strip_prefix {
            let path = router::strip(&route.path_prefix, parts.uri.path());
            let target = match parts.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            PathAndQuery::from_maybe_shared(Bytes::from(target))
                .expect("a stripped valid target is valid")
        } else {
            // The client's own target, shared rather than copied.
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"))
        };
        Template(Head {
            method: parts.method.clone(),
            path_and_query,
            headers,
        })
    }

    /// One attempt on the next healthy endpoint.
    async fn attempt(
        &self,
        upstream_client: &UpstreamClient,
        upstream: &Upstream,
        head: Head,
        body: Option<ProxyBody>,
        retryable: bool,
    ) -> Result<Response<Incoming>, AttemptError> {
        let Some(body) = body else {
            // A streamed body went with an earlier attempt that never connected.
            return Err(AttemptError::BodyGone);
        };
        let endpoint = upstream.pick().unwrap_or(&upstream.endpoints[0]);
        let uri = endpoint
            .endpoint
            .uri(head.path_and_query)
            .expect("a checked endpoint and the request's own path make a URI");
        let mut request = Request::new(body);
        *request.method_mut() = head.method;
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = head.headers;
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        let sent = upstream_client.request(request);
        let result = match upstream.attempt_timeout {
            Some(limit) => tokio::time::timeout(limit, sent)
                .await
                .map_err(|_| AttemptError::Timeout { retryable }),
            None => Ok(sent.await),
        };
        endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
        match result? {
            Ok(response) if is_retryable_status(response.status()) => Err(AttemptError::Status {
                response,
                retryable,
            }),
            Ok(response) => Ok(response),
            Err(e) if is_body_too_large(&e) => Err(AttemptError::BodyTooLarge),
            Err(e) if e.is_connect() => Err(AttemptError::Connect(e)),
            Err(error) => Err(AttemptError::Request { error, retryable }),
        }
    }

    /// The client's answer to a call that ended in an error.
    fn failed(
        &self,
        upstream: &Upstream,
        err: Error<AttemptError>,
        in_flight: InFlight,
    ) -> Result<Response<ProxyBody>, Reply> {
        let name = upstream.name();
        let reject = |reason: &'static str, status: StatusCode, text: &str| {
            upstream.rejections.fetch_add(1, Ordering::Relaxed);
            self.metrics.rejection(name, reason);
            Reply::new(status, text).service(name)
        };
        if err.is_circuit_open() {
            let reply = reject(
                "circuit_open",
                StatusCode::SERVICE_UNAVAILABLE,
                "circuit breaker is open",
            );
            return Err(reply.retry_after(err.retry_after()));
        }
        if err.is_bulkhead_full() {
            return Err(reject(
                "bulkhead_full",
                StatusCode::SERVICE_UNAVAILABLE,
                "too many concurrent requests",
            ));
        }
        if err.is_throttled() {
            return Err(reject(
                "throttled",
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream is overloaded; request shed",
            ));
        }
        if err.is_rate_limited() {
            let reply = reject(
                "rate_limited",
                StatusCode::TOO_MANY_REQUESTS,
                "rate limit exceeded",
            );
            return Err(reply.retry_after(err.retry_after()));
        }
        let timed_out = err.is_timeout()
            || err.is_deadline_exceeded()
            || err
                .last_error()
                .is_some_and(|l| l.is_timeout() || l.is_deadline_exceeded());
        match err.into_inner() {
            Some(AttemptError::Status { response, .. }) => Ok(downstream(in_flight, response)),
            Some(AttemptError::Connect(e)) => {
                tracing::warn!(upstream = name, error = %AttemptError::Connect(e), "upstream unreachable");
                Err(Reply::new(StatusCode::BAD_GATEWAY, "upstream unreachable").service(name))
            }
            Some(e @ AttemptError::Request { .. }) => {
                tracing::warn!(upstream = name, error = %e, "upstream request failed");
                Err(Reply::new(StatusCode::BAD_GATEWAY, "upstream request failed").service(name))
            }
            Some(AttemptError::BodyGone) => {
                Err(Reply::new(StatusCode::BAD_GATEWAY, "upstream unreachable").service(name))
            }
            Some(AttemptError::BodyTooLarge) => Err(Reply::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large",
            )
            .service(name)),
            Some(AttemptError::Timeout { .. }) => {
                Err(Reply::new(StatusCode::GATEWAY_TIMEOUT, "upstream timed out").service(name))
            }
            None if timed_out => {
                Err(Reply::new(StatusCode::GATEWAY_TIMEOUT, "upstream timed out").service(name))
            }
            None => Err(Reply::new(StatusCode::BAD_GATEWAY, "upstream failed").service(name)),
        }
    }
}

/// The upstream's response on its way to the client: hop-by-hop headers
/// out, body streamed, the upstream's in-flight count held until it ends.
fn downstream(in_flight: InFlight, response: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, incoming) = response.into_parts();
    let upgrade = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    let body = Tracked {
        inner: incoming,
        _in_flight: in_flight,
    };
    Response::from_parts(parts, body.boxed())
}

#[derive(Debug)]
struct Access<'a> {
    route: &'a Arc<String>,
    upstream: &'a Arc<String>,
    attempts: u32,
}

/// The upstream request head of one attempt.
#[derive(Debug, Clone)]
struct Head {
    method: Method,
    path_and_query: PathAndQuery,
    headers: HeaderMap,
}

/// The head every attempt repeats; each adds the deadline it has left.
#[derive(Debug)]
struct Template(Head);

impl Template {
    fn head(&self, remaining: Option<Duration>) -> Head {
        let mut head = self.0.clone();
        if let Some(left) = remaining {
            let ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
            head.headers
                .insert(&headers::DEADLINE_MS, HeaderValue::from(ms));
        }
        head
    }
}

/// Joins the client's and the upstream's upgraded connections.
fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(error = %e, "upgraded connection ended");
        }
    });
}

/// Counts a request in its upstream's `in_flight` until dropped.
#[derive(Debug)]
struct InFlight(Arc<Upstream>);

impl InFlight {
    fn new(upstream: &Arc<Upstream>) -> Self {
        upstream.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(upstream.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An upstream body, counted in flight until it ends or the client goes.
struct Tracked {
    inner: Incoming,
    _in_flight: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An answer the gateway writes itself: a JSON error.
#[derive(Debug)]
pub struct Reply {
    status: StatusCode,
    message: String,
    service: Option<String>,
    retry_after: Option<Duration>,
}

impl Reply {
    /// An error answer.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Reply {
            status,
            message: message.into(),
            service: None,
            retry_after: None,
        }
    }

    fn service(mut self, name: &str) -> Self {
        self.service = Some(name.to_owned());
        self
    }

    fn retry_after(mut self, after: Option<Duration>) -> Self {
        self.retry_after = after;
        self
    }

    /// The JSON response.
    pub fn into_response(self, request_id: &HeaderValue) -> Response<ProxyBody> {
        let json = serde_json::json!({
            "error": self.message,
            "service": self.service,
            "request_id": request_id.to_str().unwrap_or(""),
            "timestamp": tidegate_client::clock::now_rfc3339(),
        });
        let mut response = Response::new(body::full(json.to_string()));
        *response.status_mut() = self.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up, at least 1.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}
