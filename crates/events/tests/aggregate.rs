//! Aggregates: commands racing on one stream are each decided against
//! the state they finally meet, and none is lost.

use std::sync::Arc;

use tidegate_events::{execute, Aggregate, Event, ExecuteError, NewEvent, SqliteStore, Store};

/// A balance that never goes below zero.
#[derive(Default)]
struct Account {
    balance: i64,
    applied: u64,
}

impl Aggregate for Account {
    fn apply(&mut self, event: &Event) {
        let amount: i64 = std::str::from_utf8(&event.data).unwrap().parse().unwrap();
        self.balance += amount;
        self.applied += 1;
    }
}

fn movement(id: String, amount: i64) -> NewEvent {
    NewEvent::new(id, "test", "Moved", amount.to_string().into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_commands_are_decided_again_and_none_is_lost() {
    let dir = std::env::temp_dir().join(format!("tidegate-aggregate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.join("events.db"), Default::default()).unwrap());
    execute(&*store, "accounts", "a", |_: &Account| {
        Ok::<_, String>(vec![movement("open".into(), 3)])
    })
    .await
    .unwrap();
    // Four withdrawals of 1 race for a balance of 3: three succeed, one is
    // refused by the balance it finally meets, none by a conflict.
    let mut racers = tokio::task::JoinSet::new();
    for i in 0..4 {
        let store = store.clone();
        racers.spawn(async move {
            execute(&*store, "accounts", "a", move |account: &Account| {
                if account.balance < 1 {
                    return Err("insufficient funds");
                }
                Ok(vec![movement(format!("w{i}-at-{}", account.applied), -1)])
            })
            .await
        });
    }
    let (mut done, mut refused) = (0, 0);
    while let Some(result) = racers.join_next().await {
        match result.unwrap() {
            Ok(_) => done += 1,
            Err(ExecuteError::Rejected(_)) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((done, refused), (3, 1));
    let loaded = tidegate_events::load::<Account>(&*store, "accounts", "a")
        .await
        .unwrap();
    assert_eq!((loaded.state.balance, loaded.version), (0, 4));
    let _ = std::fs::remove_dir_all(&dir);
}
