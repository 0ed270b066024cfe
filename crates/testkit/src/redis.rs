//! A private `redis-server` per test, on a free loopback port.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::process::{free_port, unique, until_ready};

/// A `redis-server` process of this test's own (Debian's `redis-server`
/// package; `./scripts/test.sh` installs it). Nothing is saved to disk.
/// Killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    /// With TLS: its port (the plain one stays, for [`command`](Self::command)).
    tls_port: Option<u16>,
    dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and returns once it accepts
    /// connections (it says so on its log).
    pub fn start() -> Self {
        RedisServer::start_with(&[])
    }

    /// [`start`](Self::start) with more `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        RedisServer::start_inner(extra, false)
    }

    /// [`start`](Self::start) with TLS on a second port as well, serving
    /// `cert` and `key` and requiring client certificates `ca` signed (PEM
    /// files); [`url`](Self::url) is then `rediss://` on that port.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path, ca: &std::path::Path) -> Self {
        let files = [cert, key, ca].map(|p| p.display().to_string());
        let extra = [
            "--tls-cert-file",
            &files[0],
            "--tls-key-file",
            &files[1],
            "--tls-ca-cert-file",
            &files[2],
            "--tls-auth-clients",
            "yes",
        ];
        RedisServer::start_inner(&extra, true)
    }

    fn start_inner(extra: &[&str], tls: bool) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tidegate-redis-{}-{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&dir).expect("create the server's directory");
        // A port that was free a moment ago may be taken by the time the
        // server binds it; then it exits and another port is tried.
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer {
                port,
                tls_port: tls.then(free_port),
                dir: dir.clone(),
                extra: extra.iter().map(|&a| a.to_owned()).collect(),
                child: None,
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server did not start on any of five free ports");
    }

    /// Runs the server on `self.port`; whether it came up.
    fn spawn(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--logfile", "", "--loglevel", "notice"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .args(
                self.tls_port
                    .map(|p| ["--tls-port".to_owned(), p.to_string()])
                    .into_iter()
                    .flatten(),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}): run ./scripts/test.sh, which installs it")
            });
        let log = child.stdout.take().expect("piped stdout");
        if !until_ready(&mut child, log, "Ready to accept connections") {
            return false;
        }
        self.child = Some(child);
        true
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://127.0.0.1:TLS_PORT` with TLS.
    pub fn url(&self) -> String {
        match self.tls_port {
            Some(port) => format!("rediss://127.0.0.1:{port}"),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server did not come back on port {}",
            self.port
        );
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the server: connected but mute.
    pub fn pause(&self, paused: bool) {
        let child = self.child.as_ref().expect("the server runs");
        signal(child.id(), if paused { "STOP" } else { "CONT" });
    }

    /// Runs one command given as words and returns the raw RESP reply (the
    /// first read of it: enough for the short replies tests look at).
    pub fn command(&self, words: &[&str]) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis");
        let mut request = format!("*{}\r\n", words.len());
        for w in words {
            request.push_str(&format!("${}\r\n{w}\r\n", w.len()));
        }
        stream.write_all(request.as_bytes()).expect("send");
        let mut reply = vec![0u8; 64 * 1024];
        let n = stream.read(&mut reply).expect("read reply");
        String::from_utf8_lossy(&reply[..n]).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL ends a paused server too.
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends signal `name` (`TERM`, `HUP`, `STOP`, …) to process `pid` with
/// bash's own `kill`, so procps need not be installed.
pub fn signal(pid: u32, name: &str) {
    let sent = Command::new("bash")
        .args(["-c", &format!("kill -{name} {pid}")])
        .status()
        .expect("run bash");
    assert!(sent.success(), "kill -{name} {pid}");
}

/// A Redis Cluster of three primaries (no replicas), each a [`RedisServer`],
/// with the slots shared out by `redis-cli --cluster create`.
#[derive(Debug)]
pub struct RedisCluster {
    /// The nodes.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three nodes and returns once every one reports `cluster_state:ok`.
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start_with(&["--cluster-enabled", "yes"]))
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .expect("run redis-cli (Debian's redis-tools)");
        assert!(created.success(), "redis-cli --cluster create failed");
        // The nodes agree on the layout by gossip, shortly after creation:
        // ask every 20 ms, for at most 30 s.
        let settled =
            |n: &RedisServer| n.command(&["CLUSTER", "INFO"]).contains("cluster_state:ok");
        let mut polls = 0;
        while !nodes.iter().all(settled) {
            polls += 1;
            assert!(polls < 1500, "the cluster did not settle in 30 s");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        RedisCluster { nodes }
    }

    /// `redis://` of the first node, the seed.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }
}
