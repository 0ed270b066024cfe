//! Hardening and protocol edges, spoken over raw sockets where clients
//! would refuse to send such requests.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{admin, catch_all, gateway, raw, url};
use tidegate_gateway::observe::notices::Notice;
use tidegate_testkit::{get, text, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The catch-all config with small limits, to test them cheaply.
fn config(upstream: &Upstream, gateway_extra: &str) -> String {
    let limits = "max_body_bytes = 1000\nmax_replay_bytes = 100\nmax_uri_bytes = 200";
    catch_all(&upstream.url(), &format!("{limits}\n{gateway_extra}"))
}

async fn echo_upstream() -> Upstream {
    Upstream::start(|req| async move {
        use http_body_util::BodyExt;
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().len())
            .unwrap_or(0);
        text(200, &format!("got {body}"))
    })
    .await
}

#[tokio::test]
async fn oversized_and_ambiguous_requests_never_reach_the_upstream() {
    let upstream = echo_upstream().await;
    let gw = gateway(&config(&upstream, "")).await;
    let addr = gw.addr;

    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    assert!(raw(addr, big_header.as_bytes())
        .await
        .starts_with("HTTP/1.1 431"));

    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(300));
    assert!(raw(addr, long_uri.as_bytes())
        .await
        .starts_with("HTTP/1.1 414"));

    let declared = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n";
    let answer = raw(addr, declared.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("request body too large"));

    let bad_te = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc";
    assert!(raw(addr, bad_te.as_bytes())
        .await
        .starts_with("HTTP/1.1 400"));

    let connect = "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n";
    assert!(raw(addr, connect.as_bytes())
        .await
        .starts_with("HTTP/1.1 405"));

    assert_eq!(
        upstream.hits(),
        0,
        "none of these reached the upstream: {:?}",
        upstream.received()
    );

    let mut chunked =
        String::from("POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..12 {
        chunked.push_str(&format!("64\r\n{}\r\n", "b".repeat(100)));
    }
    chunked.push_str("0\r\n\r\n");
    // An undeclared size is only known while streaming: the client gets 413
    // and the upstream an aborted body, never a whole request.
    let answer = raw(addr, chunked.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Both framings, in either order, even behind a well-formed request on
    // the same connection: 400, the connection closes, nothing forwarded.
    for both in [
        "POST /smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /smuggle HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n0\r\n\r\n",
    ] {
        let answer = raw(addr, both.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        let first = "POST /fine HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let answer = raw(addr, format!("{first}{both}GET /after HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("got 3HTTP/1.1 400"), "{answer}");
        assert!(!answer.contains("got 0"), "{answer}");
    }
    let paths = || -> Vec<String> {
        let received = upstream.received();
        received.iter().map(|r| r.uri.path().to_owned()).collect()
    };
    let fine = paths().iter().filter(|p| *p == "/fine").count();
    assert_eq!(fine, 2, "{:?}", paths());
    assert!(!paths().iter().any(|p| p == "/smuggle" || p == "/after"));

    // A body within the limit but past the replay buffer still streams through.
    let mut ok = String::from("POST /ok HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..5 {
        ok.push_str(&format!("64\r\n{}\r\n", "c".repeat(100)));
    }
    ok.push_str("0\r\n\r\n");
    let answer = raw(addr, ok.as_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("got 500"),
        "{answer}"
    );
    assert_eq!(paths().iter().filter(|p| *p == "/ok").count(), 1);
}

#[tokio::test]
async fn absolute_form_goes_to_the_configured_upstream_never_to_the_named_host() {
    let upstream = echo_upstream().await;
    let elsewhere = echo_upstream().await;
    let gw = gateway(&config(&upstream, "")).await;
    let request = format!(
        "GET {}/steal HTTP/1.1\r\nHost: {}\r\n\r\n",
        elsewhere.url(),
        elsewhere.addr()
    );
    let answer = raw(gw.addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(elsewhere.hits(), 0, "not an open proxy");
    assert_eq!(upstream.received()[0].uri, "/steal");
}

#[tokio::test]
async fn a_slow_client_is_cut_off_after_the_header_read_timeout() {
    let upstream = echo_upstream().await;
    let gw = gateway(&config(&upstream, "header_read_timeout = \"200ms\"")).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Never finish the head; the gateway must close the connection.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was held open");
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled_after_the_upstream_accepts() {
    let upstream = Upstream::start(|mut req| async move {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let io = upgrade.await.expect("upgrade");
            let mut io = hyper_util::rt::TokioIo::new(io);
            let mut buf = [0u8; 64];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let mut response = text(101, "");
        let headers = response.headers_mut();
        headers.insert("upgrade", "websocket".parse().unwrap());
        headers.insert("connection", "upgrade".parse().unwrap());
        headers.insert(
            "sec-websocket-accept",
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".parse().unwrap(),
        );
        response
    })
    .await;
    let gw = gateway(&config(&upstream, "")).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"));
    assert!(head.contains("sec-websocket-accept"));
    assert_eq!(upstream.received()[0].headers["upgrade"], "websocket");
    for message in [&b"hello"[..], b"again"] {
        stream.write_all(message).await.unwrap();
        let mut echo = vec![0u8; message.len()];
        stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, message);
    }
}

#[tokio::test]
async fn health_checks_take_an_endpoint_out_and_bring_it_back() {
    let sick = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = sick.clone();
    let a = Upstream::start(move |req| {
        let sick = flag.load(std::sync::atomic::Ordering::SeqCst);
        async move {
            match (req.uri().path(), sick) {
                ("/health", true) => text(500, "sick"),
                _ => text(200, "a"),
            }
        }
    })
    .await;
    let b = Upstream::start(|_| async { text(200, "b") }).await;
    let toml = format!(
        r#"
[[upstreams]]
name = "svc"
endpoints = ["{}", "{}"]
[upstreams.health_check]
path = "/health"
interval = "20ms"
timeout = "1s"
healthy_threshold = 2
unhealthy_threshold = 2

[[routes]]
name = "all"
path_prefix = "/"
upstream = "svc"
"#,
        a.url(),
        b.url()
    );
    let gw = gateway(&toml).await;
    let mut events = gw.gateway.notices.subscribe();
    sick.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(!next_change(&mut events, &a.url()).await);
    for _ in 0..4 {
        assert_eq!(
            get(&url(&gw, "/")).await.body,
            "b",
            "the sick endpoint gets no traffic"
        );
    }
    let ready = get(&admin(&gw, "/ready")).await;
    assert_eq!(ready.status, 200, "one healthy endpoint is enough");
    let status = get(&admin(&gw, "/status/services")).await.json();
    assert_eq!(status["services"]["svc"]["endpoints"][0]["healthy"], false);

    sick.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(next_change(&mut events, &a.url()).await);
    let bodies: Vec<String> = futures_join(&gw).await;
    assert!(bodies.contains(&"a".to_string()), "{bodies:?}");
}

/// Waits for the next health change of `endpoint`; returns its new health.
async fn next_change(
    events: &mut tokio::sync::broadcast::Receiver<Notice>,
    endpoint: &str,
) -> bool {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("no health change within 10 s")
            .unwrap();
        if let Notice::Endpoint {
            endpoint: e,
            healthy,
            ..
        } = event
        {
            assert_eq!(e, endpoint);
            return healthy;
        }
    }
}

async fn futures_join(gw: &tidegate_gateway::http::server::Running) -> Vec<String> {
    let mut bodies = Vec::new();
    for _ in 0..4 {
        bodies.push(get(&url(gw, "/")).await.body);
    }
    bodies
}

#[tokio::test]
async fn admin_health_ready_and_metrics() {
    let upstream = echo_upstream().await;
    let gw = gateway(&config(&upstream, "")).await;
    let health = get(&admin(&gw, "/health")).await.json();
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["service"], "tidegate");
    assert_eq!(get(&admin(&gw, "/ready")).await.json()["status"], "ready");
    get(&url(&gw, "/x")).await;
    let metrics = get(&admin(&gw, "/metrics")).await.body;
    for name in [
        r#"tidegate_requests_total{route="all",upstream="svc",method="GET",status="200"} 1"#,
        "tidegate_request_duration_seconds_bucket",
        r#"tidegate_upstream_attempts_total{upstream="svc"} 1"#,
        r#"tidegate_endpoint_healthy{upstream="svc",endpoint=""#,
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    let not_found = get(&admin(&gw, "/nope")).await;
    assert_eq!(not_found.status, 404);
}
