//! HTTP/1.1 bodies on the wire, for the upstream client (`proxy::h1`) and
//! the server (`http::h1`) alike: the chunked decoder, the writer of a head
//! and its body (by length, chunked with declared trailers, or until
//! close), and the socket reads that grow with what comes.

use std::fmt;
use std::future::Future as _;
use std::io::{self, Write as _};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::http::body::{BoxError, ProxyBody};

/// Where a field's name and value lie in a head: start and end of each.
pub(crate) type Span = [u32; 4];

/// Notes in `spans` where each of `fields`, parsed by httparse from the
/// buffer starting at `base`, lies in it: the head is then frozen and its
/// fields sliced from it. (A head is far below 4 GiB: offsets fit a u32.)
pub(crate) fn note_spans(base: *const u8, fields: &[httparse::Header<'_>], spans: &mut Vec<Span>) {
    let offset = |at: *const u8| (at as usize - base as usize) as u32;
    spans.clear();
    spans.extend(fields.iter().map(|field| {
        let name = offset(field.name.as_ptr());
        let value = offset(field.value.as_ptr());
        [
            name,
            name + field.name.len() as u32,
            value,
            value + field.value.len() as u32,
        ]
    }));
}

/// A message that breaks HTTP/1.1's grammar or a limit: what is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Invalid(pub &'static str);

/// Why writing a message failed.
#[derive(Debug)]
pub(crate) enum WriteError {
    /// The socket failed.
    Io(io::Error),
    /// The body failed.
    Body(BoxError),
    /// The body's length is not the one its head declares.
    BodyLength,
}

/// Header fields in a head at most, as hyper.
pub(crate) const MAX_HEADERS: usize = 100;

/// A chunked body's trailer section and chunk extensions at most, each.
pub(crate) const MAX_TRAILERS: usize = 16 * 1024;
pub(crate) const MAX_EXTENSIONS: u64 = 16 * 1024;

/// Body bytes gathered into one write with the head, at most.
pub(crate) const COALESCE: usize = 64 * 1024;

/// What a read asks the socket for at least, and at most: a body's reads
/// grow from the one to the other while each fills what it asked for (as
/// hyper's do), and shrink back when they come in small.
pub(crate) const READ_SIZE: usize = 8192;
pub(crate) const MAX_READ_SIZE: usize = 64 * 1024;

/// Reads what the socket has into `read`, asking for `size` bytes, which
/// it adapts to what came; 0 at its end.
pub(crate) fn poll_fill<S: AsyncRead + Unpin>(
    io: &mut S,
    read: &mut BytesMut,
    size: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if read.capacity() - read.len() < *size / 4 {
        read.reserve(*size);
    }
    let reading = io.read_buf(read);
    tokio::pin!(reading);
    let n = ready!(reading.poll(cx))?;
    if n >= *size {
        *size = (*size * 2).min(MAX_READ_SIZE);
    } else if n < *size / 8 {
        *size = (*size / 2).max(READ_SIZE);
    }
    Poll::Ready(Ok(n))
}

/// The content-length every value of the field agrees on (each a list
/// of decimal numbers).
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut length = Length::default();
    for value in headers.get_all(header::CONTENT_LENGTH) {
        length.add(value.as_bytes());
    }
    length.get()
}

/// A `content-length` read field by field: the number every value agrees
/// on (each a list of decimal numbers), or none.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Length {
    seen: Option<u64>,
    invalid: bool,
}

impl Length {
    /// One more field's value.
    pub(crate) fn add(&mut self, value: &[u8]) {
        for part in value.split(|&b| b == b',') {
            match decimal(part.trim_ascii()) {
                Some(n) if self.seen.is_none_or(|l| l == n) => self.seen = Some(n),
                _ => self.invalid = true,
            }
        }
    }

    /// The length, if every value gave the same one.
    pub(crate) fn get(&self) -> Option<u64> {
        self.seen.filter(|_| !self.invalid)
    }
}

/// Digits only, at least one, within a u64.
pub(crate) fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let d = d.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// Whether a comma-separated field value has `token` (an ASCII word), in
/// any case.
#[inline(never)] // one copy, not one in each head's field loop
pub(crate) fn has_token(value: &[u8], token: &str) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// The comma-separated tokens of a field value, trimmed.
pub(crate) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// How a body is framed on the wire.
#[derive(Debug)]
pub(crate) enum Framing {
    /// `content-length`: the bytes still to send.
    Length(u64),
    /// Chunked; the trailer fields that may be sent.
    Chunked(Vec<HeaderName>),
    /// Until the connection closes (an HTTP/1.0 client's answer of no
    /// known length).
    Close,
}

/// A message on its way out: its encoded head, then its body.
pub(crate) struct Writer {
    out: Vec<u8>,
    written: usize,
    body: Option<ProxyBody>,
    framing: Framing,
}

impl Writer {
    /// A message whose head is `out`, its body to follow as `framing` says.
    pub(crate) fn new(out: Vec<u8>, body: Option<ProxyBody>, framing: Framing) -> Self {
        Writer {
            out,
            written: 0,
            body,
            framing,
        }
    }

    /// Its buffer, emptied, to encode the next message in.
    pub(crate) fn into_buffer(self) -> Vec<u8> {
        let mut out = self.out;
        out.clear();
        out
    }

    /// Whether all of it is written.
    pub(crate) fn done(&self) -> bool {
        self.body.is_none() && self.written == self.out.len()
    }

    /// Writes what there is: the head, and the body as it comes, a
    /// buffer's worth of what is ready at a time.
    pub(crate) fn poll<S: AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), WriteError>> {
        use http_body::Body as _;
        loop {
            while self.out.len() - self.written < COALESCE {
                let Some(body) = &mut self.body else { break };
                match Pin::new(body).poll_frame(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => self.data(data)?,
                        Err(frame) => {
                            if let Ok(trailers) = frame.into_trailers() {
                                self.end(Some(&trailers))?;
                            }
                        }
                    },
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(WriteError::Body(e))),
                    Poll::Ready(None) => self.end(None)?,
                }
            }
            if self.written == self.out.len() {
                self.out.clear();
                self.written = 0;
                return if self.body.is_none() {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
            while self.written < self.out.len() {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.out[self.written..]))
                    .map_err(WriteError::Io)?;
                if n == 0 {
                    return Poll::Ready(Err(WriteError::Io(io::ErrorKind::WriteZero.into())));
                }
                self.written += n;
            }
            self.out.clear();
            self.written = 0;
        }
    }

    fn data(&mut self, data: Bytes) -> Result<(), WriteError> {
        match &mut self.framing {
            Framing::Length(left) => {
                *left = left
                    .checked_sub(data.len() as u64)
                    .ok_or(WriteError::BodyLength)?;
                self.out.extend_from_slice(&data);
            }
            Framing::Close => self.out.extend_from_slice(&data),
            Framing::Chunked(_) if data.is_empty() => {}
            Framing::Chunked(_) => {
                let _ = write!(self.out, "{:x}\r\n", data.len());
                self.out.extend_from_slice(&data);
                self.out.extend_from_slice(b"\r\n");
            }
        }
        Ok(())
    }

    /// The body's end, with its trailers if it has any.
    fn end(&mut self, trailers: Option<&HeaderMap>) -> Result<(), WriteError> {
        self.body = None;
        match &self.framing {
            Framing::Length(0) | Framing::Close => Ok(()),
            Framing::Length(_) => Err(WriteError::BodyLength),
            Framing::Chunked(allowed) => {
                self.out.extend_from_slice(b"0\r\n");
                for (name, value) in trailers.into_iter().flatten() {
                    if allowed.contains(name) {
                        field(&mut self.out, name, value.as_bytes());
                    }
                }
                self.out.extend_from_slice(b"\r\n");
                Ok(())
            }
        }
    }
}

/// `name: value` and its line end.
#[inline(never)] // one copy: a head's writers call it for several fields
pub(crate) fn field(out: &mut Vec<u8>, name: &HeaderName, value: &[u8]) {
    let name = name.as_str().as_bytes();
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The fields a head's `Trailer` names: the only trailers sent.
pub(crate) fn trailer_names(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::TRAILER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

/// How the rest of a body is read.
#[derive(Debug)]
pub(crate) enum Decoder {
    /// This many bytes more.
    Length(u64),
    Chunked(Box<Chunked>),
    /// Until the upstream closes the connection.
    UntilClose,
}

impl Decoder {
    /// Decodes what `read` holds of the body: a frame of it, `More` when
    /// it needs more bytes, `End` at its end (for a body read until
    /// close, the caller sees the close). After the last data of a
    /// length, [`is_done`](Self::is_done) says so at once.
    pub(crate) fn decode(&mut self, read: &mut BytesMut) -> Result<Step, Invalid> {
        match self {
            Decoder::Length(0) => Ok(Step::End),
            Decoder::Length(_) | Decoder::UntilClose if read.is_empty() => Ok(Step::More),
            Decoder::Length(left) => {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(read.len());
                *left -= n as u64;
                Ok(Step::Data(read.split_to(n).freeze()))
            }
            Decoder::UntilClose => Ok(Step::Data(read.split().freeze())),
            Decoder::Chunked(chunked) => chunked.step(read),
        }
    }

    /// Whether a body of known length has been read to its end.
    pub(crate) fn is_done(&self) -> bool {
        matches!(self, Decoder::Length(0))
    }
}

/// Where a chunked body's reading is.
#[derive(Debug, Default)]
pub(crate) struct Chunked {
    state: ChunkState,
    size: u64,
    extensions: u64,
    trailers: Option<BytesMut>,
    trailer_lines: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
    End,
}

/// What a step of the chunked decoder gives.
pub(crate) enum Step {
    /// Needs more bytes.
    More,
    Data(Bytes),
    Trailers(HeaderMap),
    End,
}

impl Chunked {
    /// Decodes from `read` as far as its bytes go.
    pub(crate) fn step(&mut self, read: &mut BytesMut) -> Result<Step, Invalid> {
        use ChunkState::*;
        loop {
            if self.state == End {
                return Ok(Step::End);
            }
            if self.state == Data {
                if read.is_empty() {
                    return Ok(Step::More);
                }
                let n = usize::try_from(self.size)
                    .unwrap_or(usize::MAX)
                    .min(read.len());
                self.size -= n as u64;
                if self.size == 0 {
                    self.state = DataCr;
                }
                return Ok(Step::Data(read.split_to(n).freeze()));
            }
            if read.is_empty() {
                return Ok(Step::More);
            }
            let byte = read[0];
            read.advance(1);
            self.state = match (self.state, byte) {
                (Start | Size, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                    let digit = (byte as char).to_digit(16).expect("a hex digit");
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(u64::from(digit)))
                        .ok_or(Invalid("chunk size overflows"))?;
                    Size
                }
                (Start, _) => return Err(Invalid("chunk size line without a size")),
                (Size | SizeLws, b'\t' | b' ') => SizeLws,
                (Size | SizeLws, b';') => Extension,
                (Size | SizeLws, b'\r') => SizeLf,
                (Size | SizeLws, _) => return Err(Invalid("invalid chunk size line")),
                (Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return Err(Invalid("chunk extension with a newline")),
                (Extension, _) => {
                    self.extensions += 1;
                    if self.extensions >= MAX_EXTENSIONS {
                        return Err(Invalid("chunk extensions over their limit"));
                    }
                    Extension
                }
                (SizeLf, b'\n') if self.size == 0 => EndCr,
                (SizeLf, b'\n') => Data,
                (SizeLf, _) => return Err(Invalid("invalid chunk size line end")),
                (DataCr, b'\r') => DataLf,
                (DataCr, _) => return Err(Invalid("chunk data without CRLF")),
                (DataLf, b'\n') => Start,
                (DataLf, _) => return Err(Invalid("chunk data without CRLF")),
                (EndCr, b'\r') => {
                    self.trailer_byte(byte)?;
                    EndLf
                }
                (EndCr, _) => {
                    self.trailers.get_or_insert_with(BytesMut::new);
                    self.trailer_byte(byte)?;
                    Trailer
                }
                (Trailer, b'\r') => {
                    self.trailer_byte(byte)?;
                    TrailerLf
                }
                (Trailer, _) => {
                    self.trailer_byte(byte)?;
                    Trailer
                }
                (TrailerLf, b'\n') => {
                    if self.trailer_lines >= MAX_HEADERS {
                        return Err(Invalid("too many trailer fields"));
                    }
                    self.trailer_lines += 1;
                    self.trailer_byte(byte)?;
                    EndCr
                }
                (TrailerLf, _) => return Err(Invalid("invalid trailer line end")),
                (EndLf, b'\n') => {
                    self.state = End;
                    return match self.trailers.take() {
                        None => Ok(Step::End),
                        Some(mut section) => {
                            section.extend_from_slice(b"\n");
                            let lines = self.trailer_lines;
                            Ok(Step::Trailers(parse_trailers(&section, lines)?))
                        }
                    };
                }
                (EndLf, _) => return Err(Invalid("invalid chunked body end")),
                (Data | End, _) => unreachable!("handled above"),
            };
        }
    }

    fn trailer_byte(&mut self, byte: u8) -> Result<(), Invalid> {
        if let Some(section) = &mut self.trailers {
            if section.len() >= MAX_TRAILERS {
                return Err(Invalid("trailer section too large"));
            }
            section.extend_from_slice(&[byte]);
        }
        Ok(())
    }
}

/// A trailer section's fields: as many at most as it has lines that end
/// in CRLF (as hyper, so that a bare LF makes no field of its own).
pub(crate) fn parse_trailers(section: &[u8], lines: usize) -> Result<HeaderMap, Invalid> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let fields = &mut fields[..lines.min(MAX_HEADERS)];
    let fields = match httparse::parse_headers(section, fields) {
        Ok(httparse::Status::Complete((_, fields))) => fields,
        _ => return Err(Invalid("malformed trailer section")),
    };
    let mut trailers = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| Invalid("invalid trailer name"))?;
        let value =
            HeaderValue::from_bytes(field.value).map_err(|_| Invalid("invalid trailer value"))?;
        trailers.append(name, value);
    }
    Ok(trailers)
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer")
            .field("pending", &(self.out.len() - self.written))
            .field("framing", &self.framing)
            .finish_non_exhaustive()
    }
}
