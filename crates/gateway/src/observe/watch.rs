//! The tasks that watch the gateway: per upstream in use, its health
//! checks and the watcher that turns its breaker's transitions into logs,
//! metrics, the dashboard's timeline, alerts and `/events` notices; and the
//! sampler that records every upstream's traffic once a second.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::observe::alerts::Alert;
use crate::observe::notices::Notice;
use crate::observe::stats::{IncidentChange, SampleInput};
use crate::proxy::upstream::Upstream;
use crate::proxy::{Gateway, Table};

/// Health checks and breaker watchers, per upstream in use; an upstream's
/// tasks end when it leaves the table.
#[derive(Debug)]
pub(crate) struct UpstreamTasks {
    running: Vec<(Arc<Upstream>, JoinSet<()>)>,
    stopped: watch::Receiver<bool>,
}

impl UpstreamTasks {
    /// No tasks yet; those it starts end once `stopped` says so.
    pub(crate) fn new(stopped: watch::Receiver<bool>) -> Self {
        UpstreamTasks {
            running: Vec::new(),
            stopped,
        }
    }

    /// Ends every upstream's tasks.
    pub(crate) fn stop_all(&mut self) {
        self.running.clear();
    }

    /// Starts the tasks of upstreams new in `table` and ends those of
    /// upstreams no longer in it. Runs on the caller's runtime.
    pub(crate) fn sync(&mut self, gateway: &Arc<Gateway>, table: &Table) {
        self.running
            .retain(|(u, _)| table.upstreams.iter().any(|t| Arc::ptr_eq(t, u)));
        for upstream in &table.upstreams {
            if self.running.iter().any(|(u, _)| Arc::ptr_eq(u, upstream)) {
                continue;
            }
            let mut tasks = JoinSet::new();
            crate::proxy::health::spawn(gateway, upstream, &mut tasks);
            tasks.spawn(watch_breaker(
                gateway.clone(),
                upstream.clone(),
                self.stopped.clone(),
            ));
            self.running.push((upstream.clone(), tasks));
        }
    }
}

/// Logs breaker transitions, counts them and sends them to `/events`.
async fn watch_breaker(
    gateway: Arc<Gateway>,
    upstream: Arc<Upstream>,
    mut stopped: watch::Receiver<bool>,
) {
    let Some(breaker) = upstream.pipeline.circuit_breaker() else {
        return;
    };
    let mut changes = breaker.subscribe();
    loop {
        let change = tokio::select! {
            change = changes.recv() => change,
            _ = until_stopped(&mut stopped) => return,
        };
        let change = match change {
            Ok(change) => change,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        let (from, to) = (change.from.as_str(), change.to.as_str());
        tracing::warn!(upstream = upstream.name(), from, to, reason = %change.reason, "circuit breaker changed state");
        gateway.metrics.transition(upstream.name(), from, to);
        let reason = change.reason.to_string();
        let timestamp = tidegate_client::clock::instant_rfc3339(change.at);
        let incident = gateway
            .stats
            .transition(upstream.name(), &change, reason.clone());
        let alert = match incident {
            IncidentChange::Opened => Some(("circuit_open", None)),
            IncidentChange::Recovered { seconds } => Some(("circuit_closed", Some(seconds))),
            IncidentChange::None => None,
        };
        if let Some((event, recovery)) = alert {
            if !gateway.table().alerts.webhooks.is_empty() {
                let alert = Alert::new(
                    event,
                    upstream.name(),
                    from,
                    to,
                    reason.clone(),
                    timestamp.clone(),
                    recovery,
                );
                if !gateway.alerter.send(alert) {
                    gateway.metrics.alert("dropped");
                }
            }
        }
        gateway.notices.send(Notice::Circuit {
            upstream: upstream.name().to_owned(),
            from,
            to,
            reason,
            timestamp,
        });
    }
}

/// Samples every upstream's traffic once a second for the dashboard, and
/// sends the status tick to `/events?stats=true` subscribers.
pub(crate) async fn sample(gateway: Arc<Gateway>, mut stopped: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = until_stopped(&mut stopped) => return,
        }
        let table = gateway.table();
        gateway
            .stats
            .sample(table.upstreams.iter().map(|u| SampleInput {
                name: u.name(),
                traffic: &u.traffic,
                rejected: u64::from(u.rejections.load(Ordering::Relaxed)),
            }));
        if let Some(events) = gateway.events() {
            let up = events.probe().await.is_ok();
            gateway.metrics.events.set_store_up(events.kind(), up);
            for s in &events.settings().subscriptions {
                if let Ok(lag) = events.store().lag(&s.config.name).await {
                    gateway.metrics.events.set_lag(&s.config.name, lag);
                }
            }
        }
        if gateway.notices.wants_ticks() {
            let mut status = crate::observe::admin::services_json(&gateway);
            status["type"] = "stats".into();
            status["samples"] = serde_json::json!(gateway.stats.latest());
            if gateway.events().is_some() {
                if let Ok(events) = crate::events::admin::status_json(&gateway).await {
                    status["events"] = events;
                }
            }
            gateway.notices.tick(status.to_string().into());
        }
    }
}

/// Resolves once shutdown has begun (or the sender is gone).
pub(crate) async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}
