//! Sagas (DESIGN.md "Sagas and event contracts"): the steps of a
//! `[[sagas]]` run in order, each call through its upstream's policies
//! with `Idempotency-Key: {saga id}:{step}:{action|compensate}`; when a
//! step fails for good, the steps done are compensated in reverse; a
//! compensation is tried again (`compensation` backoff) until it
//! succeeds, else the saga is `stuck` until an operator's `retry`.
//!
//! Every transition is an event of topic [`TOPIC`] keyed by the saga's id,
//! appended at the version the driver read: the store decides which
//! driver owns a saga (another's append is a conflict, and it stops). A
//! gateway that starts reads the topic and drives again every saga that
//! was running; a step whose call was in flight is sent again with the
//! same idempotency key, so the upstream can tell. The last event
//! (`SagaCompleted`, `SagaCompensated`) is the outcome other services
//! subscribe to.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, StatusCode};
use serde::Serialize;
use serde_json::{json, Value};
use tidegate_events::{Append, AppendError, Event, ExpectedVersion, NewEvent, Store, StoreError};
use tokio::sync::watch;

use crate::config::{SagaCall, SagaConfig, Scope};
use crate::http::headers::{self, CORRELATION_ID};
use crate::observe::telemetry::{Attributes, Kind};
use crate::proxy::Gateway;

/// The topic of every saga's transitions.
pub const TOPIC: &str = "sagas";

/// The idempotency key header of every step's call.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// A step's call without a `timeout` of its own is bounded by its
/// upstream's policies only.
const NO_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// Most of an answer kept as a step's response.
const MAX_RESPONSE: usize = 1024 * 1024;

/// The event types of the transitions in topic [`TOPIC`]; every event's
/// data holds `saga` (the saga's name), and a step's its `step`.
pub mod types {
    /// `{"saga", "input"}`: the first event of a saga.
    pub const STARTED: &str = "SagaStarted";
    /// `{"step", "attempt"}`: a step's action is being sent.
    pub const STEP_STARTED: &str = "SagaStepStarted";
    /// `{"step", "status", "response"}`: the action answered 2xx.
    pub const STEP_SUCCEEDED: &str = "SagaStepSucceeded";
    /// `{"step", "status"?, "error"}`: the action failed for good.
    pub const STEP_FAILED: &str = "SagaStepFailed";
    /// `{"step", "attempt"}`: a compensation is being sent.
    pub const COMPENSATION_STARTED: &str = "SagaCompensationStarted";
    /// `{"step", "status"}`: undone (2xx, or 404 / 410: already gone).
    pub const COMPENSATION_SUCCEEDED: &str = "SagaCompensationSucceeded";
    /// `{"step", "attempt", "error"}`: this try failed.
    pub const COMPENSATION_FAILED: &str = "SagaCompensationFailed";
    /// `{"step", "error"}`: a compensation failed every try; an operator's
    /// retry goes on.
    pub const STUCK: &str = "SagaStuck";
    /// An operator's retry of a stuck saga.
    pub const RETRIED: &str = "SagaRetried";
    /// `{"responses"}`: every step done. The outcome for choreography.
    pub const COMPLETED: &str = "SagaCompleted";
    /// `{"failed_step", "error"}`: every step done before the failure is
    /// undone. The outcome for choreography.
    pub const COMPENSATED: &str = "SagaCompensated";
}

/// A saga as its events tell it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SagaState {
    /// Its id.
    pub id: String,
    /// Which `[[sagas]]` it is.
    pub saga: String,
    /// `running`, `compensating`, `completed`, `compensated` or `stuck`.
    pub status: &'static str,
    /// What it was started with.
    pub input: Value,
    /// Its steps, in order.
    pub steps: Vec<StepState>,
    /// The step that failed for good, once one did.
    pub failed_step: Option<String>,
    /// Why (the last error of the saga).
    pub error: Option<String>,
    /// When it started and last moved (RFC 3339).
    pub started_at: String,
    /// When it last moved.
    pub updated_at: String,
    /// Its stream's version (the next transition is appended after it).
    #[serde(skip)]
    pub version: u64,
}

/// One step of a saga as its events tell it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepState {
    /// Its name.
    pub name: String,
    /// `pending`, `running`, `done`, `failed`, `compensating`,
    /// `compensated` or `compensation_failed`.
    pub status: &'static str,
    /// Times its action was sent.
    pub attempts: u32,
    /// Times its compensation was sent since the saga last moved on.
    pub compensations: u32,
    /// Its action's JSON answer, once done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<Value>,
    /// Its last error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SagaState {
    /// Whether it is over (`stuck` is not: it waits for a retry).
    pub fn is_finished(&self) -> bool {
        matches!(self.status, "completed" | "compensated")
    }

    fn step_mut(&mut self, name: &str) -> &mut StepState {
        let at = match self.steps.iter().position(|s| s.name == name) {
            Some(at) => at,
            None => {
                self.steps.push(StepState::new(name));
                self.steps.len() - 1
            }
        };
        &mut self.steps[at]
    }

    /// The saga told by `events` (its stream, in version order), with the
    /// steps `config` lists; `None` if the stream does not start a saga.
    pub fn fold(events: &[Event], config: Option<&SagaConfig>) -> Option<Self> {
        let first = events.first()?;
        if first.ty != types::STARTED {
            return None;
        }
        let data: Value = serde_json::from_slice(&first.data).ok()?;
        let mut state = SagaState {
            id: first.key.clone()?,
            saga: data["saga"].as_str()?.to_owned(),
            status: "running",
            input: data["input"].clone(),
            steps: config
                .map(|c| c.steps.iter().map(|s| StepState::new(&s.name)).collect())
                .unwrap_or_default(),
            failed_step: None,
            error: None,
            started_at: first.time.clone(),
            updated_at: first.time.clone(),
            version: first.version.unwrap_or(1),
        };
        for event in &events[1..] {
            let data: Value = serde_json::from_slice(&event.data).unwrap_or(Value::Null);
            let step = data["step"].as_str().unwrap_or_default().to_owned();
            let error = data["error"].as_str().map(str::to_owned);
            match event.ty.as_str() {
                types::STEP_STARTED => {
                    let s = state.step_mut(&step);
                    s.status = "running";
                    s.attempts += 1;
                }
                types::STEP_SUCCEEDED => {
                    let s = state.step_mut(&step);
                    s.status = "done";
                    s.response = Some(data["response"].clone());
                    s.error = None;
                }
                types::STEP_FAILED => {
                    let s = state.step_mut(&step);
                    s.status = "failed";
                    s.error.clone_from(&error);
                    state.status = "compensating";
                    state.failed_step = Some(step);
                    state.error = error;
                }
                types::COMPENSATION_STARTED => {
                    let s = state.step_mut(&step);
                    s.status = "compensating";
                    s.compensations += 1;
                }
                types::COMPENSATION_SUCCEEDED => {
                    let s = state.step_mut(&step);
                    s.status = "compensated";
                    s.error = None;
                }
                types::COMPENSATION_FAILED => {
                    let s = state.step_mut(&step);
                    s.status = "compensation_failed";
                    s.error.clone_from(&error);
                    state.error = error;
                }
                types::STUCK => state.status = "stuck",
                types::RETRIED => {
                    state.status = "compensating";
                    for s in &mut state.steps {
                        s.compensations = 0;
                    }
                }
                types::COMPLETED => state.status = "completed",
                types::COMPENSATED => state.status = "compensated",
                _ => {}
            }
            state.updated_at.clone_from(&event.time);
            state.version = event.version.unwrap_or(state.version + 1);
        }
        Some(state)
    }

    /// What the saga does next under `config`.
    fn next(&self, config: &SagaConfig) -> Next {
        match self.status {
            "running" => {
                for (index, step) in config.steps.iter().enumerate() {
                    let done = self
                        .steps
                        .iter()
                        .any(|s| s.name == step.name && s.status == "done");
                    if !done {
                        return Next::Act(index);
                    }
                }
                Next::Complete
            }
            "compensating" => {
                for (index, step) in config.steps.iter().enumerate().rev() {
                    if step.compensate.is_none() {
                        continue;
                    }
                    let Some(state) = self.steps.iter().find(|s| s.name == step.name) else {
                        continue;
                    };
                    // Done (its action succeeded) and not yet undone.
                    if state.response.is_some() && state.status != "compensated" {
                        return Next::Compensate(index, state.compensations + 1);
                    }
                }
                Next::Compensated
            }
            _ => Next::Wait,
        }
    }

    /// The responses of `config`'s steps, in order (for templates).
    fn responses(&self, config: &SagaConfig) -> Vec<Option<Value>> {
        config
            .steps
            .iter()
            .map(|step| {
                self.steps
                    .iter()
                    .find(|s| s.name == step.name)
                    .and_then(|s| s.response.clone())
            })
            .collect()
    }
}

impl StepState {
    fn new(name: &str) -> Self {
        StepState {
            name: name.to_owned(),
            status: "pending",
            attempts: 0,
            compensations: 0,
            response: None,
            error: None,
        }
    }
}

enum Next {
    Act(usize),
    Compensate(usize, u32),
    Complete,
    Compensated,
    Wait,
}

/// Why a saga could not be started.
#[derive(Debug)]
pub enum StartError {
    /// No `[[sagas]]` by that name.
    Unknown,
    /// The input lacks what a step refers to.
    Input(String),
    /// The id is a saga of another name.
    Taken(String),
    /// The store failed.
    Store(StoreError),
}

/// Why a saga could not be retried.
#[derive(Debug)]
pub enum RetryError {
    /// No saga by that name and id.
    Unknown,
    /// It is not stuck.
    NotStuck(&'static str),
    /// The store failed.
    Store(StoreError),
}

/// The sagas of one gateway: their drivers, and who waits for them.
pub struct Sagas {
    store: Arc<dyn Store>,
    gateway: Weak<Gateway>,
    stop: watch::Receiver<bool>,
    /// Ids driven here now.
    driving: Mutex<HashSet<String>>,
    /// Bumped at each transition this gateway appends.
    moved: watch::Sender<u64>,
}

impl std::fmt::Debug for Sagas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sagas").finish_non_exhaustive()
    }
}

impl Sagas {
    /// The sagas over `store`, calling through `gateway`'s upstreams until
    /// `stop`.
    pub fn new(store: Arc<dyn Store>, gateway: Weak<Gateway>, stop: watch::Receiver<bool>) -> Self {
        Sagas {
            store,
            gateway,
            stop,
            driving: Mutex::new(HashSet::new()),
            moved: watch::channel(0).0,
        }
    }

    fn config(&self, name: &str) -> Option<SagaConfig> {
        let gateway = self.gateway.upgrade()?;
        let table = gateway.table();
        table.sagas.iter().find(|s| s.name == name).cloned()
    }

    /// The saga `id`, if there is one.
    pub async fn state(&self, id: &str) -> Result<Option<SagaState>, StoreError> {
        let mut events = Vec::new();
        loop {
            let from = events.len() as u64 + 1;
            let page = self.store.read_stream(TOPIC, id, from, 1000).await?;
            let last = page.len() < 1000;
            events.extend(page);
            if last {
                break;
            }
        }
        Ok(self.fold(&events))
    }

    /// The saga told by `events` (one saga's, in version order), with the
    /// steps its config lists now.
    fn fold(&self, events: &[Event]) -> Option<SagaState> {
        let name = events
            .first()
            .and_then(|e| serde_json::from_slice::<Value>(&e.data).ok())
            .and_then(|d| d["saga"].as_str().map(str::to_owned));
        let config = name.as_deref().and_then(|n| self.config(n));
        SagaState::fold(events, config.as_ref())
    }

    /// Every saga's events, read from the topic in one pass, sagas in the
    /// order they started.
    async fn all(&self) -> Result<Vec<Vec<Event>>, StoreError> {
        let mut sagas: Vec<Vec<Event>> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut from = 1;
        loop {
            let page = self.store.read(TOPIC, from, 1000).await?;
            let Some(end) = page.last().map(|e| e.position) else {
                break;
            };
            for event in page {
                let Some(key) = event.key.clone() else {
                    continue;
                };
                let at = *index.entry(key).or_insert_with(|| {
                    sagas.push(Vec::new());
                    sagas.len() - 1
                });
                sagas[at].push(event);
            }
            from = end + 1;
        }
        Ok(sagas)
    }

    /// Starts saga `name` with `input`, as `id` (a caller's idempotency
    /// key) or a new id. Starting an id that exists answers its state.
    pub async fn start(
        self: &Arc<Self>,
        name: &str,
        id: Option<String>,
        input: Value,
    ) -> Result<SagaState, StartError> {
        let config = self.config(name).ok_or(StartError::Unknown)?;
        // A start sent again (the same key) is the saga it started.
        if let Some(id) = &id {
            if let Some(state) = self.state(id).await.map_err(StartError::Store)? {
                if state.saga != name {
                    return Err(StartError::Taken(state.saga));
                }
                return Ok(state);
            }
        }
        if let Some(missing) = config.missing_input(&input) {
            return Err(StartError::Input(missing));
        }
        let id = id.unwrap_or_else(headers::new_id);
        let started = self
            .append(
                &id,
                ExpectedVersion::NoStream,
                types::STARTED,
                json!({ "saga": name, "input": input }),
            )
            .await;
        match started {
            Ok(()) => self.drive(id.clone()),
            Err(AppendError::Conflict { .. }) => {}
            Err(AppendError::Store(e)) => return Err(StartError::Store(e)),
            Err(e) => return Err(StartError::Store(StoreError(e.to_string()))),
        }
        let state = self
            .state(&id)
            .await
            .map_err(StartError::Store)?
            .ok_or_else(|| StartError::Store(StoreError("the saga's start is gone".into())))?;
        if state.saga != name {
            return Err(StartError::Taken(state.saga));
        }
        Ok(state)
    }

    /// Tries a stuck saga's compensations again.
    pub async fn retry(self: &Arc<Self>, name: &str, id: &str) -> Result<SagaState, RetryError> {
        let state = self
            .state(id)
            .await
            .map_err(RetryError::Store)?
            .filter(|s| s.saga == name)
            .ok_or(RetryError::Unknown)?;
        if state.status != "stuck" {
            return Err(RetryError::NotStuck(state.status));
        }
        match self
            .append(
                id,
                ExpectedVersion::Exactly(state.version),
                types::RETRIED,
                json!({ "saga": name }),
            )
            .await
        {
            Ok(()) | Err(AppendError::Conflict { .. }) => {}
            Err(e) => return Err(RetryError::Store(StoreError(e.to_string()))),
        }
        self.drive(id.to_owned());
        self.state(id)
            .await
            .map_err(RetryError::Store)?
            .ok_or(RetryError::Unknown)
    }

    /// The saga `id` once it is over or stuck, or as it is at `until`.
    pub async fn wait(
        &self,
        id: &str,
        until: tokio::time::Instant,
    ) -> Result<Option<SagaState>, StoreError> {
        let mut moved = self.moved.subscribe();
        loop {
            let state = self.state(id).await?;
            let settled = state
                .as_ref()
                .is_none_or(|s| s.is_finished() || s.status == "stuck");
            if settled {
                return Ok(state);
            }
            match tokio::time::timeout_at(until, moved.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.state(id).await,
            }
        }
    }

    /// Drives again every saga of the topic that was running or
    /// compensating when the gateway stopped.
    pub async fn resume(self: &Arc<Self>) -> Result<usize, StoreError> {
        let mut resumed = 0;
        for events in self.all().await? {
            let (Some(first), Some(last)) = (events.first(), events.last()) else {
                continue;
            };
            let ended = matches!(
                last.ty.as_str(),
                types::COMPLETED | types::COMPENSATED | types::STUCK
            );
            if let (false, Some(id)) = (ended, first.key.clone()) {
                self.drive(id);
                resumed += 1;
            }
        }
        Ok(resumed)
    }

    /// Counts of sagas by name and status, and the latest of them (for
    /// `/status/sagas` and the dashboard).
    pub async fn status(&self, latest: usize) -> Result<Value, StoreError> {
        let mut counts: HashMap<String, HashMap<&'static str, u64>> = HashMap::new();
        let mut states = Vec::new();
        for events in self.all().await? {
            if let Some(state) = self.fold(&events) {
                *counts
                    .entry(state.saga.clone())
                    .or_default()
                    .entry(state.status)
                    .or_default() += 1;
                states.push(state);
            }
        }
        states.sort_by(|a, b| b.updated_at.cmp(&a.updated_at));
        states.truncate(latest);
        Ok(json!({ "counts": counts, "latest": states }))
    }

    /// Runs saga `id` in a task of its own, unless one here already does.
    fn drive(self: &Arc<Self>, id: String) {
        let fresh = self
            .driving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone());
        if !fresh {
            return;
        }
        let sagas = self.clone();
        tokio::spawn(async move {
            if let Err(e) = sagas.run(&id).await {
                tracing::warn!(saga_id = %id, error = %e, "a saga's driver stopped; it goes on when the gateway starts again");
            }
            sagas
                .driving
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
    }

    /// Appends one transition of saga `id` at `expected`.
    async fn append(
        &self,
        id: &str,
        expected: ExpectedVersion,
        ty: &str,
        data: Value,
    ) -> Result<(), AppendError> {
        let mut event = NewEvent::new(
            headers::new_id(),
            format!(
                "/tidegate/sagas/{}",
                data["saga"].as_str().unwrap_or_default()
            ),
            ty,
            data.to_string().into_bytes(),
        );
        event.datacontenttype = Some("application/json".into());
        self.store
            .append(Append::to_key(TOPIC, id, expected, vec![event]))
            .await?;
        self.moved.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Drives saga `id` until it ends, is stuck, another driver owns it,
    /// or the gateway stops.
    async fn run(self: &Arc<Self>, id: &str) -> Result<(), String> {
        let mut stop = self.stop.clone();
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let state = self
                .state(id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("no such saga")?;
            let Some(config) = self.config(&state.saga) else {
                return Err(format!("saga `{}` is no longer in the config", state.saga));
            };
            let at = ExpectedVersion::Exactly(state.version);
            let name = json!(state.saga);
            let moved = match state.next(&config) {
                Next::Wait => return Ok(()),
                Next::Complete => {
                    let responses: serde_json::Map<String, Value> = state
                        .steps
                        .iter()
                        .filter_map(|s| Some((s.name.clone(), s.response.clone()?)))
                        .collect();
                    let done = self
                        .append(
                            id,
                            at,
                            types::COMPLETED,
                            json!({ "saga": name, "responses": responses }),
                        )
                        .await;
                    self.ended(&state.saga, "completed", &done);
                    return own(done).map(drop);
                }
                Next::Compensated => {
                    let done = self
                        .append(
                            id,
                            at,
                            types::COMPENSATED,
                            json!({ "saga": name, "failed_step": state.failed_step, "error": state.error }),
                        )
                        .await;
                    self.ended(&state.saga, "compensated", &done);
                    return own(done).map(drop);
                }
                Next::Act(index) => {
                    let step = &config.steps[index];
                    let started = self
                        .append(
                            id,
                            at,
                            types::STEP_STARTED,
                            json!({ "saga": name, "step": step.name, "attempt": state.steps.iter().find(|s| s.name == step.name).map_or(0, |s| s.attempts) + 1 }),
                        )
                        .await;
                    if !own(started)? {
                        return Ok(());
                    }
                    let outcome = self
                        .call(
                            &state,
                            &config,
                            &step.action,
                            &step.name,
                            "action",
                            step.timeout,
                        )
                        .await;
                    let (ty, data) = match outcome {
                        Ok((status, response)) if status.is_success() => (
                            types::STEP_SUCCEEDED,
                            json!({ "saga": name, "step": step.name, "status": status.as_u16(), "response": response }),
                        ),
                        Ok((status, response)) => (
                            types::STEP_FAILED,
                            json!({ "saga": name, "step": step.name, "status": status.as_u16(), "error": format!("{status}: {}", short(&response)) }),
                        ),
                        Err(why) => (
                            types::STEP_FAILED,
                            json!({ "saga": name, "step": step.name, "error": why }),
                        ),
                    };
                    self.append(id, ExpectedVersion::Exactly(state.version + 1), ty, data)
                        .await
                }
                Next::Compensate(index, attempt) => {
                    let step = &config.steps[index];
                    let call = step
                        .compensate
                        .as_ref()
                        .expect("a step with a compensation");
                    let started = self
                        .append(
                            id,
                            at,
                            types::COMPENSATION_STARTED,
                            json!({ "saga": name, "step": step.name, "attempt": attempt }),
                        )
                        .await;
                    if !own(started)? {
                        return Ok(());
                    }
                    let outcome = self
                        .call(
                            &state,
                            &config,
                            call,
                            &step.name,
                            "compensate",
                            step.timeout,
                        )
                        .await;
                    let after = ExpectedVersion::Exactly(state.version + 1);
                    // Already gone (404, 410) is undone too.
                    let undone = |s: StatusCode| {
                        s.is_success() || s == StatusCode::NOT_FOUND || s == StatusCode::GONE
                    };
                    let error = match outcome {
                        Ok((status, _)) if undone(status) => {
                            let done = self
                                .append(
                                    id,
                                    after,
                                    types::COMPENSATION_SUCCEEDED,
                                    json!({ "saga": name, "step": step.name, "status": status.as_u16() }),
                                )
                                .await;
                            if !own(done)? {
                                return Ok(());
                            }
                            continue;
                        }
                        Ok((status, response)) => format!("{status}: {}", short(&response)),
                        Err(why) => why,
                    };
                    let failed = self
                        .append(
                            id,
                            after,
                            types::COMPENSATION_FAILED,
                            json!({ "saga": name, "step": step.name, "attempt": attempt, "error": error }),
                        )
                        .await;
                    if !own(failed)? {
                        return Ok(());
                    }
                    if attempt >= config.compensation.max_attempts {
                        let stuck = self
                            .append(
                                id,
                                ExpectedVersion::Exactly(state.version + 2),
                                types::STUCK,
                                json!({ "saga": name, "step": step.name, "error": error }),
                            )
                            .await;
                        self.ended(&state.saga, "stuck", &stuck);
                        return own(stuck).map(drop);
                    }
                    let delay = config.compensation.delay(attempt);
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
                    }
                    continue;
                }
            };
            if !own(moved)? {
                return Ok(());
            }
        }
    }

    fn ended(&self, saga: &str, result: &'static str, appended: &Result<(), AppendError>) {
        if appended.is_ok() {
            if let Some(gateway) = self.gateway.upgrade() {
                gateway.metrics.saga(saga, result);
            }
        }
    }

    /// Sends one call of a step; its status and JSON answer (`null` when
    /// it has none), or why there was no answer.
    async fn call(
        &self,
        state: &SagaState,
        config: &SagaConfig,
        call: &SagaCall,
        step: &str,
        kind: &str,
        timeout: Option<Duration>,
    ) -> Result<(StatusCode, Value), String> {
        let gateway = self.gateway.upgrade().ok_or("the gateway is stopping")?;
        let table = gateway.table();
        let responses = state.responses(config);
        let scope = Scope {
            id: &state.id,
            input: &state.input,
            responses: &responses,
        };
        let path = call.path(scope)?;
        let body = call.body(scope)?;
        let upstream = table
            .upstreams
            .get(call.upstream)
            .ok_or("the step's upstream is gone")?;
        let mut headers = HeaderMap::new();
        let key = format!("{}:{step}:{kind}", state.id);
        headers.insert(
            &IDEMPOTENCY_KEY,
            HeaderValue::from_str(&key).map_err(|_| "the saga id cannot be a header")?,
        );
        if let Ok(id) = HeaderValue::from_str(&state.id) {
            headers.insert(&CORRELATION_ID, id);
        }
        let body = match body {
            Some(value) => {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                Bytes::from(value.to_string())
            }
            None => Bytes::new(),
        };
        // Every step of a saga is a span in one trace, named by its id.
        let span = gateway
            .telemetry()
            .map(|telemetry| telemetry.begin_in(trace_of(&state.id)));
        if let Some(span) = span {
            let sent = headers::child_traceparent(Some(&span.traceparent()));
            headers.insert(&headers::TRACEPARENT, sent);
        }
        let (exchanged, _) = gateway
            .exchange(
                gateway.client(),
                upstream,
                call.method.clone(),
                path,
                headers,
                body,
                timeout.unwrap_or(NO_LIMIT),
                MAX_RESPONSE,
                span.and_then(|s| s.recorded()),
            )
            .await;
        if let (Some(telemetry), Some(span)) = (gateway.telemetry(), span) {
            let mut attributes: Attributes = vec![
                ("tidegate.saga.name", config.name.clone().into()),
                ("tidegate.saga.id", state.id.clone().into()),
                ("tidegate.saga.step", step.to_owned().into()),
                ("tidegate.saga.call", kind.to_owned().into()),
                ("tidegate.upstream", upstream.name().to_owned().into()),
            ];
            let error = match &exchanged {
                Ok((status, ..)) => {
                    attributes.push((
                        "http.response.status_code",
                        i64::from(status.as_u16()).into(),
                    ));
                    (!status.is_success()).then(|| format!("answered {status}"))
                }
                Err(reply) => Some(reply.message().to_owned()),
            };
            telemetry.end(
                span,
                format!("saga {} {step} {kind}", config.name),
                Kind::Internal,
                attributes,
                error,
            );
        }
        let (status, _, body) = exchanged.map_err(|reply| reply.message().to_owned())?;
        let response = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()))
        };
        Ok((status, response))
    }
}

/// The trace of saga `id`'s steps: a hash of its id, so every replica
/// and restart puts them in the same trace.
fn trace_of(id: &str) -> [u8; 16] {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("tidegate saga {id}").as_bytes());
    let mut trace = [0; 16];
    trace.copy_from_slice(&digest[..16]);
    trace
}

/// `Ok(true)` when the append went in; `Ok(false)` when another driver
/// moved the saga first (this one stops); the store's error otherwise.
fn own(appended: Result<(), AppendError>) -> Result<bool, String> {
    match appended {
        Ok(()) => Ok(true),
        Err(AppendError::Conflict { .. }) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// An answer, short enough for an error.
fn short(response: &Value) -> String {
    let text = match response {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match text.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}
