//! Two stores on one `nats-server`, as two gateway replicas see it: an
//! append through one wakes the other's consumers; one group's members on
//! both share its events; a member that dies mid-lease on one loses
//! nothing, the other delivers its events.

use std::collections::BTreeSet;
use std::time::Duration;

use tidegate_events::{Append, Clock, NewEvent, Store, SubscriptionConfig};
use tidegate_nats::NatsStore;
use tidegate_testkit::NatsServer;

fn event(id: &str) -> NewEvent {
    NewEvent::new(id, "/test", "Happened", b"{}".to_vec())
}

async fn store(server: &NatsServer, clock: &Clock) -> NatsStore {
    NatsStore::connect(&server.url(), Duration::from_secs(120), clock.clone(), 1)
        .await
        .unwrap()
}

fn group(topic: &str) -> SubscriptionConfig {
    SubscriptionConfig {
        ack_wait: Duration::from_secs(10),
        max_in_flight: 1000,
        ..SubscriptionConfig::new("shared", topic)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_through_one_replica_wakes_the_others_consumers() {
    let server = NatsServer::start();
    let clock = Clock::manual();
    let (one, two) = (store(&server, &clock).await, store(&server, &clock).await);
    two.subscribe(group("woken")).await.unwrap();
    let mut changes = two.changes();
    changes.borrow_and_update();
    one.append(Append::to_topic("woken", vec![event("w1")]))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), changes.changed())
        .await
        .expect("the other replica's consumers were not woken")
        .unwrap();
    let got = two.fetch("shared", 10).await.unwrap();
    assert_eq!(got[0].event.id, "w1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_on_two_replicas_share_a_group_and_a_dead_ones_events_go_to_the_other() {
    let server = NatsServer::start();
    let clock = Clock::manual();
    let (one, two) = (store(&server, &clock).await, store(&server, &clock).await);
    for s in [&one, &two] {
        s.subscribe(group("jobs")).await.unwrap();
    }
    for i in 0..100 {
        one.append(Append::to_topic("jobs", vec![event(&format!("j{i}"))]))
            .await
            .unwrap();
    }
    // Member one takes some and dies with them.
    let lost = one.fetch("shared", 10).await.unwrap();
    assert_eq!(lost.len(), 10);
    // Member two takes the rest, each once.
    let mut seen = BTreeSet::new();
    loop {
        let got = two.fetch("shared", 25).await.unwrap();
        if got.is_empty() {
            break;
        }
        let ids: Vec<String> = got.iter().map(|d| d.ack_id.clone()).collect();
        assert!(two.ack("shared", &ids).await.unwrap().iter().all(|a| *a));
        for d in got {
            assert!(seen.insert(d.event.id), "delivered twice");
        }
    }
    assert_eq!(seen.len(), 90);
    // The dead member's leases run out (and their backoff): the other
    // replica delivers them, and the dead member's acks ack nothing.
    clock.advance(Duration::from_secs(12));
    let again = two.fetch("shared", 25).await.unwrap();
    let mut redelivered: Vec<&str> = again.iter().map(|d| d.event.id.as_str()).collect();
    let mut expected: Vec<&str> = lost.iter().map(|d| d.event.id.as_str()).collect();
    redelivered.sort_unstable();
    expected.sort_unstable();
    assert_eq!(redelivered, expected);
    let late: Vec<String> = lost.iter().map(|d| d.ack_id.clone()).collect();
    assert!(one.ack("shared", &late).await.unwrap().iter().all(|a| !a));
    let ids: Vec<String> = again.iter().map(|d| d.ack_id.clone()).collect();
    assert!(two.ack("shared", &ids).await.unwrap().iter().all(|a| *a));
    assert_eq!(two.lag("shared").await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_three_node_cluster_publishing_and_delivery_go_on_when_a_node_dies() {
    let mut cluster = tidegate_testkit::NatsCluster::start();
    // The wall clock: a lease whose ack was lost in the failover runs out.
    let clock = Clock::Wall;
    // Until the cluster has elected its JetStream leaders.
    let store = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let tried = async {
                let store =
                    NatsStore::connect(&cluster.url(), Duration::from_secs(120), clock.clone(), 3)
                        .await?;
                store
                    .subscribe(SubscriptionConfig {
                        ack_wait: Duration::from_secs(2),
                        backoff: tidegate_events::Backoff {
                            base_delay: Duration::from_millis(100),
                            max_delay: Duration::from_millis(100),
                        },
                        ..group("replicated")
                    })
                    .await?;
                Ok::<_, tidegate_events::StoreError>(store)
            };
            match tried.await {
                Ok(store) => break store,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("the cluster never served: {e}"),
            }
        }
    };
    // Appends and deliveries, retried while a leader is being elected.
    async fn round(store: &NatsStore, from: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut i = from;
        while i < from + 10 {
            match store
                .append(Append::to_topic(
                    "replicated",
                    vec![event(&format!("r{i}"))],
                ))
                .await
            {
                Ok(_) => i += 1,
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "no append: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        let mut done = 0;
        while done < 10 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{done} of 10 delivered and acked"
            );
            match store.fetch("shared", 10).await {
                Ok(got) => {
                    let ids: Vec<String> = got.iter().map(|d| d.ack_id.clone()).collect();
                    if let Ok(acked) = store.ack("shared", &ids).await {
                        done += acked.iter().filter(|a| **a).count();
                    }
                }
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "no delivery: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    round(&store, 0).await;
    cluster.nodes[0].kill();
    round(&store, 10).await;
    let positions: Vec<u64> = store
        .read("replicated", 1, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(
        positions,
        (1..=20).collect::<Vec<_>>(),
        "gap-free across the loss"
    );
}
