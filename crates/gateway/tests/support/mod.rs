//! Starting a gateway in front of test upstreams.
#![allow(dead_code)]

use tidegate_gateway::config;
use tidegate_gateway::server::{self, Running};

/// Starts a gateway from `toml` (listeners on 127.0.0.1:0 unless set).
pub(crate) async fn gateway(toml: &str) -> Running {
    let text = if toml.contains("[gateway]") {
        toml.to_owned()
    } else {
        format!("[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{toml}")
    };
    let config = config::parse(&text, "test.toml", []).unwrap_or_else(|e| panic!("{e}"));
    server::start(config)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `http://ADDR` of the proxy listener.
pub(crate) fn url(running: &Running, path: &str) -> String {
    format!("http://{}{path}", running.addr)
}

/// `http://ADDR` of the admin listener.
pub(crate) fn admin(running: &Running, path: &str) -> String {
    format!("http://{}{path}", running.admin_addr)
}
