//! Decisions per second and latency of the Redis store next to the local
//! store, in one run, against a private `redis-server` on loopback.
//!
//! `cargo bench -p tidegate-redis --bench store` prints, per store, one
//! caller (latency p50 / p99) and 32 concurrent callers (decisions per
//! second), as the median of five rounds that alternate the stores, so
//! machine noise hits both alike.

use std::sync::Arc;
use std::time::Duration;

use tidegate_redis::{RedisConfig, RedisStore};
use tidegate_resilience::ratelimit::{Algorithm, Limit, LocalStore, Quota, Store};
use tidegate_testkit::RedisServer;
use tokio::time::Instant;

const KEYS: usize = 1_000;
const SEQUENTIAL: usize = 20_000;
const CALLERS: usize = 32;
const PER_CALLER: usize = 2_000;
const ROUNDS: usize = 5;

#[derive(Default)]
struct Figures {
    p50: Vec<f64>,
    p99: Vec<f64>,
    rate: Vec<f64>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Latencies in microseconds of `SEQUENTIAL` decisions by one caller.
async fn one_caller<S: Store>(store: &S, limit: &Limit, keys: &[String]) -> Vec<f64> {
    let mut took = Vec::with_capacity(SEQUENTIAL);
    for i in 0..SEQUENTIAL {
        let start = Instant::now();
        store
            .check(&keys[i % KEYS], limit, 1)
            .await
            .expect("a decision");
        took.push(start.elapsed().as_secs_f64() * 1e6);
    }
    took.sort_by(f64::total_cmp);
    took
}

/// Decisions per second of `CALLERS` concurrent callers.
async fn many_callers<S: Store + 'static>(
    store: Arc<S>,
    limit: Limit,
    keys: Arc<Vec<String>>,
) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..CALLERS)
        .map(|c| {
            let (store, keys) = (store.clone(), keys.clone());
            tokio::spawn(async move {
                for i in 0..PER_CALLER {
                    let key = &keys[(c * PER_CALLER + i) % KEYS];
                    store.check(key, &limit, 1).await.expect("a decision");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (CALLERS * PER_CALLER) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let server = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let redis = Arc::new(
            RedisStore::open(&RedisConfig {
                timeout: Duration::from_secs(1),
                ..RedisConfig::new(server.url())
            })
            .unwrap(),
        );
        let local = Arc::new(LocalStore::default());
        let limit = Limit::new(Algorithm::Gcra, Quota::per_second(1_000_000));
        let keys: Arc<Vec<String>> = Arc::new(
            (0..KEYS)
                .map(|i| format!("r\0api\0i\010.0.{}.{}", i / 256, i % 256))
                .collect(),
        );
        let (mut here, mut there) = (Figures::default(), Figures::default());
        for round in 0..=ROUNDS {
            for (store, figures) in [(0, &mut here), (1, &mut there)] {
                let (lat, rate) = if store == 0 {
                    (
                        one_caller(&*local, &limit, &keys).await,
                        many_callers(local.clone(), limit, keys.clone()).await,
                    )
                } else {
                    (
                        one_caller(&*redis, &limit, &keys).await,
                        many_callers(redis.clone(), limit, keys.clone()).await,
                    )
                };
                // Round 0 warms up connections, caches and the script.
                if round > 0 {
                    figures.p50.push(lat[lat.len() / 2]);
                    figures.p99.push(lat[lat.len() * 99 / 100]);
                    figures.rate.push(rate);
                }
            }
        }
        println!("rate-limit store decisions, GCRA, {KEYS} keys, median of {ROUNDS} rounds");
        println!(
            "{:<8} {:>12} {:>12} {:>22}",
            "store", "p50 µs", "p99 µs", "decisions/s (32 callers)"
        );
        for (name, f) in [("local", &mut here), ("redis", &mut there)] {
            println!(
                "{:<8} {:>12.2} {:>12.2} {:>22.0}",
                name,
                median(&mut f.p50),
                median(&mut f.p99),
                median(&mut f.rate)
            );
        }
        println!(
            "added p99 through Redis: {:.0} µs",
            median(&mut there.p99) - median(&mut here.p99)
        );
    });
}
