//! Projections: each key's events in version order across batches and
//! keys, a checkpoint that survives a new projector, and a rebuild.

use std::collections::BTreeMap;
use std::sync::Arc;

use tidegate_events::{
    Append, Event, ExpectedVersion, Failure, NewEvent, Projection, Projector, SqliteStore, Store,
};

/// Each key's event ids in the order they came.
#[derive(Default)]
struct Seen(BTreeMap<String, Vec<String>>);

impl Projection for Seen {
    fn project(&mut self, event: &Event) -> Result<(), Failure> {
        let key = event.key.clone().unwrap_or_default();
        self.0.entry(key).or_default().push(event.id.clone());
        Ok(())
    }
}

#[tokio::test]
async fn keys_come_in_version_order_checkpoints_hold_and_rebuild_starts_over() {
    let dir = std::env::temp_dir().join(format!("tidegate-projection-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.join("events.db"), Default::default()).unwrap());
    // 3 keys, 150 events each, interleaved: more than one batch per key.
    let append = |key: usize, i: usize| {
        let e = NewEvent::new(format!("k{key}-{i}"), "test", "T", Vec::new());
        Append::to_key("t", format!("k{key}"), ExpectedVersion::Any, vec![e])
    };
    for i in 0..150 {
        for key in 0..3 {
            store.append(append(key, i)).await.unwrap();
        }
    }
    let projector = Projector::start(store.clone(), "view", "t").await.unwrap();
    let mut seen = Seen::default();
    assert_eq!(projector.catch_up(&mut seen).await.unwrap(), 450);
    for key in 0..3 {
        let expected: Vec<String> = (0..150).map(|i| format!("k{key}-{i}")).collect();
        assert_eq!(seen.0[&format!("k{key}")], expected, "k{key} out of order");
    }
    // A new projector of the same group goes on from the checkpoint.
    store.append(append(0, 150)).await.unwrap();
    let again = Projector::start(store.clone(), "view", "t").await.unwrap();
    let mut later = Seen::default();
    assert_eq!(again.catch_up(&mut later).await.unwrap(), 1);
    // A rebuild starts over.
    again.rebuild().await.unwrap();
    let mut rebuilt = Seen::default();
    assert_eq!(again.catch_up(&mut rebuilt).await.unwrap(), 451);
    let _ = std::fs::remove_dir_all(&dir);
}
