//! TLS on the main listener, with certificates made at test time (rcgen):
//! a Rust client and curl over TLS 1.2 and 1.3, h2 and http/1.1; SNI
//! choosing between two certificates; client certificates required, and
//! their identity passed upstream and matched by a route; a rotated
//! certificate served to new connections while an open one keeps working;
//! bad files refused by name. And the gateway as a TLS client: https
//! upstreams with a private CA and mTLS in HTTP/1.1, HTTP/2 and ALPN's
//! choice, health checks over TLS, a wrong CA refused and counted, an https
//! webhook.

#![allow(deprecated)] // ring's provider, as the gateway uses it (src/http/tls.rs)

mod support;

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use support::Dir;
use tidegate_gateway::http::server::Running;
use tidegate_testkit::{text, Upstream};
use tokio::net::TcpStream;
use tokio::time::{Duration, Instant};

/// A certificate authority made for one test.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { params, key, pem }
}

/// A certificate `ca` signs for `names`; its PEM and its key's.
fn leaf(ca: &Ca, names: Vec<SanType>) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = names;
    let issuer = Issuer::new(ca.params.clone(), &ca.key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn dns(name: &str) -> SanType {
    SanType::DnsName(name.try_into().unwrap())
}

/// Files of one test: the server CA, certificates for a.test (default)
/// and b.test (by SNI), the client CA and a client certificate.
struct Files {
    dir: Dir,
    server_ca: Ca,
    client: (String, String),
}

impl Files {
    fn new(name: &str) -> Files {
        let dir = Dir::new(&format!("tls-{name}"));
        let server_ca = ca("server ca");
        let client_ca = ca("client ca");
        let write = |file: &str, text: &str| std::fs::write(dir.0.join(file), text).unwrap();
        let (a, a_key) = leaf(&server_ca, vec![dns("a.test"), dns("localhost")]);
        let (b, b_key) = leaf(&server_ca, vec![dns("b.test")]);
        write("a.pem", &a);
        write("a.key", &a_key);
        write("b.pem", &b);
        write("b.key", &b_key);
        write("client-ca.pem", &client_ca.pem);
        let client = leaf(
            &client_ca,
            vec![SanType::URI(
                "spiffe://tidegate.test/checkout".try_into().unwrap(),
            )],
        );
        Files {
            dir,
            server_ca,
            client,
        }
    }

    fn path(&self, file: &str) -> String {
        self.dir.0.join(file).display().to_string()
    }

    /// `[gateway.tls]` with the two certificates, and `client_ca` if
    /// `mtls`; routes `/` to `echo`, and `/billing` only for the checkout
    /// service's identity.
    fn config(&self, echo: &Upstream, mtls: bool) -> String {
        let client_ca = if mtls {
            format!("client_ca = \"{}\"\n", self.path("client-ca.pem"))
        } else {
            String::new()
        };
        format!(
            r#"[gateway]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[gateway.tls]
cert = "{a}"
key = "{a_key}"
{client_ca}sni = [{{ cert = "{b}", key = "{b_key}" }}]

[[upstreams]]
name = "echo"
endpoints = ["{echo}"]

[[routes]]
name = "billing"
path_prefix = "/billing"
strip_prefix = true
headers = {{ "x-tidegate-client-identity" = "spiffe://tidegate.test/checkout" }}
upstream = "echo"

[[routes]]
name = "all"
path_prefix = "/"
upstream = "echo"
"#,
            a = self.path("a.pem"),
            a_key = self.path("a.key"),
            b = self.path("b.pem"),
            b_key = self.path("b.key"),
            echo = echo.url(),
        )
    }
}

/// An upstream answering with the client identity it was told.
async fn echo() -> Upstream {
    Upstream::start(|req| async move {
        let identity = req
            .headers()
            .get("x-tidegate-client-identity")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_else(|| "none".into());
        text(200, &format!("{} {identity}", req.uri().path()))
    })
    .await
}

/// What a TLS exchange came to.
#[derive(Debug)]
struct Exchange {
    status: StatusCode,
    body: String,
    alpn: Option<Vec<u8>>,
    version: rustls::ProtocolVersion,
    served: CertificateDer<'static>,
}

/// A TLS client for `server_name` trusting `ca`, with `versions`, offering
/// `alpn`, and `client` (certificate and key PEM) if given.
fn client_config(
    ca: &Ca,
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[&[u8]],
    client: Option<&(String, String)>,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// `GET path` over a new TLS connection to `running` as `server_name`.
async fn get_tls(
    running: &Running,
    config: Arc<ClientConfig>,
    server_name: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Exchange, String> {
    let tcp = TcpStream::connect(running.addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (_, session) = tls.get_ref();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    let version = session.protocol_version().unwrap();
    let served = session.peer_certificates().unwrap()[0].clone().into_owned();
    let h2 = alpn.as_deref() == Some(b"h2");
    // HTTP/2 names the host in `:authority`, HTTP/1.1 in `Host`.
    let mut request = if h2 {
        Request::get(format!("https://{server_name}{path}"))
    } else {
        Request::get(path).header("host", server_name)
    };
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Empty::<Bytes>::new()).unwrap();
    let response = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        sender.send_request(request).await
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        sender.send_request(request).await
    }
    .map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(Exchange {
        status,
        body: String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        alpn,
        version,
        served,
    })
}

fn names_of(cert: &CertificateDer<'_>) -> Vec<String> {
    webpki::EndEntityCert::try_from(cert)
        .unwrap()
        .valid_dns_names()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn tls_1_2_and_1_3_with_h2_and_http1_and_sni_choosing_the_certificate() {
    let files = Files::new("versions");
    let echo = echo().await;
    let running = support::gateway(&files.config(&echo, false)).await;
    use rustls::ProtocolVersion::{TLSv1_2, TLSv1_3};
    type Alpn = &'static [u8];
    let cases: [(rustls::ProtocolVersion, &[Alpn], Alpn); 4] = [
        (TLSv1_3, &[b"h2", b"http/1.1"], b"h2"),
        (TLSv1_3, &[b"http/1.1"], b"http/1.1"),
        (TLSv1_2, &[b"h2"], b"h2"),
        (TLSv1_2, &[b"http/1.1"], b"http/1.1"),
    ];
    for (version, offered, chosen) in cases {
        let only: &[&'static SupportedProtocolVersion] = if version == TLSv1_3 {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS12]
        };
        let config = client_config(&files.server_ca, only, offered, None);
        let exchange = get_tls(&running, config, "a.test", "/hello", &[])
            .await
            .unwrap();
        assert_eq!(exchange.status, 200);
        assert_eq!(exchange.body, "/hello none");
        assert_eq!(exchange.alpn.as_deref(), Some(chosen));
        assert_eq!(exchange.version, version);
        assert!(names_of(&exchange.served).contains(&"a.test".to_owned()));
    }
    // SNI picks the other certificate; an unknown name gets the default.
    let config = client_config(&files.server_ca, &[&rustls::version::TLS13], &[b"h2"], None);
    let b = get_tls(&running, config.clone(), "b.test", "/", &[])
        .await
        .unwrap();
    assert_eq!(names_of(&b.served), ["b.test"]);
    let default = get_tls(&running, config.clone(), "localhost", "/", &[])
        .await
        .unwrap();
    assert!(names_of(&default.served).contains(&"a.test".to_owned()));
    // Without mTLS a client cannot claim an identity: its header is dropped.
    let spoof = get_tls(
        &running,
        config,
        "a.test",
        "/billing",
        &[(
            "x-tidegate-client-identity",
            "spiffe://tidegate.test/checkout",
        )],
    )
    .await
    .unwrap();
    assert_eq!(
        spoof.body, "/billing none",
        "the catch-all route took it, not billing's (which strips its prefix)"
    );
    assert_eq!(echo.hits(), 7);
}

#[tokio::test]
async fn curl_speaks_to_it_over_tls_1_2_and_1_3() {
    let files = Files::new("curl");
    let echo = echo().await;
    let running = support::gateway(&files.config(&echo, false)).await;
    std::fs::write(files.dir.0.join("ca.pem"), &files.server_ca.pem).unwrap();
    let port = running.addr.port();
    for args in [
        ["--http2", "--tlsv1.3"],
        ["--http1.1", "--tlsv1.3"],
        ["--http2", "--tls-max"],
        ["--http1.1", "--tls-max"],
    ] {
        let mut command = tokio::process::Command::new("curl");
        command.args([
            "-sS",
            "-w",
            " %{http_version}",
            "--cacert",
            &files.path("ca.pem"),
        ]);
        command.args(["--resolve", &format!("b.test:{port}:127.0.0.1")]);
        command.arg(args[0]);
        if args[1] == "--tls-max" {
            command.args(["--tlsv1.2", "--tls-max", "1.2"]);
        } else {
            command.arg(args[1]);
        }
        let out = command
            .arg(format!("https://b.test:{port}/curl"))
            .output()
            .await
            .expect("curl runs");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let version = if args[0] == "--http2" { "2" } else { "1.1" };
        assert_eq!(said, format!("/curl none {version}"), "{args:?}");
    }
}

#[tokio::test]
async fn client_certificates_are_required_and_their_identity_goes_upstream_and_opens_routes() {
    let files = Files::new("mtls");
    let echo = echo().await;
    let running = support::gateway(&files.config(&echo, true)).await;
    let versions: &[&'static SupportedProtocolVersion] = &[&rustls::version::TLS13];
    let anonymous = client_config(&files.server_ca, versions, &[b"h2"], None);
    let refused = get_tls(&running, anonymous, "a.test", "/", &[]).await;
    assert!(refused.is_err(), "{refused:?}");
    let checkout = client_config(&files.server_ca, versions, &[b"h2"], Some(&files.client));
    let answer = get_tls(&running, checkout.clone(), "a.test", "/billing/charge", &[])
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.body, "/charge spiffe://tidegate.test/checkout",
        "billing's route took it (it strips its prefix)"
    );
    // A client's own copy of the header never replaces the verified one.
    let claimed = get_tls(
        &running,
        checkout,
        "a.test",
        "/other",
        &[("x-tidegate-client-identity", "spiffe://tidegate.test/admin")],
    )
    .await
    .unwrap();
    assert_eq!(claimed.body, "/other spiffe://tidegate.test/checkout");
    // Someone else's certificate, from another CA: refused.
    let stranger = leaf(&ca("stranger ca"), vec![dns("stranger.test")]);
    let stranger = client_config(&files.server_ca, versions, &[b"h2"], Some(&stranger));
    assert!(get_tls(&running, stranger, "a.test", "/", &[])
        .await
        .is_err());
    let failures = support::counter(
        &running,
        "tidegate_tls_handshake_failures_total{side=\"listener\"}",
    )
    .await;
    assert!(failures >= 2, "{failures}");
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_connections_while_an_open_one_goes_on() {
    let files = Files::new("rotate");
    let echo = echo().await;
    let running = support::gateway(&files.config(&echo, false)).await;
    let config = client_config(
        &files.server_ca,
        &[&rustls::version::TLS13],
        &[b"http/1.1"],
        None,
    );
    // An open HTTP/1.1 connection, before the rotation.
    let tcp = TcpStream::connect(running.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(ServerName::try_from("a.test").unwrap(), tcp)
        .await
        .unwrap();
    let (mut open, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let first = open
        .send_request(
            Request::get("/before")
                .header("host", "a.test")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    first.into_body().collect().await.unwrap();

    let (renewed, renewed_key) = leaf(&files.server_ca, vec![dns("a.test"), dns("renewed.a.test")]);
    std::fs::write(files.dir.0.join("a.key"), renewed_key).unwrap();
    std::fs::write(files.dir.0.join("a.pem"), renewed).unwrap();
    // The watcher looks every 2 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let served = get_tls(&running, config.clone(), "a.test", "/", &[])
            .await
            .unwrap()
            .served;
        if names_of(&served).contains(&"renewed.a.test".to_owned()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let later = open
        .send_request(
            Request::get("/after")
                .header("host", "a.test")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(later.status(), 200, "the open connection goes on");
    let body = later.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "/after none");
}

#[test]
fn bad_certificate_files_are_refused_with_their_key_file_and_reason() {
    let files = Files::new("bad");
    std::fs::write(files.dir.0.join("empty.pem"), "").unwrap();
    let other = leaf(&files.server_ca, vec![dns("other.test")]);
    std::fs::write(files.dir.0.join("other.key"), other.1).unwrap();
    let config = |cert: &str, key: &str| {
        format!(
            "[gateway.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            files.path(cert),
            files.path(key)
        )
    };
    let err = |text: String| {
        tidegate_gateway::config::parse(&text, "t.toml", [])
            .unwrap_err()
            .to_string()
    };
    let missing = err(config("nope.pem", "a.key"));
    assert!(
        missing.starts_with("t.toml:2:1: gateway.tls.cert: cannot read "),
        "{missing}"
    );
    assert!(missing.contains("nope.pem"), "{missing}");
    let empty = err(config("empty.pem", "a.key"));
    assert!(
        empty.ends_with("empty.pem: no certificate in it"),
        "{empty}"
    );
    let mismatched = err(config("a.pem", "other.key"));
    assert!(
        mismatched.contains("gateway.tls.key: ")
            && mismatched.contains("is not the key of the certificate in"),
        "{mismatched}"
    );
}

/// An HTTPS upstream: `cert`/`key` (PEM), client certificates of
/// `client_ca` required when given, ALPN offering `alpn`. It answers
/// `{version} {client identity}` and sends every path it serves to the
/// returned channel.
async fn https_upstream(
    cert: &(String, String),
    client_ca: Option<&Ca>,
    alpn: &[&[u8]],
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
                .unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::new(rustls::crypto::ring::default_provider()),
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert.0.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(cert.1.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen, paths) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                // A handshake the gateway gives up on is no test failure.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let identity = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map_or("anonymous".to_owned(), |certs| {
                        tidegate_gateway::http::tls::identity(&certs[0])
                    });
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let _ = seen.send(req.uri().path().to_owned());
                        let said = format!("{:?} {identity}", req.version());
                        async move { Ok::<_, std::convert::Infallible>(text(200, &said)) }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, paths)
}

/// Files for the gateway as a client of HTTPS upstreams: the upstreams'
/// CA, a certificate for `upstream.test` and 127.0.0.1, the CA upstreams
/// trust clients of, and the gateway's client certificate.
struct UpstreamFiles {
    files: Files,
    upstream: (String, String),
    client_ca: Ca,
}

impl UpstreamFiles {
    fn new(name: &str) -> UpstreamFiles {
        let files = Files::new(name);
        let upstream = leaf(
            &files.server_ca,
            vec![
                dns("upstream.test"),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ],
        );
        let client_ca = ca("upstreams' client ca");
        let gateway = leaf(
            &client_ca,
            vec![SanType::URI(
                "spiffe://tidegate.test/gateway".try_into().unwrap(),
            )],
        );
        let write = |file: &str, text: &str| std::fs::write(files.dir.0.join(file), text).unwrap();
        write("upstream-ca.pem", &files.server_ca.pem);
        write("gateway.pem", &gateway.0);
        write("gateway.key", &gateway.1);
        UpstreamFiles {
            files,
            upstream,
            client_ca,
        }
    }

    /// `[upstreams.tls]` trusting the upstreams' CA, with the gateway's
    /// client certificate.
    fn tls(&self, server_name: Option<&str>) -> String {
        let name = server_name.map_or(String::new(), |n| format!("server_name = \"{n}\"\n"));
        format!(
            "[upstreams.tls]\nca = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n{name}",
            self.files.path("upstream-ca.pem"),
            self.files.path("gateway.pem"),
            self.files.path("gateway.key"),
        )
    }
}

fn route(name: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nstrip_prefix = true\nupstream = \"{name}\"\n"
    )
}

#[tokio::test]
async fn https_upstreams_with_a_private_ca_and_mtls_over_http1_http2_and_alpn_with_health_checks() {
    let files = UpstreamFiles::new("upstreams");
    let both: &[&[u8]] = &[b"h2", b"http/1.1"];
    let (mtls, mut mtls_paths) =
        https_upstream(&files.upstream, Some(&files.client_ca), both).await;
    let (http1_only, _) = https_upstream(&files.upstream, None, &[b"http/1.1"]).await;
    let config = format!(
        r#"[[upstreams]]
name = "h1"
endpoints = ["https://localhost:{port}"]
{tls_named}[upstreams.health_check]
path = "/health"
interval = "100ms"

[[upstreams]]
name = "h2"
endpoints = ["https://127.0.0.1:{port}"]
protocol = "http2"
{tls}
[[upstreams]]
name = "auto"
endpoints = ["https://127.0.0.1:{port}"]
protocol = "auto"
{tls}
[[upstreams]]
name = "auto1"
endpoints = ["https://127.0.0.1:{port1}"]
protocol = "auto"
{tls}
{r1}{r2}{r3}{r4}"#,
        port = mtls.port(),
        port1 = http1_only.port(),
        tls_named = files.tls(Some("upstream.test")),
        tls = files.tls(None),
        r1 = route("h1"),
        r2 = route("h2"),
        r3 = route("auto"),
        r4 = route("auto1"),
    );
    let running = support::gateway(&config).await;
    let gateway = "spiffe://tidegate.test/gateway";
    for (path, said) in [
        ("/h1/x", format!("HTTP/1.1 {gateway}")),
        ("/h2/x", format!("HTTP/2.0 {gateway}")),
        ("/auto/x", format!("HTTP/2.0 {gateway}")),
        ("/auto1/x", "HTTP/1.1 anonymous".to_owned()),
        // The chosen version sticks to the endpoint's pool.
        ("/auto/x", format!("HTTP/2.0 {gateway}")),
        ("/auto1/x", "HTTP/1.1 anonymous".to_owned()),
    ] {
        let answer = tidegate_testkit::get(&support::url(&running, path)).await;
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (StatusCode::OK, said.as_str()),
            "{path}"
        );
    }
    // The health checks reach the endpoint over TLS, as `upstream.test`.
    loop {
        if mtls_paths.recv().await.unwrap() == "/health" {
            break;
        }
    }
    let metrics = tidegate_testkit::get(&support::admin(&running, "/metrics"))
        .await
        .body;
    assert!(
        metrics.contains("tidegate_tls_handshake_failures_total{side=\"upstream\"} 0\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_upstream_of_another_ca_is_refused_with_a_clear_error_counted_each_time() {
    let files = UpstreamFiles::new("wrong-ca");
    let stranger = leaf(
        &ca("stranger ca"),
        vec![SanType::IpAddress([127, 0, 0, 1].into())],
    );
    let (addr, _) = https_upstream(&stranger, None, &[b"http/1.1"]).await;
    let config = format!(
        "[[upstreams]]\nname = \"svc\"\nendpoints = [\"https://{addr}\"]\n{}\n{}",
        files.tls(None),
        route("svc")
    );
    let running = support::gateway(&config).await;
    for _ in 0..2 {
        let answer = tidegate_testkit::get(&support::url(&running, "/svc/x")).await;
        assert_eq!(answer.status, 502);
        assert!(
            answer.body.contains("upstream TLS handshake failed"),
            "{}",
            answer.body
        );
    }
    let failures = support::counter(
        &running,
        "tidegate_tls_handshake_failures_total{side=\"upstream\"}",
    )
    .await;
    // Each request tried (with its retry) and failed again.
    assert!(failures >= 2, "{failures}");
}

#[test]
fn bad_upstream_tls_settings_are_refused_with_their_key_file_and_reason() {
    let files = UpstreamFiles::new("bad-upstream");
    let err = |text: String| {
        tidegate_gateway::config::parse(&text, "t.toml", [])
            .unwrap_err()
            .to_string()
    };
    let upstream = |endpoint: &str, tls: &str| {
        format!("[[upstreams]]\nname = \"svc\"\nendpoints = [\"{endpoint}\"]\n{tls}")
    };
    let missing = err(upstream(
        "https://127.0.0.1:9",
        "[upstreams.tls]\nca = \"/nonexistent/ca.pem\"\n",
    ));
    assert!(
        missing.contains("upstreams[0].tls.ca: cannot read /nonexistent/ca.pem"),
        "{missing}"
    );
    let plain = err(upstream("http://127.0.0.1:9", &files.tls(None)));
    assert!(
        plain.contains("upstreams[0].tls: is for https:// endpoints, and this upstream has none"),
        "{plain}"
    );
    let half = err(upstream(
        "https://127.0.0.1:9",
        &format!(
            "[upstreams.tls]\nclient_cert = \"{}\"\n",
            files.files.path("gateway.pem")
        ),
    ));
    assert!(
        half.contains("upstreams[0].tls.client_key: needed with client_cert"),
        "{half}"
    );
    let mismatched = err(upstream(
        "https://127.0.0.1:9",
        &format!(
            "[upstreams.tls]\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
            files.files.path("gateway.pem"),
            files.files.path("a.key")
        ),
    ));
    assert!(
        mismatched.contains("upstreams[0].tls.client_key: ")
            && mismatched.contains("does not go with"),
        "{mismatched}"
    );
    // An https endpoint without a port is on 443.
    let config = tidegate_gateway::config::parse(
        &upstream("https://upstream.test", &files.tls(None)),
        "t.toml",
        [],
    )
    .unwrap();
    assert_eq!(
        config.upstreams[0].endpoints[0].to_string(),
        "https://upstream.test:443"
    );
}

#[tokio::test]
async fn alerts_reach_an_https_webhook_checked_against_the_system_roots() {
    let files = UpstreamFiles::new("webhook");
    // The system's roots, as the OpenSSL variable names them: the test's
    // CA only (each test is its own process under nextest).
    std::env::set_var("SSL_CERT_FILE", files.files.path("upstream-ca.pem"));
    let (hook, mut hooked) = https_upstream(&files.upstream, None, &[b"http/1.1"]).await;
    let failing = Upstream::start(|_| async { text(500, "down") }).await;
    let config = format!(
        r#"[[upstreams]]
name = "svc"
endpoints = ["{failing}"]
[upstreams.policy.circuit_breaker]
consecutive_failures = 2
[upstreams.policy.retry]
max_attempts = 1

[[routes]]
name = "svc"
path_prefix = "/"
upstream = "svc"

[alerts]
webhooks = ["https://127.0.0.1:{port}/hook"]
"#,
        failing = failing.url(),
        port = hook.port(),
    );
    let running = support::gateway(&config).await;
    for _ in 0..2 {
        tidegate_testkit::get(&support::url(&running, "/x")).await;
    }
    let hooked = tokio::time::timeout(Duration::from_secs(20), hooked.recv()).await;
    assert_eq!(
        hooked
            .expect("no alert reached the https receiver")
            .unwrap(),
        "/hook"
    );
    running.shutdown().await;
}
