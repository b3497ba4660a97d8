//! Bodies on the proxy path: the request body sent upstream (replayable until first polled, so a
//! request whose connection was refused can fail over), and the response body handed to the layers.

use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;

use super::drain::DrainWatch;
use super::pool::ActiveGuard;
use crate::{BoxError, EndReason, StreamInfo};

/// The client's request body: `Left`, read by hyper (HTTP/2, TLS, and HTTP/1.1 requests the lean
/// server hands over); `Right`, read whole by the lean HTTP/1.1 server of [`super::downstream`] before
/// the request went in.
pub(crate) type ClientBody = Either<Incoming, Full<Bytes>>;

/// The request body sent upstream.
///
/// The client's body sits in a shared slot until the first poll takes it. If an attempt fails before
/// anything polled the body (connection refused, say), a [`ReplayHandle`] hands the same body
/// to the next attempt. Once taken, it streams straight through with no locking.
#[derive(Debug)]
pub(crate) struct UpstreamRequestBody {
    slot: Option<Arc<Slot>>,
    taken: Option<ClientBody>,
    end_stream: bool,
    hint: SizeHint,
}

/// The client's body until an attempt takes it, and why reading it failed, if it did: the client
/// sent a body its framing does not allow (a bad chunk size line, say), or left in the middle of
/// it. That is the client's fault, not the upstream's, and answered as such (400, not 502).
#[derive(Debug)]
struct Slot {
    body: Mutex<Option<ClientBody>>,
    failed: OnceLock<String>,
}

impl UpstreamRequestBody {
    /// An empty body (health checks).
    pub(crate) fn empty() -> Self {
        Self {
            slot: None,
            taken: None,
            end_stream: true,
            hint: SizeHint::with_exact(0),
        }
    }

    /// Wrap the client's body.
    pub(crate) fn new(body: ClientBody) -> Self {
        let end_stream = body.is_end_stream();
        let hint = body.size_hint();
        if end_stream {
            return Self {
                slot: None,
                taken: None,
                end_stream,
                hint,
            };
        }
        Self {
            slot: Some(Arc::new(Slot {
                body: Mutex::new(Some(body)),
                failed: OnceLock::new(),
            })),
            taken: None,
            end_stream,
            hint,
        }
    }

    /// A handle that tells, after the attempt failed, whether another attempt can still send the body.
    pub(crate) fn replay_handle(&self) -> ReplayHandle {
        ReplayHandle {
            slot: self.slot.clone(),
            end_stream: self.end_stream,
            hint: self.hint,
        }
    }
}

/// See [`UpstreamRequestBody::replay_handle`].
#[derive(Debug)]
pub(crate) struct ReplayHandle {
    slot: Option<Arc<Slot>>,
    end_stream: bool,
    hint: SizeHint,
}

impl ReplayHandle {
    /// A fresh body for the next attempt, or `None` if the last attempt consumed the body.
    pub(crate) fn body(&self) -> Option<UpstreamRequestBody> {
        let untouched = match &self.slot {
            None => true,
            Some(slot) => slot.body.lock().map(|g| g.is_some()).unwrap_or(false),
        };
        untouched.then(|| UpstreamRequestBody {
            slot: self.slot.clone(),
            taken: None,
            end_stream: self.end_stream,
            hint: self.hint,
        })
    }

    /// Whether the request has no body at all (safe to resend whatever happened).
    pub(crate) fn is_empty(&self) -> bool {
        self.slot.is_none()
    }

    /// Why reading the client's body failed, if it did.
    pub(crate) fn client_failed(&self) -> Option<&str> {
        self.slot.as_ref()?.failed.get().map(String::as_str)
    }
}

impl Body for UpstreamRequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(slot) = &this.slot else {
            return Poll::Ready(None);
        };
        let body = match &mut this.taken {
            Some(b) => b,
            None => match slot.body.lock().ok().and_then(|mut g| g.take()) {
                Some(b) => this.taken.insert(b),
                None => return Poll::Ready(None),
            },
        };
        let frame = ready!(Pin::new(body).poll_frame(cx));
        if let Some(Err(e)) = &frame {
            let _ = slot.failed.set(super::forward::error_chain(e.as_ref()));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.taken {
            Some(b) => b.is_end_stream(),
            None => self.end_stream,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.taken {
            Some(b) => b.size_hint(),
            None => self.hint,
        }
    }
}

/// The upstream's response body: `Left` from hyper's pooled client (TLS, HTTP/2), `Right` from the
/// lean HTTP/1.1 client (plain HTTP/1.1 endpoints).
pub(crate) type UpstreamBody = Either<Incoming, super::h1::H1Body>;

/// What the proxy's forwarding service answers with: the upstream's streamed body, or a short body of its
/// own (errors).
#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Upstream(Box<UpstreamStream>),
}

/// The upstream's response body plus what lives exactly as long as the stream: the capacity permit, the
/// endpoint's active-stream count, and the drain deadline.
struct UpstreamStream {
    body: Option<UpstreamBody>,
    info: StreamInfo,
    deadline: DrainWatch,
    metrics: Option<crate::trace::StreamMetrics>,
    _permit: Option<OwnedSemaphorePermit>,
    active: ActiveGuard,
}

impl std::fmt::Debug for UpstreamStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamStream")
            .field("body", &self.body)
            .finish_non_exhaustive()
    }
}

/// The stream was ended because the proxy is shutting down and the drain timeout passed.
#[derive(Debug)]
pub struct ShutdownError;

impl std::fmt::Display for ShutdownError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stream ended: the proxy is shutting down and the drain timeout passed")
    }
}

impl std::error::Error for ShutdownError {}

impl ProxyBody {
    /// A complete body of these bytes.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let b = bytes.into();
        Self {
            kind: Kind::Full((!b.is_empty()).then_some(b)),
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self {
            kind: Kind::Full(None),
        }
    }

    pub(crate) fn upstream(
        body: UpstreamBody,
        info: StreamInfo,
        deadline: DrainWatch,
        permit: Option<OwnedSemaphorePermit>,
        active: ActiveGuard,
        metrics: Option<crate::trace::StreamMetrics>,
    ) -> Self {
        Self {
            kind: Kind::Upstream(Box::new(UpstreamStream {
                body: Some(body),
                info,
                deadline,
                metrics,
                _permit: permit,
                active,
            })),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(s) => {
                let Some(body) = s.body.as_mut() else {
                    return Poll::Ready(None);
                };
                // Data first, then the drain deadline.
                if let Poll::Ready(frame) = Pin::new(body).poll_frame(cx) {
                    return Poll::Ready(match frame {
                        Some(Ok(f)) => Some(Ok(f)),
                        Some(Err(e)) => {
                            s.body = None;
                            s.info.record_end(EndReason::UpstreamError);
                            if let Some(m) = &s.metrics {
                                m.upstream_error(s.active.label());
                            }
                            tracing::warn!(endpoint = s.active.label(), source = "upstream", error = %e, "upstream failed mid-stream");
                            Some(Err(e))
                        }
                        None => {
                            s.body = None;
                            None
                        }
                    });
                }
                ready!(s.deadline.poll(cx));
                // Drop the upstream body now: that closes (HTTP/1.1) or resets (HTTP/2) the upstream stream.
                s.body = None;
                s.info.record_end(EndReason::Shutdown);
                Poll::Ready(Some(Err(Box::new(ShutdownError))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(s) => s.body.as_ref().is_none_or(|b| b.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(s) => s
                .body
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint()),
        }
    }
}
