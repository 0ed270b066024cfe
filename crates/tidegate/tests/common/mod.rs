//! Running `tidegate serve` as a child process, and a tiny upstream.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A `tidegate serve` process logging JSON; its log lines arrive on a
/// channel, so it never blocks on a full pipe.
pub(crate) struct Serve {
    child: Child,
    events: mpsc::Receiver<serde_json::Value>,
    /// The proxy listener, `127.0.0.1:PORT`.
    pub(crate) addr: String,
    /// The admin listener.
    pub(crate) admin: String,
    /// The events listener, or empty.
    pub(crate) events_addr: String,
}

impl Serve {
    /// Starts `tidegate serve --config CONFIG` and returns once it serves.
    pub(crate) fn start(config: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tidegate"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .args(["--log-format", "json"])
            .env("TIDEGATE_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tidegate");
        let stderr = child.stderr.take().unwrap();
        let (send, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let line = line.unwrap();
                let event = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                if send.send(event).is_err() {
                    return;
                }
            }
        });
        let mut serve = Serve {
            child,
            events,
            addr: String::new(),
            admin: String::new(),
            events_addr: String::new(),
        };
        let serving = serve.next_event(&|e| e["fields"]["message"] == "tidegate is serving");
        serve.addr = serving["fields"]["addr"].as_str().unwrap().to_owned();
        serve.admin = serving["fields"]["admin_addr"].as_str().unwrap().to_owned();
        serve.events_addr = serving["fields"]["events_addr"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        serve
    }

    /// The next log line that `wanted` accepts.
    pub(crate) fn next_event(
        &mut self,
        wanted: &dyn Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        loop {
            match self.events.recv_timeout(Duration::from_secs(60)) {
                Ok(event) if wanted(&event) => return event,
                Ok(_) => {}
                Err(e) => panic!("tidegate logged nothing the test waits for ({e})"),
            }
        }
    }

    /// Sends a signal by name (`HUP`, `TERM`).
    pub(crate) fn signal(&self, name: &str) {
        tidegate_testkit::signal(self.child.id(), name);
    }

    /// SIGTERM, then waits for a clean exit.
    pub(crate) fn stop(self) {
        self.signal("TERM");
        self.stop_after_signal();
    }

    /// SIGKILL: no goodbye, nothing flushed that was not already.
    pub(crate) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the exit a signal already asked for; it must be clean.
    pub(crate) fn stop_after_signal(mut self) {
        assert!(self.child.wait().unwrap().success());
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-answer-per-connection upstream on 127.0.0.1:0, served by a thread.
pub(crate) fn tiny_upstream() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok");
        }
    });
    addr
}

/// Sends `GET path` on a new connection and reads the whole answer.
pub(crate) fn http_get(addr: &str, path: &str, extra: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: a\r\n{extra}connection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// A fresh directory under the system's temp dir.
pub(crate) fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tidegate-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A request as [`raw_server`] read it.
pub(crate) struct RawRequest {
    /// `METHOD TARGET HTTP/1.1`.
    pub(crate) line: String,
    /// Names lower-cased, values as sent.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl RawRequest {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 server on 127.0.0.1:0 of plain threads (no runtime to
/// share with the test): `answer` gives each request's status and JSON
/// body; `answered` hears of a request once its answer was written.
pub(crate) fn raw_server(
    answer: impl Fn(&RawRequest) -> (u16, String) + Send + Sync + 'static,
    answered: impl Fn(&RawRequest) + Send + Sync + 'static,
) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handlers = Arc::new((answer, answered));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let handlers = handlers.clone();
            std::thread::spawn(move || loop {
                let mut reader = BufReader::new(&mut stream);
                let mut request = RawRequest {
                    line: String::new(),
                    headers: Vec::new(),
                    body: Vec::new(),
                };
                let mut line = String::new();
                loop {
                    line.clear();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if request.line.is_empty() {
                        request.line = line.trim().to_owned();
                    } else if let Some((name, value)) = line.split_once(':') {
                        request
                            .headers
                            .push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
                    }
                }
                let length = request
                    .header("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                request.body = vec![0u8; length];
                if reader.read_exact(&mut request.body).is_err() {
                    return;
                }
                let (status, body) = (handlers.0)(&request);
                let reason = if status < 300 { "OK" } else { "No" };
                let kind = if body.is_empty() {
                    ""
                } else {
                    "content-type: application/json\r\n"
                };
                // One write: a head in pieces would wait on Nagle and the
                // peer's delayed ACK.
                let response = format!(
                    "HTTP/1.1 {status} {reason}\r\n{kind}content-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(response.as_bytes()).is_err() {
                    return;
                }
                (handlers.1)(&request);
            });
        }
    });
    addr
}

/// A subscriber on 127.0.0.1:0 that notes each pushed event's `ce-id` and
/// answers 200 after `delay`.
pub(crate) fn subscriber(delay: Duration) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let noted = seen.clone();
    let addr = raw_server(
        move |_| {
            std::thread::sleep(delay);
            (200, String::new())
        },
        move |request| {
            let id = request.header("ce-id").map(str::to_owned);
            noted.lock().unwrap().extend(id);
        },
    );
    (addr, seen)
}

/// `POST /v1/topics/{topic}/events` in binary mode; the status code.
pub(crate) fn publish(events: &str, topic: &str, id: &str) -> u16 {
    let mut stream = std::net::TcpStream::connect(events).unwrap();
    write!(
        stream,
        "POST /v1/topics/{topic}/events HTTP/1.1\r\nHost: e\r\nce-type: Job\r\nce-id: {id}\r\n\
         content-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer[9..12].parse().unwrap()
}
