//! Topics on JetStream: appends (dedup, exact expected versions, atomic
//! batches, gap-free positions) and reads. See the crate documentation
//! for the mapping.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::{HeaderMap, NATS_MESSAGE_ID};
use async_nats::jetstream::context::{Context, PublishErrorKind};
use async_nats::jetstream::stream::{Config, DirectGetErrorKind, Stream};
use futures_util::StreamExt;
use tidegate_events::{
    Append, AppendError, Appended, Clock, Event, Retention, StoreError, TopicInfo,
};
use tokio::sync::mpsc;

use crate::envelope::{self, Place, COUNT, POSITION, VERSION};
use crate::names;
use crate::writer::{self, Pending};

/// Most events one append may hold (one message holds them all).
pub const MAX_BATCH: usize = 1000;

/// The message id of every stream's first message.
const GENESIS: &str = "tidegate-genesis";

/// How long connecting may take before the store gives up.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// How long a JetStream request may wait for its answer.
const REQUEST_WAIT: Duration = Duration::from_secs(2);

/// Topics on a JetStream server.
#[derive(Clone)]
pub struct NatsTopics {
    js: Context,
    dedup_window: Duration,
    /// Copies of each stream a cluster keeps (1 on a single server).
    replicas: usize,
    /// Each topic's writer (see [`writer`](crate::writer)).
    writers: Arc<std::sync::Mutex<HashMap<String, mpsc::UnboundedSender<Pending>>>>,
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

/// A stream message's time, in milliseconds.
pub(crate) fn millis_of(message: &async_nats::jetstream::message::StreamMessage) -> u64 {
    u64::try_from(message.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

pub(crate) fn failed(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("NATS JetStream: {what}: {e}"))
}

/// How to reach the servers besides their URLs (a `tls://` URL asks for
/// TLS by itself, with the system's roots).
#[derive(Debug, Default, Clone, Copy)]
pub struct Access<'a> {
    /// `user:password`, or a token (never logged).
    pub credentials: Option<&'a str>,
    /// TLS with a private CA or a client certificate.
    pub tls: Option<&'a NatsTls>,
}

/// TLS files (PEM) for servers with `tls { … }`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// The CA the servers' certificates chain to; default: the system's
    /// roots.
    pub ca: Option<std::path::PathBuf>,
    /// A certificate chain and its key, for servers that verify clients.
    pub client: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// A header as a number.
pub(crate) fn number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.as_str().parse().ok()
}

impl NatsTopics {
    /// Topics on the server(s) at `url` (comma-separated), an event id
    /// seen within `dedup_window` being a duplicate.
    pub async fn connect(url: &str, dedup_window: Duration) -> Result<Self, StoreError> {
        Self::connect_with(url, dedup_window, &Access::default()).await
    }

    /// [`connect`](Self::connect) with credentials and TLS.
    pub async fn connect_with(
        url: &str,
        dedup_window: Duration,
        access: &Access<'_>,
    ) -> Result<Self, StoreError> {
        let servers = url
            .split(',')
            .map(|one| one.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| failed(&format!("`{url}` is not a list of server URLs"), e))?;
        // Once connected, the client reconnects by itself; meanwhile calls
        // fail at once (see `connected`).
        let mut options = async_nats::ConnectOptions::new();
        if let Some(tls) = access.tls {
            options = options.require_tls(true);
            if let Some(ca) = &tls.ca {
                options = options.add_root_certificates(ca.clone());
            }
            if let Some((cert, key)) = &tls.client {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
        }
        options = match access.credentials {
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

    /// Hands `pending` to its topic's writer, started if need be.
    fn hand_over(&self, topic: &str, pending: Pending) {
        let mut writers = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        let pending = match writers.get(topic) {
            Some(writer) => match writer.send(pending) {
                Ok(()) => return,
                Err(refused) => refused.0,
            },
            None => pending,
        };
        // The writer's own clone holds no writers: dropping the store
        // drops every sender, and each writer ends.
        let detached = NatsTopics {
            writers: Arc::default(),
            ..self.clone()
        };
        let writer = writer::spawn(detached, topic);
        let _ = writer.send(pending);
        writers.insert(topic.to_owned(), writer);
    }

    /// The window within which an event id is a duplicate.
    pub(crate) fn dedup_window(&self) -> Duration {
        self.dedup_window
    }

    /// Now, as an event's time.
    pub(crate) fn clock_now_rfc3339(&self) -> String {
        self.clock.now_rfc3339()
    }

    /// `topic`'s stream, created if it is new.
    pub(crate) async fn stream(&self, topic: &str) -> Result<Stream, StoreError> {
        let made = self
            .js
            .get_or_create_stream(Config {
                name: names::stream(topic),
                subjects: vec![names::all_subjects(topic)],
                duplicate_window: self.dedup_window,
                num_replicas: self.replicas,
                allow_direct: true,
                ..Config::default()
            })
            .await;
        match made {
            Ok(stream) => Ok(stream),
            // Another replica made it between our look and our create (the
            // server says its subjects overlap ours): it is there now.
            Err(e) => match self.existing(topic).await {
                Ok(Some(stream)) => Ok(stream),
                _ => Err(failed(
                    &format!("cannot open the stream of topic `{topic}`"),
                    e,
                )),
            },
        }
    }

    /// Makes sure `topic`'s stream holds its first message, which holds no
    /// event: JetStream checks an expected last sequence only when it is
    /// above 0, so an empty stream could take two first appends at once.
    /// Every writer publishes it with the same message id: the server
    /// keeps one.
    ///
    /// A stream another replica has just made may not take messages yet:
    /// the server answers "no stream" (no responders) until its own
    /// subscription to the subjects is in place. The stream is looked up
    /// again between tries, a few at most.
    pub(crate) async fn genesis(&self, topic: &str) -> Result<(), StoreError> {
        const TRIES: u32 = 5;
        let empty = envelope::encode(None, &[], "");
        let mut tried = 0;
        loop {
            tried += 1;
            let mut headers = HeaderMap::new();
            headers.insert(NATS_MESSAGE_ID, GENESIS);
            headers.insert(POSITION, "1");
            headers.insert(COUNT, "0");
            match self
                .js
                .publish_with_headers(names::genesis(topic), headers, empty.clone())
                .await
                .map_err(|e| failed("cannot publish", e))?
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound && tried < TRIES => {
                    if self.existing(topic).await?.is_none() {
                        return Err(failed("cannot start the topic's stream", e));
                    }
                }
                Err(e) => return Err(failed("cannot start the topic's stream", e)),
            }
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
        let topic = append.topic.clone();
        let (pending, answer) = Pending::new(append);
        self.hand_over(&topic, pending);
        answer.await.unwrap_or_else(|_| {
            Err(AppendError::Store(StoreError(
                "the topic's writer stopped".into(),
            )))
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
    after(stream, info.state.last_sequence).await
}

/// `last` (a stream's last sequence) and the position the append after
/// it takes.
pub(crate) async fn after(stream: &Stream, last: u64) -> Result<(u64, u64), StoreError> {
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
pub(crate) async fn key_version(stream: &Stream, subject: &str) -> Result<Option<u64>, StoreError> {
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
