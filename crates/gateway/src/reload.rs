//! Hot reload: a new config is parsed and validated, built into a new
//! [`Table`] and swapped in whole. Upstreams whose config is unchanged keep
//! their breaker, limiter, health and ejection state; rate-limit counts are
//! kept for every route; requests under way, open SSE streams and
//! WebSocket tunnels keep the table they started with. A config that does
//! not validate is logged and the running one stays.
//!
//! Listener and connection settings (`listen`, `admin_listen`,
//! `max_connections`, `max_header_bytes`, `header_read_timeout`,
//! `send_timeout`, `drain_timeout`), the size of the rate-limit key store
//! (`rate_limit.max_keys`) and where counts live (`rate_limit.store` with
//! its Redis settings) are bound when the gateway starts; a reload that
//! changes them says so and leaves them until a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use std::time::Duration;
use tokio::sync::Mutex as AsyncMutex;

use crate::config::{self, Config, GatewaySettings};
use crate::observe::notices::Notice;
use crate::observe::watch::UpstreamTasks;
use crate::proxy::{Gateway, Table};

/// Applies new configs to a running gateway.
#[derive(Debug, Clone)]
pub struct Reloader {
    gateway: Arc<Gateway>,
    tasks: Arc<Mutex<UpstreamTasks>>,
    /// One reload at a time.
    serial: Arc<AsyncMutex<()>>,
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Upstreams that kept their state.
    pub kept: Vec<String>,
    /// Upstreams that are new or whose config changed (fresh state).
    pub rebuilt: Vec<String>,
    /// Upstreams no longer configured.
    pub removed: Vec<String>,
    /// Routes now configured.
    pub routes: usize,
    /// Settings that changed but only take effect on restart.
    pub needs_restart: Vec<&'static str>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} routes; upstreams kept [{}], rebuilt [{}], removed [{}]",
            self.routes,
            self.kept.join(", "),
            self.rebuilt.join(", "),
            self.removed.join(", ")
        )?;
        if !self.needs_restart.is_empty() {
            write!(
                f,
                "; changes to {} apply after a restart",
                self.needs_restart.join(", ")
            )?;
        }
        Ok(())
    }
}

impl Reloader {
    pub(crate) fn new(gateway: Arc<Gateway>, tasks: Arc<Mutex<UpstreamTasks>>) -> Self {
        Reloader {
            gateway,
            tasks,
            serial: Arc::new(AsyncMutex::new(())),
        }
    }

    /// Puts a validated `config` in use. Fails (and changes nothing) when
    /// its run-time state cannot be built, e.g. an internal token variable
    /// is not set. Must run inside the gateway's runtime.
    pub async fn apply(&self, mut config: Config) -> Result<Summary, String> {
        let _serial = self.serial.lock().await;
        let mut needs_restart = restart_only_changes(&self.gateway.settings, &config.gateway);
        let events = config.events.take();
        match (self.gateway.events(), &events) {
            (Some(running), Some(new)) => needs_restart.extend(running.restart_needed(new)),
            (None, None) => {}
            // The events listener and store start and stop with the gateway.
            _ => needs_restart.push("events"),
        }
        if config.rate_limit.max_keys != self.gateway.counters.max_keys() {
            needs_restart.push("rate_limit.max_keys");
        }
        if config.rate_limit.store != *self.gateway.counters.store_settings() {
            needs_restart.push("rate_limit.store");
        }
        match (self.gateway.telemetry(), &config.telemetry) {
            (Some(running), Some(new)) => running.update(new.clone()),
            (None, None) => {}
            // The exporter starts and stops with the gateway.
            _ => needs_restart.push("telemetry"),
        }
        if let (Some(running), Some(new)) = (self.gateway.tls(), &config.gateway.tls) {
            if let Err(e) = running.refresh(new) {
                let e = e.to_string();
                self.refused(&e);
                return Err(e);
            }
        }
        let old = self.gateway.table();
        let table = match Table::build(config, Some(&old), self.gateway.counters.clone()) {
            Ok(table) => table,
            Err(e) => {
                self.refused(&e);
                return Err(e);
            }
        };
        let mut summary = Summary {
            routes: table.router.routes().len(),
            needs_restart,
            ..Summary::default()
        };
        for u in &table.upstreams {
            let list = if old.upstreams.iter().any(|o| Arc::ptr_eq(o, u)) {
                &mut summary.kept
            } else {
                &mut summary.rebuilt
            };
            list.push(u.name().to_owned());
        }
        for o in &old.upstreams {
            if table.upstream(o.name()).is_none() {
                summary.removed.push(o.name().to_owned());
            }
        }
        self.gateway.swap(table);
        if let (Some(running), Some(new)) = (self.gateway.events(), events) {
            if let Err(e) = running.reload(new).await {
                let e = format!("events: {e}");
                self.refused(&e);
                return Err(e);
            }
        }
        let current = self.gateway.table();
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sync(&self.gateway, &current);
        self.gateway.metrics.reload("applied");
        tracing::info!(%summary, "config reloaded");
        self.gateway.notices.send(Notice::Reload {
            applied: true,
            message: summary.to_string(),
            timestamp: tidegate_client::clock::now_rfc3339(),
        });
        Ok(summary)
    }

    /// Reads, validates and applies the config at `path`; on any error the
    /// running config stays and the error is logged and returned.
    pub async fn reload_file(&self, path: &Path) -> Result<Summary, String> {
        match config::load(path) {
            Ok(config) => self.apply(config).await,
            Err(e) => {
                let e = e.to_string();
                self.refused(&e);
                Err(e)
            }
        }
    }

    fn refused(&self, reason: &str) {
        self.gateway.metrics.reload("rejected");
        tracing::error!(error = %reason, "new config refused; the running config stays");
        self.gateway.notices.send(Notice::Reload {
            applied: false,
            message: reason.to_owned(),
            timestamp: tidegate_client::clock::now_rfc3339(),
        });
    }

    /// Reloads `path` on SIGHUP and whenever its contents change (checked
    /// every `poll`), until the future is dropped. The SIGHUP handler is in
    /// place when this returns, so a hangup from then on reloads rather
    /// than ends the process.
    pub fn watch(self, path: PathBuf, poll: Duration) -> impl std::future::Future<Output = ()> {
        let mut hangups = hangups();
        let mut seen = fingerprint(&path);
        async move {
            let mut ticks = tokio::time::interval(poll);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                let signalled = tokio::select! {
                    _ = ticks.tick() => false,
                    Some(()) = next_hangup(&mut hangups) => true,
                };
                let now = fingerprint(&path);
                if signalled || now != seen {
                    seen = now;
                    if signalled {
                        tracing::info!(path = %path.display(), "SIGHUP: reloading the config");
                    }
                    // The outcome is logged either way.
                    let _ = self.reload_file(&path).await;
                }
            }
        }
    }
}

/// Which listener-level settings differ.
fn restart_only_changes(running: &GatewaySettings, new: &GatewaySettings) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if running.listen != new.listen {
        changed.push("gateway.listen");
    }
    if running.admin_listen != new.admin_listen {
        changed.push("gateway.admin_listen");
    }
    if running.max_connections != new.max_connections {
        changed.push("gateway.max_connections");
    }
    if running.max_header_bytes != new.max_header_bytes {
        changed.push("gateway.max_header_bytes");
    }
    if running.header_read_timeout != new.header_read_timeout {
        changed.push("gateway.header_read_timeout");
    }
    if running.send_timeout != new.send_timeout {
        changed.push("gateway.send_timeout");
    }
    if running.drain_timeout != new.drain_timeout {
        changed.push("gateway.drain_timeout");
    }
    // Certificates change with a reload; turning TLS on or off does not.
    if running.tls.is_some() != new.tls.is_some() {
        changed.push("gateway.tls");
    }
    changed
}

/// What tells a changed file apart: its length and a hash of its contents
/// (a touch that changes nothing reloads nothing).
fn fingerprint(path: &Path) -> Option<(usize, u64)> {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let text = std::fs::read(path).ok()?;
    let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(&text);
    Some((text.len(), hash))
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = ();

#[cfg(unix)]
fn hangups() -> Hangups {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on file changes only");
            None
        }
    }
}

#[cfg(not(unix))]
fn hangups() -> Hangups {}

#[cfg(unix)]
async fn next_hangup(hangups: &mut Hangups) -> Option<()> {
    match hangups {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn next_hangup(_: &mut Hangups) -> Option<()> {
    std::future::pending().await
}
