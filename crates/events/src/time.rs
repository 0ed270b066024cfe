//! Wall-clock time as events carry it: milliseconds since the Unix epoch,
//! and RFC 3339 text (`2026-12-05T14:54:07.123Z`).

#![allow(clippy::disallowed_types)] // The store's one reader of the wall clock: event times and the dedup window are wall-clock facts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A store's clock: the wall clock, or one a test moves by hand.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The system's wall clock.
    #[default]
    Wall,
    /// Milliseconds since the epoch that stand still until advanced.
    Manual(Arc<AtomicU64>),
}

impl Clock {
    /// A manual clock at the wall clock's time now.
    pub fn manual() -> Self {
        Clock::Manual(Arc::new(AtomicU64::new(now_millis())))
    }

    /// Moves a manual clock on by `by`; the wall clock cannot be moved.
    pub fn advance(&self, by: Duration) {
        if let Clock::Manual(millis) = self {
            let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
            millis.fetch_add(by, Ordering::Relaxed);
        }
    }

    /// Now by this clock, as events carry their time (RFC 3339, UTC,
    /// milliseconds).
    pub fn now_rfc3339(&self) -> String {
        rfc3339(self.now_millis())
    }

    /// Milliseconds since the epoch, as this clock has it.
    pub fn now_millis(&self) -> u64 {
        match self {
            Clock::Wall => now_millis(),
            Clock::Manual(millis) => millis.load(Ordering::Relaxed),
        }
    }
}

/// Milliseconds since the Unix epoch now.
pub(crate) fn now_millis() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// `millis` since the epoch as RFC 3339 in UTC, to the millisecond.
pub(crate) fn rfc3339(millis: u64) -> String {
    let secs = millis / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        millis % 1000
    )
}

/// The date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_text() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_796_482_447_123), "2026-12-05T14:54:07.123Z");
    }
}
