//! One frame per flush, and downstream buffering switched off, for streamed responses.
//!
//! hyper 1.x writes a response body into its write buffer and flushes the buffer to the socket only
//! when a poll of the body returns `Pending`. When an upstream delivers several frames at once (a burst
//! of tokens read from one TCP segment, or a fast handler), hyper batches them into one write and the
//! client sees them late and together.
//!
//! [`FlushBody`] fixes that without adding delay: it forwards frames as they come, and when a frame is
//! already ready right behind a data frame it holds that frame, wakes its own task and returns `Pending`
//! once, so hyper flushes the previous frame before it takes the next one. When the upstream itself is
//! `Pending` between frames (the usual case for a token stream) hyper flushes anyway and `FlushBody`
//! adds nothing: no extra poll, no extra wake. An error right behind a data frame is held the same way,
//! so the last good bytes reach the client before the stream is aborted. The end of the body
//! (`Ready(None)`) is not held: hyper flushes at the end by itself. `is_end_stream` and `size_hint` are
//! forwarded exactly (a held frame counts as not yet sent). The cost is one extra task wake-up per data
//! frame *only* while frames arrive back to back; the wrapper holds at most one frame and never
//! allocates.
//!
//! ## Anti-buffering headers
//!
//! Proxies in front of streamgate (nginx, some CDNs) buffer responses unless told not to. With
//! [`anti_buffering_headers`](FlushLayer::anti_buffering_headers) on (the default), responses are
//! handled by kind (1xx, `204` and `304` responses are never touched):
//!
//! | response | changes |
//! |---|---|
//! | `text/event-stream` | `X-Accel-Buffering: no`; `Cache-Control` gains `no-cache` and `no-transform`; `Content-Length` removed |
//! | NDJSON (`application/x-ndjson`, `application/ndjson`, `application/jsonl`, `application/x-jsonlines`, `application/jsonlines`) | `X-Accel-Buffering: no`; `Cache-Control` gains `no-cache` and `no-transform` |
//! | any other type with no `Content-Length` and no exactly known body size (a chunked stream) | `X-Accel-Buffering: no` only: caching semantics of generic responses are left alone |
//! | anything else (a body of known length) | nothing |
//!
//! An `X-Accel-Buffering` already set by the upstream is kept, as nginx honours the upstream's. The
//! `Cache-Control` merge keeps every directive the upstream sent and adds only the missing ones
//! (`no-transform` tells intermediaries not to compress or re-chunk).
//!
//! streamgate never compresses event streams: a compressor buffers its input, which would undo the
//! per-frame flush. If an application adds a compression layer, it must exclude `text/event-stream`
//! (as tower-http's `NotForContentType::SSE` does).
//!
//! ## Example
//!
//! ```
//! use std::convert::Infallible;
//! use std::pin::pin;
//! use std::task::{Context, Poll, Waker};
//!
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body::{Body, Frame};
//! use http_body_util::StreamBody;
//! use streamgate::flush::FlushLayer;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // A handler whose two events are ready at once.
//! let handler = service_fn(|_req: Request<()>| async {
//!     let frames = ["data: a\n\n", "data: b\n\n"].map(|s| Ok::<_, Infallible>(Frame::data(Bytes::from(s))));
//!     let res = Response::builder()
//!         .header("content-type", "text/event-stream")
//!         .body(StreamBody::new(futures_util::stream::iter(frames)))
//!         .unwrap();
//!     Ok::<_, Infallible>(res)
//! });
//! let svc = ServiceBuilder::new().layer(FlushLayer::new()).service(handler);
//!
//! let res = svc.oneshot(Request::new(())).await.unwrap();
//! assert_eq!(res.headers()["x-accel-buffering"], "no");
//! assert_eq!(res.headers()["cache-control"], "no-cache, no-transform");
//!
//! // What hyper sees: a `Pending` between the two ready frames, so it flushes the first alone.
//! let mut body = pin!(res.into_body());
//! let mut cx = Context::from_waker(Waker::noop());
//! assert!(matches!(body.as_mut().poll_frame(&mut cx), Poll::Ready(Some(Ok(_)))));
//! assert!(body.as_mut().poll_frame(&mut cx).is_pending());
//! assert!(matches!(body.as_mut().poll_frame(&mut cx), Poll::Ready(Some(Ok(_)))));
//! assert!(matches!(body.as_mut().poll_frame(&mut cx), Poll::Ready(None)));
//! # }
//! ```

mod body;
mod layer;

pub use body::FlushBody;
pub use layer::{Flush, FlushLayer, ResponseFuture, X_ACCEL_BUFFERING};
