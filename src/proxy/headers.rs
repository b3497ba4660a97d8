//! Header hygiene, as nginx and Envoy do it: hop-by-hop headers removed in both directions,
//! `X-Forwarded-*` and `Via` appended on the way up.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

use super::http1::list_has;

/// Headers that describe one connection and never cross a proxy (RFC 9110 §7.6.1), plus the `Proxy-*` ones.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Remove hop-by-hop headers and every header named in `Connection`.
///
/// Returns whether the removed `TE` asked for trailers (when `check_te` is set), so the caller can send
/// `TE: trailers` on to HTTP/2 upstreams, which (like gRPC) rely on it.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap, check_te: bool) -> bool {
    // Headers named in Connection: collected first, removed after (no allocation when there is none).
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    let te_trailers = check_te && list_has(h, header::TE, "trailers");
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    te_trailers
}

/// Append `value` to a comma-separated list header, or set it.
fn append_list(h: &mut HeaderMap, name: HeaderName, value: &str) {
    let joined = match h.get(&name).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {value}"),
        _ => value.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&joined) {
        h.remove(&name);
        h.insert(name, v);
    }
}

/// What the forwarding headers describe about the client's request.
#[derive(Debug)]
pub(crate) struct Forwarded<'a> {
    pub(crate) client_ip: IpAddr,
    pub(crate) proto: &'static str,
    pub(crate) host: Option<&'a str>,
    pub(crate) version: Version,
}

/// Append `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and `Via`.
pub(crate) fn add_forwarding(h: &mut HeaderMap, f: &Forwarded<'_>) {
    append_list(
        h,
        HeaderName::from_static("x-forwarded-for"),
        &f.client_ip.to_string(),
    );
    append_list(h, HeaderName::from_static("x-forwarded-proto"), f.proto);
    if let Some(host) = f.host {
        append_list(h, HeaderName::from_static("x-forwarded-host"), host);
    }
    let v = match f.version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    };
    append_list(h, header::VIA, &format!("{v} streamgate"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        assert!(strip_hop_by_hop(&mut h, true));
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept"]);
        let mut h2 = HeaderMap::new();
        h2.insert(header::TE, HeaderValue::from_static("gzip"));
        assert!(!strip_hop_by_hop(&mut h2, true));
        assert!(h2.is_empty());
    }

    #[test]
    fn forwarding_headers_append() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert(header::VIA, HeaderValue::from_static("1.1 edge"));
        add_forwarding(
            &mut h,
            &Forwarded {
                client_ip: "127.0.0.1".parse().unwrap(),
                proto: "https",
                host: Some("api.example.com"),
                version: Version::HTTP_2,
            },
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert_eq!(h[header::VIA], "1.1 edge, 2 streamgate");
    }
}
