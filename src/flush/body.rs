//! [`FlushBody`]: one data frame per flush.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// Response body of [`Flush`](super::Flush): makes hyper flush each data frame before the next
    /// frame is handed over. See the [module docs](super).
    pub struct FlushBody<B: Body> {
        #[pin]
        inner: B,
        // A frame (or error) that was ready right behind a data frame, held for one poll.
        held: Option<Result<Frame<B::Data>, B::Error>>,
        // The last poll returned a data frame and hyper has not been given a `Pending` since.
        unflushed: bool,
    }
}

impl<B: Body> FlushBody<B> {
    /// Wrap `inner`.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            held: None,
            unflushed: false,
        }
    }

    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B: Body + std::fmt::Debug> std::fmt::Debug for FlushBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlushBody")
            .field("inner", &self.inner)
            .field("holding", &self.held.is_some())
            .field("unflushed", &self.unflushed)
            .finish()
    }
}

impl<B: Body> Body for FlushBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        if let Some(item) = this.held.take() {
            *this.unflushed = matches!(&item, Ok(frame) if frame.is_data());
            return Poll::Ready(Some(item));
        }
        match this.inner.poll_frame(cx) {
            Poll::Pending => {
                // hyper flushes now, by itself.
                *this.unflushed = false;
                Poll::Pending
            }
            Poll::Ready(Some(item)) if *this.unflushed => {
                // The previous data frame still sits in hyper's write buffer. Hold this one and
                // return `Pending` once so hyper flushes first; we are ready again at once.
                *this.unflushed = false;
                *this.held = Some(item);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(Some(item)) => {
                *this.unflushed = matches!(&item, Ok(frame) if frame.is_data());
                Poll::Ready(Some(item))
            }
            // hyper writes the end and flushes by itself.
            Poll::Ready(None) => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let hint = self.inner.size_hint();
        let held = match &self.held {
            Some(Ok(frame)) => frame.data_ref().map_or(0, |d| d.remaining() as u64),
            _ => 0,
        };
        if held == 0 {
            return hint;
        }
        let mut sum = SizeHint::new();
        if let Some(upper) = hint.upper() {
            sum.set_upper(upper.saturating_add(held));
        }
        sum.set_lower(hint.lower().saturating_add(held));
        sum
    }
}
