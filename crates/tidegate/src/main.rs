//! The `tidegate` binary: parses the command line, sets up logging and the
//! runtime, and hands over to `tidegate-gateway`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use http_body_util::BodyExt;
use tidegate_gateway::{config, demo, server};

mod alloc;

#[global_allocator]
static ALLOCATOR: alloc::MiMalloc = alloc::MiMalloc;

const USAGE: &str = "\
tidegate — resilient service-to-service communication

usage:
  tidegate serve --config FILE [--log-format text|json] [--workers N]
                                                          run the gateway; FILE is reloaded
                                                          when it changes or on SIGHUP
  tidegate check --config FILE                            validate a config (exit 2 on errors)
  tidegate demo [--quick] [--listen ADDR] [--admin ADDR]  gateway, sample upstreams and dashboard
                                                          on loopback (default ports 8080 / 9901
                                                          when free)
  tidegate status [--admin URL]                           upstreams and breaker states
  tidegate --version | --help

--workers: threads serving the proxy listener, each with its own event loop
and upstream connection pool (default: one per CPU).
Logs go to stderr; RUST_LOG-style filters (e.g. `info,tidegate::access=warn`)
are read from TIDEGATE_LOG.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["serve", rest @ ..] => serve(rest),
        ["check", rest @ ..] => check(rest),
        ["demo", rest @ ..] => demo(rest),
        ["status", rest @ ..] => status(rest),
        ["--version" | "-V"] => {
            println!("tidegate {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        [] | ["--help" | "-h" | "help"] => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        [other, ..] => Err(Usage(format!("unknown command {other:?}")).into()),
    };
    match result {
        Ok(code) => code,
        Err(err) => match err.downcast_ref::<Usage>() {
            Some(Usage(message)) => {
                eprintln!("tidegate: {message}\n\n{USAGE}");
                ExitCode::from(2)
            }
            None => {
                eprintln!("tidegate: {err:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// A command-line mistake: exit 2 with the usage.
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// `--name value` options out of `args`; anything else is a usage error.
fn options<'a>(args: &[&'a str], known: &[&str]) -> anyhow::Result<Vec<(String, &'a str)>> {
    let mut found = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let (name, value) = match arg.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (*arg, None),
        };
        if !known.contains(&name) {
            return Err(Usage(format!("unexpected argument {arg:?}")).into());
        }
        let value = match value {
            Some(v) => v,
            None => *rest
                .next()
                .ok_or_else(|| Usage(format!("{name} needs a value")))?,
        };
        found.push((name.to_owned(), value));
    }
    Ok(found)
}

fn option<'a>(found: &[(String, &'a str)], name: &str) -> Option<&'a str> {
    found.iter().rev().find(|(n, _)| n == name).map(|(_, v)| *v)
}

fn load(path: Option<&str>) -> anyhow::Result<Result<config::Config, config::ConfigError>> {
    let path = path.ok_or_else(|| Usage("--config FILE is required".into()))?;
    Ok(config::load(Path::new(path)))
}

fn check(args: &[&str]) -> anyhow::Result<ExitCode> {
    let found = options(args, &["--config"])?;
    match load(option(&found, "--config"))? {
        Ok(config) => {
            println!(
                "{}: ok ({} upstreams, {} routes)",
                option(&found, "--config").unwrap_or_default(),
                config.upstreams.len(),
                config.routes.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::from(2))
        }
    }
}

fn logging(format: &str) -> anyhow::Result<()> {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let filter: Targets = std::env::var("TIDEGATE_LOG")
        .unwrap_or_else(|_| "info".into())
        .parse()
        .context("TIDEGATE_LOG")?;
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        "text" => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    // Colours only for a terminal, not for a file or a pipe.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init(),
        "json" => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init(),
        other => {
            return Err(Usage(format!("--log-format must be text or json, not {other:?}")).into())
        }
    }
    Ok(())
}

/// The main runtime: admin API, health checks, signals. The proxy listener
/// has worker threads of its own.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `--workers N`, by default one per CPU.
fn workers(value: Option<&str>) -> anyhow::Result<usize> {
    match value {
        None => Ok(std::thread::available_parallelism().map_or(1, usize::from)),
        Some(n) => match n.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(Usage(format!("--workers must be a positive number, not {n:?}")).into()),
        },
    }
}

fn serve(args: &[&str]) -> anyhow::Result<ExitCode> {
    let found = options(args, &["--config", "--log-format", "--workers"])?;
    let workers = workers(option(&found, "--workers"))?;
    let config = match load(option(&found, "--config"))? {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    logging(option(&found, "--log-format").unwrap_or("text"))?;
    runtime()?.block_on(async move {
        // Handlers first: a signal that arrives once we serve is never lost.
        let stop = shutdown_signal()?;
        let running = server::start_with_workers(config, workers)
            .await
            .map_err(anyhow::Error::msg)?;
        let path = option(&found, "--config").unwrap_or_default();
        let reload = running
            .reloader()
            .watch(path.into(), std::time::Duration::from_secs(2));
        tokio::select! {
            () = stop => {}
            () = reload => {}
        }
        tracing::info!("shutting down: draining in-flight requests");
        running.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// Installs the Ctrl-C and SIGTERM handlers; the future resolves on either.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing a SIGTERM handler")?;
    let ctrl_c = tokio::signal::ctrl_c();
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
    })
}

fn demo(args: &[&str]) -> anyhow::Result<ExitCode> {
    let quick = args.contains(&"--quick");
    let rest: Vec<&str> = args.iter().copied().filter(|a| *a != "--quick").collect();
    let found = options(&rest, &["--listen", "--admin"])?;
    let address = |name: &str| -> anyhow::Result<Option<SocketAddr>> {
        option(&found, name)
            .map(|a| {
                a.parse().map_err(|_| {
                    Usage(format!(
                        "{name}: `{a}` is not an address like 127.0.0.1:8080"
                    ))
                })
            })
            .transpose()
            .map_err(Into::into)
    };
    let (listen, admin) = (address("--listen")?, address("--admin")?);
    if !quick {
        logging("text")?;
    }
    runtime()?.block_on(run_demo(quick, listen, admin))
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
    let running = server::start_with_workers(config, workers(None)?)
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
    shutdown_signal()?.await;
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
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            fetch("GET", &format!("http://{gw}/flaky/order"), "")
                .await?
                .0,
        );
    }
    println!("GET /flaky/order ×4 at 100% errors → {statuses:?} (503 from upstream, then the open breaker)");
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

async fn fetch(method: &str, url: &str, body: &str) -> anyhow::Result<(u16, String)> {
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

fn status(args: &[&str]) -> anyhow::Result<ExitCode> {
    let found = options(args, &["--admin"])?;
    let admin = option(&found, "--admin")
        .unwrap_or("http://127.0.0.1:9901")
        .trim_end_matches('/');
    let runtime = runtime()?;
    let get = |path: &str| -> anyhow::Result<serde_json::Value> {
        let url = format!("{admin}{path}");
        let (code, body) = runtime
            .block_on(fetch("GET", &url, ""))
            .with_context(|| format!("cannot reach the admin API at {admin}"))?;
        anyhow::ensure!(code == 200, "{url} answered {code}");
        serde_json::from_str(&body).with_context(|| format!("{url} did not answer JSON"))
    };
    let services = get("/status/services")?;
    let timeline = get("/status/timeline")?;
    print!("{}", status_table(&services, &timeline));
    Ok(ExitCode::SUCCESS)
}

/// The dashboard as text: a row per upstream (breaker state, the last
/// minute's traffic, bulkhead, recovery, endpoints) and the latest
/// breaker transitions.
fn status_table(services: &serde_json::Value, timeline: &serde_json::Value) -> String {
    use std::fmt::Write;
    let ms = |v: &serde_json::Value| match v.as_f64() {
        Some(ms) if ms < 10.0 => format!("{ms:.2}ms"),
        Some(ms) if ms < 1000.0 => format!("{ms:.0}ms"),
        Some(ms) => format!("{:.2}s", ms / 1000.0),
        None => "-".to_owned(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<13} {:>7} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8}  ENDPOINTS",
        "UPSTREAM", "STATE", "REQ/S", "FAILURES", "P50", "P99", "IN-FLIGHT", "BULKHEAD", "MTTR"
    );
    for (name, s) in services["services"].as_object().into_iter().flatten() {
        let traffic = &s["traffic"];
        let endpoints: Vec<String> = s["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let mark = match (e["healthy"] == true, e["ejected"] == true) {
                    (false, _) => "DOWN",
                    (true, true) => "ejected",
                    (true, false) => "up",
                };
                format!("{} {mark}", e["url"].as_str().unwrap_or("?"))
            })
            .collect();
        let bulkhead = match &s["bulkhead"] {
            serde_json::Value::Null => "-".to_owned(),
            b => format!("{}/{}", b["in_flight"], b["max_concurrent"]),
        };
        let mttr = match s["recovery"]["mean_seconds"].as_f64() {
            Some(secs) => format!("{secs:.1}s"),
            None => "-".to_owned(),
        };
        let state = s["state"].as_str().unwrap_or("?").to_uppercase();
        let _ = writeln!(
            out,
            "{:<20} {:<13} {:>7.1} {:>7.1}% {:>8} {:>8} {:>9} {:>9} {:>8}  {}",
            name,
            if state == "DISABLED" {
                "FORCED_CLOSED".to_owned()
            } else {
                state
            },
            traffic["requests_per_second"].as_f64().unwrap_or(0.0),
            traffic["error_rate"].as_f64().unwrap_or(0.0) * 100.0,
            ms(&traffic["p50_ms"]),
            ms(&traffic["p99_ms"]),
            s["in_flight"].to_string(),
            bulkhead,
            mttr,
            endpoints.join(", ")
        );
    }
    let transitions = timeline["transitions"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if !transitions.is_empty() {
        let _ = writeln!(out, "\nlatest breaker transitions:");
        for t in transitions.iter().rev().take(10) {
            let _ = writeln!(
                out,
                "  {}  {:<20} {} -> {}  ({})",
                t["timestamp"].as_str().unwrap_or("?"),
                t["upstream"].as_str().unwrap_or("?"),
                t["from"].as_str().unwrap_or("?"),
                t["to"].as_str().unwrap_or("?"),
                t["reason"].as_str().unwrap_or("")
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::status_table;
    use serde_json::json;

    #[test]
    fn the_status_table_shows_state_traffic_and_recovery() {
        let services = json!({"services": {"billing": {
            "state": "open", "in_flight": 3,
            "traffic": {"requests_per_second": 12.5, "error_rate": 0.25, "p50_ms": 4.2, "p99_ms": 1500.0},
            "bulkhead": {"in_flight": 3, "max_concurrent": 100},
            "recovery": {"mean_seconds": 12.34},
            "endpoints": [{"url": "http://10.0.0.1:80", "healthy": true, "ejected": false},
                          {"url": "http://10.0.0.2:80", "healthy": false, "ejected": false}]
        }}});
        let timeline = json!({"transitions": [{"timestamp": "2026-11-22T10:00:00.000Z",
            "upstream": "billing", "from": "closed", "to": "open", "reason": "5/5 consecutive failures"}]});
        let table = status_table(&services, &timeline);
        let row = table.lines().nth(1).unwrap();
        for cell in [
            "billing",
            "OPEN",
            "12.5",
            "25.0%",
            "4.20ms",
            "1.50s",
            "3/100",
            "12.3s",
            "http://10.0.0.1:80 up",
            "http://10.0.0.2:80 DOWN",
        ] {
            assert!(row.contains(cell), "{cell} not in {row}");
        }
        assert!(
            table.contains("billing              closed -> open  (5/5 consecutive failures)"),
            "{table}"
        );
    }
}
