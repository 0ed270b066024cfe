//! Slow clients: slowloris (a head that never ends, or no byte at all),
//! slow body and slow read, 1 000 connections of each. The gateway cuts
//! every one at its timeout, frees what it held upstream, and keeps
//! answering a probe client quickly all along.
//!
//! The gateway runs on its own worker thread, as `tidegate serve` does,
//! so the attackers and the probe share the test's runtime, not its.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use support::{catch_all, parsed};
use tidegate_testkit::{get, Body, BoxError, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

const CONNECTIONS: usize = 1000;
/// Every timeout of the gateway under test.
const TIMEOUT: Duration = Duration::from_secs(1);
/// How late after its timeout a connection may be cut on a busy machine.
const SLACK: Duration = Duration::from_secs(3);

/// Counts response bodies that ended or were dropped, and says when.
#[derive(Clone, Default)]
struct Released(Arc<AtomicUsize>, Arc<tokio::sync::Notify>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0 .0.fetch_add(1, Ordering::SeqCst);
        self.0 .1.notify_waiters();
    }
}

struct ReleaseOnDrop(Released);

/// `/big` streams 64 KiB in 16 KiB chunks, `/endless` never stops;
/// anything else is a short answer. `released` counts the long answers
/// that ended or were dropped.
async fn upstream(released: Released) -> Upstream {
    Upstream::start(move |req| {
        let released = released.clone();
        async move {
            let chunks = match req.uri().path() {
                "/big" => 4,
                "/endless" => usize::MAX,
                _ => return tidegate_testkit::text(200, "ok"),
            };
            let guard = ReleaseOnDrop(released);
            let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
            let stream = futures_util::stream::unfold((0, guard), move |(i, guard)| {
                let chunk = chunk.clone();
                async move {
                    (i < chunks).then(|| {
                        (
                            Ok::<_, BoxError>(hyper::body::Frame::data(chunk)),
                            (i + 1, guard),
                        )
                    })
                }
            });
            let body: Body = http_body_util::StreamBody::new(stream).boxed();
            http::Response::new(body)
        }
    })
    .await
}

/// A client requesting `/probe` every 20 ms until stopped.
struct Probe {
    stop: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<Vec<Duration>>,
}

impl Probe {
    fn start(addr: std::net::SocketAddr) -> Probe {
        let stop = Arc::new(tokio::sync::Notify::new());
        let url = format!("http://{addr}/probe");
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let start = Instant::now();
                let answer = get(&url).await;
                assert_eq!(answer.status, 200, "the probe was refused: {}", answer.body);
                latencies.push(start.elapsed());
                tokio::select! {
                    _ = stopped.notified() => return latencies,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        });
        Probe { stop, task }
    }

    /// Stops it; returns the latency of every request it made.
    async fn stop(self) -> Vec<Duration> {
        self.stop.notify_one();
        self.task.await.unwrap()
    }
}

/// Opens `CONNECTIONS` connections running `attack` each while a probe
/// runs; returns how long after its start each was cut, and the probe's
/// latencies.
async fn under_attack<F, Fut>(
    addr: std::net::SocketAddr,
    attack: F,
) -> (Vec<Duration>, Vec<Duration>)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let probe = Probe::start(addr);
    let mut attackers = JoinSet::new();
    for i in 0..CONNECTIONS {
        let stream = connect(addr, i).await;
        let start = Instant::now();
        let attack = attack(stream);
        attackers.spawn(async move {
            attack.await;
            start.elapsed()
        });
    }
    let mut cut = Vec::new();
    while let Some(elapsed) = attackers.join_next().await {
        cut.push(elapsed.unwrap());
    }
    (cut, probe.stop().await)
}

/// Opens attacking connection `i`, at about 1 000 a second (slowhttptest's
/// default is 50), with a small receive window so that a slow reader's
/// data backs up.
async fn connect(addr: std::net::SocketAddr, i: usize) -> TcpStream {
    if i % 10 == 9 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Reads until the server closes the connection (or 10 s pass).
async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    answer
}

/// Writes `first`, then one of `drip` every 400 ms until the server closes
/// the connection; returns what the server sent.
async fn dribble(stream: &mut TcpStream, first: &[u8], drip: &[u8]) -> Vec<u8> {
    let _ = stream.write_all(first).await;
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return answer,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            },
            _ = tokio::time::sleep(Duration::from_millis(400)) => {
                if stream.write_all(drip).await.is_err() {
                    return answer;
                }
            }
        }
    }
}

fn p99(latencies: &mut [Duration]) -> Duration {
    latencies.sort();
    latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)]
}

fn check(what: &str, cut: &[Duration], probe: &mut [Duration]) {
    let latest = cut.iter().max().unwrap();
    let p99 = p99(probe);
    println!(
        "{what}: {} connections cut, the last after {latest:?}; probe: {} requests, p99 {p99:?}",
        cut.len(),
        probe.len()
    );
    assert!(
        *latest < TIMEOUT + SLACK,
        "{what}: a connection was held {latest:?}"
    );
    assert!(
        p99 < Duration::from_millis(100),
        "{what}: probe p99 {p99:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_at_their_timeouts_while_a_probe_is_served() {
    let released = Released::default();
    let upstream = upstream(released.clone()).await;
    // The probe has an upstream and route of its own, so it never queues
    // in the attacked upstream's bulkhead: what it measures is the gateway.
    let probed = Upstream::start(|_req| async { tidegate_testkit::text(200, "ok") }).await;
    let config = format!(
        "{}[[upstreams]]\nname = \"probed\"\nendpoints = [\"{}\"]\n\
         [[routes]]\nname = \"probe\"\npath_prefix = \"/probe\"\nupstream = \"probed\"\n",
        catch_all(
            &upstream.url(),
            "header_read_timeout = \"1s\"\nbody_read_timeout = \"1s\"\nsend_timeout = \"1s\"",
        ),
        probed.url()
    );
    let gw = tidegate_gateway::http::server::start_with_workers(parsed(&config), 1)
        .await
        .unwrap();

    // Slowloris: a head that grows by a line every 400 ms and never ends.
    let (cut, mut probe) = under_attack(gw.addr, |mut stream| async move {
        let answer = dribble(&mut stream, b"GET / HTTP/1.1\r\nHost: x\r\n", b"X-a: b\r\n").await;
        assert!(answer.is_empty() || answer.starts_with(b"HTTP/1.1 408"));
    })
    .await;
    check("slowloris", &cut, &mut probe);

    // Slowloris, quieter: connect and send nothing at all.
    let (cut, mut probe) = under_attack(gw.addr, |mut stream| async move {
        until_closed(&mut stream).await;
    })
    .await;
    check("silent connections", &cut, &mut probe);

    // Slow body: a declared body that arrives a byte every 400 ms.
    let hits = upstream.hits();
    let (cut, mut probe) = under_attack(gw.addr, |mut stream| async move {
        let head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n";
        let answer = dribble(&mut stream, head, b"x").await;
        assert!(
            answer.starts_with(b"HTTP/1.1 408"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    })
    .await;
    check("slow body", &cut, &mut probe);
    assert_eq!(upstream.hits(), hits, "a slow body reached the upstream");

    // Slow read: a 64 KiB answer the client never reads. The gateway
    // lets go of the upstream's response and keeps serving the probe.
    let (cut, mut probe) = slow_readers(&upstream, gw.addr, "/big", CONNECTIONS, &released).await;
    check("slow read", &cut, &mut probe);

    // Slow read of an endless answer: once the client's window and the
    // socket buffers are full, the gateway's writes stall and the send
    // timeout cuts the connection.
    let (cut, mut probe) = slow_readers(&upstream, gw.addr, "/endless", 10, &released).await;
    check("slow read, endless", &cut, &mut probe);
}

/// `n` clients request `path` and never read; returns how long after the
/// first request each upstream response was let go, and the probe's
/// latencies meanwhile.
async fn slow_readers(
    upstream: &Upstream,
    addr: std::net::SocketAddr,
    path: &str,
    n: usize,
    released: &Released,
) -> (Vec<Duration>, Vec<Duration>) {
    let probe = Probe::start(addr);
    let before = released.0.load(Ordering::SeqCst);
    let start = Instant::now();
    let mut readers = Vec::new();
    for i in 0..n {
        let mut stream = connect(addr, i).await;
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        readers.push(stream);
    }
    // Wait for the releases, noting when each came; the clients read nothing.
    let mut cut = Vec::new();
    let mut changed = released.1.notified();
    loop {
        let now = released.0.load(Ordering::SeqCst) - before;
        cut.resize(now, start.elapsed());
        if now >= n || start.elapsed() > TIMEOUT + SLACK {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), changed).await;
        changed = released.1.notified();
    }
    let latencies = probe.stop().await;
    // Requests past the bulkhead's queue were answered 503 at once and
    // never reached the upstream; every one that did was let go.
    let received = upstream.received();
    let reached = received.iter().filter(|r| r.uri.path() == path).count();
    println!("{path}: {reached} of {n} slow readers' requests reached the upstream");
    assert_eq!(cut.len(), reached, "{path}: upstream responses still held");
    drop(readers);
    (cut, latencies)
}
