//! An OpenAI-compatible mock LLM server, for demos, integration tests and load tests.
//!
//! [`MockServer`] speaks HTTP/1.1 and HTTP/2 (cleartext, prior knowledge) on one port and streams
//! tokens the way an inference server does: a time to first token, then one event per token at a
//! steady pace, each event its own write on the wire. It is what `streamgate demo` puts behind the
//! proxy, and what streamgate's own tests use to script silences, aborts and awkward framings.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::time::Duration;
//! use streamgate::mock::{MockConfig, MockServer};
//!
//! let cfg = MockConfig::default().tokens(20).inter_token(Duration::from_millis(10));
//! let server = MockServer::bind("127.0.0.1:0".parse().unwrap(), cfg).await?;
//! let stats = server.stats();
//! let handle = server.spawn();
//! println!("mock LLM on {}", handle.base_url());
//! // ... drive requests, then:
//! stats.wait_for(|s| s.streams_completed >= 1, Duration::from_secs(5)).await.ok();
//! handle.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Endpoints
//!
//! | method and path | answer |
//! |---|---|
//! | `POST /v1/chat/completions` | `"stream": true`: SSE `data: {chat.completion.chunk}` events, one per token, then a chunk with `finish_reason`, a usage chunk when `stream_options.include_usage` is true, and `data: [DONE]`. Otherwise one `chat.completion` JSON after `ttft + tokens × inter_token`. |
//! | `POST /v1/completions` | the same for legacy `text_completion` objects (`prompt` instead of `messages`). |
//! | `GET /v1/models` | a model list with the configured [`model`](MockConfig::model). |
//! | `GET /healthz` | `200 ok`, or `503` after [`MockHandle::set_healthy(false)`](MockHandle::set_healthy). |
//! | `GET` or `POST /stream` | plain SSE for tests: `id: N` / `data: {"index":N,"token":"..."}` per token, then `event: done` / `data: [DONE]`. |
//!
//! Responses use the `model` of the request (the configured model if it has none); `max_tokens` and
//! `max_completion_tokens` cap the token count (`finish_reason: "length"`). A body that is not the
//! JSON expected answers `400` with an OpenAI-style `{"error": {...}}` body; unknown paths `404`,
//! wrong methods `405`, bodies over 1 MiB `413`.
//!
//! # Per-request overrides
//!
//! Request headers override the server's [`MockConfig`] for one request, so one server can script
//! many tests. A malformed value answers `400` naming the header.
//!
//! | header | value | overrides |
//! |---|---|---|
//! | `x-mock-ttft-ms` | milliseconds, decimals allowed (`0.5`) | [`time_to_first_token`](MockConfig::time_to_first_token) |
//! | `x-mock-inter-token-ms` | milliseconds, decimals allowed | [`inter_token`](MockConfig::inter_token) |
//! | `x-mock-tokens` | count, at most 10,000,000 | [`tokens`](MockConfig::tokens) |
//! | `x-mock-silence` | `N:MS` or `N:MS:AT`, `AT` one of `boundary`, `mid`, `cr` (e.g. `5:2000`: after 5 tokens, 2000 ms of silence); `none` disables | [`silence`](MockConfig::silence), [`silence_at`](MockConfig::silence_at) |
//! | `x-mock-abort-after` | count of tokens, or `none` | [`abort_after`](MockConfig::abort_after) |
//! | `x-mock-split` | `1`/`0` (`true`/`false`, `yes`/`no`, `on`/`off`) | [`split_events`](MockConfig::split_events) |
//! | `x-mock-format` | `sse` or `ndjson` | [`ndjson`](MockConfig::ndjson) |
//! | `x-mock-chunk-bytes` | bytes, at most 16 MiB (0 = no padding) | [`chunk_bytes`](MockConfig::chunk_bytes) |
//! | `x-mock-line-ending` | `lf`, `crlf` or `cr` | [`line_ending`](MockConfig::line_ending) |
//! | `x-mock-status` | a status in `400..=599` | [`status`](MockConfig::status): answer it at once with an OpenAI-style error body |
//! | `x-mock-emit-time` | `1`/`0` | [`emit_time`](MockConfig::emit_time) |
//!
//! # Timing, backpressure and failures
//!
//! The stream body produces an event only when it is polled and its timer has fired, and returns
//! `Pending` between tokens, so hyper flushes every token on its own and a slow reader slows the
//! mock down: the gap before the next token starts when the previous one was taken. A zero gap is a
//! yield (wake and `Pending`), never a burst. An abort ([`abort_after`](MockConfig::abort_after)) ends
//! the body with an error: on HTTP/1.1 hyper closes the connection without the terminating chunk, on
//! HTTP/2 it resets the stream. [`MockStats`] counts requests, connections and streams, and lets
//! tests await events (a cancellation, a closed connection) with the instant they happened.
//!
//! # Emit timestamps
//!
//! With [`emit_time`](MockConfig::emit_time) every event carries `"emit_mono_ns"` (nanoseconds since
//! [`monotonic_epoch`], comparable with [`monotonic_nanos`] in the same process) and `"emit_unix_ns"`
//! (nanoseconds since the UNIX epoch, comparable across processes on one machine), taken when the
//! event is handed to hyper.

mod body;
mod handler;
mod render;
mod server;
mod stats;
#[cfg(test)]
mod tests;

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use self::body::MockAbortError;
pub use self::server::{MockHandle, MockServer};
pub use self::stats::{MockSnapshot, MockStats, MockWaitTimeout, WaitInstant};

/// The line terminator the mock writes between SSE fields and after NDJSON records.
///
/// All three are valid in the SSE grammar; `Cr` and `CrLf` exercise the boundary tracking of proxies
/// (a chunk ending in a bare CR may be followed by an LF).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LineEnding {
    /// `\n`.
    #[default]
    Lf,
    /// `\r\n`.
    CrLf,
    /// A lone `\r`.
    Cr,
}

impl LineEnding {
    /// The terminator's bytes.
    pub const fn as_bytes(self) -> &'static [u8] {
        match self {
            LineEnding::Lf => b"\n",
            LineEnding::CrLf => b"\r\n",
            LineEnding::Cr => b"\r",
        }
    }

    /// Parse `lf`, `crlf` or `cr` (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "lf" => Some(LineEnding::Lf),
            "crlf" => Some(LineEnding::CrLf),
            "cr" => Some(LineEnding::Cr),
            _ => None,
        }
    }
}

/// Where in the stream a configured [`silence`](MockConfig::silence) falls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SilencePoint {
    /// Between two events: the silence replaces the gap before the next event (for `n = 0`, the
    /// time to first token).
    #[default]
    Boundary,
    /// In the middle of the first line of the next event, so a proxy sees a partial line go quiet.
    MidLine,
    /// Right after the first CR of the next event: between the CR and LF of a CRLF, or after a lone CR,
    /// where a proxy cannot yet know whether an LF follows. With [`LineEnding::Lf`] there is no CR and
    /// the silence falls right after the first LF (between the lines of the event).
    AfterCr,
}

impl SilencePoint {
    /// Parse `boundary`, `mid` or `cr` (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "boundary" => Some(SilencePoint::Boundary),
            "mid" | "midline" | "mid-line" => Some(SilencePoint::MidLine),
            "cr" => Some(SilencePoint::AfterCr),
            _ => None,
        }
    }
}

/// How the mock answers, by default. Every field can be overridden per request with a header; see
/// the [module docs](self).
///
/// The fields are public; the setters of the same name return `Self` for chaining.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MockConfig {
    /// Delay from the request to the first token event. Default: 400 ms.
    pub time_to_first_token: Duration,
    /// Delay between the moment a token was taken by the reader and the next token. Zero yields
    /// (`Pending` and an immediate wake) between tokens instead of sleeping. Default: 40 ms.
    pub inter_token: Duration,
    /// Token events per response. Default: 60.
    pub tokens: usize,
    /// After `n` tokens, go silent for this long (placed by [`silence_at`](Self::silence_at)).
    /// Default: none.
    pub silence: Option<(usize, Duration)>,
    /// Where the [`silence`](Self::silence) falls. Default: [`SilencePoint::Boundary`].
    pub silence_at: SilencePoint,
    /// After `n` token events, fail the stream with [`MockAbortError`] where the next event would have
    /// come (the finish event, if `n` ≥ [`tokens`](Self::tokens)). On the wire: no terminating chunk on
    /// HTTP/1.1, `RST_STREAM` on HTTP/2. A non-streaming request is answered with no response at all.
    /// Default: none.
    pub abort_after: Option<usize>,
    /// Split each event into three frames, each flushed on its own: one cut in the middle of the first
    /// line and one right after its first line terminator's first byte (between CR and LF for CRLF).
    /// Default: false.
    pub split_events: bool,
    /// Stream NDJSON (`application/x-ndjson`, one JSON object per line, no `[DONE]`) instead of SSE.
    /// Default: false.
    pub ndjson: bool,
    /// Pad every token event to at least this many bytes (the padding is part of the token text), for
    /// throughput tests. 0 disables padding. Default: 0.
    pub chunk_bytes: usize,
    /// Line terminator. Default: [`LineEnding::Lf`].
    pub line_ending: LineEnding,
    /// Put `"emit_mono_ns"` and `"emit_unix_ns"` in every event. Default: false.
    pub emit_time: bool,
    /// Answer every completion request with this status and an OpenAI-style error body (not
    /// `/healthz` or `/v1/models`). Default: none.
    pub status: Option<http::StatusCode>,
    /// The model listed by `/v1/models` and used when a request names none. Default: `"mock-llm"`.
    pub model: String,
}

impl Default for MockConfig {
    /// Realistic demo values: 400 ms to the first token, then 60 tokens of lorem ipsum at 40 ms each.
    fn default() -> Self {
        Self {
            time_to_first_token: Duration::from_millis(400),
            inter_token: Duration::from_millis(40),
            tokens: 60,
            silence: None,
            silence_at: SilencePoint::Boundary,
            abort_after: None,
            split_events: false,
            ndjson: false,
            chunk_bytes: 0,
            line_ending: LineEnding::Lf,
            emit_time: false,
            status: None,
            model: "mock-llm".to_owned(),
        }
    }
}

impl MockConfig {
    /// Values for tests: no time to first token, no inter-token delay (a yield between tokens), 8 tokens.
    pub fn fast() -> Self {
        Self {
            time_to_first_token: Duration::ZERO,
            inter_token: Duration::ZERO,
            tokens: 8,
            ..Self::default()
        }
    }

    /// Set [`time_to_first_token`](Self::time_to_first_token). Default: 400 ms.
    pub fn time_to_first_token(mut self, d: Duration) -> Self {
        self.time_to_first_token = d;
        self
    }

    /// Set [`inter_token`](Self::inter_token). Default: 40 ms.
    pub fn inter_token(mut self, d: Duration) -> Self {
        self.inter_token = d;
        self
    }

    /// Set [`tokens`](Self::tokens). Default: 60.
    pub fn tokens(mut self, n: usize) -> Self {
        self.tokens = n;
        self
    }

    /// Set [`silence`](Self::silence): after `after_tokens` tokens, be silent for `d`. Default: none.
    pub fn silence(mut self, after_tokens: usize, d: Duration) -> Self {
        self.silence = Some((after_tokens, d));
        self
    }

    /// Set [`silence_at`](Self::silence_at). Default: [`SilencePoint::Boundary`].
    pub fn silence_at(mut self, at: SilencePoint) -> Self {
        self.silence_at = at;
        self
    }

    /// Set [`abort_after`](Self::abort_after). Default: none.
    pub fn abort_after(mut self, tokens: usize) -> Self {
        self.abort_after = Some(tokens);
        self
    }

    /// Set [`split_events`](Self::split_events). Default: false.
    pub fn split_events(mut self, on: bool) -> Self {
        self.split_events = on;
        self
    }

    /// Set [`ndjson`](Self::ndjson). Default: false.
    pub fn ndjson(mut self, on: bool) -> Self {
        self.ndjson = on;
        self
    }

    /// Set [`chunk_bytes`](Self::chunk_bytes). Default: 0 (no padding).
    pub fn chunk_bytes(mut self, n: usize) -> Self {
        self.chunk_bytes = n;
        self
    }

    /// Set [`line_ending`](Self::line_ending). Default: [`LineEnding::Lf`].
    pub fn line_ending(mut self, le: LineEnding) -> Self {
        self.line_ending = le;
        self
    }

    /// Set [`emit_time`](Self::emit_time). Default: false.
    pub fn emit_time(mut self, on: bool) -> Self {
        self.emit_time = on;
        self
    }

    /// Set [`status`](Self::status). Default: none.
    pub fn status(mut self, status: http::StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    /// Set [`model`](Self::model). Default: `"mock-llm"`.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = model.into();
        self
    }
}

/// The process-wide monotonic epoch of `emit_mono_ns` timestamps (fixed on first use).
pub fn monotonic_epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds from [`monotonic_epoch`] to now: compare with an event's `emit_mono_ns` to get its
/// latency within one process.
pub fn monotonic_nanos() -> u64 {
    nanos_since_epoch(Instant::now())
}

/// Nanoseconds from [`monotonic_epoch`] to `at` (0 if `at` is earlier).
pub fn nanos_since_epoch(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(monotonic_epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// Nanoseconds since the UNIX epoch, by the system clock: compare with an event's `emit_unix_ns` across
/// processes on one machine.
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
