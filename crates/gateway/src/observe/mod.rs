//! Observation: Prometheus metrics ([`metrics`]), the dashboard's traffic
//! history and breaker timeline ([`stats`]), the admin API and dashboard
//! ([`admin`]), webhook alerts ([`alerts`]), state-change notices for
//! `GET /events` ([`notices`]), and the tasks that watch each upstream
//! and sample its traffic ([`watch`]), and OpenTelemetry traces
//! ([`telemetry`]).

pub mod admin;
pub mod alerts;
pub mod metrics;
pub mod notices;
pub mod stats;
pub mod striped;
pub mod telemetry;
pub mod watch;
