//! Each topic's writer: one task per topic in this process that stores
//! the topic's appends in order, with up to [`IN_FLIGHT`] messages on
//! their way to the server at once.
//!
//! Every message is published with `Nats-Expected-Last-Sequence`, the
//! sequence its position and version were computed from, and (past the
//! first of a run) `Nats-Expected-Last-Msg-Id`, the id of the message
//! this writer sent just before it. Message ids are this writer's own and
//! never sent twice, so the server stores a message only if the one
//! before it in the run is the stream's last: when one is refused
//! (another replica appended in between), every later one of the run is
//! refused too, and nothing is stored on a stale computation. The writer
//! then reads what the others stored and computes those appends again.
//! Answers come back in order; an append is answered when the server has
//! stored its message.

use std::collections::{HashMap, VecDeque};
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use async_nats::header::{
    HeaderMap, NATS_EXPECTED_LAST_MESSAGE_ID, NATS_EXPECTED_LAST_SEQUENCE, NATS_MESSAGE_ID,
};
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use tidegate_events::{Append, AppendError, Appended, Clock, NewEvent, StoreError, Stored};
use tokio::sync::{mpsc, oneshot};

use crate::envelope::{self, Place, COUNT, POSITION, VERSION};
use crate::names;
use crate::topics::{after, failed, key_version, millis_of, number, NatsTopics};

/// Messages one writer has on their way to the server at most.
const IN_FLIGHT: usize = 128;

/// Times an append is computed again after other writers got in first.
const RETRIES: usize = 64;

/// How often ids older than the dedup window are forgotten.
const PRUNE_EVERY: u64 = 1_000;

/// Keys whose versions are remembered before the memory is emptied (a
/// key not remembered is read from the server when it is next appended to).
const VERSIONS_KEPT: usize = 65_536;

/// An append waiting for its answer.
pub(crate) struct Pending {
    append: Append,
    reply: oneshot::Sender<Result<Appended, AppendError>>,
    tries: usize,
}

impl Pending {
    pub(crate) fn new(append: Append) -> (Self, oneshot::Receiver<Result<Appended, AppendError>>) {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            append,
            reply,
            tries: 0,
        };
        (pending, answer)
    }

    fn answer(self, result: Result<Appended, AppendError>) {
        // The caller may have gone: the append stands all the same.
        let _ = self.reply.send(result);
    }
}

type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, PublishError>> + Send>>;

/// A message sent and not yet answered by the server.
struct Sent {
    pending: Pending,
    ack: AckFuture,
    answer: Appended,
    /// The stream's last sequence and next position once it is stored.
    after: (u64, u64),
    /// The ids it stores, with their positions and versions.
    ids: Vec<(String, u64, Option<u64>)>,
    /// Its key and the key's version once it is stored.
    key: Option<(String, u64)>,
}

/// Starts `topic`'s writer; it ends when every sender is dropped and its
/// last message is answered.
pub(crate) fn spawn(topics: NatsTopics, topic: &str) -> mpsc::UnboundedSender<Pending> {
    let (sender, receiver) = mpsc::unbounded_channel();
    let nonce = topics.jetstream().client().new_inbox();
    let writer = Writer {
        topics,
        topic: topic.to_owned(),
        nonce,
        sent_count: 0,
        stream: None,
        seen: HashMap::new(),
        versions: HashMap::new(),
        loaded: false,
        last_known: None,
        pruned_at: 0,
        last: None,
        last_id: None,
        ahead_seen: HashMap::new(),
        ahead_versions: HashMap::new(),
        in_flight: VecDeque::new(),
        broken: false,
        again: Vec::new(),
        queue: VecDeque::new(),
    };
    tokio::spawn(writer.run(receiver));
    sender
}

struct Writer {
    /// The topics (without the map of writers, so that dropping the store
    /// ends this task).
    topics: NatsTopics,
    topic: String,
    /// Makes this writer's message ids unique.
    nonce: String,
    sent_count: u64,
    stream: Option<Stream>,
    // What the server has confirmed, as of `last_known`:
    /// Ids stored within the dedup window: position, version, when stored
    /// (milliseconds).
    seen: HashMap<String, (u64, Option<u64>, u64)>,
    /// Keys' versions (a key not here is read when needed).
    versions: HashMap<String, Option<u64>>,
    /// Whether `seen` was loaded from the stream.
    loaded: bool,
    /// The stream's last sequence and next position.
    last_known: Option<(u64, u64)>,
    pruned_at: u64,
    // The same with the messages in flight counted as stored:
    /// `None`: read the stream again before the next message.
    last: Option<(u64, u64)>,
    /// The id of the message at `last`, when this writer sent it.
    last_id: Option<String>,
    ahead_seen: HashMap<String, (u64, Option<u64>)>,
    ahead_versions: HashMap<String, Option<u64>>,
    in_flight: VecDeque<Sent>,
    /// A message in flight was refused: the ones after it will be too;
    /// nothing more is sent until they are all answered.
    broken: bool,
    /// Appends whose messages were refused, to compute again, in order.
    again: Vec<Pending>,
    queue: VecDeque<Pending>,
}

enum Step {
    Acked(Result<PublishAck, PublishError>),
    Arrived(Option<Pending>),
}

impl Writer {
    async fn run(mut self, mut arrivals: mpsc::UnboundedReceiver<Pending>) {
        let mut open = true;
        loop {
            while let Ok(pending) = arrivals.try_recv() {
                self.queue.push_back(pending);
            }
            self.send_queued().await;
            let room = open && !self.broken && self.in_flight.len() < IN_FLIGHT;
            let Some(head) = self.in_flight.front_mut() else {
                if !self.queue.is_empty() {
                    continue;
                }
                if !open {
                    return;
                }
                match arrivals.recv().await {
                    Some(pending) => self.queue.push_back(pending),
                    None => open = false,
                }
                continue;
            };
            let step = tokio::select! {
                biased;
                acked = &mut head.ack => Step::Acked(acked),
                arrived = arrivals.recv(), if room => Step::Arrived(arrived),
            };
            match step {
                Step::Acked(acked) => self.settle(acked),
                Step::Arrived(Some(pending)) => self.queue.push_back(pending),
                Step::Arrived(None) => open = false,
            }
        }
    }

    /// Sends what is queued, as far as the window allows.
    async fn send_queued(&mut self) {
        if self.broken {
            if !self.in_flight.is_empty() {
                return;
            }
            // Every message of the broken run is answered: compute the
            // refused ones again after reading what others stored.
            for pending in self.again.drain(..).rev() {
                self.queue.push_front(pending);
            }
            self.ahead_seen.clear();
            self.ahead_versions.clear();
            self.last = None;
            self.last_id = None;
            self.broken = false;
        }
        while self.in_flight.len() < IN_FLIGHT && !self.broken {
            let Some(pending) = self.queue.pop_front() else {
                return;
            };
            if let Err(e) = self.prepare().await {
                pending.answer(Err(AppendError::Store(e.clone())));
                for pending in self.queue.drain(..) {
                    pending.answer(Err(AppendError::Store(e.clone())));
                }
                return;
            }
            self.send(pending).await;
        }
    }

    /// Opens the stream and reads its end, when that is needed.
    async fn prepare(&mut self) -> Result<(), StoreError> {
        self.topics.connected()?;
        if self.stream.is_none() {
            let stream = self.topics.stream(&self.topic).await?;
            self.topics.genesis(&self.topic).await?;
            self.stream = Some(stream);
        }
        if self.last.is_none() {
            self.catch_up().await?;
        }
        Ok(())
    }

    /// An id's position and version if it is stored or on its way.
    fn earlier(&self, id: &str) -> Option<(u64, Option<u64>)> {
        self.ahead_seen
            .get(id)
            .copied()
            .or_else(|| self.seen.get(id).map(|&(p, v, _)| (p, v)))
    }

    /// Answers `pending` at once (duplicates, a conflict) or sends its
    /// message.
    async fn send(&mut self, pending: Pending) {
        let append = &pending.append;
        let (last_seq, position) = self.last.expect("prepared");
        let stream = self.stream.clone().expect("prepared");
        // Duplicates (ids stored within the window) keep the answer of the
        // append that stored them; the rest is stored.
        let earlier: Vec<Option<(u64, Option<u64>)>> =
            append.events.iter().map(|e| self.earlier(&e.id)).collect();
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
            return pending.answer(Ok(Appended { events }));
        }
        let subject = names::subject(&self.topic, append.key.as_deref());
        let actual = match &append.key {
            Some(key) => match self.ahead_versions.get(key).or(self.versions.get(key)) {
                Some(version) => *version,
                None => match key_version(&stream, &subject).await {
                    Ok(version) => {
                        if self.versions.len() >= VERSIONS_KEPT {
                            self.versions.clear();
                        }
                        self.versions.insert(key.clone(), version);
                        version
                    }
                    Err(e) => return pending.answer(Err(AppendError::Store(e))),
                },
            },
            None => None,
        };
        if !append.expected.is_met_by(actual) {
            let expected = append.expected;
            return pending.answer(Err(AppendError::Conflict { expected, actual }));
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
        self.sent_count += 1;
        let id = format!("{}.{}", self.nonce, self.sent_count);
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, id.as_str());
        headers.insert(NATS_EXPECTED_LAST_SEQUENCE, last_seq.to_string().as_str());
        if let Some(previous) = &self.last_id {
            headers.insert(NATS_EXPECTED_LAST_MESSAGE_ID, previous.as_str());
        }
        headers.insert(POSITION, position.to_string().as_str());
        headers.insert(COUNT, count.to_string().as_str());
        if let Some(version) = version {
            headers.insert(VERSION, version.to_string().as_str());
        }
        let payload = envelope::encode(
            append.key.as_deref(),
            &new,
            &self.topics.clock_now_rfc3339(),
        );
        let ack = match self
            .topics
            .jetstream()
            .publish_with_headers(subject, headers, payload)
            .await
        {
            Ok(ack) => ack.into_future(),
            Err(e) => {
                // Not sent: what follows must not count on it.
                self.broken = true;
                return pending.answer(Err(AppendError::Store(failed("cannot publish", e))));
            }
        };
        let mut ids = Vec::with_capacity(new.len());
        let mut events = Vec::with_capacity(append.events.len());
        let mut place = 0;
        for (e, seen) in append.events.iter().zip(&earlier) {
            events.push(match seen {
                Some((position, version)) => Stored {
                    id: e.id.clone(),
                    position: *position,
                    version: *version,
                    duplicate: true,
                },
                None => {
                    let stored = Stored {
                        id: e.id.clone(),
                        position: position + place,
                        version: version.map(|v| v + place),
                        duplicate: false,
                    };
                    place += 1;
                    ids.push((e.id.clone(), stored.position, stored.version));
                    stored
                }
            });
        }
        for (id, position, version) in &ids {
            self.ahead_seen.insert(id.clone(), (*position, *version));
        }
        let key = append
            .key
            .clone()
            .zip(version.map(|first| first + count - 1));
        if let Some((key, version)) = &key {
            self.ahead_versions.insert(key.clone(), Some(*version));
        }
        let after = (last_seq + 1, position + count);
        self.last = Some(after);
        self.last_id = Some(id);
        self.in_flight.push_back(Sent {
            pending,
            ack,
            answer: Appended { events },
            after,
            ids,
            key,
        });
    }

    /// Takes the server's answer to the oldest message in flight.
    fn settle(&mut self, acked: Result<PublishAck, PublishError>) {
        let sent = self.in_flight.pop_front().expect("a message in flight");
        match acked {
            Ok(ack) if !ack.duplicate => {
                // Stored where it was computed for (the run's checks).
                if !self.broken {
                    let at = Clock::Wall.now_millis();
                    for (id, position, version) in sent.ids {
                        self.seen.insert(id, (position, version, at));
                    }
                    if let Some((key, version)) = sent.key {
                        self.versions.insert(key, Some(version));
                    }
                    self.last_known = Some(sent.after);
                    if self.in_flight.is_empty() {
                        self.ahead_seen.clear();
                        self.ahead_versions.clear();
                    }
                    self.prune(at);
                }
                // Past a refusal (a message that timed out, and was stored
                // after all) this one is still right: the server checked
                // the one before it. The catch up reads both.
                sent.pending.answer(Ok(sent.answer));
            }
            Ok(_) => {
                // Its id was stored already: never sent twice, so this
                // cannot be; read the stream and compute it again.
                self.broken = true;
                self.again.push(sent.pending);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId
                ) =>
            {
                self.broken = true;
                let mut pending = sent.pending;
                pending.tries += 1;
                if pending.tries >= RETRIES {
                    let why = format!(
                        "topic `{}` changed under this append {RETRIES} times in a row",
                        self.topic
                    );
                    pending.answer(Err(AppendError::Store(StoreError(why))));
                } else {
                    self.again.push(pending);
                }
            }
            Err(e) => {
                // Not known to be stored (a timeout may have been): the
                // caller sends it again, and its ids make it a duplicate
                // if it was.
                self.broken = true;
                let e = failed("the server refused", e);
                sent.pending.answer(Err(AppendError::Store(e)));
            }
        }
    }

    /// Forgets ids stored before the dedup window, once a second.
    fn prune(&mut self, now: u64) {
        if now.saturating_sub(self.pruned_at) < PRUNE_EVERY {
            return;
        }
        self.pruned_at = now;
        let since = now.saturating_sub(window_millis(self.topics.dedup_window()));
        self.seen.retain(|_, (_, _, at)| *at >= since);
    }

    /// Brings the confirmed state up to the stream's last message: the
    /// first time, the ids of the dedup window read from the stream's end
    /// backwards; after that, the messages stored since (by other writers,
    /// and by this one past a refusal).
    async fn catch_up(&mut self) -> Result<(), StoreError> {
        let stream = self.stream.clone().expect("opened");
        let info = stream
            .get_info()
            .await
            .map_err(|e| failed("stream info", e))?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let since = Clock::Wall
            .now_millis()
            .saturating_sub(window_millis(self.topics.dedup_window()));
        if !self.loaded {
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
                for e in self.decode(&message)? {
                    self.seen
                        .entry(e.id.clone())
                        .or_insert((e.position, e.version, at));
                    if let Some(key) = &e.key {
                        self.versions.entry(key.clone()).or_insert(e.version);
                    }
                }
                sequence -= 1;
            }
            self.loaded = true;
        } else if let Some((known, _)) = self.last_known {
            for sequence in (known + 1).max(first)..=last {
                let message = match stream.direct_get(sequence).await {
                    Ok(message) => message,
                    Err(e) if e.kind() == DirectGetErrorKind::NotFound => continue,
                    Err(e) => return Err(failed("read what other writers stored", e)),
                };
                let at = millis_of(&message);
                for e in self.decode(&message)? {
                    self.seen.insert(e.id.clone(), (e.position, e.version, at));
                    if let Some(key) = &e.key {
                        self.versions.insert(key.clone(), e.version);
                    }
                }
            }
        }
        self.seen.retain(|_, (_, _, at)| *at >= since);
        // From the same `last` as what was read: a message stored since
        // is refused the next append's expected sequence, and read then.
        let next = after(&stream, last).await?;
        self.last = Some(next);
        self.last_known = Some(next);
        Ok(())
    }

    fn decode(
        &self,
        message: &async_nats::jetstream::message::StreamMessage,
    ) -> Result<Vec<tidegate_events::Event>, StoreError> {
        let place = Place {
            topic: &self.topic,
            position: number(&message.headers, POSITION).unwrap_or(0),
            version: number(&message.headers, VERSION),
        };
        envelope::decode(&message.payload, place).map_err(StoreError)
    }
}

fn window_millis(window: Duration) -> u64 {
    u64::try_from(window.as_millis()).unwrap_or(u64::MAX)
}
