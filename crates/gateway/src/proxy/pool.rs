//! Connection-pool limits per upstream: `max_connections` open to its
//! endpoints (across every worker), `max_pending_requests` waiting for one,
//! and `max_requests_per_connection` before a connection is retired.
//!
//! [`crate::proxy::client`] applies them: a new connection takes a slot of its
//! upstream's gate and gives it back when it closes. A request that finds
//! no idle connection and no free slot waits (and takes a connection
//! another request returns, if one comes first); past
//! `max_pending_requests` waiting it fails at once with [`PoolOverflow`],
//! a local rejection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::uri::Authority;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `[upstreams.pool]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Connections open to the upstream's endpoints at most. Default 1024.
    pub max_connections: usize,
    /// Requests waiting for a connection at most; more are refused (503).
    /// Default 1024.
    pub max_pending_requests: usize,
    /// A connection is closed after this many requests. Default: no limit.
    pub max_requests_per_connection: Option<u32>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests_per_connection: None,
        }
    }
}

impl PoolConfig {
    /// The first problem, as (key, reason).
    pub(crate) fn problem(&self) -> Option<(&'static str, &'static str)> {
        if self.max_connections == 0 {
            Some(("max_connections", "must be at least 1"))
        } else if self.max_requests_per_connection == Some(0) {
            Some(("max_requests_per_connection", "must be at least 1"))
        } else {
            None
        }
    }
}

/// The connection slots and waiting requests of one upstream.
#[derive(Debug)]
pub struct PoolGate {
    max_connections: usize,
    slots: Arc<Semaphore>,
    max_pending: usize,
    pending: AtomicUsize,
}

impl PoolGate {
    /// A gate for `config`.
    pub fn new(config: &PoolConfig) -> Arc<Self> {
        Arc::new(PoolGate {
            max_connections: config.max_connections,
            slots: Arc::new(Semaphore::new(config.max_connections)),
            max_pending: config.max_pending_requests,
            pending: AtomicUsize::new(0),
        })
    }

    /// A free slot, if there is one now.
    pub(crate) fn try_enter(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Counts the caller as waiting for a slot until the guard drops;
    /// refuses past `max_pending_requests`.
    pub(crate) fn wait(&self) -> Result<Waiting<'_>, PoolOverflow> {
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(PoolOverflow);
        }
        Ok(Waiting(&self.pending))
    }

    /// The next free slot.
    pub(crate) async fn acquire(&self) -> OwnedSemaphorePermit {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max_connections - self.slots.available_permits()
    }

    /// Requests waiting for a connection now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }
}

/// Counts a request as pending until dropped (done or cancelled).
#[derive(Debug)]
pub(crate) struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Too many requests wait for a connection to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolOverflow;

impl std::fmt::Display for PoolOverflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("too many requests waiting for a connection")
    }
}

impl std::error::Error for PoolOverflow {}

/// The gates by endpoint authority, replaced on reload.
pub type Gates = Arc<ArcSwap<HashMap<Authority, Arc<PoolGate>>>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiting_is_bounded_and_slots_come_back() {
        let gate = PoolGate::new(&PoolConfig {
            max_connections: 1,
            max_pending_requests: 1,
            max_requests_per_connection: None,
        });
        let first = gate.try_enter().unwrap();
        assert!(gate.try_enter().is_none());
        let waiting = gate.wait().unwrap();
        assert_eq!(gate.pending(), 1);
        assert_eq!(gate.wait().unwrap_err(), PoolOverflow);
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move { drop(gate.acquire().await) })
        };
        drop(first);
        waiter.await.unwrap();
        drop(waiting);
        assert_eq!(gate.pending.load(Ordering::Acquire), 0);
        assert_eq!(gate.open(), 0);
    }
}
