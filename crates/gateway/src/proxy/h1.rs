//! HTTP/1.1 to an upstream, in the task of the request that sends it.
//!
//! hyper's client runs each connection as a task of its own: a request
//! goes to it through a channel, its head comes back through another, and
//! its body is a third, so every proxied request crosses tasks several
//! times. Here a pooled [`Conn`] is a socket and its read buffer, nothing
//! running: [`Conn::send`] writes the request head (and body) and reads the
//! answer's head, and the response [`Body`] reads the rest from the socket
//! when the client's connection asks for it, all in the one task that
//! serves the client. The connection goes back to the pool when the body
//! ends.
//!
//! The framing follows hyper's client, which the differential tests hold
//! it to: the request's length from its body (`content-length` when
//! known, else chunked), the response's per RFC 9112 §6.3 (no body for
//! HEAD, 1xx, 204 and 304; chunked when the last transfer coding is;
//! else a valid `content-length`; else until the connection closes),
//! 1xx answers skipped, trailers kept. Where hyper keeps a connection
//! that the RFC would close (`transfer-encoding` beside `content-length`,
//! bytes after the end of a response), this one closes it.
//!
//! Upgrades (WebSocket, CONNECT) go through hyper, whose upgraded
//! connection becomes the tunnel.

use std::fmt;
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::http::body::{BoxError, ProxyBody};
use crate::http::codec::{
    content_length, field, note_spans, poll_fill, tokens, trailer_names, Decoder, Framing, Invalid,
    Length, Span, Step, WriteError, Writer, MAX_HEADERS, READ_SIZE,
};
use crate::http::fields::{Arrived, Received, MAX_FIELDS};
use crate::http::headers;

/// A response head's bytes at most (hyper's default read buffer limit).
const MAX_HEAD: usize = 8192 + 4096 * 100;

/// A connection to an upstream: plain TCP or TLS.
#[derive(Debug)]
pub enum Stream {
    /// `http://`.
    Plain(TcpStream),
    /// `https://`.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum Error {
    /// Reading from or writing to the upstream failed.
    Io(io::Error),
    /// The upstream closed the connection before its answer was complete.
    Closed,
    /// The answer is not valid HTTP/1.1, or breaks a limit.
    Invalid(&'static str),
    /// The request body failed (the client's error, or its size limit).
    Body(BoxError),
    /// The request body's length is not the one its head declares.
    BodyLength,
}

/// [`Error::Invalid`], made where the answer breaks the protocol: a rare
/// branch, laid out of the way of the ones every answer takes.
#[cold]
fn invalid(why: &'static str) -> Error {
    Error::Invalid(why)
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "upstream connection error: {e}"),
            Error::Closed => {
                f.write_str("the upstream closed the connection before its answer ended")
            }
            Error::Invalid(why) => write!(f, "invalid upstream answer: {why}"),
            Error::Body(_) => f.write_str("request body failed"),
            Error::BodyLength => f.write_str("request body length differs from its content-length"),
        }
    }
}

impl From<Invalid> for Error {
    fn from(invalid: Invalid) -> Self {
        Error::Invalid(invalid.0)
    }
}

impl From<WriteError> for Error {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Io(e) => Error::Io(e),
            WriteError::Body(e) => Error::Body(e),
            WriteError::BodyLength => Error::BodyLength,
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            Error::Body(e) => Some(&**e),
            _ => None,
        }
    }
}

/// A socket, as the pool sees it while its connection is idle.
pub trait Quiet: AsyncRead + Unpin {
    /// Whether the peer has neither closed it nor sent anything. No
    /// system call unless the socket has become readable since the last
    /// read.
    fn is_quiet(&mut self) -> bool {
        polled_quiet(self)
    }
}

/// [`Quiet::is_quiet`] by a read polled without a waker.
fn polled_quiet<S: AsyncRead + Unpin + ?Sized>(io: &mut S) -> bool {
    let mut probe = [0u8; 1];
    let mut buf = ReadBuf::new(&mut probe);
    let mut cx = Context::from_waker(Waker::noop());
    matches!(Pin::new(io).poll_read(&mut cx, &mut buf), Poll::Pending)
}

impl Quiet for Stream {
    fn is_quiet(&mut self) -> bool {
        match self {
            // Asked without a poll, which would leave a waker with the
            // socket (taking the lock of its waiters) only for the next
            // read to replace it.
            Stream::Plain(s) => {
                let mut probe = [0u8; 1];
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            // A TLS stream reads records (a close notice, a session ticket)
            // before it can tell.
            Stream::Tls(_) => polled_quiet(self),
        }
    }
}

/// An open connection, between exchanges: the socket, what was read of
/// it and not used yet (nothing, between exchanges), and its slot in the
/// upstream's connection gate. Boxed once when opened: an answer's body
/// holds it, and answers are moved on their way to the client.
#[derive(Debug)]
pub struct Conn<S = Stream>(Box<Open<S>>);

#[derive(Debug)]
struct Open<S> {
    io: S,
    read: BytesMut,
    /// Where a head's fields lie in it (kept for the next head).
    spans: Vec<Span>,
    /// What the next body read asks for.
    read_size: usize,
    /// Requests it carried.
    uses: u32,
    _slot: Option<OwnedSemaphorePermit>,
}

impl<S: Quiet> Conn<S> {
    /// Whether an idle connection may carry a request: the upstream has
    /// neither closed it nor sent anything unasked.
    pub fn is_open(&mut self) -> bool {
        self.0.io.is_quiet()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// A new connection over `io`, holding `slot` until it closes.
    pub fn new(io: S, slot: Option<OwnedSemaphorePermit>) -> Self {
        Conn(Box::new(Open {
            io,
            read: BytesMut::new(),
            spans: Vec::new(),
            read_size: READ_SIZE,
            uses: 0,
            _slot: slot,
        }))
    }

    /// Counts one more request on it; how many it has carried.
    pub fn count_use(&mut self) -> u32 {
        self.0.uses += 1;
        self.0.uses
    }

    /// Sends `request` (origin-form target, `Host` set) and reads the
    /// answer's head; the answer's body reads the rest.
    pub async fn send(self, request: Request<ProxyBody>) -> Result<Response<Body<S>>, Error> {
        self.send_prepared(Prepared::from_request(request, ""))
            .await
    }

    /// Sends a request encoded beforehand (see [`Prepared`]).
    pub async fn send_prepared(mut self, prepared: Prepared) -> Result<Response<Body<S>>, Error> {
        let Prepared {
            mut writer,
            head_only,
        } = prepared;
        let mut write_failed = None;
        let parsed = std::future::poll_fn(|cx| {
            if write_failed.is_none() && !writer.done() {
                match writer.poll(&mut self.0.io, cx).map_err(Error::from) {
                    Poll::Ready(Err(Error::Io(e))) => {
                        // The upstream may have answered and closed:
                        // read its answer, if there is one.
                        write_failed = Some(e);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) | Poll::Pending => {}
                }
            }
            let conn = &mut self;
            match ready!(poll_head(
                &mut conn.0.io,
                &mut conn.0.read,
                &mut conn.0.spans,
                cx,
                head_only
            )) {
                Err(Error::Closed | Error::Io(_)) if write_failed.is_some() => {
                    Poll::Ready(Err(Error::Io(write_failed.take().expect("checked"))))
                }
                parsed => Poll::Ready(parsed),
            }
        })
        .await?;
        let Parsed {
            response,
            received,
            decoder,
            keep_alive,
        } = parsed;
        let writer = (write_failed.is_none() && !writer.done()).then(|| Box::new(writer));
        let reusable = keep_alive && write_failed.is_none();
        let mut body = Body {
            conn: Some(self),
            decoder,
            writer,
            reusable,
            finished: false,
            received,
        };
        body.check_end();
        Ok(response.map(|()| body))
    }
}

/// A request head to send: what the caller keeps for every attempt of a
/// request, borrowed, and the fields of this attempt.
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    /// Its method.
    pub method: &'a Method,
    /// Its origin-form target.
    pub target: &'a PathAndQuery,
    /// Its fields (framing fields aside: the body decides them).
    pub headers: &'a HeaderMap,
    /// Fields written as they came after `headers` (see [`Arrived`]).
    pub fields: Option<&'a Arrived>,
    /// Fields written after `headers`, as they are: `name: value\r\n`
    /// lines (the request's, then the attempt's), none of whose names
    /// `headers` has.
    pub lines: [&'a [u8]; 2],
    /// `Host`, when `headers` has none.
    pub host: &'a str,
    /// Whether it asks to switch protocols (an `Upgrade` field) or is a
    /// CONNECT: such a request goes over a connection of its own.
    pub upgrade: bool,
}

/// A request encoded and ready to go on any connection: its head written
/// out, its body to follow. (Encoding it does not need the connection,
/// and leaves nothing borrowed.)
#[derive(Debug)]
pub struct Prepared {
    writer: Writer,
    head_only: bool,
}

impl Prepared {
    /// `head` and `body`, encoded.
    pub fn new(head: &Head<'_>, body: ProxyBody) -> Self {
        Prepared {
            writer: request_writer(head, body),
            head_only: *head.method == Method::HEAD,
        }
    }

    /// `request` (origin-form target), encoded; `host` is its `Host`
    /// when it has none.
    pub fn from_request(request: Request<ProxyBody>, host: &str) -> Self {
        let (parts, body) = request.into_parts();
        let root = PathAndQuery::from_static("/");
        let head = Head {
            method: &parts.method,
            target: parts.uri.path_and_query().unwrap_or(&root),
            headers: &parts.headers,
            fields: None,
            lines: [&[], &[]],
            host,
            upgrade: crate::proxy::client::asks_upgrade(&parts.method, &parts.headers),
        };
        Prepared::new(&head, body)
    }
}

/// The head of a request to `method` `uri` with `headers` (framing
/// fields aside: the body decides them, as hyper's client does), and its body.
fn request_writer(head: &Head<'_>, body: ProxyBody) -> Writer {
    use http_body::Body as _;
    let headers = head.headers;
    let lines = head.lines[0].len() + head.lines[1].len();
    let arrived = head.fields.map_or(0, Arrived::size);
    let mut out = Vec::with_capacity(256 + headers.len() * 48 + arrived + lines);
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target.as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // The fields in one pass: the framing ones noted, not copied.
    let (mut length, mut coding, mut host) = (false, false, false);
    for (name, value) in headers {
        if *name == header::CONTENT_LENGTH {
            length = true;
        } else if *name == header::TRANSFER_ENCODING {
            coding = true;
        } else {
            host |= *name == header::HOST;
            field(&mut out, name, value.as_bytes());
        }
    }
    if let Some(fields) = head.fields {
        fields.write(&mut out);
        host |= fields.host().0.is_some();
        length |= fields.length().is_some();
    }
    for lines in head.lines {
        out.extend_from_slice(lines);
    }
    if !head.host.is_empty() && !host {
        field(&mut out, &header::HOST, head.host.as_bytes());
    }
    let (body, framing) = if body.is_end_stream() {
        // No body: a declared length was zero (hyper's server checked it).
        if length {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        (None, Framing::Length(0))
    } else {
        let length = if coding {
            None
        } else {
            content_length(headers)
                .or_else(|| head.fields.and_then(Arrived::length))
                .or_else(|| body.size_hint().exact())
        };
        let framing = match length {
            Some(len) => {
                let _ = write!(out, "content-length: {len}\r\n");
                Framing::Length(len)
            }
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked(trailer_names(headers))
            }
        };
        (Some(body), framing)
    };
    out.extend_from_slice(b"\r\n");
    Writer::new(out, body, framing)
}

/// Field lines (as [`Head::lines`]) and their name and value.
fn lines(lines: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    lines
        .split(|&b| b == b'\n')
        .filter_map(|line| line.strip_suffix(b"\r"))
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            Some((&line[..colon], line[colon + 1..].trim_ascii()))
        })
}

/// Sets the fields of `lines` (as [`Head::lines`]) in `headers`.
pub fn add_lines(headers: &mut HeaderMap, lines: &[u8]) {
    for (name, value) in self::lines(lines) {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.insert(name, value);
        }
    }
}

/// The value of field `name` in `lines` (as [`Head::lines`]).
pub fn line_value<'a>(lines: &'a [u8], name: &HeaderName) -> Option<&'a [u8]> {
    self::lines(lines)
        .find(|(n, _)| n.eq_ignore_ascii_case(name.as_str().as_bytes()))
        .map(|(_, value)| value)
}

/// A response head, and how its body is framed.
struct Parsed {
    response: Response<()>,
    /// Its fields as received, when they pass as they are.
    received: Option<Box<Received>>,
    decoder: Decoder,
    keep_alive: bool,
}

/// Reads until `read` holds a whole final response head; takes it off.
fn poll_head<S: AsyncRead + Unpin>(
    io: &mut S,
    read: &mut BytesMut,
    spans: &mut Vec<Span>,
    cx: &mut Context<'_>,
    head_only: bool,
) -> Poll<Result<Parsed, Error>> {
    loop {
        while !read.is_empty() {
            match parse_head(read, spans, head_only)? {
                Answer::Final(parsed) => return Poll::Ready(Ok(parsed)),
                Answer::Informational => {}
                Answer::Partial => break,
            }
        }
        if read.len() >= MAX_HEAD {
            return Poll::Ready(Err(invalid("response head too large")));
        }
        // A head is read a plain read's size at a time (a body's reads adapt).
        let mut size = READ_SIZE;
        if ready!(poll_fill(io, read, &mut size, cx)).map_err(Error::Io)? == 0 {
            return Poll::Ready(Err(Error::Closed));
        }
    }
}

enum Answer {
    Final(Parsed),
    /// A 1xx answer, taken off: the final one follows.
    Informational,
    Partial,
}

/// Parses the head at the start of `read`, and takes it off if whole.
fn parse_head(
    read: &mut BytesMut,
    spans: &mut Vec<Span>,
    head_only: bool,
) -> Result<Answer, Error> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_response_with_uninit_headers(&mut response, read, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Answer::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(invalid("too many header fields")),
        Err(_) => return Err(invalid("malformed response head")),
    };
    let code = response.code.expect("a whole head has a status");
    let status = StatusCode::from_u16(code).map_err(|_| invalid("status code out of range"))?;
    let version = if response.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    // Where each field lies in the head, to slice it once frozen.
    note_spans(read.as_ptr(), response.headers, spans);
    let head = read.split_to(len).freeze();
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Error::Invalid(
                "101 Switching Protocols to a request without Upgrade",
            ));
        }
        return Ok(Answer::Informational);
    }
    let mut keep_alive = version == Version::HTTP_11;
    let mut close = false;
    // The framing fields: `content-length` read field by field, the last
    // `transfer-encoding`.
    let mut length: Option<Length> = None;
    let mut coding: Option<Span> = None;
    // The fields pass as received (`http::fields`) unless one has to be
    // read into a map: more than it keeps, a `Connection` naming some
    // other field (which the map's stripping removes), or a `Trailer`.
    // Allocated first and written into: no copy of it on the stack moved in.
    let mut received = Box::write(Box::new_uninit(), Received::new());
    let mut plain = spans.len() <= MAX_FIELDS;
    for &span in spans.iter() {
        let name = &head[span[0] as usize..span[1] as usize];
        let value = &head[span[2] as usize..span[3] as usize];
        if name.len() > MAX_NAME {
            return Err(invalid("invalid header name"));
        }
        match Kind::of(name) {
            Kind::ContentLength => {
                length.get_or_insert_with(Length::default).add(value);
                plain &= received.push_length(span);
            }
            Kind::TransferEncoding => coding = Some(span),
            Kind::Connection => {
                for token in tokens(value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive |= !close;
                    } else if !token.eq_ignore_ascii_case(b"upgrade") {
                        plain = false;
                    }
                }
            }
            Kind::HopByHop => {}
            Kind::Date => plain &= received.push_date(span),
            // A field named `close` goes if `Connection: close` names it:
            // the map's stripping decides.
            Kind::Other if headers::is_token(name, "close") => plain = false,
            // The fields `Trailer` names are the only trailers an HTTP/1.1
            // client is sent, read from the map: an answer with trailers
            // (rare) is read into one.
            Kind::Other if headers::is_token(name, "trailer") => plain = false,
            Kind::Other => plain &= received.push(span),
        }
    }
    keep_alive &= !close;
    received.declare(length.and_then(|length| length.get()));
    let coding = coding.map(|span| &head[span[2] as usize..span[3] as usize]);
    let (decoder, closes) = decoder(status, version, length, coding, head_only)?;
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    let received = if plain {
        received.lie_in(head);
        Some(received)
    } else {
        *response.headers_mut() = header_map(&head, spans)?;
        None
    };
    Ok(Answer::Final(Parsed {
        response,
        received,
        decoder,
        keep_alive: keep_alive && !closes,
    }))
}

/// A field name's bytes at most (the header map's limit).
const MAX_NAME: usize = (1 << 16) - 1;

/// Every field of `head` in a map, as received (hop-by-hop ones too: the
/// gateway strips those).
fn header_map(head: &Bytes, spans: &[Span]) -> Result<HeaderMap, Error> {
    // Room for what the gateway adds on the way back (the request ID…),
    // so that the map is not built twice.
    let mut headers = HeaderMap::with_capacity(spans.len() + 4);
    for &[n0, n1, v0, v1] in spans {
        let (n0, n1, v0, v1) = (n0 as usize, n1 as usize, v0 as usize, v1 as usize);
        let name =
            HeaderName::from_bytes(&head[n0..n1]).map_err(|_| invalid("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
            .map_err(|_| invalid("invalid header value"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// What a response field is to the client reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ContentLength,
    TransferEncoding,
    Connection,
    /// Another field that describes the connection, never passed on.
    HopByHop,
    Date,
    Other,
}

impl Kind {
    fn of(name: &[u8]) -> Kind {
        if let Some(known) = headers::hop_by_hop(name) {
            return match *known {
                header::CONNECTION => Kind::Connection,
                header::TRANSFER_ENCODING => Kind::TransferEncoding,
                _ => Kind::HopByHop,
            };
        }
        if headers::is_token(name, "content-length") {
            Kind::ContentLength
        } else if headers::is_token(name, "date") {
            Kind::Date
        } else {
            Kind::Other
        }
    }
}

/// How a response's body is framed (RFC 9112 §6.3, as hyper reads it),
/// and whether it must close the connection after.
fn decoder(
    status: StatusCode,
    version: Version,
    length: Option<Length>,
    coding: Option<&[u8]>,
    head_only: bool,
) -> Result<(Decoder, bool), Error> {
    if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Decoder::Length(0), false));
    }
    if let Some(coding) = coding {
        if version == Version::HTTP_10 {
            return Err(invalid("transfer-encoding in an HTTP/1.0 answer"));
        }
        // As hyper: a value that is not visible ASCII names no coding.
        let chunked = coding
            .iter()
            .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
            && coding
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        if !chunked {
            return Ok((Decoder::UntilClose, true));
        }
        // With a content-length beside it, the RFC has the connection closed.
        return Ok((Decoder::Chunked(Box::default()), length.is_some()));
    }
    if let Some(length) = length {
        return match length.get() {
            Some(len) => Ok((Decoder::Length(len), false)),
            None => Err(invalid("invalid content-length")),
        };
    }
    Ok((Decoder::UntilClose, true))
}

/// A response body read from the upstream connection by whoever polls it;
/// the connection is handed back through [`Body::take_reusable`] once the
/// body has ended.
#[derive(Debug)]
pub struct Body<S = Stream> {
    /// `None` once the body failed.
    conn: Option<Conn<S>>,
    decoder: Decoder,
    /// The request body, if it is still being sent (rare: boxed).
    writer: Option<Box<Writer>>,
    reusable: bool,
    finished: bool,
    /// The answer's fields as received (`http::fields`), until taken.
    received: Option<Box<Received>>,
}

impl<S> crate::http::fields::Carrier for Body<S> {
    fn take_received(&mut self) -> Option<Box<Received>> {
        self.received.take()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Body<S> {
    /// The connection, once the body ended and the connection can carry
    /// another request; `None` otherwise (it closes when dropped).
    pub fn take_reusable(&mut self) -> Option<Conn<S>> {
        if !(self.finished && self.reusable && self.writer.is_none()) {
            return None;
        }
        let conn = self.conn.take()?;
        // Bytes past the end of the answer: nothing may follow on it.
        conn.0.read.is_empty().then_some(conn)
    }

    /// Whether the body has ended.
    pub fn finished(&self) -> bool {
        self.finished
    }

    fn check_end(&mut self) {
        if matches!(self.decoder, Decoder::Length(0)) {
            self.finished = true;
        }
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.conn = None;
        self.finished = true;
        Poll::Ready(Some(Err(e)))
    }

    /// Sends more of the request body, if some is left (a duplex
    /// exchange); a failure there ends the sending and the connection's
    /// reuse, not the answer.
    fn push_request(&mut self, cx: &mut Context<'_>) {
        let (Some(writer), Some(conn)) = (&mut self.writer, &mut self.conn) else {
            return;
        };
        match writer.poll(&mut conn.0.io, cx) {
            Poll::Pending => {}
            Poll::Ready(Ok(())) => self.writer = None,
            Poll::Ready(Err(_)) => {
                self.writer = None;
                self.reusable = false;
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> http_body::Body for Body<S> {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        this.push_request(cx);
        let Some(conn) = &mut this.conn else {
            return Poll::Ready(None);
        };
        loop {
            match this.decoder.decode(&mut conn.0.read) {
                Ok(Step::More) => {}
                Ok(Step::Data(data)) => {
                    this.finished = this.decoder.is_done();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::Trailers(trailers)) => {
                    this.finished = true;
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Ok(Step::End) => {
                    this.finished = true;
                    return Poll::Ready(None);
                }
                Err(e) => return this.fail(e.into()),
            }
            match ready!(poll_fill(
                &mut conn.0.io,
                &mut conn.0.read,
                &mut conn.0.read_size,
                cx
            )) {
                Ok(0) if matches!(this.decoder, Decoder::UntilClose) => {
                    this.finished = true;
                    this.reusable = false;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(Error::Closed),
                Ok(_) => {}
                Err(e) => return this.fail(Error::Io(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.decoder, self.finished) {
            (_, true) => SizeHint::with_exact(0),
            (Decoder::Length(left), false) => SizeHint::with_exact(*left),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::body;
    use bytes::Bytes;
    use http_body::Body as _;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn request(method: Method, body: ProxyBody) -> Request<ProxyBody> {
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = http::Uri::from_static("/path?q=1");
        request
            .headers_mut()
            .insert(header::HOST, HeaderValue::from_static("upstream"));
        request
    }

    /// Reads from `server` until `until` has been seen; returns it all.
    async fn read_until(server: &mut DuplexStream, until: &[u8]) -> Vec<u8> {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !seen.windows(until.len()).any(|w| w == until) {
            let n = server.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "the client closed after {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
        seen
    }

    impl Quiet for DuplexStream {}

    #[tokio::test]
    async fn a_plain_socket_is_quiet_until_its_peer_writes_or_closes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for closes in [false, true] {
            let mut stream = Stream::Plain(TcpStream::connect(addr).await.unwrap());
            let (mut server, _) = listener.accept().await.unwrap();
            assert!(stream.is_quiet(), "an idle connection");
            if closes {
                drop(server);
            } else {
                server.write_all(b"x").await.unwrap();
            }
            let Stream::Plain(socket) = &stream else {
                unreachable!("made plain");
            };
            socket.readable().await.unwrap();
            assert!(!stream.is_quiet(), "closes: {closes}");
        }
    }

    async fn collect(response: Response<Body<DuplexStream>>) -> (Vec<u8>, Body<DuplexStream>) {
        let mut body = response.into_body();
        let mut data = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(bytes) = frame.unwrap().into_data() {
                data.extend_from_slice(&bytes);
            }
        }
        (data, body)
    }

    #[tokio::test]
    async fn a_connection_carries_request_after_request_and_comes_back_after_each_body() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let mut conn = Conn::new(client, None);
        for i in 0..3 {
            assert!(conn.is_open());
            let sent = tokio::spawn(conn.send(request(Method::GET, body::empty())));
            let head = read_until(&mut server, b"\r\n\r\n").await;
            assert_eq!(
                head, b"GET /path?q=1 HTTP/1.1\r\nhost: upstream\r\n\r\n",
                "no framing field for a GET without a body"
            );
            let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nanswer{i}");
            server.write_all(answer.as_bytes()).await.unwrap();
            let response = sent.await.unwrap().unwrap();
            assert_eq!(response.body().size_hint().exact(), Some(7));
            let (data, mut body) = collect(response).await;
            assert_eq!(data, format!("answer{i}").as_bytes());
            conn = body
                .take_reusable()
                .expect("a whole answer gives the connection back");
        }
        drop(server);
        assert!(!conn.is_open(), "a closed connection is seen as such");
    }

    #[tokio::test]
    async fn bodies_are_framed_by_length_or_chunked_with_only_declared_trailers() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let conn = Conn::new(client, None);
        let sent = tokio::spawn(conn.send(request(Method::POST, body::full("hello"))));
        let head = read_until(&mut server, b"hello").await;
        assert!(
            head.ends_with(b"content-length: 5\r\n\r\nhello"),
            "{head:?}"
        );
        server
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        let response = sent.await.unwrap().unwrap();
        let (_, mut body) = collect(response).await;
        let conn = body.take_reusable().unwrap();

        // A body of unknown length, with trailers: chunked, and only the
        // trailer the head declares goes.
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("5"));
        trailers.insert("x-secret", HeaderValue::from_static("no"));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hel"))),
            Ok(Frame::data(Bytes::from_static(b"lo"))),
            Ok(Frame::trailers(trailers)),
        ];
        let streamed = ProxyBody::new(StreamBody::new(futures_util::stream::iter(frames)));
        let mut streamed_request = request(Method::PUT, streamed);
        streamed_request
            .headers_mut()
            .insert(header::TRAILER, HeaderValue::from_static("x-sum"));
        let sent = tokio::spawn(conn.send(streamed_request));
        let wire = read_until(&mut server, b"0\r\nx-sum: 5\r\n\r\n").await;
        let wire = String::from_utf8(wire).unwrap();
        assert!(wire.contains("transfer-encoding: chunked\r\n"), "{wire}");
        assert!(
            wire.ends_with("\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\nx-sum: 5\r\n\r\n"),
            "{wire}"
        );
        server
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        let response = sent.await.unwrap().unwrap();
        assert!(response.body().is_end_stream());
    }

    #[tokio::test]
    async fn a_large_body_is_read_in_reads_that_grow() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let sent = tokio::spawn(Conn::new(client, None).send(request(Method::GET, body::empty())));
        read_until(&mut server, b"\r\n\r\n").await;
        let size = 1 << 20;
        server
            .write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let writing = tokio::spawn(async move {
            server.write_all(&vec![b'x'; size]).await.unwrap();
            server
        });
        let mut body = sent.await.unwrap().unwrap().into_body();
        let (mut total, mut largest) = (0, 0);
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            total += data.len();
            largest = largest.max(data.len());
        }
        assert_eq!(total, size);
        assert!(
            largest > READ_SIZE,
            "reads grew past {READ_SIZE}: {largest}"
        );
        assert!(
            largest <= 2 * crate::http::codec::MAX_READ_SIZE,
            "{largest}"
        );
        let _server = writing.await.unwrap();
        assert!(body.take_reusable().is_some());
    }

    #[tokio::test]
    async fn an_empty_body_keeps_a_declared_zero_length() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let mut post = request(Method::POST, body::empty());
        post.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let sent = tokio::spawn(Conn::new(client, None).send(post));
        let head = read_until(&mut server, b"\r\n\r\n").await;
        assert_eq!(
            head,
            b"POST /path?q=1 HTTP/1.1\r\nhost: upstream\r\ncontent-length: 0\r\n\r\n"
        );
        server
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        sent.await.unwrap().unwrap();
    }

    /// Answers after which the connection must close, and one after which
    /// it may not (a control).
    #[tokio::test]
    async fn a_connection_comes_back_only_after_an_answer_that_allows_it() {
        let cases: [(&[u8], bool); 7] = [
            (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true),
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", true),
            (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok", false),
            (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA", false),
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n", false),
            (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", false),
        ];
        for (answer, reusable) in cases {
            let (client, mut server) = tokio::io::duplex(1 << 16);
            let sent =
                tokio::spawn(Conn::new(client, None).send(request(Method::GET, body::empty())));
            read_until(&mut server, b"\r\n\r\n").await;
            server.write_all(answer).await.unwrap();
            if !reusable && answer.ends_with(b"until the end") {
                server.shutdown().await.unwrap();
            }
            let response = sent.await.unwrap().unwrap();
            let (_, mut body) = collect(response).await;
            assert_eq!(
                body.take_reusable().is_some(),
                reusable,
                "{}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[tokio::test]
    async fn an_answer_before_the_request_body_ends_is_read_while_the_body_goes_on() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let streamed = ProxyBody::new(StreamBody::new(tokio_stream_from(rx)));
        let sent = tokio::spawn(Conn::new(client, None).send(request(Method::POST, streamed)));
        tx.send(Ok(Frame::data(Bytes::from_static(b"first"))))
            .await
            .unwrap();
        read_until(&mut server, b"5\r\nfirst\r\n").await;
        server
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\necho\r\n")
            .await
            .unwrap();
        let response = sent.await.unwrap().unwrap();
        let mut body = response.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "echo");
        // The rest of the request goes out while the answer is read.
        tx.send(Ok(Frame::data(Bytes::from_static(b"second"))))
            .await
            .unwrap();
        drop(tx);
        let reading = tokio::spawn(async move {
            while let Some(frame) = body.frame().await {
                frame.unwrap();
            }
            body
        });
        read_until(&mut server, b"6\r\nsecond\r\n0\r\n\r\n").await;
        server.write_all(b"0\r\n\r\n").await.unwrap();
        let mut body = reading.await.unwrap();
        assert!(body.take_reusable().is_some(), "both sides ended whole");
    }

    fn tokio_stream_from(
        mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[tokio::test]
    async fn an_upstream_that_answers_and_closes_before_reading_the_body_is_heard() {
        let (client, mut server) = tokio::io::duplex(64);
        let big = body::full(vec![b'x'; 1 << 20]);
        let sent = tokio::spawn(Conn::new(client, None).send(request(Method::POST, big)));
        read_until(&mut server, b"\r\n\r\n").await;
        server
            .write_all(
                b"HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            )
            .await
            .unwrap();
        drop(server);
        let response = sent.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let (_, mut body) = collect(response).await;
        assert!(body.take_reusable().is_none());
    }

    #[tokio::test]
    async fn a_body_error_or_a_wrong_length_fails_the_exchange() {
        let (client, _server) = tokio::io::duplex(1 << 16);
        let failing = ProxyBody::new(StreamBody::new(futures_util::stream::iter(vec![Err::<
            Frame<Bytes>,
            BoxError,
        >(
            Box::new(crate::http::body::BodyTooLarge),
        )])));
        let error = Conn::new(client, None)
            .send(request(Method::POST, failing))
            .await
            .unwrap_err();
        assert!(crate::http::body::is_body_too_large(&error), "{error}");

        let (client, _server) = tokio::io::duplex(1 << 16);
        let mut short = request(Method::POST, body::full("abc"));
        short
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        let error = Conn::new(client, None).send(short).await.unwrap_err();
        assert!(matches!(error, Error::BodyLength), "{error}");
    }

    #[tokio::test]
    async fn an_upstream_that_closes_before_answering_is_an_error() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let sent = tokio::spawn(Conn::new(client, None).send(request(Method::GET, body::empty())));
        read_until(&mut server, b"\r\n\r\n").await;
        drop(server);
        assert!(matches!(
            sent.await.unwrap(),
            Err(Error::Closed | Error::Io(_))
        ));
    }
}
