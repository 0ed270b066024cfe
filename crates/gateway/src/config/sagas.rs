//! `[[sagas]]`: declarative sagas (DESIGN.md "Sagas and event contracts").
//! Each step is an action on an upstream and, optionally, the call that
//! undoes it; paths and bodies are templates over the saga's `input`, its
//! `saga.id` and earlier steps' responses, checked here: a reference to a
//! step that has not run by then is an error in the config, not an empty
//! string at run time.

use std::collections::HashSet;
use std::time::Duration;

use http::uri::PathAndQuery;
use http::Method;
use serde::Deserialize;
use serde_json::Value;
use tidegate_client::config::check_name;
use tidegate_client::config::file::KeyPath;
use tidegate_resilience::config::duration;

use super::{is_path_template, placeholders, Chunk, ConfigError, Locator, UpstreamConfig};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSaga {
    name: String,
    steps: Vec<RawStep>,
    #[serde(default)]
    compensation: Compensation,
}

/// How a failed compensation is tried again before the saga is `stuck`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Compensation {
    /// Tries of each compensation (the first included). Default 5.
    pub max_attempts: u32,
    /// The wait after the first failure, doubled after each. Default 500 ms.
    #[serde(with = "duration")]
    pub base_delay: Duration,
    /// The longest wait. Default 30 s.
    #[serde(with = "duration")]
    pub max_delay: Duration,
}

impl Default for Compensation {
    fn default() -> Self {
        Compensation {
            max_attempts: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
        }
    }
}

impl Compensation {
    /// The wait after failed try `attempt` (from 1).
    pub fn delay(&self, attempt: u32) -> Duration {
        let doubled = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)));
        doubled.min(self.max_delay)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    action: RawCall,
    compensate: Option<RawCall>,
    #[serde(default, with = "duration::option")]
    timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCall {
    upstream: String,
    #[serde(default = "post")]
    method: String,
    path: String,
    body: Option<Value>,
}

fn post() -> String {
    "POST".into()
}

/// A saga, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaConfig {
    /// Its name (`POST /v1/sagas/{name}` starts one).
    pub name: String,
    /// Run in order; compensated in reverse.
    pub steps: Vec<Step>,
    /// How compensations are tried again.
    pub compensation: Compensation,
}

/// One step of a saga.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Its name (in `steps.NAME.response` and the idempotency key).
    pub name: String,
    /// What it does.
    pub action: SagaCall,
    /// What undoes it, if anything needs undoing.
    pub compensate: Option<SagaCall>,
    /// Bounds each call of the step (action or compensation), within the
    /// upstream's own policies; `None`: the upstream's deadline.
    pub timeout: Option<Duration>,
}

/// A call of a step, through its upstream's policies.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaCall {
    /// Index into the upstreams.
    pub upstream: usize,
    /// Its method (POST unless said).
    pub method: Method,
    /// Its path and query.
    pub path: Vec<Segment>,
    /// Its JSON body, if it has one.
    pub body: Option<BodyTemplate>,
}

/// A piece of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// As written.
    Text(String),
    /// A value, percent-encoded.
    Ref(Ref),
}

/// A body template: JSON where a string that is one `{reference}` becomes
/// the value it refers to, and other strings have theirs written in.
#[derive(Debug, Clone, PartialEq)]
pub enum BodyTemplate {
    /// JSON with no reference.
    Literal(Value),
    /// `"{input.items}"`: the value itself (any JSON).
    Value(Ref),
    /// `"order {input.id} of {saga.id}"`: a string.
    Text(Vec<Segment>),
    /// An array of templates.
    Array(Vec<BodyTemplate>),
    /// An object of templates.
    Object(Vec<(String, BodyTemplate)>),
}

/// What a reference starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    /// The saga's input.
    Input,
    /// The JSON response of step N's action.
    Response(usize),
    /// The saga's id.
    SagaId,
}

/// `{input.items}`, `{steps.reserve.response.id}`, `{saga.id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ref {
    /// Where it starts.
    pub root: Root,
    /// The keys (or array indexes) under it.
    pub path: Vec<String>,
    /// As written, for errors.
    pub text: String,
}

/// What the templates of a running saga see.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// The saga's id.
    pub id: &'a str,
    /// Its input.
    pub input: &'a Value,
    /// Each step's response, once its action succeeded.
    pub responses: &'a [Option<Value>],
}

impl Ref {
    /// The value it refers to in `scope`, or `None` if there is none.
    pub fn resolve(&self, scope: Scope<'_>) -> Option<Value> {
        let start = match self.root {
            Root::Input => scope.input,
            Root::Response(step) => scope.responses.get(step)?.as_ref()?,
            Root::SagaId => return Some(Value::String(scope.id.to_owned())),
        };
        let mut value = start;
        for key in &self.path {
            value = match value {
                Value::Object(map) => map.get(key)?,
                Value::Array(items) => items.get(key.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        // JSON null is "nothing" too: a path made of it would say `null`.
        (!value.is_null()).then(|| value.clone())
    }
}

/// The text of `value` in a path or a string: strings as they are,
/// numbers and booleans written out; anything else cannot be.
fn scalar(reference: &Ref, value: &Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(format!(
            "`{{{}}}` is not a string or a number",
            reference.text
        )),
    }
}

fn fill(segments: &[Segment], scope: Scope<'_>, encode: bool) -> Result<String, String> {
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Text(text) => out.push_str(text),
            Segment::Ref(reference) => {
                let value = reference
                    .resolve(scope)
                    .ok_or_else(|| format!("`{{{}}}` resolves to nothing", reference.text))?;
                let text = scalar(reference, &value)?;
                if encode {
                    crate::http::path::push_component(&mut out, text.as_bytes());
                } else {
                    out.push_str(&text);
                }
            }
        }
    }
    Ok(out)
}

impl SagaCall {
    /// Its path in `scope` (values percent-encoded).
    pub fn path(&self, scope: Scope<'_>) -> Result<PathAndQuery, String> {
        let path = fill(&self.path, scope, true)?;
        PathAndQuery::try_from(path.as_str()).map_err(|_| format!("`{path}` is not a valid path"))
    }

    /// Its body in `scope`, if it has one.
    pub fn body(&self, scope: Scope<'_>) -> Result<Option<Value>, String> {
        self.body.as_ref().map(|b| b.render(scope)).transpose()
    }

    /// Every reference in its path and body.
    pub fn refs(&self) -> Vec<&Ref> {
        let mut out: Vec<&Ref> = self
            .path
            .iter()
            .filter_map(|s| match s {
                Segment::Ref(r) => Some(r),
                Segment::Text(_) => None,
            })
            .collect();
        if let Some(body) = &self.body {
            body.refs(&mut out);
        }
        out
    }
}

impl BodyTemplate {
    fn render(&self, scope: Scope<'_>) -> Result<Value, String> {
        Ok(match self {
            BodyTemplate::Literal(value) => value.clone(),
            BodyTemplate::Value(reference) => reference
                .resolve(scope)
                .ok_or_else(|| format!("`{{{}}}` resolves to nothing", reference.text))?,
            BodyTemplate::Text(segments) => Value::String(fill(segments, scope, false)?),
            BodyTemplate::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|i| i.render(scope))
                    .collect::<Result<_, _>>()?,
            ),
            BodyTemplate::Object(fields) => {
                let mut map = serde_json::Map::with_capacity(fields.len());
                for (key, value) in fields {
                    map.insert(key.clone(), value.render(scope)?);
                }
                Value::Object(map)
            }
        })
    }

    fn refs<'a>(&'a self, out: &mut Vec<&'a Ref>) {
        match self {
            BodyTemplate::Literal(_) => {}
            BodyTemplate::Value(r) => out.push(r),
            BodyTemplate::Text(segments) => out.extend(segments.iter().filter_map(|s| match s {
                Segment::Ref(r) => Some(r),
                Segment::Text(_) => None,
            })),
            BodyTemplate::Array(items) => items.iter().for_each(|i| i.refs(out)),
            BodyTemplate::Object(fields) => fields.iter().for_each(|(_, v)| v.refs(out)),
        }
    }
}

impl SagaConfig {
    /// The first reference to the input that `input` does not have: a
    /// saga started without it would fail halfway, so it is not started.
    pub fn missing_input(&self, input: &Value) -> Option<String> {
        let scope = Scope {
            id: "",
            input,
            responses: &[],
        };
        self.steps
            .iter()
            .flat_map(|s| std::iter::once(&s.action).chain(s.compensate.as_ref()))
            .flat_map(SagaCall::refs)
            .find(|r| r.root == Root::Input && r.resolve(scope).is_none())
            .map(|r| format!("the input has nothing at `{{{}}}`", r.text))
    }
}

/// Parses `{...}` references in `text`: the steps before `visible` (an
/// index into `steps`) may be referred to.
fn segments(text: &str, steps: &[String], visible: usize) -> Result<Vec<Segment>, String> {
    placeholders(text)?
        .into_iter()
        .map(|chunk| match chunk {
            Chunk::Text(text) => Ok(Segment::Text(text.to_owned())),
            Chunk::Name(name) => reference(name, steps, visible).map(Segment::Ref),
        })
        .collect()
}

fn reference(text: &str, steps: &[String], visible: usize) -> Result<Ref, String> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("`{{{text}}}` is not a reference"));
    }
    let (root, rest) = match parts.as_slice() {
        ["input", rest @ ..] => (Root::Input, rest),
        ["saga", "id"] => (Root::SagaId, &[][..]),
        ["steps", step, "response", rest @ ..] => {
            let index = steps
                .iter()
                .position(|s| s == step)
                .ok_or_else(|| format!("`{{{text}}}`: there is no step `{step}`"))?;
            if index >= visible {
                return Err(format!(
                    "`{{{text}}}`: step `{step}` has not run by then (a step sees the responses \
                     of the steps before it; a compensation, its own step's too)"
                ));
            }
            (Root::Response(index), rest)
        }
        _ => {
            return Err(format!(
                "`{{{text}}}` is not a reference: use {{input}}, {{input.KEY}}, \
                 {{steps.STEP.response.KEY}} or {{saga.id}}"
            ))
        }
    };
    Ok(Ref {
        root,
        path: rest.iter().map(|s| (*s).to_owned()).collect(),
        text: text.to_owned(),
    })
}

/// `value` as a template: strings holding references become them.
fn body(value: Value, steps: &[String], visible: usize) -> Result<BodyTemplate, String> {
    Ok(match value {
        Value::String(text) => {
            let parsed = segments(&text, steps, visible)?;
            match parsed.as_slice() {
                [Segment::Ref(r)] => BodyTemplate::Value(r.clone()),
                _ if parsed.iter().all(|s| matches!(s, Segment::Text(_))) => {
                    BodyTemplate::Literal(Value::String(text))
                }
                _ => BodyTemplate::Text(parsed),
            }
        }
        Value::Array(items) => {
            let items = items
                .into_iter()
                .map(|i| body(i, steps, visible))
                .collect::<Result<Vec<_>, _>>()?;
            if items.iter().all(|i| matches!(i, BodyTemplate::Literal(_))) {
                BodyTemplate::Literal(Value::Array(
                    items
                        .into_iter()
                        .map(|i| match i {
                            BodyTemplate::Literal(v) => v,
                            _ => unreachable!(),
                        })
                        .collect(),
                ))
            } else {
                BodyTemplate::Array(items)
            }
        }
        Value::Object(map) => {
            let mut fields = Vec::with_capacity(map.len());
            for (key, value) in map {
                fields.push((key, body(value, steps, visible)?));
            }
            BodyTemplate::Object(fields)
        }
        other => BodyTemplate::Literal(other),
    })
}

impl Locator<'_> {
    /// `[[sagas]]`, checked against the upstreams.
    pub(crate) fn sagas(
        &self,
        raw: Vec<RawSaga>,
        upstreams: &[UpstreamConfig],
    ) -> Result<Vec<SagaConfig>, ConfigError> {
        let mut names = HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, saga) in raw.into_iter().enumerate() {
            let at = KeyPath::default().key("sagas").index(i);
            check_name(&saga.name).map_err(|why| self.error(&at.clone().key("name"), why))?;
            if !names.insert(saga.name.clone()) {
                return Err(self.error(
                    &at.key("name"),
                    format!("duplicate saga name `{}`", saga.name),
                ));
            }
            if saga.compensation.max_attempts == 0 {
                return Err(self.error(
                    &at.key("compensation").key("max_attempts"),
                    "must be at least 1",
                ));
            }
            if saga.steps.is_empty() {
                return Err(self.error(&at.key("steps"), "needs at least one step"));
            }
            let step_names: Vec<String> = saga.steps.iter().map(|s| s.name.clone()).collect();
            let mut steps = Vec::with_capacity(saga.steps.len());
            for (j, step) in saga.steps.into_iter().enumerate() {
                let at = at.clone().key("steps").index(j);
                check_name(&step.name).map_err(|why| self.error(&at.clone().key("name"), why))?;
                if step_names[..j].contains(&step.name) {
                    return Err(self.error(
                        &at.key("name"),
                        format!("duplicate step name `{}`", step.name),
                    ));
                }
                if step.timeout.is_some_and(|t| t.is_zero()) {
                    return Err(self.error(&at.key("timeout"), "must be greater than 0"));
                }
                // An action sees the steps before it; a compensation runs
                // after its action succeeded, so it sees that one too.
                let action = self.saga_call(
                    step.action,
                    upstreams,
                    &step_names,
                    j,
                    &at.clone().key("action"),
                )?;
                let compensate = match step.compensate {
                    Some(raw) => Some(self.saga_call(
                        raw,
                        upstreams,
                        &step_names,
                        j + 1,
                        &at.clone().key("compensate"),
                    )?),
                    None => None,
                };
                steps.push(Step {
                    name: step.name,
                    action,
                    compensate,
                    timeout: step.timeout,
                });
            }
            out.push(SagaConfig {
                name: saga.name,
                steps,
                compensation: saga.compensation,
            });
        }
        Ok(out)
    }

    fn saga_call(
        &self,
        raw: RawCall,
        upstreams: &[UpstreamConfig],
        steps: &[String],
        visible: usize,
        at: &KeyPath,
    ) -> Result<SagaCall, ConfigError> {
        let upstream = upstreams
            .iter()
            .position(|u| u.name == raw.upstream)
            .ok_or_else(|| {
                self.error(
                    &at.clone().key("upstream"),
                    format!("no upstream named `{}`", raw.upstream),
                )
            })?;
        let method =
            Method::from_bytes(raw.method.to_ascii_uppercase().as_bytes()).map_err(|_| {
                self.error(
                    &at.clone().key("method"),
                    format!("`{}` is not an HTTP method", raw.method),
                )
            })?;
        let path = segments(&raw.path, steps, visible)
            .map_err(|why| self.error(&at.clone().key("path"), why))?;
        let example: String = path
            .iter()
            .map(|s| match s {
                Segment::Text(t) => t.as_str(),
                Segment::Ref(_) => "v",
            })
            .collect();
        if !is_path_template(&example) {
            return Err(self.error(
                &at.clone().key("path"),
                "must be a path (and query) starting with `/`",
            ));
        }
        let body = match raw.body {
            Some(value) => Some(
                body(value, steps, visible)
                    .map_err(|why| self.error(&at.clone().key("body"), why))?,
            ),
            None => None,
        };
        Ok(SagaCall {
            upstream,
            method,
            path,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn steps() -> Vec<String> {
        vec!["reserve".into(), "charge".into()]
    }

    #[test]
    fn references_resolve_in_paths_and_bodies() {
        let path = segments(
            "/charges/{steps.reserve.response.id}/x?u={input.user}",
            &steps(),
            1,
        )
        .unwrap();
        let template = body(
            json!({"items": "{input.items}", "note": "order {input.user} in {saga.id}", "n": 3, "fixed": ["a"]}),
            &steps(),
            1,
        )
        .unwrap();
        let call = SagaCall {
            upstream: 0,
            method: Method::POST,
            path,
            body: Some(template),
        };
        let input = json!({"user": "a b/c", "items": [{"sku": 1}]});
        let responses = [Some(json!({"id": 17})), None];
        let scope = Scope {
            id: "s-1",
            input: &input,
            responses: &responses,
        };
        assert_eq!(
            call.path(scope).unwrap().as_str(),
            "/charges/17/x?u=a%20b%2Fc"
        );
        assert_eq!(
            call.body(scope).unwrap().unwrap(),
            json!({"items": [{"sku": 1}], "note": "order a b/c in s-1", "n": 3, "fixed": ["a"]})
        );
        // Nothing there is an error, never an empty string.
        let empty = json!({});
        let scope = Scope {
            id: "s-1",
            input: &empty,
            responses: &responses,
        };
        assert_eq!(
            call.path(scope).unwrap_err(),
            "`{input.user}` resolves to nothing"
        );
        let objects = json!({"user": {"a": 1}, "items": []});
        let scope = Scope {
            id: "s-1",
            input: &objects,
            responses: &responses,
        };
        assert_eq!(
            call.path(scope).unwrap_err(),
            "`{input.user}` is not a string or a number"
        );
    }

    #[test]
    fn a_reference_to_a_step_that_has_not_run_is_refused() {
        assert!(segments("/a/{steps.charge.response.id}", &steps(), 1)
            .unwrap_err()
            .contains("step `charge` has not run by then"));
        assert!(segments("/a/{steps.charge.response.id}", &steps(), 2).is_ok());
        assert!(segments("/a/{steps.nope.response}", &steps(), 2)
            .unwrap_err()
            .contains("there is no step `nope`"));
        assert!(segments("/a/{output.x}", &steps(), 2)
            .unwrap_err()
            .contains("is not a reference"));
        assert!(segments("/a/{input..x}", &steps(), 2).is_err());
        assert!(segments("/a/{input", &steps(), 2).is_err());
    }
}
