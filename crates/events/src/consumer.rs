//! A member of a consumer group: [`Consumer::next`] waits for deliveries
//! (woken by the store when events arrive or are given back, and by a
//! timer only for what comes due by time), and [`Consumer::run`] hands
//! each event to a handler through tidegate-resilience policies, turning
//! its result into an ack, a redelivery or a dead letter.
//!
//! ```
//! use std::sync::Arc;
//! use tidegate_events::{Append, Consumer, Failure, NewEvent, SqliteStore, Store, SubscriptionConfig};
//! use tidegate_resilience::Pipeline;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # let dir = std::env::temp_dir().join(format!("tidegate-consumer-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.join("events.db"), Default::default()).unwrap());
//! store.subscribe(SubscriptionConfig::new("mailer", "signups")).await.unwrap();
//! let signup = NewEvent::new("s-1", "web", "SignedUp", b"{}".to_vec());
//! store.append(Append::to_topic("signups", vec![signup])).await.unwrap();
//!
//! let consumer = Consumer::new(store.clone(), "mailer");
//! let deliveries = consumer.next().await.unwrap();
//! assert_eq!(deliveries[0].event.ty, "SignedUp");
//! let outcome = consumer
//!     .handle(&deliveries, &Pipeline::builder().build(), |event| async move {
//!         if event.data.is_empty() { Err(Failure::Poison("empty".into())) } else { Ok(()) }
//!     })
//!     .await
//!     .unwrap();
//! assert_eq!(outcome.acked, 1);
//! # }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tidegate_resilience::Pipeline;

use crate::event::Event;
use crate::store::{Store, StoreError};
use crate::subscription::Delivery;

/// Why a handler did not finish an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Try again later: after `delay`, else the subscription's backoff.
    Retry(Option<Duration>),
    /// The event cannot be handled, now or ever: to the dead-letter topic
    /// with this reason.
    Poison(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Retry(_) => f.write_str("retry"),
            Failure::Poison(reason) => write!(f, "poison: {reason}"),
        }
    }
}

impl std::error::Error for Failure {}

/// The policies a handler runs in: timeout, circuit breaker, bulkhead
/// (the subscription's redelivery stands in for retries, so any retry
/// policy in the pipeline is its own).
pub type Policies = Pipeline<(), Failure>;

/// What became of a batch of deliveries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Acked.
    pub acked: usize,
    /// Given back, to be delivered again.
    pub retried: usize,
    /// Sent to the dead-letter topic.
    pub dead_lettered: usize,
    /// Their lease had run out before they were settled: another member
    /// may have them now, and nothing was done.
    pub lost_lease: usize,
}

/// A member of consumer group `subscription` on a store.
#[derive(Clone)]
pub struct Consumer {
    store: Arc<dyn Store>,
    subscription: String,
    batch: usize,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("subscription", &self.subscription)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// A member of group `subscription` (created with
    /// [`Store::subscribe`]), taking up to 10 events at a time.
    pub fn new(store: Arc<dyn Store>, subscription: impl Into<String>) -> Self {
        Consumer {
            store,
            subscription: subscription.into(),
            batch: 10,
        }
    }

    /// Takes up to `batch` events at a time.
    #[must_use]
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// The next deliveries, at least one: at once if any are due, else as
    /// soon as the store has some (new events, deliveries given back) or
    /// a lease or a delay runs out.
    pub async fn next(&self) -> Result<Vec<Delivery>, StoreError> {
        self.wait(None).await
    }

    /// Like [`next`](Consumer::next), but waits at most `wait`: then the
    /// answer is empty. A fetch under way is never cut off (its events
    /// would stay leased to nobody until their lease ran out), so the
    /// answer may come a fetch's time after `wait`.
    pub async fn next_within(&self, wait: Duration) -> Result<Vec<Delivery>, StoreError> {
        self.wait(Some(tokio::time::Instant::now() + wait)).await
    }

    async fn wait(&self, until: Option<tokio::time::Instant>) -> Result<Vec<Delivery>, StoreError> {
        let mut changes = self.store.changes();
        loop {
            // Marked seen before looking: a change during the fetch wakes the wait below.
            changes.borrow_and_update();
            let deliveries = self.store.fetch(&self.subscription, self.batch).await?;
            let now = tokio::time::Instant::now();
            if !deliveries.is_empty() || until.is_some_and(|until| now >= until) {
                return Ok(deliveries);
            }
            let changed = changes.changed();
            let due = self
                .store
                .next_due(&self.subscription)
                .await?
                .map(|wait| now + wait);
            let wake = match (due, until) {
                (Some(due), Some(until)) => Some(due.min(until)),
                (due, until) => due.or(until),
            };
            match wake {
                Some(at) => {
                    tokio::select! {
                        changed = changed => changed.map_err(|_| closed())?,
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => changed.await.map_err(|_| closed())?,
            }
        }
    }

    /// Hands each of `deliveries` to `handler` through `policies`, all at
    /// once, and settles each by the result: `Ok` acks; [`Failure::Retry`],
    /// a timeout, an open breaker or a full bulkhead gives it back for
    /// redelivery (after a breaker's wait, when it says); a
    /// [`Failure::Poison`] dead-letters it.
    pub async fn handle<H, Fut>(
        &self,
        deliveries: &[Delivery],
        policies: &Policies,
        handler: H,
    ) -> Result<Outcome, StoreError>
    where
        H: Fn(Event) -> Fut,
        Fut: Future<Output = Result<(), Failure>>,
    {
        let handled = join_all(deliveries.iter().map(|delivery| {
            let handler = &handler;
            policies.call(move |_| handler(delivery.event.clone()))
        }))
        .await;
        let mut outcome = Outcome::default();
        let mut acks = Vec::new();
        for (delivery, result) in deliveries.iter().zip(handled) {
            let settled = match result {
                Ok(()) => {
                    acks.push(delivery.ack_id.clone());
                    continue;
                }
                Err(err) => match (err.retry_after(), err.into_inner()) {
                    (_, Some(Failure::Poison(reason))) => {
                        outcome.dead_lettered += 1;
                        self.store
                            .dead_letter(&self.subscription, &delivery.ack_id, &reason)
                            .await?
                    }
                    (_, Some(Failure::Retry(delay))) => {
                        outcome.retried += 1;
                        self.store
                            .nack(&self.subscription, &delivery.ack_id, delay)
                            .await?
                    }
                    (wait, None) => {
                        // The policies turned it away (for `wait`, when
                        // they know) or cut it off.
                        outcome.retried += 1;
                        self.store
                            .nack(&self.subscription, &delivery.ack_id, wait)
                            .await?
                    }
                },
            };
            if !settled {
                outcome.lost_lease += 1;
            }
        }
        if !acks.is_empty() {
            let acked = self.store.ack(&self.subscription, &acks).await?;
            outcome.acked = acked.iter().filter(|a| **a).count();
            outcome.lost_lease += acked.len() - outcome.acked;
        }
        Ok(outcome)
    }

    /// Handles every event of the group as it comes, until the store
    /// fails (see [`handle`](Consumer::handle)). While `policies`' breaker
    /// is open, no event is taken: the group's events wait for another
    /// member, or for the breaker to let calls through again.
    pub async fn run<H, Fut>(&self, policies: &Policies, handler: H) -> Result<(), StoreError>
    where
        H: Fn(Event) -> Fut,
        Fut: Future<Output = Result<(), Failure>>,
    {
        loop {
            if let Some(breaker) = policies.circuit_breaker() {
                if let Err(open) = breaker.try_acquire() {
                    let wait = open.retry_after().unwrap_or(Duration::from_secs(1));
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            let deliveries = self.next().await?;
            self.handle(&deliveries, policies, &handler).await?;
        }
    }
}

fn closed() -> StoreError {
    StoreError("the event store has closed".into())
}
