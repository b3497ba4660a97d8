//! Process-wide telemetry for the binary (and for tests): log output, OTLP span export, Prometheus.
//!
//! [`Telemetry::init`] installs the global `tracing` subscriber: a `fmt` layer filtered by
//! [`TelemetryConfig::log_filter`], else `RUST_LOG`, else `info`; plus, when an OTLP endpoint is
//! configured, an OpenTelemetry layer with its own filter (`INFO` and above, transport crates off),
//! so quieting the logs never drops spans. [`Telemetry::meter`] hands out the meter the layers record
//! on, and [`Telemetry::render_prometheus`] / [`serve_metrics`] expose it for scraping.
//!
//! ## OTLP export
//!
//! The exporter is enabled when [`TelemetryConfig::otlp_endpoint`] is set, or when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is. The configured endpoint is
//! a base URL like `OTEL_EXPORTER_OTLP_ENDPOINT`: `/v1/traces` is appended for HTTP (unless already
//! there); gRPC uses it as is. From the environment, the exporter builder itself applies the
//! specification's rules (`..._TRACES_ENDPOINT` verbatim, the generic one plus `/v1/traces`), as well
//! as `OTEL_EXPORTER_OTLP_{,TRACES_}HEADERS`, `..._TIMEOUT` and `..._COMPRESSION`. The protocol is
//! [`TelemetryConfig::otlp_protocol`] when the endpoint comes from the config; when it comes from the
//! environment, `OTEL_EXPORTER_OTLP_{TRACES_,}PROTOCOL` (`grpc` or `http/protobuf`) wins if set. The
//! SDK reads `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER{,_ARG}` and span
//! limits; the span queue honours `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`,
//! `OTEL_BSP_SCHEDULE_DELAY` and `OTEL_BSP_EXPORT_TIMEOUT`. The service name is
//! [`TelemetryConfig::service_name`], else the environment's, else `streamgate`.
//!
//! A collector that is down or slow never slows traffic: ended spans go into a bounded queue
//! (`try_send`; a full queue drops and counts, see [`Telemetry::spans_dropped`] and
//! `streamgate_telemetry_spans_dropped_total{reason}`), and exports run on a dedicated thread with
//! its own small runtime, never on the application's workers. HTTP export uses hyper-util (plain or
//! rustls TLS with webpki roots); gRPC export uses tonic without TLS (an `https` gRPC endpoint is
//! rejected at startup). [`Telemetry::shutdown`] flushes, bounded by a timeout.

mod export;
mod format;
mod logwriter;
mod prometheus;
mod serve;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::{Meter, MeterProvider as _, ObservableCounter};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{ManualReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::level_filters::LevelFilter;
use tracing::Subscriber;
use tracing_subscriber::filter::{filter_fn, EnvFilter, FilterExt, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use export::{ExportRuntime, HyperHttpClient, QueueConfig, QueueSpanProcessor, QueueStats};
use prometheus::SharedReader;
pub use serve::serve_metrics;

/// Default service name when neither the config nor the environment names one.
pub const DEFAULT_SERVICE_NAME: &str = "streamgate";

/// How long [`Telemetry::shutdown`] waits for the last spans to be exported.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Content type of the Prometheus text exposition format served by [`serve_metrics`].
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OTLP transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum OtlpProtocol {
    /// OTLP/HTTP with protobuf bodies (`http/protobuf`), port 4318 by convention. Default.
    #[default]
    HttpProtobuf,
    /// OTLP/gRPC (`grpc`), port 4317 by convention. Plain-text only.
    Grpc,
}

impl OtlpProtocol {
    /// The name used by `OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf` or `grpc`.
    pub const fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::HttpProtobuf => "http/protobuf",
            OtlpProtocol::Grpc => "grpc",
        }
    }

    /// The protocol named by `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL`.
    /// Unset or unrecognised values give `None`.
    pub fn from_env() -> Option<Self> {
        [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
    }
}

impl fmt::Display for OtlpProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OtlpProtocol {
    type Err = TelemetryError;

    /// Accepts `http/protobuf` (or `http`) and `grpc`, case-insensitively.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "http/protobuf" | "http" => Ok(OtlpProtocol::HttpProtobuf),
            "grpc" => Ok(OtlpProtocol::Grpc),
            _ => Err(TelemetryError::Config {
                key: "otlp_protocol",
                value: s.to_owned(),
                reason: "expected `http/protobuf` or `grpc` (`http/json` is not supported)".into(),
            }),
        }
    }
}

/// What [`Telemetry::init`] sets up. `Default` exports nothing and logs at `RUST_LOG` (or `info`).
#[derive(Clone, Debug, Default)]
pub struct TelemetryConfig {
    /// OTLP base URL (e.g. `http://collector:4318`), as `OTEL_EXPORTER_OTLP_ENDPOINT` takes it.
    /// `None`: use the `OTEL_EXPORTER_OTLP_*` environment, and export nothing if that is unset too.
    pub otlp_endpoint: Option<String>,
    /// Transport for [`otlp_endpoint`](Self::otlp_endpoint). Default: `http/protobuf`.
    pub otlp_protocol: OtlpProtocol,
    /// `service.name` of the exported resource. `None`: `OTEL_SERVICE_NAME`, else `streamgate`.
    pub service_name: Option<String>,
    /// Log filter in `EnvFilter` syntax (e.g. `info,streamgate=debug`). `None`: `RUST_LOG`, else `info`.
    pub log_filter: Option<String>,
}

/// Why telemetry could not be set up.
#[derive(Debug)]
#[non_exhaustive]
pub enum TelemetryError {
    /// A configuration value is invalid.
    Config {
        /// The setting (config key or environment variable).
        key: &'static str,
        /// The offending value.
        value: String,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// The OTLP exporter or its runtime could not be built.
    Exporter(String),
    /// A global `tracing` subscriber is already installed (only one per process).
    SubscriberAlreadySet,
    /// Flushing spans failed or timed out.
    Flush(String),
}

impl fmt::Display for TelemetryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TelemetryError::Config { key, value, reason } => {
                write!(f, "invalid {key} `{value}`: {reason}")
            }
            TelemetryError::Exporter(e) => write!(f, "cannot set up the OTLP span exporter: {e}"),
            TelemetryError::SubscriberAlreadySet => f.write_str(
                "a global tracing subscriber is already installed; call Telemetry::init once per process",
            ),
            TelemetryError::Flush(e) => write!(f, "span flush failed: {e}"),
        }
    }
}

impl std::error::Error for TelemetryError {}

/// The span export pipeline, present when an OTLP endpoint is configured.
#[derive(Debug)]
struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    stats: Arc<QueueStats>,
    runtime: std::sync::Mutex<ExportRuntime>,
    endpoint: String,
}

/// Tracer provider, meter provider and Prometheus reader of the process. See the [module docs](self).
#[derive(Debug)]
pub struct Telemetry {
    meter_provider: SdkMeterProvider,
    reader: Arc<ManualReader>,
    tracing: Option<Tracing>,
    _observers: Vec<ObservableCounter<u64>>,
    log_filter: String,
    shut_down: std::sync::atomic::AtomicBool,
    /// The stderr writer thread of [`Telemetry::init`]'s subscriber, flushed at shutdown.
    log: Option<logwriter::LogWriter>,
}

impl Telemetry {
    /// Build the providers and install the global subscriber (fmt + OpenTelemetry when exporting).
    ///
    /// Call once per process, before serving. Fails on an invalid filter or endpoint, or if a global
    /// subscriber is already installed.
    pub fn init(cfg: TelemetryConfig) -> Result<Telemetry, TelemetryError> {
        let mut telemetry = Self::new(cfg)?;
        let fmt_filter =
            EnvFilter::try_new(&telemetry.log_filter).map_err(|e| TelemetryError::Config {
                key: "log_filter",
                value: telemetry.log_filter.clone(),
                reason: e.to_string(),
            })?;
        // Colours only for a terminal: log files and journald get plain text (as NO_COLOR asks too).
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        // Lines go to stderr from a thread of their own (see `logwriter`); stderr directly if that
        // thread cannot start.
        let log = logwriter::LogWriter::stderr().ok();
        let writer = match &log {
            Some(w) => tracing_subscriber::fmt::writer::BoxMakeWriter::new(w.clone()),
            None => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
        };
        telemetry.log = log;
        // The request and stream spans are for OpenTelemetry: the log layer would format every field
        // of both spans on every request only to prefix warnings with them, and the access log line
        // carries what matters on its own.
        let fmt_filter = fmt_filter.and(filter_fn(|m| {
            !(m.is_span() && matches!(m.target(), "streamgate::request" | "streamgate::stream"))
        }));
        let fmt = tracing_subscriber::fmt::layer()
            .event_format(format::LineFormat::default())
            .with_writer(writer)
            .with_ansi(ansi)
            .with_filter(fmt_filter);
        // No `Option` layer when nothing is exported: an absent layer counts as interested in every
        // callsite, so the request and stream spans would be built (and entered and recorded on
        // every request) for nobody.
        let installed = match telemetry.otel_layer() {
            Some(otel) => tracing_subscriber::registry()
                .with(fmt)
                .with(otel)
                .try_init(),
            None => tracing_subscriber::registry().with(fmt).try_init(),
        };
        installed.map_err(|_| TelemetryError::SubscriberAlreadySet)?;
        // streamgate's own layer never needs it; other instrumentation in the process may.
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        Ok(telemetry)
    }

    /// Build the providers without touching the global subscriber: for embedding streamgate in a
    /// process that composes its own subscriber (see [`otel_layer`](Self::otel_layer)), for
    /// benchmarks and for tests.
    pub fn new(cfg: TelemetryConfig) -> Result<Telemetry, TelemetryError> {
        let log_filter = match cfg.log_filter {
            Some(f) => f,
            None => std::env::var("RUST_LOG")
                .ok()
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| "info".to_owned()),
        };
        EnvFilter::try_new(&log_filter).map_err(|e| TelemetryError::Config {
            key: "log_filter",
            value: log_filter.clone(),
            reason: e.to_string(),
        })?;

        let resource = resource(cfg.service_name.as_deref());
        let reader = Arc::new(ManualReader::builder().build());
        let meter_provider = SdkMeterProvider::builder()
            .with_reader(SharedReader(Arc::clone(&reader)))
            .with_resource(resource.clone())
            .build();

        let tracing = match resolve_endpoint(cfg.otlp_endpoint.as_deref(), cfg.otlp_protocol)? {
            Some((endpoint, protocol)) => Some(build_tracing(endpoint, protocol, resource)?),
            None => None,
        };

        let meter = meter_provider.meter("streamgate");
        let mut observers = Vec::new();
        if let Some(t) = &tracing {
            let stats = Arc::clone(&t.stats);
            observers.push(
                meter
                    .u64_observable_counter("streamgate.telemetry.spans_dropped")
                    .with_description("Spans not exported: queue full, or export failed.")
                    .with_callback(move |o| {
                        o.observe(
                            QueueStats::get(&stats.dropped_queue_full),
                            &[KeyValue::new("reason", "queue_full")],
                        );
                        o.observe(
                            QueueStats::get(&stats.dropped_export_failed),
                            &[KeyValue::new("reason", "export_failed")],
                        );
                    })
                    .build(),
            );
            let stats = Arc::clone(&t.stats);
            observers.push(
                meter
                    .u64_observable_counter("streamgate.telemetry.spans_exported")
                    .with_description("Spans accepted by the OTLP collector.")
                    .with_callback(move |o| o.observe(QueueStats::get(&stats.exported), &[]))
                    .build(),
            );
        }

        Ok(Telemetry {
            meter_provider,
            reader,
            tracing,
            _observers: observers,
            log_filter,
            shut_down: std::sync::atomic::AtomicBool::new(false),
            log: None,
        })
    }

    /// The OpenTelemetry `tracing` layer feeding the exporter, or `None` when not exporting.
    ///
    /// It carries its own filter (`INFO` and above; `h2`, `hyper`, `hyper_util`, `tonic`, `tower`
    /// off), independent of the log filter. [`init`](Self::init) installs it; use it directly when
    /// composing a subscriber yourself. Add it only when it is `Some`: tracing-subscriber counts an
    /// absent `Option` layer as interested in every callsite, so `.with(None)` makes every `INFO` span
    /// (streamgate's request and stream spans among them) get built for no one.
    pub fn otel_layer<S>(&self) -> Option<Box<dyn Layer<S> + Send + Sync + 'static>>
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        let t = self.tracing.as_ref()?;
        let filter = Targets::new()
            .with_default(LevelFilter::INFO)
            .with_target("h2", LevelFilter::OFF)
            .with_target("hyper", LevelFilter::OFF)
            .with_target("hyper_util", LevelFilter::OFF)
            .with_target("tonic", LevelFilter::OFF)
            .with_target("tower", LevelFilter::OFF);
        let layer = tracing_opentelemetry::layer()
            .with_tracer(t.tracer.clone())
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_filter(filter);
        Some(Box::new(layer))
    }

    /// Whether spans are exported over OTLP.
    pub fn exports_spans(&self) -> bool {
        self.tracing.is_some()
    }

    /// The OTLP traces URL in use, if exporting.
    pub fn otlp_endpoint(&self) -> Option<&str> {
        self.tracing.as_ref().map(|t| t.endpoint.as_str())
    }

    /// The meter streamgate's instruments are created on (scope `streamgate`).
    pub fn meter(&self) -> Meter {
        self.meter_provider.meter("streamgate")
    }

    /// Collect every instrument now and encode it in the Prometheus text format 0.0.4.
    pub fn render_prometheus(&self) -> String {
        let mut rm = ResourceMetrics::default();
        match self.reader.collect(&mut rm) {
            Ok(()) => prometheus::encode(&rm),
            Err(e) => format!("# metrics collection failed: {e}\n"),
        }
    }

    /// Spans dropped so far because the queue was full or their export failed.
    pub fn spans_dropped(&self) -> u64 {
        self.tracing.as_ref().map_or(0, |t| {
            QueueStats::get(&t.stats.dropped_queue_full)
                + QueueStats::get(&t.stats.dropped_export_failed)
        })
    }

    /// Spans accepted by the collector so far.
    pub fn spans_exported(&self) -> u64 {
        self.tracing
            .as_ref()
            .map_or(0, |t| QueueStats::get(&t.stats.exported))
    }

    /// Export the spans ended so far and wait (at most 5 s) for the collector's answer.
    ///
    /// Blocks the calling thread (see [`shutdown`](Self::shutdown) for why that is safe in async
    /// code). Note that a collector served by the *same* current-thread runtime cannot answer while
    /// that runtime's only thread waits here.
    pub fn force_flush(&self) -> Result<(), TelemetryError> {
        let Some(t) = &self.tracing else {
            return Ok(());
        };
        let provider = t.provider.clone();
        blocking(move || provider.force_flush()).map_err(|e| TelemetryError::Flush(e.to_string()))
    }

    /// Flush the last spans and stop exporting; idempotent. Bounded: at most 5 s waiting for the
    /// collector, plus at most 100 ms to stop the export thread.
    ///
    /// Safe from async code on any runtime flavour: the export work runs on the telemetry thread, so
    /// waiting for it cannot deadlock; the calling thread is blocked meanwhile (on a multi-thread
    /// runtime through `block_in_place`, so that worker's other tasks move on). Takes `&self` so it
    /// also works on the `Arc` shared with [`serve_metrics`].
    pub fn shutdown(&self) {
        if self
            .shut_down
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        if let Some(t) = &self.tracing {
            let provider = t.provider.clone();
            let result = blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT));
            if let Err(e) = result {
                tracing::warn!(target: "streamgate::telemetry", error = %e, "span export shutdown incomplete");
            }
            t.stop_runtime();
        }
        let _ = self.meter_provider.shutdown();
        if let Some(log) = &self.log {
            log.flush();
        }
    }
}

impl Tracing {
    fn stop_runtime(&self) {
        let mut rt = self.runtime.lock().unwrap_or_else(|e| e.into_inner());
        rt.stop();
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        // Dropped without `shutdown`: stop the export thread without waiting for a flush.
        if let Some(t) = &self.tracing {
            t.stop_runtime();
        }
        if let Some(log) = &self.log {
            log.flush();
        }
    }
}

/// Run a blocking wait without stalling other tasks of a multi-thread runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn resource(service_name: Option<&str>) -> Resource {
    let detected = Resource::builder().build();
    let unnamed = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_none_or(|v| v.as_str().starts_with("unknown_service"));
    match service_name {
        Some(name) => Resource::builder()
            .with_service_name(name.to_owned())
            .build(),
        None if unnamed => Resource::builder()
            .with_service_name(DEFAULT_SERVICE_NAME)
            .build(),
        None => detected,
    }
}

/// Per-request OTLP timeout as the exporter builders resolve it: `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`,
/// else `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds), else 10 s.
fn otlp_timeout_from_env() -> Duration {
    [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .iter()
    .find_map(|v| env_nonempty(v)?.trim().parse::<u64>().ok())
    .map_or(Duration::from_secs(10), Duration::from_millis)
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Where spans go: `Some((endpoint to pass to the builder, protocol))`, with `None` as endpoint
/// meaning "let the builder read the environment"; `None` overall means no export.
fn resolve_endpoint(
    configured: Option<&str>,
    protocol: OtlpProtocol,
) -> Result<Option<(Option<String>, OtlpProtocol)>, TelemetryError> {
    if let Some(base) = configured.map(str::trim).filter(|s| !s.is_empty()) {
        let uri: http::Uri =
            base.parse()
                .map_err(|e: http::uri::InvalidUri| TelemetryError::Config {
                    key: "otlp_endpoint",
                    value: base.to_owned(),
                    reason: format!("not a URL: {e}"),
                })?;
        let scheme_ok = matches!(uri.scheme_str(), Some("http") | Some("https"));
        if !scheme_ok || uri.host().is_none() {
            return Err(TelemetryError::Config {
                key: "otlp_endpoint",
                value: base.to_owned(),
                reason: "expected an http:// or https:// base URL, e.g. http://localhost:4318"
                    .into(),
            });
        }
        if protocol == OtlpProtocol::Grpc && uri.scheme_str() == Some("https") {
            return Err(TelemetryError::Config {
                key: "otlp_endpoint",
                value: base.to_owned(),
                reason:
                    "TLS is not supported for OTLP/gRPC in this build; use http:// or http/protobuf"
                        .into(),
            });
        }
        let endpoint = match protocol {
            OtlpProtocol::HttpProtobuf if base.trim_end_matches('/').ends_with("/v1/traces") => {
                base.to_owned()
            }
            OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
            OtlpProtocol::Grpc => base.to_owned(),
        };
        return Ok(Some((Some(endpoint), protocol)));
    }
    let from_env = env_nonempty("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| env_nonempty("OTEL_EXPORTER_OTLP_ENDPOINT"));
    Ok(from_env.map(|_| (None, OtlpProtocol::from_env().unwrap_or(protocol))))
}

fn build_tracing(
    endpoint: Option<String>,
    protocol: OtlpProtocol,
    resource: Resource,
) -> Result<Tracing, TelemetryError> {
    let runtime = ExportRuntime::start()
        .map_err(|e| TelemetryError::Exporter(format!("cannot start the export thread: {e}")))?;
    let queue = QueueConfig::from_env();
    let mut exporter = match protocol {
        OtlpProtocol::HttpProtobuf => {
            let client = HyperHttpClient::new(runtime.handle().clone(), otlp_timeout_from_env())
                .map_err(|e| TelemetryError::Exporter(format!("TLS setup failed: {e}")))?;
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(client)
                .with_protocol(Protocol::HttpBinary);
            if let Some(e) = &endpoint {
                b = b.with_endpoint(e.clone());
            }
            b.build()
        }
        OtlpProtocol::Grpc => {
            // tonic's lazy channel spawns its worker on the current runtime: ours.
            let _entered = runtime.handle().enter();
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_protocol(Protocol::Grpc);
            if let Some(e) = &endpoint {
                b = b.with_endpoint(e.clone());
            }
            b.build()
        }
    }
    .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    opentelemetry_sdk::trace::SpanExporter::set_resource(&mut exporter, &resource);
    let processor = QueueSpanProcessor::spawn(exporter, queue, runtime.handle());
    let stats = processor.stats();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("streamgate");
    let endpoint = endpoint.unwrap_or_else(|| "(from OTEL_EXPORTER_OTLP_* environment)".into());
    Ok(Tracing {
        provider,
        tracer,
        stats,
        runtime: std::sync::Mutex::new(runtime),
        endpoint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_names_parse() {
        assert_eq!("grpc".parse::<OtlpProtocol>().unwrap(), OtlpProtocol::Grpc);
        assert_eq!(
            "HTTP/protobuf".parse::<OtlpProtocol>().unwrap(),
            OtlpProtocol::HttpProtobuf
        );
        let err = "http/json".parse::<OtlpProtocol>().unwrap_err();
        assert!(err.to_string().contains("http/json"), "{err}");
    }

    #[test]
    fn configured_endpoint_is_a_base_url() {
        let http = |e| {
            resolve_endpoint(Some(e), OtlpProtocol::HttpProtobuf)
                .unwrap()
                .unwrap()
        };
        assert_eq!(
            http("http://c:4318").0.as_deref(),
            Some("http://c:4318/v1/traces")
        );
        assert_eq!(
            http("http://c:4318/").0.as_deref(),
            Some("http://c:4318/v1/traces")
        );
        assert_eq!(
            http("https://c/otlp/v1/traces").0.as_deref(),
            Some("https://c/otlp/v1/traces")
        );
        let grpc = resolve_endpoint(Some("http://c:4317"), OtlpProtocol::Grpc)
            .unwrap()
            .unwrap();
        assert_eq!(grpc, (Some("http://c:4317".into()), OtlpProtocol::Grpc));
        for bad in ["c:4318", "ftp://c", "not a url"] {
            let err = resolve_endpoint(Some(bad), OtlpProtocol::HttpProtobuf).unwrap_err();
            assert!(err.to_string().contains("otlp_endpoint"), "{err}");
        }
        assert!(resolve_endpoint(Some("https://c:4317"), OtlpProtocol::Grpc).is_err());
    }

    #[test]
    fn invalid_log_filter_is_reported_with_its_value() {
        let err = Telemetry::new(TelemetryConfig {
            log_filter: Some("info,[".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("log_filter"), "{err}");
    }
}
