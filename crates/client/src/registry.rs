//! [`Registry`]: one shared client per service name, from a services file.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::client::ServiceClient;
use crate::config::{self, ClientConfig, ConfigError, FieldError};
use crate::error::{Error, ErrorKind};
use crate::metrics::Metrics;

/// Every configured service's client, by name. Clones share the clients.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let registry = tidegate_client::Registry::from_file("services.toml")?;
/// let body = serde_json::json!({"cents": 500});
/// let receipt: serde_json::Value = registry.get("billing")?.post_json("/charge", &body).await?;
/// println!("{}", registry.status());
/// registry.close();
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    clients: BTreeMap<String, ServiceClient>,
    metrics: Metrics,
}

impl Registry {
    /// The clients of the services file at `path` (with `TIDEGATE__…`
    /// overrides from the environment).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let config = config::load(path)?;
        Registry::new(config).map_err(|e| ConfigError {
            location: path.display().to_string(),
            key: e.field().to_owned(),
            reason: e.reason().to_owned(),
        })
    }

    /// The clients of `config`. An error names the field, as
    /// `services.NAME.policy.timeout`.
    pub fn new(config: ClientConfig) -> Result<Self, FieldError> {
        let metrics = Metrics::default();
        let source = Arc::new(config.source_service);
        let mut clients = BTreeMap::new();
        for service in config.services {
            let name = service.name.clone();
            let client = ServiceClient::build(service, source.clone(), metrics.clone())
                .map_err(|e| e.within(&format!("services.{name}")))?;
            clients.insert(name, client);
        }
        Ok(Registry {
            inner: Arc::new(Inner { clients, metrics }),
        })
    }

    /// The client of the service named `name`.
    pub fn get(&self, name: &str) -> Result<&ServiceClient, Error> {
        self.inner.clients.get(name).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidRequest,
                &Arc::from(name),
                format!("no service named `{name}` is configured"),
            )
        })
    }

    /// Every client, by name.
    pub fn clients(&self) -> impl Iterator<Item = &ServiceClient> {
        self.inner.clients.values()
    }

    /// The metrics of every client.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// `{"services": {NAME: {…}}, "timestamp": …}` for every client: the
    /// body of a `/status/services` endpoint.
    pub fn status(&self) -> serde_json::Value {
        let services: serde_json::Map<String, serde_json::Value> = self
            .inner
            .clients
            .iter()
            .map(|(name, client)| {
                let status = serde_json::to_value(client.status()).unwrap_or_default();
                (name.clone(), status)
            })
            .collect();
        serde_json::json!({
            "services": services,
            "timestamp": crate::clock::now_rfc3339(),
        })
    }

    /// Closes every client: new calls fail with [`ErrorKind::Closed`], idle
    /// connections are dropped, calls in flight finish.
    pub fn close(&self) {
        for client in self.inner.clients.values() {
            client.close();
        }
    }
}
