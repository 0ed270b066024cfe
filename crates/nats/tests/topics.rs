//! The topics half on a real `nats-server -js` (a private one per test):
//! gap-free positions and per-key versions, expected versions with the
//! actual one on a conflict, dedup (also of a batch sent again after its
//! stream moved on), atomic batches, and two writers (two replicas)
//! racing on one topic.

use std::time::Duration;

use tidegate_events::{Append, AppendError, ExpectedVersion, NewEvent};
use tidegate_nats::NatsTopics;
use tidegate_testkit::NatsServer;

fn event(id: &str) -> NewEvent {
    NewEvent::new(
        id,
        "/test",
        "Happened",
        format!("{{\"id\":\"{id}\"}}").into_bytes(),
    )
}

async fn topics(server: &NatsServer) -> NatsTopics {
    NatsTopics::connect(&server.url(), Duration::from_secs(120))
        .await
        .unwrap()
}

#[tokio::test]
async fn positions_are_gap_free_and_versions_count_per_key() {
    let server = NatsServer::start();
    let topics = topics(&server).await;
    let mut seen = Vec::new();
    for (i, key) in ["a", "b", "a", "", "b", "a"].into_iter().enumerate() {
        let e = event(&format!("g{i}"));
        let append = match key {
            "" => Append::to_topic("orders.eu", vec![e]),
            key => Append::to_key("orders.eu", key, ExpectedVersion::Any, vec![e]),
        };
        let stored = topics.append(append).await.unwrap().events;
        assert_eq!(stored[0].position, i as u64 + 1);
        seen.push(stored[0].version);
    }
    assert_eq!(seen, [Some(1), Some(1), Some(2), None, Some(2), Some(3)]);
    let read = topics.read("orders.eu", 1, 100).await.unwrap();
    let positions: Vec<u64> = read.iter().map(|e| e.position).collect();
    assert_eq!(positions, [1, 2, 3, 4, 5, 6]);
    assert_eq!(read[0].data, br#"{"id":"g0"}"#);
    let from_four: Vec<String> = topics
        .read("orders.eu", 4, 2)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(from_four, ["g3", "g4"]);
    let stream: Vec<(String, Option<u64>)> = topics
        .read_stream("orders.eu", "a", 2, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.id, e.version))
        .collect();
    assert_eq!(
        stream,
        [("g2".to_owned(), Some(2)), ("g5".to_owned(), Some(3))]
    );
    assert_eq!(topics.last_position("orders.eu").await.unwrap(), 6);
    assert_eq!(topics.last_position("nothing").await.unwrap(), 0);
    assert!(topics.read("nothing", 1, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn expected_versions_batches_and_duplicates() {
    let server = NatsServer::start();
    let topics = topics(&server).await;
    let at = |expected, ids: &[&str]| {
        Append::to_key("t", "k", expected, ids.iter().map(|id| event(id)).collect())
    };
    let first = topics
        .append(at(ExpectedVersion::NoStream, &["a1", "a2"]))
        .await
        .unwrap();
    let places: Vec<(u64, Option<u64>)> = first
        .events
        .iter()
        .map(|s| (s.position, s.version))
        .collect();
    assert_eq!(
        places,
        [(1, Some(1)), (2, Some(2))],
        "a batch: consecutive, whole"
    );
    match topics
        .append(at(ExpectedVersion::Exactly(1), &["b1"]))
        .await
    {
        Err(AppendError::Conflict { actual, .. }) => assert_eq!(actual, Some(2)),
        other => panic!("{other:?}"),
    }
    match topics.append(at(ExpectedVersion::NoStream, &["b2"])).await {
        Err(AppendError::Conflict { actual, .. }) => assert_eq!(actual, Some(2)),
        other => panic!("{other:?}"),
    }
    let next = topics
        .append(at(ExpectedVersion::Exactly(2), &["c1"]))
        .await
        .unwrap();
    assert_eq!(
        (next.events[0].position, next.events[0].version),
        (3, Some(3))
    );
    // The first batch sent again after its stream moved on: the answer of
    // the append that stored it, nothing stored again.
    let again = topics
        .append(at(ExpectedVersion::NoStream, &["a1", "a2"]))
        .await
        .unwrap();
    assert!(again.events.iter().all(|s| s.duplicate));
    assert_eq!(
        again
            .events
            .iter()
            .map(|s| (s.position, s.version))
            .collect::<Vec<_>>(),
        places
    );
    let again = topics
        .append(Append::to_topic("t", vec![event("c1")]))
        .await
        .unwrap();
    assert!(again.events[0].duplicate);
    assert_eq!(again.events[0].position, 3);
    assert_eq!(topics.last_position("t").await.unwrap(), 3);
    // Invalid appends are refused before anything is sent.
    for bad in [
        Append::to_topic("t", vec![]),
        Append::to_key("t", "k", ExpectedVersion::Any, vec![event("x"), event("x")]),
        Append {
            expected: ExpectedVersion::Exactly(1),
            ..Append::to_topic("t", vec![event("y")])
        },
    ] {
        assert!(matches!(
            topics.append(bad).await,
            Err(AppendError::Invalid(_))
        ));
    }
    assert_eq!(topics.last_position("t").await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_gap_free_topic_and_one_expected_version_wins() {
    let server = NatsServer::start();
    let (one, two) = (topics(&server).await, topics(&server).await);
    let mut tasks = tokio::task::JoinSet::new();
    for (name, writer) in [("one", one.clone()), ("two", two.clone())] {
        tasks.spawn(async move {
            for i in 0..100 {
                let e = event(&format!("{name}-{i}"));
                writer
                    .append(Append::to_topic("shared", vec![e]))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let positions: Vec<u64> = one
        .read("shared", 1, 1000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(
        positions,
        (1..=200).collect::<Vec<_>>(),
        "every position once, no gap"
    );

    // Both at the same expected version of one key: exactly one wins.
    let mut racing = tokio::task::JoinSet::new();
    for (name, writer) in [("one", one), ("two", two)] {
        racing.spawn(async move {
            let e = event(&format!("race-{name}"));
            writer
                .append(Append::to_key(
                    "shared",
                    "k",
                    ExpectedVersion::NoStream,
                    vec![e],
                ))
                .await
        });
    }
    let mut won = 0;
    while let Some(result) = racing.join_next().await {
        match result.unwrap() {
            Ok(_) => won += 1,
            Err(AppendError::Conflict { actual, .. }) => assert_eq!(actual, Some(1)),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(won, 1);
}

/// Each replica's writer keeps many appends in flight at once; when the
/// other replica gets one in between, every later one of the run must be
/// refused and computed again, never stored on the stale positions and
/// versions it was computed from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_with_many_appends_in_flight_store_each_once_at_its_own_place() {
    let server = NatsServer::start();
    let (one, two) = (topics(&server).await, topics(&server).await);
    // The window is narrow: three topics, three chances.
    for topic in ["busy-1", "busy-2", "busy-3"] {
        in_flight_race(&one, &two, topic).await;
    }
}

async fn in_flight_race(one: &NatsTopics, two: &NatsTopics, topic: &'static str) {
    let mut tasks = tokio::task::JoinSet::new();
    // Many in flight through one; one at a time through the other, whose
    // single messages land between those of a run.
    for (name, writer, publishers, appends) in
        [("one", one.clone(), 16, 40), ("two", two.clone(), 1, 120)]
    {
        for publisher in 0..publishers {
            let writer = writer.clone();
            tasks.spawn(async move {
                let mut answered = Vec::new();
                for i in 0..appends {
                    let id = format!("{name}-{publisher}-{i}");
                    let key = format!("k{}", i % 4);
                    // Batches of one and two: a message computed on a stale
                    // position would land off by one.
                    let mut batch = vec![event(&id)];
                    if i % 3 == 0 {
                        batch.push(event(&format!("{id}+")));
                    }
                    let append = if i % 2 == 0 {
                        Append::to_topic(topic, batch)
                    } else {
                        Append::to_key(topic, &key, ExpectedVersion::Any, batch)
                    };
                    let stored = writer.append(append).await.unwrap().events;
                    for e in &stored {
                        answered.push((e.id.clone(), e.position, e.version));
                    }
                    // Each one sent again is answered as the first was.
                    if i % 10 == 0 {
                        let again = Append::to_topic(
                            topic,
                            vec![event(&format!("{name}-{publisher}-{i}"))],
                        );
                        let stored_again = writer.append(again).await.unwrap().events;
                        assert!(stored_again[0].duplicate);
                        assert_eq!(stored_again[0].position, stored[0].position);
                    }
                }
                answered
            });
        }
    }
    let mut answered = Vec::new();
    while let Some(done) = tasks.join_next().await {
        answered.extend(done.unwrap());
    }
    let events = one.read(topic, 1, 10_000).await.unwrap();
    assert_eq!(answered.len(), 16 * 54 + 160);
    assert_eq!(events.len(), answered.len(), "every event stored once");
    let first_off = events
        .iter()
        .enumerate()
        .find(|(i, e)| e.position != *i as u64 + 1);
    assert!(
        first_off.is_none(),
        "a gap or a position twice: {first_off:?}"
    );
    let mut ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "no id stored twice");
    for (id, position, version) in &answered {
        let stored = &events[*position as usize - 1];
        assert_eq!(&stored.id, id, "answered at the place it is stored");
        assert_eq!(&stored.version, version);
    }
    for k in 0..4 {
        let key = format!("k{k}");
        let versions: Vec<Option<u64>> = events
            .iter()
            .filter(|e| e.key.as_deref() == Some(key.as_str()))
            .map(|e| e.version)
            .collect();
        let expected: Vec<Option<u64>> = (1..=versions.len() as u64).map(Some).collect();
        assert_eq!(versions, expected, "key {key}'s versions count one by one");
    }
}

#[tokio::test]
async fn what_was_answered_survives_a_server_restart() {
    let mut server = NatsServer::start();
    let topics = topics(&server).await;
    for i in 0..3 {
        topics
            .append(Append::to_topic("kept", vec![event(&format!("k{i}"))]))
            .await
            .unwrap();
    }
    server.restart();
    let fresh = NatsTopics::connect(&server.url(), Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(fresh.read("kept", 1, 10).await.unwrap().len(), 3);
    let next = fresh
        .append(Append::to_topic("kept", vec![event("k3")]))
        .await
        .unwrap();
    assert_eq!(next.events[0].position, 4);
}

#[tokio::test]
async fn retention_deletes_whole_old_appends_keeps_the_last_and_positions_go_on() {
    let server = NatsServer::start();
    let clock = tidegate_events::Clock::manual();
    let topics = topics(&server).await.clock(clock.clone());
    for i in 0..6 {
        topics
            .append(Append::to_topic("kept", vec![event(&format!("e{i}"))]))
            .await
            .unwrap();
    }
    topics.retain(tidegate_events::Retention {
        topic: "kept".into(),
        max_age: None,
        max_events: Some(3),
    });
    assert_eq!(topics.enforce_retention().await.unwrap(), 3);
    let positions = |events: Vec<tidegate_events::Event>| -> Vec<u64> {
        events.iter().map(|e| e.position).collect()
    };
    assert_eq!(
        positions(topics.read("kept", 1, 10).await.unwrap()),
        [4, 5, 6]
    );
    let next = topics
        .append(Append::to_topic("kept", vec![event("e6")]))
        .await
        .unwrap();
    assert_eq!(next.events[0].position, 7, "positions go on");
    let listed = topics.topics().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].name.as_str(),
            listed[0].first_position,
            listed[0].last_position
        ),
        ("kept", Some(4), 7)
    );
    // Everything past its age: all but the last append go.
    let wall = Duration::from_millis(tidegate_events::Clock::Wall.now_millis());
    clock.advance(wall + Duration::from_secs(3600));
    topics.retain(tidegate_events::Retention {
        topic: "kept".into(),
        max_age: Some(Duration::from_secs(60)),
        max_events: None,
    });
    assert_eq!(topics.enforce_retention().await.unwrap(), 3);
    assert_eq!(positions(topics.read("kept", 1, 10).await.unwrap()), [7]);
    let next = topics
        .append(Append::to_topic("kept", vec![event("e7")]))
        .await
        .unwrap();
    assert_eq!(next.events[0].position, 8);
}
