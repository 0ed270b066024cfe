//! Event contracts at publish: an event of a type with schemas
//! (`[[events.schemas]]`) is validated against the version its
//! `dataschema` names, else the newest; one that does not match is refused
//! (422) and nothing of its append is stored.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use tidegate_events::NewEvent;

use crate::config::SchemaSettings;

/// The compiled schemas, by topic and type.
#[derive(Default)]
pub struct Contracts {
    by_type: HashMap<(String, String), Vec<Version>>,
}

impl std::fmt::Debug for Contracts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contracts")
            .field("types", &self.by_type.len())
            .finish()
    }
}

struct Version {
    file: String,
    id: Option<String>,
    validator: jsonschema::Validator,
}

/// Why an event was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// What is wrong, in a sentence.
    pub error: String,
    /// Where in the event's data (a JSON pointer; empty: the whole data).
    pub pointer: String,
    /// The schema keyword that failed (`required`, `type`…), or `json`.
    pub rule: String,
    /// The schema file it was checked against.
    pub schema: String,
}

impl Contracts {
    /// Compiles `schemas` (each checked when the config was read).
    pub fn compile(schemas: &[SchemaSettings]) -> Result<Self, String> {
        let mut by_type = HashMap::new();
        for set in schemas {
            let mut versions = Vec::with_capacity(set.versions.len());
            for version in &set.versions {
                let validator = jsonschema::validator_for(&version.schema)
                    .map_err(|e| format!("{}: {e}", version.file))?;
                versions.push(Version {
                    file: version.file.clone(),
                    id: version
                        .schema
                        .get("$id")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    validator,
                });
            }
            by_type.insert((set.topic.clone(), set.ty.clone()), versions);
        }
        Ok(Contracts { by_type })
    }

    /// Whether any type has schemas.
    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }

    /// The first rule `event` of `topic` breaks, if any.
    pub fn check(&self, topic: &str, event: &NewEvent) -> Option<Violation> {
        let versions = self.by_type.get(&(topic.to_owned(), event.ty.clone()))?;
        let named = event.extensions.get("dataschema");
        let version = named
            .and_then(|uri| versions.iter().find(|v| names(uri, v)))
            .unwrap_or_else(|| versions.last().expect("at least one version"));
        let data: Value = if event.data.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&event.data) {
                Ok(data) => data,
                Err(e) => {
                    return Some(Violation {
                        error: format!("the data of a {} event must be JSON: {e}", event.ty),
                        pointer: String::new(),
                        rule: "json".into(),
                        schema: version.file.clone(),
                    })
                }
            }
        };
        let error = version.validator.validate(&data).err()?;
        let pointer = error.instance_path().as_str().to_owned();
        Some(Violation {
            error: format!(
                "{} does not match {}: {}{error}",
                event.ty,
                version.file,
                if pointer.is_empty() {
                    String::new()
                } else {
                    format!("at {pointer}: ")
                },
            ),
            rule: error.kind().keyword().to_owned(),
            pointer,
            schema: version.file.clone(),
        })
    }
}

/// Whether `uri` (an event's `dataschema`) names `version`: its `$id`, or
/// a URI or path ending with its file's name.
fn names(uri: &str, version: &Version) -> bool {
    if version.id.as_deref() == Some(uri) {
        return true;
    }
    let file = Path::new(&version.file)
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or(&version.file);
    uri == file || uri.ends_with(&format!("/{file}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SchemaVersion;
    use serde_json::json;

    fn contracts() -> Contracts {
        let v1 =
            json!({"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}});
        let v2 = json!({"$id": "https://schemas.example/uploaded/2", "type": "object", "required": ["id"],
                        "properties": {"id": {"type": "string"}, "size": {"type": "integer", "minimum": 0}}});
        Contracts::compile(&[SchemaSettings {
            topic: "content".into(),
            ty: "Uploaded".into(),
            versions: vec![
                SchemaVersion {
                    file: "schemas/uploaded.v1.json".into(),
                    schema: v1,
                },
                SchemaVersion {
                    file: "schemas/uploaded.v2.json".into(),
                    schema: v2,
                },
            ],
        }])
        .unwrap()
    }

    fn event(ty: &str, data: &str, dataschema: Option<&str>) -> NewEvent {
        let mut event = NewEvent::new("e1", "/t", ty, data.as_bytes().to_vec());
        if let Some(uri) = dataschema {
            event.extensions.insert("dataschema".into(), uri.into());
        }
        event
    }

    #[test]
    fn the_named_version_or_else_the_newest_judges_the_data() {
        let c = contracts();
        assert_eq!(
            c.check(
                "content",
                &event("Uploaded", r#"{"id":"a","size":1}"#, None)
            ),
            None
        );
        let bad = c
            .check(
                "content",
                &event("Uploaded", r#"{"id":"a","size":-1}"#, None),
            )
            .unwrap();
        assert_eq!(
            (bad.pointer.as_str(), bad.rule.as_str(), bad.schema.as_str()),
            ("/size", "minimum", "schemas/uploaded.v2.json")
        );
        // v1 has no `size` rule: the same data passes when v1 is named.
        for named in [
            "https://x.example/schemas/uploaded.v1.json",
            "uploaded.v1.json",
        ] {
            let data = event("Uploaded", r#"{"id":"a","size":-1}"#, Some(named));
            assert_eq!(c.check("content", &data), None, "{named}");
        }
        let by_id = event(
            "Uploaded",
            r#"{"size":1}"#,
            Some("https://schemas.example/uploaded/2"),
        );
        let missing = c.check("content", &by_id).unwrap();
        assert_eq!(
            (missing.pointer.as_str(), missing.rule.as_str()),
            ("", "required")
        );
        assert!(
            missing.error.contains("\"id\" is a required property"),
            "{}",
            missing.error
        );
        let not_json = c.check("content", &event("Uploaded", "{", None)).unwrap();
        assert_eq!(not_json.rule, "json");
        // Other types and topics are not checked.
        assert_eq!(c.check("content", &event("Deleted", "{", None)), None);
        assert_eq!(c.check("other", &event("Uploaded", "{", None)), None);
    }
}
