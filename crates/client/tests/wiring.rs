//! What a call carries and reports: propagation headers, credentials, the
//! registry from a services file, metrics, status, logs, streaming, h2c.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use tidegate_client::config::{self, ServiceConfig};
use tidegate_client::headers::Context;
use tidegate_client::{ErrorKind, Registry, ServiceClient};
use tidegate_resilience::{breaker, retry};
use tidegate_testkit::{channel_body, text, Upstream};

async fn echo() -> Upstream {
    Upstream::start(|req| async move {
        text(
            200,
            &format!(
                "{:?} {}",
                req.version(),
                req.uri().path_and_query().unwrap()
            ),
        )
    })
    .await
}

#[tokio::test]
async fn calls_carry_the_callers_context_credentials_and_deadline() {
    let upstream = echo().await;
    let knowledge = ServiceClient::new(
        ServiceConfig::new("knowledge", &format!("{}/api/v1/", upstream.url()))
            .unwrap()
            .api_key("k-123")
            .internal_token("t-456")
            .header(
                http::header::ACCEPT,
                http::HeaderValue::from_static("application/json"),
            )
            .deadline(Duration::from_secs(20)),
    )
    .unwrap();

    let mut incoming = HeaderMap::new();
    incoming.insert("x-correlation-id", "req-42".parse().unwrap());
    incoming.insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    let response = Context::from_headers(&incoming)
        .scope(knowledge.get("query?q=tides"))
        .await
        .unwrap();
    assert_eq!(response.text().unwrap(), "HTTP/1.1 /api/v1/query?q=tides");
    assert_eq!(response.request_id(), "req-42");

    let got = &upstream.received()[0].headers;
    assert_eq!(got["x-correlation-id"], "req-42");
    let traceparent = got["traceparent"].to_str().unwrap();
    assert!(traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    assert!(!traceparent.contains("00f067aa0ba902b7"), "a new span");
    assert_eq!(got["x-api-key"], "k-123");
    assert_eq!(got["x-internal-token"], "t-456");
    assert_eq!(got["accept"], "application/json");
    let left: u64 = got["x-tidegate-deadline-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(left > 15_000 && left <= 20_000, "{left}");
    let authority = upstream.url().trim_start_matches("http://").to_owned();
    assert_eq!(got["host"], authority.as_str());
    assert!(got["user-agent"]
        .to_str()
        .unwrap()
        .starts_with("tidegate-client/"));

    // Outside a scope: a new correlation ID, echoed in the response. A
    // call's own headers are sent, but never in place of the propagated ones.
    let response = knowledge
        .request(http::Method::GET, "/x")
        .header("x-correlation-id", "mine")
        .header("x-tidegate-deadline-ms", "1")
        .header("x-extra", "yes")
        .header("accept", "text/plain")
        .send()
        .await
        .unwrap();
    let id = response.request_id();
    assert_eq!(id.len(), 32);
    let got = &upstream.received()[1].headers;
    assert_eq!(got["x-correlation-id"], id);
    assert_ne!(got["x-tidegate-deadline-ms"], "1");
    assert_eq!(got["x-extra"], "yes");
    assert_eq!(got["accept"], "text/plain");
    assert_eq!(got.get_all("accept").iter().count(), 1);
    assert_eq!(got["host"], authority.as_str());
}

const SERVICES: &str = r#"
[client]
source_service = "chat-backend"

[defaults.policy.retry]
max_attempts = 2
base_delay = "1ms"

[services.knowledge]
base_url = "http://127.0.0.1:9"
service_name = "Knowledge Server"
internal_token_env = "KNOWLEDGE_TOKEN"

[services.billing]
base_url = "http://127.0.0.1:9"
[services.billing.policy.circuit_breaker]
consecutive_failures = 10
"#;

#[tokio::test]
async fn the_attempts_of_a_call_are_spans_of_one_trace() {
    let n = Arc::new(AtomicUsize::new(0));
    let upstream = Upstream::start(move |_req| {
        // Each call: two failures, then a success.
        let failing = n.fetch_add(1, Ordering::SeqCst) % 3 < 2;
        async move { text(if failing { 503 } else { 200 }, "") }
    })
    .await;
    let client = ServiceClient::new(ServiceConfig::new("trace", &upstream.url()).unwrap().retry(
        retry::Config {
            base_delay: Duration::from_millis(1),
            jitter: retry::Jitter::None,
            ..retry::Config::default()
        },
    ))
    .unwrap();
    for call in 0..2 {
        // Outside a scope: a trace begun for the call, not one per attempt.
        client.get("/").await.unwrap();
        let seen = upstream.received();
        let attempts = &seen[3 * call..];
        assert_eq!(attempts.len(), 3);
        let ids: Vec<(String, String)> = attempts
            .iter()
            .map(|r| {
                let v = r.headers["traceparent"].to_str().unwrap();
                assert!(v.starts_with("00-") && v.ends_with("-01"), "{v}");
                (v[3..35].to_owned(), v[36..52].to_owned())
            })
            .collect();
        assert!(ids.iter().all(|(trace, _)| *trace == ids[0].0), "{ids:?}");
        // The call's new correlation ID is its trace ID.
        for r in attempts {
            assert_eq!(r.headers["x-correlation-id"], ids[0].0);
        }
        let spans: std::collections::HashSet<_> = ids.iter().map(|(_, span)| span).collect();
        assert_eq!(spans.len(), ids.len(), "a span per attempt: {ids:?}");
        if call == 1 {
            let first = seen[0].headers["traceparent"].to_str().unwrap();
            assert_ne!(&first[3..35], ids[0].0, "a trace per call");
        }
    }
}

#[tokio::test]
async fn a_registry_from_a_services_file_with_overrides() {
    let upstream = echo().await;
    let env = vec![
        (
            "TIDEGATE__SERVICES__KNOWLEDGE__BASE_URL".to_string(),
            upstream.url(),
        ),
        ("KNOWLEDGE_TOKEN".to_string(), "secret-token".to_string()),
    ];
    let config = config::parse(SERVICES, "services.toml", env).unwrap();
    let registry = Registry::new(config).unwrap();

    let knowledge = registry.get("knowledge").unwrap();
    assert_eq!(knowledge.service_name(), "Knowledge Server");
    knowledge.get("/q").await.unwrap();
    assert_eq!(
        upstream.received()[0].headers["x-internal-token"],
        "secret-token"
    );
    let err = registry.get("billing").unwrap().get("/").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RetryExhausted);
    assert_eq!(err.attempts(), Some(2), "defaults.policy reached billing");
    assert_eq!(
        registry.get("nope").unwrap_err().kind(),
        ErrorKind::InvalidRequest
    );

    let status = registry.status();
    let knowledge = &status["services"]["knowledge"];
    assert_eq!(knowledge["service"], "Knowledge Server");
    assert_eq!(knowledge["state"], "closed");
    assert_eq!(knowledge["failure_count"], 0);
    assert_eq!(knowledge["in_flight"], 0);
    assert!(knowledge["last_failure"].is_null());
    assert_eq!(status["services"]["billing"]["failure_count"], 2);
    assert!(status["services"]["billing"]["last_failure"].is_string());
    assert!(status["timestamp"].as_str().unwrap().ends_with('Z'));

    let metrics = registry.metrics().encode();
    for line in [
        r#"inter_service_requests_total{source_service="chat-backend",target_service="knowledge",method="GET",status="success"} 1"#,
        r#"inter_service_requests_total{source_service="chat-backend",target_service="billing",method="GET",status="retry_exhausted"} 1"#,
        r#"inter_service_request_duration_seconds_count{source_service="chat-backend",target_service="knowledge",method="GET"} 1"#,
        r#"active_service_connections{source_service="chat-backend",target_service="knowledge"} 0"#,
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    assert!(!format!("{registry:?}").contains("secret-token"));
}

#[test]
fn a_bad_services_file_names_file_line_key_and_reason() {
    let text = SERVICES.replace("max_attempts = 2", "max_attempts = \"two\"");
    let err = config::parse(&text, "services.toml", []).unwrap_err();
    assert_eq!(err.location, "services.toml:6:1");
    assert_eq!(err.key, "defaults.policy.retry.max_attempts");
    let err = config::parse(SERVICES, "services.toml", []).unwrap_err();
    assert_eq!(
        err.to_string(),
        "services.toml:12:1: services.knowledge.internal_token_env: environment variable KNOWLEDGE_TOKEN is not set"
    );
}

#[tokio::test]
async fn json_helpers_and_decode_errors() {
    let upstream = Upstream::start(|req| async move {
        match req.uri().path() {
            "/echo" => {
                let body = http_body_util::BodyExt::collect(req.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                let mut answer = http::Response::new(tidegate_testkit::full(body));
                answer
                    .headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                answer
            }
            "/big" => text(200, &"x".repeat(2048)),
            _ => text(200, "not json"),
        }
    })
    .await;
    let client = ServiceClient::new(
        ServiceConfig::new("echo", &upstream.url())
            .unwrap()
            .max_response_bytes(1024),
    )
    .unwrap();
    let back: serde_json::Value = client
        .post_json("/echo", &serde_json::json!({"cents": 500}))
        .await
        .unwrap();
    assert_eq!(back["cents"], 500);
    assert_eq!(
        upstream.received()[0].headers["content-type"],
        "application/json"
    );
    let err = client
        .get_json::<serde_json::Value>("/text")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode);
    assert!(err.request_id().is_some());
    let err = client.get("/big").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode);
}

#[tokio::test]
async fn bodies_in_chunks_are_joined_and_capped() {
    // Chunked answers, no length announced: the cap is found as they come.
    let upstream = Upstream::start(|req| async move {
        let chunks = match req.uri().path() {
            "/three" => vec!["ab".to_owned(), "cd".to_owned(), "ef".to_owned()],
            "/one" => vec!["whole".to_owned()],
            _ => vec!["x".repeat(600), "y".repeat(600)],
        };
        let (tx, body) = channel_body();
        for chunk in chunks {
            tx.try_send(Bytes::from(chunk)).unwrap();
        }
        http::Response::new(body)
    })
    .await;
    let client = ServiceClient::new(
        ServiceConfig::new("chunks", &upstream.url())
            .unwrap()
            .max_response_bytes(1024),
    )
    .unwrap();
    let three = client.get("/three").await.unwrap();
    assert_eq!(three.text().unwrap(), "abcdef");
    let one = client.get("/one").await.unwrap();
    assert_eq!(one.text().unwrap(), "whole");
    let err = client.get("/over").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode);
    assert!(err.to_string().contains("max_response_bytes"), "{err}");
}

#[tokio::test]
async fn a_stream_delivers_events_as_they_are_written() {
    let (events, body) = channel_body();
    let body = Arc::new(Mutex::new(Some(body)));
    let upstream = Upstream::start(move |_req| {
        let body = body.lock().unwrap().take().expect("one stream");
        async move {
            let mut answer = http::Response::new(body);
            answer
                .headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            answer
        }
    })
    .await;
    let client =
        ServiceClient::new(ServiceConfig::new("events", &upstream.url()).unwrap()).unwrap();
    let mut stream = client.get_stream("/events").await.unwrap();
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    assert_eq!(client.in_flight(), 1);

    events.send(Bytes::from("data: one\n\n")).await.unwrap();
    assert_eq!(stream.chunk().await.unwrap().unwrap(), "data: one\n\n");
    events.send(Bytes::from("data: two\n\n")).await.unwrap();
    assert_eq!(stream.chunk().await.unwrap().unwrap(), "data: two\n\n");
    drop(events);
    assert_eq!(stream.chunk().await.unwrap(), None);
    drop(stream);
    assert_eq!(client.in_flight(), 0);
}

#[tokio::test]
async fn http2_with_prior_knowledge() {
    let upstream = echo().await;
    let client = ServiceClient::new(
        ServiceConfig::new("h2", &upstream.url())
            .unwrap()
            .http2(true),
    )
    .unwrap();
    let response = client.get("/x").await.unwrap();
    assert_eq!(response.text().unwrap(), "HTTP/2.0 /x");
    // HTTP/2 names the authority in `:authority`, never in a `Host` header.
    assert!(!upstream.received()[0].headers.contains_key("host"));
}

#[tokio::test]
async fn requests_name_the_upstream_never_the_pool_key() {
    // HTTP/1 requests name a placeholder authority to hyper-util, to key
    // the client's pool; the upstream must see only its own name.
    let upstream = Upstream::start(|req| async move { text(200, &req.uri().to_string()) }).await;
    let authority = upstream.url().trim_start_matches("http://").to_owned();
    let client = ServiceClient::new(ServiceConfig::new("svc", &upstream.url()).unwrap()).unwrap();
    let response = client.get("/x?y=1").await.unwrap();
    assert_eq!(response.text().unwrap(), "/x?y=1", "origin form");
    // CONNECT's request target is the authority itself (its answer's
    // body is the tunnel, so the upstream's record tells what it got).
    client
        .request(http::Method::CONNECT, "/")
        .send()
        .await
        .unwrap();
    assert_eq!(upstream.received()[1].uri, authority.as_str());
    for got in upstream.received() {
        assert_eq!(got.headers["host"], authority.as_str());
    }
}

#[tokio::test(flavor = "current_thread")]
async fn background_tasks_end_with_the_last_clone() {
    let tasks = tokio::runtime::Handle::current().metrics();
    let before = tasks.num_alive_tasks();
    let client =
        ServiceClient::new(ServiceConfig::new("svc", "http://127.0.0.1:9").unwrap()).unwrap();
    // The breaker's log, and the timer that spares the time driver a
    // wake-up per call.
    assert_eq!(tasks.num_alive_tasks(), before + 2);
    let clone = client.clone();
    drop(client);
    tokio::task::yield_now().await;
    assert_eq!(tasks.num_alive_tasks(), before + 2);
    drop(clone);
    // Aborted tasks end when the scheduler next reaches them.
    for _ in 0..10 {
        if tasks.num_alive_tasks() == before {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(tasks.num_alive_tasks(), before);

    // Without an attempt timeout or a deadline no call sets a timer, and
    // nothing is kept.
    let mut config = ServiceConfig::new("svc", "http://127.0.0.1:9").unwrap();
    config.policy.timeout = None;
    config.policy.deadline = None;
    let _client = ServiceClient::new(config).unwrap();
    assert_eq!(tasks.num_alive_tasks(), before + 1);
}

/// Log lines, captured.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn logs_tell_the_story_of_a_call() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let upstream = Upstream::start(|_req| async { text(503, "") }).await;
    let billing = ServiceClient::new(
        ServiceConfig::new("billing", &upstream.url())
            .unwrap()
            .service_name("Billing Server")
            .retry(retry::Config {
                base_delay: Duration::from_millis(1),
                jitter: retry::Jitter::None,
                ..retry::Config::default()
            })
            .circuit_breaker(breaker::Config {
                consecutive_failures: 3,
                ..breaker::Config::default()
            }),
    )
    .unwrap();
    let mut changes = billing.circuit_breaker().unwrap().subscribe();
    billing.post("/charge", "{}").await.unwrap_err();
    billing.get("/balance").await.unwrap_err();
    changes.recv().await.unwrap();
    // The logging task got the same change; let it run.
    let text = || String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    for _ in 0..100 {
        if text().contains("circuit breaker OPEN") {
            break;
        }
        tokio::task::yield_now().await;
    }
    let text = text();
    for line in [
        "[Billing Server] POST /charge (attempt 1/3)",
        "[Billing Server] ✗ POST /charge failed: [Billing Server] answered 503 Service Unavailable",
        "[Billing Server] GET /balance failed on attempt 1/3",
        "[Billing Server] retrying in 1.0ms",
        "[Billing Server] GET /balance (attempt 2/3)",
        "[Billing Server] circuit breaker OPEN (threshold reached: 3/3)",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}
