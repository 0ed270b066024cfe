//! The SQLite store's speed, whole: appends/s with 1 and 64 concurrent
//! publishers (1 KiB events, every commit synced), each append's latency,
//! publish-to-delivery latency to a waiting consumer, and deliveries/s to
//! an in-process consumer that acks; beside the machine's own limit, one
//! synced SQLite transaction per append, measured in the same run.
//!
//! ```sh
//! cargo bench -p tidegate-events --bench events            # or ./scripts/bench-events.sh
//! EVENTS=20000 cargo bench -p tidegate-events --bench events
//! WORKERS=1 cargo bench -p tidegate-events --bench events   # tokio worker threads (default 2)
//! ```
#![allow(clippy::disallowed_types)] // a benchmark times itself with the wall clock

use std::sync::Arc;
use std::time::{Duration, Instant};

use tidegate_events::{load, Append, Consumer, NewEvent, SqliteStore, Store, SubscriptionConfig};

fn events() -> usize {
    std::env::var("EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// Rounds of the single-publisher comparison.
const ROUNDS: usize = 5;

fn payload() -> Vec<u8> {
    vec![b'x'; 1024]
}

fn fresh(name: &str) -> (Arc<SqliteStore>, std::path::PathBuf) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = SqliteStore::open(dir.join("events.db"), Default::default()).unwrap();
    (Arc::new(store), dir)
}

/// `publishers` tasks append `total` events between them to a fresh
/// store; appends/s and each append's latency (p50, p99).
async fn appends(publishers: usize, total: usize) -> (f64, Duration, Duration) {
    let (store, _dir) = fresh(&format!("appends-{publishers}"));
    let measured = load::appends(store, publishers, total).await;
    (measured.per_second, measured.p50, measured.p99)
}

/// One synced SQLite transaction per 1 KiB insert, as fast as it goes:
/// what this machine's disk allows a store that commits each append alone.
fn machine_limit(total: usize) -> f64 {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-raw");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let conn = rusqlite::Connection::open(dir.join("raw.db")).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE t (position INTEGER PRIMARY KEY, data BLOB NOT NULL);",
    )
    .unwrap();
    let data = payload();
    let insert = |i: usize| {
        conn.execute(
            "INSERT INTO t (position, data) VALUES (?1, ?2)",
            rusqlite::params![i as i64, data],
        )
        .unwrap();
    };
    // Until SQLite has written its log again from the start (after 1 000
    // pages, about 500 commits): from then on commits overwrite the log's
    // blocks, as the store's do from the first (it makes its log long).
    (0..1000).for_each(insert);
    let started = Instant::now();
    (1000..1000 + total).for_each(insert);
    total as f64 / started.elapsed().as_secs_f64()
}

/// A consumer waiting on a group: the time from each append to its
/// delivery (p50, p99), one event at a time.
async fn delivery_latency(count: usize) -> (Duration, Duration) {
    let (store, _dir) = fresh("latency");
    let measured = load::delivery_latency(store, count).await;
    (measured.p50, measured.p99)
}

/// Deliveries/s to one consumer that takes 100 at a time and acks them.
async fn deliveries(total: usize) -> f64 {
    let (store, _dir) = fresh("deliveries");
    let store: Arc<dyn Store> = store;
    for chunk in 0..total / 100 {
        let batch = (0..100)
            .map(|i| NewEvent::new(format!("d{chunk}-{i}"), "bench", "Benched", payload()))
            .collect();
        store
            .append(Append::to_key(
                "t",
                format!("k{chunk}"),
                Default::default(),
                batch,
            ))
            .await
            .unwrap();
    }
    store
        .subscribe(SubscriptionConfig {
            max_in_flight: 1000,
            ..SubscriptionConfig::new("g", "t")
        })
        .await
        .unwrap();
    let consumer = Consumer::new(store.clone(), "g").batch(100);
    let started = Instant::now();
    let mut done = 0;
    while done < total / 100 * 100 {
        let got = consumer.next().await.unwrap();
        let ids: Vec<String> = got.iter().map(|d| d.ack_id.clone()).collect();
        store.ack("g", &ids).await.unwrap();
        done += got.len();
    }
    done as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    // `cargo test --benches` runs benches once in test mode: keep that quick.
    let total = if std::env::args().any(|a| a == "--bench") {
        events()
    } else {
        640
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::env::var("WORKERS")
                .ok()
                .and_then(|w| w.parse().ok())
                .unwrap_or(2),
        )
        .enable_all()
        .build()
        .unwrap();
    if std::env::var("ONLY").as_deref() == Ok("64") {
        // One phase alone, for a profiler.
        let (many, p50, p99) = runtime.block_on(appends(64, total));
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "appends, 64 publishers: {many:.0}/s, p50 {:.3} ms, p99 {:.3} ms",
            ms(p50),
            ms(p99)
        );
        return;
    }
    // The machine's limit and one publisher, alternately in rounds, so a
    // change of the disk's speed during the run touches both alike; the
    // medians.
    let mut rounds: Vec<(f64, f64, Duration, Duration)> = (0..ROUNDS)
        .map(|_| {
            let limit = machine_limit(total.min(5_000) / ROUNDS);
            let (one, p50, p99) = runtime.block_on(appends(1, total.min(5_000) / ROUNDS));
            (limit, one, p50, p99)
        })
        .collect();
    rounds.sort_by(|a, b| (a.1 / a.0).total_cmp(&(b.1 / b.0)));
    let (limit, one, one_p50, one_p99) = rounds[ROUNDS / 2];
    let (many, many_p50, many_p99) = runtime.block_on(appends(64, total));
    let (latency_p50, latency_p99) = runtime.block_on(delivery_latency(total.min(2_000)));
    let delivered = runtime.block_on(deliveries(total));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("one synced SQLite transaction per 1 KiB insert (the machine's limit): {limit:.0}/s");
    println!(
        "appends, 1 publisher:   {one:.0}/s ({:.2} of the limit, median of {ROUNDS} rounds), p50 {:.3} ms, p99 {:.3} ms",
        one / limit,
        ms(one_p50),
        ms(one_p99)
    );
    println!(
        "appends, 64 publishers: {many:.0}/s, p50 {:.3} ms, p99 {:.3} ms",
        ms(many_p50),
        ms(many_p99)
    );
    println!(
        "publish to delivery:    p50 {:.3} ms, p99 {:.3} ms",
        ms(latency_p50),
        ms(latency_p99)
    );
    println!("deliveries (acked, 100 a batch): {delivered:.0}/s");
}
