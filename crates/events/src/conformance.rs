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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::event::{Event, ExpectedVersion, NewEvent};
use crate::store::{Append, AppendError, BoxFuture, Retention, Store};
use crate::subscription::{Backoff, Delivery, Ordering, Seek, Start, SubscriptionConfig};

/// Moves the store's clock on (a manual clock, or real waiting).
pub type Advance<'a> = &'a (dyn Fn(Duration) -> BoxFuture<'static, ()> + Sync);

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
    topics_are_listed_with_what_they_keep(&*store, prefix).await;
    concurrent_publishers_get_every_position_once(store, prefix, publishers, each).await;
}

/// Every topic that has had events is listed, with its first and last
/// positions.
pub async fn topics_are_listed_with_what_they_keep(store: &dyn Store, prefix: &str) {
    let topic = format!("{prefix}.listed");
    append_ids(store, &topic, (0..3).map(|i| format!("l{i}"))).await;
    let topics = store.topics().await.unwrap();
    let listed = topics
        .iter()
        .find(|t| t.name == topic)
        .unwrap_or_else(|| panic!("{topic} is not in {topics:?}"));
    assert_eq!((listed.first_position, listed.last_position), (Some(1), 3));
    assert_eq!(listed.events(), 3);
    let mut names: Vec<&str> = topics.iter().map(|t| t.name.as_str()).collect();
    let listed_order = names.clone();
    names.sort_unstable();
    assert_eq!(names, listed_order, "by name");
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
    for expected in [ExpectedVersion::Exists, ExpectedVersion::Exactly(1)] {
        let refused = store.append(append("e0", expected)).await;
        assert_eq!(conflict(refused), None, "{expected} of no stream");
    }
    let first = store
        .append(append("e1", ExpectedVersion::NoStream))
        .await
        .unwrap();
    assert_eq!(first.events[0].version, Some(1));
    for expected in [
        ExpectedVersion::NoStream,
        ExpectedVersion::Exactly(0),
        ExpectedVersion::Exactly(2),
    ] {
        let refused = store.append(append("e2", expected)).await;
        assert_eq!(conflict(refused), Some(1), "{expected} of a stream at 1");
    }
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
    let ids: Vec<String> = read_ids(store, &topic).await;
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
        append_keyed(store, &topic, "k", &format!("r{i}")).await;
    }
    let page: Vec<u64> = read_positions(store, &topic, 4, 3).await;
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

/// Every subscription check below, in turn.
pub async fn subscriptions(store: &dyn Store, prefix: &str, advance: Advance<'_>) {
    groups_get_every_event_and_members_share_them(store, prefix).await;
    an_unacked_delivery_comes_again_after_its_lease_and_backoff(store, prefix, advance).await;
    nack_delays_and_extend_holds_a_lease(store, prefix, advance).await;
    a_released_delivery_is_not_counted(store, prefix, advance).await;
    poison_goes_to_the_dead_letter_topic(store, prefix, advance).await;
    key_ordering_holds_one_event_per_key_in_flight(store, prefix).await;
    filters_starts_and_the_in_flight_cap(store, prefix).await;
    seek_delivers_again_from_where_asked(store, prefix).await;
    a_member_that_dies_mid_lease_loses_nothing(store, prefix, advance).await;
    appends_and_settles_move_the_changes_counter(store, prefix).await;
    retention_deletes_the_oldest_and_positions_go_on(store, prefix, advance).await;
    a_groups_status_counts_what_it_has_not_finished(store, prefix, advance).await;
}

/// A group's status: its lag, what is in flight, what waits to be
/// delivered again, and the age of the oldest event it has not finished.
pub async fn a_groups_status_counts_what_it_has_not_finished(
    store: &dyn Store,
    prefix: &str,
    advance: Advance<'_>,
) {
    let topic = format!("{prefix}.status");
    let name = format!("{prefix}-status");
    append_ids(store, &topic, (0..3).map(|i| format!("st{i}"))).await;
    store.subscribe(group(name.clone(), &topic)).await.unwrap();
    advance(Duration::from_secs(5)).await;
    let status = store.subscription_status(&name).await.unwrap();
    assert_eq!(
        (status.lag, status.in_flight, status.redelivering),
        (3, 0, 0)
    );
    assert!(
        status.oldest_unfinished_age_ms.unwrap() >= 5000,
        "{status:?}"
    );
    let taken = store.fetch(&name, 2).await.unwrap();
    assert_eq!(taken.len(), 2);
    let status = store.subscription_status(&name).await.unwrap();
    assert_eq!((status.lag, status.in_flight), (3, 2), "{status:?}");
    assert!(store.ack(&name, &[taken[0].ack_id.clone()]).await.unwrap()[0]);
    let delay = Some(Duration::from_secs(30));
    assert!(store.nack(&name, &taken[1].ack_id, delay).await.unwrap());
    let status = store.subscription_status(&name).await.unwrap();
    assert_eq!(
        (status.lag, status.in_flight, status.redelivering),
        (2, 0, 1),
        "{status:?}"
    );
    let rest = store.fetch(&name, 10).await.unwrap();
    assert_eq!(ids(&rest), ["st2"]);
    assert!(store.ack(&name, &[rest[0].ack_id.clone()]).await.unwrap()[0]);
    advance(Duration::from_secs(31)).await;
    let again = store.fetch(&name, 10).await.unwrap();
    assert!(store.ack(&name, &[again[0].ack_id.clone()]).await.unwrap()[0]);
    let done = store.subscription_status(&name).await.unwrap();
    assert_eq!(
        (done.lag, done.oldest_unfinished_age_ms),
        (0, None),
        "{done:?}"
    );
    assert!(store.subscription_status("no-such-group").await.is_err());
}

/// A group `name` on `topic`, short timings, no ordering.
fn group(name: String, topic: &str) -> SubscriptionConfig {
    SubscriptionConfig {
        ack_wait: Duration::from_secs(10),
        max_in_flight: 100,
        backoff: Backoff {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
        },
        ..SubscriptionConfig::new(name, topic)
    }
}

async fn append_ids(store: &dyn Store, topic: &str, ids: impl IntoIterator<Item = String>) {
    for id in ids {
        store
            .append(Append::to_topic(topic, vec![event(&id, "T")]))
            .await
            .unwrap();
    }
}

/// Appends event `id` (type `T`) to `key`'s stream, whatever its version.
async fn append_keyed(store: &dyn Store, topic: &str, key: &str, id: &str) {
    store
        .append(Append::to_key(
            topic,
            key,
            ExpectedVersion::Any,
            vec![event(id, "T")],
        ))
        .await
        .unwrap();
}

/// The ids of `topic`'s events, in order.
async fn read_ids(store: &dyn Store, topic: &str) -> Vec<String> {
    let events = store.read(topic, 1, 10_000).await.unwrap();
    events.into_iter().map(|e| e.id).collect()
}

/// The positions of up to `limit` of `topic`'s events from `from` on.
async fn read_positions(store: &dyn Store, topic: &str, from: u64, limit: usize) -> Vec<u64> {
    let events = store.read(topic, from, limit).await.unwrap();
    events.iter().map(|e| e.position).collect()
}

fn ids_of(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.id.clone()).collect()
}

fn ids(deliveries: &[Delivery]) -> Vec<String> {
    deliveries.iter().map(|d| d.event.id.clone()).collect()
}

async fn ack_all(store: &dyn Store, name: &str, deliveries: &[Delivery]) {
    let ack_ids: Vec<String> = deliveries.iter().map(|d| d.ack_id.clone()).collect();
    let acked = store.ack(name, &ack_ids).await.unwrap();
    assert!(acked.iter().all(|a| *a), "{name}: {acked:?}");
}

/// Two groups each get all 30 events; three members of one group,
/// fetching and acking in turns, share them, each event once.
pub async fn groups_get_every_event_and_members_share_them(store: &dyn Store, prefix: &str) {
    let topic = format!("{prefix}.share");
    append_ids(store, &topic, (0..30).map(|i| format!("s{i}"))).await;
    let (shared, whole) = (format!("{prefix}-shared"), format!("{prefix}-whole"));
    store
        .subscribe(group(shared.clone(), &topic))
        .await
        .unwrap();
    store.subscribe(group(whole.clone(), &topic)).await.unwrap();
    let mut by_member: HashMap<usize, Vec<String>> = HashMap::new();
    loop {
        let mut any = false;
        for member in 0..3 {
            let got = store.fetch(&shared, 4).await.unwrap();
            any |= !got.is_empty();
            ack_all(store, &shared, &got).await;
            by_member.entry(member).or_default().extend(ids(&got));
        }
        if !any {
            break;
        }
    }
    let mut all: Vec<String> = by_member.values().flatten().cloned().collect();
    assert_eq!(all.len(), 30, "{by_member:?}");
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 30, "an event went to two members");
    assert!(
        by_member.values().all(|got| !got.is_empty()),
        "{by_member:?}"
    );
    let got = store.fetch(&whole, 100).await.unwrap();
    assert_eq!(got.len(), 30, "the other group gets every event");
    assert!(got.iter().all(|d| d.delivery == 1));
}

/// A delivery not acked within `ack_wait` is delivered again once its
/// backoff has passed too; the first delivery's ack id then acks nothing.
pub async fn an_unacked_delivery_comes_again_after_its_lease_and_backoff(
    store: &dyn Store,
    prefix: &str,
    advance: Advance<'_>,
) {
    let topic = format!("{prefix}.lease");
    let name = format!("{prefix}-lease");
    append_ids(store, &topic, ["l0".to_owned()]).await;
    store.subscribe(group(name.clone(), &topic)).await.unwrap();
    let first = store.fetch(&name, 10).await.unwrap();
    assert_eq!(ids(&first), ["l0"]);
    assert!(store.fetch(&name, 10).await.unwrap().is_empty(), "leased");
    advance(Duration::from_secs(10)).await;
    assert!(
        store.fetch(&name, 10).await.unwrap().is_empty(),
        "in its backoff"
    );
    advance(Duration::from_secs(1)).await;
    let second = store.fetch(&name, 10).await.unwrap();
    assert_eq!(
        (ids(&second), second[0].delivery),
        (vec!["l0".to_owned()], 2)
    );
    let stale = store.ack(&name, &[first[0].ack_id.clone()]).await.unwrap();
    assert_eq!(stale, [false], "an old delivery's ack id acks nothing");
    ack_all(store, &name, &second).await;
    advance(Duration::from_secs(60)).await;
    assert!(
        store.fetch(&name, 10).await.unwrap().is_empty(),
        "acked: done"
    );
}

/// A nack's delay holds the event back that long; extend keeps a lease
/// past its first `ack_wait`.
pub async fn nack_delays_and_extend_holds_a_lease(
    store: &dyn Store,
    prefix: &str,
    advance: Advance<'_>,
) {
    let topic = format!("{prefix}.nack");
    let name = format!("{prefix}-nack");
    append_ids(store, &topic, ["n0".to_owned(), "n1".to_owned()]).await;
    store.subscribe(group(name.clone(), &topic)).await.unwrap();
    let got = store.fetch(&name, 10).await.unwrap();
    assert_eq!(ids(&got), ["n0", "n1"]);
    assert!(store
        .nack(&name, &got[0].ack_id, Some(Duration::from_secs(5)))
        .await
        .unwrap());
    advance(Duration::from_secs(4)).await;
    assert!(store.fetch(&name, 10).await.unwrap().is_empty());
    assert!(store.extend(&name, &got[1].ack_id).await.unwrap());
    advance(Duration::from_secs(1)).await;
    let again = store.fetch(&name, 10).await.unwrap();
    assert_eq!(ids(&again), ["n0"], "n0 after its delay; n1 still leased");
    // n1's lease was renewed 5 s ago for 10 s: still good at 9 s, gone at 11 s.
    advance(Duration::from_secs(8)).await;
    assert!(store.extend(&name, &got[1].ack_id).await.unwrap());
    advance(Duration::from_secs(11)).await;
    assert_eq!(
        store.ack(&name, &[got[1].ack_id.clone()]).await.unwrap(),
        [false]
    );
    assert!(!store.nack(&name, &got[1].ack_id, None).await.unwrap());
}

/// A released delivery (nothing reached the consumer) comes again with the
/// same delivery number, after its delay, and never counts toward
/// `max_deliveries`.
pub async fn a_released_delivery_is_not_counted(
    store: &dyn Store,
    prefix: &str,
    advance: Advance<'_>,
) {
    let topic = format!("{prefix}.released");
    let name = format!("{prefix}-released");
    append_ids(store, &topic, ["r0".to_owned()]).await;
    store
        .subscribe(SubscriptionConfig {
            max_deliveries: 2,
            ..group(name.clone(), &topic)
        })
        .await
        .unwrap();
    for _ in 0..5 {
        let got = store.fetch(&name, 10).await.unwrap();
        assert_eq!(got.len(), 1, "still there, never dead-lettered");
        assert_eq!(got[0].delivery, 1, "released deliveries are not counted");
        let delay = Some(Duration::from_secs(2));
        assert!(store.release(&name, &got[0].ack_id, delay).await.unwrap());
        assert!(
            store.fetch(&name, 10).await.unwrap().is_empty(),
            "not before its delay"
        );
        advance(Duration::from_secs(2)).await;
    }
    let got = store.fetch(&name, 10).await.unwrap();
    assert!(store.ack(&name, &[got[0].ack_id.clone()]).await.unwrap()[0]);
    let letters = store.read(&format!("{topic}.dead"), 1, 10).await.unwrap();
    assert!(letters.is_empty(), "{letters:?}");
    assert!(
        !store.release(&name, &got[0].ack_id, None).await.unwrap(),
        "acked: nothing to release"
    );
}

/// After `max_deliveries`, or at once when dead-lettered, an event goes to
/// the dead-letter topic with its reason and subscription, and leaves the
/// group.
pub async fn poison_goes_to_the_dead_letter_topic(
    store: &dyn Store,
    prefix: &str,
    advance: Advance<'_>,
) {
    let topic = format!("{prefix}.poison");
    let name = format!("{prefix}-poison");
    append_ids(store, &topic, ["p0".to_owned(), "p1".to_owned()]).await;
    store
        .subscribe(SubscriptionConfig {
            max_deliveries: 2,
            ..group(name.clone(), &topic)
        })
        .await
        .unwrap();
    let got = store.fetch(&name, 10).await.unwrap();
    assert!(store
        .dead_letter(&name, &got[1].ack_id, "unparseable")
        .await
        .unwrap());
    assert!(store
        .nack(&name, &got[0].ack_id, Some(Duration::ZERO))
        .await
        .unwrap());
    let second = store.fetch(&name, 10).await.unwrap();
    assert_eq!(
        (ids(&second), second[0].delivery),
        (vec!["p0".to_owned()], 2)
    );
    assert!(store
        .nack(&name, &second[0].ack_id, Some(Duration::ZERO))
        .await
        .unwrap());
    advance(Duration::from_secs(1)).await;
    assert!(
        store.fetch(&name, 10).await.unwrap().is_empty(),
        "out of deliveries"
    );
    let letters = store.read(&format!("{topic}.dead"), 1, 10).await.unwrap();
    let found: Vec<(&str, &str, &str)> = letters
        .iter()
        .map(|e| {
            (
                e.id.as_str(),
                e.extensions["deadletterreason"].as_str(),
                e.extensions["deadlettersubscription"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            ("p1", "unparseable", name.as_str()),
            ("p0", "max_deliveries", name.as_str())
        ]
    );
    assert_eq!(letters[1].data, br#"{"id":"p0"}"#);

    // Redriven, both are pending again in the group, deliveries afresh, once.
    let dead = format!("{topic}.dead");
    let waiting = store.dead_letters(&dead, 1).await.unwrap();
    assert_eq!(waiting.waiting, 2);
    assert_eq!(ids_of(&waiting.oldest), ["p1"]);
    assert_eq!(store.redrive(&dead, 10).await.unwrap(), 2);
    let waiting = store.dead_letters(&dead, 10).await.unwrap();
    assert_eq!(
        (waiting.waiting, waiting.oldest.len()),
        (0, 0),
        "redriven letters wait no more"
    );
    assert_eq!(
        store.redrive(&dead, 10).await.unwrap(),
        0,
        "each letter goes back once"
    );
    let back = store.fetch(&name, 10).await.unwrap();
    let back: Vec<(String, u32)> = back
        .iter()
        .map(|d| (d.event.id.clone(), d.delivery))
        .collect();
    assert_eq!(back, [("p0".to_owned(), 1), ("p1".to_owned(), 1)]);
}

/// `ordering = "key"`: at most one event per key in flight, each key's
/// events in version order; events without a key are not held.
pub async fn key_ordering_holds_one_event_per_key_in_flight(store: &dyn Store, prefix: &str) {
    let topic = format!("{prefix}.ordered");
    for (key, id) in [
        ("a", "a1"),
        ("b", "b1"),
        ("a", "a2"),
        ("a", "a3"),
        ("b", "b2"),
    ] {
        append_keyed(store, &topic, key, id).await;
    }
    append_ids(store, &topic, ["free".to_owned()]).await;
    let (ordered, free) = (format!("{prefix}-ordered"), format!("{prefix}-unordered"));
    store
        .subscribe(SubscriptionConfig {
            ordering: Ordering::Key,
            ..group(ordered.clone(), &topic)
        })
        .await
        .unwrap();
    store.subscribe(group(free.clone(), &topic)).await.unwrap();
    let mut rounds = Vec::new();
    loop {
        let got = store.fetch(&ordered, 10).await.unwrap();
        if got.is_empty() {
            break;
        }
        rounds.push(ids(&got));
        ack_all(store, &ordered, &got).await;
    }
    assert_eq!(
        rounds,
        [vec!["a1", "b1", "free"], vec!["a2", "b2"], vec!["a3"]],
        "one per key in flight, in version order"
    );
    assert_eq!(
        store.fetch(&free, 10).await.unwrap().len(),
        6,
        "no ordering: all at once"
    );
}

/// A type filter passes other events by; `start = latest` skips what was
/// there; `max_in_flight` caps the leases out at once.
pub async fn filters_starts_and_the_in_flight_cap(store: &dyn Store, prefix: &str) {
    let topic = format!("{prefix}.filters");
    for (id, ty) in [("f0", "Wanted"), ("f1", "Other"), ("f2", "Wanted")] {
        store
            .append(Append::to_topic(&topic, vec![event(id, ty)]))
            .await
            .unwrap();
    }
    let typed = format!("{prefix}-typed");
    store
        .subscribe(SubscriptionConfig {
            types: vec!["Wanted".into()],
            ..group(typed.clone(), &topic)
        })
        .await
        .unwrap();
    assert_eq!(ids(&store.fetch(&typed, 10).await.unwrap()), ["f0", "f2"]);
    let latest = format!("{prefix}-latest");
    store
        .subscribe(SubscriptionConfig {
            start: Start::Latest,
            ..group(latest.clone(), &topic)
        })
        .await
        .unwrap();
    assert!(store.fetch(&latest, 10).await.unwrap().is_empty());
    append_ids(store, &topic, (3..8).map(|i| format!("f{i}"))).await;
    assert_eq!(store.fetch(&latest, 10).await.unwrap().len(), 5);
    let capped = format!("{prefix}-capped");
    store
        .subscribe(SubscriptionConfig {
            max_in_flight: 3,
            ..group(capped.clone(), &topic)
        })
        .await
        .unwrap();
    let first = store.fetch(&capped, 10).await.unwrap();
    assert_eq!(first.len(), 3);
    assert!(
        store.fetch(&capped, 10).await.unwrap().is_empty(),
        "three in flight"
    );
    ack_all(store, &capped, &first[..1]).await;
    assert_eq!(store.fetch(&capped, 10).await.unwrap().len(), 1);
}

/// Seek moves a group's cursor: back to the start delivers every event
/// again (a read model rebuilt), to a position delivers from there.
pub async fn seek_delivers_again_from_where_asked(store: &dyn Store, prefix: &str) {
    let topic = format!("{prefix}.seek");
    let name = format!("{prefix}-seek");
    append_ids(store, &topic, (0..5).map(|i| format!("k{i}"))).await;
    store.subscribe(group(name.clone(), &topic)).await.unwrap();
    let all = store.fetch(&name, 10).await.unwrap();
    ack_all(store, &name, &all).await;
    store.seek(&name, Seek::Earliest).await.unwrap();
    assert_eq!(
        ids(&store.fetch(&name, 10).await.unwrap()),
        ["k0", "k1", "k2", "k3", "k4"]
    );
    store.seek(&name, Seek::Position(4)).await.unwrap();
    assert_eq!(ids(&store.fetch(&name, 10).await.unwrap()), ["k3", "k4"]);
    store.seek(&name, Seek::Latest).await.unwrap();
    assert!(store.fetch(&name, 10).await.unwrap().is_empty());
}

/// A member that takes events and dies loses none of them: once their
/// leases run out they go to another member, and the dead member's ack
/// ids ack nothing, so no event is acked twice.
pub async fn a_member_that_dies_mid_lease_loses_nothing(
    store: &dyn Store,
    prefix: &str,
    advance: Advance<'_>,
) {
    let topic = format!("{prefix}.dies");
    let name = format!("{prefix}-dies");
    append_ids(store, &topic, (0..5).map(|i| format!("d{i}"))).await;
    store.subscribe(group(name.clone(), &topic)).await.unwrap();
    let dead = store.fetch(&name, 10).await.unwrap();
    assert_eq!(dead.len(), 5);
    advance(Duration::from_secs(11)).await;
    let alive = store.fetch(&name, 10).await.unwrap();
    assert_eq!(ids(&alive), ids(&dead));
    ack_all(store, &name, &alive).await;
    let late: Vec<String> = dead.iter().map(|d| d.ack_id.clone()).collect();
    assert!(store.ack(&name, &late).await.unwrap().iter().all(|a| !a));
}

/// The changes counter moves when events are appended and when a
/// delivery is given back, so waiting consumers wake.
pub async fn appends_and_settles_move_the_changes_counter(store: &dyn Store, prefix: &str) {
    let topic = format!("{prefix}.changes");
    let mut changes = store.changes();
    changes.borrow_and_update();
    append_ids(store, &topic, ["c0".to_owned()]).await;
    assert!(changes.has_changed().unwrap(), "an append");
    let name = format!("{prefix}-changes");
    store.subscribe(group(name.clone(), &topic)).await.unwrap();
    let got = store.fetch(&name, 1).await.unwrap();
    changes.borrow_and_update();
    store.nack(&name, &got[0].ack_id, None).await.unwrap();
    assert!(changes.has_changed().unwrap(), "a nack");
}

/// `max_events` keeps the newest events, `max_age` the recent ones; the
/// deleted ones are gone from reads and from a group's deliveries, and
/// positions and versions go on from where they were.
pub async fn retention_deletes_the_oldest_and_positions_go_on(
    store: &dyn Store,
    prefix: &str,
    advance: Advance<'_>,
) {
    let counted = format!("{prefix}.retained-count");
    for i in 0..5 {
        append_keyed(store, &counted, "k", &format!("m{i}")).await;
    }
    let name = format!("{prefix}-retained");
    store
        .subscribe(group(name.clone(), &counted))
        .await
        .unwrap();
    store
        .retain(Retention {
            topic: counted.clone(),
            max_age: None,
            max_events: Some(3),
        })
        .await
        .unwrap();
    // (The store may have applied it by itself already.)
    store.enforce_retention().await.unwrap();
    let kept: Vec<u64> = read_positions(store, &counted, 1, 10).await;
    assert_eq!(kept, [3, 4, 5]);
    let next = store
        .append(Append::to_key(
            &counted,
            "k",
            ExpectedVersion::Exactly(5),
            vec![event("m5", "T")],
        ))
        .await
        .unwrap();
    assert_eq!(
        (next.events[0].position, next.events[0].version),
        (6, Some(6))
    );
    let delivered = ids(&store.fetch(&name, 10).await.unwrap());
    assert_eq!(
        delivered.first().map(String::as_str),
        Some("m2"),
        "{delivered:?}"
    );

    let aged = format!("{prefix}.retained-age");
    append_ids(store, &aged, ["old0".to_owned(), "old1".to_owned()]).await;
    advance(Duration::from_secs(3600)).await;
    append_ids(store, &aged, ["new0".to_owned()]).await;
    store
        .retain(Retention {
            topic: aged.clone(),
            max_age: Some(Duration::from_secs(1800)),
            max_events: None,
        })
        .await
        .unwrap();
    store.enforce_retention().await.unwrap();
    let kept: Vec<String> = read_ids(store, &aged).await;
    assert_eq!(kept, ["new0"]);
}
