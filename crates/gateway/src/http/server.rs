//! Listeners: the proxy (HTTP/1.1 and h2c on one port) and the admin API;
//! connection limits, header read timeout, graceful shutdown.
//!
//! The proxy listener is served either on the caller's runtime ([`start`])
//! or by worker threads ([`start_with_workers`]), each running its own
//! single-threaded runtime with its own upstream connection pool, the way
//! nginx and Envoy workers do: a request is read, forwarded and answered on
//! one thread, with no hand-off between threads. Policies, health, metrics
//! and the admin API are shared by all workers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinSet;

use crate::config::Config;
use crate::http::body::{ClientBody, ProxyBody};
use crate::http::conn::{sniff, Primed, Protocol};
use crate::http::fields::ClientRequest;
use crate::http::h1::{self, Limits};
use crate::http::headers;
use crate::http::resets::Resets;
use crate::observe::watch::{sample, until_stopped, UpstreamTasks};
use crate::proxy::client::UpstreamClient;
use crate::proxy::{Gateway, KeptTable, Reply};
use crate::reload::Reloader;

/// A gateway that is serving.
#[derive(Debug)]
pub struct Running {
    /// Where the routes are served.
    pub addr: SocketAddr,
    /// Where the admin API is served.
    pub admin_addr: SocketAddr,
    /// Where the events API is served, with `[events]`.
    pub events_addr: Option<SocketAddr>,
    /// The shared state.
    pub gateway: Arc<Gateway>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    upstream_tasks: Arc<Mutex<UpstreamTasks>>,
}

/// A listener on `addr` whose backlog holds the connections waiting past
/// `max_connections`: as many again, up to the system's limit
/// (`net.core.somaxconn`, which the kernel applies anyway).
/// With `shared`, other listeners of this process may bind the same
/// address (`SO_REUSEPORT`: one per worker, the kernel spreading new
/// connections among them by their addresses; only the same user can
/// join them).
fn bind(addr: SocketAddr, max_connections: usize, shared: bool) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    if shared {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|text| text.trim().parse().ok());
    socket.listen(backlog(max_connections, somaxconn))
}

/// The listen backlog for `max_connections`, within `somaxconn` when known.
fn backlog(max_connections: usize, somaxconn: Option<u32>) -> u32 {
    let wanted = u32::try_from(max_connections).unwrap_or(u32::MAX);
    somaxconn.map_or(wanted, |limit| wanted.min(limit)).max(1)
}

/// Binds both listeners and starts serving, health checks and breaker
/// watchers, all on the caller's runtime.
pub async fn start(config: Config) -> Result<Running, String> {
    start_with_workers(config, 0).await
}

/// Like [`start`], but with `workers` threads serving the proxy listener
/// (0: serve it on the caller's runtime too). The admin API, health checks
/// and breaker watchers stay on the caller's runtime.
pub async fn start_with_workers(config: Config, workers: usize) -> Result<Running, String> {
    let listen = config.gateway.listen;
    let admin_listen = config.gateway.admin_listen;
    let events_settings = config.events.clone();
    let gateway = Gateway::new(config)?;
    let max_connections = gateway.settings.max_connections;
    let listener = bind(listen, max_connections, workers > 1)
        .map_err(|e| format!("cannot listen on {listen} (gateway.listen): {e}"))?;
    let admin = TcpListener::bind(admin_listen)
        .await
        .map_err(|e| format!("cannot listen on {admin_listen} (gateway.admin_listen): {e}"))?;
    if !admin_listen.ip().is_loopback() {
        tracing::warn!(%admin_listen, "the admin API is reachable from other machines");
    }
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let slots = Arc::new(Semaphore::new(gateway.settings.max_connections));
    if workers == 0 {
        let client = gateway.client().clone();
        let serve = serve_proxy(gateway.clone(), listener, slots, stopped.clone(), client);
        tasks.spawn(serve);
    } else {
        // A listener for each worker: a new connection goes to one
        // worker's queue, not to whichever worker wakes first.
        let mut listeners = vec![listener];
        while listeners.len() < workers {
            let more = bind(addr, max_connections, true)
                .map_err(|e| format!("cannot listen on {addr} (gateway.listen): {e}"))?;
            listeners.push(more);
        }
        for (index, listener) in listeners.into_iter().enumerate() {
            let listener = listener.into_std().map_err(|e| e.to_string())?;
            let done = spawn_worker(
                index,
                gateway.clone(),
                listener,
                slots.clone(),
                stopped.clone(),
            )?;
            tasks.spawn(async move {
                let _ = done.await;
            });
        }
    }
    let mut admin_stop = stopped.clone();
    let app = crate::observe::admin::router(gateway.clone());
    tasks.spawn(async move {
        let shutdown = async move { until_stopped(&mut admin_stop).await };
        if let Err(e) = axum::serve(admin, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    let events_addr = match events_settings {
        Some(settings) => {
            Some(serve_events(&gateway, settings, &mut tasks, stopped.clone()).await?)
        }
        None => None,
    };
    tasks.spawn(sample(gateway.clone(), stopped.clone()));
    if let Some(tls) = gateway.tls().cloned() {
        tasks.spawn(watch_certificates(tls, stopped.clone()));
    }
    if let Some(queue) = gateway.take_alert_queue() {
        let (gw, metrics, mut stop) = (gateway.clone(), gateway.metrics.clone(), stopped.clone());
        tasks.spawn(crate::observe::alerts::dispatch(
            queue,
            move || gw.table().alerts.clone(),
            metrics,
            async move { until_stopped(&mut stop).await },
        ));
    }
    if let Some(telemetry) = gateway.telemetry().cloned() {
        let mut stop = stopped.clone();
        tasks.spawn(crate::observe::telemetry::export(
            telemetry,
            gateway.new_client(),
            async move { until_stopped(&mut stop).await },
        ));
    }
    let mut upstream_tasks = UpstreamTasks::new(stopped.clone());
    upstream_tasks.sync(&gateway, &gateway.table());
    let upstream_tasks = Arc::new(Mutex::new(upstream_tasks));
    let events_at = events_addr.map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(%addr, %admin_addr, events_addr = %events_at, "tidegate is serving");
    Ok(Running {
        addr,
        admin_addr,
        events_addr,
        gateway,
        stop,
        tasks,
        upstream_tasks,
    })
}

/// Reads the listener's certificate files again when they change
/// (checked every 2 s, as the config file is): new connections get the new
/// ones, open connections keep theirs. A file that fails to load leaves
/// the running certificates in place and is said once.
async fn watch_certificates(
    tls: Arc<crate::http::tls::ListenerTls>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(Duration::from_secs(2));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut said = None;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = until_stopped(&mut stopped) => return,
        }
        match tls.refresh(&tls.settings()) {
            Ok(true) => {
                said = None;
                tracing::info!("TLS certificates read again; new connections get them");
            }
            Ok(false) => {}
            Err(e) => {
                let e = e.to_string();
                if said.as_ref() != Some(&e) {
                    tracing::warn!(error = %e, "TLS certificates changed but cannot be used; the running ones stay");
                    said = Some(e);
                }
            }
        }
    }
}

/// Opens the event store and serves the events API on its listener.
async fn serve_events(
    gateway: &Arc<Gateway>,
    settings: crate::config::EventsSettings,
    tasks: &mut JoinSet<()>,
    mut stopped: watch::Receiver<bool>,
) -> Result<SocketAddr, String> {
    let listen = settings.listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen} (events.listen): {e}"))?;
    if !listen.ip().is_loopback() {
        tracing::warn!(%listen, "the events API is reachable from other machines");
    }
    let events = crate::events::Events::open(settings, gateway.metrics.events.clone()).await?;
    gateway.set_events(events.clone());
    events.start_push(gateway, stopped.clone());
    events
        .start_sagas(gateway, stopped.clone())
        .await
        .map_err(|e| format!("cannot resume the sagas: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let app = crate::events::api::router(gateway.clone(), events, stopped.clone());
    tasks.spawn(async move {
        let shutdown = async move { until_stopped(&mut stopped).await };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "events server failed");
        }
    });
    Ok(addr)
}

impl Running {
    /// A handle that applies new configs to this gateway.
    pub fn reloader(&self) -> Reloader {
        Reloader::new(self.gateway.clone(), self.upstream_tasks.clone())
    }

    /// Stops accepting, lets in-flight requests finish within
    /// `drain_timeout`, then returns.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        self.upstream_tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stop_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Starts worker thread `index`; the receiver resolves when it has stopped.
fn spawn_worker(
    index: usize,
    gateway: Arc<Gateway>,
    listener: std::net::TcpListener,
    slots: Arc<Semaphore>,
    stopped: watch::Receiver<bool>,
) -> Result<oneshot::Receiver<()>, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a worker runtime: {e}"))?;
    let (done, finished) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("tidegate-worker-{index}"))
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => {
                        let client = gateway.new_client();
                        serve_proxy(gateway, listener, slots, stopped, client).await;
                    }
                    Err(e) => tracing::error!(error = %e, "worker {index} cannot listen"),
                }
            });
            // Dropping the runtime ends what is left: pooled upstream
            // connections and tunnels cut at the drain timeout.
            drop(runtime);
            let _ = done.send(());
        })
        .map_err(|e| format!("cannot start worker thread {index}: {e}"))?;
    Ok(finished)
}

async fn serve_proxy(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    slots: Arc<Semaphore>,
    mut stopped: watch::Receiver<bool>,
    client: UpstreamClient,
) {
    let settings = &gateway.settings;
    let limits = Limits {
        // As hyper's read buffer did: 8 KiB at least.
        max_head: settings.max_header_bytes.max(8192),
        header_read: settings.header_read_timeout,
        send: settings.send_timeout,
    };
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            _ = until_stopped(&mut stopped) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = until_stopped(&mut stopped) => break,
        };
        let _ = stream.set_nodelay(true);
        let serving = Serving {
            gateway: gateway.clone(),
            client: client.clone(),
            http2: http2.clone(),
            stop: stopped.clone(),
            limits,
        };
        match gateway.tls() {
            None => {
                connections.spawn(async move {
                    let _slot = slot;
                    serving.serve(stream, peer, None).await;
                });
            }
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
                let handshake_within = settings.header_read_timeout;
                let metrics = gateway.metrics.clone();
                let tls = tls.clone();
                connections.spawn(async move {
                    let _slot = slot;
                    let accepted =
                        tokio::time::timeout(handshake_within, acceptor.accept(stream)).await;
                    let stream = match accepted {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            metrics.tls_handshake_failed();
                            tls.handshake_failed(peer.ip(), &e);
                            return;
                        }
                        Err(_) => {
                            metrics.tls_handshake_failed();
                            tls.handshake_failed(peer.ip(), &"timed out");
                            return;
                        }
                    };
                    let identity = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .map(crate::http::tls::identity)
                        .and_then(|id| http::HeaderValue::from_str(&id).ok());
                    serving.serve(stream, peer, identity).await;
                });
            }
        }
    }
    drop(listener);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(settings.drain_timeout, drained)
        .await
        .is_err()
    {
        tracing::warn!(
            connections = connections.len(),
            "drain timeout passed with requests still in flight; closing their connections"
        );
        connections.shutdown().await;
    }
}

/// The gateway, answering the requests of one client.
struct Proxied {
    gateway: Arc<Gateway>,
    client: UpstreamClient,
    peer: SocketAddr,
    /// The table its last request was served from.
    table: KeptTable,
}

impl h1::Service for Proxied {
    fn call(
        &mut self,
        request: Box<ClientRequest>,
    ) -> impl std::future::Future<Output = http::Response<ProxyBody>> + Send + '_ {
        let table = self.gateway.kept_table(&mut self.table);
        self.gateway.handle(table, request, self.peer, &self.client)
    }
}

/// What every connection of a worker is served with.
struct Serving {
    gateway: Arc<Gateway>,
    client: UpstreamClient,
    http2: http2::Builder<TokioExecutor>,
    stop: watch::Receiver<bool>,
    limits: Limits,
}

impl Serving {
    /// Serves one client connection (plain, or TLS once its handshake is
    /// done) until it ends. `identity` is its verified client
    /// certificate's, set on each of its requests; a client's own copy of
    /// that header never passes.
    async fn serve<I>(self, mut io: I, peer: SocketAddr, identity: Option<http::HeaderValue>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Serving {
            gateway,
            client,
            http2,
            mut stop,
            limits,
        } = self;
        // The protocol is told from the first bytes, the way hyper-util's
        // `auto` builder does. (Over TLS, ALPN said it already; the
        // preface says the same.)
        let mut read = BytesMut::new();
        let protocol = tokio::select! {
            protocol = tokio::time::timeout(limits.header_read, sniff(&mut io, &mut read)) => protocol,
            _ = until_stopped(&mut stop) => return,
        };
        match protocol {
            Ok(Ok(Protocol::Http1)) => {
                let deadlines = client.deadlines().clone();
                let connection = h1::Connection {
                    service: Proxied {
                        table: gateway.keep_table(),
                        gateway,
                        client,
                        peer,
                    },
                    peer,
                    identity,
                    stop,
                    limits,
                    deadlines,
                };
                connection.serve(io, read).await;
            }
            Ok(Ok(Protocol::Http2)) => {
                let resets = Arc::new(Resets::default());
                let abuse = resets.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    let mut req = req.map(ClientBody::H2);
                    let gateway = gateway.clone();
                    let client = client.clone();
                    let resets = resets.clone();
                    let headers = req.headers_mut();
                    headers.remove(&crate::http::tls::CLIENT_IDENTITY);
                    if let Some(identity) = &identity {
                        headers.insert(&crate::http::tls::CLIENT_IDENTITY, identity.clone());
                    }
                    async move {
                        if resets.tripped() {
                            let reply = Reply::new(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "this connection is closing: too many cancelled requests",
                            );
                            let theirs = tidegate_client::headers::first(
                                req.headers(),
                                &headers::CORRELATION_ID,
                            );
                            let request_id = headers::OwnValue::request_id(theirs.cloned());
                            return Ok::<_, Infallible>(reply.into_response(&request_id));
                        }
                        let started = resets.start();
                        let table = gateway.table();
                        let response = gateway
                            .handle(&table, ClientRequest::mapped(req), peer, &client)
                            .await;
                        started.finish();
                        // hyper writes the header map alone.
                        Ok(crate::http::fields::materialized(response))
                    }
                });
                let io = TokioIo::new(Primed::new(io, read, limits.send));
                let conn = http2.serve_connection(io, service);
                drive(conn, peer, &abuse, &mut stop).await;
            }
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "connection ended before a request"),
            Err(_) => tracing::debug!(%peer, "no request within gateway.header_read_timeout"),
        }
    }
}

/// Serves one HTTP/2 client connection until it ends, shutdown begins (it
/// is given `drain_timeout` by the caller) or its client abuses stream
/// resets.
async fn drive<I, S, B>(
    conn: http2::Connection<I, S, TokioExecutor>,
    peer: SocketAddr,
    abuse: &Resets,
    stop: &mut watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        _ = abuse.abused() => {
            tracing::warn!(%peer, "closing an HTTP/2 connection whose client cancels most requests at once (rapid reset)");
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.as_mut()).await;
        }
        _ = until_stopped(stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_follows_max_connections_up_to_somaxconn() {
        assert_eq!(backlog(10_000, Some(4096)), 4096);
        assert_eq!(backlog(500, Some(4096)), 500);
        assert_eq!(backlog(10_000, None), 10_000);
        assert_eq!(backlog(usize::MAX, None), u32::MAX);
        assert_eq!(backlog(0, Some(4096)), 1);
    }

    #[tokio::test]
    async fn workers_listeners_share_an_address_and_its_connections_only_when_asked() {
        let first = bind("127.0.0.1:0".parse().unwrap(), 128, true).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind(addr, 128, true).expect("a second listener on the address");
        let mut clients = Vec::new();
        for _ in 0..64 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // The kernel spreads them by address: all 64 to one listener
        // would be a chance of 2 in 2^64.
        let mut taken = [0, 0];
        let accepting = async {
            while taken[0] + taken[1] < 64 {
                tokio::select! {
                    accepted = first.accept() => {
                        accepted.unwrap();
                        taken[0] += 1;
                    }
                    accepted = second.accept() => {
                        accepted.unwrap();
                        taken[1] += 1;
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), accepting)
            .await
            .expect("every connection is accepted");
        assert!(taken[0] > 0 && taken[1] > 0, "{taken:?}");

        let alone = bind("127.0.0.1:0".parse().unwrap(), 128, false).unwrap();
        assert!(bind(alone.local_addr().unwrap(), 128, true).is_err());
    }

    #[tokio::test]
    async fn the_listener_is_bound_with_that_backlog() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), 777, false).unwrap();
        let port = listener.local_addr().unwrap().port();
        // A listening socket's backlog is its Send-Q in `ss`.
        let out = std::process::Command::new("ss")
            .args(["-ltnH", &format!("sport = :{port}")])
            .output()
            .expect("ss (iproute2) lists sockets");
        let text = String::from_utf8_lossy(&out.stdout);
        let send_q: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(send_q.get(2), Some(&"777"), "{text}");
    }
}
