//! Two-span tracing for streamed responses: a request span that ends at the first byte, a stream span
//! for the body, one access-log line and metrics at the end.
//!
//! A streaming request is two operations with different health signals. *Time to first byte* says
//! whether the backend is keeping up; *stream duration* is mostly how much the model had to say. One
//! span covering both hides the first inside the second, so [`StreamTraceLayer`] makes two:
//!
//! ```text
//!  client span (remote, from `traceparent`)
//!  └─ request  SERVER   "POST /v1/chat"          arrival ──► first upstream byte handed out
//!     └─ stream INTERNAL "POST /v1/chat stream"               first byte ──► end of body
//! ```
//!
//! ## Request span
//!
//! Kind `SERVER`, named `{method}` at creation and `{method} {route}` once the service calls
//! [`record_route`]. Attributes: `http.request.method`, `url.path`, `url.scheme`, `http.route`,
//! `http.response.status_code` (integer), `network.protocol.version` (`1.0`/`1.1`/`2`/`3`),
//! `server.address`/`server.port` (from the URI authority or `Host`), `client.address`/`client.port`
//! (from a [`ClientAddr`] extension), `user_agent.original`, `upstream.address` ([`record_upstream`]),
//! and `error.type` when the request failed: the status code for a 5xx, the error's type name for a
//! service error, the end reason when the stream ended before its first byte.
//!
//! A W3C `traceparent`/`tracestate` from the client is continued (parsed with
//! `TraceContextPropagator` directly; no global propagator is needed). The inner future is polled
//! inside the request span, so in the service `Span::current()` is the request span and
//! [`inject_context`] propagates it upstream.
//!
//! Its duration is exactly the time to first byte: the OpenTelemetry span is ended explicitly at the
//! first upstream data byte, not when the tracing span closes (tracing-opentelemetry ends a span at its
//! last exit, which a stray clone could push later). Keepalives injected by an inner layer (announced
//! with [`StreamInfo::note_heartbeat`]) are not a first byte. A response without a body, or whose body
//! ends before any data, ends the request span when the response ends, and there is no stream span.
//!
//! ## Stream span
//!
//! Kind `INTERNAL`, a **child** of the request span, from the first byte to the end of the body, with
//! `streamgate.bytes`, `streamgate.chunks`, `streamgate.events` (SSE events, or NDJSON records),
//! `streamgate.heartbeats`, `streamgate.end_reason` and `error.type` (the end reason) when it did not
//! complete. Status is `Error` for upstream, idle-timeout and shutdown ends, unset for a client
//! disconnect (not a server fault).
//!
//! The response body is not polled inside either span: entering a span on every poll (twice per
//! forwarded chunk) cost 10% of the proxy's CPU per event in the load harness. What inner layers log
//! mid-stream carries its own fields, and the stream span's attributes tell how it ended.
//!
//! Why a child and not a link: a link only keeps the two in one trace when the request span has a
//! parent to share, and trace UIs rarely draw linked spans in the waterfall. A child is always in the
//! same trace and renders as "wait, then stream" under the request. That the child outlives its parent
//! is allowed by OpenTelemetry (as with any async continuation). It is `INTERNAL`, not `SERVER`, so
//! span-derived request metrics count each request once.
//!
//! ## End reasons
//!
//! The reason is read from [`StreamInfo::end_reason`]; an inner layer that caused the end (idle
//! timeout, cancellation, shutdown) has recorded it first. If none was recorded: `Ready(None)` or
//! `is_end_stream()` after a frame is `complete`, an inner body error is `upstream_error`, and a drop
//! before the end (of the response future or of the body) is `client_disconnect`.
//!
//! ## Access log and metrics
//!
//! When the request ends, one `INFO` event with target `streamgate::access` carries `method`, `path`,
//! `route`, `status` (0 if no response head was produced), `bytes`, `ttfb_ms` (absent without a first
//! byte), `duration_ms`, `end_reason` and `source`. Disable it with
//! [`StreamTraceLayer::access_log`]. With [`StreamTraceLayer::metrics`], the instruments of
//! [`StreamMetrics`] are recorded. Nothing is logged or allocated per chunk.
//!
//! Without any subscriber, or with a subscriber that has no OpenTelemetry layer, the layer still works
//! (spans are plain tracing spans, or disabled) and still records metrics and the access log.
//!
//! ## Wiring
//!
//! ```
//! use streamgate::telemetry::{Telemetry, TelemetryConfig};
//! use streamgate::trace::{inject_context, record_route, StreamMetrics, StreamTraceLayer};
//!
//! // The binary calls `Telemetry::init` instead, which also installs the global subscriber.
//! let telemetry = Telemetry::new(TelemetryConfig::default())?;
//! let layer = StreamTraceLayer::new().metrics(StreamMetrics::new(&telemetry.meter()));
//!
//! // Inside the service wrapped by `layer`, while building the upstream request:
//! record_route("/v1/chat/completions");
//! let mut upstream_headers = http::HeaderMap::new();
//! inject_context(&mut upstream_headers);
//! # let _ = layer;
//! # Ok::<(), streamgate::telemetry::TelemetryError>(())
//! ```
//!
//! Spawning a hyper connection whose service or body error is `BoxError` can fail to compile with
//! "implementation of `From` is not general enough" (rust-lang/rust#64552). Spawn it from a small
//! function generic over the service and body types instead; `tests/trace_otlp.rs` has one
//! (`spawn_connection`).

mod body;
mod metrics;

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Version};
use http_body::Body;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use body::StreamTraceBody;
use body::{otel_method, Tracker};
pub use metrics::{StreamMetrics, STREAM_DURATION_BUCKETS, TTFB_BUCKETS};

use crate::{BoxError, StreamInfo};

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// The peer address of the client connection. The server inserts it into the request extensions;
/// the layer reports it as `client.address` and `client.port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// Layer that traces streamed responses with two spans. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct StreamTraceLayer {
    metrics: Option<StreamMetrics>,
    access_log: bool,
}

impl Default for StreamTraceLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamTraceLayer {
    /// A layer with the access log on and no metrics.
    pub fn new() -> Self {
        Self {
            metrics: None,
            access_log: true,
        }
    }

    /// Record the [`StreamMetrics`] instruments. Default: no metrics.
    pub fn metrics(mut self, metrics: StreamMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Emit one `streamgate::access` event per request when it ends. Default: true.
    pub fn access_log(mut self, enabled: bool) -> Self {
        self.access_log = enabled;
        self
    }
}

impl<S> Layer<S> for StreamTraceLayer {
    type Service = StreamTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StreamTrace {
            inner,
            metrics: self.metrics.clone(),
            access_log: self.access_log,
        }
    }
}

/// Service produced by [`StreamTraceLayer`].
#[derive(Clone, Debug)]
pub struct StreamTrace<S> {
    inner: S,
    metrics: Option<StreamMetrics>,
    access_log: bool,
}

impl<S> StreamTrace<S> {
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

impl<S, ReqB, ResB> Service<Request<ReqB>> for StreamTrace<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: fmt::Display,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<StreamTraceBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let start = Instant::now();
        let info = StreamInfo::get_or_insert(&mut req);
        let span = request_span(&req);
        // Captured after the span exists, so the span's own start (taken by tracing-opentelemetry) is
        // never later than this; end times are this plus the monotonic elapsed time.
        let start_sys = SystemTime::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let no_body_expected = method == http::Method::HEAD;
        // Boxed: the response future, and then the body, move through every outer layer and into
        // the connection's task; a pointer moves for free where the tracker's ~350 bytes did not.
        let mut tracker = Box::new(Tracker::new(
            info,
            span,
            start,
            start_sys,
            method,
            path,
            self.metrics.clone(),
            self.access_log,
        ));
        let (inner, route) = {
            let _entered = tracker.span().map(Span::enter);
            capture_route(|| self.inner.call(req))
        };
        if let Some(route) = route {
            tracker.set_route(route);
        }
        ResponseFuture {
            inner,
            tracker: Some(tracker),
            no_body_expected,
        }
    }
}

/// Build the request span from the request head, continuing the client's W3C trace context.
fn request_span<B>(req: &Request<B>) -> Span {
    let method = otel_method(req.method());
    let span = tracing::info_span!(
        target: "streamgate::request",
        "request",
        otel.name = method,
        otel.kind = "server",
        otel.status_code = Empty,
        otel.status_description = Empty,
        http.request.method = method,
        http.request.method_original = Empty,
        url.path = req.uri().path(),
        url.scheme = req.uri().scheme_str().unwrap_or("http"),
        http.route = Empty,
        http.response.status_code = Empty,
        network.protocol.version = protocol_version(req.version()),
        server.address = Empty,
        server.port = Empty,
        client.address = Empty,
        client.port = Empty,
        user_agent.original = Empty,
        upstream.address = Empty,
        error.type = Empty,
    );
    if span.is_disabled() {
        return span;
    }
    if method == "_OTHER" {
        span.record("http.request.method_original", req.method().as_str());
    }
    let host_header = req
        .headers()
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok());
    if let Some(authority) = req.uri().authority().or(host_header.as_ref()) {
        span.record("server.address", authority.host());
        if let Some(port) = authority.port_u16() {
            span.record("server.port", i64::from(port));
        }
    }
    if let Some(ClientAddr(addr)) = req.extensions().get::<ClientAddr>() {
        span.record("client.address", tracing::field::display(addr.ip()));
        span.record("client.port", i64::from(addr.port()));
    }
    if let Some(ua) = req
        .headers()
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
    {
        span.record("user_agent.original", ua);
    }
    if req.headers().contains_key(TRACEPARENT) {
        let parent = TraceContextPropagator::new().extract_with_context(
            &opentelemetry::Context::new(),
            &HeaderExtractor(req.headers()),
        );
        if parent.span().span_context().is_valid() {
            // Fails only without an OpenTelemetry layer, where there is nothing to continue.
            let _ = span.set_parent(parent);
        }
    }
    span
}

fn protocol_version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_11 => "1.1",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "unknown",
    }
}

pin_project! {
    /// Response future of [`StreamTrace`]: polls the inner future inside the request span and wraps
    /// the response body. Dropped before completion, it ends the request as a client disconnect.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        tracker: Option<Box<Tracker>>,
        no_body_expected: bool,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("tracker", &self.tracker)
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    E: fmt::Display,
{
    type Output = Result<Response<StreamTraceBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let tracker = this
            .tracker
            .as_mut()
            .expect("ResponseFuture polled after completion");
        let (polled, route) = {
            let _entered = tracker.span().map(Span::enter);
            capture_route(|| this.inner.poll(cx))
        };
        if let Some(route) = route {
            tracker.set_route(route);
        }
        let result = ready!(polled);
        let mut tracker = this.tracker.take().expect("tracker present until ready");
        match result {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                tracker.on_response(parts.status, &parts.headers);
                // hyper sends no body for these, and may never poll it: end now, not at the drop.
                let bodiless = *this.no_body_expected
                    || parts.status.is_informational()
                    || parts.status == http::StatusCode::NO_CONTENT
                    || parts.status == http::StatusCode::NOT_MODIFIED
                    || body.is_end_stream();
                let mut body = StreamTraceBody::new(body, tracker);
                if bodiless {
                    body.tracker_mut().finish(crate::EndReason::Complete);
                }
                Poll::Ready(Ok(Response::from_parts(parts, body)))
            }
            Err(e) => {
                tracker.on_service_error(std::any::type_name::<E>(), &e);
                Poll::Ready(Err(e))
            }
        }
    }
}

thread_local! {
    /// Set while a [`ResponseFuture`] polls its inner future on this thread.
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    /// The route recorded by [`record_route`] during that poll.
    static ROUTE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Run `f` (a call or a poll of the inner service) and return the route it recorded, if any.
fn capture_route<T>(f: impl FnOnce() -> T) -> (T, Option<String>) {
    let outer = CAPTURING.with(|c| c.replace(true));
    let out = f();
    CAPTURING.with(|c| c.set(outer));
    let route = ROUTE.with(|r| {
        let mut r = r.borrow_mut();
        // A nested StreamTrace (outer capture active) leaves the route for the outer one too.
        if outer {
            r.clone()
        } else {
            r.take()
        }
    });
    (out, route)
}

/// Record the matched route template (e.g. `/v1/chat/completions`, never a raw path with ids) on the
/// current request span: sets `http.route`, and renames the span `{method} {route}` (and the stream
/// span `{method} {route} stream`).
///
/// Call it from the service's `call` or from its future, while [`StreamTrace`] polls it (that is where
/// `Span::current()` is the request span). Called elsewhere it only records `http.route` on whatever
/// span is current.
pub fn record_route(route: &str) {
    Span::current().record("http.route", route);
    if CAPTURING.with(Cell::get) {
        ROUTE.with(|r| *r.borrow_mut() = Some(route.to_owned()));
    }
}

/// Record `upstream.address` (the chosen upstream, `host:port`) on the current request span.
pub fn record_upstream(addr: &str) {
    Span::current().record("upstream.address", addr);
}

/// Write the current span's W3C context (traceparent/tracestate) into `headers`, replacing any there.
///
/// Call it while building the upstream request inside the service (the current span is then the
/// request span, so the upstream's span becomes its child). When there is no valid current context
/// (no OpenTelemetry layer installed, or the span is disabled), `headers` are left as they are, so a
/// client's own `traceparent` still passes through a proxy that does not trace.
pub fn inject_context(headers: &mut HeaderMap) {
    let cx = Span::current().context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    headers.remove(TRACEPARENT);
    headers.remove(TRACESTATE);
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    if headers
        .get(TRACESTATE)
        .is_some_and(|v| v.as_bytes().is_empty())
    {
        headers.remove(TRACESTATE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_follows_content_type() {
        use body::Framing;
        let hv = |s: &'static str| http::HeaderValue::from_static(s);
        assert_eq!(
            Framing::from_content_type(Some(&hv("text/event-stream; charset=utf-8"))),
            Framing::Sse
        );
        assert_eq!(
            Framing::from_content_type(Some(&hv("application/x-ndjson"))),
            Framing::Lines
        );
        assert_eq!(
            Framing::from_content_type(Some(&hv("application/json"))),
            Framing::Opaque
        );
        assert_eq!(Framing::from_content_type(None), Framing::Opaque);
    }

    #[test]
    fn route_is_captured_only_inside_a_capture() {
        record_route("/outside");
        let ((), route) = capture_route(|| record_route("/v1/chat"));
        assert_eq!(route.as_deref(), Some("/v1/chat"));
        let ((), route) = capture_route(|| ());
        assert_eq!(route, None, "a previous capture leaks nothing");
        let (((), inner), outer) = capture_route(|| capture_route(|| record_route("/nested")));
        assert_eq!(inner.as_deref(), Some("/nested"));
        assert_eq!(outer.as_deref(), Some("/nested"));
    }

    #[test]
    fn methods_map_to_otel_names() {
        assert_eq!(otel_method(&http::Method::POST), "POST");
        let custom = http::Method::from_bytes(b"PURGE").unwrap();
        assert_eq!(otel_method(&custom), "_OTHER");
    }
}
