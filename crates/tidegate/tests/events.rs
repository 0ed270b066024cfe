//! The events half of `tidegate serve`, as a process: events answered 201
//! before a SIGKILL are all pushed to the subscriber after the restart,
//! and `tidegate events` / `events tail` show what the gateway has.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::time::Duration;

use tokio::time::Instant;

use common::{publish, subscriber, temp_dir, Serve};

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
