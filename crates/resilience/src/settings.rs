//! What every policy's settings share: the error that names a bad field,
//! the range check that makes one, and durations written as text. A leaf:
//! the policies use it, and `config` gathers the policies' settings.

use std::fmt;
use std::time::Duration;

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
