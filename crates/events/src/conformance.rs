//! The rules every [`Store`] keeps, written once and run against each
//! store (this crate's tests run them on SQLite). Each check uses topics
//! of its own, named from `prefix`, and panics with what it found when a
//! rule is broken.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # let dir = std::env::temp_dir().join(format!("tidegate-conf-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! let store = tidegate_events::SqliteStore::open(dir.join("events.db"), Default::default()).unwrap();
//! tidegate_events::conformance::expected_versions_are_checked(&store, "doc").await;
//! # }
//! ```

use std::collections::HashSet;
use std::sync::Arc;

use crate::event::{ExpectedVersion, NewEvent};
use crate::store::{Append, AppendError, Store};

/// An event of type `ty` with id `id` and a small JSON payload.
fn event(id: &str, ty: &str) -> NewEvent {
    NewEvent::new(
        id,
        "conformance",
        ty,
        format!("{{\"id\":\"{id}\"}}").into_bytes(),
    )
}

/// Every check below, in turn; `publishers` × `each` events for the
/// concurrent one.
pub async fn all(store: Arc<dyn Store>, prefix: &str, publishers: usize, each: usize) {
    positions_are_gap_free_and_versions_count_per_key(&*store, prefix).await;
    expected_versions_are_checked(&*store, prefix).await;
    a_batch_to_one_key_is_stored_whole_or_not_at_all(&*store, prefix).await;
    duplicates_within_the_window_are_not_stored_again(&*store, prefix).await;
    invalid_appends_store_nothing(&*store, prefix).await;
    reads_start_where_asked_and_stop_at_the_limit(&*store, prefix).await;
    concurrent_appends_at_one_expected_version_one_wins(store.clone(), prefix).await;
    concurrent_publishers_get_every_position_once(store, prefix, publishers, each).await;
}

/// Positions run 1, 2, 3… through a topic whatever the keys; each key's
/// versions run 1, 2, 3…; events without a key have none; reads give
/// back what was appended.
pub async fn positions_are_gap_free_and_versions_count_per_key(store: &dyn Store, prefix: &str) {
    let topic = format!("{prefix}.gapless");
    let mut expected = Vec::new();
    for (i, key) in ["a", "b", "a", "", "b", "a"].into_iter().enumerate() {
        let e = event(&format!("g{i}"), "Happened");
        let append = match key {
            "" => Append::to_topic(&topic, vec![e]),
            key => Append::to_key(&topic, key, ExpectedVersion::Any, vec![e]),
        };
        let stored = store.append(append).await.unwrap().events;
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].position, i as u64 + 1, "position of append {i}");
        assert!(!stored[0].duplicate);
        expected.push((key, stored[0].version));
    }
    let versions: Vec<_> = expected.iter().map(|(_, v)| *v).collect();
    assert_eq!(
        versions,
        [Some(1), Some(1), Some(2), None, Some(2), Some(3)],
        "versions per key"
    );
    let read = store.read(&topic, 1, 100).await.unwrap();
    let positions: Vec<u64> = read.iter().map(|e| e.position).collect();
    assert_eq!(positions, [1, 2, 3, 4, 5, 6]);
    assert_eq!(read[3].key, None);
    assert_eq!(read[5].key.as_deref(), Some("a"));
    assert_eq!(read[5].data, br#"{"id":"g5"}"#);
    assert_eq!(read[5].ty, "Happened");
    assert!(!read[5].time.is_empty(), "the store sets the time");
    let stream = store.read_stream(&topic, "a", 1, 100).await.unwrap();
    let a: Vec<_> = stream.iter().map(|e| (e.version, e.position)).collect();
    assert_eq!(a, [(Some(1), 1), (Some(2), 3), (Some(3), 6)]);
    assert_eq!(store.last_position(&topic).await.unwrap(), 6);
    assert_eq!(
        store
            .last_position(&format!("{prefix}.none"))
            .await
            .unwrap(),
        0
    );
}

/// `no_stream`, `exists` and exact versions are checked; a conflict
/// carries the stream's actual version and stores nothing.
pub async fn expected_versions_are_checked(store: &dyn Store, prefix: &str) {
    let topic = format!("{prefix}.expected");
    let append = |id: &str, expected| {
        Append::to_key(&topic, "order-1", expected, vec![event(id, "OrderChanged")])
    };
    let conflict = |result: Result<_, AppendError>| match result {
        Err(AppendError::Conflict { actual, .. }) => actual,
        other => panic!("expected a conflict, got {other:?}"),
    };
    assert_eq!(
        conflict(store.append(append("e0", ExpectedVersion::Exists)).await),
        None
    );
    assert_eq!(
        conflict(
            store
                .append(append("e0", ExpectedVersion::Exactly(1)))
                .await
        ),
        None
    );
    let first = store
        .append(append("e1", ExpectedVersion::NoStream))
        .await
        .unwrap();
    assert_eq!(first.events[0].version, Some(1));
    assert_eq!(
        conflict(store.append(append("e2", ExpectedVersion::NoStream)).await),
        Some(1)
    );
    assert_eq!(
        conflict(
            store
                .append(append("e2", ExpectedVersion::Exactly(0)))
                .await
        ),
        Some(1)
    );
    assert_eq!(
        conflict(
            store
                .append(append("e2", ExpectedVersion::Exactly(2)))
                .await
        ),
        Some(1)
    );
    let second = store
        .append(append("e2", ExpectedVersion::Exactly(1)))
        .await
        .unwrap();
    assert_eq!(second.events[0].version, Some(2));
    let third = store
        .append(append("e3", ExpectedVersion::Exists))
        .await
        .unwrap();
    assert_eq!(third.events[0].version, Some(3));
    let any = store
        .append(append("e4", ExpectedVersion::Any))
        .await
        .unwrap();
    assert_eq!(any.events[0].version, Some(4));
    let stored = store.read(&topic, 1, 100).await.unwrap();
    assert_eq!(stored.len(), 4, "conflicts stored nothing: {stored:?}");
    let positions: Vec<u64> = stored.iter().map(|e| e.position).collect();
    assert_eq!(positions, [1, 2, 3, 4], "conflicts took no position");
}

/// A batch to one key gets consecutive positions and versions, or, on a
/// conflict, nothing at all.
pub async fn a_batch_to_one_key_is_stored_whole_or_not_at_all(store: &dyn Store, prefix: &str) {
    let topic = format!("{prefix}.batch");
    let batch = |ids: &[&str]| {
        ids.iter()
            .map(|id| event(id, "Batched"))
            .collect::<Vec<_>>()
    };
    let first = store
        .append(Append::to_key(
            &topic,
            "k",
            ExpectedVersion::NoStream,
            batch(&["b1", "b2", "b3"]),
        ))
        .await
        .unwrap();
    let placed: Vec<_> = first
        .events
        .iter()
        .map(|s| (s.position, s.version))
        .collect();
    assert_eq!(placed, [(1, Some(1)), (2, Some(2)), (3, Some(3))]);
    let refused = store
        .append(Append::to_key(
            &topic,
            "k",
            ExpectedVersion::Exactly(2),
            batch(&["b4", "b5"]),
        ))
        .await;
    assert!(
        matches!(
            refused,
            Err(AppendError::Conflict {
                actual: Some(3),
                ..
            })
        ),
        "{refused:?}"
    );
    assert_eq!(store.read(&topic, 1, 100).await.unwrap().len(), 3);
    let next = store
        .append(Append::to_key(
            &topic,
            "k",
            ExpectedVersion::Exactly(3),
            batch(&["b4", "b5"]),
        ))
        .await
        .unwrap();
    let placed: Vec<_> = next
        .events
        .iter()
        .map(|s| (s.position, s.version))
        .collect();
    assert_eq!(placed, [(4, Some(4)), (5, Some(5))]);
}

/// An id seen in the topic within the dedup window is answered with the
/// first append's place, `duplicate`, and stored once; a whole batch sent
/// again is such an answer even though the stream has moved on.
pub async fn duplicates_within_the_window_are_not_stored_again(store: &dyn Store, prefix: &str) {
    let topic = format!("{prefix}.dedup");
    let first = store
        .append(Append::to_topic(&topic, vec![event("same", "Once")]))
        .await
        .unwrap();
    let again = store
        .append(Append::to_topic(&topic, vec![event("same", "Once")]))
        .await
        .unwrap();
    assert!(again.events[0].duplicate);
    assert_eq!(again.events[0].position, first.events[0].position);
    let batch = || vec![event("k1", "Keyed"), event("k2", "Keyed")];
    let stored = store
        .append(Append::to_key(
            &topic,
            "key",
            ExpectedVersion::NoStream,
            batch(),
        ))
        .await
        .unwrap();
    let resent = store
        .append(Append::to_key(
            &topic,
            "key",
            ExpectedVersion::NoStream,
            batch(),
        ))
        .await
        .unwrap();
    assert!(resent.events.iter().all(|s| s.duplicate), "{resent:?}");
    let places = |a: &crate::Appended| {
        a.events
            .iter()
            .map(|s| (s.position, s.version))
            .collect::<Vec<_>>()
    };
    assert_eq!(places(&resent), places(&stored));
    // A new event beside a seen one: the new one is stored, the seen one is not.
    let mixed = store
        .append(Append::to_topic(
            &topic,
            vec![event("same", "Once"), event("new", "Once")],
        ))
        .await
        .unwrap();
    assert!(
        mixed.events[0].duplicate && !mixed.events[1].duplicate,
        "{mixed:?}"
    );
    let ids: Vec<String> = store
        .read(&topic, 1, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, ["same", "k1", "k2", "new"]);
}

/// An append without events, with an expectation but no key, with an
/// event lacking an id, or with one id twice, is refused and takes no
/// position.
pub async fn invalid_appends_store_nothing(store: &dyn Store, prefix: &str) {
    let topic = format!("{prefix}.invalid");
    let mut no_id = event("x", "T");
    no_id.id.clear();
    for append in [
        Append::to_topic(&topic, vec![]),
        Append {
            expected: ExpectedVersion::NoStream,
            ..Append::to_topic(&topic, vec![event("x", "T")])
        },
        Append::to_topic(&topic, vec![no_id]),
        Append::to_topic(&topic, vec![event("twice", "T"), event("twice", "T")]),
    ] {
        let refused = store.append(append.clone()).await;
        assert!(
            matches!(refused, Err(AppendError::Invalid(_))),
            "{append:?}: {refused:?}"
        );
    }
    let stored = store
        .append(Append::to_topic(&topic, vec![event("ok", "T")]))
        .await
        .unwrap();
    assert_eq!(stored.events[0].position, 1);
}

/// Reads begin at the position or version asked for and return at most
/// `limit` events.
pub async fn reads_start_where_asked_and_stop_at_the_limit(store: &dyn Store, prefix: &str) {
    let topic = format!("{prefix}.reads");
    for i in 0..10 {
        store
            .append(Append::to_key(
                &topic,
                "k",
                ExpectedVersion::Any,
                vec![event(&format!("r{i}"), "T")],
            ))
            .await
            .unwrap();
    }
    let page: Vec<u64> = store
        .read(&topic, 4, 3)
        .await
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(page, [4, 5, 6]);
    let page: Vec<_> = store
        .read_stream(&topic, "k", 9, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(page, [Some(9), Some(10)]);
    assert!(store.read(&topic, 11, 10).await.unwrap().is_empty());
    assert!(store
        .read_stream(&topic, "other", 1, 10)
        .await
        .unwrap()
        .is_empty());
}

/// Appends racing for one key at the same expected version: exactly one
/// is stored; every other one gets a conflict naming the version the
/// winner left.
pub async fn concurrent_appends_at_one_expected_version_one_wins(
    store: Arc<dyn Store>,
    prefix: &str,
) {
    let topic = format!("{prefix}.race");
    store
        .append(Append::to_key(
            &topic,
            "k",
            ExpectedVersion::NoStream,
            vec![event("start", "T")],
        ))
        .await
        .unwrap();
    let mut racers = tokio::task::JoinSet::new();
    for i in 0..32 {
        let (store, topic) = (store.clone(), topic.clone());
        racers.spawn(async move {
            let append = Append::to_key(
                &topic,
                "k",
                ExpectedVersion::Exactly(1),
                vec![event(&format!("racer{i}"), "T")],
            );
            store.append(append).await
        });
    }
    let (mut won, mut lost) = (0, 0);
    while let Some(result) = racers.join_next().await {
        match result.unwrap() {
            Ok(appended) => {
                won += 1;
                assert_eq!(appended.events[0].version, Some(2));
            }
            Err(AppendError::Conflict { actual, .. }) => {
                lost += 1;
                assert_eq!(actual, Some(2));
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((won, lost), (1, 31));
}

/// `publishers` tasks append `each` events at once: every append is
/// answered, and the topic holds each event once, at positions 1…N
/// with no gap and no repeat.
pub async fn concurrent_publishers_get_every_position_once(
    store: Arc<dyn Store>,
    prefix: &str,
    publishers: usize,
    each: usize,
) {
    let topic = format!("{prefix}.publishers");
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..publishers {
        let (store, topic) = (store.clone(), topic.clone());
        tasks.spawn(async move {
            let mut positions = Vec::with_capacity(each);
            for i in 0..each {
                let key = format!("p{p}");
                let e = event(&format!("p{p}-{i}"), "Published");
                let append =
                    Append::to_key(&topic, key, ExpectedVersion::Exactly(i as u64), vec![e]);
                positions.push(store.append(append).await.unwrap().events[0].position);
            }
            positions
        });
    }
    let mut answered = HashSet::new();
    while let Some(positions) = tasks.join_next().await {
        for position in positions.unwrap() {
            assert!(
                answered.insert(position),
                "position {position} answered twice"
            );
        }
    }
    let total = publishers * each;
    assert_eq!(answered.len(), total);
    assert_eq!(store.last_position(&topic).await.unwrap(), total as u64);
    let mut next = 1u64;
    let mut ids = HashSet::new();
    while next <= total as u64 {
        let page = store.read(&topic, next, 1000).await.unwrap();
        assert!(!page.is_empty(), "the topic ends at {next}");
        for e in page {
            assert_eq!(e.position, next, "a gap or a repeat");
            assert!(ids.insert(e.id.clone()), "{} stored twice", e.id);
            next += 1;
        }
    }
}
