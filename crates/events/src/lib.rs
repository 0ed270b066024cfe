//! The asynchronous half of tidegate: topics of CloudEvents with
//! gap-free positions, per-key versions checked on append (event
//! sourcing's expected version), idempotent appends within a dedup window,
//! and reads of a topic or of one key's stream, on a [`Store`].
//!
//! [`SqliteStore`] keeps it all in one embedded SQLite file: nothing to
//! install, every answered append on disk. [`conformance`] holds the rules
//! every store must keep, written once, run against each store.
//!
//! ```
//! use tidegate_events::{Append, ExpectedVersion, NewEvent, SqliteStore, Store};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # let dir = std::env::temp_dir().join(format!("tidegate-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! let store = SqliteStore::open(dir.join("events.db"), Default::default()).unwrap();
//! let placed = NewEvent::new("order-17-placed", "shop", "OrderPlaced", br#"{"total":42}"#.to_vec());
//! let appended = store
//!     .append(Append::to_key("orders", "order-17", ExpectedVersion::NoStream, vec![placed]))
//!     .await
//!     .unwrap();
//! assert_eq!(appended.events[0].version, Some(1));
//! let stream = store.read_stream("orders", "order-17", 1, 100).await.unwrap();
//! assert_eq!(stream[0].ty, "OrderPlaced");
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod aggregate;
pub mod conformance;
mod consumer;
mod event;
pub mod load;
pub mod metrics;
pub mod outbox;
mod projection;
mod sqlite;
mod store;
mod subscription;
mod time;

pub use crate::aggregate::{execute, load, Aggregate, ExecuteError, Executed, Loaded};
pub use crate::consumer::{Consumer, Failure, Outcome, Policies};
pub use crate::event::{Event, ExpectedVersion, NewEvent};
pub use crate::projection::{Projection, Projector};
pub use crate::sqlite::{Options, SqliteStore};
pub use crate::store::{
    Append, AppendError, Appended, BoxFuture, DeadLetters, Retention, Store, StoreError, Stored,
    SubscriptionStatus, TopicInfo,
};
pub use crate::subscription::{Backoff, Delivery, Ordering, Seek, Start, SubscriptionConfig};
pub use crate::time::Clock;
