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
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::Full;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower::Service;

use super::body::ClientBody;
use super::error::json_error;
use super::http1::{chunk_size_line, connection_has, content_length};
use super::idle::poll_send_timeout;
use gone::GoneWatch;
use wire::{parse, write_date, write_head, write_status, write_trailers, Head, Parsed};

mod gone;
mod wire;

/// Request heads larger than this get 431 (nginx's `large_client_header_buffers` is 8 KiB too).
pub(crate) const MAX_HEAD: usize = 8 * 1024;
/// Header lines per request (hyper's default).
const MAX_HEADERS: usize = 100;
/// Request bodies up to this size are read whole here; larger ones go to hyper, which streams them.
const MAX_BODY: u64 = 64 * 1024;
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
    /// The send timeout, in milliseconds (beside `watch`, where it costs the connection's task no
    /// room).
    send_timeout_ms: u32,
    /// Whether a read may find anything: see [`GoneWatch`].
    gone: GoneWatch,
}

/// The client connection timeouts (`client_idle_timeout`, `send_timeout`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientTimeouts {
    /// No request in flight, or a request's head and small body still coming.
    pub(crate) idle: Duration,
    /// A response of which the client takes nothing.
    pub(crate) send: Duration,
}

/// Serve one plain-TCP client connection until it closes, or until it needs hyper.
///
/// `graceful` cancelled: an idle connection closes now, a busy one after its current response. A
/// connection waiting for a request (a new one, or the rest of one, body included) is closed after
/// `timeouts.idle`; a response the client takes nothing of for `timeouts.send` is cut.
pub(crate) async fn serve<S, B>(
    io: TcpStream,
    mut svc: S,
    graceful: CancellationToken,
    timeouts: &ClientTimeouts,
) -> Served
where
    S: Service<Request<ClientBody>, Response = Response<B>, Error = Infallible>,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut conn = Conn {
        io,
        pending: Vec::new(),
        watch: true,
        send_timeout_ms: u32::try_from(timeouts.send.as_millis()).unwrap_or(u32::MAX),
        gone: GoneWatch::new(),
    };
    let mut first = true;
    loop {
        // The request is read, and the call made, in a block of its own: what only this part needs
        // (the parsed head above all) is then not part of the state kept while the response
        // streams, which is what every connection's task is sized for.
        // Ready first, while no request is held (the stack is always ready; tower asks for it).
        let Ok(()) = poll_fn(|cx| svc.poll_ready(cx)).await;
        let (mut call, method, version, mut keep_alive, te_trailers) = {
            let read = Box::pin(crate::timers::timeout(
                timeouts.idle,
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
    /// The response's header map, encoded in `head`: freed once the body has nothing ready, not
    /// between the upstream head and its relay (about 1,500 instructions for a few headers).
    spent: Option<Box<HeaderMap>>,
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
        spent: Some(Box::new(parts.headers)),
    }
}

/// One read from the client, appended to `pending`. The read lands on the stack (this is not async, so
/// the buffer is never part of the connection's future) and only what came is kept: a request head of
/// a few hundred bytes costs that much, not a 4 KiB buffer per request. Through `poll_read`, which
/// takes a short read to mean the socket is drained (`try_read` keeps the readiness until a read
/// fails): the disconnect watch armed right after a request then costs no `recv` that returns
/// `EAGAIN`.
fn read_into(
    io: &mut TcpStream,
    pending: &mut Vec<u8>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
    let mut rb = tokio::io::ReadBuf::uninit(&mut buf);
    ready!(tokio::io::AsyncRead::poll_read(Pin::new(io), cx, &mut rb))?;
    pending.extend_from_slice(rb.filled());
    Poll::Ready(Ok(rb.filled().len()))
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
                        *h.req.body_mut() = ClientBody::Right(Full::new(body));
                    }
                    return Read::Request(head.take().expect("checked above"));
                }
            }
            let read = if self.pending.is_empty() {
                tokio::select! {
                    biased;
                    _ = graceful.cancelled() => return Read::Close,
                    r = poll_fn(|cx| self.poll_read_pending(cx)) => r,
                }
            } else {
                poll_fn(|cx| self.poll_read_pending(cx)).await
            };
            match read {
                Ok(0) | Err(_) => return Read::Close,
                Ok(_) => {}
            }
        }
    }

    /// One read ([`read_into`]), polled with the [`GoneWatch`]'s waker, which wakes this task.
    fn poll_read_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut ours = Context::from_waker(self.gone.waker(cx));
        let read = read_into(&mut self.io, &mut self.pending, &mut ours);
        if read.is_pending() {
            self.gone.pending();
        }
        read
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
        // Nothing came since the last read was pending: no read (the common case, once per event).
        if !self.watch || !self.gone.may_read(cx) {
            return Poll::Pending;
        }
        loop {
            match ready!(self.poll_read_pending(cx)) {
                Ok(0) | Err(_) => return Poll::Ready(()),
                Ok(_) => {
                    if self.pending.len() >= MAX_HEAD {
                        self.watch = false;
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    /// Write all of `bufs`, watching for the client to leave while the socket is full.
    /// Write all of `bufs`. A client that takes none of them for the send timeout fails the write
    /// (`TimedOut`); its timer exists only while a write is blocked.
    async fn write_all(&mut self, bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        let mut bufs = bufs;
        IoSlice::advance_slices(&mut bufs, 0);
        let mut stalled: Option<Pin<Box<tokio::time::Sleep>>> = None;
        poll_fn(|cx| {
            while !bufs.is_empty() {
                match Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        IoSlice::advance_slices(&mut bufs, n);
                        stalled = None;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        if self.poll_gone(cx).is_ready() {
                            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
                        }
                        let send = Duration::from_millis(u64::from(self.send_timeout_ms));
                        return poll_send_timeout(&mut stalled, send, cx).map(Err);
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
        let _ = crate::timers::timeout(LINGER, linger).await;
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
            mut spent,
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
                drop(spent.take());
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
