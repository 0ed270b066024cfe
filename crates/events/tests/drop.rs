//! Dropping a store closes its file before the drop returns, so its path
//! can be opened again at once. (A test binary of its own: it counts the
//! process's store threads, which other tests' stores would add to.)

use tidegate_events::{Append, NewEvent, Options, SqliteStore, Store};

fn event(id: &str) -> NewEvent {
    NewEvent::new(id, "test", "Happened", b"{}".to_vec())
}

/// Threads of this process whose name begins like the store's writer's
/// and syncer's.
fn store_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).ok())
        .filter(|name| name.starts_with("events-"))
        .count()
}

#[tokio::test]
async fn a_dropped_store_has_closed_its_file_so_its_path_opens_afresh() {
    let dir = std::env::temp_dir().join(format!("tidegate-events-reuse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for round in 0..30 {
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        let store = SqliteStore::open(dir.join("events.db"), Options::default()).unwrap();
        for i in 0..20 {
            let id = format!("r{round}-{i}");
            store
                .append(Append::to_topic("t", vec![event(&id)]))
                .await
                .unwrap();
        }
        assert_eq!(
            store.read("t", 1, 100).await.unwrap().len(),
            20,
            "round {round}"
        );
        assert_eq!(store_threads(), 3, "the writer and two syncers");
        drop(store);
        // A writer still closing would delete the next store's WAL file.
        assert_eq!(
            store_threads(),
            0,
            "round {round}: the writer or a syncer outlived its store"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
