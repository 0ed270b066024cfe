//! The machinery of tidegate's TOML config files, shared by the client's
//! services file and the gateway's config: parsing, `TIDEGATE__…`
//! environment overrides, `[defaults.policy]` merging, and errors that say
//! where they are (`file:line:col: key.path: reason`, or `env NAME: …`).
//!
//! ```
//! use serde::Deserialize;
//! use tidegate_client::config::file::{KeyPath, Source};
//!
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Settings { port: u16 }
//!
//! let text = "port = 80\n";
//! let mut source = Source::parse(text, "app.toml").unwrap();
//! let value = source.value([("TIDEGATE__PORT".to_string(), "8080".to_string())]).unwrap();
//! let settings: Settings = source.deserialize(value).unwrap();
//! assert_eq!(settings.port, 8080);
//!
//! let err = source.error(&KeyPath::default().key("port"), "is taken");
//! assert_eq!(err.to_string(), "env TIDEGATE__PORT: port: is taken");
//! ```

use std::fmt;

use serde::de::DeserializeOwned;

use super::locate;
pub use super::locate::{KeyPath, Segment};

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "TIDEGATE__";

/// A config that cannot be used, and where the problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `file:line:col`, `file`, or `env NAME`.
    pub location: String,
    /// The key path, e.g. `routes[1].upstream`; empty for the whole file.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.location, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.location, self.key, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

/// The text of the config file at `path`; an error names the file.
pub fn read(path: &std::path::Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        location: path.display().to_string(),
        key: String::new(),
        reason: format!("cannot read: {e}"),
    })
}

/// A config file being read: its text, its parsed document, and which key
/// paths came from the environment, so that errors point at the right place.
pub struct Source<'a> {
    text: &'a str,
    file: &'a str,
    doc: toml_edit::ImDocument<&'a str>,
    overrides: Vec<(KeyPath, String)>,
    defaults_for: Option<&'static str>,
}

impl fmt::Debug for Source<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Source")
            .field("file", &self.file)
            .field("overrides", &self.overrides)
            .finish_non_exhaustive()
    }
}

impl<'a> Source<'a> {
    /// Parses `text` (named `file` in errors); a syntax error says where it is.
    pub fn parse(text: &'a str, file: &'a str) -> Result<Self, ConfigError> {
        let doc = toml_edit::ImDocument::parse(text).map_err(|e| {
            let location = match e.span() {
                Some(span) => {
                    let (line, col) = locate::line_col(text, span.start);
                    format!("{file}:{line}:{col}")
                }
                None => file.to_owned(),
            };
            ConfigError {
                location,
                key: String::new(),
                reason: e.message().trim().to_owned(),
            }
        })?;
        Ok(Source {
            text,
            file,
            doc,
            overrides: Vec::new(),
            defaults_for: None,
        })
    }

    /// The document as a TOML value with the overrides of `env` applied:
    /// `TIDEGATE__GATEWAY__LISTEN=127.0.0.1:9000` sets `gateway.listen`; a
    /// numeric step indexes an array; a step matches an existing key
    /// ignoring case and `-` versus `_` (`SERVICES__KNOWLEDGE_BASE` reaches
    /// `services.knowledge-base`). A value that parses as TOML (number,
    /// boolean, array) is taken as such, anything else as a string.
    pub fn value(
        &mut self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<toml::Value, ConfigError> {
        let table: toml::Table =
            toml::from_str(self.text).map_err(|e| self.error(&KeyPath::default(), e.message()))?;
        let mut root = toml::Value::Table(table);
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path =
                set_override(&mut root, rest, &value).map_err(|(path, reason)| ConfigError {
                    location: format!("env {name}"),
                    key: path.to_string(),
                    reason,
                })?;
            self.overrides.push((path, name));
        }
        Ok(root)
    }

    /// Puts `[defaults.policy]` under the `policy` of every member of
    /// `collection` (an array of tables such as `upstreams`, or a table of
    /// tables such as `services`), key by key; a member's own keys win.
    /// Errors in a merged value then point at `defaults.policy`.
    pub fn merge_policy_defaults(&mut self, root: &mut toml::Value, collection: &'static str) {
        self.defaults_for = Some(collection);
        merge_policy_defaults(root, collection);
    }

    /// Deserializes `root`; an error names the key path it is about.
    pub fn deserialize<T: DeserializeOwned>(&self, root: toml::Value) -> Result<T, ConfigError> {
        serde_path_to_error::deserialize(root).map_err(|e| {
            let mut path = KeyPath::from_serde(e.path());
            let message = e.inner().message().trim();
            if let Some(field) = unknown_field(message) {
                if path.0.last() != Some(&Segment::Key(field.to_owned())) {
                    path = path.key(field);
                }
            }
            self.error(&path, message)
        })
    }

    /// The file the text came from, as named when it was parsed.
    pub fn file(&self) -> &str {
        self.file
    }

    /// An error about the value at `path`, located in the file (or the
    /// environment variable that set it).
    pub fn error(&self, path: &KeyPath, reason: impl fmt::Display) -> ConfigError {
        let reason = reason.to_string();
        if let Some((_, var)) = self
            .overrides
            .iter()
            .rev()
            .find(|(p, _)| path.starts_with(p))
        {
            return ConfigError {
                location: format!("env {var}"),
                key: path.to_string(),
                reason,
            };
        }
        let path = self.defaults_origin(path).unwrap_or_else(|| path.clone());
        let location = match locate::span(&self.doc, &path) {
            Some(span) => {
                let (line, col) = locate::line_col(self.text, span.start);
                format!("{}:{line}:{col}", self.file)
            }
            None => self.file.to_owned(),
        };
        ConfigError {
            location,
            key: path.to_string(),
            reason,
        }
    }

    /// A member's policy value that is not in the file came from `[defaults.policy]`.
    fn defaults_origin(&self, path: &KeyPath) -> Option<KeyPath> {
        let collection = self.defaults_for?;
        let [Segment::Key(c), _, Segment::Key(p), rest @ ..] = path.0.as_slice() else {
            return None;
        };
        if c != collection || p != "policy" || locate::contains(&self.doc, path) {
            return None;
        }
        let defaults = KeyPath::default().key("defaults").key("policy");
        let defaults = KeyPath(defaults.0.into_iter().chain(rest.iter().cloned()).collect());
        locate::contains(&self.doc, &defaults).then_some(defaults)
    }
}

/// The serde message for an unknown key names it between backticks.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

fn normalized(key: &str) -> String {
    key.to_ascii_lowercase().replace('-', "_")
}

/// Sets the value at the path `rest` (`GATEWAY__LISTEN`); tables are made as
/// needed, array elements must exist. Returns the path as it is in the
/// document; an error comes with the whole path of the override.
fn set_override(
    root: &mut toml::Value,
    rest: &str,
    raw: &str,
) -> Result<KeyPath, (KeyPath, String)> {
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    let whole = KeyPath(
        rest.split("__")
            .map(|s| match s.parse::<usize>() {
                Ok(i) => Segment::Index(i),
                Err(_) => Segment::Key(s.to_ascii_lowercase()),
            })
            .collect(),
    );
    let mut node = root;
    let mut walked = KeyPath::default();
    for segment in &whole.0 {
        node = match (segment, node) {
            (Segment::Key(step), toml::Value::Table(t)) => {
                let wanted = normalized(step);
                let key = t
                    .keys()
                    .find(|k| normalized(k) == wanted)
                    .cloned()
                    .unwrap_or_else(|| step.clone());
                walked.0.push(Segment::Key(key.clone()));
                t.entry(key)
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            }
            (Segment::Index(i), toml::Value::Array(items)) => {
                let reason = format!("`{walked}` has no element {i}");
                walked.0.push(Segment::Index(*i));
                items.get_mut(*i).ok_or_else(|| (whole.clone(), reason))?
            }
            (Segment::Key(_), _) => {
                return Err((whole.clone(), format!("`{walked}` is not a table")))
            }
            (Segment::Index(_), _) => {
                return Err((whole.clone(), format!("`{walked}` is not an array")))
            }
        };
    }
    *node = value;
    Ok(walked)
}

/// Puts `[defaults.policy]` of `root` under the `policy` of every member of
/// `collection`, key by key; a member's own keys win. A `policy` that is
/// not a table is left for serde to report.
pub fn merge_policy_defaults(root: &mut toml::Value, collection: &str) {
    let Some(table) = root.as_table_mut() else {
        return;
    };
    let defaults = table
        .get("defaults")
        .and_then(|d| d.get("policy"))
        .and_then(|p| p.as_table())
        .cloned()
        .unwrap_or_default();
    let members: Vec<&mut toml::Value> = match table.get_mut(collection) {
        Some(toml::Value::Array(items)) => items.iter_mut().collect(),
        Some(toml::Value::Table(items)) => items.iter_mut().map(|(_, v)| v).collect(),
        _ => return,
    };
    for member in members.into_iter().filter_map(|m| m.as_table_mut()) {
        let own = match member.remove("policy") {
            Some(toml::Value::Table(own)) => own,
            Some(other) => {
                // Not a table: leave it for serde to report.
                member.insert("policy".into(), other);
                continue;
            }
            None => toml::Table::new(),
        };
        let mut merged = defaults.clone();
        deep_merge(&mut merged, own);
        member.insert("policy".into(), toml::Value::Table(merged));
    }
}

/// Merges `over` into `base` key by key, recursing into tables; `over` wins.
pub fn deep_merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => deep_merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_find_keys_ignoring_case_and_dashes() {
        let mut source = Source::parse(
            "[services.knowledge-base]\nbase_url = \"http://a\"\n",
            "s.toml",
        )
        .unwrap();
        let value = source
            .value([(
                "TIDEGATE__SERVICES__KNOWLEDGE_BASE__BASE_URL".to_string(),
                "http://b".to_string(),
            )])
            .unwrap();
        assert_eq!(
            value["services"]["knowledge-base"]["base_url"].as_str(),
            Some("http://b")
        );
        let err = source.error(
            &KeyPath::default()
                .key("services")
                .key("knowledge-base")
                .key("base_url"),
            "bad",
        );
        assert_eq!(
            err.location,
            "env TIDEGATE__SERVICES__KNOWLEDGE_BASE__BASE_URL"
        );
    }

    #[test]
    fn merged_defaults_are_located_in_the_defaults() {
        let text = "[defaults.policy.retry]\nmax_attempts = 0\n\n[services.a]\nx = 1\n";
        let mut source = Source::parse(text, "s.toml").unwrap();
        let mut value = source.value([]).unwrap();
        source.merge_policy_defaults(&mut value, "services");
        assert_eq!(
            value["services"]["a"]["policy"]["retry"]["max_attempts"].as_integer(),
            Some(0)
        );
        let path = KeyPath::default()
            .key("services")
            .key("a")
            .key("policy")
            .dotted("retry.max_attempts");
        let err = source.error(&path, "must be at least 1");
        assert_eq!(
            err.to_string(),
            "s.toml:2:1: defaults.policy.retry.max_attempts: must be at least 1"
        );
    }

    #[test]
    fn overrides_into_missing_array_elements_fail() {
        let mut source = Source::parse("items = []\n", "s.toml").unwrap();
        let err = source
            .value([("TIDEGATE__ITEMS__3__NAME".to_string(), "x".to_string())])
            .unwrap_err();
        assert_eq!(err.location, "env TIDEGATE__ITEMS__3__NAME");
        assert_eq!(err.reason, "`items` has no element 3");
    }
}
