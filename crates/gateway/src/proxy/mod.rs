//! The proxy: one request from the client, through the route's edge
//! policy (API key, tiers, rate limits, faults) and its upstream's
//! policies, to an endpoint and back, with the route's fallback when the
//! upstream fails.
//!
//! What a request needs is one [`Table`], built from a config and swapped
//! whole on reload: a request keeps the table it started with.

pub mod admission;
pub mod client;
pub mod compose;
pub mod deadline;
pub mod fallback;
pub mod grpc;
pub mod h1;
pub mod health;
pub mod pool;
pub mod router;
pub mod tls;
pub mod upstream;

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, Entry, HeaderValue};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tidegate_resilience::{rng, Attempt, Error};
use tokio::time::Instant;

use self::admission::{Counters, Credential, Edge, Exceeded, Refusal, Slot};
use self::client::{ClientError, UpstreamBody, UpstreamClient, UpstreamResponse};
use self::fallback::{self as fallbacks, FALLBACK};
use self::pool::{Gates, PoolGate};
use self::router::{Route, Router};
use self::upstream::{AttemptError, EndpointState, Upstream, Verdict};
use crate::config::{
    Config, EscapedSlashes, Fallback, GatewaySettings, RouteConfig, Target, Underscores,
};
use crate::http::body::{self, is_body_too_large, ClientBody, ProxyBody, RequestBody};
use crate::http::codec::field;
use crate::http::fields::{self, Arrived, ClientRequest};
use crate::http::h1::OnUpgrade;
use crate::http::headers::{self, OwnValue, CORRELATION_ID};
use crate::http::path;
use crate::observe::alerts::{Alert, Alerter};
use crate::observe::metrics::{method_label, Answered, Metrics};
use crate::observe::notices::{Notice, Notices};
use crate::observe::stats::{Stats, Traffic};
use crate::observe::telemetry::{Attributes, Kind, Span, Telemetry};
use tidegate_client::headers::is_retryable_status;
use tidegate_client::headers::TraceIds;

/// Everything a request needs from one config: settings, routes,
/// upstreams with their state, keys and tiers.
#[derive(Debug)]
pub struct Table {
    /// `[gateway]` as this config has it; the per-request limits apply at once.
    pub settings: GatewaySettings,
    /// The routes.
    pub router: Router,
    /// The upstreams, in config order.
    pub upstreams: Vec<Arc<Upstream>>,
    /// API keys and tiers.
    pub edge: Edge,
    internal_token: Option<HeaderValue>,
    /// SHA-256 of the admin token, when `gateway.admin_token_env` names one.
    admin_token: Option<[u8; 32]>,
    /// `[alerts]`.
    pub alerts: crate::config::Alerts,
    /// `[[sagas]]` (their calls index into `upstreams`).
    pub sagas: Arc<Vec<crate::config::SagaConfig>>,
    /// The config in effect, redacted, for `GET /config`.
    pub effective: Arc<serde_json::Value>,
}

/// The gateway: the current [`Table`] and what outlives reloads (client,
/// metrics, notices, rate-limit counts).
#[derive(Debug)]
pub struct Gateway {
    /// `[gateway]` as the gateway started; listeners and connection
    /// settings keep these until a restart.
    pub settings: GatewaySettings,
    table: ArcSwap<Table>,
    /// Counts the tables put in use: a connection that keeps the table it
    /// served its last request from reads this, not the table, to see
    /// whether it is still the one in use.
    generation: AtomicU64,
    client: UpstreamClient,
    /// Connection-pool gates by endpoint, for every client's connector.
    gates: Gates,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// State changes, for `/events` and logs.
    pub notices: Notices,
    /// Traffic history and breaker timeline, for the dashboard.
    pub stats: Stats,
    /// Queues webhook alerts.
    pub alerter: Alerter,
    /// The alert queue, until the dispatcher takes it.
    alert_queue: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Alert>>>,
    /// Rate-limit and concurrency counts, kept across reloads.
    pub counters: Arc<Counters>,
    /// The `none` label of requests no route matched.
    none: Arc<String>,
    /// The event store and its API, with `[events]`.
    events: std::sync::OnceLock<Arc<crate::events::Events>>,
    /// The main listener's TLS, with `[gateway.tls]`.
    tls: Option<Arc<crate::http::tls::ListenerTls>>,
    /// The tracer, with `[telemetry]`.
    telemetry: Option<Arc<Telemetry>>,
}

/// Sets `tidegate_endpoint_healthy` for every endpoint of `table`.
fn report_endpoints(metrics: &Metrics, table: &Table) {
    for u in &table.upstreams {
        for e in &u.endpoints {
            metrics.endpoint_healthy(u.name(), &e.label, e.is_healthy());
        }
    }
}

/// The gates of `table`'s upstreams by endpoint; an endpoint listed by
/// two upstreams is held to the first one's limits.
fn gates_of(table: &Table) -> HashMap<http::uri::Authority, Arc<PoolGate>> {
    let mut gates = HashMap::new();
    for u in &table.upstreams {
        for e in &u.endpoints {
            gates
                .entry(e.endpoint.authority.clone())
                .or_insert_with(|| u.gate.clone());
        }
    }
    gates
}

/// Reads a token from the environment variable `var` (named by config key
/// `key`); it must be set and be a valid header value.
fn token_from_env(var: Option<&String>, key: &str) -> Result<Option<HeaderValue>, String> {
    let Some(var) = var else {
        return Ok(None);
    };
    match std::env::var(var) {
        Ok(token) if !token.is_empty() => HeaderValue::from_str(&token)
            .map(Some)
            .map_err(|_| format!("environment variable {var} is not a valid header value")),
        _ => Err(format!(
            "environment variable {var} (gateway.{key}) is not set"
        )),
    }
}

impl Table {
    /// The table of `config`. Upstreams whose config is unchanged from
    /// `previous` keep their state (breaker, limiter, health, ejections);
    /// routes whose stale fallback is unchanged keep their answers.
    pub fn build(
        config: Config,
        previous: Option<&Table>,
        counters: Arc<Counters>,
    ) -> Result<Self, String> {
        let internal_token = token_from_env(
            config.gateway.internal_token_env.as_ref(),
            "internal_token_env",
        )?;
        let admin_token =
            token_from_env(config.gateway.admin_token_env.as_ref(), "admin_token_env")?
                .map(|token| Sha256::digest(token.as_bytes()).into());
        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        for u in config.upstreams {
            let kept = previous
                .and_then(|p| p.upstreams.iter().find(|old| old.config == u))
                .cloned();
            let upstream = match kept {
                Some(old) => old,
                None => {
                    let name = u.name.clone();
                    Upstream::new(u).map_err(|e| format!("upstreams `{name}`: {e}"))?
                }
            };
            upstreams.push(upstream);
        }
        let router = Router::new(config.routes, |route| {
            let Some(Fallback::Stale {
                max_age,
                max_entries,
                max_entry_bytes,
            }) = route.fallback
            else {
                return None;
            };
            let kept = previous
                .and_then(|p| {
                    p.router
                        .routes()
                        .iter()
                        .find(|r| r.config.name == route.name)
                })
                .and_then(|r| r.stale.clone())
                .filter(|c| c.has_settings(max_age, max_entries, max_entry_bytes));
            Some(kept.unwrap_or_else(|| {
                fallbacks::StaleCache::new(max_age, max_entries, max_entry_bytes)
            }))
        });
        Ok(Table {
            edge: Edge::new(config.api_keys, &config.rate_limit, counters),
            settings: config.gateway,
            router,
            upstreams,
            internal_token,
            admin_token,
            alerts: config.alerts,
            sagas: Arc::new(config.sagas),
            effective: config.effective,
        })
    }

    /// Whether `presented` is the admin token; false when none is configured.
    pub fn is_admin_token(&self, presented: &[u8]) -> bool {
        let Some(expected) = &self.admin_token else {
            return false;
        };
        let digest: [u8; 32] = Sha256::digest(presented).into();
        admission::constant_time_eq(&digest, expected)
    }

    /// Whether the admin API's write endpoints are enabled.
    pub fn has_admin_token(&self) -> bool {
        self.admin_token.is_some()
    }

    /// The upstream named `name`.
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.name() == name)
    }
}

impl Gateway {
    /// Builds the run-time state of a validated config. The internal token is
    /// read from the environment variable the config names.
    pub fn new(config: Config) -> Result<Arc<Self>, String> {
        let counters = Counters::new(&config.rate_limit)?;
        let settings = config.gateway.clone();
        let tls = match &settings.tls {
            Some(tls) => Some(Arc::new(
                crate::http::tls::ListenerTls::new(tls).map_err(|e| e.to_string())?,
            )),
            None => None,
        };
        let metrics = Arc::new(Metrics::default());
        let telemetry = config
            .telemetry
            .clone()
            .map(|settings| Arc::new(Telemetry::new(settings, metrics.span_counters())));
        let table = Table::build(config, None, counters.clone())?;
        let gates: Gates = Arc::new(ArcSwap::from_pointee(gates_of(&table)));
        report_endpoints(&metrics, &table);
        let (alerter, alert_queue) = Alerter::new();
        Ok(Arc::new(Gateway {
            alerter,
            alert_queue: std::sync::Mutex::new(Some(alert_queue)),
            settings,
            table: ArcSwap::from_pointee(table),
            generation: AtomicU64::new(0),
            client: UpstreamClient::new(gates.clone(), metrics.upstream_tls_failures()),
            gates,
            metrics,
            notices: Notices::default(),
            stats: Stats::default(),
            counters,
            none: Arc::new("none".to_owned()),
            events: std::sync::OnceLock::new(),
            tls,
            telemetry,
        }))
    }

    /// The main listener's TLS, with `[gateway.tls]`.
    pub fn tls(&self) -> Option<&Arc<crate::http::tls::ListenerTls>> {
        self.tls.as_ref()
    }

    /// The tracer, with `[telemetry]`.
    pub fn telemetry(&self) -> Option<&Arc<Telemetry>> {
        self.telemetry.as_ref()
    }

    /// The event store and its settings, when `[events]` is configured.
    pub fn events(&self) -> Option<&Arc<crate::events::Events>> {
        self.events.get()
    }

    /// Sets the event service, once, as the gateway starts.
    pub fn set_events(&self, events: Arc<crate::events::Events>) {
        let _ = self.events.set(events);
    }

    /// The queue of alerts for [`crate::observe::alerts::dispatch`]; `None` once taken.
    pub fn take_alert_queue(&self) -> Option<tokio::sync::mpsc::Receiver<Alert>> {
        self.alert_queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The table requests use now.
    pub fn table(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// Puts `table` in use for new requests; requests under way keep theirs.
    pub fn swap(&self, table: Table) {
        report_endpoints(&self.metrics, &table);
        self.gates.store(Arc::new(gates_of(&table)));
        self.table.store(Arc::new(table));
        // After the store: whoever sees the new count loads the new table.
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The table in use, to keep between requests (see [`Gateway::kept_table`]).
    pub fn keep_table(&self) -> KeptTable {
        // The count first: a table stored after it is found at the next look.
        let generation = self.generation.load(Ordering::Acquire);
        KeptTable {
            generation,
            table: self.table(),
        }
    }

    /// The table in use, from `kept` unless the generation has moved on
    /// since it was kept (then `kept` takes the new one): a connection's
    /// requests take no locked operation for their table (a load takes
    /// four) until a reload.
    pub fn kept_table<'k>(&self, kept: &'k mut KeptTable) -> &'k Table {
        if self.generation.load(Ordering::Acquire) != kept.generation {
            *kept = self.keep_table();
        }
        &kept.table
    }

    /// A new pooled client for upstream requests (one per worker thread).
    pub fn new_client(&self) -> UpstreamClient {
        UpstreamClient::new(self.gates.clone(), self.metrics.upstream_tls_failures())
    }

    /// The HTTP client of health checks and of requests served on the
    /// caller's runtime (worker threads have their own).
    pub fn client(&self) -> &UpstreamClient {
        &self.client
    }

    /// Answers one client request from `client` by `table` (the one in
    /// use when it came), sending upstream requests through
    /// `upstream_client`.
    pub async fn handle(
        &self,
        table: &Table,
        mut req: Box<ClientRequest>,
        client: SocketAddr,
        upstream_client: &UpstreamClient,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let request_id = OwnValue::request_id(req.correlation_id());
        let method = req.request.method().clone();
        // Every gRPC call is a POST: other requests need no header lookup.
        let grpc = method == Method::POST && grpc::is_grpc(req.field(&header::CONTENT_TYPE));
        let mut log = Access {
            route: &self.none,
            upstream: &self.none,
            traffic: None,
            upstream_failed: false,
            attempts: 0,
            key_id: None,
            fallback: None,
            span: None,
            breaker: None,
            answered_at: None,
            start,
        };
        let span = self.telemetry.as_ref().map(|telemetry| {
            let headers = req.map();
            let span = telemetry.begin(headers.get(&headers::TRACEPARENT));
            // The upstream hop is this span's child.
            headers.insert(&headers::TRACEPARENT, span.traceparent());
            span
        });
        log.span = span.and_then(|s| s.recorded());
        let path = span
            .filter(Span::is_recorded)
            .map(|_| req.request.uri().path().to_owned());
        let mut response = match self
            .route_and_forward(
                table,
                req,
                client,
                upstream_client,
                &request_id,
                grpc,
                &mut log,
            )
            .await
        {
            Ok(response) => response,
            Err(reply) if grpc => reply.into_grpc_response(),
            Err(reply) => reply.into_response(&request_id),
        };
        fields::set(&mut response, &CORRELATION_ID, request_id.clone());
        let status = response.status();
        // The upstream's answer is the client's unless a fallback came
        // after it: then the clock is read again.
        let answered_at = log
            .answered_at
            .filter(|_| log.fallback.is_none())
            .unwrap_or_else(Instant::now);
        let elapsed = answered_at.saturating_duration_since(start);
        if let Some(traffic) = log.traffic {
            traffic.record(log.upstream_failed, elapsed);
        }
        if let Some(kind) = log.fallback {
            self.metrics.fallback(log.route, kind);
        }
        if let (Some(telemetry), Some(span), Some(path)) = (&self.telemetry, span, path) {
            telemetry.end(
                span,
                format!("{method} {}", log.route),
                Kind::Server,
                server_attributes(&method, path, client, &log, status, grpc),
                status
                    .is_server_error()
                    .then(|| format!("answered {}", status.as_u16())),
            );
        }
        // The access line is written when the body has gone (or the client
        // has): a streamed answer's duration is the stream's.
        let line = tracing::enabled!(target: ACCESS, tracing::Level::INFO).then(|| AccessLine {
            request_id,
            method: method.clone(),
            route: log.route.clone(),
            upstream: log.upstream.clone(),
            attempts: log.attempts,
            status: status.as_u16(),
            start,
            ttfb: elapsed,
            api_key_id: log.key_id,
            fallback: log.fallback,
        });
        self.metrics.answered(
            Answered {
                route: log.route,
                upstream: log.upstream,
                method: method_label(&method),
                status: status.as_u16(),
            },
            elapsed.as_secs_f64(),
            log.attempts,
        );
        match line {
            Some(line) => response.map(|body| {
                body.wrap(|inner| Logged {
                    inner,
                    line: Some(line),
                    ended: false,
                })
            }),
            None => response,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn route_and_forward<'t>(
        &self,
        table: &'t Table,
        mut req: Box<ClientRequest>,
        client: SocketAddr,
        upstream_client: &UpstreamClient,
        request_id: &OwnValue,
        grpc: bool,
        log: &mut Access<'t>,
    ) -> Result<Response<ProxyBody>, Reply> {
        if req.request.method() == Method::CONNECT {
            return Err(Reply::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported: this is not an open proxy",
            ));
        }
        if grpc || table.router.matches_fields() {
            req.map();
        }
        let version = req.request.version();
        let (host, more) = match &req.fields {
            Some(fields) => fields.host(),
            None => {
                let mut hosts = headers::values(req.request.headers(), &header::HOST);
                (
                    hosts.next().map(HeaderValue::as_bytes),
                    hosts.next().is_some(),
                )
            }
        };
        let valid_host = has_valid_host(version, host, more);
        if !valid_host {
            // RFC 9112 §3.2: which host was meant is not clear.
            return Err(Reply::malformed(
                "a request needs one valid Host header (HTTP/1.1: exactly one)",
            ));
        }
        let ClientRequest {
            request: mut req,
            mut fields,
        } = *req;
        let target_len = req.uri().path_and_query().map_or(1, |p| p.as_str().len())
            + req.uri().authority().map_or(0, |a| a.as_str().len());
        if target_len > table.settings.max_uri_bytes {
            return Err(Reply::new(
                StatusCode::URI_TOO_LONG,
                "request target too long",
            ));
        }
        // The client's side of a WebSocket handshake, joined once the
        // upstream completes it; any other upgrade is not passed on. Only
        // a request whose connection can be handed over (its connection
        // marked it, as an HTTP/1.1 request with `Upgrade`, whose fields
        // are in its map) is read for one.
        let mut websocket = req
            .extensions()
            .get::<OnUpgrade>()
            .and_then(|_| headers::websocket_key(req.method(), req.version(), req.headers()));
        let mut upgrade = websocket
            .as_ref()
            .and_then(|_| req.extensions_mut().remove::<OnUpgrade>());
        let (mut parts, incoming) = req.into_parts();
        // Routing, API-key checks and the upstream see one path and one set of headers.
        normalize_path(&mut parts.uri, table.settings.escaped_slashes)?;
        headers_with_underscores(&mut parts.headers, table.settings.headers_with_underscores)?;
        let Some(route) = table.router.route(&parts) else {
            return Err(Reply::new(
                StatusCode::NOT_FOUND,
                "no route matches this request",
            ));
        };
        log.route = &route.label;
        if route.reads_fields {
            fields::into_map(&mut fields, &mut parts.headers);
        }
        let upstream = match &route.config.target {
            Target::Compose(composition) => {
                drop(incoming);
                let credential = self.credential(table, &parts.headers, fields.as_ref(), log);
                let admission = self
                    .admit(table, route, &parts, credential, client, None)
                    .await?;
                let mut response = self
                    .compose(
                        table,
                        composition,
                        &route.config,
                        parts,
                        credential,
                        client,
                        upstream_client,
                        request_id,
                        log,
                    )
                    .await?;
                add_limits(&mut response, admission.decision.as_ref());
                return Ok(response);
            }
            target => &table.upstreams[pick_target(target)],
        };
        if upstream.may_be_http2() {
            // HTTP/2 has no Upgrade (RFC 9113 §8.6): a plain request.
            (websocket, upgrade) = (None, None);
        }
        log.upstream = &upstream.label;
        log.traffic = Some(&upstream.traffic);
        let credential = self.credential(table, &parts.headers, fields.as_ref(), log);
        // (A valid key's tier may have limits of its own on any route.)
        let admission = if route.admits_anonymous && !matches!(credential, Credential::Valid(..)) {
            admission::Admission::default()
        } else {
            self.admit(table, route, &parts, credential, client, Some(upstream))
                .await?
        };
        let in_flight = InFlight::new(upstream, admission.slot);

        let max_body = route
            .config
            .max_body_bytes
            .unwrap_or(table.settings.max_body_bytes);
        // The declared length, as the body's framing read it (from
        // `Content-Length`; none for a chunked body).
        let declared = incoming.size_hint().exact();
        if declared.is_some_and(|n| n > max_body) {
            return Err(
                Reply::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
                    .service(upstream.name()),
            );
        }
        // A gRPC call may be a stream the client feeds as answers come.
        let mut body = if incoming.is_end_stream() {
            RequestBody::empty()
        } else {
            read_body(incoming, &table.settings, max_body, !grpc)
                .await
                .map_err(|reply| reply.service(upstream.name()))?
        };
        let stale_key = match (&route.stale, &parts.method) {
            (Some(_), &Method::GET) => Some(fallbacks::key(
                parts.uri.path_and_query().map_or("/", |p| p.as_str()),
                log.key_id.as_deref(),
                &parts.headers,
            )),
            _ => None,
        };
        let idempotent = headers::is_idempotent(&parts.method)
            || parts.headers.contains_key(&headers::IDEMPOTENCY_KEY)
            || fields
                .as_ref()
                .is_some_and(|f| f.get(&headers::IDEMPOTENCY_KEY).is_some());
        // A gRPC call's own deadline bounds the policy's; each attempt
        // tells the upstream what is left of it.
        let limit = if grpc {
            let limit = grpc::timeout(&parts.headers);
            parts.headers.remove(&grpc::TIMEOUT);
            limit
        } else {
            None
        };
        let template = self.upstream_head(
            table,
            &mut parts,
            fields,
            &route.config,
            credential,
            client,
            request_id,
            upgrade.is_some(),
            upstream.may_be_http2(),
        );
        let call = Call {
            upstream_client,
            template: &template,
            idempotent,
            grpc,
            limit,
            span: log.span,
        };
        let result = if upstream.has_available_endpoint() {
            self.forward(&call, upstream, &mut body, log).await
        } else {
            upstream.rejections.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .rejection(upstream.name(), "no_healthy_endpoint");
            Err(Error::inner_error(AttemptError::NoEndpoint))
        };
        let upstream_failed = match &result {
            Ok(response) => response.status().is_server_error(),
            Err(err) => {
                self.count_rejection(upstream, err);
                !matches!(err.inner(), Some(AttemptError::BodyTooLarge))
            }
        };
        log.upstream_failed = upstream_failed;
        if log.span.is_some() {
            log.breaker = upstream
                .pipeline
                .circuit_breaker()
                .map(|b| b.state().as_str());
        }
        if upstream_failed {
            if let Some(mut response) = self
                .fallback(table, route, &call, &mut body, stale_key.as_deref(), log)
                .await
            {
                add_limits(&mut response, admission.decision.as_ref());
                return Ok(response);
            }
        }
        let mut response = match result {
            Ok(response) => response,
            Err(err) => {
                let answer = self.failed(upstream, err)?;
                let mut response = downstream(in_flight, *answer);
                add_limits(&mut response, admission.decision.as_ref());
                return Ok(response);
            }
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            match (upgrade, &websocket) {
                (Some(client_side), Some(key))
                    if headers::accepts_websocket(response.headers(), key) =>
                {
                    tunnel(client_side, hyper::upgrade::on(&mut *response));
                }
                // Nothing is tunnelled; the upstream connection closes with the answer.
                _ => {
                    tracing::warn!(
                        upstream = upstream.name(),
                        "upstream answered 101 without completing a WebSocket handshake"
                    );
                    log.upstream_failed = true;
                    return Err(Reply::new(
                        StatusCode::BAD_GATEWAY,
                        "upstream switched protocols without a valid WebSocket handshake",
                    )
                    .service(upstream.name()));
                }
            }
        }
        let mut response = downstream(in_flight, *response);
        if let (Some(cache), Some(key)) = (&route.stale, stale_key) {
            response = cache.record(key, response);
        }
        add_limits(&mut response, admission.decision.as_ref());
        Ok(response)
    }

    /// The API key of a request with `headers` and `fields`, as the edge
    /// sees it (noted in the log).
    fn credential<'t>(
        &self,
        table: &'t Table,
        headers: &HeaderMap,
        fields: Option<&Arrived>,
        log: &mut Access<'_>,
    ) -> Credential<'t> {
        let credential = match fields {
            _ if !table.edge.has_keys() => Credential::Anonymous,
            Some(fields) => table.edge.authenticate_by(|name| fields.get(name)),
            None => table.edge.authenticate(headers),
        };
        if let Credential::Valid(key, _) = credential {
            log.key_id = Some(key.id.clone());
        }
        credential
    }

    /// The route's key requirement, limits and injected faults; `upstream`
    /// is the route's own (a composition route has none).
    async fn admit(
        &self,
        table: &Table,
        route: &Route,
        parts: &http::request::Parts,
        credential: Credential<'_>,
        client: SocketAddr,
        upstream: Option<&Upstream>,
    ) -> Result<admission::Admission, Reply> {
        let admission = table
            .edge
            .admit(
                &route.config,
                credential,
                client.ip(),
                &parts.headers,
                &self.metrics,
            )
            .await
            .map_err(|refusal| self.refused(refusal, upstream))?;
        if let Some(fault) = &route.config.fault {
            if let Some(delay) = fault.delay {
                if rng::unit() * 100.0 < fault.delay_percent {
                    self.metrics.fault(&route.label, "delay");
                    tokio::time::sleep(delay).await;
                }
            }
            if let Some(status) = fault.abort_status {
                if rng::unit() * 100.0 < fault.abort_percent {
                    self.metrics.fault(&route.label, "abort");
                    let status = StatusCode::from_u16(status).expect("checked by the config");
                    let reply = Reply::new(status, "fault injected");
                    return Err(match upstream {
                        Some(upstream) => reply.service(upstream.name()),
                        None => reply,
                    });
                }
            }
        }
        Ok(admission)
    }

    /// Sends the request through `upstream`'s policies, its call begun
    /// at `log.start`.
    async fn forward(
        &self,
        call: &Call<'_>,
        upstream: &Upstream,
        body: &mut RequestBody,
        log: &mut Access<'_>,
    ) -> Result<UpstreamResponse, Error<AttemptError>> {
        let attempts = AtomicU32::new(0);
        // The endpoints this request's attempts went to, bit by bit.
        let tried = AtomicU64::new(0);
        let replayable = body.is_replayable();
        let op = |attempt: Attempt| {
            // Only this request's task counts them: a load and a store, no
            // locked add (atomic only for the future to be `Send`).
            attempts.store(attempts.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            let extra = call.attempt_lines(attempt.number(), attempt.remaining_at_start());
            self.attempt(
                call,
                upstream,
                extra,
                body.take(),
                replayable,
                attempt,
                &tried,
            )
        };
        let (result, ended) = upstream
            .pipeline
            .call_timed_within(log.start, call.limit, op, |_, _, _| {})
            .await;
        log.attempts += attempts.load(Ordering::Relaxed);
        log.answered_at = ended.filter(|_| result.is_ok());
        result
    }

    /// The route's fallback answer, if it has one that can answer now.
    async fn fallback(
        &self,
        table: &Table,
        route: &Route,
        call: &Call<'_>,
        body: &mut RequestBody,
        stale_key: Option<&str>,
        log: &mut Access<'_>,
    ) -> Option<Response<ProxyBody>> {
        let response = match route.config.fallback.as_ref()? {
            Fallback::Static {
                status,
                content_type,
                body,
            } => fallbacks::fixed(*status, content_type, body),
            Fallback::Stale { .. } => route.stale.as_ref()?.serve(stale_key?)?,
            Fallback::Upstream(index) => {
                let other = &table.upstreams[*index];
                if !other.has_available_endpoint() {
                    return None;
                }
                let in_flight = InFlight::new(other, None);
                // The fallback's call starts when the first one has failed.
                log.start = Instant::now();
                let response = self.forward(call, other, body, log).await.ok()?;
                if response.status().is_server_error() {
                    return None;
                }
                let mut response = downstream(in_flight, *response);
                response
                    .headers_mut()
                    .insert(&FALLBACK, HeaderValue::from_static("upstream"));
                response
            }
        };
        log.fallback = route.config.fallback.as_ref().map(Fallback::kind);
        Some(response)
    }

    /// Sends a call the gateway makes on its own behalf through
    /// `upstream`'s policies (none when no endpoint is healthy); the
    /// result and the attempts it took.
    async fn on_behalf(
        &self,
        call: &Call<'_>,
        upstream: &Arc<Upstream>,
        body: &mut RequestBody,
    ) -> (Result<UpstreamResponse, Error<AttemptError>>, u32) {
        let mut log = Access {
            route: &self.none,
            upstream: &upstream.label,
            traffic: Some(&upstream.traffic),
            upstream_failed: false,
            attempts: 0,
            key_id: None,
            fallback: None,
            span: call.span,
            breaker: None,
            answered_at: None,
            start: Instant::now(),
        };
        let result = if upstream.has_available_endpoint() {
            self.forward(call, upstream, body, &mut log).await
        } else {
            self.metrics
                .rejection(upstream.name(), "no_healthy_endpoint");
            Err(Error::inner_error(AttemptError::NoEndpoint))
        };
        (result, log.attempts)
    }

    /// A whole exchange the gateway makes on its own behalf (a part of a
    /// composition route, a saga's step): `method path` with `headers` and
    /// `body` through `upstream`'s policies, retried by them as an
    /// idempotent request, bounded by `limit`; the answer read whole, up
    /// to `max_bytes`. A call the gateway could not complete is the error
    /// it would have answered.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn exchange(
        &self,
        upstream_client: &UpstreamClient,
        upstream: &Arc<Upstream>,
        method: Method,
        path_and_query: PathAndQuery,
        headers: HeaderMap,
        body: Bytes,
        limit: Duration,
        max_bytes: usize,
        span: Option<TraceIds>,
    ) -> (Result<(StatusCode, HeaderMap, Bytes), Reply>, u32) {
        let template = Template::plain(Head {
            method,
            path_and_query,
            headers,
        });
        let call = Call {
            upstream_client,
            template: &template,
            idempotent: true,
            grpc: false,
            limit: Some(limit),
            span,
        };
        let mut body = RequestBody::Replayable {
            data: body,
            trailers: None,
        };
        let in_flight = InFlight::new(upstream, None);
        let start = Instant::now();
        let (result, attempts) = self.on_behalf(&call, upstream, &mut body).await;
        let mut response = match result {
            Ok(response) => response,
            Err(err) => {
                self.count_rejection(upstream, &err);
                match self.failed(upstream, err) {
                    Ok(response) => response,
                    Err(reply) => {
                        upstream.traffic.record(true, start.elapsed());
                        return (Err(reply), attempts);
                    }
                }
            }
        };
        fields::materialize(&mut response);
        let (parts, incoming) = response.into_parts();
        let read = http_body_util::Limited::new(incoming, max_bytes)
            .collect()
            .await;
        upstream.traffic.record(
            parts.status.is_server_error() || read.is_err(),
            start.elapsed(),
        );
        drop(in_flight);
        let outcome = match read {
            Ok(read) => Ok((parts.status, parts.headers, read.to_bytes())),
            Err(_) => Err(Reply::new(
                StatusCode::BAD_GATEWAY,
                "the answer broke off or is too large",
            )
            .service(upstream.name())),
        };
        (outcome, attempts)
    }

    /// A call the gateway makes on its own behalf (an event pushed to a
    /// subscriber): `POST path` with `headers` and `body` through
    /// `upstream`'s policies (breaker, bulkhead, limits, timeout), never
    /// sent twice once it may have arrived, bounded by `limit`. The
    /// answer's body is read (a little of it) and dropped, so the
    /// connection serves the next call.
    pub(crate) async fn call_upstream(
        &self,
        upstream: &Arc<Upstream>,
        path: PathAndQuery,
        headers: HeaderMap,
        body: Bytes,
        limit: Duration,
        span: Option<TraceIds>,
    ) -> Called {
        let template = Template::plain(Head {
            method: Method::POST,
            path_and_query: path,
            headers,
        });
        let call = Call {
            upstream_client: &self.client,
            template: &template,
            idempotent: false,
            grpc: false,
            limit: Some(limit),
            span,
        };
        let mut body = RequestBody::Replayable {
            data: body,
            trailers: None,
        };
        let in_flight = InFlight::new(upstream, None);
        let start = Instant::now();
        let (result, _) = self.on_behalf(&call, upstream, &mut body).await;
        // On the upstream's card like any request: a failure is an error
        // or a 5xx.
        let failed = match &result {
            Ok(response) => response.status().is_server_error(),
            Err(_) => true,
        };
        upstream.traffic.record(failed, start.elapsed());
        let answered = |mut response: UpstreamResponse| async move {
            fields::materialize(&mut response);
            let status = response.status();
            let retry_after = headers::retry_after(response.headers());
            // Enough of the body to finish a small answer.
            let _ = http_body_util::Limited::new(response.into_body(), 64 * 1024)
                .collect()
                .await;
            Called::Answered {
                status,
                retry_after,
            }
        };
        let called = match result {
            Ok(response) => answered(response).await,
            Err(err) => {
                self.count_rejection(upstream, &err);
                let refused = err.is_circuit_open()
                    || err.is_bulkhead_full()
                    || err.is_throttled()
                    || err.is_rate_limited()
                    || matches!(err.inner(), Some(AttemptError::PoolOverflow));
                let retry_after = err.retry_after();
                if refused {
                    Called::Refused { retry_after }
                } else {
                    match err.into_inner() {
                        Some(AttemptError::Status { response, .. }) => answered(response).await,
                        // Nothing left the gateway.
                        Some(
                            e @ (AttemptError::Connect(_)
                            | AttemptError::Tls(_)
                            | AttemptError::NoEndpoint),
                        ) => Called::NotSent(e.to_string()),
                        Some(e) => Called::Failed(e.to_string()),
                        None => Called::Failed("timed out".to_owned()),
                    }
                }
            }
        };
        drop(in_flight);
        called
    }

    /// The answer to a request the edge refused.
    fn refused(&self, refusal: Refusal, upstream: Option<&Upstream>) -> Reply {
        match refusal {
            Refusal::Unauthenticated(why) => {
                let mut reply = Reply::new(StatusCode::UNAUTHORIZED, why);
                reply.headers.push((
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tidegate\""),
                ));
                reply
            }
            Refusal::Forbidden => Reply::new(
                StatusCode::FORBIDDEN,
                "this API key's tier may not use this route",
            ),
            Refusal::Limited(decision, which) => {
                let mut reply = Reply::new(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded")
                    .retry_after(decision.retry_after);
                if let Some(upstream) = upstream {
                    upstream.rejections.fetch_add(1, Ordering::Relaxed);
                    upstream.traffic.rate_limited();
                    self.metrics.rejection(upstream.name(), which.reason());
                    reply = reply.service(upstream.name());
                }
                // A concurrency limit has no window to report.
                if which != Exceeded::Concurrency {
                    reply.headers.extend(admission::headers(&decision));
                }
                reply
            }
            Refusal::StoreUnavailable => {
                let reply = Reply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "rate limits cannot be checked now",
                )
                .retry_after(Some(Duration::from_secs(1)));
                match upstream {
                    Some(upstream) => {
                        upstream.rejections.fetch_add(1, Ordering::Relaxed);
                        self.metrics
                            .rejection(upstream.name(), "rate_limit_store_unavailable");
                        reply.service(upstream.name())
                    }
                    None => reply,
                }
            }
        }
    }

    /// The upstream request head, minus body and deadline: the client's
    /// fields (those that came as they were, `fields`, and those in its
    /// map) but hop-by-hop ones and its copies of the gateway's own, then
    /// the gateway's. Takes the method and header map out of `parts`.
    #[allow(clippy::too_many_arguments)]
    fn upstream_head(
        &self,
        table: &Table,
        parts: &mut http::request::Parts,
        mut fields: Option<Arrived>,
        route: &RouteConfig,
        credential: Credential<'_>,
        client: SocketAddr,
        request_id: &OwnValue,
        upgrade: bool,
        http2: bool,
    ) -> Template {
        if http2 {
            // hyper writes the header map alone.
            fields::into_map(&mut fields, &mut parts.headers);
        }
        let mut headers = std::mem::take(&mut parts.headers);
        // HTTP/2 lets `TE: trailers` through (gRPC servers look for it).
        let trailers = http2 && headers::has_token(&headers, header::TE, "trailers");
        headers::strip_hop_by_hop(&mut headers, upgrade);
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        if parts.version == Version::HTTP_2 {
            // An HTTP/1.1 client sends one `Cookie` (RFC 6265 §5.4).
            headers::join_cookies(&mut headers);
        }
        // The gateway's own fields are written after the client's, from
        // `lines` (no map entry for each): a client's copy of one never
        // passes, and its `x-forwarded-for` chain is continued.
        let (mut parent, mut chain) = (None, Vec::new());
        if let Some(fields) = &mut fields {
            fields.strip_hop_by_hop();
            if fields.may_have_own() {
                (parent, chain) = take_own_arrived(fields);
            }
        }
        let mut present = 0u16;
        for name in headers.keys() {
            // Each of them begins `x` or `t`: other fields are passed by
            // in a byte, and the comparisons stay out of line.
            if matches!(name.as_str().as_bytes()[0], b'x' | b't') {
                present |= own_bit(name.as_str().as_bytes());
            }
        }
        if present != 0 {
            (parent, chain) = take_own(&mut headers, present);
        }
        let mut lines = Vec::with_capacity(256);
        if let Credential::Valid(key, from) = credential {
            key_lines(table, key, from, &mut headers, fields.as_mut(), &mut lines);
        }
        let host = match &fields {
            Some(fields) => fields.host().0,
            None => headers::first(&headers, &header::HOST).map(HeaderValue::as_bytes),
        };
        match host {
            Some(host) => field(&mut lines, &headers::FORWARDED_HOST, host),
            None => {
                if let Some(host) = host_of_target(&parts.uri) {
                    field(&mut lines, &headers::FORWARDED_HOST, host.as_bytes());
                    headers.insert(header::HOST, host);
                }
            }
        }
        lines.extend_from_slice(headers::FORWARDED_FOR.as_str().as_bytes());
        lines.extend_from_slice(b": ");
        for hop in &chain {
            lines.extend_from_slice(hop.as_bytes());
            lines.extend_from_slice(b", ");
        }
        headers::push_ip(&mut lines, client.ip());
        lines.extend_from_slice(b"\r\n");
        field(&mut lines, &headers::FORWARDED_PROTO, b"http");
        field(&mut lines, &CORRELATION_ID, request_id.as_bytes());
        if let Some(token) = &table.internal_token {
            field(&mut lines, &headers::INTERNAL_TOKEN, token.as_bytes());
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
        let mut traceparent = [0; headers::TRACEPARENT_LEN];
        headers::write_child_traceparent(parent.as_ref(), &mut traceparent);
        Template {
            head: Head {
                method: std::mem::replace(&mut parts.method, Method::GET),
                path_and_query,
                headers,
            },
            fields,
            upgrade,
            lines,
            traceparent: Some(traceparent),
        }
    }

    /// One attempt on the endpoint the upstream's load balancing picks,
    /// another than those in `tried` if it can, added to them. A request
    /// that left may be sent again if its body is `replayable` and it is
    /// idempotent; a gRPC call also after a trailers-only UNAVAILABLE, as
    /// gRPC's own retry policies and Envoy's `retry_on: unavailable` do
    /// (every gRPC call is a POST).
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        call: &Call<'_>,
        upstream: &Upstream,
        extra: Vec<u8>,
        body: Option<ProxyBody>,
        replayable: bool,
        told: Attempt,
        tried: &AtomicU64,
    ) -> Result<UpstreamResponse, AttemptError> {
        let template = &call.template.head;
        let retryable = call.idempotent && replayable;
        let Some(body) = body else {
            // A streamed body went with an earlier attempt that never connected.
            return Err(AttemptError::BodyGone);
        };
        let Some((index, endpoint)) = upstream.pick(
            |name| call.template.field(name),
            tried.load(Ordering::Relaxed),
        ) else {
            return Err(AttemptError::NoEndpoint);
        };
        if index < 64 {
            // One task's, as `attempts` in `forward`: no locked or.
            tried.store(
                tried.load(Ordering::Relaxed) | 1 << index,
                Ordering::Relaxed,
            );
        }
        // A recorded request's attempt is a span, whose ID its
        // `traceparent` carries.
        let traced = call.span.and_then(|parent| {
            let sent = h1::line_value(&extra, &headers::TRACEPARENT)?;
            let ids = TraceIds::parse_bytes(sent)?;
            Some(Span::child_of(parent, ids.span_id, Instant::now()))
        });
        let method = traced.map(|_| template.method.clone());
        let head = h1::Head {
            method: &template.method,
            target: &template.path_and_query,
            headers: &template.headers,
            fields: call.template.fields.as_ref(),
            lines: [&call.template.lines, &extra],
            host: endpoint.to.authority().as_str(),
            upgrade: call.template.upgrade,
        };
        let max_uses = upstream.config.pool.max_requests_per_connection;
        let attempting = endpoint.attempting();
        // Pinned where it is: the exchange's future is large, and the
        // cut-off holds it by reference rather than moved in.
        let mut sent =
            std::pin::pin!(call
                .upstream_client
                .send(&endpoint.to, &head, body, max_uses));
        // One timer for the attempt's timeout and the deadline alike (the
        // pipeline leaves the cut-off to the attempt).
        let result = match told.cut_off() {
            Some(at) => call
                .upstream_client
                .deadlines()
                .within(at, sent.as_mut())
                .await
                .map_err(|_| {
                    if told.cut_off_is_deadline() {
                        AttemptError::DeadlinePassed
                    } else {
                        AttemptError::Timeout { retryable }
                    }
                }),
            None => Ok(sent.await),
        };
        drop(attempting);
        let result = match result {
            Err(timeout) => Err(timeout),
            Ok(Ok(response)) if call.grpc => judge(response, true, replayable),
            Ok(Ok(response)) => judge(response, false, retryable),
            Ok(Err(ClientError::Overflow)) => Err(AttemptError::PoolOverflow),
            Ok(Err(ClientError::Connect(e))) => Err(AttemptError::Connect(e)),
            Ok(Err(ClientError::Tls(e))) => Err(AttemptError::Tls(e)),
            Ok(Err(ClientError::Request(e))) if is_body_too_large(&*e) => {
                Err(AttemptError::BodyTooLarge)
            }
            Ok(Err(ClientError::Request(error))) => Err(AttemptError::Request { error, retryable }),
        };
        self.record_outcome(upstream, endpoint, &result);
        if let (Some(span), Some(telemetry), Some(method)) = (traced, &self.telemetry, method) {
            let (attributes, error) =
                attempt_attributes(&method, upstream, endpoint, told.number(), &result);
            telemetry.end(span, method_label(&method), Kind::Client, attributes, error);
        }
        result
    }

    /// Counts an attempt for outlier detection and reports any ejection.
    fn record_outcome(
        &self,
        upstream: &Upstream,
        endpoint: &EndpointState,
        result: &Result<UpstreamResponse, AttemptError>,
    ) {
        let failed = |status: StatusCode| match status.is_server_error() {
            true => Verdict::Failed,
            false => Verdict::Answered,
        };
        let verdict = match result {
            Ok(response) => failed(response.status()),
            Err(AttemptError::Status { status, .. }) => failed(*status),
            Err(AttemptError::Connect(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Verdict::Refused
            }
            // A deadline spent partly elsewhere (earlier attempts, their
            // backoff) says nothing about this endpoint.
            Err(
                AttemptError::BodyTooLarge
                | AttemptError::BodyGone
                | AttemptError::NoEndpoint
                | AttemptError::PoolOverflow
                | AttemptError::DeadlinePassed,
            ) => return,
            Err(_) => Verdict::Failed,
        };
        let Some(ejected_for) = upstream.record(endpoint, verdict) else {
            return;
        };
        tracing::warn!(
            upstream = upstream.name(),
            endpoint = %endpoint.label,
            seconds = ejected_for.as_secs_f64(),
            "endpoint ejected by outlier detection"
        );
        self.metrics.ejection(upstream.name(), &endpoint.label);
        self.notices.send(Notice::Ejected {
            upstream: upstream.name().to_owned(),
            endpoint: endpoint.label.clone(),
            seconds: ejected_for.as_secs_f64(),
            timestamp: tidegate_client::clock::now_rfc3339(),
        });
    }

    /// Counts a call the policies refused locally (whether or not a
    /// fallback then answers).
    fn count_rejection(&self, upstream: &Upstream, err: &Error<AttemptError>) {
        let reason = if err.is_circuit_open() {
            "circuit_open"
        } else if err.is_bulkhead_full() {
            "bulkhead_full"
        } else if err.is_throttled() {
            "throttled"
        } else if err.is_rate_limited() {
            "rate_limited"
        } else if matches!(err.inner(), Some(AttemptError::PoolOverflow)) {
            "pool_overflow"
        } else {
            return;
        };
        upstream.rejections.fetch_add(1, Ordering::Relaxed);
        if err.is_rate_limited() {
            upstream.traffic.rate_limited();
        }
        self.metrics.rejection(upstream.name(), reason);
    }

    /// The client's answer to a call that ended in an error: the
    /// upstream's own answer when it gave one, else a JSON error.
    fn failed(
        &self,
        upstream: &Upstream,
        err: Error<AttemptError>,
    ) -> Result<UpstreamResponse, Reply> {
        let name = upstream.name();
        // Counted by `count_rejection` already.
        let reject = |status: StatusCode, text: &str| Reply::new(status, text).service(name);
        if err.is_circuit_open() {
            let reply = reject(StatusCode::SERVICE_UNAVAILABLE, "circuit breaker is open");
            return Err(reply.retry_after(err.retry_after()));
        }
        if err.is_bulkhead_full() {
            return Err(reject(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many concurrent requests",
            ));
        }
        if err.is_throttled() {
            return Err(reject(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream is overloaded; request shed",
            ));
        }
        if err.is_rate_limited() {
            let reply = reject(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
            return Err(reply.retry_after(err.retry_after()));
        }
        let timed_out = err.is_timeout()
            || err.is_deadline_exceeded()
            || err
                .last_error()
                .is_some_and(|l| l.is_timeout() || l.is_deadline_exceeded());
        match err.into_inner() {
            Some(AttemptError::Status { response, .. }) => Ok(response),
            Some(AttemptError::PoolOverflow) => Err(reject(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many requests waiting for a connection",
            )),
            Some(AttemptError::NoEndpoint) => Err(Reply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy endpoint",
            )
            .service(name)),
            Some(AttemptError::Connect(e)) => {
                tracing::warn!(upstream = name, error = %AttemptError::Connect(e), "upstream unreachable");
                Err(Reply::new(StatusCode::BAD_GATEWAY, "upstream unreachable").service(name))
            }
            // Logged by the client, once until a handshake succeeds again.
            Some(AttemptError::Tls(_)) => Err(Reply::new(
                StatusCode::BAD_GATEWAY,
                "upstream TLS handshake failed",
            )
            .service(name)),
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
            Some(AttemptError::Timeout { .. } | AttemptError::DeadlinePassed) => {
                Err(Reply::new(StatusCode::GATEWAY_TIMEOUT, "upstream timed out").service(name))
            }
            None if timed_out => {
                Err(Reply::new(StatusCode::GATEWAY_TIMEOUT, "upstream timed out").service(name))
            }
            None => Err(Reply::new(StatusCode::BAD_GATEWAY, "upstream failed").service(name)),
        }
    }
}

/// What became of [`Gateway::call_upstream`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Called {
    /// The upstream answered.
    Answered {
        /// Its status.
        status: StatusCode,
        /// Its `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    /// The policies turned the call away (breaker open, bulkhead full,
    /// throttled, rate limited): nothing was sent.
    Refused {
        /// When to try again, when the policy knows.
        retry_after: Option<Duration>,
    },
    /// Not sent: no endpoint could be reached (refused, unroutable, none
    /// healthy).
    NotSent(String),
    /// No answer to what may have arrived: timed out, the exchange broke.
    Failed(String),
}

/// What every upstream call of one request shares.
struct Call<'a> {
    upstream_client: &'a UpstreamClient,
    template: &'a Template,
    idempotent: bool,
    /// A gRPC call: judged by its `grpc-status`, told its deadline in
    /// `grpc-timeout`.
    grpc: bool,
    /// The call's own deadline, when shorter than the policy's.
    limit: Option<Duration>,
    /// The span its attempts are children of, when recorded.
    span: Option<TraceIds>,
}

impl Call<'_> {
    /// The fields attempt `number` (from 1), with the time `remaining`,
    /// adds to the template (see [`Template::attempt_lines`]).
    fn attempt_lines(&self, number: u32, remaining: Option<Duration>) -> Vec<u8> {
        self.template.attempt_lines(number, remaining, self.grpc)
    }
}

/// An upstream's answer, as the gateway judges it: by its status, or a
/// gRPC call's trailers-only answer by its `grpc-status`. An answer worth
/// another attempt (502, 503, 504, 429; gRPC's UNAVAILABLE), and a gRPC
/// failure in an HTTP 200, are errors of the attempt, `retryable` if it
/// may be sent again (gRPC: if its body can be).
fn judge(
    mut response: UpstreamResponse,
    grpc: bool,
    retryable: bool,
) -> Result<UpstreamResponse, AttemptError> {
    let status = response.status();
    if grpc && status == StatusCode::OK {
        // An HTTP/1.1 upstream's fields come unread (`http::fields`).
        fields::materialize(&mut response);
        let judged = grpc::status(response.headers()).map_or(StatusCode::OK, grpc::judged_as);
        if judged == StatusCode::OK {
            return Ok(response);
        }
        return Err(AttemptError::Status {
            response,
            status: judged,
            retryable: retryable && judged == StatusCode::SERVICE_UNAVAILABLE,
        });
    }
    if is_retryable_status(status) {
        return Err(AttemptError::Status {
            response,
            status,
            retryable,
        });
    }
    Ok(response)
}

/// The upstream of a target: the only one, or one of a split by weight.
fn pick_target(target: &Target) -> usize {
    match target {
        Target::Upstream(index) => *index,
        Target::Compose(_) => unreachable!("a composition route has no one upstream"),
        Target::Split(shares) => {
            let total: u64 = shares.iter().map(|&(_, w)| u64::from(w)).sum();
            let mut point = rng::below(total);
            for &(index, weight) in shares {
                match point.checked_sub(u64::from(weight)) {
                    Some(rest) => point = rest,
                    None => return index,
                }
            }
            shares[shares.len() - 1].0
        }
    }
}

/// Adds the `X-RateLimit-*` headers of the tightest limit passed (in
/// place: an answer is large to move).
fn add_limits(
    response: &mut Response<ProxyBody>,
    decision: Option<&tidegate_resilience::ratelimit::Decision>,
) {
    if let Some(decision) = decision {
        // The gateway's limit replaces any the upstream reported.
        for (name, value) in admission::headers(decision) {
            response.headers_mut().insert(name, value);
        }
    }
}

/// The upstream's response on its way to the client: hop-by-hop headers
/// out, body streamed, the upstream's in-flight count held until it ends.
fn downstream(in_flight: InFlight, response: Response<UpstreamBody>) -> Response<ProxyBody> {
    let (mut parts, mut incoming) = response.into_parts();
    let upgrade = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    let received = fields::Carrier::take_received(&mut incoming);
    let body = Tracked {
        inner: incoming,
        _in_flight: in_flight,
    };
    Response::from_parts(parts, ProxyBody::new(body).with_received(received))
}

/// A server span's attributes, after the OpenTelemetry HTTP semantic
/// conventions, and tidegate's own (`tidegate.*`).
fn server_attributes(
    method: &Method,
    path: String,
    client: SocketAddr,
    log: &Access<'_>,
    status: StatusCode,
    grpc: bool,
) -> Attributes {
    let mut attributes: Attributes = vec![
        ("http.request.method", method_label(method).into()),
        ("url.path", path.into()),
        ("client.address", client.ip().to_string().into()),
        (
            "http.response.status_code",
            i64::from(status.as_u16()).into(),
        ),
        ("tidegate.route", log.route.as_str().to_owned().into()),
        ("tidegate.attempts", i64::from(log.attempts).into()),
        (
            "tidegate.retries",
            i64::from(log.attempts.saturating_sub(1)).into(),
        ),
    ];
    if log.traffic.is_some() {
        attributes.push(("tidegate.upstream", log.upstream.as_str().to_owned().into()));
    }
    if let Some(state) = log.breaker {
        attributes.push(("tidegate.breaker.state", state.into()));
    }
    if let Some(kind) = log.fallback {
        attributes.push(("tidegate.fallback", kind.into()));
    }
    if let Some(id) = &log.key_id {
        attributes.push(("tidegate.api_key.id", id.clone().into()));
    }
    if grpc {
        attributes.push(("rpc.system", "grpc".into()));
    }
    if status.is_server_error() {
        attributes.push(("error.type", status.as_str().to_owned().into()));
    }
    attributes
}

/// An attempt span's attributes (HTTP client conventions), and its error.
fn attempt_attributes(
    method: &Method,
    upstream: &Upstream,
    endpoint: &EndpointState,
    number: u32,
    result: &Result<UpstreamResponse, AttemptError>,
) -> (Attributes, Option<String>) {
    let authority = endpoint.to.authority();
    let mut attributes: Attributes = vec![
        ("http.request.method", method_label(method).into()),
        ("server.address", authority.host().to_owned().into()),
        (
            "server.port",
            i64::from(authority.port_u16().unwrap_or(80)).into(),
        ),
        ("tidegate.upstream", upstream.name().to_owned().into()),
        ("tidegate.endpoint", endpoint.label.clone().into()),
    ];
    if number > 1 {
        attributes.push(("http.request.resend_count", i64::from(number - 1).into()));
    }
    let status = match result {
        Ok(response) => Some(response.status()),
        Err(AttemptError::Status { response, .. }) => Some(response.status()),
        Err(_) => None,
    };
    let error = match (status, result) {
        (Some(status), _) => {
            attributes.push((
                "http.response.status_code",
                i64::from(status.as_u16()).into(),
            ));
            status.is_server_error().then(|| {
                attributes.push(("error.type", status.as_str().to_owned().into()));
                format!("answered {}", status.as_u16())
            })
        }
        (None, Err(e)) => {
            let kind = match e {
                AttemptError::Connect(_) => "connect",
                AttemptError::Tls(_) => "tls",
                AttemptError::Timeout { .. } | AttemptError::DeadlinePassed => "timeout",
                AttemptError::PoolOverflow => "pool_overflow",
                AttemptError::NoEndpoint => "no_endpoint",
                _ => "request",
            };
            attributes.push(("error.type", kind.into()));
            Some(e.to_string())
        }
        (None, Ok(_)) => None,
    };
    (attributes, error)
}

/// What the access log and metrics say of a request.
#[derive(Debug)]
struct Access<'t> {
    /// Borrowed, not cloned: every worker writing one count of references
    /// per request would share its cache line.
    route: &'t Arc<String>,
    /// The counters of the upstream chosen, for the dashboard.
    traffic: Option<&'t Traffic>,
    /// The upstream call failed (error, 5xx or local rejection), whether
    /// or not a fallback answered.
    upstream_failed: bool,
    upstream: &'t Arc<String>,
    attempts: u32,
    key_id: Option<String>,
    fallback: Option<&'static str>,
    /// The request's span, when it is recorded: its attempts' parent.
    span: Option<TraceIds>,
    /// The upstream's breaker after the call, for a recorded span.
    breaker: Option<&'static str>,
    /// When the upstream's answer came (the pipeline's last clock read),
    /// if it read the clock then.
    answered_at: Option<Instant>,
    /// When the request came: the clock its call through the upstream's
    /// policies starts from, with no read of its own.
    start: Instant,
}

/// A table kept between requests, with the generation it was in use in.
#[derive(Debug)]
pub struct KeptTable {
    generation: u64,
    table: Arc<Table>,
}

/// The upstream request head of one attempt.
#[derive(Debug, Clone)]
struct Head {
    method: Method,
    path_and_query: PathAndQuery,
    headers: HeaderMap,
}

/// The head every attempt repeats: the client's fields, cleaned, in a
/// map, and the gateway's own as lines written after them; each attempt
/// adds its `traceparent` and the deadline it has left.
#[derive(Debug)]
struct Template {
    head: Head,
    /// The client's fields that came as they were (see [`Arrived`]),
    /// written after `head.headers`; none of their names is in `lines`.
    fields: Option<Arrived>,
    /// `name: value\r\n` each; none of their names is in `head.headers`.
    lines: Vec<u8>,
    /// Whether the head asks to switch protocols (its `Upgrade` kept) or
    /// is a CONNECT.
    upgrade: bool,
    /// The `traceparent` the first attempt sends (bytes, not a value:
    /// it is only ever written).
    traceparent: Option<[u8; headers::TRACEPARENT_LEN]>,
}

/// The fields only the gateway sets on a forwarded request: a client's
/// copy never passes (`x-forwarded-for` is continued, `traceparent`
/// followed). Each name begins with `x` or `t`: `upstream_head` looks
/// no further for a field that does not.
static OWN: [&http::HeaderName; 9] = [
    &headers::FORWARDED_FOR,
    &headers::FORWARDED_HOST,
    &headers::FORWARDED_PROTO,
    &CORRELATION_ID,
    &headers::TRACEPARENT,
    &headers::INTERNAL_TOKEN,
    &headers::DEADLINE_MS,
    &admission::API_KEY_ID,
    &admission::TIER,
];

impl Template {
    /// A head of the gateway's own call, sent as it is.
    fn plain(mut head: Head) -> Self {
        // The call's own `traceparent`, which the client made: one of
        // any other length stays a field like the others.
        let traceparent = head
            .headers
            .get(&headers::TRACEPARENT)
            .and_then(|v| <[u8; headers::TRACEPARENT_LEN]>::try_from(v.as_bytes()).ok());
        if traceparent.is_some() {
            head.headers.remove(&headers::TRACEPARENT);
        }
        Template {
            upgrade: client::asks_upgrade(&head.method, &head.headers),
            head,
            fields: None,
            lines: Vec::new(),
            traceparent,
        }
    }

    /// All its fields in one map.
    fn into_headers(mut self) -> HeaderMap {
        let mut headers = self.head.headers;
        fields::into_map(&mut self.fields, &mut headers);
        h1::add_lines(&mut headers, &self.lines);
        if let Some(traceparent) = self.traceparent {
            let value = HeaderValue::from_bytes(&traceparent).expect("a header value's bytes");
            headers.insert(&headers::TRACEPARENT, value);
        }
        headers
    }

    /// The value of its field `name`, wherever it is.
    fn field(&self, name: &http::HeaderName) -> Option<&[u8]> {
        if let Some(value) = self.head.headers.get(name) {
            return Some(value.as_bytes());
        }
        if let Some(value) = self.fields.as_ref().and_then(|f| f.get(name)) {
            return Some(value);
        }
        if *name == headers::TRACEPARENT {
            return self.traceparent.as_ref().map(|t| &t[..]);
        }
        h1::line_value(&self.lines, name)
    }

    /// The fields attempt `number` (from 1), with the time `remaining`,
    /// adds, as lines (see [`h1::Head::lines`]). A retry is a span of its
    /// own in the request's trace: the first attempt sends the template's
    /// `traceparent`, each later one the same trace with a new span ID.
    /// A gRPC call is told its deadline in `grpc-timeout` too.
    fn attempt_lines(&self, number: u32, remaining: Option<Duration>, grpc: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        match &self.traceparent {
            Some(first) if number > 1 => {
                let mut next = [0; headers::TRACEPARENT_LEN];
                headers::write_next_span(first, &mut next);
                field(&mut out, &headers::TRACEPARENT, &next);
            }
            Some(first) => field(&mut out, &headers::TRACEPARENT, first),
            None => {}
        }
        if let Some(left) = remaining {
            let mut digits = [0; 20];
            let count = headers::deadline_digits(left, &mut digits);
            field(&mut out, &headers::DEADLINE_MS, &digits[..count]);
            if grpc {
                let mut timeout = Vec::with_capacity(12);
                grpc::write_timeout(left, &mut timeout);
                field(&mut out, &grpc::TIMEOUT, &timeout);
            }
        }
        out
    }
}

/// Joins the client's and the upstream's upgraded connections.
fn tunnel(client: OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let (mut client, upstream) = match tokio::join!(client.upgraded(), upstream) {
            (Ok(client), Ok(upstream)) => (client, upstream),
            (Err(e), _) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
            (_, Err(e)) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let mut upstream = TokioIo::new(upstream);
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(error = %e, "upgraded connection ended");
        }
    });
}

/// Counts a request in its upstream's `in_flight`, and holds its API
/// key's concurrency slot, until dropped.
#[derive(Debug)]
struct InFlight {
    upstream: Arc<Upstream>,
    _slot: Option<Slot>,
}

impl InFlight {
    fn new(upstream: &Arc<Upstream>, slot: Option<Slot>) -> Self {
        upstream.in_flight.inc();
        InFlight {
            upstream: upstream.clone(),
            _slot: slot,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.upstream.in_flight.dec();
    }
}

/// An upstream body, counted in flight until it ends or the client goes.
struct Tracked {
    inner: UpstreamBody,
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

/// The target of the access log's lines.
const ACCESS: &str = "tidegate::access";

/// A duration in whole microseconds: what a log line needs.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Microseconds as milliseconds: a number whose shortest decimal form is
/// cheap to find.
fn millis(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// One request's access-log line, written once its answer has gone.
#[derive(Debug)]
struct AccessLine {
    request_id: OwnValue,
    method: Method,
    route: Arc<String>,
    upstream: Arc<String>,
    attempts: u32,
    status: u16,
    start: Instant,
    /// The time to the answer's head.
    ttfb: Duration,
    api_key_id: Option<String>,
    fallback: Option<&'static str>,
}

/// An access line's fields, as an [`AccessLog`] gets them.
#[derive(Debug, Clone, Copy)]
pub struct AccessRecord<'a> {
    /// The request's correlation ID.
    pub request_id: &'a str,
    /// Its method.
    pub method: &'a str,
    /// The route it matched (`none` when none did).
    pub route: &'a str,
    /// The upstream it went to (`none` when none).
    pub upstream: &'a str,
    /// Attempts sent upstream.
    pub attempts: u32,
    /// The answer's status.
    pub status: u16,
    /// From the request to the end of the answer, in microseconds (the
    /// line says milliseconds).
    pub duration_us: u64,
    /// From the request to the answer's head, in microseconds.
    pub ttfb_us: u64,
    /// Whether the whole answer went out.
    pub complete: bool,
    /// The caller's API key ID, if it gave one.
    pub api_key_id: Option<&'a str>,
    /// The fallback that answered, if one did.
    pub fallback: Option<&'a str>,
}

/// Writes access lines, in place of `tidegate::access` events: one line
/// a request is the one log line on the data path, and `tracing`'s
/// dispatch of its ten fields costs more than writing them. Whether a
/// line is written at all stays `tracing`'s filter's to say.
pub trait AccessLog: Send + Sync {
    /// Writes `record`'s line.
    fn write(&self, record: &AccessRecord<'_>);
}

static ACCESS_LOG: std::sync::OnceLock<Box<dyn AccessLog>> = std::sync::OnceLock::new();

/// Sends this process's access lines to `log` from now on; `false` if a
/// writer was set already (it stays).
pub fn set_access_log(log: Box<dyn AccessLog>) -> bool {
    ACCESS_LOG.set(log).is_ok()
}

impl AccessLine {
    /// Writes the line: `complete` when the whole body was sent, not
    /// when the client or the upstream broke it off.
    fn write(self, complete: bool) {
        let record = AccessRecord {
            request_id: self.request_id.as_str(),
            method: self.method.as_str(),
            route: self.route.as_str(),
            upstream: self.upstream.as_str(),
            attempts: self.attempts,
            status: self.status,
            duration_us: micros(self.start.elapsed()),
            ttfb_us: micros(self.ttfb),
            complete,
            api_key_id: self.api_key_id.as_deref(),
            fallback: self.fallback,
        };
        if let Some(log) = ACCESS_LOG.get() {
            log.write(&record);
            return;
        }
        tracing::info!(
            target: ACCESS,
            request_id = record.request_id,
            method = %record.method,
            route = record.route,
            upstream = record.upstream,
            attempts = record.attempts,
            status = record.status,
            duration_ms = millis(record.duration_us),
            ttfb_ms = millis(record.ttfb_us),
            complete,
            api_key_id = record.api_key_id,
            fallback = record.fallback,
        );
    }
}

/// An answer's body that writes its access line when it is dropped, as
/// hyper does once the body has ended or the connection has gone.
struct Logged {
    inner: ProxyBody,
    line: Option<AccessLine>,
    ended: bool,
}

impl Body for Logged {
    type Data = Bytes;
    type Error = body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.ended = true,
            Poll::Ready(Some(Ok(_))) => self.ended = self.inner.is_end_stream(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(line) = self.line.take() {
            line.write(self.ended || self.inner.is_end_stream());
        }
    }
}

/// Puts the normal form of `uri`'s path in its place (see [`crate::http::path`]).
fn normalize_path(uri: &mut http::Uri, escaped_slashes: EscapedSlashes) -> Result<(), Reply> {
    let path = match path::normalize(uri.path(), escaped_slashes) {
        Ok(Cow::Borrowed(_)) => return Ok(()),
        Ok(Cow::Owned(path)) => path,
        Err(e) => return Err(Reply::malformed(e.to_string())),
    };
    let target = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = Some(
        PathAndQuery::from_maybe_shared(Bytes::from(target))
            .map_err(|_| Reply::malformed("invalid request target"))?,
    );
    *uri = http::Uri::from_parts(parts).map_err(|_| Reply::malformed("invalid request target"))?;
    Ok(())
}

/// Reads the client's body (one that has not ended: the caller answers
/// the others without a read) as far as the replay cap, within
/// `gateway.body_read_timeout`.
async fn read_body(
    incoming: ClientBody,
    settings: &GatewaySettings,
    max_body: u64,
    wait: bool,
) -> Result<RequestBody, Reply> {
    let read = RequestBody::read(incoming, settings.max_replay_bytes, max_body, wait);
    match tokio::time::timeout(settings.body_read_timeout, read).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(e)) if is_body_too_large(&*e) => Err(Reply::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large",
        )),
        Ok(Err(_)) => Err(Reply::new(
            StatusCode::BAD_REQUEST,
            "could not read the request body",
        )),
        // The rest of the body may still come: the connection cannot be reused.
        Err(_) => Err(Reply::new(
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive within gateway.body_read_timeout",
        )
        .closing()),
    }
}

/// Whether a request's `Host` is clear (RFC 9112 §3.2): at most one, and
/// valid; exactly one in HTTP/1.1 (HTTP/2 names the host in `:authority`).
/// `host` is the first, `more` whether there are others.
fn has_valid_host(version: Version, host: Option<&[u8]>, more: bool) -> bool {
    match (host, more) {
        (Some(host), false) => headers::is_valid_host(host),
        (None, _) => version != Version::HTTP_11,
        (Some(_), true) => false,
    }
}

/// The host a request without `Host` names in its target (only HTTP/1.0
/// and HTTP/2 requests come without).
#[cold]
fn host_of_target(uri: &http::Uri) -> Option<HeaderValue> {
    uri.authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
}

/// The bit of the field named `name` (any case) in [`OWN`], or `0`.
#[inline(never)]
fn own_bit(name: &[u8]) -> u16 {
    OWN.iter()
        .position(|own| own.as_str().as_bytes().eq_ignore_ascii_case(name))
        .map_or(0, |i| 1 << i)
}

/// Drops the client's copies of the gateway's own fields from `fields`;
/// returns its `traceparent` and its `x-forwarded-for` chain.
#[inline(never)] // one copy, out of `upstream_head`'s lines
fn take_own_arrived(fields: &mut Arrived) -> (Option<HeaderValue>, Vec<HeaderValue>) {
    let (mut parent, mut chain) = (None, Vec::new());
    let mut own = 0;
    for (i, name, _) in fields.iter() {
        // (Every own field's name begins `x` or `t`.)
        if !matches!(name[0] | 0x20, b'x' | b't') || own_bit(name) == 0 {
            continue;
        }
        own |= 1 << i;
        if headers::TRACEPARENT
            .as_str()
            .as_bytes()
            .eq_ignore_ascii_case(name)
        {
            parent.get_or_insert_with(|| fields.value(i));
        } else if headers::FORWARDED_FOR
            .as_str()
            .as_bytes()
            .eq_ignore_ascii_case(name)
        {
            chain.push(fields.value(i));
        }
    }
    fields.drop_fields(own);
    (parent, chain)
}

/// Removes the client's copies of the gateway's own fields (`present`:
/// which of [`OWN`] it sent); returns its `traceparent` and its
/// `x-forwarded-for` chain.
#[inline(never)] // out of line: most clients send none
fn take_own(headers: &mut HeaderMap, present: u16) -> (Option<HeaderValue>, Vec<HeaderValue>) {
    let parent = headers.get(&headers::TRACEPARENT).cloned();
    let mut chain = Vec::new();
    if let Entry::Occupied(hops) = headers.entry(&headers::FORWARDED_FOR) {
        chain.extend(hops.remove_entry_mult().1);
    }
    for (i, name) in OWN.iter().enumerate() {
        if present & 1 << i != 0 {
            headers.remove(*name);
        }
    }
    (parent, chain)
}

/// The key stays at the edge (its field is removed); the upstream learns
/// whose it was, and its tier, from `lines`.
#[inline(never)] // out of line: a route without keys runs none of it
fn key_lines(
    table: &Table,
    key: &crate::config::ApiKey,
    from: &'static str,
    headers: &mut HeaderMap,
    fields: Option<&mut Arrived>,
    lines: &mut Vec<u8>,
) {
    // The key itself goes no further.
    headers.remove(from);
    if let Some(fields) = fields {
        fields.drop_named(from);
    }
    // A field value's bytes, as `HeaderValue` would check them.
    if key.id.bytes().all(|b| b == b'\t' || b >= 0x20 && b != 0x7f) {
        field(lines, &admission::API_KEY_ID, key.id.as_bytes());
    }
    if let Some(tier) = table.edge.tier_header(key) {
        field(lines, &admission::TIER, tier.as_bytes());
    }
}

/// Applies `gateway.headers_with_underscores` to the client's headers.
fn headers_with_underscores(headers: &mut HeaderMap, rule: Underscores) -> Result<(), Reply> {
    match rule {
        Underscores::Drop => {
            headers::drop_underscored(headers);
            Ok(())
        }
        Underscores::Reject if headers::has_underscored(headers) => Err(Reply::malformed(
            "header names with underscores are not accepted",
        )),
        Underscores::Allow | Underscores::Reject => Ok(()),
    }
}

/// An answer the gateway writes itself: a JSON error.
#[derive(Debug)]
pub struct Reply {
    status: StatusCode,
    message: String,
    service: Option<String>,
    retry_after: Option<Duration>,
    headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl Reply {
    /// What it says.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// An error answer.
    #[cold] // an error: its callers' branches are laid out of the way
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Reply {
            status,
            message: message.into(),
            service: None,
            retry_after: None,
            headers: Vec::new(),
        }
    }

    /// 400 for a malformed request; the connection closes after it, as
    /// after the ones hyper's parser refuses.
    #[cold]
    fn malformed(message: impl Into<String>) -> Self {
        Reply::new(StatusCode::BAD_REQUEST, message).closing()
    }

    /// Closes the connection after this answer.
    fn closing(mut self) -> Self {
        self.headers
            .push((header::CONNECTION, HeaderValue::from_static("close")));
        self
    }

    fn service(mut self, name: &str) -> Self {
        self.service = Some(name.to_owned());
        self
    }

    fn retry_after(mut self, after: Option<Duration>) -> Self {
        self.retry_after = after;
        self
    }

    /// The answer to a gRPC call: trailers-only, its `grpc-status` the
    /// code for this answer's HTTP status, the message in `grpc-message`
    /// (never JSON, which a gRPC client cannot read), a known wait in
    /// `grpc-retry-pushback-ms` as well as `Retry-After`.
    pub fn into_grpc_response(self) -> Response<ProxyBody> {
        let mut response = Response::new(body::empty());
        let code = grpc::code_for(self.status);
        *response.headers_mut() = grpc::trailers_only(code, &self.message);
        for (name, value) in self.headers {
            if name != header::CONNECTION {
                response.headers_mut().insert(name, value);
            }
        }
        if let Some(after) = self.retry_after {
            let millis = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
            let headers = response.headers_mut();
            headers.insert(&grpc::RETRY_PUSHBACK, HeaderValue::from(millis));
            let secs = admission::whole_seconds(after).max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }

    /// The JSON response.
    pub fn into_response(self, request_id: &OwnValue) -> Response<ProxyBody> {
        let json = serde_json::json!({
            "error": self.message,
            "service": self.service,
            "request_id": request_id.as_str(),
            "timestamp": tidegate_client::clock::now_rfc3339(),
        });
        let mut response = Response::new(body::full(json.to_string()));
        *response.status_mut() = self.status;
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(after) = self.retry_after {
            // At least 1: `Retry-After: 0` invites a retry storm.
            let secs = admission::whole_seconds(after).max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_own_field_begins_with_x_or_t_and_has_its_bit() {
        for (i, name) in OWN.iter().enumerate() {
            assert!(matches!(name.as_str().as_bytes()[0], b'x' | b't'), "{name}");
            assert_eq!(own_bit(name.as_str().as_bytes()), 1 << i);
            let upper = name.as_str().to_ascii_uppercase();
            assert_eq!(own_bit(upper.as_bytes()), 1 << i);
        }
        assert_eq!(own_bit(b"host"), 0);
        assert_eq!(own_bit(b"te"), 0);
    }
}
