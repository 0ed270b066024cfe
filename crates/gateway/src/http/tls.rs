//! TLS on the main listener (`[gateway.tls]`): ALPN h2 and http/1.1 on one
//! port, a certificate chosen by the name the client asks for (SNI),
//! optional client certificates (mTLS) whose verified identity goes
//! upstream in [`CLIENT_IDENTITY`], and certificate files read again when
//! they change or the config is reloaded; connections already open keep
//! the certificate they started with.
//!
//! rustls with *ring* as its crypto provider: async-nats already builds
//! it, where aws-lc-rs would add a C build of minutes on two cores (see
//! `provider` below).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderName;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::config::{CertFiles, ListenerTlsSettings};

/// The verified identity of a client certificate, set by the gateway on
/// every request of an mTLS connection (and removed from any other): the
/// certificate's first URI name (a SPIFFE id), else its first DNS name,
/// else `sha256:` and its fingerprint. Routes may match on it.
pub static CLIENT_IDENTITY: HeaderName = HeaderName::from_static("x-tidegate-client-identity");

/// A file and, when it can be read, its modification time and length.
type Stamp = (PathBuf, Option<(Duration, u64)>);

/// Client addresses remembered as logged, at most.
const LOGGED_PEERS: usize = 4096;

/// Why a TLS setting cannot be used: the file and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    /// In `sni`, which entry.
    pub sni: Option<usize>,
    /// Which setting: `cert`, `key` or `client_ca`.
    pub field: &'static str,
    /// What is wrong, naming the file.
    pub reason: String,
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.sni {
            Some(i) => write!(f, "gateway.tls.sni[{i}].{}: {}", self.field, self.reason),
            None => write!(f, "gateway.tls.{}: {}", self.field, self.reason),
        }
    }
}

/// *ring*'s provider. rustls 0.23.48 deprecates it because it has no
/// post-quantum key exchange (X25519MLKEM768 needs aws-lc-rs); the build
/// time of aws-lc-rs on two cores is the price we do not pay yet (see the
/// README's TLS section).
#[allow(deprecated)]
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn certificates(
    path: &Path,
    sni: Option<usize>,
    field: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let fail = |reason: String| TlsError { sni, field, reason };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(format!("{}: not PEM certificates: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(fail(format!("{}: no certificate in it", path.display())));
    }
    Ok(certs)
}

/// A certificate chain and its key, checked to belong together.
fn certified(files: &CertFiles, sni: Option<usize>) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = certificates(&files.cert, sni, "cert")?;
    let fail = |reason: String| TlsError {
        sni,
        field: "key",
        reason,
    };
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| fail(format!("{}: no private key read: {e}", files.key.display())))?;
    let signing = provider().key_provider.load_private_key(key).map_err(|e| {
        fail(format!(
            "{}: not a key TLS can use: {e}",
            files.key.display()
        ))
    })?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|_| {
        fail(format!(
            "{} is not the key of the certificate in {}",
            files.key.display(),
            files.cert.display()
        ))
    })?;
    Ok(Arc::new(certified))
}

/// The DNS names a certificate is valid for.
fn names(cert: &CertificateDer<'_>) -> Vec<String> {
    webpki::EndEntityCert::try_from(cert)
        .map(|ee| ee.valid_dns_names().map(str::to_ascii_lowercase).collect())
        .unwrap_or_default()
}

/// Chooses the certificate by the client's server name: an exact name,
/// then a wildcard one, then the default (`cert`).
#[derive(Debug)]
struct BySni {
    names: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name().map(str::to_ascii_lowercase) else {
            return Some(self.default.clone());
        };
        if let Some(exact) = self.names.get(&name) {
            return Some(exact.clone());
        }
        let wildcard = name.split_once('.').map(|(_, rest)| format!("*.{rest}"));
        Some(
            wildcard
                .and_then(|w| self.names.get(&w).cloned())
                .unwrap_or_else(|| self.default.clone()),
        )
    }
}

/// The rustls server config of `settings`, or the first thing wrong.
pub fn server_config(settings: &ListenerTlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let default = certified(
        &CertFiles {
            cert: settings.cert.clone(),
            key: settings.key.clone(),
        },
        None,
    )?;
    let mut by_name = HashMap::new();
    for (i, files) in settings.sni.iter().enumerate() {
        let key = certified(files, Some(i))?;
        let names = names(&key.cert[0]);
        if names.is_empty() {
            return Err(TlsError {
                sni: Some(i),
                field: "cert",
                reason: format!(
                    "{}: the certificate names no DNS name",
                    files.cert.display()
                ),
            });
        }
        for name in names {
            by_name.insert(name, key.clone());
        }
    }
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError {
            sni: None,
            field: "cert",
            reason: e.to_string(),
        })?;
    let builder = match &settings.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(path, None, "client_ca")? {
                roots.add(cert).map_err(|e| TlsError {
                    sni: None,
                    field: "client_ca",
                    reason: format!("{}: not a CA certificate: {e}", path.display()),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError {
                    sni: None,
                    field: "client_ca",
                    reason: format!("{}: {e}", path.display()),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(BySni {
        names: by_name,
        default,
    }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The identity of a verified client certificate (see [`CLIENT_IDENTITY`]).
pub fn identity(cert: &CertificateDer<'_>) -> String {
    if let Ok(ee) = webpki::EndEntityCert::try_from(cert) {
        if let Some(uri) = ee.valid_uri_names().next() {
            return uri.to_owned();
        }
        if let Some(dns) = ee.valid_dns_names().next() {
            return dns.to_owned();
        }
    }
    let digest = Sha256::digest(cert.as_ref());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The listener's TLS: the config new connections get, and what it was
/// built from.
pub struct ListenerTls {
    config: ArcSwap<ServerConfig>,
    /// Peers whose failed handshake was logged (each once; forgotten all
    /// at once when it grows past [`LOGGED_PEERS`]).
    logged: Mutex<std::collections::HashSet<std::net::IpAddr>>,
    settings: Mutex<(ListenerTlsSettings, Vec<Stamp>)>,
}

impl std::fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTls").finish_non_exhaustive()
    }
}

fn stamps(settings: &ListenerTlsSettings) -> Vec<Stamp> {
    let mut files = vec![settings.cert.clone(), settings.key.clone()];
    files.extend(settings.client_ca.clone());
    for pair in &settings.sni {
        files.push(pair.cert.clone());
        files.push(pair.key.clone());
    }
    files
        .into_iter()
        .map(|path| {
            // When and how long: a file written again within the clock's
            // grain still changes one of them, mostly.
            let stamp = std::fs::metadata(&path).ok().and_then(|m| {
                let modified = m
                    .modified()
                    .ok()?
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?;
                Some((modified, m.len()))
            });
            (path, stamp)
        })
        .collect()
}

impl ListenerTls {
    /// The TLS of `settings`, or what is wrong with it.
    pub fn new(settings: &ListenerTlsSettings) -> Result<Self, TlsError> {
        let config = server_config(settings)?;
        Ok(ListenerTls {
            config: ArcSwap::new(config),
            logged: Mutex::default(),
            settings: Mutex::new((settings.clone(), stamps(settings))),
        })
    }

    /// Logs a failed handshake of `peer`, the first time only: a client
    /// that keeps failing is counted, not logged at each attempt.
    pub fn handshake_failed(&self, peer: std::net::IpAddr, why: &dyn std::fmt::Display) {
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.len() >= LOGGED_PEERS {
            logged.clear();
        }
        if logged.insert(peer) {
            tracing::warn!(%peer, error = %why, "TLS handshake failed (logged once per client address; all are counted in tidegate_tls_handshake_failures_total)");
        }
    }

    /// The config a new connection gets.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    /// Builds the config again when `settings` differ from the last ones
    /// or one of their files changed since; a setting that fails leaves
    /// the running config in place. Whether it changed.
    pub fn refresh(&self, settings: &ListenerTlsSettings) -> Result<bool, TlsError> {
        let mut last = self.settings.lock().unwrap_or_else(|e| e.into_inner());
        let now = stamps(settings);
        if last.0 == *settings && last.1 == now {
            return Ok(false);
        }
        let config = server_config(settings)?;
        self.config.store(config);
        *last = (settings.clone(), now);
        Ok(true)
    }

    /// The settings in effect.
    pub fn settings(&self) -> ListenerTlsSettings {
        self.settings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }
}
