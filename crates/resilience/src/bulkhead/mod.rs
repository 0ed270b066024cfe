//! Bulkhead: at most `max_concurrent` calls at once, at most `max_queued`
//! waiting for a slot, none waiting longer than `max_wait`.
//!
//! A full queue rejects at once. Slots are guards released on drop, so a
//! cancelled caller never leaks one.
//!
//! ```
//! use tidegate_resilience::bulkhead::{Bulkhead, Config};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let bulkhead = Bulkhead::new(Config { max_concurrent: 1, max_queued: 0, ..Config::default() });
//! let held = bulkhead.try_acquire().unwrap();
//! assert!(bulkhead.acquire().await.is_err(), "no slot, no queue");
//! drop(held);
//! assert_eq!(bulkhead.call(|| async { Ok::<_, ()>(7) }).await.unwrap(), 7);
//! # }
//! ```

mod layer;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

pub use self::layer::{BulkheadLayer, BulkheadService};
use crate::settings::{check, ConfigError};
use crate::Error;

/// Settings of a bulkhead; the defaults are those of DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct Config {
    /// Calls running at once. Default 100.
    pub max_concurrent: u32,
    /// Calls waiting for a slot. Default 200.
    pub max_queued: u32,
    /// The longest wait for a slot. Default 1 s.
    #[cfg_attr(feature = "serde", serde(with = "crate::settings::duration"))]
    pub max_wait: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_concurrent: 100,
            max_queued: 200,
            max_wait: Duration::from_secs(1),
        }
    }
}

impl Config {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            self.max_concurrent >= 1,
            "max_concurrent",
            "must be at least 1",
        )
    }
}

/// The bulkhead had no free slot, no room in its queue, or the wait ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkheadFull;

impl fmt::Display for BulkheadFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bulkhead is full")
    }
}

impl std::error::Error for BulkheadFull {}

#[derive(Debug)]
struct Shared {
    slots: Semaphore,
    queued: AtomicU32,
    config: Config,
}

/// A bulkhead; clones share the same slots.
#[derive(Debug, Clone)]
pub struct Bulkhead {
    shared: Arc<Shared>,
}

impl Default for Bulkhead {
    fn default() -> Self {
        Bulkhead::new(Config::default())
    }
}

/// One slot in the bulkhead, given back on drop.
#[must_use = "the slot is given back as soon as the permit is dropped"]
#[derive(Debug)]
pub struct BulkheadPermit<'a> {
    _slot: SemaphorePermit<'a>,
}

/// Leaves the queue when dropped, however the wait ends.
struct QueueSlot<'a>(&'a AtomicU32);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Bulkhead {
    /// A bulkhead with these settings.
    pub fn new(config: Config) -> Self {
        Bulkhead {
            shared: Arc::new(Shared {
                slots: Semaphore::new(config.max_concurrent as usize),
                queued: AtomicU32::new(0),
                config,
            }),
        }
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Takes a slot if one is free, without waiting.
    pub fn try_acquire(&self) -> Result<BulkheadPermit<'_>, BulkheadFull> {
        self.shared
            .slots
            .try_acquire()
            .map(|slot| BulkheadPermit { _slot: slot })
            .map_err(|_| BulkheadFull)
    }

    /// Takes a slot, waiting in the queue up to `max_wait` if there is room in it.
    pub async fn acquire(&self) -> Result<BulkheadPermit<'_>, BulkheadFull> {
        if let Ok(permit) = self.try_acquire() {
            return Ok(permit);
        }
        let shared = &*self.shared;
        let max_queued = shared.config.max_queued;
        shared
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < max_queued).then_some(q + 1)
            })
            .map_err(|_| BulkheadFull)?;
        let _queued = QueueSlot(&shared.queued);
        match tokio::time::timeout(shared.config.max_wait, shared.slots.acquire()).await {
            Ok(Ok(slot)) => Ok(BulkheadPermit { _slot: slot }),
            // Timed out, or the semaphore was closed (it never is).
            _ => Err(BulkheadFull),
        }
    }

    /// Runs `f` in a slot.
    pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, Error<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let _permit = self.acquire().await?;
        f().await.map_err(Error::inner_error)
    }

    /// Calls running now.
    pub fn in_flight(&self) -> u32 {
        self.shared.config.max_concurrent - self.shared.slots.available_permits() as u32
    }

    /// Calls waiting for a slot now.
    pub fn queued(&self) -> u32 {
        self.shared.queued.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn queue_waits_then_gives_up_after_max_wait() {
        let bulkhead = Bulkhead::new(Config {
            max_concurrent: 1,
            max_queued: 1,
            max_wait: Duration::from_millis(100),
        });
        let held = bulkhead.try_acquire().unwrap();
        let waiter = bulkhead.acquire();
        tokio::pin!(waiter);
        assert!(futures_poll_once(waiter.as_mut()).await.is_none());
        assert_eq!(bulkhead.queued(), 1);
        assert!(bulkhead.acquire().await.is_err(), "queue of one is full");
        drop(held);
        assert!(waiter.await.is_ok());
        assert_eq!(bulkhead.queued(), 0);

        let _held = bulkhead.try_acquire().unwrap();
        let start = tokio::time::Instant::now();
        assert_eq!(bulkhead.acquire().await.unwrap_err(), BulkheadFull);
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        assert_eq!(bulkhead.queued(), 0);
    }

    async fn futures_poll_once<F: Future + Unpin>(mut f: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
