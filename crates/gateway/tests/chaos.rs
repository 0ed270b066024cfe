//! Chaos soak: fixed-rate load (GET and POST mixed, each with a unique
//! request id) through the gateway to three endpoints of one upstream,
//! while one endpoint is killed and restarted every few seconds, another
//! hangs for a window and the third answers a burst of 5xx.
//!
//! Every request must get exactly one answer, within its deadline; no POST
//! may reach an endpoint twice; no GET more often than its attempts allow.
//! The success rate and the time from an endpoint's return to its first
//! traffic are printed. `TIDEGATE_CHAOS_SECONDS` sets the length (default
//! 30 s, the form `./scripts/test.sh` runs); `scripts/chaos.sh` runs the long
//! form in release mode.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request};
use support::parsed;
use tidegate_testkit::{full, Behavior, Scripted};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Requests per second.
const RATE: u64 = 100;
/// Every `CYCLE`, the chaos repeats.
const CYCLE: Duration = Duration::from_secs(6);
const DEADLINE: Duration = Duration::from_secs(2);
const MAX_ATTEMPTS: usize = 3;
/// How late after the deadline an answer may arrive (scheduling on a busy
/// 2-core machine), and still count as on time.
const LATE: Duration = Duration::from_millis(500);

fn config(endpoints: &[&Scripted]) -> String {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|e| format!("\"{}\"", e.url()))
        .collect();
    format!(
        r#"[gateway]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[defaults.policy]
timeout = "400ms"
deadline = "{}ms"
[defaults.policy.retry]
max_attempts = {MAX_ATTEMPTS}
base_delay = "20ms"
max_delay = "200ms"
[defaults.policy.circuit_breaker]
open_duration = "1s"
[[upstreams]]
name = "svc"
endpoints = [{}]
[upstreams.outlier_detection]
consecutive_errors = 3
base_ejection_time = "1s"
max_ejection_time = "3s"
[upstreams.health_check]
path = "/health"
interval = "250ms"
timeout = "200ms"
healthy_threshold = 1
unhealthy_threshold = 2
[[routes]]
name = "all"
path_prefix = "/"
upstream = "svc"
"#,
        DEADLINE.as_millis(),
        endpoints.join(", ")
    )
}

/// What the load generator saw of one request.
#[derive(Debug)]
struct Sent {
    id: String,
    method: Method,
    /// The status, or `None` when no answer came.
    status: Option<u16>,
    /// Who answered a failure: the gateway's error message, or `upstream`.
    why: String,
    took: Duration,
}

/// Runs the chaos on the three endpoints until `end`; returns when each
/// return of the killed endpoint happened.
async fn chaos(
    killed: &Scripted,
    hung: &Scripted,
    failing: &Scripted,
    end: Instant,
) -> Vec<Instant> {
    let mut returns = Vec::new();
    let start = Instant::now();
    let at = |cycle: u32, offset_ms: u64| start + CYCLE * cycle + Duration::from_millis(offset_ms);
    for cycle in 0.. {
        if at(cycle, 0) + CYCLE > end {
            break;
        }
        tokio::time::sleep_until(at(cycle, 1000)).await;
        killed.stop();
        tokio::time::sleep_until(at(cycle, 3000)).await;
        killed.restart().await;
        returns.push(Instant::now());
        tokio::time::sleep_until(at(cycle, 3500)).await;
        hung.set(Behavior::Hang);
        tokio::time::sleep_until(at(cycle, 4500)).await;
        hung.set(Behavior::Answer);
        failing.set(Behavior::Status(503));
        tokio::time::sleep_until(at(cycle, 5200)).await;
        failing.set(Behavior::Answer);
    }
    returns
}

/// Sends `RATE` requests a second until `end`; every 3rd is a POST.
async fn load(url: String, end: Instant) -> Vec<Sent> {
    let client = Arc::new(tidegate_testkit::client());
    let mut every = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut requests = JoinSet::new();
    let mut n = 0u64;
    while every.tick().await < end {
        n += 1;
        let id = format!("chaos-{n}");
        let method = if n.is_multiple_of(3) {
            Method::POST
        } else {
            Method::GET
        };
        let request = Request::builder()
            .method(method.clone())
            .uri(format!("{url}/item/{n}"))
            .header("x-correlation-id", &id)
            .body(full(if method == Method::POST {
                "payload"
            } else {
                ""
            }))
            .unwrap();
        let client = client.clone();
        requests.spawn(async move {
            let start = Instant::now();
            // Far past the deadline: an answer this late is no answer.
            let answer = tokio::time::timeout(DEADLINE * 3, client.request(request)).await;
            let (status, why) = match answer {
                Ok(Ok(response)) => {
                    let status = response.status().as_u16();
                    use http_body_util::BodyExt;
                    match response.into_body().collect().await {
                        Ok(body) => (Some(status), why(status, &body.to_bytes())),
                        Err(_) => (None, String::new()),
                    }
                }
                _ => (None, String::new()),
            };
            Sent {
                id,
                method,
                status,
                why,
                took: start.elapsed(),
            }
        });
    }
    let mut sent = Vec::new();
    while let Some(done) = requests.join_next().await {
        sent.push(done.unwrap());
    }
    sent
}

/// Who answered `status`: for failures, the gateway's error message or
/// `upstream` (the endpoint's own 503, passed on).
fn why(status: u16, body: &[u8]) -> String {
    if status < 300 {
        return String::new();
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(json) => json["error"].as_str().unwrap_or("?").to_owned(),
        Err(_) => "upstream".to_owned(),
    }
}

fn seconds() -> u64 {
    std::env::var("TIDEGATE_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak_every_request_answered_once_within_its_deadline() {
    let endpoints = [
        Scripted::start().await,
        Scripted::start().await,
        Scripted::start().await,
    ];
    let [killed, hung, failing] = &endpoints;
    let gw = tidegate_gateway::http::server::start_with_workers(
        parsed(&config(&[killed, hung, failing])),
        1,
    )
    .await
    .unwrap();
    let end = Instant::now() + Duration::from_secs(seconds());
    let (returns, sent) = tokio::join!(
        chaos(killed, hung, failing, end),
        load(format!("http://{}", gw.addr), end)
    );

    // What the endpoints received, by request id (health checks aside).
    let mut deliveries: HashMap<&str, usize> = HashMap::new();
    let ledgers: Vec<_> = endpoints.iter().map(Scripted::ledger).collect();
    let is_load = |d: &&tidegate_testkit::Delivery| d.target.starts_with("/item/");
    for delivery in ledgers.iter().flatten().filter(is_load) {
        *deliveries.entry(delivery.id.as_str()).or_default() += 1;
    }
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    let mut failures: HashMap<(u16, &str), usize> = HashMap::new();
    let (mut unanswered, mut late, mut duplicate_posts, mut extra_gets) = (0, 0, 0, 0);
    let mut slowest = Duration::ZERO;
    for s in &sent {
        match s.status {
            Some(status) => {
                *by_status.entry(status).or_default() += 1;
                if status >= 300 {
                    *failures.entry((status, s.why.as_str())).or_default() += 1;
                }
            }
            None => unanswered += 1,
        }
        slowest = slowest.max(s.took);
        if s.status.is_some() && s.took > DEADLINE + LATE {
            late += 1;
        }
        let delivered = deliveries.get(s.id.as_str()).copied().unwrap_or(0);
        if s.method == Method::POST && delivered > 1 {
            duplicate_posts += 1;
        }
        if s.method == Method::GET && delivered > MAX_ATTEMPTS {
            extra_gets += 1;
        }
    }
    // From each return of the killed endpoint to the first request it got.
    let first_traffic: Vec<Duration> = returns
        .iter()
        .filter_map(|&back| {
            ledgers[0]
                .iter()
                .find(|d| d.at >= back && is_load(d))
                .map(|d| d.at - back)
        })
        .collect();
    let ok = by_status.get(&200).copied().unwrap_or(0);
    let mut statuses: Vec<_> = by_status.iter().collect();
    statuses.sort();
    println!(
        "chaos soak, {} s at {RATE} requests/s (deadline {DEADLINE:?}, {MAX_ATTEMPTS} attempts):",
        seconds()
    );
    println!("  requests sent:                 {}", sent.len());
    println!("  answered, by status:           {statuses:?}");
    let success = 100.0 * ok as f64 / sent.len() as f64;
    println!("  success rate:                  {success:.2} %");
    let mut failures: Vec<_> = failures.into_iter().collect();
    failures.sort();
    for ((status, why), n) in failures {
        println!("    {status} {why}: {n}");
    }
    println!("  unanswered:                    {unanswered}");
    println!("  answered after the deadline:   {late} (slowest answer {slowest:?})");
    println!("  POSTs delivered more than once: {duplicate_posts}");
    println!("  GETs delivered over {MAX_ATTEMPTS} times:     {extra_gets}");
    println!("  endpoint returns:              {}", returns.len());
    let mut waits = first_traffic.clone();
    waits.sort();
    println!(
        "  return → first traffic:        median {:?}, max {:?}",
        waits.get(waits.len() / 2).copied().unwrap_or_default(),
        waits.last().copied().unwrap_or_default()
    );

    assert!(
        sent.len() as u64 >= RATE * seconds() * 9 / 10,
        "the load fell behind"
    );
    assert_eq!(unanswered, 0, "requests without an answer");
    assert_eq!(late, 0, "answers after the deadline");
    assert_eq!(duplicate_posts, 0, "POSTs delivered twice");
    assert_eq!(
        extra_gets, 0,
        "GETs delivered more often than their attempts"
    );
    assert_eq!(
        first_traffic.len(),
        returns.len(),
        "an endpoint that came back got no traffic"
    );
    // Two endpoints of three stay healthy: most requests must succeed.
    assert!(success >= 70.0, "success rate {success:.2} %");
    gw.shutdown().await;
}
