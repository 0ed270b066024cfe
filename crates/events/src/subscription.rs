//! Subscriptions: consumer groups with a cursor of their own. Every group
//! gets every event of its topic (pub/sub); the members of one group share
//! them (a work queue). A delivered event is leased for `ack_wait`; not
//! acked in time, it is delivered again after a backoff; after
//! `max_deliveries`, or at once when dead-lettered, it goes to the
//! dead-letter topic with the reason and the subscription as extensions.

use std::time::Duration;

use crate::event::Event;

/// A subscription's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionConfig {
    /// The group's name.
    pub name: String,
    /// The topic it follows.
    pub topic: String,
    /// Only events of these types (all when empty); others are passed by.
    pub types: Vec<String>,
    /// One event per key in flight, or any.
    pub ordering: Ordering,
    /// Events leased at once, across the group's members.
    pub max_in_flight: u32,
    /// How long a delivery is leased before it is given to another.
    pub ack_wait: Duration,
    /// Deliveries of one event before it is dead-lettered.
    pub max_deliveries: u32,
    /// The wait before a redelivery.
    pub backoff: Backoff,
    /// Where dead letters go; `TOPIC.dead` by default.
    pub dead_letter_topic: Option<String>,
    /// Where a new group begins.
    pub start: Start,
}

impl SubscriptionConfig {
    /// A group `name` on `topic` with DESIGN.md's defaults: every type,
    /// no ordering, 10 in flight, 30 s leases, 5 deliveries, backoff from
    /// 1 s to 5 min, from the earliest event.
    pub fn new(name: impl Into<String>, topic: impl Into<String>) -> Self {
        SubscriptionConfig {
            name: name.into(),
            topic: topic.into(),
            types: Vec::new(),
            ordering: Ordering::None,
            max_in_flight: 10,
            ack_wait: Duration::from_secs(30),
            max_deliveries: 5,
            backoff: Backoff::default(),
            dead_letter_topic: None,
            start: Start::Earliest,
        }
    }

    /// The dead-letter topic.
    pub fn dead_letter_topic(&self) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dead", self.topic))
    }

    /// Whether the group takes events of type `ty`.
    pub fn wants(&self, ty: &str) -> bool {
        self.types.is_empty() || self.types.iter().any(|t| t == ty)
    }
}

/// In what order a group's events are handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ordering {
    /// Up to `max_in_flight` at once, in any order.
    #[default]
    None,
    /// At most one event per key in flight, in version order (projections,
    /// aggregates); events without a key are each their own.
    Key,
}

/// Where a new group's cursor begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    /// At the topic's first event.
    #[default]
    Earliest,
    /// After its last event: only what is appended from now on.
    Latest,
}

/// The wait before the `n`th redelivery: `base_delay` × 2ⁿ⁻¹, at most
/// `max_delay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first wait.
    pub base_delay: Duration,
    /// The longest wait.
    pub max_delay: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// The wait after delivery number `deliveries` (from 1) failed.
    pub fn after(&self, deliveries: u32) -> Duration {
        let doublings = deliveries.saturating_sub(1).min(30);
        self.base_delay
            .saturating_mul(1 << doublings)
            .min(self.max_delay)
    }
}

/// Where a group's cursor goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seek {
    /// Back to the first event (rebuild a read model).
    Earliest,
    /// Past the last event.
    Latest,
    /// To this position: it is the next event handed out.
    Position(u64),
}

/// One event handed to a member of a group, leased until acked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// What acks, nacks, extends or dead-letters this delivery (and no
    /// other delivery of the same event).
    pub ack_id: String,
    /// Which delivery of the event this is, from 1.
    pub delivery: u32,
    /// The event.
    pub event: Event,
}

/// The parts of an ack id: the event's position and its delivery number.
pub(crate) fn parse_ack_id(ack_id: &str) -> Option<(u64, u32)> {
    let (position, delivery) = ack_id.split_once('.')?;
    Some((position.parse().ok()?, delivery.parse().ok()?))
}

/// The ack id of delivery `delivery` of the event at `position`.
pub(crate) fn ack_id(position: u64, delivery: u32) -> String {
    format!("{position}.{delivery}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let backoff = Backoff {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(5),
        };
        let waits: Vec<u64> = (1..=5).map(|n| backoff.after(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 5, 5]);
        assert_eq!(backoff.after(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn ack_ids_round_trip() {
        assert_eq!(parse_ack_id(&ack_id(17, 3)), Some((17, 3)));
        assert_eq!(parse_ack_id("17"), None);
        assert_eq!(parse_ack_id("x.1"), None);
    }
}
