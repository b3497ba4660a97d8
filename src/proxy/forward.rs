//! The innermost service of the proxy: pick an endpoint, rewrite the request, send it, fail over while
//! nothing has reached the client, and hand back the upstream's streamed body.
//!
//! Failover (idempotency rules): an attempt that could not *connect* never sent anything, so the request
//! goes to the next endpoint whatever its method, as long as the body has not been read (a refused
//! connection never reads it). An attempt that connected and then failed before response headers is
//! retried only for idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE, TRACE) with no body, as nginx's
//! `proxy_next_upstream` does: an LLM `POST` may already be generating. Attempts are bounded by the
//! pool's `max_attempts` (one per endpoint at most). Once response headers arrive there is no retry.
//!
//! Plain-HTTP HTTP/1.1 endpoints are reached with the lean client of [`super::h1`] (the body is read in
//! the task that forwards it; a pooled connection found closed is not an attempt, the client resends
//! on a fresh one); TLS and HTTP/2 endpoints with hyper-util's pooled client.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::uri::{PathAndQuery, Uri};
use http::{header, HeaderValue, Method, Request, Response, Version};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use http_body_util::Either;

use super::body::{ClientBody, ProxyBody, UpstreamRequestBody};
use super::config::{HostHeader, RouteConfig, UpstreamProtocol};
use super::error::{ProxyError, ProxyErrorKind};
use super::h1::SendError;
use super::headers::{add_forwarding, strip_hop_by_hop, Forwarded};
use super::pool::{ActiveGuard, Pool};
use crate::StreamInfo;

/// Facts about the client connection, put in the request extensions by the server.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The client's address.
    pub remote: SocketAddr,
    /// The local address the client connected to.
    pub local: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// State shared by every route's forwarding service.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Capacity: one permit per open stream.
    pub(crate) streams: Arc<Semaphore>,
    pub(crate) max_streams: usize,
    /// Fired when the drain timeout passes during shutdown: open streams end with `shutdown`.
    pub(crate) drain_deadline: Arc<super::drain::DrainDeadline>,
    /// Cancelled when shutdown starts: new requests get 503.
    pub(crate) shutting_down: CancellationToken,
    /// Upstream error counter by endpoint, when metrics are on.
    pub(crate) metrics: Option<crate::trace::StreamMetrics>,
}

/// A route's runtime: its settings and pool.
#[derive(Debug)]
pub(crate) struct RouteRuntime {
    pub(crate) cfg: RouteConfig,
    pub(crate) pool: Arc<Pool>,
}

/// Forwards a request to the route's pool. `route: None` answers 404.
#[derive(Debug, Clone)]
pub(crate) struct Forward {
    pub(crate) shared: Arc<Shared>,
    pub(crate) route: Option<Arc<RouteRuntime>>,
}

type BoxFuture =
    Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, std::convert::Infallible>> + Send>>;

impl tower::Service<Request<ClientBody>> for Forward {
    type Response = Response<ProxyBody>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ClientBody>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            Ok(match this.forward(req).await {
                Ok(r) => r,
                Err(e) => e.into_response(),
            })
        })
    }
}

/// What is wrong with the request's `Host`, if anything (RFC 9112 §3.2, as nginx checks it): a 400
/// for an HTTP/1.1 request without one (unless its target is in absolute form), for more than one,
/// and for a value that is not a host and port. Routing and `X-Forwarded-Host` read it, and an
/// upstream could read a second one that the proxy did not.
fn host_problem<B>(req: &Request<B>) -> Option<&'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let Some(host) = hosts.next() else {
        return (req.version() == http::Version::HTTP_11 && req.uri().authority().is_none())
            .then_some("an HTTP/1.1 request needs a Host header");
    };
    if hosts.next().is_some() {
        return Some("the request has more than one Host header");
    }
    // Empty is allowed: it is what a client sends when the target has no authority.
    (!host.is_empty() && !valid_host(host.as_bytes()))
        .then_some("the request's Host header is not a valid host and port")
}

/// Whether `h` is `uri-host [ ":" port ]` (RFC 9110 §7.2): a bracketed IP literal or a registered
/// name (unreserved, sub-delims and `%`), then a port of at most five digits. Checked by hand: the
/// `Authority` parser copies the value into a new allocation, on every request.
fn valid_host(h: &[u8]) -> bool {
    let (host, port) = match h.iter().rposition(|&b| b == b':') {
        // A colon inside brackets belongs to an IPv6 literal, not to a port.
        Some(i) if !h[i..].contains(&b']') => (&h[..i], Some(&h[i + 1..])),
        _ => (h, None),
    };
    let port_ok = port.is_none_or(|p| {
        p.len() <= 5 && p.iter().all(u8::is_ascii_digit) && {
            let n = p.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
            n <= 65_535
        }
    });
    let host_ok = match host {
        [b'[', literal @ .., b']'] => {
            !literal.is_empty()
                && literal
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        }
        _ => {
            // A `%` starts a percent-encoded byte: two hex digits follow.
            let pct_ok = host.iter().enumerate().all(|(i, &b)| {
                b != b'%'
                    || host
                        .get(i + 1..i + 3)
                        .is_some_and(|d| d.iter().all(u8::is_ascii_hexdigit))
            });
            !host.is_empty()
                && pct_ok
                && host.iter().all(|&b| {
                    b.is_ascii_alphanumeric()
                        || matches!(
                            b,
                            b'-' | b'.'
                                | b'_'
                                | b'~'
                                | b'%'
                                | b'!'
                                | b'$'
                                | b'&'
                                | b'\''
                                | b'('
                                | b')'
                                | b'*'
                                | b'+'
                                | b','
                                | b';'
                                | b'='
                        )
                })
        }
    };
    host_ok && port_ok
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

impl Forward {
    async fn forward(
        self,
        mut req: Request<ClientBody>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::new(
                ProxyErrorKind::MethodNotAllowed,
                "CONNECT is not supported: streamgate is a reverse proxy",
            ));
        }
        if let Some(why) = host_problem(&req) {
            return Err(ProxyError::new(ProxyErrorKind::BadRequest, why));
        }
        let Some(route) = self.route.clone() else {
            return Err(ProxyError::new(
                ProxyErrorKind::NoRoute,
                format!("no route for {}", req.uri().path()),
            ));
        };
        if self.shared.shutting_down.is_cancelled() {
            return Err(ProxyError::new(
                ProxyErrorKind::ShuttingDown,
                "the proxy is shutting down",
            ));
        }
        let permit = match self.shared.streams.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                return Err(ProxyError::new(
                    ProxyErrorKind::OverCapacity,
                    format!(
                        "the proxy is at its limit of {} open streams",
                        self.shared.max_streams
                    ),
                ))
            }
        };
        let info = StreamInfo::get_or_insert(&mut req);
        let conn = req.extensions().get::<ConnInfo>().copied();
        let pool = &route.pool;

        let (parts, body) = req.into_parts();
        let client_host = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            });
        let mut headers = parts.headers;
        // HTTP/2 upstreams (and gRPC) need `TE: trailers`; HTTP/1.1 ones get no TE at all.
        let te_trailers = strip_hop_by_hop(&mut headers, true);
        if let Some(c) = conn {
            add_forwarding(
                &mut headers,
                &Forwarded {
                    client_ip: c.remote.ip(),
                    proto: if c.tls { "https" } else { "http" },
                    host: client_host.as_deref(),
                    version: parts.version,
                },
            );
        }
        match &route.cfg.host_header {
            HostHeader::Upstream => {
                headers.remove(header::HOST);
            }
            HostHeader::Preserve => {
                if let Some(h) = client_host
                    .as_deref()
                    .and_then(|h| HeaderValue::from_str(h).ok())
                {
                    headers.insert(header::HOST, h);
                }
            }
            HostHeader::Fixed(v) => {
                headers.insert(header::HOST, v.clone());
            }
        }
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let method = parts.method;
        let idempotent = is_idempotent(&method);
        // The client request's extensions (connection facts, tokens) ride on the first upstream
        // request, whose parts the lean client frees once its head is written: dropped at the end of
        // this function instead, they would cost about 1,300 instructions between the upstream
        // response head and its relay.
        let mut extensions = parts.extensions;

        let first_body = UpstreamRequestBody::new(body);
        let replay = first_body.replay_handle();
        let mut next_body = Some(first_body);
        let mut tried: Vec<usize> = Vec::with_capacity(pool.max_attempts());
        let mut last_connect_error: Option<String> = None;
        loop {
            let i = match pool.pick(&tried) {
                Ok(i) => i,
                Err(no) => {
                    return Err(match last_connect_error {
                        Some(e) => ProxyError::new(ProxyErrorKind::UpstreamUnreachable, e),
                        None => {
                            let e = ProxyError::new(
                                ProxyErrorKind::NoHealthyUpstream,
                                format!("no healthy endpoint in pool `{}`", pool.cfg.name),
                            );
                            match no.retry_after {
                                Some(d) => e.retry_after(d),
                                None => e,
                            }
                        }
                    })
                }
            };
            tried.push(i);
            let ep = pool.endpoints[i].clone();
            let Some(body) = next_body.take() else {
                break;
            };
            let uri = Uri::builder()
                .scheme(ep.cfg.scheme.clone())
                .authority(ep.cfg.authority.clone())
                .path_and_query(path.clone())
                .build()
                .map_err(|e| {
                    ProxyError::new(
                        ProxyErrorKind::BadRequest,
                        format!("cannot build upstream URI: {e}"),
                    )
                })?;
            let mut up = Request::new(body);
            *up.method_mut() = method.clone();
            *up.uri_mut() = uri;
            *up.version_mut() = Version::HTTP_11;
            *up.extensions_mut() = std::mem::take(&mut extensions);
            // The last attempt allowed takes the headers; earlier ones copy them for a retry (a copy
            // costs the map's two allocations plus one per header value on this path).
            *up.headers_mut() = if tried.len() >= pool.max_attempts() {
                std::mem::take(&mut headers)
            } else {
                headers.clone()
            };
            let h2 = match pool.cfg.protocol {
                UpstreamProtocol::Http2 => true,
                UpstreamProtocol::Http1 => false,
                UpstreamProtocol::Auto => ep.cfg.scheme == http::uri::Scheme::HTTPS,
            };
            if te_trailers && h2 {
                up.headers_mut()
                    .insert(header::TE, HeaderValue::from_static("trailers"));
            }
            crate::trace::record_upstream(&ep.label);
            crate::trace::inject_context(up.headers_mut());
            let active = ActiveGuard::new(ep.clone());
            let sent = match &ep.h1 {
                Some(h1) => h1
                    .send(up)
                    .await
                    .map(|r| r.map(Either::Right))
                    .map_err(AttemptError::H1),
                None => pool
                    .client
                    .request(up)
                    .await
                    .map(|r| r.map(Either::Left))
                    .map_err(AttemptError::Hyper),
            };
            match sent {
                Ok(resp) => {
                    pool.succeeded(i);
                    let (mut parts, body) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers, false);
                    let body = ProxyBody::upstream(
                        body,
                        info,
                        self.shared.drain_deadline.watch(),
                        permit,
                        active,
                        self.shared.metrics.clone(),
                    );
                    return Ok(Response::from_parts(parts, body));
                }
                Err(e) => {
                    drop(active);
                    if let Some(why) = replay.client_failed() {
                        // The client's body broke the attempt: its framing was bad, or the client
                        // left in the middle of it. The upstream is not at fault, and a retry
                        // would send the same bytes.
                        tracing::info!(endpoint = %ep.label, source = "client", "the request body could not be read: {why}");
                        return Err(ProxyError::new(
                            ProxyErrorKind::BadRequest,
                            format!("the request body could not be read: {why}"),
                        ));
                    }
                    if let Some(m) = &self.shared.metrics {
                        m.upstream_error(&ep.label);
                    }
                    let connect = e.is_connect();
                    let detail = e.detail();
                    if connect {
                        pool.connect_failed(i);
                        tracing::warn!(endpoint = %ep.label, source = "upstream", "cannot connect: {detail}");
                        last_connect_error =
                            Some(format!("cannot connect to {}: {detail}", ep.label));
                    } else {
                        tracing::warn!(endpoint = %ep.label, source = "upstream", "upstream failed before response headers: {detail}");
                    }
                    let may_retry = tried.len() < pool.max_attempts()
                        && (connect || (idempotent && replay.is_empty()));
                    next_body = if may_retry { replay.body() } else { None };
                    if next_body.is_none() {
                        return Err(if connect {
                            ProxyError::new(
                                ProxyErrorKind::UpstreamUnreachable,
                                format!("cannot connect to {}: {detail}", ep.label),
                            )
                        } else {
                            ProxyError::new(
                                ProxyErrorKind::UpstreamError,
                                format!(
                                    "{} failed before sending response headers: {detail}",
                                    ep.label
                                ),
                            )
                        });
                    }
                }
            }
        }
        Err(ProxyError::new(
            ProxyErrorKind::UpstreamError,
            "no attempt left",
        ))
    }
}

/// The error and its sources, joined: hyper-util's outer error alone says little ("client error (Connect)").
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Why one attempt got no response headers.
#[derive(Debug)]
enum AttemptError {
    Hyper(hyper_util::client::legacy::Error),
    H1(SendError),
}

impl AttemptError {
    /// Nothing was sent: the connection could not be made.
    fn is_connect(&self) -> bool {
        match self {
            AttemptError::Hyper(e) => e.is_connect(),
            AttemptError::H1(e) => matches!(e, SendError::Connect(_)),
        }
    }

    fn detail(&self) -> String {
        match self {
            AttemptError::Hyper(e) => error_chain(e),
            AttemptError::H1(e) => e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::valid_host;

    #[test]
    fn hosts_are_a_name_or_an_ip_literal_then_a_port() {
        for good in [
            "a",
            "example.com",
            "example.com.",
            "example.com:443",
            "127.0.0.1",
            "127.0.0.1:8080",
            "[::1]",
            "[::1]:8080",
            "[2001:db8::7]:0",
            "xn--bcher-kva.example",
            "a_b-c~d",
            "a%2Db",
            "a:",
            "a:65535",
        ] {
            assert!(valid_host(good.as_bytes()), "{good:?}");
        }
        for bad in [
            "a b",
            "user@a",
            "a:port",
            "a:65536",
            "a:123456",
            ":80",
            "[::1",
            "::1]",
            "[]",
            "[::1]x",
            "[zz]",
            "a/b",
            "a?b",
            "a#b",
            "a\"b",
            "\u{e9}.example",
            "a:8080:1",
            "a%zz",
            "a%2",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?}");
        }
    }
}
