//! Bulkhead: at most `max_concurrent` calls at once, at most `max_queued`
//! waiting for a slot, none waiting longer than `max_wait`.
//!
//! A full queue rejects at once. Slots are guards released on drop, so a
//! cancelled caller never leaks one.
//!
//! Taking a slot and giving it back are one atomic operation each, with no
//! lock (a semaphore locks its waiter list on every release), and on a
//! count of the caller's thread's own: free slots are kept in striped
//! counts (see [`crate::stripe`]), all of them in a common one at first.
//! A slot given back goes to the stripe of the thread that gives it; a
//! caller takes from its own stripe, then the common one, then the other
//! stripes. Workers that each take and give back their own slots so never
//! write a cache line another one writes, and no more than
//! `max_concurrent` slots are ever out: each free slot is counted in
//! exactly one place. Waiting callers go first: while any wait, a
//! newcomer queues behind them, and each slot given back wakes the
//! longest waiting.
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

use tokio::sync::Notify;

pub use self::layer::{BulkheadLayer, BulkheadService};
use crate::settings::{check, ConfigError};
use crate::stripe::{self, STRIPES};
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
    /// Free slots no stripe holds.
    common: AtomicU32,
    /// Free slots given back on each stripe.
    stripes: [Stripe; STRIPES],
    /// Callers waiting for one.
    queued: AtomicU32,
    /// Wakes a waiting caller when a slot comes back.
    freed: Notify,
    config: Config,
}

/// A count of free slots on a cache line (two, for adjacent-line
/// prefetch) of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU32);

/// Takes one from `count` if it has one.
fn take_one(count: &AtomicU32) -> bool {
    let mut n = count.load(Ordering::SeqCst);
    while n > 0 {
        match count.compare_exchange_weak(n, n - 1, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => return true,
            Err(now) => n = now,
        }
    }
    false
}

impl Shared {
    /// Takes a slot if one is free: the thread's own stripe's, the common
    /// ones, another stripe's.
    fn take(&self) -> Option<BulkheadPermit<'_>> {
        let home = stripe::index();
        let found = take_one(&self.stripes[home].0)
            || take_one(&self.common)
            || (1..STRIPES).any(|i| take_one(&self.stripes[(home + i) % STRIPES].0));
        // (`then`, not `then_some`: a permit made and dropped gives a slot back.)
        found.then(|| BulkheadPermit { shared: self })
    }

    /// Free slots now, wherever they are counted.
    fn free(&self) -> u32 {
        let striped: u32 = self
            .stripes
            .iter()
            .map(|s| s.0.load(Ordering::Acquire))
            .sum();
        self.common.load(Ordering::Acquire) + striped
    }
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
    shared: &'a Shared,
}

impl Drop for BulkheadPermit<'_> {
    fn drop(&mut self) {
        self.shared.stripes[stripe::index()]
            .0
            .fetch_add(1, Ordering::SeqCst);
        // (Sequentially consistent, as a waiter's queueing and its retry:
        // either it sees this slot free, or this sees it waiting.)
        if self.shared.queued.load(Ordering::SeqCst) > 0 {
            self.shared.freed.notify_one();
        }
    }
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
                common: AtomicU32::new(config.max_concurrent),
                stripes: Default::default(),
                queued: AtomicU32::new(0),
                freed: Notify::new(),
                config,
            }),
        }
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Takes a slot if one is free and nobody waits for it, without
    /// waiting.
    pub fn try_acquire(&self) -> Result<BulkheadPermit<'_>, BulkheadFull> {
        if self.shared.queued.load(Ordering::Relaxed) > 0 {
            return Err(BulkheadFull);
        }
        self.shared.take().ok_or(BulkheadFull)
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
            .fetch_update(Ordering::SeqCst, Ordering::Acquire, |q| {
                (q < max_queued).then_some(q + 1)
            })
            .map_err(|_| BulkheadFull)?;
        let _queued = QueueSlot(&shared.queued);
        let wait = async {
            loop {
                let freed = shared.freed.notified();
                tokio::pin!(freed);
                // Listening before looking: a slot given back after the
                // look wakes this one.
                freed.as_mut().enable();
                if let Some(permit) = shared.take() {
                    return permit;
                }
                freed.await;
            }
        };
        tokio::time::timeout(shared.config.max_wait, wait)
            .await
            .map_err(|_| BulkheadFull)
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
        self.shared
            .config
            .max_concurrent
            .saturating_sub(self.shared.free())
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

    #[tokio::test(start_paused = true)]
    async fn waiting_callers_go_before_newcomers() {
        let bulkhead = Bulkhead::new(Config {
            max_concurrent: 1,
            max_queued: 5,
            max_wait: Duration::from_secs(1),
        });
        let held = bulkhead.try_acquire().unwrap();
        let waiter = bulkhead.acquire();
        tokio::pin!(waiter);
        assert!(futures_poll_once(waiter.as_mut()).await.is_none());
        drop(held);
        // The slot is free, but the waiter was first.
        assert_eq!(bulkhead.try_acquire().unwrap_err(), BulkheadFull);
        let permit = waiter.await.unwrap();
        assert_eq!(bulkhead.in_flight(), 1);
        drop(permit);
        assert_eq!(bulkhead.in_flight(), 0);
        assert!(bulkhead.try_acquire().is_ok());
    }

    /// A slot given back on one thread's stripe is free to every other
    /// thread, and the count of slots out stays exact.
    #[test]
    fn a_slot_given_back_on_one_thread_is_taken_on_another() {
        let bulkhead = Bulkhead::new(Config {
            max_concurrent: 1,
            ..Config::default()
        });
        let elsewhere = bulkhead.clone();
        std::thread::spawn(move || drop(elsewhere.try_acquire().unwrap()))
            .join()
            .unwrap();
        assert_eq!(bulkhead.in_flight(), 0);
        let held = bulkhead.try_acquire().expect("the other stripe's slot");
        assert_eq!(bulkhead.in_flight(), 1);
        let elsewhere = bulkhead.clone();
        let refused = std::thread::spawn(move || elsewhere.try_acquire().is_err());
        assert!(refused.join().unwrap(), "one slot, taken");
        drop(held);
        assert_eq!(bulkhead.in_flight(), 0);
    }

    /// Callers on four threads, eight slots, room for all to queue: none
    /// is refused (no wake-up is lost), and never more than eight run.
    #[test]
    fn threads_share_the_slots_exactly() {
        use std::sync::atomic::AtomicU32;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_time()
            .build()
            .unwrap();
        let bulkhead = Bulkhead::new(Config {
            max_concurrent: 8,
            max_queued: 1000,
            max_wait: Duration::from_secs(60),
        });
        let running = Arc::new(AtomicU32::new(0));
        let most = Arc::new(AtomicU32::new(0));
        runtime.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..64 {
                let (bulkhead, running, most) = (bulkhead.clone(), running.clone(), most.clone());
                tasks.spawn(async move {
                    for _ in 0..200 {
                        let permit = bulkhead.acquire().await.expect("a slot within the wait");
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        running.fetch_sub(1, Ordering::SeqCst);
                        drop(permit);
                    }
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.unwrap();
            }
        });
        assert!(most.load(Ordering::SeqCst) <= 8);
        assert_eq!(bulkhead.in_flight(), 0);
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
