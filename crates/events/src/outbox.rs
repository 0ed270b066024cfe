//! A transactional outbox for services that keep their own state in
//! SQLite: an event is enqueued in the same transaction as the change it
//! describes, so both are stored or neither is; a [`Relay`] then appends
//! the enqueued events to a [`Store`], oldest first, and deletes each once
//! the store has answered. A relay that dies between the two sends the
//! event again on restart, with the same id: the store's dedup window
//! makes that harmless. The reference's `appendEvents` published after its
//! commit and lost the event in a crash between the two; this cannot.
//!
//! ```
//! use std::sync::Arc;
//! use tidegate_events::{outbox, NewEvent, SqliteStore, Store};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # let dir = std::env::temp_dir().join(format!("tidegate-outbox-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! // The service's own database, and its change with its event.
//! let mut db = rusqlite::Connection::open(dir.join("service.db")).unwrap();
//! outbox::create(&db).unwrap();
//! db.execute_batch("CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY)").unwrap();
//! let tx = db.transaction().unwrap();
//! tx.execute("INSERT INTO orders (id) VALUES ('order-17')", []).unwrap();
//! let placed = NewEvent::new("order-17-placed", "shop", "OrderPlaced", b"{}".to_vec());
//! outbox::enqueue(&tx, "orders", Some("order-17"), &placed).unwrap();
//! tx.commit().unwrap();
//!
//! let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.join("events.db"), Default::default()).unwrap());
//! let relay = outbox::Relay::new(dir.join("service.db"), store.clone());
//! assert_eq!(relay.relay_once(100).await.unwrap(), 1);
//! assert_eq!(store.read("orders", 1, 10).await.unwrap()[0].id, "order-17-placed");
//! # }
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, Connection, Transaction};

use crate::event::{ExpectedVersion, NewEvent};
use crate::store::{Append, AppendError, Store, StoreError};

/// Creates the `tidegate_outbox` table in a service's database, if it is
/// not there.
pub fn create(db: &Connection) -> rusqlite::Result<()> {
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS tidegate_outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            topic TEXT NOT NULL,
            key TEXT,
            id TEXT NOT NULL,
            source TEXT NOT NULL,
            type TEXT NOT NULL,
            time TEXT,
            datacontenttype TEXT,
            data BLOB NOT NULL,
            extensions TEXT
        )",
    )
}

/// Enqueues `event` for `topic` (and `key`) in the service's own
/// transaction `tx`: it is relayed only if `tx` commits.
pub fn enqueue(
    tx: &Transaction<'_>,
    topic: &str,
    key: Option<&str>,
    event: &NewEvent,
) -> rusqlite::Result<()> {
    let extensions = crate::sqlite::extensions_column(&event.extensions);
    tx.prepare_cached(
        "INSERT INTO tidegate_outbox (topic, key, id, source, type, time, datacontenttype, data, extensions) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        topic,
        key,
        event.id,
        event.source,
        event.ty,
        event.time,
        event.datacontenttype,
        event.data,
        extensions,
    ])?;
    Ok(())
}

/// Appends a service's enqueued events to a store, in the order they were
/// enqueued, and deletes each once it is stored.
pub struct Relay {
    db: PathBuf,
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("db", &self.db)
            .finish_non_exhaustive()
    }
}

/// An enqueued event.
struct Queued {
    seq: i64,
    topic: String,
    key: Option<String>,
    event: NewEvent,
}

impl Relay {
    /// A relay of the outbox in the SQLite database at `db` to `store`.
    pub fn new(db: impl Into<PathBuf>, store: Arc<dyn Store>) -> Self {
        Relay {
            db: db.into(),
            store,
        }
    }

    /// Relays up to `limit` enqueued events, oldest first; how many. It
    /// stops at the first the store will not take (the rest keep their
    /// order) and says why.
    pub async fn relay_once(&self, limit: usize) -> Result<usize, StoreError> {
        let db = self.db.clone();
        let queued = tokio::task::spawn_blocking(move || read_queue(&db, limit))
            .await
            .map_err(|e| StoreError(e.to_string()))??;
        let mut relayed = Vec::with_capacity(queued.len());
        for q in queued {
            let append = Append {
                topic: q.topic,
                key: q.key,
                expected: ExpectedVersion::Any,
                events: vec![q.event],
            };
            match self.store.append(append).await {
                Ok(_) => relayed.push(q.seq),
                Err(AppendError::Store(e)) => {
                    self.forget(relayed).await?;
                    return Err(e);
                }
                Err(e) => {
                    self.forget(relayed).await?;
                    return Err(StoreError(format!(
                        "the store refused outbox event {}: {e}",
                        q.seq
                    )));
                }
            }
        }
        let count = relayed.len();
        self.forget(relayed).await?;
        Ok(count)
    }

    /// Relays for as long as it runs: at once while events are queued,
    /// else every `idle` (a service's commit cannot wake it).
    pub async fn run(&self, idle: Duration) -> Result<(), StoreError> {
        loop {
            if self.relay_once(1000).await? == 0 {
                tokio::time::sleep(idle).await;
            }
        }
    }

    /// Deletes the relayed events `seqs` from the outbox.
    async fn forget(&self, seqs: Vec<i64>) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = open(&db)?;
            let tx = conn.transaction().map_err(failed(&db))?;
            {
                let mut delete = tx
                    .prepare_cached("DELETE FROM tidegate_outbox WHERE seq = ?1")
                    .map_err(failed(&db))?;
                for seq in seqs {
                    delete.execute(params![seq]).map_err(failed(&db))?;
                }
            }
            tx.commit().map_err(failed(&db))
        })
        .await
        .map_err(|e| StoreError(e.to_string()))?
    }
}

fn failed(db: &std::path::Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |e| StoreError(format!("outbox {}: {e}", db.display()))
}

fn open(db: &std::path::Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(db).map_err(failed(db))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(failed(db))?;
    Ok(conn)
}

fn read_queue(db: &std::path::Path, limit: usize) -> Result<Vec<Queued>, StoreError> {
    let conn = open(db)?;
    let mut query = conn
        .prepare(
            "SELECT seq, topic, key, id, source, type, time, datacontenttype, data, extensions \
             FROM tidegate_outbox ORDER BY seq LIMIT ?1",
        )
        .map_err(failed(db))?;
    let rows = query
        .query_map(params![limit as i64], |row| {
            Ok(Queued {
                seq: row.get(0)?,
                topic: row.get(1)?,
                key: row.get(2)?,
                event: NewEvent {
                    id: row.get(3)?,
                    source: row.get(4)?,
                    ty: row.get(5)?,
                    time: row.get(6)?,
                    datacontenttype: row.get(7)?,
                    data: row.get(8)?,
                    extensions: crate::sqlite::extensions_from(row, 9)?,
                },
            })
        })
        .map_err(failed(db))?;
    rows.collect::<rusqlite::Result<_>>().map_err(failed(db))
}
