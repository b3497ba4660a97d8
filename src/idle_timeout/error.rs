//! Errors of the idle-timeout layer.

use std::fmt;
use std::time::Duration;

use crate::ErrorSource;

/// Which deadline of the [`IdleTimeoutLayer`](super::IdleTimeoutLayer) ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IdleTimeoutKind {
    /// The upstream sent no body frame for the idle timeout; the stream was cut.
    Idle,
    /// The upstream sent no response headers within the first-byte timeout; a `504` was answered.
    FirstByte,
}

impl IdleTimeoutKind {
    /// The stable snake_case name used in logs and error bodies: `idle_timeout`, `first_byte_timeout`.
    pub const fn as_str(self) -> &'static str {
        match self {
            IdleTimeoutKind::Idle => "idle_timeout",
            IdleTimeoutKind::FirstByte => "first_byte_timeout",
        }
    }
}

/// An idle or first-byte deadline of the [`IdleTimeoutLayer`](super::IdleTimeoutLayer) ran out.
///
/// An idle cut is the error of the response body (boxed into [`BoxError`](crate::BoxError); downcast to
/// inspect it). A first-byte timeout is not an error of the service: the layer answers `504 Gateway
/// Timeout` and puts this value in the response extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleTimeoutError {
    kind: IdleTimeoutKind,
    after: Duration,
}

impl IdleTimeoutError {
    pub(crate) const fn new(kind: IdleTimeoutKind, after: Duration) -> Self {
        Self { kind, after }
    }

    /// Which deadline ran out.
    pub const fn kind(&self) -> IdleTimeoutKind {
        self.kind
    }

    /// The configured duration that elapsed.
    pub const fn after(&self) -> Duration {
        self.after
    }

    /// Who caused it: always the upstream, which was silent.
    pub const fn origin(&self) -> ErrorSource {
        ErrorSource::Upstream
    }
}

impl fmt::Display for IdleTimeoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let after = humantime::format_duration(self.after);
        match self.kind {
            IdleTimeoutKind::FirstByte => {
                write!(f, "upstream sent no response headers within {after}")
            }
            IdleTimeoutKind::Idle => write!(
                f,
                "upstream sent nothing for {after}, so the idle timeout cut the stream \
                 (raise the idle timeout if the upstream may pause longer)"
            ),
        }
    }
}

impl std::error::Error for IdleTimeoutError {}

/// A keepalive line given to [`IdleTimeoutLayer`](super::IdleTimeoutLayer) was rejected.
///
/// Returned by [`try_keepalive_comment`](super::IdleTimeoutLayer::try_keepalive_comment) and
/// [`try_ndjson_keepalive`](super::IdleTimeoutLayer::try_ndjson_keepalive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidKeepaliveLine {
    reason: &'static str,
}

impl InvalidKeepaliveLine {
    /// Why the line was rejected.
    pub const fn reason(&self) -> &'static str {
        self.reason
    }
}

impl fmt::Display for InvalidKeepaliveLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid keepalive line: {}", self.reason)
    }
}

impl std::error::Error for InvalidKeepaliveLine {}

/// Check that `line` is exactly one line: ends with `\n` (optionally `\r\n`), no other CR or LF, and,
/// for SSE, starts with `:` so that parsers ignore it.
pub(crate) fn validate_line(line: &[u8], sse: bool) -> Result<(), InvalidKeepaliveLine> {
    let fail = |reason| Err(InvalidKeepaliveLine { reason });
    let Some(body) = line.strip_suffix(b"\n") else {
        return fail("it must end with a line feed (\\n)");
    };
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    if body.iter().any(|&b| b == b'\r' || b == b'\n') {
        return fail("it must be a single line (no CR or LF before the final line ending)");
    }
    if sse && body.first() != Some(&b':') {
        return fail("an SSE keepalive must be a comment line starting with ':'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_duration() {
        let e = IdleTimeoutError::new(IdleTimeoutKind::FirstByte, Duration::from_secs(30));
        assert_eq!(
            e.to_string(),
            "upstream sent no response headers within 30s"
        );
        let e = IdleTimeoutError::new(IdleTimeoutKind::Idle, Duration::from_millis(1500));
        assert!(e
            .to_string()
            .starts_with("upstream sent nothing for 1s 500ms"));
        assert_eq!(e.origin(), ErrorSource::Upstream);
    }

    #[test]
    fn line_validation() {
        assert!(validate_line(b": keepalive\n", true).is_ok());
        assert!(validate_line(b":\r\n", true).is_ok());
        assert!(validate_line(b"{}\n", false).is_ok());
        assert!(validate_line(b"\n", false).is_ok());
        assert!(validate_line(b"keepalive\n", true).is_err());
        assert!(validate_line(b": keepalive", true).is_err());
        assert!(validate_line(b": a\n: b\n", true).is_err());
        assert!(validate_line(b": a\rb\n", true).is_err());
        assert!(validate_line(b"", false).is_err());
    }
}
