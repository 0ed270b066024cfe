//! The happy path of a full pipeline allocates nothing (counting allocator).

// A global allocator is unsafe to implement; this one only forwards to `System`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tidegate_resilience::breaker::CircuitBreaker;
use tidegate_resilience::bulkhead::Bulkhead;
use tidegate_resilience::ratelimit::{Algorithm, Limit, Quota, RateLimiter};
use tidegate_resilience::retry::Retry;
use tidegate_resilience::throttle::AdaptiveThrottle;
use tidegate_resilience::Pipeline;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn full_pipeline_happy_path_does_not_allocate() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let pipeline: Pipeline<u64, std::io::Error> = Pipeline::builder()
            .deadline(Duration::from_secs(30))
            .retry(Retry::default())
            .circuit_breaker(CircuitBreaker::default())
            .adaptive_throttle(Arc::new(AdaptiveThrottle::default()))
            .rate_limiter(Arc::new(RateLimiter::new(Limit::new(
                Algorithm::Gcra,
                Quota::per_second(1_000_000_000),
            ))))
            .bulkhead(Bulkhead::default())
            .timeout(Duration::from_secs(10))
            .build();
        // Warm up: thread-locals, the timer wheel, first-use buffers.
        for i in 0..100 {
            assert_eq!(pipeline.call(|_| async move { Ok(i) }).await.unwrap(), i);
        }
        COUNTING.store(true, Ordering::SeqCst);
        for i in 0..10_000 {
            let got = pipeline.call(|_| async move { Ok(i) }).await;
            assert!(matches!(got, Ok(n) if n == i));
        }
        COUNTING.store(false, Ordering::SeqCst);
    });
    assert_eq!(
        ALLOCATIONS.load(Ordering::SeqCst),
        0,
        "allocations on the happy path"
    );
}
