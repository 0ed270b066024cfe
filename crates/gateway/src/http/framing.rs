//! A guard between the client's socket and hyper's HTTP/1 parser that follows
//! the message framing of every request on a connection and refuses the
//! ambiguous ones.
//!
//! hyper resolves a request carrying both `Content-Length` and
//! `Transfer-Encoding` safely (chunked wins, the connection closes after the
//! response), but it drops the `Content-Length` before the service can see
//! it, so the request would still be forwarded. Such a request is the shape of
//! request smuggling and a gateway should refuse it outright (RFC 9112 §6.3
//! allows either). The guard follows each request head through the byte
//! stream, passing it on as it arrives (so hyper's header read timeout runs
//! as usual) but holding back the empty line that ends it. When both framings
//! are present, when `chunked` is named twice (`chunked, chunked`) or when a
//! line of the head ends in a bare LF (which some servers read as a line end
//! and others not), it puts an invalid header line before that empty line, so
//! hyper's parser rejects the head: the client gets hyper's 400, the
//! connection closes, and nothing reaches the service or an upstream.
//!
//! The guard knows just enough of HTTP/1 framing to find the next head:
//! fixed-length bodies, chunked bodies and trailers. It never stops
//! following a connection that hyper's HTTP/1 parser still reads, since
//! what it let pass unread would be the next request: a head it cannot
//! frame (an invalid length, a final coding other than chunked, a version
//! other than 1.x) is refused like an ambiguous one, and after a chunked
//! body's framing line it cannot follow (a bad size, data longer than its
//! size) it releases nothing more: hyper sees the connection end there. A
//! long chunk extension or trailer line is followed to its end, however
//! long (hyper has its own limits on them), keeping only its start. It
//! steps aside only when the bytes are no longer HTTP/1: for a client that
//! opened with HTTP/2's preface, and after a `101 Switching Protocols`,
//! when they belong to a tunnel (the service flips [`Upgraded`]). A head
//! longer than hyper's buffer is hyper's to refuse (431), and it closes
//! the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How much of a chunk-size or trailer line the guard keeps: the size and
/// whether the line is empty are at its start; the rest is passed on unkept.
const MAX_LINE: usize = 256;

/// What a client connection speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x (or nothing valid: hyper's HTTP/1 parser answers it).
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
}

/// Set by the service when the connection has switched protocols.
#[derive(Clone, Debug, Default)]
pub struct Upgraded(Arc<AtomicBool>);

impl Upgraded {
    /// Marks the connection as tunnelled from now on.
    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The connection timeouts a [`FramingGuard`] enforces.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// `gateway.header_read_timeout`, for the first head.
    pub header_read: Duration,
    /// `gateway.send_timeout`.
    pub send: Duration,
}

/// Wraps a client connection; see the module documentation.
#[derive(Debug)]
pub struct FramingGuard<T> {
    io: T,
    scanner: Scanner,
    /// Scanned bytes not yet handed to the reader, from `at` on.
    ready: Vec<u8>,
    at: usize,
    /// Bytes read to tell the protocol, not yet scanned, from `unscanned_at` on.
    unscanned: Vec<u8>,
    unscanned_at: usize,
    upgraded: Upgraded,
    send_timeout: Duration,
    /// Runs until the first request head is complete (or HTTP/2 is
    /// spoken): a client that connects and sends nothing, or not enough
    /// for hyper to start on, is cut at the header read timeout too.
    first_head: Option<Pin<Box<Sleep>>>,
    /// Runs while a write waits for the client to read; created on the
    /// first such wait and re-armed for the next.
    stall: Option<Pin<Box<Sleep>>>,
    stalled: bool,
}

impl<T> FramingGuard<T> {
    /// Guards `io`; heads longer than `max_head` bytes are left to hyper.
    /// A write that cannot make progress for the send timeout (the client
    /// reads nothing) fails, and the connection with it; so does a read
    /// when the first request head is not in by the header read timeout.
    pub fn new(io: T, max_head: usize, upgraded: Upgraded, timeouts: Timeouts) -> Self {
        FramingGuard {
            first_head: Some(Box::pin(tokio::time::sleep(timeouts.header_read))),
            send_timeout: timeouts.send,
            io,
            scanner: Scanner::new(max_head),
            ready: Vec::new(),
            at: 0,
            unscanned: Vec::new(),
            unscanned_at: 0,
            upgraded,
            stall: None,
            stalled: false,
        }
    }

    /// Reads from the connection, the bytes read to tell the protocol first.
    fn poll_io(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>>
    where
        T: AsyncRead + Unpin,
    {
        if self.unscanned_at < self.unscanned.len() {
            let rest = &self.unscanned[self.unscanned_at..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.unscanned_at += n;
            if self.unscanned_at == self.unscanned.len() {
                self.unscanned = Vec::new();
                self.unscanned_at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }

    /// Which protocol the client speaks: HTTP/2 when it opens with the
    /// HTTP/2 preface, else HTTP/1 (hyper's parser judges what it is).
    /// What it reads stays to be read. Fails when the first request head
    /// is not in by the header read timeout.
    pub async fn protocol(&mut self) -> io::Result<Protocol>
    where
        T: AsyncRead + Unpin,
    {
        std::future::poll_fn(|cx| self.poll_protocol(cx)).await
    }

    fn poll_protocol(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Protocol>>
    where
        T: AsyncRead + Unpin,
    {
        const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        loop {
            let seen = &self.unscanned[..self.unscanned.len().min(PREFACE.len())];
            if seen != &PREFACE[..seen.len()] {
                return Poll::Ready(Ok(Protocol::Http1));
            }
            if seen.len() == PREFACE.len() {
                // Frames, not HTTP/1 messages, from here on.
                self.scanner.stop(&mut self.ready);
                return Poll::Ready(Ok(Protocol::Http2));
            }
            let mut chunk = [0u8; 4096];
            let mut buf = ReadBuf::new(&mut chunk);
            match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    // Closed early; hyper sees the same end.
                    return Poll::Ready(Ok(Protocol::Http1));
                }
                Poll::Ready(Ok(())) => self.unscanned.extend_from_slice(buf.filled()),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    let timer = self.first_head.as_mut().map(|t| t.as_mut().poll(cx));
                    if timer.is_some_and(|t| t.is_ready()) {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no request head within gateway.header_read_timeout",
                        )));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Passes a write's result on, failing one that has waited past the
    /// send timeout.
    fn watch<R>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if poll.is_ready() {
            self.stalled = false;
            return poll;
        }
        let deadline = Instant::now() + self.send_timeout;
        let stall = match &mut self.stall {
            Some(stall) => {
                if !self.stalled {
                    stall.as_mut().reset(deadline);
                }
                stall
            }
            None => self
                .stall
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.stalled = true;
        if stall.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing within gateway.send_timeout",
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FramingGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = this.read_scanned(cx, buf);
        if let Some(first_head) = &mut this.first_head {
            if this.scanner.heads > 0 || this.scanner.is_off() {
                // hyper's header read timeout takes over from here.
                this.first_head = None;
            } else if poll.is_pending() && first_head.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request head within gateway.header_read_timeout",
                )));
            }
        }
        poll
    }
}

impl<T: AsyncRead + Unpin> FramingGuard<T> {
    fn read_scanned(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self;
        if buf.remaining() == 0 {
            // Nothing can be read into a full buffer; an empty read here
            // must not be taken for the end of the stream below.
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.at < this.ready.len() {
                let n = (this.ready.len() - this.at).min(buf.remaining());
                buf.put_slice(&this.ready[this.at..this.at + n]);
                this.at += n;
                if this.at == this.ready.len() {
                    this.ready.clear();
                    this.at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.upgraded.get() {
                this.scanner.stop(&mut this.ready);
            }
            if this.scanner.is_off() && this.ready.is_empty() {
                return this.poll_io(cx, buf);
            }
            if this.scanner.is_refused() && this.ready.is_empty() {
                // hyper reads the end of the connection here.
                return Poll::Ready(Ok(()));
            }
            if !this.ready.is_empty() {
                continue;
            }
            let before = buf.filled().len();
            ready!(this.poll_io(cx, buf))?;
            if buf.filled().len() == before {
                // End of stream: a held partial head goes to hyper as it is.
                this.scanner.stop(&mut this.ready);
                if this.ready.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let held = this.scanner.held();
            this.scanner.feed(&buf.filled()[before..], &mut this.ready);
            if held == 0
                && this.scanner.held() == 0
                && this.ready.len() == buf.filled().len() - before
            {
                // Released unchanged (the scanner only ever holds bytes back
                // or adds a line): they are already where the reader wants them.
                this.ready.clear();
                return Poll::Ready(Ok(()));
            }
            buf.set_filled(before);
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramingGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_shutdown(cx);
        this.watch(cx, poll)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Collecting a request head (held back until it is complete).
    Head,
    /// Bytes left of a `Content-Length` body.
    Fixed(u64),
    /// Collecting a chunk-size line.
    ChunkSize,
    /// Bytes left of a chunk's data.
    ChunkData(u64),
    /// The line break after a chunk's data.
    ChunkEnd,
    /// Trailer lines after the last chunk, up to an empty line.
    Trailers,
    /// No longer inspecting this connection: it speaks HTTP/2, is a
    /// tunnel, or ended.
    Off,
    /// Nothing more is released: what came last cannot be framed.
    Refused,
}

/// What a request head says about its body.
#[derive(Debug, Default)]
struct Head {
    /// Whether the request line has been seen.
    started: bool,
    content_length: Option<Result<u64, ()>>,
    /// Whether the last transfer coding named is `chunked`, if any is.
    chunked: Option<bool>,
    /// How often `chunked` is named (more than once is invalid).
    chunked_codings: usize,
    http2: bool,
    /// Why the head must be refused, once that is known.
    refuse: Option<&'static str>,
}

#[derive(Debug)]
struct Scanner {
    state: State,
    /// The current line of a head or of a chunked body's framing.
    line: Vec<u8>,
    /// How much of `line` has been released.
    released: usize,
    head: Head,
    max_head: usize,
    /// Request heads completed so far.
    heads: usize,
}

impl Scanner {
    fn new(max_head: usize) -> Self {
        Scanner {
            state: State::Head,
            line: Vec::new(),
            released: 0,
            head: Head::default(),
            max_head,
            heads: 0,
        }
    }

    fn is_off(&self) -> bool {
        self.state == State::Off
    }

    fn is_refused(&self) -> bool {
        self.state == State::Refused
    }

    /// Bytes scanned but not yet released.
    fn held(&self) -> usize {
        match self.state {
            State::Head => self.line.len() - self.released,
            _ => 0,
        }
    }

    /// Stops inspecting; anything held is released to `out` unchanged.
    fn stop(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.line[self.released..]);
        self.line.clear();
        self.released = 0;
        self.state = State::Off;
    }

    /// Scans `input`, appending to `out` what can be released (with an
    /// invalid header added to a head with both framings).
    fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            match self.state {
                State::Off => {
                    out.extend_from_slice(input);
                    return;
                }
                State::Refused => return,
                State::Fixed(left) | State::ChunkData(left) => {
                    let take = usize::try_from(left).map_or(input.len(), |l| l.min(input.len()));
                    out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    let left = left - take as u64;
                    self.state = match (self.state, left) {
                        (State::Fixed(_), 0) => State::Head,
                        (State::Fixed(_), _) => State::Fixed(left),
                        (_, 0) => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                }
                State::Head => {
                    let (piece, rest) = split_line(input);
                    input = rest;
                    self.line.extend_from_slice(piece);
                    let ended = piece.ends_with(b"\n");
                    if ended && trim_eol(&self.line).is_empty() {
                        self.blank_line(out);
                    } else if self.line.len() > self.max_head {
                        // hyper answers 431 for this; nothing left to follow.
                        self.stop(out);
                    } else if self.line != b"\r" {
                        // Released at once, except a lone CR that may begin
                        // the empty line ending the head.
                        out.extend_from_slice(&self.line[self.released..]);
                        self.released = self.line.len();
                        if ended {
                            self.head_line();
                        }
                    }
                }
                State::ChunkSize | State::ChunkEnd | State::Trailers => {
                    let (line, rest) = split_line(input);
                    input = rest;
                    out.extend_from_slice(line);
                    let room = MAX_LINE.saturating_sub(self.line.len());
                    self.line.extend_from_slice(&line[..line.len().min(room)]);
                    if line.ends_with(b"\n") {
                        self.body_line();
                        self.line.clear();
                    }
                }
            }
        }
    }

    /// A line of a head other than the empty one has ended.
    fn head_line(&mut self) {
        if !self.line.ends_with(b"\r\n") {
            self.head.refuse = Some("a line of its head ends in a bare LF");
        }
        if self.head.started {
            self.header();
        } else {
            self.head.started = true;
            self.head.http2 = trim_eol(&self.line).ends_with(b" HTTP/2.0");
        }
        self.line.clear();
        self.released = 0;
    }

    /// An empty line has ended: before a request line it is ignored (as RFC
    /// 9112 allows), after one it ends the head.
    fn blank_line(&mut self, out: &mut Vec<u8>) {
        let mut head = std::mem::take(&mut self.head);
        self.heads += usize::from(head.started);
        if head.started && !self.line.ends_with(b"\r\n") {
            head.refuse = Some("a line of its head ends in a bare LF");
        }
        if head.content_length.is_some() && head.chunked.is_some() {
            head.refuse = Some("it has both Content-Length and Transfer-Encoding");
        }
        if head.chunked_codings > 1 {
            head.refuse = Some("it names the chunked coding more than once");
        }
        if head.http2 {
            head.refuse = Some("its request line says HTTP/2.0");
        }
        match (head.content_length, head.chunked) {
            (Some(Err(())), _) => head.refuse = Some("its Content-Length is invalid"),
            (_, Some(false)) => head.refuse = Some("its final transfer coding is not chunked"),
            _ => {}
        }
        let next = match (head.content_length, head.chunked) {
            _ if !head.started => State::Head,
            _ if head.refuse.is_some() => {
                // A header line without a colon: hyper refuses the head.
                out.extend_from_slice(b"ambiguous-framing\r\n");
                tracing::debug!(
                    reason = head.refuse,
                    "refused a request whose framing is ambiguous"
                );
                State::Refused
            }
            (None, Some(true)) => State::ChunkSize,
            (Some(Ok(0)), None) | (None, None) => State::Head,
            (Some(Ok(length)), None) => State::Fixed(length),
            // Refused above.
            _ => State::Refused,
        };
        out.append(&mut self.line);
        self.released = 0;
        self.state = next;
    }

    /// Notes the framing headers.
    fn header(&mut self) {
        let line = trim_eol(&self.line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return;
        };
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
            self.head.chunked = Some(trim(last).eq_ignore_ascii_case(b"chunked"));
            self.head.chunked_codings += value
                .split(|&b| b == b',')
                .filter(|coding| trim(coding).eq_ignore_ascii_case(b"chunked"))
                .count();
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let length = parse_decimal(value);
            match self.head.content_length {
                None => self.head.content_length = Some(length),
                Some(previous) if previous != length => self.head.content_length = Some(Err(())),
                Some(_) => {}
            }
        }
    }

    /// A framing line of a chunked body has ended at the end of `self.line`.
    fn body_line(&mut self) {
        let text = trim_eol(&self.line);
        self.state = match self.state {
            State::ChunkSize => {
                let digits = text
                    .iter()
                    .position(|&b| b == b';' || b == b' ' || b == b'\t')
                    .map_or(text, |end| &text[..end]);
                match parse_hex(digits) {
                    Some(0) => State::Trailers,
                    Some(size) => State::ChunkData(size),
                    None => State::Refused,
                }
            }
            State::ChunkEnd if text.is_empty() => State::ChunkSize,
            State::Trailers if text.is_empty() => State::Head,
            State::Trailers => State::Trailers,
            _ => State::Refused,
        };
    }
}

/// The input up to and including the first line feed, and the rest.
fn split_line(input: &[u8]) -> (&[u8], &[u8]) {
    match input.iter().position(|&b| b == b'\n') {
        Some(end) => input.split_at(end + 1),
        None => (input, &[]),
    }
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim(value: &[u8]) -> &[u8] {
    let start = value.iter().position(|b| !b.is_ascii_whitespace());
    let end = value.iter().rposition(|b| !b.is_ascii_whitespace());
    match (start, end) {
        (Some(start), Some(end)) => &value[start..=end],
        _ => &[],
    }
}

fn parse_decimal(digits: &[u8]) -> Result<u64, ()> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(());
    }
    digits.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
            .ok_or(())
    })
}

fn parse_hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let digit = (d as char).to_digit(16)?;
        n.checked_mul(16)?.checked_add(u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns what was released
    /// and the final state.
    fn scan(input: &[u8], step: usize) -> (Vec<u8>, State) {
        let mut scanner = Scanner::new(64 * 1024);
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            scanner.feed(piece, &mut out);
        }
        (out, scanner.state)
    }

    const KEEP_ALIVE: &[u8] = b"\r\nPOST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
        POST /b HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
        5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: t\r\n\r\n\
        GET /c HTTP/1.1\r\n\r\n";

    #[test]
    fn follows_fixed_and_chunked_bodies_across_requests() {
        for step in [1, 2, 7, KEEP_ALIVE.len()] {
            let (out, state) = scan(KEEP_ALIVE, step);
            assert_eq!(out, KEEP_ALIVE, "step {step}");
            assert_eq!(state, State::Head, "step {step}");
        }
    }

    #[test]
    fn refuses_a_head_with_both_framings_in_either_order() {
        for head in [
            &b"POST / HTTP/1.1\r\ncontent-length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            &b"POST / HTTP/1.1\nTransfer-Encoding: chunked\nContent-Length: 3\n\n"[..],
        ] {
            // After a harmless request on the same connection, too.
            let input = [&b"GET / HTTP/1.1\r\n\r\n"[..], head, b"0\r\n\r\n"].concat();
            for step in [1, 5, input.len()] {
                let (out, state) = scan(&input, step);
                assert_eq!(state, State::Refused);
                let text = String::from_utf8(out).unwrap();
                let (before, blank) = text.rsplit_once("ambiguous-framing\r\n").unwrap();
                // Released up to the end of the refused head, nothing after it.
                assert_eq!(
                    format!("{before}{blank}").as_bytes(),
                    &input[..input.len() - 5]
                );
                assert!(blank == "\n" || blank == "\r\n", "{blank}");
            }
        }
    }

    #[test]
    fn holds_back_only_the_empty_line_that_ends_a_head() {
        let mut scanner = Scanner::new(1024);
        let mut out = Vec::new();
        scanner.feed(b"GET / HTTP/1.1\r\nHost: x", &mut out);
        assert_eq!(out, b"GET / HTTP/1.1\r\nHost: x");
        scanner.feed(b"\r\n\r", &mut out);
        assert_eq!(out, b"GET / HTTP/1.1\r\nHost: x\r\n");
        scanner.feed(b"\n", &mut out);
        assert_eq!(out, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    #[test]
    fn leaves_an_oversized_head_to_hyper() {
        let mut scanner = Scanner::new(16);
        let mut out = Vec::new();
        scanner.feed(b"GET / HTTP/1.1\r\nX-Long: aaaaaaaaaaaa", &mut out);
        assert_eq!(scanner.state, State::Off);
        assert_eq!(out, b"GET / HTTP/1.1\r\nX-Long: aaaaaaaaaaaa");
    }

    #[test]
    fn refuses_heads_it_cannot_frame_and_releases_nothing_after_them() {
        for bad in [
            &b"POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
        ] {
            let after = b"GET /next HTTP/1.1\r\n\r\n";
            let (out, state) = scan(&[bad, after].concat(), 1);
            assert_eq!(state, State::Refused);
            let (head, blank) = bad.split_at(bad.len() - 2);
            assert_eq!(out, [head, b"ambiguous-framing\r\n", blank].concat());
        }
    }

    #[test]
    fn releases_nothing_after_a_chunk_line_it_cannot_follow() {
        for (bad, line) in [
            (&b"zz\r\n"[..], &b"zz\r\n"[..]),
            (b"1\r\nab\r\n", b"1\r\nab\r\n"),
            (b"1\r\na\r\n0x\r\n", b"1\r\na\r\n0x\r\n"),
        ] {
            let head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
            let after = b"0\r\n\r\nGET /next HTTP/1.1\r\n\r\n";
            let (out, state) = scan(&[&head[..], bad, after].concat(), 3);
            assert_eq!(state, State::Refused);
            // What was read in the same piece as the bad line may follow it.
            assert!(out.starts_with(&[&head[..], line].concat()));
            assert!(!String::from_utf8_lossy(&out).contains("/next"));
        }
    }

    #[test]
    fn follows_chunk_extensions_and_trailers_of_any_length() {
        let long = "x".repeat(64 * 1024);
        let input = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
             3;ext={long}\r\nabc\r\n0\r\nX-Trailer: {long}\r\n\r\n\
             POST /b HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        for step in [1, 1000, input.len()] {
            let (out, state) = scan(input.as_bytes(), step);
            assert_eq!(state, State::Refused, "step {step}");
            assert!(
                String::from_utf8_lossy(&out).ends_with("ambiguous-framing\r\n\r\n"),
                "step {step}"
            );
        }
    }

    fn timeouts() -> Timeouts {
        Timeouts {
            header_read: Duration::from_secs(10),
            send: Duration::from_secs(10),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tells_the_protocol_from_the_first_bytes_and_keeps_them() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let cases: [(&'static [u8], Protocol); 4] = [
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Protocol::Http1),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12",
                Protocol::Http2,
            ),
            (b"PRI * HTTP/1.1\r\n\r\n", Protocol::Http1),
            (b"", Protocol::Http1),
        ];
        for (input, protocol) in cases {
            for step in [1, 5, input.len().max(1)] {
                let (mut client, server) = tokio::io::duplex(64);
                let mut guard = FramingGuard::new(server, 1024, Upgraded::default(), timeouts());
                tokio::spawn(async move {
                    for piece in input.chunks(step) {
                        client.write_all(piece).await.unwrap();
                        tokio::task::yield_now().await;
                    }
                });
                assert_eq!(guard.protocol().await.unwrap(), protocol, "step {step}");
                let mut read = Vec::new();
                guard.read_to_end(&mut read).await.unwrap();
                assert_eq!(read, input, "step {step}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_finishes_the_preface_is_cut_at_the_header_read_timeout() {
        use tokio::io::AsyncWriteExt;
        for sent in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
            let (mut client, server) = tokio::io::duplex(64);
            client.write_all(sent).await.unwrap();
            let mut guard = FramingGuard::new(server, 1024, Upgraded::default(), timeouts());
            let started = Instant::now();
            let error = guard.protocol().await.unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::TimedOut);
            assert_eq!(started.elapsed(), timeouts().header_read);
        }
    }

    #[test]
    fn number_parsing_refuses_overflow_and_junk() {
        assert_eq!(parse_decimal(b"18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_decimal(b"18446744073709551616"), Err(()));
        assert_eq!(parse_decimal(b"+1"), Err(()));
        assert_eq!(parse_hex(b"fFfFfFfFfFfFfFfF"), Some(u64::MAX));
        assert_eq!(parse_hex(b"1_0000000000000000"), None);
        assert_eq!(parse_hex(b"10000000000000000"), None);
    }
}
