//! Read models: a [`Projection`] is fed a topic's events by a consumer
//! group of its own with `ordering = key`, so each key's events arrive in
//! version order; the group's acks are its checkpoint (a restart goes on
//! after the last event it finished), and [`Projector::rebuild`] seeks the
//! group back to the start.
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::Arc;
//! use tidegate_events::{Append, Event, ExpectedVersion, Failure, NewEvent, Projection, Projector, SqliteStore, Store};
//!
//! /// How many events each key has had.
//! #[derive(Default)]
//! struct Counts(HashMap<String, u64>);
//!
//! impl Projection for Counts {
//!     fn project(&mut self, event: &Event) -> Result<(), Failure> {
//!         *self.0.entry(event.key.clone().unwrap_or_default()).or_default() += 1;
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # let dir = std::env::temp_dir().join(format!("tidegate-projection-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.join("events.db"), Default::default()).unwrap());
//! for i in 0..3 {
//!     let e = NewEvent::new(format!("e{i}"), "doc", "Happened", Vec::new());
//!     store.append(Append::to_key("t", "k", ExpectedVersion::Any, vec![e])).await.unwrap();
//! }
//! let projector = Projector::start(store, "counts", "t").await.unwrap();
//! let mut counts = Counts::default();
//! projector.catch_up(&mut counts).await.unwrap();
//! assert_eq!(counts.0["k"], 3);
//! # }
//! ```

use std::sync::Arc;

use crate::consumer::{Consumer, Failure};
use crate::event::Event;
use crate::store::{Store, StoreError};
use crate::subscription::{Ordering, Seek, SubscriptionConfig};

/// A read model built from events.
pub trait Projection {
    /// Takes one event into the model. `Err` gives it back
    /// ([`Failure::Retry`]) or dead-letters it ([`Failure::Poison`]); the
    /// key's later events wait for it either way.
    fn project(&mut self, event: &Event) -> Result<(), Failure>;
}

/// Feeds a [`Projection`] from its own key-ordered consumer group.
#[derive(Clone)]
pub struct Projector {
    store: Arc<dyn Store>,
    name: String,
    consumer: Consumer,
}

impl std::fmt::Debug for Projector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector")
            .field("group", &self.name)
            .finish_non_exhaustive()
    }
}

impl Projector {
    /// The projector of group `name` on `topic`, created (from the topic's
    /// first event) if new; an existing group goes on from its checkpoint.
    pub async fn start(
        store: Arc<dyn Store>,
        name: impl Into<String>,
        topic: impl Into<String>,
    ) -> Result<Self, StoreError> {
        let name = name.into();
        let config = SubscriptionConfig {
            ordering: Ordering::Key,
            max_in_flight: 100,
            ..SubscriptionConfig::new(name.clone(), topic)
        };
        store.subscribe(config).await?;
        let consumer = Consumer::new(store.clone(), name.clone()).batch(100);
        Ok(Projector {
            store,
            name,
            consumer,
        })
    }

    /// Projects every event due now, in order, and acks each; how many
    /// were projected. Returns once nothing more is due, or a round
    /// projected nothing (the projection gave every event back).
    pub async fn catch_up<P: Projection>(&self, projection: &mut P) -> Result<usize, StoreError> {
        let mut projected = 0;
        loop {
            let deliveries = self.store.fetch(&self.name, 100).await?;
            if deliveries.is_empty() {
                return Ok(projected);
            }
            match self.apply(projection, &deliveries).await? {
                0 => return Ok(projected),
                n => projected += n,
            }
        }
    }

    /// Projects events as they come, for as long as it runs.
    pub async fn run<P: Projection>(&self, projection: &mut P) -> Result<(), StoreError> {
        loop {
            let deliveries = self.consumer.next().await?;
            self.apply(projection, &deliveries).await?;
        }
    }

    /// Starts the group over from the topic's first event: the caller
    /// starts its model afresh too.
    pub async fn rebuild(&self) -> Result<(), StoreError> {
        self.store.seek(&self.name, Seek::Earliest).await
    }

    /// Projects `deliveries` one by one and settles each; the count acked.
    async fn apply<P: Projection>(
        &self,
        projection: &mut P,
        deliveries: &[crate::subscription::Delivery],
    ) -> Result<usize, StoreError> {
        let mut acks = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match projection.project(&delivery.event) {
                Ok(()) => acks.push(delivery.ack_id.clone()),
                Err(Failure::Retry(delay)) => {
                    self.store.nack(&self.name, &delivery.ack_id, delay).await?;
                }
                Err(Failure::Poison(reason)) => {
                    self.store
                        .dead_letter(&self.name, &delivery.ack_id, &reason)
                        .await?;
                }
            }
        }
        let acked = self.store.ack(&self.name, &acks).await?;
        Ok(acked.iter().filter(|a| **a).count())
    }
}
