//! Composition routes against real upstreams: parts in parallel, merged in
//! order; `fields`; placeholders; optional parts failing, slow past the
//! route's deadline, or answered by their fallback; a required part's
//! failure as the whole answer; each part's breaker on its own.

mod support;

use std::sync::Arc;

use http::Request;
use support::{admin, gateway, url};
use tidegate_testkit::{full, get, refused_url, send, text, Upstream};
use tokio::time::{Duration, Instant};

/// A JSON answer.
fn json(status: u16, body: &str) -> http::Response<tidegate_testkit::Body> {
    let mut response = text(status, body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// Upstreams `auth`, `learning` and `content` (one attempt each, a breaker
/// after `breaker` failures in a row), and a route `/bff/dashboard`
/// composed of them; `extra` goes under the route.
fn config(auth: &str, learning: &str, content: &str, breaker: u32, extra: &str) -> String {
    let mut text = String::new();
    for (name, endpoint) in [("auth", auth), ("learning", learning), ("content", content)] {
        text.push_str(&format!(
            "[[upstreams]]\nname = \"{name}\"\nendpoints = [\"{endpoint}\"]\n\
             [upstreams.policy.retry]\nmax_attempts = 1\n\
             [upstreams.policy.circuit_breaker]\nconsecutive_failures = {breaker}\n"
        ));
    }
    text.push_str(&format!(
        r#"
[[routes]]
name = "dashboard"
path_prefix = "/bff/dashboard"
{extra}
compose = [
  {{ name = "user", upstream = "auth", path = "/users/{{header.x-user-id}}" }},
  {{ name = "progress", upstream = "learning", path = "/progress{{path}}", required = false }},
  {{ name = "recommendations", upstream = "content", path = "/recommendations?user={{query.user}}", required = false, fields = ["id", "title", "author.name"] }},
]
"#
    ));
    text
}

async fn user_service() -> Upstream {
    Upstream::start(|req| async move {
        let id = req.uri().path().trim_start_matches("/users/").to_owned();
        if id == "missing" {
            return json(404, r#"{"error":"no such user"}"#);
        }
        json(200, &format!(r#"{{"id":"{id}","name":"Ada"}}"#))
    })
    .await
}

async fn progress_service() -> Upstream {
    Upstream::start(|req| async move {
        json(
            200,
            &format!(r#"{{"path":"{}","done":3}}"#, req.uri().path()),
        )
    })
    .await
}

async fn content_service() -> Upstream {
    Upstream::start(|_| async move {
        json(
            200,
            r#"[{"id":1,"title":"Rust","body":"long","author":{"name":"N","email":"n@x"}},
                {"id":2,"title":"Go","body":"long","author":{"name":"M","email":"m@x"}}]"#,
        )
    })
    .await
}

async fn get_as(
    gw: &tidegate_gateway::http::server::Running,
    path: &str,
    user: &str,
) -> tidegate_testkit::Answer {
    send(
        Request::get(url(gw, path))
            .header("x-user-id", user)
            .header("x-correlation-id", "corr-7")
            .body(full(""))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn all_parts_are_fetched_and_merged_in_order_with_fields_kept() {
    let (auth, learning, content) = (
        user_service().await,
        progress_service().await,
        content_service().await,
    );
    let gw = gateway(&config(&auth.url(), &learning.url(), &content.url(), 5, "")).await;
    let answer = get_as(&gw, "/bff/dashboard/course/7?user=J%C3%B6+D", "u/42").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.headers["content-type"], "application/json");
    assert!(!answer.headers.contains_key("x-tidegate-partial"));
    assert_eq!(
        answer.body,
        concat!(
            r#"{"user":{"id":"u%2F42","name":"Ada"},"#,
            r#""progress":{"done":3,"path":"/progress/course/7"},"#,
            r#""recommendations":[{"author":{"name":"N"},"id":1,"title":"Rust"},{"author":{"name":"M"},"id":2,"title":"Go"}]}"#
        ),
        "the parts in their order, each trimmed to its fields"
    );
    // A value cannot add a segment or a parameter: it is percent-encoded.
    let asked = &auth.received()[0];
    assert_eq!(asked.uri.path(), "/users/u%2F42");
    assert_eq!(asked.method, http::Method::GET);
    assert_eq!(asked.headers["x-correlation-id"], "corr-7");
    assert_eq!(
        content.received()[0].uri.to_string(),
        "/recommendations?user=J%C3%B6%20D"
    );
    // HEAD answers the same, without a body.
    let head = send(
        Request::head(url(&gw, "/bff/dashboard?user=a"))
            .header("x-user-id", "1")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
}

#[tokio::test]
async fn a_request_missing_a_placeholder_is_refused_before_any_part_is_sent() {
    let (auth, learning, content) = (
        user_service().await,
        progress_service().await,
        content_service().await,
    );
    let gw = gateway(&config(&auth.url(), &learning.url(), &content.url(), 5, "")).await;
    let answer = get(&url(&gw, "/bff/dashboard?user=a")).await;
    assert_eq!(answer.status, 400);
    assert_eq!(
        answer.json()["error"],
        "part `user` needs header `x-user-id`"
    );
    assert_eq!(auth.hits() + learning.hits() + content.hits(), 0);
    let post = send(
        Request::post(url(&gw, "/bff/dashboard?user=a"))
            .header("x-user-id", "1")
            .body(full("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(post.status, 404, "a composition route answers GET and HEAD");
}

#[tokio::test]
async fn a_failing_optional_part_is_null_and_named_and_a_failing_required_part_is_the_answer() {
    let auth = user_service().await;
    let failing = Upstream::start(|_| async { json(500, r#"{"error":"boom"}"#) }).await;
    let content = content_service().await;
    let gw = gateway(&config(&auth.url(), &failing.url(), &content.url(), 50, "")).await;

    let answer = get_as(&gw, "/bff/dashboard?user=a", "1").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["x-tidegate-partial"], "progress");
    let body = answer.json();
    assert_eq!(body["progress"], serde_json::Value::Null);
    assert_eq!(body["user"]["name"], "Ada");
    assert_eq!(body["recommendations"][1]["id"], 2);

    // The user service answers 404: so does the whole route, with its body.
    let answer = get_as(&gw, "/bff/dashboard?user=a", "missing").await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.body, r#"{"error":"no such user"}"#);

    // A required part that cannot be reached: the gateway's error, naming
    // the service.
    let down = refused_url().await;
    let gw = gateway(&config(&down, &failing.url(), &content.url(), 50, "")).await;
    let answer = get_as(&gw, "/bff/dashboard?user=a", "1").await;
    assert_eq!(answer.status, 502);
    assert_eq!(answer.json()["service"], "auth");
    assert_eq!(answer.headers["x-correlation-id"], "corr-7");
}

#[tokio::test]
async fn a_slow_optional_part_is_cut_by_the_routes_deadline() {
    let auth = user_service().await;
    let slow = Upstream::start(|_| async {
        // Never answers: only the route's deadline ends the wait.
        std::future::pending::<()>().await;
        json(200, "{}")
    })
    .await;
    let content = content_service().await;
    let gw = gateway(&config(
        &auth.url(),
        &slow.url(),
        &content.url(),
        5,
        "deadline = \"300ms\"",
    ))
    .await;
    let started = Instant::now();
    let answer = get_as(&gw, "/bff/dashboard?user=a", "1").await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "not cut before the deadline"
    );
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.headers["x-tidegate-partial"], "progress");
    assert_eq!(answer.json()["progress"], serde_json::Value::Null);
    assert_eq!(answer.json()["user"]["id"], "1");
    assert_eq!(slow.hits(), 1);

    // The same part required: the whole answer is the timeout.
    let required = config(
        &auth.url(),
        &slow.url(),
        &content.url(),
        5,
        "deadline = \"300ms\"",
    )
    .replace(
        "path = \"/progress{path}\", required = false",
        "path = \"/progress{path}\"",
    );
    let gw = gateway(&required).await;
    let answer = get_as(&gw, "/bff/dashboard?user=a", "1").await;
    assert_eq!(answer.status, 504);
    assert_eq!(answer.json()["service"], "learning");
}

#[tokio::test]
async fn a_parts_fallback_stands_in_for_it() {
    let auth = user_service().await;
    let failing = Upstream::start(|_| async { json(503, "{}") }).await;
    let backup = Upstream::start(|req| async move {
        json(
            200,
            &format!(r#"{{"from":"backup","path":"{}"}}"#, req.uri().path()),
        )
    })
    .await;
    let text = format!(
        "{}\n[[upstreams]]\nname = \"backup\"\nendpoints = [\"{}\"]\n",
        config(&auth.url(), &failing.url(), &failing.url(), 50, ""),
        backup.url()
    )
    .replace(
        "path = \"/progress{path}\", required = false",
        "path = \"/progress{path}\", fallback = { kind = \"upstream\", upstream = \"backup\" }",
    )
    .replace(
        "required = false, fields",
        "required = false, fallback = { kind = \"static\", body = \"[]\" }, fields",
    );
    let gw = gateway(&text).await;
    let answer = get_as(&gw, "/bff/dashboard/x?user=a", "1").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(!answer.headers.contains_key("x-tidegate-partial"));
    let body = answer.json();
    assert_eq!(body["progress"]["from"], "backup");
    assert_eq!(body["progress"]["path"], "/progress/x");
    assert_eq!(body["recommendations"], serde_json::json!([]));
    let metrics = get(&admin(&gw, "/metrics")).await.body;
    for kind in ["upstream", "static"] {
        let series = format!(r#"tidegate_fallbacks_total{{route="dashboard",kind="{kind}"}} 1"#);
        assert!(metrics.contains(&series), "{series} in\n{metrics}");
    }
}

#[tokio::test]
async fn each_parts_breaker_opens_on_its_own() {
    let auth = user_service().await;
    let failing = Upstream::start(|_| async { json(500, "{}") }).await;
    let content = content_service().await;
    let gw = gateway(&config(&auth.url(), &failing.url(), &content.url(), 2, "")).await;
    for _ in 0..6 {
        let answer = get_as(&gw, "/bff/dashboard?user=a", "1").await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.headers["x-tidegate-partial"], "progress");
        assert_eq!(answer.json()["recommendations"][0]["id"], 1);
    }
    assert_eq!(failing.hits(), 2, "the breaker opened after two failures");
    assert_eq!(auth.hits(), 6);
    assert_eq!(content.hits(), 6);
    let status = get(&admin(&gw, "/status/services")).await.json();
    assert_eq!(status["services"]["learning"]["state"], "open");
    assert_eq!(status["services"]["auth"]["state"], "closed");
    assert_eq!(status["services"]["content"]["state"], "closed");
}

#[tokio::test]
async fn the_parts_are_fetched_at_once() {
    // Each service answers only once all three have been asked: parts
    // fetched one after the other would wait for the deadline instead.
    let all_asked = Arc::new(tokio::sync::Barrier::new(3));
    let service = |body: &'static str| {
        let all_asked = all_asked.clone();
        Upstream::start(move |_| {
            let all_asked = all_asked.clone();
            async move {
                all_asked.wait().await;
                json(200, body)
            }
        })
    };
    let (auth, learning, content) = (
        service(r#"{"id":"1"}"#).await,
        service(r#"{"done":1}"#).await,
        service("[]").await,
    );
    let gw = gateway(&config(
        &auth.url(),
        &learning.url(),
        &content.url(),
        5,
        "deadline = \"10s\"",
    ))
    .await;
    let answer = get_as(&gw, "/bff/dashboard?user=a", "1").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.body,
        r#"{"user":{"id":"1"},"progress":{"done":1},"recommendations":[]}"#
    );
}
