//! A lean HTTP/1.1 client for plain-HTTP upstreams, built for long streams.
//!
//! hyper-util's pooled client runs every upstream connection as a task of its own and hands the
//! response body to the proxy one chunk at a time through a channel. For a stream that costs two tasks
//! and a wake-up between them per chunk, a flush (one `writev`) per upstream chunk even when one read
//! brought many, and four buffers per stream (read and write on each connection, plus the request
//! channel). This client instead reads the response body in the task that forwards it:
//!
//! - no connection task and no channel: the body's `poll_frame` reads the socket;
//! - no buffer kept between reads: each read lands in a stack buffer and what it decodes to is copied
//!   into one frame of exactly that size, so an idle stream holds no read buffer, and everything one
//!   read brought goes to the client as one frame (which adds no delay: it arrived together);
//! - the request head is encoded into a short-lived buffer and written at once.
//!
//! Connections are pooled per endpoint (LIFO, at most [`MAX_IDLE`], closed after [`IDLE_TIMEOUT`]
//! unused) and reused only after a response whose framing (`Content-Length` or chunked) was read to its
//! exact end, from an HTTP/1.1 upstream that did not say `Connection: close`. A pooled connection is
//! checked with a non-blocking read before reuse; if one still fails before any response byte, a
//! request held whole (no body, or a small one) is sent again on a fresh connection. Dropping the body
//! (client gone, idle cut, shutdown) closes the connection at once. TLS and HTTP/2 upstreams use
//! hyper's client.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::body::UpstreamRequestBody;
use super::http1::{chunk_size_line, connection_has, content_length, header_map};

/// Idle connections kept per endpoint.
pub(crate) const MAX_IDLE: usize = 256;
/// An idle connection unused this long is closed instead of reused.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Largest response head accepted (nginx's default is 4–8 KiB; hyper's ~400 KiB).
const MAX_HEAD: usize = 64 * 1024;
/// How often idle connections are checked for being closed by the upstream.
const REAP_EVERY: Duration = Duration::from_secs(5);
/// Most headers in a response head.
const MAX_HEADERS: usize = 128;
/// One read's worth of body bytes.
const READ_SIZE: usize = 16 * 1024;
/// Request bodies of known length up to this size are read before sending, and sent with the head.
const SMALL_BODY: u64 = 64 * 1024;

/// Why a request did not get response headers.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection could be made: nothing was sent.
    Connect(io::Error),
    /// A reused connection failed before any byte of the response: it was closed by the upstream while
    /// idle. [`H1Endpoint::send`] resends on a fresh connection when it holds the whole request.
    Stale(io::Error),
    /// The connection failed, or the upstream answered something that is not HTTP/1.1, before the
    /// response head was complete.
    BeforeResponse(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "cannot connect: {e}"),
            SendError::Stale(e) => write!(f, "pooled connection was closed by the upstream: {e}"),
            SendError::BeforeResponse(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for SendError {}

/// The upstream connection pool of one plain-HTTP endpoint.
#[derive(Debug)]
pub(crate) struct H1Endpoint {
    /// `host:port` to connect to.
    authority: String,
    host_header: HeaderValue,
    connect_timeout: Duration,
    idle: Mutex<Vec<(TcpStream, Instant)>>,
    /// Whether the task that closes dead idle connections runs.
    reaper: AtomicBool,
}

impl H1Endpoint {
    pub(crate) fn new(authority: &http::uri::Authority, connect_timeout: Duration) -> Self {
        let port = authority.port_u16().unwrap_or(80);
        // As hyper-util sets it: the default port is left out.
        let host = if port == 80 {
            authority.host().to_string()
        } else {
            authority.as_str().to_string()
        };
        Self {
            authority: format!("{}:{port}", authority.host()),
            host_header: HeaderValue::from_str(&host)
                .unwrap_or(HeaderValue::from_static("localhost")),
            connect_timeout,
            idle: Mutex::new(Vec::new()),
            reaper: AtomicBool::new(false),
        }
    }

    /// Idle connections held now.
    #[cfg(test)]
    pub(crate) fn idle_len(&self) -> usize {
        self.idle.lock().map_or(0, |v| v.len())
    }

    fn checkout(&self) -> Option<TcpStream> {
        let mut idle = self.idle.lock().ok()?;
        while let Some((s, since)) = idle.pop() {
            if usable(&s, since) {
                return Some(s);
            }
        }
        None
    }

    fn checkin(self: &Arc<Self>, s: TcpStream) {
        if let Ok(mut idle) = self.idle.lock() {
            // Aged-out connections are closed by checkout and by the reaper, not here.
            if idle.len() < MAX_IDLE {
                idle.push((s, Instant::now()));
            }
        }
        // A load first: after the first check-in this is a read of a shared flag, not a write.
        if !self.reaper.load(Ordering::Relaxed) && !self.reaper.swap(true, Ordering::Relaxed) {
            // Close idle connections the upstream closed (else they sit in CLOSE_WAIT until the next
            // request) or that aged out, even when no request comes.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let weak = Arc::downgrade(self);
                rt.spawn(async move {
                    let mut tick = crate::timers::interval(REAP_EVERY);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tick.tick().await;
                        match weak.upgrade() {
                            Some(ep) => ep.reap(),
                            None => return,
                        }
                    }
                });
            }
        }
    }

    /// Closes the idle connections that cannot be used any more.
    fn reap(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.retain(|(s, since)| usable(s, *since));
        }
    }

    async fn connect(&self) -> Result<TcpStream, SendError> {
        let s =
            super::pool::connect_in_turn(self.authority.as_str(), self.connect_timeout, |addr| {
                TcpStream::connect(addr)
            })
            .await
            .map_err(SendError::Connect)?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }

    /// Sends `req` (origin-form target from its URI) and returns once the response head is read.
    ///
    /// A body of known length up to [`SMALL_BODY`] (an LLM request's JSON) is read first and goes out
    /// with the head in one write; then, if a pooled connection turns out to have been closed by the
    /// upstream while idle (no byte of a response before EOF or reset), the request is sent again on a
    /// fresh connection, as nginx does with a cached connection. A larger or chunked body is streamed
    /// after the head, and is not resent.
    pub(crate) async fn send(
        self: &Arc<Self>,
        req: Request<UpstreamRequestBody>,
    ) -> Result<Response<H1Body>, SendError> {
        let (parts, mut body) = req.into_parts();
        let (mut head, chunked) = encode_head(&parts, &body, &self.host_header);
        let method = parts.method.clone();
        // Freed once the head is written, while the upstream works: not between the response head's
        // arrival and its relay (about 800 instructions of header map and URI).
        let mut parts = Some(parts);
        let small = match body.size_hint().exact() {
            _ if body.is_end_stream() => true,
            Some(n) => n <= SMALL_BODY,
            None => false,
        };
        let mut fresh_only = false;
        let mut collected = body.is_end_stream();
        let (io, resp, rest) = loop {
            let pooled = if fresh_only { None } else { self.checkout() };
            let reused = pooled.is_some();
            let mut io = match pooled {
                Some(s) => s,
                None => self.connect().await?,
            };
            // Only once connected: a refused connection leaves the body unread, for the next
            // endpoint.
            if small && !collected {
                collected = true;
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| {
                        SendError::BeforeResponse(format!(
                            "reading the client's request body failed: {e}"
                        ))
                    })?;
                    if let Ok(data) = frame.into_data() {
                        head.extend_from_slice(&data);
                    }
                }
            }
            let before = |e: io::Error| {
                if reused {
                    SendError::Stale(e)
                } else {
                    SendError::BeforeResponse(format!("writing the request failed: {e}"))
                }
            };
            let sent = async {
                io.write_all(&head).await.map_err(before)?;
                if !small {
                    stream_body(&mut io, &mut body, chunked).await?;
                }
                drop(parts.take());
                read_head(&mut io, reused).await
            }
            .await;
            match sent {
                Ok((resp, rest)) => break (io, resp, rest),
                Err(SendError::Stale(e)) if small => {
                    tracing::debug!(upstream = %self.authority, "pooled connection was closed ({e}); resending");
                    fresh_only = true;
                }
                Err(SendError::Stale(e)) => {
                    return Err(SendError::BeforeResponse(format!(
                        "the pooled connection was closed by the upstream and the streamed body cannot be resent: {e}"
                    )))
                }
                Err(e) => return Err(e),
            }
        };
        let Some(framing) = framing(&method, &resp) else {
            // The connection is dropped here, closed with whatever else the upstream sent.
            return Err(SendError::BeforeResponse(
                "the upstream's response has an invalid content-length".into(),
            ));
        };
        let reusable = resp.version == Version::HTTP_11 && !connection_has(&resp.headers, "close");
        let mut body = H1Body {
            io: Some(io),
            framing,
            chunk: ChunkState::default(),
            pending: rest,
            reusable,
            endpoint: self.clone(),
        };
        if matches!(body.framing, Framing::Length(0) | Framing::Empty) {
            body.finish();
        }
        let mut out = Response::new(body);
        *out.status_mut() = resp.status;
        *out.version_mut() = resp.version;
        *out.headers_mut() = resp.headers;
        Ok(out)
    }
}

/// Streams the client's body after the head (chunked when its length is unknown).
async fn stream_body(
    io: &mut TcpStream,
    body: &mut UpstreamRequestBody,
    chunked: bool,
) -> Result<(), SendError> {
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            SendError::BeforeResponse(format!("reading the client's request body failed: {e}"))
        })?;
        let Ok(mut data) = frame.into_data() else {
            continue; // Trailers of the request are not forwarded.
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            // Size line, data and CRLF in one `writev`.
            let mut size = [0u8; 18];
            let size = chunk_size_line(&mut size, data.len());
            let mut chunk = bytes::Buf::chain(bytes::Buf::chain(size, data), &b"\r\n"[..]);
            io.write_all_buf(&mut chunk).await.map_err(write_err)?;
        } else {
            io.write_all_buf(&mut data).await.map_err(write_err)?;
        }
    }
    if chunked {
        io.write_all(b"0\r\n\r\n").await.map_err(write_err)?;
    }
    Ok(())
}

/// An idle connection can be reused: not too old, and nothing to read (EOF, an error or stray bytes
/// mean the upstream closed it or broke the protocol).
fn usable(s: &TcpStream, since: Instant) -> bool {
    if since.elapsed() >= IDLE_TIMEOUT {
        return false;
    }
    let mut probe = [0u8; 1];
    matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

fn write_err(e: io::Error) -> SendError {
    SendError::BeforeResponse(format!("writing the request body failed: {e}"))
}

/// The request head, and whether the body goes chunked.
fn encode_head(
    parts: &http::request::Parts,
    body: &UpstreamRequestBody,
    host: &HeaderValue,
) -> (Vec<u8>, bool) {
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = Vec::with_capacity(256 + 32 * parts.headers.len());
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !parts.headers.contains_key(header::HOST) {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut chunked = false;
    if body.is_end_stream() {
        if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
    } else if let Some(n) = body.size_hint().exact() {
        out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        chunked = true;
    }
    out.extend_from_slice(b"\r\n");
    (out, chunked)
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

/// Reads up to the end of the (final, non-1xx) response head; returns it and the bytes after it.
async fn read_head(io: &mut TcpStream, reused: bool) -> Result<(Head, Bytes), SendError> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let n = io.read_buf(&mut buf).await;
        let n = match n {
            Ok(n) => n,
            Err(e) if reused && buf.is_empty() => return Err(SendError::Stale(e)),
            Err(e) => {
                return Err(SendError::BeforeResponse(format!(
                    "reading the response head failed: {e}"
                )))
            }
        };
        if n == 0 {
            if reused && buf.is_empty() {
                return Err(SendError::Stale(io::ErrorKind::UnexpectedEof.into()));
            }
            return Err(SendError::BeforeResponse(
                "the upstream closed the connection before a complete response head".into(),
            ));
        }
        // Parse every complete head in the buffer: 1xx heads (100 Continue, 103 Early Hints) are
        // skipped.
        loop {
            let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut r = httparse::Response::new(&mut storage);
            let len = match r.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => break,
                Err(e) => {
                    return Err(SendError::BeforeResponse(format!(
                        "the upstream's response head is not valid HTTP/1.1: {e}"
                    )))
                }
            };
            let code = r.code.unwrap_or(0);
            let status = StatusCode::from_u16(code).map_err(|_| {
                SendError::BeforeResponse(format!("invalid status code {code} from the upstream"))
            })?;
            if status.is_informational() {
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(SendError::BeforeResponse(
                        "the upstream switched protocols, which streamgate does not proxy".into(),
                    ));
                }
                buf.advance(len);
                continue;
            }
            let version = if r.version == Some(0) {
                Version::HTTP_10
            } else {
                Version::HTTP_11
            };
            // Room for what the flush layer adds (X-Accel-Buffering, Cache-Control).
            let headers =
                header_map(r.headers, 2).map_err(|e| SendError::BeforeResponse(e.to_string()))?;
            buf.advance(len);
            let rest = buf.split().freeze();
            return Ok((
                Head {
                    status,
                    version,
                    headers,
                },
                rest,
            ));
        }
        if buf.len() >= MAX_HEAD {
            return Err(SendError::BeforeResponse(format!(
                "the upstream's response head is larger than {MAX_HEAD} bytes"
            )));
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
    }
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes: never reusable.
    Eof,
}

/// The framing of a response to `method` with head `h`; `None` when it is invalid: no
/// `Transfer-Encoding` and a `Content-Length` that is not one number. RFC 9112 §6.3: a proxy then
/// closes the connection to the server, discards the response and answers 502 (as nginx does).
fn framing(method: &Method, h: &Head) -> Option<Framing> {
    if method == Method::HEAD
        || h.status == StatusCode::NO_CONTENT
        || h.status == StatusCode::NOT_MODIFIED
    {
        return Some(Framing::Empty);
    }
    if let Some(te) = h
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
    {
        let last = te
            .to_str()
            .ok()
            .and_then(|s| s.rsplit(',').next())
            .map(|s| s.trim().to_ascii_lowercase());
        return Some(if last.as_deref() == Some("chunked") {
            Framing::Chunked
        } else {
            Framing::Eof
        });
    }
    if !h.headers.contains_key(header::CONTENT_LENGTH) {
        // No length: to the end, and the connection is not reused.
        return Some(Framing::Eof);
    }
    content_length(&h.headers).map(Framing::Length)
}

/// Incremental chunked decoder state (sizes and CRLFs; data bytes go straight to the output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ChunkState {
    /// At a chunk's start: its size line has no digit yet.
    #[default]
    Start,
    /// Reading a chunk size: the digits so far, at least one (a size line may span reads).
    Size(u64),
    SizeExt(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines; `true` when the current line is empty so far.
    Trailer(bool),
    TrailerLf(bool),
    Done,
}

/// The error of a response body that ended before its framing said it would.
#[derive(Debug)]
pub(crate) struct BodyError(String);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BodyError {}

/// The data of `input` when it is exactly one whole chunk of data, `<hex size>\r\n<data>\r\n`, read at
/// a chunk's start (`st`): what [`decode_chunked`] would give, without gathering it first. Anything
/// else (an extension, a bare LF, a cut chunk, more than one chunk, the last chunk) is `None`.
fn whole_chunk(st: ChunkState, input: &[u8]) -> Option<&[u8]> {
    if st != ChunkState::Start {
        return None;
    }
    // Sixteen hex digits hold any u64; a longer size is left to the decoder, which rejects it.
    let digits = input
        .iter()
        .take(16)
        .take_while(|b| b.is_ascii_hexdigit())
        .count();
    let n = input[..digits]
        .iter()
        .fold(0u64, |n, &b| n << 4 | hex_value(b));
    let rest = input[digits..].strip_prefix(b"\r\n")?;
    // Not zero (so at least one digit): the last chunk ends the message, which the decoder handles.
    let n = usize::try_from(n).ok().filter(|&n| n > 0)?;
    let (data, end) = (rest.get(..n)?, &rest[n..]);
    (end == b"\r\n").then_some(data)
}

/// The value of a hex digit (0 for any other byte: callers take only `is_ascii_hexdigit` bytes).
fn hex_value(b: u8) -> u64 {
    u64::from((b as char).to_digit(16).unwrap_or(0))
}

/// Decodes `input` into `out`; returns the bytes consumed (less than all when the message ended).
fn decode_chunked(
    st: &mut ChunkState,
    input: &[u8],
    out: &mut Vec<u8>,
) -> Result<usize, BodyError> {
    let bad = |what: &str| BodyError(format!("invalid chunked body from the upstream: {what}"));
    // After a size line: the chunk's data, or the trailer section after the last chunk.
    let sized = |n: u64| {
        if n == 0 {
            ChunkState::Trailer(true)
        } else {
            ChunkState::Data(n)
        }
    };
    let mut i = 0;
    while i < input.len() {
        // A size line's digits, all at once (and with its CRLF, the common shape, in one step), and
        // the CRLF after a chunk's data. Anything else (an extension, a line cut by the end of a
        // read, a bad byte) is taken byte by byte below.
        match *st {
            ChunkState::Start | ChunkState::Size(_) => {
                let mut n = match *st {
                    ChunkState::Size(n) => n,
                    _ => 0,
                };
                let digits = input[i..]
                    .iter()
                    .take_while(|b| b.is_ascii_hexdigit())
                    .count();
                if digits == 0 && *st == ChunkState::Start {
                    // RFC 9112: `chunk-size = 1*HEXDIG`. An empty size line is not a zero: read as
                    // one, garbage would end the body as if it were whole.
                    return Err(bad("chunk size"));
                }
                for &b in &input[i..i + digits] {
                    let d = hex_value(b);
                    n = n
                        .checked_mul(16)
                        .and_then(|v| v.checked_add(d))
                        .ok_or_else(|| bad("chunk size overflows"))?;
                }
                i += digits;
                *st = if digits > 0 && input[i..].starts_with(b"\r\n") {
                    i += 2;
                    sized(n)
                } else {
                    ChunkState::Size(n)
                };
                if i >= input.len() || !matches!(*st, ChunkState::Size(_)) {
                    continue;
                }
            }
            ChunkState::DataCr if input[i..].starts_with(b"\r\n") => {
                *st = ChunkState::default();
                i += 2;
                continue;
            }
            _ => {}
        }
        let b = input[i];
        match *st {
            // Handled above: a size line's first byte is a digit, or an error.
            ChunkState::Start => return Err(bad("chunk size")),
            // The digits were all taken above: what follows them.
            ChunkState::Size(n) => match b {
                b';' | b' ' | b'\t' => *st = ChunkState::SizeExt(n),
                b'\r' => *st = ChunkState::SizeLf(n),
                b'\n' => *st = sized(n),
                _ => return Err(bad("chunk size")),
            },
            ChunkState::SizeExt(n) => match b {
                b'\r' => *st = ChunkState::SizeLf(n),
                b'\n' => *st = sized(n),
                _ => {}
            },
            ChunkState::SizeLf(n) => {
                if b != b'\n' {
                    return Err(bad("chunk size line"));
                }
                *st = sized(n);
            }
            ChunkState::Data(left) => {
                let n = (left as usize).min(input.len() - i);
                out.extend_from_slice(&input[i..i + n]);
                i += n;
                let left = left - n as u64;
                *st = if left == 0 {
                    ChunkState::DataCr
                } else {
                    ChunkState::Data(left)
                };
                continue;
            }
            ChunkState::DataCr => match b {
                b'\r' => *st = ChunkState::DataLf,
                b'\n' => *st = ChunkState::default(),
                _ => return Err(bad("chunk data not followed by CRLF")),
            },
            ChunkState::DataLf => {
                if b != b'\n' {
                    return Err(bad("chunk data not followed by CRLF"));
                }
                *st = ChunkState::default();
            }
            ChunkState::Trailer(empty) => match b {
                b'\r' => *st = ChunkState::TrailerLf(empty),
                b'\n' if empty => {
                    *st = ChunkState::Done;
                    return Ok(i + 1);
                }
                b'\n' => *st = ChunkState::Trailer(true),
                _ => *st = ChunkState::Trailer(false),
            },
            ChunkState::TrailerLf(empty) => {
                if b != b'\n' {
                    return Err(bad("trailer line"));
                }
                if empty {
                    *st = ChunkState::Done;
                    return Ok(i + 1);
                }
                *st = ChunkState::Trailer(true);
            }
            ChunkState::Done => return Ok(i),
        }
        i += 1;
    }
    Ok(i)
}

/// The response body of [`H1Endpoint::send`]: reads the upstream socket when polled.
#[derive(Debug)]
pub(crate) struct H1Body {
    io: Option<TcpStream>,
    framing: Framing,
    chunk: ChunkState,
    /// Body bytes read with the head, not yet decoded.
    pending: Bytes,
    reusable: bool,
    endpoint: Arc<H1Endpoint>,
}

impl H1Body {
    /// The message is complete: pool the connection if it can be reused, else close it. The body
    /// has ended once it holds no connection.
    fn finish(&mut self) {
        if let Some(io) = self.io.take() {
            if self.reusable && self.framing != Framing::Eof {
                self.endpoint.checkin(io);
            }
        }
    }

    /// Decodes what one read brought into one frame's worth of bytes (empty when it held only
    /// framing), and ends the message when its framing says so.
    fn take(&mut self, input: &[u8]) -> Result<Bytes, BodyError> {
        let (out, ended, used) = match self.framing {
            Framing::Empty => (Bytes::new(), true, 0),
            Framing::Eof => (Bytes::copy_from_slice(input), false, input.len()),
            Framing::Length(left) => {
                let n = (left as usize).min(input.len());
                self.framing = Framing::Length(left - n as u64);
                (Bytes::copy_from_slice(&input[..n]), left == n as u64, n)
            }
            Framing::Chunked => match whole_chunk(self.chunk, input) {
                // Nearly every read of a streamed body is one whole chunk (one event): its data is
                // copied straight into the frame.
                Some(data) => (Bytes::copy_from_slice(data), false, input.len()),
                None => {
                    // Decoded into a buffer kept by the thread, then copied into an exactly-sized frame:
                    // `Bytes` made from a `Vec` whose length is short of its capacity allocates a second
                    // block to share it, and frees both when the frame has been written.
                    let (out, used) = DECODED.with_borrow_mut(|buf| {
                        buf.clear();
                        let used = decode_chunked(&mut self.chunk, input, buf)?;
                        let out = Bytes::copy_from_slice(buf);
                        if buf.capacity() > READ_SIZE {
                            *buf = Vec::new();
                        }
                        Ok::<_, BodyError>((out, used))
                    })?;
                    (out, self.chunk == ChunkState::Done, used)
                }
            },
        };
        if ended {
            // Bytes past the end of the message: the connection cannot be trusted.
            self.reusable &= used == input.len();
            self.finish();
        }
        Ok(out)
    }
}

thread_local! {
    /// Where body reads land before they are decoded into an exactly-sized frame: one per worker
    /// thread, so that no stream holds a read buffer and no read zeroes one.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; READ_SIZE].into_boxed_slice());
    /// Where a chunked read's payload is gathered before it is copied into its frame.
    static DECODED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        // Bytes that came with the head first.
        if this.io.is_some() && !this.pending.is_empty() {
            let pending = std::mem::take(&mut this.pending);
            let data = this.take(&pending)?;
            if !data.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
        }
        while this.io.is_some() {
            // One read per poll. After a read that did not fill `space`, tokio clears the readiness
            // it cached, so the next poll waits for the next edge instead of calling `read` once
            // more only to see `EAGAIN` (between an event and its `writev` to the client).
            let read = SCRATCH.with_borrow_mut(|space| {
                let Some(io) = this.io.as_mut() else {
                    return Poll::Ready(Ok(None));
                };
                let mut buf = ReadBuf::new(space);
                if let Err(e) = std::task::ready!(Pin::new(io).poll_read(cx, &mut buf)) {
                    return Poll::Ready(Err(BodyError(format!(
                        "reading the upstream's response body failed: {e}"
                    ))));
                }
                let n = buf.filled().len();
                Poll::Ready(match n {
                    0 => Ok(None),
                    n => this.take(&space[..n]).map(Some),
                })
            });
            match std::task::ready!(read) {
                Ok(Some(data)) if data.is_empty() => continue,
                Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                // End of stream: the end of the message only for a close-delimited body.
                Ok(None) => {
                    this.io = None;
                    if this.framing != Framing::Eof {
                        return Poll::Ready(Some(Err(BodyError(
                            "the upstream closed the connection before the end of the response body"
                                .into(),
                        ))));
                    }
                }
                Err(e) => {
                    this.io = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.io.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            _ if self.io.is_none() => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::net::TcpListener;

    fn decode_all(parts: &[&[u8]]) -> Result<(Vec<u8>, ChunkState, usize), BodyError> {
        let mut st = ChunkState::default();
        let mut out = Vec::new();
        let mut used = 0;
        for p in parts {
            used = decode_chunked(&mut st, p, &mut out)?;
        }
        Ok((out.to_vec(), st, used))
    }

    #[test]
    fn chunked_split_anywhere_decodes_the_same() {
        let msg: &[u8] = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for cut in 0..msg.len() {
            let (a, b) = msg.split_at(cut);
            let mut st = ChunkState::default();
            let mut out = Vec::new();
            let end = msg.len() - 4;
            let used_a = decode_chunked(&mut st, a, &mut out).unwrap();
            assert_eq!(used_a, a.len().min(end), "cut {cut}");
            let used_b = decode_chunked(&mut st, b, &mut out).unwrap();
            assert_eq!(&out[..], b"hello0123456789", "cut {cut}");
            assert_eq!(st, ChunkState::Done, "cut {cut}");
            // Decoding stops at the end of the message: "NEXT" is not consumed.
            assert_eq!(used_a + used_b, end, "cut {cut}");
        }
    }

    #[test]
    fn chunked_shapes_decode_the_same_cut_into_three_reads() {
        // Each shape of size line and line end, the fast path's and the byte-by-byte path's: split
        // at every pair of points, so each read starts and ends everywhere.
        let msgs: [(&[u8], &[u8]); 5] = [
            (b"3\r\nabc\r\n0\r\n\r\n", b"abc"),
            (b"00A\r\n0123456789\r\n1\r\nx\r\n0\r\n\r\n", b"0123456789x"),
            (b"b ; ext=1\r\nhello world\r\n0;x\r\n\r\n", b"hello world"),
            (b"2\nhi\n2\r\n\r\n\r\n0\n\n", b"hi\r\n"),
            (
                b"E\r\ndata: 1 hello\n\r\ne\r\ndata: 2 hello\n\r\n0\r\n\r\n",
                b"data: 1 hello\ndata: 2 hello\n",
            ),
        ];
        for (msg, want) in msgs {
            for a in 0..=msg.len() {
                for b in a..=msg.len() {
                    let (out, st, _) = decode_all(&[&msg[..a], &msg[a..b], &msg[b..]])
                        .unwrap_or_else(|e| panic!("{e} at cuts {a} {b}"));
                    assert_eq!(out, want, "cuts {a} {b}");
                    assert_eq!(st, ChunkState::Done, "cuts {a} {b}");
                }
            }
        }
        // Overflow is caught however the digits are split.
        let big = b"10000000000000000\r\n";
        for cut in 0..big.len() {
            assert!(
                decode_all(&[&big[..cut], &big[cut..]]).is_err(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn whole_chunk_takes_exactly_one_whole_chunk_and_agrees_with_the_decoder() {
        let msgs: [&[u8]; 6] = [
            b"E\r\ndata: 1 hello\n\r\ne\r\ndata: 2 hello\n\r\n0\r\n\r\n",
            b"00A\r\n0123456789\r\n1\r\nx\r\n0\r\n\r\n",
            b"b ; ext=1\r\nhello world\r\n0;x\r\n\r\n",
            b"2\nhi\n2\r\n\r\n\r\n0\n\n",
            b"3\r\nab\r\n\r\n3\r\nabcd\r\n",
            b"10000000000000003\r\nabc\r\n0000000000000003\r\nabc\r\n",
        ];
        let mut taken = 0;
        // Every piece of every message, at a chunk start: where the fast path takes a piece, the
        // decoder reads the same data from it, uses all of it and ends at a chunk start.
        for msg in msgs {
            for a in 0..=msg.len() {
                for b in a..=msg.len() {
                    let piece = &msg[a..b];
                    let Some(data) = whole_chunk(ChunkState::Start, piece) else {
                        continue;
                    };
                    taken += 1;
                    let mut st = ChunkState::Start;
                    let mut out = Vec::new();
                    let used = decode_chunked(&mut st, piece, &mut out).unwrap();
                    assert_eq!((data, used, st), (&out[..], piece.len(), ChunkState::Start));
                }
            }
        }
        // The seven whole chunks of the messages, and shorter pieces that happen to be chunks.
        assert!(taken >= 7, "{taken} pieces taken");
        assert_eq!(
            whole_chunk(ChunkState::Start, b"3\r\nabc\r\n"),
            Some(&b"abc"[..])
        );
        // Not at a chunk start: the same bytes are data.
        assert_eq!(whole_chunk(ChunkState::Data(11), b"3\r\nabc\r\n"), None);
        assert_eq!(whole_chunk(ChunkState::Size(1), b"3\r\nabc\r\n"), None);
        assert_eq!(whole_chunk(ChunkState::Size(0), b"3\r\nabc\r\n"), None);
        for other in [
            &b"0\r\n\r\n"[..],
            b"3\r\nabc\r",
            b"3\nabc\n",
            b"\r\nabc\r\n",
            b"",
        ] {
            assert_eq!(whole_chunk(ChunkState::Start, other), None, "{other:?}");
        }
    }

    #[test]
    fn chunked_rejects_garbage_and_overflow() {
        assert!(decode_all(&[b"zz\r\n"]).is_err());
        assert!(decode_all(&[b"3\r\nabcX"]).is_err());
        assert!(decode_all(&[b"fffffffffffffffff\r\n"]).is_err());
        let (out, st, _) = decode_all(&[b"3\nabc\n0\n\n"]).unwrap();
        assert_eq!((out.as_slice(), st), (&b"abc"[..], ChunkState::Done));
    }

    /// A size line needs a digit (RFC 9112: `chunk-size = 1*HEXDIG`). Read as a zero, an empty one
    /// would end the body cleanly where the upstream sent garbage: the client would take a truncated
    /// answer for a whole one, and the connection, its framing lost, could go back to the pool.
    #[test]
    fn chunked_rejects_a_size_line_without_digits() {
        for msg in [
            &b"\r\n\r\n"[..],
            b"\n\n",
            b";ext\r\n\r\n",
            b" 3\r\nabc\r\n",
            b"3\r\nabc\r\n\r\n\r\n",
            b"3\r\nabc\r\n;x\r\n",
        ] {
            for cut in 0..=msg.len() {
                assert!(
                    decode_all(&[&msg[..cut], &msg[cut..]]).is_err(),
                    "{:?} cut at {cut}",
                    String::from_utf8_lossy(msg)
                );
            }
        }
        // A zero, however written, is the last chunk.
        for last in [
            &b"0\r\n\r\n"[..],
            b"000\r\n\r\n",
            b"0;x=1\r\n\r\n",
            b"0\n\n",
        ] {
            let (out, st, _) = decode_all(&[last]).unwrap();
            assert_eq!((out.as_slice(), st), (&b""[..], ChunkState::Done));
        }
    }

    /// One chunk's size line in one of the shapes senders use, and its data's line end.
    fn encode_chunk(data: &[u8], shape: u8, out: &mut Vec<u8>) {
        let size = match shape % 4 {
            0 => format!("{:x}\r\n", data.len()),
            1 => format!("{:06X}\r\n", data.len()),
            2 => format!("{:x} ; name=\"v\"\r\n", data.len()),
            _ => format!("{:x}\n", data.len()),
        };
        out.extend_from_slice(size.as_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(if shape % 3 == 0 { b"\n" } else { b"\r\n" });
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any bytes at all, cut into three reads anywhere: no panic, and the same answer as in one
        /// read (the same data and state, or an error both ways).
        #[test]
        fn chunked_any_bytes_cut_anywhere_give_the_same_answer(
            msg in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::sample::select(b"0123456789abcdefABCDEF\r\n; \tzx".to_vec()),
                    proptest::prelude::any::<u8>(),
                ],
                0..64,
            ),
            a in 0usize..65,
            b in 0usize..65,
        ) {
            let (a, b) = (a.min(msg.len()), b.min(msg.len()));
            let (a, b) = (a.min(b), a.max(b));
            // Data, state and bytes taken (summed over the reads: the decoder stops at the end of
            // the message, and takes nothing after it).
            let decode = |parts: &[&[u8]]| {
                let mut st = ChunkState::default();
                let mut out = Vec::new();
                let mut used = 0;
                for p in parts {
                    used += decode_chunked(&mut st, p, &mut out)?;
                }
                Ok::<_, BodyError>((out, st, used))
            };
            let whole = decode(&[&msg]);
            let cut = decode(&[&msg[..a], &msg[a..b], &msg[b..]]);
            proptest::prop_assert_eq!(whole.is_ok(), cut.is_ok(), "{:?}", String::from_utf8_lossy(&msg));
            if let (Ok(whole), Ok(cut)) = (whole, cut) {
                proptest::prop_assert_eq!(whole, cut);
            }
            // The fast path never disagrees with the decoder where it answers.
            if let Some(data) = whole_chunk(ChunkState::default(), &msg) {
                let mut st = ChunkState::default();
                let mut out = Vec::new();
                let used = decode_chunked(&mut st, &msg, &mut out).unwrap();
                proptest::prop_assert_eq!((data, used, st), (&out[..], msg.len(), ChunkState::default()));
            }
        }

        /// Well-formed bodies (chunks of any size in every size-line shape, then the last chunk and
        /// trailers), cut into three reads anywhere, decode to their data and end where they end.
        #[test]
        fn chunked_well_formed_bodies_decode_to_their_data(
            chunks in proptest::collection::vec(
                (proptest::collection::vec(proptest::prelude::any::<u8>(), 1..300), proptest::prelude::any::<u8>()),
                0..6,
            ),
            trailers in proptest::prelude::any::<bool>(),
            cuts in (proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<proptest::sample::Index>()),
        ) {
            let mut msg = Vec::new();
            let mut want = Vec::new();
            for (data, shape) in &chunks {
                encode_chunk(data, *shape, &mut msg);
                want.extend_from_slice(data);
            }
            msg.extend_from_slice(if trailers { &b"0\r\nx-usage: 12\r\nx-more: 1\r\n\r\n"[..] } else { b"0\r\n\r\n" });
            let end = msg.len();
            msg.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            let (a, b) = (cuts.0.index(msg.len() + 1), cuts.1.index(msg.len() + 1));
            let (a, b) = (a.min(b), a.max(b));
            let mut st = ChunkState::default();
            let mut out = Vec::new();
            let mut used = 0;
            for part in [&msg[..a], &msg[a..b], &msg[b..]] {
                used += decode_chunked(&mut st, part, &mut out).unwrap();
            }
            proptest::prop_assert_eq!(out, want);
            proptest::prop_assert_eq!(st, ChunkState::Done);
            // Nothing past the message is taken: it belongs to the next response.
            proptest::prop_assert_eq!(used, end);
        }
    }

    fn head(status: u16, headers: &[(&'static str, &'static str)]) -> Head {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(*k, HeaderValue::from_static(v));
        }
        Head {
            status: StatusCode::from_u16(status).unwrap(),
            version: Version::HTTP_11,
            headers: h,
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        use Framing::*;
        const CL: &str = "content-length";
        const TE: &str = "transfer-encoding";
        // Whether the request was a HEAD, the status, the headers, the framing (`None`: invalid,
        // a 502, never read to the end).
        type Case = (
            bool,
            u16,
            &'static [(&'static str, &'static str)],
            Option<Framing>,
        );
        let cases: &[Case] = &[
            (true, 200, &[(CL, "5")], Some(Empty)),
            (false, 204, &[], Some(Empty)),
            (false, 304, &[(CL, "5")], Some(Empty)),
            (
                false,
                200,
                &[(TE, "gzip, chunked"), (CL, "5")],
                Some(Chunked),
            ),
            (false, 200, &[(TE, "gzip")], Some(Eof)),
            (false, 200, &[(CL, "5")], Some(Length(5))),
            (false, 200, &[(CL, "5"), (CL, "6")], None), // conflicting lengths
            (false, 200, &[(CL, "5, 6")], None),
            (false, 200, &[(CL, "+5")], None),
            (false, 200, &[(CL, "5x")], None),
            (false, 200, &[(CL, "")], None),
            (false, 200, &[(CL, "-1")], None),
            (false, 200, &[(CL, "99999999999999999999")], None),
            (false, 200, &[(CL, "5, 5")], Some(Length(5))),
            // Where the length does not frame the body, it is not looked at.
            (true, 200, &[(CL, "x")], Some(Empty)),
            (false, 200, &[(TE, "chunked"), (CL, "x")], Some(Chunked)),
            (false, 200, &[], Some(Eof)),
        ];
        for (is_head, status, headers, want) in cases {
            let method = if *is_head { Method::HEAD } else { Method::GET };
            assert_eq!(
                framing(&method, &head(*status, headers)),
                *want,
                "{method} {status} {headers:?}"
            );
        }
        assert!(connection_has(
            &head(200, &[("connection", "keep-alive, Close")]).headers,
            "close"
        ));
    }

    /// An upstream that answers each request on a connection with `answer`, then keeps reading.
    async fn upstream(answer: &'static [u8]) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = conns.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut tmp = [0u8; 1024];
                    loop {
                        while let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..p + 4);
                            if s.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                        match s.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    }
                });
            }
        });
        (addr.to_string(), conns)
    }

    fn endpoint(addr: &str) -> Arc<H1Endpoint> {
        Arc::new(H1Endpoint::new(
            &addr.parse().unwrap(),
            Duration::from_secs(1),
        ))
    }

    /// GETs `path` and reads the whole body.
    async fn fetch(ep: &Arc<H1Endpoint>, path: &str) -> Bytes {
        let resp = ep.send(get(path)).await.unwrap();
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    fn get(path: &str) -> Request<UpstreamRequestBody> {
        Request::builder()
            .uri(path)
            .body(UpstreamRequestBody::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn a_fully_read_response_returns_its_connection_to_the_pool() {
        let (addr, conns) = upstream(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        )
        .await;
        let ep = endpoint(&addr);
        for _ in 0..3 {
            let resp = ep.send(get("/x")).await.unwrap();
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"abc");
            assert_eq!(ep.idle_len(), 1);
        }
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_dropped_body_closes_its_connection() {
        let (addr, conns) =
            upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part").await;
        let ep = endpoint(&addr);
        let resp = ep.send(get("/x")).await.unwrap();
        drop(resp);
        assert_eq!(ep.idle_len(), 0);
        let resp = ep.send(get("/x")).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn close_delimited_and_connection_close_responses_are_not_reused() {
        let (addr, _) =
            upstream(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok").await;
        let ep = endpoint(&addr);
        let body = fetch(&ep, "/").await;
        assert_eq!(&body[..], b"ok");
        assert_eq!(ep.idle_len(), 0);
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_by_the_upstream_is_not_used() {
        // The upstream answers once, then closes: the pooled connection is dead by the next request.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let mut tmp = [0u8; 1024];
                let _ = s.read(&mut tmp).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                let _ = s.shutdown().await;
                let _ = closed_tx.send(());
            }
        });
        let ep = endpoint(&addr);
        let body = fetch(&ep, "/").await;
        assert_eq!(&body[..], b"ok");
        // The FIN is on the loopback socket once the upstream's shutdown returned.
        closed.recv().await.unwrap();
        assert_eq!(ep.idle_len(), 1);
        // The reaper closes it without waiting for a request; run its check now.
        ep.reap();
        assert_eq!(ep.idle_len(), 0);
        // And the next request gets a fresh connection.
        let body = fetch(&ep, "/").await;
        assert_eq!(&body[..], b"ok");
        closed.recv().await.unwrap();
        assert_eq!(ep.idle_len(), 1);
        let resp = ep.send(get("/")).await.unwrap();
        assert_eq!(resp.status(), 200);
    }

    #[tokio::test]
    async fn a_request_that_meets_a_closed_pooled_connection_is_resent_whole() {
        // Each connection answers its first request, and closes on the second without answering:
        // what an upstream that times out an idle keep-alive connection looks like at the worst moment.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut tmp = [0u8; 4096];
                    let mut answered = 0;
                    loop {
                        match s.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                        // A request is complete once its 5-byte body (or no body) followed the head.
                        let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let want = if buf.starts_with(b"POST") {
                            p + 4 + 5
                        } else {
                            p + 4
                        };
                        if buf.len() < want {
                            continue;
                        }
                        if answered == 1 {
                            return; // close without answering
                        }
                        seen.lock().unwrap().push(buf.drain(..want).collect());
                        answered += 1;
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                });
            }
        });
        let ep = endpoint(&addr);
        let body = fetch(&ep, "/a").await;
        assert_eq!(&body[..], b"ok");
        assert_eq!(ep.idle_len(), 1);
        // A POST with a small body goes to the pooled connection, which closes: sent again, whole.
        let mut req = Request::new(UpstreamRequestBody::new(
            crate::proxy::body::ClientBody::Right(http_body_util::Full::new(Bytes::from_static(
                b"hello",
            ))),
        ));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = http::Uri::from_static("/b");
        let resp = ep.send(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        let last = String::from_utf8_lossy(&seen[1]).into_owned();
        assert!(last.starts_with("POST /b HTTP/1.1\r\n"), "{last}");
        assert!(last.ends_with("\r\n\r\nhello"), "{last}");
        assert!(last.contains("content-length: 5\r\n"), "{last}");
    }
}
