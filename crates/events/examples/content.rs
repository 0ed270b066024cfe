//! The education platform's content pipeline (reference 002) on
//! tidegate-events: `ContentAggregate` is its stream folded,
//! commands are decided against it and appended at the version it was
//! loaded at (a stale one is decided again), and a read model is
//! projected by a consumer group that takes each item's events in order.
//!
//! ```sh
//! cargo run -p tidegate-events --example content
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tidegate_events::{
    execute, Aggregate, Consumer, Event, NewEvent, Ordering, SqliteStore, Store, SubscriptionConfig,
};
use tidegate_resilience::Pipeline;

/// Where an item of content stands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Status {
    #[default]
    Draft,
    Uploaded,
    Processing,
    Completed,
}

#[derive(Debug, Default)]
struct ContentAggregate {
    title: String,
    status: Status,
}

impl Aggregate for ContentAggregate {
    fn apply(&mut self, event: &Event) {
        let data: Value = serde_json::from_slice(&event.data).unwrap_or_default();
        match event.ty.as_str() {
            "ContentUploaded" => {
                self.title = data["title"].as_str().unwrap_or_default().to_owned();
                self.status = Status::Uploaded;
            }
            "ContentProcessingStarted" => self.status = Status::Processing,
            "ContentProcessingCompleted" => self.status = Status::Completed,
            _ => {}
        }
    }
}

/// What a command may be asked to do.
enum Command<'a> {
    Upload { title: &'a str },
    StartProcessing { processor: &'a str },
    Complete,
}

/// The events a command makes of the content as it stands, or why not.
fn decide(
    content: &ContentAggregate,
    id: &str,
    command: &Command<'_>,
) -> Result<Vec<NewEvent>, String> {
    let event = |ty: &str, data: Value| {
        NewEvent::new(
            format!("{id}:{ty}"),
            "content-service",
            ty,
            data.to_string().into_bytes(),
        )
    };
    match (command, content.status) {
        (Command::Upload { title }, Status::Draft) => {
            Ok(vec![event("ContentUploaded", json!({ "title": title }))])
        }
        (Command::Upload { .. }, _) => Err("content already uploaded".into()),
        (Command::StartProcessing { processor }, Status::Uploaded) => Ok(vec![event(
            "ContentProcessingStarted",
            json!({ "processor": processor }),
        )]),
        (Command::StartProcessing { .. }, _) => Err("content not ready for processing".into()),
        (Command::Complete, Status::Processing) => {
            Ok(vec![event("ContentProcessingCompleted", json!({}))])
        }
        (Command::Complete, _) => Err("content is not being processed".into()),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("tidegate-content-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(
        dir.join("events.db"),
        Default::default(),
    )?);

    // The command side: each command in a few lines.
    let handle = |id: &'static str, command: Command<'static>| {
        let store = store.clone();
        async move {
            let result = execute(&*store, "content", id, |content: &ContentAggregate| {
                decide(content, id, &command)
            })
            .await;
            match result {
                Ok(done) => println!("{id}: now at version {}", done.version),
                Err(e) => println!("{id}: {e}"),
            }
        }
    };
    handle("lesson-1", Command::Upload { title: "Fractions" }).await;
    handle(
        "lesson-1",
        Command::StartProcessing {
            processor: "transcoder",
        },
    )
    .await;
    handle("lesson-2", Command::Upload { title: "Decimals" }).await;
    handle(
        "lesson-2",
        Command::Upload {
            title: "Decimals, again",
        },
    )
    .await;
    handle("lesson-1", Command::Complete).await;

    // The query side: a read model fed by a group that takes each item's
    // events in version order.
    store
        .subscribe(SubscriptionConfig {
            ordering: Ordering::Key,
            ..SubscriptionConfig::new("content-read-model", "content")
        })
        .await?;
    let read_model: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let consumer = Consumer::new(store.clone(), "content-read-model");
    let policies = Pipeline::builder().build();
    while read_model
        .lock()
        .unwrap()
        .get("lesson-1")
        .map(String::as_str)
        != Some("ContentProcessingCompleted")
    {
        let deliveries = consumer.next().await?;
        consumer
            .handle(&deliveries, &policies, |event| {
                let read_model = read_model.clone();
                async move {
                    let key = event.key.clone().unwrap_or_default();
                    read_model.lock().unwrap().insert(key, event.ty);
                    Ok(())
                }
            })
            .await?;
    }
    println!("read model: {:?}", read_model.lock().unwrap());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
