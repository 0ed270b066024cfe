//! The scriptable upstream does what it is told, and its ledger records
//! every request by id.

use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use tidegate_testkit::{client, full, Behavior, Scripted};

async fn call(upstream: &Scripted, id: &str) -> Result<(u16, String), String> {
    let request = Request::post(format!("{}/x", upstream.url()))
        .header("x-correlation-id", id)
        .body(full("body"))
        .unwrap();
    let response = client().request(request).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    ))
}

#[tokio::test]
async fn every_behavior_and_the_ledger() {
    let upstream = Scripted::start().await;
    assert_eq!(call(&upstream, "a").await, Ok((200, "ok".into())));

    upstream.set(Behavior::Status(503));
    assert_eq!(call(&upstream, "b").await, Ok((503, "failed".into())));

    upstream.set(Behavior::SlowHead(Duration::from_millis(20)));
    assert_eq!(call(&upstream, "c").await, Ok((200, "ok".into())));

    upstream.set(Behavior::SlowBody(Duration::from_millis(5)));
    assert_eq!(call(&upstream, "d").await, Ok((200, "0123456789".into())));

    upstream.set(Behavior::ResetMidBody);
    assert!(call(&upstream, "e").await.is_err(), "the body was cut");

    upstream.set(Behavior::Hang);
    let hung = tokio::time::timeout(Duration::from_millis(200), call(&upstream, "f")).await;
    assert!(hung.is_err(), "a hanging upstream answered");

    upstream.stop();
    assert!(!upstream.is_running());
    assert!(
        call(&upstream, "g").await.is_err(),
        "a stopped upstream is refused"
    );
    upstream.restart().await;
    assert_eq!(call(&upstream, "h").await, Ok((200, "ok".into())));

    let ledger = upstream.ledger();
    let ids: Vec<&str> = ledger.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c", "d", "e", "f", "h"]);
    assert!(ledger
        .iter()
        .all(|d| d.method == "POST" && d.target == "/x"));
    assert_eq!(ledger[1].behavior, Behavior::Status(503));
    assert_eq!(upstream.hits(), 7);
}
