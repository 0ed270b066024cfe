//! Header rules: hop-by-hop stripping, correlation IDs, trace context.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `x-correlation-id`.
pub static CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");
/// `traceparent` (W3C trace context).
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `x-internal-token`.
pub static INTERNAL_TOKEN: HeaderName = HeaderName::from_static("x-internal-token");
/// `x-tidegate-deadline-ms`: the time the upstream has left.
pub static DEADLINE_MS: HeaderName = HeaderName::from_static("x-tidegate-deadline-ms");
/// `idempotency-key`.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// `x-forwarded-for`.
pub static FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`.
pub static FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `x-forwarded-host`.
pub static FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers and every header `Connection` names.
/// With `keep_upgrade`, `Connection: upgrade` and `Upgrade` stay (a
/// WebSocket handshake being passed on).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let upgrade = headers.get(header::UPGRADE).cloned();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove("proxy-connection");
    if keep_upgrade {
        if let Some(upgrade) = upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, upgrade);
        }
    }
}

/// Whether the request asks to switch protocols (a WebSocket handshake).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The client's correlation ID if it is at most 128 safe characters, else a new one.
pub fn correlation_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(&CORRELATION_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty()
                && b.len() <= 128
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
        })
        .cloned()
        .unwrap_or_else(|| {
            let mut id = [0u8; 32];
            random_hex(&mut id);
            HeaderValue::from_bytes(&id).expect("hex is a valid header value")
        })
}

/// A `traceparent` for the upstream hop: the client's trace with a new
/// span, or a new sampled trace.
pub fn traceparent(headers: &HeaderMap) -> HeaderValue {
    let incoming = headers
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent);
    // 00-<trace id: 32>-<span id: 16>-<flags: 2>
    let mut value = *b"00-00000000000000000000000000000000-0000000000000000-01";
    match incoming {
        Some((trace, flags)) => {
            value[3..35].copy_from_slice(trace.as_bytes());
            value[53..].copy_from_slice(flags.as_bytes());
        }
        None => random_hex(&mut value[3..35]),
    }
    random_hex(&mut value[36..52]);
    HeaderValue::from_bytes(&value).expect("hex is a valid header value")
}

/// `(trace-id, flags)` of a valid version-00 traceparent.
fn parse_traceparent(v: &str) -> Option<(&str, &str)> {
    let mut parts = v.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let valid = version == "00"
        && parts.next().is_none()
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0');
    valid.then_some((trace, flags))
}

/// A new request ID: 32 random hex digits.
pub fn new_id() -> String {
    let mut id = [0u8; 32];
    random_hex(&mut id);
    id.iter().map(|&b| char::from(b)).collect()
}

thread_local! {
    static SEED: (RandomState, Cell<u64>) = (RandomState::new(), Cell::new(0));
}

/// Fills `out` with hex digits from SipHash with a random per-thread key
/// over a counter: unpredictable enough for IDs (not for secrets), never all
/// zero.
fn random_hex(out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    SEED.with(|(state, counter)| {
        for chunk in out.chunks_mut(16) {
            counter.set(counter.get() + 1);
            let word = state.hash_one(counter.get()) | 1;
            for (i, digit) in chunk.iter_mut().enumerate() {
                *digit = DIGITS[(word >> (60 - 4 * i)) as usize & 0xf];
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn correlation_ids_are_checked() {
        let mut h = HeaderMap::new();
        h.insert(&CORRELATION_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(correlation_id(&h), "abc-123");
        h.insert(
            &CORRELATION_ID,
            HeaderValue::from_static("bad id with spaces"),
        );
        assert_eq!(correlation_id(&h).len(), 32);
        h.insert(
            &CORRELATION_ID,
            HeaderValue::from_str(&"a".repeat(129)).unwrap(),
        );
        assert_eq!(correlation_id(&h).len(), 32);
    }

    #[test]
    fn traceparent_keeps_the_trace_and_makes_a_new_span() {
        let mut h = HeaderMap::new();
        h.insert(
            &TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let next = traceparent(&h);
        let next = next.to_str().unwrap();
        assert!(next.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(!next.contains("00f067aa0ba902b7"));
        h.insert(&TRACEPARENT, HeaderValue::from_static("garbage"));
        assert!(parse_traceparent(traceparent(&h).to_str().unwrap()).is_some());
    }
}
