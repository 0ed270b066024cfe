//! The events API over real sockets: publish in every mode, dedup,
//! expected versions, bad input storing nothing, reads, pull
//! subscriptions shared by workers, API keys with topic patterns.

mod support;

use support::{eventually, Dir};

use std::time::Duration;

use http::{header, Request, StatusCode};
use serde_json::{json, Value};
use tidegate_gateway::http::server::Running;
use tidegate_testkit::{full, get, send, Answer};

/// A gateway with `[events]` (`events_extra` under it, then `rest`).
async fn gateway(dir: &Dir, events_extra: &str, rest: &str) -> Running {
    support::gateway(&format!(
        "[events]\npath = \"{}\"\nlisten = \"127.0.0.1:0\"\n{events_extra}\n{rest}",
        dir.0.join("events.db").display()
    ))
    .await
}

fn events_url(running: &Running, path: &str) -> String {
    format!(
        "http://{}{path}",
        running.events_addr.expect("events listener")
    )
}

async fn post(url: &str, headers: &[(&str, &str)], body: impl Into<String>) -> Answer {
    let mut request = Request::post(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(request.body(full(body.into())).unwrap()).await
}

async fn post_json(url: &str, body: Value) -> Answer {
    post(
        url,
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

fn structured(id: &str, ty: &str, extra: Value) -> Value {
    let mut event = json!({"specversion": "1.0", "id": id, "source": "/test", "type": ty});
    if let (Value::Object(event), Value::Object(extra)) = (&mut event, extra) {
        event.extend(extra);
    }
    event
}

async fn publish(running: &Running, topic: &str, event: Value) -> Answer {
    post(
        &events_url(running, &format!("/v1/topics/{topic}/events")),
        &[("content-type", "application/cloudevents+json")],
        event.to_string(),
    )
    .await
}

async fn read_ids(running: &Running, topic: &str) -> Vec<String> {
    let answer = get(&events_url(running, &format!("/v1/topics/{topic}/events"))).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    answer.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn every_publish_mode_is_stored_and_read_back() {
    let dir = Dir::new("events-modes");
    let running = gateway(&dir, "", "").await;
    // Structured, with JSON data and an extension.
    let answer = publish(
        &running,
        "content",
        structured(
            "e1",
            "Uploaded",
            json!({"data": {"size": 3}, "subject": "a.txt"}),
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    assert_eq!(
        answer.json(),
        json!({"id": "e1", "topic": "content", "position": 1, "key": null, "version": null, "duplicate": false})
    );
    // Binary mode: ce-* headers, the data as body.
    let answer = post(
        &events_url(&running, "/v1/topics/content/events"),
        &[
            ("content-type", "text/plain"),
            ("ce-specversion", "1.0"),
            ("ce-id", "e2"),
            ("ce-source", "/test"),
            ("ce-type", "Noted"),
            ("tidegate-key", "doc-1"),
        ],
        "hello",
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    assert_eq!(
        (
            answer.json()["position"].as_u64(),
            answer.json()["version"].as_u64()
        ),
        (Some(2), Some(1))
    );
    // Plain JSON with only a type: the gateway names it.
    let answer = post(
        &events_url(&running, "/v1/topics/content/events"),
        &[("content-type", "application/json"), ("ce-type", "Plain")],
        r#"{"n":1}"#,
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    // A batch to one key, atomic.
    let batch = json!([
        structured("b1", "Edited", json!({"partitionkey": "doc-1"})),
        structured(
            "b2",
            "Edited",
            json!({"partitionkey": "doc-1", "data_base64": "AAE="})
        ),
    ]);
    let answer = post(
        &events_url(&running, "/v1/topics/content/events"),
        &[("content-type", "application/cloudevents-batch+json")],
        batch.to_string(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    let versions: Vec<u64> = answer.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [2, 3]);

    let read = get(&events_url(
        &running,
        "/v1/topics/content/events?from_position=1&limit=10",
    ))
    .await;
    let body = read.json();
    let events = body["events"].as_array().unwrap();
    assert_eq!(events.len(), 5);
    assert_eq!(events[0]["data"], json!({"size": 3}));
    assert_eq!(events[0]["subject"], "a.txt");
    assert_eq!(events[1]["data"], "hello");
    assert_eq!(events[1]["datacontenttype"], "text/plain");
    assert_eq!(events[2]["source"], "tidegate");
    assert_eq!(events[4]["data_base64"], "AAE=");
    assert_eq!(body["next_position"], 6);
    // Reads page.
    let page = get(&events_url(
        &running,
        "/v1/topics/content/events?from_position=4&limit=1",
    ))
    .await;
    assert_eq!(page.json()["events"][0]["id"], "b1");
    assert_eq!(page.json()["next_position"], 5);
    // One key's stream.
    let stream = get(&events_url(
        &running,
        "/v1/topics/content/streams/doc-1?from_version=2",
    ))
    .await;
    let ids: Vec<String> = stream.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["b1", "b2"]);
    running.shutdown().await;
}

#[tokio::test]
async fn duplicates_conflicts_and_bad_input_store_nothing() {
    let dir = Dir::new("events-refusals");
    let running = gateway(&dir, "max_body_bytes = 2048", "").await;
    let keyed = |id: &str, expected: &str| {
        structured(
            id,
            "Created",
            json!({"partitionkey": "order-1", "expectedversion": expected}),
        )
    };
    assert_eq!(
        publish(&running, "orders", keyed("o1", "no_stream"))
            .await
            .status,
        StatusCode::CREATED
    );
    // The same id again: answered as the first, not stored again.
    let again = publish(&running, "orders", keyed("o1", "no_stream")).await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
    assert_eq!(
        (
            again.json()["duplicate"].as_bool(),
            again.json()["position"].as_u64()
        ),
        (Some(true), Some(1))
    );
    // A stale expected version: 409 with the actual one.
    let stale = publish(&running, "orders", keyed("o2", "0")).await;
    assert_eq!(stale.status, StatusCode::CONFLICT, "{}", stale.body);
    assert_eq!(
        (
            stale.json()["expected"].as_str(),
            stale.json()["actual"].as_u64()
        ),
        (Some("0"), Some(1))
    );
    let url = events_url(&running, "/v1/topics/orders/events");
    for (headers, body, says) in [
        (
            vec![("content-type", "application/cloudevents+json")],
            "{".to_owned(),
            "not JSON",
        ),
        (
            vec![("content-type", "application/cloudevents+json")],
            r#"{"specversion":"1.0","source":"s","type":"T"}"#.to_owned(),
            "id is missing",
        ),
        (
            vec![("content-type", "application/json")],
            "{}".to_owned(),
            "ce-type",
        ),
        (
            vec![
                ("content-type", "application/json"),
                ("ce-type", "T"),
                ("tidegate-expected-version", "soon"),
                ("tidegate-key", "k"),
            ],
            "{}".to_owned(),
            "expected version",
        ),
    ] {
        let answer = post(&url, &headers, body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
        assert!(
            answer.json()["error"].as_str().unwrap().contains(says),
            "{}",
            answer.body
        );
    }
    // Over max_body_bytes: 413.
    let big = structured("o3", "Created", json!({"data": "x".repeat(4096)}));
    assert_eq!(
        publish(&running, "orders", big).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    // A topic name that is not one.
    let answer = post(
        &events_url(&running, "/v1/topics/no%20way/events"),
        &[("content-type", "application/json"), ("ce-type", "T")],
        "{}",
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
    assert_eq!(
        read_ids(&running, "orders").await,
        ["o1"],
        "nothing else was stored"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn the_publishers_correlation_and_trace_travel_in_the_event() {
    let dir = Dir::new("events-trace");
    let running = gateway(&dir, "", "").await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let answer = post(
        &events_url(&running, "/v1/topics/t/events"),
        &[
            ("content-type", "application/json"),
            ("ce-type", "T"),
            ("x-correlation-id", "req-42"),
            ("traceparent", traceparent),
        ],
        "{}",
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(answer.headers["x-correlation-id"], "req-42");
    let read = get(&events_url(&running, "/v1/topics/t/events"))
        .await
        .json();
    assert_eq!(read["events"][0]["correlationid"], "req-42");
    assert_eq!(read["events"][0]["traceparent"], traceparent);
    running.shutdown().await;
}

const PULL: &str = "
[[events.subscriptions]]
name = \"workers\"
topic = \"jobs\"
ack_wait = \"30s\"
max_deliveries = 3
backoff = { base_delay = \"10ms\", max_delay = \"10ms\" }
";

async fn fetch(running: &Running, body: Value) -> Vec<Value> {
    let answer = post_json(
        &events_url(running, "/v1/subscriptions/workers/fetch"),
        body,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    answer.json()["messages"].as_array().unwrap().clone()
}

async fn settle(running: &Running, how: &str, body: Value) -> Value {
    let answer = post_json(
        &events_url(running, &format!("/v1/subscriptions/workers/{how}")),
        body,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{how}: {}", answer.body);
    answer.json()
}

#[tokio::test]
async fn workers_pull_ack_nack_extend_and_dead_letter() {
    let dir = Dir::new("events-pull");
    let running = gateway(&dir, "", PULL).await;
    // A long poll is woken by the publish, with no interval to wait out.
    let waiting = {
        let url = events_url(&running, "/v1/subscriptions/workers/fetch");
        tokio::spawn(async move { post_json(&url, json!({"max": 5, "wait": "60s"})).await })
    };
    let published = publish(&running, "jobs", structured("j1", "Job", json!({}))).await;
    assert_eq!(published.status, StatusCode::CREATED);
    let answer = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the long poll was not woken")
        .unwrap();
    let messages = answer.json()["messages"].as_array().unwrap().clone();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["event"]["id"], "j1");
    assert_eq!(messages[0]["delivery"], 1);
    let j1 = messages[0]["ack_id"].as_str().unwrap().to_owned();
    // Nothing else is due: a fetch without wait answers empty at once.
    assert!(fetch(&running, json!({})).await.is_empty());
    assert_eq!(
        settle(&running, "extend", json!({"ack_ids": [j1]})).await["settled"],
        1
    );
    assert_eq!(
        settle(&running, "ack", json!({"ack_ids": [j1]})).await["settled"],
        1
    );
    // Acked twice: the lease is gone.
    assert_eq!(
        settle(&running, "ack", json!({"ack_ids": [j1]})).await["expired"],
        json!([j1])
    );

    for id in ["j2", "j3"] {
        publish(&running, "jobs", structured(id, "Job", json!({}))).await;
    }
    let taken = fetch(&running, json!({"max": 10})).await;
    assert_eq!(taken.len(), 2);
    let (j2, j3) = (
        taken[0]["ack_id"].as_str().unwrap(),
        taken[1]["ack_id"].as_str().unwrap(),
    );
    assert_eq!(
        settle(&running, "nack", json!({"ack_ids": [j2], "delay": "10ms"})).await["settled"],
        1
    );
    let dead = settle(
        &running,
        "dead-letter",
        json!({"ack_ids": [j3], "reason": "cannot parse"}),
    )
    .await;
    assert_eq!(dead["settled"], 1);
    let again = fetch(&running, json!({"wait": "10s"})).await;
    assert_eq!(again[0]["event"]["id"], "j2");
    assert_eq!(again[0]["delivery"], 2);
    let letters = get(&events_url(&running, "/v1/topics/jobs.dead/events"))
        .await
        .json();
    assert_eq!(letters["events"][0]["id"], "j3");
    assert_eq!(letters["events"][0]["deadletterreason"], "cannot parse");
    assert_eq!(letters["events"][0]["deadlettersubscription"], "workers");

    // Bad requests.
    for (path, body, status) in [
        (
            "/v1/subscriptions/nobody/fetch",
            json!({}),
            StatusCode::NOT_FOUND,
        ),
        (
            "/v1/subscriptions/workers/fetch",
            json!({"max": 0}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/subscriptions/workers/fetch",
            json!({"wait": "2h"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/subscriptions/workers/ack",
            json!({"ack_ids": []}),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/subscriptions/workers/nack",
            json!({"ack_ids": ["1.1"], "delay": "soon"}),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let answer = post_json(&events_url(&running, path), body).await;
        assert_eq!(answer.status, status, "{path}: {}", answer.body);
    }
    running.shutdown().await;
}

#[tokio::test]
async fn two_workers_share_a_subscription_and_a_dead_worker_loses_nothing() {
    let dir = Dir::new("events-share");
    let pull = PULL.replace("ack_wait = \"30s\"", "ack_wait = \"200ms\"");
    let running = gateway(&dir, "", &pull).await;
    for i in 0..20 {
        publish(
            &running,
            "jobs",
            structured(&format!("s{i}"), "Job", json!({})),
        )
        .await;
    }
    // Worker A takes five and dies with them.
    let lost = fetch(&running, json!({"max": 5})).await;
    assert_eq!(lost.len(), 5);
    // Worker B takes the rest, and A's five once their lease runs out.
    let mut done = std::collections::BTreeSet::new();
    while done.len() < 20 {
        let got = fetch(&running, json!({"max": 10, "wait": "10s"})).await;
        assert!(
            !got.is_empty(),
            "worker B waited in vain with {} done",
            done.len()
        );
        let ids: Vec<&str> = got.iter().map(|m| m["ack_id"].as_str().unwrap()).collect();
        assert_eq!(
            settle(&running, "ack", json!({"ack_ids": ids})).await["settled"],
            got.len()
        );
        for m in &got {
            assert!(
                done.insert(m["event"]["id"].as_str().unwrap().to_owned()),
                "delivered twice after an ack"
            );
        }
    }
    // A's late acks ack nothing.
    let late: Vec<&str> = lost.iter().map(|m| m["ack_id"].as_str().unwrap()).collect();
    assert_eq!(
        settle(&running, "ack", json!({"ack_ids": late})).await["settled"],
        0
    );
    running.shutdown().await;
}

#[tokio::test]
async fn topics_are_listed_with_positions_retention_and_subscriptions() {
    let dir = Dir::new("events-topics");
    let extra =
        format!("[[events.topics]]\nname = \"jobs\"\nmax_events = 1000\nmax_age = \"7d\"\n{PULL}");
    let running = gateway(&dir, "", &extra).await;
    for id in ["a", "b"] {
        publish(&running, "jobs", structured(id, "Job", json!({}))).await;
    }
    publish(&running, "other", structured("c", "Job", json!({}))).await;
    let listed = get(&events_url(&running, "/v1/topics")).await.json();
    let names: Vec<&str> = listed["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["jobs", "other"]);
    let jobs = get(&events_url(&running, "/v1/topics/jobs")).await.json();
    assert_eq!(
        (
            jobs["first_position"].as_u64(),
            jobs["last_position"].as_u64(),
            jobs["events"].as_u64()
        ),
        (Some(1), Some(2), Some(2))
    );
    assert_eq!(jobs["retention"]["max_events"], 1000);
    assert_eq!(jobs["retention"]["max_age_seconds"], 604800.0);
    assert_eq!(
        jobs["subscriptions"],
        json!([{"name": "workers", "lag": 2, "push": null}])
    );
    assert_eq!(
        get(&events_url(&running, "/v1/topics/none")).await.status,
        StatusCode::NOT_FOUND
    );
    running.shutdown().await;
}

#[tokio::test]
async fn api_keys_open_only_their_topics() {
    let dir = Dir::new("events-keys");
    // sha256("orders-key") and sha256("other-key").
    let digest = |key: &str| {
        use sha2::Digest;
        sha2::Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let rest = format!(
        "[[api_keys]]\nid = \"orders-team\"\nkey_sha256 = \"{}\"\ntopics = [\"orders*\"]\n\
         [[api_keys]]\nid = \"routes-only\"\nkey_sha256 = \"{}\"\n",
        digest("orders-key"),
        digest("other-key")
    );
    let running = gateway(&dir, "require_api_key = true", &rest).await;
    let url = events_url(&running, "/v1/topics/orders/events");
    let event = structured("k1", "T", json!({})).to_string();
    let with = |key: Option<&'static str>| {
        let mut headers = vec![("content-type", "application/cloudevents+json")];
        if let Some(key) = key {
            headers.push(("x-api-key", key));
        }
        headers
    };
    let none = post(&url, &with(None), event.clone()).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED, "{}", none.body);
    assert!(none.headers.contains_key(header::WWW_AUTHENTICATE));
    assert_eq!(
        post(&url, &with(Some("wrong")), event.clone()).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post(&url, &with(Some("other-key")), event.clone())
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let elsewhere = events_url(&running, "/v1/topics/billing/events");
    assert_eq!(
        post(&elsewhere, &with(Some("orders-key")), event.clone())
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        post(&url, &with(Some("orders-key")), event.clone())
            .await
            .status,
        StatusCode::CREATED
    );
    let read = send(
        Request::get(events_url(&running, "/v1/topics/orders.dead/events"))
            .header("x-api-key", "orders-key")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(read.status, StatusCode::OK, "orders* covers orders.dead");
    running.shutdown().await;
}

/// What a push subscriber saw: each event id's deliveries, in order, with
/// their headers and bodies.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, http::HeaderMap, String)>>>;

/// A subscriber answering by the event's id: `ok*` 200; `busy` 503 with
/// `Retry-After: 0` at first; `flaky` 500 at first; `slow` no answer
/// within the upstream's 2 s timeout at first; `bad` 400.
async fn subscriber(seen: Seen) -> tidegate_testkit::Upstream {
    tidegate_testkit::Upstream::start(move |req: Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        async move {
            use http_body_util::BodyExt;
            let headers = req.headers().clone();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let id = headers
                .get("ce-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .or_else(|| {
                    serde_json::from_slice::<Value>(&body)
                        .ok()
                        .and_then(|v| v["id"].as_str().map(str::to_owned))
                })
                .unwrap_or_default();
            let first = headers["tidegate-delivery"] == "1";
            seen.lock().unwrap().push((
                id.clone(),
                headers,
                String::from_utf8_lossy(&body).into_owned(),
            ));
            match id.as_str() {
                "busy" if first => {
                    let mut answer = tidegate_testkit::text(503, "busy");
                    answer
                        .headers_mut()
                        .insert("retry-after", "0".parse().unwrap());
                    answer
                }
                "flaky" if first => tidegate_testkit::text(500, "oops"),
                "slow" if first => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    tidegate_testkit::text(200, "late")
                }
                "bad" => tidegate_testkit::text(400, "no"),
                _ => tidegate_testkit::text(200, "ok"),
            }
        }
    })
    .await
}

/// Waits until `done` holds for what `seen` has.
async fn until(
    seen: &Seen,
    what: &str,
    done: impl Fn(&[(String, http::HeaderMap, String)]) -> bool,
) {
    eventually(what, || async {
        let seen = seen.lock().unwrap().clone();
        if done(&seen) {
            Ok(())
        } else {
            Err(format!("{} deliveries so far", seen.len()))
        }
    })
    .await
}

/// Waits until every subscription of `topic` has finished its events.
async fn finished(running: &Running, topic: &str) {
    eventually("every subscription to finish", || async {
        let info = get(&events_url(running, &format!("/v1/topics/{topic}")))
            .await
            .json();
        let done = info["subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["lag"] == 0);
        if done {
            Ok(())
        } else {
            Err(info.to_string())
        }
    })
    .await
}

/// Waits until `topic` holds an event; its events.
async fn some_events(running: &Running, topic: &str) -> Value {
    eventually("an event", || async {
        let read = get(&events_url(running, &format!("/v1/topics/{topic}/events")))
            .await
            .json();
        if read["events"].as_array().unwrap().is_empty() {
            Err(read.to_string())
        } else {
            Ok(read)
        }
    })
    .await
}

fn count(seen: &[(String, http::HeaderMap, String)], id: &str) -> usize {
    seen.iter().filter(|(seen, _, _)| seen == id).count()
}

#[tokio::test]
async fn pushed_events_follow_the_answer_rules() {
    let dir = Dir::new("events-push");
    let seen = Seen::default();
    let sub = subscriber(seen.clone()).await;
    let rest = format!(
        "[[upstreams]]\nname = \"analytics\"\nendpoints = [\"{}\"]\n\
         [upstreams.policy]\ntimeout = \"2s\"\n\
         [upstreams.policy.circuit_breaker]\nconsecutive_failures = 100\n\
         [[events.subscriptions]]\nname = \"analytics\"\ntopic = \"content\"\n\
         push = {{ upstream = \"analytics\", path = \"/events/content\" }}\n\
         max_deliveries = 5\nack_wait = \"5s\"\nbackoff = {{ base_delay = \"10ms\", max_delay = \"10ms\" }}\n\
         [[events.subscriptions]]\nname = \"archive\"\ntopic = \"content\"\ntypes = [\"Kept\"]\n\
         push = {{ upstream = \"analytics\", path = \"/archive\", mode = \"structured\" }}\n",
        sub.url()
    );
    let running = gateway(&dir, "", &rest).await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    for id in ["ok", "busy", "flaky", "slow", "bad"] {
        let answer = post(
            &events_url(&running, "/v1/topics/content/events"),
            &[
                ("content-type", "application/json"),
                ("ce-type", "Uploaded"),
                ("ce-id", id),
                ("ce-source", "/web"),
                ("x-correlation-id", &format!("corr-{id}")),
                ("traceparent", traceparent),
            ],
            format!(r#"{{"name":"{id}"}}"#),
        )
        .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    }
    publish(
        &running,
        "content",
        structured("kept", "Kept", json!({"data": {"k": 1}})),
    )
    .await;
    // (At least: a machine slow enough to pass the 2 s timeout would
    // deliver again, rightly.)
    until(&seen, "every rule to play out", |seen| {
        count(seen, "busy") >= 2
            && count(seen, "flaky") >= 2
            && count(seen, "slow") >= 2
            && count(seen, "bad") >= 1
            && count(seen, "kept") >= 2
    })
    .await;
    // The dead letter, with its reason.
    let letters = some_events(&running, "content.dead").await;
    assert_eq!(letters["events"][0]["id"], "bad");
    assert_eq!(
        letters["events"][0]["deadletterreason"],
        "the subscriber answered 400 Bad Request"
    );
    // Every group finished, nothing left to deliver.
    finished(&running, "content").await;
    let seen = seen.lock().unwrap().clone();
    // Acked once answered 2xx: never delivered again.
    assert_eq!(count(&seen, "ok"), 1);
    let (_, headers, body) = seen.iter().find(|(id, _, _)| id == "ok").unwrap();
    assert_eq!(headers["ce-type"], "Uploaded");
    assert_eq!(headers["ce-source"], "/web");
    assert_eq!(headers["ce-topic"], "content");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["x-correlation-id"], "corr-ok");
    assert!(headers["traceparent"]
        .to_str()
        .unwrap()
        .starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
    assert_ne!(
        headers["traceparent"], traceparent,
        "a child span, not the publisher's"
    );
    assert_eq!(body, r#"{"name":"ok"}"#);
    let retried: Vec<&str> = seen
        .iter()
        .filter(|(id, _, _)| id == "busy")
        .map(|(_, h, _)| h["tidegate-delivery"].to_str().unwrap())
        .collect();
    assert_eq!(retried, ["1", "2"]);
    // Structured mode, filtered by type: the whole event as JSON.
    let (_, headers, body) = seen
        .iter()
        .find(|(id, h, _)| id == "kept" && h.get("ce-id").is_none())
        .unwrap();
    assert_eq!(headers["content-type"], "application/cloudevents+json");
    let event: Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        (event["type"].as_str(), event["data"]["k"].as_u64()),
        (Some("Kept"), Some(1))
    );
    // The event metrics, the lag as the sampler last saw it.
    eventually("the event metrics", || async {
        let metrics = get(&support::admin(&running, "/metrics")).await.body;
        let has = |line: &str| metrics.lines().any(|l| l == line);
        let shown = has("tidegate_events_lag{subscription=\"analytics\"} 0")
            && has("tidegate_events_published_total{topic=\"content\",result=\"stored\"} 6")
            && has("tidegate_events_deliveries_total{subscription=\"analytics\",result=\"dead_letter\"} 1")
            && has("tidegate_events_deliveries_total{subscription=\"analytics\",result=\"retry\"} 3");
        if shown {
            Ok(())
        } else {
            Err(metrics)
        }
    })
    .await;
    running.shutdown().await;
}

#[tokio::test]
async fn an_open_breaker_pauses_delivery_and_counts_none() {
    let dir = Dir::new("events-paused");
    let sub = tidegate_testkit::Scripted::start().await;
    sub.set(tidegate_testkit::Behavior::Status(500));
    let rest = format!(
        "[[upstreams]]\nname = \"down\"\nendpoints = [\"{}\"]\n\
         [upstreams.policy.retry]\nmax_attempts = 1\n\
         [upstreams.policy.circuit_breaker]\nconsecutive_failures = 2\nopen_duration = \"2s\"\n\
         [[events.subscriptions]]\nname = \"paused\"\ntopic = \"t\"\n\
         push = {{ upstream = \"down\", path = \"/e\" }}\n\
         max_deliveries = 3\nbackoff = {{ base_delay = \"10ms\", max_delay = \"10ms\" }}\n",
        sub.url()
    );
    let running = gateway(&dir, "", &rest).await;
    let answer = post(
        &events_url(&running, "/v1/topics/t/events"),
        &[
            ("content-type", "application/json"),
            ("ce-type", "T"),
            ("x-correlation-id", "e1"),
        ],
        "{}",
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED);
    // Two failures open the breaker; the subscriber comes back meanwhile.
    eventually("two deliveries", || async {
        match sub.hits() {
            hits if hits >= 2 => Ok(()),
            hits => Err(format!("{hits} so far")),
        }
    })
    .await;
    sub.set(tidegate_testkit::Behavior::Answer);
    // Paused for the open duration, not burning deliveries: the half-open
    // probe is the third delivery, and it is acked.
    finished(&running, "t").await;
    assert_eq!(sub.hits(), 3, "{:?}", sub.ledger());
    let letters = get(&events_url(&running, "/v1/topics/t.dead/events"))
        .await
        .json();
    assert!(
        letters["events"].as_array().unwrap().is_empty(),
        "{letters}"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn a_followed_topic_streams_each_event_as_it_is_stored() {
    use http_body_util::BodyExt;
    let dir = Dir::new("events-follow");
    let running = gateway(&dir, "", "").await;
    publish(&running, "t", structured("f1", "T", json!({}))).await;
    let response = tidegate_testkit::client()
        .request(
            Request::get(events_url(
                &running,
                "/v1/topics/t/events?follow=true&from_position=1",
            ))
            .body(full(""))
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    let mut body = response.into_body();
    let mut text = String::new();
    async fn until_id(body: &mut hyper::body::Incoming, text: &mut String, id: &str) {
        while !text.contains(&format!("\"id\":\"{id}\"")) {
            let frame = tokio::time::timeout(Duration::from_secs(30), body.frame())
                .await
                .unwrap_or_else(|_| panic!("{id} never came: {text}"))
                .unwrap()
                .unwrap();
            if let Ok(data) = frame.into_data() {
                text.push_str(&String::from_utf8_lossy(&data));
            }
        }
    }
    until_id(&mut body, &mut text, "f1").await;
    assert!(text.contains("id: 1") || text.contains("id:1"), "{text}");
    // A new event is streamed when stored, not on a timer.
    publish(&running, "t", structured("f2", "T", json!({}))).await;
    until_id(&mut body, &mut text, "f2").await;
    running.shutdown().await;
}

#[tokio::test]
async fn a_reload_adds_and_changes_subscriptions_keeping_cursors_and_leases() {
    let dir = Dir::new("events-reload");
    let seen = Seen::default();
    let sub = subscriber(seen.clone()).await;
    let base = format!(
        "[[upstreams]]\nname = \"analytics\"\nendpoints = [\"{}\"]\n{PULL}",
        sub.url()
    );
    let running = gateway(&dir, "", &base).await;
    for id in ["ok-1", "ok-2", "ok-3"] {
        publish(&running, "jobs", structured(id, "Job", json!({}))).await;
    }
    let leased = fetch(&running, json!({"max": 1})).await;
    let ack_id = leased[0]["ack_id"].as_str().unwrap().to_owned();

    // The same store and listener; the pull group changed, a push group added.
    let text = |extra: &str| {
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [events]\npath = \"{}\"\nlisten = \"127.0.0.1:0\"\n{}{extra}",
            dir.0.join("events.db").display(),
            base.replace("max_deliveries = 3", "max_deliveries = 7"),
        )
    };
    let pushed = "[[events.subscriptions]]\nname = \"mirror\"\ntopic = \"jobs\"\n\
                  push = { upstream = \"analytics\", path = \"/mirror\" }\n";
    let summary = running
        .reloader()
        .apply(support::parsed(&text(pushed)))
        .await
        .unwrap();
    assert!(
        summary.needs_restart.is_empty(),
        "{:?}",
        summary.needs_restart
    );
    // The lease taken before the reload still acks; the cursor held.
    assert_eq!(
        settle(&running, "ack", json!({"ack_ids": [ack_id]})).await["settled"],
        1
    );
    let rest: Vec<String> = fetch(&running, json!({"max": 10}))
        .await
        .iter()
        .map(|m| m["event"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(rest, ["ok-2", "ok-3"]);
    // The new push group delivers every event from the earliest.
    until(&seen, "the new push subscription's deliveries", |seen| {
        ["ok-1", "ok-2", "ok-3"]
            .iter()
            .all(|id| count(seen, id) == 1)
    })
    .await;
    // A change to the store or its listener waits for a restart.
    let moved = text(pushed).replace("[events]\npath", "[events]\ndedup_window = \"5m\"\npath");
    let summary = running
        .reloader()
        .apply(support::parsed(&moved))
        .await
        .unwrap();
    assert_eq!(summary.needs_restart, ["events.dedup_window"]);
    running.shutdown().await;
}

#[tokio::test]
async fn every_events_endpoint_answers_as_its_openapi_document_says() {
    use support::conforms;
    let dir = Dir::new("events-openapi");
    let sub =
        tidegate_testkit::Upstream::start(|_| async { tidegate_testkit::text(200, "ok") }).await;
    let rest = format!(
        "[[upstreams]]\nname = \"sink\"\nendpoints = [\"{}\"]\n{PULL}\
         [[events.subscriptions]]\nname = \"pushed\"\ntopic = \"jobs\"\n\
         push = {{ upstream = \"sink\", path = \"/e\" }}\n",
        sub.url()
    );
    let running = gateway(&dir, "max_body_bytes = 4096", &rest).await;
    let doc = get(&events_url(&running, "/openapi.json")).await.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let documented: std::collections::BTreeSet<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let served: std::collections::BTreeSet<&str> = [
        "/openapi.json",
        "/v1/topics",
        "/v1/topics/{topic}",
        "/v1/topics/{topic}/events",
        "/v1/topics/{topic}/streams/{key}",
        "/v1/subscriptions/{name}/fetch",
        "/v1/subscriptions/{name}/ack",
        "/v1/subscriptions/{name}/nack",
        "/v1/subscriptions/{name}/extend",
        "/v1/subscriptions/{name}/dead-letter",
        "/v1/sagas/{name}",
        "/v1/sagas/{name}/{id}",
    ]
    .into();
    assert_eq!(
        documented, served,
        "the document lists exactly the served endpoints"
    );

    let events = "/v1/topics/{topic}/events";
    let keyed = |id: &str, expected: &str| {
        structured(
            id,
            "Job",
            json!({"partitionkey": "k", "expectedversion": expected}),
        )
    };
    let answers = [
        publish(&running, "jobs", keyed("a", "no_stream")).await,
        publish(&running, "jobs", keyed("b", "0")).await,
        publish(
            &running,
            "jobs",
            structured("c", "Job", json!({"data": "x".repeat(8000)})),
        )
        .await,
        post(
            &events_url(&running, "/v1/topics/jobs/events"),
            &[("content-type", "application/json")],
            "{}",
        )
        .await,
        post(
            &events_url(&running, "/v1/topics/jobs/events"),
            &[("content-type", "application/cloudevents-batch+json")],
            json!([
                structured("d", "Job", json!({})),
                structured("e", "Job", json!({}))
            ])
            .to_string(),
        )
        .await,
    ];
    let statuses: Vec<u16> = answers.iter().map(|a| a.status.as_u16()).collect();
    assert_eq!(statuses, [201, 409, 413, 400, 201]);
    let no_saga = post_json(&events_url(&running, "/v1/sagas/checkout"), json!({})).await;
    assert_eq!(no_saga.status, StatusCode::NOT_FOUND);
    conforms(&doc, "/v1/sagas/{name}", "post", &no_saga);
    for answer in &answers {
        conforms(&doc, events, "post", answer);
    }
    for (path, target) in [
        (events, "/v1/topics/jobs/events?from_position=2&limit=2"),
        (events, "/v1/topics/jobs/events?limit=0"),
        (
            "/v1/topics/{topic}/streams/{key}",
            "/v1/topics/jobs/streams/k",
        ),
        ("/v1/topics", "/v1/topics"),
        ("/v1/topics/{topic}", "/v1/topics/jobs"),
        ("/v1/topics/{topic}", "/v1/topics/nothing"),
        ("/openapi.json", "/openapi.json"),
        ("/v1/sagas/{name}/{id}", "/v1/sagas/checkout/nothing"),
    ] {
        conforms(&doc, path, "get", &get(&events_url(&running, target)).await);
    }
    let fetch_path = "/v1/subscriptions/{name}/fetch";
    let url =
        |name: &str, how: &str| events_url(&running, &format!("/v1/subscriptions/{name}/{how}"));
    let fetched = post_json(&url("workers", "fetch"), json!({"max": 3})).await;
    conforms(&doc, fetch_path, "post", &fetched);
    let ids: Vec<String> = fetched.json()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["ack_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 3);
    for (name, body, status) in [
        ("workers", json!({"max": 5000}), 400),
        ("nobody", json!({}), 404),
        ("pushed", json!({}), 409),
    ] {
        let answer = post_json(&url(name, "fetch"), body).await;
        assert_eq!(answer.status.as_u16(), status, "{}", answer.body);
        conforms(&doc, fetch_path, "post", &answer);
    }
    for (how, body) in [
        ("extend", json!({"ack_ids": [ids[0]]})),
        ("ack", json!({"ack_ids": [ids[0], "9.9"]})),
        ("nack", json!({"ack_ids": [ids[1]], "delay": "1s"})),
        ("dead-letter", json!({"ack_ids": [ids[2]], "reason": "no"})),
        ("ack", json!({"ack_ids": []})),
    ] {
        let answer = post_json(&url("workers", how), body).await;
        conforms(
            &doc,
            &format!("/v1/subscriptions/{{name}}/{how}"),
            "post",
            &answer,
        );
    }
    running.shutdown().await;
}

#[tokio::test]
async fn a_subscriber_that_refuses_connections_pauses_its_subscription_until_it_returns() {
    let dir = Dir::new("events-refusing");
    let sub = tidegate_testkit::Scripted::start().await;
    sub.stop();
    let rest = format!(
        "[[upstreams]]\nname = \"gone\"\nendpoints = [\"{}\"]\n\
         [upstreams.policy.retry]\nmax_attempts = 1\n\
         [upstreams.policy.circuit_breaker]\nconsecutive_failures = 2\nopen_duration = \"200ms\"\n\
         [[events.subscriptions]]\nname = \"waiting\"\ntopic = \"t\"\n\
         push = {{ upstream = \"gone\", path = \"/e\" }}\n\
         max_deliveries = 3\nbackoff = {{ base_delay = \"10ms\", max_delay = \"10ms\" }}\n",
        sub.url()
    );
    let running = gateway(&dir, "", &rest).await;
    for id in ["a", "b", "c"] {
        assert_eq!(
            publish(&running, "t", structured(id, "T", json!({})))
                .await
                .status,
            StatusCode::CREATED
        );
    }
    // Refused twice, the breaker opens; probes fail while the subscriber
    // is away (half-open, then open again), each releasing its event
    // uncounted: after more failed probes than max_deliveries allows, no
    // event is a dead letter.
    eventually("three failed probes", || async {
        let timeline = get(&support::admin(&running, "/status/timeline"))
            .await
            .json();
        let failed_probes = timeline["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["upstream"] == "gone" && t["from"] == "half_open" && t["to"] == "open")
            .count();
        if failed_probes >= 3 {
            Ok(())
        } else {
            Err(timeline.to_string())
        }
    })
    .await;
    let letters = get(&events_url(&running, "/v1/topics/t.dead/events"))
        .await
        .json();
    assert!(
        letters["events"].as_array().unwrap().is_empty(),
        "burnt into the dead-letter topic: {letters}"
    );
    // The subscriber returns: everything is delivered.
    sub.restart().await;
    finished(&running, "t").await;
    assert_eq!(sub.hits(), 3, "{:?}", sub.ledger());
    running.shutdown().await;
}

/// Two versions of `ContentUploaded`'s schema in `dir`; the config lines
/// that name them.
fn content_schemas(dir: &Dir) -> String {
    let v1 = dir.0.join("uploaded.v1.json");
    let v2 = dir.0.join("uploaded.v2.json");
    std::fs::write(
        &v1,
        r#"{"type":"object","required":["id","title"],
            "properties":{"id":{"type":"string"},"title":{"type":"string"}}}"#,
    )
    .unwrap();
    std::fs::write(
        &v2,
        r#"{"type":"object","required":["id","title"],
            "properties":{"id":{"type":"string"},"title":{"type":"string","maxLength":20},
                          "size":{"type":"integer","minimum":0}}}"#,
    )
    .unwrap();
    format!(
        "[[events.schemas]]\ntopic = \"content\"\ntype = \"ContentUploaded\"\nversions = [\"{}\", \"{}\"]\n",
        v1.display(),
        v2.display()
    )
}

#[tokio::test]
async fn events_that_break_their_schema_are_refused_with_the_pointer_and_rule_and_nothing_is_stored(
) {
    let dir = Dir::new("events-schemas");
    let running = gateway(&dir, "", &content_schemas(&dir)).await;
    let uploaded =
        |id: &str, data: Value| structured(id, "ContentUploaded", json!({ "data": data }));
    let ok = publish(
        &running,
        "content",
        uploaded("c1", json!({"id": "1", "title": "Rust", "size": 3})),
    )
    .await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.body);

    let cases = [
        (json!({"id": "2"}), "", "required"),
        (
            json!({"id": "2", "title": "T", "size": -1}),
            "/size",
            "minimum",
        ),
        (
            json!({"id": "2", "title": "T", "size": "big"}),
            "/size",
            "type",
        ),
    ];
    for (data, pointer, rule) in cases {
        let refused = publish(&running, "content", uploaded("c2", data.clone())).await;
        assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY, "{data}");
        let body = refused.json();
        assert_eq!(body["pointer"], pointer, "{body}");
        assert_eq!(body["rule"], rule, "{body}");
        assert_eq!(body["id"], "c2");
        assert!(body["schema"]
            .as_str()
            .unwrap()
            .ends_with("uploaded.v2.json"));
    }
    // The version the event names judges it: v1 has no `size` rule.
    let v1 = structured(
        "c3",
        "ContentUploaded",
        json!({"dataschema": "https://example.com/schemas/uploaded.v1.json",
               "data": {"id": "3", "title": "T", "size": -1}}),
    );
    assert_eq!(
        publish(&running, "content", v1).await.status,
        StatusCode::CREATED
    );
    // Binary mode with data that is not JSON.
    let binary = post(
        &events_url(&running, "/v1/topics/content/events"),
        &[
            ("content-type", "text/plain"),
            ("ce-type", "ContentUploaded"),
            ("ce-id", "c4"),
            ("ce-source", "/t"),
        ],
        "not json",
    )
    .await;
    assert_eq!(binary.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(binary.json()["rule"], "json");
    // One bad event in a batch refuses the whole batch.
    let batch = json!([
        uploaded("c5", json!({"id": "5", "title": "ok"})),
        uploaded(
            "c6",
            json!({"id": "6", "title": "a title far longer than twenty"})
        ),
    ]);
    let refused = post(
        &events_url(&running, "/v1/topics/content/events"),
        &[("content-type", "application/cloudevents-batch+json")],
        batch.to_string(),
    )
    .await;
    assert_eq!(
        refused.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        refused.body
    );
    assert_eq!(refused.json()["index"], 1);
    assert_eq!(refused.json()["pointer"], "/title");
    // Other types of the topic are not checked.
    let other = publish(
        &running,
        "content",
        structured("c7", "ContentDeleted", json!({"data": "x"})),
    )
    .await;
    assert_eq!(other.status, StatusCode::CREATED);
    assert_eq!(
        read_ids(&running, "content").await,
        ["c1", "c3", "c7"],
        "nothing refused was stored"
    );
}
