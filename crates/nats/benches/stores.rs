//! Both event stores side by side in one run: appends/s with 64
//! publishers (1 KiB events) with their latency, and publish-to-delivery
//! latency to a waiting consumer, on SQLite (a file here) and on NATS
//! JetStream (a private `nats-server -js` on this machine); the ratio.
//!
//! ```sh
//! cargo bench -p tidegate-nats --bench stores        # or ./scripts/bench-events.sh
//! EVENTS=20000 cargo bench -p tidegate-nats --bench stores
//! ```

use std::sync::Arc;
use std::time::Duration;

use tidegate_events::{load, Clock, SqliteStore, Store};
use tidegate_nats::NatsStore;
use tidegate_testkit::NatsServer;

fn events() -> usize {
    std::env::var("EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// 64 publishers append `total` 1 KiB events; appends/s, p50, p99 (ms).
async fn appends(store: Arc<dyn Store>, total: usize) -> (f64, f64, f64) {
    let measured = load::appends(store, 64, total).await;
    (measured.per_second, ms(measured.p50), ms(measured.p99))
}

/// A consumer waiting on a group: append to delivery, one at a time; p50, p99 (ms).
async fn delivery(store: Arc<dyn Store>, count: usize) -> (f64, f64) {
    let measured = load::delivery_latency(store, count).await;
    (ms(measured.p50), ms(measured.p99))
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let (total, deliveries) = if quick { (640, 20) } else { (events(), 1000) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-stores");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let server = NatsServer::start();
    runtime.block_on(async {
        let sqlite = |name: &str| -> Arc<dyn Store> {
            Arc::new(SqliteStore::open(dir.join(name), Default::default()).unwrap())
        };
        let nats = || async {
            let store: Arc<dyn Store> = Arc::new(
                NatsStore::connect(&server.url(), Duration::from_secs(120), Clock::Wall, 1)
                    .await
                    .unwrap(),
            );
            store
        };
        let (s_rate, s_p50, s_p99) = appends(sqlite("appends.db"), total).await;
        let (n_rate, n_p50, n_p99) = appends(nats().await, total).await;
        let (s_d50, s_d99) = delivery(sqlite("delivery.db"), deliveries).await;
        let (n_d50, n_d99) = delivery(nats().await, deliveries).await;
        println!("{total} appends of 1 KiB by 64 publishers; {deliveries} deliveries to a waiting consumer");
        println!("sqlite: {s_rate:.0} appends/s (p50 {s_p50:.2} ms, p99 {s_p99:.2} ms); delivery p50 {s_d50:.2} ms, p99 {s_d99:.2} ms");
        println!("nats:   {n_rate:.0} appends/s (p50 {n_p50:.2} ms, p99 {n_p99:.2} ms); delivery p50 {n_d50:.2} ms, p99 {n_d99:.2} ms");
        println!(
            "nats/sqlite: appends/s {:.2}, delivery p99 {:.2}",
            n_rate / s_rate,
            n_d99 / s_d99
        );
    });
    let _ = std::fs::remove_dir_all(&dir);
}
