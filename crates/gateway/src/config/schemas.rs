//! `[[events.schemas]]`: event contracts. Each listed type of a topic has
//! JSON Schema versions, oldest first; published events of that type are
//! validated (see `events::contracts`), and consecutive versions must keep
//! the evolution rules of reference 002, checked here when the config is
//! read (so `tidegate check` refuses a list that breaks them).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use tidegate_client::config::file::KeyPath;

use super::{ConfigError, Locator};

/// `[[events.schemas]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSchema {
    topic: String,
    #[serde(rename = "type")]
    ty: String,
    versions: Vec<PathBuf>,
}

/// The schemas of one event type of one topic.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaSettings {
    /// The topic.
    pub topic: String,
    /// The event type (`ContentUploaded`).
    pub ty: String,
    /// Oldest first.
    pub versions: Vec<SchemaVersion>,
}

/// One version of an event type's schema.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaVersion {
    /// The file as written in the config (relative to the config's
    /// directory), which names it in errors and in `dataschema`.
    pub file: String,
    /// The schema.
    pub schema: Value,
}

/// A rule of schema evolution that a new version breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The field, dotted (`author.name`; `tags[]` for an array's items).
    pub field: String,
    /// What the new version does to it.
    pub what: String,
    /// The rule.
    pub rule: &'static str,
}

const ADDED: &str = "a field may be added only as optional or with a default";
const REMOVED: &str = "a field is removed only after a version that marks it `deprecated`";
const RETYPED: &str = "a type change (or a rename) needs a new event type";
const NOW_REQUIRED: &str = "a field may become required only with a default";

/// The first rule `new` breaks as the version after `old`.
pub fn evolution(old: &Value, new: &Value) -> Option<Broken> {
    compare(old, new, "")
}

fn compare(old: &Value, new: &Value, prefix: &str) -> Option<Broken> {
    let empty = serde_json::Map::new();
    let required = |schema: &Value| -> HashSet<String> {
        schema
            .get("required")
            .and_then(Value::as_array)
            .map(|names| {
                names
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let (before, after) = (
        properties(old).unwrap_or(&empty),
        properties(new).unwrap_or(&empty),
    );
    let (was_required, is_required) = (required(old), required(new));
    let broken = |name: &str, what: String, rule| {
        Some(Broken {
            field: format!("{prefix}{name}"),
            what,
            rule,
        })
    };
    for (name, field) in after {
        let defaulted = field.get("default").is_some();
        match before.get(name) {
            None if is_required.contains(name) && !defaulted => {
                return broken(name, "is added as required without a default".into(), ADDED)
            }
            None => {}
            Some(earlier) => {
                if let (Some(from), Some(to)) = (types(earlier), types(field)) {
                    if from != to {
                        let what =
                            format!("changes type from {} to {}", from.join("|"), to.join("|"));
                        return broken(name, what, RETYPED);
                    }
                }
                if is_required.contains(name) && !was_required.contains(name) && !defaulted {
                    return broken(
                        name,
                        "becomes required without a default".into(),
                        NOW_REQUIRED,
                    );
                }
                if let Some(inner) = compare(earlier, field, &format!("{prefix}{name}.")) {
                    return Some(inner);
                }
                if let (Some(from), Some(to)) = (earlier.get("items"), field.get("items")) {
                    if let Some(inner) = compare(from, to, &format!("{prefix}{name}[].")) {
                        return Some(inner);
                    }
                }
            }
        }
    }
    for (name, field) in before {
        let deprecated = field.get("deprecated").and_then(Value::as_bool) == Some(true);
        if !after.contains_key(name) && !deprecated {
            return broken(
                name,
                "is removed without being marked `deprecated` first".into(),
                REMOVED,
            );
        }
    }
    None
}

fn properties(schema: &Value) -> Option<&serde_json::Map<String, Value>> {
    schema.get("properties").and_then(Value::as_object)
}

/// A field's `type`, as a sorted list; `None` when it names none.
fn types(field: &Value) -> Option<Vec<&str>> {
    let mut types = match field.get("type")? {
        Value::String(one) => vec![one.as_str()],
        Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
        _ => return None,
    };
    types.sort_unstable();
    Some(types)
}

impl Locator<'_> {
    /// The schemas, read from files relative to `base` and checked: each a
    /// valid JSON Schema, each version keeping the rules after the one
    /// before it.
    pub(crate) fn schemas(
        &self,
        raw: Vec<RawSchema>,
        base: &Path,
        at: &KeyPath,
    ) -> Result<Vec<SchemaSettings>, ConfigError> {
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, r) in raw.into_iter().enumerate() {
            let at = at.clone().key("schemas").index(i);
            if !seen.insert((r.topic.clone(), r.ty.clone())) {
                return Err(self.error(
                    &at.key("type"),
                    format!("`{}` of topic `{}` has schemas already", r.ty, r.topic),
                ));
            }
            if r.versions.is_empty() {
                return Err(self.error(&at.key("versions"), "needs at least one schema file"));
            }
            let mut versions: Vec<SchemaVersion> = Vec::with_capacity(r.versions.len());
            for (j, file) in r.versions.iter().enumerate() {
                let key = at.clone().key("versions").index(j);
                let path = base.join(file);
                let text = std::fs::read(&path).map_err(|e| {
                    self.error(&key, format!("cannot read {}: {e}", path.display()))
                })?;
                let schema: Value = serde_json::from_slice(&text).map_err(|e| {
                    self.error(&key, format!("{} is not JSON: {e}", path.display()))
                })?;
                if let Err(e) = jsonschema::validator_for(&schema) {
                    return Err(self.error(
                        &key,
                        format!("{} is not a usable JSON Schema: {e}", path.display()),
                    ));
                }
                let file = file.display().to_string();
                if let Some(before) = versions.last() {
                    if let Some(broken) = evolution(&before.schema, &schema) {
                        return Err(self.error(
                            &key,
                            format!(
                                "field `{}` {} from {} to {}: {}",
                                broken.field, broken.what, before.file, file, broken.rule
                            ),
                        ));
                    }
                }
                versions.push(SchemaVersion { file, schema });
            }
            out.push(SchemaSettings {
                topic: r.topic,
                ty: r.ty,
                versions,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v1() -> Value {
        json!({
            "type": "object",
            "required": ["id", "title"],
            "properties": {
                "id": {"type": "string"},
                "title": {"type": "string"},
                "size": {"type": "integer"},
                "legacy": {"type": "string", "deprecated": true},
                "author": {"type": "object", "properties": {"name": {"type": "string"}}},
                "tags": {"type": "array", "items": {"type": "object", "properties": {"label": {"type": "string"}}}}
            }
        })
    }

    fn with(change: impl FnOnce(&mut Value)) -> Value {
        let mut schema = v1();
        change(&mut schema);
        schema
    }

    #[test]
    fn versions_that_keep_the_rules_pass() {
        let v2 = with(|s| {
            // Optional, and required with a default: both fine.
            s["properties"]["thumbnail"] = json!({"type": "string"});
            s["properties"]["visibility"] = json!({"type": "string", "default": "public"});
            s["required"] = json!(["id", "title", "visibility"]);
            // A deprecated field removed.
            s["properties"].as_object_mut().unwrap().remove("legacy");
        });
        assert_eq!(evolution(&v1(), &v2), None);
        assert_eq!(evolution(&v1(), &v1()), None);
    }

    #[test]
    fn each_rule_broken_names_the_field_and_the_rule() {
        let cases = [
            (
                with(|s| {
                    s["properties"]["owner"] = json!({"type": "string"});
                    s["required"] = json!(["id", "title", "owner"]);
                }),
                "owner",
                ADDED,
            ),
            (
                with(|s| {
                    s["properties"].as_object_mut().unwrap().remove("size");
                }),
                "size",
                REMOVED,
            ),
            (
                with(|s| s["properties"]["size"] = json!({"type": "string"})),
                "size",
                RETYPED,
            ),
            (
                with(|s| s["required"] = json!(["id", "title", "size"])),
                "size",
                NOW_REQUIRED,
            ),
            (
                with(|s| {
                    s["properties"]["author"]["properties"]["name"] = json!({"type": "integer"})
                }),
                "author.name",
                RETYPED,
            ),
            (
                with(|s| {
                    s["properties"]["tags"]["items"]["properties"]
                        .as_object_mut()
                        .unwrap()
                        .remove("label");
                }),
                "tags[].label",
                REMOVED,
            ),
        ];
        for (v2, field, rule) in cases {
            let broken = evolution(&v1(), &v2).unwrap_or_else(|| panic!("{field} passed"));
            assert_eq!((broken.field.as_str(), broken.rule), (field, rule));
        }
    }
}
