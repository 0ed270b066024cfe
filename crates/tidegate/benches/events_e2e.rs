//! The events API end to end, with `tidegate serve` (release) as its own
//! process: events published over HTTP per second (64 keep-alive
//! connections) with the gateway's CPU time per event; publish to push
//! delivery latency at a steady 1 000 events/s, through the gateway to a
//! local subscriber; the gateway's memory with the event store open.
//!
//! ```sh
//! ./scripts/bench-events.sh          # with the store's own benchmark
//! cargo bench -p tidegate --bench events_e2e
//! SECONDS_LOAD=5 RATE=1000 SECONDS_RATE=10 cargo bench -p tidegate --bench events_e2e
//! ```
#![allow(clippy::disallowed_types)] // a benchmark times itself with the wall clock

use std::collections::HashMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Arrival times of pushed events, by id.
type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

/// A subscriber on 127.0.0.1:0 noting when each event arrives; 204.
async fn subscriber(arrivals: Arrivals) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let arrivals = arrivals.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let arrivals = arrivals.clone();
                        async move {
                            let at = Instant::now();
                            if let Some(id) =
                                req.headers().get("ce-id").and_then(|v| v.to_str().ok())
                            {
                                arrivals.lock().unwrap().insert(id.to_owned(), at);
                            }
                            let _ = req.into_body().collect().await;
                            let mut answer = hyper::Response::new(Full::new(Bytes::new()));
                            *answer.status_mut() = hyper::StatusCode::NO_CONTENT;
                            Ok::<_, std::convert::Infallible>(answer)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// `tidegate serve` with the events store; its pid and events listener.
fn gateway(dir: &std::path::Path, subscriber: SocketAddr) -> (Child, String) {
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [[upstreams]]\nname = \"sink\"\nendpoints = [\"http://{subscriber}\"]\n\
             [upstreams.policy.bulkhead]\nmax_concurrent = 1000\n\
             [events]\npath = \"{}\"\nlisten = \"127.0.0.1:0\"\n\
             [[events.subscriptions]]\nname = \"sink\"\ntopic = \"latency\"\nmax_in_flight = 100\n\
             push = {{ upstream = \"sink\", path = \"/e\" }}\n",
            dir.join("events.db").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--log-format",
            "json",
        ])
        .env("TIDEGATE_LOG", "info,tidegate::access=warn")
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tidegate");
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufReader::new(stderr).lines();
    let events = loop {
        let line = lines.next().expect("tidegate ended").unwrap();
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        if event["fields"]["message"] == "tidegate is serving" {
            break event["fields"]["events_addr"].as_str().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, events)
}

/// utime + stime of process `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// A line of /proc/PID/status in MB.
fn memory_mb(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn publish(client: &HttpClient, events: &str, topic: &str, id: &str) -> u16 {
    let request = hyper::Request::post(format!("http://{events}/v1/topics/{topic}/events"))
        .header("content-type", "application/json")
        .header("ce-type", "Measured")
        .header("ce-source", "/bench")
        .header("ce-id", id)
        .body(Full::new(Bytes::from_static(
            br#"{"order":"order-1","total":42,"items":["a","b"]}"#,
        )))
        .unwrap();
    match client.request(request).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let _ = response.into_body().collect().await;
            status
        }
        Err(_) => 0,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let (load_secs, rate, rate_secs) = if quick {
        (1, 200, 1)
    } else {
        (
            env("SECONDS_LOAD", 5),
            env("RATE", 1000),
            env("SECONDS_RATE", 10),
        )
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-events-e2e");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    runtime.block_on(async {
        let arrivals = Arrivals::default();
        let sink = subscriber(arrivals.clone()).await;
        let (mut child, events) = gateway(&dir, sink);
        let pid = child.id();
        let client: HttpClient = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(64)
            .build_http();
        let rss_open = memory_mb(pid, "VmRSS:");

        // Publishing as fast as 64 connections go, to a topic nobody follows.
        let published = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let cpu_before = cpu_seconds(pid);
        let started = Instant::now();
        let until = started + Duration::from_secs(load_secs);
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..64 {
            let (client, events, published, failed) =
                (client.clone(), events.clone(), published.clone(), failed.clone());
            tasks.spawn(async move {
                let mut n = 0u64;
                while Instant::now() < until {
                    n += 1;
                    if publish(&client, &events, "load", &format!("l{c}-{n}")).await == 201 {
                        published.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let took = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds(pid) - cpu_before;
        let count = published.load(Ordering::Relaxed);
        let rss_load = memory_mb(pid, "VmRSS:");

        // A steady rate to the pushed topic: publish to delivery.
        let total = rate * rate_secs;
        let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let publish_latency: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let mut every = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for n in 0..total {
            every.tick().await;
            let id = format!("r{n}");
            let (client, events, sent, publish_latency) =
                (client.clone(), events.clone(), sent.clone(), publish_latency.clone());
            tokio::spawn(async move {
                let at = Instant::now();
                sent.lock().unwrap().insert(id.clone(), at);
                if publish(&client, &events, "latency", &id).await == 201 {
                    publish_latency.lock().unwrap().push(at.elapsed());
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while arrivals.lock().unwrap().len() < total as usize && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let rss_end = memory_mb(pid, "VmRSS:");
        let peak = memory_mb(pid, "VmHWM:");
        let sent = sent.lock().unwrap();
        let arrivals = arrivals.lock().unwrap();
        let mut e2e: Vec<Duration> = sent
            .iter()
            .filter_map(|(id, at)| arrivals.get(id).map(|got| got.saturating_duration_since(*at)))
            .collect();
        e2e.sort();
        let mut publish_latency = publish_latency.lock().unwrap().clone();
        publish_latency.sort();
        println!(
            "published over HTTP, 64 connections: {:.0} events/s ({} in {took:.1} s, {} failed), gateway CPU {:.1} µs an event",
            count as f64 / took,
            count,
            failed.load(Ordering::Relaxed),
            cpu * 1e6 / count.max(1) as f64
        );
        println!(
            "publish to push delivery at {rate}/s: {} of {total} delivered; p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms (the publish's own 201: p50 {:.2} ms, p99 {:.2} ms)",
            e2e.len(),
            percentile(&e2e, 0.5),
            percentile(&e2e, 0.9),
            percentile(&e2e, 0.99),
            percentile(&publish_latency, 0.5),
            percentile(&publish_latency, 0.99),
        );
        println!(
            "gateway memory: RSS {rss_open:.1} MB with the store open, {rss_load:.1} MB after the load, {rss_end:.1} MB at the end (peak {peak:.1} MB)"
        );
        let _ = child.kill();
        let _ = child.wait();
    });
    let _ = std::fs::remove_dir_all(&dir);
}
