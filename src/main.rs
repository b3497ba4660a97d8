//! The `streamgate` binary: CLI -> config -> validate -> telemetry -> serve.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use streamgate::proxy::{Config, ConfigError, Overrides, Server};

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
            run(cfg, None)
        }
        Command::Demo => demo(&cli.flags),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn run(cfg: Config, demo_upstream: Option<SocketAddr>) -> ExitCode {
    let _ = demo_upstream;
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("streamgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_logs();
    let res = rt.block_on(async move {
        let server = Server::bind(cfg).await?;
        server.run(shutdown_signal()).await
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("streamgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
}

fn demo(flags: &Flags) -> ExitCode {
    let _ = flags;
    eprintln!("streamgate: demo is not wired yet");
    ExitCode::FAILURE
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
