//! The HTTP/1.1 wire format of the lean server: request heads parsed and checked, response heads,
//! chunk framing, trailers and the `date` header. Pure functions over bytes, no I/O.

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, StatusCode, Uri, Version};
use http_body_util::Full;

use super::{Framing, MAX_BODY, MAX_HEAD, MAX_HEADERS};
use crate::proxy::body::ClientBody;
use crate::proxy::http1::{connection_has, content_length, header_map, list_has, BadHeader};

/// A request head, parsed and checked.
pub(super) struct Head {
    pub(super) req: Request<ClientBody>,
    /// Bytes of the head, and of the body after it.
    pub(super) head_len: usize,
    pub(super) body_len: usize,
    pub(super) keep_alive: bool,
    /// The client sent `TE: trailers`.
    pub(super) te_trailers: bool,
}

/// Trailer fields, minus those that must not be trailers (framing, routing, hop-by-hop).
pub(super) fn write_trailers(out: &mut Vec<u8>, trailers: &HeaderMap) {
    for (k, v) in trailers {
        let forbidden = k == header::CONTENT_LENGTH
            || k == header::TRANSFER_ENCODING
            || k == header::CONNECTION
            || k == header::TE
            || k == header::TRAILER
            || k == header::HOST
            || k.as_str() == "keep-alive";
        if forbidden {
            continue;
        }
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

pub(super) fn write_status(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The response head: the service's headers minus the ones this connection owns (`connection`,
/// `transfer-encoding`, `content-length`), then the framing.
pub(super) fn write_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    framing: Framing,
    version: Version,
    keep_alive: bool,
) {
    write_status(out, status);
    // A response with no body keeps the length it describes (HEAD, 304), except where the length
    // must not appear (204, 1xx); a body's length is the one this connection frames it with.
    let mut keep_length =
        framing == Framing::None && status != StatusCode::NO_CONTENT && !status.is_informational();
    for (k, v) in headers {
        if k == header::CONNECTION || k == header::TRANSFER_ENCODING || k.as_str() == "keep-alive" {
            continue;
        }
        if k == header::CONTENT_LENGTH {
            if !keep_length {
                continue;
            }
            keep_length = false; // One is enough.
        }
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        _ => {}
    }
    if !headers.contains_key(header::DATE) {
        write_date(out);
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The `date` header line, rendered once a second per worker thread.
    static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
}

pub(super) fn write_date(out: &mut Vec<u8>) {
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, line)| {
        if *at != secs || line.is_empty() {
            *at = secs;
            *line = format!("date: {}\r\n", httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(line.as_bytes());
    });
}

#[allow(clippy::large_enum_variant)] // As `Read`.
pub(super) enum Parsed {
    Head(Head),
    Handover,
}

pub(super) type Reject = (StatusCode, &'static str);

/// Parse a request head at the start of `buf`: `None` if it is not complete yet.
pub(super) fn parse(buf: &[u8]) -> Result<Option<Parsed>, Reject> {
    let bad = |why| (StatusCode::BAD_REQUEST, why);
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut slots);
    let head_len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err((
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "the request has more than 100 header lines",
            ))
        }
        Err(_) => return Err(bad("the request head is not valid HTTP/1.1")),
    };
    if head_len > MAX_HEAD {
        // One read can bring more than 8 KiB: the limit does not depend on how the bytes came.
        return Err((
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "the request head is larger than 8 KiB",
        ));
    }
    let method = Method::from_bytes(r.method.unwrap_or("").as_bytes())
        .map_err(|_| bad("the request method is not valid"))?;
    let uri: Uri = r
        .path
        .unwrap_or("")
        .parse()
        .map_err(|_| bad("the request target is not a valid URI"))?;
    let version = match r.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // Room for X-Forwarded-For, -Proto, -Host and Via.
    let headers = header_map(r.headers, 4).map_err(|e| match e {
        BadHeader::Name(_) => bad("a request header name is not valid"),
        BadHeader::Value(_) => bad("a request header value is not valid"),
    })?;
    if headers.contains_key(header::TRANSFER_ENCODING) || headers.contains_key(header::EXPECT) {
        return Ok(Some(Parsed::Handover));
    }
    let body_len = if headers.contains_key(header::CONTENT_LENGTH) {
        content_length(&headers).ok_or(bad("the request's content-length is not valid"))?
    } else {
        0
    };
    if body_len > MAX_BODY {
        return Ok(Some(Parsed::Handover));
    }
    let keep_alive = match version {
        Version::HTTP_10 => connection_has(&headers, "keep-alive"),
        _ => !connection_has(&headers, "close"),
    };
    let te_trailers = list_has(&headers, header::TE, "trailers");
    // The body is filled in by `read_request` once all of it has come.
    let mut req = Request::new(ClientBody::Right(Full::new(Bytes::new())));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    Ok(Some(Parsed::Head(Head {
        req,
        head_len,
        body_len: body_len as usize,
        keep_alive,
        te_trailers,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(raw: &[u8]) -> Result<Option<Parsed>, Reject> {
        parse(raw)
    }

    #[test]
    fn heads_parse_with_their_length_keep_alive_and_te() {
        let raw = b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTE: trailers;q=1\r\n\r\nhello";
        let Ok(Some(Parsed::Head(h))) = parsed(raw) else {
            panic!("not parsed")
        };
        assert_eq!(h.req.method(), Method::POST);
        assert_eq!(h.req.uri().path(), "/v1/chat");
        assert_eq!(h.head_len + h.body_len, raw.len());
        assert_eq!(h.body_len, 5);
        assert!(h.keep_alive);
        assert!(h.te_trailers);

        let Ok(Some(Parsed::Head(h))) = parsed(b"GET / HTTP/1.0\r\n\r\n") else {
            panic!("not parsed")
        };
        assert!(!h.keep_alive);
        let Ok(Some(Parsed::Head(h))) =
            parsed(b"GET / HTTP/1.1\r\nconnection: Keep-Alive, CLOSE\r\n\r\n")
        else {
            panic!("not parsed")
        };
        assert!(!h.keep_alive);
        assert!(matches!(parsed(b"GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None)));
    }

    #[test]
    fn what_the_lean_path_does_not_take_goes_to_hyper() {
        for raw in [
            &b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\ncontent-length: 10\r\nexpect: 100-continue\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 65537\r\n\r\n",
        ] {
            assert!(matches!(parsed(raw), Ok(Some(Parsed::Handover))));
        }
    }

    #[test]
    fn bad_heads_are_rejected_with_a_reason() {
        for (raw, status) in [
            (&b"GET / HTTP/1.1\r\ncontent-length: 1, 2\r\n\r\n"[..], 400),
            (b"GET / HTTP/1.1\r\ncontent-length: -1\r\n\r\n", 400),
            (b"GET /\x01 HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nbad header: x\r\n\r\n", 400),
        ] {
            match parsed(raw) {
                Err((s, why)) => {
                    assert_eq!(s, status, "{}", String::from_utf8_lossy(raw));
                    assert!(!why.is_empty());
                }
                _ => panic!("accepted: {}", String::from_utf8_lossy(raw)),
            }
        }
        // Over 8 KiB, even when it came whole in one read.
        let big = format!("GET / HTTP/1.1\r\nx-big: {}\r\n\r\n", "a".repeat(9000));
        assert!(matches!(parsed(big.as_bytes()), Err((s, _)) if s == 431));
        let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(parsed(raw.as_bytes()), Err((s, _)) if s == 431));
    }

    /// Pieces of request heads, good and bad, for the property test below.
    // Good pieces, then bad ones: `piece` picks a good one 19 times in 20.
    const METHODS: (&[&str], &[&str]) =
        (&["GET", "POST", "HEAD", "OPTIONS"], &["G T", "", "POST\0"]);
    const TARGETS: (&[&str], &[&str]) = (
        &["/", "/v1/chat?x=1", "*", "http://a/b"],
        &["/\x7f", "", "/a b"],
    );
    const VERSIONS: (&[&str], &[&str]) = (
        &["HTTP/1.1", "HTTP/1.0"],
        &["HTTP/2.0", "HTTP/1.1 ", "http/1.1"],
    );
    const NAMES: (&[&str], &[&str]) = (
        &[
            "host",
            "content-length",
            "Content-Length",
            "transfer-encoding",
            "connection",
            "expect",
            "te",
            "x-a",
        ],
        &["bad name", "", "x\u{e9}"],
    );
    const VALUES: (&[&str], &[&str]) = (
        &[
            "x",
            "0",
            "5",
            "65537",
            "1, 1",
            "1, 2",
            "chunked",
            "close",
            "Keep-Alive, CLOSE",
            "100-continue",
            "trailers;q=1",
            "",
            " a\tb ",
        ],
        &["+1", "-1", "99999999999999999999", "\u{7f}", "a\rb"],
    );

    fn piece(
        (good, bad): (&'static [&'static str], &'static [&'static str]),
    ) -> impl proptest::prelude::Strategy<Value = &'static str> {
        proptest::prop_oneof![
            19 => proptest::sample::select(good),
            1 => proptest::sample::select(bad),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]

        /// Whatever a client sends (heads of good and bad pieces, with line ends of either kind,
        /// and random bytes written over any place): parsing answers without panicking; a head it
        /// takes is within the bytes and the limits, and no shorter prefix of it was taken as a
        /// whole head; a refusal is a 4xx with a reason.
        #[test]
        fn any_request_bytes_parse_without_panic_and_within_limits(
            line in (piece(METHODS), piece(TARGETS), piece(VERSIONS)),
            headers in proptest::collection::vec((piece(NAMES), piece(VALUES)), 0..8),
            bare_lf in proptest::prelude::any::<bool>(),
            noise in proptest::option::weighted(0.25, (
                proptest::prelude::any::<proptest::sample::Index>(),
                proptest::collection::vec(proptest::prelude::any::<u8>(), 1..4),
            )),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..8),
        ) {
            let eol = if bare_lf { "\n" } else { "\r\n" };
            let mut text = format!("{} {} {}{eol}", line.0, line.1, line.2);
            for (name, value) in &headers {
                text.push_str(&format!("{name}: {value}{eol}"));
            }
            text.push_str(eol);
            let mut raw = text.into_bytes();
            if let Some((at, bytes)) = noise {
                let at = at.index(raw.len());
                for (i, b) in bytes.into_iter().enumerate() {
                    if let Some(slot) = raw.get_mut(at + i) {
                        *slot = b;
                    }
                }
            }
            raw.extend_from_slice(&body);
            match parsed(&raw) {
                Ok(Some(Parsed::Head(h))) => {
                    proptest::prop_assert!(h.head_len <= raw.len() && h.head_len <= MAX_HEAD);
                    proptest::prop_assert!(h.body_len as u64 <= MAX_BODY);
                    for k in 0..h.head_len {
                        proptest::prop_assert!(
                            matches!(parsed(&raw[..k]), Ok(None)),
                            "prefix of {} bytes of {:?}", k, String::from_utf8_lossy(&raw)
                        );
                    }
                }
                Ok(Some(Parsed::Handover)) | Ok(None) => {}
                Err((status, why)) => {
                    proptest::prop_assert!(status.is_client_error(), "{}", status);
                    proptest::prop_assert!(!why.is_empty());
                }
            }
        }
    }
}
