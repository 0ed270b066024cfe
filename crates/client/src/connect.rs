//! The client's connector: hyper-util's `HttpConnector`, minus the
//! connection details it attaches to every response.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::error::BoxError;

/// Connects like [`HttpConnector`] (its DNS, connect timeout and
/// `TCP_NODELAY`), but the connections it makes carry no `HttpInfo`:
/// hyper-util would copy that into each response's extensions, three
/// allocations a response for addresses this client never shows.
#[derive(Clone)]
pub(crate) struct Connector(pub(crate) HttpConnector);

type Connecting = Pin<Box<dyn Future<Output = Result<Plain, BoxError>> + Send>>;

impl tower::Service<Uri> for Connector {
    type Response = Plain;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
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
