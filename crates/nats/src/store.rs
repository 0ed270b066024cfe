//! [`NatsStore`]: the `Store` of tidegate-events on JetStream, topics and
//! consumer groups together.

use std::time::Duration;

use bytes::Bytes;
use tidegate_events::{
    Append, AppendError, Appended, BoxFuture, Clock, DeadLetters, Delivery, Event, Retention, Seek,
    Store, StoreError, SubscriptionConfig, SubscriptionStatus, TopicInfo,
};
use tokio::sync::watch;

use crate::groups::{Groups, Settle};
use crate::records::Records;
use crate::topics::{Access, NatsTopics};

/// Topics and consumer groups on a JetStream server or cluster, shared by
/// every gateway replica that opens the same one.
#[derive(Clone)]
pub struct NatsStore {
    topics: NatsTopics,
    groups: Groups,
    /// Each dead-letter topic's redrive place.
    redrives: Records,
}

impl std::fmt::Debug for NatsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsStore").finish_non_exhaustive()
    }
}

impl NatsStore {
    /// The store on the server(s) at `url`, an event id seen within
    /// `dedup_window` being a duplicate; leases and delays by `clock`;
    /// streams kept in `replicas` copies.
    pub async fn connect(
        url: &str,
        dedup_window: Duration,
        clock: Clock,
        replicas: usize,
    ) -> Result<Self, StoreError> {
        Self::connect_with(url, dedup_window, clock, replicas, &Access::default()).await
    }

    /// [`connect`](Self::connect) with credentials and TLS.
    pub async fn connect_with(
        url: &str,
        dedup_window: Duration,
        clock: Clock,
        replicas: usize,
        access: &Access<'_>,
    ) -> Result<Self, StoreError> {
        let topics = NatsTopics::connect_with(url, dedup_window, access)
            .await?
            .clock(clock)
            .replicas(replicas);
        let redrives = Records::open(topics.jetstream(), "TGX_REDRIVES", replicas).await?;
        let groups = Groups::new(topics.clone());
        Ok(NatsStore {
            topics,
            groups,
            redrives,
        })
    }

    /// The position up to which `dead_letter_topic` was redriven.
    async fn redriven_to(&self, dead_letter_topic: &str) -> Result<(u64, Option<u64>), StoreError> {
        Ok(match self.redrives.entry(dead_letter_topic).await? {
            Some((value, revision)) => (
                std::str::from_utf8(&value)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                Some(revision),
            ),
            None => (0, None),
        })
    }
}

impl Store for NatsStore {
    fn append(&self, append: Append) -> BoxFuture<'_, Result<Appended, AppendError>> {
        Box::pin(async move {
            let appended = self.topics.append(append).await?;
            if appended.events.iter().any(|s| !s.duplicate) {
                self.groups.wake();
            }
            Ok(appended)
        })
    }

    fn read<'a>(
        &'a self,
        topic: &'a str,
        from_position: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Event>, StoreError>> {
        Box::pin(self.topics.read(topic, from_position, limit))
    }

    fn read_stream<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
        from_version: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Event>, StoreError>> {
        Box::pin(self.topics.read_stream(topic, key, from_version, limit))
    }

    fn last_position<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(self.topics.last_position(topic))
    }

    fn topics(&self) -> BoxFuture<'_, Result<Vec<TopicInfo>, StoreError>> {
        Box::pin(self.topics.topics())
    }

    fn retain<'a>(&'a self, retention: Retention) -> BoxFuture<'a, Result<(), StoreError>> {
        self.topics.retain(retention);
        Box::pin(async { Ok(()) })
    }

    fn enforce_retention(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(self.topics.enforce_retention())
    }

    fn subscribe(&self, config: SubscriptionConfig) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.groups.subscribe(config))
    }

    fn fetch<'a>(
        &'a self,
        subscription: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, StoreError>> {
        Box::pin(self.groups.fetch(subscription, max))
    }

    fn ack<'a>(
        &'a self,
        subscription: &'a str,
        ack_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<bool>, StoreError>> {
        Box::pin(self.groups.ack(subscription, ack_ids))
    }

    fn nack<'a>(
        &'a self,
        subscription: &'a str,
        ack_id: &'a str,
        delay: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(
            self.groups
                .settle(subscription, ack_id, Settle::Nack(delay)),
        )
    }

    fn release<'a>(
        &'a self,
        subscription: &'a str,
        ack_id: &'a str,
        delay: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let delay = delay.unwrap_or(Duration::ZERO);
        Box::pin(
            self.groups
                .settle(subscription, ack_id, Settle::Release(delay)),
        )
    }

    fn extend<'a>(
        &'a self,
        subscription: &'a str,
        ack_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.groups.settle(subscription, ack_id, Settle::Extend))
    }

    fn dead_letter<'a>(
        &'a self,
        subscription: &'a str,
        ack_id: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let how = Settle::DeadLetter(reason.to_owned());
        Box::pin(self.groups.settle(subscription, ack_id, how))
    }

    fn redrive<'a>(
        &'a self,
        dead_letter_topic: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let (cursor, revision) = self.redriven_to(dead_letter_topic).await?;
            let letters = self
                .topics
                .read(dead_letter_topic, cursor + 1, limit)
                .await?;
            let Some(last) = letters.last().map(|l| l.position) else {
                return Ok(0);
            };
            let mut back = 0;
            for letter in &letters {
                let ext = &letter.extensions;
                let (Some(group), Some(position)) = (
                    ext.get("deadlettersubscription"),
                    ext.get("deadletterposition").and_then(|p| p.parse().ok()),
                ) else {
                    continue;
                };
                back += u64::from(self.groups.redrive(group, position).await?);
            }
            let value = Bytes::from(last.to_string());
            if self
                .redrives
                .put(dead_letter_topic, value, revision)
                .await?
                .is_none()
            {
                return Err(StoreError(format!(
                    "another redrive of {dead_letter_topic} ran at the same time; try again"
                )));
            }
            if back > 0 {
                self.groups.wake();
            }
            Ok(back)
        })
    }

    fn dead_letters<'a>(
        &'a self,
        dead_letter_topic: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<DeadLetters, StoreError>> {
        Box::pin(async move {
            let (cursor, _) = self.redriven_to(dead_letter_topic).await?;
            let last = self.topics.last_position(dead_letter_topic).await?;
            let oldest = if limit == 0 {
                Vec::new()
            } else {
                self.topics
                    .read(dead_letter_topic, cursor + 1, limit)
                    .await?
            };
            Ok(DeadLetters {
                waiting: last.saturating_sub(cursor),
                oldest,
            })
        })
    }

    fn seek<'a>(
        &'a self,
        subscription: &'a str,
        to: Seek,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.groups.seek(subscription, to))
    }

    fn lag<'a>(&'a self, subscription: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move { Ok(self.groups.status(subscription).await?.lag) })
    }

    fn subscription_status<'a>(
        &'a self,
        subscription: &'a str,
    ) -> BoxFuture<'a, Result<SubscriptionStatus, StoreError>> {
        Box::pin(self.groups.status(subscription))
    }

    fn next_due<'a>(
        &'a self,
        subscription: &'a str,
    ) -> BoxFuture<'a, Result<Option<Duration>, StoreError>> {
        Box::pin(self.groups.next_due(subscription))
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.groups.changes()
    }
}
