//! The admin API against its own OpenAPI document, breaker control behind
//! the admin token, the redacted config, and webhook alerts delivered to
//! real receivers (one that fails at first, one that is down).

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use support::{admin, conforms, gateway, url, validate};
use tidegate_gateway::http::server::Running;
use tidegate_testkit::{client, full, get, refused_url, send, text, Answer, Upstream};
use tokio::sync::mpsc;

async fn post(url: &str, token: Option<&str>, body: &str) -> Answer {
    let mut request = Request::post(url).header(header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    send(request.body(full(body.to_owned())).unwrap()).await
}

fn config(upstream: &str, extra: &str) -> String {
    format!(
        r#"[gateway]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
{extra}
[defaults.policy.retry]
max_attempts = 1
[defaults.policy.circuit_breaker]
consecutive_failures = 2
open_duration = "60s"
[[upstreams]]
name = "svc"
endpoints = ["{upstream}"]
[[routes]]
name = "all"
path_prefix = "/"
upstream = "svc"
"#
    )
}

const TOKEN_VAR: &str = "TIDEGATE_TEST_ADMIN_TOKEN";
const TOKEN: &str = "admin-s3cret-token";

fn with_token(upstream: &str, rest: &str) -> String {
    // Every test that names the variable sets the same value, so tests
    // running at once do not disturb each other.
    std::env::set_var(TOKEN_VAR, TOKEN);
    config(
        upstream,
        &format!("admin_token_env = \"{TOKEN_VAR}\"\n{rest}"),
    )
}

#[tokio::test]
async fn every_admin_endpoint_answers_as_its_openapi_document_says() {
    let upstream = Upstream::start(|_| async { text(200, "ok") }).await;
    let running = gateway(&with_token(&upstream.url(), "")).await;
    get(&url(&running, "/x")).await;

    let answer = get(&admin(&running, "/openapi.json")).await;
    assert_eq!(answer.status, 200);
    let doc = answer.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let documented: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    let served: BTreeSet<String> = [
        "/",
        "/config",
        "/events",
        "/health",
        "/metrics",
        "/openapi.json",
        "/ready",
        "/status/history",
        "/status/services",
        "/status/timeline",
        "/status/events",
        "/upstreams/{name}/circuit",
        "/v1/subscriptions/{name}/seek",
        "/v1/topics/{topic}/redrive",
        "/status/sagas",
        "/v1/sagas/{name}/{id}/retry",
    ]
    .map(String::from)
    .into();
    assert_eq!(
        documented, served,
        "the document lists exactly the served endpoints"
    );

    for path in [
        "/health",
        "/ready",
        "/status/services",
        "/status/history",
        "/status/timeline",
        "/config",
        "/metrics",
        "/openapi.json",
        "/status/events",
        "/",
    ] {
        conforms(&doc, path, "get", &get(&admin(&running, path)).await);
    }
    // The event stream: only its head, it never ends.
    for query in ["", "?stats=true"] {
        let response = client()
            .request(
                Request::get(admin(&running, &format!("/events{query}")))
                    .body(full(""))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let kind = response.headers()[header::CONTENT_TYPE].to_str().unwrap();
        assert!(doc["paths"]["/events"]["get"]["responses"]["200"]["content"][kind].is_object());
        if !query.is_empty() {
            // A status tick arrives within the sampler's second.
            let mut body = response.into_body();
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame()).await;
            let data = frame.unwrap().unwrap().unwrap().into_data().unwrap();
            let line = String::from_utf8_lossy(&data);
            let tick: Value =
                serde_json::from_str(line.trim().trim_start_matches("data:")).unwrap();
            assert_eq!(tick["type"], "stats");
            validate(
                &tick,
                &json!({"$ref": "#/components/schemas/Services"}),
                &doc,
                "$",
            )
            .unwrap();
        }
    }

    let circuit = "/upstreams/{name}/circuit";
    let svc = admin(&running, "/upstreams/svc/circuit");
    let cases = [
        (
            svc.as_str(),
            None,
            r#"{"action":"reset"}"#,
            StatusCode::UNAUTHORIZED,
        ),
        (
            svc.as_str(),
            Some("wrong"),
            r#"{"action":"reset"}"#,
            StatusCode::UNAUTHORIZED,
        ),
        (
            svc.as_str(),
            Some(TOKEN),
            r#"{"action":"explode"}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            svc.as_str(),
            Some(TOKEN),
            "not json",
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (target, token, body, status) in cases {
        let answer = post(target, token, body).await;
        assert_eq!(answer.status, status, "{token:?} {body}: {}", answer.body);
        conforms(&doc, circuit, "post", &answer);
    }
    let unknown = post(
        &admin(&running, "/upstreams/nope/circuit"),
        Some(TOKEN),
        r#"{"action":"reset"}"#,
    )
    .await;
    assert_eq!(unknown.status, 404);
    conforms(&doc, circuit, "post", &unknown);
    for (action, state) in [
        ("force_open", "forced_open"),
        ("force_closed", "disabled"),
        ("reset", "closed"),
    ] {
        let answer = post(&svc, Some(TOKEN), &format!(r#"{{"action":"{action}"}}"#)).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        conforms(&doc, circuit, "post", &answer);
        assert_eq!(answer.json()["state"], state);
    }
    // Without a configured token, writes are off.
    let closed = gateway(&config(&upstream.url(), "")).await;
    let answer = post(
        &admin(&closed, "/upstreams/svc/circuit"),
        Some(TOKEN),
        r#"{"action":"reset"}"#,
    )
    .await;
    assert_eq!(answer.status, 403);
    conforms(&doc, circuit, "post", &answer);
    closed.shutdown().await;
    running.shutdown().await;
}

#[tokio::test]
async fn forcing_the_breaker_open_stops_traffic_and_reset_lets_it_through() {
    let upstream = Upstream::start(|_| async { text(200, "ok") }).await;
    let running = gateway(&with_token(&upstream.url(), "")).await;
    let svc = admin(&running, "/upstreams/svc/circuit");
    assert_eq!(
        post(&svc, Some(TOKEN), r#"{"action":"force_open"}"#)
            .await
            .status,
        200
    );
    let refused = get(&url(&running, "/x")).await;
    assert_eq!(refused.status, 503);
    assert_eq!(upstream.hits(), 0, "an open breaker sends nothing upstream");
    let status = get(&admin(&running, "/status/services")).await.json();
    assert_eq!(status["services"]["svc"]["state"], "forced_open");

    assert_eq!(
        post(&svc, Some(TOKEN), r#"{"action":"reset"}"#)
            .await
            .status,
        200
    );
    assert_eq!(get(&url(&running, "/x")).await.status, 200);
    assert_eq!(upstream.hits(), 1);
    let timeline = get(&admin(&running, "/status/timeline")).await.json();
    let changes: Vec<(&str, &str)> = timeline["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["from"].as_str().unwrap(), t["to"].as_str().unwrap()))
        .collect();
    assert_eq!(
        changes,
        [("closed", "forced_open"), ("forced_open", "closed")]
    );
    assert_eq!(timeline["incidents"][0]["upstream"], "svc");
    assert!(timeline["incidents"][0]["recovery_seconds"]
        .as_f64()
        .is_some());
    assert_eq!(timeline["recovery"]["svc"]["recovered"], 1);
    running.shutdown().await;
}

#[tokio::test]
async fn the_config_endpoint_never_shows_a_secret() {
    std::env::set_var("TIDEGATE_TEST_INTERNAL_TOKEN", "internal-s3cret");
    let upstream = Upstream::start(|_| async { text(200, "ok") }).await;
    let running = gateway(&with_token(
        &upstream.url(),
        r#"internal_token_env = "TIDEGATE_TEST_INTERNAL_TOKEN"
[alerts]
webhooks = ["http://127.0.0.1:9/hook?key=webhook-s3cret"]
[[rate_limit.tiers]]
name = "free"
requests_per_minute = 10
[[api_keys]]
id = "team-a"
key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
tier = "free"
"#,
    ))
    .await;
    let answer = get(&admin(&running, "/config")).await;
    assert_eq!(answer.status, 200);
    for secret in [TOKEN, "internal-s3cret", "webhook-s3cret", "9f86d081"] {
        assert!(
            !answer.body.contains(secret),
            "{secret} shown: {}",
            answer.body
        );
    }
    let config = answer.json();
    assert_eq!(config["gateway"]["admin_token_env"], TOKEN_VAR);
    assert_eq!(config["api_keys"][0]["key_sha256"], "[redacted]");
    assert_eq!(
        config["upstreams"][0]["policy"]["circuit_breaker"]["consecutive_failures"],
        2
    );
    running.shutdown().await;
}

/// A webhook receiver: every POST body goes to the channel; the first
/// `failures` requests get 503.
async fn receiver(failures: usize) -> (Upstream, mpsc::UnboundedReceiver<(String, Value)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let seen = Arc::new(AtomicUsize::new(0));
    let upstream = Upstream::start(move |req| {
        let (tx, seen) = (tx.clone(), seen.clone());
        async move {
            let key = req.headers()["idempotency-key"]
                .to_str()
                .unwrap()
                .to_owned();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let alert: Value = serde_json::from_slice(&body).unwrap();
            if seen.fetch_add(1, Ordering::SeqCst) < failures {
                return text(503, "not now");
            }
            let _ = tx.send((key, alert));
            text(200, "thanks")
        }
    })
    .await;
    (upstream, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<(String, Value)>) -> (String, Value) {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no alert within 10 s")
        .expect("receiver gone")
}

async fn metric(running: &Running, line: &str) -> bool {
    get(&admin(running, "/metrics"))
        .await
        .body
        .lines()
        .any(|l| l == line)
}

#[tokio::test]
async fn breaker_alerts_reach_webhooks_with_retries_and_a_down_receiver_harms_nothing() {
    let failing = Arc::new(AtomicBool::new(true));
    let flag = failing.clone();
    let upstream = Upstream::start(move |_| {
        let failing = flag.load(Ordering::SeqCst);
        async move { text(if failing { 500 } else { 200 }, "answer") }
    })
    .await;
    let (good, mut good_rx) = receiver(0).await;
    let (flaky, mut flaky_rx) = receiver(2).await;
    let down = refused_url().await;
    let alerts = format!(
        "[alerts]\nwebhooks = [\"{}/hook\", \"{}/hook\", \"{down}/hook\"]\n\
         max_attempts = 3\nbase_delay = \"10ms\"\nmax_delay = \"50ms\"\ntimeout = \"2s\"\n",
        good.url(),
        flaky.url()
    );
    let running = gateway(&with_token(&upstream.url(), &alerts)).await;

    for _ in 0..2 {
        assert_eq!(get(&url(&running, "/x")).await.status, 500);
    }
    let (key, opened) = next(&mut good_rx).await;
    assert_eq!(opened["event"], "circuit_open");
    assert_eq!(opened["upstream"], "svc");
    assert_eq!(
        (opened["from"].as_str(), opened["to"].as_str()),
        (Some("closed"), Some("open"))
    );
    assert_eq!(opened["reason"], "2/2 consecutive failures");
    assert_eq!(opened["id"], key.as_str());
    assert!(opened["recovery_seconds"].is_null());
    // The receiver that answered 503 twice got it on the third attempt,
    // with the same id.
    let (flaky_key, again) = next(&mut flaky_rx).await;
    assert_eq!((flaky_key.as_str(), &again), (key.as_str(), &opened));
    assert_eq!(flaky.hits(), 3);

    // The gateway keeps answering while the down receiver's delivery fails.
    assert_eq!(get(&url(&running, "/x")).await.status, 503);
    failing.store(false, Ordering::SeqCst);
    let reset = post(
        &admin(&running, "/upstreams/svc/circuit"),
        Some(TOKEN),
        r#"{"action":"reset"}"#,
    )
    .await;
    assert_eq!(reset.status, 200);
    assert_eq!(get(&url(&running, "/x")).await.status, 200);
    let (_, closed) = next(&mut good_rx).await;
    assert_eq!(closed["event"], "circuit_closed");
    assert!(closed["recovery_seconds"].as_f64().unwrap() >= 0.0);
    assert_ne!(closed["id"], opened["id"]);
    next(&mut flaky_rx).await;

    // Both alerts to the down receiver end as failed, after their retries.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !metric(&running, "tidegate_alerts_total{result=\"failed\"} 2").await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the down receiver's alerts never failed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(metric(&running, "tidegate_alerts_total{result=\"delivered\"} 4").await);

    // This gateway has seen every event the alert rules watch: each
    // metric and label they select on must exist.
    let exposed = get(&admin(&running, "/metrics")).await.body;
    for (name, labels) in rule_selectors() {
        let series: Vec<&str> = exposed
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .collect();
        assert!(
            !series.is_empty(),
            "the alert rules use {name}, which /metrics lacks"
        );
        for label in labels {
            assert!(
                series.iter().any(|l| l.contains(&format!("{label}=\""))),
                "the alert rules select {name} by {label}, which it lacks"
            );
        }
    }
    running.shutdown().await;
}

/// Every `tidegate_…` metric in the Prometheus alert rules, with the
/// labels its selectors and `by (…)` clauses name.
fn rule_selectors() -> Vec<(String, Vec<String>)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/prometheus/tidegate-alerts.yml"
    );
    let rules = std::fs::read_to_string(path).unwrap();
    let mut found = Vec::new();
    for line in rules
        .lines()
        .filter(|l| !l.trim_start().starts_with("summary"))
    {
        let mut rest = line;
        while let Some(at) = rest.find("tidegate_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let name = tail[..end].to_owned();
            let mut labels = Vec::new();
            if let Some(selector) = tail[end..].strip_prefix('{') {
                let selector = &selector[..selector.find('}').unwrap()];
                for matcher in selector.split(',') {
                    let label = matcher.split(['=', '!']).next().unwrap().trim();
                    labels.push(label.to_owned());
                }
            }
            if let Some(by) = line.find("by (") {
                let list = &line[by + 4..];
                let list = &list[..list.find(')').unwrap()];
                labels.extend(
                    list.split(',')
                        .map(|l| l.trim().to_owned())
                        .filter(|l| l != "instance"),
                );
            }
            found.push((name, labels));
            rest = &tail[end..];
        }
    }
    assert!(found.len() >= 5, "no rules found in {path}");
    found
}

#[tokio::test]
async fn the_events_admin_endpoints_answer_as_documented() {
    let upstream = Upstream::start(|_| async { text(200, "ok") }).await;
    let dir = std::env::temp_dir().join(format!("tidegate-admin-events-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let events = format!(
        "[events]\npath = \"{}\"\nlisten = \"127.0.0.1:0\"\n\
         [[events.subscriptions]]\nname = \"workers\"\ntopic = \"jobs\"\n",
        dir.join("events.db").display()
    );
    let running = gateway(&with_token(&upstream.url(), &events)).await;
    let doc = get(&admin(&running, "/openapi.json")).await.json();
    let api = |path: &str| format!("http://{}{path}", running.events_addr.unwrap());
    // Before anything happens: nothing to show yet.
    conforms(
        &doc,
        "/status/events",
        "get",
        &get(&admin(&running, "/status/events")).await,
    );
    let sagas = get(&admin(&running, "/status/sagas")).await;
    assert_eq!(sagas.status, 200, "{}", sagas.body);
    conforms(&doc, "/status/sagas", "get", &sagas);
    let retry = send(
        Request::post(admin(&running, "/v1/sagas/checkout/nothing/retry"))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(retry.status, 404);
    conforms(&doc, "/v1/sagas/{name}/{id}/retry", "post", &retry);
    for id in ["a", "b"] {
        let published = send(
            Request::post(api("/v1/topics/jobs/events"))
                .header("content-type", "application/json")
                .header("ce-type", "Job")
                .header("ce-id", id)
                .body(full("{}"))
                .unwrap(),
        )
        .await;
        assert_eq!(published.status, 201, "{}", published.body);
    }
    let fetched = post(
        &api("/v1/subscriptions/workers/fetch"),
        None,
        r#"{"max": 1}"#,
    )
    .await
    .json();
    let ack_id = fetched["messages"][0]["ack_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let dead = post(
        &api("/v1/subscriptions/workers/dead-letter"),
        None,
        &json!({"ack_ids": [ack_id], "reason": "malformed"}).to_string(),
    )
    .await;
    assert_eq!(dead.json()["settled"], 1);

    let status = get(&admin(&running, "/status/events")).await;
    conforms(&doc, "/status/events", "get", &status);
    let status = status.json();
    assert_eq!(status["subscriptions"][0]["lag"], 1);
    assert_eq!(status["dead_letters"][0]["topic"], "jobs.dead");
    assert_eq!(status["dead_letters"][0]["waiting"], 1);
    assert_eq!(
        status["dead_letters"][0]["oldest"][0]["reason"],
        "malformed"
    );
    assert_eq!(
        status["dead_letters"][0]["oldest"][0]["subscription"],
        "workers"
    );

    let redrive = "/v1/topics/{topic}/redrive";
    let target = admin(&running, "/v1/topics/jobs.dead/redrive");
    for (token, body, code) in [
        (None, "{}", StatusCode::UNAUTHORIZED),
        (
            Some(TOKEN),
            r#"{"to": "elsewhere"}"#,
            StatusCode::BAD_REQUEST,
        ),
        (Some(TOKEN), r#"{"limit": 0}"#, StatusCode::BAD_REQUEST),
    ] {
        let answer = post(&target, token, body).await;
        assert_eq!(answer.status, code, "{}", answer.body);
        conforms(&doc, redrive, "post", &answer);
    }
    let unknown = post(
        &admin(&running, "/v1/topics/nothing.dead/redrive"),
        Some(TOKEN),
        "{}",
    )
    .await;
    assert_eq!(unknown.status, 404);
    conforms(&doc, redrive, "post", &unknown);
    let done = post(&target, Some(TOKEN), r#"{"to": "jobs", "limit": 10}"#).await;
    assert_eq!(done.status, 200, "{}", done.body);
    conforms(&doc, redrive, "post", &done);
    assert_eq!(
        (
            done.json()["redriven"].as_u64(),
            done.json()["waiting"].as_u64()
        ),
        (Some(1), Some(0))
    );
    let status = get(&admin(&running, "/status/events")).await.json();
    assert_eq!(
        status["dead_letters"][0]["waiting"], 0,
        "a redrive empties it"
    );
    assert_eq!(status["subscriptions"][0]["lag"], 2, "both are to do again");

    let seek = "/v1/subscriptions/{name}/seek";
    let target = admin(&running, "/v1/subscriptions/workers/seek");
    for (token, body, code) in [
        (None, r#"{"position": "latest"}"#, StatusCode::UNAUTHORIZED),
        (
            Some(TOKEN),
            r#"{"position": "soon"}"#,
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let answer = post(&target, token, body).await;
        assert_eq!(answer.status, code, "{}", answer.body);
        conforms(&doc, seek, "post", &answer);
    }
    let unknown = post(
        &admin(&running, "/v1/subscriptions/nobody/seek"),
        Some(TOKEN),
        r#"{"position": 1}"#,
    )
    .await;
    assert_eq!(unknown.status, 404);
    conforms(&doc, seek, "post", &unknown);
    let latest = post(&target, Some(TOKEN), r#"{"position": "latest"}"#).await;
    assert_eq!(latest.status, 200, "{}", latest.body);
    conforms(&doc, seek, "post", &latest);
    assert_eq!(
        (
            latest.json()["cursor"].as_u64(),
            latest.json()["lag"].as_u64()
        ),
        (Some(2), Some(0))
    );

    let ready = get(&admin(&running, "/ready")).await;
    conforms(&doc, "/ready", "get", &ready);
    assert_eq!(ready.json()["checks"]["event_store"]["status"], "ok");
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
