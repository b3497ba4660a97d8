//! [`IdleTimeoutLayer`], the [`IdleTimeout`] service and its [`ResponseFuture`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use super::body::{deadline_after, IdleTimeoutBody};
use super::classify::{bodiless, identity_encoded, StreamKind};
use super::error::{validate_line, IdleTimeoutError, IdleTimeoutKind, InvalidKeepaliveLine};
use crate::{BoxError, EndReason, StreamInfo};

const DEFAULT_IDLE: Duration = Duration::from_secs(300);
const DEFAULT_FIRST_BYTE: Duration = Duration::from_secs(300);
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(15);
const DEFAULT_COMMENT: &[u8] = b": keepalive\n";

#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) idle: Duration,
    pub(crate) first_byte: Option<Duration>,
    pub(crate) keepalive: Option<Duration>,
    pub(crate) sse_line: Bytes,
    pub(crate) ndjson_line: Option<Bytes>,
}

/// Applies first-byte and idle deadlines to a service, and injects keepalives into silent streams.
/// See the [module docs](super).
#[derive(Clone, Debug)]
pub struct IdleTimeoutLayer {
    config: Arc<Config>,
}

impl Default for IdleTimeoutLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl IdleTimeoutLayer {
    /// A layer with the defaults: idle 300 s, first byte 300 s, SSE keepalive `: keepalive\n` every 15 s,
    /// no NDJSON keepalive.
    pub fn new() -> Self {
        Self {
            config: Arc::new(Config {
                idle: DEFAULT_IDLE,
                first_byte: Some(DEFAULT_FIRST_BYTE),
                keepalive: Some(DEFAULT_KEEPALIVE),
                sse_line: Bytes::from_static(DEFAULT_COMMENT),
                ndjson_line: None,
            }),
        }
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// How long the upstream body may send nothing before the stream is cut with an
    /// [`IdleTimeoutError`]. The deadline starts when the response headers arrive and restarts on every
    /// frame from the upstream body, never on injected keepalives. Default: 300 s.
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.config_mut().idle = d;
        self
    }

    /// How long to wait for the upstream's response headers before answering `504 Gateway Timeout`
    /// (and dropping the upstream request). `None` waits forever. Default: `Some(300 s)`.
    pub fn first_byte_timeout(mut self, d: Option<Duration>) -> Self {
        self.config_mut().first_byte = d;
        self
    }

    /// How long the stream may be silent toward the client before a keepalive line is injected, and
    /// the period of further keepalives while the silence lasts. `None` or zero disables injection.
    /// Default: `Some(15 s)`.
    pub fn keepalive_interval(mut self, d: Option<Duration>) -> Self {
        self.config_mut().keepalive = d.filter(|d| !d.is_zero());
        self
    }

    /// The SSE comment line injected into `text/event-stream` responses.
    ///
    /// It must be exactly one comment line: start with `:`, end with `\n` (or `\r\n`), with no other CR
    /// or LF. An invalid line is ignored (the previous line stays) and a warning is logged; use
    /// [`try_keepalive_comment`](Self::try_keepalive_comment) to get the error instead.
    /// Default: `": keepalive\n"`.
    pub fn keepalive_comment(self, line: Bytes) -> Self {
        let fallback = self.clone();
        self.try_keepalive_comment(line).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "keeping the previous SSE keepalive line");
            fallback
        })
    }

    /// Like [`keepalive_comment`](Self::keepalive_comment), but returns an error for an invalid line.
    pub fn try_keepalive_comment(mut self, line: Bytes) -> Result<Self, InvalidKeepaliveLine> {
        validate_line(&line, true)?;
        self.config_mut().sse_line = line;
        Ok(self)
    }

    /// The line injected into NDJSON responses (`application/x-ndjson`, `application/ndjson`,
    /// `application/jsonl`, `application/x-jsonlines`, `application/jsonlines`; not
    /// `application/json-seq`), for example `{"type":"keepalive"}\n`. NDJSON has no comment syntax, so
    /// the client must tolerate the line; that is why this is off unless configured.
    ///
    /// The line must end with `\n` (or `\r\n`) and contain no other CR or LF. An invalid line is ignored
    /// (the previous setting stays) and a warning is logged; use
    /// [`try_ndjson_keepalive`](Self::try_ndjson_keepalive) to get the error instead. Default: `None`.
    pub fn ndjson_keepalive(self, line: Option<Bytes>) -> Self {
        let fallback = self.clone();
        self.try_ndjson_keepalive(line).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "keeping the previous NDJSON keepalive line");
            fallback
        })
    }

    /// Like [`ndjson_keepalive`](Self::ndjson_keepalive), but returns an error for an invalid line.
    pub fn try_ndjson_keepalive(
        mut self,
        line: Option<Bytes>,
    ) -> Result<Self, InvalidKeepaliveLine> {
        if let Some(line) = &line {
            validate_line(line, false)?;
        }
        self.config_mut().ndjson_line = line;
        Ok(self)
    }
}

impl<S> Layer<S> for IdleTimeoutLayer {
    type Service = IdleTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdleTimeout {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service built by [`IdleTimeoutLayer`]. See the [module docs](super).
#[derive(Clone, Debug)]
pub struct IdleTimeout<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> IdleTimeout<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwrap the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for IdleTimeout<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<IdleTimeoutBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let info = StreamInfo::get_or_insert(&mut req);
        let head = req.method() == Method::HEAD;
        let first_byte = self
            .config
            .first_byte
            .map(|d| crate::timers::sleep_until(deadline_after(Instant::now(), d)));
        ResponseFuture {
            inner: Some(self.inner.call(req)),
            first_byte,
            config: self.config.clone(),
            info,
            head,
        }
    }
}

pin_project! {
    /// Response future of [`IdleTimeout`]: the inner future raced against the first-byte deadline.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<F>,
        #[pin]
        first_byte: Option<Sleep>,
        config: Arc<Config>,
        info: StreamInfo,
        head: bool,
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("pending", &self.inner.is_some())
            .field("first_byte", &self.first_byte)
            .finish()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<IdleTimeoutBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let after = this.config.first_byte.unwrap_or_default();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            // Polled after completion (a caller bug): answer 504 again rather than panic.
            return Poll::Ready(Ok(gateway_timeout(after)));
        };
        // Data first: a response that is ready at the deadline wins.
        if let Poll::Ready(result) = inner.poll(cx) {
            this.inner.set(None);
            return Poll::Ready(result.map(|res| {
                let keepalive = keepalive_for(this.config, *this.head, &res);
                let (parts, body) = res.into_parts();
                let body =
                    IdleTimeoutBody::stream(body, this.config.idle, keepalive, this.info.clone());
                Response::from_parts(parts, body)
            }));
        }
        if let Some(deadline) = this.first_byte.as_pin_mut() {
            if deadline.poll(cx).is_ready() {
                // Dropping the inner future cancels the upstream request now.
                this.inner.set(None);
                this.info.record_end(EndReason::IdleTimeout);
                tracing::warn!(
                    source = "upstream",
                    kind = IdleTimeoutKind::FirstByte.as_str(),
                    timeout = %humantime::format_duration(after),
                    "upstream sent no response headers in time; answering 504 Gateway Timeout"
                );
                return Poll::Ready(Ok(gateway_timeout(after)));
            }
        }
        Poll::Pending
    }
}

/// The `504 Gateway Timeout` answered when the first-byte deadline runs out.
fn gateway_timeout<B>(after: Duration) -> Response<IdleTimeoutBody<B>> {
    let error = IdleTimeoutError::new(IdleTimeoutKind::FirstByte, after);
    #[derive(serde::Serialize)]
    struct ErrorBody<'a> {
        error: Detail<'a>,
    }
    #[derive(serde::Serialize)]
    struct Detail<'a> {
        r#type: &'a str,
        message: String,
    }
    let json = ErrorBody {
        error: Detail {
            r#type: IdleTimeoutKind::FirstByte.as_str(),
            message: error.to_string(),
        },
    };
    let body = serde_json::to_vec(&json).unwrap_or_default();
    let mut res = Response::new(IdleTimeoutBody::fixed(Bytes::from(body)));
    *res.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res.extensions_mut().insert(error);
    res
}

/// The keepalive interval and line for this response, or `None` if nothing may be injected: keepalive
/// disabled, a body that is not sent (HEAD, 1xx, 204, 304), a body of known length (Content-Length or an
/// exact size hint: injecting would break the framing), an encoded body, an empty body, or a content type
/// that is neither SSE nor (when configured) NDJSON.
fn keepalive_for<B: Body>(
    config: &Config,
    head: bool,
    res: &Response<B>,
) -> Option<(Duration, Bytes)> {
    let interval = config.keepalive?;
    let headers = res.headers();
    if bodiless(head, res.status())
        || headers.contains_key(header::CONTENT_LENGTH)
        || !identity_encoded(headers)
        || res.body().is_end_stream()
        || res.body().size_hint().exact().is_some()
    {
        return None;
    }
    let line = match StreamKind::of(headers) {
        StreamKind::EventStream => config.sse_line.clone(),
        StreamKind::Ndjson => config.ndjson_line.clone()?,
        StreamKind::Other => return None,
    };
    Some((interval, line))
}
