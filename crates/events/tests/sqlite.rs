//! The SQLite store: the conformance suite, and what is its own (the file,
//! reopening, the dedup window's end).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tidegate_events::{
    conformance, Append, Clock, ExpectedVersion, NewEvent, Options, SqliteStore, Store,
};

/// A fresh directory for one test's database, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("tidegate-events-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn db(&self) -> PathBuf {
        self.0.join("events.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn event(id: &str) -> NewEvent {
    NewEvent::new(id, "test", "Happened", b"{}".to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_store_keeps_every_rule() {
    let dir = TempDir::new("conformance");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.db(), Options::default()).unwrap());
    conformance::all(store, "sqlite", 64, 1000).await;
}

#[tokio::test]
async fn the_sqlite_stores_subscriptions_keep_every_rule() {
    let dir = TempDir::new("subscriptions");
    let clock = Clock::manual();
    let options = Options {
        clock: clock.clone(),
        ..Options::default()
    };
    let store = SqliteStore::open(dir.db(), options).unwrap();
    let advance = move |by: Duration| -> tidegate_events::BoxFuture<'static, ()> {
        clock.advance(by);
        Box::pin(async {})
    };
    conformance::subscriptions(&store, "sqlite", &advance).await;
}

#[tokio::test]
async fn what_was_answered_is_there_after_reopening_and_positions_go_on() {
    let dir = TempDir::new("reopen");
    {
        let store = SqliteStore::open(dir.db(), Options::default()).unwrap();
        for i in 0..3 {
            let append = Append::to_key(
                "t",
                "k",
                ExpectedVersion::Exactly(i),
                vec![event(&format!("e{i}"))],
            );
            store.append(append).await.unwrap();
        }
    }
    let store = SqliteStore::open(dir.db(), Options::default()).unwrap();
    assert_eq!(store.read("t", 1, 10).await.unwrap().len(), 3);
    let next = store
        .append(Append::to_key(
            "t",
            "k",
            ExpectedVersion::Exactly(3),
            vec![event("e3")],
        ))
        .await
        .unwrap();
    assert_eq!(
        (next.events[0].position, next.events[0].version),
        (4, Some(4))
    );
    // The dedup window survives a restart too.
    let again = store
        .append(Append::to_topic("t", vec![event("e0")]))
        .await
        .unwrap();
    assert!(again.events[0].duplicate);
}

#[tokio::test]
async fn positions_go_on_after_retention_deleted_every_event_and_a_restart() {
    let dir = TempDir::new("emptied");
    {
        let store = SqliteStore::open(dir.db(), Options::default()).unwrap();
        for i in 0..4 {
            let id = format!("e{i}");
            store
                .append(Append::to_topic("t", vec![event(&id)]))
                .await
                .unwrap();
        }
        store
            .retain(tidegate_events::Retention {
                topic: "t".into(),
                max_age: None,
                max_events: Some(0),
            })
            .await
            .unwrap();
        // (The store may have applied it by itself already.)
        store.enforce_retention().await.unwrap();
        assert!(store.read("t", 1, 10).await.unwrap().is_empty());
    }
    let store = SqliteStore::open(dir.db(), Options::default()).unwrap();
    assert!(store.read("t", 1, 10).await.unwrap().is_empty());
    assert_eq!(store.last_position("t").await.unwrap(), 4);
    let next = store
        .append(Append::to_topic("t", vec![event("e4")]))
        .await
        .unwrap();
    assert_eq!(next.events[0].position, 5);
    assert_eq!(store.last_position("t").await.unwrap(), 5);
}

#[tokio::test]
async fn past_the_dedup_window_an_id_is_stored_again() {
    let dir = TempDir::new("window");
    let options = Options {
        dedup_window: Duration::ZERO,
        ..Options::default()
    };
    let store = SqliteStore::open(dir.db(), options).unwrap();
    for _ in 0..2 {
        let stored = store
            .append(Append::to_topic("t", vec![event("same")]))
            .await
            .unwrap();
        assert!(!stored.events[0].duplicate);
    }
    assert_eq!(store.read("t", 1, 10).await.unwrap().len(), 2);
}

#[test]
fn a_file_of_another_schema_is_refused_by_name() {
    let dir = TempDir::new("schema");
    rusqlite::Connection::open(dir.db())
        .unwrap()
        .execute_batch("CREATE TABLE events (topic TEXT, position INTEGER)")
        .unwrap();
    let err = SqliteStore::open(dir.db(), Options::default()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&dir.db().display().to_string()), "{text}");
    assert!(text.contains("schema is version 0"), "{text}");
}

#[test]
fn a_store_that_cannot_open_names_its_file() {
    let missing = std::env::temp_dir()
        .join("tidegate-no-such-dir")
        .join("sub")
        .join("events.db");
    let err = SqliteStore::open(&missing, Options::default()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&missing.display().to_string()), "{text}");
    assert!(text.starts_with("cannot open the event store"), "{text}");
}
