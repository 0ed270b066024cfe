//! Rate limiting as tower layers: one limiter for all requests, or one per key.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::{Clock, KeyedRateLimiter, RateLimited, RateLimiter, TokioClock};
use crate::BoxError;

/// Refuses requests over the limiter's quota with a [`RateLimited`] error.
#[derive(Debug)]
pub struct RateLimitLayer<C = TokioClock> {
    limiter: Arc<RateLimiter<C>>,
}

impl<C> Clone for RateLimitLayer<C> {
    fn clone(&self) -> Self {
        RateLimitLayer {
            limiter: self.limiter.clone(),
        }
    }
}

impl<C: Clock> RateLimitLayer<C> {
    /// Every request shares `limiter`.
    pub fn new(limiter: Arc<RateLimiter<C>>) -> Self {
        RateLimitLayer { limiter }
    }
}

impl<S, C: Clock> Layer<S> for RateLimitLayer<C> {
    type Service = RateLimitService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// The service made by [`RateLimitLayer`].
#[derive(Debug)]
pub struct RateLimitService<S, C = TokioClock> {
    inner: S,
    limiter: Arc<RateLimiter<C>>,
}

impl<S: Clone, C> Clone for RateLimitService<S, C> {
    fn clone(&self) -> Self {
        RateLimitService {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
        }
    }
}

impl<S, C, Req> Service<Req> for RateLimitService<S, C>
where
    C: Clock,
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
        admit(self.limiter.admit(), || self.inner.call(req))
    }
}

/// Refuses requests over the quota of their key, which `key` takes from the request.
///
/// ```
/// use std::sync::Arc;
/// use tidegate_resilience::ratelimit::*;
/// use tidegate_resilience::Error;
/// use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let limiter = Arc::new(KeyedRateLimiter::new(
///     Limit::new(Algorithm::TokenBucket, Quota::per_minute(1)),
///     KeyedConfig::default(),
/// ));
/// let mut svc = ServiceBuilder::new()
///     .layer(KeyedRateLimitLayer::new(limiter, |user: &&str| user.to_string()))
///     .service(service_fn(|_: &str| async { Ok::<_, std::io::Error>("ok") }));
/// assert!(svc.ready().await.unwrap().call("ann").await.is_ok());
/// let err = svc.ready().await.unwrap().call("ann").await.unwrap_err();
/// assert!(Error::from_box(err).is_rate_limited());
/// assert!(svc.ready().await.unwrap().call("bob").await.is_ok());
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct KeyedRateLimitLayer<K> {
    limiter: Arc<KeyedRateLimiter>,
    key: K,
}

impl<K> KeyedRateLimitLayer<K> {
    /// Requests are counted under the key `key` returns.
    pub fn new(limiter: Arc<KeyedRateLimiter>, key: K) -> Self {
        KeyedRateLimitLayer { limiter, key }
    }
}

impl<S, K: Clone> Layer<S> for KeyedRateLimitLayer<K> {
    type Service = KeyedRateLimitService<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedRateLimitService {
            inner,
            limiter: self.limiter.clone(),
            key: self.key.clone(),
        }
    }
}

/// The service made by [`KeyedRateLimitLayer`].
#[derive(Debug, Clone)]
pub struct KeyedRateLimitService<S, K> {
    inner: S,
    limiter: Arc<KeyedRateLimiter>,
    key: K,
}

impl<S, K, Req, Key> Service<Req> for KeyedRateLimitService<S, K>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    K: Fn(&Req) -> Key,
    Key: AsRef<str>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = (self.key)(&req);
        admit(self.limiter.try_acquire(key.as_ref()), || {
            self.inner.call(req)
        })
    }
}

fn admit<F, D>(decision: Result<D, RateLimited>, call: impl FnOnce() -> F) -> ResponseFuture<F> {
    match decision {
        Ok(_) => ResponseFuture {
            inner: Some(call()),
            rejected: None,
        },
        Err(limited) => ResponseFuture {
            inner: None,
            rejected: Some(limited),
        },
    }
}

pin_project! {
    /// The inner service's future, or an immediate rejection (no allocation either way).
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<F>,
        rejected: Option<RateLimited>,
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
        match (this.inner.as_pin_mut(), this.rejected) {
            (Some(inner), _) => inner.poll(cx).map_err(Into::into),
            (None, rejected) => {
                let limited = rejected.unwrap_or(RateLimited::new(super::Decision {
                    allowed: false,
                    limit: 0,
                    remaining: 0,
                    reset: std::time::Duration::ZERO,
                    retry_after: None,
                }));
                Poll::Ready(Err(Box::new(limited)))
            }
        }
    }
}
