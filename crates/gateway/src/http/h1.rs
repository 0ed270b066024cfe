//! HTTP/1.1 served in the task of the client's connection.
//!
//! hyper's server reads a request into a channel that the service reads
//! its body from, and writes the answer from its own dispatcher's buffers;
//! a guard in front of it had to scan every byte again to refuse what
//! hyper forgives. Here the connection's task reads the head with
//! httparse (as hyper does), hands the gateway a request whose body reads
//! the socket when polled, and writes the answer from one buffer, all in
//! one task: no channel, no second scan.
//!
//! What is refused, before anything reaches the gateway, with the
//! connection closed after the answer:
//! - 400: a head httparse refuses (a space before a colon, a control byte
//!   in a value or the target, obsolete line folding, a bad method or
//!   version…); a line ending in a bare LF (which some servers read as a
//!   line end and others not); `Transfer-Encoding` beside
//!   `Content-Length`, on HTTP/1.0, naming `chunked` twice or not last; a
//!   `Content-Length` that is not one decimal number, or differs between
//!   fields;
//! - 431: a head past `gateway.max_header_bytes` (8 KiB at least) or of
//!   more than 100 fields; 414: a target past 64 KiB;
//! - 408: a head not complete within `gateway.header_read_timeout` (timed
//!   from when the connection waits for it: idle keep-alive connections
//!   close then, silently).
//!
//! A chunked body is decoded strictly (CRLF line ends, hex sizes without
//! sign or prefix, bounded extensions and trailers): a body that breaks
//! the framing fails its request, and the connection closes after the
//! answer, so that nothing after it is read as a request.
//!
//! Answers are framed by `content-length` (declared, or known from the
//! body), chunked for HTTP/1.1 clients (trailers only to one that sent
//! `TE: trailers`, and only the fields `Trailer` names), or by closing the
//! connection for HTTP/1.0 ones; HEAD, 1xx, 204 and 304 answers have no
//! body. Keep-alive follows HTTP/1.1's default and `Connection`; pipelined
//! requests are answered in order. `Expect: 100-continue` is answered when
//! the body is first read (never, when the answer comes first). A client
//! that closes its connection while its request is under way cancels it.
//! A `101 Switching Protocols` hands the socket, and what was read past
//! the head, to [`OnUpgrade`].

use std::fmt;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::http::body::{BoxError, ClientBody, ProxyBody};
use crate::http::codec::{
    decimal, field, has_token, note_spans, poll_fill, tokens, trailer_names, Chunked, Decoder,
    Framing, Length, Span, Step, WriteError, Writer, MAX_HEADERS, READ_SIZE,
};
use crate::http::conn::{Io, Primed, Stall};
use crate::http::fields::{self, Arrived, ClientRequest, Kept};
use crate::observe::watch::until_stopped;
use crate::proxy::deadline::{Alarm, Deadlines};

/// The longest request target (hyper's limit): longer is 414.
const MAX_TARGET: usize = u16::MAX as usize - 1;

/// Body bytes left unread by a request's answer that are read and dropped
/// to keep the connection, at most; a longer rest closes it.
const MAX_DRAIN: usize = 64 * 1024;

/// A connection's limits and timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request head's bytes at most.
    pub max_head: usize,
    /// `gateway.header_read_timeout`.
    pub header_read: Duration,
    /// `gateway.send_timeout`.
    pub send: Duration,
}

/// What answers a connection's requests.
pub trait Service {
    /// The answer to `request`.
    /// The request comes boxed: it is moved through several layers,
    /// each of which would otherwise copy it whole. One request at a
    /// time: a service may keep what its requests share (the table it
    /// serves them from) without a lock.
    fn call(
        &mut self,
        request: Box<ClientRequest>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + '_;
}

/// One client connection speaking HTTP/1.x, and what serves it.
#[derive(Debug)]
pub struct Connection<S> {
    /// Answers its requests.
    pub service: S,
    /// The client's address (for the debug log).
    pub peer: SocketAddr,
    /// Its verified client certificate's identity, set on each request (a
    /// client's own copy of that header never passes).
    pub identity: Option<HeaderValue>,
    /// Flips to `true` when the gateway stops: the request under way is
    /// answered, and the connection closes.
    pub stop: watch::Receiver<bool>,
    /// Its limits.
    pub limits: Limits,
    /// The worker's timer for header read timeouts.
    pub deadlines: Deadlines,
}

impl<S: Service> Connection<S> {
    /// Serves `io`, whose first bytes are `read`, until the client or the
    /// gateway closes it.
    pub async fn serve<I>(self, io: I, read: BytesMut)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            service,
            peer,
            identity,
            mut stop,
            limits,
            deadlines,
        } = self;
        let served = Served {
            peer,
            identity,
            limits,
            deadlines,
            stopping: AtomicBool::new(false),
            idle: AtomicBool::new(false),
        };
        // The stop is watched once for the connection, not per request,
        // and polled only when the watch has woken it, not at every
        // wake-up of the connection.
        let serving = served.run(io, read, service);
        tokio::pin!(serving);
        tokio::select! {
            // The stop first: an answer finished in the same poll closes
            // the connection.
            biased;
            () = WhenWoken::new(until_stopped(&mut stop)) => {
                served.stopping.store(true, Ordering::Relaxed);
                // An idle connection closes now; a busy one after its answer.
                if !served.idle.load(Ordering::Relaxed) {
                    serving.await;
                }
            }
            () = &mut serving => {}
        }
    }
}

/// A future polled only once it has been woken (and at first): polled
/// beside another in one task, it costs nothing at the other's wake-ups
/// (no atomic write: the task's waker is registered again only when it
/// changes, and the flag is read before it is cleared).
struct WhenWoken<F> {
    inner: Pin<Box<F>>,
    woken: Arc<Woken>,
    /// Wakes `woken`, and through it the task.
    waker: Waker,
    /// The task's waker last registered in `woken`.
    registered: Option<Waker>,
}

/// Whether a [`WhenWoken`] future was woken, and the task to wake then.
#[derive(Default)]
struct Woken {
    flag: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.flag.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> WhenWoken<F> {
    fn new(inner: F) -> Self {
        let woken = Arc::new(Woken {
            flag: AtomicBool::new(true),
            task: Default::default(),
        });
        WhenWoken {
            inner: Box::pin(inner),
            waker: Waker::from(woken.clone()),
            woken,
            registered: None,
        }
    }
}

impl<F: Future> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let current = this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        // A wake sets the flag before it takes the waker, and only this
        // clears it: unset, the waker registered is still there.
        if current && !this.woken.flag.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        this.woken.task.register(cx.waker());
        if !current {
            this.registered = Some(cx.waker().clone());
        }
        if !this.woken.flag.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        // That wake may take the waker just registered (it sets the flag
        // first): it is registered again at the next poll.
        this.registered = None;
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

/// A connection being served.
struct Served {
    peer: SocketAddr,
    identity: Option<HeaderValue>,
    limits: Limits,
    deadlines: Deadlines,
    /// The gateway stops: the answer under way closes the connection.
    stopping: AtomicBool,
    /// Waiting for a request, nothing of it read.
    idle: AtomicBool,
}

impl Served {
    async fn run<I, S: Service>(&self, io: I, read: BytesMut, mut service: S)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut link = Held::Own(Link {
            io,
            read,
            read_size: READ_SIZE,
            generation: 0,
            inbound: Inbound::Done,
            continue_at: None,
            eof: false,
        });
        let mut out = Vec::with_capacity(1024);
        let mut spans = Vec::new();
        let mut stall = Stall::new(self.limits.send);
        // The head's cut-off: one registration for the connection.
        let mut alarm = self.deadlines.alarm();
        loop {
            link.reclaim();
            let head = match self.next_head(&mut link, &mut spans, &mut alarm).await {
                Ok(Some(head)) => head,
                Ok(None) => break,
                Err(refusal) => {
                    tracing::debug!(peer = %self.peer, status = refusal.status.as_u16(), reason = refusal.why, "refused a request head");
                    let _ = refuse(&mut link, refusal.status, &mut out, &mut stall).await;
                    break;
                }
            };
            match self
                .exchange(&mut service, &mut link, head, &mut out, &mut stall)
                .await
            {
                Next::KeepAlive => {}
                Next::Close => break,
                Next::Upgrade(to) => {
                    link.reclaim();
                    match link {
                        Held::Own(link) => {
                            let io: Box<dyn Io> = Box::new(link.io);
                            let _ = to.send(Primed::new(io, link.read, self.limits.send));
                        }
                        Held::Shared(_) | Held::Moving => tracing::debug!(
                            peer = %self.peer,
                            "an upgraded request's body is still held: closing instead"
                        ),
                    }
                    return;
                }
            }
        }
        let mut sink = Sink {
            link: &mut link,
            stall: &mut stall,
        };
        let _ = std::future::poll_fn(|cx| Pin::new(&mut sink).poll_shutdown(cx)).await;
    }

    /// The next request head: `None` when the connection ends first (the
    /// client closed it, it stayed idle past the header read timeout, or
    /// the gateway stops).
    async fn next_head<I>(
        &self,
        link: &mut Held<I>,
        spans: &mut Vec<Span>,
        alarm: &mut Alarm,
    ) -> Result<Option<Head>, Refusal>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let max_head = self.limits.max_head;
        if self.stopping.load(Ordering::Relaxed) {
            // A pipelined or prompt head is still answered; none is waited for.
            let mut cx = Context::from_waker(Waker::noop());
            return match link.with(|link| link.poll_head(&mut cx, spans, max_head)) {
                Poll::Ready(head) => head,
                Poll::Pending => Ok(None),
            };
        }
        let at = Instant::now() + self.limits.header_read;
        // A pipelined or prompt head is there at the first poll, and then
        // no alarm is armed for it (`within` arms it only to wait).
        let head = alarm
            .within(
                at,
                std::future::poll_fn(|cx| {
                    link.with(|link| {
                        let head = link.poll_head(cx, spans, max_head);
                        if head.is_pending() {
                            // Nothing of a request read yet: a stop closes it.
                            self.idle.store(link.read.is_empty(), Ordering::Relaxed);
                        }
                        head
                    })
                }),
            )
            .await;
        self.idle.store(false, Ordering::Relaxed);
        match head {
            Ok(head) => head,
            Err(_) if link.with(|link| link.read.is_empty()) => Ok(None),
            Err(_) => Err(Refusal {
                status: StatusCode::REQUEST_TIMEOUT,
                why: "the head did not arrive within gateway.header_read_timeout",
            }),
        }
    }

    /// Answers one request; says what becomes of the connection.
    async fn exchange<I, S: Service>(
        &self,
        service: &mut S,
        link: &mut Held<I>,
        head: Head,
        out: &mut Vec<u8>,
        stall: &mut Stall,
    ) -> Next
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Head {
            mut request,
            body,
            keep_alive,
            expect_continue,
            upgrade,
            trailers,
        } = head;
        let asked = Asked {
            version: request.request.version(),
            head: request.request.method() == Method::HEAD,
            trailers,
        };
        *request.request.body_mut() = match body {
            None => ClientBody::Empty,
            Some(decoder) => {
                let left = match &decoder {
                    Decoder::Length(n) => Some(*n),
                    _ => None,
                };
                let shared = link.share();
                let generation = {
                    let mut link = lock(&shared);
                    link.inbound = Inbound::Reading(decoder);
                    link.continue_at =
                        (expect_continue && asked.version == Version::HTTP_11).then_some(0);
                    link.generation
                };
                let source: Arc<dyn Source> = shared;
                ClientBody::H1(Body {
                    source,
                    generation,
                    left,
                    ended: false,
                })
            }
        };
        // (A client's own copy was dropped with its head.)
        if let Some(identity) = &self.identity {
            let headers = request.request.headers_mut();
            headers.insert(&crate::http::tls::CLIENT_IDENTITY, identity.clone());
        }
        let upgrade = upgrade.then(|| {
            let (to, on) = oneshot::channel();
            request
                .request
                .extensions_mut()
                .insert(OnUpgrade(Arc::new(Mutex::new(Some(on)))));
            to
        });
        let max_head = self.limits.max_head;
        let handling = service.call(request);
        tokio::pin!(handling);
        let answered = std::future::poll_fn(|cx| {
            if let Poll::Ready(response) = handling.as_mut().poll(cx) {
                return Poll::Ready(Some(response));
            }
            // A client that leaves cancels its request.
            if link.with(|link| link.poll_gone(cx, max_head)) {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        let Some(response) = answered else {
            tracing::debug!(peer = %self.peer, "the client closed its connection before the answer");
            return Next::Close;
        };
        let mut keep_alive = keep_alive && !self.stopping.load(Ordering::Relaxed);
        let (parts, body) = response.into_parts();
        let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        let mut writer = match encode(out, &parts, &body, asked, &mut keep_alive) {
            Some(framing) => Writer::new(std::mem::take(out), Some(body), framing),
            None => Writer::new(std::mem::take(out), None, Framing::Length(0)),
        };
        let mut sink = Sink {
            link: &mut *link,
            stall,
        };
        let written = std::future::poll_fn(|cx| {
            if writer.poll(&mut sink, cx)?.is_pending() {
                // A client that leaves ends a streamed answer.
                if sink.link.with(|link| link.poll_gone(cx, max_head)) {
                    return Poll::Ready(Err(WriteError::Io(io::ErrorKind::BrokenPipe.into())));
                }
                return Poll::Pending;
            }
            Pin::new(&mut sink).poll_flush(cx).map_err(WriteError::Io)
        })
        .await;
        *out = writer.into_buffer();
        if let Err(e) = written {
            tracing::debug!(peer = %self.peer, error = ?e, "the answer could not be written");
            return Next::Close;
        }
        match upgrade {
            Some(to) if switching => return Next::Upgrade(to),
            _ if switching => return Next::Close,
            _ => {}
        }
        if keep_alive && link.with(Link::drain) {
            Next::KeepAlive
        } else {
            Next::Close
        }
    }
}

/// What becomes of a connection after an answer.
enum Next {
    KeepAlive,
    Close,
    /// Switched protocols: the socket goes to the request's [`OnUpgrade`].
    Upgrade(oneshot::Sender<Upgraded>),
}

/// Writes a refusal (no body) and flushes it.
async fn refuse<I>(
    link: &mut Held<I>,
    status: StatusCode,
    out: &mut Vec<u8>,
    stall: &mut Stall,
) -> Result<(), WriteError>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    out.clear();
    status_line(out, status);
    out.extend_from_slice(b"content-length: 0\r\nconnection: close\r\n");
    date(out);
    out.extend_from_slice(b"\r\n");
    let mut writer = Writer::new(std::mem::take(out), None, Framing::Length(0));
    let mut sink = Sink { link, stall };
    std::future::poll_fn(|cx| {
        ready!(writer.poll(&mut sink, cx))?;
        Pin::new(&mut sink).poll_flush(cx).map_err(WriteError::Io)
    })
    .await
}

/// The socket and what was read of it, shared by the connection and the
/// body of the request it reads.
struct Link<I> {
    io: I,
    read: BytesMut,
    read_size: usize,
    /// The request whose body `inbound` is: a body of an earlier request
    /// finds the connection moved on.
    generation: u64,
    inbound: Inbound,
    /// `100 Continue` owed to the client before its body: what of it was
    /// written.
    continue_at: Option<usize>,
    /// The client closed its side.
    eof: bool,
}

/// Where the current request's body is.
#[derive(Debug)]
enum Inbound {
    /// Read to its end (or none).
    Done,
    Reading(Decoder),
    /// It broke its framing, or the connection failed: nothing more is read.
    Failed,
}

fn lock<I>(link: &Mutex<Link<I>>) -> MutexGuard<'_, Link<I>> {
    link.lock().unwrap_or_else(|e| e.into_inner())
}

/// The connection's [`Link`]: its own while no request body is out, and
/// shared with the body (behind a lock) while one is. A request without a
/// body (most) takes no lock.
enum Held<I> {
    Own(Link<I>),
    Shared(Arc<Mutex<Link<I>>>),
    /// Only within [`Held::share`].
    Moving,
}

impl<I> Held<I> {
    fn with<R>(&mut self, f: impl FnOnce(&mut Link<I>) -> R) -> R {
        match self {
            Held::Own(link) => f(link),
            Held::Shared(shared) => with_shared(shared, f),
            Held::Moving => unreachable!("a link is moved only within share"),
        }
    }

    /// The link, shared for a request's body.
    fn share(&mut self) -> Arc<Mutex<Link<I>>> {
        if let Held::Shared(shared) = self {
            return shared.clone();
        }
        let Held::Own(link) = std::mem::replace(self, Held::Moving) else {
            unreachable!("a link is moved only within share");
        };
        let shared = Arc::new(Mutex::new(link));
        *self = Held::Shared(shared.clone());
        shared
    }

    /// Takes the link back once no body holds it.
    fn reclaim(&mut self) {
        let Held::Shared(shared) = self else {
            return;
        };
        if Arc::strong_count(shared) > 1 {
            return;
        }
        let Held::Shared(shared) = std::mem::replace(self, Held::Moving) else {
            unreachable!("matched above");
        };
        *self = match Arc::try_unwrap(shared) {
            Ok(link) => Held::Own(link.into_inner().unwrap_or_else(|e| e.into_inner())),
            Err(shared) => Held::Shared(shared),
        };
    }
}

/// [`Held::with`] on a shared link, out of line: otherwise each use
/// inlines its closure twice, and the copy for a body that is out (rare)
/// would sit among the lines every request runs.
#[inline(never)]
fn with_shared<I, R>(shared: &Mutex<Link<I>>, f: impl FnOnce(&mut Link<I>) -> R) -> R {
    f(&mut lock(shared))
}

impl<I: AsyncRead + AsyncWrite + Unpin> Link<I> {
    /// Reads until a whole head is in, and parses it; `None` at the end
    /// of the connection.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        spans: &mut Vec<Span>,
        max_head: usize,
    ) -> Poll<Result<Option<Head>, Refusal>> {
        loop {
            if !self.read.is_empty() {
                if let Some(head) = parse_head(&mut self.read, spans, max_head)? {
                    return Poll::Ready(Ok(Some(head)));
                }
            }
            if self.eof {
                return Poll::Ready(Ok(None));
            }
            let mut size = READ_SIZE;
            match ready!(poll_fill(&mut self.io, &mut self.read, &mut size, cx)) {
                Ok(0) | Err(_) => self.eof = true,
                Ok(_) => {}
            }
        }
    }

    /// Whether the client closed the connection while its request is
    /// under way (once its body is read, so that it is the connection's
    /// end that is read, or the next request, which is kept).
    fn poll_gone(&mut self, cx: &mut Context<'_>, max_head: usize) -> bool {
        if !matches!(self.inbound, Inbound::Done) || self.eof || !self.read.is_empty() {
            return false;
        }
        let mut size = READ_SIZE.min(max_head);
        match poll_fill(&mut self.io, &mut self.read, &mut size, cx) {
            Poll::Ready(Ok(0) | Err(_)) => {
                self.eof = true;
                true
            }
            Poll::Ready(Ok(_)) | Poll::Pending => false,
        }
    }

    /// Reads and drops what is left of the request's body, if it is there
    /// already and short; whether the connection can go on.
    fn drain(&mut self) -> bool {
        self.continue_at = None;
        let mut cx = Context::from_waker(Waker::noop());
        let mut dropped = 0;
        loop {
            match self.poll_body(&mut cx) {
                Poll::Ready(None) => {
                    // A body of this request polled from now on finds nothing.
                    self.generation += 1;
                    return !self.eof || !self.read.is_empty();
                }
                Poll::Ready(Some(Ok(frame))) => {
                    dropped += frame.data_ref().map_or(0, Bytes::len);
                    if dropped > MAX_DRAIN {
                        return false;
                    }
                }
                Poll::Ready(Some(Err(_))) | Poll::Pending => return false,
            }
        }
    }

    /// The next frame of the request's body.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(at) = self.continue_at {
            ready!(self.poll_continue(cx, at))?;
        }
        loop {
            let decoder = match &mut self.inbound {
                Inbound::Done => return Poll::Ready(None),
                Inbound::Failed => return Poll::Ready(Some(Err(BodyError::Failed.into()))),
                Inbound::Reading(decoder) => decoder,
            };
            match decoder.decode(&mut self.read) {
                Ok(Step::More) => {}
                Ok(Step::Data(data)) => {
                    if decoder.is_done() {
                        self.inbound = Inbound::Done;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::Trailers(trailers)) => {
                    self.inbound = Inbound::Done;
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Ok(Step::End) => {
                    self.inbound = Inbound::Done;
                    return Poll::Ready(None);
                }
                Err(invalid) => {
                    self.inbound = Inbound::Failed;
                    return Poll::Ready(Some(Err(BodyError::Invalid(invalid.0).into())));
                }
            }
            match ready!(poll_fill(
                &mut self.io,
                &mut self.read,
                &mut self.read_size,
                cx
            )) {
                Ok(0) => {
                    self.eof = true;
                    self.inbound = Inbound::Failed;
                    return Poll::Ready(Some(Err(BodyError::Closed.into())));
                }
                Ok(_) => {}
                Err(e) => {
                    self.eof = true;
                    self.inbound = Inbound::Failed;
                    return Poll::Ready(Some(Err(BodyError::Io(e).into())));
                }
            }
        }
    }

    /// Writes the `100 Continue` owed, from byte `at`.
    fn poll_continue(&mut self, cx: &mut Context<'_>, mut at: usize) -> Poll<Result<(), BoxError>> {
        const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
        while at < CONTINUE.len() {
            match Pin::new(&mut self.io).poll_write(cx, &CONTINUE[at..]) {
                Poll::Ready(Ok(n)) if n > 0 => at += n,
                Poll::Ready(Ok(_)) => return self.continue_failed(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Err(e)) => return self.continue_failed(e),
                Poll::Pending => {
                    self.continue_at = Some(at);
                    return Poll::Pending;
                }
            }
        }
        self.continue_at = None;
        // Over TLS, what was written may wait in its buffer; a flush that
        // cannot finish now is finished by the answer's.
        let _ = Pin::new(&mut self.io).poll_flush(cx);
        Poll::Ready(Ok(()))
    }

    fn continue_failed(&mut self, e: io::Error) -> Poll<Result<(), BoxError>> {
        self.continue_at = None;
        self.inbound = Inbound::Failed;
        Poll::Ready(Err(BodyError::Io(e).into()))
    }
}

/// The body of a request being read, as the request's body sees it.
trait Source: Send + Sync {
    /// The next frame of the body of request `generation`.
    fn poll_frame(
        &self,
        generation: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>;
}

impl<I: AsyncRead + AsyncWrite + Unpin + Send> Source for Mutex<Link<I>> {
    fn poll_frame(
        &self,
        generation: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut link = lock(self);
        if link.generation != generation {
            return Poll::Ready(Some(Err(BodyError::Failed.into())));
        }
        link.poll_body(cx)
    }
}

/// A request's body, read from the client's connection when polled.
pub struct Body {
    source: Arc<dyn Source>,
    generation: u64,
    /// Bytes still to come, when its length was declared.
    left: Option<u64>,
    ended: bool,
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Body")
            .field("left", &self.left)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let frame = ready!(self.source.poll_frame(self.generation, cx));
        match &frame {
            Some(Ok(frame)) => {
                if let (Some(left), Some(data)) = (&mut self.left, frame.data_ref()) {
                    *left = left.saturating_sub(data.len() as u64);
                    self.ended = *left == 0;
                } else if frame.is_trailers() {
                    self.ended = true;
                }
            }
            None | Some(Err(_)) => self.ended = true,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        match (self.ended, self.left) {
            (true, _) => SizeHint::with_exact(0),
            (false, Some(left)) => SizeHint::with_exact(left),
            (false, None) => SizeHint::default(),
        }
    }
}

/// Why a request's body could not be read.
#[derive(Debug)]
pub enum BodyError {
    /// The client closed the connection before the body ended.
    Closed,
    /// The body breaks its framing.
    Invalid(&'static str),
    /// The connection failed.
    Io(io::Error),
    /// The body failed before, or its request is over.
    Failed,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::Closed => {
                f.write_str("the client closed its connection before its request body ended")
            }
            BodyError::Invalid(why) => write!(f, "invalid request body: {why}"),
            BodyError::Io(e) => write!(f, "reading the request body failed: {e}"),
            BodyError::Failed => f.write_str("the request body can no longer be read"),
        }
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BodyError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Writes to the connection's socket, with the send timeout.
struct Sink<'a, I> {
    link: &'a mut Held<I>,
    stall: &'a mut Stall,
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Sink<'_, I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = this
            .link
            .with(|link| Pin::new(&mut link.io).poll_write(cx, buf));
        this.stall.watch(cx, poll)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = this.link.with(|link| Pin::new(&mut link.io).poll_flush(cx));
        this.stall.watch(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = this
            .link
            .with(|link| Pin::new(&mut link.io).poll_shutdown(cx));
        this.stall.watch(cx, poll)
    }
}

/// The client's side of a connection that switched protocols: the socket,
/// what the client sent past the request's head reading first, and the
/// connection's send timeout still on its writes.
pub type Upgraded = Primed<Box<dyn Io>>;

/// In an upgrade request's extensions: gives the client's socket once a
/// `101 Switching Protocols` has been written to it. (Clones share it;
/// one of them gets it.)
#[derive(Debug, Clone)]
pub struct OnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl OnUpgrade {
    /// The client's socket, once the connection has switched protocols.
    pub async fn upgraded(self) -> io::Result<Upgraded> {
        let switched = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        match switched {
            Some(switched) => switched.await.map_err(|_| {
                io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the connection did not switch protocols",
                )
            }),
            None => Err(io::Error::other("the upgrade was taken already")),
        }
    }
}

/// A request head refused: the answer, and why (for the debug log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Refusal {
    status: StatusCode,
    why: &'static str,
}

impl Refusal {
    #[cold] // a refusal: its callers' branches are laid out of the way
    fn bad(why: &'static str) -> Self {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            why,
        }
    }

    #[cold]
    fn too_large(why: &'static str) -> Self {
        Refusal {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            why,
        }
    }
}

/// A request head, parsed, and what it says of its body and connection.
#[derive(Debug)]
struct Head {
    /// Boxed: the head is handed up through the read, its cut-off and the
    /// connection's loop, and the request on through the gateway.
    request: Box<ClientRequest>,
    /// How its body is read; `None`: it has none.
    body: Option<Decoder>,
    keep_alive: bool,
    expect_continue: bool,
    /// It asks to switch protocols (HTTP/1.1 with `Upgrade`).
    upgrade: bool,
    /// It accepts trailers (`TE: trailers`).
    trailers: bool,
}

/// Parses the request head at the start of `read`, and takes it off if
/// whole; `None` while it is not.
fn parse_head(
    read: &mut BytesMut,
    spans: &mut Vec<Span>,
    max_head: usize,
) -> Result<Option<Head>, Refusal> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_request_with_uninit_headers(&mut parsed, read, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if read.len() >= max_head => {
            return Err(Refusal::too_large("the head is too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::too_large("too many header fields"))
        }
        Err(_) => return Err(Refusal::bad("malformed head")),
    };
    if len > max_head {
        return Err(Refusal::too_large("the head is too large"));
    }
    let base = read.as_ptr() as usize;
    // (A head is at most `max_head` bytes, far below 4 GiB.)
    let offset = |at: *const u8| (at as usize - base) as u32;
    let method_at = offset(parsed.method.unwrap_or_default().as_ptr()) as usize;
    let target = parsed.path.unwrap_or_default();
    let target_at = offset(target.as_ptr()) as usize;
    let target_end = target_at + target.len();
    if target.len() > MAX_TARGET {
        return Err(Refusal {
            status: StatusCode::URI_TOO_LONG,
            why: "the target is too long",
        });
    }
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
        .map_err(|_| Refusal::bad("invalid method"))?;
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    note_spans(read.as_ptr(), parsed.headers, spans);
    // httparse takes a bare LF for a line end; some servers do not.
    let head = &read[..len];
    let crlf = |from: usize| {
        head[from..]
            .iter()
            .position(|&b| b == b'\n')
            .is_some_and(|at| at > 0 && head[from + at - 1] == b'\r')
    };
    if !crlf(method_at.max(target_end))
        || !spans.iter().all(|span| crlf(span[3] as usize))
        || head[..len - 1].last() != Some(&b'\r')
    {
        return Err(Refusal::bad("a line of the head ends in a bare LF"));
    }
    let head = read.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target_at..target_end))
        .map_err(|_| Refusal::bad("invalid target"))?;
    let mut keep_alive = version == Version::HTTP_11;
    let mut close = false;
    let mut length: Option<u64> = None;
    let mut chunked: Option<bool> = None;
    let mut chunked_named = 0;
    let mut expect_continue = false;
    let mut upgrade = false;
    let mut trailers = false;
    // The fields are kept as they came until one needs a map: then those
    // kept move into one, and it takes the rest.
    let mut arrived =
        (spans.len() <= fields::MAX_FIELDS && head.len() <= Arrived::MAX_HEAD).then(Arrived::new);
    let mut headers = match arrived {
        Some(_) => HeaderMap::new(),
        None => to_map(None, spans.len()),
    };
    for &[n0, n1, v0, v1] in spans.iter() {
        let (n0, n1, v0, v1) = (n0 as usize, n1 as usize, v0 as usize, v1 as usize);
        let (name, value) = (&head[n0..n1], &head[v0..v1]);
        let known = Known::of(name);
        let mut hop = false;
        match known {
            Known::ClientIdentity => continue, // only the gateway says who a client is
            Known::ContentLength => {
                let n = decimal(value).ok_or(Refusal::bad("its Content-Length is not a number"))?;
                match length {
                    Some(l) if l != n => {
                        return Err(Refusal::bad("its Content-Length fields differ"))
                    }
                    // One field is kept of several that agree.
                    Some(_) => continue,
                    None => length = Some(n),
                }
            }
            Known::TransferEncoding => {
                if version == Version::HTTP_10 {
                    return Err(Refusal::bad("Transfer-Encoding on HTTP/1.0"));
                }
                let (named, last) = chunked_codings(value);
                chunked_named += named;
                chunked = Some(last);
            }
            Known::Connection => {
                if close || has_token(value, "close") {
                    close = true;
                    keep_alive = false;
                } else if !keep_alive {
                    keep_alive = has_token(value, "keep-alive");
                }
                hop = true;
            }
            Known::Expect => expect_continue = value.eq_ignore_ascii_case(b"100-continue"),
            Known::Upgrade => upgrade = version == Version::HTTP_11,
            Known::Te => {
                trailers |= has_token(value, "trailers");
                hop = true;
            }
            Known::HopByHop => hop = true,
            Known::Host | Known::CorrelationId | Known::Other => {}
        }
        if let Some(kept) = &mut arrived {
            let span = span_of(n0, n1, v0, v1);
            let pushed = match known {
                Known::ContentLength => kept.push(span, Kept::Length),
                Known::Connection if !names_only_options(value) => false,
                Known::TransferEncoding | Known::Upgrade => false,
                Known::Host => kept.push(span, Kept::Host),
                Known::CorrelationId => kept.push(span, Kept::CorrelationId),
                Known::Other if name.len() > MAX_KEPT_NAME || name.contains(&b'_') => false,
                _ if hop => kept.push(span, Kept::HopByHop),
                _ => kept.push(span, Kept::Other(name[0])),
            };
            if pushed {
                continue;
            }
            let moved = arrived.take().map(|mut kept| {
                kept.lie_in(head.clone());
                kept
            });
            headers = to_map(moved, spans.len());
        }
        let name = HeaderName::from_bytes(name).map_err(|_| Refusal::bad("invalid field name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
            .map_err(|_| Refusal::bad("invalid field value"))?;
        headers.append(name, value);
    }
    if let Some(kept) = &mut arrived {
        kept.declare(length);
        kept.lie_in(head);
    }
    let body = match (length, chunked) {
        (Some(_), Some(_)) => {
            return Err(Refusal::bad(
                "it has both Content-Length and Transfer-Encoding",
            ))
        }
        (None, Some(false)) => {
            return Err(Refusal::bad("its final transfer coding is not chunked"))
        }
        _ if chunked_named > 1 => {
            return Err(Refusal::bad("it names the chunked coding more than once"))
        }
        (None, Some(true)) => Some(Decoder::Chunked(Box::<Chunked>::default())),
        (Some(0) | None, None) => None,
        (Some(n), None) => Some(Decoder::Length(n)),
    };
    let mut request = Request::new(ClientBody::Empty);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(Head {
        // Allocated first and written into: no copy of it on the stack moved in.
        request: Box::write(
            Box::new_uninit(),
            ClientRequest {
                request,
                fields: arrived,
            },
        ),
        body,
        keep_alive,
        expect_continue,
        upgrade,
        trailers,
    }))
}

/// The longest field name kept as it came (a map checks longer ones).
const MAX_KEPT_NAME: usize = 256;

/// What a request field is to its connection and to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    ContentLength,
    TransferEncoding,
    Connection,
    Expect,
    Upgrade,
    Te,
    /// Another hop-by-hop field (`Keep-Alive`, `Proxy-*`).
    HopByHop,
    /// A client's copy of the verified identity field.
    ClientIdentity,
    Host,
    CorrelationId,
    Other,
}

impl Known {
    /// What the field named `name` (any case) is. Told by length first:
    /// most names are ruled out by that alone.
    fn of(name: &[u8]) -> Known {
        let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
        match name.len() {
            2 if is("te") => Known::Te,
            4 if is("host") => Known::Host,
            6 if is("expect") => Known::Expect,
            7 if is("upgrade") => Known::Upgrade,
            10 if is("connection") => Known::Connection,
            10 if is("keep-alive") => Known::HopByHop,
            14 if is("content-length") => Known::ContentLength,
            16 if is("proxy-connection") => Known::HopByHop,
            16 if is("x-correlation-id") => Known::CorrelationId,
            17 if is("transfer-encoding") => Known::TransferEncoding,
            18 if is("proxy-authenticate") => Known::HopByHop,
            19 if is("proxy-authorization") => Known::HopByHop,
            26 if is(crate::http::tls::CLIENT_IDENTITY.as_str()) => Known::ClientIdentity,
            _ => Known::Other,
        }
    }
}

/// Whether a `Connection` value names no field, only `close` or
/// `keep-alive` (fields it names are stripped from a map).
fn names_only_options(value: &[u8]) -> bool {
    tokens(value).all(|t| t.eq_ignore_ascii_case(b"close") || t.eq_ignore_ascii_case(b"keep-alive"))
}

/// The span of a field from its bounds.
fn span_of(n0: usize, n1: usize, v0: usize, v1: usize) -> Span {
    [n0 as u32, n1 as u32, v0 as u32, v1 as u32]
}

/// The fields kept as they came, in a map.
#[cold]
fn to_map(arrived: Option<Arrived>, fields: usize) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(fields + 6);
    if let Some(arrived) = arrived {
        arrived.add_to(&mut map);
    }
    map
}

/// How many of a `Transfer-Encoding` value's codings are `chunked`, and
/// whether the last one is. Out of line: few requests have a body of
/// unknown length.
#[inline(never)]
fn chunked_codings(value: &[u8]) -> (usize, bool) {
    let mut codings = value.split(|&b| b == b',');
    let named = codings
        .clone()
        .filter(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
        .count();
    let last = codings.next_back().unwrap_or_default();
    // (A value that is not visible ASCII names no coding, as for hyper.)
    let last = value.is_ascii() && last.trim_ascii().eq_ignore_ascii_case(b"chunked");
    (named, last)
}

/// What a request says about its answer.
#[derive(Debug, Clone, Copy)]
struct Asked {
    version: Version,
    /// A HEAD: the answer's head only.
    head: bool,
    /// It accepts trailers.
    trailers: bool,
}

/// Encodes the head of an answer into `out`; its body's framing, `None`
/// when it has no body to send. `keep_alive` becomes false when the
/// answer closes the connection.
fn encode(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    body: &ProxyBody,
    asked: Asked,
    keep_alive: &mut bool,
) -> Option<Framing> {
    use http_body::Body as _;
    let status = parts.status;
    let headers = &parts.headers;
    out.clear();
    status_line(out, status);
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // An upstream's fields as received first (`http::fields`), those the
    // map has replaced left out.
    let received = body.received();
    let mut dated = false;
    if let Some(received) = received {
        received.write(out, headers);
        dated = received.has_date();
    }
    // The map's fields in one pass: the framing ones noted, not copied.
    let mut declared = Length::default();
    let mut length_field = false;
    for (name, value) in headers {
        if *name == header::CONTENT_LENGTH {
            declared.add(value.as_bytes());
            length_field = true;
            continue;
        }
        if *name == header::TRANSFER_ENCODING {
            continue;
        }
        dated |= *name == header::DATE;
        if *name == header::CONNECTION && !switching {
            if has_token(value.as_bytes(), "close") {
                *keep_alive = false;
            }
            continue;
        }
        field(out, name, value.as_bytes());
    }
    let declared = match received {
        Some(received) if !length_field => received.length(),
        _ => declared.get(),
    };
    let framing = if bodiless {
        if status == StatusCode::NOT_MODIFIED {
            if let Some(n) = declared {
                content_length_field(out, n);
            }
        }
        None
    } else {
        match declared.or_else(|| body.size_hint().exact()) {
            Some(n) => {
                content_length_field(out, n);
                Some(Framing::Length(n))
            }
            None if asked.head => None,
            None if asked.version == Version::HTTP_11 => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                let allowed = if asked.trailers {
                    trailer_names(headers)
                } else {
                    Vec::new()
                };
                Some(Framing::Chunked(allowed))
            }
            None => {
                *keep_alive = false;
                Some(Framing::Close)
            }
        }
    };
    if !switching {
        if !*keep_alive && asked.version == Version::HTTP_11 {
            out.extend_from_slice(b"connection: close\r\n");
        } else if *keep_alive && asked.version == Version::HTTP_10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    if !dated {
        date(out);
    }
    out.extend_from_slice(b"\r\n");
    framing.filter(|_| !asked.head)
}

/// `HTTP/1.1 <code> <reason>` and its line end.
fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn content_length_field(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let count = tidegate_client::headers::write_digits(n, &mut digits);
    field(out, &header::CONTENT_LENGTH, &digits[..count]);
}

/// A `date` field: now, formatted once a second per thread.
fn date(out: &mut Vec<u8>) {
    use std::cell::Cell;
    thread_local! {
        static DATE: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let now = tidegate_client::clock::unix_secs();
    let text = DATE.with(|cached| {
        let (at, text) = cached.get();
        if at == now {
            return text;
        }
        let text = tidegate_client::clock::http_date(now);
        cached.set((now, text));
        text
    });
    field(out, &header::DATE, &text);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::body;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// Answers as `answer` says, after reading the whole body.
    struct Answering(fn(&http::request::Parts, Bytes) -> Response<ProxyBody>);

    impl Service for Answering {
        async fn call(&mut self, mut request: Box<ClientRequest>) -> Response<ProxyBody> {
            // The fields, as any reader but the gateway's fast path sees them.
            request.map();
            let (parts, body) = request.request.into_parts();
            match body.collect().await {
                Ok(body) => (self.0)(&parts, body.to_bytes()),
                Err(e) => {
                    let mut response = Response::new(body::full(e.to_string()));
                    *response.status_mut() = StatusCode::BAD_REQUEST;
                    response
                }
            }
        }
    }

    /// Counts its wakes.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// `head` parsed: its request, whose fields came as they were or not.
    fn parsed(head: &str) -> Box<ClientRequest> {
        let mut read = BytesMut::from(head);
        let mut spans = Vec::new();
        parse_head(&mut read, &mut spans, 1 << 16)
            .expect("a valid head")
            .expect("a whole head")
            .request
    }

    #[test]
    fn a_head_is_kept_as_it_came_unless_only_a_map_can_pass_it_on() {
        let mut kept = parsed(
            "POST / HTTP/1.1\r\nHost: x\r\nConnection: Keep-Alive\r\nTE: trailers\r\n\
             X-A:  1\r\nContent-Length: 2\r\ncontent-length: 2\r\nx-tidegate-client-identity: me\r\n\r\n",
        );
        assert!(kept.request.headers().is_empty());
        let fields = kept.fields.as_mut().expect("kept as they came");
        assert_eq!(fields.length(), Some(2));
        assert_eq!(fields.get(&header::HOST), Some(&b"x"[..]));
        let mut out = Vec::new();
        fields.write(&mut out);
        assert_eq!(
            out, b"Host: x\r\nX-A:  1\r\n",
            "hop-by-hop and framing fields aside"
        );
        fields.strip_hop_by_hop();
        // A map has them as a map read from the head would, one
        // `content-length` of those that agree, the identity dropped.
        let map = kept.map();
        assert_eq!(map.len(), 3);
        assert_eq!(map["x-a"], "1");
        assert_eq!(map["content-length"], "2");
        assert!(kept.fields.is_none());

        let many = (0..fields::MAX_FIELDS)
            .map(|i| format!("x-{i}: {i}\r\n"))
            .collect::<String>();
        for head in [
            "Transfer-Encoding: chunked\r\n".to_owned(),
            "Connection: upgrade\r\nUpgrade: websocket\r\n".to_owned(),
            "Connection: x-private\r\nx-private: 1\r\n".to_owned(),
            "X_Under: 1\r\n".to_owned(),
            many,
        ] {
            let request = parsed(&format!("POST / HTTP/1.1\r\nHost: x\r\nA: 1\r\n{head}\r\n"));
            assert!(request.fields.is_none(), "{head}");
            let map = request.request.headers();
            assert_eq!(map["host"], "x", "{head}");
            assert_eq!(map["a"], "1", "{head}");
            assert_eq!(map.len(), head.matches("\r\n").count() + 2, "{head}");
        }
    }

    #[test]
    fn a_future_polled_when_woken_wakes_its_task_every_time() {
        // The inner future keeps its waker and counts its polls.
        let inner_waker = Arc::new(Mutex::new(None::<Waker>));
        let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut future = WhenWoken::new(std::future::poll_fn({
            let (inner_waker, polls) = (inner_waker.clone(), polls.clone());
            move |cx| {
                polls.fetch_add(1, Ordering::SeqCst);
                *inner_waker.lock().unwrap() = Some(cx.waker().clone());
                Poll::<()>::Pending
            }
        }));
        let wakes = Arc::new(Wakes::default());
        let task = Waker::from(wakes.clone());
        let mut poll = || Pin::new(&mut future).poll(&mut Context::from_waker(&task));
        let wake_inner = || inner_waker.lock().unwrap().take().unwrap().wake();
        assert!(poll().is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled at first");
        // Not woken: the task's other wake-ups do not poll it.
        for _ in 0..3 {
            assert!(poll().is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        // Each wake reaches the task and polls it once more, also after
        // polls with nothing new between.
        for round in 1..=3 {
            wake_inner();
            assert_eq!(wakes.0.load(Ordering::SeqCst), round, "round {round}");
            assert!(poll().is_pending());
            assert!(poll().is_pending());
            assert_eq!(polls.load(Ordering::SeqCst), 1 + round, "round {round}");
        }
        // Polled from another task, it wakes that one.
        let other = Arc::new(Wakes::default());
        let other_waker = Waker::from(other.clone());
        assert!(Pin::new(&mut future)
            .poll(&mut Context::from_waker(&other_waker))
            .is_pending());
        wake_inner();
        assert_eq!(other.0.load(Ordering::SeqCst), 1);
    }

    fn echo(parts: &http::request::Parts, body: Bytes) -> Response<ProxyBody> {
        let text = format!("{} {} {}", parts.method, parts.uri, body.len());
        Response::new(body::full(text))
    }

    fn serve(
        answer: fn(&http::request::Parts, Bytes) -> Response<ProxyBody>,
    ) -> (
        DuplexStream,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        serve_with(Answering(answer))
    }

    /// A connection served by `service`: the client's end, the stop, and
    /// the serving task.
    fn serve_with<S: Service + Send + Sync + 'static>(
        service: S,
    ) -> (
        DuplexStream,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (stop, stopped) = watch::channel(false);
        let connection = Connection {
            service,
            peer: "127.0.0.1:1".parse().unwrap(),
            identity: None,
            stop: stopped,
            limits: Limits {
                max_head: 8192,
                header_read: Duration::from_secs(10),
                send: Duration::from_secs(10),
            },
            deadlines: Deadlines::default(),
        };
        let served = tokio::spawn(connection.serve(server, BytesMut::new()));
        (client, stop, served)
    }

    /// Reads until `until` has been seen; returns it all.
    async fn read_until(client: &mut DuplexStream, until: &str) -> String {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).contains(until) {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(seen).unwrap()
    }

    async fn read_to_end(client: &mut DuplexStream) -> String {
        let mut all = Vec::new();
        client.read_to_end(&mut all).await.unwrap();
        String::from_utf8(all).unwrap()
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_on_one_connection() {
        let (mut client, _stop, _served) = serve(echo);
        client
            .write_all(
                b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n\
                  POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc\
                  POST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
            )
            .await
            .unwrap();
        let answers = read_until(&mut client, "POST /c 2").await;
        let a = answers.find("GET /a 0").unwrap();
        let b = answers.find("POST /b 3").unwrap();
        assert!(a < b, "{answers}");
        assert_eq!(
            answers.matches("HTTP/1.1 200 OK\r\n").count(),
            3,
            "{answers}"
        );
        assert!(answers.contains("content-length: 8\r\n"), "{answers}");
        assert!(answers.contains("date: "), "{answers}");
        assert!(!answers.contains("connection: close"), "{answers}");
    }

    #[tokio::test]
    async fn an_idle_connection_closes_when_the_gateway_stops_and_a_busy_one_after_its_answer() {
        let (mut client, stop, served) = serve(echo);
        client
            .write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut client, "GET /a 0").await;
        stop.send(true).unwrap();
        served.await.unwrap();
        assert_eq!(read_to_end(&mut client).await, "", "closed, nothing more");

        // Stopped while its body comes: answered, with the connection closing.
        let (mut client, stop, served) = serve(echo);
        client
            .write_all(b"POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nab")
            .await
            .unwrap();
        tokio::task::yield_now().await;
        stop.send(true).unwrap();
        client.write_all(b"cd").await.unwrap();
        let answer = read_to_end(&mut client).await;
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        assert!(answer.ends_with("POST /b 4"), "{answer}");
        served.await.unwrap();
    }

    #[tokio::test]
    async fn continue_is_sent_when_the_body_is_read_and_never_after_an_answer() {
        let (mut client, _stop, _served) = serve(echo);
        client
            .write_all(
                b"PUT /a HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n",
            )
            .await
            .unwrap();
        let interim = read_until(&mut client, "\r\n\r\n").await;
        assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
        client.write_all(b"ok").await.unwrap();
        read_until(&mut client, "PUT /a 2").await;

        // Refused before its body is read: no 100, and the connection
        // closes, since the body may still come.
        struct Early;
        impl Service for Early {
            async fn call(&mut self, _: Box<ClientRequest>) -> Response<ProxyBody> {
                let mut response = Response::new(body::full("too large"));
                *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
                response
            }
        }
        let (mut client, _stop, _served) = serve_with(Early);
        client
            .write_all(b"PUT /a HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 99999\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_end(&mut client).await;
        assert!(
            answer.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
            "{answer}"
        );
        assert!(!answer.contains("100 Continue"), "{answer}");
    }

    #[tokio::test]
    async fn answers_are_framed_for_their_request_and_status() {
        fn by_path(parts: &http::request::Parts, _: Bytes) -> Response<ProxyBody> {
            let mut response = match parts.uri.path() {
                // A body of unknown length, with a trailer.
                "/stream" => {
                    let frames = vec![
                        Ok(http_body::Frame::data(Bytes::from_static(b"part"))),
                        Ok(http_body::Frame::trailers(HeaderMap::from_iter([(
                            HeaderName::from_static("x-sum"),
                            HeaderValue::from_static("1"),
                        )]))),
                    ];
                    let stream = futures_util::stream::iter(frames);
                    let mut response =
                        Response::new(ProxyBody::new(http_body_util::StreamBody::new(stream)));
                    response
                        .headers_mut()
                        .insert(header::TRAILER, HeaderValue::from_static("x-sum"));
                    response
                }
                "/empty" => {
                    let mut response = Response::new(body::empty());
                    *response.status_mut() = StatusCode::NO_CONTENT;
                    response
                }
                _ => Response::new(body::full("hello")),
            };
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("x-hop"));
            response
        }
        let exchange = |request: &'static [u8]| async move {
            let (mut client, _stop, _served) = serve(by_path);
            client.write_all(request).await.unwrap();
            client.shutdown().await.unwrap();
            read_to_end(&mut client).await
        };
        let head = exchange(b"HEAD /x HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(head.contains("content-length: 5\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "no body: {head}");
        assert!(!head.contains("x-hop"), "{head}");

        let empty = exchange(b"GET /empty HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(empty.starts_with("HTTP/1.1 204 No Content\r\n"), "{empty}");
        assert!(!empty.contains("content-length"), "{empty}");

        let chunked = exchange(b"GET /stream HTTP/1.1\r\nhost: x\r\nte: trailers\r\n\r\n").await;
        assert!(
            chunked.contains("transfer-encoding: chunked\r\n"),
            "{chunked}"
        );
        assert!(
            chunked.ends_with("\r\n\r\n4\r\npart\r\n0\r\nx-sum: 1\r\n\r\n"),
            "{chunked}"
        );
        let untold = exchange(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(
            untold.ends_with("\r\n\r\n4\r\npart\r\n0\r\n\r\n"),
            "trailers only to who asks: {untold}"
        );

        // HTTP/1.0 cannot read chunks: the connection's end ends the body.
        let old = exchange(b"GET /stream HTTP/1.0\r\nconnection: keep-alive\r\n\r\n").await;
        assert!(!old.contains("transfer-encoding"), "{old}");
        assert!(!old.contains("connection: keep-alive"), "{old}");
        assert!(old.ends_with("\r\n\r\npart"), "{old}");
        let kept = exchange(b"GET /x HTTP/1.0\r\nconnection: keep-alive\r\n\r\n").await;
        assert!(kept.contains("connection: keep-alive\r\n"), "{kept}");
    }

    #[tokio::test]
    async fn a_client_identity_header_never_passes_and_the_verified_one_is_set() {
        fn identity(parts: &http::request::Parts, _: Bytes) -> Response<ProxyBody> {
            let seen = parts.headers.get_all(&crate::http::tls::CLIENT_IDENTITY);
            let seen: Vec<_> = seen
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect();
            Response::new(body::full(seen.join(",")))
        }
        let (mut client, _stop, _served) = serve(identity);
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-tidegate-client-identity: forged\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_end(&mut client).await;
        assert!(answer.ends_with("\r\n\r\n"), "none: {answer}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_not_in_by_the_header_read_timeout_is_answered_408_and_an_idle_connection_closes(
    ) {
        let (mut client, _stop, _served) = serve(echo);
        client.write_all(b"GET / HTTP/1.1\r\nhost").await.unwrap();
        let answer = read_to_end(&mut client).await;
        assert!(
            answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{answer}"
        );

        let (mut client, _stop, _served) = serve(echo);
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut client, "GET / 0").await;
        let started = Instant::now();
        assert_eq!(read_to_end(&mut client).await, "");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }
}
