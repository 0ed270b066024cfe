//! What every store does: [`Store`], the append it takes and answers, and
//! its errors.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use std::time::Duration;

use tokio::sync::watch;

use crate::event::{Event, ExpectedVersion, NewEvent};
use crate::subscription::{Delivery, Seek, SubscriptionConfig};

/// A store's futures, boxed so that `dyn Store` picks the store at run time.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Events to append to one topic: one event, or a batch to one key that
/// is stored whole or not at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Append {
    /// The topic.
    pub topic: String,
    /// The key every event of the batch has, if any.
    pub key: Option<String>,
    /// What the key's stream must be for the batch to be stored.
    pub expected: ExpectedVersion,
    /// The events, in order.
    pub events: Vec<NewEvent>,
}

impl Append {
    /// What is wrong with this append, if anything: every store refuses
    /// it as [`AppendError::Invalid`] and stores nothing.
    pub fn problem(&self) -> Option<String> {
        if self.topic.is_empty() {
            return Some("the topic is empty".into());
        }
        if self.events.is_empty() {
            return Some("there is no event".into());
        }
        if self.key.is_none() && self.expected != ExpectedVersion::Any {
            return Some(format!("expected version {} needs a key", self.expected));
        }
        if self.key.as_deref() == Some("") {
            return Some("the key is empty".into());
        }
        let mut ids = std::collections::HashSet::with_capacity(self.events.len());
        self.events.iter().find_map(|e| {
            if e.id.is_empty() {
                Some("an event has no id".into())
            } else if e.source.is_empty() || e.ty.is_empty() {
                Some(format!("event `{}` needs a source and a type", e.id))
            } else if !ids.insert(e.id.as_str()) {
                Some(format!("the id `{}` is in the batch twice", e.id))
            } else {
                None
            }
        })
    }

    /// Events without a key.
    pub fn to_topic(topic: impl Into<String>, events: Vec<NewEvent>) -> Self {
        Append {
            topic: topic.into(),
            key: None,
            expected: ExpectedVersion::Any,
            events,
        }
    }

    /// Events of `key`'s stream, appended if it is as `expected`.
    pub fn to_key(
        topic: impl Into<String>,
        key: impl Into<String>,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Self {
        Append {
            topic: topic.into(),
            key: Some(key.into()),
            expected,
            events,
        }
    }
}

/// Where each event of an append went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// One per event, in order.
    pub events: Vec<Stored>,
}

/// Where one event went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The event's id.
    pub id: String,
    /// Its position in the topic.
    pub position: u64,
    /// Its version in its key's stream.
    pub version: Option<u64>,
    /// Stored by an earlier append within the dedup window: the position
    /// and version are that append's, and nothing was stored now.
    pub duplicate: bool,
}

/// Why an append stored nothing.
#[derive(Debug)]
#[non_exhaustive]
pub enum AppendError {
    /// The key's stream is not as expected.
    Conflict {
        /// What the append expected.
        expected: ExpectedVersion,
        /// The stream's last version (`None`: no event).
        actual: Option<u64>,
    },
    /// The append itself is wrong (no event, an expectation without a
    /// key, an empty id…).
    Invalid(String),
    /// The store failed.
    Store(StoreError),
}

impl fmt::Display for AppendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AppendError::Conflict { expected, actual } => match actual {
                Some(actual) => write!(f, "expected version {expected}, the stream is at {actual}"),
                None => write!(f, "expected version {expected}, the stream has no event"),
            },
            AppendError::Invalid(why) => write!(f, "invalid append: {why}"),
            AppendError::Store(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for AppendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AppendError::Store(e) => Some(e),
            _ => None,
        }
    }
}

impl From<StoreError> for AppendError {
    fn from(e: StoreError) -> Self {
        AppendError::Store(e)
    }
}

/// A store that could not do what was asked: its message says what and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

/// How long a topic keeps its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// The topic.
    pub topic: String,
    /// Events older than this go.
    pub max_age: Option<Duration>,
    /// All but the newest this many go.
    pub max_events: Option<u64>,
}

/// What a topic holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    /// The topic.
    pub name: String,
    /// The position of its oldest event kept (`None`: it keeps none).
    pub first_position: Option<u64>,
    /// The position of its last event (retention does not move it back).
    pub last_position: u64,
}

impl TopicInfo {
    /// How many events it keeps (positions are gap-free and retention
    /// deletes from the front).
    pub fn events(&self) -> u64 {
        self.first_position
            .map_or(0, |first| (self.last_position + 1).saturating_sub(first))
    }
}

/// Where a consumer group stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionStatus {
    /// The position up to which the group has taken events on.
    pub cursor: u64,
    /// Events it has not finished: after its cursor, and pending.
    pub lag: u64,
    /// Deliveries leased now (with a member, not yet settled).
    pub in_flight: u64,
    /// Pending events delivered before and waiting to be delivered again.
    pub redelivering: u64,
    /// How long ago, in milliseconds, the oldest event the group has not
    /// finished was appended (`None`: it is done with every event).
    pub oldest_unfinished_age_ms: Option<u64>,
}

/// The dead letters of a dead-letter topic not yet redriven.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetters {
    /// How many wait.
    pub waiting: u64,
    /// The oldest of them, as many as asked for.
    pub oldest: Vec<Event>,
}

/// Topics of events: append with expected versions and dedup, read a
/// topic from a position, read one key's stream from a version.
pub trait Store: Send + Sync + 'static {
    /// Stores `append`'s events at the end of its topic (and of its key's
    /// stream), or nothing: on a conflict, an invalid append or a failure.
    /// Once answered `Ok`, the events are on disk.
    fn append(&self, append: Append) -> BoxFuture<'_, Result<Appended, AppendError>>;

    /// Up to `limit` events of `topic` from `from_position` on, in order.
    fn read<'a>(
        &'a self,
        topic: &'a str,
        from_position: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Event>, StoreError>>;

    /// Up to `limit` events of `key`'s stream in `topic` from version
    /// `from_version` on, in order.
    fn read_stream<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
        from_version: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Event>, StoreError>>;

    /// The position of `topic`'s last event (0: none yet).
    fn last_position<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Every topic that has had events, by name.
    fn topics(&self) -> BoxFuture<'_, Result<Vec<TopicInfo>, StoreError>>;

    /// Sets `topic`'s retention: events older than `max_age`, and all but
    /// the newest `max_events`, are deleted (positions and versions go on
    /// from where they were). The store applies it by itself from time to
    /// time, and at once on [`enforce_retention`](Store::enforce_retention).
    fn retain<'a>(&'a self, retention: Retention) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Deletes what every topic's retention says is past keeping; how many
    /// events went.
    fn enforce_retention(&self) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Creates the consumer group of `config`, its cursor where
    /// `config.start` says, or gives an existing one these settings (its
    /// cursor and pending events stay).
    fn subscribe(&self, config: SubscriptionConfig) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Up to `max` events for a member of group `subscription`, leased
    /// for its `ack_wait`: events not yet delivered, and those whose lease
    /// ran out or that were nacked, once their backoff has passed. Events
    /// past `max_deliveries` go to the dead-letter topic instead. Empty
    /// when nothing is due; [`changes`](Store::changes) tells when to ask
    /// again.
    fn fetch<'a>(
        &'a self,
        subscription: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, StoreError>>;

    /// Acks deliveries: their events are done for this group. An ack id
    /// whose lease has run out (or that another delivery replaced) acks
    /// nothing: `false` in its place.
    fn ack<'a>(
        &'a self,
        subscription: &'a str,
        ack_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<bool>, StoreError>>;

    /// Gives a delivery back, to be delivered again after `delay` (else
    /// the backoff); `false` if its lease is gone.
    fn nack<'a>(
        &'a self,
        subscription: &'a str,
        ack_id: &'a str,
        delay: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Gives a delivery back as though it had not been made: nothing of it
    /// reached the consumer (its endpoint refused the connection, or the
    /// caller's own policies turned the call away), so it does not count
    /// against `max_deliveries`. Delivered again after `delay` (else at
    /// once); `false` if its lease is gone.
    fn release<'a>(
        &'a self,
        subscription: &'a str,
        ack_id: &'a str,
        delay: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Leases a delivery for another `ack_wait`; `false` if its lease is gone.
    fn extend<'a>(
        &'a self,
        subscription: &'a str,
        ack_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Sends a delivery's event to the dead-letter topic now, with
    /// `reason`; `false` if its lease is gone.
    fn dead_letter<'a>(
        &'a self,
        subscription: &'a str,
        ack_id: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Puts up to `limit` dead letters of `dead_letter_topic`, not yet
    /// redriven, back to work: each becomes pending again in the group that
    /// dead-lettered it, at its place in its topic, with its deliveries
    /// counted afresh. How many went back; each letter goes back once.
    fn redrive<'a>(
        &'a self,
        dead_letter_topic: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// The letters of `dead_letter_topic` that no redrive has put back to
    /// work yet: how many, and the oldest `limit` of them.
    fn dead_letters<'a>(
        &'a self,
        dead_letter_topic: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<DeadLetters, StoreError>>;

    /// Moves a group's cursor (to rebuild a read model, or skip a
    /// backlog); what was pending is forgotten.
    fn seek<'a>(&'a self, subscription: &'a str, to: Seek)
        -> BoxFuture<'a, Result<(), StoreError>>;

    /// How many events group `subscription` has not finished: those after
    /// its cursor (its type filter may pass some by) and its pending ones.
    fn lag<'a>(&'a self, subscription: &'a str) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Where group `subscription` stands (an error for an unknown group).
    fn subscription_status<'a>(
        &'a self,
        subscription: &'a str,
    ) -> BoxFuture<'a, Result<SubscriptionStatus, StoreError>>;

    /// How long until one of group `subscription`'s pending events comes
    /// due by time alone (a lease and its backoff run out, a nack's delay
    /// ends); `None` when none waits on time.
    fn next_due<'a>(
        &'a self,
        subscription: &'a str,
    ) -> BoxFuture<'a, Result<Option<Duration>, StoreError>>;

    /// A counter that moves when events are stored or deliveries given
    /// back (acked, nacked, dead-lettered, a seek): waiting consumers
    /// watch it, and look again when it moves.
    fn changes(&self) -> watch::Receiver<u64>;
}
