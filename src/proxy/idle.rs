//! Client connections served by hyper (HTTP/2, TLS, and what the lean server hands over) closed once
//! no request has been in flight on them for the client idle timeout, as nginx's `keepalive_timeout`
//! closes them, or once a write to the client has been blocked for the send timeout
//! ([`SendTimeout`]), as nginx's `send_timeout` does. hyper's HTTP/1 server has a timeout for the next request's head; its HTTP/2 server
//! has none, so an idle HTTP/2 connection (about 18 KB of the proxy's memory) stayed open for as long
//! as the client liked.
//!
//! A request is in flight from the first poll of its service call (at once on HTTP/1; on HTTP/2 in
//! the stream's task, a moment after the stream opened) until its response body is dropped
//! (finished, cut, or the client's stream reset). A timeout that ends in that moment sends a `GOAWAY`
//! the new stream still completes under, as every stream already accepted does.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;

use super::server::H2_SEND_BUF;

/// What is in flight on one connection.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    open: AtomicUsize,
    /// Requests begun so far: unchanged over a whole timeout means none began in it.
    begun: AtomicU64,
    changed: Notify,
}

impl Activity {
    /// Resolves once no request has been in flight on the connection for `timeout`.
    pub(crate) async fn idle_for(&self, timeout: Duration) {
        loop {
            let begun = self.begun.load(Ordering::SeqCst);
            if self.open.load(Ordering::SeqCst) > 0 {
                // `Notify` keeps a permit when no one waits: a request that ends between the load
                // and this wait is not missed.
                self.changed.notified().await;
                continue;
            }
            tokio::select! {
                () = crate::timers::sleep(timeout) => {
                    if self.open.load(Ordering::SeqCst) == 0
                        && self.begun.load(Ordering::SeqCst) == begun
                    {
                        return;
                    }
                }
                () = self.changed.notified() => {}
            }
        }
    }
}

/// A request in flight: counted from the call until dropped with the response body.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.open.fetch_add(1, Ordering::SeqCst);
        activity.begun.fetch_add(1, Ordering::SeqCst);
        activity.changed.notify_one();
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_one();
    }
}

/// A service whose requests count as in flight on `activity`, from `client`.
#[derive(Debug, Clone)]
pub(crate) struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    client: SocketAddr,
}

impl<S> Tracked<S> {
    pub(crate) fn new(inner: S, activity: Arc<Activity>, client: SocketAddr) -> Self {
        Self {
            inner,
            activity,
            client,
        }
    }
}

impl<S, Req, B> tower::Service<Req> for Tracked<S>
where
    S: tower::Service<Req, Response = Response<B>>,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        TrackedFuture {
            guard: Some(InFlight::begin(&self.activity)),
            inner: self.inner.call(req),
            client: self.client,
        }
    }
}

pin_project_lite::pin_project! {
    /// [`Tracked`]'s response future: the request stays in flight in its body.
    pub(crate) struct TrackedFuture<F> {
        #[pin]
        inner: F,
        guard: Option<InFlight>,
        client: SocketAddr,
    }
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        let guard = this.guard.take();
        let progress = super::stream_timeout::current();
        if let Some(p) = &progress {
            p.set_client(*this.client);
        }
        Poll::Ready(out.map(|resp| {
            resp.map(|inner| TrackedBody {
                inner,
                _guard: guard,
                progress,
                rest: None,
            })
        }))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request in flight until dropped. On HTTP/2 it tells its
    /// stream's task how it moves (the stream's send timeout, [`super::stream_timeout`]), and hands
    /// out frames no larger than what the stream may queue (`rest`: the remainder of a larger one).
    pub(crate) struct TrackedBody<B> {
        #[pin]
        inner: B,
        _guard: Option<InFlight>,
        progress: Option<Arc<super::stream_timeout::Progress>>,
        rest: Option<Bytes>,
    }
}

impl<B: Body<Data = Bytes>> Body for TrackedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let Some(progress) = this.progress else {
            return this.inner.poll_frame(cx);
        };
        let mut data = match this.rest.take() {
            Some(rest) => rest,
            None => match this.inner.poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => {
                        progress.polled(false);
                        return Poll::Ready(Some(Ok(frame)));
                    }
                },
                other => {
                    progress.polled(false);
                    return other;
                }
            },
        };
        if data.len() > H2_SEND_BUF {
            *this.rest = Some(data.split_off(H2_SEND_BUF));
        }
        progress.polled(true);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let hint = self.inner.size_hint();
        let Some(rest) = &self.rest else {
            return hint;
        };
        let held = rest.len() as u64;
        let mut out = SizeHint::new();
        out.set_lower(hint.lower().saturating_add(held));
        if let Some(upper) = hint.upper() {
            out.set_upper(upper.saturating_add(held));
        }
        out
    }
}

pin_project_lite::pin_project! {
    /// A connection whose writes fail (`TimedOut`) once one has been blocked for `limit`: the
    /// send timeout of connections served by hyper (HTTP/2, TLS). A client that keeps its connection
    /// open but reads nothing would otherwise hold every stream on it, and their upstream requests,
    /// for good. The timer exists only while a write is blocked.
    pub(crate) struct SendTimeout<IO> {
        #[pin]
        io: IO,
        limit: Duration,
        blocked: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<IO> SendTimeout<IO> {
    pub(crate) fn new(io: IO, limit: Duration) -> Self {
        Self {
            io,
            limit,
            blocked: None,
        }
    }
}

/// The send timeout of both servers, for a write that just returned `Pending`: arms `blocked` on the
/// first such write (the caller clears it on progress) and fails once it has run out (`TimedOut`).
pub(crate) fn poll_send_timeout(
    blocked: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    limit: Duration,
    cx: &mut Context<'_>,
) -> Poll<std::io::Error> {
    let timer = blocked.get_or_insert_with(|| Box::pin(crate::timers::sleep(limit)));
    std::task::ready!(timer.as_mut().poll(cx));
    tracing::info!(
        source = "client",
        "the client took nothing for {limit:?} (send_timeout): connection closed"
    );
    Poll::Ready(std::io::ErrorKind::TimedOut.into())
}

impl<IO> SendTimeout<IO> {
    /// After the inner write's answer: clear the timer on progress, arm or check it while blocked.
    fn watch<T>(
        blocked: &mut Option<Pin<Box<tokio::time::Sleep>>>,
        limit: Duration,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            *blocked = None;
            return polled;
        }
        poll_send_timeout(blocked, limit, cx).map(Err)
    }
}

impl<IO: tokio::io::AsyncRead> tokio::io::AsyncRead for SendTimeout<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite> tokio::io::AsyncWrite for SendTimeout<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write(cx, buf);
        Self::watch(this.blocked, *this.limit, cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write_vectored(cx, bufs);
        Self::watch(this.blocked, *this.limit, cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let polled = this.io.poll_flush(cx);
        Self::watch(this.blocked, *this.limit, cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn on_http2_a_frame_larger_than_a_streams_queue_is_handed_out_in_parts() {
        use http_body_util::{BodyExt, Full};
        let progress = Arc::new(super::super::stream_timeout::Progress::default());
        let body = TrackedBody {
            inner: Full::new(Bytes::from(vec![7u8; 40 << 10])),
            _guard: None,
            progress: Some(progress),
            rest: None,
        };
        tokio::pin!(body);
        let mut left = 40 << 10;
        let mut sizes = Vec::new();
        while let Some(frame) = body.frame().await {
            let n = frame.unwrap().into_data().unwrap().len();
            sizes.push(n);
            left -= n;
            // What is held back is still to come: hyper must not end the stream, nor miscount it.
            assert_eq!(body.is_end_stream(), left == 0);
            assert_eq!(body.size_hint().exact(), Some(left as u64));
        }
        assert_eq!(sizes, [16 << 10, 16 << 10, 8 << 10]);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_only_after_a_whole_timeout_with_nothing_in_flight() {
        let a = Arc::new(Activity::default());
        let t = Duration::from_secs(30);
        let start = tokio::time::Instant::now();
        a.idle_for(t).await;
        assert_eq!(start.elapsed(), t, "idle from the start");

        // A request in flight for 100 s: idle 30 s after it ends, not before.
        let guard = InFlight::begin(&a);
        let ends = tokio::spawn(async move {
            crate::timers::sleep(Duration::from_secs(100)).await;
            drop(guard);
        });
        let start = tokio::time::Instant::now();
        a.idle_for(t).await;
        assert_eq!(start.elapsed(), Duration::from_secs(130));
        ends.await.unwrap();

        // A request that begins and ends within the timeout restarts it.
        let start = tokio::time::Instant::now();
        let brief = {
            let a = a.clone();
            tokio::spawn(async move {
                crate::timers::sleep(Duration::from_secs(20)).await;
                drop(InFlight::begin(&a));
            })
        };
        a.idle_for(t).await;
        assert_eq!(start.elapsed(), Duration::from_secs(50));
        brief.await.unwrap();
    }
}
