//! The client against real servers on 127.0.0.1:0 that fail on command.
//! Every test counts what the server received.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use tidegate_client::config::ServiceConfig;
use tidegate_client::{ErrorKind, ServiceClient};
use tidegate_resilience::breaker::{self, CircuitState};
use tidegate_resilience::{bulkhead, retry};
use tidegate_testkit::{refused_url, text, Fault, RawServer, Upstream};

/// Three attempts 1 ms apart, 300 ms each; the breaker out of the way.
fn config(url: &str) -> ServiceConfig {
    ServiceConfig::new("billing", url)
        .unwrap()
        .service_name("Billing Server")
        .timeout(Duration::from_millis(300))
        .retry(retry::Config {
            base_delay: Duration::from_millis(1),
            jitter: retry::Jitter::None,
            ..retry::Config::default()
        })
        .circuit_breaker(breaker::Config {
            consecutive_failures: 1000,
            failure_rate: 1.0,
            ..breaker::Config::default()
        })
}

fn client(config: ServiceConfig) -> ServiceClient {
    ServiceClient::new(config).unwrap()
}

/// An upstream answering the `n`th request (from 0) with `answer(n)`.
async fn scripted(answer: fn(usize) -> (u16, &'static str)) -> Upstream {
    let n = Arc::new(AtomicUsize::new(0));
    Upstream::start(move |_req| {
        let (status, body) = answer(n.fetch_add(1, Ordering::SeqCst));
        async move { text(status, body) }
    })
    .await
}

/// An upstream that reports each request as it comes in, then holds it
/// until `release` has a permit for it, and answers `status` and `body`.
async fn gated(
    status: u16,
    body: &'static str,
) -> (
    Upstream,
    tokio::sync::mpsc::UnboundedReceiver<()>,
    Arc<tokio::sync::Semaphore>,
) {
    let (entered_tx, entered) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let gate = release.clone();
    let upstream = Upstream::start(move |_req| {
        let (entered_tx, gate) = (entered_tx.clone(), gate.clone());
        async move {
            entered_tx.send(()).unwrap();
            gate.acquire().await.unwrap().forget();
            text(status, body)
        }
    })
    .await;
    (upstream, entered, release)
}

#[tokio::test]
async fn a_get_is_retried_exactly_as_configured() {
    let upstream = scripted(|_| (503, "busy")).await;
    let err = client(config(&upstream.url()))
        .get("/balance")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RetryExhausted);
    assert_eq!(err.attempts(), Some(3));
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    let last = err.last_error().unwrap();
    assert_eq!(last.kind(), ErrorKind::Server);
    assert_eq!(last.body().unwrap().as_ref(), b"busy");
    assert_eq!(err.service(), "Billing Server");
    assert_eq!(err.request_id().unwrap().len(), 32);
    assert_eq!(upstream.hits(), 3);
}

#[tokio::test]
async fn success_after_failures_returns_the_success() {
    let upstream = scripted(|n| if n < 2 { (502, "") } else { (200, "paid") }).await;
    let response = client(config(&upstream.url())).get("/x").await.unwrap();
    assert_eq!(response.text().unwrap(), "paid");
    assert_eq!(upstream.hits(), 3);
}

#[tokio::test]
async fn a_post_is_never_delivered_twice() {
    let upstream = scripted(|_| (503, "")).await;
    let billing = client(config(&upstream.url()));
    let err = billing.post("/charge", "{}").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Server);
    assert_eq!(upstream.hits(), 1);

    // With an idempotency key the service deduplicates, so it may be resent.
    let err = billing
        .request(Method::POST, "/charge")
        .idempotency_key("charge-7")
        .body("{}")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RetryExhausted);
    assert_eq!(upstream.hits(), 4);
    assert_eq!(
        upstream.received()[3].headers["idempotency-key"],
        "charge-7"
    );
}

#[tokio::test]
async fn bodies_over_the_replay_cap_are_not_resent() {
    let upstream = scripted(|_| (503, "")).await;
    let billing = client(config(&upstream.url()).max_replay_bytes(4));
    let err = billing.put("/doc", "12345").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Server);
    assert_eq!(upstream.hits(), 1);
    billing.put("/doc", "1234").await.unwrap_err();
    assert_eq!(upstream.hits(), 4);
}

#[tokio::test]
async fn a_refused_connection_is_retried_for_any_method() {
    let err = client(config(&refused_url().await))
        .post("/charge", "{}")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RetryExhausted);
    assert_eq!(err.attempts(), Some(3));
    assert_eq!(err.last_error().unwrap().kind(), ErrorKind::Connection);
}

#[tokio::test]
async fn a_hanging_server_times_out_and_only_idempotent_calls_are_resent() {
    let server = RawServer::start(Fault::Hang).await;
    let billing = client(config(&server.url()));
    let err = billing.post("/charge", "{}").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert_eq!(server.requests(), 1);

    let err = billing.get("/balance").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RetryExhausted);
    assert_eq!(err.last_error().unwrap().kind(), ErrorKind::Timeout);
    assert_eq!(server.requests(), 4);
}

#[tokio::test]
async fn a_reset_mid_body_is_a_connection_error_retried_only_when_safe() {
    let server = RawServer::start(Fault::CutMidBody).await;
    let billing = client(config(&server.url()));
    let err = billing.post("/charge", "{}").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection);
    assert_eq!(server.requests(), 1);

    let err = billing.get("/statement").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RetryExhausted);
    assert_eq!(err.last_error().unwrap().kind(), ErrorKind::Connection);
    assert_eq!(server.requests(), 4);
}

#[tokio::test]
async fn slow_headers_time_out_and_the_retry_succeeds() {
    let n = Arc::new(AtomicUsize::new(0));
    let upstream = Upstream::start(move |_req| {
        let first = n.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                // The head never comes within the attempt timeout.
                std::future::pending::<()>().await;
            }
            text(200, "late but fine")
        }
    })
    .await;
    let response = client(config(&upstream.url())).get("/x").await.unwrap();
    assert_eq!(response.text().unwrap(), "late but fine");
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn status_429_is_retried_only_with_retry_after() {
    let upstream = Upstream::start(|req| async move {
        let mut answer = text(429, "slow down");
        let after = match req.uri().path() {
            "/with" => Some("0"),
            // The HTTP-date form, here a date gone by: retry at once.
            "/dated" => Some("Sun, 06 Nov 1994 08:49:37 GMT"),
            "/garbled" => Some("soon"),
            _ => None,
        };
        if let Some(after) = after {
            answer
                .headers_mut()
                .insert("retry-after", http::HeaderValue::from_static(after));
        }
        answer
    })
    .await;
    let billing = client(config(&upstream.url()));
    for without in ["/without", "/garbled"] {
        let before = upstream.hits();
        let err = billing.get(without).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::RateLimited, "{without}");
        assert_eq!(err.retry_after(), None, "{without}");
        assert_eq!(upstream.hits() - before, 1, "{without}");
    }

    for with in ["/with", "/dated"] {
        let before = upstream.hits();
        let err = billing.get(with).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::RetryExhausted, "{with}");
        assert_eq!(err.last_error().unwrap().kind(), ErrorKind::RateLimited);
        assert_eq!(err.retry_after(), Some(Duration::ZERO), "{with}");
        assert_eq!(upstream.hits() - before, 3, "{with}");
    }
}

#[tokio::test]
async fn client_errors_are_never_retried_and_have_their_kinds() {
    let upstream = Upstream::start(|req| async move {
        let status: u16 = req.uri().path()[1..].parse().unwrap();
        text(status, "{\"detail\":\"no\"}")
    })
    .await;
    let billing = client(config(&upstream.url()));
    for (status, kind) in [
        (400, ErrorKind::Validation),
        (401, ErrorKind::Authentication),
        (403, ErrorKind::Authentication),
        (404, ErrorKind::NotFound),
        (409, ErrorKind::Rejected),
        (422, ErrorKind::Validation),
        (500, ErrorKind::Server),
    ] {
        let before = upstream.hits();
        let err = billing.get(&format!("/{status}")).await.unwrap_err();
        assert_eq!(err.kind(), kind, "{status}");
        assert_eq!(err.status().unwrap().as_u16(), status);
        assert_eq!(err.body().unwrap().as_ref(), b"{\"detail\":\"no\"}");
        assert_eq!(upstream.hits(), before + 1, "{status} is not retried");
    }
}

#[tokio::test]
async fn the_breaker_opens_rejects_without_calling_and_closes_after_a_probe() {
    let upstream = scripted(|n| if n < 3 { (500, "") } else { (200, "back") }).await;
    let billing = client(
        config(&upstream.url())
            .retry(retry::Config {
                max_attempts: 1,
                ..retry::Config::default()
            })
            .circuit_breaker(breaker::Config {
                consecutive_failures: 3,
                open_duration: Duration::from_secs(60),
                ..breaker::Config::default()
            }),
    );
    for _ in 0..3 {
        assert_eq!(
            billing.get("/").await.unwrap_err().kind(),
            ErrorKind::Server
        );
    }
    let breaker = billing.circuit_breaker().unwrap();
    assert_eq!(breaker.state(), CircuitState::Open);
    let err = billing.get("/").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CircuitOpen);
    assert!(err.retry_after().unwrap() > Duration::from_secs(59));
    assert_eq!(upstream.hits(), 3, "an open breaker does not call");
    let status = billing.status();
    assert_eq!(status.state, "open");
    assert!(status.last_failure.is_some());

    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(60)).await;
    tokio::time::resume();
    assert_eq!(billing.get("/").await.unwrap().text().unwrap(), "back");
    assert_eq!(breaker.state(), CircuitState::Closed);
    assert_eq!(upstream.hits(), 4);
}

#[tokio::test]
async fn the_bulkhead_rejects_the_excess_without_calling() {
    let (upstream, mut entered, release) = gated(200, "done").await;
    let billing = client(config(&upstream.url()).bulkhead(bulkhead::Config {
        max_concurrent: 2,
        max_queued: 0,
        ..bulkhead::Config::default()
    }));
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let billing = billing.clone();
            tokio::spawn(async move { billing.get("/slow").await })
        })
        .collect();
    entered.recv().await.unwrap();
    entered.recv().await.unwrap();
    assert_eq!(billing.in_flight(), 2);

    let err = billing.get("/slow").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BulkheadFull);
    assert!(err.is_rejected_locally());
    assert_eq!(upstream.hits(), 2);

    release.add_permits(2);
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().text().unwrap(), "done");
    }
    assert_eq!(billing.in_flight(), 0);
}

#[tokio::test]
async fn connections_stay_pooled_for_as_many_calls_as_are_in_flight() {
    // Every request is held until 64 are in: 64 calls, 64 connections.
    const CALLS: usize = 64;
    let all_in = Arc::new(tokio::sync::Barrier::new(CALLS));
    let upstream = Upstream::start(move |_req| {
        let all_in = all_in.clone();
        async move {
            all_in.wait().await;
            text(200, "ok")
        }
    })
    .await;
    let billing = client(ServiceConfig::new("billing", &upstream.url()).unwrap());
    for _ in 0..3 {
        let calls: Vec<_> = (0..CALLS)
            .map(|_| {
                let billing = billing.clone();
                tokio::spawn(async move { billing.get("/").await })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap().text().unwrap(), "ok");
        }
    }
    assert_eq!(upstream.hits(), 3 * CALLS);
    // The second and third rounds went over the connections of the first.
    assert_eq!(upstream.connections(), CALLS);
}

#[tokio::test]
async fn close_refuses_new_calls_and_drops_idle_connections() {
    let server = RawServer::start(Fault::Answer(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ))
    .await;
    let billing = client(config(&server.url()));
    assert_eq!(billing.get("/").await.unwrap().text().unwrap(), "ok");
    billing.close();
    let err = billing.get("/").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    assert_eq!(server.requests(), 1);
    tokio::time::timeout(Duration::from_secs(10), server.closed_by_client(1))
        .await
        .expect("the pooled connection is closed");
}

#[tokio::test]
async fn a_call_that_would_try_again_after_close_ends_closed() {
    // The first attempt is held at the server until the client is closed,
    // then answered 503: the retry it earns is refused, not sent.
    let (upstream, mut entered, release) = gated(503, "busy").await;
    let billing = client(config(&upstream.url()));
    let call = tokio::spawn({
        let billing = billing.clone();
        async move { billing.get("/balance").await }
    });
    entered.recv().await.unwrap();
    billing.close();
    release.add_permits(1);
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    assert_eq!(upstream.hits(), 1);
}
