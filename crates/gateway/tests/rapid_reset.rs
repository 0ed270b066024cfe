//! HTTP/2 rapid reset (CVE-2023-44487): a client that opens streams and
//! cancels them at once is cut off with GOAWAY within 1 000 resets, while
//! another client's requests keep succeeding. Both shapes of the attack:
//! HEADERS and RST_STREAM back to back (h2 counts resets of streams not
//! yet accepted), and each RST_STREAM a moment after its HEADERS, once the
//! request is under way upstream (the gateway counts cancelled requests).

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{catch_all, gateway};
use tidegate_testkit::{text, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// `GET /` on `authority`: HEADERS with END_STREAM and END_HEADERS, then
/// RST_STREAM(CANCEL), in one write.
fn open_and_cancel(stream: u32, authority: &str) -> Vec<u8> {
    // HPACK: :method GET, :scheme http, :path / from the static table;
    // :authority as a literal without indexing.
    let mut block = vec![
        0x82,
        0x86,
        0x84,
        0x01,
        u8::try_from(authority.len()).unwrap(),
    ];
    block.extend_from_slice(authority.as_bytes());
    let mut out = frame(HEADERS, 0x5, stream, &block);
    out.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
    out
}

/// Reads frames until the server closes the connection; returns the first
/// GOAWAY's last stream id and error code, and flags `seen` when it comes.
/// Tells `ack` when the server's SETTINGS have arrived.
async fn read_until_goaway(
    mut read: tokio::net::tcp::OwnedReadHalf,
    ack: tokio::sync::oneshot::Sender<()>,
    seen: Arc<AtomicBool>,
) -> Option<(u32, u32)> {
    let mut ack = Some(ack);
    let mut goaway = None;
    loop {
        let mut head = [0u8; 9];
        if read.read_exact(&mut head).await.is_err() {
            return goaway;
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        read.read_exact(&mut payload).await.ok()?;
        match head[3] {
            SETTINGS if head[4] & 0x1 == 0 => {
                if let Some(ack) = ack.take() {
                    let _ = ack.send(());
                }
            }
            GOAWAY if goaway.is_none() => {
                let last = u32::from_be_bytes(payload[0..4].try_into().unwrap()) & 0x7fff_ffff;
                let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                goaway = Some((last, code));
                seen.store(true, Ordering::SeqCst);
            }
            _ => {}
        }
    }
}

/// A client speaking raw HTTP/2 frames, past the connection preface.
struct Attacker {
    write: tokio::net::tcp::OwnedWriteHalf,
    goaway: tokio::task::JoinHandle<Option<(u32, u32)>>,
    seen: Arc<AtomicBool>,
    authority: String,
    sent: u32,
}

impl Attacker {
    async fn connect(addr: std::net::SocketAddr) -> Attacker {
        let (read, mut write) = TcpStream::connect(addr).await.unwrap().into_split();
        let (ack_tx, ack_rx) = tokio::sync::oneshot::channel();
        let seen = Arc::new(AtomicBool::new(false));
        let goaway = tokio::spawn(read_until_goaway(read, ack_tx, seen.clone()));
        write.write_all(PREFACE).await.unwrap();
        write.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        ack_rx.await.expect("the server sends its SETTINGS");
        write
            .write_all(&frame(SETTINGS, 0x1, 0, &[]))
            .await
            .unwrap();
        Attacker {
            write,
            goaway,
            seen,
            authority: addr.to_string(),
            sent: 0,
        }
    }

    /// Opens and cancels one stream, `pause` apart; false once the
    /// connection is gone.
    async fn open_and_cancel(&mut self, pause: Option<Duration>) -> bool {
        let frames = open_and_cancel(2 * self.sent + 1, &self.authority);
        let reset_at = frames.len() - 13;
        let ok = match pause {
            None => self.write.write_all(&frames).await.is_ok(),
            Some(pause) => {
                let headers = self.write.write_all(&frames[..reset_at]).await.is_ok();
                tokio::time::sleep(pause).await;
                headers && self.write.write_all(&frames[reset_at..]).await.is_ok()
            }
        };
        self.sent += 1;
        ok
    }
}

/// A well-behaved HTTP/2 client of the gateway at `addr`.
async fn good_client(addr: std::net::SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let (good, conn) = h2::client::handshake(TcpStream::connect(addr).await.unwrap())
        .await
        .unwrap();
    tokio::spawn(conn);
    good
}

async fn good_request(
    good: &mut h2::client::SendRequest<bytes::Bytes>,
    addr: std::net::SocketAddr,
) {
    let request = http::Request::get(format!("http://{addr}/good"))
        .body(())
        .unwrap();
    let (response, _) = good.send_request(request, true).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("the good client was answered in time")
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// Runs the attack until GOAWAY arrives; returns the streams opened before
/// it did and its last stream id and code, once the server has closed the
/// connection.
async fn attack(addr: std::net::SocketAddr, pause: Option<Duration>) -> (u32, u32, u32) {
    let mut good = good_client(addr).await;
    let mut attacker = Attacker::connect(addr).await;
    while !attacker.seen.load(Ordering::SeqCst) && attacker.sent < 5_000 {
        if !attacker.open_and_cancel(pause).await {
            break;
        }
        if attacker.sent % 100 == 0 {
            // Meanwhile, the other client is served.
            good_request(&mut good, addr).await;
        }
    }
    let sent = attacker.sent;
    let (last_stream, code) = tokio::time::timeout(Duration::from_secs(10), attacker.goaway)
        .await
        .expect("the server closes the connection")
        .unwrap()
        .expect("the server sent GOAWAY before closing");
    for _ in 0..5 {
        good_request(&mut good, addr).await;
    }
    (sent, last_stream, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_resets_get_goaway() {
    let upstream = Upstream::start(|_req| async move { text(200, "ok") }).await;
    let gw = gateway(&catch_all(&upstream.url(), "")).await;
    let (sent, last_stream, code) = attack(gw.addr, None).await;
    println!(
        "back to back: GOAWAY after stream {last_stream} ({sent} opened by then), code {code:#x}"
    );
    assert!(
        last_stream.div_ceil(2) <= 1000,
        "GOAWAY came after stream {last_stream}"
    );
    assert_eq!(code, ENHANCE_YOUR_CALM);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_of_requests_under_way_get_goaway() {
    // The upstream never answers: every cancelled request was under way there.
    let upstream = Upstream::start(|req| async move {
        if req.uri().path() == "/good" {
            return text(200, "ok");
        }
        std::future::pending::<()>().await;
        unreachable!()
    })
    .await;
    let gw = gateway(&catch_all(&upstream.url(), "")).await;
    let (sent, last_stream, code) = attack(gw.addr, Some(Duration::from_millis(2))).await;
    let reached = upstream
        .received()
        .iter()
        .filter(|r| r.uri.path() != "/good")
        .count();
    println!("paced: GOAWAY (last stream {last_stream}, code {code:#x}) seen after {sent} streams; {reached} reached the upstream");
    assert!(sent <= 1000, "GOAWAY came after {sent} resets");
    assert!(reached <= 1000, "{reached} requests reached the upstream");
}
