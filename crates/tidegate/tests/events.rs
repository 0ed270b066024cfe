//! The events half of `tidegate serve`, as a process: events answered 201
//! before a SIGKILL are all pushed to the subscriber after the restart,
//! and `tidegate events` / `events tail` show what the gateway has.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use common::{temp_dir, Serve};

/// A subscriber on 127.0.0.1:0 that notes each pushed event's `ce-id` and
/// answers 200 after `delay`.
fn subscriber(delay: Duration) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let noted = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let noted = noted.clone();
            std::thread::spawn(move || loop {
                let mut reader = BufReader::new(&mut stream);
                let (mut id, mut length) = (None, 0usize);
                let mut line = String::new();
                loop {
                    line.clear();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("ce-id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    } else if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0u8; length];
                if reader.read_exact(&mut body).is_err() {
                    return;
                }
                std::thread::sleep(delay);
                if stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .is_err()
                {
                    return;
                }
                noted.lock().unwrap().extend(id);
            });
        }
    });
    (addr, seen)
}

/// `POST /v1/topics/{topic}/events` in binary mode; the status code.
fn publish(events: &str, topic: &str, id: &str) -> u16 {
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

fn config(dir: &std::path::Path, subscriber: std::net::SocketAddr) -> std::path::PathBuf {
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [[upstreams]]\nname = \"worker\"\nendpoints = [\"http://{subscriber}\"]\n\
             [events]\npath = \"{}\"\nlisten = \"127.0.0.1:0\"\n\
             [[events.subscriptions]]\nname = \"work\"\ntopic = \"jobs\"\nmax_in_flight = 4\nack_wait = \"2s\"\n\
             push = {{ upstream = \"worker\", path = \"/jobs\" }}\n",
            dir.join("events.db").display()
        ),
    )
    .unwrap();
    config
}

#[test]
fn events_answered_before_a_sigkill_are_all_delivered_after_the_restart() {
    let dir = temp_dir("events-sigkill");
    let (addr, seen) = subscriber(Duration::from_millis(2));
    let config = config(&dir, addr);
    let serve = Serve::start(&config);
    let mut answered = BTreeSet::new();
    for i in 0..200 {
        let id = format!("job-{i}");
        assert_eq!(publish(&serve.events_addr, "jobs", &id), 201);
        answered.insert(id);
    }
    let before = seen.lock().unwrap().len();
    serve.kill();
    assert!(
        before < answered.len(),
        "the kill came after every delivery; make the subscriber slower"
    );

    let serve = Serve::start(&config);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got: BTreeSet<String> = seen.lock().unwrap().iter().cloned().collect();
        if answered.is_subset(&got) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} answered events never reached the subscriber",
            answered.difference(&got).count(),
            answered.len()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    serve.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_events_command_shows_topics_and_tail_follows_one() {
    let dir = temp_dir("events-cli");
    let (addr, _seen) = subscriber(Duration::ZERO);
    let config = config(&dir, addr);
    let serve = Serve::start(&config);
    assert_eq!(publish(&serve.events_addr, "jobs", "first"), 201);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(["events", "--admin", &format!("http://{}", serve.admin)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    for text in [
        "TOPIC",
        "jobs",
        "SUBSCRIPTION",
        "work",
        "push worker",
        "jobs.dead",
    ] {
        assert!(table.contains(text), "{text} not in\n{table}");
    }

    let mut tail = std::process::Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args([
            "events",
            "tail",
            "jobs",
            "--from",
            "1",
            "--events",
            &format!("http://{}", serve.events_addr),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(tail.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(
        first.starts_with("#1 ") && first.contains(" Job first"),
        "{first}"
    );
    assert_eq!(publish(&serve.events_addr, "jobs", "second"), 201);
    let second = lines.next().unwrap().unwrap();
    assert!(
        second.starts_with("#2 ") && second.contains(" Job second"),
        "{second}"
    );
    let _ = tail.kill();
    let _ = tail.wait();
    serve.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}
