//! Config of traffic management and edge policy: load balancing, outlier
//! detection, weighted splits, route rate limits, tiers, API keys,
//! fallbacks and fault injection.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, StatusCode};
use serde::Deserialize;
use tidegate_resilience::config::duration;
use tidegate_resilience::ratelimit::{Algorithm, Limit};

/// The HTTP version spoken to an upstream's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1, a pool of keep-alive connections.
    #[default]
    Http1,
    /// HTTP/2 (h2c with prior knowledge over `http://`): requests
    /// multiplexed on one connection per endpoint and worker. gRPC needs it.
    Http2,
    /// Whatever ALPN agrees on over TLS; HTTP/1.1 over `http://`.
    Auto,
}

impl UpstreamProtocol {
    /// Whether requests to `http://` endpoints go over HTTP/2.
    pub fn is_http2(self) -> bool {
        self == UpstreamProtocol::Http2
    }
}

/// How an upstream's endpoints share its traffic. Only healthy endpoints
/// that outlier detection has not ejected are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// The less busy of two endpoints picked at random (power of two choices).
    LeastRequest,
    /// The same endpoint for the same value of `hash_header` (rendezvous
    /// hashing: removing an endpoint moves only the keys it had). Requests
    /// without the header go round robin.
    ConsistentHash,
}

/// `[upstreams.outlier_detection]`: passive ejection of failing endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierDetection {
    /// On by default for an upstream with more than one endpoint (with one,
    /// there is nothing to eject); `false` turns it off.
    pub enabled: bool,
    /// 5xx answers or gateway errors (connect failure, timeout, broken
    /// exchange) in a row that eject an endpoint. Default 5.
    pub consecutive_errors: u32,
    /// An endpoint is ejected for this × the times it has been ejected.
    /// Default 30 s.
    #[serde(with = "duration")]
    pub base_ejection_time: Duration,
    /// The longest one ejection lasts. Default 300 s.
    #[serde(with = "duration")]
    pub max_ejection_time: Duration,
    /// At most this percentage of the upstream's endpoints is ejected at
    /// once (at least one, never the last). Default 50.
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            enabled: true,
            consecutive_errors: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

impl OutlierDetection {
    /// The first problem, as (key, reason).
    pub(crate) fn problem(&self) -> Option<(&'static str, &'static str)> {
        if self.consecutive_errors == 0 {
            Some(("consecutive_errors", "must be at least 1"))
        } else if self.base_ejection_time.is_zero() {
            Some(("base_ejection_time", "must be greater than 0"))
        } else if self.max_ejection_time < self.base_ejection_time {
            Some(("max_ejection_time", "must be at least base_ejection_time"))
        } else if self.max_ejection_percent > 100 {
            Some(("max_ejection_percent", "must be at most 100"))
        } else {
            None
        }
    }
}

/// What a route's rate limit counts by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    /// The client's address.
    ClientIp,
    /// The API key's id; requests without a valid key count by address.
    ApiKey,
    /// A request header's value; requests without it count by address.
    Header(HeaderName),
}

impl LimitKey {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        match text {
            "client_ip" => Ok(LimitKey::ClientIp),
            "api_key" => Ok(LimitKey::ApiKey),
            _ => match text.strip_prefix("header:") {
                Some(name) => HeaderName::from_bytes(name.trim().as_bytes())
                    .map(LimitKey::Header)
                    .map_err(|_| format!("`{name}` is not a valid header name")),
                None => Err(format!(
                    "`{text}` is not a key: use client_ip, api_key or header:NAME"
                )),
            },
        }
    }
}

/// A route's `rate_limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteLimit {
    /// Algorithm and quota, per key.
    pub limit: Limit,
    /// What is counted.
    pub key: LimitKey,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRouteLimit {
    #[serde(default)]
    pub(crate) algorithm: Algorithm,
    pub(crate) limit: u32,
    #[serde(with = "duration")]
    pub(crate) per: Duration,
    #[serde(default)]
    pub(crate) burst: Option<u32>,
    #[serde(default = "client_ip")]
    pub(crate) key: String,
}

fn client_ip() -> String {
    "client_ip".into()
}

/// `[rate_limit]`: settings of the gateway's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitSettings {
    /// The algorithm of the tiers' per-minute and per-hour limits.
    pub algorithm: Algorithm,
    /// Most keys (clients, API keys, header values) whose counts are kept
    /// in this process; beyond it the idlest are forgotten.
    pub max_keys: usize,
    /// Where the counts live.
    pub store: StoreSettings,
    /// What a request gets when the shared store cannot decide.
    pub failure_mode: FailureMode,
    /// The tiers, in file order.
    pub tiers: Vec<Tier>,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        RateLimitSettings {
            algorithm: Algorithm::SlidingWindow,
            max_keys: 100_000,
            store: StoreSettings::Local,
            failure_mode: FailureMode::Open,
            tiers: Vec::new(),
        }
    }
}

/// `rate_limit.store`: where limiter counts live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSettings {
    /// In this process: each replica counts on its own.
    Local,
    /// In Redis, shared by every replica that names the same server.
    Redis {
        /// `redis_url`.
        url: RedisUrl,
        /// `timeout`: how long one decision may take. Default 50 ms.
        timeout: Duration,
        /// `redis_cluster`: `url` is a seed node of a Redis Cluster.
        cluster: bool,
        /// `redis_tls`, read: a `rediss://` server's CA and client certificate.
        tls: Option<tidegate_redis::RedisTls>,
    },
}

/// `rate_limit.redis_tls`, `events.nats_tls`: the CA a server's
/// certificate chains to (default: the system's roots) and a client
/// certificate for servers that require one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA (PEM).
    pub ca: Option<std::path::PathBuf>,
    /// A client certificate chain (PEM), with `client_key`.
    pub client_cert: Option<std::path::PathBuf>,
    /// Its key (PEM).
    pub client_key: Option<std::path::PathBuf>,
}

/// A Redis URL, which may hold a password: its `Debug` hides the credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(pub String);

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", redact_credentials(&self.0))
    }
}

/// `url` with anything between `scheme://` and `@` replaced by `***`.
pub fn redact_credentials(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// `rate_limit.failure_mode`: the answer when the shared store cannot decide
/// (down, too slow, or its breaker open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Decide with this replica's own counts, so limits still hold per
    /// replica. The default: an outage of Redis is not an outage of the API.
    #[default]
    Open,
    /// Refuse with 503.
    Closed,
}

impl FailureMode {
    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureMode::Open => "open",
            FailureMode::Closed => "closed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StoreKind {
    #[default]
    Local,
    Redis,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    #[serde(default)]
    pub(crate) algorithm: Algorithm,
    #[serde(default = "max_keys")]
    pub(crate) max_keys: usize,
    #[serde(default)]
    pub(crate) store: StoreKind,
    pub(crate) redis_url: Option<String>,
    pub(crate) redis_cluster: Option<bool>,
    pub(crate) redis_tls: Option<TlsFiles>,
    #[serde(default, with = "duration::option")]
    pub(crate) timeout: Option<Duration>,
    pub(crate) failure_mode: Option<FailureMode>,
    #[serde(default)]
    pub(crate) tiers: Vec<Tier>,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        RawRateLimit {
            algorithm: Algorithm::SlidingWindow,
            max_keys: max_keys(),
            store: StoreKind::Local,
            redis_url: None,
            redis_cluster: None,
            redis_tls: None,
            timeout: None,
            failure_mode: None,
            tiers: Vec::new(),
        }
    }
}

fn max_keys() -> usize {
    100_000
}

/// `[[rate_limit.tiers]]`: limits every API key of the tier gets, each key
/// counted on its own, on every route.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Unique name, referenced by API keys and routes.
    pub name: String,
    /// Requests per minute per key.
    pub requests_per_minute: Option<u32>,
    /// Requests per hour per key.
    pub requests_per_hour: Option<u32>,
    /// Requests in flight per key.
    pub concurrent_requests: Option<u32>,
}

/// `[[api_keys]]`: a client's key, stored as its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Who it belongs to (logged and sent upstream; the key never is).
    pub id: String,
    /// SHA-256 of the key.
    pub sha256: [u8; 32],
    /// Index into [`RateLimitSettings::tiers`].
    pub tier: Option<usize>,
    /// The event topics the key may publish to and read (with
    /// `events.require_api_key`); none: no topic.
    pub topics: Vec<super::TopicGlob>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawApiKey {
    pub(crate) id: String,
    pub(crate) key_sha256: String,
    pub(crate) tier: Option<String>,
    #[serde(default)]
    pub(crate) topics: Vec<String>,
}

/// Parses 64 hex digits.
pub(crate) fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    let text = text.as_bytes();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        out[i] = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
    }
    Some(out)
}

/// What a route answers when its upstream is down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    /// A fixed answer.
    Static {
        /// Its status.
        status: StatusCode,
        /// Its `Content-Type`.
        content_type: String,
        /// Its body.
        body: Bytes,
    },
    /// The same request to another upstream (index into the upstreams).
    Upstream(usize),
    /// The last good answer to the same GET (stale-if-error).
    Stale {
        /// Answers older than this are not served.
        max_age: Duration,
        /// Most answers kept for the route.
        max_entries: usize,
        /// Larger answers are not kept.
        max_entry_bytes: usize,
    },
}

impl Fallback {
    /// The `x-tidegate-fallback` value.
    pub fn kind(&self) -> &'static str {
        match self {
            Fallback::Static { .. } => "static",
            Fallback::Upstream(_) => "upstream",
            Fallback::Stale { .. } => "stale",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum RawFallback {
    Static {
        #[serde(default = "ok")]
        status: u16,
        #[serde(default = "json")]
        content_type: String,
        #[serde(default)]
        body: String,
    },
    Upstream {
        upstream: String,
    },
    Stale {
        #[serde(default = "five_minutes", with = "duration")]
        max_age: Duration,
        #[serde(default = "thousand")]
        max_entries: usize,
        #[serde(default = "one_mib")]
        max_entry_bytes: usize,
    },
}

fn ok() -> u16 {
    200
}
fn json() -> String {
    "application/json".into()
}
fn five_minutes() -> Duration {
    Duration::from_secs(300)
}
fn thousand() -> usize {
    1000
}
fn one_mib() -> usize {
    1 << 20
}

/// A route's `fault`: drills that delay or fail a share of its requests
/// before they reach the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fault {
    /// How long delayed requests wait.
    #[serde(with = "duration::option")]
    pub delay: Option<Duration>,
    /// Percentage of requests delayed (0–100).
    pub delay_percent: f64,
    /// The status of aborted requests.
    pub abort_status: Option<u16>,
    /// Percentage of requests aborted (0–100).
    pub abort_percent: f64,
}

impl Default for Fault {
    fn default() -> Self {
        Fault {
            delay: None,
            delay_percent: 100.0,
            abort_status: None,
            abort_percent: 100.0,
        }
    }
}

impl Fault {
    /// The first problem, as (key, reason).
    pub(crate) fn problem(&self) -> Option<(&'static str, &'static str)> {
        let percent = |p: f64| (0.0..=100.0).contains(&p);
        if self.delay.is_none() && self.abort_status.is_none() {
            Some(("delay", "a fault needs a delay, an abort_status or both"))
        } else if !percent(self.delay_percent) {
            Some(("delay_percent", "must be between 0 and 100"))
        } else if !percent(self.abort_percent) {
            Some(("abort_percent", "must be between 0 and 100"))
        } else if self.abort_status.is_some_and(|s| !(400..=599).contains(&s)) {
            Some(("abort_status", "must be a 4xx or 5xx status"))
        } else {
            None
        }
    }
}

/// One share of a route's `split`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSplit {
    pub(crate) upstream: String,
    pub(crate) weight: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex_parses() {
        let hex = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let bytes = parse_sha256(hex).unwrap();
        assert_eq!(bytes[0], 0x9f);
        assert_eq!(bytes[31], 0x08);
        assert!(parse_sha256(&hex[1..]).is_none());
        assert!(parse_sha256(&hex.replace('9', "g")).is_none());
    }

    #[test]
    fn limit_keys_parse() {
        assert_eq!(LimitKey::parse("client_ip"), Ok(LimitKey::ClientIp));
        assert_eq!(LimitKey::parse("api_key"), Ok(LimitKey::ApiKey));
        assert_eq!(
            LimitKey::parse("header:x-tenant"),
            Ok(LimitKey::Header(HeaderName::from_static("x-tenant")))
        );
        assert!(LimitKey::parse("header:bad header").is_err());
        assert!(LimitKey::parse("ip").is_err());
    }
}
