//! Adaptive throttling as a tower layer.

use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::AdaptiveThrottle;
use crate::classify::{Classify, ErrIsFailure};
use crate::{BoxError, BoxFuture};

/// Rejects requests locally with [`Throttled`](super::Throttled) while the upstream refuses many.
#[derive(Debug, Clone)]
pub struct AdaptiveThrottleLayer<C = ErrIsFailure> {
    throttle: Arc<AdaptiveThrottle>,
    classify: C,
}

impl AdaptiveThrottleLayer {
    /// Every `Err` counts as a refusal by the upstream.
    pub fn new(throttle: Arc<AdaptiveThrottle>) -> Self {
        AdaptiveThrottleLayer {
            throttle,
            classify: ErrIsFailure,
        }
    }
}

impl<C> AdaptiveThrottleLayer<C> {
    /// `classify` says which results are refusals (`Outcome::Failure`).
    pub fn with_classifier<C2>(self, classify: C2) -> AdaptiveThrottleLayer<C2> {
        AdaptiveThrottleLayer {
            throttle: self.throttle,
            classify,
        }
    }
}

impl<S, C: Clone> Layer<S> for AdaptiveThrottleLayer<C> {
    type Service = AdaptiveThrottleService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        AdaptiveThrottleService {
            inner,
            throttle: self.throttle.clone(),
            classify: self.classify.clone(),
        }
    }
}

/// The service made by [`AdaptiveThrottleLayer`].
#[derive(Debug, Clone)]
pub struct AdaptiveThrottleService<S, C = ErrIsFailure> {
    inner: S,
    throttle: Arc<AdaptiveThrottle>,
    classify: C,
}

impl<S, C, Req> Service<Req> for AdaptiveThrottleService<S, C>
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
        let throttle = self.throttle.clone();
        let classify = self.classify.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let permit = throttle.try_acquire()?;
            let result = fut.await;
            permit.record(classify.classify(&result));
            result.map_err(Into::into)
        })
    }
}
