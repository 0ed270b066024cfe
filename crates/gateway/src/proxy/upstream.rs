//! An upstream service: its endpoints with their health, and the policy
//! pipeline every request to it runs through.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::HeaderName;
use http::StatusCode;
use tidegate_resilience::breaker::Outcome;
use tidegate_resilience::retry::RetryAction;
use tidegate_resilience::{rng, Error, Pipeline};
use tokio::time::Instant;

use tidegate_client::headers::retry_after;

use crate::config::{Endpoint, LoadBalancing, OutlierDetection, UpstreamConfig};
use crate::observe::stats::Traffic;
use crate::observe::striped::{stripe, Line, StripedGauge, STRIPES};
use crate::proxy::client::{Destination, UpstreamResponse};
use crate::proxy::pool::PoolGate;

/// Why one attempt failed. `retryable` is decided by the attempt, which
/// knows the method, whether the body can be sent again and whether the
/// request left.
#[derive(Debug)]
// `Status` holds the answer, as the `Ok` side of every attempt's result
// does: boxing it would save no space there and cost an allocation.
#[allow(clippy::large_enum_variant)]
pub enum AttemptError {
    /// No connection could be made; nothing was sent.
    Connect(std::io::Error),
    /// The TLS handshake failed (certificate, name, protocol); nothing
    /// was sent.
    Tls(std::io::Error),
    /// The exchange broke after the request was (maybe) sent.
    Request {
        /// The client error.
        error: crate::http::body::BoxError,
        /// Safe to send again.
        retryable: bool,
    },
    /// No response head within the attempt timeout.
    Timeout {
        /// Safe to send again.
        retryable: bool,
    },
    /// No response head before the request's deadline: nothing follows.
    DeadlinePassed,
    /// The upstream answered with a status worth retrying (502, 503, 504,
    /// 429), or a gRPC call failed (see [`crate::proxy`]'s judging).
    Status {
        /// The answer, handed to the client if no retry follows.
        response: UpstreamResponse,
        /// The status it counts as: its own, or its `grpc-status`'s.
        status: StatusCode,
        /// Worth, and safe, to send again.
        retryable: bool,
    },
    /// The client's body passed the size limit.
    BodyTooLarge,
    /// A streamed body went with an attempt that failed; it cannot be sent again.
    BodyGone,
    /// Every endpoint is unhealthy or ejected.
    NoEndpoint,
    /// Too many requests wait for a connection to the upstream.
    PoolOverflow,
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Connect(e) => write!(f, "connect failed: {}", source_text(e)),
            AttemptError::Tls(e) => write!(f, "TLS handshake failed: {}", source_text(e)),
            AttemptError::Request { error, .. } => {
                write!(f, "upstream request failed: {}", source_text(&**error))
            }
            AttemptError::Timeout { .. } => f.write_str("upstream timed out"),
            AttemptError::DeadlinePassed => f.write_str("deadline passed"),
            AttemptError::Status { status, .. } => write!(f, "upstream answered {status}"),
            AttemptError::BodyTooLarge => f.write_str("request body too large"),
            AttemptError::BodyGone => f.write_str("request body already sent"),
            AttemptError::NoEndpoint => f.write_str("no healthy endpoint"),
            AttemptError::PoolOverflow => crate::proxy::pool::PoolOverflow.fmt(f),
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
pub type UpstreamPipeline = Pipeline<UpstreamResponse, AttemptError>;

/// One endpoint and what the gateway knows of it.
#[derive(Debug)]
pub struct EndpointState {
    /// Where it is.
    pub endpoint: Endpoint,
    /// How its requests are sent (version, TLS).
    pub to: Destination,
    /// `http://host:port`, for labels and status.
    pub label: String,
    healthy: AtomicBool,
    /// Attempts in flight to it, striped: every worker counts each of
    /// its attempts, and only least-request balancing and the status API
    /// read the sum.
    pub in_flight: StripedGauge,
    /// `label` hashed, for consistent hashing.
    hash: u64,
    /// Errors in a row, for outlier detection.
    errors: AtomicU32,
    /// End of its latest ejection, in nanoseconds since the upstream's
    /// origin; 0 if never ejected.
    ejected_until: AtomicU64,
    /// Ejections so far; multiplies the next ejection's length.
    ejections: AtomicU32,
}

/// A count that a [`Counted`] takes up and back down.
pub trait Count {
    /// One more.
    fn up(&self);
    /// One fewer.
    fn down(&self);
}

impl Count for AtomicU64 {
    fn up(&self) {
        self.fetch_add(1, Ordering::Relaxed);
    }

    fn down(&self) {
        self.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Count for StripedGauge {
    fn up(&self) {
        self.inc();
    }

    fn down(&self) {
        self.dec();
    }
}

/// One counted in a count until dropped: an attempt in its endpoint's
/// `in_flight` (until answered, failed, or cancelled by a deadline or a
/// client gone), a request waiting for a pooled connection.
#[derive(Debug)]
pub struct Counted<'a, C: Count = AtomicU64>(&'a C);

impl<'a, C: Count> Counted<'a, C> {
    /// Counts one more in `count`.
    pub(crate) fn new(count: &'a C) -> Self {
        count.up();
        Counted(count)
    }
}

impl<C: Count> Drop for Counted<'_, C> {
    fn drop(&mut self) {
        self.0.down();
    }
}

impl EndpointState {
    /// Counts an attempt in flight to it until the guard drops.
    pub fn attempting(&self) -> Counted<'_, StripedGauge> {
        Counted::new(&self.in_flight)
    }

    /// Whether its health checks pass (ejection aside).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether it may be chosen at `now` (nanoseconds since the origin):
    /// healthy and not ejected.
    fn is_available(&self, now: &mut Now<'_>) -> bool {
        if !self.is_healthy() {
            return false;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        until == 0 || now.get() >= until
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
    /// Whether requests may go over HTTP/2 (`http2`, or `auto` over TLS).
    may_be_http2: bool,
    /// Each stripe's round-robin turn (see [`Upstream::round_robin`]).
    turns: Box<[Line; STRIPES]>,
    /// The policies.
    pub pipeline: UpstreamPipeline,
    /// Requests in flight (until the response body ends).
    pub in_flight: StripedGauge,
    /// Local rejections since start.
    pub rejections: AtomicU32,
    /// Requests, errors and latency, for the dashboard.
    pub traffic: Arc<Traffic>,
    /// Its connection-pool limits.
    pub gate: Arc<PoolGate>,
    /// The time base of ejections.
    origin: Instant,
    /// Serialises ejection decisions, so the percentage holds.
    ejecting: Mutex<()>,
}

/// What an attempt says of its endpoint, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It answered, other than with a 5xx.
    Answered,
    /// A 5xx answer, a timeout or a broken exchange: one error in a row.
    Failed,
    /// The connection was refused: nothing listens there, and the endpoint
    /// is ejected at once (within `max_ejection_percent`).
    Refused,
}

/// The current time in nanoseconds since an upstream's origin, read once
/// and only if needed.
struct Now<'a> {
    origin: &'a Instant,
    nanos: Option<u64>,
}

impl Now<'_> {
    fn get(&mut self) -> u64 {
        let origin = self.origin;
        *self.nanos.get_or_insert_with(|| nanos(origin.elapsed()))
    }
}

impl Upstream {
    /// The upstream of `config`, every endpoint healthy until checked; the
    /// error names the key.
    pub fn new(config: UpstreamConfig) -> Result<Arc<Self>, String> {
        // The attempt times itself (it knows whether a timed-out request may
        // be sent again): one timer per attempt for timeout and deadline.
        let pipeline = Pipeline::from_config(&config.policy)
            .map_err(|e| format!("policy.{e}"))?
            .cut_off_by_operation()
            // A retry goes to another endpoint: a failed attempt is the
            // endpoint's (outlier detection), the request's outcome the
            // service's.
            .breaker_per_call()
            .classify(classify)
            .retry_on(retry_on)
            .build();
        let mut endpoints = Vec::with_capacity(config.endpoints.len());
        for (i, e) in config.endpoints.iter().enumerate() {
            let to = match &config.tls {
                Some(tls) if e.tls => Destination::tls(e.authority.clone(), config.protocol, tls)
                    .map_err(|why| format!("endpoints[{i}]: {why}"))?,
                _ => Destination::plain(e.authority.clone(), config.protocol),
            };
            let label = e.to_string();
            endpoints.push(EndpointState {
                hash: fnv1a(label.as_bytes()),
                label,
                endpoint: e.clone(),
                to,
                healthy: AtomicBool::new(true),
                in_flight: StripedGauge::default(),
                errors: AtomicU32::new(0),
                ejected_until: AtomicU64::new(0),
                ejections: AtomicU32::new(0),
            });
        }
        let gate = PoolGate::new(&config.pool);
        Ok(Arc::new(Upstream {
            label: Arc::new(config.name.clone()),
            config,
            may_be_http2: endpoints.iter().any(|e| e.to.may_be_http2()),
            endpoints,
            turns: Box::new(std::array::from_fn(|i| Line(AtomicU64::new(i as u64)))),
            pipeline,
            in_flight: StripedGauge::default(),
            rejections: AtomicU32::new(0),
            traffic: Arc::default(),
            gate,
            origin: Instant::now(),
            ejecting: Mutex::new(()),
        }))
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Whether its requests may go over HTTP/2 (`protocol = "http2"`, or
    /// `"auto"` with `https://` endpoints): they carry no Upgrade and may
    /// ask for trailers.
    pub fn may_be_http2(&self) -> bool {
        self.may_be_http2
    }

    fn now(&self) -> Now<'_> {
        Now {
            origin: &self.origin,
            nanos: None,
        }
    }

    /// The endpoint for a request with `headers`, by the upstream's load
    /// balancing, among those healthy and not ejected, with its index.
    /// Endpoints in `tried` (bit `i` for endpoint `i`: those earlier
    /// attempts of the request went to) are passed over while another is
    /// available, as Envoy's `previous_hosts` retry predicate does: a
    /// retry goes elsewhere than the attempt that failed.
    pub fn pick<'h>(
        &self,
        field: impl Fn(&HeaderName) -> Option<&'h [u8]>,
        tried: u64,
    ) -> Option<(usize, &EndpointState)> {
        let mut now = self.now();
        let picked = self.choose(&field, tried, &mut now);
        if picked.is_none() && tried != 0 {
            return self.choose(&field, 0, &mut now);
        }
        picked
    }

    fn choose<'h>(
        &self,
        field: &impl Fn(&HeaderName) -> Option<&'h [u8]>,
        tried: u64,
        now: &mut Now<'_>,
    ) -> Option<(usize, &EndpointState)> {
        match self.config.load_balancing {
            LoadBalancing::RoundRobin => self.round_robin(tried, now),
            LoadBalancing::LeastRequest => self.least_request(tried, now),
            LoadBalancing::ConsistentHash => {
                match self.config.hash_header.as_ref().and_then(field) {
                    Some(value) => self.rendezvous(fnv1a(value), tried, now),
                    None => self.round_robin(tried, now),
                }
            }
        }
    }

    /// Whether endpoint `i` may be chosen: available and not tried.
    fn open(&self, i: usize, tried: u64, now: &mut Now<'_>) -> bool {
        let fresh = i >= 64 || tried & 1 << i == 0;
        fresh && self.endpoints[i].is_available(now)
    }

    /// The next endpoint in turn. Each worker takes its turns from a
    /// count of its own (its stripe's, which starts at the stripe's index,
    /// so workers start on different endpoints), as each nginx worker
    /// keeps its own round robin: one count that every worker added to
    /// moved its cache line between cores on every request.
    fn round_robin(&self, tried: u64, now: &mut Now<'_>) -> Option<(usize, &EndpointState)> {
        let n = self.endpoints.len();
        // A retry does not take a turn: with two endpoints, one failing,
        // turns taken by retries would send every first attempt to the
        // failing one.
        let stripe = stripe();
        let turn = &self.turns[stripe.index()].0;
        let start = match tried {
            0 => stripe.fetch_add(turn, 1),
            _ => turn.load(Ordering::Relaxed),
        } as usize;
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| self.open(i, tried, now))
            .map(|i| (i, &self.endpoints[i]))
    }

    /// Power of two choices: the less busy of two distinct random endpoints.
    fn least_request(&self, tried: u64, now: &mut Now<'_>) -> Option<(usize, &EndpointState)> {
        let n = self.endpoints.len() as u64;
        if n < 2 {
            return self.round_robin(tried, now);
        }
        let a = rng::below(n) as usize;
        let b = ((a as u64 + 1 + rng::below(n - 1)) % n) as usize;
        let load = |i: usize| self.endpoints[i].in_flight.get();
        let i = match (self.open(a, tried, now), self.open(b, tried, now)) {
            (true, true) if load(b) < load(a) => b,
            (true, _) => a,
            (false, true) => b,
            (false, false) => return self.round_robin(tried, now),
        };
        Some((i, &self.endpoints[i]))
    }

    /// Rendezvous hashing: the open endpoint that scores highest for `key`.
    fn rendezvous(
        &self,
        key: u64,
        tried: u64,
        now: &mut Now<'_>,
    ) -> Option<(usize, &EndpointState)> {
        (0..self.endpoints.len())
            .filter(|&i| self.open(i, tried, now))
            .max_by_key(|&i| mix(key ^ self.endpoints[i].hash))
            .map(|i| (i, &self.endpoints[i]))
    }

    /// Whether any endpoint can be chosen.
    pub fn has_available_endpoint(&self) -> bool {
        let mut now = self.now();
        self.endpoints.iter().any(|e| e.is_available(&mut now))
    }

    /// Whether endpoint `index` is ejected now.
    pub fn is_ejected(&self, index: usize) -> bool {
        let until = self.endpoints[index].ejected_until.load(Ordering::Relaxed);
        until != 0 && self.now().get() < until
    }

    /// Counts an attempt's result on its endpoint for outlier detection.
    /// Returns how long the endpoint is ejected for, if this ejected it.
    pub fn record(&self, endpoint: &EndpointState, verdict: Verdict) -> Option<Duration> {
        let detection = self.config.outlier_detection.as_ref()?;
        if verdict == Verdict::Answered {
            if endpoint.errors.load(Ordering::Relaxed) != 0 {
                endpoint.errors.store(0, Ordering::Relaxed);
            }
            return None;
        }
        let errors = endpoint.errors.fetch_add(1, Ordering::Relaxed) + 1;
        if errors < detection.consecutive_errors && verdict != Verdict::Refused {
            return None;
        }
        self.eject(endpoint, detection)
    }

    fn eject(&self, endpoint: &EndpointState, detection: &OutlierDetection) -> Option<Duration> {
        let _serial = self.ejecting.lock().unwrap_or_else(|p| p.into_inner());
        let mut now = self.now();
        let now = now.get();
        let ejected = self
            .endpoints
            .iter()
            .filter(|e| {
                let until = e.ejected_until.load(Ordering::Relaxed);
                until != 0 && now < until
            })
            .count();
        let n = self.endpoints.len();
        let allowed = if detection.max_ejection_percent == 0 || n < 2 {
            0
        } else {
            (n * detection.max_ejection_percent as usize / 100).clamp(1, n - 1)
        };
        let previous = endpoint.ejected_until.load(Ordering::Relaxed);
        if ejected >= allowed || (previous != 0 && now < previous) {
            return None;
        }
        endpoint.errors.store(0, Ordering::Relaxed);
        // Back and well for a whole max_ejection_time: start over.
        if previous != 0 && now - previous > nanos(detection.max_ejection_time) {
            endpoint.ejections.store(0, Ordering::Relaxed);
        }
        let times = endpoint.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let duration = detection
            .base_ejection_time
            .saturating_mul(times)
            .min(detection.max_ejection_time);
        endpoint.ejected_until.store(
            now.saturating_add(nanos(duration)).max(1),
            Ordering::Relaxed,
        );
        Some(duration)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// FNV-1a: a fixed hash, so every gateway replica maps a key the same way.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64's finaliser: spreads a combined key over all 64 bits.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// How a result counts for the breaker: 5xx and failed exchanges are
/// failures; 429 and the client's own errors count for nothing.
fn classify(result: &Result<UpstreamResponse, AttemptError>) -> Outcome {
    match result {
        Ok(response) if response.status().is_server_error() => Outcome::Failure,
        Ok(_) => Outcome::Success,
        Err(AttemptError::Status { status, .. }) if *status == StatusCode::TOO_MANY_REQUESTS => {
            Outcome::Ignore
        }
        Err(
            AttemptError::BodyTooLarge
            | AttemptError::BodyGone
            | AttemptError::NoEndpoint
            | AttemptError::PoolOverflow,
        ) => Outcome::Ignore,
        Err(_) => Outcome::Failure,
    }
}

/// Which results get another attempt: what the attempt marked retryable;
/// a 429 only with a Retry-After, which then sets the delay.
fn retry_on(result: &Result<UpstreamResponse, Error<AttemptError>>) -> RetryAction {
    let Err(err) = result else {
        return RetryAction::Return;
    };
    match err.inner() {
        Some(AttemptError::Connect(_) | AttemptError::Tls(_)) => RetryAction::Retry,
        Some(
            AttemptError::Request {
                retryable: true, ..
            }
            | AttemptError::Timeout { retryable: true },
        ) => RetryAction::Retry,
        Some(AttemptError::Status {
            response,
            status,
            retryable: true,
        }) => match retry_after(response.headers()) {
            Some(delay) => RetryAction::RetryAfter(delay),
            None if *status == StatusCode::TOO_MANY_REQUESTS => RetryAction::Return,
            None => RetryAction::Retry,
        },
        _ => RetryAction::Return,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(endpoints: usize) -> Arc<Upstream> {
        let list: Vec<String> = (0..endpoints)
            .map(|i| format!("\"http://127.0.0.1:{}\"", 9000 + i))
            .collect();
        let text = format!(
            "[[upstreams]]\nname = \"u\"\nendpoints = [{}]\n",
            list.join(", ")
        );
        let config = crate::config::parse(&text, "test", []).unwrap();
        Upstream::new(config.upstreams.into_iter().next().unwrap()).unwrap()
    }

    fn picks(upstream: &Upstream, n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| upstream.pick(|_| None, 0).unwrap().0)
            .collect()
    }

    #[test]
    fn each_thread_takes_every_endpoint_in_turn() {
        let upstream = upstream(3);
        let here = picks(&upstream, 6);
        assert_eq!(&here[..3], &here[3..], "{here:?}");
        let mut sorted = here[..3].to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 2]);
        let there = std::thread::scope(|s| s.spawn(|| picks(&upstream, 3)).join().unwrap());
        let mut sorted = there.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 2], "{there:?}");
        // A retry does not take a turn: it goes to the next endpoint
        // not yet tried.
        let first = upstream.pick(|_| None, 0).unwrap().0;
        let retry = upstream.pick(|_| None, 1 << first).unwrap().0;
        assert_ne!(retry, first);
        assert_eq!(upstream.pick(|_| None, 0).unwrap().0, (first + 1) % 3);
    }

    #[test]
    fn an_attempt_counted_on_one_thread_and_ended_on_another_leaves_none() {
        let upstream = upstream(1);
        let endpoint = &upstream.endpoints[0];
        let attempts: Vec<_> = (0..3).map(|_| endpoint.attempting()).collect();
        assert_eq!(endpoint.in_flight.get(), 3);
        std::thread::scope(|s| s.spawn(move || drop(attempts)).join().unwrap());
        assert_eq!(endpoint.in_flight.get(), 0);
    }
}
