//! Fallback: answer chosen errors (breaker open, timeouts, anything) with
//! another result: a fixed value, another call, or a different error.
//!
//! ```
//! use tidegate_resilience::{breaker::CircuitBreaker, fallback::Fallback, Error};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let breaker = CircuitBreaker::default();
//! breaker.force_open();
//! let fallback = Fallback::value(Vec::<String>::new()).when(Error::is_circuit_open);
//! let results = fallback
//!     .call(|| breaker.call(|| async { Ok::<_, std::io::Error>(vec!["hit".to_string()]) }))
//!     .await
//!     .unwrap();
//! assert!(results.is_empty());
//! # }
//! ```

mod layer;

use std::fmt;
use std::future::{ready, Future, Ready};

pub use self::layer::{FallbackLayer, FallbackService};
use crate::Error;

/// Which errors a fallback answers.
///
/// Any `Fn(&Error<E>) -> bool` is one, such as `Error::is_circuit_open`.
pub trait FallbackWhen<E> {
    /// Whether `err` gets the fallback.
    fn applies(&self, err: &Error<E>) -> bool;
}

/// Every error gets the fallback.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnyError;

impl<E> FallbackWhen<E> for AnyError {
    fn applies(&self, _: &Error<E>) -> bool {
        true
    }
}

impl<E, F: Fn(&Error<E>) -> bool> FallbackWhen<E> for F {
    fn applies(&self, err: &Error<E>) -> bool {
        self(err)
    }
}

/// A fallback: `handler` turns a chosen error into the result to return.
#[derive(Clone)]
pub struct Fallback<H, W = AnyError> {
    handler: H,
    when: W,
}

impl<H, W> fmt::Debug for Fallback<H, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback").finish_non_exhaustive()
    }
}

impl<H> Fallback<H> {
    /// Answers every error with `handler(err)`.
    pub fn new(handler: H) -> Self {
        Fallback {
            handler,
            when: AnyError,
        }
    }
}

/// The handler of [`Fallback::value`].
#[derive(Debug, Clone)]
pub struct Value<T>(T);

impl<T: Clone> Fallback<Value<T>> {
    /// Answers every error with `value` (fail-open).
    pub fn value(value: T) -> Self {
        Fallback::new(Value(value))
    }
}

/// Turns an error into a result.
pub trait Handler<T, E> {
    /// The future of the result.
    type Future: Future<Output = Result<T, Error<E>>>;
    /// Handles `err`.
    fn handle(&self, err: Error<E>) -> Self::Future;
}

impl<T: Clone, E> Handler<T, E> for Value<T> {
    type Future = Ready<Result<T, Error<E>>>;
    fn handle(&self, _: Error<E>) -> Self::Future {
        ready(Ok(self.0.clone()))
    }
}

impl<T, E, F, Fut> Handler<T, E> for F
where
    F: Fn(Error<E>) -> Fut,
    Fut: Future<Output = Result<T, Error<E>>>,
{
    type Future = Fut;
    fn handle(&self, err: Error<E>) -> Fut {
        self(err)
    }
}

impl<H, W> Fallback<H, W> {
    /// Answers only errors for which `when` holds; others pass through.
    pub fn when<W2>(self, when: W2) -> Fallback<H, W2> {
        Fallback {
            handler: self.handler,
            when,
        }
    }

    /// Runs `f`, answering chosen errors with the handler.
    pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, Error<E>>>,
        H: Handler<T, E>,
        W: FallbackWhen<E>,
    {
        match f().await {
            Err(err) if self.when.applies(&err) => self.handler.handle(err).await,
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeout::Timeout;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn only_chosen_errors_fall_back() {
        async fn cached(err: Error<&'static str>) -> Result<String, Error<&'static str>> {
            Ok(format!("cached ({})", err.kind().as_str()))
        }
        let fallback = Fallback::new(cached).when(Error::is_timeout);
        let timeout = Timeout::new(Duration::from_millis(5));
        let slow = fallback
            .call(|| {
                timeout.call(|| async {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Ok::<_, &str>("fresh".to_string())
                })
            })
            .await;
        assert_eq!(slow.unwrap(), "cached (timeout)");
        let failed = fallback
            .call(|| async { Err::<String, _>(Error::inner_error("bad")) })
            .await;
        assert_eq!(failed.unwrap_err().into_inner(), Some("bad"));
    }
}
