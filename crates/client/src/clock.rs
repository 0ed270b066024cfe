//! Wall-clock time for JSON timestamps (RFC 3339, UTC). Policies keep
//! tokio's monotonic clock; only what users read is turned into dates.

#![allow(clippy::disallowed_types)] // The one place that reads the wall clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Now, as `2026-11-22T10:04:05.123Z`.
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// Now, in milliseconds since the Unix epoch (for charts).
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A monotonic instant as a wall-clock date.
pub fn instant_rfc3339(at: Instant) -> String {
    let now = Instant::now();
    let wall = SystemTime::now();
    let wall = if at <= now {
        wall.checked_sub(now - at).unwrap_or(UNIX_EPOCH)
    } else {
        wall + (at - now)
    };
    rfc3339(wall)
}

fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_349_045_123);
        assert_eq!(rfc3339(t), "2026-11-22T12:04:05.123Z");
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
