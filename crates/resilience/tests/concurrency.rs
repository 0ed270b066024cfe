//! Concurrency: many callers at once never take more than N half-open
//! probes, cancelled callers never leak a probe or a bulkhead slot, and a
//! healthy breaker's lock-free successes lose no failure recorded beside them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use tidegate_resilience::breaker::{CircuitBreaker, CircuitState, Config};
use tidegate_resilience::bulkhead::{self, Bulkhead};

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
