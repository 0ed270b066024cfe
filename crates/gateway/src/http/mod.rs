//! The HTTP edge: the proxy listener and its connections ([`server`]),
//! the framing guard in front of hyper's parser ([`framing`]), path
//! normalization ([`path`]), header rules ([`headers`]), the rapid-reset
//! count of HTTP/2 connections ([`resets`]), request bodies on their
//! way upstream ([`body`]) and TLS on the listener ([`tls`]).

pub mod body;
pub mod framing;
pub mod headers;
pub mod path;
pub mod resets;
pub mod server;
pub mod tls;
