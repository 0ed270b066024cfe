//! The proxy against real upstream servers on 127.0.0.1:0.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use support::{admin, gateway, url};
use tidegate_gateway::observe::notices::Notice;
use tidegate_testkit::{channel_body, full, get, send, text, Upstream};

fn one_upstream(endpoint: &str, extra: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "svc"
endpoints = ["{endpoint}"]
[upstreams.policy.retry]
base_delay = "1ms"
max_delay = "5ms"
{extra}

[[routes]]
name = "api"
path_prefix = "/api"
strip_prefix = true
upstream = "svc"
"#
    )
}

#[tokio::test]
async fn routes_by_prefix_strips_it_and_sets_forwarding_headers() {
    let upstream = Upstream::start(|req| async move { text(200, req.uri().path()) }).await;
    let gw = gateway(&one_upstream(&upstream.url(), "")).await;

    let answer = send(
        Request::get(url(&gw, "/api/items/7?x=1"))
            .header("x-correlation-id", "req-42")
            .header("x-internal-token", "forged")
            .header("connection", "x-private")
            .header("x-private", "secret")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "/items/7");
    assert_eq!(answer.headers["x-correlation-id"], "req-42");

    let seen = &upstream.received()[0];
    assert_eq!(seen.uri, "/items/7?x=1");
    assert_eq!(seen.headers["x-correlation-id"], "req-42");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert!(seen.headers["traceparent"]
        .to_str()
        .unwrap()
        .starts_with("00-"));
    assert!(
        !seen.headers.contains_key("x-internal-token"),
        "client copies are stripped"
    );
    assert!(
        !seen.headers.contains_key("x-private"),
        "headers named in Connection are stripped"
    );

    let answer = get(&url(&gw, "/apis")).await;
    assert_eq!(answer.status, 404, "prefixes match whole segments");
    assert_eq!(answer.json()["error"], "no route matches this request");
    assert_eq!(answer.json()["request_id"].as_str().unwrap().len(), 32);
    assert_eq!(upstream.hits(), 1);
}

/// A client's `traceparent`: its trace, its span `00f067aa0ba902b7`, sampled.
const CLIENT_TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test]
async fn forwarding_chains_and_traces_are_continued() {
    let upstream = Upstream::start(|_| async { text(200, "ok") }).await;
    let gw = gateway(&one_upstream(&upstream.url(), "")).await;

    let answer = send(
        Request::get(url(&gw, "/api/x"))
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-forwarded-for", "10.0.0.2, 10.0.0.3")
            .header("traceparent", CLIENT_TRACE)
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200);
    let seen = &upstream.received()[0];
    let chain: Vec<_> = seen.headers.get_all("x-forwarded-for").iter().collect();
    assert_eq!(
        chain,
        ["10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"],
        "every hop the client listed, in one header, then the client"
    );
    let trace = seen.headers["traceparent"].to_str().unwrap();
    assert!(
        trace.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{trace}"
    );
    assert!(!trace.contains("00f067aa0ba902b7"), "a new span: {trace}");
}

#[tokio::test]
async fn each_attempt_is_a_span_of_the_requests_trace() {
    // Two failures, then a success: three attempts of one request.
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let upstream = Upstream::start(move |_| {
        let failing = counter.fetch_add(1, Ordering::SeqCst) < 2;
        async move { text(if failing { 503 } else { 200 }, "") }
    })
    .await;
    let gw = gateway(&one_upstream(&upstream.url(), "")).await;

    let traced = Request::get(url(&gw, "/api/x")).header("traceparent", CLIENT_TRACE);
    assert_eq!(send(traced.body(full("")).unwrap()).await.status, 200);
    let spans: Vec<String> = upstream
        .received()
        .iter()
        .map(|r| {
            let v = r.headers["traceparent"].to_str().unwrap();
            assert!(
                v.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && v.ends_with("-01"),
                "the client's trace and flags: {v}"
            );
            v[36..52].to_owned()
        })
        .collect();
    assert_eq!(spans.len(), 3);
    let distinct: std::collections::HashSet<_> = spans.iter().collect();
    assert_eq!(distinct.len(), 3, "a span per attempt: {spans:?}");
    assert!(!spans.contains(&"00f067aa0ba902b7".to_owned()));
}

#[tokio::test]
async fn a_get_is_retried_and_a_post_is_not() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let upstream = Upstream::start(move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if n % 3 < 2 {
                text(503, "busy")
            } else {
                text(200, "ok")
            }
        }
    })
    .await;
    let gw = gateway(&one_upstream(&upstream.url(), "")).await;

    let answer = get(&url(&gw, "/api/x")).await;
    assert_eq!((answer.status.as_u16(), answer.body.as_str()), (200, "ok"));
    assert_eq!(upstream.hits(), 3, "two 503s, then the answer");

    let answer = send(Request::post(url(&gw, "/api/x")).body(full("{}")).unwrap()).await;
    assert_eq!(answer.status, 503, "the upstream's own answer comes back");
    assert_eq!(answer.body, "busy");
    assert_eq!(
        upstream.hits(),
        4,
        "a POST that reached the upstream is not sent again"
    );

    let answer = send(
        Request::post(url(&gw, "/api/x"))
            .header("idempotency-key", "k1")
            .body(full("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(
        answer.status,
        200,
        "with an Idempotency-Key it is (hits {})",
        upstream.hits()
    );
    assert_eq!(upstream.hits(), 6);
}

#[tokio::test]
async fn an_attempt_timeout_is_retried_for_a_get_and_not_for_a_post() {
    // Every other request hangs; the others are answered at once.
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let upstream = Upstream::start(move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if n.is_multiple_of(2) {
                std::future::pending::<()>().await;
            }
            text(200, "ok")
        }
    })
    .await;
    let gw = gateway(&one_upstream(
        &upstream.url(),
        // Long enough that a loaded machine never cuts a quick answer.
        "[upstreams.policy]\ntimeout = \"1s\"",
    ))
    .await;

    let answer = get(&url(&gw, "/api/x")).await;
    assert_eq!((answer.status.as_u16(), answer.body.as_str()), (200, "ok"));
    assert_eq!(upstream.hits(), 2, "cut at 1 s, then sent again");

    let answer = send(Request::post(url(&gw, "/api/x")).body(full("{}")).unwrap()).await;
    assert_eq!(answer.status, 504);
    assert_eq!(answer.json()["service"], "svc");
    assert_eq!(
        upstream.hits(),
        3,
        "a POST that timed out is not sent again"
    );
}

#[tokio::test]
async fn connection_refused_gives_502_after_retries() {
    let gone = Upstream::start(|_| async { text(200, "") }).await;
    let addr = gone.url();
    drop(gone);
    let gw = gateway(&one_upstream(&addr, "")).await;
    let answer = send(
        Request::post(url(&gw, "/api/x"))
            .body(full("body"))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 502);
    assert_eq!(answer.json()["service"], "svc");
}

#[tokio::test]
async fn the_breaker_opens_rejects_without_calling_the_upstream_then_recovers() {
    let healthy = Arc::new(AtomicBool::new(false));
    let upstream = Upstream::start({
        let healthy = healthy.clone();
        move |_| {
            let status = if healthy.load(Ordering::SeqCst) {
                200
            } else {
                500
            };
            async move { text(status, "") }
        }
    })
    .await;
    let gw = gateway(&one_upstream(
        &upstream.url(),
        "[upstreams.policy.circuit_breaker]\nconsecutive_failures = 3\nopen_duration = \"60s\"",
    ))
    .await;
    for _ in 0..3 {
        assert_eq!(get(&url(&gw, "/api")).await.status, 500);
    }
    assert_eq!(upstream.hits(), 3);
    let answer = get(&url(&gw, "/api")).await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.json()["error"], "circuit breaker is open");
    let retry_after: u64 = answer.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((59..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(upstream.hits(), 3, "no call reached the upstream");

    let status = get(&admin(&gw, "/status/services")).await.json();
    assert_eq!(status["services"]["svc"]["state"], "open");
    let metrics = get(&admin(&gw, "/metrics")).await.body;
    assert!(
        metrics.contains(r#"tidegate_circuit_state{upstream="svc",state="open"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tidegate_rejections_total{upstream="svc",reason="circuit_open"} 1"#),
        "{metrics}"
    );

    // The open duration passes (the test's clock jumps; the runtime is
    // current-thread and nothing runs in between), the upstream is well
    // again, and one probe closes the breaker.
    let mut events = gw.gateway.notices.subscribe();
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(61)).await;
    tokio::time::resume();
    healthy.store(true, Ordering::SeqCst);
    assert_eq!(get(&url(&gw, "/api")).await.status, 200);
    assert_eq!(upstream.hits(), 4, "exactly one probe");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        if let Ok(Notice::Circuit { from, to, .. }) = events.recv().await {
            seen.push((from, to));
        }
    }
    assert_eq!(seen, [("open", "half_open"), ("half_open", "closed")]);
    let status = get(&admin(&gw, "/status/services")).await.json();
    assert_eq!(status["services"]["svc"]["state"], "closed");
    let metrics = get(&admin(&gw, "/metrics")).await.body;
    for line in [
        r#"tidegate_circuit_transitions_total{upstream="svc",from="half_open",to="closed"} 1"#,
        r#"tidegate_circuit_state{upstream="svc",state="closed"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
}

#[tokio::test]
async fn sse_events_arrive_as_the_upstream_writes_them() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let upstream = Upstream::start(move |_| {
        let (sender, body) = channel_body();
        let _ = tx.lock().unwrap().take().map(|tx| tx.send(sender));
        async move {
            let mut response = http::Response::new(body);
            response
                .headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            response
        }
    })
    .await;
    let gw = gateway(&one_upstream(&upstream.url(), "")).await;
    let response = tidegate_testkit::client()
        .request(
            Request::get(url(&gw, "/api/stream"))
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let sender = rx.await.unwrap();
    let mut body = response.into_body();
    for i in 0..3 {
        let event = Bytes::from(format!("data: {i}\n\n"));
        sender.send(event.clone()).await.unwrap();
        // The next frame must be this event, before the upstream writes another.
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the event was held back")
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), event);
    }
    drop(sender);
    assert!(body.frame().await.is_none());
}

#[tokio::test]
async fn h2c_with_prior_knowledge() {
    let upstream =
        Upstream::start(|req| async move { text(200, &format!("{:?}", req.version())) }).await;
    let gw = gateway(&one_upstream(&upstream.url(), "")).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<tidegate_testkit::Body>();
    let response = client
        .request(Request::get(url(&gw, "/api")).body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "HTTP/1.1", "the upstream hop is HTTP/1.1");
}

#[tokio::test]
async fn an_http2_clients_cookie_crumbs_reach_an_http1_upstream_as_one_line() {
    let upstream = Upstream::start(|_| async { text(200, "ok") }).await;
    let gw = gateway(&one_upstream(&upstream.url(), "")).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<tidegate_testkit::Body>();
    let request = Request::get(url(&gw, "/api"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(full(""))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let received = upstream.received();
    let cookies: Vec<_> = received[0].headers.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1; b=2; c=3"]);
}

#[tokio::test]
async fn an_http2_upstream_gets_http1_clients_multiplexed_on_one_connection() {
    let upstream = Upstream::start(|req| async move {
        let upgrade = req.headers().get("upgrade").is_some();
        text(200, &format!("{:?} upgrade={upgrade}", req.version()))
    })
    .await;
    let config =
        one_upstream(&upstream.url(), "").replace("endpoints", "protocol = \"http2\"\nendpoints");
    let gw = gateway(&config).await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let url = url(&gw, "/api");
        calls.spawn(async move { get(&url).await });
    }
    while let Some(answer) = calls.join_next().await {
        let answer = answer.unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, "HTTP/2.0 upgrade=false");
    }
    assert_eq!(upstream.connections(), 1, "one multiplexed connection");
    // A WebSocket handshake is no upgrade over HTTP/2: a plain request.
    let answer = support::raw(
        gw.addr,
        b"GET /api HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("HTTP/2.0 upgrade=false"), "{answer}");
}

/// An upstream of raw bytes on 127.0.0.1:0 that answers every request
/// head with a chunked `abc` and an `x-sum: 3` trailer, asked for or not.
async fn upstream_with_trailers() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut read = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                        read.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\ntrailer: x-sum\r\n\
                            transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-sum: 3\r\n\r\n";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => read.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_http1_upstreams_trailers_reach_an_http1_client_that_asks_for_them() {
    let upstream = upstream_with_trailers().await;
    let gw = gateway(&support::catch_all(&format!("http://{upstream}"), "")).await;
    let ask =
        |head: &'static [u8]| async move { support::raw(gw.addr, head).await.to_ascii_lowercase() };
    let asked =
        ask(b"GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n").await;
    assert!(asked.starts_with("http/1.1 200"), "{asked}");
    assert!(asked.contains("transfer-encoding: chunked\r\n"), "{asked}");
    assert!(
        asked.ends_with("\r\n\r\n3\r\nabc\r\n0\r\nx-sum: 3\r\n\r\n"),
        "{asked}"
    );
    // One that did not ask gets the body whole and no trailer (the
    // `Trailer` field, which only says what may follow, still passes).
    let untold = ask(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(untold.starts_with("http/1.1 200"), "{untold}");
    assert!(
        untold.ends_with("\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
        "{untold}"
    );
    assert!(!untold.contains("x-sum: 3"), "{untold}");
}
