//! `[telemetry]`: OpenTelemetry spans exported over OTLP/HTTP.

use std::time::Duration;

use http::uri::PathAndQuery;
use http::HeaderValue;
use serde::Deserialize;
use tidegate_client::config::file::KeyPath;
use tidegate_resilience::config::duration;

use super::{ConfigError, Locator};
use crate::proxy::client::Destination;

/// `[telemetry]` as written.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawTelemetry {
    otlp_endpoint: Option<String>,
    service_name: String,
    sample_ratio: f64,
    max_queue: usize,
    batch_size: usize,
    #[serde(with = "duration")]
    export_interval: Duration,
    #[serde(with = "duration")]
    export_timeout: Duration,
}

impl Default for RawTelemetry {
    fn default() -> Self {
        RawTelemetry {
            otlp_endpoint: None,
            service_name: "tidegate".into(),
            sample_ratio: 1.0,
            max_queue: 2048,
            batch_size: 512,
            export_interval: Duration::from_secs(1),
            export_timeout: Duration::from_secs(10),
        }
    }
}

/// `[telemetry]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySettings {
    /// The receiver's endpoint (`otlp_endpoint`, e.g. an OpenTelemetry
    /// Collector or Jaeger on 4318).
    pub to: Destination,
    /// Its `Host`.
    pub host: HeaderValue,
    /// `otlp_endpoint`'s path with `/v1/traces` appended, as
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is read.
    pub path: PathAndQuery,
    /// `service.name` of every span. Default `tidegate`.
    pub service_name: String,
    /// The share of new traces recorded (0 to 1); a request that carries
    /// a `traceparent` follows its `sampled` flag instead. Default 1.
    pub sample_ratio: f64,
    /// Spans waiting for export at most; more are dropped and counted.
    /// Default 2048.
    pub max_queue: usize,
    /// Spans in one export at most. Default 512.
    pub batch_size: usize,
    /// How often waiting spans are sent, when fewer than a batch. Default 1 s.
    pub export_interval: Duration,
    /// How long one export may take. Default 10 s.
    pub export_timeout: Duration,
}

impl Locator<'_> {
    pub(super) fn telemetry(&self, raw: RawTelemetry) -> Result<TelemetrySettings, ConfigError> {
        let at = KeyPath::default().key("telemetry");
        let key = at.clone().key("otlp_endpoint");
        let Some(url) = raw.otlp_endpoint else {
            return Err(self.error(
                &key,
                "is needed: where spans go (e.g. http://127.0.0.1:4318)",
            ));
        };
        let (uri, to) = self.http_destination(&key, &url)?;
        if uri.query().is_some() {
            return Err(self.error(&key, "must not have a query"));
        }
        let path = format!("{}/v1/traces", uri.path().trim_end_matches('/'));
        let path = PathAndQuery::try_from(path).map_err(|_| self.error(&key, "has a bad path"))?;
        let host = HeaderValue::from_str(uri.authority().map_or("", |a| a.as_str()))
            .map_err(|_| self.error(&key, "has a bad host"))?;
        if raw.service_name.is_empty() {
            return Err(self.error(&at.key("service_name"), "must not be empty"));
        }
        if !(0.0..=1.0).contains(&raw.sample_ratio) {
            return Err(self.error(&at.key("sample_ratio"), "must be from 0 to 1"));
        }
        if raw.max_queue == 0 {
            return Err(self.error(&at.key("max_queue"), "must be at least 1"));
        }
        if raw.batch_size == 0 || raw.batch_size > raw.max_queue {
            return Err(self.error(
                &at.key("batch_size"),
                "must be at least 1 and at most max_queue",
            ));
        }
        for (name, value) in [
            ("export_interval", raw.export_interval),
            ("export_timeout", raw.export_timeout),
        ] {
            if value.is_zero() {
                return Err(self.error(&at.clone().key(name), "must be greater than 0"));
            }
        }
        Ok(TelemetrySettings {
            to,
            host,
            path,
            service_name: raw.service_name,
            sample_ratio: raw.sample_ratio,
            max_queue: raw.max_queue,
            batch_size: raw.batch_size,
            export_interval: raw.export_interval,
            export_timeout: raw.export_timeout,
        })
    }
}
