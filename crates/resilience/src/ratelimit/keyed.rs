//! Limiter state per key (client IP, API key, header) with bounded memory.
//!
//! At most `max_keys` keys are kept. When a shard is full, keys idle for
//! `idle_timeout` (or whose state is as good as fresh) are dropped first; if
//! none are, the least recently seen of a small sample goes. Forgetting a key
//! can only give that key its full quota back; it never blocks anyone.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::future::{ready, Future};
use std::hash::BuildHasher;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use super::{nanos_since, Decision, Limit, LimiterState, Quota, RateLimited, Store, StoreError};

/// Memory bounds of a keyed limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyedConfig {
    /// Most keys kept at once. Default 100 000.
    pub max_keys: usize,
    /// A key unseen this long may be dropped. Default 10 min.
    pub idle_timeout: Duration,
}

impl Default for KeyedConfig {
    fn default() -> Self {
        KeyedConfig {
            max_keys: 100_000,
            idle_timeout: Duration::from_secs(600),
        }
    }
}

const SHARDS: usize = 16;
/// How many entries are looked at to pick one to evict.
const EVICTION_SAMPLE: usize = 8;

#[derive(Debug)]
struct Entry {
    state: LimiterState,
    last_seen: u64,
}

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<Box<str>, Entry>,
    last_sweep: u64,
}

/// Limiter state per key, in this process. The limit is given per call, so
/// one store can serve many routes and a changed quota keeps the counts.
#[derive(Debug)]
pub struct LocalStore {
    origin: Instant,
    /// `idle_timeout` in nanoseconds, the unit of entry timestamps.
    idle: u64,
    per_shard: usize,
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
}

impl Default for LocalStore {
    fn default() -> Self {
        LocalStore::new(KeyedConfig::default())
    }
}

impl LocalStore {
    /// An empty store.
    pub fn new(config: KeyedConfig) -> Self {
        LocalStore {
            origin: Instant::now(),
            per_shard: config.max_keys.div_ceil(SHARDS).max(1),
            idle: crate::nanos(config.idle_timeout),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, Shard> {
        let index = self.hasher.hash_one(key) as usize % SHARDS;
        self.shards[index].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides on a request of `cost` units for `key` under `limit`.
    pub fn check_now(&self, key: &str, limit: &Limit, cost: u32) -> Decision {
        let now = nanos_since(self.origin, Instant::now());
        let mut shard = self.shard(key);
        if let Some(entry) = shard.map.get_mut(key) {
            if entry.state.algorithm() != limit.algorithm {
                entry.state = LimiterState::new(limit.algorithm, &limit.quota, now);
            }
            entry.last_seen = now;
            return entry.state.check(&limit.quota, now, cost);
        }
        if shard.map.len() >= self.per_shard {
            self.make_room(&mut shard, &limit.quota, now);
        }
        let mut state = LimiterState::new(limit.algorithm, &limit.quota, now);
        let decision = state.check(&limit.quota, now, cost);
        shard.map.insert(
            key.into(),
            Entry {
                state,
                last_seen: now,
            },
        );
        decision
    }

    fn make_room(&self, shard: &mut Shard, quota: &Quota, now: u64) {
        let idle = self.idle;
        // A full sweep at most once a second per shard keeps floods of new keys cheap.
        if now.saturating_sub(shard.last_sweep) >= 1_000_000_000 || shard.last_sweep == 0 {
            shard.last_sweep = now.max(1);
            shard.map.retain(|_, e| {
                now.saturating_sub(e.last_seen) < idle && !e.state.is_idle(quota, now)
            });
        }
        if shard.map.len() < self.per_shard {
            return;
        }
        let oldest = shard
            .map
            .iter()
            .take(EVICTION_SAMPLE)
            .min_by_key(|(_, e)| e.last_seen)
            .map(|(k, _)| k.clone());
        if let Some(key) = oldest {
            shard.map.remove(&key);
        }
    }

    /// Drops every key idle for `idle_timeout`; call it now and then.
    pub fn sweep(&self) {
        let now = nanos_since(self.origin, Instant::now());
        let idle = self.idle;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard
                .map
                .retain(|_, e| now.saturating_sub(e.last_seen) < idle);
        }
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).map.len())
            .sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Store for LocalStore {
    fn check(
        &self,
        key: &str,
        limit: &Limit,
        cost: u32,
    ) -> impl Future<Output = Result<Decision, StoreError>> + Send {
        ready(Ok(self.check_now(key, limit, cost)))
    }
}

/// A limiter per key, all under one [`Limit`] that can change at runtime.
///
/// ```
/// use tidegate_resilience::ratelimit::{Algorithm, KeyedConfig, KeyedRateLimiter, Limit, Quota};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let limiter = KeyedRateLimiter::new(
///     Limit::new(Algorithm::FixedWindow, Quota::per_minute(1)),
///     KeyedConfig::default(),
/// );
/// assert!(limiter.check("10.0.0.1").allowed);
/// assert!(!limiter.check("10.0.0.1").allowed);
/// assert!(limiter.check("10.0.0.2").allowed, "each key has its own quota");
/// # }
/// ```
#[derive(Debug)]
pub struct KeyedRateLimiter {
    limit: RwLock<Limit>,
    store: LocalStore,
}

impl KeyedRateLimiter {
    /// Every key gets `limit`.
    pub fn new(limit: Limit, config: KeyedConfig) -> Self {
        KeyedRateLimiter {
            limit: RwLock::new(limit),
            store: LocalStore::new(config),
        }
    }

    /// The limit in force.
    pub fn limit(&self) -> Limit {
        *self.limit.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the quota for every key; counts are kept.
    pub fn set_quota(&self, quota: Quota) {
        self.limit.write().unwrap_or_else(|p| p.into_inner()).quota = quota;
    }

    /// Decides on one request for `key`.
    pub fn check(&self, key: &str) -> Decision {
        self.check_n(key, 1)
    }

    /// Decides on a request of `cost` units for `key`.
    pub fn check_n(&self, key: &str, cost: u32) -> Decision {
        let limit = self.limit();
        self.store.check_now(key, &limit, cost)
    }

    /// The decision as a result: `Err` when denied.
    pub fn try_acquire(&self, key: &str) -> Result<Decision, RateLimited> {
        self.check(key).into_result()
    }

    /// The store behind it (for its size, or to sweep it).
    pub fn store(&self) -> &LocalStore {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::Algorithm;

    #[tokio::test(start_paused = true)]
    async fn memory_stays_bounded_under_a_flood_of_keys() {
        let limiter = KeyedRateLimiter::new(
            Limit::new(Algorithm::Gcra, Quota::per_minute(10)),
            KeyedConfig {
                max_keys: 64,
                idle_timeout: Duration::from_secs(60),
            },
        );
        for i in 0..10_000 {
            assert!(limiter.check(&format!("client-{i}")).allowed);
        }
        assert!(limiter.store().len() <= 64 + SHARDS);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keys_are_swept() {
        let limiter = KeyedRateLimiter::new(
            Limit::new(Algorithm::FixedWindow, Quota::per_second(1)),
            KeyedConfig {
                max_keys: 100,
                idle_timeout: Duration::from_secs(5),
            },
        );
        limiter.check("a");
        limiter.check("b");
        tokio::time::advance(Duration::from_secs(5)).await;
        limiter.check("b");
        limiter.store().sweep();
        assert_eq!(limiter.store().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn quota_change_keeps_counts() {
        let limiter = KeyedRateLimiter::new(
            Limit::new(Algorithm::FixedWindow, Quota::per_minute(2)),
            KeyedConfig::default(),
        );
        assert!(limiter.check("k").allowed);
        assert!(limiter.check("k").allowed);
        limiter.set_quota(Quota::per_minute(3));
        let d = limiter.check("k");
        assert!(d.allowed);
        assert_eq!(d.remaining, 0, "the two earlier requests still count");
    }
}
