//! A consumer on the SQLite store: it waits for the store to say events
//! came (not for a timer), and its handler's results become acks,
//! redeliveries and dead letters.

use std::sync::Arc;
use std::time::Duration;

use tidegate_events::{
    Append, BoxFuture, Consumer, Delivery, Event, Failure, NewEvent, Retention, Seek, SqliteStore,
    Store, StoreError, SubscriptionConfig, SubscriptionStatus, TopicInfo,
};
use tidegate_resilience::Pipeline;
use tokio::sync::{mpsc, watch};

/// A fresh store in its own directory (removed when the test ends).
struct Fresh {
    store: Arc<SqliteStore>,
    dir: std::path::PathBuf,
}

impl Fresh {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("tidegate-consumer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = SqliteStore::open(dir.join("events.db"), Default::default()).unwrap();
        Fresh {
            store: Arc::new(store),
            dir,
        }
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The store, telling the test each time a fetch came back empty: the
/// consumer is about to wait.
struct Observed {
    inner: Arc<SqliteStore>,
    empty: mpsc::UnboundedSender<()>,
}

impl Store for Observed {
    fn append(
        &self,
        append: Append,
    ) -> BoxFuture<'_, Result<tidegate_events::Appended, tidegate_events::AppendError>> {
        self.inner.append(append)
    }
    fn read<'a>(
        &'a self,
        topic: &'a str,
        from: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Event>, StoreError>> {
        self.inner.read(topic, from, limit)
    }
    fn read_stream<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
        from: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Event>, StoreError>> {
        self.inner.read_stream(topic, key, from, limit)
    }
    fn last_position<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        self.inner.last_position(topic)
    }
    fn retain<'a>(&'a self, retention: Retention) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.retain(retention)
    }
    fn enforce_retention(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.inner.enforce_retention()
    }
    fn subscribe(&self, config: SubscriptionConfig) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.subscribe(config)
    }
    fn fetch<'a>(
        &'a self,
        subscription: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, StoreError>> {
        Box::pin(async move {
            let got = self.inner.fetch(subscription, max).await?;
            if got.is_empty() {
                let _ = self.empty.send(());
            }
            Ok(got)
        })
    }
    fn ack<'a>(
        &'a self,
        subscription: &'a str,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<bool>, StoreError>> {
        self.inner.ack(subscription, ids)
    }
    fn nack<'a>(
        &'a self,
        subscription: &'a str,
        id: &'a str,
        delay: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.nack(subscription, id, delay)
    }
    fn extend<'a>(
        &'a self,
        subscription: &'a str,
        id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.extend(subscription, id)
    }
    fn dead_letter<'a>(
        &'a self,
        subscription: &'a str,
        id: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.dead_letter(subscription, id, reason)
    }
    fn redrive<'a>(
        &'a self,
        topic: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        self.inner.redrive(topic, limit)
    }
    fn seek<'a>(
        &'a self,
        subscription: &'a str,
        to: Seek,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.seek(subscription, to)
    }
    fn next_due<'a>(
        &'a self,
        subscription: &'a str,
    ) -> BoxFuture<'a, Result<Option<Duration>, StoreError>> {
        self.inner.next_due(subscription)
    }
    fn lag<'a>(&'a self, subscription: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        self.inner.lag(subscription)
    }
    fn release<'a>(
        &'a self,
        subscription: &'a str,
        ack_id: &'a str,
        delay: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.release(subscription, ack_id, delay)
    }
    fn topics(&self) -> BoxFuture<'_, Result<Vec<TopicInfo>, StoreError>> {
        self.inner.topics()
    }
    fn dead_letters<'a>(
        &'a self,
        dead_letter_topic: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<tidegate_events::DeadLetters, StoreError>> {
        self.inner.dead_letters(dead_letter_topic, limit)
    }
    fn subscription_status<'a>(
        &'a self,
        subscription: &'a str,
    ) -> BoxFuture<'a, Result<SubscriptionStatus, StoreError>> {
        self.inner.subscription_status(subscription)
    }
    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes()
    }
}

fn event(id: &str, ty: &str) -> NewEvent {
    NewEvent::new(id, "test", ty, id.as_bytes().to_vec())
}

#[tokio::test]
async fn a_waiting_consumer_wakes_when_an_event_arrives_with_no_timer() {
    let fresh = Fresh::new("wake");
    let (empty, mut emptied) = mpsc::unbounded_channel();
    let store: Arc<dyn Store> = Arc::new(Observed {
        inner: fresh.store.clone(),
        empty,
    });
    store
        .subscribe(SubscriptionConfig::new("g", "t"))
        .await
        .unwrap();
    let consumer = Consumer::new(store.clone(), "g");
    let waiting = tokio::spawn(async move { consumer.next().await });
    // Nothing pending waits on time, so only the store's word can wake it.
    emptied.recv().await.unwrap();
    assert_eq!(store.next_due("g").await.unwrap(), None);
    store
        .append(Append::to_topic("t", vec![event("e1", "T")]))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the consumer never woke")
        .unwrap()
        .unwrap();
    assert_eq!(got[0].event.id, "e1");
}

#[tokio::test(start_paused = true)]
async fn a_bounded_wait_ends_empty_at_its_deadline() {
    // (Woken by the store before it: the unbounded wait's test, the same code.)
    let fresh = Fresh::new("within");
    let store: Arc<dyn Store> = fresh.store.clone();
    store
        .subscribe(SubscriptionConfig::new("g", "t"))
        .await
        .unwrap();
    let consumer = Consumer::new(store.clone(), "g");
    let begun = tokio::time::Instant::now();
    let got = consumer.next_within(Duration::from_secs(30)).await.unwrap();
    assert!(got.is_empty());
    assert!(
        begun.elapsed() >= Duration::from_secs(30),
        "{:?}",
        begun.elapsed()
    );
}

#[tokio::test]
async fn handler_results_become_acks_redeliveries_and_dead_letters() {
    let fresh = Fresh::new("handle");
    let store: Arc<dyn Store> = fresh.store.clone();
    store
        .subscribe(SubscriptionConfig::new("g", "t"))
        .await
        .unwrap();
    for id in ["ok", "again", "bad"] {
        store
            .append(Append::to_topic("t", vec![event(id, "T")]))
            .await
            .unwrap();
    }
    let consumer = Consumer::new(store.clone(), "g");
    let handler = |event: Event| async move {
        match event.id.as_str() {
            "ok" => Ok(()),
            "again" => Err(Failure::Retry(Some(Duration::ZERO))),
            _ => Err(Failure::Poison("cannot parse".into())),
        }
    };
    let deliveries = consumer.next().await.unwrap();
    let outcome = consumer
        .handle(&deliveries, &Pipeline::builder().build(), handler)
        .await
        .unwrap();
    assert_eq!(
        (outcome.acked, outcome.retried, outcome.dead_lettered),
        (1, 1, 1)
    );
    let again = consumer.next().await.unwrap();
    assert_eq!(
        (again[0].event.id.as_str(), again[0].delivery),
        ("again", 2)
    );
    let letters = store.read("t.dead", 1, 10).await.unwrap();
    assert_eq!(letters[0].id, "bad");
    assert_eq!(letters[0].extensions["deadletterreason"], "cannot parse");
}

#[tokio::test(start_paused = true)]
async fn a_handler_cut_off_by_its_timeout_is_redelivered() {
    let fresh = Fresh::new("timeout");
    let store: Arc<dyn Store> = fresh.store.clone();
    store
        .subscribe(SubscriptionConfig::new("g", "t"))
        .await
        .unwrap();
    store
        .append(Append::to_topic("t", vec![event("slow", "T")]))
        .await
        .unwrap();
    let consumer = Consumer::new(store.clone(), "g");
    let policies = Pipeline::builder()
        .timeout(Duration::from_millis(50))
        .build();
    let deliveries = consumer.next().await.unwrap();
    let outcome = consumer
        .handle(&deliveries, &policies, |_| std::future::pending())
        .await
        .unwrap();
    assert_eq!(outcome.retried, 1);
    // Given back: due after the backoff (1 s), not after the 30 s lease.
    let due = store.next_due("g").await.unwrap().unwrap();
    assert!(due <= Duration::from_secs(1), "{due:?}");
}
