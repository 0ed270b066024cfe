//! The tidegate gateway: a reverse proxy that applies tidegate-resilience
//! policies per upstream, with health checks, a status API and metrics.
//!
//! [`config::load`] reads and validates a config file; [`server::start`]
//! binds the listeners and serves until [`server::Running::shutdown`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod alerts;
pub mod body;
pub mod client;
pub mod config;
pub mod demo;
pub mod edge;
pub mod events;
pub mod fallback;
pub mod framing;
pub mod grpc;
pub mod headers;
pub mod health;
pub mod metrics;
pub mod path;
pub mod pool;
pub mod proxy;
pub mod reload;
pub mod resets;
pub mod router;
pub mod server;
pub mod stats;
pub mod upstream;
