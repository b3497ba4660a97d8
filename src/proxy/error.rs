//! Errors the proxy answers itself, and the one function that maps them to responses.

use std::fmt;
use std::time::Duration;

use http::{header, HeaderValue, Response, StatusCode};

use super::body::ProxyBody;
use crate::ErrorSource;

/// What went wrong, as the `error.type` of the JSON body and of spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProxyErrorKind {
    /// No route matches the request's host and path (404).
    NoRoute,
    /// CONNECT and other methods the proxy does not forward (405).
    MethodNotAllowed,
    /// The request is malformed for forwarding (400).
    BadRequest,
    /// No endpoint of the pool could be connected to (502).
    UpstreamUnreachable,
    /// The upstream failed before sending response headers (502).
    UpstreamError,
    /// Every endpoint of the pool is ejected or failing health checks (503).
    NoHealthyUpstream,
    /// The proxy is at `max_streams` (503).
    OverCapacity,
    /// The proxy is shutting down (503).
    ShuttingDown,
}

impl ProxyErrorKind {
    /// The snake_case name used in the JSON body, logs and spans.
    pub const fn as_str(self) -> &'static str {
        match self {
            ProxyErrorKind::NoRoute => "no_route",
            ProxyErrorKind::MethodNotAllowed => "method_not_allowed",
            ProxyErrorKind::BadRequest => "bad_request",
            ProxyErrorKind::UpstreamUnreachable => "upstream_unreachable",
            ProxyErrorKind::UpstreamError => "upstream_error",
            ProxyErrorKind::NoHealthyUpstream => "no_healthy_upstream",
            ProxyErrorKind::OverCapacity => "over_capacity",
            ProxyErrorKind::ShuttingDown => "shutting_down",
        }
    }

    /// The status the client gets.
    pub const fn status(self) -> StatusCode {
        match self {
            ProxyErrorKind::NoRoute => StatusCode::NOT_FOUND,
            ProxyErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ProxyErrorKind::UpstreamUnreachable | ProxyErrorKind::UpstreamError => {
                StatusCode::BAD_GATEWAY
            }
            ProxyErrorKind::NoHealthyUpstream
            | ProxyErrorKind::OverCapacity
            | ProxyErrorKind::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Who caused it.
    pub const fn source(self) -> ErrorSource {
        match self {
            ProxyErrorKind::NoRoute
            | ProxyErrorKind::MethodNotAllowed
            | ProxyErrorKind::BadRequest => ErrorSource::Downstream,
            ProxyErrorKind::UpstreamUnreachable
            | ProxyErrorKind::UpstreamError
            | ProxyErrorKind::NoHealthyUpstream => ErrorSource::Upstream,
            ProxyErrorKind::OverCapacity | ProxyErrorKind::ShuttingDown => ErrorSource::Internal,
        }
    }
}

/// An error the proxy answers itself: kind, message, and when to retry.
#[derive(Debug, Clone)]
pub struct ProxyError {
    kind: ProxyErrorKind,
    message: String,
    retry_after: Option<Duration>,
}

impl ProxyError {
    /// A new error.
    pub fn new(kind: ProxyErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Set the Retry-After hint (rounded up to whole seconds, at least 1).
    pub fn retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }

    /// The kind.
    pub fn kind(&self) -> ProxyErrorKind {
        self.kind
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The one mapping from proxy errors to responses: status, `Retry-After` for 503s, and a short JSON
    /// body `{"error":{"type":"...","message":"..."}}`. Logged here, once, with who caused it.
    pub fn into_response(self) -> Response<ProxyBody> {
        let status = self.kind.status();
        let source = self.kind.source();
        match source {
            ErrorSource::Upstream | ErrorSource::Internal => tracing::warn!(
                error.type = self.kind.as_str(),
                source = source.as_str(),
                status = status.as_u16(),
                "{}",
                self.message
            ),
            _ => tracing::debug!(
                error.type = self.kind.as_str(),
                source = source.as_str(),
                status = status.as_u16(),
                "{}",
                self.message
            ),
        }
        let body = json_error(self.kind.as_str(), &self.message);
        let mut resp = Response::new(ProxyBody::full(body));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            let secs = self
                .retry_after
                .map_or(1, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
                .max(1);
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            h.insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
        }
        resp
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

impl std::error::Error for ProxyError {}

/// `{"error":{"type":TYPE,"message":MESSAGE}}` with JSON string escaping.
pub fn json_error(kind: &str, message: &str) -> String {
    serde_json::json!({ "error": { "type": kind, "message": message } }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_carry_status_json_and_retry_after() {
        let r = ProxyError::new(ProxyErrorKind::NoHealthyUpstream, "all \"down\"")
            .retry_after(Duration::from_millis(2500))
            .into_response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let r = ProxyError::new(ProxyErrorKind::UpstreamUnreachable, "x").into_response();
        assert_eq!(r.status(), 502);
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
        let v: serde_json::Value = serde_json::from_str(&json_error("t", "a \"q\"\n")).unwrap();
        assert_eq!(v["error"]["type"], "t");
        assert_eq!(v["error"]["message"], "a \"q\"\n");
    }
}
