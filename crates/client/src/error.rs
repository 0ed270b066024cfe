//! One error type for every failed call, with a kind to match on.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

/// A boxed error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong, coarsely: what a caller decides on.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No connection could be made, or it broke during the exchange.
    Connection,
    /// An attempt or the whole call ran out of time.
    Timeout,
    /// The circuit breaker is open: the service was not called.
    CircuitOpen,
    /// Too many calls in flight to this service: it was not called.
    BulkheadFull,
    /// A rate limit (ours, or the service's 429) turned the call away.
    RateLimited,
    /// Adaptive throttling shed the call locally: it was not called.
    Throttled,
    /// Every attempt failed; [`Error::last_error`] says how the last one did.
    RetryExhausted,
    /// 401 or 403.
    Authentication,
    /// 404.
    NotFound,
    /// 400 or 422: the service rejected what was sent.
    Validation,
    /// Another 4xx (405, 409, 410, 412, …).
    Rejected,
    /// 5xx.
    Server,
    /// The response body could not be decoded (bad JSON, too large).
    Decode,
    /// The request could not be built (bad path, body that does not
    /// serialize, unknown service name).
    InvalidRequest,
    /// The client was closed.
    Closed,
}

impl ErrorKind {
    /// `snake_case`, as in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connection => "connection",
            ErrorKind::Timeout => "timeout",
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::BulkheadFull => "bulkhead_full",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Throttled => "throttled",
            ErrorKind::RetryExhausted => "retry_exhausted",
            ErrorKind::Authentication => "authentication",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Validation => "validation",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Server => "server",
            ErrorKind::Decode => "decode",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::Closed => "closed",
        }
    }

    /// The kind of an error status (4xx, 5xx).
    pub fn of_status(status: StatusCode) -> ErrorKind {
        match status.as_u16() {
            400 | 422 => ErrorKind::Validation,
            401 | 403 => ErrorKind::Authentication,
            404 => ErrorKind::NotFound,
            429 => ErrorKind::RateLimited,
            500.. => ErrorKind::Server,
            _ => ErrorKind::Rejected,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed call to a service: its kind, the service, the request ID, and
/// what is known (status and body of an error answer, attempts, the cause).
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    service: Arc<str>,
    request_id: Option<HeaderValue>,
    status: Option<StatusCode>,
    body: Option<Bytes>,
    retry_after: Option<Duration>,
    attempts: Option<u32>,
    last: Option<Error>,
    message: String,
    source: Option<BoxError>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, service: &Arc<str>, message: impl Into<String>) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                service: service.clone(),
                request_id: None,
                status: None,
                body: None,
                retry_after: None,
                attempts: None,
                last: None,
                message: message.into(),
                source: None,
            }),
        }
    }

    pub(crate) fn with_request_id(mut self, id: &HeaderValue) -> Self {
        self.inner.request_id = Some(id.clone());
        if let Some(last) = &mut self.inner.last {
            last.inner.request_id = Some(id.clone());
        }
        self
    }

    pub(crate) fn with_status(mut self, status: StatusCode, body: Bytes) -> Self {
        self.inner.status = Some(status);
        self.inner.body = Some(body);
        self
    }

    pub(crate) fn with_retry_after(mut self, after: Option<Duration>) -> Self {
        self.inner.retry_after = after;
        self
    }

    pub(crate) fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    pub(crate) fn exhausted(attempts: u32, last: Error) -> Self {
        let mut err = Error::new(
            ErrorKind::RetryExhausted,
            &last.inner.service,
            format!("all {attempts} attempts failed"),
        );
        err.inner.attempts = Some(attempts);
        err.inner.status = last.inner.status;
        err.inner.retry_after = last.inner.retry_after;
        err.inner.last = Some(last);
        err
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The service's display name.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// The call's correlation ID (`x-correlation-id`), once the call was made.
    pub fn request_id(&self) -> Option<&str> {
        self.inner.request_id.as_ref().and_then(|v| v.to_str().ok())
    }

    /// The status of the service's answer, if it answered (for
    /// [`ErrorKind::RetryExhausted`]: the last answer's).
    pub fn status(&self) -> Option<StatusCode> {
        self.inner.status
    }

    /// The body of the service's error answer (up to `max_response_bytes`).
    pub fn body(&self) -> Option<&Bytes> {
        self.inner.body.as_ref()
    }

    /// When to try again, if known: the breaker's next probe, a limiter's
    /// reset, or the service's `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        self.inner.retry_after
    }

    /// For [`ErrorKind::RetryExhausted`]: how many attempts were made.
    pub fn attempts(&self) -> Option<u32> {
        self.inner.attempts
    }

    /// For [`ErrorKind::RetryExhausted`]: how the last attempt failed.
    pub fn last_error(&self) -> Option<&Error> {
        self.inner.last.as_ref()
    }

    /// Whether the service is unavailable rather than answering "no": the
    /// breaker is open, a local limit turned the call away, it could not be
    /// reached, timed out, failed with 5xx, or every attempt failed. These
    /// are the errors a fail-open fallback answers.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::Connection
                | ErrorKind::Timeout
                | ErrorKind::CircuitOpen
                | ErrorKind::BulkheadFull
                | ErrorKind::RateLimited
                | ErrorKind::Throttled
                | ErrorKind::RetryExhausted
                | ErrorKind::Server
        )
    }

    /// Whether the service was not called at all (a local rejection).
    pub fn is_rejected_locally(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::CircuitOpen
                | ErrorKind::BulkheadFull
                | ErrorKind::Throttled
                | ErrorKind::Closed
        ) || (self.kind() == ErrorKind::RateLimited && self.status().is_none())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &*self.inner;
        let mut d = f.debug_struct("Error");
        d.field("kind", &i.kind)
            .field("service", &i.service)
            .field("message", &i.message);
        if let Some(id) = &i.request_id {
            d.field("request_id", id);
        }
        if let Some(status) = i.status {
            d.field("status", &status);
        }
        if let Some(attempts) = i.attempts {
            d.field("attempts", &attempts);
        }
        if let Some(last) = &i.last {
            d.field("last", last);
        }
        if let Some(source) = &i.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &*self.inner;
        write!(f, "[{}] {}", i.service, i.message)?;
        if let Some(last) = &i.last {
            write!(f, "; last: {}", last.inner.message)?;
        }
        let mut source = i
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static));
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.inner.last {
            Some(last) => Some(last),
            None => self
                .inner
                .source
                .as_deref()
                .map(|s| s as &(dyn std::error::Error + 'static)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_kinds() {
        for (status, kind) in [
            (400, ErrorKind::Validation),
            (422, ErrorKind::Validation),
            (401, ErrorKind::Authentication),
            (403, ErrorKind::Authentication),
            (404, ErrorKind::NotFound),
            (409, ErrorKind::Rejected),
            (429, ErrorKind::RateLimited),
            (500, ErrorKind::Server),
            (503, ErrorKind::Server),
        ] {
            assert_eq!(
                ErrorKind::of_status(StatusCode::from_u16(status).unwrap()),
                kind
            );
        }
    }

    #[test]
    fn exhausted_errors_keep_the_last_one() {
        let service: Arc<str> = Arc::from("billing");
        let last = Error::new(ErrorKind::Server, &service, "answered 503")
            .with_status(StatusCode::SERVICE_UNAVAILABLE, Bytes::new());
        let err = Error::exhausted(3, last).with_request_id(&HeaderValue::from_static("r1"));
        assert_eq!(err.kind(), ErrorKind::RetryExhausted);
        assert_eq!(err.attempts(), Some(3));
        assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(err.last_error().unwrap().request_id(), Some("r1"));
        assert_eq!(
            err.to_string(),
            "[billing] all 3 attempts failed; last: answered 503"
        );
        assert!(err.is_unavailable());
    }
}
