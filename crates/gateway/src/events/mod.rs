//! The asynchronous half in the gateway: the event store (tidegate-events),
//! the events API on its own listener ([`api`]), and push subscriptions
//! delivered to upstreams through their policies ([`push`]).
//!
//! `[events]` opens the store when the gateway starts. A reload applies
//! new topics' retention and new or changed subscriptions (cursors and
//! leases stay: a group keeps its rows); the store, its file and the
//! listener need a restart.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tidegate_events::metrics::{EventMetrics, Metered};
use tidegate_events::{Options, Retention, SqliteStore, Store, StoreError};

use crate::config::{EventStore, EventsSettings, Subscription};

pub mod admin;
pub mod api;
pub mod cloudevents;
pub mod contracts;
pub mod push;
pub mod sagas;

/// The event store and the settings in effect.
pub struct Events {
    store: Arc<dyn Store>,
    /// `sqlite` or `nats`, for metrics and `/ready`.
    kind: &'static str,
    settings: ArcSwap<EventsSettings>,
    /// The event contracts of the settings in effect, compiled.
    contracts: ArcSwap<contracts::Contracts>,
    /// Bumped by each reload: push tasks look at their settings again.
    generation: tokio::sync::watch::Sender<u64>,
    /// The push tasks, once started.
    pushers: std::sync::OnceLock<push::Pushers>,
    /// The sagas' drivers, once started.
    sagas: std::sync::OnceLock<Arc<sagas::Sagas>>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Events {
    /// Opens the store of `settings` (counting into `metrics`) and applies
    /// its topics and subscriptions.
    pub async fn open(
        settings: EventsSettings,
        metrics: EventMetrics,
    ) -> Result<Arc<Self>, String> {
        let options = Options {
            dedup_window: settings.dedup_window,
            ..Options::default()
        };
        let store: Arc<dyn Store> = match &settings.store {
            EventStore::Sqlite { path } => {
                let path = path.clone();
                let store = tokio::task::spawn_blocking(move || SqliteStore::open(path, options))
                    .await
                    .map_err(|e| format!("cannot open the event store: {e}"))?
                    .map_err(|e| e.to_string())?;
                Arc::new(Metered::new(store, metrics, "sqlite"))
            }
            EventStore::Nats {
                url,
                credentials_env,
                replicas,
                tls,
            } => {
                let credentials = match credentials_env {
                    Some(var) => Some(std::env::var(var).map_err(|_| {
                        format!("events.nats_credentials_env: the variable {var} is not set")
                    })?),
                    None => None,
                };
                let store = tidegate_nats::NatsStore::connect_with(
                    url,
                    settings.dedup_window,
                    tidegate_events::Clock::Wall,
                    *replicas,
                    &tidegate_nats::Access {
                        credentials: credentials.as_deref(),
                        tls: tls.as_ref(),
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
                Arc::new(Metered::new(store, metrics, "nats"))
            }
        };
        let kind = match settings.store {
            EventStore::Sqlite { .. } => "sqlite",
            EventStore::Nats { .. } => "nats",
        };
        Self::with_store(store, settings, kind).await
    }

    /// The service over `store` (of `kind`: `sqlite`, `nats`), with
    /// `settings` applied.
    pub async fn with_store(
        store: Arc<dyn Store>,
        settings: EventsSettings,
        kind: &'static str,
    ) -> Result<Arc<Self>, String> {
        apply(&*store, None, &settings)
            .await
            .map_err(|e| format!("events: {e}"))?;
        let contracts = contracts::Contracts::compile(&settings.schemas)
            .map_err(|e| format!("events.schemas: {e}"))?;
        Ok(Arc::new(Events {
            store,
            kind,
            settings: ArcSwap::from_pointee(settings),
            contracts: ArcSwap::from_pointee(contracts),
            generation: tokio::sync::watch::channel(0).0,
            pushers: std::sync::OnceLock::new(),
            sagas: std::sync::OnceLock::new(),
        }))
    }

    /// Starts pushing the push subscriptions' events through `gateway`'s
    /// upstreams, until `stop`; a reload starts those it adds.
    pub fn start_push(
        self: &Arc<Self>,
        gateway: &Arc<crate::proxy::Gateway>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let _ = self
            .pushers
            .set(push::Pushers::new(Arc::downgrade(gateway), stop));
        push::start(self);
    }

    /// Starts driving sagas through `gateway`'s upstreams until `stop`,
    /// first those that were running when the gateway last stopped.
    pub async fn start_sagas(
        &self,
        gateway: &Arc<crate::proxy::Gateway>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), StoreError> {
        let sagas = Arc::new(sagas::Sagas::new(
            self.store.clone(),
            Arc::downgrade(gateway),
            stop,
        ));
        let _ = self.sagas.set(sagas.clone());
        let resumed = sagas.resume().await?;
        if resumed > 0 {
            tracing::info!(resumed, "sagas that were running go on");
        }
        Ok(())
    }

    /// The sagas, once started.
    pub fn sagas(&self) -> Option<&Arc<sagas::Sagas>> {
        self.sagas.get()
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// `sqlite` or `nats`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Whether the store answers now: a cheap read (on NATS, a request to
    /// the server, failing at once while it is unreachable).
    pub async fn probe(&self) -> Result<(), StoreError> {
        self.store.last_position("tidegate.probe").await.map(drop)
    }

    /// The event contracts in effect.
    pub fn contracts(&self) -> Arc<contracts::Contracts> {
        self.contracts.load_full()
    }

    /// The settings in effect.
    pub fn settings(&self) -> Arc<EventsSettings> {
        self.settings.load_full()
    }

    /// The subscription named `name` in the settings in effect.
    pub fn subscription(&self, name: &str) -> Option<Subscription> {
        self.settings
            .load()
            .subscriptions
            .iter()
            .find(|s| s.config.name == name)
            .cloned()
    }

    /// What of `new` settings takes effect only after a restart (the
    /// store and the listener are bound when the gateway starts).
    pub fn restart_needed(&self, new: &EventsSettings) -> Vec<&'static str> {
        let old = self.settings();
        let mut restart = Vec::new();
        if new.store != old.store {
            restart.push("events.store");
        }
        if new.listen != old.listen {
            restart.push("events.listen");
        }
        if new.dedup_window != old.dedup_window {
            restart.push("events.dedup_window");
        }
        restart
    }

    /// Applies `new` settings (a reload): topics' retention, new and
    /// changed subscriptions (cursors, pending events and leases stay),
    /// push tasks for new push subscriptions.
    pub async fn reload(self: &Arc<Self>, new: EventsSettings) -> Result<(), StoreError> {
        let old = self.settings();
        let contracts = contracts::Contracts::compile(&new.schemas)
            .map_err(|e| StoreError(format!("events.schemas: {e}")))?;
        apply(&*self.store, Some(&old), &new).await?;
        self.contracts.store(Arc::new(contracts));
        self.settings.store(Arc::new(new));
        self.generation.send_modify(|n| *n += 1);
        push::start(self);
        Ok(())
    }
}

/// Gives the store `new`'s retention and subscriptions; a topic `old` had
/// and `new` has not keeps its events from now on.
async fn apply(
    store: &dyn Store,
    old: Option<&EventsSettings>,
    new: &EventsSettings,
) -> Result<(), StoreError> {
    for topic in &new.topics {
        store
            .retain(Retention {
                topic: topic.name.clone(),
                max_age: topic.max_age,
                max_events: topic.max_events,
            })
            .await?;
    }
    for gone in old
        .into_iter()
        .flat_map(|old| &old.topics)
        .filter(|t| !new.topics.iter().any(|n| n.name == t.name))
    {
        store
            .retain(Retention {
                topic: gone.name.clone(),
                max_age: None,
                max_events: None,
            })
            .await?;
    }
    for subscription in &new.subscriptions {
        store.subscribe(subscription.config.clone()).await?;
    }
    Ok(())
}
