//! State changes (breakers, endpoint health) as a broadcast stream, for
//! `GET /events` and the logs, and the once-a-second status ticks the
//! dashboard asks for with `GET /events?stats=true`.

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::broadcast;

/// One state change.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Notice {
    /// A breaker changed state.
    Circuit {
        /// The upstream.
        upstream: String,
        /// State before.
        from: &'static str,
        /// State after.
        to: &'static str,
        /// Why.
        reason: String,
        /// When (RFC 3339).
        timestamp: String,
    },
    /// An endpoint passed or failed its health checks.
    Endpoint {
        /// The upstream.
        upstream: String,
        /// `http://host:port`.
        endpoint: String,
        /// Its new health.
        healthy: bool,
        /// When (RFC 3339).
        timestamp: String,
    },
    /// Outlier detection ejected an endpoint.
    Ejected {
        /// The upstream.
        upstream: String,
        /// `http://host:port`.
        endpoint: String,
        /// For how long.
        seconds: f64,
        /// When (RFC 3339).
        timestamp: String,
    },
    /// The config was reloaded, or a new one was refused.
    Reload {
        /// Whether the new config is in use.
        applied: bool,
        /// What changed, or why it was refused.
        message: String,
        /// When (RFC 3339).
        timestamp: String,
    },
}

/// The sender side; subscribers that fall behind lose the oldest events.
#[derive(Debug, Clone)]
pub struct Notices {
    sender: broadcast::Sender<Notice>,
    ticks: broadcast::Sender<Arc<str>>,
}

impl Default for Notices {
    fn default() -> Self {
        Notices {
            sender: broadcast::channel(256).0,
            ticks: broadcast::channel(8).0,
        }
    }
}

impl Notices {
    /// Sends to every subscriber (none is fine).
    pub fn send(&self, event: Notice) {
        let _ = self.sender.send(event);
    }

    /// A new subscription.
    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.sender.subscribe()
    }

    /// Whether anyone listens to status ticks (they are only built then).
    pub fn wants_ticks(&self) -> bool {
        self.ticks.receiver_count() > 0
    }

    /// Sends a status tick (JSON text) to its subscribers.
    pub fn tick(&self, json: Arc<str>) {
        let _ = self.ticks.send(json);
    }

    /// A new subscription to status ticks.
    pub fn subscribe_ticks(&self) -> broadcast::Receiver<Arc<str>> {
        self.ticks.subscribe()
    }
}
