//! Starting a gateway in front of test upstreams.
#![allow(dead_code)]

use std::time::Duration;

use tidegate_gateway::config::{self, Config};
use tidegate_gateway::http::server::{self, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Parses `toml` (listeners on 127.0.0.1:0 unless a `[gateway]` is given).
pub(crate) fn parsed(toml: &str) -> Config {
    let text = if toml.contains("[gateway]") {
        toml.to_owned()
    } else {
        format!("[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{toml}")
    };
    config::parse(&text, "test.toml", []).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts a gateway from `toml`, as [`parsed`] reads it.
pub(crate) async fn gateway(toml: &str) -> Running {
    server::start(parsed(toml))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// One upstream `svc` at `endpoint` behind a route `all` for every path;
/// `gateway_extra` goes under `[gateway]` (listeners on 127.0.0.1:0).
pub(crate) fn catch_all(endpoint: &str, gateway_extra: &str) -> String {
    format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{gateway_extra}\n\
         [[upstreams]]\nname = \"svc\"\nendpoints = [\"{endpoint}\"]\n\
         [[routes]]\nname = \"all\"\npath_prefix = \"/\"\nupstream = \"svc\"\n"
    )
}

/// `http://ADDR` of the proxy listener.
pub(crate) fn url(running: &Running, path: &str) -> String {
    format!("http://{}{path}", running.addr)
}

/// `http://ADDR` of the admin listener.
pub(crate) fn admin(running: &Running, path: &str) -> String {
    format!("http://{}{path}", running.admin_addr)
}

/// Sends raw bytes and reads until the server closes or a full head and
/// `Content-Length` body arrive; returns the status line and the text.
pub(crate) async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("the server neither answered nor closed")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            });
            if len.is_some_and(|len| body.len() >= len) {
                break;
            }
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}
