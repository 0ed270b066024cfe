//! The events API on NATS JetStream (`events.store = "nats"`, a private
//! `nats-server -js`): publish, read, pull and push as on SQLite; with the
//! server away, publishes fail at once with 503 and `Retry-After`, `/ready`
//! says so, and everything resumes by itself when it returns.

mod support;

use support::eventually;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, StatusCode};
use serde_json::{json, Value};
use tidegate_gateway::http::server::Running;
use tidegate_testkit::{full, get, send, Answer, NatsServer};

fn events_url(running: &Running, path: &str) -> String {
    format!("http://{}{path}", running.events_addr.unwrap())
}

async fn publish(running: &Running, topic: &str, id: &str) -> Answer {
    let request = Request::post(events_url(running, &format!("/v1/topics/{topic}/events")))
        .header("content-type", "application/json")
        .header("ce-type", "Job")
        .header("ce-id", id);
    tokio::time::timeout(
        Duration::from_secs(10),
        send(request.body(full("{}")).unwrap()),
    )
    .await
    .expect("a publish hung")
}

async fn post_json(url: &str, body: Value) -> Answer {
    send(
        Request::post(url)
            .header("content-type", "application/json")
            .body(full(body.to_string()))
            .unwrap(),
    )
    .await
}

/// A push subscriber noting each delivery's `ce-id`, answering 200.
async fn subscriber() -> (tidegate_testkit::Upstream, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let noted = seen.clone();
    let subscriber =
        tidegate_testkit::Upstream::start(move |req: Request<hyper::body::Incoming>| {
            let noted = noted.clone();
            async move {
                if let Some(id) = req.headers().get("ce-id").and_then(|v| v.to_str().ok()) {
                    noted.lock().unwrap().push(id.to_owned());
                }
                tidegate_testkit::text(200, "ok")
            }
        })
        .await;
    (subscriber, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_api_on_nats_publishes_reads_pulls_and_pushes() {
    let mut server = NatsServer::start();
    let (subscriber, seen) = subscriber().await;
    let running = support::gateway(&format!(
        "[[upstreams]]\nname = \"sink\"\nendpoints = [\"{}\"]\n\
         [events]\nstore = \"nats\"\nnats_url = \"{}\"\nlisten = \"127.0.0.1:0\"\n\
         [[events.subscriptions]]\nname = \"workers\"\ntopic = \"jobs\"\n\
         [[events.subscriptions]]\nname = \"mirror\"\ntopic = \"jobs\"\n\
         push = {{ upstream = \"sink\", path = \"/e\" }}\n",
        subscriber.url(),
        server.url()
    ))
    .await;
    for id in ["a", "b"] {
        let answer = publish(&running, "jobs", id).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    }
    let again = publish(&running, "jobs", "a").await;
    assert_eq!(again.json()["duplicate"], true);
    let read = get(&events_url(&running, "/v1/topics/jobs/events"))
        .await
        .json();
    let positions: Vec<u64> = read["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, [1, 2]);
    let fetched = post_json(
        &events_url(&running, "/v1/subscriptions/workers/fetch"),
        json!({"max": 10, "wait": "5s"}),
    )
    .await
    .json();
    let ids: Vec<&str> = fetched["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["ack_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    let acked = post_json(
        &events_url(&running, "/v1/subscriptions/workers/ack"),
        json!({"ack_ids": ids}),
    )
    .await
    .json();
    assert_eq!(acked["settled"], 2);
    eventually("the pushes", || async {
        let seen = seen.lock().unwrap().clone();
        if seen.len() >= 2 {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;
    let ready = get(&support::admin(&running, "/ready")).await.json();
    assert_eq!(ready["checks"]["event_store"]["store"], "nats");
    assert_eq!(ready["checks"]["event_store"]["status"], "ok");

    // The server goes away: publishes fail at once, never hang.
    server.kill();
    eventually("the gateway to see the server gone", || async {
        let answer = publish(&running, "jobs", "c").await;
        if answer.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(answer.headers["retry-after"], "1");
            Ok(())
        } else {
            Err(format!("{} {}", answer.status, answer.body))
        }
    })
    .await;
    let ready = get(&support::admin(&running, "/ready")).await;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        ready.body
    );

    // It returns: publishing and pushing resume by themselves.
    server.restart();
    eventually("publishing to resume", || async {
        let answer = publish(&running, "jobs", "d").await;
        if answer.status == StatusCode::CREATED {
            Ok(())
        } else {
            Err(answer.body)
        }
    })
    .await;
    eventually("pushing to resume", || async {
        let seen = seen.lock().unwrap().clone();
        if seen.iter().any(|id| id == "d") {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_under_load_loses_no_answered_event_and_stores_none_twice() {
    let mut server = NatsServer::start();
    let (subscriber, seen) = subscriber().await;
    let running = Arc::new(
        support::gateway(&format!(
            "[[upstreams]]\nname = \"sink\"\nendpoints = [\"{}\"]\n\
             [events]\nstore = \"nats\"\nnats_url = \"{}\"\nlisten = \"127.0.0.1:0\"\n\
             [[events.subscriptions]]\nname = \"mirror\"\ntopic = \"load\"\nack_wait = \"3s\"\n\
             push = {{ upstream = \"sink\", path = \"/e\" }}\n",
            subscriber.url(),
            server.url()
        ))
        .await,
    );
    // Four publishers, each sending its ids in turn, an id again until it
    // is answered 201 (stored, or a duplicate of the one stored before
    // the answer was lost).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut publishers = Vec::new();
    for p in 0..4 {
        let (running, stop, answered) = (running.clone(), stop.clone(), answered.clone());
        publishers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = format!("p{p}-{n}");
                let answer = publish(&running, "load", &id).await;
                if answer.status == StatusCode::CREATED {
                    answered.lock().unwrap().push(id);
                    n += 1;
                }
            }
        }));
    }
    let count = || answered.lock().unwrap().len();
    eventually("some load", || async {
        if count() >= 200 {
            Ok(())
        } else {
            Err(count().to_string())
        }
    })
    .await;
    // SIGKILL, then the same store on the same port again.
    server.restart();
    let before = count();
    eventually("publishing to resume after the restart", || async {
        if count() >= before + 200 {
            Ok(())
        } else {
            Err(count().to_string())
        }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in publishers {
        p.await.unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    // Every event answered 201 is in the topic, and none is there twice.
    let mut stored = Vec::new();
    let mut from = 1;
    loop {
        let page = get(&events_url(
            &running,
            &format!("/v1/topics/load/events?from_position={from}&limit=1000"),
        ))
        .await
        .json();
        let events = page["events"].as_array().unwrap();
        if events.is_empty() {
            break;
        }
        stored.extend(events.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        from = page["next_position"].as_u64().unwrap();
    }
    let unique: std::collections::BTreeSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "an event stored twice");
    let missing: Vec<&String> = answered.iter().filter(|id| !unique.contains(id)).collect();
    assert!(missing.is_empty(), "answered 201 but lost: {missing:?}");
    // And every one reaches the subscriber.
    eventually("every answered event pushed", || async {
        let seen = seen.lock().unwrap().clone();
        let seen: std::collections::BTreeSet<&String> = seen.iter().collect();
        let left = answered.iter().filter(|id| !seen.contains(id)).count();
        if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} not pushed yet"))
        }
    })
    .await;
    Arc::try_unwrap(running).unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_a_tls_nats_with_a_private_ca_and_a_client_certificate() {
    let dir = support::Dir::new("nats-tls");
    let path = |file: &str| dir.0.join(file);
    support::write_server_and_client_certificates(&dir, "nats");
    let server = NatsServer::start_tls(
        &path("server.pem"),
        &path("server.key"),
        &path("client-ca.pem"),
    );
    assert!(server.url().starts_with("tls://"), "{}", server.url());
    let config = |client: bool| {
        let client = if client {
            format!(
                ", client_cert = \"{}\", client_key = \"{}\"",
                path("client.pem").display(),
                path("client.key").display()
            )
        } else {
            String::new()
        };
        format!(
            "[events]\nstore = \"nats\"\nnats_url = \"{}\"\nlisten = \"127.0.0.1:0\"\n\
             nats_tls = {{ ca = \"{}\"{client} }}\n",
            server.url(),
            path("server-ca.pem").display(),
        )
    };
    let running = support::gateway(&config(true)).await;
    let answer = publish(&running, "jobs", "over-tls").await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    let read = get(&events_url(&running, "/v1/topics/jobs/events"))
        .await
        .json();
    assert_eq!(read["events"][0]["id"], "over-tls");

    // Without a client certificate the server turns the gateway away.
    let refused = tidegate_gateway::http::server::start(support::parsed(&config(false))).await;
    let Err(why) = refused else {
        panic!("the server requires a client certificate")
    };
    assert!(why.to_string().contains("NATS"), "{why}");
}
