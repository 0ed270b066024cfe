//! The HTTP edge: the proxy listener and its connections ([`server`]),
//! what a connection speaks and its send timeout ([`conn`]), HTTP/1.1
//! served in the connection's task ([`h1`]), an upstream answer's fields
//! passed on as they came ([`fields`]), message bodies on the wire
//! both ways (`codec`), path
//! normalization ([`path`]), header rules ([`headers`]), the rapid-reset
//! count of HTTP/2 connections ([`resets`]), request bodies on their
//! way upstream ([`body`]) and TLS on the listener ([`tls`]).

pub mod body;
pub(crate) mod codec;
pub mod conn;
pub mod fields;
pub mod h1;
pub mod headers;
pub mod path;
pub mod resets;
pub mod server;
pub mod tls;
