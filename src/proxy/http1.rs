//! HTTP/1.1 pieces the lean client ([`super::h1`]) and the lean server ([`super::downstream`]) share:
//! `Content-Length` and list-header checks, header maps from `httparse`, chunk-size lines.

use http::{header, HeaderMap, HeaderName, HeaderValue};

/// The `content-length` of `h`, if it has one that is valid (every value, comma lists included, the
/// same number).
pub(crate) fn content_length(h: &HeaderMap) -> Option<u64> {
    let mut found = None;
    for v in h.get_all(header::CONTENT_LENGTH) {
        for part in v.to_str().ok()?.split(',') {
            let n: u64 = parse_digits(part.trim().as_bytes())?;
            if found.is_some_and(|f| f != n) {
                return None;
            }
            found = Some(n);
        }
    }
    found
}

pub(crate) fn parse_digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// Whether a `Connection` header lists `token`.
pub(crate) fn connection_has(h: &HeaderMap, token: &str) -> bool {
    list_has(h, header::CONNECTION, token)
}

/// Whether the comma-separated list header `name` has `token` (parameters after `;` ignored).
pub(crate) fn list_has(h: &HeaderMap, name: HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',').any(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case(token))
            })
        })
    })
}

/// The chunk-size line for `len` bytes, in `buf`.
pub(crate) fn chunk_size_line(buf: &mut [u8; 18], len: usize) -> &[u8] {
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, b) in buf.iter_mut().take(digits).enumerate() {
        *b = b"0123456789abcdef"[(len >> (4 * (digits - 1 - i))) & 0xf];
    }
    buf[digits] = b'\r';
    buf[digits + 1] = b'\n';
    &buf[..digits + 2]
}

/// A header line `httparse` accepted that `http` does not.
#[derive(Debug)]
pub(crate) enum BadHeader {
    /// The name, lossily decoded.
    Name(String),
    /// The value of this header.
    Value(HeaderName),
}

impl std::fmt::Display for BadHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadHeader::Name(n) => write!(f, "invalid header name {n:?}"),
            BadHeader::Value(n) => write!(f, "invalid value of header {n}"),
        }
    }
}

/// The header lines of a parsed head as a `HeaderMap`, in order, with room for `spare` more (the
/// headers the proxy adds), so that adding them does not grow the map.
pub(crate) fn header_map(
    lines: &[httparse::Header<'_>],
    spare: usize,
) -> Result<HeaderMap, BadHeader> {
    let mut headers = HeaderMap::with_capacity(lines.len() + spare);
    for h in lines {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| BadHeader::Name(h.name.to_owned()))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| BadHeader::Value(name.clone()))?;
        headers.append(name, value);
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_lines_are_lowercase_hex() {
        let mut b = [0u8; 18];
        for (n, want) in [
            (0usize, "0"),
            (1, "1"),
            (15, "f"),
            (16, "10"),
            (255, "ff"),
            (4096, "1000"),
            (usize::MAX, "ffffffffffffffff"),
        ] {
            assert_eq!(chunk_size_line(&mut b, n), format!("{want}\r\n").as_bytes());
        }
    }

    #[test]
    fn content_length_values_must_agree() {
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("7"));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("7, 7"));
        assert_eq!(content_length(&h), Some(7));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("8"));
        assert_eq!(content_length(&h), None);
    }
}
