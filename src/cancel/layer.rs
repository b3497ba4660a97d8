//! [`CancelOnDisconnectLayer`], the [`CancelOnDisconnect`] service and its [`ResponseFuture`].

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{Method, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio_util::sync::CancellationToken;
use tower::{Layer, Service};

use super::body::{CancelBody, Guard};
use crate::idle_timeout::classify::{bodiless, content_length};
use crate::{EndReason, StreamInfo};

/// Cancels a [`CancellationToken`] when the client goes away before the end of the response.
/// See the [module docs](super).
#[derive(Clone, Debug, Default)]
pub struct CancelOnDisconnectLayer {
    _priv: (),
}

impl CancelOnDisconnectLayer {
    /// A new layer. It has no settings.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for CancelOnDisconnectLayer {
    type Service = CancelOnDisconnect<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CancelOnDisconnect { inner }
    }
}

/// The service built by [`CancelOnDisconnectLayer`].
#[derive(Clone, Debug)]
pub struct CancelOnDisconnect<S> {
    inner: S,
}

impl<S> CancelOnDisconnect<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwrap the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for CancelOnDisconnect<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body,
{
    type Response = Response<CancelBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let info = StreamInfo::get_or_insert(&mut req);
        // A token already there (a server-wide shutdown token, an outer layer's) becomes the parent:
        // cancelling it reaches the handler, and a disconnect here never cancels it.
        let token = match req.extensions().get::<CancellationToken>() {
            Some(parent) => parent.child_token(),
            None => CancellationToken::new(),
        };
        req.extensions_mut().insert(token.clone());
        let head = req.method() == Method::HEAD;
        ResponseFuture {
            inner: self.inner.call(req),
            guard: Some(Guard::new(token, info)),
            head,
        }
    }
}

pin_project! {
    /// Response future of [`CancelOnDisconnect`]. Dropping it before it resolves cancels the token.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        guard: Option<Guard>,
        head: bool,
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<CancelBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        // Only `None` if polled after completion; then nothing is watched any more.
        let mut guard = this.guard.take().unwrap_or_else(Guard::disarmed);
        match result {
            Ok(res) => {
                // hyper never polls a body it will not send, and stops polling once a body of known
                // length has delivered that length: count such ends as complete, not as a disconnect.
                let length = if bodiless(*this.head, res.status()) {
                    Some(0)
                } else {
                    res.body()
                        .size_hint()
                        .exact()
                        .or_else(|| content_length(res.headers()))
                };
                if length == Some(0) || res.body().is_end_stream() {
                    guard.finish(EndReason::Complete);
                }
                Poll::Ready(Ok(res.map(|body| CancelBody::new(body, guard, length))))
            }
            Err(e) => {
                guard.finish(EndReason::UpstreamError);
                Poll::Ready(Err(e))
            }
        }
    }
}
