//! Starting a gateway in front of test upstreams.
#![allow(dead_code)]

use tidegate_gateway::config::{self, Config};
use tidegate_gateway::server::{self, Running};

/// Parses `toml` (listeners on 127.0.0.1:0 unless a `[gateway]` is given).
pub(crate) fn parsed(toml: &str) -> Config {
    let text = if toml.contains("[gateway]") {
        toml.to_owned()
    } else {
        format!("[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{toml}")
    };
    config::parse(&text, "test.toml", []).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts a gateway from `toml`, as [`parsed`] reads it.
pub(crate) async fn gateway(toml: &str) -> Running {
    server::start(parsed(toml))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// One upstream `svc` at `endpoint` behind a route `all` for every path;
/// `gateway_extra` goes under `[gateway]` (listeners on 127.0.0.1:0).
pub(crate) fn catch_all(endpoint: &str, gateway_extra: &str) -> String {
    format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{gateway_extra}\n\
         [[upstreams]]\nname = \"svc\"\nendpoints = [\"{endpoint}\"]\n\
         [[routes]]\nname = \"all\"\npath_prefix = \"/\"\nupstream = \"svc\"\n"
    )
}

/// `http://ADDR` of the proxy listener.
pub(crate) fn url(running: &Running, path: &str) -> String {
    format!("http://{}{path}", running.addr)
}

/// `http://ADDR` of the admin listener.
pub(crate) fn admin(running: &Running, path: &str) -> String {
    format!("http://{}{path}", running.admin_addr)
}
