//! Upstream pools: endpoints, balancing, passive and active health, one pooled client per pool (hyper's,
//! for TLS and HTTP/2 endpoints and health checks) and the lean HTTP/1.1 client's idle connections per
//! plain-HTTP endpoint.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use super::body::UpstreamRequestBody;
use super::config::{Balance, EndpointConfig, PoolConfig, UpstreamProtocol};

/// The HTTP client used to reach one pool.
pub(crate) type UpstreamClient = Client<HttpsConnector<Tcp>, UpstreamRequestBody>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The TCP half of the upstream connector: the addresses of the endpoint's name in turn, each under
/// its own `connect_timeout`, as nginx tries an upstream's addresses with `proxy_connect_timeout`
/// each.
///
/// hyper-util's `HttpConnector` does this with timers of its own (its connect timeout, and its
/// Happy Eyeballs fallback delay), made inside the connect future, on the serving runtime: that
/// runtime has no time driver when timers run on their own thread ([`crate::timers`]). Here it is
/// given one address at a time, which needs neither, and the timeout is made on
/// [`crate::timers`]. The TLS handshake that follows for `https` is bounded by the first-byte
/// timeout, as the rest of the request is.
#[derive(Clone, Debug)]
pub(crate) struct Tcp {
    http: HttpConnector,
    timeout: Duration,
}

/// Connects to the addresses `target` (`host:port`) resolves to, in turn, each under its own `limit` (made on
/// [`crate::timers`]), as nginx does with `proxy_connect_timeout`: the first that connects wins;
/// else the last failure, prefixed with its address. Both upstream clients connect through it.
pub(crate) async fn connect_in_turn<T, F, Fut>(
    target: &str,
    limit: Duration,
    mut connect: F,
) -> std::io::Result<T>
where
    F: FnMut(std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    use std::io::{Error, ErrorKind};
    let addrs = tokio::net::lookup_host(target)
        .await
        .map_err(|e| Error::new(e.kind(), format!("cannot resolve {target}: {e}")))?;
    let mut last = None;
    for addr in addrs {
        last = Some(match crate::timers::timeout(limit, connect(addr)).await {
            Ok(Ok(io)) => return Ok(io),
            Ok(Err(e)) => Error::new(e.kind(), format!("{addr}: {e}")),
            Err(_) => Error::new(
                ErrorKind::TimedOut,
                format!("{addr}: no connection within {limit:?}"),
            ),
        });
    }
    Err(last.unwrap_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("{target} resolved to no address"),
        )
    }))
}

impl tower::Service<http::Uri> for Tcp {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        use tower::ServiceExt;
        let http = self.http.clone();
        let limit = self.timeout;
        Box::pin(async move {
            // An IPv6 literal keeps its brackets: `[::1]:443` parses as one address.
            let host = uri.host().ok_or("the upstream URI has no host")?;
            let port =
                uri.port_u16()
                    .unwrap_or(if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
                        443
                    } else {
                        80
                    });
            let io = connect_in_turn(&format!("{host}:{port}"), limit, |addr| {
                let http = http.clone();
                async move {
                    let one = http::Uri::builder()
                        .scheme("http")
                        .authority(addr.to_string())
                        .path_and_query("/")
                        .build()
                        .map_err(std::io::Error::other)?;
                    http.oneshot(one)
                        .await
                        .map_err(|e| std::io::Error::other(super::forward::error_chain(&e)))
                }
            })
            .await?;
            Ok(io)
        })
    }
}

/// Longest back-off multiplier for an endpoint ejected again and again.
const MAX_BACKOFF_SHIFT: u32 = 4;

/// One upstream endpoint and its live state.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) cfg: EndpointConfig,
    /// `scheme://host:port`, for logs, spans and metric labels.
    pub(crate) label: String,
    active: AtomicUsize,
    fails: AtomicU32,
    ejections: AtomicU32,
    /// Nanoseconds since the pool's epoch until which the endpoint is ejected; 0 when it is not.
    ejected_until: AtomicU64,
    /// Verdict of the active health check (true when there is none).
    healthy: AtomicBool,
    hc_fails: AtomicU32,
    hc_passes: AtomicU32,
    /// The lean HTTP/1.1 client's connections, for a plain-HTTP endpoint spoken to in HTTP/1.1; `None`
    /// for TLS and HTTP/2 endpoints (hyper's client).
    pub(crate) h1: Option<Arc<super::h1::H1Endpoint>>,
}

impl Endpoint {
    /// Open streams to this endpoint.
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// Counts a stream as open on an endpoint until dropped.
#[derive(Debug)]
pub(crate) struct ActiveGuard(Arc<Endpoint>);

impl ActiveGuard {
    pub(crate) fn new(ep: Arc<Endpoint>) -> Self {
        ep.active.fetch_add(1, Ordering::Relaxed);
        Self(ep)
    }
}

impl ActiveGuard {
    /// The endpoint's label.
    pub(crate) fn label(&self) -> &str {
        &self.0.label
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why no endpoint could be picked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NoEndpoint {
    /// When the soonest ejected endpoint comes back, if any is only ejected (not failing health checks).
    pub(crate) retry_after: Option<Duration>,
}

/// A pool of endpoints serving the same upstream.
#[derive(Debug)]
pub(crate) struct Pool {
    pub(crate) cfg: PoolConfig,
    pub(crate) endpoints: Vec<Arc<Endpoint>>,
    pub(crate) client: UpstreamClient,
    rr: AtomicUsize,
    epoch: Instant,
}

impl Pool {
    /// Build the pool and its client. Fails only on an unreadable CA file.
    pub(crate) fn new(cfg: PoolConfig) -> Result<Self, String> {
        let client = build_client(&cfg)?;
        let endpoints = cfg
            .endpoints
            .iter()
            .map(|e| {
                Arc::new(Endpoint {
                    label: e.to_string(),
                    cfg: e.clone(),
                    active: AtomicUsize::new(0),
                    fails: AtomicU32::new(0),
                    ejections: AtomicU32::new(0),
                    ejected_until: AtomicU64::new(0),
                    healthy: AtomicBool::new(true),
                    hc_fails: AtomicU32::new(0),
                    hc_passes: AtomicU32::new(0),
                    h1: (e.scheme == http::uri::Scheme::HTTP
                        && cfg.protocol != UpstreamProtocol::Http2)
                        .then(|| {
                            Arc::new(super::h1::H1Endpoint::new(
                                &e.authority,
                                cfg.connect_timeout,
                            ))
                        }),
                })
            })
            .collect();
        Ok(Self {
            cfg,
            endpoints,
            client,
            rr: AtomicUsize::new(0),
            epoch: Instant::now(),
        })
    }

    fn now_nanos(&self) -> u64 {
        // +1 so that "now" is never the 0 that means "not ejected".
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    /// Attempts a request may make: the configured bound, at most one per endpoint.
    pub(crate) fn max_attempts(&self) -> usize {
        (self.cfg.max_attempts as usize)
            .min(self.endpoints.len())
            .max(1)
    }

    /// Pick an endpoint not in `tried` (indices), by the pool's policy, skipping ejected and unhealthy ones.
    pub(crate) fn pick(&self, tried: &[usize]) -> Result<usize, NoEndpoint> {
        let n = self.endpoints.len();
        let now = self.now_nanos();
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(usize, usize)> = None;
        let mut soonest: Option<u64> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if tried.contains(&i) {
                continue;
            }
            let ep = &self.endpoints[i];
            if !ep.healthy.load(Ordering::Relaxed) {
                continue;
            }
            let until = ep.ejected_until.load(Ordering::Relaxed);
            if until > now {
                soonest = Some(soonest.map_or(until, |s: u64| s.min(until)));
                continue;
            }
            match self.cfg.balance {
                Balance::RoundRobin => return Ok(i),
                Balance::LeastStreams => {
                    let a = ep.active();
                    if best.is_none_or(|(_, b)| a < b) {
                        best = Some((i, a));
                    }
                }
            }
        }
        best.map(|(i, _)| i).ok_or(NoEndpoint {
            retry_after: soonest.map(|u| Duration::from_nanos(u - now)),
        })
    }

    /// Record a connection failure; ejects the endpoint after `max_fails` in a row, with a doubling back-off.
    pub(crate) fn connect_failed(&self, i: usize) {
        let ep = &self.endpoints[i];
        let fails = ep.fails.fetch_add(1, Ordering::Relaxed) + 1;
        if fails >= self.cfg.max_fails {
            ep.fails.store(0, Ordering::Relaxed);
            let n = ep.ejections.fetch_add(1, Ordering::Relaxed);
            let backoff = self.cfg.ejection_time * (1u32 << n.min(MAX_BACKOFF_SHIFT));
            ep.ejected_until.store(
                self.now_nanos() + backoff.as_nanos() as u64,
                Ordering::Relaxed,
            );
            tracing::warn!(
                endpoint = %ep.label,
                pool = %self.cfg.name,
                backoff_ms = backoff.as_millis() as u64,
                source = "upstream",
                "endpoint ejected after {fails} connection failures in a row"
            );
        }
    }

    /// Record a success (response headers received): clears failure and ejection history.
    pub(crate) fn succeeded(&self, i: usize) {
        let ep = &self.endpoints[i];
        if ep.fails.load(Ordering::Relaxed) != 0 {
            ep.fails.store(0, Ordering::Relaxed);
        }
        if ep.ejections.load(Ordering::Relaxed) != 0 {
            ep.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// Run the active health check until `stop` fires (no-op when the pool has none).
    pub(crate) async fn health_check_loop(self: Arc<Self>, stop: CancellationToken) {
        let Some(hc) = self.cfg.health_check.clone() else {
            return;
        };
        let mut tick = crate::timers::interval(hc.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            for ep in &self.endpoints {
                let uri = format!("{}{}", ep.label, hc.path);
                let req = http::Request::get(uri)
                    .header(http::header::USER_AGENT, "streamgate-health-check")
                    .body(UpstreamRequestBody::empty());
                let ok = match req {
                    Ok(req) => matches!(
                        crate::timers::timeout(hc.timeout, self.client.request(req)).await,
                        Ok(Ok(resp)) if resp.status().is_success()
                    ),
                    Err(_) => false,
                };
                let was = ep.healthy.load(Ordering::Relaxed);
                if ok {
                    ep.hc_fails.store(0, Ordering::Relaxed);
                    let p = ep.hc_passes.fetch_add(1, Ordering::Relaxed) + 1;
                    if !was && p >= hc.healthy_threshold {
                        ep.healthy.store(true, Ordering::Relaxed);
                        tracing::info!(endpoint = %ep.label, "endpoint healthy again");
                    }
                } else {
                    ep.hc_passes.store(0, Ordering::Relaxed);
                    let f = ep.hc_fails.fetch_add(1, Ordering::Relaxed) + 1;
                    if was && f >= hc.unhealthy_threshold {
                        ep.healthy.store(false, Ordering::Relaxed);
                        tracing::warn!(endpoint = %ep.label, source = "upstream", "endpoint failed {f} health checks; taken out of rotation");
                    }
                }
            }
        }
    }
}

fn build_client(cfg: &PoolConfig) -> Result<UpstreamClient, String> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    // Both would be timers made on the serving runtime: `Tcp` times each address instead.
    http.set_connect_timeout(None);
    http.set_happy_eyeballs_timeout(None);
    http.set_keepalive(Some(Duration::from_secs(60)));

    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = &cfg.ca_file {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let certs = CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("pools.{}.ca_file {}: {e}", cfg.name, ca.display()))?;
        for c in certs {
            let c = c.map_err(|e| format!("pools.{}.ca_file {}: {e}", cfg.name, ca.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("pools.{}.ca_file {}: {e}", cfg.name, ca.display()))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let tcp = Tcp {
        http,
        timeout: cfg.connect_timeout,
    };
    let connector = match cfg.protocol {
        UpstreamProtocol::Http1 => builder.enable_http1().wrap_connector(tcp),
        UpstreamProtocol::Http2 => builder.enable_http2().wrap_connector(tcp),
        UpstreamProtocol::Auto => builder.enable_all_versions().wrap_connector(tcp),
    };
    let mut b = Client::builder(TokioExecutor::new());
    b.timer(crate::timers::HyperTimer)
        .pool_timer(crate::timers::HyperTimer)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .set_host(true)
        .http2_keep_alive_interval(Some(Duration::from_secs(30)))
        .http2_keep_alive_while_idle(false)
        // All streams to an HTTP/2 endpoint share one connection, and what a client has not read
        // yet counts against both its stream's window and the connection's. With hyper's defaults
        // (2 MB per stream, 5 MB per connection) three clients that stopped reading stalled every
        // other stream on the connection. A stream may now hold `h2_stream_window_kib` unread
        // (64 KiB by default, the protocol's default), and the connection 256 of them: it takes
        // 256 stalled streams at once to hold the others back, and one that stalls holds no more
        // than its window of the proxy's memory. The price is bulk throughput per stream: with
        // 64 KiB, 630–660 MB/s through the proxy on loopback where the defaults gave 1.3–1.4 GB/s,
        // about 640 KB/s at 100 ms of round trip; a token stream is far slower than either.
        .http2_initial_stream_window_size(cfg.h2_stream_window_kib * 1024)
        .http2_initial_connection_window_size(
            (cfg.h2_stream_window_kib.saturating_mul(256 * 1024)).min(i32::MAX as u32),
        );
    if cfg.protocol == UpstreamProtocol::Http2 {
        b.http2_only(true);
    }
    Ok(b.build(connector))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::config::parse_endpoint;

    fn pool(balance: Balance, n: usize) -> Pool {
        let endpoints = (0..n)
            .map(|i| parse_endpoint("k", &format!("http://127.0.0.1:{}", 9000 + i)).unwrap())
            .collect();
        Pool::new(PoolConfig {
            name: "p".into(),
            endpoints,
            balance,
            protocol: UpstreamProtocol::Auto,
            ca_file: None,
            connect_timeout: Duration::from_secs(1),
            max_fails: 2,
            ejection_time: Duration::from_secs(10),
            max_attempts: 3,
            health_check: None,
            h2_stream_window_kib: 64,
        })
        .unwrap()
    }

    #[test]
    fn round_robin_cycles_and_skips_tried() {
        let p = pool(Balance::RoundRobin, 3);
        let picks: Vec<usize> = (0..6).map(|_| p.pick(&[]).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        assert_eq!(p.pick(&[0, 1]).unwrap(), 2);
        assert!(p.pick(&[0, 1, 2]).is_err());
    }

    #[test]
    fn least_streams_prefers_the_idlest() {
        let p = pool(Balance::LeastStreams, 3);
        let _a = ActiveGuard::new(p.endpoints[0].clone());
        let _b = ActiveGuard::new(p.endpoints[0].clone());
        let _c = ActiveGuard::new(p.endpoints[2].clone());
        for _ in 0..5 {
            assert_eq!(p.pick(&[]).unwrap(), 1);
        }
        drop(_c);
        let picks: Vec<usize> = (0..4).map(|_| p.pick(&[]).unwrap()).collect();
        assert!(picks.iter().all(|&i| i == 1 || i == 2), "{picks:?}");
        assert!(picks.contains(&2));
    }

    #[test]
    fn ejection_after_max_fails_with_backoff_and_recovery() {
        let p = pool(Balance::RoundRobin, 2);
        p.connect_failed(0);
        assert_eq!(p.pick(&[1]).unwrap(), 0, "one failure does not eject");
        p.connect_failed(0);
        let e = p.pick(&[1]).unwrap_err();
        let ra = e.retry_after.unwrap();
        assert!(
            ra > Duration::from_secs(9) && ra <= Duration::from_secs(10),
            "{ra:?}"
        );
        // Every pick now goes to the healthy endpoint.
        for _ in 0..4 {
            assert_eq!(p.pick(&[]).unwrap(), 1);
        }
        // Ejected again later: the back-off doubles.
        p.endpoints[0].ejected_until.store(0, Ordering::Relaxed);
        p.connect_failed(0);
        p.connect_failed(0);
        let ra = p.pick(&[1]).unwrap_err().retry_after.unwrap();
        assert!(ra > Duration::from_secs(19), "{ra:?}");
        // A success clears the history.
        p.succeeded(0);
        assert_eq!(p.endpoints[0].ejections.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn unhealthy_endpoints_are_skipped() {
        let p = pool(Balance::RoundRobin, 2);
        p.endpoints[1].healthy.store(false, Ordering::Relaxed);
        for _ in 0..4 {
            assert_eq!(p.pick(&[]).unwrap(), 0);
        }
        let e = p.pick(&[0]).unwrap_err();
        assert!(e.retry_after.is_none());
    }
}
