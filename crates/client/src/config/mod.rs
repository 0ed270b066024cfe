//! Service config: one `[services.NAME]` table per upstream service, from a
//! TOML file or built in code.
//!
//! ```toml
//! [client]
//! source_service = "chat-backend"     # the caller, in metrics
//!
//! [defaults.policy]                   # every service's policy, key by key
//! timeout = "10s"
//!
//! [services.billing]
//! base_url = "http://127.0.0.1:6004"
//! service_name = "Billing Server"     # in logs, errors and status; default: the table name
//! connect_timeout = "2s"
//! api_key_env = "BILLING_API_KEY"     # or api_key = "…"; sent as api_key_header (X-API-Key)
//! internal_token_env = "TIDEGATE_INTERNAL_TOKEN"   # sent as X-Internal-Token
//! headers = { "accept" = "application/json" }
//! [services.billing.policy.retry]     # timeout, deadline, retry, circuit_breaker, bulkhead, rate_limit …
//! max_attempts = 2
//! ```
//!
//! Environment overrides: `TIDEGATE__SERVICES__BILLING__BASE_URL=…` (see
//! [`file::Source::value`]). Errors name the file, line, key and reason.

pub mod file;
mod locate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;
use serde::Deserialize;
use tidegate_resilience::config::{duration, PolicyConfig};
use tidegate_resilience::ratelimit::Limit;
use tidegate_resilience::{breaker, bulkhead, retry};

use crate::headers::Inline;

pub use self::file::ConfigError;
use self::file::{KeyPath, Source};

/// A `http://host:port[/base/path]` URL: where a service is, and the path
/// every request path is appended to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// `host:port` (port 80 filled in when absent).
    pub authority: Authority,
    /// The base path without a trailing `/`; empty for the root.
    pub path: String,
}

impl BaseUrl {
    /// Parses a base URL. Only `http` is supported; credentials, queries and
    /// fragments are refused.
    ///
    /// ```
    /// use tidegate_client::config::BaseUrl;
    ///
    /// let base = BaseUrl::parse("http://127.0.0.1:8000/api/v1/").unwrap();
    /// assert_eq!(base.uri("indicators?x=1").unwrap(), "http://127.0.0.1:8000/api/v1/indicators?x=1");
    /// assert!(BaseUrl::parse("https://example.com").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: Uri = text.parse().map_err(|_| format!("`{text}` is not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err("https is not supported yet; use http".into()),
            _ => return Err(format!("`{text}` must start with http://")),
        }
        let Some(authority) = uri.authority().cloned() else {
            return Err(format!("`{text}` has no host"));
        };
        if authority.as_str().contains('@') {
            return Err(format!("`{text}` must not carry credentials"));
        }
        if authority.port_u16().is_none() && authority.as_str().contains(':') {
            return Err(format!("`{text}` has a bad port"));
        }
        if uri.query().is_some() || text.contains('#') {
            return Err(format!("`{text}` must not have a query or fragment"));
        }
        let authority = match authority.port_u16() {
            Some(_) => authority,
            None => format!("{}:80", authority.host())
                .parse()
                .map_err(|_| format!("`{text}` has a bad host"))?,
        };
        Ok(BaseUrl {
            authority,
            path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The URI of `path` (with its query, if any) under the base path.
    pub fn uri(&self, path: &str) -> Result<Uri, http::Error> {
        self.uri_at(&self.authority, path)
    }

    /// [`uri`](BaseUrl::uri) naming `authority` in place of the base's.
    pub(crate) fn uri_at(&self, authority: &Authority, path: &str) -> Result<Uri, http::Error> {
        let path = path.trim_start_matches('/');
        let len = self.path.len() + 1 + path.len();
        let target = if len <= INLINE_PATH {
            let mut inline = Inline::<INLINE_PATH>::default();
            inline.push(self.path.as_bytes());
            inline.push(b"/");
            inline.push(path.as_bytes());
            inline.into_bytes()
        } else {
            let mut target = String::with_capacity(len);
            target.push_str(&self.path);
            target.push('/');
            target.push_str(path);
            Bytes::from(target)
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(authority.clone());
        parts.path_and_query = Some(PathAndQuery::from_maybe_shared(target)?);
        Ok(Uri::from_parts(parts)?)
    }
}

/// Paths up to this long share one allocation with the count of their
/// users, so the clones of a call's URI (one an attempt, one more in
/// hyper-util) cost no allocation of their own; a longer path pays one
/// more when first cloned.
const INLINE_PATH: usize = 120;

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

/// A setting that is wrong: `field` (such as `base_url`) and why.
pub type FieldError = tidegate_resilience::config::ConfigError;

/// One upstream service: where it is, how to talk to it, its policies.
///
/// ```
/// use std::time::Duration;
/// use tidegate_client::config::ServiceConfig;
///
/// let billing = ServiceConfig::new("billing", "http://127.0.0.1:6004")
///     .unwrap()
///     .service_name("Billing Server")
///     .timeout(Duration::from_secs(5))
///     .api_key("secret");
/// assert_eq!(billing.policy.retry.max_attempts, 3);
/// assert!(!format!("{billing:?}").contains("secret"));
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct ServiceConfig {
    /// The name it is registered under (`billing`); `target_service` in metrics.
    pub name: String,
    /// The name in logs, errors and status (`Billing Server`); default: `name`.
    pub service_name: String,
    /// Where it is.
    pub base_url: BaseUrl,
    /// Time to open a connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Speak HTTP/2 without upgrade (h2c, prior knowledge). Default: HTTP/1.1.
    pub http2: bool,
    /// Timeout, deadline, retry, breaker, bulkhead, rate limit, throttle.
    pub policy: PolicyConfig,
    /// The API key sent with every request, if any.
    pub api_key: Option<HeaderValue>,
    /// The header the API key goes in. Default `X-API-Key`.
    pub api_key_header: HeaderName,
    /// The token sent as `X-Internal-Token`, if any.
    pub internal_token: Option<HeaderValue>,
    /// Headers sent with every request.
    pub headers: HeaderMap,
    /// Request bodies up to this size are kept so that the request can be
    /// sent again; larger ones are never retried once sent. Default 64 KiB.
    pub max_replay_bytes: usize,
    /// Largest response body read into memory (streamed responses have no
    /// limit). Default 10 MiB.
    pub max_response_bytes: usize,
    /// Idle pooled connections close after this. Default 90 s.
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per host. Default: no cap. A client then
    /// keeps as many as it had calls in flight at its busiest (no more
    /// than its bulkhead lets through), each closed after
    /// `pool_idle_timeout`. A cap below the calls usually in flight makes
    /// every call past it open a connection of its own, and close it.
    pub pool_max_idle: usize,
}

impl fmt::Debug for ServiceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets are sensitive header values: they print as `Sensitive`.
        f.debug_struct("ServiceConfig")
            .field("name", &self.name)
            .field("service_name", &self.service_name)
            .field("base_url", &self.base_url.to_string())
            .field("connect_timeout", &self.connect_timeout)
            .field("http2", &self.http2)
            .field("policy", &self.policy)
            .field("api_key", &self.api_key)
            .field("api_key_header", &self.api_key_header)
            .field("internal_token", &self.internal_token)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn secret(value: &str, field: &str) -> Result<HeaderValue, FieldError> {
    let mut value = HeaderValue::from_str(value)
        .map_err(|_| FieldError::new(field, "is not a valid header value"))?;
    value.set_sensitive(true);
    Ok(value)
}

impl ServiceConfig {
    /// A service named `name` at `base_url` with every default.
    pub fn new(name: &str, base_url: &str) -> Result<Self, FieldError> {
        check_name(name).map_err(|r| FieldError::new("name", r))?;
        let base_url = BaseUrl::parse(base_url).map_err(|r| FieldError::new("base_url", r))?;
        Ok(ServiceConfig {
            name: name.to_owned(),
            service_name: name.to_owned(),
            base_url,
            connect_timeout: Duration::from_secs(5),
            http2: false,
            policy: PolicyConfig::default(),
            api_key: None,
            api_key_header: HeaderName::from_static("x-api-key"),
            internal_token: None,
            headers: HeaderMap::new(),
            max_replay_bytes: 64 * 1024,
            max_response_bytes: 10 * 1024 * 1024,
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle: usize::MAX,
        })
    }

    /// Sets the display name.
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service_name = name.into();
        self
    }

    /// Sets the connect timeout.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Speaks h2c with prior knowledge.
    pub fn http2(mut self, on: bool) -> Self {
        self.http2 = on;
        self
    }

    /// Replaces every policy.
    pub fn policy(mut self, policy: PolicyConfig) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the per-attempt timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.policy.timeout = Some(timeout);
        self
    }

    /// Sets the deadline of a whole call with its retries.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.policy.deadline = Some(deadline);
        self
    }

    /// Sets the retry policy.
    pub fn retry(mut self, retry: retry::Config) -> Self {
        self.policy.retry = retry;
        self
    }

    /// Sets the circuit breaker.
    pub fn circuit_breaker(mut self, breaker: breaker::Config) -> Self {
        self.policy.circuit_breaker = breaker;
        self
    }

    /// Sets the bulkhead.
    pub fn bulkhead(mut self, bulkhead: bulkhead::Config) -> Self {
        self.policy.bulkhead = bulkhead;
        self
    }

    /// Limits the rate of calls.
    pub fn rate_limit(mut self, limit: Limit) -> Self {
        self.policy.rate_limit = Some(limit);
        self
    }

    /// Sends `key` in the API key header.
    ///
    /// # Panics
    /// If `key` is not a valid header value.
    pub fn api_key(mut self, key: &str) -> Self {
        self.api_key = Some(secret(key, "api_key").expect("a valid header value"));
        self
    }

    /// Names the API key header.
    pub fn api_key_header(mut self, name: HeaderName) -> Self {
        self.api_key_header = name;
        self
    }

    /// Sends `token` as `X-Internal-Token`.
    ///
    /// # Panics
    /// If `token` is not a valid header value.
    pub fn internal_token(mut self, token: &str) -> Self {
        self.internal_token = Some(secret(token, "internal_token").expect("a valid header value"));
        self
    }

    /// Sends `name: value` with every request.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Sets the replay cap of request bodies.
    pub fn max_replay_bytes(mut self, bytes: usize) -> Self {
        self.max_replay_bytes = bytes;
        self
    }

    /// Sets the largest response body read into memory.
    pub fn max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes;
        self
    }

    /// Checks every setting; the error names the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_name(&self.name).map_err(|r| FieldError::new("name", r))?;
        if self.connect_timeout.is_zero() {
            return Err(FieldError::new("connect_timeout", "must be greater than 0"));
        }
        if self.max_response_bytes == 0 {
            return Err(FieldError::new("max_response_bytes", "must be at least 1"));
        }
        self.policy.validate().map_err(|e| e.within("policy"))
    }
}

/// The whole services file.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// The calling service (`source_service` in metrics). Default `tidegate-client`.
    pub source_service: String,
    /// The services, by name.
    pub services: Vec<ServiceConfig>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            source_service: "tidegate-client".into(),
            services: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    client: RawClient,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    services: BTreeMap<String, RawService>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    source_service: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    #[serde(default)]
    policy: PolicyConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    base_url: String,
    service_name: Option<String>,
    #[serde(default, with = "duration::option")]
    connect_timeout: Option<Duration>,
    #[serde(default)]
    http2: bool,
    #[serde(default)]
    policy: PolicyConfig,
    api_key: Option<String>,
    api_key_env: Option<String>,
    api_key_header: Option<String>,
    internal_token_env: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    max_replay_bytes: Option<usize>,
    max_response_bytes: Option<usize>,
    #[serde(default, with = "duration::option")]
    pool_idle_timeout: Option<Duration>,
    pool_max_idle: Option<usize>,
}

/// Reads the services file at `path`, with overrides from the process environment.
pub fn load(path: &Path) -> Result<ClientConfig, ConfigError> {
    let text = file::read(path)?;
    parse(&text, &path.display().to_string(), std::env::vars())
}

/// Validates services file `text` (named `file` in errors) with
/// `TIDEGATE__…` overrides from `env`. Environment variables named by
/// `api_key_env` and `internal_token_env` are read from `env` too.
pub fn parse(
    text: &str,
    file: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<ClientConfig, ConfigError> {
    let env: Vec<(String, String)> = env.into_iter().collect();
    let mut source = Source::parse(text, file)?;
    let mut root = source.value(env.iter().cloned())?;
    source.merge_policy_defaults(&mut root, "services");
    let raw: RawFile = source.deserialize(root)?;
    let var = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());

    raw.defaults.policy.validate().map_err(|e| {
        let at = KeyPath::default().key("defaults").key("policy");
        source.error(&at.dotted(e.field()), e.reason())
    })?;
    let mut config = ClientConfig::default();
    if let Some(source_service) = raw.client.source_service {
        config.source_service = source_service;
    }
    for (name, s) in raw.services {
        let at = KeyPath::default().key("services").key(&name);
        let field = |e: FieldError| source.error(&at.clone().dotted(e.field()), e.reason());
        let mut service = ServiceConfig::new(&name, &s.base_url).map_err(|e| match e.field() {
            "name" => source.error(&at, format!("service name {}", e.reason())),
            _ => field(e),
        })?;
        if let Some(display) = s.service_name {
            service.service_name = display;
        }
        service.connect_timeout = s.connect_timeout.unwrap_or(service.connect_timeout);
        service.http2 = s.http2;
        service.policy = s.policy;
        service.api_key = match (s.api_key, s.api_key_env) {
            (Some(_), Some(_)) => {
                return Err(source.error(
                    &at.key("api_key_env"),
                    "set either api_key or api_key_env, not both",
                ))
            }
            (Some(key), None) => Some(secret(&key, "api_key").map_err(field)?),
            (None, Some(name)) => Some(from_env(&name, "api_key_env", var).map_err(field)?),
            (None, None) => None,
        };
        if let Some(header) = s.api_key_header {
            service.api_key_header = HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
                source.error(&at.clone().key("api_key_header"), "not a valid header name")
            })?;
        }
        if let Some(name) = s.internal_token_env {
            service.internal_token =
                Some(from_env(&name, "internal_token_env", var).map_err(field)?);
        }
        for (name, value) in &s.headers {
            let key = at.clone().key("headers").key(name);
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| source.error(&key, "not a valid header name"))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| source.error(&key, "not a valid header value"))?;
            service.headers.insert(name, value);
        }
        service.max_replay_bytes = s.max_replay_bytes.unwrap_or(service.max_replay_bytes);
        service.max_response_bytes = s.max_response_bytes.unwrap_or(service.max_response_bytes);
        service.pool_idle_timeout = s.pool_idle_timeout.unwrap_or(service.pool_idle_timeout);
        service.pool_max_idle = s.pool_max_idle.unwrap_or(service.pool_max_idle);
        service.validate().map_err(field)?;
        config.services.push(service);
    }
    Ok(config)
}

/// A secret from the environment variable `name`, which must be set.
fn from_env<'e>(
    name: &str,
    field: &str,
    var: impl Fn(&str) -> Option<&'e str>,
) -> Result<HeaderValue, FieldError> {
    if name.is_empty() || name.contains('=') {
        return Err(FieldError::new(
            field,
            "must be an environment variable name",
        ));
    }
    let value = var(name)
        .ok_or_else(|| FieldError::new(field, format!("environment variable {name} is not set")))?;
    secret(value, field).map_err(|_| {
        FieldError::new(
            field,
            format!("environment variable {name} is not a valid header value"),
        )
    })
}

/// Names of services, upstreams and routes: 1 to 64 of letters, digits, `-`, `_`, `.`.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err("must be 1 to 64 of letters, digits, `-`, `_` or `.`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn uris_join_the_base_path_at_any_length() {
        let base = BaseUrl::parse("http://svc:8000/api/").unwrap();
        assert_eq!(base.uri("x?q=1").unwrap(), "http://svc:8000/api/x?q=1");
        assert_eq!(base.uri("/").unwrap(), "http://svc:8000/api/");
        // Around where the path stops fitting in its shared allocation.
        for n in [INLINE_PATH - 6, INLINE_PATH - 5, INLINE_PATH - 4, 500] {
            let tail = "a".repeat(n);
            let uri = base.uri(&tail).unwrap();
            assert_eq!(uri.path(), format!("/api/{tail}"));
            assert_eq!(uri.clone(), uri);
        }
        assert!(base.uri("bad path").is_err());
        let root = BaseUrl::parse("http://svc").unwrap();
        assert_eq!(root.uri("").unwrap(), "http://svc:80/");
    }

    #[test]
    fn a_full_file() {
        let text = r#"
[client]
source_service = "chat-backend"

[defaults.policy]
timeout = "3s"

[services.billing]
base_url = "http://127.0.0.1:6004/api"
service_name = "Billing Server"
api_key_env = "BILLING_KEY"
api_key_header = "x-billing-key"
internal_token_env = "TOKEN"
headers = { "accept" = "application/json" }
http2 = true
[services.billing.policy.retry]
max_attempts = 2
"#;
        let config = parse(
            text,
            "s.toml",
            env(&[
                ("BILLING_KEY", "k1"),
                ("TOKEN", "t1"),
                ("TIDEGATE__SERVICES__BILLING__CONNECT_TIMEOUT", "250ms"),
            ]),
        )
        .unwrap();
        assert_eq!(config.source_service, "chat-backend");
        let s = &config.services[0];
        assert_eq!(s.name, "billing");
        assert_eq!(s.service_name, "Billing Server");
        assert_eq!(s.base_url.path, "/api");
        assert_eq!(s.policy.timeout, Some(Duration::from_secs(3)));
        assert_eq!(s.policy.retry.max_attempts, 2);
        assert_eq!(s.connect_timeout, Duration::from_millis(250));
        assert_eq!(s.api_key.as_ref().unwrap(), "k1");
        assert!(s.api_key.as_ref().unwrap().is_sensitive());
        assert_eq!(s.api_key_header, "x-billing-key");
        assert_eq!(s.internal_token.as_ref().unwrap(), "t1");
        assert_eq!(s.headers["accept"], "application/json");
        assert!(s.http2);
    }

    #[test]
    fn errors_say_where() {
        let cases = [
            (
                "[services.a]\nbase_url = \"https://x\"\n",
                "s.toml:2:1: services.a.base_url: https is not supported yet; use http",
            ),
            (
                "[services.a]\nbase_url = \"http://x\"\ntimeout = \"1s\"\n",
                "s.toml:3:1: services.a.timeout: unknown field `timeout`, expected one of",
            ),
            (
                "[services.a]\nbase_url = \"http://x\"\n[services.a.policy.retry]\nmax_attempts = 0\n",
                "s.toml:4:1: services.a.policy.retry.max_attempts: must be at least 1",
            ),
            (
                "[services.a]\nbase_url = \"http://x\"\ninternal_token_env = \"NOPE\"\n",
                "s.toml:3:1: services.a.internal_token_env: environment variable NOPE is not set",
            ),
            (
                "[services.\"a b\"]\nbase_url = \"http://x\"\n",
                "s.toml:1:11: services.a b: service name must be 1 to 64",
            ),
            (
                "[services.a]\nbase_url = \"http://x\"\npolicy = { timeout = \"0s\" }\n",
                "s.toml:3:12: services.a.policy.timeout: must be greater than 0",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text, "s.toml", []).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err}\nwanted: {want}");
        }
    }
}
