//! Propagation headers: correlation IDs, W3C trace context, the remaining
//! deadline, the internal token, and the caller's [`Context`] that outgoing
//! calls take them from.
//!
//! A service that receives a request opens a scope with the request's
//! headers; every call made inside it carries the same correlation ID and
//! continues the same trace:
//!
//! ```
//! use http::HeaderMap;
//! use tidegate_client::headers::Context;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut incoming = HeaderMap::new();
//! incoming.insert("x-correlation-id", "req-42".parse().unwrap());
//! let id = Context::from_headers(&incoming)
//!     .scope(async { Context::current().unwrap().correlation_id().clone() })
//!     .await;
//! assert_eq!(id, "req-42");
//! # }
//! ```

use std::future::Future;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

/// `x-correlation-id`.
pub static CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");
/// `traceparent` (W3C trace context).
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `x-internal-token`.
pub static INTERNAL_TOKEN: HeaderName = HeaderName::from_static("x-internal-token");
/// `x-tidegate-deadline-ms`: the time the upstream has left.
pub static DEADLINE_MS: HeaderName = HeaderName::from_static("x-tidegate-deadline-ms");
/// `idempotency-key`: a request carrying it may be retried whatever its method.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

tokio::task_local! {
    static CONTEXT: Context;
}

/// What outgoing calls inherit from the request being served: its
/// correlation ID and trace.
#[derive(Debug, Clone)]
pub struct Context {
    correlation_id: HeaderValue,
    traceparent: Option<HeaderValue>,
}

impl Default for Context {
    fn default() -> Self {
        Context::from_headers(&HeaderMap::new())
    }
}

impl Context {
    /// The context of an incoming request: its `x-correlation-id` if valid
    /// (else a new one) and its `traceparent` if valid.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        Context {
            correlation_id: correlation_id(headers),
            traceparent: headers
                .get(&TRACEPARENT)
                .filter(|v| is_traceparent(v))
                .cloned(),
        }
    }

    /// The correlation ID.
    pub fn correlation_id(&self) -> &HeaderValue {
        &self.correlation_id
    }

    /// What a call made in this context sends: the correlation ID, taken
    /// (no clone to count up and down again), and the [`trace`](Self::trace)
    /// its attempts join.
    pub(crate) fn into_call(self) -> (HeaderValue, Trace) {
        let trace = self.trace();
        (self.correlation_id, trace)
    }

    /// What a call made outside any context sends: a new correlation ID,
    /// and a new trace whose ID is that same one, so that the call's logs
    /// and its trace are found by one value. One draw of 128 random bits
    /// serves both.
    pub(crate) fn fresh_call() -> (HeaderValue, Trace) {
        let trace = Trace::begun();
        let mut id = [0u8; 32];
        id.copy_from_slice(trace.id());
        (shared_value(id), trace)
    }

    /// The caller's `traceparent`, if it had one.
    pub fn traceparent(&self) -> Option<&HeaderValue> {
        self.traceparent.as_ref()
    }

    /// Runs `f` with this context as the current one.
    pub async fn scope<F: Future>(self, f: F) -> F::Output {
        CONTEXT.scope(self, f).await
    }

    /// The context of the enclosing [`scope`](Context::scope), if any.
    pub fn current() -> Option<Context> {
        CONTEXT.try_with(Context::clone).ok()
    }

    /// The `traceparent` for a call made in this context: the same trace
    /// with a new span, or a new trace each time when there is none.
    pub fn child_traceparent(&self) -> HeaderValue {
        self.trace().child()
    }

    /// The trace a call made in this context joins: the caller's, or a new
    /// one. A call makes it once, so that all its attempts share it.
    pub(crate) fn trace(&self) -> Trace {
        // Only a valid `traceparent` is kept: it is not checked again.
        match &self.traceparent {
            Some(parent) => Trace::continuing(parent),
            None => Trace::begun(),
        }
    }
}

/// The trace of a call: the trace ID and flags every attempt's
/// `traceparent` repeats, each with a span ID of its own.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Trace {
    /// `00-<trace ID>-`: how each `traceparent` begins.
    head: [u8; 36],
    flags: [u8; 2],
}

impl Trace {
    /// `parent`'s trace if it is a valid `traceparent`, else a new one.
    fn after(parent: Option<&HeaderValue>) -> Self {
        match parent.filter(|v| is_traceparent(v)) {
            Some(parent) => Trace::continuing(parent),
            None => Trace::begun(),
        }
    }

    /// The trace of `parent`, a valid `traceparent`: its trace ID and flags.
    fn continuing(parent: &HeaderValue) -> Self {
        let parent = parent.as_bytes();
        let mut trace = Trace {
            head: [0; 36],
            flags: [0; 2],
        };
        trace.head.copy_from_slice(&parent[..36]);
        trace.flags.copy_from_slice(&parent[53..]);
        trace
    }

    /// A new trace, sampled (flags `01`).
    fn begun() -> Self {
        let mut trace = Trace {
            head: *b"00-00000000000000000000000000000000-",
            flags: *b"01",
        };
        random_hex(&mut trace.head[3..35]);
        trace
    }

    /// The trace ID: 32 hex digits.
    fn id(&self) -> &[u8] {
        &self.head[3..35]
    }

    /// A `traceparent` in this trace, with a new span ID.
    pub(crate) fn child(&self) -> HeaderValue {
        let mut value = [0; TRACEPARENT_LEN];
        self.write_child(&mut value);
        shared_value(value)
    }

    /// [`child`](Trace::child) and the [`deadline_value`] of `left`, made
    /// in one allocation that both values share: an attempt with a
    /// deadline sends the two.
    pub(crate) fn child_and_deadline(&self, left: Duration) -> (HeaderValue, HeaderValue) {
        let mut values = Inline::<{ TRACEPARENT_LEN + MAX_DIGITS }>::default();
        self.write_child(&mut values.room()[..TRACEPARENT_LEN]);
        values.filled(TRACEPARENT_LEN);
        let digits = write_digits(whole_millis(left), values.room());
        values.filled(digits);
        // Split, not sliced twice: one count of the shared bytes fewer to
        // take and give back.
        let mut traceparent = values.into_bytes();
        let deadline = traceparent.split_off(TRACEPARENT_LEN);
        let value = |bytes| HeaderValue::from_maybe_shared(bytes).expect("hex, dashes and digits");
        (value(traceparent), value(deadline))
    }

    /// `00-<trace ID>-<new span ID>-<flags>` into `out` (55 bytes).
    fn write_child(&self, out: &mut [u8]) {
        out[..36].copy_from_slice(&self.head);
        random_hex(&mut out[36..52]);
        out[52] = b'-';
        out[53..].copy_from_slice(&self.flags);
    }
}

/// A version-00 `traceparent`'s length.
pub const TRACEPARENT_LEN: usize = 55;
/// Digits of `u64::MAX`.
const MAX_DIGITS: usize = 20;

/// Up to `N` bytes kept in place, for `Bytes::from_owner`: one allocation
/// then holds the bytes and their reference count, so clones and slices of
/// the `Bytes` allocate nothing.
pub(crate) struct Inline<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> Default for Inline<N> {
    fn default() -> Self {
        Inline {
            bytes: [0; N],
            len: 0,
        }
    }
}

impl<const N: usize> Inline<N> {
    /// The room left, to write into; [`filled`](Inline::filled) keeps it.
    pub(crate) fn room(&mut self) -> &mut [u8] {
        &mut self.bytes[self.len..]
    }

    /// Keeps the next `n` bytes written into the room.
    pub(crate) fn filled(&mut self, n: usize) {
        self.len += n;
    }

    /// Appends `part`; it must fit.
    pub(crate) fn push(&mut self, part: &[u8]) {
        self.room()[..part.len()].copy_from_slice(part);
        self.filled(part.len());
    }

    pub(crate) fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

impl<const N: usize> AsRef<[u8]> for Inline<N> {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Up to this many values, [`values`] walks a map rather than hash the
/// name: a request's few fields are compared in fewer instructions than
/// the name's hash takes.
const SMALL_MAP: usize = 8;

/// `name`'s values in `headers`, in order, as [`HeaderMap::get_all`]
/// gives them; a small map is walked, not hashed into.
pub fn values<'a>(
    headers: &'a HeaderMap,
    name: &'a HeaderName,
) -> impl Iterator<Item = &'a HeaderValue> + 'a {
    let (walked, hashed) = if headers.len() <= SMALL_MAP {
        (Some(headers.iter()), None)
    } else {
        (None, Some(headers.get_all(name).iter()))
    };
    let walked = walked
        .into_iter()
        .flatten()
        .filter(move |(n, _)| *n == name)
        .map(|(_, value)| value);
    walked.chain(hashed.into_iter().flatten())
}

/// `name`'s first value in `headers`, as [`HeaderMap::get`] gives it; a
/// small map is walked, not hashed into.
pub fn first<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    if headers.len() <= SMALL_MAP {
        headers
            .iter()
            .find_map(|(n, value)| (n == name).then_some(value))
    } else {
        headers.get(name)
    }
}

/// Whether a request with this method may be sent twice.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Statuses that are worth another attempt: 502, 503, 504, and 429 (with a `Retry-After`).
pub fn is_retryable_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504 | 429)
}

/// A `Retry-After`: its delay in seconds, or the time until its
/// HTTP-date (zero once that has passed). `None` when absent or neither.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    match text.parse::<u64>() {
        Ok(secs) => Some(Duration::from_secs(secs)),
        Err(_) => crate::clock::until_http_date(text),
    }
}

/// The client's correlation ID if it is at most 128 safe characters, else a new one.
pub fn correlation_id(headers: &HeaderMap) -> HeaderValue {
    clients_correlation_id(headers)
        .cloned()
        .unwrap_or_else(|| shared_value(new_id_hex()))
}

/// The client's correlation ID, if it is at most 128 safe characters
/// (letters, digits, `-_.:`).
pub fn clients_correlation_id(headers: &HeaderMap) -> Option<&HeaderValue> {
    first(headers, &CORRELATION_ID).filter(|v| is_correlation_id(v.as_bytes()))
}

/// Whether `id` may be a correlation ID: 1 to 128 safe characters
/// (letters, digits, `-_.:`).
pub fn is_correlation_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
}

/// A new correlation ID: 32 random lowercase hex digits.
pub fn new_id_hex() -> [u8; 32] {
    let mut id = [0u8; 32];
    random_hex(&mut id);
    id
}

/// A `traceparent` for the upstream hop: the client's trace with a new
/// span, or a new sampled trace.
pub fn traceparent(headers: &HeaderMap) -> HeaderValue {
    child_traceparent(headers.get(&TRACEPARENT))
}

/// The next hop's `traceparent` after `parent`: its trace with a new span,
/// or a new sampled trace when there is no valid parent.
pub fn child_traceparent(parent: Option<&HeaderValue>) -> HeaderValue {
    Trace::after(parent).child()
}

/// [`child_traceparent`], written into `out` (no value made).
pub fn write_child_traceparent(parent: Option<&HeaderValue>, out: &mut [u8; TRACEPARENT_LEN]) {
    Trace::after(parent).write_child(out);
}

/// `traceparent`'s trace with a new span ID, into `out`: the next
/// attempt's `traceparent` after one the gateway made (so known valid).
pub fn write_next_span(traceparent: &[u8; TRACEPARENT_LEN], out: &mut [u8; TRACEPARENT_LEN]) {
    *out = *traceparent;
    random_hex(&mut out[36..52]);
}

/// A header value over `bytes` (hex and dashes) that is shared, not copied
/// or re-allocated, when cloned: each attempt clones the request's IDs, and
/// the response clones the correlation ID again.
fn shared_value(bytes: impl AsRef<[u8]> + Send + 'static) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(bytes))
        .expect("hex is a valid header value")
}

/// The IDs of a `traceparent`: the trace, the span (the sender's), and
/// whether the trace is sampled (flag `01`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceIds {
    /// 16 bytes, not all zero.
    pub trace_id: [u8; 16],
    /// 8 bytes, not all zero.
    pub span_id: [u8; 8],
    /// The `sampled` flag.
    pub sampled: bool,
}

impl TraceIds {
    /// The IDs of `v` if it is a valid version-00 `traceparent`.
    pub fn parse(v: &HeaderValue) -> Option<Self> {
        Self::parse_bytes(v.as_bytes())
    }

    /// The IDs of `v` if it is a valid version-00 `traceparent`.
    pub fn parse_bytes(v: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(v).ok()?;
        let (_, flags) = parse_traceparent(text)?;
        let bytes = text.as_bytes();
        let mut ids = TraceIds {
            trace_id: [0; 16],
            span_id: [0; 8],
            sampled: u8::from_str_radix(flags, 16).ok()? & 1 == 1,
        };
        unhex(&bytes[3..35], &mut ids.trace_id)?;
        unhex(&bytes[36..52], &mut ids.span_id)?;
        Some(ids)
    }

    /// New random IDs (never all zero).
    pub fn random(sampled: bool) -> Self {
        let [a, b, c] = [(); 3].map(|()| tidegate_resilience::rng::next_u64() | 1);
        let mut trace_id = [0; 16];
        trace_id[..8].copy_from_slice(&a.to_be_bytes());
        trace_id[8..].copy_from_slice(&b.to_be_bytes());
        TraceIds {
            trace_id,
            span_id: c.to_be_bytes(),
            sampled,
        }
    }

    /// The same trace and sampling with a new random span ID.
    pub fn child(&self) -> Self {
        TraceIds {
            span_id: (tidegate_resilience::rng::next_u64() | 1).to_be_bytes(),
            ..*self
        }
    }

    /// `00-<trace ID>-<span ID>-<flags>`.
    pub fn traceparent(&self) -> HeaderValue {
        let mut value = [0; TRACEPARENT_LEN];
        value[..3].copy_from_slice(b"00-");
        let word = |bytes: &[u8]| u64::from_be_bytes(bytes.try_into().expect("8 bytes"));
        value[3..19].copy_from_slice(&hex16(word(&self.trace_id[..8])));
        value[19..35].copy_from_slice(&hex16(word(&self.trace_id[8..])));
        value[35] = b'-';
        value[36..52].copy_from_slice(&hex16(word(&self.span_id)));
        value[52] = b'-';
        value[53..].copy_from_slice(if self.sampled { b"01" } else { b"00" });
        shared_value(value)
    }
}

/// Lowercase hex `digits` into `out` (half as many bytes).
fn unhex(digits: &[u8], out: &mut [u8]) -> Option<()> {
    let nibble = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    for (byte, pair) in out.iter_mut().zip(digits.chunks(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(())
}

/// Whether `v` is a valid version-00 `traceparent` (55 bytes).
fn is_traceparent(v: &HeaderValue) -> bool {
    v.to_str().ok().and_then(parse_traceparent).is_some()
}

/// `(trace-id, flags)` of a valid version-00 traceparent.
fn parse_traceparent(v: &str) -> Option<(&str, &str)> {
    let mut parts = v.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let valid = version == "00"
        && parts.next().is_none()
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0');
    valid.then_some((trace, flags))
}

/// The `x-tidegate-deadline-ms` value for `left`: whole milliseconds,
/// rounded down.
pub fn deadline_value(left: Duration) -> HeaderValue {
    // Copied once: `From<u64>` allocates twice (its buffer, then the shared
    // handle when frozen).
    let mut digits = [0; MAX_DIGITS];
    let n = deadline_digits(left, &mut digits);
    HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(&digits[..n]))
        .expect("digits are a valid header value")
}

/// [`deadline_value`]'s digits at the start of `out` (room for 20); their
/// count.
pub fn deadline_digits(left: Duration, out: &mut [u8]) -> usize {
    write_digits(whole_millis(left), out)
}

fn whole_millis(left: Duration) -> u64 {
    u64::try_from(left.as_millis()).unwrap_or(u64::MAX)
}

/// The decimal digits of `n` at the start of `out` (room for 20); their count.
pub fn write_digits(mut n: u64, out: &mut [u8]) -> usize {
    // Counted first, then written last digit first, in place: no copy of
    // a varying length (a call to `memcpy`) for two or three digits.
    let count = n.checked_ilog10().map_or(1, |log| log as usize + 1);
    for digit in out[..count].iter_mut().rev() {
        *digit = b'0' + (n % 10) as u8;
        n /= 10;
    }
    count
}

/// A new request ID: 32 random hex digits.
pub fn new_id() -> String {
    let mut id = [0u8; 32];
    random_hex(&mut id);
    id.iter().map(|&b| char::from(b)).collect()
}

/// Fills `out` with random hex digits from the per-thread generator of
/// `tidegate_resilience::rng`: unique enough for IDs, but predictable,
/// never a secret. Never all zero.
fn random_hex(out: &mut [u8]) {
    for chunk in out.chunks_mut(16) {
        let digits = hex16(tidegate_resilience::rng::next_u64() | 1);
        chunk.copy_from_slice(&digits[..chunk.len()]);
    }
}

/// `word` as 16 lowercase hex digits, eight at a time: each nibble is
/// spread to a byte of its own, then all eight become ASCII at once.
fn hex16(word: u64) -> [u8; 16] {
    fn eight(half: u32) -> [u8; 8] {
        let mut x = u64::from(half);
        x = (x & 0xffff_0000) << 16 | (x & 0xffff);
        x = (x & 0x0000_ff00_0000_ff00) << 8 | (x & 0x0000_00ff_0000_00ff);
        x = (x & 0x00f0_00f0_00f0_00f0) << 4 | (x & 0x000f_000f_000f_000f);
        // 1 in the bytes above 9, which become letters.
        let letters = (x + 0x0606_0606_0606_0606) >> 4 & 0x0101_0101_0101_0101;
        (x + 0x3030_3030_3030_3030 + letters * u64::from(b'a' - b'0' - 10)).to_be_bytes()
    }
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&eight((word >> 32) as u32));
    out[8..].copy_from_slice(&eight(word as u32));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walked_and_hashed_lookups_agree() {
        // A name's values interleaved with others', in maps small enough
        // to be walked and large enough to be hashed into.
        for others in [0, 3, SMALL_MAP, SMALL_MAP + 5] {
            let mut h = HeaderMap::new();
            for i in 0..others {
                let name = HeaderName::from_bytes(format!("x-other-{i}").as_bytes()).unwrap();
                h.append(name, HeaderValue::from(i));
                if i % 2 == 0 {
                    h.append(&CORRELATION_ID, HeaderValue::from(100 + i));
                }
            }
            h.append(http::header::HOST, HeaderValue::from_static("a.example"));
            for name in [&CORRELATION_ID, &http::header::HOST, &TRACEPARENT] {
                assert_eq!(first(&h, name), h.get(name), "{others} others, {name}");
                assert_eq!(
                    values(&h, name).collect::<Vec<_>>(),
                    h.get_all(name).iter().collect::<Vec<_>>(),
                    "{others} others, {name}"
                );
            }
        }
    }

    #[test]
    fn hex_digits_match_the_formatter() {
        for word in [0, 1, 0x0123_4567_89ab_cdef, u64::MAX, 0xa0b1_c2d3_e4f5_0617] {
            assert_eq!(
                std::str::from_utf8(&hex16(word)).unwrap(),
                format!("{word:016x}")
            );
        }
    }

    #[test]
    fn decimal_digits_match_the_formatter() {
        let mut out = [b'x'; 21];
        let edges = (0..20).flat_map(|e| {
            let p = 10u64.pow(e);
            [p - 1, p, p + 1]
        });
        for n in edges.chain([24, 1234, u64::MAX]) {
            let count = write_digits(n, &mut out);
            assert_eq!(std::str::from_utf8(&out[..count]).unwrap(), n.to_string());
            assert_eq!(
                out[count..],
                [b'x'; 21][count..],
                "{n}: nothing past its digits"
            );
            out = [b'x'; 21];
        }
    }

    #[test]
    fn trace_ids_read_and_write_a_traceparent() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ids = TraceIds::parse(&HeaderValue::from_static(text)).unwrap();
        assert_eq!(ids.trace_id[..3], [0x4b, 0xf9, 0x2f]);
        assert_eq!(
            ids.span_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert!(ids.sampled);
        assert_eq!(ids.traceparent(), text);
        let unsampled = TraceIds {
            sampled: false,
            ..ids.child()
        };
        let written = unsampled.traceparent();
        assert!(written.to_str().unwrap().ends_with("-00"));
        assert_eq!(TraceIds::parse(&written), Some(unsampled));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(
                TraceIds::parse(&HeaderValue::from_static(bad)),
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn deadlines_are_whole_milliseconds() {
        use std::time::Duration;
        for (left, text) in [
            (Duration::ZERO, "0"),
            (Duration::from_micros(999), "0"),
            (Duration::from_millis(29_999), "29999"),
            (Duration::from_secs(u64::MAX), "18446744073709551615"),
        ] {
            assert_eq!(deadline_value(left), text);
        }
    }

    #[test]
    fn an_attempts_trace_and_deadline_share_one_allocation() {
        let mut incoming = HeaderMap::new();
        incoming.insert(
            &TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let context = Context::from_headers(&incoming);
        for (left, digits) in [
            (Duration::ZERO, "0"),
            (Duration::from_millis(29_999), "29999"),
            (Duration::MAX, "18446744073709551615"),
        ] {
            let (trace, deadline) = context.trace().child_and_deadline(left);
            let trace = trace.to_str().unwrap();
            assert!(
                trace.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{trace}"
            );
            assert!(trace.ends_with("-01"));
            assert!(parse_traceparent(trace).is_some());
            assert!(!trace.contains("00f067aa0ba902b7"));
            assert_eq!(deadline, digits);
        }
        let (trace, _) = Context::default()
            .trace()
            .child_and_deadline(Duration::ZERO);
        assert!(parse_traceparent(trace.to_str().unwrap()).is_some());
    }

    #[test]
    fn a_calls_attempts_share_its_trace_and_each_has_a_span() {
        let span = |v: &HeaderValue| v.to_str().unwrap()[36..52].to_owned();
        let trace_id = |v: &HeaderValue| v.to_str().unwrap()[3..35].to_owned();
        // With no caller's trace, one begun for the call, sampled.
        let trace = Context::default().trace();
        let (first, second) = (trace.child(), trace.child_and_deadline(Duration::ZERO).0);
        for v in [&first, &second] {
            let (_, flags) = parse_traceparent(v.to_str().unwrap()).unwrap();
            assert_eq!(flags, "01");
        }
        assert_eq!(trace_id(&first), trace_id(&second));
        assert_ne!(span(&first), span(&second));
        // Another call, another trace.
        assert_ne!(
            trace_id(&Context::default().trace().child()),
            trace_id(&first)
        );
        // The caller's trace and flags are kept.
        let mut incoming = HeaderMap::new();
        incoming.insert(
            &TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        );
        let child = Context::from_headers(&incoming).trace().child();
        assert!(child
            .to_str()
            .unwrap()
            .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(child.to_str().unwrap().ends_with("-00"));
    }

    #[test]
    fn a_call_outside_any_context_has_its_correlation_id_for_trace_id() {
        let (id, trace) = Context::fresh_call();
        let parent = trace.child();
        let (trace_id, flags) = parse_traceparent(parent.to_str().unwrap()).unwrap();
        assert_eq!(id.to_str().unwrap(), trace_id);
        assert_eq!(flags, "01");
        // The next such call draws new ones.
        assert_ne!(Context::fresh_call().0, id);
    }

    #[test]
    fn correlation_ids_are_checked() {
        let mut h = HeaderMap::new();
        h.insert(&CORRELATION_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(correlation_id(&h), "abc-123");
        h.insert(
            &CORRELATION_ID,
            HeaderValue::from_static("bad id with spaces"),
        );
        assert_eq!(correlation_id(&h).len(), 32);
        h.insert(
            &CORRELATION_ID,
            HeaderValue::from_str(&"a".repeat(129)).unwrap(),
        );
        assert_eq!(correlation_id(&h).len(), 32);
    }

    #[test]
    fn traceparent_keeps_the_trace_and_makes_a_new_span() {
        let mut h = HeaderMap::new();
        h.insert(
            &TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let next = traceparent(&h);
        let next = next.to_str().unwrap();
        assert!(next.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(!next.contains("00f067aa0ba902b7"));
        h.insert(&TRACEPARENT, HeaderValue::from_static("garbage"));
        assert!(parse_traceparent(traceparent(&h).to_str().unwrap()).is_some());
    }

    #[tokio::test]
    async fn calls_outside_a_scope_have_no_context() {
        assert!(Context::current().is_none());
        let ctx = Context::default();
        let id = ctx.correlation_id().clone();
        let inner = ctx.scope(async { Context::current() }).await.unwrap();
        assert_eq!(inner.correlation_id(), &id);
        assert!(inner.traceparent().is_none());
        assert!(parse_traceparent(inner.child_traceparent().to_str().unwrap()).is_some());
    }

    #[test]
    fn retry_rules() {
        assert!(is_idempotent(&Method::PUT));
        assert!(!is_idempotent(&Method::POST));
        assert!(is_retryable_status(StatusCode::BAD_GATEWAY));
        assert!(!is_retryable_status(StatusCode::INTERNAL_SERVER_ERROR));
        let mut h = HeaderMap::new();
        h.insert(http::header::RETRY_AFTER, HeaderValue::from_static(" 7 "));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let gone = HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT");
        h.insert(http::header::RETRY_AFTER, gone);
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        for neither in ["-1", "1.5", "soon"] {
            h.insert(http::header::RETRY_AFTER, HeaderValue::from_static(neither));
            assert_eq!(retry_after(&h), None, "{neither}");
        }
    }
}
