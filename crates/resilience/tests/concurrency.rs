//! Concurrency: many callers at once never take more than N half-open
//! probes, cancelled callers never leak a probe or a bulkhead slot, a
//! healthy breaker's lock-free successes lose no failure recorded beside
//! them, and threads leasing a rate limiter's time never pass its quota.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use tidegate_resilience::breaker::{CircuitBreaker, CircuitState, Config};
use tidegate_resilience::bulkhead::{self, Bulkhead};
use tidegate_resilience::ratelimit::{Algorithm, Clock, Limit, LimiterState, Quota, RateLimiter};

const CALLERS: usize = 64;
const PROBES: u32 = 3;

fn half_open_breaker() -> CircuitBreaker {
    let breaker = CircuitBreaker::new(Config {
        consecutive_failures: 1,
        half_open_probes: PROBES,
        // Expires at once: the next caller finds the breaker half-open.
        open_duration: Duration::from_nanos(1),
        ..Config::default()
    });
    breaker.try_acquire().unwrap().failure();
    breaker
}

#[test]
fn exactly_n_probes_among_64_threads_and_drops_give_them_back() {
    let breaker = half_open_breaker();
    let start = Arc::new(Barrier::new(CALLERS));
    let counted = Arc::new(Barrier::new(CALLERS));
    let admitted = Arc::new(AtomicUsize::new(0));
    let rounds = 200;
    let threads: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (breaker, start, counted, admitted) = (
                breaker.clone(),
                start.clone(),
                counted.clone(),
                admitted.clone(),
            );
            std::thread::spawn(move || {
                let mut mine = 0;
                for _ in 0..rounds {
                    start.wait();
                    let permit = breaker.try_acquire().ok();
                    if permit.is_some() {
                        admitted.fetch_add(1, Ordering::SeqCst);
                        mine += 1;
                    }
                    // Everyone holds (or not) until all have tried; then the
                    // holders drop their permits unrecorded, like a cancelled call.
                    counted.wait();
                    drop(permit);
                }
                mine
            })
        })
        .collect();
    let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(
        total,
        rounds * PROBES as usize,
        "exactly {PROBES} probes per round"
    );
    assert_eq!(admitted.load(Ordering::SeqCst), total);
    assert_eq!(breaker.state(), CircuitState::HalfOpen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_tasks_never_leak_probes_or_slots() {
    let breaker = half_open_breaker();
    let bulkhead = Bulkhead::new(bulkhead::Config {
        max_concurrent: 4,
        max_queued: CALLERS as u32,
        max_wait: Duration::from_secs(3600),
    });
    for _ in 0..20 {
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(CALLERS);
        let tasks: Vec<_> = (0..CALLERS)
            .map(|_| {
                let (breaker, bulkhead, ready) =
                    (breaker.clone(), bulkhead.clone(), ready_tx.clone());
                tokio::spawn(async move {
                    let probe = breaker.try_acquire().ok();
                    let _ = ready.send(()).await;
                    let _slot = bulkhead.acquire().await;
                    let _probe = probe;
                    std::future::pending::<()>().await;
                })
            })
            .collect();
        for _ in 0..CALLERS {
            ready_rx.recv().await.unwrap();
        }
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            assert!(task.await.unwrap_err().is_cancelled());
        }
        assert_eq!(bulkhead.in_flight(), 0, "slots leaked");
        assert_eq!(bulkhead.queued(), 0, "queue places leaked");
        let probes: Vec<_> = std::iter::from_fn(|| breaker.try_acquire().ok())
            .take(10)
            .collect();
        assert_eq!(probes.len(), PROBES as usize, "probe slots leaked");
    }
}

/// Successes in a quiet breaker skip its lock; failures take it. Threads
/// doing both at once: every failure is still in the window (it is too
/// large for any to leave), and the window is still full.
#[test]
fn lock_free_successes_lose_no_failure_recorded_beside_them() {
    const WINDOW: u32 = 100_000;
    const FAILURES: u32 = 50;
    let breaker = CircuitBreaker::new(Config {
        consecutive_failures: 0,
        failure_rate: 1.0,
        minimum_calls: WINDOW,
        window_size: WINDOW,
        ..Config::default()
    });
    for _ in 0..WINDOW {
        breaker.try_acquire().unwrap().success();
    }
    let start = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let (breaker, start) = (breaker.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                if i == 0 {
                    for _ in 0..FAILURES {
                        breaker.try_acquire().unwrap().failure();
                        for _ in 0..100 {
                            breaker.try_acquire().unwrap().success();
                        }
                    }
                } else {
                    for _ in 0..10_000 {
                        breaker.try_acquire().unwrap().success();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let snapshot = breaker.snapshot();
    assert_eq!(snapshot.state, CircuitState::Closed);
    assert_eq!(snapshot.calls, WINDOW);
    assert_eq!(snapshot.failure_count, FAILURES);
}

thread_local! {
    /// The time a thread's next rate-limit decision is judged at.
    static JUDGED_AT: Cell<u64> = const { Cell::new(0) };
}

/// Each thread's own time, which the thread sets before it asks.
#[derive(Debug)]
struct ThreadTime;

impl Clock for ThreadTime {
    fn now_nanos(&self) -> u64 {
        JUDGED_AT.with(Cell::get)
    }
}

/// Two threads share a GCRA limiter fast enough that each leases runs
/// of its time, first asking for four times its rate, then for half:
/// whatever their interleaving, no stretch of time admits more than the
/// burst and the stretch's rate, as GCRA promises, and leases do not
/// starve them of what the rate allows.
#[test]
fn two_threads_leasing_never_admit_past_the_quota() {
    const OPS: u64 = 100_000;
    let quota = Quota {
        limit: 1_000_000,
        period: Duration::from_secs(1),
        burst: Some(20_000),
    };
    let (interval, burst) = (1_000, 20_000);
    let limiter = Arc::new(RateLimiter::with_clock(
        Limit::new(Algorithm::Gcra, quota),
        ThreadTime,
    ));
    let clock = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(2));
    let threads: Vec<_> = (0..2u64)
        .map(|i| {
            let (limiter, clock, start) = (limiter.clone(), clock.clone(), start.clone());
            std::thread::spawn(move || {
                let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (i + 1);
                let mut random = move || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                let mut asked = Vec::new();
                start.wait();
                for op in 0..OPS {
                    // Each step half an interval on average, then four.
                    let most = if op < OPS / 2 { interval } else { 8 * interval };
                    let at = clock.fetch_add(random() % most, Ordering::Relaxed);
                    let cost = 1 + (random() % 3) as u32;
                    JUDGED_AT.with(|now| now.set(at));
                    asked.push((at, cost, limiter.check_n(cost).allowed));
                }
                asked
            })
        })
        .collect();
    let mut asked: Vec<(u64, u32, bool)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    asked.sort_unstable();
    let admitted = asked
        .iter()
        .filter(|&&(_, _, allowed)| allowed)
        .map(|&(at, cost, _)| (at, u64::from(cost)));
    // Units admitted from the i-th to the j-th at most the burst and what
    // the interval between their times allows:
    // (units through j - units before i) × interval - (t_j - t_i) ≤ burst × interval.
    let (mut units, mut lowest) = (0u64, i128::MAX);
    for (at, cost) in admitted {
        lowest = lowest.min(i128::from(units * interval) - i128::from(at));
        units += cost;
        let excess = i128::from(units * interval) - i128::from(at) - lowest;
        assert!(
            excess <= i128::from(burst * interval),
            "{} ns of units past the quota by {at}",
            excess - i128::from(burst * interval)
        );
    }
    // GCRA on one TAT, asked the same in time order.
    let mut gcra = LimiterState::new(Algorithm::Gcra, &quota, 0);
    let exact: u64 = asked
        .iter()
        .filter(|&&(at, cost, _)| gcra.check(&quota, at, cost).allowed)
        .map(|&(_, cost, _)| u64::from(cost))
        .sum();
    assert!(
        units * 100 >= exact * 98,
        "{units} units admitted, where one TAT admits {exact}"
    );
}
