//! Fallback as a tower layer.

use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::{AnyError, FallbackWhen, Handler};
use crate::{BoxError, BoxFuture, Error};

/// Answers chosen errors of the inner service (as [`Error<BoxError>`]) with a handler.
///
/// ```
/// use tidegate_resilience::{breaker::*, fallback::{Fallback, FallbackLayer}, BoxError, Error};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let breaker = CircuitBreaker::default();
/// breaker.force_open();
/// let svc = ServiceBuilder::new()
///     .layer(FallbackLayer::new(Fallback::value("static answer").when(Error::<BoxError>::is_circuit_open)))
///     .layer(CircuitBreakerLayer::new(breaker))
///     .service(service_fn(|_: ()| async { Ok::<_, std::io::Error>("live answer") }));
/// assert_eq!(svc.oneshot(()).await.unwrap(), "static answer");
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct FallbackLayer<H, W = AnyError> {
    fallback: super::Fallback<H, W>,
}

impl<H, W> FallbackLayer<H, W> {
    /// Wraps services in `fallback`.
    pub fn new(fallback: super::Fallback<H, W>) -> Self {
        FallbackLayer { fallback }
    }
}

impl<S, H: Clone, W: Clone> Layer<S> for FallbackLayer<H, W> {
    type Service = FallbackService<S, H, W>;

    fn layer(&self, inner: S) -> Self::Service {
        FallbackService {
            inner,
            fallback: self.fallback.clone(),
        }
    }
}

/// The service made by [`FallbackLayer`].
#[derive(Debug, Clone)]
pub struct FallbackService<S, H, W = AnyError> {
    inner: S,
    fallback: super::Fallback<H, W>,
}

impl<S, H, W, Req> Service<Req> for FallbackService<S, H, W>
where
    S: Service<Req>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Into<BoxError>,
    H: Handler<S::Response, BoxError> + Clone + Send + Sync + 'static,
    <H as Handler<S::Response, BoxError>>::Future: Send + 'static,
    W: FallbackWhen<BoxError> + Clone + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = Error<BoxError>;
    type Future = BoxFuture<Result<S::Response, Error<BoxError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| Error::from_box(e.into()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let fallback = self.fallback.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let err = match fut.await {
                Ok(response) => return Ok(response),
                Err(err) => Error::from_box(err.into()),
            };
            if fallback.when.applies(&err) {
                boxed_handle(&fallback.handler, err).await
            } else {
                Err(err)
            }
        })
    }
}

/// Boxes the handler's future outside the async block, which keeps the
/// compiler from asking `Send` of it for every lifetime of `BoxError`.
fn boxed_handle<H, T>(handler: &H, err: Error<BoxError>) -> BoxFuture<Result<T, Error<BoxError>>>
where
    H: Handler<T, BoxError>,
    H::Future: Send + 'static,
{
    Box::pin(handler.handle(err))
}
