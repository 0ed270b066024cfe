//! The chat flow of reference 003, with tidegate-client: search the
//! knowledge service (fail open: fall back to a local search when it is
//! unavailable or its breaker is open), charge the user (fail closed), and
//! save the transcript (best effort: log and go on).
//!
//! Run: `cargo run -p tidegate-client --example chat_flow`
//!
//! It starts its own sample services on loopback, answers one chat while
//! everything is healthy, then takes the knowledge and filesystem services
//! down and answers again, and prints the status of every client.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use tidegate_client::headers::Context;
use tidegate_client::{config, fallback, Registry};
use tidegate_testkit::{text, Upstream};

/// A sample service that answers `body` while `up`, else 503.
async fn service(up: Arc<AtomicBool>, body: &'static str) -> Upstream {
    Upstream::start(move |_req| {
        let up = up.load(Ordering::SeqCst);
        async move {
            if up {
                text(200, body)
            } else {
                text(503, "{\"error\":\"down\"}")
            }
        }
    })
    .await
}

/// One chat turn: the answer, or an error only when it must fail.
async fn chat(registry: &Registry, message: &str) -> Result<String, tidegate_client::Error> {
    // Fail open: the knowledge search (a read, so it is retried) has a substitute.
    let context: Value = fallback::fail_open(
        registry
            .get("knowledge")?
            .get_json(&format!("/query?q={}", percent_encode(message))),
        |_| json!({ "results": ["(local full-text search)"] }),
    )
    .await?;
    // Fail closed: no answer without a successful charge.
    let _receipt: Value = fallback::fail_closed(
        registry
            .get("billing")?
            .request(http::Method::POST, "/charge")
            .idempotency_key("chat-1")
            .json(&json!({ "cents": 1 }))
            .send_json(),
    )
    .await?;
    let answer = format!("answer to {message:?} using {}", context["results"]);
    // Best effort: the transcript is nice to have.
    let _saved: Option<Value> = fallback::best_effort(
        registry
            .get("filesystem")?
            .post_json("/save_file", &json!({ "text": answer })),
    )
    .await;
    Ok(answer)
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_target(false)
        .init();
    let knowledge_up = Arc::new(AtomicBool::new(true));
    let files_up = Arc::new(AtomicBool::new(true));
    let knowledge = service(
        knowledge_up.clone(),
        "{\"results\":[\"tides are caused by the moon\"]}",
    )
    .await;
    let files = service(files_up.clone(), "{\"saved\":true}").await;
    let billing = service(Arc::new(AtomicBool::new(true)), "{\"charged\":1}").await;

    let services = format!(
        r#"
[client]
source_service = "chat-backend"

[defaults.policy.retry]
max_attempts = 3
base_delay = "50ms"

[services.knowledge]
base_url = "{}"
service_name = "Knowledge Server"
[services.knowledge.policy.circuit_breaker]
consecutive_failures = 3

[services.filesystem]
base_url = "{}"
service_name = "Filesystem Server"

[services.billing]
base_url = "{}"
service_name = "Billing Server"
"#,
        knowledge.url(),
        files.url(),
        billing.url()
    );
    let config = config::parse(&services, "services.toml", std::env::vars()).expect("valid");
    let registry = Registry::new(config).expect("valid");

    let turn = |message: &'static str| {
        let registry = registry.clone();
        Context::default().scope(async move { chat(&registry, message).await })
    };
    println!("\n== everything healthy");
    println!("{}", turn("why are there tides?").await.expect("answered"));

    println!("\n== knowledge and filesystem down");
    knowledge_up.store(false, Ordering::SeqCst);
    files_up.store(false, Ordering::SeqCst);
    println!("{}", turn("and the spring tide?").await.expect("answered"));
    println!("{}", turn("neap tide?").await.expect("answered"));

    println!("\n== status");
    println!("{:#}", registry.status());
    registry.close();
}
