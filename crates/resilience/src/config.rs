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

use std::time::Duration;

use crate::ratelimit::Limit;
use crate::settings::check;
#[cfg(feature = "serde")]
pub use crate::settings::duration;
pub use crate::settings::{parse_duration, ConfigError};
use crate::{breaker, bulkhead, retry, throttle};

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
