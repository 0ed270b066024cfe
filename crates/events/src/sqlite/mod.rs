//! The embedded store: one SQLite file in WAL mode, every commit synced.
//!
//! One writer thread owns the write connection. Appends queue for it;
//! it takes every append waiting, runs them in one transaction (each
//! checked against the stream as the ones before it in the group left it)
//! and commits once: concurrent publishers share a sync to disk (group
//! commit), and an append is answered only once its commit is on disk.
//! Under load the sync of one group overlaps the next group's work (see
//! [`durable`]). Reads run on connections of their own, on tokio's
//! blocking pool, and see every committed append once it is on disk.
//!
//! A topic's last position is the larger of its last event's and the one
//! the `topics` table keeps for it (written when retention deletes events,
//! not by every commit), and versions come from `streams`: neither goes
//! back when retention deletes old events. Positions are gap-free: an
//! append that stores nothing takes none. An event's row key is its
//! topic's id × 2⁴⁰ + its position ([`SPAN`]), so a topic read in order is
//! a range of the table's own key and no position index is written.
//!
//! Subscriptions (see [`subscriptions`]) go through the writer too: a
//! group's cursor and its pending events (leased or waiting) are rows, so
//! a lease outlives the consumer that held it and a restart loses nothing.
//! A commit that stores events or gives deliveries back (ack, nack,
//! dead letter, seek) bumps [`Store::changes`], which wakes waiting
//! consumers; a fetch that changes nothing of the kind does not, so a
//! consumer that finds nothing does not wake itself.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use tokio::sync::{oneshot, watch};

use crate::event::Event;
use crate::store::{
    Append, AppendError, Appended, BoxFuture, DeadLetters, Retention, Store, StoreError, Stored,
    SubscriptionStatus, TopicInfo,
};
use crate::subscription::{Delivery, Seek, SubscriptionConfig};
use crate::time::Clock;

mod durable;
mod recent;
mod subscriptions;

use self::durable::{Batch, Durable, Reply, Syncer};
use self::recent::Recent;

/// The most appends one transaction takes.
const MAX_GROUP: usize = 1024;

/// Pages the log holds before a checkpoint copies them into the database
/// (SQLite's default is 1 000): see [`SqliteStore::open`].
const WAL_PAGES: u32 = 4000;

/// Threads syncing the log, each a sync in flight (see [`durable`]).
const SYNCERS: usize = 2;

/// How often, in the store's milliseconds, retention runs by itself.
const RETAIN_EVERY: u64 = 60_000;

/// How a [`SqliteStore`] behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// An event whose id the topic saw this recently is a duplicate.
    /// Default 2 min.
    pub dedup_window: Duration,
    /// The clock of event times, the dedup window and leases (the wall
    /// clock; a manual one in tests).
    pub clock: Clock,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dedup_window: Duration::from_secs(120),
            clock: Clock::Wall,
        }
    }
}

/// Topics in one SQLite file; see the module documentation.
#[derive(Debug)]
pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    readers: Arc<Readers>,
    durable: Arc<Durable>,
    changes: watch::Receiver<u64>,
    /// The store's clock (leases are times by it).
    clock: Clock,
    /// The writer thread, joined when the store is dropped.
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for SqliteStore {
    /// Waits for the writer to finish the group under way and close the
    /// file: once the store is dropped, the same path can be opened again
    /// (a writer still closing would delete the new store's WAL file).
    fn drop(&mut self) {
        // The writer ends when its queue's last sender is gone.
        let (closed, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.jobs, closed));
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Work for the writer, run in a group's transaction.
type Job = Box<dyn Work>;

/// A job: run in a group's transaction, it returns what to answer once
/// the group is committed (or not) and the failure of the store that
/// rolls the group back, if any; or it is told the group failed before
/// it could run.
trait Work: Send {
    fn run(
        self: Box<Self>,
        tx: &Transaction<'_>,
        group: &mut Group,
    ) -> (Reply, Option<rusqlite::Error>);
    fn fail(self: Box<Self>, error: StoreError);
}

/// A closure's work and where its answer goes.
struct Op<T, F> {
    work: F,
    answer: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Work for Op<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Transaction<'_>, &mut Group) -> rusqlite::Result<T> + Send,
{
    fn run(
        self: Box<Self>,
        tx: &Transaction<'_>,
        group: &mut Group,
    ) -> (Reply, Option<rusqlite::Error>) {
        let Op { work, answer } = *self;
        let (value, failure) = match work(tx, group) {
            Ok(value) => (Some(value), None),
            Err(e) => (None, Some(e)),
        };
        let reply: Reply = Box::new(move |committed| {
            let result = committed
                .and_then(|()| value.ok_or_else(|| StoreError("event store write failed".into())));
            let _ = answer.send(result);
        });
        (reply, failure)
    }

    fn fail(self: Box<Self>, error: StoreError) {
        let _ = self.answer.send(Err(error));
    }
}

/// What the jobs of one group share.
pub(crate) struct Group {
    /// The time of the group, from the store's clock, in milliseconds.
    now: u64,
    /// Each topic's id and last position, as this group has left it.
    positions: HashMap<String, (i64, u64)>,
    /// The subscriptions' settings (shared with the writer until a job
    /// changes them).
    subscriptions: Arc<HashMap<String, Arc<SubscriptionConfig>>>,
    /// The topics' retention (the same).
    retention: Arc<HashMap<String, Retention>>,
    /// Whether consumers should look again once this group is committed.
    wake: bool,
    /// Topics this group appended to (their positions are read again if
    /// it fails).
    appended: HashSet<String>,
    /// The ids seen within the dedup window (the writer's, for the group).
    recent: Recent,
    /// The ids this group noted in `recent`, taken out again if it fails.
    noted: Vec<(u64, u64)>,
    /// `now` as RFC 3339, once it is needed.
    time_text: Option<String>,
}

impl Group {
    /// The group's time as events carry it.
    fn time_text(&mut self) -> &str {
        let now = self.now;
        self.time_text
            .get_or_insert_with(|| crate::time::rfc3339(now))
    }
}

/// Idle read connections, opened as needed.
#[derive(Debug)]
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl SqliteStore {
    /// Opens (or creates) the store in `path`; an error names the file
    /// and the reason.
    pub fn open(path: impl AsRef<Path>, options: Options) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let failed = |e: rusqlite::Error| {
            StoreError(format!(
                "cannot open the event store {}: {e}",
                path.display()
            ))
        };
        let conn = Connection::open(&path).map_err(failed)?;
        check_schema(&conn, &path)?;
        conn.execute_batch(SCHEMA).map_err(failed)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(failed)?;
        // Every statement the writer runs stays prepared (the default
        // cache of 16 would evict and parse them again).
        conn.set_prepared_statement_cache_capacity(64);
        // Checkpoints (the WAL copied into the database and synced) hold
        // up the commits behind them: one per 4 000 pages (32 MiB) rather
        // than SQLite's 1 000 makes them a quarter as frequent (with 64
        // publishers, a p99 of ~1 ms for appends where 2 000 pages gave
        // up to 7.7 ms).
        conn.pragma_update(None, "wal_autocheckpoint", WAL_PAGES)
            .map_err(failed)?;
        let page: u64 = conn
            .pragma_query_value(None, "page_size", |row| row.get::<_, i64>(0))
            .map_err(failed)?
            .try_into()
            .unwrap_or(4096);
        // The log's header, then a header and a page a frame.
        let log_length = 32 + u64::from(WAL_PAGES) * (24 + page);
        let durable = Arc::new(Durable::new(wal(&path, log_length).map_err(|e| {
            StoreError(format!(
                "cannot open the event store {}: {e}",
                path.display()
            ))
        })?));
        let syncer = Syncer::start(durable.clone(), SYNCERS)
            .map_err(|e| StoreError(format!("cannot start the event store's syncer: {e}")))?;
        let (changed, changes) = watch::channel(0);
        let dedup_window = u64::try_from(options.dedup_window.as_millis()).unwrap_or(u64::MAX);
        let recent =
            Recent::load(&conn, dedup_window, options.clock.now_millis()).map_err(failed)?;
        let clock = options.clock.clone();
        let writer = Writer {
            conn,
            clock: options.clock,
            state: State {
                recent,
                ..State::default()
            },
            retained_at: 0,
            changed,
            durable: durable.clone(),
            syncer,
        };
        let (jobs, queue) = mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("events-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| StoreError(format!("cannot start the event store's writer: {e}")))?;
        Ok(SqliteStore {
            jobs,
            writer: Some(writer),
            readers: Arc::new(Readers {
                path,
                idle: Mutex::new(Vec::new()),
            }),
            durable,
            changes,
            clock,
        })
    }

    /// Runs `work` in the writer's next group; its answer once the group
    /// is committed. An error of the store rolls the group back.
    async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>, &mut Group) -> rusqlite::Result<T> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(Op { work, answer });
        self.jobs.send(job).map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }

    /// Settles a leased delivery as `how` (see [`subscriptions::settle`]).
    fn settle<'a>(
        &'a self,
        subscription: &'a str,
        ack_id: &'a str,
        how: subscriptions::Settle,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (name, ack_id) = (subscription.to_owned(), ack_id.to_owned());
        Box::pin(async move {
            self.write(move |tx, group| subscriptions::settle(tx, group, &name, &ack_id, how))
                .await?
        })
    }

    /// Runs `query` on a read connection, on the blocking pool; its
    /// answer once all it may have seen is on disk.
    async fn reading<T, F>(&self, query: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let readers = self.readers.clone();
        let durable = self.durable.clone();
        let (result, seen) = tokio::task::spawn_blocking(move || {
            let conn = readers.take()?;
            let result =
                query(&conn).map_err(|e| StoreError(format!("event store read failed: {e}")));
            readers.put(conn);
            Ok::<_, StoreError>((result?, durable.seen()))
        })
        .await
        .map_err(|e| StoreError(format!("event store read failed: {e}")))??;
        self.durable.settled(seen).await?;
        Ok(result)
    }
}

impl Readers {
    fn take(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(conn);
        }
        let conn = Connection::open_with_flags(
            &self.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| {
            StoreError(format!(
                "cannot read the event store {}: {e}",
                self.path.display()
            ))
        })?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(|e| StoreError(e.to_string()))?;
        Ok(conn)
    }

    fn put(&self, conn: Connection) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
    }
}

/// The store's write-ahead log (SQLite made it when it opened the file in
/// WAL mode), for [`Durable`] to sync.
///
/// The log is made as long as it grows between checkpoints, with zeros
/// written past its end (never over what it holds). SQLite writes it
/// again from the start after each checkpoint, so its commits overwrite
/// blocks the file already has: a sync then writes data alone, where
/// one that grows the file also commits the file system's journal (the
/// first 1 300 appends of a new store cost a third more each without
/// this). PostgreSQL fills its log segments with zeros for the same
/// reason. Zeros are no frames to SQLite: a frame counts only with the
/// log's salt and checksum. The directory is synced so the log's name
/// is on disk too.
fn wal(path: &Path, length: u64) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::FileExt;

    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    let wal = std::fs::OpenOptions::new().write(true).open(name)?;
    let mut end = wal.metadata()?.len();
    if end < length {
        let zeros = vec![0u8; 1 << 20];
        while end < length {
            let n = usize::try_from(length - end).map_or(zeros.len(), |n| n.min(zeros.len()));
            wal.write_all_at(&zeros[..n], end)?;
            end += n as u64;
        }
        wal.sync_all()?;
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()?;
    Ok(wal)
}

/// The error of a store whose writer is gone.
fn stopped() -> StoreError {
    StoreError("the event store's writer has stopped".into())
}

/// The version of [`SCHEMA`], kept in the file's `user_version`.
const SCHEMA_VERSION: i64 = 1;

/// Refuses a file made by another version of the schema, naming it (a
/// new file, with no table yet, is taken).
fn check_schema(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let failed = |e: rusqlite::Error| {
        StoreError(format!(
            "cannot open the event store {}: {e}",
            path.display()
        ))
    };
    let tables: i64 = conn
        .query_row("SELECT COUNT(*) FROM sqlite_master", [], |row| row.get(0))
        .map_err(failed)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(failed)?;
    if tables > 0 && version != SCHEMA_VERSION {
        return Err(StoreError(format!(
            "cannot open the event store {}: its schema is version {version}, \
             this build of tidegate reads version {SCHEMA_VERSION}",
            path.display()
        )));
    }
    Ok(())
}

/// Pages of 8 KiB hold seven events of 1 KiB where pages of 4 KiB hold
/// three: a sixth fewer bytes to write and sync an event, and half the
/// pages a commit writes (measured: 64 publishers ~90k -> ~100k appends/s
/// before `seq` replaced the position index).
const SCHEMA: &str = "
PRAGMA page_size = 8192;
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
PRAGMA busy_timeout = 5000;
CREATE TABLE IF NOT EXISTS topics (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    last_position INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS streams (
    topic TEXT NOT NULL,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (topic, key)
);
-- seq: the topic's id × 2^40 + the position (see SPAN).
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    position INTEGER NOT NULL,
    id TEXT NOT NULL,
    key TEXT,
    version INTEGER,
    source TEXT NOT NULL,
    type TEXT NOT NULL,
    time TEXT NOT NULL,
    datacontenttype TEXT,
    data BLOB NOT NULL,
    extensions TEXT,
    appended_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_by_key ON events (topic, key, version) WHERE key IS NOT NULL;
DROP INDEX IF EXISTS events_by_id;
CREATE TABLE IF NOT EXISTS subscriptions (
    name TEXT PRIMARY KEY,
    topic TEXT NOT NULL,
    cursor INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (
    subscription TEXT NOT NULL,
    position INTEGER NOT NULL,
    key TEXT,
    deliveries INTEGER NOT NULL,
    available_at INTEGER NOT NULL,
    leased_until INTEGER,
    PRIMARY KEY (subscription, position)
);
CREATE TABLE IF NOT EXISTS redrives (
    topic TEXT PRIMARY KEY,
    cursor INTEGER NOT NULL
);
";

/// The write connection and what it knows between groups.
struct Writer {
    conn: Connection,
    clock: Clock,
    /// What each group is lent.
    state: State,
    /// When retention last ran, by the store's clock.
    retained_at: u64,
    /// Bumped after commits that wake consumers.
    changed: watch::Sender<u64>,
    /// Where groups go to be synced and answered.
    durable: Arc<Durable>,
    syncer: Syncer,
}

/// What the writer knows between groups, lent to each.
#[derive(Default)]
struct State {
    /// The ids seen within the dedup window.
    recent: Recent,
    /// Each topic's id and last position, as committed.
    positions: HashMap<String, (i64, u64)>,
    /// The subscriptions' settings.
    subscriptions: Arc<HashMap<String, Arc<SubscriptionConfig>>>,
    /// The topics' retention.
    retention: Arc<HashMap<String, Retention>>,
}

impl State {
    /// Lends itself to a group at `now`: nothing is copied.
    fn lend(&mut self, now: u64) -> Group {
        let mut recent = std::mem::take(&mut self.recent);
        recent.expire(now);
        Group {
            now,
            positions: std::mem::take(&mut self.positions),
            subscriptions: self.subscriptions.clone(),
            retention: self.retention.clone(),
            wake: false,
            appended: HashSet::new(),
            recent,
            noted: Vec::new(),
            time_text: None,
        }
    }

    /// Takes back what it lent `group`: as the group left it if it was
    /// `committed`, else without its changes.
    fn take_back(&mut self, mut group: Group, committed: bool) {
        if committed {
            self.subscriptions = group.subscriptions;
            self.retention = group.retention;
        } else {
            // Positions it moved are read again from the table; the ids it
            // noted were never stored.
            for topic in &group.appended {
                group.positions.remove(topic);
            }
            for (hash, position) in group.noted.drain(..) {
                group.recent.remove(hash, position);
            }
        }
        self.positions = group.positions;
        self.recent = group.recent;
    }
}

impl Writer {
    fn run(mut self, queue: mpsc::Receiver<Job>) {
        // A job taken while looking for more work, for the next group.
        let mut next = None;
        loop {
            let first = match next.take() {
                Some(job) => job,
                None => match queue.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            let mut jobs = vec![first];
            while jobs.len() < MAX_GROUP {
                match queue.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            let batch = self.commit(jobs);
            next = queue.try_recv().ok();
            self.syncer.settle(batch, next.is_some());
            // Retention by itself, at most once a minute of the store's clock.
            let now = self.clock.now_millis();
            if !self.state.retention.is_empty()
                && now.saturating_sub(self.retained_at) >= RETAIN_EVERY
            {
                self.retained_at = now;
                // Nobody waits for its answer: the receiver is dropped.
                let sweep: Job = Box::new(Op {
                    work: |tx: &Transaction<'_>, group: &mut Group| retain_all(tx, group),
                    answer: oneshot::channel().0,
                });
                let batch = self.commit(vec![sweep]);
                self.syncer.settle(batch, next.is_some());
            }
        }
        // Every group answered before the file is closed.
        let Writer { conn, syncer, .. } = self;
        drop(syncer);
        drop(conn);
    }

    /// Runs `jobs` in one transaction and commits it; the answers, to be
    /// sent once the commit is synced. A failure of the store rolls the
    /// whole group back and fails every job: nothing of it was stored.
    ///
    /// The group works on the writer's own state, lent to it (nothing is
    /// copied per group); a group that fails gives back what it changed.
    fn commit(&mut self, jobs: Vec<Job>) -> Batch {
        let seq = self.durable.begin();
        let failed = |jobs: Vec<Job>, error: StoreError| {
            for job in jobs {
                job.fail(error.clone());
            }
            Batch {
                seq,
                outcome: Err(error),
                replies: Vec::new(),
            }
        };
        if let Some(error) = self.durable.failed() {
            return failed(jobs, error);
        }
        let mut group = self.state.lend(self.clock.now_millis());
        let begun = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate);
        let tx = match begun {
            Ok(tx) => tx,
            Err(e) => {
                self.state.take_back(group, false);
                return failed(jobs, StoreError(format!("event store write failed: {e}")));
            }
        };
        let mut replies = Vec::with_capacity(jobs.len());
        let mut failure = None;
        for job in jobs {
            let (reply, failed) = job.run(&tx, &mut group);
            replies.push(reply);
            failure = failure.or(failed);
        }
        let outcome = match failure {
            None => tx.commit(),
            Some(e) => {
                drop(tx); // rolls back
                Err(e)
            }
        };
        let committed = outcome.is_ok();
        if committed && group.wake {
            self.changed.send_modify(|n| *n += 1);
        }
        self.state.take_back(group, committed);
        Batch {
            seq,
            outcome: outcome.map_err(|e| StoreError(format!("event store write failed: {e}"))),
            replies,
        }
    }
}

/// One append within the group's transaction: its answer, or a store
/// failure that aborts the group.
pub(crate) fn apply(
    tx: &Transaction<'_>,
    append: &Append,
    group: &mut Group,
) -> rusqlite::Result<Result<Appended, AppendError>> {
    let now = group.now;
    if let Some(why) = append.problem() {
        return Ok(Err(AppendError::Invalid(why)));
    }
    let topic = append.topic.as_str();
    // Duplicates (seen within the window) keep the answer of the append
    // that stored them.
    let mut earlier = Vec::with_capacity(append.events.len());
    let mut hashes = Vec::with_capacity(append.events.len());
    for event in &append.events {
        let hash = recent::hash(topic, &event.id);
        hashes.push(hash);
        let mut stored = None;
        for position in group.recent.candidates(hash) {
            if let Some((id, version)) = recent::stored(tx, topic, position)? {
                if id == event.id {
                    stored = Some((position, version));
                    break;
                }
            }
        }
        earlier.push(stored);
    }
    if earlier.iter().all(Option::is_some) {
        let events = append
            .events
            .iter()
            .zip(earlier)
            .map(|(event, stored)| {
                let (position, version) = stored.expect("all are duplicates");
                Stored {
                    id: event.id.clone(),
                    position,
                    version,
                    duplicate: true,
                }
            })
            .collect();
        return Ok(Ok(Appended { events }));
    }
    let actual = match &append.key {
        Some(key) => tx
            .prepare_cached("SELECT version FROM streams WHERE topic = ?1 AND key = ?2")?
            .query_row(params![topic, key], |row| row.get::<_, i64>(0))
            .optional()?
            .map(unsql),
        None => None,
    };
    if !append.expected.is_met_by(actual) {
        return Ok(Err(AppendError::Conflict {
            expected: append.expected,
            actual,
        }));
    }
    let (topic_id, mut position) = match group.positions.get(topic) {
        Some(&known) => known,
        None => {
            // Its first append since the store opened: the topic's row
            // (made now if it is new). Forgotten again if the group fails.
            group.appended.insert(topic.to_owned());
            let last = last_position(tx, group, topic)?;
            keep_position(tx, topic, last)?;
            let id = tx
                .prepare_cached("SELECT id FROM topics WHERE name = ?1")?
                .query_row(params![topic], |row| row.get::<_, i64>(0))?;
            (id, last)
        }
    };
    // The store's time for events that bring none: formatted once a group.
    let group_time = group.time_text().to_owned();
    let mut version = actual.unwrap_or(0);
    let mut insert = tx.prepare_cached(
        "INSERT INTO events (seq, topic, position, id, key, version, source, type, time, \
         datacontenttype, data, extensions, appended_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?;
    let mut stored = Vec::with_capacity(append.events.len());
    for ((event, earlier), hash) in append.events.iter().zip(earlier).zip(hashes) {
        if let Some((position, version)) = earlier {
            stored.push(Stored {
                id: event.id.clone(),
                position,
                version,
                duplicate: true,
            });
            continue;
        }
        position += 1;
        let event_version = append.key.as_ref().map(|_| {
            version += 1;
            version
        });
        let time = event.time.as_deref().unwrap_or(&group_time);
        let extensions = extensions_column(&event.extensions);
        insert.execute(params![
            seq(topic_id, position),
            topic,
            sql(position),
            event.id,
            append.key,
            event_version.map(sql),
            event.source,
            event.ty,
            time,
            event.datacontenttype,
            event.data,
            extensions,
            sql(now),
        ])?;
        group.recent.insert(hash, position, now);
        group.noted.push((hash, position));
        stored.push(Stored {
            id: event.id.clone(),
            position,
            version: event_version,
            duplicate: false,
        });
    }
    group
        .positions
        .insert(topic.to_owned(), (topic_id, position));
    if !group.appended.contains(topic) {
        group.appended.insert(topic.to_owned());
    }
    group.wake = true;
    if let Some(key) = &append.key {
        tx.prepare_cached(
            "INSERT INTO streams (topic, key, version) VALUES (?1, ?2, ?3) \
             ON CONFLICT (topic, key) DO UPDATE SET version = excluded.version",
        )?
        .execute(params![topic, key, sql(version)])?;
    }
    Ok(Ok(Appended { events: stored }))
}

/// The position of `topic`'s last event as `group` has left it so far
/// (0: none).
fn last_position(tx: &Transaction<'_>, group: &Group, topic: &str) -> rusqlite::Result<u64> {
    if let Some(&(_, last)) = group.positions.get(topic) {
        return Ok(last);
    }
    let last = tx
        .prepare_cached(&format!("SELECT {}", last_position_sql("?1")))?
        .query_row(params![topic], |row| row.get::<_, i64>(0))?;
    Ok(unsql(last))
}

/// SQL for the last position of the topic named by `topic` (a parameter
/// or a column): the larger of its last event's and the one `topics`
/// keeps for it since retention deleted its last events.
fn last_position_sql(topic: &str) -> String {
    format!(
        "MAX(COALESCE((SELECT last_position FROM topics WHERE name = {topic}), 0), \
         COALESCE((SELECT position FROM events WHERE {} ORDER BY seq DESC LIMIT 1), 0))",
        in_topic(topic, ">", "0")
    )
}

/// Positions a topic has room for: its events are the rows whose `seq`
/// is its id times this plus their position, so a topic's events in
/// position order are a range of the table's own key (no index to keep
/// beside the rows, none to write with every commit).
const SPAN: i64 = 1 << 40;

/// The `seq` of `topic_id`'s event at `position`.
fn seq(topic_id: i64, position: u64) -> i64 {
    topic_id.saturating_mul(SPAN).saturating_add(sql(position))
}

/// SQL for the `seq` of the event at `position` of the topic named by
/// `topic` (both SQL: parameters or columns); NULL for an unknown topic.
pub(crate) fn seq_sql(topic: &str, position: &str) -> String {
    format!("((SELECT id FROM topics WHERE name = {topic}) * {SPAN} + {position})")
}

/// SQL for the events of the topic named by `topic` whose position is
/// `op` (`>` or `>=`) `from`.
pub(crate) fn in_topic(topic: &str, op: &str, from: &str) -> String {
    format!(
        "seq {op} {} AND seq < {}",
        seq_sql(topic, from),
        seq_sql(topic, &SPAN.to_string())
    )
}

/// Keeps `last` as `topic`'s last position whatever is deleted (a topic's
/// first append also makes its row, for [`Recent::load`]).
fn keep_position(tx: &Transaction<'_>, topic: &str, last: u64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO topics (name, last_position) VALUES (?1, ?2) \
         ON CONFLICT (name) DO UPDATE SET last_position = MAX(last_position, excluded.last_position)",
    )?
    .execute(params![topic, sql(last)])?;
    Ok(())
}

/// Deletes what each topic's retention says is past keeping; the count.
fn retain_all(tx: &Transaction<'_>, group: &mut Group) -> rusqlite::Result<u64> {
    let mut deleted = 0;
    for retention in group.retention.values() {
        let topic = retention.topic.as_str();
        let mut cutoff = 0;
        if let Some(max_events) = retention.max_events {
            cutoff = last_position(tx, group, topic)?.saturating_sub(max_events);
        }
        if let Some(max_age) = retention.max_age {
            let before = group
                .now
                .saturating_sub(u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX));
            // Append times rise with positions: the last position older
            // than the cut is found from the front, a page at a time.
            let mut oldest = tx.prepare_cached(&format!(
                "SELECT position, appended_at FROM events WHERE {} ORDER BY seq LIMIT 1000",
                in_topic("?1", ">", "?2")
            ))?;
            let mut from = cutoff;
            'scan: loop {
                let page: Vec<(u64, u64)> = oldest
                    .query_map(params![topic, sql(from)], |row| {
                        Ok((unsql(row.get(0)?), unsql(row.get(1)?)))
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                if page.is_empty() {
                    break;
                }
                for (position, appended_at) in page {
                    if appended_at >= before {
                        break 'scan;
                    }
                    from = position;
                }
            }
            cutoff = cutoff.max(from);
        }
        if cutoff > 0 {
            keep_position(tx, topic, last_position(tx, group, topic)?)?;
            deleted += tx
                .prepare_cached(&format!(
                    "DELETE FROM events WHERE {} AND seq <= {}",
                    in_topic("?1", ">", "0"),
                    seq_sql("?1", "?2")
                ))?
                .execute(params![topic, sql(cutoff)])? as u64;
        }
    }
    Ok(deleted)
}

/// A count as SQLite's signed integer.
fn sql(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A count back from SQLite (never negative as this store writes them).
fn unsql(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The columns every read selects, in `event`'s order.
const COLUMNS: &str =
    "topic, position, key, version, id, source, type, time, datacontenttype, data, extensions";

/// Extension attributes as their column holds them: JSON, or NULL for none.
pub(crate) fn extensions_column(extensions: &BTreeMap<String, String>) -> Option<String> {
    (!extensions.is_empty()).then(|| serde_json::to_string(extensions).expect("strings serialize"))
}

/// Extension attributes back from column `index` of `row`.
pub(crate) fn extensions_from(
    row: &rusqlite::Row<'_>,
    index: usize,
) -> rusqlite::Result<BTreeMap<String, String>> {
    match row.get::<_, Option<String>>(index)? {
        Some(text) => serde_json::from_str(&text).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(
                index,
                rusqlite::types::Type::Text,
                Box::new(e),
            )
        }),
        None => Ok(BTreeMap::new()),
    }
}

fn event(row: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    let extensions = extensions_from(row, 10)?;
    Ok(Event {
        topic: row.get(0)?,
        position: unsql(row.get(1)?),
        key: row.get(2)?,
        version: row.get::<_, Option<i64>>(3)?.map(unsql),
        id: row.get(4)?,
        source: row.get(5)?,
        ty: row.get(6)?,
        time: row.get(7)?,
        datacontenttype: row.get(8)?,
        data: row.get(9)?,
        extensions,
    })
}

impl Store for SqliteStore {
    fn append(&self, append: Append) -> BoxFuture<'_, Result<Appended, AppendError>> {
        Box::pin(async move {
            self.write(move |tx, group| apply(tx, &append, group))
                .await?
        })
    }

    fn read<'a>(
        &'a self,
        topic: &'a str,
        from_position: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Event>, StoreError>> {
        let topic = topic.to_owned();
        Box::pin(self.reading(move |conn| {
            let mut query = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM events WHERE {} ORDER BY seq LIMIT ?3",
                in_topic("?1", ">=", "?2")
            ))?;
            let rows =
                query.query_map(params![topic, sql(from_position), sql(limit as u64)], event)?;
            rows.collect()
        }))
    }

    fn read_stream<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
        from_version: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Event>, StoreError>> {
        let (topic, key) = (topic.to_owned(), key.to_owned());
        Box::pin(self.reading(move |conn| {
            let mut query = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM events WHERE topic = ?1 AND key = ?2 AND version >= ?3 \
                 ORDER BY version LIMIT ?4"
            ))?;
            let rows = query.query_map(
                params![topic, key, sql(from_version), sql(limit as u64)],
                event,
            )?;
            rows.collect()
        }))
    }

    fn last_position<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        let topic = topic.to_owned();
        Box::pin(self.reading(move |conn| {
            let last = conn
                .prepare_cached(&format!("SELECT {}", last_position_sql("?1")))?
                .query_row(params![topic], |row| row.get::<_, i64>(0))?;
            Ok(unsql(last))
        }))
    }

    fn retain<'a>(&'a self, retention: Retention) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.write(move |_, group| {
            Arc::make_mut(&mut group.retention).insert(retention.topic.clone(), retention);
            Ok(())
        }))
    }

    fn enforce_retention(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(self.write(retain_all))
    }

    fn subscribe(&self, config: SubscriptionConfig) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.write(move |tx, group| subscriptions::subscribe(tx, group, config))
                .await?
        })
    }

    fn fetch<'a>(
        &'a self,
        subscription: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, StoreError>> {
        let name = subscription.to_owned();
        Box::pin(async move {
            self.write(move |tx, group| subscriptions::fetch(tx, group, &name, max))
                .await?
        })
    }

    fn ack<'a>(
        &'a self,
        subscription: &'a str,
        ack_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<bool>, StoreError>> {
        let (name, ack_ids) = (subscription.to_owned(), ack_ids.to_vec());
        Box::pin(async move {
            self.write(move |tx, group| subscriptions::ack(tx, group, &name, &ack_ids))
                .await?
        })
    }

    fn nack<'a>(
        &'a self,
        subscription: &'a str,
        ack_id: &'a str,
        delay: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let delay = delay.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.settle(subscription, ack_id, subscriptions::Settle::Nack(delay))
    }

    fn release<'a>(
        &'a self,
        subscription: &'a str,
        ack_id: &'a str,
        delay: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let delay = delay.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.settle(subscription, ack_id, subscriptions::Settle::Release(delay))
    }

    fn extend<'a>(
        &'a self,
        subscription: &'a str,
        ack_id: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.settle(subscription, ack_id, subscriptions::Settle::Extend)
    }

    fn dead_letter<'a>(
        &'a self,
        subscription: &'a str,
        ack_id: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let how = subscriptions::Settle::DeadLetter(reason.to_owned());
        self.settle(subscription, ack_id, how)
    }

    fn redrive<'a>(
        &'a self,
        dead_letter_topic: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let topic = dead_letter_topic.to_owned();
        Box::pin(self.write(move |tx, group| subscriptions::redrive(tx, group, &topic, limit)))
    }

    fn seek<'a>(
        &'a self,
        subscription: &'a str,
        to: Seek,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let name = subscription.to_owned();
        Box::pin(async move {
            self.write(move |tx, group| subscriptions::seek(tx, group, &name, to))
                .await?
        })
    }

    fn next_due<'a>(
        &'a self,
        subscription: &'a str,
    ) -> BoxFuture<'a, Result<Option<Duration>, StoreError>> {
        let name = subscription.to_owned();
        Box::pin(async move {
            let millis = self
                .write(move |tx, group| subscriptions::next_due(tx, group, &name))
                .await??;
            Ok(millis.map(Duration::from_millis))
        })
    }

    fn lag<'a>(&'a self, subscription: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        let name = subscription.to_owned();
        Box::pin(self.reading(move |conn| {
            let lag = conn
                .prepare_cached(&format!(
                    "SELECT {} - s.cursor \
                     + (SELECT COUNT(*) FROM pending WHERE subscription = s.name) \
                     FROM subscriptions s WHERE s.name = ?1",
                    last_position_sql("s.topic")
                ))?
                .query_row(params![name], |row| row.get::<_, i64>(0))
                .optional()?;
            Ok(lag.map_or(0, unsql))
        }))
    }

    fn topics(&self) -> BoxFuture<'_, Result<Vec<TopicInfo>, StoreError>> {
        Box::pin(self.reading(move |conn| {
            let mut query = conn.prepare_cached(&format!(
                "SELECT t.name, \
                 (SELECT position FROM events WHERE {} ORDER BY seq LIMIT 1), {} \
                 FROM topics t ORDER BY t.name",
                in_topic("t.name", ">", "0"),
                last_position_sql("t.name"),
            ))?;
            let rows = query.query_map([], |row| {
                Ok(TopicInfo {
                    name: row.get(0)?,
                    first_position: row.get::<_, Option<i64>>(1)?.map(unsql),
                    last_position: unsql(row.get(2)?),
                })
            })?;
            rows.collect()
        }))
    }

    fn dead_letters<'a>(
        &'a self,
        dead_letter_topic: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<DeadLetters, StoreError>> {
        let topic = dead_letter_topic.to_owned();
        Box::pin(self.reading(move |conn| {
            let cursor = conn
                .prepare_cached("SELECT cursor FROM redrives WHERE topic = ?1")?
                .query_row(params![topic], |row| row.get::<_, i64>(0))
                .optional()?
                .unwrap_or(0);
            let last = conn
                .prepare_cached(&format!("SELECT {}", last_position_sql("?1")))?
                .query_row(params![topic], |row| row.get::<_, i64>(0))?;
            let oldest = conn
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM events WHERE {} ORDER BY seq LIMIT ?3",
                    in_topic("?1", ">", "?2")
                ))?
                .query_map(params![topic, cursor, sql(limit as u64)], event)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(DeadLetters {
                waiting: unsql(last.saturating_sub(cursor)),
                oldest,
            })
        }))
    }

    fn subscription_status<'a>(
        &'a self,
        subscription: &'a str,
    ) -> BoxFuture<'a, Result<SubscriptionStatus, StoreError>> {
        let name = subscription.to_owned();
        let now = self.clock.now_millis();
        Box::pin(async move {
            let status = self
                .reading(move |conn| {
                    conn.prepare_cached(&format!(
                        "SELECT s.cursor, \
                         {last} - s.cursor + (SELECT COUNT(*) FROM pending WHERE subscription = s.name), \
                         (SELECT COUNT(*) FROM pending WHERE subscription = s.name \
                            AND leased_until IS NOT NULL AND leased_until > ?2), \
                         (SELECT COUNT(*) FROM pending WHERE subscription = s.name AND deliveries > 0 \
                            AND (leased_until IS NULL OR leased_until <= ?2)), \
                         COALESCE( \
                           (SELECT MIN(e.appended_at) FROM pending p JOIN events e \
                              ON e.seq = {seq} WHERE p.subscription = s.name), \
                           (SELECT appended_at FROM events WHERE {after} ORDER BY seq LIMIT 1)) \
                         FROM subscriptions s WHERE s.name = ?1",
                        last = last_position_sql("s.topic"),
                        seq = seq_sql("s.topic", "p.position"),
                        after = in_topic("s.topic", ">", "s.cursor"),
                    ))?
                    .query_row(params![name, sql(now)], |row| {
                        Ok(SubscriptionStatus {
                            cursor: unsql(row.get(0)?),
                            lag: unsql(row.get(1)?),
                            in_flight: unsql(row.get(2)?),
                            redelivering: unsql(row.get(3)?),
                            oldest_unfinished_age_ms: row
                                .get::<_, Option<i64>>(4)?
                                .map(|at| now.saturating_sub(unsql(at))),
                        })
                    })
                    .optional()
                })
                .await?;
            status.ok_or_else(|| {
                StoreError(format!("there is no subscription named `{subscription}`"))
            })
        })
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}
