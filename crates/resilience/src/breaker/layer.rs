//! The circuit breaker as a tower layer.

use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::{CircuitBreaker, Outcome};
use crate::classify::{Classify, ErrIsFailure};
use crate::{BoxError, BoxFuture};

/// Wraps a service in a [`CircuitBreaker`]; rejections are [`CircuitOpen`](super::CircuitOpen) errors.
///
/// ```
/// use tidegate_resilience::breaker::{CircuitBreaker, CircuitBreakerLayer};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let breaker = CircuitBreaker::default();
/// let svc = ServiceBuilder::new()
///     .layer(CircuitBreakerLayer::new(breaker.clone()))
///     .service(service_fn(|x: u32| async move { Ok::<_, std::io::Error>(x + 1) }));
/// assert_eq!(svc.oneshot(1).await.unwrap(), 2);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer<C = ErrIsFailure> {
    breaker: CircuitBreaker,
    classify: C,
}

impl CircuitBreakerLayer {
    /// Every `Err` of the inner service counts as a failure.
    pub fn new(breaker: CircuitBreaker) -> Self {
        CircuitBreakerLayer {
            breaker,
            classify: ErrIsFailure,
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// `classify` says how each result counts (e.g. 5xx responses as failures).
    pub fn with_classifier<C2>(self, classify: C2) -> CircuitBreakerLayer<C2> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classify,
        }
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreakerService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService {
            inner,
            breaker: self.breaker.clone(),
            classify: self.classify.clone(),
        }
    }
}

/// The service made by [`CircuitBreakerLayer`].
#[derive(Debug, Clone)]
pub struct CircuitBreakerService<S, C = ErrIsFailure> {
    inner: S,
    breaker: CircuitBreaker,
    classify: C,
}

impl<S, C, Req> Service<Req> for CircuitBreakerService<S, C>
where
    S: Service<Req>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error> + Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let breaker = self.breaker.clone();
        let classify = self.classify.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let permit = breaker.try_acquire()?;
            let result = fut.await;
            let outcome: Outcome = classify.classify(&result);
            permit.record(outcome);
            result.map_err(Into::into)
        })
    }
}
