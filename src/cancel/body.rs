//! [`CancelBody`] and the guard that cancels on a premature drop.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio_util::sync::CancellationToken;

use crate::{EndReason, StreamInfo};

/// Cancels the token and records [`EndReason::ClientDisconnect`] when dropped while armed.
#[derive(Debug)]
pub(crate) struct Guard {
    token: CancellationToken,
    info: StreamInfo,
    armed: bool,
}

impl Guard {
    pub(crate) fn new(token: CancellationToken, info: StreamInfo) -> Self {
        Self {
            token,
            info,
            armed: true,
        }
    }

    /// A guard that watches nothing.
    pub(crate) fn disarmed() -> Self {
        Self {
            token: CancellationToken::new(),
            info: StreamInfo::new(),
            armed: false,
        }
    }

    /// The response reached its end: disarm and record why (first writer wins).
    pub(crate) fn finish(&mut self, reason: EndReason) {
        if self.armed {
            self.armed = false;
            self.info.record_end(reason);
        }
    }

    pub(crate) fn is_armed(&self) -> bool {
        self.armed
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.armed {
            // Record first, so whoever wakes on the token sees the reason.
            self.info.record_end(EndReason::ClientDisconnect);
            self.token.cancel();
        }
    }
}

pin_project! {
    /// Response body of [`CancelOnDisconnect`](super::CancelOnDisconnect): a transparent wrapper whose
    /// drop before the end of the body cancels the request's token. See the [module docs](super).
    pub struct CancelBody<B> {
        #[pin]
        inner: B,
        guard: Guard,
        // Bytes still expected when the length is known: hyper stops polling once it has them.
        remaining: Option<u64>,
    }
}

impl<B> CancelBody<B> {
    pub(crate) fn new(inner: B, guard: Guard, remaining: Option<u64>) -> Self {
        Self {
            inner,
            guard,
            remaining,
        }
    }

    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// Whether the body has not reached its end yet, so that dropping it now would cancel the token.
    pub fn is_watching(&self) -> bool {
        self.guard.is_armed()
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for CancelBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelBody")
            .field("inner", &self.inner)
            .field("watching", &self.guard.is_armed())
            .finish()
    }
}

impl<B: Body> Body for CancelBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let item = ready!(this.inner.as_mut().poll_frame(cx));
        match &item {
            None => this.guard.finish(EndReason::Complete),
            Some(Err(_)) => this.guard.finish(EndReason::UpstreamError),
            Some(Ok(frame)) => {
                let mut done = frame.is_trailers() || this.inner.is_end_stream();
                if let (Some(remaining), Some(data)) = (this.remaining.as_mut(), frame.data_ref()) {
                    *remaining = remaining.saturating_sub(data.remaining() as u64);
                    done |= *remaining == 0;
                }
                if done {
                    this.guard.finish(EndReason::Complete);
                }
            }
        }
        Poll::Ready(item)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
