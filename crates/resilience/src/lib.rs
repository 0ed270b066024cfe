//! Resilience policies for async Rust: circuit breakers, retries with
//! backoff and budgets, timeouts and deadlines, bulkheads, rate limiters,
//! adaptive throttling and fallbacks.
//!
//! Every policy can be used three ways:
//! - directly: `policy.call(|| async { ... })`;
//! - guard style: acquire a permit, do the work, record the outcome (the
//!   permit gives its slot back if dropped, so cancellation leaks nothing);
//! - as a tower [`Layer`](tower::Layer).
//!
//! [`Pipeline`] composes them in the documented order with one declaration:
//! fallback → deadline → retry → circuit breaker → adaptive throttle → rate
//! limit → bulkhead → per-attempt timeout → call.
//!
//! Policy state machines never read the clock on their own: they use
//! `tokio::time::Instant`, so `#[tokio::test(start_paused = true)]` drives
//! every timeout, window and backoff in tests.
//!
//! ```
//! use std::time::Duration;
//! use tidegate_resilience::{config::PolicyConfig, Pipeline};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let pipeline = Pipeline::from_config(&PolicyConfig::default()).unwrap().build();
//! let body: Result<&str, _> = pipeline.call(|_attempt| async { Ok::<_, std::io::Error>("pong") }).await;
//! assert_eq!(body.unwrap(), "pong");
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod breaker;
pub mod bulkhead;
pub mod classify;
pub mod clock;
pub mod config;
mod error;
pub mod fallback;
pub mod pipeline;
pub mod ratelimit;
pub mod retry;
pub mod rng;
mod rolling;
mod settings;
pub mod stripe;
pub mod throttle;
pub mod timeout;

pub use crate::error::{BoxError, Error, ErrorKind};
pub use crate::pipeline::{Pipeline, PipelineBuilder};
pub use crate::retry::Attempt;

/// `d` in nanoseconds, saturating at `u64::MAX` (585 years).
pub(crate) fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The boxed future of the layers that need one.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;
