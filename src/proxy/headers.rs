//! Header hygiene, as nginx and Envoy do it: hop-by-hop headers removed in both directions,
//! `X-Forwarded-*` and `Via` appended on the way up.

use std::net::IpAddr;

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue, OccupiedEntry};
use http::Version;

use super::http1::list_has;

/// Headers that describe one connection and never cross a proxy (RFC 9110 §7.6.1), plus the `Proxy-*` ones.
/// As `HeaderName`s: a `&str` key is parsed and classified again on every lookup (twice per request, for
/// each of the nine).
/// `Connection` first: [`strip_hop_by_hop`] relies on it.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Where `Transfer-Encoding` is in [`HOP_BY_HOP`].
const TRANSFER_ENCODING_AT: usize = 7;

/// Remove hop-by-hop headers and every header named in `Connection`; with `Transfer-Encoding`, also
/// `Content-Length` (RFC 9112 §6.1: the transfer coding frames the message, and an intermediary removes
/// the length before forwarding it, or the next hop would frame the body by the wrong one).
///
/// Returns whether the removed `TE` asked for trailers (when `check_te` is set), so the caller can send
/// `TE: trailers` on to HTTP/2 upstreams, which (like gRPC) rely on it.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap, check_te: bool) -> bool {
    // One pass over the names marks the ones present: most requests have none, and most responses
    // only `Transfer-Encoding`, so nine hashed removals on every message become one or none.
    let mut present = 0u16;
    for n in h.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|x| x == n) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return false;
    }
    // Headers named in Connection (index 0): collected first, removed after.
    if present & 1 != 0 {
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
    }
    let te_trailers = check_te && list_has(h, header::TE, "trailers");
    if present & (1 << TRANSFER_ENCODING_AT) != 0 {
        h.remove(header::CONTENT_LENGTH);
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            h.remove(n);
        }
    }
    te_trailers
}

/// Append `value` to a comma-separated list header, or set it (`insert` replaces every earlier value).
fn append_list(h: &mut HeaderMap, name: HeaderName, value: &str) {
    match h.entry(name) {
        Entry::Occupied(e) => extend_list(e, value),
        Entry::Vacant(e) => {
            if let Ok(v) = HeaderValue::from_str(value) {
                e.insert(v);
            }
        }
    }
}

/// Append `value` to the list the entry holds (its first value; the others go).
fn extend_list(mut e: OccupiedEntry<'_, HeaderValue>, value: &str) {
    let joined = match e.get().to_str() {
        Ok(prev) if !prev.trim().is_empty() => format!("{prev}, {value}"),
        _ => value.to_owned(),
    };
    // From the `String` itself: no second copy.
    if let Ok(v) = HeaderValue::try_from(joined) {
        e.insert(v);
    }
}

/// Set `name` to a static `value` when the request has none (no allocation), else append to its list.
fn append_static(h: &mut HeaderMap, name: HeaderName, value: &'static str) {
    match h.entry(name) {
        Entry::Vacant(e) => {
            e.insert(HeaderValue::from_static(value));
        }
        Entry::Occupied(e) => extend_list(e, value),
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// An IPv4 address in dotted decimal, in `buf` (`Display` goes through `core::fmt` twice per octet).
fn ipv4(ip: std::net::Ipv4Addr, buf: &mut [u8; 15]) -> &str {
    let mut len = 0;
    for (i, o) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            buf[len] = b'.';
            len += 1;
        }
        if o >= 100 {
            buf[len] = b'0' + o / 100;
            len += 1;
        }
        if o >= 10 {
            buf[len] = b'0' + o / 10 % 10;
            len += 1;
        }
        buf[len] = b'0' + o % 10;
        len += 1;
    }
    std::str::from_utf8(&buf[..len]).unwrap_or("")
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
    match f.client_ip {
        IpAddr::V4(ip) => append_list(h, X_FORWARDED_FOR, ipv4(ip, &mut [0; 15])),
        IpAddr::V6(ip) => append_list(h, X_FORWARDED_FOR, &ip.to_string()),
    }
    append_static(h, X_FORWARDED_PROTO, f.proto);
    if let Some(host) = f.host {
        append_list(h, X_FORWARDED_HOST, host);
    }
    let via = match f.version {
        Version::HTTP_09 => "0.9 streamgate",
        Version::HTTP_10 => "1.0 streamgate",
        Version::HTTP_2 => "2 streamgate",
        Version::HTTP_3 => "3 streamgate",
        _ => "1.1 streamgate",
    };
    append_static(h, header::VIA, via);
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
        // The transfer coding frames the message: its length goes with it, and only then.
        let mut h3 = HeaderMap::new();
        h3.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h3.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        strip_hop_by_hop(&mut h3, false);
        assert!(h3.is_empty(), "{h3:?}");
        let mut h4 = HeaderMap::new();
        h4.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h4.insert(header::CONNECTION, HeaderValue::from_static("close"));
        strip_hop_by_hop(&mut h4, false);
        assert_eq!(h4.get(header::CONTENT_LENGTH).unwrap(), "3");
        assert_eq!(HOP_BY_HOP[TRANSFER_ENCODING_AT], header::TRANSFER_ENCODING);
    }

    #[test]
    fn ipv4_addresses_print_as_display_does() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.200.9.99",
            "255.255.255.255",
            "1.10.100.101",
        ] {
            let ip: std::net::Ipv4Addr = ip.parse().unwrap();
            assert_eq!(ipv4(ip, &mut [0; 15]), ip.to_string());
        }
        for n in (0..=u32::MAX).step_by(65_521) {
            let ip = std::net::Ipv4Addr::from(n);
            assert_eq!(ipv4(ip, &mut [0; 15]), ip.to_string());
        }
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

        // None before: set, from static values where they are static.
        let mut h = HeaderMap::new();
        add_forwarding(
            &mut h,
            &Forwarded {
                client_ip: "::1".parse().unwrap(),
                proto: "http",
                host: None,
                version: Version::HTTP_11,
            },
        );
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(!h.contains_key("x-forwarded-host"));
        assert_eq!(h[header::VIA], "1.1 streamgate");
        // A repeated header: the first value is kept and extended, the others go (as before).
        let mut h = HeaderMap::new();
        h.append(header::VIA, HeaderValue::from_static("1.0 a"));
        h.append(header::VIA, HeaderValue::from_static("1.1 b"));
        append_static(&mut h, header::VIA, "1.1 streamgate");
        assert_eq!(h.get_all(header::VIA).iter().count(), 1);
        assert_eq!(h[header::VIA], "1.0 a, 1.1 streamgate");
    }
}
