//! [`IdleTimeoutBody`]: the idle deadline and keepalive injection around a response body.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::error::{IdleTimeoutError, IdleTimeoutKind};
use crate::sse::SseTracker;
use crate::{BoxError, EndReason, StreamInfo};

const UTF8_BOM: &[u8; 3] = b"\xEF\xBB\xBF";

/// `now + d`, or a point about 30 years ahead if that overflows (so `Duration::MAX` means "never").
pub(crate) fn deadline_after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 86_400))
}

pin_project! {
    /// Response body of [`IdleTimeout`](super::IdleTimeout). See the [module docs](super).
    ///
    /// Either the upstream body under the idle deadline (with keepalive injection for streams), or the
    /// fixed JSON body of a first-byte `504`.
    pub struct IdleTimeoutBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Stream {
            // `None` once the stream ended, failed or was cut: the upstream body is dropped right then.
            #[pin]
            inner: Option<B>,
            // The two timers, boxed: a `Sleep` is 112 bytes, and the body moves through every outer
            // layer before it is boxed for good.
            timers: Pin<Box<Timers>>,
            idle_after: Duration,
            // When the last upstream frame arrived (the stream's start before the first).
            last: Instant,
            state: Option<Keepalive>,
            info: StreamInfo,
        },
        Fixed {
            data: Option<Bytes>,
        },
    }
}

pin_project! {
    /// The timers of a stream.
    struct Timers {
        // Armed for `last + idle_after` at the latest; frames only move `last`, and a timer that
        // fires early is re-armed then (one timer operation per period, not one per frame).
        #[pin]
        idle: Sleep,
        // Present only for responses that may receive keepalives.
        #[pin]
        keepalive: Option<Sleep>,
        // The waker both timers were last polled with while neither had fired. While the task's
        // waker is the same and neither has fired since, polling them again changes nothing: each
        // holds the waker until it fires. `None` after a timer is reset without being polled.
        polled: Option<Waker>,
    }
}

/// Keepalive bookkeeping; see the module docs for the exact timing rules.
#[derive(Debug)]
struct Keepalive {
    interval: Duration,
    line: Bytes,
    tracker: SseTracker,
    /// The interval ran out while the stream was not at a boundary: inject at the next boundary.
    due: bool,
    /// A non-empty upstream data frame was forwarded.
    started: bool,
    /// Some(k): a keepalive went out before the upstream's first byte, and the first k bytes of the
    /// upstream matched (and were withheld as) a UTF-8 BOM prefix. See [`Keepalive::forward`].
    bom: Option<u8>,
    /// The next keepalive is due `interval` after this: the last upstream frame or keepalive. As for
    /// the idle deadline, the timer may fire earlier and is then re-armed.
    since: Instant,
    /// Non-empty data frames forwarded: the tracker's counts are published with it
    /// ([`StreamInfo::publish_scan`]), for the tracing layer.
    frames: u64,
}

impl Keepalive {
    /// Account for an upstream data chunk and return the bytes to forward (`None`: withheld, poll again).
    ///
    /// A BOM is meaningful only as the first bytes of a stream. If a keepalive already went out, an
    /// upstream BOM would land at the start of a line and corrupt its first field, so it is dropped
    /// (the client's decoder would have dropped it anyway). A partial match is withheld; on a mismatch
    /// the withheld bytes are given back (a rare path that allocates once).
    fn forward(&mut self, data: Bytes, info: &StreamInfo) -> Option<Bytes> {
        let out = match self.bom {
            Some(k) if !data.is_empty() => {
                let k = usize::from(k);
                let rest = &UTF8_BOM[k..];
                let n = rest.len().min(data.len());
                if data[..n] == rest[..n] {
                    if n < rest.len() {
                        self.bom = Some((k + n) as u8);
                        return None;
                    }
                    self.bom = None;
                    data.slice(n..)
                } else {
                    self.bom = None;
                    if k == 0 {
                        data
                    } else {
                        let mut joined = BytesMut::with_capacity(k + data.len());
                        joined.extend_from_slice(&UTF8_BOM[..k]);
                        joined.extend_from_slice(&data);
                        joined.freeze()
                    }
                }
            }
            _ => data,
        };
        if !out.is_empty() {
            self.started = true;
            self.tracker.observe(&out);
            self.frames += 1;
            info.publish_scan(self.frames, self.tracker.events(), self.tracker.lines());
        }
        Some(out)
    }
}

impl<B> IdleTimeoutBody<B> {
    pub(crate) fn stream(
        inner: B,
        idle_after: Duration,
        keepalive: Option<(Duration, Bytes)>,
        info: StreamInfo,
    ) -> Self {
        let now = Instant::now();
        let (sleep, state) = match keepalive {
            Some((interval, line)) => (
                Some(crate::timers::sleep_until(deadline_after(now, interval))),
                Some(Keepalive {
                    interval,
                    line,
                    tracker: SseTracker::new(),
                    due: false,
                    started: false,
                    bom: None,
                    since: now,
                    frames: 0,
                }),
            ),
            None => (None, None),
        };
        if state.is_some() {
            info.will_publish_scan();
        }
        Self {
            kind: Kind::Stream {
                inner: Some(inner),
                timers: Box::pin(Timers {
                    idle: crate::timers::sleep_until(deadline_after(now, idle_after)),
                    keepalive: sleep,
                    polled: None,
                }),
                idle_after,
                last: now,
                state,
                info,
            },
        }
    }

    pub(crate) fn fixed(data: Bytes) -> Self {
        Self {
            kind: Kind::Fixed { data: Some(data) },
        }
    }

    /// Whether keepalives may be injected into this body (an SSE or configured NDJSON stream).
    pub fn injects_keepalives(&self) -> bool {
        matches!(&self.kind, Kind::Stream { state: Some(_), .. })
    }
}

impl<B> std::fmt::Debug for IdleTimeoutBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Stream {
                inner,
                idle_after,
                state,
                ..
            } => f
                .debug_struct("IdleTimeoutBody")
                .field("open", &inner.is_some())
                .field("idle_after", idle_after)
                .field("keepalive", state)
                .finish(),
            Kind::Fixed { data } => f
                .debug_struct("IdleTimeoutBody")
                .field("fixed", data)
                .finish(),
        }
    }
}

impl<B> Body for IdleTimeoutBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Fixed { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Stream {
                inner,
                timers,
                idle_after,
                last,
                state,
                info,
            } => {
                let timers = timers.as_mut().project();
                poll_stream(
                    cx,
                    inner,
                    (timers.idle, *idle_after, last),
                    (timers.keepalive, timers.polled),
                    state,
                    info,
                )
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Stream { inner, .. } => inner.as_ref().is_none_or(Body::is_end_stream),
            Kind::Fixed { data } => data.as_ref().is_none_or(Bytes::is_empty),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Stream {
                inner: Some(inner),
                state,
                ..
            } => {
                let hint = inner.size_hint();
                if state.is_some() {
                    // Keepalives add bytes: keep the lower bound only.
                    let mut open = SizeHint::new();
                    open.set_lower(hint.lower());
                    open
                } else {
                    hint
                }
            }
            Kind::Stream { inner: None, .. } => SizeHint::with_exact(0),
            Kind::Fixed { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// The stream case of [`IdleTimeoutBody::poll_frame`], on the projected fields.
fn poll_stream<B>(
    cx: &mut Context<'_>,
    mut inner: Pin<&mut Option<B>>,
    (mut idle, idle_after, last): (Pin<&mut Sleep>, Duration, &mut Instant),
    (keepalive, polled): (Pin<&mut Option<Sleep>>, &mut Option<Waker>),
    state: &mut Option<Keepalive>,
    info: &StreamInfo,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    loop {
        let Some(body) = inner.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        // Data first: an upstream frame ready at a deadline wins.
        match body.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *last = Instant::now();
                let Some(ka) = state.as_mut() else {
                    return Poll::Ready(Some(Ok(frame)));
                };
                if !ka.due {
                    ka.since = *last;
                }
                return match frame.into_data() {
                    Ok(data) => match ka.forward(data, info) {
                        Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                        None => continue,
                    },
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                };
            }
            Poll::Ready(Some(Err(e))) => {
                inner.set(None);
                info.record_end(EndReason::UpstreamError);
                return Poll::Ready(Some(Err(e.into())));
            }
            Poll::Ready(None) => {
                inner.set(None);
                info.record_end(EndReason::Complete);
                return Poll::Ready(None);
            }
            Poll::Pending => break,
        }
    }
    // The common case, once per upstream frame: neither timer has fired and both already hold this
    // waker. Polling them (about 300 instructions for the two) would only register it again.
    let kept = polled.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
    if kept
        && !idle.is_elapsed()
        && keepalive
            .as_ref()
            .as_pin_ref()
            .is_none_or(|k| !k.is_elapsed())
    {
        return Poll::Pending;
    }
    if expired(idle.as_mut(), deadline_after(*last, idle_after), cx) {
        // Drop the upstream body now: that closes its connection or resets its stream.
        inner.set(None);
        info.record_end(EndReason::IdleTimeout);
        tracing::warn!(
            source = "upstream",
            kind = IdleTimeoutKind::Idle.as_str(),
            timeout = %humantime::format_duration(idle_after),
            "upstream body was silent too long; stream cut"
        );
        let err = IdleTimeoutError::new(IdleTimeoutKind::Idle, idle_after);
        return Poll::Ready(Some(Err(Box::new(err))));
    }
    if let (Some(ka), Some(mut timer)) = (state.as_mut(), keepalive.as_pin_mut()) {
        // Once due, the timer stays expired until a keepalive goes out.
        if ka.due || expired(timer.as_mut(), deadline_after(ka.since, ka.interval), cx) {
            if !ka.tracker.at_boundary() {
                // The timer stays expired; the next frame that reaches a boundary releases it.
                ka.due = true;
                remember(polled, kept, cx);
                return Poll::Pending;
            }
            ka.due = false;
            ka.since = Instant::now();
            timer.reset(deadline_after(ka.since, ka.interval));
            // Reset and not polled since: poll it again before trusting it to hold the waker.
            *polled = None;
            if !ka.started && ka.bom.is_none() {
                ka.bom = Some(0);
            }
            info.note_heartbeat(ka.line.len());
            return Poll::Ready(Some(Ok(Frame::data(ka.line.clone()))));
        }
    }
    remember(polled, kept, cx);
    Poll::Pending
}

/// After the timers were polled and are pending: remember the waker they hold. Not if the task's
/// budget ran out: a timer polled then registers nothing (tokio's cooperative scheduling), so the
/// next poll must poll it again.
fn remember(polled: &mut Option<Waker>, kept: bool, cx: &Context<'_>) {
    if !tokio::task::coop::has_budget_remaining() {
        *polled = None;
    } else if !kept {
        *polled = Some(cx.waker().clone());
    }
}

/// Whether `deadline` has passed. The timer may be armed earlier than `deadline` (frames move the
/// deadline without touching the timer): when it fires early, it is re-armed for `deadline`.
fn expired(mut timer: Pin<&mut Sleep>, deadline: Instant, cx: &mut Context<'_>) -> bool {
    if timer.as_mut().poll(cx).is_pending() {
        return false;
    }
    if deadline <= Instant::now() {
        return true;
    }
    timer.as_mut().reset(deadline);
    // Registers the waker for the new deadline (it cannot have passed yet, unless it just did).
    timer.poll(cx).is_ready()
}
