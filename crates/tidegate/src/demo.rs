//! `tidegate demo`: a simulated upstream that fails for a while and then
//! recovers, called through a full pipeline, narrating what each policy does.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tidegate_resilience::breaker::{self, CircuitBreaker, CircuitState};
use tidegate_resilience::ratelimit::{Algorithm, Limit, Quota, RateLimiter};
use tidegate_resilience::retry::{self, Jitter, Retry};
use tidegate_resilience::Pipeline;
use tokio::time::Instant;

/// Why a simulated call failed.
#[derive(Debug)]
struct UpstreamError(&'static str);

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for UpstreamError {}

pub(crate) async fn run(quick: bool) -> anyhow::Result<()> {
    // Quick mode (used by the test script) runs the same story 4× faster.
    let scale = if quick { 4 } else { 1 };
    let ms = |n: u64| Duration::from_millis(n / scale);
    let outage = ms(2000);
    let open_duration = ms(1000);

    println!("tidegate demo: the policy library on a simulated upstream \"billing\"");
    println!(
        "billing fails every call for the first {outage:?}, then recovers.\n\
         pipeline: deadline 1s → retry (3 attempts, 20ms exponential backoff) → \
         circuit breaker (5 consecutive failures, open {open_duration:?}) → timeout 200ms\n"
    );

    let breaker = CircuitBreaker::new(breaker::Config {
        consecutive_failures: 5,
        open_duration,
        ..breaker::Config::default()
    });
    let pipeline: Pipeline<u32, UpstreamError> = Pipeline::builder()
        .deadline(Duration::from_secs(1))
        .retry(Retry::new(retry::Config {
            base_delay: Duration::from_millis(20),
            jitter: Jitter::Equal,
            ..retry::Config::default()
        }))
        .circuit_breaker(breaker.clone())
        .timeout(Duration::from_millis(200))
        .build();

    let start = Instant::now();
    let since = move || start.elapsed().as_secs_f64();
    let mut events = breaker.subscribe();
    let narrator = tokio::spawn(async move {
        while let Ok(change) = events.recv().await {
            println!(
                "[{:5.2}s] circuit breaker {} → {} ({})",
                since(),
                change.from,
                change.to.as_str().to_uppercase(),
                change.reason
            );
        }
    });

    let attempts = Arc::new(AtomicU32::new(0));
    let (mut ok, mut failed, mut rejected) = (0, 0, 0);
    let mut previous_ok = false;
    let mut call = 0;
    while start.elapsed() < outage + open_duration * 2 {
        call += 1;
        let counter = attempts.clone();
        let result = pipeline
            .call(|attempt| {
                counter.fetch_add(1, Ordering::Relaxed);
                let healthy = start.elapsed() >= outage;
                async move {
                    if healthy {
                        Ok(attempt.number())
                    } else {
                        Err(UpstreamError("503 from billing"))
                    }
                }
            })
            .await;
        previous_ok = match result {
            Ok(n) => {
                ok += 1;
                // A run of healthy calls is announced once, and any that needed a retry.
                if !previous_ok || n > 1 {
                    println!("[{:5.2}s] call {call}: ok (attempt {n})", since());
                }
                true
            }
            Err(err) if err.is_circuit_open() => {
                rejected += 1;
                let wait = err.retry_after().unwrap_or_default();
                if rejected == 1 || rejected % 10 == 0 {
                    println!(
                        "[{:5.2}s] call {call}: rejected at once, breaker open (probe in {wait:.1?})",
                        since()
                    );
                }
                false
            }
            Err(err) => {
                failed += 1;
                println!("[{:5.2}s] call {call}: failed: {err}", since());
                false
            }
        };
        tokio::time::sleep(ms(100)).await;
    }
    narrator.abort();

    let snap = breaker.snapshot();
    println!(
        "\n{call} calls: {ok} ok, {failed} failed after retries, {rejected} rejected by the open breaker \
         ({} upstream attempts in all).",
        attempts.load(Ordering::Relaxed)
    );
    println!(
        "breaker now {}: {} calls in window, failure rate {:.0}%",
        snap.state,
        snap.calls,
        snap.failure_rate * 100.0
    );
    anyhow::ensure!(
        snap.state == CircuitState::Closed,
        "the breaker should have closed again"
    );

    println!("\nrate limiter: GCRA, 5 per second, burst 5; 7 requests at once:");
    let limiter = RateLimiter::new(Limit::new(Algorithm::Gcra, Quota::per_second(5)));
    for i in 1..=7 {
        let d = limiter.check();
        println!(
            "  request {i}: {:7} X-RateLimit-Remaining: {}  Retry-After: {}",
            if d.allowed { "allowed" } else { "429" },
            d.remaining,
            d.retry_after
                .map_or("-".to_string(), |t| format!("{:.0?}", t))
        );
    }
    println!("\nthe gateway (serve, status, dashboard) is the next piece; see README.md.");
    Ok(())
}
