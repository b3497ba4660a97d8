//! First-byte and idle deadlines for streamed responses, with keepalive injection during silence.
//!
//! [`IdleTimeoutLayer`] guards the two ways an upstream can hang a streamed response:
//!
//! - **First byte.** If the inner service has not produced response headers within
//!   [`first_byte_timeout`](IdleTimeoutLayer::first_byte_timeout), its future is dropped (which
//!   cancels the upstream request) and the client gets `504 Gateway Timeout` with
//!   `content-type: application/json` and the body
//!   `{"error":{"type":"first_byte_timeout","message":"upstream sent no response headers within 30s"}}`.
//!   The service never fails because of a timeout (so it fits axum, which requires `Infallible`);
//!   the `504` carries the [`IdleTimeoutError`] in its extensions, one `warn!` is logged, and the
//!   request's [`StreamInfo`](crate::StreamInfo) records [`EndReason::IdleTimeout`](crate::EndReason).
//! - **Idle.** The body deadline starts when the headers arrive and restarts on every frame of the
//!   upstream body (never on an injected keepalive). When it runs out, the upstream body is dropped
//!   at once (its connection is closed or its h2 stream reset right then), `EndReason::IdleTimeout` is
//!   recorded, and the body yields an [`IdleTimeoutError`] (boxed), so hyper aborts the response:
//!   no terminating chunk on HTTP/1.1, `RST_STREAM` on HTTP/2, and the client can tell the stream was
//!   truncated. The inner body is never polled again; later polls return `Ready(None)`.
//!
//! ## Keepalives
//!
//! Load balancers and clients cut connections that stay silent, and a model can think for a minute
//! before its first token. During silence the body injects a keepalive line:
//! [`keepalive_comment`](IdleTimeoutLayer::keepalive_comment) (default `: keepalive\n`) into
//! `text/event-stream` responses, and [`ndjson_keepalive`](IdleTimeoutLayer::ndjson_keepalive), only when
//! configured, into NDJSON responses (`application/x-ndjson`, `application/ndjson`, `application/jsonl`,
//! `application/x-jsonlines`, `application/jsonlines`; never `application/json-seq`, whose records start
//! with an RS byte). Like nginx, it leaves alone any response that is not an open-ended stream: a
//! response to `HEAD`, a 1xx, `204` or `304`, a response with `Content-Length` or an exactly known body
//! size, a `Content-Encoding` other than `identity`, or an already finished body.
//!
//! The exact rules (*silence* is time without a byte toward the client, upstream or injected):
//!
//! 1. After `keepalive_interval` of silence, if the stream is at a line boundary, the line is injected;
//!    while the silence lasts, again every interval. Heartbeats may start before the first upstream
//!    byte. They never restart the idle deadline.
//! 2. Every upstream frame restarts the keepalive clock, so no keepalive is sent while the upstream
//!    talks more often than the interval. A frame and an expiring interval at the same instant: the
//!    frame wins (the body polls the upstream before its timers).
//! 3. The stream is at a boundary when the last upstream byte ended a line (see
//!    [`SseTracker::at_boundary`](crate::sse::SseTracker::at_boundary)): never mid-line, and never right
//!    after a bare CR, whose LF may follow and would turn the injected line into a blank line. If the
//!    interval runs out off a boundary, the keepalive is *due*: it is injected right after the first
//!    upstream frame that ends on a boundary (unless the upstream has another frame ready at once), and
//!    the clock restarts from it. Upstream frames that leave the stream off a boundary do not cancel a
//!    due keepalive.
//! 4. A keepalive is one complete line, inserted only at a line start, so an SSE parser ignores it
//!    whether it falls between events or between the field lines of one event. It is never followed
//!    by a blank line (a blank line would dispatch an event).
//! 5. If a keepalive went out before the upstream's first byte and the upstream then opens with a
//!    UTF-8 BOM, the BOM is dropped: a decoder strips a BOM only at the very start of a stream, and
//!    after the keepalive it would sit at the start of a line and corrupt that line's field name.
//!
//! Right before yielding a keepalive the body calls
//! [`StreamInfo::note_heartbeat`](crate::StreamInfo::note_heartbeat), so outer layers can tell injected
//! bytes from upstream bytes. Per frame the body reads the clock and scans the bytes once for line ends;
//! it does not touch its timers (a timer that fires before the deadline a later frame moved is re-armed
//! then), allocate or log.
//!
//! Streams that end lines with a bare CR are only at a boundary once the byte after each CR has arrived,
//! so they receive keepalives only in the silences that follow mid-stream bytes after a CR, not after the
//! final CR of an event. Such upstreams are rare; the idle deadline still applies.
//!
//! ## Example
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body::Frame;
//! use http_body_util::{BodyExt, StreamBody};
//! use streamgate::idle_timeout::{IdleTimeoutError, IdleTimeoutKind, IdleTimeoutLayer};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // An SSE handler that sends one event, then thinks for a long time.
//! let handler = service_fn(|_req: Request<()>| async {
//!     let events = futures_util::stream::unfold(0, |n| async move {
//!         if n > 0 {
//!             tokio::time::sleep(Duration::from_secs(3600)).await;
//!         }
//!         Some((Ok::<_, Infallible>(Frame::data(Bytes::from("data: hi\n\n"))), n + 1))
//!     });
//!     let res = Response::builder()
//!         .header("content-type", "text/event-stream")
//!         .body(StreamBody::new(events))
//!         .unwrap();
//!     Ok::<_, Infallible>(res)
//! });
//!
//! let svc = ServiceBuilder::new()
//!     .layer(
//!         IdleTimeoutLayer::new()
//!             .keepalive_interval(Some(Duration::from_secs(15)))
//!             .idle_timeout(Duration::from_secs(40)),
//!     )
//!     .service(handler);
//!
//! let body = svc.oneshot(Request::new(())).await.unwrap().into_body();
//! let mut body = std::pin::pin!(body);
//! let text = |frame: Option<Result<Frame<Bytes>, _>>| frame.unwrap().unwrap().into_data().unwrap();
//! assert_eq!(text(body.frame().await), "data: hi\n\n");
//! // 15 s and 30 s of silence: keepalives.
//! assert_eq!(text(body.frame().await), ": keepalive\n");
//! assert_eq!(text(body.frame().await), ": keepalive\n");
//! // 40 s without an upstream frame: the stream is cut with an error.
//! let err = body.frame().await.unwrap().unwrap_err();
//! let err = err.downcast_ref::<IdleTimeoutError>().unwrap();
//! assert_eq!(err.kind(), IdleTimeoutKind::Idle);
//! assert_eq!(err.after(), Duration::from_secs(40));
//! # }
//! ```

mod body;
pub(crate) mod classify;
mod error;
mod layer;

pub use body::IdleTimeoutBody;
pub use error::{IdleTimeoutError, IdleTimeoutKind, InvalidKeepaliveLine};
pub use layer::{IdleTimeout, IdleTimeoutLayer, ResponseFuture};
