//! Edge policy: API keys, tiers and route rate limits.
//!
//! A client presents its key in `X-API-Key` or as `Authorization: Bearer`.
//! The key's SHA-256 is compared, in constant time, with every configured
//! hash; the key itself is never stored, logged or sent upstream. A request
//! with a valid key counts against its tier's per-minute, per-hour and
//! concurrent limits; a route's own limit counts by client address, API key
//! or header value. Counts live in one [`LocalStore`] shared by every
//! route and kept across config reloads, or, with `rate_limit.store =
//! "redis"`, in Redis, shared by every replica; when Redis cannot decide,
//! `failure_mode` picks between this replica's own counts and a 503.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::HeaderMap;
use sha2::{Digest, Sha256};
use tidegate_redis::{RedisConfig, RedisStore};
use tidegate_resilience::ratelimit::{Decision, KeyedConfig, Limit, LocalStore, Quota};
use tokio::time::Instant;

use crate::config::{
    ApiKey, FailureMode, LimitKey, RateLimitSettings, RouteConfig, StoreSettings, Tier,
};
use crate::observe::metrics::Metrics;

/// `X-API-Key`.
pub static API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// The id of the client's API key, sent upstream.
pub static API_KEY_ID: HeaderName = HeaderName::from_static("x-tidegate-api-key-id");
/// The tier of the client's API key, sent upstream.
pub static TIER: HeaderName = HeaderName::from_static("x-tidegate-tier");
/// `X-RateLimit-Limit`.
pub static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// `X-RateLimit-Remaining`.
pub static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
/// `X-RateLimit-Reset`: seconds until the quota is whole again.
pub static RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Counts kept across reloads: limiter state per key (here, and in Redis
/// when configured) and in-flight requests per API key.
#[derive(Debug)]
pub struct Counters {
    max_keys: usize,
    settings: StoreSettings,
    /// This replica's counts: all of them, or the fallback of fail-open.
    store: LocalStore,
    shared: Option<RedisStore>,
    in_flight: Mutex<HashMap<String, u32>>,
}

impl Counters {
    /// Empty counts under `settings` (`max_keys`, `store`). A Redis store
    /// connects on first use; this must run inside a Tokio runtime.
    pub fn new(settings: &RateLimitSettings) -> Result<Arc<Self>, String> {
        let shared = match &settings.store {
            StoreSettings::Local => None,
            StoreSettings::Redis {
                url,
                timeout,
                cluster,
                tls,
            } => {
                let config = RedisConfig {
                    timeout: *timeout,
                    cluster: *cluster,
                    tls: tls.clone(),
                    ..RedisConfig::new(url.0.clone())
                };
                let store =
                    RedisStore::open(&config).map_err(|e| format!("rate_limit.redis_url: {e}"))?;
                tracing::info!(
                    redis = store.endpoint(),
                    "rate-limit counts are kept in Redis"
                );
                Some(store)
            }
        };
        let max_keys = settings.max_keys;
        Ok(Arc::new(Counters {
            max_keys,
            settings: settings.store.clone(),
            store: LocalStore::new(KeyedConfig {
                max_keys,
                ..KeyedConfig::default()
            }),
            shared,
            in_flight: Mutex::new(HashMap::new()),
        }))
    }

    /// The most keys kept here.
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// Where counts live, as configured at start.
    pub fn store_settings(&self) -> &StoreSettings {
        &self.settings
    }

    /// The Redis store, when counts are shared.
    pub fn shared(&self) -> Option<&RedisStore> {
        self.shared.as_ref()
    }
}

/// A tier's limits, ready to check.
#[derive(Debug)]
struct TierLimits {
    name: String,
    header: HeaderValue,
    windows: Vec<(&'static str, Limit)>,
    concurrent: Option<u32>,
}

/// The API keys and tiers of one config.
#[derive(Debug)]
pub struct Edge {
    keys: Vec<ApiKey>,
    tiers: Vec<TierLimits>,
    failure_mode: FailureMode,
    counters: Arc<Counters>,
}

/// Who the client is, by its API key.
#[derive(Debug, Clone, Copy)]
pub enum Credential<'a> {
    /// It presented no key.
    Anonymous,
    /// It presented a key that is not configured.
    Unknown,
    /// It presented this key, from the header named.
    Valid(&'a ApiKey, &'static str),
}

/// Why the edge refused a request.
#[derive(Debug)]
pub enum Refusal {
    /// No valid key where one is needed (401).
    Unauthenticated(&'static str),
    /// A valid key of a tier the route does not admit (403).
    Forbidden,
    /// Over a limit (429), with the decision for the headers.
    Limited(Decision, Exceeded),
    /// The shared store could not decide and `failure_mode` is closed (503).
    StoreUnavailable,
}

/// Which limit a request was over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// A per-minute or per-hour limit of the key's tier.
    Tier,
    /// The route's own rate limit.
    Route,
    /// The tier's requests in flight per key.
    Concurrency,
}

impl Exceeded {
    /// The `reason` label of `tidegate_rejections_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Exceeded::Tier => "tier_rate_limit",
            Exceeded::Route => "route_rate_limit",
            Exceeded::Concurrency => "concurrency_limit",
        }
    }
}

/// A request's admission: the tightest limit it passed, for the response
/// headers, and its concurrency slot.
#[derive(Debug, Default)]
pub struct Admission {
    /// The decision with the fewest requests remaining, if any limit applied.
    pub decision: Option<Decision>,
    /// Held until the response ends.
    pub slot: Option<Slot>,
}

/// One in-flight request of an API key; released on drop.
#[derive(Debug)]
pub struct Slot {
    counters: Arc<Counters>,
    key: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self
            .counters
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl Edge {
    /// The keys and tiers of a config, counting in `counters`.
    pub fn new(keys: Vec<ApiKey>, settings: &RateLimitSettings, counters: Arc<Counters>) -> Self {
        let tiers = settings
            .tiers
            .iter()
            .map(|t| tier_limits(t, settings))
            .collect();
        Edge {
            keys,
            tiers,
            failure_mode: settings.failure_mode,
            counters,
        }
    }

    /// Whether any API key is configured.
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The key the request with `headers` presents, checked.
    pub fn authenticate(&self, headers: &HeaderMap) -> Credential<'_> {
        self.authenticate_by(|name| headers.get(name).map(HeaderValue::as_bytes))
    }

    /// The key the request presents, checked; `field` gives the value of
    /// its first field of a name.
    pub fn authenticate_by<'h>(
        &self,
        field: impl Fn(&HeaderName) -> Option<&'h [u8]>,
    ) -> Credential<'_> {
        let (presented, from) = match field(&API_KEY) {
            Some(v) => (v, "x-api-key"),
            None => match field(&header::AUTHORIZATION).and_then(bearer) {
                Some(token) => (token, "authorization"),
                None => return Credential::Anonymous,
            },
        };
        let digest: [u8; 32] = Sha256::digest(presented).into();
        // Every key is compared, whatever matches, so timing tells nothing.
        let mut found = None;
        for key in &self.keys {
            if constant_time_eq(&digest, &key.sha256) {
                found = Some(key);
            }
        }
        match found {
            Some(key) => Credential::Valid(key, from),
            None => Credential::Unknown,
        }
    }

    /// Checks the route's key requirement and every limit that applies.
    pub async fn admit(
        &self,
        route: &RouteConfig,
        credential: Credential<'_>,
        client: IpAddr,
        headers: &HeaderMap,
        metrics: &Metrics,
    ) -> Result<Admission, Refusal> {
        let key = match credential {
            Credential::Valid(key, _) => Some(key),
            Credential::Anonymous if route.require_api_key => {
                return Err(Refusal::Unauthenticated("an API key is required"))
            }
            Credential::Unknown if route.require_api_key => {
                return Err(Refusal::Unauthenticated("invalid API key"))
            }
            Credential::Anonymous | Credential::Unknown => None,
        };
        if !route.tiers.is_empty()
            && !key
                .and_then(|k| k.tier)
                .is_some_and(|t| route.tiers.contains(&t))
        {
            return Err(Refusal::Forbidden);
        }
        let mut admission = Admission::default();
        let tier = key.and_then(|k| Some((k, &self.tiers[k.tier?])));
        if let Some((key, tier)) = tier {
            for (window, limit) in &tier.windows {
                let counted = limit_key(
                    't',
                    &[tier.name.as_bytes(), window.as_bytes(), key.id.as_bytes()],
                );
                let decision = self.count(&counted, limit, metrics).await?;
                admission.tighten(decision, Exceeded::Tier)?;
            }
        }
        if let Some(limit) = &route.rate_limit {
            let ip;
            let (kind, who) = match (&limit.key, key) {
                (LimitKey::ApiKey, Some(key)) => ("k", key.id.as_bytes()),
                (LimitKey::Header(name), _) if headers.contains_key(name) => {
                    ("h", headers.get(name).map_or(&[][..], |v| v.as_bytes()))
                }
                _ => {
                    ip = client.to_string();
                    ("i", ip.as_bytes())
                }
            };
            let counted = limit_key('r', &[route.name.as_bytes(), kind.as_bytes(), who]);
            let decision = self.count(&counted, &limit.limit, metrics).await?;
            admission.tighten(decision, Exceeded::Route)?;
        }
        if let Some((key, tier)) = tier {
            if let Some(most) = tier.concurrent {
                admission.slot = Some(self.acquire(&key.id, most)?);
            }
        }
        Ok(admission)
    }

    /// Counts one request for `key` under `limit`, where counts live.
    async fn count(
        &self,
        key: &str,
        limit: &Limit,
        metrics: &Metrics,
    ) -> Result<Decision, Refusal> {
        let Some(shared) = &self.counters.shared else {
            return Ok(self.counters.store.check_now(key, limit, 1));
        };
        let start = Instant::now();
        let result = shared.decide(key, limit, 1).await;
        metrics.store_decision(&result, start.elapsed());
        match result {
            Ok(decision) => Ok(decision),
            Err(e) => {
                tracing::debug!(error = %e, "rate-limit store could not decide");
                metrics.store_fallback(self.failure_mode);
                match self.failure_mode {
                    FailureMode::Open => Ok(self.counters.store.check_now(key, limit, 1)),
                    FailureMode::Closed => Err(Refusal::StoreUnavailable),
                }
            }
        }
    }

    /// Whether limits can be enforced as configured: the shared store is up,
    /// or requests fall back to local counts. For `/ready`.
    pub fn store_check(&self) -> Option<(bool, bool)> {
        let shared = self.counters.shared.as_ref()?;
        let up = shared.is_up();
        Some((up, up || self.failure_mode == FailureMode::Open))
    }

    fn acquire(&self, id: &str, most: u32) -> Result<Slot, Refusal> {
        let mut map = self
            .counters
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = map.entry(id.to_owned()).or_insert(0);
        if *n >= most {
            let decision = Decision {
                allowed: false,
                limit: most,
                remaining: 0,
                reset: Duration::ZERO,
                retry_after: Some(Duration::from_secs(1)),
            };
            return Err(Refusal::Limited(decision, Exceeded::Concurrency));
        }
        *n += 1;
        Ok(Slot {
            counters: self.counters.clone(),
            key: id.to_owned(),
        })
    }

    /// The tier name of a key, as sent upstream.
    pub fn tier_header(&self, key: &ApiKey) -> Option<&HeaderValue> {
        key.tier.map(|t| &self.tiers[t].header)
    }
}

impl Admission {
    /// Keeps the tighter of the decisions so far and `decision`; a denial
    /// ends the admission.
    fn tighten(&mut self, decision: Decision, which: Exceeded) -> Result<(), Refusal> {
        if !decision.allowed {
            return Err(Refusal::Limited(decision, which));
        }
        let tighter = match &self.decision {
            None => true,
            Some(seen) => {
                (decision.remaining, std::cmp::Reverse(decision.reset))
                    < (seen.remaining, std::cmp::Reverse(seen.reset))
            }
        };
        if tighter {
            self.decision = Some(decision);
        }
        Ok(())
    }
}

fn tier_limits(tier: &Tier, settings: &RateLimitSettings) -> TierLimits {
    let mut windows = Vec::new();
    if let Some(n) = tier.requests_per_minute {
        windows.push(("m", Limit::new(settings.algorithm, Quota::per_minute(n))));
    }
    if let Some(n) = tier.requests_per_hour {
        windows.push(("h", Limit::new(settings.algorithm, Quota::per_hour(n))));
    }
    TierLimits {
        header: HeaderValue::from_str(&tier.name).expect("tier names are checked"),
        name: tier.name.clone(),
        windows,
        concurrent: tier.concurrent_requests,
    }
}

/// The token of `Authorization: Bearer TOKEN`.
fn bearer(bytes: &[u8]) -> Option<&[u8]> {
    let scheme = bytes.get(..7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| bytes[7..].trim_ascii())
        .filter(|t| !t.is_empty())
}

/// Whether two digests are equal, in time that does not depend on where they differ.
pub(crate) fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The key a rate-limit count is kept under: `kind`, then each part, each
/// after a NUL. Parts are escaped (`%`, NUL, controls and bytes past ASCII
/// as `%XX`), so different parts never make the same key: a header value
/// cannot pose as another route's or client's count.
pub fn limit_key(kind: char, parts: &[&[u8]]) -> String {
    let mut key = String::with_capacity(2 + parts.iter().map(|p| p.len() + 1).sum::<usize>());
    key.push(kind);
    for part in parts {
        key.push('\0');
        for &b in *part {
            if b == b'%' || !(0x20..0x7f).contains(&b) {
                crate::http::path::push_escaped(&mut key, b);
            } else {
                key.push(char::from(b));
            }
        }
    }
    key
}

/// `X-RateLimit-Limit`, `-Remaining` and `-Reset` (whole seconds, rounded up).
pub fn headers(decision: &Decision) -> [(HeaderName, HeaderValue); 3] {
    [
        (RATELIMIT_LIMIT.clone(), HeaderValue::from(decision.limit)),
        (
            RATELIMIT_REMAINING.clone(),
            HeaderValue::from(decision.remaining),
        ),
        (
            RATELIMIT_RESET.clone(),
            HeaderValue::from(whole_seconds(decision.reset)),
        ),
    ]
}

/// `d` in whole seconds, rounded up.
pub fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
    }

    #[test]
    fn compares_whole_digests() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        b[31] ^= 1;
        assert!(!constant_time_eq(&a, &b));
    }
}
