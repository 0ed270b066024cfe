//! The tidegate gateway: a reverse proxy that applies tidegate-resilience
//! policies per upstream, with health checks, a status API and metrics.
//!
//! [`config::load`] reads and validates a config file; [`http::server::start`]
//! binds the listeners and serves until [`http::server::Running::shutdown`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod demo;
pub mod events;
pub mod http;
pub mod observe;
pub mod proxy;
pub mod reload;
