//! gRPC through the gateway, with a real gRPC server and client (tonic):
//! unary calls and streams in both directions, statuses and trailers
//! passed through, calls judged and retried by their `grpc-status`, the
//! gateway's own errors in gRPC form, `grpc-timeout` as the deadline, and
//! the gRPC health checking protocol.

mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{self, Stream, StreamExt};
use http::uri::PathAndQuery;
use support::{admin, gateway};
use tidegate_testkit::{get, Upstream};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

/// The one message of the test service.
#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(string, tag = "1")]
    text: String,
}

fn msg(text: &str) -> Msg {
    Msg {
        text: text.to_owned(),
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

/// A tower service from a closure: tonic's method traits take any.
struct Method<F>(F);

impl<F, Req, Fut, Resp> tower_service::Service<Req> for Method<F>
where
    F: FnMut(Req) -> Fut,
    Fut: Future<Output = Result<Resp, Status>>,
{
    type Response = Resp;
    type Error = Status;
    type Future = Fut;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Fut {
        (self.0)(request)
    }
}

/// What the echo service saw and how it misbehaves.
#[derive(Debug, Default)]
struct Echo {
    /// Unary calls answered UNAVAILABLE before one succeeds.
    unavailable: AtomicU32,
    /// Calls of any method.
    calls: AtomicU32,
    /// The `grpc-timeout` of each unary call.
    timeouts: Mutex<Vec<Option<String>>>,
}

/// `test.Echo`: `Unary` (echoes; `missing` is NOT_FOUND, `broken` is
/// INTERNAL), `Countdown` (three messages), `Join` (the client's
/// messages joined) and `Chat` (each message echoed as it comes).
#[derive(Clone)]
struct EchoServer(Arc<Echo>);

impl tower_service::Service<http::Request<tonic::body::Body>> for EchoServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let echo = self.0.clone();
        echo.calls.fetch_add(1, Ordering::SeqCst);
        let mut grpc = tonic::server::Grpc::new(ProstCodec::<Msg, Msg>::default());
        Box::pin(async move {
            Ok(match req.uri().path() {
                "/test.Echo/Unary" => {
                    let method = Method(move |r: Request<Msg>| {
                        let echo = echo.clone();
                        async move {
                            let timeout = r.metadata().get("grpc-timeout");
                            let timeout = timeout.map(|t| t.to_str().unwrap().to_owned());
                            echo.timeouts.lock().unwrap().push(timeout);
                            let left = echo.unavailable.load(Ordering::SeqCst);
                            if left > 0 {
                                echo.unavailable.store(left - 1, Ordering::SeqCst);
                                return Err(Status::unavailable("warming up"));
                            }
                            match r.into_inner().text.as_str() {
                                "missing" => Err(Status::not_found("no such thing")),
                                "broken" => Err(Status::internal("it broke")),
                                text => Ok(Response::new(msg(text))),
                            }
                        }
                    });
                    grpc.unary(method, req).await
                }
                "/test.Echo/Countdown" => {
                    let method = Method(|r: Request<Msg>| async move {
                        let text = r.into_inner().text;
                        let messages = (1..=3).map(move |i| Ok(msg(&format!("{text}-{i}"))));
                        Ok(Response::new(Box::pin(stream::iter(messages)) as MsgStream))
                    });
                    grpc.server_streaming(method, req).await
                }
                "/test.Echo/Join" => {
                    let method = Method(|r: Request<Streaming<Msg>>| async move {
                        let mut parts = Vec::new();
                        let mut incoming = r.into_inner();
                        while let Some(m) = incoming.message().await? {
                            parts.push(m.text);
                        }
                        Ok(Response::new(msg(&parts.join("+"))))
                    });
                    grpc.client_streaming(method, req).await
                }
                "/test.Echo/Chat" => {
                    let method = Method(|r: Request<Streaming<Msg>>| async move {
                        let replies = r
                            .into_inner()
                            .map(|m| m.map(|m| msg(&format!("re: {}", m.text))));
                        Ok(Response::new(Box::pin(replies) as MsgStream))
                    });
                    grpc.streaming(method, req).await
                }
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

/// Serves `service` on 127.0.0.1:0; returns its address.
async fn serve<S>(service: S) -> std::net::SocketAddr
where
    S: tower_service::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(Server::builder().serve_with_incoming(service, TcpIncoming::from(listener)));
    addr
}

async fn echo_server() -> (Arc<Echo>, std::net::SocketAddr) {
    let echo = Arc::new(Echo::default());
    let addr = serve(EchoServer(echo.clone())).await;
    (echo, addr)
}

/// The gateway in front of `endpoint`, an HTTP/2 upstream `echo` on route
/// `/test.Echo`; `extra` is added to the upstream's table.
fn config(endpoint: &str, extra: &str) -> String {
    format!(
        r#"[[upstreams]]
name = "echo"
endpoints = ["{endpoint}"]
protocol = "http2"
{extra}
[upstreams.policy.retry]
base_delay = "1ms"
max_delay = "1ms"
[[routes]]
name = "grpc"
path_prefix = "/test.Echo"
upstream = "echo"
"#
    )
}

/// A gRPC client of the gateway at `addr`.
async fn client(addr: std::net::SocketAddr) -> tonic::client::Grpc<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

async fn unary(
    grpc: &mut tonic::client::Grpc<Channel>,
    path: &'static str,
    text: &str,
) -> Result<String, Status> {
    unary_request(grpc, path, Request::new(msg(text))).await
}

async fn unary_request(
    grpc: &mut tonic::client::Grpc<Channel>,
    path: &'static str,
    request: Request<Msg>,
) -> Result<String, Status> {
    grpc.ready().await.unwrap();
    let codec = ProstCodec::<Msg, Msg>::default();
    let response = grpc
        .unary(request, PathAndQuery::from_static(path), codec)
        .await?;
    Ok(response.into_inner().text)
}

#[tokio::test]
async fn unary_calls_and_their_statuses_pass_through() {
    let (echo, addr) = echo_server().await;
    let gw = gateway(&config(&format!("http://{addr}"), "")).await;
    let mut grpc = client(gw.addr).await;
    assert_eq!(
        unary(&mut grpc, "/test.Echo/Unary", "hello").await.unwrap(),
        "hello"
    );
    let err = unary(&mut grpc, "/test.Echo/Unary", "missing")
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::NotFound, "no such thing")
    );
    assert_eq!(
        echo.calls.load(Ordering::SeqCst),
        2,
        "NOT_FOUND is not retried"
    );
    let status = get(&admin(&gw, "/status/services")).await.json();
    assert_eq!(status["services"]["echo"]["failure_count"], 0, "{status}");
}

#[tokio::test]
async fn streams_flow_both_ways_message_by_message() {
    let (_, addr) = echo_server().await;
    let gw = gateway(&config(&format!("http://{addr}"), "")).await;
    let mut grpc = client(gw.addr).await;
    let codec = || ProstCodec::<Msg, Msg>::default();

    grpc.ready().await.unwrap();
    let path = PathAndQuery::from_static("/test.Echo/Countdown");
    let response = grpc
        .server_streaming(Request::new(msg("t")), path, codec())
        .await
        .unwrap();
    let got: Vec<String> = response
        .into_inner()
        .map(|m| m.unwrap().text)
        .collect()
        .await;
    assert_eq!(got, ["t-1", "t-2", "t-3"]);

    grpc.ready().await.unwrap();
    let path = PathAndQuery::from_static("/test.Echo/Join");
    let parts = stream::iter([msg("a"), msg("b"), msg("c")]);
    let response = grpc
        .client_streaming(Request::new(parts), path, codec())
        .await
        .unwrap();
    assert_eq!(response.into_inner().text, "a+b+c");

    // Each message waits for the answer to the one before: a gateway that
    // held the request body back until it ended would stall here.
    let (to_server, from_client) = tokio::sync::mpsc::channel::<Msg>(1);
    let outgoing = stream::unfold(from_client, |mut rx| async move {
        rx.recv().await.map(|m| (m, rx))
    });
    grpc.ready().await.unwrap();
    let path = PathAndQuery::from_static("/test.Echo/Chat");
    to_server.send(msg("one")).await.unwrap();
    let response = grpc
        .streaming(Request::new(outgoing), path, codec())
        .await
        .unwrap();
    let mut replies = response.into_inner();
    for text in ["one", "two", "three"] {
        if text != "one" {
            to_server.send(msg(text)).await.unwrap();
        }
        let reply = tokio::time::timeout(Duration::from_secs(10), replies.message())
            .await
            .expect("the reply never came")
            .unwrap()
            .unwrap();
        assert_eq!(reply.text, format!("re: {text}"));
    }
    drop(to_server);
    assert!(
        replies.message().await.unwrap().is_none(),
        "the stream ends with OK"
    );
}

#[tokio::test]
async fn unavailable_is_retried_and_internal_counts_against_the_breaker() {
    let (echo, addr) = echo_server().await;
    echo.unavailable.store(2, Ordering::SeqCst);
    let gw = gateway(&config(
        &format!("http://{addr}"),
        "[upstreams.policy.circuit_breaker]\nconsecutive_failures = 2",
    ))
    .await;
    let mut grpc = client(gw.addr).await;
    assert_eq!(
        unary(&mut grpc, "/test.Echo/Unary", "again").await.unwrap(),
        "again"
    );
    assert_eq!(
        echo.calls.load(Ordering::SeqCst),
        3,
        "two UNAVAILABLE, then the answer"
    );

    for _ in 0..2 {
        let err = unary(&mut grpc, "/test.Echo/Unary", "broken")
            .await
            .unwrap_err();
        assert_eq!((err.code(), err.message()), (Code::Internal, "it broke"));
    }
    assert_eq!(
        echo.calls.load(Ordering::SeqCst),
        5,
        "INTERNAL is not retried"
    );
    // Two failed calls opened the breaker: the gateway answers, in gRPC's terms.
    let err = unary(&mut grpc, "/test.Echo/Unary", "hello")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "circuit breaker is open");
    assert!(
        err.metadata().get("grpc-retry-pushback-ms").is_some(),
        "{err:?}"
    );
    assert_eq!(echo.calls.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn the_gateways_own_errors_answer_in_grpc_form() {
    let down = tidegate_testkit::refused_url().await;
    let (_, addr) = echo_server().await;
    let gw = gateway(&format!(
        r#"{}
[[upstreams]]
name = "down"
endpoints = ["{}"]
protocol = "http2"
[[routes]]
name = "down"
path_prefix = "/test.Down"
upstream = "down"
[[routes]]
name = "limited"
path_prefix = "/test.Limited"
upstream = "echo"
rate_limit = {{ algorithm = "fixed_window", limit = 1, per = "1m", key = "client_ip" }}
"#,
        config(&format!("http://{addr}"), ""),
        down.trim_end_matches('/')
    ))
    .await;
    let mut grpc = client(gw.addr).await;
    let err = unary(&mut grpc, "/other.Service/Call", "x")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "no route: {err:?}");
    let err = unary(&mut grpc, "/test.Down/Call", "x").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "unreachable: {err:?}");
    assert_eq!(err.message(), "upstream unreachable");
    let first = unary(&mut grpc, "/test.Limited/Call", "x")
        .await
        .unwrap_err();
    assert_eq!(
        first.code(),
        Code::Unimplemented,
        "the upstream's own answer: {first:?}"
    );
    let err = unary(&mut grpc, "/test.Limited/Call", "x")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "rate limited: {err:?}");
}

#[tokio::test]
async fn grpc_timeout_is_the_calls_deadline_and_goes_upstream_reduced() {
    let (echo, addr) = echo_server().await;
    let gw = gateway(&config(&format!("http://{addr}"), "")).await;
    let mut grpc = client(gw.addr).await;
    let mut request = Request::new(msg("timed"));
    request.set_timeout(Duration::from_secs(5));
    assert_eq!(
        unary_request(&mut grpc, "/test.Echo/Unary", request)
            .await
            .unwrap(),
        "timed"
    );
    let sent = echo.timeouts.lock().unwrap()[0]
        .clone()
        .expect("a grpc-timeout upstream");
    let millis: u64 = sent
        .strip_suffix('m')
        .expect("in milliseconds")
        .parse()
        .unwrap();
    assert!(millis <= 5000 && millis > 4000, "{sent}");

    // An upstream that never answers: the gateway ends the call at its
    // deadline. A plain HTTP/2 client, as tonic's would end the call itself.
    let silent = Upstream::start(|_| std::future::pending()).await;
    let gw = gateway(&config(&silent.url(), "")).await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<tidegate_testkit::Body>();
    let request = http::Request::post(format!("http://{}/test.Echo/Unary", gw.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "200m")
        .body(tidegate_testkit::full(
            tidegate_gateway::proxy::grpc::frame(b"\x0a\x04late"),
        ))
        .unwrap();
    let started = tokio::time::Instant::now();
    let response = h2.request(request).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the policy's 10 s timeout ended it"
    );
    assert_eq!(response.status(), 200);
    let headers = response.headers();
    assert_eq!(headers["grpc-status"], "4", "{headers:?}");
    assert_eq!(headers["grpc-message"], "upstream timed out");
    let received = &silent.received()[0];
    let sent = received.headers["grpc-timeout"].to_str().unwrap();
    let millis: u64 = sent.strip_suffix('m').unwrap().parse().unwrap();
    assert!(millis <= 200, "{sent}");
}

#[tokio::test]
async fn grpc_health_checks_follow_the_servers_serving_status() {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("test.Echo", tonic_health::ServingStatus::NotServing)
        .await;
    let addr = serve(health).await;
    let gw = gateway(&config(
        &format!("http://{addr}"),
        "[upstreams.health_check]\nkind = \"grpc\"\nservice = \"test.Echo\"\ninterval = \"50ms\"\n\
         unhealthy_threshold = 1\nhealthy_threshold = 1",
    ))
    .await;
    let mut events = gw.gateway.notices.subscribe();
    let healthy = |event: tidegate_gateway::observe::notices::Notice| match event {
        tidegate_gateway::observe::notices::Notice::Endpoint { healthy, .. } => Some(healthy),
        _ => None,
    };
    let mut next = async || loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("no health change")
            .unwrap();
        if let Some(healthy) = healthy(event) {
            return healthy;
        }
    };
    assert!(!next().await, "NOT_SERVING takes the endpoint out");
    reporter
        .set_service_status("test.Echo", tonic_health::ServingStatus::Serving)
        .await;
    assert!(next().await, "SERVING brings it back");
}
