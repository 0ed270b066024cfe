//! Three `tidegate serve` processes on one `nats-server` (events.store =
//! "nats"), as replicas behind a balancer would be: one subscription's
//! 10 000 events pushed across the three, each once; appends racing at
//! one expected version through different replicas, one wins; a replica
//! SIGKILLed mid-delivery, its leased events delivered by the others.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::time::Duration;

use common::{publish, subscriber, temp_dir, Serve};
use tidegate_testkit::NatsServer;
use tokio::time::Instant;

fn config(
    dir: &std::path::Path,
    nats: &str,
    subscriber: std::net::SocketAddr,
) -> std::path::PathBuf {
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [[upstreams]]\nname = \"worker\"\nendpoints = [\"http://{subscriber}\"]\n\
             [upstreams.policy.bulkhead]\nmax_concurrent = 1000\n\
             [events]\nstore = \"nats\"\nnats_url = \"{nats}\"\nlisten = \"127.0.0.1:0\"\n\
             [[events.subscriptions]]\nname = \"work\"\ntopic = \"jobs\"\nmax_in_flight = 50\nack_wait = \"3s\"\n\
             push = {{ upstream = \"worker\", path = \"/jobs\" }}\n"
        ),
    )
    .unwrap();
    config
}

/// The `result="ack"` count of group `work` on a replica's metrics.
fn acked(serve: &Serve) -> u64 {
    let answer = common::http_get(&serve.admin, "/metrics", "");
    answer
        .lines()
        .find(|l| {
            l.starts_with("tidegate_events_deliveries_total{subscription=\"work\",result=\"ack\"}")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Waits (up to `within`) until `done` holds for what the subscriber saw.
fn until(seen: &std::sync::Mutex<Vec<String>>, within: Duration, done: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if done(&seen.lock().unwrap()) {
            return;
        }
        let count = seen.lock().unwrap().len();
        assert!(
            Instant::now() < deadline,
            "the subscriber saw {count} deliveries"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn three_replicas_share_one_subscription_and_one_expected_version() {
    let server = NatsServer::start();
    let dir = temp_dir("events-replicas");
    let (addr, seen) = subscriber(Duration::ZERO);
    let config = config(&dir, &server.url(), addr);
    let replicas: Vec<Serve> = (0..3).map(|_| Serve::start(&config)).collect();
    let listeners: Vec<String> = replicas.iter().map(|r| r.events_addr.clone()).collect();
    // 10 000 events published through the three, eight at a time.
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let listeners = listeners.clone();
            std::thread::spawn(move || {
                for i in (t..10_000).step_by(8) {
                    let status = publish(&listeners[i % 3], "jobs", &format!("job-{i}"));
                    assert_eq!(status, 201, "job-{i}");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    until(&seen, Duration::from_secs(120), |seen| {
        seen.iter().collect::<BTreeSet<_>>().len() == 10_000
    });
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 10_000, "each delivered once (no lease ran out)");
    // The subscriber notes an event as it answers; the replica counts the
    // ack once the answer has reached it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let per_replica: Vec<u64> = loop {
        let per_replica: Vec<u64> = replicas.iter().map(acked).collect();
        if per_replica.iter().sum::<u64>() >= 10_000 || Instant::now() > deadline {
            break per_replica;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(per_replica.iter().sum::<u64>(), 10_000, "{per_replica:?}");
    assert!(
        per_replica.iter().all(|n| *n > 0),
        "every replica delivered: {per_replica:?}"
    );

    // The same expected version through each replica at once: one wins.
    let racers: Vec<_> = listeners
        .iter()
        .enumerate()
        .map(|(i, events)| {
            let events = events.clone();
            std::thread::spawn(move || {
                let mut stream = std::net::TcpStream::connect(&events).unwrap();
                write!(
                    stream,
                    "POST /v1/topics/orders/events HTTP/1.1\r\nHost: e\r\nce-type: Placed\r\nce-id: race-{i}\r\n\
                     tidegate-key: order-1\r\ntidegate-expected-version: no_stream\r\n\
                     content-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
                )
                .unwrap();
                let mut answer = String::new();
                stream.read_to_string(&mut answer).unwrap();
                answer[9..12].parse::<u16>().unwrap()
            })
        })
        .collect();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for racer in racers {
        *statuses.entry(racer.join().unwrap()).or_default() += 1;
    }
    assert_eq!(statuses, BTreeMap::from([(201, 1), (409, 2)]));
    for replica in replicas {
        replica.stop();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_replica_killed_mid_delivery_loses_nothing() {
    let server = NatsServer::start();
    let dir = temp_dir("events-replica-killed");
    let (addr, seen) = subscriber(Duration::from_millis(20));
    let config = config(&dir, &server.url(), addr);
    let mut replicas: Vec<Serve> = (0..3).map(|_| Serve::start(&config)).collect();
    let mut answered = BTreeSet::new();
    for i in 0..300 {
        let id = format!("k-{i}");
        assert_eq!(publish(&replicas[i % 3].events_addr, "jobs", &id), 201);
        answered.insert(id);
    }
    // Replica 0 dies with whatever it had leased.
    replicas.remove(0).kill();
    until(&seen, Duration::from_secs(120), |seen| {
        answered.iter().all(|id| seen.contains(id))
    });
    for replica in replicas {
        replica.stop();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
