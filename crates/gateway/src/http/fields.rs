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
use http::Response;

use crate::http::body::ProxyBody;
use crate::http::codec::{field, Span};
use crate::http::headers::OwnValue;

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
    /// None yet, of `head`.
    pub(crate) fn new(head: Bytes) -> Self {
        Received {
            head,
            spans: [[0; 4]; MAX_FIELDS],
            len: 0,
            lengths: 0,
            length: None,
            dated: false,
            set: [None, None],
        }
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
        let mut received = Received::new(head.clone());
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
