//! CloudEvents 1.0 over HTTP, both ways: a publish request (structured
//! mode, binary mode, a batch, or plain JSON with `ce-type`) into the
//! events to append, and a stored event into its JSON (structured) form
//! or its binary-mode headers and body.

use std::collections::BTreeMap;

use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value};
use tidegate_events::{Event, ExpectedVersion, NewEvent};

/// `Content-Type` of one event in structured mode.
pub const STRUCTURED: &str = "application/cloudevents+json";
/// `Content-Type` of a batch.
pub const BATCH: &str = "application/cloudevents-batch+json";

/// The stream key of a publish, as a header.
pub const KEY_HEADER: &str = "tidegate-key";
/// The expected version of a publish, as a header.
pub const EXPECTED_HEADER: &str = "tidegate-expected-version";
/// The stream key as a CloudEvents extension (the Partitioning extension).
const KEY_ATTRIBUTE: &str = "partitionkey";
/// The expected version as an extension.
const EXPECTED_ATTRIBUTE: &str = "expectedversion";
/// The publisher's correlation id, carried by its events.
pub const CORRELATION_ATTRIBUTE: &str = "correlationid";
/// The publisher's trace context (the Distributed Tracing extension).
pub const TRACEPARENT_ATTRIBUTE: &str = "traceparent";

/// Longest key, id, source or type accepted.
const MAX_ATTRIBUTE: usize = 1024;

/// Events to append, from one publish request.
#[derive(Debug, PartialEq)]
pub struct Publish {
    /// The stream key (one for the whole batch).
    pub key: Option<String>,
    /// The version the publisher expects the key's stream at.
    pub expected: ExpectedVersion,
    /// The events, in order.
    pub events: Vec<NewEvent>,
    /// Whether the request was a batch (answered as one).
    pub batch: bool,
}

/// Reads a publish request: its headers and body. An error says what is
/// wrong, for a 400.
pub fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Publish, String> {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned());
    let media = content_type.as_deref().map(|v| {
        v.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    });
    let (mut events, batch) = match media.as_deref() {
        Some(STRUCTURED) => (vec![structured(parse_json(body)?)?], false),
        Some(BATCH) => {
            let Value::Array(items) = parse_json(body)? else {
                return Err("a batch must be a JSON array of events".into());
            };
            if items.is_empty() {
                return Err("the batch has no event".into());
            }
            let events = items
                .into_iter()
                .enumerate()
                .map(|(i, item)| structured(item).map_err(|e| format!("event {i}: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            (events, true)
        }
        _ => (vec![binary(headers, content_type, body)?], false),
    };
    // The key and expected version: headers, or the events' extensions
    // (the same in every event of a batch).
    let key = agreed(headers, KEY_HEADER, &mut events, KEY_ATTRIBUTE)?;
    if key
        .as_deref()
        .is_some_and(|k| k.is_empty() || k.len() > MAX_ATTRIBUTE)
    {
        return Err(format!("the key must be 1 to {MAX_ATTRIBUTE} bytes"));
    }
    let expected = match agreed(headers, EXPECTED_HEADER, &mut events, EXPECTED_ATTRIBUTE)? {
        Some(text) => parse_expected(&text)?,
        None => ExpectedVersion::Any,
    };
    if key.is_none() && expected != ExpectedVersion::Any {
        return Err("an expected version needs a key (tidegate-key or partitionkey)".into());
    }
    Ok(Publish {
        key,
        expected,
        events,
        batch,
    })
}

/// `any`, `no_stream`, `exists` or a version number.
pub fn parse_expected(text: &str) -> Result<ExpectedVersion, String> {
    Ok(match text.trim() {
        "any" => ExpectedVersion::Any,
        "no_stream" => ExpectedVersion::NoStream,
        "exists" => ExpectedVersion::Exists,
        n => ExpectedVersion::Exactly(n.parse().map_err(|_| {
            format!("expected version `{n}` is not any, no_stream, exists or a number")
        })?),
    })
}

/// The value of `header`, or of extension `attribute` (taken out of every
/// event): one value, or an error if they differ.
fn agreed(
    headers: &HeaderMap,
    header: &str,
    events: &mut [NewEvent],
    attribute: &str,
) -> Result<Option<String>, String> {
    let mut value = match headers.get(header) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| format!("{header} must be visible ASCII"))?
                .to_owned(),
        ),
        None => None,
    };
    for (i, event) in events.iter_mut().enumerate() {
        if let Some(own) = event.extensions.remove(attribute) {
            match &value {
                Some(v) if *v != own => {
                    return Err(format!(
                        "event {i}'s {attribute} `{own}` differs from `{v}` (one key and expected version a publish)"
                    ))
                }
                Some(_) => {}
                None => value = Some(own),
            }
        }
    }
    Ok(value)
}

fn parse_json(body: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))
}

/// One event in structured mode.
fn structured(value: Value) -> Result<NewEvent, String> {
    let Value::Object(mut attributes) = value else {
        return Err("an event must be a JSON object".into());
    };
    match attributes.remove("specversion") {
        Some(Value::String(v)) if v == "1.0" => {}
        Some(other) => return Err(format!("specversion must be \"1.0\", not {other}")),
        None => return Err("specversion is missing".into()),
    }
    let mut required = |name: &str| match attributes.remove(name) {
        Some(Value::String(v)) if !v.is_empty() && v.len() <= MAX_ATTRIBUTE => Ok(v),
        Some(Value::String(_)) => Err(format!("{name} must be 1 to {MAX_ATTRIBUTE} bytes")),
        Some(_) => Err(format!("{name} must be a string")),
        None => Err(format!("{name} is missing")),
    };
    let id = required("id")?;
    let source = required("source")?;
    let ty = required("type")?;
    let time = optional_string(&mut attributes, "time")?;
    if let Some(time) = &time {
        check_time(time)?;
    }
    let datacontenttype = optional_string(&mut attributes, "datacontenttype")?;
    let data = attributes.remove("data");
    let data_base64 = attributes.remove("data_base64");
    let (data, datacontenttype) = match (data, data_base64, datacontenttype) {
        (Some(_), Some(_), _) => return Err("an event has data or data_base64, not both".into()),
        (None, Some(Value::String(text)), ty) => (
            base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map_err(|e| format!("data_base64 is not base64: {e}"))?,
            ty,
        ),
        (None, Some(_), _) => return Err("data_base64 must be a string".into()),
        // Text data of a type that is not JSON is the text itself.
        (Some(Value::String(text)), None, Some(ty)) if !is_json(&ty) => {
            (text.into_bytes(), Some(ty))
        }
        (Some(value), None, ty) => (
            serde_json::to_vec(&value).expect("a JSON value serializes"),
            Some(ty.unwrap_or_else(|| "application/json".to_owned())),
        ),
        (None, None, ty) => (Vec::new(), ty),
    };
    let mut extensions = BTreeMap::new();
    for (name, value) in attributes {
        check_extension_name(&name)?;
        let value = match value {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => {
                return Err(format!(
                    "extension {name} must be a string, number or boolean"
                ))
            }
        };
        extensions.insert(name, value);
    }
    Ok(NewEvent {
        id,
        source,
        ty,
        time,
        datacontenttype,
        data,
        extensions,
    })
}

fn optional_string(
    attributes: &mut Map<String, Value>,
    name: &str,
) -> Result<Option<String>, String> {
    match attributes.remove(name) {
        Some(Value::String(v)) => Ok(Some(v)),
        Some(Value::Null) | None => Ok(None),
        Some(_) => Err(format!("{name} must be a string")),
    }
}

/// One event in binary mode: `ce-*` headers, the body as its data. `ce-type`
/// is required; an id is made and the source defaults to `tidegate` when
/// the publisher sends plain JSON with only a type.
fn binary(
    headers: &HeaderMap,
    content_type: Option<String>,
    body: &[u8],
) -> Result<NewEvent, String> {
    let mut attributes = BTreeMap::new();
    for (name, value) in headers {
        let Some(attribute) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        let value = value
            .to_str()
            .map_err(|_| format!("{name} must be visible ASCII (percent-encode the rest)"))?;
        let value = percent_decode(value)
            .ok_or_else(|| format!("{name} is not valid percent-encoded UTF-8"))?;
        if attributes.insert(attribute.to_owned(), value).is_some() {
            return Err(format!("{name} is given twice"));
        }
    }
    let Some(ty) = attributes.remove("type") else {
        return Err(format!(
            "send an event as {STRUCTURED}, as a {BATCH}, or with ce-type (binary mode)"
        ));
    };
    match attributes.remove("specversion").as_deref() {
        Some("1.0") | None => {}
        Some(other) => return Err(format!("ce-specversion must be 1.0, not {other}")),
    }
    let id = attributes.remove("id").unwrap_or_else(new_id);
    let source = attributes
        .remove("source")
        .unwrap_or_else(|| "tidegate".to_owned());
    for (name, value) in [("id", &id), ("source", &source), ("type", &ty)] {
        if value.is_empty() || value.len() > MAX_ATTRIBUTE {
            return Err(format!("ce-{name} must be 1 to {MAX_ATTRIBUTE} bytes"));
        }
    }
    let time = attributes.remove("time");
    if let Some(time) = &time {
        check_time(time)?;
    }
    if attributes.remove("datacontenttype").is_some() {
        return Err(
            "in binary mode the data's type is Content-Type, not ce-datacontenttype".into(),
        );
    }
    for name in attributes.keys() {
        check_extension_name(name)?;
    }
    Ok(NewEvent {
        id,
        source,
        ty,
        time,
        datacontenttype: content_type,
        data: body.to_vec(),
        extensions: attributes,
    })
}

/// CloudEvents attribute names: lower-case letters and digits, at most 20.
fn check_extension_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "attribute `{name}` is not a CloudEvents attribute name (1 to 20 lower-case letters and digits)"
        ))
    }
}

/// An RFC 3339 timestamp, checked for its shape: `2024-05-01T10:00:00Z`,
/// with optional fraction and an offset.
fn check_time(time: &str) -> Result<(), String> {
    let b = time.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        b.get(range)
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
    };
    let mut ok = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && matches!(b[10], b'T' | b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if ok {
        let mut rest = &b[19..];
        if let Some(fraction) = rest.strip_prefix(b".") {
            let n = fraction.iter().take_while(|d| d.is_ascii_digit()).count();
            ok = n > 0;
            rest = &fraction[n..];
        }
        ok = ok
            && match rest {
                [b'Z' | b'z'] => true,
                [b'+' | b'-', h1, h2, b':', m1, m2] => {
                    [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit())
                }
                _ => false,
            };
    }
    if ok {
        Ok(())
    } else {
        Err(format!("time `{time}` is not an RFC 3339 timestamp"))
    }
}

/// Whether a `datacontenttype` is JSON (`application/json`, `…+json`).
fn is_json(content_type: &str) -> bool {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    media == "application/json" || media.ends_with("+json")
}

/// Whether data of `content_type` is text.
fn is_text(content_type: &str) -> bool {
    let lower = content_type.to_ascii_lowercase();
    lower.starts_with("text/") || lower.contains("charset=")
}

/// `%XX` decoded, as UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    if !text.contains('%') {
        return Some(text.to_owned());
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `text` with what a header value cannot hold percent-encoded (the
/// CloudEvents HTTP binding's rule: space to `~` except `"` and `%`).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if (b' '..=b'~').contains(&b) && b != b'"' && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A new event id: 128 random bits as hex.
pub fn new_id() -> String {
    format!(
        "{:016x}{:016x}",
        tidegate_resilience::rng::next_u64(),
        tidegate_resilience::rng::next_u64()
    )
}

/// A stored event as JSON: its CloudEvents attributes (data inline as
/// JSON or text when it is, else `data_base64`), its extensions, and
/// `topic`, `position`, `key` and `version`.
pub fn to_json(event: &Event) -> Value {
    let mut out = Map::new();
    out.insert("specversion".into(), "1.0".into());
    out.insert("id".into(), event.id.clone().into());
    out.insert("source".into(), event.source.clone().into());
    out.insert("type".into(), event.ty.clone().into());
    out.insert("time".into(), event.time.clone().into());
    for (name, value) in &event.extensions {
        out.insert(name.clone(), value.clone().into());
    }
    if let Some(ty) = &event.datacontenttype {
        out.insert("datacontenttype".into(), ty.clone().into());
    }
    let ty = event
        .datacontenttype
        .as_deref()
        .unwrap_or("application/json");
    let inline = if is_json(ty) {
        serde_json::from_slice::<Value>(&event.data).ok()
    } else if is_text(ty) {
        std::str::from_utf8(&event.data).ok().map(Value::from)
    } else {
        None
    };
    match inline {
        Some(data) => {
            out.insert("data".into(), data);
        }
        None if event.data.is_empty() => {}
        None => {
            out.insert(
                "data_base64".into(),
                base64::engine::general_purpose::STANDARD
                    .encode(&event.data)
                    .into(),
            );
        }
    }
    out.insert("topic".into(), event.topic.clone().into());
    out.insert("position".into(), event.position.into());
    if let Some(key) = &event.key {
        out.insert("key".into(), key.clone().into());
    }
    if let Some(version) = event.version {
        out.insert("version".into(), version.into());
    }
    Value::Object(out)
}

/// A stored event in binary mode: the `ce-*` headers (with `ce-topic`,
/// `ce-position`, `ce-partitionkey` and `ce-version`) and, for the body,
/// its data with its `Content-Type`.
pub fn binary_headers(event: &Event) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut put = |name: &str, value: &str| {
        let name = HeaderName::from_bytes(format!("ce-{name}").as_bytes());
        let value = HeaderValue::from_str(&percent_encode(value));
        if let (Ok(name), Ok(value)) = (name, value) {
            headers.insert(name, value);
        }
    };
    put("specversion", "1.0");
    put("id", &event.id);
    put("source", &event.source);
    put("type", &event.ty);
    put("time", &event.time);
    for (name, value) in &event.extensions {
        put(name, value);
    }
    put("topic", &event.topic);
    put("position", &event.position.to_string());
    if let Some(key) = &event.key {
        put(KEY_ATTRIBUTE, key);
    }
    if let Some(version) = event.version {
        put("version", &version.to_string());
    }
    if let Some(ty) = event
        .datacontenttype
        .as_deref()
        .and_then(|t| HeaderValue::from_str(t).ok())
    {
        headers.insert(http::header::CONTENT_TYPE, ty);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn structured_events_keep_their_attributes_and_json_data() {
        let body = br#"{"specversion":"1.0","id":"e1","source":"/web","type":"Uploaded",
            "time":"2026-12-05T10:00:00.5Z","subject":"x","partitionkey":"c-1","expectedversion":0,
            "data":{"size":3}}"#;
        let publish = parse(&headers(&[("content-type", STRUCTURED)]), body).unwrap();
        assert_eq!(publish.key.as_deref(), Some("c-1"));
        assert_eq!(publish.expected, ExpectedVersion::Exactly(0));
        let event = &publish.events[0];
        assert_eq!((event.id.as_str(), event.ty.as_str()), ("e1", "Uploaded"));
        assert_eq!(event.data, br#"{"size":3}"#);
        assert_eq!(event.datacontenttype.as_deref(), Some("application/json"));
        assert_eq!(
            event.extensions.get("subject").map(String::as_str),
            Some("x")
        );
        assert!(!event.extensions.contains_key("partitionkey"));
    }

    #[test]
    fn binary_mode_and_plain_json_with_a_type() {
        let publish = parse(
            &headers(&[
                ("content-type", "application/json"),
                ("ce-type", "Uploaded"),
                ("ce-id", "e2"),
                ("ce-source", "/web"),
                ("ce-comment", "caf%C3%A9"),
                ("tidegate-key", "c-2"),
                ("tidegate-expected-version", "no_stream"),
            ]),
            br#"{"a":1}"#,
        )
        .unwrap();
        assert_eq!(publish.expected, ExpectedVersion::NoStream);
        let event = &publish.events[0];
        assert_eq!(
            event.extensions.get("comment").map(String::as_str),
            Some("café")
        );
        assert_eq!(event.datacontenttype.as_deref(), Some("application/json"));
        // Only a type: an id is made, the source is the gateway.
        let plain = parse(
            &headers(&[("content-type", "application/json"), ("ce-type", "T")]),
            b"{}",
        )
        .unwrap();
        assert_eq!(plain.events[0].id.len(), 32);
        assert_eq!(plain.events[0].source, "tidegate");
    }

    #[test]
    fn a_batch_shares_one_key() {
        let body = br#"[{"specversion":"1.0","id":"a","source":"s","type":"T","partitionkey":"k"},
                        {"specversion":"1.0","id":"b","source":"s","type":"T","data_base64":"AAE="}]"#;
        let publish = parse(&headers(&[("content-type", BATCH)]), body).unwrap();
        assert!(publish.batch);
        assert_eq!(publish.key.as_deref(), Some("k"));
        assert_eq!(publish.events[1].data, [0, 1]);
        let clash = br#"[{"specversion":"1.0","id":"a","source":"s","type":"T","partitionkey":"k"},
                         {"specversion":"1.0","id":"b","source":"s","type":"T","partitionkey":"j"}]"#;
        assert!(parse(&headers(&[("content-type", BATCH)]), clash).is_err());
    }

    #[test]
    fn bad_events_say_what_is_wrong() {
        for (content_type, body, says) in [
            (STRUCTURED, &b"{"[..], "not JSON"),
            (STRUCTURED, br#"{"id":"a","source":"s","type":"T"}"#, "specversion is missing"),
            (STRUCTURED, br#"{"specversion":"0.3","id":"a","source":"s","type":"T"}"#, "specversion must be"),
            (STRUCTURED, br#"{"specversion":"1.0","source":"s","type":"T"}"#, "id is missing"),
            (STRUCTURED, br#"{"specversion":"1.0","id":"","source":"s","type":"T"}"#, "id must be 1 to"),
            (STRUCTURED, br#"{"specversion":"1.0","id":"a","source":"s","type":"T","time":"yesterday"}"#, "RFC 3339"),
            (STRUCTURED, br#"{"specversion":"1.0","id":"a","source":"s","type":"T","Bad_Name":"x"}"#, "attribute name"),
            (STRUCTURED, br#"{"specversion":"1.0","id":"a","source":"s","type":"T","data":1,"data_base64":"AA=="}"#, "not both"),
            (STRUCTURED, br#"{"specversion":"1.0","id":"a","source":"s","type":"T","expectedversion":"3"}"#, "needs a key"),
            (BATCH, br#"[]"#, "no event"),
            (BATCH, br#"{}"#, "JSON array"),
            ("application/json", br#"{}"#, "ce-type"),
        ] {
            let err = parse(&headers(&[("content-type", content_type)]), body).unwrap_err();
            assert!(err.contains(says), "{content_type} {}: {err}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn stored_events_render_as_json_and_binary() {
        let mut event = Event {
            topic: "t".into(),
            position: 7,
            key: Some("k".into()),
            version: Some(2),
            id: "e".into(),
            source: "s".into(),
            ty: "T".into(),
            time: "2026-12-05T10:00:00Z".into(),
            datacontenttype: Some("application/json".into()),
            data: br#"{"a":1}"#.to_vec(),
            extensions: BTreeMap::from([("comment".to_owned(), "café \"x\"".to_owned())]),
        };
        let json = to_json(&event);
        assert_eq!(json["data"]["a"], 1);
        assert_eq!(
            (json["position"].as_u64(), json["version"].as_u64()),
            (Some(7), Some(2))
        );
        let headers = binary_headers(&event);
        assert_eq!(headers["ce-comment"], "caf%C3%A9 %22x%22");
        assert_eq!(headers["ce-partitionkey"], "k");
        assert_eq!(headers["content-type"], "application/json");
        event.datacontenttype = Some("application/octet-stream".into());
        event.data = vec![0, 1];
        assert_eq!(to_json(&event)["data_base64"], "AAE=");
    }
}
