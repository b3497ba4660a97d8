//! [`FlushLayer`], the [`Flush`] service, its [`ResponseFuture`], and the anti-buffering headers.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::body::FlushBody;
use crate::idle_timeout::classify::{bodiless, StreamKind};

/// `X-Accel-Buffering`, read by nginx (and compatible proxies) to switch response buffering off.
pub const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// Flushes every response frame to the client on arrival and switches downstream buffering off.
/// See the [module docs](super).
#[derive(Clone, Debug)]
pub struct FlushLayer {
    anti_buffering: bool,
}

impl Default for FlushLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl FlushLayer {
    /// A layer that flushes every frame and sets the anti-buffering headers.
    pub fn new() -> Self {
        Self {
            anti_buffering: true,
        }
    }

    /// Whether to set the anti-buffering headers on streamed responses (see the
    /// [module docs](super)). Default: `true`.
    pub fn anti_buffering_headers(mut self, on: bool) -> Self {
        self.anti_buffering = on;
        self
    }
}

impl<S> Layer<S> for FlushLayer {
    type Service = Flush<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Flush {
            inner,
            anti_buffering: self.anti_buffering,
        }
    }
}

/// The service built by [`FlushLayer`].
#[derive(Clone, Debug)]
pub struct Flush<S> {
    inner: S,
    anti_buffering: bool,
}

impl<S> Flush<S> {
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

impl<S, ReqB, ResB> Service<Request<ReqB>> for Flush<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body,
{
    type Response = Response<FlushBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // `None`: headers untouched.
        let headers_for = self.anti_buffering.then(|| req.method() == Method::HEAD);
        ResponseFuture {
            inner: self.inner.call(req),
            headers_for,
        }
    }
}

pin_project! {
    /// Response future of [`Flush`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // Some(request_was_head) when the anti-buffering headers are on.
        headers_for: Option<bool>,
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("anti_buffering", &self.headers_for.is_some())
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<FlushBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.inner.poll(cx))?;
        if let Some(head) = *this.headers_for {
            anti_buffering(head, &mut res);
        }
        Poll::Ready(Ok(res.map(FlushBody::new)))
    }
}

/// Set the anti-buffering headers on a streamed response; see the module docs for which and why.
fn anti_buffering<B: Body>(head: bool, res: &mut Response<B>) {
    if bodiless(false, res.status()) {
        return;
    }
    let kind = StreamKind::of(res.headers());
    let open_ended = !head
        && !res.headers().contains_key(header::CONTENT_LENGTH)
        && res.body().size_hint().exact().is_none();
    let headers = res.headers_mut();
    match kind {
        StreamKind::EventStream | StreamKind::Ndjson => {
            headers
                .entry(X_ACCEL_BUFFERING)
                .or_insert(HeaderValue::from_static("no"));
            merge_cache_control(headers);
            if kind == StreamKind::EventStream {
                headers.remove(header::CONTENT_LENGTH);
            }
        }
        StreamKind::Other if open_ended && !headers.contains_key(X_ACCEL_BUFFERING) => {
            headers.insert(X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
        }
        StreamKind::Other => {}
    }
}

/// Make `Cache-Control` include `no-cache` and `no-transform`, keeping the other directives and not
/// repeating one already there (a directive counts as present whatever its argument).
fn merge_cache_control(headers: &mut HeaderMap) {
    const NEEDED: [&str; 2] = ["no-cache", "no-transform"];
    let mut present = [false; 2];
    for value in headers.get_all(header::CACHE_CONTROL) {
        for directive in value.as_bytes().split(|&b| b == b',') {
            let name = directive
                .split(|&b| b == b'=')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            for (seen, needed) in present.iter_mut().zip(NEEDED) {
                *seen |= name.eq_ignore_ascii_case(needed.as_bytes());
            }
        }
    }
    if present.iter().all(|&p| p) {
        return;
    }
    // The usual case, no `Cache-Control` at all: a static value, no allocation.
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache, no-transform"),
        );
        return;
    }
    let mut merged = Vec::with_capacity(64);
    for value in headers.get_all(header::CACHE_CONTROL) {
        let value = value.as_bytes().trim_ascii();
        if value.is_empty() {
            continue;
        }
        if !merged.is_empty() {
            merged.extend_from_slice(b", ");
        }
        merged.extend_from_slice(value);
    }
    for (_, needed) in present.iter().zip(NEEDED).filter(|(seen, _)| !**seen) {
        if !merged.is_empty() {
            merged.extend_from_slice(b", ");
        }
        merged.extend_from_slice(needed.as_bytes());
    }
    // The parts were valid header values and the separators are visible ASCII, so this cannot fail.
    if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(merged)) {
        headers.insert(header::CACHE_CONTROL, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(values: &[&'static str]) -> Vec<String> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::CACHE_CONTROL, HeaderValue::from_static(v));
        }
        merge_cache_control(&mut h);
        h.get_all(header::CACHE_CONTROL)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn cache_control_gets_both_directives() {
        assert_eq!(merged(&[]), ["no-cache, no-transform"]);
    }

    #[test]
    fn cache_control_keeps_other_directives_and_values() {
        assert_eq!(
            merged(&["private, max-age=0", "must-revalidate"]),
            ["private, max-age=0, must-revalidate, no-cache, no-transform"]
        );
    }

    #[test]
    fn cache_control_does_not_duplicate() {
        assert_eq!(merged(&["No-Cache"]), ["No-Cache, no-transform"]);
        assert_eq!(
            merged(&["no-transform, no-cache=\"set-cookie\""]),
            ["no-transform, no-cache=\"set-cookie\""]
        );
        assert_eq!(
            merged(&["no-cache", "no-transform"]),
            ["no-cache", "no-transform"]
        );
    }
}
