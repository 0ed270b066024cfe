//! The upstream HTTP client: a pool of keep-alive HTTP/1.1 connections, and
//! of multiplexed HTTP/2 ones, over hyper's connection API, one per worker
//! thread.
//!
//! Each connection is one hyper `http1` connection task on the runtime that
//! opened it; the pool keeps its request handle while it is idle. A request
//! takes the most recently used idle connection to its endpoint, or opens
//! one within the endpoint's [`PoolGate`]. The connection goes back to the
//! pool when the response body ends (no task is spawned per request, and
//! no request waits behind another's body); a body dropped before its end
//! takes the connection with it, since what is left of it cannot be
//! skipped. A request that a reused connection turned out to be closed for
//! before it was written goes to the next one, whatever its method: nothing
//! of it was sent.
//!
//! Idle connections close after 30 to 60 s without a request (a sweep
//! every 30 s closes those that were already idle at the previous one).
//!
//! An HTTP/2 endpoint has one connection per worker, which every request
//! to it shares (h2c with prior knowledge): a request waits for a stream
//! while the server's `SETTINGS_MAX_CONCURRENT_STREAMS` are in use, and
//! a new connection opens only when the last one closed, went away
//! (GOAWAY) or carried `max_uses` requests. A request the connection
//! refused before sending anything goes to a new one.
//!
//! An `https://` endpoint's connections are TLS ([`super::tls`]); with
//! `protocol = "auto"` the first connection's ALPN answer decides the
//! version for the endpoint's pool. A failed TLS handshake is counted
//! each time and logged once until one succeeds again.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use http::header::{HeaderValue, HOST, UPGRADE};
use http::uri::Authority;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit};

use crate::config::UpstreamProtocol;
use crate::http::body::{BoxError, ProxyBody};
use crate::http::fields;
use crate::proxy::deadline::Deadlines;
use crate::proxy::h1::{self, Stream};
use crate::proxy::pool::{Gates, PoolGate, PoolOverflow};
use crate::proxy::tls::ClientTls;
use crate::proxy::upstream::Counted;

/// How long a new connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often idle connections are swept.
const SWEEP: Duration = Duration::from_secs(30);

/// An upstream response; its body gives the connection back when it ends.
pub type UpstreamResponse = Box<Response<UpstreamBody>>;

/// Why an upstream request failed.
#[derive(Debug)]
pub enum ClientError {
    /// Too many requests wait for a connection to the endpoint's upstream.
    Overflow,
    /// No connection could be made; nothing was sent.
    Connect(std::io::Error),
    /// The TLS handshake failed (a certificate refused, no common
    /// protocol); nothing was sent.
    Tls(std::io::Error),
    /// The exchange failed once a connection was there (an [`h1::Error`],
    /// or hyper's for HTTP/2 and upgrades).
    Request(BoxError),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Overflow => PoolOverflow.fmt(f),
            ClientError::Connect(e) => write!(f, "connect failed: {e}"),
            ClientError::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            ClientError::Request(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Overflow => None,
            ClientError::Connect(e) | ClientError::Tls(e) => e.source(),
            ClientError::Request(e) => e.source(),
        }
    }
}

/// Where an endpoint's requests go, and how: its address, the HTTP
/// version, and TLS for an `https://` endpoint.
#[derive(Debug, Clone)]
pub struct Destination {
    authority: Authority,
    /// Its pool's key: the authority, with the TLS settings' id for TLS.
    key: Box<str>,
    version: Version,
    tls: Option<Box<TlsTarget>>,
}

/// How a destination's requests are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Http1,
    Http2,
    /// ALPN decides (over TLS only).
    Negotiated,
}

#[derive(Debug, Clone, PartialEq)]
struct TlsTarget {
    tls: ClientTls,
    name: ServerName<'static>,
}

impl PartialEq for Destination {
    /// The same endpoint, version and TLS (pools aside).
    fn eq(&self, other: &Self) -> bool {
        self.authority == other.authority && self.version == other.version && self.tls == other.tls
    }
}

impl Destination {
    /// `authority` over plain TCP (`http://`), in `protocol` (`auto` is
    /// HTTP/1.1 without TLS).
    pub fn plain(authority: Authority, protocol: UpstreamProtocol) -> Self {
        Destination {
            key: authority.as_str().into(),
            authority,
            version: match protocol {
                UpstreamProtocol::Http2 => Version::Http2,
                _ => Version::Http1,
            },
            tls: None,
        }
    }

    /// `authority` over TLS (`https://`), in `protocol`; `tls` was built
    /// for that protocol. Fails if the host is no name TLS can check.
    pub fn tls(
        authority: Authority,
        protocol: UpstreamProtocol,
        tls: &ClientTls,
    ) -> Result<Self, String> {
        let name = tls.server_name(authority.host())?;
        Ok(Destination {
            key: format!("{authority}#{}", tls.id()).into(),
            authority,
            version: match protocol {
                UpstreamProtocol::Http1 => Version::Http1,
                UpstreamProtocol::Http2 => Version::Http2,
                UpstreamProtocol::Auto => Version::Negotiated,
            },
            tls: Some(Box::new(TlsTarget {
                tls: tls.clone(),
                name,
            })),
        })
    }

    /// `host:port`.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Whether requests may go over HTTP/2 (always with `http2`; with
    /// `auto` when the endpoint's ALPN chooses it): such requests carry no
    /// Upgrade, and may ask for trailers.
    pub fn may_be_http2(&self) -> bool {
        self.version != Version::Http1
    }
}

/// What ALPN chose at a `Negotiated` destination: not known yet, HTTP/1.1
/// or HTTP/2.
const ALPN_UNKNOWN: u8 = 0;
const ALPN_HTTP1: u8 = 1;
const ALPN_HTTP2: u8 = 2;

/// A pool of keep-alive connections to upstream endpoints. Clones share it.
#[derive(Debug, Clone)]
pub struct UpstreamClient {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    gates: Gates,
    /// By the authority's text: one pass of the hasher over its bytes
    /// (`Authority`'s own hash lower-cases and feeds them one at a time).
    hosts: Mutex<HashMap<Box<str>, Arc<HostPool>, Fnv>>,
    /// Whether the sweeping task runs (started with the first connection,
    /// on that connection's runtime).
    sweeping: AtomicBool,
    /// Failed TLS handshakes (`tidegate_tls_handshake_failures_total`).
    tls_failures: Counter,
    /// The cut-offs of the attempts sent through this client.
    deadlines: Deadlines,
}

/// The idle connections to one endpoint, and its HTTP/2 connection.
#[derive(Debug, Default)]
struct HostPool {
    idle: Mutex<Vec<Idle>>,
    /// Wakes a request waiting for a connection slot when one comes back.
    returned: Notify,
    /// How many requests wait so: only then does a connection put back
    /// wake one (with none waiting, `Notify` would keep a permit, a
    /// locked operation on every request).
    waiting: AtomicU64,
    /// The shared HTTP/2 connection, if one is open.
    h2: Mutex<Option<H2Conn>>,
    /// Held while an HTTP/2 connection opens, so that requests arriving
    /// together share one instead of each opening its own.
    h2_opening: tokio::sync::Mutex<()>,
    /// What ALPN chose, for a `Negotiated` destination.
    alpn: AtomicU8,
    /// Whether its last TLS handshake failed (and was logged).
    tls_failing: AtomicBool,
}

/// An HTTP/2 connection's request handle.
#[derive(Debug)]
struct H2Conn {
    sender: http2::SendRequest<ProxyBody>,
    uses: u32,
    /// Unused since the last sweep.
    swept: bool,
}

#[derive(Debug)]
struct Idle {
    conn: h1::Conn,
    /// Idle at the last sweep already.
    swept: bool,
}

impl HostPool {
    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<h1::Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(mut entry) = idle.pop() {
            if entry.conn.is_open() {
                return Some(entry.conn);
            }
        }
        None
    }

    fn put(&self, conn: h1::Conn) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Idle { conn, swept: false });
        // A request that began to wait after the push finds the connection
        // in `checkout`; one that began before it is counted by now (the
        // lock orders the two).
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.returned.notify_one();
        }
    }

    /// Counts a request waiting for a connection to come back until dropped.
    fn wait_for_return(&self) -> Counted<'_> {
        Counted::new(&self.waiting)
    }

    /// Closes the connections idle since the last sweep; marks the others.
    fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain_mut(|entry| {
            let keep = !entry.swept && entry.conn.is_open();
            entry.swept = true;
            keep
        });
        drop(idle);
        let mut h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        // Dropping the handle closes the connection once its streams end.
        if h2.as_ref().is_some_and(|c| c.swept || c.sender.is_closed()) {
            *h2 = None;
        } else if let Some(conn) = h2.as_mut() {
            conn.swept = true;
        }
    }

    /// A handle on the open HTTP/2 connection, counted as one use; the
    /// pool lets go of a connection at its `max_uses`th.
    fn h2_checkout(&self, max_uses: Option<u32>) -> Option<http2::SendRequest<ProxyBody>> {
        let mut h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        let conn = h2.as_mut().filter(|c| !c.sender.is_closed())?;
        conn.uses += 1;
        conn.swept = false;
        let sender = conn.sender.clone();
        if max_uses.is_some_and(|max| conn.uses >= max) {
            *h2 = None;
        }
        Some(sender)
    }

    /// Keeps `sender`, a new HTTP/2 connection with `uses` of its uses
    /// taken, for the requests to come (unless that was all of them).
    fn h2_install(&self, sender: http2::SendRequest<ProxyBody>, uses: u32, max_uses: Option<u32>) {
        if max_uses.is_none_or(|max| uses < max) {
            *self.h2.lock().unwrap_or_else(|e| e.into_inner()) = Some(H2Conn {
                sender,
                uses,
                swept: false,
            });
        }
    }

    /// Lets go of the HTTP/2 connection that just refused a request: the
    /// next request opens a new one. (If another request had replaced it
    /// already, that one goes too: a connection costs less than a loop
    /// over one that keeps refusing.)
    fn h2_forget(&self) {
        *self.h2.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl UpstreamClient {
    /// A pool whose new connections are held to `gates`; failed TLS
    /// handshakes are counted in `tls_failures`.
    pub fn new(gates: Gates, tls_failures: Counter) -> Self {
        UpstreamClient {
            shared: Arc::new(Shared {
                gates,
                hosts: Mutex::new(HashMap::default()),
                sweeping: AtomicBool::new(false),
                tls_failures,
                deadlines: Deadlines::default(),
            }),
        }
    }

    /// The cut-offs of the attempts sent through this client (a worker's
    /// client: one timer for its requests).
    pub fn deadlines(&self) -> &Deadlines {
        &self.shared.deadlines
    }

    /// Sends `request` (origin-form target) to `to` on a pooled
    /// connection, opening one if none is free; `Host` (HTTP/2:
    /// `:authority`) is the request's, or the destination's when it has
    /// none. The connection is retired after `max_uses` requests.
    ///
    /// The future is either protocol's own, not one around both: every
    /// attempt carries it, and moves it. (ALPN's choice, rare, is boxed.)
    pub fn request<'a>(
        &'a self,
        to: &'a Destination,
        request: Request<ProxyBody>,
        max_uses: Option<u32>,
    ) -> impl Future<Output = Result<UpstreamResponse, ClientError>> + 'a {
        match to.version {
            Version::Http1 => Either::Left(Either::Left(self.request_h1(to, request, max_uses))),
            Version::Http2 => Either::Left(Either::Right(self.request_h2(to, request, max_uses))),
            Version::Negotiated => {
                Either::Right(Box::pin(self.request_negotiated(to, request, max_uses)))
            }
        }
    }

    /// Sends `head` and `body` to `to`, as [`Self::request`] sends a
    /// request. To an HTTP/1.1 destination the request is encoded from
    /// the borrowed head, whose owner may send it again (nothing of it is
    /// copied but its bytes); to others, and for an upgrade, it is built
    /// from it. An HTTP/1.1 answer's fields come as received, outside its
    /// header map, for the client to be sent as they are: whatever reads
    /// them calls [`fields::materialize`] first.
    pub fn send<'a>(
        &'a self,
        to: &'a Destination,
        head: &h1::Head<'_>,
        body: ProxyBody,
        max_uses: Option<u32>,
    ) -> impl Future<Output = Result<UpstreamResponse, ClientError>> + 'a {
        if to.version == Version::Http1 && !head.upgrade {
            let prepared = h1::Prepared::new(head, body);
            Either::Left(self.send_h1(to, prepared, max_uses))
        } else {
            Either::Right(self.request(to, owned(head, body), max_uses))
        }
    }

    /// A request to a destination whose version ALPN chooses: the first
    /// connection learns it.
    async fn request_negotiated(
        &self,
        to: &Destination,
        request: Request<ProxyBody>,
        max_uses: Option<u32>,
    ) -> Result<UpstreamResponse, ClientError> {
        let host = self.host(to);
        if host.alpn.load(Ordering::Acquire) == ALPN_UNKNOWN {
            self.negotiate(to, &host, max_uses).await?;
        }
        if host.alpn.load(Ordering::Acquire) == ALPN_HTTP2 {
            self.request_h2(to, request, max_uses).await
        } else {
            self.request_h1(to, request, max_uses).await
        }
    }

    /// Opens the first connection to a `Negotiated` destination and pools
    /// it as what ALPN chose (HTTP/1.1 when the server names nothing).
    async fn negotiate(
        &self,
        to: &Destination,
        host: &Arc<HostPool>,
        max_uses: Option<u32>,
    ) -> Result<(), ClientError> {
        let _opening = host.h2_opening.lock().await;
        if host.alpn.load(Ordering::Acquire) != ALPN_UNKNOWN {
            return Ok(());
        }
        let permit = self.slot(to).await?;
        let stream = self.open_tls(to, host).await?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        if h2 {
            let sender = handshake_h2(stream, permit).await?;
            self.start_sweeping();
            host.h2_install(sender, 0, max_uses);
            host.alpn.store(ALPN_HTTP2, Ordering::Release);
        } else {
            self.start_sweeping();
            host.put(h1::Conn::new(Stream::Tls(Box::new(stream)), permit));
            host.alpn.store(ALPN_HTTP1, Ordering::Release);
        }
        Ok(())
    }

    async fn request_h1(
        &self,
        to: &Destination,
        mut request: Request<ProxyBody>,
        max_uses: Option<u32>,
    ) -> Result<UpstreamResponse, ClientError> {
        if asks_upgrade(request.method(), request.headers()) {
            if !request.headers().contains_key(HOST) {
                if let Ok(host) = HeaderValue::from_str(to.authority.as_str()) {
                    request.headers_mut().insert(HOST, host);
                }
            }
            return Box::pin(self.request_upgrade(to, request)).await;
        }
        let prepared = h1::Prepared::from_request(request, to.authority.as_str());
        let mut response = self.send_h1(to, prepared, max_uses).await?;
        fields::materialize(&mut response);
        Ok(response)
    }

    /// Sends an encoded request on a pooled connection to `to`, or a new
    /// one.
    async fn send_h1(
        &self,
        to: &Destination,
        prepared: h1::Prepared,
        max_uses: Option<u32>,
    ) -> Result<UpstreamResponse, ClientError> {
        let host = self.host(to);
        let mut conn = match host.checkout() {
            Some(conn) => conn,
            // Boxed: a new connection is rare, and its handshake's
            // future would make every request's future larger.
            None => Box::pin(self.connect(to, &host)).await?,
        };
        let uses = conn.count_use();
        let keep = max_uses.is_none_or(|max| uses < max);
        let response = conn
            .send_prepared(prepared)
            .await
            .map_err(|e| ClientError::Request(Box::new(e)))?;
        Ok(UpstreamBody::h1(response, keep.then_some(host)))
    }

    /// A request that asks to switch protocols (WebSocket) or tunnel
    /// (CONNECT), over hyper on a connection of its own, which an
    /// accepted upgrade hands to the tunnel and anything else closes.
    async fn request_upgrade(
        &self,
        to: &Destination,
        request: Request<ProxyBody>,
    ) -> Result<UpstreamResponse, ClientError> {
        let permit = self.slot(to).await?;
        let mut sender = match &to.tls {
            None => handshake_h1(open(&to.authority).await?, permit).await?,
            Some(_) => {
                let host = self.host(to);
                handshake_h1(self.open_tls(to, &host).await?, permit).await?
            }
        };
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| ClientError::Request(Box::new(e)))?;
        Ok(UpstreamBody::wrap(response))
    }

    async fn request_h2(
        &self,
        to: &Destination,
        mut request: Request<ProxyBody>,
        max_uses: Option<u32>,
    ) -> Result<UpstreamResponse, ClientError> {
        // HTTP/2 names the host in `:authority`, from the target.
        let host_header = request.headers_mut().remove(HOST);
        let target = host_header
            .as_ref()
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            .unwrap_or_else(|| to.authority.clone());
        let mut parts = std::mem::take(request.uri_mut()).into_parts();
        parts.scheme = Some(if to.tls.is_some() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        });
        parts.authority = Some(target);
        *request.uri_mut() = http::Uri::from_parts(parts).map_err(|e| {
            ClientError::Connect(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
        })?;
        *request.version_mut() = http::Version::HTTP_2;
        let host = self.host(to);
        loop {
            let (mut sender, reused) = match host.h2_checkout(max_uses) {
                Some(sender) => (sender, true),
                None => Box::pin(self.connect_h2(to, &host, max_uses)).await?,
            };
            // Waits for a free stream when the server's limit is reached.
            if sender.ready().await.is_err() {
                host.h2_forget();
                if reused {
                    continue;
                }
                return Err(ClientError::Connect(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "the HTTP/2 connection closed before the request",
                )));
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(UpstreamBody::wrap(response)),
                Err(mut e) => match e.take_message() {
                    // Refused before anything was sent (GOAWAY, closed): another connection.
                    Some(unsent) if reused => {
                        host.h2_forget();
                        request = unsent;
                    }
                    _ => return Err(ClientError::Request(Box::new(e.into_error()))),
                },
            }
        }
    }

    /// The HTTP/2 connection to `to`: the one another request just
    /// opened (the flag says it is shared), or a new one within the
    /// endpoint's gate.
    async fn connect_h2(
        &self,
        to: &Destination,
        host: &Arc<HostPool>,
        max_uses: Option<u32>,
    ) -> Result<(http2::SendRequest<ProxyBody>, bool), ClientError> {
        let _opening = host.h2_opening.lock().await;
        if let Some(sender) = host.h2_checkout(max_uses) {
            return Ok((sender, true));
        }
        let permit = self.slot(to).await?;
        let sender = match &to.tls {
            None => handshake_h2(open(&to.authority).await?, permit).await?,
            Some(_) => handshake_h2(self.open_tls(to, host).await?, permit).await?,
        };
        self.start_sweeping();
        host.h2_install(sender.clone(), 1, max_uses);
        Ok((sender, false))
    }

    /// The pool of `to`, created on first use.
    fn host(&self, to: &Destination) -> Arc<HostPool> {
        let mut hosts = self.shared.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(host) = hosts.get(&*to.key) {
            return host.clone();
        }
        let host = Arc::new(HostPool::default());
        hosts.insert(to.key.clone(), host.clone());
        host
    }

    /// `to`'s gate, if its upstream has one.
    fn gate(&self, to: &Destination) -> Option<Arc<PoolGate>> {
        self.shared.gates.load().get(&to.authority).cloned()
    }

    /// A slot in `to`'s gate for a new connection (`None` without a gate).
    async fn slot(&self, to: &Destination) -> Result<Option<OwnedSemaphorePermit>, ClientError> {
        let Some(gate) = self.gate(to) else {
            return Ok(None);
        };
        if let Some(permit) = gate.try_enter() {
            return Ok(Some(permit));
        }
        let _waiting = gate.wait().map_err(|_| ClientError::Overflow)?;
        Ok(Some(gate.acquire().await))
    }

    /// A new HTTP/1.1 connection to `to` within its gate. While the gate
    /// is full, a connection returned to `host` is taken instead.
    async fn connect(&self, to: &Destination, host: &HostPool) -> Result<h1::Conn, ClientError> {
        let permit = match self.gate(to) {
            None => None,
            Some(gate) => match gate.try_enter() {
                Some(permit) => Some(permit),
                None => {
                    let _waiting = gate.wait().map_err(|_| ClientError::Overflow)?;
                    let _for_return = host.wait_for_return();
                    loop {
                        let returned = host.returned.notified();
                        if let Some(conn) = host.checkout() {
                            return Ok(conn);
                        }
                        tokio::select! {
                            permit = gate.acquire() => break Some(permit),
                            () = returned => {}
                        }
                    }
                }
            },
        };
        let stream = match &to.tls {
            None => Stream::Plain(open(&to.authority).await?),
            Some(_) => Stream::Tls(Box::new(self.open_tls(to, host).await?)),
        };
        self.start_sweeping();
        Ok(h1::Conn::new(stream, permit))
    }

    /// A TLS connection to `to` (which has TLS). A failed handshake is
    /// counted, and logged when the last one to this pool had succeeded.
    async fn open_tls(
        &self,
        to: &Destination,
        host: &HostPool,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
        let Some(target) = &to.tls else {
            unreachable!("a destination without TLS is not opened with TLS")
        };
        let tcp = open(&to.authority).await?;
        let shaken = tokio::time::timeout(
            CONNECT_TIMEOUT,
            target.tls.handshake(target.name.clone(), tcp),
        )
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no TLS handshake within 5 s",
            ))
        });
        match shaken {
            Ok(stream) => {
                if host.tls_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(endpoint = %to.authority, "TLS handshake with the upstream succeeds again");
                }
                Ok(stream)
            }
            Err(e) => {
                self.shared.tls_failures.inc();
                if !host.tls_failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        endpoint = %format_args!("https://{}", to.authority),
                        server_name = ?target.name,
                        error = %e,
                        "TLS handshake with the upstream failed (logged once until one succeeds; all are counted in tidegate_tls_handshake_failures_total)"
                    );
                }
                Err(ClientError::Tls(e))
            }
        }
    }

    /// Starts the task that closes idle connections, once; it ends with
    /// the last clone of this client.
    fn start_sweeping(&self) {
        if self.shared.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared: Weak<Shared> = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(SWEEP);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                shared.sweep();
            }
        });
    }
}

impl Shared {
    /// Closes the connections idle since the last sweep and forgets the
    /// pools of endpoints gone quiet.
    fn sweep(&self) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        hosts.retain(|_, host| {
            host.sweep();
            Arc::strong_count(host) > 1
                || !host
                    .idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_empty()
                || host.h2.lock().unwrap_or_else(|e| e.into_inner()).is_some()
        });
    }
}

/// Whether a request asks to switch protocols or tunnel: hyper's to send.
pub(crate) fn asks_upgrade(method: &Method, headers: &http::HeaderMap) -> bool {
    headers.contains_key(UPGRADE) || method == Method::CONNECT
}

/// A request built from `head` and `body`, its extra fields in place.
fn owned(head: &h1::Head<'_>, body: ProxyBody) -> Request<ProxyBody> {
    let mut request = Request::new(body);
    *request.method_mut() = head.method.clone();
    *request.uri_mut() = head.target.clone().into();
    let mut headers = head.headers.clone();
    for lines in head.lines {
        h1::add_lines(&mut headers, lines);
    }
    *request.headers_mut() = headers;
    request
}

/// FNV-1a over bytes, and one multiply per whole word: the pool's keys are
/// a few endpoint addresses from the config (and the metrics cache's are
/// addresses), not input an attacker picks, so a keyed hash buys nothing
/// here.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Fnv;

impl std::hash::BuildHasher for Fnv {
    type Hasher = FnvHasher;

    fn build_hasher(&self) -> FnvHasher {
        FnvHasher(0xcbf2_9ce4_8422_2325)
    }
}

#[derive(Debug)]
pub(crate) struct FnvHasher(u64);

impl FnvHasher {
    fn word(&mut self, word: u64) {
        self.0 = (self.0 ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

impl std::hash::Hasher for FnvHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u16(&mut self, n: u16) {
        self.word(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.word(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.word(n as u64);
    }

    fn finish(&self) -> u64 {
        // The table takes its bucket from the low bits, which a multiply
        // fills only from the inputs' low bits: fold the high ones in.
        self.0 ^ self.0 >> 29
    }
}

/// An HTTP/1.1 connection over hyper for an upgrade, its task spawned;
/// `permit` (its slot in the gate) is let go when it closes.
async fn handshake_h1<I>(
    io: I,
    permit: Option<OwnedSemaphorePermit>,
) -> Result<SendRequest<ProxyBody>, ClientError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new()
        // As on the listener (see `serve_proxy`): one buffer, one write.
        .writev(false)
        .handshake::<_, ProxyBody>(TokioIo::new(io))
        .await
        .map_err(|e| ClientError::Request(Box::new(e)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
        // The slot is free once the connection is gone.
        drop(permit);
    });
    Ok(sender)
}

/// An HTTP/2 connection over `io`, as [`handshake_h1`].
async fn handshake_h2<I>(
    io: I,
    permit: Option<OwnedSemaphorePermit>,
) -> Result<http2::SendRequest<ProxyBody>, ClientError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake::<_, ProxyBody>(TokioIo::new(io))
        .await
        .map_err(|e| ClientError::Request(Box::new(e)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
        }
        drop(permit);
    });
    Ok(sender)
}

/// A TCP connection to `authority`, without Nagle's delay.
async fn open(authority: &Authority) -> Result<TcpStream, ClientError> {
    open_tcp(authority).await.map_err(ClientError::Connect)
}

async fn open_tcp(authority: &Authority) -> std::io::Result<TcpStream> {
    // `[::1]` in an authority is `::1` to the resolver.
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(80);
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port))).await
    {
        Ok(stream) => stream?,
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// An upstream response body that gives its connection back to the pool
/// when it ends.
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Inner,
    /// The answer's fields as received (`http::fields`), until taken.
    received: Option<Box<crate::http::fields::Received>>,
}

impl fields::Carrier for UpstreamBody {
    fn take_received(&mut self) -> Option<Box<crate::http::fields::Received>> {
        self.received.take()
    }
}

#[derive(Debug)]
enum Inner {
    /// HTTP/2, or an upgrade's answer: hyper's.
    Hyper(Incoming),
    /// HTTP/1.1, read in the caller's task; its connection goes back to
    /// `pool` (if it may carry another request) when it ends.
    H1 {
        body: h1::Body,
        pool: Option<Arc<HostPool>>,
    },
}

impl UpstreamBody {
    fn wrap(response: Response<Incoming>) -> UpstreamResponse {
        Box::new(response.map(|inner| UpstreamBody {
            inner: Inner::Hyper(inner),
            received: None,
        }))
    }

    fn h1(response: Response<h1::Body>, pool: Option<Arc<HostPool>>) -> UpstreamResponse {
        let mut response = Box::new(response.map(|mut body| UpstreamBody {
            received: fields::Carrier::take_received(&mut body),
            inner: Inner::H1 { body, pool },
        }));
        response.body_mut().release();
        response
    }

    /// Gives an HTTP/1.1 connection back once its body has ended.
    fn release(&mut self) {
        if let Inner::H1 { body, pool } = &mut self.inner {
            if body.finished() {
                if let (Some(pool), Some(conn)) = (pool.take(), body.take_reusable()) {
                    pool.put(conn);
                }
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.inner {
            Inner::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Inner::H1 { body, .. } => {
                let polled = Pin::new(body).poll_frame(cx).map_err(Into::into);
                if polled.is_ready() {
                    self.release();
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Hyper(body) => body.is_end_stream(),
            Inner::H1 { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Hyper(body) => body.size_hint(),
            Inner::H1 { body, .. } => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::body;
    use http_body_util::BodyExt;
    use tidegate_testkit::{channel_body, text, Upstream};

    fn client() -> UpstreamClient {
        UpstreamClient::new(Gates::default(), Counter::default())
    }

    fn plain(to: &Authority, http2: bool) -> Destination {
        let protocol = if http2 {
            UpstreamProtocol::Http2
        } else {
            UpstreamProtocol::Http1
        };
        Destination::plain(to.clone(), protocol)
    }

    fn get(path: &'static str) -> Request<ProxyBody> {
        let mut request = Request::new(body::empty());
        *request.uri_mut() = http::Uri::from_static(path);
        request
    }

    fn authority(upstream: &Upstream) -> Authority {
        upstream.addr().to_string().parse().unwrap()
    }

    /// An upstream answering `/stream` once with a body the returned sender
    /// writes, and anything else with "ok".
    async fn streaming_upstream() -> (Upstream, tokio::sync::mpsc::Sender<Bytes>) {
        let (tx, streamed) = channel_body();
        let streamed = std::sync::Mutex::new(Some(streamed));
        let upstream = Upstream::start(move |req| {
            let body = match req.uri().path() {
                "/stream" => streamed.lock().unwrap().take().unwrap(),
                _ => tidegate_testkit::full("ok"),
            };
            async move { Response::new(body) }
        })
        .await;
        (upstream, tx)
    }

    async fn read(response: UpstreamResponse) -> Bytes {
        response.into_body().collect().await.unwrap().to_bytes()
    }

    /// `GET path` to `to` through `client`: the answer's body.
    async fn fetch(
        client: &UpstreamClient,
        to: &Destination,
        path: &'static str,
        max_uses: Option<u32>,
    ) -> Bytes {
        read(client.request(to, get(path), max_uses).await.unwrap()).await
    }

    #[tokio::test]
    async fn a_connection_carries_requests_one_after_another_until_its_limit() {
        let upstream = Upstream::start(|_| async { text(200, "ok") }).await;
        let (client, to) = (client(), authority(&upstream));
        for _ in 0..5 {
            let response = client
                .request(&plain(&to, false), get("/"), None)
                .await
                .unwrap();
            assert_eq!(read(response).await, "ok");
        }
        assert_eq!(upstream.connections(), 1);
        let received = upstream.received();
        assert_eq!(
            received[0].headers["host"],
            to.as_str(),
            "Host comes from the endpoint"
        );
        assert_eq!(received[0].uri, "/");

        for _ in 0..4 {
            let response = client
                .request(&plain(&to, false), get("/"), Some(2))
                .await
                .unwrap();
            read(response).await;
        }
        assert_eq!(upstream.connections(), 3, "retired after two requests each");
    }

    #[tokio::test]
    async fn a_connection_comes_back_when_its_body_ends_not_before() {
        let (upstream, tx) = streaming_upstream().await;
        let (client, to) = (client(), authority(&upstream));
        let streaming = client
            .request(&plain(&to, false), get("/stream"), None)
            .await
            .unwrap();
        // The first connection is busy with the stream: a second one opens.
        fetch(&client, &plain(&to, false), "/", None).await;
        assert_eq!(upstream.connections(), 2);
        tx.send(Bytes::from_static(b"data")).await.unwrap();
        drop(tx);
        assert_eq!(read(streaming).await, "data");
        for _ in 0..3 {
            fetch(&client, &plain(&to, false), "/", None).await;
        }
        assert_eq!(upstream.connections(), 2, "both are back in the pool");
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_takes_its_connection_along() {
        let (upstream, tx) = streaming_upstream().await;
        let (client, to) = (client(), authority(&upstream));
        let mut streaming = client
            .request(&plain(&to, false), get("/stream"), None)
            .await
            .unwrap();
        tx.send(Bytes::from_static(b"part")).await.unwrap();
        let frame = streaming.body_mut().frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "part");
        drop(streaming);
        assert_eq!(fetch(&client, &plain(&to, false), "/", None).await, "ok");
        assert_eq!(
            upstream.connections(),
            2,
            "the cut connection was not reused"
        );
        drop(tx);
    }

    #[tokio::test]
    async fn idle_connections_close_at_the_second_sweep_and_quiet_pools_are_forgotten() {
        let upstream = Upstream::start(|_| async { text(200, "ok") }).await;
        let (client, to) = (client(), authority(&upstream));
        fetch(&client, &plain(&to, false), "/", None).await;
        client.shared.sweep();
        fetch(&client, &plain(&to, false), "/", None).await;
        assert_eq!(upstream.connections(), 1, "used since the sweep: kept");
        client.shared.sweep();
        client.shared.sweep();
        assert!(client.shared.hosts.lock().unwrap().is_empty());
        fetch(&client, &plain(&to, false), "/", None).await;
        assert_eq!(upstream.connections(), 2, "idle through two sweeps: closed");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error_in_either_protocol() {
        let to: Authority = tidegate_testkit::refused_url().await["http://".len()..]
            .trim_end_matches('/')
            .parse()
            .unwrap();
        for http2 in [false, true] {
            let err = client()
                .request(&plain(&to, http2), get("/"), None)
                .await
                .unwrap_err();
            assert!(matches!(err, ClientError::Connect(_)), "{err:?}");
        }
    }

    #[tokio::test]
    async fn http2_requests_share_one_connection_and_carry_trailers() {
        let upstream = Upstream::start(|req| async move {
            let version = format!("{:?} {}", req.version(), req.uri());
            let body = http_body_util::StreamBody::new(futures_util::stream::iter([
                Ok::<_, body::BoxError>(Frame::data(Bytes::from(version))),
                Ok(Frame::trailers({
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", HeaderValue::from_static("0"));
                    t
                })),
            ]));
            Response::new(http_body_util::BodyExt::boxed(body))
        })
        .await;
        let (client, to) = (client(), authority(&upstream));
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (client, to) = (client.clone(), to.clone());
            calls.spawn(async move {
                let response = client
                    .request(&plain(&to, true), get("/x"), None)
                    .await
                    .unwrap();
                response.into_body().collect().await.unwrap()
            });
        }
        while let Some(collected) = calls.join_next().await {
            let collected = collected.unwrap();
            assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
            let text = collected.to_bytes();
            assert_eq!(text, format!("HTTP/2.0 http://{to}/x"));
        }
        assert_eq!(upstream.connections(), 1, "one multiplexed connection");
        let received = upstream.received();
        assert!(
            received[0].headers.get("host").is_none(),
            "{:?}",
            received[0].headers
        );
    }

    #[tokio::test]
    async fn an_http2_connection_is_retired_after_its_uses_and_names_the_requests_host() {
        let upstream = Upstream::start(|_| async { text(200, "ok") }).await;
        let (client, to) = (client(), authority(&upstream));
        for _ in 0..4 {
            fetch(&client, &plain(&to, true), "/", Some(2)).await;
        }
        assert_eq!(upstream.connections(), 2, "two requests a connection");
        // A host the request names is its :authority.
        let mut named = get("/n");
        named
            .headers_mut()
            .insert(HOST, HeaderValue::from_static("api.example"));
        read(
            client
                .request(&plain(&to, true), named, None)
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            upstream.received().last().unwrap().uri,
            "http://api.example/n"
        );
    }

    #[tokio::test]
    async fn a_closed_http2_connection_is_replaced() {
        // A raw HTTP/2 server that answers one request per connection, then
        // sends GOAWAY and closes; it reports each closed connection.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let (closed, mut closures) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let closed = closed.clone();
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(socket).await.unwrap();
                    if let Some(Ok((_, mut respond))) = conn.accept().await {
                        let mut body = respond.send_response(Response::new(()), false).unwrap();
                        body.send_data(Bytes::from_static(b"ok"), true).unwrap();
                    }
                    conn.graceful_shutdown();
                    while conn.accept().await.is_some() {}
                    let _ = closed.send(());
                });
            }
        });
        let client = client();
        for _ in 0..3 {
            let answer = client
                .request(&plain(&to, true), get("/"), None)
                .await
                .unwrap();
            assert_eq!(read(answer).await, "ok");
            closures.recv().await.unwrap();
        }
    }
}
