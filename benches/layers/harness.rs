//! A harness that drives any `http_body::Body<Data = Bytes>` wrapper over many small in-memory
//! frames, the way hyper does, so the per-frame cost of each streamgate layer can be compared with the
//! bare body.
//!
//! Two entry points:
//! - [`bench_body`]: wrap the in-memory body directly (`|inner| MyBody::new(inner)`).
//! - [`bench_layer`]: put a tower `Layer` in front of an in-memory upstream service and measure a
//!   whole request: one `call`, then every frame of the response body (per-request work is amortised
//!   over the frames).
//!
//! Both report `Throughput::Elements(frames)`, so criterion prints frames per second; the time per
//! iteration divided by the frame count is the per-frame cost.
//!
//! The upstream body comes in two paces ([`Pace`]): always ready (a burst: the worst case for
//! [`FlushBody`](streamgate::flush::FlushBody), and no timer is ever polled), or `Pending` once before
//! every frame, as a network upstream delivering one token per read is (hyper flushes at each
//! `Pending`, and wrappers with timers poll and re-arm them on every frame).

use std::convert::Infallible;
use std::fmt::Debug;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Throughput};
use http::{header, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty};
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt};

use crate::corpus::total_bytes;

/// When the upstream body has its next frame ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pace {
    /// Every frame is ready at once: a burst, or a fast in-process handler.
    Ready,
    /// `Pending` once before every frame (the body wakes its own task at once), like an upstream
    /// whose every token arrives in its own read.
    PendingBeforeEach,
}

/// A body handing out a fixed list of frames, as a fast upstream would.
///
/// Frames are `Bytes` clones of one shared list: no allocation per frame, so the bare drain measures
/// the poll machinery, not the allocator. The size is unknown (like a chunked upstream) and
/// `is_end_stream()` turns true right after the last frame, as hyper's `Incoming` does when it knows.
#[derive(Clone, Debug)]
pub(crate) struct FrameBody {
    frames: Arc<[Bytes]>,
    next: usize,
    pace: Pace,
    /// With [`Pace::PendingBeforeEach`]: the `Pending` before the next frame was returned.
    yielded: bool,
}

impl FrameBody {
    pub(crate) fn new(frames: Arc<[Bytes]>, pace: Pace) -> Self {
        Self {
            frames,
            next: 0,
            pace,
            yielded: false,
        }
    }
}

impl Body for FrameBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.pace == Pace::PendingBeforeEach && !self.yielded && !self.is_end_stream() {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.yielded = false;
        let Some(f) = self.frames.get(self.next).cloned() else {
            return Poll::Ready(None);
        };
        self.next += 1;
        Poll::Ready(Some(Ok(Frame::data(f))))
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.frames.len()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// The upstream service of [`bench_layer`]: answers every request with `200`,
/// `content-type: text/event-stream` (so the SSE trackers of the idle-timeout and trace layers run, as
/// for an LLM stream) and a fresh [`FrameBody`].
#[derive(Clone, Debug)]
pub(crate) struct Upstream {
    frames: Arc<[Bytes]>,
    pace: Pace,
}

impl Service<Request<Empty<Bytes>>> for Upstream {
    type Response = Response<FrameBody>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<FrameBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<Empty<Bytes>>) -> Self::Future {
        let mut res = Response::new(FrameBody::new(self.frames.clone(), self.pace));
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        std::future::ready(Ok(res))
    }
}

/// Drain `body` as hyper does: poll frames until `None`, an error, or `is_end_stream()` right after
/// a frame. Returns the data bytes seen.
pub(crate) async fn drain<B>(body: B) -> u64
where
    B: Body<Data = Bytes>,
    B::Error: Debug,
{
    let mut body = pin!(body);
    let mut bytes = 0u64;
    while let Some(f) = body.frame().await {
        let f = f.expect("the benchmarked body failed");
        if let Some(d) = f.data_ref() {
            bytes += d.len() as u64;
        }
        std::hint::black_box(&f);
        if body.is_end_stream() {
            break;
        }
    }
    bytes
}

/// A current-thread runtime with timers, so wrappers that arm a `tokio::time::Sleep` work.
pub(crate) fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Benchmark draining `frames` through the body `make` builds around the in-memory body.
///
/// `make` is called once per iteration (its cost is measured with the frames, amortised over them).
/// Before measuring, checks once that at least every upstream byte came out.
pub(crate) fn bench_body<B, F>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    frames: &Arc<[Bytes]>,
    pace: Pace,
    make: F,
) where
    F: Fn(FrameBody) -> B,
    B: Body<Data = Bytes>,
    B::Error: Debug,
{
    let rt = runtime();
    let expected = total_bytes(frames);
    let got = rt.block_on(drain(make(FrameBody::new(frames.clone(), pace))));
    assert!(got >= expected, "{name}: {got} bytes out of {expected} in");
    g.throughput(Throughput::Elements(frames.len() as u64));
    g.bench_function(name, |b| {
        b.iter(|| rt.block_on(drain(make(FrameBody::new(frames.clone(), pace)))))
    });
}

/// A closure that sends one request through `layer` in front of an in-memory upstream answering
/// `frames` at `pace`: `call`, then the whole response body, drained as hyper does. It returns the
/// data bytes that came out. The closure owns its current-thread runtime.
pub(crate) fn request_runner<L, B>(
    frames: &Arc<[Bytes]>,
    pace: Pace,
    layer: L,
) -> impl FnMut() -> u64
where
    L: Layer<Upstream>,
    L::Service: Service<Request<Empty<Bytes>>, Response = Response<B>>,
    <L::Service as Service<Request<Empty<Bytes>>>>::Error: Debug,
    B: Body<Data = Bytes>,
    B::Error: Debug,
{
    let rt = runtime();
    let mut svc = layer.layer(Upstream {
        frames: frames.clone(),
        pace,
    });
    move || {
        let fut = async {
            let req = Request::post("/v1/chat/completions")
                .body(Empty::new())
                .expect("a valid request");
            let res = svc
                .ready()
                .await
                .expect("service ready")
                .call(req)
                .await
                .expect("service call");
            drain(res.into_body()).await
        };
        rt.block_on(fut)
    }
}

/// Benchmark one request through `layer` (see [`request_runner`]): the `call`, then the whole
/// response body. Before measuring, checks once that at least every upstream byte came out.
pub(crate) fn bench_layer<L, B>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    frames: &Arc<[Bytes]>,
    pace: Pace,
    layer: L,
) where
    L: Layer<Upstream>,
    L::Service: Service<Request<Empty<Bytes>>, Response = Response<B>>,
    <L::Service as Service<Request<Empty<Bytes>>>>::Error: Debug,
    B: Body<Data = Bytes>,
    B::Error: Debug,
{
    let mut one_request = request_runner(frames, pace, layer);
    let expected = total_bytes(frames);
    let got = one_request();
    assert!(got >= expected, "{name}: {got} bytes out of {expected} in");
    g.throughput(Throughput::Elements(frames.len() as u64));
    g.bench_function(name, |b| b.iter(&mut one_request));
}
