//! Timeouts as a tower layer: per attempt inside a retry layer, or as an
//! overall deadline outside it.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use super::Elapsed;
use crate::BoxError;

/// Cuts off calls that run longer than a limit with an [`Elapsed`] error.
///
/// ```
/// use std::time::Duration;
/// use tidegate_resilience::{timeout::TimeoutLayer, Error};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let svc = ServiceBuilder::new()
///     .layer(TimeoutLayer::deadline(Duration::from_millis(10)))
///     .service(service_fn(|_: ()| async {
///         tokio::time::sleep(Duration::from_secs(1)).await;
///         Ok::<_, std::io::Error>(())
///     }));
/// let err = Error::from_box(svc.oneshot(()).await.unwrap_err());
/// assert!(err.is_deadline_exceeded());
/// # }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    after: Duration,
    deadline: bool,
}

impl TimeoutLayer {
    /// A per-attempt timeout.
    pub fn new(after: Duration) -> Self {
        TimeoutLayer {
            after,
            deadline: false,
        }
    }

    /// An overall deadline (put it outside the retry layer).
    pub fn deadline(after: Duration) -> Self {
        TimeoutLayer {
            after,
            deadline: true,
        }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = TimeoutService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TimeoutService {
            inner,
            limit: *self,
        }
    }
}

/// The service made by [`TimeoutLayer`].
#[derive(Debug, Clone)]
pub struct TimeoutService<S> {
    inner: S,
    limit: TimeoutLayer,
}

impl<S, Req> Service<Req> for TimeoutService<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
            sleep: tokio::time::sleep(self.limit.after),
            elapsed: Elapsed::new(self.limit.after, self.limit.deadline),
        }
    }
}

pin_project! {
    /// The future of [`TimeoutService`].
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Sleep,
        elapsed: Elapsed,
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        ready!(this.sleep.poll(cx));
        Poll::Ready(Err(Box::new(*this.elapsed)))
    }
}
