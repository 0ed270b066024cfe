//! An upstream whose behaviour a test scripts while it runs, and which
//! keeps a ledger of every request that reached it, by request id.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{full, Body, BoxError};

/// What a [`Scripted`] upstream does with the requests it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    /// Reads the body and answers 200 `ok` at once.
    Answer,
    /// Reads the request and never answers; the connection stays open.
    Hang,
    /// Waits this long before sending the response head.
    SlowHead(Duration),
    /// Sends the head at once and the 10-byte body one byte per this long.
    SlowBody(Duration),
    /// Sends a head promising 100 bytes, 10 of them, then resets the
    /// connection.
    ResetMidBody,
    /// Answers with this status (a 5xx burst, say) and body `failed`.
    Status(u16),
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Its `x-correlation-id`, or empty.
    pub id: String,
    /// Method.
    pub method: Method,
    /// Path and query.
    pub target: String,
    /// When its head arrived.
    pub at: Instant,
    /// What the upstream was scripted to do with it.
    pub behavior: Behavior,
}

#[derive(Debug)]
struct Shared {
    behavior: Mutex<Behavior>,
    ledger: Mutex<Vec<Delivery>>,
    connections: Arc<AtomicUsize>,
}

/// A scriptable upstream on 127.0.0.1:0: it can refuse (stopped), accept
/// and hang, answer slowly (head or body), reset mid-body, answer 5xx,
/// and be restarted on the same port. Stops when dropped.
#[derive(Debug)]
pub struct Scripted {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Scripted {
    /// Starts answering ([`Behavior::Answer`]); ready when this returns.
    pub async fn start() -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            behavior: Mutex::new(Behavior::Answer),
            ledger: Mutex::new(Vec::new()),
            connections: Arc::default(),
        });
        let task = serve(listener, shared.clone());
        Scripted {
            addr,
            shared,
            task: Mutex::new(Some(task)),
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

    /// What requests accepted from now on get.
    pub fn set(&self, behavior: Behavior) {
        *self.shared.behavior.lock().unwrap() = behavior;
    }

    /// Closes the listener and every open connection: new connections are
    /// refused and requests under way are cut, as when a process dies.
    pub fn stop(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Whether it is listening.
    pub fn is_running(&self) -> bool {
        self.task.lock().unwrap().is_some()
    }

    /// Listens again on the same port, answering; ready when this returns.
    pub async fn restart(&self) {
        self.stop();
        // The aborted task releases the port when it is dropped, which
        // happens on its runtime's next turn; try until the bind succeeds.
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    tokio::task::yield_now().await
                }
                Err(e) => panic!("rebind {}: {e}", self.addr),
            }
        };
        self.set(Behavior::Answer);
        let task = serve(listener, self.shared.clone());
        *self.task.lock().unwrap() = Some(task);
    }

    /// Every request received so far, in arrival order.
    pub fn ledger(&self) -> Vec<Delivery> {
        self.shared.ledger.lock().unwrap().clone()
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.shared.ledger.lock().unwrap().len()
    }

    /// Connections accepted so far, over every restart.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves `listener` with the shared script and ledger until aborted.
fn serve(listener: TcpListener, shared: Arc<Shared>) -> JoinHandle<()> {
    let connections = shared.connections.clone();
    tokio::spawn(crate::serve(listener, connections, move |req| {
        let shared = shared.clone();
        async move { respond(&shared, req).await }
    }))
}

async fn respond(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let behavior = *shared.behavior.lock().unwrap();
    let id = req
        .headers()
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    shared.ledger.lock().unwrap().push(Delivery {
        id,
        method: req.method().clone(),
        target: req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
        at: Instant::now(),
        behavior,
    });
    let _ = req.into_body().collect().await;
    match behavior {
        Behavior::Answer => status(200, full("ok")),
        Behavior::Hang => std::future::pending().await,
        Behavior::SlowHead(delay) => {
            tokio::time::sleep(delay).await;
            status(200, full("ok"))
        }
        Behavior::SlowBody(every) => status(200, dribble(b"0123456789", every, false)),
        Behavior::ResetMidBody => {
            let mut response = status(200, dribble(b"0123456789", Duration::ZERO, true));
            response
                .headers_mut()
                .insert(http::header::CONTENT_LENGTH, 100.into());
            response
        }
        Behavior::Status(code) => status(code, full("failed")),
    }
}

fn status(code: u16, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(code).expect("a valid status");
    response
}

/// `bytes` one at a time, `every` apart; with `fail`, an error after them
/// (hyper then closes the connection mid-body).
fn dribble(bytes: &'static [u8], every: Duration, fail: bool) -> Body {
    let stream = futures_util::stream::unfold(0usize, move |i| async move {
        if i < bytes.len() {
            if i > 0 && !every.is_zero() {
                tokio::time::sleep(every).await;
            }
            let frame = Frame::data(Bytes::from_static(&bytes[i..=i]));
            return Some((Ok::<_, BoxError>(frame), i + 1));
        }
        if fail && i == bytes.len() {
            return Some((Err("reset mid-body".into()), i + 1));
        }
        None
    });
    http_body_util::StreamBody::new(stream).boxed()
}
