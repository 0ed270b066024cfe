//! The tidegate gateway: a reverse proxy that applies tidegate-resilience
//! policies per upstream, with health checks, a status API and metrics.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
