//! Wall-clock time: JSON timestamps (RFC 3339, UTC) and the dates a
//! server may give in `Retry-After`. Policies keep tokio's monotonic
//! clock; only dates that users read or servers write meet the wall clock.

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

/// Now, in microseconds since the Unix epoch (log timestamps).
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A monotonic instant (past or now) in nanoseconds since the Unix epoch.
pub fn instant_unix_nanos(at: Instant) -> u64 {
    let ago = Instant::now().saturating_duration_since(at);
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.saturating_sub(ago).as_nanos() as u64)
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

/// The time from now until an HTTP-date (RFC 9110 §5.6.7: IMF-fixdate,
/// or the obsolete RFC 850 and asctime forms a recipient must still
/// accept); zero once it has passed, `None` if `text` is not a date.
pub(crate) fn until_http_date(text: &str) -> Option<Duration> {
    until_http_date_at(text, SystemTime::now())
}

fn until_http_date_at(text: &str, now: SystemTime) -> Option<Duration> {
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
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

/// Now, in whole seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `secs` since the Unix epoch as an HTTP date (RFC 9110 §5.6.7's
/// IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn http_date(secs: u64) -> [u8; 29] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    let mut out = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    out[..3].copy_from_slice(DAYS[(days % 7) as usize]);
    let two = |out: &mut [u8], n: u64| {
        out[0] = b'0' + (n / 10 % 10) as u8;
        out[1] = b'0' + (n % 10) as u8;
    };
    two(&mut out[5..7], u64::from(day));
    out[8..11].copy_from_slice(MONTHS[month as usize - 1]);
    let year = year.clamp(0, 9999) as u64;
    two(&mut out[12..14], year / 100);
    two(&mut out[14..16], year % 100);
    two(&mut out[17..19], rem / 3600);
    two(&mut out[20..22], rem % 3600 / 60);
    two(&mut out[23..25], rem % 60);
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
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
        assert_eq!(&http_date(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&http_date(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(&http_date(1_795_349_045), b"Sun, 22 Nov 2026 12:04:05 GMT");
    }

    #[test]
    fn http_dates_in_all_three_forms() {
        // Sun, 06 Nov 1994 08:49:37 GMT, RFC 9110's example.
        let at = UNIX_EPOCH + Duration::from_secs(784_111_777);
        let before = at - Duration::from_secs(90);
        for text in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(
                until_http_date_at(text, before),
                Some(Duration::from_secs(90)),
                "{text}"
            );
            assert_eq!(
                until_http_date_at(text, at + Duration::from_secs(5)),
                Some(Duration::ZERO),
                "{text}: a date gone by is now"
            );
        }
        for text in [
            "",
            "soon",
            "Sun, 06 Nov 1994 08:49:37",
            "1994-11-06T08:49:37Z",
        ] {
            assert_eq!(until_http_date_at(text, before), None, "{text}");
        }
    }

    #[test]
    fn an_http_date_is_read_against_the_wall_clock() {
        let text = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let left = until_http_date(&text).unwrap();
        // Whole seconds on the wire: up to one is lost to rounding down.
        assert!(
            (Duration::from_secs(118)..=Duration::from_secs(120)).contains(&left),
            "{left:?}"
        );
    }
}
