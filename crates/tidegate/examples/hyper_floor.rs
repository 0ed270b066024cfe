//! The floor under any hyper-based proxy, for `scripts/bench-proxy.sh`:
//! hyper's HTTP/1 server handing each request, as it came, to a pooled
//! hyper HTTP/1 client connection and the answer back, with the gateway's
//! allocator and worker model (one event loop per thread) and nothing
//! else: no routing, policies, header work, metrics nor logs. What it
//! costs is what tidegate cannot go below while it speaks HTTP through
//! hyper; the gap between the two is tidegate's own work.
//!
//! `cargo run --release -p tidegate --example hyper_floor -- LISTEN UPSTREAM [WORKERS]`

#[path = "../src/alloc.rs"]
mod alloc;

#[global_allocator]
static ALLOCATOR: alloc::MiMalloc = alloc::MiMalloc;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// Idle upstream connections of one worker.
type Pool = Rc<RefCell<Vec<SendRequest<Incoming>>>>;

async fn forward(
    pool: Pool,
    upstream: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<Incoming>, hyper::Error> {
    let mut sender = loop {
        let idle = pool.borrow_mut().pop();
        match idle {
            Some(mut sender) => {
                if sender.ready().await.is_ok() {
                    break sender;
                }
            }
            None => {
                let stream = TcpStream::connect(upstream)
                    .await
                    .expect("the upstream accepts");
                stream.set_nodelay(true).expect("TCP_NODELAY");
                // One buffer per message, as the gateway writes them.
                let (sender, conn) = hyper::client::conn::http1::Builder::new()
                    .writev(false)
                    .handshake(TokioIo::new(stream))
                    .await?;
                tokio::task::spawn_local(conn);
                break sender;
            }
        }
    };
    if let Some(target) = req.uri().path_and_query().cloned() {
        *req.uri_mut() = target.into();
    }
    let response = sender.send_request(req).await;
    // Back in the pool at once: the next checkout waits until it is ready.
    pool.borrow_mut().insert(0, sender);
    response
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: hyper_floor LISTEN UPSTREAM [WORKERS]";
    let listen: SocketAddr = args.get(1).and_then(|a| a.parse().ok()).expect(usage);
    let upstream: SocketAddr = args.get(2).and_then(|a| a.parse().ok()).expect(usage);
    let workers: usize = args
        .get(3)
        .map_or(Some(1), |a| a.parse().ok())
        .expect(usage);
    let listener = std::net::TcpListener::bind(listen).expect("the listen address is free");
    listener.set_nonblocking(true).expect("non-blocking");
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let listener = listener.try_clone().expect("a listener per worker");
            std::thread::spawn(move || serve(listener, upstream))
        })
        .collect();
    for thread in threads {
        thread.join().expect("a worker ended");
    }
}

fn serve(listener: std::net::TcpListener, upstream: SocketAddr) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = TcpListener::from_std(listener).expect("a tokio listener");
        let pool = Pool::default();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let pool = pool.clone();
            tokio::task::spawn_local(async move {
                let service =
                    hyper::service::service_fn(move |req| forward(pool.clone(), upstream, req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .writev(false)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
