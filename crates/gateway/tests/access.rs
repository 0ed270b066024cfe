//! Edge policy against a real upstream: route rate limits with every
//! algorithm, API keys, tiers and their limits.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use sha2::{Digest, Sha256};
use support::{gateway, url};
use tidegate_testkit::{full, get, send, text, Answer, Upstream};
use tokio::sync::Semaphore;

fn sha256_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn get_with(url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = Request::get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(request.body(full("")).unwrap()).await
}

/// Moves paused time on between requests (real sockets need it running).
async fn skip(d: Duration) {
    tokio::time::pause();
    tokio::time::advance(d).await;
    tokio::time::resume();
}

/// Upstream `svc` at `upstream` behind route `limited` on `/` with `rate_limit`.
fn limited(upstream: &Upstream, rate_limit: &str) -> String {
    format!(
        "[[upstreams]]\nname = \"svc\"\nendpoints = [\"{}\"]\n\
         [[routes]]\nname = \"limited\"\npath_prefix = \"/\"\nupstream = \"svc\"\n\
         rate_limit = {rate_limit}\n",
        upstream.url()
    )
}

#[tokio::test]
async fn every_algorithm_admits_exactly_the_quota_per_window_with_headers() {
    for algorithm in [
        "fixed_window",
        "sliding_window",
        "sliding_log",
        "token_bucket",
        "gcra",
    ] {
        let upstream = Upstream::start(|_| async { text(200, "ok") }).await;
        let gw = gateway(&limited(
            &upstream,
            &format!(
                r#"{{ algorithm = "{algorithm}", limit = 5, per = "1m", key = "client_ip" }}"#
            ),
        ))
        .await;

        for round in 0..2 {
            for left in (0..5).rev() {
                let answer = get(&url(&gw, "/")).await;
                assert_eq!(answer.status, 200, "{algorithm} round {round}");
                assert_eq!(answer.headers["x-ratelimit-limit"], "5");
                assert_eq!(
                    answer.headers["x-ratelimit-remaining"],
                    left.to_string().as_str(),
                    "{algorithm}"
                );
                let reset: u64 = answer.headers["x-ratelimit-reset"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                // The sliding window weighs the previous period too.
                assert!((1..=120).contains(&reset), "{algorithm}: reset {reset}");
            }
            let denied = get(&url(&gw, "/")).await;
            assert_eq!(denied.status, 429, "{algorithm}");
            assert_eq!(denied.json()["error"], "rate limit exceeded");
            assert_eq!(denied.json()["service"], "svc");
            assert_eq!(denied.headers["x-ratelimit-remaining"], "0");
            let retry: u64 = denied.headers["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                (1..=120).contains(&retry),
                "{algorithm}: retry-after {retry}"
            );
            assert_eq!(
                upstream.hits(),
                5 * (round + 1),
                "{algorithm}: a refused request never reaches the upstream"
            );
            // Two whole periods later every algorithm has its quota back.
            skip(Duration::from_secs(120)).await;
        }
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn a_header_keyed_limit_counts_each_value_apart() {
    let upstream = Upstream::start(|_| async { text(200, "ok") }).await;
    let gw = gateway(&limited(
        &upstream,
        r#"{ algorithm = "gcra", limit = 2, per = "1h", key = "header:x-tenant" }"#,
    ))
    .await;
    for _ in 0..2 {
        assert_eq!(
            get_with(&url(&gw, "/"), &[("x-tenant", "a")]).await.status,
            200
        );
    }
    assert_eq!(
        get_with(&url(&gw, "/"), &[("x-tenant", "a")]).await.status,
        429
    );
    assert_eq!(
        get_with(&url(&gw, "/"), &[("x-tenant", "b")]).await.status,
        200
    );
}

fn keyed_config(upstream: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "svc"
endpoints = ["{upstream}"]

[[routes]]
name = "public"
path_prefix = "/public"
upstream = "svc"

[[routes]]
name = "private"
path_prefix = "/private"
upstream = "svc"
require_api_key = true

[[routes]]
name = "premium"
path_prefix = "/premium"
upstream = "svc"
tiers = ["premium"]

[[rate_limit.tiers]]
name = "free"
requests_per_minute = 3
requests_per_hour = 100
concurrent_requests = 1

[[rate_limit.tiers]]
name = "premium"
requests_per_minute = 100

[[api_keys]]
id = "team-free"
key_sha256 = "{}"
tier = "free"

[[api_keys]]
id = "team-premium"
key_sha256 = "{}"
tier = "premium"
"#,
        sha256_hex("free-secret"),
        sha256_hex("premium-secret")
    )
}

#[tokio::test]
async fn api_keys_authenticate_and_never_reach_the_upstream() {
    let upstream = Upstream::start(|_| async { text(200, "ok") }).await;
    let gw = gateway(&keyed_config(&upstream.url())).await;

    let none = get(&url(&gw, "/private/x")).await;
    assert_eq!(none.status, 401);
    assert_eq!(none.json()["error"], "an API key is required");
    assert!(none.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    let wrong = get_with(&url(&gw, "/private/x"), &[("x-api-key", "guess")]).await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json()["error"], "invalid API key");
    assert_eq!(upstream.hits(), 0);

    let by_header = get_with(&url(&gw, "/private/x"), &[("x-api-key", "premium-secret")]).await;
    assert_eq!(by_header.status, 200);
    let by_bearer = get_with(
        &url(&gw, "/private/x"),
        &[("authorization", "Bearer premium-secret")],
    )
    .await;
    assert_eq!(by_bearer.status, 200);
    for seen in upstream.received() {
        assert_eq!(seen.headers["x-tidegate-api-key-id"], "team-premium");
        assert_eq!(seen.headers["x-tidegate-tier"], "premium");
        assert!(!seen.headers.contains_key("x-api-key"));
        assert!(!seen.headers.contains_key("authorization"));
    }

    // A public route takes anyone; forged identity headers are dropped,
    // and an Authorization the gateway does not know passes through.
    let forged = get_with(
        &url(&gw, "/public/x"),
        &[
            ("x-tidegate-api-key-id", "team-premium"),
            ("authorization", "Bearer user-jwt"),
        ],
    )
    .await;
    assert_eq!(forged.status, 200);
    let seen = upstream.received().pop().unwrap();
    assert!(!seen.headers.contains_key("x-tidegate-api-key-id"));
    assert_eq!(seen.headers["authorization"], "Bearer user-jwt");
}

#[tokio::test]
async fn tiers_limit_each_key_and_gate_routes() {
    let upstream = Upstream::start(|_| async { text(200, "ok") }).await;
    let gw = gateway(&keyed_config(&upstream.url())).await;
    let free = [("x-api-key", "free-secret")];
    let premium = [("x-api-key", "premium-secret")];

    let forbidden = get_with(&url(&gw, "/premium/x"), &free).await;
    assert_eq!(forbidden.status, 403);
    assert_eq!(
        forbidden.json()["error"],
        "this API key's tier may not use this route"
    );
    assert_eq!(get(&url(&gw, "/premium/x")).await.status, 401);
    assert_eq!(
        get_with(&url(&gw, "/premium/x"), &premium).await.status,
        200
    );

    for left in (0..3).rev() {
        let answer = get_with(&url(&gw, "/public/x"), &free).await;
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.headers["x-ratelimit-limit"], "3",
            "the per-minute limit is the tighter"
        );
        assert_eq!(
            answer.headers["x-ratelimit-remaining"],
            left.to_string().as_str()
        );
    }
    let limited = get_with(&url(&gw, "/public/x"), &free).await;
    assert_eq!(limited.status, 429);
    assert!(limited.headers.contains_key("retry-after"));
    for _ in 0..5 {
        assert_eq!(get_with(&url(&gw, "/public/x"), &premium).await.status, 200);
        assert_eq!(
            get(&url(&gw, "/public/x")).await.status,
            200,
            "anonymous has no tier"
        );
    }
    skip(Duration::from_secs(120)).await;
    assert_eq!(get_with(&url(&gw, "/public/x"), &free).await.status, 200);
}

#[tokio::test]
async fn a_tier_caps_requests_in_flight_per_key() {
    let release = Arc::new(Semaphore::new(0));
    let gate = release.clone();
    let upstream = Upstream::start(move |req| {
        let gate = gate.clone();
        async move {
            if req.uri().path() == "/public/hold" {
                let _ = gate.acquire().await.unwrap();
            }
            text(200, "ok")
        }
    })
    .await;
    let gw = gateway(&keyed_config(&upstream.url())).await;
    let hold_url = url(&gw, "/public/hold");
    let held =
        tokio::spawn(async move { get_with(&hold_url, &[("x-api-key", "free-secret")]).await });
    while upstream.hits() == 0 {
        tokio::task::yield_now().await;
    }
    let second = get_with(&url(&gw, "/public/x"), &[("x-api-key", "free-secret")]).await;
    assert_eq!(second.status, 429);
    assert_eq!(second.headers["retry-after"], "1");
    assert_eq!(
        get_with(&url(&gw, "/public/x"), &[("x-api-key", "premium-secret")])
            .await
            .status,
        200,
        "another key is not held back"
    );
    release.add_permits(1);
    assert_eq!(held.await.unwrap().status, 200);
    assert_eq!(
        get_with(&url(&gw, "/public/x"), &[("x-api-key", "free-secret")])
            .await
            .status,
        200,
        "the slot is free once the answer is done"
    );
}
