//! Starting a gateway in front of test upstreams.
#![allow(dead_code)]

use std::time::Duration;

use tidegate_gateway::config::{self, Config};
use tidegate_gateway::http::server::{self, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use http::header;
use serde_json::Value;
use tidegate_testkit::Answer;

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

/// Sends raw bytes and reads until the server closes or a full head and
/// `Content-Length` body arrive; returns the status line and the text.
pub(crate) async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("the server neither answered nor closed")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            });
            if len.is_some_and(|len| body.len() >= len) {
                break;
            }
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// Checks `value` against the JSON schema `schema` (the OpenAPI subset the
/// document uses: $ref, type, enum, required, properties,
/// additionalProperties, items, minimum, maximum).
pub(crate) fn validate(value: &Value, schema: &Value, doc: &Value, at: &str) -> Result<(), String> {
    if let Some(choices) = schema["oneOf"].as_array() {
        let fits = choices
            .iter()
            .filter(|choice| validate(value, choice, doc, at).is_ok())
            .count();
        return match fits {
            1 => Ok(()),
            n => Err(format!("{at}: fits {n} of the oneOf choices, not one")),
        };
    }
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.trim_start_matches("#/components/schemas/");
        return validate(value, &doc["components"]["schemas"][name], doc, at);
    }
    let type_of = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let actual = type_of(value);
    let allowed: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let fits = |t: &&str| *t == actual || (*t == "number" && actual == "integer");
    if !allowed.is_empty() && !allowed.iter().any(fits) {
        return Err(format!("{at}: {actual} where {allowed:?} is documented"));
    }
    if let Some(choices) = schema["enum"].as_array() {
        if !choices.contains(value) {
            return Err(format!("{at}: {value} is not one of {choices:?}"));
        }
    }
    if let (Some(n), Some(min)) = (value.as_f64(), schema["minimum"].as_f64()) {
        if n < min {
            return Err(format!("{at}: {n} < minimum {min}"));
        }
    }
    if let (Some(n), Some(max)) = (value.as_f64(), schema["maximum"].as_f64()) {
        if n > max {
            return Err(format!("{at}: {n} > maximum {max}"));
        }
    }
    if let Value::Object(map) = value {
        for key in schema["required"].as_array().into_iter().flatten() {
            let key = key.as_str().unwrap_or_default();
            if !map.contains_key(key) {
                return Err(format!("{at}: required `{key}` is missing"));
            }
        }
        for (key, v) in map {
            let inner = &schema["properties"][key];
            if !inner.is_null() {
                validate(v, inner, doc, &format!("{at}.{key}"))?;
            } else if schema["additionalProperties"].is_object() {
                validate(
                    v,
                    &schema["additionalProperties"],
                    doc,
                    &format!("{at}.{key}"),
                )?;
            }
        }
    }
    if let (Value::Array(items), Some(_)) = (value, schema["items"].as_object()) {
        for (i, item) in items.iter().enumerate() {
            validate(item, &schema["items"], doc, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// Checks an answer against what `doc` says `method path` answers.
pub(crate) fn conforms(doc: &Value, path: &str, method: &str, answer: &Answer) {
    let documented = &doc["paths"][path][method]["responses"][answer.status.as_str()];
    assert!(
        documented.is_object(),
        "{method} {path} answered {} which is not documented: {}",
        answer.status,
        answer.body
    );
    let content_type = answer.headers[header::CONTENT_TYPE].to_str().unwrap();
    let contents = documented["content"].as_object().unwrap();
    let (_, media) = contents
        .iter()
        .find(|(kind, _)| content_type.starts_with(kind.as_str()))
        .unwrap_or_else(|| panic!("{method} {path}: {content_type} is not documented"));
    if content_type.starts_with("application/json") {
        let value: Value = serde_json::from_str(&answer.body).unwrap();
        if let Err(e) = validate(&value, &media["schema"], doc, "$") {
            panic!("{method} {path} → {}: {e}\n{}", answer.status, answer.body);
        }
    }
}

/// A directory for one test's files (an event store), removed when dropped.
pub(crate) struct Dir(pub(crate) std::path::PathBuf);

impl Dir {
    /// `tidegate-gateway-{name}-{pid}` under the system's temp directory, empty.
    pub(crate) fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("tidegate-gateway-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA, and a certificate it signs for `san`: (CA PEM, cert PEM, key PEM).
pub(crate) fn signed(ca_name: &str, san: rcgen::SanType) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::default();
    leaf.subject_alt_names = vec![san];
    let cert = leaf
        .signed_by(&key, &rcgen::Issuer::new(ca, &ca_key))
        .unwrap();
    (ca_pem, cert.pem(), key.serialize_pem())
}

/// Writes into `dir` a server certificate for 127.0.0.1 (`server.pem`,
/// `server.key`) and its CA (`server-ca.pem`), and a client certificate
/// (`client.pem`, `client.key`) with the CA servers check it by
/// (`client-ca.pem`), all made now for `what`.
pub(crate) fn write_server_and_client_certificates(dir: &Dir, what: &str) {
    let (server_ca, server_cert, server_key) = signed(
        &format!("{what} ca"),
        rcgen::SanType::IpAddress([127, 0, 0, 1].into()),
    );
    let (client_ca, client_cert, client_key) = signed(
        &format!("{what} clients ca"),
        rcgen::SanType::DnsName("gateway.test".try_into().unwrap()),
    );
    for (file, text) in [
        ("server-ca.pem", &server_ca),
        ("server.pem", &server_cert),
        ("server.key", &server_key),
        ("client-ca.pem", &client_ca),
        ("client.pem", &client_cert),
        ("client.key", &client_key),
    ] {
        std::fs::write(dir.0.join(file), text).unwrap();
    }
}

/// The value of the metric `series` (name and labels, as exposed) on
/// `running`'s `/metrics`; panics when it is not there.
pub(crate) async fn counter(running: &Running, series: &str) -> u64 {
    let metrics = tidegate_testkit::get(&admin(running, "/metrics"))
        .await
        .body;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
        .parse()
        .unwrap()
}

/// Asks `check` every few milliseconds until it answers `Ok`, for up to
/// 30 s; then fails with `what` and its last `Err`.
pub(crate) async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match check().await {
            Ok(done) => return done,
            Err(last) if tokio::time::Instant::now() > deadline => {
                panic!("timed out waiting for {what}: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}
