//! The access log: one line per request, written when the answer's body
//! has gone, so a stream's line tells how long the stream lasted.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use support::{catch_all, gateway, url};
use tidegate_testkit::{channel_body, full, Upstream};
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// The fields of one event, as text.
type Line = HashMap<String, String>;

/// A subscriber that sends the fields of every `tidegate::access` event.
struct Lines {
    sink: Mutex<mpsc::UnboundedSender<Line>>,
    next_id: AtomicU64,
}

struct Fields<'a>(&'a mut Line);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl Subscriber for Lines {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target() == "tidegate::access"
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(self.next_id.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut line = Line::new();
        event.record(&mut Fields(&mut line));
        let _ = self.sink.lock().unwrap().send(line);
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// Captures access lines on this thread until the guard drops.
fn capture() -> (
    tracing::subscriber::DefaultGuard,
    mpsc::UnboundedReceiver<Line>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let lines = Lines {
        sink: Mutex::new(tx),
        next_id: AtomicU64::new(0),
    };
    (tracing::subscriber::set_default(lines), rx)
}

/// An upstream answering with a body the returned sender writes.
async fn streaming() -> (Upstream, mpsc::Sender<Bytes>) {
    let (tx, body) = channel_body();
    let body = Mutex::new(Some(body));
    let upstream = Upstream::start(move |_| {
        let body = body.lock().unwrap().take().expect("one request");
        async move { http::Response::new(body) }
    })
    .await;
    (upstream, tx)
}

async fn next_line(lines: &mut mpsc::UnboundedReceiver<Line>) -> Line {
    tokio::time::timeout(Duration::from_secs(10), lines.recv())
        .await
        .expect("no access line was written")
        .unwrap()
}

/// A stream through the gateway, its first event read: the access
/// lines, the sender of the stream's events, the client's body, and what
/// must live as long as they do.
async fn a_stream_under_way() -> (
    tracing::subscriber::DefaultGuard,
    mpsc::UnboundedReceiver<Line>,
    mpsc::Sender<Bytes>,
    hyper::body::Incoming,
    (Upstream, tidegate_gateway::http::server::Running),
) {
    let (guard, lines) = capture();
    let (upstream, events) = streaming().await;
    let gw = gateway(&catch_all(&upstream.url(), "")).await;
    let request = Request::get(url(&gw, "/events")).body(full("")).unwrap();
    let response = tidegate_testkit::client().request(request).await.unwrap();
    let mut body = response.into_body();
    events
        .send(Bytes::from_static(b"data: 1\n\n"))
        .await
        .unwrap();
    body.frame().await.unwrap().unwrap();
    (guard, lines, events, body, (upstream, gw))
}

#[tokio::test]
async fn a_streams_line_is_written_when_the_stream_ends_with_its_whole_duration() {
    let (_guard, mut lines, events, mut body, _servers) = a_stream_under_way().await;
    // Five seconds pass while the stream is open; its line waits for its end.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(5)).await;
    tokio::time::resume();
    assert!(
        lines.try_recv().is_err(),
        "the line was written at the head"
    );
    drop(events);
    while body.frame().await.is_some() {}

    let line = next_line(&mut lines).await;
    assert_eq!(line["status"], "200");
    assert_eq!(line["complete"], "true");
    let duration: f64 = line["duration_ms"].parse().unwrap();
    let ttfb: f64 = line["ttfb_ms"].parse().unwrap();
    assert!(duration >= 5000.0, "{line:?}");
    assert!(ttfb < duration, "{line:?}");
}

#[tokio::test]
async fn a_stream_the_client_leaves_is_logged_incomplete() {
    let (_guard, mut lines, _events, body, _servers) = a_stream_under_way().await;
    drop(body);
    let line = next_line(&mut lines).await;
    assert_eq!(line["complete"], "false", "{line:?}");
}
