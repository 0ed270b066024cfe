//! Active health checks: each endpoint is asked `GET path` (or, for
//! `kind = "grpc"`, the gRPC health checking protocol's `Check`) every
//! interval; `unhealthy_threshold` failures in a row take it out of
//! rotation, `healthy_threshold` successes in a row bring it back.

use std::sync::Arc;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::Request;
use http_body_util::BodyExt;
use tokio::task::JoinSet;
use tokio::time::{interval, timeout, MissedTickBehavior};

use crate::config::{HealthCheckConfig, HealthCheckKind};
use crate::http::body;
use crate::observe::notices::Notice;
use crate::proxy::client::UpstreamResponse;
use crate::proxy::grpc;
use crate::proxy::upstream::Upstream;
use crate::proxy::Gateway;

/// Runs the checks of every endpoint of `upstream`, if it has them, until
/// the set is dropped.
pub fn spawn(gateway: &Arc<Gateway>, upstream: &Arc<Upstream>, tasks: &mut JoinSet<()>) {
    if upstream.config.health_check.is_none() {
        return;
    }
    for e in 0..upstream.endpoints.len() {
        tasks.spawn(check_endpoint(gateway.clone(), upstream.clone(), e));
    }
}

/// One kind of check: the request it sends and how it reads the answer.
#[derive(Debug)]
enum Probe {
    /// `GET` this target: a 2xx answer is healthy.
    Http(http::Uri),
    /// `grpc.health.v1.Health/Check` with this request message.
    Grpc(bytes::Bytes),
}

/// The gRPC health service's `Check` method.
const GRPC_CHECK: &str = "/grpc.health.v1.Health/Check";

impl Probe {
    fn new(config: &HealthCheckConfig) -> Self {
        match config.kind {
            HealthCheckKind::Http => {
                let path = http::uri::PathAndQuery::try_from(config.path())
                    .expect("the config checks the health check path");
                Probe::Http(http::Uri::from(path))
            }
            HealthCheckKind::Grpc => {
                // HealthCheckRequest { string service = 1; }
                let service = config.service.as_deref().unwrap_or_default().as_bytes();
                let mut message = Vec::with_capacity(service.len() + 6);
                if !service.is_empty() {
                    message.push(0x0a);
                    put_varint(&mut message, service.len() as u64);
                    message.extend_from_slice(service);
                }
                Probe::Grpc(grpc::frame(&message))
            }
        }
    }

    fn request(&self) -> Request<body::ProxyBody> {
        let mut request = match self {
            Probe::Http(uri) => {
                let mut request = Request::new(body::empty());
                *request.uri_mut() = uri.clone();
                request
            }
            Probe::Grpc(message) => {
                let mut request = Request::new(body::full(message.clone()));
                *request.method_mut() = http::Method::POST;
                *request.uri_mut() = http::Uri::from_static(GRPC_CHECK);
                let headers = request.headers_mut();
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
                request
            }
        };
        request.headers_mut().insert(
            http::header::USER_AGENT,
            HeaderValue::from_static("tidegate-health-check"),
        );
        request
    }

    /// Whether `answer` says the endpoint is healthy; `None` when it
    /// cannot be read.
    async fn is_healthy(&self, answer: UpstreamResponse) -> Option<bool> {
        match self {
            Probe::Http(_) => Some(answer.status().is_success()),
            Probe::Grpc(_) => {
                if answer.status() != http::StatusCode::OK {
                    return Some(false);
                }
                // A trailers-only answer has no status message: an error
                // (NOT_FOUND for a service it does not know, UNIMPLEMENTED…).
                if grpc::status(answer.headers()).is_some() {
                    return Some(false);
                }
                let whole = answer.into_body().collect().await.ok()?;
                let ok = whole.trailers().and_then(grpc::status) == Some(grpc::code::OK);
                let body = whole.to_bytes();
                // HealthCheckResponse { ServingStatus status = 1; }, SERVING = 1.
                Some(ok && grpc::first_message(&body) == Some(&[0x08, 0x01][..]))
            }
        }
    }
}

/// `n` as a protobuf varint.
fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

async fn check_endpoint(gateway: Arc<Gateway>, upstream: Arc<Upstream>, e: usize) {
    let Some(config) = upstream.config.health_check.clone() else {
        return;
    };
    let endpoint = &upstream.endpoints[e];
    let probe = Probe::new(&config);
    let (mut passes, mut fails) = (0u32, 0u32);
    let mut ticks = interval(config.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let asked = async {
            let answer = gateway
                .client()
                .request(&endpoint.to, probe.request(), None)
                .await
                .ok()?;
            probe.is_healthy(answer).await
        };
        let ok = timeout(config.timeout, asked).await.ok().flatten() == Some(true);
        if ok {
            passes += 1;
            fails = 0;
        } else {
            fails += 1;
            passes = 0;
        }
        let change = if !endpoint.is_healthy() && passes >= config.healthy_threshold {
            Some(true)
        } else if endpoint.is_healthy() && fails >= config.unhealthy_threshold {
            Some(false)
        } else {
            None
        };
        if let Some(healthy) = change {
            if endpoint.set_healthy(healthy) {
                if healthy {
                    tracing::info!(upstream = upstream.name(), endpoint = %endpoint.label, "endpoint healthy again");
                } else {
                    tracing::warn!(upstream = upstream.name(), endpoint = %endpoint.label, "endpoint failed its health checks");
                }
                gateway
                    .metrics
                    .endpoint_healthy(upstream.name(), &endpoint.label, healthy);
                gateway.notices.send(Notice::Endpoint {
                    upstream: upstream.name().to_owned(),
                    endpoint: endpoint.label.clone(),
                    healthy,
                    timestamp: tidegate_client::clock::now_rfc3339(),
                });
            }
        }
    }
}
