//! The Redis store against a real `redis-server` of the test's own.

use std::collections::BTreeSet;
use std::time::Duration;

use tidegate_redis::{state_key, RedisConfig, RedisStore};
use tidegate_resilience::ratelimit::{Algorithm, Decision, Limit, LocalStore, Quota};
use tidegate_testkit::{RedisCluster, RedisServer};
use tokio::time::Instant;

fn store(server: &RedisServer) -> RedisStore {
    RedisStore::open(&RedisConfig::new(server.url())).expect("a good URL")
}

/// `n` an hour: nothing refills during a test.
fn hourly(algorithm: Algorithm, n: u32) -> Limit {
    Limit::new(algorithm, Quota::per_hour(n))
}

fn close(a: Option<Duration>, b: Option<Duration>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.abs_diff(b) < Duration::from_secs(2),
        (a, b) => a.is_none() && b.is_none(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_algorithm_decides_as_the_local_store_does() {
    let server = RedisServer::start();
    let redis = store(&server);
    let local = LocalStore::default();
    for algorithm in Algorithm::ALL {
        let limit = hourly(algorithm, 5);
        let key = format!("client\0{}", algorithm.as_str());
        for n in 0..7 {
            let there = redis.decide(&key, &limit, 1).await.unwrap();
            let here = local.check_now(&key, &limit, 1);
            let what = format!("{algorithm:?}, request {n}: redis {there:?}, local {here:?}");
            assert_eq!(there.allowed, n < 5, "{what}");
            assert_eq!(
                (there.allowed, there.remaining),
                (here.allowed, here.remaining),
                "{what}"
            );
            assert_eq!(there.limit, 5, "{what}");
            assert!(
                there.reset > Duration::ZERO && there.reset <= Duration::from_secs(7200),
                "{what}"
            );
            assert_eq!(there.retry_after.is_some(), !there.allowed, "{what}");
            // Windows are aligned to the epoch there and to the store's start
            // here, so only the algorithms without windows agree on times.
            if matches!(
                algorithm,
                Algorithm::SlidingLog | Algorithm::TokenBucket | Algorithm::Gcra
            ) {
                assert!(close(Some(there.reset), Some(here.reset)), "{what}");
                assert!(close(there.retry_after, here.retry_after), "{what}");
            }
        }
        let big = redis
            .decide(&format!("{key}-big"), &limit, 6)
            .await
            .unwrap();
        assert!(
            !big.allowed && big.retry_after.is_none(),
            "{algorithm:?}: {big:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_connections_racing_for_one_key_admit_exactly_the_limit() {
    const L: u32 = 20;
    let server = RedisServer::start();
    let replicas = [store(&server), store(&server), store(&server)];
    for algorithm in Algorithm::ALL {
        let limit = hourly(algorithm, L);
        let mut tasks = Vec::new();
        for i in 0..3 * L as usize {
            let replica = replicas[i % 3].clone();
            tasks.push(tokio::spawn(async move {
                replica.decide("shared", &limit, 1).await
            }));
        }
        let mut decisions: Vec<Decision> = Vec::new();
        for task in tasks {
            decisions.push(task.await.unwrap().unwrap());
        }
        let admitted: Vec<u32> = decisions
            .iter()
            .filter(|d| d.allowed)
            .map(|d| d.remaining)
            .collect();
        assert_eq!(admitted.len(), L as usize, "{algorithm:?}");
        let remaining: BTreeSet<u32> = admitted.into_iter().collect();
        assert_eq!(
            remaining,
            (0..L).collect(),
            "{algorithm:?}: each count seen once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_script_is_loaded_again() {
    let server = RedisServer::start();
    let redis = store(&server);
    let limit = hourly(Algorithm::Gcra, 3);
    assert_eq!(redis.decide("k", &limit, 1).await.unwrap().remaining, 2);
    assert!(server.command(&["SCRIPT", "FLUSH"]).starts_with("+OK"));
    assert_eq!(redis.decide("k", &limit, 1).await.unwrap().remaining, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_expires_once_it_is_as_good_as_fresh_and_keys_carry_a_hash_tag() {
    let server = RedisServer::start();
    let redis = store(&server);
    let limit = Limit::new(Algorithm::FixedWindow, Quota::per_second(10));
    redis.decide("tagged", &limit, 1).await.unwrap();
    let key = state_key("tagged", &limit);
    assert_eq!(key, "tidegate:{tagged}:fixed_window");
    let ttl = server.command(&["PTTL", &key]);
    let ms: i64 = ttl.trim_start_matches(':').trim().parse().unwrap();
    assert!((1..=1000).contains(&ms), "{ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_quota_keeps_what_was_counted() {
    let server = RedisServer::start();
    let redis = store(&server);
    redis
        .decide("k", &hourly(Algorithm::Gcra, 4), 1)
        .await
        .unwrap();
    redis
        .decide("k", &hourly(Algorithm::Gcra, 4), 1)
        .await
        .unwrap();
    let d = redis
        .decide("k", &hourly(Algorithm::Gcra, 8), 1)
        .await
        .unwrap();
    assert_eq!(d.remaining, 5, "two of four become four of eight: {d:?}");
}

/// Decides until Redis answers; how long that took.
async fn until_counted(redis: &RedisStore, limit: &Limit) -> Duration {
    let start = Instant::now();
    while redis.decide("k", limit, 1).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "not back within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_fails_fast_then_the_breaker_answers_and_counting_resumes() {
    let mut server = RedisServer::start();
    let redis = store(&server);
    let limit = hourly(Algorithm::SlidingWindow, 100);
    redis.decide("k", &limit, 1).await.unwrap();
    assert!(redis.ping().await);
    server.kill();
    let mut unavailable = 0;
    for _ in 0..6 {
        let start = Instant::now();
        let err = redis.decide("k", &limit, 1).await.unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(1), "{err}");
        unavailable += usize::from(err.is_unavailable());
    }
    assert!(unavailable >= 3, "the breaker opened after three failures");
    assert!(!redis.is_up());
    server.restart();
    until_counted(&redis, &limit).await;
    assert!(redis.is_up());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mute_server_times_out_instead_of_holding_the_request() {
    let server = RedisServer::start();
    let redis = store(&server);
    let limit = hourly(Algorithm::Gcra, 100);
    redis.decide("k", &limit, 1).await.unwrap();
    server.pause(true);
    let start = Instant::now();
    let err = redis.decide("k", &limit, 1).await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    server.pause(false);
    until_counted(&redis, &limit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_down_at_start_is_not_an_error() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.kill();
    let redis = RedisStore::open(&RedisConfig::new(url)).unwrap();
    let limit = hourly(Algorithm::TokenBucket, 10);
    assert!(redis.decide("k", &limit, 1).await.is_err());
    server.restart();
    until_counted(&redis, &limit).await;
}

#[test]
fn a_bad_url_is_refused_without_quoting_it() {
    let err = tidegate_redis::check_url("http://user:hunter2@host").unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_keys_spread_over_the_nodes_and_one_key_is_counted_once() {
    let cluster = RedisCluster::start();
    let config = RedisConfig {
        cluster: true,
        ..RedisConfig::new(cluster.url())
    };
    let replicas = [
        RedisStore::open(&config).unwrap(),
        RedisStore::open(&config).unwrap(),
    ];
    // Connecting discovers the nodes; wait for it rather than for a timeout.
    let start = Instant::now();
    for replica in &replicas {
        while !replica.ping().await {
            assert!(start.elapsed() < Duration::from_secs(10), "never connected");
        }
    }
    let limit = hourly(Algorithm::SlidingWindow, 3);
    for client in 0..30 {
        let key = format!("client-{client}");
        let mut admitted = Vec::new();
        for i in 0..4 {
            let decision = replicas[i % 2].decide(&key, &limit, 1).await.unwrap();
            admitted.push(decision.allowed);
        }
        assert_eq!(admitted, [true, true, true, false], "{key}");
    }
    for node in &cluster.nodes {
        let keys = node.command(&["DBSIZE"]);
        assert_ne!(keys, ":0\r\n", "every node holds some of the 30 clients");
    }
}
