//! The event model of tidegate-events on NATS JetStream, for gateways
//! that run as several replicas or on several machines.
//!
//! Being built (issue 28): the topics half is here (appends with dedup,
//! exact expected versions and atomic batches; reads); consumer groups,
//! the `Store` trait and the gateway's `events.store = "nats"` come next.
//!
//! # Mapping
//! - A topic is a stream, `TG_{topic}` (a `.` of the name written `~`:
//!   stream names take no dot), over the subjects `tg.{topic}.>`; an event
//!   without a key goes to `tg.{topic}.e`, one with a key to
//!   `tg.{topic}.k.{key}` (the key in unpadded URL-safe base64: a key may
//!   hold any character, a subject token may not).
//! - An append (one event, or a batch to one key) is **one message**, so
//!   a batch is stored whole or not at all (JetStream 2.9 has no atomic
//!   batch of messages). Its headers hold the first event's position and
//!   version and the count; its payload, the events (see [`envelope`]).
//! - **Positions and versions come from one optimistic check.** Each
//!   append is published with `Nats-Expected-Last-Sequence`, the stream's
//!   last sequence when its position and the key's version were read: any
//!   append in between (from this process or another replica) makes the
//!   server refuse it, and the writer reads again and retries. So
//!   positions are gap-free and versions exact per key, whichever replica
//!   appends, as on SQLite; the price is that appends to one topic are
//!   serialised through the stream's last sequence.
//! - **Dedup** is JetStream's: `Nats-Msg-Id` is the append's first event
//!   id, within the stream's `duplicate_window` (`dedup_window`); the
//!   server checks it before the expected sequence, and a duplicate is
//!   answered with the first append's positions and versions.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod envelope;
mod names;
mod topics;

pub use crate::topics::{NatsTopics, MAX_BATCH};
