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
    let config = demo::config(&samples, listen, admin)?;
    let running = server::start_with_workers(config, cli::workers(None))
        .await
        .map_err(anyhow::Error::msg)?;
    let (gw, admin) = (running.addr, running.admin_addr);
    let flaky = samples.flaky;
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
  curl http://{admin}/status/services               breaker states, endpoints, in-flight
  curl http://{admin}/metrics                       Prometheus metrics
  curl -N http://{admin}/events                     state changes as they happen
  curl http://{admin}/status/timeline               breaker transitions, incidents, time to recovery
  curl http://{admin}/openapi.json                  the admin API, described
  tidegate status --admin http://{admin}            the same as a table
"
    );
    if quick {
        let outcome = self_check(gw, admin).await;
        running.shutdown().await;
        outcome?;
        println!("demo self-check passed");
        return Ok(ExitCode::SUCCESS);
    }
    println!("A little traffic runs through every route; Ctrl-C stops it all.");
    let traffic = demo::traffic(gw);
    crate::shutdown_signal()?.await;
    traffic.abort();
    running.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// `demo --quick`: one request per sample, and the breaker tripping.
async fn self_check(gw: SocketAddr, admin: SocketAddr) -> anyhow::Result<()> {
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
    Ok(())
}

pub(crate) async fn fetch(method: &str, url: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<hyper::body::Bytes>>();
    let request =
        http::Request::builder()
            .method(method)
            .uri(url)
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
