//! Active health checks: each endpoint is asked `GET path` every interval;
//! `unhealthy_threshold` failures in a row take it out of rotation,
//! `healthy_threshold` successes in a row bring it back.

use std::sync::Arc;

use http::Request;
use tokio::task::JoinSet;
use tokio::time::{interval, timeout, MissedTickBehavior};

use crate::body;
use crate::events::Event;
use crate::proxy::Gateway;
use crate::upstream::Upstream;

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

async fn check_endpoint(gateway: Arc<Gateway>, upstream: Arc<Upstream>, e: usize) {
    let Some(config) = upstream.config.health_check.clone() else {
        return;
    };
    let endpoint = &upstream.endpoints[e];
    let path = http::uri::PathAndQuery::try_from(config.path.as_str())
        .expect("the config checks the health check path");
    let uri = http::Uri::from(path);
    let (mut passes, mut fails) = (0u32, 0u32);
    let mut ticks = interval(config.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let mut request = Request::new(body::empty());
        *request.uri_mut() = uri.clone();
        request.headers_mut().insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static("tidegate-health-check"),
        );
        let ok = match timeout(
            config.timeout,
            gateway.client().request(
                &endpoint.endpoint.authority,
                request,
                None,
                upstream.config.protocol.is_http2(),
            ),
        )
        .await
        {
            Ok(Ok(response)) => response.status().is_success(),
            _ => false,
        };
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
                gateway.events.send(Event::Endpoint {
                    upstream: upstream.name().to_owned(),
                    endpoint: endpoint.label.clone(),
                    healthy,
                    timestamp: tidegate_client::clock::now_rfc3339(),
                });
            }
        }
    }
}
