//! One append as one JetStream message.
//!
//! Headers (readable with the `nats` CLI): `Nats-Msg-Id` (the first
//! event's id), `Tidegate-Position` (the first event's position),
//! `Tidegate-Count`, and with a key `Tidegate-Version` (the first event's
//! version; the others follow by one).
//!
//! Payload: a 4-byte big-endian length, that many bytes of JSON with each
//! event's attributes and the length of its data
//! (`{"key":…,"events":[{"id","source","type","time","datacontenttype","extensions","len"}]}`),
//! then the events' data, one after the other. Data stays bytes, never
//! base64.

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{json, Value};
use tidegate_events::{Event, NewEvent};

/// `Tidegate-Position`.
pub const POSITION: &str = "Tidegate-Position";
/// `Tidegate-Count`.
pub const COUNT: &str = "Tidegate-Count";
/// `Tidegate-Version`.
pub const VERSION: &str = "Tidegate-Version";

/// The payload of an append of `events` (to `key`), each at `time` if it
/// brings none.
pub fn encode(key: Option<&str>, events: &[NewEvent], time: &str) -> Bytes {
    let attributes: Vec<Value> = events
        .iter()
        .map(|e| {
            let mut a = json!({
                "id": e.id,
                "source": e.source,
                "type": e.ty,
                "time": e.time.as_deref().unwrap_or(time),
                "len": e.data.len(),
            });
            if let Some(ty) = &e.datacontenttype {
                a["datacontenttype"] = ty.clone().into();
            }
            if !e.extensions.is_empty() {
                a["extensions"] = json!(e.extensions);
            }
            a
        })
        .collect();
    let head = serde_json::to_vec(&json!({ "key": key, "events": attributes }))
        .expect("JSON of strings and numbers");
    let data: usize = events.iter().map(|e| e.data.len()).sum();
    let mut out = BytesMut::with_capacity(4 + head.len() + data);
    out.put_u32(u32::try_from(head.len()).unwrap_or(u32::MAX));
    out.put_slice(&head);
    for e in events {
        out.put_slice(&e.data);
    }
    out.freeze()
}

/// Where an append's events are: the topic, the first position, the
/// first version (with a key).
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    /// The topic.
    pub topic: &'a str,
    /// The first event's position.
    pub position: u64,
    /// The first event's version, if the append has a key.
    pub version: Option<u64>,
}

/// The events of an append's payload, at `place`; an error says what is
/// wrong with a payload this crate did not write.
pub fn decode(payload: &[u8], place: Place<'_>) -> Result<Vec<Event>, String> {
    let bad = |why: &str| format!("not a tidegate append ({why})");
    let len = payload
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| bad("too short"))?;
    let head: Value = payload
        .get(4..4 + len)
        .and_then(|h| serde_json::from_slice(h).ok())
        .ok_or_else(|| bad("no JSON head"))?;
    let key = head["key"].as_str().map(str::to_owned);
    let mut data = &payload[4 + len..];
    let mut events = Vec::new();
    for (i, a) in head["events"]
        .as_array()
        .ok_or_else(|| bad("no events"))?
        .iter()
        .enumerate()
    {
        let size = a["len"].as_u64().ok_or_else(|| bad("no length"))? as usize;
        if data.len() < size {
            return Err(bad("data cut short"));
        }
        let (own, rest) = data.split_at(size);
        data = rest;
        let text = |name: &str| a[name].as_str().map(str::to_owned);
        let extensions: BTreeMap<String, String> = a["extensions"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        events.push(Event {
            topic: place.topic.to_owned(),
            position: place.position + i as u64,
            key: key.clone(),
            version: place.version.map(|v| v + i as u64),
            id: text("id").ok_or_else(|| bad("no id"))?,
            source: text("source").unwrap_or_default(),
            ty: text("type").unwrap_or_default(),
            time: text("time").unwrap_or_default(),
            datacontenttype: text("datacontenttype"),
            data: own.to_vec(),
            extensions,
        });
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_append_round_trips_through_its_payload() {
        let mut first = NewEvent::new("a", "/s", "T", b"{\"x\":1}".to_vec());
        first.datacontenttype = Some("application/json".into());
        first
            .extensions
            .insert("traceparent".into(), "00-ab".into());
        let mut second = NewEvent::new("b", "/s", "U", vec![0, 1, 2]);
        second.time = Some("2026-12-05T10:00:00Z".into());
        let payload = encode(Some("k.1"), &[first, second], "2026-12-05T09:00:00Z");
        let place = Place {
            topic: "t",
            position: 7,
            version: Some(3),
        };
        let events = decode(&payload, place).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!((events[0].position, events[0].version), (7, Some(3)));
        assert_eq!((events[1].position, events[1].version), (8, Some(4)));
        assert_eq!(events[0].data, b"{\"x\":1}");
        assert_eq!(events[0].time, "2026-12-05T09:00:00Z");
        assert_eq!(events[0].extensions["traceparent"], "00-ab");
        assert_eq!(events[1].data, [0, 1, 2]);
        assert_eq!(events[1].time, "2026-12-05T10:00:00Z");
        assert_eq!(events[1].key.as_deref(), Some("k.1"));
        assert!(decode(b"xx", place).is_err());
    }
}
