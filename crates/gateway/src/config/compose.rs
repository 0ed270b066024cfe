//! Composition routes (DESIGN.md "Composition routes"): a route whose
//! answer is one JSON object made of several upstreams' answers.

use std::collections::HashSet;
use std::time::Duration;

use http::HeaderName;
use serde::Deserialize;
use tidegate_client::config::check_name;
use tidegate_client::config::file::KeyPath;

use super::edge::RawFallback;
use super::{
    is_path_template, placeholders, Chunk, ConfigError, Fallback, Locator, Target, UpstreamConfig,
};

/// The deadline of a composition route whose parts' upstreams name none.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// A composition route's parts and the deadline of its whole answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Composition {
    /// Fetched in parallel; the answer keeps this order.
    pub parts: Vec<Part>,
    /// The whole answer is bounded by this; by default the longest
    /// `policy.deadline` of the parts' upstreams.
    pub deadline: Duration,
}

/// One part of a composition route: a GET to an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Its key in the answer.
    pub name: String,
    /// Index into the upstreams.
    pub upstream: usize,
    /// The path and query sent, with placeholders.
    pub path: Vec<Piece>,
    /// A required part that fails makes the whole answer its error; an
    /// optional one is `null` and named in `x-tidegate-partial`.
    pub required: bool,
    /// Keep only these paths of the part's answer (of each element of an
    /// array); each path split at its dots. Empty: keep all.
    pub fields: Vec<Vec<String>>,
    /// What stands in when the part fails: a static JSON value, or the same
    /// GET to another upstream.
    pub fallback: Option<Fallback>,
}

/// A piece of a part's path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Sent as written.
    Text(String),
    /// `{header.NAME}`: the request's header, percent-encoded.
    Header(HeaderName),
    /// `{query.NAME}`: the request's query parameter, percent-encoded.
    Query(String),
    /// `{path}`: the request's path after the route's prefix.
    Path,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPart {
    name: String,
    upstream: String,
    path: String,
    #[serde(default = "yes")]
    required: bool,
    #[serde(default)]
    fields: Vec<String>,
    fallback: Option<RawFallback>,
}

fn yes() -> bool {
    true
}

/// `text` as pieces, or why not.
pub(crate) fn template(text: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    for chunk in placeholders(text)? {
        pieces.push(match chunk {
            Chunk::Text(text) => Piece::Text(text.to_owned()),
            Chunk::Name("path") => Piece::Path,
            Chunk::Name(name) => {
                if let Some(header) = name.strip_prefix("header.") {
                    Piece::Header(
                        HeaderName::from_bytes(header.to_ascii_lowercase().as_bytes()).map_err(
                            |_| format!("`{header}` in `{{{name}}}` is not a header name"),
                        )?,
                    )
                } else if let Some(query) = name.strip_prefix("query.").filter(|q| !q.is_empty()) {
                    Piece::Query(query.to_owned())
                } else {
                    return Err(format!(
                        "unknown placeholder `{{{name}}}`: use {{header.NAME}}, {{query.NAME}} or {{path}}"
                    ));
                }
            }
        });
    }
    // Each placeholder stands for something a path may hold.
    let example: String = pieces
        .iter()
        .map(|p| match p {
            Piece::Text(t) => t.as_str(),
            Piece::Path => "/p",
            Piece::Header(_) | Piece::Query(_) => "v",
        })
        .collect();
    if !is_path_template(&example) {
        return Err("must be a path (and query) starting with `/`".into());
    }
    Ok(pieces)
}

impl Locator<'_> {
    /// The parts of route `at`, checked against the upstreams.
    pub(crate) fn composition(
        &self,
        raw: Vec<RawPart>,
        deadline: Option<Duration>,
        upstreams: &[UpstreamConfig],
        at: &KeyPath,
    ) -> Result<Composition, ConfigError> {
        let key = at.clone().key("compose");
        if raw.is_empty() {
            return Err(self.error(&key, "needs at least one part"));
        }
        let mut names = HashSet::new();
        let mut parts = Vec::with_capacity(raw.len());
        let mut longest = Duration::ZERO;
        for (i, p) in raw.into_iter().enumerate() {
            let at = key.clone().index(i);
            check_name(&p.name).map_err(|reason| self.error(&at.clone().key("name"), reason))?;
            if !names.insert(p.name.clone()) {
                return Err(
                    self.error(&at.key("name"), format!("duplicate part name `{}`", p.name))
                );
            }
            let upstream = upstreams
                .iter()
                .position(|u| u.name == p.upstream)
                .ok_or_else(|| {
                    self.error(
                        &at.clone().key("upstream"),
                        format!("no upstream named `{}`", p.upstream),
                    )
                })?;
            longest = longest.max(
                upstreams[upstream]
                    .policy
                    .deadline
                    .unwrap_or(DEFAULT_DEADLINE),
            );
            let path =
                template(&p.path).map_err(|reason| self.error(&at.clone().key("path"), reason))?;
            let mut fields = Vec::with_capacity(p.fields.len());
            for (j, field) in p.fields.iter().enumerate() {
                let segments: Vec<String> = field.split('.').map(str::to_owned).collect();
                if segments.iter().any(String::is_empty) {
                    return Err(self.error(
                        &at.clone().key("fields").index(j),
                        "a field is a name, or names joined by `.` (`author.name`)",
                    ));
                }
                fields.push(segments);
            }
            let fallback = match p.fallback {
                None => None,
                Some(raw) => {
                    let at = at.clone().key("fallback");
                    match self.fallback(raw, upstreams, &Target::Upstream(upstream), &at)? {
                        Fallback::Stale { .. } => {
                            return Err(self.error(
                                &at,
                                "a part's fallback is `static` (a JSON value) or `upstream`",
                            ))
                        }
                        Fallback::Static {
                            status,
                            content_type,
                            body,
                        } => {
                            if !status.is_success() || !content_type.contains("json") {
                                return Err(self.error(
                                    &at,
                                    "a part's static fallback stands in for its JSON: \
                                     status 2xx and a JSON content type",
                                ));
                            }
                            if serde_json::from_slice::<serde_json::Value>(&body).is_err() {
                                return Err(self.error(&at.key("body"), "must be JSON"));
                            }
                            Some(Fallback::Static {
                                status,
                                content_type,
                                body,
                            })
                        }
                        upstream @ Fallback::Upstream(_) => Some(upstream),
                    }
                }
            };
            parts.push(Part {
                name: p.name,
                upstream,
                path,
                required: p.required,
                fields,
                fallback,
            });
        }
        let deadline = match deadline {
            Some(d) if d.is_zero() => {
                return Err(self.error(&at.clone().key("deadline"), "must be greater than 0"))
            }
            Some(d) => d,
            None => longest,
        };
        Ok(Composition { parts, deadline })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_name_their_placeholders_or_say_what_is_wrong() {
        let pieces = template("/users/{header.X-User-Id}/x?user={query.u}&rest={path}").unwrap();
        assert_eq!(
            pieces,
            vec![
                Piece::Text("/users/".into()),
                Piece::Header(HeaderName::from_static("x-user-id")),
                Piece::Text("/x?user=".into()),
                Piece::Query("u".into()),
                Piece::Text("&rest=".into()),
                Piece::Path,
            ]
        );
        assert_eq!(template("{path}").unwrap(), vec![Piece::Path]);
        for (bad, says) in [
            ("/a/{body.x}", "unknown placeholder `{body.x}`"),
            ("/a/{header.x", "is not closed"),
            ("/a/}", "without its `{`"),
            ("/a/{query.}", "unknown placeholder"),
            ("a/{path}", "starting with `/`"),
            ("/a b", "starting with `/`"),
        ] {
            let e = template(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
