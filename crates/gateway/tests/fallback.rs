//! Route fallbacks and fault injection against real upstreams.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use support::{admin, gateway, url};
use tidegate_testkit::{full, get, refused_url, send, text, Upstream};
use tokio::time::Instant;

/// A route `r` on `/` to upstream `svc` at `endpoint`, with `route_extra`
/// under the route and one attempt per request.
fn one_route(endpoint: &str, route_extra: &str, more: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "svc"
endpoints = ["{endpoint}"]
[upstreams.policy.retry]
max_attempts = 1
{more}
[[routes]]
name = "r"
path_prefix = "/"
upstream = "svc"
{route_extra}
"#
    )
}

/// The value of one sample in Prometheus text, 0 if absent.
fn sample(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_static_fallback_answers_when_the_upstream_is_down_or_its_breaker_open() {
    let gw = gateway(&one_route(
        &refused_url().await,
        r#"fallback = { kind = "static", status = 200, content_type = "application/json", body = "{\"results\":[]}" }"#,
        "[upstreams.policy.circuit_breaker]\nconsecutive_failures = 1",
    ))
    .await;
    for _ in 0..3 {
        let answer = get(&url(&gw, "/search")).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, r#"{"results":[]}"#);
        assert_eq!(answer.headers["content-type"], "application/json");
        assert_eq!(answer.headers["x-tidegate-fallback"], "static");
        assert!(answer.headers.contains_key("x-correlation-id"));
    }
    let status = get(&admin(&gw, "/status/services")).await.json();
    assert_eq!(status["services"]["svc"]["state"], "open");
    let metrics = get(&admin(&gw, "/metrics")).await.body;
    assert_eq!(
        sample(
            &metrics,
            r#"tidegate_fallbacks_total{route="r",kind="static"}"#
        ),
        3
    );
}

#[tokio::test]
async fn an_upstream_fallback_sends_the_request_to_the_other_service() {
    let backup = Upstream::start(|req| async move {
        use http_body_util::BodyExt;
        let body = req.into_body().collect().await.unwrap().to_bytes();
        text(
            200,
            &format!("backup got {}", String::from_utf8_lossy(&body)),
        )
    })
    .await;
    let gw = gateway(&format!(
        r#"
[[upstreams]]
name = "primary"
endpoints = ["{}"]
[[upstreams]]
name = "backup"
endpoints = ["{}"]
[[routes]]
name = "r"
path_prefix = "/"
upstream = "primary"
fallback = {{ kind = "upstream", upstream = "backup" }}
"#,
        refused_url().await,
        backup.url()
    ))
    .await;
    let answer = send(
        Request::post(url(&gw, "/orders"))
            .body(full("order-1"))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "backup got order-1");
    assert_eq!(answer.headers["x-tidegate-fallback"], "upstream");
    assert_eq!(backup.received()[0].uri, "/orders");
}

#[tokio::test]
async fn a_stale_fallback_serves_the_last_good_answer_per_client_until_max_age() {
    let failing = Arc::new(AtomicBool::new(false));
    let fail = failing.clone();
    let upstream = Upstream::start(move |req| {
        let fail = fail.load(Ordering::SeqCst);
        async move {
            if fail {
                text(503, "down")
            } else {
                text(200, &format!("fresh {}", req.uri()))
            }
        }
    })
    .await;
    let gw = gateway(&one_route(
        &upstream.url(),
        r#"fallback = { kind = "stale", max_age = "5m" }"#,
        "",
    ))
    .await;
    assert_eq!(get(&url(&gw, "/item/1")).await.body, "fresh /item/1");
    let user = |path: &str| {
        Request::get(url(&gw, path))
            .header("authorization", "Bearer someone")
            .body(full(""))
            .unwrap()
    };
    assert_eq!(send(user("/item/1")).await.body, "fresh /item/1");

    failing.store(true, Ordering::SeqCst);
    let stale = get(&url(&gw, "/item/1")).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.body, "fresh /item/1");
    assert_eq!(stale.headers["x-tidegate-fallback"], "stale");
    assert!(stale.headers.contains_key("age"));
    assert_eq!(
        send(user("/item/1")).await.body,
        "fresh /item/1",
        "each client has its own"
    );
    let other_user = send(
        Request::get(url(&gw, "/item/1"))
            .header("authorization", "Bearer someone-else")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(other_user.status, 503, "never another client's answer");
    assert_eq!(
        get(&url(&gw, "/item/2")).await.status,
        503,
        "nothing kept for it"
    );

    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(301)).await;
    tokio::time::resume();
    assert_eq!(get(&url(&gw, "/item/1")).await.status, 503, "past max_age");
}

#[tokio::test]
async fn client_errors_get_no_fallback() {
    let upstream = Upstream::start(|_| async { text(404, "no such item") }).await;
    let gw = gateway(&one_route(
        &upstream.url(),
        r#"fallback = { kind = "static", body = "{}" }"#,
        "",
    ))
    .await;
    let answer = get(&url(&gw, "/item/9")).await;
    assert_eq!(answer.status, 404);
    assert!(!answer.headers.contains_key("x-tidegate-fallback"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_abort_and_delay_their_share_of_requests() {
    let upstream = Upstream::start(|_| async { text(200, "ok") }).await;
    let gw = gateway(&one_route(
        &upstream.url(),
        r#"fault = { abort_status = 503, abort_percent = 30, delay = "1ms", delay_percent = 25 }"#,
        "",
    ))
    .await;
    let client = tidegate_testkit::client();
    // 5 000 draws: ±3 points is over 4.5 standard deviations for either rate.
    let n = 5000;
    let mut aborted = 0;
    for _ in 0..n {
        let response = client
            .request(Request::get(url(&gw, "/")).body(full("")).unwrap())
            .await
            .unwrap();
        if response.status() == 503 {
            aborted += 1;
        } else {
            assert_eq!(response.status(), 200);
        }
    }
    let share = f64::from(aborted) / f64::from(n);
    assert!((0.27..=0.33).contains(&share), "aborted {share:.3}");
    assert_eq!(
        upstream.hits(),
        (n - aborted) as usize,
        "an aborted request never leaves"
    );
    let metrics = get(&admin(&gw, "/metrics")).await.body;
    let delayed =
        sample(&metrics, r#"tidegate_faults_total{route="r",kind="delay"}"#) as f64 / f64::from(n);
    assert!((0.22..=0.28).contains(&delayed), "delayed {delayed:.3}");
}

#[tokio::test]
async fn a_delay_fault_holds_the_request() {
    let upstream = Upstream::start(|_| async { text(200, "ok") }).await;
    let gw = gateway(&one_route(
        &upstream.url(),
        r#"fault = { delay = "200ms" }"#,
        "",
    ))
    .await;
    let start = Instant::now();
    assert_eq!(get(&url(&gw, "/")).await.status, 200);
    assert!(start.elapsed() >= Duration::from_millis(200));
}
