//! The SQLite store against a plain in-memory model, over random
//! sequences of appends (keys, expected versions, repeated ids), fetches,
//! acks and nacks: every answer must be the model's.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use tidegate_events::{
    Append, AppendError, Clock, ExpectedVersion, NewEvent, Options, SqliteStore, Store,
    SubscriptionConfig,
};

#[derive(Debug, Clone)]
enum Op {
    Append {
        key: Option<u8>,
        expected: ExpectedVersion,
        id: u8,
    },
    Fetch {
        max: usize,
    },
    Ack {
        pick: usize,
    },
    Nack {
        pick: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let expected = prop_oneof![
        Just(ExpectedVersion::Any),
        Just(ExpectedVersion::NoStream),
        Just(ExpectedVersion::Exists),
        (0u64..4).prop_map(ExpectedVersion::Exactly),
    ];
    prop_oneof![
        4 => (proptest::option::of(0u8..3), expected, 0u8..24)
            .prop_map(|(key, expected, id)| Op::Append { key, expected, id }),
        2 => (1usize..4).prop_map(|max| Op::Fetch { max }),
        2 => any::<usize>().prop_map(|pick| Op::Ack { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Nack { pick }),
    ]
}

/// What an append answered, in the model's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Stored {
        position: u64,
        version: Option<u64>,
        duplicate: bool,
    },
    Conflict(Option<u64>),
    Invalid,
}

/// The model: a topic, its keys, one consumer group (no ordering, three in
/// flight, time standing still so leases never run out).
#[derive(Default)]
struct Model {
    events: Vec<(String, Option<u64>)>,
    seen: HashMap<String, (u64, Option<u64>)>,
    versions: HashMap<u8, u64>,
    cursor: usize,
    /// Pending events by position: (deliveries, leased).
    pending: BTreeMap<u64, (u32, bool)>,
}

const IN_FLIGHT: usize = 3;

impl Model {
    fn append(&mut self, key: Option<u8>, expected: ExpectedVersion, id: &str) -> Answer {
        if key.is_none() && expected != ExpectedVersion::Any {
            return Answer::Invalid;
        }
        if let Some(&(position, version)) = self.seen.get(id) {
            return Answer::Stored {
                position,
                version,
                duplicate: true,
            };
        }
        let actual = key.and_then(|k| self.versions.get(&k).copied());
        if !expected.is_met_by(actual) {
            return Answer::Conflict(actual);
        }
        let version = key.map(|k| {
            let v = self.versions.entry(k).or_insert(0);
            *v += 1;
            *v
        });
        self.events.push((id.to_owned(), version));
        let position = self.events.len() as u64;
        self.seen.insert(id.to_owned(), (position, version));
        Answer::Stored {
            position,
            version,
            duplicate: false,
        }
    }

    /// The ids and delivery numbers a fetch of `max` hands out.
    fn fetch(&mut self, max: usize) -> Vec<(String, u32)> {
        while self.cursor < self.events.len() {
            self.cursor += 1;
            self.pending.insert(self.cursor as u64, (0, false));
        }
        let in_flight = self.pending.values().filter(|(_, leased)| *leased).count();
        let room = IN_FLIGHT.saturating_sub(in_flight).min(max);
        let mut out = Vec::new();
        for (position, (deliveries, leased)) in self.pending.iter_mut() {
            if out.len() == room {
                break;
            }
            if !*leased {
                *leased = true;
                *deliveries += 1;
                out.push((self.events[*position as usize - 1].0.clone(), *deliveries));
            }
        }
        out
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = std::env::temp_dir().join(format!(
        "tidegate-model-{}-{}",
        std::process::id(),
        std::thread::current()
            .name()
            .unwrap_or("t")
            .replace(':', "_")
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = runtime.block_on(async {
        let options = Options {
            clock: Clock::manual(),
            ..Options::default()
        };
        let store = SqliteStore::open(dir.join("events.db"), options).unwrap();
        store
            .subscribe(SubscriptionConfig {
                max_in_flight: IN_FLIGHT as u32,
                max_deliveries: 1000,
                ..SubscriptionConfig::new("g", "t")
            })
            .await
            .unwrap();
        let mut model = Model::default();
        // Ack ids handed out and not yet settled, with the model's position.
        let mut out: Vec<(String, u64)> = Vec::new();
        for op in ops {
            match op {
                Op::Append { key, expected, id } => {
                    let id = format!("e{id}");
                    let event = NewEvent::new(&id, "model", "T", Vec::new());
                    let append = match key {
                        Some(k) => Append::to_key("t", format!("k{k}"), expected, vec![event]),
                        None => Append {
                            expected,
                            ..Append::to_topic("t", vec![event])
                        },
                    };
                    let got = match store.append(append).await {
                        Ok(appended) => {
                            let s = &appended.events[0];
                            Answer::Stored {
                                position: s.position,
                                version: s.version,
                                duplicate: s.duplicate,
                            }
                        }
                        Err(AppendError::Conflict { actual, .. }) => Answer::Conflict(actual),
                        Err(AppendError::Invalid(_)) => Answer::Invalid,
                        Err(e) => panic!("{e}"),
                    };
                    prop_assert_eq!(got, model.append(key, expected, &id));
                }
                Op::Fetch { max } => {
                    let got = store.fetch("g", max).await.unwrap();
                    let seen: Vec<(String, u32)> = got
                        .iter()
                        .map(|d| (d.event.id.clone(), d.delivery))
                        .collect();
                    prop_assert_eq!(seen, model.fetch(max));
                    out.extend(got.into_iter().map(|d| (d.ack_id, d.event.position)));
                }
                Op::Ack { pick } | Op::Nack { pick } if !out.is_empty() => {
                    let (ack_id, position) = out.swap_remove(pick % out.len());
                    if matches!(op, Op::Ack { .. }) {
                        prop_assert_eq!(store.ack("g", &[ack_id]).await.unwrap(), vec![true]);
                        model.pending.remove(&position);
                    } else {
                        prop_assert!(store
                            .nack("g", &ack_id, Some(std::time::Duration::ZERO))
                            .await
                            .unwrap());
                        model.pending.get_mut(&position).unwrap().1 = false;
                    }
                }
                Op::Ack { .. } | Op::Nack { .. } => {}
            }
        }
        let read: Vec<(String, Option<u64>)> = store
            .read("t", 1, 10_000)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.version))
            .collect();
        prop_assert_eq!(read, model.events.clone());
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_store_answers_as_the_model_does(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}
