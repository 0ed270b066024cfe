//! Key paths (`upstreams[0].policy.retry`) and where they are in the file.

use std::fmt;
use std::ops::Range;

use toml_edit::{ImDocument, Item, Table, Value};

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A table key.
    Key(String),
    /// An array index.
    Index(usize),
}

/// A key path into the config document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<Segment>);

impl KeyPath {
    /// Appends a table key.
    pub fn key(mut self, key: &str) -> Self {
        self.0.push(Segment::Key(key.to_owned()));
        self
    }

    /// Appends an array index.
    pub fn index(mut self, index: usize) -> Self {
        self.0.push(Segment::Index(index));
        self
    }

    /// Appends a dotted path such as `retry.max_attempts`.
    pub fn dotted(mut self, dotted: &str) -> Self {
        self.0.extend(
            dotted
                .split('.')
                .filter(|s| !s.is_empty())
                .map(|s| Segment::Key(s.to_owned())),
        );
        self
    }

    /// Whether `prefix` is the start of this path.
    pub fn starts_with(&self, prefix: &KeyPath) -> bool {
        self.0.starts_with(&prefix.0)
    }

    /// From serde_path_to_error's path.
    pub(crate) fn from_serde(path: &serde_path_to_error::Path) -> Self {
        use serde_path_to_error::Segment as S;
        KeyPath(
            path.iter()
                .filter_map(|s| match s {
                    S::Seq { index } => Some(Segment::Index(*index)),
                    S::Map { key } => Some(Segment::Key(key.clone())),
                    S::Enum { .. } | S::Unknown => None,
                })
                .collect(),
        )
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// A place in the document while walking a path.
#[derive(Clone, Copy)]
enum Node<'a> {
    Table(&'a Table),
    Item(&'a Item),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Table(t) => t.span(),
            Node::Item(i) => i.span(),
            Node::Value(v) => v.span(),
        }
    }

    /// The child at `segment`, and the span of its key if it has one.
    fn child(self, segment: &Segment) -> Option<(Node<'a>, Option<Range<usize>>)> {
        let node = match self {
            Node::Item(Item::Table(t)) => Node::Table(t),
            Node::Item(Item::Value(v)) => Node::Value(v),
            Node::Item(Item::ArrayOfTables(a)) => {
                let Segment::Index(i) = segment else {
                    return None;
                };
                return Some((Node::Table(a.get(*i)?), None));
            }
            other => other,
        };
        match (segment, node) {
            (Segment::Key(k), Node::Table(t)) => {
                Some((Node::Item(t.get(k)?), t.key(k).and_then(|k| k.span())))
            }
            (Segment::Key(k), Node::Value(Value::InlineTable(t))) => {
                Some((Node::Value(t.get(k)?), t.key(k).and_then(|k| k.span())))
            }
            (Segment::Index(i), Node::Value(Value::Array(a))) => {
                Some((Node::Value(a.get(*i)?), None))
            }
            _ => None,
        }
    }
}

/// The byte range of the deepest part of `path` found in the document: the
/// key of the last step if it has one, else the value.
pub(crate) fn span(doc: &ImDocument<&str>, path: &KeyPath) -> Option<Range<usize>> {
    let mut node = Node::Table(doc.as_table());
    let mut found = None;
    for segment in &path.0 {
        let Some((child, key_span)) = node.child(segment) else {
            break;
        };
        found = key_span.or_else(|| child.span()).or(found);
        node = child;
    }
    found
}

/// Whether the whole of `path` is in the document.
pub(crate) fn contains(doc: &ImDocument<&str>, path: &KeyPath) -> bool {
    let mut node = Node::Table(doc.as_table());
    for segment in &path.0 {
        match node.child(segment) {
            Some((child, _)) => node = child,
            None => return false,
        }
    }
    true
}

/// 1-based line and column of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}
