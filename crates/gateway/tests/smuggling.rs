//! Request smuggling and parsing attacks over raw sockets. Each test checks
//! what the client got and that the upstream received nothing it should
//! not: no request behind an ambiguous one, no header the client may not
//! set, no path other than the one routing and API-key checks saw.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::{catch_all, gateway, raw};
use tidegate_gateway::http::server::Running;
use tidegate_testkit::{text, Received, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// SHA-256 of the API key `test`.
const TEST_KEY_SHA256: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// Answers 200 with the number of body bytes it read.
async fn echo() -> Upstream {
    Upstream::start(|req| async move {
        use http_body_util::BodyExt;
        match req.into_body().collect().await {
            Ok(body) => text(200, &format!("got {}", body.to_bytes().len())),
            Err(_) => text(400, "bad body"),
        }
    })
    .await
}

/// Sends `bytes` and reads until the server closes the connection.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the server closed the connection")
        .unwrap_or(0);
    String::from_utf8_lossy(&answer).into_owned()
}

/// How many responses `answer` holds (status lines, wherever they start).
fn responses(answer: &str) -> usize {
    answer
        .match_indices("HTTP/1.1 ")
        .filter(|(at, _)| {
            let code = answer.as_bytes().get(at + 9..at + 13).unwrap_or_default();
            code.len() == 4 && code[..3].iter().all(u8::is_ascii_digit) && code[3] == b' '
        })
        .count()
}

fn paths(received: &[Received]) -> Vec<String> {
    received.iter().map(|r| r.uri.path().to_owned()).collect()
}

/// Requests a gateway must refuse with 400, one per line of attack.
const REFUSED: &[(&str, &str)] = &[
    ("CL then TE", "POST /bad HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("TE then CL", "POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"),
    ("chunked, chunked", "POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
    ("TE twice", "POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("xchunked", "POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
    ("chunked not last", "POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
    ("TE on HTTP/1.0", "POST /bad HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("TE on HTTP/1.0 with CL", "POST /bad HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
    ("space before colon", "POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n"),
    ("vertical tab in TE", "POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n"),
    ("bare LF head", "GET /bad HTTP/1.1\nHost: x\n\n"),
    ("bare LF in one line", "GET /bad HTTP/1.1\r\nHost: x\nX: y\r\n\r\n"),
    ("bare LF chunk lines", "POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n"),
    ("negative chunk size", "POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nabc\r\n0\r\n\r\n"),
    ("0x chunk size", "POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n"),
    ("overflowing chunk size", "POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff3\r\nabc\r\n0\r\n\r\n"),
    ("space before chunk size", "POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n 3\r\nabc\r\n0\r\n\r\n"),
    ("chunk shorter than its size", "POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabc\r\n0\r\n\r\n"),
    ("CL +5", "POST /bad HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello"),
    ("CL 0x10", "POST /bad HTTP/1.1\r\nHost: x\r\nContent-Length: 0x10\r\n\r\n0123456789abcdef"),
    ("CL -5", "POST /bad HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\nhello"),
    ("CL twice, differing", "POST /bad HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
    ("CL list", "POST /bad HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello"),
    ("space in a header name", "GET /bad HTTP/1.1\r\nHost: x\r\nX Forwarded-For: 1.2.3.4\r\n\r\n"),
    ("CR in a value", "GET /bad HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n"),
    ("NUL in a value", "GET /bad HTTP/1.1\r\nHost: x\r\nX: a\0b\r\n\r\n"),
    ("obsolete line folding", "GET /bad HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n"),
    ("no Host", "GET /bad HTTP/1.1\r\n\r\n"),
    ("two Hosts", "GET /bad HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"),
    ("Host with user information", "GET /bad HTTP/1.1\r\nHost: user@x\r\n\r\n"),
    ("Host with a path", "GET /bad HTTP/1.1\r\nHost: x/admin\r\n\r\n"),
    ("Host with a space", "GET /bad HTTP/1.1\r\nHost: x y\r\n\r\n"),
    ("Host with a bad port", "GET /bad HTTP/1.1\r\nHost: x:80x\r\n\r\n"),
    ("control byte in the target", "GET /bad?a=\x01 HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("backslash path", "GET /x\\..\\bad HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("encoded slash", "GET /x%2F..%2Fbad HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("bad escape", "GET /bad%zz HTTP/1.1\r\nHost: x\r\n\r\n"),
];

#[tokio::test]
async fn malformed_and_ambiguous_requests_are_refused_and_nothing_behind_them_is_forwarded() {
    let upstream = echo().await;
    let gw = gateway(&catch_all(&upstream.url(), "")).await;
    for (what, bad) in REFUSED {
        let answer = raw(gw.addr, bad.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer}");

        // Behind a good request on one connection, with one more after it:
        // the good one is answered, the bad one refused, and nothing after
        // it is read as a request.
        let good = "POST /good HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc";
        let after = "GET /after HTTP/1.1\r\nHost: x\r\n\r\n";
        let answer = exchange(gw.addr, format!("{good}{bad}{after}").as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{what}: {answer}");
        assert!(answer.contains("got 3HTTP/1.1 400"), "{what}: {answer}");
        assert_eq!(responses(&answer), 2, "{what}: {answer}");
    }
    let paths = paths(&upstream.received());
    assert!(paths.iter().all(|p| p == "/good"), "{paths:?}");
    assert_eq!(paths.len(), REFUSED.len());
}

#[tokio::test]
async fn a_long_chunk_extension_or_trailer_does_not_blind_the_framing_guard() {
    let upstream = echo().await;
    let gw = gateway(&catch_all(&upstream.url(), "")).await;
    // Longer than the guard's old line limit (8 KiB), shorter than hyper's (16 KiB).
    let long = "x".repeat(10 * 1024);
    let bad = "POST /bad HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let after = "GET /after HTTP/1.1\r\nHost: x\r\n\r\n";
    for (what, good) in [
        (
            "extension",
            format!("POST /good HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;e={long}\r\nabc\r\n0\r\n\r\n"),
        ),
        (
            "trailer",
            format!("POST /good HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: {long}\r\n\r\n"),
        ),
    ] {
        let answer = exchange(gw.addr, format!("{good}{bad}{after}").as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{what}: {answer}");
        assert!(answer.contains("got 3HTTP/1.1 400"), "{what}: {answer}");
        assert_eq!(responses(&answer), 2, "{what}: {answer}");
    }
    let paths = paths(&upstream.received());
    assert_eq!(paths, ["/good", "/good"]);
}

#[tokio::test]
async fn lenient_but_unambiguous_framing_is_forwarded_once_with_the_body_it_declared() {
    let upstream = echo().await;
    let gw = gateway(&catch_all(&upstream.url(), "")).await;
    for (what, request, body) in [
        ("CL twice, equal", "POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 3),
        ("chunk extension", "POST /ok HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\n\r\n", 3),
        ("trailers", "POST /ok HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n", 3),
        ("gzip, chunked", "POST /ok HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 3),
    ] {
        let before = upstream.hits();
        let answer = raw(gw.addr, request.as_bytes()).await;
        assert!(answer.ends_with(&format!("got {body}")), "{what}: {answer}");
        assert_eq!(upstream.hits(), before + 1, "{what}");
        let received = upstream.received();
        let last = received.last().unwrap();
        assert!(last.headers.get("transfer-encoding").is_none(), "{what}: re-framed");
        assert_eq!(last.headers.get_all("content-length").iter().count(), 1, "{what}");
    }
}

#[tokio::test]
async fn header_names_with_underscores_are_dropped_refused_or_kept_as_configured() {
    let request = "GET /u HTTP/1.1\r\nHost: x\r\nX_Internal_Token: forged\r\nX-Kept: 1\r\n\r\n";
    for (rule, status, kept) in [
        ("", 200, false),
        ("headers_with_underscores = \"drop\"", 200, false),
        ("headers_with_underscores = \"reject\"", 400, false),
        ("headers_with_underscores = \"allow\"", 200, true),
    ] {
        let upstream = echo().await;
        let gw = gateway(&catch_all(&upstream.url(), rule)).await;
        let answer = raw(gw.addr, request.as_bytes()).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{rule}: {answer}"
        );
        let received = upstream.received();
        assert_eq!(received.len(), usize::from(status == 200), "{rule}");
        if let Some(r) = received.first() {
            assert_eq!(r.headers.contains_key("x_internal_token"), kept, "{rule}");
            assert_eq!(r.headers["x-kept"], "1");
        }
    }
}

/// Routes `/admin` to `private` behind an API key, the rest to `public`.
fn two_routes(public: &Upstream, private: &Upstream) -> String {
    format!(
        r#"[[upstreams]]
name = "public"
endpoints = ["{}"]
[[upstreams]]
name = "private"
endpoints = ["{}"]
[[routes]]
name = "admin"
path_prefix = "/admin"
upstream = "private"
require_api_key = true
[[routes]]
name = "all"
path_prefix = "/"
upstream = "public"
[[api_keys]]
id = "ops"
key_sha256 = "{TEST_KEY_SHA256}"
"#,
        public.url(),
        private.url()
    )
}

#[tokio::test]
async fn routing_key_checks_and_the_upstream_see_one_normalized_path() {
    let (public, private) = (echo().await, echo().await);
    let gw = gateway(&two_routes(&public, &private)).await;
    let disguised = [
        "/x/../admin",
        "/x/%2e%2e/admin",
        "/x/%2E./admin",
        "//admin",
        "/./admin",
        "/%61dmin",
        "/public/../../admin",
    ];
    for path in disguised {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let answer = raw(gw.addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer}");
        let with_key = format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: test\r\n\r\n");
        let answer = raw(gw.addr, with_key.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
    }
    assert_eq!(public.hits(), 0, "{:?}", paths(&public.received()));
    let private = paths(&private.received());
    assert_eq!(private.len(), disguised.len());
    assert!(private.iter().all(|p| p == "/admin"), "{private:?}");

    // Encoded slashes could become a path the gateway never saw: refused.
    for path in ["/x%2F..%2Fadmin", "/x/..%2fadmin", "/x%5C..%5Cadmin"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: test\r\n\r\n");
        let answer = raw(gw.addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
    }
    assert_eq!(public.hits(), 0);
}

#[tokio::test]
async fn an_upgrade_the_upstream_declines_leaves_the_next_request_to_routing() {
    let (public, private) = (echo().await, echo().await);
    let gw = gateway(&two_routes(&public, &private)).await;
    // The upstream answers 200, not 101: the bytes after the handshake are
    // a request of their own, for a route that needs a key.
    let attack = "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\
                  GET /admin/secrets HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let answer = exchange(gw.addr, attack.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("HTTP/1.1 401"), "{answer}");
    assert_eq!(paths(&public.received()), ["/ws"]);
    assert_eq!(
        private.hits(),
        0,
        "the pipelined request reached the upstream"
    );
}

/// An upstream that switches to any protocol it is asked for, as
/// hypercorn does for `h2c`, and then echoes what the tunnel carries;
/// `accept` is the `Sec-WebSocket-Accept` it sends, `None` for the right one.
async fn eager(accept: Option<&'static str>) -> Upstream {
    Upstream::start(move |mut req| async move {
        let Some(protocol) = req.headers().get("upgrade").cloned() else {
            return text(200, "plain");
        };
        let key = req.headers().get("sec-websocket-key").cloned();
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(io) = upgrade.await else { return };
            let mut io = hyper_util::rt::TokioIo::new(io);
            let mut buf = [0u8; 1024];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let mut response = text(101, "");
        let headers = response.headers_mut();
        headers.insert("upgrade", protocol);
        headers.insert("connection", "upgrade".parse().unwrap());
        let right = key.map(|k| tidegate_gateway::http::headers::websocket_accept(k.as_bytes()));
        let accept = match (accept, &right) {
            (Some(accept), _) => accept.as_bytes(),
            (None, Some(right)) => &right[..],
            (None, None) => &[],
        };
        if !accept.is_empty() {
            headers.insert(
                "sec-websocket-accept",
                http::HeaderValue::from_bytes(accept).unwrap(),
            );
        }
        response
    })
    .await
}

/// A request for `/admin/secrets` (which needs an API key) pipelined
/// behind an upgrade: it must be routed and refused, never tunnelled.
const SMUGGLED: &str = "GET /admin/secrets HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

#[tokio::test]
async fn only_websocket_upgrades_are_passed_on() {
    let private = echo().await;
    for upgrade in [
        "GET /up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        "GET /up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: TLS/1.0\r\n\r\n",
        // RFC 9110 §7.8: an HTTP/1.0 request's Upgrade is ignored.
        "GET /up HTTP/1.0\r\nHost: x\r\nConnection: Upgrade, keep-alive\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        // A WebSocket handshake without its key is no handshake.
        "GET /up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    ] {
        let public = eager(None).await;
        let gw = gateway(&two_routes(&public, &private)).await;
        let answer = exchange(gw.addr, format!("{upgrade}{SMUGGLED}").as_bytes()).await;
        assert_eq!(answer.get(8..12), Some(" 200"), "{upgrade}: {answer}");
        assert!(answer.contains("HTTP/1.1 401"), "{upgrade}: {answer}");
        let received = public.received();
        assert_eq!(paths(&received), ["/up"], "{upgrade}");
        assert!(received[0].headers.get("upgrade").is_none(), "{upgrade}");
        assert!(received[0].headers.get("http2-settings").is_none(), "{upgrade}");
    }
    assert_eq!(private.hits(), 0, "a request was tunnelled past its route");
}

#[tokio::test]
async fn a_websocket_upgrade_asking_for_more_passes_on_websocket_alone() {
    let (public, private) = (eager(None).await, echo().await);
    let gw = gateway(&two_routes(&public, &private)).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket, h2c\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.unwrap());
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(public.received()[0].headers["upgrade"], "websocket");
    stream.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
    assert_eq!(private.hits(), 0);
}

#[tokio::test]
async fn a_101_without_a_valid_websocket_handshake_is_a_502_and_nothing_is_tunnelled() {
    let private = echo().await;
    let handshake = "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    for (what, upstream) in [
        (
            "a wrong accept",
            eager(Some("AAAAMBiTxaQ9kYGzzhZRbK+xOo=")).await,
        ),
        ("no accept", eager(Some("")).await),
        (
            "another protocol",
            Upstream::start(|_| async {
                let mut response = text(101, "");
                response
                    .headers_mut()
                    .insert("upgrade", "h2c".parse().unwrap());
                response
                    .headers_mut()
                    .insert("connection", "upgrade".parse().unwrap());
                response
            })
            .await,
        ),
    ] {
        let gw = gateway(&two_routes(&upstream, &private)).await;
        let answer = exchange(gw.addr, format!("{handshake}{SMUGGLED}").as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 502"), "{what}: {answer}");
        assert!(answer.contains("HTTP/1.1 401"), "{what}: {answer}");
        assert_eq!(upstream.hits(), 1, "{what}");
    }
    // A 101 the client never asked for is no answer either.
    let unasked = eager(None).await;
    let gw = gateway(&two_routes(&unasked, &private)).await;
    let plain = "GET /ws HTTP/1.1\r\nHost: x\r\nX-Upgrade-Me: 1\r\n\r\n";
    let switching = Upstream::start(|_| async {
        let mut response = text(101, "");
        response
            .headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        response
            .headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        response
    })
    .await;
    let gw2 = gateway(&two_routes(&switching, &private)).await;
    let answer = exchange(gw2.addr, format!("{plain}{SMUGGLED}").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(answer.contains("HTTP/1.1 401"), "{answer}");
    drop(gw);
    assert_eq!(private.hits(), 0, "a request was tunnelled past its route");
}

#[tokio::test]
async fn absolute_form_to_an_unrouted_host_goes_nowhere() {
    let upstream = echo().await;
    let decoy = echo().await;
    let config = format!(
        "[[upstreams]]\nname = \"api\"\nendpoints = [\"{}\"]\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstream = \"api\"\n",
        upstream.url()
    );
    let gw = gateway(&config).await;
    let decoy_host = decoy.addr();
    for (request, status) in [
        (
            format!("GET http://{decoy_host}/other HTTP/1.1\r\nHost: {decoy_host}\r\n\r\n"),
            404,
        ),
        (
            format!("GET http://{decoy_host}/ HTTP/1.1\r\nHost: x\r\n\r\n"),
            404,
        ),
        (
            format!("GET /other HTTP/1.1\r\nHost: {decoy_host}\r\n\r\n"),
            404,
        ),
        (
            format!("GET http://{decoy_host}/api/x HTTP/1.1\r\nHost: {decoy_host}\r\n\r\n"),
            200,
        ),
        (
            format!("OPTIONS * HTTP/1.1\r\nHost: {decoy_host}\r\n\r\n"),
            404,
        ),
        (
            format!("CONNECT {decoy_host} HTTP/1.1\r\nHost: {decoy_host}\r\n\r\n"),
            405,
        ),
    ] {
        let answer = raw(gw.addr, request.as_bytes()).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{request}: {answer}"
        );
    }
    assert_eq!(decoy.connections(), 0, "the gateway connected to the decoy");
    assert_eq!(paths(&upstream.received()), ["/api/x"]);
}

/// An echoing upstream behind a gateway that sends it the internal token
/// `s3cret`, read from the environment variable `var`.
async fn behind_internal_token(var: &str) -> (Upstream, Running) {
    std::env::set_var(var, "s3cret");
    let upstream = echo().await;
    let gw = gateway(&catch_all(
        &upstream.url(),
        &format!("internal_token_env = \"{var}\""),
    ))
    .await;
    (upstream, gw)
}

/// The values of the fields named `name` in `headers`, as text.
fn values<'a>(headers: &'a http::HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect()
}

/// A head the gateway passes on as it came (no map made for it): what
/// the upstream gets is what it would get from a map.
#[tokio::test]
async fn a_head_passed_as_it_came_loses_hop_by_hop_fields_and_forged_own_ones() {
    let (upstream, gw) = behind_internal_token("TIDEGATE_AS_IT_CAME_TOKEN").await;
    let request = "POST /c HTTP/1.1\r\nHOST: x\r\nConnection: Keep-Alive\r\n\
                   Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic eDp5\r\n\
                   Proxy-Connection: keep-alive\r\nX-Internal-Token: forged\r\n\
                   x-FORWARDED-for: 10.9.8.7\r\nX-Forwarded-For: 10.9.8.8\r\n\
                   X-Forwarded-Host: forged\r\nTraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
                   X-Tidegate-Client-Identity: forged\r\nX-Correlation-Id: mine\r\n\
                   Accept:  */*\r\nContent-Length: 3\r\ncontent-length: 3\r\nVary: a\r\nvary: b\r\n\
                   Connection: close\r\n\r\nabc";
    let answer = exchange(gw.addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("got 3"), "{answer}");
    assert!(answer.contains("x-correlation-id: mine\r\n"), "{answer}");
    let received = upstream.received();
    let all = |name: &str| values(&received[0].headers, name);
    for hop in [
        "connection",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(all(hop).is_empty(), "{hop}: {:?}", all(hop));
    }
    assert!(all("x-tidegate-client-identity").is_empty());
    assert_eq!(all("x-internal-token"), ["s3cret"]);
    assert_eq!(all("x-forwarded-for"), ["10.9.8.7, 10.9.8.8, 127.0.0.1"]);
    assert_eq!(all("x-forwarded-host"), ["x"]);
    assert_eq!(all("x-correlation-id"), ["mine"]);
    let trace = all("traceparent");
    assert_eq!(trace.len(), 1);
    assert!(trace[0].starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    assert!(!trace[0].contains("00f067aa0ba902b7"), "a new span");
    assert_eq!(all("host"), ["x"]);
    assert_eq!(all("accept"), ["*/*"]);
    assert_eq!(all("content-length"), ["3"]);
    assert_eq!(all("vary"), ["a", "b"]);
}

#[tokio::test]
async fn connection_cannot_strip_the_headers_the_gateway_adds() {
    let (upstream, gw) = behind_internal_token("TIDEGATE_SMUGGLING_TOKEN").await;
    let request = "GET /c HTTP/1.1\r\nHost: x\r\n\
                   Connection: keep-alive, X-Internal-Token, X-Forwarded-For, X-Correlation-Id, Traceparent\r\n\
                   X-Internal-Token: forged\r\nX-Forwarded-For: 10.9.8.7\r\nX-Correlation-Id: mine\r\n\r\n";
    let answer = raw(gw.addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let received = upstream.received();
    let all = |name: &str| values(&received[0].headers, name);
    assert_eq!(all("x-internal-token"), ["s3cret"]);
    assert_eq!(
        all("x-forwarded-for"),
        ["127.0.0.1"],
        "the client's own hop, nothing forged"
    );
    assert_eq!(all("x-correlation-id").len(), 1);
    assert_eq!(all("traceparent").len(), 1);
    assert!(all("connection").is_empty());
}
