//! Consumer groups on JetStream (see the crate documentation): a durable
//! pull consumer keeps each group's place and the messages it has taken;
//! a KV bucket per group keeps, per message, its deliveries, lease, delay,
//! ack subject and finished events, by the store's own clock.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::stream::DirectGetErrorKind;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::records::Records;
use serde_json::{json, Value};
use tidegate_events::{
    Append, Delivery, Event, NewEvent, Ordering, Seek, StoreError, SubscriptionConfig,
    SubscriptionStatus,
};
use tokio::sync::watch;

use crate::envelope::{self, Place, COUNT, POSITION, VERSION};
use crate::names;
use crate::topics::{
    failed, first_message_where, first_position_at_or_after, number, read_message, NatsTopics,
};

/// The longest one pull from a group's consumer may take.
const PULL_WAIT: Duration = Duration::from_secs(1);

/// JetStream's own ack wait for a group's consumer: twice the group's
/// `ack_wait`, at least this. The store's leases (by its clock) decide
/// who holds a message; JetStream's wait only brings back a message a
/// member pulled and died before recording (its lease never written), so
/// another member takes it. A message JetStream brings back under a live
/// lease or before its delay is left alone.
const SAFETY_ACK_WAIT_MIN: Duration = Duration::from_secs(5);

/// JetStream's ack wait for the consumer of a group with `config`.
fn safety_ack_wait(config: &SubscriptionConfig) -> Duration {
    (config.ack_wait * 2).max(SAFETY_ACK_WAIT_MIN)
}

/// The group-keeping of one store: groups' settings, consumers, records.
#[derive(Clone)]
pub(crate) struct Groups {
    topics: NatsTopics,
    groups: Arc<Mutex<HashMap<String, Arc<Group>>>>,
    changed: Arc<watch::Sender<u64>>,
    /// Topics whose appends (by any replica) wake this store's consumers.
    watched: Arc<Mutex<std::collections::HashSet<String>>>,
}

/// One group: its settings, consumer and records.
struct Group {
    config: SubscriptionConfig,
    consumer: PullConsumer,
    records: Records,
}

/// What the store keeps of one message a group has taken.
#[derive(Debug, Clone, Default, PartialEq)]
struct Record {
    /// Deliveries counted so far.
    deliveries: u32,
    /// Leased until (store milliseconds); 0: not leased.
    leased_until: u64,
    /// Due again at (store milliseconds), when not leased; `given` once
    /// handed back to JetStream to be delivered again.
    due_at: u64,
    given: bool,
    /// The ack subject of its last delivery by JetStream (none for a
    /// redriven message, which JetStream finished already).
    reply: Option<String>,
    /// Its events (count) and those finished.
    events: u32,
    done: Vec<u32>,
    /// The stream sequence and key, for key ordering and redrive.
    key: Option<String>,
    /// A message redriven from the dead letters: read from the stream, not
    /// delivered by the consumer.
    redriven: bool,
}

impl Record {
    fn to_bytes(&self) -> Bytes {
        Bytes::from(
            json!({
                "d": self.deliveries, "u": self.leased_until, "t": self.due_at,
                "g": self.given, "r": self.reply, "n": self.events, "x": self.done,
                "k": self.key, "rd": self.redriven,
            })
            .to_string(),
        )
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let v: Value = serde_json::from_slice(bytes).ok()?;
        Some(Record {
            deliveries: u32::try_from(v["d"].as_u64()?).ok()?,
            leased_until: v["u"].as_u64()?,
            due_at: v["t"].as_u64().unwrap_or(0),
            given: v["g"].as_bool().unwrap_or(false),
            reply: v["r"].as_str().map(str::to_owned),
            events: u32::try_from(v["n"].as_u64()?).ok()?,
            done: v["x"]
                .as_array()?
                .iter()
                .filter_map(|i| u32::try_from(i.as_u64()?).ok())
                .collect(),
            key: v["k"].as_str().map(str::to_owned),
            redriven: v["rd"].as_bool().unwrap_or(false),
        })
    }

    fn leased(&self, now: u64) -> bool {
        self.leased_until > now
    }

    fn finished(&self) -> bool {
        self.done.len() as u32 >= self.events
    }
}

/// An ack id: `{sequence}.{index}.{delivery}`.
fn ack_id(sequence: u64, index: u32, delivery: u32) -> String {
    format!("{sequence}.{index}.{delivery}")
}

fn parse_ack_id(id: &str) -> Option<(u64, u32, u32)> {
    let mut parts = id.split('.');
    let ids = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    parts.next().is_none().then_some(ids)
}

fn unknown(name: &str) -> StoreError {
    StoreError(format!("there is no subscription named `{name}`"))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The consumer and record bucket names of group `name`.
fn consumer_name(name: &str) -> String {
    format!("TGC_{}", name.replace('.', "~"))
}

fn bucket_name(name: &str) -> String {
    format!("TGG_{}", name.replace('.', "~"))
}

/// How a lease is settled.
pub(crate) enum Settle {
    Nack(Option<Duration>),
    Release(Duration),
    Extend,
    DeadLetter(String),
}

impl Groups {
    pub(crate) fn new(topics: NatsTopics) -> Self {
        Groups {
            topics,
            groups: Arc::default(),
            changed: Arc::new(watch::channel(0).0),
            watched: Arc::default(),
        }
    }

    pub(crate) fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Tells waiting consumers to look again.
    pub(crate) fn wake(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    fn group(&self, name: &str) -> Result<Arc<Group>, StoreError> {
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| unknown(name))
    }

    /// Creates group `config.name` (its place where `config.start` says)
    /// or gives an existing one these settings.
    pub(crate) async fn subscribe(&self, config: SubscriptionConfig) -> Result<(), StoreError> {
        let deliver_policy = match config.start {
            tidegate_events::Start::Earliest => DeliverPolicy::All,
            tidegate_events::Start::Latest => DeliverPolicy::New,
        };
        self.open(config, deliver_policy).await
    }

    /// [`subscribe`](Self::subscribe), a new consumer starting at
    /// `deliver_policy`.
    async fn open(
        &self,
        config: SubscriptionConfig,
        deliver_policy: DeliverPolicy,
    ) -> Result<(), StoreError> {
        let js = self.topics.jetstream();
        // Which topic each group follows, shared by every replica.
        let registry = Records::open(js, "TGX_GROUPS", self.topics.replica_count()).await?;
        match registry.entry(&config.name).await?.map(|(topic, _)| topic) {
            Some(topic) if topic.as_ref() != config.topic.as_bytes() => {
                return Err(StoreError(format!(
                    "subscription `{}` follows topic `{}`, not `{}`",
                    config.name,
                    String::from_utf8_lossy(&topic),
                    config.topic
                )))
            }
            Some(_) => {}
            None => {
                registry
                    .put(&config.name, Bytes::from(config.topic.clone()), None)
                    .await?;
            }
        }
        let stream = self.topics.stream(&config.topic).await?;
        let made = stream
            .get_or_create_consumer(
                &consumer_name(&config.name),
                PullConfig {
                    durable_name: Some(consumer_name(&config.name)),
                    deliver_policy,
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: safety_ack_wait(&config),
                    max_deliver: -1,
                    max_ack_pending: -1,
                    filter_subject: names::all_subjects(&config.topic),
                    ..PullConfig::default()
                },
            )
            .await;
        let consumer: PullConsumer = match made {
            Ok(consumer) => consumer,
            // Another replica made it between our look and our create.
            Err(e) => stream
                .get_consumer(&consumer_name(&config.name))
                .await
                .map_err(|_| failed("open the group's consumer", e))?,
        };
        let records =
            Records::open(js, &bucket_name(&config.name), self.topics.replica_count()).await?;
        self.watch(&config.topic).await?;
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                config.name.clone(),
                Arc::new(Group {
                    config,
                    consumer,
                    records,
                }),
            );
        Ok(())
    }

    /// Wakes this store's waiting consumers whenever any replica appends
    /// to `topic`: a core NATS subscription to the topic's subjects (the
    /// stream's messages are ordinary messages too). It ends with the
    /// store.
    async fn watch(&self, topic: &str) -> Result<(), StoreError> {
        if !self
            .watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic.to_owned())
        {
            return Ok(());
        }
        let mut appends = self
            .topics
            .jetstream()
            .client()
            .subscribe(names::all_subjects(topic))
            .await
            .map_err(|e| failed("watch a topic", e))?;
        let changed = Arc::downgrade(&self.changed);
        tokio::spawn(async move {
            while appends.next().await.is_some() {
                let Some(changed) = changed.upgrade() else {
                    break;
                };
                changed.send_modify(|n| *n += 1);
            }
        });
        Ok(())
    }

    /// Every record of `group`, with its revision.
    async fn records(&self, group: &Group) -> Result<Vec<(u64, Record, u64)>, StoreError> {
        let mut out = Vec::new();
        for key in group.records.keys().await? {
            let Ok(sequence) = key.parse::<u64>() else {
                continue;
            };
            if let Some((value, revision)) = group.records.entry(&key).await? {
                if let Some(record) = Record::from_bytes(&value) {
                    out.push((sequence, record, revision));
                }
            }
        }
        out.sort_by_key(|(sequence, _, _)| *sequence);
        Ok(out)
    }

    /// Writes `record` if it is still at `revision` (`None`: new); its
    /// new revision, `None` if another replica wrote it first.
    async fn put(
        &self,
        group: &Group,
        sequence: u64,
        record: &Record,
        revision: Option<u64>,
    ) -> Result<Option<u64>, StoreError> {
        // A lost compare-and-set: another replica settled it first.
        group
            .records
            .put(&sequence.to_string(), record.to_bytes(), revision)
            .await
    }

    async fn forget(&self, group: &Group, sequence: u64) -> Result<(), StoreError> {
        group.records.remove(&sequence.to_string()).await
    }

    /// Answers JetStream for a finished message: `+ACK`, or `+TERM`.
    async fn finish(&self, reply: Option<&str>, term: bool) -> Result<(), StoreError> {
        let Some(reply) = reply else {
            return Ok(());
        };
        let body = if term { "+TERM" } else { "+ACK" };
        self.topics
            .jetstream()
            .client()
            .request(reply.to_owned(), Bytes::from_static(body.as_bytes()))
            .await
            .map(|_| ())
            .map_err(|e| failed("settle a message", e))
    }

    /// Up to `max` events for a member of group `name` (see the crate
    /// documentation).
    pub(crate) async fn fetch(&self, name: &str, max: usize) -> Result<Vec<Delivery>, StoreError> {
        let group = self.group(name)?;
        let config = &group.config;
        let now = self.topics.now_millis();
        let stream = self
            .topics
            .existing(&config.topic)
            .await?
            .ok_or_else(|| unknown(name))?;
        let mut in_flight = 0usize;
        let mut busy_keys: HashMap<String, u64> = HashMap::new();
        let mut out = Vec::new();
        let mut due_redriven = Vec::new();
        // Messages given back below (NAK), which JetStream delivers again.
        let mut given_back = HashSet::new();
        // Leases that ran out wait their backoff; due messages go back to
        // JetStream, which delivers them again on the pull below. With
        // `ordering = "key"`, a message waits (held) while an earlier
        // message of its key is unfinished.
        for (sequence, mut record, mut revision) in self.records(&group).await? {
            let blocked = config.ordering == Ordering::Key
                && record
                    .key
                    .as_ref()
                    .is_some_and(|key| busy_keys.get(key).is_some_and(|first| *first < sequence));
            if let Some(key) = &record.key {
                busy_keys.entry(key.clone()).or_insert(sequence);
            }
            if record.leased(now) {
                in_flight += (record.events as usize).saturating_sub(record.done.len());
                continue;
            }
            if record.leased_until > 0 {
                // The lease ran out: due after its backoff.
                record.due_at =
                    record.leased_until + millis(config.backoff.after(record.deliveries));
                record.leased_until = 0;
                match self.put(&group, sequence, &record, Some(revision)).await? {
                    Some(written) => revision = written,
                    None => continue,
                }
            }
            if blocked || record.given {
                continue;
            }
            let held = record.due_at == u64::MAX;
            if !held && record.due_at > now {
                continue;
            }
            if record.redriven {
                due_redriven.push((sequence, record, revision));
                continue;
            }
            if let Some(reply) = &record.reply {
                self.topics
                    .jetstream()
                    .client()
                    .publish(reply.clone(), Bytes::from_static(b"-NAK"))
                    .await
                    .map_err(|e| failed("give a message back", e))?;
                given_back.insert(sequence);
            }
            record.given = true;
            record.due_at = 0;
            self.put(&group, sequence, &record, Some(revision)).await?;
        }
        let room = (config.max_in_flight as usize)
            .saturating_sub(in_flight)
            .min(max);
        if room == 0 {
            return Ok(out);
        }
        // Redriven letters first, read from the stream.
        for (sequence, record, revision) in due_redriven {
            if out.len() >= room {
                break;
            }
            let Some(events) = read_message(&stream, &config.topic, sequence).await? else {
                self.forget(&group, sequence).await?;
                continue;
            };
            self.lease(
                &group,
                sequence,
                record,
                Some(revision),
                events,
                None,
                now,
                &mut out,
            )
            .await?;
        }
        if out.len() >= room {
            return Ok(out);
        }
        // Messages with nothing to deliver (a stream's first message, types
        // the group does not want) are finished and more are pulled.
        //
        // A message given back comes again once JetStream has read the
        // NAK, which a pull that takes only what is there can overtake:
        // then one more pull waits for those (a `PULL_WAIT` at most).
        let (mut wait, mut waited) = (false, false);
        loop {
            let wanted = room - out.len();
            let asked = if wait {
                wanted.min(given_back.len())
            } else {
                wanted
            };
            let mut pulled = 0;
            // A pull no server answers (a leader lost in a failover) ends
            // with its expiry instead of waiting on.
            let batch = if wait {
                group
                    .consumer
                    .batch()
                    .max_messages(asked)
                    .expires(PULL_WAIT)
                    .messages()
                    .await
            } else {
                // What is there now.
                group
                    .consumer
                    .fetch()
                    .max_messages(asked)
                    .expires(PULL_WAIT)
                    .messages()
                    .await
            };
            let mut batch = batch.map_err(|e| failed("pull from the group's consumer", e))?;
            loop {
                let next = tokio::time::timeout(PULL_WAIT * 2, batch.next()).await;
                let Ok(Some(message)) = next else {
                    break;
                };
                let message = message.map_err(|e| failed("pull from the group's consumer", e))?;
                pulled += 1;
                let Ok(info) = message.info() else {
                    continue;
                };
                let sequence = info.stream_sequence;
                given_back.remove(&sequence);
                let reply = message.reply.as_ref().map(|r| r.to_string());
                let headers = message.headers.clone().unwrap_or_default();
                let place = Place {
                    topic: &config.topic,
                    position: number(&headers, POSITION).unwrap_or(0),
                    version: number(&headers, VERSION),
                };
                let events = envelope::decode(&message.payload, place).map_err(StoreError)?;
                let entry = group.records.entry(&sequence.to_string()).await?;
                let (record, revision) = match entry
                    .and_then(|(value, revision)| Some((Record::from_bytes(&value)?, revision)))
                {
                    Some((record, revision)) => (record, Some(revision)),
                    None => (
                        Record {
                            events: u32::try_from(events.len()).unwrap_or(u32::MAX),
                            key: events.first().and_then(|e| e.key.clone()),
                            ..Record::default()
                        },
                        None,
                    ),
                };
                if record.leased(now) {
                    // JetStream's safety net went off under a live lease.
                    continue;
                }
                let delayed = revision.is_some()
                    && !record.given
                    && record.due_at != u64::MAX
                    && record.due_at > now;
                if delayed {
                    // Back from JetStream before its delay ran out: it
                    // is given back when due (the records, above).
                    continue;
                }
                // One unfinished message per key at a time, in stream order.
                if config.ordering == Ordering::Key {
                    if let Some(key) = &record.key {
                        if busy_keys.get(key).is_some_and(|first| *first < sequence) {
                            let held = Record {
                                reply: reply.clone(),
                                given: false,
                                due_at: u64::MAX,
                                ..record
                            };
                            self.put(&group, sequence, &held, revision).await?;
                            continue;
                        }
                        busy_keys.entry(key.clone()).or_insert(sequence);
                    }
                }
                self.lease(
                    &group, sequence, record, revision, events, reply, now, &mut out,
                )
                .await?;
            }
            if out.len() >= room {
                break;
            }
            if pulled < asked {
                if waited || given_back.is_empty() {
                    break;
                }
                (wait, waited) = (true, true);
            } else {
                wait = false;
            }
        }
        Ok(out)
    }

    /// Leases `events` of the message at `sequence` (those not finished
    /// and of a wanted type), or dead-letters them past `max_deliveries`.
    #[allow(clippy::too_many_arguments)]
    async fn lease(
        &self,
        group: &Group,
        sequence: u64,
        mut record: Record,
        revision: Option<u64>,
        events: Vec<Event>,
        reply: Option<String>,
        now: u64,
        out: &mut Vec<Delivery>,
    ) -> Result<(), StoreError> {
        let config = &group.config;
        for (i, event) in events.iter().enumerate() {
            let i = i as u32;
            if !record.done.contains(&i) && !config.wants(&event.ty) {
                record.done.push(i);
            }
        }
        if reply.is_some() {
            record.reply = reply;
        }
        if record.finished() {
            self.finish(record.reply.as_deref(), false).await?;
            if revision.is_some() {
                self.forget(group, sequence).await?;
            }
            return Ok(());
        }
        let delivery = record.deliveries + 1;
        if delivery > config.max_deliveries {
            for (i, event) in events.into_iter().enumerate() {
                if !record.done.contains(&(i as u32)) {
                    self.to_dead_letters(config, event, "max_deliveries")
                        .await?;
                }
            }
            self.finish(record.reply.as_deref(), true).await?;
            if revision.is_some() {
                self.forget(group, sequence).await?;
            }
            self.wake();
            return Ok(());
        }
        record.deliveries = delivery;
        record.leased_until = now + millis(config.ack_wait);
        record.given = false;
        record.due_at = 0;
        if self
            .put(group, sequence, &record, revision)
            .await?
            .is_none()
        {
            return Ok(());
        }
        for (i, event) in events.into_iter().enumerate() {
            let i = i as u32;
            if !record.done.contains(&i) {
                out.push(Delivery {
                    ack_id: ack_id(sequence, i, delivery),
                    delivery,
                    event,
                });
            }
        }
        Ok(())
    }

    /// Appends `event` to `config`'s dead-letter topic with the reason,
    /// the group and its position.
    async fn to_dead_letters(
        &self,
        config: &SubscriptionConfig,
        event: Event,
        reason: &str,
    ) -> Result<(), StoreError> {
        let mut letter = NewEvent::new(event.id, event.source, event.ty, event.data);
        letter.time = Some(event.time);
        letter.datacontenttype = event.datacontenttype;
        letter.extensions = event.extensions;
        letter
            .extensions
            .insert("deadletterreason".into(), reason.to_owned());
        letter
            .extensions
            .insert("deadlettersubscription".into(), config.name.clone());
        letter
            .extensions
            .insert("deadletterposition".into(), event.position.to_string());
        let append = Append {
            key: event.key,
            ..Append::to_topic(config.dead_letter_topic(), vec![letter])
        };
        // Refused only as a duplicate of a letter already there.
        self.topics
            .append(append)
            .await
            .map(|_| ())
            .map_err(|e| StoreError(format!("cannot dead-letter: {e}")))
    }

    /// The record of a live lease `ack_id` of group `name`, with its
    /// revision and the event's index; `None` if the lease is gone.
    async fn leased(
        &self,
        group: &Group,
        ack_id: &str,
        now: u64,
    ) -> Result<Option<(u64, u32, Record, u64)>, StoreError> {
        let Some((sequence, index, delivery)) = parse_ack_id(ack_id) else {
            return Ok(None);
        };
        let Some((value, revision)) = group.records.entry(&sequence.to_string()).await? else {
            return Ok(None);
        };
        let Some(record) = Record::from_bytes(&value) else {
            return Ok(None);
        };
        let live = record.deliveries == delivery
            && record.leased(now)
            && index < record.events
            && !record.done.contains(&index);
        Ok(live.then_some((sequence, index, record, revision)))
    }

    /// Acks deliveries of group `name`: `false` for a lease that is gone.
    pub(crate) async fn ack(
        &self,
        name: &str,
        ack_ids: &[String],
    ) -> Result<Vec<bool>, StoreError> {
        let group = self.group(name)?;
        let now = self.topics.now_millis();
        let mut out = Vec::with_capacity(ack_ids.len());
        for id in ack_ids {
            let Some((sequence, index, mut record, revision)) =
                self.leased(&group, id, now).await?
            else {
                out.push(false);
                continue;
            };
            record.done.push(index);
            if record.finished() {
                self.finish(record.reply.as_deref(), false).await?;
                self.forget(&group, sequence).await?;
                out.push(true);
                self.wake();
            } else {
                out.push(
                    self.put(&group, sequence, &record, Some(revision))
                        .await?
                        .is_some(),
                );
            }
        }
        Ok(out)
    }

    /// Settles lease `ack_id` of group `name` as `how`; `false` if it is
    /// gone.
    pub(crate) async fn settle(
        &self,
        name: &str,
        ack_id: &str,
        how: Settle,
    ) -> Result<bool, StoreError> {
        let group = self.group(name)?;
        let config = &group.config;
        let now = self.topics.now_millis();
        let Some((sequence, index, mut record, revision)) =
            self.leased(&group, ack_id, now).await?
        else {
            return Ok(false);
        };
        match how {
            Settle::Extend => {
                record.leased_until = now + millis(config.ack_wait);
                if let Some(reply) = &record.reply {
                    let _ = self
                        .topics
                        .jetstream()
                        .client()
                        .publish(reply.clone(), Bytes::from_static(b"+WPI"))
                        .await;
                }
            }
            Settle::Nack(delay) => {
                record.leased_until = 0;
                record.due_at = now
                    + delay.map_or_else(|| millis(config.backoff.after(record.deliveries)), millis);
            }
            Settle::Release(delay) => {
                record.leased_until = 0;
                record.deliveries = record.deliveries.saturating_sub(1);
                record.due_at = now + millis(delay);
            }
            Settle::DeadLetter(reason) => {
                let stream = self
                    .topics
                    .existing(&config.topic)
                    .await?
                    .ok_or_else(|| unknown(name))?;
                if let Some(events) = read_message(&stream, &config.topic, sequence).await? {
                    if let Some(event) = events.into_iter().nth(index as usize) {
                        self.to_dead_letters(config, event, &reason).await?;
                    }
                }
                record.done.push(index);
                if record.finished() {
                    self.finish(record.reply.as_deref(), true).await?;
                    self.forget(&group, sequence).await?;
                    self.wake();
                    return Ok(true);
                }
            }
        }
        let written = self
            .put(&group, sequence, &record, Some(revision))
            .await?
            .is_some();
        if written && !matches!(record.leased_until, u if u > now) {
            self.wake();
        }
        Ok(written)
    }

    /// How long until one of group `name`'s messages comes due by time.
    pub(crate) async fn next_due(&self, name: &str) -> Result<Option<Duration>, StoreError> {
        let group = self.group(name)?;
        let now = self.topics.now_millis();
        let soonest = self
            .records(&group)
            .await?
            .into_iter()
            .filter_map(|(_, r, _)| match (r.leased(now), r.leased_until > 0) {
                (true, _) => Some(r.leased_until),
                (false, true) => Some(now),
                (false, false) if r.due_at == u64::MAX => None,
                (false, false) if r.given => Some(now),
                (false, false) => Some(r.due_at),
            })
            .min();
        // A message a member pulled and died before recording has no
        // record: JetStream brings it back after its ack wait, and only a
        // fetch sees it. So a group never waits longer than that.
        let safety = u64::try_from(safety_ack_wait(&group.config).as_millis()).unwrap_or(u64::MAX);
        let at = soonest.map_or(now + safety, |at| at.min(now + safety));
        Ok(Some(Duration::from_millis(at.saturating_sub(now))))
    }

    /// Where group `name` stands.
    pub(crate) async fn status(&self, name: &str) -> Result<SubscriptionStatus, StoreError> {
        let group = self.group(name)?;
        let now = self.topics.now_millis();
        let info = group
            .consumer
            .clone()
            .info()
            .await
            .map_err(|e| failed("consumer info", e))?
            .clone();
        let records = self.records(&group).await?;
        let mut status = SubscriptionStatus::default();
        let mut pending_events = 0;
        for (_, r, _) in &records {
            let open = u64::from(r.events.saturating_sub(r.done.len() as u32));
            pending_events += open;
            if r.leased(now) {
                status.in_flight += open;
            } else if r.deliveries > 0 {
                status.redelivering += open;
            }
        }
        let stream = self.topics.existing(&group.config.topic).await?;
        let last = self.topics.last_position(&group.config.topic).await?;
        let delivered_to = match &stream {
            Some(stream) if info.delivered.stream_sequence > 0 => {
                match first_position_at_or_after(stream, info.delivered.stream_sequence).await? {
                    Some((seq, position)) if seq == info.delivered.stream_sequence => {
                        let message = stream
                            .direct_get(seq)
                            .await
                            .map_err(|e| failed("read a message", e))?;
                        position + number(&message.headers, COUNT).unwrap_or(1) - 1
                    }
                    _ => last,
                }
            }
            _ => 0,
        };
        status.cursor = delivered_to;
        status.lag = last.saturating_sub(delivered_to) + pending_events;
        let oldest = match records.first() {
            Some((sequence, _, _)) => Some(*sequence),
            None if last > delivered_to => Some(info.delivered.stream_sequence + 1),
            None => None,
        };
        if let (Some(stream), Some(sequence)) = (&stream, oldest) {
            if let Ok(message) = stream.direct_get(sequence).await {
                let at =
                    u64::try_from(message.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
                status.oldest_unfinished_age_ms = Some(now.saturating_sub(at));
            }
        }
        Ok(status)
    }

    /// Moves group `name`'s place; its taken messages are forgotten.
    pub(crate) async fn seek(&self, name: &str, to: Seek) -> Result<(), StoreError> {
        let group = self.group(name)?;
        let config = group.config.clone();
        let stream = self.topics.stream(&config.topic).await?;
        stream
            .delete_consumer(&consumer_name(name))
            .await
            .map_err(|e| failed("restart the group's consumer", e))?;
        group.records.drop_all().await?;
        match to {
            Seek::Earliest => self.open(config, DeliverPolicy::All).await?,
            Seek::Latest => self.open(config, DeliverPolicy::New).await?,
            Seek::Position(position) => {
                // From the message holding the event at `position`; its
                // events before it are finished for the group.
                let info = stream
                    .get_info()
                    .await
                    .map_err(|e| failed("stream info", e))?;
                let (first, last) = (info.state.first_sequence, info.state.last_sequence);
                let from = if last >= first && last > 0 {
                    first_message_where(&stream, first, last, |m| {
                        number(&m.headers, POSITION).unwrap_or(0)
                            + number(&m.headers, COUNT).unwrap_or(1)
                            > position
                    })
                    .await?
                } else {
                    1
                };
                self.open(
                    config.clone(),
                    DeliverPolicy::ByStartSequence {
                        start_sequence: from,
                    },
                )
                .await?;
                let message = match stream.direct_get(from).await {
                    Ok(message) => Some(message),
                    Err(e) if e.kind() == DirectGetErrorKind::NotFound => None,
                    Err(e) => return Err(failed("read where to start", e)),
                };
                if let Some(message) = message {
                    let first_position = number(&message.headers, POSITION).unwrap_or(0);
                    let count = number(&message.headers, COUNT).unwrap_or(1);
                    let done: Vec<u32> = (0..count)
                        .filter(|i| first_position + i < position)
                        .map(|i| i as u32)
                        .collect();
                    if !done.is_empty() {
                        let record = Record {
                            events: count as u32,
                            done,
                            due_at: 0,
                            ..Record::default()
                        };
                        let group = self.group(name)?;
                        self.put(&group, from, &record, None).await?;
                    }
                }
            }
        }
        self.wake();
        Ok(())
    }

    /// Puts the event at `position` back to work in group `name`, at its
    /// place, deliveries counted afresh; `false` if this store does not
    /// know the group or the event is gone.
    pub(crate) async fn redrive(&self, name: &str, position: u64) -> Result<bool, StoreError> {
        let Ok(group) = self.group(name) else {
            return Ok(false);
        };
        let Some(stream) = self.topics.existing(&group.config.topic).await? else {
            return Ok(false);
        };
        let info = stream
            .get_info()
            .await
            .map_err(|e| failed("stream info", e))?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        if last < first || last == 0 {
            return Ok(false);
        }
        let sequence = first_message_where(&stream, first, last, |m| {
            number(&m.headers, POSITION).unwrap_or(0) + number(&m.headers, COUNT).unwrap_or(1)
                > position
        })
        .await?;
        let message = match stream.direct_get(sequence).await {
            Ok(message) => message,
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(failed("read a dead letter's event", e)),
        };
        let first_position = number(&message.headers, POSITION).unwrap_or(0);
        let count = number(&message.headers, COUNT).unwrap_or(1);
        if position < first_position || position >= first_position + count {
            return Ok(false);
        }
        let index = (position - first_position) as u32;
        let place = Place {
            topic: &group.config.topic,
            position: first_position,
            version: number(&message.headers, VERSION),
        };
        let key = envelope::decode(&message.payload, place)
            .map_err(StoreError)?
            .first()
            .and_then(|e| e.key.clone());
        let now = self.topics.now_millis();
        let entry = group.records.entry(&sequence.to_string()).await?;
        let (record, revision) = match entry
            .and_then(|(value, revision)| Some((Record::from_bytes(&value)?, revision)))
        {
            // Still pending here (another of its events): this one again.
            Some((mut record, revision)) => {
                record.done.retain(|i| *i != index);
                record.deliveries = 0;
                (record, Some(revision))
            }
            None => (
                Record {
                    events: count as u32,
                    done: (0..count as u32).filter(|i| *i != index).collect(),
                    due_at: now,
                    key,
                    redriven: true,
                    ..Record::default()
                },
                None,
            ),
        };
        Ok(self
            .put(&group, sequence, &record, revision)
            .await?
            .is_some())
    }
}
