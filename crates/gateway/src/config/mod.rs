//! The gateway's config file: TOML, parsed raw, merged with environment
//! overrides and policy defaults, then validated into typed form.
//!
//! Every error names where it is: `tidegate.toml:12:5: upstreams[0].policy.retry.max_attempts: must be at least 1`,
//! or `env TIDEGATE__GATEWAY__LISTEN: gateway.listen: …` for an override.
//!
//! Overrides: `TIDEGATE__GATEWAY__LISTEN=127.0.0.1:9000` sets
//! `gateway.listen`; a numeric step indexes an array
//! (`TIDEGATE__UPSTREAMS__0__ENDPOINTS='["http://127.0.0.1:9"]'`). A value
//! that parses as TOML (number, boolean, array) is taken as such, anything
//! else as a string.
//!
//! `[defaults.policy]` applies to every upstream; an upstream's own
//! `[upstreams.policy]` overrides it key by key.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use serde::Deserialize;
use tidegate_client::config::file::{deep_merge, merge_policy_defaults, KeyPath, Source};
use tidegate_client::config::{check_name, BaseUrl};
use tidegate_resilience::config::{duration, PolicyConfig};

use crate::proxy::client::Destination;
pub use crate::proxy::pool::PoolConfig;
pub use crate::proxy::tls::{ClientTls, UpstreamTlsSettings};
pub use tidegate_client::config::ConfigError;

mod compose;
mod edge;
mod events;
mod sagas;
mod schemas;
mod telemetry;

pub use self::compose::{Composition, Part, Piece};
pub use self::sagas::{
    BodyTemplate, Compensation, Ref, Root, SagaCall, SagaConfig, Scope, Segment, Step,
};
pub use self::schemas::{evolution, Broken, SchemaSettings, SchemaVersion};
pub use self::telemetry::TelemetrySettings;

use self::edge::{
    parse_sha256, RawApiKey, RawFallback, RawRateLimit, RawRouteLimit, RawSplit, StoreKind,
};
pub use self::edge::{
    redact_credentials, ApiKey, FailureMode, Fallback, Fault, LimitKey, LoadBalancing,
    OutlierDetection, RateLimitSettings, RedisUrl, RouteLimit, StoreSettings, Tier, TlsFiles,
    UpstreamProtocol,
};
pub use self::events::{
    EventStore, EventsSettings, Push, PushMode, Subscription, TopicGlob, TopicSettings,
};

/// The whole config, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listeners and limits.
    pub gateway: GatewaySettings,
    /// Upstream services, in file order.
    pub upstreams: Vec<UpstreamConfig>,
    /// Routes, in file order.
    pub routes: Vec<RouteConfig>,
    /// `[rate_limit]`: tiers and limiter settings.
    pub rate_limit: RateLimitSettings,
    /// `[[api_keys]]`.
    pub api_keys: Vec<ApiKey>,
    /// `[alerts]`: webhooks told of breaker changes.
    pub alerts: Alerts,
    /// `[events]`: the event store and its API, when the file has the table.
    pub events: Option<EventsSettings>,
    /// `[[sagas]]`, kept in the event store (so only with `[events]`).
    pub sagas: Vec<SagaConfig>,
    /// `[telemetry]`: spans exported over OTLP, when the file has the table.
    pub telemetry: Option<TelemetrySettings>,
    /// The config in effect as JSON, for `GET /config`: the file with
    /// environment overrides, built-in defaults filled in, secrets redacted.
    pub effective: std::sync::Arc<serde_json::Value>,
}

/// `[alerts]` as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawAlerts {
    webhooks: Vec<String>,
    #[serde(with = "duration")]
    timeout: Duration,
    max_attempts: u32,
    #[serde(with = "duration")]
    base_delay: Duration,
    #[serde(with = "duration")]
    max_delay: Duration,
}

impl Default for RawAlerts {
    fn default() -> Self {
        RawAlerts {
            webhooks: Vec::new(),
            timeout: Duration::from_secs(5),
            max_attempts: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
        }
    }
}

/// `[alerts]`: where breaker openings and closings are POSTed, and how
/// hard each delivery is tried.
#[derive(Debug, Clone, PartialEq)]
pub struct Alerts {
    /// The receivers (`http://…` or `https://…` URLs).
    pub webhooks: Vec<Webhook>,
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Attempts per alert and receiver, the first included.
    pub max_attempts: u32,
    /// Delay before the first retry; doubles (with full jitter) up to `max_delay`.
    pub base_delay: Duration,
    /// Longest delay between attempts.
    pub max_delay: Duration,
}

impl Default for Alerts {
    fn default() -> Self {
        let raw = RawAlerts::default();
        Alerts {
            webhooks: Vec::new(),
            timeout: raw.timeout,
            max_attempts: raw.max_attempts,
            base_delay: raw.base_delay,
            max_delay: raw.max_delay,
        }
    }
}

/// One webhook receiver.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    /// Where to POST.
    pub uri: Uri,
    /// Its endpoint, and TLS for an `https://` one (the system's roots).
    pub to: Destination,
    /// The URL without its query (which may hold a token), for logs and metrics.
    pub label: String,
}

/// Built-in defaults, merged under the file for `GET /config`.
const DEFAULTS: &str = include_str!("defaults.toml");

/// `[gateway]`: listeners and request limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewaySettings {
    /// Where the routes are served. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Where the admin API is served. Default `127.0.0.1:9901` (loopback).
    pub admin_listen: SocketAddr,
    /// Largest request head (request line and headers); over it → 431.
    pub max_header_bytes: usize,
    /// Longest request target; over it → 414.
    pub max_uri_bytes: usize,
    /// Largest request body; over it → 413. Routes may override it.
    pub max_body_bytes: u64,
    /// Bodies up to this size are kept so the request can be retried.
    pub max_replay_bytes: usize,
    /// A client must send its whole request head within this time.
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// A client must send its request body within this time after its
    /// head: the whole body, or the first `max_replay_bytes` of a larger one
    /// (the rest is bounded by the upstream's `timeout`). Past it → 408.
    #[serde(with = "duration")]
    pub body_read_timeout: Duration,
    /// A connection whose client reads nothing of a response for this long
    /// is closed (slow readers hold no upstream connection for ever).
    #[serde(with = "duration")]
    pub send_timeout: Duration,
    /// What to do with request headers whose names hold an underscore,
    /// which some upstreams (CGI, WSGI, PHP) cannot tell from a dash.
    pub headers_with_underscores: Underscores,
    /// What to do with `%2F` and `%5C` (encoded `/` and `\`) in a path.
    pub escaped_slashes: EscapedSlashes,
    /// Open client connections at most; more wait in the accept queue.
    pub max_connections: usize,
    /// On shutdown, in-flight requests get this long to finish.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
    /// Environment variable holding the token sent upstream as `X-Internal-Token`.
    pub internal_token_env: Option<String>,
    /// Environment variable holding the token the admin API's write
    /// endpoints require (`Authorization: Bearer …`); without it they
    /// are refused.
    pub admin_token_env: Option<String>,
    /// `[gateway.tls]`: TLS on the main listener.
    pub tls: Option<ListenerTlsSettings>,
}

/// `[gateway.tls]`: the main listener's certificate and key, more
/// certificates chosen by SNI, and the CA of client certificates (mTLS).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsSettings {
    /// The certificate chain (PEM), served when no `sni` entry matches.
    pub cert: std::path::PathBuf,
    /// Its private key (PEM).
    pub key: std::path::PathBuf,
    /// When set, clients must present a certificate this CA (PEM)
    /// signed; its identity goes upstream in `x-tidegate-client-identity`.
    pub client_ca: Option<std::path::PathBuf>,
    /// More certificates, each served for the DNS names it holds.
    #[serde(default)]
    pub sni: Vec<CertFiles>,
}

/// A certificate chain and its key (PEM files).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    /// The certificate chain.
    pub cert: std::path::PathBuf,
    /// Its private key.
    pub key: std::path::PathBuf,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
            max_header_bytes: 65_536,
            max_uri_bytes: 8_192,
            max_body_bytes: 10 * 1024 * 1024,
            max_replay_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
            headers_with_underscores: Underscores::Drop,
            escaped_slashes: EscapedSlashes::Reject,
            max_connections: 10_000,
            drain_timeout: Duration::from_secs(30),
            internal_token_env: None,
            admin_token_env: None,
            tls: None,
        }
    }
}

/// `gateway.headers_with_underscores`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Underscores {
    /// Forward them.
    Allow,
    /// Remove them before routing (nginx's default).
    Drop,
    /// Answer 400.
    Reject,
}

/// `gateway.escaped_slashes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscapedSlashes {
    /// Forward them encoded, as received.
    Keep,
    /// Answer 400: an upstream that decodes them would see another path
    /// than routing did.
    Reject,
}

/// `[upstreams.health_check]`: active checks of every endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// How endpoints are asked.
    pub kind: HealthCheckKind,
    /// `http`: the path requested with GET; a 2xx answer is healthy.
    /// Default `/health`.
    pub path: Option<String>,
    /// `grpc`: the service asked about (`""`, the default, is the server
    /// as a whole).
    pub service: Option<String>,
    /// Time between checks.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// A check without an answer within this time failed.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Successes in a row that bring an endpoint back.
    pub healthy_threshold: u32,
    /// Failures in a row that take an endpoint out.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            kind: HealthCheckKind::Http,
            path: None,
            service: None,
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

impl HealthCheckConfig {
    /// The path an `http` check requests.
    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("/health")
    }
}

/// How health checks ask an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    /// `GET path`: a 2xx answer is healthy.
    #[default]
    Http,
    /// The gRPC health checking protocol (`grpc.health.v1.Health/Check`):
    /// an answer of SERVING is healthy. The upstream must speak HTTP/2.
    Grpc,
}

/// One endpoint of an upstream: `http://host:port` or `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port` (port 80, or 443 with TLS, when the URL has none).
    pub authority: Authority,
    /// Reached over TLS (`https://`), with the upstream's `[upstreams.tls]`.
    pub tls: bool,
}

impl Endpoint {
    /// The URI of `path_and_query` on this endpoint.
    pub fn uri(&self, path_and_query: PathAndQuery) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(if self.tls {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            })
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.authority)
    }
}

/// `[[upstreams]]`: a service and its policies.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Unique name (in metrics, status and errors).
    pub name: String,
    /// Its endpoints, at least one.
    pub endpoints: Vec<Endpoint>,
    /// How endpoints are chosen.
    pub load_balancing: LoadBalancing,
    /// The HTTP version spoken to the endpoints.
    pub protocol: UpstreamProtocol,
    /// The header `consistent_hash` hashes.
    pub hash_header: Option<HeaderName>,
    /// Passive ejection of failing endpoints: as configured, else on with
    /// the defaults when there is more than one endpoint.
    pub outlier_detection: Option<OutlierDetection>,
    /// Connection-pool limits.
    pub pool: PoolConfig,
    /// Active health checks, if configured.
    pub health_check: Option<HealthCheckConfig>,
    /// `[defaults.policy]` with this upstream's overrides.
    pub policy: PolicyConfig,
    /// TLS for its `https://` endpoints (`[upstreams.tls]`, or the system's
    /// roots); `None` when every endpoint is `http://`.
    pub tls: Option<ClientTls>,
}

/// `[[routes]]`: which requests go to which upstream.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Unique name (in metrics and logs).
    pub name: String,
    /// Requests whose path starts with this (at a `/` boundary) match.
    pub path_prefix: String,
    /// Remove the prefix before forwarding.
    pub strip_prefix: bool,
    /// Only these methods match (all when empty).
    pub methods: Vec<Method>,
    /// Only requests carrying these exact header values match.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Where matching requests go.
    pub target: Target,
    /// Overrides `gateway.max_body_bytes`.
    pub max_body_bytes: Option<u64>,
    /// A rate limit per client, API key or header value.
    pub rate_limit: Option<RouteLimit>,
    /// Only requests with a valid API key pass (401 otherwise).
    pub require_api_key: bool,
    /// Only API keys of these tiers pass (403 otherwise); indexes into
    /// [`RateLimitSettings::tiers`]. Implies `require_api_key`.
    pub tiers: Vec<usize>,
    /// What to answer when the upstream is down.
    pub fallback: Option<Fallback>,
    /// Injected delays and aborts.
    pub fault: Option<Fault>,
}

/// A route's upstream, or its weighted split between upstreams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Index into [`Config::upstreams`].
    Upstream(usize),
    /// (upstream index, weight) pairs; weights sum to more than 0.
    Split(Vec<(usize, u32)>),
    /// Parts of several upstreams, answered as one JSON object.
    Compose(std::sync::Arc<Composition>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    gateway: GatewaySettings,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    rate_limit: RawRateLimit,
    #[serde(default)]
    api_keys: Vec<RawApiKey>,
    #[serde(default)]
    alerts: RawAlerts,
    events: Option<self::events::RawEvents>,
    #[serde(default)]
    sagas: Vec<self::sagas::RawSaga>,
    telemetry: Option<self::telemetry::RawTelemetry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    #[serde(default)]
    policy: PolicyConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    endpoints: Vec<String>,
    #[serde(default)]
    load_balancing: LoadBalancing,
    #[serde(default)]
    protocol: UpstreamProtocol,
    hash_header: Option<String>,
    outlier_detection: Option<OutlierDetection>,
    #[serde(default)]
    pool: PoolConfig,
    health_check: Option<HealthCheckConfig>,
    #[serde(default)]
    policy: PolicyConfig,
    tls: Option<UpstreamTlsSettings>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: String,
    path_prefix: String,
    #[serde(default)]
    strip_prefix: bool,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    upstream: Option<String>,
    split: Option<Vec<RawSplit>>,
    max_body_bytes: Option<u64>,
    rate_limit: Option<RawRouteLimit>,
    #[serde(default)]
    require_api_key: bool,
    #[serde(default)]
    tiers: Vec<String>,
    fallback: Option<RawFallback>,
    fault: Option<Fault>,
    compose: Option<Vec<self::compose::RawPart>>,
    #[serde(default, with = "duration::option")]
    deadline: Option<Duration>,
}

/// Reads and validates the config at `path`, with overrides from the
/// process environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = tidegate_client::config::file::read(path)?;
    parse(&text, &path.display().to_string(), std::env::vars())
}

/// Validates config `text` (named `file` in errors) with `TIDEGATE__…` overrides from `env`.
pub fn parse(
    text: &str,
    file: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let mut source = Source::parse(text, file)?;
    let mut root = source.value(env)?;
    let effective = effective(&root);
    source.merge_policy_defaults(&mut root, "upstreams");
    let raw: RawConfig = source.deserialize(root)?;
    let mut config = Locator(source).validate(raw)?;
    config.effective = std::sync::Arc::new(effective);
    Ok(config)
}

/// `root` (overrides applied) over the built-in defaults, with
/// `[defaults.policy]` merged into every upstream, as redacted JSON.
fn effective(root: &toml::Value) -> serde_json::Value {
    let mut merged: toml::Table = toml::from_str(DEFAULTS).unwrap_or_default();
    if let toml::Value::Table(table) = root.clone() {
        deep_merge(&mut merged, table);
    }
    let mut merged = toml::Value::Table(merged);
    merge_policy_defaults(&mut merged, "upstreams");
    let mut json = serde_json::to_value(merged).unwrap_or_default();
    redact(&mut json, "");
    json
}

/// Replaces secrets in the JSON of a config: passwords in URLs, webhook
/// queries, API key hashes, anything named like a token or secret (but
/// not the names of the environment variables that hold them).
fn redact(value: &mut serde_json::Value, key: &str) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                redact(v, k);
            }
        }
        Value::Array(items) => {
            for item in items {
                redact(item, key);
            }
        }
        Value::String(text) => {
            let secret = ["token", "secret", "password", "sha256"]
                .iter()
                .any(|word| key.contains(word))
                && !key.ends_with("_env");
            if secret {
                *text = "[redacted]".to_owned();
            } else if key == "redis_url" {
                *text = redact_credentials(text);
            } else if key == "webhooks" {
                *text = webhook_label(text);
            }
        }
        _ => {}
    }
}

/// A webhook URL without credentials or query.
fn webhook_label(url: &str) -> String {
    let url = redact_credentials(url);
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?[redacted]"),
        None => url,
    }
}

/// Turns the raw config into the typed one; errors point into the source.
struct Locator<'a>(Source<'a>);

impl Locator<'_> {
    fn error(&self, path: &KeyPath, reason: impl fmt::Display) -> ConfigError {
        self.0.error(path, reason)
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let root = KeyPath::default();
        let gateway = raw.gateway;
        let g = root.clone().key("gateway");
        for (key, value, least) in [
            ("max_header_bytes", gateway.max_header_bytes, 1024),
            ("max_uri_bytes", gateway.max_uri_bytes, 64),
            ("max_connections", gateway.max_connections, 1),
        ] {
            if value < least {
                return Err(self.error(&g.clone().key(key), format!("must be at least {least}")));
            }
        }
        for (key, value) in [
            ("header_read_timeout", gateway.header_read_timeout),
            ("body_read_timeout", gateway.body_read_timeout),
            ("send_timeout", gateway.send_timeout),
        ] {
            if value.is_zero() {
                return Err(self.error(&g.clone().key(key), "must be greater than 0"));
            }
        }
        for (key, var) in [
            ("internal_token_env", &gateway.internal_token_env),
            ("admin_token_env", &gateway.admin_token_env),
        ] {
            if var
                .as_ref()
                .is_some_and(|v| v.is_empty() || v.contains('='))
            {
                return Err(self.error(&g.clone().key(key), "must be an environment variable name"));
            }
        }
        if let Some(tls) = &gateway.tls {
            crate::http::tls::server_config(tls).map_err(|e| {
                let at = g.clone().key("tls");
                let at = match e.sni {
                    Some(i) => at.key("sni").index(i).key(e.field),
                    None => at.key(e.field),
                };
                self.error(&at, &e.reason)
            })?;
        }
        raw.defaults.policy.validate().map_err(|e| {
            self.error(
                &root.clone().key("defaults").key("policy").dotted(e.field()),
                e.reason(),
            )
        })?;

        let mut names = HashSet::new();
        let mut upstreams = Vec::with_capacity(raw.upstreams.len());
        for (i, u) in raw.upstreams.into_iter().enumerate() {
            let at = root.clone().key("upstreams").index(i);
            check_name(&u.name).map_err(|r| self.error(&at.clone().key("name"), r))?;
            if !names.insert(u.name.clone()) {
                return Err(self.error(
                    &at.key("name"),
                    format!("duplicate upstream name `{}`", u.name),
                ));
            }
            if u.endpoints.is_empty() {
                return Err(self.error(&at.key("endpoints"), "needs at least one endpoint"));
            }
            let mut endpoints = Vec::with_capacity(u.endpoints.len());
            for (j, e) in u.endpoints.iter().enumerate() {
                let endpoint = parse_endpoint(e)
                    .map_err(|r| self.error(&at.clone().key("endpoints").index(j), r))?;
                if endpoints.contains(&endpoint) {
                    return Err(self.error(
                        &at.key("endpoints").index(j),
                        format!("duplicate endpoint `{e}`"),
                    ));
                }
                endpoints.push(endpoint);
            }
            let tls = self.upstream_tls(&at, &u, &endpoints)?;
            if let Some(hc) = &u.health_check {
                let h = at.clone().key("health_check");
                let grpc = hc.kind == HealthCheckKind::Grpc;
                let problem = if !hc.path().starts_with('/')
                    || hc.path().parse::<http::uri::PathAndQuery>().is_err()
                {
                    Some(("path", "must be a path starting with `/`"))
                } else if grpc && hc.path.is_some() {
                    Some((
                        "path",
                        "is for kind = \"http\"; a gRPC check asks a `service`",
                    ))
                } else if !grpc && hc.service.is_some() {
                    Some(("service", "is for kind = \"grpc\""))
                } else if grpc && !u.protocol.is_http2() {
                    Some((
                        "kind",
                        "gRPC health checks need the upstream's protocol = \"http2\"",
                    ))
                } else if hc.interval.is_zero() {
                    Some(("interval", "must be greater than 0"))
                } else if hc.timeout.is_zero() {
                    Some(("timeout", "must be greater than 0"))
                } else if hc.healthy_threshold == 0 {
                    Some(("healthy_threshold", "must be at least 1"))
                } else if hc.unhealthy_threshold == 0 {
                    Some(("unhealthy_threshold", "must be at least 1"))
                } else {
                    None
                };
                if let Some((key, reason)) = problem {
                    return Err(self.error(&h.key(key), reason));
                }
            }
            u.policy
                .validate()
                .map_err(|e| self.error(&at.clone().key("policy").dotted(e.field()), e.reason()))?;
            if let Some((key, reason)) = u.pool.problem() {
                return Err(self.error(&at.key("pool").key(key), reason));
            }
            if let Some((key, reason)) = u.outlier_detection.as_ref().and_then(|o| o.problem()) {
                return Err(self.error(&at.key("outlier_detection").key(key), reason));
            }
            let hash_header = match &u.hash_header {
                Some(name) => Some(HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    self.error(&at.clone().key("hash_header"), "not a valid header name")
                })?),
                None => None,
            };
            match (u.load_balancing, &hash_header) {
                (LoadBalancing::ConsistentHash, None) => {
                    return Err(self.error(
                        &at.key("hash_header"),
                        "consistent_hash needs the header to hash",
                    ))
                }
                (LoadBalancing::ConsistentHash, Some(_)) | (_, None) => {}
                (_, Some(_)) => {
                    return Err(self.error(
                        &at.key("hash_header"),
                        "only used with load_balancing = \"consistent_hash\"",
                    ))
                }
            }
            let outlier_detection = match u.outlier_detection {
                Some(detection) => Some(detection).filter(|d| d.enabled),
                None if endpoints.len() > 1 => Some(OutlierDetection::default()),
                None => None,
            };
            upstreams.push(UpstreamConfig {
                name: u.name,
                endpoints,
                load_balancing: u.load_balancing,
                protocol: u.protocol,
                hash_header,
                outlier_detection,
                pool: u.pool,
                health_check: u.health_check,
                policy: u.policy,
                tls,
            });
        }
        let alerts = self.alerts(raw.alerts)?;
        let rate_limit = self.rate_limit(raw.rate_limit)?;
        let api_keys = self.api_keys(raw.api_keys, &rate_limit.tiers)?;
        let events = match raw.events {
            Some(events) => Some(self.events(events, &upstreams)?),
            None => None,
        };
        if events.is_none() && !raw.sagas.is_empty() {
            return Err(self.error(
                &root.clone().key("sagas"),
                "sagas are kept in the event store: add an [events] table",
            ));
        }
        let sagas = self.sagas(raw.sagas, &upstreams)?;
        let telemetry = match raw.telemetry {
            Some(telemetry) => Some(self.telemetry(telemetry)?),
            None => None,
        };

        let mut route_names = HashSet::new();
        let mut routes = Vec::with_capacity(raw.routes.len());
        for (i, mut r) in raw.routes.into_iter().enumerate() {
            let at = root.clone().key("routes").index(i);
            check_name(&r.name).map_err(|reason| self.error(&at.clone().key("name"), reason))?;
            if !route_names.insert(r.name.clone()) {
                return Err(self.error(
                    &at.key("name"),
                    format!("duplicate route name `{}`", r.name),
                ));
            }
            if !r.path_prefix.starts_with('/')
                || r.path_prefix.parse::<http::uri::PathAndQuery>().is_err()
                || r.path_prefix.contains(['?', '#'])
            {
                return Err(self.error(&at.key("path_prefix"), "must be a path starting with `/`"));
            }
            let find = |name: &str, key: &KeyPath| {
                upstreams
                    .iter()
                    .position(|u| u.name == name)
                    .ok_or_else(|| self.error(key, format!("no upstream named `{name}`")))
            };
            if r.compose.is_none() && r.deadline.is_some() {
                return Err(self.error(
                    &at.key("deadline"),
                    "`deadline` bounds a composition route; a route to one upstream \
                     has its upstream's `policy.deadline`",
                ));
            }
            let target = match (&r.upstream, &r.split) {
                (None, None) if r.compose.is_some() => {
                    for (key, set) in [
                        ("strip_prefix", r.strip_prefix),
                        ("max_body_bytes", r.max_body_bytes.is_some()),
                        ("fallback", r.fallback.is_some()),
                    ] {
                        if set {
                            return Err(self.error(
                                &at.key(key),
                                "not on a composition route (its parts are GETs of their \
                                 own paths, each with its own `fallback`)",
                            ));
                        }
                    }
                    let parts = r.compose.take().unwrap_or_default();
                    let composition = self.composition(parts, r.deadline, &upstreams, &at)?;
                    Target::Compose(std::sync::Arc::new(composition))
                }
                (Some(_), _) | (_, Some(_)) if r.compose.is_some() => {
                    return Err(self.error(
                        &at.key("compose"),
                        "a route has one of `upstream`, `split` or `compose`",
                    ))
                }
                (Some(name), None) => Target::Upstream(find(name, &at.clone().key("upstream"))?),
                (None, Some(split)) => {
                    let mut shares = Vec::with_capacity(split.len());
                    for (j, share) in split.iter().enumerate() {
                        let key = at.clone().key("split").index(j);
                        let index = find(&share.upstream, &key.clone().key("upstream"))?;
                        if shares.iter().any(|&(u, _)| u == index) {
                            return Err(self.error(
                                &key.key("upstream"),
                                format!("`{}` is already in the split", share.upstream),
                            ));
                        }
                        shares.push((index, share.weight));
                    }
                    if shares.iter().map(|&(_, w)| u64::from(w)).sum::<u64>() == 0 {
                        return Err(
                            self.error(&at.key("split"), "needs a share with weight above 0")
                        );
                    }
                    Target::Split(shares)
                }
                (Some(_), Some(_)) => {
                    return Err(self.error(
                        &at.key("split"),
                        "a route has `upstream` or `split`, not both",
                    ))
                }
                (None, None) => {
                    return Err(self.error(
                        &at.key("upstream"),
                        "a route needs `upstream`, `split` or `compose`",
                    ))
                }
            };
            let mut methods = Vec::with_capacity(r.methods.len());
            for (j, m) in r.methods.iter().enumerate() {
                let method =
                    Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| {
                        self.error(
                            &at.clone().key("methods").index(j),
                            format!("`{m}` is not an HTTP method"),
                        )
                    })?;
                if matches!(target, Target::Compose(_))
                    && method != Method::GET
                    && method != Method::HEAD
                {
                    return Err(self.error(
                        &at.clone().key("methods").index(j),
                        "a composition route answers GET and HEAD",
                    ));
                }
                methods.push(method);
            }
            if methods.is_empty() && matches!(target, Target::Compose(_)) {
                methods = vec![Method::GET, Method::HEAD];
            }
            let mut headers = Vec::with_capacity(r.headers.len());
            for (name, value) in &r.headers {
                let key = at.clone().key("headers").key(name);
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| self.error(&key, "not a valid header name"))?;
                let value = HeaderValue::from_str(value)
                    .map_err(|_| self.error(&key, "not a valid header value"))?;
                headers.push((name, value));
            }
            let route_limit = match r.rate_limit {
                Some(raw) => Some(self.route_limit(raw, &at.clone().key("rate_limit"))?),
                None => None,
            };
            let mut tiers = Vec::with_capacity(r.tiers.len());
            for (j, name) in r.tiers.iter().enumerate() {
                let tier = rate_limit
                    .tiers
                    .iter()
                    .position(|t| t.name == *name)
                    .ok_or_else(|| {
                        self.error(
                            &at.clone().key("tiers").index(j),
                            format!("no tier named `{name}`"),
                        )
                    })?;
                tiers.push(tier);
            }
            let fallback = match r.fallback {
                Some(raw) => {
                    Some(self.fallback(raw, &upstreams, &target, &at.clone().key("fallback"))?)
                }
                None => None,
            };
            if let Some((key, reason)) = r.fault.as_ref().and_then(Fault::problem) {
                return Err(self.error(&at.key("fault").key(key), reason));
            }
            routes.push(RouteConfig {
                name: r.name,
                path_prefix: r.path_prefix,
                strip_prefix: r.strip_prefix,
                methods,
                headers,
                target,
                max_body_bytes: r.max_body_bytes,
                rate_limit: route_limit,
                require_api_key: r.require_api_key || !tiers.is_empty(),
                tiers,
                fallback,
                fault: r.fault,
            });
        }
        Ok(Config {
            gateway,
            upstreams,
            routes,
            rate_limit,
            api_keys,
            alerts,
            events,
            sagas,
            telemetry,
            effective: std::sync::Arc::default(),
        })
    }

    /// The TLS of an upstream with `https://` endpoints, its files read
    /// and checked; `[upstreams.tls]` without such endpoints is refused.
    fn upstream_tls(
        &self,
        at: &KeyPath,
        u: &RawUpstream,
        endpoints: &[Endpoint],
    ) -> Result<Option<ClientTls>, ConfigError> {
        let Some(first) = endpoints.iter().position(|e| e.tls) else {
            return match u.tls {
                Some(_) => Err(self.error(
                    &at.clone().key("tls"),
                    "is for https:// endpoints, and this upstream has none",
                )),
                None => Ok(None),
            };
        };
        let settings = u.tls.clone().unwrap_or_default();
        let tls = ClientTls::new(&settings, u.protocol)
            .map_err(|e| self.error(&at.clone().key("tls").key(e.field), &e.reason))?;
        for (j, e) in endpoints.iter().enumerate().skip(first) {
            if e.tls {
                tls.server_name(e.authority.host()).map_err(|why| {
                    self.error(
                        &at.clone().key("endpoints").index(j),
                        format!("{why}: set tls.server_name"),
                    )
                })?;
            }
        }
        Ok(Some(tls))
    }

    /// An `http://` or `https://` URL the gateway sends to itself
    /// (webhooks, the OTLP receiver): the URL, and its endpoint (on 80 or
    /// 443 unless it names a port; TLS checked against the system's roots).
    fn http_destination(
        &self,
        key: &KeyPath,
        url: &str,
    ) -> Result<(Uri, Destination), ConfigError> {
        let uri: Uri = url
            .parse()
            .map_err(|_| self.error(key, "not a URL (expected http://host:port/path)"))?;
        let tls = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => {
                let tls = ClientTls::new(&UpstreamTlsSettings::default(), UpstreamProtocol::Http1)
                    .map_err(|e| self.error(key, &e.reason))?;
                Some(tls)
            }
            _ => return Err(self.error(key, "must start with http:// or https://")),
        };
        if uri.host().is_none_or(str::is_empty) || url.contains('@') {
            return Err(self.error(key, "needs a host, and no user or password"));
        }
        let default_port = if tls.is_some() { 443 } else { 80 };
        let authority: Authority = format!(
            "{}:{}",
            uri.host().unwrap_or_default(),
            uri.port_u16().unwrap_or(default_port)
        )
        .parse()
        .map_err(|_| self.error(key, "has a bad host"))?;
        let to = match &tls {
            None => Destination::plain(authority, UpstreamProtocol::Http1),
            Some(tls) => Destination::tls(authority, UpstreamProtocol::Http1, tls)
                .map_err(|why| self.error(key, why))?,
        };
        Ok((uri, to))
    }

    fn alerts(&self, raw: RawAlerts) -> Result<Alerts, ConfigError> {
        let at = KeyPath::default().key("alerts");
        let mut webhooks = Vec::with_capacity(raw.webhooks.len());
        for (i, url) in raw.webhooks.iter().enumerate() {
            let key = at.clone().key("webhooks").index(i);
            let (uri, to) = self.http_destination(&key, url)?;
            webhooks.push(Webhook {
                label: webhook_label(url),
                uri,
                to,
            });
        }
        if raw.timeout.is_zero() {
            return Err(self.error(&at.key("timeout"), "must be greater than 0"));
        }
        if raw.max_attempts == 0 {
            return Err(self.error(&at.key("max_attempts"), "must be at least 1"));
        }
        if raw.base_delay > raw.max_delay {
            return Err(self.error(&at.key("base_delay"), "must not exceed max_delay"));
        }
        Ok(Alerts {
            webhooks,
            timeout: raw.timeout,
            max_attempts: raw.max_attempts,
            base_delay: raw.base_delay,
            max_delay: raw.max_delay,
        })
    }

    fn rate_limit(&self, raw: RawRateLimit) -> Result<RateLimitSettings, ConfigError> {
        let at = KeyPath::default().key("rate_limit");
        if raw.max_keys == 0 {
            return Err(self.error(&at.key("max_keys"), "must be at least 1"));
        }
        let mut names = HashSet::new();
        for (i, tier) in raw.tiers.iter().enumerate() {
            let t = at.clone().key("tiers").index(i);
            check_name(&tier.name).map_err(|r| self.error(&t.clone().key("name"), r))?;
            if !names.insert(tier.name.as_str()) {
                return Err(self.error(
                    &t.key("name"),
                    format!("duplicate tier name `{}`", tier.name),
                ));
            }
            for (key, value) in [
                ("requests_per_minute", tier.requests_per_minute),
                ("requests_per_hour", tier.requests_per_hour),
                ("concurrent_requests", tier.concurrent_requests),
            ] {
                if value == Some(0) {
                    return Err(self.error(&t.key(key), "must be at least 1"));
                }
            }
        }
        let store = match raw.store {
            StoreKind::Local => {
                for (key, set) in [
                    ("redis_url", raw.redis_url.is_some()),
                    ("redis_cluster", raw.redis_cluster.is_some()),
                    ("redis_tls", raw.redis_tls.is_some()),
                    ("timeout", raw.timeout.is_some()),
                    ("failure_mode", raw.failure_mode.is_some()),
                ] {
                    if set {
                        return Err(
                            self.error(&at.clone().key(key), "applies only with store = \"redis\"")
                        );
                    }
                }
                StoreSettings::Local
            }
            StoreKind::Redis => {
                let Some(url) = raw.redis_url else {
                    return Err(self.error(&at.key("store"), "store = \"redis\" needs redis_url"));
                };
                if url.contains('#') {
                    return Err(self.error(
                        &at.key("redis_url"),
                        "must not have a #fragment (#insecure would turn certificate checks off)",
                    ));
                }
                if let Err(e) = tidegate_redis::check_url(&url) {
                    return Err(self.error(&at.key("redis_url"), e));
                }
                let tls = match &raw.redis_tls {
                    None => None,
                    Some(_) if !url.starts_with("rediss://") => {
                        return Err(self.error(&at.key("redis_tls"), "is for a rediss:// redis_url"))
                    }
                    Some(files) => Some(self.redis_tls(&at, files)?),
                };
                let timeout = raw.timeout.unwrap_or(Duration::from_millis(50));
                if timeout.is_zero() || timeout > Duration::from_secs(10) {
                    return Err(
                        self.error(&at.key("timeout"), "must be greater than 0 and at most 10s")
                    );
                }
                StoreSettings::Redis {
                    url: RedisUrl(url),
                    timeout,
                    cluster: raw.redis_cluster.unwrap_or(false),
                    tls,
                }
            }
        };
        Ok(RateLimitSettings {
            algorithm: raw.algorithm,
            max_keys: raw.max_keys,
            store,
            failure_mode: raw.failure_mode.unwrap_or_default(),
            tiers: raw.tiers,
        })
    }

    /// Checks the files of `at` (`rate_limit.redis_tls`,
    /// `events.nats_tls`) as an upstream's would be.
    pub(crate) fn check_tls_files(
        &self,
        at: &KeyPath,
        files: &TlsFiles,
    ) -> Result<(), ConfigError> {
        let settings = UpstreamTlsSettings {
            ca: files.ca.clone(),
            client_cert: files.client_cert.clone(),
            client_key: files.client_key.clone(),
            server_name: None,
        };
        ClientTls::new(&settings, UpstreamProtocol::Http1)
            .map(drop)
            .map_err(|e| self.error(&at.clone().key(e.field), &e.reason))
    }

    /// The files of `rate_limit.redis_tls`, checked and read.
    fn redis_tls(
        &self,
        at: &KeyPath,
        files: &TlsFiles,
    ) -> Result<tidegate_redis::RedisTls, ConfigError> {
        let at = at.clone().key("redis_tls");
        self.check_tls_files(&at, files)?;
        let read = |field: &str, path: &std::path::PathBuf| {
            std::fs::read(path).map_err(|e| {
                self.error(
                    &at.clone().key(field),
                    format!("cannot read {}: {e}", path.display()),
                )
            })
        };
        let ca = files.ca.as_ref().map(|p| read("ca", p)).transpose()?;
        let client = match (&files.client_cert, &files.client_key) {
            (Some(cert), Some(key)) => Some((read("client_cert", cert)?, read("client_key", key)?)),
            _ => None,
        };
        Ok(tidegate_redis::RedisTls { ca, client })
    }

    fn api_keys(&self, raw: Vec<RawApiKey>, tiers: &[Tier]) -> Result<Vec<ApiKey>, ConfigError> {
        let mut keys: Vec<ApiKey> = Vec::with_capacity(raw.len());
        for (i, k) in raw.into_iter().enumerate() {
            let at = KeyPath::default().key("api_keys").index(i);
            check_name(&k.id).map_err(|r| self.error(&at.clone().key("id"), r))?;
            if keys.iter().any(|other| other.id == k.id) {
                return Err(self.error(&at.key("id"), format!("duplicate API key id `{}`", k.id)));
            }
            let sha256 = parse_sha256(&k.key_sha256).ok_or_else(|| {
                self.error(
                    &at.clone().key("key_sha256"),
                    "must be the key's SHA-256 as 64 hex digits (sha256sum prints it)",
                )
            })?;
            if keys.iter().any(|other| other.sha256 == sha256) {
                return Err(self.error(&at.key("key_sha256"), "the same key is listed twice"));
            }
            let tier = match &k.tier {
                Some(name) => {
                    Some(tiers.iter().position(|t| t.name == *name).ok_or_else(|| {
                        self.error(&at.clone().key("tier"), format!("no tier named `{name}`"))
                    })?)
                }
                None => None,
            };
            let mut topics = Vec::with_capacity(k.topics.len());
            for (j, pattern) in k.topics.iter().enumerate() {
                topics.push(
                    TopicGlob::parse(pattern)
                        .map_err(|r| self.error(&at.clone().key("topics").index(j), r))?,
                );
            }
            keys.push(ApiKey {
                id: k.id,
                sha256,
                tier,
                topics,
            });
        }
        Ok(keys)
    }

    fn route_limit(&self, raw: RawRouteLimit, at: &KeyPath) -> Result<RouteLimit, ConfigError> {
        let quota = tidegate_resilience::ratelimit::Quota {
            limit: raw.limit,
            period: raw.per,
            burst: raw.burst,
        };
        quota
            .validate()
            .map_err(|e| self.error(&at.clone().dotted(e.field()), e.reason()))?;
        let key =
            edge::LimitKey::parse(&raw.key).map_err(|r| self.error(&at.clone().key("key"), r))?;
        Ok(RouteLimit {
            limit: tidegate_resilience::ratelimit::Limit::new(raw.algorithm, quota),
            key,
        })
    }

    fn fallback(
        &self,
        raw: RawFallback,
        upstreams: &[UpstreamConfig],
        target: &Target,
        at: &KeyPath,
    ) -> Result<Fallback, ConfigError> {
        Ok(match raw {
            RawFallback::Static {
                status,
                content_type,
                body,
            } => {
                let status = StatusCode::from_u16(status)
                    .ok()
                    .filter(|s| (200..=599).contains(&s.as_u16()))
                    .ok_or_else(|| {
                        self.error(
                            &at.clone().key("status"),
                            "must be a status from 200 to 599",
                        )
                    })?;
                HeaderValue::from_str(&content_type).map_err(|_| {
                    self.error(&at.clone().key("content_type"), "not a valid header value")
                })?;
                Fallback::Static {
                    status,
                    content_type,
                    body: body.into(),
                }
            }
            RawFallback::Upstream { upstream } => {
                let index = upstreams
                    .iter()
                    .position(|u| u.name == upstream)
                    .ok_or_else(|| {
                        self.error(
                            &at.clone().key("upstream"),
                            format!("no upstream named `{upstream}`"),
                        )
                    })?;
                let own = match target {
                    Target::Upstream(u) => *u == index,
                    Target::Split(shares) => shares.iter().any(|&(u, _)| u == index),
                    Target::Compose(_) => false,
                };
                if own {
                    return Err(self.error(
                        &at.clone().key("upstream"),
                        "the fallback must be another upstream than the route's own",
                    ));
                }
                Fallback::Upstream(index)
            }
            RawFallback::Stale {
                max_age,
                max_entries,
                max_entry_bytes,
            } => {
                if max_age.is_zero() {
                    return Err(self.error(&at.clone().key("max_age"), "must be greater than 0"));
                }
                if max_entries == 0 {
                    return Err(self.error(&at.clone().key("max_entries"), "must be at least 1"));
                }
                if max_entry_bytes == 0 {
                    return Err(
                        self.error(&at.clone().key("max_entry_bytes"), "must be at least 1")
                    );
                }
                Fallback::Stale {
                    max_age,
                    max_entries,
                    max_entry_bytes,
                }
            }
        })
    }
}

/// A run of a template: text as written, or the name inside `{…}`.
pub(crate) enum Chunk<'a> {
    Text(&'a str),
    Name(&'a str),
}

/// `text` split at its `{name}` placeholders, or why it cannot be.
pub(crate) fn placeholders(text: &str) -> Result<Vec<Chunk<'_>>, String> {
    let mut chunks = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find(['{', '}']) {
        if rest[open..].starts_with('}') {
            return Err("a `}` without its `{`".into());
        }
        if open > 0 {
            chunks.push(Chunk::Text(&rest[..open]));
        }
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("`{{{after}` is not closed with `}}`"))?;
        chunks.push(Chunk::Name(&after[..close]));
        rest = &after[close + 1..];
    }
    if !rest.is_empty() {
        chunks.push(Chunk::Text(rest));
    }
    Ok(chunks)
}

/// Whether `example` (a template with a value in each placeholder) is a
/// path, and query, starting with `/`.
pub(crate) fn is_path_template(example: &str) -> bool {
    example.starts_with('/') && example.parse::<PathAndQuery>().is_ok() && !example.contains('#')
}

fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    let Some(rest) = text.strip_prefix("https://") else {
        let base = BaseUrl::parse(text)?;
        if !base.path.is_empty() {
            return Err(format!(
                "`{text}` must not have a path; routes decide the path"
            ));
        }
        return Ok(Endpoint {
            authority: base.authority,
            tls: false,
        });
    };
    // As an http:// URL, but 443 when it names no port.
    let plain = format!("http://{rest}");
    let mut endpoint = parse_endpoint(&plain).map_err(|e| e.replace(&plain, text))?;
    endpoint.tls = true;
    let named_port = plain
        .parse::<Uri>()
        .ok()
        .and_then(|u| u.port_u16())
        .is_some();
    if !named_port {
        endpoint.authority = format!("{}:443", endpoint.authority.host())
            .parse()
            .map_err(|_| format!("`{text}` has a bad host"))?;
    }
    Ok(endpoint)
}
