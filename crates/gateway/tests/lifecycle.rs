//! Connection limits and graceful shutdown.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use support::{catch_all, gateway, parsed};
use tidegate_testkit::{get, text, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};

/// An upstream that reports each request and answers only when released.
struct Held {
    upstream: Upstream,
    arrived: mpsc::UnboundedReceiver<()>,
    release: Arc<Semaphore>,
}

async fn held_upstream() -> Held {
    let (tx, arrived) = mpsc::unbounded_channel();
    let release = Arc::new(Semaphore::new(0));
    let upstream = Upstream::start({
        let release = release.clone();
        move |_| {
            let (tx, release) = (tx.clone(), release.clone());
            async move {
                let _ = tx.send(());
                release.acquire().await.unwrap().forget();
                text(200, "done")
            }
        }
    })
    .await;
    Held {
        upstream,
        arrived,
        release,
    }
}

fn config(upstream: &Upstream, gateway_extra: &str) -> String {
    catch_all(&upstream.url(), gateway_extra)
}

/// Resolves once `addr` refuses connections (the listener is closed).
async fn refused(addr: SocketAddr) {
    let attempts = async {
        loop {
            match TcpStream::connect(addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
                // Still listening: let the gateway's tasks run, try again.
                _ => tokio::task::yield_now().await,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), attempts)
        .await
        .expect("the listener stayed open");
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_requests_in_flight_finish() {
    let mut held = held_upstream().await;
    let gw = gateway(&config(&held.upstream, "drain_timeout = \"1h\"")).await;
    let addr = gw.addr;
    let request = tokio::spawn(async move { get(&format!("http://{addr}/work")).await });
    held.arrived.recv().await.unwrap();

    let shutdown = tokio::spawn(gw.shutdown());
    refused(addr).await;
    assert!(!shutdown.is_finished(), "shutdown waits for the request");

    held.release.add_permits(1);
    let answer = request.await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "done");
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown returns once the request is done")
        .unwrap();
}

#[tokio::test]
async fn after_the_drain_timeout_remaining_connections_are_closed() {
    let mut held = held_upstream().await;
    let gw = gateway(&config(&held.upstream, "drain_timeout = \"2s\"")).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET /stuck HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    held.arrived.recv().await.unwrap();

    let addr = gw.addr;
    let shutdown = tokio::spawn(gw.shutdown());
    refused(addr).await;
    // The drain timer is running; jump past it (the runtime is
    // current-thread, so nothing else runs while the clock is paused).
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(3)).await;
    tokio::time::resume();
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown returns at the drain timeout")
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the stuck connection was closed without an answer: {read:?} {:?}",
        String::from_utf8_lossy(&rest)
    );
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_for_a_free_slot() {
    let mut held = held_upstream().await;
    let gw = gateway(&config(&held.upstream, "max_connections = 1")).await;
    let addr = gw.addr;
    let first = tokio::spawn(async move { get(&format!("http://{addr}/first")).await });
    held.arrived.recv().await.unwrap();

    // The second connection waits in the kernel's backlog: it is not
    // accepted, so its request goes nowhere while the first holds the slot.
    let mut second = TcpStream::connect(addr).await.unwrap();
    second
        .write_all(b"GET /second HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(held.upstream.hits(), 1);

    held.release.add_permits(2);
    assert_eq!(first.await.unwrap().status, 200);
    let mut answer = String::new();
    second.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(held.upstream.hits(), 2);
}

#[tokio::test]
async fn worker_threads_serve_the_proxy_and_stop_with_it() {
    let upstream = Upstream::start(|req| async move { text(200, req.uri().path()) }).await;
    let gw = tidegate_gateway::http::server::start_with_workers(parsed(&config(&upstream, "")), 2)
        .await
        .unwrap();
    let addr = gw.addr;
    let requests: Vec<_> = (0..20)
        .map(|i| tokio::spawn(async move { get(&format!("http://{addr}/r{i}")).await }))
        .collect();
    for (i, request) in requests.into_iter().enumerate() {
        let answer = request.await.unwrap();
        assert_eq!(
            (answer.status.as_u16(), answer.body),
            (200, format!("/r{i}"))
        );
    }
    assert_eq!(upstream.hits(), 20);
    let metrics = get(&format!("http://{}/metrics", gw.admin_addr)).await.body;
    assert!(
        metrics.contains(
            r#"tidegate_requests_total{route="all",upstream="svc",method="GET",status="200"} 20"#
        ),
        "{metrics}"
    );
    tokio::time::timeout(Duration::from_secs(10), gw.shutdown())
        .await
        .expect("the workers stop");
    refused(addr).await;
}
