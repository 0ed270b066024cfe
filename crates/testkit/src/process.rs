//! What the private servers (`redis-server`, `nats-server`) have in
//! common: free ports, unique directories, and waiting for the line a
//! server logs when it is ready.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::Child;

/// A free port on loopback (free a moment ago).
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A number no other call in this process returned.
pub(crate) fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Reads `log` (the child's piped output) until a line contains `ready`:
/// true then, and the rest of the log is drained by a thread so the
/// server never blocks on a full pipe. False (the child reaped) when the
/// log ends first: the server exited, e.g. because its port was taken.
pub(crate) fn until_ready(child: &mut Child, log: impl Read + Send + 'static, ready: &str) -> bool {
    let mut log = BufReader::new(log);
    let mut line = String::new();
    loop {
        line.clear();
        match log.read_line(&mut line) {
            Ok(0) | Err(_) => {
                let _ = child.wait();
                return false;
            }
            Ok(_) if line.contains(ready) => break,
            Ok(_) => {}
        }
    }
    std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
    true
}
