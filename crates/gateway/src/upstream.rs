//! An upstream service: its endpoints with their health, and the policy
//! pipeline every request to it runs through.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Response, StatusCode};
use hyper::body::Incoming;
use tidegate_resilience::breaker::Outcome;
use tidegate_resilience::config::ConfigError;
use tidegate_resilience::retry::RetryAction;
use tidegate_resilience::{Error, Pipeline};

use tidegate_client::headers::retry_after;

use crate::config::{Endpoint, UpstreamConfig};

/// Why one attempt failed. `retryable` is decided by the attempt, which
/// knows the method, whether the body can be sent again and whether the
/// request left.
#[derive(Debug)]
pub enum AttemptError {
    /// No connection could be made; nothing was sent.
    Connect(hyper_util::client::legacy::Error),
    /// The exchange broke after the request was (maybe) sent.
    Request {
        /// The client error.
        error: hyper_util::client::legacy::Error,
        /// Safe to send again.
        retryable: bool,
    },
    /// No response head within the attempt timeout.
    Timeout {
        /// Safe to send again.
        retryable: bool,
    },
    /// The upstream answered with a status worth retrying (502, 503, 504, 429).
    Status {
        /// The answer, handed to the client if no retry follows.
        response: Response<Incoming>,
        /// Safe to send again.
        retryable: bool,
    },
    /// The client's body passed the size limit.
    BodyTooLarge,
    /// A streamed body went with an attempt that failed; it cannot be sent again.
    BodyGone,
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Connect(e) => write!(f, "connect failed: {}", source_text(e)),
            AttemptError::Request { error, .. } => {
                write!(f, "upstream request failed: {}", source_text(error))
            }
            AttemptError::Timeout { .. } => f.write_str("upstream timed out"),
            AttemptError::Status { response, .. } => {
                write!(f, "upstream answered {}", response.status())
            }
            AttemptError::BodyTooLarge => f.write_str("request body too large"),
            AttemptError::BodyGone => f.write_str("request body already sent"),
        }
    }
}

fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl std::error::Error for AttemptError {}

/// The pipeline of one upstream.
pub type UpstreamPipeline = Pipeline<Response<Incoming>, AttemptError>;

/// One endpoint and what the gateway knows of it.
#[derive(Debug)]
pub struct EndpointState {
    /// Where it is.
    pub endpoint: Endpoint,
    /// `http://host:port`, for labels and status.
    pub label: String,
    healthy: AtomicBool,
    /// Requests in flight to it.
    pub in_flight: AtomicU64,
}

impl EndpointState {
    /// Whether it gets traffic.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Marks it; returns whether that changed anything.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed) != healthy
    }
}

/// An upstream service at run time.
#[derive(Debug)]
pub struct Upstream {
    /// Its config.
    pub config: UpstreamConfig,
    /// `config.name`, shared so metrics need no copy per request.
    pub label: Arc<String>,
    /// Its endpoints.
    pub endpoints: Vec<EndpointState>,
    next: AtomicUsize,
    /// Per-attempt timeout (applied by the attempt itself, see [`AttemptError`]).
    pub attempt_timeout: Option<Duration>,
    /// The policies.
    pub pipeline: UpstreamPipeline,
    /// Requests in flight (until the response body ends).
    pub in_flight: AtomicU64,
    /// Local rejections since start.
    pub rejections: AtomicU32,
}

impl Upstream {
    /// The upstream of `config`, every endpoint healthy until checked.
    pub fn new(config: UpstreamConfig) -> Result<Arc<Self>, ConfigError> {
        let mut policy = config.policy;
        let attempt_timeout = policy.timeout.take();
        let pipeline = Pipeline::from_config(&policy)?
            .classify(classify)
            .retry_on(retry_on)
            .build();
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| EndpointState {
                label: e.to_string(),
                endpoint: e.clone(),
                healthy: AtomicBool::new(true),
                in_flight: AtomicU64::new(0),
            })
            .collect();
        Ok(Arc::new(Upstream {
            label: Arc::new(config.name.clone()),
            config,
            endpoints,
            next: AtomicUsize::new(0),
            attempt_timeout,
            pipeline,
            in_flight: AtomicU64::new(0),
            rejections: AtomicU32::new(0),
        }))
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The next healthy endpoint in round-robin order, if any is healthy.
    pub fn pick(&self) -> Option<&EndpointState> {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.endpoints[(start + i) % n])
            .find(|e| e.is_healthy())
    }

    /// Whether any endpoint is healthy.
    pub fn has_healthy_endpoint(&self) -> bool {
        self.endpoints.iter().any(EndpointState::is_healthy)
    }
}

/// How a result counts for the breaker: 5xx and failed exchanges are
/// failures; 429 and the client's own errors count for nothing.
fn classify(result: &Result<Response<Incoming>, AttemptError>) -> Outcome {
    match result {
        Ok(response) if response.status().is_server_error() => Outcome::Failure,
        Ok(_) => Outcome::Success,
        Err(AttemptError::Status { response, .. })
            if response.status() == StatusCode::TOO_MANY_REQUESTS =>
        {
            Outcome::Ignore
        }
        Err(AttemptError::BodyTooLarge | AttemptError::BodyGone) => Outcome::Ignore,
        Err(_) => Outcome::Failure,
    }
}

/// Which results get another attempt: what the attempt marked retryable;
/// a 429 only with a Retry-After, which then sets the delay.
fn retry_on(result: &Result<Response<Incoming>, Error<AttemptError>>) -> RetryAction {
    let Err(err) = result else {
        return RetryAction::Return;
    };
    match err.inner() {
        Some(AttemptError::Connect(_)) => RetryAction::Retry,
        Some(
            AttemptError::Request {
                retryable: true, ..
            }
            | AttemptError::Timeout { retryable: true },
        ) => RetryAction::Retry,
        Some(AttemptError::Status {
            response,
            retryable: true,
        }) => match retry_after(response.headers()) {
            Some(delay) => RetryAction::RetryAfter(delay),
            None if response.status() == StatusCode::TOO_MANY_REQUESTS => RetryAction::Return,
            None => RetryAction::Retry,
        },
        _ => RetryAction::Return,
    }
}
