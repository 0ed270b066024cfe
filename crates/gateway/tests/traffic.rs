//! Traffic management against several real upstreams on 127.0.0.1:0:
//! weighted splits, header routing, load balancing, outlier ejection and
//! the retry budget.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use support::{admin, gateway, url};
use tidegate_testkit::{full, get, text, Upstream};
use tokio::sync::Semaphore;

/// An upstream that answers its own name.
async fn named(name: &'static str) -> Upstream {
    Upstream::start(move |_| async move { text(200, name) }).await
}

/// Upstream `svc` at `endpoints` with `extra` settings, behind route `all` on `/`.
fn svc(endpoints: &[&str], extra: &str) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    format!(
        "[[upstreams]]\nname = \"svc\"\nendpoints = [{}]\n{extra}\n\
         [[routes]]\nname = \"all\"\npath_prefix = \"/\"\nupstream = \"svc\"\n",
        endpoints.join(", ")
    )
}

/// Sends `n` GETs of `path`, `parallel` at a time, over pooled
/// connections; returns the answers' bodies.
async fn bodies(
    gw: &tidegate_gateway::http::server::Running,
    path: &str,
    n: usize,
    header: Option<(&str, String)>,
) -> Vec<String> {
    let client = tidegate_testkit::client();
    let gate = Arc::new(Semaphore::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let client = client.clone();
        let permit = gate.clone().acquire_owned().await.unwrap();
        let mut request = Request::get(url(gw, path));
        if let Some((name, value)) = &header {
            request = request.header(*name, value.replace("{i}", &i.to_string()));
        }
        let request = request.body(full("")).unwrap();
        tasks.spawn(async move {
            let response = client.request(request).await.unwrap();
            assert_eq!(response.status(), 200);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            drop(permit);
            String::from_utf8(body.to_vec()).unwrap()
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(body) = tasks.join_next().await {
        all.push(body.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_split_holds_its_ratio_and_headers_pick_a_version() {
    let (v1, v2) = (named("v1").await, named("v2").await);
    let gw = gateway(&format!(
        r#"
[[upstreams]]
name = "kb-v1"
endpoints = ["{}"]
[[upstreams]]
name = "kb-v2"
endpoints = ["{}"]

[[routes]]
name = "canary"
path_prefix = "/kb"
split = [{{ upstream = "kb-v1", weight = 80 }}, {{ upstream = "kb-v2", weight = 20 }}]

[[routes]]
name = "premium"
path_prefix = "/kb"
headers = {{ "end-user" = "premium" }}
upstream = "kb-v2"
"#,
        v1.url(),
        v2.url()
    ))
    .await;

    let all = bodies(&gw, "/kb/search", 10_000, None).await;
    let to_v2 = all.iter().filter(|b| *b == "v2").count();
    let share = to_v2 as f64 / all.len() as f64;
    assert!(
        (0.17..=0.23).contains(&share),
        "v2 got {share:.4} of the traffic"
    );

    let premium = bodies(&gw, "/kb/search", 50, Some(("end-user", "premium".into()))).await;
    assert!(premium.iter().all(|b| b == "v2"), "{premium:?}");
    let metrics = get(&admin(&gw, "/metrics")).await.body;
    assert!(
        metrics.contains(r#"route="canary",upstream="kb-v2""#),
        "{metrics}"
    );
}

#[tokio::test]
async fn least_request_prefers_the_idle_endpoint() {
    // `/hold` requests wait until released; the rest answer at once.
    let release = Arc::new(Semaphore::new(0));
    let hold = |name: &'static str, release: Arc<Semaphore>| {
        Upstream::start(move |req| {
            let release = release.clone();
            async move {
                if req.uri().path() == "/hold" {
                    let _ = release.acquire().await.unwrap();
                }
                text(200, name)
            }
        })
    };
    let a = hold("a", release.clone()).await;
    let b = hold("b", release.clone()).await;
    let gw = gateway(&svc(
        &[&a.url(), &b.url()],
        r#"
load_balancing = "least_request"
"#,
    ))
    .await;

    let hold_url = url(&gw, "/hold");
    let held = tokio::spawn(async move { get(&hold_url).await });
    let busy = loop {
        tokio::task::yield_now().await;
        if a.hits() + b.hits() == 1 {
            break if a.hits() == 1 { "a" } else { "b" };
        }
    };
    let mut answers = Vec::new();
    for _ in 0..30 {
        answers.push(get(&url(&gw, "/fast")).await.body);
    }
    assert!(
        answers.iter().all(|name| name != busy),
        "a request went to the busy endpoint {busy}: {answers:?}"
    );
    release.add_permits(1);
    assert_eq!(held.await.unwrap().body, busy);
}

#[tokio::test]
async fn consistent_hash_keeps_a_key_on_one_endpoint() {
    let (a, b, c) = (named("a").await, named("b").await, named("c").await);
    let gw = gateway(&svc(
        &[&a.url(), &b.url(), &c.url()],
        r#"
load_balancing = "consistent_hash"
hash_header = "x-user"
"#,
    ))
    .await;

    let same = bodies(&gw, "/", 40, Some(("x-user", "alice".into()))).await;
    assert!(same.iter().all(|e| *e == same[0]), "{same:?}");
    let spread = bodies(&gw, "/", 60, Some(("x-user", "user-{i}".into()))).await;
    for name in ["a", "b", "c"] {
        assert!(spread.iter().any(|e| e == name), "no key went to {name}");
    }
}

#[tokio::test]
async fn failing_endpoints_are_ejected_and_return_after_the_ejection_time() {
    let bad = Upstream::start(|_| async { text(500, "bad") }).await;
    let good = named("good").await;
    let gw = gateway(&svc(
        &[&bad.url(), &good.url()],
        r#"
[upstreams.outlier_detection]
consecutive_errors = 3
base_ejection_time = "30s"
[upstreams.policy.retry]
max_attempts = 1
[upstreams.policy.circuit_breaker]
consecutive_failures = 1000
minimum_calls = 1000
window_size = 1000
"#,
    ))
    .await;
    let mut events = gw.gateway.notices.subscribe();

    // Round robin: every second request reaches the bad endpoint until its third error.
    for _ in 0..6 {
        get(&url(&gw, "/")).await;
    }
    assert_eq!(bad.hits(), 3);
    let event = events.recv().await.unwrap();
    assert!(
        matches!(&event, tidegate_gateway::observe::notices::Notice::Ejected { seconds, .. } if *seconds == 30.0),
        "{event:?}"
    );
    for _ in 0..10 {
        assert_eq!(get(&url(&gw, "/")).await.body, "good");
    }
    assert_eq!(bad.hits(), 3, "an ejected endpoint gets nothing");
    let status = get(&admin(&gw, "/status/services")).await.json();
    let endpoints = &status["services"]["svc"]["endpoints"];
    assert_eq!(endpoints[0]["ejected"], true, "{status}");
    assert_eq!(endpoints[1]["ejected"], false);

    // Past the ejection time it is tried again.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(31)).await;
    tokio::time::resume();
    for _ in 0..4 {
        get(&url(&gw, "/")).await;
    }
    assert!(bad.hits() > 3, "the endpoint is back in rotation");
    let metrics = get(&admin(&gw, "/metrics")).await.body;
    assert!(
        metrics.contains("tidegate_outlier_ejections_total{"),
        "{metrics}"
    );
}

#[tokio::test]
async fn outlier_detection_never_ejects_more_than_its_share() {
    let a = Upstream::start(|_| async { text(503, "a") }).await;
    let b = Upstream::start(|_| async { text(503, "b") }).await;
    let gw = gateway(&svc(
        &[&a.url(), &b.url()],
        r#"
[upstreams.outlier_detection]
consecutive_errors = 1
max_ejection_percent = 100
[upstreams.policy.retry]
max_attempts = 1
[upstreams.policy.circuit_breaker]
consecutive_failures = 1000
minimum_calls = 1000
window_size = 1000
"#,
    ))
    .await;
    for _ in 0..10 {
        assert_eq!(get(&url(&gw, "/")).await.status, 503);
    }
    assert_eq!(
        a.hits() + b.hits(),
        10,
        "one endpoint always stays in rotation"
    );
}

#[tokio::test]
async fn the_retry_budget_caps_retries_against_a_failing_upstream() {
    let down = Upstream::start(|_| async { text(503, "down") }).await;
    let gw = gateway(&svc(
        &[&down.url()],
        r#"
[upstreams.policy.retry]
max_attempts = 5
base_delay = "1ms"
max_delay = "1ms"
budget_ratio = 0.2
budget_min_per_sec = 0
[upstreams.policy.circuit_breaker]
consecutive_failures = 100000
minimum_calls = 100000
window_size = 100000
"#,
    ))
    .await;
    for _ in 0..200 {
        assert_eq!(get(&url(&gw, "/")).await.status, 503);
    }
    let retries = down.hits() - 200;
    // Without the budget it would be 800.
    assert!(retries <= 40, "{retries} retries for 200 requests");
    assert!(retries >= 30, "the budget allows about a fifth: {retries}");
}

/// `svc` with `[upstreams.pool]` settings; `/hold` waits for a permit.
async fn pooled(
    pool: &str,
) -> (
    Upstream,
    Arc<Semaphore>,
    tidegate_gateway::http::server::Running,
) {
    let release = Arc::new(Semaphore::new(0));
    let gate = release.clone();
    let upstream = Upstream::start(move |req| {
        let gate = gate.clone();
        async move {
            if req.uri().path() == "/hold" {
                let _ = gate.acquire().await.unwrap();
            }
            text(200, "ok")
        }
    })
    .await;
    let gw = gateway(&svc(
        &[&upstream.url()],
        &format!("[upstreams.pool]\n{pool}\n"),
    ))
    .await;
    (upstream, release, gw)
}

#[tokio::test]
async fn pool_limits_cap_connections_and_refuse_past_the_pending_limit() {
    let (upstream, release, gw) = pooled("max_connections = 1\nmax_pending_requests = 1").await;
    let svc = gw.gateway.table().upstream("svc").unwrap().clone();
    let (hold, fast) = (url(&gw, "/hold"), url(&gw, "/fast"));
    let first = tokio::spawn(async move { get(&hold).await });
    while upstream.hits() == 0 {
        tokio::task::yield_now().await;
    }
    let second = tokio::spawn(async move { get(&fast).await });
    while svc.gate.pending() == 0 {
        tokio::task::yield_now().await;
    }
    let status = get(&admin(&gw, "/status/services")).await.json();
    let pool = &status["services"]["svc"]["pool"];
    assert_eq!(
        (&pool["connections"], &pool["pending"]),
        (&1.into(), &1.into()),
        "{status}"
    );
    let refused = get(&url(&gw, "/fast")).await;
    assert_eq!(refused.status, 503);
    assert_eq!(
        refused.json()["error"],
        "too many requests waiting for a connection"
    );
    assert_eq!(
        upstream.hits(),
        1,
        "the waiting and the refused requests are not sent"
    );

    release.add_permits(1);
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(second.await.unwrap().status, 200);
    assert_eq!(
        upstream.connections(),
        1,
        "the waiting request took the freed connection"
    );
    let metrics = get(&admin(&gw, "/metrics")).await.body;
    assert!(
        metrics.contains(r#"tidegate_rejections_total{upstream="svc",reason="pool_overflow"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_connection_is_retired_after_its_request_limit() {
    let (upstream, _release, gw) = pooled("max_requests_per_connection = 2").await;
    for _ in 0..6 {
        assert_eq!(get(&url(&gw, "/fast")).await.status, 200);
    }
    assert_eq!(upstream.hits(), 6);
    assert_eq!(upstream.connections(), 3);
}

#[tokio::test]
async fn an_attempt_cut_by_the_deadline_leaves_its_endpoint_idle() {
    // The upstream never answers; the deadline ends the call.
    let never = Arc::new(Semaphore::new(0));
    let upstream = Upstream::start(move |_| {
        let never = never.clone();
        async move {
            let _ = never.acquire().await;
            text(200, "late")
        }
    })
    .await;
    let gw = gateway(&svc(
        &[&upstream.url()],
        "load_balancing = \"least_request\"\n[upstreams.policy]\ndeadline = \"200ms\"\n",
    ))
    .await;
    assert_eq!(get(&url(&gw, "/")).await.status, 504);
    let status = get(&admin(&gw, "/status/services")).await.json();
    let endpoint = &status["services"]["svc"]["endpoints"][0];
    assert_eq!(
        endpoint["in_flight"], 0,
        "least_request would shun it forever: {status}"
    );
}

#[tokio::test]
async fn one_dead_endpoint_of_two_costs_no_request_and_never_opens_the_breaker() {
    let dead = tidegate_testkit::refused_url().await;
    let live = named("live").await;
    // Default policies and outlier detection, dead endpoint first.
    let gw = gateway(&svc(&[dead.trim_end_matches('/'), &live.url()], "")).await;
    let mut events = gw.gateway.notices.subscribe();
    for i in 0..200 {
        let answer = get(&url(&gw, "/")).await;
        assert_eq!(
            (answer.status.as_u16(), answer.body.as_str()),
            (200, "live"),
            "request {i}"
        );
    }
    let status = get(&admin(&gw, "/status/services")).await.json();
    let svc = &status["services"]["svc"];
    assert_eq!(svc["state"], "closed", "{status}");
    assert_eq!(svc["endpoints"][0]["ejected"], true, "{status}");
    assert_eq!(svc["endpoints"][1]["ejected"], false, "{status}");
    // The first refused connection ejected it: one retry in 200 requests.
    let event = events.recv().await.unwrap();
    assert!(
        matches!(
            &event,
            tidegate_gateway::observe::notices::Notice::Ejected { .. }
        ),
        "{event:?}"
    );
    assert_eq!(live.hits(), 200);
    let metrics = get(&admin(&gw, "/metrics")).await.body;
    assert!(
        metrics.contains(r#"tidegate_retries_total{upstream="svc"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_retry_goes_to_another_endpoint_than_the_one_that_failed() {
    let failing = Upstream::start(|_| async { text(503, "busy") }).await;
    let live = named("live").await;
    let gw = gateway(&svc(
        &[&failing.url(), &live.url()],
        // Outlier detection off: only the retry's choice keeps requests off `failing`.
        r#"
[upstreams.outlier_detection]
enabled = false
[upstreams.policy.retry]
base_delay = "1ms"
max_delay = "1ms"
budget_min_per_sec = 1000
"#,
    ))
    .await;
    for _ in 0..20 {
        let answer = get(&url(&gw, "/")).await;
        assert_eq!(
            (answer.status.as_u16(), answer.body.as_str()),
            (200, "live")
        );
    }
    // Round robin sends every second first attempt to `failing`; its retry goes to `live`.
    assert_eq!(failing.hits(), 10);
    assert_eq!(live.hits(), 20);
    let status = get(&admin(&gw, "/status/services")).await.json();
    assert_eq!(status["services"]["svc"]["state"], "closed", "{status}");
    assert_eq!(status["services"]["svc"]["failure_count"], 0, "{status}");
}

#[tokio::test]
async fn a_request_that_fails_on_every_endpoint_counts_once_for_the_breaker() {
    let a = Upstream::start(|_| async { text(503, "a") }).await;
    let b = Upstream::start(|_| async { text(503, "b") }).await;
    let gw = gateway(&svc(
        &[&a.url(), &b.url()],
        r#"
[upstreams.outlier_detection]
enabled = false
[upstreams.policy.retry]
max_attempts = 2
base_delay = "1ms"
max_delay = "1ms"
budget_min_per_sec = 1000
[upstreams.policy.circuit_breaker]
consecutive_failures = 2
"#,
    ))
    .await;
    assert_eq!(get(&url(&gw, "/")).await.status, 503);
    assert_eq!(
        (a.hits(), b.hits()),
        (1, 1),
        "the retry went to the other endpoint"
    );
    let status = get(&admin(&gw, "/status/services")).await.json();
    assert_eq!(status["services"]["svc"]["state"], "closed", "{status}");
    assert_eq!(get(&url(&gw, "/")).await.status, 503);
    let status = get(&admin(&gw, "/status/services")).await.json();
    assert_eq!(status["services"]["svc"]["state"], "open", "{status}");
}
