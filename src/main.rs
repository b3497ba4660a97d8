//! The `streamgate` binary: CLI -> config -> validate -> telemetry -> serve.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use streamgate::mock::{MockConfig, MockServer};
use streamgate::proxy::{config, Config, ConfigError, Overrides, Server, ServerOptions};
use streamgate::telemetry::{serve_metrics, OtlpProtocol, Telemetry, TelemetryConfig};
use streamgate::trace::StreamMetrics;

/// A reverse proxy for streaming HTTP responses (SSE, NDJSON, chunked): idle timeouts with keepalives,
/// per-chunk flushing, disconnect cancellation and two-span tracing.
#[derive(Parser, Debug)]
#[command(name = "streamgate", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    flags: Flags,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and print the effective result, like `nginx -t`.
    Check,
    /// Start the built-in mock LLM upstream and the proxy in front of it, and stream a sample answer.
    Demo,
}

#[derive(Args, Debug, Clone)]
struct Flags {
    /// TOML configuration file; flags override its values.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (replaces the file's listeners).
    #[arg(long, global = true, value_name = "ADDR")]
    listen: Option<String>,
    /// Upstream endpoint URL; repeat for several endpoints of one pool.
    #[arg(long = "upstream", global = true, value_name = "URL")]
    upstreams: Vec<String>,
    /// Upstream silence after which a stream is cut (default 5m).
    #[arg(long, global = true, value_name = "DURATION")]
    idle_timeout: Option<String>,
    /// Silence after which an SSE keepalive comment is sent, or "off" (default 15s).
    #[arg(long, global = true, value_name = "DURATION")]
    keepalive_interval: Option<String>,
    /// Wait for upstream response headers before answering 504 (default 5m).
    #[arg(long, global = true, value_name = "DURATION")]
    first_byte_timeout: Option<String>,
    /// Time open streams get to finish on shutdown (default 30s).
    #[arg(long, global = true, value_name = "DURATION")]
    drain_timeout: Option<String>,
    /// Concurrent streams before new requests get 503 (default 10000).
    #[arg(long, global = true, value_name = "N", allow_negative_numbers = true)]
    max_streams: Option<String>,
    /// Runtime worker threads (default: one per CPU the process may use; 1 runs single-threaded).
    #[arg(long, global = true, value_name = "N", allow_negative_numbers = true)]
    workers: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, global = true, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// OTLP base URL for traces, as OTEL_EXPORTER_OTLP_ENDPOINT (e.g. http://127.0.0.1:4318).
    #[arg(long, global = true, value_name = "URL")]
    otlp_endpoint: Option<String>,
}

impl Flags {
    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            upstreams: self.upstreams.clone(),
            idle_timeout: self.idle_timeout.clone(),
            keepalive_interval: self.keepalive_interval.clone(),
            first_byte_timeout: self.first_byte_timeout.clone(),
            drain_timeout: self.drain_timeout.clone(),
            max_streams: self.max_streams.clone(),
            workers: self.workers.clone(),
            metrics_listen: self.metrics_listen.clone(),
            otlp_endpoint: self.otlp_endpoint.clone(),
        }
    }
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("streamgate: {e}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => {
            let cfg = match Config::load(cli.flags.config.as_deref(), &cli.flags.overrides()) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            print!("{}", cfg.to_toml());
            eprintln!("streamgate: configuration is valid");
            ExitCode::SUCCESS
        }
        Command::Run => {
            let cfg = match Config::load(cli.flags.config.as_deref(), &cli.flags.overrides()) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            run(cfg, |_| async {})
        }
        Command::Demo => demo(&cli.flags),
    }
}

/// The async runtime: `workers` threads. With one, a single-threaded runtime, as an nginx worker
/// process: the multi-threaded scheduler's work-stealing bookkeeping (poll-time statistics, clock
/// reads, the shared injection queue) is pure overhead on the path of every event when there is no
/// other thread to steal from.
///
/// Without a time driver: timers run on a thread of their own ([`streamgate::timers`]), so that
/// the serving threads do not run the driver's bookkeeping each time they wait for their sockets,
/// once per read-and-write cycle when a stream comes fast.
fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    streamgate::timers::spawn_thread()?;
    if workers <= 1 {
        return tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("streamgate-rt")
        .enable_io()
        .build()
}

fn telemetry_config(cfg: &Config) -> TelemetryConfig {
    TelemetryConfig {
        otlp_endpoint: cfg.otlp_endpoint.clone(),
        otlp_protocol: match cfg.otlp_protocol {
            config::OtlpProtocol::HttpProtobuf => OtlpProtocol::HttpProtobuf,
            config::OtlpProtocol::Grpc => OtlpProtocol::Grpc,
        },
        service_name: None,
        log_filter: None,
    }
}

/// Serve `cfg` until SIGTERM/SIGINT; `on_ready` runs once the listeners are bound.
fn run<F, Fut>(cfg: Config, on_ready: F) -> ExitCode
where
    F: FnOnce(Vec<SocketAddr>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let rt = match runtime(cfg.worker_threads()) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("streamgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = match Telemetry::init(telemetry_config(&cfg)) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            eprintln!("streamgate: {e}");
            return ExitCode::from(2);
        }
    };
    let metrics = StreamMetrics::new(&telemetry.meter());
    let metrics_listen = cfg.metrics_listen;
    let t = telemetry.clone();
    let res: Result<(), String> = rt.block_on(async move {
        let opts = ServerOptions {
            metrics: Some(metrics),
        };
        let server = Server::bind_with(cfg, opts)
            .await
            .map_err(|e| e.to_string())?;
        let stop_metrics = tokio_util::sync::CancellationToken::new();
        if let Some(addr) = metrics_listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
            tracing::info!(listen = %addr, "serving Prometheus metrics at /metrics");
            let stop = stop_metrics.clone();
            tokio::spawn(serve_metrics(l, t, async move { stop.cancelled().await }));
        }
        tokio::spawn(on_ready(server.local_addrs()));
        let r = server
            .run(shutdown_signal())
            .await
            .map_err(|e| e.to_string());
        stop_metrics.cancel();
        r
    });
    drop(rt);
    // Flush spans off the async runtime, bounded.
    if let Ok(t) = Arc::try_unwrap(telemetry) {
        t.shutdown();
    }
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("streamgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo(flags: &Flags) -> ExitCode {
    // The mock binds first so its address can be the proxy's upstream.
    let std_listener = match std::net::TcpListener::bind("127.0.0.1:0") {
        Ok(l) => l,
        Err(e) => {
            eprintln!("streamgate: cannot start the mock upstream: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mock_addr = std_listener.local_addr().expect("bound address");
    let mut overrides = flags.overrides();
    overrides.listen = Some(overrides.listen.unwrap_or_else(|| "127.0.0.1:8080".into()));
    overrides.upstreams = vec![format!("http://{mock_addr}")];
    let cfg = match Config::load(None, &overrides) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let mock_cfg = MockConfig::default();
    let banner_cfg = mock_cfg.clone();
    run(cfg, move |addrs| async move {
        let _ = std_listener.set_nonblocking(true);
        let listener = match tokio::net::TcpListener::from_std(std_listener) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("streamgate: mock upstream: {e}");
                return;
            }
        };
        let mock = match MockServer::from_listener(listener, mock_cfg) {
            Ok(m) => m.spawn(),
            Err(e) => {
                eprintln!("streamgate: mock upstream: {e}");
                return;
            }
        };
        let proxy = addrs[0];
        let body = r#"{"model":"demo","stream":true,"messages":[{"role":"user","content":"Say something"}]}"#;
        println!();
        println!("streamgate demo");
        println!(
            "  mock LLM upstream  http://{mock_addr}  (OpenAI-compatible; {} to first token, {} per token)",
            humantime::format_duration(banner_cfg.time_to_first_token),
            humantime::format_duration(banner_cfg.inter_token)
        );
        println!("  proxy              http://{proxy}");
        println!();
        println!("Stream tokens through the proxy:");
        println!("  curl -N http://{proxy}/v1/chat/completions -H 'content-type: application/json' -d '{body}'");
        println!();
        println!("A sample answer, printed as the tokens arrive:");
        if let Err(e) = sample(proxy, body).await {
            eprintln!("streamgate: sample request failed: {e}");
        }
        println!();
        println!("Serving until Ctrl-C.");
        // Keep the mock alive for as long as the proxy runs.
        std::future::pending::<()>().await;
        drop(mock);
    })
}

/// Stream one chat completion through the proxy and print the tokens as they arrive.
async fn sample(
    proxy: SocketAddr,
    body: &'static str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use http_body_util::BodyExt;
    use std::io::Write;
    // No Happy Eyeballs timer: it would be made on this runtime, which has no time driver (the
    // address is an IP literal, so it would not be made; this says so).
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_happy_eyeballs_timeout(None);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Full<bytes::Bytes>>(http);
    let req = http::Request::post(format!("http://{proxy}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            body.as_bytes(),
        )))?;
    let start = std::time::Instant::now();
    let resp = client.request(req).await?;
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut first: Option<std::time::Duration> = None;
    let mut tokens = 0usize;
    let mut out = std::io::stdout();
    print!("  ");
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(i) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..i + 2).collect();
            for line in String::from_utf8_lossy(&event).lines() {
                let Some(json) = line.strip_prefix("data: ") else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
                    continue;
                };
                if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                    first.get_or_insert_with(|| start.elapsed());
                    tokens += 1;
                    print!("{t}");
                    let _ = out.flush();
                }
            }
        }
    }
    println!();
    println!(
        "  ({tokens} tokens; first after {}, all after {})",
        humantime::format_duration(trunc_ms(first.unwrap_or_default())),
        humantime::format_duration(trunc_ms(start.elapsed()))
    );
    Ok(())
}

fn trunc_ms(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_millis(d.as_millis() as u64)
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
