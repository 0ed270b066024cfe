//! Header rules: hop-by-hop stripping and forwarding headers. Correlation
//! IDs, trace context and the retry rules come from `tidegate_client::headers`.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
pub use tidegate_client::headers::{
    child_traceparent, correlation_id, deadline_value, is_idempotent, new_id, retry_after,
    CORRELATION_ID, DEADLINE_MS, IDEMPOTENCY_KEY, INTERNAL_TOKEN, TRACEPARENT,
};

/// `x-forwarded-for`.
pub static FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`.
pub static FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `x-forwarded-host`.
pub static FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one connection, never forwarded (RFC 9110
/// §7.6.1), and the obsolete `Proxy-Connection`.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
];

/// The index of `name` in [`HOP_BY_HOP`].
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    // Most names are ruled out by their length alone, before any compare.
    const LENGTHS: u32 = 1 << 2 | 1 << 7 | 1 << 10 | 1 << 16 | 1 << 17 | 1 << 18 | 1 << 19;
    let name = name.as_str();
    if name.len() >= 32 || LENGTHS & 1 << name.len() == 0 {
        return None;
    }
    Some(match name {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-authenticate" => 2,
        "proxy-authorization" => 3,
        "te" => 4,
        "trailer" => 5,
        "transfer-encoding" => 6,
        "upgrade" => 7,
        "proxy-connection" => 8,
        _ => return None,
    })
}

/// Removes hop-by-hop headers and every header `Connection` names.
/// With `keep_upgrade`, `Connection: upgrade` and `Upgrade` stay (a
/// WebSocket handshake being passed on).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names finds which are present; most messages
    // have none, or only `Connection: keep-alive`.
    let present = headers
        .keys()
        .filter_map(hop_by_hop_index)
        .fold(0u16, |mask, i| mask | 1 << i);
    if present == 0 {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        // The usual options name hop-by-hop headers, removed below.
        .filter(|token| {
            !token.eq_ignore_ascii_case("keep-alive") && !token.eq_ignore_ascii_case("upgrade")
        })
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    let upgrade = if keep_upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    for name in &named {
        headers.remove(name);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & 1 << i != 0 {
            headers.remove(name);
        }
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

/// Appends `ip` as text: IPv4 digit by digit (the formatter costs more
/// than the rest of the header), IPv6 through `Display`.
pub fn push_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        std::net::IpAddr::V6(v6) => {
            use std::io::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// Whether a header name holds an underscore (which CGI-style upstreams
/// read as a dash: `X_Internal_Token` would pose as `X-Internal-Token`).
pub fn has_underscored(headers: &HeaderMap) -> bool {
    headers.keys().any(|name| name.as_str().contains('_'))
}

/// Removes every header whose name holds an underscore.
pub fn drop_underscored(headers: &mut HeaderMap) {
    if !has_underscored(headers) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().contains('_'))
        .cloned()
        .collect();
    for name in named {
        headers.remove(name);
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
    fn every_listed_hop_by_hop_header_is_recognized() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static("x"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h.len(), 1, "{name} stays");
        }
        assert_eq!(hop_by_hop_index(&header::HOST), None);
    }

    #[test]
    fn an_upgrade_keeps_its_two_headers_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, x-secret"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        let mut kept = h.clone();
        strip_hop_by_hop(&mut kept, true);
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[header::CONNECTION], "upgrade");
        assert_eq!(kept[header::UPGRADE], "websocket");
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty());
    }

    #[test]
    fn ip_text_matches_display() {
        let ips: [std::net::IpAddr; 6] = [
            "0.0.0.0".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
            "10.20.100.255".parse().unwrap(),
            "9.99.109.200".parse().unwrap(),
            "::1".parse().unwrap(),
            "2001:db8::ff00:42:8329".parse().unwrap(),
        ];
        for ip in ips {
            let mut out = Vec::new();
            push_ip(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
        }
    }
}
