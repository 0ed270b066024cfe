//! A small, fast pseudo-random source for jitter, throttling, load balancing
//! and sampling.
//!
//! Not cryptographic: it only spreads load and retries apart. Each thread has its own
//! xorshift64* state seeded from the standard library's random hasher keys.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    // RandomState is seeded from the OS once per thread; mixing in a fresh
    // hash gives each thread its own stream.
    RandomState::new().hash_one(0x9E37_79B9_7F4A_7C15_u64) | 1
}

/// 64 uniformly random bits.
pub fn next_u64() -> u64 {
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// A uniform value in `[0, 1)`.
pub fn unit() -> f64 {
    // Top 53 bits into the mantissa.
    (next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// A uniform value in `[0, n)`; `n` must be above 0.
pub fn below(n: u64) -> u64 {
    // Lemire's multiply-shift: the bias is at most n / 2^64.
    ((u128::from(next_u64()) * u128::from(n)) >> 64) as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn unit_stays_in_range_and_varies() {
        let values: Vec<f64> = (0..1000).map(|_| super::unit()).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        assert!((0.4..0.6).contains(&mean), "mean {mean}");
    }

    #[test]
    fn below_stays_below_and_covers() {
        let mut seen = [0u32; 5];
        for _ in 0..5000 {
            seen[super::below(5) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }
}
