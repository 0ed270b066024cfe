//! Test-only: scriptable upstream HTTP servers on 127.0.0.1:0 that record
//! what reached them, and a small client to call the gateway with.
//!
//! ```no_run
//! # async fn f() {
//! use tidegate_testkit::{text, Upstream};
//! let upstream = Upstream::start(|_req| async { text(200, "hello") }).await;
//! assert_eq!(upstream.hits(), 0);
//! # }
//! ```
#![forbid(unsafe_code)]

mod nats;
mod process;
mod redis;
mod scripted;

pub use crate::nats::{NatsCluster, NatsServer};
pub use crate::redis::{signal, RedisCluster, RedisServer};
pub use crate::scripted::{Behavior, Delivery, Scripted};

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Body error type.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Any body.
pub type Body = BoxBody<Bytes, BoxError>;

/// What reached an upstream (the head; handlers read bodies themselves).
#[derive(Debug, Clone)]
pub struct Received {
    /// Method.
    pub method: Method,
    /// Request target as received.
    pub uri: Uri,
    /// Headers as received.
    pub headers: HeaderMap,
}

/// A server on 127.0.0.1:0 answering with a handler; stops when dropped.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Starts serving (HTTP/1.1 and h2c, with upgrades); ready when this returns.
    pub async fn start<F, Fut>(handler: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        let connections = Arc::new(AtomicUsize::new(0));
        let handler = move |req: Request<Incoming>| {
            log.lock().unwrap().push(Received {
                method: req.method().clone(),
                uri: req.uri().clone(),
                headers: req.headers().clone(),
            });
            handler(req)
        };
        let task = tokio::spawn(serve(listener, connections.clone(), handler));
        Upstream {
            addr,
            received,
            connections,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// The requests received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts on `listener` until the task running this is aborted, serving
/// every connection (HTTP/1.1 and h2c, with upgrades) with `handler` and
/// counting them in `connections`. Connections are children of the task
/// and end with it.
async fn serve<F, Fut>(listener: TcpListener, connections: Arc<AtomicUsize>, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let handler = Arc::new(handler);
    let mut open = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        while open.try_join_next().is_some() {}
        connections.fetch_add(1, Ordering::SeqCst);
        let handler = handler.clone();
        open.spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let answer = handler(req);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A response with `status` and a text body.
pub fn text(status: u16, body: &str) -> Response<Body> {
    let mut response = Response::new(full(body.to_owned()));
    *response.status_mut() = StatusCode::from_u16(status).expect("a valid status");
    response
}

/// A body of `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A body written chunk by chunk through the returned sender; it ends when
/// the sender is dropped.
pub fn channel_body() -> (mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, BoxError>(Frame::data(chunk)), rx))
    });
    (tx, StreamBody::new(stream).boxed())
}

/// A finished exchange as the test sees it.
#[derive(Debug)]
pub struct Answer {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// The whole body as text.
    pub body: String,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// A pooled HTTP/1.1 client for tests.
pub fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// Sends `request` and reads the whole answer.
pub async fn send(request: Request<Body>) -> Answer {
    let response = client().request(request).await.expect("request failed");
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// `GET url`.
pub async fn get(url: &str) -> Answer {
    send(Request::get(url).body(full("")).unwrap()).await
}

/// An address where nothing listens: connections to it are refused.
pub async fn refused_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    format!("http://{addr}")
}

/// What a [`RawServer`] does with each request head it reads.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Writes these bytes (a whole response) and keeps the connection for
    /// the next request.
    Answer(&'static [u8]),
    /// Never answers; holds the connection open.
    Hang,
    /// Writes a response head promising 100 bytes, 10 of them, then closes.
    CutMidBody,
}

/// A TCP server on 127.0.0.1:0 that speaks just enough HTTP/1.1 to misbehave
/// on cue. It counts request heads read and connections the client closed.
#[derive(Debug)]
pub struct RawServer {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    closed_by_client: Arc<AtomicUsize>,
    closed: Arc<tokio::sync::Notify>,
    task: JoinHandle<()>,
}

impl RawServer {
    /// Starts serving; ready when this returns.
    pub async fn start(fault: Fault) -> RawServer {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let closed_by_client = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(tokio::sync::Notify::new());
        let (count, eofs, notify) = (requests.clone(), closed_by_client.clone(), closed.clone());
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let (fault, count, eofs, notify) =
                    (fault.clone(), count.clone(), eofs.clone(), notify.clone());
                connections.spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => {
                                eofs.fetch_add(1, Ordering::SeqCst);
                                notify.notify_waiters();
                                return;
                            }
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        // Heads only: bodies that follow are read and ignored as
                        // long as they contain no blank line.
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            count.fetch_add(1, Ordering::SeqCst);
                            match &fault {
                                Fault::Answer(bytes) => {
                                    if stream.write_all(bytes).await.is_err() {
                                        return;
                                    }
                                }
                                Fault::Hang => {}
                                Fault::CutMidBody => {
                                    let _ = stream
                                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                                        .await;
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        RawServer {
            addr,
            requests,
            closed_by_client,
            closed,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Request heads read so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Waits until the client has closed `n` connections.
    pub async fn closed_by_client(&self, n: usize) {
        loop {
            let wait = self.closed.notified();
            if self.closed_by_client.load(Ordering::SeqCst) >= n {
                return;
            }
            wait.await;
        }
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
