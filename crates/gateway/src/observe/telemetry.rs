//! OpenTelemetry traces (`[telemetry]`): a server span for each request
//! with a client span for each attempt under it, a span for each push
//! delivery and saga step, exported over OTLP/HTTP in protobuf.
//!
//! Recording never waits: a finished span goes into a bounded queue, and
//! when the queue is full it is dropped and counted
//! (`tidegate_telemetry_spans_total{result="dropped"}`). One task sends
//! the queue in batches, a batch at a time, whenever a batch is ready or
//! `export_interval` has passed, and once more when the gateway stops.
//!
//! Sampling follows the caller: a request with a valid `traceparent` is
//! recorded when its `sampled` flag is set, and its spans join its trace;
//! a request without one starts a trace recorded with the probability
//! `sample_ratio`. Either way the upstream is told the decision in the
//! `traceparent` it receives, whose parent is the attempt's span.
//!
//! The protobuf is written here (the few messages of
//! `opentelemetry/proto/collector/trace/v1`), so the gateway needs no
//! code generator or protobuf runtime.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request};
use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use tidegate_client::clock::instant_unix_nanos;
use tidegate_client::headers::TraceIds;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::TelemetrySettings;
use crate::http::body;
use crate::proxy::client::UpstreamClient;

/// What a span stands for (OTLP `SpanKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Work inside the gateway (a saga step).
    Internal = 1,
    /// A request the gateway answered.
    Server = 2,
    /// A request the gateway sent (an attempt).
    Client = 3,
    /// An event handed to a subscriber (a push delivery).
    Consumer = 5,
}

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Text.
    Str(Cow<'static, str>),
    /// A whole number.
    Int(i64),
    /// Yes or no.
    Bool(bool),
}

impl From<&'static str> for Value {
    fn from(text: &'static str) -> Self {
        Value::Str(Cow::Borrowed(text))
    }
}

impl From<String> for Value {
    fn from(text: String) -> Self {
        Value::Str(Cow::Owned(text))
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Int(n)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

/// A span's attributes, named as the OpenTelemetry semantic conventions
/// name them where they have a name.
pub type Attributes = Vec<(&'static str, Value)>;

/// A span begun: its IDs, its parent's, whether it is recorded, and when
/// it started.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    ids: TraceIds,
    parent: Option<[u8; 8]>,
    start: Instant,
}

impl Span {
    /// Whether the span is recorded (its trace is sampled).
    pub fn is_recorded(&self) -> bool {
        self.ids.sampled
    }

    /// The `traceparent` naming this span as the parent.
    pub fn traceparent(&self) -> HeaderValue {
        self.ids.traceparent()
    }

    /// The IDs this span's children take after, when it is recorded.
    pub fn recorded(&self) -> Option<TraceIds> {
        self.ids.sampled.then_some(self.ids)
    }

    /// A span under `parent` (recorded ones' IDs) with `span_id`, begun at
    /// `start`: an attempt, whose ID its `traceparent` already carries.
    pub fn child_of(parent: TraceIds, span_id: [u8; 8], start: Instant) -> Self {
        Span {
            ids: TraceIds { span_id, ..parent },
            parent: Some(parent.span_id),
            start,
        }
    }
}

/// A finished span, waiting for export.
#[derive(Debug)]
struct Finished {
    span: Span,
    end: Instant,
    name: Cow<'static, str>,
    kind: Kind,
    attributes: Attributes,
    /// The span failed, and why.
    error: Option<String>,
}

/// The tracer: begins spans, queues finished ones, and is read by the
/// exporting task.
pub struct Telemetry {
    settings: ArcSwap<TelemetrySettings>,
    queue: Mutex<VecDeque<Finished>>,
    /// Wakes the exporter when a batch is ready.
    ready: Notify,
    exported: Counter,
    dropped: Counter,
    failed: Counter,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// A tracer for `settings`; its spans are counted in `counters`
    /// (exported, dropped, failed).
    pub fn new(settings: TelemetrySettings, counters: [Counter; 3]) -> Self {
        let [exported, dropped, failed] = counters;
        Telemetry {
            queue: Mutex::new(VecDeque::with_capacity(settings.max_queue.min(4096))),
            settings: ArcSwap::from_pointee(settings),
            ready: Notify::new(),
            exported,
            dropped,
            failed,
        }
    }

    /// Applies reloaded settings (the queue keeps what it holds).
    pub fn update(&self, settings: TelemetrySettings) {
        self.settings.store(Arc::new(settings));
    }

    /// Begins a span following `parent` (a `traceparent`): in its trace,
    /// recorded if it is sampled; without a valid one, in a new trace,
    /// recorded at the sampling ratio.
    pub fn begin(&self, parent: Option<&HeaderValue>) -> Span {
        let start = Instant::now();
        match parent.and_then(TraceIds::parse) {
            Some(caller) => Span {
                ids: caller.child(),
                parent: Some(caller.span_id),
                start,
            },
            None => {
                let ratio = self.settings.load().sample_ratio;
                let sampled = ratio >= 1.0 || tidegate_resilience::rng::unit() < ratio;
                Span {
                    ids: TraceIds::random(sampled),
                    parent: None,
                    start,
                }
            }
        }
    }

    /// Begins a root span in the trace `trace_id` (a saga's), recorded by
    /// the trace ID at the sampling ratio: every span of that trace is
    /// recorded, or none.
    pub fn begin_in(&self, trace_id: [u8; 16]) -> Span {
        let ratio = self.settings.load().sample_ratio;
        let low = u64::from_be_bytes(trace_id[8..].try_into().expect("8 bytes"));
        // As OpenTelemetry's TraceIdRatioBased: the ID's low bits against
        // the ratio.
        let share = (low >> 11) as f64 / (1u64 << 53) as f64;
        let sampled = ratio >= 1.0 || share < ratio;
        Span {
            ids: TraceIds {
                trace_id,
                ..TraceIds::random(sampled)
            },
            parent: None,
            start: Instant::now(),
        }
    }

    /// Ends `span` now and queues it for export if it is recorded; a full
    /// queue drops it (counted).
    pub fn end(
        &self,
        span: Span,
        name: impl Into<Cow<'static, str>>,
        kind: Kind,
        attributes: Attributes,
        error: Option<String>,
    ) {
        if !span.is_recorded() {
            return;
        }
        let finished = Finished {
            span,
            end: Instant::now(),
            name: name.into(),
            kind,
            attributes,
            error,
        };
        let settings = self.settings.load();
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() >= settings.max_queue {
            drop(queue);
            self.dropped.inc();
            return;
        }
        queue.push_back(finished);
        let batch = queue.len() >= settings.batch_size;
        drop(queue);
        if batch {
            self.ready.notify_one();
        }
    }

    /// Up to `max` queued spans, oldest first.
    fn take(&self, max: usize) -> Vec<Finished> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let n = queue.len().min(max);
        queue.drain(..n).collect()
    }
}

/// Exports queued spans until `stopped` resolves (abandoning an export
/// under way), then sends what is left within one export timeout.
pub async fn export(
    telemetry: Arc<Telemetry>,
    client: UpstreamClient,
    stopped: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stopped);
    let mut exporter = Exporter {
        telemetry,
        client,
        failing: false,
    };
    loop {
        let interval = exporter.telemetry.settings.load().export_interval;
        tokio::select! {
            () = exporter.telemetry.ready.notified() => {}
            () = tokio::time::sleep(interval) => {}
            () = &mut stopped => break,
        }
        tokio::select! {
            () = exporter.drain() => {}
            () = &mut stopped => break,
        }
    }
    let timeout = exporter.telemetry.settings.load().export_timeout;
    let _ = tokio::time::timeout(timeout, exporter.drain()).await;
}

struct Exporter {
    telemetry: Arc<Telemetry>,
    client: UpstreamClient,
    /// The last export failed (and that was logged).
    failing: bool,
}

impl Exporter {
    /// Sends batches until the queue is empty.
    async fn drain(&mut self) {
        loop {
            let settings = self.telemetry.settings.load_full();
            let batch = self.telemetry.take(settings.batch_size);
            if batch.is_empty() {
                return;
            }
            let n = batch.len() as u64;
            match send(&self.client, &settings, &batch).await {
                Ok(()) => {
                    self.telemetry.exported.inc_by(n);
                    if std::mem::take(&mut self.failing) {
                        tracing::info!("spans are exported again");
                    }
                }
                Err(why) => {
                    self.telemetry.failed.inc_by(n);
                    if !std::mem::replace(&mut self.failing, true) {
                        tracing::warn!(error = %why, "spans could not be exported (logged once until an export succeeds; counted in tidegate_telemetry_spans_total{{result=\"failed\"}})");
                    }
                }
            }
        }
    }
}

/// POSTs `batch` to the receiver.
async fn send(
    client: &UpstreamClient,
    settings: &TelemetrySettings,
    batch: &[Finished],
) -> Result<(), String> {
    let body = encode(&settings.service_name, batch);
    let mut request = Request::new(body::full(body));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = settings.path.clone().into();
    let headers = request.headers_mut();
    headers.insert(header::HOST, settings.host.clone());
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-protobuf"),
    );
    let exchange = async {
        let response = client
            .request(&settings.to, request, None)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        // Read the answer so the connection serves the next export.
        let _ = response.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered {status}"))
        }
    };
    tokio::time::timeout(settings.export_timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {:?}", settings.export_timeout))?
}

/// Protobuf of an `ExportTraceServiceRequest` holding `batch`.
fn encode(service_name: &str, batch: &[Finished]) -> Bytes {
    let mut resource = Vec::with_capacity(128);
    for (key, value) in [
        ("service.name", service_name),
        ("service.version", env!("CARGO_PKG_VERSION")),
        ("telemetry.sdk.name", "tidegate"),
        ("telemetry.sdk.language", "rust"),
    ] {
        message(&mut resource, 1, |out| {
            string_field(out, 1, key);
            message(out, 2, |any| string_field(any, 1, value));
        });
    }
    let mut request = Vec::with_capacity(256 + batch.len() * 256);
    // ExportTraceServiceRequest.resource_spans
    message(&mut request, 1, |rs| {
        // ResourceSpans.resource
        bytes_field(rs, 1, &resource);
        // ResourceSpans.scope_spans
        message(rs, 2, |ss| {
            // ScopeSpans.scope: InstrumentationScope { name, version }
            message(ss, 1, |scope| {
                string_field(scope, 1, "tidegate");
                string_field(scope, 2, env!("CARGO_PKG_VERSION"));
            });
            for span in batch {
                message(ss, 2, |out| encode_span(out, span));
            }
        });
    });
    Bytes::from(request)
}

fn encode_span(out: &mut Vec<u8>, f: &Finished) {
    bytes_field(out, 1, &f.span.ids.trace_id);
    bytes_field(out, 2, &f.span.ids.span_id);
    if let Some(parent) = &f.span.parent {
        bytes_field(out, 4, parent);
    }
    string_field(out, 5, &f.name);
    varint_field(out, 6, f.kind as u64);
    let end = instant_unix_nanos(f.end);
    let start = end.saturating_sub(f.end.saturating_duration_since(f.span.start).as_nanos() as u64);
    fixed64_field(out, 7, start);
    fixed64_field(out, 8, end);
    for (key, value) in &f.attributes {
        message(out, 9, |kv| key_value(kv, key, value));
    }
    if let Some(why) = &f.error {
        // Status { message = 2, code = 3 (STATUS_CODE_ERROR = 2) }
        message(out, 15, |status| {
            string_field(status, 2, why);
            varint_field(status, 3, 2);
        });
    }
    // flags: the sampled trace flag (bits 0-7 are the W3C flags).
    fixed32_field(out, 16, 1);
}

fn key_value(out: &mut Vec<u8>, key: &str, value: &Value) {
    string_field(out, 1, key);
    // KeyValue.value: AnyValue { string_value = 1, bool_value = 2, int_value = 3 }
    message(out, 2, |any| match value {
        Value::Str(text) => string_field(any, 1, text),
        Value::Bool(b) => varint_field(any, 2, u64::from(*b)),
        Value::Int(n) => varint_field(any, 3, *n as u64),
    });
}

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, u64::from(field << 3 | wire));
}

fn varint_field(out: &mut Vec<u8>, field: u32, n: u64) {
    tag(out, field, 0);
    varint(out, n);
}

fn fixed64_field(out: &mut Vec<u8>, field: u32, n: u64) {
    tag(out, field, 1);
    out.extend_from_slice(&n.to_le_bytes());
}

fn fixed32_field(out: &mut Vec<u8>, field: u32, n: u32) {
    tag(out, field, 5);
    out.extend_from_slice(&n.to_le_bytes());
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    tag(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn string_field(out: &mut Vec<u8>, field: u32, text: &str) {
    bytes_field(out, field, text.as_bytes());
}

/// A nested message: written after its tag, then its length put in front
/// (moved over by the few bytes the length takes).
fn message(out: &mut Vec<u8>, field: u32, write: impl FnOnce(&mut Vec<u8>)) {
    tag(out, field, 2);
    let at = out.len();
    write(out);
    let len = out.len() - at;
    let mut prefix = Vec::with_capacity(5);
    varint(&mut prefix, len as u64);
    out.splice(at..at, prefix);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_little_endian_groups_of_seven_bits() {
        for (n, want) in [
            (0u64, vec![0x00]),
            (1, vec![0x01]),
            (127, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (300, vec![0xac, 0x02]),
            (
                u64::MAX,
                vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ] {
            let mut out = Vec::new();
            varint(&mut out, n);
            assert_eq!(out, want, "{n}");
        }
    }

    #[test]
    fn a_nested_message_is_prefixed_by_its_length() {
        let mut out = Vec::new();
        message(&mut out, 1, |inner| {
            string_field(inner, 2, &"x".repeat(200))
        });
        // tag 1/LEN, length 203 (two bytes), tag 2/LEN, length 200 (two bytes)
        assert_eq!(&out[..6], &[0x0a, 0xcb, 0x01, 0x12, 0xc8, 0x01]);
        assert_eq!(out.len(), 6 + 200);
    }
}
