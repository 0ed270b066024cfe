//! Answers: read whole ([`Response`]) or streamed ([`StreamingResponse`]).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use http::response::Parts;
use http::StatusCode;
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;

use hyper::body::Incoming;

use crate::client::{Active, Exchange, Payload};
use crate::error::{Error, ErrorKind};

/// A successful answer (1xx–3xx), its body read whole.
#[derive(Debug)]
pub struct Response {
    /// As the attempt boxed it: a call's result is a pointer to move, not
    /// the head and body.
    answer: Exchange,
    request_id: HeaderValue,
    service: Arc<str>,
}

impl Response {
    pub(crate) fn new(answer: Exchange, request_id: HeaderValue, service: Arc<str>) -> Self {
        Response {
            answer,
            request_id,
            service,
        }
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.answer.status()
    }

    /// The headers.
    pub fn headers(&self) -> &HeaderMap {
        self.answer.headers()
    }

    /// The correlation ID the call was made with.
    pub fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("")
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        self.answer.body().bytes()
    }

    /// The body, taken (from its box: the head is not moved out to get it).
    pub fn into_body(mut self) -> Bytes {
        std::mem::replace(self.answer.body_mut(), Payload::EMPTY).into_bytes()
    }

    /// The body as UTF-8 text.
    pub fn text(&self) -> Result<&str, Error> {
        std::str::from_utf8(self.body()).map_err(|e| self.decode_error("body is not UTF-8", e))
    }

    /// The body decoded from JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(self.body())
            .map_err(|e| self.decode_error("body is not the expected JSON", e))
    }

    fn decode_error(&self, what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::new(ErrorKind::Decode, &self.service, what)
            .with_source(e)
            .with_request_id(&self.request_id)
    }
}

/// A successful answer whose body arrives as the service writes it
/// (large downloads, server-sent events). The call counts as in flight
/// until the body ends or this is dropped.
#[derive(Debug)]
pub struct StreamingResponse {
    parts: Parts,
    body: Option<Incoming>,
    request_id: HeaderValue,
    service: Arc<str>,
    _active: Active,
}

impl StreamingResponse {
    pub(crate) fn new(
        parts: Parts,
        body: Incoming,
        request_id: HeaderValue,
        service: Arc<str>,
        active: Active,
    ) -> Self {
        StreamingResponse {
            parts,
            body: Some(body),
            request_id,
            service,
            _active: active,
        }
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.parts.status
    }

    /// The headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.parts.headers
    }

    /// The correlation ID the call was made with.
    pub fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("")
    }

    /// The next piece of the body as it arrives; `None` at its end. A
    /// connection lost mid-body is an [`ErrorKind::Connection`] error.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, Error> {
        loop {
            let Some(incoming) = self.body.as_mut() else {
                return Ok(None);
            };
            match incoming.frame().await {
                None => {
                    self.body = None;
                    return Ok(None);
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            return Ok(Some(data));
                        }
                    }
                }
                Some(Err(e)) => {
                    self.body = None;
                    return Err(Error::new(
                        ErrorKind::Connection,
                        &self.service,
                        "connection lost mid-body",
                    )
                    .with_source(e)
                    .with_request_id(&self.request_id));
                }
            }
        }
    }
}
