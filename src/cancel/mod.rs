//! Client disconnect → cancellation token, so abandoned generation stops at once.
//!
//! When a client closes the connection, hyper drops the response future (if the headers were not sent
//! yet) or the response body (mid-stream). [`CancelOnDisconnectLayer`] turns that drop into a signal:
//!
//! - Each request gets a [`CancellationToken`] in its extensions. A handler reads it with
//!   `req.extensions().get::<CancellationToken>()` (or axum's `Extension<CancellationToken>`) and selects
//!   on [`cancelled()`](CancellationToken::cancelled), or hands it to the task that generates tokens.
//!   If the request already carries a token (a server-wide shutdown token, say), the layer inserts a
//!   [child](CancellationToken::child_token) of it instead: cancelling the parent still reaches the
//!   handler, and a disconnect cancels only this request.
//! - The token is cancelled exactly once, when the client goes away: the [`ResponseFuture`] is dropped
//!   before it resolves, or the [`CancelBody`] is dropped before the end of the body. The end is
//!   `Ready(None)`, an error, a trailers frame, `is_end_stream()` right after a frame, or, for a body of
//!   known length, its last byte (hyper stops polling there); a response hyper does not send a body for
//!   (`HEAD`, 1xx, `204`, `304`) or an empty body ends when the response resolves.
//! - It records in the request's [`StreamInfo`](crate::StreamInfo) (first writer wins, so a cause
//!   recorded further in, such as an idle timeout, stands): `ClientDisconnect` on such a drop,
//!   `Complete` at a clean end, `UpstreamError` when the inner body or service fails.
//! - It never cancels after the end, clean or failed: an upstream failure is not the client leaving.
//!
//! The wrapper adds nothing to the response and forwards `is_end_stream` and `size_hint` exactly. Per
//! frame it does a length subtraction at most.
//!
//! How quickly hyper notices a client that has gone (measured in `tests/layers_wire.rs`): over
//! HTTP/1.1, hyper watches the socket for EOF while the response is pending or streaming, and drops
//! the response future or body within a millisecond of a FIN or RST, but only once the request body
//! has been read to its end. A request body the handler has not consumed (or the client has not finished
//! sending) hides the EOF, and the handler keeps running until a write to the socket fails. A proxy
//! that forwards the request body to its upstream consumes it, so this matters for handlers that
//! ignore a request body. Over HTTP/2 a client's `RST_STREAM` drops the stream at once.
//!
//! ## Example
//!
//! ```
//! use std::convert::Infallible;
//!
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use streamgate::cancel::CancelOnDisconnectLayer;
//! use tokio_util::sync::CancellationToken;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
//! let handler = service_fn(move |req: Request<()>| {
//!     let token = req.extensions().get::<CancellationToken>().unwrap().clone();
//!     let tx = tx.clone();
//!     async move {
//!         // The generation runs in its own task and stops when the client leaves.
//!         tokio::spawn(async move {
//!             token.cancelled().await;
//!             tx.send("stopped").unwrap();
//!         });
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("data: 1\n\n"))))
//!     }
//! });
//! let svc = ServiceBuilder::new().layer(CancelOnDisconnectLayer::new()).service(handler);
//!
//! let res = svc.oneshot(Request::new(())).await.unwrap();
//! drop(res); // the client went away before reading the body
//! assert_eq!(rx.recv().await, Some("stopped"));
//! # }
//! ```

mod body;
mod layer;

pub use body::CancelBody;
pub use layer::{CancelOnDisconnect, CancelOnDisconnectLayer, ResponseFuture};
/// The token type put in request extensions, re-exported from `tokio_util` for handlers.
pub use tokio_util::sync::CancellationToken;
