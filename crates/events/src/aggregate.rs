//! Event-sourced aggregates: the state is its key's stream folded, and a
//! command is decided against the state as loaded and appended at the
//! version it was loaded at. A conflict (someone appended meanwhile)
//! loads the stream again and decides again.
//!
//! ```
//! use tidegate_events::{Aggregate, Event, NewEvent, SqliteStore, execute};
//!
//! #[derive(Default)]
//! struct Counter { total: i64 }
//!
//! impl Aggregate for Counter {
//!     fn apply(&mut self, event: &Event) {
//!         self.total += std::str::from_utf8(&event.data).unwrap().parse::<i64>().unwrap();
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # let dir = std::env::temp_dir().join(format!("tidegate-aggregate-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! let store = SqliteStore::open(dir.join("events.db"), Default::default()).unwrap();
//! let add = |n: i64| move |counter: &Counter| {
//!     if counter.total + n > 10 { return Err("over the limit") }
//!     Ok(vec![NewEvent::new(format!("add-{}-{n}", counter.total), "doc", "Added", n.to_string().into_bytes())])
//! };
//! execute(&store, "counters", "c1", add(4)).await.unwrap();
//! let done = execute(&store, "counters", "c1", add(5)).await.unwrap();
//! assert_eq!(done.version, 2);
//! assert!(execute(&store, "counters", "c1", add(5)).await.is_err());
//! # }
//! ```

use std::fmt;

use crate::event::{Event, ExpectedVersion, NewEvent};
use crate::store::{Append, AppendError, Appended, Store, StoreError};

/// State rebuilt from a key's stream, one event at a time.
pub trait Aggregate: Default {
    /// Applies one of the stream's events, in version order.
    fn apply(&mut self, event: &Event);
}

/// How many times [`execute`] decides again after a conflict.
const ATTEMPTS: u32 = 5;

/// Events are read this many at a time when loading.
const PAGE: usize = 1000;

/// An aggregate as loaded: its state and the version it is at (0: no
/// event yet).
#[derive(Debug)]
pub struct Loaded<A> {
    /// The state.
    pub state: A,
    /// The last version applied.
    pub version: u64,
}

/// Folds `key`'s stream in `topic` into a fresh `A`.
pub async fn load<A: Aggregate>(
    store: &dyn Store,
    topic: &str,
    key: &str,
) -> Result<Loaded<A>, StoreError> {
    let mut loaded = Loaded {
        state: A::default(),
        version: 0,
    };
    loop {
        let page = store
            .read_stream(topic, key, loaded.version + 1, PAGE)
            .await?;
        let full = page.len() == PAGE;
        for event in &page {
            loaded.state.apply(event);
            loaded.version = event.version.unwrap_or(loaded.version);
        }
        if !full {
            return Ok(loaded);
        }
    }
}

/// What a command stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Executed {
    /// The stream's version after it (the loaded one if it decided nothing).
    pub version: u64,
    /// Where its events went.
    pub appended: Appended,
}

/// Why a command stored nothing.
#[derive(Debug)]
pub enum ExecuteError<E> {
    /// The aggregate refused it.
    Rejected(E),
    /// Others kept appending to the stream: it still conflicted after
    /// every attempt.
    Contended {
        /// The stream's version at the last try.
        actual: Option<u64>,
    },
    /// The store failed, or refused the events as invalid.
    Store(AppendError),
}

impl<E: fmt::Display> fmt::Display for ExecuteError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecuteError::Rejected(e) => write!(f, "rejected: {e}"),
            ExecuteError::Contended { actual } => {
                write!(
                    f,
                    "the stream kept changing (now at {actual:?}); tried {ATTEMPTS} times"
                )
            }
            ExecuteError::Store(e) => e.fmt(f),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for ExecuteError<E> {}

/// Loads `key`'s aggregate, asks `decide` for the events a command makes
/// of it, and appends them at the loaded version; on a conflict, loads
/// and decides again (up to five times). A decision of no event stores
/// nothing.
pub async fn execute<A, D, E>(
    store: &dyn Store,
    topic: &str,
    key: &str,
    mut decide: D,
) -> Result<Executed, ExecuteError<E>>
where
    A: Aggregate,
    D: FnMut(&A) -> Result<Vec<NewEvent>, E>,
{
    let mut actual = None;
    for _ in 0..ATTEMPTS {
        let loaded: Loaded<A> = load(store, topic, key)
            .await
            .map_err(|e| ExecuteError::Store(AppendError::Store(e)))?;
        let events = decide(&loaded.state).map_err(ExecuteError::Rejected)?;
        if events.is_empty() {
            return Ok(Executed {
                version: loaded.version,
                appended: Appended { events: Vec::new() },
            });
        }
        let append = Append::to_key(topic, key, ExpectedVersion::Exactly(loaded.version), events);
        match store.append(append).await {
            Ok(appended) => {
                let version = appended
                    .events
                    .iter()
                    .filter_map(|s| s.version)
                    .max()
                    .unwrap_or(loaded.version);
                return Ok(Executed { version, appended });
            }
            Err(AppendError::Conflict { actual: now, .. }) => actual = now,
            Err(e) => return Err(ExecuteError::Store(e)),
        }
    }
    Err(ExecuteError::Contended { actual })
}
