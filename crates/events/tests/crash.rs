//! Crash safety: a child process appends and acks in a loop and says so
//! on stdout as each answer comes; it is killed with SIGKILL at a random
//! moment, 20 times over. After each kill, every append it was told of is
//! in the store at the position it was given, positions run without a
//! gap, and no event it acked is delivered again.
//!
//! The child is this test binary run again, told its part by an
//! environment variable.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use tidegate_events::{Append, NewEvent, SqliteStore, Store, SubscriptionConfig};

const CHILD: &str = "TIDEGATE_EVENTS_CRASH_CHILD";
const KILLS: usize = 20;

fn subscription() -> SubscriptionConfig {
    SubscriptionConfig {
        ack_wait: Duration::from_secs(3600),
        ..SubscriptionConfig::new("crash", "t")
    }
}

/// The child: append, fetch, ack, forever, one line per answer.
async fn child(db: &str, round: usize) {
    let store = SqliteStore::open(db, Default::default()).unwrap();
    store.subscribe(subscription()).await.unwrap();
    for i in 0.. {
        let id = format!("r{round}-{i}");
        let event = NewEvent::new(&id, "crash", "Appended", vec![b'x'; 256]);
        let stored = store
            .append(Append::to_topic("t", vec![event]))
            .await
            .unwrap();
        println!("appended {id} {}", stored.events[0].position);
        let deliveries = store.fetch("crash", 3).await.unwrap();
        let ack_ids: Vec<String> = deliveries.iter().map(|d| d.ack_id.clone()).collect();
        let acked = store.ack("crash", &ack_ids).await.unwrap();
        for (delivery, acked) in deliveries.iter().zip(acked) {
            assert!(acked);
            println!("acked {}", delivery.event.id);
        }
    }
}

/// A small generator for where to kill (no need for a crate).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[test]
fn answered_appends_and_acks_survive_sigkill() {
    if let Ok(part) = std::env::var(CHILD) {
        let (db, round) = part.split_once(',').unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(child(db, round.parse().unwrap()));
        return;
    }
    let dir = std::env::temp_dir().join(format!("tidegate-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("events.db").display().to_string();
    let mut random = Lcg(u64::from(std::process::id()));
    let mut appended: HashMap<String, u64> = HashMap::new();
    let mut acked: HashSet<String> = HashSet::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for round in 0..KILLS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "answered_appends_and_acks_survive_sigkill",
                "--nocapture",
            ])
            .env(CHILD, format!("{db},{round}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let kill_after = 5 + random.below(150);
        let mut seen = 0;
        let mut record = |line: &str| {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words[..] {
                ["appended", id, position] => {
                    appended.insert(id.to_owned(), position.parse().unwrap());
                }
                ["acked", id] => {
                    acked.insert(id.to_owned());
                }
                _ => {}
            }
        };
        for line in lines.by_ref() {
            let line = line.unwrap();
            record(&line);
            seen += 1;
            if seen == kill_after {
                break;
            }
        }
        child.kill().unwrap(); // SIGKILL
                               // What it said before it died was answered before it died.
        for line in lines {
            record(&line.unwrap());
        }
        child.wait().unwrap();

        runtime.block_on(async {
            let store = SqliteStore::open(&db, Default::default()).unwrap();
            let last = store.last_position("t").await.unwrap();
            let mut stored = HashMap::new();
            let mut next = 1;
            while next <= last {
                for event in store.read("t", next, 1000).await.unwrap() {
                    assert_eq!(event.position, next, "round {round}: a gap before {next}");
                    stored.insert(event.id, event.position);
                    next += 1;
                }
            }
            for (id, position) in &appended {
                assert_eq!(
                    stored.get(id),
                    Some(position),
                    "round {round}: answered append {id} lost"
                );
            }
            // Nothing acked comes again (the dead child's leases hold an hour).
            store.subscribe(subscription()).await.unwrap();
            let redelivered = store.fetch("crash", 10_000).await.unwrap();
            for delivery in &redelivered {
                assert!(
                    !acked.contains(&delivery.event.id),
                    "round {round}: {} acked, then delivered again",
                    delivery.event.id
                );
            }
            let ack_ids: Vec<String> = redelivered.iter().map(|d| d.ack_id.clone()).collect();
            let done = store.ack("crash", &ack_ids).await.unwrap();
            assert!(done.iter().all(|a| *a));
            acked.extend(redelivered.into_iter().map(|d| d.event.id));
        });
    }
    assert!(
        appended.len() > KILLS * 5,
        "the children appended {}",
        appended.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
