//! Retry as a tower layer. It only delays, so it keeps the inner error type.

use std::future::poll_fn;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::{Next, Retry, RetryOnErr, ShouldRetry};
use crate::BoxFuture;

/// Retries requests through a clone of the inner service; requests must be `Clone`.
///
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::sync::Arc;
/// use tidegate_resilience::retry::{Retry, RetryLayer};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let calls = Arc::new(AtomicU32::new(0));
/// let counter = calls.clone();
/// let svc = ServiceBuilder::new()
///     .layer(RetryLayer::new(Retry::default()))
///     .service(service_fn(move |_: ()| {
///         let n = counter.fetch_add(1, Ordering::SeqCst);
///         async move { if n == 0 { Err("flaky") } else { Ok(n) } }
///     }));
/// assert_eq!(svc.oneshot(()).await, Ok(1));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RetryLayer<P = RetryOnErr> {
    retry: Retry,
    policy: P,
}

impl RetryLayer {
    /// Retries every `Err`.
    pub fn new(retry: Retry) -> Self {
        RetryLayer {
            retry,
            policy: RetryOnErr,
        }
    }
}

impl<P> RetryLayer<P> {
    /// `policy` decides which results are retried.
    pub fn with_policy<P2>(self, policy: P2) -> RetryLayer<P2> {
        RetryLayer {
            retry: self.retry,
            policy,
        }
    }
}

impl<S, P: Clone> Layer<S> for RetryLayer<P> {
    type Service = RetryService<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryService {
            inner,
            retry: self.retry.clone(),
            policy: self.policy.clone(),
        }
    }
}

/// The service made by [`RetryLayer`].
#[derive(Debug, Clone)]
pub struct RetryService<S, P = RetryOnErr> {
    inner: S,
    retry: Retry,
    policy: P,
}

impl<S, P, Req> Service<Req> for RetryService<S, P>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    Req: Clone + Send + 'static,
    P: ShouldRetry<S::Response, S::Error> + Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // The ready service answers the first attempt; a fresh clone each retry.
        let clone = self.inner.clone();
        let mut svc = std::mem::replace(&mut self.inner, clone);
        let retry = self.retry.clone();
        let policy = self.policy.clone();
        Box::pin(async move {
            let mut schedule = retry.start(tokio::time::Instant::now());
            let mut result = svc.call(req.clone()).await;
            loop {
                match schedule.next(policy.should_retry(&result), None) {
                    Next::Stop { .. } => return result,
                    Next::After(delay) => tokio::time::sleep(delay).await,
                }
                result = match poll_fn(|cx| svc.poll_ready(cx)).await {
                    Ok(()) => svc.call(req.clone()).await,
                    Err(e) => Err(e),
                };
            }
        })
    }
}
