//! Pull-based Prometheus exposition: a shared manual reader collected on each scrape, and a text
//! encoder for format 0.0.4.
//!
//! Names follow the OpenTelemetry-to-Prometheus conventions: invalid characters become `_`, the unit
//! is appended as a word (`s` -> `_seconds`, `By` -> `_bytes`; `{annotations}` are dropped), monotonic
//! sums get `_total`, non-monotonic sums and gauges are `gauge`s, histograms expose cumulative
//! `_bucket{le}` series plus `_sum` and `_count`. Resource attributes are exposed once as
//! `target_info`. Instrumentation scopes are not turned into labels.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Weak};
use std::time::Duration;

use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{InstrumentKind, ManualReader, Pipeline, Temporality};

/// A [`ManualReader`] the meter provider owns while the telemetry handle keeps a second reference
/// to collect it on each scrape.
#[derive(Clone, Debug)]
pub(crate) struct SharedReader(pub(crate) Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }

    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, _kind: InstrumentKind) -> Temporality {
        // Prometheus counters and histograms are cumulative.
        Temporality::Cumulative
    }
}

struct Family {
    help: String,
    kind: &'static str,
    samples: Vec<String>,
}

/// Encode `rm` in the Prometheus text exposition format 0.0.4.
pub(crate) fn encode(rm: &ResourceMetrics) -> String {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for scope in rm.scope_metrics() {
        for metric in scope.metrics() {
            match metric.data() {
                AggregatedMetrics::F64(d) => add_metric(&mut families, metric, d),
                AggregatedMetrics::U64(d) => add_metric(&mut families, metric, d),
                AggregatedMetrics::I64(d) => add_metric(&mut families, metric, d),
            }
        }
    }

    let mut out = String::with_capacity(4096);
    let resource: Vec<KeyValue> = rm
        .resource()
        .iter()
        .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
        .collect();
    if !resource.is_empty() {
        out.push_str("# HELP target_info Target metadata\n# TYPE target_info gauge\n");
        out.push_str("target_info");
        write_labels(&mut out, &resource, None);
        out.push_str(" 1\n");
    }
    for (name, family) in &families {
        if family.samples.is_empty() {
            continue;
        }
        let _ = writeln!(out, "# HELP {name} {}", escape_help(&family.help));
        let _ = writeln!(out, "# TYPE {name} {}", family.kind);
        let mut samples = family.samples.clone();
        samples.sort();
        for s in samples {
            out.push_str(&s);
        }
    }
    out
}

/// A number as Prometheus prints it.
trait Num: Copy {
    fn fmt(self) -> String;
}

impl Num for f64 {
    fn fmt(self) -> String {
        fmt_f64(self)
    }
}

impl Num for u64 {
    fn fmt(self) -> String {
        self.to_string()
    }
}

impl Num for i64 {
    fn fmt(self) -> String {
        self.to_string()
    }
}

fn fmt_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

fn add_metric<T: Num>(
    families: &mut BTreeMap<String, Family>,
    metric: &Metric,
    data: &MetricData<T>,
) {
    let (kind, counter) = match data {
        MetricData::Gauge(_) => ("gauge", false),
        MetricData::Sum(s) if s.is_monotonic() => ("counter", true),
        MetricData::Sum(_) => ("gauge", false),
        MetricData::Histogram(_) => ("histogram", false),
        // Not produced by the instruments streamgate configures; skipped rather than mis-encoded.
        MetricData::ExponentialHistogram(_) => return,
    };
    let name = prometheus_name(metric.name(), metric.unit(), counter);
    let family = families.entry(name.clone()).or_insert_with(|| Family {
        help: metric.description().to_owned(),
        kind,
        samples: Vec::new(),
    });
    if family.kind != kind {
        // Two instruments mapping to one name with different types: keep the first.
        return;
    }
    match data {
        MetricData::Gauge(g) => {
            for p in g.data_points() {
                family
                    .samples
                    .push(sample(&name, "", p.attributes(), None, p.value().fmt()));
            }
        }
        MetricData::Sum(s) => {
            for p in s.data_points() {
                family
                    .samples
                    .push(sample(&name, "", p.attributes(), None, p.value().fmt()));
            }
        }
        MetricData::Histogram(h) => {
            for p in h.data_points() {
                // One string per data point keeps its series together after sorting.
                let mut s = String::new();
                let mut cumulative = 0u64;
                for (bound, count) in p.bounds().zip(p.bucket_counts()) {
                    cumulative += count;
                    let le = fmt_f64(bound);
                    s.push_str(&sample(
                        &name,
                        "_bucket",
                        p.attributes(),
                        Some(&le),
                        cumulative.to_string(),
                    ));
                }
                s.push_str(&sample(
                    &name,
                    "_bucket",
                    p.attributes(),
                    Some("+Inf"),
                    p.count().to_string(),
                ));
                s.push_str(&sample(&name, "_sum", p.attributes(), None, p.sum().fmt()));
                s.push_str(&sample(
                    &name,
                    "_count",
                    p.attributes(),
                    None,
                    p.count().to_string(),
                ));
                family.samples.push(s);
            }
        }
        MetricData::ExponentialHistogram(_) => {}
    }
}

fn sample<'a>(
    name: &str,
    suffix: &str,
    attributes: impl Iterator<Item = &'a KeyValue>,
    le: Option<&str>,
    value: String,
) -> String {
    let attrs: Vec<KeyValue> = attributes.cloned().collect();
    let mut s = String::with_capacity(64);
    s.push_str(name);
    s.push_str(suffix);
    write_labels(&mut s, &attrs, le);
    s.push(' ');
    s.push_str(&value);
    s.push('\n');
    s
}

fn write_labels(out: &mut String, attrs: &[KeyValue], le: Option<&str>) {
    let mut labels: Vec<(String, String)> = attrs
        .iter()
        .map(|kv| (sanitize_label(kv.key.as_str()), value_string(&kv.value)))
        .collect();
    labels.sort();
    if let Some(le) = le {
        labels.push(("le".into(), le.into()));
    }
    if labels.is_empty() {
        return;
    }
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"{}\"", escape_label_value(v));
    }
    out.push('}');
}

fn value_string(v: &Value) -> String {
    v.as_str().into_owned()
}

/// The Prometheus name of an OpenTelemetry instrument.
pub(crate) fn prometheus_name(name: &str, unit: &str, counter: bool) -> String {
    let mut n = sanitize_name(name);
    if let Some(suffix) = unit_suffix(unit) {
        if !n.ends_with(&format!("_{suffix}")) {
            n.push('_');
            n.push_str(&suffix);
        }
    }
    if counter && !n.ends_with("_total") {
        n.push_str("_total");
    }
    n
}

fn unit_word(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "d" => "days",
        "h" => "hours",
        "min" => "minutes",
        "s" => "seconds",
        "ms" => "milliseconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "By" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "GiBy" => "gibibytes",
        "KBy" => "kilobytes",
        "MBy" => "megabytes",
        "GBy" => "gigabytes",
        "%" => "percent",
        _ => return None,
    })
}

fn per_unit_word(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "s" => "second",
        "m" => "minute",
        "h" => "hour",
        "d" => "day",
        _ => return None,
    })
}

fn unit_suffix(unit: &str) -> Option<String> {
    if unit.is_empty() || unit.starts_with('{') {
        return None;
    }
    if let Some(word) = unit_word(unit) {
        return Some(word.to_owned());
    }
    let (a, b) = unit.split_once('/')?;
    let per = per_unit_word(b)?;
    match unit_word(a) {
        Some(w) => Some(format!("{w}_per_{per}")),
        None if a.starts_with('{') || a == "1" => Some(format!("per_{per}")),
        None => None,
    }
}

fn sanitize_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    for (i, c) in name.chars().enumerate() {
        if i == 0 && c.is_ascii_digit() {
            out.push('_');
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            out.push(c);
        } else {
            out.push('_');
        }
    }
    collapse_underscores(out)
}

fn sanitize_label(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 1);
    for (i, c) in key.chars().enumerate() {
        if i == 0 && c.is_ascii_digit() {
            out.push_str("key_");
        }
        out.push(if c.is_ascii_alphanumeric() || c == '_' {
            c
        } else {
            '_'
        });
    }
    collapse_underscores(out)
}

fn collapse_underscores(s: String) -> String {
    if !s.contains("__") {
        return s;
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '_' && out.ends_with('_') {
            continue;
        }
        out.push(c);
    }
    out
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::SdkMeterProvider;

    #[test]
    fn names_follow_the_otel_prometheus_conventions() {
        assert_eq!(
            prometheus_name("streamgate.time_to_first_byte", "s", false),
            "streamgate_time_to_first_byte_seconds"
        );
        assert_eq!(
            prometheus_name("streamgate.streams_ended", "", true),
            "streamgate_streams_ended_total"
        );
        assert_eq!(
            prometheus_name("streamgate.stream", "By", true),
            "streamgate_stream_bytes_total"
        );
        assert_eq!(
            prometheus_name("x.requests", "{request}", true),
            "x_requests_total"
        );
        assert_eq!(
            prometheus_name("rate", "By/s", false),
            "rate_bytes_per_second"
        );
        assert_eq!(prometheus_name("lat_seconds", "s", false), "lat_seconds");
        assert_eq!(prometheus_name("9lives-x", "", false), "_9lives_x");
        assert_eq!(sanitize_label("http.route"), "http_route");
    }

    #[test]
    fn encodes_counters_gauges_and_cumulative_histograms() {
        let reader = Arc::new(ManualReader::builder().build());
        let provider = SdkMeterProvider::builder()
            .with_reader(SharedReader(Arc::clone(&reader)))
            .build();
        let meter = provider.meter("t");
        let c = meter
            .u64_counter("t.ended")
            .with_description("Ended.\nTwo lines")
            .build();
        c.add(2, &[KeyValue::new("reason", "complete")]);
        c.add(1, &[KeyValue::new("reason", "say \"hi\"\\")]);
        let g = meter.i64_up_down_counter("t.active").build();
        g.add(3, &[]);
        g.add(-3, &[]);
        let h = meter
            .f64_histogram("t.latency")
            .with_unit("s")
            .with_boundaries(vec![0.1, 1.0, 300.0])
            .build();
        h.record(0.05, &[]);
        h.record(0.5, &[]);
        h.record(200.0, &[]);
        h.record(1000.0, &[]);

        let mut rm = ResourceMetrics::default();
        reader.collect(&mut rm).unwrap();
        let text = encode(&rm);
        let expected = [
            "# HELP t_ended_total Ended.\\nTwo lines\n# TYPE t_ended_total counter\n",
            "t_ended_total{reason=\"complete\"} 2\n",
            "t_ended_total{reason=\"say \\\"hi\\\"\\\\\"} 1\n",
            "# TYPE t_active gauge\nt_active 0\n",
            "# TYPE t_latency_seconds histogram\n",
            "t_latency_seconds_bucket{le=\"0.1\"} 1\n",
            "t_latency_seconds_bucket{le=\"1\"} 2\n",
            "t_latency_seconds_bucket{le=\"300\"} 3\n",
            "t_latency_seconds_bucket{le=\"+Inf\"} 4\n",
            "t_latency_seconds_sum 1200.55\n",
            "t_latency_seconds_count 4\n",
            "target_info{",
        ];
        for e in expected {
            assert!(text.contains(e), "missing {e:?} in:\n{text}");
        }
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(
                value.parse::<f64>().is_ok() || value == "+Inf",
                "bad sample {line:?}"
            );
        }
    }
}
