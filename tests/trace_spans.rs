//! Edge cases of the two-span tracing layer, with the SDK's in-memory exporter and a scripted body on
//! a paused clock. Span durations are asserted against virtual time: the layer ends spans at
//! `start + monotonic elapsed`, so a paused clock makes them exact up to the microseconds between the
//! span's creation and the layer's wall-clock reading.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, Full};
use opentelemetry::trace::{SpanId, SpanKind, Status, TraceId, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use streamgate::trace::{
    inject_context, record_route, record_upstream, ClientAddr, StreamTraceLayer,
};
use streamgate::{BoxError, EndReason, StreamInfo};
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service, ServiceExt};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::SubscriberExt;

// ---------------------------------------------------------------------------------------------
// Harness

#[derive(Clone, Copy, Debug)]
enum Step {
    Data(&'static str),
    /// What IdleTimeoutLayer does: announce the injection, then yield a comment line.
    Heartbeat,
    Fail,
    /// What IdleTimeoutLayer does on expiry: record the reason, then fail the body.
    IdleTimeout,
    End,
}

/// A body that plays `(delay, step)` pairs on the tokio clock.
struct Scripted {
    steps: VecDeque<(Duration, Step)>,
    sleep: Pin<Box<Sleep>>,
    armed: bool,
    info: StreamInfo,
}

impl Scripted {
    fn new(info: StreamInfo, steps: &[(u64, Step)]) -> Self {
        Self {
            steps: steps
                .iter()
                .map(|&(ms, s)| (Duration::from_millis(ms), s))
                .collect(),
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: false,
            info,
        }
    }
}

impl Body for Scripted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(&(delay, _)) = self.steps.front() else {
            return Poll::Ready(None);
        };
        if !self.armed {
            let deadline = Instant::now() + delay;
            self.sleep.as_mut().reset(deadline);
            self.armed = true;
        }
        ready!(self.sleep.as_mut().poll(cx));
        self.armed = false;
        let (_, step) = self.steps.pop_front().unwrap();
        Poll::Ready(match step {
            Step::Data(s) => Some(Ok(Frame::data(Bytes::from_static(s.as_bytes())))),
            Step::Heartbeat => {
                let hb = Bytes::from_static(b": keepalive\n");
                self.info.note_heartbeat(hb.len());
                Some(Ok(Frame::data(hb)))
            }
            Step::Fail => Some(Err("upstream connection reset".into())),
            Step::IdleTimeout => {
                self.info.record_end(EndReason::IdleTimeout);
                Some(Err("upstream idle for 30s".into()))
            }
            Step::End => None,
        })
    }

    fn is_end_stream(&self) -> bool {
        self.steps.is_empty()
    }
}

/// Events captured from the subscriber: (target, fields).
type Events = Arc<Mutex<Vec<(String, HashMap<String, String>)>>>;

struct CaptureEvents(Events);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CaptureEvents {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct V<'a>(&'a mut HashMap<String, String>);
        impl Visit for V<'_> {
            fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
                self.0.insert(f.name().to_owned(), format!("{v:?}"));
            }
            fn record_str(&mut self, f: &Field, v: &str) {
                self.0.insert(f.name().to_owned(), v.to_owned());
            }
        }
        let mut fields = HashMap::new();
        event.record(&mut V(&mut fields));
        self.0
            .lock()
            .unwrap()
            .push((event.metadata().target().to_owned(), fields));
    }
}

struct Otel {
    exporter: InMemorySpanExporter,
    events: Events,
    _provider: SdkTracerProvider,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Otel {
    fn install() -> Self {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let events: Events = Arc::default();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(CaptureEvents(events.clone()));
        let guard = tracing::subscriber::set_default(subscriber);
        Self {
            exporter,
            events,
            _provider: provider,
            _guard: guard,
        }
    }

    fn spans(&self) -> Vec<SpanData> {
        self.exporter.get_finished_spans().unwrap()
    }

    fn span(&self, name: &str) -> SpanData {
        let spans = self.spans();
        spans
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .unwrap_or_else(|| {
                let names: Vec<_> = spans.iter().map(|s| s.name.to_string()).collect();
                panic!("no span {name:?} among {names:?}")
            })
    }

    fn access_logs(&self) -> Vec<HashMap<String, String>> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t == "streamgate::access")
            .map(|(_, f)| f.clone())
            .collect()
    }
}

fn attr(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.clone())
}

fn attr_i64(span: &SpanData, key: &str) -> i64 {
    match attr(span, key) {
        Some(Value::I64(v)) => v,
        other => panic!("{key}: expected an integer, got {other:?}"),
    }
}

fn attr_str(span: &SpanData, key: &str) -> String {
    match attr(span, key) {
        Some(Value::String(v)) => v.to_string(),
        other => panic!("{key}: expected a string, got {other:?}"),
    }
}

fn duration(span: &SpanData) -> Duration {
    span.end_time.duration_since(span.start_time).unwrap()
}

#[track_caller]
fn assert_about(actual: Duration, expected_ms: u64) {
    let expected = Duration::from_millis(expected_ms);
    let diff = actual.abs_diff(expected);
    assert!(
        diff < Duration::from_millis(3),
        "expected {expected:?}, got {actual:?}"
    );
}

/// A service that answers after `head_ms` with an SSE body playing `steps`, recording the route and
/// upstream, and the headers `inject_context` writes.
fn sse_service(
    head_ms: u64,
    steps: &'static [(u64, Step)],
    injected: Arc<Mutex<Option<HeaderMap>>>,
) -> impl Service<
    Request<()>,
    Response = Response<Scripted>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Scripted>, Infallible>>,
> + Clone {
    tower::service_fn(move |mut req: Request<()>| {
        let info = StreamInfo::get_or_insert(&mut req);
        record_route("/v1/chat");
        let injected = injected.clone();
        async move {
            record_upstream("10.0.0.7:8000");
            let mut upstream_headers = HeaderMap::new();
            inject_context(&mut upstream_headers);
            *injected.lock().unwrap() = Some(upstream_headers);
            tokio::time::sleep(Duration::from_millis(head_ms)).await;
            Ok(Response::builder()
                .header("content-type", "text/event-stream")
                .body(Scripted::new(info, steps))
                .unwrap())
        }
    })
}

fn request() -> Request<()> {
    Request::post("/v1/chat")
        .header("host", "gw.example:8443")
        .header("user-agent", "test-client/1.0")
        .extension(ClientAddr("192.0.2.10:51000".parse().unwrap()))
        .body(())
        .unwrap()
}

/// Collect the body, returning the data chunks and the error (if any) it ended with.
async fn drain<B>(mut body: B) -> (Vec<Bytes>, Option<BoxError>)
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    let mut chunks = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => chunks.extend(f.into_data().ok()),
            Err(e) => return (chunks, Some(e)),
        }
    }
    (chunks, None)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(start_paused = true)]
async fn request_span_ends_at_first_upstream_byte_not_at_a_heartbeat() {
    let otel = Otel::install();
    static STEPS: &[(u64, Step)] = &[
        (100, Step::Heartbeat),
        (100, Step::Data("data: a\n\n")),
        (50, Step::Heartbeat),
        (50, Step::Data("data: b\n\n")),
        (100, Step::End),
    ];
    let injected = Arc::default();
    let svc = StreamTraceLayer::new().layer(sse_service(100, STEPS, Arc::clone(&injected)));
    let t0 = Instant::now();
    let resp = svc.oneshot(request()).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_millis(100));
    let (chunks, err) = drain(resp.into_body()).await;
    assert!(err.is_none());
    assert_eq!(chunks.len(), 4, "heartbeats are forwarded unchanged");
    assert_eq!(t0.elapsed(), Duration::from_millis(500));

    let req = otel.span("POST /v1/chat");
    let stream = otel.span("POST /v1/chat stream");
    assert_eq!(req.span_kind, SpanKind::Server);
    assert_eq!(stream.span_kind, SpanKind::Internal);
    // Head at 100 ms, heartbeat at 200 ms, first upstream byte at 300 ms.
    assert_about(duration(&req), 300);
    assert_about(duration(&stream), 200);
    assert_eq!(stream.span_context.trace_id(), req.span_context.trace_id());
    assert_eq!(stream.parent_span_id, req.span_context.span_id());

    assert_eq!(attr_str(&req, "http.request.method"), "POST");
    assert_eq!(attr_str(&req, "http.route"), "/v1/chat");
    assert_eq!(attr_str(&req, "url.path"), "/v1/chat");
    assert_eq!(attr_str(&req, "url.scheme"), "http");
    assert_eq!(attr_i64(&req, "http.response.status_code"), 200);
    assert_eq!(attr_str(&req, "network.protocol.version"), "1.1");
    assert_eq!(attr_str(&req, "server.address"), "gw.example");
    assert_eq!(attr_i64(&req, "server.port"), 8443);
    assert_eq!(attr_str(&req, "client.address"), "192.0.2.10");
    assert_eq!(attr_i64(&req, "client.port"), 51000);
    assert_eq!(attr_str(&req, "user_agent.original"), "test-client/1.0");
    assert_eq!(attr_str(&req, "upstream.address"), "10.0.0.7:8000");
    assert!(attr(&req, "error.type").is_none());
    assert_eq!(req.status, Status::Unset);

    assert_eq!(attr_i64(&stream, "streamgate.bytes"), 18);
    assert_eq!(attr_i64(&stream, "streamgate.chunks"), 2);
    assert_eq!(attr_i64(&stream, "streamgate.events"), 2);
    assert_eq!(attr_i64(&stream, "streamgate.heartbeats"), 2);
    assert_eq!(attr_str(&stream, "streamgate.end_reason"), "complete");
    assert!(attr(&stream, "error.type").is_none());

    let logs = otel.access_logs();
    assert_eq!(logs.len(), 1, "one access line per request: {logs:?}");
    let log = &logs[0];
    assert_eq!(log["method"], "POST");
    assert_eq!(log["path"], "/v1/chat");
    assert_eq!(log["status"], "200");
    assert_eq!(log["bytes"], "18");
    assert_eq!(log["ttfb_ms"], "300.0");
    assert_eq!(log["duration_ms"], "500.0");
    assert_eq!(log["end_reason"], "complete");
    assert_eq!(log["source"], "none");
    let all_events = otel.events.lock().unwrap().len();
    assert_eq!(all_events, 1, "nothing is logged per chunk");

    // The upstream request carries the request span's context.
    let headers = injected.lock().unwrap().take().unwrap();
    let tp = headers["traceparent"].to_str().unwrap().to_owned();
    assert_eq!(
        tp,
        format!(
            "00-{}-{}-01",
            req.span_context.trace_id(),
            req.span_context.span_id()
        )
    );
    assert!(!headers.contains_key("tracestate"), "no empty tracestate");
}

#[tokio::test(start_paused = true)]
async fn client_traceparent_is_continued() {
    let otel = Otel::install();
    static STEPS: &[(u64, Step)] = &[(10, Step::Data("data: x\n\n"))];
    let svc = StreamTraceLayer::new().layer(sse_service(0, STEPS, Arc::default()));
    let mut req = request();
    req.headers_mut().insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            .parse()
            .unwrap(),
    );
    req.headers_mut()
        .insert("tracestate", "vendor=opaque".parse().unwrap());
    let resp = svc.oneshot(req).await.unwrap();
    drain(resp.into_body()).await;

    let span = otel.span("POST /v1/chat");
    assert_eq!(
        span.span_context.trace_id(),
        TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap()
    );
    assert_eq!(
        span.parent_span_id,
        SpanId::from_hex("b7ad6b7169203331").unwrap()
    );
    assert!(span.parent_span_is_remote);
    assert_eq!(span.span_context.trace_state().header(), "vendor=opaque");
    let stream = otel.span("POST /v1/chat stream");
    assert_eq!(stream.span_context.trace_id(), span.span_context.trace_id());
}

#[tokio::test(start_paused = true)]
async fn client_gone_before_first_byte_ends_request_span_as_disconnect() {
    let otel = Otel::install();
    let info_seen: Arc<Mutex<Option<StreamInfo>>> = Arc::default();
    let seen = Arc::clone(&info_seen);
    let inner = tower::service_fn(move |mut req: Request<()>| {
        *seen.lock().unwrap() = Some(StreamInfo::get_or_insert(&mut req));
        async move {
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        }
    });
    let fut = StreamTraceLayer::new().layer(inner).oneshot(request());
    let t0 = Instant::now();
    let res = tokio::time::timeout(Duration::from_millis(250), fut).await;
    assert!(res.is_err(), "the response never came");
    assert_eq!(t0.elapsed(), Duration::from_millis(250));

    let spans = otel.spans();
    assert_eq!(spans.len(), 1, "no stream span without a first byte");
    let req = &spans[0];
    assert_eq!(req.name, "POST");
    assert_about(duration(req), 250);
    assert_eq!(attr_str(req, "error.type"), "client_disconnect");
    assert_eq!(
        req.status,
        Status::Unset,
        "a client leaving is not a server error"
    );
    assert!(attr(req, "http.response.status_code").is_none());
    let info = info_seen.lock().unwrap().take().unwrap();
    assert_eq!(info.end_reason(), Some(EndReason::ClientDisconnect));
    let logs = otel.access_logs();
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0]["status"], "0");
    assert_eq!(logs[0]["end_reason"], "client_disconnect");
    assert_eq!(logs[0]["source"], "client");
    assert!(!logs[0].contains_key("ttfb_ms"));
}

#[tokio::test(start_paused = true)]
async fn client_gone_mid_stream_ends_stream_span_as_disconnect() {
    let otel = Otel::install();
    static STEPS: &[(u64, Step)] = &[
        (40, Step::Data("data: a\n\n")),
        (1000, Step::Data("data: b\n\n")),
    ];
    let svc = StreamTraceLayer::new().layer(sse_service(0, STEPS, Arc::default()));
    let mut body = svc.oneshot(request()).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "data: a\n\n");
    tokio::time::sleep(Duration::from_millis(60)).await;
    drop(body);

    let req = otel.span("POST /v1/chat");
    let stream = otel.span("POST /v1/chat stream");
    assert_about(duration(&req), 40);
    assert_about(duration(&stream), 60);
    assert!(
        attr(&req, "error.type").is_none(),
        "the request part succeeded"
    );
    assert_eq!(
        attr_str(&stream, "streamgate.end_reason"),
        "client_disconnect"
    );
    assert_eq!(attr_str(&stream, "error.type"), "client_disconnect");
    assert_eq!(stream.status, Status::Unset);
    assert_eq!(attr_i64(&stream, "streamgate.events"), 1);
}

#[tokio::test(start_paused = true)]
async fn upstream_error_mid_stream_fails_the_stream_span() {
    let otel = Otel::install();
    static STEPS: &[(u64, Step)] = &[
        (20, Step::Data("data: a\n\n")),
        (30, Step::Data("data: b\n\ndata: c")),
        (30, Step::Fail),
    ];
    let svc = StreamTraceLayer::new().layer(sse_service(0, STEPS, Arc::default()));
    let resp = svc.oneshot(request()).await.unwrap();
    let (chunks, err) = drain(resp.into_body()).await;
    assert_eq!(chunks.len(), 2);
    assert_eq!(err.unwrap().to_string(), "upstream connection reset");

    let req = otel.span("POST /v1/chat");
    let stream = otel.span("POST /v1/chat stream");
    assert_about(duration(&req), 20);
    assert_about(duration(&stream), 60);
    assert_eq!(attr_str(&stream, "streamgate.end_reason"), "upstream_error");
    assert_eq!(attr_str(&stream, "error.type"), "upstream_error");
    assert!(matches!(stream.status, Status::Error { .. }));
    assert_eq!(
        attr_i64(&stream, "streamgate.events"),
        2,
        "half an event is not an event"
    );
    assert_eq!(attr_i64(&stream, "streamgate.bytes"), 25);
    let logs = otel.access_logs();
    assert_eq!(logs[0]["end_reason"], "upstream_error");
    assert_eq!(logs[0]["source"], "upstream");
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_recorded_by_inner_layer_wins_over_the_body_error() {
    let otel = Otel::install();
    static STEPS: &[(u64, Step)] = &[
        (10, Step::Data("data: a\n\n")),
        (15_000, Step::Heartbeat),
        (15_000, Step::IdleTimeout),
    ];
    let svc = StreamTraceLayer::new().layer(sse_service(0, STEPS, Arc::default()));
    let resp = svc.oneshot(request()).await.unwrap();
    let (_, err) = drain(resp.into_body()).await;
    assert!(err.is_some());

    let stream = otel.span("POST /v1/chat stream");
    assert_about(duration(&stream), 30_000);
    assert_eq!(attr_str(&stream, "streamgate.end_reason"), "idle_timeout");
    assert_eq!(attr_str(&stream, "error.type"), "idle_timeout");
    assert_eq!(attr_i64(&stream, "streamgate.heartbeats"), 1);
    assert!(matches!(stream.status, Status::Error { .. }));
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_before_first_byte_fails_the_request_span() {
    let otel = Otel::install();
    static STEPS: &[(u64, Step)] = &[(5_000, Step::Heartbeat), (5_000, Step::IdleTimeout)];
    let svc = StreamTraceLayer::new().layer(sse_service(0, STEPS, Arc::default()));
    let resp = svc.oneshot(request()).await.unwrap();
    drain(resp.into_body()).await;

    let spans = otel.spans();
    assert_eq!(spans.len(), 1, "a heartbeat alone starts no stream");
    assert_about(duration(&spans[0]), 10_000);
    assert_eq!(attr_str(&spans[0], "error.type"), "idle_timeout");
    assert!(matches!(spans[0].status, Status::Error { .. }));
}

#[tokio::test(start_paused = true)]
async fn bodyless_response_ends_request_span_at_response_end() {
    let otel = Otel::install();
    let inner = tower::service_fn(|_req: Request<()>| async {
        tokio::time::sleep(Duration::from_millis(70)).await;
        Ok::<_, Infallible>(
            Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
    });
    let resp = StreamTraceLayer::new()
        .layer(inner)
        .oneshot(request())
        .await
        .unwrap();
    assert!(resp.body().is_end_stream());
    assert_eq!(resp.body().size_hint().exact(), Some(0));
    // Ended at the response, not when the body is dropped later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = otel.spans();
    assert_eq!(spans.len(), 1);
    assert_about(duration(&spans[0]), 70);
    assert_eq!(attr_i64(&spans[0], "http.response.status_code"), 204);
    drop(resp);
    let logs = otel.access_logs();
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0]["end_reason"], "complete");
}

#[tokio::test(start_paused = true)]
async fn body_ending_before_any_data_has_no_stream_span() {
    let otel = Otel::install();
    static STEPS: &[(u64, Step)] = &[(80, Step::Heartbeat), (40, Step::End)];
    let svc = StreamTraceLayer::new().layer(sse_service(30, STEPS, Arc::default()));
    let resp = svc.oneshot(request()).await.unwrap();
    drain(resp.into_body()).await;
    let spans = otel.spans();
    assert_eq!(spans.len(), 1);
    assert_about(duration(&spans[0]), 150);
    assert!(attr(&spans[0], "error.type").is_none());
}

#[tokio::test(start_paused = true)]
async fn wrapper_forwards_size_hint_and_is_end_stream() {
    let otel = Otel::install();
    let inner = tower::service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .status(503)
                .body(Full::new(Bytes::from_static(b"overloaded")))
                .unwrap(),
        )
    });
    let mut body = StreamTraceLayer::new()
        .layer(inner)
        .oneshot(request())
        .await
        .unwrap()
        .into_body();
    assert_eq!(body.size_hint().exact(), Some(10));
    assert!(!body.is_end_stream());
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "overloaded");
    assert!(body.is_end_stream());
    assert_eq!(body.size_hint().exact(), Some(0));
    // is_end_stream() right after the frame is the end: hyper (and streamgate's own server) will not
    // poll again but write the frame and drop the body. The request is finished then, as complete,
    // after the last frame went out rather than in front of it.
    let handed_out = std::time::SystemTime::now();
    std::thread::sleep(std::time::Duration::from_millis(20));
    drop(body);
    let req = otel.span("POST");
    let stream = otel.span("POST stream");
    assert_eq!(attr_str(&req, "error.type"), "503");
    assert!(matches!(req.status, Status::Error { .. }));
    assert_eq!(attr_str(&stream, "streamgate.end_reason"), "complete");
    // Stamped with the instant the last frame was handed out, not the later drop; and it starts at the
    // first byte, before it ends.
    assert!(
        stream.start_time <= stream.end_time,
        "stream span ends {:?} before it starts",
        stream
            .start_time
            .duration_since(stream.end_time)
            .unwrap_or_default()
    );
    assert!(
        stream.start_time <= handed_out,
        "the stream span starts at the first byte, not when its bookkeeping runs"
    );
    assert!(
        stream.end_time <= handed_out,
        "stream span ended at the drop, {:?} after the last frame",
        stream
            .end_time
            .duration_since(handed_out)
            .unwrap_or_default()
    );
    assert_eq!(attr_i64(&stream, "streamgate.bytes"), 10);
    assert_eq!(
        attr_i64(&stream, "streamgate.events"),
        0,
        "not an event stream"
    );
}

#[derive(Debug)]
struct ConnectError;

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream refused the connection")
    }
}

#[tokio::test(start_paused = true)]
async fn service_error_marks_the_request_span() {
    let otel = Otel::install();
    let inner = tower::service_fn(|_req: Request<()>| async {
        Err::<Response<Empty<Bytes>>, _>(ConnectError)
    });
    let err = StreamTraceLayer::new()
        .layer(inner)
        .oneshot(request())
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "upstream refused the connection");
    let spans = otel.spans();
    assert_eq!(spans.len(), 1);
    assert!(attr_str(&spans[0], "error.type").ends_with("ConnectError"));
    assert_eq!(
        spans[0].status,
        Status::error("upstream refused the connection")
    );
}

#[tokio::test(start_paused = true)]
async fn works_without_any_subscriber_and_without_access_log() {
    static STEPS: &[(u64, Step)] = &[
        (5, Step::Data("data: a\n\n")),
        (5, Step::Data("data: b\n\n")),
    ];
    let svc =
        StreamTraceLayer::new()
            .access_log(false)
            .layer(sse_service(0, STEPS, Arc::default()));
    let resp = svc.oneshot(request()).await.unwrap();
    let (chunks, err) = drain(resp.into_body()).await;
    assert_eq!(chunks.len(), 2);
    assert!(err.is_none());
}

#[tokio::test(start_paused = true)]
async fn span_end_time_is_wall_clock_at_first_byte() {
    // Sanity check of the clock mapping: the exported end lies within the real time of the test,
    // plus the virtual time the paused clock skipped.
    let otel = Otel::install();
    static STEPS: &[(u64, Step)] = &[(1_000, Step::Data("x"))];
    let before = SystemTime::now();
    let svc = StreamTraceLayer::new().layer(sse_service(0, STEPS, Arc::default()));
    drain(svc.oneshot(request()).await.unwrap().into_body()).await;
    let after = SystemTime::now();
    let req = otel.span("POST /v1/chat");
    assert!(req.start_time >= before && req.start_time <= after);
    assert!(req.end_time >= before + Duration::from_millis(1_000));
    assert!(req.end_time <= after + Duration::from_millis(1_000));
}

/// With the keepalive layer inside it, the tracing layer takes that layer's line counts instead of
/// scanning every frame again: the same counts, keepalives left out, and only the frames handed out
/// when the client leaves while the flush layer holds one back.
#[tokio::test(start_paused = true)]
async fn events_come_from_the_keepalive_layers_scan_when_it_is_there() {
    use streamgate::flush::FlushLayer;
    use streamgate::idle_timeout::IdleTimeoutLayer;
    static STEPS: &[(u64, Step)] = &[
        (10, Step::Data("data: a\n\n")),
        // Ready at once after the first: the flush layer holds it back for a poll.
        (0, Step::Data("data: b\n\ndata: c\n")),
        (100, Step::Data("\n")),
        (10, Step::End),
    ];
    let stack = || {
        tower::ServiceBuilder::new()
            .layer(StreamTraceLayer::new())
            .layer(FlushLayer::new())
            .layer(IdleTimeoutLayer::new().keepalive_interval(Some(Duration::from_millis(30))))
            .service(sse_service(0, STEPS, Arc::default()))
    };

    // Whole: three events; the three keepalives of the 100 ms gap are not counted.
    let otel = Otel::install();
    let resp = stack().oneshot(request()).await.unwrap();
    let (chunks, err) = drain(resp.into_body()).await;
    assert!(err.is_none());
    assert_eq!(
        chunks.len(),
        3 + 3,
        "three upstream frames, three keepalives"
    );
    let stream = otel.span("POST /v1/chat stream");
    assert_eq!(attr_i64(&stream, "streamgate.events"), 3);
    assert_eq!(attr_i64(&stream, "streamgate.heartbeats"), 3);
    drop(otel);

    // The client leaves while the second frame is held between the layers: one event went out.
    let otel = Otel::install();
    let resp = stack().oneshot(request()).await.unwrap();
    let mut body = Box::pin(resp.into_body());
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "data: a\n\n");
    let held = std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await;
    assert!(held.is_pending(), "the flush layer holds the second frame");
    drop(body);
    let stream = otel.span("POST /v1/chat stream");
    assert_eq!(
        attr_str(&stream, "streamgate.end_reason"),
        "client_disconnect"
    );
    assert_eq!(attr_i64(&stream, "streamgate.chunks"), 1);
    assert_eq!(attr_i64(&stream, "streamgate.events"), 1);
}
