//! The event metrics: a metered store keeps every rule, and counts what
//! passes through it under DESIGN.md's names.

use std::time::Duration;

use prometheus_client::registry::Registry;
use tidegate_events::metrics::{EventMetrics, Metered};
use tidegate_events::{
    conformance, Append, Clock, ExpectedVersion, NewEvent, Options, SqliteStore, Store,
    SubscriptionConfig,
};

fn open(name: &str, clock: Clock) -> (SqliteStore, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("tidegate-metrics-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let options = Options {
        clock,
        ..Options::default()
    };
    (
        SqliteStore::open(dir.join("events.db"), options).unwrap(),
        dir,
    )
}

fn event(id: &str) -> NewEvent {
    NewEvent::new(id, "test", "T", b"{}".to_vec())
}

#[tokio::test]
async fn a_metered_store_keeps_every_subscription_rule() {
    let clock = Clock::manual();
    let (store, dir) = open("rules", clock.clone());
    let store = Metered::new(store, EventMetrics::default(), "sqlite");
    let advance = move |by: Duration| -> tidegate_events::BoxFuture<'static, ()> {
        clock.advance(by);
        Box::pin(async {})
    };
    conformance::subscriptions(&store, "metered", &advance).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn appends_and_settled_deliveries_are_counted() {
    let (store, dir) = open("counts", Clock::Wall);
    let metrics = EventMetrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let store = Metered::new(store, metrics.clone(), "sqlite");
    store
        .subscribe(SubscriptionConfig::new("g", "t"))
        .await
        .unwrap();
    for id in ["a", "b", "c", "a"] {
        store
            .append(Append::to_topic("t", vec![event(id)]))
            .await
            .unwrap();
    }
    store
        .append(Append::to_key(
            "t",
            "k",
            ExpectedVersion::Exists,
            vec![event("d")],
        ))
        .await
        .unwrap_err();
    assert_eq!(store.lag("g").await.unwrap(), 3);
    let got = store.fetch("g", 10).await.unwrap();
    store.ack("g", &[got[0].ack_id.clone()]).await.unwrap();
    store.nack("g", &got[1].ack_id, None).await.unwrap();
    store.dead_letter("g", &got[2].ack_id, "bad").await.unwrap();
    metrics.set_lag("g", store.lag("g").await.unwrap());

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        r#"tidegate_events_published_total{topic="t",result="stored"} 3"#,
        r#"tidegate_events_published_total{topic="t",result="duplicate"} 1"#,
        r#"tidegate_events_published_total{topic="t",result="conflict"} 1"#,
        r#"tidegate_events_deliveries_total{subscription="g",result="ack"} 1"#,
        r#"tidegate_events_deliveries_total{subscription="g",result="retry"} 1"#,
        r#"tidegate_events_deliveries_total{subscription="g",result="dead_letter"} 1"#,
        r#"tidegate_events_lag{subscription="g"} 1"#,
        r#"tidegate_events_delivery_duration_seconds_count{subscription="g"} 3"#,
        r#"tidegate_events_append_duration_seconds_count{store="sqlite"} 4"#,
    ] {
        assert!(text.lines().any(|l| l.starts_with(line)), "{line}\n{text}");
    }
    // A dead letter is counted as a delivery's end, not as a publish.
    assert!(!text.contains(r#"topic="t.dead""#), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}
