//! The lean HTTP/1.1 server side: plain-TCP client connections are read and written here.
//!
//! hyper's HTTP/1 server keeps, for every open connection, an 8 KiB read buffer, an 8 KiB write buffer
//! (allocated up front, not configurable) and a connection task of about 6 KiB. A proxy of LLM streams
//! holds thousands of connections that wait on a silent upstream, so that is most of what it costs per
//! stream. Here a connection holds its socket, the response body being streamed and nothing else:
//!
//! - the request head is read into a buffer that exists only while a head is being read, and is freed
//!   once the request is parsed (`pending` is empty, and unallocated, while a stream is in flight);
//! - every body frame goes out the moment it arrives, in one `writev` with its chunk framing: there is no
//!   write buffer, so nothing can sit in one (hyper flushes only when the body returns `Pending`);
//! - the call to the service is boxed and gone once the response head is there.
//!
//! While a response is in flight the socket is watched for reads: an end of stream or a reset from the
//! client drops the response future or body at once, which cancels the upstream (bytes of a pipelined
//! next request are kept, up to 8 KiB, then reads stop as hyper's do).
//!
//! Scope: requests with no body or a body of known length up to 64 KiB, read whole before the request
//! goes in (as nginx's request buffering does). A chunked or larger request body, `Expect`, or the
//! HTTP/2 preface hands the connection to hyper with the bytes already read ([`Served::Handover`]), so
//! those keep hyper's behaviour. TLS connections are hyper's from the start.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http::{Uri, Version};
use http_body::Body;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower::Service;

use super::body::ClientBody;
use super::error::json_error;

/// Request heads larger than this get 431 (nginx's `large_client_header_buffers` is 8 KiB too).
pub(crate) const MAX_HEAD: usize = 8 * 1024;
/// Header lines per request (hyper's default).
const MAX_HEADERS: usize = 100;
/// Request bodies up to this size are read whole here; larger ones go to hyper, which streams them.
const MAX_BODY: u64 = 64 * 1024;
/// A connection waiting for a request (a new one, or the rest of one, body included) is closed after
/// this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// After a 400 or 431, what the client still sends is read and dropped for this long, or this much,
/// before the connection closes (nginx's lingering close).
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 * 1024;

/// How [`serve`] ended.
#[derive(Debug)]
pub(crate) enum Served {
    /// The connection is closed (or will be once dropped).
    Closed,
    /// hyper takes the connection from here: the socket and the bytes read but not used, which start
    /// with the request hyper is to read.
    Handover(TcpStream, Bytes),
}

/// A request head, parsed and checked.
struct Head {
    req: Request<ClientBody>,
    /// Bytes of the head, and of the body after it.
    head_len: usize,
    body_len: usize,
    keep_alive: bool,
    /// The client sent `TE: trailers`.
    te_trailers: bool,
}

/// What reading a request came to.
#[allow(clippy::large_enum_variant)] // Moved once per request; a box would be one more allocation.
enum Read {
    Request(Head),
    Handover,
    Reject(StatusCode, &'static str),
    Close,
}

/// What waiting on the response body came to.
enum Event {
    Frame(http_body::Frame<Bytes>),
    End,
    Failed(String),
    /// Not ready, and the head is not sent yet.
    NotYet,
    /// The client closed or reset the connection.
    Gone,
}

/// How the response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body at all (HEAD, 1xx, 204, 304).
    None,
    /// `Content-Length`, with this many bytes still to send.
    Length(u64),
    Chunked,
    /// HTTP/1.0 client and unknown length: the end of the connection ends the body.
    Close,
}

struct Conn {
    io: TcpStream,
    /// Bytes read and not used yet: a partial head, a body, a pipelined request. Empty, with no
    /// allocation, while a stream is in flight unless the client pipelines.
    pending: Vec<u8>,
    /// Reads go on while a response is in flight, to see the client leave; off once pipelined bytes
    /// reach [`MAX_HEAD`].
    watch: bool,
}

/// Serve one plain-TCP client connection until it closes, or until it needs hyper.
///
/// `graceful` cancelled: an idle connection closes now, a busy one after its current response.
pub(crate) async fn serve<S, B>(io: TcpStream, mut svc: S, graceful: CancellationToken) -> Served
where
    S: Service<Request<ClientBody>, Response = Response<B>, Error = Infallible>,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut conn = Conn {
        io,
        pending: Vec::new(),
        watch: true,
    };
    let mut first = true;
    loop {
        // The request is read, and the call made, in a block of its own: what only this part needs
        // (the parsed head above all) is then not part of the state kept while the response
        // streams, which is what every connection's task is sized for.
        // Ready first, while no request is held (the stack is always ready; tower asks for it).
        let Ok(()) = poll_fn(|cx| svc.poll_ready(cx)).await;
        let (mut call, method, version, mut keep_alive, te_trailers) = {
            let read = Box::pin(tokio::time::timeout(
                HEAD_TIMEOUT,
                conn.read_request(first, &graceful),
            ))
            .await
            .unwrap_or(Read::Close);
            first = false;
            let head = match read {
                Read::Request(h) => h,
                Read::Close => return Served::Closed,
                Read::Handover => {
                    let bytes = Bytes::from(std::mem::take(&mut conn.pending));
                    return Served::Handover(conn.io, bytes);
                }
                Read::Reject(status, why) => {
                    // Boxed: rare, and with its lingering-close buffer the largest state here.
                    let _ = Box::pin(conn.reject(status, why)).await;
                    return Served::Closed;
                }
            };
            conn.consume(head.head_len + head.body_len);
            let method = head.req.method().clone();
            let version = head.req.version();
            let call = Box::pin(svc.call(head.req));
            (call, method, version, head.keep_alive, head.te_trailers)
        };
        // The response is turned into its encoded head and a boxed body right where it comes out: a
        // `Response` held across an await would be copied into this future's state, which every
        // connection's task carries whatever it is doing.
        let ready = poll_fn(|cx| {
            if let Poll::Ready(r) = call.as_mut().poll(cx) {
                let Ok(resp) = r;
                if graceful.is_cancelled() {
                    keep_alive = false;
                }
                let out = prepare(resp, &method, version, te_trailers, &mut keep_alive);
                return Poll::Ready(Some(out));
            }
            conn.poll_gone(cx).map(|()| None)
        })
        .await;
        drop(call);
        // `None`: the client left before the response head; the call is dropped, which cancels it.
        let Some(out) = ready else {
            return Served::Closed;
        };
        let close_delimited = out.framing == Framing::Close;
        match conn.respond(out).await {
            // Shutting down: close after this response, whatever the client has sent since.
            Ok(()) if keep_alive && !graceful.is_cancelled() => {}
            Ok(()) => {
                let _ = conn.io.shutdown().await;
                return Served::Closed;
            }
            Err(()) => {
                if close_delimited {
                    // A close-delimited body looks whole when it ends with a FIN: only a reset
                    // says it was cut.
                    let _ = conn.io.set_zero_linger();
                }
                return Served::Closed;
            }
        }
    }
}

/// A response ready to go out: its encoded head, its framing and its body (`None` when it has none).
struct Outgoing<B> {
    head: Vec<u8>,
    framing: Framing,
    body: Option<Pin<Box<B>>>,
    /// The client accepts trailers (`TE: trailers`).
    trailers: bool,
}

/// Choose the framing, encode the head, box the body.
fn prepare<B: Body>(
    resp: Response<B>,
    method: &Method,
    version: Version,
    trailers: bool,
    keep_alive: &mut bool,
) -> Outgoing<B> {
    let (parts, body) = resp.into_parts();
    let status = parts.status;
    if connection_has(&parts.headers, "close") {
        *keep_alive = false;
    }
    let framing = if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::None
    } else if let Some(n) = content_length(&parts.headers) {
        Framing::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        Framing::Length(n)
    } else if version == Version::HTTP_11 {
        Framing::Chunked
    } else {
        *keep_alive = false;
        Framing::Close
    };
    let mut head = Vec::with_capacity(512);
    write_head(
        &mut head,
        status,
        &parts.headers,
        framing,
        version,
        *keep_alive,
    );
    let body = (framing != Framing::None).then(|| Box::pin(body));
    Outgoing {
        head,
        framing,
        body,
        trailers,
    }
}

impl Conn {
    /// Read until a whole request (head and body) is in `pending`. While nothing of a request has
    /// come, `graceful` closes the connection.
    async fn read_request(&mut self, first: bool, graceful: &CancellationToken) -> Read {
        let mut head: Option<Head> = None;
        loop {
            if first && self.pending.len() >= 4 && self.pending.starts_with(b"PRI ") {
                return Read::Handover; // The HTTP/2 preface: hyper serves h2c.
            }
            if head.is_none() && !self.pending.is_empty() {
                match parse(&self.pending) {
                    Ok(Some(Parsed::Head(h))) => head = Some(h),
                    Ok(Some(Parsed::Handover)) => return Read::Handover,
                    Ok(None) if self.pending.len() >= MAX_HEAD => {
                        return Read::Reject(
                            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                            "the request head is larger than 8 KiB",
                        )
                    }
                    Ok(None) => {}
                    Err((status, why)) => return Read::Reject(status, why),
                }
            }
            // The head is parsed once; then only the body's bytes are waited for.
            if let Some(h) = &mut head {
                let end = h.head_len + h.body_len;
                if self.pending.len() >= end {
                    if h.body_len > 0 {
                        let body = Bytes::copy_from_slice(&self.pending[h.head_len..end]);
                        *h.req.body_mut() = ClientBody::Full(Some(body));
                    }
                    return Read::Request(head.take().expect("checked above"));
                }
            }
            if self.pending.is_empty() {
                tokio::select! {
                    biased;
                    _ = graceful.cancelled() => return Read::Close,
                    r = self.io.readable() => if r.is_err() { return Read::Close },
                }
            }
            if self.pending.capacity() - self.pending.len() < 1024 {
                self.pending.reserve(4096);
            }
            match tokio::io::AsyncReadExt::read_buf(&mut self.io, &mut self.pending).await {
                Ok(0) | Err(_) => return Read::Close,
                Ok(_) => {}
            }
        }
    }

    /// Drop `n` used bytes. What is left (a pipelined request) moves to an exactly-sized buffer, so
    /// that a large request body does not leave its capacity behind for the whole stream.
    fn consume(&mut self, n: usize) {
        self.pending = match self.pending.get(n..) {
            Some(rest) if !rest.is_empty() => rest.to_vec(),
            _ => Vec::new(),
        };
        self.watch = self.pending.len() < MAX_HEAD;
    }

    /// Ready once the client has closed or reset the connection. Bytes it sends meanwhile (a pipelined
    /// request) are kept for later.
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.watch {
            return Poll::Pending;
        }
        loop {
            if ready!(self.io.poll_read_ready(cx)).is_err() {
                return Poll::Ready(());
            }
            let mut buf = [0u8; 1024];
            match self.io.try_read(&mut buf) {
                Ok(0) => return Poll::Ready(()),
                Ok(n) => {
                    self.pending.extend_from_slice(&buf[..n]);
                    if self.pending.len() >= MAX_HEAD {
                        self.watch = false;
                        return Poll::Pending;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Poll::Ready(()),
            }
        }
    }

    /// Write all of `bufs`, watching for the client to leave while the socket is full.
    async fn write_all(&mut self, bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        let mut bufs = bufs;
        IoSlice::advance_slices(&mut bufs, 0);
        poll_fn(|cx| {
            while !bufs.is_empty() {
                match Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => IoSlice::advance_slices(&mut bufs, n),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        ready!(self.poll_gone(cx));
                        return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
                    }
                }
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Answer a request that cannot be served (bad or too large a head), then close.
    async fn reject(&mut self, status: StatusCode, why: &str) -> io::Result<()> {
        let body = json_error(
            if status == StatusCode::BAD_REQUEST {
                "bad_request"
            } else {
                "request_head_too_large"
            },
            why,
        );
        let mut head = Vec::with_capacity(256 + body.len());
        write_status(&mut head, status);
        head.extend_from_slice(b"content-type: application/json\r\ncontent-length: ");
        head.extend_from_slice(body.len().to_string().as_bytes());
        head.extend_from_slice(b"\r\nconnection: close\r\n");
        write_date(&mut head);
        head.extend_from_slice(b"\r\n");
        head.extend_from_slice(body.as_bytes());
        self.write_all(&mut [IoSlice::new(&head)]).await?;
        self.io.shutdown().await?;
        // Lingering close, as nginx does: closing with unread request bytes would send a reset that
        // can destroy the answer before the client reads it. Read and drop what the client still
        // sends, for a short while.
        let linger = async {
            let mut left = LINGER_BYTES;
            let mut buf = [0u8; 1024];
            while left > 0 {
                match tokio::io::AsyncReadExt::read(&mut self.io, &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, linger).await;
        Ok(())
    }

    /// Stream the response. `Err` means the connection must close without anything more (the client
    /// left, a write failed, or the body failed and must not look complete).
    async fn respond<B>(&mut self, out: Outgoing<B>) -> Result<(), ()>
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let Outgoing {
            head,
            mut framing,
            body,
            trailers,
        } = out;
        let Some(mut body) = body else {
            return self
                .write_all(&mut [IoSlice::new(&head)])
                .await
                .map_err(drop);
        };
        if body.is_end_stream() {
            return self.end_body(&head, framing).await;
        }
        // The head goes out with the first frame if that is ready, on its own if not.
        let mut head = Some(head);
        loop {
            let event = poll_fn(|cx| {
                if let Poll::Ready(f) = body.as_mut().poll_frame(cx) {
                    return Poll::Ready(match f {
                        Some(Ok(f)) => Event::Frame(f),
                        Some(Err(e)) => Event::Failed(e.to_string()),
                        None => Event::End,
                    });
                }
                if head.is_some() {
                    return Poll::Ready(Event::NotYet);
                }
                self.poll_gone(cx).map(|()| Event::Gone)
            })
            .await;
            let frame = match event {
                Event::NotYet => {
                    let h = head.take().unwrap_or_default();
                    self.write_all(&mut [IoSlice::new(&h)])
                        .await
                        .map_err(drop)?;
                    continue;
                }
                Event::Frame(f) => f,
                Event::Failed(e) => {
                    tracing::debug!(error = %e, "response body failed: closing the connection without ending it");
                    if let Some(h) = head.take() {
                        let _ = self.write_all(&mut [IoSlice::new(&h)]).await;
                    }
                    return Err(());
                }
                // The client left: dropping the body cancels the upstream.
                Event::Gone => return Err(()),
                Event::End => {
                    let h = head.take().unwrap_or_default();
                    return self.end_body(&h, framing).await;
                }
            };
            let frame = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    // Trailers end the body. They have a place on the wire only in chunked framing,
                    // and go out only to a client that said it takes them (as hyper does).
                    let h = head.take().unwrap_or_default();
                    let mut t = Vec::new();
                    if framing == Framing::Chunked {
                        t.extend_from_slice(b"0\r\n");
                        if let Some(tr) = frame.trailers_ref().filter(|_| trailers) {
                            write_trailers(&mut t, tr);
                        }
                        t.extend_from_slice(b"\r\n");
                    } else if matches!(framing, Framing::Length(n) if n > 0) {
                        return Err(());
                    }
                    let r = self
                        .write_all(&mut [IoSlice::new(&h), IoSlice::new(&t)])
                        .await;
                    return r.map_err(drop);
                }
            };
            let mut data = frame;
            if data.is_empty() {
                continue; // An empty chunk would end a chunked body.
            }
            if let Framing::Length(left) = framing {
                if data.len() as u64 > left {
                    tracing::debug!("response body is longer than its content-length");
                    data.truncate(left as usize);
                    let h = head.take().unwrap_or_default();
                    let _ = self
                        .write_all(&mut [IoSlice::new(&h), IoSlice::new(&data)])
                        .await;
                    return Err(());
                }
                framing = Framing::Length(left - data.len() as u64);
            }
            let end = body.is_end_stream();
            let h = head.take().unwrap_or_default();
            let mut size = [0u8; 18];
            let (size_line, tail): (&[u8], &[u8]) = match framing {
                Framing::Chunked => (
                    chunk_size_line(&mut size, data.len()),
                    if end { b"\r\n0\r\n\r\n" } else { b"\r\n" },
                ),
                _ => (b"", b""),
            };
            self.write_all(&mut [
                IoSlice::new(&h),
                IoSlice::new(size_line),
                IoSlice::new(&data),
                IoSlice::new(tail),
            ])
            .await
            .map_err(drop)?;
            match framing {
                // All the promised bytes are out: the response is complete whatever the body does
                // next (hyper drops it there too).
                Framing::Length(0) => return Ok(()),
                Framing::Length(_) if end => return Err(()),
                _ if end => return Ok(()),
                _ => {}
            }
        }
    }
}

/// Trailer fields, minus those that must not be trailers (framing, routing, hop-by-hop).
fn write_trailers(out: &mut Vec<u8>, trailers: &HeaderMap) {
    for (k, v) in trailers {
        let forbidden = k == header::CONTENT_LENGTH
            || k == header::TRANSFER_ENCODING
            || k == header::CONNECTION
            || k == header::TE
            || k == header::TRAILER
            || k == header::HOST
            || k.as_str() == "keep-alive";
        if forbidden {
            continue;
        }
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

impl Conn {
    /// The body ended: write what is left (`head` if not sent yet, the last chunk). A body that
    /// ended short of its content-length must not look whole: the connection closes after the head.
    async fn end_body(&mut self, head: &[u8], framing: Framing) -> Result<(), ()> {
        let end: &[u8] = match framing {
            Framing::Length(n) if n > 0 => {
                tracing::debug!(
                    missing = n,
                    "response body ended short of its content-length"
                );
                let _ = self.write_all(&mut [IoSlice::new(head)]).await;
                return Err(());
            }
            Framing::Chunked => b"0\r\n\r\n",
            _ => b"",
        };
        let r = self
            .write_all(&mut [IoSlice::new(head), IoSlice::new(end)])
            .await;
        r.map_err(drop)
    }
}

/// The chunk-size line for `len` bytes, in `buf`.
fn chunk_size_line(buf: &mut [u8; 18], len: usize) -> &[u8] {
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, b) in buf.iter_mut().take(digits).enumerate() {
        *b = b"0123456789abcdef"[(len >> (4 * (digits - 1 - i))) & 0xf];
    }
    buf[digits] = b'\r';
    buf[digits + 1] = b'\n';
    &buf[..digits + 2]
}

fn write_status(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The response head: the service's headers minus the ones this connection owns (`connection`,
/// `transfer-encoding`, `content-length`), then the framing.
fn write_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    framing: Framing,
    version: Version,
    keep_alive: bool,
) {
    write_status(out, status);
    // A response with no body keeps the length it describes (HEAD, 304), except where the length
    // must not appear (204, 1xx); a body's length is the one this connection frames it with.
    let mut keep_length =
        framing == Framing::None && status != StatusCode::NO_CONTENT && !status.is_informational();
    for (k, v) in headers {
        if k == header::CONNECTION || k == header::TRANSFER_ENCODING || k.as_str() == "keep-alive" {
            continue;
        }
        if k == header::CONTENT_LENGTH {
            if !keep_length {
                continue;
            }
            keep_length = false; // One is enough.
        }
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        _ => {}
    }
    if !headers.contains_key(header::DATE) {
        write_date(out);
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The `date` header line, rendered once a second per worker thread.
    static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
}

fn write_date(out: &mut Vec<u8>) {
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, line)| {
        if *at != secs || line.is_empty() {
            *at = secs;
            *line = format!("date: {}\r\n", httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(line.as_bytes());
    });
}

/// The `content-length` of `h`, if it has one that is valid (every value, comma lists included, the
/// same number).
fn content_length(h: &HeaderMap) -> Option<u64> {
    let mut found = None;
    for v in h.get_all(header::CONTENT_LENGTH) {
        for part in v.to_str().ok()?.split(',') {
            let n: u64 = parse_digits(part.trim().as_bytes())?;
            if found.is_some_and(|f| f != n) {
                return None;
            }
            found = Some(n);
        }
    }
    found
}

fn parse_digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

#[allow(clippy::large_enum_variant)] // As `Read`.
enum Parsed {
    Head(Head),
    Handover,
}

/// Whether a `Connection` header lists `token`.
fn connection_has(h: &HeaderMap, token: &str) -> bool {
    connection_token_in(h, header::CONNECTION, token)
}

/// Whether a comma-separated list header `name` has `token` (parameters after `;` ignored).
fn connection_token_in(h: &HeaderMap, name: HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',').any(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case(token))
            })
        })
    })
}

type Reject = (StatusCode, &'static str);

/// Parse a request head at the start of `buf`: `None` if it is not complete yet.
fn parse(buf: &[u8]) -> Result<Option<Parsed>, Reject> {
    let bad = |why| (StatusCode::BAD_REQUEST, why);
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut slots);
    let head_len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err((
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "the request has more than 100 header lines",
            ))
        }
        Err(_) => return Err(bad("the request head is not valid HTTP/1.1")),
    };
    if head_len > MAX_HEAD {
        // One read can bring more than 8 KiB: the limit does not depend on how the bytes came.
        return Err((
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "the request head is larger than 8 KiB",
        ));
    }
    let method = Method::from_bytes(r.method.unwrap_or("").as_bytes())
        .map_err(|_| bad("the request method is not valid"))?;
    let uri: Uri = r
        .path
        .unwrap_or("")
        .parse()
        .map_err(|_| bad("the request target is not a valid URI"))?;
    let version = match r.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut headers = HeaderMap::with_capacity(r.headers.len());
    for h in r.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| bad("a request header name is not valid"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| bad("a request header value is not valid"))?;
        headers.append(name, value);
    }
    if headers.contains_key(header::TRANSFER_ENCODING) || headers.contains_key(header::EXPECT) {
        return Ok(Some(Parsed::Handover));
    }
    let body_len = if headers.contains_key(header::CONTENT_LENGTH) {
        content_length(&headers).ok_or(bad("the request's content-length is not valid"))?
    } else {
        0
    };
    if body_len > MAX_BODY {
        return Ok(Some(Parsed::Handover));
    }
    let keep_alive = match version {
        Version::HTTP_10 => connection_has(&headers, "keep-alive"),
        _ => !connection_has(&headers, "close"),
    };
    let te_trailers = connection_token_in(&headers, header::TE, "trailers");
    // The body is filled in by `read_request` once all of it has come.
    let mut req = Request::new(ClientBody::Full(None));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    Ok(Some(Parsed::Head(Head {
        req,
        head_len,
        body_len: body_len as usize,
        keep_alive,
        te_trailers,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_lines_are_lowercase_hex() {
        let mut b = [0u8; 18];
        for (n, want) in [
            (0usize, "0"),
            (1, "1"),
            (15, "f"),
            (16, "10"),
            (255, "ff"),
            (4096, "1000"),
            (usize::MAX, "ffffffffffffffff"),
        ] {
            assert_eq!(chunk_size_line(&mut b, n), format!("{want}\r\n").as_bytes());
        }
    }

    fn parsed(raw: &[u8]) -> Result<Option<Parsed>, Reject> {
        parse(raw)
    }

    #[test]
    fn heads_parse_with_their_length_keep_alive_and_te() {
        let raw = b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTE: trailers;q=1\r\n\r\nhello";
        let Ok(Some(Parsed::Head(h))) = parsed(raw) else {
            panic!("not parsed")
        };
        assert_eq!(h.req.method(), Method::POST);
        assert_eq!(h.req.uri().path(), "/v1/chat");
        assert_eq!(h.head_len + h.body_len, raw.len());
        assert_eq!(h.body_len, 5);
        assert!(h.keep_alive);
        assert!(h.te_trailers);

        let Ok(Some(Parsed::Head(h))) = parsed(b"GET / HTTP/1.0\r\n\r\n") else {
            panic!("not parsed")
        };
        assert!(!h.keep_alive);
        let Ok(Some(Parsed::Head(h))) =
            parsed(b"GET / HTTP/1.1\r\nconnection: Keep-Alive, CLOSE\r\n\r\n")
        else {
            panic!("not parsed")
        };
        assert!(!h.keep_alive);
        assert!(matches!(parsed(b"GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None)));
    }

    #[test]
    fn what_the_lean_path_does_not_take_goes_to_hyper() {
        for raw in [
            &b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\ncontent-length: 10\r\nexpect: 100-continue\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 65537\r\n\r\n",
        ] {
            assert!(matches!(parsed(raw), Ok(Some(Parsed::Handover))));
        }
    }

    #[test]
    fn bad_heads_are_rejected_with_a_reason() {
        for (raw, status) in [
            (&b"GET / HTTP/1.1\r\ncontent-length: 1, 2\r\n\r\n"[..], 400),
            (b"GET / HTTP/1.1\r\ncontent-length: -1\r\n\r\n", 400),
            (b"GET /\x01 HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nbad header: x\r\n\r\n", 400),
        ] {
            match parsed(raw) {
                Err((s, why)) => {
                    assert_eq!(s, status, "{}", String::from_utf8_lossy(raw));
                    assert!(!why.is_empty());
                }
                _ => panic!("accepted: {}", String::from_utf8_lossy(raw)),
            }
        }
        // Over 8 KiB, even when it came whole in one read.
        let big = format!("GET / HTTP/1.1\r\nx-big: {}\r\n\r\n", "a".repeat(9000));
        assert!(matches!(parsed(big.as_bytes()), Err((s, _)) if s == 431));
        let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(parsed(raw.as_bytes()), Err((s, _)) if s == 431));
    }

    #[test]
    fn content_length_values_must_agree() {
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("7"));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("7, 7"));
        assert_eq!(content_length(&h), Some(7));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("8"));
        assert_eq!(content_length(&h), None);
    }
}
