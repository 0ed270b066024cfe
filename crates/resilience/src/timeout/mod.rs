//! Timeouts: a limit per attempt, and a deadline for a whole call with its
//! retries, which the inner call can read.
//!
//! ```
//! use std::time::Duration;
//! use tidegate_resilience::timeout::{Deadline, Timeout};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let slow = Timeout::new(Duration::from_millis(50))
//!     .call(|| async {
//!         tokio::time::sleep(Duration::from_secs(1)).await;
//!         Ok::<_, ()>(())
//!     })
//!     .await;
//! assert!(slow.unwrap_err().is_timeout());
//!
//! let deadline = Deadline::after(Duration::from_secs(2));
//! let left = deadline
//!     .call(|d| async move { Ok::<_, ()>(d.remaining()) })
//!     .await
//!     .unwrap();
//! assert_eq!(left, Duration::from_secs(2));
//! # }
//! ```

mod layer;

use std::fmt;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

pub use self::layer::{TimeoutLayer, TimeoutService};
use crate::Error;

/// A limit on how long one attempt may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout {
    after: Duration,
}

impl Timeout {
    /// Attempts longer than `after` are cut off.
    pub fn new(after: Duration) -> Self {
        Timeout { after }
    }

    /// The limit.
    pub fn duration(&self) -> Duration {
        self.after
    }

    /// Runs `f`; if it is not done within the limit it is dropped and the
    /// result is an error for which [`Error::is_timeout`] holds.
    pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        match tokio::time::timeout(self.after, f()).await {
            Ok(result) => result.map_err(Error::inner_error),
            Err(_) => Err(Error::timeout(self.after)),
        }
    }
}

/// A point in time by which a whole call, retries included, must be done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline {
    at: Instant,
    budget: Duration,
}

impl Deadline {
    /// A deadline `budget` from now.
    pub fn after(budget: Duration) -> Self {
        Deadline {
            at: Instant::now() + budget,
            budget,
        }
    }

    /// A deadline at `at`.
    pub fn at(at: Instant) -> Self {
        Deadline {
            at,
            budget: at.saturating_duration_since(Instant::now()),
        }
    }

    /// When it passes.
    pub fn instant(&self) -> Instant {
        self.at
    }

    /// Time left (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Whether it has passed.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.at
    }

    /// Runs `f`, which is given the deadline; if it is not done in time it is
    /// dropped and the error answers [`Error::is_deadline_exceeded`].
    pub async fn call<F, Fut, T, E>(self, f: F) -> Result<T, Error<E>>
    where
        F: FnOnce(Deadline) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        match tokio::time::timeout_at(self.at, f(self)).await {
            Ok(result) => result.map_err(Error::inner_error),
            Err(_) => Err(Error::deadline_exceeded(self.budget)),
        }
    }
}

/// A time limit ran out. Returned by [`TimeoutLayer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed {
    after: Duration,
    deadline: bool,
}

impl Elapsed {
    pub(crate) fn new(after: Duration, deadline: bool) -> Self {
        Elapsed { after, deadline }
    }

    /// The limit that ran out.
    pub fn after(&self) -> Duration {
        self.after
    }

    /// Whether it was an overall deadline rather than a per-attempt timeout.
    pub fn is_deadline(&self) -> bool {
        self.deadline
    }
}

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.deadline {
            write!(f, "deadline of {:?} exceeded", self.after)
        } else {
            write!(f, "timed out after {:?}", self.after)
        }
    }
}

impl std::error::Error for Elapsed {}
