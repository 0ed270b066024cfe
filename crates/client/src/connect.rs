//! The client's connector: hyper-util's `HttpConnector` dialling the one
//! origin a client serves, minus the connection details it attaches to
//! every response.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::uri::Authority;
use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::error::BoxError;

/// Connects like [`HttpConnector`] (its DNS, connect timeout and
/// `TCP_NODELAY`), with two differences:
///
/// - It dials `origin`, whatever URI it is asked for. A client has a pool
///   of its own for its one upstream, so the authority its requests name
///   to hyper-util only keys that pool. HTTP/1 requests name a one-letter
///   [`POOL_KEY`] there: hyper-util hashes the key byte by byte, twice a
///   call (checkout and return), and a real `host:port` made that 1 000
///   to 3 000 instructions a call. The request line carries only the path
///   and the `Host` header comes from the client's template, so the
///   upstream never sees the placeholder.
/// - The connections it makes carry no `HttpInfo`: hyper-util would copy
///   that into each response's extensions, three allocations a response
///   for addresses this client never shows.
#[derive(Clone)]
pub(crate) struct Connector {
    http: HttpConnector,
    origin: Uri,
}

/// The authority HTTP/1 requests name to hyper-util (see [`Connector`]).
pub(crate) static POOL_KEY: Authority = Authority::from_static("u");

impl Connector {
    /// Dials `authority` (`host:port`) for every connection.
    pub(crate) fn new(http: HttpConnector, authority: &Authority) -> Self {
        let origin = Uri::builder()
            .scheme("http")
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .expect("scheme, authority and root path make a URI");
        Connector { http, origin }
    }
}

type Connecting = Pin<Box<dyn Future<Output = Result<Plain, BoxError>> + Send>>;

impl tower::Service<Uri> for Connector {
    type Response = Plain;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let connecting = self.http.call(self.origin.clone());
        Box::pin(async move { connecting.await.map(Plain).map_err(Into::into) })
    }
}

/// A TCP connection that tells hyper-util nothing but that it is one.
pub(crate) struct Plain(TokioIo<TcpStream>);

impl Connection for Plain {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl Read for Plain {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl Write for Plain {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
