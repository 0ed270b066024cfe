//! Policy configuration: the settings of every policy with the defaults of
//! DESIGN.md, duration parsing (`"250ms"`, `"60s"`, `"1m"`, `"1h"`) and
//! validation errors that name the field.
//!
//! With the `serde` feature (on by default) every settings struct
//! deserializes, unknown keys are errors, and missing keys take the defaults:
//!
//! ```
//! # #[cfg(feature = "serde")] {
//! use std::time::Duration;
//! use tidegate_resilience::config::PolicyConfig;
//!
//! let policy: PolicyConfig = toml::from_str(r#"
//!     timeout = "2s"
//!     [retry]
//!     max_attempts = 2
//!     jitter = "decorrelated"
//! "#).unwrap();
//! assert_eq!(policy.timeout, Some(Duration::from_secs(2)));
//! assert_eq!(policy.retry.max_attempts, 2);
//! assert_eq!(policy.circuit_breaker.consecutive_failures, 5);
//! policy.validate().unwrap();
//! # }
//! ```

use std::fmt;
use std::time::Duration;

use crate::ratelimit::Limit;
use crate::{breaker, bulkhead, retry, throttle};

/// A setting is out of range. `field` is a dotted path such as `retry.max_attempts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    field: String,
    reason: String,
}

impl ConfigError {
    /// `field` is wrong because `reason`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The dotted path of the bad field.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// Why it is wrong.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Puts `prefix.` in front of the field path.
    pub fn within(mut self, prefix: &str) -> Self {
        self.field = format!("{prefix}.{}", self.field);
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

pub(crate) fn check(ok: bool, field: &str, reason: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(field, reason))
    }
}

/// Parses `"250ms"`, `"1.5s"`, `"60s"`, `"1m"`, `"1h"` (also `"us"` and `"d"`).
///
/// ```
/// use std::time::Duration;
/// use tidegate_resilience::config::parse_duration;
///
/// assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
/// assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
/// assert!(parse_duration("10").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!("invalid duration {text:?}: expected a number and a unit (us, ms, s, m, h, d), like \"250ms\"")
    };
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let scale = match unit.trim() {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(number * scale).map_err(|_| bad())
}

/// Serde helpers for durations written as strings.
#[cfg(feature = "serde")]
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    /// Deserializes `"250ms"` and the like.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }

    /// The same for an optional duration.
    pub mod option {
        use super::*;

        /// Deserializes an optional `"250ms"`.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

/// A rate limit as written in config: `{ algorithm, limit, per, burst }`.
#[cfg(feature = "serde")]
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimit {
    #[serde(default)]
    algorithm: crate::ratelimit::Algorithm,
    limit: u32,
    #[serde(with = "duration")]
    per: Duration,
    #[serde(default)]
    burst: Option<u32>,
}

#[cfg(feature = "serde")]
impl TryFrom<RawLimit> for Limit {
    type Error = ConfigError;

    fn try_from(raw: RawLimit) -> Result<Self, ConfigError> {
        let quota = crate::ratelimit::Quota {
            limit: raw.limit,
            period: raw.per,
            burst: raw.burst,
        };
        quota.validate()?;
        Ok(Limit::new(raw.algorithm, quota))
    }
}

/// Every policy for one upstream, as `[defaults.policy]` and
/// `[upstreams.policy]` hold them. Retry, breaker and bulkhead are on by
/// default; adaptive throttling and the rate limit only when configured.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct PolicyConfig {
    /// Per-attempt timeout. Default 10 s.
    #[cfg_attr(feature = "serde", serde(with = "duration::option"))]
    pub timeout: Option<Duration>,
    /// Deadline for the whole call with its retries. Default 30 s.
    #[cfg_attr(feature = "serde", serde(with = "duration::option"))]
    pub deadline: Option<Duration>,
    /// Retry settings.
    pub retry: retry::Config,
    /// Circuit breaker settings.
    pub circuit_breaker: breaker::Config,
    /// Bulkhead settings.
    pub bulkhead: bulkhead::Config,
    /// Adaptive throttling, when set.
    pub adaptive_throttle: Option<throttle::Config>,
    /// A rate limit on all calls, when set.
    pub rate_limit: Option<Limit>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            timeout: Some(Duration::from_secs(10)),
            deadline: Some(Duration::from_secs(30)),
            retry: retry::Config::default(),
            circuit_breaker: breaker::Config::default(),
            bulkhead: bulkhead::Config::default(),
            adaptive_throttle: None,
            rate_limit: None,
        }
    }
}

impl PolicyConfig {
    /// Checks every policy; the error's field is a path like `retry.max_attempts`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            self.timeout.is_none_or(|t| !t.is_zero()),
            "timeout",
            "must be greater than 0",
        )?;
        check(
            self.deadline.is_none_or(|t| !t.is_zero()),
            "deadline",
            "must be greater than 0",
        )?;
        self.retry.validate().map_err(|e| e.within("retry"))?;
        self.circuit_breaker
            .validate()
            .map_err(|e| e.within("circuit_breaker"))?;
        self.bulkhead.validate().map_err(|e| e.within("bulkhead"))?;
        if let Some(throttle) = &self.adaptive_throttle {
            throttle
                .validate()
                .map_err(|e| e.within("adaptive_throttle"))?;
        }
        if let Some(limit) = &self.rate_limit {
            limit.quota.validate().map_err(|e| e.within("rate_limit"))?;
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "serde"))]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_field() {
        let policy: PolicyConfig = toml::from_str("[retry]\nmax_attempts = 0").unwrap();
        let err = policy.validate().unwrap_err();
        assert_eq!(err.field(), "retry.max_attempts");
        assert_eq!(err.to_string(), "retry.max_attempts: must be at least 1");

        let err = toml::from_str::<PolicyConfig>("[circuit_breaker]\nopen = \"1s\"").unwrap_err();
        assert!(err.to_string().contains("unknown field `open`"), "{err}");

        let err = toml::from_str::<PolicyConfig>("timeout = \"soon\"").unwrap_err();
        assert!(
            err.to_string().contains("invalid duration \"soon\""),
            "{err}"
        );
    }

    #[test]
    fn rate_limit_parses_and_validates() {
        let policy: PolicyConfig = toml::from_str(
            "rate_limit = { algorithm = \"gcra\", limit = 100, per = \"1m\", burst = 10 }",
        )
        .unwrap();
        let limit = policy.rate_limit.unwrap();
        assert_eq!(limit.quota.burst(), 10);
        let err =
            toml::from_str::<PolicyConfig>("rate_limit = { limit = 0, per = \"1m\" }").unwrap_err();
        assert!(
            err.to_string().contains("limit: must be at least 1"),
            "{err}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        for bad in ["", "s", "1", "1x", "-1s", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
