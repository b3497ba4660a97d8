//! The streamgate layer configurations measured in `body_10k_frames`, listed once and visited both by
//! the criterion benchmarks and by the allocation probe (`alloc_probe.rs`), so the two measure exactly
//! the same stacks.
//!
//! Subscribers are scoped with [`tracing::subscriber::set_default`] around each case (never a global
//! subscriber), so cases do not see each other's subscriber. Cases without a subscriber are visited
//! first: tracing caches per-callsite interest and a max level over every `Dispatch` ever registered,
//! so a case run after a subscriber existed would not measure a process that has none.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::Empty;
use streamgate::cancel::CancelOnDisconnectLayer;
use streamgate::flush::FlushLayer;
use streamgate::idle_timeout::IdleTimeoutLayer;
use streamgate::proxy::config::StreamSettings;
use streamgate::telemetry::{OtlpProtocol, Telemetry, TelemetryConfig};
use streamgate::trace::{StreamMetrics, StreamTraceLayer};
use tower::layer::util::{Identity, Stack};
use tower::{Layer, Service, ServiceBuilder};
use tracing::Subscriber;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;

use crate::harness::{Pace, Upstream};
use crate::sink::OtlpSink;

/// Every case [`visit`] visits, in order.
pub(crate) const CASES: &[&str] = &[
    "ref_identity_layer",
    "idle_timeout_keepalive_sse",
    "idle_timeout_no_keepalive",
    "flush",
    "cancel",
    "trace_no_subscriber",
    "trace_no_subscriber_metrics",
    "full_stack",
    "paced_full_stack",
    "paced_idle_timeout_keepalive_sse",
    "paced_flush",
    "trace_fmt_subscriber_no_exporter",
    "trace_with_exporter",
    "trace_with_exporter_metrics",
    "full_stack_with_exporter",
];

/// Something that measures one layer configuration.
pub(crate) trait Visitor {
    /// Whether the case `name` will be measured (lets the probe skip the set-up of other cases).
    fn wants(&self, name: &str) -> bool;

    /// Measure one request through `layer` in front of the in-memory SSE upstream at `pace`.
    fn layer<L, B>(&mut self, name: &str, pace: Pace, layer: L)
    where
        L: Layer<Upstream>,
        L::Service: Service<Request<Empty<Bytes>>, Response = Response<B>>,
        <L::Service as Service<Request<Empty<Bytes>>>>::Error: std::fmt::Debug,
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Debug;
}

/// The proxy's order (see `src/proxy/stack.rs`): trace outermost, then cancel, flush, idle timeout.
type FullStack = ServiceBuilder<
    Stack<
        IdleTimeoutLayer,
        Stack<FlushLayer, Stack<CancelOnDisconnectLayer, Stack<StreamTraceLayer, Identity>>>,
    >,
>;

/// The idle-timeout layer exactly as the proxy builds it for a route with default settings.
fn proxy_idle_timeout() -> IdleTimeoutLayer {
    let s = StreamSettings::default();
    IdleTimeoutLayer::new()
        .idle_timeout(s.idle_timeout)
        .first_byte_timeout(Some(s.first_byte_timeout))
        .keepalive_interval(s.keepalive_interval)
        .ndjson_keepalive(None)
}

fn full_stack(metrics: StreamMetrics) -> FullStack {
    ServiceBuilder::new()
        .layer(StreamTraceLayer::new().metrics(metrics))
        .layer(CancelOnDisconnectLayer::new())
        .layer(FlushLayer::new())
        .layer(proxy_idle_timeout())
}

/// The binary's log layer (`Telemetry::init`: fmt filtered at `info`), writing to a sink instead of
/// stderr: events are still filtered and formatted, only the write is free.
fn fmt_layer<S>() -> impl tracing_subscriber::Layer<S> + Send + Sync
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::sink)
        .with_filter(EnvFilter::new("info"))
}

/// The log layer alone: the layer's spans are enabled (they are `INFO`), nothing exports them.
fn fmt_subscriber() -> impl Subscriber + Send + Sync {
    tracing_subscriber::registry().with(fmt_layer())
}

/// What the binary installs when exporting: the log layer plus the OpenTelemetry layer.
fn otel_subscriber(telemetry: &Telemetry) -> impl Subscriber + Send + Sync {
    let subscriber = tracing_subscriber::registry().with(fmt_layer());
    let otel = telemetry.otel_layer();
    assert!(
        otel.is_some(),
        "the telemetry was built without an exporter"
    );
    subscriber.with(otel)
}

/// Providers with a meter and no span export (the metrics-only configuration).
fn metrics_only() -> Telemetry {
    let t = Telemetry::new(TelemetryConfig {
        otlp_endpoint: None,
        log_filter: Some("info".into()),
        ..TelemetryConfig::default()
    })
    .expect("telemetry without an exporter");
    // `None` defers to OTEL_EXPORTER_OTLP_*: refuse to silently measure an exporter here.
    assert!(
        !t.exports_spans(),
        "unset OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT to run the benchmarks"
    );
    t
}

/// Visit every case, in an order that keeps the no-subscriber cases free of any subscriber's traces.
pub(crate) fn visit<V: Visitor>(v: &mut V) {
    use Pace::{PendingBeforeEach, Ready};

    // ---- No subscriber anywhere in the process yet. ----
    // The harness's request path with no layer: a response with one header, then the bare body.
    v.layer("ref_identity_layer", Ready, Identity::new());
    v.layer(
        "idle_timeout_keepalive_sse",
        Ready,
        IdleTimeoutLayer::new().keepalive_interval(Some(Duration::from_secs(15))),
    );
    v.layer(
        "idle_timeout_no_keepalive",
        Ready,
        IdleTimeoutLayer::new().keepalive_interval(None),
    );
    v.layer("flush", Ready, FlushLayer::new());
    v.layer("cancel", Ready, CancelOnDisconnectLayer::new());
    v.layer("trace_no_subscriber", Ready, StreamTraceLayer::new());

    let wants_metrics = [
        "trace_no_subscriber_metrics",
        "full_stack",
        "paced_full_stack",
    ]
    .iter()
    .any(|n| v.wants(n));
    if wants_metrics {
        let telemetry = metrics_only();
        let metrics = StreamMetrics::new(&telemetry.meter());
        v.layer(
            "trace_no_subscriber_metrics",
            Ready,
            StreamTraceLayer::new().metrics(metrics.clone()),
        );
        v.layer("full_stack", Ready, full_stack(metrics.clone()));
        v.layer("paced_full_stack", PendingBeforeEach, full_stack(metrics));
        // Metrics really were recorded (the instruments are not no-ops).
        let text = telemetry.render_prometheus();
        assert!(
            text.contains("streamgate_streams_ended_total"),
            "no stream metrics recorded:\n{text}"
        );
    }

    // The usual token stream: the upstream is `Pending` between frames, so timers are polled and
    // re-armed on every frame, and hyper flushes without FlushBody's help.
    v.layer(
        "paced_idle_timeout_keepalive_sse",
        PendingBeforeEach,
        IdleTimeoutLayer::new().keepalive_interval(Some(Duration::from_secs(15))),
    );
    v.layer("paced_flush", PendingBeforeEach, FlushLayer::new());

    // ---- Subscribers, each scoped to its case. ----
    if v.wants("trace_fmt_subscriber_no_exporter") {
        let _scope = tracing::subscriber::set_default(fmt_subscriber());
        v.layer(
            "trace_fmt_subscriber_no_exporter",
            Ready,
            StreamTraceLayer::new(),
        );
    }

    let exporter_cases = [
        "trace_with_exporter",
        "trace_with_exporter_metrics",
        "full_stack_with_exporter",
    ];
    if exporter_cases.iter().any(|n| v.wants(n)) {
        let sink = OtlpSink::start();
        let telemetry = Telemetry::new(TelemetryConfig {
            otlp_endpoint: Some(sink.base_url()),
            otlp_protocol: OtlpProtocol::HttpProtobuf,
            service_name: Some("streamgate-bench".into()),
            log_filter: Some("info".into()),
        })
        .expect("telemetry exporting to the in-bench sink");
        let metrics = StreamMetrics::new(&telemetry.meter());
        {
            let _scope = tracing::subscriber::set_default(otel_subscriber(&telemetry));
            v.layer("trace_with_exporter", Ready, StreamTraceLayer::new());
        }
        {
            let _scope = tracing::subscriber::set_default(otel_subscriber(&telemetry));
            v.layer(
                "trace_with_exporter_metrics",
                Ready,
                StreamTraceLayer::new().metrics(metrics.clone()),
            );
        }
        {
            let _scope = tracing::subscriber::set_default(otel_subscriber(&telemetry));
            v.layer("full_stack_with_exporter", Ready, full_stack(metrics));
        }
        // The spans really went through the pipeline to the sink.
        telemetry.force_flush().expect("flush the span queue");
        let (exported, dropped) = (telemetry.spans_exported(), telemetry.spans_dropped());
        eprintln!(
            "exporter cases: {exported} spans exported in {} OTLP requests, {dropped} dropped \
             (queue full or export failed)",
            sink.requests()
        );
        assert!(
            exported > 0 && sink.requests() > 0,
            "no span reached the sink"
        );
        telemetry.shutdown();
    }
}
