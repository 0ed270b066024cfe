//! Sagas survive a SIGKILL: `tidegate serve` is killed at random points
//! while 20 sagas run, and started again; every saga ends completed or
//! compensated, and the shop (which dedupes by idempotency key, as a
//! payment API does) applies each action and each compensation once.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{temp_dir, Serve};
use tokio::time::Instant;

/// What the shop saw: per idempotency key, how many times it came and
/// the answer it stored the first time.
#[derive(Default)]
struct Ledger {
    received: BTreeMap<String, u32>,
    answers: BTreeMap<String, (u16, String)>,
    without_key: u32,
}

/// A shop on 127.0.0.1:0: each request takes a few milliseconds; the first
/// with a key is applied and its answer kept, a repeat gets the same
/// answer and changes nothing.
fn shop() -> (std::net::SocketAddr, Arc<Mutex<Ledger>>) {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let book = ledger.clone();
    let addr = common::raw_server(
        move |request| {
            // The shop's own latency: the kill lands mid-call often.
            std::thread::sleep(Duration::from_millis(5));
            let body = String::from_utf8_lossy(&request.body);
            let mut book = book.lock().unwrap();
            match request.header("idempotency-key") {
                None => {
                    book.without_key += 1;
                    (400, r#"{"error":"no key"}"#.to_owned())
                }
                Some(key) => {
                    *book.received.entry(key.to_owned()).or_default() += 1;
                    book.answers
                        .entry(key.to_owned())
                        .or_insert_with(|| answer_for(&request.line, key, &body))
                        .clone()
                }
            }
        },
        |_| {},
    );
    (addr, ledger)
}

/// The first answer to a keyed request: reserve and ship succeed; charge
/// is refused when the order says so; compensations succeed.
fn answer_for(request: &str, key: &str, body: &str) -> (u16, String) {
    let saga = key.split(':').next().unwrap_or_default();
    if request.starts_with("POST /charge ") && body.contains(r#""fail":"charge""#) {
        return (402, r#"{"error":"card declined"}"#.to_owned());
    }
    (201, format!(r#"{{"id":"{saga}"}}"#))
}

fn config(dir: &std::path::Path, shop: std::net::SocketAddr) -> std::path::PathBuf {
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"[gateway]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[[upstreams]]
name = "shop"
endpoints = ["http://{shop}"]
[upstreams.policy.circuit_breaker]
consecutive_failures = 1000
[events]
path = "{store}"
listen = "127.0.0.1:0"
[[sagas]]
name = "checkout"
compensation = {{ base_delay = "20ms" }}
[[sagas.steps]]
name = "reserve"
action = {{ upstream = "shop", path = "/reserve", body = "{{input}}" }}
compensate = {{ upstream = "shop", method = "DELETE", path = "/reserve/{{steps.reserve.response.id}}" }}
[[sagas.steps]]
name = "charge"
action = {{ upstream = "shop", path = "/charge", body = "{{input}}" }}
compensate = {{ upstream = "shop", path = "/charge/{{steps.charge.response.id}}/refund" }}
[[sagas.steps]]
name = "ship"
action = {{ upstream = "shop", path = "/ship", body = "{{input}}" }}
"#,
            store = dir.join("events.db").display()
        ),
    )
    .unwrap();
    config
}

/// `method path` with a JSON body on a new connection; status and body.
fn call(addr: &str, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: e\r\n{headers}content-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// A small generator seeded by the process id: kill points differ from
/// run to run, and a failing run prints its seed.
struct Points(u64);

impl Points {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn sagas_killed_at_random_points_all_end_and_each_call_is_applied_once() {
    let dir = temp_dir("sagas-kill");
    let _ = std::fs::remove_file(dir.join("events.db"));
    let (shop_addr, ledger) = shop();
    let config = config(&dir, shop_addr);
    let seed = u64::from(std::process::id());
    let mut points = Points(seed);
    println!("kill points seed {seed}");

    let mut serve = Serve::start(&config);
    for i in 0..20 {
        let fail = if i % 2 == 0 { "charge" } else { "none" };
        let input = format!(r#"{{"order":"o-{i}","fail":"{fail}"}}"#);
        let (status, body) = call(
            &serve.events_addr,
            "POST",
            "/v1/sagas/checkout",
            &format!("idempotency-key: s-{i}\r\n"),
            &input,
        );
        assert_eq!(status, 202, "{body}");
    }
    // Three kills, each once the shop has seen a few more calls.
    for _ in 0..3 {
        let seen = || ledger.lock().unwrap().received.values().sum::<u32>();
        let until = seen() + 2 + u32::try_from(points.below(12)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen() < until && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        serve.kill();
        serve = Serve::start(&config);
    }
    // Every saga ends.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut states = BTreeMap::new();
    for i in 0..20 {
        loop {
            let (status, body) = call(
                &serve.events_addr,
                "POST",
                "/v1/sagas/checkout?wait=5s",
                &format!("idempotency-key: s-{i}\r\n"),
                "{}",
            );
            let state: serde_json::Value = serde_json::from_str(&body).unwrap();
            if status == 200 {
                states.insert(i, state);
                break;
            }
            assert!(Instant::now() < deadline, "saga s-{i} never ended: {state}");
        }
    }
    let ledger = ledger.lock().unwrap();
    assert_eq!(ledger.without_key, 0, "every call carries its key");
    let resent: u32 = ledger.received.values().map(|n| n - 1).sum();
    println!("{resent} calls sent again after a kill, each with its key");
    for (i, state) in &states {
        let id = format!("s-{i}");
        let applied =
            |step: &str, kind: &str| ledger.answers.contains_key(&format!("{id}:{step}:{kind}"));
        let keys = ledger
            .answers
            .keys()
            .filter(|k| k.starts_with(&format!("{id}:")))
            .count();
        assert_eq!(keys, 3, "{id}: a call sent again keeps its key");
        if i % 2 == 0 {
            assert_eq!(state["status"], "compensated", "{state}");
            assert!(
                applied("reserve", "action") && applied("reserve", "compensate"),
                "{id}"
            );
            assert!(applied("charge", "action"), "{id}: the declined charge");
            assert!(
                !applied("charge", "compensate") && !applied("ship", "action"),
                "{id}"
            );
        } else {
            assert_eq!(state["status"], "completed", "{state}");
            for step in ["reserve", "charge", "ship"] {
                assert!(applied(step, "action"), "{id}: {step}");
            }
            assert!(
                !applied("reserve", "compensate") && !applied("charge", "compensate"),
                "{id}"
            );
        }
    }
    drop(serve);
    let _ = std::fs::remove_dir_all(&dir);
}
