//! A private `nats-server` with JetStream per test, on a free loopback
//! port, with its own store directory; and a three-node cluster.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::process::{free_port, unique, until_ready};

/// A `nats-server -js` process of this test's own (Debian's
/// `nats-server` package; `./scripts/test.sh` installs it). Its store
/// survives [`kill`](Self::kill) and [`restart`](Self::restart), and is
/// deleted when the server is dropped.
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
    owns_dir: bool,
    /// Speaks TLS only (`start_tls`).
    tls: bool,
}

/// A directory of a server's own under the system's temp directory.
fn own_dir() -> PathBuf {
    std::env::temp_dir().join(format!("tidegate-nats-{}-{}", std::process::id(), unique()))
}

impl NatsServer {
    /// Starts a server on a free port and returns once it is ready (it
    /// says so on its log).
    pub fn start() -> Self {
        Self::start_in(&own_dir(), &[], true)
    }

    /// [`start`](Self::start) speaking TLS only, serving `cert` and `key`
    /// and requiring client certificates `ca` signed (PEM files);
    /// [`url`](Self::url) is then `tls://`.
    pub fn start_tls(cert: &Path, key: &Path, ca: &Path) -> Self {
        let dir = own_dir();
        let extra = [
            "--tlsverify".to_owned(),
            "--tlscert".to_owned(),
            cert.display().to_string(),
            "--tlskey".to_owned(),
            key.display().to_string(),
            "--tlscacert".to_owned(),
            ca.display().to_string(),
        ];
        let mut server = Self::start_in(&dir, &extra, true);
        server.tls = true;
        server
    }

    /// A server with its store in `dir` and more `nats-server` arguments.
    fn start_in(dir: &Path, extra: &[String], owns_dir: bool) -> Self {
        std::fs::create_dir_all(dir).expect("create the server's directory");
        for _ in 0..5 {
            let mut server = NatsServer {
                port: free_port(),
                dir: dir.to_path_buf(),
                extra: extra.to_vec(),
                child: None,
                owns_dir,
                tls: false,
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("nats-server did not start on any of five free ports");
    }

    /// Runs the server on `self.port`; whether it came up.
    fn spawn(&mut self) -> bool {
        let mut child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-sd")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run nats-server ({e}): run ./scripts/test.sh, which installs it")
            });
        let log = child.stderr.take().expect("piped stderr");
        if !until_ready(&mut child, log, "Server is ready") {
            return false;
        }
        self.child = Some(child);
        true
    }

    /// `nats://127.0.0.1:PORT`, or `tls://…` for a TLS server.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "tls" } else { "nats" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The server's client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server at once (SIGKILL), as a crash would; its store
    /// stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "nats-server did not come back on port {}",
            self.port
        );
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Three `nats-server -js` nodes routed to one another (a JetStream
/// cluster: an R3 stream survives one node's loss).
#[derive(Debug)]
pub struct NatsCluster {
    /// The nodes.
    pub nodes: Vec<NatsServer>,
    dir: PathBuf,
}

impl NatsCluster {
    /// Starts three nodes and returns once each is ready (a node is ready
    /// before the cluster has a JetStream leader: a client's first
    /// JetStream call may have to wait for one).
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tidegate-nats-cluster-{}-{}",
            std::process::id(),
            unique()
        ));
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let all = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let nodes = routes
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let extra = vec![
                    "--name".to_owned(),
                    format!("n{i}"),
                    "--cluster_name".to_owned(),
                    "tidegate".to_owned(),
                    "--cluster".to_owned(),
                    format!("nats://127.0.0.1:{port}"),
                    "--routes".to_owned(),
                    all.clone(),
                ];
                NatsServer::start_in(&dir.join(format!("n{i}")), &extra, false)
            })
            .collect();
        NatsCluster { nodes, dir }
    }

    /// Every node's client URL, comma-separated.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
