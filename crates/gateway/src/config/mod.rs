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

mod locate;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderName, HeaderValue, Method, Uri};
use serde::Deserialize;
use tidegate_resilience::config::{duration, PolicyConfig};

use self::locate::{KeyPath, Segment};

/// A config that cannot be used, and where the problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `file:line:col`, `file`, or `env NAME`.
    pub location: String,
    /// The key path, e.g. `routes[1].upstream`; empty for the whole file.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.location, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.location, self.key, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

/// The whole config, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listeners and limits.
    pub gateway: GatewaySettings,
    /// Upstream services, in file order.
    pub upstreams: Vec<UpstreamConfig>,
    /// Routes, in file order.
    pub routes: Vec<RouteConfig>,
}

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
    /// Open client connections at most; more wait in the accept queue.
    pub max_connections: usize,
    /// On shutdown, in-flight requests get this long to finish.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
    /// Environment variable holding the token sent upstream as `X-Internal-Token`.
    pub internal_token_env: Option<String>,
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
            max_connections: 10_000,
            drain_timeout: Duration::from_secs(30),
            internal_token_env: None,
        }
    }
}

/// How an upstream's endpoints share its traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    /// Each healthy endpoint in turn.
    #[default]
    RoundRobin,
}

/// `[upstreams.health_check]`: active checks of every endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Path requested with GET; a 2xx answer is healthy.
    pub path: String,
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
            path: "/health".into(),
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

/// One endpoint of an upstream: `http://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port`.
    pub authority: Authority,
}

impl Endpoint {
    /// The URI of `path_and_query` on this endpoint.
    pub fn uri(&self, path_and_query: PathAndQuery) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}", self.authority)
    }
}

/// `[[upstreams]]`: a service and its policies.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Unique name (in metrics, status and errors).
    pub name: String,
    /// Its endpoints, at least one.
    pub endpoints: Vec<Endpoint>,
    /// How endpoints are chosen.
    pub load_balancing: LoadBalancing,
    /// Active health checks, if configured.
    pub health_check: Option<HealthCheckConfig>,
    /// `[defaults.policy]` with this upstream's overrides.
    pub policy: PolicyConfig,
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
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    /// Overrides `gateway.max_body_bytes`.
    pub max_body_bytes: Option<u64>,
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
    health_check: Option<HealthCheckConfig>,
    #[serde(default)]
    policy: PolicyConfig,
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
    upstream: String,
    max_body_bytes: Option<u64>,
}

/// Reads and validates the config at `path`, with overrides from the
/// process environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        location: path.display().to_string(),
        key: String::new(),
        reason: format!("cannot read: {e}"),
    })?;
    parse(&text, &path.display().to_string(), std::env::vars())
}

/// Validates config `text` (named `file` in errors) with `TIDEGATE__…` overrides from `env`.
pub fn parse(
    text: &str,
    file: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let doc = toml_edit::ImDocument::parse(text).map_err(|e| {
        let location = match e.span() {
            Some(span) => {
                let (line, col) = locate::line_col(text, span.start);
                format!("{file}:{line}:{col}")
            }
            None => file.to_owned(),
        };
        ConfigError {
            location,
            key: String::new(),
            reason: e.message().trim().to_owned(),
        }
    })?;
    let at = Locator {
        text,
        file,
        doc: &doc,
        overrides: Vec::new(),
    };
    let table: toml::Table =
        toml::from_str(text).map_err(|e| at.error(&KeyPath::default(), e.message()))?;
    let mut root = toml::Value::Table(table);
    let mut at = at;
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("TIDEGATE__") else {
            continue;
        };
        let path = env_path(rest);
        set_override(&mut root, &path, &value).map_err(|reason| ConfigError {
            location: format!("env {name}"),
            key: path.to_string(),
            reason,
        })?;
        at.overrides.push((path, name));
    }
    if let toml::Value::Table(table) = &mut root {
        merge_policy_defaults(table);
    }
    let raw: RawConfig = serde_path_to_error::deserialize(root).map_err(|e| {
        let mut path = KeyPath::from_serde(e.path());
        let message = e.inner().message().trim();
        if let Some(field) = unknown_field(message) {
            if path.0.last() != Some(&Segment::Key(field.to_owned())) {
                path = path.key(field);
            }
        }
        at.error(&path, message)
    })?;
    at.validate(raw)
}

/// Where errors point: the file and its parsed document, and which paths
/// came from the environment.
struct Locator<'a> {
    text: &'a str,
    file: &'a str,
    doc: &'a toml_edit::ImDocument<&'a str>,
    overrides: Vec<(KeyPath, String)>,
}

impl Locator<'_> {
    fn error(&self, path: &KeyPath, reason: impl fmt::Display) -> ConfigError {
        let reason = reason.to_string();
        if let Some((_, var)) = self
            .overrides
            .iter()
            .rev()
            .find(|(p, _)| path.starts_with(p))
        {
            return ConfigError {
                location: format!("env {var}"),
                key: path.to_string(),
                reason,
            };
        }
        // An upstream's policy value may have come from `[defaults.policy]`.
        let path = match path.0.as_slice() {
            [Segment::Key(u), Segment::Index(_), Segment::Key(p), rest @ ..]
                if u == "upstreams" && p == "policy" && !locate::contains(self.doc, path) =>
            {
                let defaults = KeyPath::default().key("defaults").key("policy");
                let defaults =
                    KeyPath(defaults.0.into_iter().chain(rest.iter().cloned()).collect());
                if locate::contains(self.doc, &defaults) {
                    defaults
                } else {
                    path.clone()
                }
            }
            _ => path.clone(),
        };
        let location = match locate::span(self.doc, &path) {
            Some(span) => {
                let (line, col) = locate::line_col(self.text, span.start);
                format!("{}:{line}:{col}", self.file)
            }
            None => self.file.to_owned(),
        };
        ConfigError {
            location,
            key: path.to_string(),
            reason,
        }
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
        if gateway.header_read_timeout.is_zero() {
            return Err(self.error(
                &g.clone().key("header_read_timeout"),
                "must be greater than 0",
            ));
        }
        if let Some(var) = &gateway.internal_token_env {
            if var.is_empty() || var.contains('=') {
                return Err(self.error(
                    &g.key("internal_token_env"),
                    "must be an environment variable name",
                ));
            }
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
            if let Some(hc) = &u.health_check {
                let h = at.clone().key("health_check");
                let problem = if !hc.path.starts_with('/')
                    || hc.path.parse::<http::uri::PathAndQuery>().is_err()
                {
                    Some(("path", "must be a path starting with `/`"))
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
            upstreams.push(UpstreamConfig {
                name: u.name,
                endpoints,
                load_balancing: u.load_balancing,
                health_check: u.health_check,
                policy: u.policy,
            });
        }

        let mut route_names = HashSet::new();
        let mut routes = Vec::with_capacity(raw.routes.len());
        for (i, r) in raw.routes.into_iter().enumerate() {
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
            let Some(upstream) = upstreams.iter().position(|u| u.name == r.upstream) else {
                return Err(self.error(
                    &at.key("upstream"),
                    format!("no upstream named `{}`", r.upstream),
                ));
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
                methods.push(method);
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
            routes.push(RouteConfig {
                name: r.name,
                path_prefix: r.path_prefix,
                strip_prefix: r.strip_prefix,
                methods,
                headers,
                upstream,
                max_body_bytes: r.max_body_bytes,
            });
        }
        Ok(Config {
            gateway,
            upstreams,
            routes,
        })
    }
}

fn check_name(name: &str) -> Result<(), &'static str> {
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

fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    let uri: Uri = text.parse().map_err(|_| format!("`{text}` is not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err("https endpoints are not supported yet; use http".into()),
        _ => return Err(format!("`{text}` must start with http://")),
    }
    let Some(authority) = uri.authority().cloned() else {
        return Err(format!("`{text}` has no host"));
    };
    if authority.port_u16().is_none() && authority.as_str().contains(':') {
        return Err(format!("`{text}` has a bad port"));
    }
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err(format!(
            "`{text}` must not have a path; routes decide the path"
        ));
    }
    if authority.as_str().contains('@') {
        return Err(format!("`{text}` must not carry credentials"));
    }
    let authority = match authority.port_u16() {
        Some(_) => authority,
        None => format!("{}:80", authority.host())
            .parse()
            .map_err(|_| format!("`{text}` has a bad host"))?,
    };
    Ok(Endpoint { authority })
}

/// The serde message for an unknown key names it between backticks.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// `GATEWAY__LISTEN` → `gateway.listen`; numbers index arrays.
fn env_path(rest: &str) -> KeyPath {
    KeyPath(
        rest.split("__")
            .map(|s| match s.parse::<usize>() {
                Ok(i) => Segment::Index(i),
                Err(_) => Segment::Key(s.to_ascii_lowercase()),
            })
            .collect(),
    )
}

/// Sets the value at `path` (tables are made as needed; array elements must exist).
fn set_override(root: &mut toml::Value, path: &KeyPath, raw: &str) -> Result<(), String> {
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    let mut node = root;
    let mut walked = KeyPath::default();
    for segment in &path.0 {
        node = match (segment, node) {
            (Segment::Key(k), toml::Value::Table(t)) => t
                .entry(k.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new())),
            (Segment::Index(i), toml::Value::Array(items)) => items
                .get_mut(*i)
                .ok_or_else(|| format!("`{walked}` has no element {i}"))?,
            (Segment::Key(_), _) => return Err(format!("`{walked}` is not a table")),
            (Segment::Index(_), _) => return Err(format!("`{walked}` is not an array")),
        };
        walked.0.push(segment.clone());
    }
    *node = value;
    Ok(())
}

/// Puts `[defaults.policy]` under every upstream's own policy, key by key.
fn merge_policy_defaults(table: &mut toml::Table) {
    let defaults = table
        .get("defaults")
        .and_then(|d| d.get("policy"))
        .and_then(|p| p.as_table())
        .cloned()
        .unwrap_or_default();
    let Some(toml::Value::Array(upstreams)) = table.get_mut("upstreams") else {
        return;
    };
    for upstream in upstreams.iter_mut().filter_map(|u| u.as_table_mut()) {
        let own = match upstream.remove("policy") {
            Some(toml::Value::Table(own)) => own,
            Some(other) => {
                // Not a table: leave it for serde to report.
                upstream.insert("policy".into(), other);
                continue;
            }
            None => toml::Table::new(),
        };
        let mut merged = defaults.clone();
        deep_merge(&mut merged, own);
        upstream.insert("policy".into(), toml::Value::Table(merged));
    }
}

fn deep_merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => deep_merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}
