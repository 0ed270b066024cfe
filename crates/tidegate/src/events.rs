//! `tidegate events`: the admin API's view of topics, subscriptions and
//! dead letters, as a table; `tidegate events tail TOPIC`: a topic's
//! events as they are stored, a line each.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context;
use http_body_util::BodyExt;
use serde_json::Value;

use crate::cli::{Events, EventsCommand, Tail};
use crate::demo::fetch;

pub(crate) fn run(args: Events) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(EventsCommand::Tail(tail)) => crate::runtime()?.block_on(follow(tail)),
        None => table(&args.admin),
    }
}

fn table(admin: &str) -> anyhow::Result<ExitCode> {
    let admin = admin.trim_end_matches('/');
    let url = format!("{admin}/status/events");
    let (code, body) = crate::runtime()?
        .block_on(fetch("GET", &url, ""))
        .with_context(|| format!("cannot reach the admin API at {admin}"))?;
    let status: Value =
        serde_json::from_str(&body).with_context(|| format!("{url} did not answer JSON"))?;
    anyhow::ensure!(
        code == 200,
        "{url} answered {code}: {}",
        status["error"].as_str().unwrap_or(&body)
    );
    print!("{}", status_table(&status));
    Ok(ExitCode::SUCCESS)
}

/// Topics, subscriptions and dead-letter topics, a table each.
fn status_table(status: &Value) -> String {
    use std::fmt::Write;
    let list = |key: &str| status[key].as_array().map_or(&[][..], Vec::as_slice);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<28} {:>10} {:>10} {:>10}",
        "TOPIC", "FIRST", "LAST", "EVENTS"
    );
    for t in list("topics") {
        let _ = writeln!(
            out,
            "{:<28} {:>10} {:>10} {:>10}",
            t["name"].as_str().unwrap_or("?"),
            t["first_position"]
                .as_u64()
                .map_or("-".to_owned(), |p| p.to_string()),
            t["last_position"],
            t["events"],
        );
    }
    let _ = writeln!(
        out,
        "\n{:<20} {:<20} {:<16} {:>8} {:>8} {:>9} {:>12} {:>10}  DEAD LETTERS TO",
        "SUBSCRIPTION", "TOPIC", "DELIVERY", "CURSOR", "LAG", "IN-FLIGHT", "REDELIVERING", "OLDEST"
    );
    for s in list("subscriptions") {
        let delivery = match s["upstream"].as_str() {
            Some(upstream) => format!("push {upstream}"),
            None => "pull".to_owned(),
        };
        let oldest = s["oldest_unacked_age_seconds"]
            .as_f64()
            .map_or("-".to_owned(), |secs| format!("{secs:.1}s"));
        let _ = writeln!(
            out,
            "{:<20} {:<20} {:<16} {:>8} {:>8} {:>9} {:>12} {:>10}  {}",
            s["name"].as_str().unwrap_or("?"),
            s["topic"].as_str().unwrap_or("?"),
            delivery,
            s["cursor"],
            s["lag"],
            s["in_flight"],
            s["redelivering"],
            oldest,
            s["dead_letter_topic"].as_str().unwrap_or("?"),
        );
    }
    for d in list("dead_letters") {
        let _ = writeln!(
            out,
            "\ndead letters in {}: {} waiting",
            d["topic"].as_str().unwrap_or("?"),
            d["waiting"]
        );
        for letter in d["oldest"].as_array().into_iter().flatten().take(10) {
            let _ = writeln!(
                out,
                "  #{:<8} {:<24} {:<20} {}",
                letter["position"],
                letter["id"].as_str().unwrap_or("?"),
                letter["subscription"].as_str().unwrap_or("?"),
                letter["reason"].as_str().unwrap_or("")
            );
        }
    }
    out
}

/// One followed event as a line: position, time, type, id, key, data.
fn line(event: &Value) -> String {
    let data = match (&event["data"], &event["data_base64"]) {
        (Value::Null, Value::String(b64)) => format!("base64:{b64}"),
        (Value::String(text), _) => text.clone(),
        (Value::Null, _) => String::new(),
        (json, _) => json.to_string(),
    };
    let key = match (&event["key"], &event["version"]) {
        (Value::String(key), version) => format!(" {key}@v{version}"),
        _ => String::new(),
    };
    format!(
        "#{} {} {} {}{} {}",
        event["position"],
        event["time"].as_str().unwrap_or("?"),
        event["type"].as_str().unwrap_or("?"),
        event["id"].as_str().unwrap_or("?"),
        key,
        data
    )
}

async fn follow(args: Tail) -> anyhow::Result<ExitCode> {
    let base = args.events.trim_end_matches('/');
    let mut url = format!("{base}/v1/topics/{}/events?follow=true", args.topic);
    if let Some(from) = args.from {
        url.push_str(&format!("&from_position={from}"));
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<hyper::body::Bytes>>();
    let mut request = http::Request::get(&url);
    if let Ok(key) = std::env::var("TIDEGATE_API_KEY") {
        request = request.header("x-api-key", key);
    }
    let response = client
        .request(request.body(http_body_util::Full::default())?)
        .await
        .with_context(|| format!("cannot reach the events API at {base}"))?;
    if !response.status().is_success() {
        let code = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::bail!("{url} answered {code}: {}", String::from_utf8_lossy(&body));
    }
    eprintln!("following {} (^C to stop)", args.topic);
    let mut body = response.into_body();
    let mut pending = String::new();
    let stdout = std::io::stdout();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.push_str(&String::from_utf8_lossy(&data));
        // Server-sent events end with a blank line; their data lines hold the JSON.
        while let Some(end) = pending.find("\n\n") {
            let message: String = pending.drain(..end + 2).collect();
            for json in message.lines().filter_map(|l| l.strip_prefix("data:")) {
                let Ok(event) = serde_json::from_str::<Value>(json.trim_start()) else {
                    continue;
                };
                let text = if args.json {
                    event.to_string()
                } else {
                    line(&event)
                };
                let mut out = stdout.lock();
                writeln!(out, "{text}")?;
                out.flush()?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_events_table_shows_topics_subscriptions_and_dead_letters() {
        let status = json!({
            "topics": [{"name": "content", "first_position": 1, "last_position": 42, "events": 42}],
            "subscriptions": [{"name": "analytics", "topic": "content", "upstream": "analytics",
                "cursor": 40, "lag": 2, "in_flight": 1, "redelivering": 1,
                "oldest_unacked_age_seconds": 3.25, "dead_letter_topic": "content.dead"}],
            "dead_letters": [{"topic": "content.dead", "waiting": 1, "oldest": [
                {"id": "e7", "position": 1, "subscription": "analytics", "reason": "the subscriber answered 400 Bad Request"}]}]
        });
        let table = status_table(&status);
        for text in [
            "content",
            "42",
            "analytics",
            "push analytics",
            "3.2s",
            "content.dead",
            "dead letters in content.dead: 1 waiting",
            "e7",
            "the subscriber answered 400 Bad Request",
        ] {
            assert!(table.contains(text), "{text} not in\n{table}");
        }
    }

    #[test]
    fn a_followed_event_is_one_line() {
        let event = json!({"position": 7, "time": "2026-12-05T10:00:00Z", "type": "Uploaded",
            "id": "e7", "key": "doc-1", "version": 2, "data": {"size": 3}});
        assert_eq!(
            line(&event),
            r#"#7 2026-12-05T10:00:00Z Uploaded e7 doc-1@v2 {"size":3}"#
        );
        let binary =
            json!({"position": 8, "time": "t", "type": "T", "id": "b", "data_base64": "AAE="});
        assert_eq!(line(&binary), "#8 t T b base64:AAE=");
    }
}
