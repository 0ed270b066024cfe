//! Limiter state per key (client IP, API key, header) with bounded memory.
//!
//! At most `max_keys` keys are kept. When a shard is full, keys idle for
//! `idle_timeout` (or whose state is as good as fresh) are dropped first; if
//! none are, the least recently seen of a small sample goes. Forgetting a key
//! can only give that key its full quota back; it never blocks anyone.
//!
//! A key is hashed once, with a per-store random SipHash key; the hash picks
//! the shard and is the map's key, and the entry keeps the key itself to
//! tell two keys with the same 64-bit hash apart (the newcomer replaces the
//! other, which is forgotten as if evicted).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::future::{ready, Future};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::algorithm::GcraTerms;
use super::{
    Algorithm, Clock, Decision, Limit, LimiterState, Quota, RateLimited, Store, StoreError,
    TokioClock,
};

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
    key: Box<str>,
    state: LimiterState,
    last_seen: u64,
}

/// The map's keys are already SipHash values: use them as they are.
#[derive(Debug, Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<u64, Entry, BuildHasherDefault<Prehashed>>,
    last_sweep: u64,
    /// GCRA's terms for the quota last seen here, so a steady quota costs
    /// no division per request.
    terms: Option<(Quota, GcraTerms)>,
}

impl Shard {
    fn terms(&mut self, quota: &Quota) -> GcraTerms {
        match self.terms {
            Some((seen, terms)) if seen == *quota => terms,
            _ => {
                let terms = GcraTerms::new(quota);
                self.terms = Some((*quota, terms));
                terms
            }
        }
    }
}

/// Limiter state per key, in this process. The limit is given per call, so
/// one store can serve many routes and a changed quota keeps the counts.
#[derive(Debug)]
pub struct LocalStore {
    clock: TokioClock,
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
            clock: TokioClock::new(),
            per_shard: config.max_keys.div_ceil(SHARDS).max(1),
            idle: crate::nanos(config.idle_timeout),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    /// The key's hash and its locked shard. The shard comes from bits the
    /// map itself does not use (it takes the low bits and the top seven).
    fn shard(&self, key: &str) -> (u64, std::sync::MutexGuard<'_, Shard>) {
        let hash = self.hasher.hash_one(key);
        let index = (hash >> 32) as usize % SHARDS;
        let shard = self.shards[index].lock().unwrap_or_else(|p| p.into_inner());
        (hash, shard)
    }

    /// Decides on a request of `cost` units for `key` under `limit`.
    pub fn check_now(&self, key: &str, limit: &Limit, cost: u32) -> Decision {
        let now = self.clock.now_nanos();
        let (hash, mut shard) = self.shard(key);
        let terms = shard.terms(&limit.quota);
        if let Some(entry) = shard.map.get_mut(&hash) {
            if *entry.key != *key {
                // Another key with the same hash: forget it, as eviction would.
                entry.key = key.into();
                entry.state = LimiterState::new(limit.algorithm, &limit.quota, now);
            } else if entry.state.algorithm() != limit.algorithm {
                entry.state = LimiterState::new(limit.algorithm, &limit.quota, now);
            }
            entry.last_seen = now;
            return entry.state.check_with(&limit.quota, &terms, now, cost);
        }
        if shard.map.len() >= self.per_shard {
            self.make_room(&mut shard, &limit.quota, now);
        }
        let mut state = LimiterState::new(limit.algorithm, &limit.quota, now);
        let decision = state.check_with(&limit.quota, &terms, now, cost);
        shard.map.insert(
            hash,
            Entry {
                key: key.into(),
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
            .map(|(&hash, _)| hash);
        if let Some(hash) = oldest {
            shard.map.remove(&hash);
        }
    }

    /// Drops every key idle for `idle_timeout`; call it now and then.
    pub fn sweep(&self) {
        let now = self.clock.now_nanos();
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
    limit: SharedLimit,
    store: LocalStore,
}

/// A limit read on every request without a lock. A read racing a quota
/// change may pair the new limit with the old period once.
#[derive(Debug)]
struct SharedLimit {
    algorithm: Algorithm,
    /// The quota's limit in the high half, its burst (0 for none) in the low.
    rate: AtomicU64,
    period: AtomicU64,
    /// Serialises writers, so two changes never leave a mix behind.
    changing: Mutex<()>,
}

impl SharedLimit {
    fn new(limit: Limit) -> Self {
        let shared = SharedLimit {
            algorithm: limit.algorithm,
            rate: AtomicU64::new(0),
            period: AtomicU64::new(0),
            changing: Mutex::new(()),
        };
        shared.set(limit.quota);
        shared
    }

    fn load(&self) -> Limit {
        let rate = self.rate.load(Ordering::Relaxed);
        let burst = rate as u32;
        let quota = Quota {
            limit: (rate >> 32) as u32,
            period: Duration::from_nanos(self.period.load(Ordering::Relaxed)),
            burst: (burst != 0).then_some(burst),
        };
        Limit::new(self.algorithm, quota)
    }

    fn set(&self, quota: Quota) {
        let _changing = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let rate = u64::from(quota.limit) << 32 | u64::from(quota.burst.unwrap_or(0));
        self.rate.store(rate, Ordering::Relaxed);
        self.period.store(quota.period_nanos(), Ordering::Relaxed);
    }
}

impl KeyedRateLimiter {
    /// Every key gets `limit`.
    pub fn new(limit: Limit, config: KeyedConfig) -> Self {
        KeyedRateLimiter {
            limit: SharedLimit::new(limit),
            store: LocalStore::new(config),
        }
    }

    /// The limit in force.
    pub fn limit(&self) -> Limit {
        self.limit.load()
    }

    /// Changes the quota for every key; counts are kept.
    pub fn set_quota(&self, quota: Quota) {
        self.limit.set(quota);
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
    async fn a_key_sharing_a_hash_replaces_the_other_instead_of_using_its_state() {
        let limit = Limit::new(Algorithm::FixedWindow, Quota::per_minute(1));
        let store = LocalStore::default();
        assert!(store.check_now("k", &limit, 1).allowed);
        assert!(!store.check_now("k", &limit, 1).allowed);
        // Make "k"'s slot look like it belongs to another key with the same hash.
        let (hash, mut shard) = store.shard("k");
        shard.map.get_mut(&hash).unwrap().key = "other".into();
        drop(shard);
        assert!(store.check_now("k", &limit, 1).allowed, "fresh state for k");
        let (hash, shard) = store.shard("k");
        assert_eq!(&*shard.map[&hash].key, "k");
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
