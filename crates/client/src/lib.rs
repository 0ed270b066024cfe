//! tidegate-client: a resilient HTTP client per upstream service.
//!
//! Each [`ServiceClient`] sends its calls through the policies of
//! `tidegate-resilience` in the documented order (deadline → retry →
//! circuit breaker → rate limit → bulkhead → per-attempt timeout), over a
//! pooled HTTP/1.1 or h2c connection, and returns one [`Error`] type whose
//! [`ErrorKind`] says what happened. A [`Registry`] builds one shared
//! client per service from a services file (see [`config`]).
//!
//! Retries follow HTTP: a refused connection is retried for any method
//! (nothing was sent); after the request may have been sent, only
//! idempotent methods (GET HEAD OPTIONS PUT DELETE) or requests with an
//! `Idempotency-Key`, and only when the body is within
//! `max_replay_bytes`. Retried: connect failures, timeouts, 502, 503, 504,
//! and 429 with `Retry-After`; never 400, 401, 403, 404, 422.
//!
//! Every call carries `x-correlation-id` (from the caller's
//! [`headers::Context`], or new), a W3C `traceparent`, and the time left
//! before its deadline in `x-tidegate-deadline-ms`. Each attempt is a span
//! of its own in the call's trace: the caller's, or one begun for the call,
//! so that a call's retries share a trace. A call made outside any context
//! has one new ID for both its correlation ID and its trace ID.
//!
//! ```no_run
//! use tidegate_client::Registry;
//!
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = Registry::from_file("services.toml")?;
//! let body = serde_json::json!({"cents": 500});
//! let receipt: serde_json::Value = registry.get("billing")?.post_json("/charge", &body).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
pub mod clock;
pub mod config;
mod connect;
mod error;
pub mod fallback;
mod head;
pub mod headers;
pub mod metrics;
mod registry;
mod response;
mod status;

pub use crate::client::{RequestBuilder, ServiceClient};
pub use crate::error::{BoxError, Error, ErrorKind};
pub use crate::registry::Registry;
pub use crate::response::{Response, StreamingResponse};
pub use crate::status::ServiceStatus;
