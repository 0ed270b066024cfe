//! Where keyed limiter state lives: in this process, or on a server shared
//! by replicas (the `tidegate-redis` crate).

use std::fmt;
use std::future::Future;

use super::{Decision, Limit};
use crate::BoxError;

/// A place that keeps limiter state per key and decides atomically.
///
/// [`LocalStore`](super::LocalStore) keeps it in memory; `tidegate-redis` keeps
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
    kind: Kind,
    source: BoxError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Failed,
    Timeout,
    Unavailable,
}

impl StoreError {
    /// The store failed with `source`.
    pub fn new(source: impl Into<BoxError>) -> Self {
        StoreError {
            kind: Kind::Failed,
            source: source.into(),
        }
    }

    /// The store did not answer in time.
    pub fn timeout(source: impl Into<BoxError>) -> Self {
        StoreError {
            kind: Kind::Timeout,
            source: source.into(),
        }
    }

    /// The store was not asked: it is known to be down (a breaker in front
    /// of it is open).
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        StoreError {
            kind: Kind::Unavailable,
            source: source.into(),
        }
    }

    /// Whether the store did not answer in time.
    pub fn is_timeout(&self) -> bool {
        self.kind == Kind::Timeout
    }

    /// Whether the store was not asked because it is known to be down.
    pub fn is_unavailable(&self) -> bool {
        self.kind == Kind::Unavailable
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            Kind::Failed => "failed",
            Kind::Timeout => "timed out",
            Kind::Unavailable => "unavailable",
        };
        write!(f, "rate-limit store {what}: {}", self.source)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}
