//! OpenTelemetry traces (`[telemetry]`) against a receiver that decodes
//! the OTLP/HTTP protobuf with prost: a retried request is one server span
//! with a client span per attempt, in the caller's trace; the caller's
//! sampling decision is followed and passed on; a full queue drops and
//! counts spans while requests go on; push deliveries and saga steps are
//! spans in the publisher's and the saga's traces.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use prost::Message;
use serde_json::json;
use tidegate_gateway::http::server::Running;
use tidegate_testkit::{full, get, send, text, Upstream};

#[derive(Clone, PartialEq, prost::Message)]
struct ExportTraceServiceRequest {
    #[prost(message, repeated, tag = "1")]
    resource_spans: Vec<ResourceSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ResourceSpans {
    #[prost(message, optional, tag = "1")]
    resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    scope_spans: Vec<ScopeSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Resource {
    #[prost(message, repeated, tag = "1")]
    attributes: Vec<KeyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ScopeSpans {
    #[prost(message, optional, tag = "1")]
    scope: Option<Scope>,
    #[prost(message, repeated, tag = "2")]
    spans: Vec<Span>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Scope {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Span {
    #[prost(bytes = "vec", tag = "1")]
    trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    span_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    parent_span_id: Vec<u8>,
    #[prost(string, tag = "5")]
    name: String,
    #[prost(int32, tag = "6")]
    kind: i32,
    #[prost(fixed64, tag = "7")]
    start_time_unix_nano: u64,
    #[prost(fixed64, tag = "8")]
    end_time_unix_nano: u64,
    #[prost(message, repeated, tag = "9")]
    attributes: Vec<KeyValue>,
    #[prost(message, optional, tag = "15")]
    status: Option<Status>,
    #[prost(fixed32, tag = "16")]
    flags: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Status {
    #[prost(string, tag = "2")]
    message: String,
    #[prost(int32, tag = "3")]
    code: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct KeyValue {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(message, optional, tag = "2")]
    value: Option<AnyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AnyValue {
    #[prost(oneof = "Any", tags = "1, 2, 3")]
    value: Option<Any>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Any {
    #[prost(string, tag = "1")]
    Str(String),
    #[prost(bool, tag = "2")]
    Bool(bool),
    #[prost(int64, tag = "3")]
    Int(i64),
}

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const CONSUMER: i32 = 5;
const INTERNAL: i32 = 1;

impl Span {
    fn attribute(&self, key: &str) -> Option<&Any> {
        self.attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.as_ref()?.value.as_ref())
    }

    fn text(&self, key: &str) -> &str {
        match self.attribute(key) {
            Some(Any::Str(text)) => text,
            other => panic!("{key} is {other:?} in {self:?}"),
        }
    }

    fn int(&self, key: &str) -> i64 {
        match self.attribute(key) {
            Some(Any::Int(n)) => *n,
            other => panic!("{key} is {other:?} in {self:?}"),
        }
    }

    fn failed(&self) -> bool {
        self.status.as_ref().is_some_and(|s| s.code == 2)
    }
}

/// An OTLP receiver: every export it was sent, decoded.
struct Receiver {
    server: Upstream,
    exports: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let exports: Arc<Mutex<Vec<ExportTraceServiceRequest>>> = Arc::default();
        let kept = exports.clone();
        let server = Upstream::start(move |req: Request<hyper::body::Incoming>| {
            let kept = kept.clone();
            async move {
                assert_eq!(req.uri().path(), "/otlp/v1/traces");
                assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let export = ExportTraceServiceRequest::decode(body).expect("valid OTLP protobuf");
                kept.lock().unwrap().push(export);
                text(200, "")
            }
        })
        .await;
        Receiver { server, exports }
    }

    fn spans(&self) -> Vec<Span> {
        self.exports
            .lock()
            .unwrap()
            .iter()
            .flat_map(|e| &e.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| s.spans.clone())
            .collect()
    }

    /// The spans once `enough` says they are all there (exports come every
    /// 20 ms; at most 10 s).
    async fn until(&self, enough: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let spans = self.spans();
            if enough(&spans) {
                return spans;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "spans never arrived: {spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn telemetry(receiver: &Receiver, extra: &str) -> String {
    format!(
        "[telemetry]\notlp_endpoint = \"{}/otlp\"\nexport_interval = \"20ms\"\nservice_name = \"edge\"\n{extra}\n",
        receiver.server.url()
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

async fn get_traced(running: &Running, path: &str, flags: &str) -> u16 {
    let request = Request::get(support::url(running, path))
        .header(
            "traceparent",
            format!("00-{CALLER_TRACE}-{CALLER_SPAN}-{flags}"),
        )
        .body(full(""))
        .unwrap();
    send(request).await.status.as_u16()
}

#[tokio::test]
async fn a_retried_request_is_one_server_span_over_two_attempt_spans_in_the_callers_trace() {
    let receiver = Receiver::start().await;
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let flaky = Upstream::start(move |_| {
        let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
        async move { text(if first { 503 } else { 200 }, "ok") }
    })
    .await;
    let running = support::gateway(&format!(
        "[[upstreams]]\nname = \"svc\"\nendpoints = [\"{}\"]\n\
         [upstreams.policy.retry]\nbase_delay = \"1ms\"\nmax_delay = \"2ms\"\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstream = \"svc\"\n{}",
        flaky.url(),
        telemetry(&receiver, "")
    ))
    .await;
    assert_eq!(get_traced(&running, "/items/7", "01").await, 200);
    let spans = receiver.until(|s| s.len() >= 3).await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let server = spans.iter().find(|s| s.kind == SERVER).unwrap();
    assert_eq!(hex(&server.trace_id), CALLER_TRACE);
    assert_eq!(hex(&server.parent_span_id), CALLER_SPAN);
    assert_eq!(server.name, "GET api");
    assert_eq!(server.text("http.request.method"), "GET");
    assert_eq!(server.text("url.path"), "/items/7");
    assert_eq!(server.int("http.response.status_code"), 200);
    assert_eq!(server.text("tidegate.route"), "api");
    assert_eq!(server.text("tidegate.upstream"), "svc");
    assert_eq!(server.int("tidegate.retries"), 1);
    assert_eq!(server.text("tidegate.breaker.state"), "closed");
    assert!(!server.failed());
    assert!(server.end_time_unix_nano >= server.start_time_unix_nano);
    assert!(
        server.start_time_unix_nano > 1_700_000_000_000_000_000,
        "a Unix time"
    );

    let mut attempts: Vec<&Span> = spans.iter().filter(|s| s.kind == CLIENT).collect();
    attempts.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(attempts.len(), 2);
    for attempt in &attempts {
        assert_eq!(attempt.trace_id, server.trace_id);
        assert_eq!(
            attempt.parent_span_id, server.span_id,
            "children of the server span"
        );
        assert_eq!(attempt.text("server.address"), "127.0.0.1");
        assert!(attempt.start_time_unix_nano >= server.start_time_unix_nano);
    }
    assert_eq!(attempts[0].int("http.response.status_code"), 503);
    assert!(attempts[0].failed());
    assert_eq!(attempts[1].int("http.response.status_code"), 200);
    assert_eq!(attempts[1].int("http.request.resend_count"), 1);
    // The upstream saw each attempt's span as its parent.
    let sent: Vec<String> = flaky
        .received()
        .iter()
        .map(|r| r.headers["traceparent"].to_str().unwrap().to_owned())
        .collect();
    for (attempt, traceparent) in attempts.iter().zip(&sent) {
        assert_eq!(
            traceparent,
            &format!("00-{CALLER_TRACE}-{}-01", hex(&attempt.span_id))
        );
    }

    let export = receiver.exports.lock().unwrap()[0].clone();
    let resource = export.resource_spans[0].resource.clone().unwrap();
    let service = resource
        .attributes
        .iter()
        .find(|a| a.key == "service.name")
        .and_then(|a| a.value.clone()?.value);
    assert_eq!(service, Some(Any::Str("edge".into())));
    assert_eq!(
        export.resource_spans[0].scope_spans[0]
            .scope
            .as_ref()
            .unwrap()
            .name,
        "tidegate"
    );
    let metrics = get(&support::admin(&running, "/metrics")).await.body;
    assert!(
        metrics.contains("tidegate_telemetry_spans_total{result=\"exported\"} 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_callers_sampling_decision_is_followed_and_passed_on_and_new_traces_follow_the_ratio() {
    let receiver = Receiver::start().await;
    let upstream = Upstream::start(|_| async { text(200, "ok") }).await;
    let running = support::gateway(&format!(
        "[[upstreams]]\nname = \"svc\"\nendpoints = [\"{}\"]\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstream = \"svc\"\n{}",
        upstream.url(),
        telemetry(&receiver, "sample_ratio = 0.0")
    ))
    .await;
    // Not sampled by the caller; a new trace at ratio 0: neither recorded.
    assert_eq!(get_traced(&running, "/quiet", "00").await, 200);
    assert_eq!(get(&support::url(&running, "/new")).await.status, 200);
    // Sampled by the caller: recorded, whatever the ratio.
    assert_eq!(get_traced(&running, "/loud", "01").await, 200);
    let spans = receiver.until(|s| s.len() >= 2).await;
    let paths: Vec<&str> = spans
        .iter()
        .filter(|s| s.kind == SERVER)
        .map(|s| s.text("url.path"))
        .collect();
    assert_eq!(paths, ["/loud"]);
    let sent: Vec<String> = upstream
        .received()
        .iter()
        .map(|r| r.headers["traceparent"].to_str().unwrap().to_owned())
        .collect();
    assert!(sent[0].starts_with(&format!("00-{CALLER_TRACE}-")) && sent[0].ends_with("-00"));
    assert!(
        !sent[1].contains(CALLER_TRACE) && sent[1].ends_with("-00"),
        "{}",
        sent[1]
    );
    assert!(sent[2].ends_with("-01"));
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_spans_while_requests_are_answered() {
    // A receiver that takes the first export and never answers it.
    let stuck = Upstream::start(|_| std::future::pending()).await;
    let upstream = Upstream::start(|_| async { text(200, "ok") }).await;
    let running = support::gateway(&format!(
        "[[upstreams]]\nname = \"svc\"\nendpoints = [\"{}\"]\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstream = \"svc\"\n\
         [telemetry]\notlp_endpoint = \"{}\"\nmax_queue = 4\nbatch_size = 2\n\
         export_interval = \"10ms\"\nexport_timeout = \"60s\"\n",
        upstream.url(),
        stuck.url()
    ))
    .await;
    for i in 0..30 {
        let answered = tokio::time::timeout(
            Duration::from_secs(5),
            get(&support::url(&running, &format!("/{i}"))),
        )
        .await
        .expect("a request waited on the exporter");
        assert_eq!(answered.status, 200);
    }
    let dropped = support::counter(
        &running,
        "tidegate_telemetry_spans_total{result=\"dropped\"}",
    )
    .await;
    // 60 spans (a server span and an attempt each); at most a batch in
    // the stuck export and a queue's worth kept.
    assert!(dropped >= 60 - 2 - 4, "{dropped}");
}

#[tokio::test]
async fn push_deliveries_join_the_publishers_trace_and_saga_steps_share_the_sagas() {
    let receiver = Receiver::start().await;
    let sink = Upstream::start(|_| async { text(200, "{\"id\":\"r1\"}") }).await;
    let dir = support::Dir::new("telemetry-events");
    let running = support::gateway(&format!(
        r#"[[upstreams]]
name = "sink"
endpoints = ["{sink}"]

[events]
path = "{store}"
listen = "127.0.0.1:0"
[[events.subscriptions]]
name = "mirror"
topic = "orders"
push = {{ upstream = "sink", path = "/hook" }}

[[sagas]]
name = "order"
[[sagas.steps]]
name = "reserve"
action = {{ upstream = "sink", path = "/reserve" }}
[[sagas.steps]]
name = "charge"
action = {{ upstream = "sink", path = "/charge" }}
{telemetry}"#,
        sink = sink.url(),
        store = dir.0.join("events.db").display(),
        telemetry = telemetry(&receiver, ""),
    ))
    .await;
    let events = |path: &str| format!("http://{}{path}", running.events_addr.unwrap());
    let published = send(
        Request::post(events("/v1/topics/orders/events"))
            .header("content-type", "application/json")
            .header("ce-type", "OrderPlaced")
            .header("ce-id", "o-1")
            .header("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))
            .body(full("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(published.status, 201, "{}", published.body);
    let spans = receiver
        .until(|s| s.iter().any(|s| s.kind == CONSUMER))
        .await;
    let delivery = spans.iter().find(|s| s.kind == CONSUMER).unwrap();
    assert_eq!(hex(&delivery.trace_id), CALLER_TRACE);
    assert_eq!(hex(&delivery.parent_span_id), CALLER_SPAN);
    assert_eq!(delivery.name, "process orders");
    assert_eq!(delivery.text("messaging.consumer.group.name"), "mirror");
    assert_eq!(delivery.text("messaging.message.id"), "o-1");
    assert_eq!(delivery.text("tidegate.settle"), "ack");
    let pushed = receiver
        .until(|s| {
            s.iter()
                .any(|c| c.kind == CLIENT && c.parent_span_id == delivery.span_id)
        })
        .await;
    let push = pushed
        .iter()
        .find(|c| c.kind == CLIENT && c.parent_span_id == delivery.span_id)
        .unwrap();
    assert_eq!(push.int("http.response.status_code"), 200);

    let started = send(
        Request::post(events("/v1/sagas/order?wait=5s"))
            .header("content-type", "application/json")
            .body(full(json!({}).to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(started.json()["status"], "completed", "{}", started.body);
    let id = started.json()["id"].as_str().unwrap().to_owned();
    let steps = receiver
        .until(|s| s.iter().filter(|s| s.kind == INTERNAL).count() >= 2)
        .await;
    let steps: Vec<&Span> = steps.iter().filter(|s| s.kind == INTERNAL).collect();
    let trace = {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(format!("tidegate saga {id}").as_bytes());
        hex(&digest[..16])
    };
    for step in &steps {
        assert_eq!(hex(&step.trace_id), trace, "one trace per saga");
        assert_eq!(step.text("tidegate.saga.id"), id);
    }
    let names: Vec<&str> = steps.iter().map(|s| s.text("tidegate.saga.step")).collect();
    assert!(
        names.contains(&"reserve") && names.contains(&"charge"),
        "{names:?}"
    );
}

#[tokio::test]
async fn spans_still_queued_at_shutdown_are_sent() {
    let receiver = Receiver::start().await;
    let upstream = Upstream::start(|_| async { text(200, "ok") }).await;
    let running = support::gateway(&format!(
        "[[upstreams]]\nname = \"svc\"\nendpoints = [\"{}\"]\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstream = \"svc\"\n\
         [telemetry]\notlp_endpoint = \"{}/otlp\"\nexport_interval = \"1h\"\n",
        upstream.url(),
        receiver.server.url()
    ))
    .await;
    assert_eq!(get_traced(&running, "/last", "01").await, 200);
    assert!(
        receiver.spans().is_empty(),
        "nothing is sent before the hour"
    );
    running.shutdown().await;
    assert_eq!(receiver.spans().len(), 2, "the server span and its attempt");
}
