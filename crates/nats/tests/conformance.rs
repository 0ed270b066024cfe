//! The conformance suite of tidegate-events, unchanged, on a private
//! `nats-server -js`.

use std::sync::Arc;
use std::time::Duration;

use tidegate_events::{conformance, Clock, Store};
use tidegate_nats::NatsStore;
use tidegate_testkit::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_store_keeps_every_rule() {
    let server = NatsServer::start();
    let store = NatsStore::connect(&server.url(), Duration::from_secs(120), Clock::Wall, 1)
        .await
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    conformance::all(store, "nats", 64, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_stores_subscriptions_keep_every_rule() {
    let server = NatsServer::start();
    let clock = Clock::manual();
    let store = NatsStore::connect(&server.url(), Duration::from_secs(120), clock.clone(), 1)
        .await
        .unwrap();
    let advance = move |by: Duration| -> tidegate_events::BoxFuture<'static, ()> {
        clock.advance(by);
        Box::pin(async {})
    };
    conformance::subscriptions(&store, "nats", &advance).await;
}
