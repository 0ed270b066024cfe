//! Composition routes (backend for frontend): the parts are fetched in
//! parallel, each a GET through its upstream's policies (and its own
//! fallback), and answered as one JSON object keyed by part name, within
//! the route's deadline.

use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, Method, Response, StatusCode};
use serde_json::{Map, Value};
use tokio::time::Instant;

use super::admission::Credential;
use super::client::UpstreamClient;
use super::{router, Access, Gateway, Reply, Table};
use crate::config::{Composition, Fallback, Part, Piece, RouteConfig};
use crate::http::body::{self, ProxyBody};
use crate::http::headers::{self, OwnValue};
use crate::http::path::push_component;
use tidegate_client::headers::TraceIds;

/// Names the optional parts that failed (and are `null`).
pub static PARTIAL: HeaderName = HeaderName::from_static("x-tidegate-partial");

/// Why a part has no value.
enum Failure {
    /// The upstream answered something other than 2xx.
    Answered {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Bytes,
    },
    /// The gateway's own error (unreachable, breaker open, timed out, not
    /// JSON…).
    Reply(Reply),
}

impl Failure {
    fn into_response(self, request_id: &OwnValue) -> Response<ProxyBody> {
        match self {
            Failure::Answered {
                status,
                content_type,
                body,
            } => {
                let mut response = Response::new(body::full(body));
                *response.status_mut() = status;
                if let Some(content_type) = content_type {
                    response
                        .headers_mut()
                        .insert(header::CONTENT_TYPE, content_type);
                }
                response
            }
            Failure::Reply(reply) => reply.into_response(request_id),
        }
    }
}

impl Gateway {
    /// Answers a request to a composition route.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn compose(
        &self,
        table: &Table,
        composition: &Composition,
        route: &RouteConfig,
        mut request: http::request::Parts,
        credential: Credential<'_>,
        client: SocketAddr,
        upstream_client: &UpstreamClient,
        request_id: &OwnValue,
        log: &mut Access<'_>,
    ) -> Result<Response<ProxyBody>, Reply> {
        let deadline = Instant::now() + composition.deadline;
        let mut paths = Vec::with_capacity(composition.parts.len());
        for part in &composition.parts {
            let path = fill(&part.path, &request, &route.path_prefix).map_err(|missing| {
                Reply::new(
                    StatusCode::BAD_REQUEST,
                    format!("part `{}` needs {missing}", part.name),
                )
            })?;
            paths.push(path);
        }
        // The headers every part is sent: the request's, as any route's
        // upstream gets them, without those of a body. (A composition
        // route's request has its fields in its map.)
        let template = self.upstream_head(
            table,
            &mut request,
            None,
            route,
            credential,
            client,
            request_id,
            false,
            false,
        );
        let mut headers = template.into_headers();
        for name in [
            header::CONTENT_LENGTH,
            header::CONTENT_TYPE,
            header::TRANSFER_ENCODING,
            header::EXPECT,
        ] {
            headers.remove(name);
        }
        let span = log.span;
        let fetches = composition.parts.iter().zip(paths).map(|(part, path)| {
            self.part(table, part, path, &headers, upstream_client, deadline, span)
        });
        let outcomes = futures_util::future::join_all(fetches).await;
        let mut answer = Vec::with_capacity(1024);
        answer.push(b'{');
        let mut partial = Vec::new();
        for (i, (part, (outcome, attempts, fallback))) in
            composition.parts.iter().zip(outcomes).enumerate()
        {
            log.attempts += attempts;
            if let Some(kind) = fallback {
                self.metrics.fallback(log.route, kind);
            }
            if i > 0 {
                answer.push(b',');
            }
            serde_json::to_writer(&mut answer, &part.name).expect("a string");
            answer.push(b':');
            match outcome {
                Ok(value) => serde_json::to_writer(&mut answer, &value).expect("a value"),
                Err(failure) if part.required => {
                    log.upstream_failed = true;
                    return Ok(failure.into_response(request_id));
                }
                Err(_) => {
                    answer.extend_from_slice(b"null");
                    partial.push(part.name.as_str());
                }
            }
        }
        answer.push(b'}');
        let mut response = Response::new(body::full(Bytes::from(answer)));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if !partial.is_empty() {
            let names = HeaderValue::from_str(&partial.join(", ")).expect("checked names");
            response.headers_mut().insert(&PARTIAL, names);
        }
        Ok(response)
    }

    /// One part: its value, the attempts it took, and the kind of
    /// fallback that gave the value, if one did.
    #[allow(clippy::too_many_arguments)]
    async fn part(
        &self,
        table: &Table,
        part: &Part,
        path: PathAndQuery,
        headers: &HeaderMap,
        upstream_client: &UpstreamClient,
        deadline: Instant,
        span: Option<TraceIds>,
    ) -> (Result<Value, Failure>, u32, Option<&'static str>) {
        let (mut outcome, mut attempts) = self
            .fetch(
                table,
                part.upstream,
                path.clone(),
                headers,
                upstream_client,
                deadline,
                span,
            )
            .await;
        let mut used = None;
        if outcome.is_err() {
            match &part.fallback {
                Some(Fallback::Static { body, .. }) => {
                    outcome = Ok(serde_json::from_slice(body).expect("checked at load"));
                    used = Some("static");
                }
                Some(Fallback::Upstream(other)) => {
                    let (other, more) = self
                        .fetch(
                            table,
                            *other,
                            path,
                            headers,
                            upstream_client,
                            deadline,
                            span,
                        )
                        .await;
                    attempts += more;
                    if other.is_ok() {
                        outcome = other;
                        used = Some("upstream");
                    }
                }
                Some(Fallback::Stale { .. }) | None => {}
            }
        }
        let outcome = outcome.map(|value| keep(value, &part.fields));
        (outcome, attempts, used)
    }

    /// `GET path` through upstream `index`'s policies, its answer as JSON,
    /// by `deadline`.
    #[allow(clippy::too_many_arguments)]
    async fn fetch(
        &self,
        table: &Table,
        index: usize,
        path: PathAndQuery,
        headers: &HeaderMap,
        upstream_client: &UpstreamClient,
        deadline: Instant,
        span: Option<TraceIds>,
    ) -> (Result<Value, Failure>, u32) {
        let upstream = &table.upstreams[index];
        // Each exchange a span of its own in the request's trace.
        let mut headers = headers.clone();
        let own = headers::child_traceparent(headers.get(&headers::TRACEPARENT));
        headers.insert(&headers::TRACEPARENT, own);
        let max_bytes = usize::try_from(table.settings.max_body_bytes).unwrap_or(usize::MAX);
        let mut attempts = 0;
        let fetched = async {
            let (exchanged, tries) = self
                .exchange(
                    upstream_client,
                    upstream,
                    Method::GET,
                    path,
                    headers.clone(),
                    Bytes::new(),
                    deadline.saturating_duration_since(Instant::now()),
                    max_bytes,
                    span,
                )
                .await;
            attempts = tries;
            let (status, answer_headers, body) = exchanged.map_err(Failure::Reply)?;
            if !status.is_success() {
                return Err(Failure::Answered {
                    status,
                    content_type: answer_headers.get(header::CONTENT_TYPE).cloned(),
                    body,
                });
            }
            serde_json::from_slice(&body).map_err(|_| {
                Failure::Reply(
                    Reply::new(StatusCode::BAD_GATEWAY, "the answer is not JSON")
                        .service(upstream.name()),
                )
            })
        };
        let outcome = match tokio::time::timeout_at(deadline, fetched).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Failure::Reply(
                Reply::new(StatusCode::GATEWAY_TIMEOUT, "the route's deadline passed")
                    .service(upstream.name()),
            )),
        };
        (outcome, attempts)
    }
}

/// The path of a part for `request`, or what the request lacks.
fn fill(
    pieces: &[Piece],
    request: &http::request::Parts,
    prefix: &str,
) -> Result<PathAndQuery, String> {
    let mut out = String::with_capacity(64);
    for piece in pieces {
        match piece {
            Piece::Text(text) => out.push_str(text),
            Piece::Header(name) => {
                let value = request
                    .headers
                    .get(name)
                    .ok_or_else(|| format!("header `{name}`"))?;
                push_component(&mut out, value.as_bytes());
            }
            Piece::Query(name) => {
                let value = query_value(request.uri.query().unwrap_or(""), name)
                    .ok_or_else(|| format!("query parameter `{name}`"))?;
                push_component(&mut out, &value);
            }
            Piece::Path => out.push_str(&router::strip(prefix, request.uri.path())),
        }
    }
    PathAndQuery::try_from(out).map_err(|_| "a valid path".to_owned())
}

/// The first value of `name` in `query`, decoded (`+` is a space).
fn query_value(query: &str, name: &str) -> Option<Vec<u8>> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(key.as_bytes()) == name.as_bytes()).then(|| decode(value.as_bytes()))
    })
}

fn decode(text: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < text.len() => match (hex(text[i + 1]), hex(text[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(u8::try_from(high * 16 + low).expect("two hex digits"));
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        i += 1;
    }
    out
}

/// `value` with only the paths `fields` (of each element of an array).
fn keep(value: Value, fields: &[Vec<String>]) -> Value {
    if fields.is_empty() {
        return value;
    }
    match value {
        Value::Array(items) => Value::Array(items.into_iter().map(|v| keep(v, fields)).collect()),
        Value::Object(mut map) => {
            let mut out = Map::new();
            for path in fields {
                let first = &path[0];
                if out.contains_key(first) {
                    continue;
                }
                let whole = fields.iter().any(|p| p.len() == 1 && p[0] == *first);
                let Some(inner) = map.remove(first) else {
                    continue;
                };
                let inner = if whole {
                    inner
                } else {
                    let deeper: Vec<Vec<String>> = fields
                        .iter()
                        .filter(|p| p.len() > 1 && p[0] == *first)
                        .map(|p| p[1..].to_vec())
                        .collect();
                    keep(inner, &deeper)
                };
                out.insert(first.clone(), inner);
            }
            Value::Object(out)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(fields: &[&str]) -> Vec<Vec<String>> {
        fields
            .iter()
            .map(|f| f.split('.').map(str::to_owned).collect())
            .collect()
    }

    #[test]
    fn fields_keep_only_their_paths_in_objects_and_in_each_element_of_arrays() {
        let value = serde_json::json!([
            {"id": 1, "title": "a", "body": "long", "author": {"name": "n", "email": "e"}},
            {"id": 2, "title": "b", "body": "long", "author": [{"name": "m", "email": "f"}]},
        ]);
        let kept = keep(value, &paths(&["id", "title", "author.name", "missing"]));
        assert_eq!(
            kept,
            serde_json::json!([
                {"id": 1, "title": "a", "author": {"name": "n"}},
                {"id": 2, "title": "b", "author": [{"name": "m"}]},
            ])
        );
        assert_eq!(
            keep(serde_json::json!(3), &paths(&["id"])),
            serde_json::json!(3)
        );
    }

    #[test]
    fn values_are_encoded_so_they_cannot_add_segments_or_parameters() {
        let mut out = String::new();
        push_component(&mut out, b"a/b?c=d&e f~_-.");
        assert_eq!(out, "a%2Fb%3Fc%3Dd%26e%20f~_-.");
        assert_eq!(
            query_value("a=1&user=J%C3%B6+D&user=x", "user").unwrap(),
            "Jö D".as_bytes()
        );
        assert_eq!(query_value("flag&b=2", "flag").unwrap(), b"");
        assert!(query_value("a=1", "user").is_none());
        assert_eq!(decode(b"100%"), b"100%");
        assert_eq!(decode(b"%zz%41"), b"%zzA");
    }
}
