//! Header rules: hop-by-hop stripping and forwarding headers. Correlation
//! IDs, trace context and the retry rules come from `tidegate_client::headers`.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Version};
pub use tidegate_client::headers::{
    child_traceparent, correlation_id, deadline_digits, deadline_value, first, is_idempotent,
    new_id, retry_after, values, write_child_traceparent, write_next_span, CORRELATION_ID,
    DEADLINE_MS, IDEMPOTENCY_KEY, INTERNAL_TOKEN, TRACEPARENT, TRACEPARENT_LEN,
};

/// The value of a field the gateway sets: a header value, or hex digits
/// it made (a new request ID), which stay bytes until a header map needs
/// them: most are only ever written out.
#[derive(Debug, Clone)]
pub enum OwnValue {
    /// A header value (the client's correlation ID, as it sent it).
    Header(HeaderValue),
    /// 32 hex digits made here.
    Hex([u8; 32]),
}

impl OwnValue {
    /// The request's correlation ID: the client's (`theirs`, its first
    /// `x-correlation-id`) if it is a valid one, else a new one.
    pub fn request_id(theirs: Option<HeaderValue>) -> Self {
        match theirs.filter(|id| tidegate_client::headers::is_correlation_id(id.as_bytes())) {
            Some(theirs) => OwnValue::Header(theirs),
            None => OwnValue::Hex(tidegate_client::headers::new_id_hex()),
        }
    }

    /// Its bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            OwnValue::Header(value) => value.as_bytes(),
            OwnValue::Hex(digits) => digits,
        }
    }

    /// Its text (empty if it is not UTF-8, which no ID is).
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    /// As a header value.
    pub fn to_header(&self) -> HeaderValue {
        match self {
            OwnValue::Header(value) => value.clone(),
            OwnValue::Hex(digits) => HeaderValue::from_bytes(digits).expect("hex digits"),
        }
    }
}

/// `x-forwarded-for`.
pub static FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`.
pub static FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `x-forwarded-host`.
pub static FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one connection, never forwarded (RFC 9110
/// §7.6.1), and the obsolete `Proxy-Connection`. `Trailer` is not one of
/// them: it names the trailer fields that follow, end to end (RFC 9110
/// §6.6.2), and an HTTP/1.1 message's trailers are written only for the
/// names it lists.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
];

/// The index of `name` in [`HOP_BY_HOP`].
#[inline]
fn hop_by_hop_index(name: &[u8]) -> Option<usize> {
    // Told by its length first: most names are ruled out by that alone.
    let is = |known: &str| is_token(name, known);
    Some(match name.len() {
        10 if is("connection") => 0,
        10 if is("keep-alive") => 1,
        18 if is("proxy-authenticate") => 2,
        19 if is("proxy-authorization") => 3,
        2 if is("te") => 4,
        17 if is("transfer-encoding") => 5,
        7 if is("upgrade") => 6,
        16 if is("proxy-connection") => 7,
        _ => return None,
    })
}

/// The hop-by-hop field `name` is, in any case: `name` is a token (a
/// header map's name, or one httparse read).
#[inline]
pub(crate) fn hop_by_hop(name: &[u8]) -> Option<&'static HeaderName> {
    hop_by_hop_index(name).map(|i| &HOP_BY_HOP[i])
}

/// Whether the token `name` is `lower` (lowercase letters and dashes) in
/// any case: setting each byte's case bit tells them apart exactly (no
/// other token byte becomes a letter or a dash), with less work than a
/// case-insensitive compare.
#[inline]
pub(crate) fn is_token(name: &[u8], lower: &str) -> bool {
    name.len() == lower.len() && name.iter().zip(lower.bytes()).all(|(&a, b)| a | 0x20 == b)
}

/// Removes hop-by-hop headers and every header `Connection` names.
/// With `websocket`, a WebSocket handshake being passed on, the message
/// keeps `Connection: upgrade` and `Upgrade: websocket` (no other token).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, websocket: bool) {
    // One pass over the names finds which are present; most messages
    // have none, or only `Connection: keep-alive`.
    let present = headers
        .keys()
        .filter_map(|name| hop_by_hop_index(name.as_str().as_bytes()))
        .fold(0u16, |mask, i| mask | 1 << i);
    if present == 0 && !websocket {
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
    for name in &named {
        headers.remove(name);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & 1 << i != 0 {
            headers.remove(name);
        }
    }
    if websocket {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
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

/// Whether `token` is among the comma-separated tokens of the `name` headers.
#[inline(never)] // one copy, kept out of the request path's lines
pub(crate) fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The `Sec-WebSocket-Key` of a WebSocket opening handshake (RFC 6455
/// §4.1): an HTTP/1.1 GET with `Connection: upgrade`, `websocket` among
/// the `Upgrade` tokens and one key. Nothing else is an upgrade the
/// gateway passes on: other tokens (`h2c`, `TLS/1.0`…) would tunnel a
/// protocol past routing and API keys, and an HTTP/1.0 request's `Upgrade`
/// is ignored (RFC 9110 §7.8); their `Upgrade` is stripped as hop-by-hop.
pub fn websocket_key(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Option<HeaderValue> {
    // The cheap tests first: most requests have no `Upgrade`.
    if version != Version::HTTP_11
        || method != Method::GET
        || !headers.contains_key(header::UPGRADE)
        || !has_token(headers, header::UPGRADE, "websocket")
        || !has_token(headers, header::CONNECTION, "upgrade")
    {
        return None;
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    match (keys.next(), keys.next()) {
        (Some(key), None) if !key.is_empty() => Some(key.clone()),
        _ => None,
    }
}

/// Whether an upstream's `101 Switching Protocols` completes the WebSocket
/// handshake of `key`: `Upgrade: websocket`, `Connection: upgrade` and the
/// `Sec-WebSocket-Accept` the key calls for (RFC 6455 §4.2.2).
pub fn accepts_websocket(headers: &HeaderMap, key: &HeaderValue) -> bool {
    let upgrade = headers.get_all(header::UPGRADE).iter().collect::<Vec<_>>();
    let accept = headers
        .get_all(header::SEC_WEBSOCKET_ACCEPT)
        .iter()
        .collect::<Vec<_>>();
    matches!(upgrade[..], [u] if u.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && has_token(headers, header::CONNECTION, "upgrade")
        && matches!(accept[..], [a] if a.as_bytes() == websocket_accept(key.as_bytes()))
}

/// `Sec-WebSocket-Accept` for `key`: base64 of the SHA-1 of the key and
/// the protocol's GUID.
pub fn websocket_accept(key: &[u8]) -> [u8; 28] {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut sha1 = sha1_smol::Sha1::new();
    sha1.update(key);
    sha1.update(GUID);
    let digest = sha1.digest().bytes();
    let mut out = [b'='; 28];
    for (i, group) in digest.chunks(3).enumerate() {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (j, &b)| n | u32::from(b) << (16 - 8 * j));
        for k in 0..=group.len() {
            out[i * 4 + k] = ALPHABET[(n >> (18 - 6 * k) & 63) as usize];
        }
    }
    out
}

/// Joins the `Cookie` fields of a request into one, `"; "` between them:
/// an HTTP/2 client sends each cookie as a field of its own (RFC 9113
/// §8.2.3), which an HTTP/1.1 upstream must get as a single line.
#[inline(never)] // kept out of the HTTP/1 request path
pub fn join_cookies(headers: &mut HeaderMap) {
    let header::Entry::Occupied(mut cookies) = headers.entry(header::COOKIE) else {
        return;
    };
    let mut values = cookies.iter();
    let first = values.next().expect("an occupied entry has a value");
    if values.next().is_none() {
        return;
    }
    let mut joined = first.as_bytes().to_vec();
    for value in cookies.iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(value.as_bytes());
    }
    let joined = HeaderValue::from_maybe_shared(bytes::Bytes::from(joined))
        .expect("valid values joined by \"; \" are valid");
    cookies.insert(joined);
}

/// The bytes a `reg-name` has as they are (RFC 3986 §3.2.2: unreserved
/// and sub-delims; `%` begins an escape).
static REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        b += 1;
    }
    table
};

/// Whether a `Host` value is `uri-host [ ":" port ]` (RFC 9112 §3.2, RFC
/// 3986 §3.2.2): no user information, path, query or spaces. Empty is
/// valid (a target without an authority).
pub fn is_valid_host(host: &[u8]) -> bool {
    let (host, port) = match host.first() {
        Some(b'[') => match host.iter().position(|&b| b == b']') {
            Some(end) => {
                let literal = &host[1..end];
                if literal.is_empty()
                    || !literal
                        .iter()
                        .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
                {
                    return false;
                }
                match &host[end + 1..] {
                    [] => return true,
                    [b':', port @ ..] => (&[][..], port),
                    _ => return false,
                }
            }
            None => return false,
        },
        _ => match host.iter().rposition(|&b| b == b':') {
            Some(colon) => (&host[..colon], &host[colon + 1..]),
            None => (host, &[][..]),
        },
    };
    let mut bytes = host.iter();
    while let Some(&b) = bytes.next() {
        if REG_NAME[usize::from(b)] {
            continue;
        }
        let hex = |b: Option<&u8>| b.is_some_and(u8::is_ascii_hexdigit);
        if b != b'%' || !(hex(bytes.next()) && hex(bytes.next())) {
            return false;
        }
    }
    port.iter().all(u8::is_ascii_digit)
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
            assert_eq!(
                hop_by_hop_index(name.as_str().as_bytes()),
                Some(i),
                "{name}"
            );
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static("x"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h.len(), 1, "{name} stays");
        }
        assert_eq!(hop_by_hop_index(b"host"), None);
        // As httparse reads names: in any case.
        assert_eq!(
            hop_by_hop(b"Transfer-Encoding"),
            Some(&header::TRANSFER_ENCODING)
        );
        assert_eq!(hop_by_hop(b"KEEP-ALIVE"), Some(&HOP_BY_HOP[1]));
        assert_eq!(hop_by_hop(b"keep_alive"), None);
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

    #[test]
    fn the_accept_value_is_the_rfcs() {
        // RFC 6455 §1.3's example.
        assert_eq!(
            &websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    fn handshake(upgrade: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static(upgrade));
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        h
    }

    #[test]
    fn only_an_http11_get_for_websocket_with_one_key_is_an_upgrade() {
        let get = |version, upgrade| websocket_key(&Method::GET, version, &handshake(upgrade));
        assert!(get(Version::HTTP_11, "websocket").is_some());
        assert!(get(Version::HTTP_11, "WebSocket").is_some());
        assert!(get(Version::HTTP_11, "h2c").is_none());
        assert!(get(Version::HTTP_11, "TLS/1.0").is_none());
        assert!(get(Version::HTTP_10, "websocket").is_none());
        let post = websocket_key(&Method::POST, Version::HTTP_11, &handshake("websocket"));
        assert!(post.is_none());
        let mut keyless = handshake("websocket");
        keyless.remove(header::SEC_WEBSOCKET_KEY);
        assert!(websocket_key(&Method::GET, Version::HTTP_11, &keyless).is_none());
        let mut two = handshake("websocket");
        two.append(header::SEC_WEBSOCKET_KEY, HeaderValue::from_static("x"));
        assert!(websocket_key(&Method::GET, Version::HTTP_11, &two).is_none());
    }

    #[test]
    fn a_101_must_carry_websocket_and_the_right_accept() {
        let key = HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ==");
        let answer = |upgrade: &'static str, accept: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            if !upgrade.is_empty() {
                h.insert(header::UPGRADE, HeaderValue::from_static(upgrade));
            }
            if !accept.is_empty() {
                h.insert(
                    header::SEC_WEBSOCKET_ACCEPT,
                    HeaderValue::from_static(accept),
                );
            }
            h
        };
        let right = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
        assert!(accepts_websocket(&answer("websocket", right), &key));
        assert!(!accepts_websocket(&answer("h2c", right), &key));
        assert!(!accepts_websocket(&answer("", right), &key));
        assert!(!accepts_websocket(&answer("websocket", ""), &key));
        assert!(!accepts_websocket(
            &answer("websocket", "AAAAMBiTxaQ9kYGzzhZRbK+xOo="),
            &key
        ));
        let mut closed = answer("websocket", right);
        closed.remove(header::CONNECTION);
        assert!(!accepts_websocket(&closed, &key));
    }

    #[test]
    fn cookie_crumbs_are_joined_into_one_field() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        join_cookies(&mut h);
        assert_eq!(h[header::COOKIE], "a=1");
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        join_cookies(&mut h);
        let all: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, ["a=1; b=2; c=3"]);
    }

    #[test]
    fn hosts_are_a_name_or_address_and_a_port() {
        for good in [
            "example.com",
            "example.com:8080",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8080",
            "a-b_c~d.%41",
            "",
            "host:",
        ] {
            assert!(is_valid_host(good.as_bytes()), "{good}");
        }
        for bad in [
            "user@example.com",
            "user:pass@example.com",
            "example.com/path",
            "example.com?x",
            "example.com#x",
            "exa mple.com",
            "example.com:80a",
            "[::1",
            "[::1]x",
            "[zz]",
            "%4",
            "a\\b",
        ] {
            assert!(!is_valid_host(bad.as_bytes()), "{bad}");
        }
    }
}
