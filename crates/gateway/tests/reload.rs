//! Hot reload: the table is swapped whole; state of unchanged upstreams,
//! open streams and the rate-limit counts stay; a bad config changes nothing.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use support::{admin, parsed, url};
use tidegate_gateway::http::server;
use tidegate_gateway::observe::notices::Notice;
use tidegate_testkit::{channel_body, full, get, refused_url, text, Upstream};

/// `svc` streams events on `/stream` and answers `v1` elsewhere; `bad` is
/// down with a breaker that opens on the first failure.
fn config(svc: &str, bad: &str, extra_routes: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "svc"
endpoints = ["{svc}"]
[[upstreams]]
name = "bad"
endpoints = ["{bad}"]
[upstreams.policy.retry]
max_attempts = 1
[upstreams.policy.circuit_breaker]
consecutive_failures = 1
open_duration = "10m"

[[routes]]
name = "svc"
path_prefix = "/svc"
upstream = "svc"
rate_limit = {{ algorithm = "fixed_window", limit = 100, per = "1h" }}

[[routes]]
name = "bad"
path_prefix = "/bad"
upstream = "bad"
{extra_routes}
"#
    )
}

#[tokio::test]
async fn a_reload_keeps_open_streams_breakers_and_counts() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let svc = Upstream::start(move |req| {
        let stream = req.uri().path() == "/svc/stream";
        let sender = stream.then(|| {
            let (sender, body) = channel_body();
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(sender);
            }
            body
        });
        async move {
            match sender {
                Some(body) => {
                    let mut response = http::Response::new(body);
                    response
                        .headers_mut()
                        .insert("content-type", "text/event-stream".parse().unwrap());
                    response
                }
                None => text(200, "v1"),
            }
        }
    })
    .await;
    let bad = refused_url().await;
    let gw = server::start(parsed(&config(&svc.url(), &bad, "")))
        .await
        .unwrap();

    let response = tidegate_testkit::client()
        .request(
            Request::get(url(&gw, "/svc/stream"))
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut stream = response.into_body();
    let sender = rx.await.unwrap();
    sender.send(Bytes::from("data: one\n\n")).await.unwrap();
    let first = stream.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "data: one\n\n");
    assert_eq!(get(&url(&gw, "/bad")).await.status, 502);
    assert_eq!(
        get(&url(&gw, "/bad")).await.status,
        503,
        "the breaker is open"
    );
    let before = get(&url(&gw, "/svc/x")).await;
    assert_eq!(before.headers["x-ratelimit-remaining"], "98");

    let mut events = gw.gateway.notices.subscribe();
    let new = parsed(&config(
        &svc.url(),
        &bad,
        "[[routes]]\nname = \"new\"\npath_prefix = \"/new\"\nupstream = \"svc\"\n",
    ));
    let summary = gw.reloader().apply(new).await.unwrap();
    assert_eq!(summary.kept, ["svc", "bad"]);
    assert!(summary.rebuilt.is_empty() && summary.removed.is_empty());
    assert_eq!(summary.routes, 3);
    assert!(matches!(
        events.recv().await.unwrap(),
        Notice::Reload { applied: true, .. }
    ));

    assert_eq!(get(&url(&gw, "/new/x")).await.body, "v1");
    let status = get(&admin(&gw, "/status/services")).await.json();
    assert_eq!(status["services"]["bad"]["state"], "open", "{status}");
    assert_eq!(get(&url(&gw, "/bad")).await.status, 503);
    let after = get(&url(&gw, "/svc/x")).await;
    assert_eq!(
        after.headers["x-ratelimit-remaining"], "97",
        "counts carry over"
    );

    sender.send(Bytes::from("data: two\n\n")).await.unwrap();
    let second = stream.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(second, "data: two\n\n", "the open stream was not cut");

    // A changed upstream starts afresh; a removed route is gone.
    let changed = config(&svc.url(), &bad, "")
        .replace("consecutive_failures = 1\n", "consecutive_failures = 2\n");
    let summary = gw.reloader().apply(parsed(&changed)).await.unwrap();
    assert_eq!(summary.rebuilt, ["bad"]);
    let status = get(&admin(&gw, "/status/services")).await.json();
    assert_eq!(status["services"]["bad"]["state"], "closed");
    assert_eq!(get(&url(&gw, "/new/x")).await.status, 404);
    drop((stream, sender));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_bad_config_is_refused_and_the_running_one_stays() {
    let svc = Upstream::start(|_| async { text(200, "v1") }).await;
    let dir = std::env::temp_dir().join(format!("tidegate-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    let good = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{}",
        config(&svc.url(), &refused_url().await, "")
    );
    std::fs::write(&path, &good).unwrap();
    let gw = server::start(tidegate_gateway::config::load(&path).unwrap())
        .await
        .unwrap();
    let mut events = gw.gateway.notices.subscribe();
    let watcher = tokio::spawn(gw.reloader().watch(path.clone(), Duration::from_millis(20)));

    std::fs::write(
        &path,
        good.replace("path_prefix = \"/svc\"", "path_prefix = \"svc\""),
    )
    .unwrap();
    match events.recv().await.unwrap() {
        Notice::Reload {
            applied, message, ..
        } => {
            assert!(!applied);
            assert!(
                message.contains("gateway.toml:")
                    && message.ends_with("routes[0].path_prefix: must be a path starting with `/`"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        get(&url(&gw, "/svc/x")).await.body,
        "v1",
        "the running config stays"
    );

    std::fs::write(
        &path,
        good.replace("path_prefix = \"/svc\"", "path_prefix = \"/v2\""),
    )
    .unwrap();
    assert!(matches!(
        events.recv().await.unwrap(),
        Notice::Reload { applied: true, .. }
    ));
    assert_eq!(get(&url(&gw, "/v2/x")).await.body, "v1");
    assert_eq!(get(&url(&gw, "/svc/x")).await.status, 404);
    let metrics = get(&admin(&gw, "/metrics")).await.body;
    assert!(
        metrics.contains(r#"tidegate_config_reloads_total{result="rejected"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tidegate_config_reloads_total{result="applied"} 1"#),
        "{metrics}"
    );

    watcher.abort();
    gw.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sends `GET path` on `stream` and reads one answer (framed by its
/// `Content-Length`): its status and body.
async fn ask(stream: &mut tokio::net::TcpStream, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut read = Vec::new();
    loop {
        if let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&read[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |value| value.trim().parse().unwrap());
            if read.len() >= end + 4 + length {
                let status = head[9..12].parse().unwrap();
                let body = String::from_utf8_lossy(&read[end + 4..end + 4 + length]);
                return (status, body.into_owned());
            }
        }
        let mut buf = [0; 4096];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&read));
        read.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn a_connection_open_across_a_reload_is_served_from_the_new_table() {
    let svc = Upstream::start(|_| async { text(200, "v1") }).await;
    let bad = refused_url().await;
    let gw = server::start(parsed(&config(&svc.url(), &bad, "")))
        .await
        .unwrap();
    let mut client = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(ask(&mut client, "/new/x").await.0, 404);

    let new = "[[routes]]\nname = \"new\"\npath_prefix = \"/new\"\nupstream = \"svc\"\n";
    let new = parsed(&config(&svc.url(), &bad, new));
    gw.reloader().apply(new).await.unwrap();
    // The same connection: its next request sees the new route.
    assert_eq!(ask(&mut client, "/new/x").await, (200, "v1".to_owned()));

    gw.reloader()
        .apply(parsed(&config(&svc.url(), &bad, "")))
        .await
        .unwrap();
    assert_eq!(ask(&mut client, "/new/x").await.0, 404, "and its removal");
    gw.shutdown().await;
}
