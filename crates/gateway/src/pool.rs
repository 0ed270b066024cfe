//! Connection-pool limits per upstream: `max_connections` open to its
//! endpoints (across every worker), `max_pending_requests` waiting for one,
//! and `max_requests_per_connection` before a connection is retired.
//!
//! The limits sit in the connector of hyper-util's pooled client: a new
//! connection takes a slot of its upstream's gate and gives it back when it
//! closes. A request that finds no idle connection and no free slot waits
//! (and takes a connection another request returns, if one comes first);
//! past `max_pending_requests` waiting it fails at once with
//! [`PoolOverflow`], a local rejection. Requests per connection are counted
//! by a marker the connector attaches to every response of the connection.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::body::BoxError;

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

    async fn enter(&self) -> Result<OwnedSemaphorePermit, PoolOverflow> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(PoolOverflow);
        }
        let _waiting = Waiting(&self.pending);
        Ok(self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed"))
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
struct Waiting<'a>(&'a AtomicUsize);

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

/// Whether `error` (or what caused it) is a [`PoolOverflow`].
pub fn is_overflow(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<PoolOverflow>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// The gates by endpoint authority, replaced on reload.
pub type Gates = Arc<ArcSwap<HashMap<Authority, Arc<PoolGate>>>>;

/// The marker on every response of a connection: how many requests it has
/// carried.
#[derive(Debug, Clone)]
pub struct Uses(Arc<AtomicU32>);

impl Uses {
    /// Counts one more request; returns the count.
    pub fn count(&self) -> u32 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// hyper-util's HTTP connector, held to the gates.
#[derive(Debug, Clone)]
pub struct Connector {
    inner: HttpConnector,
    gates: Gates,
}

impl Connector {
    /// TCP with no delay, 5 s to connect, through `gates`.
    pub fn new(gates: Gates) -> Self {
        let mut inner = HttpConnector::new();
        inner.set_nodelay(true);
        inner.set_connect_timeout(Some(Duration::from_secs(5)));
        Connector { inner, gates }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = Limited;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Limited, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let gate = uri
            .authority()
            .and_then(|a| self.gates.load().get(a).cloned());
        let connect = self.inner.call(uri);
        Box::pin(async move {
            let permit = match gate {
                Some(gate) => Some(gate.enter().await?),
                None => None,
            };
            let io = connect.await?;
            Ok(Limited {
                io,
                _permit: permit,
                uses: Uses(Arc::new(AtomicU32::new(0))),
            })
        })
    }
}

/// A connection holding its upstream's slot until it closes.
#[derive(Debug)]
pub struct Limited {
    io: TokioIo<TcpStream>,
    _permit: Option<OwnedSemaphorePermit>,
    uses: Uses,
}

impl Connection for Limited {
    fn connected(&self) -> Connected {
        self.io.connected().extra(self.uses.clone())
    }
}

impl Read for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

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
        let first = gate.enter().await.unwrap();
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.enter().await.map(drop) })
        };
        while gate.pending.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(gate.enter().await.unwrap_err(), PoolOverflow);
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(gate.pending.load(Ordering::Acquire), 0);
        assert_eq!(gate.open(), 0);
    }
}
