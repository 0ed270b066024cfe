//! The three ways to handle a service being unavailable (reference 003).
//!
//! - **Fail open**: answer with a fallback value and go on
//!   ([`fail_open`]). For reads with a usable substitute: cached results,
//!   a simpler search, an empty list.
//! - **Fail closed**: return the error to the caller ([`fail_closed`]; or
//!   plain `?`). For operations that must not pretend to succeed: a charge,
//!   a login.
//! - **Best effort**: log and go on without the result ([`best_effort`]).
//!   For side work the caller does not depend on: saving a transcript,
//!   an audit copy.
//!
//! Fallbacks answer only [`Error::is_unavailable`] errors (breaker open,
//! local limits, connection, timeout, 5xx, retries exhausted). A 4xx means
//! the service answered "no", which a fallback must not hide; those pass
//! through [`fail_open`] as errors.
//!
//! ```no_run
//! use tidegate_client::{fallback, Registry};
//!
//! # async fn f(registry: Registry) -> Result<(), tidegate_client::Error> {
//! let query = serde_json::json!({"q": "tides"});
//! let results: Vec<String> = fallback::fail_open(
//!     registry.get("knowledge")?.post_json("/query", &query),
//!     |_| Vec::new(),
//! )
//! .await?;
//! let receipt: serde_json::Value =
//!     fallback::fail_closed(registry.get("billing")?.post_json("/charge", &query)).await?;
//! let saved: Option<serde_json::Value> =
//!     fallback::best_effort(registry.get("files")?.post_json("/save", &query)).await;
//! # Ok(()) }
//! ```

use std::future::Future;

use crate::error::Error;

/// Fail open: the call's result, or `fallback(&error)` when the service is
/// unavailable. Other errors are returned.
pub async fn fail_open<T>(
    call: impl Future<Output = Result<T, Error>>,
    fallback: impl FnOnce(&Error) -> T,
) -> Result<T, Error> {
    match call.await {
        Err(err) if err.is_unavailable() => {
            tracing::warn!(
                service = err.service(),
                "[{}] unavailable, using fallback: {err}",
                err.service()
            );
            Ok(fallback(&err))
        }
        other => other,
    }
}

/// Fail closed: the call's result; an error is logged and returned.
pub async fn fail_closed<T>(call: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
    let result = call.await;
    if let Err(err) = &result {
        tracing::error!(
            service = err.service(),
            "[{}] failed, failing the operation: {err}",
            err.service()
        );
    }
    result
}

/// Best effort: the call's result if it succeeded; any error is logged and dropped.
pub async fn best_effort<T>(call: impl Future<Output = Result<T, Error>>) -> Option<T> {
    match call.await {
        Ok(value) => Some(value),
        Err(err) => {
            tracing::warn!(
                service = err.service(),
                "[{}] best-effort call failed, continuing: {err}",
                err.service()
            );
            None
        }
    }
}
