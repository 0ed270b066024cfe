//! The happy path of a full pipeline allocates nothing (counting allocator).

// A global allocator is unsafe to implement; this one only forwards to `System`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tidegate_resilience::breaker::CircuitBreaker;
use tidegate_resilience::bulkhead::Bulkhead;
use tidegate_resilience::ratelimit::{Algorithm, Limit, Quota, RateLimiter};
use tidegate_resilience::retry::Retry;
use tidegate_resilience::throttle::AdaptiveThrottle;
use tidegate_resilience::Pipeline;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Only the test's own thread counts: the test harness keeps working on
    // its main thread while the test runs, and on a busy machine that work
    // overlaps the measured loop. The runtime is current-thread, so every
    // allocation the pipeline could make happens here.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
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
        COUNTING.with(|c| c.set(true));
        for i in 0..10_000 {
            let got = pipeline.call(|_| async move { Ok(i) }).await;
            assert!(matches!(got, Ok(n) if n == i));
        }
        COUNTING.with(|c| c.set(false));
    });
    assert_eq!(
        ALLOCATIONS.load(Ordering::SeqCst),
        0,
        "allocations on the happy path"
    );
}
