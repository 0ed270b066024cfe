//! TLS to `https://` endpoints and webhooks (`[upstreams.tls]`): the
//! server's certificate checked against a private CA or the system's
//! roots, under the endpoint's host name or `server_name`; a client
//! certificate for mTLS; ALPN offering what the upstream's `protocol`
//! allows. Sessions are resumed (rustls keeps tickets per server name), so
//! a new pooled connection mostly costs an abbreviated handshake.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, ServerName};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::UpstreamProtocol;
use crate::http::tls::{certificates, provider, TlsError};

/// `[upstreams.tls]`: how `https://` endpoints are reached.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsSettings {
    /// The CA certificates (PEM) endpoints' certificates must chain to.
    /// Default: the system's roots.
    pub ca: Option<PathBuf>,
    /// A certificate chain (PEM) to present to endpoints (mTLS); needs
    /// `client_key`.
    pub client_cert: Option<PathBuf>,
    /// The key of `client_cert` (PEM).
    pub client_key: Option<PathBuf>,
    /// The name sent in SNI and checked in the endpoints' certificates.
    /// Default: each endpoint's host.
    pub server_name: Option<String>,
}

/// The TLS side of an upstream's connections, built from its settings
/// (every file read and checked once, when the config loads).
#[derive(Clone)]
pub struct ClientTls {
    settings: UpstreamTlsSettings,
    protocol: UpstreamProtocol,
    /// Of every file's contents: a reload that finds them changed builds
    /// the upstream again, and its new connections use the new files.
    digest: [u8; 32],
    connector: TlsConnector,
    /// Tells pools apart: two upstreams with one endpoint but other
    /// certificates must not share connections.
    id: u64,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("settings", &self.settings)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings
            && self.protocol == other.protocol
            && self.digest == other.digest
    }
}

/// The system's root certificates, read once (Debian: the
/// `ca-certificates` package; `SSL_CERT_FILE` and `SSL_CERT_DIR` are
/// honoured).
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "none found".to_owned(), ToString::to_string);
                return Err(format!(
                    "no system root certificate could be read ({why}); install ca-certificates or set `ca`"
                ));
            }
            Ok(Arc::new(roots))
        })
        .clone()
}

impl ClientTls {
    /// The TLS of `settings` for an upstream speaking `protocol`, or the
    /// first thing wrong (the setting, the file and the reason).
    pub fn new(
        settings: &UpstreamTlsSettings,
        protocol: UpstreamProtocol,
    ) -> Result<Self, TlsError> {
        let fail = |field: &'static str, reason: String| TlsError {
            sni: None,
            field,
            reason,
        };
        let mut digest = Sha256::new();
        let mut read = |field: &'static str, path: &PathBuf| {
            let bytes = std::fs::read(path)
                .map_err(|e| fail(field, format!("cannot read {}: {e}", path.display())))?;
            digest.update(&bytes);
            Ok::<_, TlsError>(())
        };
        let roots = match &settings.ca {
            Some(path) => {
                read("ca", path)?;
                let mut roots = RootCertStore::empty();
                for cert in certificates(path, None, "ca")? {
                    roots.add(cert).map_err(|e| {
                        fail(
                            "ca",
                            format!("{}: not a CA certificate: {e}", path.display()),
                        )
                    })?;
                }
                Arc::new(roots)
            }
            None => system_roots().map_err(|why| fail("ca", why))?,
        };
        if let Some(name) = &settings.server_name {
            ServerName::try_from(name.as_str()).map_err(|_| {
                fail(
                    "server_name",
                    format!("`{name}` is not a DNS name or IP address"),
                )
            })?;
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| fail("ca", e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match (&settings.client_cert, &settings.client_key) {
            (Some(cert_path), Some(key_path)) => {
                read("client_cert", cert_path)?;
                read("client_key", key_path)?;
                let chain = certificates(cert_path, None, "client_cert")?;
                let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
                    fail(
                        "client_key",
                        format!("{}: no private key read: {e}", key_path.display()),
                    )
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    fail(
                        "client_key",
                        format!(
                            "{} does not go with {}: {e}",
                            key_path.display(),
                            cert_path.display()
                        ),
                    )
                })?
            }
            (Some(_), None) => return Err(fail("client_key", "needed with client_cert".into())),
            (None, Some(_)) => return Err(fail("client_cert", "needed with client_key".into())),
            (None, None) => builder.with_no_client_auth(),
        };
        config.alpn_protocols = match protocol {
            UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
            UpstreamProtocol::Http2 => vec![b"h2".to_vec()],
            UpstreamProtocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        static IDS: AtomicU64 = AtomicU64::new(1);
        Ok(ClientTls {
            settings: settings.clone(),
            protocol,
            digest: digest.finalize().into(),
            connector: TlsConnector::from(Arc::new(config)),
            id: IDS.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The settings it was built from.
    pub fn settings(&self) -> &UpstreamTlsSettings {
        &self.settings
    }

    /// The name to ask for and check at an endpoint whose host is `host`.
    pub fn server_name(&self, host: &str) -> Result<ServerName<'static>, String> {
        let name = self
            .settings
            .server_name
            .as_deref()
            .unwrap_or_else(|| host.trim_start_matches('[').trim_end_matches(']'));
        ServerName::try_from(name.to_owned())
            .map_err(|_| format!("`{name}` is not a DNS name or IP address"))
    }

    /// Which connections pools may share.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The TLS handshake over `tcp` with the server named `name`.
    pub async fn handshake(
        &self,
        name: ServerName<'static>,
        tcp: TcpStream,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        self.connector.connect(name, tcp).await
    }
}
