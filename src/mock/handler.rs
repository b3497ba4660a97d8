//! Routing, request parsing and per-request overrides of the mock server.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use serde_json::{json, Value};

use super::body::{MockAbortError, MockBody, Script, TokenStream};
use super::render::{full_text, Api, Renderer};
use super::stats::{MockStats, Outcome};
use super::{LineEnding, MockConfig, SilencePoint};
use crate::BoxError;

/// Largest request body the mock reads.
const MAX_BODY: usize = 1 << 20;
/// Largest `x-mock-tokens`: a header must not make the mock build a multi-gigabyte answer.
const MAX_TOKENS: usize = 10_000_000;
/// Largest `x-mock-chunk-bytes`.
const MAX_CHUNK_BYTES: usize = 16 << 20;

/// State shared by all connections of one server.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) cfg: MockConfig,
    pub(crate) stats: MockStats,
    pub(crate) healthy: AtomicBool,
    next_id: AtomicU64,
}

impl Shared {
    pub(crate) fn new(cfg: MockConfig) -> Self {
        Self {
            cfg,
            stats: MockStats::new(),
            healthy: AtomicBool::new(true),
            next_id: AtomicU64::new(1),
        }
    }
}

/// One request's settings: the server config with the request's `x-mock-*` headers applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) script: Script,
    pub(crate) ndjson: bool,
    pub(crate) chunk_bytes: usize,
    pub(crate) line_ending: LineEnding,
    pub(crate) emit_time: bool,
    pub(crate) status: Option<StatusCode>,
}

impl Plan {
    /// Resolve the plan for a request, or name the header that is malformed.
    pub(crate) fn resolve(cfg: &MockConfig, headers: &HeaderMap) -> Result<Self, String> {
        let mut p = Plan {
            script: Script {
                ttft: cfg.time_to_first_token,
                inter_token: cfg.inter_token,
                tokens: cfg.tokens,
                silence: cfg.silence,
                silence_at: cfg.silence_at,
                abort_after: cfg.abort_after,
                split: cfg.split_events,
            },
            ndjson: cfg.ndjson,
            chunk_bytes: cfg.chunk_bytes,
            line_ending: cfg.line_ending,
            emit_time: cfg.emit_time,
            status: cfg.status,
        };
        for (name, value) in headers {
            let name = name.as_str();
            let Some(key) = name.strip_prefix("x-mock-") else {
                continue;
            };
            let v = value
                .to_str()
                .map_err(|_| format!("header {name} is not visible ASCII"))?
                .trim();
            let bad = |what: &str| format!("header {name}: {v:?} is not {what}");
            match key {
                "ttft-ms" => p.script.ttft = parse_ms(v).ok_or_else(|| bad("milliseconds"))?,
                "inter-token-ms" => {
                    p.script.inter_token = parse_ms(v).ok_or_else(|| bad("milliseconds"))?
                }
                "tokens" => {
                    p.script.tokens = v
                        .parse()
                        .ok()
                        .filter(|&n| n <= MAX_TOKENS)
                        .ok_or_else(|| bad("a token count up to 10000000"))?
                }
                "silence" => {
                    let (silence, at) = parse_silence(v).ok_or_else(|| {
                        bad("N:MS or N:MS:AT with AT one of boundary, mid, cr (or none)")
                    })?;
                    p.script.silence = silence;
                    p.script.silence_at = at;
                }
                "abort-after" => {
                    p.script.abort_after = if v.eq_ignore_ascii_case("none") {
                        None
                    } else {
                        Some(v.parse().map_err(|_| bad("a token count or none"))?)
                    }
                }
                "split" => p.script.split = parse_bool(v).ok_or_else(|| bad("1 or 0"))?,
                "format" => {
                    p.ndjson = match v.to_ascii_lowercase().as_str() {
                        "sse" => false,
                        "ndjson" => true,
                        _ => return Err(bad("sse or ndjson")),
                    }
                }
                "chunk-bytes" => {
                    p.chunk_bytes = v
                        .parse()
                        .ok()
                        .filter(|&n| n <= MAX_CHUNK_BYTES)
                        .ok_or_else(|| bad("a byte count up to 16 MiB"))?
                }
                "line-ending" => {
                    p.line_ending = LineEnding::parse(v).ok_or_else(|| bad("lf, crlf or cr"))?
                }
                "emit-time" => p.emit_time = parse_bool(v).ok_or_else(|| bad("1 or 0"))?,
                "status" => {
                    let code = v
                        .parse::<u16>()
                        .ok()
                        .and_then(|c| StatusCode::from_u16(c).ok())
                        .filter(|c| c.is_client_error() || c.is_server_error())
                        .ok_or_else(|| bad("a status in 400..=599"))?;
                    p.status = Some(code);
                }
                _ => {
                    return Err(format!(
                        "unknown mock header {name}; see streamgate::mock docs"
                    ))
                }
            }
        }
        Ok(p)
    }
}

fn parse_ms(v: &str) -> Option<Duration> {
    let ms: f64 = v.parse().ok()?;
    (0.0..1e12)
        .contains(&ms)
        .then(|| Duration::from_secs_f64(ms / 1000.0))
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn parse_silence(v: &str) -> Option<(Option<(usize, Duration)>, SilencePoint)> {
    if v.eq_ignore_ascii_case("none") {
        return Some((None, SilencePoint::Boundary));
    }
    let mut parts = v.split(':');
    let n = parts.next()?.trim().parse().ok()?;
    let d = parse_ms(parts.next()?.trim())?;
    let at = match parts.next() {
        Some(a) => SilencePoint::parse(a)?,
        None => SilencePoint::Boundary,
    };
    parts.next().is_none().then_some((Some((n, d)), at))
}

/// The body of `/v1/chat/completions` and `/v1/completions`, as far as the mock cares.
#[derive(Debug, Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    messages: Option<Vec<Value>>,
    #[serde(default)]
    prompt: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// Answer one request.
pub(crate) async fn handle<B>(
    shared: std::sync::Arc<Shared>,
    req: Request<B>,
) -> Result<Response<MockBody>, BoxError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let path = req.uri().path();
    let is_health = path == "/healthz";
    shared
        .stats
        .request_received((!is_health).then_some(req.headers()));

    let route = match path {
        "/healthz" => Route::Health,
        "/v1/models" => Route::Models,
        "/v1/chat/completions" => Route::Generate(Api::Chat),
        "/v1/completions" => Route::Generate(Api::Completions),
        "/stream" => Route::Generate(Api::Plain),
        _ => {
            let msg = format!("no mock endpoint at {path}; try POST /v1/chat/completions");
            return Ok(error(StatusCode::NOT_FOUND, &msg));
        }
    };
    let allowed = match route {
        Route::Health | Route::Models => &[Method::GET][..],
        Route::Generate(Api::Plain) => &[Method::GET, Method::POST][..],
        Route::Generate(_) => &[Method::POST][..],
    };
    if !allowed.contains(req.method()) {
        let allow = allowed
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        let msg = format!("{} is not allowed on {path}; use {allow}", req.method());
        let mut res = error(StatusCode::METHOD_NOT_ALLOWED, &msg);
        res.headers_mut().insert(
            ALLOW,
            HeaderValue::from_str(&allow).expect("method names are valid"),
        );
        return Ok(res);
    }

    match route {
        Route::Health => {
            let ok = shared.healthy.load(Ordering::Relaxed);
            let (status, text) = if ok {
                (StatusCode::OK, "ok\n")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n")
            };
            Ok(with_type(status, "text/plain; charset=utf-8", text))
        }
        Route::Models => {
            let body = json!({
                "object": "list",
                "data": [{
                    "id": shared.cfg.model,
                    "object": "model",
                    "created": unix_secs(),
                    "owned_by": "streamgate-mock",
                }],
            });
            Ok(with_type(
                StatusCode::OK,
                "application/json",
                body.to_string(),
            ))
        }
        Route::Generate(api) => generate(shared, req, api).await,
    }
}

#[derive(Clone, Copy, Debug)]
enum Route {
    Health,
    Models,
    Generate(Api),
}

async fn generate<B>(
    shared: std::sync::Arc<Shared>,
    req: Request<B>,
    api: Api,
) -> Result<Response<MockBody>, BoxError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let plan = match Plan::resolve(&shared.cfg, req.headers()) {
        Ok(p) => p,
        Err(msg) => return Ok(error(StatusCode::BAD_REQUEST, &msg)),
    };
    let is_get = req.method() == Method::GET;
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let msg = format!("request body is larger than the mock's limit of {MAX_BODY} bytes");
            return Ok(error(StatusCode::PAYLOAD_TOO_LARGE, &msg));
        }
        Err(e) => return Err(e),
    };
    if let Some(status) = plan.status {
        let msg =
            format!("mock error: asked to answer {status} (x-mock-status or MockConfig::status)");
        let mut res = error(status, &msg);
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        return Ok(res);
    }

    let parsed = if api == Api::Plain && (is_get || bytes.is_empty()) {
        None
    } else {
        match serde_json::from_slice::<CompletionRequest>(&bytes) {
            Ok(r) => Some(r),
            Err(e) => {
                let msg = format!("request body is not a valid completion request: {e}");
                return Ok(error(StatusCode::BAD_REQUEST, &msg));
            }
        }
    };
    if api == Api::Chat && parsed.as_ref().is_some_and(|r| r.messages.is_none()) {
        let msg = "'messages' is a required property";
        return Ok(error(StatusCode::BAD_REQUEST, msg));
    }

    let model = parsed
        .as_ref()
        .and_then(|r| r.model.clone())
        .unwrap_or_else(|| shared.cfg.model.clone());
    let stream = api == Api::Plain || parsed.as_ref().and_then(|r| r.stream).unwrap_or(false);
    let include_usage = parsed
        .as_ref()
        .and_then(|r| r.stream_options.as_ref())
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let cap = parsed
        .as_ref()
        .and_then(|r| r.max_completion_tokens.or(r.max_tokens))
        .and_then(|m| usize::try_from(m).ok());
    let mut script = plan.script.clone();
    let mut finish_reason = "stop";
    if let Some(cap) = cap.filter(|&c| c < script.tokens) {
        script.tokens = cap;
        finish_reason = "length";
    }
    let prompt_tokens = parsed.as_ref().map_or(0, prompt_tokens);
    let seq = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match api {
        Api::Chat => format!("chatcmpl-mock-{seq:08}"),
        Api::Completions => format!("cmpl-mock-{seq:08}"),
        Api::Plain => format!("stream-mock-{seq:08}"),
    };
    let created = unix_secs();
    let mut guard = shared.stats.generation_started();

    if !stream {
        // One answer after the whole generation time; dropping this future is a cancellation.
        let wait = script.ttft
            + script.inter_token * u32::try_from(script.tokens).unwrap_or(u32::MAX)
            + script
                .silence
                .filter(|(n, _)| *n <= script.tokens)
                .map_or(Duration::ZERO, |s| s.1);
        if let Some(n) = script.abort_after.map(|n| n.min(script.tokens)) {
            let until = script.ttft + script.inter_token * u32::try_from(n).unwrap_or(u32::MAX);
            crate::timers::sleep(until).await;
            guard.end(Outcome::Aborted);
            return Err(MockAbortError::new(n).into());
        }
        crate::timers::sleep(wait).await;
        let text = full_text(script.tokens);
        let completion_tokens = script.tokens as u64;
        let usage = json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        });
        let body = match api {
            Api::Chat => json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": "fp_streamgate_mock",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": finish_reason,
                }],
                "usage": usage,
            }),
            _ => json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": "fp_streamgate_mock",
                "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish_reason}],
                "usage": usage,
            }),
        };
        guard.end(Outcome::Completed);
        return Ok(with_type(
            StatusCode::OK,
            "application/json",
            body.to_string(),
        ));
    }

    let renderer = Renderer::new(
        api,
        plan.ndjson,
        plan.line_ending,
        id,
        &model,
        created,
        include_usage,
        plan.emit_time,
        plan.chunk_bytes,
        prompt_tokens,
        finish_reason,
    );
    let content_type = if plan.ndjson {
        "application/x-ndjson"
    } else {
        "text/event-stream; charset=utf-8"
    };
    let mut res = Response::new(MockBody::stream(TokenStream::new(script, renderer, guard)));
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(res)
}

/// A rough prompt size: whitespace-separated words of every message's text (or of the prompt).
fn prompt_tokens(r: &CompletionRequest) -> u64 {
    fn words(v: &Value) -> u64 {
        match v {
            Value::String(s) => s.split_whitespace().count() as u64,
            Value::Array(a) => a.iter().map(words).sum(),
            Value::Object(o) => o.get("text").or_else(|| o.get("content")).map_or(0, words),
            _ => 0,
        }
    }
    let m = r.messages.iter().flatten().map(words).sum::<u64>();
    m + r.prompt.as_ref().map_or(0, words)
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<MockBody> {
    let mut res = Response::new(MockBody::full(body));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

/// An OpenAI-style error answer.
pub(crate) fn error(status: StatusCode, message: &str) -> Response<MockBody> {
    let kind = match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    };
    let body = json!({
        "error": {"message": message, "type": kind, "param": null, "code": null}
    });
    with_type(status, "application/json", body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(headers: &[(&'static str, &'static str)]) -> Result<Plan, String> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, HeaderValue::from_static(v));
        }
        Plan::resolve(&MockConfig::default(), &h)
    }

    #[test]
    fn headers_override_every_setting() {
        let p = plan(&[
            ("x-mock-ttft-ms", "12"),
            ("x-mock-inter-token-ms", "0.5"),
            ("x-mock-tokens", "7"),
            ("x-mock-silence", "3:2000:mid"),
            ("x-mock-abort-after", "5"),
            ("x-mock-split", "on"),
            ("x-mock-format", "ndjson"),
            ("x-mock-chunk-bytes", "1024"),
            ("x-mock-line-ending", "crlf"),
            ("x-mock-emit-time", "1"),
            ("x-mock-status", "503"),
        ])
        .unwrap();
        let s = &p.script;
        assert_eq!(s.ttft, Duration::from_millis(12));
        assert_eq!(s.inter_token, Duration::from_micros(500));
        assert_eq!(s.tokens, 7);
        assert_eq!(s.silence, Some((3, Duration::from_secs(2))));
        assert_eq!(s.silence_at, SilencePoint::MidLine);
        assert_eq!(s.abort_after, Some(5));
        assert!(s.split && p.ndjson && p.emit_time);
        assert_eq!(p.chunk_bytes, 1024);
        assert_eq!(p.line_ending, LineEnding::CrLf);
        assert_eq!(p.status, Some(StatusCode::SERVICE_UNAVAILABLE));
    }

    #[test]
    fn no_headers_is_the_config() {
        let p = plan(&[]).unwrap();
        let c = MockConfig::default();
        assert_eq!(p.script.ttft, c.time_to_first_token);
        assert_eq!(p.script.tokens, c.tokens);
        assert!(!p.ndjson && !p.script.split && p.status.is_none());
    }

    #[test]
    fn malformed_headers_are_named() {
        for (k, v) in [
            ("x-mock-tokens", "many"),
            ("x-mock-tokens", "10000001"),
            ("x-mock-chunk-bytes", "999999999"),
            ("x-mock-ttft-ms", "-1"),
            ("x-mock-silence", "5"),
            ("x-mock-silence", "5:10:sideways"),
            ("x-mock-status", "200"),
            ("x-mock-status", "99"),
            ("x-mock-format", "xml"),
            ("x-mock-split", "maybe"),
            ("x-mock-line-ending", "nl"),
            ("x-mock-frobnicate", "1"),
        ] {
            let err = plan(&[(k, v)]).unwrap_err();
            assert!(err.contains(k), "{k}: {err}");
        }
    }

    #[test]
    fn silence_none_clears_the_config() {
        let mut h = HeaderMap::new();
        h.insert("x-mock-silence", HeaderValue::from_static("none"));
        let cfg = MockConfig::default().silence(1, Duration::from_secs(1));
        assert_eq!(Plan::resolve(&cfg, &h).unwrap().script.silence, None);
    }

    #[test]
    fn prompt_tokens_counts_words_of_all_message_shapes() {
        let r: CompletionRequest = serde_json::from_value(json!({
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "one two three"}]},
            ]
        }))
        .unwrap();
        assert_eq!(prompt_tokens(&r), 5);
    }
}
