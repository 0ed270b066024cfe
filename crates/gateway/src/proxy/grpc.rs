//! gRPC on the data path: which requests are gRPC calls, how a call's
//! answer is judged (by its `grpc-status`, not its HTTP status), its
//! deadline (`grpc-timeout`), and the gateway's own errors in gRPC form.
//!
//! A gRPC server answers a failed call with a trailers-only response: an
//! HTTP 200 whose single HEADERS frame carries `grpc-status` and
//! `grpc-message`. That is the answer the gateway can judge, retry and
//! count before anything reaches the client; a status that comes in the
//! trailers of a streamed answer is passed on as it is.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use http::StatusCode;

/// `grpc-status`.
pub static STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`.
pub static MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// `grpc-timeout`.
pub static TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
/// `grpc-retry-pushback-ms`: how long a client should wait before trying again.
pub static RETRY_PUSHBACK: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// The status codes the gateway reads or writes.
pub mod code {
    /// Not an error.
    pub const OK: u32 = 0;
    /// An error of unknown kind.
    pub const UNKNOWN: u32 = 2;
    /// The deadline passed before the call completed.
    pub const DEADLINE_EXCEEDED: u32 = 4;
    /// The caller may not make this call.
    pub const PERMISSION_DENIED: u32 = 7;
    /// A quota or limit was reached.
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    /// No such method (no route).
    pub const UNIMPLEMENTED: u32 = 12;
    /// A broken invariant, or a malformed request.
    pub const INTERNAL: u32 = 13;
    /// The service cannot answer now; trying again may work.
    pub const UNAVAILABLE: u32 = 14;
    /// Data was lost.
    pub const DATA_LOSS: u32 = 15;
    /// The caller has no valid credentials.
    pub const UNAUTHENTICATED: u32 = 16;
}

/// Whether a request with `content_type` is a gRPC call: `content-type:
/// application/grpc`, alone or with a `+codec` or parameters (gRPC-Web,
/// `application/grpc-web`, is not: its status travels in the body).
pub fn is_grpc(content_type: Option<&[u8]>) -> bool {
    let Some(value) = content_type else {
        return false;
    };
    let prefix = b"application/grpc";
    value.len() >= prefix.len()
        && value[..prefix.len()].eq_ignore_ascii_case(prefix)
        && matches!(value.get(prefix.len()), None | Some(b'+' | b';'))
}

/// The call's `grpc-timeout` (`1S`, `250m`, `100u`…), if valid: at most
/// eight digits and one unit of H, M, S, m, u or n.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(&TIMEOUT)?.as_bytes();
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `left` as a `grpc-timeout` value: in milliseconds while they fit in
/// eight digits, else in seconds (rounded up: a deadline is not shortened
/// by its encoding, and never written as zero).
pub fn timeout_value(left: Duration) -> HeaderValue {
    let mut text = Vec::new();
    write_timeout(left, &mut text);
    HeaderValue::from_bytes(&text).expect("digits and a unit are a valid value")
}

/// [`timeout_value`]'s text, appended to `out`.
pub fn write_timeout(left: Duration, out: &mut Vec<u8>) {
    let millis = left.as_millis().max(1);
    let (n, unit) = if millis < 100_000_000 {
        (millis as u64, b'm')
    } else {
        (left.as_secs().min(99_999_999), b'S')
    };
    let mut digits = [0; 20];
    let count = tidegate_client::headers::write_digits(n, &mut digits);
    out.extend_from_slice(&digits[..count]);
    out.push(unit);
}

/// The `grpc-status` of a trailers-only answer, from its head.
pub fn status(headers: &HeaderMap) -> Option<u32> {
    std::str::from_utf8(headers.get(&STATUS)?.as_bytes())
        .ok()?
        .parse()
        .ok()
}

/// The HTTP status a gRPC status counts as, for retries, the breaker and
/// outlier detection: UNAVAILABLE as 503 (retried), DEADLINE_EXCEEDED as
/// 504, INTERNAL, UNKNOWN and DATA_LOSS as 500 (failures, not retried),
/// RESOURCE_EXHAUSTED as 429 (counted for nothing); every other status,
/// the caller's own mistakes among them, as a 200.
pub fn judged_as(code: u32) -> StatusCode {
    match code {
        code::UNAVAILABLE => StatusCode::SERVICE_UNAVAILABLE,
        code::DEADLINE_EXCEEDED => StatusCode::GATEWAY_TIMEOUT,
        code::INTERNAL | code::UNKNOWN | code::DATA_LOSS => StatusCode::INTERNAL_SERVER_ERROR,
        code::RESOURCE_EXHAUSTED => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::OK,
    }
}

/// The gRPC status of one of the gateway's own error answers: as the
/// gRPC HTTP mapping has it, with a timeout as DEADLINE_EXCEEDED and a
/// limit as RESOURCE_EXHAUSTED.
pub fn code_for(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => code::INTERNAL,
        401 => code::UNAUTHENTICATED,
        403 => code::PERMISSION_DENIED,
        404 | 405 => code::UNIMPLEMENTED,
        408 | 504 => code::DEADLINE_EXCEEDED,
        413 | 429 | 431 => code::RESOURCE_EXHAUSTED,
        502 | 503 => code::UNAVAILABLE,
        _ => code::UNKNOWN,
    }
}

/// A trailers-only answer: HTTP 200, `grpc-status` `code` and `message`
/// (percent-encoded, as the protocol wants), no body.
pub fn trailers_only(code: u32, message: &str) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(3);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(&STATUS, HeaderValue::from(code));
    headers.insert(&MESSAGE, percent_encoded(message));
    headers
}

/// `text` with the bytes outside printable ASCII, and `%`, as `%XX`.
fn percent_encoded(text: &str) -> HeaderValue {
    let mut out = BytesMut::with_capacity(text.len());
    for &b in text.as_bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.put_u8(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    HeaderValue::from_maybe_shared(out.freeze()).expect("printable ASCII is a valid value")
}

/// One length-prefixed gRPC message: an uncompressed flag, the length
/// and `message`.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(message);
    out.freeze()
}

/// The first message of a gRPC body, if it is whole and uncompressed.
pub fn first_message(body: &[u8]) -> Option<&[u8]> {
    let (&flag, rest) = body.split_first()?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    (flag == 0).then_some(())?;
    rest.get(4..4 + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(name: &HeaderName, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn grpc_is_told_by_its_content_type() {
        for (value, grpc) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("Application/GRPC;charset=utf-8", true),
            ("application/grpc-web", false),
            ("application/grpc-web+proto", false),
            ("application/json", false),
        ] {
            assert_eq!(is_grpc(Some(value.as_bytes())), grpc, "{value}");
        }
        assert!(!is_grpc(None));
    }

    #[test]
    fn timeouts_are_read_in_every_unit_and_junk_is_ignored() {
        for (value, expected) in [
            ("1H", Some(Duration::from_secs(3600))),
            ("2M", Some(Duration::from_secs(120))),
            ("3S", Some(Duration::from_secs(3))),
            ("250m", Some(Duration::from_millis(250))),
            ("100u", Some(Duration::from_micros(100))),
            ("99999999n", Some(Duration::from_nanos(99_999_999))),
            ("123456789m", None),
            ("1s", None),
            ("m", None),
            ("-1S", None),
            ("1.5S", None),
        ] {
            assert_eq!(timeout(&with(&TIMEOUT, value)), expected, "{value}");
        }
    }

    #[test]
    fn timeouts_are_written_in_milliseconds_never_zero_never_shorter() {
        assert_eq!(timeout_value(Duration::from_millis(1500)), "1500m");
        assert_eq!(timeout_value(Duration::from_micros(10)), "1m");
        assert_eq!(timeout_value(Duration::from_secs(200_000)), "200000S");
        let long = timeout_value(Duration::from_secs(1 << 40));
        assert_eq!(long, "99999999S");
    }

    #[test]
    fn statuses_are_judged_as_their_http_equivalents() {
        assert_eq!(
            judged_as(code::UNAVAILABLE),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(judged_as(code::INTERNAL), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            judged_as(code::RESOURCE_EXHAUSTED),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            judged_as(3),
            StatusCode::OK,
            "INVALID_ARGUMENT is the caller's"
        );
        assert_eq!(status(&with(&STATUS, "14")), Some(14));
        assert_eq!(status(&with(&STATUS, "x")), None);
    }

    #[test]
    fn local_errors_are_trailers_only_with_an_encoded_message() {
        let h = trailers_only(
            code_for(StatusCode::SERVICE_UNAVAILABLE),
            "breaker open: 100%\n",
        );
        assert_eq!(h[&STATUS], "14");
        assert_eq!(h[&MESSAGE], "breaker open: 100%25%0A");
        assert_eq!(h[CONTENT_TYPE], "application/grpc");
        assert_eq!(
            code_for(StatusCode::GATEWAY_TIMEOUT),
            code::DEADLINE_EXCEEDED
        );
        assert_eq!(code_for(StatusCode::NOT_FOUND), code::UNIMPLEMENTED);
        assert_eq!(
            code_for(StatusCode::TOO_MANY_REQUESTS),
            code::RESOURCE_EXHAUSTED
        );
    }

    #[test]
    fn a_message_is_framed_and_read_back() {
        let framed = frame(b"\x08\x01");
        assert_eq!(&framed[..], b"\x00\x00\x00\x00\x02\x08\x01");
        assert_eq!(first_message(&framed), Some(&b"\x08\x01"[..]));
        assert_eq!(first_message(&framed[..6]), None);
        assert_eq!(first_message(b"\x01\x00\x00\x00\x00"), None, "compressed");
    }
}
