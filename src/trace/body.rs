//! The response body wrapper and the per-request state it shares with the response future.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body::{Body, Frame, SizeHint};
use opentelemetry::trace::TraceContextExt;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::metrics::{StreamEnd, StreamMetrics};
use crate::sse::SseTracker;
use crate::{BoxError, EndReason, ErrorSource, StreamInfo};

/// How the body is framed, which decides what "events" counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `text/event-stream`: events are blank-line-dispatched SSE events.
    Sse,
    /// NDJSON / JSON Lines: events are lines.
    Lines,
    /// Anything else: no events are counted.
    Opaque,
}

impl Framing {
    pub(crate) fn from_content_type(ct: Option<&http::HeaderValue>) -> Self {
        let Some(ct) = ct.and_then(|v| v.to_str().ok()) else {
            return Framing::Opaque;
        };
        let essence = ct.split(';').next().unwrap_or("").trim();
        if essence.eq_ignore_ascii_case("text/event-stream") {
            Framing::Sse
        } else if essence.eq_ignore_ascii_case("application/x-ndjson")
            || essence.eq_ignore_ascii_case("application/ndjson")
            || essence.eq_ignore_ascii_case("application/jsonl")
            || essence.eq_ignore_ascii_case("application/x-jsonlines")
        {
            Framing::Lines
        } else {
            Framing::Opaque
        }
    }
}

/// Per-request state: spans, clocks, counters. Created by the service, moved from the response future
/// into the body. Dropping it before the end finishes the request as a client disconnect.
pub(crate) struct Tracker {
    pub(crate) info: StreamInfo,
    request_span: Option<Span>,
    stream_span: Option<Span>,
    start: Instant,
    start_sys: SystemTime,
    first_byte: Option<(Instant, SystemTime)>,
    /// The first byte was handed out and its bookkeeping (metric, spans) is still to do: it is done
    /// once the byte is on its way (the next poll, or the end), not in front of it.
    first_byte_pending: bool,
    /// The body ended with the frame handed out at this instant; the request is finished (spans,
    /// metrics, access line) at the next poll or on drop, so that the last frame is written first.
    complete_at: Option<Instant>,
    method: Method,
    path: String,
    route: Option<String>,
    status: Option<StatusCode>,
    framing: Framing,
    /// The lines are counted here (`sse`), not by an inner layer (see [`StreamInfo::publish_scan`]).
    scan_here: bool,
    sse: SseTracker,
    bytes: u64,
    chunks: u64,
    request_error_set: bool,
    active: bool,
    ended: bool,
    metrics: Option<StreamMetrics>,
    access_log: bool,
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("status", &self.status)
            .field("bytes", &self.bytes)
            .field("chunks", &self.chunks)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

/// End an OpenTelemetry span at `at`, whoever else still holds the tracing span.
///
/// tracing-opentelemetry ends a span at its last exit; a clone kept by a spawned task would stretch
/// it. Ending the OTel span explicitly pins the exported end time. Without an OpenTelemetry layer
/// this is a cheap no-op.
fn end_span(span: &Span, at: SystemTime) {
    if span.is_disabled() {
        return;
    }
    span.context().span().end_with_timestamp(at);
}

impl Tracker {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        info: StreamInfo,
        span: Span,
        start: Instant,
        start_sys: SystemTime,
        method: Method,
        path: String,
        metrics: Option<StreamMetrics>,
        access_log: bool,
    ) -> Self {
        Self {
            info,
            request_span: Some(span),
            stream_span: None,
            start,
            start_sys,
            first_byte: None,
            first_byte_pending: false,
            complete_at: None,
            method,
            path,
            route: None,
            status: None,
            framing: Framing::Opaque,
            scan_here: false,
            sse: SseTracker::new(),
            bytes: 0,
            chunks: 0,
            request_error_set: false,
            active: false,
            ended: false,
            metrics,
            access_log,
        }
    }

    /// The span to enter while polling: the request span until the first byte, then the stream span.
    pub(crate) fn span(&self) -> Option<&Span> {
        self.request_span.as_ref().or(self.stream_span.as_ref())
    }

    pub(crate) fn is_ended(&self) -> bool {
        self.ended
    }

    /// The proxy named the route (via [`record_route`](super::record_route)).
    pub(crate) fn set_route(&mut self, route: String) {
        if let Some(span) = self.request_span.as_ref().filter(|s| !s.is_disabled()) {
            let name = format!("{} {}", otel_method(&self.method), route);
            span.record("otel.name", name.as_str());
            // tracing-opentelemetry applies `otel.name` only before the OTel span starts, and entering
            // the span (to poll the service) starts it: rename the started span directly.
            span.context().span().update_name(name);
        }
        self.route = Some(route);
    }

    fn set_request_error(&mut self, error_type: &str, status_error: bool) {
        if self.request_error_set {
            return;
        }
        if let Some(span) = &self.request_span {
            span.record("error.type", error_type);
            if status_error {
                span.record("otel.status_code", "error");
            }
            self.request_error_set = true;
        }
    }

    /// The response head arrived.
    pub(crate) fn on_response(&mut self, status: StatusCode, headers: &http::HeaderMap) {
        self.status = Some(status);
        if let Some(span) = &self.request_span {
            span.record("http.response.status_code", i64::from(status.as_u16()));
        }
        if status.is_server_error() {
            self.set_request_error(status.as_str(), true);
        }
        self.framing = Framing::from_content_type(headers.get(http::header::CONTENT_TYPE));
        // An inner layer counts the lines already: no second scan here.
        self.scan_here = self.framing != Framing::Opaque && !self.info.scan_published();
        self.active = true;
        if let Some(m) = &self.metrics {
            m.stream_started();
        }
    }

    /// The inner service failed before producing a response.
    pub(crate) fn on_service_error(&mut self, type_name: &'static str, message: &dyn fmt::Display) {
        self.set_request_error(type_name, true);
        if let Some(span) = &self.request_span {
            span.record("otel.status_description", tracing::field::display(message));
        }
        self.finish(EndReason::UpstreamError);
    }

    /// An upstream (not injected) data frame is being handed out.
    fn on_data(&mut self, data: &Bytes) {
        if data.is_empty() {
            return;
        }
        if self.first_byte.is_none() {
            self.start_stream();
        }
        self.bytes += data.len() as u64;
        self.chunks += 1;
        if self.scan_here {
            self.sse.observe(data);
        }
    }

    /// Work left over from the frames handed out since the last poll: the first byte's bookkeeping,
    /// and the end of the request if the body ended with the last frame.
    fn catch_up(&mut self) {
        self.settle_first_byte();
        if self.complete_at.is_some() {
            self.finish(EndReason::Complete);
        }
    }

    /// The first byte is handed out: the stream span starts now. It is created here, in front of the
    /// byte, because a span's start is the instant it is created (tracing-opentelemetry takes no other);
    /// the rest of the first byte's bookkeeping waits for [`settle_first_byte`](Self::settle_first_byte).
    fn start_stream(&mut self) {
        let now = Instant::now();
        if let Some(req) = self.request_span.as_ref().filter(|r| !r.is_disabled()) {
            let name = match &self.route {
                Some(route) => format!("{} {} stream", otel_method(&self.method), route),
                None => format!("{} stream", otel_method(&self.method)),
            };
            self.stream_span = Some(tracing::info_span!(
                target: "streamgate::stream",
                parent: req,
                "stream",
                otel.name = name.as_str(),
                otel.kind = "internal",
                otel.status_code = Empty,
                streamgate.bytes = Empty,
                streamgate.chunks = Empty,
                streamgate.events = Empty,
                streamgate.heartbeats = Empty,
                streamgate.end_reason = Empty,
                error.type = Empty,
            ));
        }
        // Taken after the span exists, so that its end (this plus the monotonic time to the end) is
        // never before its start.
        self.first_byte = Some((now, SystemTime::now()));
        self.first_byte_pending = true;
    }

    /// The first byte's bookkeeping, once it is on its way: the time-to-first-byte metric and the end
    /// of the request span, stamped with the instant the byte was handed out.
    #[inline]
    fn settle_first_byte(&mut self) {
        // Once per stream; every other poll only tests the flag.
        if std::mem::take(&mut self.first_byte_pending) {
            self.first_byte_settled();
        }
    }

    #[cold]
    fn first_byte_settled(&mut self) {
        let Some((now, _)) = self.first_byte else {
            return;
        };
        let ttfb = now.saturating_duration_since(self.start);
        if let Some(m) = &self.metrics {
            m.first_byte(ttfb);
        }
        if let Some(req) = self.request_span.take() {
            end_span(&req, self.start_sys + ttfb);
        }
    }

    fn events(&self) -> u64 {
        let (events, lines) = if self.scan_here {
            (self.sse.events(), self.sse.lines())
        } else {
            // The frames handed out here are the inner layer's first `chunks` (one more may be on
            // its way out): its counts as of those.
            self.info.scan_for(self.chunks)
        };
        match self.framing {
            Framing::Sse => events,
            Framing::Lines => lines,
            Framing::Opaque => 0,
        }
    }

    /// The request is over. `default` is the reason observed here; a reason recorded earlier by an
    /// inner layer (first writer wins) takes precedence.
    pub(crate) fn finish(&mut self, default: EndReason) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.settle_first_byte();
        // A body that ended with its last frame completed, whoever drops it afterwards.
        let (default, now) = match self.complete_at.take() {
            Some(at) => (EndReason::Complete, at),
            None => (default, Instant::now()),
        };
        self.info.record_end(default);
        let reason = self.info.end_reason().unwrap_or(default);
        let total = now.saturating_duration_since(self.start);
        let failed = reason != EndReason::Complete;
        let status_error = failed && reason.source() != ErrorSource::Downstream;

        if failed {
            self.set_request_error(reason.as_str(), status_error);
        }
        if let Some(req) = self.request_span.take() {
            end_span(&req, self.start_sys + total);
        }

        let heartbeats = self.info.heartbeats();
        let events = self.events();
        let stream_duration = self
            .first_byte
            .map(|(at, _)| now.saturating_duration_since(at));
        if let (Some(stream), Some((_, stream_sys)), Some(d)) =
            (self.stream_span.take(), self.first_byte, stream_duration)
        {
            stream.record("streamgate.bytes", saturating_i64(self.bytes));
            stream.record("streamgate.chunks", saturating_i64(self.chunks));
            stream.record("streamgate.events", saturating_i64(events));
            stream.record("streamgate.heartbeats", saturating_i64(heartbeats));
            stream.record("streamgate.end_reason", reason.as_str());
            if failed {
                stream.record("error.type", reason.as_str());
                if status_error {
                    stream.record("otel.status_code", "error");
                }
            }
            end_span(&stream, stream_sys + d);
        }

        if let Some(m) = &self.metrics {
            m.ended(&StreamEnd {
                reason,
                was_active: self.active,
                stream_duration,
                bytes: self.bytes,
                events,
                heartbeats,
            });
        }
        self.active = false;

        if self.access_log {
            self.log_access(reason, total);
        }
    }

    fn log_access(&self, reason: EndReason, total: Duration) {
        let status = self.status.map_or(0, |s| s.as_u16());
        let duration_ms = millis(total);
        let route = self.route.as_deref().unwrap_or("");
        match self.first_byte {
            Some((at, _)) => tracing::info!(
                target: "streamgate::access",
                parent: None,
                method = %self.method,
                path = %self.path,
                route,
                status,
                bytes = self.bytes,
                ttfb_ms = millis(at.saturating_duration_since(self.start)),
                duration_ms,
                end_reason = reason.as_str(),
                source = reason.source().as_str(),
                "request finished"
            ),
            None => tracing::info!(
                target: "streamgate::access",
                parent: None,
                method = %self.method,
                path = %self.path,
                route,
                status,
                bytes = self.bytes,
                duration_ms,
                end_reason = reason.as_str(),
                source = reason.source().as_str(),
                "request finished"
            ),
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        // Dropped before any end was observed: the response future or the body was abandoned, which
        // is what hyper does when the client goes away.
        self.finish(EndReason::ClientDisconnect);
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The method as OpenTelemetry names it: one of the well-known methods, else `_OTHER`.
pub(crate) fn otel_method(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

pin_project! {
    /// Response body of [`StreamTrace`](super::StreamTrace): forwards every frame unchanged and ends the
    /// request span at the first upstream byte, the stream span at the end of the body.
    ///
    /// `Data = Bytes`, `Error = BoxError`. Forwards `is_end_stream()` and `size_hint()` (it adds no
    /// bytes). Per frame it only counts: no allocation, no logging.
    pub struct StreamTraceBody<B> {
        // Declared before `inner` so that, on drop, the request is finished before the inner body is
        // dropped (an observer of the inner body's drop then sees the final counters).
        tracker: Box<Tracker>,
        #[pin]
        inner: B,
    }
}

impl<B> StreamTraceBody<B> {
    pub(crate) fn new(inner: B, tracker: Box<Tracker>) -> Self {
        Self { tracker, inner }
    }

    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// The wrapped body, mutably.
    pub fn get_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    pub(crate) fn tracker_mut(&mut self) -> &mut Tracker {
        &mut self.tracker
    }
}

impl<B: fmt::Debug> fmt::Debug for StreamTraceBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamTraceBody")
            .field("inner", &self.inner)
            .field("tracker", &self.tracker)
            .finish()
    }
}

impl<B> Body for StreamTraceBody<B>
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
        let mut this = self.project();
        let tracker = this.tracker;
        tracker.catch_up();
        if tracker.is_ended() {
            return this.inner.poll_frame(cx).map_err(Into::into);
        }
        let polled = this.inner.as_mut().poll_frame(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                tracker.finish(EndReason::Complete);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                tracker.finish(EndReason::UpstreamError);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    // Every data frame clears the mark, so a keepalive is never a first byte.
                    if !tracker.info.take_injected() {
                        tracker.on_data(data);
                    }
                }
                if this.inner.is_end_stream() {
                    tracker.complete_at = Some(Instant::now());
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
