//! Happy-path cost of each policy and of the whole pipeline, on one thread
//! and with two threads contending, next to `governor` (rate limiter) and
//! `failsafe` (circuit breaker) measured in the same run.
//!
//! Run: `cargo bench -p tidegate-resilience --bench policies --features quanta`
//! (without the feature, the rows of the TSC clock are left out).
//!
//! The `*_at` rows pass a `now` read once per request (as the pipeline and
//! the gateway do), so they show the decision's own cost; the reference
//! `governor` row for them uses its fake clock.

// A benchmark measures wall time, on purpose.
#![allow(clippy::disallowed_types)]

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::pin;
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use tidegate_resilience::breaker::{CircuitBreaker, Outcome};
use tidegate_resilience::bulkhead::Bulkhead;
use tidegate_resilience::ratelimit::{
    Algorithm, KeyedConfig, KeyedRateLimiter, Limit, Quota, RateLimiter,
};
use tidegate_resilience::retry::Retry;
use tidegate_resilience::timeout::Timeout;
use tidegate_resilience::Pipeline;

/// Polls a future that completes without waiting, with no executor in the way.
fn now_or_never<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the happy path never waits"),
    }
}

/// Runs `op` `iters` times on this thread while one more thread does the
/// same on the same shared state; reports this thread's time. The other
/// thread runs a runtime of its own, as the gateway's workers do: what
/// the two share is the state, not a timer.
fn contended<S: Send + Sync + 'static>(
    iters: u64,
    shared: &Arc<S>,
    op: fn(&S),
    _rt: &tokio::runtime::Runtime,
) -> Duration {
    let barrier = Arc::new(Barrier::new(2));
    let other = {
        let (shared, barrier) = (shared.clone(), barrier.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let _enter = runtime.enter();
            barrier.wait();
            for _ in 0..iters {
                op(&shared);
            }
        })
    };
    barrier.wait();
    let start = Instant::now();
    for _ in 0..iters {
        op(shared);
    }
    let elapsed = start.elapsed();
    other.join().unwrap();
    elapsed
}

fn huge() -> Quota {
    Quota::per_second(1_000_000_000)
}

fn gov_quota() -> governor::Quota {
    governor::Quota::per_second(NonZeroU32::new(1_000_000_000).unwrap())
}

type GovDirect = governor::DefaultDirectRateLimiter;

fn failsafe_breaker() -> impl failsafe::CircuitBreaker + Send + Sync {
    failsafe::Config::new().build()
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _enter = rt.enter();

    // What the policies are made of, for reading the figures below.
    let mut g = c.benchmark_group("primitive");
    g.bench_function("tokio_instant_now", |b| {
        b.iter(|| black_box(tokio::time::Instant::now()))
    });
    g.bench_function("std_instant_now", |b| {
        b.iter(|| black_box(std::time::Instant::now()))
    });
    let mutex = std::sync::Mutex::new(0u64);
    g.bench_function("mutex_lock_unlock", |b| {
        b.iter(|| *mutex.lock().unwrap() += 1)
    });
    g.finish();

    let mut g = c.benchmark_group("breaker");
    let breaker = Arc::new(CircuitBreaker::default());
    g.bench_function("tidegate/guard", |b| {
        b.iter(|| breaker.try_acquire().unwrap().success())
    });
    let t0 = tokio::time::Instant::now();
    g.bench_function("tidegate/guard_at", |b| {
        b.iter(|| {
            breaker
                .try_acquire_at(t0)
                .unwrap()
                .record_at(Outcome::Success, t0)
        })
    });
    g.bench_function("tidegate/call", |b| {
        b.iter(|| now_or_never(breaker.call(|| async { Ok::<_, ()>(black_box(1)) })))
    });
    let reference = Arc::new(failsafe_breaker());
    g.bench_function("failsafe/call", |b| {
        use failsafe::CircuitBreaker as _;
        b.iter(|| reference.call(|| Ok::<_, ()>(black_box(1))))
    });
    g.bench_function("tidegate/guard/2-threads", |b| {
        b.iter_custom(|n| contended(n, &breaker, |b| b.try_acquire().unwrap().success(), &rt))
    });
    g.bench_function("failsafe/call/2-threads", |b| {
        b.iter_custom(|n| {
            contended(
                n,
                &reference,
                |r| {
                    use failsafe::CircuitBreaker as _;
                    let _ = r.call(|| Ok::<_, ()>(black_box(1)));
                },
                &rt,
            )
        })
    });
    g.finish();

    let mut g = c.benchmark_group("rate_limiter");
    let gcra = Arc::new(RateLimiter::new(Limit::new(Algorithm::Gcra, huge())));
    let governor = Arc::new(GovDirect::direct(gov_quota()));
    g.bench_function("tidegate/gcra", |b| b.iter(|| black_box(gcra.check())));
    // Admitted or refused, as governor's `check` answers; a refusal carries
    // the whole decision.
    g.bench_function("tidegate/gcra_admit", |b| {
        b.iter(|| black_box(gcra.admit()))
    });
    g.bench_function("governor/direct", |b| {
        b.iter(|| black_box(governor.check()))
    });
    // On governor's default clock, the CPU's time-stamp counter.
    #[cfg(feature = "quanta")]
    {
        use tidegate_resilience::ratelimit::TscClock;
        let tsc = RateLimiter::with_clock(Limit::new(Algorithm::Gcra, huge()), TscClock::new());
        g.bench_function("tidegate/gcra_admit_tsc_clock", |b| {
            b.iter(|| black_box(tsc.admit()))
        });
        g.bench_function("tidegate/gcra_tsc_clock", |b| {
            b.iter(|| black_box(tsc.check()))
        });
    }
    // The same clock as tidegate's (std's monotonic clock, which tokio's
    // Instant reads): the fair comparison of the limiters themselves.
    let governor_std =
        governor::RateLimiter::direct_with_clock(gov_quota(), governor::clock::MonotonicClock);
    g.bench_function("governor/direct_std_clock", |b| {
        b.iter(|| black_box(governor_std.check()))
    });
    // The decision alone, time given and fixed, on both sides: a quota of
    // 2^32 per second admits every iteration at one instant.
    let roomy = RateLimiter::new(Limit::new(Algorithm::Gcra, Quota::per_second(u32::MAX)));
    let now = tokio::time::Instant::now();
    g.bench_function("tidegate/gcra_at", |b| {
        b.iter(|| black_box(roomy.check_at(now, 1)))
    });
    g.bench_function("tidegate/gcra_admit_at", |b| {
        b.iter(|| black_box(roomy.admit_at(now, 1)))
    });
    let governor_fake = governor::RateLimiter::direct_with_clock(
        governor::Quota::per_second(NonZeroU32::MAX),
        governor::clock::FakeRelativeClock::default(),
    );
    g.bench_function("governor/direct_fake_clock", |b| {
        b.iter(|| black_box(governor_fake.check()))
    });
    for algorithm in [
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
        Algorithm::TokenBucket,
    ] {
        let limiter = RateLimiter::new(Limit::new(algorithm, huge()));
        g.bench_function(format!("tidegate/{}", algorithm.as_str()), |b| {
            b.iter(|| black_box(limiter.check()))
        });
    }
    g.bench_function("tidegate/gcra/2-threads", |b| {
        b.iter_custom(|n| {
            contended(
                n,
                &gcra,
                |l| {
                    black_box(l.check());
                },
                &rt,
            )
        })
    });
    g.bench_function("governor/direct/2-threads", |b| {
        b.iter_custom(|n| {
            contended(
                n,
                &governor,
                |l| {
                    let _ = black_box(l.check());
                },
                &rt,
            )
        })
    });
    let keyed = KeyedRateLimiter::new(Limit::new(Algorithm::Gcra, huge()), KeyedConfig::default());
    let gov_keyed = governor::DefaultKeyedRateLimiter::<String>::keyed(gov_quota());
    let keys: Vec<String> = (0..1000)
        .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
        .collect();
    let mut i = 0;
    g.bench_function("tidegate/keyed_gcra", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(keyed.check(&keys[i]))
        })
    });
    g.bench_function("governor/keyed", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(gov_keyed.check_key(&keys[i]))
        })
    });
    let gov_keyed_std = governor::RateLimiter::<String, _, _, _>::hashmap_with_clock(
        gov_quota(),
        governor::clock::MonotonicClock,
    );
    g.bench_function("governor/keyed_std_clock", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(gov_keyed_std.check_key(&keys[i]))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("policy");
    let bulkhead = Arc::new(Bulkhead::default());
    g.bench_function("bulkhead/try_acquire", |b| {
        b.iter(|| drop(black_box(bulkhead.try_acquire().unwrap())))
    });
    g.bench_function("bulkhead/2-threads", |b| {
        b.iter_custom(|n| contended(n, &bulkhead, |b| drop(black_box(b.try_acquire())), &rt))
    });
    let retry = Retry::default();
    g.bench_function("retry/call", |b| {
        b.iter(|| now_or_never(retry.call(|_| async { Ok::<_, ()>(black_box(1)) })))
    });
    let timeout = Timeout::new(Duration::from_secs(10));
    g.bench_function("timeout/call", |b| {
        b.iter(|| now_or_never(timeout.call(|| async { Ok::<_, ()>(black_box(1)) })))
    });
    g.finish();

    let mut g = c.benchmark_group("pipeline");
    let pipeline: Arc<Pipeline<u32, ()>> = Arc::new(
        Pipeline::builder()
            .deadline(Duration::from_secs(30))
            .retry(Retry::default())
            .circuit_breaker(CircuitBreaker::default())
            .rate_limiter(Arc::new(RateLimiter::new(Limit::new(
                Algorithm::Gcra,
                huge(),
            ))))
            .bulkhead(Bulkhead::default())
            .timeout(Duration::from_secs(10))
            .build(),
    );
    g.bench_function("full", |b| {
        b.iter(|| now_or_never(pipeline.call(|_| async { Ok(black_box(1)) })))
    });
    g.bench_function("full/2-threads", |b| {
        b.iter_custom(|n| {
            contended(
                n,
                &pipeline,
                |p| drop(now_or_never(p.call(|_| async { Ok(black_box(1)) }))),
                &rt,
            )
        })
    });
    // The gateway's default policies for an upstream: no rate limiter,
    // whose one shared arrival time every thread writes.
    let defaults: Arc<Pipeline<u32, ()>> = Arc::new(
        Pipeline::builder()
            .deadline(Duration::from_secs(30))
            .retry(Retry::default())
            .circuit_breaker(CircuitBreaker::default())
            .bulkhead(Bulkhead::default())
            .timeout(Duration::from_secs(10))
            .build(),
    );
    g.bench_function("defaults", |b| {
        b.iter(|| now_or_never(defaults.call(|_| async { Ok(black_box(1)) })))
    });
    g.bench_function("defaults/2-threads", |b| {
        b.iter_custom(|n| {
            contended(
                n,
                &defaults,
                |p| drop(now_or_never(p.call(|_| async { Ok(black_box(1)) }))),
                &rt,
            )
        })
    });
    g.finish();
}

criterion_group! {
    name = policies;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(policies);
