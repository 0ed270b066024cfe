//! What each fuzz target checks. The targets in `fuzz_targets/` call these
//! with libFuzzer's input; `crates/gateway/tests/fuzz_corpus.rs` includes
//! this file and runs every file of `corpus/<target>/` through the same
//! function, so the corpora are regression tests on stable Rust.
//!
//! ```text
//! cargo +nightly fuzz run path_normalization      # or RUSTC_BOOTSTRAP=1 cargo fuzz run …
//! ```

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use tidegate_client::headers::{correlation_id as checked_correlation_id, CORRELATION_ID};
use tidegate_gateway::config::EscapedSlashes;
use tidegate_gateway::http::headers::{drop_underscored, has_underscored, strip_hop_by_hop};
use tidegate_gateway::http::path::normalize;

/// Any text: the config parser returns a config or an error that names
/// the file, and never panics.
pub fn config_parser(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = tidegate_gateway::config::parse(text, "fuzz.toml", []) {
        let message = e.to_string();
        assert!(message.starts_with("fuzz.toml"), "{message}");
    }
}

/// Header lines (`name: value`): after stripping, no hop-by-hop header and
/// nothing `Connection` named is left (bar a kept WebSocket handshake),
/// no name with an underscore, and every other header is untouched.
pub fn header_sanitizing(data: &[u8]) {
    let keep_upgrade = data.first().is_some_and(|b| b & 1 == 1);
    let mut original = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        original.append(name, value);
    }
    let nominated: Vec<HeaderName> = original
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let handshake = keep_upgrade;
    let mut headers = original.clone();
    strip_hop_by_hop(&mut headers, keep_upgrade);
    drop_underscored(&mut headers);
    assert!(!has_underscored(&headers));
    let hop_by_hop = [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "transfer-encoding",
    ];
    for name in hop_by_hop {
        assert!(!headers.contains_key(name), "{name} left");
    }
    if handshake {
        assert_eq!(headers.get_all(header::CONNECTION).iter().count(), 1);
        assert_eq!(headers[header::CONNECTION], "upgrade");
        assert_eq!(headers.get_all(header::UPGRADE).iter().count(), 1);
        assert_eq!(headers[header::UPGRADE], "websocket");
    } else {
        assert!(!headers.contains_key(header::CONNECTION));
        assert!(!headers.contains_key(header::UPGRADE));
    }
    for name in &nominated {
        let kept = handshake && (name == header::CONNECTION || name == header::UPGRADE);
        assert!(
            kept || !headers.contains_key(name),
            "{name} was named by Connection"
        );
    }
    for (name, _) in original.iter() {
        let stripped = hop_by_hop.contains(&name.as_str())
            || name == header::CONNECTION
            || name == header::UPGRADE
            || nominated.contains(name)
            || name.as_str().contains('_');
        if !stripped {
            let before: Vec<_> = original.get_all(name).iter().collect();
            let after: Vec<_> = headers.get_all(name).iter().collect();
            assert_eq!(before, after, "{name} changed");
        }
    }
}

/// Any path: a normalized path starts with `/`, has no empty, `.` or `..`
/// segment and no escaped unreserved character, and normalizes to itself;
/// the normal form of a valid target's path is a valid target.
pub fn path_normalization(data: &[u8]) {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    for mode in [EscapedSlashes::Keep, EscapedSlashes::Reject] {
        let Ok(normal) = normalize(path, mode) else {
            continue;
        };
        if !path.starts_with('/') {
            assert_eq!(normal, path);
            continue;
        }
        assert!(normal.starts_with('/'), "{normal}");
        let segments: Vec<&str> = normal[1..].split('/').collect();
        let last = segments.len() - 1;
        for (i, segment) in segments.iter().enumerate() {
            assert!(*segment != "." && *segment != "..", "{path} → {normal}");
            assert!(!segment.is_empty() || i == last, "{path} → {normal}");
        }
        let bytes = normal.as_bytes();
        for (i, _) in normal.match_indices('%') {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            let byte = u8::from_str_radix(hex, 16).unwrap();
            assert!(
                !(byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)),
                "{path} → {normal}"
            );
            assert_eq!(hex, hex.to_ascii_uppercase());
        }
        assert_eq!(normalize(&normal, mode).unwrap(), normal, "not idempotent");
    }
    // What the gateway normalizes is a parsed target's path; its normal
    // form is a valid target too.
    if let Ok(target) = http::uri::PathAndQuery::try_from(path) {
        if let Ok(normal) = normalize(target.path(), EscapedSlashes::Keep) {
            assert!(
                http::uri::PathAndQuery::try_from(normal.as_ref()).is_ok(),
                "{normal}"
            );
        }
    }
}

/// Any header value: the correlation ID used is 1–128 safe characters, and
/// is the client's own when that one was.
pub fn correlation_id(data: &[u8]) {
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(data) {
        headers.insert(&CORRELATION_ID, value);
    }
    let id = checked_correlation_id(&headers);
    let safe = |b: &[u8]| {
        !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
    };
    assert!(safe(id.as_bytes()), "{id:?}");
    if safe(data) {
        assert_eq!(id.as_bytes(), data);
    }
}

/// Parts split at 0xFF bytes: the key reads back as exactly those parts,
/// so no two sets of parts share a count.
pub fn rate_limit_key(data: &[u8]) {
    let parts: Vec<&[u8]> = data.split(|&b| b == 0xff).take(4).collect();
    let key = tidegate_gateway::proxy::admission::limit_key('r', &parts);
    let mut fields = key.split('\0');
    assert_eq!(fields.next(), Some("r"));
    let decoded: Vec<Vec<u8>> = fields.map(unescape).collect();
    assert_eq!(decoded, parts, "{key:?}");
    assert!(key.bytes().all(|b| b == 0 || (0x20..0x7f).contains(&b)));
}

fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// The first byte's low bit picks the method (HEAD or GET), the rest is
/// what an upstream answers: tidegate's HTTP/1.1 client
/// (`proxy::h1`) and hyper's read it to the same outcome: both refuse it,
/// or both give the same status, version, end-to-end header fields (as
/// the gateway passes them on), body bytes and trailers. (A 101 is hyper's to hand to an upgrade; tidegate sends no
/// Upgrade on that path and refuses one.)
pub fn upstream_response(data: &[u8]) {
    let Some((&first, answer)) = data.split_first() else {
        return;
    };
    let method = if first & 1 == 1 {
        http::Method::HEAD
    } else {
        http::Method::GET
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let within = std::time::Duration::from_secs(10);
        let theirs = tokio::time::timeout(within, exchange::hyper(method.clone(), answer))
            .await
            .expect("hyper reads a finite answer to its end");
        let ours = tokio::time::timeout(within, exchange::tidegate(method, answer))
            .await
            .expect("tidegate reads a finite answer to its end");
        if matches!(&theirs, exchange::Outcome::Answer { status: 101, .. }) {
            assert_eq!(ours, exchange::Outcome::Refused, "a 101 without Upgrade");
            return;
        }
        assert_eq!(ours, theirs, "answer {:?}", String::from_utf8_lossy(answer));
    });
}

mod exchange {
    use bytes::Bytes;
    use http::{Method, Request};
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// What a client made of an answer.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Outcome {
        Answer {
            status: u16,
            version: http::Version,
            headers: Vec<(String, Bytes)>,
            body: Vec<u8>,
            trailers: Vec<(String, Bytes)>,
        },
        Refused,
    }

    /// By name (a map's order of names is not the message's: removing
    /// one moves another), each name's values in their order.
    fn fields(headers: &http::HeaderMap) -> Vec<(String, Bytes)> {
        let mut fields: Vec<_> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), Bytes::copy_from_slice(v.as_bytes())))
            .collect();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        fields
    }

    /// A server that reads the request head, writes `answer` and closes.
    fn upstream(answer: &[u8]) -> DuplexStream {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let answer = answer.to_vec();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if server.read(&mut byte).await.unwrap_or(0) == 0 {
                    return;
                }
                head.push(byte[0]);
            }
            let _ = server.write_all(&answer).await;
            let _ = server.shutdown().await;
            // Keep reading until the client goes, so its writes never fail.
            let mut sink = [0u8; 1024];
            while server.read(&mut sink).await.unwrap_or(0) > 0 {}
        });
        client
    }

    fn request(method: Method) -> Request<tidegate_gateway::http::body::ProxyBody> {
        let mut request = Request::new(tidegate_gateway::http::body::empty());
        *request.method_mut() = method;
        *request.uri_mut() = http::Uri::from_static("/");
        request.headers_mut().insert(
            http::header::HOST,
            http::HeaderValue::from_static("upstream"),
        );
        request
    }

    async fn read<B>(response: http::Response<B>) -> Outcome
    where
        B: http_body::Body<Data = Bytes> + Unpin,
    {
        // The fields the gateway passes on: tidegate's as received
        // (`http::fields`, moved into the map by the caller), hop-by-hop
        // ones left out; hyper's the same.
        let mut response = response;
        tidegate_gateway::http::headers::strip_hop_by_hop(response.headers_mut(), false);
        let status = response.status().as_u16();
        let version = response.version();
        let headers = fields(response.headers());
        let mut body = response.into_body();
        let mut data = Vec::new();
        let mut trailers = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Outcome::Refused;
            };
            match frame.into_data() {
                Ok(bytes) => data.extend_from_slice(&bytes),
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers.extend(fields(&t));
                    }
                }
            }
        }
        Outcome::Answer {
            status,
            version,
            headers,
            body: data,
            trailers,
        }
    }

    pub async fn hyper(method: Method, answer: &[u8]) -> Outcome {
        let io = hyper_util::rt::TokioIo::new(upstream(answer));
        let Ok((mut sender, connection)) = hyper::client::conn::http1::handshake(io).await else {
            return Outcome::Refused;
        };
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        match sender.send_request(request(method)).await {
            Ok(response) => read(response).await,
            Err(_) => Outcome::Refused,
        }
    }

    pub async fn tidegate(method: Method, answer: &[u8]) -> Outcome {
        let conn = tidegate_gateway::proxy::h1::Conn::new(upstream(answer), None);
        match conn.send(request(method)).await {
            Ok(response) => read(tidegate_gateway::http::fields::materialized(response)).await,
            Err(_) => Outcome::Refused,
        }
    }
}

/// Bytes a client sends on one connection: tidegate's HTTP/1.1 server
/// (`http::h1`) reads the requests hyper's server reads from them, each
/// with the same method, target, version, fields, body and trailers, and
/// stops where hyper stops. It may stop earlier only at a request whose
/// framing hyper forgives and the gateway refuses (a bare LF line end, a
/// `Content-Length` beside `Transfer-Encoding` or not one number,
/// `chunked` named twice); it never reads a request hyper refuses.
pub fn client_requests(data: &[u8]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let theirs = served::hyper(data).await;
        let ours = served::tidegate(data).await;
        let text = String::from_utf8_lossy(data);
        assert!(
            ours.len() <= theirs.len(),
            "tidegate read a request hyper refuses: {ours:?} from {text:?}"
        );
        assert_eq!(ours[..], theirs[..ours.len()], "from {text:?}");
        if ours.len() < theirs.len() {
            assert!(
                served::forgiven_by_hyper(data),
                "tidegate refused {:?}, which hyper reads, from {text:?}",
                theirs[ours.len()]
            );
        }
    });
}

mod served {
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::{Bytes, BytesMut};
    use http::{Request, Response};
    use http_body_util::{BodyExt, Full};
    use tidegate_gateway::http::body::{full, ProxyBody};
    use tidegate_gateway::http::fields::ClientRequest;
    use tidegate_gateway::http::h1::{Connection, Limits, Service};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A request as a server read it; its body `None` when it failed or
    /// did not end.
    #[derive(Debug, PartialEq, Eq)]
    pub struct Seen {
        method: String,
        target: String,
        version: http::Version,
        fields: Vec<(String, Bytes)>,
        body: Option<(Vec<u8>, Fields)>,
    }

    type Fields = Vec<(String, Bytes)>;

    type Log = Arc<Mutex<Vec<Seen>>>;

    /// The fields by name, in their order within a name (the order of
    /// different names means nothing, and a removal changes it).
    fn fields(headers: &http::HeaderMap) -> Fields {
        let mut fields: Vec<_> = headers
            .iter()
            // tidegate drops a client's copy of its identity header.
            .filter(|(n, _)| *n != tidegate_gateway::http::tls::CLIENT_IDENTITY)
            .map(|(n, v)| (n.to_string(), Bytes::copy_from_slice(v.as_bytes())))
            .collect();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        fields
    }

    /// Notes `request`, its body read for up to a second.
    async fn note<B>(log: &Log, request: Request<B>)
    where
        B: http_body::Body<Data = Bytes>,
    {
        let (parts, body) = request.into_parts();
        let body = match tokio::time::timeout(Duration::from_secs(1), body.collect()).await {
            Ok(Ok(collected)) => {
                let trailers = collected.trailers().map(fields).unwrap_or_default();
                Some((collected.to_bytes().to_vec(), trailers))
            }
            _ => None,
        };
        log.lock().unwrap().push(Seen {
            method: parts.method.to_string(),
            target: parts.uri.to_string(),
            version: parts.version,
            fields: fields(&parts.headers),
            body,
        });
    }

    /// Writes `data`, keeps the connection open and reads until the
    /// server closes it (an idle one, at the header read timeout).
    async fn send(mut client: DuplexStream, data: &[u8]) {
        let _ = client.write_all(data).await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(600), client.read_to_end(&mut sink)).await;
    }

    fn limits() -> Limits {
        Limits {
            max_head: 8192,
            header_read: Duration::from_secs(5),
            send: Duration::from_secs(5),
        }
    }

    pub async fn hyper(data: &[u8]) -> Vec<Seen> {
        let (client, server) = tokio::io::duplex(1 << 20);
        let log = Log::default();
        let noted = log.clone();
        let service = hyper::service::service_fn(move |request| {
            let log = noted.clone();
            async move {
                note(&log, request).await;
                // Not a 2xx: a CONNECT answered 2xx would be a tunnel to hyper.
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(404)
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
            }
        });
        let limits = limits();
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.header_read)
            .max_buf_size(limits.max_head);
        let served = builder
            .serve_connection(hyper_util::rt::TokioIo::new(server), service)
            .with_upgrades();
        let server = tokio::spawn(served);
        send(client, data).await;
        let _ = server.await;
        let seen = std::mem::take(&mut *log.lock().unwrap());
        seen
    }

    struct Recorder(Log);

    impl Service for Recorder {
        async fn call(&mut self, mut request: Box<ClientRequest>) -> Response<ProxyBody> {
            // The fields as whatever reads them sees them: those that came
            // as they were moved into the map.
            request.map();
            note(&self.0, request.request).await;
            let mut response = Response::new(full(Bytes::new()));
            *response.status_mut() = http::StatusCode::NOT_FOUND;
            response
        }
    }

    pub async fn tidegate(data: &[u8]) -> Vec<Seen> {
        let (client, server) = tokio::io::duplex(1 << 20);
        let log = Log::default();
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        let connection = Connection {
            service: Recorder(log.clone()),
            peer: "127.0.0.1:1".parse().unwrap(),
            identity: None,
            stop: stopped,
            limits: limits(),
            deadlines: Default::default(),
        };
        let server = tokio::spawn(connection.serve(server, BytesMut::new()));
        send(client, data).await;
        let _ = server.await;
        let seen = std::mem::take(&mut *log.lock().unwrap());
        seen
    }

    /// Whether `data` has framing that hyper forgives and tidegate refuses.
    pub fn forgiven_by_hyper(data: &[u8]) -> bool {
        let lower = data.to_ascii_lowercase();
        let has = |what: &[u8]| lower.windows(what.len()).any(|w| w == what);
        let count = |what: &[u8]| lower.windows(what.len()).filter(|w| *w == what).count();
        let bare_lf = data
            .iter()
            .enumerate()
            .any(|(i, &b)| b == b'\n' && (i == 0 || data[i - 1] != b'\r'));
        let listed_length = lower
            .split(|&b| b == b'\n')
            .filter_map(|line| line.strip_prefix(b"content-length:"))
            .any(|value| !value.trim_ascii().iter().all(u8::is_ascii_digit));
        // A `Connection` value with a byte outside visible ASCII: hyper
        // ignores the field, tidegate reads its tokens from the bytes and
        // closes after a request that names `close`.
        let opaque_close = lower
            .split(|&b| b == b'\n')
            .filter_map(|line| line.strip_prefix(b"connection:"))
            .map(|value| value.strip_suffix(b"\r").unwrap_or(value))
            .any(|value| {
                value
                    .iter()
                    .any(|&b| b != b'\t' && !(0x20..0x7f).contains(&b))
                    && value.windows(5).any(|w| w == b"close")
            });
        bare_lf
            || listed_length
            || opaque_close
            || (has(b"content-length") && has(b"transfer-encoding"))
            || count(b"chunked") > 1
    }
}
