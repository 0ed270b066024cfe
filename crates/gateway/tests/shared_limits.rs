//! Rate limits counted in Redis (`rate_limit.store = "redis"`), against a
//! real `redis-server` of each test's own, and what happens while it is
//! down: fail-open counts locally, fail-closed answers 503, neither waits.

mod support;

use std::time::Duration;

use http::Request;
use support::{admin, gateway, url};
use tidegate_gateway::http::server::Running;
use tidegate_testkit::{full, get, send, text, Answer, RedisServer, Upstream};
use tokio::time::Instant;

/// A route `api` limited to `limit` an hour per `x-client` header (GCRA,
/// so nothing refills during a test), counted in Redis at `redis`.
fn config(upstream: &Upstream, redis: &str, failure_mode: &str, limit: u32) -> String {
    format!(
        "[rate_limit]\nstore = \"redis\"\nredis_url = \"{redis}\"\nfailure_mode = \"{failure_mode}\"\n\
         [[upstreams]]\nname = \"svc\"\nendpoints = [\"{}\"]\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstream = \"svc\"\n\
         rate_limit = {{ algorithm = \"gcra\", limit = {limit}, per = \"1h\", key = \"header:x-client\" }}\n",
        upstream.url()
    )
}

async fn ok_upstream() -> Upstream {
    Upstream::start(|_req| async { text(200, "ok") }).await
}

async fn call(gw: &Running, client: &str) -> Answer {
    let request = Request::get(url(gw, "/x"))
        .header("x-client", client)
        .body(full(""))
        .unwrap();
    send(request).await
}

fn remaining(answer: &Answer) -> u32 {
    answer.headers["x-ratelimit-remaining"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// The value of the first sample of `metric` whose line contains `labels`.
async fn metric(gw: &Running, metric: &str, labels: &str) -> f64 {
    let text = get(&admin(gw, "/metrics")).await.body;
    text.lines()
        .find(|l| l.starts_with(metric) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

/// Calls with fresh clients until a decision is counted in Redis (a key
/// appears); how long it took.
async fn until_counted_in_redis(gw: &Running, server: &RedisServer) -> Duration {
    let start = Instant::now();
    for i in 0.. {
        let answer = call(gw, &format!("probe-{i}")).await;
        assert!(
            answer.status.is_success() || answer.status == 503,
            "{}",
            answer.status
        );
        if server.command(&["DBSIZE"]) != ":0\r\n" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "not counting in Redis after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

#[tokio::test]
async fn two_gateways_share_one_count_and_its_remaining() {
    let server = RedisServer::start();
    let upstream = ok_upstream().await;
    let toml = config(&upstream, &server.url(), "open", 5);
    let (a, b) = (gateway(&toml).await, gateway(&toml).await);
    let mut seen = Vec::new();
    for i in 0..8 {
        let answer = call(if i % 2 == 0 { &a } else { &b }, "team").await;
        if answer.status == 200 {
            seen.push(remaining(&answer));
        } else {
            assert_eq!(answer.status, 429);
            assert!(answer.headers.contains_key("retry-after"));
        }
    }
    assert_eq!(seen, [4, 3, 2, 1, 0], "one count across both gateways");
    assert_eq!(upstream.hits(), 5);
    let allowed = metric(&a, "tidegate_ratelimit_store_decisions_total", "allowed").await
        + metric(&b, "tidegate_ratelimit_store_decisions_total", "allowed").await;
    assert_eq!(allowed, 5.0);
    assert_eq!(metric(&a, "tidegate_ratelimit_store_up", "").await, 1.0);
    let ready = get(&admin(&a, "/ready")).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["checks"]["rate_limit_store"]["up"], true);
}

#[tokio::test]
async fn fail_open_counts_locally_while_redis_is_down_then_redis_counts_again() {
    let mut server = RedisServer::start();
    let upstream = ok_upstream().await;
    let gw = gateway(&config(&upstream, &server.url(), "open", 3)).await;
    assert_eq!(call(&gw, "team").await.status, 200);

    server.kill();
    // The local limit holds: three more (its own count starts empty), then 429.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        statuses.push(call(&gw, "team").await.status.as_u16());
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "waited on a dead Redis"
        );
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    assert!(metric(&gw, "tidegate_ratelimit_store_fallbacks_total", "open").await >= 5.0);
    let errors = metric(&gw, "tidegate_ratelimit_store_errors_total", "").await;
    assert!(errors >= 1.0, "errors counted: {errors}");
    let ready = get(&admin(&gw, "/ready")).await;
    assert_eq!(ready.status, 200, "fail-open still serves: {}", ready.body);
    assert_eq!(ready.json()["checks"]["rate_limit_store"]["up"], false);

    server.restart();
    until_counted_in_redis(&gw, &server).await;
    // Redis came back empty: the next client gets its whole quota there.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(call(&gw, "fresh").await.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    assert!(server
        .command(&["EXISTS", "tidegate:{r\0api\0h\0fresh}:gcra"])
        .contains(":1"));
}

#[tokio::test]
async fn fail_closed_refuses_with_503_at_once_and_never_asks_the_upstream() {
    let mut server = RedisServer::start();
    let upstream = ok_upstream().await;
    let gw = gateway(&config(&upstream, &server.url(), "closed", 100)).await;
    assert_eq!(call(&gw, "team").await.status, 200);

    // A mute server (stopped, its socket open) and a dead one alike.
    server.pause(true);
    let start = Instant::now();
    let answer = call(&gw, "team").await;
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(answer.status, 503);
    assert_eq!(answer.headers["retry-after"], "1");
    assert_eq!(answer.json()["error"], "rate limits cannot be checked now");
    server.pause(false);
    server.kill();
    for _ in 0..5 {
        let start = Instant::now();
        assert_eq!(call(&gw, "team").await.status, 503);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "waited on a dead Redis"
        );
    }
    assert_eq!(
        upstream.hits(),
        1,
        "refused requests never reach the upstream"
    );
    let ready = get(&admin(&gw, "/ready")).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["checks"]["rate_limit_store"]["up"], false);
    assert!(
        metric(
            &gw,
            "tidegate_rejections_total",
            "rate_limit_store_unavailable"
        )
        .await
            >= 6.0
    );

    server.restart();
    until_counted_in_redis(&gw, &server).await;
    assert_eq!(call(&gw, "team").await.status, 200);
}

#[tokio::test]
async fn a_reload_applies_the_failure_mode_and_says_the_store_needs_a_restart() {
    let mut server = RedisServer::start();
    let upstream = ok_upstream().await;
    let gw = gateway(&config(&upstream, &server.url(), "open", 100)).await;
    let summary = gw
        .reloader()
        .apply(support::parsed(&config(
            &upstream,
            &server.url(),
            "closed",
            100,
        )))
        .await
        .unwrap();
    assert!(
        summary.needs_restart.is_empty(),
        "{:?}",
        summary.needs_restart
    );
    server.kill();
    assert_eq!(call(&gw, "team").await.status, 503, "closed now");

    let local = config(&upstream, &server.url(), "open", 100)
        .lines()
        .filter(|l| {
            !l.starts_with("store") && !l.starts_with("redis_url") && !l.starts_with("failure_mode")
        })
        .collect::<Vec<_>>()
        .join("\n");
    let summary = gw.reloader().apply(support::parsed(&local)).await.unwrap();
    assert_eq!(summary.needs_restart, ["rate_limit.store"]);
}

#[tokio::test]
async fn counts_go_to_a_tls_redis_with_a_private_ca_and_a_client_certificate() {
    let dir = support::Dir::new("rediss");
    let path = |file: &str| dir.0.join(file);
    support::write_server_and_client_certificates(&dir, "redis");
    let (stranger_ca, ..) = support::signed(
        "stranger",
        rcgen::SanType::DnsName("x.test".try_into().unwrap()),
    );
    std::fs::write(path("stranger-ca.pem"), stranger_ca).unwrap();
    let server = RedisServer::start_tls(
        &path("server.pem"),
        &path("server.key"),
        &path("client-ca.pem"),
    );
    assert!(server.url().starts_with("rediss://"), "{}", server.url());
    let upstream = ok_upstream().await;
    let tls = |ca: &str| {
        format!(
            "redis_tls = {{ ca = \"{}\", client_cert = \"{}\", client_key = \"{}\" }}\n",
            path(ca).display(),
            path("client.pem").display(),
            path("client.key").display()
        )
    };
    let with_tls = |toml: String, ca: &str| {
        toml.replacen("[[upstreams]]", &format!("{}[[upstreams]]", tls(ca)), 1)
    };
    let gw = gateway(&with_tls(
        config(&upstream, &server.url(), "closed", 2),
        "server-ca.pem",
    ))
    .await;
    let answers: Vec<u16> = [
        call(&gw, "team").await,
        call(&gw, "team").await,
        call(&gw, "team").await,
    ]
    .iter()
    .map(|a| a.status.as_u16())
    .collect();
    assert_eq!(answers, [200, 200, 429]);
    assert_ne!(server.command(&["DBSIZE"]), ":0\r\n", "counted in Redis");

    // A server whose certificate the configured CA did not sign: no
    // decision, so fail-closed refuses.
    let doubting = gateway(&with_tls(
        config(&upstream, &server.url(), "closed", 2),
        "stranger-ca.pem",
    ))
    .await;
    assert_eq!(call(&doubting, "other").await.status, 503);
    assert_eq!(
        metric(&doubting, "tidegate_ratelimit_store_up", "").await,
        0.0
    );
}
