//! The command line: exit codes and messages.

use std::process::Command;

fn tidegate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(args)
        .output()
        .expect("run tidegate")
}

#[test]
fn check_accepts_a_good_config_and_names_the_problem_in_a_bad_one() {
    let dir = std::env::temp_dir().join(format!("tidegate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[[upstreams]]\nname = \"a\"\nendpoints = [\"http://127.0.0.1:9\"]\n[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"a\"\n",
    )
    .unwrap();
    let out = tidegate(&["check", "--config", good.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[gateway]\nheader_read_timeout = \"soon\"\n").unwrap();
    let out = tidegate(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "{}:2:1: gateway.header_read_timeout: ",
            bad.display()
        )),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(tidegate(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(tidegate(&["check"]).status.code(), Some(2));
    assert!(tidegate(&["--version"]).status.success());
}

/// A one-answer-per-connection upstream on 127.0.0.1:0, served by a thread.
fn tiny_upstream() -> std::net::SocketAddr {
    use std::io::{Read, Write};
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

#[test]
fn serve_logs_json_access_lines_reloads_on_sighup_and_drains_on_sigterm() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::process::Stdio;

    let upstream = tiny_upstream();
    let dir = std::env::temp_dir().join(format!("tidegate-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [[upstreams]]\nname = \"svc\"\nendpoints = [\"http://{upstream}\"]\n\
             [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstream = \"svc\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .args(["--log-format", "json"])
        .env("TIDEGATE_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tidegate");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // Every line is one JSON object; this finds the next one that matches.
    let mut next_event = |wanted: &dyn Fn(&serde_json::Value) -> bool| -> serde_json::Value {
        for line in lines.by_ref() {
            let line = line.unwrap();
            let event: serde_json::Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            if wanted(&event) {
                return event;
            }
        }
        panic!("tidegate exited before logging what the test waits for");
    };
    let serving = next_event(&|e| e["fields"]["message"] == "tidegate is serving");
    let addr = serving["fields"]["addr"].as_str().unwrap().to_owned();

    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .write_all(b"GET /api/x HTTP/1.1\r\nHost: a\r\nx-correlation-id: cli-1\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let access = next_event(&|e| e["target"] == "tidegate::access");
    let fields = &access["fields"];
    assert_eq!(fields["request_id"], "cli-1");
    assert_eq!(fields["route"], "api");
    assert_eq!(fields["upstream"], "svc");
    assert_eq!(fields["attempts"], 1);
    assert_eq!(fields["status"], 200);
    assert!(fields["duration_ms"].as_f64().is_some(), "{access}");

    // bash's own `kill`: no dependency on procps being installed.
    let signal = |name: &str| {
        let sent = Command::new("bash")
            .args(["-c", &format!("kill -{name} {}", child.id())])
            .status()
            .unwrap();
        assert!(sent.success());
    };

    // SIGHUP reloads the file (a change is also seen by polling; either way
    // one reload is logged).
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text}[[routes]]\nname = \"more\"\npath_prefix = \"/more\"\nupstream = \"svc\"\n"),
    )
    .unwrap();
    signal("HUP");
    next_event(&|e| e["fields"]["message"] == "config reloaded");
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .write_all(b"GET /more/x HTTP/1.1\r\nHost: a\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    signal("TERM");
    next_event(&|e| e["fields"]["message"] == "shutting down: draining in-flight requests");
    assert!(child.wait().unwrap().success());
    std::fs::remove_dir_all(&dir).unwrap();
}
