//! Proxy configuration: the TOML file, command-line overrides, and validation.
//!
//! The file is parsed into a raw, all-strings form first, then validated key by key into [`Config`], so
//! every error can name the key, the value and the reason ([`ConfigError`]). Unknown keys are errors,
//! never silently ignored. Durations are humantime strings (`"15s"`, `"250ms"`).
//!
//! ```toml
//! [defaults]                       # stream settings for every route (each has a built-in default)
//! idle_timeout = "5m"
//! keepalive_interval = "15s"
//! first_byte_timeout = "5m"
//!
//! [server]
//! drain_timeout = "30s"
//! client_idle_timeout = "30s"      # a client connection with no request in flight
//! send_timeout = "60s"             # a client that takes nothing of a response for this long
//! max_streams = 10000
//! workers = 2                      # runtime threads; default: one per CPU the process may use
//! metrics_listen = "127.0.0.1:9464"
//!
//! [telemetry]
//! otlp_endpoint = "http://127.0.0.1:4318"
//! otlp_protocol = "http"           # or "grpc"
//!
//! [[listeners]]
//! listen = "0.0.0.0:8080"
//!
//! [pools.llm]
//! endpoints = ["http://127.0.0.1:9000", "http://127.0.0.1:9001"]
//! balance = "least_streams"
//!
//! [[routes]]
//! path_prefix = "/v1/"
//! pool = "llm"
//! idle_timeout = "10m"
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use serde::Deserialize;

/// A configuration error: which key, which value, and why. The binary prints it and exits with code 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    key: String,
    value: String,
    reason: String,
}

impl ConfigError {
    /// A new error for `key` holding `value`.
    pub fn new(
        key: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// The offending key, as a dotted path (`pools.llm.endpoints[1]`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The offending value as written (empty when the key is missing).
    pub fn value(&self) -> &str {
        &self.value
    }

    /// Why the value was rejected.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "config key `{}`: {}", self.key, self.reason)
        } else {
            write!(
                f,
                "config key `{}` = {:?}: {}",
                self.key, self.value, self.reason
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// Stream settings applied per route: the defaults, overridden by a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSettings {
    /// Upstream silence after which a stream is cut. Default: 300 s.
    pub idle_timeout: Duration,
    /// Silence after which an SSE comment keepalive is injected; `None` disables. Default: 15 s.
    pub keepalive_interval: Option<Duration>,
    /// Wait for the upstream's response headers before answering 504. Default: 300 s.
    pub first_byte_timeout: Duration,
    /// A line to inject as keepalive into NDJSON streams (newline added), e.g. `{"type":"keepalive"}`.
    /// NDJSON has no comment syntax, so clients must tolerate it. Default: none (no injection).
    pub ndjson_keepalive: Option<String>,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Some(Duration::from_secs(15)),
            first_byte_timeout: Duration::from_secs(300),
            ndjson_keepalive: None,
        }
    }
}

/// TLS settings of a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// One listening socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Address to bind.
    pub listen: SocketAddr,
    /// Serve TLS (HTTP/2 via ALPN) with this certificate.
    pub tls: Option<TlsConfig>,
}

/// How a pool picks an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// In turn. Default.
    RoundRobin,
    /// The endpoint with the fewest open streams (streams are long, so request counts mislead).
    LeastStreams,
}

/// Which HTTP version to speak to a pool's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 for `http://`, ALPN (h2 preferred) for `https://`. Default.
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only: h2c prior knowledge for `http://`, h2 via ALPN for `https://`.
    Http2,
}

/// An upstream endpoint: scheme and authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// `host:port` (the port is filled in from the scheme if omitted).
    pub authority: Authority,
}

impl fmt::Display for EndpointConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

/// Active health checking of a pool's endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// Path requested with GET; a 2xx answer is healthy.
    pub path: String,
    /// Time between checks. Default: 5 s.
    pub interval: Duration,
    /// Time allowed for one check. Default: 2 s.
    pub timeout: Duration,
    /// Consecutive failures that mark an endpoint unhealthy. Default: 2.
    pub unhealthy_threshold: u32,
    /// Consecutive successes that mark it healthy again. Default: 1.
    pub healthy_threshold: u32,
}

/// A named pool of endpoints serving the same upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// The pool's name (its key under `[pools]`).
    pub name: String,
    /// The endpoints (at least one).
    pub endpoints: Vec<EndpointConfig>,
    /// Balancing policy. Default: round robin.
    pub balance: Balance,
    /// Protocol to the endpoints. Default: auto.
    pub protocol: UpstreamProtocol,
    /// Extra CA bundle (PEM) trusted for `https` endpoints, besides the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// TCP connect timeout, for each address of the endpoint's name in turn (as nginx's
    /// `proxy_connect_timeout`). Default: 5 s.
    pub connect_timeout: Duration,
    /// Consecutive connect failures that eject an endpoint. Default: 3.
    pub max_fails: u32,
    /// First ejection period; doubles on each re-ejection up to 16x. Default: 10 s.
    pub ejection_time: Duration,
    /// Attempts per request across endpoints, before the response headers only. Default: 3 (capped at the
    /// number of endpoints).
    pub max_attempts: u32,
    /// Optional active health check.
    pub health_check: Option<HealthCheckConfig>,
    /// The flow-control window each stream to an HTTP/2 endpoint gets, in KiB; the connection's is
    /// 256 times it (at most 2 GiB). Unread data counts against both: a client that stops reading
    /// holds at most this much of the proxy, and it takes 256 such clients at once to stall the
    /// other streams sharing the connection. A stream's throughput is at most this per round trip.
    /// Default: 64 (the protocol's default window): about 640 KB/s per stream at 100 ms.
    pub h2_stream_window_kib: u32,
}

/// How the `Host` header is sent upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostHeader {
    /// The endpoint's authority, as nginx's default `proxy_set_header Host $proxy_host`. Default.
    Upstream,
    /// The client's Host, unchanged.
    Preserve,
    /// This value.
    Fixed(http::HeaderValue),
}

/// A route: requests matching the host (if set) and path prefix go to the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Path prefix to match; the longest matching prefix wins. Default: `/`.
    pub path_prefix: String,
    /// Host to match (without port, case-insensitive); `None` matches any host.
    pub host: Option<String>,
    /// Name of the pool to forward to.
    pub pool: String,
    /// Host header policy.
    pub host_header: HostHeader,
    /// Effective stream settings (defaults merged with this route's overrides).
    pub stream: StreamSettings,
}

/// OTLP export protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP over HTTP with protobuf bodies. Default.
    HttpProtobuf,
    /// OTLP over gRPC.
    Grpc,
}

/// Validated proxy configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Listening sockets (at least one).
    pub listeners: Vec<ListenerConfig>,
    /// Pools by name.
    pub pools: BTreeMap<String, PoolConfig>,
    /// Routes, in file order; matching picks the most specific (host match, then longest prefix).
    pub routes: Vec<RouteConfig>,
    /// Default stream settings.
    pub defaults: StreamSettings,
    /// Time open streams get to finish on shutdown before they are ended. Default: 30 s.
    pub drain_timeout: Duration,
    /// How long a client connection may stay open with no request in flight (HTTP/1.1 keep-alive
    /// and HTTP/2 alike), or take to send a request's head (and a body of up to 64 KiB that the
    /// lean server reads whole), before it is closed; HTTP/2 clients get a `GOAWAY`. Default: 30 s.
    pub client_idle_timeout: Duration,
    /// How long a client may take nothing the proxy writes to it before its connection is closed
    /// and the streams on it cut (their upstream requests cancelled), as nginx's `send_timeout`: a
    /// client that stays connected but stops reading would otherwise hold its upstream requests, and
    /// their GPU slots, for good. On HTTP/2 it also bounds each stream: a stream whose client, while
    /// reading the connection, does not open that stream's flow-control window far enough for its
    /// next frame (at most 16 KiB) for this long is reset and its upstream request cancelled, the
    /// others going on, as nginx resets it. Default: 60 s.
    pub send_timeout: Duration,
    /// Concurrent streams allowed before new requests get 503. Default: 10,000.
    pub max_streams: usize,
    /// Runtime worker threads; `None`: one per CPU the process may use (its affinity mask and cgroup
    /// quota), as nginx's `worker_processes auto`. With one, the proxy runs on a single-threaded
    /// runtime: no work-stealing bookkeeping and no cross-thread wake-ups on the path of every event.
    pub workers: Option<usize>,
    /// Where to serve Prometheus `/metrics`; none by default.
    pub metrics_listen: Option<SocketAddr>,
    /// Base OTLP endpoint; none by default (then `OTEL_EXPORTER_OTLP_ENDPOINT` is honoured if set).
    pub otlp_endpoint: Option<String>,
    /// OTLP protocol. Default: HTTP/protobuf.
    pub otlp_protocol: OtlpProtocol,
}

/// Command-line values that override the file. `None`/empty means "not given".
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`
    pub listen: Option<String>,
    /// `--upstream` (repeatable)
    pub upstreams: Vec<String>,
    /// `--idle-timeout`
    pub idle_timeout: Option<String>,
    /// `--keepalive-interval`
    pub keepalive_interval: Option<String>,
    /// `--first-byte-timeout`
    pub first_byte_timeout: Option<String>,
    /// `--drain-timeout`
    pub drain_timeout: Option<String>,
    /// `--max-streams`
    pub max_streams: Option<String>,
    /// `--workers`
    pub workers: Option<String>,
    /// `--metrics-listen`
    pub metrics_listen: Option<String>,
    /// `--otlp-endpoint`
    pub otlp_endpoint: Option<String>,
}

// ---------------------------------------------------------------------------------------------------
// Raw file form: strings everywhere, unknown keys rejected.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    defaults: RawStream,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    telemetry: RawTelemetry,
    #[serde(default)]
    listeners: Vec<RawListener>,
    #[serde(default)]
    pools: BTreeMap<String, RawPool>,
    #[serde(default)]
    routes: Vec<RawRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStream {
    idle_timeout: Option<String>,
    keepalive_interval: Option<String>,
    first_byte_timeout: Option<String>,
    ndjson_keepalive: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    drain_timeout: Option<String>,
    client_idle_timeout: Option<String>,
    send_timeout: Option<String>,
    max_streams: Option<i64>,
    workers: Option<i64>,
    metrics_listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    otlp_endpoint: Option<String>,
    otlp_protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    listen: Option<String>,
    tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<String>,
    key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    #[serde(default)]
    endpoints: Vec<String>,
    balance: Option<String>,
    protocol: Option<String>,
    ca_file: Option<String>,
    connect_timeout: Option<String>,
    max_fails: Option<i64>,
    ejection_time: Option<String>,
    max_attempts: Option<i64>,
    h2_stream_window_kib: Option<i64>,
    health_check: Option<RawHealth>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    path: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
    unhealthy_threshold: Option<i64>,
    healthy_threshold: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    path_prefix: Option<String>,
    host: Option<String>,
    pool: Option<String>,
    host_header: Option<String>,
    // The stream settings of [`RawStream`], spelled out: a `#[serde(flatten)]` field loses toml's
    // spans, and an unknown or mistyped key in a route was reported against `[[routes]]` as a whole.
    idle_timeout: Option<String>,
    keepalive_interval: Option<String>,
    first_byte_timeout: Option<String>,
    ndjson_keepalive: Option<String>,
}

impl RawRoute {
    fn stream(&self) -> RawStream {
        RawStream {
            idle_timeout: self.idle_timeout.clone(),
            keepalive_interval: self.keepalive_interval.clone(),
            first_byte_timeout: self.first_byte_timeout.clone(),
            ndjson_keepalive: self.ndjson_keepalive.clone(),
        }
    }
}

/// The name of the pool `--upstream` fills, and of the route created for it when the file has none.
pub const DEFAULT_POOL: &str = "default";

impl Config {
    /// The runtime worker threads to start: `workers` if set, else one per CPU the process may use.
    pub fn worker_threads(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }

    /// Load `path` (if any), apply the command-line overrides, and validate.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let raw = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    ConfigError::new(
                        "--config",
                        p.display().to_string(),
                        format!("cannot read the file: {e}"),
                    )
                })?;
                parse_toml(&text, &p.display().to_string())?
            }
            None => RawConfig::default(),
        };
        build(raw, overrides)
    }

    /// Parse and validate TOML text with no overrides (for tests and embedding).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        build(parse_toml(text, "<config>")?, &Overrides::default())
    }

    /// Parse and validate TOML text, then apply overrides.
    pub fn from_toml_with(text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        build(parse_toml(text, "<config>")?, overrides)
    }

    /// The pool a route forwards to.
    pub fn pool_of(&self, route: &RouteConfig) -> &PoolConfig {
        &self.pools[&route.pool]
    }

    /// Render the effective configuration as TOML (what `streamgate check` prints).
    pub fn to_toml(&self) -> String {
        use std::fmt::Write;
        let d = |d: Duration| humantime::format_duration(d).to_string();
        let mut s = String::new();
        let w = &mut s;
        let _ = writeln!(w, "[defaults]");
        write_stream(w, &self.defaults);
        let _ = writeln!(w, "\n[server]");
        let _ = writeln!(w, "drain_timeout = {:?}", d(self.drain_timeout));
        let _ = writeln!(w, "client_idle_timeout = {:?}", d(self.client_idle_timeout));
        let _ = writeln!(w, "send_timeout = {:?}", d(self.send_timeout));
        let _ = writeln!(w, "max_streams = {}", self.max_streams);
        match self.workers {
            Some(n) => {
                let _ = writeln!(w, "workers = {n}");
            }
            None => {
                let _ = writeln!(
                    w,
                    "# workers: one per available CPU ({})",
                    self.worker_threads()
                );
            }
        }
        if let Some(m) = self.metrics_listen {
            let _ = writeln!(w, "metrics_listen = \"{m}\"");
        }
        let _ = writeln!(w, "\n[telemetry]");
        if let Some(e) = &self.otlp_endpoint {
            let _ = writeln!(w, "otlp_endpoint = {e:?}");
        }
        let proto = match self.otlp_protocol {
            OtlpProtocol::HttpProtobuf => "http",
            OtlpProtocol::Grpc => "grpc",
        };
        let _ = writeln!(w, "otlp_protocol = \"{proto}\"");
        for l in &self.listeners {
            let _ = writeln!(w, "\n[[listeners]]\nlisten = \"{}\"", l.listen);
            if let Some(t) = &l.tls {
                let _ = writeln!(
                    w,
                    "tls = {{ cert = {:?}, key = {:?} }}",
                    t.cert.display().to_string(),
                    t.key.display().to_string()
                );
            }
        }
        for p in self.pools.values() {
            let _ = writeln!(w, "\n[pools.{}]", p.name);
            let eps: Vec<String> = p.endpoints.iter().map(|e| format!("\"{e}\"")).collect();
            let _ = writeln!(w, "endpoints = [{}]", eps.join(", "));
            let balance = match p.balance {
                Balance::RoundRobin => "round_robin",
                Balance::LeastStreams => "least_streams",
            };
            let protocol = match p.protocol {
                UpstreamProtocol::Auto => "auto",
                UpstreamProtocol::Http1 => "http1",
                UpstreamProtocol::Http2 => "http2",
            };
            let _ = writeln!(w, "balance = \"{balance}\"\nprotocol = \"{protocol}\"");
            if let Some(ca) = &p.ca_file {
                let _ = writeln!(w, "ca_file = {:?}", ca.display().to_string());
            }
            let _ = writeln!(w, "connect_timeout = {:?}", d(p.connect_timeout));
            let _ = writeln!(
                w,
                "max_fails = {}\nejection_time = {:?}",
                p.max_fails,
                d(p.ejection_time)
            );
            let _ = writeln!(w, "max_attempts = {}", p.max_attempts);
            let _ = writeln!(w, "h2_stream_window_kib = {}", p.h2_stream_window_kib);
            if let Some(h) = &p.health_check {
                let _ = writeln!(
                    w,
                    "health_check = {{ path = {:?}, interval = {:?}, timeout = {:?}, unhealthy_threshold = {}, healthy_threshold = {} }}",
                    h.path, d(h.interval), d(h.timeout), h.unhealthy_threshold, h.healthy_threshold
                );
            }
        }
        for r in &self.routes {
            let _ = writeln!(w, "\n[[routes]]\npath_prefix = {:?}", r.path_prefix);
            if let Some(h) = &r.host {
                let _ = writeln!(w, "host = {h:?}");
            }
            let _ = writeln!(w, "pool = {:?}", r.pool);
            let hh = match &r.host_header {
                HostHeader::Upstream => "upstream".to_string(),
                HostHeader::Preserve => "preserve".to_string(),
                HostHeader::Fixed(v) => v.to_str().unwrap_or("").to_string(),
            };
            let _ = writeln!(w, "host_header = {hh:?}");
            write_stream(w, &r.stream);
        }
        s
    }
}

fn write_stream(w: &mut String, s: &StreamSettings) {
    use std::fmt::Write;
    let d = |d: Duration| humantime::format_duration(d).to_string();
    let _ = writeln!(w, "idle_timeout = {:?}", d(s.idle_timeout));
    let ka = s.keepalive_interval.map(d).unwrap_or_else(|| "off".into());
    let _ = writeln!(w, "keepalive_interval = {ka:?}");
    let _ = writeln!(w, "first_byte_timeout = {:?}", d(s.first_byte_timeout));
    if let Some(l) = &s.ndjson_keepalive {
        let _ = writeln!(w, "ndjson_keepalive = {l:?}");
    }
}

fn parse_toml(text: &str, origin: &str) -> Result<RawConfig, ConfigError> {
    toml::from_str::<RawConfig>(text).map_err(|e| {
        // toml's message names the field ("unknown field `x`, expected one of ...") and the span gives the line.
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let key = e
            .span()
            .and_then(|s| key_at(text, s.start))
            .unwrap_or_else(|| origin.to_string());
        let value = e
            .span()
            .map(|s| text.get(s.clone()).unwrap_or("").trim().to_string())
            .unwrap_or_default();
        let msg = e.message().trim().to_string();
        let reason = match line {
            Some(l) => format!("{msg} (line {l} of {origin})"),
            None => format!("{msg} ({origin})"),
        };
        ConfigError::new(key, value, reason)
    })
}

/// The dotted key written on the line containing byte offset `at` (with its `[table]`), for messages.
fn key_at(text: &str, at: usize) -> Option<String> {
    let start = text[..at.min(text.len())]
        .rfind('\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    let line = text[start..].lines().next()?.trim();
    let key = line.split('=').next()?.trim();
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    // The table headers above the line, without comments: `(array of tables?, name)`.
    let headers: Vec<(bool, &str)> = text[..start]
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| l.starts_with('['))
        .map(|h| (h.starts_with("[["), h.trim_matches(['[', ']']).trim()))
        .collect();
    let table = headers.last().map(|&(array, name)| {
        if array {
            // Which one of the array, counting its headers so far (`routes[1]`).
            let nth = headers.iter().filter(|&&h| h == (true, name)).count();
            format!("{name}[{}]", nth - 1)
        } else {
            name.to_string()
        }
    });
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_string(),
    })
}

fn duration(key: &str, v: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(v.trim()).map_err(|e| {
        ConfigError::new(
            key,
            v,
            format!("not a duration ({e}); write e.g. \"15s\", \"250ms\", \"5m\""),
        )
    })?;
    if d.is_zero() {
        return Err(ConfigError::new(key, v, "must be greater than zero"));
    }
    Ok(d)
}

fn optional_duration(key: &str, v: &str) -> Result<Option<Duration>, ConfigError> {
    match v.trim() {
        "off" | "none" | "0" | "0s" => Ok(None),
        _ => duration(key, v).map(Some),
    }
}

fn socket_addr(key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.trim().parse().map_err(|_| {
        ConfigError::new(
            key,
            v,
            "not a socket address; write IP:PORT, e.g. \"127.0.0.1:8080\" or \"[::]:8080\"",
        )
    })
}

/// A count given as a flag (text) or in the file (an integer), the flag first: between 1 and `max`.
fn count(
    (flag_key, flag): (&str, &Option<String>),
    (file_key, file): (&str, Option<i64>),
    max: i64,
) -> Result<Option<usize>, ConfigError> {
    let n = match (flag, file) {
        (Some(v), _) => {
            let n: i64 = v
                .trim()
                .parse()
                .map_err(|_| ConfigError::new(flag_key, v, "not a whole number"))?;
            positive(flag_key, n, max)?
        }
        (None, Some(n)) => positive(file_key, n, max)?,
        (None, None) => return Ok(None),
    };
    Ok(Some(n as usize))
}

fn positive(key: &str, v: i64, max: i64) -> Result<i64, ConfigError> {
    if v < 1 || v > max {
        return Err(ConfigError::new(
            key,
            v.to_string(),
            format!("must be between 1 and {max}"),
        ));
    }
    Ok(v)
}

/// Parse an upstream URL: `http(s)://host[:port]`, with no path, query or user info.
pub fn parse_endpoint(key: &str, v: &str) -> Result<EndpointConfig, ConfigError> {
    let uri: http::Uri = v.trim().parse().map_err(|e| {
        ConfigError::new(
            key,
            v,
            format!("not a URL ({e}); write e.g. \"http://127.0.0.1:9000\""),
        )
    })?;
    let scheme = uri.scheme().cloned().ok_or_else(|| {
        ConfigError::new(
            key,
            v,
            "missing scheme; write http://HOST:PORT or https://HOST:PORT",
        )
    })?;
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return Err(ConfigError::new(key, v, "scheme must be http or https"));
    }
    let auth = uri
        .authority()
        .ok_or_else(|| ConfigError::new(key, v, "missing host"))?;
    if auth.as_str().contains('@') {
        return Err(ConfigError::new(
            key,
            v,
            "user info in upstream URLs is not supported",
        ));
    }
    if let Some(pq) = uri.path_and_query() {
        if pq.as_str() != "/" && !pq.as_str().is_empty() {
            return Err(ConfigError::new(
                key,
                v,
                "an upstream is host and port only; the request path is forwarded as it is",
            ));
        }
    }
    if auth.host().is_empty() {
        return Err(ConfigError::new(key, v, "missing host"));
    }
    let authority = match auth.port_u16() {
        Some(_) => auth.clone(),
        None => {
            let port = if scheme == Scheme::HTTPS { 443 } else { 80 };
            format!("{}:{port}", auth.host())
                .parse()
                .map_err(|_| ConfigError::new(key, v, "invalid host"))?
        }
    };
    Ok(EndpointConfig { scheme, authority })
}

fn stream_settings(
    prefix: &str,
    raw: &RawStream,
    base: &StreamSettings,
) -> Result<StreamSettings, ConfigError> {
    let mut s = base.clone();
    if let Some(v) = &raw.idle_timeout {
        s.idle_timeout = duration(&format!("{prefix}idle_timeout"), v)?;
    }
    if let Some(v) = &raw.keepalive_interval {
        s.keepalive_interval = optional_duration(&format!("{prefix}keepalive_interval"), v)?;
    }
    if let Some(v) = &raw.first_byte_timeout {
        s.first_byte_timeout = duration(&format!("{prefix}first_byte_timeout"), v)?;
    }
    if let Some(v) = &raw.ndjson_keepalive {
        if v.trim().is_empty() || v.contains(['\r', '\n']) {
            return Err(ConfigError::new(
                format!("{prefix}ndjson_keepalive"),
                v,
                "must be one non-empty line (the newline is added), e.g. '{\"type\":\"keepalive\"}'",
            ));
        }
        s.ndjson_keepalive = Some(v.clone());
    }
    if let Some(ka) = s.keepalive_interval {
        if ka >= s.idle_timeout {
            let (ka, idle) = (
                humantime::format_duration(ka).to_string(),
                humantime::format_duration(s.idle_timeout).to_string(),
            );
            // Name the key written here: an idle timeout set at this level below an interval
            // it inherits (from [defaults] or the built-in 15s) is the idle timeout's fault.
            return Err(match (&raw.keepalive_interval, &raw.idle_timeout) {
                (None, Some(_)) => ConfigError::new(
                    format!("{prefix}idle_timeout"),
                    idle,
                    format!(
                        "must be longer than the keepalive interval ({ka}, not set here), or no keepalive would ever be sent; set keepalive_interval shorter, or \"off\""
                    ),
                ),
                _ => ConfigError::new(
                    format!("{prefix}keepalive_interval"),
                    ka,
                    format!(
                        "must be shorter than idle_timeout ({idle}), or no keepalive would ever be sent"
                    ),
                ),
            });
        }
    }
    Ok(s)
}

fn build(mut raw: RawConfig, o: &Overrides) -> Result<Config, ConfigError> {
    // Command-line overrides are applied to the raw form so they are validated the same way, but errors
    // name the flag.
    let flag_stream = RawStream {
        idle_timeout: o.idle_timeout.clone(),
        keepalive_interval: o.keepalive_interval.clone(),
        first_byte_timeout: o.first_byte_timeout.clone(),
        ndjson_keepalive: None,
    };
    let file_defaults = stream_settings("defaults.", &raw.defaults, &StreamSettings::default())?;
    let defaults = stream_settings("--", &flag_stream, &file_defaults)
        .map_err(|e| ConfigError::new(e.key.replace('_', "-"), e.value, e.reason))?;

    let drain_timeout = match (&o.drain_timeout, &raw.server.drain_timeout) {
        (Some(v), _) => duration("--drain-timeout", v)?,
        (None, Some(v)) => duration("server.drain_timeout", v)?,
        (None, None) => Duration::from_secs(30),
    };
    // At most a day: hyper adds the idle timeout to `Instant::now()`, which panics past the clock's
    // range, and the send timeout is kept in milliseconds.
    let within_a_day = |key: &str, v: &Option<String>, default: u64| match v {
        Some(v) => {
            let d = duration(key, v)?;
            if d > Duration::from_secs(24 * 3600) {
                return Err(ConfigError::new(key, v, "must be at most a day"));
            }
            Ok(d)
        }
        None => Ok(Duration::from_secs(default)),
    };
    let client_idle_timeout = within_a_day(
        "server.client_idle_timeout",
        &raw.server.client_idle_timeout,
        30,
    )?;
    let send_timeout = within_a_day("server.send_timeout", &raw.server.send_timeout, 60)?;
    let max_streams = count(
        ("--max-streams", &o.max_streams),
        ("server.max_streams", raw.server.max_streams),
        10_000_000,
    )?
    .unwrap_or(10_000);
    let workers = count(
        ("--workers", &o.workers),
        ("server.workers", raw.server.workers),
        1024,
    )?;
    let metrics_listen = match (&o.metrics_listen, &raw.server.metrics_listen) {
        (Some(v), _) => Some(socket_addr("--metrics-listen", v)?),
        (None, Some(v)) => Some(socket_addr("server.metrics_listen", v)?),
        (None, None) => None,
    };
    let otlp_endpoint = match (&o.otlp_endpoint, &raw.telemetry.otlp_endpoint) {
        (Some(v), _) => Some(otlp_url("--otlp-endpoint", v)?),
        (None, Some(v)) => Some(otlp_url("telemetry.otlp_endpoint", v)?),
        (None, None) => None,
    };
    let otlp_protocol = match raw.telemetry.otlp_protocol.as_deref() {
        None | Some("http") | Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
        Some("grpc") => OtlpProtocol::Grpc,
        Some(v) => {
            return Err(ConfigError::new(
                "telemetry.otlp_protocol",
                v,
                "must be \"http\" (OTLP/HTTP protobuf) or \"grpc\"",
            ))
        }
    };

    // Listeners.
    let mut listeners = Vec::new();
    if let Some(v) = &o.listen {
        listeners.push(ListenerConfig {
            listen: socket_addr("--listen", v)?,
            tls: None,
        });
    } else {
        for (i, l) in raw.listeners.iter().enumerate() {
            let key = format!("listeners[{i}].listen");
            let listen = match &l.listen {
                Some(v) => socket_addr(&key, v)?,
                None => {
                    return Err(ConfigError::new(
                        key,
                        "",
                        "missing: every listener needs an address",
                    ))
                }
            };
            let tls = match &l.tls {
                None => None,
                Some(t) => {
                    let file = |k: &str, v: &Option<String>| -> Result<PathBuf, ConfigError> {
                        let key = format!("listeners[{i}].tls.{k}");
                        let v = v.as_deref().ok_or_else(|| {
                            ConfigError::new(&key, "", "missing: TLS needs both cert and key")
                        })?;
                        let p = PathBuf::from(v);
                        if !p.is_file() {
                            return Err(ConfigError::new(key, v, "no such file"));
                        }
                        Ok(p)
                    };
                    Some(TlsConfig {
                        cert: file("cert", &t.cert)?,
                        key: file("key", &t.key)?,
                    })
                }
            };
            listeners.push(ListenerConfig { listen, tls });
        }
    }
    if listeners.is_empty() {
        return Err(ConfigError::new(
            "listen",
            "",
            "no listener: pass --listen ADDR or add a [[listeners]] table",
        ));
    }
    for (i, a) in listeners.iter().enumerate() {
        // Port 0 asks the OS for any free port, so it may repeat.
        if a.listen.port() != 0 && listeners[..i].iter().any(|b| b.listen == a.listen) {
            return Err(ConfigError::new(
                format!("listeners[{i}].listen"),
                a.listen.to_string(),
                "listed twice",
            ));
        }
    }

    // --upstream fills (or replaces the endpoints of) the default pool.
    if !o.upstreams.is_empty() {
        raw.pools
            .entry(DEFAULT_POOL.to_string())
            .or_default()
            .endpoints = o.upstreams.clone();
        if raw.routes.is_empty() {
            raw.routes.push(RawRoute {
                path_prefix: None,
                host: None,
                pool: Some(DEFAULT_POOL.to_string()),
                host_header: None,
                idle_timeout: None,
                keepalive_interval: None,
                first_byte_timeout: None,
                ndjson_keepalive: None,
            });
        }
    }

    let mut pools = BTreeMap::new();
    for (name, p) in &raw.pools {
        let prefix = format!("pools.{name}.");
        let flag = |k: &str| {
            if name == DEFAULT_POOL && !o.upstreams.is_empty() && k == "endpoints" {
                "--upstream".to_string()
            } else {
                format!("{prefix}{k}")
            }
        };
        if p.endpoints.is_empty() {
            return Err(ConfigError::new(
                flag("endpoints"),
                "",
                "a pool needs at least one endpoint",
            ));
        }
        let mut endpoints = Vec::new();
        for (i, e) in p.endpoints.iter().enumerate() {
            let key = if flag("endpoints") == "--upstream" {
                "--upstream".to_string()
            } else {
                format!("{prefix}endpoints[{i}]")
            };
            let ep = parse_endpoint(&key, e)?;
            if endpoints.contains(&ep) {
                return Err(ConfigError::new(
                    key,
                    e,
                    "endpoint listed twice in the pool",
                ));
            }
            endpoints.push(ep);
        }
        let balance = match p.balance.as_deref() {
            None | Some("round_robin") => Balance::RoundRobin,
            Some("least_streams") => Balance::LeastStreams,
            Some(v) => {
                return Err(ConfigError::new(
                    format!("{prefix}balance"),
                    v,
                    "must be \"round_robin\" or \"least_streams\"",
                ))
            }
        };
        let protocol = match p.protocol.as_deref() {
            None | Some("auto") => UpstreamProtocol::Auto,
            Some("http1") => UpstreamProtocol::Http1,
            Some("http2") | Some("h2c") | Some("h2") => UpstreamProtocol::Http2,
            Some(v) => {
                return Err(ConfigError::new(
                    format!("{prefix}protocol"),
                    v,
                    "must be \"auto\", \"http1\" or \"http2\"",
                ))
            }
        };
        let ca_file = match &p.ca_file {
            None => None,
            Some(v) => {
                let path = PathBuf::from(v);
                if !path.is_file() {
                    return Err(ConfigError::new(
                        format!("{prefix}ca_file"),
                        v,
                        "no such file",
                    ));
                }
                Some(path)
            }
        };
        let connect_timeout = match &p.connect_timeout {
            Some(v) => duration(&format!("{prefix}connect_timeout"), v)?,
            None => Duration::from_secs(5),
        };
        let max_fails = match p.max_fails {
            Some(n) => positive(&format!("{prefix}max_fails"), n, 1000)? as u32,
            None => 3,
        };
        let ejection_time = match &p.ejection_time {
            Some(v) => duration(&format!("{prefix}ejection_time"), v)?,
            None => Duration::from_secs(10),
        };
        let max_attempts = match p.max_attempts {
            Some(n) => positive(&format!("{prefix}max_attempts"), n, 100)? as u32,
            None => 3,
        };
        let h2_stream_window_kib = match p.h2_stream_window_kib {
            Some(n) if !(64..=16_384).contains(&n) => {
                return Err(ConfigError::new(
                    format!("{prefix}h2_stream_window_kib"),
                    n.to_string(),
                    "must be between 64 (the protocol's default window) and 16384 (16 MiB)",
                ))
            }
            Some(n) => n as u32,
            None => 64,
        };
        let health_check = match &p.health_check {
            None => None,
            Some(h) => {
                let hp = format!("{prefix}health_check.");
                let path = h.path.clone().unwrap_or_else(|| "/healthz".into());
                if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
                    return Err(ConfigError::new(
                        format!("{hp}path"),
                        path,
                        "must be a path starting with /",
                    ));
                }
                let interval = match &h.interval {
                    Some(v) => duration(&format!("{hp}interval"), v)?,
                    None => Duration::from_secs(5),
                };
                let timeout = match &h.timeout {
                    Some(v) => duration(&format!("{hp}timeout"), v)?,
                    None => Duration::from_secs(2),
                };
                Some(HealthCheckConfig {
                    path,
                    interval,
                    timeout,
                    unhealthy_threshold: match h.unhealthy_threshold {
                        Some(n) => positive(&format!("{hp}unhealthy_threshold"), n, 1000)? as u32,
                        None => 2,
                    },
                    healthy_threshold: match h.healthy_threshold {
                        Some(n) => positive(&format!("{hp}healthy_threshold"), n, 1000)? as u32,
                        None => 1,
                    },
                })
            }
        };
        pools.insert(
            name.clone(),
            PoolConfig {
                name: name.clone(),
                endpoints,
                balance,
                protocol,
                ca_file,
                connect_timeout,
                max_fails,
                ejection_time,
                max_attempts,
                health_check,
                h2_stream_window_kib,
            },
        );
    }

    let mut routes = Vec::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let prefix = format!("routes[{i}].");
        let path_prefix = r.path_prefix.clone().unwrap_or_else(|| "/".into());
        if !path_prefix.starts_with('/') {
            return Err(ConfigError::new(
                format!("{prefix}path_prefix"),
                path_prefix,
                "must start with /",
            ));
        }
        let pool = r.pool.clone().ok_or_else(|| {
            ConfigError::new(
                format!("{prefix}pool"),
                "",
                "missing: name the pool to forward to",
            )
        })?;
        if !pools.contains_key(&pool) {
            let known: Vec<&str> = pools.keys().map(String::as_str).collect();
            return Err(ConfigError::new(
                format!("{prefix}pool"),
                pool,
                format!(
                    "no such pool (defined: {})",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        let host = match &r.host {
            None => None,
            Some(h) => {
                let h = h.trim().to_ascii_lowercase();
                if h.is_empty()
                    || h.parse::<Authority>().is_err()
                    || h.contains(':') && !h.starts_with('[')
                {
                    return Err(ConfigError::new(
                        format!("{prefix}host"),
                        h,
                        "must be a host name without port",
                    ));
                }
                Some(h)
            }
        };
        let host_header = match r.host_header.as_deref() {
            None | Some("upstream") => HostHeader::Upstream,
            Some("preserve") => HostHeader::Preserve,
            Some(v) => HostHeader::Fixed(
                v.parse::<Authority>()
                    .ok()
                    .and_then(|_| http::HeaderValue::from_str(v).ok())
                    .ok_or_else(|| {
                        ConfigError::new(
                            format!("{prefix}host_header"),
                            v,
                            "must be \"upstream\", \"preserve\" or a host[:port] to send",
                        )
                    })?,
            ),
        };
        let stream = stream_settings(&prefix, &r.stream(), &defaults)?;
        if routes
            .iter()
            .any(|x: &RouteConfig| x.path_prefix == path_prefix && x.host == host)
        {
            return Err(ConfigError::new(
                format!("{prefix}path_prefix"),
                path_prefix,
                "another route has the same host and path prefix",
            ));
        }
        routes.push(RouteConfig {
            path_prefix,
            host,
            pool,
            host_header,
            stream,
        });
    }
    if routes.is_empty() {
        return Err(ConfigError::new(
            "upstream",
            "",
            "nowhere to send requests: pass --upstream URL or add [pools.NAME] and [[routes]]",
        ));
    }
    for name in pools.keys() {
        if !routes.iter().any(|r| &r.pool == name) {
            return Err(ConfigError::new(
                format!("pools.{name}"),
                "",
                "no route uses this pool (add a [[routes]] entry with pool = this name)",
            ));
        }
    }

    Ok(Config {
        listeners,
        pools,
        routes,
        defaults,
        drain_timeout,
        client_idle_timeout,
        send_timeout,
        max_streams,
        workers,
        metrics_listen,
        otlp_endpoint,
        otlp_protocol,
    })
}

fn otlp_url(key: &str, v: &str) -> Result<String, ConfigError> {
    let uri: http::Uri = v
        .trim()
        .parse()
        .map_err(|e| ConfigError::new(key, v, format!("not a URL ({e})")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") if uri.authority().is_some() => {
            Ok(v.trim().trim_end_matches('/').to_string())
        }
        _ => Err(ConfigError::new(
            key,
            v,
            "must be an http(s) base URL, e.g. \"http://127.0.0.1:4318\"",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn over(listen: &str, upstreams: &[&str]) -> Overrides {
        Overrides {
            listen: Some(listen.into()),
            upstreams: upstreams.iter().map(|s| s.to_string()).collect(),
            ..Overrides::default()
        }
    }

    #[test]
    fn timeouts_and_windows_have_their_bounds() {
        let load = |extra: &str| {
            let text = format!(
                "{extra}\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.p]\nendpoints = [\"http://127.0.0.1:9\"]\nh2_stream_window_kib = 256\n[[routes]]\npool = \"p\"\n"
            );
            Config::from_toml(&text)
        };
        let c = load("[server]\nclient_idle_timeout = \"1day\"\nsend_timeout = \"2m\"").unwrap();
        assert_eq!(c.client_idle_timeout, Duration::from_secs(86_400));
        assert_eq!(c.send_timeout, Duration::from_secs(120));
        assert_eq!(c.pools["p"].h2_stream_window_kib, 256);
        // Past a day, hyper's deadline arithmetic would panic: refused, naming the key.
        let e = load("[server]\nclient_idle_timeout = \"300000000000y\"").unwrap_err();
        assert_eq!(e.key, "server.client_idle_timeout");
        assert!(e.reason.contains("at most a day"), "{e}");
        let e = load("[server]\nsend_timeout = \"2days\"").unwrap_err();
        assert_eq!(e.key, "server.send_timeout");
        let c = load("").unwrap();
        assert_eq!(c.client_idle_timeout, Duration::from_secs(30));
        assert_eq!(c.send_timeout, Duration::from_secs(60));
        assert_eq!(c.pools["p"].h2_stream_window_kib, 256);
    }

    #[test]
    fn flags_alone_make_a_config() {
        let c = build(
            RawConfig::default(),
            &over("127.0.0.1:8080", &["http://127.0.0.1:9000"]),
        )
        .unwrap();
        assert_eq!(c.listeners[0].listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.routes[0].path_prefix, "/");
        assert_eq!(
            c.pools[DEFAULT_POOL].endpoints[0].to_string(),
            "http://127.0.0.1:9000"
        );
        assert_eq!(c.defaults, StreamSettings::default());
    }

    #[test]
    fn file_routes_pools_and_overrides() {
        let text = r#"
            [defaults]
            idle_timeout = "2m"
            keepalive_interval = "10s"
            [[listeners]]
            listen = "127.0.0.1:0"
            [pools.llm]
            endpoints = ["http://a:9000", "https://b"]
            balance = "least_streams"
            [[routes]]
            path_prefix = "/v1/"
            pool = "llm"
            idle_timeout = "10m"
            keepalive_interval = "off"
        "#;
        let c = Config::from_toml(text).unwrap();
        let r = &c.routes[0];
        assert_eq!(r.stream.idle_timeout, Duration::from_secs(600));
        assert_eq!(r.stream.keepalive_interval, None);
        assert_eq!(c.defaults.keepalive_interval, Some(Duration::from_secs(10)));
        assert_eq!(c.pools["llm"].endpoints[1].authority.as_str(), "b:443");
        assert_eq!(c.pools["llm"].balance, Balance::LeastStreams);
        let o = Overrides {
            idle_timeout: Some("90s".into()),
            ..Overrides::default()
        };
        let c = Config::from_toml_with(text, &o).unwrap();
        assert_eq!(c.defaults.idle_timeout, Duration::from_secs(90));
        // A route override still wins over the flag-set default.
        assert_eq!(c.routes[0].stream.idle_timeout, Duration::from_secs(600));
        // The printed config parses back to the same thing.
        let again = Config::from_toml(&c.to_toml()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn workers_from_file_or_flag_else_one_per_cpu() {
        let base = "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.p]\nendpoints = [\"http://a\"]\n[[routes]]\npool = \"p\"\n";
        let c = Config::from_toml(base).unwrap();
        assert_eq!(c.workers, None);
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(c.worker_threads(), cpus);
        assert!(c.to_toml().contains("# workers: one per available CPU"));
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);

        let text = format!("[server]\nworkers = 1\n{base}");
        let c = Config::from_toml(&text).unwrap();
        assert_eq!((c.workers, c.worker_threads()), (Some(1), 1));
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
        let o = Overrides {
            workers: Some("4".into()),
            ..Overrides::default()
        };
        assert_eq!(
            Config::from_toml_with(&text, &o).unwrap().worker_threads(),
            4
        );

        let e = Config::from_toml(&format!("[server]\nworkers = 0\n{base}")).unwrap_err();
        assert_eq!((e.key(), e.value()), ("server.workers", "0"));
        assert!(e.reason().contains("between 1 and 1024"), "{e}");
        let o = Overrides {
            workers: Some("two".into()),
            ..Overrides::default()
        };
        let e = Config::from_toml_with(base, &o).unwrap_err();
        assert_eq!((e.key(), e.value()), ("--workers", "two"));
    }

    #[test]
    fn errors_name_key_value_and_reason() {
        let e = Config::from_toml("[defaults]\nidle_timeout = \"soon\"\n").unwrap_err();
        assert_eq!(e.key(), "defaults.idle_timeout");
        assert_eq!(e.value(), "soon");
        assert!(e.reason().contains("not a duration"), "{e}");

        let e = Config::from_toml("[server]\nbogus = 1\n").unwrap_err();
        assert!(e.reason().contains("unknown field `bogus`"), "{e}");
        assert!(e.reason().contains("line 2"), "{e}");
        assert_eq!(e.key(), "server.bogus");

        let e = build(RawConfig::default(), &over("127.0.0.1:8080", &["ftp://x"])).unwrap_err();
        assert_eq!((e.key(), e.value()), ("--upstream", "ftp://x"));

        let e = build(RawConfig::default(), &over("nope", &["http://x"])).unwrap_err();
        assert_eq!((e.key(), e.value()), ("--listen", "nope"));

        let o = Overrides {
            keepalive_interval: Some("10m".into()),
            ..over("127.0.0.1:1", &["http://x"])
        };
        let e = build(RawConfig::default(), &o).unwrap_err();
        assert_eq!(e.key(), "--keepalive-interval");
        assert!(e.reason().contains("shorter than idle_timeout"), "{e}");

        // An idle timeout set below an interval it does not set: the error names the key written.
        let o = Overrides {
            idle_timeout: Some("5s".into()),
            ..over("127.0.0.1:1", &["http://x"])
        };
        let e = build(RawConfig::default(), &o).unwrap_err();
        assert_eq!((e.key(), e.value()), ("--idle-timeout", "5s"));
        assert!(e.reason().contains("keepalive interval (15s"), "{e}");
        // A listener, a pool and a route, after `[defaults]` lines; what follows goes in the route.
        let file = |defaults: &str, route: &str| {
            format!("[defaults]\n{defaults}[[listeners]]\nlisten=\"127.0.0.1:1\"\n[pools.p]\nendpoints=[\"http://x\"]\n[[routes]]\npool=\"p\"\n{route}")
        };
        let e = Config::from_toml(&file("idle_timeout = \"10s\"\n", "")).unwrap_err();
        assert_eq!((e.key(), e.value()), ("defaults.idle_timeout", "10s"));
        let e = Config::from_toml(&file(
            "keepalive_interval = \"20s\"\n",
            "idle_timeout = \"20s\"\n",
        ))
        .unwrap_err();
        assert_eq!((e.key(), e.value()), ("routes[0].idle_timeout", "20s"));
        assert!(e.reason().contains("keepalive interval (20s"), "{e}");
        // A typo or a wrong type in a route names the route and the key, with its index.
        let two = file(
            "",
            "[[routes]]  # second\npool=\"p\"\npath_prefix=\"/v1/\"\n",
        );
        let e = Config::from_toml(&format!("{two}idle_timout = \"5s\"\n")).unwrap_err();
        assert_eq!(e.key(), "routes[1].idle_timout", "{e}");
        assert!(e.reason().contains("unknown field"), "{e}");
        let e = Config::from_toml(&format!("{two}idle_timeout = 5\n")).unwrap_err();
        assert_eq!((e.key(), e.value()), ("routes[1].idle_timeout", "5"), "{e}");
        let e = Config::from_toml("[[listeners]]\nlisten = 80\n").unwrap_err();
        assert_eq!((e.key(), e.value()), ("listeners[0].listen", "80"), "{e}");
        // Both set at one level: the interval is named, as before.
        let e = Config::from_toml(&file(
            "idle_timeout = \"10s\"\nkeepalive_interval = \"10s\"\n",
            "",
        ))
        .unwrap_err();
        assert_eq!((e.key(), e.value()), ("defaults.keepalive_interval", "10s"));

        let e = Config::from_toml(
            "[[listeners]]\nlisten=\"127.0.0.1:1\"\n[[routes]]\npool = \"nope\"\n",
        )
        .unwrap_err();
        assert_eq!((e.key(), e.value()), ("routes[0].pool", "nope"));

        let e = build(RawConfig::default(), &Overrides::default()).unwrap_err();
        assert_eq!(e.key(), "listen");
    }

    #[test]
    fn endpoint_urls() {
        assert!(parse_endpoint("k", "http://127.0.0.1:9000/").is_ok());
        assert!(parse_endpoint("k", "http://h:1/v1").is_err());
        assert!(parse_endpoint("k", "127.0.0.1:9000").is_err());
        assert!(parse_endpoint("k", "http://u@h:1").is_err());
        assert_eq!(
            parse_endpoint("k", "http://h").unwrap().authority.as_str(),
            "h:80"
        );
    }
}
