//! Test support shared by the `layers_*` tests: a scripted response body driven by tokio's clock, a
//! probe to observe it, and helpers to run a layer around one scripted response and drain a body
//! with virtual timestamps.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use streamgate::idle_timeout::IdleTimeoutLayer;
use streamgate::{BoxError, StreamInfo};
use tokio::time::{Instant, Sleep};
use tower::{service_fn, Layer, Service, ServiceExt};

/// One step of a [`ScriptedBody`].
#[derive(Debug)]
pub(crate) enum Step {
    /// Yield a data frame.
    Data(Bytes),
    /// Yield a trailers frame.
    Trailers(HeaderMap),
    /// Return `Pending` until this much (virtual) time has passed.
    Wait(Duration),
    /// Yield an error.
    Error(&'static str),
    /// Return `Pending` forever without arranging a wake-up.
    Hang,
}

/// The error a [`ScriptedBody`] yields.
#[derive(Debug)]
pub(crate) struct ScriptError(pub(crate) &'static str);

impl fmt::Display for ScriptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "scripted upstream error: {}", self.0)
    }
}

impl std::error::Error for ScriptError {}

#[derive(Debug, Default)]
struct ProbeState {
    dropped: AtomicBool,
    ended: AtomicBool,
    polls: AtomicUsize,
    polls_after_end: AtomicUsize,
}

/// Observes a [`ScriptedBody`] from the outside.
#[derive(Clone, Debug, Default)]
pub(crate) struct Probe(Arc<ProbeState>);

impl Probe {
    /// Whether the body was dropped.
    pub(crate) fn dropped(&self) -> bool {
        self.0.dropped.load(Ordering::SeqCst)
    }
    /// How many times `poll_frame` was called.
    pub(crate) fn polls(&self) -> usize {
        self.0.polls.load(Ordering::SeqCst)
    }
    /// How many times `poll_frame` was called after the body yielded an error or `None`.
    pub(crate) fn polls_after_end(&self) -> usize {
        self.0.polls_after_end.load(Ordering::SeqCst)
    }
}

/// A response body that plays a script of frames, waits (on tokio's clock), errors and hangs.
#[derive(Debug)]
pub(crate) struct ScriptedBody {
    steps: VecDeque<Step>,
    sleep: Option<Pin<Box<Sleep>>>,
    probe: Probe,
    end_when_empty: bool,
    exact: bool,
    ended: bool,
}

impl Default for ScriptedBody {
    fn default() -> Self {
        Self::new()
    }
}

impl ScriptedBody {
    /// An empty script (yields `None` at once).
    pub(crate) fn new() -> Self {
        Self {
            steps: VecDeque::new(),
            sleep: None,
            probe: Probe::default(),
            end_when_empty: false,
            exact: false,
            ended: false,
        }
    }
    /// Append a data frame.
    pub(crate) fn data(mut self, bytes: impl Into<Bytes>) -> Self {
        self.steps.push_back(Step::Data(bytes.into()));
        self
    }
    /// Append a wait of `ms` milliseconds.
    pub(crate) fn wait_ms(self, ms: u64) -> Self {
        self.wait(Duration::from_millis(ms))
    }
    /// Append a wait of `secs` seconds.
    pub(crate) fn wait_s(self, secs: u64) -> Self {
        self.wait(Duration::from_secs(secs))
    }
    /// Append a wait.
    pub(crate) fn wait(mut self, d: Duration) -> Self {
        self.steps.push_back(Step::Wait(d));
        self
    }
    /// Append a trailers frame.
    pub(crate) fn trailers(mut self, map: HeaderMap) -> Self {
        self.steps.push_back(Step::Trailers(map));
        self
    }
    /// Append an error.
    pub(crate) fn error(mut self, msg: &'static str) -> Self {
        self.steps.push_back(Step::Error(msg));
        self
    }
    /// Append an endless silence.
    pub(crate) fn hang(mut self) -> Self {
        self.steps.push_back(Step::Hang);
        self
    }
    /// Report `is_end_stream() == true` as soon as no frame is left to yield (like `Full`).
    pub(crate) fn report_end(mut self) -> Self {
        self.end_when_empty = true;
        self
    }
    /// Report an exact size hint: the length of the data frames not yet yielded.
    pub(crate) fn exact_size(mut self) -> Self {
        self.exact = true;
        self
    }
    /// A probe observing this body.
    pub(crate) fn probe(&self) -> Probe {
        self.probe.clone()
    }

    fn no_frames_left(&self) -> bool {
        self.steps.iter().all(|s| matches!(s, Step::Wait(_)))
    }
}

impl Drop for ScriptedBody {
    fn drop(&mut self) {
        self.probe.0.dropped.store(true, Ordering::SeqCst);
    }
}

impl Body for ScriptedBody {
    type Data = Bytes;
    type Error = ScriptError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ScriptError>>> {
        let this = &mut *self;
        this.probe.0.polls.fetch_add(1, Ordering::SeqCst);
        if this.ended {
            this.probe.0.polls_after_end.fetch_add(1, Ordering::SeqCst);
            return Poll::Ready(None);
        }
        loop {
            match this.steps.front_mut() {
                None => {
                    this.ended = true;
                    this.probe.0.ended.store(true, Ordering::SeqCst);
                    return Poll::Ready(None);
                }
                Some(Step::Wait(d)) => {
                    let d = *d;
                    let sleep = this
                        .sleep
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(d)));
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    this.sleep = None;
                    this.steps.pop_front();
                }
                Some(Step::Hang) => return Poll::Pending,
                Some(_) => {
                    let frame = match this.steps.pop_front() {
                        Some(Step::Data(b)) => Ok(Frame::data(b)),
                        Some(Step::Trailers(t)) => Ok(Frame::trailers(t)),
                        Some(Step::Error(msg)) => {
                            this.ended = true;
                            Err(ScriptError(msg))
                        }
                        _ => unreachable!("matched above"),
                    };
                    return Poll::Ready(Some(frame));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || (self.end_when_empty && self.no_frames_left())
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            // The bytes of the data frames still to come.
            let rest = self.steps.iter().map(|s| match s {
                Step::Data(b) => b.len() as u64,
                _ => 0,
            });
            return SizeHint::with_exact(rest.sum());
        }
        let mut h = SizeHint::new();
        h.set_lower(1);
        h
    }
}

/// A response with `content-type` set (if given) and `body`.
pub(crate) fn response<B>(content_type: Option<&str>, body: B) -> Response<B> {
    let mut res = Response::new(body);
    if let Some(ct) = content_type {
        res.headers_mut()
            .insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
    }
    res
}

/// A request carrying a fresh `StreamInfo`, returned alongside so the test can read the end reason.
pub(crate) fn request() -> (Request<()>, StreamInfo) {
    let mut req = Request::new(());
    let info = StreamInfo::get_or_insert(&mut req);
    (req, info)
}

/// Call `layer` around a service that answers `res` once (after `delay`), with `req`.
pub(crate) async fn call_with<L, B>(
    layer: L,
    req: Request<()>,
    delay: Duration,
    res: Response<B>,
) -> <L::Service as Service<Request<()>>>::Response
where
    L: Layer<tower::util::ServiceFn<Box<dyn FnMut(Request<()>) -> ResFut<B> + Send>>>,
    L::Service: Service<Request<()>>,
    <L::Service as Service<Request<()>>>::Error: fmt::Debug,
    B: Send + 'static,
{
    let mut slot = Some(res);
    let handler: Box<dyn FnMut(Request<()>) -> ResFut<B> + Send> = Box::new(move |_req| {
        let res = slot.take().expect("the scripted service answers once");
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            Ok(res)
        })
    });
    let svc = layer.layer(service_fn(handler));
    within(Duration::from_secs(24 * 3600), svc.oneshot(req))
        .await
        .expect("the layered service does not fail")
}

/// The future type of the scripted service.
pub(crate) type ResFut<B> = Pin<Box<dyn Future<Output = Result<Response<B>, Infallible>> + Send>>;

/// Await `fut` with an outer timeout (virtual under a paused clock), panicking if it runs out.
pub(crate) async fn within<F: Future>(limit: Duration, fut: F) -> F::Output {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?}"))
}

/// What a drained body produced.
#[derive(Debug)]
pub(crate) enum Item {
    /// A data frame.
    Data(Bytes),
    /// A trailers frame.
    Trailers(HeaderMap),
    /// An error (boxed).
    Error(BoxError),
    /// `Ready(None)`.
    End,
}

impl Item {
    /// The data, if this is a data frame.
    pub(crate) fn data(&self) -> Option<&[u8]> {
        match self {
            Item::Data(b) => Some(b),
            _ => None,
        }
    }
}

/// Poll `body` to its end (`None` or an error), recording the (virtual) time since `start` of each
/// item. Gives up with a panic after a day of virtual time.
///
/// The body is polled in a task of its own, as a server polls a response body: a task's waker is
/// the same at every poll (`Waker::will_wake`), which the layers rely on to skip re-registering it.
/// The test's own waker would not do: its clones do not compare equal to it.
pub(crate) async fn drain<B>(body: B, start: Instant) -> Vec<(Duration, Item)>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    drain_and_keep(body, start).await.0
}

/// [`drain`], giving the body back too (to poll it after its end).
pub(crate) async fn drain_and_keep<B>(
    body: B,
    start: Instant,
) -> (Vec<(Duration, Item)>, Pin<Box<B>>)
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let task = tokio::spawn(within(Duration::from_secs(24 * 3600), async move {
        let mut body = Box::pin(body);
        let mut out = Vec::new();
        loop {
            let next = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
            let at = start.elapsed();
            let item = match next {
                None => Item::End,
                Some(Err(e)) => Item::Error(e.into()),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) => Item::Data(d),
                    Err(frame) => Item::Trailers(frame.into_trailers().expect("data or trailers")),
                },
            };
            let last = matches!(item, Item::End | Item::Error(_));
            out.push((at, item));
            if last {
                break;
            }
        }
        (out, body)
    }));
    match task.await {
        Ok(out) => out,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// The data frames of a drained body as `(millis, text)` pairs, for compact assertions.
pub(crate) fn texts(items: &[(Duration, Item)]) -> Vec<(u128, String)> {
    items
        .iter()
        .filter_map(|(at, item)| {
            item.data()
                .map(|d| (at.as_millis(), String::from_utf8_lossy(d).into_owned()))
        })
        .collect()
}

/// The default SSE keepalive line.
pub(crate) const KA: &str = ": keepalive\n";
/// The event-stream content type.
pub(crate) const SSE: Option<&str> = Some("text/event-stream");

/// An IdleTimeoutLayer with the given keepalive interval and idle timeout, in seconds.
pub(crate) fn layer(ka_s: u64, idle_s: u64) -> IdleTimeoutLayer {
    IdleTimeoutLayer::new()
        .keepalive_interval(Some(Duration::from_secs(ka_s)))
        .idle_timeout(Duration::from_secs(idle_s))
}

/// A `(millis, text)` pair, as [`texts`] returns.
pub(crate) fn t(ms: u128, s: &str) -> (u128, String) {
    (ms, s.to_owned())
}

/// Run `layer` around one response with `body`, returning the drained items and the request's info.
pub(crate) async fn run(
    layer: IdleTimeoutLayer,
    ct: Option<&str>,
    body: ScriptedBody,
) -> (Vec<(Duration, Item)>, streamgate::StreamInfo) {
    let (req, info) = request();
    let start = Instant::now();
    let res = call_with(layer, req, Duration::ZERO, response(ct, body)).await;
    (drain(res.into_body(), start).await, info)
}

/// The time (ms) and kind of the last drained item.
pub(crate) fn end_at(items: &[(Duration, Item)]) -> (u128, &Item) {
    let (at, item) = items.last().expect("drained at least the end");
    (at.as_millis(), item)
}
