//! HTTP/2 rapid reset (CVE-2023-44487): a client that opens streams and
//! cancels them at once makes the gateway start work (routing, an upstream
//! request) it never gets to finish, as fast as it can send frames.
//!
//! h2 already refuses a connection whose streams are reset before they are
//! accepted. A client that waits for each stream to be accepted before
//! cancelling it gets past that, so, as Envoy does, each connection counts
//! the requests its client cancelled within [`PREMATURE`] of starting them.
//! Once there are [`LIMIT`] of them and they are more than half of its
//! requests, the connection is told to go away (GOAWAY), its new requests
//! are refused without reaching an upstream, and it is closed soon after.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// A cancellation this soon after the request started is premature.
pub const PREMATURE: Duration = Duration::from_secs(1);
/// Premature cancellations that close a connection (if they are most of its requests).
pub const LIMIT: u32 = 100;

/// One connection's count of its requests and their premature cancellations.
#[derive(Debug, Default)]
pub struct Resets {
    started: AtomicU32,
    cancelled: AtomicU32,
    tripped: AtomicBool,
    notify: Notify,
}

impl Resets {
    /// Whether the connection has been found abusive.
    pub fn tripped(&self) -> bool {
        self.tripped.load(Ordering::Relaxed)
    }

    /// Counts a request; the guard counts it as cancelled unless
    /// [`Started::finish`] is called before it is dropped.
    pub fn start(&self) -> Started<'_> {
        self.started.fetch_add(1, Ordering::Relaxed);
        Started {
            resets: self,
            at: Instant::now(),
            finished: false,
        }
    }

    /// Resolves once the connection has been found abusive.
    pub async fn abused(&self) {
        self.notify.notified().await;
    }

    fn cancelled(&self) {
        let cancelled = self.cancelled.fetch_add(1, Ordering::Relaxed) + 1;
        let started = self.started.load(Ordering::Relaxed);
        if cancelled >= LIMIT && cancelled.saturating_mul(2) > started && !self.tripped() {
            self.tripped.store(true, Ordering::Relaxed);
            self.notify.notify_one();
        }
    }
}

/// A request under way; see [`Resets::start`].
#[derive(Debug)]
pub struct Started<'a> {
    resets: &'a Resets,
    at: Instant,
    finished: bool,
}

impl Started<'_> {
    /// The request was answered.
    pub fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for Started<'_> {
    fn drop(&mut self) {
        if !self.finished && self.at.elapsed() < PREMATURE {
            self.resets.cancelled();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn trips_when_most_requests_are_cancelled_at_once() {
        let resets = Resets::default();
        for _ in 0..LIMIT {
            resets.start().finish();
            drop(resets.start());
        }
        assert!(!resets.tripped(), "half of them: not abusive");
        for _ in 0..LIMIT {
            drop(resets.start());
        }
        assert!(resets.tripped());
        resets.abused().await;
    }

    #[tokio::test(start_paused = true)]
    async fn late_cancellations_do_not_count() {
        let resets = Resets::default();
        for _ in 0..2 * LIMIT {
            let started = resets.start();
            tokio::time::advance(PREMATURE).await;
            drop(started);
        }
        assert!(!resets.tripped());
    }
}
