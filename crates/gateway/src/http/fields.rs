//! An upstream answer's fields as they came, for an HTTP/1.1 client to be
//! sent as they are.
//!
//! A header map costs more than reading the head it comes from: each
//! field's name is looked up, its value checked again, hashed and
//! inserted, and the map is walked again to write it and then dropped.
//! An answer the gateway passes on needs none of that. [`Received`] keeps
//! an HTTP/1.1 answer's head and where each of its fields lies, the
//! hop-by-hop ones left out, and rides in the answer's body (a
//! [`Carrier`]) with the header map left empty; the client's HTTP/1.1
//! connection writes the fields from the head's bytes. (httparse read
//! the head: names are tokens, values visible text, which is all a header
//! map would check.)
//!
//! Two rules keep the two places one set of fields:
//! - a field in the map replaces the received fields of its name (the
//!   gateway's `x-correlation-id`, its `X-RateLimit-*`…);
//! - whatever reads an answer's fields calls [`materialize`] first, which
//!   moves the received ones into the map (the stale cache, HTTP/2
//!   clients, the gateway's own calls).

use std::fmt;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response};

use crate::http::body::{ClientBody, ProxyBody};
use crate::http::codec::{field, Span};
use crate::http::headers::{OwnValue, CORRELATION_ID};
use tidegate_client::headers::first;

/// Fields kept at most; an answer with more is read into a header map.
pub(crate) const MAX_FIELDS: usize = 32;

/// An answer's end-to-end fields, as its head has them.
#[derive(Clone)]
pub struct Received {
    head: Bytes,
    spans: [Span; MAX_FIELDS],
    len: u8,
    /// Which spans are `content-length` fields, written by the framing.
    lengths: u32,
    /// The length those declare, if they agree on one.
    length: Option<u64>,
    /// Whether one is `date`.
    dated: bool,
    /// Fields the gateway set in place of any received of their names
    /// (its `x-correlation-id`), kept here rather than in a map of their own.
    set: [Option<(&'static HeaderName, OwnValue)>; 2],
}

impl Received {
    /// None yet. The head they lie in comes once they have been read
    /// from it ([`Received::lie_in`]): no count of references taken
    /// and given back meanwhile.
    pub(crate) fn new() -> Self {
        Received {
            head: Bytes::new(),
            spans: [[0; 4]; MAX_FIELDS],
            len: 0,
            lengths: 0,
            length: None,
            dated: false,
            set: [None, None],
        }
    }

    /// The head the fields kept lie in.
    pub(crate) fn lie_in(&mut self, head: Bytes) {
        self.head = head;
    }

    /// Keeps the field at `span`; false when there is no room.
    pub(crate) fn push(&mut self, span: Span) -> bool {
        let Some(slot) = self.spans.get_mut(usize::from(self.len)) else {
            return false;
        };
        *slot = span;
        self.len += 1;
        true
    }

    /// Keeps a `content-length` field.
    pub(crate) fn push_length(&mut self, span: Span) -> bool {
        let at = self.len;
        if !self.push(span) {
            return false;
        }
        self.lengths |= 1 << at;
        true
    }

    /// Notes the length the `content-length` fields declare together.
    pub(crate) fn declare(&mut self, length: Option<u64>) {
        self.length = length;
    }

    /// Keeps a `date` field.
    pub(crate) fn push_date(&mut self, span: Span) -> bool {
        self.dated = true;
        self.push(span)
    }

    /// The `content-length` they declare.
    pub(crate) fn length(&self) -> Option<u64> {
        self.length
    }

    /// Whether one is `date`.
    pub(crate) fn has_date(&self) -> bool {
        self.dated
    }

    fn spans(&self) -> &[Span] {
        &self.spans[..usize::from(self.len)]
    }

    fn name(&self, span: &Span) -> &[u8] {
        &self.head[span[0] as usize..span[1] as usize]
    }

    /// Sets field `name` to `value` in place of those received of that
    /// name; `value` back when there is no room (a map takes it then).
    fn set(&mut self, name: &'static HeaderName, value: OwnValue) -> Result<(), OwnValue> {
        for slot in &mut self.set {
            match slot {
                Some((held, _)) if *held != name => {}
                _ => {
                    *slot = Some((name, value));
                    return Ok(());
                }
            }
        }
        Err(value)
    }

    /// Whether the gateway set a field named `name` (any case).
    fn is_set(&self, name: &[u8]) -> bool {
        self.set.iter().flatten().any(|(held, _)| same(held, name))
    }

    /// Writes each field `map` does not replace as `name: value` lines:
    /// those received as they came, but `content-length` (the writer
    /// frames the body), then those the gateway set here.
    pub(crate) fn write(&self, out: &mut Vec<u8>, map: &HeaderMap) {
        for (i, span) in self.spans().iter().enumerate() {
            if self.lengths & 1 << i != 0 {
                continue;
            }
            let name = self.name(span);
            if self.is_set(name) || !map.is_empty() && replaced(map, name) {
                continue;
            }
            // From the name to the value's end: `name:`, the whitespace
            // after it (httparse allows nothing else there), the value.
            out.extend_from_slice(&self.head[span[0] as usize..span[3] as usize]);
            out.extend_from_slice(b"\r\n");
        }
        for (name, value) in self.set.iter().flatten() {
            if map.is_empty() || !map.contains_key(*name) {
                field(out, name, value.as_bytes());
            }
        }
    }

    /// The fields that `map` does not replace, added to it.
    fn add_to(&self, map: &mut HeaderMap) {
        for (name, value) in self.set.iter().flatten() {
            if !map.contains_key(*name) {
                map.insert(*name, value.to_header());
            }
        }
        let replacing: Vec<HeaderName> = map.keys().cloned().collect();
        for span in self.spans() {
            let (n0, n1, v0, v1) = (
                span[0] as usize,
                span[1] as usize,
                span[2] as usize,
                span[3] as usize,
            );
            // httparse read them: the map takes every one.
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(&self.head[n0..n1]),
                HeaderValue::from_maybe_shared(self.head.slice(v0..v1)),
            ) else {
                continue;
            };
            if !replacing.contains(&name) {
                map.append(name, value);
            }
        }
    }
}

/// Whether `map` has a field named `name` (any case).
fn replaced(map: &HeaderMap, name: &[u8]) -> bool {
    map.keys().any(|key| same(key, name))
}

/// Whether `name` is `key` in any case.
fn same(key: &HeaderName, name: &[u8]) -> bool {
    let key = key.as_str().as_bytes();
    key.len() == name.len() && key.eq_ignore_ascii_case(name)
}

/// Sets field `name` of `response` to `value`, replacing any of that
/// name: beside its received fields when it has them (no map made for
/// it), else in its map.
pub fn set(response: &mut Response<ProxyBody>, name: &'static HeaderName, value: OwnValue) {
    let value = match response.body_mut().received_mut() {
        Some(received) => match received.set(name, value) {
            Ok(()) => return,
            Err(value) => value,
        },
        None => value,
    };
    response.headers_mut().insert(name, value.to_header());
}

impl fmt::Debug for Received {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.spans().iter().map(|span| {
                String::from_utf8_lossy(&self.head[span[0] as usize..span[3] as usize])
            }))
            .finish()
    }
}

/// A client's HTTP/1 request fields as its head has them, the request's
/// header map left empty: what [`Received`] is to an answer. Whatever
/// reads the request's fields beyond the few the gateway itself looks at
/// (`Host`, `X-Correlation-Id`, `Content-Type`, `Idempotency-Key`, the
/// API key's `X-API-Key` or `Authorization`, its own) first moves them
/// into the map ([`into_map`], [`ClientRequest::map`]), and reads the map. A head with what only a map handles (a body's transfer
/// coding, an upgrade, fields a `Connection` names, a name with `_`,
/// more fields than kept) is read into a map as it is parsed.
#[derive(Clone)]
pub struct Arrived {
    head: Bytes,
    /// Where each field lies (the head is at most 64 KiB).
    spans: [[u16; 4]; MAX_FIELDS],
    len: u8,
    /// The first `host` field, if any (by index), and how many there are.
    host: Option<u8>,
    hosts: u8,
    /// The first `x-correlation-id` field, if any.
    correlation_id: Option<u8>,
    /// Whether some name begins with `x` or `t`, as each of the
    /// gateway's own fields does.
    x_or_t: bool,
    /// Hop-by-hop fields: in the map until the gateway strips them.
    hop: u32,
    /// `content-length`: in the map, never written (the body's framing is).
    framing: u32,
    /// Fields not passed on: stripped hop-by-hop ones, the client's copies
    /// of the gateway's own.
    dropped: u32,
    /// The length its `content-length` declares.
    length: Option<u64>,
}

/// What a field kept as it came is to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kept {
    Host,
    CorrelationId,
    /// Hop-by-hop: stripped before the request goes on.
    HopByHop,
    /// `content-length`: the body's framing is written instead.
    Length,
    /// Any other, by its name's first byte.
    Other(u8),
}

/// A client's request and, for one read as it came, its fields (see
/// [`Arrived`]). Boxed whole: it is moved through several layers.
#[derive(Debug)]
pub struct ClientRequest {
    /// The request; its header map is empty when `fields` has them.
    pub request: Request<ClientBody>,
    /// Its fields as they came.
    pub fields: Option<Arrived>,
}

impl ClientRequest {
    /// `request`, its fields in its map.
    pub fn mapped(request: Request<ClientBody>) -> Box<Self> {
        Box::new(ClientRequest {
            request,
            fields: None,
        })
    }

    /// The first value of its field `name` (a lowercase name), wherever
    /// it is.
    pub fn field(&self, name: &HeaderName) -> Option<&[u8]> {
        match &self.fields {
            Some(fields) => fields.get(name),
            None => first(self.request.headers(), name).map(HeaderValue::as_bytes),
        }
    }

    /// Its first `X-Correlation-Id`, wherever it is.
    pub fn correlation_id(&self) -> Option<HeaderValue> {
        match &self.fields {
            Some(fields) => fields.correlation_id(),
            None => first(self.request.headers(), &CORRELATION_ID).cloned(),
        }
    }

    /// Its fields all in its map.
    pub fn map(&mut self) -> &mut HeaderMap {
        into_map(&mut self.fields, self.request.headers_mut());
        self.request.headers_mut()
    }
}

/// Moves `fields`, if any, into `map`.
pub fn into_map(fields: &mut Option<Arrived>, map: &mut HeaderMap) {
    if let Some(fields) = fields.take() {
        fields.add_to(map);
    }
}

impl Arrived {
    /// The longest head whose fields are kept as they came.
    pub(crate) const MAX_HEAD: usize = u16::MAX as usize;

    /// None yet. The head they lie in comes once they have been read
    /// from it ([`Arrived::lie_in`]), as for [`Received::new`].
    pub(crate) fn new() -> Self {
        Arrived {
            head: Bytes::new(),
            spans: [[0; 4]; MAX_FIELDS],
            len: 0,
            host: None,
            hosts: 0,
            correlation_id: None,
            x_or_t: false,
            hop: 0,
            framing: 0,
            dropped: 0,
            length: None,
        }
    }

    /// The head the fields kept lie in (at most [`Arrived::MAX_HEAD`] bytes).
    pub(crate) fn lie_in(&mut self, head: Bytes) {
        debug_assert!(head.len() <= Self::MAX_HEAD);
        self.head = head;
    }

    /// Keeps the field at `span`, which is `what`; false when there is
    /// no room.
    pub(crate) fn push(&mut self, span: Span, what: Kept) -> bool {
        let at = self.len;
        let Some(slot) = self.spans.get_mut(usize::from(at)) else {
            return false;
        };
        // (Within the head: below 64 KiB.)
        *slot = span.map(|offset| offset as u16);
        self.len += 1;
        let bit = 1 << at;
        match what {
            Kept::Host => {
                self.host = self.host.or(Some(at));
                self.hosts = self.hosts.saturating_add(1);
            }
            Kept::CorrelationId => {
                self.correlation_id = self.correlation_id.or(Some(at));
                self.x_or_t = true;
            }
            Kept::HopByHop => self.hop |= bit,
            Kept::Length => self.framing |= bit,
            Kept::Other(initial) => self.x_or_t |= matches!(initial | 0x20, b'x' | b't'),
        }
        true
    }

    /// Notes the length its `content-length` declares.
    pub(crate) fn declare(&mut self, length: Option<u64>) {
        self.length = length;
    }

    /// The length its `content-length` declares.
    pub fn length(&self) -> Option<u64> {
        self.length
    }

    /// Its first `Host`'s value, and whether it has more than one.
    pub fn host(&self) -> (Option<&[u8]>, bool) {
        (
            self.host.map(|i| self.value_bytes(usize::from(i))),
            self.hosts > 1,
        )
    }

    /// Its first `X-Correlation-Id`, as a value sharing the head.
    pub fn correlation_id(&self) -> Option<HeaderValue> {
        self.correlation_id.map(|i| self.value(usize::from(i)))
    }

    /// Whether some of its fields may be the gateway's own (each of
    /// whose names begins with `x` or `t`).
    pub fn may_have_own(&self) -> bool {
        self.x_or_t
    }

    /// The bytes of the head they came in: at least what they take written.
    pub fn size(&self) -> usize {
        self.head.len()
    }

    /// Each field not dropped: its index, name and value.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &[u8], &[u8])> {
        self.spans[..usize::from(self.len)]
            .iter()
            .enumerate()
            .filter(|(i, _)| self.dropped & 1 << i == 0)
            .map(|(i, span)| {
                let [n0, n1, v0, v1] = span.map(usize::from);
                (i, &self.head[n0..n1], &self.head[v0..v1])
            })
    }

    /// Where the value of field `i` lies in the head.
    fn value_range(&self, i: usize) -> std::ops::Range<usize> {
        let [_, _, v0, v1] = self.spans[i].map(usize::from);
        v0..v1
    }

    /// The value of field `i`.
    fn value_bytes(&self, i: usize) -> &[u8] {
        &self.head[self.value_range(i)]
    }

    /// The first value of its field `name` (a lowercase name).
    pub fn get(&self, name: &HeaderName) -> Option<&[u8]> {
        self.iter()
            .find(|(_, n, _)| same(name, n))
            .map(|(_, _, value)| value)
    }

    /// The value of field `i` as a header value, sharing the head.
    pub fn value(&self, i: usize) -> HeaderValue {
        HeaderValue::from_maybe_shared(self.head.slice(self.value_range(i)))
            .expect("httparse read it: visible text")
    }

    /// The fields of the bits of `which` (by index) are not passed on.
    pub fn drop_fields(&mut self, which: u32) {
        self.dropped |= which;
    }

    /// Its fields named `name` (a lowercase name) are not passed on.
    pub fn drop_named(&mut self, name: &str) {
        let named = self
            .iter()
            .filter(|(_, n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .fold(0, |named, (i, _, _)| named | 1 << i);
        self.dropped |= named;
    }

    /// Its hop-by-hop fields are not passed on.
    pub fn strip_hop_by_hop(&mut self) {
        self.dropped |= self.hop;
        self.hop = 0;
    }

    /// Writes the fields passed on as they are, as `name: value` lines:
    /// neither hop-by-hop ones nor `content-length` (the body's framing
    /// is written), nor those dropped.
    pub fn write(&self, out: &mut Vec<u8>) {
        let skipped = self.hop | self.framing | self.dropped;
        for (i, span) in self.spans[..usize::from(self.len)].iter().enumerate() {
            if skipped & 1 << i == 0 {
                // `name:`, the whitespace httparse allows after it, the value.
                out.extend_from_slice(&self.head[usize::from(span[0])..usize::from(span[3])]);
                out.extend_from_slice(b"\r\n");
            }
        }
    }

    /// Adds the fields not dropped to `map` (after those it has).
    #[inline(never)] // out of the request path's lines: few requests need a map
    pub fn add_to(self, map: &mut HeaderMap) {
        map.reserve(usize::from(self.len));
        for (i, name, _) in self.iter() {
            let name = HeaderName::from_bytes(name).expect("httparse read it: a token");
            map.append(name, self.value(i));
        }
    }
}

impl fmt::Debug for Arrived {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|(_, name, value)| {
                format!(
                    "{}: {}",
                    String::from_utf8_lossy(name),
                    String::from_utf8_lossy(value)
                )
            }))
            .finish()
    }
}

/// A body that may carry its answer's fields as received.
pub trait Carrier {
    /// Takes them out.
    fn take_received(&mut self) -> Option<Box<Received>>;
}

/// Moves the received fields `response` carries into its header map.
pub fn materialize<B: Carrier>(response: &mut Response<B>) {
    if let Some(received) = response.body_mut().take_received() {
        received.add_to(response.headers_mut());
    }
}

/// `response`, its received fields in its header map.
pub fn materialized<B: Carrier>(mut response: Response<B>) -> Response<B> {
    materialize(&mut response);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::codec::note_spans;

    /// The fields of `text` (field lines), all kept; `content-length`
    /// ones as such.
    fn received(text: &str) -> Received {
        let head = format!("HTTP/1.1 200 OK\r\n{text}\r\n");
        let mut fields = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut fields);
        response.parse(head.as_bytes()).expect("a head");
        let mut spans = Vec::new();
        note_spans(head.as_ptr(), response.headers, &mut spans);
        let head = Bytes::from(head);
        let mut received = Received::new();
        received.lie_in(head.clone());
        for span in spans {
            let name = &head[span[0] as usize..span[1] as usize];
            if name.eq_ignore_ascii_case(b"content-length") {
                received.push_length(span);
            } else {
                received.push(span);
            }
        }
        received
    }

    /// An empty body carrying `received`.
    fn carrying(received: Received) -> ProxyBody {
        ProxyBody::default().with_received(Some(Box::new(received)))
    }

    #[test]
    fn fields_are_written_as_received_but_those_the_map_replaces() {
        let received = received(
            "Server: up\r\nX-Correlation-Id: theirs\r\ncontent-length: 5\r\nvary: a\r\nVary: b\r\n",
        );
        let mut out = Vec::new();
        received.write(&mut out, &HeaderMap::new());
        assert_eq!(
            out,
            b"Server: up\r\nX-Correlation-Id: theirs\r\nvary: a\r\nVary: b\r\n"
        );

        let mut map = HeaderMap::new();
        map.insert("x-correlation-id", HeaderValue::from_static("ours"));
        map.insert("vary", HeaderValue::from_static("c"));
        out.clear();
        received.write(&mut out, &map);
        assert_eq!(out, b"Server: up\r\n");
    }

    #[test]
    fn fields_the_gateway_sets_replace_received_ones_without_a_map() {
        static REQUEST_ID: HeaderName = HeaderName::from_static("x-correlation-id");
        let mut response = Response::new(carrying(received(
            "X-Correlation-Id: theirs\r\nserver: up\r\n",
        )));
        set(
            &mut response,
            &REQUEST_ID,
            OwnValue::Header(HeaderValue::from_static("ours")),
        );
        assert!(response.headers().is_empty());
        let mut out = Vec::new();
        let received = response.body().received().expect("kept");
        received.write(&mut out, response.headers());
        assert_eq!(out, b"server: up\r\nx-correlation-id: ours\r\n");
        let response = materialized(response);
        assert_eq!(response.headers()["x-correlation-id"], "ours");
        assert_eq!(response.headers().len(), 2);
        // Without received fields, the map takes it.
        let mut plain = Response::new(ProxyBody::default());
        set(&mut plain, &REQUEST_ID, OwnValue::Hex([b'a'; 32]));
        assert_eq!(plain.headers()["x-correlation-id"], "a".repeat(32));
    }

    #[test]
    fn materializing_moves_what_the_map_does_not_replace_into_it() {
        let mut response = Response::new(carrying(received(
            "Vary: a\r\ncontent-length: 5\r\nx-correlation-id: theirs\r\nvary: b\r\n",
        )));
        response
            .headers_mut()
            .insert("x-correlation-id", HeaderValue::from_static("ours"));
        let response = materialized(response);
        assert!(response.body().received().is_none());
        let headers = response.headers();
        assert_eq!(headers.len(), 4);
        assert_eq!(
            headers.get_all("vary").iter().collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(headers["content-length"], "5");
        assert_eq!(headers["x-correlation-id"], "ours");
        // Nothing twice.
        assert_eq!(materialized(response).headers().len(), 4);
    }
}
