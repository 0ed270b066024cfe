//! tidegate-client next to a bare hyper-util client, against the same
//! loopback server, in one run: the cost of the policies, headers, metrics
//! and error mapping on a real exchange.
//!
//! Run: `./scripts/bench-client.sh`: rounds that alternate the two clients
//! (so machine noise hits both alike), medians and their ratio. Or
//! `cargo bench -p tidegate-client --bench client` for criterion's
//! per-call figures.
//!
//! Both clients run on one current-thread runtime; the server has its own
//! thread. `sequential` is one call at a time (latency); `concurrent_32`
//! keeps 32 calls in flight (throughput).

// A benchmark measures wall time, on purpose.
#![allow(clippy::disallowed_types)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, Criterion, Throughput};
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tidegate_client::config::ServiceConfig;
use tidegate_client::ServiceClient;
use tokio::runtime::Runtime;
use tokio::task::JoinSet;

/// A keep-alive HTTP/1.1 server answering `200 ok`, on its own thread.
fn server() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                stream.set_nodelay(true).unwrap();
                tokio::spawn(async move {
                    let service = service_fn(|_req: Request<Incoming>| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    rx.recv().unwrap()
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn bare_client() -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector)
}

async fn bare_get(client: &Client<HttpConnector, Full<Bytes>>, uri: &http::Uri) -> Bytes {
    let response = client
        .request(Request::get(uri.clone()).body(Full::default()).unwrap())
        .await
        .unwrap();
    response.into_body().collect().await.unwrap().to_bytes()
}

/// Calls in flight in the concurrent runs: 32, or `IN_FLIGHT` for the
/// ratio and profile runs.
const IN_FLIGHT: u64 = 32;

fn in_flight() -> u64 {
    env_or("IN_FLIGHT", IN_FLIGHT).max(1)
}

/// The number in environment variable `name`, else `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The three clients, against one server, on one runtime.
struct Bench {
    rt: Runtime,
    bare: Client<HttpConnector, Full<Bytes>>,
    uri: http::Uri,
    tidegate: ServiceClient,
}

impl Bench {
    fn new() -> Self {
        let url = format!("http://{}", server());
        let rt = runtime();
        // Every default policy on: deadline, retry with budget, breaker, bulkhead,
        // timeout. `NO_TIMEOUT` and `NO_DEADLINE` turn one off, to see its cost.
        let tidegate = rt.block_on(async {
            let mut config = ServiceConfig::new("bench", &url).unwrap();
            if std::env::var_os("NO_TIMEOUT").is_some() {
                config.policy.timeout = None;
            }
            if std::env::var_os("NO_DEADLINE").is_some() {
                config.policy.deadline = None;
            }
            ServiceClient::new(config).unwrap()
        });
        Bench {
            rt,
            bare: bare_client(),
            uri: format!("{url}/ping").parse().unwrap(),
            tidegate,
        }
    }
}

/// Runs `$body` with `$make` bound to a closure that starts one call of
/// client `$which` (0 bare, 1 bare with the same headers, 2 tidegate).
/// Each client's call is a future of its own type, so a task holds only
/// that client's state, as in a program that uses one of them.
macro_rules! with_client {
    ($bench:expr, $which:expr, |$make:ident| $body:expr) => {{
        let bench: &Bench = $bench;
        match $which {
            0 => {
                let $make = || {
                    let (bare, uri) = (bench.bare.clone(), bench.uri.clone());
                    async move { bare_get(&bare, &uri).await }
                };
                $body
            }
            1 => {
                let $make = || {
                    let (bare, uri) = (bench.bare.clone(), bench.uri.clone());
                    async move { bare_get_with_headers(&bare, &uri).await }
                };
                $body
            }
            _ => {
                let $make = || {
                    let tidegate = bench.tidegate.clone();
                    async move { tidegate.get("/ping").await.unwrap().into_body() }
                };
                $body
            }
        }
    }};
}

/// `n` calls at once, each a task.
async fn batch<F>(n: u64, make: impl Fn() -> F) -> Vec<Bytes>
where
    F: Future<Output = Bytes> + Send + 'static,
{
    let mut calls = JoinSet::new();
    for _ in 0..n {
        calls.spawn(make());
    }
    calls.join_all().await
}

fn benches(c: &mut Criterion) {
    let bench = Bench::new();
    for (group, n) in [("sequential", 1), ("concurrent_32", IN_FLIGHT)] {
        let mut group = c.benchmark_group(group);
        group.throughput(Throughput::Elements(n));
        for (name, which) in [("hyper_util", 0), ("tidegate_client", 2)] {
            with_client!(&bench, which, |make| group.bench_function(name, |b| {
                b.to_async(&bench.rt).iter(|| async {
                    if n == 1 {
                        make().await;
                    } else {
                        batch(n, make).await;
                    }
                });
            }));
        }
        group.finish();
    }
}

/// Requests per second of `calls` batches of `batch` calls each.
fn rate<F: Future>(rt: &Runtime, calls: u32, batch: u64, mut call: impl FnMut() -> F) -> f64 {
    let start = std::time::Instant::now();
    rt.block_on(async {
        for _ in 0..calls {
            call().await;
        }
    });
    f64::from(calls) * batch as f64 / start.elapsed().as_secs_f64()
}

fn median(v: Vec<f64>) -> f64 {
    median_with_interval(v).0
}

/// The median of `v` with a ~95 % confidence interval from its order
/// statistics (distribution-free: the median lies between the values
/// ranked n/2 ± 0.98·√n).
fn median_with_interval(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let half = 0.98 * (n as f64).sqrt();
    let low = ((n as f64 / 2.0 - half).floor().max(0.0)) as usize;
    let high = ((n as f64 / 2.0 + half).ceil() as usize).min(n - 1);
    (v[n / 2], v[low], v[high])
}

/// `GET` with the headers tidegate-client adds to every call, so that the
/// cost of their bytes on the wire shows apart from the client's own work.
async fn bare_get_with_headers(
    client: &Client<HttpConnector, Full<Bytes>>,
    uri: &http::Uri,
) -> Bytes {
    // Names and values made once, as tidegate-client has them: what is
    // measured is sending them, not parsing them from text per call.
    static HEADERS: [(HeaderName, HeaderValue); 4] = [
        (
            http::header::USER_AGENT,
            HeaderValue::from_static("tidegate-client/0.1.0"),
        ),
        (
            HeaderName::from_static("x-correlation-id"),
            HeaderValue::from_static("0123456789abcdef0123456789abcdef"),
        ),
        (
            HeaderName::from_static("traceparent"),
            HeaderValue::from_static("00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"),
        ),
        (
            HeaderName::from_static("x-tidegate-deadline-ms"),
            HeaderValue::from_static("29999"),
        ),
    ];
    let mut request = Request::get(uri.clone()).body(Full::default()).unwrap();
    for (name, value) in &HEADERS {
        request.headers_mut().insert(name, value.clone());
    }
    let response = client.request(request).await.unwrap();
    response.into_body().collect().await.unwrap().to_bytes()
}

/// `ROUNDS` rounds, each timing the three clients back to back (order
/// rotated every round); prints the median rate of each and the median
/// per-round ratios of tidegate-client to the two bare ones.
fn ratio_run() {
    let rounds: usize = env_or("ROUNDS", 15);
    let bench = Bench::new();
    let n = in_flight();
    // ~6 400 calls a concurrent run, whatever `n` is.
    let batches = (6400 / n).max(1) as u32;
    let run = |which: usize, concurrent: bool| {
        with_client!(&bench, which, |make| if concurrent {
            rate(&bench.rt, batches, n, || batch(n, make))
        } else {
            rate(&bench.rt, 2000, 1, make)
        })
    };
    // Warm-up: connections open, pools filled.
    for which in 0..3 {
        run(which, false);
        run(which, true);
    }

    println!(
        "{:<15}{:>12}{:>15}{:>12}{:>10}{:>15}",
        "req/s", "hyper-util", "+ same headers", "tidegate", "ratio", "ratio (hdrs)"
    );
    let concurrent_n = format!("concurrent_{n}");
    for (group, concurrent) in [("sequential", false), (concurrent_n.as_str(), true)] {
        let mut rates = [Vec::new(), Vec::new(), Vec::new()];
        let (mut ratio, mut ratio_headers) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let mut got = [0.0; 3];
            for k in 0..3 {
                let which = (round + k) % 3;
                got[which] = run(which, concurrent);
            }
            for which in 0..3 {
                rates[which].push(got[which]);
            }
            ratio.push(got[2] / got[0]);
            ratio_headers.push(got[2] / got[1]);
        }
        let [a, b, c] = rates.map(median);
        let (r, r_low, r_high) = median_with_interval(ratio);
        let (h, h_low, h_high) = median_with_interval(ratio_headers);
        println!(
            "{group:<15}{a:>12.0}{b:>15.0}{c:>12.0}{r:>10.3}{h:>15.3}   \
             ~95 % intervals {r_low:.3}–{r_high:.3}, {h_low:.3}–{h_high:.3}"
        );
    }
    println!("{rounds} rotating rounds; medians; target ratio >= 0.95");
}

/// `PROFILE=0|1|2`: only client `which`, 32 (or `IN_FLIGHT`) in flight,
/// 640 (or `BATCHES`) batches after a warm-up, for a profiler (`valgrind
/// --tool=callgrind`) to count one client's work alone.
fn profile_run(which: usize) {
    let bench = Bench::new();
    let n = in_flight();
    let batches: u32 = env_or("BATCHES", 640);
    let rate = with_client!(&bench, which, |make| {
        rate(&bench.rt, 10, n, || batch(n, make));
        rate(&bench.rt, batches, n, || batch(n, make))
    });
    println!(
        "client {which}: {rate:.0} req/s ({} calls)",
        u64::from(batches) * n
    );
}

criterion_group!(benches_group, benches);

fn main() {
    if let Some(which) = std::env::var("PROFILE").ok().and_then(|w| w.parse().ok()) {
        profile_run(which);
    } else if std::env::var_os("RATIO").is_some() {
        ratio_run();
    } else {
        benches_group();
        Criterion::default().configure_from_args().final_summary();
    }
}
