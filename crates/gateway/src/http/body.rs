//! Request bodies on their way upstream: small ones kept for a retry, large
//! ones streamed once, all held to the size limit.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::http::fields::{Carrier, Received};

/// The error type of every body the gateway sends.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body the gateway sends: the upstream's answer streamed, one the
/// gateway wrote, or a client's request body on its way upstream.
///
/// An upstream answer's body also carries the answer's fields as they
/// were received ([`Received`]), for the client's HTTP/1.1 connection to
/// write: carried here, beside the bytes they came with, rather than in
/// the response's extensions, which would cost a map and its allocations
/// on every answer.
pub struct ProxyBody {
    inner: BoxBody<Bytes, BoxError>,
    received: Option<Box<Received>>,
}

impl ProxyBody {
    /// `body`, boxed.
    pub fn new<B>(body: B) -> Self
    where
        B: Body<Data = Bytes, Error = BoxError> + Send + Sync + 'static,
    {
        ProxyBody {
            inner: BoxBody::new(body),
            received: None,
        }
    }

    /// This body, carrying `received`.
    pub(crate) fn with_received(mut self, received: Option<Box<Received>>) -> Self {
        self.received = received;
        self
    }

    /// The answer's fields as received, if it carries them.
    pub(crate) fn received(&self) -> Option<&Received> {
        self.received.as_deref()
    }

    /// [`received`](Self::received), to change.
    pub(crate) fn received_mut(&mut self) -> Option<&mut Received> {
        self.received.as_deref_mut()
    }

    /// `wrap` around this body; the fields as received stay with the
    /// outer one.
    pub(crate) fn wrap<B>(mut self, wrap: impl FnOnce(ProxyBody) -> B) -> ProxyBody
    where
        B: Body<Data = Bytes, Error = BoxError> + Send + Sync + 'static,
    {
        let received = self.received.take();
        ProxyBody::new(wrap(self)).with_received(received)
    }
}

impl Carrier for ProxyBody {
    fn take_received(&mut self) -> Option<Box<Received>> {
        self.received.take()
    }
}

impl Default for ProxyBody {
    fn default() -> Self {
        empty()
    }
}

impl fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyBody")
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body the gateway wrote.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    ProxyBody::new(http_body_util::Full::new(bytes.into()).map_err(|never| match never {}))
}

/// An empty body.
pub fn empty() -> ProxyBody {
    ProxyBody::new(http_body_util::Empty::new().map_err(|never| match never {}))
}

/// A client's request body, as the connection that reads it gives it.
#[derive(Debug)]
pub enum ClientBody {
    /// None: no length, or a length of 0.
    Empty,
    /// An HTTP/1 request's, read from its connection when polled.
    H1(crate::http::h1::Body),
    /// An HTTP/2 request's, from hyper.
    H2(Incoming),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::H1(body) => Pin::new(body).poll_frame(cx),
            ClientBody::H2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::H1(body) => body.is_end_stream(),
            ClientBody::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::H1(body) => body.size_hint(),
            ClientBody::H2(body) => body.size_hint(),
        }
    }
}

/// The client sent more than the route allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTooLarge;

impl fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("request body too large")
    }
}

impl std::error::Error for BodyTooLarge {}

/// A request body read as far as the replay cap.
#[derive(Debug)]
pub enum RequestBody {
    /// The whole body, kept: every attempt sends a copy.
    Replayable {
        /// All data.
        data: Bytes,
        /// Trailers, if the client sent any.
        trailers: Option<HeaderMap>,
    },
    /// Larger than the cap: what was read, then the rest, sent once
    /// (`None` once an attempt has taken it).
    Streaming(Option<Streaming>),
}

impl RequestBody {
    /// Reads `body` until it ends or passes `replay_cap` bytes; more than
    /// `max` bytes in all is [`BodyTooLarge`], now or while streaming.
    /// Unless `wait`, it reads only what has arrived: a body still coming
    /// is streamed from there. A streaming call (gRPC's client and
    /// bidirectional streams) may send its next message only once it has
    /// an answer, which waiting for its end would never let come.
    pub async fn read(
        mut body: ClientBody,
        replay_cap: usize,
        max: u64,
        wait: bool,
    ) -> Result<Self, BoxError> {
        use futures_util::FutureExt;
        let mut seen = 0u64;
        let mut trailers = None;
        let mut chunks = VecDeque::new();
        loop {
            // Trailers end a body: their end is waited for in any case.
            let frame = if wait || trailers.is_some() {
                body.frame().await
            } else {
                match body.frame().now_or_never() {
                    Some(frame) => frame,
                    None => {
                        return Ok(RequestBody::Streaming(Some(Streaming {
                            seen,
                            read: chunks,
                            rest: Some(body),
                            max,
                        })))
                    }
                }
            };
            let Some(frame) = frame else { break };
            match frame?.into_data() {
                Ok(bytes) => {
                    seen += bytes.len() as u64;
                    if seen > max {
                        return Err(BodyTooLarge.into());
                    }
                    chunks.push_back(bytes);
                    if seen > replay_cap as u64 {
                        return Ok(RequestBody::Streaming(Some(Streaming {
                            seen,
                            read: chunks,
                            rest: Some(body),
                            max,
                        })));
                    }
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        // One chunk is kept as it is; several are joined once.
        let data = match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.pop_front().unwrap_or_default(),
            _ => chunks
                .iter()
                .fold(BytesMut::new(), |mut all, c| {
                    all.extend_from_slice(c);
                    all
                })
                .freeze(),
        };
        Ok(RequestBody::Replayable { data, trailers })
    }

    /// An empty body (requests that declare none).
    pub fn empty() -> Self {
        RequestBody::Replayable {
            data: Bytes::new(),
            trailers: None,
        }
    }

    /// Whether a second attempt can send the body again.
    pub fn is_replayable(&self) -> bool {
        matches!(self, RequestBody::Replayable { .. })
    }

    /// The body for the next attempt: a copy when replayable, else the
    /// stream itself the first time and `None` after.
    pub fn take(&mut self) -> Option<ProxyBody> {
        match self {
            RequestBody::Replayable { data, trailers } => Some(ProxyBody::new(Replay {
                data: Some(data.clone()).filter(|d| !d.is_empty()),
                trailers: trailers.clone(),
            })),
            RequestBody::Streaming(stream) => stream.take().map(ProxyBody::new),
        }
    }
}

/// A kept body, sent once more.
#[derive(Debug)]
struct Replay {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// What was read already, then the rest of the client's body, counted.
#[derive(Debug)]
pub struct Streaming {
    seen: u64,
    read: VecDeque<Bytes>,
    rest: Option<ClientBody>,
    max: u64,
}

impl Body for Streaming {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.read.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        let Some(rest) = self.rest.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(rest).poll_frame(cx));
        Poll::Ready(match frame {
            None => {
                self.rest = None;
                None
            }
            Some(Err(e)) => Some(Err(e)),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.seen += data.len() as u64;
                    if self.seen > self.max {
                        self.rest = None;
                        return Poll::Ready(Some(Err(BodyTooLarge.into())));
                    }
                }
                Some(Ok(frame))
            }
        })
    }
}

/// Whether `err` or anything it wraps is [`BodyTooLarge`].
pub fn is_body_too_large(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if e.is::<BodyTooLarge>() {
            return true;
        }
        current = e.source();
    }
    false
}
