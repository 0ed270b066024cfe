//! Topics on JetStream: appends (dedup, exact expected versions, atomic
//! batches, gap-free positions) and reads. See the crate documentation
//! for the mapping.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::{HeaderMap, NATS_EXPECTED_LAST_SEQUENCE, NATS_MESSAGE_ID};
use async_nats::jetstream::context::{Context, PublishErrorKind};
use async_nats::jetstream::stream::{Config, DirectGetErrorKind, Stream};
use futures_util::StreamExt;
use tidegate_events::{
    Append, AppendError, Appended, Clock, Event, NewEvent, Retention, StoreError, Stored, TopicInfo,
};
use tokio::sync::Mutex;

use crate::envelope::{self, Place, COUNT, POSITION, VERSION};
use crate::names;

/// Most events one append may hold (one message holds them all).
pub const MAX_BATCH: usize = 1000;

/// The message id of every stream's first message.
const GENESIS: &str = "tidegate-genesis";

/// How long connecting may take before the store gives up.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// How long a JetStream request may wait for its answer.
const REQUEST_WAIT: Duration = Duration::from_secs(2);

/// Times an append is tried again after another writer got in first.
const RETRIES: usize = 64;

/// Topics on a JetStream server.
#[derive(Clone)]
pub struct NatsTopics {
    js: Context,
    dedup_window: Duration,
    /// Copies of each stream a cluster keeps (1 on a single server).
    replicas: usize,
    /// Each topic's writer state, one append at a time per topic here.
    writers: Arc<std::sync::Mutex<HashMap<String, Arc<Mutex<Writer>>>>>,
    /// Topics' retention, as this process was told (every replica is
    /// told the same by its config).
    retention: Arc<std::sync::Mutex<HashMap<String, Retention>>>,
    clock: Clock,
}

impl std::fmt::Debug for NatsTopics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTopics")
            .field("dedup_window", &self.dedup_window)
            .finish_non_exhaustive()
    }
}

/// What this process knows of a topic's stream since it last read it.
#[derive(Default)]
struct Writer {
    stream: Option<Stream>,
    /// The stream's last sequence, and the position the next append
    /// takes, as last read or written here; `None`: read them again.
    last: Option<(u64, u64)>,
    /// Keys' versions as of `last` (a key not here is read when needed).
    versions: HashMap<String, Option<u64>>,
    /// The ids stored within the dedup window, as of `last`: each with its
    /// position, version and when it was stored (server milliseconds).
    seen: HashMap<String, (u64, Option<u64>, u64)>,
    /// Whether `seen` was loaded from the stream.
    loaded: bool,
    /// The stream's last sequence and next position as of the last catch
    /// up or own append (kept when `last` is cleared).
    last_known: Option<(u64, u64)>,
}

impl Writer {
    /// Notes the events of one message stored at `at` (milliseconds).
    fn note(&mut self, events: &[Event], at: u64) {
        for e in events {
            self.seen.insert(e.id.clone(), (e.position, e.version, at));
            if let Some(key) = &e.key {
                self.versions.insert(key.clone(), e.version);
            }
        }
    }
}

/// A stream message's time, in milliseconds.
fn millis_of(message: &async_nats::jetstream::message::StreamMessage) -> u64 {
    u64::try_from(message.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

pub(crate) fn failed(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("NATS JetStream: {what}: {e}"))
}

/// A header as a number.
pub(crate) fn number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.as_str().parse().ok()
}

impl NatsTopics {
    /// Topics on the server(s) at `url` (comma-separated), an event id
    /// seen within `dedup_window` being a duplicate.
    pub async fn connect(url: &str, dedup_window: Duration) -> Result<Self, StoreError> {
        Self::connect_with(url, dedup_window, None).await
    }

    /// [`connect`](Self::connect) with `credentials`: `user:password`, or
    /// a token (never logged).
    pub async fn connect_with(
        url: &str,
        dedup_window: Duration,
        credentials: Option<&str>,
    ) -> Result<Self, StoreError> {
        let servers = url
            .split(',')
            .map(|one| one.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| failed(&format!("`{url}` is not a list of server URLs"), e))?;
        // Once connected, the client reconnects by itself; meanwhile calls
        // fail at once (see `connected`).
        let mut options = async_nats::ConnectOptions::new();
        options = match credentials {
            Some(both) if both.contains(':') => {
                let (user, password) = both.split_once(':').expect("checked");
                options.user_and_password(user.to_owned(), password.to_owned())
            }
            Some(token) => options.token(token.to_owned()),
            None => options,
        };
        let client = tokio::time::timeout(CONNECT_WAIT, options.connect(servers))
            .await
            .map_err(|_| StoreError(format!("NATS JetStream: no server answered at {url}")))?
            .map_err(|e| failed(&format!("cannot connect to {url}"), e))?;
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(REQUEST_WAIT)
            .build(client);
        Ok(NatsTopics {
            js,
            dedup_window,
            replicas: 1,
            writers: Arc::default(),
            retention: Arc::default(),
            clock: Clock::Wall,
        })
    }

    /// Reads the time from `clock` (a manual one in tests).
    #[must_use]
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Streams made from now on keep `replicas` copies (3 on a cluster of
    /// three: a stream survives the loss of one node).
    #[must_use]
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas.max(1);
        self
    }

    fn writer(&self, topic: &str) -> Arc<Mutex<Writer>> {
        self.writers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(topic.to_owned())
            .or_default()
            .clone()
    }

    /// `topic`'s stream, created if it is new.
    pub(crate) async fn stream(&self, topic: &str) -> Result<Stream, StoreError> {
        self.js
            .get_or_create_stream(Config {
                name: names::stream(topic),
                subjects: vec![names::all_subjects(topic)],
                duplicate_window: self.dedup_window,
                num_replicas: self.replicas,
                allow_direct: true,
                ..Config::default()
            })
            .await
            .map_err(|e| failed(&format!("cannot open the stream of topic `{topic}`"), e))
    }

    /// Makes sure `topic`'s stream holds its first message, which holds no
    /// event: JetStream checks an expected last sequence only when it is
    /// above 0, so an empty stream could take two first appends at once.
    /// Every writer publishes it with the same message id: the server
    /// keeps one.
    async fn genesis(&self, topic: &str) -> Result<(), StoreError> {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, GENESIS);
        headers.insert(POSITION, "1");
        headers.insert(COUNT, "0");
        let empty = envelope::encode(None, &[], "");
        match self
            .js
            .publish_with_headers(names::genesis(topic), headers, empty)
            .await
            .map_err(|e| failed("cannot publish", e))?
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => Err(failed("cannot start the topic's stream", e)),
        }
    }

    /// `topic`'s stream if it has one.
    pub(crate) async fn existing(&self, topic: &str) -> Result<Option<Stream>, StoreError> {
        self.connected()?;
        match self.js.get_stream(names::stream(topic)).await {
            Ok(stream) => Ok(Some(stream)),
            Err(e)
                if matches!(
                    e.kind(),
                    async_nats::jetstream::context::GetStreamErrorKind::JetStream(inner)
                        if inner.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(failed("cannot read a stream", e)),
        }
    }

    /// An error at once when the connection to the server is down (it
    /// comes back by itself): nothing waits for a server that is away.
    pub(crate) fn connected(&self) -> Result<(), StoreError> {
        match self.js.client().connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            _ => Err(StoreError(
                "NATS JetStream is unreachable; try again shortly".into(),
            )),
        }
    }

    /// Stores `append`'s events (see the crate documentation).
    pub async fn append(&self, append: Append) -> Result<Appended, AppendError> {
        self.connected()?;
        if let Some(why) = append.problem() {
            return Err(AppendError::Invalid(why));
        }
        if append.events.len() > MAX_BATCH {
            return Err(AppendError::Invalid(format!(
                "a batch holds at most {MAX_BATCH} events on NATS"
            )));
        }
        let writer = self.writer(&append.topic);
        let mut writer = writer.lock().await;
        if writer.stream.is_none() {
            let stream = self.stream(&append.topic).await?;
            self.genesis(&append.topic).await?;
            writer.stream = Some(stream);
        }
        let subject = names::subject(&append.topic, append.key.as_deref());
        let time = self.clock.now_rfc3339();
        for _ in 0..RETRIES {
            let stream = writer.stream.clone().expect("opened above");
            if writer.last.is_none() {
                self.catch_up(&mut writer, &stream, &append.topic).await?;
            }
            let (last_seq, position) = writer.last.expect("caught up");
            // Duplicates (ids stored within the window) keep the answer of
            // the append that stored them; the rest is stored.
            let earlier: Vec<Option<(u64, Option<u64>)>> = append
                .events
                .iter()
                .map(|e| writer.seen.get(&e.id).map(|&(p, v, _)| (p, v)))
                .collect();
            if earlier.iter().all(Option::is_some) {
                let events = append
                    .events
                    .iter()
                    .zip(&earlier)
                    .map(|(e, seen)| {
                        let (position, version) = seen.expect("all seen");
                        Stored {
                            id: e.id.clone(),
                            position,
                            version,
                            duplicate: true,
                        }
                    })
                    .collect();
                return Ok(Appended { events });
            }
            let actual = match &append.key {
                Some(key) => match writer.versions.get(key) {
                    Some(version) => *version,
                    None => {
                        let version = key_version(&stream, &subject).await?;
                        writer.versions.insert(key.clone(), version);
                        version
                    }
                },
                None => None,
            };
            if !append.expected.is_met_by(actual) {
                return Err(AppendError::Conflict {
                    expected: append.expected,
                    actual,
                });
            }
            let new: Vec<NewEvent> = append
                .events
                .iter()
                .zip(&earlier)
                .filter(|(_, seen)| seen.is_none())
                .map(|(e, _)| e.clone())
                .collect();
            let count = new.len() as u64;
            let version = append.key.as_ref().map(|_| actual.unwrap_or(0) + 1);
            let mut headers = HeaderMap::new();
            headers.insert(NATS_MESSAGE_ID, new[0].id.as_str());
            headers.insert(NATS_EXPECTED_LAST_SEQUENCE, last_seq.to_string().as_str());
            headers.insert(POSITION, position.to_string().as_str());
            headers.insert(COUNT, count.to_string().as_str());
            if let Some(version) = version {
                headers.insert(VERSION, version.to_string().as_str());
            }
            let payload = envelope::encode(append.key.as_deref(), &new, &time);
            let sent = self
                .js
                .publish_with_headers(subject.clone(), headers, payload)
                .await
                .map_err(|e| failed("cannot publish", e))?
                .await;
            match sent {
                Ok(ack) if ack.duplicate => {
                    // Past this process's window but within the server's.
                    return self
                        .stored_at(&append, &stream, ack.sequence)
                        .await
                        .map_err(AppendError::Store);
                }
                Ok(ack) => {
                    let at = Clock::Wall.now_millis();
                    let mut new_place = 0;
                    let mut events = Vec::with_capacity(append.events.len());
                    for (e, seen) in append.events.iter().zip(&earlier) {
                        let stored = match seen {
                            Some((position, version)) => Stored {
                                id: e.id.clone(),
                                position: *position,
                                version: *version,
                                duplicate: true,
                            },
                            None => {
                                let stored = Stored {
                                    id: e.id.clone(),
                                    position: position + new_place,
                                    version: version.map(|v| v + new_place),
                                    duplicate: false,
                                };
                                new_place += 1;
                                writer
                                    .seen
                                    .insert(e.id.clone(), (stored.position, stored.version, at));
                                stored
                            }
                        };
                        events.push(stored);
                    }
                    if let (Some(key), Some(first)) = (&append.key, version) {
                        writer.versions.insert(key.clone(), Some(first + count - 1));
                    }
                    writer.last = Some((ack.sequence, position + count));
                    writer.last_known = writer.last;
                    return Ok(Appended { events });
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    // Another writer got in first: read what it stored.
                    writer.last = None;
                }
                Err(e) => return Err(AppendError::Store(failed("the server refused", e))),
            }
        }
        Err(AppendError::Store(StoreError(format!(
            "topic `{}` changed under this append {RETRIES} times in a row",
            append.topic
        ))))
    }

    /// Brings `writer` up to the stream's last message: the first time,
    /// the ids of the dedup window read from the stream's end backwards;
    /// after that, the messages other writers stored since.
    async fn catch_up(
        &self,
        writer: &mut Writer,
        stream: &Stream,
        topic: &str,
    ) -> Result<(), StoreError> {
        let info = stream
            .get_info()
            .await
            .map_err(|e| failed("stream info", e))?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let window = u64::try_from(self.dedup_window.as_millis()).unwrap_or(u64::MAX);
        let since = Clock::Wall.now_millis().saturating_sub(window);
        if !writer.loaded {
            let mut sequence = last;
            while sequence >= first.max(1) {
                // Deleted (retention): the window starts after it. Any other
                // failure fails the append: an id or a version missed here
                // would let a duplicate or a stale version through.
                let message = match stream.direct_get(sequence).await {
                    Ok(message) => message,
                    Err(e) if e.kind() == DirectGetErrorKind::NotFound => break,
                    Err(e) => return Err(failed("read the topic's recent ids", e)),
                };
                let at = millis_of(&message);
                if at < since {
                    break;
                }
                let place = Place {
                    topic,
                    position: number(&message.headers, POSITION).unwrap_or(0),
                    version: number(&message.headers, VERSION),
                };
                for e in envelope::decode(&message.payload, place).map_err(StoreError)? {
                    writer
                        .seen
                        .entry(e.id.clone())
                        .or_insert((e.position, e.version, at));
                    if let Some(key) = &e.key {
                        writer.versions.entry(key.clone()).or_insert(e.version);
                    }
                }
                sequence -= 1;
            }
            writer.loaded = true;
        } else if let Some((known, _)) = writer.last_known {
            for sequence in (known + 1).max(first)..=last {
                let message = match stream.direct_get(sequence).await {
                    Ok(message) => message,
                    Err(e) if e.kind() == DirectGetErrorKind::NotFound => continue,
                    Err(e) => return Err(failed("read what other writers stored", e)),
                };
                let at = millis_of(&message);
                let place = Place {
                    topic,
                    position: number(&message.headers, POSITION).unwrap_or(0),
                    version: number(&message.headers, VERSION),
                };
                let events = envelope::decode(&message.payload, place).map_err(StoreError)?;
                writer.note(&events, at);
            }
        }
        writer.seen.retain(|_, (_, _, at)| *at >= since);
        let next = last_of(stream).await?;
        writer.last = Some(next);
        writer.last_known = Some(next);
        Ok(())
    }

    /// The events stored at `sequence`, answered as duplicates of `append`.
    async fn stored_at(
        &self,
        append: &Append,
        stream: &Stream,
        sequence: u64,
    ) -> Result<Appended, StoreError> {
        let events = read_message(stream, &append.topic, sequence)
            .await?
            .ok_or_else(|| StoreError("the duplicate's original is gone".into()))?;
        Ok(Appended {
            events: events
                .into_iter()
                .map(|e| Stored {
                    id: e.id,
                    position: e.position,
                    version: e.version,
                    duplicate: true,
                })
                .collect(),
        })
    }

    /// Up to `limit` events of `topic` from `from_position` on.
    pub async fn read(
        &self,
        topic: &str,
        from_position: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let Some(stream) = self.existing(topic).await? else {
            return Ok(Vec::new());
        };
        let info = stream
            .get_info()
            .await
            .map_err(|e| failed("stream info", e))?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        if last == 0 || first > last {
            return Ok(Vec::new());
        }
        // The message holding `from_position`: positions grow with
        // sequences, so a binary search over the stream finds it.
        let (mut low, mut high) = (first, last);
        while low < high {
            let middle = low + (high - low).div_ceil(2);
            match first_position_at_or_after(&stream, middle).await? {
                Some((_, position)) if position <= from_position => low = middle,
                _ => high = middle - 1,
            }
        }
        let mut out = Vec::new();
        let mut sequence = low;
        while out.len() < limit && sequence <= last {
            if let Some(events) = read_message(&stream, topic, sequence).await? {
                out.extend(
                    events
                        .into_iter()
                        .filter(|e| e.position >= from_position)
                        .take(limit - out.len()),
                );
            }
            sequence += 1;
        }
        Ok(out)
    }

    /// Up to `limit` events of `key`'s stream in `topic` from version
    /// `from_version` on.
    pub async fn read_stream(
        &self,
        topic: &str,
        key: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let Some(stream) = self.existing(topic).await? else {
            return Ok(Vec::new());
        };
        let subject = names::subject(topic, Some(key));
        let mut out = Vec::new();
        let mut sequence = 1;
        while out.len() < limit {
            let message = match stream
                .direct_get_next_for_subject(subject.as_str(), Some(sequence))
                .await
            {
                Ok(message) => message,
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(failed("read a key's stream", e)),
            };
            sequence = message.sequence + 1;
            let place = Place {
                topic,
                position: number(&message.headers, POSITION).unwrap_or(0),
                version: number(&message.headers, VERSION),
            };
            let events = envelope::decode(&message.payload, place).map_err(StoreError)?;
            out.extend(
                events
                    .into_iter()
                    .filter(|e| e.version.is_some_and(|v| v >= from_version))
                    .take(limit - out.len()),
            );
        }
        Ok(out)
    }

    /// The position of `topic`'s last event (0: none yet).
    pub async fn last_position(&self, topic: &str) -> Result<u64, StoreError> {
        match self.existing(topic).await? {
            Some(stream) => Ok(last_of(&stream).await?.1 - 1),
            None => Ok(0),
        }
    }
}

impl NatsTopics {
    /// Every topic that has a stream, by name.
    pub async fn topics(&self) -> Result<Vec<TopicInfo>, StoreError> {
        let mut names = self.js.stream_names();
        let mut topics = Vec::new();
        while let Some(name) = names.next().await {
            let name = name.map_err(|e| failed("list the streams", e))?;
            let Some(topic) = names::topic_of(&name) else {
                continue;
            };
            let stream = self
                .js
                .get_stream(&name)
                .await
                .map_err(|e| failed("read a stream", e))?;
            let info = stream
                .get_info()
                .await
                .map_err(|e| failed("stream info", e))?;
            let next = last_of(&stream).await?.1;
            let first = match first_position_at_or_after(&stream, info.state.first_sequence).await?
            {
                Some((_, position)) if position < next => Some(position),
                _ => None,
            };
            topics.push(TopicInfo {
                name: topic,
                first_position: first,
                last_position: next - 1,
            });
        }
        topics.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(topics)
    }

    /// Sets `retention.topic`'s retention, applied by
    /// [`enforce_retention`](Self::enforce_retention).
    pub fn retain(&self, retention: Retention) {
        self.retention
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(retention.topic.clone(), retention);
    }

    /// Deletes (purges) what every topic's retention says is past keeping;
    /// how many events went. A topic's last append is always kept: it
    /// carries the position the next one takes, which JetStream's own
    /// sequences cannot tell.
    pub async fn enforce_retention(&self) -> Result<u64, StoreError> {
        let retention: Vec<Retention> = self
            .retention
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut deleted = 0;
        for r in retention {
            let Some(stream) = self.existing(&r.topic).await? else {
                continue;
            };
            let info = stream
                .get_info()
                .await
                .map_err(|e| failed("stream info", e))?;
            let (first, last) = (info.state.first_sequence, info.state.last_sequence);
            if last <= first {
                continue;
            }
            let next = last_of(&stream).await?.1;
            let mut cut = first;
            if let Some(max_events) = r.max_events {
                // The first message holding an event the limit keeps.
                let keep_from = (next - 1).saturating_sub(max_events) + 1;
                cut = cut.max(
                    first_message_where(&stream, first, last, |m| {
                        number(&m.headers, POSITION).unwrap_or(0)
                            + number(&m.headers, COUNT).unwrap_or(1)
                            > keep_from
                    })
                    .await?,
                );
            }
            if let Some(max_age) = r.max_age {
                let now = self.clock.now_millis();
                let before =
                    now.saturating_sub(u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX));
                cut = cut.max(
                    first_message_where(&stream, first, last, |m| {
                        u64::try_from(m.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
                            >= before
                    })
                    .await?,
                );
            }
            let cut = cut.min(last);
            if cut <= first {
                continue;
            }
            let from = first_position_at_or_after(&stream, first)
                .await?
                .map_or(0, |p| p.1);
            let to = first_position_at_or_after(&stream, cut)
                .await?
                .map_or(from, |p| p.1);
            stream
                .purge()
                .sequence(cut)
                .await
                .map_err(|e| failed("delete old events", e))?;
            deleted += to.saturating_sub(from);
        }
        Ok(deleted)
    }
}

/// The first sequence in `first..=last` whose message `keep` holds for
/// (it holds for every later one too); `last` if none before it does.
pub(crate) async fn first_message_where(
    stream: &Stream,
    first: u64,
    last: u64,
    keep: impl Fn(&async_nats::jetstream::message::StreamMessage) -> bool,
) -> Result<u64, StoreError> {
    let (mut low, mut high) = (first, last);
    while low < high {
        let middle = low + (high - low) / 2;
        let message = stream
            .direct_get(middle)
            .await
            .map_err(|e| failed("read a message", e))?;
        if keep(&message) {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    Ok(low)
}

/// The stream's last sequence and the position the next append takes.
async fn last_of(stream: &Stream) -> Result<(u64, u64), StoreError> {
    let info = stream
        .get_info()
        .await
        .map_err(|e| failed("stream info", e))?;
    let last = info.state.last_sequence;
    if last == 0 {
        return Ok((0, 1));
    }
    let message = stream
        .direct_get(last)
        .await
        .map_err(|e| failed("read the stream's last append", e))?;
    let position = number(&message.headers, POSITION).unwrap_or(0);
    let count = number(&message.headers, COUNT).unwrap_or(1);
    Ok((last, position + count))
}

/// The version of the last event on `subject` (a key's), if any.
async fn key_version(stream: &Stream, subject: &str) -> Result<Option<u64>, StoreError> {
    match stream.direct_get_last_for_subject(subject).await {
        Ok(message) => {
            let first = number(&message.headers, VERSION).unwrap_or(0);
            let count = number(&message.headers, COUNT).unwrap_or(1);
            Ok(Some(first + count - 1))
        }
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(failed("read a key's version", e)),
    }
}

/// The sequence and first position of the first message at or after
/// `sequence` (retention may have deleted some).
pub(crate) async fn first_position_at_or_after(
    stream: &Stream,
    sequence: u64,
) -> Result<Option<(u64, u64)>, StoreError> {
    match stream.direct_get(sequence).await {
        Ok(message) => Ok(Some((
            message.sequence,
            number(&message.headers, POSITION).unwrap_or(0),
        ))),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(failed("read a message", e)),
    }
}

/// The events of the message at `sequence`, if it is there.
pub(crate) async fn read_message(
    stream: &Stream,
    topic: &str,
    sequence: u64,
) -> Result<Option<Vec<Event>>, StoreError> {
    let message = match stream.direct_get(sequence).await {
        Ok(message) => message,
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(failed("read a message", e)),
    };
    let place = Place {
        topic,
        position: number(&message.headers, POSITION).unwrap_or(0),
        version: number(&message.headers, VERSION),
    };
    envelope::decode(&message.payload, place)
        .map(Some)
        .map_err(StoreError)
}

impl NatsTopics {
    /// The JetStream context.
    pub(crate) fn jetstream(&self) -> &Context {
        &self.js
    }

    /// Copies kept of each stream.
    pub(crate) fn replica_count(&self) -> usize {
        self.replicas
    }

    /// The clock of leases, delays and event times.
    pub(crate) fn now_millis(&self) -> u64 {
        self.clock.now_millis()
    }
}
