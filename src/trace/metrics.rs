//! OpenTelemetry instruments recorded by [`StreamTraceLayer`](super::StreamTraceLayer).

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::{Counter, Histogram, Meter, UpDownCounter};
use opentelemetry::KeyValue;

use crate::EndReason;

/// Bucket bounds (seconds) of `streamgate_time_to_first_byte_seconds`: 5 ms to 5 min.
///
/// LLM backends routinely take tens of seconds to the first token under load, so the buckets go well
/// past the 10 s where HTTP latency histograms usually stop.
pub const TTFB_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

/// Bucket bounds (seconds) of `streamgate_stream_duration_seconds`: 100 ms to 2 h.
pub const STREAM_DURATION_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
];

/// The metric instruments of the tracing layer, created once from a [`Meter`] and cheap to clone.
///
/// Names as Prometheus shows them (the OpenTelemetry names use dots and a unit):
///
/// | Prometheus name | kind | meaning |
/// |---|---|---|
/// | `streamgate_time_to_first_byte_seconds` | histogram | request arrival to the first *upstream* body byte handed out ([`TTFB_BUCKETS`]) |
/// | `streamgate_stream_duration_seconds` | histogram | first body byte to the end of the body ([`STREAM_DURATION_BUCKETS`]) |
/// | `streamgate_streams_active` | gauge | responses whose head was returned and whose body has not ended yet |
/// | `streamgate_streams_ended_total{reason}` | counter | requests ended, by [`EndReason::as_str`]; counts every request the layer saw, including those that ended before a response head (client gone, service error) |
/// | `streamgate_stream_bytes_total` | counter | upstream body bytes forwarded (injected keepalives excluded) |
/// | `streamgate_stream_events_total` | counter | SSE events (or NDJSON records) forwarded |
/// | `streamgate_heartbeats_total` | counter | keepalives injected by an inner layer |
/// | `streamgate_upstream_errors_total{endpoint}` | counter | upstream failures reported by the proxy via [`upstream_error`](Self::upstream_error) |
///
/// Byte, event and heartbeat counters are added once, when a stream ends (nothing is recorded per
/// chunk), so a long stream shows up in their rates when it finishes.
///
/// No `http.server.request.duration` is recorded: for a streaming response it would mix time to
/// first byte with stream length, which is exactly what the two histograms above keep apart.
#[derive(Clone, Debug)]
pub struct StreamMetrics {
    inner: Arc<Instruments>,
}

#[derive(Debug)]
struct Instruments {
    ttfb: Histogram<f64>,
    duration: Histogram<f64>,
    active: UpDownCounter<i64>,
    ended: Counter<u64>,
    bytes: Counter<u64>,
    events: Counter<u64>,
    heartbeats: Counter<u64>,
    upstream_errors: Counter<u64>,
}

impl StreamMetrics {
    /// Create the instruments on `meter`.
    pub fn new(meter: &Meter) -> Self {
        let inner = Instruments {
            ttfb: meter
                .f64_histogram("streamgate.time_to_first_byte")
                .with_unit("s")
                .with_description("Time from request arrival to the first upstream body byte.")
                .with_boundaries(TTFB_BUCKETS.to_vec())
                .build(),
            duration: meter
                .f64_histogram("streamgate.stream_duration")
                .with_unit("s")
                .with_description("Time from the first body byte to the end of the stream.")
                .with_boundaries(STREAM_DURATION_BUCKETS.to_vec())
                .build(),
            active: meter
                .i64_up_down_counter("streamgate.streams_active")
                .with_description("Responses whose body is being streamed.")
                .build(),
            ended: meter
                .u64_counter("streamgate.streams_ended")
                .with_description("Requests ended, by end reason.")
                .build(),
            bytes: meter
                .u64_counter("streamgate.stream")
                .with_unit("By")
                .with_description("Upstream body bytes forwarded to clients.")
                .build(),
            events: meter
                .u64_counter("streamgate.stream_events")
                .with_description("SSE events (or NDJSON records) forwarded to clients.")
                .build(),
            heartbeats: meter
                .u64_counter("streamgate.heartbeats")
                .with_description("Keepalive heartbeats injected into streams.")
                .build(),
            upstream_errors: meter
                .u64_counter("streamgate.upstream_errors")
                .with_description("Upstream failures, by upstream endpoint.")
                .build(),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Count one upstream failure (connect error, reset, timeout) against `endpoint`.
    ///
    /// Keep `endpoint` low-cardinality: a configured upstream name or `host:port`, never a URL with
    /// a path or query.
    pub fn upstream_error(&self, endpoint: &str) {
        self.inner
            .upstream_errors
            .add(1, &[KeyValue::new("endpoint", endpoint.to_owned())]);
    }

    pub(crate) fn stream_started(&self) {
        self.inner.active.add(1, &[]);
    }

    pub(crate) fn first_byte(&self, ttfb: Duration) {
        self.inner.ttfb.record(ttfb.as_secs_f64(), &[]);
    }

    pub(crate) fn ended(&self, end: &StreamEnd) {
        let i = &self.inner;
        if end.was_active {
            i.active.add(-1, &[]);
        }
        i.ended
            .add(1, &[KeyValue::new("reason", end.reason.as_str())]);
        if let Some(d) = end.stream_duration {
            i.duration.record(d.as_secs_f64(), &[]);
        }
        if end.bytes > 0 {
            i.bytes.add(end.bytes, &[]);
        }
        if end.events > 0 {
            i.events.add(end.events, &[]);
        }
        if end.heartbeats > 0 {
            i.heartbeats.add(end.heartbeats, &[]);
        }
    }
}

/// What the body tracker reports to the metrics when a request ends.
#[derive(Debug)]
pub(crate) struct StreamEnd {
    pub(crate) reason: EndReason,
    pub(crate) was_active: bool,
    pub(crate) stream_duration: Option<Duration>,
    pub(crate) bytes: u64,
    pub(crate) events: u64,
    pub(crate) heartbeats: u64,
}
