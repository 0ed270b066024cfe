//! Sagas over real sockets: the happy path; a failure at each step, with
//! the steps done compensated in reverse and none other; a compensation
//! failing twice then succeeding; one never succeeding (stuck) until the
//! upstream heals and an operator retries; starting with an idempotency
//! key; refused starts.

mod support;

use support::Dir;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::{Request, StatusCode};
use serde_json::{json, Value};
use tidegate_gateway::http::server::Running;
use tidegate_testkit::{full, get, send, text, Answer, Upstream};

const TOKEN_VAR: &str = "TIDEGATE_TEST_SAGAS_ADMIN_TOKEN";
const TOKEN: &str = "sagas-admin-token";

/// One call the shop received.
#[derive(Debug, Clone)]
struct Call {
    method: String,
    path: String,
    key: String,
    body: Value,
}

/// The shop's behavior, as a test sets it.
#[derive(Default)]
struct Script {
    /// Failures still to answer per path prefix (503 each).
    failures: HashMap<String, u32>,
    /// Paths that fail for as long as this is set.
    broken: Option<String>,
}

/// An upstream for every step: `POST /reserve`, `/charge`, `/ship`
/// answer 201 with an id, unless the input says `"fail": STEP` (400);
/// `DELETE /reserve/{id}` and `POST /charge/{id}/refund` undo.
struct Shop {
    upstream: Upstream,
    calls: Arc<Mutex<Vec<Call>>>,
    script: Arc<Mutex<Script>>,
}

impl Shop {
    async fn start() -> Shop {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(Script::default()));
        let (log, plan) = (calls.clone(), script.clone());
        let upstream = Upstream::start(move |req| {
            let (log, plan) = (log.clone(), plan.clone());
            async move {
                use http_body_util::BodyExt;
                let method = req.method().to_string();
                let path = req.uri().path().to_owned();
                let key = req
                    .headers()
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let bytes = req.into_body().collect().await.unwrap().to_bytes();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                log.lock().unwrap().push(Call {
                    method: method.clone(),
                    path: path.clone(),
                    key,
                    body: body.clone(),
                });
                {
                    let mut plan = plan.lock().unwrap();
                    if plan.broken.as_deref().is_some_and(|b| path.starts_with(b)) {
                        return text(503, "broken");
                    }
                    let prefix = plan
                        .failures
                        .keys()
                        .find(|p| path.starts_with(p.as_str()))
                        .cloned();
                    if let Some(prefix) = prefix {
                        let left = plan.failures.get_mut(&prefix).unwrap();
                        if *left > 0 {
                            *left -= 1;
                            return text(503, "not now");
                        }
                    }
                }
                let step = path.trim_start_matches('/').split('/').next().unwrap_or("");
                if method == "POST" && body["fail"] == step {
                    return text(400, &format!("{step} refused"));
                }
                let mut answer = text(201, &format!(r#"{{"id":"{step}-1","step":"{step}"}}"#));
                answer.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                answer
            }
        })
        .await;
        Shop {
            upstream,
            calls,
            script,
        }
    }

    /// The calls of saga `id`, as `METHOD path`.
    fn calls_of(&self, id: &str) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.key.starts_with(&format!("{id}:")))
            .map(|c| format!("{} {}", c.method, c.path))
            .collect()
    }
}

/// A gateway with `[events]` and a `checkout` saga of three steps on the
/// shop (one attempt per call; compensations tried `attempts` times).
async fn gateway(dir: &Dir, shop: &Shop, attempts: u32) -> Running {
    std::env::set_var(TOKEN_VAR, TOKEN);
    support::gateway(&format!(
        r#"
[gateway]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
admin_token_env = "{TOKEN_VAR}"

[[upstreams]]
name = "shop"
endpoints = ["{shop}"]
[upstreams.policy.retry]
max_attempts = 1
[upstreams.policy.circuit_breaker]
consecutive_failures = 1000

[events]
path = "{store}"
listen = "127.0.0.1:0"

[[sagas]]
name = "checkout"
compensation = {{ max_attempts = {attempts}, base_delay = "20ms", max_delay = "100ms" }}
[[sagas.steps]]
name = "reserve"
action = {{ upstream = "shop", path = "/reserve", body = {{ items = "{{input.items}}", fail = "{{input.fail}}" }} }}
compensate = {{ upstream = "shop", method = "DELETE", path = "/reserve/{{steps.reserve.response.id}}" }}
[[sagas.steps]]
name = "charge"
action = {{ upstream = "shop", path = "/charge", body = {{ amount = "{{input.amount}}", fail = "{{input.fail}}", order = "order {{saga.id}}" }} }}
compensate = {{ upstream = "shop", path = "/charge/{{steps.charge.response.id}}/refund" }}
[[sagas.steps]]
name = "ship"
action = {{ upstream = "shop", path = "/ship", body = {{ fail = "{{input.fail}}", charge = "{{steps.charge.response.id}}" }} }}
"#,
        shop = shop.upstream.url(),
        store = dir.0.join("events.db").display(),
    ))
    .await
}

/// Waits until the metrics show `line`. A saga is
/// counted once its last event is stored, by the task that stored it: a
/// caller told of the end (woken by that event) can ask a moment before.
async fn counted(running: &Running, line: &str) {
    let url = format!("http://{}/metrics", running.admin_addr);
    support::eventually(line, || async {
        let metrics = get(&url).await.body;
        match metrics.contains(line) {
            true => Ok(()),
            false => Err(metrics),
        }
    })
    .await;
}

fn events_url(running: &Running, path: &str) -> String {
    format!("http://{}{path}", running.events_addr.unwrap())
}

async fn start(running: &Running, input: Value, query: &str, key: Option<&str>) -> Answer {
    let mut request = Request::post(events_url(running, &format!("/v1/sagas/checkout{query}")))
        .header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    send(request.body(full(input.to_string())).unwrap()).await
}

/// Waits (the saga's own `?wait=`) until saga `id` has ended or is stuck.
async fn settled(running: &Running, id: &str) -> Value {
    for _ in 0..50 {
        let state = get(&events_url(running, &format!("/v1/sagas/checkout/{id}")))
            .await
            .json();
        if ["completed", "compensated", "stuck"].contains(&state["status"].as_str().unwrap()) {
            return state;
        }
        // Long-poll through a start of the same id, which waits for it.
        start(running, json!({}), "?wait=2s", Some(id)).await;
    }
    panic!("saga {id} never settled")
}

fn steps(state: &Value) -> Vec<(String, String)> {
    state["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_saga_runs_its_steps_in_order_with_templates_and_idempotency_keys() {
    let dir = Dir::new("sagas-happy");
    let shop = Shop::start().await;
    let running = gateway(&dir, &shop, 3).await;
    let input = json!({"items": [{"sku": "a", "n": 2}], "amount": 42, "fail": "none"});
    let answer = start(&running, input, "?wait=10s", None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let state = answer.json();
    assert_eq!(state["status"], "completed");
    let id = state["id"].as_str().unwrap().to_owned();
    assert_eq!(
        answer.headers["location"],
        format!("/v1/sagas/checkout/{id}").as_str()
    );
    assert_eq!(
        shop.calls_of(&id),
        ["POST /reserve", "POST /charge", "POST /ship"]
    );
    let calls = shop.calls.lock().unwrap().clone();
    assert_eq!(calls[0].key, format!("{id}:reserve:action"));
    assert_eq!(
        calls[0].body["items"],
        json!([{"sku": "a", "n": 2}]),
        "a whole value"
    );
    assert_eq!(calls[1].body["amount"], 42);
    assert_eq!(calls[1].body["order"], format!("order {id}"));
    assert_eq!(
        calls[2].body["charge"], "charge-1",
        "an earlier step's response"
    );
    assert_eq!(
        steps(&state),
        [
            ("reserve".to_owned(), "done".to_owned()),
            ("charge".to_owned(), "done".to_owned()),
            ("ship".to_owned(), "done".to_owned())
        ]
    );
    // Its transitions are events of topic `sagas`, the last its outcome.
    let topic = get(&events_url(
        &running,
        &format!("/v1/topics/sagas/streams/{id}"),
    ))
    .await
    .json();
    let types: Vec<&str> = topic["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types.first(), Some(&"SagaStarted"));
    assert_eq!(types.last(), Some(&"SagaCompleted"));
    counted(
        &running,
        r#"tidegate_sagas_total{saga="checkout",result="completed"} 1"#,
    )
    .await;
}

#[tokio::test]
async fn a_failure_at_each_step_compensates_the_steps_done_in_reverse_and_none_other() {
    let dir = Dir::new("sagas-fail-each");
    let shop = Shop::start().await;
    let running = gateway(&dir, &shop, 3).await;
    let expected: [(&str, &[&str]); 3] = [
        ("reserve", &["POST /reserve"]),
        (
            "charge",
            &["POST /reserve", "POST /charge", "DELETE /reserve/reserve-1"],
        ),
        (
            "ship",
            &[
                "POST /reserve",
                "POST /charge",
                "POST /ship",
                "POST /charge/charge-1/refund",
                "DELETE /reserve/reserve-1",
            ],
        ),
    ];
    for (failing, calls) in expected {
        let input = json!({"items": [], "amount": 1, "fail": failing});
        let answer = start(&running, input, "?wait=10s", None).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        let state = answer.json();
        assert_eq!(state["status"], "compensated", "{state}");
        assert_eq!(state["failed_step"], failing);
        assert!(
            state["error"]
                .as_str()
                .unwrap()
                .contains(&format!("{failing} refused")),
            "{state}"
        );
        let id = state["id"].as_str().unwrap();
        assert_eq!(shop.calls_of(id), calls, "failing at {failing}");
    }
    counted(
        &running,
        r#"tidegate_sagas_total{saga="checkout",result="compensated"} 3"#,
    )
    .await;
}

#[tokio::test]
async fn a_compensation_that_fails_twice_is_tried_again_until_it_succeeds() {
    let dir = Dir::new("sagas-comp-retry");
    let shop = Shop::start().await;
    let running = gateway(&dir, &shop, 5).await;
    shop.script
        .lock()
        .unwrap()
        .failures
        .insert("/reserve/".into(), 2);
    let answer = start(
        &running,
        json!({"items": [], "amount": 1, "fail": "charge"}),
        "?wait=10s",
        None,
    )
    .await;
    let state = answer.json();
    assert_eq!(state["status"], "compensated", "{state}");
    let id = state["id"].as_str().unwrap();
    assert_eq!(
        shop.calls_of(id),
        [
            "POST /reserve",
            "POST /charge",
            "DELETE /reserve/reserve-1",
            "DELETE /reserve/reserve-1",
            "DELETE /reserve/reserve-1"
        ]
    );
    let reserve = &state["steps"][0];
    assert_eq!(reserve["status"], "compensated");
    assert_eq!(reserve["compensations"], 3);
    let keys: Vec<String> = shop
        .calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.method == "DELETE")
        .map(|c| c.key.clone())
        .collect();
    assert!(
        keys.iter()
            .all(|k| *k == format!("{id}:reserve:compensate")),
        "one idempotency key for every try: {keys:?}"
    );
}

#[tokio::test]
async fn a_compensation_that_never_succeeds_leaves_the_saga_stuck_until_an_operator_retries() {
    let dir = Dir::new("sagas-stuck");
    let shop = Shop::start().await;
    let running = gateway(&dir, &shop, 2).await;
    shop.script.lock().unwrap().broken = Some("/reserve/".into());
    let answer = start(
        &running,
        json!({"items": [], "amount": 1, "fail": "ship"}),
        "?wait=10s",
        None,
    )
    .await;
    let state = answer.json();
    assert_eq!(state["status"], "stuck", "{state}");
    let id = state["id"].as_str().unwrap().to_owned();
    assert_eq!(
        state["steps"][1]["status"], "compensated",
        "charge was refunded"
    );
    assert_eq!(state["steps"][0]["status"], "compensation_failed");
    let admin = |path: &str| format!("http://{}{path}", running.admin_addr);
    let status = get(&admin("/status/sagas")).await.json();
    assert_eq!(status["counts"]["checkout"]["stuck"], 1, "{status}");

    // Without the token, nothing moves; a saga that is not stuck cannot
    // be retried.
    let retry = admin(&format!("/v1/sagas/checkout/{id}/retry"));
    let refused = send(Request::post(&retry).body(full("")).unwrap()).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);

    // The upstream heals; the operator retries; the saga ends compensated.
    shop.script.lock().unwrap().broken = None;
    let retried = send(
        Request::post(&retry)
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.body);
    let state = settled(&running, &id).await;
    assert_eq!(state["status"], "compensated", "{state}");
    assert_eq!(state["steps"][0]["status"], "compensated");
    let again = send(
        Request::post(&retry)
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(again.status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn starts_are_idempotent_by_key_and_refused_when_the_input_lacks_a_reference() {
    let dir = Dir::new("sagas-starts");
    let shop = Shop::start().await;
    let running = gateway(&dir, &shop, 3).await;
    let input = json!({"items": [], "amount": 5, "fail": "none"});
    let first = start(&running, input.clone(), "?wait=10s", Some("order-77")).await;
    assert_eq!(first.json()["id"], "order-77");
    assert_eq!(first.json()["status"], "completed");
    let again = start(&running, input, "", Some("order-77")).await;
    assert_eq!(
        again.json()["status"],
        "completed",
        "the same saga, not a new one"
    );
    assert_eq!(shop.calls_of("order-77").len(), 3, "its steps ran once");

    let lacking = start(&running, json!({"items": []}), "", None).await;
    assert_eq!(lacking.status, StatusCode::BAD_REQUEST);
    assert!(
        lacking.json()["error"]
            .as_str()
            .unwrap()
            .contains("{input.fail}"),
        "{}",
        lacking.body
    );
    let unknown = send(
        Request::post(events_url(&running, "/v1/sagas/nope"))
            .body(full("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let missing = get(&events_url(&running, "/v1/sagas/checkout/no-such-id")).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    // Without ?wait the answer is at once: 202 and where to look.
    let accepted = start(
        &running,
        json!({"items": [], "amount": 1, "fail": "none"}),
        "",
        None,
    )
    .await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED);
    assert!(accepted.headers.contains_key("location"));
}
