//! `tidegate demo`: the gateway in front of the sample upstreams, and its
//! `--quick` self-check.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use http_body_util::BodyExt;
use tidegate_gateway::demo;
use tidegate_gateway::http::server;

use crate::cli::{self, Demo};

/// Runs the demo until Ctrl-C, or its self-check with `--quick`.
pub(crate) fn run(args: Demo) -> anyhow::Result<ExitCode> {
    if !args.quick {
        crate::logging(cli::LogFormat::Text)?;
    }
    // The admin token of the demo's write endpoints (redrive, breaker
    // control), set while this is the process's only thread.
    if std::env::var_os("TIDEGATE_DEMO_ADMIN_TOKEN").is_none() {
        std::env::set_var(
            "TIDEGATE_DEMO_ADMIN_TOKEN",
            tidegate_gateway::http::headers::new_id(),
        );
    }
    crate::runtime()?.block_on(run_demo(args.quick, args.listen, args.admin))
}

/// Binds `preferred` if free, else any free port on loopback.
async fn free_or(preferred: u16) -> SocketAddr {
    let addr = SocketAddr::from(([127, 0, 0, 1], preferred));
    match tokio::net::TcpListener::bind(addr).await {
        Ok(_) => addr,
        Err(_) => {
            let any = tokio::net::TcpListener::bind("127.0.0.1:0").await;
            any.and_then(|l| l.local_addr())
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
        }
    }
}

async fn run_demo(
    quick: bool,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
) -> anyhow::Result<ExitCode> {
    let samples = demo::start_samples()
        .await
        .context("starting the sample upstreams")?;
    let listen = match listen {
        Some(addr) => addr,
        None => free_or(8080).await,
    };
    let admin = match admin {
        Some(addr) => addr,
        None => free_or(9901).await,
    };
    let events = free_or(9902).await;
    // A fresh store each run, in the system's temp directory.
    let dir = std::env::temp_dir().join(format!("tidegate-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = demo::config(&samples, listen, admin, events, &dir.join("events.db"))?;
    let running = server::start_with_workers(config, cli::workers(None))
        .await
        .map_err(anyhow::Error::msg)?;
    let (gw, admin) = (running.addr, running.admin_addr);
    let ev = running.events_addr.context("the events listener")?;
    let flaky = samples.flaky;
    let billing = samples.billing;
    let token = std::env::var("TIDEGATE_DEMO_ADMIN_TOKEN").unwrap_or_default();
    println!(
        "\
tidegate demo: the gateway is on http://{gw}, its admin API on http://{admin}

dashboard: http://{admin}/

try:
  curl -i http://{gw}/healthy/hello                 a healthy upstream, 50 requests/s per client (X-RateLimit-*)
  curl -i http://{gw}/flaky/order                   fails 30% of the time; retries hide most failures,
                                                    the last good answer the rest (x-tidegate-fallback: stale)
  curl -X PUT http://{flaky}/error-rate -d 1    make it fail always (set on the sample itself, not
                                                    through the gateway): the breaker opens after 5;
                                                    -d 0 heals it, and the next probe closes the breaker
  curl -i 'http://{gw}/slow/report?ms=3000'         slower than the 1 s timeout: 504
  curl -N http://{gw}/events/                       server-sent events, one a second
  curl -i 'http://{gw}/bff/home?name=ada&ms=100'    one JSON answer from healthy, flaky and slow at once;
                                                    a failed optional part is null and named in
                                                    x-tidegate-partial; ms=1500 passes the 1 s deadline
  curl http://{admin}/status/services               breaker states, endpoints, in-flight
  curl http://{admin}/metrics                       Prometheus metrics
  curl -N http://{admin}/events                     state changes as they happen
  curl http://{admin}/status/timeline               breaker transitions, incidents, time to recovery
  curl http://{admin}/openapi.json                  the admin API, described
  tidegate status --admin http://{admin}            the same as a table

events (the orders topic; its events API on http://{ev}):
  curl -i http://{ev}/v1/topics/orders/events -H 'content-type: application/json' \\
       -H 'ce-type: OrderPlaced' -H 'tidegate-key: order-1' -d '{{\"order\":\"order-1\",\"total\":42}}'
                                                    publish (201 with its position and version)
  curl http://{ev}/v1/topics/orders/streams/order-1  one order's stream, in version order
  curl -N 'http://{ev}/v1/topics/orders/events?follow=true'
                                                    follow the topic as orders are stored
  curl http://{ev}/v1/subscriptions/fulfilment/fetch -d '{{\"max\":5,\"wait\":\"5s\"}}'
                                                    pull orders as a worker, then ack their ack_ids:
  curl http://{ev}/v1/subscriptions/fulfilment/ack -d '{{\"ack_ids\":[\"ACK_ID\"]}}'
  curl http://{admin}/status/events                 lag, in flight, redeliveries, dead letters (analytics
                                                    refuses orders whose total is a multiple of 97)
  curl -X POST http://{admin}/v1/topics/orders.dead/redrive -H 'authorization: Bearer {token}' -d '{{}}'
                                                    dead letters back to work (the demo's admin token;
                                                    the dashboard's redrive button asks for it)

sagas (checkout: reserve on inventory, charge on billing, ship on inventory; one starts every 2 s):
  curl -i 'http://{ev}/v1/sagas/checkout?wait=5s' -d '{{\"items\":[\"book\"],\"amount\":30,\"address\":\"here\"}}'
                                                    completed: each step's response in the state
  curl -i 'http://{ev}/v1/sagas/checkout?wait=5s' -d '{{\"items\":[\"book\"],\"amount\":5000,\"address\":\"here\"}}'
                                                    the card is declined: the reservation is undone
  curl -X PUT http://{billing}/refunds -d fail     refunds fail: a saga shipping to \"nowhere\" gets stuck;
                                                    -d ok heals them, and the dashboard's retry (or
  curl -X POST http://{admin}/v1/sagas/checkout/ID/retry -H 'authorization: Bearer {token}')
                                                    finishes it
  curl http://{admin}/status/sagas                  running, completed, compensated, stuck; each step
  tidegate events --admin http://{admin}            topics and subscriptions as tables
  tidegate events tail orders --events http://{ev}  each order as it is stored
"
    );
    if quick {
        let outcome = self_check(gw, admin, ev).await;
        running.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
        outcome?;
        println!("demo self-check passed");
        return Ok(ExitCode::SUCCESS);
    }
    println!("A little traffic runs through every route, and an order a tick to the orders topic; Ctrl-C stops it all.");
    let traffic = demo::traffic(gw, Some(ev));
    crate::shutdown_signal()?.await;
    traffic.abort();
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}

/// `demo --quick`: one request per sample, the breaker tripping, an order
/// published, pushed to analytics and pulled by fulfilment.
async fn self_check(gw: SocketAddr, admin: SocketAddr, ev: SocketAddr) -> anyhow::Result<()> {
    let (status, _) = fetch("GET", &format!("http://{gw}/healthy/hello"), "").await?;
    anyhow::ensure!(status == 200, "healthy answered {status}");
    println!("GET /healthy/hello → {status}");
    let (status, _) = fetch("PUT", &format!("http://{gw}/flaky/error-rate"), "1").await?;
    anyhow::ensure!(status == 200, "setting the error rate answered {status}");
    // The breaker judges requests (each with its retries): five failed
    // requests open it, and the sixth is answered by the open breaker.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(
            fetch("GET", &format!("http://{gw}/flaky/order"), "")
                .await?
                .0,
        );
    }
    println!("GET /flaky/order ×6 at 100% errors → {statuses:?} (503 from upstream after its retries, five in a row; then the open breaker)");
    let (_, body) = fetch("GET", &format!("http://{admin}/status/services"), "").await?;
    let state =
        serde_json::from_str::<serde_json::Value>(&body)?["services"]["flaky"]["state"].clone();
    anyhow::ensure!(state == "open", "the flaky breaker is {state}, not open");
    println!("flaky breaker: {state}");
    let (status, _) = fetch("GET", &format!("http://{gw}/slow/report?ms=1500"), "").await?;
    anyhow::ensure!(status == 504, "slow answered {status}, not 504");
    println!("GET /slow/report?ms=1500 → {status} (the attempt timeout is 1 s)");
    let home = format!("http://{gw}/bff/home?name=ada&ms=10");
    let (status, body) = fetch("GET", &home, "").await?;
    let composed: serde_json::Value = serde_json::from_str(&body)?;
    anyhow::ensure!(
        status == 200 && composed["order"].is_null() && composed["report"]["waited_ms"] == 10.0,
        "the composition route answered {status}: {body}"
    );
    println!("GET /bff/home → {status} {body} (flaky's breaker is open: its part is null)");
    for (amount, outcome) in [(30, "completed"), (5000, "compensated")] {
        let input = format!(r#"{{"items":["book"],"amount":{amount},"address":"here"}}"#);
        let url = format!("http://{ev}/v1/sagas/checkout?wait=10s");
        let (status, body) = fetch("POST", &url, &input).await?;
        let state: serde_json::Value = serde_json::from_str(&body)?;
        anyhow::ensure!(
            status == 200 && state["status"] == outcome,
            "checkout of {amount} answered {status}: {body}"
        );
        println!("POST /v1/sagas/checkout (amount {amount}) → {outcome}");
    }

    // An order in, pushed to analytics (redelivered if it was busy) and
    // waiting for a fulfilment worker.
    let order = r#"{"specversion":"1.0","id":"check-1","source":"/demo","type":"OrderPlaced","partitionkey":"order-1","data":{"order":"order-1","total":42}}"#;
    let (status, body) = fetch_typed(
        "POST",
        &format!("http://{ev}/v1/topics/orders/events"),
        "application/cloudevents+json",
        order,
    )
    .await?;
    anyhow::ensure!(status == 201, "publishing answered {status}: {body}");
    println!("POST /v1/topics/orders/events → {status} {body}");
    let (status, body) = fetch(
        "POST",
        &format!("http://{ev}/v1/subscriptions/fulfilment/fetch"),
        r#"{"max":1,"wait":"5s"}"#,
    )
    .await?;
    let fetched: serde_json::Value = serde_json::from_str(&body)?;
    let ack_id = fetched["messages"][0]["ack_id"].as_str().map(str::to_owned);
    anyhow::ensure!(
        status == 200 && ack_id.is_some(),
        "fulfilment fetched {status}: {body}"
    );
    let ack = format!(r#"{{"ack_ids":["{}"]}}"#, ack_id.unwrap_or_default());
    let (status, body) = fetch(
        "POST",
        &format!("http://{ev}/v1/subscriptions/fulfilment/ack"),
        &ack,
    )
    .await?;
    anyhow::ensure!(
        status == 200 && body.contains(r#""settled":1"#),
        "ack answered {status}: {body}"
    );
    println!("fulfilment pulled and acked order-1");
    for _ in 0..100 {
        let (_, body) = fetch("GET", &format!("http://{admin}/status/events"), "").await?;
        let status: serde_json::Value = serde_json::from_str(&body)?;
        let analytics = status["subscriptions"]
            .as_array()
            .and_then(|subs| subs.iter().find(|s| s["name"] == "analytics").cloned());
        if analytics.as_ref().is_some_and(|a| a["lag"] == 0) {
            println!("analytics: the order was pushed and acked");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("analytics never took the order")
}

pub(crate) async fn fetch(method: &str, url: &str, body: &str) -> anyhow::Result<(u16, String)> {
    fetch_typed(method, url, "application/json", body).await
}

/// Like [`fetch`], with the body's `Content-Type`.
pub(crate) async fn fetch_typed(
    method: &str,
    url: &str,
    content_type: &str,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<hyper::body::Bytes>>();
    let request = http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", content_type)
        .body(http_body_util::Full::new(hyper::body::Bytes::from(
            body.to_owned(),
        )))?;
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .context("no answer within 30 s")??;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}
