//! The event: a CloudEvent (`id`, `source`, `type`, `time`,
//! `datacontenttype`, `data`, extensions) and where the store put it
//! (`position` in its topic; `key` and `version`, when it has a key).

use std::collections::BTreeMap;

/// An event as a publisher hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Unique per source; a second append of an id within the dedup
    /// window is a duplicate, not stored again.
    pub id: String,
    /// Who produced it (a URI reference).
    pub source: String,
    /// What happened (`OrderPlaced`).
    pub ty: String,
    /// When it happened (RFC 3339); the store's clock at append when `None`.
    pub time: Option<String>,
    /// The media type of `data`.
    pub datacontenttype: Option<String>,
    /// The payload.
    pub data: Vec<u8>,
    /// CloudEvents extension attributes.
    pub extensions: BTreeMap<String, String>,
}

impl NewEvent {
    /// An event of type `ty` from `source` with `data`, no time yet (the
    /// store's), no content type and no extension.
    pub fn new(
        id: impl Into<String>,
        source: impl Into<String>,
        ty: impl Into<String>,
        data: Vec<u8>,
    ) -> Self {
        NewEvent {
            id: id.into(),
            source: source.into(),
            ty: ty.into(),
            time: None,
            datacontenttype: None,
            data,
            extensions: BTreeMap::new(),
        }
    }
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its topic.
    pub topic: String,
    /// Its place in the topic: 1, 2, 3… with no gap.
    pub position: u64,
    /// Its key (an aggregate's id), if it has one.
    pub key: Option<String>,
    /// Its place among the key's events: 1, 2, 3…
    pub version: Option<u64>,
    /// The CloudEvents `id`.
    pub id: String,
    /// The CloudEvents `source`.
    pub source: String,
    /// The CloudEvents `type`.
    pub ty: String,
    /// The CloudEvents `time` (RFC 3339).
    pub time: String,
    /// The CloudEvents `datacontenttype`.
    pub datacontenttype: Option<String>,
    /// The payload.
    pub data: Vec<u8>,
    /// Extension attributes.
    pub extensions: BTreeMap<String, String>,
}

/// What an append expects of its key's stream; a mismatch is a conflict
/// and nothing of the append is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpectedVersion {
    /// Whatever the stream holds (the only choice without a key).
    #[default]
    Any,
    /// The key has no event yet.
    NoStream,
    /// The key has at least one event.
    Exists,
    /// The key's last event has exactly this version (0: the key has no
    /// event yet, as with `NoStream`).
    Exactly(u64),
}

impl ExpectedVersion {
    /// Whether a stream whose last version is `actual` (`None`: no event)
    /// meets the expectation.
    pub fn is_met_by(self, actual: Option<u64>) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual.is_none(),
            ExpectedVersion::Exists => actual.is_some(),
            ExpectedVersion::Exactly(version) => actual.unwrap_or(0) == version,
        }
    }
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no_stream"),
            ExpectedVersion::Exists => f.write_str("exists"),
            ExpectedVersion::Exactly(version) => write!(f, "{version}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_against_streams() {
        use ExpectedVersion::*;
        for (expected, none, at_two) in [
            (Any, true, true),
            (NoStream, true, false),
            (Exists, false, true),
            (Exactly(2), false, true),
            (Exactly(1), false, false),
            (Exactly(0), true, false),
        ] {
            assert_eq!(expected.is_met_by(None), none, "{expected}");
            assert_eq!(expected.is_met_by(Some(2)), at_two, "{expected}");
        }
    }
}
