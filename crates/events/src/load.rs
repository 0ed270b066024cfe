//! The workloads the benchmarks put on a [`Store`], in one place so that
//! every store is measured on the same work (`benches/events.rs` here,
//! `tidegate-nats`'s `benches/stores.rs` side by side with SQLite).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::{Append, Consumer, NewEvent, Store, SubscriptionConfig};

/// What a workload measured: its rate, and each operation's latency.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// Operations a second, over the whole run.
    pub per_second: f64,
    /// The median latency.
    pub p50: Duration,
    /// The 99th percentile latency.
    pub p99: Duration,
}

impl Measured {
    fn of(mut latencies: Vec<Duration>, elapsed: Duration) -> Self {
        latencies.sort();
        let at = |p: f64| {
            latencies
                .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or_default()
        };
        Measured {
            per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
            p50: at(0.5),
            p99: at(0.99),
        }
    }
}

/// A 1 KiB event with id `id`, type `Benched`.
fn event(id: String) -> NewEvent {
    NewEvent::new(id, "bench", "Benched", vec![b'x'; 1024])
}

/// `publishers` tasks append `total` 1 KiB events between them to topic
/// `bench`, one event an append: appends a second and each append's
/// latency.
pub async fn appends(store: Arc<dyn Store>, publishers: usize, total: usize) -> Measured {
    let each = total / publishers.max(1);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..publishers {
        let store = store.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(each);
            for i in 0..each {
                let begun = Instant::now();
                store
                    .append(Append::to_topic("bench", vec![event(format!("{p}-{i}"))]))
                    .await
                    .expect("an append");
                latencies.push(begun.elapsed());
            }
            latencies
        });
    }
    let mut latencies = Vec::with_capacity(total);
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.expect("a publisher"));
    }
    Measured::of(latencies, started.elapsed())
}

/// A consumer waiting on group `g` of topic `t`: the time from each
/// append to its delivery, `count` events one at a time (each acked).
pub async fn delivery_latency(store: Arc<dyn Store>, count: usize) -> Measured {
    store
        .subscribe(SubscriptionConfig::new("g", "t"))
        .await
        .expect("a subscription");
    let consumer = Consumer::new(store.clone(), "g");
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(count);
    for i in 0..count {
        let waiting = {
            let consumer = consumer.clone();
            tokio::spawn(async move { consumer.next().await.expect("a delivery") })
        };
        tokio::task::yield_now().await;
        let begun = Instant::now();
        store
            .append(Append::to_topic("t", vec![event(format!("l{i}"))]))
            .await
            .expect("an append");
        let got = waiting.await.expect("the consumer");
        latencies.push(begun.elapsed());
        let ids: Vec<String> = got.iter().map(|d| d.ack_id.clone()).collect();
        store.ack("g", &ids).await.expect("an ack");
    }
    Measured::of(latencies, started.elapsed())
}
