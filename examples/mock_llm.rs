//! A mock OpenAI-compatible LLM server on the command line.
//!
//! ```text
//! cargo run --example mock_llm -- --listen 127.0.0.1:9000 --ttft 400ms --inter-token 40ms --tokens 60
//! ```
//!
//! Every option is also a per-request header (`x-mock-*`); see `streamgate::mock`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use streamgate::mock::{LineEnding, MockConfig, MockServer, SilencePoint};

/// Serve a mock OpenAI-compatible LLM (chat completions, completions, models, /healthz, /stream)
/// over HTTP/1.1 and h2c.
#[derive(Debug, Parser)]
#[command(name = "mock_llm")]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Time to first token.
    #[arg(long, default_value = "400ms", value_parser = humantime::parse_duration)]
    ttft: Duration,
    /// Delay between tokens (0s: as fast as the reader takes them, one write per token).
    #[arg(long, default_value = "40ms", value_parser = humantime::parse_duration)]
    inter_token: Duration,
    /// Tokens per response.
    #[arg(long, default_value_t = 60)]
    tokens: usize,
    /// Silence after N tokens: `N:DURATION` or `N:DURATION:AT`, AT one of boundary, mid, cr
    /// (e.g. `5:2s:mid`).
    #[arg(long, value_parser = parse_silence)]
    silence: Option<(usize, Duration, SilencePoint)>,
    /// Fail the stream (no terminating chunk / RST_STREAM) after N tokens.
    #[arg(long)]
    abort_after: Option<usize>,
    /// Split every event into three frames (mid-line, and between CR and LF).
    #[arg(long)]
    split: bool,
    /// Stream NDJSON instead of SSE.
    #[arg(long)]
    ndjson: bool,
    /// Pad each token event to this many bytes (0: no padding).
    #[arg(long, default_value_t = 0)]
    chunk_bytes: usize,
    /// Line ending: lf, crlf or cr.
    #[arg(long, default_value = "lf", value_parser = parse_line_ending)]
    line_ending: LineEnding,
    /// Put emit timestamps (emit_mono_ns, emit_unix_ns) in every event.
    #[arg(long)]
    emit_time: bool,
    /// Answer every completion request with this error status (400..=599).
    #[arg(long, value_parser = parse_status)]
    status: Option<http::StatusCode>,
    /// Model name for /v1/models and requests that name none.
    #[arg(long, default_value = "mock-llm")]
    model: String,
}

fn parse_silence(s: &str) -> Result<(usize, Duration, SilencePoint), String> {
    let mut parts = s.split(':');
    let (Some(n), Some(d)) = (parts.next(), parts.next()) else {
        return Err("expected N:DURATION or N:DURATION:AT".into());
    };
    let n = n
        .parse()
        .map_err(|_| format!("{n:?} is not a token count"))?;
    let d = humantime::parse_duration(d).map_err(|e| format!("{d:?}: {e}"))?;
    let at = match parts.next() {
        Some(a) => {
            SilencePoint::parse(a).ok_or_else(|| format!("{a:?} is not boundary, mid or cr"))?
        }
        None => SilencePoint::Boundary,
    };
    Ok((n, d, at))
}

fn parse_line_ending(s: &str) -> Result<LineEnding, String> {
    LineEnding::parse(s).ok_or_else(|| format!("{s:?} is not lf, crlf or cr"))
}

fn parse_status(s: &str) -> Result<http::StatusCode, String> {
    s.parse::<u16>()
        .ok()
        .and_then(|c| http::StatusCode::from_u16(c).ok())
        .filter(|c| c.is_client_error() || c.is_server_error())
        .ok_or_else(|| format!("{s:?} is not a status in 400..=599"))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let a = Args::parse();
    let mut cfg = MockConfig::default()
        .time_to_first_token(a.ttft)
        .inter_token(a.inter_token)
        .tokens(a.tokens)
        .split_events(a.split)
        .ndjson(a.ndjson)
        .chunk_bytes(a.chunk_bytes)
        .line_ending(a.line_ending)
        .emit_time(a.emit_time)
        .model(a.model);
    if let Some((n, d, at)) = a.silence {
        cfg = cfg.silence(n, d).silence_at(at);
    }
    if let Some(n) = a.abort_after {
        cfg = cfg.abort_after(n);
    }
    if let Some(s) = a.status {
        cfg = cfg.status(s);
    }

    let server = match MockServer::bind(a.listen, cfg).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mock_llm: cannot listen on {}: {e}", a.listen);
            return ExitCode::from(1);
        }
    };
    let url = server.base_url();
    println!("mock LLM listening on {url} (HTTP/1.1 and h2c)");
    println!("try:");
    println!(
        "  curl -N {url}/v1/chat/completions -H 'content-type: application/json' \\\n    \
         -d '{{\"model\":\"mock-llm\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'"
    );
    println!("  curl -N {url}/stream -H 'x-mock-tokens: 5' -H 'x-mock-inter-token-ms: 200'");
    let first = std::sync::Arc::new(tokio::sync::Notify::new());
    let notify = first.clone();
    let run = server.run(async move {
        let _ = tokio::signal::ctrl_c().await;
        println!("shutting down: letting in-flight streams finish (Ctrl-C again to stop now)");
        notify.notify_one();
    });
    tokio::select! {
        () = run => {}
        () = async {
            first.notified().await;
            let _ = tokio::signal::ctrl_c().await;
        } => println!("stopped, cutting in-flight streams"),
    }
    ExitCode::SUCCESS
}
