//! The outbox: an event leaves with its transaction or not at all, in
//! order, once, even when the relay dies between publishing and forgetting.

use std::path::PathBuf;
use std::sync::Arc;

use tidegate_events::{outbox, Append, NewEvent, SqliteStore, Store};

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn setup(name: &str) -> (Dir, rusqlite::Connection, Arc<dyn Store>) {
    let dir = std::env::temp_dir().join(format!("tidegate-outbox-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = rusqlite::Connection::open(dir.join("service.db")).unwrap();
    outbox::create(&db).unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.join("events.db"), Default::default()).unwrap());
    (Dir(dir), db, store)
}

fn event(id: &str) -> NewEvent {
    NewEvent::new(id, "service", "Changed", b"{}".to_vec())
}

fn queued(db: &rusqlite::Connection) -> i64 {
    db.query_row("SELECT COUNT(*) FROM tidegate_outbox", [], |row| row.get(0))
        .unwrap()
}

#[tokio::test]
async fn only_committed_events_leave_in_order_and_the_outbox_empties() {
    let (dir, mut db, store) = setup("order");
    let rolled_back = db.transaction().unwrap();
    outbox::enqueue(&rolled_back, "t", None, &event("never")).unwrap();
    drop(rolled_back);
    for id in ["a", "b", "c"] {
        let tx = db.transaction().unwrap();
        outbox::enqueue(&tx, "t", Some("k"), &event(id)).unwrap();
        tx.commit().unwrap();
    }
    let relay = outbox::Relay::new(dir.0.join("service.db"), store.clone());
    assert_eq!(relay.relay_once(100).await.unwrap(), 3);
    let stored: Vec<(String, Option<u64>)> = store
        .read("t", 1, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.id, e.version))
        .collect();
    assert_eq!(
        stored,
        [
            ("a".into(), Some(1)),
            ("b".into(), Some(2)),
            ("c".into(), Some(3))
        ]
    );
    assert_eq!(queued(&db), 0);
    assert_eq!(relay.relay_once(100).await.unwrap(), 0);
}

#[tokio::test]
async fn a_relay_that_died_before_forgetting_sends_again_harmlessly() {
    let (dir, mut db, store) = setup("again");
    let tx = db.transaction().unwrap();
    for id in ["x", "y"] {
        outbox::enqueue(&tx, "t", None, &event(id)).unwrap();
    }
    tx.commit().unwrap();
    // A relay published both, then died before deleting them.
    for id in ["x", "y"] {
        store
            .append(Append::to_topic("t", vec![event(id)]))
            .await
            .unwrap();
    }
    let relay = outbox::Relay::new(dir.0.join("service.db"), store.clone());
    assert_eq!(relay.relay_once(100).await.unwrap(), 2);
    let ids: Vec<String> = store
        .read("t", 1, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, ["x", "y"], "each event once");
    assert_eq!(queued(&db), 0);
}
