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
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, Criterion, Throughput};
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

fn benches(c: &mut Criterion) {
    let addr = server();
    let url = format!("http://{addr}");
    let uri: http::Uri = format!("{url}/ping").parse().unwrap();
    let rt = runtime();
    let bare = bare_client();
    // Every default policy on: deadline, retry with budget, breaker, bulkhead, timeout.
    let tidegate = rt.block_on(async {
        ServiceClient::new(ServiceConfig::new("bench", &url).unwrap()).unwrap()
    });

    let mut group = c.benchmark_group("sequential");
    group.throughput(Throughput::Elements(1));
    group.bench_function("hyper_util", |b| {
        b.to_async(&rt).iter(|| bare_get(&bare, &uri));
    });
    group.bench_function("tidegate_client", |b| {
        b.to_async(&rt)
            .iter(|| async { tidegate.get("/ping").await.unwrap().into_body() });
    });
    group.finish();

    const IN_FLIGHT: u64 = 32;
    let mut group = c.benchmark_group("concurrent_32");
    group.throughput(Throughput::Elements(IN_FLIGHT));
    group.bench_function("hyper_util", |b| {
        b.to_async(&rt).iter(|| async {
            let mut calls = JoinSet::new();
            for _ in 0..IN_FLIGHT {
                let (bare, uri) = (bare.clone(), uri.clone());
                calls.spawn(async move { bare_get(&bare, &uri).await });
            }
            calls.join_all().await
        });
    });
    group.bench_function("tidegate_client", |b| {
        b.to_async(&rt).iter(|| async {
            let mut calls = JoinSet::new();
            for _ in 0..IN_FLIGHT {
                let tidegate = tidegate.clone();
                calls.spawn(async move { tidegate.get("/ping").await.unwrap().into_body() });
            }
            calls.join_all().await
        });
    });
    group.finish();
}

/// Requests per second of `calls` batches of `batch` calls each.
fn rate<F: std::future::Future>(
    rt: &Runtime,
    calls: u32,
    batch: u64,
    mut call: impl FnMut() -> F,
) -> f64 {
    let start = std::time::Instant::now();
    rt.block_on(async {
        for _ in 0..calls {
            call().await;
        }
    });
    f64::from(calls) * batch as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `GET` with the headers tidegate-client adds to every call, so that the
/// cost of their bytes on the wire shows apart from the client's own work.
async fn bare_get_with_headers(
    client: &Client<HttpConnector, Full<Bytes>>,
    uri: &http::Uri,
) -> Bytes {
    let request = Request::get(uri.clone())
        .header("user-agent", "tidegate-client/0.1.0")
        .header("x-correlation-id", "0123456789abcdef0123456789abcdef")
        .header(
            "traceparent",
            "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01",
        )
        .header("x-tidegate-deadline-ms", "29999")
        .body(Full::default())
        .unwrap();
    let response = client.request(request).await.unwrap();
    response.into_body().collect().await.unwrap().to_bytes()
}

/// One call of client `which`: 0 bare, 1 bare with the same headers, 2 tidegate.
async fn one(
    which: usize,
    bare: Client<HttpConnector, Full<Bytes>>,
    uri: http::Uri,
    tidegate: ServiceClient,
) -> Bytes {
    match which {
        0 => bare_get(&bare, &uri).await,
        1 => bare_get_with_headers(&bare, &uri).await,
        _ => tidegate.get("/ping").await.unwrap().into_body(),
    }
}

/// `ROUNDS` rounds, each timing the three clients back to back (order
/// rotated every round); prints the median rate of each and the median
/// per-round ratios of tidegate-client to the two bare ones.
fn ratio_run() {
    const IN_FLIGHT: u64 = 32;
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(15);
    let addr = server();
    let url = format!("http://{addr}");
    let uri: http::Uri = format!("{url}/ping").parse().unwrap();
    let rt = runtime();
    let bare = bare_client();
    let tidegate = rt.block_on(async {
        ServiceClient::new(ServiceConfig::new("bench", &url).unwrap()).unwrap()
    });
    let run = |which: usize, concurrent: bool| {
        let call = || one(which, bare.clone(), uri.clone(), tidegate.clone());
        if concurrent {
            rate(&rt, 200, IN_FLIGHT, || async {
                let mut calls = JoinSet::new();
                for _ in 0..IN_FLIGHT {
                    calls.spawn(call());
                }
                calls.join_all().await
            })
        } else {
            rate(&rt, 2000, 1, call)
        }
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
    for (group, concurrent) in [("sequential", false), ("concurrent_32", true)] {
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
        println!(
            "{group:<15}{a:>12.0}{b:>15.0}{c:>12.0}{:>10.2}{:>15.2}",
            median(ratio),
            median(ratio_headers)
        );
    }
    println!("{rounds} rotating rounds; medians; target ratio >= 0.95");
}

criterion_group!(benches_group, benches);

fn main() {
    if std::env::var_os("RATIO").is_some() {
        ratio_run();
    } else {
        benches_group();
        Criterion::default().configure_from_args().final_summary();
    }
}
