//! A client connection before and around its protocol: which protocol it
//! speaks, told from its first bytes; the send timeout on its writes; and
//! the socket hyper serves HTTP/2 on, which gives back those first bytes
//! before reading on.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// HTTP/2's connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a client connection speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x (or nothing valid: the HTTP/1 parser answers it).
    Http1,
    /// HTTP/2 with prior knowledge (h2c), or by ALPN.
    Http2,
}

/// Reads into `read` until the connection's protocol is clear: HTTP/2
/// when it opens with the preface, HTTP/1 as soon as it cannot (or when
/// the client closes). What it reads stays in `read`.
pub async fn sniff<T: AsyncRead + Unpin>(io: &mut T, read: &mut BytesMut) -> io::Result<Protocol> {
    loop {
        let seen = &read[..read.len().min(PREFACE.len())];
        if seen != &PREFACE[..seen.len()] {
            return Ok(Protocol::Http1);
        }
        if seen.len() == PREFACE.len() {
            return Ok(Protocol::Http2);
        }
        read.reserve(4096);
        if io.read_buf(read).await? == 0 {
            return Ok(Protocol::Http1);
        }
    }
}

/// The send timeout of one connection: a write that makes no progress for
/// `gateway.send_timeout` (the client reads nothing) fails.
#[derive(Debug)]
pub struct Stall {
    timeout: Duration,
    /// Created on the first write that waits, re-armed for the next.
    sleep: Option<Pin<Box<Sleep>>>,
    stalled: bool,
}

impl Stall {
    /// No write waiting yet.
    pub fn new(timeout: Duration) -> Self {
        Stall {
            timeout,
            sleep: None,
            stalled: false,
        }
    }

    /// Passes a write's result on, failing one that has waited past the
    /// send timeout.
    pub fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if poll.is_ready() {
            self.stalled = false;
            return poll;
        }
        let deadline = Instant::now() + self.timeout;
        let sleep = match &mut self.sleep {
            Some(sleep) => {
                if !self.stalled {
                    sleep.as_mut().reset(deadline);
                }
                sleep
            }
            None => self
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.stalled = true;
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing within gateway.send_timeout",
            )));
        }
        Poll::Pending
    }
}

/// A socket of any kind (plain or TLS), for what outlives the connection
/// that served it (a tunnel).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl fmt::Debug for dyn Io {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Io")
    }
}

/// A connection whose first bytes were read already (to tell its
/// protocol): reads give them back first. Its writes keep the send
/// timeout.
#[derive(Debug)]
pub struct Primed<T> {
    io: T,
    read: BytesMut,
    stall: Stall,
}

impl<T> Primed<T> {
    /// `io`, of which `read` was read; writes fail after `send_timeout`
    /// without progress.
    pub fn new(io: T, read: BytesMut, send_timeout: Duration) -> Self {
        Primed {
            io,
            read,
            stall: Stall::new(send_timeout),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Primed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read[..n]);
            this.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Primed<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.stall.watch(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.stall.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_flush(cx);
        this.stall.watch(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_shutdown(cx);
        this.stall.watch(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn tells_the_protocol_from_the_first_bytes_and_keeps_them() {
        for (sent, expected) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], Protocol::Http1),
            (PREFACE, Protocol::Http2),
            (b"PRI * HTTP/1.1\r\n", Protocol::Http1),
            (b"", Protocol::Http1),
        ] {
            let (mut client, mut server) = tokio::io::duplex(1024);
            // The preface a byte at a time: the answer waits for enough of it.
            for byte in sent {
                client.write_all(&[*byte]).await.unwrap();
            }
            drop(client);
            let mut read = BytesMut::new();
            let protocol = sniff(&mut server, &mut read).await.unwrap();
            assert_eq!(protocol, expected, "{sent:?}");
            let mut primed = Primed::new(server, read, Duration::from_secs(1));
            let mut all = Vec::new();
            primed.read_to_end(&mut all).await.unwrap();
            assert_eq!(all, sent, "every byte is read again");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_waits_past_the_send_timeout_fails() {
        let (client, server) = tokio::io::duplex(16);
        let mut primed = Primed::new(server, BytesMut::new(), Duration::from_secs(3));
        let started = Instant::now();
        let e = primed.write_all(&[0u8; 64]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        drop(client);
    }
}
