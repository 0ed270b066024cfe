//! Gateway replicas, as separate processes, sharing rate limits through
//! one Redis (`rate_limit.store = "redis"`).

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};

use common::{http_get, temp_dir, tiny_upstream, Serve};
use tidegate_testkit::RedisServer;

/// The value of header `name` in a raw HTTP answer.
fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let head = answer.split("\r\n\r\n").next()?;
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn three_replicas_admit_exactly_the_limit_and_count_remaining_down_together() {
    const L: usize = 20;
    let redis = RedisServer::start();
    let upstream = tiny_upstream();
    let dir = temp_dir("replicas");
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [rate_limit]\nstore = \"redis\"\nredis_url = \"{}\"\n\
             [[upstreams]]\nname = \"svc\"\nendpoints = [\"http://{upstream}\"]\n\
             [[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstream = \"svc\"\n\
             rate_limit = {{ algorithm = \"sliding_window\", limit = {L}, per = \"1h\" }}\n",
            redis.url()
        ),
    )
    .unwrap();
    let replicas: Vec<Serve> = (0..3).map(|_| Serve::start(&config)).collect();

    // 3 × L requests for one client at once, spread over the replicas.
    let start = Arc::new(Barrier::new(3 * L));
    let answers: Vec<String> = (0..3 * L)
        .map(|i| {
            let addr = replicas[i % 3].addr.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                http_get(&addr, "/x", "")
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();

    let admitted: Vec<&String> = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 200"))
        .collect();
    let refused = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 429"))
        .count();
    assert_eq!(
        (admitted.len(), refused),
        (L, 2 * L),
        "exactly the limit across replicas"
    );
    let remaining: BTreeSet<u32> = admitted
        .iter()
        .map(|a| header(a, "x-ratelimit-remaining").unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        remaining,
        (0..L as u32).collect(),
        "each count is seen once, whichever replica"
    );
    for a in answers.iter().filter(|a| a.starts_with("HTTP/1.1 429")) {
        assert_eq!(header(a, "x-ratelimit-remaining"), Some("0"), "{a}");
        assert!(header(a, "retry-after").is_some(), "{a}");
    }
    for replica in replicas {
        replica.stop();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
