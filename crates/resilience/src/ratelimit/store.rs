//! Where keyed limiter state lives: in this process, or (later) in Redis.

use std::fmt;
use std::future::Future;

use super::{Decision, Limit};
use crate::BoxError;

/// A place that keeps limiter state per key and decides atomically.
///
/// [`LocalStore`](super::LocalStore) keeps it in memory; a Redis store keeps
/// it on the server so that gateway replicas share one count.
pub trait Store: Send + Sync {
    /// Decides on a request of `cost` units for `key` under `limit`, and
    /// counts it if admitted.
    fn check(
        &self,
        key: &str,
        limit: &Limit,
        cost: u32,
    ) -> impl Future<Output = Result<Decision, StoreError>> + Send;
}

/// A store could not decide (unreachable, too slow, bad reply).
#[derive(Debug)]
pub struct StoreError {
    timeout: bool,
    source: BoxError,
}

impl StoreError {
    /// The store failed with `source`.
    pub fn new(source: impl Into<BoxError>) -> Self {
        StoreError {
            timeout: false,
            source: source.into(),
        }
    }

    /// The store did not answer in time.
    pub fn timeout(source: impl Into<BoxError>) -> Self {
        StoreError {
            timeout: true,
            source: source.into(),
        }
    }

    /// Whether the store did not answer in time.
    pub fn is_timeout(&self) -> bool {
        self.timeout
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.timeout {
            write!(f, "rate-limit store timed out: {}", self.source)
        } else {
            write!(f, "rate-limit store failed: {}", self.source)
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}
