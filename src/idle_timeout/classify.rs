//! Response classification shared by the idle-timeout and flush layers: what kind of stream a response
//! carries, and whether it carries a body on the wire at all. Pure header inspection, no allocation.

use http::{header, HeaderMap, StatusCode};

/// The media types treated as newline-delimited JSON (compared case-insensitively, parameters ignored).
///
/// `application/json-seq` (RFC 7464) is deliberately absent: its records start with an RS byte, so an
/// injected line without one would be glued onto the previous record by a conforming parser.
pub(crate) const NDJSON_TYPES: [&[u8]; 5] = [
    b"application/x-ndjson",
    b"application/ndjson",
    b"application/jsonl",
    b"application/x-jsonlines",
    b"application/jsonlines",
];

/// What a response body is, judged from its `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StreamKind {
    /// `text/event-stream`.
    EventStream,
    /// One of [`NDJSON_TYPES`].
    Ndjson,
    /// Anything else, or no `Content-Type`.
    Other,
}

impl StreamKind {
    /// Classify by the media type essence of `Content-Type` (case-insensitive, parameters allowed).
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        let Some(value) = headers.get(header::CONTENT_TYPE) else {
            return StreamKind::Other;
        };
        let bytes = value.as_bytes();
        let essence = match bytes.iter().position(|&b| b == b';') {
            Some(i) => &bytes[..i],
            None => bytes,
        }
        .trim_ascii();
        if essence.eq_ignore_ascii_case(b"text/event-stream") {
            StreamKind::EventStream
        } else if NDJSON_TYPES.iter().any(|t| essence.eq_ignore_ascii_case(t)) {
            StreamKind::Ndjson
        } else {
            StreamKind::Other
        }
    }
}

/// Whether the response to a request carries no body on the wire whatever its body says:
/// a response to `HEAD`, an informational (1xx) response, `204 No Content` or `304 Not Modified`.
/// hyper drops such bodies without polling them.
pub(crate) fn bodiless(request_was_head: bool, status: StatusCode) -> bool {
    request_was_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// Whether the body is sent as is: no `Content-Encoding`, or only `identity`.
pub(crate) fn identity_encoded(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .all(|coding| {
            let coding = coding.trim_ascii();
            coding.is_empty() || coding.eq_ignore_ascii_case(b"identity")
        })
}

/// The `Content-Length` header as a number, if present and well formed.
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(header::CONTENT_LENGTH)?;
    std::str::from_utf8(value.as_bytes())
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with(name: header::HeaderName, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn event_stream_is_matched_case_insensitively_with_params() {
        for v in [
            "text/event-stream",
            "Text/Event-Stream",
            "text/event-stream; charset=utf-8",
            " text/event-stream ;charset=utf-8",
        ] {
            assert_eq!(
                StreamKind::of(&with(header::CONTENT_TYPE, v)),
                StreamKind::EventStream,
                "{v}"
            );
        }
        assert_eq!(
            StreamKind::of(&with(header::CONTENT_TYPE, "text/event-streams")),
            StreamKind::Other
        );
        assert_eq!(StreamKind::of(&HeaderMap::new()), StreamKind::Other);
    }

    #[test]
    fn ndjson_family_but_not_json_seq() {
        for v in [
            "application/x-ndjson",
            "application/jsonl; charset=utf-8",
            "APPLICATION/NDJSON",
        ] {
            assert_eq!(
                StreamKind::of(&with(header::CONTENT_TYPE, v)),
                StreamKind::Ndjson,
                "{v}"
            );
        }
        for v in ["application/json-seq", "application/json"] {
            assert_eq!(
                StreamKind::of(&with(header::CONTENT_TYPE, v)),
                StreamKind::Other,
                "{v}"
            );
        }
    }

    #[test]
    fn bodiless_statuses_and_head() {
        assert!(bodiless(true, StatusCode::OK));
        assert!(bodiless(false, StatusCode::NO_CONTENT));
        assert!(bodiless(false, StatusCode::NOT_MODIFIED));
        assert!(bodiless(false, StatusCode::CONTINUE));
        assert!(!bodiless(false, StatusCode::OK));
        assert!(!bodiless(false, StatusCode::BAD_GATEWAY));
    }

    #[test]
    fn encodings() {
        assert!(identity_encoded(&HeaderMap::new()));
        assert!(identity_encoded(&with(
            header::CONTENT_ENCODING,
            "identity"
        )));
        assert!(!identity_encoded(&with(header::CONTENT_ENCODING, "gzip")));
        assert!(!identity_encoded(&with(
            header::CONTENT_ENCODING,
            "identity, br"
        )));
    }

    #[test]
    fn content_length_parses() {
        assert_eq!(
            content_length(&with(header::CONTENT_LENGTH, "42")),
            Some(42)
        );
        assert_eq!(content_length(&with(header::CONTENT_LENGTH, "x")), None);
        assert_eq!(content_length(&HeaderMap::new()), None);
    }
}
