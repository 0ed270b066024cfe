//! Backoff delays and jitter, as pure functions of the retry number and a random value.

use std::time::Duration;

/// How the delay grows from one retry to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum BackoffKind {
    /// `base_delay` every time.
    Constant,
    /// `base_delay × multiplier^(n-1)`, up to `max_delay`.
    #[default]
    Exponential,
}

/// How the delay is randomised, so that callers do not retry in lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Jitter {
    /// The delay as computed.
    None,
    /// Uniform in `[0, delay]`.
    #[default]
    Full,
    /// Uniform in `[delay/2, delay]`.
    Equal,
    /// Uniform in `[base, previous × 3]`, capped (AWS "decorrelated jitter").
    Decorrelated,
}

/// A backoff schedule.
///
/// ```
/// use std::time::Duration;
/// use tidegate_resilience::retry::{Backoff, BackoffKind, Jitter};
///
/// let backoff = Backoff {
///     kind: BackoffKind::Exponential,
///     base: Duration::from_millis(100),
///     multiplier: 2.0,
///     max: Duration::from_secs(1),
///     jitter: Jitter::None,
/// };
/// assert_eq!(backoff.delay(3, Duration::ZERO, 0.5), Duration::from_millis(400));
/// assert_eq!(backoff.delay(9, Duration::ZERO, 0.5), Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Constant or exponential.
    pub kind: BackoffKind,
    /// The first delay.
    pub base: Duration,
    /// Growth per retry, for exponential backoff.
    pub multiplier: f64,
    /// No delay is longer than this.
    pub max: Duration,
    /// How the delay is randomised.
    pub jitter: Jitter,
}

impl Backoff {
    /// The delay before retry number `retry` (1 for the first retry), given
    /// the previous delay (for decorrelated jitter) and a random `unit` in `[0, 1)`.
    /// Never more than `max`.
    pub fn delay(&self, retry: u32, previous: Duration, unit: f64) -> Duration {
        let max = self.max.as_secs_f64();
        let base = self.base.as_secs_f64().min(max);
        let raw = match self.kind {
            BackoffKind::Constant => base,
            BackoffKind::Exponential => {
                let exp = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
                (base * self.multiplier.max(1.0).powi(exp)).min(max)
            }
        };
        let secs = match self.jitter {
            Jitter::None => raw,
            Jitter::Full => raw * unit,
            Jitter::Equal => raw / 2.0 + raw / 2.0 * unit,
            Jitter::Decorrelated => {
                let upper = (previous.as_secs_f64() * 3.0).max(base);
                base + (upper - base) * unit
            }
        };
        // NaN and overflow both land on a bound rather than panicking.
        Duration::from_secs_f64(secs.clamp(0.0, max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff(jitter: Jitter) -> Backoff {
        Backoff {
            kind: BackoffKind::Exponential,
            base: Duration::from_millis(100),
            multiplier: 2.0,
            max: Duration::from_secs(5),
            jitter,
        }
    }

    #[test]
    fn jitter_ranges() {
        let ms = Duration::from_millis;
        assert_eq!(backoff(Jitter::Full).delay(2, ms(0), 0.0), ms(0));
        assert_eq!(backoff(Jitter::Full).delay(2, ms(0), 0.5), ms(100));
        assert_eq!(backoff(Jitter::Equal).delay(2, ms(0), 0.0), ms(100));
        assert_eq!(
            backoff(Jitter::Decorrelated).delay(2, ms(400), 0.0),
            ms(100)
        );
        assert_eq!(
            backoff(Jitter::Decorrelated).delay(2, ms(400), 0.5),
            ms(650)
        );
        assert_eq!(backoff(Jitter::None).delay(u32::MAX, ms(0), 0.9), ms(5000));
    }
}
