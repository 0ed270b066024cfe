//! The event model of tidegate-events on NATS JetStream, for gateways
//! that run as several replicas or on several machines.
//!
//! # Mapping
//! - A topic is a stream, `TG_{topic}` (a `.` of the name written `~`:
//!   stream names take no dot), over the subjects `tg.{topic}.>`; an event
//!   without a key goes to `tg.{topic}.e`, one with a key to
//!   `tg.{topic}.k.{key}` (the key in unpadded URL-safe base64: a key may
//!   hold any character, a subject token may not). Each stream starts
//!   with a message of no event on `tg.{topic}.g`.
//! - An append (one event, or a batch to one key) is **one message**, so
//!   a batch is stored whole or not at all (JetStream 2.9 has no atomic
//!   batch of messages). Its headers hold the first event's position and
//!   version and the count; its payload, the events (see [`envelope`]).
//! - **Positions and versions come from one optimistic check.** Each
//!   append is published with `Nats-Expected-Last-Sequence`, the stream's
//!   last sequence its position and the key's version were computed from:
//!   any append in between (from another replica) makes the server refuse
//!   it, and the writer reads what was stored and computes it again. So
//!   positions are gap-free and versions exact per key, whichever replica
//!   appends, as on SQLite.
//! - **A writer per topic keeps many appends in flight** (the `writer`
//!   module): each message is computed as if those before it were stored,
//!   and names the one before it with `Nats-Expected-Last-Msg-Id`, so a
//!   refusal refuses the rest of the run too.
//! - **Dedup** is the writer's: the ids of the dedup window, read from the
//!   stream when the writer starts and from what other writers stored
//!   whenever one got in first.
//!
//! # Consumer groups
//! JetStream keeps the events and each group's place; the store keeps
//! the group's leases, delays and delivery counts itself, by its own
//! [`Clock`](tidegate_events::Clock), as SQLite's store does, so every
//! rule of the model holds as written (and the conformance suite's
//! manual clock drives it):
//! - A group is a durable pull consumer `TGC_{group}` on its topic's
//!   stream (explicit ack; no `max_deliver`: the store dead-letters
//!   itself). Its `ack_wait`, twice the group's (at least 5 s), only
//!   brings back a message a member pulled and died before recording;
//!   a message it brings back under a live lease or before its delay is
//!   left alone, and `next_due` makes waiting members look again that
//!   often.
//!   JetStream holds every message the group took and has not finished as
//!   "ack pending".
//! - Each such message has a record in the group's table `TGG_{group}` (a
//!   stream keeping one message per subject, read with direct gets):
//!   deliveries so far, leased until, due at, the message's ack subject,
//!   which of its events are done. Updates are compare-and-set
//!   (`Nats-Expected-Last-Subject-Sequence`), so two replicas cannot both
//!   settle one lease. (JetStream's key-value buckets do the same, but
//!   the client's need a newer server than Debian's 2.9.10.)
//! - `fetch` first looks at the group's records: an expired lease becomes
//!   due after its backoff; a due message is given back to JetStream
//!   (`-NAK`), which delivers it again on the pull that follows. Then it
//!   pulls, leases each message's unfinished events (one delivery each,
//!   ack id `{sequence}.{index}.{delivery}`), and dead-letters a message
//!   past `max_deliveries`. A message is acked to JetStream (`+ACK`, or
//!   `+TERM` for a dead letter) once all its events are done.
//! - `ordering = "key"`: a message whose key has an earlier unfinished
//!   message waits in its record (not leased) until that one is done.
//! - Redrive: letters go back through a redrive queue per group, taken
//!   before the stream's own messages, each at its original position.
//! - New events wake waiting consumers through a core NATS subscription
//!   to the topic's subjects; a delay or a lease coming due, through
//!   `next_due` from the records.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod envelope;
mod groups;
mod names;
mod records;
mod store;
mod topics;
mod writer;

pub use crate::store::NatsStore;
pub use crate::topics::{Access, NatsTls, NatsTopics, MAX_BATCH};
