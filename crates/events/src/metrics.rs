//! The event metrics of DESIGN.md, in a prometheus-client registry the
//! gateway registers with its own: [`Metered`] wraps any [`Store`] and
//! counts what passes through it.
//!
//! | metric | what |
//! |---|---|
//! | `tidegate_events_published_total{topic,result}` | appended events: `stored`, `duplicate`; appends refused: `conflict`, `invalid`, `error` |
//! | `tidegate_events_deliveries_total{subscription,result}` | settled deliveries: `ack`, `retry` (nacked), `dead_letter` |
//! | `tidegate_events_lag{subscription}` | events the group has not finished (set by [`EventMetrics::set_lag`] from [`Store::lag`]) |
//! | `tidegate_events_delivery_duration_seconds{subscription}` | a delivery's lease until it was settled |
//! | `tidegate_events_append_duration_seconds{store}` | an append, until it was on disk |
//! | `tidegate_events_store_up{store}` | 1 while the store answers (set by the gateway's sampler) |

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::event::Event;
use crate::store::{
    Append, AppendError, Appended, BoxFuture, DeadLetters, Retention, Store, StoreError,
    SubscriptionStatus, TopicInfo,
};
use crate::subscription::{Delivery, Seek, SubscriptionConfig};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PublishedLabels {
    topic: String,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    subscription: String,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SubscriptionLabels {
    subscription: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    store: &'static str,
}

/// Deliveries never settled through this store are forgotten after this.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

fn histogram() -> Histogram {
    // 100 µs to ~100 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

/// The event metrics; clones share them.
#[derive(Debug, Clone)]
pub struct EventMetrics {
    published: Family<PublishedLabels, Counter>,
    deliveries: Family<DeliveryLabels, Counter>,
    lag: Family<SubscriptionLabels, Gauge>,
    delivery_duration: Family<SubscriptionLabels, Histogram>,
    append_duration: Family<StoreLabels, Histogram>,
    store_up: Family<StoreLabels, Gauge>,
}

impl Default for EventMetrics {
    fn default() -> Self {
        EventMetrics {
            published: Family::default(),
            deliveries: Family::default(),
            lag: Family::default(),
            delivery_duration: Family::new_with_constructor(histogram),
            append_duration: Family::new_with_constructor(histogram),
            store_up: Family::default(),
        }
    }
}

impl EventMetrics {
    /// Adds every metric to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tidegate_events_published",
            "Events appended, and appends refused, by topic and result",
            self.published.clone(),
        );
        registry.register(
            "tidegate_events_deliveries",
            "Deliveries settled, by subscription and result",
            self.deliveries.clone(),
        );
        registry.register(
            "tidegate_events_lag",
            "Events a subscription has not finished",
            self.lag.clone(),
        );
        registry.register(
            "tidegate_events_delivery_duration_seconds",
            "From a delivery to its settling",
            self.delivery_duration.clone(),
        );
        registry.register(
            "tidegate_events_append_duration_seconds",
            "An append until it is on disk",
            self.append_duration.clone(),
        );
        registry.register(
            "tidegate_events_store_up",
            "1 while the event store answers (a NATS server reachable), else 0",
            self.store_up.clone(),
        );
    }

    /// Sets whether the `store` answers.
    pub fn set_store_up(&self, store: &'static str, up: bool) {
        self.store_up
            .get_or_create(&StoreLabels { store })
            .set(i64::from(up));
    }

    /// Sets `subscription`'s lag.
    pub fn set_lag(&self, subscription: &str, lag: u64) {
        self.lag
            .get_or_create(&SubscriptionLabels {
                subscription: subscription.to_owned(),
            })
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
    }

    fn published(&self, topic: &str, result: &'static str, count: u64) {
        self.published
            .get_or_create(&PublishedLabels {
                topic: topic.to_owned(),
                result,
            })
            .inc_by(count);
    }

    fn settled(&self, subscription: &str, result: &'static str, leased: Option<Duration>) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                subscription: subscription.to_owned(),
                result,
            })
            .inc();
        if let Some(leased) = leased {
            self.delivery_duration
                .get_or_create(&SubscriptionLabels {
                    subscription: subscription.to_owned(),
                })
                .observe(leased.as_secs_f64());
        }
    }
}

/// A store whose traffic is counted in [`EventMetrics`].
pub struct Metered<S> {
    inner: S,
    metrics: EventMetrics,
    /// The `store` label: `sqlite`, `nats`.
    kind: &'static str,
    /// When each delivery under way was handed out, by subscription and ack id.
    leased: Mutex<HashMap<(String, String), Instant>>,
}

impl<S> std::fmt::Debug for Metered<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metered")
            .field("store", &self.kind)
            .finish_non_exhaustive()
    }
}

impl<S: Store> Metered<S> {
    /// `inner`, counted in `metrics` with the store label `kind`.
    pub fn new(inner: S, metrics: EventMetrics, kind: &'static str) -> Self {
        Metered {
            inner,
            metrics,
            kind,
            leased: Mutex::new(HashMap::new()),
        }
    }

    /// How long the delivery `ack_id` of `subscription` was out, and
    /// forgets it.
    fn settle(&self, subscription: &str, ack_id: &str) -> Option<Duration> {
        let mut leased = self.leased.lock().unwrap_or_else(|e| e.into_inner());
        leased
            .remove(&(subscription.to_owned(), ack_id.to_owned()))
            .map(|since| since.elapsed())
    }

    /// Counts a delivery settled as `result` if it was (`done`); `done`.
    fn counted(&self, subscription: &str, ack_id: &str, result: &'static str, done: bool) -> bool {
        let leased = self.settle(subscription, ack_id);
        if done {
            self.metrics.settled(subscription, result, leased);
        }
        done
    }
}

impl<S: Store> Store for Metered<S> {
    fn append(&self, append: Append) -> BoxFuture<'_, Result<Appended, AppendError>> {
        Box::pin(async move {
            let topic = append.topic.clone();
            let begun = Instant::now();
            let result = self.inner.append(append).await;
            match &result {
                Ok(appended) => {
                    self.metrics
                        .append_duration
                        .get_or_create(&StoreLabels { store: self.kind })
                        .observe(begun.elapsed().as_secs_f64());
                    let duplicates = appended.events.iter().filter(|s| s.duplicate).count() as u64;
                    let stored = appended.events.len() as u64 - duplicates;
                    if stored > 0 {
                        self.metrics.published(&topic, "stored", stored);
                    }
                    if duplicates > 0 {
                        self.metrics.published(&topic, "duplicate", duplicates);
                    }
                }
                Err(AppendError::Conflict { .. }) => self.metrics.published(&topic, "conflict", 1),
                Err(AppendError::Invalid(_)) => self.metrics.published(&topic, "invalid", 1),
                Err(_) => self.metrics.published(&topic, "error", 1),
            }
            result
        })
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
            let deliveries = self.inner.fetch(subscription, max).await?;
            let now = Instant::now();
            let mut leased = self.leased.lock().unwrap_or_else(|e| e.into_inner());
            // Leases this member never settled (it died, or they ran out) go.
            leased.retain(|_, since| now.duration_since(*since) < FORGET_AFTER);
            for delivery in &deliveries {
                leased.insert((subscription.to_owned(), delivery.ack_id.clone()), now);
            }
            Ok(deliveries)
        })
    }

    fn ack<'a>(
        &'a self,
        subscription: &'a str,
        ack_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<bool>, StoreError>> {
        Box::pin(async move {
            let acked = self.inner.ack(subscription, ack_ids).await?;
            for (ack_id, acked) in ack_ids.iter().zip(&acked) {
                let leased = self.settle(subscription, ack_id);
                if *acked {
                    self.metrics.settled(subscription, "ack", leased);
                }
            }
            Ok(acked)
        })
    }

    fn nack<'a>(
        &'a self,
        subscription: &'a str,
        ack_id: &'a str,
        delay: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let nacked = self.inner.nack(subscription, ack_id, delay).await?;
            Ok(self.counted(subscription, ack_id, "retry", nacked))
        })
    }

    fn release<'a>(
        &'a self,
        subscription: &'a str,
        ack_id: &'a str,
        delay: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let released = self.inner.release(subscription, ack_id, delay).await?;
            Ok(self.counted(subscription, ack_id, "retry", released))
        })
    }

    fn extend<'a>(
        &'a self,
        subscription: &'a str,
        ack_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.extend(subscription, ack_id)
    }

    fn dead_letter<'a>(
        &'a self,
        subscription: &'a str,
        ack_id: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = self.inner.dead_letter(subscription, ack_id, reason).await?;
            Ok(self.counted(subscription, ack_id, "dead_letter", done))
        })
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
        Box::pin(async move {
            self.inner.seek(subscription, to).await?;
            let mut leased = self.leased.lock().unwrap_or_else(|e| e.into_inner());
            leased.retain(|(name, _), _| name != subscription);
            Ok(())
        })
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

    fn topics(&self) -> BoxFuture<'_, Result<Vec<TopicInfo>, StoreError>> {
        self.inner.topics()
    }

    fn dead_letters<'a>(
        &'a self,
        dead_letter_topic: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<DeadLetters, StoreError>> {
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
